"""Split MNIST with the hybrid strategies: GEM, A-GEM, iCaRL, AR1, P&C,
generative negative replay (and Naive / Replay with the same memory).

Protocol (Buzzega et al. 2020, `Dark experience for general continual
learning <https://arxiv.org/abs/2004.07211>`_, Mammoth's ``seq-mnist``):
MNIST in 5 experiences of 2 classes, MLP 784-100-100-10, plain SGD, one
pass over each experience (online), batch 10, total memory ``mem_size``
(200 or 500). Class-incremental by default (``kind=task`` masks logits to
the experience's two classes). Learning rates are Mammoth's best for
``seq-mnist`` (A-GEM 0.1, iCaRL 0.1, ER 0.1) except GEM: a 3-seed sweep
(lr 0.005-0.03, margin 0.5-2; ``docs/notes_hybrid.md``) chose lr 0.005 /
margin 1.0 for memory 200 and lr 0.01 / margin 1.0 for 500 (Mammoth's
0.01 / 1.0 and 0.03 / 0.5 gave 0.800 and 0.857 here). Other memory sizes:
lr 0.03, margin 0.5.

* ``gem`` (Lopez-Paz & Ranzato 2017): ``mem_size // 5`` examples per
  experience. Buzzega et al.: 80.1 / 85.9 % (mem 200 / 500), class-IL.
* ``agem`` (Chaudhry et al. 2019): task-IL 98.3 / 98.6 % in Buzzega et al.
  (run with ``kind=task``).
* ``agem_r`` (Mammoth's A-GEM with a reservoir memory): A-GEM's lr 0.1
  and sample of up to 256; no published Split MNIST number, read against
  ``agem`` and ``replay``.
* ``icarl`` (Rebuffi et al. 2017): ``mem_size`` exemplars, NME.
  Buzzega et al.: 70.5 / 70.1 %.
* ``ar1`` (Maltoni & Lomonaco 2019), ``progress_compress`` (Schwarz et al.
  2018; the 2-column ``progressive`` model of 100-100 columns, compress 1
  epoch of Adam), ``generative_negative_replay`` (Graffieti et al. 2022:
  AR1 as above plus a VAE 400-400 / latent 100 generator whose samples are
  negatives only): no published Split MNIST anchor;
  compare with ``naive`` and ``replay`` (reservoir, same ``mem_size``).
* ``bic`` (Wu et al. 2019): ``mem_size`` exemplars in all (a tenth of
  each class's slots held out for the bias correction), 10 exemplars per
  step, FACIL's stage-2 settings (200 epochs, SGD 0.1 with momentum 0.9);
  lr 0.1 as iCaRL's. No published Split MNIST number: compare with
  ``icarl`` and ``replay`` at the same memory.
* ``lucir`` (Hou et al. 2019): the cosine-normalised head,
  ``mem_size`` herded exemplars, 10 per step, FACIL's settings (``λ_base``
  5, margin 0.5, ``K`` 2); lr 0.1 as iCaRL's. No published Split MNIST
  number: compare with ``icarl``, ``bic`` and ``replay``.
* ``il2m`` (Belouadah & Popescu 2019): ``mem_size`` herded exemplars,
  10 per step, plain cross-entropy; the old classes' scores rectified at
  prediction (``rectify=False``: the same run without it, the ablation).
  lr 0.1 as iCaRL's. No published Split MNIST number.
* ``eeil`` (Castro et al. 2018): ``mem_size`` herded exemplars, 10 per
  step, CE plus distillation within each old experience's classes (λ 1,
  T 2), then at each experience's end the balanced fine-tuning: 30
  epochs (``finetune``; 0: none, the ablation) of SGD with momentum 0.9
  from 0.01 (a tenth of the training rate, as the paper), divided by 10
  every 10 epochs. lr 0.1 as iCaRL's. No published Split MNIST number.
* ``wa`` (Zhao et al. 2020): ``mem_size`` herded exemplars, 10 per step,
  ``(1 - λ)`` CE plus ``λ`` distillation (T 2, ``λ`` old over seen
  classes), the output weights clipped at zero after every step, and at
  each experience's end the new classes' weight vectors scaled to the old
  ones' mean norm. lr 0.1 as iCaRL's. ``align=False``: the same run
  without the alignment (the paper's "KD" ablation); ``clip=False``:
  without the clipping. No published Split MNIST number: compare with
  ``bic``, ``icarl`` and ``replay``.
* ``dmc`` (Zhang et al. 2020): no exemplar; each experience trains a
  fresh specialist on its own classes, then a fresh student regresses the
  old and new models' centred logits on 10000 unlabelled images of the
  other data set (Fashion-MNIST for MNIST, MNIST for Fashion-MNIST): 10
  epochs (``consolidate``) of SGD 0.01, momentum 0.9, batch 128. lr 0.1.
  No published Split MNIST number: compare with the exemplar-free rows
  (Naive, AR1, P&C).
* ``siw`` (Belouadah, Popescu & Kanellos 2020): no memory; plain
  fine-tuning (cross-entropy over the classes seen), and at prediction
  the finished classes' initial output weights, standardised, with the
  past classes' scores calibrated by the states' confidences
  (``calibrate=False``: without the calibration, the paper's
  inFT_siw). lr 0.1 as IL2M's. The paper has no MNIST number: compare
  with the exemplar-free rows (Naive, DMC, AR1).
* ``ar1_star``: AR1* (Pellegrini et al. 2020): AR1 plus latent replay of
  ``mem_size`` latents (the 100-unit pre-activation of the first hidden
  layer, ``backbone/Dense_0``; layers below frozen after experience 0),
  10 replayed latents per step; lr 0.03 (3-seed sweep over 0.01 / 0.03 /
  0.1). Same number of stored examples as ``replay`` (each latent is
  100 floats instead of 784).

Commands::

  jaxcl run --config experiments/split_mnist_hybrid.py:strategy=gem,mem_size=200
  jaxcl run --config experiments/split_mnist_hybrid.py:strategy=agem,kind=task
  jaxcl run --config experiments/split_mnist_hybrid.py:strategy=icarl,mem_size=500
  jaxcl run --config experiments/split_mnist_hybrid.py:strategy=ar1,dataset=fashion_mnist
  jaxcl run --config experiments/split_mnist_hybrid.py:strategy=ar1_star,mem_size=200
  jaxcl run --config experiments/split_mnist_hybrid.py:strategy=bic,mem_size=500
  jaxcl run --config experiments/split_mnist_hybrid.py:strategy=lucir,mem_size=200
  jaxcl run --config experiments/split_mnist_hybrid.py:strategy=il2m,mem_size=200
  jaxcl run --config experiments/split_mnist_hybrid.py:strategy=eeil,mem_size=200
  jaxcl run --config experiments/split_mnist_hybrid.py:strategy=dmc
  jaxcl run --config experiments/split_mnist_hybrid.py:strategy=ss_il,mem_size=200
  jaxcl run --config experiments/split_mnist_hybrid.py:strategy=wa,mem_size=200
  jaxcl run --config experiments/split_mnist_hybrid.py:strategy=siw

Arguments: ``strategy``, ``mem_size``, ``kind`` (class | task), ``dataset``
(mnist | fashion_mnist), ``seed``, ``lr`` (0: the protocol's), ``margin``
(GEM; < 0: the protocol's), ``rectify`` (IL2M's score rectification),
``finetune`` (EEIL's balanced fine-tuning epochs), ``consolidate``
(DMC's student epochs), ``align`` and ``clip`` (WA's weight aligning
and clipping), ``calibrate`` (SIW's state-level calibration),
``imprint`` and ``classifier`` (LUCIR's weight
imprinting; ``cnn`` | ``nme``), ``bce`` (iCaRL's BCE over the classes
``seen`` or ``all`` outputs), ``init`` (``model.init``: lecun_normal | torch),
``quick`` (2000 training / 1000 test examples, for tests). Measured results: see
docs/notes_hybrid.md.
"""

from jaxcl.configs import parse_arg
from jaxcl.experiment import default_config

LR = {"gem": 0.03, "agem": 0.1, "agem_r": 0.1, "icarl": 0.1, "replay": 0.1, "naive": 0.1,
      "ar1": 0.1, "ar1_star": 0.03, "progress_compress": 0.1,
      "generative_negative_replay": 0.1, "bic": 0.1, "lucir": 0.1,
      "il2m": 0.1, "eeil": 0.1, "dmc": 0.1, "ss_il": 0.1, "wa": 0.1,
      "siw": 0.1}

# AR1's CWR* / SI settings, shared by ar1, ar1_star and the negative
# replay row that runs on top of AR1.
AR1 = dict(c=0.1, xi=0.1, lower_lr_scale=0.1)

# GEM's (learning rate, margin) per memory size (see the docstring).
GEM = {200: (0.005, 1.0), 500: (0.01, 1.0)}


def get_config(arg=None):
  a = parse_arg(arg, strategy="gem", mem_size=200, kind="class",
                dataset="mnist", seed=0, lr=0.0, margin=-1.0,
                init="lecun_normal", rectify=True, finetune=30, consolidate=10,
                imprint=False, classifier="cnn", bce="seen", align=True,
                clip=True, calibrate=True, quick=False)
  s, m = a["strategy"], a["mem_size"]
  if s not in LR:
    raise ValueError(f"unknown strategy {s!r} for this config; valid: "
                     f"{sorted(LR)}")
  c = default_config()
  c.name = f"split_{a['dataset']}_{s}_{m}_{a['kind']}"
  c.seed = a["seed"]
  c.dataset.name = a["dataset"]
  c.scenario.type = "split"
  c.scenario.kind = a["kind"]
  c.scenario.n_experiences = 5
  c.scenario.online = True
  c.model.name = "mlp"
  c.model.widths = (100, 100)
  c.model.init = a["init"]
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = a["lr"] or (
      GEM.get(m, (LR[s], 0.5))[0] if s == "gem" else LR[s])
  c.train.epochs = 1
  c.train.batch_size = 10
  c.train.eval_batch_size = 1000
  c.report.progress = False
  c.strategy.name = "ar1" if s == "ar1_star" else s
  if s == "gem":
    c.strategy.gem = dict(mem_size=m,
                          margin=a["margin"] if a["margin"] >= 0 else
                          GEM.get(m, (LR[s], 0.5))[1])
  elif s == "agem":
    c.strategy.agem = dict(mem_size=m, sample_size=min(m, 256))
  elif s == "agem_r":  # A-GEM's rate and sample against a reservoir
    c.strategy.agem_r = dict(mem_size=m, sample_size=min(m, 256))
  elif s == "icarl":
    c.strategy.icarl = dict(mem_size=m, batch_size=10)
    if a["bce"] != "seen":  # (the rows run before it keep their config)
      c.strategy.icarl.bce_classes = a["bce"]
  elif s == "replay":
    c.strategy.replay = dict(mem_size=m, batch_size=10)
  elif s == "bic":
    c.strategy.bic = dict(mem_size=m, batch_size=10)
  elif s == "wa":
    c.strategy.wa = dict(mem_size=m, batch_size=10, align=a["align"],
                         clip=a["clip"])
  elif s == "siw":
    c.strategy.siw = dict(calibrate=a["calibrate"])
  elif s == "il2m":
    c.strategy.il2m = dict(mem_size=m, batch_size=10,
                           rectify_scores=a["rectify"])
  elif s == "dmc":
    # The other MNIST-sized data set as unlabelled auxiliary images (as the
    # paper pairs ImageNet32 with CIFAR-100); the student: `consolidate`
    # epochs (10) of SGD 0.01 with momentum 0.9 over 10000 of them, batch
    # 128.
    c.strategy.dmc = dict(
        aux_dataset="fashion_mnist" if a["dataset"] == "mnist" else "mnist",
        consolidate_epochs=a["consolidate"])
  elif s == "eeil":
    # The paper's fine-tuning: a tenth of the training rate, 30 epochs,
    # divided by 10 every 10; SGD with momentum 0.9.
    c.strategy.eeil = dict(mem_size=m, batch_size=10,
                           finetune_epochs=a["finetune"], finetune_lr=0.01)
  elif s == "ss_il":
    c.strategy.ss_il = dict(mem_size=m, batch_size=10)
  elif s == "lucir":
    c.model.head = "cosine"
    c.strategy.lucir = dict(mem_size=m, batch_size=10)
    if a["imprint"]:
      c.strategy.lucir.imprint = True
    if a["classifier"] != "cnn":
      c.strategy.lucir.classifier = a["classifier"]
  elif s == "ar1":
    c.strategy.ar1 = dict(AR1)
  elif s == "ar1_star":
    c.strategy.ar1 = dict(AR1, mem_size=m, replay_batch_size=10,
                          layer="backbone/Dense_0")
  elif s == "progress_compress":
    c.model.name = "progressive"
    c.model.progressive = dict(num_columns=2, widths=(100, 100))
    c.strategy.progress_compress = dict(lam=1000.0, compress_epochs=1,
                                        compress_lr=1e-3)
  elif s == "generative_negative_replay":
    # The paper's setting: AR1 (the row above's settings) with generated
    # samples as negatives (at the input here, with a VAE).
    c.strategy.name = "ar1+generative_negative_replay"
    c.strategy.ar1 = dict(AR1)
    c.strategy.generative_negative_replay = dict(hidden=(400, 400),
                                                 latent=100)
  if a["quick"]:
    c.dataset.train_subset = 2000
    c.dataset.test_subset = 1000
    c.train.eval_batch_size = 250
    if s == "progress_compress":
      c.strategy.progress_compress = dict(lam=1000.0, max_examples=100,
                                          fisher="empirical")
    if s == "generative_negative_replay":
      c.strategy.generative_negative_replay = dict(hidden=(64,), latent=8)
  return c
