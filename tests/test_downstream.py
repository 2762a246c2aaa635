"""The downstream evaluators as the framework uses them: registered and configured by default,
run inside training (also on unlabelled training data) and from `dino_jax.evaluate run`, their
synthetic benchmarks written from the command line, and bad paths as one error line."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
import numpy as np
import pytest

from dino_jax import defaults
from dino_jax import evaluate
from dino_jax import evaluators
from dino_jax import sharding
from dino_jax import trainer
from dino_jax.errors import UsageError
from dino_jax.evaluators import common
from dino_jax.evaluators import retrieval
from dino_jax.evaluators import synthetic
from tests.test_train import REPO, tiny

DOWNSTREAM = ("retrieval", "copy_detection", "video_propagation", "correspondence", "segmentation", "depth")


def test_every_downstream_type_is_registered_with_defaults_that_check():
  evals = defaults.base_config().evals
  for name in DOWNSTREAM:
    ecfg = evals[name]
    assert ecfg.type == name and ecfg.every_steps == -1  # off unless asked for
    assert not evaluators.EVALUATORS[name].needs_labels
    evaluators.check_one(name, ecfg, tiny(), 8, enabled=False)
    with pytest.raises(UsageError, match=f"evals.{name}") as e:  # no benchmark folder: one line naming it
      evaluators.check_one(name, ecfg, tiny(), 8, enabled=True)
    assert "\n" not in str(e.value)


def test_unlabelled_training_data_keeps_the_downstream_evaluators(tmp_path):
  retrieval.write_synthetic(tmp_path, layout="plain", scenes=2, distractors=1, size=32)
  cfg = tiny(**{"evals.knn.every_steps": 0, "evals.retrieval.every_steps": 0, "evals.retrieval.path": str(tmp_path)})
  mesh = sharding.make_mesh(cfg)
  assert set(evaluators.make(cfg, mesh, labelled=True)) == {"knn", "retrieval"}
  assert set(evaluators.make(cfg, mesh, labelled=False)) == {"retrieval"}  # k-NN needs classes, retrieval does not


@pytest.fixture(scope="module")
def retrieval_run(tmp_path_factory):
  """A 3-step tiny run with plain-layout retrieval every 2 steps and at the end."""
  bench = tmp_path_factory.mktemp("bench")
  retrieval.write_synthetic(bench, layout="plain", scenes=3, distractors=2, size=32)
  workdir = tmp_path_factory.mktemp("run") / "run"
  out = trainer.train(tiny(steps=3, **{"evals.retrieval.every_steps": 2, "evals.retrieval.path": str(bench)}),
                    str(workdir))
  return workdir, bench, out


def test_downstream_evaluator_runs_in_training(retrieval_run):
  workdir, _, out = retrieval_run
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "retrieval_map" in r] == [2]  # every 2 steps before the end
  assert [r["step"] for r in rows if "retrieval_map_teacher" in r] == [3]  # the end's, next to any baselines
  assert 0 < out["results"]["retrieval_map_teacher"] <= 1


def test_evaluate_run_cli_and_synthetic_cli(retrieval_run, tmp_path, capsys):
  workdir, bench, _ = retrieval_run
  ok = subprocess.run([sys.executable, "-m", "dino_jax.evaluate", "run", "--workdir", str(workdir), "--evals",
                       "retrieval", "--set", f"path={bench}", "--set", "multiscale=True"], cwd=REPO,
                      capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "retrieval (step 3): retrieval mAP" in ok.stdout and "multi-scale" in ok.stdout
  assert "retrieval gallery" in ok.stderr  # the progress bar
  bad = subprocess.run([sys.executable, "-m", "dino_jax.evaluate", "run", "--workdir", str(workdir), "--evals",
                        "video_propagation", "--set", f"path={tmp_path / 'nothing'}"], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr[-2000:]
  assert bad.stderr.startswith("error: evals.video_propagation")
  # The synthetic benchmark of a type, from the command line (in process: what `python -m` runs).
  synthetic.main(["video_propagation", "--out", str(tmp_path / "davis")])
  assert (tmp_path / "davis" / "ImageSets" / "2017" / "val.txt").is_file()
  for argv, message in ((["video_propagation", "--out", str(tmp_path / "davis")], "exists and is not empty"),
                        (["imagenet", "--out", str(tmp_path / "x")], "invalid choice: 'imagenet'"),
                        (["depth", "--out", str(tmp_path / "davis" / "ImageSets" / "2017" / "val.txt" / "x")],
                         "cannot create --out")):
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
      synthetic.main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_dense_features_come_back_replicated_from_fsdp_split_parameters():
  """Parameters split over 8 devices (FSDP, as a run with mesh.fsdp=8 holds them; over processes
  on a pod) give outputs replicated on the mesh, which every process can read: the same numbers
  as on one device."""
  cfg = tiny(**{"mesh.fsdp": 8})
  mesh = sharding.make_mesh(cfg)
  net = common.DenseFeatures(cfg.model, mesh)
  params = net.module.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32))["params"]
  split = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, sharding.fsdp_spec(x.shape, 8, 1))), params)
  assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(split))
  images = np.random.default_rng(0).integers(0, 256, (2, 24, 32, 3), np.uint8)
  out = net._apply(split, jnp.asarray(images), 1, False)
  assert all(leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(out))
  expected = common.DenseFeatures(cfg.model)(params, images, layers=1, final_norm=False)
  np.testing.assert_allclose(jax.device_get(out)["patch"], expected["patch"], atol=1e-5)


def test_a_run_saved_before_a_key_was_added_takes_its_default():
  """`evaluate run` on a run whose config predates an evaluator key (e.g. depth's loss_group)
  fills it from the defaults; the run's own values win."""
  cfg = tiny()
  del cfg.evals.depth["loss_group"]
  cfg.evals.depth.steps = 7
  ecfg = evaluate.evaluator_config(cfg, "depth", {"learning_rate": 0.5})
  assert (ecfg.loss_group, ecfg.steps, ecfg.learning_rate, ecfg.every_steps) == (2, 7, 0.5, 0)
