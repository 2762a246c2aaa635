"""ResNet backbones and DINO's ResNet recipe: batch norm as PyTorch's, in the train state as
main_dino.py keeps it (student and teacher each moved by its own forward passes, the EMA on
parameters only), the same step on 8 fake devices as on one, exact resume after kill -9."""
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import dino_resnet50
from dino_jax import checkpoints
from dino_jax import config_checks
from dino_jax import data
from dino_jax import learner
from dino_jax import models
from dino_jax import phases
from dino_jax import runs
from dino_jax import sharding
from dino_jax import trainer
from dino_jax.errors import UsageError
from dino_jax.evaluators import linear
from dino_jax.evaluators import probe
from dino_jax.models import resnet
from tests.test_train import TRAIN_STEPS_PER_EPOCH
from tests.test_train import assert_trees_close
from tests.test_train import final_state
from tests.test_train import one_step
from tests.test_train import run_cli
from tests.test_train import step_crops
from tests.test_train import tiny


def test_batch_norm_is_pytorchs_in_train_and_eval_mode():
  """Train mode: the batch's mean and biased variance normalize, the running statistics move by
  0.1 towards the mean and the unbiased variance; eval mode: the running statistics normalize."""
  rng = np.random.default_rng(0)
  x = [rng.normal(1.5, 2.0, (4, 3, 5, 6)).astype(np.float32) for _ in range(2)]  # NHWC
  bn = resnet.BatchNorm()
  variables = bn.init(jax.random.PRNGKey(0), x[0])
  params = {"scale": jnp.asarray(rng.uniform(0.5, 1.5, 6), jnp.float32),
            "bias": jnp.asarray(rng.uniform(-1, 1, 6), jnp.float32)}
  ref = torch.nn.BatchNorm2d(6)
  ref.weight.data, ref.bias.data = torch.tensor(np.asarray(params["scale"])), torch.tensor(np.asarray(params["bias"]))
  stats = variables["batch_stats"]
  np.testing.assert_array_equal(stats["mean"], np.zeros(6))
  np.testing.assert_array_equal(stats["var"], np.ones(6))
  for batch in x:
    y, new = bn.apply({"params": params, "batch_stats": stats}, batch, mutable=["batch_stats"])
    stats = new["batch_stats"]
    y_ref = ref.train()(torch.from_numpy(batch.transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(y, y_ref, atol=2e-5)
  np.testing.assert_allclose(stats["mean"], ref.running_mean.numpy(), atol=1e-6)
  np.testing.assert_allclose(stats["var"], ref.running_var.numpy(), atol=1e-5)
  y_eval = bn.apply({"params": params, "batch_stats": stats}, x[0])  # not mutable: running statistics
  y_ref = ref.eval()(torch.from_numpy(x[0].transpose(0, 3, 1, 2))).detach().numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(y_eval, y_ref, atol=2e-5)


@pytest.mark.parametrize("depth,gmacs,dim", [(18, 1.814, 512), (50, 4.089, 2048)])
def test_contract_grid_and_flops(depth, gmacs, dim):
  """torchvision's published multiply-adds at 224 px (1.81 and 4.09 G), the output contract of
  every backbone, stride 32 (halvings round up), the stem at layer id 0."""
  model = resnet.ResNet(depth=depth)
  assert abs(model.forward_flops(224) / 2e9 - gmacs) < 0.005
  assert model.embed_dim == dim and model.grid(224) == (7, 7) and model.grid(40) == (2, 2)
  out = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x, layers=2)[0],
                       jnp.zeros((2, 40, 40, 3)))
  assert out["embedding"].shape == (2, dim) and out["patch"].shape == (2, 2, 2, dim)
  assert [o["patch"].shape[-1] for o in out["intermediate"]] == [dim, dim]
  assert model.layer_id("conv1/kernel") == 0 and model.layer_id("layer1_0/conv1/kernel") == 1
  last = resnet.RESNET_BLOCKS[depth][1][-1] - 1
  assert model.layer_id(f"layer4_{last}/bn2/scale") == model.num_layers - 1
  with pytest.raises(ValueError, match="no mask"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), mask=jnp.zeros((1, 1), bool))


def resnet_tiny(**overrides):
  return tiny(dino_resnet50, **overrides)


def test_step_moves_each_models_statistics_by_its_own_passes():
  """main_dino.py: the teacher (a copy of the student at the start, buffers included) sees the
  global crops in train mode, so its running statistics after step 0 are those of one pass of
  the initial weights over them; the student's saw the global crops, then the local ones. The
  teacher's EMA moves its parameters only."""
  cfg = resnet_tiny()
  built = learner.build(cfg, sharding.make_mesh(cfg, jax.devices()[:1]), TRAIN_STEPS_PER_EPOCH)
  init = jax.device_get(built.state)
  crops = step_crops(data.make_source(cfg.data, "train"), cfg, 0)
  views = jax.device_get(built.make_views(learner.augmentation_key(cfg), 0, crops))
  state, _ = built.train_step(built.state, jax.device_put(dict(views), built.batch_sharding))
  state = jax.device_get(state)
  flat = lambda v: v.reshape((-1,) + v.shape[2:])
  variables = {"params": init["params"], "batch_stats": init["batch_stats"]["student"]}
  _, after_global = built.model.apply(variables, flat(views["global"]), mutable=["batch_stats"])
  _, after_local = built.model.apply(dict(variables, batch_stats=after_global["batch_stats"]), flat(views["local"]),
                                     mutable=["batch_stats"])
  assert_trees_close(state["batch_stats"]["teacher"], after_global["batch_stats"], atol=1e-6)
  assert_trees_close(state["batch_stats"]["student"], after_local["batch_stats"], atol=1e-6)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), state["batch_stats"]["teacher"],
                                       init["batch_stats"]["teacher"]))
  assert max(moved) > 0


def test_sharded_step_equals_unsharded_with_synchronized_batch_norm():
  """One device, 8 (data parallel) and 2 x 4 (FSDP, kernels of >= 256 elements split): the same
  update, batch statistics over the global batch (SyncBatchNorm)."""
  cfg = resnet_tiny()
  s1, m1 = one_step(cfg, jax.devices()[:1], steps=2)
  fsdp = resnet_tiny(**{"mesh.fsdp": 4, "mesh.fsdp_min_size": 256})
  kernel = learner.build(fsdp, sharding.make_mesh(fsdp), TRAIN_STEPS_PER_EPOCH).state["params"]["backbone"]
  assert "fsdp" in tuple(kernel["layer4_0"]["conv2"]["kernel"].sharding.spec)
  for other in (cfg, fsdp):
    s8, m8 = one_step(other, jax.devices(), steps=2)
    for part in ("params", "teacher", "batch_stats", "center"):
      assert_trees_close(s8[part], s1[part], atol=1e-5)
    for k in m1:
      np.testing.assert_allclose(m8[k], m1[k], atol=1e-5, rtol=1e-5, err_msg=k)
  assert all(np.isfinite(v) for v in m1.values())


def test_linear_protocol_takes_a_resnets_pooled_output():
  """DINO's eval_linear.py feeds a convnet's pooled output (`model(inp)`), not the last blocks."""
  cfg = dino_resnet50.get_config()
  assert linear.linear_variants(cfg.evals.linear_dino, cfg.model) == (probe.Variant(1, False),)


def test_kill_9_then_resume_equals_uninterrupted_batch_norm_statistics_included(tmp_path):
  steps = 8
  flags = ["--config", "configs/dino_resnet50.py:tiny", "--config.data.source=fashion_mnist_demo",
           "--config.data.image_size=20", "--config.evals.knn.every_steps=-1",
           "--config.evals.knn.train_split=train", "--config.evals.knn.test_split=test",
           f"--config.epochs={steps / TRAIN_STEPS_PER_EPOCH}", f"--config.optim.warmup_epochs={2 / TRAIN_STEPS_PER_EPOCH}",
           "--config.checkpoint.every_steps=1"]
  ckpt = tmp_path / "killed" / "checkpoints"
  proc = run_cli(*flags, workdir=tmp_path / "killed")
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None and not (ckpt / "3").is_dir():
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  resumed = run_cli(*flags, workdir=tmp_path / "killed")
  _, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err[-3000:]
  cfg = resnet_tiny(steps=steps)
  reference = jax.device_get(trainer.train(cfg, str(tmp_path / "reference"))["state"])
  step, state = final_state(tmp_path / "killed", cfg)
  assert step == steps
  assert_trees_close(state, reference, atol=1e-6)
  assert_trees_close(state["batch_stats"], reference["batch_stats"], atol=1e-6)

  # The run's backbone for the tools: the teacher's parameters with its running statistics, in
  # eval mode (an image's embedding does not depend on the rest of its batch).
  backbone = runs.load_backbone(str(tmp_path / "killed"))
  assert_trees_close(backbone.params["batch_stats"], reference["batch_stats"]["teacher"]["backbone"], atol=0)
  images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), np.uint8)
  np.testing.assert_allclose(backbone(images)["embedding"][:1], backbone(images[:1])["embedding"], atol=1e-5)


def test_backbone_weights_round_trip():
  params = {"conv1": {"kernel": np.ones((1,))}}
  stats = {"bn1": {"mean": np.zeros(1), "var": np.ones(1)}}
  weights = models.backbone_weights(params, stats)
  assert models.backbone_variables(weights) == {"params": params, "batch_stats": stats}
  assert models.backbone_variables(params) == {"params": params} and models.backbone_weights(params) is params


def test_init_from_and_phase_carry_the_running_statistics(tmp_path):
  """`model.init_from` starts student and teacher from the source teacher's weights and running
  statistics; a phase carries them with the parameters."""
  cfg = resnet_tiny(steps=2)
  source = jax.device_get(trainer.train(cfg, str(tmp_path / "source"))["state"])
  teacher_stats = source["batch_stats"]["teacher"]["backbone"]
  fresh = learner.build(cfg, sharding.make_mesh(cfg), TRAIN_STEPS_PER_EPOCH).state
  started = jax.device_get(checkpoints.init_from_run(fresh, str(tmp_path / "source")))
  for who in ("student", "teacher"):
    assert_trees_close(started["batch_stats"][who]["backbone"], teacher_stats, atol=0)
  assert_trees_close(started["params"]["backbone"], source["teacher"].value["backbone"], atol=0)

  phase = resnet_tiny(steps=2, **{"phase.start_from": str(tmp_path / "source"), "phase.carry": ("params",)})
  fresh = learner.build(phase, sharding.make_mesh(phase), TRAIN_STEPS_PER_EPOCH).state
  carried, _ = phases.start(fresh, phase)
  carried = jax.device_get(carried)
  for who in ("student", "teacher"):  # a teacher not carried starts as a copy of the student
    assert_trees_close(carried["batch_stats"][who], source["batch_stats"]["student"], atol=0)


def test_ibot_and_distillation_are_refused_with_one_line():
  """A ResNet has no mask token, and DINOv2 distils ViTs: both refused before anything runs."""
  cfg = resnet_tiny(**{"loss.ibot_weight": 1.0})
  with pytest.raises(UsageError, match="needs a ViT"):
    config_checks.check(cfg, 1)
  cfg = resnet_tiny()
  cfg.distill = dict(teacher="runs/demo", teacher_step=-1, model=tiny().model.to_dict(), head=cfg.head.to_dict())
  with pytest.raises(UsageError, match="not ResNets"):
    config_checks.check(cfg, 1)
