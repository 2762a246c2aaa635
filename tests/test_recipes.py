"""The published recipes' optimizer details against the official code's rules, each computed
independently here: DINO's `utils.cosine_scheduler` / `clip_gradients` / `get_params_groups`
and its per-epoch teacher temperature (facebookresearch/dino), DINOv2's `CosineScheduler`,
`sqrt_wrt_1024` lr rule, `get_params_groups_with_decay` and per-module `clip_grad_norm_`
(facebookresearch/dinov2)."""
import importlib
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import dino_vits16
from configs import dinov2_vits14
from dino_jax import convert
from dino_jax import learner
from dino_jax import optim
from dino_jax import trainer
from dino_jax.errors import UsageError
from dino_jax.models import vit
from tests import torch_step_reference
from tests.test_train import run_cli
from tests.test_train import tiny


def dino_cosine_scheduler(base, final, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0.0):
  """DINO's utils.cosine_scheduler (one value per iteration)."""
  warmup = np.linspace(start_warmup_value, base, warmup_epochs * niter_per_ep) if warmup_epochs else np.array([])
  iters = np.arange(epochs * niter_per_ep - len(warmup))
  return np.concatenate([warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])


def dinov2_cosine_scheduler(base, final, total_iters, warmup_iters=0, start_warmup_value=0.0):
  """DINOv2's CosineScheduler as a function of the iteration (final_value from total_iters on)."""
  warmup = np.linspace(start_warmup_value, base, warmup_iters)
  iters = np.arange(total_iters - warmup_iters)
  schedule = np.concatenate([warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])
  return lambda it: final if it >= total_iters else schedule[it]


def values(schedule, n):
  return np.array(jax.vmap(schedule)(jnp.arange(n)))


def test_dino_schedules_equal_the_official_formulas():
  cfg = dino_vits16.get_config()
  cfg.update(epochs=12.0, batch_size=512)
  cfg.optim.warmup_epochs = 3.0
  cfg.loss.update(teacher_temp=(0.04, 0.07), teacher_temp_warmup_epochs=5.0)
  per_epoch, epochs = 7, 12
  s = optim.make_schedules(cfg, per_epoch)
  lr = dino_cosine_scheduler(cfg.optim.base_lr * 512 / 256., cfg.optim.min_lr, epochs, per_epoch, 3)
  np.testing.assert_allclose(values(s["lr"], epochs * per_epoch), lr, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(values(s["weight_decay"], epochs * per_epoch),
                             dino_cosine_scheduler(0.04, 0.4, epochs, per_epoch), rtol=1e-5)
  np.testing.assert_allclose(values(s["momentum"], epochs * per_epoch),
                             dino_cosine_scheduler(0.996, 1.0, epochs, per_epoch), rtol=1e-6)
  # main_dino.DINOLoss: np.linspace(0.04, 0.07, 5) then 0.07, indexed by the epoch.
  temps = np.concatenate([np.linspace(0.04, 0.07, 5), np.full(epochs - 5, 0.07)])
  np.testing.assert_allclose(values(s["teacher_temp"], epochs * per_epoch), np.repeat(temps, per_epoch), rtol=1e-6)


def test_dinov2_schedules_equal_the_official_formulas():
  cfg = dinov2_vits14.get_config()
  cfg.update(epochs=6.0, batch_size=2048)
  cfg.optim.warmup_epochs = 2.0
  cfg.loss.teacher_temp_warmup_epochs = 3.0
  per_epoch = cfg.epoch_length
  assert per_epoch == 1250  # OFFICIAL_EPOCH_LENGTH
  total = 6 * per_epoch
  s = optim.make_schedules(cfg, per_epoch)
  base_lr = 0.004 * math.sqrt(2048 / 1024)  # apply_scaling_rules_to_cfg, sqrt_wrt_1024
  official = {
      "lr": dinov2_cosine_scheduler(base_lr, 1e-6, total, 2 * per_epoch),
      "weight_decay": dinov2_cosine_scheduler(0.04, 0.4, total),
      "momentum": dinov2_cosine_scheduler(0.994, 1.0, total),
      "teacher_temp": dinov2_cosine_scheduler(0.07, 0.07, 3 * per_epoch, 3 * per_epoch, 0.04),
  }
  steps = np.arange(total + 10)
  for name, ref in official.items():
    np.testing.assert_allclose(values(s[name], len(steps)), [ref(i) for i in steps], rtol=2e-5, atol=1e-9,
                               err_msg=name)


def test_recipes_say_their_rules():
  dino, dinov2 = dino_vits16.get_config(), dinov2_vits14.get_config()
  assert (dino.optim.lr_scaling, dino.optim.clip_mode, dino.loss.teacher_temp_steps, dino.epoch_length,
          dino.model.drop_path_uniform) == ("linear_256", "per_tensor", "per_epoch", 0, False)
  assert (dinov2.optim.lr_scaling, dinov2.optim.clip_mode, dinov2.loss.teacher_temp_steps, dinov2.epoch_length,
          dinov2.model.drop_path_uniform, dinov2.head.norm_last_layer) == (
              "sqrt_1024", "per_module", "per_step", 1250, True, False)
  assert optim.peak_lr(dinov2) == pytest.approx(0.004 * math.sqrt(dinov2.batch_size / 1024))
  assert optim.peak_lr(dino) == pytest.approx(5e-4 * dino.batch_size / 256)


# The DINO runs' published arguments (`main_dino.py` flags; the README command for the 100-epoch
# run, whose other flags are main_dino's defaults). world_size: GPUs (ViT-S/8's: dino issue #104).
DINO_DEFAULTS = dict(arch="vit_small", patch_size=16, epochs=100, batch_size_per_gpu=64, world_size=8, lr=5e-4,
                     min_lr=1e-6, warmup_epochs=10, weight_decay=0.04, weight_decay_end=0.4, clip_grad=3.0,
                     warmup_teacher_temp=0.04, teacher_temp=0.04, warmup_teacher_temp_epochs=0,
                     norm_last_layer=True, freeze_last_layer=1, momentum_teacher=0.996, drop_path_rate=0.1,
                     local_crops_number=8, global_crops_scale=(0.4, 1.0), local_crops_scale=(0.05, 0.4), out_dim=65536)
DINO_RUNS = {
    "dino_vits16": {},
    "dino_vits16_300ep": dict(epochs=300, world_size=16, teacher_temp=0.07, warmup_teacher_temp_epochs=30,
                              norm_last_layer=False),
    "dino_vits8": dict(patch_size=8, epochs=800, batch_size_per_gpu=16, world_size=64, teacher_temp=0.07,
                       warmup_teacher_temp_epochs=30, norm_last_layer=False, local_crops_number=10),
    "dino_vitb16": dict(arch="vit_base", epochs=400, batch_size_per_gpu=32, world_size=32, lr=7.5e-4, min_lr=2e-6,
                        clip_grad=0.3, teacher_temp=0.07, warmup_teacher_temp_epochs=50, freeze_last_layer=3,
                        local_crops_number=10, global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25)),
    "dino_vitb8": dict(arch="vit_base", patch_size=8, epochs=300, batch_size_per_gpu=6, world_size=176, min_lr=2e-6,
                       warmup_teacher_temp=0.03, teacher_temp=0.07, warmup_teacher_temp_epochs=50,
                       freeze_last_layer=3, local_crops_number=10, global_crops_scale=(0.25, 1.0),
                       local_crops_scale=(0.05, 0.25)),
}


@pytest.mark.parametrize("name", sorted(DINO_RUNS))
def test_dino_recipe_is_its_published_arguments(name):
  a = dict(DINO_DEFAULTS, **DINO_RUNS[name])
  c = importlib.import_module(f"configs.{name}").get_config()
  # main_dino's vit_small / vit_base: (width, depth, heads, MLP width).
  arch = {"vit_small": (384, 12, 6, 1536), "vit_base": (768, 12, 12, 3072)}[a["arch"]]
  batch = a["batch_size_per_gpu"] * a["world_size"]
  assert (c.model.width, c.model.depth, c.model.num_heads, c.model.mlp_dim) == arch
  assert (c.model.patch_size, c.model.pos_embed_grid) == (a["patch_size"], 224 // a["patch_size"])
  assert (c.epochs, c.batch_size, c.optim.min_lr, c.optim.warmup_epochs) == (
      a["epochs"], batch, a["min_lr"], a["warmup_epochs"])
  assert optim.peak_lr(c) == pytest.approx(a["lr"] * batch / 256)  # main_dino: lr * batch_size / 256
  assert (c.optim.weight_decay, c.optim.clip_grad, c.optim.clip_mode) == (
      (a["weight_decay"], a["weight_decay_end"]), a["clip_grad"], "per_tensor")
  assert (c.loss.teacher_temp, c.loss.teacher_temp_warmup_epochs, c.loss.teacher_temp_steps) == (
      (a["warmup_teacher_temp"], a["teacher_temp"]), a["warmup_teacher_temp_epochs"], "per_epoch")
  assert (c.head.norm_last_layer, c.optim.freeze_last_layer_epochs, c.optim.teacher_momentum) == (
      a["norm_last_layer"], a["freeze_last_layer"], (a["momentum_teacher"], 1.0))
  assert (c.model.drop_path_rate, c.model.drop_path_uniform, c.head.out_dim) == (
      a["drop_path_rate"], False, a["out_dim"])
  assert (c.aug.num_local, c.aug.global_scale, c.aug.local_scale) == (
      a["local_crops_number"], a["global_crops_scale"], a["local_crops_scale"])
  # eval_linear.py: ViT-S the last 4 CLS tokens, ViT-B the last CLS with average-pooled patch tokens.
  assert (c.evals.linear_dino.n_last_blocks, c.evals.linear_dino.avgpool_patchtokens) == (
      (4, False) if a["arch"] == "vit_small" else (1, True))


def test_dino_resnet50_recipe_is_the_readme_command():
  """The README's ResNet-50 command (`--arch resnet50 --optimizer sgd --lr 0.03 --weight_decay
  1e-4 --weight_decay_end 1e-4 --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14`, 8
  GPUs) on main_dino.py's other defaults: torchvision's ResNet-50, a head without batch norm."""
  from configs import dino_resnet50
  a = dict(DINO_DEFAULTS, lr=0.03, weight_decay=1e-4, weight_decay_end=1e-4, global_crops_scale=(0.14, 1.0),
           local_crops_scale=(0.05, 0.14))
  c = dino_resnet50.get_config()
  batch = a["batch_size_per_gpu"] * a["world_size"]
  assert (c.model.name, c.model.depth, c.model.width, c.optim.name, c.optim.momentum) == ("resnet", 50, 64, "sgd", 0.9)
  assert (c.epochs, c.batch_size, c.optim.min_lr, c.optim.warmup_epochs) == (
      a["epochs"], batch, a["min_lr"], a["warmup_epochs"])
  assert optim.peak_lr(c) == pytest.approx(a["lr"] * batch / 256)
  assert (c.optim.weight_decay, c.optim.clip_grad, c.optim.clip_mode, c.optim.freeze_mode) == (
      (a["weight_decay"], a["weight_decay_end"]), a["clip_grad"], "per_tensor", "skip")
  assert (c.loss.teacher_temp, c.loss.teacher_temp_warmup_epochs, c.loss.centering) == (
      (a["warmup_teacher_temp"], a["teacher_temp"]), a["warmup_teacher_temp_epochs"], "centering")
  assert (c.head.norm_last_layer, c.optim.freeze_last_layer_epochs, c.optim.teacher_momentum, c.head.out_dim) == (
      a["norm_last_layer"], a["freeze_last_layer"], (a["momentum_teacher"], 1.0), a["out_dim"])
  assert (c.aug.num_local, c.aug.global_scale, c.aug.local_scale) == (
      a["local_crops_number"], a["global_crops_scale"], a["local_crops_scale"])


# ---------------------------------------------------------------------------------------
# Clipping against torch.
# ---------------------------------------------------------------------------------------


def random_grads():
  rng = np.random.default_rng(0)
  g = lambda scale, *shape: (scale * rng.normal(size=shape)).astype(np.float32)
  return {"backbone": {"a": g(3.0, 5, 4), "b": g(0.01, 4), "c": g(1.0, 2, 3, 4)},
          "head": {"mlp0": g(0.2, 6, 6), "last_layer": g(5.0, 6, 8)},
          "ibot_head": {"last_layer": g(0.05, 6, 8)}}


def torch_tensors(tree):
  return {k: torch.from_numpy(np.array(v)) for k, v in
          {optim.path_name(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}.items()}


def clipped(mode, grads):
  tx = optim.clip_gradients(mode, 3.0)
  out, _ = tx.update(jax.tree.map(jnp.asarray, grads), tx.init(grads))
  return {optim.path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(out)}


def test_per_tensor_clipping_is_dinos_clip_gradients():
  grads = random_grads()
  ref = torch_tensors(grads)
  for g in ref.values():  # DINO utils.clip_gradients, on .grad tensors
    clip_coef = 3.0 / (g.norm(2) + 1e-6)
    if clip_coef < 1:
      g.mul_(clip_coef)
  ours = clipped("per_tensor", grads)
  for name, g in ref.items():
    np.testing.assert_allclose(ours[name], g.numpy(), rtol=1e-6, err_msg=name)
  assert not np.allclose(ours["head/last_layer"], grads["head"]["last_layer"])  # was clipped
  np.testing.assert_array_equal(ours["backbone/b"], grads["backbone"]["b"])  # was not


@pytest.mark.parametrize("mode", ["per_module", "global"])
def test_module_and_global_clipping_are_torch_clip_grad_norm(mode):
  grads = random_grads()
  ref = torch_tensors(grads)
  groups = [[n for n in ref if n.startswith(m + "/")] for m in grads] if mode == "per_module" else [list(ref)]
  for group in groups:  # DINOv2: clip_grad_norm_ on each of the student's modules
    params = [torch.nn.Parameter(torch.zeros_like(ref[n])) for n in group]
    for p, n in zip(params, group):
      p.grad = ref[n].clone()
    torch.nn.utils.clip_grad_norm_(params, 3.0)
    for p, n in zip(params, group):
      ref[n] = p.grad
  ours = clipped(mode, grads)
  for name, g in ref.items():
    np.testing.assert_allclose(ours[name], g.numpy(), rtol=2e-6, err_msg=name)


# ---------------------------------------------------------------------------------------
# Parameter groups against the official rules, on the same architecture.
# ---------------------------------------------------------------------------------------


def torch_names(params, cfg) -> dict[str, tuple[str, tuple]]:
  """flax path -> (the official module's parameter name, its torch shape), for the backbone
  (DinoVisionTransformer names, via the converter's table) and the heads (DINOHead)."""
  m = cfg.model
  arch = convert.Arch(m.patch_size, m.width, m.depth, m.num_heads, m.mlp_dim, m.ffn, m.num_registers, m.layerscale)
  state = convert.to_torch(jax.device_get(params["backbone"]), arch)
  table = {f: t for f, t, _, _ in convert.backbone_table(arch, "official")}
  table |= {k: k for k in ("pos_embed", "cls_token", "mask_token", "register_tokens")}
  table["cls_pos_embed"] = "pos_embed"  # the official pos_embed's CLS slot
  names = {}
  for path, _ in jax.tree_util.tree_leaves_with_path(params["backbone"]):
    flax = optim.path_name(path)
    names[f"backbone/{flax}"] = (table[flax], tuple(state[table[flax]].shape))
  for head in ("head", "ibot_head"):
    for path, x in jax.tree_util.tree_leaves_with_path(params.get(head, {})):
      flax = optim.path_name(path)
      if flax.startswith("mlp"):
        layer, kind = flax.split("/")
        name = f"mlp.{2 * int(layer[3:])}.{'weight' if kind == 'kernel' else 'bias'}"
        shape = x.shape[::-1]
      else:
        name = {"last_layer": "last_layer.weight_v", "last_layer_gain": "last_layer.weight_g"}[flax]
        shape = x.shape[::-1]  # [K, bottleneck] and [K, 1]
      names[f"{head}/{flax}"] = (f"{head}:{name}", shape)
  return names


def test_lr_and_weight_decay_multipliers_follow_the_official_parameter_groups():
  cfg = dinov2_vits14.get_config("tiny")
  cfg.model.update(num_registers=2, depth=3)
  cfg.optim.update(layer_decay=0.8, patch_embed_lr_mult=0.2)
  trainer_model = learner.make_model(cfg)
  params = learner.init_state(cfg, trainer_model, optim.make_optimizer(
      cfg, optim.make_schedules(cfg, 10), 10, trainer_model.backbone))["params"]
  decay = {optim.path_name(p): bool(d) for p, d in jax.tree_util.tree_leaves_with_path(optim.weight_decay_mask(params))}
  names = torch_names(params, cfg)
  assert "head/last_layer_gain" in names and "backbone/register_tokens" in names and "backbone/mask_token" in names
  for flax, (name, shape) in names.items():
    module, _, torch_name = name.rpartition(":")
    lr = optim.layer_lr_multiplier(flax, trainer_model.backbone, 0.8, 0.2)
    if module:  # a head: get_vit_lr_decay_rate with n_blocks = 0 -> 1
      expected_lr = 1.0
    else:
      expected_lr = torch_step_reference.dino_vit_lr_decay_rate(torch_name, 0.8, cfg.model.depth)
      expected_lr *= 0.2 if "patch_embed" in torch_name else 1.0
    assert lr == pytest.approx(expected_lr, rel=1e-12), flax
    dinov2_wd = not (torch_name.endswith(".bias") or "norm" in torch_name or "gamma" in torch_name)
    dino_wd = not (torch_name.endswith(".bias") or len(shape) == 1)  # utils.get_params_groups
    assert decay[flax] == dinov2_wd == dino_wd, (flax, torch_name, shape)


# ---------------------------------------------------------------------------------------
# Stochastic depth, the trainable gain, the epoch length.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("uniform", [True, False])
def test_stochastic_depth_uniform_or_linear(uniform):
  """DINOv2's drop_path_uniform drops every block's residual at the rate; DINO's rises
  linearly (torch.linspace(0, rate, depth)): measured as the share of dropped residuals."""
  cfg = dinov2_vits14.get_config("tiny")
  cfg.model.update(depth=3, drop_path_rate=0.5, drop_path_uniform=uniform)
  module = vit.ViT.from_config(cfg.model)
  x = jnp.zeros((4096, 4, 4, 3))
  seen = []

  def record(mdl, inputs, kwargs, out):
    del mdl, kwargs
    seen.append(float(jnp.mean(jnp.all(out == inputs[0], axis=(1, 2)))))  # residual dropped: x unchanged
    return out
  params = module.init(jax.random.PRNGKey(0), x[:1])["params"]
  params = jax.tree.map(lambda p: p + 0.1, params)  # every branch non-zero
  with nn.intercept_methods(lambda f, args, kwargs, ctx: record(ctx.module, args, kwargs, f(*args, **kwargs))
                            if isinstance(ctx.module, vit.Block) and ctx.method_name == "__call__" else
                            f(*args, **kwargs)):
    module.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
  expected = [0.25] * 3 if uniform else [0.0, 0.0625, 0.25]  # both branches dropped: rate ** 2
  np.testing.assert_allclose(seen, expected, atol=0.03)


def test_trainable_gain_is_frozen_with_the_last_layer_then_learns():
  cfg = dino_vits16.get_config("tiny")
  cfg.head.norm_last_layer = False
  model = learner.make_model(cfg)
  tx = optim.make_optimizer(cfg, optim.make_schedules(cfg, 10), 10, model.backbone)
  state = learner.init_state(cfg, model, tx)
  gain = state["params"]["head"]["last_layer_gain"]
  np.testing.assert_array_equal(gain, 1.0)
  grads = jax.tree.map(jnp.ones_like, state["params"])
  opt_state, params = state["opt_state"], state["params"]
  history = []
  for _ in range(int(cfg.optim.freeze_last_layer_epochs * 10) + 2):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    history.append(np.asarray(params["head"]["last_layer_gain"]).copy())
  frozen = int(cfg.optim.freeze_last_layer_epochs * 10)
  np.testing.assert_array_equal(history[frozen - 1], 1.0)
  assert np.all(history[-1] < 1.0)  # moves (down the all-ones gradient) once unfrozen


def test_epoch_length_sets_the_schedule_and_bad_values_are_one_error(tmp_path):
  cfg = tiny(dinov2_vits14, steps=3)
  cfg.update(epoch_length=3, epochs=1.0)  # 1 epoch = 3 steps, whatever the data's size
  out = trainer.train(cfg, str(tmp_path / "run"))
  assert int(out["state"]["step"]) == 3
  cfg.epoch_length = -1
  with pytest.raises(UsageError, match="epoch_length must be 0"):
    trainer.train(cfg, str(tmp_path / "bad"))
  cfg.epoch_length, cfg.optim.clip_mode = 0, "per_layer"
  with pytest.raises(UsageError, match="optim.clip_mode must be one of per_tensor, per_module, global"):
    trainer.train(cfg, str(tmp_path / "bad2"))


# ---------------------------------------------------------------------------------------
# Every recipe's :tiny variant trains through the command line.
# ---------------------------------------------------------------------------------------

RECIPES = ["dino_vits16", "dino_vits16_300ep", "dino_vits8", "dino_vitb16", "dino_vitb8", "dinov2_vitl16_short",
           "dinov2_vitg14", "dinov2_vits14", "esvit_swin_t", "dino_resnet50"]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_tiny_variant_trains_through_the_cli(name, tmp_path):
  proc = run_cli("--config", f"configs/{name}.py:tiny", "--config.data.source=fashion_mnist_demo",
                 "--config.data.train_split=train", "--config.epochs=0.0032", "--config.evals.knn.every_steps=-1",
                 workdir=tmp_path)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-2000:]
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["step"] == 2 and np.isfinite(rows[-1]["loss"]), out


def test_recipe_heads():
  from configs import dino_vits16_300ep
  from configs import dinov2_vitg14
  from configs import dinov2_vitl16_short
  assert dino_vits16_300ep.get_config().head.norm_last_layer is False
  short = dinov2_vitl16_short.get_config()
  assert short.head.share_ibot_head and short.loss.centering == "centering" and short.model.patch_size == 16
  model = learner.make_model(dinov2_vitg14.get_config("tiny"))
  assert (model.head.bottleneck_dim, model.ibot_head.bottleneck_dim) == (16, 8)  # the giant's 384 / 256, shrunk


# ---------------------------------------------------------------------------------------
# iBOT on any mask the generator makes: the padded token slots lose nothing.
# ---------------------------------------------------------------------------------------


def test_generated_masks_never_exceed_the_static_token_slots():
  """Every group of consecutive images (one per device) fits its slots, the masks drawn in runs
  of `stratum` images (one official GPU's global crops), from one group of the whole batch to
  one image per group, runs that divide the groups, that the groups divide, and neither; one
  group needs about a third of the per-image slots."""
  from dino_jax import masking
  cfg = dinov2_vits14.get_config().mask
  for grid in ((4, 4), (16, 16), (7, 9)):
    n = grid[0] * grid[1]
    for images, stratum, groups in ((64, 64, (1, 2, 8, 64)), (64, 16, (1, 2, 8, 64)), (48, 12, (3, 4, 48))):
      for g in groups:
        bound = masking.max_masked_per_group(images, g, n, cfg, stratum)
        for seed in range(30):
          rng = np.random.default_rng(seed)
          masks = np.concatenate([masking.batch_masks(rng, stratum, grid, cfg) for _ in range(images // stratum)])
          assert masks.reshape(g, -1).sum(1).max() <= bound
  assert masking.max_masked_per_group(16, 16, 256, cfg, 16) == 128  # one image: its stratum's top ratio, 0.5
  assert masking.max_masked_per_group(16, 1, 256, cfg, 16) == sum(int(256 * r) for r in np.linspace(0.1, 0.5, 9)[1:])
  assert masking.max_masked_per_group(16, 1, 256, cfg, 16) < 0.35 * 16 * 128  # 665 slots instead of 2048


@pytest.mark.parametrize("groups", [1, 5])
def test_ibot_loss_on_padded_slots_equals_the_dense_reference(groups):
  """The iBOT term from the padded masked-token slots (`masking.masked_token_index`) equals a
  dense computation over every patch token weighted by the mask (DINOv2's iBOTPatchLoss:
  per image the mean over its masked tokens, summed, divided by the number of images), for
  masks from none to the largest the generator makes."""
  from dino_jax import losses
  from dino_jax import masking
  cfg = dinov2_vits14.get_config("tiny")
  model = learner.make_model(cfg)
  grid = model.backbone.grid(16)
  n = grid[0] * grid[1]
  bound = int(n * cfg.mask.mask_ratio[1])  # the most the generator puts on one image
  rng = np.random.default_rng(0)
  masks = np.zeros((5, n), bool)
  masks[1, 3] = True
  masks[2, rng.choice(n, bound, replace=False)] = True  # the most the generator makes
  masks[3] = masking.block_mask(rng, grid, 5).reshape(-1)
  masks[4, rng.choice(n, bound - 1, replace=False)] = True
  images = jnp.asarray(rng.normal(size=(5, 16, 16, 3)).astype(np.float32))
  params = model.init(jax.random.PRNGKey(0), images[:1], mask=jnp.asarray(masks[:1]),
                      patch_index=jnp.zeros((1, 1), jnp.int32))["params"]
  params = jax.tree.map(lambda p: p + 0.02 * jax.random.normal(jax.random.PRNGKey(1), p.shape), params)
  temp, student_temp = 0.05, cfg.loss.student_temp

  slots = masks.reshape(groups, -1).sum(1).max() + 2  # with padding in every group
  index, weights, _ = masking.masked_token_index(jnp.asarray(masks), groups, slots)
  student = model.apply({"params": params}, images, mask=jnp.asarray(masks), patch_index=index)["patch_logits"]
  teacher = model.apply({"params": params}, images, patch_index=index)["patch_logits"]
  padded = losses.ibot_patch_loss(student.reshape(-1, student.shape[-1]),
                                  jax.nn.softmax(teacher.reshape(-1, teacher.shape[-1]) / temp), weights, 5,
                                  student_temp)

  every = jnp.broadcast_to(jnp.arange(n), (5, n))
  s_all = np.asarray(model.apply({"params": params}, images, mask=jnp.asarray(masks), patch_index=every)["patch_logits"],
                     np.float64)
  t_all = np.asarray(model.apply({"params": params}, images, patch_index=every)["patch_logits"], np.float64)
  log_p = s_all / student_temp - np.log(np.exp(s_all / student_temp).sum(-1, keepdims=True))
  t = np.exp(t_all / temp - (t_all / temp).max(-1, keepdims=True))
  ce = -np.sum(t / t.sum(-1, keepdims=True) * log_p, -1)  # [5, n]
  dense = sum(ce[i][masks[i]].mean() for i in range(5) if masks[i].any()) / 5
  np.testing.assert_allclose(float(padded), dense, rtol=1e-5)


@pytest.mark.parametrize("mode", ["skip", "zero_lr"])
def test_last_layer_freeze_equals_torch_adamw(mode):
  """DINO (`skip`): the last layer's gradients are dropped during the freeze (p.grad = None),
  so torch's AdamW leaves it, its moments and its step count alone; DINOv2 (`zero_lr`): its lr
  is 0 while its moments see the gradients. Five steps, freeze for two, against torch.optim.AdamW."""
  cfg = dino_vits16.get_config("tiny")
  cfg.optim.update(freeze_mode=mode, freeze_last_layer_epochs=0.2, clip_grad=0.0)
  lr, wd, steps = 0.1, 0.04, 5
  schedules = {"lr": lambda step: lr, "weight_decay": lambda step: wd}
  tx = optim.make_optimizer(cfg, schedules, 10, vit.ViT(depth=2))  # freeze: 2 steps
  rng = np.random.default_rng(0)
  params = {"backbone": {"block0": {"mlp": {"fc1": {"kernel": rng.normal(size=(3, 4)).astype(np.float32)}}}},
            "head": {"last_layer": rng.normal(size=(4, 5)).astype(np.float32)}}
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32), params) for _ in range(steps)]
  ours, state = jax.tree.map(jnp.asarray, params), tx.init(params)
  for g in grads:
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, ours)
    ours = jax.tree.map(lambda p, u: p + u, ours, updates)

  names = [("backbone", "block0", "mlp", "fc1", "kernel"), ("head", "last_layer")]
  get = lambda tree, path: tree[path[0]] if len(path) == 1 else get(tree[path[0]], path[1:])
  torch_params = [torch.nn.Parameter(torch.from_numpy(get(params, n).copy())) for n in names]
  last_group = {"params": [torch_params[1]], "lr": lr}
  opt = torch.optim.AdamW([{"params": [torch_params[0]], "lr": lr}, last_group], weight_decay=wd)
  for step, g in enumerate(grads):
    for p, n in zip(torch_params, names):
      p.grad = torch.from_numpy(get(g, n).copy())
    frozen = step < 2
    if frozen and mode == "skip":
      torch_params[1].grad = None  # DINO's cancel_gradients_last_layer
    last_group["lr"] = 0.0 if frozen and mode == "zero_lr" else lr  # DINOv2's last_layer_lr_schedule
    opt.step()
  for p, n in zip(torch_params, names):
    np.testing.assert_allclose(np.asarray(get(ours, n)), p.detach().numpy(), rtol=1e-5, atol=1e-6, err_msg=str(n))
