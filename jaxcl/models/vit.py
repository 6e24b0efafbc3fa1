"""A small Vision Transformer, plain or with an L2P prompt pool.

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
:mod:`jaxcl.strategies.l2p`. A plain run's saved params
(:mod:`jaxcl.pretrained`) load into either model's ``backbone``.

References:
  Dosovitskiy et al., `An image is worth 16x16 words: transformers for
  image recognition at scale <https://arxiv.org/abs/2010.11929>`_, ICLR 2021.
  Wang et al., `Learning to prompt for continual learning
  <https://arxiv.org/abs/2112.08654>`_, CVPR 2022.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcl import checks
from jaxcl.models import init as inits
from jaxcl.models.classifier import Classifier, check_head, l2_normalise
from jaxcl.models.conv import Conv

__all__ = ["ViT", "L2PViT", "build", "select_prompts"]


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

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False,
               prompts: jnp.ndarray | None = None,
               tokens: bool = False) -> jnp.ndarray:
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
    """
    del train
    if x.ndim != 4:
      raise ValueError(f"ViT: expected images (B, H, W, C), got shape "
                       f"{x.shape}")
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
    xavier = nn.initializers.xavier_uniform()
    small = nn.initializers.normal(1e-6)  # the reference's MLP biases
    for i in range(self.depth):
      y = nn.LayerNorm(name=f"block_{i}_norm_attention")(z)
      y = nn.MultiHeadDotProductAttention(
          num_heads=self.heads, kernel_init=xavier,
          name=f"block_{i}_attention")(y, y)
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


def build(num_classes: int, num_heads: int = 1, *, patch: int = 7,
          dim: int = 64, depth: int = 4, heads: int = 4, mlp_dim: int = 128,
          pool_size: int = 0, prompt_length: int = 5, top_k: int = 5,
          init: str = "lecun_normal", head: str = "linear") -> Any:
  """Builds a ViT classifier, or with ``pool_size > 0`` an L2P model.

  Args:
    num_classes: outputs per head.
    num_heads: heads (plain ViT only; L2P has one head over all classes).
    patch: patch side (divides the image's sides: 7 or 4 on 28x28, 4 or 8
      on 32x32).
    dim: token width (a multiple of ``heads``).
    depth: transformer blocks.
    heads: attention heads.
    mlp_dim: hidden width of each block's MLP.
    pool_size: ``M``, prompts in the pool; 0 for a plain ViT.
    prompt_length: ``L``, tokens per prompt.
    top_k: ``N``, prompts chosen per image (at most ``pool_size``).
    init: the plain ViT head's initialisation (:data:`jaxcl.models.init.
      INITS`); the L2P head's kernel starts at zero.
    head: the plain ViT's head layer (``linear`` | ``cosine``).

  Raises:
    ValueError: a size that is not a whole number >= 1, ``dim`` not a
      multiple of ``heads``, ``top_k > pool_size``, or an L2P model asked
      for several heads or a cosine head.
  """
  for name, v in (("patch", patch), ("dim", dim), ("depth", depth),
                  ("heads", heads), ("mlp_dim", mlp_dim)):
    checks.whole(f"vit: {name}", v, 1)
  if dim % heads:
    raise ValueError(f"vit: dim={dim} is not a multiple of heads={heads}")
  checks.whole("vit: pool_size", pool_size, note="0: no prompt pool")
  backbone = ViT(patch=patch, dim=dim, depth=depth, heads=heads,
                 mlp_dim=mlp_dim)
  if pool_size == 0:
    return Classifier(backbone=backbone, num_classes=num_classes,
                      num_heads=num_heads, initializer=inits.check(init),
                      head=check_head(head))
  checks.whole("vit: prompt_length", prompt_length, 1)
  checks.whole("vit: top_k", top_k, 1)
  if top_k > pool_size:
    raise ValueError(f"vit: top_k={top_k} prompts per image from a pool of "
                     f"pool_size={pool_size}; use top_k <= pool_size")
  if num_heads != 1:
    raise ValueError(f"vit with a prompt pool (L2P) has one head over all "
                     f"classes, got num_heads={num_heads}; set "
                     "model.multi_head=False (task-incremental streams mask "
                     "the logits to the task)")
  if head != "linear":
    raise ValueError(f"vit with a prompt pool (L2P) has a linear head, got "
                     f"head={head!r}")
  return L2PViT(backbone=backbone, num_classes=num_classes,
                pool_size=pool_size, prompt_length=prompt_length,
                top_k=top_k)
