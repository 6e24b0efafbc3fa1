"""Permuted / Rotated MNIST (domain-incremental, 20 experiences) with GEM and
A-GEM.

Two published protocols, picked by ``protocol``:

* ``buzzega`` (Buzzega et al. 2020, `Dark experience for general continual
  learning <https://arxiv.org/abs/2004.07211>`_, Mammoth's ``perm-mnist`` /
  ``rot-mnist``): 20 experiences of all 60000 MNIST training images under a
  fixed random pixel permutation (or rotation, nearest-neighbour as
  torchvision's default in Mammoth), one 10-way head, MLP
  784-100-100-10, SGD (Mammoth's best learning rates: GEM / A-GEM 0.1 on
  Permuted; GEM 0.01, A-GEM 0.1 / 0.3 on Rotated), one epoch, batch 128,
  total memory 200 or 500
  (``mem_size // 20`` per experience for GEM). Paper, GEM: Permuted
  66.9 / 76.9 %, Rotated 81.2 % (mem 200 / 500; 200 for rotated).
* ``chaudhry`` (Chaudhry et al. 2019, `Efficient Lifelong Learning with
  A-GEM <https://arxiv.org/abs/1812.00420>`_): 20 permutations, MLP
  784-256-256-10, SGD lr 0.03, single epoch, batch 10, 250 examples per
  experience in memory; A-GEM's reference gradient on 256 of them. Paper:
  GEM 89.5 %, A-GEM 89.1 % average accuracy.

Commands::

  jaxcl run --config experiments/permuted_mnist_hybrid.py:strategy=gem,mem_size=200
  jaxcl run --config experiments/permuted_mnist_hybrid.py:strategy=gem,scenario=rotated
  jaxcl run --config experiments/permuted_mnist_hybrid.py:strategy=agem,protocol=chaudhry

Arguments: ``strategy`` (gem | agem | naive | replay), ``protocol``,
``scenario`` (permuted | rotated), ``mem_size`` (buzzega), ``seed``, ``lr``
(0: the protocol's), ``init`` (``model.init``; default xavier_uniform for
buzzega, as Mammoth's MNISTMLP, lecun_normal for chaudhry), ``sample``
(GEM ``sample_per_experience``, 0: the
whole memory as in the paper), ``train_subset`` (0: all 60000), ``quick``
(3 experiences of 2000 / 500 examples, for tests). GEM with the whole
memory is costly on a CPU (see benchmarks/gem.py): the Chaudhry protocol
computes 19 x 250 memory gradients per batch of 10. Measured results: see
docs/notes_hybrid.md.
"""

from jaxcl.configs import parse_arg
from jaxcl.experiment import default_config


def get_config(arg=None):
  a = parse_arg(arg, strategy="gem", protocol="buzzega", scenario="permuted",
                mem_size=200, seed=0, lr=0.0, sample=0, train_subset=0,
                init="", quick=False)
  s, m, proto = a["strategy"], a["mem_size"], a["protocol"]
  if proto not in ("buzzega", "chaudhry"):
    raise ValueError(f"unknown protocol {proto!r}; valid: buzzega, chaudhry")
  if a["scenario"] not in ("permuted", "rotated"):
    raise ValueError(f"unknown scenario {a['scenario']!r}; valid: permuted, "
                     "rotated")
  if s not in ("gem", "agem", "naive", "replay"):
    raise ValueError(f"unknown strategy {s!r}; valid: gem, agem, naive, "
                     "replay")
  c = default_config()
  c.name = f"{a['scenario']}_mnist_{s}_{proto}_{m}"
  c.seed = a["seed"]
  c.dataset.name = "mnist"
  c.dataset.train_subset = a["train_subset"]
  c.scenario.type = a["scenario"]
  if a["scenario"] == "rotated":
    # Mammoth rotates with torchvision's default: nearest neighbour.
    c.scenario.interpolation = "nearest"
  c.scenario.kind = "domain"
  c.scenario.n_experiences = 20
  c.scenario.seed = a["seed"]
  c.model.name = "mlp"
  c.optimizer.name = "sgd"
  c.train.epochs = 1
  c.train.eval_batch_size = 1000
  c.report.progress = False
  c.strategy.name = s
  if proto == "buzzega":
    c.model.widths = (100, 100)
    # Mammoth's MNISTMLP: Xavier-uniform weights, zero biases.
    c.model.init = a["init"] or "xavier_uniform"
    # Mammoth's best_args: perm-mnist GEM / A-GEM 0.1; rot-mnist GEM 0.01,
    # A-GEM 0.1 (memory 200) / 0.3 (500); ER (replay) 0.2 on both.
    if a["scenario"] == "rotated":
      lr = {"gem": 0.01, "agem": 0.1 if m < 500 else 0.3}.get(s, 0.2)
    else:
      lr = 0.1 if s in ("gem", "agem") else 0.2
    c.optimizer.learning_rate = a["lr"] or lr
    c.train.batch_size = 128
    if s == "gem":
      c.strategy.gem = dict(mem_size=m, margin=0.5,
                            sample_per_experience=a["sample"])
    elif s == "agem":
      c.strategy.agem = dict(mem_size=m, sample_size=min(m, 256))
    elif s == "replay":
      c.strategy.replay = dict(mem_size=m, batch_size=128)
  else:
    c.model.widths = (256, 256)
    c.model.init = a["init"] or "lecun_normal"
    c.optimizer.learning_rate = a["lr"] or 0.03
    c.train.batch_size = 10
    c.scenario.online = True
    if s == "gem":
      c.strategy.gem = dict(mem_per_experience=250, margin=0.5,
                            sample_per_experience=a["sample"])
    elif s == "agem":
      c.strategy.agem = dict(mem_per_experience=250, sample_size=256)
    elif s == "replay":
      c.strategy.replay = dict(mem_size=5000, batch_size=10)
  if a["quick"]:
    c.scenario.n_experiences = 3
    c.dataset.train_subset = 2000
    c.dataset.test_subset = 500
    c.train.batch_size = min(c.train.batch_size, 32)
    c.train.eval_batch_size = 250
  return c
