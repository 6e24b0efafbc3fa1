"""Results-table rows of the architectural family (experiments/reproduce.py)."""

from experiments.reproduce import Entry

_SM = "Split MNIST (5x2) task-incremental, MLP 100-100, 2 epochs"
_SF = "Split Fashion-MNIST (5x2) task-incremental, MLP 100-100, 2 epochs"
_PM = ("Permuted MNIST (10), task given, MLP 1024-1024 (SupSup's net), "
       "2 epochs")

_EG_NOTE = (
    "Avalanche's ExpertGateStrategy defaults (autoencoder 100 wide, 2 "
    "epochs at batch 1, SGD 1e-3; gate temperature 2; LwF from the most "
    "related expert above relatedness 0.85), untuned; the experts train "
    "on the protocol's optimiser. No published column: the paper reports "
    "no MNIST number.")

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
          0.96, "issue 7 anchor"),
    Entry(_PM, "SupSup (GG)", "permuted_mnist_architectural",
          "strategy=supsup,mode=gg", 0.96, "issue 7 anchor"),
    Entry(_PM, "SupSup (GN, binary search)", "permuted_mnist_architectural",
          "strategy=supsup,mode=gn"),
    Entry(_PM, "SupSup (GN, binary search, G objective, 490 s-neurons)",
          "permuted_mnist_architectural",
          "strategy=supsup,mode=gn,objective=g"),
    # Task-free: the gate picks the expert, so the row sits beside the
    # baselines' class-incremental Ensemble (one model per experience, the
    # most confident answers) on their protocol.
    Entry("Split MNIST (5x2), MLP 2x400, 2 epochs, batch 128, "
          "class-incremental", "Expert Gate", "split_mnist_baselines",
          "strategy=expert_gate", note=_EG_NOTE),
]
