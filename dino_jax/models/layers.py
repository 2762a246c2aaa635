"""Building blocks shared by the backbones: FFNs, LayerScale, stochastic depth, remat policies."""
import flax.linen as nn
import jax
import jax.numpy as jnp


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
    x = nn.Dense(self.hidden, dtype=self.dtype, name="fc1")(x)
    return nn.Dense(d, dtype=self.dtype, name="fc2")(gelu(x))


class SwiGLU(nn.Module):
  """SwiGLU FFN (Shazeer 2020): W3(silu(W1 x) * W2 x)."""
  hidden: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    x12 = nn.Dense(2 * self.hidden, dtype=self.dtype, name="w12")(x)
    x1, x2 = jnp.split(x12, 2, axis=-1)
    return nn.Dense(d, dtype=self.dtype, name="w3")(nn.silu(x1) * x2)


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


def subset_drop_path(x, branch, rate: float, rng, batch_sharding=None):
  """x + stochastic-depth branch(x) computing the branch only for the kept samples (DINOv2's
  form for rates above 0.1). Each batch shard (device) of `batch_sharding` (one shard when
  None) draws a random k = max(int(n (1 - rate)), 1) of its n samples; they go through
  `branch` and their outputs are added back scaled by n / k. The subsets stay on their devices."""
  groups = 1 if batch_sharding is None else batch_sharding.mesh.size
  local = lambda a: a if batch_sharding is None else jax.lax.with_sharding_constraint(a, batch_sharding)
  n = x.shape[0] // groups
  k = max(int(n * (1.0 - rate)), 1)
  order = jnp.argsort(jax.random.uniform(rng, (groups, n)), axis=1)[:, :k]
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




def residual(x, branch, rate: float, deterministic: bool, make_rng, batch_sharding=None):
  """x + branch(x) with stochastic depth at `rate`: DINOv2's kept-subset form above 0.1
  (`subset_drop_path`), the per-sample mask otherwise. Call inside a compact module;
  `make_rng` is that module's."""
  if not deterministic and rate > 0.1:
    return subset_drop_path(x, branch, rate, make_rng("dropout"), batch_sharding)
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
  [B, H, N, N] logits. "xla": written out with the heads before the tokens, logits and
  softmax in float32 as `jax.nn.dot_product_attention` computes them (this layout ran the
  DINO ViT-S/16 CPU step 6–8% faster than that function's); "cudnn": cuDNN's fused kernel, to
  which an odd N goes padded to even (`padded_to_even`)."""
  if implementation == "cudnn":
    if q.shape[1] % 2:
      return padded_to_even(q, k, v, bias, "cudnn")
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="cudnn")
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  if bias is not None:
    logits = logits + bias
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bhkd->bhqd", probs, v).transpose(0, 2, 1, 3)
