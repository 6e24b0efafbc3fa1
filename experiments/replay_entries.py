"""Results-table rows of the replay family (see experiments/reproduce.py)."""

from experiments.reproduce import Entry

_B = "Buzzega et al. 2020"
_SM = ("Split MNIST (5x2) class-incremental, MLP 100-100, online batch 10 "
       "(Buzzega et al. 2020)")
_PM = "Permuted MNIST (20), MLP 100-100, 1 epoch (Buzzega et al. 2020)"
_RM = "Rotated MNIST (20), MLP 100-100, 1 epoch (Buzzega et al. 2020)"
_GD = "Split MNIST (5x2) class-incremental, MLP 400-400, GDumb protocol"
_DGR = ("Split MNIST (5x2) class-incremental, MLP 400-400 + VAE, "
        "van de Ven et al. 2019 protocol")

ENTRIES = [
    Entry(_SM, "Replay (reservoir, 200)", "split_mnist_replay",
          "strategy=replay,mem_size=200", 0.804, _B),
    Entry(_SM, "Replay (reservoir, 500)", "split_mnist_replay",
          "strategy=replay,mem_size=500", 0.861, _B),
    Entry(_SM, "MIR (500)", "split_mnist_replay",
          "strategy=mir,mem_size=500", 0.876, "Aljundi et al. 2019"),
    Entry(_SM, "Latent replay (equal bytes to 500)", "split_mnist_replay",
          "strategy=latent_replay,mem_size=500,layer=backbone/Dense_0"),
    Entry(_SM, "ExStream (equal bytes to 500)", "split_mnist_replay",
          "strategy=exstream,mem_size=500,layer=backbone/Dense_0"),
    Entry(_GD, "GDumb (500)", "split_mnist_replay",
          "strategy=gdumb,mem_size=500", 0.919, "Prabhu et al. 2020"),
    Entry(_GD, "GDumb (4400)", "split_mnist_replay",
          "strategy=gdumb,mem_size=4400", 0.978, "Prabhu et al. 2020"),
    Entry(_DGR, "Deep generative replay", "split_mnist_replay",
          "strategy=generative_replay", 0.908, "van de Ven et al. 2019"),
    Entry(_PM, "Replay (reservoir, 200)", "permuted_mnist_replay",
          "strategy=replay,mem_size=200", 0.724, _B),
    Entry(_PM, "Replay (reservoir, 500)", "permuted_mnist_replay",
          "strategy=replay,mem_size=500", 0.806, _B),
    Entry(_RM, "Replay (reservoir, 200)", "rotated_mnist_replay",
          "strategy=replay,mem_size=200", 0.850, _B),
    Entry(_RM, "Replay (reservoir, 500)", "rotated_mnist_replay",
          "strategy=replay,mem_size=500", 0.889, _B),
]
