"""Every strategy's ``writes_params`` says what its host hooks do.

``chain()`` orders members around the parameter writes of their
``before_experience`` / ``after_experience`` (a member keeping a copy of
the model at an experience's end must come after one that then writes the
weights; AER/ABS's copy at the start after one that writes them there).
It learns who writes from ``Strategy.writes_params``; this audit runs
every registered strategy through its resume-audit config (Split Digits,
5 experiences; tests/resume_configs.py) with both hooks wrapped, and
checks that a hook changes the parameters in some experience exactly when
the strategy declares it. A strategy whose hook starts writing the weights
without the declaration fails here, as does a stale declaration. It also
checks chain()'s list of savers (``_TEACHER_SAVERS``): a strategy is one
exactly when the state its after_experience returns depends on the
parameters it is given (the hook run again with them nudged), but for the
exceptions ``_READS_BUT_IMMUNE`` names.

Session 54's run of it found the two hand-kept lists it replaced
incomplete: slca's classifier alignment writes the weights at an
experience's end (lwf+slca's teacher differed from the final weights by
2.3-5.4), and cwr_star, ar1, lucir, slca, coda_prompt, dualprompt and dmc
write them at its start; and eleven savers missing from the list
(feature_replay, feature_distillation, wa, hat, hypernetwork, packnet,
piggyback, supsup, progress_compress, fecam, fetril).

Slow (79 strategies, 1-14 s each: 99 s with ``-n 2`` here, session 54);
the default and CI runs deselect it:

  python -m pytest -m slow -n 2 tests/test_hook_writes.py

The fast cases run in CI: the wrapper itself (packnet, naive), and the
row appenders (every strategy's ``prepare_batch`` by shape, against
chain()'s ``_APPENDERS``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl.strategies
import resume_configs
from jaxcl import experiment, train
from jaxcl.strategy import _READS_BUT_IMMUNE, _TEACHER_SAVERS

HOOKS = ("before_experience", "after_experience")


def _same(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(la, lb))


def _nudged(params):
  """``params`` moved off their values (new buffers): the floats scaled by
  1.05 and shifted by 0.01."""
  return jax.tree.map(
      lambda p: p * 1.05 + 0.01 if jnp.issubdtype(p.dtype, jnp.floating)
      else jnp.array(p, copy=True), params)


def hook_writes(config) -> dict[str, list[bool]]:
  """Runs ``config``; for each host hook, whether it changed the
  parameters, per experience (of the stream the strategy trains on:
  joint's is one experience). Under ``"reads"``: whether the strategy
  state ``after_experience`` returns depends on the parameters it is
  given (the hook run a second time on a copy of the state with the
  parameters nudged, before the real call)."""
  strategy, _ = experiment.build_strategy(config)
  scenario = experiment.build_scenario(config)
  writes = {h: [] for h in HOOKS + ("reads",)}

  def watched(name):
    hook = getattr(strategy, name)

    def run_hook(ctx, state, exp):
      if name == "after_experience":
        # New buffers throughout: a hook may donate what it is given.
        copy = jax.tree.map(lambda a: jnp.array(a, copy=True), state)
        other = hook(ctx, copy.replace(params=_nudged(copy.params)), exp)
      # A host copy: the compiled loop donates the state's buffers.
      before = jax.tree.map(np.asarray, state.params)
      out = hook(ctx, state, exp)
      writes[name].append(not _same(before, out.params))
      if name == "after_experience":
        writes["reads"].append(not _same(other.strategy, out.strategy))
      return out

    return run_hook

  experiment.run(config, scenario=scenario,
                 strategy=strategy._replace(
                     **{h: watched(h) for h in HOOKS}))
  if strategy.scenario is not None:  # joint's one experience
    scenario = strategy.scenario(scenario)
  for hook in HOOKS:  # the wrapper saw every experience
    assert len(writes[hook]) == len(scenario.experiences), writes
  return writes


@pytest.mark.slow
@pytest.mark.parametrize("name", jaxcl.strategies.available())
def test_declared_writes_and_savers_match_the_hooks(name, request):
  pretrained = (request.getfixturevalue("pretrained_npz")
                if name in resume_configs.NEEDS_PRETRAINED else None)
  config = resume_configs.config(name, pretrained)
  writes = hook_writes(config)
  declared = jaxcl.strategies.get(
      name, **dict(config.strategy.get(name, {}))).writes_params
  for hook in HOOKS:
    assert any(writes[hook]) == (hook in declared), (
        f"{name}'s {hook} changed the parameters in experiences "
        f"{[i for i, w in enumerate(writes[hook]) if w]} of "
        f"{len(writes[hook])}, but its writes_params is {sorted(declared)}")
  # chain()'s savers (a copy of the model, or what it computes from it,
  # kept at an experience's end) are the members whose after_experience
  # state depends on the weights, but the exceptions it names.
  reads = any(writes["reads"])
  depends = "depends" if reads else "does not depend"
  assert reads == (name in _TEACHER_SAVERS + _READS_BUT_IMMUNE), (
      f"{name}'s after_experience state {depends} on the parameters, but "
      f"{name} is "
      f"{'not ' if name not in _TEACHER_SAVERS else ''}in "
      "jaxcl.strategy._TEACHER_SAVERS")


def test_audit_sees_a_write_and_its_absence():
  """The wrapper itself (fast, in CI): packnet's pruning writes the weights
  at every experience's end, from masks it computes from them, and nothing
  at its start; naive writes and reads nothing. Two experiences of the
  audit's set-up."""
  for name, want in (("packnet", {"after_experience": True,
                                  "before_experience": False,
                                  "reads": True}),
                     ("naive", {"after_experience": False,
                                "before_experience": False,
                                "reads": False})):
    config = resume_configs.config(name)
    config.scenario.n_experiences = 2
    writes = hook_writes(config)
    assert {h: all(w) if want[h] else any(w)
            for h, w in writes.items()} == want, (name, writes)


def appends_rows(config) -> bool:
  """Whether the configured strategy's ``prepare_batch`` returns more rows
  than the stream's batch (shapes only: ``jax.eval_shape``, no compile)."""
  s = experiment.setup(config)
  ctx, strategy = s.learner.ctx, s.learner.strategy
  state = jax.eval_shape(lambda: train.init_state(ctx, strategy, 0))
  b = ctx.info.batch_size
  rows = lambda dtype, *shape: jax.ShapeDtypeStruct((b,) + shape, dtype)
  batch = dict(x=rows(jnp.float32, *ctx.info.input_shape),
               y=rows(jnp.int32), task=rows(jnp.int32),
               mask=rows(jnp.float32), index=rows(jnp.int32))
  out = jax.eval_shape(
      lambda ss, bt: strategy.prepare_batch(ctx, ss, bt, jax.random.key(0)),
      state.strategy, batch)
  return out["x"].shape[0] > b


def test_every_row_appender_is_ordered_after_scr_and_progress_compress(
    pretrained_npz):
  """chain() refuses scr or progress_compress before a member that appends
  rows in prepare_batch (the rows come after their prepare_batch and train
  nothing), by the names in ``_APPENDERS``. Every registered strategy
  whose prepare_batch appends rows (by shape, ~0.1 s each) must be listed
  there or refused after both for another reason. Session 54 found
  generative_replay and generative_negative_replay accepted after
  progress_compress: their generated rows carry task 0, the knowledge
  base, whose gradient progress_compress masks while it progresses.
  (Listed members that keep replayed rows under keys of their own, der,
  derpp, fdr, xder, ser, lamaml, mer, are not row appenders by this
  test's measure; they replay under their stored task ids, which routes
  them to the knowledge base as well.)"""
  from jaxcl.strategy import _APPENDERS
  appenders = [n for n in jaxcl.strategies.available()
               if appends_rows(resume_configs.config(
                   n, pretrained_npz
                   if n in resume_configs.NEEDS_PRETRAINED else None))]
  # Not vacuous: replay appends, naive does not.
  assert "replay" in appenders and "naive" not in appenders
  for name in appenders:
    if name in _APPENDERS:
      continue
    for first in ("scr", "progress_compress"):
      if first == name:
        continue
      with pytest.raises(ValueError, match="chain"):
        jaxcl.strategies.from_spec(f"{first}+{name}")
