"""A convolution whose gradient XLA:CPU runs at full speed inside loops.

jaxcl compiles an epoch into one ``lax.scan``. On XLA:CPU the gradient of a
plain NHWC / HWIO convolution costs 20-30x more inside a loop body (scan,
while, cond) than in a program of its own (``benchmarks/conv_in_scan.py``;
upstream: jax-ml/jax#12868, "Convolution is significantly slower inside a
loop body (CPU)"). The forward convolution is unaffected. JAX's transpose
rules give the two gradient convolutions non-canonical dimension numbers
(the kernel's features swapped for ``dx``; batch and features swapped for
``dw``); at the top level XLA:CPU's layout assignment inserts copies that
reach its fast kernels, inside a loop body it does not, and a slow generic
kernel runs.

:func:`conv_general_dilated` is a drop-in for ``lax.conv_general_dilated``
(flax's ``nn.Conv(conv_general_dilated=...)`` hook). On the CPU backend, for
the common case (NHWC / HWIO / NHWC, no dilation, one feature group) it is
a ``jax.custom_vjp`` whose backward pass writes both gradient convolutions
with explicit transposes, so that each is itself a canonical NHWC / HWIO
convolution:

* ``dx``: ``dy``, dilated by the stride, correlated with the kernel flipped
  in space and its in / out features swapped (the transposed convolution).
* ``dw``: ``x`` with its batch and feature axes exchanged (the batch becomes
  the contraction) correlated with ``dy`` as a kernel dilated by the stride.

The gradients are JAX's own transpose rules with the operands laid out
differently: bit-identical to lax's over the 216 settings a session-27
probe tried, within float rounding under ``vmap`` (``tests/test_conv.py``
compares them). Every other case, and every other backend, calls
``lax.conv_general_dilated``: GPU and TPU compilers assign these layouts
themselves.

A ``custom_vjp`` refuses forward-mode differentiation (``jax.jvp``,
``jax.jacfwd``), so on CPU the ``cnn`` and ``resnet18`` models support
reverse mode only (every strategy here uses reverse mode; SupSup's
``jacfwd`` runs through the masked layers, which call ``lax``). Code
that needs forward mode through them on CPU can build the backbone with
flax's ``nn.Conv``.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["conv_general_dilated", "Conv"]


def _specs(nsp: int) -> lax.ConvDimensionNumbers:
  """NHWC / HWIO / NHWC for ``nsp`` spatial dimensions, as lax spells it."""
  sp = tuple(range(1, nsp + 1))
  return lax.ConvDimensionNumbers(
      lhs_spec=(0, nsp + 1) + sp, rhs_spec=(nsp + 1, nsp) + tuple(range(nsp)),
      out_spec=(0, nsp + 1) + sp)


# Runs up to which a vmap rule with per-run inputs and kernels unrolls its
# per-run convolutions; more run in a loop.
_UNROLL = 8


def _dilated(n: int, d: int) -> int:
  return 0 if n == 0 else 1 + d * (n - 1)


@functools.lru_cache(maxsize=None)
def _canonical(strides: tuple, pads: tuple, lhs_dil: tuple, rhs_dil: tuple,
               precision: Any):
  """The NHWC / HWIO convolution with these static settings, as a function
  of ``(x, w)`` with the gradient and batching rules below (one function
  per setting, cached so that a program reuses it)."""

  def raw(x, w):
    return lax.conv_general_dilated(
        x, w, strides, pads, lhs_dilation=lhs_dil, rhs_dilation=rhs_dil,
        dimension_numbers=_specs(x.ndim - 2), precision=precision)

  @jax.custom_vjp
  @jax.custom_batching.custom_vmap
  def conv(x, w):
    return raw(x, w)

  @conv.def_vmap
  def conv_vmap(axis_size, in_batched, x, w):
    # lax batches a convolution over its kernels by feature groups, which
    # XLA:CPU runs slowly too; fold the runs into the batch or the output
    # features instead, or run one convolution per run.
    xb, wb = in_batched
    if xb and not wb:
      y = conv(x.reshape((-1,) + x.shape[2:]), w)
      return y.reshape((axis_size, -1) + y.shape[1:]), True
    if wb and not xb:
      wk = jnp.moveaxis(w, 0, -2)                 # space, C, K, O
      y = conv(x, wk.reshape(wk.shape[:-2] + (-1,)))
      y = y.reshape(y.shape[:-1] + (axis_size, w.shape[-1]))
      return jnp.moveaxis(y, -2, 0), True
    if axis_size <= _UNROLL:
      return jnp.stack([conv(x[k], w[k]) for k in range(axis_size)]), True
    # Many runs: a loop, not a program that grows with the runs (canonical
    # convolutions run as fast inside a loop body).
    return lax.map(lambda xw: conv(*xw), (x, w)), True

  def fwd(x, w):
    return conv(x, w), (x, w)

  def bwd(res, dy):
    x, w = res
    nsp = x.ndim - 2
    i_sp, k_sp, o_sp = x.shape[1:-1], w.shape[:nsp], dy.shape[1:-1]
    lhs_d = [_dilated(i, a) for i, a in zip(i_sp, lhs_dil)]
    rhs_d = [_dilated(k, d) for k, d in zip(k_sp, rhs_dil)]
    out_d = [_dilated(o, s) for o, s in zip(o_sp, strides)]
    # dx: the transposed convolution (lax's
    # _conv_general_dilated_transpose_lhs, with the kernel's features
    # swapped by an explicit transpose rather than by dimension numbers).
    before = [rd - lo - 1 for rd, (lo, _) in zip(rhs_d, pads)]
    dx_pads = tuple((b, ld + rd - 1 - od - b)
                    for b, ld, rd, od in zip(before, lhs_d, rhs_d, out_d))
    w_t = jnp.swapaxes(jnp.flip(w, tuple(range(nsp))), -1, -2)
    dx = _canonical(lhs_dil, dx_pads, strides, rhs_dil, precision)(dy, w_t)
    # dw: x's batch and features exchanged, so the batch is the contraction,
    # with dy as the kernel (lax's _conv_general_dilated_transpose_rhs).
    dw_pads = tuple((lo, od - ld + rd - lo - 1)
                    for (lo, _), ld, rd, od in zip(pads, lhs_d, rhs_d, out_d))
    lhs = jnp.moveaxis(x, (0, x.ndim - 1), (x.ndim - 1, 0))   # C, space, N
    rhs = jnp.moveaxis(dy, 0, -2)                            # space, N, O
    dw = _canonical(rhs_dil, dw_pads, lhs_dil, strides, precision)(lhs, rhs)
    return dx.astype(x.dtype), jnp.moveaxis(dw, 0, -2).astype(w.dtype)

  conv.defvjp(fwd, bwd)
  return conv


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array,
                         window_strides: Sequence[int], padding: Any,
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None,
                         feature_group_count: int = 1,
                         batch_group_count: int = 1,
                         precision: Any = None,
                         preferred_element_type: Any = None) -> jax.Array:
  """``lax.conv_general_dilated``, with a loop-friendly gradient on CPU."""
  nsp = lhs.ndim - 2
  ones = (1,) * nsp
  lhs_dil = tuple(int(d) for d in lhs_dilation or ones)
  rhs_dil = tuple(int(d) for d in rhs_dilation or ones)
  plain = (
      jax.default_backend() == "cpu"
      and lhs.dtype == rhs.dtype and preferred_element_type is None
      and feature_group_count == 1 and batch_group_count == 1
      # lax refuses string padding for a transposed convolution: its error.
      and not (isinstance(padding, str) and lhs_dil != ones)
      and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
      == _specs(nsp))
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    # As lax does: the string pads the kernel's dilated extent.
    pads = lax.padtype_to_pads(
        lhs.shape[1:-1],
        [_dilated(k, d) for k, d in zip(rhs.shape[:nsp], rhs_dil)],
        strides, padding)
  else:
    pads = padding
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  return _canonical(strides, pads, lhs_dil, rhs_dil, precision)(lhs, rhs)


# flax's Conv with the convolution above; its parameters (``kernel``,
# ``bias``) and their names are nn.Conv's, so checkpoints carry over.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
