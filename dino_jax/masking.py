"""iBOT block masking of student global-crop patches (BEiT, Bao et al. 2022, Alg. 1).

Masks are drawn on the host with a numpy Generator seeded by (seed, step), so a step's masks
are reproducible after resume; they are dense booleans of a static shape. On the device,
`masked_token_index` turns them into the token slots the iBOT head scores.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np


def block_mask(rng: np.random.Generator, grid: tuple[int, int], num_masked: int,
               min_block: int = 4, aspect=(0.3, 1 / 0.3), max_tries: int = 10) -> np.ndarray:
  """Mask `num_masked` patches at most of a grid with random rectangles.

  Each rectangle has area in [min_block, remaining] and log-uniform aspect in `aspect`;
  it is kept only if it adds between 1 and `remaining` new patches, so the count never
  exceeds `num_masked`.
  """
  h, w = grid
  mask = np.zeros(grid, bool)
  count = 0
  while count < num_masked:
    remaining = num_masked - count
    added = 0
    for _ in range(max_tries):
      area = rng.uniform(min_block, max(min_block, remaining))
      ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
      bh, bw = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
      if not (0 < bh < h and 0 < bw < w):
        continue
      top, left = rng.integers(0, h - bh + 1), rng.integers(0, w - bw + 1)
      new = bh * bw - mask[top:top + bh, left:left + bw].sum()
      if 0 < new <= remaining:
        mask[top:top + bh, left:left + bw] = True
        added = int(new)
        break
    if added == 0:
      break
    count += added
  return mask


def max_masked_per_group(num_images: int, groups: int, num_patches: int, cfg, stratum_images: int) -> int:
  """Static upper bound on the masked patches of one group of m = `num_images / groups`
  consecutive images (a device's share of the batch's global crops) when `step_masks` draws the
  masks of each run of `stratum_images` consecutive images apart (`batch_masks`: it masks
  int(stratum_images * mask_prob) of them, the i-th at most int(num_patches * bounds[i + 1])
  patches, its stratum's top ratio). A group inside one run holds at worst its m largest tops;
  otherwise m // stratum_images whole runs and, of the two runs it cuts into, the largest tops.
  For one group of one run that is about a third of `num_images * num_patches * mask_ratio[1]`
  for DINOv2's settings; for one image per group, int(num_patches * mask_ratio[1])."""
  m = num_images // groups
  n_masked = int(stratum_images * cfg.mask_prob)
  bounds = np.linspace(*cfg.mask_ratio, n_masked + 1)
  tops = sorted((int(num_patches * b) for b in bounds[1:]), reverse=True)
  if stratum_images % m == 0:
    return max(sum(tops[:m]), 1)
  whole, rest = divmod(m, stratum_images)
  return max(whole * sum(tops) + sum(sorted(tops * 2, reverse=True)[:rest]), 1)


def batch_masks(rng: np.random.Generator, num_images: int, grid: tuple[int, int], cfg) -> np.ndarray:
  """DINOv2 collate: a `mask_prob` fraction of images is masked, with ratios stratified
  over `mask_ratio`, the rest not at all. Returns [num_images, h*w] bool.

  As in DINOv2, an image whose target is under 3 patches (tiny grids) stays unmasked: the
  smallest rectangle block_mask places has 3 cells. `max_masked_per_group` relies on the i-th
  masked image getting at most int(h*w * bounds[i + 1]) patches.
  """
  n_patches = grid[0] * grid[1]
  n_masked_images = int(num_images * cfg.mask_prob)
  bounds = np.linspace(*cfg.mask_ratio, n_masked_images + 1)
  masks = np.zeros((num_images, n_patches), bool)
  for i in range(n_masked_images):
    ratio = rng.uniform(bounds[i], bounds[i + 1])
    masks[i] = block_mask(rng, grid, int(n_patches * ratio)).reshape(-1)
  return masks[rng.permutation(num_images)]


def step_masks(cfg, step: int, grid: tuple[int, int], num_global: int, group_images: int) -> np.ndarray:
  """[local batch, num_global, h*w] iBOT masks for this process's images of `step`, drawn as
  DINOv2's collate draws them for each GPU: within each group of `group_images` consecutive
  images (`objectives.group_size`), over their `num_global` global crops (`batch_masks`). The
  global batch's masks come from (seed, step) and each process takes its slice, so a run's
  masks do not depend on how many processes or devices share the batch."""
  rng = np.random.default_rng([cfg.seed, step])
  masks = np.concatenate([batch_masks(rng, group_images * num_global, grid, cfg.mask)
                          for _ in range(cfg.batch_size // group_images)]).reshape(cfg.batch_size, num_global, -1)
  local = cfg.batch_size // jax.process_count()
  return masks[jax.process_index() * local:(jax.process_index() + 1) * local]


def masked_token_index(masks, groups: int, max_per_group: int):
  """The masked patches of each group of consecutive images (`groups` divides the images; one
  group per device keeps the gather on the device), padded to a static `max_per_group`
  (`max_masked_per_group`): only the slots a group can need, not every image's worst case.

  Args:
    masks: [n, P] bool, True = masked.
    groups: number of groups of n / groups images.
    max_per_group: slots per group.
  Returns:
    [groups, max_per_group] positions in the group's flattened [n / groups * P] patches (masked
    ones first), flat [groups * max_per_group] DINOv2 weights 1 / (masked patches of the token's
    image) with 0 for padding, and the flat validity.
  """
  num_patches = masks.shape[1]
  grouped = masks.reshape(groups, -1)
  index = jnp.argsort(~grouped, axis=1, stable=True)[:, :max_per_group]
  per_image = jnp.sum(masks, axis=1).reshape(groups, -1)
  count = jnp.take_along_axis(per_image, index // num_patches, axis=1)
  valid = jnp.arange(max_per_group)[None, :] < jnp.sum(grouped, axis=1, keepdims=True)
  weights = jnp.where(valid, 1.0 / jnp.maximum(count, 1), 0.0)
  return index, weights.reshape(-1), valid.reshape(-1).astype(jnp.float32)
