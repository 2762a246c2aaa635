r"""DINOv2 ViT-S/14 distilled from a frozen ViT-g/14 (Oquab et al. 2023, Sec. 5).

The paper trains its released ViT-S/B/L this way: "the same training loop with a few
exceptions: we use a larger model as a frozen teacher, keep a spare EMA of the student that we
use as our final model, remove the masking and stochastic depth, and apply the iBOT loss on the
two global crops". facebookresearch/dinov2 publishes no distillation config, so everything else
is its default recipe (`ssl_default_config.yaml`, as `configs/dinov2_vits14.py`) with the
teacher of `vitg14.yaml` (`configs/dinov2_vitg14.py`): ViT-g/14 with separate DINO and iBOT heads
of 131072 prototypes (bottlenecks 384 and 256); the student's heads learn the same 131072
prototypes. The teacher is a run directory holding ViT-g/14 with its heads: this project's
`dinov2_vitg14.py` run, or `dino_jax.convert` of an official `teacher_checkpoint.pth`. After
DINOv2's 518 px phase its position embedding is 37×37: add `--config.distill.model.pos_embed_grid=37`.

  python -m dino_jax.train --config configs/dinov2_distill_vits14.py --workdir /shared/vits14 \
      --config.distill.teacher=/shared/vitg14 --config.data.path=/data/lvd --config.mesh.fsdp=8
"""
from configs import common
from configs import dinov2_vitg14
from dino_jax import defaults


def get_config(arg=None):
  common.check_arg(arg)
  config = defaults.dinov2_config("small")
  teacher = dinov2_vitg14.get_config(arg)
  config.data = teacher.data
  config.evals.knn.every_steps = teacher.evals.knn.every_steps
  config.model.drop_path_rate = 0.0  # no stochastic depth when distilling
  if arg == "tiny":
    common.make_tiny(config)
  config.head.out_dim = teacher.head.out_dim  # the teacher's prototypes
  config.distill = dict(teacher="", teacher_step=-1, model=teacher.model.to_dict(), head=teacher.head.to_dict())
  return config
