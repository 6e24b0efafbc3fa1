"""Deep generative replay: a VAE generator replays the past to the solver.

Shin et al. (2017) pair the solver (the model being trained) with a
generator. During experience ``t`` (0-based), each step appends
``batch_size`` inputs :math:`\\tilde x \\sim G_{t-1}` sampled from the
generator as it was after the previous experience, labelled by the previous
solver :math:`S_{t-1}` (its most likely class among the classes seen
before; ``distill=True`` uses its tempered soft outputs instead, as van de
Ven et al.'s "DGR+distill"). The solver minimises

.. math::
   \\mathcal{L}_S = \\frac{1}{t+1}\\,\\frac{1}{|B|}\\sum_{B} \\ell(S(x), y)
     + \\Big(1 - \\frac{1}{t+1}\\Big)\\frac{1}{R}\\sum_{r=1}^{R}
       \\ell\\big(S(\\tilde x_r), \\tilde y_r\\big),

(``current_weight`` replaces :math:`1/(t+1)` if given; with distillation
the replay term is :math:`T^2\\,\\mathrm{CE}(\\mathrm{softmax}(S_{t-1}/T),
\\mathrm{softmax}(S/T))`), and the generator :math:`G_t` (a
:class:`jaxcl.models.vae.VAE`, with its own Adam optimiser) takes one step
per solver step on the same mix of current inputs and generated ones,
weighted the same way. At ``t = 0`` there is nothing to replay and the
replayed rows have weight 0. The VAE's Bernoulli decoder models pixels in
[0, 1]: with ``dataset.normalize`` it learns on the inputs turned back
into pixels, and its samples are standardised before the solvers see
them (:func:`jaxcl.augment.pixel_maps`).

Mechanics: ``prepare_batch`` generates and labels the replayed rows and
sets the rows' loss weights in ``mask`` so that they sum to 1 (the core
cross-entropy divides by ``max(sum(mask), 1)``, so the weighted sum above
is exactly what it computes); ``loss`` adds the distillation term;
``after_step`` trains the generator; ``after_experience`` snapshots the
generator and solver (parameters in the strategy state, fixed shapes, so
nothing recompiles) and records the classes seen. Do not chain it with
another strategy that appends rows after it: the weights would no longer
sum to 1.

References:
  Shin, Lee, Kim & Kim, `Continual learning with deep generative replay
  <https://arxiv.org/abs/1705.08690>`_, NeurIPS 2017.
  van de Ven & Tolias, `Three scenarios for continual learning
  <https://arxiv.org/abs/1904.07734>`_, 2019 (the protocol and the
  distillation variant).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import optax

from jaxcl import checks
from jaxcl.augment import pixel_maps
from jaxcl.models.vae import VAE, vae_loss
from jaxcl.strategies.replay import append_rows
from jaxcl.strategy import Strategy, mark_experience
from jaxcl.train import init_variables

__all__ = ["generative_replay", "DGRState", "replay_rows",
           "check_generator_args"]

_NEG = -1e9


class DGRState(NamedTuple):
  gen_params: Any         # the generator being trained
  gen_opt_state: Any      # its Adam state
  prev_gen_params: Any    # generator snapshot after the previous experience
  prev_params: Any        # solver snapshot after the previous experience
  prev_model_state: Any   # its model state
  seen: jax.Array         # bool (num_classes,): classes of past experiences
  experience: jax.Array   # int32 scalar: index of the current experience
  gen_step: jax.Array     # int32 scalar: generator steps taken
  key: jax.Array          # PRNG key


def replay_rows(ctx, vae: VAE, sstate: DGRState, key: jax.Array, n: int,
                temperature: float) -> dict[str, jax.Array]:
  """``n`` generated inputs labelled by the previous solver.

  Returns ``x`` (samples of the previous generator, standardised as the
  stream's inputs are when ``dataset.normalize`` is set: the generator
  models pixels in [0, 1]), ``y`` (the previous solver's argmax over the
  classes seen before), ``soft`` (its softmax at ``temperature`` over
  those classes) and ``task`` (zeros).
  """
  _, to_inputs = pixel_maps(ctx.normalize, ctx.info.input_shape,
                            "generative_replay")
  z = jax.random.normal(key, (n, vae.latent))
  x = to_inputs(jax.nn.sigmoid(vae.apply({"params": sstate.prev_gen_params},
                                         z, method=VAE.decode)))
  task = jnp.zeros((n,), jnp.int32)
  logits = ctx.logits(sstate.prev_params, sstate.prev_model_state, x, task)
  logits = jnp.where(sstate.seen, logits, _NEG)
  return {"x": x, "y": jnp.argmax(logits, -1).astype(jnp.int32),
          "soft": jax.nn.softmax(logits / temperature, -1), "task": task}


def check_generator_args(who: str, batch_size: int, hidden: Sequence[int],
                         latent: int, gen_lr: float) -> None:
  """The replayed batch and the VAE's sizes and rate (shared with
  generative negative replay, named by ``who``)."""
  checks.whole(f"{who}: batch_size", batch_size, 0,
                "0: the training batch size")
  hidden = tuple(hidden)
  if not hidden:
    raise ValueError(f"{who}: hidden needs at least one width, got ()")
  for i, h in enumerate(hidden):
    checks.whole(f"{who}: hidden[{i}]", h, 1)
  checks.whole(f"{who}: latent", latent, 1)
  checks.positive(f"{who}: gen_lr", gen_lr)


def generative_replay(batch_size: int = 0, hidden: tuple = (400, 400),
                      latent: int = 100, gen_lr: float = 1e-3,
                      distill: bool = False, temperature: float = 2.0,
                      current_weight: float = 0.0) -> Strategy:
  """Deep generative replay with a VAE.

  Args:
    batch_size: generated examples per step (0: the training batch size).
    hidden, latent: the VAE's hidden widths and latent size (van de Ven:
      400-400, 100).
    gen_lr: the generator's Adam learning rate.
    distill: replay the previous solver's soft outputs (at
      ``temperature``) instead of its hard labels.
    temperature: distillation temperature.
    current_weight: weight of the current data in (0, 1]; 0 means
      ``1 / (t + 1)`` at experience ``t`` (van de Ven et al.).

  Raises:
    ValueError: bad sizes, learning rate, temperature or weight.
  """
  check_generator_args("generative_replay", batch_size, hidden, latent,
                       gen_lr)
  hidden = tuple(hidden)
  checks.flag("generative_replay: distill", distill)
  checks.positive("generative_replay: temperature", temperature)
  if not (checks.is_real(current_weight) and 0 <= current_weight <= 1):
    raise ValueError(f"generative_replay current_weight must be in [0, 1] "
                     f"(0: 1/(t+1)), got {current_weight}")
  gen_tx = optax.adam(gen_lr)
  vaes = {}

  def get_vae(ctx) -> VAE:
    if ctx not in vaes:
      vaes[ctx] = VAE(tuple(ctx.info.input_shape), hidden, latent)
    return vaes[ctx]

  def replay_size(ctx):
    return batch_size or ctx.info.batch_size

  def weights(sstate):
    t = sstate.experience.astype(jnp.float32)
    w = (jnp.asarray(current_weight, jnp.float32) if current_weight
         else 1.0 / (t + 1.0))
    return jnp.where(sstate.experience > 0, w, 1.0)

  def init(ctx, key, params):
    vae = get_vae(ctx)
    k_gen, k_ms, k_run = jax.random.split(key, 3)
    x0 = jnp.zeros((1,) + tuple(ctx.info.input_shape), jnp.float32)
    gen_params = vae.init(k_gen, x0, k_gen)["params"]
    _, variables = init_variables(ctx, k_ms)
    copy = lambda t: jax.tree.map(jnp.copy, t)  # no aliased (donated) buffers
    return DGRState(gen_params, gen_tx.init(gen_params), copy(gen_params),
                    copy(params), variables, jnp.zeros((ctx.info.num_classes,), bool),
                    jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32), k_run)

  def prepare_batch(ctx, sstate, batch, key):
    r = replay_size(ctx)
    rows = replay_rows(ctx, get_vae(ctx), sstate, key, r, temperature)
    w = weights(sstate)
    m = batch["mask"]
    cur = m / jnp.maximum(jnp.sum(m), 1.0) * w
    # Hard labels: the replay rows carry weight (1 - w) in the CE; with
    # distillation they get 0 there and the loss hook adds the soft term.
    rep_w = 0.0 if distill else (1.0 - w) / r
    out = append_rows({**batch, "mask": cur},
                      {"x": rows["x"], "y": rows["y"], "task": rows["task"],
                       "mask": jnp.full((r,), rep_w, jnp.float32)})
    out["dgr_soft"] = rows["soft"]
    out["dgr_weight"] = 1.0 - w
    return out

  def loss(ctx, sstate, params, batch, logits):
    del sstate, params
    if not distill:
      return jnp.zeros((), jnp.float32)
    r = replay_size(ctx)
    student = jax.nn.log_softmax(logits[-r:].astype(jnp.float32) /
                                 temperature, -1)
    soft_ce = -jnp.mean(jnp.sum(batch["dgr_soft"] * student, -1))
    return batch["dgr_weight"] * temperature ** 2 * soft_ce

  def after_step(ctx, sstate, info):
    vae = get_vae(ctx)
    b, r = ctx.info.batch_size, replay_size(ctx)
    batch = info.batch
    x_cur, m_cur = batch["x"][:b], batch["mask"][:b] > 0
    x_rep = jax.lax.stop_gradient(batch["x"][-r:])
    w = weights(sstate)
    key = jax.random.fold_in(sstate.key, sstate.gen_step)

    # The VAE models pixels in [0, 1] (a Bernoulli decoder): standardised
    # inputs (dataset.normalize) go back to pixels first.
    to_pixels, _ = pixel_maps(ctx.normalize, ctx.info.input_shape,
                              "generative_replay")

    def gen_loss(p):
      x = to_pixels(jnp.concatenate([x_cur, x_rep]))
      recon, mu, logvar = vae.apply({"params": p}, x, key)
      per = vae_loss(recon, x, mu, logvar)
      cur = jnp.sum(per[:b] * m_cur) / jnp.maximum(jnp.sum(m_cur), 1)
      rep = jnp.mean(per[b:])
      return w * cur + (1.0 - w) * rep

    g = jax.grad(gen_loss)(sstate.gen_params)
    updates, opt = gen_tx.update(g, sstate.gen_opt_state, sstate.gen_params)
    return sstate._replace(gen_params=optax.apply_updates(sstate.gen_params,
                                                          updates),
                           gen_opt_state=opt, gen_step=sstate.gen_step + 1)

  def after_experience(ctx, state, experience):
    ss = state.strategy
    seen = ss.seen.at[jnp.asarray(experience.classes, jnp.int32)].set(True)
    # Copies: the training state is donated to the compiled loop, so the
    # snapshots must not share buffers with it.
    copy = lambda t: jax.tree.map(jnp.copy, t)
    ss = ss._replace(prev_gen_params=copy(ss.gen_params),
                     prev_params=copy(state.params),
                     prev_model_state=copy(state.model_state), seen=seen)
    return state.replace(strategy=ss)

  return Strategy(init=init, before_experience=mark_experience,
                  prepare_batch=prepare_batch, loss=loss,
                  after_step=after_step, after_experience=after_experience,
                  name="generative_replay")
