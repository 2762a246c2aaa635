"""Evaluators plugged from the config, run on the teacher during training and at its end.

`config.evals` maps a name to an evaluator config whose `type` picks the class here (as
big_vision's `config.evals`); `every_steps` says when it runs: N > 0 every N steps and at the
end, 0 only at the end of the run, -1 never. An evaluator turns backbone parameters into a dict
of metrics; `baselines=True` also scores the same network at random initialization and raw
pixels at the end, next to the trained teacher.

  knn  DINO's weighted k-NN top-1 (train split as memory, test split as queries) and, with
       `linear_probe`, a linear probe, on the global embedding of the evaluation view.

Features are sharded over the mesh, each process decoding its slice of every batch; k-NN and
the probe then run on the host (`dino_jax.knn`, `dino_jax.probe`).
"""
import functools
from typing import Callable

import jax
import ml_collections
import numpy as np

from dino_jax import augment
from dino_jax import data
from dino_jax import knn
from dino_jax import models
from dino_jax import probe
from dino_jax import sharding
from dino_jax.errors import UsageError

EVALUATED = {"teacher": "trained teacher", "random_init": "random init", "raw_pixels": "raw pixels"}


def make_feature_fn(backbone, image_size: int, mesh) -> Callable:
  """Jitted (params, uint8 images, labels) -> (features, labels), replicated to every process.

  Features are the backbone's global embedding on the evaluation view, or, with params None,
  the raw pixels (the baseline a learned representation should beat).
  """
  replicated = sharding.replicated(mesh)

  @functools.partial(jax.jit, out_shardings=(replicated, replicated))
  def features(params, images, labels):
    if params is None:
      return images.reshape(images.shape[0], -1).astype(np.float32) / 255.0, labels
    x = augment.preprocess_eval(images, image_size)
    return backbone.apply({"params": params}, x)["embedding"], labels

  return features


def extract_features(feature_fn, params, source, batch_size: int, batch_sharding) -> tuple[np.ndarray, np.ndarray]:
  """Features and labels of every image of `source`; each process decodes its slice of
  every batch (the last batch is padded with image 0 and the padding dropped)."""
  local = batch_size // jax.process_count()
  start = jax.process_index() * local
  to_global = lambda x: jax.make_array_from_process_local_data(batch_sharding, x)
  feats, labels = [], []
  for i in range(0, len(source), batch_size):
    index = np.arange(i, i + batch_size)
    valid = index < len(source)
    images, lab = data.read_batch(source, np.where(valid, index, 0)[start:start + local])
    f, lab = feature_fn(params, to_global(images), to_global(lab))
    feats.append(np.asarray(f)[valid])
    labels.append(np.asarray(lab)[valid])
  return np.concatenate(feats), np.concatenate(labels)


def labelled(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The rows with a class (label >= 0; images outside any class folder have -1)."""
  keep = labels >= 0
  return features[keep], labels[keep]


class KnnEvaluator:
  """DINO's weighted k-NN (k, T) and optionally the linear probe on frozen embeddings."""

  def __init__(self, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, mesh):
    self.ecfg = ecfg
    self.memory = data.make_source(cfg.data, ecfg.train_split)
    # Queries use the memory's class ids (a folder split numbers classes by the training split's list).
    self.queries = data.make_source(cfg.data, ecfg.test_split, classes=getattr(self.memory, "classes", None))
    for split, source in ((ecfg.train_split, self.memory), (ecfg.test_split, self.queries)):
      if hasattr(source, "labels") and not (np.asarray(source.labels) >= 0).any():
        raise UsageError(f"evals: split {split!r} has no image in a class folder, so nothing to score")
    self.features = make_feature_fn(models.make_backbone(cfg.model), cfg.aug.global_size, mesh)
    self.batch_sharding = sharding.batch_sharding(mesh)

  def run(self, params) -> dict[str, float]:
    e = self.ecfg
    train_f, train_y = labelled(*extract_features(self.features, params, self.memory, e.batch_size,
                                                  self.batch_sharding))
    test_f, test_y = labelled(*extract_features(self.features, params, self.queries, e.batch_size,
                                                self.batch_sharding))
    out = {"knn_top1": knn.knn_accuracy(train_f, train_y, test_f, test_y, self.memory.num_classes, e.k,
                                        e.temperature)}
    if e.linear_probe:
      out["linear_top1"] = probe.linear_probe(train_f, train_y, test_f, test_y, self.memory.num_classes,
                                              epochs=e.linear_epochs)["test_top1"]
    return out

  @staticmethod
  def describe(ecfg: ml_collections.ConfigDict) -> str:
    return f"top-1 on {ecfg.test_split} (k-NN: k={ecfg.k}, T={ecfg.temperature})"


EVALUATORS = {"knn": KnnEvaluator}


def check(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
  """One UsageError for an evaluator config that cannot run."""
  for name, ecfg in cfg.evals.items():
    if ecfg.type not in EVALUATORS:
      raise UsageError(f"evals.{name}.type must be one of {', '.join(EVALUATORS)}, not {ecfg.type!r}")
    if ecfg.batch_size % num_devices:
      raise UsageError(f"evals.{name}.batch_size {ecfg.batch_size} is not divisible by the {num_devices} devices")


def make(cfg: ml_collections.ConfigDict, mesh, labelled: bool) -> dict:
  """The config's evaluators that will run (every_steps >= 0), by name; none when the
  training data has no labels (`labelled` False), since they score classification."""
  if not labelled:
    return {}
  return {name: EVALUATORS[e.type](e, cfg, mesh) for name, e in cfg.evals.items() if e.every_steps >= 0}
