"""torchvision ResNets <-> dino_jax runs: forward parity with torchvision in eval mode (running
statistics), DINO's ResNet-50 training checkpoint, exact export / import round trips, bad files.

Reference models are torchvision's own `resnet18` / `resnet50` at random initializations (no
downloads), every batch norm's affine and running statistics randomized so that they matter.
"""
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torchvision

from dino_jax import checkpoints
from dino_jax import convert
from dino_jax import models
from dino_jax import runs
from dino_jax.errors import UsageError
from tests import torch_reference
from tests.test_convert import export_with_cli
from tests.test_convert import numpy_state
from tests.test_convert import relative_error

REPO = pathlib.Path(__file__).resolve().parents[1]


def torchvision_resnet(depth: int, seed: int = 0) -> torch.nn.Module:
  """torchvision's resnet<depth> with random batch-norm affines and running statistics, in eval mode."""
  torch.manual_seed(seed)
  model = getattr(torchvision.models, f"resnet{depth}")()
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.2, 0.2)
        m.running_mean.uniform_(-0.5, 0.5)
        m.running_var.uniform_(0.5, 2.0)
        m.num_batches_tracked.fill_(1234)
  return model.eval()


def assert_forward_matches(workdir, model: torch.nn.Module, size: int = 64):
  """The run's ResNet (running statistics) equals torchvision's on the pooled embedding and the last map."""
  backbone = runs.load_backbone(str(workdir))
  images = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
  trunk = torch.nn.Sequential(*list(model.children())[:-2])  # up to layer4: no avgpool, no fc
  with torch.no_grad():
    feature_map = trunk(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  ours = backbone.module.apply(models.backbone_variables(backbone.params), images)
  assert relative_error(ours["patch"], feature_map) <= 1e-4
  assert relative_error(ours["embedding"], feature_map.mean(axis=(1, 2))) <= 1e-4


@pytest.mark.parametrize("depth", [18, 50])
def test_torchvision_state_dict_converts_with_forward_parity(depth, tmp_path, caplog):
  model = torchvision_resnet(depth)
  workdir, parts, cfg = convert.import_file(convert_input(model, tmp_path), f"resnet{depth}", str(tmp_path / "run"))
  assert parts == ["backbone"] and "left out the classifier fc.bias, fc.weight" in caplog.text
  assert (cfg.model.name, cfg.model.depth, cfg.model.width) == ("resnet", depth, 64)
  assert (cfg.aug.global_size, cfg.data.image_size) == (224, 256)
  assert_forward_matches(workdir, model)
  stats = runs.load_backbone(str(workdir)).params["batch_stats"]
  np.testing.assert_array_equal(stats["layer1_0"]["bn1"]["var"], model.layer1[0].bn1.running_var.numpy())


def convert_input(model: torch.nn.Module, tmp_path) -> str:
  torch.save(model.state_dict(), tmp_path / "input.pth")
  return str(tmp_path / "input.pth")


def dino_training_checkpoint(backbone: torch.nn.Module, head: torch.nn.Module) -> dict:
  """What DINO's main_dino.py saves for `--arch resnet50`: student and teacher, both DDP-wrapped
  (they have batch norms), `module.backbone.` keys without `fc` (replaced by the identity) and
  `module.head.` keys with the old weight_g / weight_v weight-norm names."""
  head_state = {k.replace("parametrizations.weight.original0", "weight_g")
                 .replace("parametrizations.weight.original1", "weight_v"): v for k, v in head.state_dict().items()}
  teacher = {f"module.backbone.{k}": v for k, v in backbone.state_dict().items() if not k.startswith("fc.")}
  teacher |= {f"module.head.{k}": v for k, v in head_state.items()}
  return {"student": {k: v.clone() for k, v in teacher.items()}, "teacher": teacher, "epoch": 100,
          "optimizer": {"state": {}, "param_groups": [{"lr": 0.0}]}, "dino_loss": {"center": torch.zeros(1, 32)}}


def test_dino_resnet50_training_checkpoint_restores_the_teacher(tmp_path):
  backbone = torchvision_resnet(50, seed=1)
  torch.manual_seed(2)
  head = torch_reference.DINOHead(2048, 32).eval()
  with torch.no_grad():
    head.last_layer.parametrizations.weight.original0.fill_(1.0)  # norm_last_layer: gain 1
  torch.save(dino_training_checkpoint(backbone, head), tmp_path / "dino_resnet50_pretrain_full_checkpoint.pth")
  workdir, parts, cfg = convert.import_file(str(tmp_path / "dino_resnet50_pretrain_full_checkpoint.pth"), "resnet50",
                                            str(tmp_path / "run"))
  assert parts == ["backbone", "head"] and cfg.model.name == "resnet"
  h = cfg.head
  assert (h.out_dim, h.hidden_dim, h.bottleneck_dim, h.norm_last_layer) == (32, 64, 16, True)
  assert_forward_matches(workdir, backbone)
  head_params = checkpoints.restore_weights(str(workdir), ("head",))[0]["head"]
  x = np.random.default_rng(3).normal(size=(4, 2048)).astype(np.float32)
  with torch.no_grad():
    ref = head(torch.from_numpy(x)).numpy()
  assert relative_error(models.DINOHead(32, 64, 16, 3).apply({"params": head_params}, x), ref) <= 1e-4


def test_export_loads_strictly_in_torchvision_and_reimports_exactly(tmp_path):
  model = torchvision_resnet(18, seed=3)
  source, _, _ = convert.import_file(convert_input(model, tmp_path), "resnet18", str(tmp_path / "source"))
  pth = tmp_path / "exported.pth"
  printed = export_with_cli(source, pth)
  assert "torchvision.models.resnet18() with fc = nn.Identity() loads it with strict=True" in printed
  state = torch.load(pth, weights_only=True)
  assert state["layer2.0.bn1.num_batches_tracked"].dtype == torch.int64
  reference = torchvision.models.resnet18()
  reference.fc = torch.nn.Identity()
  reference.load_state_dict(state, strict=True)
  assert_forward_matches(source, reference.eval())

  again, _, _ = convert.import_file(str(pth), "resnet18", str(tmp_path / "again"))
  before, after = (runs.load_backbone(str(w)).params for w in (source, again))
  assert jax.tree.structure(before) == jax.tree.structure(after)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=jax.tree_util.keystr(path))

  safetensors_file = str(tmp_path / "exported.safetensors")
  convert.export_run(str(again), safetensors_file)
  from safetensors.torch import load_file
  tensors = load_file(safetensors_file)
  assert sorted(tensors) == sorted(state)
  for key, value in tensors.items():
    assert value.dtype == state[key].dtype and torch.equal(value, state[key]), key
  reference.load_state_dict(tensors, strict=True)


def test_bad_files_are_one_clear_error(tmp_path):
  state = numpy_state(torchvision_resnet(18))
  with pytest.raises(UsageError, match=r"not match torchvision layout.*: 165 mismatches: missing layer1.0.bn3.bias"):
    convert.to_flax(state, convert.ARCHS["resnet50"])  # a resnet18 file as resnet50
  del state["layer4.1.bn2.running_var"]
  state["layer1.0.conv1.weight"] = state["layer1.0.conv1.weight"][:, :32]
  with pytest.raises(UsageError, match=r"1 mismatches: missing layer4.1.bn2.running_var$"):
    convert.to_flax(state, convert.ARCHS["resnet18"])
  state["layer4.1.bn2.running_var"] = np.ones(512, np.float32)
  with pytest.raises(UsageError, match=r"layer1.0.conv1.weight: \(64, 32, 3, 3\) does not fit the arch's "
                                       r"\(64, 64, 3, 3\)"):
    convert.to_flax(state, convert.ARCHS["resnet18"])
  torch.save({"teacher": {"module.backbone.conv1.weight": torch.zeros(64, 3, 7, 7)}}, tmp_path / "bad.pth")
  result = subprocess.run([sys.executable, "-m", "dino_jax.convert", "--from", str(tmp_path / "bad.pth"),
                           "--arch", "resnet50", "--out", str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and not (tmp_path / "run").exists()
  assert result.stderr.startswith("error: the checkpoint does not match torchvision layout of the arch: ")
  assert len(result.stderr.strip().splitlines()) == 1
