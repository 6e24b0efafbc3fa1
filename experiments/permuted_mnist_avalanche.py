"""Permuted MNIST on the protocol of Avalanche's reproducibility suite
(ContinualAI/continual-learning-baselines), for the methods whose
published number is that suite's.

* ``lfl`` (Jung et al. 2016; the suite's ``experiments/permuted_mnist/
  lfl.py``): 4 experiences, each MNIST under its own random pixel
  permutation (every experience permuted), domain-incremental; inputs
  standardised with MNIST's mean and standard deviation (0.1307, 0.3081),
  as Avalanche's ``PermutedMNIST``; MLP 784-256-10 with PyTorch's
  ``nn.Linear`` initialisation; plain SGD lr 0.01, batch 128, 3 epochs;
  ``λ_e`` 1e-4. The suite's target: ACC 0.88.
* ``naive``: the same protocol without the strategy (reference).

Commands::

  jaxcl run --config experiments/permuted_mnist_avalanche.py:strategy=lfl
  jaxcl run --config experiments/permuted_mnist_avalanche.py:strategy=naive

Arguments: ``strategy`` (lfl | naive), ``seed``, ``lambda_e`` (< 0: the
protocol's), ``quick`` (2000 training / 500 test examples, for tests).
Measured results: docs/notes_regularisation.md.
"""

from jaxcl.configs import parse_arg
from jaxcl.experiment import default_config

STRATEGIES = ("lfl", "naive")


def get_config(arg=None):
  a = parse_arg(arg, strategy="lfl", seed=0, lambda_e=-1.0, quick=False)
  name = a["strategy"]
  if name not in STRATEGIES:
    raise ValueError(f"unknown strategy {name!r} for this config; valid: "
                     f"{list(STRATEGIES)}")
  c = default_config()
  c.name = f"permuted_mnist4_avalanche_{name}"
  c.seed = a["seed"]
  c.dataset.name = "mnist"
  c.dataset.normalize = (0.1307, 0.3081)
  c.scenario.type = "permuted"
  c.scenario.kind = "domain"
  c.scenario.n_experiences = 4
  c.model.name = "mlp"
  c.model.widths = (256,)
  c.model.init = "torch"
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.01
  c.train.epochs = 3
  c.train.batch_size = 128
  c.train.eval_batch_size = 1000
  c.strategy.name = name
  if name == "lfl":
    c.strategy.lfl = dict(lambda_e=a["lambda_e"] if a["lambda_e"] >= 0
                          else 1e-4)
  if a["quick"]:
    c.dataset.train_subset = 2000
    c.dataset.test_subset = 500
    c.train.eval_batch_size = 250
  return c
