"""TwF (Transfer without Forgetting): the distillation term against NumPy,
the adapters' masks, the loss's wiring, the frozen teacher, the masks
stored at an experience's end, Split Digits, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import np_log_softmax, np_softmax
from jaxcl import experiment, models, strategies, train
from jaxcl.models.batch_norm import BatchNorm
from jaxcl.strategies.twf import (Adapters, afd_layer_loss, diverse_loss,
                                  stage_maps, twf)
from test_replay import B, after_first, batch_of, config, make_ctx


def resnet_ctx(sc, name="resnet18", lr=0.05, **kw):
  return make_ctx(sc, None, lr, name, **({"width": 2} | kw))


# The strategy's tests run He et al.'s CIFAR ResNet of depth 8 (a stem and
# three stages of one block: four maps): a ResNet-18's step compiles in
# ~35 s on this CPU, this one's in a few.
SMALL = dict(name="resnet32", depth=8, width=4)


# ---------------------------------------------------------------------------
# The distillation term, in NumPy after the authors' afd.py.


def np_diverse(rho, rows):
  p = rho.mean(axis=(1, 2))[rows > 0]
  if len(p) == 0:
    return 0.0
  dots = p @ p.T / 2.0
  m = dots.max(1, keepdims=True)
  lse = (m[:, 0] + np.log(np.exp(dots - m).sum(1)))
  return lse.mean() - 0.5 - np.log(len(p))


def np_afd(fm_s, fm_t, rho, logit0, ok, forced, stored, lam_r, lam_d):
  fm_s, fm_t = fm_s.astype(np.float64), fm_t.astype(np.float64)
  loss = 0.0
  rows = (ok > 0) & forced
  if lam_r > 0:
    if rows.any():
      z, x = stored[rows], logit0[rows].astype(np.float64)
      bce = np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))
      loss += lam_r * bce.mean()
  else:
    rho = np.where(forced[:, None, None, None], stored, rho)
  real = fm_t[ok > 0]
  margin = np.array([c[c < 0].mean() if (c < 0).any() else 0.0
                     for c in np.moveaxis(real, -1, 0).reshape(
                         real.shape[-1], -1)])
  t = np.maximum(fm_t, margin)
  norm = lambda a: a / (np.sqrt((a ** 2).sum(axis=(1, 2), keepdims=True))
                        + 1e-6)
  t, s = norm(t), norm(fm_s)
  dist = (s - t) ** 2 * (1.0 - ((s <= t) & (t <= 0)))
  per_row = (rho * dist).mean(axis=(1, 2)).sum(-1)
  loss += per_row[ok > 0].mean()
  return loss + lam_d * np_diverse(rho, (ok > 0) & ~forced)


@pytest.mark.parametrize("lam_r", [1.5, 0.0])
def test_afd_layer_loss_matches_the_authors_formulas(lam_r):
  rng = np.random.default_rng(0)
  b, h, w, c = 6, 3, 3, 4
  fm_s = rng.normal(size=(b, h, w, c)).astype(np.float32)
  fm_t = rng.normal(size=(b, h, w, c)).astype(np.float32)
  rho = (rng.random((b, h, w, c)) > 0.4).astype(np.float32)
  logit0 = rng.normal(size=(b, h, w, c)).astype(np.float32)
  stored = (rng.random((b, h, w, c)) > 0.5).astype(np.float32)
  ok = np.array([1, 1, 1, 1, 1, 0], np.float32)
  forced = np.array([0, 0, 1, 1, 0, 1], bool)
  # The padding row's values would move the margin and the means.
  fm_t[5] = -50.0
  got = afd_layer_loss(*map(jnp.asarray, (fm_s, fm_t, rho, logit0, ok,
                                          forced, stored)), lam_r, 0.3)
  want = np_afd(fm_s, fm_t, rho, logit0, ok, forced, stored, lam_r, 0.3)
  np.testing.assert_allclose(float(got), want, rtol=1e-5)
  # Each part counts: without the diversity term, or with another mask.
  assert abs(float(afd_layer_loss(*map(jnp.asarray, (
      fm_s, fm_t, rho, logit0, ok, forced, stored)), lam_r, 0.0))
             - want) > 1e-4
  flipped = afd_layer_loss(*map(jnp.asarray, (
      fm_s, fm_t, 1 - rho, logit0, ok, forced, stored)), lam_r, 0.3)
  assert abs(float(flipped) - want) > 1e-3


def test_diverse_loss_and_its_empty_case():
  rng = np.random.default_rng(1)
  rho = (rng.random((5, 2, 2, 3)) > 0.5).astype(np.float32)
  rows = np.array([1, 0, 1, 1, 0], np.float32)
  np.testing.assert_allclose(float(diverse_loss(jnp.asarray(rho),
                                                jnp.asarray(rows))),
                             np_diverse(rho, rows), rtol=1e-5)
  assert float(diverse_loss(jnp.asarray(rho), jnp.zeros(5))) == 0.0


# ---------------------------------------------------------------------------
# The model's stage maps and the adapters.


def test_resnet_stage_maps_in_call_order(stream):
  ctx = resnet_ctx(stream)
  params, ms = train.init_variables(ctx, jax.random.PRNGKey(0))
  assert "preact" not in ms  # sown only when asked for, not model state
  x = jnp.asarray(stream.experiences[0].train_x[:4])
  t = jnp.zeros((4,), jnp.int32)
  _, maps = stage_maps(ctx, params, ms, x, t, train=False)
  assert [m.shape for m in maps] == [(4, 8, 8, 2), (4, 8, 8, 2),
                                     (4, 4, 4, 4), (4, 2, 2, 8),
                                     (4, 1, 1, 16)]
  # The last stage's map is what the features pool (after the ReLU).
  feats, _ = ctx.apply(params, ms, x, t, features=True)
  np.testing.assert_allclose(jnp.mean(jax.nn.relu(maps[-1]), axis=(1, 2)),
                             feats, rtol=1e-5, atol=1e-6)
  # The stem's: one convolution and batch norm of the input, so it has
  # negative values (pre-activation), unlike the ReLU outputs.
  assert float(jnp.min(maps[0])) < 0


def test_batch_norm_without_affine_has_no_parameters():
  bn = BatchNorm(use_affine=False)
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 3)) * 3 + 2
  v = bn.init(jax.random.PRNGKey(1), x)
  assert "params" not in v
  y, _ = bn.apply(v, x, mutable=["batch_stats"])
  np.testing.assert_allclose(y.mean(0), 0, atol=1e-5)
  np.testing.assert_allclose(y.std(0), 1, atol=1e-3)


def test_adapter_masks_binary_straight_through_and_per_task():
  rng = np.random.default_rng(0)
  maps = [jnp.asarray(rng.normal(size=(4, 3, 3, 5)), jnp.float32)]
  task = jnp.array([0, 0, 1, 1])
  ad = Adapters(1, 2)
  v = ad.init(jax.random.PRNGKey(0), maps, task, False)
  rho, l0 = ad.apply(v, maps, task, False)
  assert set(np.unique(np.asarray(rho[0]))) <= {0.0, 1.0}
  # Training mode: the Gumbel draw decides; a huge draw for one choice
  # forces it.
  g = np.zeros((4, 3, 3, 5, 2), np.float32)
  for pick, want in ((0, 1.0), (1, 0.0)):
    g[...] = 0
    g[..., pick] = 1e3
    (rho_t, _), _ = ad.apply(v, maps, task, True, [jnp.asarray(g)],
                             mutable=["batch_stats"])
    np.testing.assert_array_equal(rho_t[0], want)
  # Straight-through: the hard mask has the soft mask's gradient.
  def total(g0):
    (r, _), _ = ad.apply(v, maps, task, True, [g0], mutable=["batch_stats"])
    return jnp.sum(r[0])
  grad = jax.grad(total)(jnp.zeros((4, 3, 3, 5, 2)))
  assert float(jnp.abs(grad).max()) > 1e-3
  np.testing.assert_allclose(grad[..., 0], -grad[..., 1], atol=1e-6)
  # Per task: task 1's weights move task 1's rows only.
  p = jax.tree.map(lambda a: a, v["params"])
  mix = p["_Adapter_0"]["mix"]
  p["_Adapter_0"]["mix"] = mix.at[1].set(-mix[1])
  _, l0_b = ad.apply({**v, "params": p}, maps, task, False)
  np.testing.assert_array_equal(l0_b[0][:2], l0[0][:2])
  assert float(jnp.abs(l0_b[0][2:] - l0[0][2:]).max()) > 1e-3


# ---------------------------------------------------------------------------
# The strategy.


@pytest.fixture(scope="module")
def trained(stream):
  """A TwF state after 6 steps of experience 0 and its end, at experience
  1's start, plus 3 steps of experience 1; with its initial state."""
  ctx = resnet_ctx(stream, **SMALL)
  s = twf(mem_size=30, batch_size=B)
  init = train.init_state(ctx, s, 0)
  state, step = after_first(ctx, s, stream, 6)
  at_start = state
  for i in range(3):
    state = step(state, batch_of(stream.experiences[1], start=B * i))
  return ctx, s, init, at_start, state


def test_teacher_frozen_adapters_trained(trained):
  ctx, s, init, _, state = trained
  ss = state.strategy
  for a, b in zip(jax.tree.leaves(ss.teacher), jax.tree.leaves(init.params)):
    np.testing.assert_array_equal(a, b)
  moved = [float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(ss.adapters), jax.tree.leaves(init.strategy.adapters))]
  assert max(moved) > 1e-4
  assert max(float(jnp.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(init.params))) > 1e-3


def test_end_of_experience_masks(trained, stream):
  ctx, s, _, at_start, state = trained
  ss = at_start.strategy
  mem = ss.memory
  fresh = np.asarray(mem.valid & (mem.experience == 0))
  assert fresh.sum() == 30
  # By hand: the teacher's maps in batches of B memory rows (batch
  # statistics over that batch's rows), the adapters in evaluation mode.
  ad = Adapters(len(ss.maps), ctx.info.num_experiences)

  @jax.jit
  def masks(x, task, ok):
    _, fm = stage_maps(ctx, ss.teacher, ss.teacher_state, x, task,
                       train=True, mask=ok)
    return ad.apply({"params": ss.adapters, **ss.adapter_state}, fm,
                    jnp.zeros((B,), jnp.int32), False)[0]

  for start in range(0, 30, B):
    sl = slice(start, start + B)
    rho = masks(mem.x[sl], mem.task[sl], jnp.asarray(fresh[sl], jnp.float32))
    for stored, r in zip(ss.maps, rho):
      np.testing.assert_array_equal(np.asarray(stored[sl]),
                                    np.asarray(r) > 0.5)
  # Experience 1's end: its rows get masks; experience 0's keep theirs.
  end = s.after_experience(ctx, state, stream.experiences[1])
  mem1 = end.strategy.memory
  old = np.asarray(mem1.valid & (mem1.experience == 0))
  new = np.asarray(mem1.valid & (mem1.experience == 1))
  assert old.sum() > 0
  for before, after in zip(state.strategy.maps, end.strategy.maps):
    np.testing.assert_array_equal(np.asarray(after)[old],
                                  np.asarray(before)[old])
  if new.any():  # reservoir rows from experience 1 were (re)computed
    assert any(not np.array_equal(np.asarray(a)[new], np.asarray(b)[new])
               for a, b in zip(state.strategy.maps, end.strategy.maps))


def test_loss_terms_wired_to_the_memory_rows(trained, stream):
  ctx, _, _, at_start, _ = trained
  e1 = stream.experiences[1]
  batch0 = batch_of(e1)
  params = at_start.params
  ss = at_start.strategy
  key = jax.random.PRNGKey(3)
  both = lambda b: (jnp.concatenate([b["x"], b["twf_x"]]),
                    jnp.concatenate([b["task"], b["twf_task"]]),
                    jnp.concatenate([b["mask"], b["twf_ok"]]))

  @jax.jit  # one program (op by op, the ResNet passes took 40 s)
  def reference(params, ss, b):
    x, t, ok = both(b)
    out = ctx.logits(params, ss.model_state, x, t, train=True, mask=ok)
    _, fm_s = stage_maps(ctx, params, ss.model_state, x, t, train=True,
                         mask=ok)
    _, fm_t = stage_maps(ctx, ss.teacher, ss.teacher_state, x, t,
                         train=True, mask=ok)
    exps = jnp.concatenate([jnp.ones((B,), jnp.int32), b["twf_exp"]])
    forced = jnp.concatenate([jnp.zeros((B,), bool), b["twf_exp"] < 1])
    gumbels = [b[f"twf_gumbel{i}"] for i in range(len(fm_t))]
    ad = Adapters(len(fm_t), ctx.info.num_experiences)
    (rho, l0), _ = ad.apply({"params": ss.adapters, **ss.adapter_state},
                            fm_t, exps, True, gumbels, ok,
                            mutable=["batch_stats"])
    stored = [jnp.concatenate([jnp.zeros((B,) + m.shape[1:]),
                               b[f"twf_map{i}"].astype(jnp.float32)])
              for i, m in enumerate(ss.maps)]
    terms = [afd_layer_loss(*a, ok, forced, st, 1.5, 0.3)
             for a, st in zip(zip(fm_s, fm_t, rho, l0), stored)]
    return out, sum(terms) / len(terms), jnp.sum(forced)

  # Replay terms only: alpha * MSE(logits, stored) + beta * CE over seen,
  # on the memory rows of a pass over incoming and memory rows together.
  s = twf(mem_size=30, batch_size=B, lambda_fp=0.0, alpha=0.7, beta=1.3)
  batch = s.prepare_batch(ctx, ss, batch0, key)
  out, _, _ = reference(params, ss, batch)
  out = np.asarray(out)[B:].astype(np.float64)
  okm = np.asarray(batch["twf_ok"]) > 0
  assert okm.sum() == B
  mse = ((out - np.asarray(batch["twf_z"])) ** 2)[okm].mean()
  seen = np.asarray(ss.seen)
  assert seen[:4].all() and not seen[4:].any()
  masked = np.where(seen, out, -1e9)
  ce = -np_log_softmax(masked)[np.arange(B), np.asarray(batch["twf_y"])]
  want = 0.7 * mse + 1.3 * ce[okm].mean()
  loss = jax.jit(lambda s_, p, ss_, b: s_.loss(ctx, ss_, p, b, None),
                 static_argnums=0)
  np.testing.assert_allclose(float(loss(s, params, ss, batch)), want,
                             rtol=1e-4)
  # Distillation only: lambda_fp times the stages' mean of
  # afd_layer_loss, with the memory rows of experience 0 forced to their
  # stored masks and the incoming rows not.
  s2 = twf(mem_size=30, batch_size=B, alpha=0.0, beta=0.0, lambda_fp=2.0)
  batch = s2.prepare_batch(ctx, ss, batch0, key)
  _, afd, n_forced = reference(params, ss, batch)
  assert int(n_forced) == B  # the memory holds experience 0 only
  np.testing.assert_allclose(float(loss(s2, params, ss, batch)),
                             2.0 * float(afd), rtol=1e-4)
  # Its gradient reaches the model (through the student's maps).
  g = jax.jit(jax.grad(lambda p: s2.loss(ctx, ss, p, batch, None)))(params)
  assert max(float(jnp.abs(a).max()) for a in jax.tree.leaves(g)) > 0


def test_task_loss_is_over_the_current_classes_for_incoming_rows(trained):
  ctx, s, _, at_start, _ = trained
  ss = at_start.strategy
  rng = np.random.default_rng(0)
  n = B + 4
  logits = rng.normal(size=(n, 10)).astype(np.float32)
  y = np.concatenate([rng.integers(2, 4, B), [0, 1, 2, 3]])
  mask = np.ones((n,), np.float32)
  mask[3] = 0
  got = s.task_loss(ctx, ss, jnp.asarray(logits),
                    {"y": jnp.asarray(y), "mask": jnp.asarray(mask)})
  cur = np.zeros(10, bool)
  cur[2:4] = True
  rows = np.where((np.arange(n) < B)[:, None] & ~cur, -1e9, logits)
  ce = -np.log(np_softmax(rows.astype(np.float64))[np.arange(n), y])
  np.testing.assert_allclose(float(got), (ce * mask).sum() / mask.sum(),
                             rtol=1e-5)


@pytest.mark.slow  # 40 s (two compiled runs of a ResNet-18); the rows of
# experiments/split_mnist_pretrained.py measure TwF's accuracy
def test_twf_keeps_old_classes_on_split_digits(full_stream):
  old = {}
  for spec, kw in (("naive", {}), ("twf", dict(twf=dict(mem_size=100)))):
    c = config(spec, lr=0.05, **kw)
    c.model.name, c.model.width = "resnet18", 2
    c.optimizer.name = "sgd"
    acc = experiment.run(c, scenario=full_stream).accuracy
    old[spec] = float(acc[-1, :-1].mean())
  assert old["naive"] < 0.1, old
  assert old["twf"] > old["naive"] + 0.3, old


def test_twf_bad_inputs(stream):
  for kw, match in (({"alpha": -1.0}, "twf: alpha"),
                    ({"lambda_fp": float("nan")}, "twf: lambda_fp"),
                    ({"mem_size": 0}, "twf: mem_size"),
                    ({"batch_size": -1}, "twf: batch_size")):
    with pytest.raises(ValueError, match=match):
      twf(**kw)
  info = train.stream_info(stream, B)
  mlp = train.make_context(models.build("mlp", 10, widths=(8,)),
                           train.make_optimizer("sgd", 0.1), info)
  with pytest.raises(ValueError, match="twf distils the stage feature maps "
                     "of a ResNet"):
    train.init_state(mlp, twf(mem_size=20), 0)
  with pytest.raises(ValueError, match="twf"):  # 10 rows from 5 slots
    train.init_state(resnet_ctx(stream, **SMALL), twf(mem_size=5), 0)
  assert "twf" in strategies.FAMILIES["hybrid"]


def test_twf_chain_refusals():
  # DER++'s: CWR*'s -1e9 bias reaches the stored logits (session 57's
  # probe on Split Digits with the refusal bypassed: 0.106 / 0.144 in
  # either order against 0.359 for twf alone), HAT's soft masks leak.
  for spec, reason in (("cwr_star+twf", "cwr_star writes a -1e9 bias"),
                       ("twf+ar1", "ar1 writes a -1e9 bias"),
                       ("hat+twf", "hat masks only its own gradient")):
    with pytest.raises(ValueError, match=reason):
      strategies.from_spec(spec)
  strategies.from_spec("replay+twf")  # rows appended before it: allowed
