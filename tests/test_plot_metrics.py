"""Training-curve PNG from a run's metrics.jsonl."""
import json
import subprocess
import sys

import numpy as np
from PIL import Image

from dino_jax import plot_metrics
from tests.test_train import REPO


def test_plot_writes_a_png_of_the_documented_size(tmp_path):
  rows = [{"step": s, "loss": 7 - s / 100, "dino_loss": 7 - s / 100, "teacher_entropy": 5.0,
           "teacher_kl_to_mean": 1.0, "lr": 1e-3, "momentum": 0.99} for s in range(10, 110, 10)]
  rows += [{"step": 50, "knn_top1": 0.7}, {"step": 100, "knn_top1_teacher": 0.75}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
  series = plot_metrics.read_metrics(str(tmp_path))
  assert series["loss"][0] == list(range(10, 110, 10)) and series["knn_top1"] == ([50], [0.7])
  proc = subprocess.run([sys.executable, "-m", "dino_jax.plot_metrics", "--workdir", str(tmp_path)], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  with Image.open(tmp_path / "curves.png") as im:
    assert im.size == (1200, 800)
    assert np.asarray(im.convert("L")).std() > 5  # something is drawn


def test_plot_without_metrics_is_one_error_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "dino_jax.plot_metrics", "--workdir", str(tmp_path)], cwd=REPO,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2 and proc.stderr.strip().startswith("error:") and len(proc.stderr.splitlines()) == 1
