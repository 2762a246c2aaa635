"""Weighted k-NN classification (dino_jax.knn) on hand-built features."""
import math

import jax.numpy as jnp
import numpy as np

from dino_jax.evaluators import knn


def _unit(angle_deg):
  a = math.radians(angle_deg)
  return [math.cos(a), math.sin(a)]


def _np_knn(train, labels, test, num_classes, k, temperature):
  """Straightforward weighted vote: loops over test points and their k nearest."""
  train = train / np.linalg.norm(train, axis=1, keepdims=True)
  test = test / np.linalg.norm(test, axis=1, keepdims=True)
  preds = []
  for x in test:
    sims = [float(x @ t) for t in train]
    order = sorted(range(len(train)), key=lambda i: -sims[i])[:k]
    votes = [0.0] * num_classes
    for i in order:
      votes[labels[i]] += math.exp(sims[i] / temperature)
    preds.append(int(np.argmax(votes)))
  return np.array(preds)


def test_nearest_neighbours_known_classes():
  # Three well separated clusters on the circle; features of any scale.
  train = np.array([_unit(0), _unit(5), _unit(-5), _unit(120), _unit(125), _unit(115),
                    _unit(240), _unit(245), _unit(235)], np.float32)
  train *= np.array([[1], [2], [3], [0.5], [1], [4], [2], [1], [0.3]], np.float32)
  labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
  test = np.array([_unit(2), _unit(118), _unit(238), _unit(-3)], np.float32) * 5
  pred = knn.knn_predict(jnp.asarray(train), jnp.asarray(labels), jnp.asarray(test),
                         num_classes=3, k=3, temperature=0.07)
  np.testing.assert_array_equal(pred, [0, 1, 2, 0])
  assert knn.knn_accuracy(train, labels, test, np.array([0, 1, 2, 0]), 3, k=3) == 1.0
  assert knn.knn_accuracy(train, labels, test, np.array([0, 1, 2, 1]), 3, k=3) == 0.75


def test_weighting_changes_majority_vote():
  # Test point at angle 0. Class 0: one neighbour at cos = 1.0. Class 1: two neighbours
  # at cos(25 deg) ~ 0.906. Plain counting (or a large temperature) votes class 1; with
  # T = 0.07, exp(1 / T) > 2 exp(0.906 / T) and class 0 wins.
  train = np.array([_unit(0), _unit(25), _unit(-25), _unit(180)], np.float32)
  labels = np.array([0, 1, 1, 2])
  test = np.array([_unit(0)], np.float32)
  args = (jnp.asarray(train), jnp.asarray(labels), jnp.asarray(test))
  sharp = knn.knn_predict(*args, num_classes=3, k=3, temperature=0.07)
  flat = knn.knn_predict(*args, num_classes=3, k=3, temperature=100.0)
  assert int(sharp[0]) == 0
  assert int(flat[0]) == 1
  # Check the margins of the hand computation, so the example really tests the weighting.
  c = math.cos(math.radians(25))
  assert math.exp(1 / 0.07) > 2 * math.exp(c / 0.07)
  assert math.exp(1 / 100) < 2 * math.exp(c / 100)
  # Only the k nearest vote: with k = 1 class 0 wins at any temperature.
  assert int(knn.knn_predict(*args, num_classes=3, k=1, temperature=100.0)[0]) == 0


def test_matches_numpy_reference_and_chunking():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(4, 6))
  labels = rng.integers(0, 4, size=40)
  train = (centers[labels] + 0.8 * rng.normal(size=(40, 6))).astype(np.float32)
  test_labels = rng.integers(0, 4, size=15)
  test = (centers[test_labels] + 0.8 * rng.normal(size=(15, 6))).astype(np.float32)
  ref = _np_knn(train.astype(np.float64), labels, test.astype(np.float64), 4, 5, 0.5)
  pred = knn.knn_predict(jnp.asarray(train), jnp.asarray(labels), jnp.asarray(test),
                         num_classes=4, k=5, temperature=0.5)
  np.testing.assert_array_equal(pred, ref)
  acc = float(np.mean(ref == test_labels))
  assert knn.knn_accuracy(train, labels, test, test_labels, 4, k=5, temperature=0.5, chunk=4) == acc
  assert knn.knn_accuracy(train, labels, test, test_labels, 4, k=5, temperature=0.5) == acc


def test_k_larger_than_train_set_is_clipped():
  train = np.array([_unit(0), _unit(90)], np.float32)
  labels = np.array([0, 1])
  test = np.array([_unit(10), _unit(80)], np.float32)
  assert knn.knn_accuracy(train, labels, test, np.array([0, 1]), 2, k=20) == 1.0
