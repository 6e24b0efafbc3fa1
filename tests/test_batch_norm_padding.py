"""Padding rows never reach a batch-norm model's statistics.

Static shapes pad: an epoch's last batch (train.py), a part-filled
memory's empty slots, a retraining epoch's last batch over a memory
(_epochs.py). The losses weight those rows 0, but in training mode a
batch-norm layer normalises by the batch's mean and variance and moves
its running averages towards them, so a padding row would still shift
the real rows' outputs and the running statistics (a PyTorch batch
without the padding would not see it). ``Context.apply``'s ``mask``
(``state.batch_stats_mask``) keeps them out; these checks fill the
padding with two different draws of noise and require the same
training either way.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcl import buffers, experiment, models, train
from jaxcl.state import batch_stats_mask
from jaxcl.strategies import _epochs
from conftest import slow_beyond
import resume_configs
from test_replay import after_first

_epochs_shuffled_batches = _epochs.shuffled_batches


# Memories filled at an experience's end keep all of experience 0 (272
# digits) when they can: only a draw of more rows than it holds has
# empty slots. (X-DER's end crashed on a memory larger than the
# experience before session 43.)
_FILLED_AT_END = dict(mem_size=600, batch_size=300)
# Per-strategy settings, beyond the replay batch of twice the training
# batch (drawn after one training batch of experience 0, so that the draws
# hold empty slots) and retraining batches of 7 (a part-padded last batch
# in each epoch): STAR adds its term only once two drawn rows are
# classified right, after a few more steps; MER's default single-example
# steps normalise one row by itself (the same output whatever the row),
# so its batch steps are the case to check.
_SETTINGS = {"fdr": _FILLED_AT_END, "xder": _FILLED_AT_END,
             "latent_replay": dict(_FILLED_AT_END, layer="hidden0_bn"),
             "lamaml": dict(n_inner=8), "star": dict(batch_size=48),
             "mer": dict(per_example=False),
             # Both fitting phases (plain, then PuriDivER's), in 3 epochs
             # rather than 255: the check is the padding, not the fit.
             "puridiver": dict(buffer_fitting_epochs=3,
                               warmup_buffer_fitting_epochs=1)}
_STEPS = {"star": 4}


# He et al.'s CIFAR ResNet at its smallest depth (6n + 2 with n = 1: a
# stem and three basic blocks, 7 convolutions and 10 batch norms with the
# convolution shortcuts) and width 2, under a name of its own: the
# convolutional batch-norm classifier of PuriDivER's and LiDER's checks.
# A resnet18 (20 convolutions) compiled the same masking 2-3 times more
# slowly (PuriDivER's buffer fitting: 18 s of compiling).
_RESNET8 = functools.partial(models.CifarResNet, depth=8, width=2)


def _bn_setup(name, batch_size=8):
  """``name``'s resume-audit config on a batch-norm MLP (width 16; the
  ResNet-8 above for PuriDivER, which reads a ``head`` layer, and LiDER,
  which reads the backbone's convolutions, and TwF, which distils a
  ResNet's stage maps)."""
  c = resume_configs.config(name)
  if name in ("puridiver", "lider", "twf"):
    c.model.name, c.model.shortcut = "resnet8", "conv"
  else:
    c.model.name, c.model.bn_mlp = "bn_mlp", dict(widths=(16,))
  if name == "lwf":  # its task-incremental loss runs the student itself
    c.scenario.kind = "task"
  c.train.batch_size = batch_size
  # Plain SGD: Adam's first step after its reset is about lr * sign(g),
  # blind to a change in the gradient's size.
  c.optimizer.name, c.optimizer.learning_rate = "sgd", 0.1
  c.optimizer.momentum = 0.0
  accepts = resume_configs._accepts(name)
  wide = {"batch_size": 2 * batch_size, "batch_size_mem": 2 * batch_size,
          "consolidate_batch_size": 7, "finetune_batch_size": 7}
  kw = dict(c.strategy.get(name, {}))
  kw.update({k: v for k, v in wide.items() if k in accepts})
  kw.update(_SETTINGS.get(name, {}))
  c.strategy[name] = kw
  with pytest.MonkeyPatch.context() as m:
    m.setitem(models.BACKBONES, "resnet8", _RESNET8)
    m.setitem(experiment.BACKBONE_FIELDS, "resnet8",
              experiment.BACKBONE_FIELDS["resnet32"])
    return experiment.setup(c)


def _is_memory(node):
  return isinstance(node, buffers.Memory)


def _noise_in_padding(tree, seed):
  """``tree`` with each memory's empty slots (``valid`` False) filled with
  noise drawn from ``seed``."""
  key = jax.random.key(seed)

  def fill(node):
    if not _is_memory(node):
      return node
    noise = 3.0 * jax.random.normal(key, node.x.shape, jnp.float32)
    keep = node.valid.reshape(node.valid.shape + (1,) * (node.x.ndim - 1))
    return node._replace(x=jnp.where(keep, node.x, noise.astype(node.x.dtype)))

  return jax.tree.map(fill, tree, is_leaf=_is_memory)


def _padded_batch(exp, n, real, seed):
  """``n`` rows of ``exp`` of which the last ``n - real`` are padding
  (mask 0, index -1) holding noise drawn from ``seed``."""
  x = np.array(exp.train_x[:n], np.float32)
  x[real:] = 3.0 * np.random.default_rng(seed).normal(size=x[real:].shape)
  return {"x": jnp.asarray(x), "y": jnp.asarray(exp.train_y[:n]),
          "task": jnp.asarray(exp.train_task[:n]),
          "mask": jnp.asarray(np.arange(n) < real, jnp.float32),
          "index": jnp.asarray(np.where(np.arange(n) < real,
                                        np.arange(n), -1), jnp.int32)}


def _assert_same(a, b, what, rtol=1e-5):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b)):
    np.testing.assert_allclose(
        np.asarray(x, np.float32), np.asarray(y, np.float32), rtol=rtol,
        atol=rtol / 10, err_msg=f"{what}{jax.tree_util.keystr(path)}")


@pytest.mark.parametrize("name,kw,shape", [
    ("bn_mlp", dict(widths=(6, 5)), (7, 12)),
    ("dualnet", dict(widths=(6, 5)), (7, 12)),
    ("resnet18", dict(width=2), (7, 8, 8, 3)),
    # The same BatchNorm and blocks as resnet18, 32 layers to compile
    # (session 58: the suite's budget).
    pytest.param("resnet32", dict(shortcut="pad"), (7, 4, 4, 3),
                 marks=pytest.mark.slow),
])
def test_batch_norm_models_count_only_the_masked_rows(name, kw, shape):
  # bn_mlp, a resnet18 and a resnet32 (through Classifier), and DualNet's
  # gated MLP, in training mode: with the mask, the real rows' outputs and
  # the running statistics are those of the real rows alone; a mask with
  # no real row counts every row (no NaN from an empty mean).
  rng = np.random.default_rng(0)
  model = models.build(name, 4, **kw)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  task = jnp.zeros((7,), jnp.int32)
  # Each pass one compiled program (op by op, the two ResNets' passes
  # compiled hundreds of single operations; 13.4 -> 11.6 s).
  v = jax.jit(model.init)(jax.random.key(0), x, task)
  ms = {k: w for k, w in v.items() if k != "params"}
  ctx = train.Context(model=model, tx=None, info=None)
  apply = jax.jit(functools.partial(ctx.apply, train=True))
  mask = jnp.asarray([1, 1, 0, 1, 0, 0, 1], jnp.float32)
  real = np.flatnonzero(np.asarray(mask))
  got, got_ms = apply(v["params"], ms, x, task, mask=mask)
  want, want_ms = apply(v["params"], ms, x[real], task[real])
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want),
                             rtol=1e-4, atol=1e-5)
  _assert_same(got_ms, want_ms, f"{name} ")
  # Without the mask the padding rows count: the outputs move.
  unmasked, unmasked_ms = apply(v["params"], ms, x, task)
  assert np.abs(np.asarray(unmasked)[real] - np.asarray(want)).max() > 1e-3
  none = apply(v["params"], ms, x, task, mask=jnp.zeros((7,)))
  # (A masked mean over every row rounds apart from the plain one.)
  _assert_same(none, (unmasked, unmasked_ms), f"{name} ", rtol=1e-4)
  assert batch_stats_mask(model, {}, mask) == {}          # no batch norm
  assert batch_stats_mask(model, ms, None) == {}          # no mask


def test_train_step_ignores_the_padding_rows_of_a_batch_norm_batch():
  # An epoch's last batch: 5 real rows and 3 rows of padding. The step
  # (loss, parameters, running statistics) is the one on the 5 rows alone.
  s = _bn_setup("naive")
  ctx, strat = s.learner.ctx, s.learner.strategy
  e0 = s.scenario.experiences[0]
  state = strat.before_experience(ctx, train.init_state(ctx, strat, 0), e0)
  steps = [train.train_step(ctx, strat, state, _padded_batch(e0, 8, 5, seed))
           for seed in (1, 2)]
  real = {k: v[:5] for k, v in _padded_batch(e0, 8, 5, 1).items()}
  alone = train.train_step(ctx, strat, state, real)
  for (st, loss), what in zip(steps, ("noise 1 ", "noise 2 ")):
    _assert_same((st.params, st.model_state, loss),
                 (alone[0].params, alone[0].model_state, alone[1]), what)


# Strategies with a training-mode forward pass of their own over memory
# rows (LwF's over the batch), a retraining over a memory, or the
# engine's step on replayed rows. Not here: LUCIR (a cosine head) and
# PackNet (multi-head).
MEMORY_FORWARDS = (
    "replay", "der", "derpp", "xder", "fdr", "hal", "mer", "lamaml",
    "clser", "er_ace", "er_aml", "scr", "star", "rar", "mir", "aser",
    "gem", "agem", "gdumb", "eeil", "dmc", "puridiver", "latent_replay",
    "cscct", "icarl", "lwf", "lider", "ser", "twf")
# The default suite's cases: one of each kind of forward pass above (the
# engine's replayed rows, stored logits, a consistency target, a virtual
# step, a projected gradient, a retraining over the memory, class means,
# a teacher, latent rows), each under 3 s; the other nineteen (78 s of
# the suite's CPU in session 55: PuriDivER's alone 17 s; since session 56
# also derpp, fdr, er_ace, dmc and cscct, second cases of a kind above;
# since session 57 twf, a teacher and stored logits on a ResNet) run with
# -m slow.
MEMORY_FORWARDS_FAST = (
    "replay", "der", "clser", "rar", "mir", "agem", "gdumb", "icarl", "lwf",
    "latent_replay")


def _experience_1(name, seeds):
  """For each seed: experience 0 for one step (memories part-filled; more
  for ``_STEPS``), its end, then a step of experience 1 on a batch of 5
  rows and 3 of padding, and experience 1's end, with the memories' empty
  slots and the batch padding holding noise drawn from the seed. Returns
  ``(params, model_state, strategy state)`` after the step and after the
  end, the empty slots of the last set alike."""
  s = _bn_setup(name)
  ctx, strat = s.learner.ctx, s.learner.strategy
  # The jitted step of experience 0 (same shapes): eager steps of a
  # resnet18 took seconds each.
  state, step = after_first(ctx, strat, s.scenario, _STEPS.get(name, 1),
                            n=8)
  e1 = s.scenario.experiences[1]
  out = []
  for seed in seeds:
    st = state.replace(strategy=_noise_in_padding(state.strategy, seed))
    st = step(st, _padded_batch(e1, 8, 5, seed))
    end = strat.after_experience(ctx, st, e1)
    out.append([(t.params, t.model_state, _noise_in_padding(t.strategy, 0))
                for t in (st, end)])
  return out


@pytest.mark.parametrize("name", slow_beyond(MEMORY_FORWARDS,
                                              MEMORY_FORWARDS_FAST))
def test_memory_padding_does_not_change_batch_norm_training(name):
  # Two draws of noise in the padding: the parameters, running statistics
  # and strategy states (empty slots aside) must agree after the step and
  # after the experience's end.
  a, b = _experience_1(name, (1, 2))
  _assert_same(a[0], b[0], f"{name} step: ")
  _assert_same(a[1], b[1], f"{name} experience end: ")


def _padding_at_the_last_row(key, valid, batch_size):
  idx, ok = _epochs_shuffled_batches(key, valid, batch_size)
  return jnp.where(ok, idx, valid.shape[0] - 1), ok


@pytest.mark.parametrize("name", ["dmc", "eeil"])
def test_retraining_padding_does_not_change_batch_norm_training(
    name, monkeypatch):
  # DMC's consolidation over its auxiliary set and EEIL's balanced
  # fine-tuning (batches of 7) pad each epoch's last batch with the set's
  # row 0 (_epochs.shuffled_batches), a real row, which the memory noise
  # above never reaches: padded with the set's last row instead, the
  # experience's end must train the same.
  first = _experience_1(name, (1,))[0]
  monkeypatch.setattr(_epochs, "shuffled_batches", _padding_at_the_last_row)
  last = _experience_1(name, (1,))[0]
  # Two programs (the patched one has an extra select): rounding apart.
  _assert_same(first[1], last[1], f"{name} experience end: ", rtol=1e-3)


def test_xder_end_logits_use_the_experiences_real_rows_statistics():
  # X-DER stores, at an experience's end, the logits of the network in
  # training mode (Mammoth's end_task: self.train() with frozen running
  # statistics), batch statistics taken over the experience's rows. The
  # chunked pass pads the rows to 500 with zeros; those must not count:
  # the stored logits are the ones of one pass over the real rows.
  s = _bn_setup("xder")
  ctx, strat = s.learner.ctx, s.learner.strategy
  e0 = s.scenario.experiences[0]
  state = strat.before_experience(ctx, train.init_state(ctx, strat, 0), e0)
  state = strat.after_experience(ctx, state, e0)
  ss = state.strategy
  x = jnp.asarray(e0.train_x)
  want = ctx.logits(state.params, ss.model_state, x,
                    jnp.asarray(e0.train_task), train=True)
  slots = np.flatnonzero(np.asarray(ss.memory.valid))
  assert 0 < len(slots) <= len(e0.train_y)
  # Each stored entry's row of the experience (rows are distinct digits).
  rows = [int(np.flatnonzero((np.asarray(x) == np.asarray(ss.memory.x[i]))
                             .all(axis=tuple(range(1, x.ndim))))[0])
          for i in slots]
  np.testing.assert_allclose(np.asarray(ss.logits)[slots],
                             np.asarray(want)[rows], rtol=1e-4, atol=1e-5)
