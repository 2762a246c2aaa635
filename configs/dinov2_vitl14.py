r"""DINOv2 ViT-L/14 on ImageNet-22k: the official "long setup" (`vitl14.yaml`).

Mirrors facebookresearch/dinov2's
  python dinov2/run/train/train.py --nodes 12 --config-file dinov2/configs/train/vitl14.yaml ...
which the README says reaches 82.0% k-NN and 84.5% linear top-1 on ImageNet-1k (about 3.3 days
on 96 A100s). The yaml over `ssl_default_config.yaml`: ViT-L/14 with the fused SwiGLU FFN
(hidden (int(2/3 x 4 x 1024) + 7) // 8 x 8 = 2736), LayerScale 1e-5, uniform drop path 0.4,
separate DINO and iBOT heads of 131072 prototypes (bottlenecks 384 and 256), KoLeo 0.1,
Sinkhorn-Knopp, teacher momentum 0.994 -> 1, temperature 0.04 -> 0.07 over 30 epochs, 500
epochs of 1250 steps with 80 of warmup, base lr 2e-4 x sqrt(batch / 1024), weight decay 0.04 ->
0.2, no layer-wise decay, patch-embed lr x 0.2, module-wise clipping at 3, 98 px local crops.
Batch 32 per GPU x 96 GPUs = 3072. ImageNet-22k is an image folder here (`--config.data.path`).

  python -m dino_jax.train --config configs/dinov2_vitl14.py --workdir /shared/run \
      --config.data.path=/data/imagenet22k --config.mesh.fsdp=8
"""
from configs import common
from dino_jax import defaults


def get_config(arg=None):
  common.check_arg(arg)
  config = defaults.dinov2_config("large")
  config.model.update(ffn="swiglu", mlp_dim=2736)  # swiglufused: SwiGLUFFNFused's hidden size for width 1024
  config.head.update(out_dim=131072, bottleneck_dim=384, ibot_bottleneck_dim=256)
  config.epochs = 500.0
  config.optim.update(base_lr=2e-4, warmup_epochs=80.0, weight_decay=(0.04, 0.2), layer_decay=1.0)
  config.data.update(source="folder", path="", train_split="")
  config.evals.knn.every_steps = -1  # ImageNet-22k has no held-out split: run evaluators on a labelled set
  config.per_gpu_batch_size = 32
  config.batch_size = 32 * 96
  if arg == "tiny":
    common.make_tiny(config)
  return config
