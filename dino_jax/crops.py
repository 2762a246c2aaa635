"""Multi-crop geometry on the host: random-resized crops cut from the full decoded image.

DINO (Caron et al. 2021, App. A) and DINOv2 cut every view with torchvision's
`RandomResizedCrop(size, scale, interpolation=BICUBIC)` from the original image, then flip it
with p = 0.5. `crop_box` draws the same parameters as torchvision's `get_params`: an area
fraction uniform in `scale` and a log-uniform aspect ratio in (3/4, 4/3), up to 10 attempts,
then the central crop of the image clamped to that ratio range. The photometric ops (color
jitter, grayscale, blur, solarization) stay on the device (`augment.multicrop`).

Every random choice of an image's views comes from `view_rng(seed, step, position)`, its
position in the global batch, so a step's views are the same on any number of processes and
after a resume. A JPEG is decoded at reduced size (`PIL.Image.draft`: 1/2, 1/4 or 1/8) when
every crop of the step still has at least its output resolution.
"""
import dataclasses
import math

import ml_collections
import numpy as np
from PIL import Image

RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10


@dataclasses.dataclass(frozen=True)
class CropSpec:
  size: int
  scale: tuple[float, float]
  resample: int = Image.BICUBIC  # the training views' (DINO, DINOv2); DINO's linear evaluation: BILINEAR


def crop_specs(aug: ml_collections.ConfigDict) -> list[CropSpec]:
  """The 2 global and `num_local` local crops of the `aug` config, in view order."""
  return ([CropSpec(aug.global_size, tuple(aug.global_scale))] * 2
          + [CropSpec(aug.local_size, tuple(aug.local_scale))] * aug.num_local)


def view_rng(seed: int, step: int, position: int) -> np.random.Generator:
  """The generator of the views of the image at `position` of step `step`'s global batch."""
  return np.random.default_rng([seed, 7, step, position])


def crop_box(rng: np.random.Generator, width: int, height: int, scale, ratio=RATIO) -> tuple[int, int, int, int]:
  """(top, left, height, width) of a random-resized crop, as torchvision's
  `RandomResizedCrop.get_params`."""
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(ATTEMPTS):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def draft_size(boxes, sizes, width: int, height: int) -> tuple[int, int]:
  """The smallest decoded size at which every box keeps at least its output size in pixels."""
  shrink = min(min(w, h) / size for (_, _, h, w), size in zip(boxes, sizes))
  shrink = max(shrink, 1.0)
  return math.ceil(width / shrink), math.ceil(height / shrink)


def views(image: Image.Image, rng: np.random.Generator, specs: list[CropSpec], to_rgb) -> list[np.ndarray]:
  """uint8 [size, size, 3] views of an opened (not yet decoded) image: boxes drawn on its full
  size, a reduced-size decode where they allow it, each box resized (`spec.resample`, bicubic
  by default), flip p = 0.5.
  `to_rgb` converts the decoded image to RGB (`data.to_rgb`)."""
  width, height = image.size
  boxes, flips = [], []
  for spec in specs:
    boxes.append(crop_box(rng, width, height, spec.scale))
    flips.append(rng.random() < 0.5)
  if image.format == "JPEG":
    image.draft("RGB", draft_size(boxes, [s.size for s in specs], width, height))
  image = to_rgb(image)
  sx, sy = image.size[0] / width, image.size[1] / height
  out = []
  for (top, left, h, w), flip, spec in zip(boxes, flips, specs):
    box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    view = image.resize((spec.size, spec.size), spec.resample, box=box)
    out.append(np.asarray(view.transpose(Image.FLIP_LEFT_RIGHT) if flip else view))
  return out
