"""DualNet (Pham et al. 2021): the model's gates by hand, Barlow Twins'
loss against NumPy, one training step against a plain re-computation of
the slow and fast updates, the logits the memory saves, a run on Split
Digits against Naive, and bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import np_log_softmax, np_softmax, slow_beyond
from jaxcl import (experiment, models, strategies, strategy as strategy_lib,
                   train)
from jaxcl.strategies.dualnet import Projector, barlow_twins, dualnet
from test_replay import B, after_first, batch_of, config, make_ctx


def _ctx(sc, lr=0.05, opt="sgd"):
  return make_ctx(sc, widths=(8,), lr=lr, model="dualnet", opt=opt)


def test_mlp_model_gates_the_slow_features_by_hand():
  model = models.build("dualnet", 3, widths=(5, 4))
  x = jax.random.normal(jax.random.PRNGKey(1), (6, 7))
  v = model.init(jax.random.PRNGKey(0), x)
  p = jax.tree.map(np.asarray, v["params"])
  assert set(p) == {"slow", "fast", "head"}
  dense = lambda d, h: h @ d["kernel"] + d["bias"]
  relu = lambda a: np.maximum(a, 0)
  xs = np.asarray(x)
  h1 = relu(dense(p["slow"]["Dense_0"], xs))
  h2 = relu(dense(p["slow"]["Dense_1"], h1))
  # Evaluation mode: the fast gates' batch norm at its initial running
  # statistics (mean 0, variance 1), x / sqrt(1 + eps).
  bn = lambda a: a / np.sqrt(1 + 1e-5)
  m1 = relu(bn(dense(p["fast"]["Dense_0"], xs))) * h1
  m2 = relu(bn(dense(p["fast"]["Dense_1"], m1))) * h2
  np.testing.assert_allclose(model.apply(v, x, slow=True), h2, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_allclose(model.apply(v, x, features=True), m2,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(model.apply(v, x), dense(p["head"], m2),
                             rtol=1e-5, atol=1e-5)


# 28x28 meets an odd stage (7 -> 4) too; the RGB odd size runs with -m slow.
@pytest.mark.parametrize("size,channels", slow_beyond(
    [(28, 1), (21, 3)], [28], key=lambda c: c[0]))
def test_resnet_model_stage_sizes_match_the_fast_learner(size, channels):
  # The fast learner's ceil-mode pools meet each slow stage's size (odd
  # sizes included); the slow call runs no fast layer.
  model = models.build("dualnet", 4, backbone="resnet18", width=2)
  x = jnp.ones((3, size, size, channels))
  v = model.init(jax.random.PRNGKey(0), x)
  assert set(v["params"]) == {"slow", "fast", "head"}
  out, ms = model.apply(v, x, train=True, mutable=["batch_stats"])
  assert out.shape == (3, 4) and bool(jnp.all(jnp.isfinite(out)))
  assert model.apply(v, x, slow=True).shape == (3, 16)
  assert model.apply(v, x, features=True).shape == (3, 16)
  # The fast convolutions' biases are present and its four gates exist.
  assert sorted(v["params"]["fast"]) == (
      [f"BatchNorm_{i}" for i in range(4)] + [f"Conv_{i}" for i in range(4)])


def test_barlow_twins_against_numpy_on_the_valid_rows():
  rng = np.random.default_rng(0)
  z1, z2 = rng.normal(size=(7, 4)), rng.normal(size=(7, 4))
  ok = np.array([1, 1, 0, 1, 1, 1, 0], bool)
  a, b = z1[ok], z2[ok]
  sa = (a - a.mean(0)) / a.std(0, ddof=1)
  sb = (b - b.mean(0)) / b.std(0, ddof=1)
  c = sa.T @ sb / ok.sum()
  want = (np.sum((1 - np.diag(c)) ** 2)
          + 0.01 * (np.sum(c ** 2) - np.sum(np.diag(c) ** 2)))
  got = barlow_twins(jnp.asarray(z1, jnp.float32),
                     jnp.asarray(z2, jnp.float32), jnp.asarray(ok), 0.01)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Identical views with uncorrelated, centred dimensions: no off-diagonal
  # term, and each diagonal entry (N - 1) / N (the unbiased deviation).
  h = jnp.asarray([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
  got = float(barlow_twins(3 * h, h, jnp.ones(4, bool), 1.0))
  assert got == pytest.approx(2 * (1 - 3 / 4) ** 2, abs=1e-6)
  # A constant dimension (a dead unit) standardises to 0 with a finite
  # gradient (a floor under the standard deviation gave NaN: sqrt'(0)).
  z = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32).at[:, 1].set(0.5)
  g = jax.grad(lambda a: barlow_twins(a, a * 2, jnp.ones(6, bool), 0.1))(z)
  assert bool(jnp.all(jnp.isfinite(g)))


KW = dict(mem_size=30, batch_size=12, ssl_batch_size=12, inner_steps=2,
          n_outer=2, beta=0.5, reg=3.0, temperature=2.0, lr=0.05,
          ssl_lr=0.1, augment="none", projector_hidden=6)


def _reference(ctx, ss, params, batch, later):
  """Slow rounds and fast steps written out (loops, the valid rows
  selected rather than masked, NumPy-style losses)."""
  model, proj_mod = ctx.model, Projector(KW["projector_hidden"])
  n_out, n_in = KW["n_outer"], KW["inner_steps"]
  x_in = batch["x"][:B]
  y_in = np.asarray(batch["y"][:B])

  def bt(theta, proj, x):
    f = model.apply({"params": theta}, x, slow=True)
    z, _ = proj_mod.apply({"params": proj, **ss.projector_state}, f,
                          mutable=["batch_stats"])
    s = (z - z.mean(0)) / jnp.std(z, 0, ddof=1)
    c = s.T @ s / z.shape[0]  # augment='none': both views the same rows
    d = jnp.diagonal(c)
    return jnp.sum((1 - d) ** 2) + 2e-3 * (jnp.sum(c ** 2) - jnp.sum(d ** 2))

  theta, proj = params, ss.projector
  for j in range(n_out):
    t0, p0 = theta, proj
    for i in range(n_in):
      k = j * n_in + i
      if later:
        ok = np.asarray(batch["dualnet_ssl_ok"][k])
        x = batch["dualnet_ssl_x"][k][ok]
      else:
        x = x_in[np.arange(KW["ssl_batch_size"]) % B]
      gt, gp = jax.grad(bt, argnums=(0, 1))(theta, proj, x)
      theta = jax.tree.map(lambda a, g: a - KW["ssl_lr"] * g, theta, gt)
      proj = jax.tree.map(lambda a, g: a - KW["ssl_lr"] * g, proj, gp)
    theta = jax.tree.map(lambda a, b: a + KW["beta"] * (b - a), t0, theta)
    proj = jax.tree.map(lambda a, b: a + KW["beta"] * (b - a), p0, proj)

  def ce(logits, y):
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

  def logits(theta, x):  # training mode: the rows' own batch statistics
    return model.apply({"params": theta, **ss.model_state}, x, train=True,
                       mutable=["batch_stats"])[0]

  def fast(theta, i):
    total = ce(logits(theta, x_in), y_in)
    if not later:
      return total
    ok = np.asarray(batch["dualnet_ok"][i]) > 0
    saved = np.asarray(batch["dualnet_saved"][i])[ok] > 0
    out = logits(theta, batch["dualnet_x"][i][ok])
    total += ce(out, np.asarray(batch["dualnet_y"][i])[ok])
    t = KW["temperature"]
    p = jax.nn.softmax(batch["dualnet_z"][i][ok][saved] / t)
    kl = jnp.sum(p * (jnp.log(p) - jax.nn.log_softmax(out[saved] / t)))
    return total + KW["reg"] * kl / out.shape[-1]

  for i in range(n_in):
    g = jax.grad(fast)(theta, i)
    theta = jax.tree.map(lambda a, d: a - KW["lr"] * d, theta, g)
  return theta, proj


@pytest.mark.parametrize("later", [False, True])
def test_one_step_is_the_slow_rounds_then_the_fast_steps(stream, later):
  ctx = _ctx(stream)
  s = dualnet(**KW)
  e0, e1 = stream.experiences[:2]
  if later:
    # Experience 1, the memory holding one batch of experience 0: 10 rows
    # for draws of 12, so each draw has 2 empty slots (masked out of the
    # losses and of the projector's and gates' batch statistics).
    state, _ = after_first(ctx, s, stream, steps=1)
    batch = batch_of(e1)
  else:
    state = s.before_experience(ctx, train.init_state(ctx, s, 0), e0)
    batch = batch_of(e0)
  key = jax.random.fold_in(state.rng, state.step)
  prepared = s.prepare_batch(ctx, state.strategy, batch,
                             jax.random.split(key, 3)[0])
  if later:  # the memory's rows, all of experience 0, saved
    assert float(jnp.sum(prepared["dualnet_saved"])) > 0
    assert not bool(jnp.all(prepared["dualnet_ssl_ok"]))
    assert float(jnp.min(prepared["dualnet_ok"])) == 0.0
    np.testing.assert_array_equal(prepared["dualnet_saved"],
                                  prepared["dualnet_ok"])
  new, _ = jax.jit(lambda st, b: train.train_step(ctx, s, st, b))(state,
                                                                  batch)
  theta, proj = _reference(ctx, state.strategy, state.params, prepared,
                           later)
  for got, want in ((new.params, theta), (new.strategy.projector, proj)):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=2e-4, atol=2e-6), got, want)
  # Something moved: the slow learner by both updates, the head by the
  # fast one only.
  moved = lambda a, b: float(optax.global_norm(
      jax.tree.map(jnp.subtract, a, b)))
  assert moved(new.params["slow"], state.params["slow"]) > 1e-4
  assert moved(new.strategy.projector, state.strategy.projector) > 1e-4


def test_the_memory_saves_logits_when_its_rows_experience_ends(stream):
  ctx = _ctx(stream)
  s = dualnet(**KW)
  state, step = after_first(ctx, s, stream, steps=6)
  ss = state.strategy
  mem = ss.memory
  valid = np.asarray(mem.valid)
  assert valid.sum() == 30 and np.all(np.asarray(mem.experience)[valid] == 0)
  want = ctx.logits(state.params, state.model_state, mem.x, mem.task)
  np.testing.assert_allclose(ss.logits, want, rtol=1e-5, atol=1e-6)
  # Experience 1's rows get theirs at its end; experience 0's keep theirs.
  e1 = stream.experiences[1]
  for i in range(4):
    state = step(state, batch_of(e1, start=B * i))
  state = s.after_experience(ctx, state, e1)
  ss2 = state.strategy
  exp = np.asarray(ss2.memory.experience)
  new = exp == 1
  assert 0 < new.sum() < 30
  want = ctx.logits(state.params, state.model_state, ss2.memory.x,
                    ss2.memory.task)
  np.testing.assert_allclose(np.asarray(ss2.logits)[new],
                             np.asarray(want)[new], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(ss2.logits)[~new],
                                np.asarray(ss.logits)[~new])
  assert np.abs(np.asarray(want)[~new] - np.asarray(ss.logits)[~new]).max(
  ) > 1e-3  # the model moved, so keeping the old ones is a choice


def test_dualnet_keeps_old_classes_on_split_digits(full_stream):
  old = {}
  for spec, kw in (("naive", {}), ("dualnet", dict(dualnet=dict(
      mem_size=100)))):
    c = config(spec, lr=0.03, **kw)
    c.model.name = "dualnet"
    c.model.dualnet = dict(widths=(32,))
    c.optimizer.name = "sgd"
    acc = experiment.run(c, scenario=full_stream).accuracy
    old[spec] = float(acc[-1, :-1].mean())
  # (Naive on the same model keeps ~0.12: the fast gates' batch norm.)
  assert old["naive"] < 0.2, old
  assert old["dualnet"] > old["naive"] + 0.5, old


def test_dualnet_bad_inputs(stream):
  for kw, match in (
      ({"beta": 0.0}, "dualnet: beta must be a finite number > 0"),
      ({"beta": 1.5}, r"dualnet: beta must be in \(0, 1\], got 1.5"),
      ({"ssl_batch_size": 300},
       "dualnet \\(ssl\\): batch_size=300 is larger than the memory"),
      ({"inner_steps": 0}, "dualnet: inner_steps must be an int >= 1"),
      ({"reg": -1.0}, "dualnet: reg must be a finite number >= 0"),
      ({"augment": "blur"}, "dualnet: augment must be 'auto', 'none'"),
      ({"crop_scale": (0.5, 0.2)}, "dualnet: crop_scale must be")):
    with pytest.raises(ValueError, match=match):
      dualnet(**kw)
  params = lambda ctx: train.init_variables(ctx, jax.random.PRNGKey(0))[0]
  info = train.stream_info(stream, B)
  mlp = train.make_context(models.build("mlp", 10),
                           train.make_optimizer("sgd", 0.03), info)
  with pytest.raises(ValueError, match=r"dualnet needs the dualnet model "
                     r"\(model.name='dualnet'.*the model's params are "
                     r"\['backbone', 'head'\]"):
    dualnet().init(mlp, jax.random.PRNGKey(0), params(mlp))
  adam = _ctx(stream, lr=0.03, opt="adam")
  with pytest.raises(ValueError, match=r"dualnet: the optimiser's first "
                     r"update .* not -2 \* lr = -0.06"):
    dualnet().init(adam, jax.random.PRNGKey(0), params(adam))
  dualnet(check_optimizer=False).init(adam, jax.random.PRNGKey(0),
                                      params(adam))
  with pytest.raises(ValueError, match="dualnet has a single head; got "
                     "num_heads=2"):
    models.build("dualnet", 10, num_heads=2)
  with pytest.raises(ValueError, match="dualnet: unknown backbone 'vit'"):
    models.build("dualnet", 10, backbone="vit")


def test_dualnet_chain_rules():
  get = strategies.get
  with pytest.raises(ValueError, match="agem and dualnet cannot be composed "
                     "in this order"):
    strategy_lib.chain(get("agem"), get("dualnet"))
  strategy_lib.chain(get("dualnet"), get("agem"))
  with pytest.raises(ValueError, match="dualnet and si cannot be composed"):
    strategy_lib.chain(get("dualnet"), get("si"))
  with pytest.raises(ValueError, match="dualnet and packnet cannot be composed "
                     "in this order"):
    strategy_lib.chain(get("dualnet"), get("packnet"))


def test_kl_rows_against_numpy():
  # The KL term's per-row form against NumPy.
  from jaxcl.strategies.dualnet import _kl_rows
  rng = np.random.default_rng(1)
  out, z = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
  p = np_softmax(z / 2.0)
  want = np.sum(p * (np.log(p) - np_log_softmax(out / 2.0)), axis=1)
  np.testing.assert_allclose(_kl_rows(jnp.asarray(out), jnp.asarray(z), 2.0),
                             want, rtol=1e-5)
