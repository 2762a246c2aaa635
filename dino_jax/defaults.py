"""The defaults every run config starts from: DINO's ViT-S/16 recipe (Caron et al. 2021, App. B)
with every evaluator's defaults (`base_config`), and the DINOv2 and EsViT recipes' settings
(`dinov2_config`, `esvit_config`). The config files of `configs/` build on these; the library
uses them where a run directory does not say (converted weights, evaluators added since a run
was made).
"""
import ml_collections

from dino_jax import evaluators
from dino_jax.models import swin
from dino_jax.models.vit import VIT_SIZES


def vit(size: str, patch_size: int, **overrides) -> dict:
  width, depth, heads, mlp_dim = VIT_SIZES[size]
  return dict(dict(patch_size=patch_size, width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim),
              **overrides)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 1024  # global, over all devices and processes
  # The official run's per-GPU batch: DINOv2 computes KoLeo, its iBOT mask strata and its
  # stochastic-depth subsets within each GPU's batch, so these take groups of this many images,
  # whatever the device count here (0: the whole global batch is one group).
  c.per_gpu_batch_size = 0
  c.epochs = 100.0
  c.epoch_length = 0  # steps per epoch of the schedules and evals; 0: len(training data) // batch_size
  c.log_every_steps = 50
  c.progress_bar = True
  c.on_nonfinite = "stop"  # or "skip": a step with non-finite loss/gradients is not applied

  # image_size: the square evaluations decode to (shorter side, center crop); training crops come
  # from the full image. workers: loader threads per process (decode + crops; docs/performance.md);
  # worker_processes: 0, or that many loader processes (grain), each with `workers` threads.
  # follow_external_symlinks: read links in an image folder that lead out of data.path (else skipped, with a warning).
  c.data = dict(source="tfds", name="imagenet2012", path="", data_dir="", image_size=256,
                train_split="train", read_timeout_s=60.0, workers=8, worker_processes=0,  # a longer image read stops the run (dino_jax.data)
                follow_external_symlinks=False)
  # drop_path_mode: "sample" (DINO's and EsViT's per-sample DropPath) or "subset" (DINOv2: the
  # branches run on a kept subset of each group's samples, models.layers.subset_drop_path).
  c.model = dict(vit("small", 16), name="vit", ffn="mlp", num_registers=0, layerscale=None, drop_path_rate=0.1,
                 drop_path_uniform=False, drop_path_mode="sample",
                 cls_token_std=0.02,  # DINO's CLS init: trunc_normal(0.02)
                 pos_embed_grid=14, interpolate_offset=0.1, interpolate_antialias=False,
                 init_from="",  # a run directory (e.g. dino_jax.convert's) whose teacher starts the run
                 # Compute dtype: "auto" is bfloat16 on GPUs and TPUs (float32 parameters, softmaxes, losses,
                 # EMA, centers), float32 on CPUs (models.compute_dtype); the other speed knobs: models.ViT.
                 dtype="auto", remat="none", scan=False, attention="xla",
                 packed_crops=False)  # True: the student's crops in one packed pass (models.packing)
  c.head = dict(out_dim=65536, hidden_dim=2048, bottleneck_dim=256, num_layers=3, share_ibot_head=False,
                norm_last_layer=True,  # False: a trainable weight-norm gain (models.DINOHead)
                ibot_bottleneck_dim=0)  # the iBOT head's, when not bottleneck_dim (DINOv2 ViT-g: 256 vs 384)
  c.aug = dict(global_size=224, local_size=96, num_local=8, global_scale=(0.4, 1.0),
               local_scale=(0.05, 0.4), jitter_prob=0.8, jitter=(0.4, 0.4, 0.2, 0.1),
               grayscale_prob=0.2, blur_sigma=(0.1, 2.0), solarize_prob=0.2,
               blur="pil", blur_probs=(1.0, 0.1, 0.5))  # DINO's: PIL's GaussianBlur on global 1, 2, locals
  c.mask = dict(mask_prob=0.5, mask_ratio=(0.1, 0.5))
  c.loss = dict(dino_weight=1.0, ibot_weight=0.0, koleo_weight=0.0, region_weight=0.0, student_temp=0.1,
                teacher_temp=(0.04, 0.04), teacher_temp_warmup_epochs=0.0,
                teacher_temp_steps="per_epoch",  # DINO; DINOv2: "per_step" (optim.teacher_temp_schedule)
                centering="centering", center_momentum=0.9)
  # lr_scaling: "linear_256" (DINO) or "sqrt_1024" (DINOv2); clip_mode: "per_tensor" (DINO),
  # "per_module" (DINOv2) or "global"; freeze_mode: "skip" (DINO) or "zero_lr" (DINOv2) (dino_jax.optim).
  # name: "adamw" (DINO's ViTs), "sgd" or "lars" (its ResNets); momentum: sgd's and lars' (optim.make_optimizer).
  c.optim = dict(name="adamw", momentum=0.9, base_lr=5e-4, lr_scaling="linear_256", min_lr=1e-6, warmup_epochs=10.0,
                 weight_decay=(0.04, 0.4),
                 betas=(0.9, 0.999), clip_grad=3.0, clip_mode="per_tensor", layer_decay=1.0, patch_embed_lr_mult=1.0,
                 freeze_last_layer_epochs=1.0, freeze_mode="skip", teacher_momentum=(0.996, 1.0))
  # Evaluators by name, each type's defaults from its module (dino_jax.evaluators): every_steps N > 0
  # every N steps and at the end, 0 at the end only, -1 never; baselines: also random init and raw
  # pixels at the end. Only knn runs (at the end); the papers' evaluations are off until turned on
  # (or run on a saved run with `python -m dino_jax.evaluate run`).
  c.evals = ml_collections.ConfigDict(evaluators.default_configs())
  c.checkpoint = dict(every_steps=1000, keep=3)
  # A phase continues another run under this config (dino_jax.phases): the carried parts of
  # start_from's checkpoint (start_step; -1 the newest) start this run. Carrying "step" continues
  # the step count and with it every schedule (`epochs` then counts all phases); without it the
  # schedules restart. A changed position-embedding grid is resized once and stored.
  c.phase = dict(name="", start_from="", start_step=-1,
                 carry=("params", "teacher", "opt_state", "centers", "step"))
  # Distillation (dino_jax.distill; DINOv2 Sec. 5): a frozen teacher from run `teacher` (its
  # EMA teacher; teacher_step -1 the newest) gives the targets; `distill.model` / `distill.head`
  # (set by the distillation configs) are its architecture. The train state's "teacher" is then
  # the EMA of the student: the model extract, the evaluators and export use.
  c.distill = dict(teacher="", teacher_step=-1)
  # Devices: ("data", "fsdp") mesh; arrays of >= fsdp_min_size elements are split over "fsdp".
  c.mesh = dict(fsdp=1, fsdp_min_size=2 ** 20)
  return c


def dinov2_config(size: str) -> ml_collections.ConfigDict:
  """DINOv2 recipe (Oquab et al. 2023, App. B/Table 16): the optimizer rules of
  facebookresearch/dinov2's `ssl_default_config.yaml` (lr `base_lr * sqrt(batch / 1024)` with
  base 0.004, epochs of 1250 steps, clipping per module, uniform stochastic depth, a trainable
  gain in the heads' weight-normalized last layers, teacher temperature warmed up per step,
  the zero-lr last-layer freeze, layer-wise lr decay 0.9, global scale (0.32, 1)) with the
  choices of its ViT-L/14 and ViT-g/14 yamls (`vitl14.yaml`, `vitg14.yaml`): patch 14,
  Sinkhorn-Knopp, separate iBOT head, teacher momentum 0.994, 98 px local crops, drop path 0.4
  for large and giant (0.1 for small and base here). ViT-L and ViT-g scan their blocks
  (`models.ViT.scan_blocks`: the same function, a compile of seconds instead of minutes)."""
  c = base_config()
  c.model = dict(vit(size, 14), name="vit", ffn="swiglu" if size == "giant" else "mlp", num_registers=0,
                 layerscale=1e-5, drop_path_rate={"small": 0.1, "base": 0.1}.get(size, 0.4),
                 drop_path_uniform=True, drop_path_mode="subset",
                 cls_token_std=1e-6,  # DINOv2's CLS init: normal(1e-6)
                 pos_embed_grid=16, interpolate_offset=0.1, interpolate_antialias=False,  # 224 px / 14
                 init_from="", dtype="auto", remat="none", scan=size in ("large", "giant"), attention="xla",
                 packed_crops=False)
  c.head = dict(out_dim=65536, hidden_dim=2048, bottleneck_dim=384 if size == "giant" else 256,
                num_layers=3, share_ibot_head=False, norm_last_layer=False, ibot_bottleneck_dim=0)
  # DINOv2's blur: torchvision's 9-tap kernel, applied with p = 1 - p of its arguments (augment).
  c.aug.update(global_scale=(0.32, 1.0), local_scale=(0.05, 0.32), local_size=98, blur="torchvision",
               blur_probs=(0.0, 0.9, 0.5))
  c.loss.update(ibot_weight=1.0, koleo_weight=0.1, teacher_temp=(0.04, 0.07),
                teacher_temp_warmup_epochs=30.0, teacher_temp_steps="per_step", centering="sinkhorn")
  c.optim.update(base_lr=0.004, lr_scaling="sqrt_1024", min_lr=1e-6, warmup_epochs=10.0, layer_decay=0.9,
                 patch_embed_lr_mult=0.2, teacher_momentum=(0.994, 1.0), clip_grad=3.0, clip_mode="per_module",
                 freeze_mode="zero_lr")
  c.epoch_length = 1250  # DINOv2's OFFICIAL_EPOCH_LENGTH, whatever the dataset size
  c.per_gpu_batch_size = 64  # ssl_default_config.yaml's batch_size_per_gpu
  c.batch_size = 64 * 32  # on 32 GPUs (the README's ImageNet-1k setup); the sqrt lr rule scales with it
  c.epochs = 100.0
  return c


def resnet_config(depth: int = 50) -> ml_collections.ConfigDict:
  """DINO's ResNet recipe (facebookresearch/dino README, "ResNet-50 and other convnets
  trainings": `main_dino.py --arch resnet50 --optimizer sgd --lr 0.03 --weight_decay 1e-4
  --weight_decay_end 1e-4 --global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14`, 8 GPUs
  x 64 images, 100 epochs), every other setting main_dino.py's default: a torchvision ResNet
  whose pooled 2048-d feature feeds a DINO head without batch norm (`--use_bn_in_head` off),
  SyncBatchNorm in student and teacher (`models.resnet`), lr 0.03 · batch / 256 warmed up over
  10 epochs, teacher momentum 0.996 -> 1, teacher temperature 0.04, per-tensor clipping at 3,
  the last layer frozen for the first epoch."""
  c = base_config()
  # patch_size: the backbone's output stride, the grid cell the dense tools see (no patches).
  c.model = dict(name="resnet", depth=depth, width=64, patch_size=32, init_from="", dtype="auto", remat="none",
                 attention="xla")
  c.aug.update(global_scale=(0.14, 1.0), local_scale=(0.05, 0.14))
  c.optim.update(name="sgd", base_lr=0.03, weight_decay=(1e-4, 1e-4))
  c.batch_size = 512  # 8 GPUs x 64
  c.epochs = 100.0
  return c


def esvit_config(size: str, window_size: int = 7) -> ml_collections.ConfigDict:
  """EsViT recipe (Li et al. 2022, Sec. 4; microsoft/esvit `main_esvit.py` with
  `--use_dense_prediction True`): a Swin backbone, DINO's view-level loss on the pooled
  embedding plus the region-matching loss on the last stage's tokens through a second head,
  each weighted 0.5 as in the official DDINOLoss, centering (separate view and region centers)."""
  width, depths, heads = swin.SWIN_SIZES[size]
  c = base_config()
  c.model = dict(name="swin", patch_size=4, width=width, depths=depths, num_heads=heads,
                 window_size=window_size, image_size=224,  # windows and shifts fixed for the 224 px global crops
                 mlp_ratio=4.0, drop_path_rate=0.1, drop_path_mode="sample", norm_eps=1e-6,
                 init_from="", dtype="auto", remat="none", attention="xla")
  c.loss.update(dino_weight=0.5, region_weight=0.5, teacher_temp=(0.04, 0.07), teacher_temp_warmup_epochs=30.0)
  c.head.norm_last_layer = False  # --norm_last_layer false
  c.batch_size = 512  # 16 GPUs x 32
  c.epochs = 300.0
  return c

