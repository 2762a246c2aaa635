"""Linear probe and the evaluate command on feature files."""
import subprocess
import sys

import numpy as np

from dino_jax.evaluators import probe
from tests.test_train import REPO


def blobs(n, dim=16, classes=4, spread=0.3, seed=0):
  """Gaussian blobs around fixed class centers; `seed` draws the samples."""
  centers = np.random.default_rng(123).normal(size=(classes, dim)) * 3
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, n)
  return (centers[y] + spread * rng.normal(size=(n, dim))).astype(np.float32), y


def test_linear_probe_separates_linearly_separable_features():
  x, y = blobs(600)
  tx, ty = blobs(200, seed=1)  # new samples of the same classes
  res = probe.linear_probe(x, y, tx, ty, 4, epochs=20, batch_size=64)
  assert res["test_top1"] >= 0.97
  assert res["best_lr"] in probe.LEARNING_RATES and len(res["val_top1"]) == len(probe.LEARNING_RATES)


def test_linear_probe_needs_a_linear_boundary():
  # XOR-like labels are not linearly separable: the probe stays near chance.
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (800, 2)).astype(np.float32)
  y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).astype(np.int32)
  res = probe.linear_probe(x[:600], y[:600], x[600:], y[600:], 2, epochs=20, batch_size=64)
  assert res["test_top1"] < 0.7


def test_evaluate_cli_knn_and_linear(tmp_path):
  x, y = blobs(300)
  np.savez(tmp_path / "train.npz", embedding=x, pooled=x, labels=y)
  np.savez(tmp_path / "test.npz", embedding=x[:50], pooled=x[:50], labels=y[:50])
  run = lambda *a: subprocess.run([sys.executable, "-m", "dino_jax.evaluate", *a, "--train", str(tmp_path / "train.npz"),
                                   "--test", str(tmp_path / "test.npz")], cwd=REPO, capture_output=True, text=True,
                                  timeout=300)
  knn = run("knn")
  assert knn.returncode == 0, knn.stderr[-2000:]
  assert [l.split(":")[0] for l in knn.stdout.splitlines()] == [
      f"k-NN top-1 (k={k}, T=0.07, embedding)" for k in (10, 20, 100, 200)]
  assert all(float(l.split()[-1]) == 1.0 for l in knn.stdout.splitlines()[:2])
  linear = run("linear", "--epochs", "5")
  assert linear.returncode == 0, linear.stderr[-2000:]
  assert float(linear.stdout.splitlines()[-1].split()[-1]) >= 0.95
  bad = run("pca")
  assert bad.returncode == 2 and bad.stderr.strip().startswith("error: usage")
