"""The runs axis of a sweep: values that agree across vmapped runs.

A sweep (``jaxcl.sweep``) trains k runs as one program, ``vmap``-ed over
the leading axis of their stacked states with the axis name
:data:`RUNS_AXIS`. Under that vmap every value read from the state or from
a run's batch is batched, and control flow on a batched value loses its
data-dependent shortcut: a ``lax.cond`` runs both branches and selects, a
``fori_loop`` / ``while_loop`` runs with a select over its whole carry at
every iteration until the last run is done. Where the decision can be
taken once for all runs and still be right for each of them, these helpers
turn it into one unbatched value (a collective over the runs axis); in a
single run, outside any sweep, they return their argument.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["RUNS_AXIS", "in_sweep", "max_over_runs", "all_over_runs"]

RUNS_AXIS = "runs"


def in_sweep() -> bool:
  """Whether the code being traced runs under a sweep's vmap (a static
  answer, for choosing between formulations that cost differently when
  batched)."""
  try:
    jax.lax.axis_index(RUNS_AXIS)
    return True
  except NameError:
    return False


def max_over_runs(x: jax.Array) -> jax.Array:
  """``x``'s maximum over a sweep's runs (unbatched); ``x`` in a single
  run. For loop bounds where running to the largest member's count is still
  right for the others (their extra iterations masked to zero)."""
  return jax.lax.pmax(x, RUNS_AXIS) if in_sweep() else x


def all_over_runs(pred: jax.Array) -> jax.Array:
  """True where ``pred`` holds in every run of a sweep (unbatched);
  ``pred`` in a single run. For ``cond``s whose True branch is a shortcut
  that is only valid where ``pred`` holds, and whose False branch is right
  for every run."""
  if in_sweep():
    return jax.lax.pmin(jnp.asarray(pred, jnp.int32), RUNS_AXIS) > 0
  return jnp.asarray(pred, bool)
