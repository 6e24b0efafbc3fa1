"""A small exact QP solver in JAX for GEM's dual problem (runs inside jit).

GEM (Lopez-Paz & Ranzato 2017, eq. 11-13) projects a gradient by solving
the dual of a quadratic program, a *box-constrained* convex QP in as many
variables as there are past experiences:

.. math::
   \\min_{v}\\; \\tfrac12 v^\\top P v + q^\\top v
   \\quad\\text{s.t.}\\quad v \\ge l,

with ``P = G Gᵀ + εI`` (positive definite) and ``q = G g``. This module
solves it with a primal active-set method (Lawson & Hanson's NNLS
algorithm, 1974, ch. 23, applied to ``u = v - l ≥ 0``): start with every
variable at its bound; repeatedly free the bound variable whose gradient
``w = P u + r`` is most negative, solve the equality-constrained problem on
the free set exactly (one ``n x n`` linear solve), and if that solution
leaves the feasible region, step back to the boundary and fix the variables
that hit it. For positive definite ``P`` it reaches the exact optimum (up to
round-off) in finitely many iterations, usually about ``n``.

Everything is shape-static: the free set is a boolean mask, the reduced
system is solved as a full ``n x n`` system whose fixed rows are the
identity, and the loop is a ``lax.while_loop`` with a fixed iteration
budget (``max_iter``) and a convergence check (the KKT conditions), so the
solver runs inside ``jit``, ``vmap`` and ``lax.scan`` with no host call.

References:
  Lawson & Hanson, *Solving Least Squares Problems*, Prentice-Hall 1974,
  ch. 23 (the NNLS active-set algorithm).
  Lopez-Paz & Ranzato, `Gradient Episodic Memory for Continual Learning
  <https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["QPResult", "solve_box_qp", "kkt_residual"]


class QPResult(NamedTuple):
  v: jax.Array          # float32 (n,): the minimiser (0 on inactive coords)
  converged: jax.Array  # bool scalar: the KKT check passed within budget
  iterations: jax.Array  # int32 scalar: active-set iterations used
  residual: jax.Array   # float32 scalar: KKT residual of the scaled problem


def kkt_residual(p: jax.Array, r: jax.Array, u: jax.Array,
                 active: jax.Array) -> jax.Array:
  """``‖u − max(u − (P u + r), 0)‖_∞`` over active coordinates.

  Zero exactly at the minimiser of ``½uᵀPu + rᵀu`` over ``u ≥ 0`` (the
  projected-gradient fixed point), so it certifies optimality.
  """
  w = p @ u + r
  res = jnp.abs(u - jnp.maximum(u - w, 0.0))
  return jnp.max(jnp.where(active, res, 0.0), initial=0.0)


def _solve_free(p, r, free):
  """argmin of ½uᵀPu + rᵀu with u = 0 outside ``free`` (exact solve)."""
  n = p.shape[0]
  both = free[:, None] & free[None, :]
  m = jnp.where(both, p, jnp.eye(n, dtype=p.dtype))
  rhs = jnp.where(free, -r, 0.0)
  z = jnp.linalg.solve(m, rhs)
  return jnp.where(free, z, 0.0)


def solve_box_qp(p: jax.Array, q: jax.Array, lower: jax.Array | float = 0.0,
                 active: jax.Array | None = None, *, max_iter: int = 0,
                 tol: float = 1e-6) -> QPResult:
  """Minimises ``½ vᵀPv + qᵀv`` subject to ``v ≥ lower``.

  Args:
    p: ``(n, n)`` symmetric positive definite matrix.
    q: ``(n,)`` linear term.
    lower: lower bounds, scalar or ``(n,)``.
    active: bool ``(n,)``; inactive coordinates are left out of the problem
      (their rows and columns of ``P`` are ignored) and returned as 0.
      None: all active.
    max_iter: iteration budget (0: ``3 n + 10``; each iteration is one
      ``n x n`` solve). Lawson-Hanson needs about ``n`` in practice.
    tol: KKT tolerance on the problem scaled so that ``max diag(P) = 1``.

  Returns:
    A :class:`QPResult`. If the budget runs out (``converged`` False) ``v``
    is the last feasible iterate, still ``≥ lower``.
  """
  p = jnp.asarray(p, jnp.float32)
  q = jnp.asarray(q, jnp.float32)
  n = q.shape[0]
  lower = jnp.broadcast_to(jnp.asarray(lower, jnp.float32), (n,))
  active = (jnp.ones((n,), bool) if active is None else
            jnp.asarray(active, bool))
  budget = max_iter or 3 * n + 10
  # Decouple inactive coordinates, then scale: the minimiser is unchanged
  # by a positive factor, and the tolerance becomes scale-free.
  both = active[:, None] & active[None, :]
  p = jnp.where(both, p, jnp.eye(n, dtype=p.dtype))
  scale = jnp.maximum(jnp.max(jnp.where(active, jnp.diag(p), 0.0)), 1e-30)
  p = p / scale
  lower = jnp.where(active, lower, 0.0)
  # u = v - lower >= 0: minimise ½uᵀPu + rᵀu with r = q/scale + P lower.
  r = jnp.where(active, q / scale + p @ lower, 0.0)
  idx = jnp.arange(n)

  def cond(s):
    _, _, it, done = s
    return (~done) & (it < budget)

  def body(s):
    u, free, it, _ = s
    z = _solve_free(p, r, free)
    feasible = jnp.all(jnp.where(free, z > 0.0, True))
    # Feasible: accept z; free the bound variable with the most negative
    # gradient, or stop if there is none (KKT holds).
    w = p @ z + r
    cand = jnp.where(active & ~free, w, jnp.inf)
    j = jnp.argmin(cand)
    optimal = cand[j] >= -tol
    free_a = jnp.where(optimal, free, free | (idx == j))
    # Infeasible: move from u towards z until the first free variable
    # reaches 0, and fix every variable that is (numerically) there.
    hit = free & (z <= 0.0)
    ratio = jnp.where(hit, u / jnp.maximum(u - z, 1e-30), jnp.inf)
    k = jnp.argmin(ratio)
    alpha = jnp.clip(ratio[k], 0.0, 1.0)
    u_b = jnp.maximum(u + alpha * (z - u), 0.0)
    free_b = free & (u_b > 1e-12) & (idx != k)
    u_b = jnp.where(free_b, u_b, 0.0)
    u = jnp.where(feasible, z, u_b)
    free = jnp.where(feasible, free_a, free_b)
    return u, free, it + 1, feasible & optimal

  init = (jnp.zeros((n,), jnp.float32), jnp.zeros((n,), bool),
          jnp.zeros((), jnp.int32), jnp.asarray(False))
  u, _, it, done = jax.lax.while_loop(cond, body, init)
  u = jnp.where(active, jnp.maximum(u, 0.0), 0.0)
  res = kkt_residual(p, r, u, active)
  v = jnp.where(active, u + lower, 0.0)
  return QPResult(v, done & (res <= 10 * tol + 1e-5), it, res)
