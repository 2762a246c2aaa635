r"""DINOv2 ViT-S/14 on ImageNet-1k from TFDS (prepared offline under data.data_dir).

  python -m dino_jax.train --config configs/dinov2_vits14.py --workdir /shared/run \
      --config.data.data_dir=/shared/tfds

`:tiny` is the same recipe shrunk to a seconds-long CPU run (used by the tests).
"""
from configs import common
from dino_jax import defaults


def get_config(arg=None):
  common.check_arg(arg)
  config = defaults.dinov2_config("small")
  if arg == "tiny":
    common.make_tiny(config)
  return config
