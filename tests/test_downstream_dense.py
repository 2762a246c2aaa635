"""DINOv2's dense linear probes (dino_jax.evaluators.dense): the metrics, losses and schedules
against hand-computed answers, the probes end to end on the synthetic benchmark with a tiny
random-init backbone, and bad input as one UsageError."""
import math
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import common as config_common
from dino_jax import augment
from dino_jax import defaults
from dino_jax import evaluators
from dino_jax import sharding
from dino_jax.errors import UsageError
from dino_jax.evaluators import common
from dino_jax.evaluators import dense
from dino_jax.evaluators import depth
from dino_jax.evaluators import segmentation


def tiny():
  c = defaults.base_config()
  config_common.make_tiny(c)
  return c


def seg_config(data_path, **overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(dict(
      type="segmentation", every_steps=-1, path=str(data_path), num_classes=dense.SYNTHETIC_NUM_CLASSES,
      reduce_zero_label=True, ignore_index=255, n_last_blocks=1, cls_token=False, batch_norm=True, crop_size=32,
      ratio_range=(0.5, 2.0), flip=True, slide_stride=21, steps=120, batch_size=8, learning_rate=3e-2,
      weight_decay=1e-4, warmup_steps=5, warmup_ratio=1e-6, schedule="poly", min_lr_ratio=0.0, grad_clip=0.0,
      seed=0), **overrides))


def depth_config(data_path, **overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(dict(
      type="depth", every_steps=-1, path=str(data_path), head="classify", bins=256, n_blocks=1, cls_token=True,
      upsample=4, min_depth=1e-3, max_depth=10.0, depth_scale=1000.0, crop_size=(32, 32), flip=True,
      flip_test=True, eigen_crop=False, steps=120, batch_size=8, learning_rate=3e-2, weight_decay=0.01,
      warmup_steps=5, warmup_ratio=1e-3, schedule="cosine", min_lr_ratio=1e-8, grad_clip=35.0,
      sigloss_warmup_steps=5, loss_group=2, gradient_loss_weight=0.0, seed=0), **overrides))


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
  out = tmp_path_factory.mktemp("dense")
  dense.write_synthetic(out, seed=0, size=32, train=16, test=8)
  return out


@pytest.fixture(scope="module")
def backbone():
  c = tiny()
  params = common.DenseFeatures(c.model).module.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
  return c, sharding.make_mesh(c), params["params"]


# ---------------------------------------------------------------------------------------
# Metrics, losses, schedules by hand.
# ---------------------------------------------------------------------------------------

def test_miou_and_pixel_accuracy_by_hand():
  # 5 classes: 3 only predicted (IoU 0, counted), 4 nowhere (left out of the mean); 255 ignored
  # (the prediction 0 under it does not count).
  label1, pred1 = np.array([[0, 0, 1], [1, 255, 2]]), np.array([[0, 1, 1], [1, 0, 3]])
  label2, pred2 = np.array([[2, 2]]), np.array([[2, 0]])
  totals = segmentation.intersect_and_union(pred1, label1, 5, 255) + segmentation.intersect_and_union(pred2, label2, 5, 255)
  # class 0: I 1, U 2 + 2 - 1 = 3; class 1: I 2, U 3 + 2 - 2 = 3; class 2: I 1, U 1 + 3 - 1 = 3; class 3: I 0, U 1.
  np.testing.assert_array_equal(totals[0], [1, 2, 1, 0, 0])
  np.testing.assert_array_equal(totals[1], [3, 3, 3, 1, 0])
  scores = segmentation.segmentation_scores(totals)
  assert scores["seg_miou"] == pytest.approx((1 / 3 + 2 / 3 + 1 / 3 + 0) / 4)
  assert scores["seg_pixel_acc"] == pytest.approx(4 / 7)  # 4 right of 7 labelled pixels, over the whole set


def test_reduce_zero_label_as_mmseg():
  raw = np.array([[0, 1, 2], [255, 151, 1]])
  np.testing.assert_array_equal(segmentation.reduce_zero_label(raw, 255), [[255, 0, 1], [255, 150, 0]])


def test_depth_metrics_per_image_then_mean_by_hand():
  gt1, pred1 = np.array([[1.0, 2.0], [0.0, 4.0]]), np.array([[1.5, 2.0], [3.0, 2.0]])  # 0: no depth
  gt2, pred2 = np.array([[12.0, 2.0]]), np.array([[5.0, 2.4]])  # 12 m: past max_depth 10
  gt3 = np.zeros((2, 2))  # nothing valid: left out of the mean
  errors = [depth.depth_errors(p, g, 1e-3, 10.0) for p, g in ((pred1, gt1), (pred2, gt2), (gt3, gt3))]
  assert np.isnan(errors[2]).all()
  scores = depth.depth_scores(errors)
  assert scores["depth_rmse"] == pytest.approx((math.sqrt((0.25 + 0 + 4) / 3) + 0.4) / 2)
  assert scores["depth_abs_rel"] == pytest.approx((1 / 3 + 0.2) / 2)  # (0.5/1 + 0 + 2/4) / 3 and 0.4/2
  assert scores["depth_delta1"] == pytest.approx((1 / 3 + 1) / 2)  # ratios 1.5, 1, 2 and 1.2


def test_eigen_crop_is_nyu_rows_45_471_columns_41_601_scaled_inwards_on_4_3_and_refused_otherwise():
  assert depth.eigen_box((480, 640), "x.png") == (45, 471, 41, 601)
  # 240x320 (NYU halved): 22.5 -> 23, 235.5 -> 235, 20.5 -> 21, 300.5 -> 300 (never a border pixel).
  assert depth.eigen_box((240, 320), "x.png") == (23, 235, 21, 300)
  with pytest.raises(UsageError, match="x.png' is 64x64, not 4:3"):
    depth.eigen_box((64, 64), "x.png")
  gt = np.full((480, 640), 2.0)
  pred = gt.copy()
  pred[:45] = pred[471:] = pred[:, :41] = pred[:, 601:] = 9.0  # wrong only outside the crop
  pred[45, 41] = pred[470, 600] = 2.5  # the crop's corner pixels: inside (426 x 560 pixels)
  expected = math.sqrt(2 * 0.25 / (426 * 560))
  assert depth.depth_errors(pred, gt, 1e-3, 10.0, depth.eigen_box(gt.shape, ""))[0] == pytest.approx(expected)
  assert depth.depth_errors(pred, gt, 1e-3, 10.0)[0] > 1.0


def test_no_valid_pixel_in_the_whole_test_set_is_one_usage_error():
  with pytest.raises(UsageError, match="check depth_scale"):
    depth.depth_scores([np.full(3, np.nan)] * 2)
  with pytest.raises(UsageError, match="no labelled pixel"):
    segmentation.segmentation_scores(segmentation.intersect_and_union(np.zeros((2, 2)), np.full((2, 2), 255), 3, 255))


def test_cross_entropy_counts_ignored_pixels_as_zero_in_the_mean_like_mmseg():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))  # [1, 3, K]
  labels = jnp.array([[0, 1, 255]])
  expected = (-math.log(0.5) - math.log(0.8) + 0) / 3
  assert float(segmentation.cross_entropy(logits, labels, 255)) == pytest.approx(expected, rel=1e-6)


def test_probe_inputs_concatenate_cls_after_patch_tokens_and_resize_to_the_first_grid():
  first = {"patch": jnp.arange(8.0).reshape(1, 2, 2, 2), "embedding": jnp.array([[10.0, 20.0]])}
  coarse = {"patch": jnp.full((1, 1, 1, 2), 7.0), "embedding": jnp.array([[30.0, 40.0]])}
  x = np.asarray(dense.probe_inputs({"intermediate": [first, coarse]}, (0, 1), cls_token=True))
  assert x.shape == (1, 2, 2, 8)
  np.testing.assert_array_equal(x[0, 1, 0], [4, 5, 10, 20, 7, 7, 30, 40])  # patch, its CLS, the next block's
  no_cls = np.asarray(dense.probe_inputs(first, None, cls_token=False))
  np.testing.assert_array_equal(no_cls, np.arange(8.0).reshape(1, 2, 2, 2))


def test_resize_is_torch_bilinear_without_align_corners():
  """Against common.resize_bilinear (checked against torch's F.interpolate), up and down, and
  one value by hand: 2 -> 4 samples at source -0.25 (clamped to 0), 0.25, 0.75, 1.25 (to 1)."""
  np.testing.assert_allclose(np.ravel(dense.resize(jnp.array([0.0, 4.0]).reshape(1, 1, 2, 1), (1, 4))),
                             [0, 1, 3, 4], atol=1e-6)
  x = np.random.default_rng(0).normal(size=(9, 13, 3)).astype(np.float32)
  for size in ((20, 31), (4, 5), (9, 26)):
    np.testing.assert_allclose(dense.resize(jnp.asarray(x)[None], size)[0], common.resize_bilinear(x, size),
                               atol=1e-5)


def test_random_crop_pads_bottom_right_with_the_mean_color_and_the_fill_label():
  image, target = np.full((2, 3, 3), 200, np.uint8), np.ones((2, 3), np.int32)
  out, labels = dense.random_crop(np.random.default_rng(0), image, target, (3, 4), 255, flip=False)
  np.testing.assert_array_equal(labels, [[1, 1, 1, 255], [1, 1, 1, 255], [255] * 4])
  np.testing.assert_array_equal(out[2, 0], [124, 116, 104])  # round(255 x ImageNet mean)
  np.testing.assert_array_equal(out[0, 0], [200, 200, 200])
  np.testing.assert_allclose(augment.normalize(out[2:, :1]), np.zeros((1, 1, 3)), atol=0.02)  # ~0 as mmseg's pad


def test_sig_loss_bins_and_gradient_loss_by_hand():
  eps = 1e-3
  gt = jnp.array([[1 - eps, 1 - eps, 1 - eps, 0.0]])  # the last pixel has no depth
  pred = jnp.array([[math.e - eps, math.e ** 2 - eps, math.e ** 3 - eps, 7.0]])  # g = 1, 2, 3
  assert float(depth.sig_loss(pred, gt, False)) == pytest.approx(math.sqrt(1.0 + 0.15 * 4), rel=1e-5)
  assert float(depth.sig_loss(pred, gt, True)) == pytest.approx(math.sqrt(0.15 * 4), rel=1e-5)
  # Per group of 2 images (the official per-GPU batch), averaged: group 0 (images 0-1) has g = 1, 3, 0, 0
  # (mean 1, unbiased Var 6 / 3), group 1 (images 2-3) g = 1, 1, 1, 1 (mean 1, Var 0); one group of 4 is sig_loss.
  g = jnp.array([[1.0, 3.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
  ones = jnp.ones_like(g) - eps
  pred4 = jnp.exp(g) * (ones + eps) - eps
  group0 = math.sqrt(((1 - 1) ** 2 + (3 - 1) ** 2 + 1 + 1) / 3 + 0.15 * 1.0)
  group1 = math.sqrt(0.15 * 1.0)
  assert float(depth.grouped_sig_loss(pred4, ones, False, 2)) == pytest.approx((group0 + group1) / 2, rel=1e-5)
  assert float(depth.grouped_sig_loss(pred4, ones, False, 4)) == pytest.approx(
      float(depth.sig_loss(pred4, ones, False)), rel=1e-6)
  # A group without any depth adds 0 and a finite gradient (not NaN through sqrt(0)).
  empty = ones.at[2:].set(0.0)
  grad = jax.grad(lambda p: depth.grouped_sig_loss(p, empty, False, 2))(pred4)
  assert np.isfinite(np.asarray(grad)).all() and not np.asarray(grad)[2:].any()
  # 3 bins on [1, 3]: (relu(l) + 0.1) / sum weights the centres 1, 2, 3.
  logits = jnp.array([[[[1.0, -1.0, 0.0]]]])
  assert float(depth.depth_from_logits(logits, "classify", 1.0, 3.0)[0, 0, 0]) == pytest.approx(1.6 / 1.3)
  assert float(depth.depth_from_logits(logits, "regression", 1.0, 3.0)[0, 0, 0]) == pytest.approx(2.0)
  # A log-depth error that is constant has no gradient; one step of ln 2 two columns apart does.
  ones = jnp.ones((1, 3, 3))
  assert float(depth.gradient_loss(2 * ones - eps, ones - eps)) == pytest.approx(0.0, abs=1e-6)
  step = jnp.array([[[1.0, 1.0, 2.0]] * 3]) - eps
  # stride 1: 3 horizontal pairs |0 - ln 2| over 9 pixels; strides 2, 4, 6 leave one column.
  assert float(depth.gradient_loss(step, ones - eps)) == pytest.approx(3 * math.log(2) / 9, rel=1e-5)


def test_mmcv_schedules_and_sliding_windows_by_hand():
  poly = dense.lr_schedule(1.0, 10, 4, 0.0, "poly")
  assert [float(poly(s)) for s in (0, 2, 4, 10)] == pytest.approx([0.0, 0.8 * 0.5, 0.6, 0.0])
  cosine = dense.lr_schedule(2.0, 10, 0, 1e-3, "cosine", min_ratio=0.5)
  assert [float(cosine(s)) for s in (0, 5, 10)] == pytest.approx([2.0, 1.5, 1.0])
  assert segmentation.slide_windows(32, 43, 32, 21) == ((0, 0), (0, 11))
  assert segmentation.slide_windows(512, 683, 512, 341) == ((0, 0), (0, 171))
  assert segmentation.slide_windows(700, 600, 512, 341) == ((0, 0), (0, 88), (188, 0), (188, 88))  # rows last, clamped
  assert dense.crop_size(512, 14) == (518, 518) and dense.crop_size((416, 544), 16) == (416, 544)
  assert dense.block_picks(4, 12, spaced=True) == (10, (0, 3, 6, 9))  # blocks 3, 6, 9, 12
  assert dense.block_picks(4, 12, spaced=False) == (4, (0, 1, 2, 3))  # blocks 9..12
  assert dense.block_picks(1, 12, spaced=True) == (0, None)
  assert dense.block_picks(4, 24, spaced=True) == (20, (0, 7, 13, 19))  # ViT-L: blocks 5, 12, 18, 24 (official)
  assert dense.block_picks(4, 40, spaced=True) == (31, (0, 10, 20, 30))  # ViT-g: blocks 10, 20, 30, 40


def test_batch_norm_trains_on_batch_statistics_and_tests_on_running_ones():
  x = jnp.array([1.0, 2.0, 3.0, 6.0]).reshape(2, 1, 2, 1)  # mean 3, variance 3.5 (biased), 14/3 unbiased
  bn, stats = {"scale": jnp.ones(1), "bias": jnp.zeros(1)}, {"mean": jnp.zeros(1), "var": jnp.ones(1)}
  y, new = dense.batch_norm(x, bn, stats, train=True)
  np.testing.assert_allclose(np.ravel(y), (np.array([1, 2, 3, 6]) - 3) / math.sqrt(3.5 + 1e-5), rtol=1e-5)
  np.testing.assert_allclose(new["mean"], [0.3], rtol=1e-6)
  np.testing.assert_allclose(new["var"], [0.9 + 0.1 * 14 / 3], rtol=1e-6)
  y, same = dense.batch_norm(x, bn, new, train=False)
  np.testing.assert_allclose(np.ravel(y), (np.array([1, 2, 3, 6]) - 0.3) / np.sqrt(new["var"] + 1e-5), rtol=1e-5)
  assert same is new


# ---------------------------------------------------------------------------------------
# The probes end to end.
# ---------------------------------------------------------------------------------------

def test_write_synthetic_layout_and_known_values(synthetic, tmp_path):
  for folder, count in (("images/training", 16), ("annotations/validation", 8), ("images/test", 8),
                        ("depth/train", 16)):
    assert len(list((synthetic / folder).iterdir())) == count
  masks = [np.asarray(Image.open(p)) for p in sorted((synthetic / "annotations/training").iterdir())]
  assert set(np.unique(np.stack(masks))) <= set(range(2 + len(dense.SYNTHETIC_GROUPS)))
  assert all((m >= 2).any() for m in masks)  # every scene has an item
  with Image.open(synthetic / "depth/train/scene_0000.png") as depth_png:
    assert depth_png.mode == "I;16"
    depth = np.asarray(depth_png) / 1000.0
  assert depth.max() <= dense.TERRAIN_DEPTH[1] + 1e-3 and depth[depth > 0].min() >= dense.ITEM_DEPTH[0] - 1e-3
  dense.write_synthetic(tmp_path, seed=0, size=32, train=16, test=8)
  assert (tmp_path / "annotations/validation/scene_0007.png").read_bytes() == (
      synthetic / "annotations/validation/scene_0007.png").read_bytes()


def test_segmentation_probe_learns_synthetic_scenes(synthetic, backbone):
  c, mesh, params = backbone
  ecfg = seg_config(synthetic, n_last_blocks=2)
  segmentation.SegmentationEvaluator.check("seg", ecfg, c, True)
  evaluator = segmentation.SegmentationEvaluator(ecfg, c, mesh)
  state, losses = evaluator.train(params)
  assert losses[-10:].mean() < 0.5 * losses[:10].mean()
  scores = evaluator.score(state, params)
  # Chance: everything background, IoU = background share for it, 0 for the classes present.
  raw = np.concatenate([np.ravel(np.asarray(Image.open(p)).astype(int))
                        for p in sorted((synthetic / "annotations/validation").iterdir())])
  labels = np.where(raw == 0, 255, raw - 1)  # ADE20K's reduce_zero_label by hand
  labels = labels[labels != 255]
  chance = np.mean(labels == 0) / len(np.unique(labels))
  assert scores["seg_miou"] > chance + 0.1, (scores, chance)
  assert scores["seg_pixel_acc"] > np.mean(labels == 0), scores
  assert evaluator.run(None) == {}


def test_segmentation_probe_on_perfect_features_scores_perfectly(tmp_path, backbone):
  """Features that carry the class (each pixel one color of five in convex position, the features
  its normalized color on the pixel grid): the whole pipeline (crops, windows, logit averaging,
  metric) is exact. (On a coarser grid the bilinear upsampling of logits blurs class borders.)"""
  c, mesh, params = backbone
  palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0], [255, 255, 255]], np.uint8)
  rng = np.random.default_rng(0)
  for split, count, width in (("training", 8, 8), ("validation", 4, 12)):  # validation: two sliding windows
    (tmp_path / "images" / split).mkdir(parents=True)
    (tmp_path / "annotations" / split).mkdir(parents=True)
    for i in range(count):
      labels = np.kron(rng.integers(0, 5, (16, 2 * width)), np.ones((2, 2), int)).astype(np.uint8)
      Image.fromarray(palette[labels]).save(tmp_path / "images" / split / f"{i}.png")
      Image.fromarray(labels).save(tmp_path / "annotations" / split / f"{i}.png")
  ecfg = seg_config(tmp_path, num_classes=5, reduce_zero_label=False, ratio_range=(1.0, 1.0), steps=150,
                    learning_rate=0.1)
  evaluator = segmentation.SegmentationEvaluator(ecfg, c, mesh)
  evaluator.inputs = lambda params, images: augment.normalize(images)
  state, _ = evaluator.train(params)
  assert evaluator.score(state, params) == {"seg_miou": 1.0, "seg_pixel_acc": 1.0}
  # At test time the BatchNorm uses the running statistics, not the windows' own: a hand-set head.
  stats = {"mean": jnp.array([1.0, 0.0, 0.0]), "var": jnp.array([4.0, 1.0, 1.0])}
  head = {"kernel": jnp.eye(3, 5), "bias": jnp.zeros(5), "bn": {"scale": jnp.ones(3), "bias": jnp.zeros(3)}}
  windows = np.asarray(Image.open(tmp_path / "images/validation/0.png"))[None, :, :32]
  logits = evaluator.window_logits({"head": head, "stats": stats}, params, windows)
  expected = (augment.normalize(windows)[..., 0] - 1.0) / math.sqrt(4.0 + 1e-5)
  np.testing.assert_allclose(logits[..., 0], expected, rtol=1e-5, atol=1e-5)


def test_merge_windows_places_windows_at_row_column_corners():
  """A 2x3 view, 2x2 windows at (0, 0) and (0, 1): the first says class 0 (score 1), the second
  class 2 (score 3); their overlap (column 1) averages to class 2."""
  logits = np.zeros((2, 2, 2, 3), np.float32)
  logits[0, ..., 0], logits[1, ..., 2] = 1.0, 3.0
  ids = segmentation.merge_windows(jnp.asarray(logits), ((0, 0), (0, 1)), (2, 3), (2, 3))
  np.testing.assert_array_equal(ids, [[0, 2, 2], [0, 2, 2]])
  np.testing.assert_array_equal(segmentation.merge_windows(jnp.asarray(logits), ((0, 0), (0, 1)), (2, 3), (4, 6))[:, 0],
                                [0] * 4)  # resized to the label map


def test_depth_prediction_flips_back_the_flipped_view(synthetic, backbone):
  """A per-pixel regression head on the normalized red channel: the flipped view's prediction,
  flipped back, is the same map, so the flip-averaged prediction equals the hand formula."""
  c, mesh, params = backbone
  image = np.zeros((1, 32, 32, 3), np.uint8)
  image[..., 0] = np.arange(32) * 8  # a left-to-right ramp
  expected = np.clip((image[0, ..., 0] / 255 - 0.485) / 0.229 + 3.0, 0, None) + 1e-3
  for flip_test in (False, True):
    evaluator = depth.DepthEvaluator(depth_config(synthetic, head="regression", upsample=1, flip_test=flip_test),
                                     c, mesh)
    evaluator.inputs = lambda params, images: augment.normalize(images)
    state = {"head": {"kernel": jnp.array([[1.0], [0.0], [0.0]]), "bias": jnp.array([3.0])}}
    np.testing.assert_allclose(evaluator.predict(state, params, image, (32, 32)), expected, rtol=1e-5)


def test_depth_probe_learns_synthetic_terrain(synthetic, backbone):
  c, mesh, params = backbone
  ecfg = depth_config(synthetic)
  depth.DepthEvaluator.check("depth", ecfg, c, True)
  evaluator = depth.DepthEvaluator(ecfg, c, mesh)
  state, losses = evaluator.train(params)
  assert losses[-10:].mean() < losses[ecfg.sigloss_warmup_steps:ecfg.sigloss_warmup_steps + 10].mean()
  scores = evaluator.score(state, params)
  # Chance: the training pixels' mean depth everywhere.
  read = lambda folder: [np.asarray(Image.open(p)) / 1000.0 for p in sorted((synthetic / folder).iterdir())]
  mean = np.mean(np.concatenate([d[d > 0] for d in read("depth/train")]))
  chance = np.mean([np.sqrt(np.mean((d[d > 0] - mean) ** 2)) for d in read("depth/test")])
  assert scores["depth_rmse"] < 0.7 * chance, (scores, chance)
  assert 0 < scores["depth_abs_rel"] < 1 and 0.5 < scores["depth_delta1"] <= 1


def test_depth_regression_head_on_spaced_blocks_with_gradient_loss(synthetic, backbone):
  """The other options run end to end (this few steps learn little: the regression head starts
  near min_depth and its relu stops pixels it drives below 0, as the official one)."""
  c, mesh, params = backbone
  ecfg = depth_config(synthetic, head="regression", n_blocks=2, steps=20, learning_rate=3e-3,
                      gradient_loss_weight=0.5, flip_test=False)
  evaluator = depth.DepthEvaluator(ecfg, c, mesh)
  assert evaluator.picks == (0, 1)
  state, losses = evaluator.train(params)
  assert losses.shape == (20,) and np.isfinite(losses).all()
  scores = evaluator.score(state, params)
  assert scores["depth_rmse"] > 0 and scores["depth_abs_rel"] > 0 and 0 <= scores["depth_delta1"] <= 1
  # The square synthetic maps are no NYU frames: the Eigen crop is refused before training.
  one_line_error(lambda: depth.DepthEvaluator(depth_config(synthetic, eigen_crop=True), c, mesh),
                 "eigen_crop is NYU's crop .* is 32x32, not 4:3")


# ---------------------------------------------------------------------------------------
# Bad input: one UsageError line.
# ---------------------------------------------------------------------------------------

def copy_split(src: pathlib.Path, dst: pathlib.Path, folders) -> None:
  for folder in folders:
    (dst / folder).mkdir(parents=True, exist_ok=True)
    for p in sorted((src / folder).iterdir())[:8]:
      (dst / folder / p.name).write_bytes(p.read_bytes())


def one_line_error(fn, match: str):
  with pytest.raises(UsageError, match=match) as e:
    fn()
  assert "\n" not in str(e.value)


SEG_FOLDERS = ("images/training", "annotations/training", "images/validation", "annotations/validation")
DEPTH_FOLDERS = ("images/train", "depth/train", "images/test", "depth/test")


def test_bad_segmentation_data_is_one_usage_error(synthetic, backbone, tmp_path):
  c, mesh, _ = backbone
  copy_split(synthetic, tmp_path, SEG_FOLDERS)
  make = lambda: segmentation.SegmentationEvaluator(seg_config(tmp_path), c, mesh)
  mask = tmp_path / "annotations/training/scene_0001.png"
  saved = mask.read_bytes()
  mask.unlink()
  one_line_error(make, "images/training/scene_0001.jpg has no annotations/training/scene_0001.png")
  Image.fromarray(np.ones((16, 16), np.uint8)).save(mask)
  one_line_error(lambda: make().training_view(1, 0, 0), "is 16x16 but its image .* is 32x32")
  Image.fromarray(np.ones((32, 32, 3), np.uint8)).save(mask)
  one_line_error(lambda: make().training_view(1, 0, 0), "not one channel of class ids")
  Image.fromarray(np.full((32, 32), 9, np.uint8)).save(mask)
  one_line_error(lambda: make().training_view(1, 0, 0), "class id 8 .* not below num_classes 5")
  mask.write_bytes(saved)
  (tmp_path / "annotations/validation/extra.png").write_bytes(saved)
  one_line_error(make, "annotations/validation/extra.png has no image")


def test_bad_depth_data_is_one_usage_error(synthetic, backbone, tmp_path):
  c, mesh, _ = backbone
  copy_split(synthetic, tmp_path, DEPTH_FOLDERS)
  evaluator = depth.DepthEvaluator(depth_config(tmp_path), c, mesh)
  depth_map = tmp_path / "depth/train/scene_0002.png"
  depth_map.write_bytes(b"not a png")
  one_line_error(lambda: evaluator.training_view(2, 0, 0), "cannot read depth map .*scene_0002.png")
  depth_map.unlink()
  np.save(tmp_path / "depth/train/scene_0002.npy", np.full((32, 32), 2.5, np.float32))  # metres as stored
  assert np.all(evaluator.read_target(tmp_path / "depth/train/scene_0002.npy") == 2.5)
  np.save(tmp_path / "depth/train/scene_0002.npy", np.full((32, 31), 2.5, np.float32))
  one_line_error(lambda: depth.DepthEvaluator(depth_config(tmp_path), c, mesh).training_view(2, 0, 0),
                 "is 31x32 but its image")
  (tmp_path / "depth/test/scene_0003.png").unlink()
  one_line_error(lambda: depth.DepthEvaluator(depth_config(tmp_path), c, mesh),
                 "images/test/scene_0003.png has no depth/test/scene_0003.png")


@pytest.mark.parametrize("kind, overrides, match", [
    ("seg", dict(crop_size=0), "crop_size must be a positive int"),
    ("seg", dict(slide_stride=40), "slide_stride 40 is larger than crop_size 32"),
    ("seg", dict(ratio_range=(2.0, 1.0)), "ratio_range must be"),
    ("seg", dict(n_last_blocks=3), "n_last_blocks 3 asks for more blocks than the backbone's 2"),
    ("seg", dict(schedule="step"), "schedule must be 'poly'"),
    ("seg", dict(path="/nonexistent"), "path must be the benchmark folder"),
    ("seg", dict(learning_rate=0), "learning_rate must be a positive number"),
    ("seg", dict(path=5), "evals.seg.path must be a string, not 5"),
    ("seg", dict(seed="1"), "seed must be a non-negative int"),
    ("seg", dict(min_lr_ratio=-1.0), "min_lr_ratio must be a number >= 0"),
    ("seg", dict(reduce_zero_label="yes"), "reduce_zero_label must be true or false"),
    ("depth", dict(max_depth=float("inf")), "evals.depth.max_depth must be a positive number, not inf"),
    ("depth", dict(path=None), "evals.depth.path must be a string, not None"),
    ("depth", dict(head="bins"), "head must be 'classify'"),
    ("depth", dict(min_depth=11.0), "min_depth 11.0 must be below max_depth 10.0"),
    ("depth", dict(crop_size=(32,)), "crop_size must be \\(height, width\\)"),
    ("depth", dict(bins=1), "bins must be an int >= 2"),
])
def test_bad_configs_are_one_usage_error(synthetic, kind, overrides, match):
  c = tiny()
  make, evaluator = (seg_config, segmentation.SegmentationEvaluator) if kind == "seg" else (depth_config, depth.DepthEvaluator)
  ecfg = make(synthetic, **overrides)  # `path` among the overrides replaces synthetic's
  one_line_error(lambda: evaluator.check(kind, ecfg, c, True), match)


def test_missing_layout_folder_is_named(tmp_path):
  (tmp_path / "images/training").mkdir(parents=True)
  one_line_error(lambda: segmentation.SegmentationEvaluator.check("seg", seg_config(tmp_path), tiny(), True),
                 "^evals.seg.path: .* has no annotations/training/ folder")


def test_check_names_the_eval_in_layout_errors_and_batches_split_over_devices(synthetic, tmp_path):
  copy_split(synthetic, tmp_path, SEG_FOLDERS)
  (tmp_path / "annotations/training/scene_0003.png").unlink()
  one_line_error(lambda: segmentation.SegmentationEvaluator.check("ade_lin4", seg_config(tmp_path), tiny(), True),
                 "^evals.ade_lin4.path: image images/training/scene_0003.jpg has no annotations/training/")
  segmentation.SegmentationEvaluator.check("ade_lin4", seg_config(tmp_path), tiny(), False)  # disabled: no data needed
  assert segmentation.SegmentationEvaluator.shards_batches and depth.DepthEvaluator.shards_batches
  one_line_error(lambda: evaluators.check_one("nyu", depth_config(synthetic, batch_size=6), tiny(), 4),
                 "evals.nyu.batch_size 6 is not divisible by the 4 devices")


def test_one_name_under_two_suffixes_is_one_usage_error(synthetic, tmp_path):
  copy_split(synthetic, tmp_path, DEPTH_FOLDERS)
  np.save(tmp_path / "depth/test/scene_0001.npy", np.ones((32, 32), np.float32))  # beside scene_0001.png
  one_line_error(lambda: depth.DepthEvaluator.check("nyu", depth_config(tmp_path), tiny(), True),
                 "evals.nyu.path: 'scene_0001.npy' and 'scene_0001.png' .* the same <name> twice")
  (tmp_path / "depth/test/scene_0001.npy").unlink()
  (tmp_path / "images/test/scene_0001.jpg").write_bytes((tmp_path / "images/test/scene_0001.png").read_bytes())
  one_line_error(lambda: depth.DepthEvaluator.check("nyu", depth_config(tmp_path), tiny(), True),
                 "'scene_0001.jpg' and 'scene_0001.png' .* the same <name> twice")


def test_depth_takes_the_last_block_before_the_final_norm_and_segmentation_after(synthetic, backbone):
  """DINOv2's depth heads read get_intermediate_layers(norm=False), its segmentation head the
  normed output: each probe's input is the matching map of the backbone."""
  c, mesh, params = backbone
  images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
  module = common.DenseFeatures(c.model).module
  raw = module.apply({"params": params}, augment.normalize(images), layers=1, final_norm=False)["intermediate"][0]
  normed = module.apply({"params": params}, augment.normalize(images))
  depth_probe = depth.DepthEvaluator(depth_config(synthetic), c, mesh)
  np.testing.assert_allclose(depth_probe.inputs(params, images)[..., :raw["patch"].shape[-1]], raw["patch"], atol=1e-5)
  seg = segmentation.SegmentationEvaluator(seg_config(synthetic), c, mesh)
  np.testing.assert_allclose(seg.inputs(params, images), normed["patch"], atol=1e-5)
