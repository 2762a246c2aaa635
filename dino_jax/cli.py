"""What the command-line tools share: the run flags, flag parsing that reports bad input in one
line, `--help` that exits 0, the multi-process start, logging and the stop signals.

Every absl tool runs as `cli.run(main)` and declares the shared flags it takes as key flags (so
`--help` lists them):

  --config FILE[:arg] [--config.key=value ...]   a config file (`dino_jax.config_files`)
  --workdir DIR                                  a run directory
  --step N / --student                           which checkpoint / backbone of a run to read
  --distributed [--coordinator_address ...]      jax.distributed.initialize() first
"""
import logging as std_logging
import math
import os
import pathlib
import signal
import sys
import tempfile
import threading

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dino_jax import config_files
from dino_jax.errors import UsageError
from dino_jax.errors import fail

CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo_fashion_mnist.py[:arg].")
WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
STEP = flags.DEFINE_integer("step", None, "Checkpoint step of the run to read (default: the latest).")
STUDENT = flags.DEFINE_bool("student", False, "Read the student backbone instead of the teacher.")
DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first "
                                "(one process per host on TPU pods / SLURM; settings auto-detected).")
COORDINATOR = flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0 "
                                  "(where nothing detects it, e.g. processes on one machine).")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: the number of processes.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")

HELP_FLAGS = ("--help", "-help", "--helpshort", "-helpshort", "--helpfull", "-helpfull", "--helpxml", "-?")


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


def config_file_arg(argv) -> str | None:
  """The file part of --config in `argv` (--config=FILE[:arg] or --config FILE[:arg])."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":")[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":")[0]
  return None


def parse_flags(argv):
  """absl flag parsing with bad flags, config files and config overrides reported as one line;
  `--help` prints the usage and exits 0 (absl's exits 1)."""
  if any(arg in HELP_FLAGS for arg in argv[1:]):
    try:
      flags.FLAGS(argv)
    except SystemExit as e:
      raise SystemExit(0 if e.code == 1 else e.code) from None
  config_file = config_file_arg(argv[1:])
  if config_file:
    config_files.make_importable(config_file)
  try:
    rest = flags.FLAGS(argv)
    if CONFIG.value is not None:
      CONFIG.value.get("seed")  # a config file that failed to load raises here
  except OSError as e:  # ml_collections' message ends with the reason, e.g. "No such file"
    fail(f"cannot load the config file: {str(e).splitlines()[-1].strip()}")
  except (SyntaxError, ImportError) as e:  # the config file's own code
    where = f"{e.filename}:{e.lineno}: " if isinstance(e, SyntaxError) and e.filename else ""
    fail(f"cannot load the config file {config_file}: {where}{type(e).__name__}: {e.msg if where else e}")
  except (KeyError, AttributeError) as e:
    fail(unknown_key_message(e, argv))
  except (flags.Error, TypeError, ValueError) as e:
    fail(str(innermost_usage_error(e) or e))
  except Exception as e:  # pylint: disable=broad-except  (any other error of the config file's code)
    if not config_file:
      raise
    fail(f"cannot load the config file {config_file}: {type(e).__name__}: {e}")
  if config_file and CONFIG.value is None:
    fail(f"{config_file}: get_config returned None, not an ml_collections.ConfigDict")
  return rest


def output_file(flag: str, path: str, suffixes: tuple[str, ...] = ()) -> pathlib.Path:
  """The file `path` a tool's `flag` (e.g. "--out") names, checked before any work: not a
  folder, one of `suffixes` where given, its folder created and writable. Tools write exactly
  there (never beside it, never with a suffix added)."""
  out = pathlib.Path(path)
  if out.is_dir():
    raise UsageError(f"{flag} {path!r} is a folder; give a file path")
  if suffixes and out.suffix.lower() not in suffixes:
    raise UsageError(f"{flag} {path!r} must end with {' or '.join(suffixes)}")
  output_folder(flag, str(out.parent), f"the folder of {flag} {path!r}")
  return out


def output_folder(flag: str, path: str, what: str | None = None) -> pathlib.Path:
  """The folder `path` that `flag` names, created (with its parents) and checked writable."""
  what = what or f"{flag} {path!r}"
  folder = pathlib.Path(path)
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except FileExistsError:
    raise UsageError(f"{what} is a file, not a folder") from None
  except OSError as e:
    raise UsageError(f"cannot create {what}: {e.strerror or e}") from None
  try:
    tempfile.TemporaryFile(dir=folder).close()
  except OSError as e:
    raise UsageError(f"cannot write into {what}: {e.strerror or e}") from None
  return folder


def number(flag: str, value, *, integer: bool = False, low: float = 0, low_allowed: bool = False):
  """A numeric flag value, finite and above `low` (at `low` too with `low_allowed`), else one
  UsageError naming the flag and the range."""
  try:
    x = int(value) if integer else float(value)
  except (TypeError, ValueError):
    x = None
  if x is None or (not integer and not math.isfinite(x)) or x < low or (x == low and not low_allowed):
    kind = "an integer" if integer else "a number"
    raise UsageError(f"{flag} must be {kind} {'>=' if low_allowed else '>'} {low:g}, not {value!r}")
  return x


def run(main) -> None:
  """app.run with `parse_flags`."""
  app.run(main, flags_parser=parse_flags)


def _not_from_orbax_errors(record) -> bool:
  """Log filter: Orbax's error logs (tracebacks of its threads) are left out; the failure
  reaches the caller, which reports it in one line."""
  return record.levelno < std_logging.ERROR or f"{os.sep}orbax{os.sep}" not in record.pathname


def quiet_logging() -> None:
  """Warnings only (Orbax logs every save at INFO), unless --verbosity is given."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    logging.get_absl_logger().addFilter(_not_from_orbax_errors)


def initialize_distributed() -> None:
  """jax.distributed.initialize() with the --coordinator_address, --num_processes and
  --process_id given (auto-detected where None), when --distributed."""
  if DISTRIBUTED.value:
    import jax  # pylint: disable=import-outside-toplevel  (the other tools' imports need no jax)
    jax.distributed.initialize(COORDINATOR.value, NUM_PROCESSES.value, PROCESS_ID.value)


def stop_on_signals(stop: threading.Event) -> None:
  """SIGTERM / Ctrl-C set `stop` (the work saves at its next boundary and exits 0); a second one
  exits at once (the default action of the signal, which works even while the host waits for
  the device)."""

  def request_stop(signum, frame):
    del frame
    stop.set()
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint; send it again "
          "(press Ctrl-C again) to quit at once without one", file=sys.stderr, flush=True)

  signal.signal(signal.SIGTERM, request_stop)
  signal.signal(signal.SIGINT, request_stop)


def exit_now(message: str):
  """`fail(message)` without waiting for other threads at exit: those of a failed Orbax save
  can wait for ever on each other and keep the interpreter from shutting down."""
  try:
    fail(message)
  finally:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)  # pylint: disable=protected-access
