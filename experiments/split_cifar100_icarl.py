"""Split CIFAR-100 class-incremental, the protocol of iCaRL's authors' code.

For users with the data (``tensorflow_datasets`` CIFAR-100: a prepared tfds
``data_dir`` or network access); this machine has none, so these rows are
not in the committed RESULTS.md.

Protocol (Rebuffi et al. 2017, Sec. 4, and their
``iCaRL-TheanoLasagne/main_cifar_100_theano.py``): CIFAR-100 in groups of
10 classes (``n_experiences=10``; the paper also runs 2, 5, 20 and 50
classes per group), in the order ``np.random.seed(1993)`` shuffles them to
(the code's first run; FACIL's ``cifar100_icarl`` order); He et al.'s
ResNet-32 as the code builds it (``model.name=resnet32``: zero-padded
identity shortcuts, ``shortcut=pad``, and no ReLU after the last block,
``last_relu=False``, so the features are signed); 70 epochs per group
with SGD, momentum 0.9, learning rate 2.0 divided by 5 after epochs 49 and 63,
restarted for every group; batches of 128 augmented by a 4-pixel pad
and crop and a horizontal flip; 2000 exemplars in all (herding), class
means over the exemplars and their mirror images (``mirror_means``); the
sigmoid BCE of iCaRL and LwF.MC averaged over all 100 outputs, the later
groups' classes with target 0 (``bce_classes='all'``: the learning rate
of 2.0 is sized for a loss divided by 100).
Compare with their Figure 2 (CIFAR-100, 10 classes per group) and with the
same figure's finetuning and LwF.MC curves.

  jaxcl run --config experiments/split_cifar100_icarl.py:strategy=icarl
  jaxcl run --config experiments/split_cifar100_icarl.py:strategy=lwf_mc
  python -m experiments.reproduce --only split_cifar100_icarl

Arguments: ``strategy`` (icarl | lwf_mc | naive | joint), ``n_experiences``
(a divisor of 100), ``mem_size`` (2000), ``seed``, ``quick`` (tiny subsets,
1 epoch, for tests).

Where this differs from the authors' code, and why:

* Exemplars: the code concatenates the exemplars to the group's training
  images and shuffles them together; jaxcl's iCaRL appends exemplars drawn
  from memory to every batch of new images. The batch is split so that
  both match: ``128 · n / (n + K)`` new images (91 for 5000 new and
  2000 exemplars) plus the rest from memory (37), so a batch holds 128
  rows in the same proportion and an epoch takes the same 55 steps. The
  first group, with no exemplars, runs batches of 91 new images.
* Weight decay: the code adds ``10⁻⁵ · Σ W²`` over the weight matrices to
  the loss, a gradient of ``2·10⁻⁵ · W``; here that is ``weight_decay=2e-5``
  and, as optax decays every leaf, it also reaches biases and batch-norm
  parameters.
* Inputs: the code subtracts the training set's mean image; here each
  channel is standardised with FACIL's CIFAR-100 statistics. The code's
  crops pad its mean-subtracted arrays with zeros, the mean image; here
  they pad black, as torchvision's do.
* Initialisation: the code draws convolutions from N(0, 2 / fan_in)
  (Lasagne's ``HeNormal``), jaxcl's ResNet-32 from N(0, 2 / fan_out) as
  FACIL and PyCIL do: the same for all but the stem and the two
  convolutions that double the channels.
* Runs: the code's ten runs shuffle ten class orders; ``seed`` here varies
  the initialisation and batches, with the order fixed (FACIL's choice).

References:
  Rebuffi, Kolesnikov, Sperl & Lampert, `iCaRL: Incremental classifier and
  representation learning <https://arxiv.org/abs/1611.07725>`_, CVPR 2017.
  Masana et al., `Class-incremental learning: survey and performance
  evaluation on image classification <https://arxiv.org/abs/2010.15277>`_,
  TPAMI 2022 (FACIL: the class order, the channel statistics).
"""

import numpy as np

from jaxcl.configs import parse_arg
from jaxcl.experiment import default_config

STRATEGIES = ("icarl", "lwf_mc", "naive", "joint")
BATCH = 128
# FACIL's dataset_config.py, 'cifar100' and 'cifar100_icarl'.
MEAN, STD = (0.5071, 0.4866, 0.4409), (0.2009, 0.1984, 0.2023)


def class_order() -> tuple[int, ...]:
  """The authors' code's first class order: ``np.random.seed(1993)``, then
  ``np.random.shuffle(np.arange(100))``."""
  order = np.arange(100)
  np.random.RandomState(1993).shuffle(order)
  return tuple(int(c) for c in order)


def split_batch(new_per_group: int, mem_size: int) -> tuple[int, int]:
  """``(new images, exemplars)`` per batch of :data:`BATCH` rows, in the
  proportion of a group's training set concatenated with the memory."""
  new = round(BATCH * new_per_group / (new_per_group + mem_size))
  return new, BATCH - new


def resnet32_config(name: str, seed: int, n_experiences: int, *,
                    shortcut: str, learning_rate: float, weight_decay: float,
                    milestones: tuple[int, int], gamma: float, epochs: int,
                    quick: bool, quick_subset: int):
  """What iCaRL's and LUCIR's CIFAR-100 code share: CIFAR-100 in the
  seed-1993 order, class-incremental, each channel standardised, cropped
  and flipped; a ResNet-32 without its last ReLU; SGD with momentum 0.9
  and a step schedule restarted every experience, batches of
  :data:`BATCH`. ``quick``: a ``quick_subset`` of the training images, one
  epoch at a constant rate, batches of 16 (for tests)."""
  c = default_config()
  c.name = name
  c.seed = seed
  c.dataset.name = "cifar100"
  c.dataset.normalize = (MEAN, STD)
  c.scenario.type = "split"
  c.scenario.kind = "class"
  c.scenario.n_experiences = n_experiences
  c.scenario.class_order = class_order()
  c.model.name = "resnet32"
  c.model.shortcut = shortcut
  c.model.last_relu = False
  c.optimizer.name = "momentum"
  c.optimizer.momentum = 0.9
  c.optimizer.learning_rate = learning_rate
  c.optimizer.weight_decay = weight_decay
  c.optimizer.schedule = "multistep"
  c.optimizer.milestones = milestones
  c.optimizer.gamma = gamma
  c.train.epochs = epochs
  c.train.batch_size = BATCH
  c.train.eval_batch_size = 500
  c.train.reset_optimizer = True
  c.train.augment, c.train.crop_padding = ("pad_crop", "flip"), 4
  if quick:
    c.dataset.train_subset = quick_subset
    c.dataset.test_subset = 200
    c.train.epochs = 1
    c.optimizer.schedule = "constant"
    c.optimizer.milestones = ()
    c.optimizer.learning_rate = 0.1
    c.train.eval_batch_size = 100
  return c


def get_config(arg=None):
  a = parse_arg(arg, strategy="icarl", n_experiences=10, mem_size=2000,
                seed=0, quick=False)
  s, n, m = a["strategy"], a["n_experiences"], a["mem_size"]
  if s not in STRATEGIES:
    raise ValueError(f"unknown strategy {s!r}; valid: {list(STRATEGIES)}")
  if n < 1 or 100 % n:
    raise ValueError(f"n_experiences={n}: must divide CIFAR-100's 100 "
                     "classes (2, 5, 10, 20, 50 in the paper)")
  c = resnet32_config(
      f"split_cifar100_icarl_{s}_{n}", a["seed"], n, shortcut="pad",
      learning_rate=2.0, weight_decay=2e-5, milestones=(49, 63), gamma=0.2,
      epochs=70, quick=a["quick"], quick_subset=1000)
  c.strategy.name = s
  if s == "icarl":
    new, old = split_batch(50000 // n, m)
    c.train.batch_size = new
    c.strategy.icarl = dict(mem_size=m, batch_size=old, mirror_means=True,
                            bce_classes="all")
  if s == "lwf_mc":
    c.strategy.lwf_mc = dict(bce_classes="all")
  if a["quick"]:
    c.train.batch_size = 16
    if s == "icarl":
      c.strategy.icarl.batch_size = 8
  return c
