"""Zero-shot semantic correspondence with keypoints, SD-DINO style (Zhang et al. 2023, "A Tale
of Two Features: Stable Diffusion Complements DINO for Zero-Shot Semantic Correspondence"), as
the official `pck_spair_pascal.py` does it.

Every annotated source keypoint is transferred to the target image by the nearest neighbour
(cosine similarity) of its patch feature among the target's patch features; the prediction is
the centre of the chosen patch. It is correct when its error is < α·max(w, h) (strictly, as
SD-DINO's code), (w, h) the target's bounding box (PCK@α_bbox, SPair-71k's convention).
SD-DINO pools the keypoints of a category's pairs, averages the categories (its "Average PCK")
and reports α = 0.1 on SPair-71k and α = 0.05, 0.1, 0.15 on PF-Pascal.

Features, as in SD-DINO:
  - images: the longer side resized (Lanczos) to `image_size` and zero-padded to a centred
    square canvas; the backbone's descriptors on the canvas's patch grid, as SD-DINO's
    ViTExtractor computes them (`descriptor_settings`): for DINOv2 (SD-DINO's default) the last
    block's tokens before the final norm ("token" facet) at stride 14 on 840 px (60 x 60); for
    DINO (its dino_vits8) block 9's attention keys, heads concatenated ("key" facet), with
    overlapping patches at stride 4 on 224 px (55 x 55). With `grid` 0 (SD-DINO's protocol)
    keypoints are matched on that grid itself (`Canvas`): a source keypoint (x, y) px is scaled
    by image_size / max(H, W) and shifted by the padding offset onto the canvas, and its patch is
    int(g · canvas coordinate / image_size) of a g-patch grid; every canvas patch, padding
    included, is a candidate; the prediction, patch j's centre j·stride + patch // 2 - 0.5 on the
    canvas, is mapped back to the image (minus the offset, divided by the scale). With `grid` > 0 (not SD-DINO's: for
    non-square images it blends neighbouring patches and changes PCK) the canvas map is
    resampled bilinearly onto a grid over the image itself (`ImageGrid`), `grid` cells along
    its longer side, where a keypoint (x, y) lies in cell floor((x + 0.5) w / W) and cell j's
    centre is at (j + 0.5) W / w - 0.5.
  - external maps (Stable Diffusion features in SD-DINO, computed by the user): reduced by PCA
    fitted jointly on the pair's two maps (SD-DINO's `co_pca`, on by default: `pca_dim` 256;
    SD-DINO reduces each of its three SD layers to 256, which one map of them all approximates;
    0: off), then put on the backbone's grid: with `grid` > 0
    resized bilinearly (half-pixel centres, as `F.interpolate(align_corners=False)`); with
    `grid` 0 sampled likewise at the centres of the canvas cells that lie on the image, zero on
    the padding cells (SD-DINO computes its SD features on the padded canvas too, so its padding
    cells hold SD features of black; maps spanning the image as stored carry none);
  - fusion (the paper's fusion equation): each source l2-normalized per patch, then
    F = [α F_ext, (1 - α) F_backbone], α = 0.5 (`fuse`). SD-DINO matches fused features by l2
    distance, here by cosine: the same nearest neighbour wherever both parts are non-zero.
Keypoint transfer (`transfer`, option `match`): "nn" (SD-DINO); "mutual", the nearest
neighbour kept only when the source keypoint's patch is in turn the target patch's nearest
neighbour among all source patches (a dropped keypoint counts as wrong, so PCK stays a share of
all keypoints); "soft_argmax", the follow-up GeoAware-SC's window soft-argmax (Zhang et al.
2024): the expected patch centre under softmax(similarity / `temperature`) (0.02) over the
(2 `soft_window` + 1)² patches (7: 15 x 15) around the nearest neighbour.

Folder layout (SPair-71k's own, so `path` may point at SPair-71k):
  PATH/JPEGImages/<category>/<image>.jpg
  PATH/PairAnnotation/<split>/<pair>.json   {"src_imname", "trg_imname", "category",
      "src_kps", "trg_kps" (lists of [x, y] px, in matching order), "src_bndbox",
      "trg_bndbox" ([x1, y1, x2, y2] px)}; other keys are ignored.
  FEATURES_DIR/<category>/<image stem>.npy  (optional) float [h, w, C], channels last, spanning
      the image as stored (not a padded canvas: crop the padding off maps computed on one), any
      resolution; one C for all.
PF-Pascal: write one such json per row of `test_pairs_pf_pascal.csv` (XA;YA -> src_kps, XB;YB
-> trg_kps, the class name as category, images copied or linked under JPEGImages/<category>/)
with each bounding box the whole image, [0, 0, W, H]: PF-Pascal scores PCK against the image's
longer side, as SD-DINO's code does.

Metrics (alphas `pck_alphas`, e.g. 0.1 -> `pck10`): `correspondence_pck10` for this project's
features alone and, with `features_dir`, `correspondence_external_pck10` and
`correspondence_fused_pck10`; each pools the keypoints of a category and averages the
categories. `<prefix>_pck10_per_image` (α = 0.1, or the first α) is the mean over pairs
of each pair's PCK. Raw pixels (params None): each patch's ImageNet-normalized pixels.
"""
import dataclasses
import functools
import itertools
import json
import math
import os
import pathlib

import matplotlib
import ml_collections
import numpy as np
from PIL import Image

from dino_jax import augment
from dino_jax import data
from dino_jax import models
from dino_jax import validate
from dino_jax.errors import UsageError
from dino_jax.evaluators import common

SDDINO_PATCHES = 60  # SD-DINO's patch grid: 840 px inputs to DINOv2's patch 14
MATCHES = ("nn", "mutual", "soft_argmax")
FACETS = ("auto", "token", "key")
SOURCES = {"backbone": "correspondence", "external": "correspondence_external", "fused": "correspondence_fused"}
BATCH = 8  # images per backbone forward (padded, so every batch has one shape)
PAIR_KEYS = ("src_imname", "trg_imname", "category", "src_kps", "trg_kps", "src_bndbox", "trg_bndbox")


# ---------------------------------------------------------------------------------------
# Grids and resampling.
# ---------------------------------------------------------------------------------------

def grid_shape(height: int, width: int, cells: int) -> tuple[int, int]:
  """The grid over an image of height x width px with `cells` cells along its longer side."""
  scale = cells / max(height, width)
  return max(1, round(height * scale)), max(1, round(width * scale))


def interpolation_matrix(coords: np.ndarray, n: int) -> np.ndarray:
  """[len(coords), n] weights of linear interpolation at `coords` (index units: sample i at i,
  clamped to [0, n - 1]) between n samples."""
  c = np.clip(np.asarray(coords, np.float64), 0, n - 1)
  lo = np.floor(c).astype(int)
  hi = np.minimum(lo + 1, n - 1)
  m = np.zeros((len(c), n))
  np.add.at(m, (np.arange(len(c)), lo), 1 - (c - lo))
  np.add.at(m, (np.arange(len(c)), hi), c - lo)
  return m


def sample(fmap: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
  """fmap [h, w, C] bilinearly sampled at every (row, col) of `rows` x `cols` (index units,
  clamped to the map) -> [len(rows), len(cols), C]."""
  rm, cm = interpolation_matrix(rows, fmap.shape[0]), interpolation_matrix(cols, fmap.shape[1])
  rows_done = np.tensordot(rm, np.asarray(fmap, np.float64), axes=(1, 0))  # [len(rows), w, C]
  return np.tensordot(cm, rows_done, axes=(1, 1)).transpose(1, 0, 2).astype(np.float32)


def centres(cells: int, extent: float) -> np.ndarray:
  """Continuous coordinates (pixel edges at 0 and `extent`) of the centres of `cells` equal cells."""
  return (np.arange(cells) + 0.5) * extent / cells


def flat_cells(rows: np.ndarray, cols: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
  """Flat indices of the cells at continuous grid coordinates (rows, cols) (cell j spans [j,
  j + 1)), clipped to the grid."""
  gh, gw = grid_hw
  return (np.clip(np.floor(rows), 0, gh - 1).astype(int) * gw + np.clip(np.floor(cols), 0, gw - 1).astype(int))


@dataclasses.dataclass(frozen=True)
class ImageGrid:
  """A grid spanning an image of height x width px (`grid` > 0): a keypoint (x, y) lies in cell
  floor((x + 0.5) w / W) (pixel centres at integers); cell j's centre is at (j + 0.5) W / w - 0.5."""
  height: int
  width: int

  def cells(self, kps: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """Flat indices [K] of the cells of a grid_hw grid holding keypoints [K, 2] (x, y px)."""
    (gh, gw), (h, w) = grid_hw, (self.height, self.width)
    return flat_cells((kps[:, 1] + 0.5) * gh / h, (kps[:, 0] + 0.5) * gw / w, grid_hw)

  def points(self, rows: np.ndarray, cols: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """[K, 2] (x, y) px of grid positions (rows, cols) (cell j's centre at j)."""
    (gh, gw), (h, w) = grid_hw, (self.height, self.width)
    return np.stack([(cols + 0.5) * w / gw - 0.5, (rows + 0.5) * h / gh - 0.5], axis=-1)

  def place_map(self, fmap: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """A map [h', w', C] spanning the image resized bilinearly to grid_hw (`common.resize_bilinear`)."""
    return common.resize_bilinear(np.asarray(fmap, np.float32), grid_hw)


@dataclasses.dataclass(frozen=True)
class Canvas:
  """Where an image of height x width px lies on SD-DINO's square canvas of `size` px: resized
  to `inner` (rows, cols) px (SD-DINO's `resize`: the longer side to `size`, the other
  round(size · side / longer)), its top-left corner at `offset` (rows, cols) (centred,
  zero-padded); keypoints are mapped onto it by `scale` = size / max(H, W) (`grid` 0)."""
  height: int
  width: int
  size: int
  patch: int = 0  # with `stride`: the backbone's patches of `patch` px every `stride` px (SD-DINO's extractor)
  stride: int = 0  # 0: cells tile the canvas (size / g px each)

  @property
  def scale(self) -> float:
    return self.size / max(self.height, self.width)

  def cell_centres(self, j, g: int):
    """Canvas coordinates (pixel edges at 0 and `size`) of the centres of cells j of a g-cell
    axis: j·stride + patch // 2 for overlapping patches, else (j + 0.5) size / g."""
    j = np.asarray(j, np.float64)
    return j * self.stride + self.patch // 2 if self.stride else (j + 0.5) * self.size / g

  def cell_index(self, coords, g: int):
    """The (fractional) cell index whose centre is at canvas coordinates `coords`."""
    coords = np.asarray(coords, np.float64)
    return (coords - self.patch // 2) / self.stride if self.stride else coords * g / self.size - 0.5

  @property
  def inner(self) -> tuple[int, int]:
    return tuple(max(1, round(self.size * n / max(self.height, self.width))) for n in (self.height, self.width))

  @property
  def offset(self) -> tuple[int, int]:
    return tuple((self.size - n) // 2 for n in self.inner)

  def place(self, image: np.ndarray) -> np.ndarray:
    """uint8 [size, size, 3]: the image resized (Lanczos, as SD-DINO) onto the black canvas."""
    rows, cols = self.inner
    canvas = np.zeros((self.size, self.size, 3), np.uint8)
    resized = np.asarray(Image.fromarray(image).resize((cols, rows), Image.LANCZOS))
    canvas[self.offset[0]:self.offset[0] + rows, self.offset[1]:self.offset[1] + cols] = resized
    return canvas

  def cells(self, kps: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """Flat indices [K] of the canvas patches (a grid_hw grid over the canvas) holding keypoints
    [K, 2] (x, y px), as SD-DINO: int(g · (scale · x + offset) / size)."""
    (gh, gw), (top, left) = grid_hw, self.offset
    return flat_cells((kps[:, 1] * self.scale + top) * gh / self.size, (kps[:, 0] * self.scale + left) * gw / self.size,
                      grid_hw)

  def points(self, rows: np.ndarray, cols: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """[K, 2] (x, y) image px of canvas grid positions (rows, cols): SD-DINO's patch centre
    j·stride + patch // 2 - 0.5 on the canvas (`cell_centres` - 0.5), minus the offset, divided
    by the scale."""
    (gh, gw), (top, left) = grid_hw, self.offset
    x = (self.cell_centres(cols, gw) - 0.5 - left) / self.scale
    y = (self.cell_centres(rows, gh) - 0.5 - top) / self.scale
    return np.stack([x, y], axis=-1)

  def place_map(self, fmap: np.ndarray, grid_hw: tuple[int, int]) -> np.ndarray:
    """A map [h, w, C] spanning the image on a grid_hw grid over the canvas: bilinearly sampled
    (half-pixel centres) at the cells whose centre lies on the image, zero elsewhere (padding)."""
    (rows, cols), (top, left), (h, w) = self.inner, self.offset, fmap.shape[:2]
    y = self.cell_centres(np.arange(grid_hw[0]), grid_hw[0]) - top
    x = self.cell_centres(np.arange(grid_hw[1]), grid_hw[1]) - left
    out = sample(fmap, y * h / rows - 0.5, x * w / cols - 0.5)
    inside = ((y >= 0) & (y < rows))[:, None] & ((x >= 0) & (x < cols))[None, :]
    return np.where(inside[..., None], out, 0.0).astype(np.float32)

  def to_image_grid(self, fmap: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A feature map [g, g, C] over the canvas resampled (bilinearly) at the cell centres of a
    `shape` grid over the image (`grid` > 0)."""
    g = fmap.shape[0]
    (rows, cols), (top, left) = self.inner, self.offset
    y = top + centres(shape[0], self.height) * rows / self.height
    x = left + centres(shape[1], self.width) * cols / self.width
    return sample(fmap, self.cell_index(y, g), self.cell_index(x, g))


def pixel_patches(canvas: np.ndarray, stride: int) -> np.ndarray:
  """Raw-pixel features [S / stride, S / stride, stride² 3] of a uint8 canvas [S, S, 3]: each
  patch's ImageNet-normalized pixels (what the backbone sees)."""
  x = (canvas.astype(np.float32) / 255.0 - augment.IMAGENET_MEAN) / augment.IMAGENET_STD
  g = canvas.shape[0] // stride
  return x.reshape(g, stride, g, stride, 3).transpose(0, 2, 1, 3, 4).reshape(g, g, -1)


# ---------------------------------------------------------------------------------------
# Fusion.
# ---------------------------------------------------------------------------------------

def co_pca(a: np.ndarray, b: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
  """Two feature maps [h, w, C] and [h', w', C] projected on the first `dim` principal axes of
  all their rows together, centred on their joint mean (SD-DINO's `co_pca`): [.., .., k] each,
  k = min(dim, C, rows)."""
  rows = np.concatenate([a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])]).astype(np.float64)
  centred = rows - rows.mean(axis=0)
  _, _, vt = np.linalg.svd(centred, full_matrices=False)
  proj = (centred @ vt[:dim].T).astype(np.float32)
  n = a.shape[0] * a.shape[1]
  return proj[:n].reshape(*a.shape[:2], -1), proj[n:].reshape(*b.shape[:2], -1)


def fuse(maps: list[np.ndarray], weights: tuple[float, ...], shape: tuple[int, int] | None = None) -> np.ndarray:
  """SD-DINO's fusion of feature maps [h_i, w_i, C_i]: each resized (`common.resize_bilinear`)
  to `shape` (default the first map's grid), l2-normalized per patch, scaled by its weight,
  concatenated -> [h, w, sum C_i]. SD-DINO: maps (SD, DINOv2), weights (α, 1 - α), α = 0.5."""
  shape = shape or maps[0].shape[:2]
  return np.concatenate([w * common.l2_normalize(common.resize_bilinear(np.asarray(m, np.float32), shape))
                         for m, w in zip(maps, weights)], axis=-1)


# ---------------------------------------------------------------------------------------
# Keypoint transfer and PCK.
# ---------------------------------------------------------------------------------------

def match_cells(src: np.ndarray, trg: np.ndarray, cells: np.ndarray, match: str = "nn", temperature: float = 0.02,
                window: int = 7) -> tuple[np.ndarray, np.ndarray]:
  """The target grid positions (rows, cols) [K] (cell j's centre at j; NaN where `match`
  "mutual" drops) matched to the source cells `cells` [K] (flat indices) by the features
  src [h, w, C] and trg [h', w', C]. See the module docstring for `match`."""
  gw, c = trg.shape[1], trg.shape[-1]
  s, t = common.l2_normalize(src.reshape(-1, c)), common.l2_normalize(trg.reshape(-1, c))
  sim = s[cells] @ t.T  # [K, h' w']
  best = sim.argmax(axis=1)
  rows, cols = (best // gw).astype(np.float64), (best % gw).astype(np.float64)
  if match == "soft_argmax":
    grid_r, grid_c = np.divmod(np.arange(len(t)), gw)
    inside = (np.abs(grid_r - rows[:, None]) <= window) & (np.abs(grid_c - cols[:, None]) <= window)
    logits = np.where(inside, (sim - sim.max(axis=1, keepdims=True)) / temperature, -np.inf)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    rows, cols = p @ grid_r, p @ grid_c
  elif match == "mutual":
    back = (t[best] @ s.T).argmax(axis=1)
    rows, cols = np.where(back == cells, rows, np.nan), np.where(back == cells, cols, np.nan)
  return rows, cols


def transfer(src: np.ndarray, trg: np.ndarray, src_kps: np.ndarray, src_frame, trg_frame, match: str = "nn",
             temperature: float = 0.02, window: int = 7) -> np.ndarray:
  """Source keypoints [K, 2] (x, y px) carried to the target image by the features src
  [h, w, C] and trg [h', w', C] on the grids that `src_frame` and `trg_frame` (`ImageGrid` or
  `Canvas`) place over the two images -> [K, 2] (x, y) px; NaN for keypoints "mutual" drops."""
  rows, cols = match_cells(src, trg, src_frame.cells(src_kps, src.shape[:2]), match, temperature, window)
  return trg_frame.points(rows, cols, trg.shape[:2])


def pck(pred: np.ndarray, gt: np.ndarray, bbox, alphas) -> np.ndarray:
  """Bool [K, len(alphas)]: prediction k less than alpha x max(w, h) from the ground truth
  (strictly, as SD-DINO's code), (w, h) the size of `bbox` [x1, y1, x2, y2] (SPair's
  PCK@α_bbox); NaN predictions are wrong."""
  x1, y1, x2, y2 = bbox
  err = np.linalg.norm(np.asarray(pred, np.float64) - gt, axis=-1)
  with np.errstate(invalid="ignore"):
    return err[:, None] < np.asarray(alphas) * max(x2 - x1, y2 - y1)


def summarize(results: list[tuple[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
  """(PCK per keypoint pooled within each category then averaged over categories, mean of the
  pairs' PCK) [A] of each pair's (category, correct [K, A])."""
  categories = sorted({c for c, _ in results})
  per_category = [np.concatenate([x for c, x in results if c == cat]).mean(axis=0) for cat in categories]
  return np.mean(per_category, axis=0), np.mean([x.mean(axis=0) for _, x in results], axis=0)


def pck_name(alpha: float) -> str:
  """`pck10` for α = 0.1 (α in whole percents)."""
  return f"pck{round(alpha * 100):02d}"


def main_index(alphas) -> int:
  """Which α the per-image metric takes: 0.1 (SD-DINO's SPair-71k figure) when among them, else the first."""
  return next((i for i, a in enumerate(alphas) if math.isclose(a, 0.1)), 0)


# ---------------------------------------------------------------------------------------
# The pairs folder.
# ---------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Pair:
  """One annotated pair: image paths, keypoints [K, 2] (x, y px, matching order), the target's
  bounding box [x1, y1, x2, y2] and the external feature map paths (None without)."""
  name: str
  category: str
  src: pathlib.Path
  trg: pathlib.Path
  src_kps: np.ndarray
  trg_kps: np.ndarray
  trg_bbox: np.ndarray
  src_features: pathlib.Path | None
  trg_features: pathlib.Path | None


def _points(value, what: str) -> np.ndarray:
  x = np.asarray(value, np.float64)
  if x.ndim != 2 or x.shape[1] != 2 or not len(x) or not np.isfinite(x).all():
    raise ValueError(f"{what} must be a non-empty list of [x, y]")
  return x


@functools.lru_cache(maxsize=None)
def image_size(path: pathlib.Path) -> tuple[int, int]:
  """(width, height) of an image file, from its header."""
  with Image.open(path) as image:
    return image.size


def check_inside(kps: np.ndarray, size: tuple[int, int], what: str, image: pathlib.Path) -> None:
  """ValueError naming the first keypoint (x, y) px outside its image (edges included)."""
  outside = np.flatnonzero((kps < 0).any(axis=1) | (kps[:, 0] > size[0]) | (kps[:, 1] > size[1]))
  if len(outside):
    i = outside[0]
    raise ValueError(f"{what}[{i}] {kps[i].tolist()} lies outside the {size[0]}x{size[1]} image {image.name!r}")


def _bbox(value, what: str) -> np.ndarray:
  b = np.asarray(value, np.float64)
  if b.shape != (4,) or not np.isfinite(b).all() or b[2] <= b[0] or b[3] <= b[1]:
    raise ValueError(f"{what} must be [x1, y1, x2, y2] with x2 > x1 and y2 > y1, not {value!r}")
  return b


def read_pair(file: pathlib.Path, root: pathlib.Path, features_dir: str, where: str) -> Pair:
  """One SPair-style pair json; UsageError starting with `where` and naming it when it is
  ill-formed or names a file that is not there."""
  try:
    with open(file) as f:
      d = json.load(f)
    missing = [k for k in PAIR_KEYS if k not in d]
    if missing:
      raise ValueError(f"no {', '.join(missing)}")
    src_kps, trg_kps = _points(d["src_kps"], "src_kps"), _points(d["trg_kps"], "trg_kps")
    if len(src_kps) != len(trg_kps):
      raise ValueError(f"src_kps has {len(src_kps)} keypoints but trg_kps {len(trg_kps)}")
    _bbox(d["src_bndbox"], "src_bndbox")
    trg_bbox = _bbox(d["trg_bndbox"], "trg_bndbox")
    category = str(d["category"])
    images = [root / "JPEGImages" / category / str(d[k]) for k in ("src_imname", "trg_imname")]
    for image, kps, what in zip(images, (src_kps, trg_kps), ("src_kps", "trg_kps")):
      if not image.is_file():
        raise ValueError(f"no image {str(image)!r}")
      check_inside(kps, image_size(image), what, image)
    features = [None, None]
    if features_dir:
      features = [pathlib.Path(features_dir) / category / (image.stem + ".npy") for image in images]
      for path in features:
        if not path.is_file():
          raise ValueError(f"no feature map {str(path)!r}")
  except (OSError, ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
    raise UsageError(f"{where}: pair {str(file)!r}: {e}") from None
  return Pair(file.stem, category, *images, src_kps, trg_kps, trg_bbox, *features)


def read_pairs(path: str, split: str, features_dir: str = "", per_category: int = 0,
               name: str = "correspondence") -> list[Pair]:
  """The pairs of PATH/PairAnnotation/<split>/ sorted by (category, file name); with
  `per_category`, that many of each category, evenly spaced. One UsageError naming
  evals.<name>.path (or .features_dir) for a missing folder or a bad pair."""
  root = pathlib.Path(path or "")
  if not path or not root.is_dir():
    raise UsageError(f"evals.{name}.path: {path!r} is not a folder (SPair-71k's layout)")
  for sub in ("JPEGImages", os.path.join("PairAnnotation", split)):
    if not (root / sub).is_dir():
      raise UsageError(f"evals.{name}.path: {str(root)!r} has no {sub}/")
  if features_dir and not os.path.isdir(features_dir):
    raise UsageError(f"evals.{name}.features_dir: {features_dir!r} is not a folder")
  folder = root / "PairAnnotation" / split
  files = sorted(folder.glob("*.json"))
  if not files:
    raise UsageError(f"evals.{name}.path: no pair annotations {str(folder / '*.json')!r}")
  pairs = sorted((read_pair(f, root, features_dir, f"evals.{name}.path") for f in files),
                 key=lambda p: (p.category, p.name))
  chosen = []
  for _, group in itertools.groupby(pairs, key=lambda p: p.category):
    group = list(group)
    keep = np.unique(np.linspace(0, len(group) - 1, per_category).round().astype(int)) if per_category else None
    chosen += group if keep is None else [group[i] for i in keep]
  return chosen


def load_feature_map(path: str | os.PathLike) -> np.ndarray:
  """An external feature map float32 [h, w, C] from a .npy file; UsageError naming it when
  unreadable, not 3-D, empty, or not finite numbers."""
  try:
    x = np.load(path, allow_pickle=False)
  except (OSError, ValueError) as e:
    raise UsageError(f"cannot read feature map {str(path)!r} ({type(e).__name__}: {e})") from None
  if x.ndim != 3 or min(x.shape) < 1:
    raise UsageError(f"feature map {str(path)!r} has shape {x.shape}; expected [h, w, C] (channels last)")
  if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x) or not np.isfinite(x).all():
    raise UsageError(f"feature map {str(path)!r} has non-finite or non-numeric values")
  return x.astype(np.float32)


def read_feature_map(path: pathlib.Path, image_hw: tuple[int, int]) -> np.ndarray:
  """`load_feature_map` of a map that spans an image of image_hw px; UsageError naming it when
  it is not shaped like the image (channels first or a padded canvas: h / w far from H / W)."""
  x = load_feature_map(path)
  h, w = x.shape[:2]
  rows = w * image_hw[0] / image_hw[1]  # the rows a map w wide has over this image
  if abs(h - rows) > max(1.0, 0.1 * rows):
    raise UsageError(f"feature map {str(path)!r} has shape {x.shape} but its image is {image_hw[0]}x{image_hw[1]} "
                     "px; expected [h, w, C] (channels last) spanning its image (h/w ≈ H/W)")
  return x


def check_channels(maps: list[np.ndarray], paths: list) -> None:
  """UsageError naming two of `paths` whose feature maps have different channel counts."""
  for path, x in zip(paths[1:], maps[1:]):
    if x.shape[-1] != maps[0].shape[-1]:
      raise UsageError(f"feature maps {str(paths[0])!r} and {str(path)!r} have {maps[0].shape[-1]} and "
                       f"{x.shape[-1]} channels; one C is needed")


# ---------------------------------------------------------------------------------------
# The evaluator.
# ---------------------------------------------------------------------------------------

def descriptor_settings(ecfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict) -> dict:
  """SD-DINO's extractor settings for this backbone, "auto" / -1 / 0 resolved as
  `pck_spair_pascal.py` picks them: a DINO ViT (no LayerScale; SD-DINO's dino_vits8) gives its
  block 9 of 12 (the third from last) "key" facet, alone (no `features_dir`: its ONLY_DINO run)
  at half its patch size as stride (4 for patch 8) on a 224 px canvas, fused at its patch size
  on a canvas of 60 patches (480 px at patch 8); a DINOv2 ViT (LayerScale) and a Swin their last
  block's "token" facet (the output before the final norm) at their patch size on a canvas of
  60 patches (840 px at patch 14). {"facet", "block" (0-based), "stride", "image_size"}."""
  patch, is_vit = model_cfg.patch_size, model_cfg.get("name", "vit") == "vit"
  dino_v1 = is_vit and model_cfg.get("layerscale") is None
  dino_v1_alone = dino_v1 and not ecfg.get("features_dir")
  depth = models.make_backbone(model_cfg).num_layers - 1
  facet = ecfg.get("facet", "auto")
  layer = ecfg.get("layer", -1)
  return {"facet": ("key" if dino_v1 else "token") if facet == "auto" else facet,
          "block": (max(depth - 3, 0) if dino_v1 else depth - 1) if layer < 0 else layer,
          "stride": ecfg.get("stride", 0) or (max(patch // 2, 1) if dino_v1_alone else patch),
          "image_size": ecfg.image_size or (224 if dino_v1_alone else SDDINO_PATCHES * patch)}


class CorrespondenceEvaluator:
  """SD-DINO's zero-shot keypoint transfer, scored by PCK@α_bbox (module docstring), for this
  project's patch features alone and, with `features_dir`, for the external maps alone and
  for their fusion. The backbone's features are SD-DINO's extractor's (`descriptor_settings`:
  DINOv2's last-block tokens before the final norm, DINO's key facet at stride 4)."""
  needs_labels = False
  shards_batches = False
  # SD-DINO (Zhang et al. 2023), SPair-71k test: nearest-neighbour keypoint transfer on the zero-padded square
  # canvas's patch grid (image_size 0 and facet / layer / stride "auto": SD-DINO's per backbone, descriptor_settings;
  # grid N > 0: resampled over the image, not SD-DINO's), fusion [a l2n(external), (1-a) l2n(backbone)] with a = 0.5
  # when `features_dir` holds external (Stable Diffusion) maps, co-PCA'd to pca_dim (SD-DINO: 256 per SD layer);
  # PCK@0.1 of the target's bounding box (PF-Pascal: 0.05 / 0.1 / 0.15).
  default_configs = {
      "correspondence": dict(type="correspondence", every_steps=-1, every_epochs=0.0, path="", split="test",
                             features_dir="", alpha=0.5, pca_dim=256, grid=0, image_size=0, facet="auto", layer=-1,
                             stride=0, match="nn", temperature=0.02, soft_window=7, pck_alphas=(0.05, 0.1, 0.15),
                             pairs_per_category=0),
  }

  def __init__(self, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, mesh):
    self.ecfg = ecfg
    self.settings = descriptor_settings(ecfg, cfg.model)
    patch, stride = cfg.model.patch_size, self.settings["stride"]
    self.backbone = common.DenseFeatures(cfg.model, mesh, patch_stride=stride if stride != patch else 0)
    self.image_size = self.settings["image_size"]
    self.canvas_cells = dict(patch=patch, stride=stride) if stride != patch else {}
    self.pairs = read_pairs(ecfg.path, ecfg.split, ecfg.features_dir, ecfg.pairs_per_category)
    self.alphas = tuple(float(a) for a in ecfg.pck_alphas)
    self.progress = cfg.get("progress_bar", True)

  def backbone_maps(self, params, paths: list[pathlib.Path]) -> tuple[dict, dict]:
    """({path: patch features}, {path: its frame}) of the images: each on its padded square
    canvas through the backbone (raw pixel patches when params is None) in batches of BATCH;
    with `grid` 0 the canvas map and the `Canvas`, else the map resampled onto an `ImageGrid`."""
    maps, frames = {}, {}
    batches = [paths[i:i + BATCH] for i in range(0, len(paths), BATCH)]
    for batch in common.progress(batches, "correspondence features", enabled=self.progress):
      originals = [common.read_rgb(path) for path in batch]
      canvases = [Canvas(*image.shape[:2], self.image_size) for image in originals]
      images = np.stack([canvas.place(image) for canvas, image in zip(canvases, originals)])
      if params is None:
        feats = [pixel_patches(x, self.backbone.stride) for x in images]
      else:
        canvases = [dataclasses.replace(c, **self.canvas_cells) for c in canvases]
        padded = np.concatenate([images, np.zeros((BATCH - len(batch),) + images.shape[1:], np.uint8)])
        feats = self.backbone.facet(params, padded, self.settings["facet"], self.settings["block"])
      for path, canvas, f in zip(batch, canvases, feats):
        maps[path], frames[path] = np.asarray(f, np.float32), canvas
        if self.ecfg.grid:
          frames[path] = ImageGrid(canvas.height, canvas.width)
          maps[path] = canvas.to_image_grid(maps[path], grid_shape(canvas.height, canvas.width, self.ecfg.grid))
    return maps, frames

  def pair_features(self, pair: Pair, maps: dict, frames: dict) -> dict:
    """{source: (source map, target map)} on the backbone's grids: "backbone", and with
    external maps also "external" (co-PCA'd with `pca_dim`, placed on the grid) and "fused"."""
    out = {"backbone": (maps[pair.src], maps[pair.trg])}
    if pair.src_features is None:
      return out
    sides, paths = (pair.src, pair.trg), (pair.src_features, pair.trg_features)
    ext = [read_feature_map(path, (frames[p].height, frames[p].width)) for path, p in zip(paths, sides)]
    check_channels(ext, paths)
    if self.ecfg.pca_dim:
      ext = list(co_pca(*ext, self.ecfg.pca_dim))
    ext = [frames[p].place_map(e, maps[p].shape[:2]) for e, p in zip(ext, sides)]
    a = self.ecfg.alpha
    out["external"] = tuple(ext)
    out["fused"] = tuple(fuse([e, maps[p]], (a, 1 - a)) for e, p in zip(ext, sides))
    return out

  def run(self, params) -> dict[str, float]:
    e = self.ecfg
    results = {}
    for category, pairs in itertools.groupby(self.pairs, key=lambda p: p.category):
      pairs = list(pairs)
      maps, frames = self.backbone_maps(params, sorted({p.src for p in pairs} | {p.trg for p in pairs}))
      for pair in common.progress(pairs, f"correspondence {category}", enabled=self.progress):
        for source, (src, trg) in self.pair_features(pair, maps, frames).items():
          pred = transfer(src, trg, pair.src_kps, frames[pair.src], frames[pair.trg], e.match, e.temperature,
                          e.soft_window)
          results.setdefault(source, []).append((category, pck(pred, pair.trg_kps, pair.trg_bbox, self.alphas)))
    out = {}
    main = main_index(self.alphas)
    for source, scores in results.items():
      per_keypoint, per_image = summarize(scores)
      prefix = SOURCES[source]
      out.update({f"{prefix}_{pck_name(a)}": float(v) for a, v in zip(self.alphas, per_keypoint)})
      out[f"{prefix}_{pck_name(self.alphas[main])}_per_image"] = float(per_image[main])
    return out

  @staticmethod
  def describe(ecfg: ml_collections.ConfigDict) -> str:
    alphas = "/".join(f"{a:g}" for a in ecfg.pck_alphas)
    fusion = (f"; external maps and their fusion, α={ecfg.alpha:g}" + (f", PCA {ecfg.pca_dim}" if ecfg.pca_dim else "")
              if ecfg.features_dir else "")
    grid = f"grid {ecfg.grid} over the image" if ecfg.grid else "the canvas patch grid"
    facet = ecfg.get("facet", "auto")
    features = f"{facet} facet" if facet != "auto" else "SD-DINO's facet"
    return (f"PCK@{alphas} of the target bbox on {ecfg.split} pairs (SD-DINO zero-shot keypoint transfer, "
            f"{features}, {ecfg.match}, {grid}{fusion})")

  @staticmethod
  def check(name: str, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, enabled: bool) -> None:
    for key in ("path", "split", "features_dir"):
      validate.string(ecfg, key, prefix=f"evals.{name}.")
    prefix = f"evals.{name}."
    for key in ("pca_dim", "grid", "image_size", "pairs_per_category", "soft_window"):
      validate.positive_int(ecfg, key, zero=True, prefix=prefix)
    if "facet" in ecfg:
      validate.one_of(ecfg, "facet", FACETS, prefix=prefix)
    if "stride" in ecfg:
      validate.positive_int(ecfg, "stride", zero=True, prefix=prefix)
    layer = ecfg.get("layer", -1)
    if isinstance(layer, bool) or not isinstance(layer, int) or layer < -1:
      raise UsageError(f"{prefix}layer must be a block index (0-based) or -1 (SD-DINO's for the backbone), "
                       f"not {layer!r}")
    alpha = ecfg.get("alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
      raise UsageError(f"evals.{name}.alpha (the external maps' weight in the fusion) must be in [0, 1] "
                       f"(SD-DINO: 0.5), not {alpha!r}")
    if ecfg.get("match") not in MATCHES:
      raise UsageError(f"evals.{name}.match must be one of {', '.join(MATCHES)}, not {ecfg.get('match')!r}")
    validate.positive_number(ecfg, "temperature", prefix=f"evals.{name}.")
    alphas = ecfg.get("pck_alphas")
    if (not isinstance(alphas, (list, tuple)) or not alphas
        or any(isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a <= 1
               or not math.isclose(a * 100, round(a * 100), abs_tol=1e-9) for a in alphas)
        or len({pck_name(a) for a in alphas}) != len(alphas)):
      raise UsageError(f"evals.{name}.pck_alphas must be distinct fractions of the bounding box in (0, 1] in whole "
                       f"percents (SD-DINO: 0.05, 0.1, 0.15), not {alphas!r}")
    if not enabled:
      return
    settings, patch = descriptor_settings(ecfg, cfg.model), cfg.model.patch_size
    if settings["image_size"] % patch:
      raise UsageError(f"{prefix}image_size {settings['image_size']} is not a multiple of the patch size {patch}")
    if cfg.model.get("name", "vit") != "vit" and (settings["facet"] == "key" or settings["stride"] != patch):
      raise UsageError(f"{prefix}facet key and a stride other than the patch size need a ViT, not "
                       f"{cfg.model.get('name')}")
    if patch % settings["stride"]:
      raise UsageError(f"{prefix}stride {settings['stride']} does not divide the patch size {patch}")
    depth = models.make_backbone(cfg.model).num_layers - 1
    if settings["block"] >= depth:
      raise UsageError(f"{prefix}layer {settings['block']} is past the backbone's {depth} blocks (0-based)")
    read_pairs(ecfg.path, ecfg.split, ecfg.features_dir, ecfg.pairs_per_category, name)



# ---------------------------------------------------------------------------------------
# Synthetic pairs from real photos, with known answers.
# ---------------------------------------------------------------------------------------

CATEGORIES = ("hopper", "minduka", "fashion")
SPRITE_PX = 96  # longer side of the photo objects before they are placed


def sprites(category: str, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """`count` objects (rgb float [h, w, 3] in [0, 255], mask float [h, w] in [0, 1]) of a
  category: Grace Hopper's portrait (mask: the whole photo), the Minduka present (its alpha
  channel), or Fashion-MNIST items of different classes scaled up 3x (mask: gray > 25)."""
  if category == "fashion":
    src = data.fashion_mnist_demo("train", 28)
    firsts = [int(np.flatnonzero(src.labels == k)[0]) for k in range(src.num_classes)]
    items = [Image.fromarray(np.ascontiguousarray(src.images[firsts[i % len(firsts)]])) for i in range(count)]
    items = [np.asarray(x.resize((84, 84), Image.BICUBIC), np.float32) for x in items]
    return [(x, (x.mean(axis=-1) > 25).astype(np.float32)) for x in items]
  name = {"hopper": "grace_hopper.jpg", "minduka": "Minduka_Present_Blue_Pack.png"}[category]
  with Image.open(common.sample_data(name)) as image:
    image = image.convert("RGBA")
    scale = SPRITE_PX / max(image.size)
    x = np.asarray(image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS), np.float32)
  return [(x[..., :3], x[..., 3] / 255.0)] * count


def terrain(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
  """A float [h, w, 3] background: a random crop of the Jacksboro fault elevation map (real
  terrain, matplotlib's sample data) in the 'terrain' colormap, dimmed."""
  dem = np.load(common.sample_data("jacksboro_fault_dem.npz"))["elevation"]
  h, w = shape
  crop = rng.integers(h // 2, min(dem.shape))
  top, left = rng.integers(0, dem.shape[0] - crop + 1), rng.integers(0, dem.shape[1] - crop + 1)
  patch = dem[top:top + crop, left:left + crop]
  rgb = matplotlib.colormaps["terrain"]((patch - patch.min()) / max(np.ptp(patch), 1e-6))[..., :3]
  return 0.6 * np.asarray(Image.fromarray((rgb * 255).astype(np.uint8)).resize((w, h), Image.BILINEAR), np.float32)


def bilinear_points(image: np.ndarray, xy: np.ndarray) -> np.ndarray:
  """image [h, w, ...] bilinearly sampled at points xy [N, 2] (x, y px; zero outside)."""
  h, w = image.shape[:2]
  x0, y0 = np.floor(xy[:, 0]).astype(int), np.floor(xy[:, 1]).astype(int)
  fx, fy = xy[:, 0] - x0, xy[:, 1] - y0
  out = 0.0
  for dy, dx, wt in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx), (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
    yy, xx = y0 + dy, x0 + dx
    ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    value = image[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)] * ok.reshape((-1,) + (1,) * (image.ndim - 2))
    out = out + value * wt.reshape((-1,) + (1,) * (image.ndim - 2))
  return out


def similarity(scale: float, angle: float, shear: float) -> np.ndarray:
  """The 2 x 2 linear map: rotation by `angle` (rad) after x-shear and uniform `scale`."""
  c, s = math.cos(angle), math.sin(angle)
  return scale * np.array([[c, -s], [s, c]]) @ np.array([[1.0, shear], [0.0, 1.0]])


def thin_plate_spline(anchors: np.ndarray, values: np.ndarray):
  """The thin-plate spline f: R² -> R² with f(anchors) = values (Bookstein 1989; kernel r² log r)."""
  def kernel(a, b):  # U(r) = r² log r = r² log(r²) / 2
    r2 = ((a[:, None] - b[None]) ** 2).sum(-1)
    return np.where(r2 > 0, 0.5 * r2 * np.log(np.maximum(r2, 1e-12)), 0.0)

  n = len(anchors)
  p = np.concatenate([np.ones((n, 1)), anchors], axis=1)
  system = np.block([[kernel(anchors, anchors), p], [p.T, np.zeros((3, 3))]])
  coef = np.linalg.solve(system, np.concatenate([values, np.zeros((3, 2))]))
  return lambda xy: kernel(xy, anchors) @ coef[:n] + np.concatenate([np.ones((len(xy), 1)), xy], axis=1) @ coef[n:]


def pixel_centres(h: int, w: int) -> np.ndarray:
  """[h w, 2] (x, y) of every pixel centre, row-major."""
  y, x = np.mgrid[:h, :w]
  return np.stack([x.ravel(), y.ravel()], axis=-1).astype(np.float64)


def render(sprite, to_object, background: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 image, object mask bool) where each pixel shows the sprite at `to_object`(pixel centre)
  over the background."""
  rgb, mask = sprite
  h, w = background.shape[:2]
  u = to_object(pixel_centres(h, w))
  alpha = bilinear_points(mask, u).reshape(h, w, 1)
  image = alpha * bilinear_points(rgb, u).reshape(h, w, 3) + (1 - alpha) * background
  return np.clip(image + 0.5, 0, 255).astype(np.uint8), alpha[..., 0] >= 0.5


def box(mask: np.ndarray) -> list[int]:
  """[x1, y1, x2, y2] of a mask's true pixels."""
  rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
  return [int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])]


def synthetic_pair(rng: np.random.Generator, sprite, size: int, keypoints: int, thin_plate: bool) -> dict:
  """A source and a target image of one object: the source shows it upright, the target after
  a random affine warp (rotation <= 25°, scale 0.8-1.25, shear <= 0.15, a shift), to which a
  thin-plate spline adds random displacements (<= 6% of `size`) at a 4 x 4 lattice when
  `thin_plate`; each on its own terrain background. Keypoints are target points on the object
  carried exactly to the source by the target-to-source map. Returns {"src", "trg": uint8
  images, "src_kps", "trg_kps": [K, 2] (x, y), "src_bbox", "trg_bbox": object boxes,
  "src_object", "trg_object": pixel (x, y) [N, 2] -> sprite coordinates}."""
  rgb, mask = sprite
  spr_centre = (np.array(mask.shape[::-1], np.float64) - 1) / 2
  shapes = [(size, round(size * rng.uniform(0.8, 1.25))) for _ in range(2)]
  (hs, ws), (ht, wt) = shapes
  place = 0.6 * min(hs, ws) / max(mask.shape)
  src_centre = (np.array([ws, hs], np.float64) - 1) / 2
  src_object = lambda xy: spr_centre + (xy - src_centre) / place
  forward = similarity(rng.uniform(0.8, 1.25), math.radians(rng.uniform(-25, 25)), rng.uniform(-0.15, 0.15))
  trg_centre = (np.array([wt, ht], np.float64) - 1) / 2 + rng.uniform(-0.08, 0.08, 2) * size
  inverse = np.linalg.inv(forward)
  affine = lambda xy: src_centre + (xy - trg_centre) @ inverse.T
  to_src = affine
  if thin_plate:
    lattice = np.stack(np.meshgrid(np.linspace(0, wt - 1, 4), np.linspace(0, ht - 1, 4)), -1).reshape(-1, 2)
    spline = thin_plate_spline(lattice, rng.uniform(-0.06, 0.06, (len(lattice), 2)) * size)
    to_src = lambda xy: affine(xy) + spline(xy)
  trg_object = lambda xy: src_object(to_src(xy))
  src, src_mask = render(sprite, src_object, terrain(rng, (hs, ws)))
  trg, trg_mask = render(sprite, trg_object, terrain(rng, (ht, wt)))
  candidates = rng.uniform([1, 1], [wt - 2, ht - 2], (40 * keypoints, 2))
  inside = bilinear_points(mask, trg_object(candidates)) >= 0.99
  trg_kps = candidates[inside][:keypoints]
  if not len(trg_kps):
    raise ValueError("no keypoint landed on the warped object")
  return dict(src=src, trg=trg, src_kps=to_src(trg_kps), trg_kps=trg_kps, src_bbox=box(src_mask),
              trg_bbox=box(trg_mask), src_object=src_object, trg_object=trg_object)


def synthetic_pairs(seed: int = 0, pairs_per_category: int = 3, size: int = 64, keypoints: int = 10) -> list[dict]:
  """`pairs_per_category` pairs (`synthetic_pair`, thin-plate warps on odd pairs) of each of
  CATEGORIES, images `size` px high, each with {"category", "src_name", "trg_name"} added."""
  pairs = []
  for c, category in enumerate(CATEGORIES):
    for i, sprite in enumerate(sprites(category, pairs_per_category)):
      rng = np.random.default_rng([seed, c, i])
      pair = synthetic_pair(rng, sprite, size, keypoints, thin_plate=i % 2 == 1)
      pairs.append(dict(pair, category=category, src_name=f"{category}{i:03d}a", trg_name=f"{category}{i:03d}b"))
  return pairs


def colour_context(image: np.ndarray, cell: int = 4, radius: int = 2, dims: int = 32) -> np.ndarray:
  """The synthetic external features [H / cell, W / cell, dims] of a uint8 image: each cell's
  (2 radius + 1)² neighbourhood of mean colours (cells of `cell` px, colours scaled to [-1, 1],
  edges repeated) through a fixed random projection (seed 0) to `dims` channels. Local
  colour structure: informative about where a patch is on the object, blind to semantics."""
  h, w = image.shape[0] // cell, image.shape[1] // cell
  means = np.asarray(Image.fromarray(image).resize((w, h), Image.BOX), np.float32) / 127.5 - 1.0
  padded = np.pad(means, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
  context = np.lib.stride_tricks.sliding_window_view(padded, (2 * radius + 1,) * 2, axis=(0, 1)).reshape(h, w, -1)
  projection = np.random.default_rng(0).normal(size=(context.shape[-1], dims)) / math.sqrt(dims)
  return (context @ projection).astype(np.float32)


def write_synthetic(out: pathlib.Path, seed: int = 0, pairs_per_category: int = 3, size: int = 64,
                    keypoints: int = 10) -> None:
  """Writes `synthetic_pairs` in the SPair-71k layout under `out` (split "test") and their
  `colour_context` maps under out/features/<category>/<name>.npy (`features_dir`). The
  keypoints are exact: PCK depends only on the features."""
  out = pathlib.Path(out)
  for n, pair in enumerate(synthetic_pairs(seed, pairs_per_category, size, keypoints)):
    category = pair["category"]
    for folder in ("JPEGImages", "features"):
      (out / folder / category).mkdir(parents=True, exist_ok=True)
    for side in ("src", "trg"):
      name = pair[f"{side}_name"]
      Image.fromarray(pair[side]).save(out / "JPEGImages" / category / f"{name}.jpg", quality=95)
      np.save(out / "features" / category / f"{name}.npy", colour_context(pair[side]))
    annotation = dict(
        src_imname=f"{pair['src_name']}.jpg", trg_imname=f"{pair['trg_name']}.jpg", category=category,
        src_imsize=[pair["src"].shape[1], pair["src"].shape[0], 3],
        trg_imsize=[pair["trg"].shape[1], pair["trg"].shape[0], 3],
        src_kps=pair["src_kps"].tolist(), trg_kps=pair["trg_kps"].tolist(), kps_ids=list(range(len(pair["src_kps"]))),
        src_bndbox=pair["src_bbox"], trg_bndbox=pair["trg_bbox"], mirror=0)
    (out / "PairAnnotation" / "test").mkdir(parents=True, exist_ok=True)
    with open(out / "PairAnnotation" / "test" / f"{n:06d}-{pair['src_name']}-{pair['trg_name']}:{category}.json",
              "w") as f:
      json.dump(annotation, f)
