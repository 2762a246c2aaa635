"""Evaluators plugged from the config, run on the teacher during training and at its end.

`config.evals` maps a name to an evaluator config whose `type` picks the class here (as
big_vision's `config.evals`); `every_steps` says when it runs: N > 0 every N steps and at the
end, 0 only at the end of the run, -1 never (or `every_epochs`, see `train.eval_every_steps`).
An evaluator turns backbone parameters into a dict of metrics; `baselines=True` also scores
the same network at random initialization and raw pixels at the end, next to the trained
teacher. `python -m dino_jax.evaluate run --workdir RUN --evals NAME` runs one on a saved run.

  knn     DINO's weighted k-NN top-1 (train split as memory, test split as queries) for each k
          of `k` (DINO: 10, 20, 100, 200; T = 0.07): `knn_top1` is k = 20's (the paper's),
          `knn_top1_k<k>` each k's; with `linear_probe`, the fast linear probe on the same
          frozen embeddings (`linear_top1`, the online monitor).
  linear  The papers' linear evaluation (`dino_jax.probe`): classifiers on the frozen
          backbone's last blocks, trained on augmented training images (random resized crop,
          scale 0.08-1, of the full image and flip, on the host as torchvision's) with a backbone
          forward on every batch, scored on the evaluation view of the test split; `protocol`
          "dino" (one input, a learning-rate sweep: `linear_dino_top1`,
          `linear_dino_top1_lr<lr>`) or "dinov2" (the grid of inputs x learning rates:
          `linear_dinov2_top1`, `linear_dinov2_top1_<input>` and
          `linear_dinov2_top1_<input>_lr<lr>`). As in the papers, the best is picked on the
          test split.

Features are sharded over the mesh, each process decoding its slice of every batch; k-NN and
the fast probe then run on the host (`dino_jax.knn`, `dino_jax.probe`), the protocols' steps
on the devices (jitted, batches split over the mesh, classifiers replicated).

The papers' downstream evaluations live in `dino_jax.downstream` (retrieval, copy_detection,
video_propagation, correspondence, segmentation, depth: see its docstring); they read a
benchmark folder (`path`), not the training data, so they also run when it has no labels
(`needs_labels` False).
"""
import concurrent.futures
import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import tqdm

from dino_jax import augment
from dino_jax import crops
from dino_jax import data
from dino_jax import knn
from dino_jax import models
from dino_jax import probe
from dino_jax import sharding
from dino_jax.downstream import common
from dino_jax.downstream import correspondence
from dino_jax.downstream import dense
from dino_jax.downstream import retrieval
from dino_jax.downstream import video
from dino_jax.errors import UsageError

EVALUATED = {"teacher": "trained teacher", "random_init": "random init", "raw_pixels": "raw pixels"}


def make_feature_fn(backbone, image_size: int, mesh) -> Callable:
  """Jitted (params, uint8 images, labels) -> (features, labels), replicated to every process.

  Features are the backbone's global embedding on the evaluation view, or, with params None,
  the raw pixels (the baseline a learned representation should beat).
  """
  replicated = sharding.replicated(mesh)

  @functools.partial(jax.jit, out_shardings=(replicated, replicated))
  def features(params, images, labels):
    if params is None:
      return images.reshape(images.shape[0], -1).astype(np.float32) / 255.0, labels
    x = augment.preprocess_eval(images, image_size)
    return backbone.apply({"params": params}, x)["embedding"], labels

  return features


def extract_features(feature_fn, params, source, batch_size: int, batch_sharding) -> tuple[np.ndarray, np.ndarray]:
  """Features and labels of every image of `source`; each process decodes its slice of
  every batch (the last batch is padded with image 0 and the padding dropped)."""
  local = batch_size // jax.process_count()
  start = jax.process_index() * local
  to_global = lambda x: jax.make_array_from_process_local_data(batch_sharding, x)
  feats, labels = [], []
  for i in range(0, len(source), batch_size):
    index = np.arange(i, i + batch_size)
    valid = index < len(source)
    images, lab = data.read_batch(source, np.where(valid, index, 0)[start:start + local])
    f, lab = feature_fn(params, to_global(images), to_global(lab))
    feats.append(np.asarray(f)[valid])
    labels.append(np.asarray(lab)[valid])
  return np.concatenate(feats), np.concatenate(labels)


def labelled(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The rows with a class (label >= 0; images outside any class folder have -1)."""
  keep = labels >= 0
  return features[keep], labels[keep]


def train_and_test_sources(cfg: ml_collections.ConfigDict, ecfg: ml_collections.ConfigDict):
  """The evaluator's train and test splits; the test split numbers its classes by the train
  split's (a folder split numbers classes by the training split's list)."""
  train = data.make_source(cfg.data, ecfg.train_split)
  test = data.make_source(cfg.data, ecfg.test_split, classes=getattr(train, "classes", None))
  for split, source in ((ecfg.train_split, train), (ecfg.test_split, test)):
    if hasattr(source, "labels") and not (np.asarray(source.labels) >= 0).any():
      raise UsageError(f"evals: split {split!r} has no image in a class folder, so nothing to score")
  return train, test


def main_k(ks: tuple[int, ...]) -> int:
  """The k that `knn_top1` reports: 20 (DINO's tables) when among them, else the first."""
  return 20 if 20 in ks else ks[0]


class KnnEvaluator:
  """DINO's weighted k-NN (each k of `k`, T) and optionally the linear probe on frozen
  embeddings. Metrics: `knn_top1` (k = 20, or the only / first k), with several k also
  `knn_top1_k<k>` for each; `linear_top1` with `linear_probe`."""
  needs_labels = True  # scores classification of the training data's classes
  shards_batches = True  # evals.<name>.batch_size is split over the devices

  def __init__(self, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, mesh):
    self.ecfg = ecfg
    self.memory, self.queries = train_and_test_sources(cfg, ecfg)
    self.features = make_feature_fn(models.make_backbone(cfg.model), cfg.aug.global_size, mesh)
    self.batch_sharding = sharding.batch_sharding(mesh)

  def run(self, params) -> dict[str, float]:
    e = self.ecfg
    train_f, train_y = labelled(*extract_features(self.features, params, self.memory, e.batch_size,
                                                  self.batch_sharding))
    test_f, test_y = labelled(*extract_features(self.features, params, self.queries, e.batch_size,
                                                self.batch_sharding))
    ks = knn.as_ks(e.k)
    acc = knn.knn_accuracies(train_f, train_y, test_f, test_y, self.memory.num_classes, ks, e.temperature)
    out = {"knn_top1": acc[main_k(ks)]}
    if len(ks) > 1:
      out.update({f"knn_top1_k{k}": a for k, a in acc.items()})
    if e.linear_probe:
      out["linear_top1"] = probe.linear_probe(train_f, train_y, test_f, test_y, self.memory.num_classes,
                                              epochs=e.linear_epochs)["test_top1"]
    return out

  @staticmethod
  def describe(ecfg: ml_collections.ConfigDict) -> str:
    ks = knn.as_ks(ecfg.k)
    others = [k for k in ks if k != main_k(ks)]
    return (f"top-1 on {ecfg.test_split} (k-NN: k={main_k(ks)}"
            + (f" (also {', '.join(map(str, others))})" if others else "") + f", T={ecfg.temperature})")

  @staticmethod
  def check(name: str, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, enabled: bool) -> None:
    del cfg, enabled
    k = ecfg.k
    values = list(k) if isinstance(k, (list, tuple)) else [k]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
      raise UsageError(f"evals.{name}.k must be a positive int or a list of them (DINO: 10, 20, 100, 200), not {k!r}")


# ---------------------------------------------------------------------------------------
# The linear evaluation protocols of DINO and DINOv2 (dino_jax.probe holds the math).
# ---------------------------------------------------------------------------------------

def backbone_blocks(model_cfg: ml_collections.ConfigDict) -> int:
  """How many blocks the backbone has (every backbone: num_layers = blocks + 1)."""
  return models.make_backbone(model_cfg).num_layers - 1


def linear_variants(ecfg: ml_collections.ConfigDict, model_cfg: ml_collections.ConfigDict) -> tuple:
  """The classifier inputs (`probe.Variant`) of evaluator config `ecfg` on this backbone."""
  return probe.protocol_variants(ecfg.protocol, ecfg.get("n_last_blocks", 4), ecfg.get("avgpool_patchtokens", False),
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
    out = backbone.apply({"params": params}, sharding.constrain(x, batch), layers=layers)
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

  def __init__(self, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, mesh):
    self.ecfg = ecfg
    self.train_src, self.test_src = train_and_test_sources(cfg, ecfg)
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

  def train(self, params) -> dict:
    """The classifiers after `epochs` epochs on augmented training images: each a random
    resized crop of `crop_scale` of the full image (bilinear for DINO, bicubic for DINOv2, as
    their scripts' RandomResizedCrop), flipped with p = 0.5 (`data.read_crops`), made on the
    host by `workers` threads from (seed, step, position in the batch)."""
    state = self.init_state(params)
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
        for _ in bar:
          for _ in range(self.steps_per_epoch):
            images, labels = next(batches)
            state, loss = self.train_step(state, params, images, labels, step)
            step += 1
          bar.set_postfix(loss=f"{float(loss):.4f}")
      finally:  # the reader stops before its pool does
        bar.close()
        batches.close()
    return state

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
    acc = self.score(self.train(params), params)
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
    return (f"top-1 on {ecfg.test_split} (linear, {ecfg.protocol} protocol: {inputs}, best of "
            f"{len(ecfg.learning_rates)} learning rates, {ecfg.epochs} epochs)")

  @staticmethod
  def check(name: str, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, enabled: bool) -> None:
    protocol = ecfg.get("protocol")
    if protocol not in probe.PROTOCOLS:
      raise UsageError(f"evals.{name}.protocol must be one of {', '.join(probe.PROTOCOLS)}, not {protocol!r}")
    lrs = ecfg.get("learning_rates", ())
    if (not isinstance(lrs, (list, tuple)) or not lrs
        or any(isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr <= 0 for lr in lrs)):
      raise UsageError(f"evals.{name}.learning_rates must be a non-empty list of positive numbers, not {lrs!r}")
    for key in ("epochs", "batch_size"):
      value = ecfg.get(key)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"evals.{name}.{key} must be a positive int, not {value!r}")
    length = ecfg.get("epoch_length", 0)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
      raise UsageError(f"evals.{name}.epoch_length must be 0 (one pass over the train split) or a positive "
                       f"number of steps, not {length!r}")
    scale = ecfg.get("crop_scale", (0.08, 1.0))
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
      raise UsageError(f"evals.{name}.crop_scale must be a pair (low, high) with 0 < low <= high <= 1, not {scale!r}")
    key, blocks = (("n_last_blocks", [ecfg.get("n_last_blocks", 4)]) if protocol == "dino" else
                   ("grid_blocks", list(ecfg.get("grid_blocks", probe.DINOV2_GRID_BLOCKS))))
    shown = blocks[0] if protocol == "dino" else tuple(blocks)
    if not blocks or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in blocks):
      raise UsageError(f"evals.{name}.{key} must be {'a positive int' if protocol == 'dino' else 'positive ints'}, "
                       f"not {shown!r}")
    if enabled and cfg.model.get("name", "vit") == "vit" and max(blocks) > (depth := backbone_blocks(cfg.model)):
      raise UsageError(f"evals.{name}.{key} {shown!r} asks for more blocks than the backbone's {depth} "
                       f"(model.depth)")


EVALUATORS = {"knn": KnnEvaluator, "linear": LinearEvaluator,
              "retrieval": retrieval.RetrievalEvaluator, "copy_detection": retrieval.CopyDetectionEvaluator,
              "video_propagation": video.VideoPropagationEvaluator,
              "correspondence": correspondence.CorrespondenceEvaluator,
              "segmentation": dense.SegmentationEvaluator, "depth": dense.DepthEvaluator}


def check_one(name: str, ecfg: ml_collections.ConfigDict, cfg: ml_collections.ConfigDict, num_devices: int,
              enabled: bool = True) -> None:
  """One UsageError for evaluator `name`'s config if it cannot run; checks that depend on the
  model only where it will run (`enabled`)."""
  if ecfg.get("type") not in EVALUATORS:
    raise UsageError(f"evals.{name}.type must be one of {', '.join(EVALUATORS)}, not {ecfg.get('type')!r}")
  if getattr(EVALUATORS[ecfg.type], "shards_batches", False):
    common.check_positive_int(name, ecfg, "batch_size")
    if ecfg.batch_size % num_devices:
      raise UsageError(f"evals.{name}.batch_size {ecfg.batch_size} is not divisible by the {num_devices} devices")
  EVALUATORS[ecfg.type].check(name, ecfg, cfg, enabled)


def check(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
  """One UsageError for an evaluator config that cannot run."""
  for name, ecfg in cfg.evals.items():
    check_one(name, ecfg, cfg, num_devices, enabled=ecfg.every_steps >= 0)


def make(cfg: ml_collections.ConfigDict, mesh, labelled: bool) -> dict:
  """The config's evaluators that will run (every_steps >= 0), by name; those that score the
  training data's classes (`needs_labels`) only when it has labels (`labelled`)."""
  return {name: EVALUATORS[e.type](e, cfg, mesh) for name, e in cfg.evals.items()
          if e.every_steps >= 0 and (labelled or not EVALUATORS[e.type].needs_labels)}
