"""Checkpoints: the train state in Orbax, and parts of a run's weights for the tools.

A run directory holds `config.json` and `checkpoints/<step>` (Orbax, written under a temporary
name and renamed when complete). The trainer restores the whole state; extract, convert,
`model.init_from` and the evaluators read only the parts they need from the metadata.

Each step directory also holds `sha256sums.txt` (`sha256sum -c` format), written before Orbax's
final rename; a checkpoint whose files are missing, changed or unreadable is damaged, and
readers fall back to the newest readable one. One trainer at a time owns a run directory
(`WorkdirLock`).
"""
import contextlib
import errno
import hashlib
import json
import os
import pathlib
import shutil
import socket
import threading
import time

from absl import logging
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint._src.metadata import array_metadata_store
from orbax.checkpoint._src.serialization import type_handler_registry

from dino_jax import sharding
from dino_jax.errors import UsageError
from dino_jax.optim import path_name


MANIFEST = "sha256sums.txt"  # in each step directory: "<sha256>  <relative path>" lines
NOT_IN_MANIFEST = (MANIFEST, "_CHECKPOINT_METADATA")  # Orbax stamps the commit time in the latter when renaming
UNFINISHED = "*.orbax-checkpoint-tmp*"  # Orbax's name of a checkpoint being written
# Orbax writes a replicated array in slices, one per replica, so that hosts share the writing.
# Each slice is a dispatch (and, per new shape, a compile) on every local device: for the
# state's hundreds of small arrays (biases, norms, statistics) that costs more than it saves
# (docs/operations.md, Checkpoints, has the figures). Arrays whose per-replica slice would be
# smaller than this are written whole by one replica; the large matrices are still written in
# parallel.
MIN_REPLICA_SLICE_BYTES = 64 * 1024


class DamagedCheckpoint(Exception):
  """A checkpoint whose files are missing, changed or unreadable (the message says which)."""


class SaveError(RuntimeError):
  """A checkpoint could not be written; the message names the cause and the last complete one."""


def checkpoint_manager(workdir: str, cfg) -> ocp.CheckpointManager:
  """The trainer's manager. Unfinished checkpoints a killed run left behind are removed first
  (the caller holds the `WorkdirLock`); each new checkpoint gets its manifest before it is
  renamed into place."""
  directory = pathlib.Path(os.path.abspath(os.path.join(workdir, "checkpoints")))
  if jax.process_index() == 0:
    for unfinished in directory.glob(UNFINISHED):
      logging.warning("ignoring unfinished checkpoint %s (the run stopped while writing it): removed", unfinished)
      shutil.rmtree(unfinished)
  write = (lambda: [write_manifest(d) for d in directory.glob(UNFINISHED)]) if jax.process_index() == 0 else None
  handler = ocp.type_handlers.ArrayHandler(min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
                                           array_metadata_store=array_metadata_store.Store())  # Orbax's default + the bound
  type_handler_registry.GLOBAL_TYPE_HANDLER_REGISTRY.add(jax.Array, handler, override=True,
                                                         ignore_warnings=True)  # no stderr line: tools print one on errors
  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep,
                                         save_interval_steps=cfg.checkpoint.every_steps,
                                         enable_async_checkpointing=True,
                                         async_options=ocp.AsyncOptions(post_finalization_callback=write))
  return ocp.CheckpointManager(str(directory), options=options)


def write_manifest(step_dir: pathlib.Path) -> None:
  """sha256 of every file of a finished (not yet renamed) step directory, into its MANIFEST."""
  files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name not in NOT_IN_MANIFEST)
  (step_dir / MANIFEST).write_text("".join(f"{_sha256(p)}  {p.relative_to(step_dir)}\n" for p in files))


def _sha256(path: pathlib.Path) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def verify(step_dir: pathlib.Path) -> None:
  """Raises DamagedCheckpoint if a file listed in the step's MANIFEST is missing or changed.
  A step without one (written by an older version, or by dino_jax.convert) is not checked."""
  manifest = step_dir / MANIFEST
  if not manifest.is_file():
    return
  for line in manifest.read_text().splitlines():
    digest, sep, name = line.partition("  ")
    if not sep:
      raise DamagedCheckpoint(f"its {MANIFEST} is unreadable")
    if not (step_dir / name).is_file():
      raise DamagedCheckpoint(f"{name} is missing")
    if _sha256(step_dir / name) != digest:
      raise DamagedCheckpoint(f"{name} does not match its sha256 in {MANIFEST}")


@contextlib.contextmanager
def _read_errors_as_damage():
  """Errors of Orbax / TensorStore reading a checkpoint, as DamagedCheckpoint (first line)."""
  try:
    yield
  except UsageError:
    raise
  except (ValueError, OSError, KeyError, TypeError) as e:
    raise DamagedCheckpoint(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}") from e


def read_newest(directory: pathlib.Path, steps, read) -> tuple[object, int, dict[int, DamagedCheckpoint]]:
  """(read(step), step, damaged) for the newest of `steps` that is not damaged (MANIFEST
  verified, then `read`); `damaged` maps each newer, damaged step to why. UsageError if none
  can be read."""
  damaged = {}
  for step in sorted(steps, reverse=True):
    try:
      verify(directory / str(step))
      with _read_errors_as_damage():
        return read(step), step, damaged
    except DamagedCheckpoint as e:
      damaged[step] = e
  raise UsageError(f"no readable checkpoint in {directory}: " +
                   "; ".join(f"step {s} is damaged ({e})" for s, e in damaged.items()))


def complete_steps(directory: pathlib.Path) -> list[int]:
  """Steps of the complete checkpoints on disk (renamed into place by Orbax), oldest first."""
  return sorted(int(p.name) for p in directory.glob("*") if p.name.isdigit() and p.is_dir())


def _failure_cause(error: BaseException) -> str:
  """"no space left on device" when that is what failed anywhere along `error`'s chain (an
  OSError or TensorStore's message), else the innermost error's first line."""
  chain = []
  while error is not None and error not in chain:
    chain.append(error)
    error = error.__cause__ or error.__context__
  no_space = os.strerror(errno.ENOSPC)
  if any(getattr(e, "errno", None) == errno.ENOSPC or no_space in str(e) for e in chain):
    return "no space left on device"
  return f"{type(chain[-1]).__name__}: {(str(chain[-1]).splitlines() or [''])[0]}"


@contextlib.contextmanager
def _saving(mngr: ocp.CheckpointManager):
  """Any failure to write `mngr`'s checkpoints (raised now or by an earlier asynchronous save)
  as one SaveError naming the cause and the last complete checkpoint."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  (Orbax re-raises its threads' errors)
    directory = pathlib.Path(str(mngr.directory))
    last = complete_steps(directory)[-1:]
    raise SaveError(f"could not write a checkpoint to {directory}: {_failure_cause(e)}; last complete "
                    f"checkpoint: {f'step {last[0]}' if last else 'none'}") from e


def save(mngr: ocp.CheckpointManager, step: int, state: dict, force: bool = False,
         metadata: dict | None = None) -> bool:
  """Starts saving `state` as `step` when the interval (or `force`) says so; whether it did.
  `metadata` (JSON) goes into the checkpoint's metadata (the phase, the distillation teacher)."""
  with _saving(mngr):
    return mngr.save(step, args=ocp.args.StandardSave(state), force=force, custom_metadata=metadata or {})


def saved_metadata(mngr: ocp.CheckpointManager, step: int) -> dict:
  """The `metadata` that `save` wrote with checkpoint `step` ({} for older checkpoints)."""
  return dict(mngr.metadata(step).custom_metadata or {})


def fingerprint(step_dir: pathlib.Path) -> str:
  """A short sha256 over the files of a checkpoint (their MANIFEST, or the files themselves
  where it has none): the same for any copy of it, whatever the device count."""
  manifest = step_dir / MANIFEST
  if manifest.is_file():
    text = manifest.read_text()
  else:
    files = sorted(p for p in step_dir.rglob("*") if p.is_file() and p.name not in NOT_IN_MANIFEST)
    text = "".join(f"{_sha256(p)}  {p.relative_to(step_dir)}\n" for p in files)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def wait_until_saved(mngr: ocp.CheckpointManager) -> None:
  """Waits for the checkpoint being written (SaveError if it failed)."""
  with _saving(mngr):
    mngr.wait_until_finished()


def prune(mngr: ocp.CheckpointManager, keep: int) -> None:
  """Deletes all but the newest `keep` checkpoints (e.g. after `checkpoint.keep` was lowered)."""
  for step in sorted(mngr.all_steps())[:-keep]:
    logging.warning("removing checkpoint %d of %s (checkpoint.keep=%d)", step, mngr.directory, keep)
    mngr.delete(step)


# Arrays the models gained after runs were first written, by the last part of their name: a
# checkpoint without one reads it as zeros, which computes what the older model computed (its
# CLS token held the position embedding's CLS slot, now `cls_pos_embed`).
ADDED_ARRAYS = ("cls_pos_embed",)


def is_added(name: str) -> bool:
  return name.rsplit("/", 1)[-1] in ADDED_ARRAYS


def _prune(tree, names: set[str], prefix: str = ""):
  """`tree` (dicts, lists, tuples, namedtuples of arrays) without the dict entries named in
  `names` ("part/.../name", `path_name`'s form)."""
  name = lambda key: f"{prefix}/{key}" if prefix else str(key)
  if isinstance(tree, dict):
    return {k: _prune(v, names, name(k)) for k, v in tree.items() if name(k) not in names}
  if isinstance(tree, tuple) and hasattr(tree, "_fields"):
    return type(tree)(*(_prune(v, names, name(f)) for f, v in zip(tree._fields, tree)))
  if isinstance(tree, (list, tuple)):
    return type(tree)(_prune(v, names, name(i)) for i, v in enumerate(tree))
  return tree


def with_added_arrays(restored, like):
  """`restored` (`like` without some of the arrays of `ADDED_ARRAYS`) with each of those as
  zeros placed as `like`'s."""
  flat = by_name(restored)
  return jax.tree_util.tree_map_with_path(
      lambda p, x: flat[path_name(p)] if path_name(p) in flat else jnp.zeros(x.shape, x.dtype, device=x.sharding),
      like)


def with_added_weights(weights: dict) -> dict:
  """Backbone weights of an older run with each array of `ADDED_ARRAYS` it lacks as zeros of its
  CLS token's shape and placement (the one added array: the CLS slot of the position embedding)."""
  if "cls_token" not in weights or "cls_pos_embed" in weights:
    return weights
  return dict(weights, cls_pos_embed=jnp.zeros_like(weights["cls_token"]))


def by_name(tree) -> dict:
  """{"part/.../name": leaf} of a pytree."""
  return {path_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def shapes_by_name(tree) -> dict[str, tuple]:
  """{"part/.../name": shape} of a pytree's arrays (or of a checkpoint's array metadata)."""
  return {name: tuple(getattr(leaf, "shape", ())) for name, leaf in by_name(tree).items()}


def weights_manager(workdir: str) -> ocp.CheckpointManager:
  """A manager of `workdir`'s checkpoints for reading their metadata and parts of them."""
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               item_handlers=ocp.PyTreeCheckpointHandler())


def read_run(mngr: ocp.CheckpointManager, step: int | None, read) -> tuple[object, int]:
  """(read(step), step) for `step` or the newest readable checkpoint of `mngr` (newer damaged
  ones reported, one line each); closes `mngr`."""
  directory = pathlib.Path(str(mngr.directory))
  out, found, damaged = read_newest(directory, mngr.all_steps() if step is None else [step], read)
  for bad, why in damaged.items():
    logging.warning("checkpoint %d in %s is damaged (%s); using step %d, the newest readable one",
                    bad, directory, why, found)
  mngr.close()
  return out, found


def run_manager(workdir: str, step: int | None) -> ocp.CheckpointManager:
  """`weights_manager(workdir)`; UsageError when it has no checkpoint (or not `step`)."""
  mngr = weights_manager(workdir)
  if not mngr.all_steps() or (step is not None and step not in mngr.all_steps()):
    raise UsageError(f"no checkpoint{'' if step is None else f' {step}'} in {workdir!r} "
                     f"(has: {sorted(mngr.all_steps()) or 'none'})")
  return mngr


def check_checkpoint_matches(step_dir: pathlib.Path, state: dict) -> set[str]:
  """Raises UsageError naming the differences when the checkpoint's arrays (names, shapes)
  are not those of `state`: a run directory of another config or architecture. Returns the
  names of `state`'s arrays the checkpoint lacks (of `ADDED_ARRAYS`: an older run)."""
  mngr = weights_manager(str(step_dir.parent.parent))
  with _read_errors_as_damage():
    saved = shapes_by_name(mngr.item_metadata(int(step_dir.name)))
  mngr.close()
  if not saved:
    raise DamagedCheckpoint("its array metadata cannot be read")
  wanted = shapes_by_name(state)
  diffs = [f"{k}: checkpoint {saved.get(k, 'missing')} vs config {wanted.get(k, 'missing')}"
           for k in sorted(saved.keys() | wanted.keys())
           if saved.get(k) != wanted.get(k) and not (k not in saved and is_added(k))]
  if diffs:
    raise UsageError(f"checkpoint {step_dir} does not match this config: {len(diffs)} arrays differ, "
                     f"e.g. {'; '.join(diffs[:3])}")
  return set(wanted) - set(saved)


def restore_or_keep(mngr: ocp.CheckpointManager, state: dict) -> dict:
  """The newest readable checkpoint restored with `state`'s shapes and shardings, else `state`
  (a fresh run). Newer damaged checkpoints are reported, one line each, and set aside as
  `<step>.damaged` so that training goes on from the readable one; UsageError if none is
  readable, or if the checkpoint is of another config."""
  directory = pathlib.Path(str(mngr.directory))
  if not mngr.all_steps():
    return state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)

  def read(step):
    added = check_checkpoint_matches(directory / str(step), state)
    if not added:
      return mngr.restore(step, args=ocp.args.StandardRestore(abstract))
    restored = mngr.restore(step, args=ocp.args.StandardRestore(_prune(abstract, added)))
    return with_added_arrays(restored, state)

  restored, step, damaged = read_newest(directory, mngr.all_steps(), read)
  for bad, why in damaged.items():
    logging.warning("checkpoint %d in %s is damaged (%s): set aside as %d.damaged; resuming from step %d, "
                    "the newest readable one", bad, directory, why, bad, step)
    if jax.process_index() == 0:
      shutil.rmtree(directory / f"{bad}.damaged", ignore_errors=True)
      (directory / str(bad)).rename(directory / f"{bad}.damaged")
  if damaged:
    mngr.reload()
  return restored


def saved_teacher_shapes(workdir: str, step: int | None = None) -> tuple[dict[str, tuple], int]:
  """(`shapes_by_name` of the teacher of run `workdir` at `step` (default: the newest
  readable checkpoint), that step), from the metadata alone."""
  mngr = run_manager(workdir, step)

  def read(step):
    saved = mngr.item_metadata(step)
    if not saved:
      raise DamagedCheckpoint("its array metadata cannot be read")
    if "teacher" not in saved:
      raise UsageError(f"{workdir!r} holds no teacher (not a dino_jax training or converted run)")
    return shapes_by_name(saved["teacher"]["value"])

  return read_run(mngr, step, read)


def restore_weights(workdir: str, parts: tuple[str, ...], step: int | None = None,
                    student: bool = False, shardings: dict | None = None) -> tuple[dict, int]:
  """Those of `parts` ("backbone", "head", "ibot_head") that the teacher (or student) of run
  `workdir` has at `step` (default: the newest readable checkpoint, reporting newer damaged
  ones), as saved; nothing else is read. Each array is placed as `shardings` ({part: pytree of
  shardings}) says, else replicated on this host's devices. Returns (weights, step)."""
  mngr = run_manager(workdir, step)

  def read(step):
    saved = all_saved = mngr.item_metadata(step)
    if not saved:
      raise DamagedCheckpoint("its array metadata cannot be read")
    if not student:
      saved = saved["teacher"]["value"]
    elif "params" in saved:
      saved = saved["params"]
    else:
      raise UsageError(f"{workdir!r} holds no student weights (a converted model holds its teacher only)")
    # A backbone with batch norm: its running statistics too (the train state's "batch_stats"),
    # placed as its weights' "batch_stats" in `shardings`.
    who = "student" if student else "teacher"
    stats = (all_saved.get("batch_stats") or {}).get(who, {})
    shape_of = lambda tree: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)
    wanted = {p: shape_of(saved[p]) for p in parts if p in saved}
    wanted_stats = {p: shape_of(stats[p]) for p in parts if p in stats}
    replicated = sharding.replicated(sharding.make_mesh())
    placed = by_name(shardings or {})
    args = lambda tree, prefix="": jax.tree_util.tree_map_with_path(
        lambda path, _: ocp.ArrayRestoreArgs(sharding=placed.get(prefix + path_name(path), replicated)), tree)
    nest = (lambda x: {"params": x}) if student else (lambda x: {"teacher": {"value": x}})
    item, restore_args = nest(wanted), nest(args(wanted))
    if wanted_stats:
      item["batch_stats"] = {who: wanted_stats}
      restore_args["batch_stats"] = {who: {p: args(t, f"{p}/batch_stats/") for p, t in wanted_stats.items()}}
    restored = mngr.restore(step, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args,
                                                              partial_restore=True))
    weights = dict(restored["params"] if student else restored["teacher"]["value"])
    for p, s in restored.get("batch_stats", {}).get(who, {}).items():
      weights[p] = dict(weights[p], batch_stats=s)  # `models.backbone_weights`
    return weights | ({"backbone": with_added_weights(weights["backbone"])} if "backbone" in weights else {})

  return read_run(mngr, step, read)


def _listed(names: list[str], shown: int = 3) -> str:
  """The first `shown` names, and how many more there are."""
  more = f" (and {len(names) - shown} more)" if len(names) > shown else ""
  return ", ".join(names[:shown]) + more


def restore_state_parts(workdir: str, like: dict, step: int | None = None) -> tuple[dict, int]:
  """The top-level parts of run `workdir`'s train state that `like` (a part of a train state)
  names, at `step` (default: the newest readable checkpoint), each array with its saved shape,
  placed as `like`'s array of the same name (replicated where the shapes differ). UsageError
  naming the arrays that the checkpoint lacks. Returns (parts, step)."""
  mngr = run_manager(workdir, step)

  def read(step):
    saved = shapes_by_name(mngr.item_metadata(step) or {})
    if not saved:
      raise DamagedCheckpoint("its array metadata cannot be read")
    wanted = shapes_by_name(like)
    added = {name for name in wanted if name not in saved and is_added(name)}
    missing = sorted((name for name in wanted if name not in saved and name not in added),
                     key=lambda name: name.startswith("opt_state"))  # the parameters first
    if missing:
      raise UsageError(f"checkpoint {step} of {workdir!r} has no {_listed(missing)}: another kind of run")
    extra = sorted((name for name in saved if name.split("/")[0] in like and name not in wanted
                    and not name.endswith("mask_token")),  # iBOT's, unused without it
                   key=lambda name: name.startswith("opt_state"))
    if extra:
      raise UsageError(f"checkpoint {step} of {workdir!r} has {_listed(extra)}, which this config lacks: "
                       "another architecture")
    replicated = sharding.replicated(next(iter(jax.tree.leaves(like))).sharding.mesh)
    present = _prune(like, added)
    shape = lambda path: saved[path_name(path)]
    item = jax.tree_util.tree_map_with_path(lambda p, x: jax.ShapeDtypeStruct(shape(p), x.dtype), present)
    args = jax.tree_util.tree_map_with_path(lambda p, x: ocp.ArrayRestoreArgs(
        sharding=x.sharding if shape(p) == x.shape else replicated, global_shape=shape(p), dtype=x.dtype), present)
    restored = mngr.restore(step, args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True))
    return with_added_arrays(restored, like) if added else restored

  return read_run(mngr, step, read)


def init_from_run(state: dict, workdir: str) -> dict:
  """`state` whose student and teacher start from the teacher of run `workdir` (a converted
  PyTorch model or another run): its backbone, which must fit the config (a mask token it lacks
  keeps its fresh value), with its running statistics (a ResNet's), and its DINO / iBOT heads
  where their shapes fit (else fresh)."""
  source, _ = restore_weights(workdir, tuple(state["params"]))
  if "backbone" not in source:
    raise UsageError(f"model.init_from={workdir!r}: its checkpoint has no teacher backbone")
  source["backbone"] = dict(source["backbone"])
  stats = source["backbone"].pop("batch_stats", None)  # a ResNet's running statistics
  params = dict(state["params"])
  for part, theirs in source.items():
    have, got = shapes_by_name(params[part]), shapes_by_name(theirs)
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
  state = dict(state, params=params, teacher=state["teacher"]._replace(value=jax.tree.map(jnp.copy, params)))
  if stats is not None and "batch_stats" in state:  # both start with the source teacher's running statistics
    fresh = state["batch_stats"]["student"]["backbone"]
    placed = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), stats, fresh)
    state["batch_stats"] = {who: dict(state["batch_stats"][who], backbone=jax.tree.map(jnp.copy, placed))
                            for who in ("student", "teacher")}
  return state



class WorkdirLock:
  """One trainer at a time in a run directory: `<workdir>/lock.json` names the owner (host,
  PID, start time); it is created exclusively (O_EXCL) and its mtime refreshed every
  HEARTBEAT_S while the owner runs. A second trainer is refused with one line while the owner
  lives; a stale lock (its PID gone on this host, or not refreshed for STALE_S on another
  host) is taken over. For POSIX file systems (local disks, NFS); not for gs:// paths."""
  FILE = "lock.json"
  HEARTBEAT_S = 60
  STALE_S = 600

  def __init__(self, workdir: str):
    self.path = pathlib.Path(workdir) / self.FILE
    self.owner = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
    self._stop = threading.Event()

  def _holder_if_live(self) -> dict | None:
    """The lock's owner if it may still run, None if the lock is stale (or gone)."""
    try:
      age = time.time() - self.path.stat().st_mtime
      holder = json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except ValueError:  # being written right now, or garbage: judged by its age
      holder = {}
    if holder.get("host") == self.owner["host"] and isinstance(holder.get("pid"), int):
      try:
        os.kill(holder["pid"], 0)
      except ProcessLookupError:
        return None
      except PermissionError:  # alive, another user's
        pass
      return holder
    return holder if age < self.STALE_S else None

  def __enter__(self) -> "WorkdirLock":
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        holder = self._holder_if_live()
        if holder is not None:
          raise UsageError(f"{self.path.parent} is in use by another trainer (pid {holder.get('pid', '?')} on "
                           f"{holder.get('host', '?')}, since {holder.get('started', '?')}; lock {self.path}): "
                           "wait for it to end or use another --workdir") from None
        logging.warning("taking over the stale lock %s (its trainer is gone)", self.path)
        self.path.unlink(missing_ok=True)
        continue
      with os.fdopen(fd, "w") as f:
        json.dump(self.owner, f)
      threading.Thread(target=self._heartbeat, daemon=True, name="workdir-lock").start()
      return self
    raise UsageError(f"could not lock {self.path}: other trainers are starting in {self.path.parent}")

  def _heartbeat(self):
    while not self._stop.wait(self.HEARTBEAT_S):
      try:
        os.utime(self.path)
      except OSError:
        return

  def __exit__(self, *exc):
    self._stop.set()
    try:
      if json.loads(self.path.read_text()) == self.owner:
        self.path.unlink()
    except (OSError, ValueError):
      pass
