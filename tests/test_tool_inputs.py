"""Every tool's numeric flags, feature files and --out paths: one `error:` line naming the flag or
file, before any work; an --out honoured exactly as given (issue #29)."""
import subprocess
import sys

import numpy as np
import pytest

from dino_jax import cli
from dino_jax import evaluate
from dino_jax import extract
from dino_jax import pictures
from dino_jax.errors import UsageError
from tests.test_train import REPO


def run_tool(module: str, *args, timeout=300) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  return lines[0]


@pytest.fixture(scope="module")
def features(tmp_path_factory):
  """Feature files as `extract` writes them (embedding, pooled, labels), 3 classes, 8-d."""
  folder = tmp_path_factory.mktemp("features")
  rng = np.random.default_rng(0)
  for name, n in (("train", 60), ("test", 30)):
    labels = np.arange(n) % 3
    x = rng.normal(size=(n, 8)).astype(np.float32) + 3 * np.eye(8, dtype=np.float32)[labels]
    np.savez(folder / f"{name}.npz", embedding=x, pooled=x, labels=labels, step=3)
  return folder


def changed(path, out, **arrays):
  f = dict(np.load(path))
  f.update(arrays)
  np.savez(out, **f)
  return out


# ------------------------------------------------------------------------------------------
# Feature files (evaluate knn / linear).
# ------------------------------------------------------------------------------------------


def test_good_feature_files_load(features):
  x, y = evaluate.load_features(str(features / "train.npz"), "embedding")
  assert x.shape == (60, 8) and y.shape == (60,)


@pytest.mark.parametrize("damage,message", [
    ("truncated", "cannot read features .* File is not a zip file"),
    ("missing", "cannot read features .* No such file"),
    ("no_labels", "has no 'embedding' features and labels"),
    ("nan", "3 of 60 embedding rows are not finite numbers"),
    ("unlabelled", "labels must be class ids >= 0; 60 of 60 are not [(]-1 marks an unlabelled image[)]"),
    ("short_labels", r"embedding \(60, 8\) and labels \(7,\) must be \[N, D\] and \[N\]"),
    ("empty", r"embedding \(0, 8\) and labels \(0,\) must be \[N, D\] and \[N\] with N > 0"),
])
def test_bad_feature_file_is_one_usage_error_naming_it(features, tmp_path, damage, message):
  path = features / "train.npz"
  bad = tmp_path / "bad.npz"
  if damage == "truncated":
    bad.write_bytes(path.read_bytes()[:200])
  elif damage == "no_labels":
    np.savez(bad, embedding=np.zeros((4, 8), np.float32))
  elif damage == "nan":
    x = np.load(path)["embedding"].copy()
    x[[1, 5, 9], 2] = [np.nan, np.inf, -np.inf]
    changed(path, bad, embedding=x)
  elif damage == "unlabelled":
    changed(path, bad, labels=np.full(60, -1))
  elif damage == "short_labels":
    changed(path, bad, labels=np.arange(7))
  elif damage == "empty":
    changed(path, bad, embedding=np.zeros((0, 8), np.float32), labels=np.zeros(0, int))
  with pytest.raises(UsageError, match=message):
    evaluate.load_features(str(bad), "embedding")


@pytest.mark.parametrize("command,flags,message", [
    ("knn", ["--k", "0"], "error: --k must be an integer >= 1, not '0'"),
    ("knn", ["--k", "10,ten"], "error: --k must be an integer >= 1, not 'ten'"),
    ("knn", ["--temperature", "0"], "error: --temperature must be a number > 0, not 0.0"),
    ("knn", ["--temperature", "nan"], "error: --temperature must be a number > 0, not nan"),
    ("linear", ["--epochs", "0"], "error: flag --epochs=0: 0 is not a positive integer"),
    ("knn", ["--test", "OTHER_WIDTH"], "error: --train features are 8-d, --test features 5-d"),
])
def test_bad_evaluate_flags_are_one_line(features, tmp_path, command, flags, message):
  flags = [str(changed(features / "test.npz", tmp_path / "t.npz", embedding=np.ones((30, 5), np.float32)))
           if f == "OTHER_WIDTH" else f for f in flags]
  test = [] if "--test" in flags else ["--test", features / "test.npz"]
  proc = run_tool("dino_jax.evaluate", command, "--train", features / "train.npz", *test, *flags)
  assert one_error_line(proc).startswith(message)


def test_knn_on_good_files_scores(features):
  proc = run_tool("dino_jax.evaluate", "knn", "--train", features / "train.npz", "--test", features / "test.npz",
                  "--k", "5")
  assert proc.returncode == 0 and "k-NN top-1 (k=5, T=0.07, embedding): 1.0000" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("value,kwargs,expected", [
    ("3", dict(integer=True, low=1, low_allowed=True), 3),
    ("0.5", dict(), 0.5),
    ("0", dict(integer=True, low=1, low_allowed=True), "--x must be an integer >= 1, not '0'"),
    ("2.5", dict(integer=True, low=1, low_allowed=True), "--x must be an integer >= 1, not '2.5'"),
    ("inf", dict(), "--x must be a number > 0, not 'inf'"),
    ("-1", dict(), "--x must be a number > 0, not '-1'"),
    ("0", dict(low_allowed=True), 0.0),
])
def test_numeric_flag_values(value, kwargs, expected):
  if isinstance(expected, str):
    with pytest.raises(UsageError, match=expected):
      cli.number("--x", value, **kwargs)
  else:
    assert cli.number("--x", value, **kwargs) == expected


# ------------------------------------------------------------------------------------------
# --out: honoured exactly as given, or refused with one line before any work.
# ------------------------------------------------------------------------------------------


def test_output_file_and_folder(tmp_path):
  (tmp_path / "a_file").write_text("x")
  (tmp_path / "a_folder").mkdir()
  assert cli.output_file("--out", str(tmp_path / "new" / "deeper" / "f.npz"), (".npz",)) == \
      tmp_path / "new" / "deeper" / "f.npz"
  assert (tmp_path / "new" / "deeper").is_dir()  # made, so the work is not lost at the end
  for path, suffixes, message in (
      (tmp_path / "a_folder", (), "--out .*a_folder' is a folder; give a file path"),
      (tmp_path / "f", (".npz",), "--out .*f' must end with .npz"),
      (tmp_path / "a_file" / "f.npz", (), "the folder of --out .* is a file, not a folder"),
      (tmp_path / "a_file" / "sub" / "f.npz", (), "cannot create the folder of --out .*: Not a directory"),
      ("/proc/f.npz", (), "cannot (create|write into) the folder of --out '/proc/f.npz'")):
    with pytest.raises(UsageError, match=message):
      cli.output_file("--out", str(path), suffixes)
  with pytest.raises(UsageError, match="--out .*a_file' is a file, not a folder"):
    cli.output_folder("--out", str(tmp_path / "a_file"))


@pytest.mark.parametrize("out,message", [
    ("FOLDER", "error: --out '{tmp}/folder' is a folder; give a file path"),
    ("{tmp}/feats", "error: --out '{tmp}/feats' must end with .npz"),
    ("{tmp}/file/feats.npz", "error: the folder of --out '{tmp}/file/feats.npz' is a file, not a folder"),
])
def test_extract_out_is_checked_before_the_run_is_read(tmp_path, out, message):
  (tmp_path / "folder").mkdir()
  (tmp_path / "file").write_text("x")
  out = str(tmp_path / "folder") if out == "FOLDER" else out.format(tmp=tmp_path)
  proc = run_tool("dino_jax.extract", "--workdir", tmp_path / "no_run", "--out", out)
  assert one_error_line(proc) == message.format(tmp=tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "folder"]  # nothing written beside


def test_extract_batch_size_zero_is_one_line(tmp_path):
  proc = run_tool("dino_jax.extract", "--workdir", tmp_path, "--out", tmp_path / "f.npz", "--batch_size", "0")
  assert one_error_line(proc) == "error: flag --batch_size=0: 0 is not a positive integer"


def test_extract_refuses_non_finite_features():
  feats = {"embedding": np.ones((4, 3), np.float32)}
  extract.check_finite(feats)
  feats["embedding"][2, 1] = np.nan
  with pytest.raises(UsageError, match="non-finite features for 1 of 4 images [(]the first at index 2[)]"):
    extract.check_finite(feats)


@pytest.fixture
def metrics_run(tmp_path):
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.0}\n')
  (tmp_path / "a_file").write_text("x")
  return tmp_path


@pytest.mark.parametrize("out,message", [
    ("{tmp}/run", "error: --out '{tmp}/run' is a folder; give a file path"),
    ("{tmp}/c.xyz", "error: --out '{tmp}/c.xyz' must end with .png or .pdf or .svg or .jpg or .jpeg"),
    ("{tmp}/curves", "error: --out '{tmp}/curves' must end with .png"),
    ("{tmp}/a_file/c.png", "error: the folder of --out '{tmp}/a_file/c.png' is a file, not a folder"),
])
def test_plot_metrics_out_is_refused_with_one_line(metrics_run, out, message):
  before = sorted(p.name for p in metrics_run.rglob("*"))
  proc = run_tool("dino_jax.plot_metrics", "--workdir", metrics_run / "run", "--out", out.format(tmp=metrics_run),
                  timeout=120)
  assert one_error_line(proc).startswith(message.format(tmp=metrics_run))
  assert sorted(p.name for p in metrics_run.rglob("*")) == before


def test_plot_metrics_writes_exactly_where_asked(metrics_run):
  for out in (metrics_run / "new" / "folder" / "c.png", metrics_run / "c.pdf"):
    proc = run_tool("dino_jax.plot_metrics", "--workdir", metrics_run / "run", "--out", out, timeout=120)
    assert proc.returncode == 0 and out.is_file() and proc.stdout.strip() == f"wrote {out}", proc.stderr[-2000:]


def test_plot_metrics_damaged_line_is_one_error(metrics_run):
  with open(metrics_run / "run" / "metrics.jsonl", "ab") as f:
    f.write(b"\xff\xfe not json\n{\"step\": 3, \"loss\": 1.0}\n")
  proc = run_tool("dino_jax.plot_metrics", "--workdir", metrics_run / "run", timeout=120)
  assert one_error_line(proc) == f"error: {metrics_run / 'run' / 'metrics.jsonl'}:3 is not a JSON row (a damaged file)"


def test_pictures_out_that_is_a_file_is_one_line_before_the_run_is_read(tmp_path, capsys):
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(SystemExit) as exit_info:
    pictures.main(["pca", "--demo", "2", "--workdir", str(tmp_path / "no_run"), "--out", str(tmp_path / "a_file")])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err == f"error: --out '{tmp_path / 'a_file'}' is a file, not a folder\n"


def test_pictures_image_size_zero_is_refused(tmp_path, capsys):
  with pytest.raises(SystemExit):
    pictures.main(["pca", "--demo", "2", "--workdir", str(tmp_path), "--out", str(tmp_path), "--image_size", "0"])
  assert "error: --image_size must be a positive number of pixels (got 0)" in capsys.readouterr().err


def test_bench_json_folder_is_one_line(tmp_path):
  proc = run_tool("dino_jax.bench", "--config", "configs/demo_fashion_mnist.py:tiny", "--json", tmp_path)
  assert one_error_line(proc) == f"error: --json '{tmp_path}' is a folder; give a file path"


def test_bench_non_finite_peak_is_one_line(tmp_path):
  proc = run_tool("dino_jax.bench", "--config", "configs/demo_fashion_mnist.py:tiny", "--peak_tflops", "nan")
  assert "must be a positive finite number" in one_error_line(proc)
