"""dino_jax: the DINO family of self-supervised vision models (DINO, DINOv2, EsViT) in JAX/Flax.

The public API (docs/python-api.md has runnable examples):

  cfg = dino_jax.load_config("configs/demo_fashion_mnist.py:tiny", {"batch_size": 32})
  result = dino_jax.pretrain(cfg, "runs/tiny")          # trains, or resumes; {"state", "results"}
  backbone = dino_jax.load_backbone("runs/tiny")        # the teacher of the newest checkpoint
  out = backbone(uint8_images)                          # {"embedding", "pooled", "patch"}
  dino_jax.import_weights("dinov2_vits14_pretrain.pth", "dinov2_vits14", "runs/s14")
  dino_jax.export_weights("runs/tiny", "backbone.safetensors")

Each name is imported on first use, so `import dino_jax` stays light. The command-line tools
are `python -m dino_jax.<tool>`: train, extract, evaluate, convert, pictures, bench, curate,
plot_metrics.
"""
import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "load_config": ("dino_jax.config_files", "load"),
    "pretrain": ("dino_jax.trainer", "train"),
    "load_backbone": ("dino_jax.runs", "load_backbone"),
    "Backbone": ("dino_jax.runs", "Backbone"),
    "import_weights": ("dino_jax.convert", "import_file"),
    "export_weights": ("dino_jax.convert", "export_run"),
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
  if name not in _PUBLIC:
    raise AttributeError(f"module 'dino_jax' has no attribute {name!r}")
  module, attribute = _PUBLIC[name]
  value = getattr(importlib.import_module(module), attribute)
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + __all__)
