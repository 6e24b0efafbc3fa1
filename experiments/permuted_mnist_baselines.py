"""Permuted MNIST baselines (domain-incremental).

10 experiences, each a fixed random pixel permutation of MNIST, MLP
784-1000-1000-10 (the regularisation papers' width), SGD lr 0.1, batch 128,
1 epoch per experience. Naive drifts (forgets the early permutations);
Joint is the upper bound.

  jaxcl run --config experiments/permuted_mnist_baselines.py:strategy=naive
  jaxcl run --config experiments/permuted_mnist_baselines.py:n=20

Arguments: ``strategy``, ``n`` (experiences), ``seed``, ``quick``.
"""

from jaxcl.configs import parse_arg
from jaxcl.experiment import default_config


def get_config(arg=None):
  a = parse_arg(arg, strategy="naive", n=10, seed=0, quick=False)
  c = default_config()
  c.name = f"permuted_mnist{a['n']}_{a['strategy']}"
  c.seed = a["seed"]
  c.dataset.name = "mnist"
  c.scenario.type = "permuted"
  c.scenario.kind = "domain"
  c.scenario.n_experiences = a["n"]
  c.model.widths = (1000, 1000)
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.train.epochs = 1
  c.train.batch_size = 128
  c.train.eval_batch_size = 1000
  c.strategy.name = a["strategy"]
  if a["quick"]:
    c.dataset.train_subset = 2000
    c.dataset.test_subset = 500
    c.model.widths = (100, 100)
    c.train.batch_size = 32
    c.train.eval_batch_size = 250
  return c
