"""What an experience's end adds to the accuracy row: the confusion
matrix (``train.confusion``) and, on class-incremental streams, the
task-aware accuracy (each test set's predictions restricted to its own
classes, Mammoth's Task-IL). Every count and accuracy is the state's own
predictions (recomputed here with NumPy), padding rows are not counted,
and both reach the result, the metrics (``recency_bias``, checked by
hand; ``task_acc``), the run directory and a sweep;
``train.confusion=False`` turns the matrices off."""


import json

import jax
import ml_collections
import numpy as np
import pytest

import jaxcl
from jaxcl import experiment, metrics, report, train
from partial_runs import run_keeping_states
from test_train import quick_config


def np_task_accuracy(ctx, state, exps):
  """Each test set's accuracy with the logits outside its labels' classes
  masked out."""
  host = jax.tree.map(np.asarray, state)
  out = []
  for e in exps:
    logits = np.asarray(ctx.logits(host.params, host.model_state, e.test_x,
                                   e.test_task))
    keep = np.zeros(logits.shape[1], bool)
    keep[np.unique(e.test_y)] = True
    out.append(float((np.where(keep, logits, -np.inf).argmax(1)
                      == e.test_y).mean()))
  return np.array(out)


def np_confusion(ctx, state, exps, num_classes):
  """Counts ``[y, p]`` of the model's argmax over every test set."""
  out = np.zeros((num_classes, num_classes), np.int64)
  host = jax.tree.map(np.asarray, state)
  for e in exps:
    logits = np.asarray(ctx.logits(host.params, host.model_state, e.test_x,
                                   e.test_task))
    np.add.at(out, (e.test_y, logits.argmax(1)), 1)
  return out


def test_evaluate_counts_every_prediction_once(full_stream):
  """On the initial model (whose predictions spread over the classes):
  each test example counted once, at its class and its prediction; the
  padding rows (the test sets of 89-91 rows padded to 96) not at all."""
  s = experiment.setup(quick_config(**{"train.eval_batch_size": 32}),
                       full_stream)
  state = experiment.initial_state(s, 0)
  test = train.test_arrays(full_stream.eval_experiences,
                           s.learner.eval_batch_size)
  assert test["y"].shape[1] == 96 > max(test["count"])  # padding exists
  assert s.learner.confusion and s.learner.task_aware
  out = s.learner.end_eval_fn(state, test)
  counts = np.asarray(out["confusion"])
  want = np_confusion(s.learner.ctx, state, full_stream.eval_experiences, 10)
  np.testing.assert_array_equal(counts, want)
  assert counts.dtype == np.int32
  assert (want > 0).sum() > 10  # off the diagonal too: a real check
  np.testing.assert_array_equal(np.asarray(out["accuracy"]),
                                np.asarray(s.learner.eval_fn(state, test)))
  task = np_task_accuracy(s.learner.ctx, state, full_stream.eval_experiences)
  np.testing.assert_allclose(np.asarray(out["task_accuracy"]), task,
                             atol=1e-6)
  # A right prediction stays right when masked; wrong ones may turn right.
  row = np.asarray(out["accuracy"])
  assert (task >= row - 1e-6).all() and task.mean() > row.mean() + 0.2


def test_each_experiences_end_keeps_the_states_matrix(full_stream):
  c = quick_config()
  r, states = run_keeping_states(c, scenario=full_stream)
  assert r.confusion.shape == (5, 10, 10)
  ctx = r.learner.ctx
  for i, st in enumerate(states):
    np.testing.assert_array_equal(
        r.confusion[i], np_confusion(ctx, st, full_stream.eval_experiences,
                                     10))
    np.testing.assert_allclose(
        r.task_accuracy[i], np_task_accuracy(ctx, st,
                                             full_stream.eval_experiences),
        atol=1e-6)
    # Its diagonal over test set j's classes is R[i, j].
    for j, e in enumerate(full_stream.eval_experiences):
      cls = list(e.classes)
      assert r.confusion[i][cls, cls].sum() / len(e.test_y) == (
          pytest.approx(r.accuracy[i, j]))
  # Naive forgets: at the end it predicts the last classes (8, 9) for
  # nearly everything, so their predictions are ~5x their examples.
  last = r.confusion[-1]
  want = last[:, [8, 9]].sum() / last[[8, 9]].sum()
  assert r.metrics["recency_bias"] == pytest.approx(want)
  assert r.metrics["recency_bias"] > 3
  # Task-IL: Naive keeps telling each pair apart once told which pair.
  assert r.metrics["task_acc"] == pytest.approx(r.task_accuracy[-1].mean())
  assert r.metrics["task_acc"] > 0.9 > 0.3 > r.metrics["acc"]


def test_scores_wider_than_the_classes(full_stream):
  """A strategy whose scores have extra columns (here always the largest):
  its plain predictions fall outside the classes, so they are wrong and
  the confusion matrix does not count them; the task-aware ones are
  restricted to the test set's classes, so they are the model's own."""
  import jax.numpy as jnp
  from jaxcl.strategy import default_predict
  base = jaxcl.strategies.get("naive")
  wide = base._replace(predict=lambda *a: jnp.pad(
      default_predict(*a), ((0, 0), (0, 3)), constant_values=1e6))
  c = quick_config()
  plain = jaxcl.run(c, scenario=full_stream, strategy=base)
  r = jaxcl.run(c, scenario=full_stream, strategy=wide)
  assert (r.accuracy == 0).all() and (r.confusion == 0).all()
  assert "recency_bias" not in r.metrics  # nothing counted: no ratio
  np.testing.assert_array_equal(r.task_accuracy, plain.task_accuracy)


def test_recency_bias_by_hand():
  n = np.array([[6, 0, 4],
                [1, 5, 4],
                [0, 2, 8]])
  # Classes 0-2 trained, 2 the last: 16 predictions of 2 for 10 examples.
  assert metrics.recency_bias(n, [0, 1, 2], [2]) == pytest.approx(1.6)
  # Rows of classes not trained are not counted.
  assert metrics.recency_bias(n, [1, 2], [2]) == pytest.approx(1.2)
  assert metrics.recency_bias(n, [0, 1, 2], [1, 2]) == pytest.approx(
      (0 + 4 + 5 + 4 + 2 + 8) / 20)
  for bad, match in [
      (dict(confusion=n[:2]), r"square \(C, C\) matrix, got shape \(2, 3\)"),
      (dict(last=[3]), r"last must be a non-empty list of classes in "
       r"\[0, 3\), got \[3\]"),
      (dict(trained=[]), r"trained must be a non-empty list"),
      (dict(trained=[0, 1]), r"last \[2\] must be among the trained"),
      (dict(confusion=-np.ones((3, 3))), "no test example"),
  ]:
    kwargs = {**dict(confusion=n, trained=[0, 1, 2], last=[2]), **bad}
    with pytest.raises(ValueError, match=match):
      metrics.recency_bias(**kwargs)


def test_recency_bias_only_for_streams_of_new_classes(digits):
  """Task-incremental predictions stay in their task's classes (so the
  matrix has nothing outside the task blocks) and domain-incremental
  experiences share classes: neither gets ``recency_bias``."""
  from jaxcl import scenarios
  task = scenarios.split(digits, 5, kind="task")
  r = jaxcl.run(quick_config(), scenario=task)
  assert "recency_bias" not in r.metrics and "task_acc" not in r.metrics
  assert r.task_accuracy is None
  blocks = np.zeros((10, 10), bool)
  for k in range(5):
    blocks[2 * k:2 * k + 2, 2 * k:2 * k + 2] = True
  assert r.confusion[-1][~blocks].sum() == 0
  assert r.confusion[-1][blocks].sum() == sum(len(e.test_y)
                                              for e in task.experiences)
  assert experiment._recency_classes(scenarios.permuted(digits, 3)) is None
  assert not experiment.setup(quick_config(), scenarios.permuted(
      digits, 2)).learner.task_aware
  assert experiment._recency_classes(scenarios.split(digits, 5)) == (
      list(range(10)), [8, 9])


def test_run_directory_holds_the_matrices(digits, tmp_path):
  c = quick_config()
  c.report.tensorboard = False
  # A seeded class order: the plot puts the classes in the experiences'
  # order, the file keeps each experience's classes.
  order = (3, 7, 0, 9, 4, 1, 8, 2, 6, 5)
  sc = jaxcl.scenarios.split(digits, 5, class_order=order)
  r = jaxcl.run(c, str(tmp_path), scenario=sc)
  with open(tmp_path / "accuracy_matrix.json") as f:
    np.testing.assert_allclose(json.load(f)["task_accuracy"],
                               r.task_accuracy)
  with np.load(tmp_path / "confusion.npz") as f:
    np.testing.assert_array_equal(f["confusion"], r.confusion)
    np.testing.assert_array_equal(f["experience_classes"],
                                  np.reshape(order, (5, 2)))
    assert int(f["mean_of_runs"]) == 1
  assert (tmp_path / "confusion.png").stat().st_size > 0
  fig = report.plot_confusion(r.confusion[-1], str(tmp_path / "p.png"),
                              order=order, boundaries=(2, 4, 6, 8))
  shown = fig.axes[0].images[0].get_array()
  m = r.confusion[-1][np.ix_(order, order)]
  np.testing.assert_allclose(shown, m / m.sum(1, keepdims=True))
  lines = [ln.get_xdata()[0] for ln in fig.axes[0].lines
           if ln.get_xdata()[0] == ln.get_xdata()[1]]
  assert lines == [1.5, 3.5, 5.5, 7.5]


def test_a_sweep_keeps_each_runs_matrices(full_stream, tmp_path):
  from jaxcl import sweep
  c = quick_config()
  c.report.tensorboard = c.report.plots = False
  out = sweep.sweep(c, seeds=[0, 1], workdir=str(tmp_path / "s"),
                    scenario=full_stream)
  conf = out.result.confusion
  assert conf.shape == (2, 5, 10, 10)
  assert not np.array_equal(conf[0], conf[1])
  for m in range(2):
    assert out.result.metrics["recency_bias"][m] == pytest.approx(
        metrics.recency_bias(conf[m, -1], range(10), [8, 9]))
    assert out.result.metrics["task_acc"][m] == pytest.approx(
        out.result.task_accuracy[m, -1].mean())
  with np.load(tmp_path / "s" / "confusion.npz") as f:
    np.testing.assert_allclose(f["confusion"], conf.mean(0))
    assert int(f["mean_of_runs"]) == 2
  with open(tmp_path / "s" / "sweep.json") as f:  # each run's own
    np.testing.assert_allclose(json.load(f)["task_accuracy"],
                               out.result.task_accuracy)
  # A sweep of one run (trained unstacked) stacks its matrices as a
  # sweep's, like its accuracy matrix.
  one = sweep.sweep(c, seeds=[0], scenario=full_stream)
  np.testing.assert_array_equal(one.result.confusion, conf[:1])
  np.testing.assert_allclose(one.result.task_accuracy,
                             out.result.task_accuracy[:1], atol=1e-6)


def test_confusion_off(full_stream, tmp_path):
  c = quick_config(**{"train.confusion": False})
  c.report.tensorboard = False
  r = jaxcl.run(c, str(tmp_path), scenario=full_stream)
  assert r.confusion is None and "recency_bias" not in r.metrics
  assert r.learner.task_aware and r.metrics["task_acc"] > 0.9
  assert not (tmp_path / "confusion.npz").exists()
  with open(tmp_path / "accuracy_matrix.json") as f:
    assert "task_accuracy" in json.load(f)
  # (A config built from plain values, not the type-safe default's.)
  c.train = ml_collections.ConfigDict(dict(c.train.to_dict(),
                                           confusion="no"))
  with pytest.raises(ValueError, match="train.confusion must be True or "
                     "False, got 'no'"):
    experiment.setup(c, full_stream)


def test_tensorboard_gets_each_experiences_matrix(full_stream, tmp_path):
  """One ``eval/confusion`` image per experience, each the row shares of
  that experience's matrix in viridis colours."""
  import io
  import struct
  from matplotlib import colormaps
  from PIL import Image
  from tensorboardX.proto import event_pb2
  c = quick_config()
  r = jaxcl.run(c, str(tmp_path), scenario=full_stream)
  (events,) = (tmp_path / "tb").glob("events*")
  data, i, images = events.read_bytes(), 0, {}
  while i < len(data):  # TFRecord: length, its CRC, the event, its CRC
    n = struct.unpack("<Q", data[i:i + 8])[0]
    ev = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    i += n + 16
    for v in ev.summary.value:
      if v.tag == "eval/confusion":
        images[ev.step] = np.asarray(Image.open(io.BytesIO(
            v.image.encoded_image_string)))[..., :3]
  assert sorted(images) == [0, 1, 2, 3, 4]
  for k, img in images.items():
    assert img.shape == (250, 250, 3)  # 25 pixels per class
    m = r.confusion[k].astype(float)
    share = m / m.sum(1, keepdims=True)
    want = (colormaps["viridis"](share)[..., :3] * 255).round()
    # Each cell's centre (lines run along the cells' last pixels).
    np.testing.assert_allclose(img[12::25, 12::25], want, atol=1)
  # The experiences' boundaries: white lines after classes 2, 4, 6, 8.
  assert (images[4][:, 49] == 255).all() and (images[4][:, 48] != 255).any()


def test_confusion_image_marks_rows_without_examples():
  n = np.array([[3, 1], [0, 0]])
  img = report.confusion_image(n, [0, 1], size=4)
  assert img.shape == (4, 4, 3)
  assert (img[2:, :] == 128).all()  # no examples of class 1: grey
  from matplotlib import colormaps
  np.testing.assert_allclose(img[0, 0], np.round(
      np.array(colormaps["viridis"](0.75)[:3]) * 255), atol=1)
