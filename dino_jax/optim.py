"""Optimizer, schedules and the optax-style EMA used for the teacher and the centers.

Schedules follow DINO (Caron et al. 2021, App. B) and DINOv2 (Oquab et al. 2023, App. B):
lr = base_lr * batch / 256 with linear warmup then cosine decay; weight decay cosine
0.04 -> 0.4; teacher momentum cosine 0.996 -> 1; teacher temperature linear warmup
0.04 -> 0.07 then constant; DINOv2's layer-wise lr decay and patch-embed lr multiplier.
"""
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax


def cosine(start: float, end: float, steps: int) -> optax.Schedule:
  """Half-cosine from `start` at step 0 to `end` at `steps`, constant afterwards."""
  decay = optax.cosine_decay_schedule(1.0, max(steps, 1))  # 1 -> 0
  return lambda step: end + (start - end) * decay(step)


def linear_warmup(start: float, end: float, steps: int) -> optax.Schedule:
  """Linear from `start` to `end` over `steps`, then `end` (at once when steps is 0)."""
  return optax.linear_schedule(start, end, steps) if steps > 0 else optax.constant_schedule(end)


def total_steps(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
  return int(round(cfg.epochs * steps_per_epoch))


def make_schedules(cfg: ml_collections.ConfigDict, steps_per_epoch: int) -> dict[str, optax.Schedule]:
  """lr, weight decay, teacher momentum and teacher temperature as functions of the step."""
  total = total_steps(cfg, steps_per_epoch)
  o, l = cfg.optim, cfg.loss
  peak_lr = o.base_lr * cfg.batch_size / 256
  warmup = int(o.warmup_epochs * steps_per_epoch)
  return {
      "lr": optax.warmup_cosine_decay_schedule(0.0, peak_lr, warmup, max(total, warmup + 1), o.min_lr),
      "weight_decay": cosine(*o.weight_decay, total),
      "momentum": cosine(*o.teacher_momentum, total),
      "teacher_temp": linear_warmup(*l.teacher_temp, int(l.teacher_temp_warmup_epochs * steps_per_epoch)),
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


def freeze_last_layer(steps: int) -> optax.GradientTransformation:
  """Zeroes the updates of every head's last layer during the first `steps` steps (DINO)."""
  def update(updates, state, params=None):
    del params
    frozen = state.count < steps
    def maybe_zero(path, u):
      return jnp.where(frozen, 0.0, u) if path_name(path).endswith("last_layer") else u
    return jax.tree_util.tree_map_with_path(maybe_zero, updates), FreezeState(state.count + 1)
  return optax.GradientTransformation(lambda params: FreezeState(jnp.zeros([], jnp.int32)), update)


def make_optimizer(cfg: ml_collections.ConfigDict, schedules: dict, steps_per_epoch: int,
                   backbone) -> optax.GradientTransformation:
  """AdamW with global-norm clipping, scheduled decoupled weight decay (not on biases and
  norms), layer-wise lr decay over `backbone`'s layers and the last-layer freeze."""
  o = cfg.optim
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1 and not path_name(path).endswith("bias"), params)
  multiplier = lambda name: layer_lr_multiplier(name, backbone, o.layer_decay, o.patch_embed_lr_mult)
  return optax.chain(
      optax.clip_by_global_norm(o.clip_grad),
      optax.scale_by_adam(b1=o.betas[0], b2=o.betas[1]),
      optax.add_decayed_weights(schedules["weight_decay"], mask=decay_mask),
      scale_by_layer(multiplier),
      optax.scale_by_learning_rate(schedules["lr"]),
      freeze_last_layer(int(o.freeze_last_layer_epochs * steps_per_epoch)),
  )


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
