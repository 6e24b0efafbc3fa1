"""Data-parallel training on 8 forced CPU devices equals one device: the
second half of test_parallel.py's strategies (split so that pytest-xdist
runs the halves on different workers). Run with -m slow: the default
suite's half covers the mechanisms (sharded memories, all-reduced
statistics)."""

import pytest

from test_parallel import run_driver

pytestmark = pytest.mark.slow


def test_eight_devices_match_one_device_for_more_strategies(child_env):
  out = run_driver(child_env, "lucir", "er_aml", "xder", "mer", "scr",
                   "cope", "dualnet")
  for strategy in ("er_aml", "mer", "scr", "dualnet"):
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
