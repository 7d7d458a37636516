"""Reproduce the bundled digit model: ocula's MNIST CNN recipe, small enough to ship (72,666 parameters, ~0.3 MB).

    python -m ocula.weights.make_digit_model [--data-dir ../shared/datasets]

Trains on MNIST's training split with 10% held out (the checkpoint with the lowest validation loss is kept),
scores the test split once, writes digits-mnist.ocula and its ONNX export beside this file, and prints both
files' sha256. The recipe (widths, epochs) was chosen on that validation split and on rendered photos of MNIST
test digits (examples/digit_photo_check.py), never on the package's sample photos.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile

import ocula
from ocula.modelfile import save_model
from ocula.weights import DIGIT_MODEL

RECIPE = dict(widths=[16, 32, 64], epochs=7, batch_size=256, lr=4e-3, seed=0, bf16=True, channels_last=True)


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as runs:
        model = ocula.train("mnist", "cnn", runs_dir=runs, data_dir=args.data_dir, threads=args.threads,
                            progress=False, **RECIPE)
    model.info.metrics.pop("train_seconds")  # the wall time differs from run to run; the checksum must not
    save_model(DIGIT_MODEL, model.module, model.info)
    summary = model.summary
    print(f"MNIST test accuracy {summary['test_accuracy']:.4f}, trained in {summary['train_seconds']:.0f} s")
    print(ocula.load(DIGIT_MODEL, device="cpu").export("onnx"))
    for path in (DIGIT_MODEL, DIGIT_MODEL.with_suffix(".onnx")):
        print(f"sha256 {sha256(path)}  {path.name}")


if __name__ == "__main__":
    main()
