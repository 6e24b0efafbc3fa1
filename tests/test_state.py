"""The loss and logit helpers of jaxcl.state that every strategy's task
loss goes through, and its stream checks, against NumPy."""

import re

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl.state import (StreamInfo, cross_entropy, cross_entropy_over,
                         masked_logits)
from conftest import np_log_softmax


def _np_ce(logits, labels):
  return -np_log_softmax(np.asarray(logits, np.float64))[
      np.arange(len(labels)), labels]


def test_cross_entropy_is_the_mask_weighted_mean_over_at_least_one():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(4, 5)).astype(np.float32) * 3
  y = np.array([0, 3, 4, 1])
  ce = _np_ce(z, y)
  for mask in ([1, 0, 1, 1], [0.5, 0.25, 0, 2.0], [0.25, 0, 0.5, 0]):
    m = np.asarray(mask, np.float32)
    want = (ce * m).sum() / max(m.sum(), 1.0)  # weights under 1: not scaled
    np.testing.assert_allclose(
        float(cross_entropy(jnp.asarray(z), jnp.asarray(y), jnp.asarray(m))),
        want, rtol=1e-5)
  assert float(cross_entropy(jnp.asarray(z), jnp.asarray(y),
                             jnp.zeros(4))) == 0.0
  # Low-precision logits: the loss is computed in float32.
  zb = jnp.asarray(z * 10, jnp.bfloat16)
  got = cross_entropy(zb, jnp.asarray(y), jnp.ones(4))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(
      float(got), _np_ce(np.asarray(zb, np.float32), y).mean(), rtol=1e-5)


def test_cross_entropy_over_restricts_only_rows_labelled_inside():
  """Rows whose label is in ``classes``: softmax over those classes; the
  other rows (replayed old classes): over every class."""
  rng = np.random.default_rng(1)
  z = rng.normal(size=(4, 5)).astype(np.float32) * 2
  y = np.array([2, 3, 0, 3])
  classes = np.array([False, False, True, True, False])
  m = np.array([1, 1, 1, 0.5], np.float32)
  inside = _np_ce(z[:, 2:4], y - 2)  # rows 0, 1, 3 are labelled 2 or 3
  every = _np_ce(z, y)
  per_row = np.where(classes[y], inside, every)
  got = float(cross_entropy_over(jnp.asarray(z), jnp.asarray(y),
                                 jnp.asarray(m), jnp.asarray(classes)))
  np.testing.assert_allclose(got, (per_row * m).sum() / m.sum(), rtol=1e-5)


def test_masked_logits_keeps_each_rows_task_classes_finite():
  table = ((True, True, False, False), (False, False, True, True),
           (True, False, True, False))
  z = np.arange(30, dtype=np.float32).reshape(5, 6)  # 2 extra outputs
  task = np.array([0, 1, 2, 7, -1])  # ids out of range: clipped
  out = np.asarray(masked_logits(jnp.asarray(z), jnp.asarray(task), table))
  rows = np.array(table)[np.clip(task, 0, 2)]
  allowed = np.concatenate([rows, np.ones((5, 2), bool)], 1)
  np.testing.assert_array_equal(out[allowed], z[allowed])
  assert np.all(out[~allowed] <= -1e8) and np.all(np.isfinite(out))
  # Masked classes get no probability and finite gradients.
  import jax
  g = jax.grad(lambda v: cross_entropy(
      masked_logits(v, jnp.asarray(task), table), jnp.array([1, 2, 2, 0, 0]),
      jnp.ones(5)))(jnp.asarray(z))
  assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_array_equal(np.asarray(g)[~allowed], 0.0)


def _info(tasks, experiences):
  return StreamInfo(num_classes=10, num_tasks=tasks,
                    num_experiences=experiences, input_shape=(4,),
                    kind="task" if tasks > 1 else "class",
                    task_classes=((True,) * 10,) * tasks, batch_size=8,
                    train_size=16)


def test_task_per_experience_and_slot_checks_at_their_boundaries():
  _info(5, 5).require_task_per_experience("m")  # one id per experience
  with pytest.raises(ValueError, match=r"m trains each task once .*this "
                     r"stream has 5 experiences and 4 task id\(s\)"):
    _info(4, 5).require_task_per_experience("m")
  _info(5, 5).require_task_slots("m", 5, "columns", "f")  # just enough
  with pytest.raises(ValueError, match=re.escape(
      "m: the model has 4 columns for 5 tasks; set model.multi_head=True "
      "or f")):
    _info(5, 5).require_task_slots("m", 4, "columns", "f")
