"""Losses of dino_jax.losses against plain numpy formulations."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from dino_jax import losses


def _np_log_softmax(x):
  x = x - x.max(axis=-1, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _np_softmax(x):
  return np.exp(_np_log_softmax(x))


def _np_sinkhorn(scores, temp, num_iters=3):
  """SwAV's algorithm (Caron et al. 2020, Alg. 1) on an [n, K] score matrix, in float64."""
  q = np.exp(scores.astype(np.float64) / temp).T  # [K, n]
  k, n = q.shape
  q = q / q.sum()
  for _ in range(num_iters):
    q = q / q.sum(axis=1, keepdims=True) / k  # every prototype gets mass 1/K
    q = q / q.sum(axis=0, keepdims=True) / n  # every sample gets mass 1/n
  return (q * n).T


def test_dino_loss_matches_numpy_pair_loop():
  rng = np.random.default_rng(0)
  b, t, s, k, temp = 3, 2, 5, 7, 0.1
  student = rng.normal(size=(b, s, k)).astype(np.float32)
  teacher = _np_softmax(rng.normal(size=(b, t, k)) / 0.04).astype(np.float32)
  total, pairs = 0.0, 0
  for ti in range(t):
    for si in range(s):
      if si == ti:
        continue
      ce = -(teacher[:, ti] * _np_log_softmax(student[:, si].astype(np.float64) / temp)).sum(-1)
      total += ce.mean()
      pairs += 1
  assert pairs == t * s - t
  expected = total / pairs
  got = losses.dino_loss(jnp.asarray(student), jnp.asarray(teacher), temp)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_dino_loss_with_only_global_views_pairs_them_crosswise():
  # S == T == 2: the loss is the mean of H(P_t0, P_s1) and H(P_t1, P_s0), nothing else.
  rng = np.random.default_rng(1)
  student = rng.normal(size=(2, 2, 5)).astype(np.float32)
  teacher = _np_softmax(rng.normal(size=(2, 2, 5))).astype(np.float32)
  ce = lambda ti, si: -(teacher[:, ti] * _np_log_softmax(student[:, si] / 0.1)).sum(-1).mean()
  expected = (ce(0, 1) + ce(1, 0)) / 2
  got = losses.dino_loss(jnp.asarray(student), jnp.asarray(teacher), 0.1)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_centered_softmax_matches_numpy():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(4, 6)).astype(np.float32)
  c = rng.normal(size=(1, 6)).astype(np.float32)
  temp = 0.07
  got = np.asarray(losses.centered_softmax(jnp.asarray(x), jnp.asarray(c), temp))
  np.testing.assert_allclose(got, _np_softmax((x - c).astype(np.float64) / temp), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-5)


def test_sinkhorn_matches_swav_numpy():
  rng = np.random.default_rng(3)
  n, k, temp = 6, 5, 0.5
  scores = rng.normal(size=(n, k)).astype(np.float32)
  got = np.asarray(losses.sinkhorn_knopp(jnp.asarray(scores), temp, num_iters=3))
  expected = _np_sinkhorn(scores, temp, 3)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
  # The last normalization is over samples: every row sums to 1 exactly.
  np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
  # Prototype sums approach n / K; after only 3 iterations they are not exact, but much
  # more balanced than the plain softmax targets of the same scores.
  plain = _np_softmax(scores.astype(np.float64) / temp)
  err_sinkhorn = np.abs(got.sum(axis=0) - n / k).max()
  err_plain = np.abs(plain.sum(axis=0) - n / k).max()
  assert err_sinkhorn < 0.5 * err_plain
  assert err_sinkhorn < 0.25 * n / k


def test_sinkhorn_balances_prototypes_with_more_iterations():
  rng = np.random.default_rng(4)
  n, k = 8, 4
  scores = rng.normal(size=(n, k)).astype(np.float32)
  got = np.asarray(losses.sinkhorn_knopp(jnp.asarray(scores), 1.0, num_iters=50))
  np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(got.sum(axis=0), n / k, rtol=1e-4)
  np.testing.assert_allclose(got, _np_sinkhorn(scores, 1.0, 50), rtol=1e-4, atol=1e-6)


def test_sinkhorn_weights_exclude_padding_rows():
  rng = np.random.default_rng(5)
  n, k, temp = 7, 5, 0.3
  scores = rng.normal(size=(n, k)).astype(np.float32)
  scores[[2, 5]] = rng.normal(size=(2, k)) * 3.0  # padding rows with arbitrary content
  weights = np.ones(n, np.float32)
  weights[[2, 5]] = 0.0
  got = np.asarray(losses.sinkhorn_knopp(jnp.asarray(scores), temp, weights=jnp.asarray(weights)))
  valid = weights > 0
  np.testing.assert_array_equal(got[~valid], 0.0)
  alone = np.asarray(losses.sinkhorn_knopp(jnp.asarray(scores[valid]), temp))
  np.testing.assert_allclose(got[valid], alone, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[valid], _np_sinkhorn(scores[valid], temp), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[valid].sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("high", [1.0, 0.2])
def test_sinkhorn_shifted_by_a_bound_is_unchanged(high):
  """Shifting by a bound on the scores instead of their maximum gives the same targets, also
  where the bound is far above every score (cosine scores in [-1, high], temperature 0.04)."""
  rng = np.random.default_rng(6)
  n, k, temp = 9, 40, 0.04
  scores = rng.uniform(-1.0, high, size=(n, k)).astype(np.float32)
  weights = np.ones(n, np.float32)
  weights[3] = 0.0
  got = np.asarray(losses.sinkhorn_knopp(jnp.asarray(scores), temp, weights=jnp.asarray(weights), max_logit=1.0))
  plain = np.asarray(losses.sinkhorn_knopp(jnp.asarray(scores), temp, weights=jnp.asarray(weights)))
  np.testing.assert_allclose(got, plain, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(got[weights > 0], _np_sinkhorn(scores[weights > 0], temp), rtol=1e-5, atol=1e-7)


def test_ibot_patch_loss_matches_numpy():
  rng = np.random.default_rng(6)
  m, k, temp, num_images = 6, 5, 0.1, 4
  student = rng.normal(size=(m, k)).astype(np.float32)
  teacher = _np_softmax(rng.normal(size=(m, k)) / 0.05).astype(np.float32)
  # Image 0 has 3 masked tokens, image 1 has 2, the last token is padding.
  weights = np.array([1 / 3, 1 / 3, 1 / 3, 1 / 2, 1 / 2, 0.0], np.float32)
  expected = 0.0
  for i in range(m):
    ce = -sum(teacher[i, j] * _np_log_softmax(student[i].astype(np.float64) / temp)[j] for j in range(k))
    expected += weights[i] * ce
  expected /= num_images
  got = losses.ibot_patch_loss(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(weights),
                               num_images, temp)
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_koleo_loss_matches_numpy():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(6, 4)).astype(np.float32) * rng.uniform(0.5, 3.0, size=(6, 1)).astype(np.float32)
  xn = x.astype(np.float64) / np.linalg.norm(x, axis=1, keepdims=True)
  logs = []
  for i in range(len(xn)):
    d = min(np.linalg.norm(xn[i] - xn[j]) for j in range(len(xn)) if j != i)
    logs.append(math.log(d))
  expected = -np.mean(logs)
  got = losses.koleo_loss(jnp.asarray(x))
  np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_koleo_loss_is_scale_invariant_per_row():
  rng = np.random.default_rng(8)
  x = rng.normal(size=(5, 3)).astype(np.float32)
  scaled = x * np.array([[1.0], [2.0], [0.5], [10.0], [3.0]], np.float32)
  np.testing.assert_allclose(float(losses.koleo_loss(jnp.asarray(x))),
                             float(losses.koleo_loss(jnp.asarray(scaled))), rtol=1e-5)


@pytest.mark.parametrize("k", [2, 7])
def test_entropy_of_uniform_rows_is_log_k(k):
  probs = jnp.full((3, k), 1.0 / k)
  np.testing.assert_allclose(float(losses.entropy(probs)), math.log(k), rtol=1e-6)


def test_kl_to_mean_is_zero_for_identical_rows():
  row = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
  probs = jnp.asarray(np.tile(row, (5, 1)))
  assert abs(float(losses.kl_to_mean(probs))) < 1e-6


def test_entropy_and_kl_on_hand_example():
  probs = jnp.array([[1.0, 0.0], [0.5, 0.5]])
  # Entropies: 0 and log 2.
  np.testing.assert_allclose(float(losses.entropy(probs)), math.log(2) / 2, rtol=1e-6)
  # Mean row = [0.75, 0.25]: KL(row0) = log(4/3), KL(row1) = 0.5 log(2/3) + 0.5 log 2.
  kl0 = math.log(1 / 0.75)
  kl1 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
  np.testing.assert_allclose(float(losses.kl_to_mean(probs)), (kl0 + kl1) / 2, rtol=1e-6)
