"""DINOv2's dense linear probes on frozen patch features (Oquab et al. 2023, Sec. 7.4): semantic
segmentation scored by mIoU and monocular depth scored by RMSE, with the official heads and
settings (`dinov2/eval/segmentation`, `dinov2/eval/depth` and their published mmseg configs
`dinov2_vit*14_ade20k_linear_config.py`, `dinov2_vit*14_nyu_linear_config.py`).

Layouts (the benchmarks' own, so `path` can be the real one; `write_synthetic` writes both side
by side in one folder):

  segmentation (ADE20K's ADEChallengeData2016): images/{training,validation}/<name>.jpg with
    annotations/{training,validation}/<name>.png, one channel of uint8 class ids (palette PNGs
    give their indices). `ignore_index` (255) is ignored; with `reduce_zero_label` (ADE20K's,
    as mmseg) id 0 ("other") is ignored too and ids 1..150 become classes 0..149.
  depth (NYU-v2-like): images/{train,test}/<name>.png|jpg with depth/{train,test}/<name>.png,
    uint16 depth / `depth_scale` (NYU: millimetres, 1000), or <name>.npy, float metres; 0 (or
    non-finite) is no measurement.
  Each <name> once per folder (one image and one target: the same name under two suffixes is a
  UsageError).

The probes: `segmentation` and `depth`. Here: what they share (the pairs of a split, the
frozen backbone's block outputs as the head's input, the AdamW loop on augmented crops, the
training views) and the synthetic benchmark of both.

Simplifications and choices: crops and windows are rounded to multiples of the patch size (512
-> 518 for /14 models; the official code zero-pads each 512 window to 518); the official
photometric distortion, `cat_max_ratio` and the long-side cap 2048 of the resize (segmentation),
rotation, color augmentation and the NYU border crop of training images (depth), the one-cycle
Adam momentum of the NYU config and the test-time multi-scale of "+ms" are left out; images are
resized with PIL (antialiased when shrinking, where mmcv's cv2 resize is not; the segmentation
test image's shorter side is 518 at patch 14), and a depth test image is resized bicubic to
multiples of the patch (480x640 -> 476x644 at patch 14) where the official code pads it; the depth
learning rate is the 1e-4 of the published config's public copies (one copy has 5e-3). The
backbone's block outputs are taken as the official heads take them: through the final norm for
segmentation (`get_intermediate_layers(norm=True)`), before it for depth (`norm=False` in
`hub/depthers.py`). The NYU config also weights a `GradientLoss` 0.5, but its slices act on
the batch and channel axes of [B, 1, H, W] maps, so with 2 images per GPU it is exactly 0:
`gradient_loss_weight` defaults to 0, and > 0 adds the
intended multi-scale log-depth gradient matching (MegaDepth) on the spatial axes. The backbone
runs on every training batch (frozen), as the official code does. Evaluation compiles the
backbone once per window count (segmentation) or image size (depth).
"""
import concurrent.futures
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from PIL import Image

from dino_jax import augment
from dino_jax import data
from dino_jax import models
from dino_jax import sharding
from dino_jax import validate
from dino_jax.errors import UsageError
from dino_jax.evaluators import common

SEG_SPLITS = ("training", "validation")  # ADE20K's folder names
DEPTH_SPLITS = ("train", "test")
MASK_SUFFIXES = (".png",)
DEPTH_SUFFIXES = (".png", ".npy")
OFFICIAL_SPACED_BLOCKS = {(4, 24): (5, 12, 18, 24)}  # DINOv2 ViT-L "lin. 4" (hub/depthers.py: out_index 4, 11, 17, 23)
PAD_COLOR = np.round(augment.IMAGENET_MEAN * 255).astype(np.uint8)  # mmseg pads normalized images with 0
BN_MOMENTUM, BN_EPS = 0.1, 1e-5  # torch BatchNorm
READ_ERRORS = (OSError, ValueError, EOFError, SyntaxError, Image.DecompressionBombError)  # a bad mask / depth file


# ---------------------------------------------------------------------------------------
# Files: image / target pairs of a split.
# ---------------------------------------------------------------------------------------

def paired_files(root: pathlib.Path, split: str, folder: str, suffixes: tuple[str, ...], what: str) -> list[tuple]:
  """(image, target) paths of `split`: images/<split>/<name>.<image suffix> with
  <folder>/<split>/<name><suffix> (same relative name). UsageError starting with `what` for a
  missing folder, an image without target or a target without image, or a name twice."""
  image_dir, target_dir = root / "images" / split, root / folder / split
  for sub in (image_dir, target_dir):
    if not sub.is_dir():
      raise UsageError(f"{what}: {str(root)!r} has no {sub.relative_to(root).as_posix()}/ folder (layout: "
                       f"images/{split}/<name>.jpg with {folder}/{split}/<name>{suffixes[0]})")
  images, targets = {}, {}
  for path in common.image_files(image_dir, f"{what}: images/{split}"):
    unique(images, path.relative_to(image_dir).with_suffix("").as_posix(), path, what)
  for path in sorted(target_dir.rglob("*")):
    if path.suffix.lower() in suffixes and path.is_file():
      unique(targets, path.relative_to(target_dir).with_suffix("").as_posix(), path, what)
  pairs = []
  for name, image in images.items():
    if name not in targets:
      raise UsageError(f"{what}: image images/{split}/{image.relative_to(image_dir).as_posix()} has no "
                       f"{folder}/{split}/{name}{suffixes[0]}")
    pairs.append((image, targets.pop(name)))
  if targets:
    extra = next(iter(targets.values()))
    raise UsageError(f"{what}: {folder}/{split}/{extra.relative_to(target_dir).as_posix()} has no image in "
                     f"images/{split}/")
  return pairs


def unique(paths: dict, name: str, path: pathlib.Path, what: str) -> None:
  """paths[name] = path; UsageError when `name` is there already (one name, two suffixes)."""
  if name in paths:
    raise UsageError(f"{what}: {paths[name].name!r} and {path.name!r} in {path.parent} are the same <name> twice")
  paths[name] = path


def read_pair(image_path: pathlib.Path, target_path: pathlib.Path, read_target) -> tuple[np.ndarray, np.ndarray]:
  """The uint8 RGB image and its target map; UsageError when their sizes differ."""
  image, target = common.read_rgb(image_path), read_target(target_path)
  if target.shape != image.shape[:2]:
    raise UsageError(f"{str(target_path)!r} is {target.shape[1]}x{target.shape[0]} but its image "
                     f"{str(image_path)!r} is {image.shape[1]}x{image.shape[0]}")
  return image, target


# ---------------------------------------------------------------------------------------
# Head inputs, batch norm and the learning-rate schedule (jax).
# ---------------------------------------------------------------------------------------

def resize(x, size: tuple[int, int]):
  """[B, h, w, C] resized bilinearly to `size` as torch's interpolate(align_corners=False)."""
  if tuple(x.shape[1:3]) == tuple(size):
    return x
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), "bilinear", antialias=False)


def probe_inputs(out: dict, picks: tuple[int, ...] | None, cls_token: bool):
  """[B, h, w, C] head input: the patch tokens of the last block (picks None) or of the
  intermediate blocks `picks`, each with its CLS token (the global embedding) concatenated to
  every patch token when `cls_token`; all resized to the first's grid and concatenated (mmseg's
  "resize_concat")."""
  layers = [out] if picks is None else [out["intermediate"][i] for i in picks]
  maps = []
  for layer in layers:
    x, cls = layer["patch"], layer["embedding"]
    if cls_token:
      x = jnp.concatenate([x, jnp.broadcast_to(cls[:, None, None], x.shape[:3] + cls.shape[-1:])], -1)
    maps.append(resize(x, maps[0].shape[1:3]) if maps else x)
  return jnp.concatenate(maps, -1)


def batch_norm(x, bn: dict, stats: dict, train: bool):
  """torch BatchNorm2d on [B, h, w, C]: batch statistics (and running ones updated with
  momentum 0.1, the unbiased variance) in training, the running ones at test."""
  if train:
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    n = x.size // x.shape[-1]
    stats = {"mean": (1 - BN_MOMENTUM) * stats["mean"] + BN_MOMENTUM * mean,
             "var": (1 - BN_MOMENTUM) * stats["var"] + BN_MOMENTUM * var * n / max(n - 1, 1)}
  else:
    mean, var = stats["mean"], stats["var"]
  return (x - mean) * jax.lax.rsqrt(var + BN_EPS) * bn["scale"] + bn["bias"], stats


def lr_schedule(base: float, steps: int, warmup_steps: int, warmup_ratio: float, decay: str,
                min_ratio: float = 0.0):
  """mmcv's iteration schedules: "poly" (power 1) or "cosine" from `base` to `min_ratio` x base
  over `steps`, times the linear warmup 1 - (1 - step / warmup_steps)(1 - warmup_ratio)."""
  def schedule(step):
    t = jnp.minimum(step / steps, 1.0)
    shape = 1 - t if decay == "poly" else 0.5 * (1 + jnp.cos(jnp.pi * t))
    warm = 1 - (1 - step / max(warmup_steps, 1)) * (1 - warmup_ratio)
    return base * (min_ratio + (1 - min_ratio) * shape) * jnp.where(step < warmup_steps, warm, 1.0)
  return schedule


# ---------------------------------------------------------------------------------------
# Views.
# ---------------------------------------------------------------------------------------

def crop_size(size, stride: int) -> tuple[int, int]:
  """(h, w) of a config crop size (int or pair) rounded to multiples of the patch size."""
  h, w = (size, size) if isinstance(size, int) else size
  return tuple(max(stride, round(s / stride) * stride) for s in (h, w))


def random_crop(rng: np.random.Generator, image: np.ndarray, target: np.ndarray, size: tuple[int, int],
                fill, flip: bool) -> tuple[np.ndarray, np.ndarray]:
  """A random `size` crop of image and target (padded at the bottom / right with the mean color
  and `fill` where smaller), flipped horizontally with probability 0.5 when `flip`."""
  ch, cw = size
  h, w = target.shape
  if h < ch or w < cw:
    pad = ((0, max(ch - h, 0)), (0, max(cw - w, 0)))
    image = np.concatenate([np.pad(image[..., c], pad, constant_values=PAD_COLOR[c])[..., None]
                            for c in range(3)], -1)
    target = np.pad(target, pad, constant_values=fill)
    h, w = target.shape
  y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
  image, target = image[y:y + ch, x:x + cw], target[y:y + ch, x:x + cw]
  if flip and rng.random() < 0.5:
    image, target = image[:, ::-1], target[:, ::-1]
  return np.ascontiguousarray(image), np.ascontiguousarray(target)


def resize_short(image: np.ndarray, short: float, resample=Image.BILINEAR) -> np.ndarray:
  """`image` (uint8 RGB or int32 labels) resized, aspect kept, to shorter side `short`."""
  h, w = image.shape[:2]
  scale = short / min(h, w)
  size = (max(1, int(w * scale + 0.5)), max(1, int(h * scale + 0.5)))
  return np.asarray(Image.fromarray(image).resize(size, resample))


# ---------------------------------------------------------------------------------------
# The probes.
# ---------------------------------------------------------------------------------------

def backbone_blocks(module) -> int:
  return module.num_layers - 1


def block_picks(n: int, total: int, spaced: bool) -> tuple[int, tuple[int, ...] | None]:
  """(layers to ask the backbone for, picks among them) for `n` blocks of `total`: the last n,
  or (`spaced`) n evenly spaced ones ending with the last (DINOv2 depth "lin. 4": 3, 6, 9, 12
  of 12, 10, 20, 30, 40 of 40; of 24 the official 5, 12, 18, 24). n = 1: the backbone's own
  output (0, None)."""
  if n == 1:
    return 0, None
  blocks = (OFFICIAL_SPACED_BLOCKS.get((n, total)) or [total * k // n for k in range(1, n + 1)] if spaced
            else list(range(total - n + 1, total + 1)))
  layers = total - blocks[0] + 1
  return layers, tuple(b - (total - layers) - 1 for b in blocks)


class DenseProbe:
  """What both probes share: the split pairs, the frozen backbone as the head's input, the
  AdamW training loop on augmented crops (a backbone forward on every batch of the mesh), the
  progress bars. Subclasses give the target reader, the training view, the head and the loss."""
  needs_labels = False
  shards_batches = True  # evals.<name>.batch_size is split over the mesh's devices (`batches`)
  splits: tuple[str, str]  # the train and test split folders
  folder: str  # the targets' folder beside images/
  suffixes: tuple[str, ...]  # the targets' file suffixes
  name = ""
  blocks_key = "n_last_blocks"  # the last n blocks; "n_blocks": n evenly spaced ones
  final_norm = True  # the blocks' outputs through the final norm (get_intermediate_layers(norm=...))

  def __init__(self, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, mesh):
    self.ecfg = ecfg
    self.root = pathlib.Path(ecfg.path)
    what = f"{self.name} data {ecfg.path!r}"
    self.train_pairs, self.test_pairs = (paired_files(self.root, split, self.folder, self.suffixes, what)
                                         for split in self.splits)
    self.features = common.DenseFeatures(cfg.model, mesh)
    self.crop = crop_size(ecfg.crop_size, self.features.stride)
    self.layers, self.picks = block_picks(ecfg[self.blocks_key], backbone_blocks(self.features.module),
                                          spaced=self.blocks_key == "n_blocks")
    if not self.final_norm and self.picks is None:  # the last block before the norm, not the output
      self.layers, self.picks = 1, (0,)
    self.seed = cfg.seed + ecfg.seed
    self.progress = cfg.get("progress_bar", True)
    self.workers = max(1, cfg.data.get("workers", 8))
    self.batch_sharding, self.replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    schedule = lr_schedule(ecfg.learning_rate, ecfg.steps, ecfg.warmup_steps, ecfg.warmup_ratio, ecfg.schedule,
                           ecfg.min_lr_ratio)
    self.tx = optax.chain(optax.clip_by_global_norm(ecfg.grad_clip) if ecfg.grad_clip else optax.identity(),
                          optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=ecfg.weight_decay))
    self.train_step = jax.jit(self._train_step, donate_argnums=(0,),
                              out_shardings=(self.replicated, self.replicated))

  def inputs(self, params, images):
    """The frozen backbone's head input [B, h, w, C] of uint8 images [B, H, W, 3]."""
    out = self.features.module.apply(models.backbone_variables(params), augment.normalize(images), layers=self.layers,
                                     final_norm=self.final_norm)
    return jax.lax.stop_gradient(probe_inputs(out, self.picks, self.ecfg.cls_token))

  def _train_step(self, state, params, images, targets, step):
    feats = self.inputs(params, sharding.constrain(images, self.batch_sharding))
    (loss, stats), grads = jax.value_and_grad(self.loss, has_aux=True)(state["head"], state["stats"], feats,
                                                                       targets, step)
    updates, opt = self.tx.update(grads, state["opt"], state["head"])
    return {"head": optax.apply_updates(state["head"], updates), "stats": stats, "opt": opt}, loss

  def init_state(self, params) -> dict:
    """A fresh head (`init_head` on the input width these params give) and its optimizer."""
    x = jax.ShapeDtypeStruct((1, *self.crop, 3), jnp.uint8)
    dim = jax.eval_shape(self.inputs, params, x).shape[-1]
    head, stats = self.init_head(jax.random.PRNGKey(self.seed), dim)
    return jax.device_put({"head": head, "stats": stats, "opt": self.tx.init(head)}, self.replicated)

  def training_view(self, index: int, step: int, position: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([self.seed, step, position])
    image, target = read_pair(*self.train_pairs[index], self.read_target)
    return self.augment(rng, image, target)

  def batches(self, steps: int):
    """Global (images, targets) of each training step; each process reads its slice, a thread
    pool the next step's while the devices work."""
    b = self.ecfg.batch_size
    local = b // jax.process_count()
    start = jax.process_index() * local
    to_global = lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x)

    def read(step):
      index = data.batch_indices(len(self.train_pairs), b, step, self.seed)
      views = list(pool.map(self.training_view, index[start:start + local], [step] * local,
                            range(start, start + local)))
      return np.stack([v[0] for v in views]), np.stack([v[1] for v in views])

    with concurrent.futures.ThreadPoolExecutor(self.workers) as pool, \
         concurrent.futures.ThreadPoolExecutor(1) as ahead:
      future = ahead.submit(read, 0)
      for step in range(steps):
        images, targets = future.result()
        if step + 1 < steps:
          future = ahead.submit(read, step + 1)
        yield to_global(images), to_global(targets)

  def train(self, params) -> tuple[dict, np.ndarray]:
    """The head after `steps` steps, and the loss of every step."""
    state, losses = self.init_state(params), []
    steps = self.ecfg.steps
    bar = common.progress(self.batches(steps), f"{self.name} probe", total=steps, enabled=self.progress)
    for step, (images, targets) in enumerate(bar):
      state, loss = self.train_step(state, params, images, targets, np.int32(step))
      losses.append(loss)
      if step % 50 == 0 or step == steps - 1:
        bar.set_postfix(loss=f"{float(loss):.4f}")
    bar.close()
    return state, np.asarray(jax.device_get(losses))

  def run(self, params) -> dict[str, float]:
    if params is None:  # raw pixels: no patch tokens to probe
      return {}
    state, _ = self.train(params)
    return self.score(state, params)


def check_training(name: str, ecfg, probe: type, cfg: ml_collections.ConfigDict, enabled: bool) -> None:
  """The keys both probes have; with `enabled`, the blocks against the backbone and the data
  folder's layout (`paired_files` of both splits, errors naming evals.<name>.path)."""
  for key in ("steps", "batch_size"):
    validate.positive_int(ecfg, key, prefix=f"evals.{name}.")
  for key in ("warmup_steps", "seed"):
    validate.positive_int(ecfg, key, zero=True, prefix=f"evals.{name}.")
  validate.positive_number(ecfg, "learning_rate", prefix=f"evals.{name}.")
  for key in ("weight_decay", "warmup_ratio", "min_lr_ratio", "grad_clip"):  # grad_clip 0: none
    validate.non_negative_number(ecfg, key, prefix=f"evals.{name}.")
  if ecfg.get("schedule") not in ("poly", "cosine"):
    raise UsageError(f"evals.{name}.schedule must be 'poly' (DINOv2 segmentation) or 'cosine' (DINOv2 depth), "
                     f"not {ecfg.get('schedule')!r}")
  validate.string(ecfg, "path", prefix=f"evals.{name}.")
  if not enabled:
    return
  if not ecfg.path or not pathlib.Path(ecfg.path).is_dir():
    raise UsageError(f"evals.{name}.path must be the benchmark folder (layout: images/{{{','.join(probe.splits)}}}/ "
                     f"and {probe.folder}/{{{','.join(probe.splits)}}}/), not {ecfg.path!r}")
  for split in probe.splits:
    paired_files(pathlib.Path(ecfg.path), split, probe.folder, probe.suffixes, f"evals.{name}.path")
  key = probe.blocks_key
  if ecfg[key] > (total := backbone_blocks(common.DenseFeatures(cfg.model).module)):
    raise UsageError(f"evals.{name}.{key} {ecfg[key]} asks for more blocks than the backbone's {total}")


# ---------------------------------------------------------------------------------------
# Synthetic benchmark from real images with known masks and depths.
# ---------------------------------------------------------------------------------------

# Fashion-MNIST labels in 4 groups: tops (T-shirt, pullover, coat, shirt), trousers and dresses,
# footwear (sandal, sneaker, ankle boot), bags. Mask ids: 0 "other" (an item's soft rim), 1
# background, 2 + group; with reduce_zero_label: 0 background, 1..4 the groups.
SYNTHETIC_GROUPS = ((0, 2, 4, 6), (1, 3), (5, 7, 9), (8,))
SYNTHETIC_NUM_CLASSES = 1 + len(SYNTHETIC_GROUPS)
GROUP_COLORS = np.array([[220, 60, 50], [60, 180, 75], [50, 90, 220], [240, 200, 40]], np.float32)
OPACITY = 3.0  # an item covers its background with opacity min(1, 3 x its Fashion-MNIST intensity)
RIM, CORE = 0.15, 0.5  # opacity above RIM: "other" (no depth), above CORE: the item's class (its depth)
TERRAIN_DEPTH = (1.0, 8.0)  # metres: the highest ground nearest the camera above it
ITEM_DEPTH = (0.5, 0.9)


def _terrains() -> list[tuple[np.ndarray, np.ndarray]]:
  """(uint8 shaded-relief rendering, depth in metres) of matplotlib's two real elevation maps."""
  from matplotlib import colormaps, colors  # pylint: disable=g-import-not-at-top
  with np.load(common.sample_data("jacksboro_fault_dem.npz")) as d:
    dem = d["elevation"].astype(np.float32)
  with np.load(common.sample_data("topobathy.npz")) as d:
    topo = np.asarray(Image.fromarray(d["topo"].astype(np.float32)).resize((360, 273), Image.BILINEAR))
  out = []
  for elevation in (dem, topo):
    e = (elevation - elevation.min()) / (elevation.max() - elevation.min())
    shaded = colors.LightSource(azdeg=315, altdeg=45).shade(e, cmap=colormaps["gist_earth"], blend_mode="soft",
                                                            vert_exag=20)
    near, far = TERRAIN_DEPTH
    out.append(((shaded[..., :3] * 255).round().astype(np.uint8), (far - (far - near) * e).astype(np.float32)))
  return out


def _photos() -> list[np.ndarray]:
  """Real photographs and renderings as backgrounds (uint8 RGB)."""
  return common.sample_photos() + [t[0] for t in _terrains()]


def _window(rng, arrays: list[np.ndarray], size: int, resamples) -> list[np.ndarray]:
  """The same random square window (side from `size` to the shorter side) of each array,
  resized to `size`."""
  h, w = arrays[0].shape[:2]
  side = int(rng.integers(min(size, h, w), min(h, w) + 1))
  y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
  return [np.asarray(Image.fromarray(a[y:y + side, x:x + side]).resize((size, size), r))
          for a, r in zip(arrays, resamples)]


def _item(rng, items, size: int, scale: tuple[float, float]):
  """(intensity [s, s] in [0, 1], opacity, label, top-left) of a random Fashion-MNIST item of
  side s."""
  k = int(rng.integers(len(items)))
  s = int(rng.integers(int(size * scale[0]), int(size * scale[1]) + 1))
  intensity = np.asarray(Image.fromarray(items.originals[k]).resize((s, s), Image.BILINEAR), np.float32) / 255
  corner = (int(rng.integers(0, size - s + 1)), int(rng.integers(0, size - s + 1)))
  return intensity[..., None], np.minimum(1.0, OPACITY * intensity), int(items.labels[k]), corner


def segmentation_scene(rng, photos, items, size: int, objects: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """A background window of a real image with `objects` Fashion-MNIST items pasted over it, each
  tinted with its group's color; (uint8 image, uint8 mask ids as SYNTHETIC_GROUPS says)."""
  group_of = {label: g for g, labels in enumerate(SYNTHETIC_GROUPS) for label in labels}
  image = _window(rng, [photos[int(rng.integers(len(photos)))]], size, [Image.BILINEAR])[0].astype(np.float32)
  mask = np.ones((size, size), np.uint8)
  for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
    intensity, alpha, label, (y, x) = _item(rng, items, size, (0.375, 0.625))
    s, group = alpha.shape[0], group_of[label]
    color = np.clip(GROUP_COLORS[group] + rng.uniform(-20, 20, 3), 0, 255) * (0.55 + 0.45 * intensity)
    region = image[y:y + s, x:x + s]
    region[:] = alpha[..., None] * color + (1 - alpha[..., None]) * region
    ids = mask[y:y + s, x:x + s]
    ids[alpha > RIM] = 0
    ids[alpha > CORE] = 2 + group
  return image.round().astype(np.uint8), mask


def depth_scene(rng, terrains, items, size: int, objects: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """A window of a real terrain seen from above, its shaded relief as the image and its height
  as depth (TERRAIN_DEPTH), with Fashion-MNIST items floating at known depths (ITEM_DEPTH; their
  soft rims and a random sensor hole have no depth, 0); (uint8 image, float32 metres)."""
  rendering, depth = terrains[int(rng.integers(len(terrains)))]
  image, depth = _window(rng, [rendering, depth], size, [Image.BILINEAR, Image.BILINEAR])
  image, depth = image.astype(np.float32), depth.copy()
  for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
    intensity, alpha, _, (y, x) = _item(rng, items, size, (0.25, 0.5))
    s = alpha.shape[0]
    region = image[y:y + s, x:x + s]
    region[:] = alpha[..., None] * 255 * (0.5 + 0.5 * intensity) + (1 - alpha[..., None]) * region
    d = depth[y:y + s, x:x + s]
    d[alpha > RIM] = 0.0
    d[alpha > CORE] = rng.uniform(*ITEM_DEPTH)
  if rng.random() < 0.5:
    h, w = rng.integers(2, size // 4 + 1, 2)
    y, x = rng.integers(0, size - h + 1), rng.integers(0, size - w + 1)
    depth[y:y + h, x:x + w] = 0.0
  return image.round().astype(np.uint8), depth


def write_synthetic(out: pathlib.Path, seed: int = 0, size: int = 64, train: int = 24, test: int = 8,
                    objects: tuple[int, int] = (1, 3)) -> None:
  """Writes both benchmarks' layouts under `out` from real images with known answers:
  segmentation (images/{training,validation}/*.jpg, annotations/.../*.png; `segmentation_scene`,
  SYNTHETIC_NUM_CLASSES classes with reduce_zero_label) and depth (images/{train,test}/*.png,
  depth/.../*.png in millimetres; `depth_scene`); `train` / `test` scenes of size² px each, the
  test scenes with Fashion-MNIST's test items."""
  out = pathlib.Path(out)
  rng = np.random.default_rng(seed)
  photos, terrains = _photos(), _terrains()
  for (seg_split, depth_split, items_split, count) in ((*SEG_SPLITS[:1], DEPTH_SPLITS[0], "train", train),
                                                       (SEG_SPLITS[1], DEPTH_SPLITS[1], "test", test)):
    items = data.fashion_mnist_demo(items_split, 28)
    for folder in (f"images/{seg_split}", f"annotations/{seg_split}", f"images/{depth_split}",
                   f"depth/{depth_split}"):
      (out / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
      image, mask = segmentation_scene(rng, photos, items, size, objects)
      Image.fromarray(image).save(out / f"images/{seg_split}/scene_{i:04d}.jpg", quality=95)
      Image.fromarray(mask).save(out / f"annotations/{seg_split}/scene_{i:04d}.png")
      image, depth = depth_scene(rng, terrains, items, size, (0, 2))
      Image.fromarray(image).save(out / f"images/{depth_split}/scene_{i:04d}.png")
      Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(out / f"depth/{depth_split}/scene_{i:04d}.png")
