r"""DINO ViT-S/16, 100 epochs on ImageNet-1k from TFDS: the official "vanilla" run.

Mirrors facebookresearch/dino's README command (all other `main_dino.py` arguments at their
defaults), which the README says reaches 69.3% k-NN and 74.0% linear top-1:
  python -m torch.distributed.launch --nproc_per_node=8 main_dino.py --arch vit_small \
      --data_path /path/to/imagenet/train --output_dir /path/to/saving_dir
i.e. 8 GPUs x 64 = batch 512, lr 5e-4 x 512/256 (linear rule), warmup 10 epochs, min lr 1e-6,
weight decay 0.04 -> 0.4, momentum 0.996 -> 1, teacher temperature 0.04 (no warmup), 8 local
crops of 96 px, global scale (0.4, 1), local (0.05, 0.4), drop path 0.1 rising linearly,
65536 prototypes, fixed last-layer gain (norm_last_layer=True), each gradient tensor clipped
at 3, last layer frozen the first epoch.

  python -m dino_jax.train --config configs/dino_vits16.py --workdir /shared/run \
      --config.data.data_dir=/shared/tfds

The 300-epoch run with the README's boosts is `configs/dino_vits16_300ep.py`. `:tiny` is the
same recipe shrunk to a seconds-long CPU run (used by the tests).
"""
from configs import common
from dino_jax import defaults


def get_config(arg=None):
  common.check_arg(arg)
  config = defaults.base_config()
  config.batch_size = 512
  if arg == "tiny":
    common.make_tiny(config)
  return config
