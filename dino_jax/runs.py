"""Reading a run directory (a training run's, or one `dino_jax.convert` wrote): its config and
its backbone, restored alone from the Orbax checkpoint on this host's devices (any count).

  backbone = dino_jax.load_backbone("runs/demo")          # the teacher of the newest checkpoint
  out = backbone(uint8_images)                              # {"embedding", "pooled", "patch"}
  out = jax.jit(lambda p, x: backbone.apply(p, x))(backbone.params, uint8_images)
"""
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import ml_collections

from dino_jax import augment
from dino_jax import checkpoints
from dino_jax import data
from dino_jax import models
from dino_jax.errors import UsageError


def recorded_config(path: str | os.PathLike) -> dict:
  """A run's recorded config file (its config.json) as a dict; UsageError naming the file when
  it cannot be read, is empty or truncated, or holds no JSON object."""
  try:
    text = pathlib.Path(path).read_bytes().decode("utf-8")
    recorded = json.loads(text) if text.strip() else None
  except OSError as e:
    raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise UsageError(f"{path} is damaged ({e}): restore it from a backup or a config.<step>.json beside it") from None
  if not isinstance(recorded, dict):
    raise UsageError(f"{path} is {'empty' if recorded is None else 'not a JSON object'}: restore it from a backup "
                     "or a config.<step>.json beside it")
  return recorded


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was made with (its config.json); UsageError when `workdir` is not a run
  or that file is damaged."""
  config_file = pathlib.Path(workdir) / "config.json"
  if not config_file.is_file():
    raise UsageError(f"{workdir!r} is not a dino_jax run directory (no config.json)")
  return ml_collections.ConfigDict(recorded_config(config_file))


class Backbone:
  """A restored backbone (any of `models.BACKBONES`) and its parameters.

  Called on uint8 [B, H, W, 3] images it returns {"embedding": [B, D] (the CLS token, or the
  pooled tokens where there is none), "pooled": [B, D] (the mean patch / region token),
  "patch": [B, h, w, D]}. With `size`, square images first get the evaluation view
  (`augment.preprocess_eval`: resized to size x 256 / 224, center size² crop); without it they
  are taken as they are (sides multiples of the patch size). `apply(params, images, size)` is
  the same pure function of the parameters, to jit, vmap or differentiate in your own code.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, params, step: int):
    self.cfg, self.params, self.step = cfg, params, step
    self.module = models.make_backbone(cfg.model)
    self._jitted = jax.jit(self.apply, static_argnums=2)

  def apply(self, params, images, size: int | None = None) -> dict:
    x = augment.normalize(images) if size is None else augment.preprocess_eval(images, size)
    out = self.module.apply(models.backbone_variables(params), x)
    return {"embedding": out["embedding"], "pooled": jnp.mean(out["patch"], axis=(1, 2)), "patch": out["patch"]}

  def __call__(self, images, size: int | None = None) -> dict:
    return self._jitted(self.params, images, size)


def load_backbone(workdir: str, step: int | None = None, student: bool = False) -> Backbone:
  """The teacher (default) or student backbone of `workdir`'s checkpoint `step` (default: the
  newest readable one); only the backbone's arrays are read."""
  cfg = read_config(workdir)
  weights, step = checkpoints.restore_weights(workdir, ("backbone",), step, student)
  return Backbone(cfg, weights["backbone"], step)


def run_classes(workdir: str, run_data: ml_collections.ConfigDict, source: str, path: str) -> list[str] | None:
  """The run's class list (`data.load_classes`) when reading the image folder it was trained
  on; else None, and the folder's own training split numbers the classes."""
  same_data = source == run_data.source == "folder" and os.path.realpath(path) == os.path.realpath(run_data.path)
  return data.load_classes(workdir) if same_data else None
