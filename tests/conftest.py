"""Shared test fixtures: the offline data directory and small scenarios."""

import dataclasses
import gc
import os
import sys

import numpy as np
import pytest

# Tests compile hundreds of small programs, and XLA:CPU's compiler
# dominates their time (~70 % of a test file), so the tests' programs
# are compiled cheaply:
# * backend optimisation level 0: a test file runs up to a quarter
#   faster (session 32: test_mammoth_replay.py 46.6 -> 34.7 s);
# * XLA:CPU's older elemental emitters instead of its fusion emitters:
#   they halve the backend compile time again (session 39, 30 tests of
#   test_replay.py: 20.2 -> 9.8 s of compiling, 29 -> 19 s wall).
# Only the tests' own programs are affected: numbers agree to rounding,
# tests that compare two programs compile both here, and the one claim
# about XLA's defaults (test_models.py: jaxcl's compiled init equals
# flax's eager init to the bit) computes its reference in a process
# without these flags. A value the caller set wins. XLA aborts the
# process on a flag it does not know, so a jax that drops one must not
# stop the suite: the flags are tried once in a child process (~1 s, in
# pytest's main process only; xdist workers inherit its XLA_FLAGS) and
# each is kept only if XLA accepts it.
TEST_XLA_FLAGS = {"xla_backend_optimization_level": "0",
                  "xla_cpu_use_fusion_emitters": "false"}


def _xla_accepts(flags: str) -> bool:
  import subprocess
  probe = "import jax; jax.numpy.zeros(1).block_until_ready()"
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", probe], env=env,
                        capture_output=True, timeout=300).returncode == 0


def _with_test_xla_flags(current: str) -> str:
  new = [f"--{k}={v}" for k, v in TEST_XLA_FLAGS.items() if k not in current]
  if not new:
    return current
  if not _xla_accepts(" ".join([current, *new])):
    new = [f for f in new if _xla_accepts(f"{current} {f}")]
  return " ".join([current, *new]).strip()


os.environ["XLA_FLAGS"] = _with_test_xla_flags(os.environ.get("XLA_FLAGS", ""))


def pytest_sessionfinish(session):
  """Frees JAX's caches while an xdist worker is still counted as running.

  After its last test a worker reports "finished" and then runs pytest's
  own cleanup, five ``gc.collect()`` passes, over a heap that JAX's caches
  (jaxprs and compiled programs of ~700 tests) keep growing with every
  test file. execnet gives that cleanup 5 s, then interrupts the worker: the
  ``KeyboardInterrupt`` inside a gc callback that ended every CI log of
  session 37 (execnet's trace: "execution ongoing after 5 secs, trying
  interrupt_main"). Two test files alone leave 578k objects and 1.7 s of
  passes; cleared, 178k and 0.4 s. This hook runs inside xdist's
  ``pytest_sessionfinish`` wrapper, before the "finished" report.
  """
  del session
  jax = sys.modules.get("jax")
  if jax is not None:
    jax.clear_caches()
  gc.collect()


@pytest.fixture(autouse=True, scope="module")
def _clear_jax_caches_after_the_module():
  """Clears JAX's caches after each test file.

  A worker runs ~35 files in one process, and the jitted functions JAX
  keeps alive in its own caches (its lru-cached helpers, one per shape
  and dtype) pile up: 2166 entries of the explicit-attributes dispatch
  cache after four files (session 44). At 8192 live entries JAX 0.10.2
  stops keeping any new function's fast path (jax issue 39078):
  ``_cache_size()`` then reads 0, so every no-recompilation check
  (``chunk_fn._cache_size() == 1``) fails, as test_star's did once near
  the end of a CI worker. Each file builds its own programs, so nothing
  a later file needs is lost.
  """
  yield
  import jax
  jax.clear_caches()


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_DIR = os.environ.get("JAXCL_DATA_DIR",
                          os.path.join(REPO, "..", "shared", "data"))


def slow_beyond(cases, fast, key=lambda case: case):
  """``cases`` as pytest parameters, those whose ``key`` is not in
  ``fast`` marked ``slow``: a family of per-strategy (or per-setting)
  checks of one mechanism keeps in the default suite the cases that span
  its distinct code paths, cheapest first, and runs all of them with
  ``-m slow`` (the suite sat at CI's 20-minute budget in session 54:
  BUILD_NOTES, "Measured"). A name in ``fast`` that no case has is an
  error, so a renamed case cannot drop out of the default suite
  unnoticed."""
  keys = [key(c) for c in cases]
  unknown = set(fast) - set(keys)
  if unknown:
    raise ValueError(f"slow_beyond: no case {sorted(unknown)} in {keys}")
  return [c if k in fast else pytest.param(
      *(c if isinstance(c, tuple) else (c,)), marks=pytest.mark.slow)
          for c, k in zip(cases, keys)]


@pytest.fixture(scope="session")
def child_env(tmp_path_factory):
  """Environment variables for the jaxcl processes a test starts (the
  resume, checkpoint and 8-device drivers): one persistent compilation
  cache for the session. A killed run and its resume compile the same
  programs, and parallel_driver.py's all-reduce check gets the executable
  its mesh run compiled back from it (a new lowering misses JAX's
  in-memory cache: 0.05 s instead of 0.4-1.1 s per strategy)."""
  cache = tmp_path_factory.mktemp("jax_cache")
  return {"JAX_COMPILATION_CACHE_DIR": str(cache),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


@pytest.fixture(scope="session")
def pretrained_npz(tmp_path_factory):
  """resume_configs.pretrain_config()'s weights, made once (a few s), for
  the strategies that need a pretrained start (the resume and hook-write
  audits)."""
  import resume_configs
  from jaxcl import pretrained
  out = tmp_path_factory.mktemp("pretrained") / "digits_mlp64.npz"
  return pretrained.pretrain(resume_configs.pretrain_config(), str(out))


@pytest.fixture(scope="module")
def forked(tmp_path_factory):
  """``forked(*args, cwd=..., extra_env=None)``: the ``jaxcl`` command in a
  child forked from one process that imported jax and jaxcl once
  (:func:`cli_children.forker`), with ``extra_env`` added to its
  environment."""
  import cli_children
  yield from cli_children.forker(tmp_path_factory)


def split_predictions(result, data, n_experiences=5):
  """What a finished task-incremental run's strategy predicts (argmax of
  its ``predict``) on every test set of ``data`` split in
  ``n_experiences`` tasks, with each example's task id (the checks of
  fecam and ranpac). The split is made with ``kind="task"``: a
  class-incremental split's task ids are all 0, and the check would see
  only the first task (as both tests did before session 39)."""
  import jax.numpy as jnp
  from jaxcl import scenarios
  exps = scenarios.split(data, n_experiences, kind="task").experiences
  tx = np.concatenate([e.test_x for e in exps])
  tt = np.concatenate([e.test_task for e in exps])
  learner, state = result.learner, result.state
  scores = learner.strategy.predict(
      learner.ctx, state.strategy, state.params, state.model_state,
      jnp.asarray(tx), jnp.asarray(tt))
  return np.asarray(scores).argmax(1), tt


def split_digits_rows(digits, part: str = "train"):
  """The rows of Split Digits (5 experiences) in experience order:
  ``(x, y)`` of the ``part`` ("train" or "test") sets."""
  from jaxcl import scenarios
  exps = scenarios.split(digits, 5).experiences
  return (np.concatenate([getattr(e, f"{part}_x") for e in exps]),
          np.concatenate([getattr(e, f"{part}_y") for e in exps]))


def np_features(ctx, params, model_state, x):
  """The model's features of ``x`` (evaluation mode, task 0), float64."""
  import jax.numpy as jnp
  return np.asarray(ctx.apply(params, model_state, jnp.asarray(x),
                              jnp.zeros(len(x), int), features=True)[0],
                    np.float64)


def max_abs_change(a, b) -> float:
  """The largest absolute difference between two pytrees' leaves."""
  import jax
  return max(float(np.abs(np.asarray(u) - np.asarray(v)).max())
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def np_log_softmax(z):
  """log softmax over the last axis, in NumPy (the tests' references);
  shifted by the maximum so that large logits do not overflow."""
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z):
  """softmax over the last axis, in NumPy, shifted as ``np_log_softmax``."""
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.fixture(scope="session")
def data_dir():
  if not os.path.isdir(os.path.join(DATA_DIR, "mnist")):
    raise FileNotFoundError(
        f"offline MNIST files not found in {DATA_DIR!r}; set JAXCL_DATA_DIR "
        "to the directory holding mnist/ and fashion_mnist/")
  return DATA_DIR


@pytest.fixture(scope="session")
def mnist(data_dir):
  from jaxcl import datasets
  return datasets.load("mnist", data_dir=data_dir)


@pytest.fixture(scope="session")
def digits():
  from jaxcl import datasets
  return datasets.load("digits")


@pytest.fixture(scope="session")
def full_stream(digits):
  """Split Digits: 5 class-incremental experiences of 2 classes each.

  Shared by the whole session, so its arrays are made read-only: a test
  that wrote into them would change what every later test sees; it fails
  instead.
  """
  from jaxcl import scenarios
  s = scenarios.split(digits, 5)
  for e in s.experiences:
    for a in (e.train_x, e.test_x, e.train_y, e.test_y, e.train_task,
              e.test_task):
      a.flags.writeable = False
  s.task_classes.flags.writeable = False
  return s


@pytest.fixture(scope="session")
def stream(full_stream):
  """The first two experiences of ``full_stream`` (classes 0-1, then 2-3):
  the small stream of the mechanism tests (a module may define its own)."""
  return dataclasses.replace(full_stream,
                             experiences=full_stream.experiences[:2])


def check_frozen_after_first_experience(result, config, digits) -> None:
  """A Split Digits run of a strategy that freezes the whole model after
  the first experience (FeCAM, FeTrIL; its state has ``params``,
  ``frozen`` and a per-class ``count``): the first experience trained the
  model, the four after it left it exactly as it froze (the run's config
  has weight decay, which moves parameters under a zero gradient unless
  they are restored), chained members see no gradient, and every class
  was counted from its own experience's rows."""
  import jax
  import jax.numpy as jnp
  from jaxcl import experiment, scenarios
  ss = result.state.strategy
  init = experiment.initial_state(experiment.setup(config), config.seed)
  leaves = jax.tree.leaves
  assert max_abs_change(init.params, result.state.params) > 1e-2
  for a, b in zip(leaves(result.state.params), leaves(ss.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert bool(ss.frozen)
  ones = jax.tree.map(jnp.ones_like, result.state.params)
  out = result.learner.strategy.update_grads(
      result.learner.ctx, ss, ones, result.state.params, {}, None)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in leaves(out))
  y = np.concatenate([e.train_y for e in scenarios.split(digits,
                                                         5).experiences])
  np.testing.assert_array_equal(np.asarray(ss.count),
                                np.bincount(y, minlength=10))

