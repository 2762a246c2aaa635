"""ResNet backbones (Flax linen), registered as `model.name="resnet"`: DINO's ResNet-50 and SSCD's trunk.

He et al. 2016 (Table 1): a 7x7 stride-2 convolution and a 3x3 stride-2 max pool, then four
stages of residual blocks (basic blocks of two 3x3 convolutions for depths 18 and 34,
bottlenecks 1x1 -> 3x3 -> 1x1 with 4x expansion for 50, 101 and 152), the first block of
stages 2-4 striding by 2 (on the 3x3 convolution, torchvision's "ResNet v1.5") with a 1x1
projection shortcut. Built as torchvision's `resnet*` so that its weights map one to one
(`dino_jax.convert`): convolutions without bias, at torchvision's init (kaiming normal, fan
out); batch norm as PyTorch's (`BatchNorm`).

Batch norm: where the "batch_stats" collection is mutable (training: `model.apply(...,
mutable=["batch_stats"])`), each BatchNorm normalizes by the statistics of the whole batch
it is given, and the jitted step's batch is the global batch on the mesh, so this is
SyncBatchNorm (main_dino.py converts student and teacher to it); otherwise (extraction,
evaluations) by its running statistics. A backbone's weights outside training are its
parameters with these statistics under "batch_stats" (`models.backbone_variables`), as a
torch state dict holds its buffers.
"""
import re
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dino_jax.models import layers

RESNET_BLOCKS = {  # depth: (bottleneck, blocks per stage), He et al. 2016, Table 1
    18: (False, (2, 2, 2, 2)),
    34: (False, (3, 4, 6, 3)),
    50: (True, (3, 4, 6, 3)),
    101: (True, (3, 4, 23, 3)),
    152: (True, (3, 8, 36, 3)),
}


def conv_init():
  """torchvision's ResNet init of its convolutions: kaiming_normal_(mode="fan_out", relu), a plain
  normal of std sqrt(2 / (out_channels · kh · kw))."""
  return nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm(nn.Module):
  """PyTorch's BatchNorm2d on [..., C]: y = (x - mean) / sqrt(var + eps) · scale + bias with the
  batch's mean and biased variance when training (the "batch_stats" collection mutable), each
  running statistic then moved by `momentum` towards the batch's (the variance unbiased, n/(n-1),
  as PyTorch does); the running statistics otherwise. Statistics in float32."""
  momentum: float = 0.1
  epsilon: float = 1e-5
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    running_mean = self.variable("batch_stats", "mean", jnp.zeros, (c,), jnp.float32)
    running_var = self.variable("batch_stats", "var", jnp.ones, (c,), jnp.float32)
    x32 = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    if self.is_mutable_collection("batch_stats"):
      mean = jnp.mean(x32, axes)
      var = jnp.mean(jnp.square(x32 - mean), axes)
      if not self.is_initializing():
        n = x.size // c
        running_mean.value = (1 - self.momentum) * running_mean.value + self.momentum * mean
        running_var.value = (1 - self.momentum) * running_var.value + self.momentum * var * n / max(n - 1, 1)
    else:
      mean, var = running_mean.value, running_var.value
    y = (x32 - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


def _conv(features: int, kernel: int, stride: int, dtype, name: str) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(features, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=conv_init(), dtype=dtype, name=name)


class ResidualBlock(nn.Module):
  """torchvision's BasicBlock (two 3x3 convolutions) or Bottleneck (1x1 -> 3x3 -> 1x1, 4x wider
  out, the stride on the 3x3), with a 1x1 convolution + batch norm shortcut ("downsample")
  where the stride or the width changes."""
  width: int  # the block's inner width (its output: width, or 4 · width for a bottleneck)
  stride: int
  bottleneck: bool
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    out_width = self.width * (4 if self.bottleneck else 1)
    norm = lambda name: BatchNorm(dtype=self.dtype, name=name)
    if self.bottleneck:
      convs = [(self.width, 1, 1), (self.width, 3, self.stride), (out_width, 1, 1)]
    else:
      convs = [(self.width, 3, self.stride), (out_width, 3, 1)]
    y = x
    for i, (features, kernel, stride) in enumerate(convs, 1):
      y = norm(f"bn{i}")(_conv(features, kernel, stride, self.dtype, f"conv{i}")(y))
      if i < len(convs):
        y = nn.relu(y)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != out_width:
      shortcut = norm("downsample_bn")(_conv(out_width, 1, self.stride, self.dtype, "downsample_conv")(x))
    return nn.relu(y + shortcut)


class ResNet(nn.Module):
  """A ResNet with the outputs every registered backbone gives; there is no CLS token:

  "embedding" [B, D]: the last stage globally average-pooled (torchvision's avgpool, the
  feature DINO trains and evaluates with `fc` replaced by the identity); "patch" [B, h, w, D]:
  the last stage's map (stride 32); with `layers=n` "intermediate": the last n residual blocks,
  each {"embedding": its pooled map, "patch": its map} (earlier stages at their own width and
  grid). D = 512 (depths 18, 34) or 2048 (50, 101, 152) at `width` 64.

  `mask` must be None (no mask token: iBOT needs a ViT). `deterministic` changes nothing (no
  dropout, no stochastic depth); batch norm follows the "batch_stats" collection (module doc).
  """
  depth: int = 50
  width: int = 64  # the stem's and the first stage's width (torchvision: 64); stages double it
  dtype: jnp.dtype = jnp.float32  # compute dtype; parameters and batch-norm statistics stay float32

  @nn.compact
  def __call__(self, images, mask=None, deterministic: bool = True, layers: int = 0, final_norm: bool = True):
    del deterministic, final_norm
    if mask is not None:
      raise ValueError("ResNet takes no mask: it has no mask token (masked-image objectives such as iBOT need a ViT)")
    bottleneck, blocks_per_stage = RESNET_BLOCKS[self.depth]
    x = _conv(self.width, 7, 2, self.dtype, "conv1")(images.astype(self.dtype))
    x = nn.relu(BatchNorm(dtype=self.dtype, name="bn1")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    blocks = []
    for s, count in enumerate(blocks_per_stage):
      for i in range(count):
        x = ResidualBlock(self.width * 2 ** s, 2 if (s and not i) else 1, bottleneck, self.dtype,
                          name=f"layer{s + 1}_{i}")(x)
        blocks.append(x)
    outputs = lambda x: {"embedding": jnp.mean(x.astype(jnp.float32), axis=(1, 2)), "patch": x.astype(jnp.float32)}
    out = outputs(x)
    if layers:
      out["intermediate"] = [outputs(b) for b in blocks[-layers:]]
    return out

  # What the trainer and the tools ask of every backbone.

  @classmethod
  def from_config(cls, m: ml_collections.ConfigDict, subset_groups: Optional[int] = None,
                  batch_sharding=None) -> "ResNet":
    del subset_groups, batch_sharding  # no stochastic depth
    if m.depth not in RESNET_BLOCKS:
      raise ValueError(f"model.depth of a ResNet must be one of {sorted(RESNET_BLOCKS)}, not {m.depth}")
    return cls(depth=m.depth, width=m.get("width", 64), dtype=layers.compute_dtype(m.dtype))

  @property
  def embed_dim(self) -> int:
    return self.width * 8 * (4 if RESNET_BLOCKS[self.depth][0] else 1)

  @property
  def num_layers(self) -> int:
    """Layer ids run from 0 (the stem) to the number of residual blocks + 1."""
    return sum(RESNET_BLOCKS[self.depth][1]) + 1

  def layer_id(self, name: str) -> int:
    """Layer id of backbone parameter `name`, for layer-wise lr decay: 0 for the stem (conv1,
    bn1), block j of stage s numbered 1 + (blocks before stage s) + j."""
    block = re.match(r"layer(\d+)_(\d+)/", name)
    if block:
      return 1 + sum(RESNET_BLOCKS[self.depth][1][:int(block.group(1)) - 1]) + int(block.group(2))
    if re.match(r"(conv1|bn1)/", name):
      return 0
    return self.num_layers

  def _grids(self, image_size: int) -> list[int]:
    """The map's side after the stem's convolution, its pool and each stage (each halving rounds up)."""
    grids = [-(-image_size // 2)]
    for _ in range(4):
      grids.append(-(-grids[-1] // 2))
    return grids

  def grid(self, image_size: int) -> tuple[int, int]:
    """The last stage's grid of a square `image_size` input: ceil(size / 32)."""
    return (self._grids(image_size)[-1],) * 2

  def forward_flops(self, image_size: int) -> float:
    """Forward FLOPs on one square image (a multiply-add = 2 FLOPs; batch norm, ReLU, pooling
    and the residual sums left out): 2 · n² · C_in · C_out · k² per k x k convolution with an
    n x n output."""
    bottleneck, blocks_per_stage = RESNET_BLOCKS[self.depth]
    grids = self._grids(image_size)
    flops = 2 * grids[0] ** 2 * 3 * self.width * 49
    c_in = self.width
    for s, count in enumerate(blocks_per_stage):
      width, n = self.width * 2 ** s, grids[s + 1]
      out = width * (4 if bottleneck else 1)
      for i in range(count):
        n_in = grids[s] if (s and not i) else n  # the first block's 1x1 runs before the stride
        if bottleneck:
          flops += 2 * (n_in ** 2 * c_in * width + n ** 2 * width * width * 9 + n ** 2 * width * out)
        else:
          flops += 2 * (n ** 2 * c_in * width * 9 + n ** 2 * width * out * 9)
        if s and not i or c_in != out:
          flops += 2 * n ** 2 * c_in * out
        c_in = out
    return flops
