"""Every registered strategy resumes bit-identically after a SIGKILL.

For each strategy of ``jaxcl.strategies.available()`` and each kill plan:
an uninterrupted reference run, then a run SIGKILLed at a chosen
checkpoint save (in a subprocess: tests/resume_driver.py), then a resume in
the same directory to the end; the accuracy matrix, the random
accuracies and every leaf of the final state must equal the reference's
bit for bit, dtypes included. The configs (Split Digits, 5 experiences of
9 steps, a checkpoint every 3 steps) are in tests/resume_configs.py; a
strategy registered without one fails here (and the fast config test),
naming what to add. Session 35's audit: all 71 strategies OK under 'mid'
and 'boundary'; session 36's 'boundary' run of this file: 71 of 71, and
aser and slca under all three plans; 'mid' at 9218f55: 73 of 73;
session 38's 'chain' (with -n 2, 17 min): 73 of 73; session 39, with
the tests' compile flags and -n 2: 'boundary' 73 of 73 (9.0 min), 'mid'
73 of 73 (12.8 min, beside other test runs).

Plans (positions as jaxcl.checkpoint.Position):
  mid:      kill just before the save of (experience 1, step 6), once the
            save of step 3 is on disk: the resume starts mid-experience,
            without re-running before_experience.
  boundary: kill before the save of (experience 2, step 3): the resume
            starts from the save after experience 2's after_experience,
            before experience 3's before_experience.
  chain:    three kills, then the resume: during the async save of
            (1, step 3), during the save after experience 2, and before the
            save of (3, step 6).
Strategies with one experience (joint) are killed at train saves past the
middle of it instead.

Slow (about 10-60 s per strategy and plan; the default and CI runs
deselect it). Run the audit with, e.g.:

  python -m pytest -m slow -n 2 --dist load \
      tests/test_resume_every_strategy.py -k boundary
      # every strategy, plan 'boundary' (9 min on 2 cores, session 39)
  python -m pytest -m slow -p no:xdist \
      'tests/test_resume_every_strategy.py::test_resumes_bit_identical[mid-replay]'

The processes share a JAX compilation cache in the session's tmp dir (the
reference, killed and resumed runs compile the same programs), and are
forked from one process that imported jax, jaxcl and orbax once
(resume_driver.forker: ~3 s of CPU less per process).
"""

import json
import re
import signal

import pytest

import jaxcl.strategies
import resume_configs
import resume_driver
from resume_driver import assert_same

PLANS = {
    "mid": [("before", dict(experience=1, phase="train", epoch=0, step=6))],
    "boundary": [("before", dict(experience=2, phase="train", epoch=0,
                                 step=3))],
    "chain": [("during", dict(experience=1, phase="train", epoch=0, step=3)),
              ("during", dict(experience=2, phase="begin", epoch=0, step=0)),
              ("before", dict(experience=3, phase="train", epoch=0,
                              step=6))],
}


@pytest.fixture(scope="module")
def drive(child_env):
  """resume_driver.py's invocations, forked from one server process, in
  conftest.py's ``child_env``."""
  yield from resume_driver.forker(child_env)


def resumed_from(position):
  """What the resume logs when it starts from the save at ``position``."""
  if position["phase"] == "begin":
    return f"({position['experience']} experience(s) done)"
  return (f"(in experience {position['experience'] + 1}, epoch "
          f"{position['epoch'] + 1}, step {position['step']})")


def plan_targets(plan, positions):
  """The plan's kills; if a target is never saved (one experience: joint),
  train saves evenly spread past the middle of the run instead."""
  kills = PLANS[plan]
  if all(t in positions for _, t in kills):
    return kills
  train = [p for p in positions if p["phase"] == "train"]
  assert len(train) > 2 * len(kills), (plan, positions)
  return [(mode, train[len(train) // 2 + 1 + k])
          for k, (mode, _) in enumerate(kills)]


def audit(name, plan, tmp_path, drive, pretrained=None):
  """Reference run, the plan's kills, the resume (``drive``: the module's
  fixture); asserts it all."""
  resume_configs.config(name, pretrained)  # a missing config fails here
  args = ["--strategy", name] + (["--pretrained", pretrained] if pretrained
                                 else [])
  ref = tmp_path / "ref.npz"
  p = drive(tmp_path / "ref", ref, "none", -1, 32, *args)
  assert p.returncode == 0, p.stderr[-3000:]
  with open(f"{ref}.json") as f:
    positions = json.load(f)["positions"]
  work = tmp_path / "run"
  kills = plan_targets(plan, positions)
  for mode, target in kills:
    p = drive(work, tmp_path / "x.npz", mode, json.dumps(target), 32, *args)
    assert p.returncode == -signal.SIGKILL, (
        f"kill {mode} {target}: exit {p.returncode} (0: never reached)\n" +
        p.stderr[-3000:])
  p = drive(work, tmp_path / "final.npz", "none", -1, 32, *args)
  assert p.returncode == 0, p.stderr[-3000:]
  said = re.findall(r"jaxcl: resumed from checkpoint \d+ (.*)$", p.stderr,
                    re.M)
  assert said, p.stderr[-2000:]
  mode, target = kills[-1]
  if mode == "before":  # the save before the target is complete on disk
    expected = resumed_from(positions[positions.index(target) - 1])
    assert said[-1] == expected, (said, expected)
  assert_same(ref, tmp_path / "final.npz")


@pytest.mark.slow
@pytest.mark.parametrize("name", jaxcl.strategies.available())
@pytest.mark.parametrize("plan", list(PLANS))
def test_resumes_bit_identical(name, plan, tmp_path, drive, request):
  pretrained = (request.getfixturevalue("pretrained_npz")
                if name in resume_configs.NEEDS_PRETRAINED else None)
  audit(name, plan, tmp_path, drive, pretrained)


def test_every_config_builds_for_a_registered_strategy(tmp_path):
  """A stale entry (a renamed or removed strategy or module), or a
  strategy registered without a config, is caught in the fast suite: each
  new strategy gets its resume-audit config when it is registered."""
  names = resume_configs.NAMES
  assert len(set(names)) == len(names)
  assert set(names) == set(jaxcl.strategies.available())
  for name in names:
    c = resume_configs.config(name, str(tmp_path / "p.npz"))
    assert c.strategy.name == name
  with pytest.raises(ValueError, match="'nope' has no resume-audit config"):
    resume_configs.config("nope")
  with pytest.raises(ValueError, match="'piggyback' needs pretrained="):
    resume_configs.config("piggyback")


def test_audit_end_to_end_on_replay(tmp_path, drive):
  """The audit's machinery itself (position-targeted kill, the resume's
  starting point, the comparison) on one cheap strategy, in the fast
  suite (about 11 s) so that it cannot rot unnoticed between audits."""
  audit("replay", "mid", tmp_path, drive)
