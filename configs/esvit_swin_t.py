r"""EsViT Swin-T/W=7, 300 epochs on ImageNet-1k from TFDS (Li et al. 2022, Table 1).

  python -m dino_jax.train --config configs/esvit_swin_t.py --workdir /shared/run \
      --config.data.data_dir=/shared/tfds

Mirrors microsoft/esvit's README command: `main_esvit.py --arch swin_tiny --batch_size_per_gpu 32
(16 GPUs) --epochs 300 --teacher_temp 0.07 --warmup_epochs 10 --warmup_teacher_temp_epochs 30
--norm_last_layer false --use_dense_prediction True --cfg
experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml` (drop path 0.1, 2×224 + 8×96 crops,
lr 5e-4 × batch / 256, weight decay 0.04 → 0.4, teacher momentum 0.996 → 1). The paper reports
linear 78.0% (78.1% in the paper's table) and k-NN 75.7% top-1 on ImageNet for this model.
`--norm_last_layer false`: the heads' last layers have a trainable weight-norm gain; DINO's
per-tensor clipping at 3 and last-layer freeze (`freeze_mode="skip"`), as `main_esvit.py` uses.
`:tiny` is the same recipe shrunk to a seconds-long CPU run (used by the tests).
"""
from configs import common
from dino_jax import defaults


def get_config(arg=None):
  common.check_arg(arg)
  config = defaults.esvit_config("tiny")
  if arg == "tiny":
    common.make_tiny(config)
  return config
