"""Initialization against the official code: every parameter of a freshly built DINO ViT-S/16,
DINOv2 ViT-S/14 (with registers), EsViT Swin-T and their DINO heads has the distribution of
its counterpart in a torch model initialized as facebookresearch/dino, dinov2 and
microsoft/esvit do (`tests/torch_reference.py`): the same constants where the official value is
one, else the same mean, standard deviation, kurtosis (normal vs uniform) and bounds."""
import jax
import numpy as np
import pytest
import timm
import torch

from configs import dino_vits16
from configs import dinov2_vits14
from configs import esvit_swin_t
from dino_jax import convert
from dino_jax import learner
from tests import torch_reference


def kurtosis(x: np.ndarray) -> float:
  x = x - x.mean()
  return float(np.mean(x ** 4) / np.mean(x ** 2) ** 2)


def without_saturated(x: np.ndarray) -> np.ndarray:
  """`x` without draws beyond 20 robust standard deviations (1.4826 x the median absolute
  deviation): torch's and JAX's trunc_normal_ both map the draw at the end of their uniform's
  range (about one in 2^23) onto the +-2 bound, 100 std at 0.02, which alone would dominate the
  moments. There are at most a few."""
  scale = 1.4826 * np.median(np.abs(x - np.median(x)))
  kept = x[np.abs(x - np.median(x)) <= 20 * scale] if scale > 0 else x
  assert x.size - kept.size <= 2 + x.size * 1e-6
  return kept


def assert_same_distribution(name: str, ours: np.ndarray, official: np.ndarray) -> None:
  ours, official = np.asarray(ours, np.float64).ravel(), np.asarray(official, np.float64).ravel()
  assert ours.shape == official.shape, name
  if np.ptp(official) == 0:  # a constant (zeros, ones, LayerScale's 1e-5)
    np.testing.assert_allclose(ours, official, rtol=1e-6, err_msg=name)
    return
  ours, official = without_saturated(ours), without_saturated(official)
  n, std = ours.size, official.std()
  assert abs(ours.std() / std - 1) < 4 / np.sqrt(2 * n) + 0.01, f"{name}: std {ours.std():.3g} vs {std:.3g}"
  assert abs(ours.mean() - official.mean()) < 6 * std / np.sqrt(n), f"{name}: mean {ours.mean():.3g} vs " \
                                                                     f"{official.mean():.3g}"
  if n >= 1000:  # normal (3) or uniform (1.8)
    assert abs(kurtosis(ours) - kurtosis(official)) < 8 * np.sqrt(24 / n) + 0.05, \
        f"{name}: kurtosis {kurtosis(ours):.2f} vs {kurtosis(official):.2f}"
  if kurtosis(official) < 2.5:  # uniform: the same bounds
    assert np.abs(ours).max() <= np.abs(official).max() * (1 + 4 / n) + 1e-12, name
    assert np.abs(ours).max() >= np.abs(official).max() * (1 - 20 / n), name


def initial(cfg) -> dict:
  model = learner.make_model(cfg)
  return jax.device_get(jax.jit(lambda: learner.initial_params(cfg, model))())


def assert_head_matches(head: dict, official: torch_reference.OfficialDINOHead, prefix: str) -> None:
  state = {k: v.numpy() for k, v in official.state_dict().items()}
  for i in range(3):
    assert_same_distribution(f"{prefix}mlp{i}/kernel", head[f"mlp{i}"]["kernel"].T, state[f"mlp.{2 * i}.weight"])
    assert_same_distribution(f"{prefix}mlp{i}/bias", head[f"mlp{i}"]["bias"], state[f"mlp.{2 * i}.bias"])
  assert_same_distribution(f"{prefix}last_layer", head["last_layer"].T, state["last_layer.weight_v"])
  if "last_layer_gain" in head:  # trainable gain (DINOv2; DINO's norm_last_layer=False): starts at 1
    assert_same_distribution(f"{prefix}gain", head["last_layer_gain"].T, state["last_layer.weight_g"])


@pytest.mark.parametrize("method", ["dino", "dinov2"])
def test_vit_and_head_start_as_the_official_code(method):
  if method == "dino":
    cfg, arch = dino_vits16.get_config(), convert.ARCHS["dino_vits16"]
  else:
    cfg, arch = dinov2_vits14.get_config(), convert.ARCHS["dinov2_vits14_reg"]
    cfg.model.num_registers = arch.num_registers
  cfg.head.out_dim = 4096  # the last layer's statistics do not depend on the prototype count
  params = initial(cfg)
  torch.manual_seed(0)
  grid = cfg.model.pos_embed_grid
  reference = torch_reference.official_vit_init(torch_reference.OfficialViT(arch, grid), method)
  official = {k: v.numpy() for k, v in reference.state_dict().items()}
  ours = convert.to_torch(params["backbone"], arch)
  ours.setdefault("mask_token", np.zeros_like(official["mask_token"]))  # only built for iBOT: zeros (below)
  assert sorted(ours) == sorted(official)
  for name in official:
    assert_same_distribution(name, ours[name], official[name])
  if method == "dinov2":
    mask_token = initial(dinov2_vits14.get_config("tiny"))["backbone"]["mask_token"]
    assert not mask_token.any()
  head = torch_reference.OfficialDINOHead(arch.width, cfg.head.out_dim, cfg.head.hidden_dim, cfg.head.bottleneck_dim)
  assert_head_matches(params["head"], head, "head/")
  assert ("last_layer_gain" in params["head"]) == (method == "dinov2")
  if method == "dinov2":
    assert_head_matches(params["ibot_head"], head, "ibot_head/")


def test_swin_and_heads_start_as_esvit():
  cfg = esvit_swin_t.get_config()
  cfg.head.out_dim = 4096
  params = initial(cfg)
  arch = convert.ARCHS["esvit_swin_t_w7"]
  torch.manual_seed(0)
  reference = torch_reference.official_swin_init(timm.create_model(
      "swin_tiny_patch4_window7_224", pretrained=False, num_classes=0))
  official = {k: v.numpy() for k, v in reference.state_dict().items()}
  ours = convert.to_torch(params["backbone"], arch)
  for name in ours:
    assert_same_distribution(name, ours[name], official[name])
  head = torch_reference.OfficialDINOHead(768, cfg.head.out_dim, cfg.head.hidden_dim, cfg.head.bottleneck_dim)
  assert_head_matches(params["head"], head, "head/")
  assert_head_matches(params["region_head"], head, "region_head/")
