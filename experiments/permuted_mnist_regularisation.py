"""Permuted MNIST with regularisation strategies: EWC, online EWC, SI, MAS,
LwF (domain-incremental) and the hypernetwork (task-incremental).

Protocol (Hsu et al. 2018 / van de Ven & Tolias 2019, the usual anchors):
10 experiences, each MNIST under its own fixed random pixel permutation
(seeded, every experience permuted), the same 10 classes throughout, no
task id at test time (domain-incremental); MLP 784-1000-1000-10, Adam lr
1e-4, batch 128, 10 epochs per experience, optimiser reset per experience.
The hypernetwork runs the task-incremental variant (task id given; von
Oswald et al. 2020 report ≈ 0.97–0.98 there) with the same target MLP.

  jaxcl run --config experiments/permuted_mnist_regularisation.py:strategy=ewc
  jaxcl run --config experiments/permuted_mnist_regularisation.py:strategy=online_ewc,epochs=2
  jaxcl run --config experiments/permuted_mnist_regularisation.py:strategy=hypernetwork

Arguments: ``strategy`` (ewc | online_ewc | si | mas | lwf |
hypernetwork), ``kind`` (domain | task; the hypernetwork defaults to task),
``seed``, ``strength`` (> 0 overrides the method's coefficient),
``pad`` and ``first_identity`` (the reference codes' 32x32 padding and
unpermuted first task: ``pad=2,first_identity=True``), ``init``
(``torch`` for PyTorch's ``nn.Linear`` initialisation, as in the reference
codes; default flax's lecun_normal) and ``keep_opt`` (keep Adam's state
across experiences, as van de Ven's ``--optimizer=adam`` does, instead of
resetting it), ``lookahead`` (hypernetwork: the paper's look-ahead
regulariser), ``hnet_init`` (hypernetwork hidden layers' initialiser:
``glorot`` as in the reference code; default He), ``heads``
(hypernetwork: > 1 gives the target that many 10-way heads, task t
reading head t, as the reference code's 100-output target; default one
generated head),
``epochs`` (the published protocol has 10; the measurements in
docs/notes_regularisation.md say which they used), ``lr`` (> 0 overrides
the learning rate, for shortened runs), ``si_grads`` (SI's ω gradient:
task | total, see :func:`jaxcl.strategies.si.si`), ``quick`` (2000 / 1000
examples, 3 experiences, 1 epoch, for tests).

Expected (anchors of the issue, full protocol): EWC ≥ 0.94, online EWC ≥
0.95, SI ≥ 0.95 (the PyTorch reference suite reaches 0.83 for EWC and SI),
hypernetwork (task-IL) ≥ 0.97. A full 10-epoch run is ~47k steps of a 1.8M
parameter MLP: roughly 10–25 minutes on a 2-core CPU; see the notes for
what was actually measured here.

References:
  Hsu et al., `Re-evaluating continual learning scenarios
  <https://arxiv.org/abs/1810.12488>`_, 2018.
  van de Ven & Tolias, `Three scenarios for continual learning
  <https://arxiv.org/abs/1904.07734>`_, 2019.
  von Oswald et al., `Continual learning with hypernetworks
  <https://arxiv.org/abs/1906.00695>`_, ICLR 2020.
"""

from jaxcl.configs import parse_arg
from jaxcl.experiment import default_config

# Per-method defaults for this protocol. The Fisher is 'sampled' here: with
# 10 classes in every experience the exact Fisher costs 10 backward passes
# per example on a 1.8M-parameter model (see docs/notes_regularisation.md).
#
# Strengths at this length (10 epochs, Adam 1e-4), not yet tuned here:
# EWC λ = 1e3 (chosen on a 1-epoch protocol) is too stiff (0.865: new
# permutations learned to 0.80); online EWC λ = 100, the reference code's
# value (van de Ven's continual-learning param_values.py, permMNIST domain:
# ewc_lambda 100 with the same ½ in the penalty) is too weak here (0.895:
# the first permutation falls to 0.66). SI c = 10 is both reference codes'
# value (van de Ven's si_c, Hsu's reg_coef; no ½ in either, as here).
# Hypernetwork β = 0.01: the reference code's 0.1 left later tasks
# learned less (0.978 for the first, 0.901 for the tenth; ACC 0.944, 1
# seed); 0.01 gives 0.961 with BWT -0.001 (seed 0). Neither the
# look-ahead, a regulariser over every learned task (reg_samples=0), the
# reference code's Glorot hidden init, nor β = 0.001 lifts the later tasks
# (docs/notes_regularisation.md, session 9).
STRATEGIES = {
    "ewc": dict(lam=1e3, fisher="sampled", max_examples=1000),
    "online_ewc": dict(lam=100.0, gamma=1.0, fisher="sampled",
                       max_examples=1000),
    "si": dict(c=10.0, xi=0.1),
    "mas": dict(lam=1.0, max_examples=1000),
    "lwf": dict(alpha=1.0, temperature=2.0),
    "hypernetwork": dict(beta=0.01, reg_samples=1),
}
STRENGTH = {"ewc": "lam", "online_ewc": "lam", "si": "c", "mas": "lam",
            "lwf": "alpha", "hypernetwork": "beta"}


def get_config(arg=None):
  a = parse_arg(arg, strategy="ewc", kind="", seed=0, strength=-1.0,
                epochs=10, lr=-1.0, si_grads="task", pad=0,
                first_identity=False, init="", keep_opt=False,
                lookahead=False, hnet_init="", heads=1, quick=False)
  name = a["strategy"]
  if name not in STRATEGIES:
    raise ValueError(f"unknown strategy {name!r}; valid: "
                     f"{sorted(STRATEGIES)}")
  kind = a["kind"] or ("task" if name == "hypernetwork" else "domain")
  c = default_config()
  c.name = f"permuted_mnist_{kind}_{name}"
  c.seed = a["seed"]
  c.dataset.name = "mnist"
  c.scenario.type = "permuted"
  c.scenario.kind = kind
  c.scenario.n_experiences = 10
  c.scenario.seed = 0
  # The reference codes pad MNIST to 32x32 before permuting and keep the
  # first task unpermuted (pad=2, first_identity=True); set only when used,
  # so the stored rows' configs are unchanged.
  if a["pad"]:
    c.scenario.pad = a["pad"]
  if a["first_identity"]:
    c.scenario.first_identity = True
  c.model.name = "mlp"
  c.model.widths = (1000, 1000)
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-4
  c.train.epochs = a["epochs"]
  c.train.batch_size = 128
  c.train.eval_batch_size = 1000
  c.train.reset_optimizer = True
  # The reference network (van de Ven's continual-learning: PyTorch
  # nn.Linear init, one Adam for the whole stream). Set only when used.
  if a["init"]:
    c.model.init = a["init"]
  if a["keep_opt"]:
    c.train.reset_optimizer = False
  kwargs = dict(STRATEGIES[name])
  if a["strength"] > 0:
    kwargs[STRENGTH[name]] = a["strength"]
  if name == "si" and a["si_grads"] != "task":  # (set only when used)
    kwargs["grads"] = a["si_grads"]
  if name == "hypernetwork" and a["lookahead"]:  # (set only when used)
    kwargs["lookahead"] = True
  c.strategy.name = name
  c.strategy[name] = kwargs
  if name == "hypernetwork":
    c.model.name = "hypernet"
    # The reference code's Permuted MNIST classifier hypernetwork (von
    # Oswald et al., chrhenning/hypercl mnist/train_args_default.py): task
    # embedding 24, chunk embedding 8, hidden (25, 25) ELU, chunks of 78000
    # weights (β: see STRATEGIES; the reference uses 0.1), Adam 1e-4,
    # batch 128, 5000 iterations per task (here 10 epochs = 4690).
    # The generated values are the weights (output_scale='none', as in
    # hypercl): with the default fixed 1/sqrt(fan_in) scale, Adam 1e-4
    # moved the target ~30x slower and each task reached only 0.95-0.96
    # after 10 epochs (2 experiences x 1 epoch, seed 0: 0.890 -> 0.944).
    c.model.hypernet = dict(input_dim=(28 + 2 * a["pad"])**2, target_widths=(1000, 1000),
                            num_embeddings=10, embedding_dim=24,
                            chunk_size=78000, chunk_embedding_dim=8,
                            hidden=(25, 25), activation="elu",
                            output_scale="none",
                            mixed_batches=False)  # one task per batch
    if a["hnet_init"]:  # (set only when used)
      c.model.hypernet.hidden_init = a["hnet_init"]
    if a["heads"] > 1:  # (set only when used)
      c.model.hypernet.target_heads = a["heads"]

  if a["lr"] > 0:
    c.optimizer.learning_rate = a["lr"]
  if a["quick"]:
    c.dataset.train_subset = 2000
    c.dataset.test_subset = 1000
    c.scenario.n_experiences = 3
    c.train.epochs = 1
    c.train.batch_size = 32
    c.train.eval_batch_size = 250
    c.model.widths = (50, 50)
    if "max_examples" in c.strategy[name]:
      c.strategy[name].max_examples = 64
    if name == "hypernetwork":
      c.model.hypernet.target_widths = (50,)
      c.model.hypernet.num_embeddings = 3
      c.model.hypernet.chunk_size = 1000
      c.model.hypernet.hidden = (20,)
  return c
