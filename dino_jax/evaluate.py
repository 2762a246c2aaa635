"""Evaluate features written by `dino_jax.extract`: weighted k-NN and a linear probe.

  python -m dino_jax.evaluate knn    --train train.npz --test test.npz [--feature embedding] [--k 10,20,100]
  python -m dino_jax.evaluate linear --train train.npz --test test.npz [--feature embedding] [--epochs 100]
"""
from absl import app
from absl import flags
from absl import logging
import numpy as np

from dino_jax import knn
from dino_jax import probe
from dino_jax.errors import UsageError
from dino_jax.errors import fail

_TRAIN = flags.DEFINE_string("train", None, "Train split features (.npz from dino_jax.extract).")
_TEST = flags.DEFINE_string("test", None, "Test split features (.npz from dino_jax.extract).")
_FEATURE = flags.DEFINE_enum("feature", "embedding", ["embedding", "pooled"],
                             "Which features: the global embedding (CLS) or mean-pooled patch tokens.")
_K = flags.DEFINE_list("k", ["10", "20", "100"], "k-NN: numbers of neighbours.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.07, "k-NN: vote weight exp(similarity / T).")
_EPOCHS = flags.DEFINE_integer("epochs", 100, "Linear probe: epochs over the training features.")


def load_features(path: str, feature: str):
  """(features, labels) from an `extract` .npz file."""
  try:
    f = np.load(path, allow_pickle=False)
  except OSError as e:
    raise UsageError(f"cannot read features {path!r}: {e}") from None
  with f:
    if feature not in f or "labels" not in f:
      raise UsageError(f"{path} has no {feature!r} features and labels (has: {', '.join(f.files)})")
    return f[feature], f["labels"]


def main(argv):
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    if len(argv) != 2 or argv[1] not in ("knn", "linear"):
      raise UsageError("usage: python -m dino_jax.evaluate knn|linear --train A.npz --test B.npz")
    if not _TRAIN.value or not _TEST.value:
      raise UsageError("--train and --test are required")
    train_x, train_y = load_features(_TRAIN.value, _FEATURE.value)
    test_x, test_y = load_features(_TEST.value, _FEATURE.value)
  except UsageError as e:
    fail(str(e))
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  if argv[1] == "knn":
    for k in map(int, _K.value):
      acc = knn.knn_accuracy(train_x, train_y, test_x, test_y, num_classes, k, _TEMPERATURE.value)
      print(f"k-NN top-1 (k={k}, T={_TEMPERATURE.value}, {_FEATURE.value}): {acc:.4f}")
  else:
    res = probe.linear_probe(train_x, train_y, test_x, test_y, num_classes, epochs=_EPOCHS.value)
    sweep = ", ".join(f"{lr:g}: {a:.4f}" for lr, a in res["val_top1"].items())
    print(f"linear probe ({_FEATURE.value}): val top-1 by lr {{{sweep}}}")
    print(f"linear probe top-1 (lr {res['best_lr']:g}): {res['test_top1']:.4f}")


if __name__ == "__main__":
  app.run(main)
