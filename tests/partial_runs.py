"""Runs of a stream cut short, or keeping the state as each experience
ended, for tests that compare a strategy's state after one experience with
its state after more."""

import dataclasses

import jax
import jax.numpy as jnp

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


def run_keeping_states(config, n: int | None = None, strategy=None):
  """``jaxcl.run`` that also keeps the state as each experience ended:
  ``(result, [state_1, ..., state_n])``, one compiled run standing for the
  runs stopped after 1, 2, ... experiences.

  ``n``: train the first ``n`` experiences only (evaluated on every
  experience's test set, as :func:`run_first`); all when None.
  ``strategy``: a record to run instead of ``config.strategy``'s (whose
  scenario transform, if any, is then not applied, as in ``jaxcl.run``).
  The result's ``learner`` is a new one around the strategy as given,
  without the hook that keeps the states: its compiled functions are not
  the run's (``chunk_fn._cache_size()`` reads 0; a compile count needs
  the run's own learner)."""
  if strategy is None:
    strategy, transform = experiment.build_strategy(config)
    sc = transform(experiment.build_scenario(config))
  else:
    sc = experiment.build_scenario(config)
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
  return dataclasses.replace(r, learner=dataclasses.replace(
      r.learner, strategy=strategy)), states


def results_after_each(config, n: int, strategy=None) -> list:
  """``[run_first(config, k, strategy) for k in 1..n]`` from one run
  (:func:`run_keeping_states`): ``r_k`` holds the state as experience
  ``k`` ended and the accuracy matrix's first ``k`` rows; its ``metrics``
  are left empty."""
  r, states = run_keeping_states(config, n, strategy)
  return [dataclasses.replace(r, state=st, accuracy=r.accuracy[:k + 1],
                              metrics={}) for k, st in enumerate(states)]
