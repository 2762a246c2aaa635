"""iBOT block masking of student global-crop patches (BEiT, Bao et al. 2022, Alg. 1).

Runs on the host with a numpy Generator seeded by (seed, step), so a step's masks are
reproducible after resume. Masks are dense booleans of a static shape.
"""
import math

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
