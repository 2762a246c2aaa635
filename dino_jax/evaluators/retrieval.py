"""The retrieval evaluator: image retrieval with frozen features (DINO, Caron et al. 2021, Sec.
4.2.1), as the official `eval_image_retrieval.py` does it; the ranking metrics and descriptors
`copy_detection` shares, and the synthetic benchmarks of both.

Retrieval (revisited Oxford / Paris, Radenović et al. 2018): every query ranks the gallery by
cosine similarity of l2-normalized global descriptors; the score is the mean over queries of
the average precision, where each query's "junk" images are removed from its ranking first.
The revisited protocol's three levels (`REVISITED_LEVELS`) differ in what counts as positive
and what as junk. DINO's descriptor is the CLS token of the image with its longer side scaled
to `imsize` (224 for Oxford; Paris: 512 and `multiscale`, the CLS averaged over scales 1,
1/√2, 1/2 before normalization). As in the official code, a scaled image is the bilinear
`F.interpolate(scale_factor=s)` of the full one (`interpolate`), and the patch embedding drops
the pixels beyond the last whole patch (`floor_crop`).

Average precision here is the trapezoidal one of the Holidays / revisitop evaluation packages
(`average_precision`), not the non-interpolated mean of precisions.
"""
import io
import json
import pathlib

import matplotlib
import ml_collections
import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dino_jax import data
from dino_jax import validate
from dino_jax.errors import UsageError
from dino_jax.evaluators import common

# Revisited Oxford / Paris (Radenović et al. 2018, Sec. 4): level -> (positive groups, junk groups).
REVISITED_LEVELS = {"easy": (("easy",), ("junk", "hard")),
                    "medium": (("easy", "hard"), ("junk",)),
                    "hard": (("hard",), ("junk", "easy"))}
MULTISCALE = (1.0, 1 / 2 ** 0.5, 0.5)  # DINO's `utils.multi_scale` (1/√2 to the same last bit)
FEATURES = ("cls", "gem")
EIGEN_FLOOR = 1e-5  # eigenvalues below this fraction of the largest are raised to it (DINO's `utils.PCA`)


# ---------------------------------------------------------------------------------------
# Metrics.
# ---------------------------------------------------------------------------------------

def average_precision(ranks, num_positives: int) -> float:
  """AP of one query from the 0-based `ranks` of its retrieved positives (sorted) among
  `num_positives`: the area under the precision-recall curve by trapezoids, precision 1 at
  recall 0 (the Holidays / revisitop `compute_ap`). Positives never retrieved add nothing."""
  ranks = np.asarray(ranks, np.float64)
  found = np.arange(len(ranks))
  before = np.where(ranks == 0, 1.0, found / np.maximum(ranks, 1))  # precision just before each positive
  after = (found + 1) / (ranks + 1)  # and at it
  return float(np.sum(before + after) / (2 * num_positives))


def positive_ranks(order: np.ndarray, positives, junk=()) -> np.ndarray:
  """The 0-based ranks of `positives` in the ranking `order` (gallery indices, best first)
  once the `junk` indices are taken out of it (revisitop's `compute_map`)."""
  kept = order[~np.isin(order, np.asarray(junk, np.int64))]
  return np.flatnonzero(np.isin(kept, np.asarray(positives, np.int64)))


def mean_average_precision(order: np.ndarray, positives: list, junk: list | None = None) -> float:
  """mAP of rankings `order` [Q, N] (gallery indices, best first) with each query's positive
  (and junk) gallery indices; queries without positives are left out (revisitop), NaN if all are."""
  junk = junk or [()] * len(positives)
  aps = [average_precision(positive_ranks(o, p, j), len(p)) for o, p, j in zip(order, positives, junk) if len(p)]
  return float(np.mean(aps)) if aps else float("nan")


def ranking(similarity: np.ndarray, topk: int | None = None) -> np.ndarray:
  """Gallery indices of each row of `similarity` [Q, N] by decreasing similarity (ties in
  gallery order), the first `topk` only when given."""
  return np.argsort(-similarity, axis=1, kind="stable")[:, :topk]


def revisited_maps(similarity: np.ndarray, gnd: list[dict]) -> dict[str, float]:
  """{level: mAP} of the revisited protocol for query x gallery `similarity` and each query's
  {"easy", "hard", "junk"} gallery indices; a level none of whose queries has positives is left out."""
  order = ranking(similarity)
  out = {}
  for level, (positive, junk) in REVISITED_LEVELS.items():
    pos = [np.concatenate([np.asarray(g[k], np.int64) for k in positive]) for g in gnd]
    jun = [np.concatenate([np.asarray(g[k], np.int64) for k in junk]) for g in gnd]
    value = mean_average_precision(order, pos, jun)
    if not np.isnan(value):
      out[level] = value
  return out


# ---------------------------------------------------------------------------------------
# Descriptors.
# ---------------------------------------------------------------------------------------

def gem(patch: np.ndarray, p: float) -> np.ndarray:
  """Generalized-mean pooling (Radenović et al. 2018, Eq. 1) of patch tokens [B, h, w, D]
  over the grid: (mean x^p)^(1/p) with x clamped at 1e-6 (DINO's copy detection: p = 4)."""
  x = np.maximum(np.asarray(patch, np.float64), 1e-6)
  return (np.mean(x ** p, axis=(1, 2)) ** (1.0 / p)).astype(np.float32)


def fit_whitening(features: np.ndarray, dim: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """PCA whitening learned on `features` [n, D] (Jégou & Chum 2012; DINO Sec. 4.2.2) as DINO's
  eval_copy_detection.py does it: (mean, projection [dim, D]) whose rows are the leading
  eigenvectors of the second-moment matrix XᵀX / n of the uncentered features (the official
  code's "covariance"; the mean is subtracted only when applying), each divided by the square
  root of its eigenvalue (`utils.PCA`, whit = 0.5), eigenvalues below `EIGEN_FLOOR` of the
  largest raised to that; `dim` 0 keeps all D."""
  x = features.astype(np.float64)
  values, vectors = np.linalg.eigh(x.T @ x / len(x))
  values = np.maximum(values, values.max() * EIGEN_FLOOR)
  keep = np.argsort(values)[::-1][:dim or None]
  return x.mean(axis=0), (vectors[:, keep] / np.sqrt(values[keep])).T


def apply_whitening(features: np.ndarray, whitening: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
  """`features` [n, D] centered and projected by `fit_whitening`'s (mean, projection)."""
  mean, projection = whitening
  return ((features - mean) @ projection.T).astype(np.float32)


def resized(image: np.ndarray, size: tuple[int, int], resample=Image.BICUBIC) -> np.ndarray:
  """uint8 `image` resized to `size` (width, height)."""
  if image.shape[1::-1] == tuple(size):
    return image
  return np.asarray(Image.fromarray(image).resize(size, resample))


def interpolate(image: np.ndarray, scale: float) -> np.ndarray:
  """Float [H, W, C] scaled by `scale` as DINO's `multi_scale` does it, PyTorch's
  `F.interpolate(scale_factor=scale, mode="bilinear", align_corners=False)`: each side
  floor(side * scale), output pixel i read at source coordinate (i + 0.5) / scale - 0.5
  (clamped at the borders; the given scale, not the ratio of the sizes; float32 arithmetic as
  PyTorch's on float32 images), no antialiasing. Bilinear weights sum to one, so scaling
  [0, 255] pixels before the per-channel normalization equals the official scaling after it."""
  def axis(n_in):
    dst = np.arange(int(n_in * scale), dtype=np.float32) + np.float32(0.5)
    src = np.maximum(np.float32(1 / scale) * dst - np.float32(0.5), np.float32(0))
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    return lo, np.minimum(lo + 1, n_in - 1), (src - lo).astype(np.float32)

  (r0, r1, wr), (c0, c1, wc) = axis(image.shape[0]), axis(image.shape[1])
  x = image[r0] * (1 - wr)[:, None, None] + image[r1] * wr[:, None, None]
  return x[:, c0] * (1 - wc)[None, :, None] + x[:, c1] * wc[None, :, None]


def floor_crop(image: np.ndarray, stride: int) -> np.ndarray:
  """`image` [H, W, ...] without the rows and columns beyond its last whole patch, the pixels a
  stride-`stride` patch embedding never sees (the official ViT's input)."""
  h, w = image.shape[:2]
  return image[:h // stride * stride, :w // stride * stride]


def crop_box(image: np.ndarray, bbox, what: str) -> np.ndarray:
  """`image` cropped to `bbox` [x1, y1, x2, y2] (rounded, as PIL's crop, and clipped to the
  image); UsageError naming `what` when nothing of the box lies inside the image."""
  h, w = image.shape[:2]
  x1, x2 = (min(max(round(v), 0), w) for v in bbox[0::2])
  y1, y2 = (min(max(round(v), 0), h) for v in bbox[1::2])
  if x2 <= x1 or y2 <= y1:
    raise UsageError(f"{what}: bbox {list(bbox)} lies outside the {w}x{h} image")
  return image[y1:y2, x1:x2]


def thumbnail(image: np.ndarray, imsize: int) -> np.ndarray:
  """`image` with its longer side brought down to `imsize` (aspect kept, Lanczos; smaller
  images unchanged), as DINO's retrieval loader (`PIL.Image.thumbnail`)."""
  im = Image.fromarray(image)
  im.thumbnail((imsize, imsize), Image.LANCZOS)
  return np.asarray(im)


def read_paths(paths: list, desc: str, enabled: bool):
  """(path, image) of `paths` read one by one (uint8 RGB) under a progress bar."""
  for path in common.progress(paths, desc, len(paths), enabled):
    yield path, common.read_rgb(path)


# ---------------------------------------------------------------------------------------
# Folder layouts.
# ---------------------------------------------------------------------------------------

def name_index(folder: pathlib.Path, files: list[pathlib.Path]) -> dict[str, pathlib.Path]:
  """Each image of `folder` by its relative path, with and without its suffix."""
  out = {f.relative_to(folder).with_suffix("").as_posix(): f for f in files}
  out.update({f.relative_to(folder).as_posix(): f for f in files})
  return out


def read_json(path: pathlib.Path, what: str):
  """The JSON content of `path`; UsageError naming `what` when missing or ill-formed."""
  if not path.is_file():
    raise UsageError(f"{what}: {str(path)!r} is missing")
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise UsageError(f"{what}: cannot read {str(path)!r}: {e}") from None


def lookup(index: dict, name, what: str) -> pathlib.Path:
  """The image named `name` in `index` (`name_index`); UsageError naming `what` when absent."""
  if not isinstance(name, str) or name not in index:
    raise UsageError(f"{what} names {name!r}, which is not an image there")
  return index[name]


def is_bbox(bbox) -> bool:
  """Whether `bbox` is [x1, y1, x2, y2] numbers with x1 < x2 and y1 < y2."""
  numbers = isinstance(bbox, list) and len(bbox) == 4 and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox)
  return numbers and bbox[0] < bbox[2] and bbox[1] < bbox[3]


def retrieval_layout(path: str, name: str = "retrieval") -> dict:
  """The retrieval benchmark under `path` (`RetrievalEvaluator`'s layouts) as {"queries":
  paths, "bboxes": per query [x1, y1, x2, y2] or None, "gallery": paths, "gnd": per query
  {"easy", "hard", "junk"} gallery indices (revisited) or {"positives"} (plain)}; one
  UsageError for whatever is missing or inconsistent."""
  root = pathlib.Path(path or "")
  where = f"evals.{name}.path"
  if not path or not root.is_dir():
    raise UsageError(f"{where}: {str(path)!r} is not a folder")
  if (root / "gnd.json").is_file():
    return revisited_layout(root, where)
  if (root / "queries").is_dir() or (root / "gallery").is_dir():
    return plain_layout(root, where)
  raise UsageError(f"{where}: {str(root)!r} has neither gnd.json (with jpg/) nor queries/ and gallery/")


def revisited_layout(root: pathlib.Path, where: str) -> dict:
  """`retrieval_layout` of a revisited benchmark: gnd.json and jpg/."""
  gnd = read_json(root / "gnd.json", where)
  if not isinstance(gnd, dict) or not isinstance(gnd.get("gallery"), list) or not isinstance(gnd.get("queries"), list):
    raise UsageError(f"{where}: gnd.json must be an object with lists 'gallery' and 'queries'")
  index = name_index(root / "jpg", common.image_files(root / "jpg", where))
  gallery = [lookup(index, n, f"{where}: gnd.json 'gallery'") for n in gnd["gallery"]]
  position = {n: i for i, n in enumerate(gnd["gallery"])}
  queries, bboxes, truth = [], [], []
  for q in gnd["queries"]:
    if not isinstance(q, dict):
      raise UsageError(f"{where}: gnd.json 'queries' must hold objects, not {q!r}")
    queries.append(lookup(index, q.get("name"), f"{where}: gnd.json query"))
    bbox = q.get("bbox")
    if bbox is not None and not is_bbox(bbox):
      raise UsageError(f"{where}: gnd.json query {q['name']!r} has bbox {bbox!r}, not [x1, y1, x2, y2]")
    bboxes.append(bbox)
    groups = {}
    for key in ("easy", "hard", "junk"):
      missing = [n for n in q.get(key, []) if n not in position]
      if missing:
        raise UsageError(f"{where}: gnd.json query {q['name']!r} lists {key} image {missing[0]!r}, "
                         "which is not in 'gallery'")
      groups[key] = np.asarray([position[n] for n in q.get(key, [])], np.int64)
    truth.append(groups)
  if not any(len(g["easy"]) + len(g["hard"]) for g in truth):
    raise UsageError(f"{where}: no query of gnd.json has an easy or hard image")
  return {"queries": queries, "bboxes": bboxes, "gallery": gallery, "gnd": truth}


def plain_layout(root: pathlib.Path, where: str) -> dict:
  """`retrieval_layout` of a plain benchmark: queries/, gallery/ and positives.json."""
  query_files = common.image_files(root / "queries", where)
  gallery = common.image_files(root / "gallery", where)
  positives = read_json(root / "positives.json", where)
  if not isinstance(positives, dict):
    raise UsageError(f"{where}: positives.json must map each query to a list of gallery images")
  queries = name_index(root / "queries", query_files)
  gallery_index = name_index(root / "gallery", gallery)
  position = {f: i for i, f in enumerate(gallery)}
  listed = {lookup(queries, q, f"{where}: positives.json (queries/)"): names for q, names in positives.items()}
  unlisted = [f for f in query_files if f not in listed]
  if unlisted:
    raise UsageError(f"{where}: positives.json has no entry for query {unlisted[0].name!r}")
  truth = [{"positives": np.asarray([position[lookup(gallery_index, n, f"{where}: positives.json (gallery/)")]
                                     for n in listed[f]], np.int64)} for f in query_files]
  if not any(len(g["positives"]) for g in truth):
    raise UsageError(f"{where}: no query of positives.json has a gallery image")
  return {"queries": query_files, "bboxes": [None] * len(query_files), "gallery": gallery, "gnd": truth}


def check_imsize(name: str, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict) -> None:
  """UsageError when `imsize` is below the backbone's patch size (not one whole patch)."""
  if ecfg.imsize < cfg.model.patch_size:
    raise UsageError(f"evals.{name}.imsize ({ecfg.imsize}) must be at least the patch size {cfg.model.patch_size}")


# ---------------------------------------------------------------------------------------
# Evaluators.
# ---------------------------------------------------------------------------------------

class RetrievalEvaluator:
  """Image retrieval mAP (DINO Sec. 4.2.1; revisited Oxford / Paris) on the folder `path`.

  Revisited layout (revisitop's): `path/jpg/` holds every image, `path/gnd.json` is
  {"gallery": [name, ...], "queries": [{"name", "bbox": [x1, y1, x2, y2] (optional), "easy":
  [gallery names], "hard": [...], "junk": [...]}, ...]}; a name is a file of jpg/ with or
  without its suffix. From revisitop's gnd_roxford5k.pkl (imlist / qimlist / gnd with
  index lists and "bbx"), in the folder holding it:
    python -c "import json, pickle; g = pickle.load(open('gnd_roxford5k.pkl', 'rb'));
      json.dump({'gallery': g['imlist'], 'queries': [dict(name=q, bbox=[float(v) for v in d['bbx']],
      **{k: [g['imlist'][i] for i in d[k]] for k in ('easy', 'hard', 'junk')})
      for q, d in zip(g['qimlist'], g['gnd'])]}, open('gnd.json', 'w'))"
  Metrics `retrieval_map_easy`, `_medium`, `_hard` (`REVISITED_LEVELS`; DINO reports medium
  and hard). Plain layout: `path/queries/`, `path/gallery/` and `path/positives.json`
  {query name: [gallery names]} (names relative to their folder, suffix optional; every query
  listed): metric `retrieval_map`. Queries without positives are left out.

  Descriptor (`feature`): "cls", the CLS embedding (DINO), or "gem", GeM (`gem_p`) of the
  patch tokens; of the image with its longer side scaled down to `imsize` (Lanczos, as
  PIL's thumbnail), with `multiscale` the mean over scales 1, 1/√2, 1/2 (`interpolate`),
  then l2-normalized; at every scale the pixels beyond the last whole patch are dropped
  (`floor_crop`), as the official patch embedding does. With `crop_queries` queries are
  cropped to their bbox first (clipped to the image; the revisitop protocol, DINO's script
  does not crop).
  """
  needs_labels = False
  shards_batches = False
  # DINO Sec. 4.2.1 (eval_image_retrieval.py): CLS at imsize 224 (rOxford) or 512 + multiscale (rParis),
  # revisited mAP easy / medium / hard. `path`: the benchmark's folder (docs/evaluations.md).
  default_configs = {
      "retrieval": dict(type="retrieval", every_steps=-1, every_epochs=0.0, path="", imsize=224, multiscale=False,
                        feature="cls", gem_p=4.0, crop_queries=False),
  }

  def __init__(self, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, mesh):
    self.ecfg = ecfg
    self.layout = retrieval_layout(ecfg.path)
    self.net = common.DenseFeatures(cfg.model, mesh)
    self.progress = cfg.get("progress_bar", True)

  def descriptor(self, params, image: np.ndarray, what: str) -> np.ndarray:
    """The l2-normalized [D] descriptor of one uint8 image (the class docstring); UsageError
    naming `what` when a scale of it is smaller than one patch."""
    e, stride = self.ecfg, self.net.stride
    image = thumbnail(image, e.imsize).astype(np.float32)
    scales = MULTISCALE if e.multiscale else (1.0,)
    total = 0.0
    for scale in scales:
      x = floor_crop(image if scale == 1 else interpolate(image, scale), stride)
      if not x.size:
        raise UsageError(f"{what}: {image.shape[1]}x{image.shape[0]} at scale {scale:.3g} is smaller than "
                         f"one {stride}x{stride} patch")
      out = self.net(params, x[None])
      total = total + (out["embedding"] if e.feature == "cls" else gem(out["patch"], e.gem_p))[0]
    return common.l2_normalize(total / len(scales))

  def descriptors(self, params, paths: list, bboxes: list, desc: str) -> np.ndarray:
    """[N, D] descriptors of the images at `paths` (each cropped to its bbox when one is given
    and `crop_queries`)."""
    out = []
    for (path, image), bbox in zip(read_paths(paths, desc, self.progress), bboxes):
      what = f"{desc}: {path.name}"
      if bbox is not None and self.ecfg.crop_queries:
        image = crop_box(image, bbox, what)
      out.append(self.descriptor(params, image, what))
    return np.stack(out)

  def score(self, queries: np.ndarray, gallery: np.ndarray) -> dict[str, float]:
    """The metrics of query [Q, D] and gallery [N, D] descriptors (l2-normalized)."""
    similarity = queries @ gallery.T
    gnd = self.layout["gnd"]
    if "positives" in gnd[0]:
      return {"retrieval_map": mean_average_precision(ranking(similarity), [g["positives"] for g in gnd])}
    return {f"retrieval_map_{level}": v for level, v in revisited_maps(similarity, gnd).items()}

  def run(self, params) -> dict[str, float]:
    if params is None:  # no raw-pixel baseline for retrieval
      return {}
    layout = self.layout
    queries = self.descriptors(params, layout["queries"], layout["bboxes"], "retrieval queries")
    gallery = self.descriptors(params, layout["gallery"], [None] * len(layout["gallery"]), "retrieval gallery")
    return self.score(queries, gallery)

  @staticmethod
  def describe(ecfg: ml_collections.ConfigDict) -> str:
    feature = "CLS" if ecfg.feature == "cls" else f"GeM (p={ecfg.gem_p:g}) of patch tokens"
    return (f"retrieval mAP (revisited easy/medium/hard, or plain): cosine of {feature} at {ecfg.imsize}px"
            + (", multi-scale (1, 1/sqrt2, 1/2)" if ecfg.multiscale else "")
            + (", queries cropped to their bbox" if ecfg.crop_queries else ""))

  @staticmethod
  def check(name: str, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, enabled: bool) -> None:
    validate.string(ecfg, "path", prefix=f"evals.{name}.")
    if ecfg.get("feature") not in FEATURES:
      raise UsageError(f"evals.{name}.feature must be one of {', '.join(FEATURES)}, not {ecfg.get('feature')!r}")
    validate.positive_int(ecfg, "imsize", prefix=f"evals.{name}.")
    validate.positive_number(ecfg, "gem_p", prefix=f"evals.{name}.")
    validate.boolean(ecfg, "multiscale", prefix=f"evals.{name}.")
    validate.boolean(ecfg, "crop_queries", prefix=f"evals.{name}.")
    check_imsize(name, ecfg, cfg)
    if enabled:
      retrieval_layout(ecfg.path, name)


# ---------------------------------------------------------------------------------------
# Synthetic benchmarks from real images, with known answers.
# ---------------------------------------------------------------------------------------

def real_photos() -> list[np.ndarray]:
  """The real images bundled with matplotlib (`common.sample_data`): two photos, a logo and
  two elevation maps rendered with a terrain colormap, as uint8 RGB."""
  photos = common.sample_photos() + [common.read_rgb(common.sample_data("logo2.png"))]
  terrain = matplotlib.colormaps["terrain"]
  for name, key in (("jacksboro_fault_dem.npz", "elevation"), ("topobathy.npz", "topo")):
    with np.load(common.sample_data(name)) as d:
      z = d[key].astype(np.float64)
    photos.append((terrain((z - z.min()) / max(np.ptp(z), 1e-9))[..., :3] * 255).astype(np.uint8))
  return photos


def composite(items: np.ndarray, rng: np.random.Generator, size: int) -> Image.Image:
  """Four Fashion-MNIST items [4, 28, 28] on a 2x2 grid, each tinted over a background colour."""
  colours = rng.integers(0, 256, (5, 3))
  alpha = items.astype(np.float64)[..., None] / 255.0
  tiles = colours[0] * (1 - alpha) + colours[1:, None, None] * alpha
  grid = np.concatenate([np.concatenate(tiles[:2], 1), np.concatenate(tiles[2:], 1)], 0).astype(np.uint8)
  return Image.fromarray(grid).resize((size, size), Image.BICUBIC)


def base_images(count: int, rng: np.random.Generator, size: int) -> list[Image.Image]:
  """`count` distinct size² images: crops (30-60% of the shorter side) of the real photos at
  random places, alternating with Fashion-MNIST composites."""
  photos = real_photos()
  items = data.fashion_mnist_demo("train", 28).originals
  picks = rng.permutation(len(items))
  out = []
  for i in range(count):
    if i % 2:
      out.append(composite(items[picks[4 * i:4 * i + 4]], rng, size))
      continue
    photo = photos[(i // 2) % len(photos)]
    h, w = photo.shape[:2]
    side = int(min(h, w) * rng.uniform(0.3, 0.6))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    out.append(Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC))
  return out


def edit(image: Image.Image, steps: list[tuple], rng: np.random.Generator) -> Image.Image:
  """`image` after the edits `steps`, each (kind, strength): ("crop", kept side fraction, at
  a random place, not resized back), ("rotate", ± degrees), ("jpeg", quality), ("blur",
  radius), ("resize", scale), ("overlay", size fraction: a text box and a tinted rectangle)."""
  for kind, s in steps:
    w, h = image.size
    if kind == "crop":
      cw, ch = max(16, round(w * s)), max(16, round(h * s))
      x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
      image = image.crop((x, y, x + cw, y + ch))
    elif kind == "rotate":
      image = image.rotate(float(rng.choice([-1, 1]) * s), Image.BILINEAR)
    elif kind == "jpeg":
      buffer = io.BytesIO()
      image.save(buffer, "JPEG", quality=int(s))
      image = Image.open(buffer).convert("RGB")
    elif kind == "blur":
      image = image.filter(ImageFilter.GaussianBlur(s))
    elif kind == "resize":
      image = image.resize((max(16, round(w * s)), max(16, round(h * s))), Image.BICUBIC)
    elif kind == "overlay":
      image = image.copy()
      draw = ImageDraw.Draw(image)
      bw, bh = round(w * s), round(h * s)
      x, y = rng.integers(0, w - bw + 1), rng.integers(0, h - bh + 1)
      draw.rectangle((x, y, x + bw, y + bh), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
      draw.text((rng.integers(0, max(w // 2, 1)), rng.integers(0, max(h // 2, 1))), "COPY", fill=(255, 255, 255))
  return image


# Retrieval: the gallery versions of each scene by difficulty (revisited groups).
EASY_EDITS = ([("jpeg", 40)], [("resize", 0.75)], [("crop", 0.85)])
HARD_EDITS = ([("crop", 0.55), ("rotate", 20), ("blur", 1.0)], [("crop", 0.5), ("overlay", 0.3), ("jpeg", 25)])
JUNK_EDITS = ([("crop", 0.3), ("blur", 2.5)],)
# Copy detection (Copydays-like blocks): the strong edits, and two milder blocks.
STRONG_EDITS = ([("crop", 0.6), ("rotate", 15), ("overlay", 0.25), ("jpeg", 20)],
                [("crop", 0.7), ("blur", 1.5), ("overlay", 0.3), ("resize", 0.6)])
MILD_BLOCKS = {"jpegqual/10": [("jpeg", 10)], "crops/50": [("crop", 0.5 ** 0.5)]}
LAYOUTS = ("revisited", "plain", "copydays")


def write_synthetic(out: pathlib.Path, seed: int = 0, layout: str = "revisited", scenes: int = 6,
                    distractors: int = 6, whitening: int = 80, size: int = 64) -> None:
  """A small benchmark in `layout` under `out`, from crops of real photos and Fashion-MNIST
  composites (`base_images`), with known answers.

  "revisited" (`RetrievalEvaluator`): per scene k a query jpg/scene<k>.jpg (the base image)
  and gallery images scene<k>_easy<i> (`EASY_EDITS`), scene<k>_hard<i> (`HARD_EDITS`),
  scene<k>_junk0 (`JUNK_EDITS`), plus `distractors` other images distractor<j> lightly
  edited; gnd.json names them. "plain": the same without junk, as queries/, gallery/ and
  positives.json. "copydays" (`CopyDetectionEvaluator`): original/<k>00.jpg (k on 4 digits),
  strong/<k>0<i>.jpg (`STRONG_EDITS`), jpegqual/10/ and crops/50/ (<k>00.jpg), distractors/
  and `whitening` images under whitening/. A descriptor equal for all versions of a scene
  scores mAP 1."""
  if layout not in LAYOUTS:
    raise UsageError(f"write_synthetic: layout must be one of {', '.join(LAYOUTS)}, not {layout!r}")
  rng = np.random.default_rng(seed)
  extra = whitening if layout == "copydays" else 0
  bases = base_images(scenes + distractors + extra, rng, size)
  out = pathlib.Path(out)

  def save(image: Image.Image, rel: str) -> str:
    path = out / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=95)
    return path.name

  mild = lambda: [EASY_EDITS[rng.integers(len(EASY_EDITS))][0]]
  if layout == "copydays":
    for k, base in enumerate(bases[:scenes]):
      save(base, f"original/{k:04d}00.jpg")
      for i, steps in enumerate(STRONG_EDITS, 1):
        save(edit(base, steps, rng), f"strong/{k:04d}{i:02d}.jpg")
      for block, steps in MILD_BLOCKS.items():
        save(edit(base, steps, rng), f"{block}/{k:04d}00.jpg")
    for j, base in enumerate(bases[scenes:scenes + distractors]):
      save(edit(base, mild(), rng), f"distractors/d{j:04d}.jpg")
    for j, base in enumerate(bases[scenes + distractors:]):
      save(edit(base, mild(), rng), f"whitening/w{j:04d}.jpg")
    return

  folder = {"revisited": ("jpg", "jpg"), "plain": ("queries", "gallery")}[layout]
  gallery, queries = [], []
  for k, base in enumerate(bases[:scenes]):
    q = {"name": save(base, f"{folder[0]}/scene{k:02d}.jpg"), "bbox": [0, 0, size, size]}
    groups = (("easy", EASY_EDITS), ("hard", HARD_EDITS)) + ((("junk", JUNK_EDITS),) if layout == "revisited" else ())
    for group, edits in groups:
      q[group] = [save(edit(base, steps, rng), f"{folder[1]}/scene{k:02d}_{group}{i}.jpg")
                  for i, steps in enumerate(edits)]
      gallery += q[group]
    queries.append(q)
  for j, base in enumerate(bases[scenes:]):
    gallery.append(save(edit(base, mild(), rng), f"{folder[1]}/distractor{j:02d}.jpg"))
  if layout == "revisited":
    (out / "gnd.json").write_text(json.dumps({"gallery": sorted(gallery), "queries": queries}, indent=1))
  else:
    (out / "positives.json").write_text(json.dumps({q["name"]: q["easy"] + q["hard"] for q in queries}, indent=1))
