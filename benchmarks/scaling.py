"""How well training uses the machine: images per second and FLOP/s beside the matmul peak, for one process with
2 threads and for 2 torchrun processes with 1 thread each, on MNIST, CIFAR-10 and SigTuple; and the CLI timed
side by side with benchmarks/mnist.py (they are the same code path, ocula.train).

    python benchmarks/scaling.py                      # both sections
    python benchmarks/scaling.py --sections scaling --epochs 1

Every run is `ocula train` in a subprocess (torchrun for 2 processes); the figures are read from the run's
metrics.csv, whose epochs log images/s, TFLOP/s per process and the fraction of this machine's matmul peak in the
training precision (bf16 or fp32, measured once and cached by ocula.engine.peak).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, record  # noqa: E402

OCULA = [sys.executable, "-m", "ocula"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "ocula"]
# Per workload: the dataset and the training options (the README's recipes, one or a few epochs).
WORKLOADS = {
    "MNIST cnn 16-32-64": ["mnist", "--model", "cnn", "--batch-size", "256", "--lr", "0.004", "--bf16",
                           "--channels-last"],
    # The small cnn, not resnet18: one resnet18 epoch takes 4-5 minutes here, too long to run twice per call.
    "CIFAR-10 cnn 32-64-128": ["cifar10", "--model", "cnn", "--batch-size", "128", "--bf16", "--channels-last"],
    "SigTuple unet": ["wbc-sigtuple", "--model", "unet"],
}
MNIST_CLI = ["mnist", "--model", "cnn", "--batch-size", "256", "--lr", "0.004", "--bf16", "--channels-last"]


def run(command: list[str], env: dict | None = None) -> float:
    """Wall seconds of a command that must succeed."""
    start = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{out.stderr[-2000:]}")
    return time.perf_counter() - start


def last_epoch(run_dir: Path) -> dict:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))[-1]


def scaling(args) -> None:
    rows = []
    for name, recipe in WORKLOADS.items():
        for label, launcher, threads in (("1 process x 2 threads", OCULA, 2), ("2 processes x 1 thread", TORCHRUN, 1)):
            with tempfile.TemporaryDirectory() as tmp:
                command = [*launcher, "train", *recipe, "--epochs", str(args.epochs), "--threads", str(threads),
                           "--runs-dir", tmp, "--name", "run", "--quiet"]
                if args.data_dir:
                    command += ["--data-dir", args.data_dir]
                seconds = run(command)
                task = next(Path(tmp).iterdir()).name
                e = last_epoch(Path(tmp) / task / "run")
            rows.append([name, label, f"{float(e['images_per_second']):.0f}", f"{float(e['tflops']):.3f}",
                         f"{float(e['peak_fraction']):.0%}", f"{float(e['train_seconds']):.1f}", f"{seconds:.0f}",
                         f"{os.getloadavg()[0]:.1f}"])
            print(rows[-1], flush=True)
    body = markdown_table(["workload", "launch", "images/s", "TFLOP/s per process", "of the matmul peak",
                           "last epoch s", "whole run s", "load avg"], rows)
    body += ("\n\nFLOP/s count forward and backward of the training step (torch's FlopCounterMode on the first "
             "batch) times the images per second; the peak is this machine's best large matmul in the training "
             "precision (bf16 here: every workload trains under bf16 autocast) at the process's thread count. On "
             "2 cores, 2 processes of 1 thread have no spare core to gain from: they add gradient all-reduces and "
             "each runs the whole validation.")
    record("Training throughput and scaling (benchmarks/scaling.py)", body)


def cli_vs_benchmark(args) -> None:
    """The command a user types against the benchmark script, one after the other on the same machine."""
    with tempfile.TemporaryDirectory() as tmp:
        cli = run([*OCULA, "train", *MNIST_CLI, "--epochs", str(args.mnist_epochs), "--runs-dir", tmp, "--quiet"])
        cli_summary = json.loads((Path(tmp) / "classify" / "mnist-cnn" / "summary.json").read_text())
    bench = run([sys.executable, str(Path(__file__).with_name("mnist.py")), "--epochs", str(args.mnist_epochs)])
    rows = [[f"ocula train {' '.join(MNIST_CLI)} --epochs {args.mnist_epochs}", f"{cli / 60:.2f}",
             f"{cli_summary['test_accuracy']:.4f}"],
            [f"python benchmarks/mnist.py --epochs {args.mnist_epochs}", f"{bench / 60:.2f}", "see its own table"]]
    body = markdown_table(["command", "wall minutes", "test accuracy"], rows)
    body += ("\n\nBoth run ocula.train with the same recipe (cnn 16-32-64 is MNIST's default width), so they take "
             "the same time up to machine noise; the CLI holds 10% of train out for selection, the benchmark "
             "trains on all of it.")
    record("The CLI against the benchmark script (benchmarks/scaling.py)", body)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", nargs="+", default=["scaling", "cli"], choices=["scaling", "cli"])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--mnist-epochs", type=int, default=7)
    ap.add_argument("--data-dir")
    args = ap.parse_args()
    if "scaling" in args.sections:
        scaling(args)
    if "cli" in args.sections:
        cli_vs_benchmark(args)


if __name__ == "__main__":
    main()
