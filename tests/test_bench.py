"""dino_jax.bench: the analytical FLOP count against XLA's, and the command on the tiny config
(no timing assertions)."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dino_vits16
from configs import dinov2_vits14
from dino_jax import bench
from dino_jax import learner
from dino_jax import models
from dino_jax import sharding
from dino_jax.errors import UsageError
from tests.test_train import REPO


@pytest.mark.parametrize("module,ffn,size", [(dino_vits16, "mlp", 224), (dinov2_vits14, "swiglu", 98)])
def test_vit_flops_formula_matches_xla_cost_analysis(module, ffn, size):
  cfg = module.get_config()
  cfg.model.update(ffn=ffn, num_registers=4 if ffn == "swiglu" else 0)
  vit = models.make_backbone(cfg.model)
  x = jnp.zeros((1, size, size, 3))
  params = jax.eval_shape(vit.init, jax.random.PRNGKey(0), x)
  cost = jax.jit(vit.apply).lower(params, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  # XLA also counts norms, softmax and elementwise ops, which the formula leaves out.
  assert 1.0 <= cost["flops"] / vit.forward_flops(size) <= 1.06


def test_train_step_flops_counts_teacher_and_student():
  cfg = dino_vits16.get_config()
  cfg.update_from_flattened_dict({"batch_size": 8, "aug.num_local": 8})
  vit = models.make_backbone(cfg.model)
  glob = 16 * (vit.forward_flops(224) + bench.head_forward_flops(cfg, vit.embed_dim, 1))
  local = 64 * (vit.forward_flops(96) + bench.head_forward_flops(cfg, vit.embed_dim, 1))
  assert bench.train_step_flops(cfg) == pytest.approx(glob + 3 * (glob + local))
  # ViT-S/16 at 224 px is 9.1 GFLOP forward (4.6 G multiply-adds), at 96 px 1.6; heads 0.045 each.
  assert 0.90 < bench.train_step_flops(cfg) / 1e12 < 0.92


def test_bench_command_on_the_tiny_config(tmp_path):
  out = tmp_path / "bench.jsonl"
  result = subprocess.run([sys.executable, "-m", "dino_jax.bench", "--config", "configs/dinov2_vits14.py:tiny",
                           "--config.mesh.fsdp=2", "--steps", "2", "--warmup", "1", "--peak_tflops", "1.0",
                           "--json", str(out), "--profile_dir", str(tmp_path / "profile")],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  line = json.loads(out.read_text())
  assert line["mesh"] == {"data": 4, "fsdp": 2} and line["devices"] == 8 and line["ibot"]
  assert line["steps_timed"] == 2 and line["step_s_median"] > 0 and line["compile_s"] > 0
  assert line["images_per_s"] == pytest.approx(16 / line["step_s_median"])
  assert line["mfu"] == pytest.approx(line["tflops_per_s"] / 8)
  assert line["loss_finite"]
  assert set(line["compiled_memory"]) == {"argument", "output", "alias", "temp", "peak"}
  assert "images/s" in result.stdout
  assert line["host_cpu"] and line["host_cores"] >= 1 and line["xla_flags"] == os.environ.get("XLA_FLAGS", "")
  # --profile_dir: the traced step's XLA ops, largest first, named after the model's JAX ops.
  assert line["profile"].endswith(".xplane.pb") and (tmp_path / "profile") in pathlib.Path(line["profile"]).parents
  ops = line["op_times"]
  assert ops and [op["seconds"] for op in ops] == sorted((op["seconds"] for op in ops), reverse=True)
  assert not any(op["op"].startswith("while") for op in ops) and sum(op["share"] for op in ops) <= 1 + 1e-6
  assert any("backbone/block" in op["source"] for op in ops[:20])
  assert "device time per XLA op" in result.stdout


AMD_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx fma avx2 bmi2

processor\t: 1
model name\t: AMD EPYC
flags\t\t: fpu sse2 avx fma avx2 bmi2
"""


def test_host_cpu_names_the_model_and_its_widest_vector_extension(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
  amd = bench.host_cpu(AMD_CPUINFO)
  assert amd["host_cpu"] == "AMD EPYC" and amd["host_vector_isa"] == "avx2"
  assert amd["xla_flags"] == "--xla_cpu_experimental_ynn_fusion_type=" and amd["host_cores"] >= 1
  intel = bench.host_cpu("model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\nflags\t: avx avx2 avx512f avx512bw\n")
  assert intel["host_cpu"].startswith("Intel(R) Xeon(R)") and intel["host_vector_isa"] == "avx512f"
  assert bench.host_cpu("")["host_cpu"] and bench.host_cpu("")["host_vector_isa"] is None  # no /proc/cpuinfo
  line = bench.device_line({"device": "cpu", "devices": 1, **amd})
  assert line == "cpu x1 (AMD EPYC, %d cores, avx2)" % amd["host_cores"]
  assert bench.device_line({"device": "NVIDIA H100 80GB HBM3", "devices": 8, **amd}) == "NVIDIA H100 80GB HBM3 x8"
  arm = {"host_cpu": "aarch64", "host_cores": 8, "host_vector_isa": None}  # no x86 extension to name
  assert bench.device_line({"device": "cpu", "devices": 1, **arm}) == "cpu x1 (aarch64, 8 cores)"


def test_loader_mode_times_the_configs_crops_on_generated_jpegs(tmp_path):
  """`bench --loader`: steps of generated photos cut into the tiny config's crops by threads,
  the rate per core and the host it ran on (no timing assertions)."""
  out = tmp_path / "loader.jsonl"
  result = subprocess.run([sys.executable, "-m", "dino_jax.bench", "--config", "configs/dinov2_vits14.py:tiny",
                           "--loader", "--loader_images", "4", "--loader_workers", "2", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  line = json.loads(out.read_text())
  assert line["loader"] == "4 generated 500x375 JPEGs" and line["images"] == 4 and line["processes"] == 0
  assert line["workers"] == 2 and line["cores_used"] == min(2, line["host_cores"])
  assert len(line["windows"]) == 3 and line["images_per_s"] == pytest.approx(np.median(line["windows"]))
  assert line["images_per_s_per_core"] == pytest.approx(line["images_per_s"] / line["cores_used"])
  assert line["host_cpu"] and line["gil_held_share"] is None  # not run under gil_load
  assert f"cores of {line['host_cpu']} = " in result.stdout and "images/s per core" in result.stdout


@pytest.mark.parametrize("args,message", [
    (["--profile_dir", "/proc/no_such_dir/trace"], "error: --profile_dir /proc/no_such_dir/trace: "),
    (["--profile_dir", "PROFILE", "--memory"], "error: --profile_dir traces the timed train step"),
    (["--memory", "--loader"], "error: --memory, --find_max_batch, --loader and --against_pytorch are separate")])
def test_bench_bad_flags_are_one_line(tmp_path, args, message):
  args = [str(tmp_path / "profile") if a == "PROFILE" else a for a in args]
  result = subprocess.run([sys.executable, "-m", "dino_jax.bench", "--config", "configs/dinov2_vits14.py:tiny", *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0 and result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-2000:]
  assert "Traceback" not in result.stderr


def state_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_next_batch_to_try_follows_the_line_through_the_tries():
  assert bench.next_batch_to_try({1: 3.0}, 1, None, 10.0) == 2  # one try: double
  assert bench.next_batch_to_try({1: 3.0, 2: 4.0}, 2, None, 10.0) == 8  # 2 + b GiB reaches 10 GiB at b = 8
  assert bench.next_batch_to_try({1: 3.0, 2: 4.0, 9: 11.0}, 2, 9, 10.0) == 8  # the bracket's line
  assert bench.next_batch_to_try({1: 3.0, 2: 3.0}, 2, None, 10.0) == 4  # the peak does not grow: double


@pytest.mark.parametrize("peak,limit,best", [
    (lambda b: 1 + b ** 0.5, 20.0, 361),  # concave: the line through the tries overshoots
    (lambda b: 1 + 4 * -(-b // 16), 30.0, 112),  # steps of 16 images
    (lambda b: 2 + b, 1000.0, 998),
])
def test_find_max_batch_on_curves_the_line_misjudges(monkeypatch, peak, limit, best):
  monkeypatch.setattr(bench, "memory_report", lambda c: {"memory_gib": {"peak": peak(c.batch_size // 8)}})
  result = bench.find_max_batch(tiny_for_memory(), limit)
  assert result["batch_per_device"] == best and len(result["tried"]) <= 16


def test_memory_report_counts_the_state_per_device():
  """The compiled step's arguments are the train state and the batch: all of the state on each
  device when replicated, about an eighth of its large arrays with FSDP over 8 devices."""
  cfg = tiny_for_memory()
  report = bench.memory_report(cfg)
  trainer = learner.build(cfg, sharding.make_mesh(cfg), 1000, abstract=True)
  assert isinstance(jax.tree.leaves(trainer.state)[0], jax.ShapeDtypeStruct)  # nothing allocated
  state = state_bytes(trainer.state)
  batch = state_bytes(bench.abstract_batch(cfg, trainer)) / 8
  m = report["memory_gib"]
  assert set(m) == {"argument", "output", "alias", "temp", "peak"}
  assert m["argument"] * bench.GIB == pytest.approx(state + batch, rel=0.01)
  assert m["alias"] * bench.GIB == pytest.approx(state, rel=0.01)  # the donated state becomes the new one
  assert m["temp"] > 0 and m["peak"] == pytest.approx(m["argument"] + m["output"] - m["alias"] + m["temp"])
  assert report["fits_gib"] == {"16": True, "32": True, "80": True, "95": True}
  assert report["batch_per_device"] == 2 and report["devices"] == 8
  split = bench.memory_report(tiny_for_memory(**{"mesh.fsdp": 8, "mesh.fsdp_min_size": 1024}))
  assert split["memory_gib"]["argument"] < 0.5 * m["argument"]


def tiny_for_memory(**overrides):
  cfg = dinov2_vits14.get_config("tiny")  # iBOT masks in the batch, separate heads
  cfg.head.update(out_dim=4096)  # a head large enough to dominate the state
  cfg.update_from_flattened_dict(overrides)
  return cfg


def test_find_max_batch_is_the_largest_that_fits(monkeypatch):
  # One group of the whole batch at every size: with groups of 8 the peak bends where they stop
  # spanning devices (their branches on every sample, then on the kept ones only).
  cfg = tiny_for_memory(per_gpu_batch_size=0)
  reports, compile_report = {}, bench.memory_report

  def memory_report(c):  # each batch compiled once, the limit's batch included
    if c.batch_size not in reports:
      reports[c.batch_size] = compile_report(c)
    return reports[c.batch_size]

  monkeypatch.setattr(bench, "memory_report", memory_report)
  limit = bench.memory_report(cfg)["memory_gib"]["peak"] * 3  # 2 per device, three times over
  result = bench.find_max_batch(cfg, limit)
  best = result["batch_per_device"]
  assert result["tried"][best] <= limit < result["tried"][best + 1]
  assert best > 4 and result["batch_size"] == 8 * best
  assert list(result["tried"])[:2] == [1, 2] and len(result["tried"]) <= 5  # lines through tries, not bisection
  with pytest.raises(UsageError, match="a batch of 1 per device needs"):
    bench.find_max_batch(cfg, 1e-6)


@pytest.mark.parametrize("module", [dinov2_vits14, dino_vits16])
def test_against_pytorch_times_both_steps_on_the_tiny_config(module):
  """The same DINOv2 step (iBOT, KoLeo, Sinkhorn-Knopp, local crops) or DINO step (centering,
  fixed-gain heads) in PyTorch eager, on one device each: the same trainable parameter count,
  finite losses, both medians and their ratio (no timing assertions)."""
  pytest.importorskip("torch")
  from dino_jax import bench_pytorch  # pylint: disable=import-outside-toplevel
  cfg = module.get_config("tiny")
  cfg.model.dtype = "auto"  # the recipes' default: float32 on this CPU, on both sides
  result = bench.against_pytorch(cfg, steps=2, warmup=1, peak_tflops=1.0)
  assert result["dtype"] == "float32"
  assert result["torch_device"] == "cpu" and result["devices"] == 1 and len(result["jax_step_s"]) == 2
  assert result["omp_wait_policy"] == os.environ["OMP_WAIT_POLICY"]  # PASSIVE unless the caller chose
  assert result["ibot"] == (module is dinov2_vits14)
  assert result["speedup"] == pytest.approx(result["torch_step_s_median"] / result["jax_step_s_median"])
  assert result["jax_images_per_s"] == pytest.approx(16 / result["jax_step_s_median"])
  assert result["jax_mfu"] == pytest.approx(result["tflop_per_step"] / result["jax_step_s_median"])
  assert np.isfinite(result["jax_loss"]) and np.isfinite(result["torch_loss"])
  assert result["host_cpu"] == bench.host_cpu()["host_cpu"] and result["xla_flags"] == os.environ.get("XLA_FLAGS", "")
  tokens = (cfg.aug.global_size // cfg.model.patch_size) ** 2 + 1 + cfg.model.num_registers
  assert result["matmul_shape"] == [2 * cfg.batch_size * tokens, cfg.model.width, cfg.model.mlp_dim]
  assert min(result["jax_matmul_tflops"], result["torch_matmul_tflops"]) > 0
  assert result["matmul_floor_s"] == pytest.approx(
      result["tflop_per_step"] / max(result["jax_matmul_tflops"], result["torch_matmul_tflops"]))
  assert result["speedup_ceiling"] == pytest.approx(result["torch_step_s_median"] / result["matmul_floor_s"])
  torch_step = bench_pytorch.TorchStep(cfg, "cpu")
  assert torch_step.num_student_params() == pytest.approx(result["student_params_m"] * 1e6)
  with pytest.raises(UsageError, match="not the same architecture"):
    bench_pytorch.check_same_size(torch_step.num_student_params() + 1, torch_step.num_student_params())


def test_against_pytorch_lays_views_and_masks_out_crop_major():
  """The official collate's order: view v of image b is row v * B + b, for crops and masks alike."""
  pytest.importorskip("torch")
  from dino_jax import bench_pytorch  # pylint: disable=import-outside-toplevel
  torch_step = bench_pytorch.TorchStep(dinov2_vits14.get_config("tiny"), "cpu")
  b, v, p = 3, 2, 16
  views = np.arange(b * v, dtype=np.float32).reshape(b, v, 1, 1, 1) * np.ones((b, v, 4, 4, 3), np.float32)
  masks = np.zeros((b, v, p), bool)
  for i in range(b):
    for j in range(v):
      masks[i, j, i * v + j] = True  # image i, view j marks patch i * v + j
  out = torch_step.inputs({"global": views}, masks)
  for i in range(b):
    for j in range(v):
      assert float(out["global"][j * b + i, 0, 0, 0]) == i * v + j
      assert bool(out["masks"][j * b + i, i * v + j]) and int(out["masks"][j * b + i].sum()) == 1


def test_against_pytorch_runs_the_ibot_heads_on_the_official_upperbound_buffer():
  """As the official step: the teacher's and the student's iBOT heads each see the collate's
  `upperbound` rows per GPU (sum over its masked images of int(P * the top of their ratio's
  slice); here the batch of 2 official GPUs),
  the student's DINO head one batch of all crops' CLS tokens; padding changes no real row."""
  pytest.importorskip("torch")
  import torch  # pylint: disable=import-outside-toplevel
  from dino_jax import bench_pytorch  # pylint: disable=import-outside-toplevel
  cfg = dinov2_vits14.get_config("tiny")
  trainer = learner.build(cfg, sharding.make_mesh(cfg, jax.devices()[:1]), steps_per_epoch=10)
  host = jax.device_get(bench.random_batches(cfg, trainer)(0))
  torch_step = bench_pytorch.TorchStep(cfg, "cpu")
  batch = torch_step.inputs({k: v for k, v in host.items() if k != "masks"}, host["masks"])
  images, patches = batch["masks"].shape
  gpu_images = 2 * cfg.per_gpu_batch_size  # the global crops of one official GPU, which has its own buffer
  tops = np.linspace(*cfg.mask.mask_ratio, int(gpu_images * cfg.mask.mask_prob) + 1)[1:]
  upperbound = images // gpu_images * sum(int(patches * top) for top in tops)
  assert torch_step.upperbound(batch["masks"]) == upperbound > int(batch["masks"].sum())
  rows = {}
  for name, net in (("teacher", torch_step.teacher), ("student", torch_step.student)):
    for head in ("head", "ibot_head"):
      getattr(net, head).register_forward_hook(
          lambda module, args, out, key=(name, head): rows.setdefault(key, []).append(len(args[0])))
  torch_step(batch)
  b = cfg.batch_size
  assert rows == {("teacher", "head"): [2 * b], ("teacher", "ibot_head"): [upperbound],
                  ("student", "head"): [(2 + cfg.aug.num_local) * b], ("student", "ibot_head"): [upperbound]}
  tokens = torch.randn(5, cfg.model.width)
  head = torch_step.student.ibot_head
  torch.testing.assert_close(bench_pytorch.padded_head(head, tokens, 9), head(tokens), rtol=1e-5, atol=1e-6)


def test_against_pytorch_refuses_steps_it_does_not_rebuild():
  pytest.importorskip("torch")
  from configs import esvit_swin_t  # pylint: disable=import-outside-toplevel
  from dino_jax import bench_pytorch  # pylint: disable=import-outside-toplevel
  with pytest.raises(UsageError, match="builds ViT steps"):
    bench_pytorch.check_comparable(esvit_swin_t.get_config("tiny"), "cpu")
  with pytest.raises(UsageError, match="GPU or CPU; JAX's backend is tpu"):
    bench_pytorch.check_comparable(dinov2_vits14.get_config("tiny"), "tpu")


def test_pytorch_stochastic_depth_runs_branches_on_the_kept_subset_only():
  """As DINOv2 (and dino_jax's subset_drop_path, model.drop_path_mode "subset"): the branch sees k
  of n samples; DINO's per-sample mask otherwise."""
  torch = pytest.importorskip("torch")
  from dino_jax import bench_pytorch  # pylint: disable=import-outside-toplevel
  seen = []
  branch = lambda y: seen.append(y.shape[0]) or y * 2
  x = torch.ones(10, 3, 4)
  out = bench_pytorch.residual(x, branch, 0.4, training=True, subset=True)
  kept = torch.isclose(out[:, 0, 0], torch.tensor(1 + 2 * 10 / 6))
  assert seen == [6] and int(kept.sum()) == 6 and bool((out[~kept] == 1).all())
  assert torch.equal(bench_pytorch.residual(x, branch, 0.4, training=False, subset=True), 3 * x)
  seen.clear()
  out = bench_pytorch.residual(x, branch, 0.4, training=True, subset=False)
  assert seen == [10]  # every sample through the branch, each kept or dropped whole
  assert all(np.isclose(v, 1.0) or np.isclose(v, 1 + 2 / 0.6) for v in out[:, 0, 0].numpy())
