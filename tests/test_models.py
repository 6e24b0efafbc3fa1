"""Models: shapes, multi-head routing, batch-norm state through the loop."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import conftest
import jaxcl
from jaxcl import models


def test_multi_head_routes_by_task():
  m = models.build("mlp", num_classes=3, num_heads=4, widths=(8,))
  x = jnp.ones((2, 5))
  v = m.init(jax.random.PRNGKey(0), x, jnp.zeros((2,), jnp.int32))
  k = v["params"]["head"]["kernel"]
  assert k.shape == (8, 12)
  out = m.apply(v, x, jnp.array([0, 3]))
  h = m.apply(v, x, None, features=True)
  full = h @ k + v["params"]["head"]["bias"]
  np.testing.assert_allclose(out[0], full[0, 0:3], rtol=1e-6)
  np.testing.assert_allclose(out[1], full[1, 9:12], rtol=1e-6)


def test_unknown_model_and_bad_args():
  with pytest.raises(ValueError, match="unknown model 'transformer'; valid"):
    models.build("transformer", 10)
  with pytest.raises(ValueError, match="bad arguments for model 'mlp'"):
    models.build("mlp", 10, depth=3)
  with pytest.raises(ValueError, match=r"widths=\(8, 2.5\); every layer "
                     "size must be a whole number"):
    models.build("bn_mlp", 10, widths=(8, 2.5))  # int() would make it 2
  with pytest.raises(ValueError, match="bn_mlp needs at least one hidden"):
    models.build("bn_mlp", 10, widths=())


@pytest.mark.parametrize("name,kw", [
    ("cnn", {"channels": (4, 8), "hidden": 16}),
    # Batch-norm statistics through the loop, at an MLP's compile time.
    ("bn_mlp", {"widths": (32,)}),
    # The same checks end to end on ResNet-18 (22 s at first, slow; ~8 s
    # with session 39's test compile flags, so back in the default run).
    ("resnet18", {"width": 4})])
def test_conv_models_train_in_the_loop(name, kw):
  c = jaxcl.default_config()
  c.model.name = name
  for k, v in kw.items():
    c.model[k] = v
  c.scenario.kind = "task"
  c.train.epochs = 2
  c.train.batch_size = 32
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 0.003
  c.report.progress = False
  r = jaxcl.run(c)
  assert r.accuracy.shape == (5, 5)
  # Learned each 2-class task well above chance when it was trained.
  assert np.diag(r.accuracy).mean() > 0.8
  if name in ("resnet18", "bn_mlp"):
    stats = r.state.model_state["batch_stats"]
    # Batch statistics were updated by training (init: zero means). Only
    # the means: the variances start at one, so a check over every leaf
    # passed with statistics never updated.
    means = [np.asarray(a) for p, a in
             jax.tree_util.tree_flatten_with_path(stats)[0]
             if jax.tree_util.keystr(p).endswith("['mean']")]
    assert means and all(np.abs(m).max() > 0 for m in means)


def test_pretrained_params_start_the_run(tmp_path):
  from jaxcl import experiment, pretrained
  c = jaxcl.default_config()
  c.model.widths = (16,)
  c.train.epochs = 1
  c.report.progress = False
  src = jaxcl.run(c)
  path = pretrained.save(str(tmp_path / "p.npz"), src.state.params)
  c.model.pretrained = path
  c.seed = 7  # a different seed: the params must come from the file
  s = experiment.setup(c)
  state = experiment.initial_state(s, 7)
  for a, b in zip(jax.tree.leaves(state.params),
                  jax.tree.leaves(src.state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  c.model.pretrained = str(tmp_path / "missing.npz")
  with pytest.raises(ValueError, match="does not exist"):
    jaxcl.run(c)
  c.model.widths = (8,)
  c.model.pretrained = path
  with pytest.raises(ValueError, match="has shape"):
    jaxcl.run(c)


def test_torch_init_matches_pytorch_linear_bounds():
  """model.init='torch': weights and biases U(+-1/sqrt(fan_in)) as in
  PyTorch's nn.Linear; the default keeps flax's zero biases."""
  m = models.build("mlp", 10, widths=(100,), init="torch")
  # Compiled, as a run initialises (op by op it compiled every small
  # program of the init: most of the test's time).
  p = jax.jit(m.init)(jax.random.PRNGKey(0), jnp.zeros((1, 784)))["params"]
  k, b = p["backbone"]["Dense_0"]["kernel"], p["backbone"]["Dense_0"]["bias"]
  bound = 1 / np.sqrt(784)
  assert float(jnp.abs(k).max()) <= bound and float(jnp.abs(b).max()) <= bound
  # uniform on the interval: std = bound / sqrt(3), not LeCun's 1/sqrt(784)
  np.testing.assert_allclose(float(k.std()), bound / np.sqrt(3), rtol=0.02)
  assert float(jnp.abs(b).min()) > 0
  hk = p["head"]["kernel"]
  assert float(jnp.abs(hk).max()) <= 1 / np.sqrt(100)
  d = jax.jit(models.build("mlp", 10, widths=(100,)).init)(
      jax.random.PRNGKey(0), jnp.zeros((1, 784)))["params"]
  assert float(jnp.abs(d["backbone"]["Dense_0"]["bias"]).max()) == 0.0
  with pytest.raises(ValueError, match="unknown model init 'kaiming'"):
    models.build("mlp", 10, init="kaiming")


_TWO_TASKS_FIELDS = dict(
    num_classes=10, num_tasks=2, num_experiences=2, input_shape=(8, 8, 1),
    kind="task", task_classes=((True,) * 5 + (False,) * 5,
                               (False,) * 5 + (True,) * 5),
    batch_size=4, train_size=8)
_TWO_TASKS = jaxcl.state.StreamInfo(**_TWO_TASKS_FIELDS)


_INIT_CASES = [
    ("mlp", 1, dict(widths=(16, 16), init="lecun_normal")),
    ("mlp", 2, dict(widths=(16, 16), init="torch")),
    ("cnn", 1, {}), ("bn_mlp", 1, {}), ("hat_mlp", 2, {}),
    ("masked_mlp", 1, {}), ("hypernet", 1, dict(input_dim=64)),
    ("progressive", 2, {}),
    ("resnet18", 1, dict(width=4)),
    # A list is unhashable: no jit cache key, so flax's own init runs.
    ("mlp", 1, dict(widths=[16])),
]

# flax's own init, and jaxcl's compiled one as users get it (XLA's
# default flags), of each case.
_INITS_SCRIPT = """
import pickle, sys
import jax, jax.numpy as jnp, numpy as np, optax
from jaxcl import models, state, train
info = state.StreamInfo(**eval(sys.argv[3]))
out = []
for name, heads, kw in eval(sys.argv[1]):
  m = models.build(name, 10, heads, **kw)
  ref = m.init(jax.random.PRNGKey(3), jnp.zeros((1, 8, 8, 1)),
               jnp.zeros((1,), jnp.int32))
  ctx = state.Context(model=m, tx=optax.sgd(0.1), info=info)
  params, model_state = train.init_variables(ctx, jax.random.PRNGKey(3))
  out.append(jax.tree.map(np.asarray,
                          (ref, {"params": params, **model_state})))
with open(sys.argv[2], "wb") as f:
  pickle.dump(out, f)
"""


def _inits_at_xla_defaults(cases, path):
  import pickle
  import subprocess
  import sys
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split()
      if not any(name in f for name in conftest.TEST_XLA_FLAGS))
  subprocess.run([sys.executable, "-c", _INITS_SCRIPT, repr(cases), str(path),
                  repr(_TWO_TASKS_FIELDS)],
                 env=env, check=True, timeout=600)
  with open(path, "rb") as f:
    return dict(zip(map(repr, cases), pickle.load(f)))


@pytest.fixture(scope="module")
def flax_inits(tmp_path_factory):
  """flax's own (op by op) init of a case and jaxcl's compiled one,
  computed in a process with XLA's default flags: conftest.py compiles
  the tests' programs with its own flags (at level 0 an eager init
  differs from the default by an ulp), and the claim checked is about
  what users run. The fast cases run in one process; a slow one gets its
  own."""
  cache = {}

  def get(case):
    if repr(case) not in cache:
      batch = [c for c in _INIT_CASES if c[0] != "resnet18"
               and not isinstance(c[2].get("widths"), list)]
      if case not in batch:
        batch = [case]
      cache.update(_inits_at_xla_defaults(
          batch, tmp_path_factory.mktemp("init") / "refs.pkl"))
    return cache[repr(case)]

  return get


@pytest.mark.parametrize("name,heads,kw", [
    pytest.param(*c, marks=pytest.mark.slow) if c[0] == "resnet18" else c
    for c in _INIT_CASES])
def test_compiled_init_equals_flax_init_bit_for_bit(name, heads, kw,
                                                    flax_inits):
  # init_variables runs flax's init as one compiled program (cached per
  # model and input shape) instead of op by op; the weights must not change
  # by a bit, or every recorded result would, and a second run with an
  # equal model and another optimiser must not recompile.
  import optax
  from jaxcl import train

  m = models.build(name, 10, heads, **kw)
  ctx = jaxcl.state.Context(model=m, tx=optax.sgd(0.1), info=_TWO_TASKS)
  key = jax.random.PRNGKey(3)
  params, model_state = train.init_variables(ctx, key)
  got = {"params": params, **model_state}
  if isinstance(kw.get("widths"), list):
    # No cache key: init_variables runs flax's own init here, in this
    # process, so that is the reference.
    ref = m.init(key, jnp.zeros((1, 8, 8, 1)), jnp.zeros((1,), jnp.int32))
    pairs = [(got, ref)]
  else:
    # At XLA's defaults (what users run), and in this process with the
    # tests' flags: both equal flax's init at the defaults.
    ref, users = flax_inits((name, heads, kw))
    pairs = [(users, ref), (got, ref)]
  for a_tree, b_tree in pairs:
    assert jax.tree.structure(a_tree) == jax.tree.structure(b_tree)
    for a, b in zip(jax.tree.leaves(a_tree), jax.tree.leaves(b_tree)):
      np.testing.assert_array_equal(a, b)
  # (On the CPU the program is compiled at -O1: train._init_jit_cpu.)
  init = (train._init_jit_cpu if jax.default_backend() == "cpu" else
          train._init_jit)
  compiled = init._cache_size()
  if isinstance(kw.get("widths"), tuple):
    assert compiled > 0  # this model's program is in the cache
  again = jaxcl.state.Context(model=models.build(name, 10, heads, **kw),
                              tx=optax.adam(1e-3), info=_TWO_TASKS)
  train.init_variables(again, jax.random.PRNGKey(4))
  assert init._cache_size() == compiled


def test_cosine_head_is_sigma_times_the_cosine():
  # LUCIR's head (Hou et al. 2019, eq. 4) against NumPy: sigma times the
  # cosine between the features and each class's weight column; a zero
  # feature vector (a ReLU net on a zero row) has a finite gradient.
  m = models.build("mlp", num_classes=5, widths=(8,), head="cosine")
  x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
  # init, apply and the gradient compiled, as a run compiles them (op by
  # op they compiled some 70 small programs, most of the test's time).
  v = jax.jit(m.init)(jax.random.PRNGKey(0), jnp.asarray(x))
  p = jax.tree.map(np.asarray, v["params"])
  assert set(p["head"]) == {"kernel", "sigma"} and p["head"]["sigma"] == 1.0
  p["head"]["sigma"] = np.float32(2.5)
  h = np.maximum(x @ p["backbone"]["Dense_0"]["kernel"]
                 + p["backbone"]["Dense_0"]["bias"], 0.0)
  w = p["head"]["kernel"]
  want = 2.5 * (h / np.linalg.norm(h, axis=1, keepdims=True)) @ (
      w / np.linalg.norm(w, axis=0, keepdims=True))
  got = jax.jit(m.apply)({"params": p}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
  g = jax.jit(jax.grad(
      lambda q: m.apply({"params": q}, jnp.zeros((2, 6))).sum()))(
          v["params"])
  assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(g))
  with pytest.raises(ValueError, match="unknown model head 'cos'.*cosine"):
    models.build("mlp", 5, head="cos")
