r"""EsViT on the bundled Fashion-MNIST subset: the Swin counterpart of the CPU demo.

  python -m dino_jax.train --config configs/demo_esvit_fashion_mnist.py --workdir /tmp/esvit_demo

The ViT demo's data, crops (2×28 px + 4×14 px), schedule (8 epochs, batch 128), heads and
Sinkhorn-Knopp + KoLeo, with a small Swin instead of the ViT: patch 2, window 7, three stages
of 2 blocks (width 32 → 64 → 128, heads 2 → 4 → 8; grids 14 → 7 → 4 on global crops: shifted
windows in the first stage, one window after), about the ViT demo's FLOPs a step, and
EsViT's loss: 0.5 × DINO's view loss on the pooled embedding + 0.5 × the region-matching loss
on the 4×4 last-stage regions. `:tiny` is the seconds-long variant the tests run.
"""
from configs import common
from configs import demo_fashion_mnist


def get_config(arg=None):
  common.check_arg(arg)
  config = demo_fashion_mnist.get_config()
  config.model = dict(name="swin", patch_size=2, width=32, depths=(2, 2, 2), num_heads=(2, 4, 8),
                      window_size=7, image_size=28, mlp_ratio=4.0, drop_path_rate=0.1, drop_path_mode="sample",
                      norm_eps=1e-6,
                      init_from="", dtype="float32", remat="none", attention="xla")
  config.loss.update(dino_weight=0.5, region_weight=0.5)
  if arg == "tiny":
    common.make_tiny(config)
  return config
