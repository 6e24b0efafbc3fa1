"""AR1: CWR* on the output layer plus Synaptic Intelligence below it.

Maltoni & Lomonaco (2019) introduced AR1 as CWR+ plus SI; Lomonaco,
Maltoni & Pellegrini (2020) put CWR* in place of CWR+ (their AR1*), which
is what this module does: the output layer is handled by
CWR* (consolidated per-class weights ``cw``, temporary weights trained on
the current classes only, count-weighted merge after each experience;
:mod:`jaxcl.strategies.cwr_star`), and — unlike CWR*, which freezes them —
the lower layers keep learning in every experience, protected by SI
(:mod:`jaxcl.strategies.si`):

.. math::
   \\mathcal{L}(\\theta) = \\mathcal{L}_{\\text{task}}(\\theta)
     + c \\sum_{i \\notin \\text{head}} \\Omega_i
       (\\tilde\\theta_i - \\theta_i)^2 .

This module composes the two existing strategies: the state is
``(CWRStarState, SIState)``; after each experience SI's importance of the
head is set to zero, because the head's weights are CWR*'s to manage (they
are reloaded from ``cw`` before every experience, so an SI anchor on them
would pull towards values that no longer exist). ``lower_lr_scale``
multiplies the lower layers' gradients after the first experience (the
paper trains them with a smaller learning rate there).

**AR1\\* (latent replay, Pellegrini et al. 2020, Algorithm 1).** With
``mem_size > 0`` the chain gets a third member,
:func:`jaxcl.strategies.latent_replay.latent_replay` at ``layer``: after
the first experience the layers below ``layer`` are frozen (the stored
latents stay valid), the layers above it train at ``lower_lr_scale`` under
SI, and each step adds the cross-entropy of ``replay_batch_size`` replayed
latents (memory: experience-balanced, ``mem_size // i`` random latents of
experience ``i``). Before each experience the replay memory's per-class
counts are handed to CWR* (:func:`jaxcl.strategies.cwr_star.set_replayed`),
so the replayed classes' consolidated units are loaded and trained next to
the current ones and their replayed counts enter ``cur_j`` of the merge —
without this, CWR* would switch the old classes off (logit ``-1e9``) and
the replayed latents could never be classified as their labels. State:
``(CWRStarState, SIState, LatentReplayState)``.

References:
  Maltoni & Lomonaco, `Continuous Learning in Single-Incremental-Task
  Scenarios <https://arxiv.org/abs/1806.08568>`_, Neural Networks 2019.
  Lomonaco, Maltoni & Pellegrini, `Rehearsal-Free Continual Learning over
  Small Non-I.I.D. Batches <https://arxiv.org/abs/1907.03799>`_, CVPR
  Workshops 2020.
  Pellegrini, Graffieti, Lomonaco & Maltoni, `Latent replay for real-time
  continual learning <https://arxiv.org/abs/1912.01100>`_, IROS 2020.
  Zenke, Poole & Ganguli, `Continual learning through synaptic
  intelligence <https://arxiv.org/abs/1703.04200>`_, ICML 2017.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxcl import checks
from jaxcl.strategies.cwr_star import cwr_star, set_replayed
from jaxcl.strategies.latent_replay import check_split_args, latent_replay
from jaxcl.strategies.si import si
from jaxcl.strategy import Strategy, chain

__all__ = ["ar1"]


# AR1*'s latent replay splits the MLP after its first hidden layer.
_DEFAULT_LAYER = "backbone/Dense_0"


def ar1(c: float = 0.1, xi: float = 0.1, lower_lr_scale: float = 1.0,
        mem_size: int = 0, replay_batch_size: int = 0,
        layer: str = _DEFAULT_LAYER) -> Strategy:
  """AR1 = CWR* (head) + SI (lower layers); AR1* with ``mem_size > 0``.

  Args:
    c: SI strength (>= 0).
    xi: SI damping (> 0).
    lower_lr_scale: gradient factor of the lower layers after the first
      experience, in ``(0, 1]`` (0 would be CWR*, with nothing for SI to
      protect).
    mem_size: latent replay memory (latents); 0 is AR1 without replay.
    replay_batch_size: latents replayed per step (0: the training batch
      size); only with ``mem_size > 0``.
    layer: the latent layer (module path, see
      :func:`jaxcl.strategies.latent_replay.layer_names`); only with
      ``mem_size > 0``.

  Raises:
    ValueError: bad ``c`` / ``xi`` (from SI), ``lower_lr_scale`` outside
      ``(0, 1]``, a negative ``mem_size``, a ``replay_batch_size`` without
      or above ``mem_size``, a ``layer`` other than the default without a
      memory; at ``init``, a model without a single ``head`` or an unknown
      ``layer``.
  """
  if not (checks.is_real(lower_lr_scale) and 0 < lower_lr_scale <= 1):
    raise ValueError(f"ar1: lower_lr_scale must be in (0, 1], got "
                     f"{lower_lr_scale!r} (0 is plain cwr_star)")
  if isinstance(mem_size, bool) or not isinstance(mem_size, int) or \
      mem_size < 0:
    raise ValueError(f"ar1: mem_size must be an int >= 0 (0: no latent "
                     f"replay), got {mem_size!r}")
  if mem_size:
    check_split_args("ar1:", mem_size, replay_batch_size, 0.0, layer,
                     batch_arg="replay_batch_size")
  elif replay_batch_size:
    raise ValueError(f"ar1: replay_batch_size={replay_batch_size} needs a "
                     "latent memory (mem_size > 0)")
  elif layer != _DEFAULT_LAYER:
    raise ValueError(f"ar1: layer={layer!r} names where latent replay "
                     "splits the model; it needs a latent memory (mem_size "
                     "> 0)")
  members = [cwr_star(backbone_lr_scale=float(lower_lr_scale)),
             si(c=c, xi=xi)]
  if mem_size:
    # Frozen below the latent layer after the first experience.
    members.append(latent_replay(mem_size=mem_size,
                                 batch_size=replay_batch_size, layer=layer,
                                 lower_lr_scale=0.0))
  inner = chain(*members)

  def before_experience(ctx, state, experience):
    if mem_size:
      # Hand the replay memory's class counts to CWR* before it resets the
      # head, so the replayed classes' units are loaded and trained.
      subs = list(state.strategy)
      mem = subs[2].memory
      y = np.asarray(mem.y)[np.asarray(mem.valid)]
      counts = np.bincount(y, minlength=ctx.info.num_classes)
      subs[0] = set_replayed(subs[0], counts)
      state = state.replace(strategy=tuple(subs))
    return inner.before_experience(ctx, state, experience)

  def after_experience(ctx, state, experience):
    state = inner.after_experience(ctx, state, experience)
    subs = list(state.strategy)
    s = subs[1]
    imp = dict(s.importance)
    imp["head"] = jax.tree.map(jnp.zeros_like, imp["head"])
    subs[1] = s._replace(importance=imp)
    return state.replace(strategy=tuple(subs))

  # One method to chain()'s composition checks (members=()), which know
  # ar1 by name; it keeps cwr_star's writes_params (the chain's).
  return inner._replace(before_experience=before_experience,
                        after_experience=after_experience,
                        name="ar1", members=())
