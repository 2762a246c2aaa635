"""Training objectives: teacher targets, and each loss as a function of the step's outputs.

Every objective is `fn(student, teacher, cfg) -> scalar` over the dicts the train step builds
(`dino_jax.learner`), and the step's loss is sum_name cfg.loss.<name>_weight * fn(...) over the
objectives whose weight is above 0:

  student  "logits" [B, S, K] DINO-head logits of all S views (globals first), "embedding"
           [B, G, D] of the G global views; with iBOT "patch_logits" [M, K] of the masked
           tokens; with the region loss "regions" / "region_logits": one [B, V, R, .] array
           per crop size (global views, then local views).
  teacher  "probs" [B, G, K] targets of the global views; with iBOT "patch_probs" [M, K] and
           "token_weights" [M]; with the region loss "regions" [B, G, R, D] and "region_probs"
           [B, G, R, K].

The formulas are in `dino_jax.losses`; here they meet the train state (centers) and the config.
"""
import jax
import jax.numpy as jnp
import ml_collections

from dino_jax import losses
from dino_jax import optim

# Which head output each target is made from, and the center (train-state key) it uses.
TARGETS = {"logits": ("probs", "center"), "patch_logits": ("patch_probs", "ibot_center"),
           "region_logits": ("region_probs", "region_center")}


def dino(student, teacher, cfg):
  """DINO's view-level loss (Caron et al. 2021, Eq. 2)."""
  return losses.dino_loss(student["logits"], teacher["probs"], cfg.loss.student_temp)


def ibot(student, teacher, cfg):
  """iBOT's masked-patch loss as in DINOv2 (each student global crop weighs the same)."""
  num_images = teacher["probs"].shape[0] * teacher["probs"].shape[1]
  return losses.ibot_patch_loss(student["patch_logits"], teacher["patch_probs"], teacher["token_weights"],
                                num_images, cfg.loss.student_temp)


def group_size(cfg: ml_collections.ConfigDict) -> int:
  """Images per group of what the official code computes within each GPU's batch (DINOv2's
  KoLeo, iBOT mask strata and stochastic-depth subsets): `per_gpu_batch_size`, the official
  run's per-GPU batch whatever the device count here; 0: the whole global batch is one group."""
  return cfg.get("per_gpu_batch_size", 0) or cfg.batch_size


def koleo(student, teacher, cfg):
  """DINOv2's KoLeo regularizer on the student's global-view embeddings (its backbone's
  normalized CLS tokens): within each group of `group_size` images (one official GPU's batch),
  one term per global view, summed over the views and averaged over the groups (DDP's mean of
  the GPUs' gradients)."""
  del teacher
  emb = student["embedding"]  # [B, G, D]
  groups = emb.reshape(-1, group_size(cfg), *emb.shape[1:])  # [B / n, n, G, D]
  per_group = jax.vmap(lambda e: sum(losses.koleo_loss(e[:, i]) for i in range(e.shape[1])))(groups)
  return jnp.mean(per_group)


def region(student, teacher, cfg):
  """EsViT's region-matching loss (Li et al. 2022, Eq. 3), over every crop size."""
  return losses.region_matching_loss(student["regions"], student["region_logits"], teacher["regions"],
                                     teacher["region_probs"], cfg.loss.student_temp)


OBJECTIVES = {"dino": dino, "ibot": ibot, "koleo": koleo, "region": region}


def weight(cfg: ml_collections.ConfigDict, name: str) -> float:
  return cfg.loss.get(f"{name}_weight", 0.0)


def active(cfg: ml_collections.ConfigDict) -> list[str]:
  """The objectives a config trains with (weight above 0), in the order they are summed."""
  return [name for name in OBJECTIVES if weight(cfg, name) > 0]


def centers(cfg: ml_collections.ConfigDict) -> list[str]:
  """The train-state centers a config's objectives use."""
  # DINO's and iBOT's centers were always in the train state (and so in every checkpoint).
  return ["center", "ibot_center"] + (["region_center"] if weight(cfg, "region") > 0 else [])


def teacher_targets(teacher_out: dict, state: dict, temp, cfg, weights=None, max_logits=None) -> dict:
  """Teacher probabilities for each head output present: centering + sharpening (DINO,
  Eq. 4) or Sinkhorn-Knopp over all rows of the global batch (DINOv2). `weights` marks the
  valid (non-padding) rows of "patch_logits"; `max_logits` bounds each output's logits
  (`models.max_logits`), which Sinkhorn-Knopp then shifts by."""
  out = {}
  for logits_key, (probs_key, center_key) in TARGETS.items():
    if logits_key not in teacher_out:
      continue
    logits = teacher_out[logits_key]
    row_weights = weights if logits_key == "patch_logits" else None
    if cfg.loss.centering == "sinkhorn":
      flat = logits.reshape(-1, logits.shape[-1])
      bound = (max_logits or {}).get(logits_key)
      out[probs_key] = losses.sinkhorn_knopp(flat, temp, 3, row_weights, bound).reshape(logits.shape)
    else:
      out[probs_key] = losses.centered_softmax(logits, state[center_key].value, temp)
  return out


def updated_centers(teacher_out: dict, state: dict, cfg, weights=None) -> dict:
  """Each used center moved towards the batch mean of its teacher logits (an EMA with
  `loss.center_momentum`); unchanged with Sinkhorn-Knopp, which needs none."""
  out = {}
  for logits_key, (_, center_key) in TARGETS.items():
    if logits_key not in teacher_out or cfg.loss.centering == "sinkhorn":
      continue
    logits = teacher_out[logits_key]
    flat = logits.reshape(-1, logits.shape[-1])
    if logits_key == "patch_logits" and weights is not None:
      batch_mean = jnp.sum(flat * weights[:, None], axis=0) / jnp.maximum(jnp.sum(weights), 1.0)
    else:
      batch_mean = jnp.mean(flat, axis=0)
    out[center_key] = optim.ema(cfg.loss.center_momentum).update(batch_mean, state[center_key])[1]
  return out
