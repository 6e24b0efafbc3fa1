"""experiments/split_cifar100_icarl.py and split_cifar100_lucir.py: the
protocols of iCaRL's and LUCIR's authors' code, checked without CIFAR-100
(this machine has none): the class order, the batch split that stands in
for their concatenated training set, and the configs built on a stand-in
data set of CIFAR-100's form."""

import math

import numpy as np
import pytest

import jaxcl
from experiments import split_cifar100_icarl as protocol
from experiments import split_cifar100_lucir as lucir_protocol
from jaxcl import datasets, experiment

# FACIL's dataset_config.py, 'cifar100_icarl' (mmasana/FACIL, quoted).
FACIL_ORDER = (
    68, 56, 78, 8, 23, 84, 90, 65, 74, 76, 40, 89, 3, 92, 55, 9, 26, 80, 43,
    38, 58, 70, 77, 1, 85, 19, 17, 50, 28, 53, 13, 81, 45, 82, 6, 59, 83, 16,
    15, 44, 91, 41, 72, 60, 79, 52, 20, 10, 31, 54, 37, 95, 14, 71, 96, 98,
    97, 2, 64, 66, 42, 22, 35, 86, 24, 34, 87, 21, 99, 0, 88, 27, 18, 94, 11,
    12, 47, 25, 30, 46, 62, 69, 36, 61, 7, 63, 75, 5, 32, 4, 51, 48, 73, 93,
    39, 67, 29, 49, 57, 33)


@pytest.fixture
def stand_in(monkeypatch):
  """``datasets.load('cifar100')`` as 25 training and 2 test images per
  class of 8x8 RGB noise (the protocol's form, not its size)."""
  rng = np.random.default_rng(0)
  x = lambda n: rng.uniform(size=(n, 8, 8, 3)).astype(np.float32)
  data = datasets.Dataset("cifar100", x(2500), np.arange(2500) % 100,
                          x(200), np.arange(200) % 100, 100)

  def load(name, data_dir=None):
    assert name == "cifar100"
    return data

  monkeypatch.setattr(datasets, "load", load)


def test_class_order_is_the_authors_first_run():
  # np.random.seed(1993), then shuffle(arange(100)): FACIL's list.
  assert protocol.class_order() == FACIL_ORDER
  assert sorted(FACIL_ORDER) == list(range(100))


@pytest.mark.parametrize("groups", [2, 5, 10, 20, 50])
def test_batches_hold_exemplars_as_the_concatenated_set_does(groups):
  # The authors' code trains on a group's 50000 / groups images and the
  # 2000 exemplars shuffled together, in batches of 128; here every batch
  # is `new` images plus `old` exemplars: 128 rows in all, the exemplars'
  # share within one row of theirs, and the same steps per epoch.
  n = 50000 // groups
  new, old = protocol.split_batch(n, 2000)
  assert new + old == 128
  assert abs(old - 128 * 2000 / (n + 2000)) <= 0.5
  assert abs(math.ceil(n / new) - math.ceil((n + 2000) / 128)) <= 1
  assert protocol.split_batch(5000, 2000) == (91, 37)


def test_config_builds_the_protocol(stand_in):
  c = protocol.get_config("strategy=icarl")
  assert (c.train.batch_size, c.strategy.icarl.batch_size) == (91, 37)
  assert dict(c.strategy.icarl) == dict(mem_size=2000, batch_size=37,
                                        mirror_means=True, bce_classes="all")
  assert dict(protocol.get_config("strategy=lwf_mc").strategy.lwf_mc) == {
      "bce_classes": "all"}
  quick = protocol.get_config("strategy=icarl,quick").strategy.icarl
  assert (quick.batch_size, quick.bce_classes) == (8, "all")
  assert (c.optimizer.learning_rate, tuple(c.optimizer.milestones),
          c.optimizer.gamma, c.train.epochs) == (2.0, (49, 63), 0.2, 70)
  s = experiment.setup(c)
  backbone = s.learner.ctx.model.backbone
  assert (backbone.depth, backbone.width, backbone.shortcut,
          backbone.last_relu) == (32, 16, "pad", False)
  assert [tuple(e.classes) for e in s.scenario.experiences][:2] == [
      FACIL_ORDER[:10], FACIL_ORDER[10:20]]
  # Each channel standardised with FACIL's statistics.
  raw = datasets.load("cifar100")
  x0 = s.scenario.experiences[0].test_x
  first = raw.test_x[np.isin(raw.test_y, FACIL_ORDER[:10])]
  np.testing.assert_allclose(
      np.sort(x0[..., 1].ravel()),
      np.sort((first[..., 1].ravel() - 0.4866) / 0.1984), rtol=1e-5)
  for s_name in ("naive", "lwf_mc", "joint"):
    assert protocol.get_config(f"strategy={s_name}").train.batch_size == 128
  with pytest.raises(ValueError, match=r"n_experiences=3: must divide"):
    protocol.get_config("n_experiences=3")
  with pytest.raises(ValueError, match=r"unknown strategy 'gem'"):
    protocol.get_config("strategy=gem")


@pytest.mark.slow
def test_quick_icarl_runs_end_to_end_on_the_stand_in(stand_in):
  # ResNet-32, per-channel standardisation, pad-crop and flip, iCaRL with
  # mirrored class means: two groups (~45 s at the tests' compile flags).
  c = protocol.get_config("strategy=icarl,quick")
  c.scenario.n_experiences = 2
  c.report.progress = False
  r = jaxcl.run(c)
  assert r.accuracy.shape == (2, 2)
  assert bool(np.asarray(r.state.strategy.has_mean).sum() == 100)


@pytest.mark.parametrize("inc", [10, 5, 2])
def test_lucir_batches_hold_exemplars_as_the_concatenated_sets_do(inc):
  # 20 exemplars of every earlier class, 500 images of each new one: over
  # the experiences after the 50-class one, the exemplars' mean share of
  # the code's concatenated sets, within one row of 128.
  new, old = lucir_protocol.split_batch(inc, 20)
  assert new + old == 128
  shares = [20 * (50 + i * inc) / (20 * (50 + i * inc) + 500 * inc)
            for i in range(50 // inc)]
  assert abs(old - 128 * sum(shares) / len(shares)) <= 1.5
  assert lucir_protocol.split_batch(10, 20) == (100, 28)


def test_lucir_config_builds_the_protocol(stand_in):
  c = lucir_protocol.get_config("")
  s = experiment.setup(c)
  assert [len(e.classes) for e in s.scenario.experiences] == [50] + [10] * 5
  assert tuple(s.scenario.experiences[1].classes) == FACIL_ORDER[50:60]
  backbone = s.learner.ctx.model.backbone
  assert (backbone.depth, backbone.shortcut, backbone.last_relu) == (
      32, "conv", False)
  assert s.learner.ctx.model.head == "cosine"
  kw = dict(c.strategy.lucir)
  assert (kw["per_class"], kw["imprint"], kw["classifier"],
          kw["mirror_means"]) == (20, True, "cnn", False)
  nme = lucir_protocol.get_config("classifier=nme")
  assert (nme.strategy.lucir.classifier, nme.strategy.lucir.mirror_means,
          nme.name) == ("nme", True, "split_cifar100_lucir_b50_inc10_nme")
  experiment.setup(nme)  # the strategy builds with these arguments
  assert (c.optimizer.learning_rate, tuple(c.optimizer.milestones),
          c.optimizer.gamma, c.optimizer.weight_decay, c.train.epochs) == (
              0.1, (80, 120), 0.1, 5e-4, 160)
  assert lucir_protocol.get_config("increment=5").scenario.n_experiences == 11
  with pytest.raises(ValueError, match=r"increment=3: must divide the 50"):
    lucir_protocol.get_config("increment=3")
  with pytest.raises(ValueError, match=r"classifier='ncm': must be one of "
                     r"\['cnn', 'nme'\]"):
    lucir_protocol.get_config("classifier=ncm")


@pytest.mark.slow
def test_quick_lucir_runs_end_to_end_on_the_stand_in(stand_in):
  # ResNet-32 without its last ReLU, the cosine head, 20 exemplars per
  # class, imprinted weights and NME: the 50-class experience and one
  # more (of 50 here).
  c = lucir_protocol.get_config("increment=50,classifier=nme,quick")
  c.dataset.train_subset = 0  # every class's 25 images: 20 exemplars each
  c.report.progress = False
  r = jaxcl.run(c)
  assert r.accuracy.shape == (2, 2)
  counts = np.bincount(np.asarray(r.state.strategy.memory.y)[
      np.asarray(r.state.strategy.memory.valid)], minlength=100)
  np.testing.assert_array_equal(counts, 20)
  # Class means of the exemplars and their mirror images, for every class.
  assert bool(np.asarray(r.state.strategy.has_mean).all())
