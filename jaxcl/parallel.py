"""Data-parallel training over a device mesh (``jax.sharding``).

One mesh axis, ``data``, spans the devices. Each mini-batch (after the
strategy's ``prepare_batch``, so replayed examples too) is sharded on that
axis; the model state is replicated, except large leaves whose leading axis
divides evenly — replay buffers, exemplar sets, stacked per-experience
slots — which are sharded along it, so memories scale with the number of
devices. Everything runs under ``jax.jit`` with explicit shardings; XLA
inserts the gradient all-reduce. (``pmap`` is the old way; with ``shard_map``
in this JAX version, ``pmean`` of a per-device gradient gives n times the
true gradient, so we let the partitioner do it.)

Multi-host: call :func:`initialize_multihost` (``jax.distributed.initialize``)
at start-up on every host; the mesh then spans all hosts' devices and each
host feeds the same (replicated) experience arrays.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

__all__ = ["make_mesh", "replicated", "batch_sharding", "state_sharding",
           "place", "initialize_multihost", "DATA"]

DATA = "data"


def initialize_multihost() -> None:
  """Connects the hosts of a multi-host job (TPU pods, SLURM, ...).

  Reads the coordinator address and process ids from the environment as
  ``jax.distributed.initialize`` documents; call it before any JAX work.
  """
  jax.distributed.initialize()


def make_mesh(devices: int = 0) -> Mesh:
  """A 1-D ``data`` mesh over ``devices`` devices (0: all of them).

  Raises:
    ValueError: a negative count, or more devices than exist.
  """
  if devices < 0:
    raise ValueError(f"parallel.devices must be >= 0 (0: all devices), got "
                     f"{devices}")
  available = jax.device_count()
  n = available if devices == 0 else devices
  if n > available:
    raise ValueError(f"parallel.devices={devices} but only {available} "
                     f"devices exist ({jax.devices()[0].platform})")
  return jax.make_mesh((n,), (DATA,), axis_types=(AxisType.Auto,),
                       devices=jax.devices()[:n])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA))


def state_sharding(tree: Any, mesh: Mesh, min_bytes: int = 1 << 20,
                   stacked: bool = False) -> Any:
  """Shardings for a state pytree: big, evenly divisible leaves are split
  along their leading (data) axis, the rest replicated.

  Args:
    stacked: the tree has a leading runs axis (a vmapped sweep); shard the
      axis after it.
  """
  n = mesh.shape[DATA]
  axis = 1 if stacked else 0

  def one(x):
    shape = np.shape(x)
    nbytes = math.prod(shape) * np.dtype(x.dtype).itemsize if shape else 0
    if (len(shape) > axis and shape[axis] % n == 0 and shape[axis] >= n and
        nbytes >= min_bytes):
      spec = [None] * len(shape)
      spec[axis] = DATA
      return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree)


def place(tree: Any, shardings: Any) -> Any:
  """Puts a pytree on the mesh; works across hosts when every host holds the
  same values."""

  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])

  return jax.tree.map(one, tree, shardings)
