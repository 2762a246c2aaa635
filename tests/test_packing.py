"""All crops in one packed ViT pass (`models.packing`, `model.packed_crops`): the layout and its
attention masks, and the packed pass against one pass per crop size (outputs, gradients, train
steps on one and eight devices)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import dino_vits16
from configs import dinov2_vits14
from configs import esvit_swin_t
from dino_jax import config_checks
from dino_jax import models
from dino_jax.errors import UsageError
from dino_jax.models import layers
from dino_jax.models import packing
from tests.test_step_sharding import conditioned
from tests.test_train import assert_trees_close
from tests.test_train import one_step
from tests.test_train import tiny


def crop_places(sizes, chunks):
  """(row, first token) of every crop, in crop order, by filling rows greedily: a written-out
  reading of the layout `PackedLayout` describes."""
  row_length = max(t for _, t in sizes)
  places = {}
  row = 0
  for chunk in range(chunks):
    first_crop = 0
    for crops, tokens in sizes:
      per_row, mine = row_length // tokens, crops // chunks
      for j in range(mine):
        places[first_crop + chunk * mine + j] = (row + j // per_row, (j % per_row) * tokens)
      row += -(-mine // per_row)
      first_crop += crops
  return places, row


@pytest.mark.parametrize("sizes,chunks", [(((4, 5), (16, 2)), 1), (((4, 5), (16, 2)), 2),
                                          (((2, 7), (8, 3), (4, 7)), 2), (((6, 4),), 3)])
def test_layout_places_every_crop_once_and_masks_within_crops(sizes, chunks):
  layout = packing.PackedLayout(sizes, chunks)
  places, num_rows = crop_places(sizes, chunks)
  ids = layout.segment_ids()
  assert ids.shape == (layout.num_rows, layout.row_length) and layout.num_rows == num_rows
  tokens_of = [t for crops, t in sizes for _ in range(crops)]
  expected = np.full_like(ids, packing.PAD)
  for crop, (row, first) in places.items():
    expected[row, first:first + tokens_of[crop]] = crop
  np.testing.assert_array_equal(ids, expected)
  mask = np.asarray(packing.attention_mask(jnp.asarray(ids)))[:, 0]
  np.testing.assert_array_equal(mask, ids[:, :, None] == ids[:, None, :])
  for row in range(num_rows):  # block diagonal: crops see only themselves; pads only pads
    for crop in set(ids[row]) - {packing.PAD}:
      inside = ids[row] == crop
      assert mask[row][np.ix_(inside, inside)].all() and not mask[row][np.ix_(inside, ~inside)].any()
  # pack / unpack round trip of per-crop values
  rng = np.random.default_rng(0)
  xs = [rng.normal(size=(crops, tokens, 3)).astype(np.float32) for crops, tokens in sizes]
  for x, back in zip(xs, layout.unpack(layout.pack(xs))):
    np.testing.assert_array_equal(back, x)
  for x, back in zip(xs, layout.unpack(layout.pack([jnp.asarray(x) for x in xs]))):
    np.testing.assert_array_equal(np.asarray(back), x)


def test_chunks_must_divide_the_crops():
  with pytest.raises(ValueError, match="3 crops do not divide into 2 chunks"):
    packing.PackedLayout(((3, 5),), 2)


def test_attention_cost():
  # DINOv2 ViT-S/14, one image: 2 crops of 257 tokens, 8 of 50 -> 4 rows of 257 (5 + 3 locals)
  layout = packing.PackedLayout(((2, 257), (8, 50)))
  assert layout.num_rows == 4
  assert layout.attention_cost() == pytest.approx(4 * 257 ** 2 / (2 * 257 ** 2 + 8 * 50 ** 2))


def test_masked_attention_on_packed_rows_equals_attention_per_crop():
  sizes = ((4, 9), (12, 4))
  layout = packing.PackedLayout(sizes, 2)
  keys = jax.random.split(jax.random.PRNGKey(0), 6)
  qkv = [[jax.random.normal(keys[3 * i + j], (crops, tokens, 2, 8)) for j in range(3)]
         for i, (crops, tokens) in enumerate(sizes)]
  expected = [layers.attention(q, k, v) for q, k, v in qkv]
  segments = jnp.asarray(layout.segment_ids())
  bias = packing.attention_bias(segments, jnp.float32)
  packed = [layout.pack([qkv[i][j] for i in range(2)]) for j in range(3)]
  got = layout.unpack(layers.attention(*packed, bias=bias))
  for g, e in zip(got, expected):
    np.testing.assert_allclose(g, e, atol=1e-6)
  # whatever the pad tokens hold, the crops' outputs do not change
  pads = (segments == packing.PAD)[..., None, None]
  noisy = [jnp.where(pads, 1e3 * jax.random.normal(jax.random.PRNGKey(9), p.shape), p) for p in packed]
  for g, e in zip(layout.unpack(layers.attention(*noisy, bias=bias)), expected):
    np.testing.assert_allclose(g, e, atol=1e-6)


def tiny_vit(**kw):
  return models.ViT(**dict(patch_size=4, width=32, depth=3, num_heads=2, mlp_dim=64, num_registers=2,
                           layerscale=0.1, pos_embed_grid=4) | kw)


@pytest.mark.parametrize("kw,masked", [({}, False), ({"scan": True}, False), ({"remat": "full"}, False), ({}, True)],
                         ids=["loop", "scan", "remat", "masked_rows"])
def test_packed_vit_equals_one_pass_per_size_outputs_and_gradients(kw, masked, monkeypatch):
  if masked:  # XLA's attention on the packed rows with the mask, as the fused kernels take them
    monkeypatch.setattr(packing, "MASKED", ("cudnn", "xla"))
  vit = tiny_vit(**kw)
  glob = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  local = jax.random.normal(jax.random.PRNGKey(2), (12, 8, 8, 3))
  mask = jax.random.bernoulli(jax.random.PRNGKey(3), 0.4, (4, 16))
  params = tiny_vit().init(jax.random.PRNGKey(0), glob, mask=mask)["params"]

  def separate(p):
    return (vit.apply({"params": p}, glob, mask=mask), vit.apply({"params": p}, local))

  def packed(p):
    return vit.apply({"params": p}, (glob, local), mask=(mask, None), pack_chunks=2)

  for got, want in zip(packed(params), separate(params)):
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_allclose(got[k], want[k], atol=2e-5, err_msg=k)

  def loss(outputs, p):
    out = outputs(p)
    return sum(jnp.mean(jnp.sin(o["embedding"])) + jnp.mean(o["patch"] ** 2) for o in out)

  g_packed = jax.grad(lambda p: loss(packed, p))(params)
  g_separate = jax.grad(lambda p: loss(separate, p))(params)
  assert_trees_close(g_packed, g_separate, atol=1e-6)


def test_packed_drop_path_keeps_whole_crops_as_dinov2_draws_them():
  layout = packing.PackedLayout(((8, 5), (24, 2)), 2)
  scale = packing.crop_drop_scale(jax.random.PRNGKey(0), layout, 0.4, groups=4)
  assert scale.shape == (33,) and scale[-1] == 0  # the pad slot
  for first, crops in ((0, 8), (8, 24)):  # each group of n crops of a size keeps int(0.6 n), scaled n / k
    groups = np.asarray(scale[first:first + crops]).reshape(4, -1)
    n = groups.shape[1]
    k = max(int(n * 0.6), 1)
    assert ((groups > 0).sum(1) == k).all() and np.allclose(groups[groups > 0], n / k)
  per_sample = packing.crop_drop_scale(jax.random.PRNGKey(0), layout, 0.5, groups=None)
  assert set(np.unique(per_sample[:-1]).tolist()) <= {0.0, 2.0}
  # each crop's tokens carry its scale; pad tokens 0
  token = packing.token_scale(scale, jnp.asarray(layout.segment_ids()))[..., 0]
  got = layout.unpack(np.asarray(token)[..., None])
  np.testing.assert_array_equal(got[0][:, :, 0], np.repeat(np.asarray(scale[:8])[:, None], 5, 1))
  np.testing.assert_array_equal(got[1][:, :, 0], np.repeat(np.asarray(scale[8:32])[:, None], 2, 1))
  assert (np.asarray(token)[layout.segment_ids() == packing.PAD] == 0).all()


@pytest.mark.parametrize("chunks,groups", [(1, 2), (2, 4), (2, 2)])
def test_kept_subset_drop_path_computes_only_the_kept_crops_and_equals_the_scaled_form(chunks, groups):
  """DINOv2's index_select / index_add on packed rows: the branch sees only the kept crops
  (packed in a smaller layout), and the result is every crop's branch scaled by
  `crop_drop_scale` with the same draws."""
  layout = packing.PackedLayout(((8, 7), (24, 3)), chunks)
  x = jax.random.normal(jax.random.PRNGKey(0), (layout.num_rows, layout.row_length, 4))
  w = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 2, 2))
  seen = []

  def branch(tokens, packed):  # attention within each crop, then a token-wise nonlinearity
    sub, _ = packed
    seen.append(sub)
    q, k, v = (jnp.einsum("rld,dhe->rlhe", tokens, w[:, i]) for i in range(3))
    return jnp.tanh(packing.attention_per_crop(q, k, v, sub, layers.attention).reshape(tokens.shape))

  rng = jax.random.PRNGKey(7)
  got = packing.kept_subset_drop_path(x, branch, 0.4, rng, layout, groups)
  scale = packing.crop_drop_scale(rng, layout, 0.4, groups)
  segments = jnp.asarray(layout.segment_ids())
  want = x + branch(x, (layout, segments)) * packing.token_scale(scale, segments)
  ids = layout.segment_ids()
  # float32 rounding only: the kept crops' attention sums in another layout (other row lengths,
  # other padding), and the scale n / k (up to 2.5) multiplies those few-ulp differences; on
  # AVX2 CPUs they reach 1.4e-6 on outputs near 1.5. A wrong crop or scale moves outputs by ~0.1.
  np.testing.assert_allclose(np.asarray(got)[ids >= 0], np.asarray(want)[ids >= 0], rtol=1e-5, atol=1e-6)
  kept = [max(int(crops // groups * (1 - 0.4)), 1) * groups for crops, _ in layout.sizes]
  assert [crops for crops, _ in seen[0].sizes] == kept  # the branch ran on the kept crops alone


def test_packed_block_leaves_dropped_crops_unchanged():
  """A crop whose branches are both dropped leaves the block as it came in."""
  layout = packing.PackedLayout(((4, 5), (8, 3)))
  block = models.vit.Block(num_heads=2, mlp_dim=16, drop_path=0.5, packed_layout=layout,
                           subset_groups=2)
  x = jax.random.normal(jax.random.PRNGKey(0), (layout.num_rows, layout.row_length, 8))
  segments = jnp.asarray(layout.segment_ids())
  params = block.init(jax.random.PRNGKey(1), x, True, segments)
  rng = jax.random.PRNGKey(5)
  y = block.apply(params, x, False, segments, rngs={"dropout": rng})
  moved = np.abs(np.asarray(y - x)).max(-1)  # per packed token
  ids = layout.segment_ids()
  untouched = {c for c in range(layout.num_crops) if moved[ids == c].max() == 0}
  assert untouched and len(untouched) < layout.num_crops  # some crops dropped in both branches, not all
  assert all(not np.allclose(a, b) for a, b in zip(layout.unpack(y), layout.unpack(x)))  # each size has a crop that moved


@pytest.mark.parametrize("module", [dino_vits16, dinov2_vits14], ids=["dino", "dinov2"])
def test_packed_train_step_equals_one_pass_per_size(module):
  """Two whole steps without stochastic depth (its draws differ between the two paths), on
  one device and on eight (packing within each device's crops)."""
  base = conditioned(module, **{"model.drop_path_rate": 0.0})
  packed_cfg = conditioned(module, **{"model.drop_path_rate": 0.0, "model.packed_crops": True})
  for devices in ((jax.devices()[:1], jax.devices()) if module is dinov2_vits14 else (jax.devices(),)):
    s_sep, m_sep = one_step(base, devices, steps=2)
    s_pack, m_pack = one_step(packed_cfg, devices, steps=2)
    assert_trees_close(s_pack["params"], s_sep["params"], atol=1e-5)
    assert_trees_close(s_pack["teacher"], s_sep["teacher"], atol=1e-5)
    for k in m_sep:
      np.testing.assert_allclose(m_pack[k], m_sep[k], atol=1e-5, rtol=1e-5, err_msg=k)


@pytest.mark.parametrize("per_gpu", [8, 2], ids=["2_groups", "8_groups"])
def test_packed_train_step_with_kept_subsets_is_the_same_on_one_and_eight_devices(per_gpu):
  """DINOv2's kept subsets in the packed pass: one device gathers the kept crops; eight devices
  gather within each device's rows (8 groups) or, with 2 groups, compute every crop and zero the
  dropped ones. The draws are the same, so the steps are. (Without KoLeo: its -log of the
  nearest distance magnifies the two layouts' rounding to 7e-4 of the loss.)"""
  cfg = conditioned(dinov2_vits14, **{"model.packed_crops": True, "model.drop_path_rate": 0.3,
                                      "per_gpu_batch_size": per_gpu, "loss.koleo_weight": 0.0})
  s1, m1 = one_step(cfg, jax.devices()[:1], steps=1)
  s8, m8 = one_step(cfg, jax.devices(), steps=1)
  assert_trees_close(s8["params"], s1["params"], atol=1e-5)
  for k in m1:
    np.testing.assert_allclose(m8[k], m1[k], atol=1e-5, rtol=1e-5, err_msg=k)
  assert all(np.isfinite(v) for v in m1.values())


def test_packed_crops_needs_a_vit():
  cfg = tiny(esvit_swin_t, **{"model.packed_crops": True})
  with pytest.raises(UsageError, match="model.packed_crops packs a ViT's tokens; the swin backbone"):
    config_checks.check(cfg, 1)
