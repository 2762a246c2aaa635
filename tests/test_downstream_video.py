"""DAVIS video label propagation (dino_jax.evaluators.video): the J and F measures on hand-made
masks, the propagation steps on hand-made numbers, an oracle, the evaluator end to end on the
synthetic benchmark, and bad input."""
import math
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import common as config_common
from dino_jax import defaults
from dino_jax.errors import UsageError
from dino_jax.evaluators import common
from dino_jax.evaluators import video_propagation


def ecfg(path="", **overrides) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(dict(dict(
      type="video_propagation", every_steps=-1, every_epochs=0.0,
      path=str(path) if isinstance(path, pathlib.Path) else path, resolution="480p", split="val",
      scale_size=64, n_last_frames=7, topk=5, size_mask_neighborhood=12, temperature=0.1, bound_th=0.008),
      **overrides))


def square(top, left, size, shape=(100, 100)) -> np.ndarray:
  m = np.zeros(shape, bool)
  m[top:top + size, left:left + size] = True
  return m


# ---------------------------------------------------------------------------------------
# J and F on hand-made masks.
# ---------------------------------------------------------------------------------------

def test_jaccard_of_two_overlapping_squares():
  # 10x10 squares, one shifted down 5 rows: overlap 50 pixels, union 150.
  assert video_propagation.jaccard(square(0, 0, 10), square(5, 0, 10)) == pytest.approx(1 / 3)
  assert video_propagation.jaccard(square(0, 0, 10), square(50, 50, 10)) == 0.0
  empty = np.zeros((100, 100), bool)
  assert video_propagation.jaccard(empty, empty) == 1.0  # DAVIS: an absent object correctly absent


def test_boundary_of_a_square_is_the_ring_one_pixel_up_and_left():
  # seg2bmap marks a pixel differing from its right / lower / lower-right neighbour: for the
  # square rows/cols 20..39 that is the border of the 21x21 square rows/cols 19..39 (80 pixels).
  b = video_propagation.boundaries(square(20, 20, 20))
  ring = square(19, 19, 21) & ~square(20, 20, 19)
  assert b.sum() == 80
  np.testing.assert_array_equal(b, ring)


def test_dilation_by_a_disk():
  point = np.zeros((9, 9), bool)
  point[4, 4] = True
  # x² + y² <= 4: the centre, 4 at distance 1, 4 diagonal (√2), 4 at distance 2 -> 13 pixels.
  d = video_propagation.dilate(point, 2)
  assert d.sum() == 13
  assert d[4, 2] and d[2, 4] and d[5, 5] and not d[2, 3] and not d[6, 6]
  corner = np.zeros((9, 9), bool)
  corner[0, 0] = True
  # only the quarter inside the image: (0,0) (0,1) (0,2) (1,0) (1,1) (2,0).
  assert video_propagation.dilate(corner, 2).sum() == 6


def test_boundary_f_within_and_beyond_the_tolerance():
  # 100x100: tolerance ceil(0.008 * 100√2) = ceil(1.13) = 2 pixels. Half planes cols >= 50 and
  # cols >= 50 + shift: boundaries are the full columns 49 and 49 + shift.
  assert video_propagation.boundary_radius((100, 100), 0.008) == 2
  gt = np.zeros((100, 100), bool)
  gt[:, 50:] = True
  for shift, expected in ((0, 1.0), (1, 1.0), (2, 1.0), (3, 0.0), (10, 0.0)):
    pred = np.zeros((100, 100), bool)
    pred[:, 50 + shift:] = True
    assert video_propagation.boundary_f(gt, pred) == pytest.approx(expected), shift
    assert video_propagation.jaccard(gt, pred) == pytest.approx((50 - shift) / 50)


def test_boundary_tolerance_in_pixels_from_one():
  # bound_th >= 1 is a pixel count, whatever the image size: 3 px on 100x100 (where 0.008 gives
  # 2) and 1 px on 1000x1000 (where 0.008 gives ceil(11.3) = 12). With 3 px, the half plane
  # shifted 3 columns is within the tolerance, 4 columns is not.
  assert video_propagation.boundary_radius((100, 100), 3) == 3
  assert video_propagation.boundary_radius((1000, 1000), 1) == 1
  assert video_propagation.boundary_radius((1000, 1000), 0.008) == 12
  gt = np.zeros((100, 100), bool)
  gt[:, 50:] = True
  for shift, expected in ((3, 1.0), (4, 0.0)):
    pred = np.zeros((100, 100), bool)
    pred[:, 50 + shift:] = True
    assert video_propagation.boundary_f(gt, pred, bound_th=3) == expected, shift


def test_boundary_f_of_a_step():
  # Prediction: cols >= 50 on rows 0..49, cols >= 55 on rows 50..99. Its boundary: column 49
  # on rows 0..49 (50 px), row 49 on cols 50..54 (5 px, the step), column 54 on rows 50..99
  # (50 px): 105 pixels; within 2 px of the true column 49: the 50 plus cols 50, 51 of row 49
  # -> precision 52/105. The true column 49 (100 px) is within 2 px of the predicted boundary
  # on rows 0..49, row 50 ((49, 50) at √2) and row 51 ((49, 49) at 2) -> recall 52/100.
  gt = np.zeros((100, 100), bool)
  gt[:, 50:] = True
  pred = np.zeros((100, 100), bool)
  pred[:50, 50:] = True
  pred[50:, 55:] = True
  assert video_propagation.boundaries(pred).sum() == 105
  p, r = 52 / 105, 52 / 100
  assert video_propagation.boundary_f(gt, pred) == pytest.approx(2 * p * r / (p + r))


def test_boundary_f_of_empty_masks():
  empty = np.zeros((100, 100), bool)
  assert video_propagation.boundary_f(empty, empty) == 1.0
  assert video_propagation.boundary_f(square(10, 10, 10), empty) == 0.0
  assert video_propagation.boundary_f(empty, square(10, 10, 10)) == 0.0


def test_davis_means_average_objects():
  # Three objects (e.g. sequence A's two and sequence B's one): J 1, 0.5, 0 and F 1, 1, 0.4.
  out = video_propagation.davis_means([1.0, 0.5, 0.0], [1.0, 1.0, 0.4])
  assert out == pytest.approx({"davis_j_mean": 0.5, "davis_f_mean": 0.8, "davis_jf_mean": 0.65})


# ---------------------------------------------------------------------------------------
# The propagation steps on hand-made numbers.
# ---------------------------------------------------------------------------------------

def test_frame_shape_as_dino_read_frame():
  assert video_propagation.frame_shape(480, 854, 480, 16) == (480, 832)  # DAVIS 480p: 854 * 1 // 64 * 64
  assert video_propagation.frame_shape(854, 480, 480, 8) == (832, 480)
  assert video_propagation.frame_shape(480, 480, 480, 16) == (480, 448)  # square: the width is the "longer" side
  assert video_propagation.frame_shape(64, 80, 64, 4) == (64, 64)
  assert video_propagation.frame_shape(480, 854, 480, 14) == (476, 826)  # then to multiples of the patch size


def test_read_annotation_void_is_background(tmp_path):
  # A DAVIS palette PNG with ids 0, 1, 2 and void 255: void reads as background 0.
  ids = np.array([[0, 1, 255], [2, 255, 1]], np.uint8)
  image = Image.fromarray(ids)
  image.putpalette(video_propagation.PALETTE + [224, 224, 192] * 250)
  image.save(tmp_path / "00000.png")
  assert Image.open(tmp_path / "00000.png").mode == "P"
  np.testing.assert_array_equal(video_propagation.read_annotation(tmp_path / "00000.png"), [[0, 1, 0], [2, 0, 1]])


def test_patch_labels_nearest_to_the_grid():
  # 8x8 ids to a 2x2 grid: PIL's nearest samples pixel rows/cols 2 and 6 (the centres of the
  # 4-pixel cells), so the stray ids at (0, 0), (3, 3) and (7, 7) are not seen.
  ids = np.zeros((8, 8), np.uint8)
  ids[:4, 4:] = 1  # top right
  ids[4:, :4] = 2  # bottom left
  ids[0, 0], ids[3, 3], ids[7, 7] = 2, 1, 1
  expected = [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0]]  # cells in row-major order: 0, 1, 2, 0
  np.testing.assert_array_equal(video_propagation.patch_labels(ids, (2, 2), 3), expected)


def test_neighbourhood():
  n = video_propagation.neighbourhood(3, 3, 1).reshape(3, 3, 3, 3)
  assert n[1, 1].all()  # the centre sees all 9
  np.testing.assert_array_equal(n[0, 0], [[1, 1, 0], [1, 1, 0], [0, 0, 0]])
  assert video_propagation.neighbourhood(3, 3, 0).all()  # 0: no restriction


def test_propagate_top_k_weights():
  # One target [1, 0]; sources of frame 0: [1, 0], [0, 1], [-1, 0] (cosines 1, 0, -1) with
  # labels 0, 1, 2. T = 1, k = 2: weights e and 1 on labels 0 and 1, normalized.
  target = np.array([[1.0, 0.0]], np.float32)
  sources = np.zeros((2, 3, 2), np.float32)
  sources[0] = [[1, 0], [0, 1], [-1, 0]]
  sources[1] = [[1, 0], [1, 0], [1, 0]]  # identical to the target, but frame 1 is not valid
  labels = np.zeros((2, 3, 3), np.float32)
  labels[0] = np.eye(3)
  labels[1] = [[0, 0, 1]] * 3
  out = video_propagation.propagate(target, sources, labels, np.array([True, False]), np.ones((1, 3), bool), topk=2,
                        temperature=1.0)
  e = math.e
  np.testing.assert_allclose(np.asarray(out), [[e / (e + 1), 1 / (e + 1), 0]], rtol=1e-6)
  # With frame 1 valid, its three sources (cosine 1) tie with frame 0's first: all four kept.
  out = video_propagation.propagate(target, sources, labels, np.array([True, True]), np.ones((1, 3), bool), topk=2,
                        temperature=1.0)
  np.testing.assert_allclose(np.asarray(out), [[0.25, 0, 0.75]], rtol=1e-6)
  # Outside the neighbourhood a source counts for nothing: only the orthogonal source is left.
  out = video_propagation.propagate(target, sources, labels, np.array([True, False]), np.array([[False, True, False]]),
                        topk=2, temperature=1.0)
  np.testing.assert_allclose(np.asarray(out), [[0, 1, 0]], rtol=1e-6)
  # topk above the 6 context sources is clamped: the three valid sources all count, weights
  # e, 1, 1/e on labels 0, 1, 2.
  out = video_propagation.propagate(target, sources, labels, np.array([True, False]), np.ones((1, 3), bool), topk=100,
                        temperature=1.0)
  np.testing.assert_allclose(np.asarray(out), np.array([[e, 1, 1 / e]]) / (e + 1 + 1 / e), rtol=1e-6)


def test_propagate_at_a_tiny_temperature():
  # T = 1e-3: exp(cosine / T) overflows float32 (exp(1000)) unless each row's maximum is taken
  # off first. Cosines 1, 0.999, 0 -> weights 1, e^-1, e^-1000 = 0 (frame 1, cosine 1, is not
  # valid and must not set the maximum).
  target = np.array([[1.0, 0.0]], np.float32)
  sources = np.zeros((2, 3, 2), np.float32)
  sources[0] = [[1, 0], [0.999, math.sqrt(1 - 0.999 ** 2)], [0, 1]]
  sources[1] = [[1, 0], [1, 0], [1, 0]]
  labels = np.zeros((2, 3, 3), np.float32)
  labels[0] = np.eye(3)
  labels[1] = [[0, 0, 1]] * 3
  out = np.asarray(video_propagation.propagate(target, sources, labels, np.array([True, False]), np.array([[False, True, True]]),
                                   topk=3, temperature=1e-3))
  assert np.isfinite(out).all()
  # Only sources 1 and 2 are in the neighbourhood: weights 1 (cosine 0.999) and e^-999 = 0.
  np.testing.assert_allclose(out, [[0, 1, 0]], atol=1e-6)
  out = np.asarray(video_propagation.propagate(target, sources, labels, np.array([True, False]), np.ones((1, 3), bool), topk=3,
                                   temperature=1e-3))
  e = math.e
  np.testing.assert_allclose(out, [[1 / (1 + 1 / e), (1 / e) / (1 + 1 / e), 0]], rtol=1e-3)


def test_segment_upsamples_bilinear_as_pytorch():
  # Columns 0, 1 upsampled twice (PyTorch's align_corners=False): 0, 0.25, 0.75, 1 for label 1
  # and 1, 0.75, 0.25, 0 for label 0 -> label 1 wins on the right half.
  soft = np.array([[[1.0, 0.0], [0.0, 1.0]]], np.float32)
  np.testing.assert_array_equal(video_propagation.segment(soft, 2, (2, 4)), [[0, 0, 1, 1]] * 2)


def test_segment_rescales_each_label_before_the_argmax():
  # Label 1's map (0.2 .. 0.4) is weaker than label 0's (0.6 .. 0.8) everywhere, but after each
  # map is rescaled to [0, 1] label 1 wins where it is at its highest.
  soft = np.zeros((1, 2, 2), np.float32)
  soft[0, :, 0] = [0.8, 0.6]
  soft[0, :, 1] = [0.2, 0.4]
  np.testing.assert_array_equal(video_propagation.segment(soft, 1, (1, 2)), [[0, 1]])
  np.testing.assert_array_equal(video_propagation.segment(soft, 1, (2, 4)), [[0, 0, 1, 1]] * 2)  # nearest to the frame


# ---------------------------------------------------------------------------------------
# Oracle and end to end on the synthetic benchmark.
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def davis(tmp_path_factory) -> pathlib.Path:
  out = tmp_path_factory.mktemp("davis")
  video_propagation.write_synthetic(out, seed=0, num_sequences=2, num_frames=6)
  return out


def test_write_synthetic_layout(davis):
  seqs = video_propagation.list_sequences(davis, "480p", "val", "test")
  assert [s.name for s in seqs] == ["synthetic-00", "synthetic-01"]
  for seq in seqs:
    assert len(seq.frames) == 6
    first = video_propagation.read_annotation(seq.annotations[0])
    assert first.shape == (64, 128) and set(np.unique(first)) == {0, 1, 2}
    assert common.read_rgb(seq.frames[0]).shape == (64, 128, 3)
  masks = [video_propagation.read_annotation(p) for p in seqs[0].annotations]
  assert not all((m == masks[0]).all() for m in masks[1:])  # the objects move


def test_oracle_features_propagate_the_true_masks(davis):
  # Features = the one-hot true label of each patch: every patch takes its labels from patches
  # of its own object, so the propagated masks are the true ones at patch resolution (4 px),
  # upsampled: J and F near 1, lower only by the patch grid (exact in the test below).
  cfg, stride = ecfg(davis), 4
  seqs = video_propagation.list_sequences(davis, "480p", "val", "test")

  def true_patches(path):
    seq = next(s for s in seqs if path in s.frames)
    ids = video_propagation.read_annotation(seq.annotations[seq.frames.index(path)])
    th, tw = video_propagation.frame_shape(*ids.shape, cfg.scale_size, stride)
    return video_propagation.patch_labels(ids, (th // stride, tw // stride), 3).reshape(th // stride, tw // stride, 3), ids.shape

  j, f = [], []
  for seq in seqs:
    seq_j, seq_f = video_propagation.score_sequence(seq, true_patches, stride, cfg)
    j += seq_j
    f += seq_f
  assert len(j) == 4
  out = video_propagation.davis_means(j, f)
  assert out["davis_j_mean"] > 0.85 and out["davis_f_mean"] > 0.95, out
  # Features telling every patch it is background lose the objects.
  background = lambda path: (np.broadcast_to(np.eye(3, dtype=np.float32)[0], true_patches(path)[0].shape),
                             true_patches(path)[1])
  assert max(video_propagation.score_sequence(seqs[0], background, stride, cfg)[0]) < 0.5


def test_patch_aligned_oracle_scores_exactly_one(tmp_path):
  # Two objects as full-height vertical bands on the 4-px patch grid of 64x64 frames, moving
  # one patch right a frame. One-hot true-label features propagate each patch's own label
  # exactly, and bilinear upsampling of a one-hot map across a straight patch edge puts the
  # 0.625 / 0.375 weights on the pixel's own patch, so every pixel is recovered: J = F = 1.
  # (Full-height bands: at a convex corner the three outside patches would outweigh it.)
  stride, frames = 4, []
  for t in range(5):
    ids = np.zeros((64, 64), np.uint8)
    ids[:, 8 + 4 * t:20 + 4 * t] = 1
    ids[:, 36 + 4 * t:44 + 4 * t] = 2
    Image.fromarray(ids).save(tmp_path / f"{t:05d}.png")
    frames.append(ids)
  seq = video_propagation.Sequence("bands", tuple(tmp_path / f"{t:05d}.jpg" for t in range(5)),
                       tuple(tmp_path / f"{t:05d}.png" for t in range(5)))
  assert video_propagation.frame_shape(64, 64, 64, stride) == (64, 64)

  def true_patches(path):
    ids = frames[seq.frames.index(path)]
    return np.eye(3, dtype=np.float32)[ids[::stride, ::stride]], ids.shape

  j, f = video_propagation.score_sequence(seq, true_patches, stride, ecfg(tmp_path))
  assert j == [1.0, 1.0] and f == [1.0, 1.0]


def test_evaluator_end_to_end(davis):
  c = defaults.base_config()
  config_common.make_tiny(c)
  e = ecfg(davis)
  video_propagation.VideoPropagationEvaluator.check("video", e, c, enabled=True)
  evaluator = video_propagation.VideoPropagationEvaluator(e, c, None)
  params = common.DenseFeatures(c.model).module.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
  out = evaluator.run(params["params"])
  assert set(out) == {"davis_j_mean", "davis_f_mean", "davis_jf_mean"}
  assert all(0.0 <= v <= 1.0 for v in out.values()), out
  assert out["davis_jf_mean"] == pytest.approx((out["davis_j_mean"] + out["davis_f_mean"]) / 2)
  assert evaluator.run(None) == {}
  assert "J&F" in video_propagation.VideoPropagationEvaluator.describe(e)


# ---------------------------------------------------------------------------------------
# Bad input: one UsageError.
# ---------------------------------------------------------------------------------------

def one_line_error(fn, match):
  with pytest.raises(UsageError, match=match) as info:
    fn()
  assert "\n" not in str(info.value)


def broken_copy(davis, tmp_path) -> pathlib.Path:
  out = tmp_path / "davis"
  shutil.copytree(davis, out)
  return out


def test_missing_first_annotation(davis, tmp_path):
  root = broken_copy(davis, tmp_path)
  (root / "Annotations" / "480p" / "synthetic-01" / "00000.png").unlink()
  one_line_error(lambda: video_propagation.VideoPropagationEvaluator.check("video", ecfg(root), None, enabled=True),
                 "synthetic-01.*00000.jpg has no annotation")


def test_annotation_without_frame(davis, tmp_path):
  root = broken_copy(davis, tmp_path)
  (root / "JPEGImages" / "480p" / "synthetic-00" / "00005.jpg").unlink()
  one_line_error(lambda: video_propagation.list_sequences(root, "480p", "val", "data"), "00005.png has no frame")


def test_missing_folders_and_sequences(davis, tmp_path):
  root = broken_copy(davis, tmp_path)
  one_line_error(lambda: video_propagation.list_sequences(root, "1080p", "val", "data"), "no JPEGImages/1080p/")
  (root / "ImageSets" / "2017" / "val.txt").write_text("synthetic-00\nbear\n")
  one_line_error(lambda: video_propagation.list_sequences(root, "480p", "val", "data"), "'bear'")
  one_line_error(lambda: video_propagation.VideoPropagationEvaluator.check("video", ecfg(""), None, enabled=True),
                 "evals.video.path must be")


def test_annotation_of_another_size_or_mode(davis, tmp_path):
  root = broken_copy(davis, tmp_path)
  seq = video_propagation.list_sequences(root, "480p", "val", "data")[0]
  features = lambda path: (np.ones((16, 32, 4), np.float32) / 2, (64, 128))
  Image.fromarray(np.zeros((64, 64), np.uint8)).save(seq.annotations[2])
  one_line_error(lambda: video_propagation.score_sequence(seq, features, 4, ecfg(root)), "00002.png is 64x64, its frame 128x64")
  Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(seq.annotations[1])
  one_line_error(lambda: video_propagation.score_sequence(seq, features, 4, ecfg(root)), "RGB image, not a palette")
  Image.fromarray(np.zeros((64, 128), np.uint8)).save(seq.annotations[0])
  one_line_error(lambda: video_propagation.score_sequence(seq, features, 4, ecfg(root)), "has no object")


@pytest.mark.parametrize("key,value", [("topk", 0), ("n_last_frames", 2.5), ("scale_size", 32),
                                       ("size_mask_neighborhood", -1), ("temperature", 0), ("bound_th", "x"),
                                       ("path", 3), ("resolution", None), ("split", ["val"])])
def test_bad_config_values(key, value):
  one_line_error(lambda: video_propagation.VideoPropagationEvaluator.check("video", ecfg(**{key: value}), None, enabled=False),
                 f"evals.video.{key}")
