r"""The official DINO / DINOv2 train step rebuilt in PyTorch, for `bench --against_pytorch`.

The same work as `learner.train_step` on the same shapes, the way facebookresearch/dinov2's
`SSLMetaArch` does it in eager PyTorch: timm's ViT as the backbone (DINOv2 layout: LayerScale,
SwiGLU, registers; a mask token put in after the patch embedding), two weight-normalized
projection heads (DINO and iBOT), the teacher on the two global crops, the student on the
masked global crops and the local crops, the student's DINO head once on all crops' CLS
tokens, the iBOT heads on the masked tokens gathered into a buffer of the masks' upper bound of
rows (as the official code runs them), the losses of the papers' equations, per-module gradient clipping,
AdamW and the teacher EMA (`torch._foreach_*`, as the official code). The heads and losses are
written here for the benchmark from the papers' equations; only the backbone is a library's.

The student's parameter count is checked against the JAX state's, so both sides train the same
architecture. Needs torch and timm (pip install -e '.[test]').
"""
import os

import ml_collections
import numpy as np

from dino_jax import masking
from dino_jax import models
from dino_jax import objectives
from dino_jax.errors import UsageError

# The steps alternate with JAX's: OpenMP threads that wait busily after each of PyTorch's ops
# would hold the cores XLA's threads need next (JAX's backbone pass 8% slower; PyTorch's no faster).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch first starts its threads

try:
  import timm
  from timm.layers import SwiGLUPacked
  import torch
  from torch import nn
  import torch.nn.functional as F
except ImportError as e:  # only `bench --against_pytorch` needs them
  raise UsageError(f"--against_pytorch needs torch and timm ({e.name} is missing): "
                   "pip install -e '.[test]'") from None


def check_comparable(cfg: ml_collections.ConfigDict, jax_backend: str) -> str:
  """The torch device of the comparison ("cuda" beside a JAX GPU, "cpu" beside the JAX CPU);
  UsageError for a step this module does not rebuild."""
  if cfg.model.get("name", "vit") != "vit":
    raise UsageError(f"--against_pytorch builds ViT steps; this config's model is {cfg.model.name!r}")
  if cfg.get("distill", {}).get("teacher") or cfg.loss.get("region_weight", 0):
    raise UsageError("--against_pytorch rebuilds DINO / DINOv2 steps, not distillation or EsViT's region loss")
  if jax_backend == "gpu" and not torch.cuda.is_available():
    raise UsageError("JAX runs on a GPU but this torch has no CUDA: install a CUDA build of torch")
  if jax_backend not in ("gpu", "cpu"):
    raise UsageError(f"--against_pytorch compares on this host's GPU or CPU; JAX's backend is {jax_backend}")
  return "cuda" if jax_backend == "gpu" else "cpu"


def residual(x, branch, rate: float, training: bool, subset: bool):
  """x + branch(x) with stochastic depth as `dino_jax.models.layers.residual`: with `subset`
  (DINOv2) the branch runs only on a random kept subset of the batch, its output added back
  scaled by n / k; otherwise a per-sample mask (DINO)."""
  if not training or rate == 0:
    return x + branch(x)
  n = x.shape[0]
  if subset:
    k = max(int(n * (1 - rate)), 1)
    keep = torch.randperm(n, device=x.device)[:k]
    return torch.index_add(x, 0, keep, branch(x[keep]).to(x.dtype), alpha=n / k)
  mask = (torch.rand(n, 1, 1, device=x.device) < 1 - rate).to(x.dtype) / (1 - rate)
  return x + branch(x) * mask


def stochastic_depth_forward(block: nn.Module, rate: float, subset: bool):
  """A timm block's forward with `residual`'s stochastic depth at `rate`."""

  def forward(x):
    x = residual(x, lambda y: block.ls1(block.attn(block.norm1(y))), rate, block.training, subset)
    return residual(x, lambda y: block.ls2(block.mlp(block.norm2(y))), rate, block.training, subset)

  return forward


def make_backbone(m: ml_collections.ConfigDict) -> nn.Module:
  """timm's ViT with the config's architecture, its position embedding of the patches at
  m.pos_embed_grid (the CLS slot: `Network.cls_pos_embed`). Stochastic depth is the config's:
  per-block rates (uniform, or rising as DINO's linspace), kept subsets in "subset" mode."""
  swiglu = m.ffn == "swiglu"
  vit = timm.models.vision_transformer.VisionTransformer(
      img_size=m.pos_embed_grid * m.patch_size, patch_size=m.patch_size, embed_dim=m.width, depth=m.depth,
      num_heads=m.num_heads, mlp_ratio=(2 if swiglu else 1) * m.mlp_dim / m.width,
      mlp_layer=SwiGLUPacked if swiglu else timm.layers.Mlp, act_layer=nn.SiLU if swiglu else nn.GELU,
      init_values=m.layerscale, reg_tokens=m.num_registers, no_embed_class=True, num_classes=0,
      dynamic_img_size=True)
  jax_vit = models.make_backbone(m)
  for i, block in enumerate(vit.blocks):
    block.forward = stochastic_depth_forward(block, jax_vit.block_rate(i), m.get("drop_path_mode") == "subset")
  return vit


class Head(nn.Module):
  """DINO head: MLP, l2 normalization, weight-normalized linear layer to the prototypes
  (its gain trainable unless norm_last_layer)."""

  def __init__(self, dim: int, h: ml_collections.ConfigDict, bottleneck: int):
    super().__init__()
    dims = [dim] + [h.hidden_dim] * (h.num_layers - 1)
    layers = []
    for a, b in zip(dims[:-1], dims[1:]):
      layers += [nn.Linear(a, b), nn.GELU()]
    self.mlp = nn.Sequential(*layers, nn.Linear(dims[-1], bottleneck))
    self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck, h.out_dim, bias=False))
    self.last_layer.parametrizations.weight.original0.requires_grad_(not h.norm_last_layer)
    if h.norm_last_layer:
      self.last_layer.parametrizations.weight.original0.data.fill_(1.0)

  def forward(self, x):
    return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class Network(nn.Module):
  """Backbone + DINO head (+ iBOT head): what the student and the teacher each are."""

  def __init__(self, cfg: ml_collections.ConfigDict, ibot: bool):
    super().__init__()
    self.backbone = make_backbone(cfg.model)
    self.mask_token = nn.Parameter(torch.zeros(1, 1, 1, cfg.model.width)) if ibot else None
    self.cls_pos_embed = nn.Parameter(torch.zeros(1, 1, cfg.model.width))  # the official pos_embed's CLS slot
    self.head = Head(cfg.model.width, cfg.head, cfg.head.bottleneck_dim)
    self.ibot_head = None
    if ibot and not cfg.head.share_ibot_head:
      self.ibot_head = Head(cfg.model.width, cfg.head, cfg.head.ibot_bottleneck_dim or cfg.head.bottleneck_dim)

  def tokens(self, images, masks=None):
    """Normalized output tokens [B, 1 + R + P, D] of images [B, 3, H, W]; masked patches
    ([B, P] bool) start from the mask token."""
    vit = self.backbone
    x = vit.patch_embed(images)  # [B, h, w, D]
    if masks is not None:
      x = torch.where(masks.view(x.shape[:3] + (1,)), self.mask_token.to(x.dtype), x)
    x = vit._pos_embed(x)  # pylint: disable=protected-access
    x = torch.cat([x[:, :1] + self.cls_pos_embed, x[:, 1:]], dim=1)
    return vit.norm(vit.blocks(vit.norm_pre(x)))


def sinkhorn_knopp(logits, temp, iters=3):
  """SwAV Eq. 3, as DINOv2's teacher centering: rows sum to 1, prototypes share mass equally."""
  q = torch.exp((logits.float() - logits.max()) / temp).t()
  q /= q.sum()
  k, n = q.shape
  for _ in range(iters):
    q /= q.sum(dim=1, keepdim=True) * k
    q /= q.sum(dim=0, keepdim=True) * n
  return (q * n).t()


def padded_head(head: nn.Module, tokens, rows: int):
  """The iBOT head on the masked tokens as the official step runs it: on a buffer of `rows`
  (the official collate's `upperbound`), the padding rows' outputs dropped."""
  buffer = tokens.new_zeros(rows, tokens.shape[-1])
  buffer[:len(tokens)] = tokens
  return head(buffer)[:len(tokens)]


def cross_entropy(targets, logits, temp):
  return -(targets * F.log_softmax(logits.float() / temp, dim=-1)).sum(-1)


def koleo(x, eps=1e-8):
  """KoLeo (DINOv2 Sec. 4): -mean log distance of each l2-normalized feature to its nearest."""
  x = F.normalize(x.float(), dim=-1)
  sim = x @ x.t()
  sim.fill_diagonal_(-2.0)
  nearest = sim.argmax(dim=1)
  return -torch.log(F.pairwise_distance(x, x[nearest], eps=eps) + eps).mean()


class TorchStep:
  """One DINO / DINOv2 train step in PyTorch eager on `device` ("cpu" or "cuda")."""

  def __init__(self, cfg: ml_collections.ConfigDict, device: str):
    self.cfg, self.device = cfg, torch.device(device)
    self.ibot = cfg.loss.ibot_weight > 0
    torch.manual_seed(cfg.seed)
    self.student = Network(cfg, self.ibot).to(self.device)
    self.teacher = Network(cfg, self.ibot).to(self.device)
    self.teacher.load_state_dict(self.student.state_dict())
    self.teacher.requires_grad_(False)
    self.teacher.eval()  # no stochastic depth in the teacher
    self.params = [p for p in self.student.parameters() if p.requires_grad]
    self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=tuple(cfg.optim.betas), weight_decay=0.04)
    self.centers = {name: torch.zeros(1, cfg.head.out_dim, device=self.device) for name in ("dino", "ibot")}
    self.autocast = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.model.dtype)

  def num_student_params(self) -> int:
    """Trainable parameters (the fixed unit gain of a norm_last_layer head is not one)."""
    return sum(p.numel() for p in self.params)

  def inputs(self, views: dict, masks: np.ndarray | None) -> dict:
    """Torch tensors of the JAX step's augmented views ([B, V, H, W, 3] -> crop-major
    [V*B, 3, H, W], as the official collate) and iBOT masks ([B, 2, P] -> [2B, P])."""
    crop_major = lambda x: torch.from_numpy(np.ascontiguousarray(
        np.asarray(x, np.float32).swapaxes(0, 1).reshape((-1,) + x.shape[2:]).transpose(0, 3, 1, 2)))
    out = {k: crop_major(v).to(self.device) for k, v in views.items()}
    if masks is not None:
      out["masks"] = torch.from_numpy(np.asarray(masks).swapaxes(0, 1).reshape(-1, masks.shape[-1])).to(self.device)
    return out

  def __call__(self, batch: dict) -> float:
    """One update; returns the loss."""
    cfg, b = self.cfg, batch["global"].shape[0] // 2
    masks = batch.get("masks") if self.ibot else None
    rows = self.upperbound(masks) if masks is not None else 0  # the iBOT heads' buffer
    with torch.autocast(self.device.type, self.autocast or torch.bfloat16, enabled=self.autocast is not None):
      with torch.no_grad():
        t_tokens = self.teacher.tokens(batch["global"])
        t_logits = self.teacher.head(t_tokens[:, 0])
        t_probs = self.targets(t_logits, "dino").chunk(2)
        if masks is not None:
          patches = t_tokens[:, 1 + cfg.model.num_registers:][masks]
          t_patch = self.targets(padded_head(self.teacher.ibot_head or self.teacher.head, patches, rows), "ibot")
      s_tokens = self.student.tokens(batch["global"], masks)
      cls = [s_tokens[:, 0]] + ([self.student.tokens(batch["local"])[:, 0]] if "local" in batch else [])
      s_logits = list(self.student.head(torch.cat(cls)).chunk(sum(len(c) for c in cls) // b))
      pairs = [(t, s) for t in range(2) for s in range(len(s_logits)) if s != t]
      loss = sum(cross_entropy(t_probs[t], s_logits[s], cfg.loss.student_temp).mean() for t, s in pairs) / len(pairs)
      if masks is not None:
        s_patch = padded_head(self.student.ibot_head or self.student.head,
                              s_tokens[:, 1 + cfg.model.num_registers:][masks], rows)
        per_image = masks.sum(1, keepdim=True).expand_as(masks)[masks].clamp(min=1)
        ibot = (cross_entropy(t_patch, s_patch, cfg.loss.student_temp) / per_image).sum() / len(masks)
        loss = loss + cfg.loss.ibot_weight * ibot
      if cfg.loss.koleo_weight:
        loss = loss + cfg.loss.koleo_weight * sum(koleo(x) for x in s_tokens[:, 0].chunk(2))
    self.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for module in (self.student.backbone, self.student.head, self.student.ibot_head):
      if module is not None:
        nn.utils.clip_grad_norm_(module.parameters(), cfg.optim.clip_grad)
    self.optimizer.step()
    with torch.no_grad():
      teacher = [p for p in self.teacher.parameters()]
      student = [p.detach() for p in self.student.parameters()]
      momentum = self.cfg.optim.teacher_momentum[0]
      torch._foreach_mul_(teacher, momentum)  # pylint: disable=protected-access
      torch._foreach_add_(teacher, student, alpha=1 - momentum)  # pylint: disable=protected-access
    return float(loss.detach())

  def upperbound(self, masks) -> int:
    """Rows of the iBOT heads' buffer: the most patches the masks of the 2B global crops
    ([2B, P]) can hold, as the official collate's `upperbound` and the JAX step's padding on
    one device (`masking.max_masked_per_group`)."""
    return masking.max_masked_per_group(masks.shape[0], 1, masks.shape[1], self.cfg.mask,
                                        objectives.group_size(self.cfg) * 2)

  def targets(self, logits, name: str):
    """The teacher's targets: Sinkhorn-Knopp (DINOv2) or the centered softmax (DINO, with the
    EMA of the `name` center: "dino" or "ibot")."""
    temp = self.cfg.loss.teacher_temp[0]
    if self.cfg.loss.centering == "sinkhorn":
      return sinkhorn_knopp(logits, temp)
    center = self.centers[name]
    probs = F.softmax((logits.float() - center) / temp, dim=-1)
    m = self.cfg.loss.center_momentum
    center.mul_(m).add_(logits.float().mean(0, keepdim=True), alpha=1 - m)
    return probs

  def synchronize(self):
    if self.device.type == "cuda":
      torch.cuda.synchronize()


def matmul(shape: tuple[int, int, int], dtype: str, device: str):
  """A call that multiplies random [m, k] and [k, n] tensors in `dtype` on `device` and waits
  for the product (`bench.median_seconds` times it)."""
  m, k, n = shape
  dtype, device = getattr(torch, dtype), torch.device(device)
  a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
  sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
  return lambda: (torch.matmul(a, b), sync())


def num_threads() -> int:
  return torch.get_num_threads()


def check_same_size(torch_params: int, jax_params: int) -> None:
  """Stops when the two students differ in parameter count (not the same architecture)."""
  if torch_params != jax_params:
    raise UsageError(f"the PyTorch student has {torch_params} parameters, the JAX one {jax_params}: "
                     "not the same architecture")

