"""DINOv2's dense linear probes on frozen patch features (Oquab et al. 2023, Sec. 7.4): semantic
segmentation scored by mIoU and monocular depth scored by RMSE, with the official heads and
settings (`dinov2/eval/segmentation`, `dinov2/eval/depth` and their published mmseg configs
`dinov2_vit*14_ade20k_linear_config.py`, `dinov2_vit*14_nyu_linear_config.py`).

Layouts (the benchmarks' own, so `path` can be the real one; `write_synthetic` writes both side
by side in one folder):

  segmentation (ADE20K's ADEChallengeData2016): images/{training,validation}/<name>.jpg with
    annotations/{training,validation}/<name>.png, one channel of uint8 class ids (palette PNGs
    give their indices). `ignore_index` (255) is ignored; with `reduce_zero_label` (ADE20K's,
    as mmseg) id 0 ("other") is ignored too and ids 1..150 become classes 0..149.
  depth (NYU-v2-like): images/{train,test}/<name>.png|jpg with depth/{train,test}/<name>.png,
    uint16 depth / `depth_scale` (NYU: millimetres, 1000), or <name>.npy, float metres; 0 (or
    non-finite) is no measurement.
  Each <name> once per folder (one image and one target: the same name under two suffixes is a
  UsageError).

Segmentation "lin." (`SegmentationEvaluator`, mmseg `BNHead`): the last block's patch tokens
(`n_last_blocks` 4: the last four concatenated, the "+ms" input), a BatchNorm (SyncBN: batch
statistics in training, running ones at test) and a 1x1 convolution (N(0, 0.01²) weights) to
class logits on the patch grid, upsampled bilinearly to the labels' resolution; per-pixel cross
entropy summed over the non-ignored pixels and divided by all pixels (mmseg's CrossEntropyLoss
with avg_non_ignore=False, as the published heads print). AdamW (lr 1e-3, weight decay 1e-4),
1500 steps of linear warmup from 1e-6 x lr then a linear ("poly", power 1) decay to 0 over 40k
steps of 16 crops: shorter side scaled to 512 x U(0.5, 2), a random 512 crop (padded with
ignored labels), flip. Test: shorter side 512, sliding 512-windows with stride 341 whose logits
are averaged, then resized bilinearly to the label map and argmax'ed. mIoU as mmseg
(`total_area_to_metrics`): each class's intersection and union summed over the whole set, IoU =
I / U, the nanmean over the classes (a class with U = 0 is NaN, left out); pixel accuracy (aAcc):
correct / labelled pixels of the whole set.

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

Simplifications and choices: crops and windows are rounded to multiples of the patch size (512
-> 518 for /14 models; the official code zero-pads each 512 window to 518); the official
photometric distortion, `cat_max_ratio` and the long-side cap 2048 of the resize (segmentation),
rotation, color augmentation and the NYU border crop of training images (depth), the one-cycle
Adam momentum of the NYU config and the test-time multi-scale of "+ms" are left out; images are
resized with PIL (antialiased when shrinking, where mmcv's cv2 resize is not; the segmentation
test image's shorter side is 518 at patch 14), and a depth test image is resized bicubic to
multiples of the patch (480x640 -> 476x644 at patch 14) where the official code pads it; the depth
learning rate is the 1e-4 of the published config's public copies (one copy has 5e-3). The
backbone's block outputs are taken as the official heads take them: through the final norm for
segmentation (`get_intermediate_layers(norm=True)`), before it for depth (`norm=False` in
`hub/depthers.py`). The NYU config also weights a `GradientLoss` 0.5, but its slices act on
the batch and channel axes of [B, 1, H, W] maps, so with 2 images per GPU it is exactly 0:
`gradient_loss_weight` defaults to 0, and > 0 adds the
intended multi-scale log-depth gradient matching (MegaDepth) on the spatial axes. The backbone
runs on every training batch (frozen), as the official code does. Evaluation compiles the
backbone once per window count (segmentation) or image size (depth).
"""
import concurrent.futures
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from dino_jax import augment
from dino_jax import data
from dino_jax import sharding
from dino_jax.downstream import common
from dino_jax.errors import UsageError

SEG_SPLITS = ("training", "validation")  # ADE20K's folder names
DEPTH_SPLITS = ("train", "test")
MASK_SUFFIXES = (".png",)
DEPTH_SUFFIXES = (".png", ".npy")
NYU_SIZE = (480, 640)
EIGEN_CROP = (45, 471, 41, 601)  # NYU's Eigen crop: rows 45:471, columns 41:601 of its 480x640 depth maps
OFFICIAL_SPACED_BLOCKS = {(4, 24): (5, 12, 18, 24)}  # DINOv2 ViT-L "lin. 4" (hub/depthers.py: out_index 4, 11, 17, 23)
PAD_COLOR = np.round(augment.IMAGENET_MEAN * 255).astype(np.uint8)  # mmseg pads normalized images with 0
SIG_LAMBDA = 0.15  # SigLoss: Var g + (1 - 0.85) mean(g)²
LOG_EPS = 1e-3  # SigLoss / GradientLoss: log(d + 1e-3)
BIN_EPS = 0.1  # AdaBins' "linear" normalization: relu(l) + 0.1
BN_MOMENTUM, BN_EPS = 0.1, 1e-5  # torch BatchNorm
READ_ERRORS = (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError)  # a bad mask / depth file


# ---------------------------------------------------------------------------------------
# Files: image / target pairs of a split.
# ---------------------------------------------------------------------------------------

def paired_files(root: pathlib.Path, split: str, folder: str, suffixes: tuple[str, ...], what: str) -> list[tuple]:
  """(image, target) paths of `split`: images/<split>/<name>.<image suffix> with
  <folder>/<split>/<name><suffix> (same relative name). UsageError starting with `what` for a
  missing folder, an image without target or a target without image, or a name twice."""
  image_dir, target_dir = root / "images" / split, root / folder / split
  for sub in (image_dir, target_dir):
    if not sub.is_dir():
      raise UsageError(f"{what}: {str(root)!r} has no {sub.relative_to(root).as_posix()}/ folder (layout: "
                       f"images/{split}/<name>.jpg with {folder}/{split}/<name>{suffixes[0]})")
  images, targets = {}, {}
  for path in common.image_files(image_dir, f"{what}: images/{split}"):
    unique(images, path.relative_to(image_dir).with_suffix("").as_posix(), path, what)
  for path in sorted(target_dir.rglob("*")):
    if path.suffix.lower() in suffixes and path.is_file():
      unique(targets, path.relative_to(target_dir).with_suffix("").as_posix(), path, what)
  pairs = []
  for name, image in images.items():
    if name not in targets:
      raise UsageError(f"{what}: image images/{split}/{image.relative_to(image_dir).as_posix()} has no "
                       f"{folder}/{split}/{name}{suffixes[0]}")
    pairs.append((image, targets.pop(name)))
  if targets:
    extra = next(iter(targets.values()))
    raise UsageError(f"{what}: {folder}/{split}/{extra.relative_to(target_dir).as_posix()} has no image in "
                     f"images/{split}/")
  return pairs


def unique(paths: dict, name: str, path: pathlib.Path, what: str) -> None:
  """paths[name] = path; UsageError when `name` is there already (one name, two suffixes)."""
  if name in paths:
    raise UsageError(f"{what}: {paths[name].name!r} and {path.name!r} in {path.parent} are the same <name> twice")
  paths[name] = path


def read_mask(path: pathlib.Path) -> np.ndarray:
  """int32 [H, W] class ids of a one-channel (or palette) PNG; UsageError naming it otherwise."""
  try:
    with Image.open(path) as image:
      mode, mask = image.mode, np.asarray(image)
  except READ_ERRORS as e:
    raise UsageError(f"cannot read mask {str(path)!r} ({type(e).__name__}: {e})") from None
  if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
    raise UsageError(f"mask {str(path)!r} is not one channel of class ids (PIL mode {mode})")
  return mask.astype(np.int32)


def read_depth(path: pathlib.Path, depth_scale: float) -> np.ndarray:
  """float32 [H, W] metres of a depth map (PNG / depth_scale, or .npy as stored); 0 where
  there is no measurement; UsageError naming the file when it cannot be read."""
  try:
    if path.suffix.lower() == ".npy":
      depth = np.asarray(np.load(path, allow_pickle=False), np.float32)
    else:
      with Image.open(path) as image:
        depth = np.asarray(image).astype(np.float32) / depth_scale
  except READ_ERRORS as e:
    raise UsageError(f"cannot read depth map {str(path)!r} ({type(e).__name__}: {e})") from None
  if depth.ndim != 2:
    raise UsageError(f"depth map {str(path)!r} is not one channel (shape {depth.shape})")
  return np.where(np.isfinite(depth), depth, 0.0).astype(np.float32)


def read_pair(image_path: pathlib.Path, target_path: pathlib.Path, read_target) -> tuple[np.ndarray, np.ndarray]:
  """The uint8 RGB image and its target map; UsageError when their sizes differ."""
  image, target = common.read_rgb(image_path), read_target(target_path)
  if target.shape != image.shape[:2]:
    raise UsageError(f"{str(target_path)!r} is {target.shape[1]}x{target.shape[0]} but its image "
                     f"{str(image_path)!r} is {image.shape[1]}x{image.shape[0]}")
  return image, target


def reduce_zero_label(mask: np.ndarray, ignore_index: int) -> np.ndarray:
  """ADE20K's labels as mmseg's `reduce_zero_label`: 0 ("other") ignored, k -> k - 1."""
  return np.where((mask == 0) | (mask == ignore_index), ignore_index, mask - 1)


# ---------------------------------------------------------------------------------------
# Metrics (numpy).
# ---------------------------------------------------------------------------------------

def intersect_and_union(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int) -> np.ndarray:
  """[3, num_classes] pixel counts (intersection, union, label area) of one image, pixels
  labelled `ignore_index` left out (mmseg's `intersect_and_union`)."""
  keep = label != ignore_index
  p, t = pred[keep].astype(np.int64), label[keep].astype(np.int64)
  inter = np.bincount(t[p == t], minlength=num_classes)[:num_classes]
  area_pred = np.bincount(p, minlength=num_classes)[:num_classes]
  area_label = np.bincount(t, minlength=num_classes)[:num_classes]
  return np.stack([inter, area_pred + area_label - inter, area_label])


def segmentation_scores(totals: np.ndarray) -> dict[str, float]:
  """mIoU (the mean IoU over classes with a union, as mmseg's nanmean) and pixel accuracy of
  `intersect_and_union` counts summed over a set."""
  inter, union, area_label = totals
  if not area_label.sum():
    raise UsageError("the validation masks have no labelled pixel (all ignore_index, or 0 with reduce_zero_label)")
  iou = inter[union > 0] / union[union > 0]
  return {"seg_miou": float(iou.mean()), "seg_pixel_acc": float(inter.sum() / area_label.sum())}


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


# ---------------------------------------------------------------------------------------
# Heads and losses (jax).
# ---------------------------------------------------------------------------------------

def resize(x, size: tuple[int, int]):
  """[B, h, w, C] resized bilinearly to `size` as torch's interpolate(align_corners=False)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear", antialias=False)


def probe_inputs(out: dict, picks: tuple[int, ...] | None, cls_token: bool):
  """[B, h, w, C] head input: the patch tokens of the last block (picks None) or of the
  intermediate blocks `picks`, each with its CLS token (the global embedding) concatenated to
  every patch token when `cls_token`; all resized to the first's grid and concatenated (mmseg's
  "resize_concat")."""
  layers = [out] if picks is None else [out["intermediate"][i] for i in picks]
  maps = []
  for layer in layers:
    x, cls = layer["patch"], layer["embedding"]
    if cls_token:
      x = jnp.concatenate([x, jnp.broadcast_to(cls[:, None, None], x.shape[:3] + cls.shape[-1:])], -1)
    maps.append(resize(x, maps[0].shape[1:3]) if maps else x)
  return jnp.concatenate(maps, -1)


def batch_norm(x, bn: dict, stats: dict, train: bool):
  """torch BatchNorm2d on [B, h, w, C]: batch statistics (and running ones updated with
  momentum 0.1, the unbiased variance) in training, the running ones at test."""
  if train:
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    n = x.size // x.shape[-1]
    stats = {"mean": (1 - BN_MOMENTUM) * stats["mean"] + BN_MOMENTUM * mean,
             "var": (1 - BN_MOMENTUM) * stats["var"] + BN_MOMENTUM * var * n / max(n - 1, 1)}
  else:
    mean, var = stats["mean"], stats["var"]
  return (x - mean) * jax.lax.rsqrt(var + BN_EPS) * bn["scale"] + bn["bias"], stats


def cross_entropy(logits, labels, ignore_index: int):
  """Softmax cross entropy summed over the pixels not labelled `ignore_index`, divided by all
  pixels (mmseg's CrossEntropyLoss, avg_non_ignore=False: an ignored pixel counts 0)."""
  valid = labels != ignore_index
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], -1)[..., 0]
  return jnp.sum(nll * valid) / valid.size


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


def lr_schedule(base: float, steps: int, warmup_steps: int, warmup_ratio: float, decay: str,
                min_ratio: float = 0.0):
  """mmcv's iteration schedules: "poly" (power 1) or "cosine" from `base` to `min_ratio` x base
  over `steps`, times the linear warmup 1 - (1 - step / warmup_steps)(1 - warmup_ratio)."""
  def schedule(step):
    t = jnp.minimum(step / steps, 1.0)
    shape = 1 - t if decay == "poly" else 0.5 * (1 + jnp.cos(jnp.pi * t))
    warm = 1 - (1 - step / max(warmup_steps, 1)) * (1 - warmup_ratio)
    return base * (min_ratio + (1 - min_ratio) * shape) * jnp.where(step < warmup_steps, warm, 1.0)
  return schedule


# ---------------------------------------------------------------------------------------
# Views.
# ---------------------------------------------------------------------------------------

def crop_size(size, stride: int) -> tuple[int, int]:
  """(h, w) of a config crop size (int or pair) rounded to multiples of the patch size."""
  h, w = (size, size) if isinstance(size, int) else size
  return tuple(max(stride, round(s / stride) * stride) for s in (h, w))


def random_crop(rng: np.random.Generator, image: np.ndarray, target: np.ndarray, size: tuple[int, int],
                fill, flip: bool) -> tuple[np.ndarray, np.ndarray]:
  """A random `size` crop of image and target (padded at the bottom / right with the mean color
  and `fill` where smaller), flipped horizontally with probability 0.5 when `flip`."""
  ch, cw = size
  h, w = target.shape
  if h < ch or w < cw:
    pad = ((0, max(ch - h, 0)), (0, max(cw - w, 0)))
    image = np.concatenate([np.pad(image[..., c], pad, constant_values=PAD_COLOR[c])[..., None]
                            for c in range(3)], -1)
    target = np.pad(target, pad, constant_values=fill)
    h, w = target.shape
  y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
  image, target = image[y:y + ch, x:x + cw], target[y:y + ch, x:x + cw]
  if flip and rng.random() < 0.5:
    image, target = image[:, ::-1], target[:, ::-1]
  return np.ascontiguousarray(image), np.ascontiguousarray(target)


def resize_short(image: np.ndarray, short: float, resample=Image.BILINEAR) -> np.ndarray:
  """`image` (uint8 RGB or int32 labels) resized, aspect kept, to shorter side `short`."""
  h, w = image.shape[:2]
  scale = short / min(h, w)
  size = (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5)))
  return np.asarray(Image.fromarray(image).resize(size, resample))


def slide_windows(h: int, w: int, crop: int, stride: int) -> tuple[tuple[int, int], ...]:
  """Top-left corners of mmseg's sliding windows (`slide_inference`) over an h x w image (h, w
  >= crop)."""
  rows = max(h - crop + stride - 1, 0) // stride + 1
  cols = max(w - crop + stride - 1, 0) // stride + 1
  return tuple((max(min(r * stride + crop, h) - crop, 0), max(min(c * stride + crop, w) - crop, 0))
               for r in range(rows) for c in range(cols))


def merge_windows(logits, corners: tuple[tuple[int, int], ...], view_size: tuple[int, int],
                  size: tuple[int, int]):
  """Class ids [size] of window logits [n, crop, crop, K] at `corners` of a view_size image:
  averaged where the windows overlap, resized bilinearly to `size`, argmax'ed (the rest of
  mmseg's `slide_inference`). Cheap to compile, once per view and label size."""
  crop = logits.shape[1]
  total, count = jnp.zeros((*view_size, logits.shape[-1])), np.zeros((*view_size, 1), np.float32)
  for (y, x), window in zip(corners, logits):
    total = total.at[y:y + crop, x:x + crop].add(window)
    count[y:y + crop, x:x + crop] += 1
  return jnp.argmax(resize((total / count)[None], size)[0], -1)


# ---------------------------------------------------------------------------------------
# The probes.
# ---------------------------------------------------------------------------------------

def backbone_blocks(module) -> int:
  return module.num_layers - 1


def block_picks(n: int, total: int, spaced: bool) -> tuple[int, tuple[int, ...] | None]:
  """(layers to ask the backbone for, picks among them) for `n` blocks of `total`: the last n,
  or (`spaced`) n evenly spaced ones ending with the last (DINOv2 depth "lin. 4": 3, 6, 9, 12
  of 12, 10, 20, 30, 40 of 40; of 24 the official 5, 12, 18, 24). n = 1: the backbone's own
  output (0, None)."""
  if n == 1:
    return 0, None
  blocks = (OFFICIAL_SPACED_BLOCKS.get((n, total)) or [total * k // n for k in range(1, n + 1)] if spaced
            else list(range(total - n + 1, total + 1)))
  layers = total - blocks[0] + 1
  return layers, tuple(b - (total - layers) - 1 for b in blocks)


class DenseProbe:
  """What both probes share: the split pairs, the frozen backbone as the head's input, the
  AdamW training loop on augmented crops (a backbone forward on every batch of the mesh), the
  progress bars. Subclasses give the target reader, the training view, the head and the loss."""
  needs_labels = False
  shards_batches = True  # evals.<name>.batch_size is split over the mesh's devices (`batches`)
  splits = SEG_SPLITS
  folder, suffixes = "annotations", MASK_SUFFIXES
  name = ""
  blocks_key = "n_last_blocks"  # the last n blocks; "n_blocks": n evenly spaced ones
  final_norm = True  # the blocks' outputs through the final norm (get_intermediate_layers(norm=...))

  def __init__(self, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, mesh):
    self.ecfg = ecfg
    self.root = pathlib.Path(ecfg.path)
    what = f"{self.name} data {ecfg.path!r}"
    self.train_pairs, self.test_pairs = (paired_files(self.root, split, self.folder, self.suffixes, what)
                                         for split in self.splits)
    self.features = common.DenseFeatures(cfg.model, mesh)
    self.crop = crop_size(ecfg.crop_size, self.features.stride)
    self.layers, self.picks = block_picks(ecfg[self.blocks_key], backbone_blocks(self.features.module),
                                          spaced=self.blocks_key == "n_blocks")
    if not self.final_norm and self.picks is None:  # the last block before the norm, not the output
      self.layers, self.picks = 1, (0,)
    self.seed = cfg.seed + ecfg.seed
    self.progress = cfg.get("progress_bar", True)
    self.workers = max(1, cfg.data.get("workers", 8))
    self.batch_sharding, self.replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    schedule = lr_schedule(ecfg.learning_rate, ecfg.steps, ecfg.warmup_steps, ecfg.warmup_ratio, ecfg.schedule,
                           ecfg.min_lr_ratio)
    self.tx = optax.chain(optax.clip_by_global_norm(ecfg.grad_clip) if ecfg.grad_clip else optax.identity(),
                          optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=ecfg.weight_decay))
    self.train_step = jax.jit(self._train_step, donate_argnums=(0,),
                              out_shardings=(self.replicated, self.replicated))

  def inputs(self, params, images):
    """The frozen backbone's head input [B, h, w, C] of uint8 images [B, H, W, 3]."""
    out = self.features.module.apply({"params": params}, augment.normalize(images), layers=self.layers,
                                     final_norm=self.final_norm)
    return jax.lax.stop_gradient(probe_inputs(out, self.picks, self.ecfg.cls_token))

  def _train_step(self, state, params, images, targets, step):
    feats = self.inputs(params, sharding.constrain(images, self.batch_sharding))
    (loss, stats), grads = jax.value_and_grad(self.loss, has_aux=True)(state["head"], state["stats"], feats,
                                                                       targets, step)
    updates, opt = self.tx.update(grads, state["opt"], state["head"])
    return {"head": optax.apply_updates(state["head"], updates), "stats": stats, "opt": opt}, loss

  def init_state(self, params) -> dict:
    """A fresh head (`init_head` on the input width these params give) and its optimizer."""
    x = jax.ShapeDtypeStruct((1, *self.crop, 3), jnp.uint8)
    dim = jax.eval_shape(self.inputs, params, x).shape[-1]
    head, stats = self.init_head(jax.random.PRNGKey(self.seed), dim)
    return jax.device_put({"head": head, "stats": stats, "opt": self.tx.init(head)}, self.replicated)

  def training_view(self, index: int, step: int, position: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, step, position])
    image, target = read_pair(*self.train_pairs[index], self.read_target)
    return self.augment(rng, image, target)

  def batches(self, steps: int):
    """Global (images, targets) of each training step; each process reads its slice, a thread
    pool the next step's while the devices work."""
    b = self.ecfg.batch_size
    local = b // jax.process_count()
    start = jax.process_index() * local
    to_global = lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x)

    def read(step):
      index = data.batch_indices(len(self.train_pairs), b, step, self.seed)
      views = list(pool.map(self.training_view, index[start:start + local], [step] * local,
                            range(start, start + local)))
      return np.stack([v[0] for v in views]), np.stack([v[1] for v in views])

    with concurrent.futures.ThreadPoolExecutor(self.workers) as pool, \
         concurrent.futures.ThreadPoolExecutor(1) as ahead:
      future = ahead.submit(read, 0)
      for step in range(steps):
        images, targets = future.result()
        if step + 1 < steps:
          future = ahead.submit(read, step + 1)
        yield to_global(images), to_global(targets)

  def train(self, params) -> tuple[dict, np.ndarray]:
    """The head after `steps` steps, and the loss of every step."""
    state, losses = self.init_state(params), []
    steps = self.ecfg.steps
    bar = common.progress(self.batches(steps), f"{self.name} probe", total=steps, enabled=self.progress)
    for step, (images, targets) in enumerate(bar):
      state, loss = self.train_step(state, params, images, targets, np.int32(step))
      losses.append(loss)
      if step % 50 == 0 or step == steps - 1:
        bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    return state, np.asarray(jax.device_get(losses))

  def run(self, params) -> dict[str, float]:
    if params is None:  # raw pixels: no patch tokens to probe
      return {}
    state, _ = self.train(params)
    return self.score(state, params)


class SegmentationEvaluator(DenseProbe):
  """DINOv2's linear semantic segmentation probe (module docstring): `seg_miou` and
  `seg_pixel_acc` on the validation split of an ADE20K-layout folder."""
  name = "segmentation"

  def __init__(self, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, mesh):
    self.ignore = ecfg.ignore_index
    super().__init__(ecfg, cfg, mesh)
    self.num_classes = ecfg.num_classes or self.count_classes()
    self.window_logits = jax.jit(self._window_logits, out_shardings=self.replicated)
    self.merge = jax.jit(merge_windows, static_argnums=(1, 2, 3))

  def class_ids(self, path) -> np.ndarray:
    """The class ids of a mask file (reduced with `reduce_zero_label`)."""
    mask = read_mask(path)
    return reduce_zero_label(mask, self.ignore) if self.ecfg.reduce_zero_label else mask

  def read_target(self, path) -> np.ndarray:
    """`class_ids`; UsageError for an id past num_classes."""
    mask = self.class_ids(path)
    bad = (mask != self.ignore) & ((mask < 0) | (mask >= self.num_classes))
    if bad.any():
      raise UsageError(f"mask {str(path)!r} has class id {int(mask[bad].max())} (after reduce_zero_label="
                       f"{self.ecfg.reduce_zero_label}), not below num_classes {self.num_classes}")
    return mask

  def count_classes(self) -> int:
    """num_classes 0: one more than the largest class id of the training masks."""
    top = max(int(np.max(m, initial=-1, where=m != self.ignore)) for m in
              (self.class_ids(p) for _, p in self.train_pairs))
    if top < 0:
      raise UsageError(f"{self.root}: the training masks have no labelled pixel")
    return top + 1

  def augment(self, rng, image, mask):
    """mmseg's training view: shorter side crop x U(ratio_range), a random crop, flip."""
    short = self.crop[0] * rng.uniform(*self.ecfg.ratio_range)
    image, mask = resize_short(image, short), resize_short(mask, short, Image.NEAREST)
    return random_crop(rng, image, mask, self.crop, self.ignore, flip=self.ecfg.flip)

  def init_head(self, key, dim: int):
    """mmseg's: the 1x1 convolution N(0, 0.01²) with zero bias, BatchNorm 1 and 0."""
    k = self.num_classes
    head = {"kernel": 0.01 * jax.random.normal(key, (dim, k)), "bias": jnp.zeros(k)}
    if self.ecfg.batch_norm:
      head["bn"] = {"scale": jnp.ones(dim), "bias": jnp.zeros(dim)}
    return head, {"mean": jnp.zeros(dim), "var": jnp.ones(dim)}

  def logits(self, head, stats, feats, train: bool):
    """Class logits [B, h, w, K] on the patch grid (BatchNorm, then the 1x1 convolution)."""
    if "bn" in head:
      feats, stats = batch_norm(feats, head["bn"], stats, train)
    return feats @ head["kernel"] + head["bias"], stats

  def loss(self, head, stats, feats, labels, step):
    del step
    logits, stats = self.logits(head, stats, feats, True)
    return cross_entropy(resize(logits, labels.shape[1:3]), labels, self.ignore), stats

  def _window_logits(self, state, params, windows):
    """Class logits [n, crop, crop, K] of sliding windows [n, crop, crop, 3], upsampled from
    the patch grid to the window. One compile per window count."""
    logits, _ = self.logits(state["head"], state["stats"], self.inputs(params, windows), False)
    return resize(logits, windows.shape[1:3])

  def score(self, state, params) -> dict[str, float]:
    totals = np.zeros((3, self.num_classes), np.int64)
    for image_path, mask_path in common.progress(self.test_pairs, "segmentation test", enabled=self.progress):
      image, mask = read_pair(image_path, mask_path, self.read_target)
      view = resize_short(image, self.crop[0])
      corners = slide_windows(*view.shape[:2], self.crop[0], self.ecfg.slide_stride)
      windows = np.stack([view[y:y + self.crop[0], x:x + self.crop[0]] for y, x in corners])
      pred = self.merge(self.window_logits(state, params, windows), corners, view.shape[:2], mask.shape)
      totals += intersect_and_union(np.asarray(pred), mask, self.num_classes, self.ignore)
    return segmentation_scores(totals)

  @staticmethod
  def describe(ecfg: ml_collections.ConfigDict) -> str:
    inputs = f"last {ecfg.n_last_blocks} blocks'" if ecfg.n_last_blocks > 1 else "last block's"
    return (f"mIoU on validation (DINOv2 linear: {'BN + ' if ecfg.batch_norm else ''}1x1 conv on the {inputs} "
            f"patch tokens, {ecfg.steps} AdamW steps of {ecfg.batch_size} crops of {ecfg.crop_size}, sliding window)")

  @staticmethod
  def check(name: str, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, enabled: bool) -> None:
    for key in ("num_classes", "ignore_index"):  # ADE20K: 150, 255
      common.check_positive_int(name, ecfg, key, zero=True)
    for key in ("n_last_blocks", "slide_stride", "crop_size"):  # DINOv2: 1 (4: "+ms"), 341, 512
      common.check_positive_int(name, ecfg, key)
    for key in ("reduce_zero_label", "batch_norm", "cls_token", "flip"):
      common.check_bool(name, ecfg, key)
    if ecfg.slide_stride > ecfg.crop_size:
      raise UsageError(f"evals.{name}.slide_stride {ecfg.slide_stride} is larger than crop_size {ecfg.crop_size} "
                       f"(windows would skip pixels)")
    low, high = check_pair(name, ecfg, "ratio_range")
    if not 0 < low <= high:
      raise UsageError(f"evals.{name}.ratio_range must be (low, high) with 0 < low <= high (DINOv2: (0.5, 2.0)), "
                       f"not {tuple(ecfg.ratio_range)!r}")
    check_training(name, ecfg, SegmentationEvaluator, cfg, enabled)


class DepthEvaluator(DenseProbe):
  """DINOv2's linear depth probe (module docstring): `depth_rmse` (metres), `depth_abs_rel`
  and `depth_delta1` on the test split of an NYU-like folder."""
  name = "depth"
  splits = DEPTH_SPLITS
  folder, suffixes = "depth", DEPTH_SUFFIXES
  blocks_key = "n_blocks"
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
    return random_crop(rng, image, depth, self.crop, 0.0, flip=self.ecfg.flip)

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
    logits = resize(logits, tuple(s * e.upsample for s in logits.shape[1:3]))
    return depth_from_logits(logits, e.head, e.min_depth, e.max_depth)

  def loss(self, head, stats, feats, depth, step):
    pred = resize(self.depth(head, feats)[..., None], depth.shape[1:3])[..., 0]
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
    pred = resize(pred[..., None], size)[..., 0]
    return (pred[0] + pred[1, :, ::-1]) / 2 if e.flip_test else pred[0]

  def score(self, state, params) -> dict[str, float]:
    e, errors = self.ecfg, []
    for image_path, depth_path in common.progress(self.test_pairs, "depth test", enabled=self.progress):
      image, gt = read_pair(image_path, depth_path, self.read_target)
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
      common.check_positive_int(name, ecfg, key)
    if ecfg.bins < 2:
      raise UsageError(f"evals.{name}.bins must be an int >= 2 (DINOv2: 256), not {ecfg.bins!r}")
    common.check_positive_int(name, ecfg, "sigloss_warmup_steps", zero=True)
    common.check_positive_int(name, ecfg, "loss_group")
    if isinstance(ecfg.get("batch_size"), int) and ecfg.batch_size % ecfg.loss_group:
      raise UsageError(f"evals.{name}.loss_group {ecfg.loss_group} must divide batch_size {ecfg.batch_size} "
                       "(SigLoss is taken per group of images: the official per-GPU batch, 2)")
    for key in ("cls_token", "flip", "flip_test", "eigen_crop"):
      common.check_bool(name, ecfg, key)
    for key in ("min_depth", "max_depth", "depth_scale"):
      common.check_positive_number(name, ecfg, key)
    common.check_non_negative_number(name, ecfg, "gradient_loss_weight")
    if not ecfg.min_depth < ecfg.max_depth < math.inf:
      raise UsageError(f"evals.{name}.min_depth {ecfg.min_depth} must be below max_depth {ecfg.max_depth} "
                       f"(finite; NYU: 1e-3 and 10 m)")
    size = ecfg.get("crop_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
      raise UsageError(f"evals.{name}.crop_size must be (height, width), positive ints (DINOv2 NYU: (416, 544)), "
                       f"not {size!r}")
    check_training(name, ecfg, DepthEvaluator, cfg, enabled)


def check_pair(name: str, ecfg, key: str) -> tuple[float, float]:
  """ecfg[key] as a pair of numbers; UsageError otherwise."""
  value = ecfg.get(key)
  if not isinstance(value, (list, tuple)) or len(value) != 2 or any(
      isinstance(x, bool) or not isinstance(x, (int, float)) for x in value):
    raise UsageError(f"evals.{name}.{key} must be a pair of numbers, not {value!r}")
  return tuple(value)


def check_training(name: str, ecfg, probe: type, cfg: ml_collections.ConfigDict, enabled: bool) -> None:
  """The keys both probes have; with `enabled`, the blocks against the backbone and the data
  folder's layout (`paired_files` of both splits, errors naming evals.<name>.path)."""
  for key in ("steps", "batch_size"):
    common.check_positive_int(name, ecfg, key)
  for key in ("warmup_steps", "seed"):
    common.check_positive_int(name, ecfg, key, zero=True)
  common.check_positive_number(name, ecfg, "learning_rate")
  for key in ("weight_decay", "warmup_ratio", "min_lr_ratio", "grad_clip"):  # grad_clip 0: none
    common.check_non_negative_number(name, ecfg, key)
  if ecfg.get("schedule") not in ("poly", "cosine"):
    raise UsageError(f"evals.{name}.schedule must be 'poly' (DINOv2 segmentation) or 'cosine' (DINOv2 depth), "
                     f"not {ecfg.get('schedule')!r}")
  common.check_string(name, ecfg, "path")
  if not enabled:
    return
  if not ecfg.path or not pathlib.Path(ecfg.path).is_dir():
    raise UsageError(f"evals.{name}.path must be the benchmark folder (layout: images/{{{','.join(probe.splits)}}}/ "
                     f"and {probe.folder}/{{{','.join(probe.splits)}}}/), not {ecfg.path!r}")
  for split in probe.splits:
    paired_files(pathlib.Path(ecfg.path), split, probe.folder, probe.suffixes, f"evals.{name}.path")
  key = probe.blocks_key
  if ecfg[key] > (total := backbone_blocks(common.DenseFeatures(cfg.model).module)):
    raise UsageError(f"evals.{name}.{key} {ecfg[key]} asks for more blocks than the backbone's {total}")


# ---------------------------------------------------------------------------------------
# Synthetic benchmark from real images with known masks and depths.
# ---------------------------------------------------------------------------------------

# Fashion-MNIST labels in 4 groups: tops (T-shirt, pullover, coat, shirt), trousers and dresses,
# footwear (sandal, sneaker, ankle boot), bags. Mask ids: 0 "other" (an item's soft rim), 1
# background, 2 + group; with reduce_zero_label: 0 background, 1..4 the groups.
SYNTHETIC_GROUPS = ((0, 2, 4, 6), (1, 3), (5, 7, 9), (8,))
SYNTHETIC_NUM_CLASSES = 1 + len(SYNTHETIC_GROUPS)
GROUP_COLORS = np.array([[220, 60, 50], [60, 180, 75], [50, 90, 220], [240, 200, 40]], np.float32)
OPACITY = 3.0  # an item covers its background with opacity min(1, 3 x its Fashion-MNIST intensity)
RIM, CORE = 0.15, 0.5  # opacity above RIM: "other" (no depth), above CORE: the item's class (its depth)
TERRAIN_DEPTH = (1.0, 8.0)  # metres: the highest ground nearest the camera above it
ITEM_DEPTH = (0.5, 0.9)


def _terrains() -> list[tuple[np.ndarray, np.ndarray]]:
  """(uint8 shaded-relief rendering, depth in metres) of matplotlib's two real elevation maps."""
  from matplotlib import colormaps, colors  # pylint: disable=g-import-not-at-top
  with np.load(common.sample_data("jacksboro_fault_dem.npz")) as d:
    dem = d["elevation"].astype(np.float32)
  with np.load(common.sample_data("topobathy.npz")) as d:
    topo = np.asarray(Image.fromarray(d["topo"].astype(np.float32)).resize((360, 273), Image.BILINEAR))
  out = []
  for elevation in (dem, topo):
    e = (elevation - elevation.min()) / (elevation.max() - elevation.min())
    shaded = colors.LightSource(azdeg=315, altdeg=45).shade(e, cmap=colormaps["gist_earth"], blend_mode="soft",
                                                            vert_exag=20)
    near, far = TERRAIN_DEPTH
    out.append(((shaded[..., :3] * 255).round().astype(np.uint8), (far - (far - near) * e).astype(np.float32)))
  return out


def _photos() -> list[np.ndarray]:
  """Real photographs and renderings as backgrounds (uint8 RGB)."""
  return common.sample_photos() + [t[0] for t in _terrains()]


def _window(rng, arrays: list[np.ndarray], size: int, resamples) -> list[np.ndarray]:
  """The same random square window (side from `size` to the shorter side) of each array,
  resized to `size`."""
  h, w = arrays[0].shape[:2]
  side = int(rng.integers(min(size, h, w), min(h, w) + 1))
  y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
  return [np.asarray(Image.fromarray(a[y:y + side, x:x + side]).resize((size, size), r))
          for a, r in zip(arrays, resamples)]


def _item(rng, items, size: int, scale: tuple[float, float]):
  """(intensity [s, s] in [0, 1], opacity, label, top-left) of a random Fashion-MNIST item of
  side s."""
  k = int(rng.integers(len(items)))
  s = int(rng.integers(int(size * scale[0]), int(size * scale[1]) + 1))
  intensity = np.asarray(Image.fromarray(items.originals[k]).resize((s, s), Image.BILINEAR), np.float32) / 255
  corner = (int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1)))
  return intensity[..., None], np.minimum(1.0, OPACITY * intensity), int(items.labels[k]), corner


def segmentation_scene(rng, photos, items, size: int, objects: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """A background window of a real image with `objects` Fashion-MNIST items pasted over it, each
  tinted with its group's color; (uint8 image, uint8 mask ids as SYNTHETIC_GROUPS says)."""
  group_of = {label: g for g, labels in enumerate(SYNTHETIC_GROUPS) for label in labels}
  image = _window(rng, [photos[int(rng.integers(len(photos)))]], size, [Image.BILINEAR])[0].astype(np.float32)
  mask = np.ones((size, size), np.uint8)
  for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
    intensity, alpha, label, (y, x) = _item(rng, items, size, (0.375, 0.625))
    s, group = alpha.shape[0], group_of[label]
    color = np.clip(GROUP_COLORS[group] + rng.uniform(-20, 20, 3), 0, 255) * (0.55 + 0.45 * intensity)
    region = image[y:y + s, x:x + s]
    region[:] = alpha[..., None] * color + (1 - alpha[..., None]) * region
    ids = mask[y:y + s, x:x + s]
    ids[alpha > RIM] = 0
    ids[alpha > CORE] = 2 + group
  return image.round().astype(np.uint8), mask


def depth_scene(rng, terrains, items, size: int, objects: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """A window of a real terrain seen from above, its shaded relief as the image and its height
  as depth (TERRAIN_DEPTH), with Fashion-MNIST items floating at known depths (ITEM_DEPTH; their
  soft rims and a random sensor hole have no depth, 0); (uint8 image, float32 metres)."""
  rendering, depth = terrains[int(rng.integers(len(terrains)))]
  image, depth = _window(rng, [rendering, depth], size, [Image.BILINEAR, Image.BILINEAR])
  image, depth = image.astype(np.float32), depth.copy()
  for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
    intensity, alpha, _, (y, x) = _item(rng, items, size, (0.25, 0.5))
    s = alpha.shape[0]
    region = image[y:y + s, x:x + s]
    region[:] = alpha[..., None] * 255 * (0.5 + 0.5 * intensity) + (1 - alpha[..., None]) * region
    d = depth[y:y + s, x:x + s]
    d[alpha > RIM] = 0.0
    d[alpha > CORE] = rng.uniform(*ITEM_DEPTH)
  if rng.random() < 0.5:
    h, w = rng.integers(2, size // 4 + 1, 2)
    y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    depth[y:y + h, x:x + w] = 0.0
  return image.round().astype(np.uint8), depth


def write_synthetic(out: pathlib.Path, seed: int = 0, size: int = 64, train: int = 24, test: int = 8,
                    objects: tuple[int, int] = (1, 3)) -> None:
  """Writes both benchmarks' layouts under `out` from real images with known answers:
  segmentation (images/{training,validation}/*.jpg, annotations/.../*.png; `segmentation_scene`,
  SYNTHETIC_NUM_CLASSES classes with reduce_zero_label) and depth (images/{train,test}/*.png,
  depth/.../*.png in millimetres; `depth_scene`); `train` / `test` scenes of size² px each, the
  test scenes with Fashion-MNIST's test items."""
  out = pathlib.Path(out)
  rng = np.random.default_rng(seed)
  photos, terrains = _photos(), _terrains()
  for (seg_split, depth_split, items_split, count) in ((*SEG_SPLITS[:1], DEPTH_SPLITS[0], "train", train),
                                                       (SEG_SPLITS[1], DEPTH_SPLITS[1], "test", test)):
    items = data.fashion_mnist_demo(items_split, 28)
    for folder in (f"images/{seg_split}", f"annotations/{seg_split}", f"images/{depth_split}",
                   f"depth/{depth_split}"):
      (out / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
      image, mask = segmentation_scene(rng, photos, items, size, objects)
      Image.fromarray(image).save(out / f"images/{seg_split}/scene_{i:04d}.jpg", quality=95)
      Image.fromarray(mask).save(out / f"annotations/{seg_split}/scene_{i:04d}.png")
      image, depth = depth_scene(rng, terrains, items, size, (0, 2))
      Image.fromarray(image).save(out / f"images/{depth_split}/scene_{i:04d}.png")
      Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(out / f"depth/{depth_split}/scene_{i:04d}.png")
