"""A ViT forward written out from the parameters, for the prompt tests.

Patches by reshaping, pre-LN blocks, flax's attention layout (``query``,
``key``, ``value`` kernels ``(D, H, D/H)``, ``out`` ``(H, D/H, D)``),
the tanh GELU and LayerNorm epsilon 1e-6, as google-research's ViT.
L2P's prompts go *first*, before the CLS token, with no position
embedding (google-research/l2p's order); CODA-Prompt's prefixes are
prepended to a block's projected keys and values, not projected (the
authors' ``Attention``).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnums=(0, 1))
def _init(model, shape, key):
  return model.init(key, jnp.zeros(shape))["params"]


def random_params(model, shape, seed=0):
  """Random parameters of ``model`` for an input of ``shape``: the tree's
  structure from a trace of its init (``jax.eval_shape``: nothing is
  compiled), the values drawn by NumPy (LayerNorm scales 1 + N(0, 0.01),
  biases N(0, 0.01), every other leaf N(0, 1/fan-in): nothing is 0, and
  no bias drowns the features). The prompt tests' checks that hold for
  any parameters (a forward against its reference, gradients' reach,
  shapes) use these: a compiled flax init of a ViT (one threefry program
  per weight) cost 2.5-4 s of compiling per model, the largest cost of
  those tests."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                             jnp.zeros(shape)))["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      v = 1.0 + 0.1 * rng.standard_normal(leaf.shape)
    elif name.endswith("['bias']"):
      v = 0.1 * rng.standard_normal(leaf.shape)
    else:
      fan_in = int(np.prod(leaf.shape[:-1])) or 1
      v = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
    return jnp.asarray(v, leaf.dtype)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def init(model, shape, seed=0):
  """``model``'s parameters for an input of ``shape``, as one compiled
  program cached per (model, shape): op by op, flax's initialisers compile
  every random op on its own, the largest cost of the prompt tests."""
  return _init(model, tuple(shape), jax.random.PRNGKey(seed))


def layer_norm(p, z, eps=1e-6):
  mu = z.mean(-1, keepdims=True)
  var = ((z - mu) ** 2).mean(-1, keepdims=True)
  return (z - mu) / jnp.sqrt(var + eps) * p["scale"] + p["bias"]


def attention(p, z, prefix=None):
  """Per head: softmax(q [pk; k]^T / sqrt(d_h)) [pv; v]."""
  q = jnp.einsum("btd,dhk->bthk", z, p["query"]["kernel"]) + p["query"]["bias"]
  k = jnp.einsum("btd,dhk->bthk", z, p["key"]["kernel"]) + p["key"]["bias"]
  v = jnp.einsum("btd,dhk->bthk", z, p["value"]["kernel"]) + p["value"]["bias"]
  if prefix is not None:
    b, h, hd = q.shape[0], q.shape[2], q.shape[3]
    k = jnp.concatenate([prefix[0].reshape(b, -1, h, hd), k], 1)
    v = jnp.concatenate([prefix[1].reshape(b, -1, h, hd), v], 1)
  w = jax.nn.softmax(jnp.einsum("bqhk,bshk->bhqs", q, k) /
                     np.sqrt(q.shape[-1]), axis=-1)
  o = jnp.einsum("bhqs,bshk->bqhk", w, v)
  return jnp.einsum("bqhk,hkd->bqd", o, p["out"]["kernel"]) + p["out"]["bias"]


def tokens(p, x, patch, depth, prompts=None, prefixes=None):
  """All output tokens after the final LayerNorm: ``[prompts,] cls,
  patches``; ``prefixes`` one ``(p_k, p_v)`` or None per block."""
  b, h, w, c = x.shape
  g = x.reshape(b, h // patch, patch, w // patch, patch, c)
  g = g.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, patch, patch, c)
  emb = jnp.einsum("bnijc,ijcd->bnd", g, p["embedding"]["kernel"]) + \
      p["embedding"]["bias"]
  z = jnp.concatenate([jnp.tile(p["cls"], (b, 1, 1)), emb], 1)
  z = z + p["pos_embedding"]
  if prompts is not None:
    z = jnp.concatenate([prompts, z], 1)
  for i in range(depth):
    pre = None if prefixes is None else prefixes[i]
    z = z + attention(p[f"block_{i}_attention"],
                      layer_norm(p[f"block_{i}_norm_attention"], z), pre)
    y = layer_norm(p[f"block_{i}_norm_mlp"], z)
    y = jax.nn.gelu(y @ p[f"block_{i}_mlp_in"]["kernel"] +
                    p[f"block_{i}_mlp_in"]["bias"], approximate=True)
    z = z + y @ p[f"block_{i}_mlp_out"]["kernel"] + \
        p[f"block_{i}_mlp_out"]["bias"]
  return layer_norm(p["norm"], z)


def assert_backbone_unchanged(before, after):
  """Every backbone weight of params ``after`` equals ``before``'s, bit
  for bit (the prompt methods' frozen ViT)."""
  for a, b in zip(jax.tree.leaves(before["backbone"]),
                  jax.tree.leaves(after["backbone"])):
    np.testing.assert_array_equal(a, b)


def assert_head_trained_under_mask(before, after, train_mask):
  """After the first experience (classes 0-1): the head's first two class
  columns moved; with ``train_mask`` no other column did, without it
  every one did (the prompt methods' masked cross-entropy)."""
  moved = np.abs(np.asarray(after["head"]["kernel"]) -
                 np.asarray(before["head"]["kernel"])).max(0)
  assert moved[:2].min() > 1e-3
  if train_mask:
    assert moved[2:].max() == 0.0
  else:
    assert moved[2:].min() > 1e-3
