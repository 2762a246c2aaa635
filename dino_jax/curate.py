r"""Data curation as in DINOv2's LVD-142M (Oquab et al. 2023, Sec. 3 and App. A).

  python -m dino_jax.curate --config configs/curate_fashion_mnist.py --workdir OUT [--stages all]

Stages (`--stages a,b`; `all` = embed,dedup,retrieve,manifest). Each records a fingerprint of
its inputs and settings with its outputs (`fingerprint_file`). A rerun keeps a stage's outputs
made with the same ones, resumes an interrupted `embed` with the images no shard holds yet, and
refuses with one line naming what changed, unless `--restart STAGE[,STAGE]` deletes that stage's
outputs and those of the stages after it first.
  embed     l2-normalized global embeddings of the pool, the evaluation sets and the seed
            set with a run's backbone (`backbone`: a dino_jax.train or dino_jax.convert run),
            batches split over the mesh and the processes; OUT/embeddings/<set>/shard_*.npz,
            index.txt (image ids), unreadable.txt (skipped files), OUT/embeddings/fingerprint.json
  dedup     pool near-duplicates: k-NN graph with cosine >= dedup.threshold, connected
            components, the first image of each kept; pool images within
            dedup.eval_threshold of an evaluation image dropped; OUT/dropped.jsonl, kept.npy.
            dedup.descriptor=sscd compares SSCD copy-detection descriptors instead (DINOv2
            App. A.3; weights dedup.sscd_weights, thresholds dedup.sscd_threshold and
            dedup.sscd_eval_threshold), kept in OUT/descriptors/<set>/
  retrieve  pool images near the seed set: retrieve.method=knn (k nearest per seed image,
            for large seed sets) or clusters (k-means of the pool, per_seed images sampled
            from each seed's nearest clusters, for small ones); OUT/retrieved.jsonl
  manifest  OUT/manifest.jsonl (path, source, reason per image) and OUT/summary.json;
            train on it with --config.data.source=manifest --config.data.path=OUT/manifest.jsonl
Demo and measurements: make_demo_pool (the Fashion-MNIST pool with known defects, under
demo.out), score_demo (pipeline against its ground truth), bench (search and k-means timed
on synthetic features).
"""
import concurrent.futures
import functools
import hashlib
import json
import os
import pathlib
import resource
import shutil
import time

from absl import flags
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from dino_jax import bench
from dino_jax import cli
from dino_jax import convert
from dino_jax import data
from dino_jax import host_memory
from dino_jax import runs
from dino_jax import sharding
from dino_jax.curation import demo
from dino_jax.curation import search
from dino_jax.errors import UsageError
from dino_jax.errors import fail
from dino_jax.models import layers
from dino_jax.models import sscd

PIPELINE = ("embed", "dedup", "retrieve", "manifest")
DESCRIPTORS = ("embedding", "sscd")  # what dedup compares (dedup.descriptor)
# The dedup keys of configs written before dedup.descriptor, at their defaults. SSCD's threshold
# is its README's: sscd_disc_mixup pairs above cosine 0.75 are copies at 90% precision
# (facebookresearch/sscd-copy-detection, "Using SSCD descriptors"); DINOv2 used 0.6 and 0.45.
DEDUP_DEFAULTS = dict(descriptor="embedding", sscd_weights="", sscd_image_size=sscd.IMAGE_SIZE,
                      sscd_threshold=0.75, sscd_eval_threshold=0.75)


def embedding(features: dict) -> jax.Array:
  """The global image embedding among the backbone's outputs (`runs.Backbone`)."""
  return features["embedding"]


def dedup_config(cfg) -> ml_collections.ConfigDict:
  """cfg.dedup, with `DEDUP_DEFAULTS` for the keys a config lacks; UsageError for a descriptor
  other than those of `DESCRIPTORS`, or SSCD without its weights file."""
  d = ml_collections.ConfigDict(DEDUP_DEFAULTS | cfg.dedup.to_dict())
  if d.descriptor not in DESCRIPTORS:
    raise UsageError(f"dedup.descriptor must be one of {', '.join(DESCRIPTORS)}, not {d.descriptor!r}")
  if d.descriptor == "sscd" and not d.sscd_weights:
    raise UsageError("dedup.descriptor=sscd needs dedup.sscd_weights: an SSCD torchvision weight file "
                     "(sscd_disc_mixup.torchvision.pt)")
  return d


# ---------------------------------------------------------------------------------------
# Image sets: the pool, the evaluation sets and the seed set, each a `data` source.
# ---------------------------------------------------------------------------------------


def image_sets(cfg) -> dict:
  """{set name: source spec}: "pool", "eval_<name>" per evaluation set, "seeds"."""
  return {"pool": cfg.pool, **{f"eval_{k}": v for k, v in cfg.eval_sets.items()}, "seeds": cfg.seeds}


def open_source(spec, image_size: int):
  """The `data` source of a spec (source, path, name, data_dir, split) decoding to image_size."""
  cfg = ml_collections.ConfigDict(dict(source=spec.source, path=spec.get("path", ""), name=spec.get("name", ""),
                                       data_dir=spec.get("data_dir", ""), image_size=image_size))
  return data.make_source(cfg, spec.get("split", ""))


def dataset_image_id(spec, index: int) -> str:
  """source/name/split/index: the id of a dataset (not file) image."""
  return "/".join(str(p) for p in (spec.source, spec.get("name", ""), spec.get("split", ""), index) if p != "")


def image_ids(source, spec) -> list[str]:
  """A file's path, or the dataset image id."""
  if hasattr(source, "files"):
    return [str(f) for f in source.files]
  return [dataset_image_id(spec, i) for i in range(len(source))]


def read_images(source, indices, pool, size: int) -> tuple[np.ndarray, np.ndarray]:
  """uint8 images [n, size, size, 3] and a readable mask [n]; an unreadable file is a zero
  image with mask False (never a substitute: each embedding belongs to its image)."""
  if not hasattr(source, "get_or_none"):
    return data.read_batch(source, indices, pool)[0], np.ones(len(indices), bool)
  items = list(pool.map(source.get_or_none, indices))
  blank = np.zeros((size, size, 3), np.uint8)
  return (np.stack([blank if item is None else item[0] for item in items]),
          np.array([item is not None for item in items]))


# ---------------------------------------------------------------------------------------
# Resuming: each stage's outputs carry a fingerprint of the inputs and settings they were made
# with, {stage: {setting: value}} for the stage and the stages before it.
# ---------------------------------------------------------------------------------------

OUTPUTS = dict(embed=("embeddings",), dedup=("dropped.jsonl", "kept.npy"), retrieve=("retrieved.jsonl",),
               manifest=("manifest.jsonl", "summary.json"))
READS = dict(dedup="embed", retrieve="dedup", manifest="retrieve")  # the stage whose outputs each one reads
RETRIEVE_SETTINGS = dict(knn=("k",), clusters=("num_clusters", "iterations", "clusters_per_seed", "per_seed", "seed"))


def fingerprint_file(workdir: pathlib.Path, stage: str) -> pathlib.Path:
  """Where a pipeline stage's fingerprint is: embed's in its folder (written before its first
  shard), the others' next to their outputs (written after them)."""
  return workdir / "embeddings" / "fingerprint.json" if stage == "embed" else workdir / f"{stage}.fingerprint.json"


def read_fingerprint(workdir: pathlib.Path, stage: str) -> dict | None:
  """The stored fingerprint of `stage` (None where there is none); UsageError naming a damaged one."""
  path = fingerprint_file(workdir, stage)
  if not path.exists():
    return None
  try:
    stored = json.loads(path.read_bytes().decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UsageError(f"{path} is damaged ({e}): add --restart {stage} to redo {stage} and the stages after it") from None
  if not isinstance(stored, dict):
    raise UsageError(f"{path} is not a JSON object: add --restart {stage} to redo {stage} and the stages after it")
  return stored


def write_json(path: pathlib.Path, value) -> None:
  """Writes `value` to `path` atomically (process 0)."""
  if jax.process_index() == 0:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def write_fingerprint(workdir: pathlib.Path, stage: str, fingerprint: dict) -> None:
  write_json(fingerprint_file(workdir, stage), fingerprint)


def digest(data: bytes) -> str:
  return "sha256 " + hashlib.sha256(data).hexdigest()[:16]


@functools.lru_cache(maxsize=8)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
  del size, mtime_ns  # the cache key: the file as it is now
  with open(path, "rb") as f:
    return "sha256 " + hashlib.file_digest(f, "sha256").hexdigest()[:16]


def file_digest(path: str, what: str) -> str:
  """sha256 of the file at `path` (config key `what`); UsageError when there is none."""
  if not os.path.isfile(path):
    raise UsageError(f"{what}: no file {path!r}")
  stat = os.stat(path)
  return _file_digest(os.path.realpath(path), stat.st_size, stat.st_mtime_ns)


def settings(stage: str, cfg) -> dict:
  """The config values, by key, that the outputs of dedup, retrieve or manifest depend on. With
  the SSCD descriptor, dedup's include the weights file (its resolved path and sha256) and the
  SSCD input size; the embedding's keys are those of earlier versions, whose outputs stay valid."""
  if stage == "dedup":
    d = dedup_config(cfg)
    common = {"dedup.k": d.k, "eval_sets": list(cfg.eval_sets)}
    if d.descriptor == "embedding":
      return {"dedup.threshold": d.threshold, "dedup.eval_threshold": d.eval_threshold, **common}
    return {"dedup.descriptor": d.descriptor, "dedup.sscd_weights": str(pathlib.Path(d.sscd_weights).resolve()),
            "dedup.sscd_weights sha256": file_digest(d.sscd_weights, "dedup.sscd_weights"),
            "dedup.sscd_image_size": d.sscd_image_size, "dedup.sscd_threshold": d.sscd_threshold,
            "dedup.sscd_eval_threshold": d.sscd_eval_threshold, **common}
  if stage == "retrieve":
    r = cfg.retrieve
    return {"retrieve.method": r.method, **{f"retrieve.{k}": r[k] for k in RETRIEVE_SETTINGS[r.method]}}
  return {"retrieve.include_seeds": cfg.retrieve.include_seeds}


def fingerprint(stage: str, cfg, workdir: pathlib.Path) -> dict:
  """The fingerprint of `stage` and the stages before it as `cfg` sets them, from the
  embeddings on disk (embed's is the one they were made with)."""
  if stage == "embed":
    stored = read_fingerprint(workdir, "embed")
    if stored is None:
      raise UsageError(f"no embeddings in {workdir}: run the embed stage first")
    return stored
  return fingerprint(READS[stage], cfg, workdir) | {stage: settings(stage, cfg)}


def check(stage: str, workdir: pathlib.Path, stored: dict, current: dict) -> None:
  """UsageError naming each input or setting that differs when `stage`'s outputs in `workdir`
  were made with `stored`, not `current`."""
  current = json.loads(json.dumps(current))
  if stored == current:
    return
  changes = [f"{key} {before.get(key, '(none)')} -> {now.get(key, '(none)')}"
             for before, now in ((stored.get(s, {}), current.get(s, {})) for s in PIPELINE)
             for key in dict.fromkeys([*before, *now]) if before.get(key) != now.get(key)]
  first = next(s for s in PIPELINE if stored.get(s) != current.get(s))
  raise UsageError(f"{stage}: the outputs in {workdir} were made with other inputs or settings ({'; '.join(changes)}); "
                   f"add --restart {first} to redo {first} and the stages after it, or go back to the earlier ones")


def made_as_configured(stage: str, cfg, workdir: pathlib.Path) -> dict:
  """The fingerprint of `stage`'s finished outputs; UsageError when there are none, or when they
  were made with other settings than `cfg`'s."""
  stored = read_fingerprint(workdir, stage)
  if stored is None or not all((workdir / f).exists() for f in OUTPUTS[stage]):
    raise UsageError(f"no finished {stage} outputs in {workdir}: run the {stage} stage first")
  check(stage, workdir, stored, fingerprint(stage, cfg, workdir))
  return stored


def to_make(stage: str, cfg, workdir: pathlib.Path) -> dict | None:
  """The fingerprint to make dedup's, retrieve's or manifest's outputs with; None when they are
  on disk, made with it (kept). UsageError naming what changed when they, or the outputs they
  are made from, were made with other inputs or settings."""
  made_as_configured(READS[stage], cfg, workdir)
  current = fingerprint(stage, cfg, workdir)
  stored = read_fingerprint(workdir, stage)
  if stored is not None:
    check(stage, workdir, stored, current)
    if all((workdir / f).exists() for f in OUTPUTS[stage]):
      if jax.process_index() == 0:
        print(f"{stage}: kept (its outputs were made with these inputs and settings)")
      return None
  return current


def restart(workdir: pathlib.Path, stages: list[str]) -> None:
  """Deletes the outputs and fingerprints of pipeline `stages`, of the stages after them, and
  the demo's scores."""
  if jax.process_index() == 0:
    for stage in PIPELINE[min(PIPELINE.index(s) for s in stages):]:
      fingerprint_file(workdir, stage).unlink(missing_ok=True)
      for path in (workdir / name for name in OUTPUTS[stage]):
        if path.is_dir():
          shutil.rmtree(path)
        else:
          path.unlink(missing_ok=True)
    (workdir / "scores.json").unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------
# embed
# ---------------------------------------------------------------------------------------


def view_size(cfg, backbone) -> int:
  """The side of the evaluation view the backbone embeds."""
  return cfg.embed.image_size or backbone.cfg.aug.global_size


def embed_set(describe, source, ids: list[str], out: pathlib.Path, cfg, mesh, decode_size: int) -> None:
  """Describes (`describe`: global uint8 [B, decode_size, decode_size, 3] images -> [B, D]
  features, l2-normalized here) the images that no shard in `out` holds yet (resume),
  embed.shard_size at most per shard_<first>_<end>.npz (features and ids of the readable ones
  among ids[first:end], the unreadable ids), then writes index.txt and unreadable.txt;
  UsageError unless the shards hold every image once."""
  batch, shard_size = cfg.embed.batch_size, cfg.embed.shard_size
  if batch % mesh.size or batch % jax.process_count():
    raise UsageError(f"embed.batch_size {batch} is not divisible by the {mesh.size} devices")
  if shard_size % batch:
    raise UsageError(f"embed.shard_size {shard_size} is not a multiple of embed.batch_size {batch}")
  local = batch // jax.process_count()
  start = jax.process_index() * local
  to_global = lambda x: jax.make_array_from_process_local_data(sharding.batch_sharding(mesh), x)
  gather = jax.jit(lambda f, ok: (layers.l2_normalize(f.astype(np.float32)), ok),
                   out_shardings=sharding.replicated(mesh))
  out.mkdir(parents=True, exist_ok=True)
  done = np.zeros(len(ids), bool)
  for f in out.glob("shard_*.npz"):
    first, end = map(int, f.stem.split("_")[1:])
    done[first:end] = True
  missing = np.flatnonzero(~done)
  runs_missing = np.split(missing, np.flatnonzero(np.diff(missing) > 1) + 1)  # contiguous, in order
  shards = [(int(r[i]), int(r[min(i + shard_size, len(r)) - 1]) + 1) for r in runs_missing
            for i in range(0, len(r), shard_size)]
  bar = tqdm.tqdm(total=len(ids), initial=int(done.sum()), desc=f"embed {out.name}", unit="img",
                  disable=jax.process_index() != 0, dynamic_ncols=True)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    for lo, hi in shards:
      feats, readable = [], []
      for i in range(lo, hi, batch):
        index = np.arange(i, i + batch)
        images, ok = read_images(source, np.where(index < hi, index, lo)[start:start + local], pool, decode_size)
        f, ok = gather(describe(to_global(images)), to_global(ok))
        feats.append(np.asarray(f)[index < hi])
        readable.append(np.asarray(ok)[index < hi])
        bar.update(int(np.sum(index < hi)))
      feats, readable = np.concatenate(feats), np.concatenate(readable)
      if jax.process_index() == 0:
        tmp = out / "shard.tmp.npz"
        np.savez(tmp, features=feats[readable], ids=np.array(ids[lo:hi])[readable],
                 unreadable=np.array(ids[lo:hi])[~readable])
        os.replace(tmp, out / f"shard_{lo:010d}_{hi:010d}.npz")
  bar.close()
  if jax.process_index() == 0:
    parts = [np.load(f) for f in sorted(out.glob("shard_*.npz"))]
    if sorted(str(i) for p in parts for i in (*p["ids"], *p["unreadable"])) != sorted(ids):
      raise UsageError(f"the shards in {out} do not hold each image of the set once: add --restart embed")
    (out / "unreadable.txt").write_text("".join(f"{i}\n" for p in parts for i in p["unreadable"]))
    (out / "index.txt").write_text("".join(f"{i}\n" for p in parts for i in p["ids"]))


def embed_fingerprint(cfg, backbone, sets: dict) -> dict:
  """embed's fingerprint: the backbone (run directory, checkpoint step loaded, config.json), the
  view size, and each image set's source and ordered image ids ({name: (spec, ids)})."""
  run = pathlib.Path(cfg.backbone).resolve()

  def described(spec, ids):
    source = " ".join(str(spec.get(k, "")) for k in ("source", "name", "data_dir", "path", "split") if spec.get(k, ""))
    listing = digest("\n".join(ids).encode())
    return f"{source}: {len(ids)} images, ids {listing}"

  return {"embed": {"backbone": str(run), "backbone step": backbone.step,
                    "backbone config.json": digest((run / "config.json").read_bytes()),
                    "embed.image_size": view_size(cfg, backbone),
                    **{name: described(spec, ids) for name, (spec, ids) in sets.items()}}}


def run_embed(cfg, workdir: pathlib.Path, mesh) -> None:
  if not cfg.backbone:
    raise UsageError("config.backbone must name a run directory (dino_jax.train or dino_jax.convert)")
  backbone = runs.load_backbone(cfg.backbone, None if cfg.backbone_step < 0 else cfg.backbone_step)
  sources = {name: (spec, open_source(spec, backbone.cfg.data.image_size)) for name, spec in image_sets(cfg).items()}
  ids = {name: image_ids(source, spec) for name, (spec, source) in sources.items()}
  current = embed_fingerprint(cfg, backbone, {name: (spec, ids[name]) for name, (spec, _) in sources.items()})
  folder = workdir / "embeddings"
  stored = read_fingerprint(workdir, "embed")
  if stored is not None:
    check("embed", workdir, stored, current)
  elif any(folder.glob("*/shard_*.npz")) or any(folder.glob("*/index.txt")):
    raise UsageError(f"{folder} holds embeddings without a fingerprint (made by an earlier dino_jax): "
                     "add --restart embed to embed the sets again")
  else:
    folder.mkdir(parents=True, exist_ok=True)
    write_fingerprint(workdir, "embed", current)
  todo = [name for name in sources if not (folder / name / "index.txt").exists()]
  if not todo and jax.process_index() == 0:
    print("embed: kept (its outputs were made with these inputs and settings)")
  size = view_size(cfg, backbone)
  for name in todo:
    out = folder / name
    embed_set(lambda images: embedding(backbone(images, size)), sources[name][1], ids[name], out, cfg, mesh,
              backbone.cfg.data.image_size)
    skipped = (out / "unreadable.txt").read_text().splitlines() if jax.process_index() == 0 else []
    if skipped:
      print(f"{name}: skipped {len(skipped)} unreadable images (listed in {out / 'unreadable.txt'})")


def load_embeddings(workdir: pathlib.Path, name: str, folder: str = "embeddings") -> tuple[np.ndarray, list[str]]:
  """(features [N, D] float32, image ids) of an embedded set (`folder` "descriptors": its SSCD
  descriptors)."""
  out = workdir / folder / name
  if not (out / "index.txt").exists():
    raise UsageError(f"no finished embeddings of {name!r} in {out}: run the embed stage first")
  parts = [np.load(f) for f in sorted(out.glob("shard_*.npz"))]
  ids = [str(i) for p in parts for i in p["ids"]]
  features = np.concatenate([p["features"] for p in parts]) if parts else np.zeros((0, 0))
  return features.astype(np.float32), ids


# ---------------------------------------------------------------------------------------
# dedup
# ---------------------------------------------------------------------------------------


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> None:
  if jax.process_index() == 0:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.replace(tmp, path)


def dedup_thresholds(made_with: dict) -> tuple[float, float]:
  """(pool, evaluation-set) cosine thresholds of dedup's fingerprint settings: the SSCD ones
  with that descriptor."""
  key = "dedup.sscd_" if made_with.get("dedup.descriptor") == "sscd" else "dedup."
  return made_with[key + "threshold"], made_with[key + "eval_threshold"]


def sscd_descriptors(cfg, workdir: pathlib.Path, mesh, made_with: dict, embedded: dict) -> dict:
  """{set: (SSCD descriptors, ids)} of the embedded sets ({set: (features, ids)}), row for row.

  OUT/descriptors/<set> holds them as embed's shards; a rerun (--restart dedup to change a
  threshold) reuses a set's while its made_with.json (weights sha256, input size, image ids)
  is the same, and recomputes it otherwise. Images are decoded square at
  dedup.sscd_image_size (`data.to_square_rgb`: shorter side resized, center crop)."""
  size = made_with["dedup.sscd_image_size"]
  module, variables = convert.read_sscd(made_with["dedup.sscd_weights"])
  variables = jax.device_put(variables, sharding.replicated(mesh))
  describe = jax.jit(lambda v, images: module.apply(v, sscd.preprocess(images, size)))
  sets, found = image_sets(cfg), {}
  for name, (_, ids) in embedded.items():
    out = workdir / "descriptors" / name
    wanted = {"weights": made_with["dedup.sscd_weights sha256"], "image_size": size,
              "ids": digest("\n".join(ids).encode())}
    made = out / "made_with.json"
    fresh = made.exists() and json.loads(made.read_text()) == wanted
    done = fresh and (out / "index.txt").exists()
    multihost_utils.sync_global_devices(f"sscd {name} checked")  # by every process, before process 0 changes it
    if not done:
      if not fresh and jax.process_index() == 0:
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        write_json(made, wanted)
      multihost_utils.sync_global_devices(f"sscd {name} start")
      source = open_source(sets[name], size)
      embed_set(lambda images: describe(variables, images), source, image_ids(source, sets[name]), out, cfg, mesh,
                size)
      multihost_utils.sync_global_devices(f"sscd {name} done")  # process 0 wrote the index
    found[name] = load_embeddings(workdir, name, "descriptors")
    if found[name][1] != ids:
      raise UsageError(f"{name}: images read for the SSCD descriptors differ from those embedded (unreadable now?): "
                       "add --restart embed")
  return found


def pool_duplicates(pool: np.ndarray, ids: list[str], threshold: float, cfg, mesh) -> dict[int, dict]:
  """{dropped row: why} for the pool's near-duplicate groups, one image kept per group."""
  sims, index = search.top_k_search(pool, pool, cfg.dedup.k + 1, mesh, cfg.search.block_size, desc="dedup pool")
  kept = search.representatives(search.duplicate_groups(sims, index, threshold))
  return {int(i): dict(path=ids[i], reason="duplicate", kept=ids[kept[i]],
                       similarity=round(float(pool[i] @ pool[kept[i]]), 4))
          for i in np.flatnonzero(kept != np.arange(len(pool)))}


def eval_copies(pool: np.ndarray, ids: list[str], eval_set: str, eval_feats: np.ndarray, eval_ids: list[str],
                threshold: float, cfg, mesh) -> dict[int, dict]:
  """{dropped row: why} for pool images within `threshold` of an evaluation image."""
  sims, index = search.top_k_search(pool, eval_feats, 1, mesh, cfg.search.block_size, desc=f"dedup {eval_set}")
  return {int(i): dict(path=ids[i], reason="eval_copy", eval_set=eval_set, matched=eval_ids[index[i, 0]],
                       similarity=round(float(sims[i, 0]), 4))
          for i in np.flatnonzero(sims[:, 0] >= threshold)}


def run_dedup(cfg, workdir: pathlib.Path, mesh) -> None:
  """Drops the pool's near-duplicates and evaluation-set copies, compared by their embeddings or
  (dedup.descriptor=sscd) by SSCD descriptors; the rows stay those of the pool's embeddings."""
  d = dedup_config(cfg)
  prefix = "sscd_" if d.descriptor == "sscd" else ""
  for key in ("threshold", "eval_threshold"):
    search.check_threshold(f"dedup.{prefix}{key}", d[prefix + key])
  made_with = to_make("dedup", cfg, workdir)
  if made_with is None:
    return
  threshold, eval_threshold = dedup_thresholds(made_with["dedup"])
  features = {name: load_embeddings(workdir, name) for name in ("pool", *(f"eval_{e}" for e in cfg.eval_sets))}
  if not len(features["pool"][0]):
    raise UsageError("the pool is empty: no readable images were embedded")
  if d.descriptor == "sscd":
    features = sscd_descriptors(cfg, workdir, mesh, made_with["dedup"], features)
  pool, ids = features["pool"]
  dropped = pool_duplicates(pool, ids, threshold, cfg, mesh)
  for name in cfg.eval_sets:
    dropped |= eval_copies(pool, ids, name, *features[f"eval_{name}"], eval_threshold, cfg, mesh)
  write_jsonl(workdir / "dropped.jsonl", [dropped[i] for i in sorted(dropped)])
  kept = np.ones(len(pool), bool)
  kept[list(dropped)] = False
  if jax.process_index() == 0:
    np.save(workdir / "kept.tmp.npy", kept)
    os.replace(workdir / "kept.tmp.npy", workdir / "kept.npy")
  write_fingerprint(workdir, "dedup", made_with)


# ---------------------------------------------------------------------------------------
# retrieve
# ---------------------------------------------------------------------------------------


def knn_retrieval(seeds, seed_ids, pool, pool_ids, cfg, mesh) -> list[dict]:
  """The k nearest pool images of each seed image (DINOv2: k=4 for large seed sets); an
  image retrieved by several seeds is listed once, for its most similar one."""
  sims, index = search.top_k_search(seeds, pool, cfg.retrieve.k, mesh, cfg.search.block_size, desc="retrieve")
  order = np.argsort(-sims, axis=None, kind="stable")
  images, first = np.unique(index.reshape(-1)[order], return_index=True)
  seed, rank = np.unravel_index(order[first], index.shape)
  return [dict(path=pool_ids[i], seed=seed_ids[s], reason=f"neighbour {r + 1} of seed",
               similarity=round(float(sims[s, r]), 4)) for i, s, r in zip(images, seed, rank)]


def cluster_retrieval(seeds, seed_ids, pool, pool_ids, cfg, mesh) -> list[dict]:
  """k-means over the pool; for each seed image, retrieve.per_seed images sampled (with
  retrieve.seed) from its retrieve.clusters_per_seed nearest clusters (DINOv2's retrieval
  for small seed sets)."""
  r = cfg.retrieve
  centroids, cluster = search.kmeans(pool, min(r.num_clusters, len(pool)), r.iterations, r.seed, mesh,
                                     cfg.search.block_size)
  nearest = search.nearest_clusters(seeds, centroids, min(r.clusters_per_seed, len(centroids)), mesh,
                                    cfg.search.block_size)
  chosen = {}
  for s, clusters in enumerate(nearest):
    members = np.flatnonzero(np.isin(cluster, clusters))
    sample = np.random.default_rng([r.seed, s]).choice(members, min(r.per_seed, len(members)), replace=False)
    for i in sorted(sample):
      chosen.setdefault(int(i), dict(path=pool_ids[i], seed=seed_ids[s], cluster=int(cluster[i]),
                                     reason="sampled from a cluster nearest to seed"))
  return [chosen[i] for i in sorted(chosen)]


def run_retrieve(cfg, workdir: pathlib.Path, mesh) -> None:
  if cfg.retrieve.method not in RETRIEVE_SETTINGS:
    raise UsageError(f"retrieve.method must be 'knn' or 'clusters', not {cfg.retrieve.method!r}")
  made_with = to_make("retrieve", cfg, workdir)
  if made_with is None:
    return
  pool, ids = load_embeddings(workdir, "pool")
  kept = np.load(workdir / "kept.npy")
  seeds, seed_ids = load_embeddings(workdir, "seeds")
  if not len(seeds):
    raise UsageError("the seed set has no (readable) images")
  if not kept.any():
    raise UsageError("no pool image is left after deduplication")
  retrieval = knn_retrieval if cfg.retrieve.method == "knn" else cluster_retrieval
  write_jsonl(workdir / "retrieved.jsonl",
              retrieval(seeds, seed_ids, pool[kept], [i for i, k in zip(ids, kept) if k], cfg, mesh))
  write_fingerprint(workdir, "retrieve", made_with)


# ---------------------------------------------------------------------------------------
# manifest
# ---------------------------------------------------------------------------------------


def read_jsonl(path: pathlib.Path) -> list[dict]:
  if not path.exists():
    raise UsageError(f"{path} does not exist: run the earlier stages first")
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_manifest(cfg, workdir: pathlib.Path, mesh) -> None:
  """The manifest and its summary, each count and setting from the outputs it is made from and
  their fingerprint."""
  del mesh
  made_with = to_make("manifest", cfg, workdir)
  if made_with is None:
    return
  embed, dedup = made_with["embed"], made_with["dedup"]
  retrieved = read_jsonl(workdir / "retrieved.jsonl")
  dropped = read_jsonl(workdir / "dropped.jsonl")
  _, seed_ids = load_embeddings(workdir, "seeds")
  include_seeds = made_with["manifest"]["retrieve.include_seeds"]
  rows = [dict(path=i, source="seeds", reason="seed image") for i in seed_ids] if include_seeds else []
  rows += [dict(path=r["path"], source="pool", reason=f"{r['reason']} {r['seed']}"
                + (f" (cosine {r['similarity']})" if "similarity" in r else f" (cluster {r['cluster']})"))
           for r in retrieved]
  unreadable = {name: len((workdir / "embeddings" / name / "unreadable.txt").read_text().splitlines())
                for name in ("pool", *(f"eval_{e}" for e in dedup["eval_sets"]), "seeds")}
  pool_size = len((workdir / "embeddings" / "pool" / "index.txt").read_text().splitlines())
  threshold, eval_threshold = dedup_thresholds(dedup)
  summary = dict(backbone=embed["backbone"], backbone_step=embed["backbone step"], pool_images=pool_size,
                 unreadable=unreadable, dropped_duplicates=sum(r["reason"] == "duplicate" for r in dropped),
                 dropped_eval_copies={e: sum(r.get("eval_set") == e for r in dropped) for e in dedup["eval_sets"]},
                 kept_after_dedup=pool_size - len(dropped), seed_images=len(seed_ids),
                 retrieval=made_with["retrieve"]["retrieve.method"], retrieved=len(retrieved),
                 manifest_images=len(rows), dedup_descriptor=dedup.get("dedup.descriptor", "embedding"),
                 dedup_threshold=threshold, eval_threshold=eval_threshold)
  write_jsonl(workdir / "manifest.jsonl", rows)
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(f"manifest: {workdir / 'manifest.jsonl'} ({len(rows)} images)")
  write_fingerprint(workdir, "manifest", made_with)


# ---------------------------------------------------------------------------------------
# Demo and measurements.
# ---------------------------------------------------------------------------------------


def run_make_demo_pool(cfg, workdir: pathlib.Path, mesh) -> None:
  del workdir, mesh
  if not cfg.demo.out:
    raise UsageError("config.demo.out must name the folder for the demo pool")
  counts = demo.make_pool(cfg.demo.out, cfg.demo)
  print(f"demo pool in {cfg.demo.out}: " + ", ".join(f"{v} {k}" for k, v in counts.items()))


def run_score_demo(cfg, workdir: pathlib.Path, mesh) -> None:
  """Scores the dedup and retrieve outputs, refused unless they were made with `cfg`'s settings."""
  del mesh
  made_as_configured("retrieve", cfg, workdir)
  test_set = cfg.eval_sets[next(iter(cfg.eval_sets))]
  scores = demo.score(os.path.join(cfg.demo.out, "ground_truth.json"), str(workdir),
                      lambda i: dataset_image_id(test_set, i))
  (workdir / "scores.json").write_text(json.dumps(scores, indent=1))
  for k, v in scores.items():
    print(f"  {k:<38} {v:.4f}" if isinstance(v, float) else f"  {k:<38} {v}")


def run_bench(cfg, workdir: pathlib.Path, mesh) -> None:
  """Times the pool self-search (top-k, as dedup) and k-means Lloyd iterations on random
  l2-normalized features of each size in bench.sizes; appends JSON lines to bench.jsonl."""
  b = cfg.bench
  workdir.mkdir(parents=True, exist_ok=True)
  for n in b.sizes:
    x = np.random.default_rng(0).normal(size=(n, b.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    search.top_k_search(x[:cfg.search.block_size], x, cfg.dedup.k + 1, mesh, cfg.search.block_size)  # compile
    search_s = bench.median_seconds(
        lambda: search.top_k_search(x, x, cfg.dedup.k + 1, mesh, cfg.search.block_size), b.repeats)
    kmeans_s = bench.median_seconds(
        lambda: search.kmeans(x, b.num_clusters, b.iterations, 0, mesh, cfg.search.block_size), b.repeats)
    row = dict(images=n, dim=b.dim, devices=mesh.size, block_size=cfg.search.block_size, k=cfg.dedup.k + 1,
               search_s=round(search_s, 3), kmeans_clusters=b.num_clusters, kmeans_iterations=b.iterations,
               kmeans_s=round(kmeans_s, 3), max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
    print(json.dumps(row), flush=True)
    with open(workdir / "bench.jsonl", "a") as f:
      f.write(json.dumps(row) + "\n")


STAGES = dict(embed=run_embed, dedup=run_dedup, retrieve=run_retrieve, manifest=run_manifest,
              make_demo_pool=run_make_demo_pool, score_demo=run_score_demo, bench=run_bench)

for name in ("config", "workdir", "distributed", "coordinator_address", "num_processes", "process_id"):
  flags.declare_key_flag(name)  # dino_jax.cli's
_STAGES = flags.DEFINE_list("stages", ["all"], f"Stages to run, in order: all (= {','.join(PIPELINE)}) or "
                            f"any of {', '.join(STAGES)}.")
_RESTART = flags.DEFINE_list("restart", [], "Stages (of --stages) to redo from scratch: their outputs and those of "
                             "the stages after them are deleted first. Needed when a stage's inputs or settings "
                             "differ from those its outputs were made with.")


def run_stages(cfg, workdir: pathlib.Path, stages: list[str], restarted: list[str], mesh) -> None:
  """Runs `stages` in order, after deleting the outputs of the `restarted` ones and of the stages
  after them."""
  unknown = [s for s in stages if s not in STAGES]
  if unknown:
    raise UsageError(f"unknown stage(s) {', '.join(unknown)}; stages: all, {', '.join(STAGES)}")
  for stage in restarted:
    if stage not in PIPELINE:
      raise UsageError(f"--restart takes stages of {', '.join(PIPELINE)}, not {stage!r}")
    if stage not in stages:
      raise UsageError(f"--restart {stage}: {stage} is not among the stages to run (--stages)")
  if restarted:
    restart(workdir, restarted)
  for stage in stages:
    multihost_utils.sync_global_devices(f"curate {stage}")  # after process 0 has written what it reads
    t0 = time.time()
    STAGES[stage](cfg, workdir, mesh)
    if jax.process_index() == 0:
      print(f"{stage}: done in {time.time() - t0:.1f} s", flush=True)


def main(argv):
  del argv
  host_memory.keep_freed_memory()
  cli.quiet_logging()
  cli.initialize_distributed()
  try:
    if cli.WORKDIR.value is None or cli.CONFIG.value is None:
      raise UsageError("--config and --workdir are required")
    stages = [s for name in _STAGES.value for s in (PIPELINE if name == "all" else [name])]
    run_stages(cli.CONFIG.value, pathlib.Path(cli.WORKDIR.value), stages, _RESTART.value, sharding.make_mesh())
  except (UsageError, OSError) as e:
    fail(str(e))


if __name__ == "__main__":
  cli.run(main)
