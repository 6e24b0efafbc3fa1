"""Permuted MNIST, task given: PackNet, HAT, SupSup (GG and GN).

Protocol: 10 experiences, each a fixed random pixel permutation of MNIST,
task id given in training (and at test time except for SupSup GN, which
infers it), one head per task (``model.multi_head=True``; SupSup masks its
single output layer per task instead), MLP 784-256-256 (narrower than the
papers' 1000-1000 / 1024-1024 to fit a 2-core CPU), batch 128, 1 epoch per
experience.

  jaxcl run --config experiments/permuted_mnist_architectural.py:strategy=packnet
  jaxcl run --config experiments/permuted_mnist_architectural.py:strategy=supsup,mode=gn

Arguments: ``strategy`` (naive | packnet | hat | supsup | progressive),
``mode`` (supsup: gg | gn), ``n`` (experiences), ``widths`` (hidden width),
``seed``, ``quick``. Expected (issue 7): PackNet, HAT, SupSup >= 0.96 ACC;
SupSup GN within 1 point of GG (Wortsman et al. 2020 report GN ~ GG on
PermutedMNIST). Measured values: docs/notes_architectural.md.
"""

from jaxcl.configs import parse_arg
from jaxcl.experiment import default_config


def get_config(arg=None):
  a = parse_arg(arg, strategy="packnet", mode="gg", n=10, width=256, seed=0,
                quick=False)
  name = a["strategy"]
  widths = (a["width"], a["width"])
  c = default_config()
  c.name = f"permuted_mnist{a['n']}_task_{name}"
  c.seed = a["seed"]
  c.dataset.name = "mnist"
  c.scenario.type = "permuted"
  c.scenario.kind = "task"
  c.scenario.n_experiences = a["n"]
  c.model.name = "mlp"
  c.model.widths = widths
  c.model.multi_head = True
  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = 0.05
  c.train.epochs = 1
  c.train.batch_size = 128
  c.train.eval_batch_size = 1000
  c.strategy.name = name
  if name == "packnet":
    c.strategy.packnet = dict(prune="equal", retrain_epochs=1)
  elif name == "progressive":
    c.model.name = "progressive"
    c.model.progressive = dict(widths=(64, 64))
  elif name == "hat":
    c.model.name = "hat_mlp"
    c.model.hat_mlp = dict(widths=widths, s_max=400.0)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
  elif name == "supsup":
    c.name += f"_{a['mode']}"
    c.model.name = "masked_mlp"
    c.model.masked_mlp = dict(widths=widths, mask="edge_popup",
                              weights="signed_constant", masked_head=True,
                              use_bias=False, density=0.5)
    c.strategy.supsup = dict(mode=a["mode"])
    c.optimizer.name = "adam"
    c.optimizer.learning_rate = 1e-2
  if a["quick"]:
    c.dataset.train_subset = 2000
    c.dataset.test_subset = 500
    c.scenario.n_experiences = min(a["n"], 3)
    c.train.batch_size = 32
    c.train.eval_batch_size = 250
  return c
