"""Multi-crop augmentation (dino_jax.augment) on tiny images."""
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import common
from dino_jax import augment
from dino_jax import defaults


def _aug_cfg():
  cfg = defaults.base_config()
  common.make_tiny(cfg)
  return cfg.aug


@functools.partial(jax.jit, static_argnums=2)
def _multicrop(key, images, cfg_items):
  """Jitted multicrop; the config travels as a hashable tuple of items."""
  return augment.multicrop(key, images, ml_collections.ConfigDict(dict(cfg_items)))


def _frozen(cfg):
  return tuple(sorted((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in cfg.items()))


@pytest.fixture(scope="module")
def batch():
  """Host-made crops (dino_jax.crops) of 2 images: 2 global 16 px and 2 local 8 px each."""
  rng = np.random.default_rng(0)
  return {"global": rng.integers(0, 256, size=(2, 2, 16, 16, 3), dtype=np.uint8),
          "local": rng.integers(0, 256, size=(2, 2, 8, 8, 3), dtype=np.uint8)}


@pytest.fixture(scope="module")
def views(batch):
  cfg = _frozen(_aug_cfg())
  return {seed: _multicrop(jax.random.key(seed), batch, cfg) for seed in (0, 1)} | {
      "again": _multicrop(jax.random.key(0), batch, cfg)}


def test_multicrop_shapes_and_dtypes(views):
  cfg = _aug_cfg()
  out = views[0]
  assert set(out) == {"global", "local"}
  assert out["global"].shape == (2, 2, cfg.global_size, cfg.global_size, 3) == (2, 2, 16, 16, 3)
  assert out["local"].shape == (2, cfg.num_local, cfg.local_size, cfg.local_size, 3) == (2, 2, 8, 8, 3)
  for v in out.values():
    assert v.dtype == jnp.float32
    v = np.asarray(v)
    assert np.all(np.isfinite(v))
    # Normalized [0, 1] pixels: within [(0 - mean) / std, (1 - mean) / std].
    lo = (0 - np.asarray(augment.IMAGENET_MEAN)) / np.asarray(augment.IMAGENET_STD)
    hi = (1 - np.asarray(augment.IMAGENET_MEAN)) / np.asarray(augment.IMAGENET_STD)
    assert np.all(v >= lo - 1e-4) and np.all(v <= hi + 1e-4)


def test_multicrop_same_key_same_views_different_key_different(views):
  for k in ("global", "local"):
    np.testing.assert_array_equal(views[0][k], views["again"][k])
    assert not np.allclose(views[0][k], views[1][k], atol=1e-3)
  # Views of one image differ from each other, and images are augmented independently.
  g = np.asarray(views[0]["global"])
  assert not np.allclose(g[0, 0], g[0, 1], atol=1e-3)


def test_multicrop_augments_images_independently(batch):
  same = {k: np.broadcast_to(v[:1], v.shape).copy() for k, v in batch.items()}
  out = _multicrop(jax.random.key(0), same, _frozen(_aug_cfg()))
  for k in ("global", "local"):
    v = np.asarray(out[k])
    assert not np.allclose(v[0], v[1], atol=1e-3)


def test_multicrop_without_local_views(batch):
  cfg = _aug_cfg()
  cfg.num_local = 0
  out = _multicrop(jax.random.key(0), {"global": batch["global"]}, _frozen(cfg))
  assert set(out) == {"global"}
  assert out["global"].shape == (2, 2, 16, 16, 3)


def test_solarize_matches_numpy():
  x = np.random.default_rng(0).uniform(size=(4, 5, 3)).astype(np.float32)
  x[0, 0] = [0.5, 0.49, 0.51]
  np.testing.assert_allclose(augment.solarize(jnp.asarray(x)), np.where(x >= 0.5, 1.0 - x, x), atol=1e-7)
  x[0, 1] = [0.25, 0.24, 0.26]  # exactly at the threshold: solarized (>=)
  np.testing.assert_allclose(augment.solarize(jnp.asarray(x), 0.25),
                             np.where(x >= 0.25, 1.0 - x, x), atol=1e-7)


def test_grayscale_matches_numpy():
  x = np.random.default_rng(1).uniform(size=(4, 5, 3)).astype(np.float32)
  y = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
  out = np.asarray(augment.grayscale(jnp.asarray(x)))
  assert out.shape == x.shape
  for c in range(3):
    np.testing.assert_allclose(out[..., c], y, rtol=1e-6, atol=1e-7)


def test_color_jitter_with_zero_strength_is_identity():
  rng = np.random.default_rng(2)
  x = rng.uniform(size=(6, 6, 3)).astype(np.float32)
  # Edge cases: gray, black, white, pure and mixed primaries.
  x[0, :6] = [[0.5, 0.5, 0.5], [0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
  x[1, :4] = [[1, 1, 0], [0, 1, 1], [1, 0, 1], [0.2, 0.9, 0.9]]
  for seed in range(3):
    out = augment.color_jitter(jax.random.key(seed), jnp.asarray(x), 0.0, 0.0, 0.0, 0.0)
    np.testing.assert_allclose(out, x, atol=1e-5)


def test_color_jitter_changes_image_and_stays_in_range():
  x = np.random.default_rng(3).uniform(size=(6, 6, 3)).astype(np.float32)
  out = np.asarray(augment.color_jitter(jax.random.key(0), jnp.asarray(x)))
  assert not np.allclose(out, x, atol=1e-3)
  assert out.min() >= -1e-6 and out.max() <= 1 + 1e-6


def test_color_jitter_brightness_only_scales():
  x = np.random.default_rng(4).uniform(0.1, 0.5, size=(4, 4, 3)).astype(np.float32)
  out = np.asarray(augment.color_jitter(jax.random.key(0), jnp.asarray(x), 0.4, 0.0, 0.0, 0.0))
  factor = out / x
  np.testing.assert_allclose(factor, factor.flat[0], rtol=1e-4)  # one factor for the image
  assert 0.6 - 1e-6 <= factor.flat[0] <= 1.4 + 1e-6


def test_gaussian_blur_of_constant_image_is_constant():
  img = jnp.full((16, 16, 3), 0.7).at[..., 1].set(0.2)
  for seed in range(3):
    out = augment.gaussian_blur(jax.random.key(seed), img)
    assert out.shape == img.shape
    np.testing.assert_allclose(out, img, atol=1e-5)


def test_gaussian_blur_smooths_and_preserves_mean():
  img = jnp.zeros((16, 16, 1)).at[8, 8, 0].set(1.0)
  out = np.asarray(augment.gaussian_blur(jax.random.key(0), img, (1.0, 1.0)))
  assert out[8, 8, 0] < 0.5 and out[8, 9, 0] > 0
  np.testing.assert_allclose(out.sum(), 1.0, rtol=1e-4)  # far from the border
  np.testing.assert_allclose(out[8, 9, 0], out[9, 8, 0], rtol=1e-5)  # isotropic
