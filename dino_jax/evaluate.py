"""Evaluate a run: the evaluators of `dino_jax.evaluators` on its checkpoint, or weighted k-NN
and the fast linear probe on features written by `dino_jax.extract`.

  python -m dino_jax.evaluate run    --workdir RUN --evals linear_dino[,linear_dinov2,knn] [--step N]
                                     [--student] [--set epochs=10 --set learning_rates=(0.01,0.1)]
  python -m dino_jax.evaluate knn    --train train.npz --test test.npz [--feature embedding] [--k 10,20,100,200]
  python -m dino_jax.evaluate linear --train train.npz --test test.npz [--feature embedding] [--epochs 100]

`run` takes each evaluator's config from the run's `evals.<name>` or, where the run predates
it, from the evaluators' defaults (`evaluators.default_configs`); `--set key=value` overrides
its keys (Python literals), e.g. `--set train_split=train --set test_split=test` for the
Fashion-MNIST demo.
"""
import ast

from absl import flags
import jax
import ml_collections
import numpy as np

from dino_jax import cli
from dino_jax import evaluators
from dino_jax import host_memory
from dino_jax import runs
from dino_jax import sharding
from dino_jax.errors import UsageError
from dino_jax.errors import fail
from dino_jax.evaluators import knn
from dino_jax.evaluators import probe

for _name in ("workdir", "step", "student"):
  flags.declare_key_flag(_name)  # dino_jax.cli's

_TRAIN = flags.DEFINE_string("train", None, "Train split features (.npz from dino_jax.extract).")
_TEST = flags.DEFINE_string("test", None, "Test split features (.npz from dino_jax.extract).")
_FEATURE = flags.DEFINE_enum("feature", "embedding", ["embedding", "pooled"],
                             "Which features: the global embedding (CLS) or mean-pooled patch tokens.")
_K = flags.DEFINE_list("k", ["10", "20", "100", "200"], "k-NN: numbers of neighbours (DINO's eval_knn.py).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.07, "k-NN: vote weight exp(similarity / T).")
_EPOCHS = flags.DEFINE_integer("epochs", 100, "Linear probe: epochs over the training features.", lower_bound=1)
_EVALS = flags.DEFINE_list("evals", ["knn"], "run: the evaluators (names in config.evals, e.g. knn, linear_dino, "
                           "linear_dinov2).")
_SET = flags.DEFINE_multi_string("set", [], "run: key=value overrides of the evaluators' configs (Python literals).")


def load_features(path: str, feature: str) -> tuple[np.ndarray, np.ndarray]:
  """(features [N, D], labels [N]) from an `extract` .npz file; UsageError naming the file when
  it cannot be read, the arrays disagree, a feature is not finite or a label is not a class."""
  try:
    with np.load(path, allow_pickle=False) as f:
      if feature not in f or "labels" not in f:
        raise UsageError(f"{path} has no {feature!r} features and labels (has: {', '.join(f.files)})")
      x, y = f[feature], f["labels"]
  except UsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (truncated or not an .npz: zipfile, zlib, OSError)
    raise UsageError(f"cannot read features {path!r} (an .npz from dino_jax.extract): "
                     f"{getattr(e, 'strerror', None) or e}") from None
  if x.ndim != 2 or y.ndim != 1 or len(x) != len(y) or not len(x):
    raise UsageError(f"{path}: {feature} {x.shape} and labels {y.shape} must be [N, D] and [N] with N > 0")
  if not np.issubdtype(x.dtype, np.floating) or not np.isfinite(x).all():
    bad = int((~np.isfinite(x)).any(axis=-1).sum()) if np.issubdtype(x.dtype, np.floating) else len(x)
    raise UsageError(f"{path}: {bad} of {len(x)} {feature} rows are not finite numbers (damaged or diverged "
                     "weights): nothing to score")
  if not np.issubdtype(y.dtype, np.integer) or (y < 0).any():
    raise UsageError(f"{path}: labels must be class ids >= 0; {int((y < 0).sum())} of {len(y)} are not (-1 marks "
                     "an unlabelled image): extract a labelled split")
  return x, y


def parse_overrides(items: list[str]) -> dict:
  """{key: value} of `--set key=value` flags; values are Python literals, else strings."""
  out = {}
  for item in items:
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
      raise UsageError(f"--set takes key=value, not {item!r}")
    try:
      out[key.strip()] = ast.literal_eval(text.strip())
    except (ValueError, SyntaxError):
      out[key.strip()] = text.strip()
  return out


def evaluator_config(cfg: ml_collections.ConfigDict, name: str, overrides: dict) -> ml_collections.ConfigDict:
  """Evaluator `name`'s config: the run's evals.<name> (its keys missing there, added since the
  run was made, from the defaults), else the defaults' (a run that predates it), with
  `overrides`; an unknown name or key is one UsageError."""
  defaults = evaluators.default_configs()
  if name in cfg.get("evals", {}):
    ecfg = cfg.evals[name].to_dict()
    if name in defaults and defaults[name]["type"] == ecfg.get("type"):  # keys added since the run was made
      ecfg = {**defaults[name], **ecfg}
  elif name in defaults:
    ecfg = dict(defaults[name])
  else:
    known = sorted(set(cfg.get("evals", {})) | set(defaults))
    raise UsageError(f"--evals: no evaluator {name!r} in the run's config or the defaults (known: {', '.join(known)})")
  unknown = sorted(set(overrides) - set(ecfg))
  if unknown:
    raise UsageError(f"--set: evals.{name} has no key {', '.join(unknown)} (keys: {', '.join(sorted(ecfg))})")
  return ml_collections.ConfigDict({**ecfg, **overrides, "every_steps": 0})


def run_evaluators(workdir: str, names: list[str], overrides: dict, step=None, student=False) -> dict:
  """{name: metrics} of evaluators `names` on the teacher (or student) backbone of `workdir`."""
  backbone = runs.load_backbone(workdir, step, student)
  cfg = backbone.cfg
  mesh = sharding.make_mesh()
  ecfgs = {name: evaluator_config(cfg, name, overrides) for name in names}
  for name, ecfg in ecfgs.items():  # every config checked before any work
    evaluators.check_one(name, ecfg, cfg, mesh.size)
  cfg.progress_bar = True
  results = {}
  for name, ecfg in ecfgs.items():
    evaluator = evaluators.EVALUATORS[ecfg.type](ecfg, cfg, mesh)
    results[name] = evaluator.run(backbone.params)
    if jax.process_index() == 0:
      print(f"{name} (step {backbone.step}): {evaluators.EVALUATORS[ecfg.type].describe(ecfg)}")
      for metric, value in results[name].items():
        print(f"  {metric}: {value:.4f}")
  return results


def main(argv):
  host_memory.keep_freed_memory()
  cli.quiet_logging()
  if len(argv) == 2 and argv[1] == "run":
    try:
      if not cli.WORKDIR.value:
        raise UsageError("run: --workdir is required")
      run_evaluators(cli.WORKDIR.value, _EVALS.value, parse_overrides(_SET.value), cli.STEP.value,
                     cli.STUDENT.value)
    except UsageError as e:
      fail(str(e))
    return
  try:
    if len(argv) != 2 or argv[1] not in ("knn", "linear"):
      raise UsageError("usage: python -m dino_jax.evaluate run --workdir RUN --evals NAME[,NAME] | "
                       "knn|linear --train A.npz --test B.npz")
    if not _TRAIN.value or not _TEST.value:
      raise UsageError("--train and --test are required")
    ks = [cli.number("--k", k, integer=True, low=1, low_allowed=True) for k in _K.value]
    temperature = cli.number("--temperature", _TEMPERATURE.value)
    train_x, train_y = load_features(_TRAIN.value, _FEATURE.value)
    test_x, test_y = load_features(_TEST.value, _FEATURE.value)
    if train_x.shape[1] != test_x.shape[1]:
      raise UsageError(f"--train features are {train_x.shape[1]}-d, --test features {test_x.shape[1]}-d: extract "
                       "both with the same run")
  except UsageError as e:
    fail(str(e))
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  if argv[1] == "knn":
    accuracies = knn.knn_accuracies(train_x, train_y, test_x, test_y, num_classes, ks, temperature)
    for k, acc in accuracies.items():
      print(f"k-NN top-1 (k={k}, T={temperature:g}, {_FEATURE.value}): {acc:.4f}")
  else:
    res = probe.linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=_EPOCHS.value)
    sweep = ", ".join(f"{lr:g}: {a:.4f}" for lr, a in res["val_top1"].items())
    print(f"linear probe ({_FEATURE.value}): val top-1 by lr {{{sweep}}}")
    print(f"linear probe top-1 (lr {res['best_lr']:g}): {res['test_top1']:.4f}")


if __name__ == "__main__":
  cli.run(main)
