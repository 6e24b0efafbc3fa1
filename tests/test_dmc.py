"""DMC (Zhang et al. 2020): the consolidation targets, the student's
training, the new specialist per experience, and bad input. The
auxiliary data is scikit-learn's digits (no download)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import scenarios, train
from jaxcl.state import cross_entropy_over
from jaxcl.strategies.dmc import consolidate, consolidation_targets, dmc
from test_replay import B, batch_of, make_ctx


def capture_aux_images(monkeypatch) -> list:
  """The auxiliary images each consolidation trains on, appended to the
  returned list as the consolidations run (``dmc.consolidate`` spied)."""
  from jaxcl.strategies import dmc as dmc_mod
  seen = []
  real = dmc_mod.consolidate

  def spy(ctx, key, targets, active, aux_x, **kw):
    jax.debug.callback(lambda a: seen.append(np.asarray(a)), aux_x)
    return real(ctx, key, targets, active, aux_x, **kw)

  monkeypatch.setattr(dmc_mod, "consolidate", spy)
  return seen


def test_consolidation_targets_centre_each_teacher_over_its_classes():
  rng = np.random.default_rng(0)
  old_z, new_z = rng.normal(size=(2, 4, 6)) * 3
  old = np.array([1, 1, 0, 0, 0, 0], bool)
  new = np.array([0, 0, 1, 1, 1, 0], bool)
  want = np.zeros((4, 6))
  want[:, :2] = old_z[:, :2] - old_z[:, :2].mean(1, keepdims=True)
  want[:, 2:5] = new_z[:, 2:5] - new_z[:, 2:5].mean(1, keepdims=True)
  got = consolidation_targets(jnp.asarray(old_z), jnp.asarray(new_z),
                              jnp.asarray(old), jnp.asarray(new))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_size,epochs,momentum", [
    (64, 3, 0.0), (64, 3, 0.9),
    # Several mini-batches per epoch (16 + 16 + 8 valid rows).
    (16, 2, 0.9)])
def test_consolidate_is_sgd_on_the_double_distillation_loss(
    stream, batch_size, epochs, momentum):
  """From the student's own fresh initialisation, one (heavy-ball) SGD
  step per mini-batch, in each epoch's shuffled order, on the mean of
  eq. 3 over the batch's valid rows (with 64 slots for 40 rows, one step
  per epoch)."""
  from jaxcl.strategies._epochs import shuffled_batches
  ctx = make_ctx(stream)
  x = jnp.asarray(stream.experiences[0].train_x[:40])
  active = jnp.asarray([True] * 4 + [False] * 6)
  targets = jax.random.normal(jax.random.PRNGKey(1), (40, 10)) * \
      active[None, :]
  key, lr = jax.random.PRNGKey(4), 0.05
  got, _ = consolidate(ctx, key, targets, active, x, epochs=epochs,
                       batch_size=batch_size, learning_rate=lr,
                       momentum=momentum)
  k_init, k_fit = jax.random.split(key)
  p, _ = train.init_variables(ctx, k_init)

  def loss(p, rows):
    out = ctx.logits(p, {}, x[rows], jnp.zeros((len(rows),), jnp.int32),
                     train=True)
    return jnp.mean(jnp.sum(jnp.where(active, out - targets[rows], 0.0)
                            ** 2, -1) / 4)

  grad = jax.jit(jax.grad(loss))   # compiled, not op by op (test time)
  buf, steps = None, 0
  for k in jax.random.split(k_fit, epochs):
    idx, ok = shuffled_batches(k, jnp.ones((40,), bool), batch_size)
    for i, o in zip(np.asarray(idx), np.asarray(ok)):
      g = grad(p, jnp.asarray(i[o]))
      buf = g if buf is None else jax.tree.map(
          lambda m, d: momentum * m + d, buf, g)
      p = jax.tree.map(lambda a, m: a - lr * m, p, buf)
      steps += 1
  assert steps == epochs * -(-40 // batch_size)
  for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(p)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(w), rtol=2e-4,
                               atol=2e-6)


def test_dmc_trains_a_specialist_then_consolidates(stream):
  ctx = make_ctx(stream)
  s = dmc(aux_dataset="digits", consolidate_epochs=40,
          consolidate_batch_size=32, consolidate_lr=0.05)
  e0, e1 = stream.experiences
  state = train.init_state(ctx, s, 0)
  step = jax.jit(lambda st, b: train.train_step(ctx, s, st, b)[0])

  def learn(state, exp, steps=40):
    for i in range(steps):
      state = step(state, batch_of(exp, start=(B * i) % (len(exp.train_y)
                                                          - B)))
    return state

  state = learn(s.before_experience(ctx, state, e0), e0)
  state = s.after_experience(ctx, state, e0)
  first = state.params
  for a, b in zip(jax.tree.leaves(state.strategy.old),
                  jax.tree.leaves(first)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Experience 1 starts a fresh model, and its loss is the cross-entropy
  # over classes 2 and 3 only.
  state = s.before_experience(ctx, state, e1)
  assert all(not np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
             zip(jax.tree.leaves(state.params), jax.tree.leaves(first)))
  b = batch_of(e1)
  logits = ctx.logits(state.params, {}, b["x"], b["task"], train=True)
  cur = np.zeros(10, bool)
  cur[[2, 3]] = True
  np.testing.assert_allclose(
      float(s.task_loss(ctx, state.strategy, logits, b)),
      float(cross_entropy_over(logits, b["y"], b["mask"], jnp.asarray(cur))),
      rtol=1e-6)
  state = learn(state, e1)
  specialist = state.params

  def acc(params, exp):
    x = jnp.asarray(exp.test_x)
    out = s.predict(ctx, state.strategy, params, {}, x,
                    jnp.zeros((x.shape[0],), jnp.int32))
    return float(np.mean(np.asarray(out).argmax(-1) == exp.test_y))

  assert acc(specialist, e0) < 0.1   # it never saw classes 0-1
  state = s.after_experience(ctx, state, e1)
  # The student knows both experiences' classes; it is the next old model.
  assert acc(state.params, e0) > 0.7 and acc(state.params, e1) > 0.7
  for a, b in zip(jax.tree.leaves(state.strategy.old),
                  jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(
      np.flatnonzero(np.asarray(state.strategy.seen)), [0, 1, 2, 3])


def test_dmc_resets_the_optimiser_and_uses_aux_size_random_images(
    stream, digits, monkeypatch):
  """With a momentum optimiser: the new specialist starts from a fresh
  optimiser state (no momentum carried over from the previous
  experience's model), and so does the student installed at the
  experience's end. The consolidation sees ``aux_size`` distinct images
  of the auxiliary set, in a random order (not its first rows)."""
  from jaxcl import models
  info = train.stream_info(stream, B)
  ctx = train.make_context(models.build("mlp", stream.num_classes,
                                        widths=(32,)),
                           train.make_optimizer("momentum", 0.1), info)
  seen = capture_aux_images(monkeypatch)
  s = dmc(aux_dataset="digits", aux_size=64, consolidate_epochs=1,
          consolidate_batch_size=32)
  e0, e1 = stream.experiences
  step = jax.jit(lambda st, b: train.train_step(ctx, s, st, b)[0])

  def fresh(state):
    want = ctx.tx.init(state.params)
    for a, w in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(want)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(w))

  def moving(state):   # the momentum of the step (the rate is a scalar)
    assert any(np.asarray(a).any() for a in jax.tree.leaves(state.opt_state)
               if np.ndim(a) > 0)

  state = s.before_experience(ctx, train.init_state(ctx, s, 0), e0)
  state = s.after_experience(ctx, step(state, batch_of(e0)), e0)
  state = s.before_experience(ctx, state, e1)
  fresh(state)
  state = step(state, batch_of(e1))
  moving(state)
  state = s.after_experience(ctx, state, e1)
  fresh(state)
  jax.effects_barrier()
  assert len(seen) == 1
  aux = seen[0].reshape(64, -1)
  data = np.asarray(digits.train_x, np.float32).reshape(
      len(digits.train_x), -1)
  assert len({r.tobytes() for r in aux}) == 64
  assert all((np.abs(data - r).sum(1) == 0).any() for r in aux)
  assert not np.array_equal(aux, data[:64])


@pytest.mark.parametrize("kwargs,needle", [
    (dict(aux_dataset="imagenet"), "aux_dataset"),
    (dict(aux_size=-1), r"dmc: aux_size must be an int >= 0 \(0: all\), "
     r"got -1$"),
    (dict(consolidate_epochs=0), "consolidate_epochs"),
    (dict(consolidate_lr=0.0), "consolidate_lr"),
    (dict(consolidate_batch_size=0), "consolidate_batch_size"),
    (dict(momentum=1.5), "momentum"),
])
def test_dmc_bad_arguments(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    dmc(**kwargs)


def test_dmc_bad_streams(stream):
  task = dataclasses.replace(stream, kind="task")
  with pytest.raises(ValueError, match="class-incremental"):
    train.init_state(make_ctx(task), dmc(aux_dataset="digits"), 0)
  small = scenarios.from_arrays(
      [(np.zeros((20, 4, 4, 1), np.float32), np.arange(20) % 2)],
      [(np.zeros((10, 4, 4, 1), np.float32), np.arange(10) % 2)])
  with pytest.raises(ValueError, match=r"shape \(8, 8, 1\).*\(4, 4, 1\)"):
    train.init_state(make_ctx(small), dmc(aux_dataset="digits"), 0)


def test_dmc_reads_aux_data_where_the_run_reads_its_data(monkeypatch,
                                                          digits):
  """A run built from a config passes its dataset.data_dir to DMC's
  auxiliary data set (unless aux_data_dir is given)."""
  from jaxcl import experiment
  from jaxcl.strategies import dmc as dmc_mod
  seen = []

  def load(name, data_dir=None):
    seen.append((name, data_dir))
    return digits

  monkeypatch.setattr(dmc_mod.datasets, "load", load)
  c = experiment.default_config()
  c.dataset.data_dir = "/somewhere/data"
  c.strategy.name = "dmc"
  c.strategy.dmc = dict(aux_dataset="digits")
  s, _ = experiment.build_strategy(c)
  ctx = make_ctx(scenarios.split(digits, 5))
  train.init_state(ctx, s, 0)
  c.strategy.dmc = dict(aux_dataset="digits", aux_data_dir="/mine")
  s, _ = experiment.build_strategy(c)
  train.init_state(ctx, s, 0)
  assert seen == [("digits", "/somewhere/data"), ("digits", "/mine")]
