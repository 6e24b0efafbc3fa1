"""Rotated MNIST (domain-incremental, 20 experiences) with experience replay.

Protocol of Buzzega et al. 2020, `Dark experience for general continual
learning <https://arxiv.org/abs/2004.07211>`_ (Mammoth's ``rot-mnist``):
20 experiences, each all of MNIST rotated by a fixed angle drawn uniformly
in [0, 180) degrees (nearest-neighbour resampling, as torchvision's
default that Mammoth uses; 60000 training images), domain-incremental
(one 10-way head, no task id), MLP 784-100-100-10, plain SGD (lr 0.2),
one epoch per experience, batch 128 plus 128 replayed, reservoir memory
of 200 or 500 examples.
Paper (ER): 85.0 / 88.9 % (memory 200 / 500).

``strategy=der`` / ``derpp``: with Mammoth's best ``rot-mnist`` settings
(``DER_ARGS``). Paper: DER 90.0 / 92.2 %, DER++ 90.4 / 92.8 % (memory
200 / 500). ``strategy=gss``: GSS-greedy with Mammoth's ``rot-mnist``
settings (``GSS_ARGS``). ``strategy=fdr``: FDR with Mammoth's
``rot-mnist`` settings (``FDR_ARGS``). ``strategy=ser``: SER with the
authors' ``rot-mnist`` settings (the permuted protocol's ``SER_ARGS``).

  jaxcl run --config experiments/rotated_mnist_replay.py:mem_size=200
  jaxcl run --config experiments/rotated_mnist_replay.py:mem_size=500

Arguments: ``strategy`` (replay | naive | any replay-family strategy with
default settings), ``mem_size``, ``seed``, ``lr`` (0: 0.2; DER / DER++:
their table's), ``quick``
(3 experiences of 2000 / 500 examples, for tests).
Holds 20 rotated copies of MNIST in host memory (~4 GB). Measured on a
2-core CPU: see docs/notes_replay.md.
"""

from experiments import permuted_mnist_replay

# Mammoth's best DER / DER++ settings on rot-mnist (utils/best_args.py):
# memory size -> (lr, replayed batch size, alpha, beta).
DER_ARGS = {
    "der": {200: (0.2, 128, 1.0, 0.0), 500: (0.2, 128, 0.5, 0.0),
            5120: (0.2, 128, 0.5, 0.0)},
    "derpp": {200: (0.1, 128, 1.0, 0.5), 500: (0.2, 128, 0.5, 1.0),
              5120: (0.2, 128, 0.5, 0.5)},
}


# Mammoth's best GSS settings on rot-mnist: memory size -> (lr, training
# batch, replayed batch, gss_minibatch_size).
GSS_ARGS = {200: (0.2, 128, 10, 128), 500: (0.2, 128, 128, 128),
            5120: (0.2, 128, 128, 128)}

# Mammoth's best FDR settings on rot-mnist: memory size -> (lr, replayed
# batch); batch 128.
FDR_ARGS = {200: (0.2, 128), 500: (0.2, 128), 5120: (0.2, 128)}


def get_config(arg=None):
  # The permuted protocol with rotated experiences; everything else equal.
  c = permuted_mnist_replay.get_config(arg, der_args=DER_ARGS,
                                       gss_args=GSS_ARGS, fdr_args=FDR_ARGS)
  c.name = c.name.replace("permuted_mnist", "rotated_mnist", 1)
  c.scenario.type = "rotated"
  # Mammoth's Rotation transform calls torchvision's rotate with its
  # default resampling, nearest neighbour, on the PIL image.
  c.scenario.interpolation = "nearest"
  return c
