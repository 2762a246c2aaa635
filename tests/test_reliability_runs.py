"""A run's life when things go wrong: failed saves, a full disk, Ctrl-C, a stop while waiting for
data, two trainers in one workdir, changed configs, damaged checkpoints, repeated metrics rows,
leftover checkpoints, the progress bar and evaluation periods in epochs (issue #15).

In-process tests arm `faulthandler` so that a hang fails (and ends) the test run instead of
blocking CI; command-line runs have a timeout.
"""
import faulthandler
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

from orbax.checkpoint._src.serialization import serialization as orbax_serialization
import pytest

from dino_jax import checkpoints
from dino_jax import cli as dino_cli
from dino_jax import data
from dino_jax import plot_metrics
from dino_jax import trainer
from dino_jax.errors import UsageError
from tests.test_train import REPO, tiny

STEPS = 4  # the tiny runs here: 4 steps, checkpoints every 2 (and Orbax's first one, step 1)
CLI = ["--config", "configs/demo_fashion_mnist.py:tiny", "--config.evals.knn.every_steps=-1"]
# What TensorStore raises when the disk fills up while it writes a checkpoint (seen on a full tmpfs).
DISK_FULL = ('RESOURCE_EXHAUSTED: Error writing local file "{path}/ocdbt.process_0/manifest.ocdbt": Failed '
             "writing: \"{path}/ocdbt.process_0/manifest.ocdbt.__lock\": Failed to write 357 bytes to file 8: "
             "No space left on device [os_error_code='28']")


@pytest.fixture(autouse=True)
def deadline():
  """Every test here ends within 10 minutes, or the test run fails with the threads' stacks."""
  faulthandler.dump_traceback_later(600, exit=True)
  trainer.stop_requested.clear()
  yield
  trainer.stop_requested.clear()
  faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> pathlib.Path:
  """A tiny run stopped after 2 of 4 steps: checkpoints 1 and 2, metrics rows 1 and 2."""
  workdir = tmp_path_factory.mktemp("base") / "run"
  faulthandler.dump_traceback_later(600, exit=True)
  trainer.train(tiny(steps=STEPS), str(workdir), max_steps=2)
  faulthandler.cancel_dump_traceback_later()
  return workdir


def copy_of(run: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  shutil.copytree(run, tmp_path / "run")
  return tmp_path / "run"


def cli(workdir, *flags, **kw) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, "-m", "dino_jax.train", "--workdir", str(workdir), *CLI, *flags],
                          cwd=REPO, text=True, **kw)


# ------------------------------------------------------------------------------------------
# Failed saves (items 1, 2).
# ------------------------------------------------------------------------------------------


def test_failed_save_exits_with_one_error_line(tmp_path):
  """A file where checkpoints/ should be: Orbax's threads used to keep the process alive."""
  tmp_path.mkdir(exist_ok=True)
  (tmp_path / "checkpoints").write_text("not a folder")
  proc = cli(tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    _, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 2, err[-3000:]
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: could not write a checkpoint to "), err[-3000:]
  assert "Not a directory" in lines[0] and "last complete checkpoint: none" in lines[0]


def test_disk_full_during_save_is_one_line_naming_the_last_checkpoint(base_run, tmp_path, monkeypatch):
  workdir = copy_of(base_run, tmp_path)

  async def disk_full(*args, **kwargs):
    raise ValueError(DISK_FULL.format(path=workdir / "checkpoints" / "4.orbax-checkpoint-tmp" / "default"))

  monkeypatch.setattr(orbax_serialization, "async_serialize_from_host", disk_full)
  with pytest.raises(checkpoints.SaveError) as error:
    trainer.train(tiny(steps=STEPS), str(workdir))
  message = str(error.value)
  assert message == (f"could not write a checkpoint to {workdir / 'checkpoints'}: no space left on device; "
                     "last complete checkpoint: step 2"), message


# ------------------------------------------------------------------------------------------
# Stopping: Ctrl-C and SIGTERM (items 3, 4).
# ------------------------------------------------------------------------------------------


def when(condition, then, timeout=500):
  """Runs `then` in a thread as soon as `condition()` holds."""
  def wait():
    end = time.time() + timeout
    while time.time() < end and not condition():
      time.sleep(0.02)
    then()
  threading.Thread(target=wait, daemon=True).start()


def test_ctrl_c_saves_at_the_step_boundary(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  previous = signal.getsignal(signal.SIGINT)
  dino_cli.stop_on_signals(trainer.stop_requested)
  try:
    when(lambda: metrics.exists() and metrics.read_text(), lambda: os.kill(os.getpid(), signal.SIGINT))
    out = trainer.train(tiny(steps=40), str(tmp_path))
  finally:
    signal.signal(signal.SIGINT, previous)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
  stopped = out["results"]["preempted_at"]
  assert 0 < stopped < 40 and int(out["state"]["step"]) == stopped
  assert checkpoints.complete_steps(tmp_path / "checkpoints")[-1] == stopped


def test_second_ctrl_c_quits_at_once(tmp_path):
  err = tmp_path / "stderr"
  with open(err, "w") as f:
    proc = cli(tmp_path / "run", "--config.epochs=1", stdout=subprocess.DEVNULL, stderr=f)
  try:
    metrics = tmp_path / "run" / "metrics.jsonl"
    end = time.time() + 300
    while time.time() < end and proc.poll() is None and not (metrics.exists() and metrics.read_text()):
      time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    while time.time() < end and proc.poll() is None and "send it again" not in err.read_text():
      time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=10)
  finally:
    proc.kill()
  assert proc.returncode == -signal.SIGINT, err.read_text()[-3000:]
  assert "Traceback" not in err.read_text()


class StalledSource:
  """The demo data whose reads hang from the second batch on (a stalled network disk)."""

  def __init__(self, source, batch_size):
    self.source, self.batch_size, self.calls = source, batch_size, 0
    self.stalled, self.release = threading.Event(), threading.Event()
    self.num_classes = source.num_classes
    self.lock = threading.Lock()

  def __len__(self):
    return len(self.source)

  def get(self, index, finish=None):
    with self.lock:
      self.calls += 1
      stall = self.calls > self.batch_size
    if stall:
      self.stalled.set()
      self.release.wait()
    return self.source.get(index, finish)


def test_stop_while_the_loop_waits_for_data(tmp_path, monkeypatch):
  cfg = tiny(steps=STEPS)
  stalled = StalledSource(data.fashion_mnist_demo("train", cfg.data.image_size), cfg.batch_size)
  monkeypatch.setattr(data, "make_source", lambda *a, **k: stalled)
  when(stalled.stalled.is_set, trainer.stop_requested.set)
  try:
    out = trainer.train(cfg, str(tmp_path))
  finally:
    stalled.release.set()
  assert out["results"]["preempted_at"] == 1
  assert checkpoints.complete_steps(tmp_path / "checkpoints") == [1]


# ------------------------------------------------------------------------------------------
# One trainer per workdir (item 5).
# ------------------------------------------------------------------------------------------


def write_lock(workdir, host, pid, age_s=0.0):
  lock = workdir / checkpoints.WorkdirLock.FILE
  lock.write_text(json.dumps({"host": host, "pid": pid, "started": "earlier"}))
  os.utime(lock, (time.time() - age_s, time.time() - age_s))
  return lock


def dead_pid() -> int:
  proc = subprocess.Popen(["true"])
  proc.wait()
  return proc.pid


def test_second_trainer_in_a_workdir_is_refused(tmp_path):
  write_lock(tmp_path, socket.gethostname(), os.getpid())
  with pytest.raises(UsageError, match=f"is in use by another trainer \\(pid {os.getpid()} on "):
    trainer.train(tiny(steps=STEPS), str(tmp_path))
  write_lock(tmp_path, "other-host", 1, age_s=10)
  with pytest.raises(UsageError, match="in use by another trainer \\(pid 1 on other-host"):
    with checkpoints.WorkdirLock(str(tmp_path)):
      pass


@pytest.mark.parametrize("host,age_s", [("this", 0.0), ("other-host", checkpoints.WorkdirLock.STALE_S + 60)],
                         ids=["dead_pid_here", "not_refreshed_elsewhere"])
def test_stale_lock_is_taken_over_and_released(tmp_path, caplog, host, age_s):
  lock = write_lock(tmp_path, socket.gethostname() if host == "this" else host, dead_pid(), age_s)
  with caplog.at_level(logging.WARNING):
    with checkpoints.WorkdirLock(str(tmp_path)) as held:
      assert json.loads(lock.read_text()) == held.owner and held.owner["pid"] == os.getpid()
  assert "taking over the stale lock" in caplog.text
  assert not lock.exists()


# ------------------------------------------------------------------------------------------
# Configs of a resume (item 6), damaged checkpoints (item 7), metrics rows (item 8),
# leftovers and keep (item 9).
# ------------------------------------------------------------------------------------------


def test_refused_resume_leaves_the_stored_config(base_run, tmp_path):
  workdir = copy_of(base_run, tmp_path)
  stored = (workdir / "config.json").read_text()
  with pytest.raises(UsageError, match="does not match this config"):
    trainer.train(tiny(steps=STEPS, **{"model.width": 48}), str(workdir))
  assert (workdir / "config.json").read_text() == stored
  assert not (workdir / checkpoints.WorkdirLock.FILE).exists()  # released


def test_changed_config_on_resume_keeps_history(tmp_path, capsys):
  first, second = tiny(steps=STEPS), tiny(steps=STEPS, **{"optim.base_lr": 1e-3})
  trainer.record_config(str(tmp_path), first, 0)
  trainer.record_config(str(tmp_path), first, 2)  # the same config: no history
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
  trainer.record_config(str(tmp_path), second, 2)
  assert json.loads((tmp_path / "config.0.json").read_text())["optim"]["base_lr"] == first.optim.base_lr
  assert json.loads((tmp_path / "config.2.json").read_text())["optim"]["base_lr"] == 1e-3
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["base_lr"] == 1e-3
  assert f"optim.base_lr: {first.optim.base_lr} -> 0.001" in capsys.readouterr().out


def damage(step_dir: pathlib.Path, how: str) -> None:
  chunk = max(step_dir.rglob("d/*"), key=lambda p: p.stat().st_size)  # the largest array chunk file
  if how == "truncated":
    chunk.write_bytes(chunk.read_bytes()[:chunk.stat().st_size // 2])
  elif how == "zeroed":
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 64] = bytes(64)
    chunk.write_bytes(bytes(raw))
  else:
    (step_dir / "default" / "_METADATA").unlink()


@pytest.mark.parametrize("how", ["truncated", "zeroed", "no_metadata"])
def test_damaged_checkpoint_is_named_and_the_newest_readable_one_used(base_run, tmp_path, caplog, how):
  workdir = copy_of(base_run, tmp_path)
  damage(workdir / "checkpoints" / "2", how)
  with caplog.at_level(logging.WARNING):
    _, step = checkpoints.restore_weights(str(workdir), ("backbone",))  # extract
  assert step == 1 and "checkpoint 2 in" in caplog.text and "is damaged" in caplog.text
  with pytest.raises(UsageError, match="no readable checkpoint .* step 2 is damaged"):
    checkpoints.restore_weights(str(workdir), ("backbone",), step=2)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    out = trainer.train(tiny(steps=STEPS), str(workdir), max_steps=1)  # the trainer: resumes at 1
  assert int(out["state"]["step"]) == 1
  assert "set aside as 2.damaged; resuming from step 1" in caplog.text
  assert (workdir / "checkpoints" / "2.damaged").is_dir() and not (workdir / "checkpoints" / "2").exists()


def test_checkpoint_manifest_lists_every_array_file(base_run):
  step_dir = base_run / "checkpoints" / "2"
  listed = {line.split("  ", 1)[1] for line in (step_dir / checkpoints.MANIFEST).read_text().splitlines()}
  items = {str(p.relative_to(step_dir)) for p in (step_dir / "default").rglob("*") if p.is_file()}
  assert listed == items and any("/d/" in name for name in listed)
  checkpoints.verify(step_dir)


def test_resume_drops_metrics_rows_past_the_checkpoint(tmp_path):
  rows = [{"step": s, "loss": 1.0} for s in (1, 2, 3, 4)] + [{"step": 2, "knn_top1": 0.5}]
  (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "lo')
  writer = trainer.MetricWriter(str(tmp_path), start_step=2)  # a run killed at step 4, resumed from checkpoint 2
  writer.write(3, {"loss": 2.0})
  writer.close()
  steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert steps == [1, 2, 2, 3]


def test_plot_metrics_skips_a_half_written_last_line(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
  assert plot_metrics.read_metrics(str(tmp_path))["loss"] == ([1, 2], [3.0, 2.0])


def test_start_removes_unfinished_checkpoints_and_keeps_at_most_keep(base_run, tmp_path):
  workdir = copy_of(base_run, tmp_path)
  (workdir / "checkpoints" / "3.orbax-checkpoint-tmp").mkdir()
  with pytest.raises(UsageError, match="checkpoint.keep must be a positive integer"):
    trainer.train(tiny(steps=STEPS, **{"checkpoint.keep": 0}), str(workdir))
  trainer.train(tiny(steps=STEPS, **{"checkpoint.keep": 1}), str(workdir), max_steps=2)
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2"]


# ------------------------------------------------------------------------------------------
# Progress bar (item 10), evaluation periods in epochs (item 11).
# ------------------------------------------------------------------------------------------


def test_progress_bar_moves_at_the_synchronized_log_steps(base_run, tmp_path, monkeypatch):
  workdir = copy_of(base_run, tmp_path)
  positions = []

  class Bar:
    def __init__(self, *args, initial=0, **kwargs):
      self.n = initial

    def update(self, n):
      self.n += n
      positions.append(self.n)

    def __getattr__(self, name):
      return lambda *a, **k: None

  monkeypatch.setattr(trainer.tqdm, "tqdm", Bar)
  trainer.train(tiny(steps=STEPS, log_every_steps=2), str(workdir))
  assert positions == [4]  # resumed at 2, logged at 4 (not 3, 4)


def test_evaluation_period_in_epochs():
  cfg = tiny(**{"evals.knn.every_steps": 0, "evals.knn.every_epochs": 4.0})
  assert trainer.eval_every_steps("knn", cfg.evals.knn, steps_per_epoch=78) == 312
  assert trainer.eval_every_steps("knn", tiny(**{"evals.knn.every_steps": 5}).evals.knn, 78) == 5
  with pytest.raises(UsageError, match="evals.knn: set every_steps \\(5\\) or every_epochs \\(4.0\\), not both"):
    trainer.eval_every_steps("knn", tiny(**{"evals.knn.every_steps": 5, "evals.knn.every_epochs": 4.0}).evals.knn, 78)


# ------------------------------------------------------------------------------------------
# Runs that cannot do their work are refused before they start (issue #29).
# ------------------------------------------------------------------------------------------


def tree_state(folder: pathlib.Path) -> dict:
  """Every file under `folder` with its size and modification time: what a refused run must not change."""
  return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def image_folder(root: pathlib.Path, count: int) -> pathlib.Path:
  import numpy as np  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  for i in range(count):
    (root / "train" / "ab"[i % 2]).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (24, 24, 3), np.uint8)).save(
        root / "train" / "ab"[i % 2] / f"{i}.png")
  return root


@pytest.mark.parametrize("count,overrides,message", [
    (40, {"epochs": 0.02}, r"this config trains 0 steps: epochs 0.02 x 2 steps per epoch \(40 images // batch_size "
     r"16\) rounds to 0; raise epochs above 0.25"),
    (12, {"epochs": 1.0}, "the training data holds 12 images, fewer than one batch of batch_size 16"),
    (12, {"epochs": 1.0, "epoch_length": 5}, "the training data holds 12 images, fewer than one batch"),
])
def test_run_that_would_train_nothing_is_refused_before_it_starts(tmp_path, count, overrides, message):
  """A :tiny config on a 40-image folder rounds to 0 steps; 12 images make no batch of 16."""
  cfg = tiny(**{"data.source": "folder", "data.path": str(image_folder(tmp_path / "data", count)), **overrides})
  with pytest.raises(UsageError, match=message):
    trainer.train(cfg, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_resume_past_the_end_of_the_schedule_is_refused_and_changes_nothing(base_run, tmp_path):
  """A run at step 2 resumed with a 1-step schedule: one line, nothing written or pruned (it used
  to exit 0 and log the step-2 teacher's evaluation as step 1)."""
  workdir = copy_of(base_run, tmp_path)
  before = tree_state(workdir)
  with pytest.raises(UsageError, match=f"{workdir} holds a checkpoint at step 2, past the end of this config's "
                                       r"schedule \(1 steps\): raise epochs"):
    trainer.train(tiny(steps=1, **{"checkpoint.keep": 1}), str(workdir))
  assert tree_state(workdir) == before


def test_finished_run_rerun_says_so(base_run, tmp_path, capsys):
  workdir = copy_of(base_run, tmp_path)
  out = trainer.train(tiny(steps=2), str(workdir))
  assert out["steps"] == (2, 2, 2)
  assert f"{workdir} is at the end of its schedule (step 2): nothing to train" in capsys.readouterr().out


@pytest.mark.parametrize("name,content,message", [
    ("config.json", b"", "config.json is empty: restore it"),
    ("config.json", b'{"seed": 0, "mod', "config.json is damaged .*: restore it"),
    ("config.json", b"[1, 2]", "config.json is not a JSON object"),
    ("metrics.jsonl", b'{"step": 1, "loss": 1.0}\n\xff\xfe{"step": 2}\n', r"metrics.jsonl:2 is not UTF-8 text"),
])
def test_damaged_run_file_on_resume_is_one_line_and_nothing_is_written(base_run, tmp_path, name, content, message):
  workdir = copy_of(base_run, tmp_path)
  (workdir / name).write_bytes(content)
  before = tree_state(workdir)
  with pytest.raises(UsageError, match=message):
    trainer.train(tiny(steps=STEPS, **{"optim.base_lr": 1e-3}), str(workdir))  # a changed config would be recorded
  assert tree_state(workdir) == before


def test_cli_summary_says_which_steps_were_trained(tmp_path):
  proc = cli(tmp_path / "run", f"--config.epochs={2 / 625}", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  try:
    out, err = proc.communicate(timeout=300)
  finally:
    proc.kill()
  assert proc.returncode == 0, err[-2000:]
  assert re.search(rf"done in \d+ s: steps 0 -> 2 of 2; workdir {tmp_path / 'run'}", out), out
