"""The copy-detection evaluator (DINO, Caron et al. 2021, Sec. 4.2.2), as the official
`eval_copy_detection.py` does it.

Copy detection (Copydays "strong", Douze et al. 2009): queries are strongly edited copies of
database images; the database is the originals plus distractors. DINO's descriptor is the
last block's CLS token concatenated with the GeM (p = 4) pool of its patch tokens on a square
`imsize` = 320 input (bicubic, then `floor_crop`), PCA-whitened (whitening learned on
separate images), l2-normalized and ranked by cosine similarity; a query's AP is taken over
its top-`topk` (20) results.

Average precision, GeM, whitening and the image scaling are `retrieval`'s.
"""
import pathlib

import ml_collections
import numpy as np

from dino_jax import validate
from dino_jax.errors import UsageError
from dino_jax.evaluators import common
from dino_jax.evaluators import retrieval


def as_blocks(value) -> tuple[str, ...]:
  """Copy-detection query blocks from a tuple/list or a comma-separated string."""
  items = value.split(",") if isinstance(value, str) else list(value or ())
  return tuple(str(b).strip().strip("/") for b in items if str(b).strip())


def side_folder(root: pathlib.Path, value: str) -> pathlib.Path | None:
  """`value` (relative to `root`, or absolute) as a folder; None for ""."""
  return (root / value) if value else None


def copydays_layout(ecfg: ml_collections.ConfigDict, name: str = "copy_detection") -> dict:
  """The copy-detection benchmark of `ecfg` (`CopyDetectionEvaluator`'s layout) as
  {"originals", "distractors", "whitening": paths, "blocks": {block: query paths},
  "positives": {block: per query original indices}}; one UsageError for what is missing."""
  where = f"evals.{name}"
  root = pathlib.Path(ecfg.path or "")
  if not ecfg.path or not root.is_dir():
    raise UsageError(f"{where}.path: {str(ecfg.path)!r} is not a folder")
  originals = common.image_files(root / "original", f"{where}.path (original/)")
  out = {"originals": originals, "blocks": {}, "positives": {}}
  for key in ("distractors", "whitening"):
    folder = side_folder(root, ecfg[key])
    out[key] = common.image_files(folder, f"{where}.{key} (set it to \"\" to run without)") if folder else []
  stems = [f.stem for f in originals]
  n = ecfg.match_prefix
  for block in as_blocks(ecfg.blocks):
    queries = common.image_files(root / block, f"{where}.blocks ({block}/)")
    positives = []
    for q in queries:
      match = [i for i, s in enumerate(stems) if (s[:n] == q.stem[:n] if n else s == q.stem)]
      if not match:
        raise UsageError(f"{where}: query {block}/{q.name} matches no image of original/ "
                         + (f"by its first {n} characters" if n else "by its file name"))
      positives.append(np.asarray(match, np.int64))
    out["blocks"][block] = queries
    out["positives"][block] = positives
  return out



class CopyDetectionEvaluator:
  """Copy-detection mAP (DINO Sec. 4.2.2; Copydays) on the folder `path`, Copydays' layout:
  `path/original/` (the database's originals), one folder per query block of `blocks`
  (Copydays: strong/, jpegqual/<q>/, crops/<p>/; DINO reports "strong"), and the folders
  `distractors` (added to the database; DINO: 10k YFCC100M images) and `whitening` (where
  the whitening is learned; DINO: 20k other YFCC100M images), relative to `path` or absolute,
  "" for none. A query's true copies are the originals whose file name shares its first
  `match_prefix` characters (4: Copydays' scene number), or with 0 its file name.

  Descriptor: the image resized to `imsize`² (bicubic, as torchvision's Resize on PIL images),
  the pixels beyond the last whole patch dropped (`floor_crop`; none for 320 and patch 8 or
  16), the last block's CLS token concatenated with GeM (`gem_p`) of its patch tokens,
  PCA-whitened (`fit_whitening`, `whitening_dim` 0: all components), l2-normalized. Each query
  ranks the database by cosine similarity; its AP (`average_precision`) counts the true copies
  among the first `topk` whose similarity is at least `threshold` (-1: no threshold, as DINO's
  script, which ranks the top 20; a copy below it counts as not detected). Metrics:
  `copy_detection_map` over all queries, and with several blocks `copy_detection_map_<block>`
  (slashes as _) for each.
  """
  needs_labels = False
  shards_batches = False
  # DINO Sec. 4.2.2 (eval_copy_detection.py): Copydays "strong", 320² input, CLS ++ GeM(p=4) of the patch
  # tokens, PCA-whitened on `whitening`, cosine ranking among `distractors`, AP over the top 20.
  default_configs = {
      "copy_detection": dict(type="copy_detection", every_steps=-1, every_epochs=0.0, path="", blocks=("strong",),
                             distractors="distractors", whitening="whitening", imsize=320, gem_p=4.0,
                             whitening_dim=0, topk=20, threshold=-1.0, match_prefix=4, batch_size=16),
  }

  def __init__(self, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, mesh):
    self.ecfg = ecfg
    self.layout = copydays_layout(ecfg)
    self.net = common.DenseFeatures(cfg.model, mesh)
    self.progress = cfg.get("progress_bar", True)

  def descriptors(self, params, paths: list, desc: str) -> np.ndarray:
    """[N, 2D] CLS ++ GeM descriptors (not normalized) of the images at `paths`, in batches of
    `batch_size` (the last one padded)."""
    e = self.ecfg
    images = [retrieval.floor_crop(retrieval.resized(im, (e.imsize, e.imsize)), self.net.stride)
              for _, im in retrieval.read_paths(paths, desc, self.progress)]
    out = []
    for i in range(0, len(images), e.batch_size):
      batch = images[i:i + e.batch_size]
      batch += batch[:1] * (e.batch_size - len(batch))
      feats = self.net(params, np.stack(batch))
      out.append(np.concatenate([feats["embedding"], retrieval.gem(feats["patch"], e.gem_p)], axis=1))
    return np.concatenate(out)[:len(images)]

  def score(self, queries: dict[str, np.ndarray], database: np.ndarray, whitening: np.ndarray | None) -> dict:
    """The metrics of each block's query descriptors, the database's (originals first) and
    those the whitening is learned on (None: no whitening)."""
    e = self.ecfg
    if whitening is not None:
      transform = retrieval.fit_whitening(whitening, e.whitening_dim)
      database = retrieval.apply_whitening(database, transform)
      queries = {b: retrieval.apply_whitening(q, transform) for b, q in queries.items()}
    database = common.l2_normalize(database)
    maps = {}
    for b, q in queries.items():
      similarity = common.l2_normalize(q) @ database.T
      order = [o[s[o] >= e.threshold] for o, s in zip(retrieval.ranking(similarity, e.topk), similarity)]
      maps[b] = retrieval.mean_average_precision(order, self.layout["positives"][b])
    sizes = {b: len(q) for b, q in queries.items()}
    out = {"copy_detection_map": sum(maps[b] * sizes[b] for b in maps) / sum(sizes.values())}
    if len(maps) > 1:
      out.update({f"copy_detection_map_{b.replace('/', '_')}": v for b, v in maps.items()})
    return out

  def run(self, params) -> dict[str, float]:
    if params is None:  # no raw-pixel baseline for copy detection
      return {}
    layout = self.layout
    database = self.descriptors(params, layout["originals"] + layout["distractors"], "copy detection database")
    queries = {b: self.descriptors(params, paths, f"copy detection {b}") for b, paths in layout["blocks"].items()}
    whitening = (self.descriptors(params, layout["whitening"], "copy detection whitening")
                 if layout["whitening"] else None)
    return self.score(queries, database, whitening)

  @staticmethod
  def describe(ecfg: ml_collections.ConfigDict) -> str:
    return (f"copy-detection mAP@{ecfg.topk} on {', '.join(as_blocks(ecfg.blocks))}: cosine of CLS + GeM "
            f"(p={ecfg.gem_p:g}) at {ecfg.imsize}px" + (", whitened" if ecfg.whitening else "")
            + (f", similarity >= {ecfg.threshold:g}" if ecfg.threshold > -1 else "")
            + (", with distractors" if ecfg.distractors else ""))

  @staticmethod
  def check(name: str, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, enabled: bool) -> None:
    validate.string(ecfg, "path", prefix=f"evals.{name}.")
    if not as_blocks(ecfg.get("blocks")):
      raise UsageError(f"evals.{name}.blocks must name at least one query folder (Copydays: strong), "
                       f"not {ecfg.get('blocks')!r}")
    for key in ("imsize", "topk", "batch_size"):
      validate.positive_int(ecfg, key, prefix=f"evals.{name}.")
    for key in ("whitening_dim", "match_prefix"):
      validate.positive_int(ecfg, key, zero=True, prefix=f"evals.{name}.")
    validate.positive_number(ecfg, "gem_p", prefix=f"evals.{name}.")
    threshold = ecfg.get("threshold")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not -1 <= threshold <= 1:
      raise UsageError(f"evals.{name}.threshold must be a cosine similarity in [-1, 1] (-1: none), not {threshold!r}")
    for key in ("distractors", "whitening"):  # folder names, "" for none
      validate.string(ecfg, key, prefix=f"evals.{name}.")
    retrieval.check_imsize(name, ecfg, cfg)
    if enabled:
      copydays_layout(ecfg, name)
