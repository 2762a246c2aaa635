"""Checkpoints: the train state in Orbax, and parts of a run's weights for the tools.

A run directory holds `config.json` and `checkpoints/<step>` (Orbax, written under a temporary
name and renamed when complete). The trainer restores the whole state; extract, convert,
`model.init_from` and the evaluators read only the parts they need from the metadata.
"""
import os
import pathlib

from absl import logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from dino_jax import sharding
from dino_jax.errors import UsageError
from dino_jax.optim import path_name


def checkpoint_manager(workdir: str, cfg) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep,
                                         save_interval_steps=cfg.checkpoint.every_steps,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def _shapes_by_name(tree) -> dict[str, tuple]:
  return {path_name(path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def weights_manager(workdir: str) -> ocp.CheckpointManager:
  """A manager of `workdir`'s checkpoints for reading their metadata and parts of them."""
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               item_handlers=ocp.PyTreeCheckpointHandler())


def check_checkpoint_matches(step_dir: pathlib.Path, state: dict) -> None:
  """Raises UsageError naming the differences when the checkpoint's arrays (names, shapes)
  are not those of `state`: a run directory of another config or architecture."""
  mngr = weights_manager(str(step_dir.parent.parent))
  saved = _shapes_by_name(mngr.item_metadata(int(step_dir.name)))
  mngr.close()
  wanted = _shapes_by_name(state)
  diffs = [f"{k}: checkpoint {saved.get(k, 'missing')} vs config {wanted.get(k, 'missing')}"
           for k in sorted(saved.keys() | wanted.keys()) if saved.get(k) != wanted.get(k)]
  if diffs:
    raise UsageError(f"checkpoint {step_dir} does not match this config: {len(diffs)} arrays differ, "
                     f"e.g. {'; '.join(diffs[:3])}")


def restore_or_keep(mngr: ocp.CheckpointManager, state: dict) -> dict:
  """The latest checkpoint restored with `state`'s shapes and shardings, else `state`.

  Orbax writes a checkpoint under a temporary name and renames it when complete, so one
  cut short by a kill is never restored; it is reported here and left alone.
  """
  for unfinished in pathlib.Path(str(mngr.directory)).glob("*.orbax-checkpoint-tmp*"):
    logging.warning("ignoring unfinished checkpoint %s (the run stopped while writing it)", unfinished)
  step = mngr.latest_step()
  if step is None:
    return state
  check_checkpoint_matches(pathlib.Path(str(mngr.directory)) / str(step), state)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_weights(workdir: str, parts: tuple[str, ...], step: int | None = None,
                    student: bool = False) -> tuple[dict, int]:
  """Those of `parts` ("backbone", "head", "ibot_head") that the teacher (or student) of run
  `workdir` has at `step` (default: the latest), as saved, replicated on this host's devices;
  nothing else is read. Returns (weights, step)."""
  mngr = weights_manager(workdir)
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise UsageError(f"no checkpoint {'' if step is None else step} in {workdir!r} "
                     f"(has: {sorted(mngr.all_steps()) or 'none'})")
  saved = mngr.item_metadata(step)
  if not student:
    saved = saved["teacher"]["value"]
  elif "params" in saved:
    saved = saved["params"]
  else:
    raise UsageError(f"{workdir!r} holds no student weights (a converted model holds its teacher only)")
  replicated = sharding.replicated(sharding.make_mesh())
  wanted = {p: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved[p]) for p in parts if p in saved}
  args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=replicated), wanted)
  nest = (lambda x: {"params": x}) if student else (lambda x: {"teacher": {"value": x}})
  restored = mngr.restore(step, args=ocp.args.PyTreeRestore(item=nest(wanted), restore_args=nest(args),
                                                            partial_restore=True))
  mngr.close()
  return (restored["params"] if student else restored["teacher"]["value"]), step


def init_from_run(state: dict, workdir: str) -> dict:
  """`state` whose student and teacher start from the teacher of run `workdir` (a converted
  PyTorch model or another run): its backbone, which must fit the config (a mask token it lacks
  keeps its fresh value), and its DINO / iBOT heads where their shapes fit (else fresh)."""
  source, _ = restore_weights(workdir, tuple(state["params"]))
  if "backbone" not in source:
    raise UsageError(f"model.init_from={workdir!r}: its checkpoint has no teacher backbone")
  params = dict(state["params"])
  for part, theirs in source.items():
    have, got = _shapes_by_name(params[part]), _shapes_by_name(theirs)
    diffs = [f"{k}: {got.get(k, 'missing')} vs config {have.get(k, 'missing')}"
             for k in sorted(have.keys() | got.keys()) if have.get(k) != got.get(k) and k != "mask_token"]
    if diffs and part == "backbone":
      raise UsageError(f"model.init_from={workdir!r}: its backbone does not fit this config: "
                       f"{len(diffs)} arrays differ, e.g. {'; '.join(diffs[:3])}")
    if diffs:
      logging.warning("model.init_from: %s not used (shapes differ from the config: %s)", part, diffs[0])
      continue
    placed = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), dict(theirs),
                          {k: params[part][k] for k in theirs})  # onto this run's (FSDP) placement
    params[part] = dict(params[part]) | placed
  # Separate buffers for the two copies: the train step donates the whole state.
  return dict(state, params=params, teacher=state["teacher"]._replace(value=jax.tree.map(jnp.copy, params)))

