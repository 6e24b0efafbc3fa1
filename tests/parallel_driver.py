"""Runs the same small streams on 1 device and on a data-parallel mesh of
all (forced) devices, in one process; prints the largest accuracy
difference per strategy as JSON. Used by test_parallel.py (which sets
XLA_FLAGS=--xla_force_host_platform_device_count=8); not a test itself.
The argument ``contracts`` (first, before any strategy) also checks the
mesh, sharding, placement and donation contracts (:func:`contracts`, a
few seconds), under the output's key "contracts"."""

import json
import sys

import jax
import numpy as np

import jaxcl
import jaxcl.train

# Half of Split Digits' 1347 training rows (a seeded random subset: 124-131
# rows per experience, 59-68 per class). Each strategy's two runs are
# mostly compilation, the rest steps on 8 devices sharing 2 cores; half
# the rows cut the runs' time by a fifth (MER's 8-device run, a scan over
# every incoming row, by 40 %), and still fill every memory (256 slots;
# 25-28 per class) and leave experiences of unequal sizes, padded on the
# mesh as on one device.
TRAIN_ROWS = 640


def config(name, devices):
  """``name``: a strategy, or ``<strategy>:aug`` for it with training
  augmentation of every batch (replayed rows too). (Not bfloat16: the
  mesh sums gradients in another order, which bfloat16's rounding turns
  into accuracies 1-2 points apart after a stream.)"""
  strategy, _, variant = name.partition(":")
  c = jaxcl.default_config()
  if variant == "aug":
    c.train.augment, c.train.crop_padding = ("pad_crop", "flip"), 1
  c.dataset.train_subset = TRAIN_ROWS
  c.model.widths = (32,)
  c.train.epochs = 1
  c.train.batch_size = 16
  c.train.eval_batch_size = 200
  c.report.progress = False
  c.strategy.name = strategy
  if strategy == "naive":  # continual evaluation on the mesh too
    c.train.eval_every_steps = 4
  if strategy == "replay":
    # Reservoir memory of 256 slots (sharded over the 8 devices: 32 each),
    # 16 replayed rows per step.
    c.strategy.replay = dict(mem_size=256, batch_size=16)
  if strategy == "der":   # the same, with a logit vector per slot
    c.strategy.der = dict(mem_size=256, batch_size=16, alpha=1.0)
  if strategy == "er_ace":  # the same memory; a class mask over the batch
    c.strategy.er_ace = dict(mem_size=256, batch_size=16)
  if strategy == "er_aml":  # positives / negatives gathered from the memory
    c.strategy.er_aml = dict(mem_size=256, batch_size=16)
  if strategy == "bic":  # held-out rows masked by index; stage 2 on a host
    c.strategy.bic = dict(mem_size=256, batch_size=16, bias_epochs=20)
  if strategy == "lucir":  # cosine head; old classes' columns restored
    c.model.head = "cosine"
    c.strategy.lucir = dict(mem_size=256, batch_size=16)
  if strategy == "xder":  # a balanced memory rebuilt at each experience's end
    c.strategy.xder = dict(mem_size=256, batch_size=16)
  if strategy == "mer":  # memory rows per incoming row; scans in the step
    # (2 memory rows in each of 2 batches: the step's sequential updates,
    # 6 per incoming row, were most of its 8-device run; 4 rows made 10.)
    c.strategy.mer = dict(mem_size=256, batch_size=2, batches=2, beta=0.5,
                          gamma=0.5)
  if strategy == "scr":  # augmented views; a head trained in after_step
    c.strategy.scr = dict(mem_size=256, batch_size=16)
  if strategy == "cope":  # class-balanced memory; prototypes from the batch
    c.strategy.cope = dict(mem_size=256, batch_size=16)
  if strategy == "dualnet":  # a model of its own; scans in update_grads
    c.model.name = "dualnet"
    c.model.dualnet = dict(widths=(32,))
    c.optimizer.name, c.optimizer.learning_rate = "sgd", 0.03
    c.strategy.dualnet = dict(mem_size=256, batch_size=16,
                              ssl_batch_size=32, n_outer=1)
  if strategy == "slda":  # statistics summed over the batch's devices
    c.strategy.slda = dict(features="backbone")
  c.parallel.devices = devices
  c.parallel.shard_min_bytes = 0  # shard every divisible leaf
  return c


def _error(f):
  """The message of the ValueError (ConfigError) ``f()`` raises, or None."""
  try:
    f()
  except ValueError as e:
    return str(e)
  return None


_runs = {}


def run(name, devices):
  """``jaxcl.run(config(name, devices))``, once per process: the contracts'
  1-device Naive run is the strategies' one."""
  if (name, devices) not in _runs:
    _runs[name, devices] = jaxcl.run(config(name, devices))
  return _runs[name, devices]


def experiences(name):
  """The training experiences of ``config(name, ...)``'s stream."""
  return jaxcl.experiment.build_scenario(config(name, 0)).experiences


def contracts():
  """Mesh, sharding, placement and donation contracts on the forced devices
  (values computed here by hand), and a 4-device run against one device."""
  from jaxcl import parallel, sweep
  from jax.sharding import NamedSharding, PartitionSpec as P
  n = jax.device_count()
  out = {"devices": n}
  # devices=0 means all of them; k means the first k; too many or negative
  # is an error naming the values.
  out["mesh0"] = [d.id for d in parallel.make_mesh(0).devices.flat]
  out["mesh3"] = [d.id for d in parallel.make_mesh(3).devices.flat]
  out["all_ids"] = [d.id for d in jax.devices()]
  out["too_many"] = _error(lambda: parallel.make_mesh(n + 1))
  out["negative"] = _error(lambda: parallel.make_mesh(-1))
  # state_sharding: leading-axis sharding only for leaves whose leading
  # axis divides evenly and whose size (bytes) reaches min_bytes.
  mesh = parallel.make_mesh(0)
  tree = {"even": np.zeros((2 * n, 3), np.float32),      # 24 n bytes
          "uneven": np.zeros((2 * n + 1, 3), np.float32),
          "short": np.zeros((n // 2, 3), np.float32),
          "scalar": np.zeros((), np.float32),
          "bytes8": np.zeros((2 * n, 3), np.int8),       # 6 n bytes
          "vector": np.zeros((n,), np.int32)}
  spec = lambda t: {k: str(v.spec) for k, v in t.items()}
  out["spec_0"] = spec(parallel.state_sharding(tree, mesh, min_bytes=0))
  # min_bytes is a size in bytes, inclusive: the float32 leaf has exactly
  # 24 n bytes, the int8 one 6 n.
  out["spec_at"] = spec(parallel.state_sharding(tree, mesh,
                                                min_bytes=24 * n))
  out["spec_above"] = spec(parallel.state_sharding(tree, mesh,
                                                   min_bytes=24 * n + 1))
  out["spec_stacked"] = str(parallel.state_sharding(
      {"a": np.zeros((3, 2 * n, 5), np.float32)}, mesh, min_bytes=0,
      stacked=True)["a"].spec)
  # place: the values survive and each device holds its own rows, in the
  # mesh's device order.
  x = np.arange(2 * n * 3, dtype=np.float32).reshape(2 * n, 3)
  placed = parallel.place({"x": x, "s": np.float32(7)},
                          {"x": NamedSharding(mesh, P("data")),
                           "s": parallel.replicated(mesh)})
  out["place_equal"] = bool(np.array_equal(np.asarray(placed["x"]), x) and
                            float(placed["s"]) == 7.0)
  rows = {s.device.id: np.asarray(s.data)[:, 0].tolist()
          for s in placed["x"].addressable_shards}
  out["place_rows_ok"] = all(
      rows[d.id] == x[2 * i:2 * i + 2, 0].tolist()
      for i, d in enumerate(mesh.devices.flat))
  out["batch_spec"] = str(parallel.batch_sharding(mesh).spec)
  out["replicated_spec"] = str(parallel.replicated(mesh).spec)
  # A run on 4 of the devices equals the one-device run.
  one, four = run("naive", 1), run("naive", 4)
  out["run4_mesh"] = int(four.learner.mesh.shape[parallel.DATA])
  out["run4_acc_diff"] = float(np.abs(one.accuracy - four.accuracy).max())
  out["run4_params_diff"] = max(
      float(np.abs(np.asarray(a) - np.asarray(b)).max())
      for a, b in zip(jax.tree.leaves(one.state.params),
                      jax.tree.leaves(four.state.params)))
  out["run4_random_diff"] = float(
      np.abs(one.random_accuracy - four.random_accuracy).max())
  # The chunk donates the state it is given (its buffers are not reused);
  # evaluation does not.
  exp = experiences("naive")[0]
  learner = four.learner
  data = jaxcl.train.device_experience(exp, learner.ctx.info.train_size)
  state = four.state
  learner.eval_fn(state, jaxcl.train.test_arrays([exp],
                                                 learner.eval_batch_size))
  out["eval_kept"] = not any(x.is_deleted() for x in jax.tree.leaves(state)
                             if isinstance(x, jax.Array))
  learner.chunk_fn(state, data, exp.num_train, 0, 0, 0)
  out["chunk_donated"] = all(x.is_deleted() for x in jax.tree.leaves(
      state.params))
  # Batch sizes that do not split over the devices, too many devices, and a
  # sweep on a mesh: clear errors naming the values.
  bad = config("naive", 0)
  bad.train.batch_size = 12
  out["bad_batch"] = _error(lambda: jaxcl.run(bad))
  bad = config("naive", 0)
  bad.train.eval_batch_size = 20  # under the largest test set (91): kept
  out["bad_eval_batch"] = _error(lambda: jaxcl.run(bad))
  # Above it, capped at 91 rounded up to the 8 devices: it runs.
  big = config("naive", 0)
  big.train.eval_batch_size = 100
  out["big_eval_batch"] = jaxcl.experiment.setup(big).learner.eval_batch_size
  bad = config("naive", n + 1)
  out["bad_devices"] = _error(lambda: jaxcl.run(bad))
  out["sweep_mesh"] = _error(lambda: sweep.sweep(config("naive", 0),
                                                 seeds=[0, 1]))
  return out


def main():
  names = sys.argv[1:]
  out = {"devices": jax.device_count()}
  if names[:1] == ["contracts"]:
    out["contracts"] = contracts()
    names = names[1:]
  for name in names:
    one, many = run(name, 1), run(name, 0)
    strategy = name.partition(":")[0]
    exps = experiences(name)
    out[name] = {
        "train_rows": [e.num_train for e in exps],
        "max_abs_diff": float(np.abs(one.accuracy - many.accuracy).max()),
        "acc_one": one.metrics["acc"], "acc_many": many.metrics["acc"],
        "curve_points": 0 if many.curve is None else len(many.curve.step),
        "curve_max_abs_diff": 0.0 if many.curve is None else float(
            np.abs(one.curve.accuracy - many.curve.accuracy).max()),
        # The predictions behind the matrices, counted on the mesh.
        "confusion_diff": int(np.abs(one.confusion - many.confusion).sum()),
        "task_max_abs_diff": float(np.abs(one.task_accuracy -
                                          many.task_accuracy).max()),
        "state_shardings": sorted({str(getattr(x, "sharding", None).spec)
                                   for x in jax.tree.leaves(many.state)
                                   if hasattr(x, "sharding")}),
    }
    # The batch is really split over devices: the compiled step reduces
    # gradients across them. (Compiled again unless a persistent cache,
    # conftest.py's child_env, hands back the run's executable.)
    data = jaxcl.train.device_experience(exps[0],
                                         many.learner.ctx.info.train_size)
    hlo = many.learner.chunk_fn.lower(many.state, data, 1, 0, 0,
                                      0).compile().as_text()
    out[name]["all_reduce"] = "all-reduce" in hlo
    if strategy in ("replay", "der", "er_ace", "bic", "lucir", "er_aml",
                    "xder", "mer", "scr", "cope", "dualnet"):
      mem = many.state.strategy.memory
      out[name]["buffer_sharding"] = str(mem.x.sharding.spec)
      out[name]["buffer_filled"] = int(np.asarray(mem.valid).sum())
    if strategy == "der":
      logits = many.state.strategy.logits
      out[name]["logits_sharding"] = str(logits.sharding.spec)
    if strategy == "er_ace":
      out[name]["seen"] = np.asarray(many.state.strategy.seen).tolist()
    if strategy == "bic":
      ss = many.state.strategy
      out[name]["val_filled"] = int(np.asarray(ss.val.valid).sum())
      out[name]["beta"] = np.asarray(ss.beta).tolist()
    if strategy == "lucir":
      out[name]["sigma"] = float(many.state.params["head"]["sigma"])
    if strategy == "xder":
      mem = many.state.strategy.memory
      out[name]["class_counts"] = np.bincount(
          np.asarray(mem.y)[np.asarray(mem.valid)], minlength=10).tolist()
    if strategy == "slda":
      ss, s1 = many.state.strategy, one.state.strategy
      out[name]["counted"] = float(np.asarray(ss.count).sum())
      out[name]["cov_diff"] = float(
          np.abs(np.asarray(ss.cov) - np.asarray(s1.cov)).max())
      out[name]["cov_scale"] = float(np.abs(np.asarray(s1.cov)).max())
  print(json.dumps(out))


if __name__ == "__main__":
  main()
