"""STAR (jaxcl/strategies/star.py): the perturbation's size per kernel and
its ascent, the added gradient against a NumPy computation on a linear
model, the mask of correctly classified rows, no effect on an empty
memory, argument checks, and a run of star+replay through the normal
loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import train
from jaxcl.strategies import star as st
from jaxcl.strategies.star import star
from test_replay import B, batch_of, config, make_ctx, run_capture


def random_params(ctx, seed, scale=0.3):
  """Initial parameters with random (nonzero) biases, so that leaving
  them unperturbed is a visible choice."""
  params, _ = train.init_variables(ctx, jax.random.PRNGKey(seed))
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda a: jnp.asarray(rng.normal(size=a.shape) * scale, jnp.float32)
      if a.ndim == 1 else a, params)


def kl_of(ctx, params, x, mask=None):
  """``D`` of the strategy on rows ``x``: KL to the predictions at
  ``params`` over ``mask`` (all rows by default)."""
  task = jnp.zeros((x.shape[0],), jnp.int32)
  p = jax.nn.softmax(ctx.logits(params, {}, x, task, train=True))
  mask = jnp.ones((x.shape[0],)) if mask is None else mask
  return lambda q: st.masked_kl(p, ctx.logits(q, {}, x, task, train=True),
                                mask)


def test_perturbation_size_per_kernel_and_biases_untouched(stream):
  ctx = make_ctx(stream, (16,))
  params = random_params(ctx, 0)
  x = jnp.asarray(stream.experiences[0].train_x[:20])
  kl_fn = kl_of(ctx, params, x)
  d0 = st.random_start(jax.random.PRNGKey(1), params, 1e-3)
  delta = jax.jit(lambda d: st.perturbation(kl_fn, params, d, 0.05, 1))(d0)
  flat_p = jax.tree_util.tree_leaves_with_path(params)
  kinds = set()
  for (path, w), d, a in zip(flat_p, jax.tree.leaves(delta),
                             jax.tree.leaves(d0)):
    w, d, a = (np.asarray(v, np.float64) for v in (w, d, a))
    if w.ndim >= 2:
      kinds.add("kernel")
      nw = np.linalg.norm(w)
      np.testing.assert_allclose(np.linalg.norm(a), 1e-3 * nw, rtol=1e-5)
      # One step: exactly p_gamma * ||W|| from the start, and the start
      # is within init_scale * ||W|| of zero.
      np.testing.assert_allclose(np.linalg.norm(d - a), 0.05 * nw,
                                 rtol=1e-5)
      assert abs(np.linalg.norm(d) - 0.05 * nw) <= 1e-3 * nw + 1e-7
    else:
      kinds.add("bias")
      assert np.all(a == 0) and np.all(d == 0), path  # not perturbed
  assert kinds == {"kernel", "bias"}
  # Three steps of p_gamma / 3: each kernel moves at most p_gamma ||W||
  # (nearly that: the steps point alike).
  d3 = jax.jit(lambda d: st.perturbation(kl_fn, params, d, 0.05, 3))(d0)
  for w, d, a in zip(jax.tree.leaves(params), jax.tree.leaves(d3),
                     jax.tree.leaves(d0)):
    if w.ndim >= 2:
      r = float(jnp.linalg.norm(d - a) / (0.05 * jnp.linalg.norm(w)))
      assert 0.9 < r <= 1.0 + 1e-5, r


def test_random_signs_are_fair_and_independent():
  """32 signs per random word: only +-1, about half each in every bit
  position (a stuck bit would show), different per key, any length."""
  z = np.asarray(st.random_signs(jax.random.PRNGKey(0), (50, 64)))
  assert z.shape == (50, 64) and set(np.unique(z)) == {-1.0, 1.0}
  per_bit = (z.reshape(-1, 32) > 0).mean(0)  # 100 words per bit position
  assert np.all(np.abs(per_bit - 0.5) < 0.2), per_bit
  assert abs(z.mean()) < 0.05
  other = np.asarray(st.random_signs(jax.random.PRNGKey(1), (50, 64)))
  assert 0.4 < np.mean(z == other) < 0.6
  odd = np.asarray(st.random_signs(jax.random.PRNGKey(2), (7, 5)))
  assert odd.shape == (7, 5) and set(np.unique(odd)) == {-1.0, 1.0}


def test_perturbation_ascends_the_kl(stream):
  ctx = make_ctx(stream, (16,))
  params = random_params(ctx, 2)
  x = jnp.asarray(stream.experiences[0].train_x[:20])
  kl_fn = kl_of(ctx, params, x)
  d0 = st.random_start(jax.random.PRNGKey(3), params, 1e-3)
  delta = st.perturbation(kl_fn, params, d0, 0.05, 1)

  def at(d):
    return float(kl_fn(jax.tree.map(jnp.add, params, d)))

  assert abs(at(jax.tree.map(jnp.zeros_like, params))) < 1e-6
  # Above the start, and well above a random move of the same size per
  # kernel: the step follows the KL's curvature, not just its size.
  rand = st.random_start(jax.random.PRNGKey(4), params, 0.05)
  assert at(delta) > 100 * at(d0), (at(delta), at(d0))
  assert at(delta) > 3 * at(rand), (at(delta), at(rand))
  # The KL is even in delta to second order, so from a tiny start a step
  # up and a step down (overshooting through 0) land alike. From a start
  # larger than the step, ascending must raise the KL.
  far = st.random_start(jax.random.PRNGKey(5), params, 0.05)
  up = st.perturbation(kl_fn, params, far, 0.005, 1)
  assert at(up) > 1.1 * at(far), (at(up), at(far))


def numpy_kl_grad(w, b, x, p, mask):
  """``(dD/dW, dD/db)`` of the masked mean KL for logits ``x W + b`` by
  hand (float64): ``dD/dz_i = mask_i / sum(mask) (q_i - p_i)``."""
  z = x @ w + b
  q = np.exp(z - z.max(1, keepdims=True))
  q /= q.sum(1, keepdims=True)
  dz = mask[:, None] / max(mask.sum(), 1.0) * (q - p)
  return x.T @ dz, dz.sum(0)


def star_batch(exp, y=None, ok=None, n=B):
  x = jnp.asarray(exp.train_x[:n])
  return {"star_x": x,
          "star_y": jnp.asarray(exp.train_y[:n] if y is None else y),
          "star_task": jnp.zeros((n,), jnp.int32),
          "star_ok": jnp.ones((n,)) if ok is None else jnp.asarray(ok)}


def hand_update(params, batch, key, p_lam, p_gamma, init_scale):
  """STAR's added gradient on the linear model, by NumPy: one normalised
  step from the strategy's random start, the gradient at the result."""
  w = np.asarray(params["head"]["kernel"], np.float64)
  b = np.asarray(params["head"]["bias"], np.float64)
  x = np.asarray(batch["star_x"], np.float64).reshape(B, -1)
  z = x @ w + b
  p = np.exp(z - z.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  mask = np.asarray(batch["star_ok"]) * (z.argmax(1) == np.asarray(
      batch["star_y"]))
  d0 = np.asarray(st.random_start(key, params, init_scale)["head"]["kernel"],
                  np.float64)
  g, _ = numpy_kl_grad(w + d0, b, x, p, mask)
  dw = d0 + p_gamma * np.linalg.norm(w) * g / np.linalg.norm(g)
  gw, gb = numpy_kl_grad(w + dw, b, x, p, mask)
  return p_lam * gw, p_lam * gb, mask, (w, b, x, p)


def test_added_gradient_is_the_kl_gradient_at_the_perturbed_point(stream):
  ctx = make_ctx(stream, ())  # logits = x W + b
  s = star(p_lam=0.5, p_gamma=0.1, mem_size=40)
  ss = s.init(ctx, jax.random.PRNGKey(0), None)
  params = random_params(ctx, 5, scale=0.1)
  exp = stream.experiences[0]
  # Labels: the model's own predictions, except rows 0-2 (misclassified).
  task = jnp.zeros((B,), jnp.int32)
  pred = np.asarray(jnp.argmax(ctx.logits(params, {}, jnp.asarray(
      exp.train_x[:B]), task), -1))
  y = pred.copy()
  y[:3] = (pred[:3] + 1) % 10
  batch = star_batch(exp, y=y)
  grads = jax.tree.map(lambda a: jnp.full_like(a, 0.25), params)
  key = jax.random.PRNGKey(7)
  got = jax.jit(s.update_grads, static_argnums=0)(ctx, ss, grads, params,
                                                  batch, key)
  gw, gb, mask, (w, b, x, p) = hand_update(params, batch, key, 0.5, 0.1,
                                           1e-3)
  np.testing.assert_array_equal(mask, [0] * 3 + [1] * (B - 3))
  # float32 against float64: q - p cancels near 0, so entries far below
  # the largest carry ~1e-7 absolute error; the tolerance scales with it.
  np.testing.assert_allclose(np.asarray(got["head"]["kernel"]) - 0.25, gw,
                             rtol=2e-3, atol=1e-4 * np.abs(gw).max())
  np.testing.assert_allclose(np.asarray(got["head"]["bias"]) - 0.25, gb,
                             rtol=2e-3, atol=1e-4 * np.abs(gb).max())
  # Not the gradient at theta (zero there: p is the model's own output),
  # nor at the random start alone.
  g_theta, _ = numpy_kl_grad(w, b, x, p, mask)
  assert np.abs(g_theta).max() < 1e-12
  d0 = np.asarray(st.random_start(key, params, 1e-3)["head"]["kernel"])
  g_start, _ = numpy_kl_grad(w + d0, b, x, p, mask)
  assert np.linalg.norm(0.5 * g_start) < 0.1 * np.linalg.norm(gw)
  assert np.linalg.norm(gw) > 1e-4


def test_only_correctly_classified_rows_and_at_least_two(stream):
  ctx = make_ctx(stream, ())
  s = star(p_lam=1.0, p_gamma=0.1, mem_size=40)
  ss = s.init(ctx, jax.random.PRNGKey(0), None)
  params = random_params(ctx, 6, scale=0.1)
  exp = stream.experiences[0]
  x = jnp.asarray(exp.train_x[:B])
  pred = np.asarray(jnp.argmax(ctx.logits(
      params, {}, x, jnp.zeros((B,), jnp.int32)), -1))
  zeros = jax.tree.map(jnp.zeros_like, params)
  key = jax.random.PRNGKey(8)
  upd = jax.jit(s.update_grads, static_argnums=0)

  def added(y, ok=None, xs=None):
    b = star_batch(exp, y=y, ok=ok)
    if xs is not None:
      b["star_x"] = xs
    return upd(ctx, ss, zeros, params, b, key)

  wrong = (pred + 1) % 10
  # Rows 0-4 correct, 5-9 wrong: replacing a wrong row's input changes
  # nothing; replacing a correct row's does.
  y = np.where(np.arange(B) < 5, pred, wrong)
  base = added(y)
  other = jnp.asarray(exp.train_x[B:B + 1])
  moved_wrong = added(y, xs=x.at[7].set(other[0]))
  moved_right = added(y, xs=x.at[2].set(other[0]))
  k = lambda g: np.asarray(g["head"]["kernel"])
  assert np.abs(k(base)).max() > 1e-4
  # (the wrong row may become correct under the new input: check it did
  # not, so the test means what it says)
  assert int(jnp.argmax(ctx.logits(params, {}, other, jnp.zeros(
      (1,), jnp.int32)), -1)[0]) != int(y[7])
  np.testing.assert_array_equal(k(moved_wrong), k(base))
  assert np.abs(k(moved_right) - k(base)).max() > 1e-6
  # Padding rows (ok = 0) are out even when "correct".
  ok = np.where(np.arange(B) < 5, 0.0, 1.0)
  np.testing.assert_array_equal(k(added(pred, ok=ok)),
                                k(added(np.where(ok > 0, pred, wrong))))
  # Exactly one correct row: no term at all; two: a term.
  one = np.where(np.arange(B) == 4, pred, wrong)
  for g in jax.tree.leaves(added(one)):
    np.testing.assert_array_equal(np.asarray(g), 0.0)
  two = np.where(np.arange(B) >= 8, pred, wrong)
  assert np.abs(k(added(two))).max() > 1e-5


def test_no_effect_on_an_empty_memory(stream):
  ctx = make_ctx(stream, (16,))
  s = star(p_lam=1.0, mem_size=40)
  state = train.init_state(ctx, s, 0)
  ss = state.strategy
  batch = s.prepare_batch(ctx, ss, batch_of(stream.experiences[0]),
                          jax.random.PRNGKey(0))
  np.testing.assert_array_equal(np.asarray(batch["star_ok"]), 0.0)
  grads = jax.tree.map(lambda a: jnp.full_like(a, 0.5), state.params)
  got = jax.jit(s.update_grads, static_argnums=0)(
      ctx, ss, grads, state.params, batch, jax.random.PRNGKey(1))
  for g in jax.tree.leaves(got):  # unchanged, not NaN
    np.testing.assert_array_equal(np.asarray(g), 0.5)
  # The reservoir takes the step's rows, and the next draw reads them.
  info = train.StepInfo(None, None, grads, None, batch, jnp.zeros(()))
  ss = s.after_step(ctx, ss, info)
  batch = s.prepare_batch(ctx, ss, batch_of(stream.experiences[0], start=B),
                          jax.random.PRNGKey(2))
  assert float(jnp.sum(batch["star_ok"])) == B


def test_star_with_replay_runs_in_the_loop(monkeypatch, stream):
  cfg = config("star+replay", star=dict(mem_size=40, p_lam=0.1),
               replay=dict(mem_size=40))
  result, learner = run_capture(monkeypatch, cfg, stream)
  assert learner.chunk_fn._cache_size() == 1  # no recompile
  assert np.all(np.isfinite(result.accuracy))
  assert result.accuracy[1, 0] > 0.3, result.accuracy
  ss_star, ss_replay = result.state.strategy
  total = sum(e.num_train for e in stream.experiences)
  assert int(ss_star.memory.seen) == total == int(ss_replay.memory.seen)


def test_bad_arguments():
  for kw, match in ((dict(p_lam=-0.1), "p_lam must be a finite number > 0"),
                    (dict(p_lam=0), "p_lam"),
                    (dict(p_lam=float("nan")), "p_lam"),
                    (dict(p_gamma=-0.05), "p_gamma must be"),
                    (dict(p_gamma=float("inf")), "p_gamma"),
                    (dict(p_steps=0), "p_steps must be an int >= 1"),
                    (dict(p_steps=1.5), "p_steps"),
                    (dict(init_scale=0), "init_scale"),
                    (dict(init_scale=0.1, p_gamma=0.05),
                     "init_scale must be smaller than p_gamma"),
                    (dict(mem_size=0), "mem_size"),
                    (dict(batch_size=-1), "batch_size"),
                    (dict(mem_size=5, batch_size=8), "batch_size=8")):
    with pytest.raises(ValueError, match=match):
      star(**kw)


def test_step_is_scaled_by_the_unperturbed_kernel_norm(stream):
  """Each ascent step has norm ``p_gamma / K * ||W||`` with ``W`` the
  kernel at ``theta`` (the code rescales to the *original* weights), not
  the norm at ``theta + delta``: visible from a start of half the
  kernel's size."""
  ctx = make_ctx(stream, (16,))
  params = random_params(ctx, 1)
  x = jnp.asarray(stream.experiences[0].train_x[:20])
  kl_fn = kl_of(ctx, params, x)
  d0 = st.random_start(jax.random.PRNGKey(2), params, 0.5)
  d = jax.jit(lambda d: st.perturbation(kl_fn, params, d, 0.05, 1))(d0)
  for w, a, b in zip(jax.tree.leaves(params), jax.tree.leaves(d0),
                     jax.tree.leaves(d)):
    if w.ndim >= 2:
      w, a, b = (np.asarray(v, np.float64) for v in (w, a, b))
      assert abs(np.linalg.norm(w + a) / np.linalg.norm(w) - 1) > 0.05
      np.testing.assert_allclose(np.linalg.norm(b - a),
                                 0.05 * np.linalg.norm(w), rtol=1e-5)


def test_random_start_draws_each_kernel_its_own_signs(stream):
  ctx = make_ctx(stream, (16,))
  params = random_params(ctx, 0)
  d0 = st.random_start(jax.random.PRNGKey(3), params, 1e-3)
  signs = [np.sign(np.asarray(d)).ravel() for w, d in zip(
      jax.tree.leaves(params), jax.tree.leaves(d0)) if w.ndim >= 2]
  assert len(signs) == 2
  n = min(len(s) for s in signs)
  assert 0.4 < np.mean(signs[0][:n] == signs[1][:n]) < 0.6


def test_drawn_rows_carry_their_task_ids(stream):
  # The drawn rows' forward passes use their stored task ids (a
  # multi-head model picks its head by them), not the experience tags.
  ctx = make_ctx(stream, (16,))
  s = star(mem_size=10, batch_size=4)
  ss = s.init(ctx, jax.random.PRNGKey(0), None)
  from jaxcl import buffers
  exp = stream.experiences[0]
  mem = buffers.put_rows(ss.memory, jnp.arange(6), exp.train_x[:6],
                         exp.train_y[:6], jnp.full((6,), 1, jnp.int32),
                         jnp.full((6,), 3, jnp.int32))
  out = s.prepare_batch(ctx, ss._replace(memory=mem), batch_of(exp),
                        jax.random.PRNGKey(1))
  np.testing.assert_array_equal(np.asarray(out["star_ok"]), 1.0)
  np.testing.assert_array_equal(np.asarray(out["star_task"]), 1)
  xs = {r.tobytes(): int(y) for r, y in zip(np.asarray(exp.train_x[:6]),
                                            exp.train_y[:6])}
  for r, y in zip(np.asarray(out["star_x"]), np.asarray(out["star_y"])):
    assert xs[r.tobytes()] == y


def test_init_scale_equal_to_p_gamma_is_refused():
  with pytest.raises(ValueError, match="init_scale must be smaller than "
                     "p_gamma"):
    star(init_scale=0.05, p_gamma=0.05)
