"""Data-parallel training on 8 forced CPU devices equals one device."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def test_eight_devices_match_one_device_including_sharded_replay():
  env = dict(os.environ, PYTHONPATH=REPO,
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  p = subprocess.run([sys.executable, os.path.join(HERE, "parallel_driver.py"),
                      "naive", "replay", "der", "er_ace", "bic", "lucir",
                      "er_aml", "slda", "xder", "mer"],
                     capture_output=True, text=True, env=env, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  for strategy in ("naive", "replay", "der", "er_ace", "bic", "lucir",
                   "er_aml", "slda", "xder", "mer"):
    r = out[strategy]
    assert r["max_abs_diff"] <= 1e-4, r
    assert r["all_reduce"], "the batch was not split over devices"
    assert "P('data', None)" in r["state_shardings"]
  # The replay memories are sharded over the devices, and were filled.
  for strategy in ("replay", "der", "er_ace", "er_aml", "mer"):
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
  # LUCIR's exemplars (sharded) fill 10 classes x 25 slots; the cosine
  # head's scale was trained.
  assert out["lucir"]["buffer_sharding"].startswith("P('data'")
  assert out["lucir"]["buffer_filled"] == 250
  assert out["lucir"]["sigma"] != 1.0
  # X-DER's memory (sharded) was rebuilt balanced at the last experience's
  # end: the first 256 // 10 = 25 of each old class, and the 56 free slots
  # split between the two new classes.
  assert out["xder"]["buffer_sharding"].startswith("P('data'")
  assert out["xder"]["class_counts"] == [25] * 8 + [28, 28]
  # SLDA folded every training row of the stream in once, and its
  # covariance summed over the devices equals the one device's.
  assert out["slda"]["counted"] == out["slda"]["train_rows"] > 1000
  assert out["slda"]["cov_diff"] <= 1e-4 * out["slda"]["cov_scale"]
  # Replay changes the result (it is really replaying).
  assert out["replay"]["acc_one"] > out["naive"]["acc_one"] + 0.1
