"""jaxcl.experiment's building blocks and stream loop, checked against
what the README / docstrings promise: the default config, the data set and
scenario built from the config, the model / optimiser / strategy wiring,
the non-finite loss message, the stream checks of a sweep, and what
``execute`` evaluates and reports (in order) per experience.

Expected values are computed here independently (NumPy accuracies and
cross-entropies, rotations by ``np.rot90``, step counts by hand)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import jaxcl
from conftest import np_log_softmax
from jaxcl import datasets, experiment, metrics, report, scenarios
from jaxcl.configs import default as default_module
from jaxcl.strategy import Strategy
from test_train import quick_config, with_overrides


# --------------------------------------------------------------------------
# The default config, as README.md, configs/default.py and the docstring say.


def test_default_config_is_the_documented_experiment():
  """Split Digits (scikit-learn), class-incremental, 5 x 2 classes, MLP
  64-400-400-10, SGD, 2 epochs per experience, Naive; pixels in [0, 1],
  no validation split or label noise, one device, the optimiser reset per
  experience, classes in order 0..9."""
  c = jaxcl.default_config()
  assert c.dataset.name == "digits"
  assert (c.dataset.validation, c.dataset.label_noise) == (0.0, 0.0)
  assert tuple(c.dataset.normalize) == ()
  assert c.dataset.label_noise_seed == 0
  assert (c.scenario.type, c.scenario.kind, c.scenario.n_experiences) == (
      "split", "class", 5)
  assert tuple(c.scenario.class_order) == () and c.scenario.order_seed == -1
  assert c.scenario.online is False
  assert c.model.name == "mlp" and tuple(c.model.widths) == (400, 400)
  assert c.model.multi_head is False and c.model.head == "linear"
  assert c.model.outputs == 0 and c.model.pretrained == ""
  assert c.optimizer.name == "sgd" and c.optimizer.schedule == "constant"
  assert c.optimizer.clip_norm == 0.0 and c.optimizer.weight_decay == 0.0
  assert c.train.epochs == 2 and c.train.reset_optimizer is True
  assert c.strategy.name == "naive"
  assert c.parallel.devices == 1
  assert default_module.get_config().to_dict() == c.to_dict()
  # The built default: 5 experiences of 2 classes each, in order, one
  # 10-way head after 64 -> 400 -> 400.
  s = experiment.setup(c)
  sc = s.scenario
  assert [tuple(e.classes) for e in sc.experiences] == [
      (0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
  assert all((e.train_task == 0).all() for e in sc.experiences)
  state = experiment.initial_state(s, 0)
  kernels = [np.shape(k) for k in jax.tree.leaves(state.params)
             if np.ndim(k) == 2]
  assert sorted(kernels) == sorted([(64, 400), (400, 400), (400, 10)])
  assert s.learner.epochs == 2 and s.learner.reset_optimizer


# --------------------------------------------------------------------------
# load_data and check_workdir.


def _data_config(**overrides):
  return with_overrides(jaxcl.default_config(), overrides)


def test_load_data_subsets_by_the_run_seed_and_noise_by_its_own():
  full = datasets.load("digits")
  a = experiment.load_data(_data_config(**{"dataset.train_subset": 100,
                                           "dataset.test_subset": 50,
                                           "seed": 3}))
  assert len(a.train_y) == 100 and len(a.test_y) == 50
  b = experiment.load_data(_data_config(**{"dataset.train_subset": 100,
                                           "seed": 4}))
  assert len(b.test_y) == len(full.test_y)
  # A different run seed draws a different subset.
  assert not np.array_equal(a.train_x, b.train_x)
  # Label noise follows label_noise_seed, not the run's seed.
  noisy = lambda seed, nseed: experiment.load_data(_data_config(**{
      "dataset.label_noise": 0.4, "seed": seed,
      "dataset.label_noise_seed": nseed})).train_y
  np.testing.assert_array_equal(noisy(0, 0), noisy(5, 0))
  assert not np.array_equal(noisy(0, 0), noisy(0, 1))
  assert 0.3 < (noisy(0, 0) != full.train_y).mean() < 0.5


def test_validation_labels_stay_clean_under_label_noise():
  """Noise is added after the validation split: the held-out labels are
  the true ones, the training labels are the noisy ones."""
  held = datasets.load("digits").validation(0.2)
  d = experiment.load_data(_data_config(**{"dataset.validation": 0.2,
                                           "dataset.label_noise": 0.4}))
  np.testing.assert_array_equal(d.test_x, held.test_x)
  np.testing.assert_array_equal(d.test_y, held.test_y)
  np.testing.assert_array_equal(d.train_y_true, held.train_y)
  assert (d.train_y != held.train_y).mean() > 0.3


@pytest.mark.parametrize("norm", [(0.5,), (0.1, 0.3, 0.2)])
def test_normalize_needs_a_mean_and_a_std(norm):
  with pytest.raises(ValueError, match=r"dataset.normalize must be \(\) or "
                     r"\(mean, std\)"):
    experiment.load_data(_data_config(**{"dataset.normalize": norm}))


def test_check_workdir_refuses_a_file_or_a_path_under_one(tmp_path):
  f = tmp_path / "notes.txt"
  f.write_text("x")
  for bad in (f, f / "run", f / "a" / "b"):
    with pytest.raises(ValueError, match="is a file"):
      experiment.check_workdir(str(bad))
  experiment.check_workdir(str(tmp_path / "new" / "run"))  # not made yet
  experiment.check_workdir(str(tmp_path))


# --------------------------------------------------------------------------
# Scenario fields and build_scenario.


@pytest.mark.parametrize("type_,field,value", [
    ("split", "interpolation", "nearest"),
    ("split", "disjoint", 0.0),
    ("permuted", "blurred", 0.2),
    ("blurry", "pad", 2),
    ("split", "first_identity", True),
    ("permuted", "order_seed", 3),
    ("rotated", "pad", 2),
])
def test_a_field_of_another_stream_type_is_refused(type_, field, value):
  c = _data_config(**{"scenario.type": type_, f"scenario.{field}": value})
  with pytest.raises(ValueError, match=f"scenario.{field}=.* is read by "
                     f".* streams only; scenario.type='{type_}'"):
    experiment.build_scenario(c)


def test_a_default_given_as_a_list_is_not_a_setting():
  """A config read back from JSON holds lists: ``class_order=[]`` is the
  default, not a split-only setting on a permuted stream."""
  sc = ml_collections.ConfigDict(dict(
      jaxcl.default_config().scenario.to_dict(), type="permuted",
      class_order=[], angles=[]))
  experiment._check_scenario_fields(sc)


def test_build_scenario_reads_each_types_fields(digits):
  raw = digits.train_x
  # split: kind and a seeded class order (order_seed=0 is a seed too).
  t = experiment.build_scenario(_data_config(**{"scenario.kind": "task"}),
                                digits)
  assert [int(e.train_task[0]) for e in t.experiences] == [0, 1, 2, 3, 4]
  o = experiment.build_scenario(_data_config(**{"scenario.order_seed": 0}),
                                digits)
  order = [c for e in o.experiences for c in e.classes]
  assert sorted(order) == list(range(10)) and order != list(range(10))
  # permuted: its seed, the unpermuted first experience, the padding.
  perm = lambda **kw: experiment.build_scenario(_data_config(**{
      "scenario.type": "permuted", "scenario.kind": "domain", **kw}), digits)
  first = perm(**{"scenario.first_identity": True})
  np.testing.assert_array_equal(first.experiences[0].train_x, raw)
  assert not np.array_equal(first.experiences[1].train_x, raw)
  a, b = perm(**{"scenario.seed": 1}), perm(**{"scenario.seed": 2})
  assert not np.array_equal(a.experiences[0].train_x, b.experiences[0].train_x)
  # Each permutation moves pixels: the multiset of each image is kept.
  np.testing.assert_array_equal(np.sort(a.experiences[0].train_x.reshape(
      len(raw), -1), 1), np.sort(raw.reshape(len(raw), -1), 1))
  assert perm(**{"scenario.pad": 2}).input_shape[:2] == (12, 12)
  # rotated: the given angles (quarter turns are exact), the interpolation.
  rot = lambda **kw: experiment.build_scenario(_data_config(**{
      "scenario.type": "rotated", "scenario.kind": "domain", **kw}), digits)
  q = rot(**{"scenario.angles": (0.0, 90.0, 180.0, 270.0, 0.0),
             "scenario.interpolation": "nearest"})
  for k, e in enumerate(q.experiences[:4]):
    np.testing.assert_allclose(e.train_x, np.rot90(raw, k, axes=(1, 2)),
                               atol=1e-6)
  # At 45 degrees nearest copies pixels (values k/16), bilinear blends.
  on_grid = lambda x: np.allclose(x * 16, np.round(x * 16), atol=1e-4)
  angles = {"scenario.angles": (45.0,) * 5}
  assert on_grid(rot(**angles, **{"scenario.interpolation": "nearest"})
                 .experiences[0].train_x)
  assert not on_grid(rot(**angles).experiences[0].train_x)
  # blurry: its fractions, the class order, scenario.seed for the deal.
  blur = lambda **kw: experiment.build_scenario(_data_config(**{
      "scenario.type": "blurry", "scenario.disjoint": 0.0,
      "scenario.blurred": 0.3, "scenario.class_order": tuple(range(9, -1, -1)),
      **kw}), digits)
  want = scenarios.blurry(digits, 5, disjoint=0.0, blurred=0.3,
                          class_order=tuple(range(9, -1, -1)), sample_seed=2)
  got = blur(**{"scenario.seed": 2})
  assert got.name == want.name == "blurry0-30_digits"
  for a, b in zip(got.experiences, want.experiences):
    np.testing.assert_array_equal(a.train_y, b.train_y)
    np.testing.assert_array_equal(a.test_y, b.test_y)
  assert not all(np.array_equal(a.train_y, b.train_y) for a, b in zip(
      blur().experiences, want.experiences))
  with pytest.raises(ValueError, match="scenario.type='blurry' is class-"
                     "incremental; set scenario.kind='class', got 'task'"):
    blur(**{"scenario.kind": "task"})
  # online
  assert experiment.build_scenario(_data_config(**{"scenario.online": True}),
                                   digits).online


# --------------------------------------------------------------------------
# Model, strategy and optimiser wiring (setup).


def test_model_outputs_and_head_settings():
  s = experiment.setup(quick_config(**{"model.head": "cosine"}))
  assert s.learner.ctx.model.head == "cosine"
  # outputs equal to the stream's classes is the default width.
  s = experiment.setup(quick_config(**{"model.outputs": 10}))
  st = experiment.initial_state(s, 0)
  assert np.shape(st.params["head"]["kernel"]) == (32, 10)
  with pytest.raises(ValueError, match="model.outputs=-3: expected a whole"):
    experiment.setup(quick_config(**{"model.outputs": -3}))
  # A strategy replacing only the task loss (not the prediction) would
  # score class ids against embedding columns: refused.
  half = Strategy(task_loss=lambda *a: 0.0, name="half")
  with pytest.raises(ValueError, match="model.outputs=20 differs from the "
                     "stream's 10 classes"):
    experiment.setup(quick_config(**{"model.outputs": 20}), strategy=half)
  # Without multi_head one 10-way head, whatever the kind (a
  # task-incremental stream has 5 tasks; multi_head=False keeps one head).
  for kind in ("class", "task"):
    st = experiment.initial_state(experiment.setup(quick_config(**{
        "scenario.kind": kind})), 0)
    assert np.shape(st.params["head"]["kernel"]) == (32, 10)
  # A model module reads its kwargs from config.model.<name>.
  c = quick_config(**{"model.name": "bn_mlp"})
  c.model.bn_mlp = dict(widths=(24,))
  st = experiment.initial_state(experiment.setup(c), 0)
  kernels = sorted(np.shape(k) for k in jax.tree.leaves(st.params)
                   if np.ndim(k) == 2)
  assert kernels == [(24, 10), (64, 24)], kernels


def test_setup_reads_the_train_settings():
  c = quick_config(**{"train.eval_batch_size": 37,
                      "train.reset_optimizer": False, "train.epochs": 3})
  s = experiment.setup(c)
  assert (s.learner.eval_batch_size, s.learner.reset_optimizer,
          s.learner.epochs) == (37, False, 3)
  # An online stream makes one pass whatever train.epochs says.
  s = experiment.setup(quick_config(**{"scenario.online": True,
                                       "train.epochs": 3}))
  assert s.scenario.online and s.learner.epochs == 1
  # The batch must fit the smallest experience (265 of Split Digits'
  # 270, 270, 272, 270, 265 training examples).
  with pytest.raises(ValueError, match=r"train.batch_size=268 is larger "
                     r"than the smallest experience \(265"):
    experiment.setup(quick_config(**{"train.batch_size": 268}))
  # A strategy's scenario transform is applied (joint: one experience of
  # everything, tested on the five test sets).
  s = experiment.setup(quick_config(**{"strategy.name": "joint"}))
  assert len(s.scenario.experiences) == 1
  assert len(s.scenario.eval_experiences) == 5


def test_a_passed_joint_or_cumulative_record_recuts_the_stream():
  """A cumulative or joint record given to jaxcl.run (alone or in a chain)
  trains on the stream it needs, as the name in a config does: until
  session 54 the re-cut was looked up by name in the config only, so
  run(config, strategy=get("cumulative")) silently trained as naive (the
  last row's first four accuracies 0.0 against 0.5-0.8). A stream passed
  already re-cut is refused (cumulative twice would repeat old data)."""
  from jaxcl import strategies
  from jaxcl.strategy import chain
  c = quick_config(**{"strategy.name": "cumulative"})
  named = jaxcl.run(c)
  passed = jaxcl.run(c, strategy=strategies.get("cumulative"))
  np.testing.assert_array_equal(passed.accuracy, named.accuracy)
  # Cumulative keeps the old experiences (naive forgets them).
  naive = jaxcl.run(quick_config())
  assert passed.accuracy[-1, :4].min() > naive.accuracy[-1, :4].max() + 0.2
  # In a chain, the record carries the re-cut too: one experience.
  s = experiment.setup(quick_config(),
                       strategy=chain(strategies.get("ewc"),
                                      strategies.get("joint")))
  assert len(s.scenario.experiences) == 1
  assert len(s.scenario.eval_experiences) == 5
  # A stream already re-cut is refused, naming what to pass.
  stream = scenarios.cumulative(experiment.build_scenario(c))
  with pytest.raises(ValueError, match="stream 'cumulative_split_digits' "
                     "was already re-cut by cumulative; pass the stream as "
                     "built"):
    jaxcl.run(c, scenario=stream, strategy=strategies.get("cumulative"))
  with pytest.raises(ValueError, match="chain\\(\\): at most one member "
                     "may change the training data"):
    chain(strategies.get("joint"), strategies.get("cumulative"))


def test_eval_batch_is_capped_at_the_largest_test_set():
  """A batch beyond the largest test set (Split Digits: 91 images) would
  only pad every test set to it (10^9 once asked numpy for 1.2 TB); it is
  capped there, rounded up to split over the devices, and the accuracies
  are those of any other batch."""
  runs = {}
  for bs in (7, 91, 10 ** 9):
    s = experiment.setup(quick_config(**{"train.eval_batch_size": bs}))
    assert s.learner.eval_batch_size == min(bs, 91)
    runs[bs] = np.asarray(experiment.execute(
        s, experiment.initial_state(s, 0)).accuracy)  # s: the last, 91
  np.testing.assert_array_equal(runs[10 ** 9], runs[7])
  np.testing.assert_array_equal(runs[91], runs[7])
  # Test arrays padded for another batch are refused by name (200 rows in
  # batches of 91 once failed in a reshape deep inside the evaluation).
  from jaxcl import train
  with pytest.raises(ValueError, match=r"test arrays padded to 200 rows do "
                     r"not split into evaluation batches of 91; build them "
                     r"with test_arrays\(\.\.\., learner.eval_batch_size\)"):
    s.learner.eval_fn(experiment.initial_state(s, 0), train.test_arrays(
        s.scenario.eval_experiences, 200))
  # On 8 devices: 91 rounded up to 96, a multiple of 8.
  s = experiment.setup(quick_config(**{"train.eval_batch_size": 10 ** 9,
                                       "parallel.devices": 8}))
  assert s.learner.eval_batch_size == 96


def test_build_optimizer_passes_every_setting(monkeypatch):
  seen = {}
  real = experiment.make_optimizer

  def spy(name, lr, **kw):
    seen.update(kw, name=name, lr=lr)
    return real(name, lr, **kw)

  monkeypatch.setattr(experiment, "make_optimizer", spy)
  c = quick_config(**{"optimizer.name": "momentum",
                      "optimizer.learning_rate": 0.05,
                      "optimizer.momentum": 0.5,
                      "optimizer.weight_decay": 0.01,
                      "optimizer.schedule": "cosine",
                      "optimizer.clip_norm": 2.0,
                      "train.epochs": 3, "train.batch_size": 32})
  experiment.setup(c)
  # The largest experience has 272 examples: ceil(272 / 32) = 9 steps per
  # epoch, 3 epochs.
  assert seen == dict(name="momentum", lr=0.05, momentum=0.5,
                      weight_decay=0.01, schedule="cosine",
                      schedule_steps=27, clip_norm=2.0, milestones=(),
                      gamma=0.1, epochs=3)
  # 272 / 16 = 17 exactly.
  experiment.setup(quick_config(**{"train.batch_size": 16,
                                   "train.epochs": 2}))
  assert seen["schedule_steps"] == 34
  experiment.setup(quick_config(**{"train.batch_size": 30,
                                   "train.epochs": 1}))
  assert seen["schedule_steps"] == 10  # ceil(272 / 30)
  # An online stream is one pass, whatever train.epochs says (the schedule
  # was sized for train.epochs passes before session 43).
  s = experiment.setup(quick_config(**{"scenario.online": True,
                                       "train.epochs": 2,
                                       "optimizer.schedule": "cosine"}))
  assert s.learner.epochs == 1
  assert seen["schedule_steps"] == 17  # ceil(272 / 16), one pass
  assert seen["epochs"] == 1


def _rates(tx, n):
  """The rate of each of ``n`` updates (SGD on a unit gradient)."""
  p = {"w": jnp.zeros(())}
  st, out = tx.init(p), []
  for _ in range(n):
    u, st = tx.update({"w": jnp.ones(())}, st, p)
    out.append(-float(u["w"]))
  return np.array(out)


def test_multistep_schedule_is_pytorchs_multisteplr():
  # 10 steps per epoch, 5 epochs, milestones at epochs 3 and 4: epochs
  # 0-2 at the rate, 3 at a tenth, 4 at a hundredth (MultiStepLR).
  tx = experiment.make_optimizer("sgd", 0.5, schedule="multistep",
                                 schedule_steps=50, milestones=(3, 4),
                                 gamma=0.1, epochs=5)
  np.testing.assert_allclose(
      _rates(tx, 50), [0.5] * 30 + [0.05] * 10 + [0.005] * 10, rtol=1e-6)
  # From the config: Split Digits' 272 examples in batches of 16 are 17
  # steps per epoch; two epochs, the second at a fifth.
  c = quick_config(**{"optimizer.schedule": "multistep",
                      "optimizer.milestones": (1,), "optimizer.gamma": 0.2,
                      "optimizer.name": "sgd", "optimizer.learning_rate": 1.0,
                      "train.epochs": 2})
  s = experiment.setup(c)
  np.testing.assert_allclose(_rates(s.learner.ctx.tx, 34),
                             [1.0] * 17 + [0.2] * 17, rtol=1e-6)
  assert ("learning rate 1, multistep schedule (x 0.2 from epochs 1)"
          in experiment.describe(s, experiment.initial_state(s, 0)))


@pytest.mark.parametrize("opt,match", [
    (dict(schedule="multistep"), r"needs milestones: increasing whole "
     r"epochs in \[1, 3\) \(3 epoch\(s\) per experience\), got \(\)"),
    (dict(schedule="multistep", milestones=(2, 1)), r"got \(2, 1\)"),
    (dict(schedule="multistep", milestones=(0,)), r"got \(0,\)"),
    (dict(schedule="multistep", milestones=(3,)), r"got \(3,\)"),
    (dict(schedule="multistep", milestones=(1.5,)), r"got \(1.5,\)"),
    (dict(schedule="multistep", milestones=(1,), gamma=0.0),
     r"gamma must be in \(0, 1\]"),
    (dict(schedule="cosine", milestones=(1,)),
     r"milestones \(1,\) are read by schedule 'multistep' only, not "
     r"'cosine'")])
def test_multistep_refusals(opt, match):
  c = quick_config(**{"train.epochs": 3,
                      **{f"optimizer.{k}": v for k, v in opt.items()}})
  with pytest.raises(ValueError, match=match):
    experiment.setup(c)


def test_build_strategy_fills_the_runs_epochs_and_data_dir(monkeypatch):
  seen = {}
  real = jaxcl.strategies.from_spec

  def spy(spec, kwargs):
    seen.update(spec=spec, kwargs=kwargs)
    return real("naive", {})

  monkeypatch.setattr(jaxcl.strategies, "from_spec", spy)
  c = quick_config(**{"strategy.name": "aer_abs+dmc", "train.epochs": 3,
                      "dataset.data_dir": "/some/dir"})
  experiment.build_strategy(c)
  assert seen["kwargs"]["aer_abs"]["train_epochs"] == 3
  assert seen["kwargs"]["dmc"]["aux_data_dir"] == "/some/dir"
  c.scenario.online = True
  experiment.build_strategy(c)
  assert seen["kwargs"]["aer_abs"]["train_epochs"] == 1
  # What the user gave wins; train_epochs other than the run's is refused
  # at once (AER-ABS would refuse it only as the first experience ended).
  c.strategy.aer_abs = dict(train_epochs=1)
  c.strategy.dmc = dict(aux_data_dir="/mine")
  experiment.build_strategy(c)
  assert seen["kwargs"]["aer_abs"]["train_epochs"] == 1
  assert seen["kwargs"]["dmc"]["aux_data_dir"] == "/mine"
  c.strategy.aer_abs = dict(train_epochs=5)
  with pytest.raises(ValueError, match=r"strategy.aer_abs.train_epochs=5, "
                     r"but the run trains 1 epoch\(s\) per experience "
                     r"\(train.epochs; scenario.online makes it 1\); leave "
                     r"train_epochs out or set it to 1"):
    experiment.build_strategy(c)
  c.scenario.online = False
  with pytest.raises(ValueError, match=r"train_epochs=5, but the run trains "
                     r"3 epoch\(s\) per experience \(train.epochs\);"):
    experiment.build_strategy(c)


# --------------------------------------------------------------------------
# _check_finite and check_same_stream.


def test_check_finite_names_the_first_bad_step_that_ran():
  f = experiment._check_finite
  nan, inf = np.nan, np.inf
  # Steps that did not run (padding) may hold anything.
  f(np.array([1.0, nan, 2.0]), np.array([True, False, True]), 0, 0, 0)
  with pytest.raises(jaxcl.NonFiniteLossError,
                     match=r"non-finite loss inf in experience 3, epoch 1, "
                     r"step 10 of the epoch"):
    f(np.array([1.0, nan, inf, nan]), np.array([True, False, True, True]),
      3, 1, 8)
  with pytest.raises(jaxcl.NonFiniteLossError,
                     match=r"in sweep member 1, experience 2, epoch 0, "
                     r"step 5 of"):
    f(np.array([[1.0, 1.0, 1.0], [1.0, nan, inf]]), np.ones((2, 3), bool),
      2, 0, 4)


def test_check_same_stream_names_each_difference(full_stream):
  base = full_stream
  exps = base.experiences
  check = lambda other: experiment.check_same_stream([base, other])
  check(dataclasses.replace(base, experiences=tuple(
      dataclasses.replace(e, inputs=scenarios.given(e.train_x + 1.0,
                                                    e.test_x))
      for e in exps)))
  cases = [
      (dataclasses.replace(base, online=True), "in online"),
      (dataclasses.replace(base, task_classes=~base.task_classes),
       "in task_classes"),
      (dataclasses.replace(base, experiences=exps[:4]),
       "the number of experiences"),
      (dataclasses.replace(base, experiences=exps[1:] + exps[:1]),
       r"the task id or classes of experiences\[0\]"),
      (dataclasses.replace(base, experiences=exps[:4] + (
          dataclasses.replace(exps[4], test_y=exps[4].test_y[::-1].copy()),)),
       r"test_y of experiences\[4\]"),
  ]
  for other, what in cases:
    with pytest.raises(ValueError, match=what):
      check(other)
  # A draw with more experiences than draw 0 differs too.
  with pytest.raises(ValueError, match="the number of experiences"):
    experiment.check_same_stream(
        [dataclasses.replace(base, experiences=exps[:4]), base])
  with pytest.raises(ValueError, match=r"the task id or classes of "
                     r"experiences\[1\]"):
    check(dataclasses.replace(base, experiences=(exps[0], dataclasses.replace(
        exps[1], classes=(3, 2))) + tuple(exps[2:])))


# --------------------------------------------------------------------------
# execute: what is evaluated, reported and reset, in which order.


class Recorder:
  """A reporter that logs every call (and the hooks log into it too)."""

  def __init__(self):
    self.log = []

  def progress(self, total, desc, initial=0):
    self.log.append(("progress", total, desc, initial))
    rec = self

    class Bar:
      def update(self, n, loss):
        rec.log.append(("update", n, loss))

      def close(self):
        rec.log.append(("close",))
    return Bar()

  def scalar(self, name, value, step):
    self.log.append(("scalar", name, value, step))

  def experience(self, index, row, step):
    self.log.append(("experience", index, np.asarray(row), step))

  def finish(self, result):
    self.log.append(("finish", result))


def _np_accuracy(ctx, params, model_state, exps):
  out = []
  for e in exps:
    logits = np.asarray(ctx.logits(params, model_state, e.test_x,
                                   e.test_task))
    out.append(float((logits.argmax(1) == e.test_y).mean()))
  return np.array(out)


def test_execute_evaluates_reports_and_hooks_in_order(stream):
  rec = Recorder()
  base = jaxcl.strategies.get("naive")
  probe = base._replace(
      name="probe",
      before_experience=lambda ctx, st, e: (
          rec.log.append(("before", tuple(e.classes))), st)[1],
      after_experience=lambda ctx, st, e: (
          rec.log.append(("after", tuple(e.classes))), st)[1])
  c = quick_config(**{"train.epochs": 2})
  s = experiment.setup(c, stream, strategy=probe)
  state = experiment.initial_state(s, 0)
  ctx = s.learner.ctx
  host = jax.tree.map(np.asarray, state)
  want_random = _np_accuracy(ctx, host.params, host.model_state,
                             stream.eval_experiences)
  r = experiment.execute(s, state, reporter=rec)
  np.testing.assert_allclose(r.random_accuracy, want_random)
  np.testing.assert_allclose(
      r.accuracy[-1], _np_accuracy(ctx, r.state.params, r.state.model_state,
                                   stream.eval_experiences))
  steps = s.learner.epoch_steps  # ceil(max(270, 270) / 16) = 17
  assert steps == 17
  kinds = [e[0] for e in rec.log]
  per_exp = ["before", "progress"] + ["update", "scalar"] * 2 + [
      "close", "after", "experience"]
  assert kinds == per_exp * 2 + ["finish"], kinds
  prog = [e for e in rec.log if e[0] == "progress"]
  assert prog == [("progress", 2 * steps, "experience 1/2", 0),
                  ("progress", 2 * steps, "experience 2/2", 0)]
  assert [e[1] for e in rec.log if e[0] == "before"] == [(0, 1), (2, 3)]
  assert [e[1] for e in rec.log if e[0] == "after"] == [(0, 1), (2, 3)]
  rows = [e for e in rec.log if e[0] == "experience"]
  assert [(e[1], e[3]) for e in rows] == [(0, 2 * steps), (1, 4 * steps)]
  for i, e in enumerate(rows):
    np.testing.assert_array_equal(e[2], r.accuracy[i])
  assert [e[3] for e in rec.log if e[0] == "scalar"] == [
      steps, 2 * steps, 3 * steps, 4 * steps]
  # Class-incremental Naive: the newest experience is learnt; the matrix
  # has one row per experience, in order.
  assert r.accuracy[0, 0] > 0.9 and r.accuracy[1, 1] > 0.9
  assert rec.log[-1][1] is r


def test_reported_loss_is_the_mean_over_the_steps_that_ran(digits):
  """An experience of one batch in an epoch of four steps (the largest
  experience's): the loss reported is that batch's, not a mean that counts
  the three padding steps."""
  full = scenarios.split(digits, 5)
  cut = lambda e, n: dataclasses.replace(
      e, train_y=e.train_y[:n], train_task=e.train_task[:n],
      inputs=scenarios.given(e.train_x[:n], e.test_x))
  big, small = cut(full.experiences[0], 64), cut(full.experiences[1], 16)
  sc = dataclasses.replace(full, experiences=(big, small))
  c = quick_config(**{"optimizer.learning_rate": 1e-9})
  s = experiment.setup(c, sc)
  state = experiment.initial_state(s, 0)
  p0 = jax.tree.map(np.asarray, (state.params, state.model_state))
  rec = Recorder()
  experiment.execute(s, state, reporter=rec)
  assert s.learner.epoch_steps == 4
  losses = [e for e in rec.log if e[0] == "scalar"]
  assert [e[3] for e in losses] == [4, 5]
  logits = np.asarray(s.learner.ctx.logits(*p0, small.train_x,
                                           small.train_task), np.float64)
  ce = -np_log_softmax(logits)[np.arange(16), small.train_y].mean()
  np.testing.assert_allclose(losses[1][2], ce, rtol=1e-4)


def test_optimizer_state_is_reset_per_experience_unless_turned_off(stream):
  """Adam's step count: with the reset, the last experience's steps; with
  reset_optimizer=False, every step of the stream."""
  def count(reset):
    c = quick_config(**{"optimizer.name": "adam",
                        "train.reset_optimizer": reset})
    r = jaxcl.run(c, scenario=stream)
    counts = {int(np.asarray(leaf)) for path, leaf in
              jax.tree_util.tree_flatten_with_path(r.state.opt_state)[0]
              if "count" in jax.tree_util.keystr(path)}
    return counts, int(r.state.step)

  per_exp = math.ceil(270 / 16)
  assert count(True) == ({per_exp}, 2 * per_exp)
  assert count(False) == ({2 * per_exp}, 2 * per_exp)


def test_a_sweeps_rows_and_summary_are_its_runs(full_stream):
  """Two stacked runs: each run's metrics use its own random accuracies
  (FWT reads those of test sets 2-5); the reporter sees the mean row and
  the mean result."""
  rec = Recorder()
  s = experiment.setup(quick_config(), full_stream)
  stacked = experiment._stack([experiment.initial_state(s, 0),
                               experiment.initial_state(s, 1)])
  r = experiment.execute(s, stacked, members=2, reporter=rec)
  assert r.accuracy.shape == (2, 5, 5)
  assert not np.array_equal(r.random_accuracy[0, 1:],
                            r.random_accuracy[1, 1:])
  assert r.metrics["fwt"][0] != r.metrics["fwt"][1]
  for m in range(2):
    want = jaxcl.metrics.summary(r.accuracy[m], r.random_accuracy[m])
    for k, v in want.items():
      np.testing.assert_allclose(r.metrics[k][m], v)
  rows = [e for e in rec.log if e[0] == "experience"]
  for i, e in enumerate(rows):
    np.testing.assert_allclose(e[2], r.accuracy[:, i].mean(0))
  fin = rec.log[-1][1]
  np.testing.assert_allclose(fin.accuracy, r.accuracy.mean(0))
  np.testing.assert_allclose(fin.random_accuracy, r.random_accuracy.mean(0))


def test_dry_run_notes_settings_a_config_keeps_that_the_run_ignores():
  """A config file may keep values the run ignores (momentum for plain
  SGD, an MLP's widths beside a CNN); the dry run notes each one away
  from the default config's, and nothing for a config without any."""
  c = quick_config(**{"optimizer.momentum": 0.0, "model.name": "cnn"})
  notes = experiment.ignored_settings(c)
  assert notes == [
      "model.widths=(32,) is read by the mlp backbone only; "
      "model.name='cnn' would ignore it (it reads model.channels, "
      "model.hidden, model.init, model.head)",
      "optimizer.momentum=0.0: optimizer.name='sgd' would ignore it (it is "
      "the heavy-ball coefficient of optimizer 'momentum'; set "
      "--config.optimizer.name=momentum)"]
  s = experiment.setup(c)
  text = experiment.describe(s, experiment.initial_state(s, 0))
  assert all(f"\nnote: {n}\n" in text for n in notes), text
  assert experiment.ignored_settings(quick_config()) == []
  c = quick_config(**{"optimizer.name": "momentum",
                      "optimizer.momentum": 0.5})
  assert experiment.ignored_settings(c) == []


def test_a_larger_first_experience_runs_through_the_config():
  # scenario.first_classes: "B4 Inc2" on digits, iCaRL with 40 exemplars.
  # Its memory splits by the classes seen: 10 per class after the first
  # experience's 4 classes, 4 per class after all 10.
  from test_train import quick_config
  c = quick_config(**{"scenario.n_experiences": 4,
                      "scenario.first_classes": 4,
                      "strategy.name": "icarl"})
  c.strategy.icarl = dict(mem_size=40)
  s = experiment.setup(c)
  assert [len(e.classes) for e in s.scenario.experiences] == [4, 2, 2, 2]
  text = experiment.describe(s, experiment.initial_state(s, 0))
  assert "experience 0: task 0, 4 classes [0, 1, 2, 3]" in text
  assert "experience 1: task 0, 2 classes [4, 5]" in text
  first = jaxcl.run(c, scenario=dataclasses.replace(
      s.scenario, experiences=s.scenario.experiences[:1]))
  mem = first.state.strategy.memory
  np.testing.assert_array_equal(
      np.bincount(np.asarray(mem.y)[np.asarray(mem.valid)], minlength=10),
      [10] * 4 + [0] * 6)
  r = jaxcl.run(c)
  assert r.accuracy.shape == (4, 4)
  mem = r.state.strategy.memory
  np.testing.assert_array_equal(
      np.bincount(np.asarray(mem.y)[np.asarray(mem.valid)], minlength=10),
      [4] * 10)
  # The first test set is about twice the others: the summary adds the
  # accuracy over the pooled test examples, as LUCIR's code reports it.
  n = [len(e.test_y) for e in s.scenario.experiences]
  assert n[0] > 1.8 * n[1]
  assert r.metrics["acc_pooled"] == pytest.approx(
      float(r.accuracy[-1] @ n / sum(n)))
  assert r.metrics["inc_acc_pooled"] == pytest.approx(
      metrics.pooled_incremental_accuracy(r.accuracy, n))
  # Read by split streams only.
  c.scenario.type = "permuted"
  with pytest.raises(ValueError, match=r"scenario.first_classes=4 is read "
                     r"by split streams only"):
    experiment.build_scenario(c)


class WorkRecorder(report.NullReporter):
  """A reporter that records the bars strategies' hooks open through
  ``Context.progress`` (``work_progress``) and what each counted."""

  def __init__(self):
    self.bars = []

  def work_progress(self, total, desc, unit="step"):
    bar = {"total": total, "desc": desc, "unit": unit, "done": 0,
           "closed": False}
    self.bars.append(bar)

    class Bar:
      def update(self, n=1, loss=None):
        del loss
        assert not bar["closed"]
        bar["done"] += n

      def close(self):
        bar["closed"] = True
    return Bar()


def test_a_hooks_own_loop_gets_a_bar_per_run_and_experience():
  """PackNet's retraining epochs after each experience: one bar per
  experience and run of a 2-seed sweep, named after both, counting every
  epoch and closed; the context's bar takes no part in its equality, so
  compiled code keyed on the context is not traced again."""
  c = quick_config(**{"strategy.name": "packnet", "scenario.kind": "task",
                      "scenario.n_experiences": 2, "model.multi_head": True})
  c.strategy.packnet = {"retrain_epochs": 3}
  s = experiment.setup(c)
  stacked = experiment._stack([experiment.initial_state(s, 0),
                               experiment.initial_state(s, 1)])
  rec = WorkRecorder()
  experiment.execute(s, stacked, members=2, reporter=rec)
  assert [(b["desc"], b["total"], b["done"], b["unit"], b["closed"])
          for b in rec.bars] == [
              (f"experience {i}/2, packnet after it (run {m}/2): "
               "retraining after pruning", 3, 3, "epoch", True)
              for i in (1, 2) for m in (1, 2)]
  ctx = s.learner.ctx
  other = dataclasses.replace(ctx, progress=rec.work_progress)
  assert other == ctx and hash(other) == hash(ctx)
