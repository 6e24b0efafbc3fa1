"""Results-table rows of the split domain-incremental scenario
(experiments/split_domain_incremental.py; see experiments/reproduce.py)."""

from experiments.reproduce import Entry

_HSU = "Hsu et al. 2018"
_CONFIG = "split_domain_incremental"


def _table(data: str) -> str:
  return (f"Split {data} (5x2) domain-incremental, MLP 2x400, Adam 1e-3, "
          "batch 128, 4 epochs (Hsu et al. 2018)")


def _dgr_table(data: str) -> str:
  return (f"Split {data} (5x2) domain-incremental, MLP 400-400 + VAE, "
          "van de Ven et al. 2019 protocol")


# Hsu et al. 2018, Table 2, "incremental domain" column (Split MNIST).
_PUBLISHED = {"naive": 0.552, "joint": 0.986, "ewc": 0.589,
              "online_ewc": 0.573, "si": 0.648, "mas": 0.686, "lwf": 0.710}
_METHODS = [("naive", "Naive"), ("joint", "Joint"), ("ewc", "EWC"),
            ("online_ewc", "Online EWC"), ("si", "SI"), ("mas", "MAS"),
            ("lwf", "LwF"), ("replay", "Replay (experience-balanced, 1100)")]

ENTRIES = []
for _data, _name in (("mnist", "MNIST"), ("fashion_mnist", "Fashion-MNIST")):
  _arg = "" if _data == "mnist" else f",dataset={_data}"
  for _s, _label in _METHODS:
    _pub = _PUBLISHED.get(_s) if _data == "mnist" else None
    ENTRIES.append(Entry(_table(_name), _label, _CONFIG,
                         f"strategy={_s}{_arg}", _pub,
                         _HSU if _pub is not None else ""))
  ENTRIES.append(Entry(
      _dgr_table(_name), "Deep generative replay", _CONFIG,
      f"strategy=generative_replay{_arg}",
      0.957 if _data == "mnist" else None,
      "van de Ven & Tolias 2019" if _data == "mnist" else ""))

# LwM against LwF and Naive on the same protocol with the cnn model, one
# epoch, seeds run one after another (session 26; no published number on
# Split MNIST: docs/notes_regularisation.md).
_CNN = ("Split MNIST (5x2) domain-incremental, CNN (conv 16-32, dense 128), "
        "Adam 1e-3, batch 128, 1 epoch (Hsu et al.'s protocol, one epoch)")
for _s, _label in (("naive", "Naive"), ("lwf", "LwF"),
                   ("lwm", "LwM (beta 5, gamma 1)")):
  ENTRIES.append(Entry(_CNN, _label, _CONFIG,
                       f"strategy={_s},model=cnn,epochs=1", sequential=True))
