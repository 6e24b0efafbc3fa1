"""Continual evaluation (``train.eval_every_steps``): every point of the
accuracy curve is the accuracy of the state at its step (recomputed here
with NumPy from a state trained chunk by chunk), the points fall where the
docstrings say, evaluating changes nothing the run trains, and the curve
reaches the metrics, the reporter, the run directory, a sweep and the dry
run's description."""

import csv
import dataclasses
import json
import os

import jax
import ml_collections
import numpy as np
import pytest

import jaxcl
from jaxcl import experiment, metrics, train
from test_experiment import Recorder, _np_accuracy
from test_train import quick_config


class CurveRecorder(Recorder):
  def curve(self, experience, row, step):
    self.log.append(("curve", experience, np.asarray(row), step))


@pytest.fixture(scope="module")
def two(full_stream):
  """Classes 0-1 then 2-3, tested on those two experiences only (one test
  set per training experience, as the curve's metrics need)."""
  exps = full_stream.experiences[:2]
  return dataclasses.replace(full_stream, experiences=exps,
                             eval_experiences=exps)


# 270 training examples per experience in batches of 16: 17 steps per
# epoch. Every 5 steps and at each epoch's end; the last epoch's end is
# the experience's row of the matrix.
EXPECTED_STEPS = [0, 5, 10, 15, 17, 22, 27, 32, 34,
                  39, 44, 49, 51, 56, 61, 66, 68]
EXPECTED_EXPERIENCE = [-1] + [0] * 8 + [1] * 8


def test_each_point_is_the_accuracy_of_the_state_at_its_step(two):
  c = quick_config(**{"train.epochs": 2, "train.eval_every_steps": 5})
  s = experiment.setup(c, two)
  assert (s.learner.chunk_steps, s.learner.epoch_steps) == (5, 20)
  rec = CurveRecorder()
  r = experiment.execute(s, experiment.initial_state(s, 0), reporter=rec)
  curve = r.curve
  assert curve.step.tolist() == EXPECTED_STEPS
  assert curve.experience.tolist() == EXPECTED_EXPERIENCE
  np.testing.assert_array_equal(curve.accuracy[0], r.random_accuracy)
  np.testing.assert_array_equal(curve.accuracy[8], r.accuracy[0])
  np.testing.assert_array_equal(curve.accuracy[-1], r.accuracy[1])

  # The state after 10 and after 17 steps (an epoch's end), trained here
  # chunk by chunk, evaluated with NumPy.
  s2 = experiment.setup(c, two)
  learner, ctx = s2.learner, s2.learner.ctx
  state = experiment.initial_state(s2, 0)
  exp = two.experiences[0]
  data = train.device_experience(exp, ctx.info.train_size)
  for start, point in ((0, None), (5, 2), (10, None), (15, 4)):
    state, _, _ = learner.chunk_fn(state, data, exp.num_train, 0, 0, start)
    if point is not None:
      assert int(state.step) == EXPECTED_STEPS[point]
      host = jax.tree.map(np.asarray, state)
      np.testing.assert_allclose(
          curve.accuracy[point],
          _np_accuracy(ctx, host.params, host.model_state,
                       two.eval_experiences), atol=1e-6)

  # Experience 0 is forgotten while experience 1 trains (Naive, class-
  # incremental), and the reporter saw every point in order.
  assert curve.accuracy[9, 0] < 0.5 < curve.accuracy[8, 0]
  seen = [e for e in rec.log if e[0] == "curve"]
  assert [e[3] for e in seen] == EXPECTED_STEPS
  assert [e[1] for e in seen] == EXPECTED_EXPERIENCE
  for k, e in enumerate(seen):
    np.testing.assert_array_equal(e[2], curve.accuracy[k])

  # The curve's metrics join the matrix's.
  want = metrics.continual_summary(curve.step, curve.experience,
                                   curve.accuracy)
  assert set(want) == {"min_acc", "wc_acc", "anytime_acc"}
  for k, v in want.items():
    assert r.metrics[k] == pytest.approx(v)
  # The minimum over the curve is at most the matrix's R[1, 0].
  assert r.metrics["min_acc"] <= r.accuracy[1, 0]


def test_evaluating_changes_nothing_the_run_trains(two):
  """A run with continual evaluation (chunks of 3 steps) ends bit-identical
  to one without (chunks of an epoch): same state, same matrix."""
  runs = [jaxcl.run(quick_config(**{"train.eval_every_steps": n,
                                    "strategy.name": "replay"}),
                    scenario=two) for n in (0, 3)]
  assert runs[0].curve is None and runs[1].curve is not None
  assert runs[1].learner.chunk_steps == 3
  np.testing.assert_array_equal(runs[0].accuracy, runs[1].accuracy)
  for a, b in zip(jax.tree.leaves(runs[0].state),
                  jax.tree.leaves(runs[1].state)):
    np.testing.assert_array_equal(a, b)
  assert "min_acc" not in runs[0].metrics


def test_chunks_end_at_every_checkpoint_and_evaluation():
  """The chunk is the greatest common divisor of the two intervals below
  an epoch; an interval of an epoch or more acts at the epochs' ends."""
  s = experiment.setup(quick_config())
  ctx, strategy = s.learner.ctx, s.learner.strategy
  steps = s.learner.epoch_steps
  assert steps == 17

  def chunk(ck, ev):
    learner = train.make_learner(ctx, strategy, epochs=1,
                                 checkpoint_every_steps=ck,
                                 eval_every_steps=ev)
    return learner.chunk_steps, learner.epoch_steps

  assert chunk(0, 0) == (17, 17)
  assert chunk(6, 4) == (2, 18)
  assert chunk(0, 4) == (4, 20)
  assert chunk(6, 0) == (6, 18)
  assert chunk(6, 17) == (6, 18)
  assert chunk(40, 4) == (4, 20)
  with pytest.raises(ValueError, match=r"train.eval_every_steps must be >= "
                     r"0.*got -1"):
    chunk(0, -1)
  for bad in (-1, True, 2.5):
    c = quick_config()
    # A config file may build its own train section (no int type to keep).
    c.train = ml_collections.ConfigDict(dict(c.train, eval_every_steps=bad))
    with pytest.raises(ValueError, match=r"train.eval_every_steps must be an "
                       rf"int >= 0 .*got {bad!r}"):
      experiment.setup(c)


def test_checkpoints_and_evaluations_keep_their_own_steps(two, tmp_path,
                                                          monkeypatch):
  """Saves every 6 steps, evaluations every 4: both fall where asked
  (chunks of 2 steps), not at every chunk."""
  from jaxcl import checkpoint
  c = quick_config(**{"train.eval_every_steps": 4, "train.epochs": 2,
                      "checkpoint.every_steps": 6})
  c.report.tensorboard = c.report.plots = False
  saved = []
  real = checkpoint.Checkpointer.save
  monkeypatch.setattr(checkpoint.Checkpointer, "save",
                      lambda self, st, pr, pos, seconds=None: (
                          saved.append(pos), real(self, st, pr, pos,
                                                  seconds))[1])
  r = jaxcl.run(c, str(tmp_path), scenario=two)
  assert r.learner.chunk_steps == 2
  # Inside experience 0 (17 steps, epochs padded to 18): steps 6, 12 and
  # the first epoch's end (saved as epoch 1, step 0), then 6 and 12 of the
  # second epoch; its end is the experience's.
  inside = [(p.epoch, p.step) for p in saved
            if p.experience == 0 and p.phase == "train"]
  assert inside == [(0, 6), (0, 12), (1, 0), (1, 6), (1, 12)]
  assert saved[len(inside)] == checkpoint.Position(1, "begin")
  # Evaluations at 4, 8, 12, 16 and 17 (the end) of each epoch.
  assert r.curve.step.tolist() == [0, 4, 8, 12, 16, 17, 21, 25, 29, 33, 34,
                                   38, 42, 46, 50, 51, 55, 59, 63, 67, 68]


def test_run_directory_holds_the_curve(two, tmp_path):
  c = quick_config(**{"train.eval_every_steps": 6})
  c.report.tensorboard = False
  r = jaxcl.run(c, str(tmp_path), scenario=two)
  with open(tmp_path / "accuracy_curve.csv") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["step", "experience", "acc_exp0", "acc_exp1",
                     "average_accuracy_seen", "exposed_accuracy"]
  body = rows[1:]
  assert [int(row[0]) for row in body] == r.curve.step.tolist()
  assert [int(row[1]) for row in body] == r.curve.experience.tolist()
  got = np.array([[float(v) for v in row[2:4]] for row in body])
  np.testing.assert_allclose(got, r.curve.accuracy, atol=1e-6)
  # The average over the experiences seen: test set 0 while experience 0
  # trains, both while experience 1 does; none for the initial model.
  assert body[0][4] == ""
  for row, e, a in zip(body[1:], r.curve.experience[1:],
                       r.curve.accuracy[1:]):
    assert float(row[4]) == pytest.approx(a[:e + 1].mean(), abs=1e-6)
  # The exposed classes' accuracy (class-incremental), none initially.
  assert body[0][5] == ""
  np.testing.assert_allclose([float(row[5]) for row in body[1:]],
                             r.curve.exposed[1:], atol=1e-6)
  assert os.path.getsize(tmp_path / "accuracy_curve.png") > 0
  with open(tmp_path / "metrics.jsonl") as f:
    logged = [json.loads(line) for line in f]
  points = [x for x in logged if "curve_accuracy" in x]
  assert [x["step"] for x in points] == r.curve.step.tolist()
  assert "curve_exposed_accuracy" not in points[0]
  np.testing.assert_allclose([x["curve_exposed_accuracy"]
                              for x in points[1:]], r.curve.exposed[1:])
  final = [x for x in logged if "final" in x][0]["final"]
  assert final["wc_acc"] == pytest.approx(r.metrics["wc_acc"])
  with open(tmp_path / "accuracy_matrix.json") as f:
    assert json.load(f)["metrics"]["anytime_acc"] == pytest.approx(
        r.metrics["anytime_acc"])


def test_a_sweeps_curves_are_its_runs(two):
  """Two stacked runs: one curve per run, each run's metrics from its own
  curve, the reporter given the mean."""
  rec = CurveRecorder()
  s = experiment.setup(quick_config(**{"train.eval_every_steps": 8}), two)
  stacked = experiment._stack([experiment.initial_state(s, 0),
                               experiment.initial_state(s, 1)])
  r = experiment.execute(s, stacked, members=2, reporter=rec)
  assert r.curve.accuracy.shape == (2, len(r.curve.step), 2)
  assert not np.array_equal(r.curve.accuracy[0], r.curve.accuracy[1])
  for m in range(2):
    np.testing.assert_array_equal(r.curve.accuracy[m, -1], r.accuracy[m, 1])
    want = metrics.continual_summary(r.curve.step, r.curve.experience,
                                     r.curve.accuracy[m])
    for k, v in want.items():
      assert r.metrics[k][m] == pytest.approx(v)
  points = [e for e in rec.log if e[0] == "curve"]
  for k, e in enumerate(points):
    np.testing.assert_allclose(e[2], r.curve.accuracy[:, k].mean(0))
  np.testing.assert_allclose(rec.log[-1][1].curve.accuracy,
                             r.curve.accuracy.mean(0))


def test_dry_run_says_when_it_evaluates(two):
  s = experiment.setup(quick_config(**{"train.eval_every_steps": 5,
                                       "train.epochs": 2}), two)
  text = experiment.describe(s, experiment.initial_state(s, 0))
  # Per epoch at most 20 // 5 + 1 points, over 2 epochs.
  assert ("continual evaluation: every 5 steps of each epoch and at its "
          "end, up to 10 evaluations of every test set per experience "
          "(compiled chunks of 5 steps)") in text
  plain = experiment.setup(quick_config(), two)
  assert "continual" not in experiment.describe(
      plain, experiment.initial_state(plain, 0))


def test_sweep_json_holds_each_runs_curve(two, tmp_path):
  """``jaxcl sweep``'s per-run record has each run's curve (the run
  directory's CSV is their mean); a one-run sweep's curve is stacked as a
  sweep's, like its matrix."""
  from jaxcl import sweep
  c = quick_config(**{"train.eval_every_steps": 8})
  c.report.tensorboard = c.report.plots = False
  out = sweep.sweep(c, seeds=[0, 1], workdir=str(tmp_path / "s"),
                    scenario=two)
  with open(tmp_path / "s" / "sweep.json") as f:
    data = json.load(f)
  got = data["curve"]
  assert got["step"] == out.result.curve.step.tolist()
  assert got["experience"] == out.result.curve.experience.tolist()
  acc = np.asarray(got["accuracy"])
  assert acc.shape == (2, len(got["step"]), 2)
  for m in range(2):
    want = metrics.continual_summary(got["step"], got["experience"], acc[m])
    for k, v in want.items():
      assert data["metrics"][m][k] == pytest.approx(v)
  with open(tmp_path / "s" / "accuracy_curve.csv") as f:
    rows = list(csv.reader(f))[1:]
  np.testing.assert_allclose([[float(v) for v in r[2:4]] for r in rows],
                             acc.mean(0), atol=1e-6)
  one = sweep.sweep(c, seeds=[3], scenario=two)
  assert one.result.curve.accuracy.shape == (1, len(got["step"]), 2)
  assert one.metrics[0]["wc_acc"] == pytest.approx(metrics.continual_summary(
      one.result.curve.step, one.result.curve.experience,
      one.result.curve.accuracy[0])["wc_acc"])


# --------------------------------------------------------------------------
# Koh et al.'s accuracy over the classes exposed so far (A_AUC).


def _hand_a_auc(step, exposed):
  """A_AUC per step, written out: each point after the first weighted by
  the steps since the one before."""
  num = den = 0.0
  for k in range(1, len(step)):
    num += (step[k] - step[k - 1]) * exposed[k]
    den += step[k] - step[k - 1]
  return num / den


@pytest.fixture(scope="module")
def blurry_run(digits):
  """i-Blurry-50-30 on digits (5 experiences; each experience's blurry
  classes also turn up, a few at a time, in all the others), Replay,
  evaluated every 5 steps."""
  from jaxcl import scenarios
  sc = scenarios.blurry(digits, 5, disjoint=0.5, blurred=0.3)
  c = quick_config(**{"train.eval_every_steps": 5,
                      "strategy.name": "replay"})
  return sc, jaxcl.run(c, scenario=sc)


def test_exposed_accuracy_counts_the_classes_seen_so_far(blurry_run):
  sc, r = blurry_run
  curve = r.curve
  assert curve.exposed.shape == curve.step.shape
  assert np.isnan(curve.exposed[0])  # nothing is exposed initially
  # Leaked classes: experience 0's training data hold classes whose test
  # set is a later experience's, so the exposed classes are not the
  # test sets seen (what the anytime accuracy averages).
  home0 = set(np.unique(sc.eval_experiences[0].test_y).tolist())
  assert set(sc.experiences[0].classes) > home0
  # At each experience's end: from the confusion matrix (the diagonal:
  # each class's correct examples), over the classes of the experiences
  # so far, weighted by their test examples.
  labels = np.concatenate([e.test_y for e in sc.eval_experiences])
  count = np.bincount(labels, minlength=10)
  ends = [int(np.flatnonzero(curve.experience == i)[-1]) for i in range(5)]
  exposed = set()
  for i, k in enumerate(ends):
    exposed |= set(sc.experiences[i].classes)
    cls = sorted(exposed)
    want = np.diag(r.confusion[i])[cls].sum() / count[cls].sum()
    assert curve.exposed[k] == pytest.approx(want, abs=1e-9)
  # A_AUC, the step-weighted mean, is far below the anytime accuracy here
  # (leaked classes are tested from experience 0 on, before they are
  # learned); the summary has both.
  want = _hand_a_auc(curve.step, curve.exposed)
  assert r.metrics["a_auc"] == pytest.approx(want)
  assert r.metrics["a_auc"] < r.metrics["anytime_acc"] - 0.1


def _run_and_its_start(c, sc):
  """The run of ``c`` on ``sc``, and what it started from, to train again
  here chunk by chunk: its learner, the seed's initial state, experience
  0 and its data on the device."""
  r = jaxcl.run(c, scenario=sc)
  s = experiment.setup(c, sc)
  exp = sc.experiences[0]
  return (r, s.learner, experiment.initial_state(s, c.seed), exp,
          train.device_experience(exp, s.learner.ctx.info.train_size))


def test_exposed_accuracy_inside_an_experience_is_the_states(two):
  """A point inside an experience: the state after 10 steps, trained here
  chunk by chunk, its predictions counted with NumPy. On a split stream
  the exposed classes are the experiences' so far, so the value is the
  seen test sets' accuracy weighted by their sizes."""
  c = quick_config(**{"train.eval_every_steps": 5})
  r, learner, state, exp, data = _run_and_its_start(c, two)
  ctx = learner.ctx
  for start in (0, 5):
    state, _, _ = learner.chunk_fn(state, data, exp.num_train, 0, 0, start)
  k = int(np.flatnonzero(r.curve.step == 10)[0])
  host = jax.tree.map(np.asarray, state)
  right = total = 0
  for e in two.eval_experiences:
    pred = np.asarray(ctx.logits(host.params, host.model_state, e.test_x,
                                 e.test_task)).argmax(1)
    keep = np.isin(e.test_y, list(exp.classes))
    right += int((pred == e.test_y)[keep].sum())
    total += int(keep.sum())
  assert r.curve.exposed[k] == pytest.approx(right / total, abs=1e-9)
  sizes = np.array([len(e.test_y) for e in two.eval_experiences])
  for e, a, x in zip(r.curve.experience[1:], r.curve.accuracy[1:],
                     r.curve.exposed[1:]):
    n = sizes[:e + 1]
    assert x == pytest.approx(np.sum(a[:e + 1] * n) / n.sum(), abs=1e-6)


def test_a_class_is_exposed_from_its_first_batch(digits):
  """Inside an experience's first epoch a class counts from the first
  batch that holds it (Koh et al.'s ``online_evaluate`` tests the classes
  seen so far), not from the experience's start: each point inside a
  blurry experience against the state trained here chunk by chunk, its
  predictions counted with NumPy over the classes of the batches run so
  far, read from the epoch's order (``train.epoch_indices``)."""
  from jaxcl import scenarios
  sc = scenarios.blurry(digits, 5, disjoint=0.5, blurred=0.3)
  sc = dataclasses.replace(sc, experiences=sc.experiences[:1])
  c = quick_config(**{"train.eval_every_steps": 2})
  r, learner, state, exp, data = _run_and_its_start(c, sc)
  ctx = learner.ctx
  order = np.asarray(train.epoch_indices(
      state.rng, 0, 0, exp.num_train, ctx.info.train_size,
      learner.epoch_steps, ctx.info.batch_size))
  test_x, test_y, test_task = (np.concatenate(
      [getattr(e, f) for e in sc.eval_experiences])
      for f in ("test_x", "test_y", "test_task"))
  n_steps = -(-exp.num_train // ctx.info.batch_size)
  partial = 0
  for start in range(0, n_steps - 1, 2):  # (the end is evaluated apart)
    state, _, _ = learner.chunk_fn(state, data, exp.num_train, 0, 0, start)
    rows = order[:start + 2].ravel()
    seen = set(exp.train_y[rows[rows >= 0]].tolist())
    partial += seen < set(exp.classes)
    host = jax.tree.map(np.asarray, state)
    pred = np.asarray(ctx.logits(host.params, host.model_state, test_x,
                                 test_task)).argmax(1)
    keep = np.isin(test_y, sorted(seen))
    k = int(np.flatnonzero(r.curve.step == start + 2)[0])
    assert r.curve.exposed[k] == pytest.approx(
        (pred == test_y)[keep].mean(), abs=1e-9), start
  # Classes 7 and 9 (9 and 2 examples here) turn up in the fourth batch.
  assert partial >= 1
  # In a sweep each run has its own order, so its own exposed classes.
  from jaxcl import sweep
  c.report.tensorboard = c.report.plots = False
  swept = sweep.sweep(c, seeds=[0, 3], scenario=sc).result.curve.exposed
  c.seed = 3
  np.testing.assert_allclose(swept[0, 1:], r.curve.exposed[1:], atol=1e-6)
  np.testing.assert_allclose(swept[1, 1:], jaxcl.run(c, scenario=sc).curve
                             .exposed[1:], atol=1e-6)


def test_exposed_accuracy_only_on_class_incremental_streams():
  task = jaxcl.run(quick_config(**{"train.eval_every_steps": 8,
                                   "scenario.kind": "task",
                                   "scenario.n_experiences": 2}))
  assert task.curve is not None and task.curve.exposed is None
  assert "a_auc" not in task.metrics and "anytime_acc" in task.metrics


def test_a_sweeps_exposed_curves_are_its_runs(two, tmp_path):
  from jaxcl import sweep
  c = quick_config(**{"train.eval_every_steps": 8})
  c.report.tensorboard = c.report.plots = False
  out = sweep.sweep(c, seeds=[0, 1], workdir=str(tmp_path / "s"),
                    scenario=two)
  curve = out.result.curve
  assert curve.exposed.shape == (2, len(curve.step))
  assert not np.array_equal(curve.exposed[0], curve.exposed[1])
  with open(tmp_path / "s" / "sweep.json") as f:
    data = json.load(f)
  got = data["curve"]["exposed"]
  for m in range(2):
    assert got[m][0] is None  # NaN, written as null
    np.testing.assert_allclose(got[m][1:], curve.exposed[m, 1:])
    assert data["metrics"][m]["a_auc"] == pytest.approx(
        _hand_a_auc(curve.step, curve.exposed[m]))
  # Each run's points equal its single run's.
  c.seed = 1
  one = jaxcl.run(c, scenario=two)
  np.testing.assert_allclose(curve.exposed[1], one.curve.exposed,
                             atol=1e-6)


def test_class_correct_counts_the_test_examples_only(full_stream):
  """``class_correct``: each class's right predictions over every test set,
  the confusion matrix's diagonal; with a model that predicts class 0
  everywhere, the padding rows (label 0, test sets of 89-91 rows padded to
  96) would count as right ones if they were counted."""
  s = experiment.setup(quick_config(**{"train.eval_batch_size": 32}),
                       full_stream)
  state = experiment.initial_state(s, 0)
  test = train.test_arrays(full_stream.eval_experiences, 32)
  assert test["y"].shape[1] == 96 > max(test["count"])  # padding exists
  ctx = s.learner.ctx
  out = train.evaluate(ctx, s.learner.strategy, state, test,
                       eval_batch_size=32, confusion=True, per_class=True)
  # Counted without the matrix, the same (with it, it is its diagonal).
  alone = train.evaluate(ctx, s.learner.strategy, state, test,
                         eval_batch_size=32, per_class=True)
  assert "confusion" not in alone
  for counts in (out["class_correct"], alone["class_correct"]):
    np.testing.assert_array_equal(np.asarray(counts),
                                  np.diag(np.asarray(out["confusion"])))
  zero = s.learner.strategy._replace(
      predict=lambda ctx, ss, p, ms, x, t: jax.nn.one_hot(
          jax.numpy.zeros(x.shape[0], jax.numpy.int32), 10))
  got = np.asarray(train.evaluate(ctx, zero, state, test, eval_batch_size=32,
                                  per_class=True)["class_correct"])
  zeros = sum(int((e.test_y == 0).sum()) for e in full_stream.eval_experiences)
  assert got.tolist() == [zeros] + [0] * 9
