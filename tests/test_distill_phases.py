"""Distillation from a frozen teacher and training phases (DINOv2 Sec. 4-5), on 8 fake CPU devices."""
import json
import shutil

import jax
import numpy as np
import pytest

from configs import demo_distill_fashion_mnist
from configs import demo_fashion_mnist
from configs import demo_hires_fashion_mnist
from configs import dinov2_distill_vits14
from configs import dinov2_vits14
from dino_jax import checkpoints
from dino_jax import config_checks
from dino_jax import data
from dino_jax import distill
from dino_jax import learner
from dino_jax import models
from dino_jax import phases
from dino_jax import sharding
from dino_jax import trainer
from dino_jax.errors import UsageError
from dino_jax.models.vit import resize_pos_embed
from test_train import TRAIN_STEPS_PER_EPOCH, assert_resume_is_exact, assert_trees_close, one_step, run_cli, step_crops
from test_train import tiny


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  """Tiny finished runs to distil from and to continue: the demo recipe (DINO + KoLeo), the
  same with another seed, and DINOv2's (separate iBOT head)."""
  root = tmp_path_factory.mktemp("teachers")
  runs = {"demo": tiny(demo_fashion_mnist, steps=4), "demo_seed1": tiny(demo_fashion_mnist, steps=4, seed=1),
          "dinov2": tiny(dinov2_vits14, steps=4)}
  for name, cfg in runs.items():
    trainer.train(cfg, str(root / name))
  return {name: str(root / name) for name in runs}


def distill_cfg(teacher_dir, steps=4, **overrides):
  return tiny(demo_distill_fashion_mnist, steps=steps, **{"distill.teacher": teacher_dir, **overrides})


def dinov2_distill_cfg(teacher_dir, steps=4):
  cfg = tiny(dinov2_distill_vits14, steps=steps, **{"distill.teacher": teacher_dir})
  teacher = tiny(dinov2_vits14)  # the teacher run's architecture, as dinov2_distill_vits14 names ViT-g's
  cfg.distill.model, cfg.distill.head = teacher.model, teacher.head
  return cfg


# ---------------------------------------------------------------------------------------
# Distillation.
# ---------------------------------------------------------------------------------------


def test_distill_step_on_8_devices_equals_1_device(teachers):
  cfg = dinov2_distill_cfg(teachers["dinov2"])  # DINO + iBOT on every patch + KoLeo, Sinkhorn-Knopp
  cfg.model.layerscale = 0.1  # distinct CLS embeddings at init: KoLeo well defined (tests/test_step_sharding.py)
  s1, m1 = one_step(cfg, jax.devices()[:1], steps=2)
  s8, m8 = one_step(cfg, jax.devices(), steps=2)
  assert_trees_close(s8["params"], s1["params"], atol=1e-5)
  assert_trees_close(s8["teacher"], s1["teacher"], atol=1e-5)
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], atol=1e-5, rtol=1e-5, err_msg=k)
  assert {"dino_loss", "ibot_loss", "koleo_loss"} <= set(m1) and all(np.isfinite(v) for v in m1.values())


def test_distill_ibot_compares_every_patch_unmasked(teachers):
  cfg = dinov2_distill_cfg(teachers["dinov2"])
  built = learner.build(cfg, sharding.make_mesh(cfg), TRAIN_STEPS_PER_EPOCH)
  assert built.step_masks is None  # no masking: the batch carries no masks
  assert "ibot_head" in built.frozen_teacher.params
  config_checks.check(cfg, 8)  # mask settings do not matter without masking
  cfg.mask.mask_prob = 0.0
  config_checks.check(cfg, 8)


def test_frozen_teacher_is_placed_by_the_fsdp_rule(teachers):
  cfg = distill_cfg(teachers["demo"], **{"mesh.fsdp": 8, "mesh.fsdp_min_size": 1024})
  frozen = learner.build(cfg, sharding.make_mesh(cfg), TRAIN_STEPS_PER_EPOCH).frozen_teacher
  for path, x in jax.tree_util.tree_leaves_with_path(frozen.params):
    split = x.size >= 1024 and any(d % 8 == 0 for d in x.shape)
    assert ("fsdp" in x.sharding.spec) == split, (jax.tree_util.keystr(path), x.shape, x.sharding.spec)
  assert any("fsdp" in x.sharding.spec for x in jax.tree.leaves(frozen.params))


def first_metrics(built, cfg):
  """The metrics of `built`'s first step (its state is donated: use a trainer once)."""
  src = data.make_source(cfg.data, "train")
  crops = jax.device_put(step_crops(src, cfg, 0), built.batch_sharding)
  batch = dict(built.make_views(learner.augmentation_key(cfg), 0, crops))
  return jax.device_get(built.train_step(built.state, batch)[1])


def test_frozen_teacher_gets_no_updates_and_gives_the_targets(teachers, tmp_path):
  cfg = distill_cfg(teachers["demo"], steps=3, **{"optim.weight_decay": (0.4, 0.4)})
  mesh = sharding.make_mesh(cfg)
  built = learner.build(cfg, mesh, TRAIN_STEPS_PER_EPOCH)
  before = jax.device_get(built.frozen_teacher.params)
  on_disk, _ = checkpoints.restore_weights(teachers["demo"], ("backbone", "head"))
  assert_trees_close(before, jax.device_get(on_disk), atol=0)
  init_ema = jax.device_get(built.state["teacher"].value["backbone"]["pos_embed"])
  state = jax.device_get(trainer.train(cfg, str(tmp_path / "run"), frozen_teacher=built.frozen_teacher)["state"])
  assert_trees_close(jax.device_get(built.frozen_teacher.params), before, atol=0)
  # The state holds the student (width 16), its EMA and the optimizer, never the teacher (32).
  teacher_shapes = {(1, 4, 4, 32), (32, 96)}  # its position embedding and qkv kernels
  assert not teacher_shapes & {leaf.shape for leaf in jax.tree.leaves(state)}
  saved = checkpoints.shapes_by_name(checkpoints.weights_manager(str(tmp_path / "run")).item_metadata(3))
  assert saved and not teacher_shapes & set(saved.values())
  assert np.abs(state["teacher"].value["backbone"]["pos_embed"] - init_ema).max() > 0  # the EMA moved
  meta = checkpoints.saved_metadata(checkpoints.weights_manager(str(tmp_path / "run")), 3)
  assert meta["distill_teacher"] == built.frozen_teacher.record
  assert meta["distill_teacher"]["path"] == teachers["demo"]
  # The targets are the frozen teacher's: halving its weights changes the loss.
  real = first_metrics(learner.build(cfg, mesh, TRAIN_STEPS_PER_EPOCH), cfg)
  halved = distill.FrozenTeacher(jax.tree.map(lambda x: x * 0.5, built.frozen_teacher.params),
                                 built.frozen_teacher.record)
  other = first_metrics(learner.build(cfg, mesh, TRAIN_STEPS_PER_EPOCH, halved), cfg)
  assert abs(float(real["dino_loss"]) - float(other["dino_loss"])) > 1e-3
  assert abs(float(real["teacher_entropy"]) - float(other["teacher_entropy"])) > 1e-3


def test_distill_interrupted_and_resumed_equals_uninterrupted(teachers, tmp_path):
  assert_resume_is_exact(distill_cfg(teachers["demo"], steps=6), tmp_path, stop_at=3, end=6)


def test_resume_checks_the_teacher(teachers, tmp_path):
  teacher = tmp_path / "teacher"
  shutil.copytree(teachers["demo"], teacher)
  run = str(tmp_path / "run")
  trainer.train(distill_cfg(str(teacher), steps=6), run, max_steps=2)
  # The teacher run goes on after the student started: the student resumes from the teacher
  # checkpoint it was trained against, not the teacher's newest.
  trainer.train(tiny(demo_fashion_mnist, steps=6), str(teacher))
  assert checkpoints.complete_steps(teacher / "checkpoints")[-1] == 6
  state = trainer.train(distill_cfg(str(teacher), steps=6), run, max_steps=3)["state"]
  assert int(state["step"]) == 3
  meta = checkpoints.saved_metadata(checkpoints.weights_manager(run), 3)["distill_teacher"]
  assert meta["step"] == 4 and meta["path"] == str(teacher)
  with pytest.raises(UsageError, match="was trained against the teacher .*teacher.* resume with that teacher"):
    trainer.train(distill_cfg(teachers["demo_seed1"], steps=6), run)
  with pytest.raises(UsageError, match="was trained by distillation from .*; set --config.distill.teacher"):
    trainer.train(tiny(demo_fashion_mnist, steps=6, **{"model.width": 16, "model.mlp_dim": 32,
                                                     "model.drop_path_rate": 0.0}), run)
  plain = tiny(demo_fashion_mnist, steps=6, **{"model.width": 16, "model.mlp_dim": 32})
  trainer.train(plain, str(tmp_path / "plain"), max_steps=2)
  with pytest.raises(UsageError, match="was not trained by distillation"):
    trainer.train(distill_cfg(teachers["demo"], steps=6, **{"model.drop_path_rate": 0.1}), str(tmp_path / "plain"))


def test_teacher_of_another_architecture_is_one_error_line(teachers, tmp_path):
  """A setting no array shape shows (attention heads) is caught from the teacher run's
  config.json, in one line."""
  flags = ["--config", "configs/demo_distill_fashion_mnist.py:tiny", f"--config.distill.teacher={teachers['demo']}",
           "--config.distill.model.num_heads=4"]
  proc = run_cli(*flags, workdir=tmp_path)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1, err[-2000:]
  assert lines[0] == (f"error: distill.teacher={teachers['demo']!r} was trained with another architecture than "
                      "distill.model / distill.head: distill.model.num_heads: 4, the teacher run's 2"), lines[0]


def test_teacher_arrays_are_checked_without_its_config(teachers, tmp_path):
  teacher = tmp_path / "teacher"
  shutil.copytree(teachers["demo"], teacher)
  (teacher / "config.json").unlink()
  cfg = distill_cfg(str(teacher), **{"distill.model.depth": 3})
  with pytest.raises(UsageError, match=r"does not match distill.model / distill.head: \d+ arrays differ, e.g. "
                                       "backbone/block2"):
    learner.build(cfg, sharding.make_mesh(cfg), TRAIN_STEPS_PER_EPOCH)
  with pytest.raises(UsageError, match="holds no teacher|no checkpoint"):
    learner.build(distill_cfg(str(tmp_path / "nothing")), sharding.make_mesh(cfg), TRAIN_STEPS_PER_EPOCH)


@pytest.mark.parametrize("override,message", [
    ({"distill.head.out_dim": 32}, "distill.head.out_dim 32 must equal head.out_dim 64"),
    ({"distill.model.patch_size": 8, "loss.ibot_weight": 1.0}, "with iBOT the teacher's patch grid"),
    ({"loss.region_weight": 0.5}, "does not support EsViT's region loss"),
])
def test_bad_distillation_settings(teachers, override, message):
  with pytest.raises(UsageError, match=message):
    config_checks.check(distill_cfg(teachers["demo"], **override), 8)


def test_distill_teacher_needs_its_architecture():
  cfg = tiny(demo_fashion_mnist, **{"distill.teacher": "runs/demo"})
  with pytest.raises(UsageError, match="needs the teacher's architecture in distill.model and distill.head"):
    config_checks.check(cfg, 8)
  cfg = dinov2_distill_vits14.get_config("tiny")  # as shipped: the teacher still to be named
  with pytest.raises(UsageError, match="distill.teacher is empty: name the teacher's run directory"):
    config_checks.check(cfg, 8)
  cfg.distill.teacher = "runs/vitg14"
  del cfg.distill.model["num_heads"]
  with pytest.raises(UsageError, match="distill.model / distill.head lack a setting"):
    config_checks.check(cfg, 8)


def test_official_distillation_config():
  cfg = dinov2_distill_vits14.get_config()
  assert (cfg.distill.model.width, cfg.distill.model.depth, cfg.distill.model.ffn) == (1536, 40, "swiglu")
  assert (cfg.distill.head.out_dim, cfg.distill.head.bottleneck_dim, cfg.distill.head.ibot_bottleneck_dim) == (
      131072, 384, 256)
  assert (cfg.model.width, cfg.model.depth, cfg.model.patch_size, cfg.model.drop_path_rate) == (384, 12, 14, 0.0)
  assert cfg.head.out_dim == 131072


# ---------------------------------------------------------------------------------------
# Phases.
# ---------------------------------------------------------------------------------------


def hires_cfg(source, steps=8, **overrides):
  return tiny(demo_hires_fashion_mnist, steps=steps, **{"phase.start_from": source, **overrides})


def test_phase_changing_resolution_resumes_exactly(teachers, tmp_path):
  cfg = hires_cfg(teachers["demo"], steps=8)  # steps 4..8 at 32 px crops, grid 8
  full = assert_resume_is_exact(cfg, tmp_path, stop_at=6, end=8)
  assert full["params"]["backbone"]["pos_embed"].shape == (1, 8, 8, 32)
  rows = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
  assert rows[0]["step"] == 5 and all(row["phase"] == "high_res" for row in rows)
  meta = checkpoints.saved_metadata(checkpoints.weights_manager(str(tmp_path / "resumed")), 8)
  assert meta["phase"] == {"name": "high_res", "start_from": teachers["demo"], "start_step": 4,
                           "carry": ["params", "teacher", "opt_state", "centers", "step"]}


def test_phase_resizes_the_position_embedding_once_as_the_model_does(teachers):
  cfg = hires_cfg(teachers["demo"])
  mesh = sharding.make_mesh(cfg)
  fresh = learner.build(cfg, mesh, TRAIN_STEPS_PER_EPOCH).state
  state, record = phases.start(fresh, cfg)
  source, _ = checkpoints.restore_weights(teachers["demo"], ("backbone",))
  assert record["start_step"] == 4 and int(state["step"]) == 4
  stored = state["teacher"].value["backbone"]
  np.testing.assert_array_equal(stored["pos_embed"], resize_pos_embed(source["backbone"]["pos_embed"], (8, 8), 0.1))
  # The stored 8x8 grid gives the same features at 32 px as the old 4x4 grid resized on the fly.
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 32, 32, 3))
  old = models.make_backbone(tiny(demo_fashion_mnist).model).apply({"params": source["backbone"]}, images)
  new = models.make_backbone(cfg.model).apply({"params": stored}, images)
  np.testing.assert_allclose(new["embedding"], old["embedding"], atol=1e-5)
  # The other arrays are carried as they were; the pos_embed Adam moments restart at 0.
  np.testing.assert_array_equal(stored["block0"]["mlp"]["fc1"]["kernel"],
                                source["backbone"]["block0"]["mlp"]["fc1"]["kernel"])
  moments = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state["opt_state"])
             if jax.tree_util.keystr(path).endswith("['backbone']['pos_embed']")]
  assert moments and all(float(np.abs(m).max()) == 0 for m in moments)


def test_phase_without_step_restarts_the_schedules(teachers):
  cfg = tiny(demo_fashion_mnist, steps=8,
             **{"phase.start_from": teachers["demo"], "phase.carry": ("params", "teacher")})
  fresh = learner.build(cfg, sharding.make_mesh(cfg), TRAIN_STEPS_PER_EPOCH).state
  state, _ = phases.start(fresh, cfg)
  source, _ = checkpoints.restore_weights(teachers["demo"], ("backbone",))
  assert int(state["step"]) == 0
  assert_trees_close(jax.device_get(state["opt_state"]), jax.device_get(fresh["opt_state"]), atol=0)
  assert_trees_close(jax.device_get(state["teacher"].value["backbone"]), jax.device_get(source["backbone"]), atol=0)
  # Without its teacher EMA carried, the EMA starts from the carried student.
  cfg.phase.carry = ("params",)
  state, _ = phases.start(learner.build(cfg, sharding.make_mesh(cfg), TRAIN_STEPS_PER_EPOCH).state, cfg)
  assert_trees_close(jax.device_get(state["teacher"].value), jax.device_get(state["params"]), atol=0)


@pytest.mark.parametrize("override,message", [
    ({"model.depth": 3}, "has no params/backbone/block2"),
    ({"model.depth": 1}, "has params/backbone/block1.*which this config lacks"),
    ({"epochs": 4 / TRAIN_STEPS_PER_EPOCH}, "is at step 4, at or past the end of this config's schedule"),
    ({"model.mlp_dim": 32}, "a phase may change the position-embedding grid, not the architecture"),
    ({"phase.carry": ("params", "momentum")}, "phase.carry: unknown part"),
    ({"model.init_from": "runs/x"}, "set phase.start_from or model.init_from, not both"),
])
def test_bad_phase_settings(teachers, tmp_path, override, message):
  with pytest.raises(UsageError, match=message):
    trainer.train(hires_cfg(teachers["demo"], **override), str(tmp_path))
