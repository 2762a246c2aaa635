r"""DINO ResNet-50, 100 epochs on ImageNet-1k from TFDS: the official README's ResNet-50 command.

  python -m dino_jax.train --config configs/dino_resnet50.py --workdir /shared/run \
      --config.data.data_dir=/shared/tfds

Mirrors facebookresearch/dino's "ResNet-50 and other convnets trainings" command (8 GPUs x 64):
`main_dino.py --arch resnet50 --optimizer sgd --lr 0.03 --weight_decay 1e-4 --weight_decay_end 1e-4
--global_crops_scale 0.14 1 --local_crops_scale 0.05 0.14` with main_dino.py's other defaults
(`defaults.resnet_config`): torchvision's ResNet-50 with SyncBatchNorm in student and teacher, a
65536-way DINO head without batch norm, SGD with momentum 0.9, lr 0.03 x 512 / 256 after 10 warmup
epochs, 2 x 224 + 8 x 96 crops, teacher temperature 0.04, teacher momentum 0.996 -> 1. The README
gives its training log and checkpoint; the released 800-epoch backbone (k-NN 67.5%, linear 75.3%)
was trained with LARS on 80 GPUs x 51 images (its args.txt): `--config.optim.name=lars` with that
file's settings reproduces it.
`:tiny` is the same recipe shrunk to a seconds-long CPU run (used by the tests).
"""
from configs import common
from dino_jax import defaults


def get_config(arg=None):
  common.check_arg(arg)
  config = defaults.resnet_config(50)
  if arg == "tiny":
    common.make_tiny(config)
  return config
