"""Self-distillation losses of DINO (Caron et al. 2021), iBOT (Zhou et al. 2022) and DINOv2.

All functions are pure and operate on global arrays: under `jax.jit` with a sharded batch
the batch reductions (Sinkhorn-Knopp sums, batch means) are global across devices.
"""
import functools

import jax
import jax.numpy as jnp


def centered_softmax(teacher_logits, center, temp):
  """DINO Eq. (1)/Sec. 3.1 teacher target: P_t = softmax((g_t(x) - c) / tau_t)."""
  return jax.nn.softmax((teacher_logits - center) / temp, axis=-1)


def sinkhorn_knopp(teacher_logits, temp, num_iters=3, weights=None, max_logit=None):
  """Sinkhorn-Knopp teacher targets (SwAV, Caron et al. 2020, Eq. 3; used by DINOv2).

  Finds Q = diag(u) exp(S / temp) diag(v) over the [n, K] score matrix S whose prototype
  (column) sums are 1/K and sample (row) sums are 1/n, then rescales rows to sum to 1.
  `weights` ([n] in {0, 1}) excludes padding rows from the normalization.

  The official loop normalizes Q itself, columns then rows, `num_iters` times. Here the loop
  updates only the scalings, v = 1 / (K · Eᵀu) and u = w / (n · E v) with E = exp(S / temp):
  the same Q, from two passes over E per iteration that read it without writing an [n, K]
  array.

  Any constant subtracted from S / temp cancels in the normalizations; it keeps exp in range.
  That constant is the largest score, or `max_logit` / temp where the scores are known to be at
  most `max_logit` (a DINO head's: `models.max_logits`). The bound spares the pass that
  finds the maximum: XLA's CPU backend fused that pass into the head's matmul, and the
  teacher's iBOT head with its targets took 0.75-0.80 s against 0.40-0.42 s with the bound
  (ViT-S/14, 663 rows, K = 65,536). Either shift is safe while the scores lie in
  [-max_logit, max_logit] with max_logit < 43 * temp: no prototype's column can then lie
  87 * temp below the shift, where float32's exp underflows to 0. The official code subtracts
  nothing.

  Args:
    teacher_logits: [n, K] scores.
    temp: teacher temperature.
    num_iters: number of alternating normalizations.
    weights: optional [n] row validity.
    max_logit: optional scalar at least every score.
  Returns:
    [n, K] targets; each valid row sums to 1, invalid rows are 0.
  """
  logits = teacher_logits.astype(jnp.float32) / temp
  shift = jnp.max(logits) if max_logit is None else max_logit / temp
  e = jnp.exp(logits - shift)
  if weights is None:
    weights = jnp.ones(e.shape[0], e.dtype)
  n, k = jnp.sum(weights), e.shape[1]
  matvec = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)  # no TF32 / bf16 passes
  u = weights / jnp.sum(matvec(weights, e))  # Q / sum(Q), padding rows left out
  for _ in range(num_iters):
    v = 1.0 / (k * matvec(u, e))  # each prototype gets mass 1/K
    row_sums = matvec(e, v)
    u = jnp.where(row_sums > 0, weights / (n * jnp.maximum(row_sums, 1e-30)), 0.0)  # each sample 1/n
  return (n * u)[:, None] * e * v[None, :]


def dino_loss(student_logits, teacher_probs, student_temp):
  """DINO Eq. (2): mean over pairs (t, s), s != t, of H(P_t, P_s) = -sum P_t log P_s.

  Args:
    student_logits: [B, S, K] student head outputs for all S views (globals first).
    teacher_probs: [B, T, K] teacher targets for the T global views.
    student_temp: student temperature tau_s.
  Returns:
    scalar loss averaged over the batch and the T*S - T view pairs.
  """
  log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temp, axis=-1)
  ce = -jnp.einsum("btk,bsk->bts", teacher_probs, log_p)  # [B, T, S]
  t, s = ce.shape[1:]
  pair = 1.0 - jnp.eye(t, s)  # the same view is not paired with itself
  return jnp.sum(jnp.mean(ce, axis=0) * pair) / jnp.sum(pair)


def ibot_patch_loss(student_patch_logits, teacher_patch_probs, token_weights, num_images,
                    student_temp):
  """iBOT Eq. (3) as in DINOv2: masked-token cross-entropy, each image weighted equally.

  L = -1/num_images * sum_m w_m sum_k P_t[m, k] log P_s[m, k], where w_m = 1 / (number of
  masked tokens of the image token m belongs to), and 0 for padding tokens.

  Args:
    student_patch_logits: [M, K] student logits of the masked tokens (padded to M).
    teacher_patch_probs: [M, K] teacher targets for the same tokens (unmasked input).
    token_weights: [M] per-token weights as above.
    num_images: number of student global-crop images in the batch (masked or not).
    student_temp: student temperature.
  """
  log_p = jax.nn.log_softmax(student_patch_logits.astype(jnp.float32) / student_temp, axis=-1)
  ce = -jnp.sum(teacher_patch_probs * log_p, axis=-1)
  return jnp.sum(ce * token_weights) / num_images


def koleo_loss(features, eps=1e-8):
  """KoLeo regularizer (Sablayrolles et al. 2019, DINOv2 Sec. 4):

  L = -1/n sum_i log(min_{j != i} ||x_i - x_j||) on l2-normalized features x; `eps` inside
  the norm keeps the gradient finite for duplicate features (as DINOv2's PairwiseDistance).
  """
  x = features / jnp.maximum(jnp.linalg.norm(features, axis=-1, keepdims=True), 1e-12)
  sim = x @ x.T
  sim = jnp.where(jnp.eye(x.shape[0], dtype=bool), -jnp.inf, sim)
  nearest = x[jnp.argmax(sim, axis=-1)]
  dist = jnp.linalg.norm(x - nearest + eps, axis=-1)
  return -jnp.mean(jnp.log(dist + eps))


def entropy(probs):
  """Mean Shannon entropy (nats) of the rows of `probs`."""
  return -jnp.mean(jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)), axis=-1))


def kl_to_mean(probs):
  """Mean KL(P_t(x) || E_x P_t(x)): 0 when every input gets the same target (collapse)."""
  mean = jnp.mean(probs, axis=0, keepdims=True)
  ratio = jnp.log(jnp.maximum(probs, 1e-30)) - jnp.log(jnp.maximum(mean, 1e-30))
  return jnp.mean(jnp.sum(probs * ratio, axis=-1))


def region_matching_loss(student_regions, student_logits, teacher_regions, teacher_probs, student_temp):
  """EsViT's region-level loss L_R (Li et al. 2022, Eq. 3), as in its official DDINOLoss.

  For each (teacher global view t, student view s != t) pair and each student region i, the
  teacher region j* = argmax_j cos(z_s[i], z_t[j]) of the most similar backbone feature is
  found, and the student region's head output learns its target: -sum_k P_t[j*, k] log P_s[i, k].
  Averaged over the student's regions, the batch and the T*S - T view pairs.

  Args:
    student_regions: per crop size (globals first), [B, V, R, D] backbone region features.
    student_logits: the same views' [B, V, R, K] region-head logits.
    teacher_regions: [B, T, Rt, D] teacher backbone region features of the T global views.
    teacher_probs: [B, T, Rt, K] teacher region targets (centered and sharpened).
    student_temp: student temperature.
  """
  unit = lambda z: z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  num_teacher = teacher_regions.shape[1]
  t_unit = unit(teacher_regions.astype(jnp.float32))
  total, pairs = 0.0, 0
  first_view = 0
  for regions, logits in zip(student_regions, student_logits):
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32) / student_temp, axis=-1)  # [B, V, R, K]
    s_unit = unit(regions.astype(jnp.float32))
    for t in range(num_teacher):
      match = jnp.argmax(jnp.einsum("bvrd,bjd->bvrj", s_unit, t_unit[:, t]), axis=-1)  # [B, V, R]
      target = jnp.take_along_axis(teacher_probs[:, t][:, None], match[..., None], axis=2)  # [B, V, R, K]
      ce = jnp.mean(-jnp.sum(target * log_p, axis=-1), axis=(0, 2))  # [V]
      other = jnp.arange(first_view, first_view + regions.shape[1]) != t  # a view is not paired with itself
      total += jnp.sum(ce * other)
      pairs += int(regions.shape[1]) - int(first_view <= t < first_view + regions.shape[1])
    first_view += regions.shape[1]
  return total / pairs
