r"""DINO ViT-S/16, 100 epochs on ImageNet-1k from TFDS (Caron et al. 2021, Table 1/App. B).

  python -m dino_jax.train --config configs/dino_vits16.py --workdir gs://bucket/run \
      --config.data.data_dir=gs://bucket/tfds

Teacher temperature 0.04 -> 0.07 over 30 epochs, 10 local crops of 96 px, global scale (0.4, 1).
`:tiny` is the same recipe shrunk to a seconds-long CPU run (used by the tests).
"""
from configs import common


def get_config(arg=None):
  common.check_arg(arg)
  config = common.base_config()
  config.loss.update(teacher_temp=(0.04, 0.07), teacher_temp_warmup_epochs=30.0)
  config.aug.update(num_local=10)
  if arg == "tiny":
    common.make_tiny(config)
  return config
