"""DINO multi-crop augmentation's photometric ops as pure JAX functions (on device, jitted, sharded).

Caron et al. 2021, Sec. 3.1 and App. A, as the official pipelines compose torchvision and PIL
on uint8 images: two global crops and N local crops (random resized crop and horizontal flip:
on the host, `dino_jax.crops`), each then with color jitter (p=0.8; brightness 0.4, contrast
0.4, saturation 0.2, hue 0.1, in a random order for each image as torchvision's ColorJitter),
grayscale (p=0.2), gaussian blur (sigma ~ U(0.1, 2)) and solarization (p=0.2, second global
crop): `multicrop`. Every op rounds its result to the uint8 grid, as on PIL images.

The blur differs between the official codes (`aug.blur`, `aug.blur_probs`):
  "pil"          DINO and EsViT: PIL's ImageFilter.GaussianBlur(radius=sigma), three passes of a
                 box blur of fractional radius each way (`pil_gaussian_blur`), applied with
                 p = 1.0 / 0.1 / 0.5 (global 1, global 2, local crops);
  "torchvision"  DINOv2: torchvision's GaussianBlur(kernel_size=9), a 9-tap gaussian with
                 reflected borders (`torchvision_gaussian_blur`). DINOv2's wrapper applies it with
                 p = 1 - p of its arguments (1.0 / 0.1 / 0.5), so its runs blur the crops with
                 p = 0.0 / 0.9 / 0.5: its recipes' default, as the released models were trained.
Every random choice comes from one key, so a step's views are reproducible.
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)  # numpy: importing must not start a backend
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
BLURS = ("pil", "torchvision")


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  blur_prob: float
  solarize_prob: float


def quantize(image):
  """`image` in [0, 1] rounded to the uint8 grid (what an op on a PIL image returns)."""
  return jnp.round(jnp.clip(image, 0.0, 1.0) * 255.0) / 255.0


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


def _hue_shift(image, shift):
  h, s, v = _rgb_to_hsv(image)
  return _hsv_to_rgb((h + shift) % 1.0, s, v)


JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def jitter_draws(key, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
  """torchvision's ColorJitter.get_params: the order of its four ops, a permutation drawn for
  each image (`torch.randperm(4)`, `JITTER_OPS` indices), and their factors b, c, s ~ U(1 - x,
  1 + x) and hue shift ~ U(-hue, hue). The four factors are one mapped draw: the values of
  four separate draws, compiled once."""
  keys = jax.random.split(key, 5)
  low = jnp.array([1 - brightness, 1 - contrast, 1 - saturation, -hue], jnp.float32)
  high = jnp.array([1 + brightness, 1 + contrast, 1 + saturation, hue], jnp.float32)
  factors = jax.vmap(lambda k, lo, hi: jax.random.uniform(k, minval=lo, maxval=hi))(keys[:4], low, high)
  return jax.random.permutation(keys[4], len(JITTER_OPS)), factors


def jitter_op(image, op: str, factor):
  """One of torchvision's jitter ops: blends with black, the mean gray, the grayscale image,
  or a hue rotation."""
  if op == "brightness":
    return _blend(image, 0.0, factor)
  if op == "contrast":
    return _blend(image, jnp.mean(grayscale(image)[..., 0]), factor)
  if op == "saturation":
    return _blend(image, grayscale(image), factor)
  return _hue_shift(image, factor)


def color_jitter(key, image, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
  """torchvision's ColorJitter on a uint8-grid image: the four ops in the order drawn for this
  image (`jitter_draws`), each rounded to uint8: a scan over the four positions, so each op is
  traced and compiled once, not once per position."""
  order, factors = jitter_draws(key, brightness, contrast, saturation, hue)
  branches = [lambda x, i=i, op=op: jitter_op(x, op, factors[i]) for i, op in enumerate(JITTER_OPS)]
  step = lambda x, op: (quantize(jax.lax.switch(op, branches, x)), None)
  return jax.lax.scan(step, image, order)[0]


def _filter(image, taps, axis: int, mode: str):
  """`image` [H, W, C] filtered along `axis` with the len(taps) (odd) weights `taps`, its borders
  padded by `mode` ("reflect": mirrored without the edge, as torch; "edge": repeated, as PIL)."""
  pad = (taps.shape[0] - 1) // 2
  widths = [(0, 0)] * image.ndim
  widths[axis] = (pad, pad)
  padded = jnp.pad(image, widths, mode=mode)
  n = image.shape[axis]
  return sum(taps[i] * jax.lax.slice_in_dim(padded, i, i + n, axis=axis) for i in range(taps.shape[0]))


def torchvision_gaussian_blur(image, sigma, kernel_size: int = 9):
  """torchvision's F.gaussian_blur: the separable kernel exp(-x²/2σ²), x = -(k-1)/2 .. (k-1)/2,
  normalized, over the image with its borders reflected (without repeating the edge)."""
  x = jnp.arange(kernel_size, dtype=jnp.float32) - (kernel_size - 1) / 2
  kernel = jnp.exp(-0.5 * (x / sigma) ** 2)
  kernel = kernel / jnp.sum(kernel)
  return _filter(_filter(image, kernel, 0, "reflect"), kernel, 1, "reflect")


def pil_box_radius(sigma, passes: int = 3):
  """(l, a): the fractional box radius l + a of the `passes` box blurs PIL's GaussianBlur(sigma)
  runs (its `_gaussian_blur_radius`: Gwosdek et al. 2011, extended box filters)."""
  sigma2 = sigma * sigma / passes
  length = jnp.sqrt(12.0 * sigma2 + 1.0)
  l = jnp.floor((length - 1.0) / 2.0)
  a = (2 * l + 1) * (l * (l + 1) - 3 * sigma2) / (6 * (sigma2 - (l + 1) ** 2))
  return l, a


def pil_gaussian_blur(image, sigma, passes: int = 3, max_l: int = 1):
  """PIL's ImageFilter.GaussianBlur(radius=sigma), in PIL's fixed-point arithmetic: `passes`
  box blurs of radius r = l + a along the rows, then `passes` along the columns (its
  ImagingBoxBlur), each pixel the sum of the 2l + 1 pixels around it times ww =
  floor(2^24 / (2r + 1)) plus the next one on each side times fw = (2^24 - (2l + 1) ww) / 2,
  rounded back to uint8 ((sum + 2^23) >> 24), the borders extended (edge pixels repeated).
  `max_l` bounds l (`pil_max_l`)."""
  l, a = pil_box_radius(sigma, passes)
  one = jnp.float32(1 << 24)
  ww = jnp.floor(one / (2 * (l + a) + 1)).astype(jnp.uint32)
  fw = (jnp.uint32(1 << 24) - (2 * l + 1).astype(jnp.uint32) * ww) // 2
  offsets = jnp.abs(jnp.arange(-max_l - 1, max_l + 2, dtype=jnp.float32))
  taps = jnp.where(offsets <= l, ww, jnp.where(offsets == l + 1, fw, jnp.uint32(0)))
  pixels = jnp.round(image * 255.0).astype(jnp.uint32)
  for axis in (1, 0):
    for _ in range(passes):
      pixels = (_filter(pixels, taps, axis, "edge") + jnp.uint32(1 << 23)) >> 24
  return pixels.astype(jnp.float32) / 255.0


def pil_max_l(sigma: float, passes: int = 3) -> int:
  """The largest integer box radius l of `pil_box_radius` for sigmas up to `sigma` (1 for 2)."""
  return int(np.floor((np.sqrt(12.0 * sigma * sigma / passes + 1.0) - 1.0) / 2.0))


def gaussian_blur(key, image, cfg: ml_collections.ConfigDict):
  """The recipe's blur (`aug.blur`) at sigma ~ U(aug.blur_sigma)."""
  low, high = cfg.blur_sigma
  sigma = jax.random.uniform(key, minval=low, maxval=high)
  if cfg.get("blur", "pil") == "torchvision":
    return quantize(torchvision_gaussian_blur(image, sigma))
  return pil_gaussian_blur(image, sigma, max_l=pil_max_l(high))


def solarize(image, threshold=0.5):
  return jnp.where(image >= threshold, 1.0 - image, image)


def augment_view(key, image, spec: ViewSpec, cfg: ml_collections.ConfigDict):
  """The photometric ops of one DINO view, a float [H, W, 3] crop on the uint8 grid of [0, 1];
  normalized with ImageNet statistics. Each op is kept with its probability (the four coins are
  one mapped draw); the spec's probabilities may be traced (`multicrop` maps this over views
  of different specs)."""
  keys = jax.random.split(key, 7)
  probs = jnp.stack([jnp.asarray(p, jnp.float32) for p in
                     (cfg.jitter_prob, cfg.grayscale_prob, spec.blur_prob, spec.solarize_prob)])
  jitter, gray, blur, solar = jax.vmap(jax.random.bernoulli)(keys[jnp.array([0, 2, 3, 5])], probs)
  x = jnp.where(jitter, color_jitter(keys[1], image, *cfg.jitter), image)
  x = jnp.where(gray, quantize(grayscale(x)), x)
  x = jnp.where(blur, gaussian_blur(keys[4], x, cfg), x)
  x = jnp.where(solar, solarize(x), x)
  return (x - IMAGENET_MEAN) / IMAGENET_STD


def view_specs(cfg: ml_collections.ConfigDict):
  """The (global, local) view specs of the recipe's `aug` config: blur with `blur_probs`
  (global 1, global 2, local), solarization on the second global crop."""
  first, second, local = cfg.get("blur_probs", (1.0, 0.1, 0.5))
  return [ViewSpec(first, 0.0), ViewSpec(second, cfg.solarize_prob)], [ViewSpec(local, 0.0)] * cfg.num_local


def multicrop(key, crops: dict, cfg: ml_collections.ConfigDict):
  """DINO views of a step's host-made crops (`dino_jax.crops`): "global" uint8 [B, 2, G, G, 3]
  and, with local crops, "local" [B, N, L, L, 3] -> the same float32 views, augmented and
  normalized."""
  globals_, locals_ = view_specs(cfg)
  keys = jax.random.split(key, (crops["global"].shape[0], len(globals_) + len(locals_)))

  def views(images, specs, offset):
    """One program for all views of a size: mapped over images and their views, each view
    with its spec's probabilities (compiling one copy of the ops, not one per view)."""
    probs = jnp.asarray([dataclasses.astuple(s) for s in specs], jnp.float32)  # [views, fields]
    one = lambda k, image, p: augment_view(k, image.astype(jnp.float32) / 255.0, ViewSpec(*p), cfg)
    over_views = jax.vmap(one)
    return jax.vmap(over_views, in_axes=(0, 0, None))(keys[:, offset:offset + len(specs)], images, probs)

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
  top = int(round((resized - size) / 2.0))  # torchvision's CenterCrop offset
  return normalize(x[:, top:top + size, top:top + size])
