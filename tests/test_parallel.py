"""Data-parallel training on 8 forced CPU devices equals one device."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import jaxcl
from jaxcl import metrics, sweep, train

from parallel_driver import TRAIN_ROWS
from test_sweep import small_config

HERE = os.path.dirname(os.path.abspath(__file__))
# The child imports the jaxcl this process imported (the checkout under
# test, or a copy of it that shadows the install), not a fixed path.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(jaxcl.__file__)))


def driver_output(child_env, *args):
  """``parallel_driver.py ARGS`` on 8 forced CPU devices, in ``child_env``
  (conftest.py's, with its compilation cache): its JSON summary."""
  # Both programs compile in the child with conftest.py's XLA flags (it
  # used to drop them: a fifth of the two tests' time went to optimising
  # programs whose results are compared with each other only).
  env = dict(os.environ, PYTHONPATH=REPO, **child_env,
             XLA_FLAGS=os.environ.get("XLA_FLAGS", "") +
             " --xla_force_host_platform_device_count=8")
  p = subprocess.run([sys.executable, os.path.join(HERE, "parallel_driver.py"),
                      *args],
                     capture_output=True, text=True, env=env, timeout=900)
  assert p.returncode == 0, p.stderr[-3000:]
  out = json.loads(p.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8
  return out


def run_driver(child_env, *strategies, contracts=False):
  """The driver's runs of ``strategies`` on 1 and 8 devices, checked equal
  and split over the devices: its JSON summary (with ``contracts``, also
  that of the driver's contract checks, under "contracts")."""
  out = driver_output(child_env, *(["contracts"] if contracts else []),
                      *strategies)
  for strategy in strategies:
    r = out[strategy]
    assert r["max_abs_diff"] <= 1e-4, r
    assert r["curve_max_abs_diff"] <= 1e-4, r
    assert r["confusion_diff"] == 0, r
    assert r["task_max_abs_diff"] <= 1e-4, r
    assert r["all_reduce"], "the batch was not split over devices"
    assert "P('data', None)" in r["state_shardings"]
  return out


# Two files (test_parallel_methods.py holds the rest) so that pytest-xdist
# can run the halves on different workers: one run of all ten took 160 s,
# the suite's longest test. The default suite runs this half (sharded
# memories, stored logits, BiC's two stages, augmentation on the mesh, and
# SLDA's all-reduced statistics); the other half's strategies (40-44 s)
# run with -m slow (session 55: the suite sat at CI's budget).


@pytest.fixture(scope="module")
def driven(child_env):
  """One driver process for both 8-device tests below: the contract checks
  and this half's strategies share its imports (~3 s) and its 1-device
  Naive run."""
  return run_driver(child_env, "naive", "replay", "der", "er_ace", "bic",
                    "der:aug", "slda", contracts=True)


def test_eight_devices_match_one_device_including_sharded_replay(driven):
  out = driven
  # Naive evaluates every 4 steps of each experience and at its end (once
  # where they coincide; e.g. 9 steps: at 4, 8 and 9), on the mesh as on
  # one device.
  steps = [-(-n // 16) for n in out["naive"]["train_rows"]]
  assert out["naive"]["curve_points"] == 1 + sum(
      len(set(range(4, s + 1, 4)) | {s}) for s in steps)
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
  # With augmentation of every batch (replayed rows too) the mesh draws
  # what one device draws: the matrices checked equal above.
  assert out["der:aug"]["buffer_filled"] == 256
  assert out["der:aug"]["acc_one"] != out["der"]["acc_one"]
  # Replay changes the result (it is really replaying).
  assert out["replay"]["acc_one"] > out["naive"]["acc_one"] + 0.1
  # SLDA folded every training row of the stream in once, and its
  # covariance summed over the devices equals the one device's.
  assert out["slda"]["counted"] == sum(out["slda"]["train_rows"]) == \
      TRAIN_ROWS
  assert out["slda"]["cov_diff"] <= 1e-4 * out["slda"]["cov_scale"]


def test_mesh_sharding_placement_and_donation_contracts(driven):
  """parallel.py's contracts on 8 forced devices, the expected values
  worked out here: devices=0 is all of them, a count past them or below 0
  is an error naming it; only evenly divisible leaves of at least
  ``min_bytes`` bytes are split, along the leading (or, stacked, the
  second) axis; ``place`` puts row block i on device i; a 4-device run
  equals the 1-device one; the chunk donates its state, evaluation keeps
  it; batch sizes that do not split and sweeps on a mesh are refused."""
  out = driven["contracts"]
  assert out["devices"] == 8
  assert out["mesh0"] == out["all_ids"] == list(range(8))
  assert out["mesh3"] == [0, 1, 2]
  assert "parallel.devices=9" in out["too_many"] and "only 8" in out[
      "too_many"]
  assert "got -1" in out["negative"]
  sharded, rep = "P('data', None)", "P()"
  assert out["spec_0"] == {"even": sharded, "uneven": rep, "short": rep,
                           "scalar": rep, "bytes8": sharded,
                           "vector": "P('data',)"}
  # 16 x 3 float32 = 192 bytes; 16 x 3 int8 = 48; 8 int32 = 32.
  assert out["spec_at"] == {"even": sharded, "uneven": rep, "short": rep,
                            "scalar": rep, "bytes8": rep, "vector": rep}
  assert set(out["spec_above"].values()) == {rep}
  assert out["spec_stacked"] == "P(None, 'data', None)"
  assert out["place_equal"] and out["place_rows_ok"]
  assert out["batch_spec"] == "P('data',)" and out["replicated_spec"] == rep
  assert out["run4_mesh"] == 4
  assert out["run4_acc_diff"] <= 1e-4 and out["run4_random_diff"] <= 1e-4
  assert out["run4_params_diff"] <= 1e-4
  assert out["eval_kept"], "evaluation deleted (donated) the state"
  assert out["chunk_donated"], "the chunk did not donate the state"
  assert "batch_size=12" in out["bad_batch"] and "8 devices" in out[
      "bad_batch"]
  assert "eval_batch_size=20" in out["bad_eval_batch"]
  assert out["big_eval_batch"] == 96
  assert "parallel.devices=9" in out["bad_devices"]
  assert "not supported" in out["sweep_mesh"]


def test_vmapped_seeds_gather_each_seeds_own_results_in_order():
  """Every per-run result of a seeds sweep is that seed's separate run, in
  the members' order: the accuracy matrix, the accuracy before training
  (random_accuracy), the confusion matrices, every metric (fwt reads the
  random accuracy, recency_bias the last matrix), the final parameters
  and the run key."""
  seeds = [3, 1]
  r = sweep.sweep(small_config(2), seeds=seeds)
  res = r.result
  assert res.random_accuracy.shape == (2, 2)
  for i, seed in enumerate(seeds):
    c = small_config(2)
    c.seed = seed
    single = jaxcl.run(c)
    np.testing.assert_allclose(r.accuracy[i], single.accuracy, atol=1e-5)
    np.testing.assert_allclose(res.random_accuracy[i],
                               single.random_accuracy, atol=1e-6)
    np.testing.assert_array_equal(res.confusion[i], single.confusion)
    np.testing.assert_allclose(res.task_accuracy[i], single.task_accuracy,
                               atol=1e-6)
    sc = jaxcl.experiment.build_scenario(c)
    sizes = [len(e.test_y) for e in sc.eval_experiences]
    want = metrics.summary(r.accuracy[i], res.random_accuracy[i], sizes)
    want["task_acc"] = metrics.average_accuracy(res.task_accuracy[i])
    want["recency_bias"] = metrics.recency_bias(
        res.confusion[i, -1], *jaxcl.experiment._recency_classes(sc))
    assert set(r.metrics[i]) == set(want) and "fwt" in want
    for k, v in want.items():
      assert r.metrics[i][k] == pytest.approx(v, abs=1e-6), k
      assert single.metrics[k] == pytest.approx(v, abs=1e-5), k
    for a, b in zip(jax.tree.leaves(res.state.params),
                    jax.tree.leaves(single.state.params)):
      np.testing.assert_allclose(np.asarray(a)[i], np.asarray(b), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(res.state.rng)[i],
                                  np.asarray(single.state.rng))
  assert not np.allclose(res.random_accuracy[0], res.random_accuracy[1])


def test_each_seed_has_its_own_keys_and_data_order():
  """Seeds do not share keys: each seed's run key, weights and epoch order
  differ from another seed's; the run key is not the key that drew the
  weights; the order is a fresh permutation of the valid rows per
  experience and per epoch, the same again for the same inputs."""
  from jaxcl import experiment
  s = experiment.setup(small_config(2))
  ctx, strategy = s.learner.ctx, s.learner.strategy
  a, b = (train.init_state(ctx, strategy, seed) for seed in (0, 1))
  assert not np.array_equal(np.asarray(a.rng), np.asarray(b.rng))
  assert not all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in
                 zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
  # The weights drawn from the run key are not the run's weights.
  from_rng, _ = train.init_variables(ctx, a.rng)
  assert not all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in
                 zip(jax.tree.leaves(from_rng), jax.tree.leaves(a.params)))

  def order(st, experience, epoch, n_valid=45, size=50, steps=5, bs=10):
    return np.asarray(train.epoch_indices(st.rng, experience, epoch, n_valid,
                                          size, steps, bs))

  o = order(a, 0, 0)
  assert o.shape == (5, 10)
  flat = o.ravel()
  assert sorted(flat[:45].tolist()) == list(range(45))
  assert (flat[45:] == -1).all()
  np.testing.assert_array_equal(order(a, 0, 0), o)
  for other in (order(b, 0, 0), order(a, 1, 0), order(a, 0, 1)):
    assert not np.array_equal(other, o)
