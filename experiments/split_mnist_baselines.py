"""Split MNIST baselines: Naive, Joint, Cumulative, Ensemble, Freezing,
From scratch.

Protocol (DESIGN.md's speed target and the core issue's checks): MNIST split
into 5 experiences of 2 classes (0/1, 2/3, ...), MLP 784-400-400-10, SGD
with momentum 0.9, learning rate 0.05, batch 128, 2 epochs per experience,
all test sets evaluated after each experience.

  jaxcl run --config experiments/split_mnist_baselines.py
  jaxcl run --config experiments/split_mnist_baselines.py:strategy=joint
  jaxcl run --config experiments/split_mnist_baselines.py:strategy=naive,kind=task

Arguments: ``strategy`` (naive | joint | cumulative | ensemble | freezing:
FACIL's, the backbone fixed after experience 0 | from_scratch:
Avalanche's, every experience from the initial weights), ``kind``
(class | task), ``seed``, ``quick`` (2000 training / 1000 test examples, for
tests). Measured (seed 0, 2-core CPU; see BUILD_NOTES.md): class-IL Naive
ACC 0.196 with experience 0 forgotten (0.000), Joint 0.973, Cumulative
~0.97; task-IL Naive ~0.98. About 6-12 s per run on a 2-core CPU.

Needs the raw MNIST IDX files: ``--config.dataset.data_dir=DIR`` or
``JAXCL_DATA_DIR`` (tests use ``../shared/data``); without them it reads
MNIST through tensorflow_datasets.
"""

from jaxcl.configs import parse_arg
from jaxcl.experiment import default_config


def get_config(arg=None):
  a = parse_arg(arg, strategy="naive", kind="class", seed=0, quick=False)
  c = default_config()
  c.name = f"split_mnist_{a['kind']}_{a['strategy']}"
  c.seed = a["seed"]
  c.dataset.name = "mnist"
  c.scenario.type = "split"
  c.scenario.kind = a["kind"]
  c.scenario.n_experiences = 5
  c.model.name = "mlp"
  c.model.widths = (400, 400)
  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = 0.05
  c.optimizer.momentum = 0.9
  c.train.epochs = 2
  c.train.batch_size = 128
  c.train.eval_batch_size = 1000
  c.strategy.name = a["strategy"]
  if a["quick"]:
    c.dataset.train_subset = 2000
    c.dataset.test_subset = 1000
    c.train.batch_size = 32
    c.train.eval_batch_size = 250
  return c
