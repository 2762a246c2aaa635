r"""DINO ViT-S/8, 800 epochs: the released `dino_deitsmall8_pretrain` run.

Mirrors the run's published arguments (`dino_deitsmall8_pretrain/args.txt`, linked from
facebookresearch/dino's README, which reports 78.3% k-NN and 79.7% linear top-1 for it):
  main_dino.py --arch vit_small --patch_size 8 --epochs 800 --batch_size_per_gpu 16 --lr 0.0005 \
      --min_lr 1e-06 --warmup_epochs 10 --weight_decay 0.04 --weight_decay_end 0.4 --clip_grad 3.0 \
      --teacher_temp 0.07 --warmup_teacher_temp 0.04 --warmup_teacher_temp_epochs 30 \
      --norm_last_layer false --freeze_last_layer 1 --momentum_teacher 0.996 --drop_path_rate 0.1 \
      --local_crops_number 10 --global_crops_scale 0.4 1.0 --local_crops_scale 0.05 0.4 --out_dim 65536
on 64 GPUs (the author in facebookresearch/dino issue #104: "--batch_size_per_gpu 16 on 64
V100-32Gb GPUs"), i.e. batch 1024, lr 5e-4 x 1024/256 (linear rule) and a 28 x 28
position-embedding grid (224 / 8).

  python -m dino_jax.train --config configs/dino_vits8.py --workdir /shared/run \
      --config.data.data_dir=/shared/tfds
"""
from configs import common
from dino_jax import defaults


def get_config(arg=None):
  common.check_arg(arg)
  config = defaults.base_config()
  config.update(epochs=800.0, batch_size=1024)
  config.model.update(defaults.vit("small", 8), pos_embed_grid=28)
  config.head.norm_last_layer = False
  config.aug.num_local = 10
  config.loss.update(teacher_temp=(0.04, 0.07), teacher_temp_warmup_epochs=30.0)
  if arg == "tiny":
    common.make_tiny(config)
  return config
