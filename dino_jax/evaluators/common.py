"""What the evaluators share: the frozen backbone's global embedding over a split
(`make_feature_fn`, `extract_features`), its feature maps on images of any size
(`DenseFeatures`), the train / test splits of the training data, image files read as uint8
RGB, and the progress bar."""
import functools
import os
import pathlib
from typing import Callable

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


def make_feature_fn(backbone, image_size: int, mesh) -> Callable:
  """Jitted (params, uint8 images, labels) -> (features, labels), replicated to every process.

  Features are the backbone's global embedding on the evaluation view, or, with params None,
  the raw pixels (the baseline a learned representation should beat).
  """
  replicated = sharding.replicated(mesh)

  @functools.partial(jax.jit, out_shardings=(replicated, replicated))
  def features(params, images, labels):
    if params is None:
      return images.reshape(images.shape[0], -1).astype(np.float32) / 255.0, labels
    x = augment.preprocess_eval(images, image_size)
    return backbone.apply(models.backbone_variables(params), x)["embedding"], labels

  return features


def extract_features(feature_fn, params, source, batch_size: int, batch_sharding) -> tuple[np.ndarray, np.ndarray]:
  """Features and labels of every image of `source`; each process decodes its slice of
  every batch (the last batch is padded with image 0 and the padding dropped)."""
  local = batch_size // jax.process_count()
  start = jax.process_index() * local
  to_global = lambda x: jax.make_array_from_process_local_data(batch_sharding, x)
  feats, labels = [], []
  for i in range(0, len(source), batch_size):
    index = np.arange(i, i + batch_size)
    valid = index < len(source)
    images, lab = data.read_batch(source, np.where(valid, index, 0)[start:start + local])
    f, lab = feature_fn(params, to_global(images), to_global(lab))
    feats.append(np.asarray(f)[valid])
    labels.append(np.asarray(lab)[valid])
  return np.concatenate(feats), np.concatenate(labels)


def labelled(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The rows with a class (label >= 0; images outside any class folder have -1)."""
  keep = labels >= 0
  return features[keep], labels[keep]


def train_and_test_sources(cfg: ml_collections.ConfigDict, ecfg: ml_collections.ConfigDict):
  """The evaluator's train and test splits of the training data; the test split numbers its
  classes by the train split's (a folder split numbers classes by the training split's list)."""
  train = data.make_source(cfg.data, ecfg.train_split)
  test = data.make_source(cfg.data, ecfg.test_split, classes=getattr(train, "classes", None))
  for split, source in ((ecfg.train_split, train), (ecfg.test_split, test)):
    if hasattr(source, "labels") and not (np.asarray(source.labels) >= 0).any():
      raise UsageError(f"evals: split {split!r} has no image in a class folder, so nothing to score")
  return train, test


class DenseFeatures:
  """The backbone of `model_cfg` as a frozen feature map on uint8 [B, H, W, 3] images of any
  size (ImageNet-normalized here; H and W multiples of `stride`, see `fit`):
  {"embedding": [B, D] (CLS, or pooled where there is none), "patch": [B, h, w, D]} as float32
  numpy, and with `layers=n` also "intermediate" (the last n blocks', as `models.ViT`; with
  `final_norm=False` before the final norm). `patch_stride` (ViTs): overlapping patches at that
  stride (SD-DINO's extractor). One compile per input shape. With the `mesh` the parameters live
  on (FSDP splits them, over processes too), the outputs are replicated on it, so every process
  can read them."""

  def __init__(self, model_cfg: ml_collections.ConfigDict, mesh=None, patch_stride: int = 0):
    self.module = models.make_backbone(model_cfg)
    if patch_stride:
      self.module = self.module.clone(patch_stride=patch_stride)
    self.stride = model_cfg.patch_size  # ViT and Swin both take inputs in multiples of the patch size
    replicated = {} if mesh is None else {"out_shardings": sharding.replicated(mesh)}
    self._apply = jax.jit(self._forward, static_argnums=(2, 3), **replicated)
    self._keys = jax.jit(self._block_keys, static_argnums=2, **replicated)

  def _forward(self, params, images, layers, final_norm):
    return self.module.apply(models.backbone_variables(params), augment.normalize(images), layers=layers,
                             final_norm=final_norm)

  def _block_keys(self, params, images, block):
    out, state = self.module.apply(models.backbone_variables(params), augment.normalize(images), mutable=["keys"])
    keys = state["keys"][f"block{block}"]["key"][0]  # [B, N, heads, d]
    grid = out["patch"].shape[1:3]
    prefix = keys.shape[1] - grid[0] * grid[1]  # the CLS token and registers
    keys = keys[:, prefix:].transpose(0, 1, 3, 2)  # channels d-major, head-minor, as SD-DINO's (d x h) descriptors
    return keys.reshape(keys.shape[0], *grid, -1).astype(jnp.float32)

  def __call__(self, params, images: np.ndarray, layers: int = 0, final_norm: bool = True) -> dict:
    self._check(images)
    return jax.device_get(self._apply(params, jnp.asarray(images), layers, final_norm))

  def facet(self, params, images: np.ndarray, facet: str, block: int) -> np.ndarray:
    """[B, h, w, C] patch descriptors of block `block` (0-based), as SD-DINO's ViTExtractor: its
    output tokens before the final norm ("token") or its attention keys, all heads' channels
    ("key", ordered as SD-DINO's d x heads)."""
    self._check(images)
    if facet == "key":
      return jax.device_get(self._keys(params, jnp.asarray(images), block))
    depth = self.module.num_layers - 1
    return self(params, images, layers=depth - block, final_norm=False)["intermediate"][0]["patch"]

  def _check(self, images):
    h, w = images.shape[1:3]
    if h % self.stride or w % self.stride:
      raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {self.stride} (use fit)")

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


def image_files(folder: str | os.PathLike, what: str) -> list[pathlib.Path]:
  """The images under `folder` (`data.list_images`, sorted; a benchmark's links are followed
  wherever they lead, each folder listed once); UsageError naming `what` when the folder is
  missing or holds none."""
  if not folder or not os.path.isdir(folder):
    raise UsageError(f"{what}: {str(folder)!r} is not a folder")
  files = data.list_images(pathlib.Path(folder), follow_external=True)
  if not files:
    raise UsageError(f"{what}: no images under {str(folder)!r}")
  return files


def progress(iterable, desc: str, total: int | None = None, enabled: bool = True):
  """A tqdm bar over `iterable` on process 0 (with ETA), silent elsewhere or when disabled."""
  return tqdm.tqdm(iterable, desc=desc, total=total, leave=False, dynamic_ncols=True,
                   disable=not enabled or jax.process_index() != 0)
