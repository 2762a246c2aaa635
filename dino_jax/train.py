"""DINO / DINOv2 self-supervised pretraining: one sharded, resumable trainer.

  python -m dino_jax.train --config configs/demo_fashion_mnist.py --workdir /tmp/run \
      [--config.key=value ...]

Sections: model and state, the train step, views of a step, evaluation, checkpoints,
the loop, command line. Everything a run does is in its config.
"""
import functools
import json
import os
import pathlib
import signal
import threading
import time
from typing import Callable, NamedTuple

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import orbax.checkpoint as ocp
import tqdm

from dino_jax import augment
from dino_jax import data
from dino_jax import knn
from dino_jax import losses
from dino_jax import masking
from dino_jax import models
from dino_jax import optim
from dino_jax import probe
from dino_jax.errors import UsageError
from dino_jax.errors import fail

# ---------------------------------------------------------------------------------------
# Model and state.
# ---------------------------------------------------------------------------------------


def make_backbone(cfg: ml_collections.ConfigDict, batch_sharding: NamedSharding | None = None) -> models.ViT:
  """The config's ViT; `batch_sharding` is the train step's (per-device stochastic depth)."""
  m = cfg.model
  return models.ViT(patch_size=m.patch_size, width=m.width, depth=m.depth, num_heads=m.num_heads,
                    mlp_dim=m.mlp_dim, ffn=m.ffn, num_registers=m.num_registers,
                    layerscale=m.layerscale, drop_path_rate=m.drop_path_rate,
                    pos_embed_grid=m.pos_embed_grid, interpolate_offset=m.interpolate_offset,
                    interpolate_antialias=m.interpolate_antialias, dtype=jnp.dtype(m.dtype), remat=m.remat,
                    attention=m.attention, batch_sharding=batch_sharding)


def make_model(cfg: ml_collections.ConfigDict, batch_sharding: NamedSharding | None = None) -> models.DINOModel:
  h = cfg.head
  head = lambda: models.DINOHead(h.out_dim, h.hidden_dim, h.bottleneck_dim, h.num_layers)
  separate_ibot = cfg.loss.ibot_weight > 0 and not h.share_ibot_head
  return models.DINOModel(make_backbone(cfg, batch_sharding), head(), head() if separate_ibot else None)


def init_state(cfg, model, tx) -> dict:
  """The train state pytree: step, rng, student params, optimizer, teacher EMA, centers."""
  rng = jax.random.PRNGKey(cfg.seed)
  a = cfg.aug
  dummy = jnp.zeros((1, a.global_size, a.global_size, 3))
  use_mask = cfg.loss.ibot_weight > 0
  params = model.init(rng, dummy, mask=jnp.zeros((1, (a.global_size // cfg.model.patch_size) ** 2), bool)
                      if use_mask else None, patch_index=jnp.zeros((1, 1), jnp.int32) if use_mask else None)["params"]
  center = jnp.zeros((cfg.head.out_dim,), jnp.float32)
  return {
      "step": jnp.zeros([], jnp.int32),
      "rng": jax.random.fold_in(rng, 1),
      "params": params,
      "opt_state": tx.init(params),
      "teacher": optim.ema(0.0).init(params),
      "center": optim.ema(0.0).init(center),
      "ibot_center": optim.ema(0.0).init(center),
      "nonfinite_steps": jnp.zeros([], jnp.int32),  # steps skipped for non-finite loss/grads
      "first_nonfinite_step": jnp.full([], -1, jnp.int32),
  }


# ---------------------------------------------------------------------------------------
# The train step.
# ---------------------------------------------------------------------------------------


def teacher_targets(logits, center_state, temp, cfg, weights=None):
  """Teacher probabilities: centering + sharpening (DINO) or Sinkhorn-Knopp (DINOv2)."""
  if cfg.loss.centering == "sinkhorn":
    return sinkhorn_knopp_rows(logits, temp, weights)
  return losses.centered_softmax(logits, center_state.value, temp)


def sinkhorn_knopp_rows(logits, temp, weights):
  shape = logits.shape
  flat = logits.reshape(-1, shape[-1])
  return losses.sinkhorn_knopp(flat, temp, 3, weights).reshape(shape)


def update_center(center_state, logits, momentum, cfg, weights=None):
  """EMA of the batch-mean teacher logits (only used with centering, not Sinkhorn)."""
  if cfg.loss.centering == "sinkhorn":
    return center_state
  flat = logits.reshape(-1, logits.shape[-1])
  if weights is None:
    batch_mean = jnp.mean(flat, axis=0)
  else:
    batch_mean = jnp.sum(flat * weights[:, None], axis=0) / jnp.maximum(jnp.sum(weights), 1.0)
  return optim.ema(momentum).update(batch_mean, center_state)[1]


def masked_token_index(masks, max_per_image):
  """Per image, the indices of its masked patches padded to a static `max_per_image`.

  Returns [n, m] indices, flat [n*m] DINOv2 weights 1 / (masked patches of the image) with
  0 for padding, and the flat [n*m] validity.
  """
  index = jnp.argsort(~masks, axis=1, stable=True)[:, :max_per_image]  # masked ones first
  per_image = jnp.sum(masks, axis=1, keepdims=True)
  valid = jnp.arange(max_per_image)[None, :] < per_image
  weights = jnp.where(valid, 1.0 / jnp.maximum(per_image, 1), 0.0)
  return index, weights.reshape(-1), valid.reshape(-1).astype(jnp.float32)


def constrain(x, sharding):
  """Activations stay split along the batch (views of one image on one device)."""
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)


def train_step(state, batch, *, model, tx, schedules, cfg, batch_sharding=None):
  """One DINO/iBOT/KoLeo update of the student, then the teacher EMA and the centers.

  batch: "global" [B, 2, G, G, 3], "local" [B, N, L, L, 3] views and, with iBOT, "masks"
  [B, 2, num_patches] bool for the student's global crops. `batch_sharding` (the jitted step's)
  keeps the flattened views split along the batch.
  """
  step = state["step"]
  rng_global, rng_local = jax.random.split(jax.random.fold_in(state["rng"], step))
  temp = schedules["teacher_temp"](step)
  glob = batch["global"]
  b, n_global = glob.shape[:2]
  glob = constrain(glob.reshape((-1,) + glob.shape[2:]), batch_sharding)
  use_ibot = cfg.loss.ibot_weight > 0
  mask = index = None
  if use_ibot:
    mask = batch["masks"].reshape(b * n_global, -1)
    index, token_weights, valid = masked_token_index(mask, masking.max_masked_per_image(mask.shape[1], cfg.mask))

  teacher = model.apply({"params": state["teacher"].value}, glob, patch_index=index)
  teacher = jax.lax.stop_gradient(teacher)
  t_logits = teacher["cls_logits"].reshape(b, n_global, -1)
  t_probs = teacher_targets(t_logits, state["center"], temp, cfg)
  if use_ibot:
    t_patch_logits = teacher["patch_logits"].reshape(-1, teacher["patch_logits"].shape[-1])
    t_patch_probs = teacher_targets(t_patch_logits, state["ibot_center"], temp, cfg, valid)

  def loss_fn(params):
    student = model.apply({"params": params}, glob, mask=mask, patch_index=index,
                          deterministic=False, rngs={"dropout": rng_global})
    s_logits = student["cls_logits"].reshape(b, n_global, -1)
    if "local" in batch:
      loc = batch["local"]
      s_local = model.apply({"params": params}, constrain(loc.reshape((-1,) + loc.shape[2:]), batch_sharding),
                            deterministic=False, rngs={"dropout": rng_local})
      s_logits = jnp.concatenate([s_logits, s_local["cls_logits"].reshape(b, loc.shape[1], -1)], 1)
    terms = {"dino_loss": losses.dino_loss(s_logits, t_probs, cfg.loss.student_temp)}
    if use_ibot:
      s_patch_logits = student["patch_logits"].reshape(t_patch_probs.shape)
      terms["ibot_loss"] = losses.ibot_patch_loss(s_patch_logits, t_patch_probs, token_weights,
                                                  b * n_global, cfg.loss.student_temp)
    if cfg.loss.koleo_weight > 0:
      cls = student["cls"].reshape(b, n_global, -1)
      terms["koleo_loss"] = sum(losses.koleo_loss(cls[:, i]) for i in range(n_global))
    total = sum(cfg.loss[name.replace("_loss", "_weight")] * v for name, v in terms.items())
    return total, terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
  updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
  params = optax.apply_updates(state["params"], updates)
  momentum = schedules["momentum"](step)
  _, teacher_state = optim.ema(momentum).update(params, state["teacher"])
  new_state = dict(state, params=params, opt_state=opt_state, teacher=teacher_state,
                   center=update_center(state["center"], t_logits, cfg.loss.center_momentum, cfg))
  if use_ibot:
    new_state["ibot_center"] = update_center(state["ibot_center"], t_patch_logits,
                                             cfg.loss.center_momentum, cfg, valid)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # A non-finite step leaves the state as it was (only the counters move); the loop then
  # stops or goes on as `on_nonfinite` says.
  new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
  new_state["step"] = step + 1
  new_state["nonfinite_steps"] = state["nonfinite_steps"] + (~finite).astype(jnp.int32)
  new_state["first_nonfinite_step"] = jnp.where(
      (state["first_nonfinite_step"] < 0) & ~finite, step + 1, state["first_nonfinite_step"])
  t_flat = t_probs.reshape(-1, t_probs.shape[-1])
  cls = teacher["cls"] / jnp.linalg.norm(teacher["cls"], axis=-1, keepdims=True)
  metrics = dict(terms, loss=loss, grad_norm=grad_norm, lr=schedules["lr"](step),
                 weight_decay=schedules["weight_decay"](step), momentum=momentum, teacher_temp=temp,
                 teacher_entropy=losses.entropy(t_flat), teacher_kl_to_mean=losses.kl_to_mean(t_flat),
                 teacher_feature_std=jnp.mean(jnp.std(cls, axis=0)),
                 nonfinite_steps=new_state["nonfinite_steps"])
  return new_state, metrics


# ---------------------------------------------------------------------------------------
# Views of a step: multi-crop on device, iBOT masks on the host.
# ---------------------------------------------------------------------------------------


def step_masks(cfg, step: int) -> np.ndarray:
  """[local batch, 2, patches] iBOT masks for this process's images of `step`: the global
  batch's masks come from (seed, step) and each process takes its slice, so a run's masks do
  not depend on how many processes share the batch."""
  grid = (cfg.aug.global_size // cfg.model.patch_size,) * 2
  rng = np.random.default_rng([cfg.seed, step])
  masks = masking.batch_masks(rng, cfg.batch_size * 2, grid, cfg.mask).reshape(cfg.batch_size, 2, -1)
  local = cfg.batch_size // jax.process_count()
  return masks[jax.process_index() * local:(jax.process_index() + 1) * local]


def make_views(key_data, step, images, *, cfg):
  """Multi-crop views of a uint8 image batch; the key depends only on (seed, step)."""
  key = jax.random.fold_in(jax.random.wrap_key_data(key_data), step)
  return augment.multicrop(key, images, cfg.aug)


# ---------------------------------------------------------------------------------------
# Evaluation: weighted k-NN on teacher CLS features.
# ---------------------------------------------------------------------------------------


def make_feature_fn(backbone: models.ViT, cfg, mesh) -> Callable:
  """Jitted (params, uint8 images, labels) -> (features, labels), replicated to every process.

  Features are the backbone's CLS token on the evaluation view, or, with params None, the
  raw pixels (the baseline a learned representation should beat).
  """
  replicated = NamedSharding(mesh, P())

  @functools.partial(jax.jit, out_shardings=(replicated, replicated))
  def features(params, images, labels):
    if params is None:
      return images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0, labels
    x = augment.preprocess_eval(images, cfg.aug.global_size)
    return backbone.apply({"params": params}, x)["cls"], labels

  return features


def extract_features(feature_fn, params, source, batch_size: int, sharding) -> tuple[np.ndarray, np.ndarray]:
  """Features and labels of every image of `source`; each process decodes its slice of
  every batch (the last batch is padded with image 0 and the padding dropped)."""
  local = batch_size // jax.process_count()
  start = jax.process_index() * local
  to_global = lambda x: jax.make_array_from_process_local_data(sharding, x)
  feats, labels = [], []
  for i in range(0, len(source), batch_size):
    index = np.arange(i, i + batch_size)
    valid = index < len(source)
    images, lab = data.read_batch(source, np.where(valid, index, 0)[start:start + local])
    f, lab = feature_fn(params, to_global(images), to_global(lab))
    feats.append(np.asarray(f)[valid])
    labels.append(np.asarray(lab)[valid])
  return np.concatenate(feats), np.concatenate(labels)


def evaluate_features(feature_fn, params, sources, cfg, sharding) -> dict[str, float]:
  """DINO's weighted k-NN top-1 (train split as memory, test split as queries) and, with
  `eval.linear_probe`, the linear-probe top-1 on the same frozen features."""
  train_src, test_src = sources
  train_f, train_y = extract_features(feature_fn, params, train_src, cfg.eval.batch_size, sharding)
  test_f, test_y = extract_features(feature_fn, params, test_src, cfg.eval.batch_size, sharding)
  out = {"knn_top1": knn.knn_accuracy(train_f, train_y, test_f, test_y, train_src.num_classes,
                                      cfg.eval.knn_k, cfg.eval.knn_temperature)}
  if cfg.eval.linear_probe:
    out["linear_top1"] = probe.linear_probe(train_f, train_y, test_f, test_y, train_src.num_classes,
                                            epochs=cfg.eval.linear_epochs)["test_top1"]
  return out


EVALUATED = {"teacher": "trained teacher", "random_init": "random init", "raw_pixels": "raw pixels"}


# ---------------------------------------------------------------------------------------
# Checkpoints.
# ---------------------------------------------------------------------------------------


def checkpoint_manager(workdir: str, cfg) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=cfg.checkpoint.keep,
                                         save_interval_steps=cfg.checkpoint.every_steps,
                                         enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")), options=options)


def _shapes_by_name(tree) -> dict[str, tuple]:
  return {optim.path_name(path): tuple(getattr(leaf, "shape", ()))
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def weights_manager(workdir: str) -> ocp.CheckpointManager:
  """A manager of `workdir`'s checkpoints for reading their metadata and parts of them."""
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               item_handlers=ocp.PyTreeCheckpointHandler())


def check_checkpoint_matches(step_dir: pathlib.Path, state: dict) -> None:
  """Raises UsageError naming the differences when the checkpoint's arrays (names, shapes)
  are not those of `state`: a run directory of another config or architecture."""
  mngr = weights_manager(str(step_dir.parent.parent))
  saved = _shapes_by_name(mngr.item_metadata(int(step_dir.name)))
  mngr.close()
  wanted = _shapes_by_name(state)
  diffs = [f"{k}: checkpoint {saved.get(k, 'missing')} vs config {wanted.get(k, 'missing')}"
           for k in sorted(saved.keys() | wanted.keys()) if saved.get(k) != wanted.get(k)]
  if diffs:
    raise UsageError(f"checkpoint {step_dir} does not match this config: {len(diffs)} arrays differ, "
                     f"e.g. {'; '.join(diffs[:3])}")


def restore_or_keep(mngr: ocp.CheckpointManager, state: dict) -> dict:
  """The latest checkpoint restored with `state`'s shapes and shardings, else `state`.

  Orbax writes a checkpoint under a temporary name and renames it when complete, so one
  cut short by a kill is never restored; it is reported here and left alone.
  """
  for unfinished in pathlib.Path(str(mngr.directory)).glob("*.orbax-checkpoint-tmp*"):
    logging.warning("ignoring unfinished checkpoint %s (the run stopped while writing it)", unfinished)
  step = mngr.latest_step()
  if step is None:
    return state
  check_checkpoint_matches(pathlib.Path(str(mngr.directory)) / str(step), state)
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return mngr.restore(step, args=ocp.args.StandardRestore(abstract))


def restore_weights(workdir: str, parts: tuple[str, ...], step: int | None = None,
                    student: bool = False) -> tuple[dict, int]:
  """Those of `parts` ("backbone", "head", "ibot_head") that the teacher (or student) of run
  `workdir` has at `step` (default: the latest), as saved, replicated on this host's devices;
  nothing else is read. Returns (weights, step)."""
  mngr = weights_manager(workdir)
  step = mngr.latest_step() if step is None else step
  if step is None or step not in mngr.all_steps():
    raise UsageError(f"no checkpoint {'' if step is None else step} in {workdir!r} "
                     f"(has: {sorted(mngr.all_steps()) or 'none'})")
  saved = mngr.item_metadata(step)
  if not student:
    saved = saved["teacher"]["value"]
  elif "params" in saved:
    saved = saved["params"]
  else:
    raise UsageError(f"{workdir!r} holds no student weights (a converted model holds its teacher only)")
  replicated = NamedSharding(make_mesh(), P())
  wanted = {p: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved[p]) for p in parts if p in saved}
  args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=replicated), wanted)
  nest = (lambda x: {"params": x}) if student else (lambda x: {"teacher": {"value": x}})
  restored = mngr.restore(step, args=ocp.args.PyTreeRestore(item=nest(wanted), restore_args=nest(args),
                                                            partial_restore=True))
  mngr.close()
  return (restored["params"] if student else restored["teacher"]["value"]), step


def init_from_run(state: dict, workdir: str) -> dict:
  """`state` whose student and teacher start from the teacher of run `workdir` (a converted
  PyTorch model or another run): its backbone, which must fit the config (a mask token it lacks
  keeps its fresh value), and its DINO / iBOT heads where their shapes fit (else fresh)."""
  source, _ = restore_weights(workdir, tuple(state["params"]))
  if "backbone" not in source:
    raise UsageError(f"model.init_from={workdir!r}: its checkpoint has no teacher backbone")
  params = dict(state["params"])
  for part, theirs in source.items():
    have, got = _shapes_by_name(params[part]), _shapes_by_name(theirs)
    diffs = [f"{k}: {got.get(k, 'missing')} vs config {have.get(k, 'missing')}"
             for k in sorted(have.keys() | got.keys()) if have.get(k) != got.get(k) and k != "mask_token"]
    if diffs and part == "backbone":
      raise UsageError(f"model.init_from={workdir!r}: its backbone does not fit this config: "
                       f"{len(diffs)} arrays differ, e.g. {'; '.join(diffs[:3])}")
    if diffs:
      logging.warning("model.init_from: %s not used (shapes differ from the config: %s)", part, diffs[0])
      continue
    placed = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), dict(theirs),
                          {k: params[part][k] for k in theirs})  # onto this run's (FSDP) placement
    params[part] = dict(params[part]) | placed
  # Separate buffers for the two copies: the train step donates the whole state.
  return dict(state, params=params, teacher=state["teacher"]._replace(value=jax.tree.map(jnp.copy, params)))


# ---------------------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------------------


class DivergenceError(RuntimeError):
  """The loss or gradients became non-finite and the config says to stop."""


stop_requested = threading.Event()  # set by SIGTERM: save at the next step boundary and exit


def collapse_warnings(metrics: dict, num_prototypes: int) -> list[str]:
  """Signs of the two DINO collapses (Caron et al. 2021, Sec. 5.3) in a step's metrics."""
  out = []
  if metrics["teacher_entropy"] > 0.99 * np.log(num_prototypes):
    out.append(f"teacher entropy {metrics['teacher_entropy']:.3f} is near log K: near-uniform targets")
  if metrics["teacher_kl_to_mean"] < 1e-2:
    out.append(f"KL(teacher || mean teacher) {metrics['teacher_kl_to_mean']:.4f} is near 0: "
               "every image gets the same target")
  if metrics["teacher_feature_std"] < 1e-3:
    out.append(f"teacher CLS features barely vary over the batch (std {metrics['teacher_feature_std']:.2e})")
  return out


class MetricWriter:
  """Scalars to <workdir>/metrics.jsonl and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str):
    self.active = jax.process_index() == 0
    if self.active:
      import tensorboardX  # pylint: disable=g-import-not-at-top
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self.tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: dict):
    if not self.active:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    self.jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
    self.jsonl.flush()
    for k, v in scalars.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self):
    if self.active:
      self.jsonl.close()
      self.tb.close()


BATCH = ("data", "fsdp")  # the batch axis of inputs and activations is split over every device


def make_mesh(cfg: ml_collections.ConfigDict | None = None, devices=None) -> jax.sharding.Mesh:
  """`devices` (default all) as a ("data", "fsdp") mesh with `cfg.mesh.fsdp` of them on the
  FSDP axis (1 without a config); XLA propagates shardings (Auto axes)."""
  devices = devices or jax.devices()
  fsdp = 1 if cfg is None else cfg.mesh.fsdp
  if fsdp < 1 or len(devices) % fsdp:
    raise UsageError(f"mesh.fsdp {fsdp} does not divide the {len(devices)} devices")
  return jax.make_mesh((len(devices) // fsdp, fsdp), BATCH, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """The FSDP (ZeRO-3) rule: an array of at least `min_size` elements is split along its
  largest axis that the "fsdp" axis size divides; smaller ones (all, when fsdp is 1) are
  replicated. Parameters, their Adam moments and the teacher get the same placement."""
  if fsdp == 1 or int(np.prod(shape)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[axis] % fsdp == 0:
      return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])
  return P()


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, cfg) -> dict:
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh.shape["fsdp"], cfg.mesh.fsdp_min_size)),
                      abstract_state)


def check_config(cfg, num_devices: int):
  for name in ("batch_size", "eval.batch_size"):
    value = cfg.eval.batch_size if name == "eval.batch_size" else cfg.batch_size
    if value % num_devices:
      raise UsageError(f"{name} {value} is not divisible by the {num_devices} devices")
  if cfg.on_nonfinite not in ("stop", "skip"):
    raise UsageError(f"on_nonfinite must be 'stop' or 'skip', not {cfg.on_nonfinite!r}")
  if cfg.loss.centering not in ("centering", "sinkhorn"):
    raise UsageError(f"loss.centering must be 'centering' or 'sinkhorn', not {cfg.loss.centering!r}")
  if cfg.model.remat not in ("none", *models.REMAT_POLICIES):
    raise UsageError(f"model.remat must be one of none, {', '.join(models.REMAT_POLICIES)}, not {cfg.model.remat!r}")
  if cfg.model.attention == "cudnn" and (jax.default_backend() != "gpu" or cfg.model.dtype == "float32"):
    raise UsageError("model.attention=cudnn needs a GPU and model.dtype bfloat16 or float16")
  if cfg.model.attention not in ("xla", "cudnn"):
    raise UsageError(f"model.attention must be 'xla' or 'cudnn', not {cfg.model.attention!r}")
  for size in (cfg.aug.global_size, cfg.aug.local_size):
    if size % cfg.model.patch_size:
      raise UsageError(f"crop size {size} is not a multiple of patch size {cfg.model.patch_size}")


class Trainer(NamedTuple):
  """What a run needs on a mesh: initial state and the jitted, sharded functions."""
  state: dict
  train_step: Callable  # (state, batch) -> (state, metrics)
  make_views: Callable  # (key_data, step, uint8 images) -> {"global", "local"} views
  model: models.DINOModel
  batch_sharding: NamedSharding


def build(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, steps_per_epoch: int) -> Trainer:
  """Initial state (placed by `fsdp_spec`) and the train step jitted with the batch split
  over all devices."""
  check_config(cfg, mesh.size)
  schedules = optim.make_schedules(cfg, steps_per_epoch)
  tx = optim.make_optimizer(cfg, schedules, steps_per_epoch)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P(BATCH))
  model = make_model(cfg, batch_sharding)
  init = functools.partial(init_state, cfg, model, tx)
  state_sharding = state_shardings(jax.eval_shape(init), mesh, cfg)
  state = jax.jit(init, out_shardings=state_sharding)()
  step_fn = jax.jit(functools.partial(train_step, model=model, tx=tx, schedules=schedules, cfg=cfg,
                                      batch_sharding=batch_sharding),
                    in_shardings=(state_sharding, batch_sharding),
                    out_shardings=(state_sharding, replicated), donate_argnums=0)
  views_fn = jax.jit(functools.partial(make_views, cfg=cfg), in_shardings=(replicated, None, batch_sharding),
                     out_shardings=batch_sharding)
  return Trainer(state, step_fn, views_fn, model, batch_sharding)


def augmentation_key(cfg) -> jax.Array:
  return jax.random.key_data(jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 2))


def train(cfg: ml_collections.ConfigDict, workdir: str, max_steps: int | None = None) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final state and k-NN results.

  `max_steps` stops early (after that many total steps) without changing any schedule:
  the way tests and users simulate an interrupted run.
  """
  mesh = make_mesh(cfg)
  train_src = data.make_source(cfg.data, cfg.data.train_split)
  eval_srcs = None
  if cfg.eval.knn_every_steps >= 0 and getattr(train_src, "num_classes", None):
    eval_srcs = (data.make_source(cfg.data, cfg.eval.train_split), data.make_source(cfg.data, cfg.eval.test_split))
  steps_per_epoch = max(len(train_src) // cfg.batch_size, 1)
  total_steps = optim.total_steps(cfg, steps_per_epoch)
  pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
  (pathlib.Path(workdir) / "config.json").write_text(cfg.to_json(indent=2))

  trainer = build(cfg, mesh, steps_per_epoch)
  if jax.process_index() == 0:
    print(f"{jax.process_count()} process(es), {jax.device_count()} {jax.devices()[0].platform} devices, "
          f"mesh {dict(mesh.shape)}, {total_steps} steps", flush=True)
  mngr = checkpoint_manager(workdir, cfg)
  state = restore_or_keep(mngr, trainer.state)
  if cfg.model.init_from and mngr.latest_step() is None:
    state = init_from_run(state, cfg.model.init_from)
  start_step = int(state["step"])
  aug_key = augmentation_key(cfg)
  to_global = lambda x: jax.make_array_from_process_local_data(trainer.batch_sharding, x)

  writer = MetricWriter(workdir)
  feature_fn = make_feature_fn(make_backbone(cfg), cfg, mesh)
  evaluate = lambda params: evaluate_features(feature_fn, params, eval_srcs, cfg, trainer.batch_sharding)
  end_step = total_steps if max_steps is None else min(max_steps, total_steps)
  batches = data.train_batches(train_src, cfg.batch_size, cfg.seed, start_step,
                               jax.process_index(), jax.process_count())
  bar = tqdm.tqdm(total=end_step, initial=start_step, desc="train", unit="step",
                  disable=jax.process_index() != 0 or not cfg.progress_bar, dynamic_ncols=True)
  results = {}
  for step, images in batches:
    if step >= end_step:
      break
    batch = dict(trainer.make_views(aug_key, step, to_global(images)))
    if cfg.loss.ibot_weight > 0:
      batch["masks"] = to_global(step_masks(cfg, step))
    state, metrics = trainer.train_step(state, batch)
    bar.update(1)
    done = step + 1
    if done % cfg.log_every_steps == 0 or done == end_step:
      metrics = dict(jax.device_get(metrics), skipped_images=getattr(train_src, "skipped", 0))
      if metrics["nonfinite_steps"] > 0 and cfg.on_nonfinite == "stop":
        mngr.wait_until_finished()
        bad = int(state["first_nonfinite_step"])
        good = max([s for s in mngr.all_steps() if s < bad], default=None)
        raise DivergenceError(
            f"non-finite loss or gradients at step {bad} (that update was not applied); last good "
            f"checkpoint: {f'step {good} in {mngr.directory}' if good is not None else 'none'}. "
            "Set --config.on_nonfinite=skip to skip such steps instead.")
      for warning in collapse_warnings(metrics, cfg.head.out_dim):
        logging.warning("step %d: %s", done, warning)
      bar.set_postfix(loss=f"{metrics['loss']:.4f}")
      writer.write(done, metrics)
    preempted = stop_requested.is_set() or mngr.reached_preemption(done)
    mngr.save(done, args=ocp.args.StandardSave(state), force=done == end_step or preempted)
    if preempted:
      mngr.wait_until_finished()
      bar.write(f"stopped at step {done} on request (SIGTERM or preemption); checkpoint saved, "
                "rerun the same command to resume")
      end_step = done
      results["preempted_at"] = done
      break
    if eval_srcs and cfg.eval.knn_every_steps > 0 and done % cfg.eval.knn_every_steps == 0 and done < end_step:
      scores = evaluate(state["teacher"].value["backbone"])
      writer.write(done, scores)
      bar.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
  bar.close()
  mngr.wait_until_finished()

  if eval_srcs and end_step == total_steps and "preempted_at" not in results:
    evaluated = {"teacher": state["teacher"].value["backbone"]}
    if cfg.eval.knn_baselines:
      evaluated["random_init"] = build(cfg, mesh, steps_per_epoch).state["params"]["backbone"]
      evaluated["raw_pixels"] = None
    for who, params in evaluated.items():
      results.update({f"{metric}_{who}": v for metric, v in evaluate(params).items()})
    writer.write(end_step, results)
  writer.close()
  mngr.close()
  return {"state": state, "results": results}


# ---------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/demo_fashion_mnist.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, config.")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first "
                                 "(one process per host on TPU pods / SLURM; settings auto-detected).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "With --distributed: host:port of process 0 "
                                   "(where nothing detects it, e.g. processes on one machine).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "With --distributed: the number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "With --distributed: this process's index.")


def parse_flags(argv):
  """absl flag parsing with bad flags and config overrides reported as one line."""
  try:
    return flags.FLAGS(argv)
  except KeyError as e:
    fail(f"unknown config key {e.args[0] if e.args else e}")
  except (flags.Error, TypeError, ValueError) as e:
    fail(str(e))


def main(argv):
  del argv
  if _WORKDIR.value is None or _CONFIG.value is None:
    fail("--config and --workdir are required")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  if _DISTRIBUTED.value:
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  t0 = time.time()
  try:
    cfg = _CONFIG.value
    cfg.get("seed")  # a config file that failed to load raises here
  except OSError as e:
    fail(str(e))
  signal.signal(signal.SIGTERM, lambda signum, frame: stop_requested.set())
  try:
    out = train(cfg, _WORKDIR.value)
  except (UsageError, DivergenceError) as e:
    fail(str(e))
  res = out["results"]
  if "knn_top1_teacher" in res:
    metrics = [m for m in ("knn_top1", "linear_top1") if f"{m}_teacher" in res]
    print(f"\ntop-1 on {cfg.eval.test_split} (k-NN: k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature}):")
    print(f"  {'':<17} " + " ".join(f"{m:>11}" for m in metrics))
    for who, name in EVALUATED.items():
      if f"knn_top1_{who}" in res:
        print(f"  {name:<17} " + " ".join(f"{res[f'{m}_{who}']:>11.4f}" for m in metrics))
  if "preempted_at" in res:
    print(f"stopped at step {res['preempted_at']}; workdir {_WORKDIR.value}")
    return
  print(f"done in {time.time() - t0:.0f} s; workdir {_WORKDIR.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
