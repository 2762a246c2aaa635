"""Optimizer, schedules and the optax-style EMA used for the teacher and the centers.

Schedules follow the official code of DINO (Caron et al. 2021, App. B; `utils.cosine_scheduler`)
and DINOv2 (Oquab et al. 2023, App. B; `CosineScheduler`), which share one formula: a linear
warmup `np.linspace(start, peak, warmup)` (it reaches the peak at warmup - 1), then a cosine from
the peak to the end value, then the end value. Peak lr: `base_lr * batch / 256` (DINO's linear
rule) or `base_lr * sqrt(batch / 1024)` (DINOv2's `sqrt_wrt_1024`). Weight decay cosine
0.04 -> 0.4; teacher momentum cosine 0.996 -> 1; teacher temperature warmed up linearly per
epoch (DINO) or per step (DINOv2). Gradient clipping per parameter tensor (DINO), per module
(DINOv2: backbone and each head) or on the global norm; DINOv2's layer-wise lr decay and
patch-embed lr multiplier.
"""
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

LR_SCALING = ("linear_256", "sqrt_1024")
CLIP_MODES = ("per_tensor", "per_module", "global")
TEACHER_TEMP_STEPS = ("per_step", "per_epoch")
FREEZE_MODES = ("skip", "zero_lr")
OPTIMIZERS = ("adamw", "sgd", "lars")
LARS_ETA = 0.001  # DINO's utils.LARS trust coefficient (main_dino.py keeps its default)


def warmup_cosine(start: float, peak: float, end: float, warmup: int, total: int) -> optax.Schedule:
  """The official DINO / DINOv2 schedule as a function of the step: `np.linspace(start, peak,
  warmup)` for the first `warmup` steps, then `end + (peak - end) * (1 + cos(pi * j / n)) / 2`
  for j = 0 .. n - 1 with n = total - warmup, then `end`."""
  n = max(total - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    ramp = start + (peak - start) * step / max(warmup - 1, 1)
    j = jnp.clip(step - warmup, 0, n)
    decay = end + 0.5 * (peak - end) * (1 + jnp.cos(jnp.pi * j / n))
    return jnp.where(step < warmup, ramp, jnp.where(step >= total, end, decay))
  return schedule


def cosine(start: float, end: float, steps: int) -> optax.Schedule:
  """Half-cosine from `start` at step 0 to `end` at `steps`, constant afterwards."""
  return warmup_cosine(start, start, end, 0, steps)


def total_steps(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  return int(round(cfg.epochs * steps_per_epoch))


def peak_lr(cfg: ml_collections.ConfigDict) -> float:
  """The lr after warmup: DINO's linear rule `base_lr * batch / 256` or DINOv2's
  `base_lr * sqrt(batch / 1024)` (`optim.lr_scaling`)."""
  o = cfg.optim
  if o.lr_scaling == "sqrt_1024":
    return o.base_lr * math.sqrt(cfg.batch_size / 1024)
  return o.base_lr * cfg.batch_size / 256


def teacher_temp_schedule(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  """Teacher temperature warmup `loss.teacher_temp` over `loss.teacher_temp_warmup_epochs`:
  DINO's `np.linspace` over epochs, indexed by the epoch (`per_epoch`), or DINOv2's over
  steps (`per_step`); the final temperature afterwards."""
  (start, end), epochs = cfg.loss.teacher_temp, cfg.loss.teacher_temp_warmup_epochs
  if cfg.loss.teacher_temp_steps == "per_epoch":
    per_epoch = warmup_cosine(start, end, end, int(round(epochs)), int(round(epochs)))
    return lambda step: per_epoch(jnp.asarray(step) // steps_per_epoch)
  warmup = int(epochs * steps_per_epoch)
  return warmup_cosine(start, end, end, warmup, warmup)


def make_schedules(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> dict[str, optax.Schedule]:
  """lr, weight decay, teacher momentum and teacher temperature as functions of the step."""
  total = total_steps(cfg, steps_per_epoch)
  o = cfg.optim
  return {
      "lr": warmup_cosine(0.0, peak_lr(cfg), o.min_lr, int(o.warmup_epochs * steps_per_epoch), total),
      "weight_decay": cosine(*o.weight_decay, total),
      "momentum": cosine(*o.teacher_momentum, total),
      "teacher_temp": teacher_temp_schedule(cfg, steps_per_epoch),
  }


def path_name(path) -> str:
  """'a/b/c' for a pytree key path (dict keys, attribute names, sequence indices)."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def layer_lr_multiplier(name: str, backbone, layer_decay: float, patch_embed_mult: float) -> float:
  """DINOv2 layer-wise lr decay: layer_decay ** (num_layers - layer_id) for a backbone
  parameter, whose layer id `backbone.layer_id` gives (0 for the embeddings, rising with
  depth; `backbone.num_layers` after the last block); the patch embedding's is further scaled
  by `patch_embed_mult`. Parameters outside the backbone (heads) keep 1."""
  if not name.startswith("backbone/"):
    return 1.0
  name = name.removeprefix("backbone/")
  mult = layer_decay ** (backbone.num_layers - backbone.layer_id(name))
  return mult * (patch_embed_mult if name.startswith("patch_embed/") else 1.0)


def scale_by_layer(multiplier: Callable[[str], float]) -> optax.GradientTransformation:
  """Scales each update by `multiplier(parameter path)` (a static per-parameter factor)."""
  def update(updates, state, params=None):
    del params
    return jax.tree_util.tree_map_with_path(lambda p, u: u * multiplier(path_name(p)), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


class FreezeState(NamedTuple):
  count: jax.Array


def is_last_layer(name: str) -> bool:
  """A head's last layer: its direction and, when trainable, its gain (`models.DINOHead`)."""
  return "last_layer" in name


def freeze_last_layer(steps: int) -> optax.GradientTransformation:
  """Zeroes the updates of every head's last layer during the first `steps` steps (DINO)."""
  def update(updates, state, params=None):
    del params
    frozen = state.count < steps
    def maybe_zero(path, u):
      return jnp.where(frozen, 0.0, u) if is_last_layer(path_name(path)) else u
    return jax.tree_util.tree_map_with_path(maybe_zero, updates), FreezeState(state.count + 1)
  return optax.GradientTransformation(lambda params: FreezeState(jnp.zeros([], jnp.int32)), update)


def clip_by_norm(grads, max_norm: float):
  """torch's `clip_grad_norm_` on one group: scaled by max_norm / (norm + 1e-6) when that is < 1."""
  coef = max_norm / (optax.tree.norm(grads) + 1e-6)
  return jax.tree.map(lambda g: g * jnp.minimum(coef, 1.0).astype(g.dtype), grads)


def clip_per_tensor(grads, max_norm: float):
  """DINO's `utils.clip_gradients`: each parameter tensor clipped on its own. The position
  embedding's CLS slot (`cls_pos_embed`) is clipped with its patch slots (`pos_embed`): one
  tensor in the official code."""
  if not isinstance(grads, dict):
    return clip_by_norm(grads, max_norm)
  out = {k: clip_per_tensor(g, max_norm) for k, g in grads.items()}
  if "pos_embed" in grads and "cls_pos_embed" in grads:
    joint = clip_by_norm({k: grads[k] for k in ("pos_embed", "cls_pos_embed")}, max_norm)
    out |= joint
  return out


def clip_gradients(mode: str, max_norm: float) -> optax.GradientTransformation:
  """Gradient clipping at `max_norm` (0: none): `per_tensor`, each parameter tensor on its own
  (DINO's `utils.clip_gradients`, `clip_per_tensor`); `per_module`, the backbone and each head
  as one group (DINOv2: `clip_grad_norm_` on each of the student's modules); `global`, all
  together."""
  if not max_norm:
    return optax.identity()
  if mode == "global":
    return optax.clip_by_global_norm(max_norm)

  def update(updates, state, params=None):
    del params
    if mode == "per_tensor":
      return clip_per_tensor(updates, max_norm), state
    return {module: clip_by_norm(g, max_norm) for module, g in updates.items()}, state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def weight_decay_mask(params):
  """True where weight decay applies: not biases, not 1-d parameters (norms, LayerScale).
  DINO's rule (`utils.get_params_groups`); DINOv2's (no decay for biases, norms, LayerScale
  gammas) picks the same parameters of these models (tests/test_recipes.py)."""
  return jax.tree_util.tree_map_with_path(lambda path, p: p.ndim > 1 and not path_name(path).endswith("bias"),
                                          params)


def skip_while_frozen(steps: int, inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` whose state stays as it is, and whose updates are zero, during the first `steps`
  steps. DINO drops the last layer's gradients then (`cancel_gradients_last_layer`: p.grad =
  None), so AdamW leaves its moments and its step count alone: its bias correction starts at
  the first step after the freeze."""
  def init(params):
    return jnp.zeros([], jnp.int32), inner.init(params)

  def update(updates, state, params=None):
    count, inner_state = state
    new_updates, new_inner = inner.update(updates, inner_state, params)
    frozen = count < steps
    return (jax.tree.map(lambda u: jnp.where(frozen, jnp.zeros_like(u), u), new_updates),
            (count + 1, jax.tree.map(lambda new, old: jnp.where(frozen, old, new), new_inner, inner_state)))
  return optax.GradientTransformation(init, update)


def is_matrix(params):
  """True for parameters of more than one dimension (LARS adapts and decays only these)."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(cfg: ml_collections.ConfigDict, schedules: dict, steps_per_epoch: int,
                   backbone) -> optax.GradientTransformation:
  """The optimizer `optim.name` names, with gradient clipping (`optim.clip_mode`), scheduled
  weight decay (`weight_decay_mask`), layer-wise lr decay over `backbone`'s layers and the
  last-layer freeze for the first `freeze_last_layer_epochs`: `optim.freeze_mode` "skip" (DINO:
  the last layer and its optimizer state sit out, `skip_while_frozen`) or "zero_lr" (DINOv2: its
  lr is 0, its moments still see the gradients).

  main_dino.py's three (`--optimizer`): "adamw", AdamW with decoupled weight decay; "sgd",
  torch.optim.SGD with momentum 0.9 and its L2 weight decay added to the gradient before the
  momentum; "lars", DINO's `utils.LARS`: that decay, then each matrix's update scaled by the
  trust ratio 0.001 · |p| / |update| (You et al. 2017, Eq. 6; 1 where a norm is 0), then
  momentum 0.9, vectors (biases, norms) neither decayed nor adapted. The lr multiplies the
  momentum buffer (the torch optimizers' order), so an lr schedule does not enter the buffer."""
  o = cfg.optim
  optimizer = o.get("name", "adamw")  # runs recorded before optim.name: AdamW
  multiplier = lambda name: layer_lr_multiplier(name, backbone, o.layer_decay, o.patch_embed_lr_mult)
  decay = lambda: optax.add_decayed_weights(schedules["weight_decay"], mask=weight_decay_mask)
  if optimizer == "adamw":
    before, state_part, after = [], lambda: optax.scale_by_adam(b1=o.betas[0], b2=o.betas[1]), [decay()]
  elif optimizer == "sgd":
    before, state_part, after = [decay()], lambda: optax.trace(o.get("momentum", 0.9)), []
  else:
    trust = optax.masked(optax.scale_by_trust_ratio(trust_coefficient=LARS_ETA), is_matrix)
    before, state_part, after = [decay(), trust], lambda: optax.trace(o.get("momentum", 0.9)), []
  rule = lambda stateful, *last: optax.chain(
      *before, stateful, *after, scale_by_layer(multiplier), optax.scale_by_learning_rate(schedules["lr"]), *last)
  frozen_steps = int(o.freeze_last_layer_epochs * steps_per_epoch)
  if o.freeze_mode == "skip":
    # The frozen layer's optimizer state sits out; the lr and weight-decay schedules follow the
    # global step, as main_dino.py sets every group's from the iteration.
    labels = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: "last_layer" if is_last_layer(path_name(path)) else "other", params)
    last_layer = rule(skip_while_frozen(frozen_steps, state_part()), freeze_last_layer(frozen_steps))
    body = optax.multi_transform({"last_layer": last_layer, "other": rule(state_part())}, labels)
  else:
    body = optax.chain(rule(state_part()), freeze_last_layer(frozen_steps))
  return optax.chain(clip_gradients(o.clip_mode, o.clip_grad), body)


class EmaState(NamedTuple):
  count: jax.Array
  value: Any


def ema(decay: float | optax.Schedule) -> optax.GradientTransformation:
  """Exponential moving average as an optax-style transformation.

  init(x0) starts the average at x0; update(x, state) returns (avg, state) with
  avg <- decay(count) * avg + (1 - decay(count)) * x. The DINO teacher is ema(momentum
  schedule) of the student parameters (Eq. 3 of Caron et al.); the center is ema(0.9) of
  the batch mean of teacher outputs (Eq. 4).
  """
  def init(x0):
    return EmaState(jnp.zeros([], jnp.int32), x0)

  def update(x, state, params=None):
    del params
    d = decay(state.count) if callable(decay) else decay
    value = jax.tree.map(lambda a, b: d * a + (1.0 - d) * b, state.value, x)
    return value, EmaState(state.count + 1, value)

  return optax.GradientTransformation(init, update)
