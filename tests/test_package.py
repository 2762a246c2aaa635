"""dino_jax as a package: installed into a fresh venv and used from another folder (the tools and
docs/python-api.md's examples), runs made before the package layout, `--help`, and the import
rules of the layout."""
import ast
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import jax
import numpy as np
import pytest

from configs import demo_fashion_mnist
from dino_jax import convert
from dino_jax import evaluate
from dino_jax import models
from dino_jax import runs
from dino_jax import trainer
from tests.test_train import REPO

OLD_RUN = REPO / "tests" / "data" / "run_before_package"
TOOLS = ("train", "extract", "evaluate", "convert", "pictures", "bench", "curate", "plot_metrics",
         "evaluators.synthetic")


def python_blocks(markdown: pathlib.Path) -> list[str]:
  return re.findall(r"```python\n(.*?)```", markdown.read_text(), re.S)


def dinov2_vits14_pth(path: pathlib.Path) -> None:
  """Random weights of DINOv2's ViT-S/14 backbone in the official layout, as the released .pth
  holds them (its 37 x 37 position grid)."""
  import torch  # pylint: disable=import-outside-toplevel
  arch = convert.ARCHS["dinov2_vits14"]
  model_cfg = demo_fashion_mnist.get_config().model
  model_cfg.update(patch_size=14, width=arch.width, depth=arch.depth, num_heads=arch.num_heads, mlp_dim=arch.mlp_dim,
                   layerscale=1e-5, pos_embed_grid=37)
  shapes = jax.eval_shape(models.make_backbone(model_cfg).init, jax.random.PRNGKey(0), np.zeros((1, 518, 518, 3)))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), shapes["params"])
  state = convert.to_torch(params, arch)
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, path)


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> pathlib.Path:
  """The python of a fresh venv into which `pip install .` put dino_jax (its dependencies seen
  from this venv's site-packages, so nothing is downloaded), the source copied out first so
  that the build writes nothing into the checkout."""
  root = tmp_path_factory.mktemp("installed")
  source = root / "source"
  source.mkdir()
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(REPO / name, source)
  shutil.copytree(REPO / "dino_jax", source / "dino_jax", ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
  python = root / "venv" / "bin" / "python"
  site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        check=True, capture_output=True, text=True).stdout.strip()
  pathlib.Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
  subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", str(source)],
                 check=True, timeout=600)
  return python


def run_outside(python, *args, cwd, timeout=600) -> str:
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  proc = subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_installed_package_trains_and_loads_from_another_folder(installed, tmp_path):
  where = run_outside(installed, "-c", "import dino_jax; print(dino_jax.__file__)", cwd=tmp_path)
  assert "site-packages" in where and str(REPO) not in where  # the installed copy, not the checkout
  out = run_outside(installed, "-m", "dino_jax.train", "--config", f"{REPO}/configs/demo_fashion_mnist.py:tiny",
                    "--workdir", "run", cwd=tmp_path)
  assert "trained teacher" in out and (tmp_path / "run" / "checkpoints" / "12").is_dir()
  out = run_outside(installed, "-c", "import dino_jax, numpy as np; b = dino_jax.load_backbone('run'); "
                    "print(b.step, b(np.zeros((2, 16, 16, 3), np.uint8))['embedding'].shape)", cwd=tmp_path)
  assert out.split() == ["12", "(2,", "32)"]
  out = run_outside(installed, "-m", "dino_jax.extract", "--workdir", "run", "--out", "feats.npz", cwd=tmp_path)
  assert np.load(tmp_path / "feats.npz")["embedding"].shape == (2000, 32)


def test_docs_python_api_examples_run_in_the_installed_package(installed, tmp_path):
  dinov2_vits14_pth(tmp_path / "dinov2_vits14_pretrain.pth")
  code = "\n".join(python_blocks(REPO / "docs" / "python-api.md")).replace('"configs/', f'"{REPO}/configs/')
  out = run_outside(installed, "-c", code, cwd=tmp_path)
  assert "(4, 32) (4, 32) (4, 4, 4, 32)" in out and "(1, 16, 16, 384)" in out
  assert (tmp_path / "tiny_backbone.safetensors").is_file()


def test_a_run_made_before_the_package_resumes_extracts_and_evaluates(tmp_path):
  """The run directory of an earlier layout and model (tests/data/README.md): its checkpoint
  gives the features it gave when it was written (its CLS token held the position embedding's
  CLS slot, now a parameter of its own, read as zeros), it resumes to its end and evaluates."""
  for copy in ("resumed", "read"):
    shutil.copytree(OLD_RUN, tmp_path / copy)
  expected = np.load(OLD_RUN.parent / "run_before_package_features.npz")
  backbone = runs.load_backbone(str(tmp_path / "read"))
  out = jax.device_get(backbone(expected["images"], 16))
  assert backbone.step == 6
  # To float32 rounding: the order of the model's arithmetic may change (the attention's did).
  np.testing.assert_allclose(out["embedding"], expected["embedding"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out["patch"], expected["patch"], rtol=1e-5, atol=1e-5)
  resumed = trainer.train(demo_fashion_mnist.get_config("tiny"), str(tmp_path / "resumed"))  # the old run's config
  assert int(resumed["state"]["step"]) == 12 and 0 < resumed["results"]["knn_top1_teacher"] <= 1
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(resumed["state"]["params"])))
  scores = evaluate.run_evaluators(str(tmp_path / "read"), ["knn"], {"linear_probe": False})
  assert 0.3 < scores["knn"]["knn_top1"] <= 1


@pytest.mark.parametrize("tool", TOOLS)
def test_help_prints_the_usage_and_exits_0(tool):
  proc = subprocess.run([sys.executable, "-m", f"dino_jax.{tool}", "--help"], cwd=REPO, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "usage" in proc.stdout.lower() or "--workdir" in proc.stdout or "--config" in proc.stdout


def imports_of(path: pathlib.Path) -> set[str]:
  """The modules `path` imports (absolute names; `from a import b` gives a and a.b)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
  return out


def test_the_layout_import_rules():
  modules = {p: imports_of(p) for p in (REPO / "dino_jax").rglob("*.py")}
  assert not [p for p, names in modules.items() if any(n == "configs" or n.startswith("configs.") for n in names)]
  assert [p.name for p, names in modules.items() if "dino_jax.train" in names] == []
  proc = subprocess.run([sys.executable, "-c", "import sys, dino_jax.learner; "
                         "print(sorted(m for m in sys.modules if m.startswith('dino_jax')))"],
                        cwd=REPO, capture_output=True, text=True, check=True)
  learner_pulls = ast.literal_eval(proc.stdout)
  assert not [m for m in learner_pulls if m.startswith(("dino_jax.evaluators", "dino_jax.config_checks"))]
