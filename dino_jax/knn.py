"""Weighted k-NN classification on frozen features (Wu et al. 2018; DINO Sec. 4.1).

Features are l2-normalized; each of the k nearest training features (cosine similarity
s_i) votes for its class with weight exp(s_i / T). DINO uses k=20, T=0.07.
"""
import jax
import jax.numpy as jnp
import numpy as np


def l2_normalize(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@jax.jit(static_argnames=("num_classes", "k"))
def knn_predict(train_features, train_labels, test_features, *, num_classes, k, temperature):
  """Class predictions [n_test] of the weighted k-NN vote."""
  sim = l2_normalize(test_features) @ l2_normalize(train_features).T
  top_sim, top_idx = jax.lax.top_k(sim, k)
  votes = jax.nn.one_hot(train_labels[top_idx], num_classes) * jnp.exp(top_sim / temperature)[..., None]
  return jnp.argmax(jnp.sum(votes, axis=1), axis=-1)


def knn_accuracy(train_features, train_labels, test_features, test_labels, num_classes,
                 k=20, temperature=0.07, chunk=1024) -> float:
  """Top-1 accuracy of the weighted k-NN vote, over test chunks to bound memory."""
  train_features, train_labels = jnp.asarray(train_features, jnp.float32), jnp.asarray(train_labels)
  correct = 0
  for i in range(0, len(test_features), chunk):
    pred = knn_predict(train_features, train_labels, jnp.asarray(test_features[i:i + chunk], jnp.float32),
                       num_classes=num_classes, k=min(k, len(train_labels)), temperature=temperature)
    correct += int(np.sum(np.asarray(pred) == np.asarray(test_labels[i:i + chunk])))
  return correct / len(test_features)
