"""Split CIFAR-100 in 20 tasks of 5 classes, protocol of GEM / A-GEM.

For users with the data (``tensorflow_datasets`` CIFAR-100: a prepared tfds
``data_dir`` or network access); this machine has none, so these rows are
not in the committed RESULTS.md.

Protocol (Lopez-Paz & Ranzato 2017; Chaudhry et al. 2019): CIFAR-100 split
into 20 experiences of 5 classes, task-incremental (logits masked to the
task's classes), the reduced ResNet-18 (``width=20``), a single pass (1
epoch) with batch 10, SGD. GEM keeps ``mem_size`` examples in total
(GEM's 256 per task is ``mem_size=5120``; the default 260 is A-GEM's 13
per task); A-GEM projects against a sample
of up to 256 memory rows. Compare with GEM's Figure 1 / A-GEM's Table 1
(CIFAR column). Differences: A-GEM cross-validates on 3 extra tasks (its
17-task evaluation stream); here all 20 tasks are evaluated.

  jaxcl run --config experiments/split_cifar100.py:strategy=agem
  jaxcl run --config experiments/split_cifar100.py:strategy=gem,mem_size=1300
  python -m experiments.reproduce --only split_cifar100

Arguments: ``strategy`` (naive | replay | gem | agem | ewc | si | lwf), ``kind`` (task | class), ``mem_size``, ``lr``, ``seed``,
``quick`` (tiny subsets, for tests).

References:
  Lopez-Paz & Ranzato, `Gradient episodic memory for continual learning
  <https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017.
  Chaudhry et al., `Efficient lifelong learning with A-GEM
  <https://arxiv.org/abs/1812.00420>`_, ICLR 2019.
"""

from experiments.split_cifar10 import set_strategy
from jaxcl.configs import parse_arg
from jaxcl.experiment import default_config

LR = {"naive": 0.03, "replay": 0.03, "gem": 0.03, "agem": 0.03, "ewc": 0.03,
      "si": 0.03, "lwf": 0.03}


def get_config(arg=None):
  a = parse_arg(arg, strategy="agem", kind="task", mem_size=260, lr=0.0,
                seed=0, quick=False)
  s, m = a["strategy"], a["mem_size"]
  if s not in LR:
    raise ValueError(f"unknown strategy {s!r}; valid: {sorted(LR)}")
  c = default_config()
  c.name = f"split_cifar100_{s}_{a['kind']}"
  c.seed = a["seed"]
  c.dataset.name = "cifar100"
  c.scenario.type = "split"
  c.scenario.kind = a["kind"]
  c.scenario.n_experiences = 20
  c.scenario.online = True
  c.model.name = "resnet18"
  c.model.width = 20
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = a["lr"] or LR[s]
  c.train.epochs = 1
  c.train.batch_size = 10
  c.train.eval_batch_size = 500
  set_strategy(c, s, m, replay_batch=10)
  if a["quick"]:
    c.dataset.train_subset = 1000
    c.dataset.test_subset = 200
    c.model.width = 8
    c.train.eval_batch_size = 100
  return c
