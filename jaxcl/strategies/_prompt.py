"""What the prompt methods (L2P, DualPrompt, CODA-Prompt) share: a frozen pretrained
backbone loaded from a plain ``vit`` run's file, the training loss over the
current experience's classes, and prediction over the classes seen.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxcl import pretrained as pretrained_lib
from jaxcl.state import cross_entropy, cross_entropy_over
from jaxcl.strategies._class_incremental import mask_inactive
from jaxcl.strategies._freeze import restore_part, zero_part

__all__ = ["BACKBONE", "require_model", "fresh_copy", "load_backbone",
           "load_once", "zero_backbone", "restore_backbone",
           "task_loss", "predict"]

BACKBONE = "backbone"


def require_model(name: str, ctx: Any, params: Any, model_class: type,
                  parts: tuple[str, ...], what: str) -> None:
  """Raises at ``init`` unless the model is ``model_class`` (``what``: how
  to configure it) with the top-level params ``parts``."""
  if not isinstance(ctx.model, model_class):
    raise ValueError(f"{name} needs {what}, got the model "
                     f"{type(ctx.model).__name__}")
  missing = [p for p in parts if p not in params]
  if missing:
    raise ValueError(f"{name}: the model's params lack {missing}; they are "
                     f"{sorted(params)}")


@jax.jit
def fresh_copy(tree: Any) -> Any:
  """A copy in new buffers: the compiled loop donates the state, and one
  buffer cannot be donated twice."""
  return jax.tree.map(jnp.copy, tree)


def load_backbone(params: dict, path: str) -> dict:
  """``params`` with ``params['backbone']`` read from a jaxcl pretrained
  file's ``backbone/...`` entries (a plain ``vit`` run, or
  :mod:`jaxcl.models.vit_checkpoints`)."""
  flat = pretrained_lib.load(path)
  return {**params, BACKBONE: pretrained_lib.assign(
      params[BACKBONE], flat, prefix=f"{BACKBONE}/")}


def load_once(sstate: Any, params: dict, path: str) -> tuple[Any, dict]:
  """``(sstate, params)`` with the pretrained backbone loaded and its frozen
  copy (``sstate.backbone``) taken, the first time only (``sstate.loaded``;
  without a file the copy was taken at ``init``). Taken once, so nothing a
  chained member writes into the backbone between experiences survives
  the next step's restore."""
  if bool(sstate.loaded):
    return sstate, params
  params = load_backbone(params, path)
  return sstate._replace(backbone=fresh_copy(params[BACKBONE]),
                         loaded=jnp.asarray(True)), params


def zero_backbone(grads: dict) -> dict:
  """No gradient for the frozen backbone."""
  return zero_part(grads, BACKBONE, jnp.ones((), bool))


def restore_backbone(params: dict, sstate: Any) -> dict:
  """The backbone put back to its frozen copy after an update (momentum
  and weight decay move a weight whose gradient is zero)."""
  return restore_part(params, {BACKBONE: sstate.backbone}, BACKBONE,
                      jnp.ones((), bool))


def task_loss(name: str, train_mask: bool) -> Callable[..., jax.Array]:
  """The training cross-entropy: over the current experience's classes
  (``sstate.current``) with ``train_mask``, else over all classes.

  With ``train_mask``, a batch with rows beyond the incoming ones (a
  chained replay member's) is refused: measured with l2p+replay on Split
  MNIST (docs/notes_prompt.md), the replayed rows' loss over all classes
  pushed the current classes' logits down, their own masked rows never
  lifted them, and every new experience scored 0.00 until replayed. The
  row count is a static shape, so the error comes at the first step.
  """

  def loss(ctx, sstate, logits, batch):
    rows, incoming = batch["y"].shape[0], ctx.info.batch_size
    if train_mask and rows > incoming:
      raise ValueError(
          f"{name}: train_mask=True beside a member that appends replayed "
          f"rows (the batch has {rows} rows, {incoming} incoming) trains "
          f"the current classes only against each other while the "
          f"replayed rows push their logits down: every experience's "
          f"classes score 0 until they are replayed (l2p+replay on Split "
          f"MNIST: 0.00 on each new experience). Pass train_mask=False to "
          f"{name} when chaining a replay method")
    if not train_mask:
      return cross_entropy(logits, batch["y"], batch["mask"])
    return cross_entropy_over(logits, batch["y"], batch["mask"],
                              sstate.current)

  return loss


def predict(ctx, sstate, params, model_state, x, task) -> jax.Array:
  """The model's logits over the classes seen so far (no task id needed;
  ``sstate.seen`` and ``sstate.current``)."""
  logits = ctx.logits(params, model_state, x, task, train=False)
  return mask_inactive(logits, sstate.seen | sstate.current)
