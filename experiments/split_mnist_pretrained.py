"""Split MNIST (class-incremental) from a pretrained ResNet: TwF and DER++.

Transfer without Forgetting (Boschini et al. 2022) starts the stream from
a network pretrained on a source data set and distils that network's
feature maps. Its papers' sources (ImageNet, CIFAR-100) cannot be read
offline here, so the source is Fashion-MNIST and the stream MNIST:

* ``strategy=pretrain``: the reduced ResNet-18 (``width``, 16 by default)
  trained on all of Fashion-MNIST, one experience, Naive, SGD lr 0.1,
  ``pretrain_epochs`` (2) epochs of batch 32; ``experiments.reproduce``
  runs it first and passes its parameters as ``pretrained=<file>``.
* ``strategy=twf`` / ``derpp`` / ``naive``: MNIST split into 5
  experiences of 2 classes, class-incremental, the same ResNet starting
  from those parameters (its head too: 10 outputs either way), SGD lr 0.1
  (Mammoth's TwF lr on Split CIFAR-10), batch 32, ``epochs`` (3) per
  experience on ``subset`` (10000) training examples, a reservoir of
  ``mem_size`` (500). TwF at Mammoth's ``twf.yaml`` Split CIFAR-10 /
  memory 500 settings (alpha 0.3, beta 1.2, lambda_fp 0.03,
  lambda_fp_replay 1.5, lambda_diverse 0.3); DER++ at the same alpha and
  beta, so the rows differ by TwF's distillation and its current-class
  cross-entropy.

  python -m jaxcl.pretrained --config experiments/split_mnist_pretrained.py:strategy=pretrain --out /tmp/fmnist_resnet16.npz
  jaxcl run --config experiments/split_mnist_pretrained.py:strategy=twf,pretrained=/tmp/fmnist_resnet16.npz

Arguments: ``strategy``, ``seed``, ``width``, ``epochs``,
``pretrain_epochs``, ``subset``, ``mem_size``, ``pretrained``, ``quick``
(2000 training / 1000 test examples).
"""

from experiments.split_mnist_replay import base
from jaxcl.configs import parse_arg

_TWF = dict(alpha=0.3, beta=1.2, lambda_fp=0.03, lambda_fp_replay=1.5,
            lambda_diverse=0.3)


def get_config(arg=None):
  a = parse_arg(arg, strategy="twf", seed=0, width=16, epochs=3,
                pretrain_epochs=2, subset=10000, mem_size=500, pretrained="",
                quick=False)
  s = a["strategy"]
  c = base(a)  # MNIST split into 5 class-incremental experiences
  c.model.name = "resnet18"
  c.model.width = a["width"]
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.train.batch_size = 32
  c.train.epochs = a["epochs"]
  c.strategy.name = s
  m = a["mem_size"]
  if s == "pretrain":
    c.name = f"pretrain_fashion_mnist_resnet18w{a['width']}"
    c.dataset.name = "fashion_mnist"
    c.scenario.n_experiences = 1
    c.strategy.name = "naive"
    c.train.epochs = a["pretrain_epochs"]
  else:
    c.name = f"split_mnist_pretrained_{s}_{m}"
    c.model.pretrained = a["pretrained"]
    if a["subset"] > 0:
      c.dataset.train_subset = a["subset"]
    if s == "twf":
      c.strategy.twf = dict(mem_size=m, **_TWF)
    elif s == "derpp":
      c.strategy.derpp = dict(mem_size=m, alpha=_TWF["alpha"],
                              beta=_TWF["beta"])
    elif s != "naive":
      raise ValueError(f"split_mnist_pretrained: strategy={s!r}; valid: "
                       "pretrain, twf, derpp, naive")
  if a["quick"]:
    c.dataset.train_subset = 2000
    c.dataset.test_subset = 1000
  return c
