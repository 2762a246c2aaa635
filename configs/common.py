"""What the config files share beside the library's defaults (`dino_jax.defaults`): the check of
a config file's argument and the `:tiny` variant every config has for tests."""
import ml_collections

from dino_jax.errors import UsageError


def check_arg(arg, accepted=("tiny",)) -> None:
  """The argument of a config file (`configs/<name>.py:arg`): none or one of `accepted`;
  anything else stops with one line naming them (not a silent full-size run)."""
  if arg not in (None, "", *accepted):
    raise UsageError(f"unknown config argument {arg!r}: this config takes none or one of {', '.join(accepted)}")


def make_tiny(c: ml_collections.ConfigDict) -> None:
  """Shrinks any config to a seconds-long CPU run for tests (the same code paths)."""
  if c.model.name == "swin":  # two stages, window 4: grids 8, 4 on global crops and 4, 2 on local ones
    c.model.update(patch_size=2, width=16, depths=(1, 1), num_heads=(1, 2), window_size=4, image_size=16)
  elif c.model.name == "resnet":  # ResNet-18's blocks at width 8: maps 8, 4, 2, 1, 1 on global crops
    c.model.update(depth=18, width=8)
  else:
    c.model.update(patch_size=4, width=32, depth=2, num_heads=2, mlp_dim=64, pos_embed_grid=4,
                   num_registers=min(c.model.num_registers, 2))
  c.head.update(out_dim=64, hidden_dim=64, bottleneck_dim=16, ibot_bottleneck_dim=8 if c.head.ibot_bottleneck_dim else 0)
  c.aug.update(global_size=16, local_size=8, num_local=2, blur_sigma=(0.1, 0.5))
  c.data.image_size = 20
  c.batch_size = 16
  c.model.dtype = "float32"
  if c.per_gpu_batch_size:
    c.per_gpu_batch_size = 8  # two groups of the per-GPU computations
  c.epochs = 0.02
  c.epoch_length = 0
  c.evals.knn.batch_size = 64
  c.evals.knn.linear_epochs = 10
  c.checkpoint.every_steps = 2
  c.log_every_steps = 1
  c.progress_bar = False
