"""Baselines on Split MNIST (5 x 2 classes, MLP 400-400, 2 epochs): the
core issue's accuracy checks, with the committed experiment config."""


import numpy as np

import jaxcl
from experiments import split_mnist_baselines


def run(data_dir, arg):
  c = split_mnist_baselines.get_config(arg)
  c.dataset.data_dir = data_dir
  c.report.progress = False
  return jaxcl.run(c)


def test_naive_class_incremental_forgets(data_dir):
  r = run(data_dir, "strategy=naive")
  assert r.accuracy.shape == (5, 5)
  # It learned each experience when it saw it...
  assert np.all(np.diag(r.accuracy) > 0.95)
  # ...and forgot experience 0 after the last one.
  assert r.accuracy[-1, 0] < 0.2
  assert r.metrics["bwt"] < -0.8


def test_joint_upper_bound(data_dir):
  r = run(data_dir, "strategy=joint")
  assert r.accuracy.shape == (1, 5)
  assert r.metrics["acc"] >= 0.95


def test_cumulative(data_dir):
  r = run(data_dir, "strategy=cumulative")
  assert r.metrics["acc"] >= 0.95
  assert r.accuracy[-1, 0] >= 0.9


def test_naive_task_incremental(data_dir):
  r = run(data_dir, "strategy=naive,kind=task")
  assert r.metrics["acc"] > 0.85
