r"""DINO with a small ResNet on the bundled Fashion-MNIST subset: the convnet counterpart of the CPU demo.

  python -m dino_jax.train --config configs/demo_resnet_fashion_mnist.py --workdir /tmp/resnet_demo

The ViT demo's data, crops (2×28 px + 4×14 px), schedule (8 epochs, batch 128), heads and
Sinkhorn-Knopp + KoLeo, with a ResNet-18 at a quarter of torchvision's width (16 → 128
channels; maps 14, 7, 4, 2, 1 on global crops) with synchronized batch norm, trained by the
optimizer of DINO's ResNet recipe: SGD with momentum 0.9, weight decay 1e-4. `:tiny` is the
seconds-long variant the tests run.
"""
from configs import common
from configs import demo_fashion_mnist


def get_config(arg=None):
  common.check_arg(arg)
  config = demo_fashion_mnist.get_config()
  config.model = dict(name="resnet", depth=18, width=16, patch_size=32, init_from="", dtype="float32", remat="none",
                      attention="xla")
  config.optim.update(name="sgd", base_lr=0.03, weight_decay=(1e-4, 1e-4))
  if arg == "tiny":
    common.make_tiny(config)
  return config
