r"""Pictures of what a dino_jax run has learned: attention maps, PCA of patch features and
patch correspondences (Caron et al. 2021, Fig. 1/3; Oquab et al. 2023, Fig. 1; SD-DINO,
Zhang et al. 2023).

  python -m dino_jax.pictures attention --workdir RUN --images a.png b.jpg --out DIR [--threshold 0.6]
  python -m dino_jax.pictures pca --workdir RUN --demo 8 --out DIR [--threshold 0.5]
  python -m dino_jax.pictures correspond --workdir RUN --images a.png b.png --out DIR \
      [--num_matches 20] [--extra_features a.npy b.npy]

Common options: --step N, --student (default: the latest teacher), --image_size S (default: the
run's global crop size; a multiple of the patch size). `--demo N` instead of --images takes the
first N test images of the bundled Fashion-MNIST subset.

Figures are PNGs made of square panels of PANEL_PX = 256 px (4 in at 64 dpi):
  attention   DIR/attention_<name>.png per image: 1 + heads panels wide; 1 row, or 2 with --threshold
  pca         DIR/pca.png: N panels wide, 2 rows (the images; their PCA colours)
  correspond  DIR/correspond.png: 2 panels wide, 1 row; the matches also in DIR/correspond.npz

From Python, the numbers come from functions returning numpy arrays (`cls_attention`,
`attention_mask`, `pca_rgb`, `correspondences`, `mutual_nearest_neighbours`), the figures from
the `draw_*` functions.
"""
import argparse
import functools
import pathlib
import sys

from absl import logging
import jax
import matplotlib
from matplotlib.figure import Figure
import numpy as np

from dino_jax import augment
from dino_jax import cli
from dino_jax import data
from dino_jax import models
from dino_jax import runs
from dino_jax.errors import ArgumentParser
from dino_jax.errors import UsageError
from dino_jax.errors import fail
from dino_jax.evaluators import common
from dino_jax.evaluators import correspondence

PANEL_PX = 256
DPI = 64
PCA_THRESHOLD = 0.5  # on the min-max scaled first component


# ---------------------------------------------------------------------------------------
# Numbers.
# ---------------------------------------------------------------------------------------

def read_images(paths: list[str], size: int) -> np.ndarray:
  """uint8 [n, size, size, 3]: each file decoded (`evaluators.common.read_rgb`: one UsageError
  naming a file that cannot be read), shorter side resized, center crop."""
  return np.stack([data.to_square_rgb(common.read_rgb(path), size) for path in paths])


@functools.partial(jax.jit, static_argnums=0)
def _last_attention(module, params, images):
  x = augment.normalize(images)
  _, state = module.apply({"params": params}, x, mutable=["intermediates"])
  return state["intermediates"][f"block{module.depth - 1}"]["attention"][0]


def last_attention(backbone: runs.Backbone, images: np.ndarray) -> np.ndarray:
  """Attention probabilities [B, heads, N, N] of the last block; tokens are CLS (0), the
  registers (1..R), then the patches in row-major order."""
  return np.asarray(_last_attention(backbone.module, backbone.params, images))


def cls_attention(backbone: runs.Backbone, images: np.ndarray) -> np.ndarray:
  """Attention of the CLS token to the patch tokens in the last block, [B, heads, h, w].

  The CLS and register tokens are left out, so each head's map sums to the CLS token's
  attention mass on the patches (at most 1)."""
  if not isinstance(backbone.module, models.ViT):
    raise UsageError(f"attention pictures show a ViT's CLS attention; this run's {backbone.cfg.model.name} "
                     "backbone has no CLS token (use the pca or correspond pictures)")
  attn = last_attention(backbone, images)
  h, w = backbone.module.grid(images.shape[1])
  return attn[:, :, 0, 1 + backbone.module.num_registers:].reshape(*attn.shape[:2], h, w)


def attention_mask(maps: np.ndarray, threshold: float) -> np.ndarray:
  """Bool mask [..., h, w] of the fewest patches holding `threshold` of each map's mass.

  Patches are taken by decreasing attention while the share of the map's mass taken before
  them is below `threshold` (DINO's thresholded attention maps)."""
  flat = maps.reshape(*maps.shape[:-2], -1)
  order = np.argsort(-flat, axis=-1, kind="stable")
  values = np.take_along_axis(flat, order, axis=-1)
  share_before = (np.cumsum(values, axis=-1) - values) / values.sum(axis=-1, keepdims=True)
  mask = np.zeros(flat.shape, bool)
  np.put_along_axis(mask, order, share_before < threshold, axis=-1)
  return mask.reshape(maps.shape)


def principal_components(x: np.ndarray, k: int) -> np.ndarray:
  """Projections [N, k] of the rows of x on their first k principal axes (zero past the rank)."""
  centered = x - x.mean(axis=0)
  _, _, vt = np.linalg.svd(centered, full_matrices=False)
  proj = centered @ vt[:k].T
  return np.pad(proj, ((0, 0), (0, k - proj.shape[1])))


def minmax(x: np.ndarray) -> np.ndarray:
  """x scaled to [0, 1] per column."""
  lo, hi = x.min(axis=0), x.max(axis=0)
  return (x - lo) / np.maximum(hi - lo, 1e-12)


def pca_rgb(feats: np.ndarray, threshold: float | None = None) -> tuple[np.ndarray, np.ndarray]:
  """PCA colours of patch features [n, h, w, D] over all n images: (rgb [n, h, w, 3] in [0, 1],
  foreground [n, h, w] bool).

  The first principal component of all patches, min-max scaled to [0, 1], is thresholded at
  `threshold` (default 0.5) to give the foreground, its sign chosen so that the foreground is
  the smaller set. A second PCA of the foreground patches gives the colours: its first three
  components, each min-max scaled over the foreground; the background is black."""
  threshold = PCA_THRESHOLD if threshold is None else threshold
  x = np.asarray(feats, np.float64).reshape(-1, feats.shape[-1])
  score = minmax(principal_components(x, 1))[:, 0]
  above, below = score > threshold, 1.0 - score > threshold
  foreground = above if above.sum() <= below.sum() else below
  rgb = np.zeros((len(x), 3))
  rgb[foreground] = minmax(principal_components(x[foreground], 3))
  return rgb.reshape(*feats.shape[:-1], 3), foreground.reshape(feats.shape[:-1])


def mutual_nearest_neighbours(feats_a: np.ndarray, feats_b: np.ndarray):
  """Pairs (i, j) where b[j] is a[i]'s most cosine-similar row of b and a[i] is b[j]'s in a.

  feats_a [Na, D], feats_b [Nb, D] -> (idx_a, idx_b, sim), by decreasing cosine similarity."""
  sim = common.l2_normalize(np.asarray(feats_a, np.float64)) @ common.l2_normalize(np.asarray(feats_b, np.float64)).T
  best_b, best_a = sim.argmax(axis=1), sim.argmax(axis=0)
  idx_a = np.flatnonzero(best_a[best_b] == np.arange(len(sim)))
  idx_b = best_b[idx_a]
  order = np.argsort(-sim[idx_a, idx_b], kind="stable")
  return idx_a[order], idx_b[order], sim[idx_a, idx_b][order]


def fuse_features(dino: np.ndarray, extra: np.ndarray) -> np.ndarray:
  """SD-DINO's fusion (`correspondence.fuse`) of DINO patch features [h, w, D] and extra
  features [h', w', C], resized bilinearly to the patch grid -> [h, w, D + C]: each part
  l2-normalized, weighted alike (SD-DINO's α = 0.5 up to a common factor, which cosine
  similarity ignores)."""
  return correspondence.fuse([dino, extra], (1.0, 1.0))


def correspondences(feats_a: np.ndarray, feats_b: np.ndarray, num_matches: int,
                    foreground: tuple[np.ndarray, np.ndarray] | None = None) -> dict:
  """The `num_matches` most similar mutual nearest neighbours between two patch-feature maps
  [h, w, D]: {"points_a": [K, 2] and "points_b": [K, 2] (row, col) on the patch grids,
  "similarity": [K] cosine}.

  With `foreground` (two bool masks [h, w]), only pairs whose two patches are both foreground
  are kept, as Amir et al. (2021) keep only salient "best buddies": on plain backgrounds the
  background patches at the same place are each other's closest matches."""
  idx_a, idx_b, sim = mutual_nearest_neighbours(feats_a.reshape(-1, feats_a.shape[-1]),
                                                feats_b.reshape(-1, feats_b.shape[-1]))
  if foreground is not None:
    keep = foreground[0].reshape(-1)[idx_a] & foreground[1].reshape(-1)[idx_b]
    idx_a, idx_b, sim = idx_a[keep], idx_b[keep], sim[keep]
  return {"points_a": np.stack(np.divmod(idx_a[:num_matches], feats_a.shape[1]), axis=-1),
          "points_b": np.stack(np.divmod(idx_b[:num_matches], feats_b.shape[1]), axis=-1),
          "similarity": sim[:num_matches]}


# ---------------------------------------------------------------------------------------
# Figures.
# ---------------------------------------------------------------------------------------

def upsample(x: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour upsampling of the first two axes of x by `factor`."""
  return np.repeat(np.repeat(x, factor, axis=0), factor, axis=1)


def _panels(rows: int, cols: int):
  """A figure of rows x cols square panels of PANEL_PX px, axes off, and its axes [rows, cols]."""
  fig = Figure(figsize=(cols * PANEL_PX / DPI, rows * PANEL_PX / DPI), dpi=DPI)
  axes = fig.subplots(rows, cols, squeeze=False)
  fig.subplots_adjust(left=0, right=1, bottom=0, top=1, wspace=0.02, hspace=0.02)
  for ax in axes.flat:
    ax.set_axis_off()
  return fig, axes


def _label(ax, text: str):
  """Writes `text` in the panel's top-left corner, white on translucent black."""
  ax.text(0.03, 0.97, text, transform=ax.transAxes, va="top", ha="left", fontsize=10, color="white",
          bbox=dict(facecolor="black", alpha=0.6, pad=2, linewidth=0))


def _dimmed(image: np.ndarray, keep: np.ndarray) -> np.ndarray:
  """The image where `keep` ([S, S] bool), a quarter as bright elsewhere."""
  return np.where(keep[..., None], image, image // 4)


def draw_attention(image: np.ndarray, maps: np.ndarray, masks: np.ndarray | None = None) -> Figure:
  """The image and one panel per head of `maps` [heads, h, w] (nearest-upsampled); with
  `masks` [heads, h, w] a second row shows the image kept by each head's mask and by any."""
  factor = image.shape[0] // maps.shape[1]
  fig, axes = _panels(1 if masks is None else 2, 1 + len(maps))
  axes[0, 0].imshow(image)
  _label(axes[0, 0], "image")
  for i, m in enumerate(maps):
    axes[0, i + 1].imshow(upsample(m, factor), cmap="inferno", interpolation="nearest")
    _label(axes[0, i + 1], f"head {i}")
  if masks is not None:
    axes[1, 0].imshow(_dimmed(image, upsample(masks.any(axis=0), factor)))
    _label(axes[1, 0], "any head")
    for i, m in enumerate(masks):
      axes[1, i + 1].imshow(_dimmed(image, upsample(m, factor)))
      _label(axes[1, i + 1], f"head {i} mask")
  return fig


def draw_pca(images: np.ndarray, rgb: np.ndarray) -> Figure:
  """The images on the top row, their PCA colours `rgb` [n, h, w, 3] below (nearest-upsampled)."""
  factor = images.shape[1] // rgb.shape[1]
  fig, axes = _panels(2, len(images))
  for i, (image, colours) in enumerate(zip(images, rgb)):
    axes[0, i].imshow(image)
    axes[1, i].imshow(upsample(colours, factor), interpolation="nearest")
  return fig


def draw_correspondences(image_a: np.ndarray, image_b: np.ndarray, matches: dict, stride: int) -> Figure:
  """The two images side by side with a line between the patch centres of each match,
  coloured by similarity rank (brightest = most similar)."""
  fig = Figure(figsize=(2 * PANEL_PX / DPI, PANEL_PX / DPI), dpi=DPI)
  ax = fig.add_axes((0, 0, 1, 1))
  ax.set_axis_off()
  ax.imshow(np.concatenate([image_a, image_b], axis=1))
  ax.autoscale(False)
  ya, xa = (matches["points_a"].T + 0.5) * stride - 0.5
  yb, xb = (matches["points_b"].T + 0.5) * stride - 0.5
  colours = matplotlib.colormaps["plasma"](np.linspace(0.95, 0.2, len(ya)))
  for i, colour in enumerate(colours):
    ax.plot([xa[i], xb[i] + image_a.shape[1]], [ya[i], yb[i]], "-o", color=colour, linewidth=1.2,
            markersize=4)
  return fig


# ---------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------

def save(fig: Figure, path: pathlib.Path) -> pathlib.Path:
  """Writes `fig` as a PNG at DPI (so its size in px is its size in inches times DPI)."""
  fig.savefig(path, dpi=DPI)
  return path


def attention_command(backbone, images, names, args, out: pathlib.Path) -> list[pathlib.Path]:
  """DIR/attention_<name>.png per image: CLS attention per head (and masks with --threshold)."""
  maps = cls_attention(backbone, images)
  masks = [None] * len(maps) if args.threshold is None else attention_mask(maps, args.threshold)
  return [save(draw_attention(image, m, mask), out / f"attention_{name}.png")
          for image, m, mask, name in zip(images, maps, masks, names)]


def pca_command(backbone, images, names, args, out: pathlib.Path) -> list[pathlib.Path]:
  """DIR/pca.png: the images above the PCA colours of their patch features."""
  del names
  rgb, _ = pca_rgb(np.asarray(backbone(images)["patch"]), args.threshold)
  return [save(draw_pca(images, rgb), out / "pca.png")]


def read_extra_features(paths: list[str]) -> list[np.ndarray]:
  """The --extra_features .npy files, feature maps float32 [h, w, C] with one C; one UsageError
  naming a file that cannot be read, is not [h, w, C] with h, w, C >= 1 or not finite, or
  whose C differs (`correspondence.load_feature_map`, `correspondence.check_channels`)."""
  extra = [correspondence.load_feature_map(path) for path in paths]
  correspondence.check_channels(extra, paths)
  return extra


def correspond_command(backbone, images, names, args, out: pathlib.Path) -> list[pathlib.Path]:
  """DIR/correspond.png and .npz: mutual nearest-neighbour patches of the two images."""
  del names
  patches = np.asarray(backbone(images)["patch"])
  foreground = None if args.threshold is None else tuple(pca_rgb(patches, args.threshold)[1])
  feats = list(patches)
  if args.extra_features:
    feats = [fuse_features(f, x) for f, x in zip(feats, read_extra_features(args.extra_features))]
  matches = correspondences(feats[0], feats[1], args.num_matches, foreground)
  np.savez(out / "correspond.npz", **matches)
  fig = draw_correspondences(images[0], images[1], matches, images.shape[1] // feats[0].shape[0])
  return [save(fig, out / "correspond.png"), out / "correspond.npz"]


COMMANDS = {"attention": attention_command, "pca": pca_command, "correspond": correspond_command}


def parse_args(argv: list[str]) -> argparse.Namespace:
  """The command line, checked as far as it can be without the run."""
  parser = ArgumentParser(prog="python -m dino_jax.pictures", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("command", choices=sorted(COMMANDS))
  parser.add_argument("--workdir", required=True, help="Run directory (as for dino_jax.train).")
  parser.add_argument("--step", type=int, help="Checkpoint step (default: the latest).")
  parser.add_argument("--student", action="store_true", help="Use the student instead of the teacher.")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--images", nargs="+", metavar="IMAGE", help="Image files.")
  source.add_argument("--demo", type=int, metavar="N", help="The first N bundled Fashion-MNIST test images.")
  parser.add_argument("--out", required=True, help="Output folder for the PNGs.")
  parser.add_argument("--image_size", type=int, help="Input side in px (default: the run's global crop).")
  parser.add_argument("--threshold", type=float,
                      help="attention: share of each head's mass its mask keeps (e.g. 0.6); "
                           f"pca: foreground threshold on the scaled first component (default {PCA_THRESHOLD}); "
                           "correspond: keep only matches between patches that pca calls foreground "
                           "at this threshold (default: all).")
  parser.add_argument("--num_matches", type=int, default=20, help="correspond: matches drawn.")
  parser.add_argument("--extra_features", nargs=2, metavar=("A.npy", "B.npy"),
                      help="correspond: feature maps [h, w, C] fused with the DINO patch features.")
  args = parser.parse_args(argv)
  count = args.demo if args.images is None else len(args.images)
  if count < 1:
    parser.error(f"--demo must be at least 1 (got {count})")
  if args.command == "correspond" and count != 2:
    parser.error(f"correspond needs exactly 2 images (got {count})")
  if args.extra_features and args.command != "correspond":
    parser.error("--extra_features is only for correspond")
  if args.threshold is not None and not 0.0 < args.threshold < 1.0:
    parser.error(f"--threshold must be in (0, 1) (got {args.threshold})")
  if args.num_matches < 1:
    parser.error(f"--num_matches must be at least 1 (got {args.num_matches})")
  if args.image_size is not None and args.image_size < 1:
    parser.error(f"--image_size must be a positive number of pixels (got {args.image_size})")
  return args


def run(args: argparse.Namespace) -> list[pathlib.Path]:
  """Runs the parsed command; returns the files written."""
  out = cli.output_folder("--out", args.out)
  backbone = runs.load_backbone(args.workdir, args.step, args.student)
  size = args.image_size or backbone.cfg.aug.global_size
  try:
    backbone.module.grid(size)
  except ValueError as e:
    raise UsageError(f"image_size {e}") from None
  if args.images is None:
    demo = data.fashion_mnist_demo("test", size)
    if args.demo > len(demo):
      raise UsageError(f"--demo {args.demo}: the demo test split has {len(demo)} images")
    images = demo.get(np.arange(args.demo))[0]
    names = [f"demo{i}" for i in range(args.demo)]
  else:
    images = read_images(args.images, size)
    names = [f"{i}_{pathlib.Path(path).stem}" for i, path in enumerate(args.images)]
  return COMMANDS[args.command](backbone, images, names, args, out)


def main(argv: list[str]):
  """Command-line entry: bad input exits with one `error:` line and status 2."""
  args = parse_args(argv)
  logging.set_verbosity(logging.WARNING)
  try:
    written = run(args)
  except UsageError as e:
    fail(str(e))
  except OSError as e:
    fail(f"cannot write into --out {args.out!r}: {e.strerror or e}")
  print("\n".join(str(path) for path in written))


if __name__ == "__main__":
  main(sys.argv[1:])
