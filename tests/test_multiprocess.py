"""Two processes on loopback (gloo CPU collectives) train in lockstep and write the same
checkpoint as one process: the multi-host path (jax.distributed.initialize, per-process input
slices assembled with make_array_from_process_local_data, Orbax saves from every process), with
an FSDP-split state started from another run's teacher (model.init_from)."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np

from configs import dinov2_vits14
from dino_jax import learner
from dino_jax import sharding
from tests.test_train import REPO, TRAIN_STEPS_PER_EPOCH, assert_trees_close, device_env, final_state, tiny

STEPS = 4
FLAGS = ["--config", "configs/dinov2_vits14.py:tiny", "--config.data.source=fashion_mnist_demo",
         f"--config.epochs={STEPS / TRAIN_STEPS_PER_EPOCH}", f"--config.optim.warmup_epochs={2 / TRAIN_STEPS_PER_EPOCH}",
         "--config.evals.knn.every_steps=-1", "--config.checkpoint.every_steps=2",
         "--config.model.layerscale=0.1"]  # distinct CLS embeddings at init (tests/test_step_sharding.py)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start(workdir, devices, *extra):
  return subprocess.Popen([sys.executable, "-m", "dino_jax.train", "--workdir", str(workdir), *FLAGS, *extra],
                          cwd=REPO, env=device_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_two_processes_train_like_one(tmp_path):
  source = start(tmp_path / "source", 8, "--config.seed=1")  # other initial weights than seed 0
  assert source.wait(timeout=600) == 0, source.communicate()[1][-3000:]
  shared = [f"--config.model.init_from={tmp_path / 'source'}", "--config.mesh.fsdp=2", "--config.mesh.fsdp_min_size=256"]
  port = free_port()
  procs = [start(tmp_path / "two", 4, *shared, "--distributed", f"--coordinator_address=localhost:{port}",
                 "--num_processes=2", f"--process_id={i}") for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert "2 process(es), 8 cpu devices, mesh {'data': 4, 'fsdp': 2}" in outputs[0][0]
  one = start(tmp_path / "one", 8, *shared)
  out, err = one.communicate(timeout=600)
  assert one.returncode == 0, err[-3000:]

  cfg = tiny(dinov2_vits14, steps=STEPS, **{"model.layerscale": 0.1})  # restored here on 8 devices, replicated
  step_two, two = final_state(str(tmp_path / "two"), cfg)
  step_one, reference = final_state(str(tmp_path / "one"), cfg)
  assert step_two == step_one == STEPS
  assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == sorted(os.listdir(tmp_path / "one" / "checkpoints"))
  assert_trees_close(two["params"], reference["params"], atol=1e-5)
  assert_trees_close(two["teacher"], reference["teacher"], atol=1e-5)
  assert int(two["nonfinite_steps"]) == 0
  # Started from the source's teacher: the EMA teacher is still near it, far from a fresh init.
  _, source_state = final_state(str(tmp_path / "source"), tiny(dinov2_vits14, steps=STEPS, seed=1, **{"model.layerscale": 0.1}))
  fresh = jax.device_get(learner.build(cfg, sharding.make_mesh(), TRAIN_STEPS_PER_EPOCH).state)
  distance = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  teacher = lambda state: state["teacher"].value["backbone"]
  assert distance(teacher(two), teacher(source_state)) < 0.1 * distance(teacher(fresh), teacher(source_state))
  two_losses = [json.loads(line)["loss"] for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
  one_losses = [json.loads(line)["loss"] for line in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
  np.testing.assert_allclose(two_losses, one_losses, rtol=1e-5)
  assert len(two_losses) == STEPS  # process 0 writes the metrics, once per step
