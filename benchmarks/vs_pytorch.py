"""jaxcl against a PyTorch loop written as Mammoth writes it, same protocol.

Protocols of Buzzega et al. 2020 (Mammoth's ``seq-mnist``, unless named):
Split MNIST in 5 class-incremental experiences, MLP 784-100-100-10
(Xavier-uniform weights, zero biases), plain SGD, one pass with batch 10.
Methods:

* ``naive``: fine-tuning (lr 0.01);
* ``replay``: Mammoth's ``er.py``: each step concatenates 10 examples drawn
  from a reservoir memory of 200, then adds the batch to the memory (lr 0.01);
* ``replay_permuted``: the same on Permuted MNIST (first 5 of Mammoth's
  20 experiences, 60000 images each, batch 128 + 128 replayed, lr 0.2);
* ``derpp``: Mammoth's ``derpp.py``: the reservoir memory of 200 keeps each
  example's logits; each step adds alpha times the squared logit error on
  128 stored examples and beta times the cross-entropy on 128 others
  (alpha 0.2, beta 1.0, lr 0.03: Mammoth's seq-mnist best_args);
* ``gem``: Mammoth's ``gem.py``: 200 // 5 examples kept per experience; each
  step differentiates every past experience's memory, and when the update
  would raise a memory loss it solves the dual QP on the CPU with
  ``quadprog`` (lr 0.005, margin 1.0: the jaxcl config's).

The PyTorch side is a plain loop over tensors already in memory: no
DataLoader and no per-image transform, so it is a lower bound on Mammoth's
own time. Like Mammoth's ``observe`` it calls ``loss.item()`` every step.
The jaxcl side is ``jaxcl.run`` on the repository's configs
(``experiments/split_mnist_replay.py``, ``split_mnist_hybrid.py`` and
``permuted_mnist_replay.py``),
compilation included, and again with JAX's persistent compilation cache
warm (a repeated run). Both evaluate every test set after each experience;
the figures are whole runs (training + evaluation), and training alone.
``--seeds k`` also times k seeds in one vmapped ``jaxcl.sweep`` against k
PyTorch runs one after another.

  pip install torch quadprog    # not jaxcl dependencies; benchmark only
  python benchmarks/vs_pytorch.py [--methods naive replay derpp gem] [--seeds 4]

Accuracies are printed as a check that both sides run the same protocol
(one seed each: they differ by seed noise, about ±1-2 points).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
# benchmarks/profile.py would shadow the standard library's profile module,
# which torch imports.
sys.path = [REPO] + [p for p in sys.path if os.path.abspath(p or ".") != HERE]
from benchmarks.common import add_data_dir  # noqa: E402

# method -> (config file, its argument, experiences: 0 for the config's).
# The PyTorch loop is the config's strategy.
CONFIGS = {
    "naive": ("split_mnist_replay", "strategy=naive,mem_size=200", 0),
    "replay": ("split_mnist_replay", "strategy=replay,mem_size=200", 0),
    "derpp": ("split_mnist_replay", "strategy=derpp,mem_size=200", 0),
    "gem": ("split_mnist_hybrid", "strategy=gem,mem_size=200", 0),
    # A longer, heavier step: Permuted MNIST (first 5 of the 20
    # experiences), batch 128 + 128 replayed (Mammoth's perm-mnist ER).
    "replay_permuted": ("permuted_mnist_replay",
                        "strategy=replay,mem_size=200", 5),
}


def jaxcl_config(method: str, data_dir: str, seed: int):
  name, arg, experiences = CONFIGS[method]
  c = importlib.import_module(f"experiments.{name}").get_config(
      f"{arg},seed={seed}")
  c.dataset.data_dir = data_dir
  c.report.progress = False
  if experiences:
    c.scenario.n_experiences = experiences
  return c


# ---------------------------------------------------------------------------
# The PyTorch side: Mammoth's models/er.py and models/gem.py, inlined.


def torch_run(experiences, config, seed: int) -> dict:
  method = config.strategy.name  # naive, replay, derpp or gem
  import torch
  from torch import nn
  from torch.nn import functional as F

  torch.manual_seed(seed)
  rng = np.random.default_rng(seed)
  net = nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(),
                      nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))
  for m in net:
    if isinstance(m, nn.Linear):  # Mammoth's MNISTMLP.reset_parameters
      nn.init.xavier_uniform_(m.weight)
      nn.init.zeros_(m.bias)
  lr = config.optimizer.learning_rate
  opt = torch.optim.SGD(net.parameters(), lr=lr)
  loss_fn = nn.CrossEntropyLoss()
  batch = config.train.batch_size
  mem_size = 200
  tests = [(torch.from_numpy(np.asarray(e.test_x)),
            torch.from_numpy(np.asarray(e.test_y).astype(np.int64)))
           for e in experiences]

  # Reservoir memory (Mammoth's utils/buffer.py, reservoir mode).
  mem_x = torch.zeros((mem_size,) + tuple(tests[0][0].shape[1:]))
  mem_y = torch.zeros(mem_size, dtype=torch.int64)
  mem_z = torch.zeros(mem_size, 10)  # DER++: the logits stored with each
  der = config.strategy.get("derpp", {})
  seen = 0
  # GEM: per-experience memories and gradient buffers.
  params = list(net.parameters())
  grad_dims = [p.numel() for p in params]
  gem_x, gem_y, grads_cs = [], [], []
  margin = config.strategy.get("gem", {}).get("margin", 0.5)

  def flat_grad():
    return torch.cat([p.grad.reshape(-1) for p in params])

  def write_grad(g):
    i = 0
    for p, n in zip(params, grad_dims):
      p.grad.copy_(g[i:i + n].view_as(p))
      i += n

  def project2cone2(g, memories):  # Mammoth's gem.project2cone2
    import quadprog
    m = memories.double().numpy()
    gn = g.double().numpy()
    k = m.shape[0]
    p_ = m @ m.T
    p_ = 0.5 * (p_ + p_.T) + np.eye(k) * 1e-3
    q = -(m @ gn)
    v = quadprog.solve_qp(p_, q, np.eye(k), np.zeros(k) + margin)[0]
    return torch.from_numpy(v @ m + gn).float()

  acc = np.zeros((len(experiences), len(experiences)))
  train_time = 0.0
  for i, e in enumerate(experiences):
    t0 = time.perf_counter()
    x_all = torch.from_numpy(np.asarray(e.train_x))
    y_all = torch.from_numpy(np.asarray(e.train_y).astype(np.int64))
    order = torch.from_numpy(rng.permutation(len(y_all)))
    net.train()
    for s in range(0, len(order), batch):
      idx = order[s:s + batch]
      x, y = x_all[idx], y_all[idx]
      if method == "gem" and gem_x:
        grads_cs = []
        for mx, my in zip(gem_x, gem_y):
          opt.zero_grad()
          loss_fn(net(mx), my).backward()
          grads_cs.append(flat_grad().clone())
      opt.zero_grad()
      xb, yb = x, y
      if method == "replay" and seen > 0:
        pick = torch.from_numpy(rng.choice(min(seen, mem_size), batch,
                                           replace=False))
        xb, yb = torch.cat([x, mem_x[pick]]), torch.cat([y, mem_y[pick]])
      out = net(xb)
      loss = loss_fn(out, yb)
      if method == "derpp" and seen > 0:  # Mammoth's derpp.observe
        n = min(seen, mem_size)
        draw = lambda: torch.from_numpy(
            rng.choice(n, min(der["batch_size"], n), replace=False))
        pick = draw()
        loss = loss + der["alpha"] * F.mse_loss(net(mem_x[pick]),
                                                mem_z[pick])
        pick = draw()
        loss = loss + der["beta"] * loss_fn(net(mem_x[pick]), mem_y[pick])
      loss.backward()
      if method == "gem" and gem_x:
        g = flat_grad()
        memories = torch.stack(grads_cs)
        if (memories @ g < 0).any():
          write_grad(project2cone2(g, memories))
      opt.step()
      if method in ("replay", "derpp"):
        for j in range(len(y)):  # reservoir sampling, one example at a time
          k = seen if seen < mem_size else int(rng.integers(0, seen + 1))
          if k < mem_size:
            mem_x[k], mem_y[k] = x[j], y[j]
            mem_z[k] = out[j].detach()
          seen += 1
      loss.item()  # Mammoth's observe returns it: one sync per step
    if method == "gem":  # end_task: keep this experience's first examples
      per = mem_size // len(experiences)
      gem_x.append(x_all[order[:per]].clone())
      gem_y.append(y_all[order[:per]].clone())
    train_time += time.perf_counter() - t0
    net.eval()
    with torch.no_grad():
      for j, (tx, ty) in enumerate(tests):
        acc[i, j] = float((net(tx).argmax(1) == ty).float().mean())
  return {"acc": float(acc[-1].mean()), "train": train_time}


# ---------------------------------------------------------------------------


def side(args) -> dict:
  """One side's figures for one method, in this process (``--side``)."""
  import jax

  from jaxcl import experiment

  if args.cache:
    jax.config.update("jax_compilation_cache_dir", args.cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  c = jaxcl_config(args.methods[0], args.data_dir, 0)
  scenario = experiment.build_scenario(c)  # not timed: the same data
  if args.side == "torch":
    importlib.import_module("torch")  # before the clock, as jax is
  out = {}
  seeds = list(range(args.seeds))
  t = time.perf_counter()
  if args.side == "jaxcl" and len(seeds) > 1:
    from jaxcl import sweep
    sweep.sweep(c, seeds=seeds, scenario=scenario)
  elif args.side == "jaxcl":
    import jaxcl
    r = jaxcl.run(c, scenario=scenario)
    out.update(train=r.times["train"], acc=r.metrics["acc"])
  elif len(seeds) > 1:
    for s in seeds:
      torch_run(scenario.experiences, c, s)
  else:
    p = torch_run(scenario.experiences, c, 0)
    out.update(train=p["train"], acc=p["acc"])
  out["run" if len(seeds) <= 1 else "seeds"] = time.perf_counter() - t
  return out


def main() -> None:
  ap = argparse.ArgumentParser()
  add_data_dir(ap)
  ap.add_argument("--methods", nargs="+", default=list(CONFIGS),
                  choices=list(CONFIGS))
  ap.add_argument("--seeds", type=int, default=0,
                  help="> 1: also time that many seeds, one vmapped sweep "
                  "against sequential PyTorch runs")
  ap.add_argument("--side", choices=["jaxcl", "torch"], help=argparse.SUPPRESS)
  ap.add_argument("--cache", default="", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.side:
    print(json.dumps(side(args)))
    return
  try:
    import torch
  except ImportError:
    sys.exit("this benchmark needs PyTorch (pip install torch quadprog); "
             "it is not a jaxcl dependency")
  if "gem" in args.methods and importlib.util.find_spec("quadprog") is None:
    sys.exit("--methods gem needs quadprog (pip install quadprog), as "
             "Mammoth's GEM does")
  import jax

  def run_side(which, method, seeds=0, cache=""):
    # Each side in its own process: in one, PyTorch's OpenMP threads and
    # XLA's share the two cores and slow each other.
    cmd = [sys.executable, os.path.abspath(__file__), "--side", which,
           "--methods", method, "--seeds", str(seeds), "--data_dir",
           args.data_dir, "--cache", cache]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
      sys.exit(p.stderr[-3000:])
    return json.loads(p.stdout.strip().splitlines()[-1])

  print(f"jax {jax.__version__} on {jax.devices()[0].platform} x"
        f"{jax.device_count()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {os.cpu_count()} CPUs")
  print("| method | jaxcl run (train) | jaxcl run, cache warm | PyTorch loop "
        "run (train) | speed-up (run / train / warm run) | ACC jaxcl / "
        "PyTorch |")
  print("| --- | --- | --- | --- | --- | --- |")
  for method in args.methods:
    # A repeated run with JAX's persistent compilation cache warm (the
    # README's two variables): compilation is most of a short run's fixed
    # cost. The first run fills the cache.
    cache = tempfile.mkdtemp()
    j = run_side("jaxcl", method, cache=cache)
    w = run_side("jaxcl", method, cache=cache)
    p = run_side("torch", method)
    print(f"| {method} | {j['run']:.1f} s ({j['train']:.1f} s) | "
          f"{w['run']:.1f} s | {p['run']:.1f} s ({p['train']:.1f} s) | "
          f"{p['run'] / j['run']:.1f}x / {p['train'] / j['train']:.1f}x / "
          f"{p['run'] / w['run']:.1f}x | {j['acc']:.3f} / {p['acc']:.3f} |",
          flush=True)
    if args.seeds > 1:
      j = run_side("jaxcl", method, args.seeds)
      p = run_side("torch", method, args.seeds)
      print(f"| {method}, {args.seeds} seeds | {j['seeds']:.1f} s (one "
            f"vmapped sweep) | | {p['seeds']:.1f} s ({args.seeds} runs) | "
            f"{p['seeds'] / j['seeds']:.1f}x | |", flush=True)


if __name__ == "__main__":
  main()
