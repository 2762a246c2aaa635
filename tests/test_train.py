"""Trainer tests on 8 fake CPU devices: sharding, resume, CLI, data paths and bad input."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from configs import demo_fashion_mnist
from configs import dino_vits16
from configs import dinov2_vits14
from dino_jax import crops
from dino_jax import data
from dino_jax import learner
from dino_jax import sharding
from dino_jax import trainer
from dino_jax.errors import UsageError

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_STEPS_PER_EPOCH = 10000 // 16  # bundled train split / tiny batch


def tiny(module=dino_vits16, steps=6, **overrides):
  cfg = module.get_config("tiny")
  cfg.data.source = "fashion_mnist_demo"
  cfg.data.image_size = 20
  cfg.evals.knn.train_split, cfg.evals.knn.test_split = "train", "test"
  cfg.epochs = steps / TRAIN_STEPS_PER_EPOCH
  cfg.optim.warmup_epochs = 2 / TRAIN_STEPS_PER_EPOCH  # so the weights move within a few steps
  cfg.evals.knn.every_steps = -1
  cfg.update_from_flattened_dict(overrides)
  return cfg


def step_crops(src, cfg, step):
  """The host-made crops of the global batch of `step` (what the loader hands the step)."""
  index = data.batch_indices(len(src), cfg.batch_size, step, cfg.seed)
  return data.read_views(src, index, np.arange(cfg.batch_size), step, cfg.seed, crops.crop_specs(cfg.aug))


def without_key_bias(path, x):
  """The attention key bias has an exactly zero gradient (softmax ignores a shift shared by all
  keys): Adam turns its rounding noise into +-lr steps of either sign, so it is left out of
  comparisons of runs whose reductions run in another order."""
  x = np.asarray(x)
  if jax.tree_util.keystr(path).endswith("['qkv']['bias']") and x.shape[0] == 3:
    x = x.copy()
    x[1] = 0
  return x


def assert_trees_close(a, b, atol):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(without_key_bias(path, x), without_key_bias(path, y), atol=atol, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def one_step(cfg, devices, steps=1):
  """State and metrics after `steps` steps on a mesh of `devices`, from fixed real images."""
  mesh = sharding.make_mesh(cfg, devices)
  built = learner.build(cfg, mesh, TRAIN_STEPS_PER_EPOCH)
  src = data.make_source(cfg.data, "train")
  state = built.state
  for step in range(steps):
    batch = dict(built.make_views(learner.augmentation_key(cfg), step,
                                    jax.device_put(step_crops(src, cfg, step), built.batch_sharding)))
    if built.step_masks:
      batch["masks"] = jax.device_put(built.step_masks(step), built.batch_sharding)
    state, metrics = built.train_step(state, batch)
  return jax.device_get(state), jax.device_get(metrics)


def test_step_moves_student_teacher_and_center():
  cfg = tiny()
  mesh = sharding.make_mesh()
  init = jax.device_get(learner.build(cfg, mesh, TRAIN_STEPS_PER_EPOCH).state)
  state, metrics = one_step(cfg, jax.devices(), steps=3)
  assert int(state["step"]) == 3
  moved = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  student_move = moved(state["params"], init["params"])
  teacher_move = moved(state["teacher"].value, init["teacher"].value)
  assert student_move > 0 and 0 < teacher_move < student_move  # the teacher is a slow EMA
  assert float(np.abs(state["center"].value).sum()) > 0
  # The last layer is frozen during the first epoch (the whole tiny run).
  np.testing.assert_array_equal(state["params"]["head"]["last_layer"], init["params"]["head"]["last_layer"])
  assert 0 < metrics["teacher_entropy"] <= np.log(cfg.head.out_dim) + 1e-5
  assert metrics["lr"] > 0 and metrics["grad_norm"] > 0


def final_state(workdir, cfg):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  state = learner.build(cfg, sharding.make_mesh(), TRAIN_STEPS_PER_EPOCH).state
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  return mngr.latest_step(), jax.device_get(mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(abstract)))


def assert_resume_is_exact(cfg, tmp_path, stop_at: int, end: int) -> dict:
  """A run stopped after `stop_at` steps and rerun ends as the uninterrupted run (which it
  returns) at step `end`."""
  full = trainer.train(cfg, str(tmp_path / "full"))["state"]
  first = trainer.train(cfg, str(tmp_path / "resumed"), max_steps=stop_at)["state"]
  assert int(first["step"]) == stop_at
  resumed = trainer.train(cfg, str(tmp_path / "resumed"))["state"]
  assert int(resumed["step"]) == int(full["step"]) == end
  assert_trees_close(jax.device_get(resumed), jax.device_get(full), atol=1e-6)
  return full


@pytest.mark.parametrize("module", [dinov2_vits14, dino_vits16], ids=["dinov2", "dino"])  # DINO: skip-mode freeze
def test_interrupted_and_resumed_run_equals_uninterrupted(module, tmp_path):
  cfg = tiny(module, steps=6)
  cfg.checkpoint.every_steps = 2
  assert_resume_is_exact(cfg, tmp_path, stop_at=3, end=6)


def device_env(devices: int) -> dict:
  """This process's environment for a subprocess on `devices` fake CPU devices (the tests'
  compiler flags kept)."""
  flags = os.environ["XLA_FLAGS"].replace("--xla_force_host_platform_device_count=8", "")
  return dict(os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")


def run_cli(*args, workdir, **kw):
  cmd = [sys.executable, "-m", "dino_jax.train", "--workdir", str(workdir), *args]
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_kill_9_at_three_random_steps_then_resume_equals_uninterrupted(tmp_path):
  steps = 16
  flags = ["--config", "configs/demo_fashion_mnist.py:tiny", f"--config.epochs={steps / TRAIN_STEPS_PER_EPOCH}",
           f"--config.optim.warmup_epochs={2 / TRAIN_STEPS_PER_EPOCH}",
           "--config.checkpoint.every_steps=1", "--config.evals.knn.every_steps=-1"]
  ckpt = tmp_path / "killed" / "checkpoints"
  kill_points = sorted(np.random.default_rng().choice(np.arange(2, steps - 4), 3, replace=False))
  for kill_at in kill_points:
    proc = run_cli(*flags, workdir=tmp_path / "killed")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not any(
        (ckpt / str(s)).is_dir() for s in range(kill_at, steps + 1)):
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed at {kill_at}"
  resumed = run_cli(*flags, workdir=tmp_path / "killed")
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err[-3000:]
  cfg = tiny(demo_fashion_mnist, steps=steps)
  reference = trainer.train(cfg, str(tmp_path / "reference"))["state"]
  step, state = final_state(tmp_path / "killed", cfg)
  assert step == steps, kill_points
  assert_trees_close(state, jax.device_get(reference), atol=1e-6)


def test_cli_tiny_config_end_to_end(tmp_path):
  proc = run_cli("--config", "configs/demo_fashion_mnist.py:tiny", workdir=tmp_path)
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  for line in ("trained teacher", "random init", "raw pixels"):
    assert line in out
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert rows[0]["step"] == 1 and {"loss", "dino_loss", "lr", "momentum", "teacher_temp", "teacher_entropy",
                                   "teacher_kl_to_mean", "grad_norm"} <= set(rows[0])
  final = rows[-1]
  assert 0.3 < final["knn_top1_raw_pixels"] <= 1 and 0 < final["knn_top1_teacher"] <= 1
  assert any((tmp_path / "tensorboard").iterdir())
  assert (tmp_path / "checkpoints" / "12").is_dir()
  assert json.loads((tmp_path / "config.json").read_text())["model"]["width"] == 32


def test_metric_writer_leaves_torch_unimported_and_importable(tmp_path):
  """tensorboardX imports PyTorch when it is installed; the trainer's writer does not let it."""
  script = ("import sys; from dino_jax import trainer; w = trainer.MetricWriter(sys.argv[1]); w.write(1, {'loss': 2.5});"
            "w.close(); assert 'torch' not in sys.modules, 'torch imported'; import torch; print(torch.ones(2).sum().item())")
  proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0 and proc.stdout.strip() == "2.0", proc.stderr[-2000:]
  assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 2.5}
  assert any(f.stat().st_size > 0 for f in (tmp_path / "tensorboard").iterdir())


# ------------------------------------------------------------------------------------------
# Data paths.
# ------------------------------------------------------------------------------------------


def write_image_folder(root, per_class=6, size=24):
  rng = np.random.default_rng(0)
  for c, name in enumerate(["cats", "dogs"]):
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      pixels = rng.integers(0, 255, (size, size + 4 * c, 3), np.uint8)
      Image.fromarray(pixels).save(root / name / f"{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_source_and_training(tmp_path):
  write_image_folder(tmp_path / "images" / "train")
  src = data.FolderSource(str(tmp_path / "images" / "train"), 20)
  assert len(src) == 12 and src.num_classes == 2
  image, label = src.get(11)
  assert image.shape == (20, 20, 3) and image.dtype == np.uint8 and label == 1
  cfg = tiny(steps=2, **{"data.source": "folder", "data.path": str(tmp_path / "images"), "batch_size": 8,
                                "epochs": 2.0, "evals.knn.every_steps": 0, "evals.knn.batch_size": 8,
                                "evals.knn.train_split": "train", "evals.knn.test_split": "train"})
  out = trainer.train(cfg, str(tmp_path / "run"))  # 12 images: one step an epoch
  assert int(out["state"]["step"]) == 2
  assert 0 <= out["results"]["knn_top1_teacher"] <= 1  # k-NN on folder labels (12 = 8 + padded 4)


def test_tfds_source_with_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=24):
    src = data.TfdsSource("mnist", "train", 20)
    assert len(src) == 24 and src.num_classes == 10
    image, label = src.get(3)
    assert image.shape == (20, 20, 3) and image.dtype == np.uint8 and 0 <= label < 10
    cfg = tiny(steps=2, **{"data.source": "tfds", "data.name": "mnist", "batch_size": 8,
                           "epochs": 2 / 3, "evals.knn.every_steps": 0, "evals.knn.batch_size": 16,
                           "evals.knn.train_split": "train", "evals.knn.test_split": "test"})  # 24 images: 3 steps an epoch
    out = trainer.train(cfg, str(tmp_path / "run"))
    assert int(out["state"]["step"]) == 2 and 0 <= out["results"]["knn_top1_teacher"] <= 1


def test_batches_are_a_function_of_step_only():
  src = data.fashion_mnist_demo("test", 28)
  specs = [crops.CropSpec(16, (0.4, 1.0))] * 2 + [crops.CropSpec(8, (0.1, 0.4))]
  first = list(zip(range(5), data.train_batches(src, 200, seed=3, start_step=0, specs=specs)))
  later = next(data.train_batches(src, 200, seed=3, start_step=3, specs=specs))
  assert later[0] == 3 and later[1]["global"].shape == (200, 2, 16, 16, 3) and later[1]["local"].shape == (200, 1, 8, 8, 3)
  for key in ("global", "local"):
    np.testing.assert_array_equal(later[1][key], first[3][1][1][key])
  halves = [next(data.train_batches(src, 200, seed=3, start_step=3, specs=specs, process_index=i, process_count=2))
            for i in range(2)]  # two processes: each its half of the same crops
  np.testing.assert_array_equal(np.concatenate([h[1]["global"] for h in halves]), later[1]["global"])
  epoch = np.concatenate([data.batch_indices(len(src), 500, s, 3) for s in range(4)])
  np.testing.assert_array_equal(np.sort(epoch), np.arange(2000))  # each epoch visits every image once


# ------------------------------------------------------------------------------------------
# Bad input: one clear error.
# ------------------------------------------------------------------------------------------


def test_missing_and_empty_image_folders(tmp_path):
  with pytest.raises(UsageError, match="does not exist"):
    data.FolderSource(str(tmp_path / "nope"), 20)
  (tmp_path / "empty" / "a").mkdir(parents=True)
  (tmp_path / "empty" / "a" / "notes.txt").write_text("x")
  with pytest.raises(UsageError, match="has no images"):
    data.FolderSource(str(tmp_path / "empty"), 20)


def test_tfds_dataset_not_available_offline(tmp_path):
  with pytest.raises(UsageError, match="'mnist'.*not available offline"):
    data.TfdsSource("mnist", "train", 20, data_dir=str(tmp_path))


def test_batch_not_divisible_by_devices(tmp_path):
  with pytest.raises(UsageError, match="batch_size 12 is not divisible by the 8 devices"):
    trainer.train(tiny(batch_size=12), str(tmp_path))


@pytest.mark.parametrize("override,message", [
    ({"model.remat": "some"}, "model.remat must be one of none, full, dots, not 'some'"),
    ({"model.attention": "cudnn"}, "model.attention=cudnn needs a GPU"),
    ({"model.attention": "flash"}, "model.attention must be 'xla' or 'cudnn'"),
    ({"model.scan": True, "model.drop_path_rate": 0.1}, "model.scan needs one stochastic-depth rate for every block"),
])
def test_bad_speed_options(tmp_path, override, message):
  with pytest.raises(UsageError, match=message):
    trainer.train(tiny(**override), str(tmp_path))


def test_checkpoint_of_another_architecture(tmp_path):
  trainer.train(tiny(steps=2), str(tmp_path))
  with pytest.raises(UsageError, match="does not match this config"):
    trainer.train(tiny(steps=4, **{"model.width": 48}), str(tmp_path))


@pytest.mark.parametrize("flag,message", [
    ("--config.modle.width=3", "error: unknown config key 'modle'"),
    ("--config.batch_size=abc", "error: flag --config.batch_size=abc"),
    ("--config.data.source=folder", "error: data.path must name an image folder"),
])
def test_cli_bad_input_is_one_line(tmp_path, flag, message):
  proc = run_cli("--config", "configs/demo_fashion_mnist.py:tiny", flag, workdir=tmp_path)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(message), err[-2000:]
