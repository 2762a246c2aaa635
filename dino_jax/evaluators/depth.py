"""The depth evaluator: DINOv2's linear monocular depth probe (Oquab et al. 2023, Sec. 7.4;
`dinov2/eval/depth` and its `*_nyu_linear_config.py`). The layout, the training loop and the
simplifications are `dense`'s.

Depth "lin. 1" (`DepthEvaluator`, the depth `BNHead`, its BatchNorm commented out): the last
block's patch tokens with the CLS token concatenated to each (`n_blocks` 4: "lin. 4", blocks 3,
6, 9, 12 of ViT-S/B, 5, 12, 18, 24 of ViT-L, 10, 20, 30, 40 of ViT-g as `hub/depthers.py`, each
with its CLS token, concatenated), upsampled 4x bilinearly, a 1x1 convolution to 256 logits;
`head` "classify": depth = sum_k p_k c_k over bins c = linspace(min_depth, max_depth, 256)
("UD") with AdaBins' "linear" normalization p = (relu(l) + 0.1) / sum; "regression": relu(l) +
min_depth (the official non-classify head; pixels its relu drives below 0 stop learning, so it
wants a small learning rate). The prediction is resized bilinearly to the depth map. Loss: the
scale-invariant log loss (AdaBins' SigLoss: sqrt(Var g + 0.15 mean(g)²), Var unbiased, g =
log(d + 1e-3) - log(d* + 1e-3) over the pixels with d* > 0 of each `loss_group` images (2, the
official per-GPU batch: DDP averages the GPUs' gradients), averaged over the groups; its warm-up,
the first 100 steps, sqrt(0.15 mean(g)²)). AdamW (lr 1e-4, weight decay 0.01), gradient clipping at norm 35,
12800 steps of linear warmup from 1e-3 x lr then cosine to 1e-8 x lr over 38400 steps of 16
random crops 416x544 with flip. Test: the whole image, predictions clamped to [min_depth,
max_depth], averaged with the flipped image's; RMSE, abs rel and δ1 (max(d/d*, d*/d) < 1.25) over
the pixels with min_depth < d* < max_depth of each image, then the nanmean over images (the
Monocular-Depth-Estimation-Toolbox's `pre_eval` metrics that DINOv2 used). `eigen_crop`: NYU's
Eigen crop, rows 45:471 and columns 41:601, fixed pixel indices of a 480x640 map in the toolbox;
here on a resized NYU map (any 4:3 size) the same box scaled and rounded inwards, and on a map of
another aspect ratio (not an NYU frame) one UsageError (set eigen_crop false) rather than a crop of
the wrong area.
"""
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from dino_jax import validate
from dino_jax.errors import UsageError
from dino_jax.evaluators import common
from dino_jax.evaluators import dense

NYU_SIZE = (480, 640)
EIGEN_CROP = (45, 471, 41, 601)  # NYU's Eigen crop: rows 45:471, columns 41:601 of its 480x640 depth maps
SIG_LAMBDA = 0.15  # SigLoss: Var g + (1 - 0.85) mean(g)²
LOG_EPS = 1e-3  # SigLoss / GradientLoss: log(d + 1e-3)
BIN_EPS = 0.1  # AdaBins' "linear" normalization: relu(l) + 0.1


def read_depth(path: pathlib.Path, depth_scale: float) -> np.ndarray:
  """float32 [H, W] metres of a depth map (PNG / depth_scale, or .npy as stored); 0 where
  there is no measurement; UsageError naming the file when it cannot be read."""
  try:
    if path.suffix.lower() == ".npy":
      depth = np.asarray(np.load(path, allow_pickle=False), np.float32)
    else:
      with Image.open(path) as image:
        depth = np.asarray(image).astype(np.float32) / depth_scale
  except dense.READ_ERRORS as e:
    raise UsageError(f"cannot read depth map {str(path)!r} ({type(e).__name__}: {e})") from None
  if depth.ndim != 2:
    raise UsageError(f"depth map {str(path)!r} is not one channel (shape {depth.shape})")
  return np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)


def eigen_box(shape: tuple[int, int], path) -> tuple[int, int, int, int]:
  """(top, bottom, left, right) of NYU's Eigen crop on a depth map of `shape` (the file `path`):
  rows 45:471 and columns 41:601 at NYU's 480x640; on any 4:3 map (a resized NYU frame) that box
  scaled, rounded inwards. UsageError for another aspect ratio: not an NYU frame, so the crop
  would cut an arbitrary border."""
  (h, w), (nh, nw) = shape, NYU_SIZE
  if h * nw != w * nh:
    raise UsageError(f"eigen_crop is NYU's crop of 640x480 depth maps, but {str(path)!r} is {w}x{h}, not 4:3 "
                     f"(not an NYU frame: set eigen_crop false)")
  top, bottom, left, right = EIGEN_CROP
  return -(-top * h // nh), bottom * h // nh, -(-left * w // nw), right * w // nw


def depth_errors(pred: np.ndarray, gt: np.ndarray, min_depth: float, max_depth: float,
                 box: tuple[int, int, int, int] | None = None) -> np.ndarray:
  """[rmse, abs_rel, delta1] of one image over its pixels with min_depth < gt < max_depth (and
  inside `box`, (top, bottom, left, right), e.g. `eigen_box`); NaN where none (left out of the
  mean, as the toolbox's nanmean)."""
  valid = (gt > min_depth) & (gt < max_depth)
  if box is not None:
    inside = np.zeros_like(valid)
    inside[box[0]:box[1], box[2]:box[3]] = True
    valid &= inside
  if not valid.any():
    return np.full(3, np.nan)
  g, p = gt[valid].astype(np.float64), pred[valid].astype(np.float64)
  return np.array([np.sqrt(np.mean((g - p) ** 2)), np.mean(np.abs(g - p) / g),
                   np.mean(np.maximum(g / p, p / g) < 1.25)])


def depth_scores(errors: list[np.ndarray]) -> dict[str, float]:
  """The per-image `depth_errors` averaged over the images that have valid pixels; UsageError
  when none has."""
  errors = np.stack(errors)
  if np.isnan(errors[:, 0]).all():
    raise UsageError("no test depth map has a pixel with min_depth < depth < max_depth (inside the Eigen crop "
                     "with eigen_crop): check depth_scale (PNG units per metre) and the depth range")
  rmse, abs_rel, delta1 = np.nanmean(errors, axis=0)
  return {"depth_rmse": float(rmse), "depth_abs_rel": float(abs_rel), "depth_delta1": float(delta1)}


def depth_from_logits(logits, head: str, min_depth: float, max_depth: float):
  """[B, H, W] depth of head logits [B, H, W, n]: "classify" the bin centres (uniform on
  [min_depth, max_depth]) weighted by AdaBins' linear normalization (relu(l) + 0.1) / sum;
  "regression" relu(l) + min_depth."""
  if head == "regression":
    return jax.nn.relu(logits[..., 0]) + min_depth
  bins = jnp.linspace(min_depth, max_depth, logits.shape[-1])
  p = jax.nn.relu(logits) + BIN_EPS
  return (p / p.sum(-1, keepdims=True)) @ bins


def sig_loss(pred, gt, warm_up):
  """AdaBins' scale-invariant log loss sqrt(Var g + 0.15 mean(g)²) (Var unbiased) of g =
  log(pred + 1e-3) - log(gt + 1e-3) over the pixels with gt > 0; sqrt(0.15 mean(g)²) while
  `warm_up` (SigLoss warm_up)."""
  valid = gt > 0
  n = jnp.maximum(valid.sum(), 2)
  g = jnp.where(valid, jnp.log(pred + LOG_EPS) - jnp.log(jnp.where(valid, gt, 1.0) + LOG_EPS), 0.0)
  mean = g.sum() / n
  var = jnp.sum(jnp.where(valid, (g - mean) ** 2, 0.0)) / (n - 1)
  # Floored under the root: a group without depth is 0 with a zero (not NaN) gradient.
  return jnp.sqrt(jnp.maximum(jnp.where(warm_up, 0.0, var) + SIG_LAMBDA * mean ** 2, 1e-12))


def grouped_sig_loss(pred, gt, warm_up, group: int):
  """`sig_loss` of each `group` consecutive images of the batch, averaged: the official probe
  computes SigLoss on each GPU's 2 images and DDP averages the GPUs' gradients, which is not the
  loss of the pooled batch (the variance and mean are per group)."""
  split = lambda x: x.reshape(x.shape[0] // group, group, *x.shape[1:])
  return jnp.mean(jax.vmap(sig_loss, in_axes=(0, 0, None))(split(pred), split(gt), warm_up))


def gradient_loss(pred, gt):
  """MegaDepth's multi-scale gradient matching of log depth on [B, H, W] (strides 1, 2, 4, 6;
  differences two pixels apart, as the official `GradientLoss`), over pixels with gt > 0."""
  total = 0.0
  for s in (1, 2, 4, 6):
    p, t = pred[:, ::s, ::s], gt[:, ::s, ::s]
    m = (t > 0).astype(p.dtype)
    d = (jnp.log(p + LOG_EPS) - jnp.log(jnp.where(t > 0, t, 1.0) + LOG_EPS)) * m
    v = jnp.abs(d[:, :-2] - d[:, 2:]) * m[:, :-2] * m[:, 2:]
    h = jnp.abs(d[:, :, :-2] - d[:, :, 2:]) * m[:, :, :-2] * m[:, :, 2:]
    total = total + (v.sum() + h.sum()) / jnp.maximum(m.sum(), 1)
  return total


class DepthEvaluator(dense.DenseProbe):
  """DINOv2's linear depth probe (module docstring): `depth_rmse` (metres), `depth_abs_rel`
  and `depth_delta1` on the test split of an NYU-like folder."""
  name = "depth"
  splits = dense.DEPTH_SPLITS
  folder, suffixes = "depth", dense.DEPTH_SUFFIXES
  blocks_key = "n_blocks"
  # DINOv2 Sec. 7.4 linear depth "lin. 1" (nyu_linear_config): last block's patch tokens + CLS, x4 upsampled, 256 bins
  # on [1e-3, 10] m, SigLoss per 2 images (per GPU); AdamW lr 1e-4 wd 0.01, clip 35, 12800 warmup + cosine,
  # 38400 steps x 16 crops 416x544.
  default_configs = {
      "depth": dict(type="depth", every_steps=-1, every_epochs=0.0, path="", head="classify", bins=256, n_blocks=1,
                    cls_token=True, upsample=4, min_depth=1e-3, max_depth=10.0, depth_scale=1000.0,
                    crop_size=(416, 544), flip=True, flip_test=True, eigen_crop=True, steps=38400, batch_size=16,
                    learning_rate=1e-4, weight_decay=0.01, warmup_steps=12800, warmup_ratio=1e-3,
                    schedule="cosine", min_lr_ratio=1e-8, grad_clip=35.0, sigloss_warmup_steps=100,
                    loss_group=2, gradient_loss_weight=0.0, seed=0, baselines=False),
  }
  final_norm = False  # DINOv2's depth heads: get_intermediate_layers(norm=False) (hub/depthers.py)

  def __init__(self, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, mesh):
    super().__init__(ecfg, cfg, mesh)
    self.predict = jax.jit(self._predict, static_argnums=(3,), out_shardings=self.replicated)
    if ecfg.eigen_crop:  # a non-NYU or unreadable test map fails here, before training, not after it
      for _, depth_path in self.test_pairs:
        eigen_box(self.read_target(depth_path).shape, depth_path)

  def read_target(self, path) -> np.ndarray:
    return read_depth(path, self.ecfg.depth_scale)

  def augment(self, rng, image, depth):
    return dense.random_crop(rng, image, depth, self.crop, 0.0, flip=self.ecfg.flip)

  def init_head(self, key, dim: int):
    """torch's default Conv2d initialization U(±1/sqrt(dim)) of the 1x1 convolution."""
    outputs = self.ecfg.bins if self.ecfg.head == "classify" else 1
    k_w, k_b = jax.random.split(key)
    bound = 1 / math.sqrt(dim)
    return ({"kernel": jax.random.uniform(k_w, (dim, outputs), minval=-bound, maxval=bound),
             "bias": jax.random.uniform(k_b, (outputs,), minval=-bound, maxval=bound)}, {})

  def depth(self, head, feats):
    """Depth [B, u h, u w] of head inputs [B, h, w, C] (u = `upsample`). The official head
    upsamples the features before the 1x1 convolution; upsampling its logits is the same (both
    linear, the interpolation weights sum to 1) and cheaper."""
    e = self.ecfg
    logits = feats @ head["kernel"] + head["bias"]
    logits = dense.resize(logits, tuple(s * e.upsample for s in logits.shape[1:3]))
    return depth_from_logits(logits, e.head, e.min_depth, e.max_depth)

  def loss(self, head, stats, feats, depth, step):
    pred = dense.resize(self.depth(head, feats)[..., None], depth.shape[1:3])[..., 0]
    loss = grouped_sig_loss(pred, depth, step < self.ecfg.sigloss_warmup_steps, self.ecfg.loss_group)
    if self.ecfg.gradient_loss_weight:
      loss = loss + self.ecfg.gradient_loss_weight * gradient_loss(pred, depth)
    return loss, stats

  def _predict(self, state, params, image, size):
    """Depth [size] of one image [1, H, W, 3]: clamped to [min_depth, max_depth], resized,
    averaged with the flipped image's (flipped back) when `flip_test`."""
    e = self.ecfg
    views = jnp.concatenate([image, image[:, :, ::-1]]) if e.flip_test else image
    pred = jnp.clip(self.depth(state["head"], self.inputs(params, views)), e.min_depth, e.max_depth)
    pred = dense.resize(pred[..., None], size)[..., 0]
    return (pred[0] + pred[1, :, ::-1]) / 2 if e.flip_test else pred[0]

  def score(self, state, params) -> dict[str, float]:
    e, errors = self.ecfg, []
    for image_path, depth_path in common.progress(self.test_pairs, "depth test", enabled=self.progress):
      image, gt = dense.read_pair(image_path, depth_path, self.read_target)
      pred = np.asarray(self.predict(state, params, self.features.fit(image)[None], gt.shape))
      box = eigen_box(gt.shape, depth_path) if e.eigen_crop else None
      errors.append(depth_errors(pred, gt, e.min_depth, e.max_depth, box))
    return depth_scores(errors)

  @staticmethod
  def describe(ecfg: ml_collections.ConfigDict) -> str:
    inputs = f"{ecfg.n_blocks} blocks'" if ecfg.n_blocks > 1 else "last block's"
    head = f"{ecfg.bins} depth bins" if ecfg.head == "classify" else "regression"
    return (f"RMSE (m) on test (DINOv2 linear: {inputs} patch tokens{' + CLS' if ecfg.cls_token else ''}, {head}, "
            f"{ecfg.steps} AdamW steps of {ecfg.batch_size} crops, SigLoss)")

  @staticmethod
  def check(name: str, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, enabled: bool) -> None:
    if ecfg.get("head") not in ("classify", "regression"):
      raise UsageError(f"evals.{name}.head must be 'classify' (DINOv2: depth bins) or 'regression', "
                       f"not {ecfg.get('head')!r}")
    for key in ("bins", "n_blocks", "upsample"):  # DINOv2: 256, 1 (4: "lin. 4"), 4
      validate.positive_int(ecfg, key, prefix=f"evals.{name}.")
    if ecfg.bins < 2:
      raise UsageError(f"evals.{name}.bins must be an int >= 2 (DINOv2: 256), not {ecfg.bins!r}")
    validate.positive_int(ecfg, "sigloss_warmup_steps", zero=True, prefix=f"evals.{name}.")
    validate.positive_int(ecfg, "loss_group", prefix=f"evals.{name}.")
    if isinstance(ecfg.get("batch_size"), int) and ecfg.batch_size % ecfg.loss_group:
      raise UsageError(f"evals.{name}.loss_group {ecfg.loss_group} must divide batch_size {ecfg.batch_size} "
                       "(SigLoss is taken per group of images: the official per-GPU batch, 2)")
    for key in ("cls_token", "flip", "flip_test", "eigen_crop"):
      validate.boolean(ecfg, key, prefix=f"evals.{name}.")
    for key in ("min_depth", "max_depth", "depth_scale"):
      validate.positive_number(ecfg, key, prefix=f"evals.{name}.")
    validate.non_negative_number(ecfg, "gradient_loss_weight", prefix=f"evals.{name}.")
    if not ecfg.min_depth < ecfg.max_depth < math.inf:
      raise UsageError(f"evals.{name}.min_depth {ecfg.min_depth} must be below max_depth {ecfg.max_depth} "
                       f"(finite; NYU: 1e-3 and 10 m)")
    size = ecfg.get("crop_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
      raise UsageError(f"evals.{name}.crop_size must be (height, width), positive ints (DINOv2 NYU: (416, 544)), "
                       f"not {size!r}")
    dense.check_training(name, ecfg, DepthEvaluator, cfg, enabled)
