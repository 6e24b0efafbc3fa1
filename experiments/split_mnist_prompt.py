"""Split MNIST, class-incremental, over a frozen pretrained ViT: L2P,
CODA-Prompt and DualPrompt.

Protocol: MNIST in 5 experiences of 2 classes, class-incremental (no task
id at test time), 1 epoch per experience, batch 32, Adam 1e-3 (about
l2p-pytorch's 0.03 x 16 / 256 at batch 16). The backbone is a small ViT
(patch 7: 16 patches of 28x28; dim 64, depth 4, 4 heads, MLP 128),
pretrained on all of *Fashion-MNIST* (``strategy=pretrain``: 10 classes,
one experience, 5 epochs, Adam 1e-3, batch 128), so no MNIST image reaches
the frozen weights. Rows, all on the same pretrained file:

* ``l2p`` (Wang et al. 2022): pool M=10, prompt length L=5, top N=5, λ=0.1,
  the backbone frozen, the training logits masked to the experience's
  classes; only prompts, keys and head train.
* ``coda_prompt`` (Smith et al. 2023): M=50 components (10 per
  experience, the reference's 100 over 10 tasks; at most the ViT's width
  64), prompt length L=8 (4 prefix keys, 4 values), in blocks 0-3 (the
  reference's 0-4, cut to depth 4), no orthogonality penalty (the
  reference's current scripts: Gram-Schmidt init only); the backbone
  frozen, the training logits masked to the experience's classes.
* ``dualprompt`` (Wang et al. 2022b): G-prompt of length 5 in blocks 0-1,
  one E-prompt of length 5 per experience (pool 5) in blocks 2-3 (the
  references' 2-4 cut to depth 4), prefix-tuning, λ=1.0 (the references'
  ``pull_constraint_coeff``), each new E-prompt started from the previous
  one (``shared_prompt_pool``); the backbone frozen, the training logits
  masked to the experience's classes, the E-prompt chosen by nearest key
  at test time.
* ``naive``: fine-tuning of the whole pretrained ViT (the pretrained head,
  trained on Fashion-MNIST's classes, is its start).
* ``slda`` (Hayes & Kanan 2020): Deep SLDA on the frozen ViT's 64-d CLS
  feature (``features='backbone'``), one pass.
* ``slca`` (Zhang et al. 2023): the whole pretrained ViT fine-tuned with
  SGD (momentum 0.9, weight decay 5e-4) at 0.01 for a new head per
  experience and 1e-4 for the backbone, the training loss over the
  experience's classes; then the head aligned on features sampled from
  each seen class's Gaussian (5 epochs, 256 per class, logit norm 0.1).

A Fashion-MNIST tiny ViT is not ImageNet ViT-B/16: no published L2P number
applies. Criteria and measured numbers: docs/notes_prompt.md.

Commands::

  python -m jaxcl.pretrained --config experiments/split_mnist_prompt.py:strategy=pretrain --out /tmp/fmnist_vit.npz
  jaxcl run --config experiments/split_mnist_prompt.py:strategy=l2p,pretrained=/tmp/fmnist_vit.npz
  jaxcl run --config experiments/split_mnist_prompt.py:strategy=coda_prompt,pretrained=/tmp/fmnist_vit.npz
  jaxcl run --config experiments/split_mnist_prompt.py:strategy=dualprompt,pretrained=/tmp/fmnist_vit.npz
  jaxcl run --config experiments/split_mnist_prompt.py:strategy=naive,pretrained=/tmp/fmnist_vit.npz
  jaxcl run --config experiments/split_mnist_prompt.py:strategy=slda,pretrained=/tmp/fmnist_vit.npz
  jaxcl run --config experiments/split_mnist_prompt.py:strategy=slca,pretrained=/tmp/fmnist_vit.npz

Arguments: ``strategy`` (l2p | coda_prompt | dualprompt | naive | slda |
slca | pretrain), ``seed``, ``pretrained``, ``epochs``, ``lam`` (L2P's or
DualPrompt's λ; default -1: the method's own, 0.1 for L2P, 1.0 for
DualPrompt), ``ortho_mu`` (CODA's μ), ``lr`` (default -1: the row's own,
Adam's 1e-3, SLCA's SGD 0.01),
``quick`` (2000
training / 1000 test examples, for tests).
"""

from jaxcl.configs import parse_arg
from jaxcl.experiment import default_config

STRATEGIES = ("l2p", "coda_prompt", "dualprompt", "naive", "slda", "slca",
              "pretrain")
VIT = dict(patch=7, dim=64, depth=4, heads=4, mlp_dim=128)
# L2P's pool as the paper and Mammoth's defaults: M=10, L=5, N=5.
POOL = dict(pool_size=10, prompt_length=5, top_k=5)
# CODA-Prompt's components: 10 per experience (the reference's 100 over 10
# tasks), L=8 as the reference, in every block (its 0-4 cut to depth 4).
CODA = dict(prompt="coda", pool_size=50, prompt_length=8)
# DualPrompt's prompts: one E-prompt per experience; the model's defaults
# are the references' lengths (5, 5) and blocks (G 0-1, E 2-4 cut to 2-3).
DUAL = dict(prompt="dualprompt", pool_size=5)


def get_config(arg=None):
  a = parse_arg(arg, strategy="l2p", seed=0, pretrained="", epochs=1,
                lam=-1.0, ortho_mu=0.0, lr=-1.0, quick=False)
  name = a["strategy"]
  if name not in STRATEGIES:
    raise ValueError(f"unknown strategy {name!r} for this config; valid: "
                     f"{list(STRATEGIES)}")
  c = default_config()
  c.name = f"split_mnist_prompt_{name}"
  c.seed = a["seed"]
  c.dataset.name = "mnist"
  c.scenario.type = "split"
  c.scenario.kind = "class"
  c.scenario.n_experiences = 5
  c.model.name = "vit"
  c.model.vit = dict(VIT)
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3 if a["lr"] < 0 else a["lr"]
  c.train.epochs = a["epochs"]
  c.train.batch_size = 32
  c.train.eval_batch_size = 1000
  c.report.progress = False
  c.strategy.name = name
  if name == "pretrain":
    c.name = "pretrain_fashion_mnist_vit"
    c.dataset.name = "fashion_mnist"
    c.scenario.n_experiences = 1
    c.strategy.name = "naive"
    c.train.epochs = 5
    c.train.batch_size = 128
  elif name == "l2p":
    c.model.vit = dict(VIT, **POOL)
    c.strategy.l2p = dict(lam=0.1 if a["lam"] < 0 else a["lam"],
                          pretrained=a["pretrained"])
  elif name == "coda_prompt":
    c.model.vit = dict(VIT, **CODA)
    c.strategy.coda_prompt = dict(ortho_mu=a["ortho_mu"],
                                  pretrained=a["pretrained"])
  elif name == "dualprompt":
    c.model.vit = dict(VIT, **DUAL)
    c.strategy.dualprompt = dict(lam=1.0 if a["lam"] < 0 else a["lam"],
                                 pretrained=a["pretrained"])
  elif name == "naive":
    c.model.pretrained = a["pretrained"]
  elif name == "slda":
    c.model.pretrained = a["pretrained"]
    c.strategy.slda = dict(features="backbone")
    c.optimizer.name = "sgd"   # its updates are zero: SLDA trains no weight
    c.optimizer.learning_rate = 0.1
  elif name == "slca":
    # The paper's SGD: momentum 0.9, weight decay 5e-4, head 1e-2 and the
    # backbone 1e-4 (backbone_lr_scale 0.01); the strategy's alignment
    # defaults are the reference's (5 epochs, 256 samples per class,
    # logit norm 0.1).
    c.model.pretrained = a["pretrained"]
    c.strategy.slca = dict(backbone_lr_scale=0.01)
    c.optimizer.name = "momentum"
    c.optimizer.momentum = 0.9
    c.optimizer.weight_decay = 5e-4
    c.optimizer.learning_rate = 0.01 if a["lr"] < 0 else a["lr"]
  if a["quick"]:
    c.dataset.train_subset = 2000
    c.dataset.test_subset = 1000
    c.train.eval_batch_size = 250
  return c
