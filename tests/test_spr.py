"""SPR (self-purified replay): NT-Xent, the self-centered filter (graph,
eigenvector centrality, beta mixture), the class-balanced purified buffer,
the fills of the delayed buffer, the classifier fitted to the purified
buffer, and a noisy Split Digits run."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
import scipy.stats

from jaxcl import beta_mixture, buffers, experiment, train
from jaxcl.strategies import spr as S
from test_experiment import WorkRecorder
from test_replay import config, make_ctx


# ---------------------------------------------------------------------------
# References written from the authors' and Mammoth's code.

def nt_xent_reference(outa, outb, temp):
  """Mammoth's ``SimCLR.__call__`` after the projections (normalised)."""
  n = len(outa)
  out = np.concatenate([outb, outa])
  unit = out / np.linalg.norm(out, axis=1, keepdims=True)
  cov = unit @ unit.T
  positives = np.concatenate([np.diag(cov, n), np.diag(cov, -n)])[:, None]
  mask = ~(np.eye(2 * n) + np.eye(2 * n, k=-n) + np.eye(2 * n, k=n)).astype(
      bool)
  negatives = cov[mask].reshape(2 * n, -1)
  logits = np.concatenate([positives, negatives], axis=1) / temp
  ce = scipy.special.logsumexp(logits, axis=1) - logits[:, 0]
  return ce.sum() / (2 * n)


def networkx_weights(b):
  """``nx.from_numpy_array(b)`` (an undirected graph) on a matrix without
  zeros: every entry in row-major order is an edge, and a later ``(v, u)``
  overwrites the weight of ``(u, v)``."""
  n = len(b)
  w = {}
  for u in range(n):
    for v in range(n):
      w[frozenset((u, v))] = b[u, v]
  return np.array([[w[frozenset((u, v))] for v in range(n)]
                   for u in range(n)])


def networkx_centrality(w, max_iter=6000, tol=1e-6):
  """``nx.eigenvector_centrality`` on the complete graph of weights ``w``
  (self-loops on the diagonal), its dictionary loop written out."""
  n = len(w)
  x = {v: 1.0 / n for v in range(n)}
  for _ in range(max_iter):
    xlast = x
    x = dict(xlast)
    for u in range(n):
      for v in range(n):  # G[u]: every node, u itself once (its self-loop)
        x[v] += xlast[u] * w[u, v]
    norm = math.hypot(*x.values()) or 1
    x = {k: v / norm for k, v in x.items()}
    if sum(abs(x[k] - xlast[k]) for k in x) < n * tol:
      return np.array([x[k] for k in range(n)])
  raise AssertionError("no convergence")


def bmm_reference(c, iters=10):
  """``BetaMixture1D(max_iters=10)``: outlier_remove, normalize, fit,
  create_lookup(1), look_lookup, in float64 with SciPy."""
  c = np.asarray(c, np.float64)
  p95, p5 = np.percentile(c, 95), np.percentile(c, 5)
  cmax, cmin = p95, p5 + 10e-6

  def norm(v):
    v = (v - cmin) / (cmax - cmin + 1e-6)
    v[v >= 1] = 1 - 10e-4
    v[v <= 0] = 10e-4
    return v

  x = norm(c[(c <= p95) & (c >= p5)])
  x[x >= 1 - 1e-4] = 1 - 1e-4
  x[x <= 1e-4] = 1e-4
  a, b, w = np.array([1., 2.]), np.array([2., 1.]), np.array([.5, .5])
  for _ in range(iters):
    r = np.array([w[k] * scipy.stats.beta.pdf(x, a[k], b[k])
                  for k in range(2)])
    r[r <= 1e-12] = 1e-12
    r /= r.sum(axis=0)
    for k in range(2):
      xb = np.sum(r[k] * x) / np.sum(r[k])
      s2 = np.sum(r[k] * (x - xb) ** 2) / np.sum(r[k])
      a[k] = xb * (xb * (1 - xb) / s2 - 1)
      b[k] = a[k] * (1 - xb) / xb
    w = r.sum(axis=1) / r.sum()
  grid = np.linspace(1e-12, 1 - 1e-12, 100)
  wl = w[1] * scipy.stats.beta.pdf(grid, a[1], b[1])
  p = wl + w[0] * scipy.stats.beta.pdf(grid, a[0], b[0])
  post = wl / (p + 1e-12)
  post[np.isinf(wl) & np.isinf(p)] = 1.0
  post[np.argmax(post):] = post.max()
  idx = (100 * norm(c.copy())).astype(int)
  idx[idx < 0] = 0
  idx[idx == 100] = 99
  return post[idx]


# ---------------------------------------------------------------------------
# The pieces against the references.

def test_nt_xent_is_the_simclr_cross_entropy():
  rng = np.random.default_rng(0)
  za, zb = rng.normal(size=(2, 7, 5))
  unit = lambda z: z / np.linalg.norm(z, axis=1, keepdims=True)
  got = S.nt_xent(jnp.asarray(unit(za), jnp.float32),
                  jnp.asarray(unit(zb), jnp.float32), 0.5)
  want = nt_xent_reference(za, zb, 0.5)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Views agreeing more lower it.
  close = S.nt_xent(jnp.asarray(unit(za)), jnp.asarray(unit(za + 0.01 * zb)),
                    0.5)
  assert float(close) < float(got)


def test_graph_keeps_the_lower_triangle_draw_and_centrality_is_networkx():
  rng = np.random.default_rng(1)
  b = rng.uniform(size=(9, 9)).astype(np.float32)
  w = np.asarray(S.undirected_weights(jnp.asarray(b)))
  np.testing.assert_array_equal(w, networkx_weights(b))
  assert not np.allclose(b, b.T)
  want = networkx_centrality(w.astype(np.float64))
  # Padded with rows that are not there (other classes' rows, anything).
  pad = rng.uniform(size=(12, 12)).astype(np.float32)
  pad[:9, :9] = w
  valid = np.arange(12) < 9
  got = np.asarray(S.eigenvector_centrality(jnp.asarray(pad),
                                            jnp.asarray(valid)))
  np.testing.assert_allclose(got[:9], want, atol=2e-6)
  assert np.all(got[9:] == 0)
  # A sparser graph: the centralities differ from node to node.
  sparse = np.where(rng.uniform(size=(9, 9)) < 0.3, 1.0, 1e-5)
  sparse = np.asarray(S.undirected_weights(jnp.asarray(sparse, jnp.float32)))
  want = networkx_centrality(sparse.astype(np.float64))
  got = np.asarray(S.eigenvector_centrality(jnp.asarray(sparse),
                                            jnp.ones(9, bool)))
  np.testing.assert_allclose(got, want, atol=2e-6)
  assert np.ptp(want) > 0.05


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beta_mixture_posterior_is_the_reference(seed):
  rng = np.random.default_rng(seed)
  c = np.concatenate([rng.beta(5, 2, size=30), rng.beta(2, 5, size=12)]) * 0.2
  pad = np.concatenate([c, rng.normal(size=5)]).astype(np.float32)
  valid = np.arange(len(pad)) < len(c)
  got = np.asarray(beta_mixture.posterior(jnp.asarray(pad),
                                          jnp.asarray(valid)))
  np.testing.assert_allclose(got[:len(c)], bmm_reference(c), atol=1e-4)
  assert np.all(got[len(c):] == 0)
  for q in (5.0, 37.5, 95.0):
    np.testing.assert_allclose(
        float(beta_mixture.percentile(jnp.asarray(pad), jnp.asarray(valid),
                                      q)), np.percentile(c, q), rtol=1e-6)


def test_beta_mixture_of_a_degenerate_class_is_nan_and_keeps_nothing():
  # Two rows (the trimmed fit is empty) or equal values: the reference's
  # fit divides by a zero variance.
  for c in ([0.3, 0.5], [0.2, 0.2, 0.2, 0.2]):
    p = beta_mixture.posterior(jnp.asarray(c, jnp.float32),
                               jnp.ones(len(c), bool))
    assert np.all(np.isnan(np.asarray(p))), p
    assert not np.any(np.asarray(p) > 0.5)


def test_filter_trusts_a_class_cluster_over_its_outliers():
  """Rows whose projections gather around their class's direction get a
  higher clean posterior than the class's scattered rows (mislabelled ones,
  from another class's region); a class of two rows keeps none."""
  rng = np.random.default_rng(3)
  d = 16
  centre = rng.normal(size=(2, d))
  rows, labels, stray = [], [], []
  for c in range(2):
    for i in range(30):
      odd = i >= 24
      v = (centre[1 - c] if odd else centre[c]) + 0.3 * rng.normal(size=d)
      rows.append(v)
      labels.append(c)
      stray.append(odd)
  rows += [rng.normal(size=d), rng.normal(size=d)]
  labels += [2, 2]
  stray += [False, False]
  z = np.asarray(rows) / np.linalg.norm(rows, axis=1, keepdims=True)
  y, stray = np.asarray(labels), np.asarray(stray)
  p = np.asarray(S.clean_posterior(jnp.asarray(z, jnp.float32),
                                   jnp.asarray(y), jax.random.PRNGKey(0),
                                   num_classes=4, ensembles=5))
  body = (~stray) & (y < 2)
  assert p[body].mean() > 0.7, p[body]
  assert p[stray].mean() < 0.3, p[stray]
  assert np.all(np.isnan(p[y == 2]))


# ---------------------------------------------------------------------------
# The purified buffer.

def _offer(mem, cp, off, y, p, take, key=0):
  n = len(y)
  x = jnp.asarray(np.arange(n, dtype=np.float32)[:, None] + 100.0)
  return S.purified_add(mem, cp, off, jax.random.PRNGKey(key), x,
                        jnp.asarray(y, jnp.int32), jnp.zeros(n, jnp.int32),
                        jnp.zeros(n, jnp.int32),
                        jnp.asarray(p, jnp.float32), jnp.asarray(take))


def test_purified_buffer_fills_in_order_then_evicts_the_least_clean():
  mem = buffers.init(6, (1,))
  cp, off = jnp.zeros(6), jnp.zeros(4, jnp.int32)
  mem, cp, off = _offer(mem, cp, off, [0, 1, 1, 0], [.9, .8, .7, .6],
                        [True, False, True, True])
  assert int(mem.seen) == 3 and np.asarray(off).tolist() == [2, 1, 0, 0]
  np.testing.assert_array_equal(np.asarray(mem.valid), [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(mem.y)[:3], [0, 1, 0])
  np.testing.assert_allclose(np.asarray(mem.x)[:3, 0], [100, 102, 103])
  np.testing.assert_allclose(np.asarray(cp)[:3], [.9, .7, .6])
  # Full: 36 rows of class 0 and 4 of class 1; a row of a new class enters
  # (its share is not taken) and evicts class 0's least clean row (class
  # 0's excess over an equal share is 16 rows, class 1's -16).
  cap = 40
  y0 = np.array([0] * 36 + [1] * 4)
  p0 = np.random.default_rng(0).uniform(0.5, 1.0, size=cap)
  p0[17] = 0.3
  p0[36] = 0.01  # class 1's least clean row: not the victim
  p0[5] = 0.35
  mem = buffers.init(cap, (1,))
  mem, cp, off = _offer(mem, jnp.zeros(cap), jnp.zeros(4, jnp.int32), y0, p0,
                        np.ones(cap, bool))
  assert int(mem.seen) == cap
  mem2, cp2, off2 = _offer(mem, cp, off, [2], [0.9], [True], key=1)
  y2 = np.asarray(mem2.y)
  assert y2[17] == 2 and np.sum(y2 == 0) == 35 and np.sum(y2 == 1) == 4
  assert float(cp2[17]) == pytest.approx(0.9)
  assert int(mem2.seen) == cap + 1 and int(off2[2]) == 1
  # A class offered far beyond its share (m_k / n_k about 2e-8) stays out.
  mem3, _, off3 = _offer(mem, cp, off.at[0].set(10 ** 9), [0], [0.99],
                         [True], key=2)
  np.testing.assert_array_equal(np.asarray(mem3.y), np.asarray(mem.y))
  np.testing.assert_array_equal(np.asarray(mem3.x), np.asarray(mem.x))
  assert int(mem3.seen) == cap + 1 and int(off3[0]) == 10 ** 9 + 1


def test_purified_buffer_balances_a_skewed_stream():
  """400 rows, 90 % of class 0: the class-balanced buffer ends near half
  and half (a reservoir would keep about 36 / 4)."""
  rng = np.random.default_rng(4)
  y = np.where(rng.uniform(size=400) < 0.9, 0, 1)
  mem = buffers.init(40, (1,))
  mem, _, off = _offer(mem, jnp.zeros(40), jnp.zeros(2, jnp.int32), y,
                       rng.uniform(size=400), np.ones(400, bool))
  have = np.bincount(np.asarray(mem.y)[np.asarray(mem.valid)], minlength=2)
  assert have.sum() == 40 and np.asarray(off).tolist() == np.bincount(
      y).tolist()
  assert 15 <= have[1] <= 25, have


# ---------------------------------------------------------------------------
# The classifier fitted to the purified buffer.

def test_finetune_fits_the_buffer_from_the_base_with_a_fresh_head(stream):
  ctx = make_ctx(stream, widths=(32,))
  exps = stream.experiences
  x = np.concatenate([e.train_x[:20] for e in exps])
  y = np.concatenate([e.train_y[:20] for e in exps])
  mem = buffers.init(48, ctx.info.input_shape)
  mem = buffers.put_rows(mem, jnp.arange(40), jnp.asarray(x), jnp.asarray(y),
                         jnp.zeros(40, jnp.int32), jnp.zeros(40, jnp.int32))
  base, ms = train.init_variables(ctx, jax.random.PRNGKey(0))
  fit = jax.jit(lambda key, b, m: S.finetune(
      ctx, key, b, ms, m, epochs=40, batch_size=16, learning_rate=2e-3,
      step_size=300, gamma=0.1, clip_value=0.5))
  params, _ = fit(jax.random.PRNGKey(1), base, mem)
  logits = ctx.logits(params, ms, jnp.asarray(x), jnp.zeros(40, jnp.int32))
  assert float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(y))) >= 0.9
  # The whole network trained, from the base's features, not its head.
  assert not np.allclose(params["backbone"]["Dense_0"]["kernel"],
                         base["backbone"]["Dense_0"]["kernel"])
  start = jax.jit(lambda key, b, m: S.finetune(
      ctx, key, b, ms, m, epochs=1, batch_size=40, learning_rate=1e-12,
      step_size=300, gamma=0.1, clip_value=0.5))(
          jax.random.PRNGKey(1), base, mem)[0]
  assert not np.allclose(start["head"]["kernel"], base["head"]["kernel"])
  np.testing.assert_allclose(start["backbone"]["Dense_0"]["kernel"],
                             base["backbone"]["Dense_0"]["kernel"], atol=1e-9)
  # drop_last: 40 rows in batches of 48 make no step at all.
  none = jax.jit(lambda key, b, m: S.finetune(
      ctx, key, b, ms, m, epochs=3, batch_size=48, learning_rate=1e-1,
      step_size=300, gamma=0.1, clip_value=0.5))(
          jax.random.PRNGKey(1), base, mem)[0]
  np.testing.assert_array_equal(none["backbone"]["Dense_0"]["kernel"],
                                base["backbone"]["Dense_0"]["kernel"])


# ---------------------------------------------------------------------------
# A run.

_SMALL = dict(mem_size=60, delayed_size=60, expert_epochs=12,
              base_epochs=12, finetune_epochs=10)


@pytest.fixture(scope="module")
def noisy_run():
  # A 256-unit MLP: with 32 units the expert's projections sort too little
  # (0.25-0.30 of the buffer's labels wrong, measured).
  c = config("spr", widths=(256,), spr=_SMALL)
  c.dataset.label_noise = 0.4
  rec = WorkRecorder()
  return c, experiment.run(c, reporter=rec), rec.bars


def test_fills_carry_rows_across_experiences(noisy_run):
  c, r, bars = noisy_run
  ss = r.state.strategy
  sizes = [e.num_train for e in experiment.setup(c).scenario.experiences]
  total = sum(sizes)
  assert int(ss.fills) == total // 60
  # The run's reporter showed each experience's fills as they finished.
  held = np.cumsum(sizes) % 60
  fills = (np.concatenate([[0], held[:-1]]) + sizes) // 60
  assert [(b["desc"], b["total"], b["done"], b["unit"], b["closed"])
          for b in bars] == [
              (f"experience {i + 1}/{len(sizes)}, spr after it: fills of "
               "the delayed buffer", n, n, "fill", True)
              for i, n in enumerate(fills)]
  assert int(jnp.sum(ss.delayed.valid)) == total % 60 == int(
      ss.delayed.seen)
  # Some rows of each experience waited for the next one's.
  assert any(n % 60 for n in sizes)
  assert r.learner.chunk_fn._cache_size() == 1
  # The model evaluated is the fitted classifier, not the base network.
  assert not np.allclose(r.state.params["head"]["kernel"],
                         ss.base["head"]["kernel"])


def test_noisy_split_digits_purified_buffer_is_clean_and_balanced(noisy_run):
  c, r, _ = noisy_run
  ss = r.state.strategy
  data = experiment.load_data(c)
  truth = {np.asarray(x, np.float32).tobytes(): int(t)
           for x, t in zip(data.train_x, data.train_y_true)}
  v = np.asarray(ss.memory.valid)
  y = np.asarray(ss.memory.y)[v]
  wrong = np.mean([truth[x.astype(np.float32).tobytes()] != t
                   for x, t in zip(np.asarray(ss.memory.x)[v], y)])
  assert v.sum() == 60
  stream = np.mean(data.train_y != data.train_y_true)
  assert 0.35 < stream < 0.45, stream
  # The filter keeps few of the stream's wrong labels (measured: 0.08 with
  # these 12-epoch fills, 0.02 with 30-epoch ones and 100 rows).
  assert wrong < 0.5 * stream, wrong
  assert np.bincount(y, minlength=10).min() >= 3, np.bincount(y)
  # It learns every class from those rows (chance: 0.1; measured 0.70).
  assert float(np.mean(r.accuracy[-1])) > 0.5, r.accuracy[-1]


# ---------------------------------------------------------------------------
# Bad input.

@pytest.mark.parametrize("kw,match", [
    (dict(mem_size=0), "mem_size"),
    (dict(delayed_size=1), "delayed_size"),
    (dict(temperature=0.0), "temperature"),
    (dict(ensembles=0), "ensembles"),
    (dict(finetune_batch_size=400, mem_size=300), "finetune_batch_size=400"),
    (dict(finetune_gamma=1.5), "finetune_gamma=1.5"),
    (dict(clip_value=-1.0), "clip_value"),
    (dict(augment="strong"), "augment"),
    (dict(augment=("crop", "blur")), "blur"),
])
def test_bad_arguments_are_clear_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    S.spr(**kw)


def test_a_model_without_a_head_is_refused():
  c = config("spr", spr=_SMALL)
  c.model.name = "progressive"
  c.model.progressive = dict(widths=(8,))
  c.scenario.kind = "task"
  with pytest.raises(ValueError, match="output layer named 'head'"):
    experiment.run(c)


@pytest.mark.parametrize("spec", ["spr+replay", "ewc+spr"])
def test_composes_with_nothing(spec):
  from jaxcl import strategies
  with pytest.raises(ValueError, match="chain\\(\\): spr trains no parameter "
                     "from the stream"):
    strategies.from_spec(spec)
