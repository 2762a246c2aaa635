"""Training curves of a run as one PNG: losses, teacher statistics, evaluations, schedules.

  python -m dino_jax.plot_metrics --workdir RUN [--out RUN/curves.png]
"""
import json
import pathlib

from absl import flags
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from dino_jax import cli  # pylint: disable=g-import-not-at-top,wrong-import-position
from dino_jax.errors import fail  # pylint: disable=g-import-not-at-top,wrong-import-position

PANELS = {  # title: metrics drawn in it (those present in the run)
    "losses": ("loss", "dino_loss", "ibot_loss", "koleo_loss", "region_loss"),
    "teacher": ("teacher_entropy", "teacher_kl_to_mean"),
    "evaluation (top-1)": ("knn_top1", "linear_top1", "knn_top1_teacher", "linear_top1_teacher"),
    "schedules": ("lr", "weight_decay", "momentum", "teacher_temp"),
}
FIGSIZE, DPI = (12, 8), 100  # the PNG is 1200 x 800 pixels
SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")  # --out's format, from its suffix


def read_metrics(workdir: str) -> dict[str, tuple[list[int], list[float]]]:
  """metric -> (steps, values) from <workdir>/metrics.jsonl; a half-written last line (the run
  is writing it, or was killed while it did) is left out."""
  series = {}
  path = pathlib.Path(workdir) / "metrics.jsonl"
  try:
    lines = path.read_bytes().split(b"\n")
  except OSError as e:
    raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
  lines = lines[:-1] if lines and not lines[-1] else lines
  for i, line in enumerate(lines):
    try:
      row = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
      if i == len(lines) - 1:
        break
      raise ValueError(f"{path}:{i + 1} is not a JSON row (a damaged file)") from None
    for k, v in row.items():
      if k != "step" and isinstance(v, (int, float)):  # not the tags (a phase's name)
        series.setdefault(k, ([], []))
        series[k][0].append(row["step"])
        series[k][1].append(v)
  return series


def plot(series: dict, out: str) -> None:
  fig, axes = plt.subplots(2, 2, figsize=FIGSIZE, dpi=DPI)
  for ax, (title, names) in zip(axes.flat, PANELS.items()):
    for name in names:
      if name in series:
        steps, values = series[name]
        ax.plot(steps, values, marker="o" if len(steps) < 20 else None, label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    if title == "schedules":
      ax.set_yscale("log")
    if ax.lines:
      ax.legend()
  fig.tight_layout()
  fig.savefig(out, dpi=DPI)
  plt.close(fig)


def main(argv):
  del argv
  workdir = cli.WORKDIR.value
  if not workdir or not (pathlib.Path(workdir) / "metrics.jsonl").is_file():
    fail(f"{workdir!r} has no metrics.jsonl (pass --workdir of a dino_jax run)")
  try:
    out = cli.output_file("--out", flags.FLAGS.out or str(pathlib.Path(workdir) / "curves.png"), SUFFIXES)
    series = read_metrics(workdir)
  except ValueError as e:  # UsageError included
    fail(str(e))
  try:
    plot(series, out)
  except OSError as e:
    fail(f"cannot write --out {str(out)!r}: {e.strerror or e}")
  print(f"wrote {out}")


if __name__ == "__main__":  # --out defined here: importing this module defines no flag
  flags.declare_key_flag("workdir")  # dino_jax.cli's
  flags.DEFINE_string("out", None, "Figure path, .png (default: <workdir>/curves.png), .pdf, .svg or .jpg.")
  cli.run(main)
