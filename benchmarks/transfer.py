"""Transfer learning on white-blood-cell types (issue 11's transfer table): what a CIFAR-10 network and a CIFAR-10
conv autoencoder learnt, used as off-the-shelf features with a linear / SVM / k-NN head, against fine-tuning the
CIFAR-10 network and against training it from scratch, by seeded stratified 5-fold CV on `wbc-zheng-types`.

    ocula train cifar10 --model airbench --epochs 8 --name cifar-airbench8
    ocula train cifar10 --model conv-ae --widths 16 32 64 --epochs 3 --batch-size 128 --name cifar-conv-ae
    python benchmarks/transfer.py --classifier runs/classify/cifar-airbench8/model.ocula \\
        --autoencoder runs/represent/cifar-conv-ae/model.ocula

Every head's hyper-parameters are chosen by an inner CV of the training folds (`ocula.transfer.GRIDS`); the
fine-tuning and scratch runs share one fixed recipe, never tuned, and keep their last epoch. Each row's time is
its training (and predicting) summed over the 5 folds, on the 2 cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, record  # noqa: E402

from ocula import transfer  # noqa: E402
from ocula.data.layout import open_dataset  # noqa: E402
from ocula.modelfile import load_model  # noqa: E402
from ocula.tasks import classify  # noqa: E402

HEADS = {"linear": "logistic regression", "svm": "RBF SVM", "knn": "k-NN"}
BATCH = 32
# airbench's lr 1.5 is for batches of 1024: scaled linearly to BATCH images, the rest of its recipe unchanged
LR = classify.AIRBENCH["lr"] * BATCH / classify.AIRBENCH["batch_size"]


def describe(path: str) -> str:
    info = load_model(path).info
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in info.metrics.items() if k.startswith(("val_", "test_")))
    return f"{info.extra.get('model', info.arch)} {info.args.get('widths', '')} ({metrics})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classifier", required=True, help="an airbench model file trained on CIFAR-10")
    ap.add_argument("--autoencoder", help="a conv autoencoder file trained on CIFAR-10")
    ap.add_argument("--epochs", type=int, default=10, help="fine-tuning and scratch epochs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir")
    args = ap.parse_args()

    data = open_dataset("wbc-zheng-types", "all", args.data_dir)
    config = classify.default_config("airbench", epochs=args.epochs, batch_size=BATCH, lr=LR, threads=args.threads)
    methods = [("majority class of the training folds", transfer.majority())]
    sources = [("CIFAR-10 airbench features", args.classifier)]
    if args.autoencoder:
        sources.append(("CIFAR-10 conv AE code", args.autoencoder))
    for label, path in sources:
        methods += [(f"{label} + {name}", transfer.frozen(path, head)) for head, name in HEADS.items()]
    methods += [("airbench fine-tuned from CIFAR-10", transfer.trained("airbench", config, encoder=args.classifier)),
                ("airbench from scratch", transfer.trained("airbench", config))]
    rows = []
    for label, fit_predict in methods:
        rows.append(transfer.cross_validate(label, data, fit_predict).row())
        print(rows[-1], flush=True)
    body = markdown_table(["method", "accuracy", "balanced accuracy", "train s (5 folds)"], rows)
    counts = ", ".join(f"{c} {n}" for c, n in zip(data.classes, np.bincount(data.labels)))
    body += (f"\n\n{len(data)} cells of Zheng 2018 Dataset 1 ({counts}; the one basophil left out), 64x64 crops at "
             "one scale; mean ± std over the 5 test folds of a seeded stratified split (seed 0). Features: the "
             "penultimate layer of the network, images resized to its 32x32 input, standardised; head "
             "hyper-parameters by a 5-fold grid search inside the training folds. Fine-tuning: every layer from "
             f"CIFAR-10 and a new head; scratch: whitening from the training fold; both {args.epochs} epochs at "
             f"batch {BATCH}, lr {LR:.4f} (airbench's recipe scaled to the batch), flips and 2-pixel shifts, "
             f"test-time views, 64x64 input. Pretrained: {describe(args.classifier)}"
             + (f"; {describe(args.autoencoder)}." if args.autoencoder else "."))
    record("Transfer learning: WBC types (wbc-zheng-types, 5-fold CV)", body)


if __name__ == "__main__":
    main()
