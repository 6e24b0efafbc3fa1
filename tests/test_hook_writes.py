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
without the declaration fails here, as does a stale declaration.

Session 54's run of it found the two hand-kept lists it replaced
incomplete: slca's classifier alignment writes the weights at an
experience's end (lwf+slca's teacher differed from the final weights by
2.3-5.4), and cwr_star, ar1, lucir, slca, coda_prompt, dualprompt and dmc
write them at its start.

Slow (79 strategies, 1-14 s each: 99 s with ``-n 2`` here, session 54);
the default and CI runs deselect it:

  python -m pytest -m slow -n 2 tests/test_hook_writes.py
"""

import jax
import numpy as np
import pytest

import jaxcl.strategies
import resume_configs
from jaxcl import experiment

HOOKS = ("before_experience", "after_experience")


def _same(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(
      x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(la, lb))


def hook_writes(config) -> dict[str, list[bool]]:
  """Runs ``config``; for each host hook, whether it changed the
  parameters, per experience (of the stream the strategy trains on:
  joint's is one experience)."""
  strategy, transform = experiment.build_strategy(config)
  scenario = transform(experiment.build_scenario(config))
  writes = {h: [] for h in HOOKS}

  def watched(name):
    hook = getattr(strategy, name)

    def run_hook(ctx, state, exp):
      # A host copy: the compiled loop donates the state's buffers.
      before = jax.tree.map(np.asarray, state.params)
      out = hook(ctx, state, exp)
      writes[name].append(not _same(before, out.params))
      return out

    return run_hook

  experiment.run(config, scenario=scenario,
                 strategy=strategy._replace(
                     **{h: watched(h) for h in HOOKS}))
  for hook in HOOKS:  # the wrapper saw every experience
    assert len(writes[hook]) == len(scenario.experiences), writes
  return writes


@pytest.mark.slow
@pytest.mark.parametrize("name", jaxcl.strategies.available())
def test_writes_params_declares_what_the_hooks_do(name, request):
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


def test_audit_sees_a_write_and_its_absence():
  """The wrapper itself (fast, in CI): packnet's pruning writes the weights
  at every experience's end and nothing at its start; naive writes
  nothing. Two experiences of the audit's set-up."""
  for name, want in (("packnet", {"after_experience": True,
                                  "before_experience": False}),
                     ("naive", {"after_experience": False,
                                "before_experience": False})):
    config = resume_configs.config(name)
    config.scenario.n_experiences = 2
    writes = hook_writes(config)
    assert {h: all(w) if want[h] else any(w)
            for h, w in writes.items()} == want, (name, writes)
