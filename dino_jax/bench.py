r"""Times the full DINO / DINOv2 train step of a config on this host's devices.

  python -m dino_jax.bench --config configs/dino_vits16.py --config.batch_size=8 --config.aug.num_local=8

One timed step is what the devices do per training step: the multi-crop augmentation of a
uint8 batch and `train_step` (teacher forward, student forward + backward, optimizer, EMA),
with block_until_ready after each. Prints the median of `--steps` steps after `--warmup`,
images/s, compile time, achieved TFLOP/s and MFU (from `train_step_flops` and the device's
peak, `--peak_tflops` or the table below), and peak device memory, and appends one JSON line
to `--json`. Input decoding on the host is not timed (the trainer prefetches it in a thread).

  python -m dino_jax.bench --config configs/dino_vits16.py --loader [--loader_images N] [--loader_workers W]

times the host side instead: decoding and cutting the config's crops (`data.read_views`: 2
global + N local random-resized crops from the full image, JPEG reduced-size decoding) with W
threads, on the training data when `data.source` is `folder`, else on N generated 500x375
JPEG files of real images (the bundled Fashion-MNIST ones, upsampled and tiled; about an
average ImageNet photo's size). A TFDS source hands over decoded arrays (no reduced-size
decode), so its rate is not what this measures. Prints images/s and images/s per core (the threads share
min(W, cores) cores).

  python -m dino_jax.bench --config configs/dinov2_vitg14.py --config.mesh.fsdp=8 --memory
  python -m dino_jax.bench --config configs/dinov2_vitl14.py --find_max_batch [--memory_limit_gib 80]

compile the step from shapes alone (nothing allocated) and print its per-device memory
(`memory_report`), or search the largest per-device batch that fits (`find_max_batch`).

  python -m dino_jax.bench --config configs/dinov2_vitl14.py --profile_dir runs/profile

also traces one more step with `jax.profiler` after the timed ones (TensorBoard's profile
plugin or Perfetto open the trace) and prints the XLA ops that took the most device time.
"""
import collections
import contextlib
import json
import os
import pathlib
import platform
import re
import statistics
import tempfile
import time

from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from dino_jax import cli
from dino_jax import config_checks
from dino_jax import crops
from dino_jax import data
from dino_jax import distill
from dino_jax import host_memory
from dino_jax import learner
from dino_jax import models
from dino_jax import objectives
from dino_jax import sharding
from dino_jax.errors import UsageError
from dino_jax.errors import fail

PEAK_TFLOPS = {  # dense bf16 per device, from the vendors' data sheets
    "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100": 989.0, "NVIDIA H200": 989.0,
    "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0,
    "TPU v4": 275.0, "TPU v5 lite": 197.0, "TPU v5": 459.0, "TPU v6 lite": 918.0,
}


def head_forward_flops(cfg, embed_dim: int, tokens: float, head=None) -> float:
  """Forward FLOPs of a DINO head (`head`, default cfg.head) on `tokens` vectors: its linear
  layers, 2·in·out each."""
  h, d = head or cfg.head, embed_dim
  dims = [d] + [h.hidden_dim] * (h.num_layers - 1) + [h.bottleneck_dim, h.out_dim]
  return tokens * sum(2 * a * b for a, b in zip(dims[:-1], dims[1:]))


def forward_flops(cfg, model_cfg, head_cfg, with_local: bool) -> float:
  """Forward FLOPs of one network of the step on the batch's global crops (and local ones):
  the backbone's `forward_flops`, the heads on each global embedding, with iBOT on the masked
  patch tokens (their expected count at the config's mask ratio; every patch when
  distilling), with EsViT's region loss on every region token."""
  a, b = cfg.aug, cfg.batch_size
  backbone = models.make_backbone(model_cfg)
  names = objectives.active(cfg)

  def per_view(size):
    h, w = backbone.grid(size)
    tokens = 1 + (h * w if "region" in names else 0)
    return backbone.forward_flops(size) + head_forward_flops(cfg, backbone.embed_dim, tokens, head_cfg)

  out = 2 * b * per_view(a.global_size) + (a.num_local * b * per_view(a.local_size) if with_local else 0)
  if "ibot" in names:
    h, w = backbone.grid(a.global_size)
    patches = h * w if distill.active(cfg) else cfg.mask.mask_prob * np.mean(cfg.mask.mask_ratio) * h * w
    out += 2 * b * head_forward_flops(cfg, backbone.embed_dim, patches, head_cfg)
  return out


def train_step_flops(cfg) -> float:
  """FLOPs of one train step: the teacher's forward on the 2 global crops (the frozen teacher's
  when distilling), the student's forward and backward (3x forward) on all crops."""
  teacher = (cfg.distill.model, cfg.distill.head) if distill.active(cfg) else (cfg.model, cfg.head)
  return forward_flops(cfg, *teacher, with_local=False) + 3 * forward_flops(cfg, cfg.model, cfg.head, True)


def host_cpu(cpuinfo: str | None = None) -> dict:
  """This host's CPU, recorded beside every timing: its model, the cores the process may use,
  the widest x86 vector extension (XLA's CPU kernels and their speed against PyTorch's differ
  between AVX2 and AVX-512 machines: docs/performance.md), and the run's XLA_FLAGS.
  `cpuinfo`: the text of /proc/cpuinfo (read here when None; absent off Linux)."""
  if cpuinfo is None:
    try:
      cpuinfo = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
      cpuinfo = ""
  fields = {}
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    fields.setdefault(key.strip(), value.strip())  # the first processor's
  features = set(fields.get("flags", "").split())
  return {"host_cpu": fields.get("model name") or platform.processor() or platform.machine(),
          "host_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
          "host_vector_isa": next((isa for isa in ("avx512f", "avx2", "avx") if isa in features), None),
          "xla_flags": os.environ.get("XLA_FLAGS", "")}


def device_line(result: dict) -> str:
  """"cpu x1 (AMD EPYC, 2 cores, avx2)": the devices and, on CPUs, the host `host_cpu` names."""
  line = f"{result['device']} x{result['devices']}"
  if result["device"] == "cpu":
    named = [result["host_cpu"], f"{result['host_cores']} cores", result["host_vector_isa"]]
    line += f" ({', '.join(n for n in named if n)})"
  return line


def peak_memory_bytes() -> int | None:
  stats = [d.memory_stats() for d in jax.local_devices()]
  return max((s or {}).get("peak_bytes_in_use", 0) for s in stats) or None


def num_params(state) -> int:
  """The student's parameter count (arrays or shapes)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))


def random_batches(cfg: ml_collections.ConfigDict, trainer: learner.Trainer):
  """step -> the train step's batch: the step's augmentation (`make_views`) of fixed random
  uint8 crops, and the iBOT masks of step 0."""
  rng, a = np.random.default_rng(0), cfg.aug
  crops = {"global": rng.integers(0, 256, (cfg.batch_size, 2, a.global_size, a.global_size, 3), np.uint8)}
  if a.num_local:
    crops["local"] = rng.integers(0, 256, (cfg.batch_size, a.num_local, a.local_size, a.local_size, 3), np.uint8)
  crops = jax.device_put(crops, trainer.batch_sharding)
  key = learner.augmentation_key(cfg)
  masks = {"masks": jax.device_put(trainer.step_masks(0), trainer.batch_sharding)} if trainer.step_masks else {}
  return lambda step: dict(trainer.make_views(key, step, crops)) | masks


def benchmark(cfg: ml_collections.ConfigDict, steps: int, warmup: int, peak_tflops: float | None,
              profile_dir: str = "") -> dict:
  """Compiles, warms up and times `steps` train steps on random crops; returns the figures.
  With `profile_dir`, one more step is traced there and the result holds its `op_times`."""
  mesh = sharding.make_mesh(cfg)
  config_checks.check(cfg, mesh.size)
  trainer = learner.build(cfg, mesh, steps_per_epoch=1000)
  batch_of = random_batches(cfg, trainer)

  start = time.perf_counter()
  batch = batch_of(0)
  compiled_step = trainer.compile_step(trainer.state, batch)
  compiled = compiled_step.run
  compile_s = time.perf_counter() - start
  state, times = trainer.state, []
  for step in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch_of(step))
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times[warmup:])
  profile = {}
  if profile_dir:
    with jax.profiler.trace(profile_dir):
      jax.block_until_ready(compiled(state, batch_of(0)))
    trace = max(pathlib.Path(profile_dir).glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    profile = {"profile": str(trace), "op_times": op_times(jax.profiler.ProfileData.from_file(str(trace)),
                                                                compiled_step.compiled.as_text())}
  flops = train_step_flops(cfg)
  kind = jax.devices()[0].device_kind
  peak = peak_tflops or PEAK_TFLOPS.get(kind)
  achieved = flops / step_s / 1e12
  return {
      "device": kind, "devices": jax.device_count(), "mesh": dict(mesh.shape), "dtype": cfg.model.dtype,
      "model": cfg.model.to_dict(),
      "batch_size": cfg.batch_size, "crops": f"2x{cfg.aug.global_size} + {cfg.aug.num_local}x{cfg.aug.local_size}",
      "head_out_dim": cfg.head.out_dim, "ibot": cfg.loss.ibot_weight > 0, "steps_timed": steps,
      "step_s_median": step_s, "step_s_min": min(times[warmup:]), "step_s_max": max(times[warmup:]),
      "images_per_s": cfg.batch_size / step_s, "compile_s": compile_s,
      "tflop_per_step": flops / 1e12, "tflops_per_s": achieved,
      "mfu": achieved / (peak * jax.device_count()) if peak else None,
      "peak_memory_gib": (peak_memory_bytes() or 0) / 2 ** 30 or None, **host_cpu(),
      "compiled_memory": compiled_memory(compiled_step.compiled),
      "xla_cost": xla_cost(compiled_step.compiled),
      "loss_finite": bool(np.isfinite(float(metrics["loss"]))),
  } | profile


CONTROL_FLOW_OPS = ("while", "conditional", "call")  # their events span their bodies' ops


def op_times(profile: jax.profiler.ProfileData, hlo_text: str = "") -> list[dict]:
  """Device seconds per op of a trace, the 100 largest, each with its share of the total, its
  number of launches and the JAX op it was made from (`op_name` in the compiled module
  `hlo_text`, where the op is named there). What an op is depends on the backend's trace: on a
  TPU the events of the device's "XLA Ops" line; on a GPU each kernel on the device's streams,
  by kernel name (XLA's fusions, cuBLAS's matmuls, cuDNN's attention; XLA runs most of them
  inside opaque command buffers); on the CPU the host's events of an HLO op, without the
  control-flow ops whose events span their bodies' ops."""
  lines = [line for p in profile.planes if p.name.startswith("/device:") for line in p.lines]
  device_ops = ([line for line in lines if line.name == "XLA Ops"]  # TPU
                or [line for line in lines if line.name.startswith("Stream")])  # GPU
  if device_ops:
    events = [(e.name, e) for line in device_ops for e in line.events]
  else:
    events = [(stats["hlo_op"], e) for p in profile.planes for line in p.lines for e in line.events
              if "hlo_op" in (stats := dict(e.stats)) and stats["hlo_op"].split(".")[0] not in CONTROL_FLOW_OPS]
  op_names = {}
  for name, op_name in re.findall(r"^\s*%?([\w.\-]+) = .*?op_name=\"([^\"]+)\"", hlo_text, re.M):
    op_names[name] = op_names[name.replace(".", "_")] = op_name  # GPU kernels: fusion.3 -> fusion_3
  seconds, launches = collections.Counter(), collections.Counter()
  for name, e in events:
    seconds[name] += e.duration_ns / 1e9
    launches[name] += 1
  total = sum(seconds.values()) or 1.0
  return [{"op": name, "seconds": s, "share": s / total, "launches": launches[name], "source": op_names.get(name, "")}
          for name, s in seconds.most_common(100)]


# ---------------------------------------------------------------------------------------
# The same step in PyTorch (dino_jax.bench_pytorch), timed in the same process.
# ---------------------------------------------------------------------------------------


def ffn_matmul_shape(cfg: ml_collections.ConfigDict) -> tuple[int, int, int]:
  """(m, k, n) of the ViT's first FFN layer on the batch's global crops, [m, k] x [k, n]: the
  step's largest and most frequent matmul shape (with the second layer's transpose)."""
  backbone = models.make_backbone(cfg.model)
  h, w = backbone.grid(cfg.aug.global_size)
  ffn_width = backbone.mlp_dim * (2 if backbone.ffn == "swiglu" else 1)  # SwiGLU's first layer: both halves
  return 2 * cfg.batch_size * (h * w + 1 + backbone.num_registers), backbone.width, ffn_width


def median_seconds(run, repeats: int) -> float:
  """Median wall time of `run()`, a call that waits for its result, over `repeats` calls."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def jax_matmul(shape: tuple[int, int, int], dtype: str):
  """A call that multiplies random [m, k] and [k, n] arrays in `dtype` on the first device and
  waits for the product."""
  m, k, n = shape
  a, b = (jax.device_put(jax.random.normal(jax.random.key(i), s, dtype), jax.devices()[0])
          for i, s in enumerate([(m, k), (k, n)]))
  product = jax.jit(jax.numpy.matmul)
  return lambda: jax.block_until_ready(product(a, b))


def against_pytorch(cfg: ml_collections.ConfigDict, steps: int, warmup: int, peak_tflops: float | None) -> dict:
  """Times the config's JAX train step and the same step in PyTorch eager
  (`bench_pytorch.TorchStep`) on the same augmented views and iBOT masks, alternating one
  step of each; returns both medians and the ratio of images/s (JAX over PyTorch). The
  augmentation is made once and timed on neither side (PyTorch's runs in its loader). Both run
  on one device: JAX on the first of this host's, PyTorch on the GPU or the CPU beside it."""
  from dino_jax import bench_pytorch  # pylint: disable=import-outside-toplevel  (torch: test extras)
  device = bench_pytorch.check_comparable(cfg, jax.default_backend())
  cfg = cfg.copy_and_resolve_references()
  cfg.mesh.fsdp = 1
  cfg.model.dtype = models.compute_dtype(cfg.model.dtype).name  # "auto" as training resolves it, for both sides
  config_checks.check(cfg, 1)
  trainer = learner.build(cfg, sharding.make_mesh(cfg, jax.devices()[:1]), steps_per_epoch=1000)
  batch = random_batches(cfg, trainer)(0)
  start = time.perf_counter()
  compiled = trainer.compile_step(trainer.state, batch).run
  compile_s = time.perf_counter() - start
  torch_step = bench_pytorch.TorchStep(cfg, device)
  jax_params = num_params(trainer.state)
  bench_pytorch.check_same_size(torch_step.num_student_params(), jax_params)
  host = jax.device_get(batch)
  torch_batch = torch_step.inputs({k: v for k, v in host.items() if k != "masks"}, host.get("masks"))
  state, jax_times, torch_times = trainer.state, [], []
  for _ in range(warmup + steps):
    start = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    jax_times.append(time.perf_counter() - start)
    start = time.perf_counter()
    torch_loss = torch_step(torch_batch)
    torch_step.synchronize()
    torch_times.append(time.perf_counter() - start)
  jax_s, torch_s = statistics.median(jax_times[warmup:]), statistics.median(torch_times[warmup:])
  flops, kind = train_step_flops(cfg), jax.devices()[0].device_kind
  shape = ffn_matmul_shape(cfg)
  runs = {"jax": jax_matmul(shape, cfg.model.dtype), "torch": bench_pytorch.matmul(shape, cfg.model.dtype, device)}
  for run in runs.values():
    run()  # compiles, warms up
  matmul = {side: 2 * np.prod(shape) / median_seconds(run, 5) / 1e12 for side, run in runs.items()}  # TFLOP/s
  floor_s = flops / max(matmul.values()) / 1e12  # every FLOP of the step at the faster library's matmul rate
  peak = (peak_tflops or PEAK_TFLOPS.get(kind) or 0) * 1e12
  mfu = lambda seconds: flops / seconds / peak if peak else None  # model FLOPs (train_step_flops)
  return {"device": kind, "devices": 1, "torch_device": device,
          "torch_threads": bench_pytorch.num_threads(),
          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "dtype": cfg.model.dtype, "batch_size": cfg.batch_size,
          "crops": f"2x{cfg.aug.global_size} + {cfg.aug.num_local}x{cfg.aug.local_size}",
          "head_out_dim": cfg.head.out_dim, "ibot": cfg.loss.ibot_weight > 0, "student_params_m": jax_params / 1e6,
          "steps_timed": steps, "compile_s": compile_s, "tflop_per_step": flops / 1e12,
          "jax_step_s": jax_times[warmup:], "torch_step_s": torch_times[warmup:],
          "jax_step_s_median": jax_s, "torch_step_s_median": torch_s,
          "jax_images_per_s": cfg.batch_size / jax_s, "torch_images_per_s": cfg.batch_size / torch_s,
          "jax_mfu": mfu(jax_s), "torch_mfu": mfu(torch_s), "speedup": torch_s / jax_s,
          "matmul_shape": list(shape), "jax_matmul_tflops": matmul["jax"], "torch_matmul_tflops": matmul["torch"],
          "matmul_floor_s": floor_s, "speedup_ceiling": torch_s / floor_s,
          "jax_loss": float(metrics["loss"]), "torch_loss": torch_loss, **host_cpu()}


# ---------------------------------------------------------------------------------------
# Memory of the compiled step, without running it.
# ---------------------------------------------------------------------------------------

GIB = 2 ** 30
DEVICE_GIB = (16, 32, 80, 95)  # e.g. TPU v5e / V100 16, TPU v4 32, A100 / H100 80, TPU v5p 95


def compiled_memory(compiled) -> dict:
  """Per-device memory of a compiled program (XLA's `memory_analysis`), in GiB: arguments (the
  state and the batch), outputs, aliased (donated state reused as outputs), temporaries (XLA's
  buffer assignment: the live intermediates at their peak), and peak = arguments + outputs -
  aliased + temporaries. (XLA's own `peak_memory_in_bytes` leaves the temporaries out on CPU.)"""
  m = compiled.memory_analysis()
  if m is None:  # a backend without the analysis
    return None
  out = {k: getattr(m, f"{k}_size_in_bytes") / GIB for k in ("argument", "output", "alias", "temp")}
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def xla_cost(compiled) -> dict | None:
  """XLA's own count of a compiled program's work (`cost_analysis`): TFLOP and GB accessed
  (bytes read and written by its ops, a measure of the non-matmul traffic an A/B removes)."""
  cost = compiled.cost_analysis()
  if not cost:  # a backend without the analysis
    return None
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"tflop": cost.get("flops", 0.0) / 1e12, "gb_accessed": cost.get("bytes accessed", 0.0) / 1e9}


def abstract_batch(cfg, trainer) -> dict:
  """The train step's batch (augmented views, iBOT masks) of `cfg.batch_size` as shapes."""
  a, sh = cfg.aug, trainer.batch_sharding
  crops = {"global": jax.ShapeDtypeStruct((cfg.batch_size, 2, a.global_size, a.global_size, 3), np.uint8, sharding=sh)}
  if a.num_local:
    crops["local"] = jax.ShapeDtypeStruct((cfg.batch_size, a.num_local, a.local_size, a.local_size, 3), np.uint8,
                                          sharding=sh)
  views = jax.eval_shape(trainer.make_views, jax.ShapeDtypeStruct((2,), np.uint32), 0, crops)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sh) for k, v in views.items()}
  if trainer.step_masks:
    h, w = trainer.model.backbone.grid(a.global_size)
    batch["masks"] = jax.ShapeDtypeStruct((cfg.batch_size, 2, h * w), bool, sharding=sh)
  return batch


def memory_report(cfg: ml_collections.ConfigDict) -> dict:
  """Compiles the config's train step for this host's devices (real or fake:
  XLA_FLAGS=--xla_force_host_platform_device_count=N) from shapes only, nothing allocated, and
  returns its per-device memory (`compiled_memory`), the compile time and which device sizes
  (`DEVICE_GIB`) it fits."""
  mesh = sharding.make_mesh(cfg)
  config_checks.check(cfg, mesh.size)
  trainer = learner.build(cfg, mesh, steps_per_epoch=1000, abstract=True)
  start = time.perf_counter()
  step = trainer.compile_step(trainer.state, abstract_batch(cfg, trainer))
  compile_s = time.perf_counter() - start
  memory = compiled_memory(step.compiled)
  if memory is None:
    raise UsageError(f"the {jax.default_backend()} backend gives no memory analysis of compiled programs")
  params = num_params(trainer.state)
  return {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "mesh": dict(mesh.shape),
          "dtype": cfg.model.dtype, "remat": cfg.model.remat, "batch_size": cfg.batch_size,
          "batch_per_device": cfg.batch_size // mesh.size,
          "crops": f"2x{cfg.aug.global_size} + {cfg.aug.num_local}x{cfg.aug.local_size}",
          "student_params_m": params / 1e6, "compile_s": compile_s, "memory_gib": memory,
          "fits_gib": {str(g): memory["peak"] <= g for g in DEVICE_GIB}}


def find_max_batch(cfg: ml_collections.ConfigDict, limit_gib: float, largest: int = 4096) -> dict:
  """The largest per-device batch whose compiled step's peak memory (`memory_report`) fits in
  `limit_gib` per device; compiles only, so it works on any backend. The peak grows about
  linearly with the batch, so each try is where the line through the two nearest tries meets
  the limit, kept inside the bracket of the largest batch that fits and the smallest that does
  not (doubling while none fails), bisecting after a try that did not halve the bracket: a
  handful of compiles. Returns {"batch_per_device",
  "batch_size", "report" of that batch, "tried": {per-device batch: peak GiB}}."""
  devices = sharding.make_mesh(cfg).size
  tried, reports = {}, {}

  def fits(per_device: int) -> bool:
    c = cfg.copy_and_resolve_references()
    c.batch_size = per_device * devices
    reports[per_device] = memory_report(c)
    tried[per_device] = reports[per_device]["memory_gib"]["peak"]
    return tried[per_device] <= limit_gib

  if not fits(1):
    raise UsageError(f"a batch of 1 per device needs {tried[1]:.2f} GiB per device, more than "
                     f"--memory_limit_gib={limit_gib:g}")
  low, high = 1, None  # the largest batch that fits, the smallest that does not
  bisect = False  # after a try that did not halve the bracket (a curve the line misjudges)
  while (high is None and low < largest) or (high is not None and high - low > 1):
    top = largest if high is None else high - 1
    guess = (low + high) // 2 if bisect else next_batch_to_try(tried, low, high, limit_gib)
    b = min(max(guess, low + 1), top)
    width = None if high is None else high - low
    low, high = (b, high) if fits(b) else (low, b)
    bisect = width is not None and high - low > width / 2 and not bisect
  return {"batch_per_device": low, "batch_size": low * devices, "limit_gib": limit_gib,
          "at_search_limit": high is None, "report": reports[low], "tried": tried}


def next_batch_to_try(tried: dict, low: int, high: int | None, limit_gib: float) -> int:
  """Where the line through `low`'s try and its nearest other try (`high`'s once a batch has
  failed) reaches `limit_gib`; double `low` while only one batch was tried or the peak does not
  grow."""
  other = high if high is not None else max((b for b in tried if b < low), default=None)
  if other is None:
    return 2 * low
  slope = (tried[other] - tried[low]) / (other - low)
  if slope <= 0:
    return 2 * low
  return int(low + (limit_gib - tried[low]) / slope)


def photo_jpegs(folder: pathlib.Path, count: int) -> None:
  """`count` 500x375 JPEG photos (quality 90) made of bundled Fashion-MNIST images: 4x3 tiles
  of 125 px upsampled 28 px images, each tile tinted, so they compress like real content."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with np.load(data.DEMO_FILE, allow_pickle=False) as d:
    images = d["train_images"]
  rng = np.random.default_rng(0)
  for i in range(count):
    tiles = [np.asarray(Image.fromarray(images[j]).resize((125, 125), Image.BICUBIC))
             for j in rng.integers(0, len(images), 12)]
    gray = np.vstack([np.hstack(tiles[r * 4:(r + 1) * 4]) for r in range(3)]).astype(np.float32)
    tint = rng.uniform(0.4, 1.0, 3)
    rgb = np.clip(gray[..., None] * tint + rng.uniform(0, 60, 3), 0, 255).astype(np.uint8)
    Image.fromarray(rgb).save(folder / f"{i:05d}.jpg", quality=90)


def gil_meter():
  """gil_load (a small C extension that times the GIL's lock calls) when this process was started
  under it, `python -m gil_load -m dino_jax.bench ...` after `pip install gil_load`; else None."""
  if "gil_load" not in os.environ.get("LD_PRELOAD", ""):
    return None
  import gil_load  # pylint: disable=import-outside-toplevel
  gil_load.init()
  return gil_load


def loader_benchmark(cfg: ml_collections.ConfigDict, images: int, workers: int, processes: int = 0,
                     repeats: int = 3) -> dict:
  """Host-side throughput of the loader the trainer runs (`data.train_batches`): steps of
  `images` images cut into the config's crops by `workers` threads in this process or, with
  `processes`, by that many grain worker processes of `workers` threads each. Images/s is the
  median of `repeats` windows of 4 x max(processes, 1) steps, after a first window that also
  takes the steps made ahead while the workers started. Under gil_load (`gil_meter`), also the
  share of that time this process's threads held the GIL: with threads, 1 / share bounds what
  more threads can gain on any host."""
  specs = crops.crop_specs(cfg.aug)
  with tempfile.TemporaryDirectory() as tmp:
    if cfg.data.source == "folder":
      source, what = data.make_source(cfg.data, cfg.data.train_split), f"folder {cfg.data.path}"
    else:
      photo_jpegs(pathlib.Path(tmp), images)
      source, what = data.FolderSource(tmp, cfg.data.image_size), f"{images} generated 500x375 JPEGs"
    count = min(images, len(source))
    meter = gil_meter()
    window, rates = 4 * max(processes, 1), []
    batches = data.train_batches(source, count, cfg.seed, 0, specs, workers=workers, worker_processes=processes)
    with contextlib.closing(batches):
      next(batches)  # the workers have started
      if meter:
        meter.start()
      for _ in range(repeats + 1):  # the first window also empties the batches made ahead while starting
        start = time.perf_counter()
        for _ in range(window):
          next(batches)
        rates.append(window * count / (time.perf_counter() - start))
      if meter:
        meter.stop()
  rate = statistics.median(rates[1:])
  host = host_cpu()
  cores = min(workers * max(processes, 1), host["host_cores"] or 1)
  return {"loader": what, "images": count, "workers": workers, "processes": processes, "cores_used": cores,
          "crops": f"2x{cfg.aug.global_size} + {cfg.aug.num_local}x{cfg.aug.local_size}",
          "images_per_s": rate, "images_per_s_per_core": rate / cores, "windows": rates[1:],
          "gil_held_share": meter.get()[0]["held"] if meter else None, **host}


# --config (with --config.key=value overrides) is the flag dino_jax.train defines.
flags.declare_key_flag("config")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_PEAK = flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s of one device for the MFU (default: table).")
_JSON = flags.DEFINE_string("json", "", "Append the result as a JSON line to this file.")
_LOADER = flags.DEFINE_bool("loader", False, "Time the host's decode + crops instead of the train step.")
_LOADER_IMAGES = flags.DEFINE_integer("loader_images", 256, "Images per timed pass of --loader.")
_LOADER_WORKERS = flags.DEFINE_integer("loader_workers", 0, "Threads of --loader (0: the config's data.workers), "
                                      "per process with --loader_processes.")
_LOADER_PROCESSES = flags.DEFINE_integer("loader_processes", -1, "Loader worker processes of --loader (grain; -1: the "
                                         "config's data.worker_processes; 0: threads in this process).")
_MEMORY = flags.DEFINE_bool("memory", False, "Compile only and report the step's per-device memory (any device "
                            "count: fake CPU devices with XLA_FLAGS=--xla_force_host_platform_device_count=N).")
_FIND_MAX_BATCH = flags.DEFINE_bool("find_max_batch", False, "Search the largest per-device batch whose step fits "
                                    "--memory_limit_gib (compiles only).")
_AGAINST_PYTORCH = flags.DEFINE_bool("against_pytorch", False, "Time the same step in PyTorch eager (timm's ViT, "
                                     "dino_jax.bench_pytorch) alternating with the JAX step; print the ratio and the "
                                     "ceiling the two libraries' matmul rate puts on it.")
_PROFILE_DIR = flags.DEFINE_string("profile_dir", "", "Trace one more step after the timed ones into this folder "
                                   "(jax.profiler) and print the XLA ops that took the most device time.")
_MEMORY_LIMIT = flags.DEFINE_float("memory_limit_gib", None, "Per-device memory for --find_max_batch (default: "
                                   "the device's own limit where the backend reports one).")
for _name in ("peak_tflops", "memory_limit_gib"):
  flags.register_validator(_name, lambda x: x is None or 0 < x < float("inf"),
                           message="must be a positive finite number")


def device_limit_gib() -> float | None:
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats["bytes_limit"] / GIB if stats.get("bytes_limit") else None


def print_memory(report: dict) -> None:
  m = report["memory_gib"]
  fits = ", ".join(f"{g} GiB {'yes' if ok else 'no'}" for g, ok in report["fits_gib"].items())
  print(f"{report['device']} x{report['devices']} (mesh {report['mesh']}), {report['student_params_m']:.1f}M "
        f"student parameters, batch {report['batch_size']} ({report['batch_per_device']} per device, "
        f"{report['crops']}), {report['dtype']}, remat {report['remat']}: per device arguments "
        f"{m['argument']:.2f} GiB, outputs {m['output']:.2f} (aliased {m['alias']:.2f}), temporaries "
        f"{m['temp']:.2f}, peak {m['peak']:.2f} GiB; fits: {fits}; compile {report['compile_s']:.1f} s")


def main(argv):
  del argv
  host_memory.keep_freed_memory()
  logging.set_verbosity(logging.WARNING)
  try:
    if cli.CONFIG.value is None:
      raise UsageError("--config is required")
    if _STEPS.value < 1 or _WARMUP.value < 0:
      raise UsageError("--steps must be >= 1 and --warmup >= 0")
    if _JSON.value:
      cli.output_file("--json", _JSON.value)
    if _FIND_MAX_BATCH.value + _MEMORY.value + _LOADER.value + _AGAINST_PYTORCH.value > 1:
      raise UsageError("--memory, --find_max_batch, --loader and --against_pytorch are separate modes: give one")
    if _PROFILE_DIR.value:
      if _FIND_MAX_BATCH.value + _MEMORY.value + _LOADER.value + _AGAINST_PYTORCH.value:
        raise UsageError("--profile_dir traces the timed train step: give it without --memory, --find_max_batch, "
                         "--loader or --against_pytorch")
      try:
        pathlib.Path(_PROFILE_DIR.value).mkdir(parents=True, exist_ok=True)
      except OSError as e:
        raise UsageError(f"--profile_dir {_PROFILE_DIR.value}: {e.strerror}") from e
    if _AGAINST_PYTORCH.value:
      result = against_pytorch(cli.CONFIG.value, _STEPS.value, _WARMUP.value, _PEAK.value)
      print(f"{device_line(result)}, PyTorch on {result['torch_device']} ("
            f"{result['torch_threads']} threads), batch {result['batch_size']} ({result['crops']}), "
            f"{result['dtype']}, median of {result['steps_timed']} alternating steps: JAX "
            f"{result['jax_step_s_median']:.3f} s/step = {result['jax_images_per_s']:.2f} images/s, PyTorch "
            f"{result['torch_step_s_median']:.3f} s/step = {result['torch_images_per_s']:.2f} images/s; "
            f"JAX / PyTorch images/s = {result['speedup']:.2f}x"
            + (f"; MFU JAX {100 * result['jax_mfu']:.1f}%, PyTorch {100 * result['torch_mfu']:.1f}%"
               if result["jax_mfu"] is not None else ""))
      m, k, n = result["matmul_shape"]
      print(f"one [{m}, {k}] x [{k}, {n}] matmul: JAX {result['jax_matmul_tflops']:.3f} TFLOP/s, PyTorch "
            f"{result['torch_matmul_tflops']:.3f}; the step's {result['tflop_per_step']:.3f} TFLOP at the faster "
            f"rate take {result['matmul_floor_s']:.3f} s, so no step of this work beats PyTorch's by more than "
            f"{result['speedup_ceiling']:.2f}x")
      write_json(result)
      return
    if _LOADER.value:
      if _LOADER_IMAGES.value < 1 or _LOADER_WORKERS.value < 0 or _LOADER_PROCESSES.value < -1:
        raise UsageError("--loader_images must be >= 1, --loader_workers >= 0 and --loader_processes >= -1")
      cfg = cli.CONFIG.value
      processes = _LOADER_PROCESSES.value if _LOADER_PROCESSES.value >= 0 else cfg.data.get("worker_processes", 0)
      result = loader_benchmark(cfg, _LOADER_IMAGES.value, _LOADER_WORKERS.value or cfg.data.get("workers", 8),
                                processes)
      makers = f"{processes} processes x {result['workers']} threads" if processes else f"{result['workers']} threads"
      gil = result["gil_held_share"]
      print(f"{result['loader']}, crops {result['crops']}: {result['images_per_s']:.1f} images/s with {makers} on "
            f"{result['cores_used']} cores of {result['host_cpu']} = {result['images_per_s_per_core']:.1f} "
            f"images/s per core"
            + ("" if gil is None else f"; this process held the GIL {100 * gil:.0f}% of the time"))
      write_json(result)
      return
    if _FIND_MAX_BATCH.value:
      limit = _MEMORY_LIMIT.value or device_limit_gib()
      if not limit or limit <= 0:
        raise UsageError("--find_max_batch needs --memory_limit_gib (this backend reports no memory limit)")
      result = find_max_batch(cli.CONFIG.value, limit)
      for per_device, peak in sorted(result["tried"].items()):
        print(f"  {per_device} per device: peak {peak:.2f} GiB {'fits' if peak <= limit else 'does not fit'}")
      print(f"largest batch that fits {limit:g} GiB per device: {result['batch_per_device']} per device "
            f"= {result['batch_size']} global" + (" (the search's limit; more may fit)" if result["at_search_limit"]
                                                  else ""))
      print_memory(result["report"])
    elif _MEMORY.value:
      result = memory_report(cli.CONFIG.value)
      print_memory(result)
    else:
      result = benchmark(cli.CONFIG.value, _STEPS.value, _WARMUP.value, _PEAK.value, _PROFILE_DIR.value)
  except UsageError as e:
    fail(str(e))
  if _FIND_MAX_BATCH.value or _MEMORY.value:
    write_json(result)
    return
  mfu = f"{100 * result['mfu']:.1f}%" if result["mfu"] is not None else "n/a (no peak for this device)"
  mem = f"{result['peak_memory_gib']:.2f} GiB" if result["peak_memory_gib"] else "n/a"
  print(f"{device_line(result)}, batch {result['batch_size']} ({result['crops']}), "
        f"{result['dtype']}: {result['step_s_median']:.3f} s/step (median of {result['steps_timed']}), "
        f"{result['images_per_s']:.2f} images/s, {result['tflops_per_s']:.3f} TFLOP/s, MFU {mfu}, "
        f"peak memory {mem}, compile {result['compile_s']:.1f} s")
  if "op_times" in result:
    print(f"device time per XLA op in the traced step ({result['profile']}):")
    for op in result["op_times"][:15]:
      print(f"  {100 * op['share']:5.1f}%  {1e3 * op['seconds']:9.2f} ms  x{op['launches']:<5d} {op['op'][:60]}  "
            f"{op['source'][:80]}")
  write_json(result)


def write_json(result: dict) -> None:
  """Prints `result` as a JSON line and appends it to --json."""
  line = json.dumps(result)
  print(line)
  if _JSON.value:
    with open(_JSON.value, "a") as f:
      f.write(line + "\n")


if __name__ == "__main__":
  cli.run(main)
