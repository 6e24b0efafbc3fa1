"""Split MNIST, class-incremental, with the analytic strategies (Deep SLDA).

Protocol: the stream of Buzzega et al. 2020 (Mammoth's ``seq-mnist``, the
replay and hybrid rows' stream): MNIST in 5 experiences of 2 classes,
class-incremental, one pass (online), batch 10. SLDA (Hayes & Kanan 2020)
trains nothing by gradient; its settings are the authors' and Avalanche's
defaults (shrinkage 1e-4, streaming covariance).

* ``features=input``: LDA on the raw pixels (784 dimensions).
* ``features=backbone``: on the 100 features of an MLP 784-100-100
  pretrained on the *other* data set (Fashion-MNIST for MNIST and back;
  the Piggyback rows' backbone, ``split_mnist_architectural.py:
  strategy=pretrain``), as Deep SLDA runs on a pretrained ResNet-18; pass
  its file as ``pretrained``. Without one the backbone is the randomly
  initialised MLP.

No published Split MNIST number exists. ``python -m
experiments.split_mnist_analytic --data_dir DIR`` prints the reference the
rows are read against: offline LDA with the same shrinkage on the exact
pooled within-class covariance of all the training images.

Commands::

  jaxcl run --config experiments/split_mnist_analytic.py:features=input
  python -m jaxcl.pretrained --config experiments/split_mnist_architectural.py:strategy=pretrain --out /tmp/fmnist_mlp100.npz
  jaxcl run --config experiments/split_mnist_analytic.py:features=backbone,pretrained=/tmp/fmnist_mlp100.npz
  jaxcl run --config experiments/split_mnist_analytic.py:strategy=fecam
  jaxcl run --config experiments/split_mnist_analytic.py:strategy=fetril
  jaxcl run --config experiments/split_mnist_analytic.py:strategy=fetril,first=5
  jaxcl run --config experiments/split_mnist_analytic.py:strategy=ranpac,features=input
  jaxcl run --config experiments/split_mnist_analytic.py:strategy=ranpac,features=backbone,pretrained=/tmp/fmnist_mlp100.npz

* ``strategy=fecam`` (Goswami et al. 2023): the same stream, an MLP
  784-400-400 (its 400 features; on 100 it scores 0.785); the backbone trains on the first experience (plain SGD 0.01, no momentum) and is
  frozen after it; classes are scored by Mahalanobis distance to their
  Tukey-transformed, shrunk and normalised statistics.

* ``strategy=fetril`` (Petit et al. 2023): FeCAM's stream, backbone and
  first experience; after it, one-vs-rest linear SVMs (C 1, tol 1e-4, the
  authors' and Mammoth's) on the experience's features and the past
  classes' pseudo-features (the nearest new class's features moved by the
  difference of the class means).

* ``first=5`` (fecam, fetril): the papers' regime of a large first
  experience (their CIFAR-100 "B50" protocols): the backbone trains on 5
  classes, then one class per experience (6 experiences, "B5 Inc1"); the
  rows report the average incremental accuracy over every test example
  of the classes seen (``inc_acc_pooled``), the papers' figure.

* ``strategy=ranpac`` (McDonnell et al. 2023, phase 2): the same stream
  and the same features as Deep SLDA's rows (``features=input`` or
  ``backbone``, frozen from the start), a ReLU random projection to
  ``proj_dim`` = 10000 (the paper's M) and the ridge head in closed form,
  ``λ`` chosen per experience by the reference's 80/20 search.

Arguments: ``strategy`` (slda | fecam | fetril | ranpac | pretrain: the
backbone's run), ``features`` (input | backbone), ``dataset`` (mnist |
fashion_mnist), ``seed``, ``shrinkage`` (slda), ``proj_dim`` (ranpac),
``first`` (fecam, fetril: classes of the first experience; 0: 5 x 2),
``pretrained``, ``quick`` (2000 training / 1000 test examples, for
tests; ranpac's ``proj_dim`` at most 256 then). Measured results: docs/notes_analytic.md.
"""

import argparse

import numpy as np

from experiments import split_mnist_architectural
from jaxcl.configs import parse_arg
from jaxcl.experiment import default_config

STRATEGIES = ("slda", "fecam", "fetril", "ranpac", "pretrain")


def get_config(arg=None):
  a = parse_arg(arg, strategy="slda", features="input", dataset="mnist",
                seed=0, shrinkage=1e-4, proj_dim=10000, pretrained="",
                first=0, quick=False)
  if a["strategy"] not in STRATEGIES:
    raise ValueError(f"unknown strategy {a['strategy']!r} for this config; "
                     f"valid: {list(STRATEGIES)}")
  if a["first"] and a["strategy"] not in ("fecam", "fetril"):
    raise ValueError(f"first={a['first']} is for strategy=fecam or fetril "
                     f"(a first experience that trains the backbone), not "
                     f"{a['strategy']!r}")
  if a["strategy"] == "pretrain":
    return split_mnist_architectural.get_config(
        f"strategy=pretrain,dataset={a['dataset']},seed={a['seed']}"
        + (",quick" if a["quick"] else ""))
  c = default_config()
  c.name = f"split_{a['dataset']}_slda_{a['features']}"
  c.seed = a["seed"]
  c.dataset.name = a["dataset"]
  c.scenario.type = "split"
  c.scenario.kind = "class"
  c.scenario.n_experiences = 5
  c.scenario.online = True
  # The backbone of features=backbone (the pretrained file's shape); with
  # features=input the model only runs the step's unused loss.
  c.model.name = "mlp"
  c.model.widths = split_mnist_architectural.WIDTHS
  c.model.pretrained = a["pretrained"]
  c.optimizer.name = "sgd"   # its updates are zero: SLDA trains no weight
  c.optimizer.learning_rate = 0.1
  c.train.epochs = 1
  c.train.batch_size = 10
  c.train.eval_batch_size = 1000
  c.report.progress = False
  if a["strategy"] in ("fecam", "fetril"):
    # Goswami et al. 2023: the backbone trains by cross-entropy on the
    # first experience only (one pass, as the stream's), then per-class
    # Mahalanobis over its features; the paper's settings (Tukey 0.5,
    # shrinkage gamma 1 / 1). Plain SGD 0.01, as Mammoth's default
    # (optim_mom 0): the config's momentum 0.9 is the default file's, unused.
    c.name = f"split_{a['dataset']}_{a['strategy']}"
    c.model.pretrained = ""
    # 400-400 as the other Split MNIST rows' wide MLP: on the 100 features
    # of 100-100 the class covariances carry little (0.785 against 0.945,
    # seeds 0-2, session 30).
    c.model.widths = (400, 400)
    c.optimizer.learning_rate = 0.01
    # FeTrIL (Petit et al. 2023) on the same first experience: the
    # authors' and Mammoth's SVM settings (C 1, tol 1e-4), the defaults.
    c.strategy.name = a["strategy"]
    c.strategy[a["strategy"]] = dict()
    if a["first"]:
      # The papers' regime: a large first experience (CIFAR-100's B50),
      # then one class per experience ("B5 Inc1" for first=5).
      c.scenario.first_classes = a["first"]
      c.scenario.n_experiences = 1 + 10 - a["first"]
      c.name += f"_b{a['first']}inc1"
  elif a["strategy"] == "ranpac":
    # McDonnell et al. 2023's phase 2 on Deep SLDA's features (no phase 1:
    # the backbone is frozen from the start, as SLDA's); the paper's
    # M = 10000, ReLU, λ searched per experience.
    c.name = f"split_{a['dataset']}_ranpac_{a['features']}"
    c.strategy.name = "ranpac"
    c.strategy.ranpac = dict(proj_dim=a["proj_dim"], features=a["features"])
  else:
    c.strategy.name = "slda"
    c.strategy.slda = dict(shrinkage=a["shrinkage"], features=a["features"])
  if a["quick"]:
    if a["strategy"] == "ranpac":
      # G is M x M and its eigendecomposition takes ~40 s at M = 10000.
      c.strategy.ranpac["proj_dim"] = min(a["proj_dim"], 256)
    c.dataset.train_subset = 2000
    c.dataset.test_subset = 1000
    c.train.eval_batch_size = 250
  return c


def offline_lda_accuracy(dataset: str, data_dir: str,
                         shrinkage: float = 1e-4) -> float:
  """Offline LDA's final average accuracy on the Split stream (float64
  NumPy): the class means and the exact pooled within-class covariance of
  all the training images, the covariance shrunk as SLDA's and
  pseudo-inverted; the mean over the 5 experiences' test sets, as a run's
  final average accuracy is."""
  from jaxcl import datasets, scenarios
  exps = scenarios.split(datasets.load(dataset, data_dir=data_dir),
                         5).experiences
  flat = lambda a: a.reshape(len(a), -1).astype(np.float64)
  x = np.concatenate([flat(e.train_x) for e in exps])
  y = np.concatenate([e.train_y for e in exps])
  k = int(y.max()) + 1
  mean = np.stack([x[y == c].mean(0) for c in range(k)])
  centred = x - mean[y]
  cov = centred.T @ centred / len(x)
  lam = np.linalg.pinv((1 - shrinkage) * cov + shrinkage * np.eye(len(cov)),
                       hermitian=True)
  w = lam @ mean.T
  b = 0.5 * np.sum(mean.T * w, axis=0)
  return float(np.mean([np.mean((flat(e.test_x) @ w - b).argmax(1)
                                 == e.test_y) for e in exps]))


if __name__ == "__main__":
  p = argparse.ArgumentParser(description=offline_lda_accuracy.__doc__)
  p.add_argument("--data_dir", default="")
  p.add_argument("--dataset", default="mnist")
  p.add_argument("--shrinkage", type=float, default=1e-4)
  args = p.parse_args()
  print(f"offline LDA, {args.dataset}, shrinkage {args.shrinkage}: "
        f"{offline_lda_accuracy(args.dataset, args.data_dir, args.shrinkage):.4f}")
