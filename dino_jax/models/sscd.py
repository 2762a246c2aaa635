"""SSCD copy-detection descriptors (Pizzi et al. 2022, "A Self-Supervised Descriptor for Image
Copy Detection"), the model DINOv2 deduplicates its data with (Oquab et al. 2023, App. A.3).

facebookresearch/sscd-copy-detection's torchvision models (sscd/models/model.py, `TV_RESNET50`):
a torchvision ResNet whose average pool is GeM pooling (sscd/models/gem_pooling.py, p = 3), its
`fc` kept as a linear projection to the descriptor (2048 -> 512, with bias), then L2
normalization (`F.normalize`, eps 1e-12). The trunk here is `models.resnet.ResNet` (its last
map); `convert.read_sscd` reads the released `.torchvision.pt` weight files into it.

Preprocessing (the repository's README, "Preprocessing"): ImageNet mean / std on images resized
to a 288 x 288 square (`IMAGE_SIZE`; the README also offers the shorter side resized to 288).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from dino_jax import augment
from dino_jax.models import layers
from dino_jax.models import resnet

IMAGE_SIZE = 288  # sscd/lib/inference.py's default square input
GEM_P = 3.0  # the torchvision models' pool_param (sscd/models/model.py)


def gem(x, p: float, eps: float = 1e-6):
  """Generalized-mean pooling of [B, h, w, C] over h·w: mean(max(x, eps) ** p) ** (1 / p)
  (Radenović et al. 2018; sscd/models/gem_pooling.py's GlobalGeMPool2d)."""
  return jnp.mean(jnp.maximum(x, eps) ** p, axis=(1, 2)) ** (1.0 / p)


class SSCD(nn.Module):
  """torchvision ResNet trunk ("trunk": `models.resnet.ResNet`, its running statistics in the
  "batch_stats" collection) -> GeM pooling -> "projection" (Dense with bias) -> L2 normalization.
  Called on normalized [B, H, W, 3] images; returns [B, dim] unit descriptors."""
  depth: int = 50
  width: int = 64
  dim: int = 512
  p: float = GEM_P

  @nn.compact
  def __call__(self, images):
    feature_map = resnet.ResNet(depth=self.depth, width=self.width, name="trunk")(images)["patch"]
    return layers.l2_normalize(nn.Dense(self.dim, name="projection")(gem(feature_map, self.p)))


def preprocess(images, size: int = IMAGE_SIZE):
  """uint8 (or [0, 255] float) [B, H, W, 3] images -> SSCD's input: resized to size x size
  (bilinear, antialiased; nothing to do at that size already), ImageNet-normalized."""
  x = images.astype(jnp.float32)
  if x.shape[1:3] != (size, size):
    x = jax.image.resize(x, (x.shape[0], size, size, 3), method="linear", antialias=True)
  return augment.normalize(x)
