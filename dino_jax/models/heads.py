"""DINO projection head and the model that puts a backbone and its heads together."""
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from dino_jax.models import layers


class DINOHead(nn.Module):
  """MLP -> bottleneck -> l2-normalize -> weight-normalized linear to K prototypes.

  The last layer is weight-normalized, W = g * V / ||V|| column-wise (Salimans & Kingma
  2016). With `norm_last_layer` (DINO's default) the gain g is fixed to 1, so logits are cosine
  similarities to prototypes; without it g is a trainable [1, K] parameter starting at 1
  (DINO's `norm_last_layer=False`, recommended for ViT-S/16, and DINOv2's head), decayed and
  frozen with the last layer as torch's `last_layer.weight_g`.

  Initialization as DINO's and DINOv2's: the MLP's linears trunc_normal(0.02) with zero biases;
  V at PyTorch's nn.Linear default, U(+-1/sqrt(bottleneck)) (the official head creates the
  last layer after initializing the MLP, so it keeps that default).
  """
  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3
  norm_last_layer: bool = True

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers - 1):
      x = layers.gelu(nn.Dense(self.hidden_dim, kernel_init=layers.LINEAR_INIT, name=f"mlp{i}")(x))
    x = nn.Dense(self.bottleneck_dim, kernel_init=layers.LINEAR_INIT, name=f"mlp{self.num_layers - 1}")(x)
    x = layers.l2_normalize(x)
    v = self.param("last_layer", layers.torch_default_kernel(), (self.bottleneck_dim, self.out_dim))
    scale = 1.0 / jnp.maximum(jnp.sqrt(layers.column_sums(v * v)), 1e-12)[None]
    if not self.norm_last_layer:
      scale = scale * self.param("last_layer_gain", nn.initializers.ones, (1, self.out_dim))
    # x @ (V * s) = (x @ V) * s: the column scale goes where it is cheaper, on the [n, K] output
    # for a few rows (CLS tokens), on the [bottleneck, K] weight for many (iBOT's patch tokens).
    # On XLA's CPU backend this took a ViT-S/14 step from 30 to 26 s: the scaled weight fused
    # into a 16-row matmul had made the teacher's DINO head alone take 9 s.
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] <= self.bottleneck_dim:
      logits = layers.scale_columns(layers.matmul(flat, v), scale)
    else:
      logits = layers.matmul(flat, layers.scale_columns(v, scale))
    return logits.reshape(x.shape[:-1] + (self.out_dim,))


def max_logits(params: dict) -> dict:
  """For each logits output of a `DINOModel` with `params`, the largest value it can take: a
  `DINOHead`'s logits are cosine similarities times the gain, so the largest |gain| (1 with
  `norm_last_layer`)."""
  def bound(head):
    gain = head.get("last_layer_gain")
    return jnp.ones([], jnp.float32) if gain is None else jnp.max(jnp.abs(gain)).astype(jnp.float32)
  heads = {"logits": "head", "patch_logits": "ibot_head" if "ibot_head" in params else "head",
           "region_logits": "region_head"}
  return {key: bound(params[name]) for key, name in heads.items() if name in params}


class DINOModel(nn.Module):
  """A backbone (any of `models.BACKBONES`) with the heads its objectives need.

  Outputs: "embedding" (the backbone's global embedding) and its DINO-head "logits";
  with `patch_index` ([G, m] int: m patch positions in each of G groups of B / G consecutive
  images, e.g. one group per device with its masked patches padded to a static m
  (`masking.masked_token_index`), or every patch of each image with G = B; the group axis is
  split like the batch, so the gather stays on the device) their "patch_logits" from
  `ibot_head`, or from the DINO head when `ibot_head` is None (DINOv2's shared-head option);
  with `region_head` (EsViT) the backbone's region tokens as "regions" [B, R, D] and their
  "region_logits" [B, R, K].
  """
  backbone: nn.Module
  head: DINOHead
  ibot_head: Optional[DINOHead] = None
  region_head: Optional[DINOHead] = None

  def __call__(self, images, mask=None, patch_index=None, deterministic: bool = True, pack_chunks: int = 1):
    """With `images` a tuple of crop batches (a ViT's packed pass, `models.packing`): a tuple of
    outputs, one per size, the DINO head run once on all their embeddings as DINOv2 runs it;
    `mask` and `patch_index` belong to the first size (the global crops)."""
    if not isinstance(images, (tuple, list)):
      feats = self.backbone(images, mask=mask, deterministic=deterministic)
      return self.outputs(feats, self.head(feats["embedding"]), patch_index)
    feats = self.backbone(tuple(images), mask=mask, deterministic=deterministic, pack_chunks=pack_chunks)
    logits = self.head(jnp.concatenate([f["embedding"] for f in feats]))
    ends = np.cumsum([f["embedding"].shape[0] for f in feats])[:-1]
    return tuple(self.outputs(f, lg, patch_index if i == 0 else None)
                 for i, (f, lg) in enumerate(zip(feats, jnp.split(logits, ends))))

  def outputs(self, feats, logits, patch_index=None):
    out = {"embedding": feats["embedding"], "logits": logits}
    patches = feats["patch"].reshape(feats["patch"].shape[0], -1, feats["patch"].shape[-1])
    if patch_index is not None:  # positions in each group's (image's, or device's images') patches
      grouped = patches.reshape(patch_index.shape[0], -1, patches.shape[-1])
      tokens = jnp.take_along_axis(grouped, patch_index[..., None], axis=1)
      out["patch_logits"] = (self.ibot_head or self.head)(tokens)
    if self.region_head is not None:
      out["regions"] = patches
      out["region_logits"] = self.region_head(patches)
    return out
