"""MNIST / Fashion-MNIST: test accuracy of ocula's CNN against a training-time budget on this CPU.

Trains on all 60k training images for a fixed schedule (no peeking at test), then reports test accuracy once,
training wall time, and inference microseconds per image in torch and ONNX Runtime.

    python benchmarks/mnist.py --dataset mnist --epochs 12
    python benchmarks/mnist.py --dataset fashion-mnist --epochs 30 --widths 32 64 128
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, per_item_us, record  # noqa: E402

import ocula  # noqa: E402
from ocula.data import registry  # noqa: E402
from ocula.export.onnx import onnx_session  # noqa: E402
from ocula.tasks import classify  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    ap.add_argument("--data-dir")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--label-smoothing", type=float, default=0.0)
    ap.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    ap.add_argument("--no-channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    x = classify.to_tensor(registry.load(args.dataset, "test", args.data_dir).images[:2000])
    with tempfile.TemporaryDirectory() as tmp:
        start, cpu_start = time.perf_counter(), time.process_time()
        # val_fraction=0: every training image trains and the last epoch is the model; test is scored once.
        trained = ocula.train(args.dataset, "cnn", runs_dir=tmp, data_dir=args.data_dir, progress=False,
                              val_fraction=0, widths=args.widths, epochs=args.epochs, batch_size=args.batch_size,
                              lr=args.lr, seed=args.seed, threads=args.threads, label_smoothing=args.label_smoothing,
                              bf16=not args.fp32, channels_last=not args.no_channels_last, compile=args.compile,
                              monitor="loss", mode="min")
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        load = os.getloadavg()[1]  # 5-minute load: above ~2 means other jobs shared the two cores
        with open(trained.run_dir / "metrics.csv", newline="") as f:
            history = list(csv.DictReader(f))
        model = ocula.load(trained.path)  # the saved file, as users run it (the trained module is channels-last)
        with torch.no_grad():
            torch_us = per_item_us(lambda: model.module(x), len(x), repeat=3)
        model.export("onnx", Path(tmp) / "m.onnx")
        session = onnx_session(Path(tmp) / "m.onnx")
        ort_us = per_item_us(lambda: session.run(None, {"image": x.numpy()}), len(x), repeat=3)
    acc = trained.summary["test_accuracy"]
    params = sum(p.numel() for p in model.module.parameters())
    settings = (f"cnn widths {args.widths} ({params:,} params), {args.epochs} epochs, batch {args.batch_size}, "
                f"AdamW one-cycle lr {args.lr}, affine augmentation, "
                f"{'fp32' if args.fp32 else 'bf16 autocast'}, "
                f"{'NCHW' if args.no_channels_last else 'channels-last'}{', torch.compile' if args.compile else ''}, "
                f"{args.threads} thread(s)")
    row = [args.dataset, f"{acc:.4f}", f"{seconds / 60:.1f}", f"{cpu_seconds / 60:.1f}", f"{load:.1f}",
           f"{torch_us:.1f}", f"{ort_us:.1f}", settings]
    body = markdown_table(["dataset", "test accuracy", "train minutes (wall)", "train CPU minutes",
                           "load avg", "torch µs/img", "ORT µs/img", "settings"], [row])
    body += ("\n\nWall time is what a user waits (ocula.train end to end: loading the data, the epochs and one "
             "scoring of the test split); CPU minutes / 2 is the wall time on two otherwise idle cores. "
             "A load average above 2 means other jobs were sharing the machine during the run.")
    body += "\n\nPer-epoch log: " + ", ".join(f"{h['epoch']}: loss {float(h['loss']):.3f}" for h in history)
    record(f"{args.dataset}: CNN", body)


if __name__ == "__main__":
    main()
