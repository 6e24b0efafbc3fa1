"""Grouped-gradient products from dense-layer factors (jaxcl.dense_grams)
against the same products of gradients formed one group at a time."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcl import dense_grams as dg
from jaxcl import models

N, K = 12, 4


class SharedDense(nn.Module):
  """One Dense used twice (its calls stack), and a bias-free head."""

  @nn.compact
  def __call__(self, x, task=None, train=False, features=False):
    h = x.reshape(x.shape[0], -1)
    h = nn.relu(nn.Dense(6, name="a")(h))
    shared = nn.Dense(6, name="shared")
    h = nn.relu(shared(nn.relu(shared(h))))
    return nn.Dense(5, use_bias=False, name="head")(h)


class SequenceDense(nn.Module):
  """A Dense over a (N, T, d) input: rows are not examples."""

  @nn.compact
  def __call__(self, x, task=None, train=False, features=False):
    return nn.Dense(5)(x.reshape(x.shape[0], 4, -1)).sum(1)


class ExtraParam(nn.Module):
  """An MLP plus a parameter outside any Dense."""

  @nn.compact
  def __call__(self, x, task=None, train=False, features=False):
    scale = self.param("scale", nn.initializers.ones, (5,))
    return nn.Dense(5)(x.reshape(x.shape[0], -1)) * scale


class RowsDense(nn.Module):
  """A Dense over (N * 4, d) rows: 2-D, but not one row per example."""

  @nn.compact
  def __call__(self, x, task=None, train=False, features=False):
    h = nn.Dense(5)(x.reshape(x.shape[0] * 4, -1))
    return h.reshape(x.shape[0], 4, 5).sum(1)


class MaskedDense(nn.Dense):
  """A Dense subclass whose kernel is masked: its gradient is not the
  outer product of the input and the output gradient."""

  @nn.compact
  def __call__(self, inputs):
    kernel = self.param("kernel", self.kernel_init,
                        (inputs.shape[-1], self.features))
    y = inputs @ (kernel * jnp.tril(jnp.ones_like(kernel)))
    if self.use_bias:  # the same parameters as nn.Dense's
      y = y + self.param("bias", self.bias_init, (self.features,))
    return y


class MaskedMLP(nn.Module):

  @nn.compact
  def __call__(self, x, task=None, train=False, features=False):
    return MaskedDense(5)(x.reshape(x.shape[0], -1))


def _setup(model, seed=0, heads=1):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(N, 4, 4, 1)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 5, N))
  task = jnp.asarray(rng.integers(0, heads, N), jnp.int32)
  params = model.init(jax.random.PRNGKey(seed), x, task)["params"]
  # Random (not contiguous) membership, some rows weighted 0 (masked),
  # the others by a weight of their own (GSS's weighted groups): 0/1
  # membership alone would not see the weights dropped.
  groups = np.eye(K, dtype=np.float32)[rng.integers(0, K, N)]
  groups *= (rng.random(N) > 0.25)[:, None]
  groups *= rng.uniform(0.5, 2.0, N).astype(np.float32)[:, None]
  weight = jnp.asarray(rng.uniform(0.5, 2.0, N), jnp.float32)
  return params, x, y, task, jnp.asarray(groups), weight


def _row_losses(model, params, x, y, task, weight):
  logits = model.apply({"params": params}, x, task)
  return weight * optax.softmax_cross_entropy_with_integer_labels(logits, y)


def _flat(tree):
  return np.concatenate([np.asarray(a, np.float64).ravel()
                         for a in jax.tree.leaves(tree)])


@pytest.mark.parametrize("name", ["mlp", "mlp_multihead", "shared_dense"])
def test_factored_products_equal_formed_gradients(name):
  heads = 3 if name == "mlp_multihead" else 1
  model = (SharedDense() if name == "shared_dense" else
           models.build("mlp", 5, num_heads=heads, widths=(7, 6)))
  params, x, y, task, groups, weight = _setup(model, heads=heads)

  def group_loss(p, k):
    return jnp.sum(_row_losses(model, p, x, y, task, weight) * groups[:, k])

  g_mat = np.stack([_flat(jax.grad(group_loss)(params, k))
                    for k in range(K)])
  total = lambda p: jnp.sum(_row_losses(model, p, x, y, task, weight))
  calls = dg.dense_calls(total, params, N)
  assert calls is not None
  if name == "shared_dense":  # the shared layer's two calls, the bias
    assert [c.path for c in calls].count(("shared",)) == 2
    assert [c.bias for c in calls if c.path == ("head",)] == [False]
  f = jax.jit(lambda p: dg.dense_factors(total, p, calls, N))(params)

  rng = np.random.default_rng(1)
  g = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape),
                                         jnp.float32), params)
  v = rng.uniform(-1.0, 2.0, K).astype(np.float32)
  scale = np.abs(g_mat).max()
  np.testing.assert_allclose(dg.group_gram(f, groups), g_mat @ g_mat.T,
                             rtol=1e-4, atol=1e-5 * scale ** 2)
  np.testing.assert_allclose(dg.group_dots(f, groups, g), g_mat @ _flat(g),
                             rtol=1e-4, atol=1e-5 * scale)
  out = dg.weighted_grad(f, groups @ v, params)
  assert jax.tree.structure(out) == jax.tree.structure(params)
  np.testing.assert_allclose(_flat(out), v @ g_mat, rtol=1e-4,
                             atol=1e-5 * scale)


@pytest.mark.parametrize("model", [
    models.build("cnn", 5),              # convolutions
    models.build("bn_mlp", 5, widths=(6,)),  # batch-norm scales
    SequenceDense(),                     # 3-D input to a Dense
    ExtraParam(),                        # a parameter outside any Dense
    RowsDense(),                         # 2-D, but N * 4 rows
    MaskedMLP(),                         # a subclass of nn.Dense
])
def test_models_that_cannot_be_factored_are_refused(model):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(N, 4, 4, 1)), jnp.float32)
  task = jnp.zeros((N,), jnp.int32)
  variables = model.init(jax.random.PRNGKey(0), x, task)

  def total(p):
    out = model.apply({**variables, "params": p}, x, task,
                      mutable=["batch_stats"])
    logits = out[0] if isinstance(out, tuple) else out
    return jnp.sum(logits)

  assert dg.dense_calls(total, variables["params"], N) is None


def test_cheaper_picks_the_measured_faster_method():
  """The rule against the cases timed by benchmarks/gem.py: factored for
  Buzzega et al.'s memory 200 (10 rows per experience) and Chaudhry et
  al.'s 10 sampled rows, formed gradients for their 250 rows."""
  buzzega = (dg.DenseCall((), 784, 100, True), dg.DenseCall((), 100, 100, True),
             dg.DenseCall((), 100, 10, True))
  p_b = 784 * 100 + 100 * 100 + 100 * 10 + 210
  chaudhry = (dg.DenseCall((), 784, 256, True),
              dg.DenseCall((), 256, 256, True),
              dg.DenseCall((), 256, 10, True))
  p_c = 784 * 256 + 256 * 256 + 256 * 10 + 522
  assert dg.cheaper(buzzega, 10 * 10, 10, p_b)      # memory 200, exp. 10
  assert dg.cheaper(buzzega, 20 * 10, 20, p_b)      # memory 200, last
  assert not dg.cheaper(buzzega, 20 * 25, 20, p_b)  # memory 500, last
  assert dg.cheaper(chaudhry, 20 * 10, 20, p_c)     # 10 sampled rows
  assert not dg.cheaper(chaudhry, 20 * 250, 20, p_c)
