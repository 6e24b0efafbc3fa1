"""Runs a small checkpointed stream in a subprocess, optionally killing
itself with SIGKILL at a chosen checkpoint save: 'before' it (mid-epoch:
the chunk ran but its state is not saved; the previous save is waited for,
so the resume starts exactly from it) or 'during' it (orbax has started
writing asynchronously). Shared by test_checkpoint.py and
test_resume_every_strategy.py (:func:`drive` runs it, :func:`assert_same`
compares two of its outputs); not a test itself.

  python tests/resume_driver.py WORKDIR OUT.npz [MODE [AT [WIDTHS]]]
                                [--strategy NAME [--pretrained NPZ]]

MODE: none (run or resume to the end), before or during. AT: N (the N-th
save of this invocation, from 1) or a save's position as JSON, e.g.
'{"experience": 1, "phase": "train", "epoch": 0, "step": 6}'. WIDTHS: the
MLP of the default config (e.g. 64 or 64,64). --strategy: the small config
of tests/resume_configs.py for that strategy instead (--pretrained: the
.npz it needs, if any). OUT.npz holds the accuracy matrix ('accuracy'),
the random accuracies ('random') and every leaf of the final state
('leaf0', ...); OUT.npz.json the leaves' paths ('names') and the position
of every save this invocation made ('positions').

  python tests/resume_driver.py --serve

runs the invocations that :func:`forker`'s callers ask for on its stdin,
each in a child forked from it (see there).
"""

import atexit
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def config(widths=(32,)):
  import jaxcl
  c = jaxcl.default_config()
  c.model.widths = widths
  c.train.epochs = 2
  c.train.batch_size = 16
  # Saves at steps 10 of each 17-step epoch, at the second epoch's start
  # and after each experience: 4 an experience, 20 a run (every 5 steps
  # made 40, and orbax's saves were most of a run's time).
  c.checkpoint.every_steps = 10
  c.report.progress = False
  c.report.plots = False
  c.report.tensorboard = False
  return c


def drive(workdir, out, *args, env=None, timeout=600):
  """Runs this script on ``workdir``; returns the CompletedProcess.

  ``env``: extra environment variables. The repository goes first on
  PYTHONPATH; a PYTHONPATH already set is kept after it (a scratch
  ``sitecustomize`` there can patch the child, e.g. to mutation-check).
  """
  return subprocess.run([sys.executable, os.path.abspath(__file__),
                         str(workdir), str(out), *map(str, args)],
                        capture_output=True, text=True,
                        env=driver_env(env), timeout=timeout)


def driver_env(env=None):
  """This process's environment for a driver: the repository first on
  PYTHONPATH, a PYTHONPATH already set after it, and ``env`` on top."""
  path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH"))
                         if p)
  return dict(os.environ, PYTHONPATH=path, **(env or {}))


def forker(env=None, timeout=600):
  """Yields :func:`drive`'s twin ``drive(workdir, out, *args)`` (the same
  CompletedProcess) that runs each invocation in a child forked from one
  server process (``--serve``; tests/fork_server.py), started with ``env``
  like :func:`drive`'s processes.

  A new process spends ~3 s of CPU importing jax, jaxcl and orbax before it
  computes anything, most of a killed invocation's cost; the server
  imports them once, before any JAX backend or thread exists, and each
  child starts from there: its own backend, compilation (from the
  persistent cache of ``env``, if set), checkpoints and SIGKILL, as a new
  process would. Only a kill during the imports needs a fresh process
  (test_checkpoint.py's timed kill uses one).
  """
  from fork_server import Server
  server = Server([sys.executable, os.path.abspath(__file__), "--serve"],
                  env=driver_env(env))

  def forked_drive(workdir, out, *args, timeout=timeout):
    argv = [str(workdir), str(out), *map(str, args)]
    return server.run({"args": argv}, [__file__, *argv], timeout)

  try:
    yield forked_drive
  finally:
    server.close()


def _serve():
  """The server of :func:`forker`: each request's ``args`` run through
  :func:`main` in a forked child (tests/fork_server.py)."""
  import jaxcl.checkpoint  # noqa: F401 (what main needs, imported once)
  import jaxcl.experiment  # noqa: F401
  import orbax.checkpoint  # noqa: F401
  import threading
  sys.path.insert(0, HERE)
  import fork_server
  import resume_configs  # noqa: F401
  assert threading.active_count() == 1, threading.enumerate()

  def target(req):
    sys.stdin.close()
    sys.argv = [os.path.abspath(__file__), *req["args"]]
    try:
      main()
    finally:
      atexit._run_exitfuncs()  # as the interpreter's exit would

  fork_server.serve(target)


def assert_same(a, b):
  """The outputs ``a`` and ``b`` hold the same arrays, bit for bit, of the
  same dtypes; a difference names the state leaf's path when known."""
  names = []
  if os.path.exists(f"{a}.json"):
    with open(f"{a}.json") as f:
      names = json.load(f)["names"]
  a, b = np.load(a), np.load(b)
  assert sorted(a.files) == sorted(b.files), (len(a.files), len(b.files))
  for k in a.files:
    label = k
    if k.startswith("leaf") and int(k[4:]) < len(names):
      label = f"{k} {names[int(k[4:])]}"
    # Same dtype too: a resumed run's random accuracies were float64
    # where a fresh run's were float32.
    assert a[k].dtype == b[k].dtype, (label, a[k].dtype, b[k].dtype)
    np.testing.assert_array_equal(a[k], b[k], err_msg=label)


def main():
  if sys.argv[1:] == ["--serve"]:
    _serve()
    return
  import argparse

  import jaxcl
  from jaxcl import checkpoint
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("workdir")
  p.add_argument("out")
  p.add_argument("mode", nargs="?", default="none",
                 choices=("none", "before", "during"))
  p.add_argument("at", nargs="?", default="-1")
  p.add_argument("widths", nargs="?", default="32")
  p.add_argument("--strategy")
  p.add_argument("--pretrained")
  args = p.parse_args()
  at = json.loads(args.at) if args.at.startswith("{") else int(args.at)
  if args.strategy:
    sys.path.insert(0, HERE)
    import resume_configs
    c = resume_configs.config(args.strategy, args.pretrained)
  else:
    c = config(tuple(int(w) for w in args.widths.split(",")))
  real_save = checkpoint.Checkpointer.save
  positions = []

  def save(self, state, progress, position, seconds=None):
    positions.append(position.to_json())
    hit = (positions[-1] == at if isinstance(at, dict)
           else len(positions) == at)
    if args.mode == "before" and hit:
      # The previous (asynchronous) save completes first: the resume then
      # starts from it, not from whichever save happened to be on disk.
      self._manager.wait_until_finished()
      os.kill(os.getpid(), signal.SIGKILL)
    real_save(self, state, progress, position, seconds)
    if args.mode == "during" and hit:
      os.kill(os.getpid(), signal.SIGKILL)

  checkpoint.Checkpointer.save = save
  r = jaxcl.run(c, args.workdir)
  flat, _ = jax.tree_util.tree_flatten_with_path(r.state)
  np.savez(args.out, accuracy=r.accuracy, random=r.random_accuracy,
           **({} if r.confusion is None else {"confusion": r.confusion}),
           **({} if r.task_accuracy is None else {
               "task_accuracy": r.task_accuracy}),
           **{f"leaf{i}": np.asarray(x) for i, (_, x) in enumerate(flat)})
  with open(f"{args.out}.json", "w") as f:
    json.dump({"names": [jax.tree_util.keystr(k) for k, _ in flat],
               "positions": positions}, f)


if __name__ == "__main__":
  main()
