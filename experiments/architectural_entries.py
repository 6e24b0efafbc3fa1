"""Results-table rows of the architectural family (experiments/reproduce.py)."""

from experiments.reproduce import Entry

_SM = "Split MNIST (5x2) task-incremental, MLP 100-100, 2 epochs"
_SF = "Split Fashion-MNIST (5x2) task-incremental, MLP 100-100, 2 epochs"
_PM = "Permuted MNIST (10), task given, MLP 256-256, 2 epochs"

ENTRIES = [
    Entry(_SM, "PNN", "split_mnist_architectural", "strategy=progressive",
          0.992, "Buzzega et al. 2020"),
    Entry(_SM, "PackNet", "split_mnist_architectural", "strategy=packnet",
          0.99, "issue 7 anchor"),
    Entry(_SM, "HAT (5 epochs)", "split_mnist_architectural", "strategy=hat",
          0.99, "issue 7 anchor"),
    Entry(_SM, "SupSup (GG)", "split_mnist_architectural",
          "strategy=supsup,mode=gg", 0.99, "issue 7 anchor"),
    Entry(_SM, "CWR*", "split_mnist_architectural", "strategy=cwr_star"),
    Entry(_SM, "Piggyback (backbone: Fashion-MNIST)",
          "split_mnist_architectural", "strategy=piggyback",
          pretrain="strategy=pretrain"),
    Entry(_SM, "Multi-head + Naive", "split_mnist_architectural",
          "strategy=multihead"),
    Entry(_SF, "PNN", "split_mnist_architectural",
          "strategy=progressive,dataset=fashion_mnist"),
    Entry(_SF, "PackNet", "split_mnist_architectural",
          "strategy=packnet,dataset=fashion_mnist"),
    Entry(_SF, "HAT (5 epochs)", "split_mnist_architectural",
          "strategy=hat,dataset=fashion_mnist"),
    Entry(_SF, "SupSup (GG)", "split_mnist_architectural",
          "strategy=supsup,mode=gg,dataset=fashion_mnist"),
    Entry(_SF, "CWR*", "split_mnist_architectural",
          "strategy=cwr_star,dataset=fashion_mnist"),
    Entry(_SF, "Piggyback (backbone: MNIST)", "split_mnist_architectural",
          "strategy=piggyback,dataset=fashion_mnist",
          pretrain="strategy=pretrain,dataset=fashion_mnist"),
    Entry(_SF, "Multi-head + Naive", "split_mnist_architectural",
          "strategy=multihead,dataset=fashion_mnist"),
    Entry(_PM, "PackNet", "permuted_mnist_architectural", "strategy=packnet",
          0.96, "issue 7 anchor"),
    Entry(_PM, "HAT (4 epochs)", "permuted_mnist_architectural", "strategy=hat",
          0.96, "issue 7 anchor",
          note="256 hidden units and 4 epochs per task with SGD momentum "
          "0.9, lr 0.02 (the authors' code: 2000 units, plain SGD lr 0.05 "
          "for up to 100 epochs with early stopping, dropout). The first "
          "task alone reaches 0.962 and later tasks 0.92-0.93: 211 of 256 "
          "first-layer units are reserved after 10 tasks. Tried (1 seed): "
          "1-4 epochs, c 0.1 / 0.75 / 2.5, lr 0.05-0.2, momentum; the "
          "authors' embedding clamp and gradient clip are in."),
    Entry(_PM, "SupSup (GG)", "permuted_mnist_architectural",
          "strategy=supsup,mode=gg", 0.96, "issue 7 anchor"),
    Entry(_PM, "SupSup (GN, binary search)", "permuted_mnist_architectural",
          "strategy=supsup,mode=gn"),
]
