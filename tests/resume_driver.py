"""Runs a small checkpointed stream in a subprocess, optionally killing
itself with SIGKILL at the N-th checkpoint save: 'before' it (mid-epoch:
the chunk ran but its state is not saved) or 'during' it (orbax has started
writing asynchronously). Used by test_checkpoint.py; not a test itself.

  python tests/resume_driver.py WORKDIR OUT.npz [before|during N] [widths]
"""

import os
import signal
import sys

import jax
import numpy as np

import jaxcl
from jaxcl import checkpoint


def config(widths=(32,)):
  c = jaxcl.default_config()
  c.model.widths = widths
  c.train.epochs = 2
  c.train.batch_size = 16
  c.checkpoint.every_steps = 5
  c.report.progress = False
  c.report.plots = False
  c.report.tensorboard = False
  return c


def main():
  workdir, out = sys.argv[1], sys.argv[2]
  mode = sys.argv[3] if len(sys.argv) > 3 else "none"
  kill_at = int(sys.argv[4]) if len(sys.argv) > 4 else -1
  widths = tuple(int(w) for w in sys.argv[5].split(",")) if len(
      sys.argv) > 5 else (32,)
  real_save = checkpoint.Checkpointer.save
  count = {"n": 0}

  def save(self, state, progress, position, seconds=None):
    count["n"] += 1
    if mode == "before" and count["n"] == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    real_save(self, state, progress, position, seconds)
    if mode == "during" and count["n"] == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)

  checkpoint.Checkpointer.save = save
  r = jaxcl.run(config(widths), workdir)
  leaves = [np.asarray(x) for x in jax.tree.leaves(r.state)]
  np.savez(out, accuracy=r.accuracy, random=r.random_accuracy,
           **{f"leaf{i}": x for i, x in enumerate(leaves)})


if __name__ == "__main__":
  main()
