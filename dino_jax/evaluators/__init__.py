"""Evaluators chosen from the config: `config.evals` maps a name to an evaluator config whose
`type` picks the class (as big_vision's `config.evals`).

  type               what it scores                                                  module
  knn                DINO Sec. 4.1: weighted k-NN top-1 (+ the fast linear probe)    knn.py
  linear             DINO / DINOv2 linear evaluation top-1                           linear.py
  retrieval          DINO Sec. 4.2.1: revisited Oxford / Paris retrieval, mAP        retrieval.py
  copy_detection     DINO Sec. 4.2.2: Copydays copy detection, mAP                   copy_detection.py
  video_propagation  DINO Sec. 4.2.3: DAVIS-2017 mask propagation, J&F               video_propagation.py
  correspondence     SD-DINO: keypoint transfer with fused features, PCK@alpha       correspondence.py
  segmentation       DINOv2 Sec. 7.4: linear segmentation probe, mIoU                segmentation.py
  depth              DINOv2 Sec. 7.4: linear depth probe, RMSE                       depth.py

Each class follows the `Evaluator` protocol below and carries its own defaults
(`default_configs`, gathered by `default_configs()` into `defaults.base_config().evals`) and
its own checks. `every_steps` says when an evaluator runs in training: N > 0 every N steps and
at the end, 0 only at the end, -1 never (or `every_epochs`). `baselines=True` also scores the
network at random initialization and raw pixels at the end, next to the trained teacher.
`python -m dino_jax.evaluate run --workdir RUN --evals NAME` runs one on a saved run.

knn and linear score the training data's classes (`needs_labels`); the others read a benchmark
folder (`path`, layouts in docs/evaluations.md), so they also run when it has no labels.
`synthetic.py` writes small benchmark folders made from real images with known answers.
"""
from typing import ClassVar, Protocol

import ml_collections

from dino_jax import validate
from dino_jax.errors import UsageError
from dino_jax.evaluators import copy_detection
from dino_jax.evaluators import correspondence
from dino_jax.evaluators import depth
from dino_jax.evaluators import knn
from dino_jax.evaluators import linear
from dino_jax.evaluators import retrieval
from dino_jax.evaluators import segmentation
from dino_jax.evaluators import video_propagation

EVALUATED = {"teacher": "trained teacher", "random_init": "random init", "raw_pixels": "raw pixels"}


class Evaluator(Protocol):
  """What the trainer and `dino_jax.evaluate` ask of an evaluator class."""
  needs_labels: ClassVar[bool]  # scores the training data's classes: runs only where it has labels
  shards_batches: ClassVar[bool]  # evals.<name>.batch_size is split over the devices (so divisible)
  default_configs: ClassVar[dict[str, dict]]  # {name: evaluator config} of the defaults' `evals`

  def __init__(self, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, mesh): ...

  def run(self, params) -> dict[str, float]:
    """Metrics of backbone `params` (None: raw pixels, where the evaluator scores them)."""

  @staticmethod
  def describe(ecfg: ml_collections.ConfigDict) -> str:
    """One line saying what the metrics are (the trainer's summary prints it)."""

  @staticmethod
  def check(name: str, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, enabled: bool) -> None:
    """One UsageError for a config `ecfg` that cannot run; checks of the model and data only
    where it will run (`enabled`)."""


EVALUATORS: dict[str, type[Evaluator]] = {
    "knn": knn.KnnEvaluator, "linear": linear.LinearEvaluator,
    "retrieval": retrieval.RetrievalEvaluator, "copy_detection": copy_detection.CopyDetectionEvaluator,
    "video_propagation": video_propagation.VideoPropagationEvaluator,
    "correspondence": correspondence.CorrespondenceEvaluator,
    "segmentation": segmentation.SegmentationEvaluator, "depth": depth.DepthEvaluator,
}


def default_configs() -> dict[str, dict]:
  """{name: config} of every evaluator's defaults (off but for knn's end-of-run score)."""
  return {name: dict(ecfg) for cls in EVALUATORS.values() for name, ecfg in cls.default_configs.items()}


def check_one(name: str, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, num_devices: int,
              enabled: bool = True) -> None:
  """One UsageError for evaluator `name`'s config if it cannot run; checks that depend on the
  model only where it will run (`enabled`)."""
  if ecfg.get("type") not in EVALUATORS:
    raise UsageError(f"evals.{name}.type must be one of {', '.join(EVALUATORS)}, not {ecfg.get('type')!r}")
  validate.finite_numbers(ecfg, prefix=f"evals.{name}.")
  if EVALUATORS[ecfg.type].shards_batches:
    validate.positive_int(ecfg, "batch_size", prefix=f"evals.{name}.")
    if ecfg.batch_size % num_devices:
      raise UsageError(f"evals.{name}.batch_size {ecfg.batch_size} is not divisible by the {num_devices} devices")
  EVALUATORS[ecfg.type].check(name, ecfg, cfg, enabled)


def check(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
  """One UsageError for an evaluator config of `cfg.evals` that cannot run."""
  for name, ecfg in cfg.evals.items():
    check_one(name, ecfg, cfg, num_devices, enabled=ecfg.every_steps >= 0)


def make(cfg: ml_collections.ConfigDict, mesh, labelled: bool) -> dict[str, Evaluator]:
  """The config's evaluators that will run (every_steps >= 0), by name; those that score the
  training data's classes (`needs_labels`) only when it has labels (`labelled`)."""
  return {name: EVALUATORS[e.type](e, cfg, mesh) for name, e in cfg.evals.items()
          if e.every_steps >= 0 and (labelled or not EVALUATORS[e.type].needs_labels)}
