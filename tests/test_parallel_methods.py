"""Data-parallel training on 8 forced CPU devices equals one device: the
second half of test_parallel.py's strategies (split so that pytest-xdist
runs the halves on different workers)."""

from parallel_driver import TRAIN_ROWS
from test_parallel import run_driver


def test_eight_devices_match_one_device_for_more_strategies(child_env):
  out = run_driver(child_env, "lucir", "er_aml", "slda", "xder", "mer",
                   "scr", "cope")
  for strategy in ("er_aml", "mer", "scr"):
    assert out[strategy]["buffer_sharding"].startswith("P('data'")
    assert out[strategy]["buffer_filled"] == 256
  # CoPE's class-balanced memory (sharded): 256 // 10 = 25 per class.
  assert out["cope"]["buffer_sharding"].startswith("P('data'")
  assert out["cope"]["buffer_filled"] == 250
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
  assert out["slda"]["counted"] == sum(out["slda"]["train_rows"]) == \
      TRAIN_ROWS
  assert out["slda"]["cov_diff"] <= 1e-4 * out["slda"]["cov_scale"]
