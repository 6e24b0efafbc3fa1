"""Continual-learning metrics from the accuracy matrix.

``R[i, j]`` is the accuracy on experience ``j``'s test set after training
experience ``i`` (``T`` training experiences, ``E`` test sets; ``T == E``
except for Joint, whose single row covers all test sets). With ``b_j`` the
accuracy of the randomly initialised model on test set ``j``
(Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning",
2017; Chaudhry et al., "Riemannian Walk for Incremental Learning", 2018):

.. math::

  \\mathrm{ACC} = \\frac{1}{T} \\sum_{j} R_{T-1, j}

  \\mathrm{BWT} = \\frac{1}{T-1} \\sum_{j<T-1} (R_{T-1, j} - R_{j, j})

  \\mathrm{FWT} = \\frac{1}{T-1} \\sum_{j>0} (R_{j-1, j} - b_j)

  f_j = \\max_{l < T-1} R_{l, j} - R_{T-1, j}, \\quad
  \\mathrm{Forgetting} = \\frac{1}{T-1} \\sum_{j<T-1} f_j

Negative BWT means forgetting; positive FWT means earlier experiences help
later ones before they are trained. Two more summaries are common in the
class-incremental and online literature: the *average incremental
accuracy* (Rebuffi et al., "iCaRL", 2017), the mean over the stream of the
accuracy on the experiences seen so far, and the *learning accuracy*
(Riemer et al., "Learning to Learn without Forgetting by Maximizing
Transfer and Minimizing Interference", 2019), each experience's accuracy
right after it is trained (plasticity, apart from forgetting). Like ACC,
both average over experiences; with test sets of equal size that is the
accuracy over the pooled test examples that iCaRL reports:

.. math::

  \\mathrm{IncACC} = \\frac{1}{T} \\sum_{i} \\frac{1}{i+1}
      \\sum_{j \\le i} R_{i, j}, \\qquad
  \\mathrm{LA} = \\frac{1}{T} \\sum_{j} R_{j, j}
"""

from __future__ import annotations

import numpy as np

__all__ = ["average_accuracy", "accuracy_over_time",
           "average_incremental_accuracy", "learning_accuracy",
           "backward_transfer", "forward_transfer", "forgetting", "summary"]


def _square(r) -> np.ndarray:
  r = np.asarray(r, dtype=np.float64)
  if r.ndim != 2 or r.shape[0] != r.shape[1]:
    raise ValueError(f"this metric needs a square T x T accuracy matrix; got "
                     f"shape {r.shape}")
  return r


def average_accuracy(r) -> float:
  """Mean accuracy over all test sets after the last experience."""
  r = np.asarray(r, dtype=np.float64)
  return float(np.mean(r[-1]))


def accuracy_over_time(r) -> np.ndarray:
  """After each experience ``i``: mean of ``R[i, :i+1]`` (the experiences
  seen so far)."""
  r = _square(r)
  return np.array([np.mean(r[i, :i + 1]) for i in range(len(r))])


def average_incremental_accuracy(r) -> float:
  """The mean of :func:`accuracy_over_time` over the stream."""
  return float(np.mean(accuracy_over_time(r)))


def learning_accuracy(r) -> float:
  """The mean of ``R[j, j]``: each experience's accuracy right after it is
  trained."""
  return float(np.mean(np.diag(_square(r))))


def backward_transfer(r) -> float:
  """BWT; 0 for a single experience."""
  r = _square(r)
  t = len(r)
  if t < 2:
    return 0.0
  return float(np.mean([r[-1, j] - r[j, j] for j in range(t - 1)]))


def forward_transfer(r, random_acc) -> float:
  """FWT against the randomly initialised model's accuracies ``b``."""
  r = _square(r)
  b = np.asarray(random_acc, dtype=np.float64)
  t = len(r)
  if b.shape != (t,):
    raise ValueError(f"random_acc must have shape ({t},), got {b.shape}")
  if t < 2:
    return 0.0
  return float(np.mean([r[j - 1, j] - b[j] for j in range(1, t)]))


def forgetting(r) -> float:
  """Average forgetting of the experiences before the last."""
  r = _square(r)
  t = len(r)
  if t < 2:
    return 0.0
  return float(np.mean([np.max(r[:t - 1, j]) - r[-1, j]
                        for j in range(t - 1)]))


def summary(r, random_acc=None) -> dict[str, float]:
  """All metrics that the matrix's shape allows, as a flat dict."""
  r = np.asarray(r, dtype=np.float64)
  out = {"acc": average_accuracy(r)}
  if r.shape[0] == r.shape[1]:
    out["bwt"] = backward_transfer(r)
    out["forgetting"] = forgetting(r)
    if random_acc is not None:
      out["fwt"] = forward_transfer(r, random_acc)
    out["inc_acc"] = average_incremental_accuracy(r)
    out["learning_acc"] = learning_accuracy(r)
  return out
