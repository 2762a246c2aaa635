"""Vision Transformer backbone and DINO projection head (Flax linen).

The ViT follows Dosovitskiy et al. 2021 with the DINOv2 options (Oquab et al. 2023):
register tokens (Darcet et al. 2024), LayerScale (Touvron et al. 2021), SwiGLU FFN,
stochastic depth, a mask token for iBOT, and a learned position embedding stored at a
base grid and resized to the input's grid so that global and local crops share weights.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


class Mlp(nn.Module):
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
    x = nn.gelu(x, approximate=False)
    return nn.Dense(d, dtype=self.dtype, name="fc2")(x)


class SwiGLU(nn.Module):
  """SwiGLU FFN (Shazeer 2020): W3(silu(W1 x) * W2 x)."""
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x12 = nn.Dense(2 * self.hidden, dtype=self.dtype, name="w12")(x)
    x1, x2 = jnp.split(x12, 2, axis=-1)
    return nn.Dense(d, dtype=self.dtype, name="w3")(nn.silu(x1) * x2)


class LayerScale(nn.Module):
  init_value: float

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * gamma


class DropPath(nn.Module):
  """Stochastic depth: drops the residual branch per sample (Huang et al. 2016)."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * mask / keep


def subset_drop_path(x, branch, rate: float, rng, batch_sharding=None):
  """x + stochastic-depth branch(x) computing the branch only for the kept samples (DINOv2's
  form for rates above 0.1). Each batch shard (device) of `batch_sharding` (one shard when
  None) draws a random k = max(int(n (1 - rate)), 1) of its n samples; they go through
  `branch` and their outputs are added back scaled by n / k. The subsets stay on their devices."""
  groups = 1 if batch_sharding is None else batch_sharding.mesh.size
  local = lambda a: a if batch_sharding is None else jax.lax.with_sharding_constraint(a, batch_sharding)
  n = x.shape[0] // groups
  k = max(int(n * (1.0 - rate)), 1)
  order = jnp.argsort(jax.random.uniform(rng, (groups, n)), axis=1)[:, :k]
  pick = local(jax.nn.one_hot(order, n, dtype=x.dtype))  # [groups, k, n]: batched matmuls, no gathers
  grouped = local(x.reshape(groups, n, -1))
  exact = jax.lax.Precision.HIGHEST  # a selection: no bf16 rounding of the activations
  subset = jnp.einsum("gkn,gnf->gkf", pick, grouped, precision=exact).reshape(groups * k, *x.shape[1:])
  update = branch(subset).reshape(groups, k, -1).astype(x.dtype) * (n / k)
  return (grouped + jnp.einsum("gkn,gkf->gnf", pick, update, precision=exact)).reshape(x.shape)


class Block(nn.Module):
  """Pre-norm transformer block: x + ls(attn(ln(x))), x + ls(ffn(ln(x)))."""
  num_heads: int
  mlp_dim: int
  ffn: str = "mlp"
  layerscale: Optional[float] = None
  drop_path: float = 0.0
  dtype: jnp.dtype = jnp.float32
  attention: str = "xla"
  batch_sharding: Optional[jax.sharding.NamedSharding] = None  # the step's, for subset_drop_path

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    d = x.shape[-1]

    def attention(x):
      h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
      qkv = nn.DenseGeneral((3, self.num_heads, d // self.num_heads), dtype=self.dtype, name="qkv")(h)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      h = jax.nn.dot_product_attention(q, k, v, implementation=None if self.attention == "xla" else self.attention)
      if self.is_mutable_collection("intermediates"):  # attention maps for inspection
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
        self.sow("intermediates", "attention", jax.nn.softmax(logits, axis=-1))
      h = nn.DenseGeneral(d, axis=(-2, -1), dtype=self.dtype, name="proj")(h)
      return LayerScale(self.layerscale, name="ls1")(h) if self.layerscale is not None else h

    def feed_forward(x):
      h = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
      h = (SwiGLU if self.ffn == "swiglu" else Mlp)(self.mlp_dim, dtype=self.dtype, name="mlp")(h)
      return LayerScale(self.layerscale, name="ls2")(h) if self.layerscale is not None else h

    for branch in (attention, feed_forward):
      if not deterministic and self.drop_path > 0.1:
        x = subset_drop_path(x, branch, self.drop_path, self.make_rng("dropout"), self.batch_sharding)
      else:
        x = x + DropPath(self.drop_path)(branch(x), deterministic)
    return x


REMAT_POLICIES = {  # what a rematerialized block keeps from its forward pass
    "full": None,  # nothing: recompute the whole block (least memory)
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # matmuls with weights
}


class ViT(nn.Module):
  """ViT returning the normalized CLS token, patch tokens and register tokens.

  `mask` ([B, N] bool, True = masked) replaces those patch embeddings by the learned
  mask token before the position embedding is added, as in iBOT / DINOv2.
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
  pos_embed_grid: int = 14  # the grid the position embedding is stored at
  interpolate_offset: float = 0.1  # resize_pos_embed's conventions (DINO's and DINOv2's defaults)
  interpolate_antialias: bool = False
  dtype: jnp.dtype = jnp.float32  # compute dtype (bfloat16 for speed); parameters stay float32
  remat: str = "none"  # rematerialize each block in the backward pass: "none", "full" or "dots"
  attention: str = "xla"  # jax.nn.dot_product_attention implementation: "xla" or "cudnn" (GPU, bf16)
  batch_sharding: Optional[jax.sharding.NamedSharding] = None  # the train step's batch sharding

  @nn.compact
  def __call__(self, images, mask=None, deterministic: bool = True):
    b = images.shape[0]
    x = nn.Conv(self.width, (self.patch_size,) * 2, strides=self.patch_size, padding="VALID",
                dtype=self.dtype, name="patch_embed")(images)
    grid = x.shape[1:3]
    x = x.reshape(b, -1, self.width)
    if mask is not None:
      mask_token = self.param("mask_token", nn.initializers.zeros, (1, 1, self.width))
      x = jnp.where(mask[..., None], mask_token.astype(x.dtype), x)
    pos = self.param("pos_embed", nn.initializers.normal(0.02),
                     (1, self.pos_embed_grid, self.pos_embed_grid, self.width))
    pos = resize_pos_embed(pos, grid, self.interpolate_offset, self.interpolate_antialias)
    x = x + pos.reshape(1, -1, self.width).astype(x.dtype)
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.width))
    prefix = [jnp.broadcast_to(cls, (b, 1, self.width)).astype(x.dtype)]
    if self.num_registers:
      reg = self.param("register_tokens", nn.initializers.normal(1e-6),
                       (1, self.num_registers, self.width))
      prefix.append(jnp.broadcast_to(reg, (b, self.num_registers, self.width)).astype(x.dtype))
    x = jnp.concatenate(prefix + [x], axis=1)
    block = Block if self.remat == "none" else nn.remat(Block, static_argnums=(2,), policy=REMAT_POLICIES[self.remat])
    for i in range(self.depth):
      rate = self.drop_path_rate * (i / max(self.depth - 1, 1))  # the last block: exactly the config rate
      x = block(self.num_heads, self.mlp_dim, self.ffn, self.layerscale, rate, self.dtype, self.attention,
                self.batch_sharding, name=f"block{i}")(x, deterministic)
    x = nn.LayerNorm(epsilon=1e-6, name="norm")(x).astype(jnp.float32)
    n_prefix = 1 + self.num_registers
    return {"cls": x[:, 0], "registers": x[:, 1:n_prefix], "patch": x[:, n_prefix:]}


class DINOHead(nn.Module):
  """MLP -> bottleneck -> l2-normalize -> weight-normalized linear to K prototypes.

  The last layer is W = V / ||V|| column-wise (weight norm with the gain fixed to 1,
  DINO's `norm_last_layer=True`), so logits are cosine similarities to prototypes.
  """
  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.truncated_normal(0.02)
    for i in range(self.num_layers - 1):
      x = nn.gelu(nn.Dense(self.hidden_dim, kernel_init=init, name=f"mlp{i}")(x), approximate=False)
    x = nn.Dense(self.bottleneck_dim, kernel_init=init, name=f"mlp{self.num_layers - 1}")(x)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    v = self.param("last_layer", init, (self.bottleneck_dim, self.out_dim))
    w = v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-12)
    return x @ w


class DINOModel(nn.Module):
  """Backbone plus DINO head, and the iBOT head scoring selected patch tokens.

  `patch_index` ([B, m] int) picks m patch tokens of each image (its masked ones, padded
  to a static m), keeping the batch axis so the gather stays sharded with the batch; their
  logits come from `ibot_head`, or from the DINO head when `ibot_head` is None (DINOv2's
  shared-head option).
  """
  backbone: ViT
  head: DINOHead
  ibot_head: Optional[DINOHead] = None

  def __call__(self, images, mask=None, patch_index=None, deterministic: bool = True):
    feats = self.backbone(images, mask=mask, deterministic=deterministic)
    out = {"cls": feats["cls"], "cls_logits": self.head(feats["cls"])}
    if patch_index is not None:
      tokens = jnp.take_along_axis(feats["patch"], patch_index[..., None], axis=1)
      out["patch_logits"] = (self.ibot_head or self.head)(tokens)
    return out
