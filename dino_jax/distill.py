"""Distillation from a frozen teacher (DINOv2, Oquab et al. 2023, Sec. 5 "Distillation").

DINOv2's released ViT-S/B/L were trained "with the same training loop with a few exceptions: a
larger model as a frozen teacher, a spare EMA of the student as the final model, no masking
and no stochastic depth, and the iBOT loss applied on the two global crops". Here:

- `config.distill.teacher` names a run directory (this project's runs, or `dino_jax.convert`ed
  official training checkpoints with their heads); its EMA teacher (backbone, DINO head and
  the iBOT head when the iBOT loss is on) is read once, checked against the configured
  architecture (`distill.model`, `distill.head`), placed by the sharding rules and given to the
  train step as a separate, never-updated argument: it is not part of the train state, so it
  is neither optimized nor written into the checkpoints.
- The train state's "teacher" is then the EMA of the student (`learner.train_step`), the model
  that extract, the evaluators and export read.
- The student's global crops are not masked; the iBOT loss compares every patch token.
- Each checkpoint records the teacher (path, step and a fingerprint of its checkpoint files) in
  its metadata; resuming against another teacher is one UsageError.
"""
import functools
import os
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from dino_jax import checkpoints
from dino_jax import objectives
from dino_jax import runs
from dino_jax import sharding
from dino_jax.errors import UsageError


def active(cfg: ml_collections.ConfigDict) -> bool:
  return bool(cfg.get("distill", {}).get("teacher"))


def teacher_parts(cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The parts of the teacher's checkpoint the targets need."""
  separate_ibot = "ibot" in objectives.active(cfg) and not cfg.distill.head.get("share_ibot_head", False)
  return ("backbone", "head") + (("ibot_head",) if separate_ibot else ())


def teacher_config(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`cfg` with the teacher's architecture (`distill.model`, `distill.head`) in place of the
  student's: `learner.make_model` of it is the teacher's model."""
  out = ml_collections.ConfigDict(cfg.to_dict())
  out.model = cfg.distill.model
  out.head = cfg.distill.head
  return out


class FrozenTeacher(NamedTuple):
  params: dict  # {"backbone", "head"[, "ibot_head"]}, placed by the sharding rules
  record: dict  # {"path", "step", "fingerprint"}: what each checkpoint's metadata records


def _teacher_shapes(cfg: ml_collections.ConfigDict, model) -> dict:
  """The frozen teacher's parameters (`teacher_parts`) as shapes."""
  size = cfg.aug.global_size
  index = jnp.zeros((1, 1), jnp.int32) if "ibot" in objectives.active(cfg) else None
  abstract = jax.eval_shape(functools.partial(model.init, patch_index=index), jax.random.PRNGKey(0),
                            jnp.zeros((1, size, size, 3)))["params"]
  return {part: abstract[part] for part in teacher_parts(cfg)}


def abstract_teacher(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, model) -> dict:
  """The frozen teacher's parameters as shapes placed on `mesh` (compiling without reading it)."""
  shapes = _teacher_shapes(cfg, model)
  return sharding.placed_abstract(shapes, sharding.state_shardings(shapes, mesh, cfg))


# Settings that do not change how the teacher computes (its run may have trained with others).
NOT_ARCHITECTURE = ("init_from", "dtype", "remat", "scan", "attention", "drop_path_rate", "drop_path_uniform")


def check_architecture(cfg: ml_collections.ConfigDict) -> None:
  """UsageError when the teacher run's recorded config (its config.json: training runs and
  `dino_jax.convert` write one) gives another architecture than `distill.model` /
  `distill.head` in a setting that no array shape shows (heads, LayerScale, interpolation...)."""
  path = pathlib.Path(cfg.distill.teacher) / "config.json"
  if not path.is_file():
    return
  recorded = runs.recorded_config(path)
  diffs = []
  for section in ("model", "head"):
    theirs, ours = recorded.get(section, {}), cfg.distill[section].to_dict()
    diffs += [f"distill.{section}.{k}: {ours[k]!r}, the teacher run's {theirs[k]!r}"
              for k in sorted(ours.keys() & theirs.keys())
              if k not in NOT_ARCHITECTURE and _plain(ours[k]) != _plain(theirs[k])]
  if diffs:
    raise UsageError(f"distill.teacher={cfg.distill.teacher!r} was trained with another architecture than "
                     f"distill.model / distill.head: {'; '.join(diffs[:4])}")


def _plain(value):
  return list(value) if isinstance(value, (tuple, list)) else value


def load_teacher(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, model, step: int | None = None
                 ) -> FrozenTeacher:
  """The frozen teacher of `cfg.distill` for `model` (the teacher's `DINOModel`): read from its
  run directory (checkpoint `step`, else `distill.teacher_step`, else its newest), checked
  against `model`'s parameters and the run's recorded architecture (one UsageError naming the
  differences) and placed on `mesh` as parameters are (FSDP)."""
  workdir = cfg.distill.teacher
  check_architecture(cfg)
  parts = teacher_parts(cfg)
  abstract = _teacher_shapes(cfg, model)
  if step is None and cfg.distill.get("teacher_step", -1) >= 0:
    step = cfg.distill.teacher_step
  saved, found = checkpoints.saved_teacher_shapes(workdir, step)
  wanted = checkpoints.shapes_by_name(abstract)
  diffs = [f"{k}: teacher run {saved.get(k, 'missing')} vs distill config {wanted[k]}"
           for k in sorted(wanted) if saved.get(k) != wanted[k] and not (k not in saved and checkpoints.is_added(k))]
  extra = [k for k in sorted(saved) if k.split("/")[0] in parts and k not in wanted
           and not k.endswith("mask_token")]  # the frozen teacher never masks
  diffs += [f"{k}: in the teacher run, not in distill.model / distill.head" for k in extra]
  if diffs:
    raise UsageError(f"distill.teacher={workdir!r} does not match distill.model / distill.head: {len(diffs)} "
                     f"arrays differ, e.g. {'; '.join(diffs[:3])}")
  placement = sharding.state_shardings(abstract, mesh, cfg)
  params, found = checkpoints.restore_weights(workdir, parts, found, shardings=placement)
  step_dir = pathlib.Path(os.path.abspath(workdir)) / "checkpoints" / str(found)
  record = {"path": os.path.abspath(workdir), "step": found, "fingerprint": checkpoints.fingerprint(step_dir)}
  return FrozenTeacher(params, record)


def resume_step(cfg: ml_collections.ConfigDict, saved_record: dict | None) -> int | None:
  """The teacher checkpoint a resumed run reads: the one its checkpoints record, when the config
  names the same teacher run without a `teacher_step` (its newest may have moved on since)."""
  if saved_record and cfg.distill.get("teacher_step", -1) < 0 and \
      saved_record.get("path") == os.path.abspath(cfg.distill.teacher):
    return saved_record.get("step")
  return None


def check_same_teacher(saved_record: dict | None, teacher: FrozenTeacher | None, workdir: str, step: int) -> None:
  """UsageError when the checkpoint a run resumes from was trained against another teacher,
  or with one while this config has none, or without one while this config has one."""
  if teacher is None:
    if saved_record is not None:
      raise UsageError(f"checkpoint {step} of {workdir} was trained by distillation from {saved_record.get('path')}; "
                       "set --config.distill.teacher (and distill.model / distill.head) to resume it")
    return
  if saved_record is None:
    raise UsageError(f"checkpoint {step} of {workdir} was not trained by distillation; distill.teacher="
                     f"{teacher.record['path']!r} cannot resume it (use another --workdir)")
  if saved_record.get("fingerprint") != teacher.record["fingerprint"]:
    raise UsageError(
        f"checkpoint {step} of {workdir} was trained against the teacher {saved_record.get('path')} "
        f"(step {saved_record.get('step')}, fingerprint {saved_record.get('fingerprint')}), not distill.teacher="
        f"{teacher.record['path']!r} (step {teacher.record['step']}, fingerprint {teacher.record['fingerprint']}): "
        "resume with that teacher, or start another --workdir")

