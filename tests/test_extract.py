"""Backbone restore from a training checkpoint and feature extraction."""
import subprocess
import sys

import jax
import numpy as np
import pytest

from dino_jax import augment
from dino_jax import data
from dino_jax import models
from dino_jax import runs
from dino_jax import trainer
from dino_jax.errors import UsageError
from tests.test_train import REPO, device_env, tiny


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  state = trainer.train(tiny(steps=3), str(workdir))["state"]
  return workdir, jax.device_get(state)


def in_memory_cls(cfg, params, images, size=None):
  x = augment.normalize(images) if size is None else augment.preprocess_eval(images, size)
  return np.asarray(models.make_backbone(cfg.model).apply({"params": params}, x)["embedding"])


def test_restored_backbone_gives_the_in_memory_features(run):
  workdir, state = run
  images = data.fashion_mnist_demo("test", 16).get(np.arange(8))[0]
  teacher = runs.load_backbone(str(workdir))
  assert teacher.step == 3
  feats = jax.device_get(teacher(images))
  np.testing.assert_allclose(feats["embedding"], in_memory_cls(teacher.cfg, state["teacher"].value["backbone"], images),
                             atol=1e-5)
  assert feats["patch"].shape == (8, 4, 4, teacher.cfg.model.width)
  np.testing.assert_allclose(feats["pooled"], feats["patch"].mean(axis=(1, 2)), atol=1e-5)
  student = jax.device_get(runs.load_backbone(str(workdir), student=True)(images))
  np.testing.assert_allclose(student["embedding"], in_memory_cls(teacher.cfg, state["params"]["backbone"], images),
                             atol=1e-5)
  assert not np.allclose(student["embedding"], feats["embedding"])


def test_extract_cli_on_a_different_device_count(run, tmp_path):
  workdir, state = run  # saved from 8 devices; restored on 2
  env = device_env(2)
  out = tmp_path / "feats.npz"
  proc = subprocess.run([sys.executable, "-m", "dino_jax.extract", "--workdir", str(workdir), "--split", "test",
                         "--batch_size", "500", "--out", str(out)], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  feats = np.load(out)
  src = data.fashion_mnist_demo("test", 20)
  assert feats["embedding"].shape == (2000, 32) and feats["pooled"].shape == (2000, 32)
  np.testing.assert_array_equal(feats["labels"], src.labels)
  images = src.get(np.arange(5))[0]
  cfg = runs.load_backbone(str(workdir)).cfg
  np.testing.assert_allclose(feats["embedding"][:5], in_memory_cls(cfg, state["teacher"].value["backbone"], images,
                                                             cfg.aug.global_size), atol=1e-4)


def test_not_a_run_directory(tmp_path):
  with pytest.raises(UsageError, match="not a dino_jax run directory"):
    runs.load_backbone(str(tmp_path))
