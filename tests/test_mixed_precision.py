"""``model.compute_dtype``: mixed precision. The model computes in
bfloat16 (its inputs and floating parameters cast at ``Context.apply``),
while the parameters, their gradients, the optimiser, the running
statistics and the outputs the losses read stay float32; float32 (the
default) is the plain path. Bad names are refused."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import experiment, train
from jaxcl.strategies import dualprompt, l2p, lider, supsup
import resume_configs
from test_train import quick_config


def _dot_dtypes(jaxpr):
  """The operand dtypes of every dot_general / conv in a jaxpr, nested
  ones included."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("dot_general", "conv_general_dilated"):
      out.append(tuple(str(v.aval.dtype) for v in eqn.invars))
    for sub in jax.core.jaxprs_in_params(eqn.params):
      out += _dot_dtypes(sub)
  return out


@pytest.mark.parametrize("name,kw,tol", [("mlp", {}, 0.01),
                                         ("resnet18", {"width": 2}, 0.15)])
def test_the_model_computes_in_bfloat16_and_returns_float32(name, kw, tol):
  c = quick_config(**{"model.name": name, "model.compute_dtype": "bfloat16",
                      **{f"model.{k}": v for k, v in kw.items()}})
  s = experiment.setup(c)
  ctx = s.learner.ctx
  assert ctx.compute_dtype == jnp.bfloat16
  state = experiment.initial_state(s, 0)
  e = s.scenario.experiences[0]
  x, t = jnp.asarray(e.train_x[:8]), jnp.asarray(e.train_task[:8])
  jp = jax.make_jaxpr(lambda p: ctx.apply(p, state.model_state, x, t,
                                          train=True))(state.params)
  dots = _dot_dtypes(jp.jaxpr)
  assert dots and all(d == ("bfloat16", "bfloat16") for d in dots), dots
  out, new_ms = ctx.apply(state.params, state.model_state, x, t, train=True)
  assert out.dtype == jnp.float32
  # The running statistics keep their dtype (and change: a real update).
  for a, b in zip(jax.tree.leaves(new_ms), jax.tree.leaves(
      state.model_state)):
    assert a.dtype == b.dtype == jnp.float32
  if name == "resnet18":
    assert not all(np.allclose(a, b) for a, b in zip(
        jax.tree.leaves(new_ms), jax.tree.leaves(state.model_state)))
  # Within bfloat16's precision of the float32 model (measured: 0.4 % of
  # the logits' norm for the MLP, 6-9 % through the 18 layers of batch
  # norm of a width-2 ResNet), yet not the float32 computation.
  plain = dataclasses.replace(ctx, compute_dtype=None)
  want, _ = plain.apply(state.params, state.model_state, x, t, train=True)
  rel = float(jnp.linalg.norm(out - want) / jnp.linalg.norm(want))
  assert 0 < rel < tol, rel


def test_parameters_and_gradients_stay_float32():
  c = quick_config(**{"model.compute_dtype": "bfloat16"})
  s = experiment.setup(c)
  ctx, strat = s.learner.ctx, s.learner.strategy
  e0 = s.scenario.experiences[0]
  state = strat.before_experience(ctx, train.init_state(ctx, strat, 0), e0)
  batch = {"x": jnp.asarray(e0.train_x[:16]),
           "y": jnp.asarray(e0.train_y[:16]),
           "task": jnp.asarray(e0.train_task[:16]),
           "mask": jnp.ones((16,), jnp.float32)}
  new, loss = train.train_step(ctx, strat, state, batch)
  assert loss.dtype == jnp.float32
  for leaf in jax.tree.leaves((new.params, new.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  # The update is the float32 one to bfloat16's precision.
  plain_ctx = dataclasses.replace(ctx, compute_dtype=None)
  ref, _ = train.train_step(plain_ctx, strat, state, batch)
  for a, b, p in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref.params),
                     jax.tree.leaves(state.params)):
    step, want = np.asarray(a) - np.asarray(p), np.asarray(b) - np.asarray(p)
    assert np.abs(step - want).max() <= 0.1 * np.abs(want).max() + 1e-6


def _bf16_setup(name):
  """Strategy ``name``'s small config (the resume audit's) in bfloat16:
  its setup, a state before the first experience, and a batch of it."""
  c = resume_configs.config(name)
  c.model.compute_dtype = "bfloat16"
  s = experiment.setup(c)
  ctx, strat = s.learner.ctx, s.learner.strategy
  e0 = s.scenario.experiences[0]
  state = strat.before_experience(ctx, experiment.initial_state(s, 0), e0)
  batch = {"x": jnp.asarray(e0.train_x[:8]), "y": jnp.asarray(e0.train_y[:8]),
           "task": jnp.asarray(e0.train_task[:8]),
           "mask": jnp.ones((8,), jnp.float32)}
  return ctx, strat, state, batch


def _step(ctx, strat, state, batch):
  return train.train_step(ctx, strat, state, batch)[1]


def _supsup_predict(ctx, strat, state, batch):
  return strat.predict(ctx, state.strategy, state.params, state.model_state,
                       batch["x"], batch["task"])


def _supsup_inference(ctx, strat, state, batch):
  return supsup.infer_task(ctx, state.strategy, state.params,
                           state.model_state, batch["x"])


def _lider_features(ctx, strat, state, batch):
  return lider.layer_features(ctx, state.params, state.model_state,
                              batch["x"], batch["task"], train=True,
                              mask=batch["mask"])


@pytest.mark.parametrize("name,run", [
    ("lwf", _step),  # the teacher's unmasked logits
    ("hypernetwork", _step),  # the output regulariser's generated weights
    ("l2p", _step),  # the query pass (DualPrompt's is the same, -m slow)
    pytest.param("dualprompt", _step, marks=pytest.mark.slow),
    ("supsup", _step),  # a masked model's fixed weights (``frozen``)
    ("supsup", _supsup_predict),  # Piggyback's and SupSup's masked model
    ("supsup", _supsup_inference),  # the gradient over the superposition
    ("lider", _lider_features),  # the captured layer outputs
])
def test_strategies_own_model_passes_compute_in_bfloat16(name, run,
                                                         monkeypatch):
  """Strategies that call the model themselves (another method, explicit
  masks, captured intermediates) go through ``Context.model_apply``, so
  ``model.compute_dtype`` reaches those passes too: every matmul of the
  traced computation takes bfloat16 operands, and what comes back is
  float32 (the traced program's outputs: the dtypes a jitted run returns,
  fixed when tracing. Running the pass as well compiled it, 7-15 s for
  L2P's, DualPrompt's and the hypernetwork's steps, and checked no other
  dtype)."""
  # L2P's and DualPrompt's key loss (and L2P's choice of prompts in it)
  # are float32 matmuls of the query with the keys, by design (the losses
  # stay float32); only the query pass is looked at.
  for mod in (l2p, dualprompt):
    monkeypatch.setattr(mod, "key_loss",
                        lambda q, keys, idx, mask: jnp.sum(q))
  monkeypatch.setattr(l2p, "select_prompts", lambda q, keys, k: (
      jnp.zeros((q.shape[0], k), jnp.int32), None))
  ctx, strat, state, batch = _bf16_setup(name)
  jp = jax.make_jaxpr(lambda st: run(ctx, strat, st, batch))(state)
  dots = _dot_dtypes(jp.jaxpr)
  assert dots and all(d == ("bfloat16", "bfloat16") for d in dots), dots
  for aval in jp.out_avals:
    if jnp.issubdtype(aval.dtype, jnp.floating):
      assert aval.dtype == jnp.float32, jp.out_avals


def test_model_apply_without_compute_dtype_is_the_model_s_apply():
  ctx, _, state, batch = _bf16_setup("lwf")
  plain = dataclasses.replace(ctx, compute_dtype=None)
  variables = {"params": state.params, **state.model_state}
  want = ctx.model.apply(variables, batch["x"], batch["task"])
  got = plain.model_apply(variables, batch["x"], batch["task"])
  np.testing.assert_array_equal(got, want)
  low = ctx.model_apply(variables, batch["x"], batch["task"])
  assert low.dtype == jnp.float32 and not np.array_equal(low, want)
  np.testing.assert_allclose(low, want, atol=0.05 * float(
      jnp.abs(want).max()))


def test_a_bfloat16_run_learns_as_a_float32_one():
  runs = [jaxcl.run(quick_config(**{"model.compute_dtype": dt,
                                    "strategy.name": "replay"}))
          for dt in ("float32", "bfloat16")]
  assert runs[0].learner.ctx.compute_dtype is None  # the plain path
  assert abs(runs[0].metrics["acc"] - runs[1].metrics["acc"]) < 0.05
  assert runs[1].metrics["acc"] > 0.3  # (0.47 measured; chance 0.1)


def test_dry_run_says_so():
  s = experiment.setup(quick_config(**{"model.compute_dtype": "bfloat16"}))
  assert ("mixed precision: the model computes in bfloat16; parameters, "
          "optimiser and losses in float32") in experiment.describe(
              s, experiment.initial_state(s, 0))


def test_bad_compute_dtype_is_refused():
  with pytest.raises(ValueError, match=r"model.compute_dtype='float64'; "
                     r"valid: \['float32', 'bfloat16'\]"):
    experiment.setup(quick_config(**{"model.compute_dtype": "float64"}))
  with pytest.raises(ValueError, match=r"'float16' needs loss scaling"):
    experiment.setup(quick_config(**{"model.compute_dtype": "float16"}))
