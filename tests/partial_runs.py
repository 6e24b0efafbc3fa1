"""Runs of a stream cut short, or keeping the state as each experience
ended, for tests that compare a strategy's state after one experience with
its state after more."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import jaxcl
from jaxcl import experiment


def run_first(config, n: int, strategy=None):
  """``jaxcl.run`` on the first ``n`` experiences of ``config``'s stream,
  evaluated on every experience's test set (so the accuracy matrix keeps
  the whole stream's width)."""
  sc = experiment.build_scenario(config)
  return jaxcl.run(config, strategy=strategy, scenario=dataclasses.replace(
      sc, experiences=sc.experiences[:n], eval_experiences=sc.experiences))


def copy_state(tree):
  """A copy of ``tree``'s arrays (the engine's next step donates the
  state's buffers, so a kept state must not share them)."""
  return jax.tree.map(lambda a: jnp.copy(a) if isinstance(a, jax.Array)
                      else a, tree)


def trace_initial_state(config, strategy=None) -> None:
  """``jaxcl.run``'s setup and initial state, traced only
  (``jax.eval_shape``): a strategy's ``init`` that refuses the model or
  stream raises here, without compiling the model's init, which would
  cost more than the whole check."""
  s = experiment.setup(config, strategy=strategy)
  jax.eval_shape(lambda: experiment.initial_state(s, config.seed))


def run_keeping_states(config, n: int | None = None, strategy=None,
                       scenario=None):
  """``jaxcl.run`` that also keeps the state as each experience ended:
  ``(result, [state_1, ..., state_n])``, one compiled run standing for the
  runs stopped after 1, 2, ... experiences.

  ``n``: train the first ``n`` experiences only (evaluated on every
  experience's test set, as :func:`run_first`); all when None.
  ``strategy``: a record to run instead of ``config.strategy``'s.
  ``scenario``: run on this scenario instead of ``config``'s (loaded
  again otherwise). The run re-cuts either for a joint or cumulative
  strategy (after the cut to ``n``).
  The result is the run's own (its learner's compiled functions, for
  compile counts); its ``learner.strategy`` differs from the one given
  only in ``after_experience``, the hook that keeps the states."""
  sc = experiment.build_scenario(config) if scenario is None else scenario
  if strategy is None:
    strategy, _ = experiment.build_strategy(config)
  if n is not None:
    sc = dataclasses.replace(sc, experiences=sc.experiences[:n],
                             eval_experiences=sc.experiences)
  states = []
  after = strategy.after_experience

  def keep(ctx, state, experience):
    state = after(ctx, state, experience)
    states.append(copy_state(state))
    return state

  r = jaxcl.run(config, strategy=strategy._replace(after_experience=keep),
                scenario=sc)
  return r, states


def results_after_each(config, n: int, strategy=None) -> list:
  """``[run_first(config, k, strategy) for k in 1..n]`` from one run
  (:func:`run_keeping_states`): ``r_k`` holds the state as experience
  ``k`` ended and the accuracy matrix's first ``k`` rows; its ``metrics``
  are left empty, and its learner is a new one around the strategy (its
  hooks as given; compile counts read 0 on it)."""
  r, states = run_keeping_states(config, n, strategy)
  if strategy is None:
    strategy, _ = experiment.build_strategy(config)
  learner = dataclasses.replace(r.learner, strategy=strategy)
  return [dataclasses.replace(r, state=st, accuracy=r.accuracy[:k + 1],
                              metrics={}, learner=learner)
          for k, st in enumerate(states)]


def assert_predicts_the_seen_classes(setup) -> None:
  """After three experiences of a Split stream (2 classes each) have
  started, the strategy of ``setup`` predicts over classes 0-5 (the two
  finished experiences' and the current one's): with a head that scores
  class c as c + 1 (zero kernel, so whatever the features), classes 0-5
  keep their scores and 6-9 are masked. A seen-class set that kept only
  the last experience would mask 0-3 as well."""
  ctx, strategy = setup.learner.ctx, setup.learner.strategy
  state = experiment.initial_state(setup, 0)
  for e in setup.scenario.experiences[:3]:
    state = strategy.before_experience(ctx, state, e)
  params = {**state.params, "head": {
      "kernel": jnp.zeros_like(state.params["head"]["kernel"]),
      "bias": jnp.arange(10.0) + 1.0}}
  x = jnp.asarray(setup.scenario.experiences[0].test_x[:4])
  logits = np.asarray(jax.jit(lambda p: strategy.predict(
      ctx, state.strategy, p, state.model_state, x,
      jnp.zeros(4, jnp.int32)))(params))
  assert np.all(logits[:, 6:] < -1e8)
  np.testing.assert_allclose(logits[:, :6], np.tile(np.arange(1.0, 7.0),
                                                    (4, 1)))


def predictions_around_the_start(ctx, strategy, state, experience,
                                 n: int = 5):
  """On ``experience``'s first ``n`` test rows (task 0): the model's raw
  logits and ``strategy``'s predictions before and after its
  ``before_experience`` hook for ``experience`` (an evaluation during the
  experience), as NumPy arrays ``(raw, before, after)``."""
  x = jnp.asarray(experience.test_x[:n])
  task = jnp.zeros((n,), jnp.int32)
  raw = np.asarray(ctx.logits(state.params, state.model_state, x, task))
  pred = lambda st: np.asarray(strategy.predict(
      ctx, st.strategy, st.params, st.model_state, x, task))
  before = pred(state)
  after = pred(strategy.before_experience(ctx, state, experience))
  return raw, before, after
