"""Schedules, EMA, layer-wise lr decay, last-layer freeze, weight-decay mask, and main_dino.py's SGD and LARS."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from configs import demo_fashion_mnist
from dino_jax import optim
from dino_jax.models import ViT

STEPS_PER_EPOCH = 10
VIT2, VIT12 = ViT(depth=2), ViT(depth=12)  # layer ids of a 2- and a 12-block ViT


def _cfg():
  cfg = demo_fashion_mnist.get_config("tiny")
  cfg.epochs = 10.0
  cfg.optim.warmup_epochs = 2
  cfg.optim.min_lr = 1e-6
  cfg.optim.teacher_momentum = (0.996, 1.0)
  cfg.loss.teacher_temp = (0.04, 0.07)
  cfg.loss.teacher_temp_warmup_epochs = 3
  return cfg


def test_lr_schedule_endpoints():
  cfg = _cfg()
  lr = optim.make_schedules(cfg, STEPS_PER_EPOCH)["lr"]
  peak = cfg.optim.base_lr * cfg.batch_size / 256
  total, warmup = 100, 20
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(warmup // 2)), peak * 10 / 19, rtol=1e-5)  # np.linspace(0, peak, 20)
  np.testing.assert_allclose(float(lr(warmup - 1)), peak, rtol=1e-5)
  np.testing.assert_allclose(float(lr(warmup)), peak, rtol=1e-5)
  values = np.array([float(lr(i)) for i in range(total + 1)])
  assert values.argmax() in (warmup - 1, warmup)
  assert np.all(np.diff(values[:warmup]) > 0)
  assert np.all(np.diff(values[warmup:]) <= 1e-12)  # cosine decay afterwards
  np.testing.assert_allclose(values[-1], cfg.optim.min_lr, rtol=1e-3)
  np.testing.assert_allclose(float(lr(total + 50)), cfg.optim.min_lr, rtol=1e-3)
  # Halfway through the cosine: (peak + min) / 2.
  np.testing.assert_allclose(float(lr(warmup + (total - warmup) // 2)),
                             (peak + cfg.optim.min_lr) / 2, rtol=1e-4)


def test_lr_peak_scales_with_batch_size():
  cfg = _cfg()
  cfg.batch_size = 512
  lr = optim.make_schedules(cfg, STEPS_PER_EPOCH)["lr"]
  np.testing.assert_allclose(float(lr(20)), cfg.optim.base_lr * 2, rtol=1e-5)


def test_weight_decay_and_momentum_cosine():
  s = optim.make_schedules(_cfg(), STEPS_PER_EPOCH)
  wd, mom = s["weight_decay"], s["momentum"]
  np.testing.assert_allclose(float(wd(0)), 0.04, rtol=1e-5)
  np.testing.assert_allclose(float(wd(50)), 0.22, rtol=1e-4)
  np.testing.assert_allclose(float(wd(100)), 0.4, rtol=1e-5)
  np.testing.assert_allclose(float(wd(150)), 0.4, rtol=1e-5)
  np.testing.assert_allclose(float(mom(0)), 0.996, rtol=1e-6)
  np.testing.assert_allclose(float(mom(50)), 0.998, rtol=1e-6)
  np.testing.assert_allclose(float(mom(100)), 1.0, rtol=1e-6)
  w = np.array([float(wd(i)) for i in range(101)])
  m = np.array([float(mom(i)) for i in range(101)])
  assert np.all(np.diff(w) > -1e-7) and np.all(np.diff(m) > -1e-7)


def test_teacher_temp_warmup_then_constant():
  cfg = _cfg()
  cfg.loss.teacher_temp_steps = "per_step"
  tt = optim.make_schedules(cfg, STEPS_PER_EPOCH)["teacher_temp"]
  np.testing.assert_allclose(float(tt(0)), 0.04, rtol=1e-6)
  np.testing.assert_allclose(float(tt(29)), 0.07, rtol=1e-5)  # np.linspace(0.04, 0.07, 30)
  np.testing.assert_allclose(float(tt(30)), 0.07, rtol=1e-6)
  np.testing.assert_allclose(float(tt(60)), 0.07, rtol=1e-6)
  np.testing.assert_allclose(float(tt(100)), 0.07, rtol=1e-6)


def test_ema_constant_decay_two_steps():
  tx = optim.ema(0.9)
  state = tx.init({"a": jnp.array([1.0, 2.0]), "b": jnp.array(0.0)})
  avg, state = tx.update({"a": jnp.array([3.0, 2.0]), "b": jnp.array(10.0)}, state)
  np.testing.assert_allclose(avg["a"], [0.9 * 1 + 0.1 * 3, 2.0], rtol=1e-6)
  np.testing.assert_allclose(avg["b"], 1.0, rtol=1e-6)
  avg, state = tx.update({"a": jnp.array([5.0, 0.0]), "b": jnp.array(10.0)}, state)
  np.testing.assert_allclose(avg["a"], [0.9 * 1.2 + 0.1 * 5, 0.9 * 2.0], rtol=1e-6)
  np.testing.assert_allclose(avg["b"], 0.9 * 1.0 + 1.0, rtol=1e-6)
  assert int(state.count) == 2
  np.testing.assert_allclose(state.value["a"], avg["a"])


def test_ema_schedule_decay_two_steps():
  decays = [0.5, 0.8]
  tx = optim.ema(lambda count: jnp.asarray(decays)[count])
  state = tx.init(jnp.array(2.0))
  update = jax.jit(tx.update)
  avg, state = update(jnp.array(4.0), state)
  np.testing.assert_allclose(float(avg), 0.5 * 2 + 0.5 * 4, rtol=1e-6)  # decay(0) = 0.5
  avg, state = update(jnp.array(8.0), state)
  np.testing.assert_allclose(float(avg), 0.8 * 3 + 0.2 * 8, rtol=1e-6)  # decay(1) = 0.8


def test_ema_decay_zero_copies_input():
  tx = optim.ema(0.0)
  avg, _ = tx.update(jnp.array([7.0]), tx.init(jnp.array([1.0])))
  np.testing.assert_allclose(avg, [7.0])


@pytest.mark.parametrize("name,expected", [
    ("backbone/block0/qkv/kernel", 0.5 ** 2),
    ("backbone/block1/mlp/fc1/bias", 0.5 ** 1),
    ("backbone/pos_embed", 0.5 ** 3),
    ("backbone/cls_token", 0.5 ** 3),
    ("backbone/register_tokens", 0.5 ** 3),
    ("backbone/mask_token", 0.5 ** 3),
    ("backbone/patch_embed/kernel", 0.5 ** 3 * 0.2),
    ("backbone/patch_embed/bias", 0.5 ** 3 * 0.2),
    ("backbone/norm/scale", 1.0),
    ("head/mlp0/kernel", 1.0),
    ("head/last_layer", 1.0),
    ("ibot_head/last_layer", 1.0),
])
def test_layer_lr_multiplier(name, expected):
  got = optim.layer_lr_multiplier(name, VIT2, layer_decay=0.5, patch_embed_mult=0.2)
  np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_layer_lr_multiplier_two_digit_block():
  got = optim.layer_lr_multiplier("backbone/block11/proj/kernel", VIT12, layer_decay=0.9,
                                  patch_embed_mult=1.0)
  np.testing.assert_allclose(got, 0.9 ** 1, rtol=1e-12)
  got = optim.layer_lr_multiplier("backbone/block1/proj/kernel", VIT12, layer_decay=0.9,
                                  patch_embed_mult=1.0)
  np.testing.assert_allclose(got, 0.9 ** 11, rtol=1e-12)


def test_freeze_last_layer_only_first_steps():
  tx = optim.freeze_last_layer(2)
  params = {"head": {"last_layer": jnp.ones((3, 4)), "mlp0": {"kernel": jnp.ones((2, 3))}},
            "ibot_head": {"last_layer": jnp.ones((3, 4))},
            "backbone": {"norm": {"scale": jnp.ones(3)}}}
  grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for step in range(4):
    out, state = update(grads, state)
    frozen = step < 2
    for head in ("head", "ibot_head"):
      expect = 0.0 if frozen else 0.5
      np.testing.assert_array_equal(out[head]["last_layer"], expect)
    np.testing.assert_array_equal(out["head"]["mlp0"]["kernel"], 0.5)
    np.testing.assert_array_equal(out["backbone"]["norm"]["scale"], 0.5)


def test_make_optimizer_decay_mask_and_layer_scaling():
  cfg = _cfg()
  cfg.model.depth = 2
  cfg.optim.layer_decay = 0.5
  cfg.optim.patch_embed_lr_mult = 0.2
  lr, wd = 0.1, 0.3
  schedules = {"lr": optax.constant_schedule(lr), "weight_decay": optax.constant_schedule(wd)}
  tx = optim.make_optimizer(cfg, schedules, STEPS_PER_EPOCH, VIT2)
  rng = np.random.default_rng(0)
  f = lambda *shape: jnp.asarray(rng.uniform(0.5, 1.5, size=shape).astype(np.float32))
  params = {
      "backbone": {
          "patch_embed": {"kernel": f(4, 4, 3, 8), "bias": f(8)},
          "pos_embed": f(1, 2, 2, 8),
          "block0": {"mlp": {"fc1": {"kernel": f(8, 16), "bias": f(16)}},
                     "norm1": {"scale": f(8), "bias": f(8)}},
          "block1": {"qkv": {"kernel": f(8, 3, 2, 4), "bias": f(3, 2, 4)}},  # multi-dim bias
          "norm": {"scale": f(8)},
      },
      "head": {"mlp0": {"kernel": f(8, 4), "bias": f(4)}},
  }
  grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)

  def check(path, p, n):
    name = optim.path_name(path)
    if p.ndim == 1 or name.endswith("bias"):  # biases and norms are never decayed
      np.testing.assert_array_equal(n, p, err_msg=name)
    else:
      mult = optim.layer_lr_multiplier(name, VIT2, 0.5, 0.2)
      np.testing.assert_allclose(n, p * (1 - lr * wd * mult), rtol=1e-6, err_msg=name)
      assert np.all(np.asarray(n) < np.asarray(p)), name
  jax.tree_util.tree_map_with_path(check, params, new)
  # The multipliers really differ across the tree (so the check above is not vacuous).
  shrink = lambda a, b: float(jnp.mean(1 - b / a))
  np.testing.assert_allclose(shrink(params["head"]["mlp0"]["kernel"], new["head"]["mlp0"]["kernel"]),
                             lr * wd, rtol=1e-4)
  np.testing.assert_allclose(
      shrink(params["backbone"]["patch_embed"]["kernel"], new["backbone"]["patch_embed"]["kernel"]),
      lr * wd * 0.125 * 0.2, rtol=1e-3)


def test_weight_decay_schedule_starting_at_zero():
  cfg = _cfg()
  cfg.optim.weight_decay = (0.0, 0.1)
  wd = optim.make_schedules(cfg, STEPS_PER_EPOCH)["weight_decay"]
  np.testing.assert_allclose(float(wd(0)), 0.0, atol=1e-8)
  np.testing.assert_allclose(float(wd(50)), 0.05, rtol=1e-4)
  np.testing.assert_allclose(float(wd(100)), 0.1, rtol=1e-5)


def test_teacher_temp_without_warmup_is_final_value():
  cfg = _cfg()
  cfg.loss.teacher_temp_warmup_epochs = 0
  tt = optim.make_schedules(cfg, STEPS_PER_EPOCH)["teacher_temp"]
  np.testing.assert_allclose([float(tt(i)) for i in (0, 10, 100)], 0.07, rtol=1e-6)


class TorchLARS(torch.optim.Optimizer):
  """DINO's utils.LARS as its code reads (a reference for the test): for each parameter not
  1-d, the group's weight decay added to the gradient, then the update scaled by
  eta · |p| / |update| (1 where a norm is 0); momentum on the result; p -= lr · momentum."""

  def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001):
    super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

  @torch.no_grad()
  def step(self):
    for g in self.param_groups:
      for p in g["params"]:
        if p.grad is None:
          continue
        dp = p.grad
        if p.ndim != 1:
          dp = dp.add(p, alpha=g["weight_decay"])
          param_norm, update_norm = torch.norm(p), torch.norm(dp)
          one = torch.ones_like(param_norm)
          q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, g["eta"] * param_norm / update_norm, one), one)
          dp = dp.mul(q)
        state = self.state[p]
        if "mu" not in state:
          state["mu"] = torch.zeros_like(p)
        mu = state["mu"]
        mu.mul_(g["momentum"]).add_(dp)
        p.add_(mu, alpha=-g["lr"])


@pytest.mark.parametrize("name", ["sgd", "lars"])
def test_sgd_and_lars_follow_main_dinos_torch_optimizers(name):
  """main_dino.py's SGD (momentum 0.9) and LARS with its two parameter groups (biases and 1-d
  parameters without weight decay), the lr and weight decay set from their schedules every
  iteration, per-tensor gradient clipping and the last layer skipped (no gradient) while frozen:
  4 steps agree with dino_jax's optimizer within float32 rounding."""
  cfg = _cfg()
  cfg.optim.update(name=name, clip_grad=0.5, clip_mode="per_tensor", freeze_mode="skip", freeze_last_layer_epochs=0.2,
                   layer_decay=1.0, patch_embed_lr_mult=1.0)
  lrs, wds = [0.0, 0.5, 0.3, 0.2], [1e-3, 2e-3, 3e-3, 4e-3]
  schedules = {"lr": lambda step: jnp.asarray(lrs)[step], "weight_decay": lambda step: jnp.asarray(wds)[step]}
  tx = optim.make_optimizer(cfg, schedules, STEPS_PER_EPOCH, VIT2)  # 2 frozen steps
  rng = np.random.default_rng(1)
  shapes = {"w": (5, 4), "b": (4,), "last_layer": (4, 3)}
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  grads = [{k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()} for _ in lrs]
  torch_params = {k: torch.nn.Parameter(torch.tensor(np.asarray(v))) for k, v in params.items()}
  groups = [{"params": [torch_params["w"], torch_params["last_layer"]]}, {"params": [torch_params["b"]],
                                                                          "weight_decay": 0.0}]
  opt = torch.optim.SGD(groups, lr=0, momentum=0.9) if name == "sgd" else TorchLARS(groups)
  state = tx.init(params)
  for step, g in enumerate(grads):
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
    for i, group in enumerate(opt.param_groups):
      group["lr"] = lrs[step]
      if i == 0:
        group["weight_decay"] = wds[step]
    for k, p in torch_params.items():
      p.grad = torch.tensor(np.asarray(g[k]))
      torch.nn.utils.clip_grad_norm_([p], 0.5)  # utils.clip_gradients: each tensor on its own
    if step < 2:
      torch_params["last_layer"].grad = None  # utils.cancel_gradients_last_layer
    opt.step()
  for k, p in torch_params.items():
    np.testing.assert_allclose(params[k], p.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
