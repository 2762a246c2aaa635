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


def max_masked_per_image(num_patches: int, cfg) -> int:
  """Static upper bound on the masked patches of one image."""
  return int(num_patches * cfg.mask_ratio[1])


def batch_masks(rng: np.random.Generator, num_images: int, grid: tuple[int, int], cfg) -> np.ndarray:
  """DINOv2 collate: a `mask_prob` fraction of images is masked, with ratios stratified
  over `mask_ratio`, the rest not at all. Returns [num_images, h*w] bool.

  As in DINOv2, an image whose target is under 3 patches (tiny grids) stays unmasked: the
  smallest rectangle block_mask places has 3 cells.
  """
  n_patches = grid[0] * grid[1]
  n_masked_images = int(num_images * cfg.mask_prob)
  bounds = np.linspace(*cfg.mask_ratio, n_masked_images + 1)
  masks = np.zeros((num_images, n_patches), bool)
  for i in range(n_masked_images):
    ratio = rng.uniform(bounds[i], bounds[i + 1])
    masks[i] = block_mask(rng, grid, int(n_patches * ratio)).reshape(-1)
  return masks[rng.permutation(num_images)]


def step_masks(cfg, step: int, grid: tuple[int, int], num_global: int) -> np.ndarray:
  """[local batch, num_global, h*w] iBOT masks for this process's images of `step`: the
  global batch's masks come from (seed, step) and each process takes its slice, so a run's
  masks do not depend on how many processes share the batch."""
  rng = np.random.default_rng([cfg.seed, step])
  masks = batch_masks(rng, cfg.batch_size * num_global, grid, cfg.mask).reshape(cfg.batch_size, num_global, -1)
  local = cfg.batch_size // jax.process_count()
  return masks[jax.process_index() * local:(jax.process_index() + 1) * local]


def masked_token_index(masks, max_per_image):
  """Per image, the indices of its masked patches padded to a static `max_per_image`.

  Returns [n, m] indices, flat [n*m] DINOv2 weights 1 / (masked patches of the image) with
  0 for padding, and the flat [n*m] validity.
  """
  index = jnp.argsort(~masks, axis=1, stable=True)[:, :max_per_image]  # masked ones first
  per_image = jnp.sum(masks, axis=1, keepdims=True)
  valid = jnp.arange(max_per_image)[None, :] < per_image
  weights = jnp.where(valid, 1.0 / jnp.maximum(per_image, 1), 0.0)
  return index, weights.reshape(-1), valid.reshape(-1).astype(jnp.float32)
