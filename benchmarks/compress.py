"""CNN compression, the lecture's table: training time per epoch, inference time, model size and accuracy of each
compression method against the uncompressed model trained in the same run.

Trains the baseline cnn (all training images but the seeded 10 % validation hold-out), compresses it with every
method through `ocula.compress` (fine-tuning on the same images), and scores each file once on the test split.
The distilled student is compared with the same student trained alone (alpha = 0: cross-entropy only) for the
same epochs. Inference is per image over a batch of 64 test images, in torch and ONNX Runtime at a fixed thread count,
the best of 3 rounds that visit every model in turn.

    python benchmarks/compress.py --dataset mnist --widths 32 64 128 --epochs 3 --finetune 1
    python benchmarks/compress.py --dataset cifar10 --widths 32 64 128 --epochs 10 --finetune 8
"""

from __future__ import annotations

import argparse
import csv
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, per_item_us, record  # noqa: E402

import ocula  # noqa: E402
from ocula.compression import AMOUNT, METHODS, QUANTIZED  # noqa: E402
from ocula.data import registry  # noqa: E402
from ocula.export.onnx import onnx_session  # noqa: E402
from ocula.tasks import classify  # noqa: E402

WIDTHS = {"mnist": [32, 64, 128], "cifar10": [32, 64, 128], "digits": [16, 32]}  # digits: a quick check
# Targets from the issue, against the uncompressed model of the same run.
TARGETS = {"int8": "ORT >= 2x faster, >= 3.5x smaller, <= 0.5 point loss",
           "qat": "as int8",
           "structured": "half the FLOPs, >= 1.5x faster, <= 1 point loss",
           "distill": ">= 1 point above the student trained alone",
           "tucker": ">= 2x faster on the factorised layers, <= 1 point loss",
           "cp": ">= 2x faster on the factorised layers, <= 1 point loss",
           "bwn": "within 1 point (MNIST) / 5 points (CIFAR-10), >= 20x smaller"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dataset", default="mnist", choices=list(WIDTHS))
    ap.add_argument("--data-dir")
    ap.add_argument("--widths", type=int, nargs="+", help="the baseline cnn's stage widths (default: per dataset, "
                    f"{WIDTHS})")
    ap.add_argument("--epochs", type=int, default=3, help="baseline and student training epochs")
    ap.add_argument("--finetune", type=int, default=1, help="fine-tuning epochs after pruning, factorising, "
                    "binarizing")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--amount", nargs="+", default=[], metavar="METHOD=AMOUNT",
                    help="a method's amount instead of its default (ocula.compression.AMOUNT), e.g. structured=0.55")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=4e-3)
    ap.add_argument("--finetune-lr", type=float, default=1e-3)
    ap.add_argument("--teacher", help="distill from this architecture trained in the run with its own recipe "
                    "(e.g. airbench; default: the baseline cnn)")
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="training threads")
    args = ap.parse_args()
    args.widths = args.widths or WIDTHS[args.dataset]
    args.amount = {m: float(a) for m, a in (item.split("=") for item in args.amount)}

    # Every compression reloads the training split; decode it once (CIFAR-10 is 50k JPEGs).
    registry.load = functools.lru_cache(maxsize=4)(registry.load)
    test = registry.load(args.dataset, "test", args.data_dir)
    x = classify.to_tensor(test.images[:64])
    fast = dict(bf16=True, channels_last=True, threads=args.threads, seed=args.seed, batch_size=args.batch_size)
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="ocula-compress-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        base = ocula.train(args.dataset, "cnn", runs_dir=tmp, data_dir=args.data_dir, progress=False,
                           widths=args.widths, epochs=args.epochs, lr=args.lr, **fast)
        with open(base.run_dir / "metrics.csv", newline="") as f:
            base_epoch = sum(float(r["train_seconds"]) for r in csv.DictReader(f)) / args.epochs
        notes.append(f"baseline: cnn widths {args.widths}, {args.epochs} epochs (AdamW one-cycle lr "
                     f"{args.lr}, batch {args.batch_size}, bf16 autocast, channels-last, {args.threads} training "
                     f"threads), {time.perf_counter() - start:.0f} s; the checkpoint with the best validation loss")
        base_path = teacher = base.path
        results = {"baseline": score(base_path, test, tmp, base_epoch)}
        if args.teacher and "distill" in args.methods:
            start = time.perf_counter()
            trained = ocula.train(args.dataset, args.teacher, runs_dir=tmp, name="teacher", data_dir=args.data_dir,
                                  progress=False, epochs=args.teacher_epochs, seed=args.seed, threads=args.threads)
            teacher = trained.path
            notes.append(f"teacher: {args.teacher}, {args.teacher_epochs} epochs with its own recipe, "
                         f"{time.perf_counter() - start:.0f} s, test accuracy "
                         f"{trained.summary['test_accuracy']:.4f}")
        for method in args.methods:
            for name, settings in runs(method, args):
                out = tmp / f"{name}{'.onnx' if method in QUANTIZED else '.ocula'}"
                source = teacher if method == "distill" else base_path
                model = ocula.compress(source, method, out, data_dir=args.data_dir, progress=False,
                                       lr=args.lr if method == "distill" else args.finetune_lr, **fast, **settings)
                results[name] = score(out, test, tmp, model.summary["epoch_seconds"], model.summary)
        time_inference(results, x)
        notes += [layer_speed(base_path, results[name]["path"], x, name, tmp) for name in ("tucker", "cp")
                  if name in results]
        rows = table(results, classify_flops(base_path, x))
    notes += verdicts(results, args.dataset)
    body = markdown_table(["method", "train s/epoch", "torch ms/img 1 thr", "ORT ms/img 1 thr", "ORT ms/img 2 thr",
                           "file MB", "x smaller", "weights MB", "x smaller", "MFLOPs/img", "test accuracy",
                           "points vs baseline", "load avg"], rows)
    body += "\n\n" + "\n".join(f"- {n}" for n in notes)
    subset = "" if args.methods == list(METHODS) and not args.amount else f", {' '.join(args.methods)}"
    subset += f", teacher {args.teacher}" if args.teacher else ""
    record(f"Compression: {args.dataset} cnn{subset} (benchmarks/compress.py)", body)


def runs(method: str, args) -> list[tuple[str, dict]]:
    """The compressions to make for `method`: distillation also trains the student alone for comparison."""
    amount = {"amount": args.amount[method]} if method in args.amount else {}
    if method == "distill":  # the student: the baseline's widths scaled by amount, whichever the teacher
        share = args.amount.get("distill", AMOUNT["distill"])
        student = dict(epochs=args.epochs, widths=[max(1, round(w * share)) for w in args.widths])
        return [("distill", student), ("student-alone", dict(student, alpha=0.0))]
    if method == "int8":
        return [("int8", {})]
    return [(method, dict(epochs=args.finetune, **amount))]


def score(path: Path, test, tmp: Path, epoch_seconds, summary: dict | None = None) -> dict:
    """Test accuracy (once), file and weight sizes, and the ONNX file to time (an export of a .ocula file)."""
    model = ocula.load(path, device="cpu")
    accuracy = model.evaluate(test.name, split="test")["accuracy"]
    onnx = path if path.suffix == ".onnx" else Path(model.export("onnx", tmp / f"{path.stem}.onnx").split(" ")[0])
    widths = [m.out_channels for m in model.module.modules() if isinstance(m, torch.nn.Conv2d)]
    return {"path": path, "onnx": onnx, "accuracy": accuracy, "bytes": path.stat().st_size, "widths": widths,
            "tensor_bytes": tensor_bytes(path), "epoch_seconds": epoch_seconds,
            "flops": summary["flops"] if summary else None, "summary": summary}


def time_inference(results: dict, x: torch.Tensor, rounds: int = 3) -> None:
    """Per-image ms over the batch in torch (1 thread) and ONNX Runtime (1 and 2 threads), the best of `rounds`
    rounds that visit every model in turn, so load from other jobs falls on all of them alike."""
    runners = {}
    for name, r in results.items():
        sessions = {t: onnx_session(r["onnx"], t) for t in (1, 2)}
        runners[name] = {f"ort{t}": (lambda s=s: s.run(None, {"image": x.numpy()})) for t, s in sessions.items()}
        if r["path"].suffix != ".onnx":
            module = ocula.load(r["path"], device="cpu").module
            runners[name]["torch"] = lambda m=module: m(x)
    best, loads = {}, []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        for _ in range(rounds):
            loads.append(os.getloadavg()[0])
            for name, fns in runners.items():
                for key, fn in fns.items():
                    ms = per_item_us(fn, len(x), repeat=3) / 1000
                    best[name, key] = min(ms, best.get((name, key), ms))
    torch.set_num_threads(threads)
    for name, r in results.items():
        r.update(torch_ms=best.get((name, "torch")), ort_ms={t: best[name, f"ort{t}"] for t in (1, 2)},
                 load=max(loads))


def tensor_bytes(path: Path) -> int:
    """The stored weights alone, without the file's container (safetensors header and metadata, ONNX graph)."""
    if path.suffix == ".onnx":
        import onnx
        from onnx import numpy_helper

        return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(str(path)).graph.initializer)
    from ocula.modelfile import read_model_file

    return sum(t.numel() * t.element_size() for t in read_model_file(path)[1].values())


def classify_flops(path: Path, x: torch.Tensor) -> int:
    from ocula.compression import flops

    return flops(ocula.load(path, device="cpu").module, x[:1])


def table(results: dict, base_flops: int) -> list[list]:
    base = results["baseline"]
    rows = []
    for name, r in results.items():
        flops = r["flops"] if r["flops"] is not None else base_flops
        rows.append([name, _num(r["epoch_seconds"], 1), _num(r["torch_ms"], 3), _num(r["ort_ms"][1], 3),
                     _num(r["ort_ms"][2], 3), f"{r['bytes'] / 1e6:.4f}", f"{base['bytes'] / r['bytes']:.1f}",
                     f"{r['tensor_bytes'] / 1e6:.4f}", f"{base['tensor_bytes'] / r['tensor_bytes']:.1f}",
                     f"{flops / 1e6:.2f}", f"{r['accuracy']:.4f}",
                     f"{100 * (r['accuracy'] - base['accuracy']):+.2f}", f"{r['load']:.1f}"])
    return rows


def _num(v, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def layer_speed(base_path: Path, path: Path, x: torch.Tensor, name: str, tmp: Path) -> str:
    """Time (batch 64, 1 thread, torch and ONNX Runtime) of the factorised layers against the layers they
    replaced, each on the input it sees in the network."""
    base, factorised = ocula.load(base_path, device="cpu").module, ocula.load(path, device="cpu").module
    names = list(factorised.info.args["layers"])
    inputs = {}
    hooks = [base.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: inputs.setdefault(n, a[0]))
             for n in names]
    with torch.no_grad():
        base(x)
    for h in hooks:
        h.remove()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    ms = {}
    with torch.no_grad():
        for model, label in ((base, "before"), (factorised, "after")):
            ms["torch", label] = sum(per_item_us(lambda: model.get_submodule(n)(inputs[n]), 1) for n in names)
            ort = 0.0
            for n in names:
                file = tmp / f"{label}-{n}.onnx"
                torch.onnx.export(model.get_submodule(n), (inputs[n],), str(file), input_names=["x"], dynamo=False)
                session, feed = onnx_session(file, 1), {"x": inputs[n].numpy()}
                ort += per_item_us(lambda: session.run(None, feed), 1)
            ms["ORT", label] = ort
    torch.set_num_threads(threads)
    return f"{name}: the {len(names)} factorised layers take " + "; ".join(
        f"{ms[rt, 'after'] / 1000:.2f} ms per batch of {len(x)} in {rt} against {ms[rt, 'before'] / 1000:.2f} ms "
        f"for the layers they replace ({ms[rt, 'before'] / ms[rt, 'after']:.2f}x faster)" for rt in ("torch", "ORT"))


def verdicts(results: dict, dataset: str) -> list[str]:
    """Each target against what this run measured."""
    base = results["baseline"]

    def points(name):
        return 100 * (results[name]["accuracy"] - base["accuracy"])

    def speedup(name, threads=1):
        return base["ort_ms"][threads] / results[name]["ort_ms"][threads]

    def smaller(name):
        r = results[name]
        return (f"{base['bytes'] / r['bytes']:.1f}x (file) / {base['tensor_bytes'] / r['tensor_bytes']:.1f}x "
                "(weights)")

    out = []
    for name in QUANTIZED:
        if name in results:
            out.append(f"{name} ({TARGETS[name]}): {speedup(name):.2f}x / {speedup(name, 2):.2f}x faster in ORT at "
                       f"1 / 2 threads, {smaller(name)} smaller, {points(name):+.2f} points")
    if "structured" in results:
        s = results["structured"]["summary"]
        torch_speedup = base["torch_ms"] / results["structured"]["torch_ms"]
        out.append(f"structured ({TARGETS['structured']}): conv widths {results['structured']['widths']}, "
                   f"{s['flops'] / s['source_flops']:.2f} of the FLOPs, "
                   f"{speedup('structured'):.2f}x faster in ORT (1 thread), {torch_speedup:.2f}x in torch, "
                   f"{points('structured'):+.2f} points")
    if "distill" in results and "student-alone" in results:
        gain = 100 * (results["distill"]["accuracy"] - results["student-alone"]["accuracy"])
        out.append(f"distill ({TARGETS['distill']}): the student with the teacher's soft targets scores "
                   f"{gain:+.2f} points against the same student trained alone")
    for name in ("tucker", "cp"):
        if name in results:
            out.append(f"{name} ({TARGETS[name]}): {points(name):+.2f} points; layer times above")
    if "bwn" in results:
        out.append(f"bwn ({TARGETS['bwn']}): {points('bwn'):+.2f} points on {dataset}, {smaller('bwn')} smaller "
                   "packed")
    return out


if __name__ == "__main__":
    main()
