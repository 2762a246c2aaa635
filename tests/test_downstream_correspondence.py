"""SD-DINO zero-shot keypoint transfer and PCK (dino_jax.evaluators.correspondence)."""
import functools
import json
import math

import jax
import ml_collections
import numpy as np
import pytest

from configs import common as configs
from dino_jax import augment
from dino_jax import defaults
from dino_jax import pictures
from dino_jax.errors import UsageError
from dino_jax.evaluators import common
from dino_jax.evaluators import correspondence


@pytest.fixture(scope="module")
def tiny():
  c = defaults.base_config()
  configs.make_tiny(c)
  params = common.DenseFeatures(c.model).module.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
  return c, params["params"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  out = tmp_path_factory.mktemp("pairs")
  correspondence.write_synthetic(out, seed=0, pairs_per_category=2)
  return out


def evaluator_config(root, **overrides):
  d = dict(type="correspondence", every_steps=-1, every_epochs=0.0, path=str(root), split="test", features_dir="",
           alpha=0.5, pca_dim=0, grid=0, image_size=64, facet="token", layer=1, stride=4, match="nn",
           temperature=0.02, soft_window=7, pck_alphas=(0.05, 0.1, 0.15), pairs_per_category=0)
  d.update(overrides)
  return ml_collections.ConfigDict(d)


def run(tiny, ecfg, params=True):
  c, p = tiny
  correspondence.CorrespondenceEvaluator.check("corr", ecfg, c, True)
  return correspondence.CorrespondenceEvaluator(ecfg, c, None).run(p if params else None)


# ---------------------------------------------------------------------------------------
# PCK and its summaries against hand-computed answers.
# ---------------------------------------------------------------------------------------

def test_pck_on_an_exact_warp_with_hand_made_predictions():
  # Target = source shifted by (+10, +5): gt is exact; the bbox is 40 x 20, so α·max = 40α px.
  src = np.array([[0.0, 0.0], [10.0, 2.0], [4.0, 4.0], [7.0, 1.0], [3.0, 3.0], [1.0, 1.0]])
  gt = src + [10.0, 5.0]
  errors = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, -4.0], [3.0, 4.0], [6.0, 0.0], [np.nan, np.nan]])  # 0, 3, 4, 5, 6 px
  correct = correspondence.pck(gt + errors, gt, [10, 20, 50, 40], (0.05, 0.1, 0.15))  # thresholds 2, 4, 6 px
  # Strictly below the threshold (SD-DINO's `err < threshold`): 4 px fails at 4 px, 6 px at 6 px.
  np.testing.assert_array_equal(correct, [[1, 1, 1], [0, 1, 1], [0, 0, 1], [0, 0, 1], [0, 0, 0], [0, 0, 0]])


def test_summaries_pool_keypoints_per_category_then_average():
  results = [("cat", np.array([[1], [0]], bool)), ("cat", np.array([[1], [1], [1], [0]], bool)),
             ("dog", np.array([[0]], bool))]
  per_keypoint, per_image = correspondence.summarize(results)
  np.testing.assert_allclose(per_keypoint, [(4 / 6 + 0) / 2])  # cat pools 4 of 6; dog 0 of 1
  np.testing.assert_allclose(per_image, [(1 / 2 + 3 / 4 + 0) / 3])
  assert [correspondence.pck_name(a) for a in (0.05, 0.1, 0.15, 0.01)] == ["pck05", "pck10", "pck15", "pck01"]
  assert correspondence.main_index((0.05, 0.1)) == 1 and correspondence.main_index((0.2, 0.3)) == 0


# ---------------------------------------------------------------------------------------
# Resampling, fusion, PCA by hand.
# ---------------------------------------------------------------------------------------

def test_resize_is_bilinear_with_half_pixel_centres():
  a, b = 2.0, 6.0
  up = common.resize_bilinear(np.array([[[a], [b]]]), (1, 4))  # PyTorch's align_corners=False
  np.testing.assert_allclose(up[0, :, 0], [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b])
  down = common.resize_bilinear(np.arange(16.0).reshape(4, 4, 1), (2, 2))  # 2x down: means of 2 x 2 blocks
  np.testing.assert_allclose(down[..., 0], [[2.5, 4.5], [10.5, 12.5]])


def test_canvas_pads_to_a_centred_square_and_samples_the_image_region():
  canvas = correspondence.Canvas(30, 60, 16)  # rows 30, cols 60 -> 8 x 16 px at rows 4..11
  assert canvas.inner == (8, 16) and canvas.offset == (4, 0)
  placed = canvas.place(np.full((30, 60, 3), 200, np.uint8))
  assert (placed[4:12] == 200).all() and (placed[:4] == 0).all() and (placed[12:] == 0).all()
  rows, cols = np.mgrid[:4, :4]
  fmap = np.stack([rows, cols], -1).astype(np.float32)  # a 4 x 4 map over the canvas holding its indices
  shape = correspondence.grid_shape(30, 60, 4)
  assert shape == (2, 4)
  # Image cell centres: y = 7.5, 22.5 -> canvas 4 + y 8/30 = 6, 10 px -> map index 6/4 - 0.5 = 1, 2;
  # x = 7.5 .. 52.5 -> 2, 6, 10, 14 px -> 0, 1, 2, 3.
  out = canvas.to_image_grid(fmap, shape)
  np.testing.assert_allclose(out[..., 0], [[1] * 4, [2] * 4])
  np.testing.assert_allclose(out[..., 1], [[0, 1, 2, 3]] * 2)


def test_canvas_maps_keypoints_and_patch_centres_as_sd_dino():
  canvas = correspondence.Canvas(30, 60, 16)  # scale 16/60, offset (4, 0); a 4 x 4 patch grid (stride 4)
  # (x, y) -> canvas (16x/60, 16y/60 + 4) -> patch int(canvas / 4): (30, 15) -> (8, 8) -> row 2, col 2;
  # (0, 0) -> (0, 4) -> row 1, col 0; (59, 29) -> (15.73, 11.73) -> row 2, col 3.
  kps = np.array([[30.0, 15.0], [0.0, 0.0], [59.0, 29.0]])
  np.testing.assert_array_equal(canvas.cells(kps, (4, 4)), [10, 4, 11])
  # Patch (row, col)'s centre on the canvas: SD-DINO's (j - 1) stride + stride + patch // 2 - 0.5 = 4j + 1.5;
  # back to the image: (canvas - offset) 60/16. (2, 2) -> (9.5, 9.5) -> x 35.625, y 20.625;
  # (0, 3), a padding patch -> (13.5, 1.5) -> x 50.625, y -9.375.
  np.testing.assert_allclose(canvas.points(np.array([2.0, 0.0]), np.array([2.0, 3.0]), (4, 4)),
                             [[35.625, 20.625], [50.625, -9.375]])
  # An external map [2, 4] spanning the image: canvas cell centres y = 2, 6, 10, 14; the image covers rows
  # [4, 12), so rows 1, 2 sample map rows (y - 4) 2/8 - 0.5 = 0, 1 and rows 0, 3 are padding (zero);
  # columns x = 2 .. 14 sample map columns x 4/16 - 0.5 = 0 .. 3.
  fmap = np.arange(1.0, 9.0).reshape(2, 4, 1)
  placed = canvas.place_map(fmap, (4, 4))[..., 0]
  np.testing.assert_allclose(placed, [[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8], [0, 0, 0, 0]])


def test_matching_on_the_canvas_may_land_on_the_padding():
  canvas = correspondence.Canvas(30, 60, 16)
  src = np.zeros((4, 4, 3), np.float32)
  src[2, 2] = [1, 0, 0]  # the keypoint (30, 15)'s patch
  trg = np.full((4, 4, 3), [0, 0, 1], np.float32)
  trg[0, 3] = [1, 0, 0]  # the only match is a padding patch, a candidate as in SD-DINO
  pred = correspondence.transfer(src, trg, np.array([[30.0, 15.0]]), canvas, canvas)
  np.testing.assert_allclose(pred, [[50.625, -9.375]])

def test_fusion_normalizes_each_source_then_weights_it():
  backbone = np.array([[[3.0, 4.0]]])  # 1 x 1 x 2
  external = np.array([[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]])  # 2 x 2 x 2: resized to 1 x 1 = mean
  fused = correspondence.fuse([external, backbone], (0.25, 0.75), backbone.shape[:2])
  mean = np.array([0.25, 0.75]) / math.hypot(0.25, 0.75)
  np.testing.assert_allclose(fused[0, 0], [0.25 * mean[0], 0.25 * mean[1], 0.75 * 0.6, 0.75 * 0.8], rtol=1e-6)
  default_grid = correspondence.fuse([backbone, external], (1.0, 1.0))
  np.testing.assert_allclose(default_grid[0, 0], [0.6, 0.8, mean[0], mean[1]], rtol=1e-6)


def test_co_pca_projects_both_maps_on_their_joint_axes():
  a = np.array([[[1.0, 0.0], [3.0, 0.0]]])  # rows of both maps on the x axis; joint mean (4, 0)
  b = np.array([[[5.0, 0.0], [7.0, 0.0]]])
  pa, pb = correspondence.co_pca(a, b, 1)
  assert pa.shape == (1, 2, 1) and pb.shape == (1, 2, 1)
  got = np.concatenate([pa.ravel(), pb.ravel()])
  np.testing.assert_allclose(got * np.sign(got[-1]), [-3, -1, 1, 3], atol=1e-6)
  assert correspondence.co_pca(a, b, 5)[0].shape == (1, 2, 2)  # at most C components


# ---------------------------------------------------------------------------------------
# Keypoint transfer.
# ---------------------------------------------------------------------------------------

def one_hot_grid(codes: np.ndarray, n: int) -> np.ndarray:
  return np.eye(n, dtype=np.float32)[codes]


def test_transfer_is_exact_when_features_encode_the_warp():
  # Source 40 x 60 px on a 4 x 6 grid; target = source scaled 2x and mirrored left-right (80 x 120 px,
  # 4 x 6 grid): source cell (i, j) is target cell (i, 5 - j). Features one-hot encode the source cell.
  codes = np.arange(24).reshape(4, 6)
  src, trg = one_hot_grid(codes, 24), one_hot_grid(codes[:, ::-1], 24)
  i, j = np.mgrid[:4, :6]
  src_kps = np.stack([(j + 0.5) * 10 - 0.5, (i + 0.5) * 10 - 0.5], -1).reshape(-1, 2)  # cell centres
  gt = np.stack([120 - 1 - (2 * (src_kps[:, 0] + 0.5) - 0.5), 2 * (src_kps[:, 1] + 0.5) - 0.5], -1)
  frames = correspondence.ImageGrid(40, 60), correspondence.ImageGrid(80, 120)
  for match in correspondence.MATCHES:
    pred = correspondence.transfer(src, trg, src_kps, *frames, match, temperature=1e-3, window=1)
    np.testing.assert_allclose(pred, gt, atol=1e-6)
    assert correspondence.pck(pred, gt, [0, 0, 120, 80], (0.01,)).all()


def test_soft_argmax_averages_the_window_and_mutual_drops_one_sided_matches():
  trg = np.zeros((1, 5, 2), np.float32)
  trg[0, :, 0] = [0.0, 1.0, 1.0, 0.0, 1.0]  # cells 1, 2 and 4 are all exact matches of a source (1, 0)
  src = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
  kps = np.array([[0.0, 0.0]])  # source cell 0 of a 1 x 2 grid over 1 x 2 px; target 1 x 5 px
  frames = correspondence.ImageGrid(1, 2), correspondence.ImageGrid(1, 5)
  pred = correspondence.transfer(src, trg, kps, *frames, "soft_argmax", temperature=0.01, window=1)
  np.testing.assert_allclose(pred, [[1.5, 0.0]])  # window 0..2 around the argmax 1: cells 1 and 2 share it
  # Target cell 1 is source cell 0's nearest neighbour, but source cell 1 is target cell 1's.
  trg = np.array([[[0.0, -1.0], [1.0, 0.5], [-1.0, 0.0], [0.0, -1.0], [0.0, -1.0]]], np.float32)
  src = np.array([[[1.0, 0.0], [1.0, 1.0]]], np.float32)  # cosines with target cell 1: 0.894, 0.949
  np.testing.assert_allclose(correspondence.transfer(src, trg, kps, *frames, "nn"), [[1.0, 0.0]])
  assert np.isnan(correspondence.transfer(src, trg, kps, *frames, "mutual")).all()
  kps_1 = np.array([[1.0, 0.0]])  # source cell 1 and target cell 1 are mutual
  np.testing.assert_allclose(correspondence.transfer(src, trg, kps_1, *frames, "mutual"), [[1.0, 0.0]])


def test_fusion_beats_two_sources_each_wrong_on_a_different_keypoint():
  # A 1 x 2 px source and a 1 x 4 px target, one cell per px; the keypoints at cells 0, 1 of both.
  a_src, b_src = np.eye(2, dtype=np.float32)[None], np.eye(2, dtype=np.float32)[None]
  a_trg = np.array([[[1, 0], [0.6, 0.8], [0.6, 0.8], [0, 1]]], np.float32)
  b_trg = np.array([[[0.8, 0.6], [0, 1], [1, 0], [0.8, 0.6]]], np.float32)
  # Cosines of keypoint 0 with target cells 0..3: A 1, .6, .6, 0 (right); B .8, 0, 1, .8 (cell 2: wrong).
  # Keypoint 1: A 0, .8, .8, 1 (cell 3: wrong); B .6, 1, 0, .6 (right). With α = 0.5 both parts are unit
  # and weighted alike, so the fused cosine is their mean: keypoint 0 .9, .3, .8, .4 -> 0; keypoint 1
  # .3, .9, .4, .8 -> 1.
  kps, frames = np.array([[0.0, 0.0], [1.0, 0.0]]), (correspondence.ImageGrid(1, 2), correspondence.ImageGrid(1, 4))
  bbox = [0, 0, 4, 1]  # α = 0.1: within 0.4 px
  scores = {}
  for name, (src, trg) in dict(a=(a_src, a_trg), b=(b_src, b_trg)).items():
    scores[name] = correspondence.pck(correspondence.transfer(src, trg, kps, *frames), kps, bbox, (0.1,))
  fused = [correspondence.fuse([a, b], (0.5, 0.5)) for a, b in ((a_src, b_src), (a_trg, b_trg))]
  scores["fused"] = correspondence.pck(correspondence.transfer(*fused, kps, *frames), kps, bbox, (0.1,))
  assert {k: v[:, 0].tolist() for k, v in scores.items()} == dict(a=[True, False], b=[False, True], fused=[True, True])


def test_keypoint_cells_follow_pixel_centres():
  kps = np.array([[0.0, 0.0], [4.4, 0.0], [4.5, 9.0], [-0.5, 99.0]])
  cells = correspondence.ImageGrid(10, 10).cells(kps, (2, 2))
  np.testing.assert_array_equal(cells, [0, 0, 3, 2])  # x + 0.5 < 5 is column 0; rows clipped to the grid


# ---------------------------------------------------------------------------------------
# The evaluator end to end.
# ---------------------------------------------------------------------------------------

def check_metrics(metrics, prefixes):
  for prefix in prefixes:
    values = [metrics[f"{prefix}_pck{n}"] for n in ("05", "10", "15")]
    assert all(0.0 <= v <= 1.0 for v in values) and values == sorted(values), (prefix, values)
    assert 0.0 <= metrics[f"{prefix}_pck10_per_image"] <= 1.0
  assert len(metrics) == 4 * len(prefixes)


def test_synthetic_pairs_are_exact_warps(synthetic):
  pairs = correspondence.synthetic_pairs(seed=0, pairs_per_category=2)
  assert len(pairs) == 2 * len(correspondence.CATEGORIES)
  for pair in pairs:  # the same object point from both sides, on the object, showing the same colour
    np.testing.assert_allclose(pair["src_object"](pair["src_kps"]), pair["trg_object"](pair["trg_kps"]), atol=1e-9)
    colours = [correspondence.bilinear_points(pair[side].astype(float), pair[f"{side}_kps"]) for side in ("src", "trg")]
    assert np.abs(colours[0] - colours[1]).mean() < 20  # of 255; unrelated points differ by 20-130
    x1, y1, x2, y2 = pair["trg_bbox"]
    assert ((pair["trg_kps"] >= [x1 - 1, y1 - 1]) & (pair["trg_kps"] <= [x2 + 1, y2 + 1])).all()
  files = sorted((synthetic / "PairAnnotation" / "test").glob("*.json"))
  first = json.loads(files[0].read_text())
  np.testing.assert_allclose(first["trg_kps"], pairs[0]["trg_kps"])
  assert (synthetic / "features" / first["category"] / first["src_imname"].replace(".jpg", ".npy")).is_file()


def test_evaluator_on_synthetic_pairs(tiny, synthetic):
  metrics = run(tiny, evaluator_config(synthetic, features_dir=str(synthetic / "features")))
  check_metrics(metrics, ("correspondence", "correspondence_external", "correspondence_fused"))
  assert metrics["correspondence_external_pck10"] > 0.3  # colour context finds the object parts
  for overrides in (dict(match="mutual", pca_dim=8, pairs_per_category=1), dict(match="soft_argmax", grid=16)):
    check_metrics(run(tiny, evaluator_config(synthetic, features_dir=str(synthetic / "features"), **overrides)),
                  ("correspondence", "correspondence_external", "correspondence_fused"))
  check_metrics(run(tiny, evaluator_config(synthetic), params=False), ("correspondence",))  # raw pixels


def rbf_codes(points: np.ndarray, spacing: float = 16.0) -> np.ndarray:
  """Gaussian bumps of object coordinates on a lattice of anchors: cosine similarity peaks where
  the object points coincide."""
  axis = np.arange(-96.0, 200.0, spacing)
  anchors = np.stack(np.meshgrid(axis, axis), -1).reshape(-1, 2)
  return np.exp(-((points[:, None] - anchors[None]) ** 2).sum(-1) / (2 * spacing ** 2)).astype(np.float32)


@pytest.mark.parametrize("grid, image_size", [(64, 64), (0, 256)])  # a fine grid over the image; the canvas's
def test_oracle_features_score_perfectly(tiny, tmp_path, grid, image_size):
  correspondence.write_synthetic(tmp_path, seed=1, pairs_per_category=1)
  for pair in correspondence.synthetic_pairs(seed=1, pairs_per_category=1):  # features: the true object points
    for side in ("src", "trg"):
      h, w = pair[side].shape[:2]
      codes = rbf_codes(pair[f"{side}_object"](correspondence.pixel_centres(h, w)))
      np.save(tmp_path / "features" / pair["category"] / f"{pair[side + '_name']}.npy", codes.reshape(h, w, -1))
  ecfg = evaluator_config(tmp_path, features_dir=str(tmp_path / "features"), grid=grid, image_size=image_size)
  metrics = run(tiny, ecfg, params=False)  # raw pixels: cheap at 256 px
  assert metrics["correspondence_external_pck05"] == 1.0


def test_fusion_weight_zero_is_the_backbone_and_one_the_external_maps(tiny, synthetic):
  ecfg = functools.partial(evaluator_config, synthetic, features_dir=str(synthetic / "features"), grid=0)
  at_0, at_1 = run(tiny, ecfg(alpha=0.0)), run(tiny, ecfg(alpha=1.0))
  for n in ("05", "10", "15", "10_per_image"):
    assert at_0[f"correspondence_fused_pck{n}"] == at_0[f"correspondence_pck{n}"]
    assert at_1[f"correspondence_fused_pck{n}"] == at_1[f"correspondence_external_pck{n}"]


# ---------------------------------------------------------------------------------------
# Bad input: one UsageError line.
# ---------------------------------------------------------------------------------------

def rewrite_first_pair(root, **changes):
  file = sorted((root / "PairAnnotation" / "test").glob("*.json"))[0]
  d = json.loads(file.read_text())
  d.update(changes)
  file.write_text(json.dumps(d))
  return d


def expect_usage_error(fn, message):
  with pytest.raises(UsageError) as info:
    fn()
  assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("change, message", [
    (dict(trg_imname="missing.jpg"), "no image"),
    (dict(trg_kps=[[1.0, 2.0]]), "src_kps has 10 keypoints but trg_kps 1"),
    (dict(trg_bndbox=[5, 5, 1, 9]), "trg_bndbox must be [x1, y1, x2, y2]"),
    (dict(trg_kps=[[1.0, 1.0]] * 3 + [[1000.0, 2.0]] + [[1.0, 1.0]] * 6), "trg_kps[3] [1000.0, 2.0] lies outside the "),
    (dict(src_kps=[[-3.0, 1.0]] + [[1.0, 1.0]] * 9), "src_kps[0] [-3.0, 1.0] lies outside the "),
])
def test_bad_pairs_are_one_usage_error(tiny, tmp_path, change, message):
  correspondence.write_synthetic(tmp_path, seed=0, pairs_per_category=1, size=32, keypoints=10)
  rewrite_first_pair(tmp_path, **change)
  c, _ = tiny
  expect_usage_error(lambda: correspondence.CorrespondenceEvaluator.check("other", evaluator_config(tmp_path), c, True),
                     "evals.other.path: pair ")
  expect_usage_error(lambda: correspondence.CorrespondenceEvaluator(evaluator_config(tmp_path), c, None), message)


@pytest.mark.parametrize("fmap, message", [
    (lambda h, w: np.zeros((h, w)), "expected [h, w, C]"),
    (lambda h, w: np.zeros((h // 4, 0, 32)), "expected [h, w, C]"),
    (lambda h, w: np.ones((40, h // 4, w // 4)), "expected [h, w, C]"),  # channels first
    (lambda h, w: np.ones((h // 4, w // 4, 5)), "have 32 and 5 channels"),
    (lambda h, w: np.full((h // 4, w // 4, 32), np.nan), "non-finite"),
])
def test_bad_feature_maps_are_one_usage_error(tiny, tmp_path, fmap, message):
  correspondence.write_synthetic(tmp_path, seed=0, pairs_per_category=1, size=32)
  d = rewrite_first_pair(tmp_path)
  h, w = d["trg_imsize"][1], d["trg_imsize"][0]
  np.save(tmp_path / "features" / d["category"] / d["trg_imname"].replace(".jpg", ".npy"), fmap(h, w))
  for grid in (8, 0):
    ecfg = evaluator_config(tmp_path, features_dir=str(tmp_path / "features"), image_size=32, grid=grid)
    expect_usage_error(lambda: run(tiny, ecfg, params=False), message)


@pytest.mark.parametrize("maps, message", [
    ([np.ones((4, 0, 8)), np.ones((4, 4, 8))], "has shape (4, 0, 8); expected [h, w, C]"),
    ([np.ones((4, 4, 8)), np.ones((4, 4, 5))], "have 8 and 5 channels"),
    ([np.ones((4, 4, 8)), np.array([[["a"]]])], "non-finite or non-numeric"),
])
def test_bad_extra_features_of_the_pictures_are_one_usage_error(tmp_path, maps, message):
  paths = [str(tmp_path / "a.npy"), str(tmp_path / "b.npy")]
  for path, x in zip(paths, maps):
    np.save(path, x)
  expect_usage_error(lambda: pictures.read_extra_features(paths), message)


@pytest.mark.parametrize("overrides, message", [
    (dict(match="best"), "match must be one of nn, mutual, soft_argmax"),
    (dict(alpha=1.5), "alpha"),
    (dict(pck_alphas=(0.1, 0.105)), "pck_alphas"),
    (dict(pck_alphas=()), "pck_alphas"),
    (dict(grid=-1), "grid must be a non-negative int"),
    (dict(temperature=0), "temperature"),
    (dict(image_size=30), "image_size 30 is not a multiple of the patch size 4"),
    (dict(stride=3), "stride 3 does not divide the patch size 4"),
    (dict(facet="value"), "facet must be one of auto, token, key"),
    (dict(layer=2), "layer 2 is past the backbone's 2 blocks"),
    (dict(layer=-2), "layer must be a block index"),
    (dict(path="/nonexistent"), "is not a folder"),
    (dict(split="val"), "has no PairAnnotation/val/"),
    (dict(features_dir="/nonexistent"), "features_dir"),
    (dict(path=3), "evals.corr.path must be a string"),
    (dict(split=None), "evals.corr.split must be a string"),
    (dict(features_dir=False), "evals.corr.features_dir must be a string"),
])
def test_bad_config_is_one_usage_error(tiny, synthetic, overrides, message):
  c, _ = tiny
  ecfg = evaluator_config(synthetic, **overrides)
  expect_usage_error(lambda: correspondence.CorrespondenceEvaluator.check("corr", ecfg, c, True), message)


def test_backbone_features_are_the_last_block_before_the_final_norm(tiny, synthetic):
  """SD-DINO's extractor takes DINOv2's last block output before the final LayerNorm."""
  c, params = tiny
  ev = correspondence.CorrespondenceEvaluator(evaluator_config(synthetic), c, None)
  paths = sorted((synthetic / "JPEGImages").rglob("*.jpg"))[:1]
  maps, frames = ev.backbone_maps(params, paths)
  canvas = frames[paths[0]]
  image = canvas.place(common.read_rgb(paths[0]))[None]
  raw = ev.backbone(params, image, layers=1, final_norm=False)["intermediate"][0]["patch"][0]
  np.testing.assert_allclose(maps[paths[0]], raw, atol=1e-5)
  assert not np.allclose(maps[paths[0]], ev.backbone(params, image)["patch"][0], atol=1e-3)


# ---------------------------------------------------------------------------------------
# SD-DINO's extractor settings: facet, block, stride.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model,expected", [
    (dict(patch_size=8, depth=12, layerscale=None), dict(facet="key", block=9, stride=4, image_size=224)),
    (dict(patch_size=8, depth=12, layerscale=None, fused=True), dict(facet="key", block=9, stride=8, image_size=480)),
    (dict(patch_size=14, depth=12, layerscale=1e-5), dict(facet="token", block=11, stride=14, image_size=840)),
    (dict(patch_size=14, depth=24, layerscale=1e-5), dict(facet="token", block=23, stride=14, image_size=840)),
    (dict(patch_size=14, depth=40, layerscale=1e-5), dict(facet="token", block=39, stride=14, image_size=840)),
])
def test_descriptor_settings_are_sd_dinos_per_backbone(model, expected):
  """pck_spair_pascal.py: dino_vits8: the key facet of layer 9, DINO-only at stride 4 on 224 px,
  fused with SD at stride 8 on 480 px; DINOv2 ViT-S/B, L, g: the token facet of layer 11, 23, 39
  at stride 14 on 840 px."""
  cfg = defaults.base_config().model
  fused = model.pop("fused", False)
  cfg.update(model)
  ecfg = ml_collections.ConfigDict(defaults.base_config().evals.correspondence.to_dict())
  ecfg.features_dir = "/sd_features" if fused else ""
  assert correspondence.descriptor_settings(ecfg, cfg) == expected
  ecfg.update(facet="token", layer=5, stride=7, image_size=448)
  assert correspondence.descriptor_settings(ecfg, cfg) == dict(facet="token", block=5, stride=7, image_size=448)


def test_key_facet_is_the_blocks_attention_keys(tiny):
  """The key facet of block b: its LayerNorm'd input through qkv, the keys of every head on the
  patch tokens (the CLS token left out), channels d-major as SD-DINO's (d x heads) descriptors."""
  c, params = tiny
  features = common.DenseFeatures(c.model)
  x = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), np.uint8)
  module = features.module
  _, state = module.apply({"params": params}, augment.normalize(x), capture_intermediates=True)
  block_input = np.asarray(state["intermediates"]["block0"]["__call__"][0], np.float64)  # block 1's input
  p = params["block1"]
  mu = block_input.mean(-1, keepdims=True)
  normed = (block_input - mu) / np.sqrt(block_input.var(-1, keepdims=True) + 1e-6) * p["norm1"]["scale"] + p["norm1"]["bias"]
  keys = np.einsum("bnd,dhk->bnhk", normed, np.asarray(p["qkv"]["kernel"])[:, 1]) + np.asarray(p["qkv"]["bias"])[1]
  expected = keys[:, 1:].transpose(0, 1, 3, 2).reshape(2, 4, 4, -1)
  np.testing.assert_allclose(features.facet(params, x, "key", 1), expected, atol=1e-4)
  token = features.facet(params, x, "token", 0)
  np.testing.assert_allclose(token, block_input[:, 1:].reshape(2, 4, 4, -1), atol=1e-5)


def test_overlapping_patches_and_their_centres_as_sd_dino():
  """Stride s < patch p: a (S - p) / s + 1 grid (SD-DINO's num_patches = p / s (S // p - 1) + 1),
  keypoints on cell int(g x / S), predictions at j s + p // 2 - 0.5."""
  c = defaults.base_config()
  configs.make_tiny(c)
  features = common.DenseFeatures(c.model, patch_stride=2)
  params = features.module.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
  out = features.facet(params, np.zeros((1, 16, 16, 3), np.uint8), "token", 1)
  assert out.shape[1:3] == (7, 7) == (4 // 2 * (16 // 4 - 1) + 1,) * 2
  canvas = correspondence.Canvas(16, 16, 16, patch=4, stride=2)
  np.testing.assert_allclose(canvas.points(np.array([3]), np.array([0]), (7, 7)), [[1.5, 7.5]])
  assert canvas.cells(np.array([[15.0, 8.0]]), (7, 7))[0] == int(7 * 8 / 16) * 7 + int(7 * 15 / 16)


@pytest.mark.parametrize("fused, expected", [
    (False, dict(facet="key", block=0, stride=2, image_size=32)),
    (True, dict(facet="key", block=0, stride=4, image_size=32)),
])
def test_evaluator_on_synthetic_pairs_with_sd_dinos_dino_settings(tiny, synthetic, fused, expected):
  """A DINO backbone's defaults: the key facet of its third block from last (the tiny ViT's
  block 0), alone at half its patch as stride, fused at its patch with external maps co-PCA'd."""
  features_dir = str(synthetic / "features") if fused else ""
  ecfg = evaluator_config(synthetic, facet="auto", layer=-1, stride=0, features_dir=features_dir, pca_dim=8,
                          image_size=32)
  evaluator = correspondence.CorrespondenceEvaluator(ecfg, tiny[0], None)
  assert evaluator.settings == expected
  metrics = run(tiny, ecfg)
  assert all(0 <= v <= 1 for v in metrics.values())
  assert ("correspondence_fused_pck10" in metrics) == fused and "correspondence_pck10" in metrics
