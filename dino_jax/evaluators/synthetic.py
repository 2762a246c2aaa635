"""Writes a small benchmark folder for an evaluator type, generated from real images with known
answers (each module's `write_synthetic`), in the layout the evaluator reads:

  python -m dino_jax.evaluators.synthetic TYPE --out DIR [--seed N]

TYPE: retrieval (revisited layout), retrieval_plain, copy_detection, video_propagation,
correspondence, segmentation or depth (one folder holds both layouts). Then, e.g.:
  python -m dino_jax.evaluate run --workdir RUN --evals retrieval --set path=DIR
"""
import functools
import pathlib
import sys

from dino_jax.errors import ArgumentParser
from dino_jax.errors import UsageError
from dino_jax.errors import fail
from dino_jax.evaluators import correspondence
from dino_jax.evaluators import dense
from dino_jax.evaluators import retrieval
from dino_jax.evaluators import video_propagation

WRITERS = {
    "retrieval": functools.partial(retrieval.write_synthetic, layout="revisited"),
    "retrieval_plain": functools.partial(retrieval.write_synthetic, layout="plain"),
    "copy_detection": functools.partial(retrieval.write_synthetic, layout="copydays"),
    "video_propagation": video_propagation.write_synthetic,
    "correspondence": correspondence.write_synthetic,
    "segmentation": dense.write_synthetic,  # one folder holds the segmentation and the depth layout
    "depth": dense.write_synthetic,
}


def main(argv: list[str]) -> None:
  parser = ArgumentParser(prog="python -m dino_jax.evaluators.synthetic", description=__doc__.splitlines()[0])
  parser.add_argument("type", choices=sorted(WRITERS), help="the evaluator type whose benchmark to write")
  parser.add_argument("--out", required=True, help="the folder to write (created)")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  if out.exists() and any(out.iterdir()):
    fail(f"--out {args.out!r} exists and is not empty")
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    fail(f"cannot create --out {args.out!r} ({e.strerror})")
  try:
    WRITERS[args.type](out, seed=args.seed)
  except UsageError as e:
    fail(str(e))
  print(f"{args.type}: synthetic benchmark written to {out}")


if __name__ == "__main__":
  main(sys.argv[1:])
