r"""DINOv2 ViT-g/14: the official `vitg14.yaml` recipe (the released ViT-g/14: 83.5% k-NN,
86.5% linear top-1 on ImageNet-1k, trained on LVD-142M).

Mirrors dinov2/configs/train/vitg14.yaml over `ssl_default_config.yaml`: ViT-g/14 (width 1536,
40 blocks, SwiGLU), LayerScale 1e-5, uniform drop path 0.4, separate DINO and iBOT heads of
131072 prototypes (DINO bottleneck 384, iBOT 256), KoLeo 0.1, Sinkhorn-Knopp, teacher momentum
0.994 -> 1, temperature 0.04 -> 0.07 over 30 epochs, 500 epochs of 1250 steps with 80 of
warmup, base lr 2e-4 x sqrt(batch / 1024), weight decay 0.04 -> 0.2, no layer-wise decay,
patch-embed lr x 0.2, module-wise clipping at 3, 98 px local crops. The yaml reads
ImageNet-22k (here: an image folder, `--config.data.path`); LVD-142M is `dino_jax.curate`'s
kind of set. The yaml's batch is 12 per GPU; its GPU count is not published: 256 is assumed
here (batch 3072, the lr's sqrt rule applied to it). Set `--config.batch_size` to 12 x your
GPU count to follow the yaml on another count.

  python -m dino_jax.train --config configs/dinov2_vitg14.py --workdir /shared/run \
      --config.data.path=/data/imagenet22k --config.mesh.fsdp=8
"""
from configs import common
from dino_jax import defaults


def get_config(arg=None):
  common.check_arg(arg)
  config = defaults.dinov2_config("giant")
  config.head.update(out_dim=131072, bottleneck_dim=384, ibot_bottleneck_dim=256)
  config.epochs = 500.0
  config.optim.update(base_lr=2e-4, warmup_epochs=80.0, weight_decay=(0.04, 0.2), layer_decay=1.0)
  config.data.update(source="folder", path="", train_split="")
  config.evals.knn.every_steps = -1  # ImageNet-22k has no held-out split: run evaluators on a labelled set
  config.per_gpu_batch_size = 12
  config.batch_size = 12 * 256
  if arg == "tiny":
    common.make_tiny(config)
  return config
