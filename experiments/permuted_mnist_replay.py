"""Permuted MNIST (domain-incremental, 20 experiences) with experience replay.

Protocol of Buzzega et al. 2020, `Dark experience for general continual
learning <https://arxiv.org/abs/2004.07211>`_ (Mammoth's ``perm-mnist``):
20 experiences, each a fixed random pixel permutation of all of MNIST
(60000 training images), domain-incremental (one 10-way head, no task id),
MLP 784-100-100-10 (Xavier-uniform weights, zero biases: Mammoth's
``MNISTMLP``), plain SGD (lr 0.2, Mammoth's best args for ER), one epoch per
experience, batch 128 plus 128 replayed, reservoir memory of 200 or 500
examples. Paper (ER): 72.4 / 80.6 % (memory 200 / 500).

``strategy=der`` / ``derpp``: Dark Experience Replay / DER++ (the same
paper) with Mammoth's best ``perm-mnist`` settings (``DER_ARGS``: learning
rate, replayed batch, alpha, beta). Paper: DER 81.7 / 87.3 %, DER++ 83.6 /
88.2 % (memory 200 / 500). ``strategy=gss``: GSS-greedy with Mammoth's
``perm-mnist`` settings (``GSS_ARGS``). ``strategy=fdr``: FDR with
Mammoth's ``perm-mnist`` settings (``FDR_ARGS``; the distance weight is
the code's 1, see jaxcl/strategies/fdr.py). ``strategy=hal``: HAL with
Mammoth's ``perm-mnist`` settings (``HAL_ARGS``).

``strategy=ser`` (Zhuo et al. 2023, `Continual learning with strong
experience replay <https://arxiv.org/abs/2305.13622>`_): the authors'
``run.sh`` for ``perm-mnist`` / ``rot-mnist`` (``SER_ARGS``: lr 0.1,
alpha = beta = 0.2, 128 replayed; its memory is 200, and 500 takes the
same). The paper's table could not be read offline: rows read against
DER++ (docs/notes_replay.md).

``protocol=mer``: the MNIST Permutations benchmark of Riemer et al. 2019
(MER) that La-MAML (Gupta et al. 2020) reuses: 20 permutations of the
same 1000 training images (``dataset.train_subset``), tested on all
10000, MLP 784-100-100-10 (PyTorch's default init, as both codes),
online: one pass, stream batch 10, plain SGD, reservoir memory of 200.
``strategy=lamaml`` takes the authors' MNIST script's settings (the
strategy's defaults: 5 glances, 10 memory rows per meta-batch, learned
rates from 0.15 at eta 0.3, second order); ``replay`` replays 10 rows at
lr 0.1 (``lr`` sets it); ``mer`` runs with its own defaults.

  jaxcl run --config experiments/permuted_mnist_replay.py:mem_size=200
  jaxcl run --config experiments/permuted_mnist_replay.py:mem_size=500
  jaxcl run --config experiments/permuted_mnist_replay.py:strategy=derpp,mem_size=200
  jaxcl run --config experiments/permuted_mnist_replay.py:strategy=ser,mem_size=200

Arguments: ``strategy`` (replay | naive | any replay-family strategy with
default settings), ``mem_size``, ``seed``, ``lr`` (0: 0.2; DER / DER++:
their table's), ``lam`` (HAL's anchor weight; < 0: the table's),
``alpha`` / ``beta`` (SER's weights; < 0: ``SER_ARGS``'s), ``init``
(model initialisation, default ``xavier_uniform``), ``quick``
(3 experiences of 2000 / 500 examples, for tests), ``protocol``
(buzzega | mer).
Holds 20 permuted copies of MNIST in host memory (~4 GB). Measured on a
2-core CPU: see docs/notes_replay.md.
"""

from jaxcl.configs import parse_arg
from jaxcl.experiment import default_config


# Mammoth's best DER / DER++ settings on perm-mnist (utils/best_args.py):
# memory size -> (lr, replayed batch size, alpha, beta). Other memory sizes
# take the nearest listed one's.
DER_ARGS = {
    "der": {200: (0.2, 128, 1.0, 0.0), 500: (0.2, 128, 1.0, 0.0),
            5120: (0.2, 128, 0.5, 0.0)},
    "derpp": {200: (0.1, 128, 1.0, 1.0), 500: (0.2, 128, 1.0, 0.5),
              5120: (0.2, 128, 0.5, 1.0)},
}


def nearest(table: dict, mem_size: int):
  """``table``'s row for ``mem_size``: Mammoth's best_args list memories
  of 200, 500 and 5120, and other sizes take the nearest listed one's."""
  return table[min(table, key=lambda k: abs(k - mem_size))]


def set_der(c, a, table) -> None:
  """DER / DER++ (and X-DER, on DER++'s) settings from ``table`` (see ``DER_ARGS``); an ``lr`` of
  0 and an ``alpha`` / ``beta`` below 0 (or absent) in the parsed
  arguments ``a`` take the table's. Shared by the Split, Permuted and
  Rotated protocols."""
  s, m = a["strategy"], a["mem_size"]
  lr, batch, alpha, beta = nearest(table[s], m)
  given = lambda key, default: (default if a.get(key, -1.0) < 0
                                else a[key])
  c.optimizer.learning_rate = a["lr"] or lr
  c.strategy[s] = dict(mem_size=m, batch_size=min(batch, m),
                       alpha=given("alpha", alpha))
  if s in ("derpp", "xder"):
    c.strategy[s]["beta"] = given("beta", beta)


# The SER authors' settings for perm-mnist and rot-mnist (visiontao/cl,
# run.sh; memory 200): (lr, alpha, beta); 128 replayed (the batch's size).
SER_ARGS = (0.1, 0.2, 0.2)


def set_ser(c, a) -> None:
  """SER with ``SER_ARGS``'s weights, an ``alpha`` / ``beta`` of 0 or more
  in the parsed arguments ``a`` replacing its own (and naming the run).
  Shared by the Split, Permuted and Rotated protocols (each sets its
  learning rate)."""
  _, alpha, beta = SER_ARGS
  c.strategy.ser = dict(mem_size=a["mem_size"],
                        alpha=alpha if a["alpha"] < 0 else a["alpha"],
                        beta=beta if a["beta"] < 0 else a["beta"])
  for k in ("alpha", "beta"):
    if a[k] >= 0:
      c.name += f"_{k}{a[k]:g}"


# Mammoth's best GSS settings on perm-mnist (utils/best_args.py): memory
# size -> (lr, training batch, replayed batch, gss_minibatch_size).
GSS_ARGS = {200: (0.2, 128, 10, 128), 500: (0.1, 128, 128, 10),
            5120: (0.03, 128, 128, 10)}


def set_gss(c, a, table) -> None:
  """GSS settings from ``table`` (see ``GSS_ARGS``; the nearest listed
  memory size's); an ``lr`` of 0 in ``a`` takes the table's. Shared by
  the Split, Permuted and Rotated protocols."""
  m = a["mem_size"]
  lr, batch, replayed, scored = nearest(table, m)
  c.optimizer.learning_rate = a["lr"] or lr
  c.train.batch_size = batch
  c.strategy.gss = dict(mem_size=m, batch_size=min(replayed, m),
                        score_size=min(scored, m))


# Mammoth's best FDR settings on perm-mnist (utils/best_args.py): memory
# size -> (lr, replayed batch); batch 128.
FDR_ARGS = {200: (0.1, 128), 500: (0.1, 128), 5120: (0.1, 128)}


# Mammoth's best HAL settings on perm-mnist (utils/best_args.py): memory
# size -> (lr, replayed batch, hal_lambda, beta, gamma); batch 128.
HAL_ARGS = {200: (0.1, 128, 0.1, 0.5, 0.1), 500: (0.1, 128, 0.1, 0.3, 0.1),
            5120: (0.1, 128, 0.1, 0.5, 0.1)}


def get_config(arg=None, der_args=None, gss_args=None, fdr_args=None):
  """``der_args`` / ``gss_args`` / ``fdr_args``: the DER / DER++, GSS and
  FDR tables (default ``DER_ARGS`` / ``GSS_ARGS`` / ``FDR_ARGS``; the
  rotated protocol passes its own)."""
  a = parse_arg(arg, strategy="replay", mem_size=500, seed=0, lr=0.0,
                init="xavier_uniform", lam=-1.0, alpha=-1.0, beta=-1.0,
                quick=False,
                protocol="buzzega")
  if a["protocol"] not in ("buzzega", "mer"):
    raise ValueError(f"protocol={a['protocol']!r}: expected 'buzzega' or "
                     "'mer'")
  c = default_config()
  s, m = a["strategy"], a["mem_size"]
  c.name = f"permuted_mnist_{s}_{m}"
  c.seed = a["seed"]
  c.dataset.name = "mnist"
  c.scenario.type = "permuted"
  c.scenario.kind = "domain"
  c.scenario.n_experiences = 20
  c.scenario.seed = a["seed"]
  c.model.name = "mlp"
  c.model.widths = (100, 100)
  c.model.init = a["init"]
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = a["lr"] or 0.2
  c.train.epochs = 1
  c.train.batch_size = 128
  c.train.eval_batch_size = 1000
  c.report.progress = False
  c.strategy.name = s
  if s == "replay":
    c.strategy.replay = dict(mem_size=m, batch_size=128)
  elif s in ("der", "derpp"):
    set_der(c, a, der_args or DER_ARGS)
  elif s == "gss":
    set_gss(c, a, gss_args or GSS_ARGS)
  elif s == "fdr":
    table = fdr_args or FDR_ARGS
    lr, replayed = nearest(table, m)
    c.optimizer.learning_rate = a["lr"] or lr
    c.strategy.fdr = dict(mem_size=m, batch_size=min(replayed, m))
  elif s == "hal":
    lr, replayed, lam, beta, gamma = nearest(HAL_ARGS, m)
    c.optimizer.learning_rate = a["lr"] or lr
    c.strategy.hal = dict(mem_size=m, batch_size=min(replayed, m),
                          lam=lam if a["lam"] < 0 else a["lam"], beta=beta,
                          gamma=gamma, anchor_lr=c.optimizer.learning_rate)
    if a["lam"] >= 0:
      c.name += f"_lam{a['lam']:g}"
  elif s == "ser":
    c.optimizer.learning_rate = a["lr"] or SER_ARGS[0]
    set_ser(c, a)
  elif s != "naive":
    c.strategy[s] = dict(mem_size=m)
  if a["protocol"] == "mer":
    set_mer_protocol(c, a)
  if a["quick"]:
    c.scenario.n_experiences = 3
    c.dataset.train_subset = 2000
    c.dataset.test_subset = 500
    c.train.batch_size = 32
    c.train.eval_batch_size = 250
    if s == "replay" and a["protocol"] == "buzzega":
      c.strategy.replay = dict(mem_size=m, batch_size=32)
  return c


def set_mer_protocol(c, a) -> None:
  """Riemer et al. 2019's MNIST Permutations (see the module docstring):
  the same 20 permutations' stream cut to 1000 training images, online
  batch 10, PyTorch's default init."""
  s, m = a["strategy"], a["mem_size"]
  c.name = f"permuted_mnist_mer_protocol_{s}_{m}"
  c.dataset.train_subset = 1000
  c.model.init = "torch" if a["init"] == "xavier_uniform" else a["init"]
  c.optimizer.learning_rate = a["lr"] or 0.1
  c.train.batch_size = 10
  if s == "replay":
    c.strategy.replay = dict(mem_size=m, batch_size=10)
