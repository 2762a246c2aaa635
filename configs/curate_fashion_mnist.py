r"""Curation (DINOv2 Sec. 3 / App. A) of the demo's uncurated Fashion-MNIST pool.

  python -m dino_jax.curate --config configs/curate_fashion_mnist.py --workdir /tmp/cur \
      --config.demo_dir=/tmp/fmnist_pool --stages make_demo_pool
  python -m dino_jax.curate --config configs/curate_fashion_mnist.py --workdir /tmp/cur \
      --config.demo_dir=/tmp/fmnist_pool --config.backbone=runs/demo      # all stages
  python -m dino_jax.curate ... --stages score_demo

The pool (demo_dir/pool) is 8,000 Fashion-MNIST train images plus 1,000 injected
near-duplicates, 200 copies of test images, 400 noise images and 3 corrupt files; the seed
set (demo_dir/seeds) is 100 held-out train images of each of 3 classes. Deduplication also
removes pool copies of the bundled test split. `:tiny` is the seconds-long variant the tests
run. `--stages bench` times the search and k-means on synthetic features (`bench`).
"""
import ml_collections

from configs import common


def image_set(source: str, path="", split="", name="", data_dir="") -> dict:
  """A `data` source (fashion_mnist_demo | tfds | folder | files | manifest) and its split."""
  return dict(source=source, path=path, split=split, name=name, data_dir=data_dir)


def get_config(arg=None):
  common.check_arg(arg)
  c = ml_collections.ConfigDict()
  c.backbone = ""  # run directory whose teacher embeds the images (dino_jax.train or dino_jax.convert)
  c.backbone_step = -1  # checkpoint step; -1: the latest
  c.demo_dir = "/tmp/fmnist_pool"  # the demo pool's folder (make_demo_pool writes it)
  demo_dir = c.get_ref("demo_dir")
  c.pool = image_set("folder", path=demo_dir, split="pool")
  c.seeds = image_set("folder", path=demo_dir, split="seeds")
  c.eval_sets = dict(fashion_mnist_test=image_set("fashion_mnist_demo", split="test"))

  c.embed = dict(batch_size=256, shard_size=4096, image_size=0)  # image_size 0: the run's global crop
  c.search = dict(block_size=1024)  # rows per similarity tile: memory per device ~ block_size^2 floats
  # Cosine thresholds on the backbone's embedding (DINOv2 used 0.6 / 0.45 on SSCD copy-detection
  # descriptors; a DINO embedding is more invariant, so its thresholds are higher).
  # descriptor "sscd": dedup compares SSCD copy-detection descriptors (sscd_weights: the released
  # sscd_disc_mixup.torchvision.pt) with SSCD's own thresholds (its README: 0.75, copies at 90%
  # precision); retrieval keeps the backbone's embedding (docs/curation.md).
  c.dedup = dict(threshold=0.95, eval_threshold=0.95, k=16, descriptor="embedding", sscd_weights="",
                 sscd_image_size=288, sscd_threshold=0.75, sscd_eval_threshold=0.75)
  c.retrieve = dict(method="knn", k=4, num_clusters=100, clusters_per_seed=1, per_seed=20, iterations=20,
                    seed=0, include_seeds=True)
  c.demo = dict(out=demo_dir, originals=8000, copies_per_kind=200, test_copies=200, noise=400, corrupt=3,
                seed_classes=(0, 3, 7), seeds_per_class=100, seed=0)
  c.bench = dict(sizes=(4096, 8192, 16384), dim=384, num_clusters=1024, iterations=5, repeats=3)

  if arg == "tiny":
    c.embed.update(batch_size=32, shard_size=64)
    c.search.block_size = 16
    c.retrieve.update(num_clusters=8, iterations=5, per_seed=4)
    c.demo.update(originals=120, copies_per_kind=4, test_copies=10, noise=8, corrupt=3, seeds_per_class=3)
    c.bench.update(sizes=(256,), dim=16, num_clusters=8, iterations=2, repeats=1)
  return c
