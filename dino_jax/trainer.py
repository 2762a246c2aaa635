"""DINO / DINOv2 / EsViT self-supervised pretraining: the training loop.

  result = train(cfg, workdir)     # trains, or resumes the run in workdir; {"state", "results"}

Everything a run does is in its config. The pieces: `learner` (train state, jitted step),
`objectives` (losses), `models` (backbone registry, heads), `sharding` (mesh, placement),
`checkpoints` (Orbax), `evaluators` (k-NN, linear and the papers' evaluations), `data` and
`augment` (inputs). `python -m dino_jax.train` is its command line, `dino_jax.pretrain` its
Python entry point.
"""
import contextlib
import json
import os
import pathlib
import sys
import threading

from absl import logging
import jax
import ml_collections
import numpy as np
import tqdm

from dino_jax import checkpoints
from dino_jax import config_checks
from dino_jax import crops
from dino_jax import data
from dino_jax import distill
from dino_jax import evaluators
from dino_jax import learner
from dino_jax import optim
from dino_jax import phases
from dino_jax import runs
from dino_jax import sharding
from dino_jax.errors import UsageError

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


def metrics_lines(path: pathlib.Path) -> list[str]:
  """The lines of a run's metrics.jsonl ([] where there is none); UsageError naming the file
  and line where it cannot be read as text."""
  if not path.is_file():
    return []
  try:
    raw = path.read_bytes()
  except OSError as e:
    raise UsageError(f"cannot read {path}: {e.strerror or e}") from None
  try:
    return raw.decode("utf-8").splitlines()
  except UnicodeDecodeError as e:
    number = raw.count(b"\n", 0, e.start) + 1
    raise UsageError(f"{path}:{number} is not UTF-8 text (a damaged file): delete that line to resume") from None


def check_run_files(workdir: str) -> None:
  """The files a resume reads (config.json, metrics.jsonl) are readable: checked before the
  run writes anything, so a damaged one stops it with one line and is left as it was."""
  path = pathlib.Path(workdir)
  if (path / "config.json").is_file():
    runs.recorded_config(path / "config.json")
  metrics_lines(path / "metrics.jsonl")


def keep_metrics_up_to(path: pathlib.Path, step: int) -> None:
  """Drops the rows of `path` past `step` (written after the checkpoint a resume starts from,
  so written again) and half-written lines, so that every step appears once."""
  if not path.is_file():
    return
  lines = metrics_lines(path)
  kept = [line for line in lines if (s := _row_step(line)) is not None and s <= step]
  if len(kept) < len(lines):
    path.with_name(path.name + ".tmp").write_text("".join(line + "\n" for line in kept))
    os.replace(path.with_name(path.name + ".tmp"), path)


def summary_writer(logdir: str):
  """A tensorboardX writer, imported without PyTorch: tensorboardX imports torch when it is
  installed (only to name its tensor type), which costs a process seconds and, on GPU hosts,
  loads PyTorch's CUDA libraries beside JAX's. A torch the process already imported is kept."""
  hide = "torch" not in sys.modules
  if hide:
    sys.modules["torch"] = None  # `import torch` raises ImportError
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    if hide:
      del sys.modules["torch"]
  return tensorboardX.SummaryWriter(logdir)


class MetricWriter:
  """Scalars to <workdir>/metrics.jsonl and TensorBoard (process 0 only), from `start_step` on
  (rows past it, from before a resume, are dropped); `tags` (e.g. the phase's name) go into
  every metrics.jsonl row."""

  def __init__(self, workdir: str, start_step: int = 0, tags: dict | None = None):
    self.active = jax.process_index() == 0
    self.tags = tags or {}
    if self.active:
      keep_metrics_up_to(pathlib.Path(workdir) / "metrics.jsonl", start_step)
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self.tb = summary_writer(os.path.join(workdir, "tensorboard"))

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
  changes = config_changes(runs.recorded_config(path), json.loads(text)) if path.is_file() and step else []
  if changes:
    if not any(path.parent.glob("config.*.json")):
      path.rename(path.with_name("config.0.json"))
    path.with_name(f"config.{step}.json").write_text(text)
    print(f"config changed on resuming at step {step} (kept as config.{step}.json; the earlier ones as "
          f"config.<step>.json): {'; '.join(changes)}", flush=True)
  path.write_text(text)


MAX_STEPS = 2 ** 31 - 1  # the step counter is an int32 on the devices


def schedule_length(cfg: ml_collections.ConfigDict, num_images: int) -> tuple[int, int]:
  """(steps per epoch, total steps) of a run on `num_images` training images; UsageError for
  data smaller than one batch and for a schedule of no step (or too many to count)."""
  if num_images < cfg.batch_size:
    raise UsageError(f"the training data holds {num_images} images, fewer than one batch of batch_size "
                     f"{cfg.batch_size}: lower batch_size or add images")
  steps_per_epoch = cfg.get("epoch_length", 0) or num_images // cfg.batch_size  # DINOv2: 1250
  total = optim.total_steps(cfg, steps_per_epoch)
  per_epoch = (f"epoch_length {steps_per_epoch}" if cfg.get("epoch_length", 0) else
               f"{steps_per_epoch} steps per epoch ({num_images} images // batch_size {cfg.batch_size})")
  if total < 1:
    raise UsageError(f"this config trains 0 steps: epochs {cfg.epochs:g} x {per_epoch} rounds to 0; "
                     f"raise epochs above {0.5 / steps_per_epoch:.3g}")
  if total > MAX_STEPS:
    raise UsageError(f"epochs {cfg.epochs:g} x {per_epoch} is {total:.3g} steps, more than the {MAX_STEPS} a run "
                     "counts")
  return steps_per_epoch, total


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
          frozen_teacher: distill.FrozenTeacher | None = None, overridden=()) -> dict:
  """Trains (or resumes) the run in `workdir`, holding its `WorkdirLock`; returns the final
  state, evaluation results and the steps (first, last, schedule's total). The config is checked
  first (one UsageError), and sizes that look unintended are logged
  (`config_checks.size_warnings`; `overridden`: the keys the command line set).

  `max_steps` stops early (after that many total steps) without changing any schedule:
  the way tests and users simulate an interrupted run. `frozen_teacher`: a distillation
  teacher already loaded (`distill.load_teacher`), else the config's is read.
  """
  mesh = sharding.make_mesh(cfg)
  config_checks.check(cfg, mesh.size)  # the one check of the config, before anything is written or compiled
  for warning in config_checks.size_warnings(cfg, overridden):
    logging.warning(warning)
  check_run_files(workdir)
  train_src = data.make_source(cfg.data, cfg.data.train_split, interrupt=stop_requested)
  schedule = schedule_length(cfg, len(train_src))
  pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
  with checkpoints.WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    return _train(cfg, workdir, mesh, train_src, schedule, max_steps, frozen_teacher)


def _train(cfg: ml_collections.ConfigDict, workdir: str, mesh, train_src, schedule: tuple[int, int],
           max_steps: int | None, frozen_teacher) -> dict:
  steps_per_epoch, total_steps = schedule
  evals = evaluators.make(cfg, mesh, labelled=bool(getattr(train_src, "num_classes", None)))
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
  if int(state["step"]) > total_steps:
    raise UsageError(f"{workdir} holds a checkpoint at step {int(state['step'])}, past the end of this config's "
                     f"schedule ({total_steps} steps): raise epochs to go on training it, or give a new --workdir")
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
    if start_step == total_steps:
      print(f"{workdir} is at the end of its schedule (step {total_steps}): nothing to train"
            + (", evaluating its teacher again" if evals else ""), flush=True)
  data.save_classes(train_src, workdir)  # the class ids of evaluations and extract
  aug_key = learner.augmentation_key(cfg)
  to_global = lambda tree: jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(trainer.batch_sharding, x), tree)

  writer = MetricWriter(workdir, start_step, {"phase": lineage["phase"]["name"]} if "phase" in lineage else {})
  end_step = total_steps if max_steps is None else min(max_steps, total_steps)
  batches = data.train_batches(train_src, cfg.batch_size, cfg.seed, start_step, crops.crop_specs(cfg.aug),
                               jax.process_index(), jax.process_count(), workers=cfg.data.get("workers", 8),
                               interrupt=stop_requested, worker_processes=cfg.data.get("worker_processes", 0))
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
        scores = evaluator.run(learner.teacher_backbone(state))
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
      evaluated = {"teacher": learner.teacher_backbone(state)}
      if evaluator.ecfg.get("baselines", False):
        evaluated["random_init"] = learner.random_init_backbone(
            cfg, trainer.model, jax.tree.map(lambda x: x.sharding, evaluated["teacher"]))
        evaluated["raw_pixels"] = None
      for who, params in evaluated.items():
        results.update({f"{metric}_{who}": v for metric, v in evaluator.run(params).items()})
    writer.write(end_step, results)
  writer.close()
  mngr.close()
  return {"state": state, "results": results, "steps": (start_step, end_step, total_steps)}
