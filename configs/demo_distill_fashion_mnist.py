r"""Distillation on the bundled Fashion-MNIST (CPU demo): a width-96 ViT student learns from the
frozen demo network (width 192), as DINOv2 distils its small models from ViT-g (Sec. 5).

  python -m dino_jax.train --config configs/demo_fashion_mnist.py --workdir runs/demo      # the teacher
  python -m dino_jax.train --config configs/demo_distill_fashion_mnist.py --workdir runs/distill \
      [--config.distill.teacher=runs/demo]

The student is the demo's ViT at half the width (96, 3 heads, MLP 384) with the demo's heads,
crops, losses and 624-step schedule; following DINOv2's distillation, no stochastic depth. The
frozen teacher (`distill.model` / `distill.head`: the demo's architecture) gives the targets;
the EMA of the student is the run's model (extract, evaluators). The same student trained from
scratch for comparison: `configs/demo_fashion_mnist.py --config.model.width=96
--config.model.mlp_dim=384`.
"""
from configs import common
from configs import demo_fashion_mnist


def get_config(arg=None):
  common.check_arg(arg)
  config = demo_fashion_mnist.get_config(arg)
  config.distill = dict(teacher="runs/demo", teacher_step=-1, model=config.model.to_dict(),
                        head=config.head.to_dict())
  config.model.update(width=config.model.width // 2, mlp_dim=config.model.mlp_dim // 2, drop_path_rate=0.0)
  return config
