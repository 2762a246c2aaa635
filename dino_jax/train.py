r"""DINO / DINOv2 / EsViT self-supervised pretraining from the command line.

  python -m dino_jax.train --config configs/demo_fashion_mnist.py --workdir runs/demo \
      [--config.key=value ...] [--distributed]

Rerunning the same command resumes the run from its newest checkpoint. SIGTERM or Ctrl-C stop
it at the next step with a checkpoint; a second one quits at once. The loop is
`dino_jax.trainer`; from Python, `dino_jax.pretrain(config, workdir)`.
"""
import time

from absl import flags
from ml_collections import config_flags

from dino_jax import checkpoints
from dino_jax import cli
from dino_jax import config_checks
from dino_jax import data
from dino_jax import distill
from dino_jax import evaluators
from dino_jax import host_memory
from dino_jax import trainer
from dino_jax.errors import UsageError
from dino_jax.errors import fail

for _name in ("config", "workdir", "distributed", "coordinator_address", "num_processes", "process_id"):
  flags.declare_key_flag(_name)  # dino_jax.cli's


def print_summary(cfg, results: dict) -> None:
  """The final evaluations: the k-NN / linear table (trained teacher, random init, raw pixels)
  and the other evaluators' headline metrics."""
  if "knn_top1_teacher" in results:
    metrics = [m for m in ("knn_top1", "linear_top1") if f"{m}_teacher" in results]
    print("\n" + "; ".join(evaluators.EVALUATORS[e.type].describe(e) for e in cfg.evals.values()
                           if e.every_steps >= 0) + ":")
    print(f"  {'':<17} " + " ".join(f"{m:>11}" for m in metrics))
    names = evaluators.EVALUATED | ({"teacher": "student EMA"} if distill.active(cfg) else {})
    for who, name in names.items():
      if f"knn_top1_{who}" in results:
        print(f"  {name:<17} " + " ".join(f"{results[f'{m}_{who}']:>11.4f}" for m in metrics))
  others = {k[:-len("_teacher")]: v for k, v in results.items()  # the other evaluators' headline metrics
            if k.endswith("_teacher") and not k.startswith(("knn_top1", "linear_top1")) and "_lr" not in k}
  if others:
    print("\nfinal evaluation of the teacher: " + ", ".join(f"{k} {v:.4f}" for k, v in others.items()))


def main(argv):
  del argv
  host_memory.keep_freed_memory()
  if cli.WORKDIR.value is None or cli.CONFIG.value is None:
    fail("--config and --workdir are required")
  cli.quiet_logging()
  cfg, workdir = cli.CONFIG.value, cli.WORKDIR.value
  try:
    config_checks.check_workdir(workdir)
    cli.initialize_distributed()
  except UsageError as e:
    fail(str(e))
  t0 = time.time()
  cli.stop_on_signals(trainer.stop_requested)
  try:
    out = trainer.train(cfg, workdir, overridden=config_flags.get_override_values(flags.FLAGS["config"]))
  except data.ListingStopped as e:  # a stop request before the first step: nothing to save
    print(str(e))
    return
  except (UsageError, trainer.DivergenceError) as e:
    fail(str(e))
  except (checkpoints.SaveError, OSError) as e:
    cli.exit_now(str(e))
  print_summary(cfg, out["results"])
  first, last, total = out["steps"]
  trained = f"steps {first} -> {last} of {total}" if last > first else f"no step trained (at step {last} of {total})"
  if "preempted_at" in out["results"]:
    print(f"stopped on request: {trained}; rerun the same command to resume; workdir {workdir}")
    return
  print(f"done in {time.time() - t0:.0f} s: {trained}; workdir {workdir}")


if __name__ == "__main__":
  cli.run(main)
