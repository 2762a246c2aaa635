r"""DINO ViT-B/8, 300 epochs: the released `dino_vitbase8_pretrain` run.

Mirrors the run's published arguments (`dino_vitbase8_pretrain/args.txt`, linked from
facebookresearch/dino's README, which reports 77.4% k-NN and 80.1% linear top-1 for it):
  main_dino.py --arch vit_base --patch_size 8 --epochs 300 --batch_size_per_gpu 6 (176 GPUs) \
      --lr 0.0005 --min_lr 2e-06 --warmup_epochs 10 --weight_decay 0.04 --weight_decay_end 0.4 \
      --clip_grad 3.0 --teacher_temp 0.07 --warmup_teacher_temp 0.03 --warmup_teacher_temp_epochs 50 \
      --norm_last_layer true --freeze_last_layer 3 --momentum_teacher 0.996 --drop_path_rate 0.1 \
      --local_crops_number 10 --global_crops_scale 0.25 1.0 --local_crops_scale 0.05 0.25 --out_dim 65536
i.e. batch 6 x 176 = 1056 (the world size, 176, is in one of the two copies of the args file
seen here; the other leaves it out). 1056 divides over 8, 16 or 32 devices; for 64 or more, set
`--config.batch_size` and the lr follows. lr 5e-4 x batch/256 (linear rule), a 28 x 28
position-embedding grid, the teacher temperature warmed up from 0.03. Linear evaluation as
DINO's ViT-B protocol (last block's CLS with average-pooled patch tokens).

  python -m dino_jax.train --config configs/dino_vitb8.py --workdir /shared/run \
      --config.data.data_dir=/shared/tfds
"""
from configs import common
from dino_jax import defaults


def get_config(arg=None):
  common.check_arg(arg)
  config = defaults.base_config()
  config.update(epochs=300.0, batch_size=1056)
  config.model.update(defaults.vit("base", 8), pos_embed_grid=28)
  config.aug.update(num_local=10, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25))
  config.loss.update(teacher_temp=(0.03, 0.07), teacher_temp_warmup_epochs=50.0)
  config.optim.update(base_lr=5e-4, min_lr=2e-6, clip_grad=3.0, freeze_last_layer_epochs=3.0)
  config.evals.linear_dino.update(n_last_blocks=1, avgpool_patchtokens=True)
  if arg == "tiny":
    common.make_tiny(config)
  return config
