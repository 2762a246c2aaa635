"""The papers' evaluation protocols (dino_jax.knn, dino_jax.probe, dino_jax.evaluators) against
references computed here: a brute-force numpy k-NN vote, the linear inputs rebuilt from each
block's captured output, torch-style SGD; then tiny end-to-end runs on Fashion-MNIST images."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image
import pytest

from configs import esvit_swin_t
from dino_jax import crops
from dino_jax import data
from dino_jax import evaluate
from dino_jax import evaluators
from dino_jax import learner
from dino_jax import models
from dino_jax import sharding
from dino_jax import trainer
from dino_jax.errors import UsageError
from dino_jax.evaluators import knn
from dino_jax.evaluators import probe
from tests.test_train import REPO, tiny


def numpy_knn(train_x, train_y, test_x, num_classes, k, temperature):
  """DINO's weighted vote, one query at a time in float64: cosine similarity to every
  training feature, the k largest, each voting exp(s / T) for its class."""
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  train_x, test_x = unit(train_x.astype(np.float64)), unit(test_x.astype(np.float64))
  preds = []
  for q in test_x:
    sim = train_x @ q
    nearest = np.argsort(-sim, kind="stable")[:k]
    votes = np.zeros(num_classes)
    for i in nearest:
      votes[train_y[i]] += np.exp(sim[i] / temperature)
    preds.append(int(np.argmax(votes)))
  return np.array(preds)


def clustered(n, dim=12, classes=5, spread=1.5, seed=0):
  """Overlapping gaussian clusters: k matters, and votes are not unanimous."""
  centers = np.random.default_rng(7).normal(size=(classes, dim))
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, n)
  return (centers[y] + spread * rng.normal(size=(n, dim))).astype(np.float32), y.astype(np.int32)


def test_knn_for_several_k_matches_a_brute_force_vote():
  train_x, train_y = clustered(300)
  test_x, test_y = clustered(80, seed=1)
  ks = (1, 5, 10, 20, 100, 200, 500)  # 500 > the 300 training features: all of them vote
  preds = knn.knn_predict_ks(jnp.asarray(train_x), jnp.asarray(train_y), jnp.asarray(test_x), num_classes=5,
                             ks=ks[:-1], temperature=0.07)
  for k, pred in zip(ks, preds):
    np.testing.assert_array_equal(np.asarray(pred), numpy_knn(train_x, train_y, test_x, 5, k, 0.07), err_msg=f"k={k}")
  acc = knn.knn_accuracies(train_x, train_y, test_x, test_y, 5, ks, 0.07, chunk=32)
  assert list(acc) == list(ks)
  for k in ks:
    assert acc[k] == np.mean(numpy_knn(train_x, train_y, test_x, 5, min(k, 300), 0.07) == test_y), k
  assert len(set(acc.values())) > 2  # the k differ: a real test of each vote
  assert knn.knn_accuracy(train_x, train_y, test_x, test_y, 5, 20) == acc[20]


def small_sources(n_train=320, n_test=160, size=20):
  """Fashion-MNIST demo images (the first of each split), as in-memory sources."""
  sources = {"train": data.fashion_mnist_demo("train", size), "test": data.fashion_mnist_demo("test", size)}
  return {"train": data.ArraySource(sources["train"].images[:n_train, ..., 0], sources["train"].labels[:n_train], size),
          "test": data.ArraySource(sources["test"].images[:n_test, ..., 0], sources["test"].labels[:n_test], size)}


@pytest.fixture
def small_data(monkeypatch):
  """Evaluators read a few hundred demo images instead of the 10k / 2k splits (any split but
  "train" is the test images)."""
  sources = small_sources()
  monkeypatch.setattr(evaluators.common.data, "make_source",
                      lambda cfg, split, classes=None, **kw: sources["train" if split == "train" else "test"])
  return sources


def test_knn_evaluator_reports_every_k_and_keeps_knn_top1_at_k20(small_data):
  cfg = tiny(**{"evals.knn.k": (10, 20, 100, 200)})
  evaluator = evaluators.knn.KnnEvaluator(cfg.evals.knn, cfg, sharding.make_mesh(cfg))
  scores = evaluator.run(None)  # raw pixels: features the reference can recompute
  pixels = lambda s: s.images.reshape(len(s), -1).astype(np.float32) / 255
  train_s, test_s = small_data["train"], small_data["test"]
  for k in (10, 20, 100, 200):
    ref = np.mean(numpy_knn(pixels(train_s), train_s.labels, pixels(test_s), 10, k, 0.07) == test_s.labels)
    assert scores[f"knn_top1_k{k}"] == pytest.approx(ref), k
  assert scores["knn_top1"] == scores["knn_top1_k20"]
  assert set(scores) == {"knn_top1", "knn_top1_k10", "knn_top1_k20", "knn_top1_k100", "knn_top1_k200"}
  # A single int (configs and runs from before the list): knn_top1 alone, for that k.
  old_cfg = ml_collections.ConfigDict(cfg.evals.knn.to_dict() | {"k": 10})
  evaluators.check_one("knn", old_cfg, cfg, 8)
  old = evaluators.knn.KnnEvaluator(old_cfg, cfg, sharding.make_mesh(cfg)).run(None)
  assert old == {"knn_top1": scores["knn_top1_k10"]}
  assert evaluators.knn.KnnEvaluator.describe(old_cfg) == "top-1 on test (k-NN: k=10, T=0.07)"
  assert evaluators.knn.KnnEvaluator.describe(cfg.evals.knn) == "top-1 on test (k-NN: k=20 (also 10, 100, 200), T=0.07)"


def vit_cfg(**overrides):
  """A tiny ViT with registers (they must stay out of the patch-token average)."""
  return tiny(**{"model.depth": 5, "model.num_registers": 2, "aug.global_size": 16, **overrides})


def manual_inputs(cfg, params, x, variants):
  """Each variant's input rebuilt in numpy from the blocks' captured outputs: the final
  LayerNorm (eps 1e-6) applied by hand, CLS = token 0, patch tokens after the registers."""
  backbone = models.make_backbone(cfg.model)
  _, state = backbone.apply({"params": params}, x, capture_intermediates=True, mutable=["intermediates"])
  blocks = [np.asarray(state["intermediates"][f"block{i}"]["__call__"][0], np.float64) for i in range(cfg.model.depth)]
  scale, bias = (np.asarray(params["norm"][k], np.float64) for k in ("scale", "bias"))

  def norm(t):
    mu = t.mean(-1, keepdims=True)
    return (t - mu) / np.sqrt(((t - mu) ** 2).mean(-1, keepdims=True) + 1e-6) * scale + bias

  out = {}
  for n, avgpool in variants:
    parts = [norm(b)[:, 0] for b in blocks[-n:]]
    if avgpool:
      parts.append(norm(blocks[-1])[:, 1 + cfg.model.num_registers:].mean(1))
    out[f"last{n}" + ("_avgpool" if avgpool else "")] = np.concatenate(parts, -1)
  return out


def built_inputs(evaluator, params, images):
  x = (images.astype(np.float32) / 255 - 0.45) / 0.25
  return {k: np.asarray(v) for k, v in evaluator.features(params, jnp.asarray(x)).items()}, x


def test_dino_protocol_input_is_last_4_cls_then_average_patch_token(small_data):
  cfg = vit_cfg(**{"evals.linear_dino.n_last_blocks": 4, "evals.linear_dino.avgpool_patchtokens": True,
                   "evals.linear_dino.batch_size": 16})
  mesh = sharding.make_mesh(cfg)
  params = learner.build(cfg, mesh, 10).state["params"]["backbone"]
  evaluator = evaluators.linear.LinearEvaluator(cfg.evals.linear_dino, cfg, mesh)
  assert [v.name for v in evaluator.variants] == ["last4_avgpool"]
  images = small_data["train"].images[:16, 2:18, 2:18]
  got, x = built_inputs(evaluator, params, images)
  want = manual_inputs(cfg, params, x, [(4, True)])
  assert got["last4_avgpool"].shape == (16, 5 * 32)
  np.testing.assert_allclose(got["last4_avgpool"], want["last4_avgpool"], atol=2e-4, rtol=1e-4)
  # The last block's CLS through the final norm is the backbone's embedding.
  emb = models.make_backbone(cfg.model).apply({"params": params}, jnp.asarray(x))["embedding"]
  np.testing.assert_allclose(got["last4_avgpool"][:, 96:128], np.asarray(emb), atol=1e-5)


def test_dinov2_grid_inputs_and_swin_embedding(small_data):
  cfg = vit_cfg(**{"evals.linear_dinov2.batch_size": 16})
  mesh = sharding.make_mesh(cfg)
  params = learner.build(cfg, mesh, 10).state["params"]["backbone"]
  evaluator = evaluators.linear.LinearEvaluator(cfg.evals.linear_dinov2, cfg, mesh)
  grid = [(1, False), (1, True), (4, False), (4, True)]
  assert [v.name for v in evaluator.variants] == ["last1", "last1_avgpool", "last4", "last4_avgpool"]
  images = small_data["train"].images[:16, 2:18, 2:18]
  got, x = built_inputs(evaluator, params, images)
  want = manual_inputs(cfg, params, x, grid)
  assert {k: v.shape[1] for k, v in got.items()} == {"last1": 32, "last1_avgpool": 64, "last4": 128,
                                                     "last4_avgpool": 160}
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=2e-4, rtol=1e-4, err_msg=name)
  # Swin has no CLS token: its embedding (the pooled last stage) is the one input, whatever the grid.
  swin = tiny(esvit_swin_t, **{"evals.linear_dinov2.batch_size": 16})
  evaluators.check(swin, 8)
  swin_eval = evaluators.linear.LinearEvaluator(swin.evals.linear_dinov2, swin, mesh)
  swin_params = learner.build(swin, mesh, 10).state["params"]["backbone"]
  got, x = built_inputs(swin_eval, swin_params, images)
  emb = models.make_backbone(swin.model).apply({"params": swin_params}, jnp.asarray(x))["embedding"]
  assert list(got) == ["last1"]
  np.testing.assert_allclose(got["last1"], np.asarray(emb), atol=1e-5)


def test_classifier_updates_are_torch_sgd_per_learning_rate():
  rng = np.random.default_rng(0)
  feats = {name: jnp.asarray(rng.normal(size=(8, d)), jnp.float32) for name, d in (("a", 6), ("b", 3))}
  labels = jnp.asarray([0, 1, 2, 3, 0, 1, -1, 2])  # -1: an image outside any class, left out
  lrs = jnp.asarray([0.1, 0.5])
  params = probe.init_classifiers(jax.random.PRNGKey(0), {"a": 6, "b": 3}, 2, 4)
  momentum = jax.tree.map(jnp.zeros_like, params)
  ref = {(v, l): jax.tree.map(lambda p: p[l], params[v]) for v in "ab" for l in (0, 1)}
  txs = {(v, l): optax.sgd(float(lrs[l]), momentum=0.9) for v, l in ref}  # optax's trace = torch's buffer
  opt = {key: txs[key].init(p) for key, p in ref.items()}

  for _ in range(3):
    grads = jax.grad(probe.classifiers_loss)(params, feats, labels)
    params, momentum = probe.sgd_momentum(params, momentum, grads, lrs)
    for (v, l), p in ref.items():
      x = jnp.concatenate([feats[v][:6], feats[v][7:]])
      lab = jnp.concatenate([labels[:6], labels[7:]])
      g = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(x @ q["w"] + q["b"], lab).mean())(p)
      updates, opt[(v, l)] = txs[(v, l)].update(g, opt[(v, l)], p)
      ref[(v, l)] = optax.apply_updates(p, updates)
  for (v, l), p in ref.items():
    np.testing.assert_allclose(params[v]["w"][l], p["w"], atol=1e-6, err_msg=f"{v} lr {l}")
    np.testing.assert_allclose(params[v]["b"][l], p["b"], atol=1e-6, err_msg=f"{v} lr {l}")
  # Cosine to 0: DINO steps it once an epoch, DINOv2 every iteration.
  assert float(probe.cosine_factor(7, 5, 4, per_epoch=True)) == pytest.approx(0.5 * (1 + np.cos(np.pi / 4)))
  assert float(probe.cosine_factor(7, 5, 4, per_epoch=False)) == pytest.approx(0.5 * (1 + np.cos(np.pi * 7 / 20)))


def test_dinov2_grid_learns_fashion_mnist_well_above_chance(small_data, capsys):
  cfg = vit_cfg(**{"model.depth": 2, "evals.linear_dinov2.grid_blocks": (1, 2), "evals.linear_dinov2.epochs": 6,
                   "evals.linear_dinov2.epoch_length": 0, "evals.linear_dinov2.batch_size": 64,
                   "evals.linear_dinov2.learning_rates": (1e-3, 0.1, 1.0)})
  cfg.progress_bar = True
  mesh = sharding.make_mesh(cfg)
  params = learner.build(cfg, mesh, 10).state["params"]["backbone"]  # random init: still far above chance
  evaluator = evaluators.linear.LinearEvaluator(cfg.evals.linear_dinov2, cfg, mesh)
  assert evaluator.steps_per_epoch == 5  # 320 images, batches of 64
  scores = evaluator.run(params)
  cells = [f"linear_dinov2_top1_{v}_lr{lr}" for v in ("last1", "last1_avgpool", "last2", "last2_avgpool")
           for lr in ("0.001", "0.1", "1")]
  assert set(scores) == {"linear_dinov2_top1", *cells, *(f"linear_dinov2_top1_{v}" for v in
                                                         ("last1", "last1_avgpool", "last2", "last2_avgpool"))}
  assert scores["linear_dinov2_top1"] == max(scores[c] for c in cells)
  assert scores["linear_dinov2_top1"] > 0.3, scores  # 10 classes: chance is 0.1 (measured: 0.47)
  assert all(0 <= v <= 1 for v in scores.values())
  assert "linear_dinov2 (12 classifiers)" in capsys.readouterr().err  # the bar over the epochs
  assert evaluator.run(None) == {}  # raw pixels: no blocks


def test_linear_protocol_trains_on_host_crops_of_the_full_image(small_data):
  """Each training image is torchvision's RandomResizedCrop (scale 0.08-1; bilinear as DINO's
  eval_linear.py) of the full image plus a flip, drawn from (seed, step, position in the batch)
  as the training views: the first step's batch equals crops.views of the originals."""
  cfg = vit_cfg(**{"model.depth": 2, "evals.linear_dino.n_last_blocks": 2, "evals.linear_dino.epochs": 1,
                   "evals.linear_dino.epoch_length": 2, "evals.linear_dino.batch_size": 16,
                   "evals.linear_dino.learning_rates": (0.1,), "evals.linear_dino.seed": 3})
  mesh = sharding.make_mesh(cfg)
  evaluator = evaluators.linear.LinearEvaluator(cfg.evals.linear_dino, cfg, mesh)
  seen = []
  step_fn = evaluator.train_step
  evaluator.train_step = lambda *args: seen.append(jax.device_get(args[2:5])) or step_fn(*args)
  evaluator.train(learner.build(cfg, mesh, 10).state["params"]["backbone"])
  assert [int(s[2]) for s in seen] == [0, 1]
  src, seed = small_data["train"], cfg.seed + 3
  for step, (images, labels, _) in enumerate(seen):
    index = evaluator.train_index[data.batch_indices(len(evaluator.train_index), 16, step, seed)]
    spec = crops.CropSpec(16, (0.08, 1.0), Image.BILINEAR)
    want = [crops.views(data.as_pil(src.originals[i]), crops.view_rng(seed, step, position), [spec], data.to_rgb)[0]
            for position, i in enumerate(index)]
    np.testing.assert_array_equal(images, np.stack(want))
    np.testing.assert_array_equal(labels, src.labels[index])
  assert not np.array_equal(seen[0][0], seen[1][0])
  assert evaluators.linear.LinearEvaluator(cfg.evals.linear_dinov2, cfg, mesh).crop.resample == Image.BICUBIC


def test_bad_protocol_configs_are_one_usage_error():
  cases = [({"evals.linear_dino.protocol": "mae"}, "evals.linear_dino.protocol must be 'dino' or 'dinov2', not 'mae'"),
           ({"evals.linear_dino.every_steps": 0, "evals.linear_dino.n_last_blocks": 4},
            r"evals.linear_dino.n_last_blocks 4 asks for more blocks than the backbone's 2 \(model.depth\)"),
           ({"evals.linear_dinov2.every_steps": 0},
            r"evals.linear_dinov2.grid_blocks \(1, 4\) asks for more blocks than the backbone's 2"),
           ({"evals.linear_dino.learning_rates": ()}, "learning_rates must be a non-empty list"),
           ({"evals.linear_dino.epochs": 0}, "evals.linear_dino.epochs must be a positive integer, not 0"),
           ({"evals.knn.k": (20, 0)}, r"evals.knn.k must be a positive int or a list of them")]
  for overrides, message in cases:
    with pytest.raises(UsageError, match=message):
      evaluators.check(tiny(**overrides), 8)
  with pytest.raises(UsageError, match="--set takes key=value, not 'epochs'"):
    evaluate.parse_overrides(["epochs"])
  assert evaluate.parse_overrides(["epochs=2", "learning_rates=(0.01, 0.1)", "test_split=test"]) == {
      "epochs": 2, "learning_rates": (0.01, 0.1), "test_split": "test"}
  evaluators.check(tiny(), 8)  # the defaults: too many blocks for a tiny ViT, but off (every_steps -1)
  evaluators.check(tiny(**{"evals.linear_dino.every_steps": 0, "evals.linear_dino.n_last_blocks": 2}), 8)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A 3-step tiny run with the DINO protocol every 2 steps (and at the end); the evaluators
  score 160 test images. Returns (workdir, train's result, the test-split patch)."""
  sources = small_sources()
  make_source = data.make_source
  patched = lambda cfg, split, classes=None, **kw: (sources[split] if split == "test"
                                                   else make_source(cfg, split, classes, **kw))
  overrides = {"evals.linear_dino.every_steps": 2, "evals.linear_dino.n_last_blocks": 2,
               "evals.linear_dino.train_split": "train", "evals.linear_dino.test_split": "test",
               "evals.linear_dino.epochs": 1, "evals.linear_dino.epoch_length": 2, "evals.linear_dino.batch_size": 32,
               "evals.linear_dino.learning_rates": (0.01, 0.1)}
  workdir = tmp_path_factory.mktemp("eval_run") / "run"
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(evaluators.common.data, "make_source", patched)
    out = trainer.train(tiny(steps=3, **overrides), str(workdir))
  return workdir, out, patched


def test_linear_protocol_runs_periodically_in_training(trained_run):
  workdir, out, _ = trained_run
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  periodic = [r for r in rows if "linear_dino_top1" in r]
  assert [r["step"] for r in periodic] == [2]  # every 2 steps, before the end
  assert set(periodic[0]) >= {"linear_dino_top1", "linear_dino_top1_lr0.01", "linear_dino_top1_lr0.1"}
  assert 0 <= out["results"]["linear_dino_top1_teacher"] <= 1
  assert "linear_dino_top1_raw_pixels" not in out["results"]


def test_evaluate_run_on_a_saved_run(trained_run, monkeypatch, capsys):
  workdir, _, patched = trained_run
  monkeypatch.setattr(evaluators.common.data, "make_source", patched)
  # In-process, as `python -m dino_jax.evaluate run --evals linear_dino --set ...` does.
  results = evaluate.run_evaluators(str(workdir), ["linear_dino"], {"learning_rates": (0.1,), "epochs": 2})
  assert set(results["linear_dino"]) == {"linear_dino_top1", "linear_dino_top1_lr0.1"}
  captured = capsys.readouterr()
  assert "linear_dino (step 3): top-1 on test (linear, dino protocol: last 2 blocks' CLS" in captured.out
  assert "linear_dino (1 classifiers)" in captured.err  # the bar over its 2 epochs
  with pytest.raises(UsageError, match="--set: evals.linear_dino has no key lr"):
    evaluate.run_evaluators(str(workdir), ["linear_dino"], {"lr": 0.1})
  with pytest.raises(UsageError, match="--evals: no evaluator 'linear'"):
    evaluate.run_evaluators(str(workdir), ["linear"], {})
  # A bad protocol from the command line: one line, exit code 2, before any work.
  bad = subprocess.run([sys.executable, "-m", "dino_jax.evaluate", "run", "--workdir", str(workdir),
                        "--evals", "linear_dinov2", "--set", "protocol='mae'"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 2, bad.stderr[-2000:]
  assert bad.stderr.strip().splitlines() == [
      "error: evals.linear_dinov2.protocol must be 'dino' or 'dinov2', not 'mae'"]


def test_esvit_protocol_concatenates_the_last_blocks_pooled_tokens(small_data):
  """EsViT's eval_linear.py on a Swin: the average tokens of the last n blocks (counted across
  stages; only the last stage's through the final norm), concatenated."""
  swin = tiny(esvit_swin_t, **{"evals.linear_dino.batch_size": 16, "evals.linear_dino.n_last_blocks": 2,
                                "evals.linear_dino.every_steps": 0})
  evaluators.check(swin, 8)
  mesh = sharding.make_mesh(swin)
  evaluator = evaluators.linear.LinearEvaluator(swin.evals.linear_dino, swin, mesh)
  params = learner.build(swin, mesh, 10).state["params"]["backbone"]
  images = small_data["train"].images[:16, 2:18, 2:18]
  got, x = built_inputs(evaluator, params, images)
  out = models.make_backbone(swin.model).apply({"params": params}, jnp.asarray(x), layers=2)
  blocks = [np.asarray(b["patch"]) for b in out["intermediate"]]  # stage 0's block (16 wide), stage 1's (32)
  assert [b.shape[-1] for b in blocks] == [16, 32] and list(got) == ["last2"]
  np.testing.assert_allclose(got["last2"], np.concatenate([b.mean((1, 2)) for b in blocks], -1), atol=1e-5)
  np.testing.assert_allclose(got["last2"][:, 16:], np.asarray(out["embedding"]), atol=1e-5)  # the last: normed


def test_dino_protocol_trains_one_lr_and_reports_its_best_epoch(small_data, monkeypatch):
  """DINO's eval_linear.py: lr 0.001 (x batch / 256), the test split scored after every epoch
  (val_freq 1), the best epoch's top-1 reported; with val_every_epochs 0, the last epoch's."""
  defaults = evaluators.linear.LinearEvaluator.default_configs["linear_dino"]
  assert defaults["learning_rates"] == (1e-3,) and defaults["val_every_epochs"] == 1
  cfg = vit_cfg(**{"evals.linear_dino.batch_size": 16, "evals.linear_dino.epochs": 3,
                   "evals.linear_dino.epoch_length": 2, "evals.linear_dino.n_last_blocks": 1})
  mesh = sharding.make_mesh(cfg)
  params = learner.build(cfg, mesh, 10).state["params"]["backbone"]
  by_epoch = iter([0.3, 0.6, 0.5, 0.5])
  monkeypatch.setattr(evaluators.linear.LinearEvaluator, "score",
                      lambda self, state, params: {"last1": np.array([next(by_epoch)])})
  evaluator = evaluators.linear.LinearEvaluator(cfg.evals.linear_dino, cfg, mesh)
  assert evaluator.scaled_lrs == (1e-3 * 16 / 256,)
  assert evaluator.run(params) == {"linear_dino_top1": 0.6, "linear_dino_top1_lr0.001": 0.6}
  last = ml_collections.ConfigDict(cfg.evals.linear_dino.to_dict() | {"val_every_epochs": 0})
  by_epoch = iter([0.5])
  assert evaluators.linear.LinearEvaluator(last, cfg, mesh).run(params)["linear_dino_top1"] == 0.5
  assert "best epoch of 3" in evaluators.linear.LinearEvaluator.describe(cfg.evals.linear_dino)


@pytest.mark.parametrize("box", [(0, 0, 512, 600), (37, 10, 370, 511), (3, 50, 504, 396), (100, 100, 357, 357)])
def test_evaluation_view_is_torchvisions_resize_256_center_crop_224(box):
  """The k-NN and linear evaluation view: data.image_size 256 then augment.preprocess_eval(224)
  is torchvision's Resize(256, bicubic) + CenterCrop(224) on the PIL image, pixel for pixel (odd
  sizes included: the long side truncated, the crop offsets rounded as torchvision rounds)."""
  from torchvision import transforms  # pylint: disable=import-outside-toplevel
  from dino_jax import augment  # pylint: disable=import-outside-toplevel
  image = Image.fromarray(evaluators.common.sample_photos()[0]).crop(box)
  expected = np.asarray(transforms.Compose([transforms.Resize(256, transforms.InterpolationMode.BICUBIC),
                                            transforms.CenterCrop(224)])(image))
  ours = augment.preprocess_eval(data.to_square_rgb(image, 256)[None], 224)[0]
  np.testing.assert_allclose(np.asarray(ours), np.asarray(augment.normalize(expected)), atol=1e-6)
