"""optimizer.schedule='plateau' (jaxcl/plateau.py): FACIL's patience scheme
by hand, its held-out split, its run through the experience loop (the
rate each epoch trains at, the best model kept and restored, the early
stop) and its refusals."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import experiment, plateau, scenarios, train
from test_train import quick_config


def test_update_follows_facils_train_loop_by_hand():
  # FACIL's loop with patience 2, factor 10, lr_min 1e-3 from lr 0.1:
  # better, better, worse, worse (patience out: 0.01, reset), better,
  # worse, worse (0.001: not below lr_min, go on), worse, worse (1e-4:
  # below lr_min, stop).
  p = plateau.start(0.1, 2)
  kw = dict(patience=2, factor=10.0, lr_min=1e-3)
  got = []
  for loss in [1.0, 0.9, 0.95, 0.97, 0.8, 0.85, 0.9, 0.99, 0.98]:
    p, action = plateau.update(p, loss, **kw)
    got.append((action, round(p.lr, 6), p.best, p.wait))
  assert got == [("best", 0.1, 1.0, 2), ("best", 0.1, 0.9, 2),
                 ("wait", 0.1, 0.9, 1), ("decay", 0.01, 0.9, 2),
                 ("best", 0.01, 0.8, 2), ("wait", 0.01, 0.8, 1),
                 ("decay", 0.001, 0.8, 2), ("wait", 0.001, 0.8, 1),
                 ("stop", 0.0001, 0.8, 0)]
  # Equal is not better (FACIL's `<`).
  assert plateau.update(plateau.start(0.1, 5), 1.0, **kw)[0].best == 1.0
  assert plateau.update(plateau.Plateau(0.1, 1.0, 5), 1.0, **kw)[1] == "wait"


def test_holdout_splits_each_experience_at_random(digits):
  sc = scenarios.split(digits, 5)
  train_sc, held = plateau.holdout(sc, 0.1)
  for e, t, h in zip(sc.experiences, train_sc.experiences, held):
    n, k = e.num_train, int(round(e.num_train * 0.1))
    assert (t.num_train, len(h.test_y)) == (n - k, k)
    # The two parts are the experience's rows, each once.
    rows = np.concatenate([t.train_x, h.test_x]).reshape(n, -1)
    ref = e.train_x.reshape(n, -1)
    both = np.concatenate([rows, ref])
    assert len(np.unique(both, axis=0)) == len(np.unique(ref, axis=0))
    np.testing.assert_array_equal(np.sort(np.concatenate(
        [t.train_y, h.test_y])), np.sort(e.train_y))
    np.testing.assert_array_equal(h.test_x, h.train_x)
  # Not the experience's first rows, and the same draw every time.
  e0, h0 = sc.experiences[0], held[0]
  assert not np.array_equal(h0.test_x, e0.train_x[:len(h0.test_y)])
  np.testing.assert_array_equal(plateau.holdout(sc, 0.1)[1][0].test_x,
                                h0.test_x)
  # Testing is untouched.
  assert train_sc.eval_experiences == sc.eval_experiences
  with pytest.raises(scenarios.ScenarioError, match=r"optimizer.holdout="
                     r"0.001 holds out 0 of experience 0's \d+ training "
                     r"examples"):
    plateau.holdout(sc, 0.001)


def _plateau_config(**kw):
  return quick_config(**{"optimizer.schedule": "plateau",
                         "optimizer.patience": 2, "optimizer.lr_factor": 10.0,
                         "optimizer.lr_min": 1e-3, "train.epochs": 8,
                         "scenario.n_experiences": 2, **kw})


def test_a_run_lowers_the_rate_restores_the_best_model_and_stops(
    monkeypatch):
  """The held-out losses scripted (the monitor replaced): each epoch
  trains at the scheme's rate, the first at the base rate in every
  experience; a decay trains on from the kept model; an experience ends
  with its best model; the rate falling below lr_min ends the
  experience early."""
  losses = [1.0, 0.9, 0.95, 0.97, 0.8, 0.85, 0.9, 0.99,   # exp. 0
            1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6]            # exp. 1
  script = iter(losses)
  seen = []

  def fake_monitor(self):
    def monitor(state, held):
      seen.append((float(state.opt_state.hyperparams["learning_rate"]),
                   _flat(state.params)))
      return next(script)
    return monitor

  monkeypatch.setattr(train.Learner, "monitor_fn", property(fake_monitor))
  c = _plateau_config()
  sc = experiment.build_scenario(c)
  first = jaxcl.run(c, scenario=_first(sc))
  # Experience 0: epochs at 0.1, 0.1, 0.1, 0.1 (then 0.01 from the decay
  # after epoch 4), 0.01, 0.01, 0.01 (decay to 0.001), 0.001.
  assert [lr for lr, _ in seen] == pytest.approx([0.1] * 4 + [0.01] * 3 +
                                                 [0.001])
  # It ends with the model of its best epoch (the fifth, loss 0.8).
  np.testing.assert_array_equal(_flat(first.state.params), seen[4][1])
  seen.clear()
  script = iter(losses)
  r = jaxcl.run(c)
  # Experience 1 starts again at the base rate and stops after 7 epochs
  # (0.1, 0.1, 0.1 -> 0.01, 0.01 -> 0.001, 0.001 -> 1e-4 < lr_min).
  lrs = [lr for lr, _ in seen]
  assert len(lrs) == 15
  assert lrs[8:] == pytest.approx([0.1] * 3 + [0.01] * 2 + [0.001] * 2)
  np.testing.assert_array_equal(_flat(r.state.params), seen[8][1])


def test_a_decay_trains_on_from_the_best_model(monkeypatch):
  """Patience 1 and a factor that leaves the rate at ~0 after a decay: the
  epoch after it starts from the kept model (the second epoch's), so the
  model at its end is that model, not the third epoch's."""
  script = iter([1.0, 0.9, 0.95, 0.96])
  seen = []

  def fake_monitor(self):
    def monitor(state, held):
      seen.append(_flat(state.params))
      return next(script)
    return monitor

  monkeypatch.setattr(train.Learner, "monitor_fn", property(fake_monitor))
  c = _plateau_config(**{"optimizer.patience": 1, "optimizer.lr_factor": 1e9,
                         "optimizer.lr_min": 1e-30, "train.epochs": 4})
  jaxcl.run(c, scenario=_first(experiment.build_scenario(c)))
  assert len(seen) == 4
  np.testing.assert_allclose(seen[3], seen[1], atol=1e-6)
  assert np.abs(seen[2] - seen[1]).max() > 1e-3


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(a))
                         for a in jax.tree.leaves(tree)])


def _first(sc):
  return dataclasses.replace(sc, experiences=sc.experiences[:1],
                             eval_experiences=sc.eval_experiences[:1])


def test_an_early_stop_is_said_in_the_experience_line(monkeypatch,
                                                      tmp_path, capsys):
  script = iter([1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6])
  monkeypatch.setattr(train.Learner, "monitor_fn",
                      property(lambda self: lambda s, h: next(script)))
  c = _plateau_config(**{"report.progress": True})
  r = jaxcl.run(c, str(tmp_path),
                scenario=_first(experiment.build_scenario(c)))
  err = capsys.readouterr().err
  steps = r.learner.epoch_steps
  assert (f"experience 1/1: {7 * steps} of {8 * steps} steps (stopped "
          "early: the rate fell below optimizer.lr_min)") in err, err


def test_the_held_out_loss_is_the_cross_entropy_of_its_rows():
  # The monitor by hand: the model's mean cross-entropy over the held-out
  # rows of the experience (padding rows excluded).
  s = experiment.setup(_plateau_config())
  state = experiment.initial_state(s, 0)
  h = s.monitors[1]
  held = train.test_arrays([h], s.learner.eval_batch_size)
  assert held["x"].shape[1] > len(h.test_y)  # padded
  got = float(s.learner.monitor_fn(state, held))
  logits = s.learner.ctx.logits(state.params, state.model_state,
                                jnp.asarray(h.test_x),
                                jnp.asarray(h.test_task))
  ls = jax.nn.log_softmax(np.asarray(logits, np.float64), -1)
  want = -np.mean(np.take_along_axis(np.asarray(ls), h.test_y[:, None],
                                     1))
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_plateau_settings_and_what_it_cannot_do_are_refused():
  for kw, match in [
      ({"optimizer.patience": 0}, r"optimizer.patience must be an int >= 1"),
      ({"optimizer.lr_factor": 1.0}, r"optimizer.lr_factor must be > 1"),
      ({"optimizer.lr_min": 0.0}, r"optimizer.lr_min must be a finite "
       r"number > 0"),
      ({"optimizer.holdout": 1.0}, r"optimizer.holdout must be a fraction "
       r"in \(0, 1\)"),
      ({"checkpoint.every_steps": 5}, r"checkpoint.every_steps=0 .*got 5")]:
    with pytest.raises(experiment.ConfigError, match=match):
      experiment.setup(_plateau_config(**kw))
  from jaxcl import sweep
  with pytest.raises(experiment.ConfigError, match=r"one after another "
                     r"\(jaxcl run per seed\), not as one sweep of 2"):
    sweep.sweep(_plateau_config(), seeds=[0, 1])
  # Its settings given for another schedule would be ignored: refused.
  c = quick_config()
  with pytest.raises(experiment.ConfigError, match=r"optimizer.patience=3: "
                     r"optimizer.schedule='constant' would ignore it"):
    c.optimizer.patience = 3
    experiment.check_overrides(c, ["optimizer.patience"])
