"""EsViT: the region-matching loss against a dense reference, and the Swin recipe through the
trainer (sharding, FSDP, resume, tools) at tiny sizes."""
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import demo_esvit_fashion_mnist
from configs import esvit_swin_t
from dino_jax import learner
from dino_jax import losses
from dino_jax import pictures
from dino_jax import runs
from dino_jax import sharding
from dino_jax import trainer
from dino_jax.errors import UsageError
from tests.test_train import REPO
from tests.test_train import TRAIN_STEPS_PER_EPOCH
from tests.test_train import assert_trees_close
from tests.test_train import one_step
from tests.test_train import tiny


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_region_loss(s_feats, s_logits, t_feats, t_probs, temp):
  """The official DDINOLoss region term, one (teacher view, student view) pair, image and
  region at a time: views are lists of [B, R, D] features and [B, R, K] logits / targets."""
  total, pairs = 0.0, 0
  for t in range(len(t_feats)):
    for v in range(len(s_feats)):
      if v == t:
        continue
      per_image = []
      for b in range(s_feats[v].shape[0]):
        sim = unit(s_feats[v][b]) @ unit(t_feats[t][b]).T  # [Rs, Rt]
        match = sim.argmax(axis=1)
        ce = -(t_probs[t][b][match] * log_softmax(s_logits[v][b] / temp)).sum(-1)
        per_image.append(ce.mean())
      total += np.mean(per_image)
      pairs += 1
  return total / pairs


def random_views(rng, b=3, n_global=2, n_local=3, r_global=9, r_local=4, d=8, k=12):
  f = lambda *s: rng.normal(size=s).astype(np.float32)
  probs = rng.dirichlet(np.ones(k), size=(b, n_global, r_global)).astype(np.float32)
  return dict(s_global=f(b, n_global, r_global, d), s_local=f(b, n_local, r_local, d),
              l_global=3 * f(b, n_global, r_global, k), l_local=3 * f(b, n_local, r_local, k),
              t_feats=f(b, n_global, r_global, d), t_probs=probs)


def test_region_loss_matches_dense_reference():
  v = random_views(np.random.default_rng(0))
  ours = losses.region_matching_loss([v["s_global"], v["s_local"]], [v["l_global"], v["l_local"]],
                                     v["t_feats"], v["t_probs"], 0.1)
  views = lambda g, l: [g[:, i] for i in range(g.shape[1])] + [l[:, i] for i in range(l.shape[1])]
  ref = reference_region_loss(views(v["s_global"], v["s_local"]), views(v["l_global"], v["l_local"]),
                              [v["t_feats"][:, i] for i in range(2)], [v["t_probs"][:, i] for i in range(2)], 0.1)
  np.testing.assert_allclose(float(ours), ref, rtol=1e-5)


def test_region_loss_follows_the_argmax_match():
  """Each student region learns the target of the teacher region with the same feature
  (up to scale): shuffling the teacher's regions together with their targets changes nothing,
  shuffling only the targets does."""
  rng = np.random.default_rng(1)
  v = random_views(rng, n_local=0, r_global=6)
  t_feats = v["s_global"][:, ::-1] * 2.0  # teacher view t holds student view 1 - t's features
  args = lambda tf, tp: ([v["s_global"]], [v["l_global"]], tf, tp, 0.1)
  base = float(losses.region_matching_loss(*args(t_feats, v["t_probs"])))
  perm = rng.permutation(6)
  same = float(losses.region_matching_loss(*args(t_feats[:, :, perm], v["t_probs"][:, :, perm])))
  other = float(losses.region_matching_loss(*args(t_feats, v["t_probs"][:, :, perm])))
  np.testing.assert_allclose(same, base, rtol=1e-6)
  assert abs(other - base) > 1e-3
  # With exact matches the loss is the cross-entropy with the matched region's own target.
  log_p = log_softmax(v["l_global"] / 0.1)
  expected = np.mean([-(v["t_probs"][:, t] * log_p[:, 1 - t]).sum(-1).mean() for t in range(2)])
  np.testing.assert_allclose(base, expected, rtol=1e-5)


def esvit_tiny(**overrides):
  return tiny(esvit_swin_t, **overrides)


def test_esvit_fsdp_step_equals_replicated_step():
  cfg = esvit_tiny(**{"mesh.fsdp": 4, "mesh.fsdp_min_size": 256})
  built = learner.build(cfg, sharding.make_mesh(cfg), TRAIN_STEPS_PER_EPOCH)
  split = [x for x in jax.tree.leaves(built.state["params"]["backbone"]) if "fsdp" in tuple(x.sharding.spec)]
  assert split, "no Swin parameter was split over the fsdp axis"
  sharded, m_fsdp = one_step(cfg, jax.devices(), steps=2)
  replicated, m_rep = one_step(esvit_tiny(), jax.devices()[:1], steps=2)
  assert_trees_close(sharded["params"], replicated["params"], atol=1e-5)
  np.testing.assert_allclose(m_fsdp["loss"], m_rep["loss"], rtol=1e-5)
  assert {"head", "region_head"} <= set(replicated["params"]) and "ibot_head" not in replicated["params"]
  assert float(np.abs(replicated["region_center"].value).sum()) > 0  # the region center moves


def test_esvit_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
  cfg = esvit_tiny(steps=4)
  cfg.checkpoint.every_steps = 2
  full = trainer.train(cfg, str(tmp_path / "full"))["state"]
  trainer.train(cfg, str(tmp_path / "resumed"), max_steps=2)
  resumed = trainer.train(cfg, str(tmp_path / "resumed"))["state"]
  assert int(resumed["step"]) == 4
  assert_trees_close(jax.device_get(resumed), jax.device_get(full), atol=1e-6)


@pytest.fixture(scope="module")
def swin_run(tmp_path_factory):
  """The demo EsViT config's `:tiny` trained for 3 steps through the CLI (with its k-NN)."""
  workdir = tmp_path_factory.mktemp("esvit")
  steps = 3
  result = subprocess.run(
      [sys.executable, "-m", "dino_jax.train", "--config", "configs/demo_esvit_fashion_mnist.py:tiny",
       "--workdir", str(workdir), f"--config.epochs={steps / TRAIN_STEPS_PER_EPOCH}",
       "--config.evals.knn.baselines=False", "--config.evals.knn.linear_probe=False"],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "trained teacher" in result.stdout
  return workdir


def test_swin_run_features_and_pictures(swin_run, tmp_path):
  backbone = runs.load_backbone(str(swin_run))
  cfg = demo_esvit_fashion_mnist.get_config("tiny")
  images = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3), np.uint8)
  feats = jax.device_get(backbone(images))
  embed_dim = cfg.model.width * 2 ** (len(cfg.model.depths) - 1)
  assert feats["embedding"].shape == (4, embed_dim) and feats["patch"].shape == (4, 4, 4, embed_dim)
  np.testing.assert_allclose(feats["embedding"], feats["patch"].mean(axis=(1, 2)), atol=1e-5)  # pooled, no CLS
  with pytest.raises(UsageError, match="no CLS token"):
    pictures.cls_attention(backbone, images)
  args = pictures.parse_args(["pca", "--workdir", str(swin_run), "--demo", "3", "--out", str(tmp_path)])
  assert [p.name for p in pictures.run(args)] == ["pca.png"]
  out = tmp_path / "feats.npz"
  result = subprocess.run([sys.executable, "-m", "dino_jax.extract", "--workdir", str(swin_run), "--split", "test",
                           "--batch_size", "200", "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with np.load(out) as f:
    assert f["embedding"].shape == (2000, embed_dim) and f["pooled"].shape == (2000, embed_dim)
