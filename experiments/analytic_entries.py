"""Results-table rows of the analytic family (see experiments/reproduce.py)."""

from experiments.reproduce import Entry

_SM = ("Split MNIST (5x2) class-incremental, online batch 10 (Buzzega et "
       "al. 2020's stream)")
_SF = "Split Fashion-MNIST (5x2) class-incremental, online batch 10"
_B5 = ("Split {} B5 Inc1 (5 classes first, then 1 per experience) "
       "class-incremental, online batch 10; average incremental accuracy, "
       "pooled")
# The reference the pixel rows are read against (no published number):
# offline LDA with the same shrinkage, from `python -m
# experiments.split_mnist_analytic` (docs/notes_analytic.md).
_OFF = "Deep SLDA (pixels; offline LDA: {:.2f})"

ENTRIES = [
    Entry(_SM, _OFF.format(87.26), "split_mnist_analytic", "features=input"),
    Entry(_SM, "Deep SLDA (backbone: Fashion-MNIST MLP 100-100)",
          "split_mnist_analytic", "features=backbone",
          pretrain="strategy=pretrain"),
    Entry(_SM, "FeCAM (backbone: MLP 400-400 trained on the first "
          "experience)", "split_mnist_analytic", "strategy=fecam",
          note="Goswami et al. 2023 at the paper's settings (Tukey 0.5, "
               "shrinkage 1 / 1), exemplar-free; the backbone learns the "
               "first experience's 2 classes by cross-entropy (one pass, "
               "plain SGD 0.01) and is frozen after it. No "
               "published MNIST number; read against Deep SLDA"),
    Entry(_SM, "FeTrIL (backbone: MLP 400-400 trained on the first "
          "experience)", "split_mnist_analytic", "strategy=fetril",
          note="Petit et al. 2023 at the authors' and Mammoth's SVM "
               "settings (C 1, tol 1e-4), exemplar-free; FeCAM's backbone "
               "and first experience. No published MNIST number; read "
               "against FeCAM"),
    # Sequential: G is 10000 x 10000 (400 MB) and an experience's end holds
    # about five such matrices; a vmapped sweep would hold them per seed.
    Entry(_SM, "RanPAC (pixels; random projection 784 -> 10000)",
          "split_mnist_analytic", "strategy=ranpac,features=input",
          sequential=True,
          note="McDonnell et al. 2023, phase 2 at the paper's settings (M = "
               "10000, ReLU, λ per experience by the reference's 80/20 "
               "search), exemplar-free, no phase 1. No published MNIST "
               "number; read against Deep SLDA on the same features"),
    Entry(_SM, "RanPAC (backbone: Fashion-MNIST MLP 100-100)",
          "split_mnist_analytic", "strategy=ranpac,features=backbone",
          pretrain="strategy=pretrain", sequential=True),
    Entry(_SF, _OFF.format(81.49), "split_mnist_analytic",
          "features=input,dataset=fashion_mnist"),
    Entry(_SF, "Deep SLDA (backbone: MNIST MLP 100-100)",
          "split_mnist_analytic", "features=backbone,dataset=fashion_mnist",
          pretrain="strategy=pretrain,dataset=fashion_mnist"),
    Entry(_SF, "FeCAM (backbone: MLP 400-400 trained on the first "
          "experience)", "split_mnist_analytic",
          "strategy=fecam,dataset=fashion_mnist"),
    Entry(_SF, "FeTrIL (backbone: MLP 400-400 trained on the first "
          "experience)", "split_mnist_analytic",
          "strategy=fetril,dataset=fashion_mnist"),
    # The papers' regime (a large first task): average incremental
    # accuracy over every test example of the classes seen, their figure.
    Entry(_B5.format("MNIST"), "FeCAM (MLP 400-400 trained on the first 5 "
          "classes)", "split_mnist_analytic", "strategy=fecam,first=5",
          metric="inc_acc_pooled",
          note="The FeCAM and FeTrIL papers' regime on MNIST: the backbone "
               "learns 5 classes, then one class per experience. No "
               "published MNIST number; FeTrIL read against FeCAM"),
    Entry(_B5.format("MNIST"), "FeTrIL (MLP 400-400 trained on the first 5 "
          "classes)", "split_mnist_analytic", "strategy=fetril,first=5",
          metric="inc_acc_pooled"),
    Entry(_B5.format("Fashion-MNIST"), "FeCAM (MLP 400-400 trained on the "
          "first 5 classes)", "split_mnist_analytic",
          "strategy=fecam,first=5,dataset=fashion_mnist",
          metric="inc_acc_pooled"),
    Entry(_B5.format("Fashion-MNIST"), "FeTrIL (MLP 400-400 trained on the "
          "first 5 classes)", "split_mnist_analytic",
          "strategy=fetril,first=5,dataset=fashion_mnist",
          metric="inc_acc_pooled"),
]
