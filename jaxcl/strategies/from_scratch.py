"""From-scratch training: every experience starts again from the initial model.

Before each experience after the first, the parameters, the model state
(e.g. batch-norm statistics) and the optimiser state are reset, so the
model trained on experience ``t`` has seen experience ``t`` only:

.. math::  \\theta_t = \\mathrm{train}(\\theta_0, D_t)

It is the reference against which forward transfer is read (how much the
earlier experiences help a new one: Lopez-Paz & Ranzato 2017 measure it
against a random model, Díaz-Rodríguez et al. 2018 against a model trained
on the experience alone), and Avalanche's ``FromScratchTraining``
baseline. Its accuracy matrix has the single-task accuracy of each
experience on the diagonal; off the diagonal, class- and
task-incremental rows show what a model that never saw an experience
scores on it.

``reset='initial'`` (default) restores the parameters the run started from
(so a run from pretrained parameters, ``model.pretrained``, restarts from
them); ``reset='fresh'`` draws a new random initialisation per experience
from the run's key, as :mod:`jaxcl.strategies.ensemble` does for its
members.

Chained, only the model and its optimiser restart: the other members keep
their state, so ``from_scratch+replay`` retrains each experience from the
start on its data and the memory, and a penalty's anchor (EWC, MAS) still
pulls the restarted model towards the previous experience's weights.

References:
  Avalanche's ``FromScratchTraining`` (``avalanche.training``), the
  baseline this reproduces.
  Díaz-Rodríguez, Lomonaco, Filliat & Maltoni, `Don't forget, there is more
  than forgetting: new metrics for continual learning
  <https://arxiv.org/abs/1810.13166>`_, NeurIPS Workshop 2018.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.strategy import Strategy
from jaxcl.train import init_variables, reset_opt_state

RESETS = ("initial", "fresh")


class FromScratchState(NamedTuple):
  params: Any       # the parameters the run started from ('initial')
  model_state: Any  # the model state it started from


def from_scratch(reset: str = "initial") -> Strategy:
  """Restart every experience from the initial model and a fresh optimiser.

  Args:
    reset: ``"initial"`` restores the run's starting parameters and model
      state (pretrained ones included); ``"fresh"`` draws a new random
      initialisation for each experience.

  Raises:
    ValueError: ``reset`` not one of ``RESETS``.
  """
  checks.one_of("from_scratch: reset", reset, RESETS)

  def init(ctx, key, params):
    if reset == "fresh":
      return FromScratchState((), ())  # nothing to keep
    # `init` sees only the parameters; the model state's structure here,
    # its values (fixed random or pretrained weights of masked models, not
    # only batch statistics) taken from the run as its first experience
    # starts.
    _, model_state = init_variables(ctx, key)
    return FromScratchState(params, model_state)

  def before_experience(ctx, state, experience):
    if experience.index == 0:
      if reset == "fresh":
        return state
      start = jax.tree.map(jnp.copy, state.model_state)
      return state.replace(strategy=state.strategy._replace(
          model_state=start))
    if reset == "fresh":
      key = jax.random.fold_in(jax.random.fold_in(state.rng, 0x5C4),
                               experience.index)
      params, model_state = init_variables(ctx, key)
    else:
      # The engine copies buffers shared with the stored start before the
      # next (donating) training program (jaxcl.train.unalias).
      params, model_state = state.strategy.params, state.strategy.model_state
    # A fresh optimiser state (keeping a sweep's per-run learning rate),
    # whatever train.reset_optimizer says: nothing of the past may carry.
    return reset_opt_state(ctx, state.replace(params=params,
                                              model_state=model_state))

  return Strategy(init=init, before_experience=before_experience,
                  name="from_scratch",
                  writes_params=frozenset({"before_experience"}))
