"""The k-NN evaluator: weighted k-NN classification on frozen features (Wu et al. 2018; DINO Sec. 4.1).

Features are l2-normalized; each of the k nearest training features (cosine similarity
s_i) votes for its class with weight exp(s_i / T). DINO's `eval_knn.py` reports k = 10, 20,
100 and 200 with T = 0.07 (k = 20 in the paper's tables): `knn_accuracies` scores every k of
a list from one search for the max(k) nearest neighbours. `KnnEvaluator` runs it on the
teacher's embedding of the training data's splits during and after training.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dino_jax import models
from dino_jax import sharding
from dino_jax import validate
from dino_jax.errors import UsageError
from dino_jax.evaluators import common
from dino_jax.evaluators import probe
from dino_jax.models import layers

DINO_KS = (10, 20, 100, 200)


@jax.jit(static_argnames=("num_classes", "ks"))
def knn_predict_ks(train_features, train_labels, test_features, *, num_classes, ks, temperature):
  """Class predictions [len(ks), n_test] of the weighted vote of the k nearest neighbours,
  for each k of `ks`: one top-max(ks) search, each k voting with its first k."""
  sim = layers.l2_normalize(test_features) @ layers.l2_normalize(train_features).T
  top_sim, top_idx = jax.lax.top_k(sim, max(ks))
  weights, labels = jnp.exp(top_sim / temperature), train_labels[top_idx]
  rows = jnp.arange(sim.shape[0])[:, None]
  preds = []
  for k in ks:  # scatter-add of the votes: [n, C] per k, not [n, k, C]
    votes = jnp.zeros((sim.shape[0], num_classes), weights.dtype).at[rows, labels[:, :k]].add(weights[:, :k])
    preds.append(jnp.argmax(votes, axis=-1))
  return jnp.stack(preds)


def knn_predict(train_features, train_labels, test_features, *, num_classes, k, temperature):
  """Class predictions [n_test] of the weighted k-NN vote."""
  return knn_predict_ks(train_features, train_labels, test_features, num_classes=num_classes, ks=(k,),
                        temperature=temperature)[0]


def as_ks(k) -> tuple[int, ...]:
  """`evals.knn.k` as a tuple: a list of k, or one int (configs and runs before the list)."""
  return tuple(int(v) for v in k) if isinstance(k, (list, tuple)) else (int(k),)


def knn_accuracies(train_features, train_labels, test_features, test_labels, num_classes,
                   ks=DINO_KS, temperature=0.07, chunk=1024) -> dict[int, float]:
  """Top-1 accuracy of the weighted k-NN vote for each k of `ks` ({k: accuracy}), over test
  chunks to bound memory; a k above the memory size votes with all of it."""
  ks = as_ks(ks)
  used = tuple(sorted({min(k, len(train_labels)) for k in ks}))
  train_features, train_labels = jnp.asarray(train_features, jnp.float32), jnp.asarray(train_labels)
  correct = np.zeros(len(used), np.int64)
  for i in range(0, len(test_features), chunk):
    pred = knn_predict_ks(train_features, train_labels, jnp.asarray(test_features[i:i + chunk], jnp.float32),
                          num_classes=num_classes, ks=used, temperature=temperature)
    correct += np.sum(np.asarray(pred) == np.asarray(test_labels[i:i + chunk])[None], axis=1)
  by_used = dict(zip(used, correct / len(test_features)))
  return {k: float(by_used[min(k, len(train_labels))]) for k in ks}


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes,
                 k=20, temperature=0.07, chunk=1024) -> float:
  """Top-1 accuracy of the weighted k-NN vote with one k."""
  return knn_accuracies(train_features, train_labels, test_features, test_labels, num_classes, (k,),
                        temperature, chunk)[k]


def main_k(ks: tuple[int, ...]) -> int:
  """The k that `knn_top1` reports: 20 (DINO's tables) when among them, else the first."""
  return 20 if 20 in ks else ks[0]


class KnnEvaluator:
  """DINO's weighted k-NN (each k of `k`, T) and optionally the fast linear probe on frozen
  embeddings (`probe.linear_probe`, the online monitor), train split as memory, test split as
  queries. Metrics: `knn_top1` (k = 20, or the only / first k), with several k also
  `knn_top1_k<k>` for each; `linear_top1` with `linear_probe`."""
  needs_labels = True  # scores classification of the training data's classes
  shards_batches = True  # evals.<name>.batch_size is split over the devices
  default_configs = {
      "knn": dict(type="knn", every_steps=0, every_epochs=0.0, k=DINO_KS, temperature=0.07, batch_size=256,
                  baselines=False, linear_probe=False, linear_epochs=100, train_split="train",
                  test_split="validation"),
  }

  def __init__(self, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, mesh):
    self.ecfg = ecfg
    self.memory, self.queries = common.train_and_test_sources(cfg, ecfg)
    self.features = common.make_feature_fn(models.make_backbone(cfg.model), cfg.aug.global_size, mesh)
    self.batch_sharding = sharding.batch_sharding(mesh)

  def run(self, params) -> dict[str, float]:
    e = self.ecfg
    train_f, train_y = common.labelled(*common.extract_features(self.features, params, self.memory, e.batch_size,
                                                                self.batch_sharding))
    test_f, test_y = common.labelled(*common.extract_features(self.features, params, self.queries, e.batch_size,
                                                              self.batch_sharding))
    ks = as_ks(e.k)
    acc = knn_accuracies(train_f, train_y, test_f, test_y, self.memory.num_classes, ks, e.temperature)
    out = {"knn_top1": acc[main_k(ks)]}
    if len(ks) > 1:
      out.update({f"knn_top1_k{k}": a for k, a in acc.items()})
    if e.linear_probe:
      out["linear_top1"] = probe.linear_probe(train_f, train_y, test_f, test_y, self.memory.num_classes,
                                              epochs=e.linear_epochs)["test_top1"]
    return out

  @staticmethod
  def describe(ecfg: ml_collections.ConfigDict) -> str:
    ks = as_ks(ecfg.k)
    others = [k for k in ks if k != main_k(ks)]
    return (f"top-1 on {ecfg.test_split} (k-NN: k={main_k(ks)}"
            + (f" (also {', '.join(map(str, others))})" if others else "") + f", T={ecfg.temperature})")

  @staticmethod
  def check(name: str, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, enabled: bool) -> None:
    del cfg, enabled
    k = ecfg.k
    values = list(k) if isinstance(k, (list, tuple)) else [k]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
      raise UsageError(f"evals.{name}.k must be a positive int or a list of them (DINO: 10, 20, 100, 200), not {k!r}")
    validate.positive_number(ecfg, "temperature", prefix=f"evals.{name}.")
