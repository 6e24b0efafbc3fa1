"""Tests of DualPrompt (jaxcl.strategies.dualprompt, jaxcl.models.vit's
DualPromptViT).

The references are written out here: the prompted forward through
``vit_reference`` with the G-prompt's and the chosen E-prompt's key / value
rows put in front of each block's projected keys / values by hand (G then
E where a block has both, as google-research/l2p's ``Encoder``); the
nearest key and the matching term by NumPy. Runs are Split Digits (8x8
images, patch 4, dim 16, depth 3: G-prompt in blocks 0-1, E-prompts in
blocks 1-2, so block 1 has both). The strategy is built from its module
(it is not registered by name here).
"""


import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import experiment, models, pretrained
from jaxcl.models.vit import DualPromptViT, ViT
from jaxcl.strategies import dualprompt as dp_module
from jaxcl.strategies.dualprompt import dualprompt
from jaxcl.strategies.replay import replay

import vit_reference
from partial_runs import (assert_predicts_the_seen_classes,
                          results_after_each, run_first,
                          trace_initial_state)

BACKBONE = dict(patch=4, dim=16, depth=3, heads=2, mlp_dim=32)
# Different G / E lengths, so a mixed-up length changes shapes.
DUAL = dict(pool_size=5, prompt="dualprompt", prompt_length=3,
            g_prompt_length=2, g_prompt_layers=(0, 1), prompt_layers=(1, 2))
G_LAYERS, E_LAYERS = (0, 1), (1, 2)



# Compiled once per (model, shape, flags) and shared by the tests: run op
# by op, a ViT's init and forward compile every operation on its own, the
# largest cost of these tests.
@functools.partial(jax.jit, static_argnums=(0,),
                   static_argnames=("train", "features", "method"))
def _apply(m, p, x, task=None, train=False, features=False, method=None):
  """``m.apply({"params": p}, x, task, ...)``, compiled."""
  if method is not None:
    return m.apply({"params": p}, x, method=method)
  return m.apply({"params": p}, x, task, train=train, features=features)


_tokens = jax.jit(vit_reference.tokens, static_argnums=(2, 3))


def _model(**kw):
  return models.build("vit", 10, **dict(BACKBONE, **dict(DUAL, **kw)))


def _params(m, seed=5):
  p = vit_reference.random_params(m, (1, 8, 8, 1), seed=seed)
  # A head of larger weights, so the logits show the feature.
  k = jax.random.normal(jax.random.PRNGKey(seed + 1), p["head"]["kernel"]
                        .shape)
  return {**p, "head": {"kernel": k, "bias": p["head"]["bias"] + 0.1}}


def _query(p, x):
  return np.asarray(_tokens(p["backbone"], x, 4, 3)[:, 0])


def _reference(p, x, idx, g_layers=G_LAYERS, e_layers=E_LAYERS):
  """(logits, CLS feature) with the G-prompt and E-prompt ``idx[b]`` of
  each row as prefix keys / values of their blocks."""
  g = np.asarray(p["g_prompt"])          # n_g, 2, L_g, D
  e = np.asarray(p["e_prompt"])          # n_e, M, 2, L_e, D
  b = x.shape[0]
  keys = [[] for _ in range(3)]
  values = [[] for _ in range(3)]
  for j, layer in enumerate(g_layers):
    keys[layer].append(np.repeat(g[j, 0][None], b, 0))
    values[layer].append(np.repeat(g[j, 1][None], b, 0))
  for j, layer in enumerate(e_layers):
    keys[layer].append(np.stack([e[j, i, 0] for i in idx]))
    values[layer].append(np.stack([e[j, i, 1] for i in idx]))
  prefixes = [None if not keys[i] else
              (jnp.asarray(np.concatenate(keys[i], 1)),
               jnp.asarray(np.concatenate(values[i], 1)))
              for i in range(3)]
  h = _tokens(p["backbone"], x, 4, 3, None, prefixes)[:, 0]
  return h @ p["head"]["kernel"] + p["head"]["bias"], h


def _cos(a, b):
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return a @ b.T


# ---------------------------------------------------------------------------
# The model.


def test_model_params_and_defaults(two_runs):
  m = _model()
  assert isinstance(m, DualPromptViT)
  assert (m.g_layers, m.e_layers, m.g_length, m.e_length) == \
      ((0, 1), (1, 2), 2, 3)
  # The initial parameters of the runs' model (this one): the init the
  # runs compiled, not one more.
  c, init = two_runs[:2]
  assert models.build("vit", 10, **c.model.vit) == m
  p = init.params
  assert p["g_prompt"].shape == (2, 2, 2, 16)
  assert p["e_prompt"].shape == (2, 5, 2, 3, 16)
  assert p["key"].shape == (5, 16)
  assert float(jnp.abs(p["head"]["kernel"]).max()) == 0.0
  # The references' defaults: G in blocks 0-1, E in 2-4 (cut to depth),
  # both of length 5.
  m = models.build("vit", 10, pool_size=5, prompt="dualprompt",
                   **dict(BACKBONE, depth=6))
  assert (m.g_layers, m.e_layers, m.g_length, m.e_length) == \
      ((0, 1), (2, 3, 4), 5, 5)
  m = models.build("vit", 10, pool_size=5, prompt="dualprompt", **BACKBONE)
  assert m.e_layers == (2,)


def test_forward_in_training_uses_the_given_e_prompt():
  """train=True: the row's task id picks its E-prompt; the G-prompt is in
  blocks 0-1, the E-prompt in 1-2 (block 1: both), the head on the CLS
  output. The keys play no part."""
  m = _model()
  p = _params(m)
  x = jax.random.normal(jax.random.PRNGKey(7), (3, 8, 8, 1))
  task = np.array([2, 0, 4])
  got = _apply(m, p, x, jnp.asarray(task), train=True)
  want, h = _reference(p, x, task)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
      _apply(m, p, x, jnp.asarray(task), train=True, features=True), h,
      rtol=1e-4, atol=1e-5)
  # Each part counts: another E-prompt, no G-prompt in the shared block,
  # no prompt at all all give other outputs.
  other, _ = _reference(p, x, np.array([1, 3, 0]))
  assert float(jnp.abs(got - other).max()) > 1e-2
  no_g1, _ = _reference({**p, "g_prompt": p["g_prompt"][:1]}, x, task,
                        g_layers=(0,))
  assert float(jnp.abs(got - no_g1).max()) > 1e-2
  plain = _query(p, x) @ np.asarray(p["head"]["kernel"]) + \
      np.asarray(p["head"]["bias"])
  assert float(jnp.abs(got - plain).max()) > 1e-2
  # The keys are not read in training.
  moved = {**p, "key": -p["key"] + 3.0}
  np.testing.assert_array_equal(
      _apply(m, moved, x, jnp.asarray(task), train=True), got)


def test_forward_at_test_time_selects_the_nearest_key():
  """train=False: the E-prompt of the key of highest cosine with the
  prompt-free CLS feature, whatever the task id."""
  m = _model()
  p = _params(m)
  x = jax.random.normal(jax.random.PRNGKey(8), (3, 8, 8, 1))
  q = _query(p, x)
  # Keys 3, 0, 4 planted near rows 0, 1, 2's queries (scaled: cosine
  # ignores the norm); keys 1, 2 random. Near, not on: 0.1 of a random
  # key off (0.01 left a cosine within float32 rounding of 1, a tie with
  # the exact key planted below).
  keys = np.asarray(p["key"]).copy()
  for row, k in ((0, 3), (1, 0), (2, 4)):
    keys[k] = 7.0 * q[row] + 0.1 * keys[k]
  p = {**p, "key": jnp.asarray(keys)}
  want_idx = np.argmax(_cos(q, keys), axis=1)
  assert want_idx.tolist() == [3, 0, 4]
  got_idx = _apply(m, p, x, method=DualPromptViT.select)
  assert np.asarray(got_idx).tolist() == [3, 0, 4]
  want, _ = _reference(p, x, want_idx)
  for task in (None, jnp.array([1, 1, 1])):
    np.testing.assert_allclose(_apply(m, p, x, task), want,
                               rtol=1e-4, atol=1e-4)
  # Moving key 3 to row 1's query moves row 1's choice.
  keys[3] = 9.0 * q[1]
  p = {**p, "key": jnp.asarray(keys)}
  assert np.asarray(_apply(m, p, x, method=DualPromptViT.select)
                    ).tolist()[1] == 3


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt_layers=(1, 3)), r"prompt_layers=\(1, 3\) .*depth=3"),
    (dict(prompt_layers=(1, 1)), "prompt_layers=.*distinct"),
    (dict(prompt_layers=()), "prompt_layers=.*at least one"),
    (dict(prompt_layers=2), "prompt_layers=2 must be"),
    (dict(g_prompt_layers=(0, -1)), r"g_prompt_layers=\(0, -1\)"),
    (dict(g_prompt_layers=(0.5,)), "g_prompt_layers"),
    (dict(prompt_length=0), "prompt_length"),
    (dict(g_prompt_length=-2), "g_prompt_length"),
    (dict(prompt_layers=None, depth=2), "default .*cut to depth=2"),
])
def test_bad_model_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.build("vit", 10, **dict(BACKBONE, **dict(DUAL, **kwargs)))


def test_g_prompt_fields_belong_to_dualprompt_only():
  for prompt in ("l2p", "coda"):
    with pytest.raises(ValueError, match="DualPrompt's"):
      models.build("vit", 10, pool_size=4, prompt=prompt,
                   g_prompt_layers=(0,), **BACKBONE)
  # No G-prompt (the paper's E-prompt-only ablation) is allowed.
  m = models.build("vit", 10, **dict(BACKBONE, **dict(
      DUAL, g_prompt_layers=())))
  p = _params(m)
  x = jax.random.normal(jax.random.PRNGKey(9), (2, 8, 8, 1))
  want, _ = _reference(p, x, np.array([1, 2]), g_layers=())
  np.testing.assert_allclose(
      _apply(m, p, x, jnp.array([1, 2]), train=True), want,
      rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------
# The strategy on Split Digits.


def _config(**vit):
  c = jaxcl.default_config()   # Split Digits, 5 experiences, batch 32
  c.model.name = "vit"
  c.model.vit = dict(BACKBONE, **dict(DUAL, **vit))
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-3
  c.report.progress = False
  c.strategy.name = "dualprompt"
  c.train.epochs = 1
  return c


_first = run_first


@pytest.fixture(scope="module")
def two_runs():
  """The same run stopped after one and after two experiences (AdamW with
  weight decay and no optimiser reset, which would move any parameter the
  restore missed)."""
  c = _config()
  c.optimizer.name = "adamw"
  c.optimizer.weight_decay = 0.1
  c.train.reset_optimizer = False
  s = experiment.setup(c, strategy=dualprompt())
  return (c, experiment.initial_state(s, c.seed),
          *results_after_each(c, 2, dualprompt()))


def _start(run, c, k):
  """The state as experience ``k`` (0-based) starts after ``run``."""
  ctx, strategy = run.learner.ctx, run.learner.strategy
  exps = experiment.build_scenario(c).experiences
  return strategy.before_experience(ctx, run.state, exps[k])


def test_backbone_is_frozen(two_runs):
  _, init, _, r2 = two_runs
  vit_reference.assert_backbone_unchanged(init.params, r2.state.params)


def test_only_the_current_e_prompt_and_key_train(two_runs):
  """After experience 2: E-prompt and key 0 as experience 1 left them,
  E-prompt and key 1 moved, 2-4 as initialised; the G-prompt and the head
  moved in both experiences."""
  c, init, r1, r2 = two_runs
  p0, p1, p2 = init.params, r1.state.params, r2.state.params
  e0, e1, e2 = (np.asarray(p["e_prompt"]) for p in (p0, p1, p2))
  k0, k1, k2 = (np.asarray(p["key"]) for p in (p0, p1, p2))
  # Experience 1 trained E-prompt / key 0 only.
  assert np.abs(e1[:, 0] - e0[:, 0]).max() > 1e-3
  assert np.abs(k1[0] - k0[0]).max() > 1e-3
  np.testing.assert_array_equal(e1[:, 1:], e0[:, 1:])
  np.testing.assert_array_equal(k1[1:], k0[1:])
  # Experience 2: index 0 kept, index 1 trained from its start, the rest
  # untouched.
  start = _start(r1, c, 1).params
  np.testing.assert_array_equal(e2[:, 0], e1[:, 0])
  np.testing.assert_array_equal(k2[0], k1[0])
  assert np.abs(e2[:, 1] - np.asarray(start["e_prompt"])[:, 1]).max() > 1e-3
  assert np.abs(k2[1] - k0[1]).max() > 1e-3
  np.testing.assert_array_equal(e2[:, 2:], e0[:, 2:])
  np.testing.assert_array_equal(k2[2:], k0[2:])
  for name in ("g_prompt", "head"):
    a, b, d = (np.concatenate([np.ravel(v) for v in jax.tree.leaves(
        p[name])]) for p in (p0, p1, p2))
    assert np.abs(b - a).max() > 1e-3 and np.abs(d - b).max() > 1e-3, name
  assert int(r2.state.strategy.task) == 1


@pytest.mark.parametrize("shared", [True, False, None])
def test_new_e_prompt_starts_from_the_previous_one(two_runs, shared):
  """shared_prompt_pool (the references', and the default: None): E-prompt
  1 starts as the trained E-prompt 0; its key does not. Off: from its
  initial draw."""
  c, init, r1, _ = two_runs
  ctx = r1.learner.ctx
  strategy = dualprompt() if shared is None else \
      dualprompt(shared_prompt_pool=shared)
  shared = shared is None or shared
  exps = experiment.build_scenario(c).experiences
  start = strategy.before_experience(ctx, r1.state, exps[1]).params
  e = np.asarray(start["e_prompt"])
  if shared:
    np.testing.assert_array_equal(e[:, 1], np.asarray(
        r1.state.params["e_prompt"])[:, 0])
  else:
    np.testing.assert_array_equal(e[:, 1], np.asarray(
        init.params["e_prompt"])[:, 1])
  np.testing.assert_array_equal(start["key"], r1.state.params["key"])
  np.testing.assert_array_equal(e[:, 0], np.asarray(
      r1.state.params["e_prompt"])[:, 0])


def test_training_step_uses_the_experiences_own_e_prompt(two_runs):
  """At experience 2 the prepared batch's incoming rows carry task id 1,
  the training logits are the forward with E-prompt 1, and the task loss's
  gradient reaches E-prompt 1 only (before any masking)."""
  c, _, r1, _ = two_runs
  ctx, strategy = r1.learner.ctx, r1.learner.strategy
  state = _start(r1, c, 1)
  # The new classes' head columns are still 0 (their kernel starts at 0),
  # which would give the prompts no gradient in this first step.
  state = state.replace(params={**state.params, "head": _params(
      ctx.model)["head"]})
  exps = experiment.build_scenario(c).experiences
  b = ctx.info.batch_size
  x = jnp.asarray(exps[1].train_x[:b])
  batch = {"x": x, "y": jnp.asarray(exps[1].train_y[:b]),
           "task": jnp.zeros(b, jnp.int32), "mask": jnp.ones(b)}
  # Two extra rows (as a replay member after this one would append) keep
  # their ids.
  extra = {k: jnp.concatenate([v, v[:2]]) for k, v in batch.items()}
  extra["task"] = extra["task"].at[b:].set(3)
  prepared = strategy.prepare_batch(ctx, state.strategy, extra, None)
  assert np.asarray(prepared["task"]).tolist() == [1] * b + [3, 3]
  batch = strategy.prepare_batch(ctx, state.strategy, batch, None)
  logits = jax.jit(lambda p, x, t: ctx.logits(p, {}, x, t, train=True))(
      state.params, batch["x"], batch["task"])
  m = ctx.model
  want = _apply(m, state.params, x, jnp.ones(b, jnp.int32), train=True)
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-6)
  # (E-prompt 0 is E-prompt 1's start: shared_prompt_pool copied it.)
  feats = [_apply(m, state.params, x, jnp.full(b, i, jnp.int32), train=True,
                  features=True) for i in (1, 2)]
  assert float(jnp.abs(feats[0] - feats[1]).max()) > 1e-3

  def total(params):
    out = ctx.logits(params, {}, batch["x"], batch["task"], train=True)
    return strategy.task_loss(ctx, state.strategy, out, batch)

  g = jax.jit(jax.grad(total))(state.params)
  ge = np.abs(np.asarray(g["e_prompt"])).max(axis=(0, 2, 3, 4))
  assert ge[1] > 0 and np.all(ge[[0, 2, 3, 4]] == 0), ge
  assert float(jnp.abs(g["key"]).max()) == 0.0      # no key in the forward
  assert float(jnp.abs(g["g_prompt"]).max()) > 0.0
  # With the two rows of task 3 (as replayed rows would be), E-prompt and
  # key 3 get a gradient too; update_grads keeps E-prompt / key 1's, the
  # G-prompt's and the head's, and no backbone.

  def with_extra(params):
    out = ctx.logits(params, {}, prepared["x"], prepared["task"],
                     train=True)
    return strategy.task_loss(ctx, state.strategy, out, prepared) + \
        strategy.loss(ctx, state.strategy, params, prepared, None)

  with pytest.raises(ValueError, match="train_mask=True beside"):
    jax.jit(with_extra)(state.params)   # the mask refuses the extra rows
  strategy = dualprompt(train_mask=False)
  g = jax.jit(jax.grad(with_extra))(state.params)
  for name, pool in (("key", np.asarray(g["key"])),
                     ("e_prompt", np.moveaxis(np.asarray(g["e_prompt"]),
                                              1, 0))):
    used = np.abs(pool.reshape(5, -1)).max(1) > 0
    assert used.tolist() == [False, True, False, True, False], name
  g = strategy.update_grads(ctx, state.strategy, g, state.params, prepared,
                            None)
  for name, pool in (("key", np.asarray(g["key"])),
                     ("e_prompt", np.moveaxis(np.asarray(g["e_prompt"]),
                                              1, 0))):
    used = np.abs(pool.reshape(5, -1)).max(1) > 0
    assert used.tolist() == [False, True, False, False, False], name
  assert float(jnp.abs(g["g_prompt"]).max()) > 0.0
  assert float(jnp.abs(g["head"]["kernel"]).max()) > 0.0
  assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(
      g["backbone"]))


def test_matching_loss_is_lam_times_the_formula(two_runs):
  """λ mean_b (1 - cos(q(x_b), k_{t_b})) over unmasked rows, with q the
  prompt-free CLS feature; its gradient reaches only the used keys."""
  c, _, r1, _ = two_runs
  ctx = r1.learner.ctx
  strategy = dualprompt(lam=0.7)
  state = _start(r1, c, 1)
  exps = experiment.build_scenario(c).experiences
  x = jnp.asarray(exps[1].train_x[:6])
  task = np.array([1, 1, 0, 3, 1, 1])
  mask = np.array([1, 1, 1, 1, 1, 0], np.float32)   # the last is padding
  batch = {"x": x, "y": jnp.zeros(6, jnp.int32), "task": jnp.asarray(task),
           "mask": jnp.asarray(mask)}
  p = state.params
  loss = jax.jit(lambda p: strategy.loss(ctx, state.strategy, p, batch,
                                         None))
  got = float(loss(p))
  q = _query(p, x)
  cos = _cos(q, np.asarray(p["key"]))[np.arange(6), task]
  want = 0.7 * np.sum((1 - cos) * mask) / mask.sum()
  np.testing.assert_allclose(got, want, rtol=1e-4)
  assert want > 0.05
  g = jax.jit(jax.grad(loss))(p)
  used = np.abs(np.asarray(g["key"])).max(1) > 0
  assert used.tolist() == [True, True, False, True, False]
  for name in ("e_prompt", "g_prompt", "backbone", "head"):
    assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(
        g[name])), name
  assert float(dualprompt(lam=0.0).loss(ctx, state.strategy, p, batch,
                                        None)) == 0.0
  # The default lam is the references' pull_constraint_coeff 1.0.
  default = jax.jit(lambda p: dualprompt().loss(ctx, state.strategy, p,
                                                batch, None))
  np.testing.assert_allclose(float(default(p)), want / 0.7, rtol=1e-4)


def test_prediction_selects_by_key_over_the_seen_classes(two_runs):
  """predict: the model's test-time forward (nearest key, whatever the task
  id) with the classes not seen masked out."""
  c, _, _, r2 = two_runs
  ctx, strategy = r2.learner.ctx, r2.learner.strategy
  exps = experiment.build_scenario(c).experiences
  tx = jnp.asarray(exps[3].test_x[:40])
  predict = jax.jit(lambda t: strategy.predict(
      ctx, r2.state.strategy, r2.state.params, {}, tx, t))
  logits = predict(jnp.zeros(40, jnp.int32))
  other = predict(jnp.full(40, 3, jnp.int32))
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(other))
  m = ctx.model
  idx = _apply(m, r2.state.params, tx, method=DualPromptViT.select)
  want = _apply(m, r2.state.params, tx, idx, train=True)
  seen = np.asarray(r2.state.strategy.seen | r2.state.strategy.current)
  assert seen.tolist() == [True] * 4 + [False] * 6
  np.testing.assert_allclose(np.asarray(logits)[:, seen],
                             np.asarray(want)[:, seen], rtol=1e-5,
                             atol=1e-5)
  assert np.all(np.asarray(logits)[:, ~seen] < -1e8)


def test_prediction_covers_every_class_seen_so_far():
  assert_predicts_the_seen_classes(experiment.setup(_config(),
                                                    strategy=dualprompt()))


@pytest.fixture(scope="module")
def unmasked_pretrained_run(tmp_path_factory):
  """One experience of dualprompt(train_mask=False) from a pretrained
  backbone (Adam without decay) chained with replay: one run for the
  mask, pretrained and replay checks below."""
  plain = models.build("vit", 10, **BACKBONE)
  p = vit_reference.random_params(plain, (1, 8, 8, 1), seed=42)
  path = pretrained.save(str(tmp_path_factory.mktemp("dual") / "bb.npz"), p)
  c = _config()
  init = experiment.initial_state(experiment.setup(
      c, strategy=dualprompt()), c.seed)
  return init, _first(c, 1, jaxcl.chain(
      dualprompt(train_mask=False, pretrained=path), replay(mem_size=40))), p


@pytest.mark.parametrize("train_mask", [True, False])
def test_train_mask(train_mask, two_runs, unmasked_pretrained_run):
  """With the mask only the first experience's two head columns move
  (two_runs' first experience: AdamW's decay leaves a zero column with no
  gradient at zero); without it (Adam), all do."""
  if train_mask:
    _, init, r, _ = two_runs
  else:
    init, r, _ = unmasked_pretrained_run
  vit_reference.assert_head_trained_under_mask(init.params, r.state.params,
                                               train_mask)


def test_train_mask_beside_replay_is_refused(unmasked_pretrained_run):
  """Refused at the first step's trace (nothing trains); without the mask
  the chain runs (unmasked_pretrained_run)."""
  c = _config()
  with pytest.raises(ValueError, match=r"train_mask=True beside a member "
                     r"that appends replayed rows \(the batch has 64 rows, "
                     r"32 incoming\)"):
    jaxcl.run(c, strategy=jaxcl.chain(dualprompt(), replay(mem_size=40)))
  r = unmasked_pretrained_run[1]
  assert np.isfinite(r.metrics["acc"])


def test_pretrained_backbone_is_loaded(unmasked_pretrained_run):
  _, r, p = unmasked_pretrained_run
  for a, b in zip(jax.tree.leaves(p["backbone"]),
                  jax.tree.leaves(r.state.params["backbone"])):
    np.testing.assert_array_equal(a, b)
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  q = _apply(r.learner.ctx.model, r.state.params, x,
             method=DualPromptViT.query)
  np.testing.assert_allclose(q, _apply(ViT(**BACKBONE), p["backbone"], x,
                                       method=ViT.__call__), rtol=1e-6)


def test_bad_arguments_and_models(tmp_path):
  with pytest.raises(ValueError, match="dualprompt: lam"):
    dualprompt(lam=-0.1)
  with pytest.raises(ValueError, match="train_mask"):
    dualprompt(train_mask="yes")
  with pytest.raises(ValueError, match="shared_prompt_pool"):
    dualprompt(shared_prompt_pool=1)
  with pytest.raises(ValueError, match="does not exist"):
    dualprompt(pretrained=str(tmp_path / "none.npz"))
  for vit in (dict(BACKBONE, pool_size=10),                      # L2P's
              dict(BACKBONE, pool_size=10, prompt="coda",
                   prompt_length=4),
              dict(BACKBONE)):                                  # plain
    c = _config()
    c.model.vit = vit
    with pytest.raises(ValueError, match="prompt='dualprompt'"):
      trace_initial_state(c, dualprompt())
  with pytest.raises(ValueError, match=r"pool_size=4 E-prompts for a stream "
                     r"of 5 experiences"):
    trace_initial_state(_config(pool_size=4), dualprompt())
  assert dp_module.PARTS == ("backbone", "g_prompt", "e_prompt", "key",
                             "head")


def test_experiment_config_variant():
  from experiments import split_mnist_prompt as cfg
  c = cfg.get_config("strategy=dualprompt,pretrained=/x.npz")
  assert c.model.vit["prompt"] == "dualprompt"
  assert c.model.vit["pool_size"] == 5
  assert dict(c.strategy.dualprompt) == {"pretrained": "/x.npz", "lam": 1.0}
  assert c.model.pretrained == ""
  m = models.build("vit", 10, **c.model.vit)
  assert (m.g_layers, m.e_layers, m.g_length, m.e_length) == \
      ((0, 1), (2, 3), 5, 5)
