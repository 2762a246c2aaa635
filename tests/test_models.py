"""ViT backbone and DINO head (dino_jax.models), at width 32, depth 2."""
import functools
import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dinov2_vitl14
from dino_jax import learner
from dino_jax import models
from dino_jax.models import layers, vit

WIDTH, DEPTH, HEADS, PATCH, GRID = 32, 2, 2, 4, 4


def _vit(**kw):
  return models.ViT(**dict(dict(patch_size=PATCH, width=WIDTH, depth=DEPTH, num_heads=HEADS,
                                mlp_dim=64, pos_embed_grid=GRID), **kw))


@functools.partial(jax.jit, static_argnums=0)
def _init(model, key, x, mask=None):
  return model.init(key, x, mask=mask)["params"]


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, params, x, mask=None):
  return model.apply({"params": params}, x, mask=mask)


def _images(key, b, size):
  return jax.random.normal(key, (b, size, size, 3))


@pytest.fixture(scope="module")
def vit_with_params():
  model = _vit(num_registers=2)
  mask = jnp.zeros((1, GRID * GRID), bool)
  params = _init(model, jax.random.key(0), _images(jax.random.key(1), 1, 16), mask=mask)
  return model, params


def test_resize_pos_embed_identity_at_same_grid():
  pos = jax.random.normal(jax.random.key(0), (1, 4, 4, 8))
  np.testing.assert_array_equal(vit.resize_pos_embed(pos, (4, 4)), pos)


def test_resize_pos_embed_keeps_constant_field():
  pos = jnp.broadcast_to(jnp.arange(1.0, 9.0), (1, 4, 4, 8))
  out = vit.resize_pos_embed(pos, (7, 6))
  assert out.shape == (1, 7, 6, 8)
  np.testing.assert_allclose(out, jnp.broadcast_to(jnp.arange(1.0, 9.0), (1, 7, 6, 8)), rtol=1e-5)


def test_resize_pos_embed_interpolates_between_values():
  # A field varying along one axis stays within its range and keeps its ordering.
  ramp = jnp.broadcast_to(jnp.arange(4.0)[None, :, None, None], (1, 4, 4, 1))
  out = np.asarray(vit.resize_pos_embed(ramp, (8, 8)))[0, :, 0, 0]
  assert np.all(np.diff(out) > 0)
  assert out.min() >= -0.25 and out.max() <= 3.25


def test_vit_param_names_and_shapes(vit_with_params):
  _, params = vit_with_params
  assert params["pos_embed"].shape == (1, GRID, GRID, WIDTH)
  assert params["cls_token"].shape == (1, 1, WIDTH)
  assert params["register_tokens"].shape == (1, 2, WIDTH)
  assert params["mask_token"].shape == (1, 1, WIDTH)
  assert params["patch_embed"]["kernel"].shape == (PATCH, PATCH, 3, WIDTH)
  assert set(k for k in params if k.startswith("block")) == {"block0", "block1"}
  assert params["block0"]["mlp"]["fc1"]["kernel"].shape == (WIDTH, 64)


@pytest.mark.parametrize("size", [16, 24])
def test_vit_runs_at_several_resolutions_with_same_params(vit_with_params, size):
  model, params = vit_with_params
  out = _apply(model, params, _images(jax.random.key(2), 2, size))
  g = size // PATCH
  assert out["embedding"].shape == (2, WIDTH)
  assert out["patch"].shape == (2, g, g, WIDTH)
  assert out["registers"].shape == (2, 2, WIDTH)
  for v in out.values():
    assert v.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(v)))


def test_vit_without_registers_has_empty_register_output():
  model = _vit()
  x = _images(jax.random.key(3), 2, 16)
  params = _init(model, jax.random.key(0), x)
  assert "register_tokens" not in params and "mask_token" not in params
  out = _apply(model, params, x)
  assert out["registers"].shape == (2, 0, WIDTH)
  assert out["patch"].shape == (2, 4, 4, WIDTH)


def test_vit_depends_on_image_and_resized_pos_embed(vit_with_params):
  model, params = vit_with_params
  x = _images(jax.random.key(4), 2, 24)
  out = _apply(model, params, x)
  # Different images give different outputs.
  assert not np.allclose(out["embedding"][0], out["embedding"][1], atol=1e-4)
  # The 24 px path uses the resized position embedding: changing pos_embed changes it.
  p2 = flax.core.copy(params, {"pos_embed": params["pos_embed"] + jax.random.normal(
      jax.random.key(11), params["pos_embed"].shape)})
  out2 = _apply(model, p2, x)
  assert not np.allclose(out["patch"], out2["patch"], atol=1e-4)


def test_full_mask_makes_output_independent_of_image(vit_with_params):
  model, params = vit_with_params
  # A nonzero mask token, so that the test does not rely on its zero initialization.
  params = flax.core.copy(params, {"mask_token": jax.random.normal(jax.random.key(5), (1, 1, WIDTH))})
  a, b = _images(jax.random.key(6), 2, 16), 3.0 * _images(jax.random.key(7), 2, 16)
  full = jnp.ones((2, GRID * GRID), bool)
  out_a = _apply(model, params, a, mask=full)
  out_b = _apply(model, params, b, mask=full)
  for k in ("embedding", "patch", "registers"):
    np.testing.assert_allclose(out_a[k], out_b[k], atol=1e-5)
  # Without the mask, the outputs differ; with a partial mask, unmasked content matters.
  plain_a = _apply(model, params, a)
  plain_b = _apply(model, params, b)
  assert not np.allclose(plain_a["embedding"], plain_b["embedding"], atol=1e-3)
  partial = full.at[:, 0].set(False)
  part_a = _apply(model, params, a, mask=partial)
  part_b = _apply(model, params, b, mask=partial)
  assert not np.allclose(part_a["embedding"], part_b["embedding"], atol=1e-4)


def test_mask_replaces_only_masked_patches(vit_with_params):
  model, params = vit_with_params
  x = _images(jax.random.key(8), 2, 16)
  none = jnp.zeros((2, GRID * GRID), bool)
  np.testing.assert_allclose(_apply(model, params, x, mask=none)["patch"],
                             _apply(model, params, x)["patch"], atol=1e-6)


def test_dino_head_logits_are_cosine_similarities():
  head = models.DINOHead(out_dim=10, hidden_dim=16, bottleneck_dim=8, num_layers=3)
  x = jax.random.normal(jax.random.key(0), (5, WIDTH))
  params = head.init(jax.random.key(1), x)["params"]
  # Scale the prototypes unevenly: weight norm must remove it.
  v = params["last_layer"] * jnp.linspace(0.1, 10.0, 10)[None, :]
  params = flax.core.copy(params, {"last_layer": v})
  logits, inter = head.apply({"params": params}, x, capture_intermediates=True)
  assert logits.shape == (5, 10)
  assert np.all(np.abs(np.asarray(logits)) <= 1.0 + 1e-5)
  z = np.asarray(inter["intermediates"]["mlp2"]["__call__"][0], np.float64)  # bottleneck output
  assert z.shape == (5, 8)
  zn = z / np.linalg.norm(z, axis=1, keepdims=True)
  vn = np.asarray(v, np.float64) / np.linalg.norm(np.asarray(v, np.float64), axis=0, keepdims=True)
  expected = np.array([[zn[i] @ vn[:, j] for j in range(10)] for i in range(5)])
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_dino_head_scales_output_or_weight_alike(norm_last_layer):
  """Few rows (the output scaled) and many rows (the weight scaled) give the same logits, with
  and without the trainable gain."""
  head = models.DINOHead(out_dim=10, hidden_dim=16, bottleneck_dim=8, num_layers=3, norm_last_layer=norm_last_layer)
  x = jax.random.normal(jax.random.key(0), (40, WIDTH))
  params = head.init(jax.random.key(1), x)["params"]
  if not norm_last_layer:
    params = flax.core.copy(params, {"last_layer_gain": jnp.linspace(0.5, 2.0, 10)[None, :]})
  few, many = head.apply({"params": params}, x[:4]), head.apply({"params": params}, x)  # 4 <= 8 < 40 rows
  np.testing.assert_allclose(few, many[:4], rtol=1e-5, atol=1e-6)


def test_max_logits_bound_each_heads_logits():
  """A head's bound is its largest |gain| (1 without a gain), its logits never exceed it, and
  the iBOT logits take the iBOT head's bound (the DINO head's where the head is shared)."""
  x = jax.random.normal(jax.random.key(0), (64, WIDTH)) * 3.0
  fixed = models.DINOHead(out_dim=10, hidden_dim=16, bottleneck_dim=8, num_layers=3)
  gained = models.DINOHead(out_dim=10, hidden_dim=16, bottleneck_dim=8, num_layers=3, norm_last_layer=False)
  p_fixed = fixed.init(jax.random.key(1), x)["params"]
  p_gained = flax.core.copy(gained.init(jax.random.key(2), x)["params"],
                            {"last_layer_gain": jnp.linspace(-3.0, 2.0, 10)[None, :]})
  bounds = models.max_logits({"backbone": {}, "head": p_fixed, "ibot_head": p_gained})
  assert set(bounds) == {"logits", "patch_logits"}
  np.testing.assert_allclose([bounds["logits"], bounds["patch_logits"]], [1.0, 3.0])
  assert np.max(np.abs(fixed.apply({"params": p_fixed}, x))) <= bounds["logits"] * (1 + 1e-6)
  assert np.max(np.abs(gained.apply({"params": p_gained}, x))) <= bounds["patch_logits"] * (1 + 1e-6)
  shared = models.max_logits({"head": p_gained})
  np.testing.assert_allclose([shared["logits"], shared["patch_logits"]], [3.0, 3.0])


def test_column_sums_are_the_columns_sums():
  a = jax.random.normal(jax.random.key(0), (37, 300)) ** 2 * jnp.linspace(0.1, 100.0, 300)  # squares, as the norms sum
  np.testing.assert_allclose(layers.column_sums(a), np.sum(np.asarray(a, np.float64), axis=0), rtol=1e-6)


@pytest.mark.parametrize("scale_shape", [(300,), (1, 300)])
def test_scale_columns_has_the_products_gradients(scale_shape):
  """The custom gradient (the scale's as column sums) equals autodiff's of a * s."""
  a, w = (jax.random.normal(k, (37, 300)) for k in jax.random.split(jax.random.key(0), 2))
  s = jax.random.uniform(jax.random.key(1), scale_shape, minval=0.5, maxval=2.0)
  loss = lambda f: lambda a, s: jnp.sum(jnp.sin(f(a, s)) * w)
  got = jax.grad(loss(layers.scale_columns), argnums=(0, 1))(a, s)
  want = jax.grad(loss(lambda a, s: a * s), argnums=(0, 1))(a, s)
  np.testing.assert_allclose(layers.scale_columns(a, s), a * s)
  for g, e in zip(got, want):
    assert g.shape == e.shape
    np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-5)


def test_matmul_has_the_products_gradients():
  x, w, g = (jax.random.normal(k, shape) for k, shape in
             zip(jax.random.split(jax.random.key(0), 3), [(37, 16), (16, 300), (37, 300)]))
  loss = lambda f: lambda x, w: jnp.sum(jnp.sin(f(x, w)) * g)
  got = jax.grad(loss(layers.matmul), argnums=(0, 1))(x, w)
  want = jax.grad(loss(jnp.matmul), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(layers.matmul(x, w), x @ w, rtol=1e-6, atol=1e-6)
  for a, e in zip(got, want):
    assert a.shape == e.shape
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5)


def test_dino_head_param_shapes():
  head = models.DINOHead(out_dim=10, hidden_dim=16, bottleneck_dim=8, num_layers=3)
  params = head.init(jax.random.key(1), jnp.zeros((1, WIDTH)))["params"]
  assert params["mlp0"]["kernel"].shape == (WIDTH, 16)
  assert params["mlp1"]["kernel"].shape == (16, 16)
  assert params["mlp2"]["kernel"].shape == (16, 8)
  assert params["last_layer"].shape == (8, 10)


def test_swiglu_and_layerscale_variant():
  model = _vit(ffn="swiglu", layerscale=1e-5)
  x = _images(jax.random.key(9), 2, 16)
  params = _init(model, jax.random.key(0), x)
  blk = params["block0"]
  assert set(blk["mlp"]) == {"w12", "w3"}
  assert blk["mlp"]["w12"]["kernel"].shape == (WIDTH, 2 * 64)
  assert blk["mlp"]["w3"]["kernel"].shape == (64, WIDTH)
  for ls in ("ls1", "ls2"):
    assert blk[ls]["gamma"].shape == (WIDTH,)
    np.testing.assert_allclose(blk[ls]["gamma"], 1e-5)
  out = _apply(model, params, x)
  assert out["embedding"].shape == (2, WIDTH) and out["patch"].shape == (2, 4, 4, WIDTH)
  assert np.all(np.isfinite(np.asarray(out["patch"])))

  # With every LayerScale gamma = 0 the residual branches vanish: the output is the final
  # LayerNorm of the embeddings, whatever the blocks' weights.
  zero = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.zeros_like(v) if "gamma" in jax.tree_util.keystr(path) else v, params)
  out = _apply(model, zero, x)
  emb = jax.lax.conv_general_dilated(x, params["patch_embed"]["kernel"], (PATCH, PATCH), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
  emb = emb.reshape(2, -1, WIDTH) + params["patch_embed"]["bias"] + params["pos_embed"].reshape(1, -1, WIDTH)
  emb = np.asarray(emb, np.float64)
  mu, var = emb.mean(-1, keepdims=True), emb.var(-1, keepdims=True)
  normed = ((emb - mu) / np.sqrt(var + 1e-6) * np.asarray(params["norm"]["scale"])
            + np.asarray(params["norm"]["bias"]))
  np.testing.assert_allclose(out["patch"].reshape(normed.shape), normed, rtol=1e-4, atol=1e-4)


def test_swiglu_matches_formula():
  mod = layers.SwiGLU(hidden=6)
  x = jax.random.normal(jax.random.key(0), (3, 4))
  p = mod.init(jax.random.key(1), x)["params"]
  w12, b12 = np.asarray(p["w12"]["kernel"]), np.asarray(p["w12"]["bias"])
  w3, b3 = np.asarray(p["w3"]["kernel"]), np.asarray(p["w3"]["bias"])
  h = np.asarray(x) @ w12 + b12
  x1, x2 = h[:, :6], h[:, 6:]
  silu = x1 / (1 + np.exp(-x1))
  np.testing.assert_allclose(mod.apply({"params": p}, x), (silu * x2) @ w3 + b3, rtol=1e-5, atol=1e-6)


def _np_layernorm(x, p, eps=1e-6):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


def test_block_matches_numpy():
  blk = vit.Block(num_heads=2, mlp_dim=12, layerscale=0.5)
  x = jax.random.normal(jax.random.key(0), (2, 5, 8))
  p = blk.init(jax.random.key(1), x)["params"]
  p = jax.tree.map(lambda v: np.asarray(v, np.float64), p)
  p["qkv"]["bias"] = np.random.default_rng(0).normal(size=p["qkv"]["bias"].shape) * 0.1
  got = blk.apply({"params": jax.tree.map(jnp.asarray, p)}, x)
  xs = np.asarray(x, np.float64)
  gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))
  h = _np_layernorm(xs, p["norm1"])
  qkv = np.einsum("bnd,dthe->bnthe", h, p["qkv"]["kernel"]) + p["qkv"]["bias"]
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [b, n, heads, hd]
  att = np.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(q.shape[-1])
  att = np.exp(att - att.max(-1, keepdims=True))
  att /= att.sum(-1, keepdims=True)
  o = np.einsum("bhqk,bkhe->bqhe", att, v)
  o = np.einsum("bqhe,hed->bqd", o, p["proj"]["kernel"]) + p["proj"]["bias"]
  xs = xs + o * p["ls1"]["gamma"]
  h = _np_layernorm(xs, p["norm2"])
  h = gelu(h @ p["mlp"]["fc1"]["kernel"] + p["mlp"]["fc1"]["bias"])
  h = h @ p["mlp"]["fc2"]["kernel"] + p["mlp"]["fc2"]["bias"]
  expected = xs + h * p["ls2"]["gamma"]
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_subset_drop_path_computes_only_the_kept_samples():
  x = jax.random.normal(jax.random.key(0), (8, 3, 4))
  seen = []

  def branch(v):
    seen.append(v.shape)
    return 2.0 * v + 1.0

  out = layers.subset_drop_path(x, branch, 0.5, jax.random.key(1))
  assert seen == [(4, 3, 4)]  # k = int(8 * 0.5) samples go through the branch
  changed = np.any(np.asarray(out != x), axis=(1, 2))
  assert changed.sum() == 4
  np.testing.assert_allclose(out[changed], x[changed] + 2.0 * branch(x[changed]), rtol=1e-6)  # scaled by n / k
  np.testing.assert_array_equal(out[~changed], x[~changed])
  # Unbiased: averaged over draws, x + branch(x).
  mean = jnp.mean(jax.vmap(lambda key: layers.subset_drop_path(x, branch, 0.5, key))(
      jax.random.split(jax.random.key(2), 4000)), axis=0)
  sigma = np.abs(np.asarray(branch(x))) / np.sqrt(4000)  # per-draw spread |branch(x)|
  assert np.all(np.abs(np.asarray(mean - (x + branch(x)))) <= 5 * sigma + 1e-5)


def test_subset_drop_path_keeps_each_device_subset_local():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x = jax.device_put(jax.random.normal(jax.random.key(0), (32, 5, 16)), sharding)
  step = jax.jit(lambda x, key: layers.subset_drop_path(x, lambda v: v @ jnp.eye(16), 0.5, key, 8, sharding))
  out = step(x, jax.random.key(1))
  changed = np.any(np.asarray(out != x), axis=(1, 2)).reshape(8, 4)
  assert (changed.sum(axis=1) == 2).all()  # 2 of each device's 4 samples
  hlo = step.lower(x, jax.random.key(1)).compile().as_text()
  assert not re.search(r"all-gather|all-to-all|collective-permute", hlo)


def test_subset_drop_path_over_a_group_spanning_devices_stays_on_each_device():
  """One group of 32 samples on 8 devices (an official GPU's batch over several devices): the
  same draws and result as the group on one device, each device's branch on its own 4 samples
  and no collective (gathering the kept samples ran all 19 on every device)."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x = jax.random.normal(jax.random.key(0), (32, 5, 16))
  w = jax.random.normal(jax.random.key(2), (16, 16))
  branch = lambda v: jnp.tanh(v @ w)
  step = jax.jit(lambda x, key: layers.subset_drop_path(x, branch, 0.4, key, 1, sharding))
  sharded = jax.device_put(x, sharding)
  for seed in range(3):
    expected = layers.subset_drop_path(x, branch, 0.4, jax.random.key(seed))
    np.testing.assert_allclose(step(sharded, jax.random.key(seed)), expected, rtol=1e-6, atol=1e-6)
  hlo = step.lower(sharded, jax.random.key(0)).compile().as_text()
  assert not re.search(r"all-gather|all-reduce|all-to-all|collective-permute|reduce-scatter", hlo)
  branch_shapes = re.findall(r"= f32\[([\d,]+)\]\S* tanh\(", hlo)  # the branch's output on each device
  assert branch_shapes and all(np.prod([int(d) for d in s.split(",")]) == 4 * 5 * 16 for s in branch_shapes)


@pytest.mark.parametrize("scan", [False, True])
def test_the_train_steps_vit_keeps_each_blocks_input_split_by_sample(scan):
  """The train step's model constrains every block's input to its batch sharding (once in a
  scanned body): left to XLA, a scanned ViT-L's per-sample stochastic depth under FSDP took
  61 GiB of temporaries per device instead of 25."""
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  cfg = dinov2_vitl14.get_config("tiny")
  assert learner.make_model(cfg, batch_sharding).backbone.batch_sharding == batch_sharding
  images = jnp.zeros((8, 16, 16, 3))
  constraints = []
  for sharding in (None, batch_sharding):
    vit = models.ViT(patch_size=4, width=32, depth=3, num_heads=2, mlp_dim=64, pos_embed_grid=4, drop_path_rate=0.1,
                     drop_path_uniform=True, scan=scan, batch_sharding=sharding)
    params = vit.init(jax.random.key(0), images[:1])  # initialization takes any batch
    apply = lambda p, x: vit.apply(p, x, deterministic=False, rngs={"dropout": jax.random.key(1)})["embedding"]
    constraints.append(len(re.findall(r"sharding_constraint|@Sharding", jax.jit(apply).lower(params, images).as_text())))
  assert constraints == [0, 1 if scan else 3]


def test_subsets_at_every_rate_above_0_with_subsets_and_never_without(monkeypatch):
  """DINOv2's training path (NestedTensorBlock.forward_nested) takes kept subsets at any rate
  above 0; DINO's DropPath masks samples. Rates rise linearly to drop_path_rate in the last
  block (block 0 at 0: no stochastic depth)."""
  calls = []
  original = layers.subset_drop_path
  monkeypatch.setattr(layers, "subset_drop_path", lambda *a, **k: calls.append(a[2]) or original(*a, **k))
  images = jnp.zeros((4, 16, 16, 3))
  for rate, groups in ((0.1, 2), (0.4, 1), (0.4, None)):
    vit = models.ViT(patch_size=4, width=32, depth=4, num_heads=2, mlp_dim=64, pos_embed_grid=4, drop_path_rate=rate,
                     subset_groups=groups)
    params = vit.init(jax.random.key(0), images)
    vit.apply(params, images, deterministic=False, rngs={"dropout": jax.random.key(1)})
  rising = lambda r: [r * 1 / 3] * 2 + [r * 2 / 3] * 2 + [r] * 2  # attention and FFN of blocks 1-3
  assert calls == pytest.approx(rising(0.1) + rising(0.4))


def test_subsets_are_drawn_within_each_group():
  """Two groups of 4 samples (two official GPUs' crops): 2 of each group's 4 go through the branch."""
  x = jax.random.normal(jax.random.key(0), (8, 3, 4))
  for seed in range(5):
    out = layers.subset_drop_path(x, lambda v: v + 1.0, 0.5, jax.random.key(seed), 2)
    changed = np.any(np.asarray(out != x), axis=(1, 2)).reshape(2, 4)
    assert (changed.sum(axis=1) == 2).all()


@pytest.mark.parametrize("kw", [dict(num_registers=2), dict(ffn="swiglu", layerscale=1e-1, remat="dots")])
def test_scan_computes_what_the_loop_computes(kw):
  """model.scan runs the same blocks on the same (stored, per-block) parameters: equal outputs
  and gradients; init, `layers=n` and the attention maps take the loop."""
  loop, scanned = _vit(depth=3, **kw), _vit(depth=3, scan=True, **kw)
  x = _images(jax.random.key(0), 2, 16)
  params = _init(scanned, jax.random.key(1), x)
  assert set(params) >= {"block0", "block1", "block2"}
  assert jax.tree.structure(params) == jax.tree.structure(_init(loop, jax.random.key(1), x))
  out_loop, out_scan = _apply(loop, params, x), _apply(scanned, params, x)
  np.testing.assert_allclose(out_scan["patch"], out_loop["patch"], atol=1e-5)
  np.testing.assert_allclose(out_scan["embedding"], out_loop["embedding"], atol=1e-5)
  weights = jax.random.normal(jax.random.key(2), out_loop["patch"].shape)  # a loss that depends on every token
  grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply({"params": p}, x)["patch"] * weights))(params)
  g_loop, g_scan = grad(loop), grad(scanned)
  for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_loop)):
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max())  # float32 rounding of the largest
  inter = scanned.apply({"params": params}, x, layers=2)["intermediate"]
  np.testing.assert_allclose(inter[-1]["embedding"], out_loop["embedding"], atol=1e-5)


def test_scan_in_bfloat16_with_layerscale_keeps_the_loop_s_stream():
  """bfloat16 blocks whose float32 LayerScale promotes the residual stream: the scan's carry
  starts in the block's output dtype, and the outputs match the loop's."""
  kw = dict(depth=3, dtype=jnp.bfloat16, layerscale=0.1)
  loop, scanned = _vit(**kw), _vit(scan=True, **kw)
  x = _images(jax.random.key(0), 2, 16)
  params = _init(scanned, jax.random.key(1), x)
  a, b = _apply(loop, params, x)["patch"], _apply(scanned, params, x)["patch"]
  assert a.dtype == b.dtype == jnp.float32
  np.testing.assert_allclose(b, a, atol=1e-5)


def test_scan_with_stochastic_depth_draws_per_block():
  """Training mode: a uniform rate drops branches (outputs differ from deterministic ones and
  between keys), and the kept-subset form still runs inside the scan."""
  model = _vit(depth=3, scan=True, drop_path_rate=0.5, drop_path_uniform=True)
  x = _images(jax.random.key(0), 4, 16)
  params = _init(model, jax.random.key(1), x)
  train = lambda k: model.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(k)})
  a, b = train(2)["embedding"], train(3)["embedding"]
  assert np.all(np.isfinite(a)) and not np.allclose(a, b)
  assert not np.allclose(a, _apply(model, params, x)["embedding"])
  rising = _vit(depth=3, scan=True, drop_path_rate=0.5)  # DINO's linspace rates: not one rate to scan with
  with pytest.raises(ValueError, match="one stochastic-depth rate"):
    rising.apply({"params": params}, x, deterministic=False, rngs={"dropout": jax.random.key(2)})


def test_intermediate_layers_before_the_final_norm(vit_with_params):
  """final_norm=False gives the blocks' raw outputs (get_intermediate_layers(norm=False)): the
  final LayerNorm of the last one is the model's output."""
  model, params = vit_with_params
  x = _images(jax.random.key(3), 2, 16)
  raw = model.apply({"params": params}, x, layers=2, final_norm=False)
  normed = model.apply({"params": params}, x, layers=2)
  last = np.asarray(raw["intermediate"][-1]["patch"], np.float64)
  np.testing.assert_allclose(_np_layernorm(last, params["norm"]), normed["patch"], atol=1e-5)
  np.testing.assert_allclose(_np_layernorm(np.asarray(raw["intermediate"][0]["embedding"], np.float64),
                                           params["norm"]), normed["intermediate"][0]["embedding"], atol=1e-5)
  assert not np.allclose(last, normed["patch"], atol=1e-2)


@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_xla_attention_is_jax_dot_product_attention(dtype, tol):
  """`layers.attention(..., "xla")`, written out in the [B, H, N, d] layout with its own
  backward pass, computes what `jax.nn.dot_product_attention` does, with a bias (Swin's, or
  broadcast over heads, or without a batch axis) and without, gradients of the bias included."""
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 17, 3, 8)), dtype) for _ in range(3))
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32)))
  for shape in (None, (1, 3, 17, 17), (2, 1, 17, 17), (3, 17, 17)):
    bias = None if shape is None else jnp.asarray(rng.normal(size=shape), dtype)
    args = (q, k, v) if bias is None else (q, k, v, bias)
    ours = lambda q, k, v, b=None: layers.attention(q, k, v, b)
    ref = lambda q, k, v, b=None: jax.nn.dot_product_attention(q, k, v, bias=b)
    np.testing.assert_allclose(np.asarray(ours(*args), np.float32), np.asarray(ref(*args), np.float32),
                               rtol=tol, atol=tol)
    argnums = tuple(range(len(args)))
    grads, grads_ref = jax.grad(loss(ours), argnums)(*args), jax.grad(loss(ref), argnums)(*args)
    for g, g_ref in zip(grads, grads_ref):
      assert g.shape == g_ref.shape and g.dtype == g_ref.dtype
      np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), rtol=tol,
                                 atol=tol * max(1.0, float(jnp.max(jnp.abs(g_ref.astype(jnp.float32))))))


def test_xla_attention_under_remat_and_jit():
  """The custom backward pass of the XLA attention composes with `jax.checkpoint` and `jit`."""
  rng = np.random.default_rng(2)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 9, 2, 4)), jnp.float32) for _ in range(3))
  fn = lambda q, k, v: jnp.sum(layers.attention(q, k, v) ** 2)
  ref = lambda q, k, v: jnp.sum(jax.nn.dot_product_attention(q, k, v) ** 2)
  for g, g_ref in zip(jax.jit(jax.grad(jax.checkpoint(fn), argnums=(0, 1, 2)))(q, k, v),
                      jax.grad(ref, argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_padded_to_even_is_the_same_function(with_bias):
  """cuDNN's path for odd token counts (a ViT's 17 here, a Swin window's 49): one masked
  padding token changes neither the outputs nor the gradients (run with XLA's attention)."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 17, 3, 8)), jnp.float32) for _ in range(3))
  bias = jnp.asarray(rng.normal(size=(1, 3, 17, 17)), jnp.float32) if with_bias else None

  def loss(fn, q, k, v):
    return jnp.sum(jnp.sin(fn(q, k, v, bias)))
  plain = lambda q, k, v, bias: jax.nn.dot_product_attention(q, k, v, bias=bias)
  padded = lambda q, k, v, bias: layers.padded_to_even(q, k, v, bias)
  np.testing.assert_allclose(padded(q, k, v, bias), plain(q, k, v, bias), rtol=1e-5, atol=1e-6)
  for g_pad, g_ref in zip(jax.grad(lambda *a: loss(padded, *a), argnums=(0, 1, 2))(q, k, v),
                          jax.grad(lambda *a: loss(plain, *a), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(g_pad, g_ref, rtol=1e-5, atol=1e-6)


def test_cudnn_attention_pads_odd_token_counts_only(monkeypatch):
  """`attention(..., "cudnn")` hands cuDNN N + 1 tokens with the lengths for an odd N, and N
  tokens as they are for an even N (the kernel itself recorded, not run, on the CPU)."""
  calls = []

  def record(q, k, v, bias=None, key_value_seq_lengths=None, implementation=None):
    calls.append((q.shape[1], None if key_value_seq_lengths is None else np.asarray(key_value_seq_lengths),
                  implementation))
    return q
  monkeypatch.setattr(jax.nn, "dot_product_attention", record)
  for n in (17, 18):
    x = jnp.zeros((2, n, 3, 8))
    assert layers.attention(x, x, x, implementation="cudnn").shape == (2, n, 3, 8)
  (odd_len, odd_lengths, odd_impl), (even_len, even_lengths, even_impl) = calls
  assert (odd_len, odd_lengths.tolist(), odd_impl) == (18, [17, 17], "cudnn")
  assert (even_len, even_lengths, even_impl) == (18, None, "cudnn")


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN's fused attention needs a GPU")
@pytest.mark.parametrize("n", [257, 50])  # ViT-L/14 at 224 px (+ CLS), and at 98 px
def test_cudnn_attention_on_a_gpu_matches_xla(n):
  """The fused cuDNN kernel (odd N padded) against XLA's attention in bfloat16, outputs and
  gradients (2026-11-26 on an H200: gradients within 3.6e-3)."""
  keys = jax.random.split(jax.random.PRNGKey(n), 4)
  q, k, v, g = (jax.random.normal(key, (4, n, 16, 64)).astype(jnp.bfloat16) for key in keys)

  def value_and_grads(implementation):
    loss = lambda q, k, v: jnp.sum(layers.attention(q, k, v, implementation=implementation).astype(jnp.float32) * g)
    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    return f(q, k, v), f.lower(q, k, v).compile().as_text()

  (fused_loss, fused_grads), hlo = value_and_grads("cudnn")
  (xla_loss, xla_grads), _ = value_and_grads("xla")
  assert "cudnn" in hlo.lower() and "fmha" in hlo.lower()
  np.testing.assert_allclose(float(fused_loss), float(xla_loss), rtol=3e-2, atol=1.0)
  for a, b in zip(fused_grads, xla_grads):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 3e-2
