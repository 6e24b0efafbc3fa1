"""Results-table rows on the protocols of Avalanche's reproducibility suite
(see experiments/reproduce.py and experiments/permuted_mnist_avalanche.py)."""

from experiments.reproduce import Entry

_PA = ("Permuted MNIST (4), MLP 256, SGD 0.01, 3 epochs, domain-incremental "
       "(Avalanche's continual-learning-baselines)")
_CLB = "Avalanche continual-learning-baselines"

ENTRIES = [
    Entry(_PA, "LFL", "permuted_mnist_avalanche", "strategy=lfl", 0.88, _CLB),
    Entry(_PA, "Naive (reference)", "permuted_mnist_avalanche",
          "strategy=naive"),
]
