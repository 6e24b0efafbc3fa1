"""Baselines on Split MNIST (5 x 2 classes, MLP 400-400, 2 epochs): the
core issue's accuracy checks, with the committed experiment config."""


import numpy as np

import jaxcl
from experiments import split_mnist_baselines
from partial_runs import run_keeping_states


def run(mnist, data_dir, arg):
  """The committed config's run, on the session's MNIST (read once, not
  once per run: the config asks for no subset, split, noise or
  normalisation, so it is the data the run would read)."""
  c = split_mnist_baselines.get_config(arg)
  c.dataset.data_dir = data_dir
  c.report.progress = False
  dc = c.dataset
  assert not (dc.train_subset or dc.test_subset or dc.validation or
              dc.label_noise or tuple(dc.normalize)), dc
  return jaxcl.run(c, scenario=jaxcl.experiment.build_scenario(c, mnist))


def test_naive_class_incremental_forgets(mnist, data_dir):
  r = run(mnist, data_dir, "strategy=naive")
  assert r.accuracy.shape == (5, 5)
  # It learned each experience when it saw it...
  assert np.all(np.diag(r.accuracy) > 0.95)
  # ...and forgot experience 0 after the last one.
  assert r.accuracy[-1, 0] < 0.2
  assert r.metrics["bwt"] < -0.8


def test_joint_upper_bound(mnist, data_dir):
  r = run(mnist, data_dir, "strategy=joint")
  assert r.accuracy.shape == (1, 5)
  assert r.metrics["acc"] >= 0.95


def test_cumulative(mnist, data_dir):
  r = run(mnist, data_dir, "strategy=cumulative")
  assert r.metrics["acc"] >= 0.95
  assert r.accuracy[-1, 0] >= 0.9


def test_naive_task_incremental(mnist, data_dir):
  r = run(mnist, data_dir, "strategy=naive,kind=task")
  assert r.metrics["acc"] > 0.85


# ---------------------------------------------------------------------------
# Freezing (FACIL's baseline), on Split Digits.


def _freezing_run(**kwargs):
  """The runs stopped after 1, 2 and 3 experiences, as one run of three
  that keeps the state as each experience ended (one compiled program
  instead of three): ``[state_1, state_2, result_3]``."""
  c = jaxcl.default_config()          # Split Digits, 5 x 2, MLP 400-400
  c.model.widths = (32,)
  c.optimizer.name = "momentum"       # momentum and weight decay would
  c.optimizer.weight_decay = 1e-3     # move a part merely without gradient
  c.report.progress = False
  c.strategy.name = "freezing"
  c.strategy.freezing = kwargs
  three, states = run_keeping_states(c, 3)
  return states[0], states[1], three


def _same(a, b):
  import jax
  return all(np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_freezing_fixes_the_backbone_and_earlier_classes_output_weights():
  one, two, three = _freezing_run()
  p1, p2, p3 = one.params, two.params, three.state.params
  # The backbone is experience 0's from then on, bit for bit.
  assert _same(p2["backbone"], p1["backbone"])
  assert _same(p3["backbone"], p1["backbone"])
  # Each experience moves only its own classes' output weights (classes
  # 2-3 in experience 1, 4-5 in experience 2).
  k1, k2, k3 = (np.asarray(p["head"]["kernel"]) for p in (p1, p2, p3))
  assert np.array_equal(k2[:, [0, 1, 4, 5, 6, 7, 8, 9]],
                        k1[:, [0, 1, 4, 5, 6, 7, 8, 9]])
  assert not np.allclose(k2[:, 2:4], k1[:, 2:4])
  assert np.array_equal(k3[:, :4], k2[:, :4])
  assert not np.allclose(k3[:, 4:6], k2[:, 4:6])
  # So the first experience's classes are still recognised (Naive's are
  # forgotten), each head trained on its own classes.
  assert three.accuracy[-1, 0] > 0.8


def test_freezing_after_a_later_experience_and_all_outputs():
  one, two, three = _freezing_run(freeze_after=1, all_outputs=True)
  p1, p2, p3 = one.params, two.params, three.state.params
  assert not np.allclose(np.asarray(p2["backbone"]["Dense_0"]["kernel"]),
                         np.asarray(p1["backbone"]["Dense_0"]["kernel"]))
  assert _same(p3["backbone"], p2["backbone"])
  # all_outputs: every class's output weights train.
  k2, k3 = (np.asarray(p["head"]["kernel"]) for p in (p2, p3))
  assert not np.allclose(k3[:, :4], k2[:, :4])


def test_freezing_loss_is_over_the_experience_classes():
  import jax.numpy as jnp
  from jaxcl.strategies.freezing import freezing
  ss = freezing().init(_ctx_for_freezing(), None,
                       {"backbone": {}, "head": {}})
  ss = ss._replace(current=jnp.asarray([False, True, True, False]))
  logits = jnp.asarray([[3.0, 1.0, 0.5, 2.0], [0.0, -1.0, 2.0, 9.0]])
  batch = {"y": jnp.asarray([1, 2]), "mask": jnp.ones(2)}
  got = freezing().task_loss(None, ss, logits, batch)
  z = np.asarray(logits)[:, 1:3]
  want = np.mean([np.log(np.exp(z[i]).sum()) - z[i, t]
                  for i, t in enumerate([0, 1])])
  np.testing.assert_allclose(float(got), want, rtol=1e-6)
  # A replayed row of another class: the cross-entropy over every class.
  batch = {"y": jnp.asarray([1, 3]), "mask": jnp.ones(2)}
  got = freezing().task_loss(None, ss, logits, batch)
  z = np.asarray(logits)
  want = np.mean([np.log(np.exp(z[0, 1:3]).sum()) - z[0, 1],
                  np.log(np.exp(z[1]).sum()) - z[1, 3]])
  np.testing.assert_allclose(float(got), want, rtol=1e-6)


def _ctx_for_freezing():
  import types
  return types.SimpleNamespace(info=types.SimpleNamespace(num_classes=4))


def test_freezing_bad_arguments_and_models():
  import pytest
  from jaxcl.strategies.freezing import freezing
  for kwargs, needle in [(dict(freeze_after=-1), "freeze_after"),
                         (dict(freeze_after=1.5), "freeze_after"),
                         (dict(all_outputs="yes"), "all_outputs")]:
    with pytest.raises(ValueError, match=f"freezing: {needle}"):
      freezing(**kwargs)
  with pytest.raises(ValueError, match=r"freezing freezes .* 'backbone'"):
    freezing().init(_ctx_for_freezing(), None, {"w": np.zeros(2)})
