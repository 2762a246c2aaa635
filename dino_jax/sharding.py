"""Devices and placement: the ("data", "fsdp") mesh and the few rules that place arrays on it.

The batch axis of inputs and activations is split over every device; parameters, their Adam
moments, the teacher and any frozen model follow one FSDP (ZeRO-3) rule, `fsdp_spec`.
"""
import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from dino_jax.errors import UsageError

BATCH = ("data", "fsdp")  # the batch axis of inputs and activations is split over every device


def make_mesh(cfg: ml_collections.ConfigDict | None = None, devices=None) -> jax.sharding.Mesh:
  """`devices` (default all) as a ("data", "fsdp") mesh with `cfg.mesh.fsdp` of them on the
  FSDP axis (1 without a config); XLA propagates shardings (Auto axes)."""
  devices = devices or jax.devices()
  fsdp = 1 if cfg is None else cfg.mesh.fsdp
  if fsdp < 1 or len(devices) % fsdp:
    raise UsageError(f"mesh.fsdp {fsdp} does not divide the {len(devices)} devices")
  return jax.make_mesh((len(devices) // fsdp, fsdp), BATCH, axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices)


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """The FSDP (ZeRO-3) rule: an array of at least `min_size` elements is split along its
  largest axis that the "fsdp" axis size divides; smaller ones (all, when fsdp is 1) are
  replicated. Parameters, their Adam moments and the teacher get the same placement."""
  if fsdp == 1 or int(np.prod(shape)) < min_size:
    return P()
  for axis in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[axis] % fsdp == 0:
      return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])
  return P()


def state_shardings(abstract_state, mesh: jax.sharding.Mesh, cfg) -> dict:
  """`fsdp_spec` placement of every array of a (train state) pytree."""
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, mesh.shape["fsdp"], cfg.mesh.fsdp_min_size)),
                      abstract_state)


def placed_abstract(tree, shardings):
  """Shapes and dtypes of `tree` with `shardings` (what `jit(...).lower` compiles for, with
  nothing allocated)."""
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), tree, shardings)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def constrain(x, sharding):
  """Activations stay split along the batch (views of one image on one device)."""
  return x if sharding is None else jax.lax.with_sharding_constraint(x, sharding)
