r"""DINO ViT-B/16, 400 epochs: the released `dino_vitbase16_pretrain` run.

Mirrors the run's published arguments (`dino_vitbase16_pretrain/args.txt`, linked from
facebookresearch/dino's README, which reports 76.1% k-NN and 78.2% linear top-1 for it):
  main_dino.py --arch vit_base --patch_size 16 --epochs 400 --batch_size_per_gpu 32 (32 GPUs) \
      --lr 0.00075 --min_lr 2e-06 --warmup_epochs 10 --weight_decay 0.04 --weight_decay_end 0.4 \
      --clip_grad 0.3 --teacher_temp 0.07 --warmup_teacher_temp 0.04 --warmup_teacher_temp_epochs 50 \
      --norm_last_layer true --freeze_last_layer 3 --momentum_teacher 0.996 --drop_path_rate 0.1 \
      --local_crops_number 10 --global_crops_scale 0.25 1.0 --local_crops_scale 0.05 0.25 --out_dim 65536
i.e. batch 1024, lr 7.5e-4 x 1024/256 (linear rule), each gradient tensor clipped at 0.3. The
linear evaluation is DINO's ViT-B protocol: the last block's CLS token with average-pooled
patch tokens (`eval_linear.py --n_last_blocks 1 --avgpool_patchtokens true`).

  python -m dino_jax.train --config configs/dino_vitb16.py --workdir /shared/run \
      --config.data.data_dir=/shared/tfds
"""
from configs import common
from dino_jax import defaults


def get_config(arg=None):
  common.check_arg(arg)
  config = defaults.base_config()
  config.update(epochs=400.0, batch_size=1024)
  config.model.update(defaults.vit("base", 16))
  config.aug.update(num_local=10, global_scale=(0.25, 1.0), local_scale=(0.05, 0.25))
  config.loss.update(teacher_temp=(0.04, 0.07), teacher_temp_warmup_epochs=50.0)
  config.optim.update(base_lr=7.5e-4, min_lr=2e-6, clip_grad=0.3, freeze_last_layer_epochs=3.0)
  config.evals.linear_dino.update(n_last_blocks=1, avgpool_patchtokens=True)
  if arg == "tiny":
    common.make_tiny(config)
  return config
