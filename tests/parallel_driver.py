"""Runs the same small streams on 1 device and on a data-parallel mesh of
all (forced) devices, in one process; prints the largest accuracy
difference per strategy as JSON. Used by test_parallel.py (which sets
XLA_FLAGS=--xla_force_host_platform_device_count=8); not a test itself."""

import json
import sys

import jax
import numpy as np

import jaxcl
import jaxcl.train


def config(strategy, devices):
  c = jaxcl.default_config()
  c.model.widths = (32,)
  c.train.epochs = 1
  c.train.batch_size = 16
  c.train.eval_batch_size = 200
  c.report.progress = False
  c.strategy.name = strategy
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
    c.strategy.mer = dict(mem_size=256, batch_size=4, batches=2, beta=0.5,
                          gamma=0.5)
  if strategy == "scr":  # augmented views; a head trained in after_step
    c.strategy.scr = dict(mem_size=256, batch_size=16)
  if strategy == "cope":  # class-balanced memory; prototypes from the batch
    c.strategy.cope = dict(mem_size=256, batch_size=16)
  if strategy == "slda":  # statistics summed over the batch's devices
    c.strategy.slda = dict(features="backbone")
  c.parallel.devices = devices
  c.parallel.shard_min_bytes = 0  # shard every divisible leaf
  return c


def main():
  out = {"devices": jax.device_count()}
  for strategy in sys.argv[1:]:
    one = jaxcl.run(config(strategy, 1))
    many = jaxcl.run(config(strategy, 0))
    out[strategy] = {
        "max_abs_diff": float(np.abs(one.accuracy - many.accuracy).max()),
        "acc_one": one.metrics["acc"], "acc_many": many.metrics["acc"],
        "state_shardings": sorted({str(getattr(x, "sharding", None).spec)
                                   for x in jax.tree.leaves(many.state)
                                   if hasattr(x, "sharding")}),
    }
    # The batch is really split over devices: the compiled step reduces
    # gradients across them. (Compiled again unless a persistent cache,
    # conftest.py's child_env, hands back the run's executable.)
    exp = jaxcl.scenarios.split(jaxcl.datasets.load("digits"), 5).experiences[0]
    data = jaxcl.train.device_experience(exp, many.learner.ctx.info.train_size)
    hlo = many.learner.chunk_fn.lower(many.state, data, 1, 0, 0,
                                      0).compile().as_text()
    out[strategy]["all_reduce"] = "all-reduce" in hlo
    if strategy in ("replay", "der", "er_ace", "bic", "lucir", "er_aml",
                    "xder", "mer", "scr", "cope"):
      mem = many.state.strategy.memory
      out[strategy]["buffer_sharding"] = str(mem.x.sharding.spec)
      out[strategy]["buffer_filled"] = int(np.asarray(mem.valid).sum())
    if strategy == "der":
      logits = many.state.strategy.logits
      out[strategy]["logits_sharding"] = str(logits.sharding.spec)
    if strategy == "er_ace":
      out[strategy]["seen"] = np.asarray(many.state.strategy.seen).tolist()
    if strategy == "bic":
      ss = many.state.strategy
      out[strategy]["val_filled"] = int(np.asarray(ss.val.valid).sum())
      out[strategy]["beta"] = np.asarray(ss.beta).tolist()
    if strategy == "lucir":
      out[strategy]["sigma"] = float(many.state.params["head"]["sigma"])
    if strategy == "xder":
      mem = many.state.strategy.memory
      out[strategy]["class_counts"] = np.bincount(
          np.asarray(mem.y)[np.asarray(mem.valid)], minlength=10).tolist()
    if strategy == "slda":
      ss, s1 = many.state.strategy, one.state.strategy
      out[strategy]["counted"] = float(np.asarray(ss.count).sum())
      out[strategy]["train_rows"] = sum(
          e.num_train for e in jaxcl.scenarios.split(
              jaxcl.datasets.load("digits"), 5).experiences)
      out[strategy]["cov_diff"] = float(
          np.abs(np.asarray(ss.cov) - np.asarray(s1.cov)).max())
      out[strategy]["cov_scale"] = float(np.abs(np.asarray(s1.cov)).max())
  print(json.dumps(out))


if __name__ == "__main__":
  main()
