"""The primitives every config check is made of: one `UsageError` line naming the key, what it
accepts and what it got.

Each takes a config (a `ConfigDict` or dict), a dotted `key` into it and the `prefix` its
messages name the key with (an evaluator's "evals.<name>."):

  positive_int(cfg, "batch_size")                      -> "batch_size must be a positive integer, not 0"
  positive_int(ecfg, "seed", zero=True, prefix=...)    -> "evals.seg.seed must be a non-negative integer, ..."
"""
import functools
import math

from dino_jax.errors import UsageError


INT_LIMIT = 2 ** 63  # integers JAX and NumPy hold (seeds, counts, sizes)


def numeric_leaves(tree, prefix: str = ""):
  """(dotted key, value) of every number in a config, in nested sections, lists and tuples too."""
  if hasattr(tree, "items"):
    for k, v in tree.items():
      yield from numeric_leaves(v, f"{prefix}{k}.")
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      yield from numeric_leaves(v, f"{prefix[:-1]}[{i}].")
  elif is_number(tree):
    yield prefix[:-1], tree


def finite_numbers(cfg, *, prefix: str = "") -> None:
  """Every number of a config finite (no nan or inf, e.g. from --config.optim.base_lr=1e999)
  and every integer within 64 bits."""
  for key, value in numeric_leaves(cfg, prefix):
    if isinstance(value, float) and not math.isfinite(value):
      raise UsageError(f"{key} must be a finite number, not {value!r}")
    if isinstance(value, int) and not -INT_LIMIT <= value < INT_LIMIT:
      raise UsageError(f"{key} {value} is out of range (integers within +-2**63)")


def lookup(cfg, key: str):
  """cfg's value at dotted `key` (None where an evaluator config lacks it)."""
  get = lambda c, k: c.get(k) if hasattr(c, "get") else getattr(c, k)
  return functools.reduce(get, key.split("."), cfg)


def is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def positive_int(cfg, key: str, *, zero: bool = False, prefix: str = "") -> None:
  value = lookup(cfg, key)
  if not _is_int(value) or value < (0 if zero else 1):
    raise UsageError(f"{prefix}{key} must be a {'non-negative' if zero else 'positive'} integer, not {value!r}")


def positive_number(cfg, key: str, *, prefix: str = "") -> None:
  value = lookup(cfg, key)
  if not is_number(value) or not 0 < value < math.inf:
    raise UsageError(f"{prefix}{key} must be a positive number, not {value!r}")


def non_negative_number(cfg, key: str, *, prefix: str = "") -> None:
  value = lookup(cfg, key)
  if not is_number(value) or not 0 <= value < math.inf:
    raise UsageError(f"{prefix}{key} must be a number >= 0, not {value!r}")


def boolean(cfg, key: str, *, prefix: str = "") -> None:
  if not isinstance(lookup(cfg, key), bool):
    raise UsageError(f"{prefix}{key} must be true or false, not {lookup(cfg, key)!r}")


def string(cfg, key: str, *, prefix: str = "") -> None:
  """A path or a split name."""
  if not isinstance(lookup(cfg, key), str):
    raise UsageError(f"{prefix}{key} must be a string, not {lookup(cfg, key)!r}")


def one_of(cfg, key: str, choices, *, prefix: str = "") -> None:
  value = lookup(cfg, key)
  if value not in choices:
    named = " or ".join(map(repr, choices)) if len(choices) == 2 else "one of " + ", ".join(map(str, choices))
    raise UsageError(f"{prefix}{key} must be {named}, not {value!r}")


def number_pair(cfg, key: str, *, prefix: str = "") -> tuple[float, float]:
  """The pair of numbers at `key`."""
  value = lookup(cfg, key)
  if not isinstance(value, (list, tuple)) or len(value) != 2 or not all(map(is_number, value)):
    raise UsageError(f"{prefix}{key} must be a pair of numbers, not {value!r}")
  return tuple(value)


def fraction_range(cfg, key: str, *, low_may_be_zero: bool = False, prefix: str = "") -> None:
  """A (low, high) pair of fractions: 0 < low <= high <= 1 (0 <= low where allowed)."""
  value = lookup(cfg, key)
  pair = isinstance(value, (tuple, list)) and len(value) == 2 and all(map(is_number, value))
  if not pair or not ((value[0] >= 0 if low_may_be_zero else value[0] > 0) and value[0] <= value[1] <= 1):
    raise UsageError(f"{prefix}{key} must be a pair (low, high) with {'0 <=' if low_may_be_zero else '0 <'} low <= "
                     f"high <= 1, not {value!r}")
