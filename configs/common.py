"""Defaults shared by the configs: the DINO ViT-S/16 recipe (Caron et al. 2021, App. B)."""
import ml_collections

from dino_jax.errors import UsageError
from dino_jax.models.vit import VIT_SIZES


def check_arg(arg, accepted=("tiny",)) -> None:
  """The argument of a config file (`configs/<name>.py:arg`): none or one of `accepted`;
  anything else stops with one line naming them (not a silent full-size run)."""
  if arg not in (None, "", *accepted):
    raise UsageError(f"unknown config argument {arg!r}: this config takes none or one of {', '.join(accepted)}")


def vit(size: str, patch_size: int, **overrides) -> dict:
  width, depth, heads, mlp_dim = VIT_SIZES[size]
  return dict(dict(patch_size=patch_size, width=width, depth=depth, num_heads=heads, mlp_dim=mlp_dim),
              **overrides)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 1024  # global, over all devices and processes
  c.epochs = 100.0
  c.epoch_length = 0  # steps per epoch of the schedules and evals; 0: len(training data) // batch_size
  c.log_every_steps = 50
  c.progress_bar = True
  c.on_nonfinite = "stop"  # or "skip": a step with non-finite loss/gradients is not applied

  # image_size: the square evaluations decode to (shorter side, center crop); training crops come
  # from the full image. workers: loader threads per process (decode + crops; README "Data path").
  c.data = dict(source="tfds", name="imagenet2012", path="", data_dir="", image_size=256,
                train_split="train", read_timeout_s=60.0, workers=8)  # a longer image read stops the run (dino_jax.data)
  c.model = dict(vit("small", 16), name="vit", ffn="mlp", num_registers=0, layerscale=None, drop_path_rate=0.1,
                 drop_path_uniform=False, pos_embed_grid=14, interpolate_offset=0.1, interpolate_antialias=False,
                 init_from="",  # a run directory (e.g. dino_jax.convert's) whose teacher starts the run
                 dtype="float32", remat="none", scan=False, attention="xla")  # speed knobs: see models.ViT
  c.head = dict(out_dim=65536, hidden_dim=2048, bottleneck_dim=256, num_layers=3, share_ibot_head=False,
                norm_last_layer=True,  # False: a trainable weight-norm gain (models.DINOHead)
                ibot_bottleneck_dim=0)  # the iBOT head's, when not bottleneck_dim (DINOv2 ViT-g: 256 vs 384)
  c.aug = dict(global_size=224, local_size=96, num_local=8, global_scale=(0.4, 1.0),
               local_scale=(0.05, 0.4), jitter_prob=0.8, jitter=(0.4, 0.4, 0.2, 0.1),
               grayscale_prob=0.2, blur_sigma=(0.1, 2.0), solarize_prob=0.2)
  c.mask = dict(mask_prob=0.5, mask_ratio=(0.1, 0.5))
  c.loss = dict(dino_weight=1.0, ibot_weight=0.0, koleo_weight=0.0, region_weight=0.0, student_temp=0.1,
                teacher_temp=(0.04, 0.04), teacher_temp_warmup_epochs=0.0,
                teacher_temp_steps="per_epoch",  # DINO; DINOv2: "per_step" (optim.teacher_temp_schedule)
                centering="centering", center_momentum=0.9)
  # lr_scaling: "linear_256" (DINO) or "sqrt_1024" (DINOv2); clip_mode: "per_tensor" (DINO),
  # "per_module" (DINOv2) or "global"; freeze_mode: "skip" (DINO) or "zero_lr" (DINOv2) (dino_jax.optim).
  c.optim = dict(base_lr=5e-4, lr_scaling="linear_256", min_lr=1e-6, warmup_epochs=10.0, weight_decay=(0.04, 0.4),
                 betas=(0.9, 0.999), clip_grad=3.0, clip_mode="per_tensor", layer_decay=1.0, patch_embed_lr_mult=1.0,
                 freeze_last_layer_epochs=1.0, freeze_mode="skip", teacher_momentum=(0.996, 1.0))
  # Evaluators by name (dino_jax.evaluators): every_steps N > 0 every N steps and at the end,
  # 0 at the end only, -1 never; baselines: also random init and raw pixels at the end.
  # knn: top-1 for each k (knn_top1 = k 20's); linear_probe: the fast probe on fixed embeddings.
  c.evals = ml_collections.ConfigDict()
  c.evals.knn = dict(type="knn", every_steps=0, every_epochs=0.0, k=(10, 20, 100, 200), temperature=0.07,
                     batch_size=256, baselines=False, linear_probe=False, linear_epochs=100, train_split="train",
                     test_split="validation")
  # The papers' linear evaluations (off: every_steps=-1; `python -m dino_jax.evaluate run` on a run).
  # DINO eval_linear.py: ViT-S n_last_blocks=4; ViT-B n_last_blocks=1, avgpool_patchtokens=True.
  c.evals.linear_dino = dict(type="linear", protocol="dino", every_steps=-1, every_epochs=0.0, epochs=100,
                             epoch_length=0, batch_size=1024, learning_rates=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1),
                             n_last_blocks=4, avgpool_patchtokens=False, crop_scale=(0.08, 1.0), seed=0,
                             baselines=False, train_split="train", test_split="validation")
  # DINOv2 eval/linear.py: {last 1, 4 blocks} x {with, without avgpool} x 13 lrs, 10 epochs of 1250 steps.
  c.evals.linear_dinov2 = dict(type="linear", protocol="dinov2", every_steps=-1, every_epochs=0.0, epochs=10,
                               epoch_length=1250, batch_size=1024,
                               learning_rates=(1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 0.1),
                               grid_blocks=(1, 4), crop_scale=(0.08, 1.0), seed=0, baselines=False,
                               train_split="train", test_split="validation")
  # The papers' downstream evaluations (dino_jax.downstream; off by default: every_steps=-1). `path` is
  # the benchmark's folder (README "Downstream evaluations"). DINO Sec. 4.2.1 (eval_image_retrieval.py):
  # CLS at imsize 224 (rOxford) or 512 + multiscale (rParis), revisited mAP easy / medium / hard.
  c.evals.retrieval = dict(type="retrieval", every_steps=-1, every_epochs=0.0, path="", imsize=224, multiscale=False,
                           feature="cls", gem_p=4.0, crop_queries=False)
  # DINO Sec. 4.2.2 (eval_copy_detection.py): Copydays "strong", 320² input, CLS ++ GeM(p=4) of the
  # patch tokens, PCA-whitened on `whitening`, cosine ranking among `distractors`, AP over the top 20.
  c.evals.copy_detection = dict(type="copy_detection", every_steps=-1, every_epochs=0.0, path="", blocks=("strong",),
                                distractors="distractors", whitening="whitening", imsize=320, gem_p=4.0,
                                whitening_dim=0, topk=20, threshold=-1.0, match_prefix=4, batch_size=16)
  # DINO Sec. 4.2.3 (eval_video_segmentation.py), DAVIS-2017 val: first frame + last 7, top-5 neighbours within
  # 12 patches, T = 0.1, frames at 480 px (shorter side); J&F on all frames but the first and last (tolerance 0.008).
  c.evals.video_propagation = dict(type="video_propagation", every_steps=-1, every_epochs=0.0, path="",
                                   resolution="480p", split="val", scale_size=480, n_last_frames=7, topk=5,
                                   size_mask_neighborhood=12, temperature=0.1, bound_th=0.008)
  # SD-DINO (Zhang et al. 2023), SPair-71k test: nearest-neighbour keypoint transfer on the zero-padded square
  # canvas's 60 x 60 patch grid (image_size 0: 60 patches; grid N > 0: resampled over the image, not SD-DINO's),
  # fusion [α·l2n(external), (1-α)·l2n(backbone)] with α = 0.5 when `features_dir` holds external (Stable
  # Diffusion) maps; PCK@0.1 of the target's bounding box (PF-Pascal: 0.05 / 0.1 / 0.15).
  c.evals.correspondence = dict(type="correspondence", every_steps=-1, every_epochs=0.0, path="", split="test",
                                features_dir="", alpha=0.5, pca_dim=0, grid=0, image_size=0, match="nn",
                                temperature=0.02, soft_window=7, pck_alphas=(0.05, 0.1, 0.15), pairs_per_category=0)
  # DINOv2 Sec. 7.4 linear segmentation (ade20k_linear_config): BN + 1x1 conv on the last block's patch tokens
  # (n_last_blocks=4: "+ms" input), AdamW lr 1e-3 wd 1e-4, 1500 warmup + poly, 40k steps x 16 crops 512, slide 512/341.
  c.evals.segmentation = dict(type="segmentation", every_steps=-1, every_epochs=0.0, path="", num_classes=150,
                              reduce_zero_label=True, ignore_index=255, n_last_blocks=1, cls_token=False,
                              batch_norm=True, crop_size=512, ratio_range=(0.5, 2.0), flip=True, slide_stride=341,
                              steps=40000, batch_size=16, learning_rate=1e-3, weight_decay=1e-4, warmup_steps=1500,
                              warmup_ratio=1e-6, schedule="poly", min_lr_ratio=0.0, grad_clip=0.0, seed=0,
                              baselines=False)
  # DINOv2 Sec. 7.4 linear depth "lin. 1" (nyu_linear_config): last block's patch tokens + CLS, x4 upsampled, 256 bins
  # on [1e-3, 10] m, SigLoss per 2 images (per GPU); AdamW lr 1e-4 wd 0.01, clip 35, 12800 warmup + cosine,
  # 38400 steps x 16 crops 416x544.
  c.evals.depth = dict(type="depth", every_steps=-1, every_epochs=0.0, path="", head="classify", bins=256,
                       n_blocks=1, cls_token=True, upsample=4, min_depth=1e-3, max_depth=10.0, depth_scale=1000.0,
                       crop_size=(416, 544), flip=True, flip_test=True, eigen_crop=True, steps=38400, batch_size=16,
                       learning_rate=1e-4, weight_decay=0.01, warmup_steps=12800, warmup_ratio=1e-3,
                       schedule="cosine", min_lr_ratio=1e-8, grad_clip=35.0, sigloss_warmup_steps=100,
                       loss_group=2, gradient_loss_weight=0.0, seed=0, baselines=False)
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


def make_tiny(c: ml_collections.ConfigDict) -> None:
  """Shrinks any config to a seconds-long CPU run for tests (the same code paths)."""
  if c.model.name == "swin":  # two stages, window 4: grids 8, 4 on global crops and 4, 2 on local ones
    c.model.update(patch_size=2, width=16, depths=(1, 1), num_heads=(1, 2), window_size=4)
  else:
    c.model.update(patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64, pos_embed_grid=4,
                   num_registers=min(c.model.num_registers, 2))
  c.head.update(out_dim=64, hidden_dim=64, bottleneck_dim=16, ibot_bottleneck_dim=8 if c.head.ibot_bottleneck_dim else 0)
  c.aug.update(global_size=16, local_size=8, num_local=2, blur_sigma=(0.1, 0.5))
  c.data.image_size = 20
  c.batch_size = 16
  c.epochs = 0.02
  c.epoch_length = 0
  c.evals.knn.batch_size = 64
  c.evals.knn.linear_epochs = 10
  c.checkpoint.every_steps = 2
  c.log_every_steps = 1
  c.progress_bar = False


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
                 drop_path_uniform=True, pos_embed_grid=16, interpolate_offset=0.1, interpolate_antialias=False,  # 224 px / 14
                 init_from="", dtype="float32", remat="none", scan=size in ("large", "giant"), attention="xla")
  c.head = dict(out_dim=65536, hidden_dim=2048, bottleneck_dim=384 if size == "giant" else 256,
                num_layers=3, share_ibot_head=False, norm_last_layer=False, ibot_bottleneck_dim=0)
  c.aug.update(global_scale=(0.32, 1.0), local_scale=(0.05, 0.32), local_size=98)
  c.loss.update(ibot_weight=1.0, koleo_weight=0.1, teacher_temp=(0.04, 0.07),
                teacher_temp_warmup_epochs=30.0, teacher_temp_steps="per_step", centering="sinkhorn")
  c.optim.update(base_lr=0.004, lr_scaling="sqrt_1024", min_lr=1e-6, warmup_epochs=10.0, layer_decay=0.9,
                 patch_embed_lr_mult=0.2, teacher_momentum=(0.994, 1.0), clip_grad=3.0, clip_mode="per_module",
                 freeze_mode="zero_lr")
  c.epoch_length = 1250  # DINOv2's OFFICIAL_EPOCH_LENGTH, whatever the dataset size
  c.batch_size = 2048
  c.epochs = 100.0
  return c


def esvit_config(size: str, window_size: int = 7) -> ml_collections.ConfigDict:
  """EsViT recipe (Li et al. 2022, Sec. 4; microsoft/esvit `main_esvit.py` with
  `--use_dense_prediction True`): a Swin backbone, DINO's view-level loss on the pooled
  embedding plus the region-matching loss on the last stage's tokens through a second head,
  each weighted 0.5 as in the official DDINOLoss, centering (separate view and region centers)."""
  from dino_jax.models.swin import SWIN_SIZES  # pylint: disable=g-import-not-at-top
  width, depths, heads = SWIN_SIZES[size]
  c = base_config()
  c.model = dict(name="swin", patch_size=4, width=width, depths=depths, num_heads=heads,
                 window_size=window_size, mlp_ratio=4.0, drop_path_rate=0.1, norm_eps=1e-6,
                 init_from="", dtype="float32", remat="none", attention="xla")
  c.loss.update(dino_weight=0.5, region_weight=0.5, teacher_temp=(0.04, 0.07), teacher_temp_warmup_epochs=30.0)
  c.head.norm_last_layer = False  # --norm_last_layer false
  c.batch_size = 512  # 16 GPUs x 32
  c.epochs = 300.0
  return c

