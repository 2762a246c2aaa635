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
  x = np.round(rng.uniform(size=(6, 6, 3)) * 255).astype(np.float32) / 255  # a uint8 image
  # Edge cases: gray, black, white, pure and mixed primaries.
  x[0, :6] = [[128 / 255] * 3, [0, 0, 0], [1, 1, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
  x[1, :4] = [[1, 1, 0], [0, 1, 1], [1, 0, 1], [51 / 255, 230 / 255, 230 / 255]]
  for seed in range(3):
    out = augment.color_jitter(jax.random.key(seed), jnp.asarray(x), 0.0, 0.0, 0.0, 0.0)
    np.testing.assert_allclose(out, x, atol=1e-6)


def test_color_jitter_changes_image_and_stays_on_the_uint8_grid():
  x = np.random.default_rng(3).uniform(size=(6, 6, 3)).astype(np.float32)
  out = np.asarray(augment.color_jitter(jax.random.key(0), jnp.asarray(x)))
  assert not np.allclose(out, x, atol=1e-2)
  assert out.min() >= 0 and out.max() <= 1
  np.testing.assert_allclose(out * 255, np.round(out * 255), atol=1e-4)


def np_jitter(x, op, factor):
  """torchvision's tensor ColorJitter ops (`_functional_tensor`), in numpy, on an image in [0, 1]."""
  gray = lambda v: 0.299 * v[..., 0] + 0.587 * v[..., 1] + 0.114 * v[..., 2]
  blend = lambda a, b, r: np.clip(r * a + (1 - r) * b, 0, 1)
  if op == "brightness":
    return blend(x, 0.0, factor)
  if op == "contrast":
    return blend(x, gray(x).mean(), factor)
  if op == "saturation":
    return blend(x, gray(x)[..., None], factor)
  import colorsys  # pylint: disable=import-outside-toplevel
  hsv = np.array([colorsys.rgb_to_hsv(*p) for p in x.reshape(-1, 3)])
  hsv[:, 0] = (hsv[:, 0] + factor) % 1.0
  return np.array([colorsys.hsv_to_rgb(*p) for p in hsv]).reshape(x.shape)


def test_color_jitter_runs_its_ops_in_an_order_drawn_for_each_image():
  """As torchvision's ColorJitter (fn_idx = torch.randperm(4) on every call): each image's four
  ops in its own order, every order about equally often."""
  x = np.round(np.random.default_rng(5).uniform(size=(5, 7, 3)) * 255).astype(np.float32) / 255
  for seed in range(4):
    key = jax.random.key(seed)
    order, factors = jax.device_get(augment.jitter_draws(key))
    expected = x
    for i in order:
      expected = np.round(np_jitter(expected, augment.JITTER_OPS[i], factors[i]) * 255) / 255
    np.testing.assert_allclose(augment.color_jitter(key, jnp.asarray(x)), expected, atol=1.5 / 255)
  orders = jax.vmap(lambda k: augment.jitter_draws(k)[0])(jax.random.split(jax.random.key(0), 2400))
  counts = np.unique(np.asarray(orders), axis=0, return_counts=True)[1]
  assert len(counts) == 24 and counts.min() > 60 and counts.max() < 140  # 100 each expected


def photo(size=(48, 40)) -> np.ndarray:
  """A real photograph (matplotlib's sample), uint8 RGB, cut to `size`."""
  from dino_jax.evaluators import common as evaluators_common  # pylint: disable=import-outside-toplevel
  return evaluators_common.sample_photos()[0][100:100 + size[0], 200:200 + size[1]]


@pytest.mark.parametrize("sigma", [0.1, 0.6, 1.0, 1.7, 2.0])
def test_pil_blur_is_pils_gaussian_blur(sigma):
  """DINO's blur: PIL's ImageFilter.GaussianBlur(radius=sigma), pixel for pixel."""
  from PIL import Image, ImageFilter  # pylint: disable=import-outside-toplevel
  image = photo()
  expected = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)))
  ours = augment.pil_gaussian_blur(jnp.asarray(image, jnp.float32) / 255, sigma, max_l=augment.pil_max_l(2.0))
  np.testing.assert_array_equal(np.round(np.asarray(ours) * 255).astype(np.uint8), expected)


@pytest.mark.parametrize("sigma", [0.1, 0.6, 1.0, 2.0])
def test_torchvision_blur_is_torchvisions_9_tap_gaussian_blur(sigma):
  """DINOv2's blur: torchvision's GaussianBlur(kernel_size=9) on the PIL image (to within the
  last bit of its rounding)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from torchvision.transforms import functional as F  # pylint: disable=import-outside-toplevel
  image = photo()
  expected = np.asarray(F.gaussian_blur(Image.fromarray(image), 9, sigma)).astype(int)
  ours = augment.quantize(augment.torchvision_gaussian_blur(jnp.asarray(image, jnp.float32) / 255, sigma))
  assert np.abs(np.round(np.asarray(ours) * 255).astype(int) - expected).max() <= 1


@pytest.mark.parametrize("recipe,rates", [("dino", (1.0, 0.1, 0.5)), ("dinov2", (0.0, 0.9, 0.5))])
def test_blur_rates_by_sampling(recipe, rates):
  """The share of blurred crops per view: DINO's 1.0 / 0.1 / 0.5, and DINOv2's as its code runs
  them, 0 / 0.9 / 0.5 (its GaussianBlur wraps RandomApply with p = 1 - p)."""
  cfg = (defaults.base_config() if recipe == "dino" else defaults.dinov2_config("small")).aug
  cfg.update(num_local=1, jitter_prob=0.0, grayscale_prob=0.0, solarize_prob=0.0, blur_sigma=(1.0, 2.0))
  n = 400
  image = np.broadcast_to(photo((16, 16)), (n, 16, 16, 3))
  crops = {"global": np.stack([image, image], 1), "local": image[:, None]}
  out = _multicrop(jax.random.key(0), crops, _frozen(cfg))
  plain = np.asarray(augment.normalize(image))
  views = [np.asarray(out["global"][:, 0]), np.asarray(out["global"][:, 1]), np.asarray(out["local"][:, 0])]
  for view, rate in zip(views, rates):
    blurred = np.mean(np.abs(view - plain).max(axis=(1, 2, 3)) > 1e-3)
    assert abs(blurred - rate) < 4 * np.sqrt(rate * (1 - rate) / n) + 1e-9, (recipe, blurred, rate)


def test_gaussian_blur_of_constant_image_is_constant():
  img = jnp.full((16, 16, 3), 179 / 255).at[..., 1].set(51 / 255)
  for blur in augment.BLURS:
    cfg = ml_collections.ConfigDict(dict(blur=blur, blur_sigma=(0.1, 2.0)))
    for seed in range(3):
      out = augment.gaussian_blur(jax.random.key(seed), img, cfg)
      assert out.shape == img.shape
      np.testing.assert_allclose(out, img, atol=1e-6)
