"""Checks of a training run's settings, done before anything is compiled (from the primitives
of `dino_jax.validate`).

  check(cfg, num_devices)        one UsageError for a config the step cannot run, or would run
                                 without meaning (a zero count, a scale outside (0, 1], ...)
  size_warnings(cfg, overridden) image and crop sizes that look unintended (the run goes on)
  check_workdir(path)            the run directory exists (created) and takes files

Each entry point checks a run's config once, before its first compile: `trainer.train` (and so
`python -m dino_jax.train` and `dino_jax.pretrain`) and `python -m dino_jax.bench`.
"""
import os
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import ml_collections

from dino_jax import augment
from dino_jax import evaluators
from dino_jax import models
from dino_jax import objectives
from dino_jax import optim
from dino_jax import phases
from dino_jax import validate
from dino_jax.errors import UsageError

DTYPES = ("auto", "float32", "bfloat16", "float16")
MIN_MASKED_PATCHES = 3  # the smallest block `masking.block_mask` places


def _check_counts(cfg, num_devices: int) -> None:
  for key in ("batch_size", "log_every_steps", "checkpoint.every_steps", "checkpoint.keep", "head.out_dim",
              "head.hidden_dim", "head.bottleneck_dim", "aug.global_size", "aug.local_size", "data.image_size",
              "model.patch_size"):
    validate.positive_int(cfg, key)
  if "workers" in cfg.data:
    validate.positive_int(cfg, "data.workers")
  if "worker_processes" in cfg.data:
    validate.positive_int(cfg, "data.worker_processes", zero=True)
  validate.positive_number(cfg, "epochs")
  length = cfg.get("epoch_length", 0)
  if isinstance(length, bool) or not isinstance(length, int) or length < 0:
    raise UsageError(f"epoch_length must be 0 (the training data's size / batch_size) or a positive number of "
                     f"steps, not {length!r}")
  if cfg.batch_size % num_devices:
    raise UsageError(f"batch_size {cfg.batch_size} is not divisible by the {num_devices} devices")
  validate.positive_int(cfg, "per_gpu_batch_size", zero=True)
  group = objectives.group_size(cfg)
  if cfg.batch_size % group:
    raise UsageError(f"per_gpu_batch_size {group} does not divide batch_size {cfg.batch_size} (the global batch is "
                     "the per-GPU batch x the GPU count of the official run)")
  if "koleo" in objectives.active(cfg) and group < 2:
    raise UsageError(f"per_gpu_batch_size {group}: KoLeo needs at least 2 images per group (a nearest neighbour)")
  evaluators.check(cfg, num_devices)


def _check_choices(cfg) -> None:
  validate.one_of(cfg, "on_nonfinite", ("stop", "skip"))
  validate.one_of(cfg, "loss.centering", ("centering", "sinkhorn"))
  validate.one_of(cfg, "loss.teacher_temp_steps", optim.TEACHER_TEMP_STEPS)
  validate.one_of(cfg, "optim.lr_scaling", optim.LR_SCALING)
  validate.one_of(cfg, "optim.clip_mode", optim.CLIP_MODES)
  validate.one_of(cfg, "optim.freeze_mode", optim.FREEZE_MODES)
  if "name" in cfg.optim:  # an optim dict without it: AdamW
    validate.one_of(cfg, "optim.name", optim.OPTIMIZERS)
  validate.one_of(cfg, "model.remat", ("none", *models.REMAT_POLICIES))
  if "drop_path_mode" in cfg.model:  # a model dict without it: per-sample
    validate.one_of(cfg, "model.drop_path_mode", ("sample", "subset"))
  validate.one_of(cfg, "model.attention", ("xla", "cudnn"))
  validate.one_of(cfg, "model.dtype", DTYPES)
  if cfg.model.get("packed_crops", False) and cfg.model.get("name", "vit") != "vit":
    raise UsageError(f"model.packed_crops packs a ViT's tokens; the {cfg.model.name} backbone has no such option")
  if cfg.model.get("scan", False):
    if cfg.model.get("name", "vit") != "vit":
      raise UsageError(f"model.scan runs a ViT's blocks as one loop; the {cfg.model.name} backbone has no such option")
    if cfg.model.drop_path_rate and not cfg.model.get("drop_path_uniform", False):
      raise UsageError("model.scan needs one stochastic-depth rate for every block: model.drop_path_uniform=True "
                       "(DINOv2) or model.drop_path_rate=0")


def _check_heads(m: ml_collections.ConfigDict) -> None:
  """Attention heads split each width evenly (ViT: width; Swin: every stage's width; a ResNet has none)."""
  if m.get("name", "vit") == "resnet":
    return
  if m.get("name", "vit") == "swin":
    if len(m.depths) != len(m.num_heads):
      raise UsageError(f"model.num_heads {tuple(m.num_heads)} must give one head count per stage of "
                       f"model.depths {tuple(m.depths)}")
    widths = [m.width * 2 ** s for s in range(len(m.depths))]
    heads = list(m.num_heads)
  else:
    widths, heads = [m.width], [m.num_heads]
  for stage, (width, num_heads) in enumerate(zip(widths, heads)):
    if num_heads <= 0 or width % num_heads:
      where = f"stage {stage}'s width {width}" if len(widths) > 1 else f"model.width {width}"
      raise UsageError(f"model.num_heads {num_heads} does not divide {where}")


def _check_crops(cfg, backbone) -> None:
  validate.one_of(cfg, "aug.blur", augment.BLURS)
  probs = cfg.aug.blur_probs
  if not (isinstance(probs, (list, tuple)) and len(probs) == 3 and all(validate.is_number(p) and 0 <= p <= 1
                                                                       for p in probs)):
    raise UsageError(f"aug.blur_probs must be 3 probabilities (global crop 1, global crop 2, local crops), "
                     f"not {probs!r}")
  low, high = validate.number_pair(cfg, "aug.blur_sigma")
  if not 0 < low <= high:
    raise UsageError(f"aug.blur_sigma must be (low, high) with 0 < low <= high, not {(low, high)!r}")
  validate.fraction_range(cfg, "aug.global_scale")
  validate.fraction_range(cfg, "aug.local_scale")
  if cfg.aug.num_local < 0:
    raise UsageError(f"aug.num_local must be >= 0, not {cfg.aug.num_local}")
  if cfg.aug.num_local and cfg.aug.local_size > cfg.aug.global_size:
    raise UsageError(f"aug.global_size {cfg.aug.global_size} is smaller than aug.local_size {cfg.aug.local_size}: "
                     "global crops are the large views")
  for key in ("aug.global_size", "aug.local_size")[:2 if cfg.aug.num_local else 1]:
    try:
      backbone.grid(validate.lookup(cfg, key))
    except ValueError as e:
      raise UsageError(f"{key} {e}") from None


def _check_attention(cfg) -> None:
  """cuDNN's fused attention: bfloat16 or float16 on a GPU (odd token counts go padded to even,
  `models.layers.attention`)."""
  if cfg.model.attention == "cudnn" and (jax.default_backend() != "gpu" or
                                         models.compute_dtype(cfg.model.dtype) == jnp.float32):
    raise UsageError("model.attention=cudnn needs a GPU and model.dtype bfloat16 or float16")


def _check_masking(cfg, backbone) -> None:
  """With iBOT on, every step masks some patches (else its loss and targets are empty)."""
  if "ibot" not in objectives.active(cfg) or cfg.get("distill", {}).get("teacher"):  # distillation masks nothing
    return
  if cfg.model.get("name", "vit") != "vit":
    raise UsageError(f"loss.ibot_weight > 0 needs a ViT (model.name=vit): {cfg.model.name} has no mask token")
  mask_prob = cfg.mask.mask_prob
  if not validate.is_number(mask_prob) or not 0 < mask_prob <= 1:
    raise UsageError(f"mask.mask_prob must be in (0, 1] while iBOT is on (loss.ibot_weight > 0), not {mask_prob!r}")
  validate.fraction_range(cfg, "mask.mask_ratio", low_may_be_zero=True)
  crops = objectives.group_size(cfg) * len(augment.view_specs(cfg.aug)[0])
  if int(crops * mask_prob) < 1:
    raise UsageError(f"mask.mask_prob {mask_prob} masks none of the {crops} global crops of a group of "
                     "per_gpu_batch_size images")
  h, w = backbone.grid(cfg.aug.global_size)
  if int(h * w * cfg.mask.mask_ratio[1]) < MIN_MASKED_PATCHES:
    raise UsageError(f"mask.mask_ratio {tuple(cfg.mask.mask_ratio)} masks fewer than {MIN_MASKED_PATCHES} of the "
                     f"{h * w} patches of a global crop: nothing would be masked")


def _check_lineage(cfg, backbone) -> None:
  """A phase (`phase.*`) and distillation (`distill.*`) settings that can work."""
  phase = cfg.get("phase", {})
  if phase.get("start_from"):
    if cfg.model.get("init_from"):
      raise UsageError("set phase.start_from or model.init_from, not both")
    unknown = sorted(set(phase.carry) - set(phases.CARRY))
    if unknown:
      raise UsageError(f"phase.carry: unknown part(s) {', '.join(unknown)} (known: {', '.join(phases.CARRY)})")
  d = cfg.get("distill", {})
  if not d.get("teacher"):
    if "model" in d:
      raise UsageError("distill.teacher is empty: name the teacher's run directory (--config.distill.teacher=...); "
                       "this config distils from it")
    return
  if "model" not in d or "head" not in d:
    raise UsageError("distill.teacher needs the teacher's architecture in distill.model and distill.head "
                     "(see configs/demo_distill_fashion_mnist.py)")
  if "region" in objectives.active(cfg):
    raise UsageError("distillation (distill.teacher) does not support EsViT's region loss (loss.region_weight)")
  if "resnet" in (cfg.model.get("name", "vit"), d.get("model", {}).get("name", "vit")):
    raise UsageError("distillation (distill.teacher) takes ViT or Swin teachers and students (DINOv2 Sec. 5), "
                     "not ResNets (model.name / distill.model.name)")
  try:
    if d.head.out_dim != cfg.head.out_dim:
      raise UsageError(f"distill.head.out_dim {d.head.out_dim} must equal head.out_dim {cfg.head.out_dim}: "
                       "the student learns the teacher's prototypes")
    models.backbone_class(d.model)
    _check_heads(d.model)
    teacher = models.make_backbone(d.model)
  except (AttributeError, KeyError) as e:
    raise UsageError(f"distill.model / distill.head lack a setting ({str(e).strip(chr(34))}): give the "
                     "teacher's whole model and head config") from None
  if "ibot" in objectives.active(cfg) and teacher.grid(cfg.aug.global_size) != backbone.grid(cfg.aug.global_size):
    raise UsageError(f"with iBOT the teacher's patch grid {teacher.grid(cfg.aug.global_size)} must be the student's "
                     f"{backbone.grid(cfg.aug.global_size)} on global crops (distill.model.patch_size)")


def check(cfg: ml_collections.ConfigDict, num_devices: int) -> None:
  """One UsageError for a config the train step cannot run or would run without meaning."""
  validate.finite_numbers(cfg)
  _check_counts(cfg, num_devices)
  if "follow_external_symlinks" in cfg.data:
    validate.boolean(cfg, "data.follow_external_symlinks")
  _check_choices(cfg)
  models.backbone_class(cfg.model)  # a known model.name
  _check_heads(cfg.model)
  backbone = models.make_backbone(cfg.model)
  _check_crops(cfg, backbone)
  _check_attention(cfg)
  _check_masking(cfg, backbone)
  _check_lineage(cfg, backbone)


def size_warnings(cfg: ml_collections.ConfigDict, overridden=()) -> list[str]:
  """Image and crop sizes that look unintended, one line each. `overridden`: the config keys
  set on the command line (changing data.image_size alone leaves the crops as they were).
  Training crops come from the full image; data.image_size is the square evaluations decode to
  (their view: resized to global_size * 256 / 224, center crop)."""
  image, glob, local = cfg.data.image_size, cfg.aug.global_size, cfg.aug.local_size
  out = []
  if "data.image_size" in overridden and not {"aug.global_size", "aug.local_size"} & set(overridden):
    out.append(f"data.image_size={image} is set without aug.global_size / aug.local_size: training still takes "
               f"{glob} px global and {local} px local crops (data.image_size is the square evaluations decode "
               "to); to train at another size set those too (multiples of model.patch_size) and "
               "model.pos_embed_grid")
  if image < glob:
    out.append(f"data.image_size {image} is smaller than aug.global_size {glob}: every evaluation view is upsampled")
  elif 2 * glob < image:
    out.append(f"aug.global_size {glob} is less than half of data.image_size {image}: evaluation views throw most "
               "of the decoded resolution away")
  m = cfg.model
  if m.get("name", "vit") == "swin" and m.get("image_size", 224) != glob:
    out.append(f"model.image_size {m.get('image_size', 224)} is not aug.global_size {glob}: the Swin's windows and "
               "shifts are fixed for model.image_size (EsViT builds them for its global crops)")
  if m.get("name", "vit") == "vit" and not m.get("init_from") and glob // m.patch_size != m.pos_embed_grid:
    out.append(f"model.pos_embed_grid {m.pos_embed_grid} is not the global crops' grid {glob // m.patch_size} "
               f"(aug.global_size {glob} / model.patch_size {m.patch_size}): the position embedding is resized "
               "at every step")
  return out


def check_workdir(path: str) -> None:
  """Creates the local run directory `path` and writes a test file in it; one UsageError where
  it is a file, lies under one, or takes no files (/proc). Remote paths (gs://...) are left to
  the storage library."""
  if "://" in path:
    return
  workdir = pathlib.Path(path)
  files = [p for p in (workdir, *workdir.parents) if p.exists() and not p.is_dir()]
  if files:
    where = "is a file" if files[0] == workdir else f"lies under the file {files[0]}"
    raise UsageError(f"--workdir {path} {where}, not a directory")
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    raise UsageError(f"--workdir {path} cannot be created: {e.strerror or e}") from None
  try:
    tempfile.TemporaryFile(dir=path).close()
  except OSError as e:
    raise UsageError(f"--workdir {path} takes no files: {e.strerror or e}") from None
