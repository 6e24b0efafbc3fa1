"""A small Vision Transformer, plain, with an L2P prompt pool, with
CODA-Prompt's prefix components, or with DualPrompt's G- and E-prompts.

The backbone is Dosovitskiy et al.'s ViT (the layout of Google's
``vision_transformer`` / ``google-research/l2p`` ``models/vit.py``), sized
for 28x28 and 32x32 images on a CPU:

.. math::
   z_0 = [x_{\\text{cls}};\\, E x_p^1; \\dots; E x_p^P] + E_{\\text{pos}},
   \\qquad
   z'_\\ell = z_{\\ell-1} + \\mathrm{MHSA}(\\mathrm{LN}(z_{\\ell-1})),\\qquad
   z_\\ell = z'_\\ell + \\mathrm{MLP}(\\mathrm{LN}(z'_\\ell)),

``E`` a convolution whose stride is the patch size, the MLP
``Dense(mlp_dim) -> GELU -> Dense(dim)``, and the output ``LN(z_depth)``;
the feature is the CLS token's (``LN(z_depth)[0]``). No dropout (``train``
changes nothing).

``build('vit', ...)`` (``config.model.name = 'vit'``, its fields in
``config.model.vit``) gives, with ``pool_size=0``, a
:class:`jaxcl.models.Classifier` over :class:`ViT` (params ``backbone``,
``head``; every strategy works, ``features=True`` is the CLS feature), and
with ``pool_size > 0`` an :class:`L2PViT`: the same backbone with the
prompt pool of Learning to Prompt (Wang et al. 2022), trained by
:mod:`jaxcl.strategies.l2p`; with ``pool_size > 0`` and ``prompt='coda'``
a :class:`CodaViT`: the same backbone with CODA-Prompt's (Smith et al.
2023) attention-weighted prompt components, fed to the first blocks'
self-attention by prefix-tuning, trained by
:mod:`jaxcl.strategies.coda_prompt`; with ``pool_size > 0`` and
``prompt='dualprompt'`` a :class:`DualPromptViT`: the same backbone with
DualPrompt's (Wang et al. 2022b) shared G-prompt and per-task E-prompts,
both fed to blocks' self-attention by prefix-tuning, trained by
:mod:`jaxcl.strategies.dualprompt`. A plain run's saved params
(:mod:`jaxcl.pretrained`) load into any of these models' ``backbone``
(the attention is :class:`PrefixAttention`, whose params are named and
shaped as flax's ``MultiHeadDotProductAttention``'s).

References:
  Dosovitskiy et al., `An image is worth 16x16 words: transformers for
  image recognition at scale <https://arxiv.org/abs/2010.11929>`_, ICLR 2021.
  Wang et al., `Learning to prompt for continual learning
  <https://arxiv.org/abs/2112.08654>`_, CVPR 2022.
  Smith et al., `CODA-Prompt: COntinual Decomposed Attention-based
  prompting for rehearsal-free continual learning
  <https://arxiv.org/abs/2211.13218>`_, CVPR 2023.
  Wang et al., `DualPrompt: complementary prompting for rehearsal-free
  continual learning <https://arxiv.org/abs/2204.04799>`_, ECCV 2022.
"""

from __future__ import annotations

from typing import Any

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.models import init as inits
from jaxcl.models.classifier import Classifier, check_head, l2_normalise
from jaxcl.models.conv import Conv

__all__ = ["ViT", "L2PViT", "CodaViT", "DualPromptViT", "PrefixAttention",
           "build", "select_prompts", "coda_weights", "PROMPTS"]

# The prompted variants ``build`` makes when ``pool_size > 0``.
PROMPTS = ("l2p", "coda", "dualprompt")

Prefix = tuple[jnp.ndarray, jnp.ndarray]


class PrefixAttention(nn.Module):
  """Multi-head self-attention with optional prefix keys and values.

  Without a prefix this is flax's ``MultiHeadDotProductAttention(x, x)``
  (no mask, no dropout): the same submodules ``query``, ``key``, ``value``
  (``DenseGeneral`` to ``(heads, dim / heads)``) and ``out``, so the same
  param names, shapes and initial values, and the same operations. With a
  prefix ``(p_k, p_v)`` (each ``(B, L_p, dim)``) the projected keys and
  values of the tokens get ``L_p`` more rows in front, as prefix-tuning
  does (Li & Liang 2021; CODA-Prompt's ``models/vit.py`` ``Attention``):

  .. math::
     \\mathrm{softmax}\\big(q\\,[p_k; k]^\\top / \\sqrt{d_h}\\big)\\,[p_v; v],

  per head, ``p_k`` and ``p_v`` reshaped to ``(L_p, heads, d_h)`` as they
  are: they are in the projected space already (no ``key`` / ``value``
  kernel or bias is applied to them). The output keeps the tokens' length.
  """
  heads: int
  kernel_init: Any = nn.initializers.xavier_uniform()

  @nn.compact
  def __call__(self, x: jnp.ndarray,
               prefix: Prefix | None = None) -> jnp.ndarray:
    b, _, d = x.shape
    hd = d // self.heads
    dense = lambda name: nn.DenseGeneral(
        features=(self.heads, hd), axis=-1, kernel_init=self.kernel_init,
        name=name)
    q, k, v = dense("query")(x), dense("key")(x), dense("value")(x)
    if prefix is not None:
      pk, pv = prefix
      if pk.ndim != 3 or pk.shape != pv.shape or pk.shape[0] != b or \
          pk.shape[2] != d:
        raise ValueError(f"PrefixAttention: prefix keys and values must "
                         f"both be (B={b}, L_p, dim={d}), got {pk.shape} "
                         f"and {pv.shape}")
      k = jnp.concatenate([pk.reshape(b, -1, self.heads, hd).astype(k.dtype),
                           k], axis=1)
      v = jnp.concatenate([pv.reshape(b, -1, self.heads, hd).astype(v.dtype),
                           v], axis=1)
    # flax's dot_product_attention, op for op: the query scaled first.
    q = q / jnp.sqrt(hd).astype(q.dtype)
    w = jax.nn.softmax(jnp.einsum("...qhd,...khd->...hqk", q, k))
    o = jnp.einsum("...hqk,...khd->...qhd", w, v)
    return nn.DenseGeneral(features=d, axis=(-2, -1),
                           kernel_init=self.kernel_init, name="out")(o)


class ViT(nn.Module):
  """ViT backbone: patches, CLS token, learned positions, pre-LN blocks.

  Variables (``params``): ``embedding`` (the patch convolution, ``kernel``
  ``(patch, patch, C, dim)``), ``cls`` ``(1, 1, dim)``, ``pos_embedding``
  ``(1, 1 + P, dim)``, per block ``i`` ``block_i_norm_attention``,
  ``block_i_attention``, ``block_i_norm_mlp``, ``block_i_mlp_in``,
  ``block_i_mlp_out``, and the final ``norm``.
  """
  patch: int = 7
  dim: int = 64
  depth: int = 4
  heads: int = 4
  mlp_dim: int = 128
  # Images are resized (bilinear, per batch, inside the compiled step) to
  # input_size x input_size first; 0 keeps them as they come. A public
  # ViT-B/16 expects 224 (L2P resizes CIFAR to it), and a 224-px copy of
  # a data set would not fit in memory (CIFAR-100's train set: ~30 GB).
  input_size: int = 0

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False,
               prompts: jnp.ndarray | None = None,
               tokens: bool = False,
               prefixes: Sequence[Prefix | None] | None = None
               ) -> jnp.ndarray:
    """The CLS feature ``(B, dim)``, or with ``tokens=True`` every output
    token ``(B, 1 + T + P, dim)``.

    Args:
      x: images ``(B, H, W, C)``; ``patch`` must divide ``H`` and ``W``.
      train: unused (no dropout, no batch norm).
      prompts: ``(B, T, dim)`` tokens inserted after the CLS token, after
        the position embeddings were added (they get none: L2P's
        ``models/vit.py`` prepends them inside the encoder). Attention has
        no mask and no order, so ``[cls, prompts, patches]`` gives the
        outputs of the reference's ``[prompts, cls, patches]`` permuted.
      tokens: return all output tokens instead of the CLS feature.
      prefixes: one entry per block, ``None`` or ``(p_k, p_v)`` (each
        ``(B, L_p, dim)``): prefix keys and values for that block's
        self-attention (:class:`PrefixAttention`; CODA-Prompt's
        prefix-tuning). They add no tokens.
    """
    del train
    if x.ndim != 4:
      raise ValueError(f"ViT: expected images (B, H, W, C), got shape "
                       f"{x.shape}")
    if self.input_size and x.shape[1:3] != (self.input_size,) * 2:
      x = jax.image.resize(
          x, (x.shape[0], self.input_size, self.input_size, x.shape[3]),
          method="bilinear")
    h, w = x.shape[1:3]
    if h % self.patch or w % self.patch:
      raise ValueError(f"ViT: patch={self.patch} does not divide the "
                       f"{h}x{w} image; use a divisor of both sides")
    z = Conv(self.dim, (self.patch, self.patch),
             strides=(self.patch, self.patch), padding="VALID",
             name="embedding")(x)
    b = z.shape[0]
    z = z.reshape(b, -1, self.dim)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, self.dim))
    z = jnp.concatenate([jnp.tile(cls, (b, 1, 1)), z], axis=1)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02),
                     (1, z.shape[1], self.dim))
    z = z + pos
    if prompts is not None:
      if prompts.ndim != 3 or prompts.shape[0] != b or \
          prompts.shape[2] != self.dim:
        raise ValueError(f"ViT: prompts must be (B={b}, T, dim="
                         f"{self.dim}), got {prompts.shape}")
      z = jnp.concatenate([z[:, :1], prompts.astype(z.dtype), z[:, 1:]],
                          axis=1)
    if prefixes is not None and len(prefixes) != self.depth:
      raise ValueError(f"ViT: prefixes must have one entry (None or a "
                       f"(keys, values) pair) per block, depth={self.depth}"
                       f", got {len(prefixes)}")
    xavier = nn.initializers.xavier_uniform()
    small = nn.initializers.normal(1e-6)  # the reference's MLP biases
    for i in range(self.depth):
      y = nn.LayerNorm(name=f"block_{i}_norm_attention")(z)
      y = PrefixAttention(heads=self.heads, kernel_init=xavier,
                          name=f"block_{i}_attention")(
                              y, None if prefixes is None else prefixes[i])
      z = z + y
      y = nn.LayerNorm(name=f"block_{i}_norm_mlp")(z)
      y = nn.Dense(self.mlp_dim, kernel_init=xavier, bias_init=small,
                   name=f"block_{i}_mlp_in")(y)
      y = nn.Dense(self.dim, kernel_init=xavier, bias_init=small,
                   name=f"block_{i}_mlp_out")(nn.gelu(y))
      z = z + y
    z = nn.LayerNorm(name="norm")(z)
    return z if tokens else z[:, 0]


def select_prompts(query: jnp.ndarray, keys: jnp.ndarray,
                   top_k: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """The ``top_k`` keys nearest each query by cosine (L2P's eq. 3).

  Args:
    query: ``(B, D)`` queries ``q(x)``.
    keys: ``(M, D)`` prompt keys.
    top_k: ``N``, keys kept per query.

  Returns:
    ``idx`` int32 ``(B, N)``, in decreasing similarity, and ``cos``
    ``(B, N)``, their cosine similarities ``γ(q(x), k_{s_i})``
    (differentiable in ``keys`` and ``query``).
  """
  sim = l2_normalise(query) @ l2_normalise(keys).T   # (B, M)
  # The argsort is on values that carry no gradient; the cosines returned
  # are gathered from ``sim`` so the key loss reaches the chosen keys.
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(sim), top_k)
  return idx, jnp.take_along_axis(sim, idx, axis=1)


class L2PViT(nn.Module):
  """A ViT with L2P's prompt pool and a head on the prompts' outputs.

  For an image ``x`` (Wang et al. 2022, Sec. 4): the query ``q(x)`` is the
  CLS feature of the backbone run *without* prompts (the frozen pretrained
  model; under ``stop_gradient``); the ``N = top_k`` keys of highest cosine
  ``γ(q(x), k_i)`` pick their prompts ``P_{s_1..s_N}`` (each ``L x D``),
  which are inserted after the CLS token:
  ``x_p = [z_cls; P_{s_1}; ...; P_{s_N}; E x_p]``. The classifier reads the
  mean of the ``N L`` prompt positions' outputs (the paper's and the
  reference code's ``classifier='prompt'``).

  Params: ``backbone`` (the :class:`ViT`'s, used by both passes),
  ``prompt`` ``(M, L, D)``, ``key`` ``(M, D)`` (both ``U(-1, 1)`` as
  Mammoth's / l2p-pytorch's ``prompt_init='uniform'``; the JAX reference
  draws ``U(0, 0.01)``) and ``head`` (``kernel`` zero-initialised as the
  JAX reference's, so a class's logit is 0 until it trains). The split
  between model and strategy: the model holds everything with a shape
  (pool, keys, head) and runs the forward pass; freezing the backbone,
  the key loss and the class mask are :mod:`jaxcl.strategies.l2p`'s.

  ``features=True`` returns the head's input (the mean of the prompt
  outputs). ``task`` is never read: selection needs no task id.
  """
  backbone: ViT
  num_classes: int
  pool_size: int = 10
  prompt_length: int = 5
  top_k: int = 5

  def setup(self):
    d = self.backbone.dim
    uniform = lambda k, s: jax.random.uniform(k, s, jnp.float32, -1.0, 1.0)
    self.prompt = self.param("prompt", uniform,
                             (self.pool_size, self.prompt_length, d))
    self.keys = self.param("key", uniform, (self.pool_size, d))
    self.head = nn.Dense(self.num_classes,
                         kernel_init=nn.initializers.zeros)

  def query(self, x: jnp.ndarray) -> jnp.ndarray:
    """``q(x)``: the backbone's CLS feature without prompts, no gradient."""
    return jax.lax.stop_gradient(self.backbone(x))

  def select(self, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(idx, cos)`` of :func:`select_prompts` for ``x``'s queries."""
    return select_prompts(self.query(x), self.keys, self.top_k)

  def __call__(self, x: jnp.ndarray, task: jnp.ndarray | None = None,
               train: bool = False, features: bool = False) -> jnp.ndarray:
    del task  # instance-wise selection: no task id at train or test time
    idx, _ = self.select(x)
    b = x.shape[0]
    prompts = self.prompt[idx].reshape(b, -1, self.backbone.dim)  # B, N L, D
    z = self.backbone(x, train=train, prompts=prompts, tokens=True)
    h = jnp.mean(z[:, 1:1 + prompts.shape[1]], axis=1)
    return h if features else self.head(h)


def coda_weights(query: jnp.ndarray, keys: jnp.ndarray,
                 attn: jnp.ndarray) -> jnp.ndarray:
  """CODA-Prompt's component weights ``α_m = γ(q ⊙ A_m, K_m)`` (eq. 3).

  Args:
    query: ``(B, D)`` queries ``q(x)``.
    keys: ``(M, D)`` component keys ``K_m``.
    attn: ``(M, D)`` attention vectors ``A_m``.

  Returns:
    ``(B, M)``: the cosine of the attended query ``q ⊙ A_m`` with ``K_m``
    (the reference's ``aq_k``; no softmax, no top-k).
  """
  attended = query[:, None, :] * attn[None]              # B, M, D
  return jnp.einsum("bmd,md->bm", l2_normalise(attended),
                    l2_normalise(keys))


class CodaViT(nn.Module):
  """A ViT with CODA-Prompt's decomposed prompts, fed by prefix-tuning.

  For an image ``x`` (Smith et al. 2023, Sec. 4) the query ``q(x)`` is the
  CLS feature of the backbone run without prompts (the frozen pretrained
  model; under ``stop_gradient``). In each prompted block ``l``
  (``layers``) the prompt is a weighted sum of ``M`` components
  ``P_{l,m}`` (each ``L x D``), weighted by :func:`coda_weights`:

  .. math::
     p_l = \\sum_m \\gamma(q(x) \\odot A_{l,m},\\, K_{l,m})\\, P_{l,m},

  and its first ``L/2`` rows are prepended to that block's attention keys,
  the last ``L/2`` to its values (prefix-tuning: the token sequence keeps
  its length; :class:`PrefixAttention`). The classifier reads the CLS
  output of the prompted pass.

  Params: ``backbone`` (the :class:`ViT`'s, used by both passes),
  ``prompt`` ``(n_layers, M, L, D)``, ``key`` and ``attn``
  ``(n_layers, M, D)`` (all ``U(0, 1)``, the reference's ``tensor_prompt``
  before its Gram-Schmidt, which :mod:`jaxcl.strategies.coda_prompt`
  applies per experience), and ``head`` (PyTorch ``nn.Linear``'s kernel
  init ``U(±1/sqrt(D))``, zero bias). The model sums over all ``M``
  components; which ones exist yet is the strategy's business: it keeps
  the components of later experiences at ``P = 0``, so they add nothing
  to ``p_l`` (the reference slices them off; the prefix itself is always
  there, as in the reference), and lets only the current experience's
  slice train.

  ``features=True`` returns the head's input (the prompted CLS feature).
  ``task`` is never read.
  """
  backbone: ViT
  num_classes: int
  pool_size: int = 50
  prompt_length: int = 8
  layers: tuple[int, ...] = (0, 1, 2, 3)

  def setup(self):
    d, n = self.backbone.dim, len(self.layers)
    uniform = nn.initializers.uniform(1.0)     # U(0, 1), torch's uniform_
    self.prompt = self.param("prompt", uniform,
                             (n, self.pool_size, self.prompt_length, d))
    self.keys = self.param("key", uniform, (n, self.pool_size, d))
    self.attn = self.param("attn", uniform, (n, self.pool_size, d))
    self.head = nn.Dense(
        self.num_classes,
        kernel_init=nn.initializers.variance_scaling(1 / 3, "fan_in",
                                                     "uniform"))

  def query(self, x: jnp.ndarray) -> jnp.ndarray:
    """``q(x)``: the backbone's CLS feature without prompts, no gradient."""
    return jax.lax.stop_gradient(self.backbone(x))

  def weights(self, x: jnp.ndarray) -> jnp.ndarray:
    """``α``, ``(n_layers, B, M)``: :func:`coda_weights` per layer."""
    q = self.query(x)
    return jax.vmap(coda_weights, (None, 0, 0))(q, self.keys, self.attn)

  def __call__(self, x: jnp.ndarray, task: jnp.ndarray | None = None,
               train: bool = False, features: bool = False) -> jnp.ndarray:
    del task  # the weights need no task id at train or test time
    alpha = self.weights(x)
    p = jnp.einsum("nbm,nmld->nbld", alpha, self.prompt)  # n, B, L, D
    half = self.prompt_length // 2
    prefixes = [None] * self.backbone.depth
    for j, layer in enumerate(self.layers):
      prefixes[layer] = (p[j, :, :half], p[j, :, half:])
    h = self.backbone(x, train=train, prefixes=prefixes)
    return h if features else self.head(h)


class DualPromptViT(nn.Module):
  """A ViT with DualPrompt's G-prompt and E-prompt pool, by prefix-tuning.

  For an image ``x`` (Wang et al. 2022b, Sec. 4): the G-prompt ``g_l``
  (one per block ``l`` of ``g_layers``, shared by every task) and the
  E-prompt ``e_{l,i}`` of the chosen task ``i`` (one per block of
  ``e_layers`` and per pool entry ``i``) are prefixes of that block's
  self-attention (:class:`PrefixAttention`): each prompt is a pair
  ``(p_K, p_V)`` of ``L x D`` rows, prepended to the projected keys and
  values (the references' ``(…, 2, L, heads, D/heads)`` prompt: ``L`` key
  rows *and* ``L`` value rows). A block in both lists gets
  ``[g_l; e_{l,i}]`` (the JAX reference concatenates them, G first). The
  classifier reads the prompted pass's CLS output (``vit_classifier=
  'token'``).

  Which E-prompt: with ``train=True`` the row's ``task`` argument is its
  index (the task id is known in training; :mod:`jaxcl.strategies.
  dualprompt` writes the experience's index into the batch's task ids);
  otherwise (prediction) the key nearest the query by cosine,
  ``i(x) = argmax_i γ(q(x), k_i)`` (:func:`select_prompts` with
  ``top_k=1``), where ``q(x)`` is the CLS feature of the backbone run
  without prompts (the frozen pretrained model; under ``stop_gradient``).
  An index outside ``[0, pool_size)`` is clamped by the gather: the
  strategy checks the pool has one E-prompt per experience.

  Params: ``backbone`` (the :class:`ViT`'s, used by both passes),
  ``g_prompt`` ``(len(g_layers), 2, g_length, D)``, ``e_prompt``
  ``(len(e_layers), pool_size, 2, e_length, D)``, ``key``
  ``(pool_size, D)`` (all ``U(-1, 1)``, the PyTorch port's
  ``prompt_init='uniform'``; the JAX reference draws ``U(0, 0.01)``) and
  ``head`` (kernel zero-initialised as the JAX reference's).

  ``features=True`` returns the head's input (the prompted CLS feature).
  """
  backbone: ViT
  num_classes: int
  pool_size: int = 10
  g_length: int = 5
  e_length: int = 5
  g_layers: tuple[int, ...] = (0, 1)
  e_layers: tuple[int, ...] = (2, 3, 4)

  def setup(self):
    d = self.backbone.dim
    uniform = lambda k, s: jax.random.uniform(k, s, jnp.float32, -1.0, 1.0)
    self.g_prompt = self.param("g_prompt", uniform,
                               (len(self.g_layers), 2, self.g_length, d))
    self.e_prompt = self.param(
        "e_prompt", uniform,
        (len(self.e_layers), self.pool_size, 2, self.e_length, d))
    self.keys = self.param("key", uniform, (self.pool_size, d))
    self.head = nn.Dense(self.num_classes,
                         kernel_init=nn.initializers.zeros)

  def query(self, x: jnp.ndarray) -> jnp.ndarray:
    """``q(x)``: the backbone's CLS feature without prompts, no gradient."""
    return jax.lax.stop_gradient(self.backbone(x))

  def select(self, x: jnp.ndarray) -> jnp.ndarray:
    """int32 ``(B,)``: the E-prompt whose key is nearest ``q(x)``."""
    idx, _ = select_prompts(self.query(x), self.keys, 1)
    return idx[:, 0]

  def prefixes(self, idx: jnp.ndarray) -> list[Prefix | None]:
    """Per block, ``None`` or the ``(p_K, p_V)`` prefix (each
    ``(B, L, D)``) of the G-prompt and of E-prompt ``idx`` ``(B,)``."""
    b = idx.shape[0]
    out: list[Prefix | None] = [None] * self.backbone.depth
    for j, layer in enumerate(self.g_layers):
      g = jnp.broadcast_to(self.g_prompt[j], (b,) + self.g_prompt.shape[1:])
      out[layer] = (g[:, 0], g[:, 1])
    e = self.e_prompt[:, idx]                      # n_e, B, 2, L, D
    for j, layer in enumerate(self.e_layers):
      pk, pv = e[j, :, 0], e[j, :, 1]
      if out[layer] is not None:                   # [g; e], G first
        pk = jnp.concatenate([out[layer][0], pk], axis=1)
        pv = jnp.concatenate([out[layer][1], pv], axis=1)
      out[layer] = (pk, pv)
    return out

  def __call__(self, x: jnp.ndarray, task: jnp.ndarray | None = None,
               train: bool = False, features: bool = False) -> jnp.ndarray:
    if train and task is not None:
      idx = jnp.broadcast_to(jnp.asarray(task, jnp.int32), x.shape[:1])
    else:
      idx = self.select(x)
    h = self.backbone(x, train=train, prefixes=self.prefixes(idx))
    return h if features else self.head(h)


def _layers(name: str, given: Sequence[int] | None, default: Sequence[int],
            depth: int, empty: bool = False) -> tuple[int, ...]:
  """The prompted blocks: ``given``, or ``default`` cut to ``depth``;
  distinct whole numbers in ``[0, depth)``, at least one unless
  ``empty``."""
  try:
    layers = tuple(i for i in default if i < depth) if given is None else \
        tuple(given)
  except TypeError:   # not a sequence (a bare block index)
    layers = (None,)
  if (not layers and not empty) or len(set(layers)) != len(layers) or \
      not all(checks.is_whole(i) and 0 <= i < depth for i in layers):
    what = "" if empty else ", at least one"
    note = "" if given is not None else (
        f" (the default {tuple(default)} cut to depth={depth} left none; "
        f"give {name})")
    raise ValueError(f"vit: {name}={given!r} must be distinct block "
                     f"indices in [0, depth={depth}){what}{note}")
  return tuple(int(i) for i in layers)


def build(num_classes: int, num_heads: int = 1, *, patch: int = 7,
          dim: int = 64, depth: int = 4, heads: int = 4, mlp_dim: int = 128,
          pool_size: int = 0, prompt_length: int | None = None,
          top_k: int = 5, init: str = "lecun_normal", head: str = "linear",
          prompt: str = "l2p",
          prompt_layers: Sequence[int] | None = None,
          g_prompt_length: int | None = None,
          g_prompt_layers: Sequence[int] | None = None,
          input_size: int = 0) -> Any:
  """Builds a ViT classifier, or with ``pool_size > 0`` a prompted model:
  L2P (``prompt='l2p'``), CODA-Prompt (``prompt='coda'``) or DualPrompt
  (``prompt='dualprompt'``).

  Args:
    num_classes: outputs per head.
    num_heads: heads (plain ViT only; L2P has one head over all classes).
    patch: patch side (divides the image's sides: 7 or 4 on 28x28, 4 or 8
      on 32x32).
    dim: token width (a multiple of ``heads``).
    depth: transformer blocks.
    heads: attention heads.
    mlp_dim: hidden width of each block's MLP.
    pool_size: ``M``, prompts in the pool (CODA: components per prompted
      block; DualPrompt: E-prompts, one per experience); 0 for a plain
      ViT.
    prompt_length: ``L``, tokens per prompt; default 5 for L2P, 8 for
      CODA (the reference's; even: half keys, half values), 5 for
      DualPrompt's E-prompts (``L`` prefix keys and ``L`` values).
    top_k: ``N``, prompts chosen per image (L2P only; at most
      ``pool_size``; DualPrompt chooses one).
    init: the plain ViT head's initialisation (:data:`jaxcl.models.init.
      INITS`); the L2P head's kernel starts at zero.
    head: the plain ViT's head layer (``linear`` | ``cosine``).
    prompt: the prompted model when ``pool_size > 0``: ``l2p``
      (:class:`L2PViT`), ``coda`` (:class:`CodaViT`) or ``dualprompt``
      (:class:`DualPromptViT`).
    prompt_layers: CODA's prompted blocks, or DualPrompt's E-prompted
      ones, distinct, each in ``[0, depth)``; default the references'
      ``0..4`` (CODA) or ``2..4`` (DualPrompt) cut to ``depth``.
    g_prompt_length: DualPrompt's G-prompt length (``L`` prefix keys and
      ``L`` values); default 5 (the references').
    g_prompt_layers: DualPrompt's G-prompted blocks, distinct, each in
      ``[0, depth)`` (may share blocks with ``prompt_layers``: the block
      gets both prefixes); ``()`` for none (the paper's E-prompt-only
      ablation); default the references' ``0, 1`` cut to ``depth``.
    input_size: resize the images (bilinear, per batch) to ``input_size``
      square before the patches; 0 (default): as they come. 224 for a
      public ViT-B/16 checkpoint (:mod:`jaxcl.models.vit_checkpoints`
      with ``--image-size 224``).

  Raises:
    ValueError: a size that is not a whole number >= 1, ``dim`` not a
      multiple of ``heads``, ``top_k > pool_size``, an unknown ``prompt``,
      an odd CODA ``prompt_length``, a bad ``prompt_layers`` or
      ``g_prompt_layers``, DualPrompt's fields given to another model, or
      a prompted model asked for several heads or a cosine head.
  """
  for name, v in (("patch", patch), ("dim", dim), ("depth", depth),
                  ("heads", heads), ("mlp_dim", mlp_dim)):
    checks.whole(f"vit: {name}", v, 1)
  if dim % heads:
    raise ValueError(f"vit: dim={dim} is not a multiple of heads={heads}")
  checks.whole("vit: pool_size", pool_size, note="0: no prompt pool")
  checks.whole("vit: input_size", input_size,
               note="0: the images as they come")
  if input_size and input_size % patch:
    raise ValueError(f"vit: patch={patch} does not divide "
                     f"input_size={input_size}; use a multiple of the patch")
  if prompt not in PROMPTS:
    raise ValueError(f"vit: unknown prompt={prompt!r}; valid: "
                     f"{list(PROMPTS)}")
  backbone = ViT(patch=patch, dim=dim, depth=depth, heads=heads,
                 mlp_dim=mlp_dim, input_size=input_size)
  if pool_size == 0:
    return Classifier(backbone=backbone, num_classes=num_classes,
                      num_heads=num_heads, initializer=inits.check(init),
                      head=check_head(head))
  if prompt != "dualprompt" and (g_prompt_length is not None or
                                 g_prompt_layers is not None):
    raise ValueError(f"vit: g_prompt_length={g_prompt_length!r} / "
                     f"g_prompt_layers={g_prompt_layers!r} are DualPrompt's "
                     f"(prompt='dualprompt'), not prompt={prompt!r}'s")
  what = {"l2p": "a prompt pool (L2P)", "coda": "CODA-Prompt",
          "dualprompt": "DualPrompt"}[prompt]
  if num_heads != 1:
    raise ValueError(f"vit with {what} has one head over all "
                     f"classes, got num_heads={num_heads}; set "
                     "model.multi_head=False (task-incremental streams mask "
                     "the logits to the task)")
  if head != "linear":
    raise ValueError(f"vit with {what} has a linear head, got "
                     f"head={head!r}")
  if prompt == "coda":
    length = 8 if prompt_length is None else prompt_length
    checks.whole("vit: prompt_length", length, 2)
    if length % 2:
      raise ValueError(f"vit: CODA-Prompt's prompt_length={length} must be "
                       "even (half prefix keys, half prefix values)")
    layers = _layers("prompt_layers", prompt_layers, range(5), depth)
    return CodaViT(backbone=backbone, num_classes=num_classes,
                   pool_size=pool_size, prompt_length=length,
                   layers=tuple(int(i) for i in layers))
  if prompt == "dualprompt":
    e_length = 5 if prompt_length is None else prompt_length
    g_length = 5 if g_prompt_length is None else g_prompt_length
    checks.whole("vit: prompt_length", e_length, 1)
    checks.whole("vit: g_prompt_length", g_length, 1)
    return DualPromptViT(
        backbone=backbone, num_classes=num_classes, pool_size=pool_size,
        g_length=g_length, e_length=e_length,
        g_layers=_layers("g_prompt_layers", g_prompt_layers, (0, 1), depth,
                         empty=True),
        e_layers=_layers("prompt_layers", prompt_layers, (2, 3, 4), depth))
  if prompt_layers is not None:
    raise ValueError(f"vit: prompt_layers={prompt_layers!r} is CODA's "
                     "(prompt='coda') or DualPrompt's (prompt='dualprompt');"
                     " L2P prompts the input tokens")
  prompt_length = 5 if prompt_length is None else prompt_length
  checks.whole("vit: prompt_length", prompt_length, 1)
  checks.whole("vit: top_k", top_k, 1)
  if top_k > pool_size:
    raise ValueError(f"vit: top_k={top_k} prompts per image from a pool of "
                     f"pool_size={pool_size}; use top_k <= pool_size")
  return L2PViT(backbone=backbone, num_classes=num_classes,
                pool_size=pool_size, prompt_length=prompt_length,
                top_k=top_k)
