"""FACIL's learning-rate schedule: patience on a held-out loss.

FACIL (Masana et al. 2022, ``approach/incremental_learning.py``,
``train_loop``) trains each task with a learning rate that starts at
``lr`` and is divided by ``lr_factor`` whenever the loss on a validation
split has not improved for ``lr_patience`` epochs; training stops early
once the rate would fall below ``lr_min``. The model of the best
validation loss is kept: it is restored when the rate drops, and at the
end of the task. Per epoch, with ``b`` the best loss and ``w`` the
patience left (``P`` at the task's start and after every reset):

* ``loss < b``: ``b = loss``, keep the model, ``w = P``;
* otherwise ``w = w - 1``; at ``w = 0`` the rate is divided by the
  factor and, if it is then below ``lr_min``, the task stops; else
  ``w = P`` and the kept model is restored (the optimiser's state is
  not).

The validation split is FACIL's ``--validation 0.1``: that fraction of
each task's training examples, drawn at random and not trained on.

In jaxcl this is ``optimizer.schedule='plateau'`` (``optimizer.patience``,
``optimizer.lr_factor``, ``optimizer.lr_min``, ``optimizer.holdout``);
:func:`holdout` splits the experiences when the run is set up, and the
experience loop (:func:`jaxcl.experiment.execute`) evaluates the held-out
loss after every epoch and applies :func:`update`, on the host (the rate
is the optimiser's injected ``learning_rate``). The held-out loss is the
model's cross-entropy over all its outputs, which FACIL's approaches
replace by their own criterion (with their distillation or penalty
terms).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import numpy as np

from jaxcl import checks
from jaxcl.scenarios import SPLITS, Experience, Scenario, ScenarioError

__all__ = ["Plateau", "start", "update", "check", "holdout"]


class Plateau(NamedTuple):
  lr: float     # the current learning rate
  best: float   # the best held-out loss of the experience so far
  wait: int     # epochs of patience left


def start(lr: float, patience: int) -> Plateau:
  """The scheme at an experience's start: the base rate, no best loss."""
  return Plateau(float(lr), float("inf"), int(patience))


def update(p: Plateau, loss: float, *, patience: int, factor: float,
           lr_min: float) -> tuple[Plateau, str]:
  """One epoch's held-out ``loss``: the new state and what to do,
  ``'best'`` (keep this model), ``'wait'``, ``'decay'`` (restore the kept
  model and train on at ``lr``) or ``'stop'`` (end the experience)."""
  if loss < p.best:
    return Plateau(p.lr, float(loss), patience), "best"
  wait = p.wait - 1
  if wait > 0:
    return p._replace(wait=wait), "wait"
  lr = p.lr / factor
  if lr < lr_min:
    return Plateau(lr, p.best, 0), "stop"
  return Plateau(lr, p.best, patience), "decay"


def check(patience, factor, lr_min, fraction) -> None:
  """The scheme's settings, named as ``optimizer.<field>``."""
  checks.whole("optimizer.patience", patience, 1)
  if not (checks.is_real(factor) and factor > 1):
    raise ValueError(f"optimizer.lr_factor must be > 1 (the rate is divided "
                     f"by it when the held-out loss stops improving), got "
                     f"{factor!r}")
  checks.positive("optimizer.lr_min", lr_min)
  if not (checks.is_real(fraction) and 0 < fraction < 1):
    raise ValueError(f"optimizer.holdout must be a fraction in (0, 1) (of "
                     f"each experience's training examples held out for "
                     f"the plateau schedule), got {fraction!r}")


def holdout(scenario: Scenario, fraction: float, seed: int = 0
            ) -> tuple[Scenario, tuple[Experience, ...]]:
  """Each experience's training examples split as FACIL's validation:
  ``round(n * fraction)`` of its ``n`` rows drawn at random (by ``seed``
  and the experience's index) are held out.

  Returns the scenario whose experiences train on the rest, and per
  experience the held-out rows as an :class:`Experience` whose test split
  holds them (for :func:`jaxcl.train.test_arrays`). Inputs are read when
  asked for, as the scenario's are.

  Raises:
    ScenarioError: an experience whose split would leave no held-out or no
      training row.
  """
  trained, held_out = [], []
  for e in scenario.experiences:
    n = e.num_train
    k = int(round(n * fraction))
    if not 0 < k < n:
      raise ScenarioError(
          f"optimizer.holdout={fraction} holds out {k} of experience "
          f"{e.index}'s {n} training examples; the plateau schedule needs "
          "at least one held out and one to train on")
    rng = np.random.default_rng([seed, e.index])
    held = np.sort(rng.choice(n, k, replace=False))
    keep = np.ones(n, bool)
    keep[held] = False
    trained.append(dataclasses.replace(
        e, train_y=e.train_y[keep], train_task=e.train_task[keep],
        inputs=_rows(e, keep)))
    held_out.append(dataclasses.replace(
        e, train_y=e.train_y[held], train_task=e.train_task[held],
        test_y=e.train_y[held], test_task=e.train_task[held],
        inputs=_train_rows_everywhere(e, held)))
  # The evaluation still runs on the test sets as they were.
  eval_exps = scenario.eval_experiences
  out = dataclasses.replace(scenario, experiences=tuple(trained),
                            eval_experiences=eval_exps)
  return out, tuple(held_out)


def _rows(e: Experience, keep: np.ndarray):
  """``e``'s inputs with only the ``keep`` training rows."""
  def inputs(split: str) -> np.ndarray:
    x = e.inputs(split)
    return x[keep] if split == "train" else x
  return inputs


def _train_rows_everywhere(e: Experience, rows: Sequence[int]):
  """Inputs whose every split is ``e``'s training ``rows``."""
  def inputs(split: str) -> np.ndarray:
    if split not in SPLITS:
      raise ScenarioError(f"unknown split {split!r}; valid: {list(SPLITS)}")
    return e.inputs("train")[rows]
  return inputs
