"""``train.augment``: every training step's prepared batch (incoming and
replayed rows) is augmented before the losses, as Mammoth's and FACIL's
CIFAR protocols augment each batch (``RandomCrop(32, padding=4)``, a
horizontal flip); the hooks after the step, and so the memories, see the
rows as they came (Mammoth stores ``not_aug_inputs``); a run without it
draws what it always drew; bad settings are refused by name."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcl
from jaxcl import augment, experiment, scenarios, train
from jaxcl.strategies import dmc as dmc_lib
from test_replay import batch_of
from test_train import quick_config


def _mirror(key, x):
  del key
  return x[:, :, ::-1, :]


def _setup(strategy="naive", **kw):
  c = quick_config(**{"strategy.name": strategy})
  if kw:
    c.strategy[strategy] = kw
  return experiment.setup(c)


def test_pad_crop_and_flip_compose_in_order():
  x = jnp.asarray(np.random.default_rng(0).random((6, 8, 8, 1)), jnp.float32)
  key = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(
      augment.pipeline(("pad_crop",), (8, 8, 1), crop_padding=0)(key, x), x)
  got = augment.pipeline(("flip", "pad_crop"), (8, 8, 1), crop_padding=2,
                         flip_p=1.0)(key, x)
  # OPS order whatever the order given: the crop's window, then the flip.
  k_crop, _ = jax.random.split(key, 2)
  want = augment.random_crop(k_crop, x, 2)[:, :, ::-1, :]
  np.testing.assert_array_equal(got, want)
  assert augment.OPS[:3] == ("pad_crop", "crop", "flip")


def test_augmenting_standardised_inputs_is_torchvisions_order():
  # torchvision runs its transforms on pixels and Normalize last: a crop
  # pads black and colour changes clip to [0, 1]. Given the inputs'
  # standardisation, the pipeline on standardised inputs equals the
  # pipeline on the pixels, then standardised (per channel); without it,
  # the padding is the mean colour (0 after standardising) and differs.
  rng = np.random.default_rng(1)
  pix = jnp.asarray(rng.random((5, 6, 6, 3)), jnp.float32)
  mean = np.float32([0.5071, 0.4866, 0.4409])
  std = np.float32([0.2009, 0.1984, 0.2023])
  std_x = (pix - mean) / std
  key = jax.random.PRNGKey(4)
  ops = ("pad_crop", "flip", "jitter")
  on_pixels = augment.pipeline(ops, (6, 6, 3), crop_padding=2)(key, pix)
  got = augment.pipeline(ops, (6, 6, 3), crop_padding=2,
                         normalize=(tuple(mean), tuple(std)))(key, std_x)
  np.testing.assert_allclose(np.asarray(got),
                             (np.asarray(on_pixels) - mean) / std,
                             rtol=1e-5, atol=1e-5)
  # Some crop reached the padding, so the fill matters.
  blind = augment.pipeline(ops, (6, 6, 3), crop_padding=2)(key, std_x)
  assert np.abs(np.asarray(blind) - np.asarray(got)).max() > 0.5
  # The run passes dataset.normalize on: its augmentation of standardised
  # digits pads with -mean / std, the standardised black.
  s = experiment.setup(quick_config(**{
      "train.augment": ("pad_crop",), "train.crop_padding": 8,
      "dataset.normalize": (0.25, 0.5)}))
  x = s.scenario.experiences[0].train_x[:4]
  out = np.asarray(s.learner.ctx.augment(jax.random.PRNGKey(0), x))
  # 8 pixels of padding on each side of an 8-pixel image: most crops show
  # some border, and every border pixel is -0.25 / 0.5 (so are the
  # digits' black pixels: the crops hold more of it than the images).
  border = np.isclose(out, -0.5)
  assert border.mean() > 0.2 and np.isclose(x, -0.5).mean() < border.mean()
  with pytest.raises(ValueError, match=r"train.augment: normalize: "
                     r"mean=\(0.1, 0.2\) has 2 values"):
    augment.pipeline(("flip",), (6, 6, 3), normalize=((0.1, 0.2), 1.0),
                     who="train.augment")


def test_strategies_own_augmentations_run_on_the_pixels():
  # SCR's views and PuriDivER's strong crop are the strategies' own
  # augmentations; the run's dataset.normalize reaches them through the
  # context (as nested tuples, so the context still keys jit caches), and
  # on standardised inputs they equal the same augmentation of the pixels,
  # standardised (the jitter's clip at 1 and the crop's black border are
  # the pixels').
  from jaxcl import models
  from jaxcl.strategies.puridiver import puridiver
  from jaxcl.strategies.scr import scr
  mean = [0.5071, 0.4866, 0.4409]
  std = [0.2009, 0.1984, 0.2023]
  m, sd = np.float32(mean), np.float32(std)
  rng = np.random.default_rng(2)
  pix = rng.random((24, 6, 6, 3)).astype(np.float32)
  pix[:, :2] = 0.98  # bright rows: the jitter clips them at 1
  y = np.arange(24) % 4
  sc = scenarios.from_arrays([(pix, y)], [(pix[:4], y[:4])])
  info = train.stream_info(sc, 8)
  model = models.build("mlp", 4, widths=(8,))
  plain = train.make_context(model, train.make_optimizer("sgd", 0.1), info)
  normed = train.make_context(model, train.make_optimizer("sgd", 0.1), info,
                              normalize=[mean, std])
  assert normed.normalize == (tuple(mean), tuple(std))
  hash(normed)
  batch = {"x": jnp.asarray(pix[:8]), "y": jnp.asarray(y[:8]),
           "task": jnp.zeros((8,), jnp.int32), "mask": jnp.ones((8,))}
  std_batch = dict(batch, x=(batch["x"] - m) / sd)
  key = jax.random.PRNGKey(5)

  def views(s, ctx, b):  # the batch's own rows (the memory is empty)
    state = train.init_state(ctx, s, 0)
    return np.asarray(s.prepare_batch(ctx, state.strategy, b,
                                      key)["scr_views"])[:8]

  s = scr(mem_size=16, batch_size=4, augment=("crop", "jitter"))
  want = (views(s, plain, batch) - m) / sd
  got = views(s, normed, std_batch)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  blind = views(s, plain, std_batch)  # jitter clipping standardised values
  assert np.abs(blind - got).max() > 0.5

  p = puridiver(mem_size=16, batch_size=8, crop_padding=3)

  def replayed(ctx, x):
    state = train.init_state(ctx, p, 0)
    mem = state.strategy.memory
    full = mem._replace(x=x[:16], y=jnp.asarray(y[:16]),
                        valid=jnp.ones((16,), bool))
    ss = state.strategy._replace(memory=full,
                                 experience=jnp.ones((), jnp.int32))
    out = p.prepare_batch(ctx, ss, batch, key)
    return np.asarray(out["x"][8:])

  want = (replayed(plain, jnp.asarray(pix)) - m) / sd
  got = replayed(normed, (jnp.asarray(pix) - m) / sd)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  assert np.isclose(got, -m / sd, atol=1e-4).any()  # black, standardised
  # The run's config reaches the context.
  c = quick_config(**{"dataset.normalize": ([0.25], [0.5])})
  assert experiment.setup(c).learner.ctx.normalize == ((0.25,), (0.5,))


def test_generators_and_auxiliary_images_work_on_the_pixels(digits,
                                                           monkeypatch):
  # Under dataset.normalize the VAE of generative replay learns the
  # pixels (its Bernoulli decoder's range) and its samples reach the
  # solvers standardised; DMC's auxiliary images, loaded as pixels, are
  # standardised as the stream's inputs are. Each compared with the same
  # work on a pixel stream.
  from jaxcl import models
  from jaxcl.models.vae import VAE
  from jaxcl.state import StepInfo
  from jaxcl.strategies.generative_replay import (generative_replay,
                                                  replay_rows)
  pix_map = augment.pixel_maps((0.25, 0.5), (8, 8, 1))
  x = jnp.linspace(0.0, 1.0, 6)
  np.testing.assert_allclose(pix_map[1](x), (x - 0.25) / 0.5)
  np.testing.assert_allclose(pix_map[0](pix_map[1](x)), x, atol=1e-6)
  assert augment.pixel_maps((), (8, 8, 1))[0](x) is x
  sc = scenarios.split(digits, 5)
  info = train.stream_info(sc, 8)
  model = models.build("mlp", 10, widths=(8,))
  tx = train.make_optimizer("sgd", 0.1)
  plain = train.make_context(model, tx, info)
  normed = train.make_context(model, tx, info, normalize=(0.25, 0.5))
  s = generative_replay(batch_size=4, hidden=(16,), latent=4)
  ss = train.init_state(plain, s, 0).strategy._replace(
      experience=jnp.ones((), jnp.int32), seen=jnp.arange(10) < 2)
  vae = VAE(tuple(info.input_shape), (16,), 4)
  key = jax.random.PRNGKey(3)
  rows = {name: replay_rows(ctx, vae, ss, key, 4, 1.0)["x"]
          for name, ctx in (("plain", plain), ("normed", normed))}
  np.testing.assert_allclose(rows["normed"], (rows["plain"] - 0.25) / 0.5,
                             rtol=1e-5, atol=1e-5)
  e = sc.experiences[0]
  b = {"x": jnp.asarray(e.train_x[:12]), "y": jnp.asarray(e.train_y[:12]),
       "task": jnp.asarray(e.train_task[:12]), "mask": jnp.ones((12,))}
  std_b = dict(b, x=(b["x"] - 0.25) / 0.5)

  def generator_after(ctx, batch):
    out = s.after_step(ctx, ss, StepInfo(None, None, None, None, batch,
                                         jnp.zeros(())))
    return np.concatenate([np.ravel(a) for a in
                           jax.tree.leaves(out.gen_params)])

  want = generator_after(plain, b)
  np.testing.assert_allclose(generator_after(normed, std_b), want,
                             rtol=1e-4, atol=1e-6)
  assert np.abs(generator_after(plain, std_b) - want).max() > 1e-4
  # DMC: the auxiliary images its consolidation trains the student on.
  from test_dmc import capture_aux_images
  seen_aux = capture_aux_images(monkeypatch)
  for ctx in (plain, normed):
    d = dmc_lib.dmc(aux_dataset="digits", aux_size=32, consolidate_epochs=1,
                    consolidate_batch_size=16)
    state = train.init_state(ctx, d, 0)
    for exp in sc.experiences[:2]:
      state = d.after_experience(ctx, d.before_experience(ctx, state, exp),
                                 exp)
  jax.effects_barrier()
  assert len(seen_aux) == 2 and seen_aux[0].shape == (32, 8, 8, 1)
  np.testing.assert_allclose(seen_aux[1], (seen_aux[0] - 0.25) / 0.5,
                             rtol=1e-5, atol=1e-5)


def test_gdumb_crops_the_pixels_of_standardised_memories(digits,
                                                         monkeypatch):
  # GDumb's own crop (crop_padding) pads with black, as torchvision's: on
  # standardised memories (dataset.normalize) it crops the pixels (in
  # [0, 1] here, where the memory holds values down to -0.5), through the
  # same wrapper as the pipeline's (augment.in_pixels).
  from jaxcl import buffers, models
  from jaxcl.strategies import gdumb as gdumb_mod
  sc = scenarios.split(digits, 5)
  info = train.stream_info(sc, 8)
  model = models.build("mlp", 10, widths=(8,))
  ctx = train.make_context(model, train.make_optimizer("sgd", 0.1), info,
                           normalize=(0.25, 0.5))
  e = sc.experiences[0]
  mem = buffers.init(16, info.input_shape)
  mem = mem._replace(x=(jnp.asarray(e.train_x[:16]) - 0.25) / 0.5,
                     y=jnp.asarray(e.train_y[:16]),
                     valid=jnp.ones((16,), bool))
  assert float(mem.x.min()) == -0.5
  cropped = []
  real_crop = gdumb_mod.random_crop

  def crop_spy(k, x, pad):
    jax.debug.callback(lambda v: cropped.append(np.asarray(v)), x)
    return real_crop(k, x, pad)

  monkeypatch.setattr(gdumb_mod, "random_crop", crop_spy)
  gdumb_mod.retrain(ctx, jax.random.PRNGKey(0), mem, epochs=1, batch_size=16,
                    learning_rate=0.1, min_learning_rate=0.0, momentum=0.0,
                    mask_logits=False, crop_padding=2)
  jax.effects_barrier()
  assert cropped
  assert cropped[0].min() >= -1e-6 and cropped[0].max() <= 1 + 1e-6


def test_the_step_trains_on_the_augmented_batch():
  # Naive with an augmentation that mirrors every image: the same step as
  # a plain one on the mirrored batch.
  s = _setup()
  ctx, strat = s.learner.ctx, s.learner.strategy
  assert ctx.augment is None  # the default: none
  e0 = s.scenario.experiences[0]
  state = strat.before_experience(ctx, train.init_state(ctx, strat, 0), e0)
  batch = batch_of(e0, n=16)
  mirrored = {**batch, "x": batch["x"][:, :, ::-1, :]}
  aug_ctx = dataclasses.replace(ctx, augment=_mirror)
  got, loss = train.train_step(aug_ctx, strat, state, batch)
  want, want_loss = train.train_step(ctx, strat, state, mirrored)
  plain, _ = train.train_step(ctx, strat, state, batch)
  for a, b, c in zip(jax.tree.leaves(got.params),
                     jax.tree.leaves(want.params),
                     jax.tree.leaves(plain.params)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
  assert not all(np.allclose(a, c) for a, c in zip(
      jax.tree.leaves(got.params), jax.tree.leaves(plain.params)))


def test_replayed_rows_are_augmented_and_memories_keep_the_rows_as_they_came():
  s = _setup("replay", mem_size=40, batch_size=8)
  ctx, strat = s.learner.ctx, s.learner.strategy
  seen = []

  def record(key, x):  # (traced: the shapes it is called with)
    seen.append(x.shape)
    return _mirror(key, x)

  aug_ctx = dataclasses.replace(ctx, augment=record)
  e0 = s.scenario.experiences[0]
  state = strat.before_experience(ctx, train.init_state(ctx, strat, 0), e0)
  batch = batch_of(e0, n=16)
  state, _ = train.train_step(aug_ctx, strat, state, batch)
  # 16 incoming rows and the 8 replayed ones, all augmented.
  assert seen == [(24, 8, 8, 1)]
  mem = state.strategy.memory
  stored = np.asarray(mem.x)[np.asarray(mem.valid)]
  raw = np.asarray(batch["x"])
  assert len(stored) == 16
  for row in stored:  # as the batch brought it, not mirrored
    assert any(np.array_equal(row, r) for r in raw)
  assert not any(np.array_equal(stored[0], r) for r in raw[:, :, ::-1])


def test_a_run_with_augmentation_trains_differently_and_reproducibly():
  runs = []
  for aug in ((), ("pad_crop",), ("pad_crop",)):
    c = quick_config(**{"train.augment": aug, "train.crop_padding": 1,
                        "scenario.n_experiences": 2})
    runs.append(jaxcl.run(c))
  assert runs[0].learner.ctx.augment is None
  assert runs[1].learner.ctx.augment is not None
  np.testing.assert_array_equal(runs[1].accuracy, runs[2].accuracy)
  assert not np.array_equal(runs[0].accuracy, runs[1].accuracy)


def test_command_line_form_and_bad_settings():
  # --config.train.augment=pad_crop,flip arrives as one string.
  s = experiment.setup(quick_config(**{"train.augment": ("pad_crop,flip",)}))
  assert "augmentation of each training batch: pad_crop, flip (padding 4)" \
      in experiment.describe(s, experiment.initial_state(s, 0))
  # (A ConfigDict refuses a bare string for the tuple field itself; a
  # plain dict of settings reaches the check.)
  with pytest.raises(ValueError, match=r"train.augment must be a sequence "
                     r"of names from \['pad_crop', 'crop', 'flip', "
                     r"'autoaugment', 'jitter', 'gray'\].*got 'pad_crop'"):
    experiment._augment_ops({"augment": "pad_crop"})
  for bad, match in (
      (("rotate",), r"train.augment: unknown augmentation 'rotate'"),
      (("jitter",), r"train.augment: 'jitter' needs RGB images \(H, W, 3\); "
                    r"the inputs are shaped \(8, 8, 1\)")):
    with pytest.raises(ValueError, match=match):
      experiment.setup(quick_config(**{"train.augment": bad}))
  with pytest.raises(ValueError, match=r"crop_padding must be a whole number "
                     r"of pixels >= 0, got -1"):
    experiment.setup(quick_config(**{"train.augment": ("pad_crop",),
                                     "train.crop_padding": -1}))
  # Flat inputs have no image to crop or flip.
  rng = np.random.default_rng(0)
  x = rng.normal(size=(20, 6)).astype(np.float32)
  y = np.arange(20) % 2
  flat = scenarios.from_arrays([(x, y)], [(x, y)])
  with pytest.raises(ValueError, match=r"'flip' needs images shaped "
                     r"\(H, W, C\); the inputs are shaped \(6,\)"):
    experiment.setup(quick_config(**{"train.augment": ("flip",)}), flat)


# The default suite checks a retraining over a memory (GDumb's, through
# _epochs as EEIL's and DMC's) and the two importance passes; the other
# loops (25 s of the suite's CPU, session 55) run with -m slow.
_SLOW = pytest.mark.slow


@pytest.mark.parametrize("name,kw", [
    ("gdumb", {"epochs": 2}),  # GDumb's retraining (its steps learn nothing)
    pytest.param("eeil", {"finetune_epochs": 2},  # the balanced fine-tuning
                 marks=_SLOW),
    pytest.param("packnet", {}, marks=_SLOW),  # the retraining after pruning
    pytest.param("progress_compress", {"lam": 0.0},  # the compress phase
                 marks=_SLOW),
    # the consolidation, on its auxiliary images
    pytest.param("dmc", {}, marks=_SLOW),
    ("ewc", {}),  # not a training loop: its Fisher, as Mammoth's and
    ("mas", {}),  # FACIL's train loaders augment it (MAS as Avalanche's)
])
def test_strategies_own_fitting_loops_are_augmented(name, kw, monkeypatch):
  """Strategies that train the model in loops of their own go through
  ``train.augment`` too, as a PyTorch loader's transform augments every
  pass over the training data: with an augmentation that mirrors every
  image, a run equals a plain run on the mirrored stream (its memories
  then hold the mirrored rows, as the run's hold the rows as they came
  and replay them mirrored); and it is not the plain run on the stream
  itself. Importance estimates (EWC's Fisher, MAS's) are augmented too,
  as the references' training loaders augment them. (Herding reads the
  rows as they are: EEIL's, here on features a mirror does not change.
  P&C's Fisher is kept out of the parameters by ``lam=0``.)"""
  import resume_configs
  from jaxcl.strategies import _class_incremental
  monkeypatch.setattr(_class_incremental, "backbone_features",
                      lambda ctx: lambda p, ms, x, t: (
                          x + x[:, :, ::-1, :]).reshape(x.shape[0], -1))
  c = resume_configs.config(name)
  c.checkpoint.every_steps = 0
  c.scenario.n_experiences = 2 if name != "packnet" else 5
  if name in resume_configs.TASK:
    c.scenario.kind = "task"
  c.strategy[name] = {**c.strategy.get(name, {}), **kw}
  sc = experiment.setup(c).scenario
  flipped = dataclasses.replace(sc, experiences=[
      dataclasses.replace(e, inputs=scenarios.given(
          np.ascontiguousarray(e.train_x[:, :, ::-1, :]), e.test_x))
      for e in sc.experiences])
  with monkeypatch.context() as m:
    if name == "dmc":  # its auxiliary images mirrored too
      datasets_load = dmc_lib.datasets.load
      m.setattr(dmc_lib.datasets, "load", lambda *a, **k: dataclasses.replace(
          datasets_load(*a, **k), train_x=np.ascontiguousarray(
              datasets_load(*a, **k).train_x[:, :, ::-1, :])))
    s = experiment.setup(c, scenario=flipped)
    plain = experiment.execute(s, experiment.initial_state(s, c.seed))
  if name == "dmc":  # (its strategy keeps the mirrored images it read)
    same = jaxcl.run(c, scenario=sc)
  else:
    # The plain run's learner, and so its compiled programs (a third of
    # the test's time), on the stream as it is.
    s = dataclasses.replace(s, scenario=experiment.setup(c, sc).scenario)
    same = experiment.execute(s, experiment.initial_state(s, c.seed))
  with monkeypatch.context() as m:
    m.setattr(experiment, "_augmenter", lambda tc, sc, norm: _mirror)
    got = jaxcl.run(c, scenario=sc)
  assert got.learner.ctx.augment is _mirror
  for a, b in zip(jax.tree.leaves(got.state.params),
                  jax.tree.leaves(plain.state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  assert not all(np.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(
      jax.tree.leaves(got.state.params), jax.tree.leaves(same.state.params)))


def test_gdumb_refuses_two_augmentations_of_its_retraining():
  c = quick_config(**{"strategy.name": "gdumb",
                      "train.augment": ("pad_crop",)})
  c.strategy.gdumb = {"crop_padding": 2}
  with pytest.raises(ValueError, match=r"gdumb crop_padding=2 and "
                     r"train.augment would both augment"):
    jaxcl.run(c)
