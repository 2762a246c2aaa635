"""DINO / DINOv2 / EsViT self-supervised pretraining: the loop and the command line.

  python -m dino_jax.train --config configs/demo_fashion_mnist.py --workdir /tmp/run \
      [--config.key=value ...]

Everything a run does is in its config. The pieces: `learner` (train state, jitted step),
`objectives` (losses), `models` (backbone registry, heads), `sharding` (mesh, placement),
`checkpoints` (Orbax), `evaluators` (k-NN / linear probe), `data` and `augment` (inputs).
"""
import json
import os
import pathlib
import signal
import threading
import time

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from dino_jax import checkpoints
from dino_jax import data
from dino_jax import evaluators
from dino_jax import optim
from dino_jax import sharding
from dino_jax import learner
from dino_jax.errors import UsageError
from dino_jax.errors import fail

# ---------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------


class DivergenceError(RuntimeError):
  """The loss or gradients became non-finite and the config says to stop."""


stop_requested = threading.Event()  # set by SIGTERM: save at the next step boundary and exit


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


class MetricWriter:
  """Scalars to <workdir>/metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if self.active:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict):
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self):
    if self.active:
      self.jsonl.close()
      self.tb.close()


def train(cfg: ml_collections.ConfigDict, workdir: str, max_steps: int | None = None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final state and evaluation results.

  `max_steps` stops early (after that many total steps) without changing any schedule:
  the way tests and users simulate an interrupted run.
  """
  mesh = sharding.make_mesh(cfg)
  train_src = data.make_source(cfg.data, cfg.data.train_split)
  evals = evaluators.make(cfg, mesh, labelled=bool(getattr(train_src, "num_classes", None)))
  steps_per_epoch = max(len(train_src) // cfg.batch_size, 1)
  total_steps = optim.total_steps(cfg, steps_per_epoch)
  pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
  (pathlib.Path(workdir) / "config.json").write_text(cfg.to_json(indent=2))

  trainer = learner.build(cfg, mesh, steps_per_epoch)
  if jax.process_index() == 0:
    print(f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} devices, "
          f"mesh {dict(mesh.shape)}, {total_steps} steps", flush=True)
  mngr = checkpoints.checkpoint_manager(workdir, cfg)
  state = checkpoints.restore_or_keep(mngr, trainer.state)
  if cfg.model.init_from and mngr.latest_step() is None:
    state = checkpoints.init_from_run(state, cfg.model.init_from)
  start_step = int(state["step"])
  aug_key = learner.augmentation_key(cfg)
  to_global = lambda x: jax.make_array_from_process_local_data(trainer.batch_sharding, x)

  writer = MetricWriter(workdir)
  end_step = total_steps if max_steps is None else min(max_steps, total_steps)
  batches = data.train_batches(train_src, cfg.batch_size, cfg.seed, start_step,
                               jax.process_index(), jax.process_count())
  bar = tqdm.tqdm(total=end_step, initial=start_step, desc="train", unit="step",
                  disable=jax.process_index() != 0 or not cfg.progress_bar, dynamic_ncols=True)
  results = {}
  for step, images in batches:
    if step >= end_step:
      break
    batch = dict(trainer.make_views(aug_key, step, to_global(images)))
    if trainer.step_masks:
      batch["masks"] = to_global(trainer.step_masks(step))
    state, metrics = trainer.train_step(state, batch)
    bar.update(1)
    done = step + 1
    if done % cfg.log_every_steps == 0 or done == end_step:
      metrics = dict(jax.device_get(metrics), skipped_images=getattr(train_src, "skipped", 0))
      if metrics["nonfinite_steps"] > 0 and cfg.on_nonfinite == "stop":
        mngr.wait_until_finished()
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
    preempted = stop_requested.is_set() or mngr.reached_preemption(done)
    mngr.save(done, args=ocp.args.StandardSave(state), force=done == end_step or preempted)
    if preempted:
      mngr.wait_until_finished()
      bar.write(f"stopped at step {done} on request (SIGTERM or preemption); checkpoint saved, "
                "rerun the same command to resume")
      end_step = done
      results["preempted_at"] = done
      break
    for evaluator in evals.values():
      every = evaluator.ecfg.every_steps
      if every > 0 and done % every == 0 and done < end_step:
        scores = evaluator.run(state["teacher"].value["backbone"])
        writer.write(done, scores)
        bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
  bar.close()
  mngr.wait_until_finished()

  if evals and end_step == total_steps and "preempted_at" not in results:
    for evaluator in evals.values():
      evaluated = {"teacher": state["teacher"].value["backbone"]}
      if evaluator.ecfg.baselines:
        evaluated["random_init"] = learner.build(cfg, mesh, steps_per_epoch).state["params"]["backbone"]
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


def parse_flags(argv):
  """absl flag parsing with bad flags and config overrides reported as one line."""
  try:
    return flags.FLAGS(argv)
  except KeyError as e:
    fail(f"unknown config key {e.args[0] if e.args else e}")
  except (flags.Error, TypeError, ValueError) as e:
    fail(str(e))


def main(argv):
  del argv
  if _WORKDIR.value is None or _CONFIG.value is None:
    fail("--config and --workdir are required")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if _DISTRIBUTED.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  t0 = time.time()
  try:
    cfg = _CONFIG.value
    cfg.get("seed")  # a config file that failed to load raises here
  except OSError as e:
    fail(str(e))
  signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.set())
  try:
    out = train(cfg, _WORKDIR.value)
  except (UsageError, DivergenceError) as e:
    fail(str(e))
  res = out["results"]
  if "knn_top1_teacher" in res:
    metrics = [m for m in ("knn_top1", "linear_top1") if f"{m}_teacher" in res]
    print("\n" + "; ".join(evaluators.EVALUATORS[e.type].describe(e) for e in cfg.evals.values()
                           if e.every_steps >= 0) + ":")
    print(f"  {'':<17} " + " ".join(f"{m:>11}" for m in metrics))
    for who, name in evaluators.EVALUATED.items():
      if f"knn_top1_{who}" in res:
        print(f"  {name:<17} " + " ".join(f"{res[f'{m}_{who}']:>11.4f}" for m in metrics))
  if "preempted_at" in res:
    print(f"stopped at step {res['preempted_at']}; workdir {_WORKDIR.value}")
    return
  print(f"done in {time.time() - t0:.0f} s; workdir {_WORKDIR.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
