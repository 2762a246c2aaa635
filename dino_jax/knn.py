"""Weighted k-NN classification on frozen features (Wu et al. 2018; DINO Sec. 4.1).

Features are l2-normalized; each of the k nearest training features (cosine similarity
s_i) votes for its class with weight exp(s_i / T). DINO's `eval_knn.py` reports k = 10, 20,
100 and 200 with T = 0.07 (k = 20 in the paper's tables): `knn_accuracies` scores every k of
a list from one search for the max(k) nearest neighbours.
"""
import jax
import jax.numpy as jnp
import numpy as np

DINO_KS = (10, 20, 100, 200)


def l2_normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@jax.jit(static_argnames=("num_classes", "ks"))
def knn_predict_ks(train_features, train_labels, test_features, *, num_classes, ks, temperature):
  """Class predictions [len(ks), n_test] of the weighted vote of the k nearest neighbours,
  for each k of `ks`: one top-max(ks) search, each k voting with its first k."""
  sim = l2_normalize(test_features) @ l2_normalize(train_features).T
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
