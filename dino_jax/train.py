"""DINO / DINOv2 / EsViT self-supervised pretraining: the loop and the command line.

  python -m dino_jax.train --config configs/demo_fashion_mnist.py --workdir /tmp/run \
      [--config.key=value ...]

Everything a run does is in its config. The pieces: `learner` (train state, jitted step),
`objectives` (losses), `models` (backbone registry, heads), `sharding` (mesh, placement),
`checkpoints` (Orbax), `evaluators` (k-NN / linear probe), `data` and `augment` (inputs).
"""
import contextlib
import json
import logging as std_logging
import os
import pathlib
import signal
import sys
import threading
import time

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import tqdm

from dino_jax import checkpoints
from dino_jax import config_checks
from dino_jax import crops
from dino_jax import data
from dino_jax import distill
from dino_jax import evaluators
from dino_jax import host_memory
from dino_jax import learner
from dino_jax import optim
from dino_jax import phases
from dino_jax import sharding
from dino_jax.errors import UsageError
from dino_jax.errors import fail

# ---------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------


class DivergenceError(RuntimeError):
  """The loss or gradients became non-finite and the config says to stop."""


stop_requested = threading.Event()  # set by SIGTERM / Ctrl-C: save at the next step boundary and exit


def collapse_warnings(metrics: dict, num_prototypes: int) -> list[str]:
  """Signs of the two DINO collapses (Caron et al. 2021, Sec. 5.3) in a step's metrics."""
  out = []
  if metrics["teacher_entropy"] > 0.99 * np.log(num_prototypes):
    out.append(f"teacher entropy {metrics['teacher_entropy']:.3f} is near log K: near-uniform targets")
  if metrics["teacher_kl_to_mean"] < 1e-2:
    out.append(f"KL(teacher || mean teacher) {metrics['teacher_kl_to_mean']:.4f} is near 0: "
               "every image gets the same target")
  if metrics["teacher_feature_std"] < 1e-3:
    out.append(f"teacher CLS features barely vary over the batch (std {metrics['teacher_feature_std']:.2e})")
  return out


def _row_step(line: str) -> int | None:
  """The step of a metrics.jsonl row, None for a half-written line."""
  try:
    return int(json.loads(line)["step"])
  except (ValueError, KeyError, TypeError):
    return None


def keep_metrics_up_to(path: pathlib.Path, step: int) -> None:
  """Drops the rows of `path` past `step` (written after the checkpoint a resume starts from,
  so written again) and half-written lines, so that every step appears once."""
  if not path.is_file():
    return
  lines = path.read_text().splitlines()
  kept = [line for line in lines if (s := _row_step(line)) is not None and s <= step]
  if len(kept) < len(lines):
    path.with_name(path.name + ".tmp").write_text("".join(line + "\n" for line in kept))
    os.replace(path.with_name(path.name + ".tmp"), path)


class MetricWriter:
  """Scalars to <workdir>/metrics.jsonl and TensorBoard (process 0 only), from `start_step` on
  (rows past it, from before a resume, are dropped); `tags` (e.g. the phase's name) go into
  every metrics.jsonl row."""

  def __init__(self, workdir: str, start_step: int = 0, tags: dict | None = None):
    self.active = jax.process_index() == 0
    self.tags = tags or {}
    if self.active:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      keep_metrics_up_to(pathlib.Path(workdir) / "metrics.jsonl", start_step)
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict):
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self.jsonl.write(json.dumps({"step": step, **self.tags, **scalars}) + "\n")
    self.jsonl.flush()
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self):
    if self.active:
      self.jsonl.close()
      self.tb.close()


def config_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
  """"key: old -> new" for every (nested, dotted) key whose value differs."""
  out = []
  for k in sorted(old.keys() | new.keys()):
    a, b = old.get(k, "(none)"), new.get(k, "(none)")
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_changes(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}: {json.dumps(a)} -> {json.dumps(b)}")
  return out


def record_config(workdir: str, cfg: ml_collections.ConfigDict, step: int) -> None:
  """Writes the config in force to <workdir>/config.json. A resume at `step` > 0 with another
  (compatible) config keeps the history: config.<N>.json is the config used from step N on
  (config.0.json the first one), and the changes are printed."""
  path = pathlib.Path(workdir) / "config.json"
  text = cfg.to_json(indent=2)
  changes = config_changes(json.loads(path.read_text()), json.loads(text)) if path.is_file() and step else []
  if changes:
    if not any(path.parent.glob("config.*.json")):
      path.rename(path.with_name("config.0.json"))
    path.with_name(f"config.{step}.json").write_text(text)
    print(f"config changed on resuming at step {step} (kept as config.{step}.json; the earlier ones as "
          f"config.<step>.json): {'; '.join(changes)}", flush=True)
  path.write_text(text)


def eval_every_steps(name: str, ecfg: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  """How often evaluator `name` runs, in steps: evals.<name>.every_steps (N > 0 every N steps,
  0 at the end only, -1 never) or evals.<name>.every_epochs (E > 0: every E epochs of this
  data), one of the two."""
  every_epochs = ecfg.get("every_epochs", 0)
  if every_epochs and every_epochs > 0:
    if ecfg.every_steps != 0:
      raise UsageError(f"evals.{name}: set every_steps ({ecfg.every_steps}) or every_epochs ({every_epochs}), "
                       "not both")
    return max(round(every_epochs * steps_per_epoch), 1)
  return ecfg.every_steps


def newest_metadata(mngr) -> dict:
  """The `checkpoints.save` metadata of the run's newest checkpoint ({} for none, or where it
  cannot be read: the restore then reports the damage)."""
  step = mngr.latest_step()
  try:
    return {} if step is None else checkpoints.saved_metadata(mngr, step)
  except (OSError, ValueError, KeyError):
    return {}


def lineage_metadata(mngr, trainer: learner.Trainer) -> dict:
  """What each checkpoint of the run records about where it comes from: the phase it belongs to
  ("phase", as `phases.start` made it when the phase began) and the distillation teacher
  ("distill_teacher"). UsageError when the run resumes against another teacher than the one it
  was trained against, or with / without one against how it was trained."""
  step = mngr.latest_step()
  saved = {} if step is None else checkpoints.saved_metadata(mngr, step)
  out = {"phase": saved["phase"]} if "phase" in saved else {}
  if step is not None:
    distill.check_same_teacher(saved.get("distill_teacher"), trainer.frozen_teacher, str(mngr.directory), step)
  if trainer.frozen_teacher is not None:
    out["distill_teacher"] = trainer.frozen_teacher.record
  return out


def train(cfg: ml_collections.ConfigDict, workdir: str, max_steps: int | None = None,
          frozen_teacher: distill.FrozenTeacher | None = None) -> dict:
  """Trains (or resumes) the run in `workdir`, holding its `WorkdirLock`; returns the final
  state and evaluation results.

  `max_steps` stops early (after that many total steps) without changing any schedule:
  the way tests and users simulate an interrupted run. `frozen_teacher`: a distillation
  teacher already loaded (`distill.load_teacher`), else the config's is read.
  """
  pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
  with checkpoints.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    return _train(cfg, workdir, max_steps, frozen_teacher)


def _train(cfg: ml_collections.ConfigDict, workdir: str, max_steps: int | None, frozen_teacher) -> dict:
  mesh = sharding.make_mesh(cfg)
  config_checks.check(cfg, mesh.size)  # also for configs built in Python (main has checked the CLI's)
  train_src = data.make_source(cfg.data, cfg.data.train_split)
  evals = evaluators.make(cfg, mesh, labelled=bool(getattr(train_src, "num_classes", None)))
  steps_per_epoch = cfg.get("epoch_length", 0) or max(len(train_src) // cfg.batch_size, 1)  # DINOv2: 1250
  total_steps = optim.total_steps(cfg, steps_per_epoch)
  eval_every = {name: eval_every_steps(name, e, steps_per_epoch) for name, e in cfg.evals.items()}

  mngr = checkpoints.checkpoint_manager(workdir, cfg)
  teacher_step = None  # a resumed distillation reads the teacher checkpoint it recorded
  if distill.active(cfg):
    teacher_step = distill.resume_step(cfg, newest_metadata(mngr).get("distill_teacher"))
  trainer = learner.build(cfg, mesh, steps_per_epoch, frozen_teacher, teacher_step=teacher_step)
  if jax.process_index() == 0:
    print(f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} devices, "
          f"mesh {dict(mesh.shape)}, {total_steps} steps", flush=True)
  state = checkpoints.restore_or_keep(mngr, trainer.state)  # refuses another config: nothing written yet
  checkpoints.prune(mngr, cfg.checkpoint.keep)
  lineage = lineage_metadata(mngr, trainer)  # refuses another distillation teacher
  if mngr.latest_step() is None and phases.active(cfg):
    state, lineage["phase"] = phases.start(state, cfg)
    if int(state["step"]) >= total_steps:
      raise UsageError(f"phase.start_from={cfg.phase.start_from!r} is at step {int(state['step'])}, at or past the "
                       f"end of this config's schedule ({total_steps} steps): raise epochs (it counts every phase "
                       "when the step is carried)")
  elif cfg.model.init_from and mngr.latest_step() is None:
    state = checkpoints.init_from_run(state, cfg.model.init_from)
  start_step = int(state["step"])
  if jax.process_index() == 0:
    record_config(workdir, cfg, start_step)
  data.save_classes(train_src, workdir)  # the class ids of evaluations and extract
  aug_key = learner.augmentation_key(cfg)
  to_global = lambda tree: jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(trainer.batch_sharding, x), tree)

  writer = MetricWriter(workdir, start_step, {"phase": lineage["phase"]["name"]} if "phase" in lineage else {})
  end_step = total_steps if max_steps is None else min(max_steps, total_steps)
  batches = data.train_batches(train_src, cfg.batch_size, cfg.seed, start_step, crops.crop_specs(cfg.aug),
                               jax.process_index(), jax.process_count(), workers=cfg.data.get("workers", 8),
                               interrupt=stop_requested)
  # The bar moves at log steps, where the host waits for the device: between them, asynchronous
  # dispatch runs ahead of the computation and the rate would swing.
  bar = tqdm.tqdm(total=end_step, initial=start_step, desc="train", unit="step",
                  disable=jax.process_index() != 0 or not cfg.progress_bar, dynamic_ncols=True)
  results = {}
  done = saved = start_step
  for step, step_crops in batches:  # ends early when a stop is requested while it waits for data
    if step >= end_step:
      break
    batch = dict(trainer.make_views(aug_key, step, to_global(step_crops)))
    if trainer.step_masks:
      batch["masks"] = to_global(trainer.step_masks(step))
    state, metrics = trainer.train_step(state, batch)
    done = step + 1
    if done % cfg.log_every_steps == 0 or done == end_step:
      metrics = dict(jax.device_get(metrics), skipped_images=getattr(train_src, "skipped", 0))
      bar.update(done - bar.n)
      if metrics["nonfinite_steps"] > 0 and cfg.on_nonfinite == "stop":
        checkpoints.wait_until_saved(mngr)
        bad = int(state["first_nonfinite_step"])
        good = max([s for s in mngr.all_steps() if s < bad], default=None)
        raise DivergenceError(
            f"non-finite loss or gradients at step {bad} (that update was not applied); last good "
            f"checkpoint: {f'step {good} in {mngr.directory}' if good is not None else 'none'}. "
            "Set --config.on_nonfinite=skip to skip such steps instead.")
      for warning in collapse_warnings(metrics, cfg.head.out_dim):
        logging.warning("step %d: %s", done, warning)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}")
      writer.write(done, metrics)
    if checkpoints.save(mngr, done, state, force=done == end_step, metadata=lineage):
      saved = done
    if stop_requested.is_set() or mngr.reached_preemption(done):
      break
    for name, evaluator in evals.items():
      every = eval_every[name]
      if every > 0 and done % every == 0 and done < end_step:
        scores = evaluator.run(state["teacher"].value["backbone"])
        writer.write(done, scores)
        bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
  if done < end_step:  # stopped on request (SIGTERM, Ctrl-C or a preemption notice)
    if saved != done:
      checkpoints.save(mngr, done, state, force=True, metadata=lineage)
    checkpoints.wait_until_saved(mngr)
    bar.update(done - bar.n)
    bar.write(f"stopped at step {done} on request (SIGTERM, Ctrl-C or preemption); "
              f"{'checkpoint saved' if done > start_step else 'nothing new to save'}, "
              "rerun the same command to resume")
    end_step = done
    results["preempted_at"] = done
  bar.close()
  checkpoints.wait_until_saved(mngr)

  if evals and end_step == total_steps and "preempted_at" not in results:
    for evaluator in evals.values():
      evaluated = {"teacher": state["teacher"].value["backbone"]}
      if evaluator.ecfg.get("baselines", False):
        evaluated["random_init"] = learner.build(cfg, mesh, steps_per_epoch,
                                                trainer.frozen_teacher).state["params"]["backbone"]
        evaluated["raw_pixels"] = None
      for who, params in evaluated.items():
        results.update({f"{metric}_{who}": v for metric, v in evaluator.run(params).items()})
    writer.write(end_step, results)
  writer.close()
  mngr.close()
  return {"state": state, "results": results}


# ---------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo_fashion_mnist.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first "
                                 "(one process per host on TPU pods / SLURM; settings auto-detected).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0 "
                                   "(where nothing detects it, e.g. processes on one machine).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: the number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")


def unknown_key_message(error: LookupError | AttributeError, argv) -> str:
  """An override of a key the config lacks (a section or the last key), with its flag and
  ml_collections' suggestion where it has one."""
  message = error
  while isinstance(message, BaseException):  # a last key: AttributeError(KeyError(key))
    message = message.args[0] if message.args else ""
  key, *suggestion = str(message).splitlines()
  key = key.strip("'\"")
  names = [arg.split("=")[0] for arg in argv if arg.startswith("--config.")]
  flag = next((name for name in names if key in name.split(".")), None)
  return "; ".join([f"unknown config key {key!r}" + (f" in {flag}" if flag else ""), *suggestion])


def innermost_usage_error(error: BaseException) -> UsageError | None:
  """The first UsageError raised along `error`'s chain (a config file's get_config raised it;
  ml_collections and absl wrap it with the traceback)."""
  found = None
  while error is not None:
    found = error if isinstance(error, UsageError) else found
    error = error.__cause__ or error.__context__
  return found


def parse_flags(argv):
  """absl flag parsing with bad flags, config files and config overrides reported as one line."""
  try:
    rest = flags.FLAGS(argv)
    if _CONFIG.value is not None:
      _CONFIG.value.get("seed")  # a config file that failed to load raises here
    return rest
  except OSError as e:  # ml_collections' message ends with the reason, e.g. "No such file"
    fail(f"cannot load the config file: {str(e).splitlines()[-1].strip()}")
  except (KeyError, AttributeError) as e:
    fail(unknown_key_message(e, argv))
  except (flags.Error, TypeError, ValueError) as e:
    fail(str(innermost_usage_error(e) or e))


def request_stop(signum, frame):
  """SIGTERM / Ctrl-C: save at the next step boundary and exit 0. A second one exits at once
  (the default action of the signal, which works even while the host waits for the device)."""
  del frame
  stop_requested.set()
  signal.signal(signal.SIGINT, signal.SIG_DFL)
  signal.signal(signal.SIGTERM, signal.SIG_DFL)
  print(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint; send it again "
        "(press Ctrl-C again) to quit at once without one", file=sys.stderr, flush=True)


def exit_now(message: str):
  """`fail(message)` without waiting for other threads at exit: those of a failed Orbax save
  can wait for ever on each other and keep the interpreter from shutting down."""
  try:
    fail(message)
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)  # pylint: disable=protected-access


def _not_from_orbax_errors(record) -> bool:
  """Log filter: Orbax's error logs (tracebacks of its threads) are left out; the failure
  reaches the loop, which reports it in one line."""
  return record.levelno < std_logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname


def main(argv):
  del argv
  host_memory.keep_freed_memory()
  if _WORKDIR.value is None or _CONFIG.value is None:
    fail("--config and --workdir are required")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    logging.get_absl_logger().addFilter(_not_from_orbax_errors)
  cfg = _CONFIG.value
  try:
    config_checks.check_workdir(_WORKDIR.value)
    if _DISTRIBUTED.value:
      jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    config_checks.check(cfg, jax.device_count())
  except UsageError as e:
    fail(str(e))
  for warning in config_checks.size_warnings(cfg, config_flags.get_override_values(flags.FLAGS["config"])):
    logging.warning(warning)
  t0 = time.time()
  signal.signal(signal.SIGTERM, request_stop)
  signal.signal(signal.SIGINT, request_stop)
  try:
    out = train(cfg, _WORKDIR.value)
  except (UsageError, DivergenceError) as e:
    fail(str(e))
  except (checkpoints.SaveError, OSError) as e:
    exit_now(str(e))
  res = out["results"]
  if "knn_top1_teacher" in res:
    metrics = [m for m in ("knn_top1", "linear_top1") if f"{m}_teacher" in res]
    print("\n" + "; ".join(evaluators.EVALUATORS[e.type].describe(e) for e in cfg.evals.values()
                           if e.every_steps >= 0) + ":")
    print(f"  {'':<17} " + " ".join(f"{m:>11}" for m in metrics))
    names = evaluators.EVALUATED | ({"teacher": "student EMA"} if distill.active(cfg) else {})
    for who, name in names.items():
      if f"knn_top1_{who}" in res:
        print(f"  {name:<17} " + " ".join(f"{res[f'{m}_{who}']:>11.4f}" for m in metrics))
  others = {k[:-len("_teacher")]: v for k, v in res.items()  # the other evaluators' headline metrics
            if k.endswith("_teacher") and not k.startswith(("knn_top1", "linear_top1")) and "_lr" not in k}
  if others:
    print("\nfinal evaluation of the teacher: " + ", ".join(f"{k} {v:.4f}" for k, v in others.items()))
  if "preempted_at" in res:
    print(f"stopped at step {res['preempted_at']}; workdir {_WORKDIR.value}")
    return
  print(f"done in {time.time() - t0:.0f} s; workdir {_WORKDIR.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
