"""Video object segmentation by label propagation (DINO, Caron et al. 2021, Sec. 4.2.3), scored
by the DAVIS-2017 semi-supervised J&F (Pont-Tuset et al. 2017).

The first frame's object masks travel through a video on the frozen backbone's patch features,
as DINO's eval_video_segmentation.py (after Jabri et al. 2020): each later frame's patches take
the soft labels of their top-k most similar patches (exp(cosine / T)) among the first frame and
the `n_last_frames` previous frames, within `size_mask_neighborhood` patches of their own
position; the patch-level soft masks are upsampled bilinear to the frame, each object's map
rescaled to [0, 1] and the argmax taken. J (region IoU) and F (boundary F-measure with a
tolerance of `bound_th` of the image diagonal) are measured as davis2017-evaluation does on
every frame but the first and the last, per object, and averaged over the objects of all
sequences: `davis_j_mean`, `davis_f_mean`, `davis_jf_mean` = their mean ("J&F-Mean").

Folder layout (DAVIS-2017's own, `path` = the DAVIS folder):

  JPEGImages/<resolution>/<sequence>/00000.jpg, 00001.jpg, ...   the frames
  Annotations/<resolution>/<sequence>/00000.png, 00001.png, ...  object ids (palette or
                                                                 grayscale PNG, 0 background,
                                                                 255 void counted as background)
  ImageSets/2017/<split>.txt                                     the sequences (one a line);
                                                                 without it, every sequence

Every frame has its annotation (the first frame's gives the objects, the others are scored).
"""
import collections
import dataclasses
import functools
import math
import os
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from dino_jax import data
from dino_jax import validate
from dino_jax.errors import UsageError
from dino_jax.evaluators import common

VOID = 255  # DAVIS's void label; the semi-supervised evaluation counts it as background
LONG_SIDE_MULTIPLE = 64  # read_frame rounds the longer side down to a multiple of 64


@dataclasses.dataclass(frozen=True)
class Sequence:
  """One video: its frame files and their annotation files, in order."""
  name: str
  frames: tuple[pathlib.Path, ...]
  annotations: tuple[pathlib.Path, ...]


def sequence_names(root: pathlib.Path, resolution: str, split: str, what: str) -> list[str]:
  """The sequences of ImageSets/2017/<split>.txt, or every folder of JPEGImages/<resolution>
  when there is no such list."""
  frames = root / "JPEGImages" / resolution
  listed = root / "ImageSets" / "2017" / f"{split}.txt"
  if listed.is_file():
    names = [line.strip() for line in listed.read_text().splitlines() if line.strip()]
  else:
    names = sorted(p.name for p in frames.iterdir() if p.is_dir())
  if not names:
    raise UsageError(f"{what}: no sequence in {str(listed if listed.is_file() else frames)!r}")
  return names


def list_sequences(path: str | os.PathLike, resolution: str, split: str, what: str) -> list[Sequence]:
  """The DAVIS folder at `path` as sequences whose every frame has its annotation (same
  name, .png); one UsageError naming `what` for a missing folder, a sequence without frames,
  a frame without its annotation or an annotation without its frame."""
  root = pathlib.Path(path)
  for sub in ("JPEGImages", "Annotations"):
    if not (root / sub / resolution).is_dir():
      raise UsageError(f"{what}: {str(path)!r} has no {sub}/{resolution}/ (a DAVIS-2017 folder)")
  sequences = []
  for name in sequence_names(root, resolution, split, what):
    frames = common.image_files(root / "JPEGImages" / resolution / name, f"{what}: sequence {name!r}")
    folder = root / "Annotations" / resolution / name
    annotations = {p.stem: p for p in (folder.glob("*.png") if folder.is_dir() else ())}
    missing = [f.name for f in frames if f.stem not in annotations]
    extra = sorted(set(annotations) - {f.stem for f in frames})
    if missing or extra:
      raise UsageError(f"{what}: sequence {name!r}: " + (f"frame {missing[0]} has no annotation in {str(folder)!r}"
                                                         if missing else f"annotation {extra[0]}.png has no frame"))
    if len(frames) < 3:
      raise UsageError(f"{what}: sequence {name!r} has {len(frames)} frames; DAVIS scores all but the first and "
                       "last, so it needs 3 or more")
    sequences.append(Sequence(name, tuple(frames), tuple(annotations[f.stem] for f in frames)))
  return sequences


def read_annotation(path: pathlib.Path) -> np.ndarray:
  """Object ids [H, W] (uint8) of a palette or grayscale PNG, void (255) as background 0."""
  try:
    with Image.open(path) as image:
      if image.mode not in ("P", "L"):
        raise UsageError(f"annotation {str(path)!r} is a {image.mode} image, not a palette or grayscale PNG of "
                         "object ids")
      ids = np.array(image, np.uint8)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise UsageError(f"cannot read annotation {str(path)!r} ({type(e).__name__}: {e})") from None
  ids[ids == VOID] = 0
  return ids


def frame_shape(height: int, width: int, scale_size: int, stride: int) -> tuple[int, int]:
  """The size DINO's read_frame gives a frame: the shorter side (the width when square) set
  to `scale_size`, the other scaled alike and rounded down to a multiple of 64; here both then
  rounded down to the patch size (a no-op for patches 8 and 16)."""
  if height > width:
    th, tw = scale_size * height / width // LONG_SIDE_MULTIPLE * LONG_SIDE_MULTIPLE, scale_size
  else:
    th, tw = scale_size, scale_size * width / height // LONG_SIDE_MULTIPLE * LONG_SIDE_MULTIPLE
  return int(th) // stride * stride, int(tw) // stride * stride


def neighbourhood(h: int, w: int, size: int) -> np.ndarray:
  """[h*w, h*w] bool: which source patches a target patch may take labels from, those at most
  `size` rows and columns away (DINO's restrict_neighborhood); everywhere when size is 0."""
  rows, cols = np.divmod(np.arange(h * w, dtype=np.int32), w)
  if size <= 0:
    return np.ones((h * w, h * w), bool)
  return (np.abs(rows[:, None] - rows[None]) <= size) & (np.abs(cols[:, None] - cols[None]) <= size)


@functools.partial(jax.jit, static_argnames=("topk",))
def propagate(target, sources, source_labels, valid, neighbours, topk: int, temperature: float):
  """Soft labels [T, C] of target patches `target` [T, D] from the context frames' patches
  `sources` [n, S, D] (all l2-normalized) and their soft labels `source_labels` [n, S, C]:
  affinities exp(cosine / temperature) to the `valid` [n] frames' sources among
  `neighbours` [T, S], all but each target's `topk` largest over the n frames set to 0, rows
  normalized to sum 1 (DINO's label_propagation). Each row's exponent has its largest allowed
  value subtracted first (the same weights, no overflow at small temperatures; a target's own
  position in the always valid frame 0 is allowed), and `topk` is clamped to the n * S
  sources (a `topk` above the allowed sources keeps them all)."""
  n, s, c = source_labels.shape
  allowed = (neighbours[:, None, :] & valid[None, :, None]).reshape(-1, n * s)
  logits = jnp.where(allowed, jnp.einsum("td,nsd->tns", target, sources).reshape(-1, n * s) / temperature, -jnp.inf)
  affinity = jnp.exp(logits - logits.max(axis=1, keepdims=True))
  kth = jax.lax.top_k(affinity, min(topk, n * s))[0][:, -1:]
  affinity = jnp.where(affinity >= kth, affinity, 0.0)
  affinity = affinity / affinity.sum(axis=1, keepdims=True)
  return affinity @ source_labels.reshape(n * s, c)


def patch_labels(ids: np.ndarray, grid: tuple[int, int], num_labels: int) -> np.ndarray:
  """One-hot [h*w, num_labels] of object ids [H, W] resized nearest to the patch grid (h, w)
  (DINO's read_seg)."""
  small = np.asarray(Image.fromarray(ids).resize(grid[::-1], Image.NEAREST))
  return np.eye(num_labels, dtype=np.float32)[small.reshape(-1)]


def segment(soft: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
  """Object ids [H, W] of patch-level soft labels [h, w, C]: upsampled `factor` times
  bilinear (`common.resize_bilinear`, as DINO's F.interpolate), each label's map with a
  positive maximum rescaled to [0, 1] (DINO's norm_mask; a constant positive map, where it
  divides 0 by 0, becomes 0), argmax, resized nearest to the frame's `shape`."""
  x = common.resize_bilinear(soft, (soft.shape[0] * factor, soft.shape[1] * factor))
  low, high = x.min(axis=(0, 1)), x.max(axis=(0, 1))
  rescaled = (high > 0) & (high > low)
  x = np.where(rescaled, (x - low) / np.where(rescaled, high - low, 1.0), np.where(high > 0, 0.0, x))
  ids = np.argmax(x, axis=-1).astype(np.uint8)
  return np.asarray(Image.fromarray(ids).resize(shape[::-1], Image.NEAREST))


# ---------------------------------------------------------------------------------------
# The DAVIS measures (davis2017-evaluation: db_eval_iou, db_eval_boundary).
# ---------------------------------------------------------------------------------------

def jaccard(gt: np.ndarray, pred: np.ndarray) -> float:
  """Region similarity J: |gt ∩ pred| / |gt ∪ pred| of two bool masks, 1 when both are empty."""
  union = np.logical_or(gt, pred).sum()
  return 1.0 if union == 0 else float(np.logical_and(gt, pred).sum() / union)


def boundaries(mask: np.ndarray) -> np.ndarray:
  """The boundary pixels [H, W] of a bool mask as DAVIS's seg2bmap: a pixel differing from its
  right, lower or lower-right neighbour (outside counted as background), the last row compared
  only to the right, the last column only downward, the corner never."""
  m = mask.astype(bool)
  right, down, diagonal = np.zeros_like(m), np.zeros_like(m), np.zeros_like(m)
  right[:, :-1], down[:-1], diagonal[:-1, :-1] = m[:, 1:], m[1:], m[1:, 1:]
  b = (m ^ right) | (m ^ down) | (m ^ diagonal)
  b[-1] = m[-1] ^ right[-1]
  b[:, -1] = m[:, -1] ^ down[:, -1]
  b[-1, -1] = False
  return b


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
  """Binary dilation of `mask` [H, W] by the disk x² + y² <= radius² (outside the image adds
  nothing): for each row offset dy, the mask dilated along rows by floor(√(radius² − dy²))
  (window sums of a cumulative sum), shifted by dy."""
  h, w = mask.shape
  counts = np.pad(np.cumsum(mask, axis=1, dtype=np.int32), ((0, 0), (1, 0)))
  cols = np.arange(w)

  @functools.cache
  def along_rows(half: int) -> np.ndarray:
    return counts[:, np.minimum(cols + half + 1, w)] - counts[:, np.maximum(cols - half, 0)] > 0

  out = np.zeros((h, w), bool)
  for dy in range(-radius, radius + 1):
    rows = along_rows(math.isqrt(radius * radius - dy * dy))
    if dy >= 0:
      out[:h - dy] |= rows[dy:]
    else:
      out[-dy:] |= rows[:h + dy]
  return out


def boundary_radius(shape: tuple[int, int], bound_th: float) -> int:
  """The boundary tolerance in pixels: `bound_th` of the image diagonal rounded up when below
  1, else `bound_th` pixels."""
  return int(bound_th) if bound_th >= 1 else math.ceil(bound_th * math.hypot(*shape))


def boundary_f(gt: np.ndarray, pred: np.ndarray, bound_th: float = 0.008) -> float:
  """Contour accuracy F of two bool masks: precision (the predicted boundary pixels within the
  tolerance of the true boundary) and recall (the converse) combined as 2PR / (P + R); 1 when
  neither has a boundary, 0 when only one has."""
  radius = boundary_radius(gt.shape, bound_th)
  gt_b, pred_b = boundaries(gt), boundaries(pred)
  n_gt, n_pred = gt_b.sum(), pred_b.sum()
  if n_gt == 0 or n_pred == 0:
    return float(n_gt == n_pred)
  precision = (pred_b & dilate(gt_b, radius)).sum() / n_pred
  recall = (gt_b & dilate(pred_b, radius)).sum() / n_gt
  return 0.0 if precision + recall == 0 else float(2 * precision * recall / (precision + recall))


def davis_means(j: list[float], f: list[float]) -> dict[str, float]:
  """The DAVIS tool's J-Mean, F-Mean and J&F-Mean from each object's mean J and F over its
  scored frames (one entry per object of every sequence)."""
  j_mean, f_mean = float(np.mean(j)), float(np.mean(f))
  return {"davis_j_mean": j_mean, "davis_f_mean": f_mean, "davis_jf_mean": (j_mean + f_mean) / 2}


# ---------------------------------------------------------------------------------------
# Propagating and scoring a sequence.
# ---------------------------------------------------------------------------------------

def score_sequence(seq: Sequence, frame_features: Callable, stride: int, ecfg: ml_collections.ConfigDict,
                   bar=None) -> tuple[list[float], list[float]]:
  """Each object's mean J and F over frames 1 .. n-2 of `seq`, its first frame's annotation
  propagated on `frame_features(path) -> (l2-normalized patch features [h, w, D] of the resized
  frame, the frame's (H, W))`, patches of `stride` pixels (the last frame is not scored, so
  not segmented)."""
  first = read_annotation(seq.annotations[0])
  features, shape = frame_features(seq.frames[0])
  check_shape(seq, 0, first, shape)
  num_objects = int(first.max())
  if num_objects == 0:
    raise UsageError(f"sequence {seq.name!r}: the first frame's annotation {seq.annotations[0].name} has no object")
  h, w, dim = features.shape
  context = ecfg.n_last_frames + 1  # the first frame and the last n_last_frames, padded to a fixed shape
  sources = np.zeros((context, h * w, dim), np.float32)
  labels = np.zeros((context, h * w, num_objects + 1), np.float32)
  sources[0], labels[0] = features.reshape(h * w, dim), patch_labels(first, (h, w), num_objects + 1)
  queue = collections.deque(maxlen=ecfg.n_last_frames)
  neighbours = jnp.asarray(neighbourhood(h, w, ecfg.size_mask_neighborhood))
  j, f = np.zeros((len(seq.frames) - 2, num_objects)), np.zeros((len(seq.frames) - 2, num_objects))
  for i in range(1, len(seq.frames) - 1):
    features, shape = frame_features(seq.frames[i])
    if features.shape != (h, w, dim):
      raise UsageError(f"sequence {seq.name!r}: frame {seq.frames[i].name} has features {features.shape}, the first "
                       f"frame {(h, w, dim)} (frames of one sequence must have one size)")
    for slot, (f_prev, l_prev) in enumerate(queue, start=1):
      sources[slot], labels[slot] = f_prev, l_prev
    valid = np.arange(context) <= len(queue)
    soft = np.asarray(propagate(features.reshape(h * w, dim), sources, labels, valid, neighbours,
                                topk=ecfg.topk, temperature=ecfg.temperature))
    queue.append((features.reshape(h * w, dim), soft))
    pred = segment(soft.reshape(h, w, -1), stride, shape)
    gt = read_annotation(seq.annotations[i])
    check_shape(seq, i, gt, shape)
    for k in range(num_objects):
      j[i - 1, k] = jaccard(gt == k + 1, pred == k + 1)
      f[i - 1, k] = boundary_f(gt == k + 1, pred == k + 1, ecfg.bound_th)
    if bar is not None:
      bar.update(1)
  return list(j.mean(axis=0)), list(f.mean(axis=0))


def check_shape(seq: Sequence, i: int, ids: np.ndarray, shape: tuple[int, int]) -> None:
  if ids.shape != tuple(shape):
    raise UsageError(f"sequence {seq.name!r}: annotation {seq.annotations[i].name} is {ids.shape[1]}x{ids.shape[0]}, "
                     f"its frame {shape[1]}x{shape[0]}")


class VideoPropagationEvaluator:
  """DINO's DAVIS-2017 video object segmentation by label propagation on frozen patch
  features (Sec. 4.2.3). Metrics: `davis_j_mean`, `davis_f_mean`, `davis_jf_mean`."""
  needs_labels = False
  shards_batches = False
  # DINO Sec. 4.2.3 (eval_video_segmentation.py), DAVIS-2017 val: first frame + last 7, top-5 neighbours within
  # 12 patches, T = 0.1, frames at 480 px (shorter side); J&F on all frames but the first and last (tolerance 0.008).
  default_configs = {
      "video_propagation": dict(type="video_propagation", every_steps=-1, every_epochs=0.0, path="",
                                resolution="480p", split="val", scale_size=480, n_last_frames=7, topk=5,
                                size_mask_neighborhood=12, temperature=0.1, bound_th=0.008),
  }

  def __init__(self, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, mesh):
    self.ecfg = ecfg
    self.features = common.DenseFeatures(cfg.model, mesh)
    self.sequences = list_sequences(ecfg.path, ecfg.resolution, ecfg.split, f"video propagation data {ecfg.path!r}")
    self.progress_bar = cfg.get("progress_bar", True)

  def frame_features(self, params, path: pathlib.Path) -> tuple[np.ndarray, tuple[int, int]]:
    """l2-normalized last-layer patch features [h, w, D] of the frame at `path` resized as
    DINO's read_frame (`frame_shape`, bilinear), and the frame's (H, W). PIL's bilinear
    antialiases when shrinking, where DINO's cv2.resize INTER_LINEAR does not."""
    image = common.read_rgb(path)
    th, tw = frame_shape(*image.shape[:2], self.ecfg.scale_size, self.features.stride)
    resized = np.asarray(Image.fromarray(image).resize((tw, th), Image.BILINEAR))
    patch = self.features(params, resized[None])["patch"][0]
    return common.l2_normalize(patch), image.shape[:2]

  def run(self, params) -> dict[str, float]:
    if params is None:  # no raw-pixel baseline: propagation needs features
      return {}
    j, f = [], []
    total = sum(len(s.frames) - 2 for s in self.sequences)
    with common.progress(None, "video propagation", total=total, enabled=self.progress_bar) as bar:
      for seq in self.sequences:
        seq_j, seq_f = score_sequence(seq, functools.partial(self.frame_features, params),
                                      self.features.stride, self.ecfg, bar)
        j += seq_j
        f += seq_f
    return davis_means(j, f)

  @staticmethod
  def describe(ecfg: ml_collections.ConfigDict) -> str:
    return (f"DAVIS J&F-Mean (label propagation: first + last {ecfg.n_last_frames} frames, top-{ecfg.topk}, "
            f"neighbourhood {ecfg.size_mask_neighborhood}, T={ecfg.temperature}, {ecfg.scale_size}px)")

  @staticmethod
  def check(name: str, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, enabled: bool) -> None:
    del cfg
    for key in ("n_last_frames", "topk", "scale_size"):  # DINO: 7, 5, 480
      validate.positive_int(ecfg, key, prefix=f"evals.{name}.")
    if ecfg.scale_size < LONG_SIDE_MULTIPLE:
      raise UsageError(f"evals.{name}.scale_size must be at least {LONG_SIDE_MULTIPLE} (DINO: 480), "
                       f"not {ecfg.scale_size}")
    validate.positive_int(ecfg, "size_mask_neighborhood", zero=True, prefix=f"evals.{name}.")  # 0: no restriction; DINO: 12
    for key in ("temperature", "bound_th"):  # DINO / DAVIS: 0.1, 0.008
      validate.positive_number(ecfg, key, prefix=f"evals.{name}.")
    for key in ("path", "resolution", "split"):
      validate.string(ecfg, key, prefix=f"evals.{name}.")
    if enabled:
      if not ecfg.get("path"):
        raise UsageError(f"evals.{name}.path must be a DAVIS-2017 folder (JPEGImages/, Annotations/, ImageSets/)")
      list_sequences(ecfg.path, ecfg.resolution, ecfg.split, f"evals.{name}.path")


# ---------------------------------------------------------------------------------------
# A small DAVIS-layout benchmark with known masks.
# ---------------------------------------------------------------------------------------

PALETTE = [0, 0, 0, 128, 0, 0, 0, 128, 0, 128, 128, 0, 0, 0, 128, 128, 0, 128]  # DAVIS's first colours


def paste(frame: np.ndarray, ids: np.ndarray, item: np.ndarray, mask: np.ndarray, top: int, left: int,
          obj: int) -> None:
  """Draws `item` [s, s, 3] where `mask` [s, s] at (top, left) on `frame` and writes `obj` into
  `ids` there (clipped to the frame; later objects occlude earlier ones)."""
  h, w = ids.shape
  s = mask.shape[0]
  y0, x0, y1, x1 = max(top, 0), max(left, 0), min(top + s, h), min(left + s, w)
  if y0 >= y1 or x0 >= x1:
    return
  m = mask[y0 - top:y1 - top, x0 - left:x1 - left]
  frame[y0:y1, x0:x1][m] = item[y0 - top:y1 - top, x0 - left:x1 - left][m]
  ids[y0:y1, x0:x1][m] = obj


def write_synthetic(out: pathlib.Path, seed: int = 0, num_sequences: int = 2, num_frames: int = 8,
                    height: int = 64, width: int = 128, num_objects: int = 2) -> None:
  """A small DAVIS-2017 folder at `out` (JPEGImages/480p, Annotations/480p,
  ImageSets/2017/val.txt) of `num_sequences` videos: `num_objects` Fashion-MNIST items, tinted
  and scaled up, moving across (and growing slightly over) a crop of the grace_hopper or
  Minduka photo, each frame with its exact object-id mask (1, 2, ... in drawing order)."""
  rng = np.random.default_rng(seed)
  out = pathlib.Path(out)
  items = data.fashion_mnist_demo("train", 28).images[..., 0]
  photos = common.sample_photos()
  names = [f"synthetic-{i:02d}" for i in range(num_sequences)]
  for n, name in enumerate(names):
    photo = photos[n % len(photos)]
    crop = min(photo.shape[0], photo.shape[1] * height // width)
    y, x = rng.integers(0, photo.shape[0] - crop + 1), rng.integers(0, photo.shape[1] - crop * width // height + 1)
    background = np.asarray(Image.fromarray(photo[y:y + crop, x:x + crop * width // height]).resize(
        (width, height), Image.BILINEAR))
    gray = items[rng.choice(len(items), num_objects, replace=False)]
    tints = rng.uniform(0.4, 1.0, (num_objects, 3))
    start = rng.uniform(0, 1, (num_objects, 2)) * [height * 0.5, width * 0.5]
    velocity = rng.uniform(-1, 1, (num_objects, 2)) * min(height, width) * 0.4 / num_frames
    size = min(height, width) * 0.5
    for sub in ("JPEGImages", "Annotations"):
      (out / sub / "480p" / name).mkdir(parents=True, exist_ok=True)
    for t in range(num_frames):
      frame, ids = background.copy(), np.zeros((height, width), np.uint8)
      for k in range(num_objects):
        s = int(round(size * (1 + 0.15 * t / max(num_frames - 1, 1))))
        g = np.asarray(Image.fromarray(gray[k]).resize((s, s), Image.BILINEAR)).astype(np.float32)
        item = np.clip(g[..., None] * tints[k] + 40, 0, 255).astype(np.uint8)
        top, left = (start[k] + velocity[k] * t).round().astype(int)
        paste(frame, ids, item, g > 8, top, left, k + 1)
      Image.fromarray(frame).save(out / "JPEGImages" / "480p" / name / f"{t:05d}.jpg", quality=95)
      annotation = Image.fromarray(ids)
      annotation.putpalette(PALETTE)  # now a palette image, as DAVIS's
      annotation.save(out / "Annotations" / "480p" / name / f"{t:05d}.png")
  (out / "ImageSets" / "2017").mkdir(parents=True, exist_ok=True)
  (out / "ImageSets" / "2017" / "val.txt").write_text("".join(f"{name}\n" for name in names))
