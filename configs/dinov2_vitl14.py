r"""DINOv2 ViT-L/14 on ImageNet-1k from TFDS (prepared offline under data.data_dir).

  python -m dino_jax.train --config configs/dinov2_vitl14.py --workdir gs://bucket/run \
      --config.data.data_dir=gs://bucket/tfds

`:tiny` is the same recipe shrunk to a seconds-long CPU run (used by the tests).
"""
from configs import common


def get_config(arg=None):
  common.check_arg(arg)
  config = common.dinov2_config("large")
  if arg == "tiny":
    common.make_tiny(config)
  return config
