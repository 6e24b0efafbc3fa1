"""Pretrained parameters: save a run's params, load them into another model.

The "pretrained vs scratch" design choice: a jaxcl run (e.g. an ``mlp`` on
Fashion-MNIST) produces params; :func:`save` writes them as a flat ``.npz``
keyed by ``/``-joined paths (``backbone/Dense_0/kernel``), and
:func:`assign` copies them into any pytree with the same paths (e.g. the
frozen weights of a :mod:`jaxcl.models.masked_mlp` for Piggyback).

  python -m jaxcl.pretrained --config experiments/split_mnist_architectural.py:strategy=pretrain --out /tmp/fmnist_mlp.npz
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import jax
import numpy as np

__all__ = ["save", "load", "assign", "flatten", "require", "pretrain"]


def flatten(tree: Any) -> dict[str, np.ndarray]:
  """``{'a/b/c': array}`` from a nested-dict pytree."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out["/".join(str(getattr(k, "key", k)) for k in path)] = np.asarray(leaf)
  return out


def save(path: str, params: Any) -> str:
  """Writes ``params`` as a flat ``.npz``; returns the file name."""
  if not path.endswith(".npz"):
    path = path + ".npz"
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **flatten(params))
  return path


def require(path: str, what: str) -> str:
  """Checks a pretrained file exists (call from factories, before tracing).

  Raises:
    ValueError: no path given, or no file there.
  """
  if not path:
    raise ValueError(
        f"{what} needs a pretrained checkpoint: pass pretrained=<file.npz> "
        "written by jaxcl.pretrained.save / `python -m jaxcl.pretrained`")
  if not os.path.isfile(path):
    raise ValueError(f"{what}: pretrained checkpoint {path!r} does not exist")
  return path


def load(path: str) -> dict[str, np.ndarray]:
  """The flat ``{path: array}`` dict of a file written by :func:`save`."""
  require(path, "load")
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


def assign(target: Any, flat: dict[str, np.ndarray], prefix: str = "") -> Any:
  """``target`` with every leaf replaced by ``flat[prefix + its path]``.

  Raises:
    ValueError: a leaf of ``target`` has no entry in ``flat`` or a
      different shape (the message lists what the file holds).
  """

  def one(path, leaf):
    key = prefix + "/".join(str(getattr(k, "key", k)) for k in path)
    if key not in flat:
      raise ValueError(f"pretrained file has no {key!r}; it holds "
                       f"{sorted(flat)}")
    value = flat[key]
    if value.shape != leaf.shape:
      raise ValueError(f"pretrained {key!r} has shape {value.shape}, the "
                       f"model needs {leaf.shape}")
    return jax.numpy.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(one, target)


def pretrain(config, out: str) -> str:
  """Runs ``config`` with :func:`jaxcl.run` and saves the final params."""
  from jaxcl import experiment
  result = experiment.run(config)
  return save(out, result.state.params)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True,
                      help="config file[:arg], e.g. experiments/x.py:quick")
  parser.add_argument("--out", required=True, help="output .npz")
  args = parser.parse_args(argv)
  from jaxcl import configs
  print(pretrain(configs.load(args.config), args.out))


if __name__ == "__main__":
  main()
