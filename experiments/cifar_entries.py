"""Results-table rows on Split CIFAR-10 / CIFAR-100 (experiments/reproduce.py).

These need the CIFAR data through tensorflow_datasets; where it is missing
(this offline machine) reproduce.py lists them as not run. No published
numbers are attached: compare with Buzzega et al. 2020, Table 2 (Split
CIFAR-10), Chaudhry et al. 2019, Table 1 (Split CIFAR-100, 20 tasks) and
Rebuffi et al. 2017, Figure 2 (CIFAR-100, 10 classes per group) and Hou
et al. 2019, Table 1 (CIFAR-100 from 50 classes; its rows report their
average incremental accuracy, pooled over the test examples).
"""

from experiments.reproduce import Entry

_C10 = "Split CIFAR-10 (5x2), ResNet-18, 50 epochs, batch 32 (Buzzega et al. 2020)"
_IC = ("Split CIFAR-100 (10x10) class-incremental, ResNet-32, 70 epochs, "
       "batch 128 (iCaRL's code, Rebuffi et al. 2017)")
_LU = ("Split CIFAR-100 from 50 classes, class-incremental, ResNet-32, 160 "
       "epochs, batch 128 (LUCIR's code, Hou et al. 2019); average "
       "incremental accuracy over the test examples of the classes seen")
_C100 = ("Split CIFAR-100 (20x5) task-incremental, reduced ResNet-18, 1 epoch,"
         " batch 10 (Chaudhry et al. 2019)")

ENTRIES = [
    Entry(f"{_C10}, class-incremental", name, "split_cifar10",
          f"strategy={s},kind=class" + extra)
    for name, s, extra in [("Naive", "naive", ""), ("Joint", "joint", ""),
                           ("Replay (500)", "replay", ",mem_size=500"),
                           ("GEM (500)", "gem", ",mem_size=500"),
                           ("A-GEM (500)", "agem", ",mem_size=500"),
                           ("iCaRL (500)", "icarl", ",mem_size=500"),
                           ("LwF", "lwf", "")]
] + [
    Entry(f"{_C10}, task-incremental", name, "split_cifar10",
          f"strategy={s},kind=task" + extra)
    for name, s, extra in [("Naive", "naive", ""),
                           ("Replay (500)", "replay", ",mem_size=500"),
                           ("Online EWC", "online_ewc", ""), ("SI", "si", ""),
                           ("LwF", "lwf", "")]
] + [
    Entry(_C100, name, "split_cifar100", f"strategy={s}" + extra)
    for name, s, extra in [("Naive", "naive", ""),
                           ("A-GEM (13 per task)", "agem", ",mem_size=260"),
                           ("GEM (13 per task)", "gem", ",mem_size=260"),
                           ("Replay (13 per task)", "replay", ",mem_size=260"),
                           ("EWC", "ewc", "")]
] + [
    Entry(_IC, name, "split_cifar100_icarl", f"strategy={s}")
    for name, s in [("Finetuning", "naive"), ("LwF.MC", "lwf_mc"),
                    ("iCaRL (2000)", "icarl"), ("Joint", "joint")]
] + [
    # Their Table 1's figure: the mean over the steps of the accuracy on
    # every test example of the classes seen (the first experience's 50
    # classes weigh five times a later one's 10).
    Entry(_LU, name, "split_cifar100_lucir", arg, metric="inc_acc_pooled")
    for name, arg in [("LUCIR (20 per class), 50 then 5 x 10", "increment=10"),
                      ("LUCIR (20 per class), 50 then 10 x 5", "increment=5"),
                      ("LUCIR, NME (20 per class), 50 then 5 x 10",
                       "increment=10,classifier=nme"),
                      ("LUCIR, NME (20 per class), 50 then 10 x 5",
                       "increment=5,classifier=nme")]
]
