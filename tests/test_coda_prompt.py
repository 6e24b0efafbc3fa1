"""Tests of CODA-Prompt (jaxcl.strategies.coda_prompt) and the ViT's
prefix-tuning (jaxcl.models.vit: PrefixAttention, CodaViT).

The references are written out here: attention and a ViT forward from the
parameters in NumPy-free jnp with the prefix keys / values placed as the
authors' ``Attention.forward`` places them (after the key / value
projections, before the tokens' rows); the component weights, the
Gram-Schmidt and the orthogonality term by their formulas. Runs are Split
Digits (8x8 images, patch 4, dim 16).
"""



import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import experiment, models, pretrained
from jaxcl.models.vit import CodaViT, PrefixAttention, ViT, coda_weights
from jaxcl.strategies import coda_prompt as coda_module
from jaxcl.strategies.coda_prompt import (coda_prompt, gram_schmidt,
                                          ortho_penalty)

import vit_reference
from partial_runs import (assert_predicts_the_seen_classes,
                          results_after_each, run_first,
                          trace_initial_state)

SMALL = dict(patch=4, dim=16, depth=2, heads=2, mlp_dim=32)
CODA = dict(pool_size=10, prompt="coda", prompt_length=4)



_attention = vit_reference.attention


def _tokens_jit(p, x, patch, depth, prefixes=None):
  return vit_reference.tokens(p, x, patch, depth, prefixes=prefixes)


_tokens_jit = jax.jit(_tokens_jit, static_argnums=(2, 3))


def _cls_feature(p, x, patch, depth, prefixes=None):
  # Compiled (one program per prefix layout), not run op by op.
  return _tokens_jit(p, x, patch, depth, prefixes)[:, 0]


def _cos_weights(q, keys, attn):
  """α[b, m] = cos(q_b * A_m, K_m), by loops."""
  out = np.zeros((q.shape[0], keys.shape[0]))
  for b in range(q.shape[0]):
    for m in range(keys.shape[0]):
      a = q[b] * attn[m]
      out[b, m] = a @ keys[m] / np.linalg.norm(a) / np.linalg.norm(keys[m])
  return out


# ---------------------------------------------------------------------------
# Prefix attention.


def test_prefix_attention_without_prefix_is_flax_attention():
  """Same param names, shapes and initial values as flax's module, and the
  same outputs on the same params (so plain-ViT checkpoints still load and
  old runs are unchanged)."""
  xavier = nn.initializers.xavier_uniform()
  ours = PrefixAttention(heads=4, kernel_init=xavier)
  flax_mha = nn.MultiHeadDotProductAttention(num_heads=4, kernel_init=xavier)
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 7, 32))
  # Compiled inits (op by op, each random op compiles on its own); the
  # same program for both modules, so the same values.
  p = jax.jit(ours.init)(jax.random.PRNGKey(1), x)["params"]
  pf = jax.jit(flax_mha.init)(jax.random.PRNGKey(1), x, x)["params"]
  assert jax.tree.structure(p) == jax.tree.structure(pf)
  for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(pf)):
    np.testing.assert_array_equal(a, b)
  assert p["query"]["kernel"].shape == (32, 4, 8)
  assert p["out"]["kernel"].shape == (4, 8, 32)
  # Non-zero biases, so a missed bias would show.
  p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(
      jax.random.PRNGKey(2), a.shape), p)
  np.testing.assert_allclose(ours.apply({"params": p}, x),
                             flax_mha.apply({"params": p}, x, x),
                             rtol=1e-6, atol=1e-6)


def test_prefix_attention_with_a_prefix_is_the_hand_computation():
  m = PrefixAttention(heads=2)
  x = jax.random.normal(jax.random.PRNGKey(3), (2, 5, 8))
  p = jax.jit(m.init)(jax.random.PRNGKey(4), x)["params"]
  p = jax.tree.map(lambda a: a + 0.1 * jax.random.normal(
      jax.random.PRNGKey(5), a.shape), p)
  pk = jax.random.normal(jax.random.PRNGKey(6), (2, 3, 8))
  pv = jax.random.normal(jax.random.PRNGKey(7), (2, 3, 8))
  got = m.apply({"params": p}, x, (pk, pv))
  assert got.shape == (2, 5, 8)                      # no extra tokens
  np.testing.assert_allclose(got, _attention(p, x, (pk, pv)), rtol=1e-5,
                             atol=1e-5)
  # The prefix counts, and keys and values are not interchangeable.
  plain = m.apply({"params": p}, x)
  assert float(jnp.abs(got - plain).max()) > 1e-2
  swapped = m.apply({"params": p}, x, (pv, pk))
  assert float(jnp.abs(got - swapped).max()) > 1e-2
  with pytest.raises(ValueError, match="prefix keys and values"):
    m.apply({"params": p}, x, (pk, pv[:, :2]))


# ---------------------------------------------------------------------------
# The CODA model: weights and the prompted forward.


def test_weights_are_the_cosine_of_the_attended_query_with_the_key():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(4, 6)).astype(np.float32)
  keys = rng.normal(size=(5, 6)).astype(np.float32) * \
      rng.uniform(0.1, 5, size=(5, 1)).astype(np.float32)
  attn = rng.normal(size=(5, 6)).astype(np.float32)
  got = np.asarray(coda_weights(jnp.asarray(q), jnp.asarray(keys),
                                jnp.asarray(attn)))
  want = _cos_weights(q, keys, attn)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # Without A (plain cosine) the weights differ.
  plain = _cos_weights(q, keys, np.ones_like(attn))
  assert np.abs(plain - want).max() > 0.1


def test_coda_forward_equals_the_reference():
  """α per layer from the prompt-free query, p = Σ α P, halves as prefix
  keys / values of the prompted blocks only; head on the CLS output."""
  m = models.build("vit", 10, pool_size=6, prompt="coda", prompt_length=4,
                   prompt_layers=(1,), **SMALL)
  assert isinstance(m, CodaViT) and m.layers == (1,)
  p = vit_reference.random_params(m, (1, 8, 8, 1), seed=5)
  assert p["prompt"].shape == (1, 6, 4, 16)
  assert p["key"].shape == p["attn"].shape == (1, 6, 16)
  x = jax.random.normal(jax.random.PRNGKey(7), (3, 8, 8, 1))
  # (logits, feature) in one compiled program, for both parameter sets.
  forward = jax.jit(lambda p: (m.apply({"params": p}, x),
                               m.apply({"params": p}, x, features=True)))
  q = np.asarray(_cls_feature(p["backbone"], x, 4, 2))
  alpha = _cos_weights(q, np.asarray(p["key"][0]), np.asarray(p["attn"][0]))
  pr = np.einsum("bm,mld->bld", alpha, np.asarray(p["prompt"][0]))
  pre = (jnp.asarray(pr[:, :2], jnp.float32), jnp.asarray(pr[:, 2:],
                                                          jnp.float32))
  h = _cls_feature(p["backbone"], x, 4, 2, prefixes=[None, pre])
  want = h @ p["head"]["kernel"] + p["head"]["bias"]
  logits, feature = forward(p)
  np.testing.assert_allclose(logits, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(feature, h, rtol=1e-4, atol=1e-5)
  # The prompt changes the output (else the test above says little).
  plain = _cls_feature(p["backbone"], x, 4, 2)
  assert float(jnp.abs(plain - h).max()) > 1e-3
  # Later components at P = 0 (how the strategy keeps them unused) give
  # the reference's forward over the first f components only, whatever
  # their K and A.
  f = 3
  later = {**p, "prompt": p["prompt"].at[:, f:].set(0.0),
           "key": p["key"].at[:, f:].add(5.0),
           "attn": p["attn"].at[:, f:].multiply(-2.0)}
  alpha = _cos_weights(q, np.asarray(p["key"][0, :f]),
                       np.asarray(p["attn"][0, :f]))
  pr = np.einsum("bm,mld->bld", alpha, np.asarray(p["prompt"][0, :f]))
  pre = (jnp.asarray(pr[:, :2], jnp.float32), jnp.asarray(pr[:, 2:],
                                                          jnp.float32))
  np.testing.assert_allclose(
      forward(later)[1],
      _cls_feature(p["backbone"], x, 4, 2, prefixes=[None, pre]),
      rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompt="dual"), "unknown prompt='dual'"),
    (dict(prompt="coda", prompt_length=5), "prompt_length=5 must be even"),
    (dict(prompt="coda", prompt_layers=(0, 4)), "prompt_layers=.*depth=2"),
    (dict(prompt="coda", prompt_layers=(1, 1)), "distinct"),
    (dict(prompt="l2p", prompt_layers=(0,)), "prompt_layers=.*CODA"),
])
def test_bad_model_arguments(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.build("vit", 10, pool_size=4, **dict(SMALL, **kwargs))
  with pytest.raises(ValueError, match="several heads|num_heads=3"):
    models.build("vit", 10, num_heads=3, pool_size=4, prompt="coda",
                 **SMALL)


def test_default_prompt_layers_are_the_first_five_cut_to_depth():
  m = models.build("vit", 10, pool_size=4, prompt="coda",
                   **dict(SMALL, depth=7))
  assert m.layers == (0, 1, 2, 3, 4) and m.prompt_length == 8
  m = models.build("vit", 10, pool_size=4, prompt="coda", **SMALL)
  assert m.layers == (0, 1)


# ---------------------------------------------------------------------------
# Gram-Schmidt and the orthogonality term.


def test_gram_schmidt_is_the_reference_formula():
  rng = np.random.default_rng(1)
  old = np.linalg.qr(rng.normal(size=(9, 3)))[0].T      # 3 orthonormal rows
  rows = np.concatenate([old, rng.normal(size=(4, 9))]).astype(np.float32)
  draws = rng.normal(size=(2, 9))
  got = gram_schmidt(rows, 3, 5, draws)
  np.testing.assert_array_equal(got[:3], rows[:3])      # earlier rows kept
  np.testing.assert_array_equal(got[5:], rows[5:])      # later rows kept
  u = list(rows[:3].astype(np.float64))
  for v in draws:
    u.append(v - sum((v @ w) / (w @ w) * w for w in u))
  want = np.array(u[3:]) / np.linalg.norm(u[3:], axis=1, keepdims=True)
  np.testing.assert_allclose(got[3:5], want, rtol=1e-5, atol=1e-6)
  # Orthonormal to everything before them.
  g = got[:5] @ got[:5].T
  np.testing.assert_allclose(g, np.eye(5), atol=1e-5)
  # A zero row before the slice: the reference would redraw forever.
  zero_row = np.zeros((4, 3), np.float32)
  zero_row[0] = 1.0
  with pytest.raises(ValueError, match="row 1 is .*zero"):
    gram_schmidt(zero_row, 2, 3, rng.normal(size=(1, 3)))


def test_ortho_term_is_the_formula_over_the_used_rows():
  rng = np.random.default_rng(2)
  t = rng.normal(size=(6, 5)).astype(np.float32)
  used = np.array([1, 1, 1, 1, 0, 0], bool)
  got = float(ortho_penalty(jnp.asarray(t), jnp.asarray(used)))
  b = t[:4]
  want = np.mean((b @ b.T - np.eye(4)) ** 2)
  np.testing.assert_allclose(got, want, rtol=1e-5)


# ---------------------------------------------------------------------------
# The strategy on Split Digits.


def _config(**strategy):
  c = jaxcl.default_config()   # Split Digits, 5 experiences, batch 32
  c.model.name = "vit"
  c.model.vit = dict(SMALL, **CODA)
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-3
  c.report.progress = False
  c.strategy.name = "coda_prompt"
  # n_tasks given: the runs below stop after one or two experiences, and
  # the components are still split for the stream's five.
  c.strategy.coda_prompt = {"n_tasks": 5, **strategy}
  c.train.epochs = 1
  return c


def _first(c, n):
  return run_first(c, n)


@pytest.fixture(scope="module")
def two_runs():
  """The same run stopped after one and after two experiences (AdamW with
  weight decay, which would move any parameter the restore missed)."""
  c = _config()
  c.optimizer.name = "adamw"
  c.optimizer.weight_decay = 0.1
  s = experiment.setup(c)
  return (c, experiment.initial_state(s, c.seed), *results_after_each(c, 2))


def test_only_the_current_slice_trains(two_runs):
  """M=10 over 5 experiences: 2 components each. After experience 2,
  slice 0 is as experience 1 left it, slice 1 moved from its Gram-Schmidt
  start, slices 2-4 were never touched (P = 0, K and A as initialised)."""
  c, init, r1, r2 = two_runs
  ctx, strategy = r1.learner.ctx, r1.learner.strategy
  exps = experiment.build_scenario(c).experiences
  start2 = strategy.before_experience(ctx, r1.state, exps[1]).params
  for name in ("prompt", "key", "attn"):
    p1 = np.asarray(r1.state.params[name])
    p2 = np.asarray(r2.state.params[name])
    np.testing.assert_array_equal(p2[:, :2], p1[:, :2], err_msg=name)
    assert np.abs(p2[:, 2:4] - np.asarray(start2[name])[:, 2:4]).max() > \
        1e-3, name
    # Slice 0 trained in experience 1.
    s1 = strategy.before_experience(ctx, init, exps[0]).params[name]
    assert np.abs(p1[:, :2] - np.asarray(s1)[:, :2]).max() > 1e-3, name
    if name == "prompt":
      assert np.all(p2[:, 4:] == 0)
    else:
      np.testing.assert_array_equal(p2[:, 4:],
                                    np.asarray(init.params[name])[:, 4:])
  assert np.asarray(r2.state.strategy.active).tolist() == \
      [False, False, True, True] + [False] * 6
  assert np.asarray(r2.state.strategy.used).tolist() == [True] * 4 + \
      [False] * 6


def test_new_slice_is_gram_schmidt_against_the_earlier_ones(two_runs):
  c, _, r1, _ = two_runs
  ctx, strategy = r1.learner.ctx, r1.learner.strategy
  exps = experiment.build_scenario(c).experiences
  p = strategy.before_experience(ctx, r1.state, exps[1]).params
  for name in ("prompt", "key", "attn"):
    flat = np.asarray(p[name]).reshape(2, 10, -1)
    old = np.asarray(r1.state.params[name]).reshape(2, 10, -1)
    for layer in range(2):
      new = flat[layer, 2:4]
      np.testing.assert_allclose(np.linalg.norm(new, axis=1), 1, atol=1e-5)
      # Nearly orthogonal to each other and to the trained rows before
      # them: classical Gram-Schmidt (the reference's) projects each draw
      # on every earlier row, which is exact only when those rows are
      # orthogonal to each other, and trained rows no longer quite are.
      np.testing.assert_allclose(new[0] @ new[1], 0, atol=0.02)
      unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
      np.testing.assert_allclose(new @ unit(old[layer, :2]).T, 0,
                                 atol=0.02)
      # ... where the rows they replace were far from it (K, A: U(0, 1);
      # P: kept at 0 until now).
      if name == "prompt":
        assert np.all(old[layer, 2:4] == 0)
      else:
        assert np.abs(unit(old[layer, 2:4]) @ unit(old[layer, :2]).T).max() \
            > 0.1


def test_gradient_reaches_only_the_current_slice(two_runs):
  c, _, r1, _ = two_runs
  ctx, strategy = r1.learner.ctx, r1.learner.strategy
  exps = experiment.build_scenario(c).experiences
  state = strategy.before_experience(ctx, r1.state, exps[1])
  x = jnp.asarray(exps[1].train_x[:16])
  y = jnp.asarray(exps[1].train_y[:16])

  def total(params):
    logits = ctx.model.apply({"params": params}, x)
    return strategy.task_loss(ctx, state.strategy, logits,
                              {"y": y, "mask": jnp.ones(16)})

  g = jax.jit(jax.grad(total))(state.params)
  # Later components' K and A get no gradient by themselves (their P is
  # 0); their P and the earlier components do ...
  for name in ("key", "attn"):
    assert float(jnp.abs(g[name][:, 4:]).max()) == 0.0, name
  for name in ("prompt", "key", "attn"):
    assert float(jnp.abs(g[name][:, :2]).max()) > 0.0, name
    assert float(jnp.abs(g[name][:, 2:4]).max()) > 0.0, name
  assert float(jnp.abs(g["prompt"][:, 4:]).max()) > 0.0
  # ... and update_grads keeps the current slice's only, and no backbone.
  g = strategy.update_grads(ctx, state.strategy, g, state.params, {}, None)
  for name in ("prompt", "key", "attn"):
    assert float(jnp.abs(g[name][:, :2]).max()) == 0.0, name
    assert float(jnp.abs(g[name][:, 4:]).max()) == 0.0, name
    assert float(jnp.abs(g[name][:, 2:4]).max()) > 0.0, name
  assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(
      g["backbone"]))
  assert float(jnp.abs(g["head"]["kernel"]).max()) > 0.0


def test_backbone_is_frozen(two_runs):
  _, init, _, r2 = two_runs
  vit_reference.assert_backbone_unchanged(init.params, r2.state.params)


def test_strategy_loss_is_mu_times_the_ortho_formula(two_runs):
  _, _, r1, _ = two_runs
  c = _config(ortho_mu=0.3)
  s = experiment.setup(c)
  ctx, strategy = s.learner.ctx, s.learner.strategy
  exps = s.scenario.experiences
  # r1's params (slice 0 trained) with this strategy's state, at
  # experience 2: rows 0-3 used.
  state = strategy.before_experience(ctx, r1.state.replace(
      strategy=strategy.init(ctx, None, r1.state.params)._replace(
          task=jnp.asarray(1, jnp.int32))), exps[1])
  got = float(strategy.loss(ctx, state.strategy, state.params, {}, None))
  want = 0.0
  for name in ("prompt", "key", "attn"):
    flat = np.asarray(state.params[name], np.float64).reshape(2, 10, -1)
    for layer in range(2):
      b = flat[layer, :4]        # f = 2 experiences x 2 components
      want += np.mean((b @ b.T - np.eye(4)) ** 2)
  np.testing.assert_allclose(got, 0.3 * want, rtol=1e-4)
  assert want > 1e-3       # trained slice 0 is not orthonormal any more
  # ortho_mu = 0 (the default): no term.
  assert float(r1.learner.strategy.loss(ctx, state.strategy, state.params,
                                        {}, None)) == 0.0


def test_each_experience_draws_its_slice_afresh():
  """Untrained, three experiences started in a row: the used rows of every
  part and layer stay orthonormal (each slice is a new draw, made
  orthogonal to the slices before it: the same draws again would leave
  nothing after the projection), and the first slice's draws differ
  between parts and between layers."""
  c = _config()
  s = experiment.setup(c)
  ctx, strategy = s.learner.ctx, s.learner.strategy
  state = experiment.initial_state(s, c.seed)
  for t, e in enumerate(s.scenario.experiences[:3]):
    state = strategy.before_experience(ctx, state, e)
    f = 2 * (t + 1)
    for name in ("prompt", "key", "attn"):
      flat = np.asarray(state.params[name], np.float64).reshape(2, 10, -1)
      for layer in range(2):
        b = flat[layer, :f]
        np.testing.assert_allclose(b @ b.T, np.eye(f), atol=1e-5,
                                   err_msg=f"{name} {layer} {t}")
      if t == 0:
        assert np.abs(flat[0, :2] - flat[1, :2]).max() > 0.1, name
    if t == 0:
      k, a = (np.asarray(state.params[n])[:, :2] for n in ("key", "attn"))
      assert np.abs(k - a).max() > 0.1


def test_default_n_tasks_is_the_streams_experiences():
  """n_tasks=0: M=10 components over Split Digits' 5 experiences, two
  per experience."""
  c = _config()
  s = experiment.setup(c, strategy=coda_prompt())
  ctx, strategy = s.learner.ctx, s.learner.strategy
  state = experiment.initial_state(s, c.seed)
  for t, e in enumerate(s.scenario.experiences[:2]):
    state = strategy.before_experience(ctx, state, e)
    m = np.arange(10)
    assert np.asarray(state.strategy.active).tolist() == \
        ((m >= 2 * t) & (m < 2 * t + 2)).tolist()


def test_the_weights_send_no_gradient_into_the_backbone():
  """α is computed from the frozen model's query (no gradient): only K and
  A receive one."""
  m = models.build("vit", 10, **dict(SMALL, **CODA))
  p = vit_reference.random_params(m, (1, 8, 8, 1), seed=2)
  x = jax.random.normal(jax.random.PRNGKey(3), (3, 8, 8, 1))
  g = jax.jit(jax.grad(lambda p: jnp.sum(m.apply(
      {"params": p}, x, method=CodaViT.weights) ** 2)))(p)
  assert all(float(jnp.abs(a).max()) == 0 for a in jax.tree.leaves(
      g["backbone"]))
  assert float(jnp.abs(g["key"]).max()) > 0
  assert float(jnp.abs(g["attn"]).max()) > 0


def test_prediction_covers_every_class_seen_so_far():
  assert_predicts_the_seen_classes(experiment.setup(_config()))


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory):
  """One experience (Adam without decay, train_mask=True) from a
  pretrained backbone: one run for the mask and the pretrained checks."""
  plain = models.build("vit", 10, **SMALL)
  p = vit_reference.random_params(plain, (1, 8, 8, 1), seed=42)
  path = pretrained.save(str(tmp_path_factory.mktemp("coda") / "bb.npz"), p)
  c = _config(pretrained=path)
  init = experiment.initial_state(experiment.setup(c), c.seed)
  return c, init, _first(c, 1), p


@pytest.fixture(scope="module")
def unmasked_replay_run():
  """One experience of coda_prompt(train_mask=False)+replay (Adam without
  decay): one run for the unmasked head and the replay checks. Replay's
  rows are all padding in the first experience: the head sees the
  incoming rows only, as coda_prompt alone would."""
  c = _config(train_mask=False)
  c.strategy.name = "coda_prompt+replay"
  c.strategy.replay = dict(mem_size=40)
  init = experiment.initial_state(experiment.setup(c), c.seed)
  return c, init, _first(c, 1)


@pytest.mark.parametrize("train_mask", [True, False])
def test_train_mask_and_prediction_over_seen_classes(train_mask, request):
  """Adam without decay: with the mask, only the first experience's two
  head columns move; without it, all do. Prediction is over the classes
  seen, whatever the task id."""
  if train_mask:
    c, init, r, _ = request.getfixturevalue("pretrained_run")
  else:
    c, init, r = request.getfixturevalue("unmasked_replay_run")
  vit_reference.assert_head_trained_under_mask(init.params, r.state.params,
                                               train_mask)
  if not train_mask:
    return
  ctx, strategy = r.learner.ctx, r.learner.strategy
  tx = jnp.asarray(experiment.build_scenario(c).experiences[3].test_x)
  predict = jax.jit(lambda t: strategy.predict(
      ctx, r.state.strategy, r.state.params, {}, tx, t))
  logits = predict(jnp.zeros(len(tx), jnp.int32))
  assert set(np.unique(np.asarray(logits).argmax(1))) <= {0, 1}
  other = predict(jnp.full(len(tx), 3, jnp.int32))
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(other))


def test_train_mask_beside_replay_is_refused(unmasked_replay_run):
  """As l2p's: the masked loss beside replayed rows is refused at the first
  step's trace (nothing trains); without the mask the chain runs
  (unmasked_replay_run)."""
  c = _config()
  c.strategy.name = "coda_prompt+replay"
  c.strategy.replay = dict(mem_size=40)
  with pytest.raises(ValueError, match=r"train_mask=True beside a member "
                     r"that appends replayed rows \(the batch has 64 rows, "
                     r"32 incoming\)"):
    jaxcl.run(c)
  r = unmasked_replay_run[2]
  assert np.isfinite(r.metrics["acc"])


def test_pretrained_backbone_is_loaded(pretrained_run):
  _, _, r, p = pretrained_run
  for a, b in zip(jax.tree.leaves(p["backbone"]),
                  jax.tree.leaves(r.state.params["backbone"])):
    np.testing.assert_array_equal(a, b)


def test_bad_arguments_and_models(tmp_path):
  with pytest.raises(ValueError, match="ortho_mu"):
    coda_prompt(ortho_mu=-1.0)
  with pytest.raises(ValueError, match="n_tasks"):
    coda_prompt(n_tasks=1.5)
  with pytest.raises(ValueError, match="train_mask"):
    coda_prompt(train_mask="yes")
  with pytest.raises(ValueError, match="does not exist"):
    coda_prompt(pretrained=str(tmp_path / "none.npz"))
  c = _config()
  c.model.vit = dict(SMALL, pool_size=10)          # L2P's model
  with pytest.raises(ValueError, match="prompt='coda'"):
    trace_initial_state(c)
  c = _config()
  c.model.vit = dict(SMALL, pool_size=20, prompt="coda", prompt_length=4)
  with pytest.raises(ValueError, match="pool_size <= 16"):
    trace_initial_state(c)
  c = _config()
  c.model.vit = dict(SMALL, pool_size=4, prompt="coda", prompt_length=4)
  with pytest.raises(ValueError, match="pool_size=4 .* n_tasks=5"):
    trace_initial_state(c)
  # The second experience's start refuses (jaxcl.run would train the
  # first experience before it).
  c = _config(n_tasks=1)
  s = experiment.setup(c)
  ctx, strategy = s.learner.ctx, s.learner.strategy
  state = experiment.initial_state(s, c.seed)
  exps = s.scenario.experiences
  state = strategy.before_experience(ctx, state, exps[0])
  with pytest.raises(ValueError, match="experience 2 .* n_tasks=1"):
    strategy.before_experience(ctx, state, exps[1])
  assert jaxcl.strategies.get("coda_prompt").name == "coda_prompt"
  assert coda_module.PARTS == ("backbone", "prompt", "key", "attn", "head")


def test_plain_vit_params_load_into_the_coda_backbone():
  plain = models.build("vit", 10, **SMALL)
  p = vit_reference.random_params(plain, (1, 8, 8, 1), seed=3)
  coda = models.build("vit", 10, **dict(SMALL, **CODA))
  pc = vit_reference.random_params(coda, (1, 8, 8, 1))
  assert jax.tree.structure(p["backbone"]) == \
      jax.tree.structure(pc["backbone"])
  for a, b in zip(jax.tree.leaves(p["backbone"]),
                  jax.tree.leaves(pc["backbone"])):
    assert a.shape == b.shape
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 1))
  q, plain_q = jax.jit(lambda pc, pb: (
      coda.apply({"params": {**pc, "backbone": pb}}, x,
                 method=CodaViT.query),
      ViT(**SMALL).apply({"params": pb}, x)))(pc, p["backbone"])
  np.testing.assert_allclose(q, plain_q, rtol=1e-6)


def test_experiment_config_variant():
  from experiments import split_mnist_prompt as cfg
  c = cfg.get_config("strategy=coda_prompt,pretrained=/x.npz")
  assert c.model.vit["prompt"] == "coda" and c.model.vit["pool_size"] == 50
  assert c.model.vit["prompt_length"] == 8
  assert dict(c.strategy.coda_prompt) == {"pretrained": "/x.npz",
                                          "ortho_mu": 0.0}
  assert c.model.pretrained == ""
