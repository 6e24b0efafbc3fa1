"""DER++: Dark Experience Replay with a label-replay term.

DER (:mod:`jaxcl.strategies.der`, whose docstring gives the objective and
the mechanics) plus :math:`\\beta\\,\\mathbb{E}_{(x'', y'') \\sim M}
[\\ell(y'', h_\\theta(x''))]`, the cross-entropy of the stored labels on a
second, independently drawn memory batch. Stored logits can be stale or
wrong for an example seen early in training; the labels correct them
(Buzzega et al. 2020, "DER++").

References:
  Buzzega, Boschini, Porrello, Abati & Calderara, `Dark experience for
  general continual learning: a strong, simple baseline
  <https://arxiv.org/abs/2004.07211>`_, NeurIPS 2020.
"""

from __future__ import annotations

from jaxcl import checks
from jaxcl.strategies.der import dark_experience_replay
from jaxcl.strategy import Strategy

__all__ = ["derpp"]


def derpp(mem_size: int = 200, alpha: float = 0.1, beta: float = 0.5,
          batch_size: int = 0) -> Strategy:
  """DER++.

  Args:
    mem_size: memory capacity in examples (each with its label and logits).
    alpha: weight of the logit-matching term.
    beta: weight of the label term (> 0; 0 would be DER: use ``der``).
    batch_size: entries per memory batch (two are drawn per step); 0
      means the training batch size.

  The defaults are Mammoth's best DER++ setting on Split CIFAR-10 with
  memory 200 (alpha 0.1, beta 0.5).

  Raises:
    ValueError: as :func:`jaxcl.strategies.der.dark_experience_replay`;
      also ``beta`` not > 0.
  """
  checks.positive("derpp: beta", beta)
  return dark_experience_replay(mem_size, alpha, beta, batch_size, "derpp")
