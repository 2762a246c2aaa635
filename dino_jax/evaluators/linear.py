"""The linear evaluator: the papers' linear evaluation of a frozen backbone (DINO's
`eval_linear.py`, DINOv2's `eval/linear.py`; the math in `dino_jax.evaluators.probe`).

Classifiers are trained on augmented training images (random resized crop, scale 0.08-1, of
the full image and flip, on the host as torchvision's) with a backbone forward on every batch,
and scored on the evaluation view of the test split: `protocol` "dino" (one input, a
learning-rate sweep: `linear_dino_top1`, `linear_dino_top1_lr<lr>`) or "dinov2" (the grid of
inputs x learning rates: `linear_dinov2_top1`, `linear_dinov2_top1_<input>` and
`linear_dinov2_top1_<input>_lr<lr>`). The steps run on the devices (jitted, batches split over
the mesh, classifiers replicated).
"""
import concurrent.futures
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import tqdm

from dino_jax import augment
from dino_jax import crops
from dino_jax import data
from dino_jax import models
from dino_jax import sharding
from dino_jax import validate
from dino_jax.errors import UsageError
from dino_jax.evaluators import common
from dino_jax.evaluators import probe


def backbone_blocks(model_cfg: ml_collections.ConfigDict) -> int:
  """How many blocks the backbone has (every backbone: num_layers = blocks + 1)."""
  return models.make_backbone(model_cfg).num_layers - 1


def linear_variants(ecfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict) -> tuple:
  """The classifier inputs (`probe.Variant`) of evaluator config `ecfg` on this backbone; a
  ResNet's pooled output alone (DINO's eval_linear.py: `model(inp)` for convnets)."""
  n_last_blocks = 1 if model_cfg.get("name", "vit") == "resnet" else ecfg.get("n_last_blocks", 4)
  return probe.protocol_variants(ecfg.protocol, n_last_blocks, ecfg.get("avgpool_patchtokens", False),
                                 tuple(ecfg.get("grid_blocks", probe.DINOV2_GRID_BLOCKS)),
                                 cls_token=model_cfg.get("name", "vit") == "vit")


def make_linear_fns(backbone, variants, image_size: int, lrs, steps_per_epoch: int, epochs: int,
                    per_epoch: bool, mesh):
  """Jitted (features, train_step, eval_step) of a linear protocol on the mesh.

  features(params, x) -> {variant: [B, D_v]} (frozen: no gradient reaches the backbone);
  train_step(state, params, uint8 crops, labels, step) -> (state, mean loss): ImageNet
  normalization of the training crops (`data.read_crops`), a backbone forward, one SGD step of
  every classifier at its cosine-decayed learning rate; eval_step(state, params, images,
  labels) -> ({variant: [L] correct}, labelled rows) on the evaluation view (rows labelled -1
  left out). Batches are split over the mesh, classifiers replicated.
  """
  replicated = sharding.replicated(mesh)
  batch = sharding.batch_sharding(mesh)
  layers = max(v.blocks for v in variants)
  lrs = jnp.asarray(lrs, jnp.float32)
  num_classifiers = len(variants) * len(lrs)

  def features(params, x):
    out = backbone.apply(models.backbone_variables(params), sharding.constrain(x, batch), layers=layers)
    return jax.lax.stop_gradient(probe.linear_inputs(out, variants))

  @functools.partial(jax.jit, donate_argnums=(0,), out_shardings=(replicated, replicated))
  def train_step(state, params, images, labels, step):
    feats = features(params, augment.normalize(images))
    loss, grads = jax.value_and_grad(probe.classifiers_loss)(state["params"], feats, labels)
    factor = probe.cosine_factor(step, steps_per_epoch, epochs, per_epoch)
    new_params, momentum = probe.sgd_momentum(state["params"], state["momentum"], grads, lrs * factor)
    return {"params": new_params, "momentum": momentum}, loss / num_classifiers

  @functools.partial(jax.jit, out_shardings=replicated)
  def eval_step(state, params, images, labels):
    feats = features(params, augment.preprocess_eval(images, image_size))
    return probe.correct_counts(state["params"], feats, labels), jnp.sum(labels >= 0)

  return jax.jit(features), train_step, eval_step


def read_ahead(batches, batch_sharding, read_images):
  """Yields (images, labels) global arrays of each global index batch in `batches` (padding
  rows: index -1, read as image 0 with label -1); each process reads its slice with
  `read_images(indices, positions in the global batch, batch number)`, a thread reads the next
  batch while the devices work on this one."""
  to_global = lambda x: jax.make_array_from_process_local_data(batch_sharding, x)
  numbered = iter(enumerate(batches))

  def read(item):
    number, index = item
    n = len(index) // jax.process_count()
    start = jax.process_index() * n
    index = index[start:start + n]
    images, labels = read_images(np.maximum(index, 0), np.arange(start, start + n), number)
    return images, np.where(index >= 0, labels, -1).astype(np.int32)

  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    first = next(numbered, None)
    future = pool.submit(read, first) if first is not None else None
    while future is not None:
      images, labels = future.result()
      following = next(numbered, None)
      future = pool.submit(read, following) if following is not None else None
      yield to_global(images), to_global(labels)


class LinearEvaluator:
  """Linear evaluation of a frozen backbone as in the papers (`protocol` "dino" or "dinov2";
  `dino_jax.probe`): classifiers trained `epochs` epochs (of `epoch_length` steps, 0: one pass
  over the labelled training images) with batches of `batch_size` augmented training images,
  SGD momentum 0.9, no weight decay, learning rates `learning_rates` x batch_size / 256 with a
  cosine decay to 0; then scored on the test split's evaluation view. Each learning rate's
  (and, DINOv2, each input's) top-1 is reported, and the best. A tqdm bar counts the epochs.

  DINO: one input, the CLS tokens of the last `n_last_blocks` blocks (4 for ViT-S, 1 for
  ViT-B) and with `avgpool_patchtokens` (ViT-B) the average patch token; the decay is stepped
  per epoch. DINOv2: every input of `grid_blocks` (1, 4) x {without, with the average patch
  token}, decayed per iteration. Swin (no CLS token): its embedding is the one input.
  Raw pixels (params None) have no blocks: nothing is reported for them.
  """
  needs_labels = True
  shards_batches = True
  default_configs = {
      # DINO eval_linear.py: ViT-S n_last_blocks=4; ViT-B n_last_blocks=1, avgpool_patchtokens=True.
      # eval_linear.py: one lr, 0.001 x batch / 256, scored on the test split after every epoch
      # (val_freq 1), its best epoch reported.
      "linear_dino": dict(type="linear", protocol="dino", every_steps=-1, every_epochs=0.0, epochs=100,
                          epoch_length=0, batch_size=1024, learning_rates=(1e-3,), val_every_epochs=1,
                          n_last_blocks=4, avgpool_patchtokens=False, crop_scale=(0.08, 1.0), seed=0,
                          baselines=False, train_split="train", test_split="validation"),
      # DINOv2 eval/linear.py: {last 1, 4 blocks} x {with, without avgpool} x 13 lrs, 10 epochs of 1250 steps.
      "linear_dinov2": dict(type="linear", protocol="dinov2", every_steps=-1, every_epochs=0.0, epochs=10,
                            epoch_length=1250, batch_size=1024,
                            learning_rates=(1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2,
                                            0.1),
                            grid_blocks=(1, 4), val_every_epochs=0, crop_scale=(0.08, 1.0), seed=0,
                            baselines=False, train_split="train", test_split="validation"),
  }

  def __init__(self, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, mesh):
    self.ecfg = ecfg
    self.train_src, self.test_src = common.train_and_test_sources(cfg, ecfg)
    self.num_classes = self.train_src.num_classes
    labels = getattr(self.train_src, "labels", None)
    self.train_index = (np.flatnonzero(np.asarray(labels) >= 0) if labels is not None
                        else np.arange(len(self.train_src)))
    self.batch_size = ecfg.batch_size
    self.steps_per_epoch = ecfg.get("epoch_length", 0) or max(math.ceil(len(self.train_index) / self.batch_size), 1)
    self.epochs = ecfg.epochs
    self.variants = linear_variants(ecfg, cfg.model)
    self.lrs = tuple(float(lr) for lr in ecfg.learning_rates)
    self.scaled_lrs = tuple(lr * self.batch_size / 256 for lr in self.lrs)  # the linear scaling rule
    self.image_size = cfg.aug.global_size
    self.seed = cfg.seed + ecfg.get("seed", 0)
    # DINO's eval_linear.py: RandomResizedCrop(224) at torchvision's default bilinear; DINOv2's: bicubic.
    self.crop = crops.CropSpec(self.image_size, tuple(ecfg.get("crop_scale", (0.08, 1.0))),
                               Image.BILINEAR if ecfg.protocol == "dino" else Image.BICUBIC)
    self.workers = max(1, cfg.data.get("workers", 8))
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.prefix = f"linear_{ecfg.protocol}"
    self.progress = cfg.get("progress_bar", True) and jax.process_index() == 0
    self.features, self.train_step, self.eval_step = make_linear_fns(
        models.make_backbone(cfg.model), self.variants, self.image_size, self.scaled_lrs, self.steps_per_epoch,
        self.epochs, ecfg.protocol == "dino", mesh)
    self.replicated = sharding.replicated(mesh)

  def init_state(self, params) -> dict:
    """Fresh classifiers (and zero momentum) for the input sizes these params give."""
    x = jax.ShapeDtypeStruct((self.batch_size, self.image_size, self.image_size, 3), jnp.float32)
    dims = {name: f.shape[-1] for name, f in jax.eval_shape(self.features, params, x).items()}
    classifiers = probe.init_classifiers(jax.random.PRNGKey(self.seed), dims, len(self.lrs), self.num_classes)
    state = {"params": classifiers, "momentum": jax.tree.map(jnp.zeros_like, classifiers)}
    return jax.device_put(state, self.replicated)

  def train(self, params) -> tuple[dict, dict | None]:
    """The classifiers after `epochs` epochs on augmented training images: each a random
    resized crop of `crop_scale` of the full image (bilinear for DINO, bicubic for DINOv2, as
    their scripts' RandomResizedCrop), flipped with p = 0.5 (`data.read_crops`), made on the
    host by `workers` threads from (seed, step, position in the batch). With
    `val_every_epochs` N > 0 (DINO's val_freq), also each classifier's best `score` over the
    epochs scored (every N-th and the last), else None."""
    state = self.init_state(params)
    every = self.ecfg.get("val_every_epochs", 0)
    best = None
    total = self.epochs * self.steps_per_epoch
    order = lambda step: self.train_index[data.batch_indices(len(self.train_index), self.batch_size, step, self.seed)]
    bar = tqdm.trange(self.epochs, desc=f"{self.prefix} ({len(self.variants) * len(self.lrs)} classifiers)",
                      unit="epoch", leave=False, disable=not self.progress, dynamic_ncols=True)
    with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
      read = lambda index, positions, step: data.read_crops(self.train_src, index, positions, step, self.seed,
                                                            self.crop, pool)
      batches = read_ahead((order(step) for step in range(total)), self.batch_sharding, read)
      try:
        step = 0
        for epoch in bar:
          for _ in range(self.steps_per_epoch):
            images, labels = next(batches)
            state, loss = self.train_step(state, params, images, labels, step)
            step += 1
          bar.set_postfix(loss=f"{float(loss):.4f}")
          if every and ((epoch + 1) % every == 0 or epoch + 1 == self.epochs):
            acc = self.score(state, params)
            best = acc if best is None else {k: np.maximum(best[k], acc[k]) for k in acc}
      finally:  # the reader stops before its pool does
        bar.close()
        batches.close()
    return state, best

  def score(self, state, params) -> dict:
    """{variant: [L] top-1} on the test split's evaluation view."""
    n, b = len(self.test_src), self.batch_size
    index = np.arange(math.ceil(n / b) * b)
    index = np.where(index < n, index, -1).reshape(-1, b)
    correct, count = None, 0
    read = lambda index, positions, number: data.read_batch(self.test_src, index)
    for images, labels in read_ahead(index, self.batch_sharding, read):
      c, labelled_rows = jax.device_get(self.eval_step(state, params, images, labels))
      correct = c if correct is None else {k: correct[k] + c[k] for k in c}
      count += int(labelled_rows)
    return {k: np.asarray(v) / max(count, 1) for k, v in correct.items()}

  def run(self, params) -> dict[str, float]:
    if params is None:  # raw pixels: no blocks to take features from
      return {}
    state, best_epochs = self.train(params)
    acc = best_epochs if best_epochs is not None else self.score(state, params)
    best = max(float(a.max()) for a in acc.values())
    out = {f"{self.prefix}_top1": best}
    for v in self.variants:
      name = "" if self.ecfg.protocol == "dino" else f"_{v.name}"
      if name:
        out[f"{self.prefix}_top1{name}"] = float(acc[v.name].max())
      out.update({f"{self.prefix}_top1{name}_lr{lr:g}": float(a) for lr, a in zip(self.lrs, acc[v.name])})
    return out

  @staticmethod
  def describe(ecfg: ml_collections.ConfigDict) -> str:
    if ecfg.protocol == "dino":
      inputs = (f"last {ecfg.get('n_last_blocks', 4)} blocks' CLS"
                + (" + avgpool" if ecfg.get("avgpool_patchtokens") else ""))
    else:
      inputs = f"last {{{', '.join(map(str, ecfg.get('grid_blocks', probe.DINOV2_GRID_BLOCKS)))}}} blocks x avgpool"
    lrs = len(ecfg.learning_rates)
    return (f"top-1 on {ecfg.test_split} (linear, {ecfg.protocol} protocol: {inputs}, "
            + (f"best of {lrs} learning rates, " if lrs > 1 else f"lr {ecfg.learning_rates[0]:g}, ")
            + (f"best epoch of {ecfg.epochs})" if ecfg.get("val_every_epochs", 0) else f"{ecfg.epochs} epochs)"))

  @staticmethod
  def check(name: str, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, enabled: bool) -> None:
    prefix = f"evals.{name}."
    validate.one_of(ecfg, "protocol", probe.PROTOCOLS, prefix=prefix)
    protocol = ecfg.protocol
    lrs = ecfg.get("learning_rates", ())
    if not isinstance(lrs, (list, tuple)) or not lrs or not all(validate.is_number(lr) and lr > 0 for lr in lrs):
      raise UsageError(f"{prefix}learning_rates must be a non-empty list of positive numbers, not {lrs!r}")
    for key in ("epochs", "batch_size"):
      validate.positive_int(ecfg, key, prefix=prefix)
    if "val_every_epochs" in ecfg:
      validate.positive_int(ecfg, "val_every_epochs", zero=True, prefix=prefix)
    length = ecfg.get("epoch_length", 0)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
      raise UsageError(f"{prefix}epoch_length must be 0 (one pass over the train split) or a positive "
                       f"number of steps, not {length!r}")
    if "crop_scale" in ecfg:
      validate.fraction_range(ecfg, "crop_scale", prefix=prefix)
    key, blocks = (("n_last_blocks", [ecfg.get("n_last_blocks", 4)]) if protocol == "dino" else
                   ("grid_blocks", list(ecfg.get("grid_blocks", probe.DINOV2_GRID_BLOCKS))))
    shown = blocks[0] if protocol == "dino" else tuple(blocks)
    if not blocks or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in blocks):
      raise UsageError(f"evals.{name}.{key} must be {'a positive int' if protocol == 'dino' else 'positive ints'}, "
                       f"not {shown!r}")
    if enabled and cfg.model.get("name", "vit") == "vit" and max(blocks) > (depth := backbone_blocks(cfg.model)):
      raise UsageError(f"evals.{name}.{key} {shown!r} asks for more blocks than the backbone's {depth} "
                       f"(model.depth)")
