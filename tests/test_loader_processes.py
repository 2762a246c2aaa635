"""The loader's worker processes (`data.worker_processes`, grain): the same batches as the
threads, from any step, and each of its failures as one clear error."""
import os
import signal
import threading
import time

import jax
import numpy as np
import pytest

from dino_jax import crops
from dino_jax import data
from dino_jax import trainer
from dino_jax.errors import UsageError
from tests.test_reliability import write_odd_images
from tests.test_train import tiny

SPECS = [crops.CropSpec(16, (0.4, 1.0))] * 2 + [crops.CropSpec(8, (0.1, 0.4))] * 2


@pytest.fixture(scope="module")
def demo():
  return data.fashion_mnist_demo("test", 28)


def batches(source, start_step, count, **kw):
  made = data.train_batches(source, 24, seed=3, start_step=start_step, specs=SPECS, **kw)
  try:
    return [next(made) for _ in range(count)]
  finally:
    made.close()


def test_worker_processes_make_the_threads_batches_from_any_step(demo):
  threads = batches(demo, 0, 6)
  processes = batches(demo, 0, 6, worker_processes=2, workers=1)
  resumed = batches(demo, 4, 2, worker_processes=3, workers=2)
  halves = [batches(demo, 4, 1, worker_processes=2, workers=1, process_index=i, process_count=2)[0]
            for i in range(2)]
  assert [s for s, _ in processes] == list(range(6)) and [s for s, _ in resumed] == [4, 5]
  for (step, want), (_, got) in zip(threads, processes):
    assert set(got) == {"global", "local"}
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=f"step {step} {key}")
  for (_, want), (_, got) in zip(threads[4:], resumed):
    np.testing.assert_array_equal(got["local"], want["local"])
  np.testing.assert_array_equal(np.concatenate([h[1]["global"] for h in halves]), threads[4][1]["global"])


class KillsItsProcess:
  """A source whose image 5 kills the process reading it (an out-of-memory kill)."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def get(self, index, finish=None):
    if int(index) == 5:
      os.kill(os.getpid(), signal.SIGKILL)
    return self.source.get(index, finish)


class Slow:
  """A source that takes 30 s for every image."""

  def __len__(self):
    return 100

  def get(self, index, finish=None):
    time.sleep(30)


def test_a_killed_worker_is_an_error_not_a_hang(demo):
  start = time.perf_counter()
  with pytest.raises(RuntimeError, match="Worker process was terminated unexpectedly with exit code -9"):
    batches(KillsItsProcess(demo), 0, 200, worker_processes=2, workers=1)
  assert time.perf_counter() - start < 60


def test_a_workers_error_reaches_the_trainer_as_it_was_raised(tmp_path):
  os.mkfifo(tmp_path / "pipe.jpg")  # a hung read
  source = data.FilesSource([tmp_path / "pipe.jpg"], np.array([-1]), 20, read_timeout_s=1)
  with pytest.raises(UsageError, match=r"^reading image .*pipe.jpg took longer than data.read_timeout_s=1 s"):
    batches(source, 0, 1, worker_processes=1, workers=1)


def test_files_the_workers_skip_are_counted_here(tmp_path):
  broken = write_odd_images(tmp_path / "train")
  source = data.FolderSource(str(tmp_path / "train"), 20)
  made = data.train_batches(source, 13, seed=0, start_step=0, specs=SPECS, worker_processes=1, workers=2)
  next(made)  # 13 files, one batch: every file read once
  made.close()
  assert source.skipped == broken


def test_a_stop_request_ends_the_wait_for_workers(monkeypatch):
  monkeypatch.setattr(data, "WORKERS_CLOSE_S", 1.0)
  stop = threading.Event()
  made = data.train_batches(Slow(), 4, seed=0, start_step=0, specs=SPECS, worker_processes=1, workers=1,
                            interrupt=stop)
  stop.set()
  start = time.perf_counter()
  assert list(made) == []
  assert time.perf_counter() - start < data.WORKERS_CLOSE_S + 5


def test_training_with_worker_processes_equals_training_with_threads(tmp_path):
  cfg = tiny(steps=3, **{"evals.knn.every_steps": -1})
  threads = trainer.train(cfg, str(tmp_path / "threads"))
  cfg.data.worker_processes = 2
  processes = trainer.train(cfg, str(tmp_path / "processes"))
  assert int(processes["state"]["step"]) == 3
  for a, b in zip(jax.tree.leaves(threads["state"]["params"]), jax.tree.leaves(processes["state"]["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
