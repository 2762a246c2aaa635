"""Curation (DINOv2 App. A): sharded search and k-means against numpy, duplicate groups, the
pipeline on a tiny demo pool, the manifest source, resuming (fingerprints, --restart), and bad
input."""
import json
import pathlib
import re
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs import curate_fashion_mnist
from dino_jax import curate
from dino_jax import data
from dino_jax import sharding
from dino_jax import trainer
from dino_jax.curation import demo
from dino_jax.curation import search
from dino_jax.errors import UsageError
from tests.test_train import REPO, device_env, tiny


def unit_rows(n, d, seed):
  x = np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def mesh():
  m = sharding.make_mesh()
  assert m.size == 8
  return m


@pytest.mark.parametrize("stage, content", [("embed", b'{"embed": {"backbone'), ("dedup", b"\xff\xfe"),
                                            ("manifest", b"[1, 2]")])
def test_damaged_fingerprint_is_one_line_naming_it(tmp_path, stage, content):
  path = curate.fingerprint_file(tmp_path, stage)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(content)
  with pytest.raises(UsageError, match=f"{re.escape(str(path))} is .*add --restart {stage} "):
    curate.read_fingerprint(tmp_path, stage)


@pytest.mark.parametrize("n,q,k,block", [(203, 37, 5, 8), (50, 9, 50, 4), (8, 3, 1, 1024), (5, 4, 3, 2)])
def test_sharded_search_equals_exact_numpy_search(mesh, n, q, k, block):
  database, queries = unit_rows(n, 16, 0), unit_rows(q, 16, 1)
  sims, index = search.top_k_search(queries, database, k, mesh, block)
  exact = queries @ database.T
  order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
  np.testing.assert_array_equal(index, order)
  np.testing.assert_allclose(sims, np.take_along_axis(exact, order, axis=1), atol=1e-6)


def numpy_kmeans(x, init, iterations):
  centroids = x[init]
  for _ in range(iterations):
    nearest = np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    for c in range(len(centroids)):
      if np.any(nearest == c):
        centroids[c] = x[nearest == c].mean(0)
  return centroids, np.argmin(((x[:, None] - centroids[None]) ** 2).sum(-1), axis=1)


def test_kmeans_equals_a_numpy_reference(mesh):
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(6, 8)) * 3
  x = (centers[rng.integers(0, 6, 301)] + rng.normal(size=(301, 8))).astype(np.float32)
  centroids, nearest = search.kmeans(x, 6, 7, seed=3, mesh=mesh, block_size=16)
  init = np.sort(np.random.default_rng(3).choice(len(x), 6, replace=False))
  ref_centroids, ref_nearest = numpy_kmeans(x.astype(np.float64), init, 7)
  np.testing.assert_allclose(centroids, ref_centroids, atol=1e-4)
  np.testing.assert_array_equal(nearest, ref_nearest)
  queries = x[::37] + 0.1
  clusters = search.nearest_clusters(queries, centroids, 2, mesh, 16)
  distances = ((queries[:, None] - centroids[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(clusters, np.argsort(distances, axis=1)[:, :2])


def test_duplicate_groups_are_connected_components():
  # edges >= 0.9: 0-1, 1-2 (so 0-1-2 by transitivity), 4-5 (found from 5's side only); 3 alone.
  index = np.array([[0, 1], [1, 2], [2, 1], [3, 0], [4, 3], [5, 4]])
  sims = np.array([[1.0, 0.95], [1.0, 0.91], [1.0, 0.91], [1.0, 0.5], [1.0, 0.89], [1.0, 0.92]])
  groups = search.duplicate_groups(sims, index, 0.9)
  assert groups[0] == groups[1] == groups[2] and groups[4] == groups[5]
  assert len({groups[0], groups[3], groups[4]}) == 3
  np.testing.assert_array_equal(search.representatives(groups), [0, 0, 0, 3, 4, 4])


def test_demo_score_counts_by_copy_kind_and_pixel_twins(tmp_path):
  # Train images 38 and 196 correlate at 0.959 as aligned pixels (Fashion-MNIST twins); 0 and 1 at 0.14.
  original = lambda i: dict(kind="original", label=0, train_index=i)
  copy = lambda i, kind: dict(kind="copy", transform=kind, label=0, train_index=i)
  pool = {"a.png": original(0), "b.png": original(1), "c.png": original(38), "d.png": original(196),
          "e.png": copy(0, "exact"), "f.png": copy(1, "cropped"), "g.png": copy(38, "exact")}
  truth = dict(pool=pool, seeds={}, seed_classes=[0])
  (tmp_path / "truth.json").write_text(json.dumps(truth))
  dropped = [dict(path="e.png", reason="duplicate", kept="a.png"),  # true: an exact copy
             dict(path="c.png", reason="duplicate", kept="g.png"),  # true: the original dropped, its copy kept
             dict(path="d.png", reason="duplicate", kept="g.png"),  # false, between pixel twins
             dict(path="b.png", reason="duplicate", kept="a.png")]  # false, between distinct items
  (tmp_path / "dropped.jsonl").write_text("\n".join(map(json.dumps, dropped)))
  (tmp_path / "retrieved.jsonl").write_text("")
  scores = demo.score(str(tmp_path / "truth.json"), str(tmp_path), str)
  assert scores["dedup_precision"] == 0.5 and scores["dedup_recall"] == 2 / 3
  assert scores["dedup_recall_by_transform"] == {"exact": 1.0, "cropped": 0.0}
  assert scores["false_duplicates"] == 2 and scores["false_duplicates_of_pixel_twins"] == 1


@pytest.fixture(scope="module")
def backbone_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("backbone")
  trainer.train(tiny(steps=1), str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def curated(tmp_path_factory, backbone_run, mesh):
  root = tmp_path_factory.mktemp("curate")
  cfg = curate_fashion_mnist.get_config("tiny")
  cfg.demo_dir = str(root / "pool")
  cfg.backbone = backbone_run
  # A network one step from DINO's initialization embeds different images at cosine 0.94 on
  # average: thresholds that only near-copies pass, so the pipeline's bookkeeping is what is tested.
  cfg.dedup.update(threshold=0.99999, eval_threshold=0.99999)
  out = root / "out"
  for stage in ("make_demo_pool", *curate.PIPELINE, "score_demo"):
    curate.STAGES[stage](cfg, out, mesh)
  return cfg, out


def test_pipeline_on_the_tiny_demo_pool(curated):
  cfg, out = curated
  truth = json.loads((pathlib.Path(cfg.demo_dir) / "ground_truth.json").read_text())
  corrupt = {n for n, t in truth["pool"].items() if t["kind"] == "corrupt"}
  unreadable = {pathlib.Path(p).name for p in (out / "embeddings/pool/unreadable.txt").read_text().split()}
  assert unreadable == corrupt and len(corrupt) == 3  # skipped, counted, listed
  assert len((out / "embeddings/pool/index.txt").read_text().split()) == len(truth["pool"]) - 3
  scores = json.loads((out / "scores.json").read_text())
  # Exact copies are at cosine 1: every dedup group holds them (and any other match >= 0.95).
  dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
  exact = {n: t for n, t in truth["pool"].items() if t.get("transform") == "exact"}
  dropped_names = {pathlib.Path(r["path"]).name: r for r in dropped}
  test_copies = [n for n, t in exact.items() if t["kind"] == "test_copy"]
  assert test_copies and all(dropped_names[n]["reason"] == "eval_copy" for n in test_copies)
  assert all(dropped_names[n]["matched"] == f"fashion_mnist_demo/test/{exact[n]['test_index']}" for n in test_copies)
  assert scores["dedup_recall"] > 0 and 0 <= scores["dedup_precision"] <= 1
  summary = json.loads((out / "summary.json").read_text())
  manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
  assert summary["manifest_images"] == len(manifest) == summary["seed_images"] + summary["retrieved"]
  assert summary["pool_images"] == len(truth["pool"]) - 3
  assert {r["source"] for r in manifest} == {"seeds", "pool"} and all(r["reason"] for r in manifest)
  pool_rows = [r for r in manifest if r["source"] == "pool"]
  assert not {pathlib.Path(r["path"]).name for r in pool_rows} & set(dropped_names)  # retrieved from kept images


def test_manifest_is_a_training_source(curated):
  cfg, out = curated
  spec = dict(source="manifest", path=str(out / "manifest.jsonl"), name="", data_dir="", image_size=20)
  source = data.make_source(ml_collections.ConfigDict(spec), "train")
  manifest = (out / "manifest.jsonl").read_text().splitlines()
  assert len(source) == len(manifest) and source.num_classes is None
  image, label = source.get(0)
  assert image.shape == (20, 20, 3) and label == -1


def test_cluster_retrieval_is_reproducible(curated, mesh, tmp_path):
  cfg, out = curated
  cfg = cfg.copy_and_resolve_references()
  cfg.retrieve.method = "clusters"
  for run in ("a", "b"):
    (tmp_path / run).mkdir()
    for name in ("embeddings", "kept.npy", "dropped.jsonl", "dedup.fingerprint.json"):
      (tmp_path / run / name).symlink_to(out / name)
    curate.run_retrieve(cfg, tmp_path / run, mesh)
  a, b = ((tmp_path / r / "retrieved.jsonl").read_text() for r in ("a", "b"))
  assert a == b and len(a.splitlines()) > 0
  assert all(json.loads(line)["reason"].startswith("sampled from a cluster") for line in a.splitlines())


def copy_of(out, tmp_path):
  """A copy of the curated workdir, for a test that changes it."""
  return pathlib.Path(shutil.copytree(out, tmp_path / "out"))


def test_embed_resumed_with_another_shard_size_holds_every_image_once(curated, mesh, tmp_path):
  cfg, out = curated
  work = copy_of(out, tmp_path)
  pool = work / "embeddings" / "pool"
  before = curate.load_embeddings(work, "pool")
  first, middle, last = sorted(pool.glob("shard_*.npz"))  # 161 files, 64 a shard
  middle.unlink()  # as if interrupted: a shard missing, the index not written, a shard half-written
  (pool / "index.txt").unlink()
  (pool / "shard.tmp.npz").write_bytes(b"half")
  mtimes = [f.stat().st_mtime_ns for f in (first, last)]
  cfg = cfg.copy_and_resolve_references()
  cfg.embed.shard_size = 32
  curate.run_embed(cfg, work, mesh)
  after = curate.load_embeddings(work, "pool")
  assert after[1] == before[1] == (pool / "index.txt").read_text().split()
  np.testing.assert_allclose(after[0], before[0], atol=1e-5)
  assert [f.stat().st_mtime_ns for f in (first, last)] == mtimes  # kept, not recomputed
  assert sorted(f.name for f in pool.glob("shard_*.npz")) == [
      first.name, "shard_0000000064_0000000096.npz", "shard_0000000096_0000000128.npz", last.name]
  # Shards that do not hold each image once (here one holding images 0-63 named as 100-163) are refused.
  (pool / "index.txt").unlink()
  shutil.copy(first, pool / "shard_0000000100_0000000164.npz")
  with pytest.raises(UsageError, match="do not hold each image of the set once: add --restart embed"):
    curate.run_embed(cfg, work, mesh)


def test_rerun_with_another_backbone_is_refused(curated, backbone_run, mesh, tmp_path):
  cfg, out = curated
  work = copy_of(out, tmp_path)
  other = shutil.copytree(backbone_run, tmp_path / "other_backbone")
  cfg = cfg.copy_and_resolve_references()
  cfg.backbone = str(other)
  changed = re.escape(f"(backbone {pathlib.Path(backbone_run).resolve()} -> {other.resolve()})")
  with pytest.raises(UsageError, match=f"^embed: the outputs in .* {changed}; add --restart embed "):
    curate.run_embed(cfg, work, mesh)
  (work / "embeddings" / "fingerprint.json").unlink()  # as an earlier version left them
  with pytest.raises(UsageError, match="without a fingerprint .*add --restart embed"):
    curate.run_embed(cfg, work, mesh)
  curate.run_stages(cfg, work, ["embed"], ["embed"], mesh)
  assert curate.read_fingerprint(work, "embed")["embed"]["backbone"] == str(other.resolve())
  assert not [f for f in ("dropped.jsonl", "kept.npy", "retrieved.jsonl", "summary.json", "scores.json",
                          "dedup.fingerprint.json") if (work / f).exists()]  # the stages after embed go too
  assert curate.load_embeddings(work, "pool")[1] == curate.load_embeddings(out, "pool")[1]


def test_restart_dedup_redoes_it_and_the_summary_describes_the_new_outputs(curated, mesh, tmp_path):
  cfg, out = curated
  work = copy_of(out, tmp_path)
  cfg = cfg.copy_and_resolve_references()
  cfg.dedup.threshold = 0.9
  before = (work / "summary.json").read_text()
  with pytest.raises(UsageError, match=r"^retrieve: .*\(dedup\.threshold 0\.99999 -> 0\.9\); add --restart dedup "):
    curate.run_stages(cfg, work, ["manifest"], [], mesh)  # the stages after dedup see it too
  with pytest.raises(UsageError, match="--restart dedup: dedup is not among the stages to run"):
    curate.run_stages(cfg, work, ["manifest"], ["dedup"], mesh)
  with pytest.raises(UsageError, match="--restart takes stages of embed, dedup, retrieve, manifest, not 'bench'"):
    curate.run_stages(cfg, work, ["bench"], ["bench"], mesh)
  assert (work / "summary.json").read_text() == before
  shards = {f: f.stat().st_mtime_ns for f in (work / "embeddings").rglob("*.npz")}
  curate.run_stages(cfg, work, list(curate.PIPELINE), ["dedup"], mesh)
  assert {f: f.stat().st_mtime_ns for f in (work / "embeddings").rglob("*.npz")} == shards
  summary = json.loads((work / "summary.json").read_text())
  dropped = (work / "dropped.jsonl").read_text().splitlines()
  duplicates = sum(json.loads(r)["reason"] == "duplicate" for r in dropped)
  assert summary["dedup_threshold"] == 0.9 and summary["dropped_duplicates"] == duplicates
  assert duplicates > json.loads(before)["dropped_duplicates"]
  assert summary["kept_after_dedup"] == summary["pool_images"] - len(dropped)
  assert summary["retrieved"] == len((work / "retrieved.jsonl").read_text().splitlines())
  assert summary["manifest_images"] == len((work / "manifest.jsonl").read_text().splitlines())
  assert curate.read_fingerprint(work, "manifest")["dedup"]["dedup.threshold"] == 0.9


def test_cli_rerun_with_another_threshold_is_one_line(curated, tmp_path):
  cfg, out = curated
  work = copy_of(out, tmp_path)
  summary = (work / "summary.json").read_text()
  env = device_env(2)
  proc = subprocess.run([sys.executable, "-m", "dino_jax.curate", "--config", "configs/curate_fashion_mnist.py:tiny",
                         "--workdir", str(work), f"--config.backbone={cfg.backbone}",
                         f"--config.demo_dir={cfg.demo_dir}", "--config.dedup.threshold=0.9",
                         "--config.dedup.eval_threshold=0.99999"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().splitlines() == [
      f"error: dedup: the outputs in {work} were made with other inputs or settings (dedup.threshold 0.99999 -> 0.9); "
      "add --restart dedup to redo dedup and the stages after it, or go back to the earlier ones"]
  assert "embed: kept" in proc.stdout and (work / "summary.json").read_text() == summary


def test_bad_input_is_one_clear_error(curated, mesh, tmp_path):
  cfg, out = curated
  with pytest.raises(UsageError, match="must be in \\[-1, 1\\]"):
    search.check_threshold("dedup.threshold", 1.5)
  with pytest.raises(UsageError, match="empty"):
    search.top_k_search(unit_rows(3, 4, 0), np.zeros((0, 4), np.float32), 2, mesh, 8)
  empty = cfg.copy_and_resolve_references()
  (tmp_path / "seeds_empty").mkdir()
  empty.seeds.path, empty.seeds.split = str(tmp_path), "seeds_empty"
  with pytest.raises(UsageError, match="has no images"):
    curate.open_source(empty.seeds, 20)
  (tmp_path / "work" / "embeddings" / "seeds").mkdir(parents=True)
  (tmp_path / "work" / "embeddings" / "seeds" / "index.txt").write_text("")
  for name in ("kept.npy", "dropped.jsonl", "dedup.fingerprint.json", "embeddings/fingerprint.json", "embeddings/pool"):
    (tmp_path / "work" / name).symlink_to(out / name)
  with pytest.raises(UsageError, match="seed set has no"):
    curate.run_retrieve(cfg, tmp_path / "work", mesh)


def test_cli_threshold_outside_the_range(curated, tmp_path):
  cfg, out = curated
  env = device_env(2)
  proc = subprocess.run([sys.executable, "-m", "dino_jax.curate", "--config", "configs/curate_fashion_mnist.py:tiny",
                         "--workdir", str(tmp_path), "--stages", "dedup", "--config.dedup.threshold=1.2"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == ["error: dedup.threshold 1.2 is a cosine similarity and must be in [-1, 1]"]


def test_bench_stage_times_search_and_kmeans(mesh, tmp_path):
  curate.run_bench(curate_fashion_mnist.get_config("tiny"), tmp_path, mesh)
  row = json.loads((tmp_path / "bench.jsonl").read_text())
  assert row["images"] == 256 and row["devices"] == 8 and row["search_s"] > 0 and row["kmeans_s"] > 0
