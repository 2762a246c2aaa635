"""PyTorch <-> dino_jax conversion: forward parity with timm and the official layout, exact round trips.

Needs the test extras (pip install -e ".[test]": torch, timm). Reference models are random
initializations (no downloads); every parameter is perturbed so LayerScale and tokens matter.
"""
import argparse
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
import timm
from timm.layers import SwiGLUPacked
import torch
import torch.nn.functional as F

from configs import dinov2_vits14

from dino_jax import checkpoints
from dino_jax import convert
from dino_jax import learner
from dino_jax import models
from dino_jax import sharding
from dino_jax import trainer
from dino_jax.errors import UsageError
from dino_jax.models import vit
from dino_jax import runs
from tests import torch_reference
from tests.test_train import tiny

REPO = pathlib.Path(__file__).resolve().parents[1]
GIANT_STYLE = convert.Arch(patch_size=14, width=64, depth=2, num_heads=4, mlp_dim=96, ffn="swiglu",
                           num_registers=4, layerscale=1e-5)  # ViT-g's block layout, tiny


def perturbed(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(torch.randn(p.shape, generator=gen) * 0.05)
  return module.eval()


def numpy_state(module: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def relative_error(ours, ref) -> float:
  return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def assert_forward_matches(workdir, torch_forward, num_registers, sizes, masks=None):
  """The restored run's ViT equals `torch_forward` (NCHW -> tokens) on CLS, registers and patches."""
  backbone = runs.load_backbone(str(workdir))
  for size in sizes:
    images = np.random.default_rng(size).normal(size=(2, size, size, 3)).astype(np.float32)
    with torch.no_grad():
      ref = torch_forward(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
    ours = backbone.module.apply({"params": backbone.params}, images)
    assert relative_error(ours["embedding"], ref[:, 0]) <= 1e-4, size
    assert relative_error(ours["patch"].reshape(2, -1, ref.shape[-1]), ref[:, 1 + num_registers:]) <= 1e-4, size
    if num_registers:
      assert relative_error(ours["registers"], ref[:, 1:1 + num_registers]) <= 1e-4, size


def save_safetensors(state, path):
  from safetensors.numpy import save_file
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, str(path))
  return str(path)


@pytest.mark.parametrize("h,g,offset,antialias", [
    (4, 6, 0.1, False), (4, 2, 0.1, False), (37, 16, 0.1, False), (37, 6, 0.0, True),
    (4, 7, 0.0, True), (16, 5, 0.0, True), (14, 20, 0.0, False), (14, 6, 0.1, False)])
def test_resize_pos_embed_is_pytorch_bicubic(h, g, offset, antialias):
  pos = np.random.default_rng(h * g).normal(size=(1, h, h, 3)).astype(np.float32)
  ref = F.interpolate(torch.from_numpy(pos).permute(0, 3, 1, 2), scale_factor=((g + offset) / h,) * 2,
                      mode="bicubic", antialias=antialias).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(vit.resize_pos_embed(pos, (g, g), offset, antialias), ref, atol=5e-5)


# ---------------------------------------------------------------------------------------
# timm layout: timm's own models and forward.
# ---------------------------------------------------------------------------------------


def timm_model(name: str):
  if name == "giant_style":
    return timm.models.vision_transformer.VisionTransformer(
        img_size=56, patch_size=14, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2 * 96 / 64,
        mlp_layer=SwiGLUPacked, act_layer=torch.nn.SiLU, init_values=1e-5, reg_tokens=4,
        no_embed_class=True, num_classes=0, dynamic_img_size=True)
  size = 64 if "patch16" in name else 56
  return timm.create_model(name, pretrained=False, img_size=size, dynamic_img_size=True, num_classes=0)


@pytest.mark.parametrize("name,arch,sizes", [
    ("vit_small_patch14_dinov2", "dinov2_vits14", (56, 84, 42)),
    ("vit_small_patch14_reg4_dinov2", "dinov2_vits14_reg", (56, 70)),
    ("vit_small_patch16_224.dino", "dino_vits16", (64, 96)),
    ("giant_style", GIANT_STYLE, (56, 98)),
])
def test_timm_models_convert_with_forward_parity(name, arch, sizes, tmp_path, monkeypatch):
  model = perturbed(timm_model(name))
  if isinstance(arch, convert.Arch):
    monkeypatch.setitem(convert.ARCHS, "giant_style", arch)
    arch = "giant_style"
  file = save_safetensors(numpy_state(model), tmp_path / "timm.safetensors")
  workdir, parts, cfg = convert.import_file(file, arch, str(tmp_path / "run"), layout="timm")
  assert parts == ["backbone"] and (cfg.model.interpolate_offset, cfg.model.interpolate_antialias) == (0.0, True)
  assert_forward_matches(workdir, model.forward_features, convert.ARCHS[arch].num_registers, sizes)


# ---------------------------------------------------------------------------------------
# Official layout (facebookresearch/dino, dinov2).
# ---------------------------------------------------------------------------------------

OFFICIAL = {  # arch -> the original's resize convention
    "dinov2_vits14": dict(interpolate_offset=0.1, interpolate_antialias=False),
    "dinov2_vits14_reg": dict(interpolate_offset=0.0, interpolate_antialias=True),
    "dino_vits16": dict(interpolate_offset=0.1, interpolate_antialias=False, mask_token=False),
}


def official_model(arch_name: str, grid: int = 4, seed: int = 0):
  arch = convert.ARCHS[arch_name]
  torch.manual_seed(seed)
  return perturbed(torch_reference.OfficialViT(arch, grid, **OFFICIAL.get(arch_name, {})), seed)


def test_reference_equals_timm_at_native_size():
  """The official-layout reference computes what timm computes (keys renamed)."""
  model = perturbed(timm_model("vit_small_patch14_reg4_dinov2"))
  state = numpy_state(model)
  state["register_tokens"] = state.pop("reg_token")
  state["pos_embed"] = np.concatenate([np.zeros_like(state["pos_embed"][:, :1]), state["pos_embed"]], 1)
  reference = torch_reference.OfficialViT(convert.ARCHS["dinov2_vits14_reg"], 4, 0.0, True, mask_token=False)
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  images = torch.randn(2, 3, 56, 56)
  with torch.no_grad():
    np.testing.assert_allclose(reference(images).numpy(), model.forward_features(images).numpy(), atol=1e-5)


@pytest.mark.parametrize("arch_name,sizes", [
    ("dinov2_vits14", (56, 84, 42)), ("dinov2_vits14_reg", (56, 70, 28)), ("dino_vits16", (64, 96, 32))])
def test_official_checkpoints_convert_with_forward_parity(arch_name, sizes, tmp_path):
  model = official_model(arch_name)
  file = tmp_path / "weights.pth"
  torch.save(model.state_dict(), file)
  workdir, _, cfg = convert.import_file(str(file), arch_name, str(tmp_path / "run"))
  assert cfg.model.interpolate_offset == OFFICIAL[arch_name]["interpolate_offset"]
  assert_forward_matches(workdir, model, convert.ARCHS[arch_name].num_registers, sizes)


def test_giant_style_swiglu_official_layout(tmp_path, monkeypatch):
  monkeypatch.setitem(convert.ARCHS, "giant_style", GIANT_STYLE)
  torch.manual_seed(1)
  model = perturbed(torch_reference.OfficialViT(GIANT_STYLE, 4, 0.0, True))
  assert "blocks.0.mlp.w12.weight" in model.state_dict()
  file = save_safetensors(numpy_state(model), tmp_path / "g.safetensors")
  workdir, _, _ = convert.import_file(file, "giant_style", str(tmp_path / "run"))
  assert_forward_matches(workdir, model, 4, (56, 84))


def test_mask_token_replaces_masked_patches_as_in_pytorch(tmp_path):
  model = official_model("dinov2_vits14")
  workdir, _, _ = convert.import_file(save_safetensors(numpy_state(model), tmp_path / "w.safetensors"),
                                      "dinov2_vits14", str(tmp_path / "run"))
  params = runs.load_backbone(str(workdir)).params  # with the mask token
  module = runs.load_backbone(str(workdir)).module
  images = np.random.default_rng(0).normal(size=(2, 56, 56, 3)).astype(np.float32)
  masks = np.random.default_rng(1).random((2, 16)) < 0.5
  with torch.no_grad():
    ref = model(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(masks)).numpy()
  ours = module.apply({"params": params}, images, mask=masks)
  assert relative_error(ours["patch"].reshape(ref[:, 1:].shape), ref[:, 1:]) <= 1e-4


def test_training_checkpoint_teacher_with_head_and_block_chunks(tmp_path):
  """DINOv2 training checkpoints: {"teacher": {backbone.blocks.<chunk>.<i>..., dino_head...}}."""
  backbone = official_model("dinov2_vits14")
  torch.manual_seed(2)
  head = perturbed(torch_reference.DINOHead(384, 32))
  with torch.no_grad():
    head.last_layer.parametrizations.weight.original0.fill_(1.0)  # norm_last_layer: gain 1
  chunked = {("backbone." + k).replace("blocks.", f"blocks.{int(k.split('.')[1]) // 6}.") if k.startswith("blocks.")
             else "backbone." + k: v for k, v in backbone.state_dict().items()}
  teacher = chunked | {"dino_head." + k: v for k, v in head.state_dict().items()}
  torch.save({"teacher": teacher, "iteration": 7}, tmp_path / "teacher_checkpoint.pth")
  workdir, parts, cfg = convert.import_file(str(tmp_path / "teacher_checkpoint.pth"), "dinov2_vits14",
                                            str(tmp_path / "run"))
  assert parts == ["backbone", "head"]
  assert (cfg.head.out_dim, cfg.head.hidden_dim, cfg.head.bottleneck_dim) == (32, 64, 16)
  assert_forward_matches(workdir, backbone, 0, (56,))
  head_params = checkpoints.restore_weights(str(workdir), ("head",))[0]["head"]
  x = np.random.default_rng(3).normal(size=(4, 384)).astype(np.float32)
  ours = models.DINOHead(32, 64, 16, 3).apply({"params": head_params}, x)
  with torch.no_grad():
    ref = head(torch.from_numpy(x)).numpy()
  assert relative_error(ours, ref) <= 1e-4


# ---------------------------------------------------------------------------------------
# Export and round trips.
# ---------------------------------------------------------------------------------------


def export_with_cli(source, out) -> str:
  """`python -m dino_jax.convert --export source --out out`; its stdout (asserting it succeeded)."""
  result = subprocess.run([sys.executable, "-m", "dino_jax.convert", "--export", str(source), "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_export_then_import_is_exact_and_runs_in_pytorch(tmp_path, monkeypatch):
  monkeypatch.setitem(convert.ARCHS, "giant_style", GIANT_STYLE)
  module = models.ViT(14, 64, 2, 4, 96, "swiglu", 4, 1e-5, pos_embed_grid=4, interpolate_offset=0.0,
                      interpolate_antialias=True)
  params = module.init(jax.random.PRNGKey(0), np.zeros((1, 56, 56, 3)), mask=np.zeros((1, 16), bool))["params"]
  params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(1), x.shape), params)
  source = convert.write_run(str(tmp_path / "source"),
                             convert.run_config(GIANT_STYLE, 4, (0.0, True), None), {"backbone": params})
  pth = tmp_path / "exported.pth"
  assert "interpolate_offset=0.0, interpolate_antialias=True" in export_with_cli(source, pth)
  state = torch.load(pth, weights_only=True)
  reference = torch_reference.OfficialViT(GIANT_STYLE, 4, 0.0, True)
  reference.load_state_dict(state)  # strict: exactly the official keys and shapes
  assert_forward_matches(source, reference.eval(), 4, (56, 84))

  again, _, _ = convert.import_file(str(pth), "giant_style", str(tmp_path / "again"))
  restored = runs.load_backbone(str(again)).params
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(restored)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))

  safetensors_file = str(tmp_path / "exported.safetensors")
  convert.export_run(str(again), safetensors_file)
  from safetensors.numpy import load_file
  for key, value in load_file(safetensors_file).items():
    np.testing.assert_array_equal(value, state[key].numpy(), err_msg=key)


# ---------------------------------------------------------------------------------------
# Bad input: one clear error.
# ---------------------------------------------------------------------------------------


def test_wrong_arch_lists_the_mismatched_shapes(tmp_path):
  file = save_safetensors(numpy_state(official_model("dinov2_vits14")), tmp_path / "s.safetensors")
  with pytest.raises(UsageError, match=r"does not fit the arch.*patch_embed.proj.weight: \(384, 3, 14, 14\) does not fit the arch's \(768, 3, 14, 14\)"):
    convert.import_file(file, "dinov2_vitb14", str(tmp_path / "run"))
  with pytest.raises(UsageError, match=r"24 mismatches: unexpected blocks.0.ls1.gamma \(384,\)"):
    convert.import_file(file, "dino_vits16", str(tmp_path / "run2"))  # and patch 16: keys are listed first


def test_weights_with_nan_are_refused_and_nothing_is_written(tmp_path, monkeypatch):
  monkeypatch.setitem(convert.ARCHS, "giant_style", GIANT_STYLE)
  state = numpy_state(torch_reference.OfficialViT(GIANT_STYLE, 4, 0.0, True))
  state["blocks.1.attn.proj.weight"][3, :2] = [np.nan, np.inf]
  file = save_safetensors(state, tmp_path / "g.safetensors")
  with pytest.raises(UsageError, match=r"g.safetensors: \['backbone'\]\['block1'\]\['proj'\]\['kernel'\] "
                                       "holds 2 non-finite values"):
    convert.import_file(file, "giant_style", str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_export_out_is_checked_before_any_work(tmp_path):
  (tmp_path / "folder.pth").mkdir()
  for out, message in ((tmp_path / "w.npz", "must end with .pth or .safetensors"),
                       (tmp_path / "folder.pth", "is a folder; give a file path")):
    with pytest.raises(UsageError, match=message):
      convert.export_run(str(tmp_path / "not_a_run"), str(out))


def test_missing_and_unexpected_keys_are_listed(tmp_path):
  state = numpy_state(official_model("dinov2_vits14"))
  del state["blocks.1.attn.qkv.bias"]
  state["blocks.0.attn.extra"] = np.zeros(3, np.float32)
  file = save_safetensors(state, tmp_path / "s.safetensors")
  with pytest.raises(UsageError, match=r"2 mismatches: missing blocks.1.attn.qkv.bias; unexpected blocks.0.attn.extra"):
    convert.import_file(file, "dinov2_vits14", str(tmp_path / "run"))


def test_pickled_objects_are_refused_and_cli_errors_are_one_line(tmp_path):
  torch.save({"model": {"weight": torch.zeros(2)}, "hook": pathlib.PurePosixPath("x")}, tmp_path / "evil.pth")
  result = subprocess.run([sys.executable, "-m", "dino_jax.convert", "--from", str(tmp_path / "evil.pth"),
                           "--arch", "dinov2_vits14", "--out", str(tmp_path / "run")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  assert result.stderr.startswith("error: ") and "weights_only" in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  result = subprocess.run([sys.executable, "-m", "dino_jax.convert", "--from", "x.pth", "--arch", "vit_huge",
                           "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2 and "invalid choice: 'vit_huge'" in result.stderr


def dino_checkpoint(head: torch.nn.Module, backbone: torch.nn.Module) -> dict:
  """What DINO's main_dino.py saves as checkpoint.pth: student, teacher (backbone. / head.
  keys, the old weight_g / weight_v weight-norm names), optimizer, epoch, its command line
  as an argparse.Namespace, and the loss's center."""
  head_state = {k.replace("parametrizations.weight.original0", "weight_g")
                 .replace("parametrizations.weight.original1", "weight_v"): v for k, v in head.state_dict().items()}
  teacher = {"backbone." + k: v for k, v in backbone.state_dict().items()} | {"head." + k: v for k, v in head_state.items()}
  args = argparse.Namespace(arch="vit_small", patch_size=16, norm_last_layer=False, lr=0.0005, epochs=100)
  return {"student": {"module." + k: v.clone() for k, v in teacher.items()}, "teacher": teacher,
          "optimizer": {"state": {}, "param_groups": [{"lr": 0.0, "weight_decay": 0.04}]}, "epoch": 100,
          "args": args, "dino_loss": {"center": torch.zeros(1, 32)}}


def test_dino_checkpoint_with_args_and_learned_head_gain(tmp_path):
  """A real-format DINO checkpoint.pth (args inside) of a norm_last_layer=False run: backbone
  and head with its learned gains convert, and the head computes what the PyTorch head does."""
  torch.manual_seed(0)
  head = perturbed(torch_reference.DINOHead(384, 32))  # gains = ||v|| + noise, not 1
  backbone = official_model("dino_vits16")
  torch.save(dino_checkpoint(head, backbone), tmp_path / "checkpoint.pth")
  workdir, parts, cfg = convert.import_file(str(tmp_path / "checkpoint.pth"), "dino_vits16", str(tmp_path / "run"))
  assert parts == ["backbone", "head"] and cfg.head.norm_last_layer is False
  assert_forward_matches(workdir, backbone, 0, (64,))
  head_params = checkpoints.restore_weights(str(workdir), ("head",))[0]["head"]
  assert head_params["last_layer_gain"].shape == (1, 32)
  x = np.random.default_rng(3).normal(size=(4, 384)).astype(np.float32)
  ours = models.DINOHead(32, 64, 16, 3, norm_last_layer=False).apply({"params": head_params}, x)
  with torch.no_grad():
    ref = head(torch.from_numpy(x)).numpy()
  assert relative_error(ours, ref) <= 1e-4
  _, parts, _ = convert.import_file(str(tmp_path / "checkpoint.pth"), "dino_vits16", str(tmp_path / "run2"),
                                    key="student")  # DDP's module. prefix undone
  assert parts == ["backbone", "head"]


def test_other_pickled_types_next_to_args_are_refused_with_their_cause(tmp_path):
  torch.save({"teacher": {}, "args": argparse.Namespace(a=1), "hook": pathlib.PurePosixPath("x")}, tmp_path / "c.pth")
  with pytest.raises(UsageError, match="Unsupported global.*PurePosixPath"):
    convert.read_state_dict(str(tmp_path / "c.pth"))


@pytest.mark.parametrize("training_checkpoint,choice,expected", [
    (False, "auto", (0.0, True)),  # the released register backbone (hub)
    (True, "auto", (0.1, False)),  # a training checkpoint: the training config's convention
    (False, "train", (0.1, False)), (True, "hub", (0.0, True))])
def test_register_models_resize_convention(training_checkpoint, choice, expected, tmp_path):
  model = official_model("dinov2_vits14_reg")
  torch.save({"teacher": {"backbone." + k: v for k, v in model.state_dict().items()}} if training_checkpoint
             else model.state_dict(), tmp_path / "w.pth")
  workdir, _, cfg = convert.import_file(str(tmp_path / "w.pth"), "dinov2_vits14_reg", str(tmp_path / "run"),
                                        pos_interpolation=choice)
  assert (cfg.model.interpolate_offset, cfg.model.interpolate_antialias) == expected
  reference = torch_reference.OfficialViT(convert.ARCHS["dinov2_vits14_reg"], 4, *expected)
  reference.load_state_dict(model.state_dict())
  assert_forward_matches(workdir, reference.eval(), 4, (70,))  # 5x5 patches: resized from the 4x4 grid


# ---------------------------------------------------------------------------------------
# Starting a dino_jax run from converted weights.
# ---------------------------------------------------------------------------------------


def test_training_starts_from_converted_weights(tmp_path, monkeypatch):
  cfg = tiny(dinov2_vits14, steps=2)  # ViT width 32, depth 2, 2 heads, patch 4, LayerScale
  m = cfg.model
  arch = convert.Arch(m.patch_size, m.width, m.depth, m.num_heads, m.mlp_dim, m.ffn, m.num_registers, m.layerscale)
  torch.manual_seed(0)
  model = perturbed(torch_reference.OfficialViT(arch, m.pos_embed_grid, mask_token=False))
  file = save_safetensors(numpy_state(model), tmp_path / "w.safetensors")
  monkeypatch.setitem(convert.ARCHS, "tiny_test", arch)
  source, _, _ = convert.import_file(file, "tiny_test", str(tmp_path / "converted"))
  converted = runs.load_backbone(str(source)).params
  built = learner.build(cfg, sharding.make_mesh(), 100)
  state = checkpoints.init_from_run(built.state, str(source))
  for name in ("params", "teacher"):
    backbone = state[name]["backbone"] if name == "params" else state[name].value["backbone"]
    np.testing.assert_array_equal(backbone["block1"]["mlp"]["fc2"]["kernel"], converted["block1"]["mlp"]["fc2"]["kernel"])
    np.testing.assert_array_equal(backbone["cls_token"], converted["cls_token"])
    assert "mask_token" in backbone  # iBOT's mask token: fresh
  np.testing.assert_array_equal(state["params"]["head"]["last_layer"], built.state["params"]["head"]["last_layer"])

  cfg.model.init_from = str(source)
  out = trainer.train(cfg, str(tmp_path / "run"), max_steps=1)
  assert int(out["state"]["step"]) == 1
  cfg.model.update(width=64, num_heads=4, mlp_dim=128)
  with pytest.raises(UsageError, match="does not fit this config"):
    trainer.train(cfg, str(tmp_path / "other"), max_steps=1)
