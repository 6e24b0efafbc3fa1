"""Tests of the ViT backbone's own parts (jaxcl.models.vit, no prompts) and
of the checkpoint converter's contracts (jaxcl.models.vit_checkpoints)
that tests/test_vit_checkpoints.py and tests/test_l2p.py leave open.

Expected values are written out here in NumPy from the equations:
multi-head self-attention per head (Vaswani et al. 2017, eq. 1 and
Sec. 3.2.2: ``softmax(Q_h K_h^T / sqrt(d_h)) V_h``, heads concatenated,
then ``W^O``), the ViT initialisation of google-research's
``vit_jax/models_vit.py`` (zero CLS token, ``N(0, 0.02)`` position table,
Xavier-uniform attention and MLP kernels, ``N(0, 1e-6)`` MLP biases),
and corner-aligned bilinear resizing by hand.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import models, pretrained
from jaxcl.models import vit_checkpoints as vc
from jaxcl.models.vit import PrefixAttention, ViT

import vit_reference
from conftest import np_softmax
from test_vit_checkpoints import (TINY, _images, _leaves, reference_checkpoint,
                                  reference_cls, scanned)

SMALL = dict(patch=4, dim=16, depth=2, heads=2, mlp_dim=32)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("train",))
def _apply(model, params, x, train=False):
  return model.apply({"params": params}, x, train=train)


# ---------------------------------------------------------------------------
# Multi-head self-attention, by hand.


def _np_mhsa(p, x, heads):
  """Vaswani et al.'s multi-head attention, one head at a time, float64."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  b, t, d = x.shape
  hd = d // heads
  wq = p["query"]["kernel"].reshape(d, heads * hd)
  wk = p["key"]["kernel"].reshape(d, heads * hd)
  wv = p["value"]["kernel"].reshape(d, heads * hd)
  bq = p["query"]["bias"].reshape(-1)
  bk = p["key"]["bias"].reshape(-1)
  bv = p["value"]["bias"].reshape(-1)
  wo = p["out"]["kernel"].reshape(heads * hd, d)
  out = np.zeros((b, t, d))
  for n in range(b):
    q, k, v = x[n] @ wq + bq, x[n] @ wk + bk, x[n] @ wv + bv
    heads_out = []
    for h in range(heads):
      s = slice(h * hd, (h + 1) * hd)
      a = np_softmax(q[:, s] @ k[:, s].T / math.sqrt(hd))   # rows: queries
      heads_out.append(a @ v[:, s])
    out[n] = np.concatenate(heads_out, 1) @ wo + p["out"]["bias"]
  return out


@pytest.mark.parametrize("heads", [1, 4])
def test_attention_is_per_head_scaled_dot_product_by_hand(heads):
  """Head split ``(dim) -> (heads, dim/heads)`` in order, keys scored
  against queries with ``1/sqrt(d_h)`` (not ``1/sqrt(dim)``), softmax over
  the keys, heads concatenated into ``out``. Random biases, so a bias
  dropped shows."""
  d, t = 16, 5
  m = PrefixAttention(heads=heads)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, t, d))
  p = m.init(jax.random.PRNGKey(1), x)["params"]
  keys = iter(jax.random.split(jax.random.PRNGKey(2), 16))
  # Scale the kernels up so the attention is far from uniform (the scale
  # matters), and give every bias a value.
  p = jax.tree_util.tree_map_with_path(
      lambda path, a: jax.random.normal(next(keys), a.shape)
      if path[-1].key == "bias" else 3.0 * a, p)
  got = jax.jit(lambda p, x: m.apply({"params": p}, x))(p, x)
  want = _np_mhsa(p, x, heads)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-5)


# ---------------------------------------------------------------------------
# Initialisation (vit_jax/models_vit.py's).


def test_initialisation_is_the_reference_vits():
  dim, mlp_dim = 32, 64
  m = ViT(patch=2, dim=dim, depth=1, heads=4, mlp_dim=mlp_dim)
  p = vit_reference.init(m, (1, 28, 28, 1), seed=5)
  np.testing.assert_array_equal(p["cls"], 0.0)              # zeros
  pos = np.asarray(p["pos_embedding"])
  assert pos.shape == (1, 1 + 14 * 14, dim)
  assert abs(pos.std() - 0.02) < 0.002 and abs(pos.mean()) < 0.002

  def xavier_uniform(kernel, fan_in, fan_out):
    k = np.asarray(kernel)
    limit = math.sqrt(6 / (fan_in + fan_out))
    assert np.abs(k).max() <= limit
    assert np.abs(k).max() > 0.95 * limit
    # Uniform: std limit / sqrt(3), and a flat histogram (a third of the
    # values within limit / 3 of zero; a normal has ~0.26 of its values
    # within std * 0.577).
    assert abs(k.std() - limit / math.sqrt(3)) < 0.1 * limit / math.sqrt(3)
    frac = (np.abs(k) < limit / 3).mean()
    assert abs(frac - 1 / 3) < 0.05, frac

  a = p["block_0_attention"]
  for n in ("query", "key", "value"):
    xavier_uniform(a[n]["kernel"], dim, dim)
    np.testing.assert_array_equal(a[n]["bias"], 0.0)
  xavier_uniform(a["out"]["kernel"], dim, dim)
  np.testing.assert_array_equal(a["out"]["bias"], 0.0)
  xavier_uniform(p["block_0_mlp_in"]["kernel"], dim, mlp_dim)
  xavier_uniform(p["block_0_mlp_out"]["kernel"], mlp_dim, dim)
  for n in ("block_0_mlp_in", "block_0_mlp_out"):
    bias = np.asarray(p[n]["bias"])
    assert np.all(bias != 0.0)                     # N(0, 1e-6), not zeros
    assert 0.5e-6 < bias.std() < 2e-6
  for n in ("block_0_norm_attention", "block_0_norm_mlp", "norm"):
    np.testing.assert_array_equal(p[n]["scale"], 1.0)
    np.testing.assert_array_equal(p[n]["bias"], 0.0)


# ---------------------------------------------------------------------------
# The forward's contracts.


def test_no_dropout_train_changes_nothing():
  m = ViT(**SMALL)
  p = vit_reference.init(m, (1, 8, 8, 1))
  x = jax.random.normal(jax.random.PRNGKey(1), (3, 8, 8, 1))
  np.testing.assert_array_equal(_apply(m, p, x, train=True),
                                _apply(m, p, x, train=False))


def test_bad_images_are_refused():
  m = ViT(patch=7, dim=8, depth=1, heads=2, mlp_dim=8)
  # The width is checked as well as the height (a VALID convolution would
  # silently drop the last columns).
  with pytest.raises(ValueError, match=r"patch=7 does not divide the "
                     r"28x30 image"):
    m.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 30, 1)))
  with pytest.raises(ValueError, match=r"patch=7 does not divide the "
                     r"30x28 image"):
    m.init(jax.random.PRNGKey(0), jnp.zeros((1, 30, 28, 1)))
  with pytest.raises(ValueError, match=r"expected images \(B, H, W, C\), "
                     r"got shape \(28, 28, 1\)"):
    m.init(jax.random.PRNGKey(0), jnp.zeros((28, 28, 1)))


def test_input_size_resizes_both_sides_of_non_square_images():
  """A 16x8 batch meets ``input_size=16`` as a 16x16 bilinear resize (the
  width too), i.e. the plain model on the resized images."""
  big = ViT(input_size=16, **SMALL)
  plain = ViT(**SMALL)
  p = vit_reference.init(big, (1, 16, 16, 1))
  x = jax.random.uniform(jax.random.PRNGKey(3), (2, 16, 8, 1))
  # By hand: rows kept, columns upsampled 8 -> 16 (half-pixel centres, as
  # jax.image.resize and tf.image.resize: output j reads (j + .5) / 2 - .5,
  # clamped at the edges).
  xs = np.asarray(x, np.float64)
  up = np.zeros((2, 16, 16, 1))
  for j in range(16):
    c = min(max((j + 0.5) / 2 - 0.5, 0.0), 7.0)
    j0 = int(np.floor(c))
    j1 = min(j0 + 1, 7)
    up[:, :, j] = (1 - (c - j0)) * xs[:, :, j0] + (c - j0) * xs[:, :, j1]
  np.testing.assert_allclose(
      _apply(big, p, x), _apply(plain, p, jnp.asarray(up, jnp.float32)),
      rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------
# build's arguments.


@pytest.mark.parametrize("kwargs, match", [
    (dict(mlp_dim=0), "mlp_dim must be an int >= 1"),
    (dict(heads=0), "heads must be an int >= 1"),
    (dict(dim=0), "dim must be an int >= 1"),
    (dict(patch=0), "patch must be an int >= 1"),
    (dict(dim=12, heads=8), "dim=12 is not a multiple of heads=8"),
    (dict(patch=4, input_size=30), "patch=4 does not divide input_size=30"),
    (dict(input_size=2.5), "input_size must be an int >= 0"),
    (dict(prompt="vpt", pool_size=3), "unknown prompt='vpt'"),
])
def test_build_refuses_bad_sizes(kwargs, match):
  with pytest.raises(ValueError, match=match):
    models.build("vit", 10, **kwargs)


def test_build_passes_every_size_to_the_backbone_and_head():
  m = models.build("vit", 7, 3, patch=4, dim=24, depth=3, heads=6,
                   mlp_dim=40, input_size=16, init="xavier_uniform",
                   head="cosine")
  b = m.backbone
  assert (b.patch, b.dim, b.depth, b.heads, b.mlp_dim, b.input_size) == \
      (4, 24, 3, 6, 40, 16)
  assert (m.num_classes, m.num_heads, m.initializer, m.head) == \
      (7, 3, "xavier_uniform", "cosine")
  # The params have those sizes.
  p = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0),
                                    jnp.zeros((1, 8, 8, 1)),
                                    jnp.zeros((1,), jnp.int32)))["params"]
  bb = p["backbone"]
  assert bb["pos_embedding"].shape == (1, 1 + 16, 24)
  assert bb["block_2_attention"]["query"]["kernel"].shape == (24, 6, 4)
  assert bb["block_2_mlp_in"]["kernel"].shape == (24, 40)
  assert "block_3_attention" not in bb


# ---------------------------------------------------------------------------
# The converter's contracts.


def test_params_prefix_of_a_training_state_is_stripped():
  ck = reference_checkpoint(seed=4)
  stored = {"params/" + k: v for k, v in ck.items()}
  stored["opt/state/step"] = np.asarray(3)
  got = _leaves(vc.convert(stored))
  want = _leaves(vc.convert(ck))
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_transformer_pos_embedding_of_the_grid_gets_a_zero_cls_slot():
  """big_vision's table under ``Transformer/`` (grid only, added before
  the CLS token): the forward is big_vision's."""
  ck = reference_checkpoint(seed=5, layout="big_vision")
  stored = dict(ck)
  stored["Transformer/pos_embedding"] = stored.pop("pos_embedding")
  params = vc.convert(stored)
  np.testing.assert_array_equal(params["pos_embedding"][0, 0], 0.0)
  np.testing.assert_array_equal(params["pos_embedding"][0, 1:],
                                ck["pos_embedding"][0])
  x = _images(n=2, seed=6)
  got = _apply(ViT(**TINY), params, jnp.asarray(x))
  np.testing.assert_allclose(got, reference_cls(ck, x, 2, "big_vision"),
                             rtol=2e-5, atol=2e-6)


def test_more_converter_refusals():
  ck = reference_checkpoint()
  two = dict(ck, pos_embedding=ck["Transformer/posembed_input/pos_embedding"])
  with pytest.raises(ValueError, match="two position tables"):
    vc.convert(two)
  with pytest.raises(ValueError, match=r"image_size=\(28, 30\) is not a "
                     r"multiple of the checkpoint's patch=7"):
    vc.convert(ck, image_size=(28, 30))
  # 28.0, True and "28" raised a TypeError from tuple() before session 43.
  for bad in (0, (28, 0), (28, -7), 28.0, True, "28"):
    with pytest.raises(ValueError, match=r"image_size must be an int or "
                       r"\(height, width\) of ints >= 1"):
      vc.convert(ck, image_size=bad)
  pos = "Transformer/posembed_input/pos_embedding"
  with pytest.raises(ValueError, match=rf"'{pos}' has shape \(1, 17, 8\), "
                     r"expected \(1, tokens, 16\)"):
    vc.convert(dict(ck, **{pos: np.ones((1, 17, 8), np.float32)}))
  b0 = "Transformer/encoderblock_0/MultiHeadDotProductAttention_1/"
  with pytest.raises(ValueError, match=r"'Transformer/encoderblock_0/"
                     r"MultiHeadDotProductAttention_1/query/kernel' has shape "
                     r"\(16, 2, 4\); expected \(dim, heads, dim / heads\)"):
    vc.convert(dict(ck, **{b0 + "query/kernel":
                           np.ones((16, 2, 4), np.float32)}))
  b1 = "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/"
  with pytest.raises(ValueError, match=r"out/bias' has shape \(2, 8\), "
                     r"expected \(16,\)"):
    vc.convert(dict(ck, **{b1 + "out/bias": np.ones((2, 8), np.float32)}))
  # A leaf with the name of a module (LayerNorm_0 both an array and a
  # module) has no role; it is refused, not skipped.
  with pytest.raises(ValueError, match=r"'Transformer/encoderblock_1/"
                     r"LayerNorm_0' .*no known role"):
    vc.convert(dict(ck, **{"Transformer/encoderblock_1/LayerNorm_0":
                           np.ones(16, np.float32)}))
  # Scanned blocks that disagree on the depth.
  sc = scanned(ck, 2)
  k = "Transformer/encoderblock/MlpBlock_3/Dense_0/bias"
  sc[k] = np.concatenate([sc[k], sc[k][:1]])
  with pytest.raises(ValueError, match=r"must share the leading depth axis"):
    vc.convert(sc)


def test_block_submodules_are_renumbered_in_numeric_order():
  """Per class in numeric order, as flax's convert_pre_linen: a block whose
  norms are ``LayerNorm_2`` and ``LayerNorm_10`` reads ``LayerNorm_2`` as
  the attention's norm (string order would put ``_10`` first)."""
  ck = reference_checkpoint(seed=7)
  renamed = {}
  for k, v in ck.items():
    k = k.replace("/LayerNorm_2/", "/LayerNorm_10/")
    k = k.replace("/LayerNorm_0/", "/LayerNorm_2/")
    renamed[k] = v
  got, want = _leaves(vc.convert(renamed)), _leaves(vc.convert(ck))
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])


def test_command_line_height_and_width_in_order(tmp_path):
  """``--image-size H W``: H rows of patches, W columns (a 2x3 table is
  not a 3x2 one)."""
  ck = reference_checkpoint(seed=9, patch=4, grid=4, channels=1)
  src = str(tmp_path / "ck.npz")
  np.savez(src, **ck)
  vc.main([src, str(tmp_path / "out.npz"), "--image-size", "8", "12"])
  got = pretrained.load(str(tmp_path / "out.npz"))["backbone/pos_embedding"]
  table = ck["Transformer/posembed_input/pos_embedding"][0]
  grid = table[1:].reshape(4, 4, -1).astype(np.float64)
  # Corner-aligned bilinear by hand: rows 0 and 3 of 4 -> 2 rows; columns
  # 0, 1.5, 3 -> 3 columns.
  want = np.stack([np.stack([grid[r, 0], (grid[r, 1] + grid[r, 2]) / 2,
                             grid[r, 3]]) for r in (0, 3)])
  np.testing.assert_allclose(got[0, 1:].reshape(2, 3, -1), want, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(got[0, 0], table[0])
