"""Split CIFAR-100 from a 50-class start, the protocol of LUCIR's code.

For users with the data (``tensorflow_datasets`` CIFAR-100: a prepared tfds
``data_dir`` or network access); this machine has none, so these rows are
not in the committed RESULTS.md.

Protocol (Hou et al. 2019, Sec. 5, and their
``cifar100-class-incremental/class_incremental_cosine_cifar100.py`` with
the ``run.sh`` line for LUCIR's full method): CIFAR-100 in the order
``np.random.seed(1993)`` shuffles it to (iCaRL's,
:func:`experiments.split_cifar100_icarl.class_order`), 50 classes first,
then ``increment`` classes per experience (10: five more experiences; the
paper also runs 5 and 2); ResNet-32 as their ``modified_resnet_cifar.py``
builds it (1x1-convolution shortcuts, no ReLU after the last block, a
cosine head); 160 epochs per experience with SGD, momentum 0.9, weight
decay 5e-4, learning rate 0.1 divided by 10 after epochs 80 and 120;
batches of 128 cropped from a 4-pixel padding and flipped, each channel
standardised; 20 exemplars per class, herded, a memory that grows with
the classes; λ_base 5 adapted by √(old / new classes), margin 0.5, K 2,
the old classes' cosine weights frozen and the new classes' imprinted
from their mean features (``--imprint_weights``). Evaluation by the
network's scores (``classifier=cnn``) or by the nearest mean of
exemplars, the means over the exemplars and their mirror images
(``classifier=nme``). Compare the run's ``inc_acc_pooled`` (the mean over
the steps of the accuracy on all the test examples of the classes seen,
as their ``eval_cumul_acc.py`` computes it; ``inc_acc`` would weigh the
first experience's 50 classes as one later experience's 10) with their
Table 1 / Figure 4 (CIFAR-100, "CNN" and "NME" accuracy).

  jaxcl run --config experiments/split_cifar100_lucir.py
  jaxcl run --config experiments/split_cifar100_lucir.py:increment=5
  jaxcl run --config experiments/split_cifar100_lucir.py:classifier=nme
  python -m experiments.reproduce --only split_cifar100_lucir

Arguments: ``increment`` (classes per experience after the first 50:
a divisor of 50), ``per_class`` (20), ``classifier`` (cnn | nme),
``seed``, ``quick`` (tiny subsets, 1 epoch, for tests).

Where this differs from the authors' code, and why:

* Exemplars: the code concatenates them to the experience's images;
  jaxcl's LUCIR appends exemplars drawn from memory to every batch. A
  batch's 128 rows are split as the later experiences' concatenated sets
  are, pooled (:func:`split_batch`: 100 new images and 28
  exemplars for increments of 10, whose memories hold 1000 to 1800). The
  first experience, with no exemplars, then runs 250 steps per epoch of
  100 images where the code runs 196 of 128.
* The code evaluates "CNN" and "NME" on one trained model; here each
  ``classifier`` is its own run (the training is the same).
* Runs: ``seed`` varies the initialisation and batches, with the order
  fixed (the code's ``nb_runs`` is 1).

References:
  Hou, Pan, Loy, Wang & Lin, `Learning a unified classifier incrementally
  via rebalancing <https://openaccess.thecvf.com/content_CVPR_2019/html/
  Hou_Learning_a_Unified_Classifier_Incrementally_via_Rebalancing_CVPR_2019_paper.html>`_,
  CVPR 2019.
"""

from experiments import split_cifar100_icarl as icarl_protocol
from jaxcl.configs import parse_arg
from jaxcl.strategies.lucir import CLASSIFIERS

FIRST = 50


def split_batch(increment: int, per_class: int) -> tuple[int, int]:
  """``(new images, exemplars)`` per batch of 128 rows, in the
  proportion of an experience's 500 images per class concatenated with a
  memory of ``per_class`` exemplars of every earlier class, pooled over
  the experiences after the first."""
  later = (100 - FIRST) // increment
  memory = sum(per_class * (FIRST + i * increment) for i in range(later))
  # The later experiences' images and memories summed: a pooled share.
  return icarl_protocol.split_batch(500 * increment * later, memory)


def get_config(arg=None):
  a = parse_arg(arg, increment=10, per_class=20, classifier="cnn", seed=0,
                quick=False)
  inc, per, classifier = a["increment"], a["per_class"], a["classifier"]
  if classifier not in CLASSIFIERS:
    raise ValueError(f"classifier={classifier!r}: must be one of "
                     f"{list(CLASSIFIERS)}")
  if inc < 1 or (100 - FIRST) % inc:
    raise ValueError(f"increment={inc}: must divide the {100 - FIRST} "
                     "classes after the first 50 (10, 5, 2 in the paper)")
  c = icarl_protocol.resnet32_config(
      f"split_cifar100_lucir_b{FIRST}_inc{inc}"
      + ("_nme" if classifier == "nme" else ""), a["seed"],
      1 + (100 - FIRST) // inc, shortcut="conv", learning_rate=0.1,
      weight_decay=5e-4, milestones=(80, 120), gamma=0.1, epochs=160,
      quick=a["quick"], quick_subset=2000)
  c.scenario.first_classes = FIRST
  c.model.head = "cosine"
  new, old = split_batch(inc, per)
  c.train.batch_size = new
  c.strategy.name = "lucir"
  c.strategy.lucir = dict(mem_size=per * 100, per_class=per, batch_size=old,
                          lamb=5.0, adapt_lamb=True, margin=0.5, k=2,
                          lamb_mr=1.0, freeze_old=True, imprint=True,
                          classifier=classifier,
                          mirror_means=classifier == "nme")
  if a["quick"]:
    c.train.batch_size = 16
    c.strategy.lucir = dict(c.strategy.lucir, batch_size=8)
  return c
