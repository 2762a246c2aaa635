"""The learner: the train state and the pure, jitted train step (DINO, iBOT, KoLeo, EsViT's region loss).

  state = init_state(...)          {step, rng, params, opt_state, teacher, centers, counters}
  state, metrics = train_step(state, batch)

`build` puts both on a mesh: the state placed by `sharding.fsdp_spec`, the batch split over
every device, the state donated. Which heads the model has and which losses the step sums
follow from the config (`dino_jax.objectives`). With `distill.teacher` the targets come from a
frozen teacher held outside the state (`dino_jax.distill`) and the state's teacher is the EMA
of the student.
"""
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dino_jax import augment
from dino_jax import distill
from dino_jax import losses
from dino_jax import masking
from dino_jax import models
from dino_jax import objectives
from dino_jax import optim
from dino_jax import sharding

# ---------------------------------------------------------------------------------------
# Model and state.
# ---------------------------------------------------------------------------------------


def make_model(cfg: ml_collections.ConfigDict, batch_sharding=None) -> models.DINOModel:
  """The config's backbone with a DINO head, and the iBOT head (unless shared) and EsViT's
  region head when their objectives are on. With `model.drop_path_mode` "subset" the student
  draws DINOv2's stochastic-depth subsets within each group of `objectives.group_size` images."""
  h = cfg.head
  head = lambda bottleneck=h.bottleneck_dim: models.DINOHead(h.out_dim, h.hidden_dim, bottleneck, h.num_layers,
                                                             h.get("norm_last_layer", True))
  names = objectives.active(cfg)
  separate_ibot = "ibot" in names and not h.share_ibot_head
  subset_groups = None
  if cfg.model.get("drop_path_mode", "sample") == "subset":
    subset_groups = cfg.batch_size // objectives.group_size(cfg)
  return models.DINOModel(models.make_backbone(cfg.model, subset_groups, batch_sharding), head(),
                          head(h.get("ibot_bottleneck_dim", 0) or h.bottleneck_dim) if separate_ibot else None,
                          head() if "region" in names else None)


def initial_variables(cfg, model) -> dict:
  """The student's variables at initialization, from the config's seed: "params" and, for a
  backbone with batch norm, "batch_stats" (running mean 0, variance 1)."""
  size = cfg.aug.global_size
  dummy = jnp.zeros((1, size, size, 3))
  kwargs = {}
  if "ibot" in objectives.active(cfg):
    grid = model.backbone.grid(size)
    kwargs = dict(mask=jnp.zeros((1, grid[0] * grid[1]), bool), patch_index=jnp.zeros((1, 1), jnp.int32))
  return dict(model.init(jax.random.PRNGKey(cfg.seed), dummy, **kwargs))


def initial_params(cfg, model) -> dict:
  """The student's parameters at initialization, from the config's seed."""
  return initial_variables(cfg, model)["params"]


def random_init_backbone(cfg, model, shardings) -> dict:
  """The backbone weights a run started from (with its initial running statistics, if any),
  computed again (the `random_init` baseline of the evaluations), placed as `shardings` say."""
  def weights():
    variables = initial_variables(cfg, model)
    return models.backbone_weights(variables["params"]["backbone"],
                                   variables.get("batch_stats", {}).get("backbone"))
  return jax.jit(weights, out_shardings=shardings)()


def init_state(cfg, model, tx) -> dict:
  """The train state pytree: step, rng, student params, optimizer, teacher EMA, centers; for a
  backbone with batch norm also "batch_stats", the student's and the teacher's running
  statistics, each moved by its own forward passes (main_dino.py: both models in train mode
  with SyncBatchNorm; the teacher starts as a copy of the student, buffers included, and its
  EMA moves parameters only)."""
  variables = initial_variables(cfg, model)
  params = variables["params"]
  center = jnp.zeros((cfg.head.out_dim,), jnp.float32)
  stats = variables.get("batch_stats")
  return {
      "step": jnp.zeros([], jnp.int32),
      "rng": jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 1),
      "params": params,
      "opt_state": tx.init(params),
      "teacher": optim.ema(0.0).init(params),
      **({"batch_stats": {"student": stats, "teacher": jax.tree.map(jnp.copy, stats)}} if stats else {}),
      **{name: optim.ema(0.0).init(center) for name in objectives.centers(cfg)},
      "nonfinite_steps": jnp.zeros([], jnp.int32),  # steps skipped for non-finite loss/grads
      "first_nonfinite_step": jnp.full([], -1, jnp.int32),
  }


def teacher_backbone(state) -> dict:
  """The teacher's backbone weights in `state`: its parameters, with its running statistics
  under "batch_stats" for a backbone with batch norm (`models.backbone_weights`)."""
  stats = state.get("batch_stats", {}).get("teacher", {}).get("backbone")
  return models.backbone_weights(state["teacher"].value["backbone"], stats)


# ---------------------------------------------------------------------------------------
# The train step.
# ---------------------------------------------------------------------------------------


def flat_views(views):
  """[B, V, H, W, 3] -> [B*V, H, W, 3] (the views of one image stay next to each other)."""
  return views.reshape((-1,) + views.shape[2:])


def per_image(out: dict, b: int) -> dict:
  """Model outputs of flattened views regrouped per image, [B*V, ...] -> [B, V, ...]; the
  iBOT token logits [G, m, K] (G groups of views) become the flat [G*m, K] rows the iBOT loss takes."""
  grouped = {k: v.reshape((b, -1) + v.shape[1:]) for k, v in out.items() if k != "patch_logits"}
  if "patch_logits" in out:
    grouped["patch_logits"] = out["patch_logits"].reshape(-1, out["patch_logits"].shape[-1])
  return grouped


def apply_in_train_mode(model, params, stats, views, **kwargs):
  """(`model`'s outputs on `views`, its running statistics after the pass): with batch norm
  (`stats`, a ResNet's running statistics) it normalizes by the batch's statistics and moves
  the running ones, as a PyTorch module in train mode (main_dino.py leaves student and teacher
  so); without, (outputs, None)."""
  if not stats:
    return model.apply({"params": params}, views, **kwargs), None
  out, moved = model.apply({"params": params, "batch_stats": stats}, views, mutable=["batch_stats"], **kwargs)
  return out, moved["batch_stats"]


def train_step(state, batch, frozen_params=None, *, model, tx, schedules, cfg, batch_sharding=None,
               teacher_model=None):
  """One update of the student by the config's objectives, then the teacher EMA and the centers.

  batch: "global" [B, 2, G, G, 3], "local" [B, N, L, L, 3] views and, with iBOT, "masks"
  [B, 2, num_patches] bool for the student's global crops. `batch_sharding` (the jitted step's)
  keeps the flattened views split along the batch. With `model.packed_crops` the student's
  global and local crops go through the backbone together, packed (`models.packing`, DINOv2's
  one pass), from one dropout stream; otherwise one pass per crop size (DINO's MultiCropWrapper).

  Distillation (`dino_jax.distill`): the targets come from `frozen_params`, the parameters of
  `teacher_model`, which nothing updates; state["teacher"] is the EMA of the student; the
  student's crops are not masked and iBOT compares every patch token (DINOv2 Sec. 5).
  """
  step = state["step"]
  rng_global, rng_local = jax.random.split(jax.random.fold_in(state["rng"], step))
  temp = schedules["teacher_temp"](step)
  b = batch["global"].shape[0]
  glob = sharding.constrain(flat_views(batch["global"]), batch_sharding)
  names = objectives.active(cfg)
  mask = index = valid = None
  teacher = {}
  distilling = frozen_params is not None
  if "ibot" in names and distilling:  # every patch of every global crop, each image weighing the same
    num_patches = int(np.prod(model.backbone.grid(glob.shape[1])))
    index = jnp.broadcast_to(jnp.arange(num_patches), (glob.shape[0], num_patches))
    valid = jnp.ones(index.size, jnp.float32)
    teacher["token_weights"] = valid / num_patches
  elif "ibot" in names:
    mask = batch["masks"].reshape(glob.shape[0], -1)
    groups = 1 if batch_sharding is None else batch_sharding.mesh.size  # one per device: local gathers
    stratum = objectives.group_size(cfg) * batch["masks"].shape[1]  # the masks' draws: step_masks
    index, teacher["token_weights"], valid = masking.masked_token_index(
        mask, groups, masking.max_masked_per_group(mask.shape[0], groups, mask.shape[1], cfg.mask, stratum))

  t_model, t_params = (teacher_model, frozen_params) if distilling else (model, state["teacher"].value)
  stats = state.get("batch_stats")
  t_out, t_stats = apply_in_train_mode(t_model, t_params, stats and stats["teacher"], glob, patch_index=index)
  t_out = per_image(jax.lax.stop_gradient(t_out), b)
  teacher |= objectives.teacher_targets(t_out, state, temp, cfg, valid, models.max_logits(t_params))
  if "regions" in t_out:
    teacher["regions"] = t_out["regions"]

  def loss_fn(params):
    student_stats = stats and stats["student"]

    def run(views, rng, **kw):  # one forward of the views of one size
      nonlocal student_stats
      out, student_stats = apply_in_train_mode(model, params, student_stats, views, deterministic=False,
                                               rngs={"dropout": rng}, **kw)
      return per_image(out, b)

    local = sharding.constrain(flat_views(batch["local"]), batch_sharding) if "local" in batch else None
    if cfg.model.get("packed_crops", False) and local is not None:  # DINOv2's one pass of all crops
      chunks = 1 if batch_sharding is None else batch_sharding.mesh.size
      out, _ = apply_in_train_mode(model, params, None, (glob, local), deterministic=False,
                                   rngs={"dropout": rng_global}, mask=None if mask is None else (mask, None),
                                   patch_index=index, pack_chunks=chunks)
      groups = [per_image(o, b) for o in out]
    else:  # one pass per crop size, as DINO's MultiCropWrapper
      groups = [run(glob, rng_global, mask=mask, patch_index=index)]
      if local is not None:
        groups.append(run(local, rng_local))
    student = {"logits": jnp.concatenate([g["logits"] for g in groups], 1), "embedding": groups[0]["embedding"]}
    if "patch_logits" in groups[0]:
      student["patch_logits"] = groups[0]["patch_logits"]
    if "regions" in groups[0]:
      student["regions"] = [g["regions"] for g in groups]
      student["region_logits"] = [g["region_logits"] for g in groups]
    terms = {f"{name}_loss": objectives.OBJECTIVES[name](student, teacher, cfg) for name in names}
    return sum(objectives.weight(cfg, name) * terms[f"{name}_loss"] for name in names), (terms, student_stats)

  (loss, (terms, student_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  momentum = schedules["momentum"](step)
  _, teacher_state = optim.ema(momentum).update(params, state["teacher"])
  new_state = dict(state, params=params, opt_state=opt_state, teacher=teacher_state,
                   **objectives.updated_centers(t_out, state, cfg, valid))
  if stats:
    new_state["batch_stats"] = {"student": jax.lax.stop_gradient(student_stats), "teacher": t_stats}
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # A non-finite step leaves the state as it was (only the counters move); the loop then
  # stops or goes on as `on_nonfinite` says.
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  new_state["step"] = step + 1
  new_state["nonfinite_steps"] = state["nonfinite_steps"] + (~finite).astype(jnp.int32)
  new_state["first_nonfinite_step"] = jnp.where(
      (state["first_nonfinite_step"] < 0) & ~finite, step + 1, state["first_nonfinite_step"])
  t_flat = teacher["probs"].reshape(-1, teacher["probs"].shape[-1])
  emb = t_out["embedding"].reshape(-1, t_out["embedding"].shape[-1])
  emb = emb / jnp.linalg.norm(emb, axis=-1, keepdims=True)
  metrics = dict(terms, loss=loss, grad_norm=grad_norm, lr=schedules["lr"](step),
                 weight_decay=schedules["weight_decay"](step), momentum=momentum, teacher_temp=temp,
                 teacher_entropy=losses.entropy(t_flat), teacher_kl_to_mean=losses.kl_to_mean(t_flat),
                 teacher_feature_std=jnp.mean(jnp.std(emb, axis=0)),
                 nonfinite_steps=new_state["nonfinite_steps"])
  return new_state, metrics


# ---------------------------------------------------------------------------------------
# Views of a step: multi-crop on device, iBOT masks on the host.
# ---------------------------------------------------------------------------------------


def make_views(key_data, step, crops, *, cfg):
  """The augmented views of a step's host-made uint8 crops (`data.read_views`); the key
  depends only on (seed, step)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
  return augment.multicrop(key, crops, cfg.aug)


def augmentation_key(cfg) -> jax.Array:
  return jax.random.key_data(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 2))


# ---------------------------------------------------------------------------------------
# Putting it on a mesh.
# ---------------------------------------------------------------------------------------


class CompiledStep(NamedTuple):
  """A train step compiled ahead of time for given shapes (`Trainer.compile_step`)."""
  run: Callable  # (state, batch) -> (state, metrics)
  compiled: jax.stages.Compiled  # memory_analysis(), cost_analysis()


class Trainer(NamedTuple):
  """What a run needs on a mesh: initial state and the jitted, sharded functions."""
  state: dict  # with build(abstract=True): its shapes, dtypes and shardings only
  train_step: Callable  # (state, batch) -> (state, metrics)
  compile_step: Callable  # (state, batch), arrays or abstract -> CompiledStep
  make_views: Callable  # (key_data, step, uint8 crops {"global", "local"}) -> augmented views
  step_masks: Callable | None  # step -> this process's iBOT masks (host), None without iBOT
  model: models.DINOModel
  batch_sharding: jax.sharding.NamedSharding
  frozen_teacher: distill.FrozenTeacher | None  # distillation's teacher, outside the state


def build(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, steps_per_epoch: int,
          frozen_teacher: distill.FrozenTeacher | None = None, abstract: bool = False,
          teacher_step: int | None = None) -> Trainer:
  """Initial state (placed by `fsdp_spec`) and the train step jitted with the batch split
  over all devices. A distillation config reads its frozen teacher (`distill.load_teacher`,
  checkpoint `teacher_step` of the teacher run) unless `frozen_teacher` is given. `abstract`:
  nothing is allocated or read; the state (and a frozen teacher) are shapes with shardings,
  for compiling only (`bench --memory`). The config is taken as checked (`config_checks.check`,
  which `trainer.train` runs)."""
  batch_sharding = sharding.batch_sharding(mesh)
  model = make_model(cfg, batch_sharding)
  teacher_model = None
  if distill.active(cfg):
    teacher_model = make_model(distill.teacher_config(cfg), batch_sharding)
    if abstract:
      frozen_teacher = distill.FrozenTeacher(distill.abstract_teacher(cfg, mesh, teacher_model), {})
    frozen_teacher = frozen_teacher or distill.load_teacher(cfg, mesh, teacher_model, teacher_step)
  schedules = optim.make_schedules(cfg, steps_per_epoch)
  tx = optim.make_optimizer(cfg, schedules, steps_per_epoch, model.backbone)
  replicated = sharding.replicated(mesh)
  init = functools.partial(init_state, cfg, model, tx)
  state_sharding = sharding.state_shardings(jax.eval_shape(init), mesh, cfg)
  if abstract:
    state = sharding.placed_abstract(jax.eval_shape(init), state_sharding)
  else:
    state = jax.jit(init, out_shardings=state_sharding)()
  step_fn = functools.partial(train_step, model=model, tx=tx, schedules=schedules, cfg=cfg,
                              batch_sharding=batch_sharding, teacher_model=teacher_model)
  # A frozen teacher is an extra argument (placed as loaded), never donated nor returned.
  frozen = () if frozen_teacher is None else (frozen_teacher.params,)
  jitted = jax.jit(step_fn, in_shardings=(state_sharding, batch_sharding, *[jax.tree.map(lambda x: x.sharding, f)
                                                                            for f in frozen]),
                   out_shardings=(state_sharding, replicated), donate_argnums=0)

  def compile_step(state, batch) -> CompiledStep:
    compiled = jitted.lower(state, batch, *frozen).compile()
    return CompiledStep(lambda state, batch: compiled(state, batch, *frozen), compiled)

  step = jitted if not frozen else (lambda state, batch: jitted(state, batch, *frozen))
  views_fn = jax.jit(functools.partial(make_views, cfg=cfg), in_shardings=(replicated, None, batch_sharding),
                     out_shardings=batch_sharding)
  step_masks = None
  if "ibot" in objectives.active(cfg) and frozen_teacher is None:
    num_global = len(augment.view_specs(cfg.aug)[0])
    step_masks = functools.partial(masking.step_masks, cfg, grid=model.backbone.grid(cfg.aug.global_size),
                                   num_global=num_global, group_images=objectives.group_size(cfg))
  return Trainer(state, step, compile_step, views_fn, step_masks, model, batch_sharding, frozen_teacher)
