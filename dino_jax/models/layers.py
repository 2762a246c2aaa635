"""Building blocks shared by the backbones: initializers, FFNs, LayerScale, stochastic depth,
remat policies."""
import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from dino_jax.models import packing


def compute_dtype(name: str):
  """`model.dtype` as a JAX dtype; "auto": bfloat16 on GPUs and TPUs (the mixed precision of the
  official runs, with float32 parameters, norms' statistics, softmaxes, losses, EMA and centers),
  float32 on CPUs."""
  if name == "auto":
    name = "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"
  return jnp.dtype(name)


def trunc_normal(std: float = 0.02, bound: float = 2.0):
  """`torch.nn.init.trunc_normal_(std=std, a=-bound, b=bound)`, DINO's and DINOv2's init of
  linear layers and position embeddings: a normal truncated at +-`bound` in absolute value
  (+-100 std at 0.02, so a plain normal in practice; JAX's `truncated_normal` cuts at 2 std)."""
  def init(key, shape, dtype=jnp.float32):
    return std * jax.random.truncated_normal(key, -bound / std, bound / std, shape, dtype)
  return init


LINEAR_INIT = trunc_normal(0.02)  # every nn.Linear of the official ViTs, Swins and heads; biases 0


def torch_default_kernel():
  """PyTorch's default init of nn.Linear / nn.Conv2d weights, kaiming_uniform(a=sqrt(5)):
  U(+-1/sqrt(fan_in)); what the official code leaves the patch embedding and the heads' last
  layer at."""
  return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")


def torch_default_bias(fan_in: int):
  """PyTorch's default init of a bias: U(+-1/sqrt(fan_in))."""
  bound = 1 / math.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def patch_embedding(width: int, patch_size: int, dtype, name: str = "patch_embed", stride: int = 0) -> nn.Conv:
  """The patch embedding, a patch_size-strided convolution of RGB images (overlapping patches
  with a smaller `stride`, as SD-DINO's extractor), at PyTorch's default init (the official ViTs
  and Swins do not re-initialize their Conv2d)."""
  return nn.Conv(width, (patch_size,) * 2, strides=stride or patch_size, padding="VALID", dtype=dtype,
                 kernel_init=torch_default_kernel(), bias_init=torch_default_bias(3 * patch_size ** 2), name=name)


def l2_normalize(x, eps: float = 1e-12):
  """x / max(||x||, eps) along the last axis: torch.nn.functional.normalize's default (DINO's
  head before its last layer, SSCD's descriptors, the k-NN's features)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def column_sums(a):
  """Sums of a [n, K] array's columns as ones[n] · a, a matrix-vector product at float32
  precision: XLA's CPU backend runs the column reduction of a DINO head's [256, 65536] weight
  through YNNPACK in 0.22-0.47 s, this product in 13 ms (AMD EPYC, 2 cores, AVX2)."""
  return jnp.matmul(jnp.ones(a.shape[0], a.dtype), a, precision=jax.lax.Precision.HIGHEST)


@jax.custom_vjp
def scale_columns(a, s):
  """a * s for a [n, K] array and a [K] (or [1, K]) scale, with the scale's gradient as
  `column_sums` (autodiff takes it as a column reduction)."""
  return a * s


def _scale_columns_forward(a, s):
  return a * s, (a, s)


def _scale_columns_backward(residuals, g):
  a, s = residuals
  return g * s, column_sums(g * a).reshape(s.shape).astype(s.dtype)


scale_columns.defvjp(_scale_columns_forward, _scale_columns_backward)


@jax.custom_vjp
def matmul(x, w):
  """x @ w over [n, d] x [d, K], whose weight gradient is xᵀ·g, [d, K] as the weight is
  stored: JAX's own rule takes gᵀ·x and transposes the [K, d] result, which XLA's CPU
  backend made a transposed copy of g (for the iBOT head's [663, 65536] logits in a DINOv2
  ViT-S/14 step at batch 8, about 0.5 s of the heads' 2.4 s)."""
  return x @ w


def _matmul_forward(x, w):
  return x @ w, (x, w)


def _matmul_backward(residuals, g):
  x, w = residuals
  dx = jax.lax.dot_general(g, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  dw = jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


matmul.defvjp(_matmul_forward, _matmul_backward)


def gelu(x):
  """The exact GELU (Hendrycks & Gimpel 2016), x·Φ(x) = x/2·(1 + erf(x/√2)), computed as
  PyTorch's `nn.GELU()` does (DINO's and DINOv2's MLPs and heads); `jax.nn.gelu(x,
  approximate=False)` goes through erfc instead, which XLA's CPU backend runs slower."""
  return 0.5 * x * (1 + jax.lax.erf(x * jnp.asarray(0.5 ** 0.5, x.dtype)))


class Mlp(nn.Module):
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=LINEAR_INIT, name="fc1")(x)
    return nn.Dense(d, dtype=self.dtype, kernel_init=LINEAR_INIT, name="fc2")(gelu(x))


class SwiGLU(nn.Module):
  """SwiGLU FFN (Shazeer 2020): W3(silu(W1 x) * W2 x)."""
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x12 = nn.Dense(2 * self.hidden, dtype=self.dtype, kernel_init=LINEAR_INIT, name="w12")(x)
    x1, x2 = jnp.split(x12, 2, axis=-1)
    return nn.Dense(d, dtype=self.dtype, kernel_init=LINEAR_INIT, name="w3")(nn.silu(x1) * x2)


class LayerScale(nn.Module):
  init_value: float

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.initializers.constant(self.init_value), (x.shape[-1],))
    return x * gamma


class DropPath(nn.Module):
  """Stochastic depth: drops the residual branch per sample (Huang et al. 2016)."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return x * mask / keep


def subset_drop_path(x, branch, rate: float, rng, groups: int = 1,
                     batch_sharding: Optional[jax.sharding.NamedSharding] = None):
  """x + stochastic-depth branch(x) computing the branch only for the kept samples (DINOv2's
  `drop_add_residual_stochastic_depth`): each of `groups` groups of n consecutive samples
  (DINOv2: one GPU's crops of one size, the official per-GPU batch whatever the device count
  here) draws a random k = max(int(n (1 - rate)), 1) of them; they go through `branch` and
  their outputs are added back scaled by n / k. With `batch_sharding` (the train step's) each
  device computes on its own samples: its groups' kept ones where each device holds whole
  groups; where a group spans devices, all of them, the dropped ones scaled by 0 (the same
  draws and result; gathering a group's kept samples across devices would hold the whole
  batch's activations on each)."""
  n = x.shape[0] // groups
  k = max(int(n * (1.0 - rate)), 1)
  order = jnp.argsort(jax.random.uniform(rng, (groups, n)), axis=1)[:, :k]
  local = lambda a: jax.lax.with_sharding_constraint(a, batch_sharding) if batch_sharding is not None else a
  if batch_sharding is not None and groups % batch_sharding.mesh.size:  # a group spans devices
    scale = jax.nn.one_hot(order, n, dtype=x.dtype).sum(1).reshape((-1,) + (1,) * (x.ndim - 1)) * (n / k)
    return local(x + branch(local(x)).astype(x.dtype) * scale)
  pick = local(jax.nn.one_hot(order, n, dtype=x.dtype))  # [groups, k, n]: batched matmuls, no gathers
  grouped = local(x.reshape(groups, n, -1))
  exact = jax.lax.Precision.HIGHEST  # a selection: no bf16 rounding of the activations
  subset = jnp.einsum("gkn,gnf->gkf", pick, grouped, precision=exact).reshape(groups * k, *x.shape[1:])
  update = branch(subset).reshape(groups, k, -1).astype(x.dtype) * (n / k)
  return (grouped + jnp.einsum("gkn,gkf->gnf", pick, update, precision=exact)).reshape(x.shape)


REMAT_POLICIES = {  # what a rematerialized block keeps from its forward pass
    "full": None,  # nothing: recompute the whole block (least memory)
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # matmuls with weights
}


def residual(x, branch, rate: float, deterministic: bool, make_rng, subset_groups: Optional[int] = None,
             packed: Optional[tuple] = None, batch_sharding: Optional[jax.sharding.NamedSharding] = None):
  """x + branch(x) with stochastic depth at `rate`: with `subset_groups`, DINOv2's kept-subset
  form drawn in that many groups at any rate above 0 (its `NestedTensorBlock.forward_nested`,
  the student's training path; `subset_drop_path`, on `batch_sharding`'s devices), else the
  per-sample mask (DINO's and EsViT's DropPath). With `packed`
  ((`packing.PackedLayout`, segment ids): x holds crops packed in rows, and `branch(x, packed)`
  takes them) the same draws per crop: the kept subsets' branch computed on those crops alone
  (`packing.kept_subset_drop_path`) where each device's groups are whole, else every crop's
  branch scaled per crop (`packing.crop_drop_scale`). Call inside a compact module; `make_rng`
  is that module's."""
  if packed is not None:
    layout, segments = packed
    if deterministic or rate == 0:
      return x + branch(x, packed)
    if subset_groups is not None and subset_groups % layout.chunks == 0:
      return packing.kept_subset_drop_path(x, branch, rate, make_rng("dropout"), layout, subset_groups)
    scale = packing.crop_drop_scale(make_rng("dropout"), layout, rate, subset_groups)
    update = branch(x, packed)
    return x + update * packing.token_scale(scale, segments).astype(update.dtype)
  if not deterministic and rate > 0 and subset_groups is not None:
    return subset_drop_path(x, branch, rate, make_rng("dropout"), subset_groups, batch_sharding)
  return x + DropPath(rate)(branch(x), deterministic)


def padded_to_even(q, k, v, bias=None, implementation=None):
  """`jax.nn.dot_product_attention` over [B, N, H, d] with one zero token appended to the
  sequence and masked out as a key (`key_value_seq_lengths`), its output row dropped: the same
  function as the attention over the N tokens, computed on N + 1. cuDNN's fused attention
  refuses an odd N in training (JAX 0.10's check with a bias, 0.11's for 257 ViT tokens), and a
  ViT's N = patches + 1 (+ registers) and a Swin window of 7 x 7 are odd."""
  n = q.shape[1]
  pad = lambda x: jnp.pad(x, [(0, 0), (0, 1)] + [(0, 0)] * (x.ndim - 2))
  if bias is not None:
    bias = jnp.pad(bias, [(0, 0)] * (bias.ndim - 2) + [(0, 1), (0, 1)])
  lengths = jnp.full_like(q[:, 0, 0, 0], n, dtype=jnp.int32)  # [B], split along the batch as q is
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), bias=bias, key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out[:, :n]


def attention(q, k, v, bias=None, implementation: str = "xla"):
  """Softmax attention over [B, N, H, d] (Vaswani et al. 2017, Eq. 1), `bias` added to the
  [B, H, N, N] logits. "xla": `softmax_attention`, with q scaled by 1/sqrt(d) before the
  product as the official Attention modules scale it; "cudnn": cuDNN's fused kernel, to which
  an odd N goes padded to even (`padded_to_even`)."""
  if implementation == "cudnn":
    if q.shape[1] % 2:
      return padded_to_even(q, k, v, bias, "cudnn")
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="cudnn")
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  return softmax_attention(q, k, v, bias).transpose(0, 2, 1, 3)


def _attention_forward(q, k, v, bias):
  """softmax(q kᵀ + bias) v over [B, H, N, d] with the logits and softmax in float32. The
  softmax is normalized after the product with v (on [N, d], not [N, N]), and the unnormalized
  exp(logits - max) and its row sums are what the backward pass keeps."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  if bias is not None:
    logits = logits + bias
  e = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)).astype(v.dtype)
  total = jnp.sum(e, axis=-1, keepdims=True, dtype=jnp.float32)
  out = (jnp.einsum("bhqk,bhkd->bhqd", e, v, preferred_element_type=jnp.float32) / total).astype(v.dtype)
  return out, (q, k, v, e, total, out)


def _attention_backward(residuals, d_out):
  """Gradients of `_attention_forward` as FlashAttention's backward pass computes them (Dao et
  al. 2022, Alg. 4): with P = e / total, dL/dlogits = P * (d_out vᵀ - rowsum(d_out * out)),
  which reads no [N, N] array but e. Returns (dq, dk, dv, dlogits)."""
  q, k, v, e, total, out = residuals
  d_out = d_out.astype(jnp.float32) / total  # the 1 / total of P, applied on [N, d]
  dv = jnp.einsum("bhqk,bhqd->bhkd", e, d_out.astype(v.dtype), preferred_element_type=jnp.float32)
  row = jnp.sum(d_out * out.astype(jnp.float32), axis=-1, keepdims=True)
  d_probs = jnp.einsum("bhqd,bhkd->bhqk", d_out.astype(v.dtype), v, preferred_element_type=jnp.float32)
  d_logits = e.astype(jnp.float32) * (d_probs - row)
  dq = jnp.einsum("bhqk,bhkd->bhqd", d_logits.astype(q.dtype), k, preferred_element_type=jnp.float32)
  dk = jnp.einsum("bhqk,bhqd->bhkd", d_logits.astype(q.dtype), q, preferred_element_type=jnp.float32)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_logits


def sum_to_shape(x, shape):
  """x summed over the axes a `shape` array was broadcast along to reach x's shape."""
  lead = x.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1)
  return jnp.sum(x, axis=axes, keepdims=True).reshape(shape)


@jax.custom_vjp
def softmax_attention(q, k, v, bias):
  """softmax(q kᵀ + bias) v over [B, H, N, d] (q already scaled; `bias` None or broadcast to
  [B, H, N, N] and given its gradient too: Swin's relative position table), with
  `_attention_backward` as its gradient: on XLA's CPU backend the ViT-S/14 global crops'
  attention took 20% less time forward and backward than with the softmax's own gradient."""
  return _attention_forward(q, k, v, bias)[0]


def _softmax_attention_forward(q, k, v, bias):
  out, residuals = _attention_forward(q, k, v, bias)
  return out, (residuals, bias)


def _softmax_attention_backward(residuals, d_out):
  residuals, bias = residuals
  dq, dk, dv, d_logits = _attention_backward(residuals, d_out)
  return dq, dk, dv, None if bias is None else sum_to_shape(d_logits, bias.shape).astype(bias.dtype)


softmax_attention.defvjp(_softmax_attention_forward, _softmax_attention_backward)
