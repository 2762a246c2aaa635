"""The forward pass of the official PyTorch backbones, written for the converter tests.

`OfficialViT` has the key layout of facebookresearch/dinov2's DinoVisionTransformer (and of
DINO's VisionTransformer when it has no LayerScale, registers or mask token) and its position
embedding resize: F.interpolate(bicubic, scale_factor=(grid + offset) / stored grid). The test
suite checks it against timm's implementation of the same models, so the converter is measured
against two independent PyTorch forwards.
"""
import torch
from torch import nn
import torch.nn.functional as F


class LayerScale(nn.Module):

  def __init__(self, dim):
    super().__init__()
    self.gamma = nn.Parameter(torch.full((dim,), 1e-5))

  def forward(self, x):
    return x * self.gamma


class Attention(nn.Module):

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

  def forward(self, x):
    return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):

  def __init__(self, dim, hidden):
    super().__init__()
    self.w12, self.w3 = nn.Linear(dim, 2 * hidden), nn.Linear(hidden, dim)

  def forward(self, x):
    x1, x2 = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(x1) * x2)


class Block(nn.Module):

  def __init__(self, arch):
    super().__init__()
    d = arch.width
    self.norm1, self.norm2 = nn.LayerNorm(d, eps=1e-6), nn.LayerNorm(d, eps=1e-6)
    self.attn = Attention(d, arch.num_heads)
    self.mlp = (SwiGLU if arch.ffn == "swiglu" else Mlp)(d, arch.mlp_dim)
    scale = LayerScale if arch.layerscale is not None else lambda d: nn.Identity()
    self.ls1, self.ls2 = scale(d), scale(d)

  def forward(self, x):
    x = x + self.ls1(self.attn(self.norm1(x)))
    return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):

  def __init__(self, arch):
    super().__init__()
    self.proj = nn.Conv2d(3, arch.width, arch.patch_size, arch.patch_size)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class OfficialViT(nn.Module):
  """Returns the normalized tokens [B, 1 + registers + patches, D] of NCHW images."""

  def __init__(self, arch, grid, interpolate_offset=0.1, interpolate_antialias=False, mask_token=True):
    super().__init__()
    d = arch.width
    self.patch_size, self.offset, self.antialias = arch.patch_size, interpolate_offset, interpolate_antialias
    self.cls_token = nn.Parameter(torch.randn(1, 1, d) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, d) * 0.02)
    self.register_tokens = nn.Parameter(torch.randn(1, arch.num_registers, d)) if arch.num_registers else None
    self.mask_token = nn.Parameter(torch.randn(1, d)) if mask_token else None
    self.patch_embed = PatchEmbed(arch)
    self.blocks = nn.ModuleList([Block(arch) for _ in range(arch.depth)])
    self.norm = nn.LayerNorm(d, eps=1e-6)

  def interpolate_pos_encoding(self, h, w):
    m = int((self.pos_embed.shape[1] - 1) ** 0.5)
    h0, w0 = h // self.patch_size, w // self.patch_size
    if (h0, w0) == (m, m):
      return self.pos_embed
    patch = self.pos_embed[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, scale_factor=((h0 + self.offset) / m, (w0 + self.offset) / m),
                          mode="bicubic", antialias=self.antialias)
    assert patch.shape[-2:] == (h0, w0)
    return torch.cat([self.pos_embed[:, :1], patch.permute(0, 2, 3, 1).reshape(1, h0 * w0, -1)], dim=1)

  def forward(self, images, masks=None):
    b, _, h, w = images.shape
    x = self.patch_embed(images)
    if masks is not None:
      x = torch.where(masks[..., None], self.mask_token[None], x)
    x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.interpolate_pos_encoding(h, w)
    if self.register_tokens is not None:
      x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
    for block in self.blocks:
      x = block(x)
    return self.norm(x)


class DINOHead(nn.Module):
  """mlp.0/2/4 with GELU, l2-normalized bottleneck, weight-normed last layer (gain g)."""

  def __init__(self, dim, out_dim, hidden=64, bottleneck=16):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                             nn.Linear(hidden, bottleneck))
    self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))

  def forward(self, x):
    return self.last_layer(F.normalize(self.mlp(x), dim=-1))


# ---------------------------------------------------------------------------------------
# The official initializations, applied to the modules above (and to timm's Swin for EsViT).
# ---------------------------------------------------------------------------------------


def _linears_trunc_normal(module: nn.Module) -> None:
  """Every nn.Linear: weight trunc_normal_(std=0.02) (torch's, bounds +-2 absolute), bias 0;
  every nn.LayerNorm: 1 and 0 (DINO's `_init_weights`, DINOv2's `init_weights_vit_timm`,
  EsViT's Swin `_init_weights`)."""
  for m in module.modules():
    if isinstance(m, nn.Linear):
      nn.init.trunc_normal_(m.weight, std=0.02)
      if m.bias is not None:
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
      nn.init.ones_(m.weight)
      nn.init.zeros_(m.bias)


@torch.no_grad()
def official_vit_init(vit: OfficialViT, method: str) -> OfficialViT:
  """`vit` initialized as facebookresearch/dino's VisionTransformer ("dino": pos_embed and the
  CLS token trunc_normal(0.02)) or dinov2's DinoVisionTransformer.init_weights ("dinov2":
  pos_embed trunc_normal(0.02), the CLS token and registers normal(1e-6)); both leave the patch
  Conv2d at PyTorch's default, the mask token at zeros and LayerScale at 1e-5."""
  nn.init.trunc_normal_(vit.pos_embed, std=0.02)
  if method == "dino":
    nn.init.trunc_normal_(vit.cls_token, std=0.02)
  else:
    nn.init.normal_(vit.cls_token, std=1e-6)
    if vit.register_tokens is not None:
      nn.init.normal_(vit.register_tokens, std=1e-6)
  if vit.mask_token is not None:
    nn.init.zeros_(vit.mask_token)
  vit.patch_embed.proj.reset_parameters()
  _linears_trunc_normal(vit.blocks)
  _linears_trunc_normal(vit.norm)
  for m in vit.modules():
    if isinstance(m, LayerScale):
      m.gamma.fill_(1e-5)
  return vit


class OfficialDINOHead(nn.Module):
  """DINO's and DINOv2's DINOHead as built: the MLP initialized (trunc_normal(0.02), zero
  biases) before the weight-normed last layer is created, so that layer's direction keeps
  nn.Linear's default init; its gain weight_g filled with 1."""

  def __init__(self, dim, out_dim, hidden=2048, bottleneck=256):
    super().__init__()
    self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                             nn.Linear(hidden, bottleneck))
    _linears_trunc_normal(self.mlp)
    self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck, out_dim, bias=False))
    with torch.no_grad():
      self.last_layer.weight_g.fill_(1)


@torch.no_grad()
def official_swin_init(swin: nn.Module) -> nn.Module:
  """timm's SwinTransformer initialized as EsViT's Swin: linears trunc_normal(0.02) with zero
  biases, LayerNorms 1 and 0, relative position bias tables trunc_normal(0.02), the patch
  Conv2d at PyTorch's default."""
  _linears_trunc_normal(swin)
  for name, p in swin.named_parameters():
    if name.endswith("relative_position_bias_table"):
      nn.init.trunc_normal_(p, std=0.02)
  swin.patch_embed.proj.reset_parameters()
  return swin
