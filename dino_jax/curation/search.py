"""Similarity search, k-means and duplicate groups on the device mesh (DINOv2 App. A).

DINOv2's curation (Oquab et al. 2023, Sec. 3 and App. A) compares every pool image with
every other one (copy detection), with every evaluation image, and with every seed image,
and clusters the pool with k-means. Here each of these is a blocked, sharded matrix product
on the training mesh (`sharding.make_mesh()`): the database rows (l2-normalized features)
are split over every device; queries come in blocks of `block_size` rows, replicated; each
device walks its rows `block_size` at a time keeping a running top-k, and the per-device
top-k are merged after an all-gather. Memory per device: its share of the database plus
one block_size x block_size similarity tile. Several processes (`--distributed`) each hold
the features and place only the rows of their own devices.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import tqdm

from dino_jax import sharding
from dino_jax.errors import UsageError

ROWS = P(sharding.BATCH, None)  # database rows split over every device


def check_threshold(name: str, threshold: float) -> None:
  if not -1.0 <= threshold <= 1.0:
    raise UsageError(f"{name} {threshold} is a cosine similarity and must be in [-1, 1]")


def place(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array every process holds (each places its own devices' part)."""
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:], x.dtype)]) if rows > len(x) else x


def device_rows(n: int, num_devices: int, block_size: int) -> tuple[int, int]:
  """(rows per device, tile rows): each device's share of n rows, padded to whole tiles."""
  tile = max(1, min(block_size, math.ceil(n / num_devices)))
  return tile * math.ceil(n / (num_devices * tile)), tile


def _local_top_k(queries, rows, *, k, tile, num_rows):
  """Top-k (similarity, global row) of `queries` among this device's `rows`, tile by tile."""
  first = jax.lax.axis_index(sharding.BATCH) * rows.shape[0]
  tiles = rows.reshape(-1, tile, rows.shape[1])

  def merge(best, tile_and_start):
    rows_tile, start = tile_and_start
    index = start + jnp.arange(tile)
    sim = jnp.dot(queries, rows_tile.T, precision=jax.lax.Precision.HIGHEST)
    sim = jnp.where(index < num_rows, sim, -jnp.inf)
    sim = jnp.concatenate([best[0], sim], axis=1)
    index = jnp.concatenate([best[1], jnp.broadcast_to(index, (queries.shape[0], tile))], axis=1)
    top, pos = jax.lax.top_k(sim, k)
    return (top, jnp.take_along_axis(index, pos, axis=1)), None

  init = (jnp.full((queries.shape[0], k), -jnp.inf), jnp.full((queries.shape[0], k), -1, jnp.int32))
  starts = (first + tile * jnp.arange(tiles.shape[0])).astype(jnp.int32)
  (sim, index), _ = jax.lax.scan(merge, init, (tiles, starts))
  sim = jax.lax.all_gather(sim, sharding.BATCH, axis=1, tiled=True)
  index = jax.lax.all_gather(index, sharding.BATCH, axis=1, tiled=True)
  top, pos = jax.lax.top_k(sim, k)
  return top, jnp.take_along_axis(index, pos, axis=1)


@functools.lru_cache(maxsize=16)
def _top_k_fn(mesh, k: int, tile: int, num_rows: int):
  fn = jax.shard_map(functools.partial(_local_top_k, k=k, tile=tile, num_rows=num_rows), mesh=mesh,
                     in_specs=(P(), ROWS), out_specs=(P(), P()), check_vma=False)
  return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))


def top_k_search(queries: np.ndarray, database: np.ndarray, k: int, mesh, block_size: int,
                 desc: str = "search") -> tuple[np.ndarray, np.ndarray]:
  """Cosine similarities [Q, k] (descending) and rows [Q, k] of each query's k nearest
  database rows; inputs are l2-normalized float32. Blocked and sharded (module docstring)."""
  if not len(database):
    raise UsageError("the database to search is empty")
  k = min(k, len(database))
  per_device, tile = device_rows(len(database), mesh.size, block_size)
  rows = place(pad_rows(database.astype(np.float32), per_device * mesh.size), NamedSharding(mesh, ROWS))
  fn = _top_k_fn(mesh, k, tile, len(database))
  block = min(block_size, len(queries))
  sims, index = [], []
  for i in tqdm.trange(0, len(queries), block, desc=desc, unit="block", disable=jax.process_index() != 0,
                       leave=False):
    q = pad_rows(queries[i:i + block].astype(np.float32), block)
    s, j = fn(place(q, NamedSharding(mesh, P())), rows)
    n = min(block, len(queries) - i)
    sims.append(np.asarray(s)[:n])
    index.append(np.asarray(j)[:n])
  return np.concatenate(sims), np.concatenate(index)


# ---------------------------------------------------------------------------------------
# k-means (Lloyd), the pool sharded by rows as in the search.
# ---------------------------------------------------------------------------------------


def _local_lloyd_pass(rows, weights, centroids, *, tile):
  """Nearest centroid (squared Euclidean) of this device's rows, and the summed sums and
  counts of the rows assigned to each centroid over all devices."""
  half_norms = 0.5 * jnp.sum(centroids ** 2, axis=1)
  num_clusters = centroids.shape[0]

  def assign(totals, tile_and_weights):
    x, w = tile_and_weights
    nearest = jnp.argmax(jnp.dot(x, centroids.T, precision=jax.lax.Precision.HIGHEST) - half_norms, axis=1)
    onehot = jax.nn.one_hot(nearest, num_clusters, dtype=x.dtype) * w[:, None]
    sums = totals[0] + jnp.dot(onehot.T, x, precision=jax.lax.Precision.HIGHEST)
    return (sums, totals[1] + jnp.sum(onehot, axis=0)), nearest.astype(jnp.int32)

  init = (jnp.zeros_like(centroids), jnp.zeros((num_clusters,), centroids.dtype))
  (sums, counts), nearest = jax.lax.scan(
      assign, init, (rows.reshape(-1, tile, rows.shape[1]), weights.reshape(-1, tile)))
  return jax.lax.psum(sums, sharding.BATCH), jax.lax.psum(counts, sharding.BATCH), nearest.reshape(-1)


@functools.lru_cache(maxsize=16)
def _lloyd_fn(mesh, tile: int):
  fn = jax.shard_map(functools.partial(_local_lloyd_pass, tile=tile), mesh=mesh,
                     in_specs=(ROWS, P(sharding.BATCH), P()), out_specs=(P(), P(), P(sharding.BATCH)),
                     check_vma=False)
  return jax.jit(fn, out_shardings=NamedSharding(mesh, P()))


def kmeans(features: np.ndarray, num_clusters: int, iterations: int, seed: int, mesh,
           block_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Lloyd's k-means: (centroids [K, D], cluster of each row [N]). Starts from K distinct
  rows drawn with `seed`; an emptied cluster keeps its centroid."""
  n = len(features)
  if not 1 <= num_clusters <= n:
    raise UsageError(f"k-means needs 1 <= num_clusters <= {n} (the pool size), not {num_clusters}")
  per_device, tile = device_rows(n, mesh.size, block_size)
  padded = per_device * mesh.size
  rows = place(pad_rows(features.astype(np.float32), padded), NamedSharding(mesh, ROWS))
  weights = place((np.arange(padded) < n).astype(np.float32), NamedSharding(mesh, P(sharding.BATCH)))
  fn = _lloyd_fn(mesh, tile)
  centroids = features[np.sort(np.random.default_rng(seed).choice(n, num_clusters, replace=False))]
  for _ in tqdm.trange(iterations, desc="k-means", unit="iter", disable=jax.process_index() != 0, leave=False):
    sums, counts, _ = jax.device_get(fn(rows, weights, place(centroids.astype(np.float32), NamedSharding(mesh, P()))))
    centroids = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centroids)
  _, _, nearest = fn(rows, weights, place(centroids.astype(np.float32), NamedSharding(mesh, P())))
  return centroids, np.asarray(nearest)[:n]


def nearest_clusters(queries: np.ndarray, centroids: np.ndarray, n: int, mesh, block_size: int) -> np.ndarray:
  """The n clusters [Q, n] whose centroids are nearest (squared Euclidean, as k-means assigns)
  to each query: argmax of q.c - |c|^2/2, the search's dot product on [q, 1] . [c, -|c|^2/2]."""
  with_bias = lambda x, b: np.concatenate([x, b[:, None]], axis=1).astype(np.float32)
  _, index = top_k_search(with_bias(queries, np.ones(len(queries))),
                          with_bias(centroids, -0.5 * np.sum(centroids ** 2, axis=1)), n, mesh, block_size,
                          desc="nearest clusters")
  return index


# ---------------------------------------------------------------------------------------
# Duplicate groups: connected components of the thresholded k-NN graph.
# ---------------------------------------------------------------------------------------


def duplicate_groups(sims: np.ndarray, index: np.ndarray, threshold: float) -> np.ndarray:
  """Component id [N] of each row in the graph with an edge i - index[i, j] wherever
  sims[i, j] >= threshold (DINOv2 App. A: copy detection, then connected components)."""
  n = len(sims)
  rows = np.repeat(np.arange(n), sims.shape[1]).reshape(sims.shape)
  edge = (sims >= threshold) & (index >= 0) & (index != rows)
  graph = scipy.sparse.coo_matrix((np.ones(edge.sum(), np.int8), (rows[edge], index[edge])), shape=(n, n))
  return scipy.sparse.csgraph.connected_components(graph, directed=False)[1]


def representatives(groups: np.ndarray) -> np.ndarray:
  """The kept row of each row's group [N]: the group's first row."""
  first = np.full(groups.max() + 1, len(groups))
  np.minimum.at(first, groups, np.arange(len(groups)))
  return first[groups]
