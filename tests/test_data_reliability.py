"""Image folders as a hostile user makes them: splits with different classes, loose images,
unreadable or linked class folders, link loops, pipes and hung reads, huge PNGs; malformed
manifests; extract's --out."""
import contextlib
import json
import logging
import os
import pathlib
import re
import signal
import subprocess
import sys
import threading
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from dino_jax import data
from dino_jax import evaluators
from dino_jax import runs
from dino_jax import sharding
from dino_jax import trainer
from dino_jax.errors import UsageError
from tests.test_train import REPO, tiny

COLORS = {"a": (255, 0, 0), "b": (0, 255, 0), "c": (0, 0, 255)}


def write_split(folder, classes, per_class=4):
  """One solid-colour image per file, a colour per class: perfectly separable classes."""
  for name in classes:
    (folder / name).mkdir(parents=True)
    for i in range(per_class):
      color = COLORS.get(name, (128, 128, 128))
      Image.new("RGB", (24, 24), tuple(max(v - 9 * i, 0) for v in color)).save(folder / name / f"{i}.png")


def folder_cfg(root, **overrides):
  return ml_collections.ConfigDict(dict(source="folder", path=str(root), image_size=20, train_split="train",
                                        **overrides))


# ------------------------------------------------------------------------------------------
# One class list: the training split's.
# ------------------------------------------------------------------------------------------


def test_a_split_lacking_a_class_keeps_the_training_ids(tmp_path, caplog):
  write_split(tmp_path / "train", "abc")
  write_split(tmp_path / "val", "bc")
  with caplog.at_level(logging.WARNING):
    val = data.make_source(folder_cfg(tmp_path), "val")
  assert val.classes == ["a", "b", "c"] and val.num_classes == 3
  np.testing.assert_array_equal(val.labels, [1] * 4 + [2] * 4)  # not 0 and 1
  assert "no folder for 1 of the 3 training classes (a)" in caplog.text


def test_a_class_only_in_another_split_is_one_error(tmp_path):
  write_split(tmp_path / "train", "ab")
  write_split(tmp_path / "val", "bc")
  with pytest.raises(UsageError, match="class folders that the training split lacks: c"):
    data.make_source(folder_cfg(tmp_path), "val")


def test_knn_scores_separable_classes_when_the_test_split_lacks_one(tmp_path, caplog):
  write_split(tmp_path / "train", "abc")
  write_split(tmp_path / "val", "bc")
  Image.new("RGB", (24, 24), COLORS["c"]).save(tmp_path / "train" / "loose.png")  # next to class folders
  cfg = tiny(**{"data.source": "folder", "data.path": str(tmp_path), "evals.knn.train_split": "train",
                "evals.knn.test_split": "val", "evals.knn.batch_size": 8, "evals.knn.linear_probe": True})
  with caplog.at_level(logging.WARNING):
    evaluator = evaluators.knn.KnnEvaluator(cfg.evals.knn, cfg, sharding.make_mesh(cfg))
  assert "1 images are not in a class folder (e.g. loose.png)" in caplog.text
  scores = evaluator.run(None)  # raw pixels
  # was 0.0: val's b, c numbered 0, 1 (and knn_top1_k<k> for each k)
  assert {k: scores[k] for k in ("knn_top1", "linear_top1")} == {"knn_top1": 1.0, "linear_top1": 1.0}


def test_a_split_without_class_folders_cannot_be_scored(tmp_path):
  write_split(tmp_path / "train", "ab")
  (tmp_path / "val").mkdir()
  Image.new("RGB", (24, 24)).save(tmp_path / "val" / "0.png")
  cfg = tiny(**{"data.source": "folder", "data.path": str(tmp_path), "evals.knn.train_split": "train",
                "evals.knn.test_split": "val"})
  with pytest.raises(UsageError, match="split 'val' has no image in a class folder"):
    evaluators.knn.KnnEvaluator(cfg.evals.knn, cfg, sharding.make_mesh(cfg))


def test_run_saves_its_classes_and_extract_numbers_by_them(tmp_path):
  images = tmp_path / "images"
  write_split(images / "train", "abc")
  write_split(images / "val", "bc")
  cfg = tiny(**{"data.source": "folder", "data.path": str(images), "batch_size": 8, "epochs": 1.0})
  trainer.train(cfg, str(tmp_path / "run"), max_steps=0)
  assert json.loads((tmp_path / "run" / "classes.json").read_text()) == ["a", "b", "c"]
  write_split(images / "train", ["0"])  # a class added later must not renumber the run's classes
  classes = runs.run_classes(str(tmp_path / "run"), cfg.data, "folder", str(images))
  np.testing.assert_array_equal(data.make_source(cfg.data, "val", classes).labels, [1] * 4 + [2] * 4)
  assert runs.run_classes(str(tmp_path / "run"), cfg.data, "folder", str(tmp_path)) is None  # other data


# ------------------------------------------------------------------------------------------
# Listing: unreadable and linked folders, files that are not regular.
# ------------------------------------------------------------------------------------------


def test_unreadable_class_folder_is_one_error_naming_it(tmp_path, monkeypatch):
  write_split(tmp_path / "train", "abc")
  scandir = os.scandir

  def no_permission(path="."):
    if str(path).endswith(os.sep + "b"):
      raise PermissionError(13, "Permission denied", str(path))
    return scandir(path)

  monkeypatch.setattr(os, "scandir", no_permission)  # root ignores chmod, so the denial is simulated
  with pytest.raises(UsageError, match=f"cannot read image folder {tmp_path / 'train' / 'b'} .Permission denied"):
    data.FolderSource(str(tmp_path / "train"), 20)


def test_linked_class_folder_is_listed(tmp_path):
  write_split(tmp_path / "elsewhere", "c")
  write_split(tmp_path / "train", "ab")
  (tmp_path / "train" / "c").symlink_to(tmp_path / "elsewhere" / "c")  # within data.path
  src = data.make_source(folder_cfg(tmp_path), "train")
  assert src.classes == ["a", "b", "c"] and len(src) == 12 and src.labels[-1] == 2


@contextlib.contextmanager
def deadline(seconds):
  """TimeoutError in the main thread after `seconds` (a listing that would never end)."""
  def expire(signum, frame):
    raise TimeoutError(f"still running after {seconds} s")
  previous = signal.signal(signal.SIGALRM, expire)
  signal.setitimer(signal.ITIMER_REAL, seconds)
  try:
    yield
  finally:
    signal.setitimer(signal.ITIMER_REAL, 0)
    signal.signal(signal.SIGALRM, previous)


def test_a_link_to_the_folder_itself_adds_no_copy_and_no_class(tmp_path, caplog):
  write_split(tmp_path / "train", "ab")
  (tmp_path / "train" / "self").symlink_to(".")  # ln -s . train/self
  with caplog.at_level(logging.WARNING), deadline(30):
    src = data.make_source(folder_cfg(tmp_path), "train")
  assert src.classes == ["a", "b"] and len(src) == 8 and sorted(src.labels) == [0] * 4 + [1] * 4
  assert data.training_classes(folder_cfg(tmp_path)) == ["a", "b"]
  data.save_classes(src, str(tmp_path))
  assert json.loads((tmp_path / "classes.json").read_text()) == ["a", "b"]
  assert "not following 1 folder links that lead back to folders listed already" in caplog.text


def test_link_loops_end_quickly_with_each_image_once(tmp_path):
  write_split(tmp_path / "train", "b")
  (tmp_path / "train" / "a").symlink_to("..")  # a -> the data folder, above train
  (tmp_path / "train" / "b" / "c").symlink_to("../b")
  (tmp_path / "train" / "b" / "d").symlink_to(".")  # with c: 2**40 paths before the kernel says ELOOP
  t = time.perf_counter()
  with deadline(30):
    src = data.make_source(folder_cfg(tmp_path), "train")
  assert time.perf_counter() - t < 5
  assert src.classes == ["b"] and [f.relative_to(tmp_path) for f in src.files] == [
      pathlib.Path("train", "b", f"{i}.png") for i in range(4)]


def test_a_real_folder_wins_over_a_link_to_it(tmp_path):
  write_split(tmp_path / "train", ["z"])
  (tmp_path / "train" / "a").symlink_to("z")  # listed before z, but a second copy of it
  (tmp_path / "train" / "z" / "deeper").symlink_to(tmp_path / "train" / "z")
  src = data.make_source(folder_cfg(tmp_path), "train")
  assert src.classes == ["z"] and len(src) == 4 and (src.labels == 0).all()


def test_links_out_of_the_data_folder_are_read_only_when_allowed(tmp_path, caplog):
  write_split(tmp_path / "elsewhere", "c")
  write_split(tmp_path / "data" / "train", "ab")
  (tmp_path / "data" / "train" / "c").symlink_to(tmp_path / "elsewhere" / "c")
  (tmp_path / "data" / "train" / "a" / "far.png").symlink_to(tmp_path / "elsewhere" / "c" / "0.png")
  (tmp_path / "data" / "train" / "b" / "near.png").symlink_to(tmp_path / "data" / "train" / "a" / "0.png")
  with caplog.at_level(logging.WARNING):
    src = data.make_source(folder_cfg(tmp_path / "data"), "train")
  assert src.classes == ["a", "b"] and len(src) == 9  # the link within the data folder is an image
  warnings = [r.getMessage() for r in caplog.records if "lead out of the data folder" in r.getMessage()]
  assert len(warnings) == 1 and "skipping 2 links" in warnings[0], caplog.text
  assert "data.follow_external_symlinks=True" in warnings[0]
  allowed = data.make_source(folder_cfg(tmp_path / "data", follow_external_symlinks=True), "train")
  assert allowed.classes == ["a", "b", "c"] and len(allowed) == 14 and (allowed.labels == [0] * 5 + [1] * 5 + [2] * 4).all()


TRAIN_ON_A_SLOW_FOLDER = """
import os, pathlib, sys, time
root, started, workdir = sys.argv[1:4]
scandir = os.scandir

def slow_scandir(path="."):  # a slow network filesystem under the data folder
  if str(path).startswith(root):
    pathlib.Path(started).touch()
    time.sleep(0.2)
  return scandir(path)

os.scandir = slow_scandir
from dino_jax import cli, train
sys.argv = ["train", "--config", "configs/demo_fashion_mnist.py:tiny", "--workdir", workdir,
            "--config.data.source=folder", "--config.data.path=" + root]
cli.run(train.main)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_request_ends_a_slow_listing_at_once(tmp_path, signum):
  """`python -m dino_jax.train` stops while it lists a slow data folder: at once, with one line,
  exit 0 (as any stop on request), nothing trained."""
  for i in range(100):  # 20 s at 0.2 s a folder
    (tmp_path / "train" / f"{i:03d}").mkdir(parents=True)
  started = tmp_path / "started"
  proc = subprocess.Popen([sys.executable, "-c", TRAIN_ON_A_SLOW_FOLDER, str(tmp_path), str(started),
                           str(tmp_path / "run")], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    end = time.time() + 120
    while time.time() < end and proc.poll() is None and not started.exists():
      time.sleep(0.02)
    t = time.perf_counter()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
  finally:
    proc.kill()
  assert time.perf_counter() - t < 3, err[-3000:]
  assert proc.returncode == 0 and "Traceback" not in err and "error:" not in err, err[-3000:]
  expected = f"stopped on request (SIGTERM or Ctrl-C) while listing the images under {tmp_path / 'train'} ("
  lines = [line for line in out.splitlines() if line.startswith("stopped on request")]
  assert len(lines) == 1 and re.fullmatch(re.escape(expected) + r"\d+ folders listed\)", lines[0]), out + err[-3000:]
  assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_stop_request_set_before_the_listing_lists_nothing(tmp_path):
  write_split(tmp_path / "train", "ab")
  stop = threading.Event()
  stop.set()
  with pytest.raises(data.ListingStopped, match="listing the images under .*train [(]0 folders listed[)]"):
    data.make_source(folder_cfg(tmp_path), "train", interrupt=stop)


def test_pipe_named_like_an_image_is_not_listed(tmp_path, caplog):
  write_split(tmp_path / "train", "a")
  os.mkfifo(tmp_path / "train" / "a" / "x.jpg")  # reading it would block for ever
  with caplog.at_level(logging.WARNING):
    src = data.FolderSource(str(tmp_path / "train"), 20)
  assert len(src) == 4 and all(f.name != "x.jpg" for f in src.files)
  assert "skipping 1 entries that are not regular files" in caplog.text and "x.jpg" in caplog.text


# ------------------------------------------------------------------------------------------
# Image lists and manifests.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("row, problem", [
    ('{"path": "x.png"', "not a JSON object (Expecting ',' delimiter, column 17)"),
    ('["x.png"]', 'a JSON list, not an object with a "path"'),
    ('{"file": "x.png"}', 'no "path"'),
    ('{"path": 3}', '"path" is 3, not a file path'),
    (b'{"path": "\xff.png"}', "not UTF-8 text (byte 11)"),
])
def test_a_malformed_manifest_line_is_one_error_naming_the_file_and_line(tmp_path, row, problem):
  manifest = tmp_path / "kept.jsonl"
  row = row if isinstance(row, bytes) else row.encode()
  manifest.write_bytes(b'{"path": "0.png", "score": 1.0}\n\n' + row + b'\n{"path": "1.png"}\n')
  cfg = ml_collections.ConfigDict(dict(source="manifest", path=str(manifest), image_size=20))
  with pytest.raises(UsageError) as raised:
    data.make_source(cfg, "")
  assert str(raised.value) == f"image list {manifest}:3: {problem}"


def test_a_well_formed_manifest_lists_its_paths(tmp_path):
  manifest = tmp_path / "kept.jsonl"
  manifest.write_text('{"path": "0.png"}\r\n\n{"path": "/abs/1.png", "score": 0.5}\n')
  src = data.make_source(ml_collections.ConfigDict(dict(source="manifest", path=str(manifest), image_size=20)), "")
  assert src.files == [tmp_path / "0.png", pathlib.Path("/abs/1.png")]


# ------------------------------------------------------------------------------------------
# Reads that hang.
# ------------------------------------------------------------------------------------------


def test_a_read_longer_than_the_limit_is_an_error_naming_the_file(tmp_path, monkeypatch):
  write_split(tmp_path / "train", "a")
  src = data.make_source(folder_cfg(tmp_path, read_timeout_s=0.3), "train")
  decode = data.FilesSource._decode
  monkeypatch.setattr(data.FilesSource, "_decode",
                      lambda self, i, finish=None: time.sleep(3) if i == 2 else decode(self, i, finish))  # hung
  assert src.get(1)[0].shape == (20, 20, 3)
  t = time.perf_counter()
  with pytest.raises(UsageError, match=r"reading image .*a/2.png took longer than data.read_timeout_s=0.3 s"):
    src.get(2)
  assert time.perf_counter() - t < 2


def test_trainer_reading_a_pipe_stops_with_one_error_line(tmp_path):
  write_split(tmp_path / "images", "ab", per_class=8)
  os.mkfifo(tmp_path / "images" / "pipe.jpg")
  files = sorted(str(p) for p in (tmp_path / "images").rglob("*.png")) + [str(tmp_path / "images" / "pipe.jpg")]
  (tmp_path / "list.txt").write_text("\n".join(files[1:]))  # 16 entries: every batch reads the pipe
  proc = subprocess.run([sys.executable, "-m", "dino_jax.train", "--config", "configs/demo_fashion_mnist.py:tiny",
                         "--workdir", str(tmp_path / "run"), "--config.data.source=files",
                         f"--config.data.path={tmp_path / 'list.txt'}", "--config.data.read_timeout_s=1",
                         "--config.epochs=1", "--config.evals.knn.every_steps=-1"], cwd=REPO, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert error == [f"error: reading image {tmp_path / 'images' / 'pipe.jpg'} took longer than "
                   "data.read_timeout_s=1 s (a hung filesystem, or not a regular file)"]
  assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------
# Huge images.
# ------------------------------------------------------------------------------------------


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the peak memory from Linux's /proc")
def test_a_huge_png_decodes_with_one_full_size_buffer(tmp_path):
  side = 3000
  Image.fromarray(np.tile(np.arange(256, dtype=np.uint8)[:, None, None], (side // 256 + 1, side, 3))[:side]).save(
      tmp_path / "huge.png")
  # VmHWM: the peak resident memory of this process image (ru_maxrss would count pytest's, from the fork).
  measure = ("import re, sys; from dino_jax import data; "
             "peak = lambda: int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) * 1024; "
             "base = peak(); im = data.FilesSource([sys.argv[1]], data.np.array([-1]), 20).get(0)[0]; "
             "print(peak() - base, im.shape)")
  proc = subprocess.run([sys.executable, "-c", measure, str(tmp_path / "huge.png")], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  grown, shape = proc.stdout.split(maxsplit=1)
  assert shape.strip() == "(20, 20, 3)"
  assert side * side * 4 <= int(grown) < 1.5 * side * side * 4  # Pillow holds RGB at 4 bytes a pixel; was 2 copies


def test_reduced_resize_matches_the_exact_one():
  image = Image.fromarray(np.tile(np.arange(256, dtype=np.uint8)[:, None, None], (8, 2048, 3)))
  exact = np.asarray(image.resize((20, 20), Image.BICUBIC), np.float32)
  assert np.abs(data.to_square_rgb(image, 20).astype(np.float32) - exact).mean() < 2
