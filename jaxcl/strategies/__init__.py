"""Continual-learning strategies, one module per method.

A strategy named ``foo`` lives in ``jaxcl/strategies/foo.py`` and exposes a
factory ``foo(**hyperparameters) -> Strategy``. A module may also define
``scenario(s: Scenario) -> Scenario`` when the method changes what data the
experiences train on (Joint, Cumulative). :func:`get` looks strategies up by
module name, so adding a method needs no registry edit.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import textwrap
from typing import Any, Callable

from jaxcl.strategy import Strategy, chain

__all__ = ["available", "get", "from_spec", "FAMILIES", "PAPERS", "NEEDS",
           "ONE_EXPERIENCE_PER_CLASS",
           "defaults", "describe", "summary", "reference"]

# The survey's families (DESIGN.md); every module is in exactly one
# (tested), so a new method cannot go missing from the method reference.
FAMILIES: dict[str, tuple[str, ...]] = {
    "baselines": ("naive", "joint", "cumulative", "ensemble", "multihead",
                  "freezing", "from_scratch"),
    "regularisation": ("ewc", "online_ewc", "si", "mas", "lwf",
                       "hypernetwork", "rwalk", "lfl", "lwm", "lwf_mc",
                       "feature_distillation"),
    "replay": ("replay", "gdumb", "mir", "exstream", "latent_replay",
               "generative_replay", "der", "derpp", "er_ace", "gss",
               "er_aml", "xder", "fdr", "hal", "mer", "lamaml", "scr", "cope",
               "rpc", "clser", "lider", "rar", "er_tricks", "star", "casper",
               "aer_abs", "cscct", "puridiver", "spr", "aser", "feature_replay",
               "ser", "er_acl", "gsa"),
    "architectural": ("cwr_star", "progressive", "piggyback", "packnet", "hat",
                      "supsup", "expert_gate"),
    "hybrid": ("gem", "agem", "agem_r", "icarl", "progress_compress", "ar1",
               "generative_negative_replay", "bic", "lucir", "il2m", "eeil",
               "dmc", "ss_il", "wa", "siw", "dualnet", "twf"),
    # Not in the survey: closed-form classifiers over a feature extractor
    # that no gradient trains (docs/notes_analytic.md).
    "analytic": ("slda", "fecam", "ranpac", "fetril"),
    # Not in the survey: prompts learned for a frozen pretrained
    # transformer (docs/notes_prompt.md).
    "prompt": ("l2p", "dualprompt", "coda_prompt"),
    # Not in the survey: a pretrained model fine-tuned whole, the backbone
    # slowly, its classifier re-aligned on class statistics
    # (docs/notes_prompt.md).
    "pretrained": ("slca",),
}

# The paper each method follows (its module docstring gives the equations).
PAPERS: dict[str, str] = {
    "ewc": "Kirkpatrick et al. 2017, *Overcoming catastrophic forgetting in "
           "neural networks*, PNAS",
    "online_ewc": "Schwarz et al. 2018, *Progress & Compress: a scalable "
                  "framework for continual learning*, ICML",
    "si": "Zenke, Poole & Ganguli 2017, *Continual learning through synaptic "
          "intelligence*, ICML",
    "mas": "Aljundi et al. 2018, *Memory aware synapses: learning what (not) "
           "to forget*, ECCV",
    "lwf": "Li & Hoiem, *Learning without forgetting*, ECCV 2016; TPAMI "
           "2018",
    "hypernetwork": "von Oswald et al. 2020, *Continual learning with "
                    "hypernetworks*, ICLR",
    "rwalk": "Chaudhry, Dokania, Ajanthan & Torr 2018, *Riemannian walk for "
             "incremental learning: understanding forgetting and "
             "intransigence*, ECCV",
    "lfl": "Jung, Ju, Jung & Kim 2016, *Less-forgetting learning in deep "
           "neural networks*, arXiv:1607.00122 (AAAI 2018: *Less-forgetful "
           "learning for domain expansion in deep neural networks*)",
    "replay": "Chaudhry et al. 2019, *On tiny episodic memories in continual "
              "learning*; Buzzega et al. 2020's ER baseline",
    "gdumb": "Prabhu, Torr & Dokania 2020, *GDumb: a simple approach that "
             "questions our progress in continual learning*, ECCV",
    "mir": "Aljundi et al. 2019, *Online continual learning with maximally "
           "interfered retrieval*, NeurIPS",
    "exstream": "Hayes, Cahill & Kanan 2019, *Memory efficient experience "
                "replay for streaming learning*, ICRA",
    "latent_replay": "Pellegrini et al. 2020, *Latent replay for real-time "
                     "continual learning*, IROS",
    "generative_replay": "Shin et al. 2017, *Continual learning with deep "
                         "generative replay*, NeurIPS",
    "der": "Buzzega et al. 2020, *Dark experience for general continual "
           "learning: a strong, simple baseline*, NeurIPS",
    "derpp": "Buzzega et al. 2020, *Dark experience for general continual "
             "learning: a strong, simple baseline*, NeurIPS (DER++)",
    "ser": "Zhuo, Cheng, Gao, Fan & Kankanhalli 2023, *Continual learning "
           "with strong experience replay*, arXiv:2305.13622 (SER; the "
           "authors' code, visiontao/cl)",
    "siw": "Belouadah, Popescu & Kanellos 2020, *Initial classifier weights "
           "replay for memoryless class incremental learning*, BMVC (SIW; "
           "the authors' code, inFT_siw_mc)",
    "er_ace": "Caccia et al. 2022, *New insights on reducing abrupt "
              "representation change in online continual learning*, ICLR",
    "gsa": "Guo, Liu & Zhao 2023, *Dealing with cross-task class "
           "discrimination in online continual learning*, CVPR "
           "(Avalanche's GSA)",
    "twf": "Boschini, Bonicelli, Porrello, Bellitto, Pennisi, Palazzo, "
           "Spampinato & Calderara 2022, *Transfer without forgetting*, "
           "ECCV (TwF; Mammoth's twf)",
    "dualnet": "Pham, Liu & Hoi 2021, *DualNet: continual learning, fast "
               "and slow*, NeurIPS (the authors' task-free code; "
               "Avalanche's DualNet)",
    "er_acl": "Caccia et al. 2022, *New insights on reducing abrupt "
              "representation change in online continual learning*, ICLR "
              "(Avalanche's ER_ACL: ER-ACE's loss by experience, with a "
              "class-balanced memory filled as each experience starts)",
    "er_aml": "Caccia et al. 2022, *New insights on reducing abrupt "
              "representation change in online continual learning*, ICLR "
              "(ER-AML)",
    "xder": "Boschini, Bonicelli, Buzzega, Porrello & Calderara 2022, "
            "*Class-incremental continual learning into the eXtended "
            "DER-verse*, TPAMI (X-DER; Mammoth's xder_ce)",
    "fdr": "Benjamin, Rolnick & Kording 2019, *Measuring and regularizing "
           "networks in function space*, ICLR (FDR; as Buzzega et al. "
           "2020 run it, Mammoth's fdr)",
    "hal": "Chaudhry, Gordo, Dokania, Torr & Lopez-Paz 2021, *Using "
           "hindsight to anchor past knowledge in continual learning*, AAAI "
           "(HAL; as Mammoth's hal runs it)",
    "mer": "Riemer et al. 2019, *Learning to learn without forgetting by "
           "maximizing transfer and minimizing interference*, ICLR (MER, "
           "Algorithm 1; per_example=False: Mammoth's mer)",
    "lamaml": "Gupta, Yadav & Paull 2020, *La-MAML: look-ahead meta "
              "learning for continual learning*, NeurIPS",
    "scr": "Mai, Li, Kim & Sanner 2021, *Supervised contrastive replay: "
           "revisiting the nearest class mean classifier in online "
           "class-incremental continual learning*, CVPR Workshops",
    "cope": "De Lange & Tuytelaars 2021, *Continual prototype evolution: "
            "learning online from non-stationary data streams*, ICCV",
    "gss": "Aljundi, Lin, Goujaud & Bengio 2019, *Gradient based sample "
           "selection for online continual learning*, NeurIPS (GSS-greedy)",
    "cwr_star": "Lomonaco, Maltoni & Pellegrini 2020, *Rehearsal-free "
                "continual learning over small non-i.i.d. batches*, CVPR "
                "Workshops (CWR*; CWR: Lomonaco & Maltoni 2017)",
    "progressive": "Rusu et al. 2016, *Progressive neural networks*, "
                   "arXiv:1606.04671",
    "piggyback": "Mallya, Davis & Lazebnik 2018, *Piggyback: adapting a "
                 "single network to multiple tasks by learning to mask "
                 "weights*, ECCV",
    "packnet": "Mallya & Lazebnik 2018, *PackNet: adding multiple tasks to a "
               "single network by iterative pruning*, CVPR",
    "hat": "Serrà et al. 2018, *Overcoming catastrophic forgetting with hard "
           "attention to the task*, ICML",
    "supsup": "Wortsman et al. 2020, *Supermasks in superposition*, NeurIPS",
    "expert_gate": "Aljundi, Chakravarty & Tuytelaars 2017, *Expert gate: "
                   "lifelong learning with a network of experts*, CVPR",
    "gem": "Lopez-Paz & Ranzato 2017, *Gradient episodic memory for "
           "continual learning*, NeurIPS",
    "agem": "Chaudhry et al. 2019, *Efficient lifelong learning with "
            "A-GEM*, ICLR",
    "agem_r": "Chaudhry et al. 2019, *Efficient lifelong learning with "
              "A-GEM*, ICLR, with a reservoir memory (Mammoth's agem_r, "
              "Buzzega et al. 2020)",
    "icarl": "Rebuffi et al. 2017, *iCaRL: incremental classifier and "
             "representation learning*, CVPR",
    "progress_compress": "Schwarz et al. 2018, *Progress & Compress: a "
                         "scalable framework for continual learning*, ICML",
    "ar1": "Maltoni & Lomonaco 2019, *Continuous learning in "
           "single-incremental-task scenarios*, Neural Networks (AR1); with "
           "CWR* as here, Lomonaco, Maltoni & Pellegrini 2020's AR1*; latent "
           "replay: Pellegrini et al. 2020, IROS",
    "generative_negative_replay": "Graffieti et al. 2023, *Generative "
                                  "negative replay for continual learning*, "
                                  "Neural Networks",
    "bic": "Wu et al. 2019, *Large scale incremental learning*, CVPR (BiC)",
    "wa": "Zhao et al. 2020, *Maintaining discrimination and fairness in "
          "class incremental learning*, CVPR (WA)",
    "lucir": "Hou et al. 2019, *Learning a unified classifier incrementally "
             "via rebalancing*, CVPR (LUCIR)",
    "il2m": "Belouadah & Popescu 2019, *IL2M: class incremental learning "
            "with dual memory*, ICCV",
    "lwf_mc": "Rebuffi, Kolesnikov, Sperl & Lampert 2017, *iCaRL: "
              "incremental classifier and representation learning*, CVPR "
              "(LwF.MC, their multi-class LwF baseline; Mammoth's lwf_mc)",
    "lwm": "Dhar et al. 2019, *Learning without memorizing*, CVPR (LwM)",
    "dmc": "Zhang et al. 2020, *Class-incremental learning via deep model "
           "consolidation*, WACV (DMC)",
    "eeil": "Castro et al. 2018, *End-to-end incremental learning*, ECCV "
            "(EEIL)",
    "clser": "Arani, Sarfraz & Zonooz 2022, *Learning fast, learning "
             "slow: a general continual learning method based on "
             "complementary learning system*, ICLR (CLS-ER)",
    "rpc": "Pernici, Bruni, Baecchi, Turchini & Del Bimbo 2021, "
           "*Class-incremental learning with pre-allocated fixed "
           "classifiers*, ICPR (RPC; as Mammoth's rpc, trained through the "
           "fixed simplex)",
    "ss_il": "Ahn et al. 2021, *SS-IL: Separated softmax for incremental "
             "learning*, ICCV (SS-IL)",
    "rar": "Kumari, Wang, Zhou & Bilmes 2022, *Retrospective adversarial "
           "replay for continual learning*, NeurIPS (RAR; the authors' "
           "feature-matching attack)",
    "lider": "Bonicelli, Boschini, Porrello, Spampinato & Calderara 2022, "
             "*On the effectiveness of Lipschitz-driven rehearsal in "
             "continual learning*, NeurIPS (LiDER; a regulariser to chain "
             "with a replay method, e.g. `lider+derpp`)",
    "feature_distillation": "Hou, Pan, Loy, Wang & Lin 2019, *Learning a "
                            "unified classifier incrementally via "
                            "rebalancing*, CVPR (Eq. 6, the less-forget "
                            "constraint; as Avalanche's "
                            "FeatureDistillationPlugin)",
    "feature_replay": "Magistri, Trinci, Soutif-Cormerais, van de Weijer & "
                      "Bagdanov 2024, *Elastic feature consolidation for "
                      "cold start exemplar-free incremental learning*, ICLR "
                      "(the protocol of Avalanche's FeatureReplay)",
    "fetril": "Petit, Popescu, Schindler, Picard & Delezoide 2023, *FeTrIL: "
              "feature translation for exemplar-free class-incremental "
              "learning*, WACV (FeTrIL)",
    "fecam": "Goswami, Liu, Twardowski & van de Weijer 2023, *FeCAM: "
             "exploiting the heterogeneity of class distributions in "
             "exemplar-free continual learning*, NeurIPS (FeCAM)",
    "er_tricks": "Buzzega, Boschini, Porrello & Calderara 2020, "
                 "*Rethinking experience replay: a bag of tricks for "
                 "continual learning*, ICPR (ER with tricks; Mammoth's "
                 "er_tricks: LARS / LABRS memory, ELRD, bias control)",
    "star": "Eskandar, Imtiaz, Hill, Wang & Dy 2025, *STAR: "
            "Stability-inducing weight perturbation for continual "
            "learning*, ICLR (STAR; a regulariser to chain with a replay "
            "method, e.g. `star+er_ace`)",
    "casper": "Frascaroli, Benaglia, Boschini, Moschella, Fiorini, Rodolà "
              "& Calderara 2024, *CaSpeR: Latent spectral regularization "
              "for continual learning*, Pattern Recognition Letters "
              "(CaSpeR; a regulariser to chain with a replay method, e.g. "
              "`casper+er_ace`)",
    "cscct": "Ashok, Joseph & Balasubramanian 2022, *Class-incremental "
             "learning with cross-space clustering and controlled "
             "transfer*, ECCV (CSCCT; a regulariser to chain with a replay "
             "method that appends its memory rows, e.g. `cscct+er_ace`)",
    "aer_abs": "Millunzi, Bonicelli, Porrello, Credi, Kolm & Calderara "
               "2024, *May the forgetting be with you: alternate replay "
               "for learning with noisy labels*, BMVC (AER + ABS on ER-ACE; "
               "Mammoth's er_ace_aer_abs, without buffer fitting)",
    "puridiver": "Bang, Koh, Park, Song, Ha & Choi 2022, *Online "
                 "continual learning on a contaminated data stream with "
                 "blurry task boundaries*, CVPR (PuriDivER; Mammoth's "
                 "puridiver, its similarity score from the authors' code)",
    "spr": "Kim, Jeong, Moon & Kim 2021, *Continual learning on noisy "
           "data streams via self-purified replay*, ICCV (SPR; the "
           "authors' class-balanced purified buffer; Mammoth's spr)",
    "slda": "Hayes & Kanan 2020, *Lifelong machine learning with deep "
            "streaming linear discriminant analysis*, CVPR Workshops",
    "coda_prompt": "Smith, Karlinsky, Gutta, Cascante-Bonilla, Kim, "
                   "Arbelle, Panda, Feris & Kira 2023, *CODA-Prompt: "
                   "COntinual Decomposed Attention-based prompting for "
                   "rehearsal-free continual learning*, CVPR "
                   "(GT-RIPL/CODA-Prompt `models/zoo.py`, Mammoth's "
                   "coda_prompt)",
    "dualprompt": "Wang, Zhang, Ebrahimi, Sun, Zhang, Lee, Ren, Su, "
                  "Perot, Dy & Pfister 2022, *DualPrompt: complementary "
                  "prompting for rehearsal-free continual learning*, ECCV "
                  "(google-research/l2p, JH-LEE-KR/dualprompt-pytorch, "
                  "Mammoth's dualprompt)",
    "l2p": "Wang, Zhang, Lee, Zhang, Sun, Ren, Su, Perot, Dy & Pfister "
           "2022, *Learning to prompt for continual learning*, CVPR (L2P; "
           "google-research/l2p, Mammoth's l2p)",
    "aser": "Shim, Mai, Jeong, Sanner, Kim & Jang 2021, *Online "
            "class-incremental continual learning with adversarial Shapley "
            "value*, AAAI (RaptorMai/online-continual-learning)",
    "slca": "Zhang, Wang, Kang, Chen & Wei 2023, *SLCA: slow learner "
            "with classifier alignment for continual learning on a "
            "pre-trained model*, ICCV (GengDavid/SLCA, Mammoth's slca)",
    "ranpac": "McDonnell, Gong, Parvaneh, Abbasnejad & van den Hengel "
              "2023, *RanPAC: random projections and pre-trained models "
              "for continual learning*, NeurIPS (phase 2; phase 1 as "
              "`adapt_first`)",
}


# What a method needs beyond the default MLP and stream. Each is checked
# with a clear error at ``init``; listed here so a reader knows before.
NEEDS: dict[str, str] = {
    "multihead": "task ids (`scenario.kind='task'`) and a model with a "
                 "`head` layer",
    "cwr_star": "a single head over all classes",
    "hypernetwork": "the `hypernet` model, with `num_embeddings` at least "
                    "the number of tasks (task-incremental) or experiences",
    "progressive": "the `progressive` model and a task id per experience",
    "piggyback": "the `masked_mlp` model with `mask='threshold'` over "
                 "pretrained weights (`strategy.piggyback.pretrained`: an "
                 ".npz from `jaxcl.pretrained.save`) and a task id per "
                 "experience",
    "packnet": "a task id per experience",
    "hat": "the `hat_mlp` model and a task id per experience",
    "supsup": "the `masked_mlp` model with `mask='edge_popup'` or `'sign'` "
              "and a task id per experience",
    "progress_compress": "the 2-column `progressive` model and a class- or "
                         "domain-incremental stream",
    "ar1": "a single head over all classes (CWR*)",
    "bic": "a class-incremental stream (`scenario.kind='class'`), each class "
           "in one experience",
    "lucir": "the cosine-normalised head (`model.head='cosine'`) and a "
             "class-incremental stream, each class in one experience",
    "il2m": "a class-incremental stream (`scenario.kind='class'`), each "
            "class in one experience",
    "wa": "a class-incremental stream (`scenario.kind='class'`), each class "
          "in one experience, and a linear `head` over all classes",
    "eeil": "a class-incremental stream (`scenario.kind='class'`), each "
            "class in one experience",
    "siw": "a class-incremental stream (`scenario.kind='class'`), each class "
           "in one experience, and a linear `head` over all classes",
    "dmc": "a class-incremental stream (`scenario.kind='class'`), each "
           "class in one experience, and unlabelled auxiliary images of the "
           "stream's shape (`aux_dataset`, e.g. fashion_mnist for MNIST)",
    "lwm": "a convolutional model (`cnn`, `resnet18`; `layer` names its "
           "last convolution) and a class- or domain-incremental stream",
    "lfl": "a model whose output layer is named `head` (mlp, cnn, "
           "resnet18); meant for domain-incremental streams",
    "freezing": "a model with `backbone` and `head` params (mlp, cnn, "
                "resnet18)",
    "dualnet": "the `dualnet` model (a slow learner gated by a fast one) "
               "and plain SGD at the strategy's `lr`",
    "twf": "a ResNet (`resnet18`, `resnet32`), whose stage maps it "
           "distils, started from pretrained parameters "
           "(`model.pretrained`: the frozen teacher is the starting model)",
    "expert_gate": "a single head over all classes (each expert is the whole "
                   "model; the gate, not a task id, picks it)",
    "xder": "a class-incremental stream (`scenario.kind='class'`), each "
            "class in one experience, and one output per class",
    "ss_il": "a class-incremental stream (`scenario.kind='class'`), each "
             "class in one experience",
    "rpc": "a class-incremental stream (`scenario.kind='class'`), each "
           "class in one experience, and at least num_classes - 1 model "
           "outputs",
    "feature_replay": "a model with a `backbone` module whose output is the "
                      "feature the output layer reads (mlp, cnn, resnet18), "
                      "and `mem_size` at least the number of classes",
    "fetril": "each class in one experience (its mean is taken when its "
              "experience ends), and a first experience that trains good "
              "features: the model is frozen after it",
    "fecam": "each class in one experience (its statistics are computed "
             "when its experience ends)",
    "coda_prompt": "the `vit` model with CODA's components "
                   "(`model.name='vit'`, `model.vit.prompt='coda'`, "
                   "`model.vit.pool_size > 0` and at most `model.vit.dim`, "
                   "e.g. 50) and a pretrained backbone "
                   "(`strategy.coda_prompt.pretrained`: an .npz of a plain "
                   "`vit` run; without one the frozen backbone is random)",
    "dualprompt": "the `vit` model with DualPrompt's prompts "
                  "(`model.name='vit'`, `model.vit.prompt='dualprompt'`, "
                  "`model.vit.pool_size` at least the number of "
                  "experiences, e.g. 5) and a pretrained backbone "
                  "(`strategy.dualprompt.pretrained`: an .npz of a plain "
                  "`vit` run; without one the frozen backbone is random)",
    "l2p": "the `vit` model with a prompt pool (`model.name='vit'`, "
           "`model.vit.pool_size > 0`, e.g. 10) and a pretrained backbone "
           "(`strategy.l2p.pretrained`: an .npz of a plain `vit` run from "
           "`jaxcl.pretrained.save`; without one the frozen backbone is "
           "random)",
    "aser": "`mem_size` at least `n_smp_cls` times the number of "
            "classes (20 at the defaults with 10 classes)",
    "slca": "a class-incremental stream, each class in one experience, "
            "a model with a linear `head` (kernel, bias), and a pretrained "
            "start (`model.pretrained`: an .npz of a plain run, "
            "`jaxcl.pretrained`); `C x D x D` covariances in the state",
    "ranpac": "`proj_dim`² floats in the state (400 MB at the paper's "
              "10000; on 2 CPU cores each experience's end then takes "
              "~40 s for the eigendecomposition of the λ search)",
    "casper": "`knn_laplace` < `casper_batch` (the training batch by "
              "default: give `knn_laplace=5` at batch 10), `p` + 2 <= "
              "`casper_batch`, and `mem_size` at least the number of "
              "classes",
    "cscct": "a class- or task-incremental stream, each class in one "
             "experience, and a partner that appends its memory rows to "
             "the batch (`replay`, `er_ace`; beside `der` / `derpp` it sees "
             "the incoming rows only)",
    "aer_abs": "`train_epochs` equal to the run's `train.epochs` (filled "
               "in from a config; at least 2 with `aer=True`)",
    "puridiver": "a model whose output layer is named `head`, one output "
                 "per class (mlp, cnn, resnet18 with a single head): the "
                 "drop score reads the class weights",
    "spr": "a model whose output layer is named `head` (mlp, cnn, "
           "resnet18): the classifier fitted to the purified buffer is the "
           "base network's features with a fresh `head`",
    "lider": "a convolutional model (`cnn`, `resnet18`) with a layer pair "
             "of more than one channel before it and a spatial map after "
             "it: on an MLP every layer's Lipschitz estimate is 1, and a "
             "grayscale input's pair is left out",
}

# Strategies that learn each class in one experience: their host hooks
# refuse a class that comes back (jaxcl.strategy.new_classes), when its
# second experience starts. A config naming one is refused at setup
# instead, on a stream whose classes recur (blurry, domain-incremental),
# before anything is trained (tests/test_scenarios.py runs each on such a
# stream to keep this list true).
ONE_EXPERIENCE_PER_CLASS: tuple[str, ...] = (
    "bic", "cscct", "dmc", "eeil", "fecam", "fetril", "gsa", "il2m", "lucir",
    "rpc", "slca",
    "siw", "ss_il", "wa", "xder")


def available() -> list[str]:
  """Names of all strategy modules."""
  import jaxcl.strategies as pkg
  return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__)
                if not m.name.startswith("_"))


def _module(name: str):
  if name not in available():
    raise ValueError(f"unknown strategy {name!r}; valid: {available()}")
  return importlib.import_module(f"jaxcl.strategies.{name}")


def _factory(name: str) -> Callable[..., Strategy]:
  """Module ``name``'s factory, also called ``name``."""
  return getattr(_module(name), name)


def get(name: str, **kwargs: Any) -> Strategy:
  """Builds strategy ``name`` with hyperparameters ``kwargs``.

  Raises:
    ValueError: unknown name (listing the valid ones) or bad arguments.
  """
  factory = _factory(name)
  try:
    return factory(**kwargs)
  except TypeError as e:
    raise ValueError(f"bad arguments for strategy {name!r}: {e}") from e


def from_spec(spec: str, kwargs: dict[str, dict[str, Any]] | None = None
              ) -> tuple[Strategy, Callable]:
  """Builds ``'ewc+replay'``-style specs: the chain of the named strategies.

  Args:
    spec: strategy names joined by ``+`` (applied left to right).
    kwargs: per-name hyperparameters, e.g. ``{'ewc': {'lam': 100.}}``.

  Returns:
    The strategy and a function mapping a scenario to the one it trains on:
    the record's ``scenario`` (a joint or cumulative member's), else the
    identity. ``experiment.setup`` applies it itself, to the stream as
    built.
  """
  kwargs = kwargs or {}
  names = [n.strip() for n in spec.split("+") if n.strip()]
  if not names:
    raise ValueError(f"empty strategy spec {spec!r}; valid names: "
                     f"{available()}")
  unknown = set(kwargs) - set(names)
  if unknown:
    raise ValueError(f"hyperparameters given for {sorted(unknown)}, which "
                     f"are not in the strategy spec {spec!r}")
  members = [get(n, **dict(kwargs.get(n, {}))) for n in names]
  strategy = members[0] if len(members) == 1 else chain(*members)
  return strategy, strategy.scenario or (lambda s: s)


def describe(name: str) -> str:
  """A markdown reference for strategy ``name``: what it does, its paper,
  its factory's signature with defaults and the factory's ``Args``.

  Built from the code (signature and docstrings), so it cannot drift from
  it; ``docs/methods.md`` and ``jaxcl methods NAME`` print it.
  """
  factory = _factory(name)
  lines = [f"### `{name}`", "", summary(name), ""]
  if name in PAPERS:
    lines += [f"Paper: {PAPERS[name]}.", ""]
  if name in NEEDS:
    lines += [f"Needs: {NEEDS[name]}.", ""]
  # name=default only: the annotations are strings here (postponed
  # evaluation) and the Args below say what each value means.
  params = ", ".join(
      str(p.replace(annotation=inspect.Parameter.empty))
      for p in inspect.signature(factory).parameters.values())
  lines += ["```python", f"{name}({params})", "```", ""]
  args = _doc_section(inspect.getdoc(factory) or "", "Args")
  if args:
    lines += ["Arguments:", "", "```", args, "```", ""]
  return "\n".join(lines)


def defaults(name: str) -> dict[str, Any]:
  """Strategy ``name``'s arguments and their default values."""
  return {p.name: p.default
          for p in inspect.signature(_factory(name)).parameters.values()}


def summary(name: str) -> str:
  """The first line of strategy ``name``'s module docstring."""
  return ((inspect.getdoc(_module(name)) or "").splitlines() or [""])[0]


def reference() -> str:
  """``docs/methods.md``: every method by family, then each described."""
  lines = ["# Methods", "",
           "Generated from the code by `jaxcl methods --markdown` (a test "
           "fails when it is stale). Each strategy is "
           "`jaxcl.strategies.get(name, **arguments)`, or from a config "
           "`config.strategy.name = name` and `config.strategy[name] = "
           "dict(arguments)`; chain several with `+` (e.g. `ewc+replay`).",
           ""]
  for family, names in FAMILIES.items():
    lines += [f"## {family.capitalize()}", "", "| strategy | what it does |",
              "| --- | --- |"]
    lines += [f"| [`{n}`](#{n}) | {summary(n)} |" for n in names]
    lines.append("")
  for names in FAMILIES.values():
    for n in names:
      lines.append(describe(n))
  return "\n".join(lines).rstrip() + "\n"


def _doc_section(doc: str, header: str) -> str:
  """The body of a Google-style docstring section (dedented), or ``''``."""
  out, inside = [], False
  for line in doc.splitlines():
    if line.strip() == f"{header}:":
      inside = True
      continue
    if inside and line and not line.startswith(" "):
      break  # the next section
    if inside:
      out.append(line)
  return textwrap.dedent("\n".join(out)).strip()
