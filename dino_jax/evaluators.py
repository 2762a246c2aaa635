"""Evaluation during training: weighted k-NN (and a linear probe) on the teacher's embeddings.

Features are computed on the evaluation view, sharded over the mesh, each process decoding its
slice of every batch; k-NN and the probe then run on the host (`dino_jax.knn`, `dino_jax.probe`).
"""
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dino_jax import augment
from dino_jax import data
from dino_jax import knn
from dino_jax import probe
from dino_jax import sharding


def make_feature_fn(backbone, cfg, mesh) -> Callable:
  """Jitted (params, uint8 images, labels) -> (features, labels), replicated to every process.

  Features are the backbone's global embedding on the evaluation view, or, with params None,
  the raw pixels (the baseline a learned representation should beat).
  """
  replicated = sharding.replicated(mesh)

  @functools.partial(jax.jit, out_shardings=(replicated, replicated))
  def features(params, images, labels):
    if params is None:
      return images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0, labels
    x = augment.preprocess_eval(images, cfg.aug.global_size)
    return backbone.apply({"params": params}, x)["embedding"], labels

  return features


def extract_features(feature_fn, params, source, batch_size: int, sharding) -> tuple[np.ndarray, np.ndarray]:
  """Features and labels of every image of `source`; each process decodes its slice of
  every batch (the last batch is padded with image 0 and the padding dropped)."""
  local = batch_size // jax.process_count()
  start = jax.process_index() * local
  to_global = lambda x: jax.make_array_from_process_local_data(sharding, x)
  feats, labels = [], []
  for i in range(0, len(source), batch_size):
    index = np.arange(i, i + batch_size)
    valid = index < len(source)
    images, lab = data.read_batch(source, np.where(valid, index, 0)[start:start + local])
    f, lab = feature_fn(params, to_global(images), to_global(lab))
    feats.append(np.asarray(f)[valid])
    labels.append(np.asarray(lab)[valid])
  return np.concatenate(feats), np.concatenate(labels)


def evaluate_features(feature_fn, params, sources, cfg, sharding) -> dict[str, float]:
  """DINO's weighted k-NN top-1 (train split as memory, test split as queries) and, with
  `eval.linear_probe`, the linear-probe top-1 on the same frozen features."""
  train_src, test_src = sources
  train_f, train_y = extract_features(feature_fn, params, train_src, cfg.eval.batch_size, sharding)
  test_f, test_y = extract_features(feature_fn, params, test_src, cfg.eval.batch_size, sharding)
  out = {"knn_top1": knn.knn_accuracy(train_f, train_y, test_f, test_y, train_src.num_classes,
                                      cfg.eval.knn_k, cfg.eval.knn_temperature)}
  if cfg.eval.linear_probe:
    out["linear_top1"] = probe.linear_probe(train_f, train_y, test_f, test_y, train_src.num_classes,
                                            epochs=cfg.eval.linear_epochs)["test_top1"]
  return out


EVALUATED = {"teacher": "trained teacher", "random_init": "random init", "raw_pixels": "raw pixels"}
