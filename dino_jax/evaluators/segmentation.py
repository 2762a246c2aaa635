"""The segmentation evaluator: DINOv2's linear semantic segmentation probe (Oquab et al. 2023,
Sec. 7.4; `dinov2/eval/segmentation` and its mmseg `*_ade20k_linear_config.py`). The layout,
the training loop and the simplifications are `dense`'s.

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
"""
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


def read_mask(path: pathlib.Path) -> np.ndarray:
  """int32 [H, W] class ids of a one-channel (or palette) PNG; UsageError naming it otherwise."""
  try:
    with Image.open(path) as image:
      mode, mask = image.mode, np.asarray(image)
  except dense.READ_ERRORS as e:
    raise UsageError(f"cannot read mask {str(path)!r} ({type(e).__name__}: {e})") from None
  if mask.ndim != 2 or not np.issubdtype(mask.dtype, np.integer):
    raise UsageError(f"mask {str(path)!r} is not one channel of class ids (PIL mode {mode})")
  return mask.astype(np.int32)


def reduce_zero_label(mask: np.ndarray, ignore_index: int) -> np.ndarray:
  """ADE20K's labels as mmseg's `reduce_zero_label`: 0 ("other") ignored, k -> k - 1."""
  return np.where((mask == 0) | (mask == ignore_index), ignore_index, mask - 1)


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


def cross_entropy(logits, labels, ignore_index: int):
  """Softmax cross entropy summed over the pixels not labelled `ignore_index`, divided by all
  pixels (mmseg's CrossEntropyLoss, avg_non_ignore=False: an ignored pixel counts 0)."""
  valid = labels != ignore_index
  logp = jax.nn.log_softmax(logits)
  nll = -jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], -1)[..., 0]
  return jnp.sum(nll * valid) / valid.size


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
  return jnp.argmax(dense.resize((total / count)[None], size)[0], -1)


class SegmentationEvaluator(dense.DenseProbe):
  """DINOv2's linear semantic segmentation probe (module docstring): `seg_miou` and
  `seg_pixel_acc` on the validation split of an ADE20K-layout folder."""
  name = "segmentation"
  splits = dense.SEG_SPLITS
  folder, suffixes = "annotations", dense.MASK_SUFFIXES
  # DINOv2 Sec. 7.4 linear segmentation (ade20k_linear_config): BN + 1x1 conv on the last block's patch tokens
  # (n_last_blocks=4: "+ms" input), AdamW lr 1e-3 wd 1e-4, 1500 warmup + poly, 40k steps x 16 crops 512, slide 512/341.
  default_configs = {
      "segmentation": dict(type="segmentation", every_steps=-1, every_epochs=0.0, path="", num_classes=150,
                           reduce_zero_label=True, ignore_index=255, n_last_blocks=1, cls_token=False,
                           batch_norm=True, crop_size=512, ratio_range=(0.5, 2.0), flip=True, slide_stride=341,
                           steps=40000, batch_size=16, learning_rate=1e-3, weight_decay=1e-4, warmup_steps=1500,
                           warmup_ratio=1e-6, schedule="poly", min_lr_ratio=0.0, grad_clip=0.0, seed=0,
                           baselines=False),
  }

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
    image, mask = dense.resize_short(image, short), dense.resize_short(mask, short, Image.NEAREST)
    return dense.random_crop(rng, image, mask, self.crop, self.ignore, flip=self.ecfg.flip)

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
      feats, stats = dense.batch_norm(feats, head["bn"], stats, train)
    return feats @ head["kernel"] + head["bias"], stats

  def loss(self, head, stats, feats, labels, step):
    del step
    logits, stats = self.logits(head, stats, feats, True)
    return cross_entropy(dense.resize(logits, labels.shape[1:3]), labels, self.ignore), stats

  def _window_logits(self, state, params, windows):
    """Class logits [n, crop, crop, K] of sliding windows [n, crop, crop, 3], upsampled from
    the patch grid to the window. One compile per window count."""
    logits, _ = self.logits(state["head"], state["stats"], self.inputs(params, windows), False)
    return dense.resize(logits, windows.shape[1:3])

  def score(self, state, params) -> dict[str, float]:
    totals = np.zeros((3, self.num_classes), np.int64)
    for image_path, mask_path in common.progress(self.test_pairs, "segmentation test", enabled=self.progress):
      image, mask = dense.read_pair(image_path, mask_path, self.read_target)
      view = dense.resize_short(image, self.crop[0])
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
      validate.positive_int(ecfg, key, zero=True, prefix=f"evals.{name}.")
    for key in ("n_last_blocks", "slide_stride", "crop_size"):  # DINOv2: 1 (4: "+ms"), 341, 512
      validate.positive_int(ecfg, key, prefix=f"evals.{name}.")
    for key in ("reduce_zero_label", "batch_norm", "cls_token", "flip"):
      validate.boolean(ecfg, key, prefix=f"evals.{name}.")
    if ecfg.slide_stride > ecfg.crop_size:
      raise UsageError(f"evals.{name}.slide_stride {ecfg.slide_stride} is larger than crop_size {ecfg.crop_size} "
                       f"(windows would skip pixels)")
    low, high = validate.number_pair(ecfg, "ratio_range", prefix=f"evals.{name}.")
    if not 0 < low <= high:
      raise UsageError(f"evals.{name}.ratio_range must be (low, high) with 0 < low <= high (DINOv2: (0.5, 2.0)), "
                       f"not {tuple(ecfg.ratio_range)!r}")
    dense.check_training(name, ecfg, SegmentationEvaluator, cfg, enabled)
