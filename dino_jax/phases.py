"""Training phases: a run that continues another run under changed settings.

DINOv2 ends its pretraining with a short high-resolution phase: "we increase the resolution of
images to 518 × 518 during a short period at the end of pretraining" (Oquab et al. 2023,
Sec. 4, "Adapting the resolution"), local crops staying at 98 px. A phase is a run directory
of its own whose config sets `phase.start_from` (the run it continues) and `phase.carry`:

- "params", "teacher", "opt_state", "centers": these parts of the train state come from the
  other run's checkpoint (`phase.start_step`, default its newest); the rest start fresh (a
  teacher EMA that is not carried starts from the carried student). A ResNet's running
  statistics come with the parameters they belong to.
- "step": the step count goes on from the other run's step, and every schedule (lr, weight
  decay, momentum, teacher temperature) is this config's, over its `epochs`, read from that
  step on: `epochs` then counts the whole training (all phases) and the phase trains the steps
  after the other run's. The curves continue exactly when the other run had the same `epochs`
  (and stopped early); after a finished run they are stretched to the new total (the demo's lr
  goes from its floor, 1e-6, back to 2e-5 at the phase's first step). Without "step" the
  schedules restart at 0 and span the phase's own `epochs`.

A ViT whose `model.pos_embed_grid` changed (16 -> 37 for 224 -> 518 px crops with patch 14)
gets its position embedding resized once, as the model resizes it on the fly, and stored at the
new grid, as the released DINOv2 checkpoints hold it (37 × 37); the Adam moments of that array
restart at 0. Any other array whose shape changed is one UsageError.

The phase (name, where it started) is in every checkpoint's metadata and in the rows of
`metrics.jsonl`; inside a phase a run resumes from its own checkpoints as any run does.
"""
import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from dino_jax import checkpoints
from dino_jax.errors import UsageError
from dino_jax.models.vit import resize_pos_embed
from dino_jax.optim import path_name


CARRY = ("params", "teacher", "opt_state", "centers", "step")  # the parts `phase.carry` may name


def active(cfg: ml_collections.ConfigDict) -> bool:
  return bool(cfg.get("phase", {}).get("start_from"))


def carried_keys(state: dict, carry) -> list[str]:
  """The train-state keys of the parts named in `phase.carry` ("centers": every center); a
  backbone's running statistics ("batch_stats") go with the weights ("params" or "teacher")."""
  keys = []
  for part in carry:
    keys += sorted(k for k in state if k.endswith("center")) if part == "centers" else [part]
  if "batch_stats" in state and {"params", "teacher"} & set(carry):
    keys.append("batch_stats")
  return keys


def _fit(path, saved, fresh, *, model_cfg):
  """The carried array `saved` in the shape of this config's `fresh` one."""
  name = path_name(path)
  if saved.shape == fresh.shape:
    return saved
  if name.endswith("backbone/pos_embed") and not name.startswith("opt_state"):
    resized = resize_pos_embed(saved, fresh.shape[1:3], model_cfg.get("interpolate_offset", 0.1),
                               model_cfg.get("interpolate_antialias", False))
    return jax.device_put(resized, fresh.sharding)
  if name.startswith("opt_state"):
    logging.warning("phase: %s starts fresh (shape %s, was %s)", name, fresh.shape, saved.shape)
    return fresh
  raise UsageError(f"phase.start_from: {name} has shape {tuple(saved.shape)} there and {tuple(fresh.shape)} in this "
                   "config; a phase may change the position-embedding grid, not the architecture")


def start(state: dict, cfg: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """`state` (a fresh one of this config) with the parts `phase.carry` names taken from run
  `phase.start_from`; and the phase's record for the checkpoints' metadata."""
  p = cfg.phase
  keys = carried_keys(state, p.carry)
  like = {k: state[k] for k in keys}
  parts, found = checkpoints.restore_state_parts(p.start_from, like, None if p.start_step < 0 else p.start_step)
  fitted = jax.tree_util.tree_map_with_path(lambda path, s, f: _fit(path, s, f, model_cfg=cfg.model), parts, like)
  if "params" in p.carry and "teacher" not in p.carry:  # the EMA starts from the carried student
    fitted["teacher"] = state["teacher"]._replace(value=jax.tree.map(jnp.copy, fitted["params"]))
    if "batch_stats" in fitted:  # its running statistics too (main_dino.py's start: a copy)
      student = fitted["batch_stats"]["student"]
      fitted["batch_stats"] = {"student": student, "teacher": jax.tree.map(jnp.copy, student)}
  elif "teacher" in p.carry and "params" not in p.carry and "batch_stats" in fitted:
    fitted["batch_stats"] = dict(fitted["batch_stats"], student=state["batch_stats"]["student"])
  record = {"name": p.name, "start_from": os.path.abspath(p.start_from), "start_step": int(found),
            "carry": list(p.carry)}
  return dict(state, **fitted), record
