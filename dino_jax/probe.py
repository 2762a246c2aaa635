"""Linear probe on frozen features (DINO Sec. 4.1 linear evaluation, on fixed features).

A softmax classifier per learning rate of a sweep, all trained at once (vmapped): SGD with
momentum 0.9 and cosine decay on standardized features; the learning rate with the best
accuracy on a held-out slice of the training set is reported with its test accuracy.
"""
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
