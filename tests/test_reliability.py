"""Preemption, unfinished checkpoints, broken images, non-finite steps and collapse monitors."""
import json
import logging
import re
import signal
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import demo_fashion_mnist
from dino_jax import checkpoints
from dino_jax import data
from dino_jax import learner
from dino_jax import sharding
from dino_jax import trainer
from dino_jax.errors import UsageError
from tests.test_train import TRAIN_STEPS_PER_EPOCH, run_cli, step_crops, tiny


def test_sigterm_saves_a_checkpoint_and_exits_0_then_resumes(tmp_path):
  steps = 400
  flags = ["--config", "configs/demo_fashion_mnist.py:tiny", f"--config.epochs={steps / TRAIN_STEPS_PER_EPOCH}",
           "--config.checkpoint.every_steps=100000", "--config.evals.knn.every_steps=-1"]
  proc = run_cli(*flags, workdir=tmp_path)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None and not (metrics.exists() and metrics.read_text()):
    time.sleep(0.02)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  assert "stopped at step" in out
  stopped_at = int(re.search(r"stopped at step (\d+) on request", out).group(1))
  assert 0 < stopped_at < steps
  assert (tmp_path / "checkpoints" / str(stopped_at)).is_dir()
  # Many steps left, so that the signal lands mid-run however slow the machine; the resumed run
  # goes on from the stop for two of them (in this process, the CLI's config).
  cfg = demo_fashion_mnist.get_config("tiny")
  cfg.update_from_flattened_dict({"epochs": steps / TRAIN_STEPS_PER_EPOCH, "checkpoint.every_steps": 100000,
                                  "evals.knn.every_steps": -1})
  resumed = trainer.train(cfg, str(tmp_path), max_steps=stopped_at + 2)["state"]
  assert int(resumed["step"]) == stopped_at + 2
  assert sorted(checkpoints.complete_steps(tmp_path / "checkpoints"))[-2:] == [stopped_at, stopped_at + 2]


def test_unfinished_checkpoint_is_ignored_with_a_warning(tmp_path, caplog):
  cfg = tiny(steps=4)
  trainer.train(cfg, str(tmp_path), max_steps=2)
  junk = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
  junk.mkdir()
  (junk / "half").write_bytes(b"\0" * 10)
  with caplog.at_level(logging.WARNING):
    state = trainer.train(cfg, str(tmp_path))["state"]
  assert int(state["step"]) == 4
  assert "ignoring unfinished checkpoint" in caplog.text and "3.orbax-checkpoint-tmp-1234" in caplog.text


def test_small_replicated_arrays_are_saved_whole_and_large_ones_in_per_device_slices(tmp_path):
  """Orbax's replica-parallel save cuts a replicated array into one slice per device (a
  compiled slice program per new shape); arrays whose slices would be smaller than
  MIN_REPLICA_SLICE_BYTES are written whole instead. Both come back as saved."""
  replicated = sharding.replicated(sharding.make_mesh())
  small = jax.device_put(np.arange(40 * 11, dtype=np.float32).reshape(40, 11), replicated)
  large = jax.device_put(np.arange(256 * 520, dtype=np.float32).reshape(256, 520), replicated)
  assert large.nbytes // 8 >= checkpoints.MIN_REPLICA_SLICE_BYTES > small.nbytes
  compiled = []
  compile_event = "/jax/core/compile/backend_compile_duration"
  listener = lambda event, _, **kw: compiled.append(event) if event == compile_event else None
  mngr = checkpoints.checkpoint_manager(str(tmp_path), tiny())
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for step, state in enumerate([{"small": small}, {"large": large}]):
      compiled.clear()
      checkpoints.save(mngr, step, state, force=True)
      checkpoints.wait_until_saved(mngr)
      assert bool(compiled) == ("large" in state), (list(state), compiled)  # slices compiled for the large one only
      restored = mngr.restore(step)
      np.testing.assert_array_equal(*(next(iter(tree.values())) for tree in (restored, state)))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
    mngr.close()


# ------------------------------------------------------------------------------------------
# Messy image folders.
# ------------------------------------------------------------------------------------------

RNG = np.random.default_rng(0)


def pixels(h, w, c=3):
  return RNG.integers(0, 255, (h, w, c) if c else (h, w), np.uint8)


def write_odd_images(folder):
  """Good, odd and broken files; returns how many cannot be decoded."""
  folder.mkdir(parents=True)
  Image.fromarray(pixels(30, 40)).save(folder / "rgb.png")
  Image.fromarray(pixels(30, 40)).save(folder / "rgb.jpg")
  Image.fromarray(pixels(30, 40)).convert("CMYK").save(folder / "cmyk.jpg")
  Image.fromarray(pixels(30, 40, 4), "RGBA").save(folder / "rgba.png")
  Image.fromarray(pixels(30, 40, 0)).save(folder / "gray.png")
  Image.fromarray((RNG.integers(0, 65535, (30, 40))).astype(np.uint16)).save(folder / "gray16.png")
  Image.fromarray(pixels(30, 40)).convert("P").save(folder / "palette.gif")
  Image.fromarray(pixels(2, 3)).save(folder / "tiny.png")
  Image.fromarray(pixels(3000, 4000)).save(folder / "huge.jpg", quality=50)
  Image.fromarray(pixels(64, 64)).save(folder / "truncated.jpg")
  full = (folder / "truncated.jpg").read_bytes()
  (folder / "truncated.jpg").write_bytes(full[:len(full) // 2])
  (folder / "empty.png").write_bytes(b"")
  (folder / "not_an_image.jpeg").write_text("hello")
  return 3


def test_odd_images_decode_to_rgb(tmp_path):
  write_odd_images(tmp_path / "train")
  src = data.FolderSource(str(tmp_path / "train"), 20)
  for i, f in enumerate(src.files):
    if f.stem in ("truncated", "empty", "not_an_image"):
      continue
    image, _ = src.get(i)
    assert image.shape == (20, 20, 3) and image.dtype == np.uint8, f.name
  assert src.skipped == 0
  gray16 = src.get(src.files.index(tmp_path / "train" / "gray16.png"))[0]
  assert gray16.max() > 200  # 16-bit values rescaled, not clipped to white or black
  transparent = tmp_path / "clear.png"
  Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(transparent)
  with Image.open(transparent) as im:
    assert (data.to_square_rgb(im, 4) == 255).all()  # transparency shows as white


def test_broken_images_are_skipped_counted_and_never_crash_the_run(tmp_path):
  broken = write_odd_images(tmp_path / "images" / "train")
  src = data.FolderSource(str(tmp_path / "images" / "train"), 20)
  bad = src.files.index(tmp_path / "images" / "train" / "not_an_image.jpeg")
  np.testing.assert_array_equal(src.get(bad)[0], src.get(bad + 1)[0])  # the next file stands in
  cfg = tiny(steps=4, **{"data.source": "folder", "data.path": str(tmp_path / "images"), "batch_size": 8,
                         "epochs": 4.0, "evals.knn.every_steps": -1})  # 13 files: one step an epoch
  out = trainer.train(cfg, str(tmp_path / "run"))
  assert int(out["state"]["step"]) == 4
  rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
  assert rows[-1]["skipped_images"] == broken


def test_folder_of_only_broken_images_stops_with_one_error(tmp_path):
  (tmp_path / "train").mkdir()
  for i in range(20):
    (tmp_path / "train" / f"{i}.jpg").write_bytes(b"")
  src = data.FolderSource(str(tmp_path / "train"), 20)
  with pytest.raises(data.UsageError, match="unreadable images in a row"):
    src.get(0)


# ------------------------------------------------------------------------------------------
# Non-finite steps and collapse monitors.
# ------------------------------------------------------------------------------------------


@pytest.fixture
def nan_views_at_step_3(monkeypatch):
  make_views = learner.make_views

  def poisoned(key_data, step, step_crops, *, cfg):
    views = make_views(key_data, step, step_crops, cfg=cfg)
    return {k: jnp.where(step == 3, jnp.nan, v) for k, v in views.items()}

  monkeypatch.setattr(learner, "make_views", poisoned)


def test_nan_batch_stops_the_run_naming_the_step(tmp_path, nan_views_at_step_3):
  cfg = tiny(steps=6)
  cfg.checkpoint.every_steps = 1
  with pytest.raises(trainer.DivergenceError, match=r"at step 4 .*last good checkpoint: step 3"):
    trainer.train(cfg, str(tmp_path))


def test_nan_batch_is_skipped_when_configured(tmp_path, nan_views_at_step_3):
  cfg = tiny(steps=6, on_nonfinite="skip")
  state = jax.device_get(trainer.train(cfg, str(tmp_path))["state"])
  assert int(state["step"]) == 6 and int(state["nonfinite_steps"]) == 1
  assert int(state["first_nonfinite_step"]) == 4
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["params"]))
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["nonfinite_steps"] for r in rows] == [0, 0, 0, 1, 1, 1]


def test_nonfinite_step_leaves_the_state_unchanged():
  cfg = tiny()
  built = learner.build(cfg, sharding.make_mesh(), TRAIN_STEPS_PER_EPOCH)
  before = jax.device_get(built.state)
  batch = dict(built.make_views(learner.augmentation_key(cfg), 0,
                                  step_crops(data.fashion_mnist_demo("train", 20), cfg, 0)))
  batch["global"] = batch["global"].at[0].set(jnp.inf)
  after, metrics = jax.device_get(built.train_step(built.state, batch))
  assert not np.isfinite(metrics["loss"]) and int(after["nonfinite_steps"]) == 1
  for x, y in zip(jax.tree.leaves(before["params"]), jax.tree.leaves(after["params"])):
    np.testing.assert_array_equal(x, y)


def test_collapse_warnings():
  healthy = {"teacher_entropy": 3.0, "teacher_kl_to_mean": 1.5, "teacher_feature_std": 0.05}
  assert trainer.collapse_warnings(healthy, 1024) == []
  uniform = dict(healthy, teacher_entropy=0.995 * np.log(1024), teacher_kl_to_mean=1e-3)
  assert len(trainer.collapse_warnings(uniform, 1024)) == 2
  one_point = dict(healthy, teacher_entropy=0.01, teacher_kl_to_mean=1e-4, teacher_feature_std=1e-5)
  warnings = trainer.collapse_warnings(one_point, 1024)
  assert len(warnings) == 2 and "same target" in warnings[0] and "barely vary" in warnings[1]


def test_bad_on_nonfinite_value(tmp_path):
  with pytest.raises(UsageError, match="on_nonfinite must be 'stop' or 'skip'"):
    trainer.train(tiny(on_nonfinite="ignore"), str(tmp_path))
