"""The curation demo: an uncurated pool with known defects, and the pipeline scored on it.

The pool is a folder of Fashion-MNIST train images (the bundled subset) into which the
defects DINOv2's pipeline targets (Sec. 3, App. A) are injected, each recorded in
`ground_truth.json`: near-duplicates of pool images (exact copies, resized, JPEG
re-encoded, slightly cropped, brightness-shifted), copies of evaluation (test) images,
out-of-distribution noise images and a few corrupt files. The seed set is held-out train
images of a few classes. `score` measures deduplication precision/recall, the removal of
test copies and retrieval precision against random sampling.
"""
import collections
import io
import json
import pathlib

import numpy as np
from PIL import Image

from dino_jax import data

COPY_KINDS = ("exact", "resized", "jpeg", "cropped", "brightness")


def encoded(image: Image.Image, fmt: str = "PNG", **options) -> tuple[bytes, str]:
  """(file bytes, suffix) of an image saved as PNG or JPEG."""
  buffer = io.BytesIO()
  image.save(buffer, format=fmt, **options)
  return buffer.getvalue(), ".jpg" if fmt == "JPEG" else ".png"


def near_duplicate(image: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[bytes, str]:
  """A near-duplicate file (bytes, suffix) of a uint8 [H, W] image, of one of COPY_KINDS:
  resized to 20-56 px, JPEG quality 40-80, 0-2 px cropped per side, brightness +-15-40."""
  h, w = image.shape
  if kind == "resized":
    side = int(rng.choice([20, 24, 36, 42, 56]))
    return encoded(Image.fromarray(image).resize((side, side), Image.BICUBIC))
  if kind == "jpeg":
    return encoded(Image.fromarray(image), "JPEG", quality=int(rng.integers(40, 81)))
  if kind == "cropped":
    top, left, bottom, right = rng.integers(0, 3, size=4)
    return encoded(Image.fromarray(image[top:h - bottom, left:w - right]))
  if kind == "brightness":
    shift = int(rng.integers(15, 41)) * int(rng.choice([-1, 1]))
    return encoded(Image.fromarray(np.clip(image.astype(np.int16) + shift, 0, 255).astype(np.uint8)))
  return encoded(Image.fromarray(image))


def noise_image(kind: int, rng: np.random.Generator, side: int = 28) -> Image.Image:
  """An out-of-distribution RGB image: uniform noise, smooth noise, random boxes or stripes."""
  if kind == 0:
    return Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
  if kind == 1:
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((side, side), Image.BICUBIC)
  canvas = np.full((side, side, 3), rng.integers(0, 256, 3), np.uint8)
  if kind == 2:
    for _ in range(4):
      y, x = rng.integers(0, side - 4, 2)
      canvas[y:y + rng.integers(4, side - y + 1), x:x + rng.integers(4, side - x + 1)] = rng.integers(0, 256, 3)
  else:
    period = int(rng.integers(2, 7))
    canvas[(np.arange(side) // period) % 2 == 1] = rng.integers(0, 256, 3)
  return Image.fromarray(canvas)


CORRUPT_FILES = (("truncated.png", lambda png: png[:60]), ("empty.png", lambda png: b""),
                 ("not_an_image.jpg", lambda png: b"this is not an image\n"))


def make_pool(out: str, cfg) -> dict:
  """Writes OUT/pool/*, OUT/seeds/* and OUT/ground_truth.json; returns counts per kind."""
  rng = np.random.default_rng(cfg.seed)
  with np.load(data.DEMO_FILE, allow_pickle=False) as d:
    train_images, train_labels = d["train_images"], d["train_labels"]
    test_images, test_labels = d["test_images"], d["test_labels"]
  entries = []  # (file bytes, suffix, ground truth)
  for i in range(cfg.originals):
    entries.append((*encoded(Image.fromarray(train_images[i])),
                    dict(kind="original", label=int(train_labels[i]), train_index=i)))
  originals = rng.choice(cfg.originals, cfg.copies_per_kind * len(COPY_KINDS), replace=False)
  for j, i in enumerate(originals):
    kind = COPY_KINDS[j % len(COPY_KINDS)]
    entries.append((*near_duplicate(train_images[i], kind, rng),
                    dict(kind="copy", transform=kind, label=int(train_labels[i]), train_index=int(i))))
  for j, i in enumerate(rng.choice(len(test_images), cfg.test_copies, replace=False)):
    kind = COPY_KINDS[j % len(COPY_KINDS)]
    entries.append((*near_duplicate(test_images[i], kind, rng),
                    dict(kind="test_copy", transform=kind, label=int(test_labels[i]), test_index=int(i))))
  for j in range(cfg.noise):
    entries.append((*encoded(noise_image(j % 4, rng)), dict(kind="noise", label=-1)))
  png = encoded(Image.fromarray(train_images[0]))[0]
  for j in range(cfg.corrupt):
    name, corrupt = CORRUPT_FILES[j % len(CORRUPT_FILES)]
    entries.append((corrupt(png), pathlib.Path(name).suffix, dict(kind="corrupt", label=-1)))

  root = pathlib.Path(out)
  (root / "pool").mkdir(parents=True, exist_ok=True)
  (root / "seeds").mkdir(parents=True, exist_ok=True)
  pool = {}
  for number, (file_bytes, suffix, truth) in zip(rng.permutation(len(entries)), entries):
    name = f"{number:06d}{suffix}"  # shuffled: file order says nothing about the kind
    (root / "pool" / name).write_bytes(file_bytes)
    pool[name] = truth
  seeds = {}
  held_out = np.arange(cfg.originals, len(train_images))
  for c in cfg.seed_classes:
    for i in held_out[train_labels[held_out] == c][:cfg.seeds_per_class]:
      name = f"seed_{i:05d}.png"
      Image.fromarray(train_images[i]).save(root / "seeds" / name)
      seeds[name] = int(c)
  truth = dict(pool=pool, seeds=seeds, seed_classes=[int(c) for c in cfg.seed_classes])
  (root / "ground_truth.json").write_text(json.dumps(truth, indent=1))
  kinds = [t["kind"] for t in pool.values()]
  return {k: kinds.count(k) for k in dict.fromkeys(kinds)} | {"seeds": len(seeds)}


TWIN_CORRELATION = 0.95


def pixel_correlations(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """The correlation of images a[i] and b[i] as aligned pixels (the dot product of the
  zero-mean, unit-norm images). Fashion-MNIST holds distinct items that are near-identical at
  28 px: a false duplicate between two originals at >= TWIN_CORRELATION joins a pair as alike
  as most injected copies are to their original."""
  def unit(x):
    x = x.reshape(len(x), int(np.prod(x.shape[1:]))).astype(np.float64)
    x = x - x.mean(1, keepdims=True)
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-9)
  return (unit(a) * unit(b)).sum(1)


def _read_jsonl(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def score(truth_file: str, workdir: str, test_id) -> dict:
  """Dedup precision/recall on the injected near-duplicates, the share of test copies
  removed, and retrieval precision (share of retrieved images whose class is a seed class)
  against random sampling from the deduplicated pool. `test_id(i)` is test image i's id."""
  truth = json.loads(pathlib.Path(truth_file).read_text())
  pool = truth["pool"]
  name = lambda image_id: pathlib.Path(image_id).name
  group = lambda n: f"train/{pool[n]['train_index']}" if "train_index" in pool[n] else n
  dropped = _read_jsonl(pathlib.Path(workdir) / "dropped.jsonl")
  duplicates = [r for r in dropped if r["reason"] == "duplicate"]
  num_copies = sum(t["kind"] == "copy" for t in pool.values())
  pairs = [(name(r["path"]), name(r["kept"])) for r in duplicates]
  true_pairs = [(a, b) for a, b in pairs if group(a) == group(b)]
  pair_kind = collections.Counter(pool[a].get("transform") or pool[b].get("transform") for a, b in true_pairs)
  copies_of_kind = collections.Counter(t["transform"] for t in pool.values() if t["kind"] == "copy")
  false_pairs = [(pool[a], pool[b]) for a, b in pairs if group(a) != group(b)]
  with np.load(data.DEMO_FILE, allow_pickle=False) as d:
    train_images = d["train_images"]
  twin_pairs = np.array([(a["train_index"], b["train_index"]) for a, b in false_pairs
                         if "train_index" in a and "train_index" in b], int).reshape(-1, 2)
  twins = pixel_correlations(train_images[twin_pairs[:, 0]], train_images[twin_pairs[:, 1]])
  eval_drops = {name(r["path"]): r["matched"] for r in dropped if r["reason"] == "eval_copy"}
  test_copies = {n: t for n, t in pool.items() if t["kind"] == "test_copy"}
  copies_caught = sum(eval_drops.get(n) == test_id(t["test_index"]) for n, t in test_copies.items())

  seed_classes = set(truth["seed_classes"])
  dropped_names = {name(r["path"]) for r in dropped}
  kept = [n for n, t in pool.items() if n not in dropped_names and t["kind"] != "corrupt"]
  retrieved = [name(r["path"]) for r in _read_jsonl(pathlib.Path(workdir) / "retrieved.jsonl")]
  in_seed_classes = lambda names: float(np.mean([pool[n]["label"] in seed_classes for n in names])) if len(names) \
      else float("nan")
  random_sample = np.random.default_rng(0).choice(kept, min(len(retrieved), len(kept)), replace=False)
  return dict(
      dedup_precision=len(true_pairs) / max(len(duplicates), 1), dedup_recall=len(true_pairs) / max(num_copies, 1),
      duplicates_dropped=len(duplicates), injected_copies=num_copies,
      dedup_recall_by_transform={k: pair_kind[k] / n for k, n in copies_of_kind.items()},
      false_duplicates_of_pixel_twins=int((twins >= TWIN_CORRELATION).sum()), false_duplicates=len(false_pairs),
      noise_dropped_as_duplicates=sum(pool[name(r["path"])]["kind"] == "noise" for r in duplicates),
      test_copies_removed=copies_caught / max(len(test_copies), 1), test_copies=len(test_copies),
      other_images_dropped_as_test_copies=len(eval_drops) - copies_caught,
      retrieved=len(retrieved), retrieval_precision=in_seed_classes(retrieved),
      random_sampling_precision=in_seed_classes(random_sample), seed_class_share_of_pool=in_seed_classes(kept),
      noise_retrieved=sum(pool[n]["kind"] == "noise" for n in retrieved))
