"""Swin Transformer backbone (Flax linen), registered as `model.name="swin"`: EsViT's backbone.

Swin (Liu et al. 2021) embeds 4x4 patches, then runs stages of blocks whose self-attention
is restricted to non-overlapping windows of window² tokens, every second block on windows
shifted by window // 2 (Sec. 3.2, Fig. 2 and 4) with a learned relative position bias
(Eq. 4); a patch merging layer at the start of every stage after the first halves the grid
and doubles the width (Sec. 3.1). EsViT (Li et al. 2022) trains it with DINO's view-level
loss on the average-pooled last stage and a region-level loss on the last stage's tokens.

Sizes that windows do not divide (EsViT's 96 px local crops: grids 24, 12, 6, 3) are handled
as the original code does (Swin's detection code, which EsViT uses): a stage whose grid is no
larger than the window is one window, unshifted; otherwise the normalized map is padded with
zeros at the bottom and right to a multiple of the window, and shifted after padding, the
shifted-window mask being computed on the padded grid (the padded tokens take part in
attention as in the original).
"""
import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dino_jax.models import layers
from dino_jax.models.layers import Mlp, REMAT_POLICIES, patch_embedding, residual, trunc_normal

SWIN_SIZES = {  # name: (width, depths, heads) of Liu et al. 2021, Sec. 3.3
    "tiny": (96, (2, 2, 6, 2), (3, 6, 12, 24)),
    "small": (96, (2, 2, 18, 2), (3, 6, 12, 24)),
    "base": (128, (2, 2, 18, 2), (4, 8, 16, 32)),
}


def window_and_shift(h: int, w: int, window_size: int, shifted: bool) -> tuple[int, int]:
  """(window, shift) of a block whose stage has an h x w map at the size the model is built for
  (`Swin.image_size`): a map no larger than the window is one unshifted window (the original
  code's rule), else window_size and window_size // 2 when `shifted` (odd blocks)."""
  if min(h, w) <= window_size:
    return min(h, w), 0
  return window_size, window_size // 2 if shifted else 0


def _padded(n: int, window: int) -> int:
  return -(-n // window) * window


def shifted_window_mask(hp: int, wp: int, window: int, shift: int) -> np.ndarray:
  """[windows, window², window²] additive mask (0 or -100, the original's value) of shifted
  windows on an hp x wp (padded) map rolled by -shift: tokens of one window that come from
  different regions of the unrolled map (the last `shift` rows/columns wrapped around, the
  rest of the last window, everything else) do not attend to each other (Liu et al. 2021,
  Fig. 4). Windows are in row-major order."""
  def regions(n):
    label = np.zeros(n, np.int32)
    label[n - window:] = 1
    label[n - shift:] = 2
    return label
  label = regions(hp)[:, None] * 3 + regions(wp)[None, :]
  windows = label.reshape(hp // window, window, wp // window, window).transpose(0, 2, 1, 3)
  windows = windows.reshape(-1, window * window)
  return np.where(windows[:, :, None] != windows[:, None, :], -100.0, 0.0).astype(np.float32)


def relative_position_index(window: int, window_size: int) -> np.ndarray:
  """[window², window², 2] indices into a [2 window_size - 1, 2 window_size - 1] table of
  the offset (dy, dx) between query and key tokens of a window (Liu et al. 2021, Eq. 4);
  a window smaller than window_size uses the table's central part (the same offsets)."""
  coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij"), -1).reshape(-1, 2)
  return coords[:, None] - coords[None, :] + window_size - 1


class SwinBlock(nn.Module):
  """Pre-norm Swin block on a [B, H, W, C] map: x + (S)W-MSA(ln(x)), x + MLP(ln(x))."""
  num_heads: int
  window_size: int
  shifted: bool
  build_grid: int  # the stage's grid at the size the model is built for: fixes window and shift
  mlp_ratio: float = 4.0
  drop_path: float = 0.0
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  attention: str = "xla"
  subset_groups: Optional[int] = None  # DINOv2's kept-subset stochastic depth in that many groups, else per sample
  batch_sharding: Optional[jax.sharding.NamedSharding] = None  # the train step's: where the kept subsets are drawn

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    _, h, w, d = x.shape
    heads = self.num_heads
    window, shift = window_and_shift(self.build_grid, self.build_grid, self.window_size, self.shifted)
    hp, wp = _padded(h, window), _padded(w, window)
    rows, cols, area = hp // window, wp // window, window * window
    table = self.param("relative_position_bias", trunc_normal(0.02),
                       (2 * self.window_size - 1,) * 2 + (heads,))
    index = relative_position_index(window, self.window_size)
    bias = table[index[..., 0], index[..., 1]].transpose(2, 0, 1)  # [heads, area, area]
    mask = shifted_window_mask(hp, wp, window, shift) if shift else np.zeros((rows * cols, 1, 1), np.float32)
    # Windows x heads are attention heads of one sequence of `area` tokens per image: the
    # bias [1, windows * heads, area, area] then broadcasts over the batch.
    bias = (bias[None] + mask[:, None]).reshape(1, rows * cols * heads, area, area)

    def attention(x):
      b = x.shape[0]
      y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm1")(x)
      y = jnp.pad(y, ((0, 0), (0, hp - h), (0, wp - w), (0, 0)))
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2)) if shift else y
      qkv = nn.DenseGeneral((3, heads, d // heads), dtype=self.dtype, kernel_init=layers.LINEAR_INIT, name="qkv")(y)
      qkv = qkv.reshape(b, rows, window, cols, window, 3, heads, d // heads).transpose(0, 2, 4, 5, 1, 3, 6, 7)
      qkv = qkv.reshape(b, area, 3, rows * cols * heads, d // heads)
      y = layers.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias=bias.astype(qkv.dtype),
                           implementation=self.attention)
      y = y.reshape(b, window, window, rows, cols, heads, d // heads).transpose(0, 3, 1, 4, 2, 5, 6)
      y = y.reshape(b, hp, wp, heads, d // heads)
      y = jnp.roll(y, (shift, shift), axis=(1, 2)) if shift else y
      return nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, kernel_init=layers.LINEAR_INIT,
                             name="proj")(y[:, :h, :w])

    def feed_forward(x):
      y = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm2")(x)
      return Mlp(int(d * self.mlp_ratio), dtype=self.dtype, name="mlp")(y)

    for branch in (attention, feed_forward):
      x = residual(x, branch, self.drop_path, deterministic, self.make_rng, self.subset_groups,
                   batch_sharding=self.batch_sharding)
    return x


class PatchMerging(nn.Module):
  """2x2 neighbours concatenated (an odd grid zero-padded at the bottom/right), normalized and
  projected to twice the width (Liu et al. 2021, Sec. 3.1); the original's channel order."""
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    x = jnp.pad(x, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)))
    h, w = x.shape[1:3]
    x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 4, 2, 5).reshape(b, h // 2, w // 2, 4 * c)
    x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="norm")(x)
    return nn.Dense(2 * c, use_bias=False, dtype=self.dtype, kernel_init=layers.LINEAR_INIT, name="reduction")(x)


class SwinStage(nn.Module):
  """Patch merging (all stages but the first), then blocks alternating regular and shifted
  windows; returns every block's output."""
  depth: int
  num_heads: int
  window_size: int
  merge: bool
  drop_paths: tuple[float, ...]
  build_grid: int  # this stage's grid at the size the model is built for
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"
  attention: str = "xla"
  subset_groups: Optional[int] = None
  batch_sharding: Optional[jax.sharding.NamedSharding] = None

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    if self.merge:
      x = PatchMerging(self.norm_eps, self.dtype, name="merge")(x)
    block = SwinBlock if self.remat == "none" else nn.remat(
        SwinBlock, static_argnums=(2,), policy=REMAT_POLICIES[self.remat])
    outputs = []
    for j in range(self.depth):
      x = block(self.num_heads, self.window_size, j % 2 == 1, self.build_grid, self.mlp_ratio, self.drop_paths[j],
                self.norm_eps, self.dtype, self.attention, self.subset_groups, self.batch_sharding,
                name=f"block{j}")(x, deterministic)
      outputs.append(x)
    return outputs


class Swin(nn.Module):
  """Swin Transformer with the backbone outputs every registered backbone gives. There is no
  CLS token:

  "embedding" [B, D]: the last stage after the final norm, average-pooled (EsViT's view-level
  embedding); "patch" [B, h, w, D]: the last stage's region tokens after the final norm;
  with `layers=n` "intermediate": the last n blocks (counted over all stages, as EsViT's
  `forward_return_n_last_blocks`), each {"embedding": its average-pooled map, "patch": its
  map}. As in EsViT, the final norm is applied to the blocks of the last stage only (none with
  `final_norm=False`); blocks of earlier stages are given raw, at their own width and grid.

  D = width * 2^(stages - 1). `mask` must be None: EsViT has no masked-image objective and
  Swin no mask token (iBOT needs a ViT).
  """
  patch_size: int = 4
  width: int = 96  # Swin's embed_dim: the first stage's width
  depths: tuple[int, ...] = (2, 2, 6, 2)
  num_heads: tuple[int, ...] = (3, 6, 12, 24)
  window_size: int = 7
  image_size: int = 224  # the input size each stage's window and shift are fixed for (EsViT's and timm's
                         # input_resolution: its global crops); other sizes are padded to those windows
  mlp_ratio: float = 4.0
  drop_path_rate: float = 0.0
  norm_eps: float = 1e-6  # EsViT's LayerNorm epsilon (Swin and timm: 1e-5)
  dtype: jnp.dtype = jnp.float32  # compute dtype (bfloat16 for speed); parameters stay float32
  remat: str = "none"  # rematerialize each block in the backward pass: "none", "full" or "dots"
  attention: str = "xla"  # layers.attention: "xla" or "cudnn" (GPU, bf16)
  subset_groups: Optional[int] = None  # DINOv2's kept-subset stochastic depth (training) in that many groups
  batch_sharding: Optional[jax.sharding.NamedSharding] = None  # the train step's: where the kept subsets are drawn

  @nn.compact
  def __call__(self, images, mask=None, deterministic: bool = True, layers: int = 0, final_norm: bool = True):
    if mask is not None:
      raise ValueError("Swin takes no mask: it has no mask token (masked-image objectives such as iBOT need a ViT)")
    x = patch_embedding(self.width, self.patch_size, self.dtype)(images)
    x = nn.LayerNorm(epsilon=self.norm_eps, dtype=self.dtype, name="patch_norm")(x)
    total = sum(self.depths)
    # Stochastic depth rising linearly over all blocks from 0 to the rate (Swin's and EsViT's rule).
    rates = [self.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
    blocks = []
    build_grids = self._stage_grids(self.image_size)
    for s, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      first = sum(self.depths[:s])
      blocks += SwinStage(depth, heads, self.window_size, s > 0, tuple(rates[first:first + depth]), build_grids[s],
                          self.mlp_ratio, self.norm_eps, self.dtype, self.remat, self.attention, self.subset_groups,
                          self.batch_sharding,
                          name=f"stage{s}")(x, deterministic)
      x = blocks[-1]
    norm = nn.LayerNorm(epsilon=self.norm_eps, name="norm")
    outputs = lambda x: {"embedding": jnp.mean(x, axis=(1, 2)), "patch": x}
    out = outputs(norm(x).astype(jnp.float32))
    if not layers:
      return out
    last_stage = len(blocks) - self.depths[-1] if final_norm else len(blocks)
    return out | {"intermediate": [outputs((norm(x) if i >= last_stage else x).astype(jnp.float32))
                                   for i, x in enumerate(blocks) if i >= len(blocks) - layers]}

  # What the trainer and the tools ask of every backbone.

  @classmethod
  def from_config(cls, m: ml_collections.ConfigDict, subset_groups: Optional[int] = None,
                  batch_sharding: Optional[jax.sharding.NamedSharding] = None) -> "Swin":
    return cls(patch_size=m.patch_size, width=m.width, depths=tuple(m.depths), num_heads=tuple(m.num_heads),
               window_size=m.window_size, image_size=m.get("image_size", 224), mlp_ratio=m.mlp_ratio,
               drop_path_rate=m.drop_path_rate,
               norm_eps=m.norm_eps, dtype=layers.compute_dtype(m.dtype), remat=m.remat, attention=m.attention,
               subset_groups=subset_groups, batch_sharding=batch_sharding)

  @property
  def embed_dim(self) -> int:
    return self.width * 2 ** (len(self.depths) - 1)

  @property
  def num_layers(self) -> int:
    """Layer ids run from 0 (patch embedding) to the number of blocks + 1 (final norm)."""
    return sum(self.depths) + 1

  def layer_id(self, name: str) -> int:
    """Layer id of backbone parameter `name` (a path below the backbone), for layer-wise lr
    decay: 0 for the patch embedding and its norm; blocks numbered consecutively over all
    stages from 1 (block j of stage s: 1 + sum(depths[:s]) + j); a stage's patch merging
    with the block that follows it (its block 0); the final norm num_layers."""
    stage = re.match(r"stage(\d+)/(?:block(\d+)|merge)/", name)
    if stage:
      return 1 + sum(self.depths[:int(stage.group(1))]) + int(stage.group(2) or 0)
    if re.match(r"patch_(embed|norm)/", name):
      return 0
    return self.num_layers

  def _stage_grids(self, image_size: int) -> list[int]:
    grids = [image_size // self.patch_size]
    for _ in self.depths[1:]:
      grids.append(-(-grids[-1] // 2))
    return grids

  def grid(self, image_size: int) -> tuple[int, int]:
    """The last stage's grid of a square `image_size` input (a merge rounds odd grids up);
    raises ValueError where the size is not a multiple of the patch size."""
    if image_size % self.patch_size:
      raise ValueError(f"{image_size} is not a multiple of patch size {self.patch_size}")
    return (self._stage_grids(image_size)[-1],) * 2

  def forward_flops(self, image_size: int) -> float:
    """Forward FLOPs on one square image (a multiply-add = 2 FLOPs; norms, softmax and
    elementwise ops left out): patch embedding 2·P·(3p²)·C for P patches; per block of width C
    on an n x n grid with window w (`window_and_shift` of its grid at `image_size`), padded to
    m = ceil(n/w)·w: qkv
    6·m²·C² (computed on the padded map), attention scores and values 4·m²·w²·C (m²/w²
    windows of w² tokens), projection 2·n²·C², MLP 4·n²·C·(ratio·C); per patch merging
    16·n'²·C² onto its n' = ceil(n/2) grid."""
    grids, build_grids = self._stage_grids(image_size), self._stage_grids(self.image_size)
    c = self.width
    flops = 2 * grids[0] ** 2 * 3 * self.patch_size ** 2 * c
    for s, (n, depth) in enumerate(zip(grids, self.depths)):
      c = self.width * 2 ** s
      if s:
        flops += 16 * n * n * (c // 2) ** 2
      w = window_and_shift(build_grids[s], build_grids[s], self.window_size, False)[0]
      m = _padded(n, w)
      flops += depth * (6 * m * m * c * c + 4 * m * m * w * w * c + 2 * n * n * c * c
                        + 4 * n * n * c * int(c * self.mlp_ratio))
    return flops
