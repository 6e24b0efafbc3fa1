"""Small configs, one per registered strategy, for the resume audit
(test_resume_every_strategy.py; adapted from session 35's audit).

Split Digits, 5 experiences, 1 epoch of batch 32 (9 steps per experience),
a checkpoint every 3 steps (saves at steps 3 and 6 of each experience and
after each experience), MLP 32, Adam 1e-3; each strategy gets the model,
scenario and small arguments it needs (as in docs/composition_fuzz.md
"Set-up"). Every strategy must be listed here: a newly registered one gets
a clear failure in the audit until it is (in ``PLAIN`` when the defaults
below suit it), never a silent skip.
"""

import importlib
import inspect

from jaxcl import experiment

# Strategies the generic set-up suits (with SMALL_KW where they accept it).
PLAIN = (
    "agem", "agem_r", "ar1", "bic", "clser", "cope", "cscct", "cumulative",
    "cwr_star", "der", "derpp", "dmc", "eeil", "ensemble", "er_ace",
    "er_aml", "er_tricks", "ewc", "expert_gate", "exstream", "fdr", "fecam",
    "feature_distillation", "feature_replay", "fetril", "freezing",
    "from_scratch", "gem", "generative_negative_replay", "generative_replay",
    "gss", "hal", "icarl", "il2m", "joint", "latent_replay", "lfl", "lwf",
    "lwf_mc", "mas", "mir", "naive", "online_ewc", "puridiver", "ranpac",
    "rar", "replay", "rpc", "rwalk", "si", "slda", "ss_il", "star", "xder",
    "aser", "slca", "wa", "ser", "siw", "er_acl", "gsa")
# Strategies with their own set-up in config().
SPECIAL = (
    "aer_abs", "casper", "coda_prompt", "dualnet", "dualprompt", "gdumb",
    "hat",
    "hypernetwork", "l2p", "lamaml", "lider", "lucir", "lwm", "mer",
    "multihead", "packnet", "piggyback", "progress_compress", "progressive",
    "scr", "spr", "supsup", "twf")
NAMES = PLAIN + SPECIAL
# Strategies needing a pretrained .npz (see pretrain_config()).
NEEDS_PRETRAINED = ("piggyback",)

# Task-incremental, multi-head except the two that make their own heads.
TASK = ("multihead", "hypernetwork", "progressive", "piggyback", "packnet",
        "hat", "supsup")
SINGLE = ("multihead", "hypernetwork")
# A higher learning rate (1e-2) for these (as in the composition fuzz).
FAST = ("hat", "supsup", "hypernetwork", "progressive", "progress_compress")
SMALL_VIT = dict(patch=4, dim=16, depth=2, heads=2, mlp_dim=32)
# Small values for the keyword arguments a strategy accepts.
SMALL_KW = dict(mem_size=60, max_examples=200, hidden=(32,), latent=8,
                proj_dim=256, consolidate_epochs=1, aux_size=300,
                aux_dataset="digits", ae_latent=16, ae_batch_size=32,
                ae_epochs=1, ae_lr=0.1)


def _accepts(name: str) -> set[str]:
  """The keyword arguments of ``jaxcl.strategies.<name>.<name>``."""
  mod = importlib.import_module(f"jaxcl.strategies.{name}")
  return set(inspect.signature(getattr(mod, name)).parameters)


def _base():
  c = experiment.default_config()
  c.seed = 0
  c.report.progress = c.report.tensorboard = c.report.plots = False
  c.train.epochs, c.train.batch_size, c.train.eval_batch_size = 1, 32, 500
  c.model.widths = (32,)
  c.optimizer.name, c.optimizer.learning_rate = "adam", 1e-3
  return c


def pretrain_config():
  """Plain MLP 64-64 trained on all of digits (one experience, 2 epochs):
  the backbone piggyback masks (``pretrained.pretrain`` it, a few s)."""
  c = _base()
  c.train.epochs, c.train.eval_batch_size = 2, 100
  c.model.widths = (64, 64)
  c.scenario.n_experiences = 1
  c.optimizer.learning_rate = 1e-2
  return c


def config(name: str, pretrained: str | None = None):
  """The resume audit's config for strategy ``name``.

  ``pretrained``: the .npz of ``pretrain_config()`` (needed by the
  strategies in ``NEEDS_PRETRAINED``).
  """
  if name not in NAMES:
    raise ValueError(
        f"strategy {name!r} has no resume-audit config: add it to PLAIN in "
        "tests/resume_configs.py if the generic set-up (class-incremental "
        "Split Digits, MLP 32) suits it, or give it its own set-up in "
        "config() and list it in SPECIAL")
  if name in NEEDS_PRETRAINED and not pretrained:
    raise ValueError(f"strategy {name!r} needs pretrained= (an .npz of "
                     "pretrain_config(), from jaxcl.pretrained.pretrain)")
  c = _base()
  c.checkpoint.every_steps = 3
  c.strategy.name = name
  if name in TASK:
    c.scenario.kind = "task"
    c.model.multi_head = name not in SINGLE
  if name in FAST:
    c.optimizer.learning_rate = 1e-2
  if name == "hat":
    c.model.name = "hat_mlp"
    c.model.hat_mlp = dict(widths=(32,))
  elif name in ("progressive", "progress_compress"):
    c.model.name = "progressive"
    c.model.progressive = dict(
        widths=(32,), num_columns=2 if name == "progress_compress" else 5)
  elif name == "piggyback":
    c.model.name = "masked_mlp"
    c.model.masked_mlp = dict(mask="threshold", widths=(64, 64))
  elif name == "supsup":
    c.model.name = "masked_mlp"
    c.model.masked_mlp = dict(mask="edge_popup", weights="signed_constant",
                              masked_head=True, use_bias=False, density=0.5,
                              widths=(32,))
  elif name == "hypernetwork":
    c.model.name = "hypernet"
    c.model.hypernet = dict(num_embeddings=5)
  elif name == "dualnet":
    c.model.name = "dualnet"
    c.model.dualnet = dict(widths=(32,))
  elif name == "twf":  # it distils a ResNet's stage maps
    c.model.name = "resnet18"
    c.model.width = 2
  elif name in ("lider", "lwm"):
    c.model.name = "cnn"
    c.model.channels, c.model.hidden = (4, 8, 8), 16
  elif name == "lucir":
    c.model.head = "cosine"
  elif name == "l2p":
    c.model.name = "vit"
    c.model.vit = dict(SMALL_VIT, pool_size=10)
    c.optimizer.learning_rate = 3e-3
  elif name == "coda_prompt":
    c.model.name = "vit"
    c.model.vit = dict(SMALL_VIT, pool_size=10, prompt="coda",
                       prompt_length=4)
    c.optimizer.learning_rate = 3e-3
  elif name == "dualprompt":
    c.model.name = "vit"
    c.model.vit = dict(patch=4, dim=16, depth=3, heads=2, mlp_dim=32,
                       pool_size=5, prompt="dualprompt", prompt_length=3,
                       g_prompt_length=2, g_prompt_layers=(0, 1),
                       prompt_layers=(1, 2))
    c.optimizer.learning_rate = 3e-3
  accepts = _accepts(name)
  kw = {k: v for k, v in SMALL_KW.items() if k in accepts}
  if name in ("lamaml", "mer"):  # plain SGD, as in their papers' set-up
    c.optimizer.name, c.optimizer.learning_rate = "sgd", 0.1
    c.optimizer.momentum = 0.0
  if name == "dualnet":  # plain SGD at its lr (its default, 0.03)
    c.optimizer.name, c.optimizer.learning_rate = "sgd", 0.03
    c.optimizer.momentum = 0.0
  if name == "scr":  # its replay batch (100) must fit in the memory
    kw["mem_size"] = 200
  if name == "gdumb":
    kw["epochs"] = 2
  if name == "spr":  # a few short fills (its defaults train for hours)
    kw.update(delayed_size=100, expert_epochs=3, base_epochs=3,
              finetune_epochs=2)
  if name == "aer_abs":
    c.train.epochs = 2  # aer=True needs at least 2
    kw["train_epochs"] = 2
  if name == "casper":
    kw.update(knn_laplace=5, casper_batch=10)
  if name == "piggyback":
    kw["pretrained"] = pretrained
  if name == "coda_prompt":
    kw["n_tasks"] = 5
  if name == "lucir":  # its extra host work: imprinting, exemplar means
    kw.update(imprint=True, classifier="nme")
  if kw:
    c.strategy[name] = kw
  return c
