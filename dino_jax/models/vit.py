"""Vision Transformer backbone (Flax linen), registered as `model.name="vit"`.

The ViT follows Dosovitskiy et al. 2021 with the DINOv2 options (Oquab et al. 2023):
register tokens (Darcet et al. 2024), LayerScale (Touvron et al. 2021), SwiGLU FFN,
stochastic depth, a mask token for iBOT, and a learned position embedding stored at a
base grid and resized to the input's grid so that global and local crops share weights.

Parameters start as the official code starts them: linear layers trunc_normal(0.02) with zero
biases, the position embedding (patches and the CLS slot) trunc_normal(0.02), the CLS token
trunc_normal(0.02) (DINO) or normal(1e-6) (DINOv2; `cls_token_std`), registers normal(1e-6), the
mask token zeros, LayerScale 1e-5, and the patch embedding at PyTorch's Conv2d default.
"""
import functools
import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dino_jax.models import layers
from dino_jax.models import packing
from dino_jax.models.layers import (LayerScale, Mlp, REMAT_POLICIES, SwiGLU, patch_embedding, residual,
                                    trunc_normal)

VIT_SIZES = {  # name: (width, depth, heads, mlp_dim)
    "tiny": (192, 12, 3, 768),
    "small": (384, 12, 6, 1536),
    "base": (768, 12, 12, 3072),
    "large": (1024, 24, 16, 4096),
    "giant": (1536, 40, 24, 4096),  # DINOv2 ViT-g/14 uses SwiGLU with this hidden size
}


def _cubic_kernel(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter `a`."""
  x = np.abs(x)
  return np.where(x <= 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                  np.where(x < 2, a * (((x - 5) * x + 8) * x - 4), 0.0))


def bicubic_weights(in_size: int, out_size: int, scale: float, antialias: bool) -> np.ndarray:
  """[out_size, in_size] weights of PyTorch's `F.interpolate(mode="bicubic", align_corners=False,
  scale_factor=scale)` along one axis: output pixel i samples input coordinate (i + 0.5) / scale - 0.5.

  Without antialiasing: the a = -0.75 kernel at the 4 nearest inputs, edge inputs repeated.
  With it (PIL's filter): the a = -0.5 kernel stretched by the downscale factor, weights renormalized.
  """
  out = np.arange(out_size, dtype=np.float64)
  if antialias:
    stretch = max(1.0 / scale, 1.0)
    center, support, src = (out + 0.5) / scale, 2.0 * stretch, np.arange(in_size)
    lo = np.maximum((center - support + 0.5).astype(int), 0)[:, None]
    hi = np.minimum((center + support + 0.5).astype(int), in_size)[:, None]
    w = _cubic_kernel((src[None] + 0.5 - center[:, None]) / stretch, -0.5) * ((src >= lo) & (src < hi))
    return w / w.sum(axis=1, keepdims=True)
  real = (out + 0.5) / scale - 0.5
  base = np.floor(real)
  frac = real - base
  w = np.zeros((out_size, in_size))
  for k in range(-1, 3):
    np.add.at(w, (np.arange(out_size), np.clip(base + k, 0, in_size - 1).astype(int)),
              _cubic_kernel(frac - k, -0.75))
  return w


def resize_pos_embed(pos_embed: jax.Array, grid: tuple[int, int], offset: float = 0.0,
                     antialias: bool = False) -> jax.Array:
  """Bicubic resize of a [1, h, w, D] position embedding to `grid`, as DINO/DINOv2 do in
  PyTorch: scale factor (grid + offset) / h per axis (DINO and DINOv2 use offset 0.1, DINOv2
  with registers antialias=True and offset 0)."""
  h, w = pos_embed.shape[1:3]
  if (h, w) == tuple(grid):
    return pos_embed
  rows = bicubic_weights(h, grid[0], (grid[0] + offset) / h, antialias)
  cols = bicubic_weights(w, grid[1], (grid[1] + offset) / w, antialias)
  return jnp.einsum("yh,xw,bhwd->byxd", rows.astype(np.float32), cols.astype(np.float32), pos_embed,
                    precision=jax.lax.Precision.HIGHEST)


class Block(nn.Module):
  """Pre-norm transformer block: x + ls(attn(ln(x))), x + ls(ffn(ln(x)))."""
  num_heads: int
  mlp_dim: int
  ffn: str = "mlp"
  layerscale: Optional[float] = None
  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention: str = "xla"
  subset_groups: Optional[int] = None  # DINOv2's kept-subset stochastic depth in that many groups, else per sample
  packed_layout: Optional[packing.PackedLayout] = None  # x holds crops packed in rows (`segments`: their ids)
  batch_sharding: Optional[jax.sharding.NamedSharding] = None  # the train step's: x stays split by sample

  @nn.compact
  def __call__(self, x, deterministic: bool = True, segments=None):
    d = x.shape[-1]
    if self.batch_sharding is not None and segments is None and not self.is_initializing():
      # Else XLA may follow FSDP's weight layout through a scan (ViT-L: 61 GiB, not 25, per device).
      x = jax.lax.with_sharding_constraint(x, self.batch_sharding)

    def attention(x, packed=None):  # packed: (layout, segment ids) of crops packed in x's rows
      h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
      qkv = nn.DenseGeneral((3, self.num_heads, d // self.num_heads), dtype=self.dtype,
                            kernel_init=layers.LINEAR_INIT, name="qkv")(h)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      if self.is_mutable_collection("keys"):  # the "key" facet (SD-DINO's correspondence features)
        self.sow("keys", "key", k)
      attend = functools.partial(layers.attention, implementation=self.attention)
      if packed is None:
        h = attend(q, k, v)
      elif self.attention in packing.MASKED:  # the packed rows, masked to each crop
        h = attend(q, k, v, bias=packing.attention_bias(packed[1], jnp.float32 if self.attention == "xla" else q.dtype))
      else:  # each crop over its own tokens
        h = packing.attention_per_crop(q, k, v, packed[0], attend)
      if self.is_mutable_collection("intermediates"):  # attention maps for inspection
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
        self.sow("intermediates", "attention", jax.nn.softmax(logits, axis=-1))
      h = nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, kernel_init=layers.LINEAR_INIT, name="proj")(h)
      return LayerScale(self.layerscale, name="ls1")(h) if self.layerscale is not None else h

    def feed_forward(x, packed=None):
      del packed  # token by token
      h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
      h = (SwiGLU if self.ffn == "swiglu" else Mlp)(self.mlp_dim, dtype=self.dtype, name="mlp")(h)
      return LayerScale(self.layerscale, name="ls2")(h) if self.layerscale is not None else h

    packed = None if segments is None else (self.packed_layout, segments)
    for branch in (attention, feed_forward):
      x = residual(x, branch, self.drop_path, deterministic, self.make_rng, self.subset_groups, packed,
                   self.batch_sharding)
    return x


class ViT(nn.Module):
  """ViT with the backbone outputs every registered backbone gives:

  "embedding" [B, D] (the normalized CLS token), "patch" [B, h, w, D] (patch tokens on their
  grid), here also "registers" [B, R, D], and with `layers=n` "intermediate": the last n
  blocks' outputs through the final norm, each {"embedding", "patch"} (DINO's and DINOv2's
  `get_intermediate_layers`, for the linear-probe protocols); with `final_norm=False` before
  it (`get_intermediate_layers(norm=False)`: DINOv2's depth heads, SD-DINO's features).

  `mask` ([B, h*w] bool, True = masked) replaces those patch embeddings by the learned
  mask token before the position embedding is added, as in iBOT / DINOv2. With "keys" mutable,
  each block sows its attention keys [B, N, heads, d] ("key" facet). The CLS token's
  position embedding (slot 0 of the official `pos_embed`) is its own parameter,
  `cls_pos_embed`, as there: both it and the CLS token are trained and decayed.

  `images` may be a tuple of crop batches of different sizes (`mask` then a tuple too, None
  for a size without): their tokens go through the blocks together, packed in rows, each crop
  attending to its own tokens, as DINOv2's `NestedTensorBlock` runs its crops (`models.packing`;
  `pack_chunks` consecutive parts of the batch, one per device, packed apart), and the call
  returns one output dict per size, each what the unpacked call gives.
  """
  patch_size: int = 16
  width: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_dim: int = 1536
  ffn: str = "mlp"
  num_registers: int = 0
  layerscale: Optional[float] = None
  drop_path_rate: float = 0.0
  drop_path_uniform: bool = False  # every block at drop_path_rate (DINOv2) or rising linearly to it (DINO)
  cls_token_std: float = 1e-6  # the CLS token's init: DINO trunc_normal(0.02), DINOv2 normal(1e-6)
  patch_stride: int = 0  # 0: patch_size; smaller: overlapping patches (SD-DINO's stride 4 for patch 8)
  pos_embed_grid: int = 14  # the grid the position embedding is stored at
  interpolate_offset: float = 0.1  # resize_pos_embed's conventions (DINO's and DINOv2's defaults)
  interpolate_antialias: bool = False
  dtype: jnp.dtype = jnp.float32  # compute dtype (bfloat16 for speed); parameters stay float32
  remat: str = "none"  # rematerialize each block in the backward pass: "none", "full" or "dots"
  scan: bool = False  # the train step runs the blocks as one jax.lax.scan (`scan_blocks`)
  attention: str = "xla"  # layers.attention: "xla" or "cudnn" (GPU, bf16)
  subset_groups: Optional[int] = None  # DINOv2's kept-subset stochastic depth (training) in that many groups
  batch_sharding: Optional[jax.sharding.NamedSharding] = None  # the train step's: each block's input split by sample

  @nn.compact
  def __call__(self, images, mask=None, deterministic: bool = True, layers: int = 0, final_norm: bool = True,
               pack_chunks: int = 1):
    packed = isinstance(images, (tuple, list))  # crops of several sizes in one pass (`models.packing`)
    crops = tuple(images) if packed else (images,)
    masks = tuple(mask) if packed and mask is not None else (mask,) + (None,) * (len(crops) - 1)
    embed = patch_embedding(self.width, self.patch_size, self.dtype, stride=self.patch_stride)
    patches = [embed(crops[0])]  # the parameters are created in the order of the unpacked call
    mask_token = None
    if any(m is not None for m in masks):
      mask_token = self.param("mask_token", nn.initializers.zeros, (1, 1, self.width))
    pos_embed = self.param("pos_embed", trunc_normal(0.02), (1, self.pos_embed_grid, self.pos_embed_grid, self.width))
    cls = self.param("cls_token", trunc_normal(self.cls_token_std), (1, 1, self.width))
    cls = cls + self.param("cls_pos_embed", trunc_normal(0.02), (1, 1, self.width))
    reg = None
    if self.num_registers:
      reg = self.param("register_tokens", nn.initializers.normal(1e-6), (1, self.num_registers, self.width))
    patches += [embed(c) for c in crops[1:]]

    def tokens(x, mask):  # [b, h, w, D] patch embeddings -> [b, N, D] tokens with CLS, registers, positions
      b, grid = x.shape[0], x.shape[1:3]
      x = x.reshape(b, -1, self.width)
      if mask is not None:
        x = jnp.where(mask[..., None], mask_token.astype(x.dtype), x)
      pos = resize_pos_embed(pos_embed, grid, self.interpolate_offset, self.interpolate_antialias)
      x = x + pos.reshape(1, -1, self.width).astype(x.dtype)
      prefix = [jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype)]
      if reg is not None:
        prefix.append(jnp.broadcast_to(reg, (b, self.num_registers, self.width)).astype(x.dtype))
      return jnp.concatenate(prefix + [x], axis=1)

    xs = [tokens(x, m) for x, m in zip(patches, masks)]
    grids = [x.shape[1:3] for x in patches]
    norm = nn.LayerNorm(epsilon=1e-6, name="norm")
    n_prefix = 1 + self.num_registers
    outputs = lambda x, grid: {"embedding": x[:, 0], "registers": x[:, 1:n_prefix],
                               "patch": x[:, n_prefix:].reshape(x.shape[0], *grid, self.width)}
    inspected = self.is_mutable_collection("intermediates") or self.is_mutable_collection("keys")
    layout = segments = None
    if packed:
      if layers or inspected:
        raise ValueError("a packed pass gives the final outputs only (no intermediate layers, keys or attention)")
      layout = packing.PackedLayout(tuple(x.shape[:2] for x in xs), pack_chunks)
      x, segments = layout.pack(xs), jnp.asarray(layout.segment_ids())
    else:
      x = xs[0]
    intermediate = []
    block_args = lambda i: (self.num_heads, self.mlp_dim, self.ffn, self.layerscale, self.block_rate(i), self.dtype,
                            self.attention, self.subset_groups, layout, self.batch_sharding)
    if self.scan and not (self.is_initializing() or layers or inspected):
      x = self.scan_blocks(Block(*block_args(0), parent=None), x, deterministic, segments)
    else:
      block = Block if self.remat == "none" else nn.remat(Block, static_argnums=(2,),
                                                          policy=REMAT_POLICIES[self.remat])
      for i in range(self.depth):
        x = block(*block_args(i), name=f"block{i}")(x, deterministic, segments)
        if i >= self.depth - layers:
          intermediate.append(outputs((norm(x) if final_norm else x).astype(jnp.float32), grids[0]))
    x = norm(x).astype(jnp.float32)
    if packed:
      return tuple(outputs(x, grid) for x, grid in zip(layout.unpack(x), grids))
    return outputs(x, grids[0]) | ({"intermediate": intermediate} if layers else {})

  def block_rate(self, i: int) -> float:
    """Block i's stochastic-depth rate: DINO's torch.linspace(0, rate, depth), or every block
    at the rate (DINOv2's drop_path_uniform)."""
    return self.drop_path_rate * (1.0 if self.drop_path_uniform else i / max(self.depth - 1, 1))

  def scan_blocks(self, block: Block, x, deterministic: bool, segments=None):
    """The blocks as one `jax.lax.scan` over their parameters stacked on a new leading axis, so
    XLA compiles one block, not `depth` (big_vision's scan; ViT-L/g compile 2-4x faster).
    The parameters keep their stored layout (block0 .. block{depth-1}): checkpoints, the
    optimizer's per-layer rules and the tools see no difference, and the function is the
    loop's. Stochastic depth draws one key per block from the dropout stream, at one rate for
    all blocks (`config_checks` refuses a rising one)."""
    if not deterministic and self.drop_path_rate and not self.drop_path_uniform:
      raise ValueError("scan needs one stochastic-depth rate for every block (drop_path_uniform) in training")
    params = self.variables["params"]
    stacked = jax.tree.map(lambda *p: jnp.stack(p), *[params[f"block{i}"] for i in range(self.depth)])

    def body(x, inputs):
      p, key = inputs
      return block.apply({"params": p}, x, deterministic, segments,
                         rngs=None if key is None else {"dropout": key}), None

    if self.remat != "none":
      body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
    keys = None if deterministic else jax.random.split(self.make_rng("dropout"), self.depth)
    # The loop's residual stream takes a block's output dtype (float32 where the float32
    # LayerScale promotes a bfloat16 branch); the scan's carry starts in it.
    first = jax.tree.map(lambda a: a[0], (stacked, keys))
    x = x.astype(jax.eval_shape(lambda x: body(x, first)[0], x).dtype)
    return jax.lax.scan(body, x, (stacked, keys))[0]

  # What the trainer and the tools ask of every backbone.

  @classmethod
  def from_config(cls, m: ml_collections.ConfigDict, subset_groups: Optional[int] = None,
                  batch_sharding: Optional[jax.sharding.NamedSharding] = None) -> "ViT":
    return cls(patch_size=m.patch_size, width=m.width, depth=m.depth, num_heads=m.num_heads,
               mlp_dim=m.mlp_dim, ffn=m.ffn, num_registers=m.num_registers, layerscale=m.layerscale,
               drop_path_rate=m.drop_path_rate, drop_path_uniform=m.get("drop_path_uniform", False),
               cls_token_std=m.get("cls_token_std", 1e-6), pos_embed_grid=m.pos_embed_grid,
               interpolate_offset=m.interpolate_offset, interpolate_antialias=m.interpolate_antialias,
               dtype=layers.compute_dtype(m.dtype), remat=m.remat, scan=m.get("scan", False), attention=m.attention,
               subset_groups=subset_groups, batch_sharding=batch_sharding)

  @property
  def embed_dim(self) -> int:
    return self.width

  @property
  def num_layers(self) -> int:
    """Layer ids run from 0 (embeddings) to depth + 1 (after the last block)."""
    return self.depth + 1

  def layer_id(self, name: str) -> int:
    """DINOv2's layer id of backbone parameter `name` (a path below the backbone): 0 for the
    embeddings (patch, position, cls and its position, registers, mask token), i + 1 for
    block i, depth + 1 for the final norm."""
    block = re.match(r"block(\d+)/", name)
    if block:
      return int(block.group(1)) + 1
    if re.match(r"(patch_embed|pos_embed|cls_pos_embed|cls_token|register_tokens|mask_token)", name):
      return 0
    return self.depth + 1

  def grid(self, image_size: int) -> tuple[int, int]:
    """The patch grid of a square `image_size` input; raises ValueError where it does not fit."""
    if image_size % self.patch_size:
      raise ValueError(f"{image_size} is not a multiple of patch size {self.patch_size}")
    return (image_size // self.patch_size,) * 2

  def forward_flops(self, image_size: int) -> float:
    """Forward FLOPs on one square image (a multiply-add = 2 FLOPs; norms, softmax and
    elementwise ops left out): patch embedding 2·P·(3p²)·D, and per block, with
    N = P + 1 + registers tokens, qkv + projection 8·N·D², attention scores and values
    4·N²·D, FFN 4·N·D·M (MLP) or 6·N·D·M (SwiGLU)."""
    patches = (image_size // self.patch_size) ** 2
    n, d = patches + 1 + self.num_registers, self.width
    ffn = (6 if self.ffn == "swiglu" else 4) * n * d * self.mlp_dim
    return 2 * patches * 3 * self.patch_size ** 2 * d + self.depth * (8 * n * d * d + 4 * n * n * d + ffn)


