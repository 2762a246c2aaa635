"""DINO multi-crop augmentation's photometric ops as pure JAX functions (on device, jitted, sharded).

Caron et al. 2021, Sec. 3.1 and App. A: two global crops and N local crops (random resized
crop and horizontal flip: on the host, `dino_jax.crops`), each then with color jitter (p=0.8;
brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1), grayscale (p=0.2), gaussian blur
(p=1.0 / 0.1 on the two global crops, 0.5 on locals; sigma in [0.1, 2]) and solarization
(p=0.2, second global crop): `multicrop`.

Differences from torchvision, on purpose: jitter ops run in a fixed order (not a random
permutation). Every random choice comes from one key, so a step's views are reproducible.
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # numpy: importing must not start a backend
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  blur_prob: float
  solarize_prob: float


def grayscale(image):
  gray = image @ jnp.array([0.299, 0.587, 0.114])
  return jnp.broadcast_to(gray[..., None], image.shape)


def _blend(a, b, factor):
  return jnp.clip(factor * a + (1 - factor) * b, 0.0, 1.0)


def _rgb_to_hsv(rgb):
  r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
  maxc, minc = jnp.max(rgb, -1), jnp.min(rgb, -1)
  delta = maxc - minc
  safe = jnp.where(delta > 0, delta, 1.0)
  h = jnp.where(maxc == r, (g - b) / safe, jnp.where(maxc == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
  h = jnp.where(delta > 0, (h / 6.0) % 1.0, 0.0)
  s = jnp.where(maxc > 0, delta / jnp.where(maxc > 0, maxc, 1.0), 0.0)
  return h, s, maxc


def _hsv_to_rgb(h, s, v):
  i = jnp.floor(h * 6.0)
  f = h * 6.0 - i
  p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
  i = i.astype(jnp.int32) % 6
  r = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [v, q, p, p, t], v)
  g = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [t, v, v, q, p], p)
  b = jnp.select([i == 0, i == 1, i == 2, i == 3, i == 4], [p, p, t, v, v], q)
  return jnp.stack([r, g, b], -1)


def color_jitter(key, image, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
  """Brightness, contrast, saturation (blends, as torchvision) then a hue rotation."""
  kb, kc, ks, kh = jax.random.split(key, 4)
  u = lambda k, m: jax.random.uniform(k, minval=1 - m, maxval=1 + m)
  image = _blend(image, 0.0, u(kb, brightness))
  image = _blend(image, jnp.mean(grayscale(image)[..., 0]), u(kc, contrast))
  image = _blend(image, grayscale(image), u(ks, saturation))
  h, s, v = _rgb_to_hsv(image)
  h = (h + jax.random.uniform(kh, minval=-hue, maxval=hue)) % 1.0
  return _hsv_to_rgb(h, s, v)


def gaussian_blur(key, image, sigma_range=(0.1, 2.0)):
  """Separable gaussian blur, sigma ~ U(sigma_range) pixels, kernel radius 3*max sigma."""
  sigma = jax.random.uniform(key, minval=sigma_range[0], maxval=sigma_range[1])
  radius = int(3 * sigma_range[1] + 0.5)
  x = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  kernel = jnp.exp(-0.5 * (x / sigma) ** 2)
  kernel = kernel / jnp.sum(kernel)
  c = image.shape[-1]
  x = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode="reflect")[None]
  for shape in ((-1, 1, 1, 1), (1, -1, 1, 1)):  # vertical then horizontal pass, per channel
    x = jax.lax.conv_general_dilated(
        x, jnp.tile(kernel.reshape(shape), (1, 1, 1, c)), (1, 1), "VALID",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
  return x[0]


def solarize(image, threshold=0.5):
  return jnp.where(image >= threshold, 1.0 - image, image)


def augment_view(key, image, spec: ViewSpec, cfg: ml_collections.ConfigDict):
  """The photometric ops of one DINO view, a float [H, W, 3] crop in [0, 1]; normalized with
  ImageNet statistics."""
  keys = jax.random.split(key, 7)
  x = jnp.where(jax.random.bernoulli(keys[0], cfg.jitter_prob), color_jitter(keys[1], image, *cfg.jitter), image)
  x = jnp.where(jax.random.bernoulli(keys[2], cfg.grayscale_prob), grayscale(x), x)
  if spec.blur_prob > 0:
    x = jnp.where(jax.random.bernoulli(keys[3], spec.blur_prob), gaussian_blur(keys[4], x, tuple(cfg.blur_sigma)), x)
  if spec.solarize_prob > 0:
    x = jnp.where(jax.random.bernoulli(keys[5], spec.solarize_prob), solarize(x), x)
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def view_specs(cfg: ml_collections.ConfigDict):
  """The (global, local) view specs of the DINO recipe from the `aug` config."""
  globals_ = [ViewSpec(1.0, 0.0), ViewSpec(0.1, cfg.solarize_prob)]
  return globals_, [ViewSpec(0.5, 0.0)] * cfg.num_local


def multicrop(key, crops: dict, cfg: ml_collections.ConfigDict):
  """DINO views of a step's host-made crops (`dino_jax.crops`): "global" uint8 [B, 2, G, G, 3]
  and, with local crops, "local" [B, N, L, L, 3] -> the same float32 views, augmented and
  normalized."""
  globals_, locals_ = view_specs(cfg)
  keys = jax.random.split(key, (crops["global"].shape[0], len(globals_) + len(locals_)))

  def views(images, specs, offset):
    images = images.astype(jnp.float32) / 255.0
    per_view = [jax.vmap(lambda k, im, s=s: augment_view(k, im, s, cfg))(keys[:, offset + i], images[:, i])
                for i, s in enumerate(specs)]
    return jnp.stack(per_view, axis=1)

  out = {"global": views(crops["global"], globals_, 0)}
  if locals_:
    out["local"] = views(crops["local"], locals_, len(globals_))
  return out


def normalize(images):
  """Images with values in [0, 255] (uint8 or float) standardized with ImageNet statistics."""
  return (images.astype(jnp.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


EVAL_RESIZE = 256 / 224  # DINO / DINOv2 evaluation: shorter side 256, center crop 224


def preprocess_eval(images, size: int):
  """Evaluation view of uint8 [B, S, S, 3] (`data.to_square_rgb`: the shorter side resized to
  S, center crop): resized to round(size * 256 / 224) (nothing to do for S = 256, size = 224),
  then the center size² crop, normalized; no randomness."""
  x = images.astype(jnp.float32)
  resized = round(size * EVAL_RESIZE)
  if x.shape[1:3] != (resized, resized):
    x = jax.image.resize(x, (x.shape[0], resized, resized, 3), method="linear", antialias=True)
  top = (resized - size) // 2
  return normalize(x[:, top:top + size, top:top + size])
