"""What the downstream evaluators share: the frozen backbone on images of any size, image
files read as uint8 RGB, and the progress bar."""
import os
import pathlib

import jax
import jax.numpy as jnp
import matplotlib.cbook
import ml_collections
import numpy as np
from PIL import Image
import tqdm

from dino_jax import augment
from dino_jax import data
from dino_jax import models
from dino_jax import sharding
from dino_jax.errors import UsageError


class DenseFeatures:
  """The backbone of `model_cfg` as a frozen feature map on uint8 [B, H, W, 3] images of any
  size (ImageNet-normalized here; H and W multiples of `stride`, see `fit`):
  {"embedding": [B, D] (CLS, or pooled where there is none), "patch": [B, h, w, D]} as float32
  numpy, and with `layers=n` also "intermediate" (the last n blocks', as `models.ViT`; with
  `final_norm=False` before the final norm). One compile per input shape. With the `mesh` the
  parameters live on (FSDP splits them, over processes too), the outputs are replicated on it,
  so every process can read them."""

  def __init__(self, model_cfg: ml_collections.ConfigDict, mesh=None):
    self.module = models.make_backbone(model_cfg)
    self.stride = model_cfg.patch_size  # ViT and Swin both take inputs in multiples of the patch size
    replicated = {} if mesh is None else {"out_shardings": sharding.replicated(mesh)}
    self._apply = jax.jit(self._forward, static_argnums=(2, 3), **replicated)

  def _forward(self, params, images, layers, final_norm):
    return self.module.apply({"params": params}, augment.normalize(images), layers=layers, final_norm=final_norm)

  def __call__(self, params, images: np.ndarray, layers: int = 0, final_norm: bool = True) -> dict:
    h, w = images.shape[1:3]
    if h % self.stride or w % self.stride:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.stride} (use fit)")
    return jax.device_get(self._apply(params, jnp.asarray(images), layers, final_norm))

  def fit(self, image: np.ndarray) -> np.ndarray:
    """`image` (uint8 [H, W, 3]) resized bicubic to the nearest multiples of the stride."""
    h, w = image.shape[:2]
    size = tuple(max(self.stride, round(s / self.stride) * self.stride) for s in (w, h))
    return image if size == (w, h) else np.asarray(Image.fromarray(image).resize(size, Image.BICUBIC))


def read_rgb(path: str | os.PathLike) -> np.ndarray:
  """uint8 [H, W, 3] of an image file (any mode, `data.to_rgb`); UsageError naming it when it
  cannot be read (missing, truncated, not an image, a decompression bomb)."""
  try:
    with Image.open(path) as image:
      return np.asarray(data.to_rgb(image))
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise UsageError(f"cannot read image {str(path)!r} ({type(e).__name__}: {e})") from None


def sample_data(name: str) -> str:
  """The path of one of matplotlib's bundled sample files, the real images every synthetic
  benchmark is made from: photos "grace_hopper.jpg", "Minduka_Present_Blue_Pack.png",
  "logo2.png"; elevation maps "jacksboro_fault_dem.npz" ("elevation"), "topobathy.npz"
  ("topo")."""
  return matplotlib.cbook.get_sample_data(name, asfileobj=False)


def sample_photos() -> list[np.ndarray]:
  """matplotlib's two bundled photographs (Grace Hopper, the Minduka present) as uint8 RGB."""
  return [read_rgb(sample_data(name)) for name in ("grace_hopper.jpg", "Minduka_Present_Blue_Pack.png")]


def l2_normalize(x: np.ndarray) -> np.ndarray:
  """`x` divided by its l2 norm along the last axis (zero vectors stay zero)."""
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def resize_bilinear(x: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
  """[h, w, C] resized to `shape` bilinear with half-pixel centres and no antialiasing, as
  PyTorch's `F.interpolate(mode="bilinear", align_corners=False)` (source coordinates clamped
  at the borders); unchanged when already that shape."""
  if x.shape[:2] == tuple(shape):
    return x

  def axis(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float32)

  (r0, r1, wr), (c0, c1, wc) = axis(x.shape[0], shape[0]), axis(x.shape[1], shape[1])
  x = x[r0] * (1 - wr)[:, None, None] + x[r1] * wr[:, None, None]
  return x[:, c0] * (1 - wc)[None, :, None] + x[:, c1] * wc[None, :, None]


# Config checks shared by the evaluators: one UsageError line naming evals.<name>.<key>.

def check_positive_int(name: str, ecfg, key: str, zero: bool = False) -> None:
  """UsageError unless ecfg[key] is a positive int (or 0 with `zero`)."""
  value = ecfg.get(key)
  if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero else 1):
    raise UsageError(f"evals.{name}.{key} must be a {'non-negative' if zero else 'positive'} int, not {value!r}")


def check_positive_number(name: str, ecfg, key: str) -> None:
  """UsageError unless ecfg[key] is a positive number."""
  value = ecfg.get(key)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise UsageError(f"evals.{name}.{key} must be a positive number, not {value!r}")


def check_non_negative_number(name: str, ecfg, key: str) -> None:
  """UsageError unless ecfg[key] is a finite number >= 0."""
  value = ecfg.get(key)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
    raise UsageError(f"evals.{name}.{key} must be a number >= 0, not {value!r}")


def check_bool(name: str, ecfg, key: str) -> None:
  """UsageError unless ecfg[key] is a bool."""
  if not isinstance(ecfg.get(key), bool):
    raise UsageError(f"evals.{name}.{key} must be true or false, not {ecfg.get(key)!r}")


def check_string(name: str, ecfg, key: str) -> None:
  """UsageError unless ecfg[key] is a string (a path, a split name)."""
  if not isinstance(ecfg.get(key), str):
    raise UsageError(f"evals.{name}.{key} must be a string, not {ecfg.get(key)!r}")


def image_files(folder: str | os.PathLike, what: str) -> list[pathlib.Path]:
  """The images under `folder` (`data.list_images`, sorted); UsageError naming `what` when the
  folder is missing or holds none."""
  if not folder or not os.path.isdir(folder):
    raise UsageError(f"{what}: {str(folder)!r} is not a folder")
  files = data.list_images(pathlib.Path(folder))
  if not files:
    raise UsageError(f"{what}: no images under {str(folder)!r}")
  return files


def progress(iterable, desc: str, total: int | None = None, enabled: bool = True):
  """A tqdm bar over `iterable` on process 0 (with ETA), silent elsewhere or when disabled."""
  return tqdm.tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                   disable=not enabled or jax.process_index() != 0)
