"""The train step on a mesh of 8 fake CPU devices: data-parallel, FSDP, remat, bfloat16 and
scanned blocks give the same update as one device (split from test_train.py so that the test
files share the two xdist workers evenly)."""
import jax
import numpy as np
import pytest

from configs import dino_vits16
from configs import dinov2_vits14
from configs import esvit_swin_t
from dino_jax import learner
from dino_jax import objectives
from dino_jax import sharding
from dino_jax.errors import UsageError
from tests.test_train import TRAIN_STEPS_PER_EPOCH
from tests.test_train import assert_trees_close
from tests.test_train import one_step as run_steps
from tests.test_train import tiny


# DINOv2 starts its LayerScale at 1e-5, so at initialization every image's CLS embedding is the
# same up to float rounding and KoLeo's nearest neighbours are rounding noise, which another
# reduction order (devices, remat, bfloat16) changes. These comparisons of one computation laid
# out differently start from a LayerScale that lets the images differ.
DISTINCT = {"model.layerscale": 0.1}


_RUNS = {}


def one_step(cfg, devices, steps=1):
  """test_train.one_step, each (config, devices, steps) run once per file: several tests here
  compare with the same DINOv2 run on one device and on eight. The returned trees are shared."""
  key = (cfg.to_json(), len(devices), steps)
  if key not in _RUNS:
    _RUNS[key] = run_steps(cfg, devices, steps)
  return _RUNS[key]


def conditioned(module, **overrides):
  return tiny(module, **(DISTINCT if module is dinov2_vits14 else {}), **overrides)


@pytest.mark.parametrize("module,terms", [
    (dino_vits16, {"dino_loss"}), (dinov2_vits14, {"dino_loss", "ibot_loss", "koleo_loss"}),
    (esvit_swin_t, {"dino_loss", "region_loss"})], ids=["dino", "dinov2", "esvit"])
def test_sharded_step_equals_unsharded(module, terms):
  cfg = conditioned(module)
  assert len(jax.devices()) == 8
  s1, m1 = one_step(cfg, jax.devices()[:1], steps=2)
  s8, m8 = one_step(cfg, jax.devices(), steps=2)
  assert_trees_close(s8["params"], s1["params"], atol=1e-5)
  assert_trees_close(s8["teacher"], s1["teacher"], atol=1e-5)
  for center in objectives.centers(cfg):
    assert_trees_close(s8[center], s1[center], atol=1e-5)
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], atol=1e-5, rtol=1e-5, err_msg=k)
  assert set(m1) & {"dino_loss", "ibot_loss", "koleo_loss", "region_loss"} == terms
  assert all(np.isfinite(v) for v in m1.values())


def test_fsdp_step_equals_replicated_step():
  """DINOv2 tiny on a 2 (data) x 4 (fsdp) mesh with every array of >= 256 elements split."""
  cfg = conditioned(dinov2_vits14, **{"mesh.fsdp": 4, "mesh.fsdp_min_size": 256})
  trainer = learner.build(cfg, sharding.make_mesh(cfg), TRAIN_STEPS_PER_EPOCH)
  kernel = trainer.state["params"]["backbone"]["block0"]["mlp"]["fc1"]["kernel"]  # [32, 64]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp") and kernel.addressable_shards[0].data.shape == (32, 16)
  moment = trainer.state["opt_state"]
  assert any(getattr(x, "sharding", None) is not None and "fsdp" in tuple(getattr(x.sharding, "spec", ()))
             for x in jax.tree.leaves(moment))  # Adam moments follow their parameters
  assert trainer.state["params"]["backbone"]["cls_token"].sharding.spec == jax.sharding.PartitionSpec()  # small: replicated
  sharded, m_fsdp = one_step(cfg, jax.devices(), steps=2)
  replicated, m_rep = one_step(conditioned(dinov2_vits14), jax.devices()[:1], steps=2)
  assert_trees_close(sharded["params"], replicated["params"], atol=1e-5)
  assert_trees_close(sharded["teacher"], replicated["teacher"], atol=1e-5)
  np.testing.assert_allclose(m_fsdp["loss"], m_rep["loss"], rtol=1e-5)


def test_fsdp_spec_rule():
  assert sharding.fsdp_spec((1024, 4096), 4, 2 ** 20) == jax.sharding.PartitionSpec(None, "fsdp")
  assert sharding.fsdp_spec((384, 1536), 4, 2 ** 20) == jax.sharding.PartitionSpec()  # small
  assert sharding.fsdp_spec((256, 65536), 8, 2 ** 20) == jax.sharding.PartitionSpec(None, "fsdp")  # the K head
  assert sharding.fsdp_spec((3, 5, 7), 2, 1) == jax.sharding.PartitionSpec()  # nothing divisible
  assert sharding.fsdp_spec((1024, 4096), 1, 0) == jax.sharding.PartitionSpec()
  with pytest.raises(UsageError, match="mesh.fsdp 3 does not divide the 8 devices"):
    sharding.make_mesh(tiny(**{"mesh.fsdp": 3}))


def test_remat_gives_the_same_step_and_bfloat16_stays_close():
  base, m_base = one_step(conditioned(dinov2_vits14), jax.devices(), steps=2)  # test_sharded_step_equals_unsharded's
  remat, m_remat = one_step(conditioned(dinov2_vits14, **{"model.remat": "full"}), jax.devices(), steps=2)
  assert_trees_close(remat["params"], base["params"], atol=1e-6)
  bf16, m_bf16 = one_step(conditioned(dinov2_vits14, **{"model.dtype": "bfloat16", "model.remat": "dots"}), jax.devices(), steps=2)
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(bf16["params"]))  # fp32 master weights
  assert np.isfinite(m_bf16["loss"]) and abs(m_bf16["loss"] - m_base["loss"]) < 0.05 * abs(m_base["loss"])


def test_scan_gives_the_same_step():
  """model.scan on 8 devices with FSDP: the same update as the loop (no stochastic depth)."""
  over = {"model.drop_path_rate": 0.0, "mesh.fsdp": 4, "mesh.fsdp_min_size": 256}
  loop, m_loop = one_step(conditioned(dinov2_vits14, **over), jax.devices(), steps=2)
  scanned, m_scan = one_step(conditioned(dinov2_vits14, **over, **{"model.scan": True}), jax.devices(), steps=2)
  assert_trees_close(scanned["params"], loop["params"], atol=1e-5)
  np.testing.assert_allclose(m_scan["loss"], m_loop["loss"], rtol=1e-5)
  # DINOv2's kept-subset stochastic depth inside the scan, each device's subset its own.
  _, m_drop = one_step(conditioned(dinov2_vits14, **(over | {"model.scan": True, "model.drop_path_rate": 0.4})),
                       jax.devices(), steps=1)
  assert np.isfinite(m_drop["loss"])
