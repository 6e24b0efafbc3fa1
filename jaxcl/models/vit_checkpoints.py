"""Public ViT checkpoints (vision_transformer, big_vision) as jaxcl ViT params.

Prompt methods (L2P, :mod:`jaxcl.strategies.l2p`) are meant to run on an
ImageNet-pretrained ViT-B/16. Google publishes those as flat ``.npz`` files
keyed by ``/``-joined flax paths; this module converts one into the params
of :class:`jaxcl.models.vit.ViT` (the ``backbone`` of ``model.name='vit'``)
and writes them as a :mod:`jaxcl.pretrained` file::

  python -m jaxcl.models.vit_checkpoints ViT-B_16.npz vitb16_224px.npz --image-size 224

and runs it with ``model.vit.input_size=224`` (each batch resized inside
the step, so 32-px CIFAR meets the 14x14 grid the weights learned;
``--image-size 32`` with no resize would leave a 2x2 grid). (``--num-classes N`` adds a zero head, so a plain ``vit`` run can start
from the file with ``model.pretrained``; ``strategy.l2p.pretrained`` reads
the ``backbone/...`` entries only.) The command prints the ``model.vit``
sizes the file needs (ViT-B/16: ``patch=16, dim=768, depth=12, heads=12,
mlp_dim=3072``).

Getting the weights (needs a network; the URLs are quoted from the
reference READMEs and code, not checked from this offline machine):

* google-research/l2p's README: "ViT-B/16 model used in this paper can be
  downloaded at https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz".
* google-research/vision_transformer: ``wget
  https://storage.googleapis.com/vit_models/imagenet21k/ViT-B_16.npz``;
  the AugReg checkpoints are ``gs://vit_models/augreg/{filename}.npz``
  (``vit_jax/checkpoint.py``), e.g. big_vision's ``howto-i21k-B/16``:
  ``gs://vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz``
  (``https://storage.googleapis.com/vit_models/augreg/...`` over HTTP).

Layouts read (names checked against ``vit_jax/models_vit.py`` and
``vit_jax/checkpoint.py`` of google-research/vision_transformer, and
``big_vision/models/vit.py``):

================================================  =============================
checkpoint key                                    jaxcl ``ViT`` param
================================================  =============================
``embedding/{kernel,bias}`` (kernel HWIO)         ``embedding/...``
``cls`` ``(1, 1, D)``                             ``cls``
``Transformer/posembed_input/pos_embedding``      ``pos_embedding``
``Transformer/encoderblock_i/LayerNorm_0``        ``block_i_norm_attention``
``.../MultiHeadDotProductAttention_1/...``        ``block_i_attention/...``
``.../LayerNorm_2``                               ``block_i_norm_mlp``
``.../MlpBlock_3/Dense_0``, ``Dense_1``           ``block_i_mlp_in``, ``_out``
``Transformer/encoder_norm``                      ``norm``
``head/...``, ``pre_logits/...``                  dropped
================================================  =============================

* Submodule numbers inside a block are the pre-Linen ones of the released
  files (one counter for all classes: ``LayerNorm_0``,
  ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``).
  They are renumbered per class in numeric order, as flax's
  ``convert_pre_linen`` (which ``vit_jax/checkpoint.py::load`` applies)
  does, so Linen-era files (``LayerNorm_1``, ``MlpBlock_0``, ...) read the
  same.
* big_vision layout: ``pos_embedding`` at the top level (or under
  ``Transformer``), added to the patches *before* the CLS token is
  concatenated; ``N = h*w`` entries. Our ViT adds a ``(1, 1+N, D)`` table
  after concatenating, so the CLS slot is written as zeros (the same
  function). A table of ``h*w + 1`` entries is the old combined layout
  (big_vision's ``fix_old_checkpoints``) and is read as ours. Scanned
  files (``Transformer/encoderblock/...`` with a leading depth axis) are
  unstacked. Prefixes ``params/`` and ``opt/target/`` (whole training
  states) are stripped, and the rest of such a file is ignored.
* Not readable: checkpoints without a CLS token (big_vision's default
  ``pool_type='gap'`` or ``'map'``, vit_jax ``classifier='gap'``): our ViT's
  feature is the CLS token, and adding one would change every token's
  attention; ``posemb='sincos2d'`` (no stored table); hybrid ResNet+ViT
  (``conv_root``, ...); non-square patches.
* The head is dropped (the jaxcl head is trained); so is ``pre_logits``
  (the ``representation_size`` layer of the 2020 ImageNet-21k files), as
  ``vit_jax/checkpoint.py::load_pretrained`` drops it for fine-tuning and
  google-research/l2p's ``ViT-B_16`` config has none
  (``representation_size = None``): the feature, and L2P's query, is the
  final LayerNorm's CLS token, not ``tanh(pre_logits(.))``.
* Another resolution: the grid part of the position table is resized
  bilinearly with ``scipy.ndimage.zoom(order=1)`` (corner-aligned), as
  ``vit_jax/checkpoint.py::interpolate_posembed`` and big_vision's
  ``resample_posemb`` do; the CLS slot is kept. The patch size is the
  checkpoint's (patch embeddings are not resampled).

The forward pass of :class:`jaxcl.models.vit.ViT` is the reference's
(``vit_jax/models_vit.py``, dropout off): flax ``LayerNorm`` (epsilon
1e-6), flax ``MultiHeadDotProductAttention`` (queries scaled by
``1/sqrt(head_dim)``), ``nn.gelu`` (tanh approximation, flax's default; the
PyTorch ports use the exact erf), an HWIO convolution whose output grid is
flattened row-major, ``[cls; patches]`` then ``+ pos_embedding``, and the
CLS token of the final LayerNorm (``tests/test_vit_checkpoints.py`` checks
this against a NumPy forward of the reference's names).

Inputs: vision_transformer trains and fine-tunes on pixels in ``[-1, 1]``
(``vit_jax/input_pipeline.py``: ``(im - 127.5) / 127.5``; in jaxcl
``dataset.normalize=(0.5, 0.5)``); google-research/l2p's CIFAR-100 config
sets ``norm_01 = True`` (pixels in ``[0, 1]``, jaxcl's default).

References:
  Dosovitskiy et al., `An image is worth 16x16 words: transformers for
  image recognition at scale <https://arxiv.org/abs/2010.11929>`_, ICLR 2021.
  Steiner et al., `How to train your ViT? Data, augmentation, and
  regularization in vision transformers <https://arxiv.org/abs/2106.10270>`_,
  TMLR 2022 (the AugReg checkpoints).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any, Mapping, Sequence

import numpy as np
import scipy.ndimage

from jaxcl import checks
from jaxcl import pretrained as pretrained_lib

__all__ = ["load", "convert", "architecture", "resize_posemb", "save",
           "main"]

# Whole training states store the params under one of these.
_PREFIXES = ("params/", "opt/target/")
_DROPPED = ("head/", "pre_logits/")
_TOP = {
    "embedding/kernel": "embedding/kernel",
    "embedding/bias": "embedding/bias",
    "cls": "cls",
    "Transformer/encoder_norm/scale": "norm/scale",
    "Transformer/encoder_norm/bias": "norm/bias",
}
# Position tables: (key, has a CLS slot: True / None = decide by the shape).
_POSEMB = (("Transformer/posembed_input/pos_embedding", True),
           ("Transformer/pos_embedding", None),
           ("pos_embedding", None))
# Inside encoderblock_i, after per-class renumbering.
_BLOCK = {"LayerNorm_0": "norm_attention",
          "MultiHeadDotProductAttention_0": "attention",
          "LayerNorm_1": "norm_mlp",
          "MlpBlock_0/Dense_0": "mlp_in",
          "MlpBlock_0/Dense_1": "mlp_out"}
_LEAVES = {"norm_attention": ("scale", "bias"), "norm_mlp": ("scale", "bias"),
           "attention": tuple(f"{m}/{p}" for m in ("query", "key", "value",
                                                   "out")
                              for p in ("kernel", "bias")),
           "mlp_in": ("kernel", "bias"), "mlp_out": ("kernel", "bias")}
_NUMBERED = re.compile(r"^(.*)_(\d+)$")
_BLOCK_KEY = re.compile(r"^Transformer/encoderblock_(\d+)/(.+)$")

ALLOWED = (
    "embedding/{kernel,bias}, cls, Transformer/posembed_input/pos_embedding "
    "(or pos_embedding / Transformer/pos_embedding, big_vision), "
    "Transformer/encoderblock_<i>/{LayerNorm_*, MultiHeadDotProductAttention_*"
    "/{query,key,value,out}/{kernel,bias}, MlpBlock_*/Dense_{0,1}/{kernel,"
    "bias}} (or scanned Transformer/encoderblock/...), "
    "Transformer/encoder_norm/{scale,bias}; head/... and pre_logits/... are "
    "dropped")


def _linen_names(sub: Sequence[str]) -> dict[str, str]:
  """``{old: new}`` for the paths ``sub`` inside one block: every
  ``Name_k`` component renumbered per class in numeric order (flax's
  ``convert_pre_linen``, applied at each level)."""
  out = {}

  def level(paths: list[str], prefix: str, new_prefix: str) -> None:
    heads: dict[str, list[str]] = {}
    for p in paths:
      head, _, rest = p.partition("/")
      heads.setdefault(head, []).append(rest)
    counts: dict[str, int] = {}
    numbered = sorted((h for h in heads if _NUMBERED.match(h)),
                      key=lambda h: (_NUMBERED.match(h).group(1),
                                     int(_NUMBERED.match(h).group(2))))
    names = {h: h for h in heads}
    for h in numbered:
      cls = _NUMBERED.match(h).group(1)
      names[h] = f"{cls}_{counts.get(cls, 0)}"
      counts[cls] = counts.get(cls, 0) + 1
    for h, rests in heads.items():
      if rests == [""]:
        out[prefix + h] = new_prefix + names[h]
      else:
        level([r for r in rests if r], prefix + h + "/",
              new_prefix + names[h] + "/")
        if "" in rests:  # a leaf and a module of the same name
          out[prefix + h] = new_prefix + names[h]

  level(list(sub), "", "")
  return out


def _is_square(n: int) -> bool:
  return n >= 1 and math.isqrt(n) ** 2 == n


def _grid_of(n: int, key: str, shape: tuple) -> int:
  if not _is_square(n):
    raise ValueError(f"checkpoint {key!r} has shape {shape}: {n} grid "
                     f"positions are not a square grid; only square "
                     "checkpoint grids can be read")
  return math.isqrt(n)


def _image_grid(image_size: Any, patch: int) -> tuple[int, int]:
  if checks.is_whole(image_size):
    sides = (image_size, image_size)
  elif isinstance(image_size, (tuple, list)):
    sides = tuple(image_size)
  else:  # a float, a bool, a string: refused below
    sides = ()
  if len(sides) != 2 or not all(checks.is_whole(s) and s >= 1
                                for s in sides):
    raise ValueError(f"image_size must be an int or (height, width) of "
                     f"ints >= 1, got {image_size!r}")
  if sides[0] % patch or sides[1] % patch:
    raise ValueError(f"image_size={image_size!r} is not a multiple of the "
                     f"checkpoint's patch={patch}; use a multiple (e.g. "
                     f"{max(1, round(sides[0] / patch)) * patch})")
  return sides[0] // patch, sides[1] // patch


def resize_posemb(grid_table: np.ndarray,
                  grid: tuple[int, int]) -> np.ndarray:
  """A ``(g*g, D)`` grid of position embeddings resized to ``grid``.

  Bilinear, corner-aligned: ``scipy.ndimage.zoom(order=1)`` on the
  ``(g, g, D)`` grid, the call of ``vit_jax/checkpoint.py``'s
  ``interpolate_posembed`` (extended to a rectangular target). Output
  position ``i`` of ``n`` reads input coordinate ``i (g - 1) / (n - 1)``.

  Returns:
    ``(grid[0] * grid[1], D)``.
  """
  g = math.isqrt(grid_table.shape[0])
  table = grid_table.reshape(g, g, -1)
  if (g, g) == tuple(grid):
    return grid_table
  zoom = (grid[0] / g, grid[1] / g, 1)
  out = scipy.ndimage.zoom(table, zoom, order=1)
  # zoom rounds the output size; a mismatch would be a silent misreading.
  assert out.shape[:2] == tuple(grid), (out.shape, grid)
  return out.reshape(grid[0] * grid[1], -1)


def _strip(flat: Mapping[str, Any]) -> dict[str, np.ndarray]:
  for p in _PREFIXES:
    if p + "embedding/kernel" in flat:
      return {k[len(p):]: v for k, v in flat.items() if k.startswith(p)}
  return dict(flat)


def _unscan(flat: dict[str, Any]) -> dict[str, Any]:
  """Scanned big_vision blocks (``Transformer/encoderblock/...``, leading
  depth axis) as ``encoderblock_i``."""
  scanned = {k: v for k, v in flat.items()
             if k.startswith("Transformer/encoderblock/")}
  if not scanned:
    return flat
  depths = {k: np.shape(v)[0] if np.ndim(v) else None
            for k, v in scanned.items()}
  depth = depths.get("Transformer/encoderblock/LayerNorm_0/scale")
  for k, d in depths.items():
    if depth is None or d != depth:
      raise ValueError(f"checkpoint {k!r} has shape {np.shape(scanned[k])}; "
                       f"a scanned block's arrays must share the leading "
                       f"depth axis of Transformer/encoderblock/LayerNorm_0/"
                       f"scale ({depth})")
  out = {k: v for k, v in flat.items() if k not in scanned}
  for k, v in scanned.items():
    rest = k[len("Transformer/encoderblock/"):]
    for i in range(depth):
      out[f"Transformer/encoderblock_{i}/{rest}"] = np.asarray(v)[i]
  return out


def _float32(key: str, value: Any) -> np.ndarray:
  a = np.asarray(value)
  if a.dtype.kind != "f":
    raise ValueError(f"checkpoint {key!r} has dtype {a.dtype}; expected "
                     "floating-point weights")
  return a.astype(np.float32)


def convert(flat: Mapping[str, Any],
            image_size: Any = None) -> dict[str, Any]:
  """The jaxcl :class:`~jaxcl.models.vit.ViT` params of a reference checkpoint.

  Args:
    flat: ``{key: array}`` as stored in the ``.npz`` (``/``-joined paths).
    image_size: the input side (or ``(height, width)``) the jaxcl model
      will see; the position table is resized to its grid of
      ``image_size / patch`` cells. ``None``: keep the checkpoint's grid.

  Returns:
    A nested dict of float32 NumPy arrays, the ``params`` of
    ``ViT(**architecture(params))`` (a ``vit`` model's ``backbone``).

  Raises:
    ValueError: a required key missing, a key of no known role, a shape
      that disagrees with the sizes read off ``embedding/kernel`` and the
      first block, no CLS token, or an ``image_size`` the patch does not
      divide; the message names the key and what is allowed.
  """
  flat = _unscan(_strip(flat))
  if not any(k.startswith("Transformer/encoderblock_") for k in flat):
    raise ValueError(f"checkpoint has no transformer blocks "
                     f"('Transformer/encoderblock_<i>/...'); its keys are "
                     f"{sorted(flat)[:20]}; expected: {ALLOWED}")
  out: dict[str, np.ndarray] = {}   # our flat key -> array
  source: dict[str, str] = {}       # our flat key -> checkpoint key
  unknown = []
  blocks: dict[int, list[str]] = {}
  pos = None
  for k in flat:
    m = _BLOCK_KEY.match(k)
    if k in _TOP:
      out[_TOP[k]], source[_TOP[k]] = _float32(k, flat[k]), k
    elif m:
      blocks.setdefault(int(m.group(1)), []).append(m.group(2))
    elif any(k == p for p, _ in _POSEMB):
      if pos is not None:
        raise ValueError(f"checkpoint has two position tables, {pos!r} and "
                         f"{k!r}")
      pos = k
    elif not k.startswith(_DROPPED):
      unknown.append(k)
  if unknown:
    raise ValueError(f"checkpoint keys of no known role: {sorted(unknown)}; "
                     f"allowed: {ALLOWED}")
  depth = len(blocks)
  if sorted(blocks) != list(range(depth)):
    missing = sorted(set(range(max(blocks) + 1)) - set(blocks))
    raise ValueError(f"checkpoint lacks Transformer/encoderblock_{missing[0]} "
                     f"(it has blocks {sorted(blocks)}); blocks must be "
                     f"numbered 0..depth-1")
  for i, subs in sorted(blocks.items()):
    names = _linen_names(subs)
    for old, new in names.items():
      key = f"Transformer/encoderblock_{i}/{old}"
      mod = next((m for m in _BLOCK if new.startswith(m + "/")), None)
      leaf = new[len(mod) + 1:] if mod else ""
      if mod is None or leaf not in _LEAVES[_BLOCK[mod]]:
        raise ValueError(f"checkpoint key {key!r} (read as {new!r} after "
                         f"per-class renumbering) has no known role; "
                         f"allowed: {ALLOWED}")
      ours = f"block_{i}_{_BLOCK[mod]}/{leaf}"
      out[ours], source[ours] = _float32(key, flat[key]), key
  if "cls" not in out:
    raise ValueError(
        "checkpoint has no 'cls' token: jaxcl's ViT reads the CLS token, so "
        "only class-token models load (vision_transformer classifier="
        "'token', big_vision pool_type='tok'), not 'gap' or 'map' pooling")
  # Every expected leaf present (names in the checkpoint's own spelling).
  need = [f"block_{i}_{m}/{leaf}" for i in range(depth)
          for m, leaves in _LEAVES.items() for leaf in leaves]
  need += list(_TOP.values())
  for ours in need:
    if ours not in out:
      raise ValueError(f"checkpoint lacks {_describe(ours)}; a ViT "
                       f"checkpoint has: {ALLOWED}")
  if pos is None:
    raise ValueError("checkpoint lacks a learned position table "
                     "(Transformer/posembed_input/pos_embedding, or "
                     "pos_embedding in big_vision files; a sincos2d model "
                     f"stores none); allowed: {ALLOWED}")

  # Sizes from the patch embedding and the first block; every shape is
  # checked against them.
  kernel = out["embedding/kernel"]
  if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1]:
    raise ValueError(f"checkpoint 'embedding/kernel' has shape "
                     f"{kernel.shape}; expected a square HWIO patch kernel "
                     "(patch, patch, channels, dim)")
  patch, channels, dim = kernel.shape[0], kernel.shape[2], kernel.shape[3]
  q = out["block_0_attention/query/kernel"]
  if q.ndim != 3 or q.shape[0] != dim or q.shape[1] * q.shape[2] != dim:
    raise ValueError(f"checkpoint {source['block_0_attention/query/kernel']!r}"
                     f" has shape {q.shape}; expected (dim, heads, dim / "
                     f"heads) with dim={dim} (from embedding/kernel)")
  heads, hd = q.shape[1], q.shape[2]
  mlp_dim = out["block_0_mlp_in/kernel"].shape[-1]
  want = {"embedding/kernel": (patch, patch, channels, dim),
          "embedding/bias": (dim,), "cls": (1, 1, dim),
          "norm/scale": (dim,), "norm/bias": (dim,)}
  for i in range(depth):
    b = f"block_{i}_"
    for n in ("norm_attention", "norm_mlp"):
      want[b + n + "/scale"] = want[b + n + "/bias"] = (dim,)
    for n in ("query", "key", "value"):
      want[f"{b}attention/{n}/kernel"] = (dim, heads, hd)
      want[f"{b}attention/{n}/bias"] = (heads, hd)
    want[b + "attention/out/kernel"] = (heads, hd, dim)
    want[b + "attention/out/bias"] = (dim,)
    want[b + "mlp_in/kernel"] = (dim, mlp_dim)
    want[b + "mlp_in/bias"] = (mlp_dim,)
    want[b + "mlp_out/kernel"] = (mlp_dim, dim)
    want[b + "mlp_out/bias"] = (dim,)
  sizes = (f"patch={patch}, channels={channels}, dim={dim}, heads={heads}, "
           f"mlp_dim={mlp_dim}")
  for ours, shape in want.items():
    if out[ours].shape != shape:
      raise ValueError(f"checkpoint {source[ours]!r} has shape "
                       f"{out[ours].shape}, expected {shape} (sizes read "
                       f"from embedding/kernel and block 0: {sizes})")

  # Position table: ours is (1, 1 + h*w, dim), added after [cls; patches].
  table = _float32(pos, flat[pos])
  if table.ndim != 3 or table.shape[0] != 1 or table.shape[2] != dim:
    raise ValueError(f"checkpoint {pos!r} has shape {table.shape}, expected "
                     f"(1, tokens, {dim})")
  n = table.shape[1]
  slot = dict(_POSEMB)[pos]
  if slot is None:    # big_vision: h*w entries, or h*w + 1 (old layout)
    slot = not _is_square(n)
  if slot:
    cls_pos, grid_table = table[0, :1], table[0, 1:]
  else:  # added to the patches only: the CLS token gets no position
    cls_pos, grid_table = np.zeros((1, dim), np.float32), table[0]
  g = _grid_of(grid_table.shape[0], pos, table.shape)
  grid = (g, g) if image_size is None else _image_grid(image_size, patch)
  grid_table = resize_posemb(grid_table, grid)
  out["pos_embedding"] = np.concatenate([cls_pos, grid_table])[None]

  params: dict[str, Any] = {}
  for k, v in out.items():
    node = params
    *path, leaf = k.split("/")
    for p in path:
      node = node.setdefault(p, {})
    node[leaf] = v
  return params


def _describe(ours: str) -> str:
  """The checkpoint key (pre-Linen spelling) behind one of our keys."""
  inverse = {v: k for k, v in _TOP.items()}
  if ours in inverse:
    return repr(inverse[ours])
  m = re.match(r"block_(\d+)_(norm_attention|norm_mlp|attention|mlp_in|"
               r"mlp_out)/(.+)$", ours)
  i, mod, leaf = m.groups()
  old = {"norm_attention": "LayerNorm_0", "norm_mlp": "LayerNorm_2",
         "attention": "MultiHeadDotProductAttention_1",
         "mlp_in": "MlpBlock_3/Dense_0", "mlp_out": "MlpBlock_3/Dense_1"}
  return (f"'Transformer/encoderblock_{i}/{old[mod]}/{leaf}' (Linen "
          f"numbering: the {mod.replace('_', ' ')} of block {i})")


def architecture(params: Mapping[str, Any]) -> dict[str, int]:
  """The ``model.vit`` sizes of converted params: ``patch``, ``dim``,
  ``depth``, ``heads``, ``mlp_dim``."""
  patch, _, _, dim = params["embedding"]["kernel"].shape
  depth = sum(1 for k in params if re.match(r"block_\d+_attention$", k))
  heads = params["block_0_attention"]["query"]["kernel"].shape[1]
  mlp_dim = params["block_0_mlp_in"]["kernel"].shape[1]
  return dict(patch=int(patch), dim=int(dim), depth=depth, heads=int(heads),
              mlp_dim=int(mlp_dim))


def load(path: str, image_size: Any = None) -> dict[str, Any]:
  """:func:`convert` of the ``.npz`` at ``path``."""
  if not os.path.isfile(path):
    raise ValueError(f"ViT checkpoint {path!r} does not exist")
  with np.load(path, allow_pickle=False) as f:
    flat = {k: f[k] for k in f.files}
  return convert(flat, image_size)


def save(path: str, params: Mapping[str, Any], num_classes: int = 0) -> str:
  """Writes converted params as a :mod:`jaxcl.pretrained` file.

  Keys are ``backbone/...`` (what ``strategy.l2p.pretrained`` loads); with
  ``num_classes > 0`` also a zero ``head/kernel`` ``(dim, num_classes)``
  and ``head/bias``, so that ``model.pretrained`` (which fills every param
  of the model) works for a plain ``vit`` classifier with one linear head
  of that width (the reference also zero-initialises its head).
  """
  checks.whole("save: num_classes", num_classes, 0)
  tree: dict[str, Any] = {"backbone": params}
  if num_classes:
    dim = params["embedding"]["kernel"].shape[-1]
    tree["head"] = {"kernel": np.zeros((dim, num_classes), np.float32),
                    "bias": np.zeros((num_classes,), np.float32)}
  return pretrained_lib.save(path, tree)


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      description="Convert a vision_transformer / big_vision ViT .npz into "
      "a jaxcl pretrained file (backbone/...).")
  parser.add_argument("checkpoint", help="the reference .npz (e.g. "
                      "ViT-B_16.npz)")
  parser.add_argument("out", help="the jaxcl .npz to write")
  parser.add_argument("--image-size", type=int, nargs="+", default=None,
                      help="input side (or height width) of the jaxcl "
                      "model; the position table is resized to it. "
                      "Default: the checkpoint's")
  parser.add_argument("--num-classes", type=int, default=0,
                      help="also write a zero head of this width (for "
                      "model.pretrained on a plain vit run)")
  args = parser.parse_args(argv)
  size = args.image_size
  if size is not None:
    size = size[0] if len(size) == 1 else tuple(size)
  params = load(args.checkpoint, size)
  path = save(args.out, params, args.num_classes)
  arch = architecture(params)
  grid = params["pos_embedding"].shape[1] - 1
  print(f"wrote {path}: {grid} patches + CLS")
  print("model.vit = " + repr(arch))


if __name__ == "__main__":
  main()
