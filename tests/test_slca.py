"""Mechanism tests of SLCA (slow learner, classifier alignment).

NumPy references for the class statistics (``np.cov``, as ``torch.cov``)
and the alignment loss (both codes' per-experience logit norm); the runs
are Split Digits (scikit-learn's digits, MLP 400-400, SGD with momentum).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import experiment, train
from jaxcl.strategies.slca import (align_head, alignment_loss,
                                   class_statistics, slca)
from jaxcl.train import train_step

from partial_runs import run_keeping_states, trace_initial_state


def _config(opt="momentum", wd=5e-4):
  c = jaxcl.default_config()   # Split Digits, 5 x 2 classes, MLP 400-400
  c.optimizer.name = opt
  c.optimizer.learning_rate = 0.01 if opt != "adam" else 1e-3
  c.optimizer.weight_decay = wd if opt != "adam" else 0.0
  c.report.progress = False
  return c


@pytest.fixture(scope="module")
def full_run():
  """One SLCA run over the whole stream that keeps the state as each
  experience ended: ``(config, result, states, strategy)`` (the strategy
  record run, without run_keeping_states' hook)."""
  c = _config()
  strategy = slca()
  r, states = run_keeping_states(c, strategy=strategy)
  return c, r, states, strategy


@pytest.fixture(scope="module")
def runs(full_run):
  """The SLCA run as it was after one and after two experiences (the
  same run: states do not depend on the experiences still to come)."""
  c, r, states, _ = full_run
  return (c, dataclasses.replace(r, state=states[0]),
          dataclasses.replace(r, state=states[1]))


def leaves(t):
  return [np.asarray(a) for a in jax.tree.leaves(t)]


def test_class_statistics_equal_numpy():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(40, 5)).astype(np.float32)
  y = rng.integers(0, 4, size=40)
  valid = np.arange(40) < 33          # 7 padding rows
  classes = np.array([True, False, True, True])
  old_mean = rng.normal(size=(4, 5)).astype(np.float32)
  old_cov = rng.normal(size=(4, 5, 5)).astype(np.float32)
  mean, cov = class_statistics(jnp.asarray(z), jnp.asarray(y),
                               jnp.asarray(valid), jnp.asarray(classes),
                               jnp.asarray(old_mean), jnp.asarray(old_cov),
                               1e-4)
  for k in range(4):
    if not classes[k]:    # kept as they were
      np.testing.assert_array_equal(np.asarray(mean[k]), old_mean[k])
      np.testing.assert_array_equal(np.asarray(cov[k]), old_cov[k])
      continue
    rows = z[(y == k) & valid].astype(np.float64)
    np.testing.assert_allclose(np.asarray(mean[k]), rows.mean(0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(cov[k]),
                               np.cov(rows.T) + 1e-4 * np.eye(5),
                               rtol=1e-4, atol=1e-6)


def ref_loss(kernel, bias, z, y, class_exp, seen, tau):
  """Both codes' logit-normalised cross-entropy, NumPy float64."""
  logits = z @ kernel + bias
  cols = np.flatnonzero(seen)
  logits = logits[:, cols]
  exps = sorted(set(class_exp[cols].tolist()))
  norms = np.stack([np.linalg.norm(logits[:, class_exp[cols] == e], axis=1)
                    + 1e-7 for e in exps], axis=1).mean(1, keepdims=True)
  out = logits / norms / tau
  out = out - out.max(1, keepdims=True)
  logp = out - np.log(np.exp(out).sum(1, keepdims=True))
  target = np.searchsorted(cols, y)
  return -logp[np.arange(len(y)), target].mean()


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_alignment_loss_equals_the_logit_normalised_cross_entropy(tau):
  rng = np.random.default_rng(1)
  kernel = rng.normal(size=(6, 8))
  bias = rng.normal(size=(8,))
  class_exp = np.array([0, 0, 1, 1, 1, 2, -1, -1])
  seen = class_exp >= 0
  z = rng.normal(size=(12, 6))
  y = rng.choice(np.flatnonzero(seen), size=12)
  got = alignment_loss({"kernel": jnp.asarray(kernel, jnp.float32),
                        "bias": jnp.asarray(bias, jnp.float32)},
                       jnp.asarray(z, jnp.float32), jnp.asarray(y),
                       jnp.ones((12,), bool), jnp.asarray(class_exp),
                       jnp.asarray(seen), 4, tau)
  want = ref_loss(kernel, bias, z, y, class_exp, seen, tau)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # The normalisation matters: the plain cross-entropy differs.
  plain = alignment_loss({"kernel": jnp.asarray(kernel, jnp.float32),
                          "bias": jnp.asarray(bias, jnp.float32)},
                         jnp.asarray(z, jnp.float32), jnp.asarray(y),
                         jnp.ones((12,), bool), jnp.asarray(class_exp),
                         jnp.asarray(seen), 4, 0.0)
  assert abs(float(plain) - want) > 1e-2


def test_alignment_has_finite_gradients_with_experiences_to_come():
  """An experience with no seen class yet has a logit norm of 0: its
  gradient must be 0, not NaN (a bare sqrt gave NaN heads at every
  experience but the last)."""
  rng = np.random.default_rng(2)
  head = {"kernel": jnp.asarray(rng.normal(size=(3, 6)), jnp.float32),
          "bias": jnp.zeros((6,), jnp.float32)}
  class_exp = jnp.array([0, 0, 1, 1, -1, -1])
  seen = class_exp >= 0
  mean = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  cov = jnp.broadcast_to(jnp.eye(3), (6, 3, 3))
  out = align_head(head, mean, cov, class_exp, seen, jnp.asarray(1),
                   jax.random.PRNGKey(0), num_experiences=3, epochs=2,
                   samples=16, batch_size=8, lr=0.01, momentum=0.9,
                   weight_decay=5e-4, tau=0.1, shrink=True)
  k = np.asarray(out["kernel"])
  assert np.isfinite(k).all()
  assert np.abs(k[:, :4] - np.asarray(head["kernel"])[:, :4]).max() > 1e-4
  # Columns of classes not seen are left alone.
  np.testing.assert_array_equal(k[:, 4:], np.asarray(head["kernel"])[:, 4:])


@pytest.mark.parametrize("wd, shrink", [(5e-4, True), (0.2, False)])
def test_align_head_is_sgd_on_features_sampled_by_hand(wd, shrink):
  """align_head against the procedure written out: per epoch, features
  γ_c μ_c + L_c ε (L_c L_cᵀ = Σ_c, γ_c = 0.9 + 0.1 (t_c + 1) / (t + 1)),
  the epoch's shuffled batches, and SGD with momentum, coupled weight
  decay and a cosine rate on the seen columns. Elongated, differently
  oriented covariances and unequal means, so that Lᵀ ε or another γ
  would give other features."""
  from jaxcl.strategies._epochs import shuffled_batches
  rng = np.random.default_rng(3)
  c, d, samples, bs, epochs = 6, 3, 4, 8, 2
  # wd: the default's decay moves the head by less than the tolerance, so
  # a large one checks the decay's term; shrink=False: every γ_c = 1.
  lr, mom, tau = 0.05, 0.9, 0.1
  class_exp = np.array([0, 0, 1, 1, -1, -1])
  seen = class_exp >= 0
  mean = rng.normal(size=(c, d)) * 2
  a = rng.normal(size=(c, d, d))
  cov = a @ np.swapaxes(a, 1, 2) + 0.1 * np.eye(d)
  head = {"kernel": rng.normal(size=(d, c)) * 0.5,
          "bias": rng.normal(size=(c,)) * 0.1}
  key = jax.random.PRNGKey(5)
  f32 = lambda t: jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), t)
  got = align_head(f32(head), jnp.asarray(mean, jnp.float32),
                   jnp.asarray(cov, jnp.float32), jnp.asarray(class_exp),
                   jnp.asarray(seen), jnp.asarray(1), key,
                   num_experiences=3, epochs=epochs, samples=samples,
                   batch_size=bs, lr=lr, momentum=mom, weight_decay=wd,
                   tau=tau, shrink=shrink)
  gamma = 0.9 + 0.1 * (class_exp + 1) / 2 if shrink else np.ones(c)
  chol = np.linalg.cholesky(np.where(seen[:, None, None], cov, np.eye(d)))
  labels = np.repeat(np.arange(c), samples)
  grad = jax.jit(jax.grad(lambda h, z, y, ok: alignment_loss(
      h, z, y, ok, jnp.asarray(class_exp), jnp.asarray(seen), 3, tau)))
  h = {k: v.copy() for k, v in head.items()}
  v = {k: np.zeros_like(a) for k, a in head.items()}
  cols = {"kernel": seen[None, :], "bias": seen}
  for e, k in enumerate(jax.random.split(key, epochs)):
    k_draw, k_order = jax.random.split(k)
    eps = np.asarray(jax.random.normal(k_draw, (c, samples, d)), np.float64)
    z = (gamma[:, None, None] * mean[:, None, :]
         + np.einsum("ced,csd->cse", chol, eps)).reshape(c * samples, d)
    idx, ok = map(np.asarray, shuffled_batches(k_order,
                                               jnp.asarray(seen[labels]),
                                               bs))
    rate = lr * 0.5 * (1 + np.cos(np.pi * e / epochs))
    for i, o in zip(idx, ok):
      if not o.any():
        continue
      g = grad(f32(h), jnp.asarray(z[i], jnp.float32),
               jnp.asarray(labels[i]), jnp.asarray(o))
      for n in h:
        v[n] = mom * v[n] + np.asarray(g[n], np.float64) + wd * h[n]
        h[n] = np.where(cols[n], h[n] - rate * v[n], h[n])
  for n in h:
    np.testing.assert_allclose(np.asarray(got[n]), h[n], rtol=1e-3,
                               atol=1e-4, err_msg=n)
  assert np.abs(h["kernel"] - head["kernel"]).max() > 1e-2   # it moved


def _step(c, r, scale, opt):
  """One training step of experience 1 from ``r``'s state after
  experience 0 (the same state and batch whatever ``scale``), with a fresh
  optimiser ``opt`` (``_config(opt)``'s)."""
  strategy = slca(backbone_lr_scale=scale)
  o = _config(opt).optimizer
  ctx = dataclasses.replace(r.learner.ctx, tx=train.make_optimizer(
      opt, o.learning_rate, weight_decay=o.weight_decay))
  exp = experiment.build_scenario(c).experiences[1]
  state = strategy.before_experience(ctx, r.state, exp)
  state = state.replace(opt_state=ctx.tx.init(state.params))
  batch = {"x": jnp.asarray(exp.train_x[:32]),
           "y": jnp.asarray(exp.train_y[:32]),
           "task": jnp.asarray(exp.train_task[:32]),
           "mask": jnp.ones((32,), jnp.float32),
           "index": jnp.arange(32, dtype=jnp.int32)}
  after, _ = jax.jit(lambda st: train_step(ctx, strategy, st, batch))(state)
  return state, after


@pytest.mark.parametrize("opt", ["sgd", "momentum", "adam"])
def test_backbone_update_is_scale_times_the_optimisers(runs, opt):
  """A parameter group's learning rate: the backbone moves by exactly
  ``s`` times what the optimiser (with momentum, weight decay or Adam's
  moments) moves it at ``s = 1``; the current head columns move as the
  optimiser says, the other columns not at all."""
  c, r, _ = runs   # after experience 0; each optimiser starts afresh
  s = 0.25
  before, full = _step(c, r, 1.0, opt)
  before_s, slow = _step(c, r, s, opt)
  for a, b in zip(leaves(before.params), leaves(before_s.params)):
    np.testing.assert_array_equal(a, b)   # the same start
  cur = np.zeros(10, bool)
  cur[[2, 3]] = True
  for name in before.params:
    p0, p1, ps = (before.params[name], full.params[name], slow.params[name])
    if name == "head":
      for k in ("kernel", "bias"):
        d1 = np.asarray(p1[k]) - np.asarray(p0[k])
        ds = np.asarray(ps[k]) - np.asarray(p0[k])
        np.testing.assert_allclose(ds[..., cur], d1[..., cur], rtol=1e-4,
                                   atol=1e-7)
        assert np.abs(d1[..., cur]).max() > 1e-5
        np.testing.assert_array_equal(ds[..., ~cur], 0.0)
      continue
    for a0, a1, a_s in zip(leaves(p0), leaves(p1), leaves(ps)):
      assert np.abs(a1 - a0).max() > 1e-6
      np.testing.assert_allclose(a_s - a0, s * (a1 - a0), rtol=1e-3,
                                 atol=1e-7)


def test_freeze_grads_masks_old_columns_and_a_frozen_backbone(runs):
  _, r1, _ = runs
  ctx = r1.learner.ctx
  ones = jax.tree.map(jnp.ones_like, r1.state.params)
  ss = r1.state.strategy._replace(
      current=jnp.zeros(10, bool).at[jnp.array([2, 3])].set(True))
  for scale, backbone in [(0.01, 1.0), (0.0, 0.0)]:
    g = slca(backbone_lr_scale=scale).freeze_grads(ctx, ss, ones)
    k = np.asarray(g["head"]["kernel"])
    assert (k[:, [2, 3]] == 1).all() and (np.delete(k, [2, 3], 1) == 0).all()
    bias = np.asarray(g["head"]["bias"])
    assert (bias[[2, 3]] == 1).all() and (np.delete(bias, [2, 3]) == 0).all()
    for name in g:
      if name != "head":
        assert all((a == backbone).all() for a in leaves(g[name]))


def test_alignment_changes_only_the_head(runs, full_run):
  c, r1, r2 = runs
  strategy = full_run[3]   # the run's own: its hooks are compiled
  ctx = r2.learner.ctx
  exps = experiment.build_scenario(c).experiences
  # The state just before experience 1's end, replayed through the hook:
  # r2's state is after it; rebuild it from r2's strategy state backup.
  ss = r2.state.strategy
  assert bool(ss.aligned)
  params = r2.state.params
  pre = {**params, "head": ss.backup}
  for name in params:
    if name != "head":   # untouched by the alignment
      for a, b in zip(leaves(params[name]), leaves(pre[name])):
        np.testing.assert_array_equal(a, b)
  k, kb = np.asarray(params["head"]["kernel"]), np.asarray(ss.backup["kernel"])
  assert np.abs(k[:, :4] - kb[:, :4]).max() > 1e-3    # seen: aligned
  np.testing.assert_array_equal(k[:, 4:], kb[:, 4:])  # unseen: untouched
  # The hook itself: the same result from the pre-alignment state.
  state = r2.state.replace(
      params=pre, strategy=ss._replace(
          current=jnp.zeros(10, bool).at[jnp.array([2, 3])].set(True),
          seen=jnp.zeros(10, bool).at[jnp.array([0, 1])].set(True),
          mean=ss.mean.at[2:4].set(0.0), aligned=jnp.zeros((), bool)))
  out = strategy.after_experience(ctx, state, exps[1])
  for a, b in zip(leaves(out.params), leaves(params)):
    np.testing.assert_array_equal(a, b)
  # The next experience starts from the head before alignment.
  nxt = strategy.before_experience(ctx, out, exps[2])
  kn = np.asarray(nxt.params["head"]["kernel"])
  np.testing.assert_array_equal(np.delete(kn, [4, 5], 1),
                                np.delete(kb, [4, 5], 1))
  assert np.abs(kn[:, [4, 5]]).max() > 0    # a fresh head for 4, 5
  np.testing.assert_array_equal(np.asarray(nxt.params["head"]["bias"])[4:6],
                                0.0)


def test_statistics_of_old_classes_are_kept_and_new_equal_numpy(runs):
  c, r1, r2 = runs
  s1, s2 = r1.state.strategy, r2.state.strategy
  np.testing.assert_array_equal(np.asarray(s2.mean[:2]),
                                np.asarray(s1.mean[:2]))
  np.testing.assert_array_equal(np.asarray(s2.cov[:2]),
                                np.asarray(s1.cov[:2]))
  np.testing.assert_array_equal(np.asarray(s2.class_exp),
                                [0, 0, 1, 1] + [-1] * 6)
  # Classes 2, 3: from experience 1's rows through the model at its end.
  from jaxcl.strategies._extractor import extract
  exp = experiment.build_scenario(c).experiences[1]
  z = np.asarray(extract(r2.learner.ctx, "backbone", r2.state.params,
                         r2.state.model_state, jnp.asarray(exp.train_x),
                         jnp.asarray(exp.train_task)), np.float64)
  for k in (2, 3):
    rows = z[exp.train_y == k]
    np.testing.assert_allclose(np.asarray(s2.mean[k]), rows.mean(0),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(s2.cov[k]),
                               np.cov(rows.T) + 1e-4 * np.eye(z.shape[1]),
                               rtol=1e-3, atol=1e-5)
  assert np.abs(np.asarray(s2.mean[4:])).max() == 0


def test_first_experience_statistics_and_no_alignment(runs):
  """Experience 0's end on a padded experience (its 270 rows padded to 280
  with zero rows of label 0, as when a later experience is larger): the
  statistics of classes 0, 1 are those of the real rows only, and no
  alignment runs (both codes align from the second experience on): the
  head is the trained one and is the backup."""
  c, r1, _ = runs
  ctx = r1.learner.ctx
  ctx = dataclasses.replace(ctx, info=dataclasses.replace(ctx.info,
                                                          train_size=280))
  exp = experiment.build_scenario(c).experiences[0]
  ss = r1.state.strategy
  state = r1.state.replace(strategy=ss._replace(
      current=jnp.zeros(10, bool).at[jnp.array([0, 1])].set(True),
      seen=jnp.zeros(10, bool), mean=jnp.zeros_like(ss.mean),
      cov=jnp.zeros_like(ss.cov)))
  out = slca().after_experience(ctx, state, exp)
  assert not bool(out.strategy.aligned)
  for a, b, h in zip(leaves(out.params["head"]), leaves(out.strategy.backup),
                     leaves(r1.state.params["head"])):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, h)
  from jaxcl.strategies._extractor import extract
  z = np.asarray(extract(ctx, "backbone", r1.state.params,
                         r1.state.model_state, jnp.asarray(exp.train_x),
                         jnp.asarray(exp.train_task)), np.float64)
  for k in (0, 1):
    rows = z[exp.train_y == k]
    np.testing.assert_allclose(np.asarray(out.strategy.mean[k]),
                               rows.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.strategy.cov[k]),
                               np.cov(rows.T) + 1e-4 * np.eye(z.shape[1]),
                               rtol=1e-3, atol=1e-5)


def test_run_compiles_once_and_beats_naive(full_run):
  c, r, _, _ = full_run
  acc = np.asarray(r.accuracy)
  assert np.isfinite(acc).all()
  assert r.learner.chunk_fn._cache_size() == 1
  naive = jaxcl.run(c)
  # Split Digits: SLCA ~0.9, fine-tuning ~0.2 (it forgets).
  assert r.metrics["acc"] > naive.metrics["acc"] + 0.4
  # Alignment is what calibrates the experiences' heads: without it
  # (ca_epochs=0) the accuracy is much lower.
  plain = jaxcl.run(c, strategy=slca(ca_epochs=0))
  assert r.metrics["acc"] > plain.metrics["acc"] + 0.1


# Slow: tests/test_resume_every_strategy.py's audit covers SLCA too (three
# kill plans); this in-process check costs 25-55 s of the CI budget.
@pytest.mark.slow
def test_resume_at_an_experience_boundary_is_bit_identical(tmp_path):
  c = _config()
  c.report.plots = False
  c.report.tensorboard = False
  ref = jaxcl.run(c, str(tmp_path / "ref"), strategy=slca())
  # A run that dies as experience 3 starts (after the save that follows
  # experience 2's evaluation), then resumes in the same directory.
  crashing = slca()

  def dies(ctx, state, exp):
    if exp.index == 3:
      raise KeyboardInterrupt("killed")
    return crashing.before_experience(ctx, state, exp)

  work = str(tmp_path / "cut")
  with pytest.raises(KeyboardInterrupt):
    jaxcl.run(c, work, strategy=crashing._replace(before_experience=dies))
  out = jaxcl.run(c, work, strategy=slca(), resume=True)
  np.testing.assert_array_equal(np.asarray(out.accuracy),
                                np.asarray(ref.accuracy))
  for a, b in zip(leaves(out.state), leaves(ref.state)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kwargs, match", [
    (dict(backbone_lr_scale=1.5), r"backbone_lr_scale=1\.5 is outside"),
    (dict(backbone_lr_scale=-0.1), "outside"),
    (dict(backbone_lr_scale=True), "outside"),
    (dict(ca_epochs=-1), r"ca_epochs must be an int >= 0"),
    (dict(ca_epochs=2.5), "ca_epochs"),
    (dict(samples_per_class=0), r"samples_per_class must be an int >= 1"),
    (dict(ca_batch_size=0), "ca_batch_size"),
    (dict(ca_lr=0.0), r"ca_lr must be a finite number > 0, got 0\.0"),
    (dict(ca_momentum=1.0), r"ca_momentum must be a number in \[0, 1\)"),
    (dict(ca_weight_decay=-1.0), "ca_weight_decay"),
    (dict(logit_norm=float("nan")), "logit_norm"),
    (dict(cov_eps=-1e-4), "cov_eps"),
    (dict(shrink_old_means="yes"), "shrink_old_means must be True or False"),
    (dict(train_mask=1), "train_mask must be True or False"),
])
def test_bad_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    slca(**kwargs)


def test_bad_streams_and_models():
  # Refused at init: traced, not compiled.
  c = _config()
  c.scenario.kind = "task"
  with pytest.raises(ValueError, match="class-incremental"):
    trace_initial_state(c, slca())
  c = _config()
  c.model.head = "cosine"
  with pytest.raises(ValueError, match="linear 'head'"):
    trace_initial_state(c, slca())
  c = _config()
  c.model.widths = (6000,)   # 10 x 6000 x 6000 = 360M floats
  with pytest.raises(ValueError, match=r"slca: 10 classes of 6000-dim.* "
                     r"covariances .*at most 250000000 floats"):
    trace_initial_state(c, slca())


def test_repeated_class_is_refused():
  """Refused at setup, before anything trains (a record passed in gets
  the check by its name since session 54); and by the hook itself as the
  second experience starts (the record under another name, past setup's
  check): the hooks driven by hand, with nothing trained in between
  (training does not touch which classes came)."""
  c = _config()
  sc = experiment.build_scenario(c)
  again = dataclasses.replace(sc, experiences=[sc.experiences[0],
                                               sc.experiences[0]])
  with pytest.raises(ValueError, match="strategy 'slca' learns each class "
                     "in one experience"):
    experiment.setup(c, strategy=slca(), scenario=again)
  s = experiment.setup(c, strategy=slca()._replace(name="my_slca"),
                       scenario=again)
  ctx, strategy = s.learner.ctx, s.learner.strategy
  state = strategy.before_experience(ctx, experiment.initial_state(s, 0),
                                     again.experiences[0])
  with pytest.raises(ValueError, match=r"brings classes \[0, 1\] again"):
    strategy.before_experience(ctx, state, again.experiences[1])


def test_train_mask_beside_replay_is_refused():
  c = _config()
  from jaxcl.strategies.replay import replay
  with pytest.raises(ValueError, match="train_mask=False"):
    jaxcl.run(c, strategy=jaxcl.chain(slca(), replay(mem_size=100)))


def test_experiment_config_variant():
  from experiments import split_mnist_prompt as cfg
  c = cfg.get_config("strategy=slca,pretrained=/x.npz")
  assert c.optimizer.name == "momentum" and c.optimizer.learning_rate == 0.01
  assert c.optimizer.weight_decay == 5e-4 and c.model.pretrained == "/x.npz"
  assert dict(c.strategy.slca) == dict(backbone_lr_scale=0.01)
  assert cfg.get_config("strategy=l2p").optimizer.learning_rate == 1e-3
  assert cfg.get_config("strategy=slca,lr=0.02").optimizer.learning_rate \
      == 0.02
