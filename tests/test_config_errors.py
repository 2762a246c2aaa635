"""Bad configs, config files, workdirs and weight files: one `error:` line, exit 2, nothing compiled."""
import importlib

import jax
import numpy as np
import pytest

from configs import demo_esvit_fashion_mnist
from configs import dinov2_vits14
from dino_jax import config_checks
from dino_jax import config_files
from dino_jax import convert
from dino_jax import trainer
from dino_jax.errors import UsageError
from tests.test_train import run_cli, tiny

TRAIN_CONFIGS = ["demo_fashion_mnist", "demo_esvit_fashion_mnist", "dino_vits16", "dino_vits16_300ep", "dino_vits8",
                 "dino_vitb16", "dino_vitb8", "dinov2_vits14",
                 "dinov2_vitb14", "dinov2_vitl14", "dinov2_vitl16_short", "dinov2_vitg14", "esvit_swin_t"]


@pytest.fixture
def no_compiling(monkeypatch):
  """jax.jit fails the test: a bad config must be refused before anything is compiled."""
  def jit(*args, **kwargs):
    raise AssertionError("jax.jit was called before the config was refused")
  monkeypatch.setattr(jax, "jit", jit)


@pytest.mark.parametrize("module,override,message", [
    (None, {"log_every_steps": 0}, "log_every_steps must be a positive integer, not 0"),
    (None, {"checkpoint.every_steps": 0}, "checkpoint.every_steps must be a positive integer"),
    (None, {"batch_size": 0}, "batch_size must be a positive integer, not 0"),
    (None, {"batch_size": -16}, "batch_size must be a positive integer, not -16"),
    (None, {"epochs": 0.0}, "epochs must be a positive number"),
    (None, {"epochs": -1.0}, "epochs must be a positive number"),
    (None, {"head.out_dim": 0}, "head.out_dim must be a positive integer"),
    (None, {"model.dtype": "float33"}, "model.dtype must be one of auto, float32, bfloat16, float16, not 'float33'"),
    (None, {"aug.global_scale": (0.5,)}, r"aug.global_scale must be a pair \(low, high\) .* not \(0.5,\)"),
    (None, {"aug.global_scale": (0.0, 1.0)}, r"aug.global_scale must be a pair \(low, high\) with 0 < low"),
    (None, {"aug.local_scale": (0.05, 1.5)}, r"aug.local_scale must be a pair .* not \(0.05, 1.5\)"),
    (None, {"aug.global_size": 8, "aug.local_size": 16}, "aug.global_size 8 is smaller than aug.local_size 16"),
    (None, {"aug.global_size": 18}, "aug.global_size 18 is not a multiple of patch size 4"),
    (None, {"model.num_heads": 3}, "model.num_heads 3 does not divide model.width 32"),
    (demo_esvit_fashion_mnist, {"model.num_heads": (1, 3)}, "model.num_heads 3 does not divide stage 1's width 32"),
    (demo_esvit_fashion_mnist, {"model.num_heads": (1,)}, "one head count per stage"),
    (dinov2_vits14, {"mask.mask_ratio": (0.0, 0.0)}, r"mask.mask_ratio \(0.0, 0.0\) masks fewer than 3 of the 16"),
    (dinov2_vits14, {"mask.mask_prob": 0.0}, r"mask.mask_prob must be in \(0, 1\] while iBOT is on"),
    (dinov2_vits14, {"mask.mask_prob": 0.0, "on_nonfinite": "skip"}, "mask.mask_prob must be in"),
    (dinov2_vits14, {"mask.mask_prob": 0.01}, "mask.mask_prob 0.01 masks none of the 16 global crops of a group"),
    (None, {"optim.base_lr": float("inf")}, "optim.base_lr must be a finite number, not inf"),
    (None, {"loss.student_temp": float("nan")}, "loss.student_temp must be a finite number, not nan"),
    (None, {"aug.blur_sigma": (0.1, float("inf"))}, r"aug.blur_sigma\[1\] must be a finite number, not inf"),
    (None, {"seed": 2 ** 70}, r"seed 1180591620717411303424 is out of range \(integers within \+-2\*\*63\)"),
    (None, {"epochs": 1e300}, "epochs 1e[+]300 x 625 steps per epoch .* is 6.25e[+]302 steps, more than the 2147483647"),
    (None, {"data.workers": 0}, "data.workers must be a positive integer, not 0"),
    (None, {"data.worker_processes": -1}, "data.worker_processes must be a non-negative integer, not -1"),
    (None, {"evals.knn.temperature": float("nan")}, "evals.knn.temperature must be a finite number, not nan"),
])
def test_bad_config_is_refused_before_compiling(module, override, message, no_compiling, tmp_path):
  cfg = tiny(module, **override) if module else tiny(**override)
  with pytest.raises(UsageError, match=message):
    trainer.train(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()  # nothing written either


@pytest.mark.parametrize("name", TRAIN_CONFIGS)
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_every_config_passes_the_checks_without_size_warnings(name, arg):
  cfg = importlib.import_module(f"configs.{name}").get_config(arg)
  config_checks.check(cfg, num_devices=8)
  assert config_checks.size_warnings(cfg) == []


@pytest.mark.parametrize("name", TRAIN_CONFIGS + ["curate_fashion_mnist"])
def test_unknown_config_argument_names_the_accepted_ones(name):
  with pytest.raises(UsageError, match="unknown config argument 'tiyn': this config takes none or one of tiny"):
    importlib.import_module(f"configs.{name}").get_config("tiyn")


def test_size_warnings():
  cfg = tiny(**{"data.image_size": 32})
  assert config_checks.size_warnings(cfg) == []
  only_image_size = config_checks.size_warnings(cfg, overridden={"data.image_size": 32})
  assert len(only_image_size) == 1 and "training still takes 16 px global and 8 px local crops" in only_image_size[0]
  assert "the square evaluations decode to" in only_image_size[0]
  assert config_checks.size_warnings(cfg, overridden={"data.image_size": 32, "aug.global_size": 16}) == []
  smaller = config_checks.size_warnings(tiny(**{"data.image_size": 12}))
  assert smaller == ["data.image_size 12 is smaller than aug.global_size 16: every evaluation view is upsampled"]
  assert "throw most of the decoded resolution away" in config_checks.size_warnings(tiny(**{"data.image_size": 64}))[0]
  grid = config_checks.size_warnings(tiny(**{"aug.global_size": 12}))
  assert len(grid) == 1 and "model.pos_embed_grid 4 is not the global crops' grid 3" in grid[0]
  assert config_checks.size_warnings(tiny(**{"aug.global_size": 12, "model.init_from": "runs/x"})) == []


def test_workdir_that_cannot_hold_a_run(tmp_path):
  (tmp_path / "file").write_text("x")
  with pytest.raises(UsageError, match="is a file, not a directory"):
    config_checks.check_workdir(str(tmp_path / "file"))
  with pytest.raises(UsageError, match=f"lies under the file {tmp_path / 'file'}, not a directory"):
    config_checks.check_workdir(str(tmp_path / "file" / "run"))
  with pytest.raises(UsageError, match="--workdir /proc/run cannot be created"):
    config_checks.check_workdir("/proc/run")
  with pytest.raises(UsageError, match="--workdir /proc takes no files"):
    config_checks.check_workdir("/proc")
  config_checks.check_workdir(str(tmp_path / "new" / "run"))
  assert (tmp_path / "new" / "run").is_dir() and not any((tmp_path / "new" / "run").iterdir())


@pytest.mark.parametrize("content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{", b"not a safetensors file" * 4,
                                     "truncated"])
def test_broken_safetensors_file_is_one_error(tmp_path, capsys, content):
  file = tmp_path / "w.safetensors"
  if content == "truncated":
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    save_file({"a": np.ones((64, 64), np.float32)}, file)
    content = file.read_bytes()[:-100]
  file.write_bytes(content)
  with pytest.raises(SystemExit) as exit_:
    convert.main(["--from", str(file), "--arch", "dinov2_vits14", "--out", str(tmp_path / "run")])
  lines = capsys.readouterr().err.strip().splitlines()
  assert exit_.value.code == 2 and len(lines) == 1
  assert lines[0].startswith(f"error: {file}: not a readable .safetensors file ("), lines


TINY = "configs/demo_fashion_mnist.py:tiny"


@pytest.mark.parametrize("args,message", [
    ([TINY, "--config.aug.global_crop=32"], "error: unknown config key 'global_crop' in --config.aug.global_crop"),
    (["configs/demo_fashion_mnist.py:tiyn"], "error: unknown config argument 'tiyn': this config takes none or one "
     "of tiny"),
    (["configs/nope.py", "--config.aug.global_size=32"], "error: cannot load the config file: [Errno 2] No such file"),
    ([TINY, "--config.batch_size=0"], "error: batch_size must be a positive integer, not 0"),
    (["configs/dinov2_vits14.py:tiny", "--config.data.source=fashion_mnist_demo", "--config.mask.mask_prob=0",
      "--config.on_nonfinite=skip"], "error: mask.mask_prob must be in (0, 1] while iBOT is on"),
    ([TINY, "--workdir_is_a_file"], "error: --workdir {workdir} is a file, not a directory"),
])
def test_cli_refuses_with_one_line_before_any_work(tmp_path, args, message):
  workdir = tmp_path / "run"
  if "--workdir_is_a_file" in args:
    args = args[:-1]
    workdir.write_text("x")
  proc = run_cli("--config", *args, workdir=workdir)
  try:
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()  # a run that was not refused is stopped, not left behind
  lines = err.strip().splitlines()
  assert proc.returncode == 2 and len(lines) == 1, err[-2000:]
  assert lines[0].startswith(message.format(workdir=workdir)), lines[0]
  assert not workdir.is_dir() or not any(workdir.iterdir())  # nothing written


@pytest.mark.parametrize("code,message", [
    ("def get_config(:\n", r"error: cannot load the config file {path}: {path}:1: SyntaxError: "),
    ("import no_such_module_anywhere\n", "error: cannot load the config file {path}: ModuleNotFoundError: No module "
     "named 'no_such_module_anywhere'"),
    ("def get_config(arg=None):\n  return undefined_name\n", "error: cannot load the config file {path}: NameError: "
     "name 'undefined_name' is not defined"),
    ("def get_config(arg=None):\n  pass\n", "error: {path}: get_config returned None, not an "
     "ml_collections.ConfigDict"),
])
def test_broken_config_file_is_one_line_naming_it(tmp_path, code, message):
  """A config file whose own code fails (syntax, import, a name) or returns nothing: one line
  naming the file (not a traceback, not "--config is missing")."""
  path = tmp_path / "my_config.py"
  path.write_text(code)
  proc = run_cli("--config", str(path), workdir=tmp_path / "run")
  try:
    _, err = proc.communicate(timeout=120)
  finally:
    proc.kill()
  lines = [line for line in err.strip().splitlines() if not line.startswith("W")]  # ml_collections' warning
  assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
  assert lines[0].startswith(message.format(path=path)), lines[0]
  assert not (tmp_path / "run").exists()


def test_broken_config_file_from_python_is_a_usage_error(tmp_path):
  path = tmp_path / "my_config.py"
  path.write_text("import no_such_module_anywhere\n")
  with pytest.raises(UsageError, match="cannot load the config file .*my_config.py: ModuleNotFoundError"):
    config_files.load(str(path))


def test_train_called_from_python_checks_the_config_first(tmp_path):
  """`trainer.train` with a config built in Python is refused like the command line's."""
  with pytest.raises(UsageError, match="batch_size must be a positive integer"):
    trainer.train(tiny(**{"batch_size": 0}), str(tmp_path / "run"))
