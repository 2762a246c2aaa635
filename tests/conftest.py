"""Tests run on 8 fake CPU devices (set before JAX is imported) from the repo root.

The tests' programs, and those of the training runs they start as subprocesses (killed and
resumed runs compile the same step again), share one persistent XLA compilation cache, made
fresh for each test session."""
import atexit
import functools
import os
import pathlib
import shutil
import sys
import tempfile

# The tests' programs are tiny and compiling them is much of the suite's time. XLA's backend
# (LLVM) at optimization level 0, with the fusions emitted by XLA's earlier (non-MLIR) emitters,
# compiles a `:tiny` DINOv2 step in a third of the default's CPU time (22 s against 65 s); the
# programs run slower (a ResNet-50 forward 4x: the few tests that run long programs take
# longer), the suite as a whole faster. Users' runs keep XLA's defaults.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dino_jax_tests_xla_cache_")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the runs' many small programs too
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(autouse=True)
def no_stop_request_left_over():
  """A test that asks the trainer to stop (trainer.stop_requested) and fails before the run
  clears it must not stop the next test's runs."""
  yield
  train = sys.modules.get("dino_jax.trainer")
  if train is not None:
    train.stop_requested.clear()


# XLA's defaults for the programs of the tests whose time goes to running them, not compiling
# them (SSCD's ResNet-18 on 256 images of 16 px, 8 devices: 0.9 s a batch against 4.9 s at the
# tests' level 0).
XLA_DEFAULTS = {"xla_backend_optimization_level": 3, "xla_cpu_use_fusion_emitters": True}


@pytest.fixture
def optimized_xla(monkeypatch):
  """Programs that the code under test wraps in jax.jit while this test runs are compiled with
  XLA's defaults (`XLA_DEFAULTS`); those jitted when a module was imported are not."""
  import jax  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(jax, "jit", functools.partial(jax.jit, compiler_options=XLA_DEFAULTS))
