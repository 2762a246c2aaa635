"""PyTorch DINO / DINOv2 weights <-> dino_jax run directories (Orbax checkpoints).

  python -m dino_jax.convert --from dinov2_vits14_reg4_pretrain.pth --arch dinov2_vits14_reg --out runs/s14reg
  python -m dino_jax.convert --export runs/demo --out demo_backbone.safetensors   # or .pth

Import reads a local file (never downloads): a `.safetensors` file, or a `.pth` file through
`torch.load(weights_only=True)` (PyTorch is needed for .pth only). It takes the official layout
(facebookresearch/dino and dinov2: released backbones, and the teacher of training checkpoints
with its DINO / iBOT heads) or timm's layout of the same models (`--layout timm`), and writes a
run directory (`config.json` + Orbax step 0 holding the teacher) that `dino_jax.extract`,
`evaluate` and `pictures` read, and that `--config.model.init_from` starts training from.

The position embedding stays at its trained grid; at other image sizes it is resized the way
the original code does (`models.vit.resize_pos_embed`): `--pos_interpolation train` (offset 0.1,
no antialias: the official training code, for DINO, DINOv2 and every training checkpoint) or
`hub` (offset 0, antialiased: the released DINOv2 register backbones, and timm); `auto` picks
hub for timm's layout and released register backbones, train otherwise. The CLS slot of the PyTorch position
embedding is the run's `cls_pos_embed` (zeros for a layout without the slot).

Export writes the backbone in the official DINOv2 layout (DINO's for models without
LayerScale), a state_dict that `load_state_dict` of the original model accepts.

Swin Transformers (`--arch swin_*`: Liu et al. 2021 as timm and microsoft/Swin-Transformer
build them, LayerNorm eps 1e-5; `esvit_swin_*`: EsViT's, eps 1e-6) convert the same way: the
official layout is microsoft/Swin-Transformer's and EsViT's (`layers.<s>.downsample` merges
at the end of stage s; EsViT training checkpoints hold the view head as `head.` and the region
head as `head_dense.`, which become the run's `head` and `region_head`), the timm layout
timm >= 0.9's (`layers.<s>.downsample` at the start of stage s). Relative-position index and
attention-mask buffers are left out (they are not learned). Swin runs export in timm's layout.

ResNets (`--arch resnet18` ... `resnet152`: He et al. 2016 as torchvision builds them,
`models.resnet`) convert from torchvision's layout: a torchvision state dict (its classifier
`fc.` left out, with a log line), DINO's released `dino_resnet50_pretrain.pth` (no `fc.`), or
DINO's training checkpoint (`module.backbone.` / `module.head.` keys). Batch-norm running
statistics become the backbone's "batch_stats", saved at `batch_stats/teacher/backbone` of the
checkpoint as a training run saves them; `num_batches_tracked` is left out (it only counts).
ResNet runs export in torchvision's layout, `num_batches_tracked` written as 0, so that
`torchvision.models.resnet50()` with `fc = nn.Identity()` loads the file strictly.
`read_sscd` reads SSCD's torchvision weight files (`models.sscd`) the same way, for curation.
"""
import argparse
import contextlib
import dataclasses
import pathlib
import re
import sys
from typing import Callable, Optional

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from dino_jax import cli
from dino_jax import defaults
from dino_jax import optim
from dino_jax import runs
from dino_jax.errors import ArgumentParser
from dino_jax.errors import UsageError
from dino_jax.errors import fail
from dino_jax.models import resnet
from dino_jax.models import sscd
from dino_jax.models import swin
from dino_jax.models import vit


@dataclasses.dataclass(frozen=True)
class Arch:
  """A ViT as the PyTorch code builds it (what `--arch` names)."""
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  ffn: str = "mlp"
  num_registers: int = 0
  layerscale: Optional[float] = None  # DINOv2 models have LayerScale (init 1e-5)


def _arch(size: str, patch_size: int, **kw) -> Arch:
  width, depth, heads, mlp_dim = vit.VIT_SIZES[size]
  return Arch(patch_size, width, depth, heads, mlp_dim, **kw)


@dataclasses.dataclass(frozen=True)
class SwinArch:
  """A Swin Transformer as the PyTorch code builds it (what `--arch` names)."""
  width: int  # Swin's embed_dim
  depths: tuple[int, ...]
  num_heads: tuple[int, ...]
  window_size: int = 7
  patch_size: int = 4
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-5  # nn.LayerNorm's default (Swin, timm); EsViT builds with 1e-6
  image_size: int = 224  # the input size it was built for, which fixes each stage's window and shift


def _swin_arch(size: str, **kw) -> SwinArch:
  width, depths, heads = swin.SWIN_SIZES[size]
  return SwinArch(width, depths, heads, **kw)


@dataclasses.dataclass(frozen=True)
class ResNetArch:
  """A torchvision ResNet (`torchvision.models.resnet<depth>`, what `--arch resnet*` names)."""
  depth: int
  width: int = 64  # the stem's and the first stage's width


ARCHS = {
    **{f"dino_vit{s[0]}{p}": _arch(s, p) for s in ("small", "base") for p in (16, 8)},
    **{f"dinov2_vit{s[0]}14{reg}": _arch(s, 14, ffn="swiglu" if s == "giant" else "mlp",
                                          num_registers=4 if reg else 0, layerscale=1e-5)
       for s in ("small", "base", "large", "giant") for reg in ("", "_reg")},
    **{f"swin_{s[0]}": _swin_arch(s) for s in ("tiny", "small", "base")},
    **{f"esvit_swin_{s[0]}_w7": _swin_arch(s, norm_eps=1e-6) for s in ("tiny", "small", "base")},
    **{f"resnet{depth}": ResNetArch(depth) for depth in resnet.RESNET_BLOCKS},
}

# Position-embedding resize conventions (offset, antialias): the official training code's
# (`interpolate_offset` 0.1, no antialias: DINO, and DINOv2's training config for every model),
# and the released DINOv2 register backbones' (torch hub: 0, antialias), also timm's.
INTERPOLATION = {"train": (0.1, False), "hub": (0.0, True)}


def interpolation_choice(choice: str, layout: str, arch: "Arch", training_checkpoint: bool) -> str:
  """`--pos_interpolation` with `auto` resolved: `hub` for timm's layout and for a released
  register backbone, `train` for everything else, including every training checkpoint
  (the official training config uses offset 0.1 without antialias, registers or not)."""
  if choice != "auto":
    return choice
  if layout == "timm" or (arch.num_registers and not training_checkpoint):
    return "hub"
  return "train"

# ---------------------------------------------------------------------------------------
# One table maps both ways: (flax path, torch key, torch->flax, flax->torch).
# ---------------------------------------------------------------------------------------

Entry = tuple[str, str, Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def _same(a):
  return a


def _transpose(a):
  return a.T


def _linear(flax: str, torch: str) -> list[Entry]:
  return [(f"{flax}/kernel", f"{torch}.weight", _transpose, _transpose),
          (f"{flax}/bias", f"{torch}.bias", _same, _same)]


def _layer_norm(flax: str, torch: str) -> list[Entry]:
  return [(f"{flax}/scale", f"{torch}.weight", _same, _same), (f"{flax}/bias", f"{torch}.bias", _same, _same)]


def _patch_embed() -> list[Entry]:
  """The patch-embedding conv: torch [D, 3, p, p] <-> flax [p, p, 3, D]."""
  return [("patch_embed/kernel", "patch_embed.proj.weight",
           lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1)),
          ("patch_embed/bias", "patch_embed.proj.bias", _same, _same)]


def _attention(flax: str, torch: str, d: int, h: int) -> list[Entry]:
  """qkv: torch [3D, D] rows (q|k|v, head, dim) <-> flax DenseGeneral [D, 3, H, D/H]; proj."""
  return [(f"{flax}/qkv/kernel", f"{torch}.qkv.weight",
           lambda w: w.T.reshape(d, 3, h, d // h), lambda k: k.reshape(d, 3 * d).T),
          (f"{flax}/qkv/bias", f"{torch}.qkv.bias", lambda b: b.reshape(3, h, d // h), lambda b: b.reshape(-1)),
          (f"{flax}/proj/kernel", f"{torch}.proj.weight",
           lambda w: w.T.reshape(h, d // h, d), lambda k: k.reshape(d, d).T),
          (f"{flax}/proj/bias", f"{torch}.proj.bias", _same, _same)]


def backbone_table(arch: Arch, layout: str) -> list[Entry]:
  """Every backbone tensor but the position embedding and the CLS token (see `to_flax`)."""
  d, h = arch.width, arch.num_heads
  table = _patch_embed()
  if arch.num_registers:
    table.append(("register_tokens", "reg_token" if layout == "timm" else "register_tokens", _same, _same))
  for i in range(arch.depth):
    f, t = f"block{i}", f"blocks.{i}"
    table += _layer_norm(f"{f}/norm1", f"{t}.norm1") + _layer_norm(f"{f}/norm2", f"{t}.norm2")
    table += _attention(f, f"{t}.attn", d, h)
    if arch.ffn == "swiglu":  # official SwiGLUFFNFused w12/w3 = timm SwiGLUPacked fc1/fc2
      names = ("fc1", "fc2") if layout == "timm" else ("w12", "w3")
      table += _linear(f"{f}/mlp/w12", f"{t}.mlp.{names[0]}") + _linear(f"{f}/mlp/w3", f"{t}.mlp.{names[1]}")
    else:
      table += _linear(f"{f}/mlp/fc1", f"{t}.mlp.fc1") + _linear(f"{f}/mlp/fc2", f"{t}.mlp.fc2")
    if arch.layerscale is not None:
      table += [(f"{f}/ls1/gamma", f"{t}.ls1.gamma", _same, _same), (f"{f}/ls2/gamma", f"{t}.ls2.gamma", _same, _same)]
  return table + _layer_norm("norm", "norm")


def swin_table(arch: SwinArch, layout: str) -> list[Entry]:
  """Every learned Swin tensor. The merge starting flax stage s is `layers.<s-1>.downsample`
  in the official layout (it ends the previous stage there) and `layers.<s>.downsample` in
  timm's; the relative position bias table [(2w-1)², H] is flax's [2w-1, 2w-1, H]."""
  table = _patch_embed() + _layer_norm("patch_norm", "patch_embed.norm")
  for s, (depth, h) in enumerate(zip(arch.depths, arch.num_heads)):
    d = arch.width * 2 ** s
    if s:
      t = f"layers.{s if layout == 'timm' else s - 1}.downsample"
      table += _layer_norm(f"stage{s}/merge/norm", f"{t}.norm")
      table.append((f"stage{s}/merge/reduction/kernel", f"{t}.reduction.weight", _transpose, _transpose))
    for j in range(depth):
      f, t = f"stage{s}/block{j}", f"layers.{s}.blocks.{j}"
      table += _layer_norm(f"{f}/norm1", f"{t}.norm1") + _layer_norm(f"{f}/norm2", f"{t}.norm2")
      table += _attention(f, f"{t}.attn", d, h)
      side = 2 * arch.window_size - 1
      table.append((f"{f}/relative_position_bias", f"{t}.attn.relative_position_bias_table",
                    lambda b, side=side: b.reshape(side, side, -1), lambda b, side=side: b.reshape(side * side, -1)))
      table += _linear(f"{f}/mlp/fc1", f"{t}.mlp.fc1") + _linear(f"{f}/mlp/fc2", f"{t}.mlp.fc2")
  return table + _layer_norm("norm", "norm")


def _conv(flax: str, torch: str) -> Entry:
  """A convolution without bias: torch [O, I, kh, kw] <-> flax [kh, kw, I, O]."""
  return (f"{flax}/kernel", f"{torch}.weight", lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))


def _batch_norm(flax: str, torch: str) -> list[Entry]:
  """BatchNorm2d: weight, bias -> params scale, bias; running_mean, running_var -> the
  "batch_stats" mean, var (kept in a backbone's weights under "batch_stats")."""
  return [(f"{flax}/scale", f"{torch}.weight", _same, _same), (f"{flax}/bias", f"{torch}.bias", _same, _same),
          (f"batch_stats/{flax}/mean", f"{torch}.running_mean", _same, _same),
          (f"batch_stats/{flax}/var", f"{torch}.running_var", _same, _same)]


def resnet_table(arch: ResNetArch) -> list[Entry]:
  """Every torchvision ResNet tensor but the classifier `fc` and the `num_batches_tracked`
  counters: block i of stage s is torch `layer<s>.<i>`, flax `layer<s>_<i>`; its shortcut
  `downsample.0` (conv) / `.1` (batch norm) is flax `downsample_conv` / `downsample_bn`."""
  bottleneck, blocks_per_stage = resnet.RESNET_BLOCKS[arch.depth]
  table = [_conv("conv1", "conv1")] + _batch_norm("bn1", "bn1")
  for s, count in enumerate(blocks_per_stage, 1):
    for i in range(count):
      f, t = f"layer{s}_{i}", f"layer{s}.{i}"
      for j in range(1, 4 if bottleneck else 3):
        table += [_conv(f"{f}/conv{j}", f"{t}.conv{j}")] + _batch_norm(f"{f}/bn{j}", f"{t}.bn{j}")
      if i == 0 and (s > 1 or bottleneck):  # the stride or the width changes: a projection shortcut
        table += [_conv(f"{f}/downsample_conv", f"{t}.downsample.0")]
        table += _batch_norm(f"{f}/downsample_bn", f"{t}.downsample.1")
  return table


def resnet_arch_of(state: dict[str, np.ndarray]) -> ResNetArch:
  """The torchvision ResNet a backbone state dict holds, from its blocks per stage and block
  kind (`layer1.0.conv3`: bottlenecks); UsageError when they match none of He et al.'s depths."""
  blocks = [len({m.group(1) for k in state if (m := re.match(rf"layer{s}\.(\d+)\.", k))}) for s in range(1, 5)]
  bottleneck = "layer1.0.conv3.weight" in state
  depths = [d for d, layout in resnet.RESNET_BLOCKS.items() if layout == (bottleneck, tuple(blocks))]
  if not depths or "conv1.weight" not in state:
    kind = "bottleneck" if bottleneck else "basic"
    raise UsageError(f"not a torchvision ResNet: {blocks} {kind} blocks per stage match no depth of "
                     f"{sorted(resnet.RESNET_BLOCKS)} (first keys: {', '.join(list(state)[:5])})")
  return ResNetArch(depths[0], state["conv1.weight"].shape[0])


def resnet_module(arch: ResNetArch) -> resnet.ResNet:
  return resnet.ResNet(depth=arch.depth, width=arch.width)


def swin_module(arch: SwinArch) -> swin.Swin:
  return swin.Swin(arch.patch_size, arch.width, tuple(arch.depths), tuple(arch.num_heads), arch.window_size,
                   arch.image_size, arch.mlp_ratio, norm_eps=arch.norm_eps)


def _param_shapes(module, size: int) -> dict[str, tuple]:
  """Flax shapes of `module`'s params (built on a size² input)."""
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), np.zeros((1, size, size, 3))))["params"]
  return {optim.path_name(p): tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(shapes)}


def _resnet_shapes(arch: ResNetArch) -> dict[str, tuple]:
  """Flax shapes of a ResNet's params and, under "batch_stats/", its running statistics."""
  variables = jax.eval_shape(lambda: resnet_module(arch).init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3))))
  shapes = lambda tree, prefix: {prefix + optim.path_name(p): tuple(x.shape)
                                 for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  return shapes(variables["params"], "") | shapes(variables["batch_stats"], "batch_stats/")


def _expected_shapes(arch: Arch, grid: int) -> dict[str, tuple]:
  """Flax shapes of the backbone (mask token left out: it is optional)."""
  module = vit.ViT(arch.patch_size, arch.width, arch.depth, arch.num_heads, arch.mlp_dim, arch.ffn,
                   arch.num_registers, arch.layerscale, pos_embed_grid=grid)
  return _param_shapes(module, grid * arch.patch_size)


def _nest(flat: dict[str, np.ndarray]) -> dict:
  tree = {}
  for path, value in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def _check(problems: list[str], what: str):
  if problems:
    shown = problems[:12] + ([f"... and {len(problems) - 12} more"] if len(problems) > 12 else [])
    raise UsageError(f"{what}: {len(problems)} mismatches: " + "; ".join(shown))


def _check_state(state: dict[str, np.ndarray], table: list[Entry], expected: Callable[[], dict[str, tuple]],
                 layout: str, extra: Optional[dict[str, tuple]] = None, optional: tuple[str, ...] = ()):
  """Raises UsageError listing every tensor of `state` missing from, unexpected by or of
  another shape than `table` (flax shapes from `expected()`) and the torch tensors `extra`
  (name: shape; those in `optional` may be absent)."""
  extra = extra or {}
  known = {t for _, t, _, _ in table} | set(extra)
  problems = [f"missing {t}" for t in sorted(known - set(state) - set(optional))]
  problems += [f"unexpected {k} {tuple(state[k].shape)}" for k in sorted(set(state) - known)]
  _check(problems, f"the checkpoint does not match {layout} layout of the arch")
  shapes = expected()
  torch_shape = lambda f, to_t: jax.eval_shape(to_t, jax.ShapeDtypeStruct(shapes[f], np.float32)).shape
  wanted = {t: torch_shape(f, to_t) for f, t, _, to_t in table} | extra
  _check([f"{t}: {tuple(state[t].shape)} does not fit the arch's {shape}" for t, shape in wanted.items()
          if t in state and tuple(state[t].shape) != tuple(shape)], "the checkpoint does not fit the arch")


def _swin_to_flax(state: dict[str, np.ndarray], arch: SwinArch, layout: str) -> dict:
  state = {k: v for k, v in state.items() if not re.search(r"(^|\.)(relative_position_index|attn_mask)$", k)}
  table = swin_table(arch, layout)
  size = arch.patch_size * arch.window_size * 2 ** (len(arch.depths) - 1)
  _check_state(state, table, lambda: _param_shapes(swin_module(arch), size), layout)
  return _nest({f: np.asarray(to_f(state[t]), np.float32) for f, t, to_f, _ in table})


def _resnet_to_flax(state: dict[str, np.ndarray], arch: ResNetArch) -> dict:
  classifier = sorted(k for k in state if k.startswith("fc."))
  if classifier:
    logging.warning("left out the classifier %s: the backbone ends at its pooled embedding", ", ".join(classifier))
  state = {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith(".num_batches_tracked")}
  table = resnet_table(arch)
  _check_state(state, table, lambda: _resnet_shapes(arch), "torchvision")
  return _nest({f: np.asarray(to_f(state[t]), np.float32) for f, t, to_f, _ in table})


def to_flax(state: dict[str, np.ndarray], arch: Arch | SwinArch | ResNetArch, layout: str = "official") -> dict:
  """The flax backbone params of a PyTorch backbone state_dict (keys without prefix); a
  ResNet's with its running statistics under "batch_stats" (`models.backbone_weights`).

  Raises UsageError listing every missing, unexpected or wrongly shaped tensor.
  """
  if isinstance(arch, SwinArch):
    return _swin_to_flax(state, arch, layout)
  if isinstance(arch, ResNetArch):
    return _resnet_to_flax(state, arch)
  if "pos_embed" not in state or state["pos_embed"].ndim != 3:
    raise UsageError(f"no [1, N, D] pos_embed among the {len(state)} tensors: not a ViT backbone "
                     f"(first keys: {', '.join(list(state)[:5])})")
  n = state["pos_embed"].shape[1]
  has_cls_slot = round(n ** 0.5) ** 2 != n
  grid = round((n - has_cls_slot) ** 0.5)
  if grid * grid != n - has_cls_slot:
    raise UsageError(f"pos_embed has {n} positions: not a square grid (with or without a CLS slot)")
  table = backbone_table(arch, layout)
  extra = {"pos_embed": (1, n, arch.width), "cls_token": (1, 1, arch.width), "mask_token": (1, arch.width)}
  _check_state(state, table, lambda: _expected_shapes(arch, grid), layout, extra, optional=("mask_token",))
  flat = {f: to_f(state[t]) for f, t, to_f, _ in table}
  flat["pos_embed"] = state["pos_embed"][:, has_cls_slot:].reshape(1, grid, grid, -1)
  flat["cls_token"] = state["cls_token"]
  flat["cls_pos_embed"] = state["pos_embed"][:, :1] if has_cls_slot else np.zeros_like(state["cls_token"])
  if "mask_token" in state:
    flat["mask_token"] = state["mask_token"].reshape(1, 1, -1)
  return _nest({k: np.asarray(v, np.float32) for k, v in flat.items()})


def to_torch(params: dict, arch: Arch | SwinArch | ResNetArch) -> dict[str, np.ndarray]:
  """The PyTorch state_dict of flax backbone params (inverse of to_flax): official layout
  for ViTs, timm's for Swin, torchvision's for ResNets (each batch norm's `num_batches_tracked`
  a 0 int64 scalar, as `load_state_dict(strict=True)` wants it)."""
  flat = {optim.path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
  if isinstance(arch, SwinArch):
    return {t: to_t(flat[f]) for f, t, _, to_t in swin_table(arch, "timm")}
  if isinstance(arch, ResNetArch):
    state = {t: to_t(flat[f]) for f, t, _, to_t in resnet_table(arch)}
    return state | {t.removesuffix("running_mean") + "num_batches_tracked": np.zeros((), np.int64)
                    for t in state if t.endswith(".running_mean")}
  state = {t: to_t(flat[f]) for f, t, _, to_t in backbone_table(arch, "official")}
  pos = flat["pos_embed"].reshape(1, -1, arch.width)
  state["pos_embed"] = np.concatenate([flat["cls_pos_embed"], pos], axis=1)
  state["cls_token"] = flat["cls_token"]
  if "mask_token" in flat:
    state["mask_token"] = flat["mask_token"].reshape(1, -1)
  return state


def head_to_flax(state: dict[str, np.ndarray]) -> dict:
  """A DINO head (mlp.0/2/4 Linear + weight-normed last_layer) as flax `DINOHead` params.

  A last layer whose gains are all 1 (DINO's norm_last_layer=True) becomes a fixed-gain head;
  learned gains (norm_last_layer=False, DINOv2's heads) become its `last_layer_gain`.
  """
  gain = state.get("last_layer.weight_g", state.get("last_layer.parametrizations.weight.original0"))
  direction = state.get("last_layer.weight_v", state.get("last_layer.parametrizations.weight.original1"))
  layers = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"mlp\.(\d+)\.weight", k)))
  if gain is None or direction is None or layers != list(range(0, 2 * len(layers), 2)):
    raise UsageError(f"not a DINO head (mlp.0/2/4 + weight-normed last_layer): {', '.join(sorted(state))}")
  flat = {}
  for j, layer in enumerate(layers):
    flat[f"mlp{j}/kernel"] = state[f"mlp.{layer}.weight"].T
    flat[f"mlp{j}/bias"] = state[f"mlp.{layer}.bias"]
  flat["last_layer"] = direction.T
  if not np.array_equal(gain, np.ones_like(gain)):
    flat["last_layer_gain"] = gain.reshape(1, -1)  # torch [K, 1]
  return _nest({k: np.asarray(v, np.float32) for k, v in flat.items()})


# ---------------------------------------------------------------------------------------
# Files and run directories.
# ---------------------------------------------------------------------------------------


def load_error_cause(error: Exception) -> str:
  """One line of torch.load's multi-line message that keeps its cause (the unpickler's
  complaint, e.g. which global it refused), not only the generic first line."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  cause = [line for line in lines if "error:" in line.lower() or "unsupported global" in line.lower()]
  return " ".join(dict.fromkeys(cause[:1] + lines[:1] if cause else lines[:2])) or type(error).__name__


def read_state_dict(path: str, key: Optional[str] = None) -> dict[str, np.ndarray]:
  """Tensors of a .safetensors or .pth file as float32 numpy arrays; `key` picks a nested
  dict (default: "teacher", "model" or "state_dict", the first present)."""
  file = pathlib.Path(path)
  if not file.is_file():
    raise UsageError(f"no file {path!r}")
  if file.suffix == ".safetensors":
    import safetensors.numpy  # pylint: disable=import-outside-toplevel
    try:
      tensors = safetensors.numpy.load_file(file)
    except safetensors.SafetensorError as e:  # truncated, empty or not a safetensors file
      raise UsageError(f"{path}: not a readable .safetensors file ({e})") from None
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UsageError("reading .pth files needs PyTorch (pip install torch); .safetensors files do not") from None
  try:
    # DINO's checkpoint.pth also holds its command line (`args`, an argparse.Namespace):
    # exactly that type is allowed besides tensors and plain containers.
    allow = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    with allow([argparse.Namespace]) if allow else contextlib.nullcontext():
      obj = torch.load(file, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle errors of all kinds: the file is refused, not executed
    raise UsageError(f"{path}: not loadable with torch.load(weights_only=True): {load_error_cause(e)}") from None
  if isinstance(obj, dict) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
    nested = [k for k in (key,) if k] or [k for k in ("teacher", "model", "state_dict") if k in obj]
    if not nested or nested[0] not in obj:
      raise UsageError(f"{path}: no tensors at the top and no {key or 'teacher/model/state_dict'} entry "
                       f"(has: {', '.join(map(str, obj))})")
    obj = obj[nested[0]]
  return {k: v.float().numpy() for k, v in obj.items() if isinstance(v, torch.Tensor)}


_PARTS = {"backbone": "backbone", "head": "head", "dino_head": "head", "ibot_head": "ibot_head",
          "head_dense": "region_head"}
HEADS = ("head", "ibot_head", "region_head")  # the run's names of the heads a checkpoint may hold


def split_state_dict(state: dict[str, np.ndarray]) -> dict[str, dict[str, np.ndarray]]:
  """Backbone and heads of a state_dict, prefixes removed: DDP's `module.`, and in training
  checkpoints `backbone.`, `head.` (DINO), `dino_head.` and `ibot_head.` (DINOv2); EsViT's
  heads hang on the backbone itself (`head.`, region head `head_dense.`), recognized by their
  DINO-head keys (`mlp.<i>.`, `last_layer.`). Keys of DINOv2's block chunks
  (`blocks.<chunk>.<i>.`) become `blocks.<i>.`."""
  parts = {"backbone": {}} | {name: {} for name in HEADS}
  training = any(k.removeprefix("module.").startswith("backbone.") for k in state)
  for key, value in state.items():
    name = key.removeprefix("module.")
    prefix, _, rest = name.partition(".")
    head_key = prefix != "backbone" and re.match(r"(mlp\.\d+|last_layer)\.", rest)
    part = _PARTS.get(prefix) if training or head_key else None
    if part is None:  # a plain backbone file, or a key reported as unexpected
      part, rest = "backbone", name
    parts[part][re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", rest)] = value
  return parts


def run_config(arch: Arch | SwinArch | ResNetArch, grid: Optional[int],
               interpolation: Optional[tuple[float, bool]], head: Optional[dict], ibot_head: Optional[dict] = None):
  """A config describing the converted model (DINO's ResNet recipe for ResNets, EsViT's for Swin,
  DINOv2's for LayerScale models, else DINO's); `grid` and `interpolation` are a ViT position
  embedding's."""
  if isinstance(arch, ResNetArch):
    cfg = defaults.resnet_config(arch.depth)
    cfg.model.width = arch.width
  elif isinstance(arch, SwinArch):
    cfg = defaults.esvit_config("tiny")
    cfg.model.update(patch_size=arch.patch_size, width=arch.width, depths=tuple(arch.depths),
                     num_heads=tuple(arch.num_heads), window_size=arch.window_size, image_size=arch.image_size,
                     mlp_ratio=arch.mlp_ratio, norm_eps=arch.norm_eps)
  else:
    cfg = defaults.dinov2_config("small") if arch.layerscale is not None else defaults.base_config()
    cfg.model.update(patch_size=arch.patch_size, width=arch.width, depth=arch.depth, num_heads=arch.num_heads,
                     mlp_dim=arch.mlp_dim, ffn=arch.ffn, num_registers=arch.num_registers,
                     layerscale=arch.layerscale, pos_embed_grid=grid, interpolate_offset=interpolation[0],
                     interpolate_antialias=interpolation[1])
  if head is not None:
    cfg.head.update(out_dim=head["last_layer"].shape[1], hidden_dim=head["mlp0"]["kernel"].shape[1],
                    bottleneck_dim=head["last_layer"].shape[0],
                    num_layers=sum(k.startswith("mlp") for k in head), norm_last_layer="last_layer_gain" not in head)
  if ibot_head is not None and ibot_head["last_layer"].shape[0] != cfg.head.bottleneck_dim:
    cfg.head.ibot_bottleneck_dim = ibot_head["last_layer"].shape[0]
  cfg.aug.global_size, cfg.data.image_size = 224, 256  # the usual evaluation view
  return cfg


def check_finite(arrays: dict, path: str) -> None:
  """UsageError naming the first converted array of `path` with nan or inf values."""
  for name, value in jax.tree_util.tree_leaves_with_path(arrays):
    bad = int(np.size(value) - np.isfinite(value).sum())
    if bad:
      raise UsageError(f"{path}: {jax.tree_util.keystr(name)} holds {bad} non-finite values (nan or inf): the "
                       "weights are damaged or diverged; nothing written")


def write_run(out: str, cfg, teacher: dict) -> pathlib.Path:
  """A run directory whose step 0 holds `teacher` as the teacher (what the tools restore). A
  backbone's running statistics (its weights' "batch_stats") are saved apart, at
  `batch_stats/teacher/backbone`, where a training run's train state keeps them
  (`checkpoints.restore_weights` puts them back into the weights)."""
  workdir = pathlib.Path(out).resolve()
  if (workdir / "checkpoints").exists():
    raise UsageError(f"{out!r} already has checkpoints; choose a new --out")
  cli.output_folder("--out", out)
  (workdir / "config.json").write_text(cfg.to_json(indent=2))
  backbone = dict(teacher["backbone"])
  stats = backbone.pop("batch_stats", None)
  item = {"teacher": {"value": dict(teacher, backbone=backbone)}}
  if stats:
    item["batch_stats"] = {"teacher": {"backbone": stats}}
  mngr = ocp.CheckpointManager(str(workdir / "checkpoints"))
  mngr.save(0, args=ocp.args.StandardSave(item))
  mngr.wait_until_finished()
  mngr.close()
  return workdir


def import_file(path: str, arch_name: str, out: str, layout: str = "official", key: Optional[str] = None,
                with_head: bool = True, pos_interpolation: str = "auto"):
  """`--from` conversion: PyTorch file -> dino_jax run directory; returns (the directory, the
  converted parts, the run's config)."""
  if arch_name not in ARCHS:
    raise UsageError(f"unknown --arch {arch_name!r}; one of: {', '.join(ARCHS)}")
  arch = ARCHS[arch_name]
  state = read_state_dict(path, key)
  training_checkpoint = any(k.removeprefix("module.").startswith("backbone.") for k in state)
  parts = split_state_dict(state)
  teacher = {"backbone": to_flax(parts["backbone"], arch, layout)}
  if with_head:
    teacher |= {name: head_to_flax(parts[name]) for name in HEADS if parts[name]}
    if any("last_layer_gain" in teacher[name] for name in HEADS if name in teacher):  # one setting for all heads
      for name in HEADS:
        if name in teacher:
          teacher[name].setdefault("last_layer_gain", np.ones((1, teacher[name]["last_layer"].shape[1]), np.float32))
  check_finite(teacher, path)
  if isinstance(arch, (SwinArch, ResNetArch)):
    cfg = run_config(arch, None, None, teacher.get("head"))
    return write_run(out, cfg, teacher), sorted(teacher), cfg
  interpolation = INTERPOLATION[interpolation_choice(pos_interpolation, layout, arch, training_checkpoint)]
  grid = teacher["backbone"]["pos_embed"].shape[1]
  cfg = run_config(arch, grid, interpolation, teacher.get("head"), teacher.get("ibot_head"))
  return write_run(out, cfg, teacher), sorted(teacher), cfg


def read_sscd(path: str) -> tuple[sscd.SSCD, dict]:
  """An SSCD descriptor and its Flax variables from facebookresearch/sscd-copy-detection's
  torchvision weight file (`sscd_*.torchvision.pt`: the state dict of its `Model`, keys
  `backbone.conv1.weight` ... `backbone.fc.weight` [dim, C], `backbone.fc.bias`), or the same
  layout without the `backbone.` prefix. The trunk's depth is read from the file (any
  torchvision ResNet); `fc` becomes the projection."""
  parts = split_state_dict(read_state_dict(path))
  state, heads = parts["backbone"], [name for name in HEADS if parts[name]]
  if heads or "fc.weight" not in state or "fc.bias" not in state:
    raise UsageError(f"{path}: not an SSCD torchvision model (a ResNet with its projection fc.weight, fc.bias"
                     + (f"; it holds {', '.join(heads)}" if heads else "; there is no fc") + ")")
  trunk_state = {k: v for k, v in state.items() if not k.startswith("fc.")}
  arch = resnet_arch_of(trunk_state)
  trunk = to_flax(trunk_state, arch)
  module = sscd.SSCD(arch.depth, arch.width, dim=state["fc.weight"].shape[0])
  channels = resnet_module(arch).embed_dim
  if state["fc.weight"].shape != (module.dim, channels) or state["fc.bias"].shape != (module.dim,):
    raise UsageError(f"{path}: fc.weight {state['fc.weight'].shape}, fc.bias {state['fc.bias'].shape} do not fit "
                     f"a projection of the {channels} channels of a resnet{arch.depth}")
  stats = trunk.pop("batch_stats")
  variables = {"params": {"trunk": trunk, "projection": {"kernel": state["fc.weight"].T, "bias": state["fc.bias"]}},
               "batch_stats": {"trunk": stats}}
  check_finite(variables, path)
  return module, variables


def export_run(workdir: str, out: str, step: Optional[int] = None, student: bool = False) -> dict:
  """`--export`: a run's backbone -> state_dict file (.pth or .safetensors): official layout
  for ViTs, timm's for Swin, torchvision's for ResNets."""
  cli.output_file("--out", out, (".pth", ".safetensors"))
  backbone = runs.load_backbone(workdir, step, student)
  m = backbone.cfg.model
  if m.get("name", "vit") == "resnet":
    arch = ResNetArch(m.depth, m.get("width", 64))
  elif m.get("name", "vit") == "swin":
    arch = SwinArch(m.width, tuple(m.depths), tuple(m.num_heads), m.window_size, m.patch_size, m.mlp_ratio,
                    m.norm_eps, m.get("image_size", 224))
  else:
    arch = Arch(m.patch_size, m.width, m.depth, m.num_heads, m.mlp_dim, m.ffn, m.num_registers, m.layerscale)
  state = to_torch(jax.device_get(backbone.params), arch)
  if pathlib.Path(out).suffix.lower() == ".safetensors":
    from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
    # C order (transposed kernels); asarray, not ascontiguousarray, keeps 0-d arrays (num_batches_tracked) 0-d
    save_file({k: np.asarray(v, order="C") for k, v in state.items()}, out)
  else:
    import torch  # pylint: disable=import-outside-toplevel
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, out)  # writable copies
  return {"state": state, "config": backbone.cfg, "step": backbone.step}


# ---------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = ArgumentParser(prog="python -m dino_jax.convert", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  what = parser.add_mutually_exclusive_group(required=True)
  what.add_argument("--from", dest="source", metavar="FILE", help="PyTorch .pth or .safetensors to import.")
  what.add_argument("--export", metavar="RUN", help="dino_jax run directory to export.")
  parser.add_argument("--out", required=True, help="Run directory (import) or .pth/.safetensors file (export).")
  parser.add_argument("--arch", choices=list(ARCHS), help="Import: the model the file holds.")
  parser.add_argument("--layout", choices=["official", "timm"], default="official",
                      help="Import: key layout and position-embedding resize convention of the file.")
  parser.add_argument("--key", help="Import: entry of a training checkpoint (default teacher/model/state_dict).")
  parser.add_argument("--no_head", action="store_true", help="Import: leave out the DINO/iBOT/region heads.")
  parser.add_argument("--pos_interpolation", choices=["auto", "train", "hub"], default="auto",
                      help="Import, ViTs: how the position embedding is resized at other sizes. train: offset 0.1, "
                           "no antialias (the official training code; models trained with it, registers or not); "
                           "hub: offset 0, antialias (the released DINOv2 register backbones, timm). auto: hub for "
                           "timm's layout and released register backbones, train otherwise (training checkpoints "
                           "included).")
  parser.add_argument("--step", type=int, help="Export: checkpoint step (default: the latest).")
  parser.add_argument("--student", action="store_true", help="Export: the student instead of the teacher.")
  args = parser.parse_args(argv)
  if args.source and not args.arch:
    parser.error("--from needs --arch (one of: " + ", ".join(ARCHS) + ")")
  return args


def main(argv: list[str]):
  args = parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  try:
    if args.source:
      workdir, parts, cfg = import_file(args.source, args.arch, args.out, args.layout, args.key, not args.no_head,
                                         args.pos_interpolation)
      m = cfg.model
      if m.get("name", "vit") == "resnet":
        print(f"{args.arch} (torchvision layout): {' + '.join(parts)}, with its batch-norm running statistics "
              f"-> {workdir}")
      elif m.get("name", "vit") == "swin":
        print(f"{args.arch} ({args.layout} layout): {' + '.join(parts)} -> {workdir}")
      else:
        print(f"{args.arch} ({args.layout} layout): {' + '.join(parts)}; pos-embed grid {m.pos_embed_grid}, "
              f"resized with offset {m.interpolate_offset}, antialias {m.interpolate_antialias} -> {workdir}")
    else:
      result = export_run(args.export, args.out, args.step, args.student)
      m = result["config"].model
      if m.get("name", "vit") == "resnet":
        print(f"{len(result['state'])} tensors of step {result['step']} -> {args.out} (torchvision layout: "
              f"torchvision.models.resnet{m.depth}() with fc = nn.Identity() loads it with strict=True)")
      elif m.get("name", "vit") == "swin":
        print(f"{len(result['state'])} tensors of step {result['step']} -> {args.out} (timm layout: "
              f"timm's SwinTransformer with embed_dim={m.width}, depths={tuple(m.depths)}, "
              f"num_heads={tuple(m.num_heads)}, window_size={m.window_size}, LayerNorm eps {m.norm_eps})")
      else:
        print(f"{len(result['state'])} tensors of step {result['step']} -> {args.out} (official layout; build the "
              f"PyTorch model with interpolate_offset={m.interpolate_offset}, "
              f"interpolate_antialias={m.interpolate_antialias} for the same outputs at other sizes)")
  except UsageError as e:
    fail(str(e))
  except OSError as e:
    fail(f"cannot write --out {args.out!r}: {e.strerror or e}")


if __name__ == "__main__":
  main(sys.argv[1:])
