"""All crops of a step through a ViT in one pass, as DINOv2's `NestedTensorBlock` runs them.

DINOv2 (Oquab et al. 2023) concatenates the tokens of the global and the local crops along
the sequence and gives attention a block-diagonal mask (xFormers' `BlockDiagonalMask`), so
each block is one call whatever the crop sizes. Here the crops are packed into rows of the
longest crop's token count L:

  a crop of L tokens (a global crop) fills a row;
  a crop of N < L tokens shares a row with L // N - 1 others of its size (local crops),
  the row's tail and any missing crop filled with zero tokens;

and each token attends to the tokens of its own crop only. Matmuls, norms and FFNs run on
every row at once. Attention runs per crop size on the crops themselves (`attention_per_crop`,
XLA's), or on the packed rows with a block-diagonal mask (`segment_ids`, `attention_mask`; pad
tokens attend to pad tokens) for the fused kernels in MASKED, at rows x L^2 instead of the
crops' sum of N^2 (`PackedLayout.attention_cost` says how much more). Crops are packed within each of
`chunks` consecutive parts of the batch (one per device), so packing moves no data between
devices.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

PAD = -1  # segment id of pad tokens (the row's tail, and crops that fill a row's last slots)
MASKED = ("cudnn",)  # attention implementations that take the packed rows with the mask (else per crop)
MASKED_LOGIT = -1e4  # added to logits across crops: exp() of it underflows to 0 in float32, fits float16


@dataclasses.dataclass(frozen=True)
class PackedLayout:
  """Where each crop's tokens sit in the packed rows.

  sizes: (crops, tokens per crop) of each crop size, in the order given, crops counted over
  the whole batch; chunks: the batch's consecutive parts packed apart (crops of each size
  divide evenly between them). Crops are numbered in that order: size 0's, then size 1's...
  """
  sizes: tuple[tuple[int, int], ...]
  chunks: int = 1

  def __post_init__(self):
    for crops, _ in self.sizes:
      if crops % self.chunks:
        raise ValueError(f"{crops} crops do not divide into {self.chunks} chunks")

  @property
  def row_length(self) -> int:
    return max(tokens for _, tokens in self.sizes)

  def per_row(self, i: int) -> int:
    """Crops of size i in a row."""
    return self.row_length // self.sizes[i][1]

  def rows(self, i: int) -> int:
    """Rows of size i's crops in each chunk."""
    return math.ceil(self.sizes[i][0] // self.chunks / self.per_row(i))

  @property
  def num_rows(self) -> int:
    return self.chunks * sum(self.rows(i) for i in range(len(self.sizes)))

  @property
  def num_crops(self) -> int:
    return sum(crops for crops, _ in self.sizes)

  def pack(self, xs, pad_value=0):
    """[crops_i, tokens_i, ...] per size -> [num_rows, row_length, ...] (NumPy in, NumPy out)."""
    xp = np if all(isinstance(x, np.ndarray) for x in xs) else jnp
    parts = []
    for i, x in enumerate(xs):
      crops, tokens = self.sizes[i]
      k, rows, feat = self.per_row(i), self.rows(i), x.shape[2:]
      no_pad = [(0, 0)] * len(feat)
      x = x.reshape(self.chunks, crops // self.chunks, tokens, *feat)
      x = xp.pad(x, [(0, 0), (0, rows * k - x.shape[1]), (0, 0)] + no_pad, constant_values=pad_value)
      x = x.reshape(self.chunks, rows, k * tokens, *feat)
      parts.append(xp.pad(x, [(0, 0), (0, 0), (0, self.row_length - k * tokens)] + no_pad,
                          constant_values=pad_value))
    packed = xp.concatenate(parts, axis=1)
    return packed.reshape(self.num_rows, self.row_length, *packed.shape[3:])

  def unpack(self, packed) -> list:
    """[num_rows, row_length, ...] -> [crops_i, tokens_i, ...] per size (`pack`'s inverse)."""
    feat = packed.shape[2:]
    packed = packed.reshape(self.chunks, -1, self.row_length, *feat)
    out, start = [], 0
    for i, (crops, tokens) in enumerate(self.sizes):
      k, rows = self.per_row(i), self.rows(i)
      x = packed[:, start:start + rows, :k * tokens].reshape(self.chunks, rows * k, tokens, *feat)
      out.append(x[:, :crops // self.chunks].reshape(crops, tokens, *feat))
      start += rows
    return out

  def segment_ids(self) -> np.ndarray:
    """[num_rows, row_length] int32: each token's crop number, PAD for pad tokens."""
    ids, first = [], 0
    for crops, tokens in self.sizes:
      ids.append(np.repeat(np.arange(first, first + crops, dtype=np.int32)[:, None], tokens, axis=1))
      first += crops
    return self.pack(ids, pad_value=PAD)

  def attention_cost(self) -> float:
    """Attention's FLOPs packed over the crops' own (rows x L^2 / sum of crops x N^2)."""
    return self.num_rows * self.row_length ** 2 / sum(crops * tokens ** 2 for crops, tokens in self.sizes)


def attention_per_crop(q, k, v, layout: PackedLayout, attend):
  """Each packed crop's attention over its own tokens ([rows, L, heads, d] each), computed per
  crop size on the crops themselves (`attend` over [crops, N, heads, d]) and packed back: the
  block-diagonal attention without the work of its masked blocks, which xFormers' kernels skip too."""
  crops = zip(layout.unpack(q), layout.unpack(k), layout.unpack(v))
  return layout.pack([attend(*qkv) for qkv in crops])


def attention_mask(segment_ids: jax.Array) -> jax.Array:
  """[rows, L] segment ids -> [rows, 1, L, L] bool: query and key in the same crop (or both pads)."""
  return (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]


def attention_bias(segment_ids: jax.Array, dtype) -> jax.Array:
  """The mask as an additive bias on the logits, 0 within a crop and MASKED_LOGIT across."""
  return jnp.where(attention_mask(segment_ids), 0.0, MASKED_LOGIT).astype(dtype)


def kept_crops(rng, layout: PackedLayout, rate: float, groups: int) -> list[jax.Array]:
  """DINOv2's kept subsets on packed crops: for each crop size, [groups, k] indices of the crops
  each group of n consecutive crops keeps, k = max(int(n (1 - rate)), 1), drawn as
  `layers.subset_drop_path` draws them."""
  kept = []
  for i, (crops, _) in enumerate(layout.sizes):
    n = crops // groups
    k = max(int(n * (1.0 - rate)), 1)
    kept.append(jnp.argsort(jax.random.uniform(jax.random.fold_in(rng, i), (groups, n)), axis=1)[:, :k])
  return kept


def crop_drop_scale(rng, layout: PackedLayout, rate: float, groups: int | None) -> jax.Array:
  """Stochastic depth per crop on packed rows: [num_crops + 1] scales of each crop's residual
  branch (the last, 0, for pad tokens). With `groups` each group's `kept_crops` scaled by n / k
  and the others 0; else each crop kept with probability 1 - rate and scaled by 1 / (1 - rate)
  (DINO's DropPath)."""
  if groups is not None:
    scales = [jax.nn.one_hot(k, crops // groups).sum(1).reshape(crops) * (crops // groups / k.shape[1])
              for k, (crops, _) in zip(kept_crops(rng, layout, rate, groups), layout.sizes)]
  else:
    keep = 1.0 - rate
    scales = [jax.random.bernoulli(jax.random.fold_in(rng, i), keep, (crops,)).astype(jnp.float32) / keep
              for i, (crops, _) in enumerate(layout.sizes)]
  return jnp.concatenate(scales + [jnp.zeros((1,))])


def kept_subset_drop_path(x, branch, rate: float, rng, layout: PackedLayout, groups: int):
  """x + stochastic-depth branch on packed rows computing the branch only for the kept crops,
  as DINOv2's `drop_add_residual_stochastic_depth_list` does (`index_select`, the branch on the
  kept crops packed together, `index_add` scaled by n / k): the kept crops' tokens are gathered
  into the rows of a smaller layout, `branch(tokens, (that layout, its segment ids))` runs on
  them, and its output is added back. Each device's chunk gathers from itself (`groups` a
  multiple of `layout.chunks`). Draws and result are `crop_drop_scale`'s, without the dropped
  crops' work."""
  chunks, per_chunk = layout.chunks, groups // layout.chunks
  kept = kept_crops(rng, layout, rate, groups)
  sub = PackedLayout(tuple((chunks * per_chunk * k.shape[1], tokens) for k, (_, tokens) in zip(kept, layout.sizes)),
                     chunks)
  # Within one chunk: the flat position of every token of every crop in the full and the sub rows.
  one = PackedLayout(tuple((crops // chunks, tokens) for crops, tokens in layout.sizes))
  full_positions = one.unpack(np.arange(one.num_rows * one.row_length).reshape(one.num_rows, -1))
  dummy = one.num_rows * one.row_length  # where pad tokens of the sub rows read and write
  index = []
  for i, (k, (crops, _)) in enumerate(zip(kept, layout.sizes)):
    n = crops // groups
    local = (k + n * (jnp.arange(groups) % per_chunk)[:, None]).reshape(chunks, -1)  # a chunk's crop numbers
    index.append(jnp.asarray(full_positions[i])[local].reshape(-1, full_positions[i].shape[1]))
  index = sub.pack(index, pad_value=dummy).reshape(chunks, -1)  # [chunks, sub rows x L]
  flat = x.reshape(chunks, -1, x.shape[-1])
  flat = jnp.concatenate([flat, jnp.zeros_like(flat[:, :1])], axis=1)
  tokens = jnp.take_along_axis(flat, index[..., None], axis=1).reshape(sub.num_rows, sub.row_length, -1)
  segments = jnp.asarray(sub.segment_ids())
  update = branch(tokens, (sub, segments))
  scale = np.concatenate([np.full(kept_here, crops // groups / k.shape[1]) for k, (crops, _), (kept_here, _)
                          in zip(kept, layout.sizes, sub.sizes)] + [np.zeros(1)])  # per kept crop, n / k
  update = update * token_scale(jnp.asarray(scale, jnp.float32), segments).astype(update.dtype)
  added = jax.vmap(lambda f, i, u: f.at[i].add(u))(flat, index, update.reshape(chunks, -1, update.shape[-1])
                                                  .astype(flat.dtype))
  return added[:, :-1].reshape(x.shape)


def token_scale(scale: jax.Array, segment_ids: jax.Array) -> jax.Array:
  """Per-crop scales [num_crops + 1] at each packed token, [rows, L, 1]."""
  return jnp.take(scale, jnp.where(segment_ids < 0, scale.shape[0] - 1, segment_ids))[..., None]
