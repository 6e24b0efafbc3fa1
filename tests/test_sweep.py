"""vmap sweeps: k runs in one program equal k separate runs."""

import dataclasses
import json
import os
import re

import jax
import numpy as np
import pytest

import jaxcl
from jaxcl import sweep


def small_config(experiences: int = 5):
  """Split Digits (``experiences`` of them: 2 or 5), MLP 64-32-10, 1 epoch.

  Each run compiles its own programs, most of these tests' time (a GEM run
  on 2 experiences costs ~70 % of one on 5); 2 experiences are enough where
  a check needs only one experience trained with the past to act on.
  """
  c = jaxcl.default_config()
  c.model.widths = (32,)
  c.train.epochs = 1
  c.report.progress = False
  c.scenario.n_experiences = experiences
  return c


@pytest.fixture(scope="module")
def single_run():
  """``jaxcl.run`` whose results are kept for the module: the separate runs
  a sweep member is compared with, computed once per config (the run is
  deterministic) when two tests compare with the same one."""
  done = {}

  def run(c):
    key = c.to_json()
    if key not in done:
      done[key] = jaxcl.run(c)
    return done[key]
  return run


def test_vmapped_seeds_and_learning_rates_equal_separate_runs():
  r = sweep.sweep(small_config(2), seeds=[0, 1, 2],
                  values={"optimizer.learning_rate": [0.1, 0.03]})
  assert r.accuracy.shape == (6, 2, 2)
  assert [m["seed"] for m in r.members] == [0, 1, 2, 0, 1, 2]
  # Compiled once for all runs and all experiences.
  assert r.result.learner.chunk_fn._cache_size() == 1
  for i in (0, 2, 4):
    m = r.members[i]
    c = small_config(2)
    c.seed = m["seed"]
    c.optimizer.learning_rate = m["optimizer.learning_rate"]
    single = jaxcl.run(c)
    np.testing.assert_allclose(r.accuracy[i], single.accuracy, atol=1e-5)
  # Runs really differ (seeds and learning rates are not shared).
  assert not np.allclose(r.accuracy[0], r.accuracy[1])
  assert not np.allclose(r.accuracy[0], r.accuracy[3])
  # Each run's metrics are those of its own matrix (acc: the mean of its
  # last row), not another run's.
  np.testing.assert_allclose([m["acc"] for m in r.metrics],
                             r.accuracy[:, -1].mean(-1), rtol=1e-6)
  # Every setting's group holds its own three runs (members 3j..3j+2),
  # not only the first.
  for j, lr in enumerate((0.1, 0.03)):
    g = r.groups[j]
    accs = r.accuracy[3 * j:3 * j + 3, -1].mean(-1)
    assert g["n"] == 3 and g["setting"] == {"optimizer.learning_rate": lr}
    assert g["acc"][0] == pytest.approx(np.mean(accs))
    assert g["acc"][1] == pytest.approx(np.std(accs, ddof=1) / np.sqrt(3))


def test_unsweepable_key_is_an_error():
  with pytest.raises(ValueError, match="cannot sweep 'train.batch_size' in "
                     r"one vmapped program: sweepable are the seeds \(their "
                     r"own argument, --seeds\), 'optimizer.learning_rate'"):
    sweep.sweep(small_config(), seeds=[0],
                values={"train.batch_size": [16, 32]})
  with pytest.raises(ValueError, match="not a config field"):
    sweep.sweep(small_config(), seeds=[0], values={"optimizer.bogus": [1]})
  # 'seed' as a value replaced the members' seeds with floats, and the
  # PRNG refused them deep inside tracing (session 44).
  with pytest.raises(ValueError, match=r"sweep 'seed': give the seeds as "
                     r"seeds \(jaxcl sweep --seeds 1,2\), not as values"):
    sweep.plan(small_config(), seeds=[0], values={"seed": [1.0, 2.0]})


def test_sweep_checkpoint_refuses_other_seeds(tmp_path):
  c = small_config(2)
  sweep.sweep(c, seeds=[0, 1], workdir=str(tmp_path / "s"))
  data = json.load(open(tmp_path / "s" / "sweep.json"))
  assert len(data["accuracy"]) == 2
  # Per run, in the members' order: its seed, and the metrics of its own
  # matrix (acc: the mean of the last row); the runs really differ.
  assert [m["seed"] for m in data["members"]] == [0, 1]
  np.testing.assert_allclose([m["acc"] for m in data["metrics"]],
                             np.mean(np.asarray(data["accuracy"])[:, -1], -1),
                             rtol=1e-9)
  assert data["metrics"][0]["acc"] != data["metrics"][1]["acc"]
  # The directory's matrix is the runs' mean, and says so.
  mean = json.load(open(tmp_path / "s" / "accuracy_matrix.json"))
  assert mean["mean_of_runs"] == 2 and mean["per_run"] == "sweep.json"
  np.testing.assert_allclose(mean["accuracy"],
                             np.mean(data["accuracy"], axis=0), atol=1e-12)
  with pytest.raises(ValueError, match="sweep.members"):
    sweep.sweep(c, seeds=[0, 1, 2], workdir=str(tmp_path / "s"))
  # The dry run reads the same from the checkpoints' metadata.
  from jaxcl import cli
  for seeds, word in (([0, 1], "would resume"), ([0, 1, 2], "would refuse")):
    p = sweep.plan(c, seeds=seeds)
    note = cli._resume_note(str(tmp_path / "s"), None, c,
                            p.fingerprint_extra())
    assert word in note, note
  one = sweep.plan(c, seeds=[0]).fingerprint_extra()
  assert one == {"sweep.members": [{"seed": 0}], "sweep.vmapped": False}


def test_cli_sweep(tmp_path, forked):
  # (The `jaxcl` command in a child forked from a process that imported
  # jax and jaxcl once: conftest.py's ``forked``.)
  p = forked("sweep", "--seeds", "0,1", "--config.model.widths=16,",
             "--config.train.epochs=1", "--config.scenario.n_experiences=2",
             "--config.report.progress=False",
             "--config.report.plots=False", "--workdir", str(tmp_path / "w"),
             cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "mean ± standard error" in p.stdout and "[n=2]" in p.stdout
  group = p.stdout.split("mean ± standard error over seeds:")[1]
  for m in ("acc", "bwt", "forgetting", "fwt", "inc_acc", "learning_acc"):
    assert re.search(rf"\b{m} -?\d\.\d{{4}} ± \d\.\d{{4}}", group), m


@pytest.mark.parametrize("name,field,values,extra", [
    # λ = 100: λ·F·lr stays below SGD's stability limit (1000 diverges
    # from experience 3 on, whatever the penalty's form).
    ("ewc", "lam", [0.0, 100.0], {"max_examples": 64}),
    ("si", "c", [0.0, 10.0], {}),
])
def test_regulariser_strength_sweep_equals_separate_runs(name, field, values,
                                                         extra):
  """A strength kept in the strategy state differs per run in one program."""
  c = small_config(2)  # the penalty acts on the second experience
  c.scenario.kind = "task"
  c.strategy.name = name
  c.strategy[name] = dict(extra)
  key = f"strategy.{name}.{field}"
  r = sweep.sweep(c, seeds=[0], values={key: values})
  for i, v in enumerate(values):
    single = small_config(2)
    single.scenario.kind = "task"
    single.strategy.name = name
    single.strategy[name] = dict(extra, **{field: v})
    ref = jaxcl.run(single)
    np.testing.assert_allclose(r.accuracy[i], ref.accuracy, atol=1e-5)
  # The strength really acts: the runs differ.
  assert not np.allclose(r.accuracy[0], r.accuracy[1])


def test_one_run_sweep_is_not_vmapped_and_shaped_as_a_sweep(tmp_path,
                                                            single_run):
  """A grid of one run trains the plain program (no vmap turning its
  lax.conds into selects) and returns the sweep's shapes; a checkpoint of
  the vmapped form is not mistaken for it."""
  # Seed 1 (not the config's 0) on 2 experiences: the separate run is the
  # one test_memory_strategies_sweep_member_equals_single_run[gem-kwargs0]
  # compares with.
  c = small_config(2)
  c.strategy.name = "gem"
  c.strategy.gem = {"mem_size": 40}
  r = sweep.sweep(c, seeds=[1], workdir=str(tmp_path / "w"))
  assert r.result.learner.members == 0
  assert r.accuracy.shape == (1, 2, 2) and len(r.metrics) == 1
  assert r.groups[0]["n"] == 1 and r.groups[0]["acc"][1] == 0.0
  single = small_config(2)
  single.seed = 1
  single.strategy.name = "gem"
  single.strategy.gem = {"mem_size": 40}
  np.testing.assert_array_equal(r.accuracy[0], single_run(single).accuracy)
  assert jax.tree.leaves(r.result.state.params)[0].shape[0] == 1
  # Resuming the same one-run sweep finds its own finished checkpoint.
  again = sweep.sweep(c, seeds=[1], workdir=str(tmp_path / "w"))
  np.testing.assert_array_equal(again.accuracy, r.accuracy)


def test_diverging_member_is_named_not_an_index_error():
  """A sweep where one learning rate diverges says which member did."""
  c = small_config()
  with pytest.raises(jaxcl.NonFiniteLossError,
                     match=r"sweep member 1, experience 0, .*step"):
    sweep.sweep(c, seeds=[0], values={"optimizer.learning_rate":
                                      [0.01, 1e12]})


def test_grid_values_get_the_factories_checks_before_any_training(
    monkeypatch):
  # Values past the first setting go straight into the state; each is
  # built through the optimiser / strategy factory first, so a bad one is
  # refused by name instead of training (or diverging) for minutes.
  trained = []
  monkeypatch.setattr(sweep.experiment, "execute",
                      lambda *a, **k: trained.append(1))
  with pytest.raises(ValueError, match="learning_rate must be > 0 and finite, got -1"):
    sweep.sweep(small_config(), seeds=[0],
                values={"optimizer.learning_rate": [0.1, -1.0]})
  c = small_config()
  c.strategy.name = "ewc"
  with pytest.raises(ValueError, match="lam must be .* >= 0, got -5"):
    sweep.sweep(c, seeds=[0], values={"strategy.ewc.lam": [10.0, -5.0]})
  # An int in the config: -0.5 would be checked as int(-0.5) == 0 while
  # the state got -0.5.
  c.strategy.ewc = {"lam": 100}
  with pytest.raises(ValueError, match="-0.5 is not of type int"):
    sweep.sweep(c, seeds=[0], values={"strategy.ewc.lam": [10.0, -0.5]})
  assert not trained


def test_repeated_or_non_numeric_grid_is_refused():
  with pytest.raises(ValueError, match=r"seeds: 1 is given twice in "
                     r"\[0, 1, 1\]"):
    sweep.sweep(small_config(), seeds=[0, 1, 1])
  with pytest.raises(ValueError, match="0.1 is given twice"):
    sweep.sweep(small_config(), seeds=[0],
                values={"optimizer.learning_rate": [0.1, 0.1]})
  with pytest.raises(ValueError, match="'strategy.name': values must be "
                     "numbers, got 'naive,ewc'"):
    sweep.parse_values(["strategy.name=naive,ewc"])
  # NaN is a float but no value to train with (it was refused as "not of
  # type float", the config's own type).
  with pytest.raises(ValueError, match="'optimizer.learning_rate': values "
                     "must be numbers, got '0.1,nan'"):
    sweep.parse_values(["optimizer.learning_rate=0.1,nan"])
  with pytest.raises(ValueError, match="--seeds: 'a' is not an integer"):
    sweep.parse_seeds(["0", "a"])
  assert sweep.parse_seeds(["3", "0"]) == [3, 0]
  with pytest.raises(ValueError, match=r"seeds must be >= 0, got \[0, -1\]"):
    sweep.sweep(small_config(), seeds=[0, -1])


@pytest.mark.parametrize("name,kwargs,experiences", [
    # A memory filled after the first experience, used in the second.
    ("gem", {"mem_size": 40}, 2),
    # Past blocks in a while loop: 5 experiences for trip counts up to 4
    # (10 s; -m slow).
    pytest.param("gem", {"mem_per_experience": 64}, 5,
                 marks=pytest.mark.slow),
    ("replay", {"mem_size": 40, "batch_size": 8}, 2),
])
def test_memory_strategies_sweep_member_equals_single_run(name, kwargs,
                                                          experiences,
                                                          single_run):
  """Memories filled by host hooks and projections solved in while loops
  behave the same under vmap: member i of a seeds sweep is run i."""
  c = small_config(experiences)
  c.strategy.name = name
  c.strategy[name] = kwargs
  r = sweep.sweep(c, seeds=[0, 1])
  for i in (0, 1):
    single = small_config(experiences)
    single.seed = i
    single.strategy.name = name
    single.strategy[name] = kwargs
    np.testing.assert_allclose(r.accuracy[i], single_run(single).accuracy,
                               atol=1e-5)
  assert not np.allclose(r.accuracy[0], r.accuracy[1])


def permuted_config():
  c = small_config()
  c.scenario.type = "permuted"
  c.scenario.kind = "domain"
  c.scenario.n_experiences = 2  # the memory of the first, used in the second
  c.strategy.name = "gem"
  c.strategy.gem = {"mem_size": 30}
  return c


def test_scenario_per_seed_runs_each_seed_on_its_own_draw():
  """With scenario_per_seed every member trains, fills its memory (a host
  hook) and is tested on its seed's own permutations: member i equals a
  plain run with seed i and scenario.seed i, in one compiled program."""
  seeds = [0, 1]
  r = sweep.sweep(permuted_config(), seeds=seeds,
                  values={"optimizer.learning_rate": [0.1, 0.05]},
                  scenario_per_seed=True)
  assert r.result.learner.member_data
  assert r.result.learner.chunk_fn._cache_size() == 1
  for i in (1, 2):  # seed 1 at lr 0.1; seed 0 at lr 0.05
    m = r.members[i]
    c = permuted_config()
    c.seed = c.scenario.seed = m["seed"]
    c.optimizer.learning_rate = m["optimizer.learning_rate"]
    single = jaxcl.run(c)
    np.testing.assert_allclose(r.accuracy[i], single.accuracy, atol=1e-5)
    # GEM's memory holds the examples of the member's own draw.
    np.testing.assert_array_equal(
        np.asarray(r.result.state.strategy.memory.x[i]),
        np.asarray(single.state.strategy.memory.x))
  # Not vacuous: the draws differ, and member 1 (seed 1) filled its memory
  # with experience 1's examples of draw 1, none of draw 0, on which a
  # shared-data sweep trains every seed. (This once ran that sweep, ~4 s of
  # CPU, and compared its member 1's accuracy.)
  from jaxcl import experiment
  rows = []
  for draw in (0, 1):
    c = permuted_config()
    c.scenario.seed = draw
    rows.append({x.tobytes() for x in
                 experiment.build_scenario(c).experiences[1].train_x})
  assert not rows[0] & rows[1]
  mem = jax.tree.map(lambda a: np.asarray(a[1]),
                     r.result.state.strategy.memory)
  kept = mem.x[mem.valid & (mem.experience == 1)]
  assert len(kept) > 0
  assert all(x.tobytes() in rows[1] for x in kept)


def test_scenario_per_seed_deals_each_seed_its_blurry_stream():
  """A blurry stream's draw is which training examples each experience
  deals (Koh et al.'s rand1-rand3): member i trains on seed i's deal and
  equals a plain run with seed i and scenario.seed i, curve included."""
  def config():
    c = small_config(2)
    c.scenario.type, c.scenario.disjoint = "blurry", 0.0
    # (Every step: a class turns up within an experience's first few
    # batches, so only early points expose part of them, each deal its
    # own part.)
    c.scenario.blurred, c.train.eval_every_steps = 0.3, 1
    c.strategy.name = "replay"
    return c
  r = sweep.sweep(config(), seeds=[0, 1], scenario_per_seed=True)
  assert r.result.learner.member_data
  singles = []
  for i in (0, 1):
    c = config()
    c.seed = c.scenario.seed = i
    singles.append(jaxcl.run(c))
    np.testing.assert_allclose(r.accuracy[i], singles[i].accuracy,
                               atol=1e-5)
    np.testing.assert_allclose(r.result.curve.exposed[i],
                               singles[i].curve.exposed, atol=1e-5)
  # The deals differ in their labels, not only in their inputs (the
  # check the sweep's streams pass allows that, and only that).
  from jaxcl import experiment
  draws = [experiment.build_scenario(c) for c in (config(), config())]
  c = config()
  c.scenario.seed = 1
  draws[1] = experiment.build_scenario(c)
  assert not np.array_equal(draws[0].experiences[0].train_y,
                            draws[1].experiences[0].train_y)
  experiment.check_same_stream(draws)


def test_scenario_per_seed_refuses_streams_it_cannot_draw():
  c = small_config()  # split: scenario.seed does not change it
  with pytest.raises(ValueError, match="needs scenario.type in "
                     r"\['permuted', 'rotated', 'blurry'\].*got 'split'"):
    sweep.sweep(c, seeds=[0, 1], scenario_per_seed=True)
  c = permuted_config()
  c.scenario.type = "rotated"
  c.scenario.angles = (0.0, 45.0)
  with pytest.raises(ValueError, match=r"without explicit angles.*45\.0"):
    sweep.sweep(c, seeds=[0, 1], scenario_per_seed=True)


def test_member_scenarios_must_differ_only_in_inputs():
  from jaxcl import experiment, scenarios
  rng = np.random.default_rng(0)
  x = rng.normal(size=(12, 4)).astype(np.float32)
  y = np.array([0, 1] * 6)
  a = scenarios.from_arrays([(x, y)], [(x, y)])
  b = scenarios.from_arrays([(x + 1, y)], [(x, y)])  # other inputs: fine
  experiment.check_same_stream([a, b])
  # Other training labels of the same classes (a blurry deal): fine.
  experiment.check_same_stream(
      [a, scenarios.from_arrays([(x, y[::-1])], [(x, y)])])
  # Other test labels, other classes or another size: refused.
  c = scenarios.from_arrays([(x, y)], [(x, y[::-1])])
  with pytest.raises(ValueError, match=r"draw 1 .* test_y of "
                     r"experiences\[0\]"):
    experiment.check_same_stream([a, b, c][::2])
  d = scenarios.from_arrays([(x, np.zeros(12, int))], [(x, y)])
  with pytest.raises(ValueError, match=r"task id or classes of "
                     r"experiences\[0\]"):
    experiment.check_same_stream([a, d])
  e = scenarios.from_arrays([(x[:10], y[:10])], [(x, y)])
  with pytest.raises(ValueError, match=r"number of training examples of "
                     r"experiences\[0\] \(10 against draw 0's 12\)"):
    experiment.check_same_stream([a, e])


def test_cli_sweep_per_seed_and_its_checkpoint_fingerprint(tmp_path,
                                                         forked):
  """`jaxcl sweep --scenario_per_seed` runs; its run directory resumes as
  itself and refuses a shared-draw sweep of the same seeds."""
  w = str(tmp_path / "w")
  p = forked("sweep", "--seeds", "0,1", "--scenario_per_seed",
             "--config.scenario.type=permuted",
             "--config.scenario.kind=domain",
             "--config.scenario.n_experiences=2",
             "--config.model.widths=16,", "--config.train.epochs=1",
             "--config.report.progress=False",
             "--config.report.plots=False", "--workdir", w, cwd=tmp_path)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "each on its own scenario draw" in p.stdout and "[n=2]" in p.stdout
  c = small_config()
  c.scenario.type, c.scenario.kind, c.scenario.n_experiences = (
      "permuted", "domain", 2)
  c.model.widths = (16,)
  c.report.plots = False
  first = json.load(open(os.path.join(w, "sweep.json")))
  again = sweep.sweep(c, seeds=[0, 1], workdir=w, scenario_per_seed=True)
  np.testing.assert_array_equal(again.accuracy, first["accuracy"])
  with pytest.raises(ValueError, match="sweep.scenario_per_seed"):
    sweep.sweep(c, seeds=[0, 1], workdir=w)


def test_executing_one_setup_again_reuses_its_compiled_learner(single_run):
  # execute() derived a new Learner on every call, and a new Learner compiles
  # its functions anew: seeds run in turn on one Setup compiled every time
  # (benchmarks/sweep.py's "sharing one compiled program" loop was no
  # faster than separate runs).
  from jaxcl import experiment
  c = small_config(2)
  s = experiment.setup(c)
  runs = [experiment.execute(s, experiment.initial_state(s, seed))
          for seed in (0, 1)]
  assert runs[0].learner is runs[1].learner is s.learner
  assert s.learner.chunk_fn._cache_size() == 1
  assert s.learner.end_eval_fn._cache_size() == 1
  assert "eval_fn" not in vars(s.learner)  # the ends evaluate, even at init
  for seed, r in zip((0, 1), runs):  # each is its seed's own run
    c.seed = seed
    np.testing.assert_array_equal(r.accuracy, single_run(c).accuracy)
  assert not np.array_equal(runs[0].accuracy, runs[1].accuracy)
  # On a mesh (here of one device): one derived learner, kept on the Setup.
  c.parallel.devices = 0
  s = experiment.setup(c)
  runs = [experiment.execute(s, experiment.initial_state(s, seed))
          for seed in (0, 1)]
  assert runs[0].learner is runs[1].learner is not s.learner
  assert runs[0].learner.mesh is not None
  assert runs[0].learner.chunk_fn._cache_size() == 1
  # Derived from the learner the Setup holds now, not from an earlier one.
  mesh, shardings = runs[0].learner.mesh, runs[0].learner.state_shardings
  s.learner = dataclasses.replace(s.learner, epochs=2)
  again = s.learner_for(0, False, mesh, shardings)
  assert again is not runs[0].learner and again.epochs == 2
  assert again is s.learner_for(0, False, mesh, shardings)
  c.parallel.devices = 1
  np.testing.assert_allclose(runs[1].accuracy, single_run(c).accuracy,
                             atol=1e-6)


def test_one_member_sweep_is_stacked_as_a_sweep():
  """A sweep of one run is not vmapped (see sweep.sweep), but its result
  has a sweep's shapes: a leading member axis of 1 on the accuracy, the
  accuracy before training, the metrics and the state, each equal to the
  plain run's."""
  c = small_config(2)
  r = sweep.sweep(c, seeds=[4])
  c.seed = 4
  single = jaxcl.run(c)
  res = r.result
  assert res.accuracy.shape == (1, 2, 2)
  assert res.random_accuracy.shape == (1, 2)
  np.testing.assert_array_equal(res.accuracy[0], single.accuracy)
  np.testing.assert_array_equal(res.random_accuracy[0],
                                single.random_accuracy)
  assert {k: v[0] for k, v in res.metrics.items()} == single.metrics
  for a, b in zip(jax.tree.leaves(res.state.params),
                  jax.tree.leaves(single.state.params)):
    assert np.shape(a) == (1,) + np.shape(b)
    np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(b))
