"""Retrieval and copy detection (dino_jax.evaluators.retrieval): AP, the revisited levels,
GeM, whitening, the official scaling and cropping, multi-scale averaging, query crops and
copy detection's top-k against hand computations; both evaluators end to end on synthetic
data."""
import json
import os
import re

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from configs import common as config_common
from dino_jax import defaults
from dino_jax.errors import UsageError
from dino_jax.evaluators import common
from dino_jax.evaluators import copy_detection
from dino_jax.evaluators import retrieval


def tiny_cfg():
  c = defaults.base_config()
  config_common.make_tiny(c)
  return c


@pytest.fixture(scope="module")
def tiny():
  """The tiny config and random-init backbone params."""
  c = tiny_cfg()
  params = common.DenseFeatures(c.model).module.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))
  return c, params["params"]


def retrieval_ecfg(path, **kw):
  path = str(path) if isinstance(path, os.PathLike) else path
  return ml_collections.ConfigDict(dict(dict(type="retrieval", every_steps=-1, every_epochs=0.0, path=path,
                                             imsize=32, multiscale=False, feature="cls", gem_p=4.0,
                                             crop_queries=False), **kw))


def copy_ecfg(path, **kw):
  path = str(path) if isinstance(path, os.PathLike) else path
  return ml_collections.ConfigDict(dict(dict(type="copy_detection", every_steps=-1, every_epochs=0.0, path=path,
                                             blocks=("strong", "jpegqual/10", "crops/50"), distractors="distractors",
                                             whitening="whitening", imsize=32, gem_p=4.0, whitening_dim=0, topk=20,
                                             threshold=-1.0, match_prefix=4, batch_size=16), **kw))


def test_average_precision_by_hand():
  # Positives at ranks 0 and 2 of 2: trapezoids (1 + 1) / 2 * 1/2 + (1/2 + 2/3) / 2 * 1/2 = 19/24.
  assert retrieval.average_precision([0, 2], 2) == pytest.approx(19 / 24)
  # Rank 1 of 1: (0 + 1/2) / 2 = 1/4; one of two positives found at rank 0: 1/2; none found: 0.
  assert retrieval.average_precision([1], 1) == pytest.approx(0.25)
  assert retrieval.average_precision([0], 2) == pytest.approx(0.5)
  assert retrieval.average_precision([], 3) == 0.0
  order = np.array([[4, 0, 3, 1, 2]])  # positives {4, 3}: ranks 0 and 2
  assert retrieval.mean_average_precision(order, [np.array([3, 4])]) == pytest.approx(19 / 24)
  # Junk 0 taken out: positives at ranks 0 and 1 -> 1. A query without positives is left out.
  assert retrieval.mean_average_precision(np.tile(order, (2, 1)), [np.array([3, 4]), np.array([], int)],
                                          [np.array([0]), np.array([], int)]) == pytest.approx(1.0)


def test_revisited_levels_by_hand():
  # Query 0 ranks the gallery 0, 1, 2, 3, 4, 5 (similarity decreasing): easy {3}, hard {1}, junk {0}.
  # easy:   positives {3}, junk {0, 1} -> ranking 2, 3, 4, 5: rank 1 -> 1/4.
  # medium: positives {1, 3}, junk {0} -> ranking 1, 2, 3, 4, 5: ranks 0, 2 -> 19/24.
  # hard:   positives {1}, junk {0, 3} -> ranking 1, 2, 4, 5: rank 0 -> 1.
  # Query 1 ranks 5 first: easy {5}, no hard (left out of "hard"), so easy = medium = 1.
  similarity = np.array([[6, 5, 4, 3, 2, 1], [1, 2, 3, 4, 5, 6]], np.float64)
  gnd = [{"easy": [3], "hard": [1], "junk": [0]}, {"easy": [5], "hard": [], "junk": []}]
  maps = retrieval.revisited_maps(similarity, gnd)
  assert maps["easy"] == pytest.approx((0.25 + 1) / 2)
  assert maps["medium"] == pytest.approx((19 / 24 + 1) / 2)
  assert maps["hard"] == pytest.approx(1.0)
  only_easy = retrieval.revisited_maps(similarity[1:], gnd[1:])
  assert set(only_easy) == {"easy", "medium"}


def test_gem_by_hand():
  patch = np.array([1.0, 2.0, 3.0, -4.0]).reshape(1, 2, 2, 1)  # -4 clamps to 1e-6
  assert retrieval.gem(patch, 4.0)[0, 0] == pytest.approx(((1 + 16 + 81 + 1e-24) / 4) ** 0.25, rel=1e-6)
  assert retrieval.gem(patch, 1.0)[0, 0] == pytest.approx((1 + 2 + 3 + 1e-6) / 4, rel=1e-6)
  assert retrieval.gem(np.full((2, 3, 3, 5), 7.0), 3.0) == pytest.approx(np.full((2, 5), 7.0))


def test_whitening():
  rng = np.random.default_rng(0)
  mixing = rng.normal(size=(6, 6))
  train = rng.normal(size=(500, 6)) @ mixing
  train -= train.mean(0)  # centered: the official second moment is the covariance, and whitening gives identity
  mean, projection = retrieval.fit_whitening(train)
  white = retrieval.apply_whitening(train, (mean, projection))
  np.testing.assert_allclose(np.cov(white.T, bias=True), np.eye(6), atol=1e-5)
  # Uncentered (DINO's eval_copy_detection.py): the eigenvectors of XᵀX / n, the mean subtracted only on apply.
  shifted = train + 3.0
  mean, projection = retrieval.fit_whitening(shifted)
  np.testing.assert_allclose(mean, 3.0, atol=1e-9)
  values, vectors = np.linalg.eigh(shifted.T @ shifted / len(shifted))
  np.testing.assert_allclose(np.abs(projection), np.abs((vectors / np.sqrt(values))[:, ::-1].T), atol=1e-9)
  # Rows are eigenvectors / sqrt(eigenvalue), leading component first: their norms grow.
  assert np.all(np.diff(np.linalg.norm(projection, axis=1)) >= 0)
  # Axis-aligned variances 4 and 1: the projection is diag(1/2, 1) (up to signs); dim=1 keeps the first.
  axes = np.array([[2.0, 1.0], [-2.0, 1.0], [2.0, -1.0], [-2.0, -1.0]])
  _, p = retrieval.fit_whitening(axes)
  np.testing.assert_allclose(np.abs(p), [[0.5, 0], [0, 1]], atol=1e-12)
  assert retrieval.fit_whitening(axes, dim=1)[1].shape == (1, 2)


def test_interpolate_and_floor_crop_by_hand():
  # F.interpolate(scale_factor=s): floor(n * s) outputs, output i read at (i + 0.5) / s - 0.5.
  # Rows 0, 10, 20 at 1/sqrt2: 2 rows at sqrt2 / 2 - 1/2 = 0.2071 and 3 sqrt2 / 2 - 1/2 = 1.6213
  # (the ratio of the sizes, 3/2, would read 0.25 and 1.75); columns equal, 2 -> 1.
  rows = np.tile(np.array([0.0, 10.0, 20.0], np.float32)[:, None, None], (1, 2, 1))
  out = retrieval.interpolate(rows, retrieval.MULTISCALE[1])
  assert out.shape == (2, 1, 1)
  np.testing.assert_allclose(out[:, 0, 0], [10 * (2 ** 0.5 / 2 - 0.5), 10 * (3 * 2 ** 0.5 / 2 - 0.5)], rtol=1e-6)
  # Scale 1/2 of 0, 10, 20, 30, 40 (5 -> 2): read at 0.5 and 2.5 -> 5 and 25; the borders clamp.
  col = np.array([0.0, 10.0, 20.0, 30.0, 40.0], np.float32)[:, None, None]
  np.testing.assert_allclose(retrieval.interpolate(np.tile(col, (1, 4, 1)), 0.5)[:, 0, 0], [5.0, 25.0])
  np.testing.assert_allclose(retrieval.interpolate(col[:3, :, :] * np.ones((1, 3, 1)), 2.0)[:, 0, 0],
                             [0, 2.5, 7.5, 12.5, 17.5, 20])
  # The patch embedding drops what lies beyond the last whole patch: 45 x 30 at stride 4 -> 44 x 28.
  image = np.arange(45 * 30).reshape(45, 30, 1)
  np.testing.assert_array_equal(retrieval.floor_crop(image, 4), image[:44, :28])


def test_interpolate_matches_torch():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(0).uniform(0, 255, (45, 31, 3)).astype(np.float32)
  for scale in retrieval.MULTISCALE[1:]:
    expected = torch.nn.functional.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], scale_factor=scale,
                                               mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(retrieval.interpolate(x, scale), expected, atol=1e-3)


def photo(h: int, w: int) -> np.ndarray:
  """A real h x w photo: the top-left corner of grace_hopper.jpg shrunk 4x."""
  image = Image.fromarray(common.read_rgb(common.sample_data("grace_hopper.jpg")))
  return np.asarray(image.resize((image.width // 4, image.height // 4), Image.BICUBIC))[:h, :w]


def hand_layout(root, query: np.ndarray, bbox) -> None:
  """A revisited benchmark of one query (PNG, with `bbox`) whose only, easy, match is itself."""
  (root / "jpg").mkdir(parents=True)
  Image.fromarray(query).save(root / "jpg" / "q.png")
  Image.fromarray(query).save(root / "jpg" / "g.png")
  (root / "gnd.json").write_text(json.dumps({"gallery": ["g"], "queries": [
      {"name": "q", "bbox": bbox, "easy": ["g"], "hard": [], "junk": []}]}))


def test_crop_queries_by_hand(tmp_path, tiny):
  cfg, params = tiny
  image = photo(40, 48)  # h 40, w 48
  bbox = [4, 8, 36, 24]  # x 4..36 (32 wide), y 8..24 (16 high)
  hand_layout(tmp_path, image, bbox)
  ev = retrieval.RetrievalEvaluator(retrieval_ecfg(tmp_path, imsize=64, crop_queries=True), cfg, None)
  net = common.DenseFeatures(cfg.model)
  cls = lambda crop: common.l2_normalize(net(params, crop[None])["embedding"][0])
  got = ev.descriptors(params, ev.layout["queries"], ev.layout["bboxes"], "retrieval queries")[0]
  np.testing.assert_allclose(got, cls(image[8:24, 4:36]), atol=1e-5)
  assert not np.allclose(got, cls(image[4:36, 8:24]), atol=1e-3)  # x and y swapped: another crop
  # A box partly outside is clipped to the image; one wholly outside is one error naming the query.
  clipped = ev.descriptors(params, ev.layout["queries"], [[-10, 8, 36, 24.4]], "retrieval queries")[0]
  np.testing.assert_allclose(clipped, cls(image[8:24, 0:36]), atol=1e-5)
  with pytest.raises(UsageError, match=r"retrieval queries: q.png: bbox \[50, 0, 60, 10\] lies outside the 48x40"):
    ev.descriptors(params, ev.layout["queries"], [[50, 0, 60, 10]], "retrieval queries")


class SizeNet:
  """A stand-in backbone whose embedding is (height, width, mean pixel) of its input."""
  stride = 4

  def __init__(self):
    self.seen = []

  def __call__(self, params, images):
    del params
    self.seen.append(images.shape[1:3])
    return {"embedding": np.array([[*images.shape[1:3], images.mean()]], np.float32)}


def test_multiscale_average_by_hand(tmp_path, tiny):
  cfg, _ = tiny
  hand_layout(tmp_path, photo(45, 30), None)
  ev = retrieval.RetrievalEvaluator(retrieval_ecfg(tmp_path, imsize=64, multiscale=True), cfg, None)
  ev.net = SizeNet()
  flat = np.full((45, 30, 3), 100, np.uint8)  # every scale keeps the mean pixel 100
  # Official sizes: scale 1: 45 x 30 -> 44 x 28; 1/sqrt2: floor 31 x 21 -> 28 x 20; 1/2: 22 x 15 -> 20 x 12.
  got = ev.descriptor(None, flat, "q")
  assert ev.net.seen == [(44, 28), (28, 20), (20, 12)]
  mean = np.array([(44 + 28 + 20) / 3, (28 + 20 + 12) / 3, 100])
  np.testing.assert_allclose(got, mean / np.linalg.norm(mean), rtol=1e-6)
  ev.ecfg.multiscale = False
  np.testing.assert_allclose(ev.descriptor(None, flat, "q"), np.array([44, 28, 100]) / np.linalg.norm([44, 28, 100]),
                             rtol=1e-6)
  # The longer side is first brought down to imsize (thumbnail): 45 x 30 -> 24 x 16.
  ev.ecfg.imsize, ev.net.seen = 24, []
  ev.descriptor(None, flat, "q")
  assert ev.net.seen == [(24, 16)]
  # 6 x 6 at scale 1/2 is 3 x 3: not one 4 x 4 patch.
  ev.ecfg.multiscale = True
  with pytest.raises(UsageError, match="q: 6x6 at scale 0.5 is smaller than one 4x4 patch"):
    ev.descriptor(None, flat[:6, :6], "q")


def test_copy_detection_topk_by_hand(tmp_path, tiny):
  cfg, _ = tiny
  for rel in ("original/000000", "original/000100", "distractors/d0", "strong/000001", "strong/000002",
              "strong/000101", "strong/000102"):
    (tmp_path / rel).parent.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{rel}.png")
  ev = copy_detection.CopyDetectionEvaluator(copy_ecfg(tmp_path, blocks="strong", whitening="", topk=2), cfg, None)
  # Database: originals 0, 1 and a distractor, one-hot; similarity = the query's normalized entries.
  # Queries of original 0: its copy at rank 1 (AP (0 + 1/2) / 2 = 1/4) and at rank 2 (beyond the top 2:
  # AP 0); of original 1: rank 0 (AP 1) and rank 2 (AP 0). mAP@2 = 5/16.
  queries = {"strong": np.array([[0.5, 1, 0.2], [0.1, 1, 0.5], [0, 1, 0], [1, 0.5, 0.8]])}
  assert ev.score(queries, np.eye(3), None) == {"copy_detection_map": pytest.approx(5 / 16)}
  # Top 3: rank 2 adds (0 + 1/3) / 2 = 1/6, so (1/4 + 1/6 + 1 + 1/6) / 4 = 19/48.
  ev.ecfg.topk = 3
  assert ev.score(queries, np.eye(3), None) == {"copy_detection_map": pytest.approx(19 / 48)}
  # A similarity threshold drops matches below it: the copies' cosines are 0.440, 0.089, 1 and 0.364.
  # At 0.3 the second query's copy (0.089) is not detected: (1/4 + 0 + 1 + 1/6) / 4 = 17/48; at 0.4 the
  # fourth's (0.364) neither: (1/4 + 1) / 4 = 5/16.
  ev.ecfg.threshold = 0.3
  assert ev.score(queries, np.eye(3), None) == {"copy_detection_map": pytest.approx(17 / 48)}
  ev.ecfg.threshold = 0.4
  assert ev.score(queries, np.eye(3), None) == {"copy_detection_map": pytest.approx(5 / 16)}


def scene_of(path) -> str:
  """The known answer of write_synthetic: the scene a file belongs to (distractors their own)."""
  return re.match(r"(scene\d+|distractor\d+)", path.name).group(1)


def one_hot(paths, names) -> np.ndarray:
  return np.eye(len(names))[[names.index(scene_of(p)) for p in paths]]


def test_retrieval_end_to_end(tmp_path, tiny):
  cfg, params = tiny
  retrieval.write_synthetic(tmp_path / "rev", seed=1, layout="revisited", scenes=4, distractors=4)
  ecfg = retrieval_ecfg(tmp_path / "rev", multiscale=True)
  retrieval.RetrievalEvaluator.check("retrieval", ecfg, cfg, enabled=True)
  ev = retrieval.RetrievalEvaluator(ecfg, cfg, None)
  metrics = ev.run(params)
  assert set(metrics) == {"retrieval_map_easy", "retrieval_map_medium", "retrieval_map_hard"}
  assert all(0 <= v <= 1 for v in metrics.values()), metrics
  assert ev.run(None) == {}
  # An oracle descriptor (each scene's versions identical, distractors apart) scores 1 at every level.
  names = sorted({scene_of(p) for p in ev.layout["gallery"]})
  oracle = ev.score(one_hot(ev.layout["queries"], names), one_hot(ev.layout["gallery"], names))
  assert oracle == {k: pytest.approx(1.0) for k in metrics}
  # Plain layout, GeM descriptor, queries cropped (the synthetic bbox is the whole image).
  retrieval.write_synthetic(tmp_path / "plain", seed=2, layout="plain", scenes=3, distractors=3)
  ev = retrieval.RetrievalEvaluator(retrieval_ecfg(tmp_path / "plain", feature="gem", crop_queries=True), cfg, None)
  metrics = ev.run(params)
  assert set(metrics) == {"retrieval_map"} and 0 <= metrics["retrieval_map"] <= 1
  names = sorted({scene_of(p) for p in ev.layout["gallery"]})
  assert ev.score(one_hot(ev.layout["queries"], names), one_hot(ev.layout["gallery"], names)) == {
      "retrieval_map": pytest.approx(1.0)}


def test_copy_detection_end_to_end(tmp_path, tiny):
  cfg, params = tiny
  retrieval.write_synthetic(tmp_path, seed=0, layout="copydays", scenes=5, distractors=5, whitening=70)
  ecfg = copy_ecfg(tmp_path)
  copy_detection.CopyDetectionEvaluator.check("copy_detection", ecfg, cfg, enabled=True)
  ev = copy_detection.CopyDetectionEvaluator(ecfg, cfg, None)
  metrics = ev.run(params)
  assert set(metrics) == {"copy_detection_map", "copy_detection_map_strong", "copy_detection_map_jpegqual_10",
                          "copy_detection_map_crops_50"}
  assert all(0 <= v <= 1 for v in metrics.values()), metrics
  # JPEG at quality 10 barely moves even a random network's descriptor: its copies come first.
  assert metrics["copy_detection_map_jpegqual_10"] > 0.9
  # Oracle: one-hot of the original (distractors apart), no whitening -> 1.
  n = len(ev.layout["originals"])
  database = np.eye(n + len(ev.layout["distractors"]))
  queries = {b: database[[int(q.stem[:4]) for q in paths]] for b, paths in ev.layout["blocks"].items()}
  assert ev.score(queries, database, None) == {k: pytest.approx(1.0) for k in metrics}
  # Only the strong block, top-1: a query's one true copy ranked first or not at all.
  ev = copy_detection.CopyDetectionEvaluator(copy_ecfg(tmp_path, blocks="strong", topk=1, distractors="", whitening=""),
                                        cfg, None)
  assert set(ev.run(params)) == {"copy_detection_map"}


def test_bad_input(tmp_path, tiny):
  cfg, _ = tiny
  check_r = lambda **kw: retrieval.RetrievalEvaluator.check("r", retrieval_ecfg(tmp_path / "rev", **kw), cfg, True)
  check_c = lambda **kw: copy_detection.CopyDetectionEvaluator.check("c", copy_ecfg(tmp_path / "cd", **kw), cfg, True)
  with pytest.raises(UsageError, match="evals.r.path: .* is not a folder"):
    check_r()
  (tmp_path / "rev").mkdir()
  with pytest.raises(UsageError, match="neither gnd.json"):
    check_r()
  retrieval.write_synthetic(tmp_path / "rev", layout="revisited", scenes=2, distractors=1)
  check_r()
  gnd = json.loads((tmp_path / "rev" / "gnd.json").read_text())
  gnd["queries"][0]["hard"].append("missing.jpg")
  (tmp_path / "rev" / "gnd.json").write_text(json.dumps(gnd))
  with pytest.raises(UsageError, match="hard image 'missing.jpg', which is not in 'gallery'"):
    check_r()
  gnd["queries"][0]["hard"].pop()
  gnd["gallery"].append("missing")
  (tmp_path / "rev" / "gnd.json").write_text(json.dumps(gnd))
  with pytest.raises(UsageError, match="'missing', which is not an image"):
    check_r()
  for bad in (dict(path=3), dict(feature="mean"), dict(imsize=0), dict(imsize=2), dict(multiscale="yes"),
              dict(gem_p=-1)):
    with pytest.raises(UsageError, match=f"evals.r.{next(iter(bad))}"):
      retrieval.RetrievalEvaluator.check("r", retrieval_ecfg(**dict(dict(path=tmp_path), **bad)), cfg, False)

  retrieval.write_synthetic(tmp_path / "plain", layout="plain", scenes=2, distractors=1)
  (tmp_path / "plain" / "queries" / "scene01.jpg").unlink()
  with pytest.raises(UsageError, match="positives.json \\(queries/\\) names 'scene01.jpg'"):
    retrieval.RetrievalEvaluator.check("r", retrieval_ecfg(tmp_path / "plain"), cfg, True)

  retrieval.write_synthetic(tmp_path / "cd", layout="copydays", scenes=2, distractors=1, whitening=2)
  check_c()
  with pytest.raises(UsageError, match="evals.c.whitening .*: .* is not a folder"):
    check_c(whitening="elsewhere")
  with pytest.raises(UsageError, match="blocks \\(jpegqual/75/\\)"):
    check_c(blocks="strong,jpegqual/75")
  (tmp_path / "cd" / "strong" / "777701.jpg").write_bytes((tmp_path / "cd" / "original" / "000000.jpg").read_bytes())
  with pytest.raises(UsageError, match="query strong/777701.jpg matches no image of original/"):
    check_c()
  for bad in (dict(path=None), dict(blocks=""), dict(topk=0), dict(threshold=1.5), dict(imsize=3),
              dict(whitening_dim=-1), dict(distractors=None)):
    with pytest.raises(UsageError, match=f"evals.c.{next(iter(bad))}"):
      copy_detection.CopyDetectionEvaluator.check("c", copy_ecfg(**dict(dict(path=tmp_path), **bad)), cfg, False)
  with pytest.raises(UsageError, match="layout must be one of"):
    retrieval.write_synthetic(tmp_path / "x", layout="oxford")
