"""Swin backbone (EsViT): interface, shifted windows with padding, parity with timm and with an
EsViT-layout PyTorch reference through dino_jax.convert, export round trip, FLOPs.

Reference models are random initializations (no downloads), every parameter perturbed.
timm shifts before padding, EsViT (and dino_jax) pad before shifting: timm is the reference
where windows divide the grid, the small EsViT-style module below where they do not.
"""
import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

from configs import esvit_swin_t
from dino_jax import convert
from dino_jax import learner
from dino_jax import models
from dino_jax import runs
from dino_jax.models import swin
from tests import torch_reference
from tests.test_convert import numpy_state, perturbed, relative_error, save_safetensors

TIMM_ARCH = convert.SwinArch(width=32, depths=(2, 2), num_heads=(2, 4), window_size=7, image_size=56)  # eps 1e-5
ESVIT_ARCH = convert.SwinArch(width=32, depths=(2, 2), num_heads=(2, 4), window_size=7, norm_eps=1e-6)


def tiny(**kw) -> swin.Swin:
  return swin.Swin(**(dict(width=16, depths=(2, 2), num_heads=(1, 2), window_size=7) | kw))


def images(size: int, batch: int = 2) -> np.ndarray:
  return np.random.default_rng(size).normal(size=(batch, size, size, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def tiny_params():
  return jax.jit(tiny().init)(jax.random.PRNGKey(0), images(32))["params"]


# ---------------------------------------------------------------------------------------
# An EsViT-style PyTorch Swin (official key layout), written from the paper's definitions.
# ---------------------------------------------------------------------------------------


class RefAttention(torch.nn.Module):
  def __init__(self, dim, heads, window_size):
    super().__init__()
    self.heads, self.window_size = heads, window_size
    self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)
    self.relative_position_bias_table = torch.nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, heads))
    self.register_buffer("relative_position_index", torch.zeros(window_size ** 4, dtype=torch.long))  # as EsViT

  def forward(self, windows, window, mask):
    n, tokens, dim = windows.shape
    q, k, v = self.qkv(windows).view(n, tokens, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
    yx = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    offset = yx[:, :, None] - yx[:, None, :] + self.window_size - 1  # Eq. 4's relative positions
    bias = self.relative_position_bias_table[offset[0] * (2 * self.window_size - 1) + offset[1]]
    logits = q @ k.transpose(-2, -1) / (dim // self.heads) ** 0.5 + bias.permute(2, 0, 1) + mask[:, None]
    return self.proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(n, tokens, dim))


class RefBlock(torch.nn.Module):
  def __init__(self, dim, heads, window_size, shifted, eps, build_grid):
    super().__init__()
    self.window_size, self.shifted, self.build_grid = window_size, shifted, build_grid
    self.norm1, self.norm2 = torch.nn.LayerNorm(dim, eps=eps), torch.nn.LayerNorm(dim, eps=eps)
    self.attn = RefAttention(dim, heads, window_size)
    self.mlp = torch.nn.Sequential()
    self.mlp.fc1, self.mlp.act = torch.nn.Linear(dim, 4 * dim), torch.nn.GELU()
    self.mlp.fc2 = torch.nn.Linear(4 * dim, dim)

  def forward(self, x):  # [B, H, W, C]
    b, h, w, c = x.shape
    # Window and shift from the stage's grid at the size the model is built for (EsViT's
    # input_resolution); other maps are padded to that window.
    if self.build_grid <= self.window_size:
      win, shift = self.build_grid, 0
    else:
      win, shift = self.window_size, self.window_size // 2 if self.shifted else 0
    y = F.pad(self.norm1(x), (0, 0, 0, -w % win, 0, -h % win))  # pad, then shift (EsViT)
    hp, wp = y.shape[1:3]
    y = torch.roll(y, (-shift, -shift), (1, 2))
    # Tokens of one window attend to each other unless one of them wrapped around the map.
    wrapped = lambda n: (torch.arange(n) >= n - shift).long()
    region = (wrapped(hp)[:, None] * 2 + wrapped(wp)[None, :]).view(hp // win, win, wp // win, win)
    region = region.permute(0, 2, 1, 3).reshape(-1, win * win)
    mask = (region[:, :, None] != region[:, None, :]).float() * -100.0
    windows = y.view(b, hp // win, win, wp // win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, win * win, c)
    out = self.attn(windows, win, mask.repeat(b, 1, 1))
    out = out.view(b, hp // win, wp // win, win, win, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    x = x + torch.roll(out, (shift, shift), (1, 2))[:, :h, :w]
    return x + self.mlp(self.norm2(x))


class RefMerge(torch.nn.Module):
  def __init__(self, dim, eps):
    super().__init__()
    self.norm, self.reduction = torch.nn.LayerNorm(4 * dim, eps=eps), torch.nn.Linear(4 * dim, 2 * dim, bias=False)

  def forward(self, x):
    x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)  # Swin's order
    return self.reduction(self.norm(x))


class RefSwin(torch.nn.Module):
  """Official layout: `layers.<s>.downsample` merges at the end of stage s."""

  def __init__(self, arch: convert.SwinArch):
    super().__init__()
    d, eps = arch.width, arch.norm_eps
    grids = [arch.image_size // arch.patch_size]
    for _ in arch.depths[1:]:
      grids.append(-(-grids[-1] // 2))
    self.patch_embed = torch.nn.Module()
    self.patch_embed.proj = torch.nn.Conv2d(3, d, arch.patch_size, arch.patch_size)
    self.patch_embed.norm = torch.nn.LayerNorm(d, eps=eps)
    self.layers = torch.nn.ModuleList()
    for s, (depth, heads) in enumerate(zip(arch.depths, arch.num_heads)):
      stage = torch.nn.Module()
      stage.blocks = torch.nn.ModuleList(
          [RefBlock(d * 2 ** s, heads, arch.window_size, j % 2 == 1, eps, grids[s]) for j in range(depth)])
      if s < len(arch.depths) - 1:
        stage.downsample = RefMerge(d * 2 ** s, eps)
      self.layers.append(stage)
    self.norm = torch.nn.LayerNorm(d * 2 ** (len(arch.depths) - 1), eps=eps)

  def forward(self, images):  # NCHW -> [B, h, w, D]
    x = self.patch_embed.norm(self.patch_embed.proj(images).permute(0, 2, 3, 1))
    for stage in self.layers:
      for block in stage.blocks:
        x = block(x)
      if hasattr(stage, "downsample"):
        x = stage.downsample(x)
    return self.norm(x)


def timm_swin(size: int):
  return timm.models.swin_transformer.SwinTransformer(
      img_size=size, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7, num_classes=0)


def timm_to_official(state: dict) -> dict:
  """timm >= 0.9 keys -> the official layout (merges move to the end of the previous stage)."""
  def rename(k):
    parts = k.split(".")
    if parts[0] == "layers" and parts[2] == "downsample":
      parts[1] = str(int(parts[1]) - 1)
    return ".".join(parts)
  return {rename(k): v for k, v in state.items()}


def assert_swin_matches(backbone, torch_forward, sizes):
  apply = jax.jit(backbone.module.apply)
  for size in sizes:
    x = images(size)
    with torch.no_grad():
      ref = torch_forward(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
    ours = apply({"params": backbone.params}, x)
    assert relative_error(ours["patch"], ref) <= 1e-4, size
    assert relative_error(ours["embedding"], ref.mean(axis=(1, 2))) <= 1e-4, size


# ---------------------------------------------------------------------------------------
# Interface.
# ---------------------------------------------------------------------------------------


def test_outputs_grid_layer_ids_and_config(tiny_params):
  cfg = ml_collections.ConfigDict(dict(name="swin", patch_size=4, width=16, depths=[2, 2], num_heads=[1, 2],
                                       window_size=7, mlp_ratio=4.0, drop_path_rate=0.0, norm_eps=1e-6,
                                       dtype="float32", remat="none", attention="xla"))
  module = models.make_backbone(cfg)
  assert isinstance(module, swin.Swin) and module.embed_dim == 32 and module.num_layers == 5
  params = tiny_params
  out = jax.jit(module.apply, static_argnames="layers")({"params": params}, images(32), layers=3)
  assert out["patch"].shape == (2, 4, 4, 32) and out["embedding"].shape == (2, 32)
  np.testing.assert_allclose(out["embedding"], out["patch"].mean(axis=(1, 2)), atol=1e-6)
  # The last 3 blocks: stage 0's last (raw, width 16) and stage 1's two (through the final norm).
  assert [o["patch"].shape for o in out["intermediate"]] == [(2, 8, 8, 16), (2, 4, 4, 32), (2, 4, 4, 32)]
  np.testing.assert_array_equal(out["intermediate"][-1]["patch"], out["patch"])
  first = out["intermediate"][0]
  np.testing.assert_allclose(first["embedding"], first["patch"].mean(axis=(1, 2)), atol=1e-6)
  raw = module.apply({"params": params}, images(32), layers=3, final_norm=False)["intermediate"]
  np.testing.assert_allclose(raw[0]["patch"], first["patch"], atol=1e-5)  # stage 0's block has no norm either way
  assert not np.allclose(raw[-1]["patch"], out["patch"], atol=1e-2)  # the last stage's, before the norm
  assert module.grid(64) == (8, 8) and module.grid(36) == (5, 5) and module.grid(96) == (12, 12)
  with pytest.raises(ValueError, match="not a multiple of patch size 4"):
    module.grid(30)
  with pytest.raises(ValueError, match="no mask token"):
    module.apply({"params": params}, images(32), mask=np.zeros((2, 16), bool))
  ids = {optim_name: module.layer_id(optim_name) for optim_name in (
      "patch_embed/kernel", "patch_norm/scale", "stage0/block0/qkv/kernel", "stage0/block1/relative_position_bias",
      "stage1/merge/reduction/kernel", "stage1/block0/mlp/fc1/bias", "stage1/block1/norm2/scale", "norm/bias")}
  assert list(ids.values()) == [0, 0, 1, 2, 3, 3, 4, 5]
  assert set(params) == {"patch_embed", "patch_norm", "stage0", "stage1", "norm"}
  assert set(params["stage1"]) == {"merge", "block0", "block1"}


def test_window_rule_and_grid_rounding():
  assert swin.window_and_shift(56, 56, 7, True) == (7, 3)
  assert swin.window_and_shift(24, 24, 7, True) == (7, 3)  # padded to 28
  assert swin.window_and_shift(7, 7, 7, True) == (7, 0)  # one window: no shift
  assert swin.window_and_shift(3, 3, 7, False) == (3, 0)
  assert tiny(depths=(2, 2, 2, 2), num_heads=(1, 1, 1, 1)).grid(40) == (2, 2)  # 10 -> 5 -> 3 -> 2


@pytest.mark.parametrize("n,build,shifted,token,rows,cols", [
    (14, 14, True, (0, 0), (0, 3), (0, 3)),  # shifted windows: [0, 3), [3, 10), [10, 14) per axis
    (14, 14, True, (5, 12), (3, 10), (10, 14)),
    (14, 14, False, (8, 2), (7, 14), (0, 7)),
    (12, 12, True, (11, 11), (10, 12), (10, 12)),  # padded to 14, then shifted: the same boundaries
    (12, 12, True, (4, 0), (3, 10), (0, 3)),
    (12, 12, False, (11, 0), (7, 12), (0, 7)),
    (6, 14, True, (0, 0), (0, 3), (0, 3)),  # a smaller map than built for: padded to one window, still shifted
    (6, 14, True, (5, 5), (3, 6), (3, 6)),
    (6, 6, True, (0, 0), (0, 6), (0, 6)),  # built for it: one window of 6, no shift
])
def test_a_token_reaches_exactly_its_window(n, build, shifted, token, rows, cols):
  block = swin.SwinBlock(num_heads=2, window_size=7, shifted=shifted, build_grid=build)
  x = np.random.default_rng(0).normal(size=(1, n, n, 8)).astype(np.float32)
  params = block.init(jax.random.PRNGKey(0), x)
  changed = x.copy()
  changed[0, token[0], token[1]] += np.random.default_rng(1).normal(size=8)  # not constant: LayerNorm removes that
  diff = np.abs(np.asarray(block.apply(params, changed) - block.apply(params, x)))[0].max(-1)
  expected = np.zeros((n, n), bool)
  expected[rows[0]:rows[1], cols[0]:cols[1]] = True
  np.testing.assert_array_equal(diff > 1e-6, expected)


def test_stochastic_depth_with_remat(tiny_params):
  module = tiny(drop_path_rate=0.3, remat="full")  # rates 0, 0.1, 0.2, 0.3, per-sample masks
  x = images(32, batch=4)
  train = jax.jit(lambda p, rng: module.apply({"params": p}, x, deterministic=False, rngs={"dropout": rng}))
  trained = train(tiny_params, jax.random.PRNGKey(1))["embedding"]
  plain = jax.jit(tiny().apply)({"params": tiny_params}, x)["embedding"]
  assert np.isfinite(trained).all() and not np.allclose(trained, plain)


def test_the_train_steps_swin_draws_kept_subsets_on_each_devices_own_samples():
  """With DINOv2's kept subsets (`model.drop_path_mode=subset`) the train step's Swin gets the
  groups and the step's batch sharding. One group spanning 8 devices then runs each device's
  branches on its own samples, with no collective (without the sharding: an all-reduce)."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  cfg = esvit_swin_t.get_config("tiny")
  cfg.model.drop_path_mode, cfg.model.drop_path_rate = "subset", 0.3
  module = learner.make_model(cfg, sharding).backbone
  assert (module.subset_groups, module.batch_sharding) == (1, sharding)  # per_gpu_batch_size 0: one group
  x = jax.device_put(images(16, batch=16), sharding)
  params = jax.jit(module.init)(jax.random.PRNGKey(0), x[:2])
  train = jax.jit(lambda p, x, rng: module.apply(p, x, deterministic=False, rngs={"dropout": rng})["embedding"])
  hlo = train.lower(params, x, jax.random.PRNGKey(1)).compile().as_text()
  assert not re.search(r"all-reduce|all-gather|all-to-all|collective-permute", hlo)


@pytest.mark.parametrize("size", [224, 96])
def test_flops_formula_matches_xla_cost_analysis(size):
  module = swin.Swin(width=128, depths=(2, 1, 1), num_heads=(4, 8, 16))  # 96 px: grids 24, 12 padded; 6 one window
  x = jnp.zeros((1, size, size, 3))
  params = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)
  cost = jax.jit(module.apply).lower(params, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  # XLA also counts norms, softmax and elementwise ops, which the formula leaves out (about 6%
  # at Swin-B's width 128, 8% at Swin-T's 96: the first stage has many tokens of small width).
  assert 1.0 <= cost["flops"] / module.forward_flops(size) <= 1.08


# ---------------------------------------------------------------------------------------
# PyTorch weights: timm's layout and EsViT's.
# ---------------------------------------------------------------------------------------


def test_reference_equals_timm_where_windows_divide():
  model = perturbed(timm_swin(56))
  reference = RefSwin(TIMM_ARCH)
  reference.load_state_dict({k: torch.from_numpy(v) for k, v in timm_to_official(numpy_state(model)).items()},
                            strict=False)  # timm has no relative_position_index buffers
  x = torch.randn(2, 3, 56, 56)
  with torch.no_grad():
    np.testing.assert_allclose(reference(x).numpy(), model.forward_features(x).numpy(), atol=1e-5)


def test_timm_swin_converts_with_forward_parity_and_exports_back(tmp_path, monkeypatch, capsys):
  monkeypatch.setitem(convert.ARCHS, "swin_test", TIMM_ARCH)
  model = perturbed(timm_swin(56))
  file = save_safetensors(numpy_state(model), tmp_path / "timm.safetensors")
  workdir, parts, cfg = convert.import_file(file, "swin_test", str(tmp_path / "run"), layout="timm")
  assert parts == ["backbone"]
  assert (cfg.model.name, tuple(cfg.model.depths), cfg.model.norm_eps) == ("swin", (2, 2), 1e-5)
  backbone = runs.load_backbone(str(workdir))
  assert_swin_matches(backbone, model.forward_features, (56,))
  # Built at 112 (shifted windows in both stages): the same weights, the windows of that size.
  monkeypatch.setitem(convert.ARCHS, "swin_test_112", dataclasses.replace(TIMM_ARCH, image_size=112))
  workdir_112, _, cfg_112 = convert.import_file(file, "swin_test_112", str(tmp_path / "run112"), layout="timm")
  assert cfg_112.model.image_size == 112
  at_112 = perturbed(timm_swin(112))
  at_112.load_state_dict(model.state_dict())
  assert_swin_matches(runs.load_backbone(str(workdir_112)), at_112.forward_features, (112,))

  convert.main(["--export", str(workdir), "--out", str(tmp_path / "exported.pth")])
  assert "timm layout" in capsys.readouterr().out
  state = torch.load(tmp_path / "exported.pth", weights_only=True)
  timm_swin(56).load_state_dict(state)  # strict: exactly timm's keys and shapes
  for key, value in model.state_dict().items():
    np.testing.assert_array_equal(state[key].numpy(), value.numpy(), err_msg=key)
  again, _, _ = convert.import_file(str(tmp_path / "exported.pth"), "swin_test", str(tmp_path / "again"), layout="timm")
  for a, b in zip(jax.tree.leaves(backbone.params), jax.tree.leaves(runs.load_backbone(str(again)).params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_esvit_checkpoint_converts_with_heads_and_parity_at_padded_sizes(tmp_path, monkeypatch):
  """EsViT training checkpoints: {"teacher": {backbone keys, head.*, head_dense.*}, "student":
  {module.*}}; relative_position_index buffers are skipped. 36 px: grid 9 padded to 14 with
  shifted windows, an odd merge to 5, one 5x5 window; 72 px: 18 -> 21 and 9 -> 14 padded."""
  monkeypatch.setitem(convert.ARCHS, "esvit_test", ESVIT_ARCH)
  torch.manual_seed(0)
  backbone = perturbed(RefSwin(ESVIT_ARCH))
  heads = {}
  for name in ("head", "head_dense"):
    heads[name] = perturbed(torch_reference.DINOHead(64, 32))
    with torch.no_grad():
      heads[name].last_layer.parametrizations.weight.original0.fill_(1.0)
  teacher = backbone.state_dict() | {f"{n}.{k}": v for n, h in heads.items() for k, v in h.state_dict().items()}
  torch.save({"teacher": teacher, "student": {"module." + k: v for k, v in teacher.items()}, "epoch": 3},
             tmp_path / "checkpoint.pth")
  workdir, parts, cfg = convert.import_file(str(tmp_path / "checkpoint.pth"), "esvit_test", str(tmp_path / "run"))
  assert parts == ["backbone", "head", "region_head"] and cfg.model.norm_eps == 1e-6
  assert (cfg.head.out_dim, cfg.head.bottleneck_dim) == (32, 16)
  assert_swin_matches(runs.load_backbone(str(workdir)), backbone, (36, 72))
