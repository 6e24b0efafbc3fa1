"""La-MAML (Gupta et al. 2020): one step against Algorithm 1 written out
by hand, the clipped asynchronous update, first against second order,
the reservoir, the optimiser check, bad arguments, and a run that
compiles once, chained and swept."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import models, sweep, train
from jaxcl.state import StepInfo, cross_entropy
from jaxcl.strategies.lamaml import lamaml, pieces
from test_replay import B, batch_of, config


def tiny_ctx(stream, lr=0.1, name="sgd", **opt):
  """An MLP 64-8-10: second-order steps through 10 inner steps compile
  and run fast."""
  info = train.stream_info(stream, B)
  model = models.build("mlp", stream.num_classes, widths=(8,))
  return train.make_context(model, train.make_optimizer(name, lr, **opt),
                            info)


@pytest.fixture(scope="module")
def ctx(stream):
  return tiny_ctx(stream)


# The configurations the step tests share (each compiles one step).
CONFIGS = {
    # Second order, the paper's meta-loss, 3 uneven pieces (4, 3, 3 rows),
    # two glances, active clipping.
    "second_final": dict(mem_size=30, batch_size=6, alpha_init=0.1,
                         alpha_lr=0.3, first_order=False, meta_loss="final",
                         n_inner=3, glances=2, grad_clip_norm=0.5),
    # First order, the code's averaged meta-loss, one row per step.
    "first_mean": dict(mem_size=30, batch_size=6, alpha_init=0.1,
                       alpha_lr=0.3, first_order=True, meta_loss="mean",
                       n_inner=10, glances=1, grad_clip_norm=2.0),
}
# One inner step, second or first order (the cheapest to compile).
for _fo in (False, True):
  CONFIGS[f"one_inner_{_fo}"] = dict(mem_size=30, batch_size=5, glances=1,
                                     n_inner=1, alpha_init=0.3,
                                     first_order=_fo)
_STEPS = {}


def stepper(ctx, name):
  """``(strategy, step)``: ``step(state, batch) -> (state, loss,
  prepared batch)``, jitted once per configuration."""
  if (name, id(ctx)) not in _STEPS:
    s = lamaml(**CONFIGS[name])

    @jax.jit
    def step(state, batch):
      # The key train.train_step derives for prepare_batch, as der_step.
      key = jax.random.fold_in(state.rng, state.step)
      prepared = s.prepare_batch(ctx, state.strategy, batch,
                                 jax.random.split(key, 3)[0])
      new, loss = train.train_step(ctx, s, state, batch)
      return new, loss, prepared

    _STEPS[name, id(ctx)] = (s, step)
  return _STEPS[name, id(ctx)]


def trained(ctx, s, step, exp, steps):
  """A fresh state after ``steps`` steps (fills memory)."""
  state = s.before_experience(ctx, train.init_state(ctx, s, 0), exp)
  for i in range(steps):
    state = step(state, batch_of(exp, start=B * i))[0]
  return state


def leaves(t):
  return [np.asarray(a, np.float64) for a in jax.tree.leaves(t)]


# ---------------------------------------------------------------------------
# Algorithm 1 by hand.


def clip_norm(grads, c):
  """torch.nn.utils.clip_grad_norm_ on a list of arrays."""
  norm = np.sqrt(sum(float((g ** 2).sum()) for g in grads))
  coef = min(1.0, c / (norm + 1e-6))
  return [g * coef for g in grads]


def reference_step(ctx, params, alpha, prepared, *, n_inner, glances,
                   alpha_lr, grad_clip_norm, first_order, meta_loss,
                   fixed=(), **_):
  """The authors' procedure for one incoming batch, written out: per
  glance, inner SGD steps at rates alpha on the permuted incoming rows
  cut by np.array_split (padding rows weigh 0), the meta-loss on memory
  rows plus incoming rows, alpha's step, then theta's step at max(new
  alpha, 0). Second order: jax.grad of the unrolled Python loop; first
  order: the meta-gradients written out with the inner gradients as
  constants. ``fixed``: indices of leaves held constant (every gradient
  of theta zero there, inner and outer)."""
  c, eta = grad_clip_norm, alpha_lr
  tdef = jax.tree.structure(params)
  tree = lambda ls: jax.tree.unflatten(tdef, [jnp.asarray(a, jnp.float32)
                                              for a in ls])
  keep = lambda ls: [d * 0 if i in fixed else d for i, d in enumerate(ls)]
  w_in = jnp.asarray(np.asarray(prepared["mask"][:B]) > 0, jnp.float32)
  x_in, y_in = prepared["x"][:B], prepared["y"][:B]
  t_in = prepared["task"][:B]

  def ce(p, x, y, t, w):
    return cross_entropy(ctx.logits(p, {}, x, t, train=True), y, w)

  grad = jax.jit(jax.grad(ce))

  @jax.jit
  def second_order(th, al, parts, meta):
    def unrolled(th, al):
      p, losses = th, []
      for rows in parts:      # unrolled: a Python loop over the pieces
        g = jax.grad(ce)(p, x_in[rows], y_in[rows], t_in[rows], w_in[rows])
        g = jax.tree.unflatten(tdef, keep(jax.tree.leaves(g)))
        p = jax.tree.map(lambda q, r, d: q - r * jnp.clip(d, -c, c), p, al,
                         g)
        losses.append(ce(p, *meta))
      return losses[-1] if meta_loss == "final" else sum(losses) / len(
          losses)
    return jax.grad(unrolled, argnums=(0, 1))(th, al)

  theta, a = leaves(params), leaves(alpha)
  for g_i in range(glances):
    perm = np.asarray(prepared["lamaml_perm"][g_i])
    # A piece of padding rows only would not exist in the code (its
    # batch is just shorter): no step, no meta-loss term.
    parts = [jnp.asarray(r) for r in np.array_split(perm, n_inner)
             if np.asarray(w_in)[r].any()]
    meta = (jnp.concatenate([prepared["lamaml_x"][g_i], x_in]),
            jnp.concatenate([prepared["lamaml_y"][g_i], y_in]),
            jnp.concatenate([prepared["lamaml_task"][g_i], t_in]),
            jnp.concatenate([prepared["lamaml_ok"][g_i], w_in]))
    if not first_order:
      gt, ga = second_order(tree(theta), tree(a), parts, meta)
      gt, ga = leaves(gt), leaves(ga)
    else:
      # theta_i = theta - alpha * sum_{j <= i} clip(g_j), the g_j constant:
      # dL/dtheta = mean_i dl(theta_i), dL/dalpha = -mean_i dl(theta_i) *
      # sum_{j <= i} clip(g_j) (over the last i only for 'final').
      p, total, metas = theta, [0.0] * len(a), []
      for rows in parts:
        g = leaves(grad(tree(p), x_in[rows], y_in[rows], t_in[rows],
                        w_in[rows]))
        g = [np.clip(d, -c, c) for d in keep(g)]
        total = [s + d for s, d in zip(total, g)]
        p = [q - r * d for q, r, d in zip(p, a, g)]
        metas.append((leaves(grad(tree(p), *meta)), total))
      if meta_loss == "final":
        metas = metas[-1:]
      n = len(metas)
      gt = [sum(m[0][i] for m in metas) / n for i in range(len(a))]
      ga = [-sum(m[0][i] * m[1][i] for m in metas) / n
            for i in range(len(a))]
    gt, ga = clip_norm(keep(gt), c), clip_norm(ga, c)
    a = [r - eta * d for r, d in zip(a, ga)]
    theta = [q - np.maximum(r, 0.0) * d for q, r, d in zip(theta, a, gt)]
  return theta, a


@pytest.mark.parametrize("partial", [False, True])
@pytest.mark.parametrize("name", ["second_final", "first_mean"])
def test_step_is_algorithm_1(stream, ctx, name, partial):
  kw = CONFIGS[name]
  s, step = stepper(ctx, name)
  e0 = stream.experiences[0]
  state = trained(ctx, s, step, e0, 2)     # 20 rows in memory, alpha moved
  assert int(state.strategy.memory.seen) == 2 * B
  if partial:
    # 4 entries for 6 draws: two drawn slots per glance are not entries
    # (they still hold rows, which must weigh 0 in the meta-loss).
    mem = state.strategy.memory
    mem = mem._replace(valid=mem.valid & (jnp.cumsum(mem.valid) <= 4))
    state = state.replace(strategy=state.strategy._replace(memory=mem))
  assert not np.allclose(leaves(state.strategy.alpha)[0], 0.1)
  # Some rates below 0: the inner steps use them as they are, theta's
  # step clips them at 0.
  rng = np.random.default_rng(1)
  alpha = jax.tree.map(
      lambda a: a + jnp.asarray(rng.uniform(-0.15, 0.05, a.shape),
                                jnp.float32), state.strategy.alpha)
  assert min(float(a.min()) for a in jax.tree.leaves(alpha)) < -0.02
  state = state.replace(strategy=state.strategy._replace(alpha=alpha))
  b = batch_of(e0, start=2 * B)
  b["mask"] = b["mask"].at[4].set(0.0)     # a padding row: no part
  new, loss, prepared = step(state, b)
  ok = np.asarray(prepared["lamaml_ok"])
  assert ok.sum(1).tolist() == [4 if partial else 6] * kw["glances"]
  assert prepared["lamaml_x"].shape == ((kw["glances"], 6)
                                        + e0.train_x.shape[1:])
  want_theta, want_alpha = reference_step(
      ctx, state.params, state.strategy.alpha, prepared, **kw)
  for got, want in zip(leaves(new.params), want_theta):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
  for got, want in zip(leaves(new.strategy.alpha), want_alpha):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
  # The loss reported is the batch's cross-entropy before the step; the
  # incoming rows then enter the reservoir (the padding row does not).
  ce = cross_entropy(ctx.logits(state.params, {}, b["x"], b["task"],
                                train=True), b["y"], b["mask"])
  np.testing.assert_allclose(float(loss), float(ce), rtol=1e-5)
  assert int(new.strategy.memory.seen) == 3 * B - 1


@pytest.mark.parametrize("name", ["second_final", "first_mean"])
def test_fixed_weights_of_a_chain_are_constants_of_the_look_ahead(
    stream, ctx, name):
  """Beside a member that keeps weights fixed (ctx.freeze, here the
  head: PackNet's, progressive networks', a frozen latent split), every
  inner step and theta's step leave them alone, so the meta-loss is
  scored where the update can go: Algorithm 1 with those weights held
  constant. Their rates do not learn; the rest differ from the unmasked
  procedure's."""
  kw = CONFIGS[name]
  s, step = stepper(ctx, name)
  e0 = stream.experiences[0]
  state = trained(ctx, s, step, e0, 2)
  prepared = step(state, batch_of(e0, start=2 * B))[2]
  paths = [jax.tree_util.keystr(k) for k, _ in
           jax.tree_util.tree_flatten_with_path(state.params)[0]]
  head = {i for i, k in enumerate(paths) if "head" in k}
  assert head and len(head) < len(paths)
  fctx = dataclasses.replace(ctx, freeze=lambda g: {
      **g, "head": jax.tree.map(jnp.zeros_like, g["head"])})
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  g, ss = jax.jit(lambda st, b: s.update_grads(fctx, st.strategy, zeros,
                                               st.params, b, None))(
                                                   state, prepared)
  theta = [p - float(state.strategy.unit) * d
           for p, d in zip(leaves(state.params), leaves(g))]
  want_theta, want_alpha = reference_step(
      ctx, state.params, state.strategy.alpha, prepared, fixed=head, **kw)
  free_theta, free_alpha = reference_step(
      ctx, state.params, state.strategy.alpha, prepared, **kw)
  for i, (got, want, p0) in enumerate(zip(theta, want_theta,
                                          leaves(state.params))):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
    if i in head:
      np.testing.assert_array_equal(got, p0)
  for i, (got, want, a0) in enumerate(zip(
      leaves(ss.alpha), want_alpha, leaves(state.strategy.alpha))):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-6)
    if i in head:
      np.testing.assert_array_equal(got, a0)
  # Held constant in the look-ahead, the head changes the rest's step.
  assert max(float(np.abs(w - f).max()) for i, (w, f) in enumerate(
      zip(want_alpha, free_alpha)) if i not in head) > 1e-5


def test_row_weights_count_as_whole_rows(stream, ctx):
  """A member chained before may turn the mask into loss weights: here a
  row counts or not, so a weight of 0.4 is a whole row (in the inner
  steps and the meta-batch) and only 0 leaves it out."""
  s, step = stepper(ctx, "first_mean")
  e0 = stream.experiences[0]
  state = trained(ctx, s, step, e0, 1)
  prepared = step(state, batch_of(e0, start=B))[2]
  zeros = jax.tree.map(jnp.zeros_like, state.params)
  ug = jax.jit(lambda b: s.update_grads(ctx, state.strategy, zeros,
                                        state.params, b, None))
  out = {w: ug(dict(prepared, mask=prepared["mask"].at[3].set(w)))
         for w in (1.0, 0.4, 0.0)}
  for a, b in zip(leaves(out[0.4]), leaves(out[1.0])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert max(float(np.abs(a - b).max()) for a, b in zip(
      leaves(out[0.0][0]), leaves(out[1.0][0]))) > 1e-5


def test_pieces_are_balanced_and_cover_the_batch():
  rows, valid = pieces(10, 4)
  assert valid.sum(1).tolist() == [3, 3, 2, 2]
  assert sorted(rows[valid].tolist()) == list(range(10))
  rows, valid = pieces(10, 10)
  assert rows.shape == (10, 1) and valid.all()


# ---------------------------------------------------------------------------
# The asynchronous, clipped update; first against second order.


def test_negative_rates_stop_their_weights_and_others_move(stream, ctx):
  """theta moves by -max(alpha_new, 0) * g: a weight whose rate stays
  below 0 stays exactly where it is; the rates themselves move."""
  s, step = stepper(ctx, "second_final")
  e0 = stream.experiences[0]
  state = trained(ctx, s, step, e0, 1)
  # Half the entries get a rate of -0.5, the rest +0.2. alpha's step is
  # at most alpha_lr * grad_clip_norm = 0.15 per glance, so the negative
  # ones stay negative through the two glances.
  rng = np.random.default_rng(0)
  alpha = jax.tree.map(
      lambda a: jnp.asarray(np.where(rng.random(a.shape) < 0.5, -0.5, 0.2),
                            jnp.float32), state.strategy.alpha)
  state = state.replace(strategy=state.strategy._replace(alpha=alpha))
  new = step(state, batch_of(e0, start=B))[0]
  moved = 0.0
  for a0, a1, p0, p1 in zip(leaves(alpha), leaves(new.strategy.alpha),
                            leaves(state.params), leaves(new.params)):
    assert np.abs(a1 - a0).max() > 1e-4            # the rates learn
    frozen = a0 < 0
    assert (a1[frozen] < 0).all()
    np.testing.assert_array_equal(p1[frozen], p0[frozen])
    moved = max(moved, float(np.abs(p1[~frozen] - p0[~frozen]).max()))
  assert moved > 1e-4


def test_first_order_drops_exactly_the_second_derivatives(stream, ctx):
  """With one inner step, alpha's meta-gradient -g_0 * dL(theta_1) has no
  second-order term, so both orders give the same rates, while theta's
  meta-gradient (I - alpha H) dL(theta_1) differs."""
  e0 = stream.experiences[0]
  out, state = {}, None
  for first_order in (True, False):
    s, step = stepper(ctx, f"one_inner_{first_order}")
    if state is None:   # one state for both: memory filled, alpha moved
      state = trained(ctx, s, step, e0, 1)
    out[first_order] = step(state, batch_of(e0, start=B))[0]
  gap = lambda a, b: max(float(np.abs(x - y).max())
                         for x, y in zip(leaves(a), leaves(b)))
  assert gap(out[False].strategy.alpha, out[True].strategy.alpha) < 1e-7
  assert gap(out[False].params, out[True].params) > 1e-5


def test_chained_gradient_is_kept_and_rates_come_out_of_update_grads(
    stream, ctx):
  """update_grads adds the displacement divided by the optimiser's rate
  to the other members' gradient and returns the new rates in the state
  (grads_state), the ones the step keeps; after_step leaves them alone."""
  s, step = stepper(ctx, "one_inner_True")
  assert s.grads_state
  e0 = stream.experiences[0]
  state = trained(ctx, s, step, e0, 1)
  new, loss, b = step(state, batch_of(e0, start=B))
  ug = jax.jit(jax.vmap(lambda g: s.update_grads(ctx, state.strategy, g,
                                                 state.params, b, None)))
  g, ss = ug(jax.tree.map(lambda p: jnp.stack([jnp.zeros_like(p),
                                               jnp.ones_like(p)]),
                          state.params))
  for a in leaves(g):
    np.testing.assert_allclose(a[1] - a[0], 1.0, rtol=1e-4)
    assert np.abs(a[0]).max() > 0
  moved = False
  for got, old, want in zip(leaves(ss.alpha), leaves(state.strategy.alpha),
                            leaves(new.strategy.alpha)):
    np.testing.assert_allclose(got[0], want, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(got[0], got[1])
    moved |= not np.allclose(got[0], old)
  assert moved
  info = StepInfo(state.params, None, None, None, b, loss)
  after = jax.jit(lambda ss, i: s.after_step(ctx, ss, i))(state.strategy,
                                                          info)
  for got, old in zip(leaves(after.alpha), leaves(state.strategy.alpha)):
    np.testing.assert_array_equal(got, old)
  assert int(after.memory.seen) == int(state.strategy.memory.seen) + B


# ---------------------------------------------------------------------------
# Memory, optimiser, arguments.


def test_memory_is_a_reservoir_replayed_into_the_meta_batch(stream, ctx):
  s, step = stepper(ctx, "second_final")
  e0 = stream.experiences[0]
  state = trained(ctx, s, step, e0, 0)
  prepared = s.prepare_batch(ctx, state.strategy, batch_of(e0),
                             jax.random.PRNGKey(0))
  assert not np.asarray(prepared["lamaml_ok"]).any()   # empty: masked
  state = trained(ctx, s, step, e0, 6)
  mem = state.strategy.memory
  # 60 rows offered to 30 slots: full, every entry a row of the stream.
  assert int(mem.seen) == 6 * B and np.asarray(mem.valid).all()
  seen = {r.tobytes() for r in np.asarray(e0.train_x[:6 * B], np.float32)}
  stored = [r.tobytes() for r in np.asarray(mem.x)]
  assert set(stored) <= seen and len(set(stored)) == 30
  # Each glance draws its own memory rows (without replacement), and a
  # permutation of the incoming rows.
  prepared = s.prepare_batch(ctx, state.strategy, batch_of(e0, start=60),
                             jax.random.PRNGKey(1))
  assert np.asarray(prepared["lamaml_ok"]).all()
  for g in range(2):
    drawn = [r.tobytes() for r in np.asarray(prepared["lamaml_x"][g])]
    assert len(set(drawn)) == 6 and set(drawn) <= set(stored)
    assert sorted(np.asarray(prepared["lamaml_perm"][g]).tolist()) == \
        list(range(B))
  assert not np.array_equal(prepared["lamaml_x"][0], prepared["lamaml_x"][1])
  assert not np.array_equal(prepared["lamaml_perm"][0],
                            prepared["lamaml_perm"][1])


def test_reservoir_keeps_each_example_with_equal_probability(stream, ctx):
  """Algorithm R through after_step: after N offers each row is kept with
  probability K/N; over 40 seeds the first and the last 50 of 100 offers
  are kept about equally often (a memory that kept the newest rows, or
  the first ones, would fail)."""
  s, _ = stepper(ctx, "one_inner_True")    # memory of 30
  e0 = stream.experiences[0]
  state = s.before_experience(ctx, train.init_state(ctx, s, 0), e0)
  stacked = jax.tree.map(lambda *a: jnp.stack(a),
                         *[batch_of(e0, start=B * i) for i in range(10)])

  def offer_all(sstate, key):
    def offer(ss, b):
      b = s.prepare_batch(ctx, ss, b, key)
      info = StepInfo(state.params, None, None, None, b, jnp.zeros(()))
      return s.after_step(ctx, ss, info), None
    return jax.lax.scan(offer, sstate._replace(key=key), stacked)[0]

  keys = jax.random.split(jax.random.PRNGKey(0), 40)
  mem = jax.jit(jax.vmap(offer_all, in_axes=(None, 0)))(state.strategy,
                                                        keys).memory
  np.testing.assert_array_equal(np.asarray(mem.seen), 100)
  rows = np.asarray(e0.train_x[:100], np.float32).reshape(100, -1)
  index = {r.tobytes(): i for i, r in enumerate(rows)}
  kept = np.bincount([index[r.tobytes()] for r in
                      np.asarray(mem.x).reshape(40 * 30, -1)], minlength=100)
  assert kept.sum() == 40 * 30
  # Expected 40 * 30 / 100 = 12 per row: 600 in each half (the
  # difference's standard deviation is about 27).
  assert abs(kept[:50].sum() - kept[50:].sum()) < 100, kept


def test_refuses_an_optimiser_other_than_plain_sgd(stream):
  for name, lr, opt, ok in (("sgd", 0.1, {}, True), ("sgd", 0.02, {}, True),
                            ("momentum", 0.1, {}, False),
                            ("adam", 0.1, {}, False),
                            ("sgd", 0.1, dict(weight_decay=1e-3), False),
                            ("sgd", 0.1, dict(clip_norm=1.0), False)):
    ctx = tiny_ctx(stream, lr=lr, name=name, **opt)
    params = train.init_variables(ctx, jax.random.PRNGKey(0))[0]
    if ok:
      ss = lamaml().init(ctx, jax.random.PRNGKey(0), params)
      assert float(ss.unit) == pytest.approx(lr)
      continue
    with pytest.raises(ValueError, match=r"lamaml: the optimiser is not "
                       r"plain SGD: .*gradient clipping would change it\). Set "
                       r"optimizer.name='sgd', weight_decay=0, "
                       r"schedule='constant' and clip_norm=0"):
      lamaml().init(ctx, jax.random.PRNGKey(0), params)


def test_rate_follows_the_optimiser_state(stream, ctx):
  """A sweep writes each run's learning rate into the optimiser state
  after init; the displacement's divisor follows it at the experience's
  start."""
  s = lamaml()
  state = train.init_state(ctx, s, 0)
  assert float(state.strategy.unit) == pytest.approx(0.1)
  hp = dict(state.opt_state.hyperparams, learning_rate=jnp.asarray(0.03))
  state = state.replace(opt_state=state.opt_state._replace(hyperparams=hp))
  state = s.before_experience(ctx, state, stream.experiences[0])
  assert float(state.strategy.unit) == pytest.approx(0.03)


def test_n_inner_larger_than_the_stream_batch_is_refused(ctx):
  params = train.init_variables(ctx, jax.random.PRNGKey(0))[0]
  with pytest.raises(ValueError, match=r"lamaml: n_inner=11 is larger than "
                     r"the stream's batch size 10"):
    lamaml(n_inner=11).init(ctx, jax.random.PRNGKey(0), params)


@pytest.mark.parametrize("kwargs, needle", [
    (dict(mem_size=0), "lamaml: mem_size must be a positive int, got 0"),
    (dict(mem_size=5, batch_size=8), "lamaml: batch_size=8 is larger than "
     "the memory capacity mem_size=5"),
    (dict(batch_size=0), "lamaml: batch_size must be an int >= 1, got 0"),
    (dict(n_inner=0), "lamaml: n_inner must be an int >= 1, got 0"),
    (dict(n_inner=2.5), "lamaml: n_inner must be an int >= 1, got 2.5"),
    (dict(glances=0), "lamaml: glances must be an int >= 1, got 0"),
    (dict(alpha_init=0.0), "lamaml: alpha_init must be a finite number > 0"),
    (dict(alpha_init=-0.1), "lamaml: alpha_init must be a finite number > 0"),
    (dict(alpha_lr=-0.3), "lamaml: alpha_lr must be a finite number >= 0"),
    (dict(alpha_lr=float("nan")), "lamaml: alpha_lr must be a finite"),
    (dict(grad_clip_norm=0.0), r"lamaml: grad_clip_norm must be > 0 \(inf"),
    (dict(first_order="yes"), "lamaml: first_order must be True or False"),
    (dict(meta_loss="last"), r"lamaml: meta_loss must be one of \['final', "
     r"'mean'\], got 'last'"),
])
def test_bad_arguments(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    lamaml(**kwargs)


# ---------------------------------------------------------------------------
# A whole run: compiled once, chained, swept.


def test_sweep_of_a_chain_compiles_once(stream):
  """lamaml+ewc over two seeds and alpha_lr in {0, 0.3}, in one program:
  alpha_lr=0 keeps every rate at alpha_init, the reservoir sees the
  stream, and the runs learn."""
  c = config("lamaml+ewc", ewc=dict(lam=1.0))
  c.model.widths = (16,)
  c.strategy.lamaml = dict(mem_size=40, batch_size=5, glances=1, n_inner=2,
                           alpha_init=0.1, first_order=True)
  r = sweep.sweep(c, seeds=[0, 1], values={"strategy.lamaml.alpha_lr":
                                           [0.0, 0.3]}, scenario=stream)
  assert r.result.learner.chunk_fn._cache_size() == 1
  acc = r.accuracy[:, :, :2]               # the two experiences trained
  assert np.isfinite(acc).all() and (acc[:, 0, 0] > 0.7).all(), acc
  assert not np.allclose(acc[0], acc[1])   # seeds differ
  ss = r.result.state.strategy[0]
  total = sum(e.num_train for e in stream.experiences)
  np.testing.assert_array_equal(np.asarray(ss.memory.seen), total)
  alpha = leaves(ss.alpha)
  for i, m in enumerate(r.members):
    still = [np.allclose(a[i], 0.1) for a in alpha]
    assert all(still) == (m["strategy.lamaml.alpha_lr"] == 0.0), m
