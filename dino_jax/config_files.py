"""Config files by path: `get_config(arg)` modules as `--config configs/x.py:arg` names them.

A config file may import its neighbours as a package (`from configs import common`): the
folder above its package goes on `sys.path` first, so a config loads from any working folder
and from an installed dino_jax. A config file outside a package imports only the library
(`from dino_jax import defaults`).

  cfg = dino_jax.load_config("configs/demo_fashion_mnist.py:tiny", {"batch_size": 32})
"""
import importlib.util
import pathlib
import sys

import ml_collections

from dino_jax.errors import UsageError


def make_importable(path: str) -> None:
  """Puts the folder above the package holding config file `path` (a folder with an
  __init__.py) first on sys.path, so that its `from <package> import ...` resolve."""
  folder = pathlib.Path(path).resolve().parent
  if (folder / "__init__.py").is_file() and str(folder.parent) not in sys.path:
    sys.path.insert(0, str(folder.parent))


def load(spec: str, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The config of `spec` ("path/to/config.py" or "path/to/config.py:arg"), with `overrides`
  ({"dotted.key": value}) applied; UsageError for a missing file or an unknown key."""
  path, _, arg = str(spec).partition(":")
  if not pathlib.Path(path).is_file():
    raise UsageError(f"cannot load the config file {path!r}: no such file")
  make_importable(path)
  module_spec = importlib.util.spec_from_file_location(f"dino_jax_config_{pathlib.Path(path).stem}", path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
    cfg = module.get_config(arg) if arg else module.get_config()
  except UsageError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (the config file's own code failed)
    raise UsageError(f"cannot load the config file {path}: {type(e).__name__}: {e}") from e
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise UsageError(f"{path}: get_config returned {type(cfg).__name__}, not an ml_collections.ConfigDict")
  for key, value in (overrides or {}).items():
    parent, _, last = key.rpartition(".")
    try:
      section = cfg
      for part in filter(None, parent.split(".")):
        section = section[part]
      if last not in section:
        raise KeyError(last)
    except (KeyError, TypeError):
      raise UsageError(f"unknown config key {key!r}") from None
    try:
      section[last] = value
    except TypeError as e:
      raise UsageError(f"config key {key!r}: {e}") from None
  return cfg
