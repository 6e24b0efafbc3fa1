"""The strategy registry (``jaxcl.strategies``: available, get, from_spec,
defaults, summary) and the shared quadratic-penalty pieces
(``jaxcl.strategies._penalty``), each checked against a value computed
another way: the package directory listed by hand, the modules' docstrings
parsed with ``ast``, and the penalty / Fisher / MAS importance of a linear
softmax model in closed form with NumPy."""

from __future__ import annotations

import ast
import math
import os
import types

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jaxcl.strategies as strategies
from jaxcl import models, scenarios
from jaxcl.strategies import _penalty
from jaxcl.train import (experience_batches, init_state, make_context,
                         make_optimizer, stream_info)

from conftest import np_softmax

STRATEGY_DIR = os.path.dirname(strategies.__file__)


# --------------------------------------------------------------------------
# Registry.


def test_available_is_the_sorted_public_modules():
  want = sorted(f[:-3] for f in os.listdir(STRATEGY_DIR)
                if f.endswith(".py") and not f.startswith("_"))
  assert strategies.available() == want
  assert "_penalty" not in strategies.available()


@pytest.mark.parametrize("name", ["ewcc", "_penalty", "Ewc", ""])
def test_get_refuses_unknown_and_private_names(name):
  with pytest.raises(ValueError, match=f"unknown strategy {name!r}; valid"):
    strategies.get(name)
  with pytest.raises(ValueError, match=f"unknown strategy {name!r}"):
    strategies.defaults(name)


def test_get_passes_arguments_and_wraps_bad_ones():
  assert strategies.get("ewc").name == "ewc"
  # The argument reaches the factory (whose own check refuses it) ...
  with pytest.raises(ValueError, match="ewc: unknown Fisher type 'bogus'"):
    strategies.get("ewc", fisher="bogus")
  # ... and a name the factory does not take is a ValueError naming it.
  with pytest.raises(ValueError, match="bad arguments for strategy 'ewc'"):
    strategies.get("ewc", lamda=1.0)


def test_defaults_are_the_documented_signature():
  # ewc's signature as documented (docs/methods.md, `jaxcl methods ewc`).
  assert strategies.defaults("ewc") == dict(
      lam=100.0, fisher="exact", max_examples=1000, batch_size=32, seed=0)
  assert strategies.defaults("naive") == {}


@pytest.mark.parametrize("name", ["ewc", "mas", "replay", "naive"])
def test_summary_is_the_module_docstrings_first_line(name):
  with open(os.path.join(STRATEGY_DIR, f"{name}.py")) as f:
    doc = ast.get_docstring(ast.parse(f.read()))
  assert strategies.summary(name) == doc.splitlines()[0].strip()


def test_describe_says_paper_and_needs_only_where_given():
  ewc_doc = strategies.describe("ewc")
  assert "Paper: Kirkpatrick" in ewc_doc and "Needs:" not in ewc_doc
  mh = strategies.describe("multihead")
  assert "Needs: task ids" in mh and "Paper:" not in mh



def test_doc_section_keeps_blank_lines_and_stops_at_the_next_section():
  doc = ("Summary.\n\nArgs:\n  a: first,\n    continued.\n\n  b: second."
         "\n\nReturns:\n  nothing.")
  assert strategies._doc_section(doc, "Args") == (
      "a: first,\n  continued.\n\nb: second.")
  assert strategies._doc_section(doc, "Returns") == "nothing."
  assert strategies._doc_section(doc, "Raises") == ""

@pytest.mark.parametrize("spec,name", [
    ("ewc", "ewc"), (" ewc + replay ", "ewc+replay"),
    ("ewc++replay+", "ewc+replay"), ("mas+ewc", "mas+ewc")])
def test_from_spec_parses_names_in_order(spec, name):
  strategy, scenario_fn = strategies.from_spec(spec)
  assert strategy.name == name
  assert scenario_fn("a scenario") == "a scenario"  # no member changes it


@pytest.mark.parametrize("spec", ["", " ", "+", " + "])
def test_from_spec_refuses_an_empty_spec(spec):
  with pytest.raises(ValueError, match="empty strategy spec"):
    strategies.from_spec(spec)


def test_from_spec_refuses_unknown_names_and_stray_arguments():
  with pytest.raises(ValueError, match="unknown strategy 'ewcc'"):
    strategies.from_spec("ewcc+replay")
  with pytest.raises(ValueError, match=r"hyperparameters given for \['mas'\]"
                     r", which are not in the strategy spec 'ewc\+replay'"):
    strategies.from_spec("ewc+replay", {"mas": {"lam": 1.0}})
  with pytest.raises(ValueError, match="bad arguments for strategy 'replay'"):
    strategies.from_spec("ewc+replay", {"replay": {"fisher": "exact"}})


def test_from_spec_gives_each_member_its_own_arguments():
  # fisher= is ewc's alone: given to mas it would be refused.
  s, _ = strategies.from_spec("mas+ewc", {"ewc": {"fisher": "sampled"},
                                          "mas": {"lam": 2.0}})
  assert s.name == "mas+ewc"
  # The arguments reach their member (whose check refuses a bad value).
  with pytest.raises(ValueError, match="ewc: unknown Fisher type 'bogus'"):
    strategies.from_spec("mas+ewc", {"ewc": {"fisher": "bogus"}})
  with pytest.raises(ValueError, match="bad arguments for strategy 'mas'"):
    strategies.from_spec("mas+ewc", {"mas": {"fisher": "exact"}})


def _tiny_scenario(n_exp=2, n=10, d=4, c=3, seed=0):
  rng = np.random.default_rng(seed)
  train = [(rng.normal(size=(n + i, d)).astype(np.float32),
            rng.integers(0, c, n + i).astype(np.int32)) for i in range(n_exp)]
  test = [(x[:4], y[:4]) for x, y in train]
  return scenarios.from_arrays(train, test, kind="class", num_classes=c)


def test_from_spec_scenario_transform_and_at_most_one():
  sc = _tiny_scenario()
  for spec in ("joint", "ewc+joint"):
    _, fn = strategies.from_spec(spec)
    joined = fn(sc)
    assert len(joined.experiences) == 1
    assert len(joined.experiences[0].train_y) == sum(
        len(e.train_y) for e in sc.experiences)
  with pytest.raises(ValueError, match="at most one member may change the "
                     "training data"):
    strategies.from_spec("joint+cumulative")


def test_from_spec_single_member_is_the_member_itself():
  # Not a chain of one: its state is the member's own (checkpoints of an
  # `ewc` run hold an EWC state, not a 1-tuple).
  sc = _tiny_scenario()
  ctx = make_context(models.build("mlp", 3, widths=()),
                     make_optimizer("sgd", 0.1), stream_info(sc, 8))
  one = init_state(ctx, strategies.from_spec("ewc")[0], 0).strategy
  own = init_state(ctx, strategies.get("ewc"), 0).strategy
  assert type(one) is type(own)  # an EWCState, not a tuple holding one
  two = init_state(ctx, strategies.from_spec("ewc+replay")[0], 0).strategy
  assert type(two) is tuple and len(two) == 2
  assert type(two[0]) is type(own)


def test_every_numeric_or_flag_argument_refuses_a_wrong_value_by_name():
  """Each factory refuses, naming the argument, a value of the wrong kind
  for every numeric argument (True, which ``isinstance(x, (int, float))``
  admits and then reads as 1; NaN; a string) and flag (2, 'yes'). Session
  44's fuzz found 16 numeric arguments of 11 strategies taking True, and
  AR1*'s replay_batch_size and P&C's compress_batch_size refused under
  another name."""
  wrong = []
  for name in strategies.available():
    for arg, default in strategies.defaults(name).items():
      if isinstance(default, bool):
        values = (2, "yes")
      elif isinstance(default, (int, float)):
        values = (True, float("nan"), "abc")
      else:
        continue
      for value in values:
        try:
          strategies.get(name, **{arg: value})
          wrong.append(f"{name}({arg}={value!r}) accepted")
        except ValueError as e:
          if arg not in str(e):
            wrong.append(f"{name}({arg}={value!r}): {e}")
  assert not wrong, "\n".join(wrong)


# --------------------------------------------------------------------------
# _penalty: validation.


def test_fisher_types_and_check_fisher():
  assert set(_penalty.FISHER_TYPES) == {"exact", "sampled", "predicted",
                                        "empirical"}
  for kind in _penalty.FISHER_TYPES:
    _penalty.check_fisher("ewc", kind)
  with pytest.raises(ValueError, match="ewc: unknown Fisher type 'true'"):
    _penalty.check_fisher("ewc", "true")


@pytest.mark.parametrize("args,ok", [
    ((0, 1, 0), True), ((5, 32, 7), True),
    ((-1, 32, 0), False), ((1.5, 32, 0), False), ((10, 0, 0), False),
    ((10, 32, -1), False), ((10, 32, 0.5), False)])
def test_check_estimator_args(args, ok):
  if ok:
    _penalty.check_estimator_args("mas", *args)
  else:
    with pytest.raises(ValueError, match="mas: "):
      _penalty.check_estimator_args("mas", *args)
  # The caller's name of the batch argument (P&C's compress_batch_size).
  with pytest.raises(ValueError, match="p: compress_batch_size must be an "
                     "int >= 1, got 0"):
    _penalty.check_estimator_args("p", 10, 0, batch_arg="compress_batch_size")


def test_fisher_diagonal_refuses_an_unknown_kind():
  with pytest.raises(ValueError, match="unknown Fisher type 'true'"):
    _penalty.fisher_diagonal(None, {}, {}, {}, None, kind="true")


# --------------------------------------------------------------------------
# _penalty: the quadratic and the estimators, by hand.


def test_zeros_like_tree_with_leading_axes():
  tree = {"a": jnp.ones((2, 3), jnp.float32), "b": jnp.ones((4,), jnp.int32)}
  z = _penalty.zeros_like_tree(tree, (5,))
  assert z["a"].shape == (5, 2, 3) and z["b"].shape == (5, 4)
  assert z["a"].dtype == jnp.float32 and z["b"].dtype == jnp.int32
  assert not np.any(np.asarray(z["a"])) and not np.any(np.asarray(z["b"]))
  assert _penalty.zeros_like_tree(tree)["a"].shape == (2, 3)


def test_quadratic_is_the_sum_over_every_leaf():
  rng = np.random.default_rng(0)
  shapes = {"w": (3, 2), "b": (2,), "deep": {"k": (4,)}}
  make = lambda: jax.tree.map(
      lambda s: rng.normal(size=s).astype(np.float32), shapes,
      is_leaf=lambda s: isinstance(s, tuple))
  omega = jax.tree.map(np.abs, make())
  anchor, params = make(), make()
  want = sum(float(np.sum(o * (p - a) ** 2)) for o, a, p in zip(
      jax.tree.leaves(omega), jax.tree.leaves(anchor),
      jax.tree.leaves(params)))
  got = _penalty.quadratic(omega, anchor, params)
  assert got.dtype == jnp.float32 and got.shape == ()
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  assert float(_penalty.quadratic(omega, params, params)) == 0.0


def _linear_case(n_exp=2, seed=0):
  """A linear softmax model (logits = x W + b) on a tiny stream: its
  per-example gradients have closed forms."""
  sc = _tiny_scenario(n_exp=n_exp, seed=seed)
  ctx = make_context(models.build("mlp", 3, widths=()),
                     make_optimizer("sgd", 0.1), stream_info(sc, 8))
  state = init_state(ctx, strategies.get("naive"), 0)
  rng = np.random.default_rng(seed + 1)
  # Random (not initial) weights so no class is near-uniform.
  params = jax.tree.map(
      lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), state.params)
  return ctx, sc, params, state.model_state


def _rows(batches):
  m = np.asarray(batches["mask"]).reshape(-1) > 0
  flat = lambda k: np.asarray(batches[k]).reshape(
      (-1,) + np.asarray(batches[k]).shape[2:])[m]
  return flat("x"), flat("y")


@pytest.mark.parametrize("kind", ["exact", "empirical", "predicted"])
def test_fisher_of_a_linear_softmax_in_closed_form(kind):
  # d log p_c / d W_ij = x_i (δ_cj − p_j), d / d b_j = δ_cj − p_j, so
  # exact: F_W = mean x_i² p_j (1 − p_j); the others: mean x_i² (δ_cj − p_j)²
  # at c = the label (empirical) or the argmax (predicted).
  ctx, sc, params, ms = _linear_case()
  exp = sc.experiences[1]  # 11 examples: 2 batches of 8, the last padded
  batches = _penalty.importance_batches(exp, 8, 0, 0, ctx.info.train_size)
  got = _penalty.fisher_diagonal(ctx, params, ms, batches,
                                 jax.random.PRNGKey(0), kind=kind)
  x, y = _rows(batches)
  assert len(y) == 11
  w = np.asarray(params["head"]["kernel"], np.float64)
  b = np.asarray(params["head"]["bias"], np.float64)
  p = np_softmax(x @ w + b)
  if kind == "exact":
    g2 = p * (1 - p)
  else:
    c = y if kind == "empirical" else np.argmax(p, -1)
    g2 = (np.eye(3)[c] - p) ** 2
  want_w = np.mean(x[:, :, None] ** 2 * g2[:, None, :], 0)
  want_b = np.mean(g2, 0)
  np.testing.assert_allclose(got["head"]["kernel"], want_w, rtol=1e-4,
                             atol=1e-7)
  np.testing.assert_allclose(got["head"]["bias"], want_b, rtol=1e-4,
                             atol=1e-7)


def test_mas_importance_of_a_linear_model_in_closed_form():
  # ‖xW + b‖²: d / d W_ij = 2 x_i z_j, d / d b_j = 2 z_j; Ω = mean |.|.
  ctx, sc, params, ms = _linear_case()
  batches = _penalty.importance_batches(sc.experiences[1], 8, 0, 0,
                                        ctx.info.train_size)
  got = _penalty.mas_importance(ctx, params, ms, batches)
  x, _ = _rows(batches)
  z = x @ np.asarray(params["head"]["kernel"]) + np.asarray(
      params["head"]["bias"])
  np.testing.assert_allclose(
      got["head"]["kernel"],
      np.mean(np.abs(2 * x[:, :, None] * z[:, None, :]), 0), rtol=1e-4,
      atol=1e-6)
  np.testing.assert_allclose(got["head"]["bias"],
                             np.mean(np.abs(2 * z), 0), rtol=1e-4, atol=1e-6)


def test_estimators_of_only_padding_are_zero_not_nan():
  ctx, sc, params, ms = _linear_case()
  b = experience_batches(sc.experiences[0], 8)
  b = jax.device_put({**b, "mask": np.zeros_like(b["mask"])})
  for tree in (_penalty.fisher_diagonal(ctx, params, ms, b,
                                        jax.random.PRNGKey(0), "empirical"),
               _penalty.mas_importance(ctx, params, ms, b)):
    for leaf in jax.tree.leaves(tree):
      assert np.all(np.asarray(leaf) == 0)


@pytest.mark.parametrize("max_examples,want_nb,want_n", [
    (0, 2, 10),     # all 10 examples, no padding batches
    (6, 1, 6),      # a subset
    (20, 2, 10),    # ceil(min(20, train size 11) / 8) = 2
    (30, 2, 10)])
def test_importance_batches_shape_is_fixed_for_the_stream(max_examples,
                                                          want_nb, want_n):
  sc = _tiny_scenario()  # experiences of 10 and 11 examples
  exp = sc.experiences[0]
  b = _penalty.importance_batches(exp, 8, max_examples, 3, 11)
  assert b["y"].shape == (want_nb, 8) and b["x"].shape == (want_nb, 8, 4)
  assert float(np.sum(b["mask"])) == want_n
  # With a stream whose largest experience is 40: ceil(min(m, 40) / 8).
  if max_examples:
    b = _penalty.importance_batches(exp, 8, max_examples, 3, 40)
    assert b["y"].shape[0] == math.ceil(min(max_examples, 40) / 8)
    assert float(np.sum(b["mask"])) == min(max_examples, 10)


def test_importance_batches_subset_follows_the_seed():
  exp = _tiny_scenario().experiences[1]  # 11 examples
  for seed in (0, 5):
    b = _penalty.importance_batches(exp, 4, 6, seed, 11)
    idx = np.sort(np.random.default_rng(seed).permutation(11)[:6])
    x, y = _rows(b)
    np.testing.assert_array_equal(x, exp.train_x[idx])
    np.testing.assert_array_equal(y, exp.train_y[idx])


def test_consolidation_hook_draws_per_experience_batches_and_key():
  sc = _tiny_scenario(n_exp=3)
  seen = {}

  def consolidate(ctx, sstate, params, model_state, batches, key):
    seen.update(sstate=sstate, params=params, model_state=model_state,
                batches=batches, key=key)
    return "new"

  class State(types.SimpleNamespace):
    def replace(self, **kw):
      return State(**{**vars(self), **kw})

  ctx = types.SimpleNamespace(info=types.SimpleNamespace(train_size=40))
  hook = _penalty.consolidation_hook(consolidate, 4, 6, seed=7)
  state = State(strategy="old", params="P", model_state="MS")
  for exp in sc.experiences[1:]:
    out = hook(ctx, state, exp)
    assert out.strategy == "new" and out.params == "P"
    assert seen["sstate"] == "old" and seen["params"] == "P"
    assert seen["model_state"] == "MS"
    i = exp.index
    idx = np.sort(np.random.default_rng(7 + i).permutation(
        len(exp.train_y))[:6])
    x, y = _rows(seen["batches"])
    np.testing.assert_array_equal(y, exp.train_y[idx])
    np.testing.assert_array_equal(x, exp.train_x[idx])
    assert seen["batches"]["y"].shape == (math.ceil(6 / 4), 4)
    np.testing.assert_array_equal(
        jax.random.key_data(seen["key"]) if jnp.issubdtype(
            seen["key"].dtype, jax.dtypes.prng_key) else seen["key"],
        jax.random.fold_in(jax.random.PRNGKey(7), i))
