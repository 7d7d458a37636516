"""Fast CIFAR-10 on this CPU: ocula's airbench recipe, its speed levers and its accuracy against training time.

    python benchmarks/cifar_fast.py levers            # images/s, TFLOP/s and share of the bf16 peak per setting
    python benchmarks/cifar_fast.py train --epochs 8  # the recipe: val (held out from train) and test accuracy
    python benchmarks/cifar_fast.py train --epochs 12 --jpeg-quality 50   # the same on a JPEG of the JPEG copy

`levers` times the training step of the real trainer (batch 1024; 2 epochs of 2 batches on random images of
CIFAR's shape; the second epoch is reported, so compilation and the FLOP count are left out). `train` runs
`ocula.train("cifar10", "airbench")` with 10% of train held out for validation, then scores val and test with and
without test-time augmentation: the test split is scored once per TTA setting for the final model, never used to
choose anything.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, record  # noqa: E402

import ocula  # noqa: E402
from ocula.data import registry  # noqa: E402
from ocula.data.classification import ImageSet  # noqa: E402
from ocula.engine.peak import matmul_peak  # noqa: E402
from ocula.tasks import classify  # noqa: E402

LEVERS = {  # name: training settings on top of the recipe's defaults
    "fp32, NCHW": dict(bf16=False, channels_last=False),
    "bf16, NCHW": dict(bf16=True, channels_last=False),
    "bf16, channels-last": dict(bf16=True, channels_last=True),
    "bf16, channels-last, compile": dict(bf16=True, channels_last=True, compile=True),
    "bf16, channels-last, 1 thread": dict(bf16=True, channels_last=True, threads=1),
}
BATCHES = 2  # per epoch: the second epoch's 2 x 1024 images are timed


def levers(args) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for name, settings in LEVERS.items():
        n = BATCHES * classify.AIRBENCH["batch_size"]
        data = ImageSet(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n),
                        [str(i) for i in range(10)], 255.0, "random")
        config = classify.default_config("airbench", epochs=2, **{"threads": args.threads, **settings})
        args_ = classify.cnn_args(data, widths=classify.AIRBENCH_WIDTHS)
        _, _, history = classify.train_cnn(data, config, progress=False, arch="airbench", arch_args=args_)
        last = history[-1]
        rows.append([name, f"{last['images_per_second']:.0f}", f"{last['tflops']:.3f}",
                     f"{last['peak_fraction']:.0%}", f"{45_000 / last['images_per_second']:.0f}"])
        print(rows[-1], flush=True)
    peak = matmul_peak(torch.device("cpu"), torch.bfloat16) / 1e12
    body = markdown_table(["setting", "images/s", "TFLOP/s", "share of peak", "s per 45k epoch"], rows)
    body += (f"\n\nairbench's network (widths {classify.AIRBENCH_WIDTHS}), the trainer's own step (SGD, lookahead, "
             f"flip + translate batches prepared in a background thread), {args.threads} threads unless said, bf16 "
             f"matmul peak {peak:.2f} TFLOP/s (engine.peak). The share of the peak is against the matmul peak of the "
             "row's precision and thread count.")
    record("CIFAR-10 fast: speed levers", body)


def reencoded(load, quality: int):
    """registry.load with every image encoded once more as a JPEG at `quality` with 4:2:0 chroma, as the copy's own
    encoding (quality 75): how much accuracy the recipe loses to one more generation of JPEG loss."""
    def jpeg(image: np.ndarray) -> np.ndarray:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality, subsampling=2)
        return np.asarray(Image.open(buffer).convert("RGB"))

    def wrapped(name, split="train", data_dir=None):
        data = load(name, split, data_dir)
        return dataclasses.replace(data, images=np.stack([jpeg(image) for image in data.images]))

    return wrapped


def train(args) -> None:
    if args.jpeg_quality:
        registry.load = reencoded(registry.load, args.jpeg_quality)
    settings = dict(epochs=args.epochs, threads=args.threads, compile=args.compile, seed=args.seed)
    if args.lr:
        settings["lr"] = args.lr
    start, cpu_start = time.perf_counter(), time.process_time()
    trained = ocula.train("cifar10", "airbench", runs_dir=args.runs_dir, name=f"airbench-{args.epochs}",
                          overwrite=True, data_dir=args.data_dir, progress=False, val_fraction=args.val_fraction,
                          **settings)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    load = os.getloadavg()[1]
    with open(trained.run_dir / "metrics.csv", newline="") as f:
        history = list(csv.DictReader(f))
    model = ocula.load(trained.path, device="cpu").module
    train_set = classify.load_data("cifar10", "train", args.data_dir)
    fit, val = classify.split_validation(train_set, args.val_fraction, args.seed)
    test = classify.load_data("cifar10", "test", args.data_dir)
    scores = {}
    for tta in (0, model.tta):
        model.tta = tta
        scores[tta] = (classify.evaluate(model, val)["accuracy"] if val else float("nan"),
                       classify.evaluate(model, test)["accuracy"])
    epoch_seconds = sum(float(h["train_seconds"]) for h in history)
    tflops = np.mean([float(h["tflops"]) for h in history])
    peak_fraction = np.mean([float(h["peak_fraction"]) for h in history])
    rows = [[args.epochs, f"{epoch_seconds / 60:.1f}", f"{seconds / 60:.1f}", f"{cpu_seconds / 60:.1f}",
             f"{tflops:.3f}", f"{peak_fraction:.0%}", "on" if tta else "off", f"{val_acc:.4f}", f"{test_acc:.4f}",
             f"{load:.1f}"] for tta, (val_acc, test_acc) in scores.items()]
    body = markdown_table(["epochs", "train minutes (epochs)", "wall minutes (ocula.train)", "CPU minutes",
                           "TFLOP/s", "share of bf16 peak", "TTA", "val accuracy", "test accuracy", "load avg"], rows)
    held_out = (f"validated on {len(val):,} held out from train (stratified, seed 0)" if val else
                "no hold-out: nothing is selected, the last epoch is scored")
    body += (f"\n\n`ocula.train('cifar10', 'airbench', epochs={args.epochs}, val_fraction={args.val_fraction})`: "
             f"trained on {len(fit):,} images, {held_out}, the JPEG copy of CIFAR-10. Train minutes: the epochs "
             "alone; wall minutes: ocula.train end to end (decoding the JPEGs, per-epoch validation, one test "
             "scoring with TTA); CPU minutes / 2 is the wall time on two idle cores. TFLOP/s: the training step's "
             "FLOPs (forward + backward, counted by torch's FlopCounterMode) per second, mean over epochs. "
             "TTA on: mirror and one-pixel shifts, 6 views.")
    body += "\n\nPer epoch (seconds, loss, val accuracy of one view): " + ", ".join(
        f"{h['epoch']}: {float(h['train_seconds']):.0f} s, {float(h['loss']):.3f}, "
        f"{float(h.get('val_accuracy') or 'nan'):.4f}"
        for h in history)
    if args.jpeg_quality:
        body += (f"\n\nEvery train and test image encoded once more as a JPEG at quality {args.jpeg_quality} "
                 "(4:2:0) before training and scoring.")
    again = f", re-encoded at JPEG quality {args.jpeg_quality}" if args.jpeg_quality else ""
    record(f"CIFAR-10 fast: airbench, {args.epochs} epochs{'' if val else ', all 50k'}{again}", body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("section", choices=["levers", "train"])
    ap.add_argument("--data-dir")
    ap.add_argument("--runs-dir", default="runs/bench", help="train: the run folder goes here (kept)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--val-fraction", type=float, default=0.1, help="train: 0 trains on all 50k images")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jpeg-quality", type=int, help="train: encode every image once more as a JPEG at this quality")
    args = ap.parse_args()
    levers(args) if args.section == "levers" else train(args)


if __name__ == "__main__":
    main()
