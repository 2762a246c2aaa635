"""Image sources (bundled demo, TFDS, image folder) and a deterministic, resumable loader.

A source maps an index to a uint8 [S, S, 3] image (resized shorter side to S, center
cropped: what evaluations and feature extraction see) and an integer label; `get(index,
finish)` hands the opened original image to `finish` instead (training cuts its crops from
it, `crops.views`). The loader's batch for step `s` depends only on (seed, s): global sample
positions s*B ... (s+1)*B-1 walk through one seeded permutation per epoch, and each image's
crops are drawn from (seed, s, position), so resuming at step s needs nothing but s. Each
process reads its own contiguous slice of the global batch, made by threads in the process or
by loader worker processes (grain), each making whole steps.
"""
import atexit
import concurrent.futures
import contextlib
import functools
import itertools
import json
import multiprocessing
import multiprocessing.pool
import os
import pathlib
import queue
import threading

from absl import logging
import numpy as np
from PIL import Image

from dino_jax import crops
from dino_jax.errors import UsageError

DEMO_FILE = pathlib.Path(__file__).parent / "demo_data" / "fashion_mnist_12k.npz"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CLASSES_FILE = "classes.json"  # in a run directory: the training split's class names, by id
READ_TIMEOUT_S = 60.0  # default data.read_timeout_s: the longest a single image file may take to read
READER_THREADS = 32  # threads that read image files, shared by every source and caller
WORKERS_CLOSE_S = 10.0  # the longest the loader waits for its worker processes to close


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB of any PIL mode: 16/32-bit and float grayscale rescaled to 8 bits, transparency
  composited on white, CMYK/palette/grayscale converted."""
  if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
    pixels = np.asarray(image, np.float32)
    top = 65535.0 if pixels.max() > 255 else 255.0
    image = Image.fromarray(np.clip(pixels / top * 255.0, 0, 255).astype(np.uint8))
  if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
    rgba = image.convert("RGBA")
    image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
  return image if image.mode == "RGB" else image.convert("RGB")  # convert() would copy an RGB image


def as_pil(image: np.ndarray | Image.Image) -> Image.Image:
  if isinstance(image, Image.Image):
    return image
  image = np.asarray(image)
  return Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)


def to_square_rgb(image: np.ndarray | Image.Image, size: int) -> np.ndarray:
  """Any image -> uint8 [size, size, 3]: RGB, then torchvision's Resize(size, bicubic) on the PIL
  image (the shorter side to size, the longer to int(size * long / short)) and CenterCrop(size)
  (offsets int(round(excess / 2))). With `augment.preprocess_eval`'s center crop of 224 from
  256, the papers' evaluation view Resize(256) + CenterCrop(224), pixel for pixel."""
  image = to_rgb(as_pil(image))
  w, h = image.size
  nw, nh = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
  image = image.resize((nw, nh), Image.BICUBIC)
  left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
  return np.asarray(image.crop((left, top, left + size, top + size)))


class ArraySource:
  """Images held in memory (the bundled Fashion-MNIST demo subset)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, size: int):
    self.originals = images
    if images.ndim == 3:
      images = images[..., None]
    if images.shape[1:3] != (size, size):
      images = np.stack([to_square_rgb(im, size) for im in images])
    self.images = np.broadcast_to(images, images.shape[:3] + (3,))
    self.labels = labels.astype(np.int32)
    self.num_classes = int(self.labels.max()) + 1

  def __len__(self):
    return len(self.images)

  def get(self, index, finish=None):
    if finish is not None:
      return finish(as_pil(self.originals[index])), self.labels[index]
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

  def get(self, index, finish=None):
    ex = self.source[int(index)]
    image = finish(as_pil(ex[self.image_key])) if finish else to_square_rgb(ex[self.image_key], self.size)
    return image, np.int32(ex.get(self.label_key, -1))


@functools.cache
def _reader_pool(pid: int) -> multiprocessing.pool.ThreadPool:
  """The threads that open and decode image files, one pool per process id (a forked child
  has none of its parent's threads). They are daemons (unlike concurrent.futures' threads),
  so a read that never returns cannot keep the process from exiting."""
  del pid
  pool = multiprocessing.pool.ThreadPool(READER_THREADS)
  atexit.register(pool.terminate)  # before interpreter teardown, where Pool.__del__ would fail
  return pool


class FilesSource:
  """Images in a list of files, labels given (-1: none).

  A file that cannot be decoded (truncated, empty, not an image, a decompression bomb) is
  skipped: the next file in order stands in for it, so a step's batch stays a function of
  the step, and the file is logged once and counted in `skipped`. A file whose reading takes
  longer than `read_timeout_s` (a hung network filesystem, a pipe) is a UsageError naming it.
  """
  MAX_SUBSTITUTES = 16

  def __init__(self, files: list[pathlib.Path], labels: np.ndarray, size: int,
               read_timeout_s: float = READ_TIMEOUT_S):
    self.files, self.labels, self.size, self.read_timeout_s = files, labels, size, read_timeout_s
    self.num_classes = int(labels.max()) + 1 if labels.size and labels.max() >= 0 else None
    self._unreadable = set()
    self._lock = threading.Lock()

  def __len__(self):
    return len(self.files)

  @property
  def skipped(self) -> int:
    """How many distinct files were found unreadable so far."""
    return len(self._unreadable)

  @property
  def unreadable(self) -> frozenset:
    """The indices of the files found unreadable so far."""
    with self._lock:
      return frozenset(self._unreadable)

  def add_unreadable(self, indices) -> None:
    """Counts files another process (a loader worker) found unreadable."""
    with self._lock:
      self._unreadable.update(int(i) for i in indices)

  def __getstate__(self):  # pickled into loader worker processes: all but the lock
    return {k: v for k, v in self.__dict__.items() if k != "_lock"}

  def __setstate__(self, state):
    self.__dict__.update(state, _lock=threading.Lock())

  def _decode(self, i, finish=None):
    with Image.open(self.files[i]) as im:
      if finish is not None:
        return finish(im)
      return to_square_rgb(im, self.size)

  def get_or_none(self, index, finish=None):
    """(image, label) of file `index`, or None (logged once, counted) if it is unreadable;
    `finish(opened image)` makes the image when given."""
    index = int(index)
    reading = _reader_pool(os.getpid()).apply_async(self._decode, (index, finish))
    try:
      return reading.get(self.read_timeout_s), self.labels[index]
    except multiprocessing.TimeoutError:
      raise UsageError(f"reading image {self.files[index]} took longer than data.read_timeout_s="
                       f"{self.read_timeout_s:g} s (a hung filesystem, or not a regular file)") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
      with self._lock:
        if index not in self._unreadable:
          self._unreadable.add(index)
          logging.warning("skipping unreadable image %s (%s: %s)", self.files[index], type(e).__name__, e)
      return None

  def get(self, index, finish=None):
    for offset in range(self.MAX_SUBSTITUTES):
      item = self.get_or_none((int(index) + offset) % len(self.files), finish)
      if item is not None:
        return item
    raise UsageError(f"{self.MAX_SUBSTITUTES} unreadable images in a row from {self.files[index]}")


class ListingStopped(UsageError):
  """A stop request (SIGTERM, Ctrl-C) ended an image folder's listing."""


def _unreadable_folder(e: OSError):
  """One UsageError naming a folder that cannot be listed."""
  raise UsageError(f"cannot read image folder {e.filename} ({e.strerror})") from None


def _inside(path: str, folder: str) -> bool:
  """Whether the real path `path` is the real path `folder` or under it."""
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _link_target(link: str, real_folder: str, real_root: str, follow_external: bool) -> tuple[str, str | None]:
  """The real path of the folder link `link` met listing `real_folder` (under the data root
  `real_root`), and why it is not followed: "repeat" for a link into `real_folder` (listed
  already) or above it (a loop), "external" for one out of the root unless `follow_external`;
  None where it is followed."""
  target = os.path.realpath(link)
  if _inside(target, real_folder) or _inside(real_folder, target):
    return target, "repeat"
  if not follow_external and not _inside(target, real_root):
    return target, "external"
  return target, None


def _warn_skipped_links(folder, skipped: dict) -> None:
  """One warning line per kind of link `list_images` did not follow."""
  if skipped["repeat"]:
    logging.warning("image folder %s: not following %d folder links that lead back to folders listed already "
                    "(a loop, or a second copy), e.g. %s", folder, len(skipped["repeat"]), skipped["repeat"][0])
  if skipped["external"]:
    logging.warning("image folder %s: skipping %d links that lead out of the data folder, e.g. %s; set "
                    "data.follow_external_symlinks=True to read them", folder, len(skipped["external"]),
                    skipped["external"][0])


def list_images(folder: pathlib.Path, data_root: str | os.PathLike | None = None, follow_external: bool = False,
                interrupt: threading.Event | None = None) -> list[pathlib.Path]:
  """The regular files with an image suffix under `folder` (recursively), sorted.

  Every real folder is listed once: its own path wins over any link to it, and a folder link
  back into `folder` or above it (a copy, a loop such as `ln -s . self`) is not followed. Links
  (to files or folders) that lead out of `data_root` (default: `folder`) are skipped unless
  `follow_external`. Skipped links are counted in one warning line per kind. Anything else
  named like an image (a pipe, a socket, a broken link: reading it could block for ever or
  fail) is left out with a warning; a folder that cannot be listed is a UsageError naming it,
  so its images never silently go missing. `interrupt` set (a stop request) ends the listing
  with ListingStopped before the next folder.
  """
  folder = pathlib.Path(folder)
  real_folder = os.path.realpath(folder)
  real_root = os.path.realpath(folder if data_root is None else data_root)
  named, links, visited, skipped = [], [], set(), {"repeat": [], "external": []}

  def walk(path: pathlib.Path, real: str, depth: int):
    """Lists the real folders under `path` (whose real path is `real`); folder links wait in `links`."""
    todo = [(path, real, depth)]
    while todo:
      if interrupt is not None and interrupt.is_set():
        raise ListingStopped(f"stopped on request (SIGTERM or Ctrl-C) while listing the images under {folder} "
                             f"({len(visited)} folders listed)")
      path, real, depth = todo.pop()
      if real in visited:
        skipped["repeat"].append(path)
        continue
      visited.add(real)
      try:
        with os.scandir(str(path)) as scan:
          entries = sorted(scan, key=lambda entry: entry.name)  # the same walk every time
      except OSError as e:
        _unreadable_folder(e)
      for entry in entries:
        if entry.is_symlink() and entry.is_dir():
          links.append((depth + 1, path / entry.name))
        elif entry.is_dir(follow_symlinks=False):
          todo.append((path / entry.name, os.path.join(real, entry.name), depth + 1))
        elif entry.name.lower().endswith(IMAGE_SUFFIXES):
          if (entry.is_symlink() and not follow_external
              and not _inside(os.path.realpath(entry.path), real_root)):
            skipped["external"].append(path / entry.name)
          else:
            named.append(path / entry.name)

  walk(folder, real_folder, 0)
  links.sort()  # the class folders' links first, by name: the same choice as `folder_classes`
  for depth, link in links:  # the walks append the links they meet
    target, why_not = _link_target(str(link), real_folder, real_root, follow_external)
    if why_not:
      skipped[why_not].append(link)
    else:
      walk(link, target, depth)
  _warn_skipped_links(folder, skipped)
  files = sorted(p for p in named if p.is_file())
  if len(files) < len(named):
    other = sorted(set(named) - set(files))
    logging.warning("image folder %s: skipping %d entries that are not regular files (pipes, sockets, devices, "
                    "broken links), e.g. %s", folder, len(other), other[0])
  return files


def folder_classes(folder: str | pathlib.Path, data_root: str | os.PathLike | None = None,
                   follow_external: bool = False) -> list[str]:
  """The class names of an image folder: its subfolders, sorted (as torchvision's ImageFolder),
  without the folder links `list_images` does not follow (a link into the folder or above it,
  to where an earlier class folder's link leads, or out of `data_root` unless `follow_external`)."""
  real_folder = os.path.realpath(folder)
  real_root = os.path.realpath(folder if data_root is None else data_root)
  targets, classes = [], []
  try:
    with os.scandir(folder) as scan:
      entries = sorted(scan, key=lambda entry: entry.name)
  except OSError as e:
    _unreadable_folder(e)
  for entry in entries:
    if entry.is_symlink() and entry.is_dir():
      target, why_not = _link_target(entry.path, real_folder, real_root, follow_external)
      if why_not or any(_inside(target, earlier) for earlier in targets):
        continue
      targets.append(target)
    elif not entry.is_dir(follow_symlinks=False):
      continue
    classes.append(entry.name)
  return classes


def training_classes(cfg) -> list[str] | None:
  """The class names of a folder dataset's training split (`cfg.train_split` under `cfg.path`),
  or None where it has no class folders."""
  train_root = os.path.join(cfg.path, cfg.get("train_split", "train"))
  if not os.path.isdir(train_root):
    return None
  return folder_classes(train_root, cfg.path, cfg.get("follow_external_symlinks", False)) or None


class FolderSource(FilesSource):
  """Images under a folder, labelled by their first-level subfolder (class folder).

  The label is the index of that folder's name in `classes`: this folder's own subfolders by
  default; `make_source` gives every split the training split's, so that an id means the same
  class in every split. A class folder missing from `classes` is a UsageError (its images would
  have no id); one that `classes` has but this folder lacks, a warning. Images next to class
  folders have label -1 (no class), with a warning: trained on, left out of evaluations.
  Links are followed as `list_images` does (`data_root`: the folder links may lead within;
  `interrupt`: a stop request that ends the listing).
  """

  def __init__(self, root: str, size: int, classes: list[str] | None = None,
               read_timeout_s: float = READ_TIMEOUT_S, data_root: str | None = None,
               follow_external_symlinks: bool = False, interrupt: threading.Event | None = None):
    root_path = pathlib.Path(root)
    if not root_path.is_dir():
      raise UsageError(f"image folder {root!r} does not exist")
    files = list_images(root_path, data_root, follow_external_symlinks, interrupt)
    if not files:
      raise UsageError(f"image folder {root!r} has no images ({', '.join(IMAGE_SUFFIXES)})")
    own = folder_classes(root_path, data_root, follow_external_symlinks)
    self.classes = own if classes is None else list(classes)
    unknown = sorted(set(own) - set(self.classes))
    if unknown:
      raise UsageError(f"image folder {root!r} has class folders that the training split lacks: "
                       f"{', '.join(unknown)}; class ids are the training split's {len(self.classes)} classes "
                       "(add the folders there, or move these images out)")
    missing = sorted(set(self.classes) - set(own))
    if own and missing:
      logging.warning("image folder %s has no folder for %d of the %d training classes (%s); ids stay the "
                      "training split's", root, len(missing), len(self.classes), ", ".join(missing[:5]))
    index = {c: i for i, c in enumerate(self.classes)}
    labels = np.array([index[p.relative_to(root_path).parts[0]] if p.parent != root_path else -1
                       for p in files], np.int32)
    if self.classes and (labels < 0).any():
      logging.warning("image folder %s: %d images are not in a class folder (e.g. %s); they have no class "
                      "(label -1): training uses them, k-NN and the linear probe leave them out",
                      root, int((labels < 0).sum()), files[int(np.argmax(labels < 0))].name)
    super().__init__(files, labels, size, read_timeout_s)
    self.num_classes = len(self.classes) or None


def save_classes(source, workdir: str) -> None:
  """Writes a folder source's class names (list position = id) to <workdir>/classes.json."""
  if getattr(source, "classes", None):
    (pathlib.Path(workdir) / CLASSES_FILE).write_text(json.dumps(source.classes, indent=1) + "\n")


def load_classes(workdir: str) -> list[str] | None:
  """A run's class names (`save_classes`), or None when it trained without class folders."""
  path = pathlib.Path(workdir) / CLASSES_FILE
  return json.loads(path.read_text()) if path.is_file() else None


def _list_line(list_file: str, number: int, line: bytes, manifest: bool) -> str:
  """The image path on line `number` of an image list (a manifest's: the "path" of its JSON
  object); a malformed line is a UsageError naming the file, the line and the problem."""
  where = f"image list {list_file}:{number}"
  try:
    text = line.decode()
  except UnicodeDecodeError as e:
    raise UsageError(f"{where}: not UTF-8 text (byte {e.start + 1})") from None
  if not manifest:
    return text
  try:
    row = json.loads(text)
  except json.JSONDecodeError as e:
    raise UsageError(f"{where}: not a JSON object ({e.msg}, column {e.colno})") from None
  if not isinstance(row, dict):
    raise UsageError(f"{where}: a JSON {type(row).__name__}, not an object with a \"path\"")
  if not isinstance(row.get("path"), str) or not row["path"]:
    raise UsageError(f"{where}: " + ("no \"path\"" if "path" not in row else
                                     f"\"path\" is {json.dumps(row['path'])[:80]}, not a file path"))
  return row["path"]


def list_file_source(list_file: str, size: int, read_timeout_s: float = READ_TIMEOUT_S) -> FilesSource:
  """Unlabeled images named in a file: one path a line, or a curation manifest (JSON lines
  with a "path", `python -m dino_jax.curate`). Relative paths are taken from its folder."""
  list_path = pathlib.Path(list_file)
  if not list_path.is_file():
    raise UsageError(f"image list {list_file!r} does not exist")
  try:
    numbered = [(n, line.strip()) for n, line in enumerate(list_path.read_bytes().splitlines(), 1) if line.strip()]
  except OSError as e:
    raise UsageError(f"cannot read image list {list_file!r} ({e.strerror})") from None
  lines = [_list_line(list_file, n, line, list_path.suffix == ".jsonl") for n, line in numbered]
  if not lines:
    raise UsageError(f"image list {list_file!r} names no images")
  files = [list_path.parent / p for p in lines]  # an absolute p stays as it is
  return FilesSource(files, np.full(len(files), -1, np.int32), size, read_timeout_s)


def make_source(cfg, split: str, classes: list[str] | None = None, interrupt: threading.Event | None = None):
  """The source named by a `data` config: fashion_mnist_demo | tfds | folder | files (a list
  of image paths) | manifest (a `dino_jax.curate` manifest).

  A folder split's class ids are indices into `classes`; by default the training split's
  class folders (`training_classes`), so that every split numbers classes alike. Its links may
  lead anywhere under `cfg.path`, elsewhere only with `cfg.follow_external_symlinks`;
  `interrupt` set (a stop request) ends its listing with ListingStopped.
  """
  read_timeout_s = cfg.get("read_timeout_s", READ_TIMEOUT_S)
  if cfg.source == "fashion_mnist_demo":
    return fashion_mnist_demo(split, cfg.image_size)
  if cfg.source == "tfds":
    return TfdsSource(cfg.name, split, cfg.image_size, cfg.get("data_dir") or None)
  if cfg.source == "folder":
    if not cfg.path:
      raise UsageError("data.path must name an image folder when data.source is 'folder'")
    if classes is None and split:
      classes = training_classes(cfg)
    return FolderSource(os.path.join(cfg.path, split) if split else cfg.path, cfg.image_size, classes,
                        read_timeout_s, cfg.path, cfg.get("follow_external_symlinks", False), interrupt)
  if cfg.source in ("files", "manifest"):  # the split is ignored: the list is the data
    if not cfg.path:
      raise UsageError(f"data.path must name an image list when data.source is {cfg.source!r}")
    return list_file_source(cfg.path, cfg.image_size, read_timeout_s)
  raise UsageError(f"data.source must be fashion_mnist_demo, tfds, folder, files or manifest, not {cfg.source!r}")


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


def labelled_views(source, index, position, step: int, seed: int, specs: list[crops.CropSpec]):
  """(the crops `crops.views` of image `index`, drawn from (seed, step, position), its label)."""
  return source.get(index, lambda image: crops.views(image, crops.view_rng(seed, step, int(position)), specs, to_rgb))


def read_views(source, indices, positions, step: int, seed: int, specs: list[crops.CropSpec], pool=None) -> dict:
  """The crops of a step's images (`crops.views`): "global" uint8 [b, 2, G, G, 3] and, with
  local crops, "local" [b, N, L, L, 3]; image i's come from (seed, step, positions[i])."""
  image_views = lambda index, position: labelled_views(source, index, position, step, seed, specs)[0]
  per_image = list((pool.map if pool else map)(image_views, indices, positions))
  out = {"global": np.stack([np.stack(v[:2]) for v in per_image])}
  if len(specs) > 2:
    out["local"] = np.stack([np.stack(v[2:]) for v in per_image])
  return out


def read_crops(source, indices, positions, step: int, seed: int, spec: crops.CropSpec,
               pool=None) -> tuple[np.ndarray, np.ndarray]:
  """One random-resized crop of each image (`crops.views` of `spec`, from the full image:
  torchvision's RandomResizedCrop + flip, what the papers' linear evaluations train on) as uint8
  [b, S, S, 3], and the labels; image i's crop comes from (seed, step, positions[i])."""
  items = list((pool.map if pool else map)(
      lambda index, position: labelled_views(source, index, position, step, seed, [spec]), indices, positions))
  return np.stack([views[0] for views, _ in items]), np.array([label for _, label in items], np.int32)


def step_views(step: int, *, source, global_batch: int, seed: int, specs: list[crops.CropSpec],
               positions: np.ndarray, pool=None) -> dict:
  """The crops (`read_views`) of this process's `positions` in the global batch of `step`."""
  indices = batch_indices(len(source), global_batch, step, seed)[positions]
  return read_views(source, indices, positions, step, seed, specs, pool)


@functools.cache
def _batch_pool(pid: int, threads: int) -> concurrent.futures.ThreadPoolExecutor:
  """The threads that make one batch's crops in a loader worker process (one pool per process)."""
  del pid
  return concurrent.futures.ThreadPoolExecutor(threads)


class _WorkerStepViews:
  """`step_views` as a loader worker process runs it (`grain` pickles it into each worker): the
  images of a step decoded by the worker's own `threads`, and the files it found unreadable so
  far ("unreadable", its `FilesSource.unreadable`), which the trainer's process adds to its count."""

  def __init__(self, threads: int, **kwargs):
    self.threads, self.kwargs = threads, kwargs

  def __call__(self, step: int) -> dict:
    pool = _batch_pool(os.getpid(), self.threads) if self.threads > 1 else None
    views = step_views(int(step), pool=pool, **self.kwargs)
    unreadable = getattr(self.kwargs["source"], "unreadable", ())
    return views | {"unreadable": np.array(sorted(unreadable), np.int64)}


def _worker_process_batches(source, first_step: int, processes: int, threads: int, **kwargs):
  """(step, crops) from `first_step` on, made by `processes` grain worker processes in turn
  (`grain.MapDataset` over steps, `mp_prefetch`): each worker makes whole steps, every
  `processes`-th one, and grain hands them over in step order. A worker's exception reaches
  here with its type and message; a worker that dies is grain's RuntimeError naming its exit code."""
  import grain  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():  # a library caller without absl.app: grain's workers read its flags
    flags.FLAGS.mark_as_parsed()
  steps = grain.MapDataset.range(first_step, first_step + 2 ** 40)
  # Each worker makes one step at a time (its images on its own threads), one step ahead.
  made = steps.map(_WorkerStepViews(threads, source=source, **kwargs)).to_iter_dataset(
      grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
  iterator = iter(made.mp_prefetch(grain.MultiprocessingOptions(num_workers=processes, per_worker_buffer_size=1)))
  try:
    for step in itertools.count(first_step):
      views = {k: np.array(v) for k, v in next(iterator).items()}  # out of grain's shared memory, freed now
      unreadable = views.pop("unreadable")
      if hasattr(source, "add_unreadable"):
        source.add_unreadable(unreadable)
      yield step, views
  finally:
    iterator.close()


def train_batches(source, global_batch: int, seed: int, start_step: int, specs: list[crops.CropSpec],
                  process_index: int = 0, process_count: int = 1, prefetch: int = 2,
                  workers: int = 8, interrupt: threading.Event | None = None, worker_processes: int = 0):
  """Yields (step, this process's crops `read_views`) from `start_step` on, made ahead: by
  `workers` threads in this process, or with `worker_processes` by that many loader processes
  (grain), each with `workers` threads; ends when `interrupt` is set while it waits for a batch
  (a stop requested during a slow read). Either way a step's crops are `step_views` of the step."""
  if global_batch % process_count:
    raise UsageError(f"batch_size {global_batch} is not divisible by {process_count} processes")
  local = global_batch // process_count
  make = dict(global_batch=global_batch, seed=seed, specs=specs,
              positions=np.arange(process_index * local, (process_index + 1) * local))
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
      if worker_processes:
        with contextlib.closing(_worker_process_batches(source, start_step, worker_processes, workers, **make)) as made:
          for item in made:
            put(item)
            if stop.is_set():
              return
      else:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
          step = start_step
          while not stop.is_set():
            put((step, step_views(step, source=source, pool=pool, **make)))
            step += 1
    except Exception as e:  # pylint: disable=broad-except  (re-raised in the consumer)
      put(e)

  producer = threading.Thread(target=produce, daemon=True)
  producer.start()
  try:
    while True:
      try:
        item = q.get(timeout=0.1)
      except queue.Empty:
        if interrupt is not None and interrupt.is_set():
          return
        continue
      if isinstance(item, Exception):
        raise item
      yield item
  finally:
    stop.set()
    if worker_processes:  # let it close the workers and their shared memory (unless a read hangs)
      producer.join(timeout=WORKERS_CLOSE_S)
