"""Attention maps, PCA and correspondence pictures (dino_jax.pictures) from a tiny run."""
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.cbook
import numpy as np
import pytest
from PIL import Image

from dino_jax import data
from dino_jax import pictures
from dino_jax import runs
from dino_jax import trainer
from dino_jax.models import vit
from tests.test_train import REPO, tiny

REGISTERS = 2  # the tiny run has 2 heads, 4 px patches, 16 px crops: a 4 x 4 patch grid
PHOTO = matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)  # public domain


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  trainer.train(tiny(steps=3, **{"model.num_registers": REGISTERS}), str(workdir))
  return str(workdir), runs.load_backbone(str(workdir))


def demo(n, size=16):
  return data.fashion_mnist_demo("test", size).get(np.arange(n))[0]


def mirrored(points_a, points_b, width):
  """Which matches pair (row, col) with (row, width - 1 - col)."""
  return (points_a[:, 0] == points_b[:, 0]) & (points_b[:, 1] == width - 1 - points_a[:, 1])


def test_block_sows_the_attention_it_applies():
  block = vit.Block(num_heads=2, mlp_dim=16)
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  params = block.init(jax.random.key(1), x)["params"]
  y, state = block.apply({"params": params}, x, mutable=["intermediates"])
  np.testing.assert_array_equal(y, block.apply({"params": params}, x))
  probs = state["intermediates"]["attention"][0]
  assert probs.shape == (2, 2, 5, 5)
  h = nn.LayerNorm(epsilon=1e-6).apply({"params": params["norm1"]}, x)
  q, k, v = jnp.moveaxis(nn.DenseGeneral((3, 2, 4)).apply({"params": params["qkv"]}, h), 2, 0)
  np.testing.assert_allclose(jnp.einsum("bhqk,bkhd->bqhd", probs, v), jax.nn.dot_product_attention(q, k, v),
                             atol=1e-5)


def test_cls_attention_leaves_out_cls_and_registers(run):
  _, backbone = run
  attn = pictures.last_attention(backbone, demo(3))
  maps = pictures.cls_attention(backbone, demo(3))
  assert attn.shape == (3, 2, 1 + REGISTERS + 16, 1 + REGISTERS + 16) and maps.shape == (3, 2, 4, 4)
  assert (maps >= 0).all()
  mass = maps.sum(axis=(2, 3))
  np.testing.assert_allclose(mass + attn[:, :, 0, :1 + REGISTERS].sum(-1), 1.0, atol=1e-5)
  assert (mass <= 1.0 + 1e-6).all() and (mass < 0.99).any()
  np.testing.assert_array_equal(maps[:, :, 1, 2], attn[:, :, 0, 1 + REGISTERS + 4 + 2])  # row-major patches


def test_attention_mask_keeps_the_fewest_patches_holding_the_threshold(run):
  _, backbone = run
  for maps in (pictures.cls_attention(backbone, demo(3)), np.random.default_rng(0).exponential(size=(3, 5, 6))):
    for threshold in (0.3, 0.6, 0.9):
      mask = pictures.attention_mask(maps, threshold)
      total, kept = maps.sum(axis=(-2, -1)), (maps * mask).sum(axis=(-2, -1))
      smallest_kept = np.where(mask, maps, np.inf).min(axis=(-2, -1))
      assert (kept >= threshold * total * (1 - 1e-6)).all()
      assert (kept - smallest_kept < threshold * total).all()
      assert (smallest_kept >= np.where(mask, -np.inf, maps).max(axis=(-2, -1))).all()


def test_pca_rgb_finds_a_planted_foreground():
  rng = np.random.default_rng(0)
  feats = rng.normal(0.0, 0.1, (2, 4, 5, 8))
  foreground = np.zeros((2, 4, 5), bool)
  foreground[:, 1:3, 1:4] = True
  feats[foreground, 0] += 3.0
  rgb, fg = pictures.pca_rgb(feats)
  np.testing.assert_array_equal(fg, foreground)
  assert rgb.shape == (2, 4, 5, 3) and (rgb[~fg] == 0).all()
  np.testing.assert_allclose(rgb[fg].min(axis=0), 0.0)
  np.testing.assert_allclose(rgb[fg].max(axis=0), 1.0)


def test_pca_rgb_of_the_run(run):
  _, backbone = run
  feats = np.asarray(backbone(demo(4))["patch"])
  rgb, fg = pictures.pca_rgb(feats)
  assert rgb.shape == (4, 4, 4, 3) and 0 < fg.sum() <= fg.size / 2
  assert pictures.pca_rgb(feats, 0.9)[1].sum() <= fg.sum()


def test_mutual_nearest_neighbours_find_a_flipped_grid():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(6, 7, 16))
  b = a[:, ::-1] + 0.3 * rng.normal(size=a.shape)
  idx_a, idx_b, sim = pictures.mutual_nearest_neighbours(a.reshape(42, 16), b.reshape(42, 16))
  assert len(np.unique(idx_a)) == len(np.unique(idx_b)) == len(idx_a) >= 0.7 * 42
  assert (np.diff(sim) <= 0).all()
  assert mirrored(np.stack(np.divmod(idx_a, 7), -1), np.stack(np.divmod(idx_b, 7), -1), 7).mean() >= 0.7
  matches = pictures.correspondences(a, b, 10)
  assert matches["points_a"].shape == (10, 2) and mirrored(matches["points_a"], matches["points_b"], 7).all()


def test_foreground_keeps_matches_off_a_shared_plain_background():
  rng = np.random.default_rng(0)
  background = rng.normal(size=(6, 6, 16))  # the same plain background in both images
  a, b = background.copy(), background + 0.01 * rng.normal(size=background.shape)
  a[2:4, 1:5] = rng.normal(size=(2, 4, 16))
  b[2:4, 1:5] = a[2:4, 1:5][:, ::-1] + 0.5 * rng.normal(size=(2, 4, 16))
  mask = np.zeros((6, 6), bool)
  mask[2:4, 1:5] = True
  unfiltered = pictures.correspondences(a, b, 20)
  assert not mask[tuple(unfiltered["points_a"][:10].T)].any()  # background pairs rank first
  matches = pictures.correspondences(a, b, 20, (mask, mask))
  assert 0 < len(matches["similarity"]) <= 8
  assert mask[tuple(matches["points_a"].T)].all() and mask[tuple(matches["points_b"].T)].all()


def test_fuse_features_resizes_and_normalizes():
  rng = np.random.default_rng(0)
  fused = pictures.fuse_features(rng.normal(size=(4, 4, 8)), rng.normal(size=(8, 8, 3)))
  assert fused.shape == (4, 4, 11)
  np.testing.assert_allclose(np.linalg.norm(fused[..., :8], axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(fused[..., 8:], axis=-1), 1.0, rtol=1e-6)


def check_png(path, width, height):
  assert path.stat().st_size > 0
  with Image.open(path) as image:
    assert image.format == "PNG" and image.size == (width, height)


def test_attention_and_pca_commands_write_pngs_of_the_documented_size(run, tmp_path):
  workdir, _ = run
  px = pictures.PANEL_PX
  pictures.main(["attention", "--workdir", workdir, "--demo", "2", "--threshold", "0.6", "--out", str(tmp_path)])
  for i in range(2):
    check_png(tmp_path / f"attention_demo{i}.png", (1 + 2) * px, 2 * px)  # image + 2 heads; maps and masks
  Image.fromarray(demo(1, 24)[0]).save(tmp_path / "shoe.png")
  pictures.main(["attention", "--workdir", workdir, "--images", str(tmp_path / "shoe.png"), "--out", str(tmp_path)])
  check_png(tmp_path / "attention_0_shoe.png", (1 + 2) * px, px)
  pictures.main(["pca", "--workdir", workdir, "--demo", "3", "--image_size", "32", "--out", str(tmp_path)])
  check_png(tmp_path / "pca.png", 3 * px, 2 * px)


def mirror_symmetric_context(image, p):
  """Descriptor of each patch [h, w, 3 * 3p * 3p]: its 3 x 3-patch pixel neighbourhood (reflect-
  padded, centred on the image mean) plus that neighbourhood's left-right mirror. A patch of the
  flipped image sees the mirrored neighbourhood, so the descriptor is exactly flip-equivariant."""
  x = np.pad(image.astype(np.float32) - image.mean(axis=(0, 1)), ((p, p), (p, p), (0, 0)), mode="reflect")
  windows = np.lib.stride_tricks.sliding_window_view(x, (3 * p, 3 * p), axis=(0, 1))[::p, ::p]
  return (windows + windows[..., ::-1]).reshape(*windows.shape[:2], -1)


def test_correspond_command_with_flip_equivariant_extra_features(run, tmp_path):
  workdir, _ = run
  photo = pictures.read_images([PHOTO], 32)[0]
  Image.fromarray(photo).save(tmp_path / "a.png")
  Image.fromarray(photo[:, ::-1]).save(tmp_path / "b.png")
  extra = [mirror_symmetric_context(photo, 4), mirror_symmetric_context(photo[:, ::-1], 4)]
  np.testing.assert_allclose(extra[1], extra[0][:, ::-1])
  np.save(tmp_path / "a.npy", extra[0])
  np.save(tmp_path / "b.npy", extra[1])
  proc = subprocess.run([sys.executable, "-m", "dino_jax.pictures", "correspond", "--workdir", workdir,
                         "--images", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--image_size", "32",
                         "--extra_features", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"),
                         "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  check_png(tmp_path / "out" / "correspond.png", 2 * pictures.PANEL_PX, pictures.PANEL_PX)
  fused = np.load(tmp_path / "out" / "correspond.npz")
  assert len(fused["similarity"]) == 20
  assert mirrored(fused["points_a"], fused["points_b"], 8).mean() >= 0.7
  proc = subprocess.run([sys.executable, "-m", "dino_jax.pictures", "correspond", "--workdir", workdir,
                         "--images", str(tmp_path / "a.png"), str(tmp_path / "b.png"), "--image_size", "32",
                         "--threshold", "0.5", "--out", str(tmp_path / "fg")],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  backbone = runs.load_backbone(workdir)
  patches = np.asarray(backbone(pictures.read_images([str(tmp_path / "a.png"), str(tmp_path / "b.png")], 32))["patch"])
  fg_a, fg_b = pictures.pca_rgb(patches, 0.5)[1]
  kept = np.load(tmp_path / "fg" / "correspond.npz")
  assert fg_a[tuple(kept["points_a"].T)].all() and fg_b[tuple(kept["points_b"].T)].all()


@pytest.mark.parametrize("args, message", [
    (["pca", "--out", "OUT"], "one of the arguments --images --demo is required"),
    (["correspond", "--demo", "3", "--out", "OUT"], "correspond needs exactly 2 images (got 3)"),
    (["correspond", "--images", "a.png", "--out", "OUT"], "correspond needs exactly 2 images (got 1)"),
    (["pca", "--demo", "2", "--image_size", "18", "--out", "OUT"], "image_size 18 is not a multiple of patch size 4"),
    (["attention", "--images", "missing.png", "--out", "OUT"], "cannot read image 'missing.png'"),
])
def test_bad_command_lines_are_one_error_line(run, tmp_path, capsys, args, message):
  workdir, _ = run
  args = [str(tmp_path) if a == "OUT" else a for a in args]
  with pytest.raises(SystemExit) as exit_info:
    pictures.main(args + ["--workdir", workdir])
  err = capsys.readouterr().err
  assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
  assert message in err
