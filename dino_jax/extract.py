r"""Features of a dataset split from a dino_jax run, written to one .npz file.

  python -m dino_jax.extract --workdir RUN [--step N] [--student] \
      --source folder --path /data/images --split val --out feats.npz

Only the backbone is restored (`runs.load_backbone`, with this host's devices, any count); the
images get the evaluation view (resized to image_size x 256 / 224, center crop). From Python:
`backbone = dino_jax.load_backbone(RUN)`, then `backbone(uint8_images)` or `extract(...)`.
"""
from absl import flags
import jax
import ml_collections
import numpy as np
import tqdm

from dino_jax import cli
from dino_jax import data
from dino_jax import host_memory
from dino_jax import runs
from dino_jax import sharding
from dino_jax.errors import UsageError
from dino_jax.errors import fail


def extract(backbone: runs.Backbone, source, batch_size: int, image_size: int, with_patches: bool) -> dict:
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


def check_finite(feats: dict) -> None:
  """UsageError where the backbone gave non-finite features (damaged or diverged weights)."""
  bad = ~np.isfinite(feats["embedding"]).all(axis=-1)
  if bad.any():
    raise UsageError(f"the backbone gives non-finite features for {int(bad.sum())} of {len(bad)} images (the first "
                     f"at index {int(np.argmax(bad))}): its weights are damaged or diverged; nothing written")


for _name in ("workdir", "step", "student"):
  flags.declare_key_flag(_name)  # dino_jax.cli's
_SOURCE = flags.DEFINE_enum("source", "fashion_mnist_demo", ["fashion_mnist_demo", "tfds", "folder"],
                            "Where the images come from (as data.source in configs).")
_NAME = flags.DEFINE_string("name", "", "TFDS dataset name (source=tfds).")
_DATA_DIR = flags.DEFINE_string("data_dir", "", "TFDS data_dir (source=tfds).")
_PATH = flags.DEFINE_string("path", "", "Image folder (source=folder); images under PATH/SPLIT.")
_SPLIT = flags.DEFINE_string("split", "test", "Split (subfolder for source=folder).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Input side in px (default: the run's global crop).",
                                   lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 256, "Global batch size.", lower_bound=1)
_PATCHES = flags.DEFINE_bool("patches", False, "Also save patch features [N, h, w, D] (large).")
_OUT = flags.DEFINE_string("out", None, "Output .npz with embedding, pooled, labels (and patch).")


def main(argv):
  del argv
  host_memory.keep_freed_memory()
  cli.quiet_logging()
  try:
    if not cli.WORKDIR.value or not _OUT.value:
      raise UsageError("--workdir and --out are required")
    out = cli.output_file("--out", _OUT.value, (".npz",))
    backbone = runs.load_backbone(cli.WORKDIR.value, cli.STEP.value, cli.STUDENT.value)
    size = _IMAGE_SIZE.value or backbone.cfg.aug.global_size
    try:
      backbone.module.grid(size)
    except ValueError as e:
      raise UsageError(f"image_size {e}") from None
    run_data = backbone.cfg.data
    data_cfg = ml_collections.ConfigDict(dict(source=_SOURCE.value, name=_NAME.value, data_dir=_DATA_DIR.value,
                                              path=_PATH.value, image_size=run_data.image_size,
                                              train_split=run_data.get("train_split", "train"),
                                              read_timeout_s=run_data.get("read_timeout_s", data.READ_TIMEOUT_S),
                                              follow_external_symlinks=run_data.get("follow_external_symlinks",
                                                                                    False)))
    classes = runs.run_classes(cli.WORKDIR.value, run_data, _SOURCE.value, _PATH.value)
    source = data.make_source(data_cfg, _SPLIT.value, classes)
    feats = extract(backbone, source, _BATCH.value, size, _PATCHES.value)
    check_finite(feats)
  except UsageError as e:
    fail(str(e))
  try:
    np.savez(out, **feats, step=backbone.step)
  except OSError as e:
    fail(f"cannot write --out {str(out)!r}: {e.strerror or e}")
  print(f"{len(feats['embedding'])} images from step {backbone.step}: "
        f"{', '.join(f'{k} {v.shape}' for k, v in feats.items())} -> {out}")


if __name__ == "__main__":
  cli.run(main)
