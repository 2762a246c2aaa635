r"""DINO on the bundled Fashion-MNIST subset: the CPU demo (minutes on 2 cores).

  python -m dino_jax.train --config configs/demo_fashion_mnist.py --workdir /tmp/demo
  python -m dino_jax.train --config configs/demo_fashion_mnist.py:tiny --workdir /tmp/t

A small ViT (patch 4) on 28 px images: 2 global 28 px crops and 4 local 12 px crops.
`:tiny` is the seconds-long variant the tests run.
"""
from configs import common


def get_config(arg=None):
  config = common.base_config()
  config.data.source = "fashion_mnist_demo"
  config.data.image_size = 28
  config.data.train_split = "train"
  config.eval.train_split = "train"
  config.eval.test_split = "test"

  config.model.update(patch_size=4, width=192, depth=6, num_heads=3, mlp_dim=768, pos_embed_grid=7)
  config.head.update(out_dim=2048, hidden_dim=1024, bottleneck_dim=128)
  config.aug.update(global_size=28, local_size=12, num_local=4, global_scale=(0.4, 1.0),
                    local_scale=(0.1, 0.4), blur_sigma=(0.1, 0.5))
  config.batch_size = 128
  config.epochs = 20.0
  config.optim.update(base_lr=5e-4, warmup_epochs=2.0, freeze_last_layer_epochs=1.0)
  config.loss.update(teacher_temp_warmup_epochs=5.0)
  config.checkpoint.every_steps = 200
  config.log_every_steps = 20

  if arg == "tiny":
    common.make_tiny(config)
  return config
