"""A PyTorch reference of the official training updates of DINO, DINOv2 and EsViT.

Written for tests/test_step_equivalence.py from the semantics of the official code (read, not
copied; the citations are file:line of facebookresearch/dino 7c446df, facebookresearch/dinov2
b8931f7 and microsoft/esvit 2d6becd), so that no test needs those repositories:

  DINO    main_dino.py:301-360 (train_one_epoch), :363-416 (DINOLoss); utils.py:132-149
          (clip_gradients, cancel_gradients_last_layer), :187-198 (cosine_scheduler),
          :594-643 (MultiCropWrapper, get_params_groups); vision_transformer.py:257-291 (DINOHead).
  DINOv2  train/ssl_meta_arch.py:132-365 (forward_backward, update_teacher), train/train.py:61-119
          and :222-292 (optimizer, schedules, apply_optim_scheduler, the loop's clipping),
          loss/dino_clstoken_loss.py, loss/ibot_patch_loss.py, loss/koleo_loss.py,
          utils/param_groups.py, utils/utils.py:67-87 (CosineScheduler), data/collate.py.
  EsViT   main_esvit.py:499-600 (train_one_epoch), :663-770 (DDINOLoss); models/swin_transformer.py
          (window attention, blocks, patch merging, forward with the region outputs).

What is left out on purpose: mixed precision (fp16 autocast / grad scaler; everything here is
float32), stochastic depth (random: no cross-framework match; the tests set its rate to 0) and
multi-process communication, which is simulated: DINOv2's per-GPU computations run over each
GPU's share of the batch with the all-reduces written as sums over the shares, and DDP's
gradient average as the mean of the per-GPU losses. DINO and EsViT compute nothing per GPU
but batch means (which DDP's averaging makes global), so they run as one process.

The ViT is `tests.torch_reference.OfficialViT` (the official key layout); the heads and EsViT's
Swin are below. The Swin is EsViT's rather than timm's: EsViT fixes each block's window and
shift when the model is built for the global crop size and zero-pads other maps to that window
before shifting, which timm (shift, then pad; windows from the input) does not reproduce for
the local crops; where the two rules coincide the tests check it against timm.
`head_state_from_flax` gives the official state_dict of a dino_jax head (`convert.to_torch`
gives the backbones').
"""
import math
import types

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from tests import torch_reference

# ---------------------------------------------------------------------------------------
# Schedules: the official formulas.
# ---------------------------------------------------------------------------------------


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
  """DINO's and EsViT's `utils.cosine_scheduler` (dino/utils.py:187-198): an array over all
  iterations, a linear warmup from `start_warmup_value` then a half cosine to `final_value`."""
  warmup_iters = warmup_epochs * niter_per_ep
  warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_epochs > 0 else np.array([])
  i = np.arange(epochs * niter_per_ep - warmup_iters)
  cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * i / len(i)))
  schedule = np.concatenate((warmup, cosine))
  assert len(schedule) == epochs * niter_per_ep
  return schedule


class CosineScheduler:
  """DINOv2's `CosineScheduler` (dinov2/utils/utils.py:67-87): [zeros(freeze), linspace warmup,
  cosine]; `final_value` from `total_iters` on."""

  def __init__(self, base_value, final_value, total_iters, warmup_iters=0, start_warmup_value=0, freeze_iters=0):
    self.final_value, self.total_iters = final_value, total_iters
    i = np.arange(total_iters - warmup_iters - freeze_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * i / len(i)))
    self.schedule = np.concatenate((np.zeros(freeze_iters), np.linspace(start_warmup_value, base_value, warmup_iters),
                                    cosine))
    assert len(self.schedule) == total_iters

  def __getitem__(self, it):
    return self.final_value if it >= self.total_iters else self.schedule[it]


def teacher_temp_per_epoch(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs):
  """DINO's / EsViT's DINOLoss.teacher_temp_schedule (main_dino.py:373-378), indexed by epoch."""
  return np.concatenate((np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
                         np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp))


# ---------------------------------------------------------------------------------------
# Modules.
# ---------------------------------------------------------------------------------------


class WeightNormLinear(nn.Module):
  """`nn.utils.weight_norm(nn.Linear(bottleneck, out, bias=False))` written out, with its two
  parameters `weight_g` [out, 1] and `weight_v` [out, bottleneck]: W = g * v / ||v||_row."""

  def __init__(self, in_dim, out_dim):
    super().__init__()
    self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
    self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
    nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))

  def forward(self, x):
    return F.linear(x, self.weight_v * (self.weight_g / torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True)))


class DINOHead(nn.Module):
  """The official DINO head (DINO, DINOv2 and EsViT share it): Linear-GELU-...-Linear to the
  bottleneck, l2-normalized (eps 1e-12 in float32), weight-normalized last layer whose gain is
  frozen with `norm_last_layer` (DINO; DINOv2 has no such option: always trainable)."""

  def __init__(self, in_dim, out_dim, hidden_dim, bottleneck_dim, nlayers=3, norm_last_layer=True):
    super().__init__()
    layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
    for _ in range(nlayers - 2):
      layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
    self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
    self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
    if norm_last_layer:
      self.last_layer.weight_g.requires_grad = False

  def forward(self, x):
    return self.last_layer(F.normalize(self.mlp(x), dim=-1, p=2))


class ViTBackbone(torch_reference.OfficialViT):
  """`torch_reference.OfficialViT` (the key layout of DINO's / DINOv2's ViT, position embedding
  resized with offset 0.1, no antialias) giving the backbone outputs the training code reads:
  DINOv2's forward_features (x_norm_clstoken, x_norm_patchtokens); DINO's forward returns the
  normalized CLS token."""

  def __init__(self, arch, grid, mask_token):
    super().__init__(arch, grid, interpolate_offset=0.1, interpolate_antialias=False, mask_token=mask_token)
    self.prefix = 1 + arch.num_registers

  def forward_features(self, images, masks=None):
    tokens = torch_reference.OfficialViT.forward(self, images, masks)
    return {"x_norm_clstoken": tokens[:, 0], "x_norm_patchtokens": tokens[:, self.prefix:]}

  def forward(self, images):
    return self.forward_features(images)["x_norm_clstoken"]


class MultiCropWrapper(nn.Module):
  """DINO's utils.MultiCropWrapper (utils.py:594-629): the backbone once per run of crops of
  equal size, the head once on all their outputs concatenated."""

  def __init__(self, backbone, head):
    super().__init__()
    self.backbone, self.head = backbone, head

  def forward(self, crops):
    outputs = [self.backbone(torch.cat(run)) for run in same_size_runs(crops)]
    return self.head(torch.cat(outputs))


def same_size_runs(crops):
  """Consecutive crops of the same size (what unique_consecutive + cumsum pick in the official
  wrappers)."""
  runs = []
  for crop in crops:
    if runs and runs[-1][-1].shape[-1] == crop.shape[-1]:
      runs[-1].append(crop)
    else:
      runs.append([crop])
  return runs


# -- EsViT's Swin ---------------------------------------------------------------------------


def window_partition(x, window):
  b, h, w, c = x.shape
  x = x.view(b, h // window, window, w // window, window, c)
  return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows, window, h, w):
  b = windows.shape[0] // ((h // window) * (w // window))
  x = windows.view(b, h // window, w // window, window, window, -1)
  return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, -1)


class WindowAttention(nn.Module):
  """EsViT's WindowAttention (models/swin_transformer.py:72-150): multi-head attention inside
  each window with a learned relative position bias, an additive window mask if given."""

  def __init__(self, dim, window, heads):
    super().__init__()
    self.heads, self.window = heads, window
    self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
    self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
    yx = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = yx[:, :, None] - yx[:, None, :] + window - 1
    self.register_buffer("relative_position_index", rel[0] * (2 * window - 1) + rel[1], persistent=False)

  def forward(self, x, mask=None):
    n_windows_b, n, c = x.shape
    q, k, v = self.qkv(x).reshape(n_windows_b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
    attn = (q * (c // self.heads) ** -0.5) @ k.transpose(-2, -1)
    bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(n, n, -1)
    attn = attn + bias.permute(2, 0, 1)[None]
    if mask is not None:
      nw = mask.shape[0]
      attn = (attn.view(-1, nw, self.heads, n, n) + mask[None, :, None]).view(-1, self.heads, n, n)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(n_windows_b, n, c)
    return self.proj(out)


class SwinBlock(nn.Module):
  """EsViT's SwinTransformerBlock (models/swin_transformer.py:177-333). Its window and shift
  are fixed when it is built, from the resolution of the image size it is built for
  (`input_resolution`, :206-210): one unshifted window of that resolution if it is no larger
  than the window size. At run time every input is zero-padded (after norm1) to a multiple of
  that window and shifted after padding, the shifted-window mask computed on the padded map
  (:275-325; create_attn_mask :249-268); the padded tokens take part in attention."""

  def __init__(self, dim, input_resolution, heads, window_size, shift_size, mlp_ratio, eps):
    super().__init__()
    if input_resolution <= window_size:
      window_size, shift_size = input_resolution, 0
    self.window, self.shift = window_size, shift_size
    self.norm1, self.norm2 = nn.LayerNorm(dim, eps=eps), nn.LayerNorm(dim, eps=eps)
    self.attn = WindowAttention(dim, window_size, heads)
    self.mlp = nn.Module()
    self.mlp.fc1, self.mlp.fc2 = nn.Linear(dim, int(dim * mlp_ratio)), nn.Linear(int(dim * mlp_ratio), dim)

  def attn_mask(self, h, w):
    """EsViT's create_attn_mask (:249-268): the 9 regions of the padded map; different regions: -100."""
    win, shift = self.window, self.shift
    hp, wp = -(-h // win) * win, -(-w // win) * win
    img = torch.zeros(1, hp, wp, 1)
    count = 0
    for hs in (slice(0, -win), slice(-win, -shift), slice(-shift, None)):
      for ws in (slice(0, -win), slice(-win, -shift), slice(-shift, None)):
        img[:, hs, ws, :] = count
        count += 1
    windows = window_partition(img, win).squeeze(-1)
    diff = windows[:, None, :] - windows[:, :, None]
    return torch.where(diff != 0, torch.tensor(-100.0), torch.tensor(0.0))

  def forward(self, x):  # [B, L, C]
    b, l, c = x.shape
    h = w = int(math.sqrt(l))
    shortcut = x
    x = self.norm1(x).view(b, h, w, c)
    x = F.pad(x, (0, 0, 0, -w % self.window, 0, -h % self.window))
    hp, wp = x.shape[1:3]
    mask = None
    if self.shift:
      x = torch.roll(x, (-self.shift, -self.shift), (1, 2))
      mask = self.attn_mask(h, w)
    x = window_reverse(self.attn(window_partition(x, self.window), mask), self.window, hp, wp)
    if self.shift:
      x = torch.roll(x, (self.shift, self.shift), (1, 2))
    x = shortcut + x[:, :h, :w].reshape(b, h * w, c)
    return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.norm2(x))))


class PatchMerging(nn.Module):
  """EsViT's PatchMerging (models/swin_transformer.py:354-419): 2x2 neighbours (odd maps
  zero-padded), concatenated as x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]."""

  def __init__(self, dim, eps):
    super().__init__()
    self.norm = nn.LayerNorm(4 * dim, eps=eps)
    self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

  def forward(self, x):
    b, l, c = x.shape
    h = w = int(math.sqrt(l))
    x = F.pad(x.view(b, h, w, c), (0, 0, 0, w % 2, 0, h % 2))
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    return self.reduction(self.norm(x.view(b, -1, 4 * c)))


class EsViTSwin(nn.Module):
  """EsViT's SwinTransformer with `use_dense_prediction` (models/swin_transformer.py:576-751),
  built for `img_size` (EsViT: the global crop size, TRAIN.IMAGE_SIZE), its view head `head`
  and region head `head_dense` attached. Parameter names are timm's layout (the merge that
  starts stage s is `layers.<s>.downsample`), as `dino_jax.convert.to_torch` writes Swins; the
  official layout differs only in that name (the merge ends stage s - 1 there)."""

  def __init__(self, arch, img_size, head, head_dense):
    super().__init__()
    eps, res = arch.norm_eps, img_size // arch.patch_size
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, arch.width, arch.patch_size, arch.patch_size)
    self.patch_embed.norm = nn.LayerNorm(arch.width, eps=eps)
    self.layers = nn.ModuleList()
    for s, (depth, heads) in enumerate(zip(arch.depths, arch.num_heads)):
      dim = arch.width * 2 ** s
      stage = nn.Module()
      if s:
        stage.downsample = PatchMerging(dim // 2, eps)
      stage.blocks = nn.ModuleList([SwinBlock(dim, res // 2 ** s, heads, arch.window_size,
                                              0 if j % 2 == 0 else arch.window_size // 2, arch.mlp_ratio, eps)
                                    for j in range(depth)])
      self.layers.append(stage)
    self.norm = nn.LayerNorm(arch.width * 2 ** (len(arch.depths) - 1), eps=eps)
    self.head, self.head_dense = head, head_dense

  def forward_features(self, x):
    x = self.patch_embed.norm(self.patch_embed.proj(x).flatten(2).transpose(1, 2))
    for stage in self.layers:
      if hasattr(stage, "downsample"):
        x = stage.downsample(x)
      for block in stage.blocks:
        x = block(x)
    x_region = self.norm(x)
    return x_region.mean(1), x_region

  def forward(self, crops):
    """(view logits, region logits, region features [sum B*N, C], tokens per view of each run)."""
    cls, fea, npatch = [], [], []
    for run in same_size_runs(crops):
      c, r = self.forward_features(torch.cat(run))
      cls.append(c)
      fea.append(r.reshape(-1, r.shape[-1]))
      npatch.append(r.shape[1])
    cls, fea = torch.cat(cls), torch.cat(fea)
    return self.head(cls), self.head_dense(fea), fea, npatch


# ---------------------------------------------------------------------------------------
# dino_jax parameters -> official state_dicts.
# ---------------------------------------------------------------------------------------


def head_state_from_flax(head: dict) -> dict:
  """dino_jax DINOHead params -> the official head's state_dict (the inverse of
  `convert.head_to_flax`): mlp.{2i} Linear, last_layer.weight_v = V.T, weight_g = gain.T (1
  for a fixed-gain head)."""
  state = {}
  layers = sorted(int(k[3:]) for k in head if k.startswith("mlp"))
  for i in layers:
    state[f"mlp.{2 * i}.weight"] = np.asarray(head[f"mlp{i}"]["kernel"]).T
    state[f"mlp.{2 * i}.bias"] = np.asarray(head[f"mlp{i}"]["bias"])
  v = np.asarray(head["last_layer"])
  state["last_layer.weight_v"] = v.T
  state["last_layer.weight_g"] = (np.asarray(head["last_layer_gain"]).T if "last_layer_gain" in head
                                  else np.ones((v.shape[1], 1), np.float32))
  return state


def load(module: nn.Module, state: dict):
  """Loads numpy arrays into `module` (strict: every parameter and persistent buffer)."""
  module.load_state_dict({k: torch.tensor(np.array(v), dtype=torch.float32) for k, v in state.items()})


def named_numpy(module: nn.Module) -> dict:
  return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------
# The official optimizer pieces.
# ---------------------------------------------------------------------------------------


def get_params_groups(model):
  """DINO's utils.get_params_groups (utils.py:632-643): trainable parameters; biases and 1-d
  parameters without weight decay."""
  regularized, not_regularized = [], []
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    (not_regularized if name.endswith(".bias") or p.ndim == 1 else regularized).append(p)
  return [{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients(model, clip):
  """DINO's utils.clip_gradients (utils.py:132-141): each gradient tensor scaled to norm
  `clip` when its norm is larger."""
  for p in model.parameters():
    if p.grad is not None:
      coef = clip / (p.grad.norm(2) + 1e-6)
      if coef < 1:
        p.grad.mul_(coef)


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
  """DINO's utils.cancel_gradients_last_layer (utils.py:144-149): no gradient (AdamW then skips
  the parameter and its state) for every 'last_layer' parameter during the first epochs."""
  if epoch >= freeze_last_layer:
    return
  for name, p in model.named_parameters():
    if "last_layer" in name:
      p.grad = None


@torch.no_grad()
def ema(student: nn.Module, teacher: nn.Module, m: float):
  """teacher <- m teacher + (1 - m) student over all parameters, frozen gains included."""
  for q, k in zip(student.parameters(), teacher.parameters()):
    k.mul_(m).add_((1 - m) * q.detach())


def dino_vit_lr_decay_rate(name, lr_decay_rate, num_layers):
  """DINOv2's get_vit_lr_decay_rate (param_groups.py:13-48) for a backbone's parameter name
  (force_is_backbone, unchunked blocks)."""
  layer_id = num_layers + 1
  if any(k in name for k in ("pos_embed", "patch_embed", "mask_token", "cls_token", "register_tokens")):
    layer_id = 0
  elif "blocks." in name and "residual." not in name:
    layer_id = int(name[name.find("blocks."):].split(".")[1]) + 1
  return lr_decay_rate ** (num_layers + 1 - layer_id)


def get_params_groups_with_decay(model, n_blocks, lr_decay_rate, patch_embed_lr_mult):
  """DINOv2's get_params_groups_with_decay (param_groups.py:51-89), one group per parameter:
  layer-wise lr decay (only where n_blocks > 0, the backbone), the patch embedding's lr
  multiplier, no weight decay for biases, norms and LayerScale gammas, last layers marked."""
  groups = []
  for name, p in model.named_parameters():
    if not p.requires_grad:
      continue
    lr_mult = dino_vit_lr_decay_rate(name, lr_decay_rate, n_blocks) if n_blocks > 0 else 1.0
    wd_mult = 0.0 if name.endswith(".bias") or "norm" in name or "gamma" in name else 1.0
    if "patch_embed" in name:
      lr_mult *= patch_embed_lr_mult
    groups.append({"params": [p], "is_last_layer": "last_layer" in name, "lr_multiplier": lr_mult,
                   "wd_multiplier": wd_mult, "name": name})
  return groups


# ---------------------------------------------------------------------------------------
# DINO: main_dino.py.
# ---------------------------------------------------------------------------------------


class DINOLoss(nn.Module):
  """main_dino.py:363-416: centering and sharpening of the teacher with the epoch's
  temperature, cross-entropy over every (teacher global, student other view) pair, then the
  center's EMA with the batch mean of the teacher outputs."""

  def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
               student_temp=0.1, center_momentum=0.9):
    super().__init__()
    self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
    self.register_buffer("center", torch.zeros(1, out_dim))
    self.teacher_temp_schedule = teacher_temp_per_epoch(warmup_teacher_temp, teacher_temp,
                                                        warmup_teacher_temp_epochs, nepochs)

  def forward(self, student_output, teacher_output, epoch):
    student_out = (student_output / self.student_temp).chunk(self.ncrops)
    temp = self.teacher_temp_schedule[epoch]
    teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
    total, n_terms = 0, 0
    for iq, q in enumerate(teacher_out):
      for v, s in enumerate(student_out):
        if v != iq:
          total = total + torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean()
          n_terms += 1
    total = total / n_terms
    self.update_center(teacher_output)
    return total

  @torch.no_grad()
  def update_center(self, teacher_output):
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)  # one process
    self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)


class DINOTrainer:
  """main_dino.py's training loop (:238-251 schedules, :301-360 one iteration) in float32 on one
  process holding the whole batch. `args`: the main_dino.py arguments it reads (lr, min_lr,
  epochs, warmup_epochs, weight_decay, weight_decay_end, momentum_teacher, warmup_teacher_temp,
  teacher_temp, warmup_teacher_temp_epochs, clip_grad, freeze_last_layer, out_dim,
  local_crops_number, batch_size_per_gpu, optimizer) and niter_per_ep, the data loader's length.
  Both models stay in train mode, as main_dino.py leaves them: batch norm (a ResNet's) normalizes
  by each forward's batch and moves each model's running statistics (the EMA below moves
  parameters only)."""

  def __init__(self, student: nn.Module, teacher: nn.Module, args, loss: nn.Module = None):
    self.student, self.teacher, self.args = student, teacher, args
    for p in teacher.parameters():
      p.requires_grad = False
    self.loss = loss or DINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp,
                                 args.teacher_temp, args.warmup_teacher_temp_epochs, args.epochs)
    if getattr(args, "optimizer", "adamw") == "sgd":  # main_dino.py:224-231
      self.optimizer = torch.optim.SGD(get_params_groups(student), lr=0, momentum=0.9)
    else:
      self.optimizer = torch.optim.AdamW(get_params_groups(student))
    world_size = 1
    self.lr_schedule = cosine_scheduler(args.lr * (args.batch_size_per_gpu * world_size) / 256.0, args.min_lr,
                                        args.epochs, args.niter_per_ep, warmup_epochs=args.warmup_epochs)
    self.wd_schedule = cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, args.niter_per_ep)
    self.momentum_schedule = cosine_scheduler(args.momentum_teacher, 1, args.epochs, args.niter_per_ep)

  def forward_loss(self, images, epoch):
    teacher_output = self.teacher(images[:2])
    student_output = self.student(images)
    return self.loss(student_output, teacher_output, epoch), {}

  def step(self, it: int, images: list) -> dict:
    """One iteration on `images`, the list of crops (2 global, then the local ones), each a
    batch [B, 3, H, W]; returns the loss and its terms as floats."""
    epoch = it // self.args.niter_per_ep
    for i, group in enumerate(self.optimizer.param_groups):
      group["lr"] = self.lr_schedule[it]
      if i == 0:
        group["weight_decay"] = self.wd_schedule[it]
    loss, terms = self.forward_loss(images, epoch)
    self.optimizer.zero_grad()
    loss.backward()
    if self.args.clip_grad:
      clip_gradients(self.student, self.args.clip_grad)
    cancel_gradients_last_layer(epoch, self.student, self.args.freeze_last_layer)
    self.optimizer.step()
    ema(self.student, self.teacher, self.momentum_schedule[it])
    return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()}}


# ---------------------------------------------------------------------------------------
# EsViT: main_esvit.py with --use_dense_prediction.
# ---------------------------------------------------------------------------------------


class DDINOLoss(nn.Module):
  """main_esvit.py:663-770: per (teacher global, student other view) pair, 0.5 x the view
  cross-entropy plus 0.5 x the region-matching one (each student region learns the teacher
  region of most similar backbone feature); view and region centers, each an EMA of its batch
  mean. Also returns the two terms apart (`view`, `region`), each averaged over the pairs."""

  def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs, nepochs,
               student_temp=0.1, center_momentum=0.9):
    super().__init__()
    self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
    self.register_buffer("center", torch.zeros(1, out_dim))
    self.register_buffer("center_grid", torch.zeros(1, out_dim))
    self.teacher_temp_schedule = teacher_temp_per_epoch(warmup_teacher_temp, teacher_temp,
                                                        warmup_teacher_temp_epochs, nepochs)

  def forward(self, student_output, teacher_output, epoch):
    s_cls_out, s_region_out, s_fea, s_npatch = student_output
    t_cls_out, t_region_out, t_fea, t_npatch = teacher_output
    temp = self.teacher_temp_schedule[epoch]
    t_cls = F.softmax((t_cls_out - self.center) / temp, dim=-1).detach().chunk(2)
    t_region = F.softmax((t_region_out - self.center_grid) / temp, dim=-1).detach().chunk(2)
    t_fea = t_fea.chunk(2)
    n = t_npatch[0]
    b = t_region[0].shape[0] // n
    s_cls = (s_cls_out / self.student_temp).chunk(self.ncrops)
    sizes = [s_npatch[0]] * 2 + [s_npatch[1]] * (self.ncrops - 2)
    s_region = torch.split(s_region_out / self.student_temp, [k * b for k in sizes], dim=0)
    s_fea = torch.split(s_fea, [k * b for k in sizes], dim=0)
    total, view_total, region_total, n_terms = 0, 0, 0, 0
    for iq, q in enumerate(t_cls):
      for v in range(len(s_cls)):
        if v == iq:
          continue
        view = torch.sum(-q * F.log_softmax(s_cls[v], dim=-1), dim=-1)
        s_region_v, s_fea_v = s_region[v].view(b, sizes[v], -1), s_fea[v].view(b, sizes[v], -1)
        t_region_q, t_fea_q = t_region[iq].view(b, n, -1), t_fea[iq].view(b, n, -1)
        sim = torch.matmul(F.normalize(s_fea_v, p=2, dim=-1), F.normalize(t_fea_q, p=2, dim=-1).permute(0, 2, 1))
        nearest = sim.max(dim=2)[1]
        target = torch.gather(t_region_q, 1, nearest.unsqueeze(2).expand(-1, -1, t_region_q.size(2)))
        region = torch.sum(-target * F.log_softmax(s_region_v, dim=-1), dim=-1).mean(-1)
        total = total + (0.5 * view + 0.5 * region).mean()
        view_total, region_total = view_total + view.mean(), region_total + region.mean()
        n_terms += 1
    self.update_center(t_cls_out, t_region_out)
    return total / n_terms, {"view": view_total / n_terms, "region": region_total / n_terms}

  @torch.no_grad()
  def update_center(self, teacher_output, teacher_grid_output):
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    grid_center = torch.sum(teacher_grid_output, dim=0, keepdim=True) / len(teacher_grid_output)
    self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
    self.center_grid = self.center_grid * self.center_momentum + grid_center * (1 - self.center_momentum)


class EsViTTrainer(DINOTrainer):
  """main_esvit.py's loop (:499-600): DINO's (schedules, per-tensor clipping on the fp16 path,
  last-layer cancel of both heads, DINO's parameter groups, EMA) with DDINOLoss on the Swin's
  four outputs. No mixup (its default)."""

  def __init__(self, student: EsViTSwin, teacher: EsViTSwin, args):
    loss = DDINOLoss(args.out_dim, args.local_crops_number + 2, args.warmup_teacher_temp, args.teacher_temp,
                     args.warmup_teacher_temp_epochs, args.epochs)
    super().__init__(student, teacher, args, loss)

  def forward_loss(self, images, epoch):
    teacher_output = self.teacher(images[:2])
    student_output = self.student(images)
    loss, terms = self.loss(student_output, teacher_output, epoch)
    return loss, {"dino_loss": terms["view"], "region_loss": terms["region"]}


# ---------------------------------------------------------------------------------------
# DINOv2: ssl_meta_arch.py and train.py, the GPUs simulated.
# ---------------------------------------------------------------------------------------


def sinkhorn_knopp_teacher(teacher_outputs: list, teacher_temp, n_samples, n_iterations=3):
  """DINOv2's sinkhorn_knopp_teacher (dino_clstoken_loss.py:34-61, ibot_patch_loss.py:62-90)
  with each GPU's rows in `teacher_outputs` and every all_reduce a sum over the GPUs; B =
  `n_samples` (all GPUs' rows)."""
  qs = [torch.exp(t.float() / teacher_temp).t() for t in teacher_outputs]  # K x B_gpu each
  k = qs[0].shape[0]
  sum_q = sum(torch.sum(q) for q in qs)
  qs = [q / sum_q for q in qs]
  for _ in range(n_iterations):
    sum_of_rows = sum(torch.sum(q, dim=1, keepdim=True) for q in qs)
    qs = [q / sum_of_rows / k for q in qs]
    qs = [q / torch.sum(q, dim=0, keepdim=True) / n_samples for q in qs]
  return [(q * n_samples).t() for q in qs]


def dino_clstoken_loss(student_output_list, teacher_list, student_temp=0.1):
  """DINOv2's DINOLoss.forward (dino_clstoken_loss.py:63-74): -sum over (s, t) of the batch mean
  of sum_k t log softmax(s / temp)."""
  total = 0
  for s in student_output_list:
    lsm = F.log_softmax(s / student_temp, dim=-1)
    for t in teacher_list:
      total = total - torch.sum(t * lsm, dim=-1).mean()
  return total


def koleo_loss(x, eps=1e-8):
  """DINOv2's KoLeoLoss.forward (koleo_loss.py:38-48)."""
  x = F.normalize(x, eps=eps, p=2, dim=-1)
  dots = torch.mm(x, x.t())
  dots.view(-1)[:: x.shape[0] + 1].fill_(-1)
  nearest = torch.max(dots, dim=1)[1]
  distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)
  return -torch.log(distances + eps).mean()


def ibot_forward_masked(student_masked, teacher_masked, student_masks_flat, masks_weight, student_temp=0.1):
  """DINOv2's iBOTPatchLoss.forward_masked (ibot_patch_loss.py:105-126) with the fallback
  lossfunc: -sum over masked tokens of w * sum_k t log softmax(s / temp), over the GPU's global
  crops (masked or not)."""
  loss = torch.sum(teacher_masked.float() * F.log_softmax(student_masked.float() / student_temp, dim=-1), dim=-1)
  return -(loss * masks_weight).sum() / student_masks_flat.shape[0]


def collate_masks(masks: torch.Tensor):
  """DINOv2's collate (data/collate.py:36-39) of one GPU's [2 B, N] crop-major masks: the
  flat indices of the masked tokens and 1 / (masked tokens of its image) for each."""
  mask_indices_list = masks.flatten().nonzero().flatten()
  masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
  return mask_indices_list, masks_weight


class DINOv2Trainer:
  """SSLMetaArch.forward_backward + train.py's iteration, float32, for `world_size` simulated
  GPUs, each with `batch_size_per_gpu` images: the teacher, the heads, Sinkhorn-Knopp (the
  config's centering; all-reduced), the DINO local/global losses, KoLeo and iBOT per GPU, the
  loss averaged over GPUs (DDP / FSDP gradient averaging); then per-module clip_grad_norm_,
  AdamW with DINOv2's parameter groups and schedules, and the EMA. `cfg` holds the yaml's keys
  the code reads (optim.*, teacher.*, train.OFFICIAL_EPOCH_LENGTH, dino.*, ibot.*,
  crops.local_crops_number); optim.lr is the scaled lr (`apply_scaling_rules_to_cfg`)."""

  def __init__(self, student: nn.ModuleDict, teacher: nn.ModuleDict, cfg, world_size):
    self.student, self.teacher, self.cfg, self.world_size = student, teacher, cfg, world_size
    for p in teacher.parameters():
      p.requires_grad = False
    groups = []
    for name, m in student.items():
      n_blocks = len(m.blocks) if hasattr(m, "blocks") else 0  # param_groups.py:53-66
      groups += get_params_groups_with_decay(m, n_blocks, cfg.optim.layerwise_decay, cfg.optim.patch_embed_lr_mult)
    self.optimizer = torch.optim.AdamW(groups, betas=(cfg.optim.adamw_beta1, cfg.optim.adamw_beta2))
    length, o, t = cfg.train.OFFICIAL_EPOCH_LENGTH, cfg.optim, cfg.teacher
    lr = dict(base_value=o.lr, final_value=o.min_lr, total_iters=o.epochs * length,
              warmup_iters=o.warmup_epochs * length, start_warmup_value=0)
    self.lr_schedule = CosineScheduler(**lr)
    self.wd_schedule = CosineScheduler(o.weight_decay, o.weight_decay_end, o.epochs * length)
    self.momentum_schedule = CosineScheduler(t.momentum_teacher, t.final_momentum_teacher, o.epochs * length)
    self.teacher_temp_schedule = CosineScheduler(t.teacher_temp, t.teacher_temp, t.warmup_teacher_temp_epochs * length,
                                                 t.warmup_teacher_temp_epochs * length, t.warmup_teacher_temp)
    self.last_layer_lr_schedule = CosineScheduler(**lr)
    self.last_layer_lr_schedule.schedule[:o.freeze_last_layer_epochs * length] = 0

  def gpu_teacher(self, global_crops, mask_indices_list):
    """get_teacher_output (ssl_meta_arch.py:155-197), separate iBOT head: the CLS tokens
    swapped between the two global crops, both heads' logits (before the targets)."""
    out = self.teacher.backbone.forward_features(global_crops)
    cls = out["x_norm_clstoken"].chunk(2)
    cls = torch.cat((cls[1], cls[0]))
    patch = out["x_norm_patchtokens"]
    masked = torch.index_select(patch.flatten(0, 1), 0, mask_indices_list)
    return self.teacher.dino_head(cls), self.teacher.ibot_head(masked)

  def forward_backward(self, gpus: list, teacher_temp) -> dict:
    n_global, n_local = 2, self.cfg.crops.local_crops_number
    n_terms = n_global * (n_global - 1) + max(n_local * n_global, 1)
    with torch.no_grad():
      teacher = [self.gpu_teacher(g["global_crops"], g["mask_indices_list"]) for g in gpus]
      n_cls = sum(t[0].shape[0] for t in teacher)
      dino_targets = sinkhorn_knopp_teacher([t[0] for t in teacher], teacher_temp, n_cls)
      n_masked = sum(t[1].shape[0] for t in teacher)  # all_reduce(n_masked_patches)
      ibot_targets = sinkhorn_knopp_teacher([t[1] for t in teacher], teacher_temp, n_masked)
    totals = {"loss": 0, "dino_loss": 0, "koleo_loss": 0, "ibot_loss": 0}
    for g, dino_t, ibot_t in zip(gpus, dino_targets, ibot_targets):
      dino_t = dino_t.view(n_global, -1, dino_t.shape[-1])
      glob = self.student.backbone.forward_features(g["global_crops"], g["masks"])
      loc = self.student.backbone.forward_features(g["local_crops"])
      cls_after_head = self.student.dino_head(torch.cat([loc["x_norm_clstoken"], glob["x_norm_clstoken"]]))
      local_after_head, global_after_head = cls_after_head.split([loc["x_norm_clstoken"].shape[0],
                                                                  glob["x_norm_clstoken"].shape[0]])
      masked = torch.index_select(glob["x_norm_patchtokens"].flatten(0, 1), 0, g["mask_indices_list"])
      masked_after_head = self.student.ibot_head(masked)
      dino_local = dino_clstoken_loss(local_after_head.chunk(n_local), dino_t) / n_terms
      dino_global = dino_clstoken_loss([global_after_head], [dino_t.flatten(0, 1)]) * 2 / n_terms
      koleo = sum(koleo_loss(p) for p in glob["x_norm_clstoken"].chunk(2))
      ibot = ibot_forward_masked(masked_after_head, ibot_t, g["masks"], g["masks_weight"]) * 2 * (1.0 / n_global)
      c = self.cfg
      loss = (c.dino.loss_weight * (dino_local + dino_global) + c.dino.koleo_loss_weight * koleo
              + c.ibot.loss_weight * ibot)
      for key, value in (("loss", loss), ("dino_loss", dino_local + dino_global), ("koleo_loss", koleo),
                         ("ibot_loss", ibot)):
        totals[key] = totals[key] + value / self.world_size
    totals["loss"].backward()  # the mean over GPUs: DDP's / FSDP's averaged gradients
    return {k: float(v.detach()) for k, v in totals.items()}

  def step(self, it: int, gpus: list) -> dict:
    """One iteration; `gpus`: per GPU {"global_crops" [2 B, 3, H, W] and "local_crops"
    [n_local B, 3, h, w] crop-major, "masks" [2 B, N] bool} as its collate makes them."""
    for g in gpus:
      g["mask_indices_list"], g["masks_weight"] = collate_masks(g["masks"])
    lr, wd = self.lr_schedule[it], self.wd_schedule[it]
    mom, teacher_temp = self.momentum_schedule[it], self.teacher_temp_schedule[it]
    last_layer_lr = self.last_layer_lr_schedule[it]
    for group in self.optimizer.param_groups:
      group["weight_decay"] = wd * group["wd_multiplier"]
      group["lr"] = (last_layer_lr if group["is_last_layer"] else lr) * group["lr_multiplier"]
    self.optimizer.zero_grad(set_to_none=True)
    losses = self.forward_backward(gpus, teacher_temp)
    if self.cfg.optim.clip_grad:
      for m in self.student.values():
        torch.nn.utils.clip_grad_norm_(m.parameters(), self.cfg.optim.clip_grad)
    self.optimizer.step()
    ema(self.student, self.teacher, mom)
    return losses


def namespace(**kw):
  """A nested SimpleNamespace (the official args / cfg objects the trainers read)."""
  return types.SimpleNamespace(**{k: namespace(**v) if isinstance(v, dict) else v for k, v in kw.items()})
