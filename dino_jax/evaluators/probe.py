"""Linear classifiers on frozen features.

`linear_probe`: the fast probe on fixed features (the online monitor; DINO Sec. 4.1's linear
evaluation without augmentation). A softmax classifier per learning rate of a sweep, all
trained at once (vmapped): SGD with momentum 0.9 and cosine decay on standardized features;
the learning rate with the best accuracy on a held-out slice of the training set is reported
with its test accuracy.

The rest: the pieces of the papers' linear evaluation protocols on a frozen backbone, which
`dino_jax.evaluators.LinearEvaluator` runs on augmented images (a backbone forward on every
batch):

  DINO (Caron et al. 2021, Sec. 4.1 and App.; `eval_linear.py`): the input is the CLS tokens of the last
    `n_last_blocks` blocks (4 for ViT-S, 1 for ViT-B), each through the final norm,
    concatenated, and for ViT-B (`avgpool_patchtokens`) the average of the last block's patch
    tokens; one linear layer (weights N(0, 0.01²), bias 0), SGD momentum 0.9, no weight decay,
    lr `lr * batch / 256` with a cosine decay to 0 stepped per epoch, 100 epochs.
  DINOv2 (Oquab et al. 2023, linear evaluation; `dinov2/eval/linear.py`): the same inputs over
    a grid, {last 1, last 4 blocks} x {with, without the patch-token average}, times a sweep
    of 13 learning rates from 1e-5 to 0.1 (scaled by batch / 256), every classifier trained
    at once on the same features, cosine decay per iteration; each one's accuracy is
    reported and the best.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

LEARNING_RATES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"))
def _fit(x, y, lrs, key, *, num_classes, epochs, batch_size):
  """Weights [L, D, C] and biases [L, C] of one classifier per learning rate."""
  n, d = x.shape
  steps_per_epoch = max(n // batch_size, 1)
  batch_size = min(batch_size, n)

  def make_tx(lr):
    return optax.sgd(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch), momentum=0.9)

  def loss_fn(params, xb, yb):
    logits = xb @ params["w"] + params["b"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  def train_one(lr):
    tx = make_tx(lr)
    params = {"w": jnp.zeros((d, num_classes)), "b": jnp.zeros((num_classes,))}

    def epoch(carry, k):
      params, opt_state = carry
      order = jax.random.permutation(k, n)[:steps_per_epoch * batch_size].reshape(steps_per_epoch, batch_size)

      def step(carry, idx):
        params, opt_state = carry
        grads = jax.grad(loss_fn)(params, x[idx], y[idx])
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

      return jax.lax.scan(step, (params, opt_state), order)[0], None

    (params, _), _ = jax.lax.scan(epoch, (params, tx.init(params)), jax.random.split(key, epochs))
    return params

  return jax.vmap(train_one)(lrs)


def _accuracy(params, x, y):
  return np.asarray(jnp.mean(jnp.argmax(x @ params["w"] + params["b"][:, None], -1) == y[None], axis=-1))


def linear_probe(train_x, train_y, test_x, test_y, num_classes: int, learning_rates=LEARNING_RATES,
                 epochs: int = 100, batch_size: int = 256, val_fraction: float = 0.1, seed: int = 0) -> dict:
  """Sweeps `learning_rates`; returns {"test_top1", "best_lr", "val_top1": {lr: acc}}."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  standardize = lambda a: jnp.asarray((a - mean) / std, jnp.float32)
  order = np.random.default_rng(seed).permutation(len(train_x))
  n_val = max(int(len(train_x) * val_fraction), 1)
  val, fit = order[:n_val], order[n_val:]
  x, y = standardize(train_x), jnp.asarray(train_y)
  params = _fit(x[fit], y[fit], jnp.asarray(learning_rates, jnp.float32), jax.random.PRNGKey(seed),
                num_classes=num_classes, epochs=epochs, batch_size=batch_size)
  val_acc = _accuracy(params, x[val], y[val])
  best = int(np.argmax(val_acc))
  test_acc = _accuracy(jax.tree.map(lambda p: p[best:best + 1], params), standardize(test_x), jnp.asarray(test_y))
  return {"test_top1": float(test_acc[0]), "best_lr": float(learning_rates[best]),
          "val_top1": {float(lr): float(a) for lr, a in zip(learning_rates, val_acc)}}


# ---------------------------------------------------------------------------------------
# The linear evaluation protocols (DINO eval_linear.py, DINOv2 eval/linear.py).
# ---------------------------------------------------------------------------------------

PROTOCOLS = ("dino", "dinov2")
DINOV2_LEARNING_RATES = (1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1)
DINOV2_GRID_BLOCKS = (1, 4)


@dataclasses.dataclass(frozen=True)
class Variant:
  """One classifier input: the CLS tokens ("embedding") of the last `blocks` blocks,
  concatenated, and with `avgpool` the last block's patch tokens averaged, appended."""
  blocks: int
  avgpool: bool

  @property
  def name(self) -> str:
    return f"last{self.blocks}" + ("_avgpool" if self.avgpool else "")


def protocol_variants(protocol: str, n_last_blocks: int = 4, avgpool: bool = False,
                      grid_blocks=DINOV2_GRID_BLOCKS, cls_token: bool = True) -> tuple[Variant, ...]:
  """The inputs a protocol trains classifiers on: DINO's one (`n_last_blocks`, `avgpool`), or
  DINOv2's grid `grid_blocks` x {without, with avgpool}. A backbone without a CLS token (Swin,
  whose embedding is the average of its tokens): with DINO's protocol the last `n_last_blocks`
  blocks' averages, as EsViT's eval_linear.py concatenates them (only the last stage's through
  the final norm; 4 for Swin-T: 2304 features), with DINOv2's its embedding."""
  if not cls_token:
    return (Variant(int(n_last_blocks) if protocol == "dino" else 1, False),)
  if protocol == "dino":
    return (Variant(int(n_last_blocks), bool(avgpool)),)
  return tuple(Variant(int(n), pool) for n in grid_blocks for pool in (False, True))


def linear_inputs(out: dict, variants) -> dict:
  """{variant name: [B, D_v]} from a backbone output with "intermediate" (`layers=` at least
  the most blocks a variant uses): the blocks' "embedding" (CLS token after the final norm)
  concatenated oldest first, then the last block's "patch" tokens averaged."""
  blocks = out["intermediate"]
  feats = {}
  for v in variants:
    parts = [b["embedding"] for b in blocks[len(blocks) - v.blocks:]]
    if v.avgpool:
      parts.append(jnp.mean(blocks[-1]["patch"], axis=(1, 2)))
    feats[v.name] = jnp.concatenate(parts, axis=-1).astype(jnp.float32)
  return feats


def init_classifiers(key, dims: dict, num_lrs: int, num_classes: int) -> dict:
  """{variant: {"w": [L, D_v, C] ~ N(0, 0.01²), "b": [L, C] zeros}}: one linear layer per
  learning rate of the sweep and per input (as both protocols initialize them)."""
  keys = jax.random.split(key, len(dims))
  return {name: {"w": 0.01 * jax.random.normal(k, (num_lrs, d, num_classes), jnp.float32),
                 "b": jnp.zeros((num_lrs, num_classes), jnp.float32)}
          for k, (name, d) in zip(keys, sorted(dims.items()))}


def classifier_logits(params: dict, feats: dict) -> dict:
  """{variant: [L, B, C]}: every classifier's logits on its input."""
  return {name: jnp.einsum("bd,ldc->lbc", feats[name], p["w"]) + p["b"][:, None] for name, p in params.items()}


def classifiers_loss(params: dict, feats: dict, labels) -> jax.Array:
  """The sum over all classifiers of each one's mean cross-entropy over the batch's labelled
  rows (label >= 0): the classifiers share no parameter, so each gets its own gradient."""
  weight = (labels >= 0).astype(jnp.float32)
  total = 0.0
  for logits in classifier_logits(params, feats).values():
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0)[None])
    total += jnp.sum(ce * weight) / jnp.maximum(jnp.sum(weight), 1.0)
  return total


def cosine_factor(step, steps_per_epoch: int, epochs: int, per_epoch: bool):
  """Cosine annealing of the lr to 0 (torch's CosineAnnealingLR, eta_min 0): over epochs,
  stepped once an epoch (DINO), or over the iterations (DINOv2)."""
  progress = (step // steps_per_epoch) / epochs if per_epoch else step / (steps_per_epoch * epochs)
  return 0.5 * (1.0 + jnp.cos(jnp.pi * progress))


def sgd_momentum(params: dict, momentum: dict, grads: dict, lrs, beta: float = 0.9) -> tuple[dict, dict]:
  """torch.optim.SGD (momentum `beta`, no dampening or weight decay) with learning rate
  lrs[l] for classifier l (the leading axis of every leaf)."""
  momentum = jax.tree.map(lambda m, g: beta * m + g, momentum, grads)
  params = jax.tree.map(lambda p, m: p - lrs.reshape((-1,) + (1,) * (p.ndim - 1)) * m, params, momentum)
  return params, momentum


def correct_counts(params: dict, feats: dict, labels) -> dict:
  """{variant: [L]} the number of labelled rows (label >= 0) each classifier gets right."""
  ok = labels >= 0
  return {name: jnp.sum((jnp.argmax(logits, -1) == labels[None]) & ok[None], axis=-1)
          for name, logits in classifier_logits(params, feats).items()}
