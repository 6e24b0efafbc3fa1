"""Experiences and streams: split, blurry, permuted, rotated, online, from
arrays.

A :class:`Scenario` is a list of :class:`Experience` records plus what the
learner needs to know about the stream (number of classes and tasks, which
classes each task holds, and the setting):

* ``class``-incremental: one head over all classes, no task id at test time.
* ``task``-incremental: the task id is given; logits are masked to the task's
  classes (split scenarios) or a head is picked per task (multi-head models).
* ``domain``-incremental: the same output classes in every experience, no
  task id: permuted and rotated MNIST, and split streams relabelled to the
  position within their class group (Split MNIST domain-IL: "is the digit
  the first or the second of its pair", one 2-way head; Hsu et al. 2018,
  van de Ven & Tolias 2019).

Everything here is host-side NumPy; the training loop moves arrays to the
device once per experience. Streams that transform one data set (permuted,
rotated) or merge experiences (cumulative, joint) build an experience's
inputs when they are first asked for and keep only the last few: a
Permuted-20 MNIST stream held whole is 20 copies of MNIST (4.4 GB) and a
Cumulative one 210, while a run reads one experience at a time.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Sequence

import numpy as np

from jaxcl import checks
from jaxcl.datasets import Dataset

__all__ = [
    "Experience", "Scenario", "split", "blurry", "permuted", "rotated",
    "online",
    "from_arrays", "joint", "cumulative", "SCENARIO_KINDS", "ScenarioError",
    "Inputs", "given", "OnDemand", "SPLITS",
]

SCENARIO_KINDS = ("class", "task", "domain")


class ScenarioError(ValueError):
  """A scenario was asked for with impossible settings."""


SPLITS = ("train", "test")

# An experience's inputs: split ("train" or "test") -> float32 (N, ...).
Inputs = Callable[[str], np.ndarray]


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ScenarioError(f"unknown split {split!r}; valid: {list(SPLITS)}")


def given(train_x: np.ndarray, test_x: np.ndarray) -> Inputs:
  """:data:`Inputs` holding two arrays."""
  arrays = {"train": train_x, "test": test_x}

  def inputs(split: str) -> np.ndarray:
    _check_split(split)
    return arrays[split]
  return inputs


class OnDemand:
  """Arrays built when first asked for; the ``keep`` most recently used are
  kept (shared by a stream's experiences).

  Built arrays are read-only: one evicted and built again would silently
  lose an in-place change.
  """

  def __init__(self, keep: int = 2):
    if keep < 1:
      raise ScenarioError(f"keep must be >= 1, got {keep}")
    self.keep = keep
    self._kept: collections.OrderedDict = collections.OrderedDict()

  def get(self, key, build: Callable[[], np.ndarray]) -> np.ndarray:
    if key in self._kept:
      self._kept.move_to_end(key)
      return self._kept[key]
    a = build()
    a.flags.writeable = False
    self._kept[key] = a
    if len(self._kept) > self.keep:
      self._kept.popitem(last=False)
    return a


@dataclasses.dataclass(frozen=True)
class Experience:
  """One experience of a stream.

  Attributes:
    index: position in the stream.
    task_id: task label (equal to ``index`` in task-incremental streams, 0
      in class- and domain-incremental ones unless given).
    classes: the classes present in this experience's training data.
    train_y, test_y: int32 labels.
    train_task, test_task: int32 per-example task ids (for Joint and
      Cumulative, whose training data mixes tasks).
    inputs: the float32 images by split (:data:`Inputs`): :func:`given`
      arrays, or built on demand (:class:`OnDemand`); read them as
      ``train_x`` and ``test_x``.
  """
  index: int
  task_id: int
  classes: tuple[int, ...]
  train_y: np.ndarray
  test_y: np.ndarray
  train_task: np.ndarray
  test_task: np.ndarray
  inputs: Inputs

  @property
  def train_x(self) -> np.ndarray:
    return self.inputs("train")

  @property
  def test_x(self) -> np.ndarray:
    return self.inputs("test")

  @property
  def num_train(self) -> int:
    return len(self.train_y)


@dataclasses.dataclass(frozen=True)
class Scenario:
  """A stream of experiences.

  Attributes:
    name: a descriptive name (e.g. ``split_mnist``).
    kind: ``class``, ``task`` or ``domain`` (incremental setting).
    experiences: the training stream, in order.
    num_classes: number of output classes of a single-head model.
    num_tasks: number of distinct task ids.
    task_classes: bool ``(num_tasks, num_classes)``: classes of each task,
      used to mask logits in the task-incremental setting.
    online: single pass over the data (one epoch, small batches).
    eval_experiences: experiences whose test sets fill the accuracy
      matrix's columns (equal to ``experiences`` except for Joint).
    recut: ``'joint'`` or ``'cumulative'`` once :func:`joint` or
      :func:`cumulative` re-cut the training stream, else ``''`` (they
      refuse a stream already re-cut: applied twice, Cumulative would
      repeat old data).
  """
  name: str
  kind: str
  experiences: tuple[Experience, ...]
  num_classes: int
  num_tasks: int
  task_classes: np.ndarray
  online: bool = False
  eval_experiences: tuple[Experience, ...] | None = None
  recut: str = ""

  def __post_init__(self):
    if self.kind not in SCENARIO_KINDS:
      raise ScenarioError(
          f"unknown scenario kind {self.kind!r}; valid: {SCENARIO_KINDS}")
    if self.eval_experiences is None:
      object.__setattr__(self, "eval_experiences", self.experiences)

  @property
  def input_shape(self) -> tuple[int, ...]:
    # From a test set: a run builds every test set first (to evaluate the
    # random init), so this one is then still kept; a training set read
    # here was built again for training (0.9 s on Rotated MNIST).
    return tuple(self.eval_experiences[0].test_x.shape[1:])

  def __len__(self) -> int:
    return len(self.experiences)


def _task_classes(classes_per_task: Sequence[Sequence[int]],
                  num_classes: int) -> np.ndarray:
  m = np.zeros((len(classes_per_task), num_classes), bool)
  for t, cs in enumerate(classes_per_task):
    m[t, list(cs)] = True
  return m


def _check_kind(kind: str) -> None:
  if kind not in SCENARIO_KINDS:
    raise ScenarioError(
        f"unknown scenario kind {kind!r}; valid: {SCENARIO_KINDS}")


def split(data: Dataset, n_experiences: int = 5, kind: str = "class",
          class_order: Sequence[int] | None = None,
          seed: int | None = None, first_classes: int = 0) -> Scenario:
  """Splits a data set by classes into ``n_experiences`` disjoint groups.

  Args:
    data: the data set.
    n_experiences: number of experiences; must divide ``data.num_classes``
      (without ``first_classes``).
    kind: ``class`` (one head over all classes, no task id), ``task`` (task
      id given; logits masked to the task's classes) or ``domain`` (no task
      id; each label becomes its position within its experience's group, so
      every experience has the same ``C / n_experiences`` output classes;
      e.g. Split MNIST 5x2 asks "first or second digit of the pair", with
      digits 0, 2, 4, 6, 8 labelled 0 and the odd ones 1).
    class_order: explicit order of classes; experiences take consecutive
      groups. Default: ``0..C-1``, or a permutation drawn from ``seed``.
    seed: seeds a random class order when ``class_order`` is None.
    first_classes: > 0: the first experience learns this many classes and
      the other ``n_experiences - 1`` share the rest equally (the "B50
      Inc10" protocols of LUCIR, PODNet and PyCIL's ``init_cls``; FACIL's
      ``--nc-first-task``; Avalanche's ``per_exp_classes={0: ...}``).
      0: every experience learns ``C / n_experiences`` classes.
  """
  _check_kind(kind)
  c = data.num_classes
  bounds = _class_bounds(c, n_experiences, first_classes, data.name)
  if first_classes and kind == "domain":
    raise ScenarioError(
        f"first_classes={first_classes} with kind='domain': a "
        "domain-incremental stream relabels every experience to the same "
        "classes, so its experiences must be the same size")
  order = _class_order(c, class_order, seed)
  groups = [order[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
  domain = kind == "domain"
  # Domain-IL: original label -> its position within its group.
  position = np.empty(c, np.int32)
  for g in groups:
    position[g] = np.arange(len(g))
  exps = []
  for i, cs in enumerate(groups):
    tr = np.isin(data.train_y, cs)
    te = np.isin(data.test_y, cs)
    tid = i if kind == "task" else 0
    ty, vy = data.train_y[tr], data.test_y[te]
    if domain:
      ty, vy = position[ty], position[vy]
    classes = range(len(cs)) if domain else cs
    exps.append(Experience(
        index=i, task_id=tid, classes=tuple(int(k) for k in classes),
        train_y=ty, test_y=vy,
        train_task=np.full(tr.sum(), tid, np.int32),
        test_task=np.full(te.sum(), tid, np.int32),
        inputs=given(data.train_x[tr], data.test_x[te])))
  num_tasks = n_experiences if kind == "task" else 1
  num_out = len(groups[0]) if domain else c
  tc = _task_classes(groups if kind == "task" else [range(num_out)],
                     num_out)
  return Scenario(f"split_{data.name}", kind, tuple(exps), num_out, num_tasks,
                  tc)


def _class_bounds(c: int, n_experiences: int, first_classes: int,
                  name: str) -> list[int]:
  """Where each experience's classes start in the class order, and the
  end: ``n_experiences + 1`` offsets."""
  if not checks.is_whole(first_classes) or first_classes < 0:
    raise ScenarioError(f"first_classes must be a whole number >= 0 (0: "
                        f"equal experiences), got {first_classes!r}")
  if not first_classes:
    if n_experiences < 1 or c % n_experiences:
      raise ScenarioError(
          f"n_experiences={n_experiences} does not divide the {c} classes "
          f"of {name}; valid: "
          f"{[k for k in range(1, c + 1) if c % k == 0]}")
    return list(range(0, c + 1, c // n_experiences))
  rest = c - first_classes
  if rest < 1:
    raise ScenarioError(f"first_classes={first_classes} leaves no class for "
                        f"the later experiences; {name} has {c} classes")
  if n_experiences < 2 or rest % (n_experiences - 1):
    valid = [k + 1 for k in range(1, rest + 1) if rest % k == 0]
    raise ScenarioError(
        f"first_classes={first_classes} with n_experiences={n_experiences}: "
        f"the {rest} classes of {name} after the first experience's do not "
        f"split equally over {n_experiences - 1} more experiences; valid "
        f"n_experiences: {valid}")
  step = rest // (n_experiences - 1)
  return [0] + list(range(first_classes, c + 1, step))


def _class_order(c: int, class_order: Sequence[int] | None,
                 seed: int | None) -> np.ndarray:
  """``class_order`` checked, or ``0..c-1``, or a permutation drawn from
  ``seed``."""
  if class_order is None:
    return (np.arange(c) if seed is None else
            np.random.default_rng(seed).permutation(c))
  # Compared as given: casting first made (1.5,) read as [1] and 'abc' a
  # bare int() error.
  asked = list(class_order)
  if not all(checks.is_whole(k) for k in asked) or sorted(
      int(k) for k in asked) != list(range(c)):
    raise ScenarioError(
        f"class_order {asked} is not a permutation of 0..{c - 1}")
  return np.asarray(asked, dtype=np.int64)


def blurry(data: Dataset, n_experiences: int = 5, disjoint: float = 0.5,
           blurred: float = 0.1, class_order: Sequence[int] | None = None,
           seed: int | None = None, sample_seed: int = 0) -> Scenario:
  """A class-incremental stream with blurry boundaries: i-Blurry-N-M.

  Koh, Kim, Kim, Moon, Choi & Choi, "Online continual learning on class
  incremental blurry task configuration with anytime inference", ICLR
  2022 (their ``MemorySampler``): a fraction ``N`` of the classes is
  *disjoint*, each seen in one experience only, as in :func:`split`; the
  other classes are *blurry*: each has a home experience, but a fraction
  ``M`` of each experience's blurry-class training examples is pooled,
  shuffled and dealt out evenly over all experiences, so those classes
  also turn up, a few at a time, before and after their home. ``N = 1``
  is :func:`split`; ``N = 0`` is the Blurry-M stream of Bang et al.,
  "Rainbow memory", CVPR 2021, where every class leaks.

  The classes are ordered as :func:`split` orders them; experience ``i``
  takes the ``i``-th group of the first ``N C`` (its disjoint classes)
  and the ``i``-th group of the rest (its blurry home classes). Its test
  set holds its home classes, so the test sets partition the test data
  and ``R[i, j]`` reads as in a split stream; its ``classes`` are those
  present in its training data (home and leaked). Two differences from
  the reference code: it drops the classes left over when ``N C`` or
  ``(1 - N) C`` does not divide by the experiences (here refused), and
  drops the pool's remainder after the even deal (here the first
  experiences get one more); it moves the first ``M`` of each
  experience's examples in the data's order, here a random ``M`` drawn
  from ``sample_seed``.

  Args:
    data: the data set.
    n_experiences: number of experiences; must divide the disjoint and
      the blurry classes.
    disjoint: ``N``, the fraction of the classes that are disjoint.
    blurred: ``M``, the fraction of the blurry classes' training examples
      dealt out over all experiences.
    class_order, seed: as in :func:`split`.
    sample_seed: seeds which examples are dealt out and where.
  """
  c = data.num_classes
  for name, v in (("disjoint", disjoint), ("blurred", blurred)):
    if not (checks.is_real(v) and 0 <= v <= 1):
      raise ScenarioError(f"blurry: {name} must be a fraction in [0, 1], "
                          f"got {v!r}")
  if n_experiences < 1:
    raise ScenarioError(f"n_experiences must be >= 1, got {n_experiences}")
  n_dis = int(round(disjoint * c))
  if (abs(disjoint * c - n_dis) > 1e-6 or n_dis % n_experiences or
      (c - n_dis) % n_experiences):
    valid = [f"{k / c:g}" for k in range(c + 1)
             if k % n_experiences == 0 and (c - k) % n_experiences == 0]
    if not valid:
      raise ScenarioError(
          f"blurry: n_experiences={n_experiences} does not divide "
          f"{data.name}'s {c} classes, so no split into disjoint and "
          f"blurry classes spreads evenly; valid: "
          f"{[k for k in range(1, c + 1) if c % k == 0]}")
    raise ScenarioError(
        f"blurry: disjoint={disjoint!r} of {data.name}'s {c} classes over "
        f"{n_experiences} experiences: the disjoint and the blurry classes "
        f"must each split evenly over the experiences; valid: {valid}")
  checks.whole("blurry: sample_seed", sample_seed, 0)
  order = _class_order(c, class_order, seed)
  home = np.empty(c, np.int64)  # each class's home experience
  home[order[:n_dis]] = np.repeat(np.arange(n_experiences),
                                  n_dis // n_experiences)
  home[order[n_dis:]] = np.repeat(np.arange(n_experiences),
                                  (c - n_dis) // n_experiences)
  is_blurry = np.zeros(c, bool)
  is_blurry[order[n_dis:]] = True
  rng = np.random.default_rng(sample_seed)
  kept, pool = [], []
  for i in range(n_experiences):
    mine = np.flatnonzero(home[data.train_y] == i)
    leaky = mine[is_blurry[data.train_y[mine]]]
    moved = rng.permutation(leaky)[:int(len(leaky) * blurred)]
    kept.append(np.setdiff1d(mine, moved))
    pool.append(moved)
  pool = rng.permutation(np.concatenate(pool))
  exps = []
  for i, dealt in enumerate(np.array_split(pool, n_experiences)):
    tr = np.sort(np.concatenate([kept[i], dealt]))
    te = home[data.test_y] == i
    ty = data.train_y[tr]
    exps.append(Experience(
        index=i, task_id=0, classes=tuple(int(k) for k in np.unique(ty)),
        train_y=ty, test_y=data.test_y[te],
        train_task=np.zeros(len(tr), np.int32),
        test_task=np.zeros(int(te.sum()), np.int32),
        inputs=given(data.train_x[tr], data.test_x[te])))
  name = (f"blurry{round(100 * disjoint)}-{round(100 * blurred)}_"
          f"{data.name}")
  return Scenario(name, "class", tuple(exps), c, 1, np.ones((1, c), bool))


def _same_classes_stream(data: Dataset, name: str, kind: str,
                         transforms) -> Scenario:
  """Domain-/task-incremental streams that transform the inputs (each
  experience's inputs built on demand)."""
  _check_kind(kind)
  if kind == "class":
    raise ScenarioError(f"{name} streams are domain- or task-incremental "
                        "(the classes repeat); got kind='class'")
  source = {"train": data.train_x, "test": data.test_x}
  built = OnDemand()

  def transformed(i, f) -> Inputs:
    def inputs(split: str) -> np.ndarray:
      _check_split(split)
      return built.get((i, split), lambda: f(source[split]))
    return inputs

  exps = []
  for i, f in enumerate(transforms):
    tid = i if kind == "task" else 0
    exps.append(Experience(
        index=i, task_id=tid, classes=tuple(range(data.num_classes)),
        train_y=data.train_y, test_y=data.test_y,
        train_task=np.full(len(data.train_y), tid, np.int32),
        test_task=np.full(len(data.test_y), tid, np.int32),
        inputs=transformed(i, f)))
  num_tasks = len(exps) if kind == "task" else 1
  tc = np.ones((num_tasks, data.num_classes), bool)
  return Scenario(f"{name}_{data.name}", kind, tuple(exps), data.num_classes,
                  num_tasks, tc)


def permuted(data: Dataset, n_experiences: int = 10, kind: str = "domain",
             seed: int = 0, first_identity: bool = False,
             pad: int = 0) -> Scenario:
  """A fixed random pixel permutation per experience (seeded).

  Args:
    first_identity: keep the first experience unpermuted (as in some
      papers); off by default so that every experience is a permutation.
    pad: zero pixels added on each side of ``(N, H, W, C)`` images before
      permuting (the reference codes of van de Ven & Tolias 2019 and von
      Oswald et al. 2020 pad MNIST to 32x32, i.e. ``pad=2``). The padding is
      permuted with the image, so each permutation leaves a different set
      of inputs blank.
  """
  if n_experiences < 1:
    raise ScenarioError(f"n_experiences must be >= 1, got {n_experiences}")
  if pad < 0 or int(pad) != pad:
    raise ScenarioError(f"pad must be a whole number of pixels >= 0, got "
                        f"{pad!r}")
  if pad and data.train_x.ndim != 4:
    raise ScenarioError(f"pad needs (N, H, W, C) images; {data.name!r} has "
                        f"examples of shape {data.train_x.shape[1:]}")
  pad = int(pad)
  shape = list(data.train_x.shape[1:])
  if pad:
    shape[0] += 2 * pad
    shape[1] += 2 * pad
  d = int(np.prod(shape))
  rng = np.random.default_rng(seed)
  perms = [np.arange(d) if (first_identity and i == 0) else rng.permutation(d)
           for i in range(n_experiences)]

  def padded(x):
    if not pad:
      return x
    return np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def make(p):
    def f(x):
      x = padded(x)
      # np.take along the pixel axis: 2x faster than x[:, p] here.
      return np.take(x.reshape(len(x), -1), p, axis=1).reshape(x.shape)
    return f

  sc = _same_classes_stream(data, "permuted", kind, [make(p) for p in perms])
  return dataclasses.replace(sc, name=f"permuted_{data.name}")


ROTATION_INTERPOLATIONS = ("bilinear", "nearest")


def _rotate(x: np.ndarray, degrees: float,
            interpolation: str = "bilinear") -> np.ndarray:
  """Rotates ``(N, H, W, C)`` images counter-clockwise about their centre.

  The convention of PIL's ``Image.rotate`` and torchvision's ``rotate``:
  positive degrees turn the image counter-clockwise as displayed (row 0 at
  the top), about the point between the middle pixels, filling with zeros.
  ``nearest`` is their default resampling and reproduces PIL pixel for
  pixel (tested); ``bilinear`` blends the four neighbours.
  """
  n, h, w, c = x.shape
  t = np.deg2rad(degrees)
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  # Inverse mapping: for each output pixel, where it comes from.
  sy = np.cos(t) * (yy - cy) + np.sin(t) * (xx - cx) + cy
  sx = -np.sin(t) * (yy - cy) + np.cos(t) * (xx - cx) + cx

  def pixels(yi, xi):  # source pixels, and whether they lie in the image
    ok = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
    # One np.take over flat pixel indices: ~3x faster than indexing
    # x[:, yi, xi, :] with two index arrays (same values).
    flat = np.clip(yi, 0, h - 1) * w + np.clip(xi, 0, w - 1)
    src = np.take(x.reshape(n, h * w, c), flat.reshape(-1), axis=1)
    return src.reshape(n, h, w, c), ok

  if interpolation == "nearest":
    # PIL samples at pixel centres and floors: round half up.
    src, ok = pixels(np.floor(sy + 0.5).astype(int),
                     np.floor(sx + 0.5).astype(int))
    src[:, ~ok] = 0  # in place: a fresh array per step is page faults
    return src
  y0, x0 = np.floor(sy).astype(int), np.floor(sx).astype(int)
  wy, wx = sy - y0, sx - x0
  out = np.zeros_like(x)
  for dy, dx, wgt in ((0, 0, (1 - wy) * (1 - wx)), (1, 0, wy * (1 - wx)),
                      (0, 1, (1 - wy) * wx), (1, 1, wy * wx)):
    src, ok = pixels(y0 + dy, x0 + dx)
    src *= (wgt * ok)[None, :, :, None].astype(x.dtype)
    out += src
  return out


def rotated(data: Dataset, n_experiences: int | None = None,
            kind: str = "domain",
            angles: Sequence[float] | None = None, seed: int = 0,
            max_angle: float = 180.0,
            interpolation: str = "bilinear") -> Scenario:
  """A fixed rotation per experience.

  Args:
    n_experiences: the number of drawn angles (default 20); with explicit
      ``angles``, it may be left out or must equal their number.
    angles: explicit angles in degrees, counter-clockwise; default draws
      ``n_experiences`` angles uniformly in ``[0, max_angle)`` from ``seed``
      (as in the GEM paper's Rotated MNIST).
    interpolation: ``bilinear`` or ``nearest`` (torchvision's default, so
      Mammoth's ``rot-mnist``).
  """
  if interpolation not in ROTATION_INTERPOLATIONS:
    raise ScenarioError(f"unknown interpolation {interpolation!r}; valid: "
                        f"{list(ROTATION_INTERPOLATIONS)}")
  if angles is None:
    n_experiences = 20 if n_experiences is None else n_experiences
    if n_experiences < 1:
      raise ScenarioError(f"n_experiences must be >= 1, got {n_experiences}")
    angles = np.random.default_rng(seed).uniform(0, max_angle, n_experiences)
  elif n_experiences is not None and n_experiences != len(angles):
    # Either would silently win over the other.
    raise ScenarioError(f"{len(angles)} angles but n_experiences="
                        f"{n_experiences}; give one angle per experience")
  angles = [float(a) for a in angles]
  sc = _same_classes_stream(
      data, "rotated", kind,
      [lambda x, a=a: _rotate(x, a, interpolation) for a in angles])
  return dataclasses.replace(sc, name=f"rotated_{data.name}")


def online(scenario: Scenario) -> Scenario:
  """The streaming variant: one pass over each experience (set the batch
  size to the stream's, e.g. 10, in the training config)."""
  return dataclasses.replace(scenario, online=True,
                             name=f"online_{scenario.name}")


def from_arrays(train: Sequence[tuple[np.ndarray, np.ndarray]],
                test: Sequence[tuple[np.ndarray, np.ndarray]],
                kind: str = "class", num_classes: int | None = None,
                name: str = "arrays") -> Scenario:
  """A scenario from user arrays: one ``(x, y)`` pair per experience.

  ``x`` may be ``(N, D)`` or ``(N, H, W, C)``; labels are ints in
  ``[0, num_classes)``.
  """
  _check_kind(kind)
  if len(train) != len(test) or not train:
    raise ScenarioError(
        f"need one test pair per train pair; got {len(train)} train and "
        f"{len(test)} test experiences")
  ys = np.concatenate([np.asarray(y) for _, y in list(train) + list(test)])
  c = int(num_classes if num_classes is not None else ys.max() + 1)
  if ys.min() < 0 or ys.max() >= c:
    raise ScenarioError(f"labels must lie in [0, {c}); got [{ys.min()}, "
                        f"{ys.max()}]")
  exps, groups = [], []
  for i, ((tx, ty), (vx, vy)) in enumerate(zip(train, test)):
    tx, vx = np.asarray(tx, np.float32), np.asarray(vx, np.float32)
    ty, vy = np.asarray(ty, np.int32), np.asarray(vy, np.int32)
    if len(tx) != len(ty) or len(vx) != len(vy):
      raise ScenarioError(f"experience {i}: x and y lengths differ")
    tid = i if kind == "task" else 0
    cs = tuple(int(k) for k in np.unique(ty))
    groups.append(cs)
    exps.append(Experience(i, tid, cs, ty, vy,
                           np.full(len(ty), tid, np.int32),
                           np.full(len(vy), tid, np.int32), given(tx, vx)))
  if kind == "task":
    tc = _task_classes(groups, c)
  else:
    tc = np.ones((1, c), bool)
  return Scenario(name, kind, tuple(exps), c, tc.shape[0], tc)


def _merged(exps: Sequence[Experience], index: int,
            built: OnDemand) -> Experience:
  """The training data of ``exps`` together (its inputs built on demand),
  tested on the last one's test set."""
  cat = lambda f: np.concatenate([getattr(e, f) for e in exps])

  def inputs(split: str) -> np.ndarray:
    _check_split(split)
    if split == "test":
      return exps[-1].test_x
    return built.get(index, lambda: cat("train_x"))

  return Experience(
      index=index, task_id=exps[-1].task_id,
      classes=tuple(sorted({c for e in exps for c in e.classes})),
      train_y=cat("train_y"), test_y=exps[-1].test_y,
      train_task=cat("train_task"), test_task=exps[-1].test_task,
      inputs=inputs)


def _check_not_recut(scenario: Scenario, how: str) -> None:
  if scenario.recut:
    raise ScenarioError(
        f"{how}: stream {scenario.name!r} was already re-cut by "
        f"{scenario.recut}; pass the stream as built (a joint or cumulative "
        "strategy re-cuts it when the run starts)")


def joint(scenario: Scenario) -> Scenario:
  """The offline upper bound: one experience with all training data; the
  accuracy matrix keeps one column per original experience."""
  _check_not_recut(scenario, "joint")
  return dataclasses.replace(
      scenario, experiences=(_merged(scenario.experiences, 0, OnDemand()),),
      eval_experiences=scenario.eval_experiences,
      name=f"joint_{scenario.name}", recut="joint")


def cumulative(scenario: Scenario) -> Scenario:
  """Experience i trains on the union of experiences 0..i."""
  _check_not_recut(scenario, "cumulative")
  exps = scenario.experiences
  built = OnDemand()
  return dataclasses.replace(
      scenario,
      experiences=tuple(_merged(exps[:i + 1], i, built)
                        for i in range(len(exps))),
      eval_experiences=scenario.eval_experiences,
      name=f"cumulative_{scenario.name}", recut="cumulative")
