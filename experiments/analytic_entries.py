"""Results-table rows of the analytic family (see experiments/reproduce.py)."""

from experiments.reproduce import Entry

_SM = ("Split MNIST (5x2) class-incremental, online batch 10 (Buzzega et "
       "al. 2020's stream)")
_SF = "Split Fashion-MNIST (5x2) class-incremental, online batch 10"
_OFF = ("read against offline LDA with the same shrinkage ({:.3f}; python "
        "-m experiments.split_mnist_analytic)")

ENTRIES = [
    Entry(_SM, "Deep SLDA (pixels)", "split_mnist_analytic",
          "features=input", note=_OFF.format(0.8726)),
    Entry(_SM, "Deep SLDA (backbone: Fashion-MNIST MLP 100-100)",
          "split_mnist_analytic", "features=backbone",
          pretrain="strategy=pretrain"),
    Entry(_SF, "Deep SLDA (pixels)", "split_mnist_analytic",
          "features=input,dataset=fashion_mnist", note=_OFF.format(0.8149)),
    Entry(_SF, "Deep SLDA (backbone: MNIST MLP 100-100)",
          "split_mnist_analytic", "features=backbone,dataset=fashion_mnist",
          pretrain="strategy=pretrain,dataset=fashion_mnist"),
]
