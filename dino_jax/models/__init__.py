"""Backbones by name (`model.name`) and the heads put on them.

Every backbone is a Flax module built by
`Backbone.from_config(model_config, subset_groups, batch_sharding)` whose call
`(images, mask=None, deterministic=True, layers=0, final_norm=True)` returns

  "embedding"     [B, D]        the global embedding (CLS token, or pooled where there is none)
  "patch"         [B, h, w, D]  its patch / region tokens on their grid
  "intermediate"  with layers=n: the last n layers' {"embedding", "patch"} (final_norm=False:
                 before the final norm, as `get_intermediate_layers(norm=False)`)

and which tells `embed_dim`, `num_layers` and `layer_id(param name)` (layer-wise lr decay),
`grid(image_size)` and `forward_flops(image_size)` (the benchmark). Adding a backbone is one
module file, one entry below and its configs.

A backbone with batch norm (ResNet) also has a "batch_stats" collection: its running statistics,
which the train state keeps apart from the parameters (the teacher's EMA moves parameters only)
and which a backbone's *weights* outside training carry under "batch_stats", as a torch state
dict carries its buffers (`backbone_variables`, `backbone_weights`).
"""
import ml_collections

from dino_jax.errors import UsageError

from dino_jax.models.heads import DINOHead, DINOModel, max_logits
from dino_jax.models import layers
from dino_jax.models.layers import REMAT_POLICIES, compute_dtype
from dino_jax.models.resnet import ResNet
from dino_jax.models.swin import Swin
from dino_jax.models.vit import ViT

BACKBONES = {"vit": ViT, "swin": Swin, "resnet": ResNet}


def backbone_class(model_cfg: ml_collections.ConfigDict):
  name = model_cfg.get("name", "vit")  # runs written before the registry hold ViTs
  if name not in BACKBONES:
    raise UsageError(f"model.name must be one of {', '.join(BACKBONES)}, not {name!r}")
  return BACKBONES[name]


def make_backbone(model_cfg: ml_collections.ConfigDict, subset_groups=None, batch_sharding=None):
  """The backbone `model_cfg` names; `subset_groups`: DINOv2's kept-subset stochastic depth
  drawn in that many groups of the batch, else (None) the per-sample mask; `batch_sharding`:
  the train step's, which the kept subsets are drawn on and a ViT's blocks keep their
  activations in."""
  return backbone_class(model_cfg).from_config(model_cfg, subset_groups, batch_sharding)


def backbone_variables(weights: dict) -> dict:
  """Flax variables of a backbone's weights: {"params": ...} and, where it has batch norm, its
  running statistics {"batch_stats": ...} (kept in the weights under "batch_stats")."""
  params = {k: v for k, v in weights.items() if k != "batch_stats"}
  return {"params": params} | ({"batch_stats": weights["batch_stats"]} if "batch_stats" in weights else {})


def backbone_weights(params: dict, batch_stats: dict | None = None) -> dict:
  """A backbone's weights: its parameters, with its running statistics (if any) under "batch_stats"."""
  return dict(params, batch_stats=batch_stats) if batch_stats else params
