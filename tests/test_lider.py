"""LiDER (jaxcl/strategies/lider.py): the per-layer Lipschitz estimate
against NumPy's singular values, the loss terms by hand, no effect on an
empty memory, the budget, its gradient lowering the estimate, argument
checks, and a run of lider+derpp through the normal loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import models, train
from jaxcl.strategies import lider as lid
from jaxcl.strategies.lider import lider
from test_replay import B, batch_of, config, run_capture


def cnn_ctx(sc, lr=0.1):
  # Conv 8x8x4 -> pool -> conv 4x4x8 -> pool -> conv 2x2x8 -> pool ->
  # dense: two kept pairs (the grayscale input's and the dense's are not).
  info = train.stream_info(sc, B)
  model = models.build("cnn", sc.num_classes, channels=(4, 8, 8),
                       hidden=16)
  return train.make_context(model, train.make_optimizer("sgd", lr), info)


def _filled(ctx, s, exp, n=30):
  """``s``'s state after its reservoir took ``exp``'s first ``n`` rows."""
  state = train.init_state(ctx, s, 0)
  ss = state.strategy
  mem = ss.memory
  for i in range(n):
    mem = mem._replace(
        x=mem.x.at[i].set(exp.train_x[i]), y=mem.y.at[i].set(exp.train_y[i]),
        valid=mem.valid.at[i].set(True))
  return state, ss._replace(memory=mem._replace(seen=jnp.int32(n)),
                            model_state=state.model_state)


def numpy_lipschitz(fa, fb):
  """K per row by NumPy: the top singular value of the transmitting
  matrix, pooled and normalised as the reference code does."""
  ca = fa.shape[-1]
  # Adaptive average pooling of 5 channels to 3: bins [0,2), [1,4), [3,5).
  assert fb.shape[-1] == 5 and ca == 3
  fb = np.stack([fb[..., 0:2].mean(-1), fb[..., 1:4].mean(-1),
                 fb[..., 3:5].mean(-1)], -1)
  eps = np.finfo(np.float32).eps
  fa = fa / (np.linalg.norm(fa, axis=-1, keepdims=True) + eps)
  fb = fb / (np.linalg.norm(fb, axis=-1, keepdims=True) + eps)
  b, h, w = fb.shape[:3]
  fa = fa.reshape(b, h, 2, w, 2, ca).mean(axis=(2, 4))  # 4x4 -> 2x2
  t = np.einsum("bpi,bpj->bij", fa.reshape(b, h * w, ca),
                fb.reshape(b, h * w, ca)) / (h * w)
  return np.linalg.svd(t, compute_uv=False)[:, 0]


def test_layer_estimate_is_numpys_top_singular_value():
  rng = np.random.default_rng(0)
  fa = rng.normal(size=(4, 4, 4, 3)).astype(np.float32)
  fb = rng.normal(size=(4, 2, 2, 5)).astype(np.float32)
  v0 = jnp.asarray(rng.uniform(size=(4, 3)), jnp.float32)
  got = jax.jit(lid.layer_lipschitz, static_argnums=3)(fa, fb, v0, 200)
  want = numpy_lipschitz(fa.astype(np.float64), fb.astype(np.float64))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)
  assert np.all(want < 0.999) and np.ptp(want) > 0.01  # not a trivial case
  # PyTorch's adaptive pooling bins, uneven and even.
  np.testing.assert_allclose(lid.adaptive_pool_matrix(5, 3), [
      [.5, .5, 0, 0, 0], [0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, .5, .5]])
  np.testing.assert_allclose(lid.adaptive_pool_matrix(4, 2),
                             [[.5, .5, 0, 0], [0, 0, .5, .5]])
  # A vector layer: the matrix has rank one, K is 1 whatever the input,
  # which is why such pairs are left out.
  k = jax.jit(lid.layer_lipschitz, static_argnums=3)(fa[:, 0, 0],
                                                      fb[:, 0, 0], v0, 10)
  np.testing.assert_allclose(np.asarray(k), 1.0, rtol=1e-5)
  assert lid.kept_pairs([(4, 8, 8, 3), (4, 8, 8, 4), (4, 1, 1, 8),
                         (4, 4, 4, 8)]) == [0, 2]
  # A one-channel earlier map (grayscale input): T is 1 x 1 and K a step
  # function of the parameters, so that pair is left out too.
  assert lid.kept_pairs([(4, 8, 8, 1), (4, 8, 8, 4), (4, 4, 4, 8)]) == [1]
  # Shifting the later map moves K through its directions with three
  # channels before it, and (almost) not at all with one.
  shift = jnp.asarray(rng.normal(size=5), jnp.float32)
  @jax.jit  # one program per shape, not an eager dispatch per operation
  def dk(a, v):
    return jax.grad(lambda s: jnp.sum(
        lid.layer_lipschitz(a, fb + s * shift, v, 10)))(0.0)
  assert abs(float(dk(fa, v0))) > 1e-2
  assert abs(float(dk(np.abs(fa[..., :1]) + 0.1, v0[:, :1]))) < 1e-4


def test_loss_terms_by_hand_and_loss_split(stream):
  k = np.array([[0.2, 0.8], [0.5, 0.1], [9.0, 9.0]], np.float32)
  ok = np.array([1, 1, 0], np.float32)  # the third row is padding
  budget = np.array([0.3, -0.4], np.float32)  # relu: 0.3, 0
  mini, bud = lid.lider_terms(jnp.asarray(k), jnp.asarray(ok),
                              jnp.asarray(k), jnp.asarray(ok),
                              jnp.asarray(budget))
  np.testing.assert_allclose(mini, (0.2 + 0.8 + 0.5 + 0.1) / 4, rtol=1e-6)
  np.testing.assert_allclose(bud, (0.1 + 0.8 + 0.2 + 0.1) / 4, rtol=1e-6)
  # The strategy's loss: alpha * the first draw's mean + beta * the second
  # draw's budget term, on estimates of the rows it drew.
  ctx = cnn_ctx(stream)
  s = lider(alpha_lip_lambda=0.7, beta_lip_lambda=1.3, mem_size=40,
            power_steps=30)
  state, ss = _filled(ctx, s, stream.experiences[0])
  ss = ss._replace(budget=jnp.asarray(budget))
  # Jitted: compiling each program once is cheaper than dispatching the
  # CNN's and the power iteration's operations one by one.
  batch = jax.jit(lambda ss, b, k: s.prepare_batch(ctx, ss, b, k))(
      ss, batch_of(stream.experiences[0]), jax.random.PRNGKey(3))
  got = jax.jit(lambda ss, p, b: s.loss(ctx, ss, p, b, None))(
      ss, state.params, batch)
  ks = jax.jit(lambda p, ms, b: lid.lipschitz_estimates(
      ctx, p, ms, b["lider_x"], b["lider_task"], b["lider_v0"], 30, True))(
          state.params, ss.model_state, batch)
  assert ks.shape == (2 * B, 2)
  ks = np.asarray(ks)
  want = 0.7 * ks[:B].mean() + 1.3 * np.abs(
      ks[B:] - np.maximum(budget, 0)).mean()
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The two draws are memory rows, and different ones.
  x = np.asarray(batch["lider_x"]).reshape(2 * B, -1)
  mem = np.asarray(ss.memory.x[:30]).reshape(30, -1)
  assert all((mem == row).all(1).any() for row in x)
  assert not np.array_equal(x[:B], x[B:])


def test_draws_follow_the_steps_key(stream):
  """Both draws and the power iterations' start come from the key
  prepare_batch is given: another key, other rows and another start."""
  ctx = cnn_ctx(stream)
  s = lider(mem_size=40)
  _, ss = _filled(ctx, s, stream.experiences[0])
  prep = jax.jit(lambda ss, b, k: s.prepare_batch(ctx, ss, b, k))
  b = batch_of(stream.experiences[0])
  one, two = (prep(ss, b, jax.random.PRNGKey(k)) for k in (1, 2))
  for f in ("lider_x", "lider_v0"):
    assert not np.array_equal(np.asarray(one[f][:B]), np.asarray(two[f][:B]))
    assert not np.array_equal(np.asarray(one[f][B:]), np.asarray(two[f][B:]))


# Eagerly (op by op) the loss and its gradient take ~20 s to dispatch:
# that case is slow; the jitted one checks the same zeros in the fast suite.
@pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.slow),
                                 True])
def test_inactive_on_an_empty_memory(stream, jit):
  ctx = cnn_ctx(stream)
  s = lider(alpha_lip_lambda=1.0, beta_lip_lambda=1.0, mem_size=40)
  state = train.init_state(ctx, s, 0)
  ss = state.strategy._replace(budget=jnp.asarray([0.5, 0.5]))
  prepare = jax.jit(lambda ss, b, k: s.prepare_batch(ctx, ss, b, k))
  batch = prepare(ss, batch_of(stream.experiences[0]), jax.random.PRNGKey(0))
  lose = lambda p: s.loss(ctx, ss, p, batch, None)
  val, grads = (jax.jit(jax.value_and_grad(lose)) if jit else
                jax.value_and_grad(lose))(state.params)
  assert float(val) == 0.0
  for g in jax.tree.leaves(grads):  # zero, not NaN (zero padding rows)
    assert np.all(np.asarray(g) == 0.0)
  # One step later the reservoir holds the batch, and the term is on.
  _, ss1 = _filled(ctx, s, stream.experiences[0], n=1)
  ss1 = ss1._replace(budget=ss.budget)
  batch = prepare(ss1, batch_of(stream.experiences[0]), jax.random.PRNGKey(0))
  assert float(jax.jit(lambda p: s.loss(ctx, ss1, p, batch, None))(
      state.params)) > 0.0


def test_budget_is_the_initial_models_mean_on_the_first_experience(stream):
  ctx = cnn_ctx(stream)
  s = lider(mem_size=40, power_steps=60)
  e0, e1 = stream.experiences
  state = train.init_state(ctx, s, 0)
  state = s.before_experience(ctx, state, e0)
  x = jnp.asarray(e0.train_x)
  v0 = jax.random.uniform(jax.random.PRNGKey(5), (x.shape[0], 8))
  k = jax.jit(lambda p, ms, x, t, v0: lid.lipschitz_estimates(
      ctx, p, ms, x, t, v0, 60, False))(state.params, state.model_state, x,
                                        jnp.asarray(e0.train_task), v0)
  budget = np.asarray(state.strategy.budget)
  np.testing.assert_allclose(budget, np.asarray(k).mean(0), rtol=1e-3)
  assert np.all(budget > 0.05) and np.all(budget < 1.0)
  # Set once: a later experience leaves it alone.
  moved = state.replace(params=jax.tree.map(lambda p: p * 1.5, state.params))
  later = s.before_experience(ctx, moved, e1)
  np.testing.assert_array_equal(np.asarray(later.strategy.budget), budget)


def test_gradient_flows_through_the_last_power_iteration_only():
  """As the code (``grad_iter_step=-2``): the estimate's gradient is that
  of one power step from the earlier iterations' vector held constant. A
  start far from the top eigenvector makes the full unrolled gradient
  differ."""
  rng = np.random.default_rng(3)
  a = rng.normal(size=(1, 4, 4)).astype(np.float32)
  k = jnp.asarray(a @ a.transpose(0, 2, 1))
  v0 = jnp.asarray(rng.normal(size=(1, 4)).astype(np.float32))
  steps = 3
  v = v0
  for _ in range(steps - 1):  # the iterations without gradient
    m = jnp.einsum("bij,bj->bi", k, v)
    v = m / (jnp.linalg.norm(m, axis=-1, keepdims=True) + lid._EPS)
  held = jax.lax.stop_gradient(v)

  def one_step(k):
    m = jnp.einsum("bij,bj->bi", k, held)
    n = jnp.linalg.norm(m, axis=-1, keepdims=True) + lid._EPS
    u = m / n
    return jnp.sqrt(n / (jnp.linalg.norm(u, axis=-1, keepdims=True)
                         + lid._EPS))[:, 0].sum()

  got = jax.grad(lambda k: lid.top_eigenvalue(k, v0, steps).sum())(k)
  np.testing.assert_allclose(got, jax.grad(one_step)(k), rtol=1e-5,
                             atol=1e-6)
  full = jax.grad(lambda k: _unrolled(k, v0, steps))(k)
  assert float(jnp.max(jnp.abs(full - got))) > 1e-3  # the case can tell


def _unrolled(k, v, steps):
  """The estimate with the gradient through every iteration."""
  for _ in range(steps):
    m = jnp.einsum("bij,bj->bi", k, v)
    n = jnp.linalg.norm(m, axis=-1, keepdims=True) + lid._EPS
    v = m / n
  return jnp.sqrt(n / (jnp.linalg.norm(v, axis=-1, keepdims=True)
                       + lid._EPS))[:, 0].sum()


def test_gradient_lowers_the_estimate():
  # A toy layer: a 1x1 convolution W (3 -> 5 channels) then a 2x2
  # average pool on fixed random maps (offset, so K starts near 0.74);
  # descending K's gradient in W lowers K at every step, as the
  # minimisation term intends.
  rng = np.random.default_rng(1)
  fa = jnp.asarray(rng.normal(size=(6, 4, 4, 3)) + 1.0, jnp.float32)
  v0 = jnp.asarray(rng.uniform(size=(6, 3)), jnp.float32)
  w0 = jnp.asarray(rng.normal(size=(3, 5)) + 1.0, jnp.float32)

  def k_mean(w):
    fb = (fa @ w).reshape(6, 2, 2, 2, 2, 5).mean(axis=(2, 4))
    return jnp.mean(lid.layer_lipschitz(fa, fb, v0, 10))

  step = jax.jit(lambda w: w - 20.0 * jax.grad(k_mean)(w))
  w, trace = w0, []
  for _ in range(8):
    trace.append(float(k_mean(w)))
    w = step(w)
  assert trace[-1] < trace[0] - 0.015, trace
  assert np.all(np.diff(trace) < 1e-6), trace


def test_zero_channel_vectors_get_no_gradient():
  """A blank position under a zero-bias layer is an exactly-zero channel
  vector; normalising it must not hand the bias the division's 1 / eps
  gradient (session 31: ~4e5 on the cnn's first bias at init on digits,
  which collapsed training), and the zero entries get no gradient."""
  rng = np.random.default_rng(4)
  x = rng.normal(size=(3, 4, 4, 2)).astype(np.float32) + 0.5
  x[:, :2] = 0.0  # the top half blank, as a digit's border
  x = jnp.asarray(x)
  w = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
  # The next layer's map is nonzero everywhere (its neighbourhoods reach
  # the digit), so the blank positions' vectors do enter T.
  fb = jnp.asarray(rng.normal(size=(3, 2, 2, 5)) + 0.5, jnp.float32)
  v0 = jnp.asarray(rng.uniform(size=(3, 3)), jnp.float32)

  def k_mean(b, x=x):
    fa = x @ w + b  # a 1x1 convolution with bias b
    return jnp.mean(lid.layer_lipschitz(fa, fb, v0, 10))

  g_b = jax.jit(jax.grad(k_mean))(jnp.zeros((3,)))
  assert np.all(np.isfinite(np.asarray(g_b)))
  assert 0 < float(jnp.max(jnp.abs(g_b))) < 10.0, g_b  # 1/eps: ~1e6
  g_x = jax.jit(jax.grad(lambda x: k_mean(jnp.zeros((3,)), x)))(x)
  np.testing.assert_array_equal(np.asarray(g_x[:, :2]), 0.0)
  assert float(jnp.max(jnp.abs(g_x[:, 2:]))) > 0  # the rest still moves


def test_lider_with_derpp_runs_in_the_loop(monkeypatch, stream):
  cfg = config("lider+derpp", lider=dict(mem_size=40, power_steps=5),
               derpp=dict(mem_size=40))
  cfg.model.name = "cnn"
  cfg.model.channels = (4, 8, 8)
  cfg.model.hidden = 16
  result, learner = run_capture(monkeypatch, cfg, stream)
  assert learner.chunk_fn._cache_size() == 1  # no recompile
  assert np.all(np.isfinite(result.accuracy))
  assert result.accuracy[1, 0] > 0.3, result.accuracy
  ss_lider, ss_derpp = result.state.strategy
  total = sum(e.num_train for e in stream.experiences)
  assert int(ss_lider.memory.seen) == total == int(ss_derpp.memory.seen)
  budget = np.asarray(ss_lider.budget)
  assert budget.shape == (2,) and np.all((budget > 0) & (budget < 1))


def test_bad_arguments(stream):
  for kw, match in ((dict(alpha_lip_lambda=-0.1), "alpha_lip_lambda"),
                    (dict(beta_lip_lambda=-1.0), "beta_lip_lambda"),
                    (dict(beta_lip_lambda=float("nan")), "beta_lip_lambda"),
                    (dict(alpha_lip_lambda=0, beta_lip_lambda=0), "both"),
                    (dict(power_steps=0), "power_steps"),
                    (dict(mem_size=0), "mem_size"),
                    (dict(mem_size=5, batch_size=8), "batch_size")):
    with pytest.raises(ValueError, match=match):
      lider(**kw)
  # An MLP has no spatial map: every estimate would be 1.
  info = train.stream_info(stream, B)
  mlp = models.build("mlp", stream.num_classes, widths=(8,))
  ctx = train.make_context(mlp, train.make_optimizer("sgd", 0.1), info)
  with pytest.raises(ValueError, match="convolutional backbone with"):
    train.init_state(ctx, lider(), 0)
  # A model without a `backbone` sub-module (here HAT's MLP) gets the same
  # refusal, not a KeyError from the captured collection.
  hat = models.build("hat_mlp", stream.num_classes, widths=(8,), num_tasks=5)
  ctx = train.make_context(hat, train.make_optimizer("sgd", 0.1), info)
  with pytest.raises(ValueError, match="convolutional backbone with"):
    train.init_state(ctx, lider(), 0)
  # One convolution on grayscale input leaves no pair (the input's has
  # one channel, the dense layer's one position).
  one = models.build("cnn", stream.num_classes, channels=(4,), hidden=8)
  ctx = train.make_context(one, train.make_optimizer("sgd", 0.1), info)
  with pytest.raises(ValueError, match="more than one channel"):
    train.init_state(ctx, lider(), 0)
  # The default replay batch must fit the memory.
  with pytest.raises(ValueError, match="batch_size"):
    train.init_state(cnn_ctx(stream), lider(mem_size=5), 0)


def test_one_lambda_may_be_zero():
  """Only both lambdas at 0 are refused (LiDER would change nothing);
  either term alone is a valid setting."""
  lider(alpha_lip_lambda=0.0, beta_lip_lambda=0.5)
  lider(alpha_lip_lambda=0.3, beta_lip_lambda=0.0)


def test_batch_norm_budget_in_eval_mode_loss_in_train_mode(stream):
  """With batch norm the modes differ: the budget uses the initial model's
  running statistics (eval mode), the loss the batch's (train mode). (A
  width-4 resnet18, the one batch-norm model LiDER takes: ~10 s, kept in
  the default run because nothing else checks the modes.)"""
  import types
  info = train.stream_info(stream, B)
  model = models.build("resnet18", stream.num_classes, width=4)
  ctx = train.make_context(model, train.make_optimizer("sgd", 0.1), info)
  s = lider(alpha_lip_lambda=0.7, beta_lip_lambda=1.3, mem_size=40,
            power_steps=40)
  e0 = stream.experiences[0]
  # The first experience's first 40 rows (what before_experience reads).
  cut = types.SimpleNamespace(index=0, train_x=e0.train_x[:40],
                              train_y=e0.train_y[:40],
                              train_task=e0.train_task[:40])
  state, ss = _filled(ctx, s, e0)
  budget = np.asarray(s.before_experience(ctx, state, cut).strategy.budget)
  ss = ss._replace(budget=jnp.asarray(budget))
  batch = jax.jit(lambda ss, b, k: s.prepare_batch(ctx, ss, b, k))(
      ss, batch_of(e0), jax.random.PRNGKey(3))
  est = jax.jit(lambda p, ms, x, t, v0, tr: lid.lipschitz_estimates(
      ctx, p, ms, x, t, v0, 40, tr), static_argnums=5)
  x, t = jnp.asarray(cut.train_x), jnp.asarray(cut.train_task)
  v0 = jax.random.uniform(jax.random.PRNGKey(5), (40, 16))
  k_eval = np.asarray(est(state.params, state.model_state, x, t, v0, False))
  k_train = np.asarray(est(state.params, state.model_state, x, t, v0, True))
  np.testing.assert_allclose(budget, k_eval.mean(0), rtol=1e-3)
  assert np.abs(k_train.mean(0) - budget).max() > 0.05  # the modes differ
  ks = np.asarray(est(state.params, ss.model_state, batch["lider_x"],
                      batch["lider_task"], batch["lider_v0"], True))
  want = 0.7 * ks[:B].mean() + 1.3 * np.abs(
      ks[B:] - np.maximum(budget, 0)).mean()
  got = jax.jit(lambda ss, p, b: s.loss(ctx, ss, p, b, None))(
      ss, state.params, batch)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
