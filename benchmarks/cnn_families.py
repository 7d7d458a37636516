"""CIFAR-10 with each CNN family of the lecture: parameters, MFLOPs per image, training time per epoch and in all,
test accuracy, and inference milliseconds per image in torch and ONNX Runtime at batch 1 and 64, on this CPU.

A full epoch of a CIFAR ResNet-18 takes minutes on 2 cores, so every family trains for the same small wall-clock
budget (--minutes each, warm-up then cosine learning rate over the budget, bf16 autocast, channels-last), from
scratch on all 50,000 training images with flips and shifts, with one setting for all (AdamW, no tuning and no
selection: the model at the end of the budget is scored once on the test images). The table therefore compares
what each family learns in equal time on this machine, not the accuracy it converges to. Each family uses its
32x32 stem (`small_input`), so the FLOPs are those of a 32x32 image.

    flock /tmp/ocula-cpu.lock python benchmarks/cnn_families.py --minutes 1
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, per_item_us, record  # noqa: E402

from ocula.data import registry  # noqa: E402
from ocula.export.onnx import export_onnx, onnx_session  # noqa: E402
from ocula.models.inspect import inspect_model  # noqa: E402
from ocula.tasks import classify  # noqa: E402

FAMILIES = ["alexnet", "vgg16_bn", "googlenet", "resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2",
            "mobilenet_v3_small"]


def stratified(data, per_class: int):
    """The first `per_class` images of every class (the same images in every run)."""
    keep = np.concatenate([np.flatnonzero(data.labels == c)[:per_class] for c in range(len(data.classes))])
    return data.subset(keep)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--families", nargs="+", default=FAMILIES)
    ap.add_argument("--minutes", type=float, default=1.0, help="training budget per family")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--test-per-class", type=int, default=200, help="test images per class scored (1000 = all)")
    ap.add_argument("--train-per-class", type=int, default=5000, help="fewer for a quick trial")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    train = stratified(registry.load("cifar10", "train", args.data_dir), args.train_per_class)
    test = stratified(registry.load("cifar10", "test", args.data_dir), args.test_per_class)
    x_test, y_test = classify.to_tensor(test.images), torch.from_numpy(test.labels)
    rows = []
    for name in args.families:
        config = classify.default_config(name, epochs=100, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                         threads=args.threads, monitor="loss", mode="min")
        start = time.perf_counter()
        model, info, history = classify.train_cnn(train, config, progress=False, arch="backbone-classifier",
                                               arch_args=classify.backbone_args(train, name), minutes=args.minutes)
        train_seconds = time.perf_counter() - start
        load = os.getloadavg()[1]  # 5-minute load: above ~2 means other jobs shared the two cores
        seen = sum(h["images_per_second"] * h["train_seconds"] for h in history)
        epoch_minutes = len(train) / history[-1]["images_per_second"] / 60  # the steady rate of the last epoch
        model = model.to(memory_format=torch.contiguous_format).eval()  # as saved and served: float32, NCHW
        model.info = info  # the export reads the input size from it
        with torch.no_grad():
            accuracy = (classify.batched_forward(model, x_test, 250).argmax(1) == y_test).float().mean().item()
            found = inspect_model(model, (32, 32), 3)
            x1, x64 = x_test[:1], x_test[:64]
            torch_ms = [per_item_us(lambda: model(x1), 1, repeat=20) / 1e3,
                        per_item_us(lambda: model(x64), 64, repeat=3) / 1e3]
        with tempfile.TemporaryDirectory() as tmp:
            session = onnx_session(export_onnx(model, Path(tmp) / f"{name}.onnx"))
            ort_ms = [per_item_us(lambda: session.run(None, {"image": x1.numpy()}), 1, repeat=20) / 1e3,
                      per_item_us(lambda: session.run(None, {"image": x64.numpy()}), 64, repeat=3) / 1e3]
        rows.append([name, f"{found.params / 1e6:.2f}", f"{found.flops / 1e6:.0f}", f"{epoch_minutes:.1f}",
                     f"{train_seconds / 60:.1f} ({seen / len(train):.2f} epochs)", f"{accuracy:.4f}",
                     f"{torch_ms[0]:.2f} / {torch_ms[1]:.2f}", f"{ort_ms[0]:.2f} / {ort_ms[1]:.2f}", f"{load:.1f}"])
        print(" | ".join(rows[-1]), flush=True)
    body = markdown_table(["family (32x32 stem)", "params (M)", "MFLOPs / image", "train min / epoch",
                           "train min in all", "test accuracy", "torch ms/img (batch 1 / 64)",
                           "ORT ms/img (batch 1 / 64)", "load avg"], rows)
    body += (f"\n\nEach family trained for a budget of {args.minutes:g} min of wall clock on {len(train):,} CIFAR-10 "
             f"training images (JPEG copy), batch {args.batch_size}, AdamW lr {args.lr} with warm-up and cosine "
             "over the budget, flips and shifts, bf16 autocast, channels-last, "
             f"{args.threads} threads; test accuracy on {len(test):,} test images ({args.test_per_class} per "
             "class), scored once with the float32 model. 'train min / epoch' is 50,000 images at the rate of "
             "the run's last epoch (a budget shorter than an epoch stops mid-epoch). MFLOPs are FlopCounterMode "
             "counts (2 per multiply-add) for one 32x32 image. Inference: best of several runs, float32, "
             f"{args.threads} threads. A load average above 2 means other jobs shared the two cores.")
    subset = "" if args.families == FAMILIES else f" ({', '.join(args.families)})"  # a rerun keeps the full table
    record(f"CIFAR-10: CNN families{subset}", body)


if __name__ == "__main__":
    main()
