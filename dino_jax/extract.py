"""Features from a dino_jax run: restore only the backbone from Orbax, embed images.

  python -m dino_jax.extract --workdir RUN [--step N] [--student] \
      --source folder --path /data/images --split val --out feats.npz

Python:  backbone = load_backbone("RUN");  feats = backbone(uint8_images)
The checkpoint is restored with this host's devices (any count); the optimizer state and the
rest of the train state are not read.
"""
import json
import os
import pathlib

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from dino_jax import augment
from dino_jax import data
from dino_jax import checkpoints
from dino_jax import host_memory
from dino_jax import models
from dino_jax import sharding
from dino_jax import train  # noqa: F401  (defines --workdir and --config)
from dino_jax.errors import UsageError
from dino_jax.errors import fail


class Backbone:
  """A restored backbone (any of `models.BACKBONES`): call it on uint8 [B, H, W, 3] images to
  get {"embedding": [B, D] (CLS token, or pooled where there is none), "pooled": [B, D] (mean
  patch / region token), "patch": [B, h, w, D]}; with `size`, square images first get the
  trainer's evaluation view (`augment.preprocess_eval`: resized to size x 256 / 224, center
  size² crop), without it they are taken as they are."""

  def __init__(self, cfg: ml_collections.ConfigDict, params, step: int):
    self.cfg, self.params, self.step = cfg, params, step
    self.module = models.make_backbone(cfg.model)
    self._apply = jax.jit(self._features, static_argnums=2)

  def _features(self, params, images, size):
    x = augment.normalize(images) if size is None else augment.preprocess_eval(images, size)
    out = self.module.apply({"params": params}, x)
    return {"embedding": out["embedding"], "pooled": jnp.mean(out["patch"], axis=(1, 2)), "patch": out["patch"]}

  def __call__(self, images, size: int | None = None):
    return self._apply(self.params, images, size)


def load_backbone(workdir: str, step: int | None = None, student: bool = False) -> Backbone:
  """The teacher (default) or student backbone of `workdir`'s checkpoint `step` (latest)."""
  config_file = pathlib.Path(workdir) / "config.json"
  if not config_file.is_file():
    raise UsageError(f"{workdir!r} is not a dino_jax run directory (no config.json)")
  cfg = ml_collections.ConfigDict(json.loads(config_file.read_text()))
  weights, step = checkpoints.restore_weights(workdir, ("backbone",), step, student)
  return Backbone(cfg, weights["backbone"], step)


def extract(backbone: Backbone, source, batch_size: int, image_size: int, with_patches: bool) -> dict:
  """Features of every image of `source`, batches sharded over all devices."""
  batch_sharding = sharding.batch_sharding(sharding.make_mesh())
  if batch_size % batch_sharding.mesh.size:
    raise UsageError(f"batch_size {batch_size} is not divisible by the {batch_sharding.mesh.size} devices")
  out = {"embedding": [], "pooled": [], "labels": []} | ({"patch": []} if with_patches else {})
  for i in tqdm.trange(0, len(source), batch_size, desc="extract", unit="batch"):
    index = np.arange(i, i + batch_size)
    valid = index < len(source)
    images, labels = data.read_batch(source, np.where(valid, index, 0))
    feats = jax.device_get(backbone(jax.device_put(images, batch_sharding), image_size))
    for k in out:
      out[k].append(labels[valid] if k == "labels" else feats[k][valid])
  return {k: np.concatenate(v) for k, v in out.items()}


def run_classes(workdir: str, run_data: ml_collections.ConfigDict, source: str, path: str) -> list[str] | None:
  """The run's class list (`data.load_classes`) when extracting from the image folder it was
  trained on; else None, and the folder's own training split numbers the classes."""
  same_data = source == run_data.source == "folder" and os.path.realpath(path) == os.path.realpath(run_data.path)
  return data.load_classes(workdir) if same_data else None


def make_out_folder(out: str) -> None:
  """Creates the folder of `out` (if missing) before any work, so a bad path fails first."""
  folder = pathlib.Path(out).parent
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise UsageError(f"cannot create the folder of --out {out!r} ({e.strerror})") from None
  if not os.access(folder, os.W_OK):
    raise UsageError(f"cannot write --out {out!r}: {str(folder)!r} is not writable")


# --workdir (the run directory) is the flag dino_jax.train defines.
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_STUDENT = flags.DEFINE_bool("student", False, "Use the student backbone instead of the teacher.")
_SOURCE = flags.DEFINE_enum("source", "fashion_mnist_demo", ["fashion_mnist_demo", "tfds", "folder"],
                            "Where the images come from (as data.source in configs).")
_NAME = flags.DEFINE_string("name", "", "TFDS dataset name (source=tfds).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir (source=tfds).")
_PATH = flags.DEFINE_string("path", "", "Image folder (source=folder); images under PATH/SPLIT.")
_SPLIT = flags.DEFINE_string("split", "test", "Split (subfolder for source=folder).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Input side in px (default: the run's global crop).")
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch size.")
_PATCHES = flags.DEFINE_bool("patches", False, "Also save patch features [N, h, w, D] (large).")
_OUT = flags.DEFINE_string("out", None, "Output .npz with embedding, pooled, labels (and patch).")


def main(argv):
  del argv
  host_memory.keep_freed_memory()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    if not flags.FLAGS.workdir or not _OUT.value:
      raise UsageError("--workdir and --out are required")
    make_out_folder(_OUT.value)
    backbone = load_backbone(flags.FLAGS.workdir, _STEP.value, _STUDENT.value)
    size = _IMAGE_SIZE.value or backbone.cfg.aug.global_size
    try:
      backbone.module.grid(size)
    except ValueError as e:
      raise UsageError(f"image_size {e}") from None
    run_data = backbone.cfg.data
    data_cfg = ml_collections.ConfigDict(dict(source=_SOURCE.value, name=_NAME.value, data_dir=_DATA_DIR.value,
                                              path=_PATH.value, image_size=run_data.image_size,
                                              train_split=run_data.get("train_split", "train"),
                                              read_timeout_s=run_data.get("read_timeout_s", data.READ_TIMEOUT_S)))
    classes = run_classes(flags.FLAGS.workdir, run_data, _SOURCE.value, _PATH.value)
    source = data.make_source(data_cfg, _SPLIT.value, classes)
    feats = extract(backbone, source, _BATCH.value, size, _PATCHES.value)
  except UsageError as e:
    fail(str(e))
  np.savez(_OUT.value, **feats, step=backbone.step)
  print(f"{len(feats['embedding'])} images from step {backbone.step}: "
        f"{', '.join(f'{k} {v.shape}' for k, v in feats.items())} -> {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
