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

When the test sets differ in size (a first experience of 50 classes
followed by experiences of 10: ``scenario.first_classes``) the mean over
experiences weights a class of the small ones five times a class of the
first. LUCIR's, PODNet's and PyCIL's code report instead the accuracy on
the union of the test sets seen so far, each experience weighted by its
``n_j`` test examples (:func:`pooled_accuracy`,
:func:`pooled_incremental_accuracy`; Avalanche's stream accuracy too):

.. math::

  \\mathrm{ACC}_{pooled} = \\frac{\\sum_j n_j R_{T-1, j}}{\\sum_j n_j},
  \\qquad
  \\mathrm{IncACC}_{pooled} = \\frac{1}{T} \\sum_i
      \\frac{\\sum_{j \\le i} n_j R_{i, j}}{\\sum_{j \\le i} n_j}

**Continual evaluation** (``train.eval_every_steps``) also evaluates every
test set inside the experiences, giving an accuracy *curve*: points
``k = 0..P-1`` at global steps ``s_k``, each with the experience ``e_k``
being trained (``-1`` for the initial model) and a row ``a_k`` over the
test sets; experience ``i``'s points end with its row of ``R``. The matrix
samples the curve only at the experiences' ends, where a method has
recovered: De Lange, van de Ven & Tuytelaars, "Continual evaluation for
lifelong learning: identifying the stability gap", ICLR 2023, show that
replay and regularisation methods lose much of an earlier experience's
accuracy in the first steps of the next one and regain it before its
end. Their worst-case metrics, at the end of a stream of ``T``
experiences:

.. math::

  \\mathrm{minACC} = \\frac{1}{T-1} \\sum_{i<T-1}
      \\min_{k:\\, e_k > i} a_{k, i}, \\qquad
  \\mathrm{WCACC} = \\frac{1}{T} R_{T-1, T-1}
      + \\left(1 - \\frac{1}{T}\\right) \\mathrm{minACC}

(the minimum is over every evaluation after experience ``i`` was
trained), and the *average anytime accuracy* (Caccia et al., "New
insights on reducing abrupt representation change in online continual
learning", ICLR 2022), the accuracy on the experiences seen so far
averaged over the training steps:

.. math::

  \\mathrm{AAA} = \\frac{\\sum_{k \\ge 1} (s_k - s_{k-1})\\,
      \\frac{1}{e_k + 1} \\sum_{j \\le e_k} a_{k, j}}
      {\\sum_{k \\ge 1} (s_k - s_{k-1})}

Koh et al., "Online continual learning on class incremental blurry task
configuration with anytime inference", ICLR 2022, average instead the
accuracy over the test examples of the classes *exposed* so far,
:math:`x_k` (their :math:`A_{AUC}`, here per training step:
:func:`exposed_anytime_accuracy`):

.. math::

  A_{AUC} = \\frac{\\sum_{k \\ge 1} (s_k - s_{k-1})\\, x_k}
      {\\sum_{k \\ge 1} (s_k - s_{k-1})}

On a split stream the two differ only in weighting test sets by their
size. On a blurry stream (:func:`jaxcl.scenarios.blurry`) classes turn up
before their home experience, and :math:`A_{AUC}` counts them from then
on; AAA, over the home test sets, not until their home experience.
A class counts as exposed from the first training batch that holds one
of its examples, as in their code. One difference from it: the
model predicts over all its outputs, as in every other jaxcl
evaluation, where their classifier has outputs for the exposed classes
only.

De Lange et al. also measure how fast an experience is lost and how fast
it is learned: its largest drop, ``WF^w`` (windowed forgetting), and its
largest rise, ``WP^w`` (windowed plasticity), between two evaluations
within a window, from when the experience starts training, averaged over
all ``T`` experiences (as their code, ``continual_eval_metrics.py``: a
sliding window per task from its first evaluation, the maximum over the
run, 0 when it never drops, then the mean over the tasks). Their window
counts evaluations, so its value changes with how often one evaluates;
:func:`windowed_forgetting` and :func:`windowed_plasticity` count
training steps instead (their ``F10`` with an evaluation every ``N``
steps is ``w = 9 N`` here):

.. math::

  \\mathrm{WF}^w = \\frac{1}{T} \\sum_{i<T} \\max\\Big(0,
      \\max_{k < l:\\; e_k \\ge i,\\; s_l - s_k \\le w}
      (a_{k, i} - a_{l, i})\\Big), \\qquad
  \\mathrm{WP}^w = \\frac{1}{T} \\sum_{i<T} \\max\\Big(0,
      \\max_{k < l:\\; e_k \\ge i,\\; s_l - s_k \\le w}
      (a_{l, i} - a_{k, i})\\Big)

(their first task's window also holds the initial model's evaluation;
here every experience's starts with its own first evaluation.)

**The confusion matrix** (``train.confusion``): ``N[y, p]``, the test
examples of class ``y`` predicted as ``p`` at an experience's end, over
all the test sets. A class-incremental learner that forgets predicts the
classes it saw last: the *task-recency bias* (Wu et al., "Large Scale
Incremental Learning" (BiC), CVPR 2019, Fig. 1; Masana et al.,
"Class-incremental learning: survey and performance evaluation", TPAMI
2022, Sec. 3.3), a dark block of columns on the last experience's
classes. :func:`recency_bias` puts it in one number: over the test
examples of the classes trained (``S``), the predictions of the last
experience's classes (``L``) against their examples,

.. math::

  \\mathrm{RB} = \\frac{\\sum_{y \\in S,\\, p \\in L} N_{y, p}}
      {\\sum_{y \\in L,\\, p} N_{y, p}}

1 when the model predicts them as often as they occur; ``|S| / |L|``
(5 on Split MNIST) when it predicts nothing else.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxcl import checks

__all__ = ["average_accuracy", "accuracy_over_time",
           "average_incremental_accuracy", "learning_accuracy",
           "backward_transfer", "forward_transfer", "forgetting", "summary",
           "min_accuracy", "worst_case_accuracy", "anytime_accuracy",
           "windowed_forgetting", "windowed_plasticity",
           "continual_summary", "seen_accuracy",
           "Curve", "recency_bias", "exposed_anytime_accuracy",
           "exposed_accuracy", "pooled_accuracy", "pooled_seen",
           "pooled_accuracy_over_time", "pooled_incremental_accuracy",
           "unequal_sizes"]


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


def unequal_sizes(sizes) -> bool:
  """Whether test sets of these ``sizes`` (None: unknown) differ in size,
  so that the pooled accuracies differ from the plain means."""
  return sizes is not None and len(set(np.asarray(sizes).tolist())) > 1


def pooled_seen(row, sizes, i: int) -> float:
  """After experience ``i``: the accuracy over the test examples of the
  experiences seen so far, ``row[:i+1]`` weighted by ``sizes[:i+1]``."""
  n = np.asarray(sizes, dtype=np.float64)[:i + 1]
  return float(np.asarray(row, dtype=np.float64)[:i + 1] @ n / n.sum())


def _sizes(r, sizes) -> np.ndarray:
  n = np.asarray(sizes, dtype=np.float64)
  if n.shape != (r.shape[1],) or not np.all(n > 0):
    raise ValueError(f"sizes must hold one positive test-set size per "
                     f"column of the accuracy matrix ({r.shape[1]}), got "
                     f"{np.asarray(sizes).tolist()}")
  return n


def pooled_accuracy(r, sizes) -> float:
  """The accuracy over all the test examples after the last experience:
  the last row weighted by the test sets' ``sizes``."""
  r = np.asarray(r, dtype=np.float64)
  n = _sizes(r, sizes)
  return float(r[-1] @ n / n.sum())


def pooled_accuracy_over_time(r, sizes) -> np.ndarray:
  """After each experience ``i``: the accuracy over the test examples of
  the experiences seen so far (``R[i, :i+1]`` weighted by ``sizes``)."""
  r = _square(r)
  n = _sizes(r, sizes)
  return np.array([pooled_seen(r[i], n, i) for i in range(len(r))])


def pooled_incremental_accuracy(r, sizes) -> float:
  """The mean of :func:`pooled_accuracy_over_time` over the stream."""
  return float(np.mean(pooled_accuracy_over_time(r, sizes)))


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


def summary(r, random_acc=None, sizes=None) -> dict[str, float]:
  """All metrics that the matrix's shape allows, as a flat dict.

  ``sizes``: the test sets' sizes; when they differ, the pooled accuracies
  are added too (``acc_pooled``; ``inc_acc_pooled`` for a square matrix).
  """
  r = np.asarray(r, dtype=np.float64)
  out = {"acc": average_accuracy(r)}
  pooled = unequal_sizes(sizes)
  if pooled:
    out["acc_pooled"] = pooled_accuracy(r, sizes)
  if r.shape[0] == r.shape[1]:
    out["bwt"] = backward_transfer(r)
    out["forgetting"] = forgetting(r)
    if random_acc is not None:
      out["fwt"] = forward_transfer(r, random_acc)
    out["inc_acc"] = average_incremental_accuracy(r)
    if pooled:
      out["inc_acc_pooled"] = pooled_incremental_accuracy(r, sizes)
    out["learning_acc"] = learning_accuracy(r)
  return out


# --------------------------------------------------------------------------
# Continual evaluation: metrics of the accuracy curve.


@dataclasses.dataclass
class Curve:
  """The accuracy curve of continual evaluation (``train.eval_every_steps``):
  ``P`` points in training order, the first the initial model's.

  Attributes:
    step: (P,) the global step of each point.
    experience: (P,) the experience being trained (-1: the initial model);
      each experience's points end with its row of the accuracy matrix.
    accuracy: (P, test sets), (runs, P, test sets) for a sweep.
    exposed: (P,), (runs, P) for a sweep, the accuracy over the test
      examples of the classes exposed so far (class-incremental streams;
      NaN for the initial model, and for points an older checkpoint did
      not keep); None on other streams.
  """
  step: np.ndarray
  experience: np.ndarray
  accuracy: np.ndarray
  exposed: np.ndarray | None = None


def _curve(experience, accuracy, step=None):
  """The curve's arrays, checked: ``experience`` (P,) from -1 (the initial
  model) up, never decreasing; ``accuracy`` (P, T), one test set per
  training experience; ``step`` (P,) never decreasing."""
  e = np.asarray(experience)
  a = np.asarray(accuracy, dtype=np.float64)
  if e.ndim != 1 or a.ndim != 2 or len(e) != len(a) or not len(e):
    raise ValueError(
        "a continual-evaluation curve needs experience (P,) and accuracy "
        f"(P, T) for P >= 1 points; got shapes {e.shape} and {a.shape}")
  if e.min() < -1 or np.any(np.diff(e) < 0):
    raise ValueError("the curve's experience indices must start at -1 or "
                     f"more and never decrease; got {e.tolist()}")
  t = int(e.max()) + 1
  if t < 1 or a.shape[1] != t:
    raise ValueError(
        f"these metrics need one test set per training experience: the "
        f"curve trains {t} experience(s) and has {a.shape[1]} test sets")
  if step is not None:
    step = np.asarray(step, dtype=np.float64)
    if step.shape != e.shape or np.any(np.diff(step) < 0):
      raise ValueError(f"the curve's steps must have shape {e.shape} and "
                       f"never decrease; got {step.tolist()}")
  return e, a, t, step


def min_accuracy(experience, accuracy) -> float:
  """minACC: the mean over experiences before the last of their lowest
  accuracy at any evaluation after they were trained (NaN for one
  experience)."""
  e, a, t, _ = _curve(experience, accuracy)
  if t < 2:
    return float("nan")
  return float(np.mean([a[e > i, i].min() for i in range(t - 1)]))


def worst_case_accuracy(experience, accuracy) -> float:
  """WCACC: the last experience's final accuracy weighted ``1/T``, and
  :func:`min_accuracy` of the others ``1 - 1/T``."""
  e, a, t, _ = _curve(experience, accuracy)
  last = a[-1, t - 1]
  if t < 2:
    return float(last)
  return float(last / t + (1 - 1 / t) * min_accuracy(e, a))


def seen_accuracy(experience, accuracy,
                  per_experience: bool | None = None) -> np.ndarray:
  """Each curve point's mean accuracy over the experiences seen so far:
  the test sets up to the one of the experience training, or every test
  set when they are not one per experience (Joint's); NaN for the initial
  model. ``per_experience`` None: one per experience when the curve has
  as many test sets as it trains experiences."""
  e = np.asarray(experience)
  a = np.asarray(accuracy, dtype=np.float64)
  if per_experience is None:
    per_experience = a.shape[-1] == int(e.max()) + 1
  return np.array([np.nan if k < 0 else float(np.mean(
      row[:k + 1] if per_experience else row)) for k, row in zip(e, a)])


def anytime_accuracy(step, experience, accuracy) -> float:
  """AAA: the mean accuracy on the experiences seen so far, averaged over
  the training steps (each point stands for the steps since the one
  before it)."""
  e, a, _, s = _curve(experience, accuracy, step)
  return _step_average(s, seen_accuracy(e, a, per_experience=True))


def _step_average(step: np.ndarray, values: np.ndarray) -> float:
  """The mean of ``values[1:]`` weighted by the steps since the point
  before each (the first point, the initial model, has no steps)."""
  w = np.diff(step)
  if len(w) == 0 or w.sum() <= 0:
    raise ValueError("anytime accuracy needs evaluations after training "
                     f"steps; the curve's steps are {step.tolist()}")
  return float(np.sum(w * values[1:]) / w.sum())


def exposed_anytime_accuracy(step, exposed) -> float:
  """Koh et al.'s :math:`A_{AUC}` per training step: the accuracy over the
  test examples of the classes exposed so far (``exposed``, (P,), the
  first point the initial model's and ignored), averaged over the
  training steps as :func:`anytime_accuracy` averages."""
  s = np.asarray(step, dtype=np.float64)
  x = np.asarray(exposed, dtype=np.float64)
  if s.ndim != 1 or x.shape != s.shape or np.any(np.diff(s) < 0):
    raise ValueError(
        f"exposed_anytime_accuracy needs step and exposed of one shape "
        f"(P,), the steps never decreasing; got {s.shape} and {x.shape}")
  return _step_average(s, x)


def exposed_accuracy(class_correct, class_count, exposed) -> np.ndarray:
  """The accuracy over the test examples of the classes ``exposed``:
  correct over examples, summed over those classes (NaN with none).

  Args:
    class_correct: (..., C) each class's correct test examples.
    class_count: (..., C) each class's test examples.
    exposed: (..., C) bool, the classes exposed so far.
  """
  right = np.sum(np.where(exposed, class_correct, 0), axis=-1)
  total = np.sum(np.where(exposed, class_count, 0), axis=-1)
  return np.where(total > 0, right / np.maximum(total, 1), np.nan)


def windowed_forgetting(step, experience, accuracy, window: float) -> float:
  """WF^w over training steps: the mean over the experiences of the largest
  drop in their accuracy between two evaluations at most ``window`` steps
  apart, from the experience's first evaluation on (0 when it never
  drops; the module docstring's formula)."""
  return _windowed(step, experience, accuracy, window, "windowed_forgetting",
                   rise=False)


def windowed_plasticity(step, experience, accuracy, window: float) -> float:
  """WP^w over training steps: the mean over the experiences of the largest
  rise in their accuracy between two evaluations at most ``window`` steps
  apart, from the experience's first evaluation on (how fast it is
  learned; 0 when it never rises)."""
  return _windowed(step, experience, accuracy, window, "windowed_plasticity",
                   rise=True)


def _windowed(step, experience, accuracy, window: float, name: str,
              rise: bool) -> float:
  """:func:`windowed_forgetting` (``rise`` False) or
  :func:`windowed_plasticity` (True); ``name`` for the window's error."""
  e, a, t, s = _curve(experience, accuracy, step)
  checks.positive(f"{name}: window (steps)", window)
  out = []
  for i in range(t):
    acc, steps = a[e >= i, i], s[e >= i]
    if rise:
      acc = -acc  # a rise is a drop of the negated accuracy
    # For each point, the best accuracy within the window before it.
    worst = 0.0
    for m in range(1, len(acc)):
      near = (steps[m] - steps[:m]) <= window
      if near.any():
        worst = max(worst, float(acc[:m][near].max() - acc[m]))
    out.append(worst)
  return float(np.mean(out))


def continual_summary(step, experience, accuracy) -> dict[str, float]:
  """``min_acc`` (two or more experiences), ``wc_acc`` and ``anytime_acc``
  of a continual-evaluation curve with one test set per training
  experience; empty otherwise (Joint's single experience covers them
  all)."""
  e, a = np.asarray(experience), np.asarray(accuracy)
  if e.ndim != 1 or a.ndim != 2 or a.shape[1] != int(e.max()) + 1:
    return {}
  out = {}
  if e.max() >= 1:
    out["min_acc"] = min_accuracy(e, a)
  out["wc_acc"] = worst_case_accuracy(e, a)
  out["anytime_acc"] = anytime_accuracy(step, e, a)
  return out


# --------------------------------------------------------------------------
# The confusion matrix.


def recency_bias(confusion, trained, last) -> float:
  """How often the classes ``last`` (the last experience's) are predicted
  for test examples of the classes ``trained``, over how many of those
  examples are theirs (the module docstring's ``RB``): 1 unbiased, larger
  when the model favours the newest classes.

  Args:
    confusion: ``(C, C)`` counts, ``[y, p]`` examples of class ``y``
      predicted as ``p``.
    trained: the classes trained (rows counted).
    last: the last experience's classes, a subset of ``trained``.
  """
  n = np.asarray(confusion, np.float64)
  if n.ndim != 2 or n.shape[0] != n.shape[1]:
    raise ValueError(f"confusion must be a square (C, C) matrix, got shape "
                     f"{n.shape}")
  trained, last = list(trained), list(last)
  for name, cls in (("trained", trained), ("last", last)):
    bad = [c for c in cls if not 0 <= c < n.shape[0]]
    if not cls or bad:
      raise ValueError(f"{name} must be a non-empty list of classes in "
                       f"[0, {n.shape[0]}), got {cls}")
  if not set(last) <= set(trained):
    raise ValueError(f"last {last} must be among the trained classes "
                     f"{trained}")
  examples = n[last].sum()
  if examples <= 0:
    raise ValueError(f"no test example of the classes {last} (or a matrix "
                     "of unknown counts, -1)")
  return float(n[np.ix_(trained, last)].sum() / examples)
