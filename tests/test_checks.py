"""The shared argument checks (checks.py) at their boundaries: what each
accepts, what it refuses, and that the message names the argument, the
range and the value."""

import math

import numpy as np
import pytest

from jaxcl import checks

NOT_NUMBERS = [True, False, "1", None, [1]]
NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("check, ok, bad, says", [
    (checks.nonnegative, [0, 0.0, 2, 1e-9, np.float32(3), np.int64(4)],
     [-1e-9, -2] + NON_FINITE + NOT_NUMBERS, "a finite number >= 0"),
    (checks.positive, [1e-9, 2, np.float64(0.5)],
     [0, 0.0, -1] + NON_FINITE + NOT_NUMBERS, "a finite number > 0"),
    (checks.fraction, [0, 0.0, 0.5, 0.999],
     [1, 1.0, -0.1] + NON_FINITE + NOT_NUMBERS, "a number in [0, 1)"),
    (checks.positive_or_inf, [1e-9, 3, math.inf, np.float32(math.inf)],
     [0, -1, math.nan, -math.inf] + NOT_NUMBERS, "> 0 (inf: no limit)"),
])
def test_number_checks(check, ok, bad, says):
  for value in ok:
    check("s: arg", value)
  for value in bad:
    with pytest.raises(ValueError) as e:
      check("s: arg", value)
    assert str(e.value) == f"s: arg must be {says}, got {value!r}"


def test_at_least_includes_its_minimum_and_says_why():
  checks.at_least("s: t", 0.5, 0.5)
  checks.at_least("s: t", 7, 0.5)
  for value in [0.4999, math.nan, math.inf, True, "1"]:
    with pytest.raises(ValueError) as e:
      checks.at_least("s: t", value, 0.5, " (a temperature)")
    assert str(e.value) == (
        f"s: t must be a number >= 0.5 (a temperature), got {value!r}")


def test_whole_takes_ints_from_its_minimum():
  for value in [2, 3, np.int32(2), np.int64(9)]:
    checks.whole("s: k", value, minimum=2)
  assert checks.is_whole(np.int8(1)) and not checks.is_whole(True)
  assert not checks.is_whole(2.0)
  for value in [1, 0, -5, 2.0, np.float32(3), True, "2", None]:
    with pytest.raises(ValueError) as e:
      checks.whole("s: k", value, minimum=2, note="0: off")
    assert str(e.value) == f"s: k must be an int >= 2 (0: off), got {value!r}"
  with pytest.raises(ValueError, match=r"^s: k must be an int >= 0, got -1$"):
    checks.whole("s: k", -1)


def test_flag_takes_only_bools():
  checks.flag("s: f", True)
  checks.flag("s: f", False)
  for value in [1, 0, "no", "True", None, np.float32(1)]:
    with pytest.raises(ValueError) as e:
      checks.flag("s: f", value)
    assert str(e.value) == f"s: f must be True or False, got {value!r}"


def test_one_of_takes_only_the_listed_values():
  checks.one_of("s: mode", "seen", ("seen", "all"))
  for value in ["Seen", "", None, 1, ["seen"]]:
    with pytest.raises(ValueError) as e:
      checks.one_of("s: mode", value, ("seen", "all"))
    assert str(e.value) == (
        f"s: mode must be one of ['seen', 'all'], got {value!r}")
