"""Data-parallel training on 8 forced CPU devices equals one device."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def run_driver(child_env, *strategies):
  """``parallel_driver.py`` on 8 forced CPU devices, in ``child_env``
  (conftest.py's, with its compilation cache): its JSON summary."""
  # Both programs compile in the child with conftest.py's XLA flags (it
  # used to drop them: a fifth of the two tests' time went to optimising
  # programs whose results are compared with each other only).
  env = dict(os.environ, PYTHONPATH=REPO, **child_env,
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             " --xla_force_host_platform_device_count=8")
  p = subprocess.run([sys.executable, os.path.join(HERE, "parallel_driver.py"),
                      *strategies],
                     capture_output=True, text=True, env=env, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  for strategy in strategies:
    r = out[strategy]
    assert r["max_abs_diff"] <= 1e-4, r
    assert r["all_reduce"], "the batch was not split over devices"
    assert "P('data', None)" in r["state_shardings"]
  return out


# Two files (test_parallel_methods.py holds the rest) so that pytest-xdist
# can run the halves on different workers: one run of all ten took 160 s,
# the suite's longest test.


def test_eight_devices_match_one_device_including_sharded_replay(child_env):
  out = run_driver(child_env, "naive", "replay", "der", "er_ace", "bic")
  # The replay memories are sharded over the devices, and were filled.
  for strategy in ("replay", "der", "er_ace"):
    assert out[strategy]["buffer_sharding"].startswith("P('data'")
    assert out[strategy]["buffer_filled"] == 256
  # DER's stored logits are sharded with the memory's rows.
  assert out["der"]["logits_sharding"].startswith("P('data'")
  # ER-ACE's class tracker saw every class of the stream.
  assert out["er_ace"]["seen"] == [True] * 10
  # BiC's exemplars (sharded) fill 10 classes x 22 training slots and its
  # validation memory 10 x 3 (ceil(0.1 * 256 // 10)); stage 2 moved every
  # later experience's bias.
  assert out["bic"]["buffer_sharding"].startswith("P('data'")
  assert out["bic"]["buffer_filled"] == 220
  assert out["bic"]["val_filled"] == 30
  assert out["bic"]["beta"][0] == 0.0
  assert all(b != 0.0 for b in out["bic"]["beta"][1:])
  # Replay changes the result (it is really replaying).
  assert out["replay"]["acc_one"] > out["naive"]["acc_one"] + 0.1
