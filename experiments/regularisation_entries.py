"""Results-table rows of the regularisation family (experiments/reproduce.py)."""

from experiments.reproduce import Entry

_HSU = "Hsu et al. 2018"
_ST = ("Split MNIST (5x2) task-incremental, MLP 2x400, Adam 1e-3, batch "
       "128, 4 epochs (Hsu et al. 2018)")
_SC = ("Split MNIST (5x2) class-incremental, MLP 2x400, Adam 1e-3, batch "
       "128, 4 epochs (Hsu et al. 2018)")
_PM = ("Permuted MNIST (10), MLP 2x1000, Adam 1e-4, batch 128, 10 epochs "
       "(Hsu et al. 2018 / van de Ven & Tolias 2019)")
_PMR = ("Permuted MNIST (10), padded to 32x32, first task unpermuted (the "
        "reference code's input), MLP 2x1000, Adam 1e-4, batch 128, 10 "
        "epochs (van de Ven & Tolias 2019)")
_REF = "pad=2,first_identity=True"
_PMT = ("Permuted MNIST (10), the reference code's input and network: "
        "32x32, first task unpermuted, PyTorch init, one Adam for the "
        "stream, MLP 2x1000, Adam 1e-4, batch 128, 10 epochs")
_TOR = f"{_REF},init=torch,keep_opt=True"


def _on_reference_network(acc: float) -> str:
  """Note for a padded-input row: what the same method reaches in _PMT."""
  return ("Adam reset per experience, flax init; with the reference code's "
          f"one Adam for the stream and PyTorch init: {acc:.3f} (next table)")

ENTRIES = [
    Entry(_ST, "EWC", "split_mnist_regularisation", "strategy=ewc,kind=task",
          0.97, "issue 5 anchor (Hsu: 0.977)"),
    Entry(_ST, "Online EWC", "split_mnist_regularisation",
          "strategy=online_ewc,kind=task", 0.980, _HSU),
    Entry(_ST, "SI", "split_mnist_regularisation", "strategy=si,kind=task",
          0.97, "issue 5 anchor (Hsu: 0.986)"),
    Entry(_ST, "MAS", "split_mnist_regularisation", "strategy=mas,kind=task",
          0.992, _HSU),
    Entry(_ST, "LwF", "split_mnist_regularisation", "strategy=lwf,kind=task",
          0.99, "issue 5 anchor (Hsu: 0.996)"),
    Entry(_ST, "Hypernetwork", "split_mnist_regularisation",
          "strategy=hypernetwork,kind=task", 0.99,
          "issue 5 anchor (von Oswald et al. 2020)"),
    Entry(_ST, "RWalk", "split_mnist_regularisation",
          "strategy=rwalk,kind=task",
          note="no published number on this protocol; FACIL's settings "
               "with λ = 1e3 from a seed-0 sweep (1 to 1e4)"),
    Entry(_SC, "EWC", "split_mnist_regularisation", "strategy=ewc,kind=class"),
    Entry(_SC, "Online EWC", "split_mnist_regularisation",
          "strategy=online_ewc,kind=class"),
    Entry(_SC, "SI", "split_mnist_regularisation", "strategy=si,kind=class"),
    Entry(_SC, "MAS", "split_mnist_regularisation", "strategy=mas,kind=class"),
    Entry(_SC, "LwF", "split_mnist_regularisation", "strategy=lwf,kind=class"),
    Entry(_SC, "LwF.MC (iCaRL's loss, no exemplars)",
          "split_mnist_regularisation", "strategy=lwf_mc,kind=class",
          note="no published number on this protocol"),
    Entry(_SC, "Hypernetwork (entropy task inference)",
          "split_mnist_regularisation", "strategy=hypernetwork,kind=class"),
    Entry(_SC, "RWalk", "split_mnist_regularisation",
          "strategy=rwalk,kind=class"),
    Entry(_PM, "EWC", "permuted_mnist_regularisation", "strategy=ewc", 0.94,
          "issue 5 anchor",
          note="one seed; λ = 1e3 (sampled Fisher), chosen on a 1-epoch "
          "protocol, is too stiff at 10 epochs: each new permutation is "
          "learned less (0.978 for the first, 0.80 for the tenth). The "
          "main gap is the input, not the method: the reference code pads "
          "MNIST to 32x32 before permuting, so each permutation leaves a "
          "different quarter of the inputs blank. With that input the "
          "same methods reach the anchors' range (next table)."),
    Entry(_PM, "Online EWC", "permuted_mnist_regularisation",
          "strategy=online_ewc", 0.95, "issue 5 anchor",
          note="28x28 input, every task permuted. λ is not the lever here "
          "(1-seed sweep: 0.898 / 0.895 / 0.879 at λ = 250 / 500 / 1000), "
          "nor the Fisher convention or the optimiser reset "
          "(docs/notes_regularisation.md). The reference code's 32x32 "
          "padding is: with it, λ = 100 gives 0.941 and λ = 200 0.946 on "
          "seed 0 (next table)."),
    Entry(_PM, "SI", "permuted_mnist_regularisation", "strategy=si", 0.95,
          "issue 5 anchor",
          note="28x28 input, every task permuted; c = 10, ξ = 0.1, the "
          "reference codes' value. Neither c = 100 (0.846) nor ω from the "
          "total-loss gradient (0.906) helps (1 seed each). With the "
          "reference code's 32x32 padding and unpermuted first task the "
          "same c gives 0.948 on seed 0 (next table)."),
    Entry(_PM, "Hypernetwork (task given)", "permuted_mnist_regularisation",
          "strategy=hypernetwork", 0.97, "von Oswald et al. 2020",
          note="β = 0.01 (the reference code's 0.1 gave 0.944 on 1 seed). "
          "Almost no forgetting (BWT -0.002), but each new task is learned "
          "a little less well than the ones before (0.976-0.979 for the "
          "first, 0.94-0.97 for tasks 6-10). The reference code's remaining "
          "details were each tried on 4 tasks (its look-ahead, every "
          "learned task regularised per step, Glorot hidden init, β = "
          "0.001): none changed that by more than seed noise "
          "(docs/notes_regularisation.md, session 9). The generated "
          "values are the weights (output_scale='none'), as in the "
          "reference code."),
    Entry(_PMR, "Online EWC (λ = 200)", "permuted_mnist_regularisation",
          f"strategy=online_ewc,strength=200,{_REF}", 0.95, "issue 5 anchor",
          note=_on_reference_network(0.958)),
    Entry(_PMR, "EWC (λ = 200)", "permuted_mnist_regularisation",
          f"strategy=ewc,strength=200,{_REF}", 0.94, "issue 5 anchor"),
    Entry(_PMR, "SI", "permuted_mnist_regularisation", f"strategy=si,{_REF}",
          0.95, "issue 5 anchor",
          note=_on_reference_network(0.956)),
    # The reference code's Permuted MNIST input (hypercl: padding=2, first
    # task unpermuted) with the β that came closest on 28x28 (0.967, seed 0).
    Entry(_PMR, "Hypernetwork (task given, β = 0.001)",
          "permuted_mnist_regularisation",
          f"strategy=hypernetwork,strength=0.001,{_REF}", 0.97,
          "von Oswald et al. 2020"),
    Entry(_PMT, "Online EWC (λ = 200)", "permuted_mnist_regularisation",
          f"strategy=online_ewc,strength=200,{_TOR}", 0.95, "issue 5 anchor"),
    Entry(_PMT, "SI", "permuted_mnist_regularisation", f"strategy=si,{_TOR}",
          0.95, "issue 5 anchor"),
    Entry(_PMT, "EWC (λ = 200)", "permuted_mnist_regularisation",
          f"strategy=ewc,strength=200,{_TOR}", 0.94, "issue 5 anchor"),
]
