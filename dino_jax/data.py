"""Image sources (bundled demo, TFDS, image folder) and a deterministic, resumable loader.

A source maps an index to a uint8 [S, S, 3] image (resized shorter side to S, center
cropped) and an integer label. The loader's batch for step `s` depends only on
(seed, s): global sample positions s*B ... (s+1)*B-1 walk through one seeded permutation
per epoch, so resuming at step s needs nothing but s. Each process reads its own
contiguous slice of the global batch.
"""
import concurrent.futures
import os
import pathlib
import queue
import threading

from absl import logging
import numpy as np
from PIL import Image

from dino_jax.errors import UsageError

DEMO_FILE = pathlib.Path(__file__).parent / "demo_data" / "fashion_mnist_12k.npz"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def _to_rgb(image: Image.Image) -> Image.Image:
  """RGB of any PIL mode: 16/32-bit and float grayscale rescaled to 8 bits, transparency
  composited on white, CMYK/palette/grayscale converted."""
  if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
    pixels = np.asarray(image, np.float32)
    top = 65535.0 if pixels.max() > 255 else 255.0
    image = Image.fromarray(np.clip(pixels / top * 255.0, 0, 255).astype(np.uint8))
  if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
  return image.convert("RGB")


def to_square_rgb(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
  """Any image -> uint8 [size, size, 3]: RGB, shorter side resized to size, center crop."""
  if not isinstance(image, Image.Image):
    image = np.asarray(image)
    image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
  image = _to_rgb(image)
  w, h = image.size
  s = size / min(w, h)
  nw, nh = max(size, round(w * s)), max(size, round(h * s))
  image = image.resize((nw, nh), Image.BICUBIC)
  left, top = (nw - size) // 2, (nh - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)))


class ArraySource:
  """Images held in memory (the bundled Fashion-MNIST demo subset)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, size: int):
    if images.ndim == 3:
      images = images[..., None]
    if images.shape[1:3] != (size, size):
      images = np.stack([to_square_rgb(im, size) for im in images])
    self.images = np.broadcast_to(images, images.shape[:3] + (3,))
    self.labels = labels.astype(np.int32)
    self.num_classes = int(self.labels.max()) + 1

  def __len__(self):
    return len(self.images)

  def get(self, index):
    return self.images[index], self.labels[index]


def fashion_mnist_demo(split: str, size: int) -> ArraySource:
  """The bundled subset: 10k train / 2k test Fashion-MNIST images (MIT, Zalando SE)."""
  if split not in ("train", "test"):
    raise UsageError(f"fashion_mnist_demo has splits 'train' and 'test', not {split!r}")
  with np.load(DEMO_FILE, allow_pickle=False) as d:
    return ArraySource(d[f"{split}_images"], d[f"{split}_labels"], size)


class TfdsSource:
  """Random access to a prepared TFDS dataset (`tfds.data_source`; nothing is downloaded)."""

  def __init__(self, name: str, split: str, size: int, data_dir: str | None = None,
               image_key: str = "image", label_key: str = "label"):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    try:
      builder = tfds.builder(name, data_dir=data_dir)
      self.source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # tfds raises several types for "not there"
      raise UsageError(f"TFDS dataset {name!r} split {split!r} is not available offline under "
                      f"data_dir={data_dir or tfds.core.constants.DATA_DIR!r} ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''})") from None
    self.size, self.image_key, self.label_key = size, image_key, label_key
    label = builder.info.features[label_key] if label_key in builder.info.features else None
    self.num_classes = getattr(label, "num_classes", None)

  def __len__(self):
    return len(self.source)

  def get(self, index):
    ex = self.source[int(index)]
    return to_square_rgb(ex[self.image_key], self.size), np.int32(ex.get(self.label_key, -1))


class FolderSource:
  """Images under a folder; the label is the index of the first-level subfolder (if any).

  A file that cannot be decoded (truncated, empty, not an image, a decompression bomb) is
  skipped: the next file in sorted order stands in for it, so a step's batch stays a
  function of the step, and the file is logged once and counted in `skipped`.
  """
  MAX_SUBSTITUTES = 16

  def __init__(self, root: str, size: int):
    root_path = pathlib.Path(root)
    if not root_path.is_dir():
      raise UsageError(f"image folder {root!r} does not exist")
    self.files = sorted(p for p in root_path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not self.files:
      raise UsageError(f"image folder {root!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    classes = sorted({p.relative_to(root_path).parts[0] for p in self.files if p.parent != root_path})
    index = {c: i for i, c in enumerate(classes)}
    self.labels = np.array([index.get(p.relative_to(root_path).parts[0], -1) for p in self.files],
                           np.int32)
    self.num_classes = len(classes) or None
    self.size = size
    self._unreadable = set()
    self._lock = threading.Lock()

  def __len__(self):
    return len(self.files)

  @property
  def skipped(self) -> int:
    """How many distinct files were found unreadable so far."""
    return len(self._unreadable)

  def _decode(self, i):
    with Image.open(self.files[i]) as im:
      im.draft("RGB", (self.size, self.size))  # JPEG: decode big images at reduced size
      return to_square_rgb(im, self.size)

  def get(self, index):
    for offset in range(self.MAX_SUBSTITUTES):
      i = (int(index) + offset) % len(self.files)
      try:
        return self._decode(i), self.labels[i]
      except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        with self._lock:
          if i not in self._unreadable:
            self._unreadable.add(i)
            logging.warning("skipping unreadable image %s (%s: %s)", self.files[i], type(e).__name__, e)
    raise UsageError(f"{self.MAX_SUBSTITUTES} unreadable images in a row from {self.files[index]}")


def make_source(cfg, split: str):
  """The source named by a `data` config: fashion_mnist_demo | tfds | folder."""
  if cfg.source == "fashion_mnist_demo":
    return fashion_mnist_demo(split, cfg.image_size)
  if cfg.source == "tfds":
    return TfdsSource(cfg.name, split, cfg.image_size, cfg.get("data_dir") or None)
  if cfg.source == "folder":
    if not cfg.path:
      raise UsageError("data.path must name an image folder when data.source is 'folder'")
    return FolderSource(os.path.join(cfg.path, split) if split else cfg.path, cfg.image_size)
  raise UsageError(f"data.source must be fashion_mnist_demo, tfds or folder, not {cfg.source!r}")


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Dataset indices of the global batch of `step`: one seeded permutation per epoch."""
  pos = np.arange(step * batch_size, (step + 1) * batch_size)
  epochs, offsets = np.divmod(pos, num_examples)
  out = np.empty_like(pos)
  for e in np.unique(epochs):
    perm = np.random.default_rng([seed, int(e)]).permutation(num_examples)
    out[epochs == e] = perm[offsets[epochs == e]]
  return out


def read_batch(source, indices, pool=None):
  """Stacked uint8 images and labels of `indices` (decoded in `pool` when given)."""
  if isinstance(source, ArraySource):
    return source.get(indices)
  items = list((pool.map if pool else map)(source.get, indices))
  return np.stack([im for im, _ in items]), np.array([lb for _, lb in items], np.int32)


def train_batches(source, global_batch: int, seed: int, start_step: int,
                  process_index: int = 0, process_count: int = 1, prefetch: int = 2,
                  workers: int = 8):
  """Yields (step, local uint8 images) from `start_step` on, decoded ahead in threads."""
  if global_batch % process_count:
    raise UsageError(f"batch_size {global_batch} is not divisible by {process_count} processes")
  local = global_batch // process_count
  q = queue.Queue(maxsize=prefetch)
  stop = threading.Event()

  def put(item):
    while not stop.is_set():
      try:
        return q.put(item, timeout=0.1)
      except queue.Full:
        pass

  def produce():
    try:
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        step = start_step
        while not stop.is_set():
          idx = batch_indices(len(source), global_batch, step, seed)
          put((step, read_batch(source, idx[process_index * local:(process_index + 1) * local], pool)[0]))
          step += 1
    except Exception as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      put(e)

  threading.Thread(target=produce, daemon=True).start()
  try:
    while True:
      item = q.get()
      if isinstance(item, Exception):
        raise item
      yield item
  finally:
    stop.set()
