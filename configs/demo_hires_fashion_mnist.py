r"""A higher-resolution phase after the CPU demo, as DINOv2 ends its training at 518 px (Sec. 4).

  python -m dino_jax.train --config configs/demo_fashion_mnist.py --workdir runs/demo
  python -m dino_jax.train --config configs/demo_hires_fashion_mnist.py --workdir runs/demo_hires \
      [--config.phase.start_from=runs/demo]

Continues the demo run's checkpoint (student, teacher, optimizer, step: the schedules go on)
for one more epoch (78 steps; `epochs` 9 counts both phases) with global crops at twice the
resolution, 56 px (local crops stay 14 px, as DINOv2's stay 98 px), the position embedding
resized once from 4×4 to 8×8 and stored. The images are 28 px: they stay decoded at 28
(`data.image_size`) and the evaluation view upsamples them (resize to 64, center 56 crop), as
`dino_jax.extract --image_size 56` does for the demo run, so the run logs that the
evaluation view is upsampled.
"""
from configs import common
from configs import demo_fashion_mnist


def get_config(arg=None):
  common.check_arg(arg)
  config = demo_fashion_mnist.get_config(arg)
  config.phase.update(name="high_res", start_from="runs/demo")
  scale = 2
  config.aug.global_size *= scale
  config.model.pos_embed_grid *= scale
  if arg != "tiny":
    config.epochs = 9.0  # the demo's 8 epochs, then 1 at 56 px
  return config
