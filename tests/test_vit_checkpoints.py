"""Tests of jaxcl.models.vit_checkpoints (public ViT .npz -> jaxcl ViT).

The checkpoints are synthetic, tiny, and spelt as the reference files are
(google-research/vision_transformer ``vit_jax/models_vit.py`` names with
pre-Linen numbering, the Linen numbering, big_vision's ``models/vit.py``
layout, scanned or not). The reference forward is written here in NumPy
from those names, not from the converter's table: a wrong name, transpose
or position convention changes the CLS feature.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import experiment, pretrained
from jaxcl.models import vit_checkpoints as vc
from jaxcl.models.vit import ViT

TINY = dict(patch=7, dim=16, depth=2, heads=2, mlp_dim=32)
# (attention norm, attention, MLP norm, MLP) inside a block.
PRE_LINEN = ("LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2",
             "MlpBlock_3")
LINEN = ("LayerNorm_0", "MultiHeadDotProductAttention_0", "LayerNorm_1",
         "MlpBlock_0")


def reference_checkpoint(seed=0, patch=7, dim=16, depth=2, heads=2,
                         mlp_dim=32, grid=4, channels=3, layout="vit_jax"):
  """A flat checkpoint dict as the reference repos store it.

  layout: ``vit_jax`` (pre-Linen block names, CLS slot in
  ``Transformer/posembed_input``), ``linen`` (Linen numbering), or
  ``big_vision`` (Linen numbering, top-level ``pos_embedding`` of the grid
  only, added before the CLS token).
  """
  rng = np.random.default_rng(seed)

  def w(*shape, scale=1.0):
    return (rng.normal(size=shape) * scale).astype(np.float32)

  hd = dim // heads
  names = PRE_LINEN if layout == "vit_jax" else LINEN
  ck = {"embedding/kernel": w(patch, patch, channels, dim,
                              scale=1 / math.sqrt(patch * patch * channels)),
        "embedding/bias": w(dim, scale=0.1),
        "cls": w(1, 1, dim, scale=0.5),
        "Transformer/encoder_norm/scale": 1 + w(dim, scale=0.2),
        "Transformer/encoder_norm/bias": w(dim, scale=0.1),
        "head/kernel": w(dim, 5), "head/bias": w(5),
        "pre_logits/kernel": w(dim, dim), "pre_logits/bias": w(dim)}
  if layout == "big_vision":
    ck["pos_embedding"] = w(1, grid * grid, dim, scale=0.5)
  else:
    ck["Transformer/posembed_input/pos_embedding"] = w(
        1, 1 + grid * grid, dim, scale=0.5)
  for i in range(depth):
    b = f"Transformer/encoderblock_{i}/"
    ln1, mha, ln2, mlp = (b + n for n in names)
    for ln in (ln1, ln2):
      ck[ln + "/scale"] = 1 + w(dim, scale=0.2)
      ck[ln + "/bias"] = w(dim, scale=0.1)
    for n in ("query", "key", "value"):
      ck[f"{mha}/{n}/kernel"] = w(dim, heads, hd, scale=1 / math.sqrt(dim))
      ck[f"{mha}/{n}/bias"] = w(heads, hd, scale=0.1)
    ck[f"{mha}/out/kernel"] = w(heads, hd, dim, scale=1 / math.sqrt(dim))
    ck[f"{mha}/out/bias"] = w(dim, scale=0.1)
    ck[f"{mlp}/Dense_0/kernel"] = w(dim, mlp_dim, scale=1 / math.sqrt(dim))
    ck[f"{mlp}/Dense_0/bias"] = w(mlp_dim, scale=0.1)
    ck[f"{mlp}/Dense_1/kernel"] = w(mlp_dim, dim,
                                    scale=1 / math.sqrt(mlp_dim))
    ck[f"{mlp}/Dense_1/bias"] = w(dim, scale=0.1)
  return ck


def scanned(ck, depth):
  """big_vision's scanned layout: the blocks stacked on a leading axis."""
  out = {k: v for k, v in ck.items() if "/encoderblock_" not in k}
  subs = {k.split("/", 2)[2] for k in ck if "/encoderblock_0/" in k}
  for s in subs:
    out["Transformer/encoderblock/" + s] = np.stack(
        [ck[f"Transformer/encoderblock_{i}/{s}"] for i in range(depth)])
  return out


# ---------------------------------------------------------------------------
# The reference forward (vit_jax/models_vit.py, big_vision/models/vit.py),
# in float64 NumPy from the checkpoint's own names.


def _ln(ck, name, z):
  mu = z.mean(-1, keepdims=True)
  var = ((z - mu) ** 2).mean(-1, keepdims=True)
  # flax.linen.LayerNorm's default epsilon.
  return (z - mu) / np.sqrt(var + 1e-6) * ck[name + "/scale"] + \
      ck[name + "/bias"]


def _gelu(x):
  # flax.linen.gelu = jax.nn.gelu(approximate=True): the tanh form.
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _softmax(a):
  e = np.exp(a - a.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def reference_cls(ck, x, depth, layout="vit_jax"):
  """The CLS feature of the reference ViT for images ``x`` (B, H, W, C)."""
  ck = {k: np.asarray(v, np.float64) for k, v in ck.items()}
  x = np.asarray(x, np.float64)
  kernel = ck["embedding/kernel"]                    # HWIO
  p = kernel.shape[0]
  b, h, w, c = x.shape
  g = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  emb = np.einsum("bxyijc,ijcd->bxyd", g, kernel) + ck["embedding/bias"]
  emb = emb.reshape(b, (h // p) * (w // p), -1)      # row-major grid
  cls = np.tile(ck["cls"], (b, 1, 1))
  if layout == "big_vision":    # posemb on the patches, then [cls; x]
    z = np.concatenate([cls, emb + ck["pos_embedding"]], 1)
  else:                         # [cls; x], then posemb
    z = np.concatenate([cls, emb], 1) + \
        ck["Transformer/posembed_input/pos_embedding"]
  ln1, mha, ln2, mlp = PRE_LINEN if layout == "vit_jax" else LINEN
  for i in range(depth):
    pre = f"Transformer/encoderblock_{i}/"
    y = _ln(ck, pre + ln1, z)
    a = pre + mha
    q = np.einsum("btd,dhk->bthk", y, ck[a + "/query/kernel"]) + \
        ck[a + "/query/bias"]
    k = np.einsum("btd,dhk->bthk", y, ck[a + "/key/kernel"]) + \
        ck[a + "/key/bias"]
    v = np.einsum("btd,dhk->bthk", y, ck[a + "/value/kernel"]) + \
        ck[a + "/value/bias"]
    att = _softmax(np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1]))
    o = np.einsum("bhqs,bshk->bqhk", att, v)
    z = z + np.einsum("bqhk,hkd->bqd", o, ck[a + "/out/kernel"]) + \
        ck[a + "/out/bias"]
    y = _ln(ck, pre + ln2, z)
    m = pre + mlp
    y = _gelu(y @ ck[m + "/Dense_0/kernel"] + ck[m + "/Dense_0/bias"])
    z = z + y @ ck[m + "/Dense_1/kernel"] + ck[m + "/Dense_1/bias"]
  return _ln(ck, "Transformer/encoder_norm", z)[:, 0]


def _images(n=3, side=28, channels=3, seed=1):
  return np.random.default_rng(seed).uniform(
      -1, 1, (n, side, side, channels)).astype(np.float32)


@functools.partial(jax.jit, static_argnums=(0,), static_argnames=("tokens",))
def _apply(model, params, x, tokens=False):
  """``model.apply({"params": params}, x)`` compiled once per model and
  shape (op by op, every operation of the forward compiles on its own)."""
  return model.apply({"params": params}, x, tokens=tokens)


def _leaves(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------------------
# Conversion = the reference forward.


@pytest.mark.parametrize("layout", ["vit_jax", "linen", "big_vision",
                                    "big_vision_scanned", "opt_target",
                                    "tiny_tokens"])
def test_converted_vit_equals_the_reference_forward(layout):
  """Also fixes the forward's conventions: the tolerance is below the
  effect of the exact-erf GELU (3e-4 here), and with ``tiny_tokens`` (first
  LayerNorm inputs of variance ~1e-6) a LayerNorm epsilon of 1e-5 instead
  of flax's 1e-6 moves the feature by ~1."""
  base = "big_vision" if layout.startswith("big_vision") else \
      "vit_jax" if layout in ("opt_target", "tiny_tokens") else layout
  ck = reference_checkpoint(seed=3, layout=base)
  if layout == "tiny_tokens":
    for k in ("embedding/kernel", "embedding/bias", "cls",
              "Transformer/posembed_input/pos_embedding"):
      ck[k] = ck[k] * 1e-3
  stored = ck
  if layout == "big_vision_scanned":
    stored = scanned(ck, TINY["depth"])
  if layout == "opt_target":   # a whole training state: params + optimizer
    stored = {"opt/target/" + k: v for k, v in ck.items()}
    stored["opt/state/step"] = np.asarray(7)
  params = vc.convert(stored)
  assert vc.architecture(params) == TINY
  model = ViT(**TINY)
  x = _images()
  # Same tree and shapes as the model's own initialisation.
  init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, 28, 28, 3))))
  want = {k: v.shape for k, v in _leaves(init["params"]).items()}
  assert {k: v.shape for k, v in _leaves(params).items()} == want
  ours = np.asarray(_apply(model, params, jnp.asarray(x)))
  ref = reference_cls(ck, x, TINY["depth"], base)
  assert np.abs(ref).max() > 0.5       # not a degenerate feature
  np.testing.assert_allclose(ours, ref, rtol=2e-5, atol=2e-6)
  # The dropped parts are not in the params.
  assert "head" not in params and "pre_logits" not in params


def test_big_vision_cls_slot_is_zero_and_vit_jax_keeps_its_own():
  bv = vc.convert(reference_checkpoint(layout="big_vision"))
  np.testing.assert_array_equal(bv["pos_embedding"][0, 0], 0.0)
  ck = reference_checkpoint(layout="vit_jax")
  vj = vc.convert(ck)
  np.testing.assert_array_equal(
      vj["pos_embedding"], ck["Transformer/posembed_input/pos_embedding"])
  # big_vision's old combined layout (h*w + 1 entries) has the slot.
  old = reference_checkpoint(layout="big_vision")
  old["pos_embedding"] = ck["Transformer/posembed_input/pos_embedding"]
  np.testing.assert_array_equal(vc.convert(old)["pos_embedding"],
                                old["pos_embedding"])


# ---------------------------------------------------------------------------
# Position embeddings at another resolution.


def _hand_bilinear(grid, out_h, out_w):
  """Corner-aligned bilinear resize of a (g, g, D) grid, by hand: output
  cell i of n reads input coordinate i (g - 1) / (n - 1)."""
  g = grid.shape[0]
  out = np.zeros((out_h, out_w, grid.shape[2]))
  for i in range(out_h):
    for j in range(out_w):
      y = i * (g - 1) / (out_h - 1)
      x = j * (g - 1) / (out_w - 1)
      y0, x0 = int(np.floor(y)), int(np.floor(x))
      y1, x1 = min(y0 + 1, g - 1), min(x0 + 1, g - 1)
      wy, wx = y - y0, x - x0
      out[i, j] = ((1 - wy) * (1 - wx) * grid[y0, x0] +
                   (1 - wy) * wx * grid[y0, x1] +
                   wy * (1 - wx) * grid[y1, x0] + wy * wx * grid[y1, x1])
  return out


@pytest.mark.parametrize("image_size, cells", [
    (14, (2, 2)), (21, (3, 3)), (35, (5, 5)), (56, (8, 8)), ((14, 35), (2, 5))])
@pytest.mark.parametrize("layout", ["vit_jax", "big_vision"])
def test_position_table_is_resized_bilinearly_keeping_the_cls_slot(
    image_size, cells, layout):
  ck = reference_checkpoint(layout=layout, grid=4)         # 28 / 7 = 4
  table = ck.get("Transformer/posembed_input/pos_embedding",
                 ck.get("pos_embedding"))[0]
  grid = (table[1:] if layout == "vit_jax" else table).reshape(4, 4, -1)
  got = vc.convert(ck, image_size=image_size)["pos_embedding"][0]
  assert got.shape == (1 + cells[0] * cells[1], 16)
  want = _hand_bilinear(grid.astype(np.float64), *cells)
  np.testing.assert_allclose(got[1:].reshape(*cells, 16), want, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(got[0], table[0] if layout == "vit_jax"
                                else 0.0)
  # The model takes the converted table at the new size (traced, not run:
  # a table of the wrong length fails in tracing, and only the shape is
  # checked).
  side = image_size if isinstance(image_size, int) else image_size
  hw = (side, side) if isinstance(side, int) else side
  params = vc.convert(ck, image_size=image_size)
  out = jax.eval_shape(lambda p: ViT(**TINY).apply(
      {"params": p}, jnp.zeros((1, hw[0], hw[1], 3)), tokens=True), params)
  assert out.shape == (1, 1 + cells[0] * cells[1], 16)


def test_same_grid_keeps_the_table():
  ck = reference_checkpoint()
  np.testing.assert_array_equal(
      vc.convert(ck, image_size=28)["pos_embedding"],
      ck["Transformer/posembed_input/pos_embedding"])


# ---------------------------------------------------------------------------
# Errors.


def _drop(key):
  def f(ck):
    del ck[key]
  return f


def _set(key, value):
  def f(ck):
    ck[key] = value
  return f


def _drop_prefix(prefix):
  def f(ck):
    for k in [k for k in ck if k.startswith(prefix)]:
      del ck[k]
  return f


B1 = "Transformer/encoderblock_1/"


@pytest.mark.parametrize("mutate, match", [
    (_drop(B1 + "LayerNorm_2/scale"),
     r"lacks 'Transformer/encoderblock_1/LayerNorm_2/scale'"),
    (_drop(B1 + "MultiHeadDotProductAttention_1/value/bias"),
     r"lacks 'Transformer/encoderblock_1/MultiHeadDotProductAttention_1/"
     r"value/bias'"),
    (_drop("Transformer/encoder_norm/bias"),
     r"lacks 'Transformer/encoder_norm/bias'"),
    (_set(B1 + "LayerNorm_4/scale", np.ones(16, np.float32)),
     r"'Transformer/encoderblock_1/LayerNorm_4/scale' \(read as "
     r"'LayerNorm_2/scale'.*no known role; allowed: embedding"),
    (_set("conv_root/kernel", np.ones((7, 7, 3, 64), np.float32)),
     r"keys of no known role: \['conv_root/kernel'\]; allowed:"),
    (_set(B1 + "MultiHeadDotProductAttention_1/query/kernel",
          np.ones((16, 4, 4), np.float32)),
     r"'Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/"
     r"kernel' has shape \(16, 4, 4\), expected \(16, 2, 8\) \(sizes read "
     r"from embedding/kernel and block 0: patch=7, channels=3, dim=16, "
     r"heads=2, mlp_dim=32\)"),
    (_set(B1 + "MlpBlock_3/Dense_1/bias", np.ones(32, np.float32)),
     r"'Transformer/encoderblock_1/MlpBlock_3/Dense_1/bias' has shape "
     r"\(32,\), expected \(16,\)"),
    (_set("cls", np.ones((1, 2, 16), np.float32)),
     r"'cls' has shape \(1, 2, 16\), expected \(1, 1, 16\)"),
    (_set("embedding/kernel", np.ones((7, 5, 3, 16), np.float32)),
     r"'embedding/kernel' has shape \(7, 5, 3, 16\); expected a square HWIO"),
    (_set("Transformer/posembed_input/pos_embedding",
          np.ones((1, 16, 16), np.float32)),
     r"15 grid positions are not a square grid"),
    (_drop("cls"), r"no 'cls' token.*'gap' or 'map'"),
    (_drop("Transformer/posembed_input/pos_embedding"),
     r"lacks a learned position table"),
    (_drop_prefix("Transformer/encoderblock_0/"),
     r"lacks Transformer/encoderblock_0 \(it has blocks \[1\]\)"),
    (_drop_prefix("Transformer/"), r"no transformer blocks"),
    (_set(B1 + "LayerNorm_0/bias", np.ones(16, np.int32)),
     r"'Transformer/encoderblock_1/LayerNorm_0/bias' has dtype int32"),
])
def test_bad_checkpoints_are_refused_by_name(mutate, match):
  ck = reference_checkpoint()
  mutate(ck)
  with pytest.raises(ValueError, match=match):
    vc.convert(ck)


def test_bad_image_size_and_file(tmp_path):
  ck = reference_checkpoint()
  with pytest.raises(ValueError, match=r"image_size=30 is not a multiple "
                     r"of the checkpoint's patch=7; use a multiple \(e.g. 28"):
    vc.convert(ck, image_size=30)
  with pytest.raises(ValueError, match=r"image_size must be an int"):
    vc.convert(ck, image_size=(28, 28, 3))
  with pytest.raises(ValueError, match="does not exist"):
    vc.load(str(tmp_path / "none.npz"))
  with pytest.raises(ValueError, match="num_classes"):
    vc.save(str(tmp_path / "x.npz"), vc.convert(ck), num_classes=-1)


# ---------------------------------------------------------------------------
# The jaxcl file: command line, l2p(pretrained=...), model.pretrained.

DIGITS_VIT = dict(patch=4, dim=16, depth=2, heads=2, mlp_dim=32)


def _digits_checkpoint(tmp_path):
  """A 1-channel checkpoint on a 4x4 grid (16px), written as .npz."""
  ck = reference_checkpoint(seed=9, patch=4, grid=4, channels=1)
  path = str(tmp_path / "ViT-tiny.npz")
  np.savez(path, **ck)
  return ck, path


def test_command_line_writes_a_jaxcl_pretrained_file(tmp_path, capsys):
  ck, src = _digits_checkpoint(tmp_path)
  out = str(tmp_path / "jaxcl_vit.npz")
  vc.main([src, out, "--image-size", "8", "--num-classes", "10"])
  printed = capsys.readouterr().out
  assert "4 patches + CLS" in printed
  assert repr(DIGITS_VIT) in printed
  flat = pretrained.load(out)
  want = vc.convert(ck, image_size=8)
  assert set(flat) == {"backbone/" + k for k in _leaves(want)} | \
      {"head/kernel", "head/bias"}
  for k, v in _leaves(want).items():
    np.testing.assert_array_equal(flat["backbone/" + k], v)
  assert flat["head/kernel"].shape == (16, 10)
  assert not flat["head/kernel"].any() and not flat["head/bias"].any()
  # (height, width) and no head.
  vc.main([src, str(tmp_path / "b.npz"), "--image-size", "8", "12"])
  flat = pretrained.load(str(tmp_path / "b.npz"))
  assert flat["backbone/pos_embedding"].shape == (1, 1 + 2 * 3, 16)
  assert not any(k.startswith("head") for k in flat)


def _digits_config(**vit):
  c = jaxcl.default_config()   # Split Digits (8x8x1), 5 experiences
  c.model.name = "vit"
  c.model.vit = dict(DIGITS_VIT, **vit)
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 3e-3
  c.report.progress = False
  return c


def test_l2p_and_a_plain_vit_start_from_the_converted_file(tmp_path):
  ck, src = _digits_checkpoint(tmp_path)
  out = str(tmp_path / "jaxcl_vit.npz")
  vc.main([src, out, "--image-size", "8", "--num-classes", "10"])
  want = _leaves(vc.convert(ck, image_size=8))
  # L2P loads the backbone as the first experience starts (that it then
  # stays frozen through training is test_l2p.py's
  # test_pretrained_backbone_is_loaded_and_kept, with a file of the same
  # format).
  c = _digits_config(pool_size=10, prompt_length=5, top_k=5)
  c.strategy.name = "l2p"
  c.strategy.l2p = dict(pretrained=out)
  c.scenario.n_experiences = 2
  s = experiment.setup(c)
  ctx, strategy = s.learner.ctx, s.learner.strategy
  state = experiment.initial_state(s, c.seed)
  assert not bool(state.strategy.loaded)
  state = strategy.before_experience(ctx, state, s.scenario.experiences[0])
  got = _leaves(state.params["backbone"])
  kept = _leaves(state.strategy.backbone)   # restored after every update
  assert set(got) == set(want) == set(kept)
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), want[k])
    np.testing.assert_array_equal(np.asarray(kept[k]), want[k])
  assert bool(state.strategy.loaded)
  # A plain ViT starts from it through model.pretrained (zero head), and
  # its CLS feature is the reference's on the 8x8 grid.
  c = _digits_config()
  c.model.pretrained = out
  s = experiment.setup(c)
  state = experiment.initial_state(s, 0)
  got = _leaves(state.params["backbone"])
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), want[k])
  assert not np.asarray(state.params["head"]["kernel"]).any()
  ref_ck = dict(ck)
  ref_ck["Transformer/posembed_input/pos_embedding"] = want["pos_embedding"]
  x = _images(n=4, side=8, channels=1)
  feat = jax.jit(lambda p: s.learner.ctx.model.apply(
      {"params": p}, jnp.asarray(x), features=True))(state.params)
  np.testing.assert_allclose(np.asarray(feat), reference_cls(ref_ck, x, 2),
                             rtol=2e-5, atol=2e-6)
