"""BCCD detection: ocula's detectors on the test split (72 images) next to the YOLO11n and torchvision references.

`--section test`: per detector, test mAP@.5, mAP@[.5:.95], AP@.5 per class (pycocotools), training wall time and
settings (from the run folder), the ONNX export (written beside the model file) checked against torch on test
images, and milliseconds per 640x480 image (letterbox resize + network + NMS, batch 1) in torch and ONNX Runtime
at 1 and 2 threads. `--section recall`: Faster R-CNN's proposal recall on the test boxes. `--section trials`:
Faster R-CNN recipes compared in short trials on val. Either train here (`--train fcos --minutes 40`) or pass
model files trained with `ocula train bccd --model ...` (their run folder's config.json and summary.json give the
settings). The test split is scored once per trained model; nothing is selected on it.

    python benchmarks/detect.py --model runs/detect/bccd-fcos/model.ocula \
        --model runs/detect/bccd-faster-rcnn/model.ocula
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import markdown_table, record  # noqa: E402

import ocula  # noqa: E402
from ocula.compression import CompressConfig  # noqa: E402
from ocula.data import registry  # noqa: E402
from ocula.errors import OculaError  # noqa: E402
from ocula.tasks import detect  # noqa: E402

REFERENCES = [
    ["Ultralytics YOLO11n, from scratch, 40 min on 2 cores (quoted from issue 4, not run here)", "0.884", "0.566",
     "0.981", "0.793", "0.879", "40", "", "17 (ORT)", ""],
    ["torchvision Faster R-CNN MobileNetV3-FPN, from scratch, 40 min on 2 cores (quoted from issue 15, not run "
     "here)", "0.824", "0.498", "", "", "", "40", "148 (eager)", "", ""],
]


def median_ms(fn, images, repeat: int = 3) -> float:
    """Median over images of the best-of-`repeat` time of fn(image), in ms (after a warm-up)."""
    fn(images[0])
    times = []
    for im in images:
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            fn(im)
            best = min(best, time.perf_counter() - start)
        times.append(best * 1e3)
    return statistics.median(times)


def counting_threshold(model) -> float:
    """The score above which Model.predict keeps (draws and counts) detections, tuned by F1 on val in training."""
    return model.info.preprocess.get("score_thresh", detect.SCORE_THRESH)


def onnx_parity(model, ort_model, images) -> float:
    """Largest box difference (px) between the detections Model.predict gives in torch and in ONNX Runtime on
    `images`, above the counting threshold; raises unless both find the same objects. (Model.export checks one
    random input, where little is found.)"""
    worst, thresh = 0.0, counting_threshold(model)
    for a, b in zip(model.predict(images), ort_model.predict(images)):
        gap = detect.detection_gap(vars(a), vars(b), min_score=thresh)
        if gap is None:
            raise OculaError(f"ONNX Runtime detections differ from torch on a test image ({model.info.arch})")
        worst = max(worst, gap)
    return worst


def timings(model, path: Path, images) -> dict[str, str]:
    """Exports the model beside its file (where `ocula serve` picks it up), checks it on `images` and times
    Model.predict per image in torch and in ONNX Runtime at 1 and 2 threads."""
    from ocula.api import Model
    from ocula.export.onnx import OnnxModule

    onnx = path.with_suffix(".onnx")
    model.export("onnx", onnx)
    out = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        ort_model = Model(OnnxModule(onnx, model.info, threads=threads))
        if threads == 2:
            out["parity"] = (f"{model.info.arch}: ONNX Runtime and torch give the same detections on {len(images)} "
                             f"test images, boxes within {onnx_parity(model, ort_model, images):.1e} px")
        out[f"torch{threads}"] = f"{median_ms(lambda im: model.predict(im), images):.1f}"
        out[f"ort{threads}"] = f"{median_ms(lambda im: ort_model.predict(im), images):.1f}"
    return out


def error_breakdown(model, data) -> list[list]:
    """Per class at the model's counting threshold: hits, misses, and false alarms split by what they overlap
    (a same-class box at IoU 0.1-0.5: a duplicate or misplaced box; nothing: an unlabelled cell or background)."""
    from ocula.data.boxes import box_iou_np

    images, targets = zip(*(data[i] for i in range(len(data))))
    results = model.predict(list(images))
    rows = []
    for k, name in enumerate(data.classes):
        hit = miss = near = alone = 0
        for t, d in zip(targets, results):
            gt = t["boxes"][t["labels"] == k]
            sel = d.labels == k
            iou = box_iou_np(d.boxes[sel][np.argsort(-d.scores[sel])], gt)
            matched = detect.greedy_match(iou) >= 0
            near_box = iou[~matched].max(1) >= 0.1 if len(gt) else np.zeros((~matched).sum(), bool)
            hit, miss = hit + int(matched.sum()), miss + len(gt) - int(matched.sum())
            near, alone = near + int(near_box.sum()), alone + int((~near_box).sum())
        rows.append([name, hit, miss, near, alone])
    return rows


def settings_of(model_path: Path, model) -> tuple[str, str]:
    """(train minutes, settings) from the model file's metrics and its run folder's config.json and summary.json
    (written by ocula.train and `ocula train`)."""
    m = model.info.metrics
    minutes = f"{m['train_seconds'] / 60:.1f}" if "train_seconds" in m else "?"
    run = model_path.parent
    if not (run / "summary.json").is_file():
        return minutes, model.info.arch
    c, summary = (json.loads((run / name).read_text()) for name in ("config.json", "summary.json"))
    t, o = c["train"], c["options"]
    steps = o["steps_per_epoch"] or detect.PRESETS[c["model"]]["steps_per_epoch"]
    budget = f"a {o['minutes']:g}-minute wall-clock budget" if o["minutes"] else f"{t['epochs'] * steps} steps"
    h, w = model.info.preprocess["input_size"]  # BCCD smears are 640x480
    args = {k: v for k, v in model.info.args.items() if k != "num_classes"}
    params = sum(p.numel() for p in model.module.parameters())
    text = (f"{model.info.arch} {args} ({params / 1e6:.2f} M params); input {h}x{w} ({h / 480:g}x), random scale "
            f"0.6-1.0 crops, flips, colour jitter; batch {t['batch_size']}, AdamW lr {t['lr']} wd {t['weight_decay']}, "
            f"warm-up + cosine over {budget}, EMA weights, best val mAP@.5 of {summary['epochs']} epochs x {steps} "
            f"steps; {'bf16 autocast, ' if t['bf16'] else ''}{'channels-last, ' if t['channels_last'] else ''}"
            f"{t['threads'] or 'default'} thread(s)")
    return minutes, text


# Faster R-CNN recipes compared on val in short equal-time trials (the test split is never read): the preset, and
# the ResNet-18 + FPN / GroupNorm / float32 recipe it replaced.
TRIALS = {
    "csp-pan (preset)": (detect.PRESETS["faster-rcnn"]["args"], detect.PRESETS["faster-rcnn"]["train"], None),
    "resnet18-fpn-gn (before)": (dict(backbone="resnet18", norm_layer="group", fpn_width=128,
                                      **detect.RCNN_PROPOSALS),
                                 dict(batch_size=4, lr=1e-3, weight_decay=0.05, bf16=False, channels_last=False), 50),
}


def run_trial(name: str, minutes: float, run_dir: str) -> list:
    """Train recipe `name` for `minutes` on one thread; its best epoch's val figures and its settings."""
    args, train, steps = TRIALS[name]
    train_set, val_set = (registry.load("bccd", split) for split in ("train", "val"))
    config = detect.default_config("faster-rcnn", **train, threads=1)
    steps = steps or detect.PRESETS["faster-rcnn"]["steps_per_epoch"]
    _, history = detect.fit("faster-rcnn", train_set, val_set, config, run_dir=Path(run_dir), minutes=minutes,
                            steps_per_epoch=steps, progress=False, arch_args=args, dataset="bccd",
                            **detect.DATASETS["bccd"])
    best = max(history, key=lambda h: h["val_map50"])
    seen = sum(h["images_per_second"] * h["train_seconds"] for h in history)  # the budget may cut the last epoch
    return [name, f"{best['val_map50']:.3f}", f"{best['val_map']:.3f}", f"{best['epoch']} of {len(history)}",
            f"{round(seen / config.batch_size)} x {config.batch_size}",
            f"{statistics.median(h['images_per_second'] for h in history):.1f}", f"{args} {train}"]


def trials(minutes: float, runs_dir: str) -> None:
    """Every TRIALS recipe at once, one process and one thread each (the machine's 2 cores)."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    with ProcessPoolExecutor(len(TRIALS), mp_context=get_context("spawn")) as pool:
        jobs = [pool.submit(run_trial, name, minutes, f"{runs_dir}/detect/trial-{i}") for i, name in enumerate(TRIALS)]
        rows = [job.result() for job in jobs]
    header = ["Faster R-CNN recipe", "val mAP@.5", "val mAP@[.5:.95]", "best epoch", "batches x batch size",
              "train images/s", "settings"]
    record("BCCD Faster R-CNN recipe trials (val)",
           markdown_table(header, rows) + f"\n\n{minutes:g}-minute wall-clock budgets run side by side, one thread "
           "each; BCCD val split (the test split is not read); best EMA epoch by val mAP@.5.")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", action="append", default=[], help="trained detector file (repeatable)")
    ap.add_argument("--train", action="append", default=[], choices=detect.MODELS, help="train this detector")
    ap.add_argument("--minutes", type=float, default=40.0, help="training budget for --train")
    ap.add_argument("--threads", type=int, default=2, help="training threads for --train")
    ap.add_argument("--runs-dir", default="runs", help="--train writes RUNS_DIR/detect/bench-MODEL")
    ap.add_argument("--int8", action="store_true", help="test: also quantize each fcos to int8 (`ocula compress`, "
                    "calibrated on the training images) and score the ONNX file the same way")
    ap.add_argument("--section", action="append", choices=("trials", "test", "recall"),
                    help="run only this part (repeatable; default test and recall). trials: Faster R-CNN recipes "
                    "on val; test: accuracy, exports and speed on the test split; recall: Faster R-CNN's proposals")
    args = ap.parse_args()
    sections = args.section or ["test", "recall"]
    if "trials" in sections:
        trials(args.minutes, args.runs_dir)
        if sections == ["trials"]:
            return
    paths = [Path(p) for p in args.model]
    for name in args.train:
        trained = ocula.train("bccd", name, runs_dir=args.runs_dir, name=f"bench-{name}", overwrite=True,
                              progress=False, minutes=args.minutes, threads=args.threads)
        paths.append(trained.path)
    if not paths:
        raise OculaError("nothing to benchmark: pass --model FILE or --train fcos|faster-rcnn")
    test = registry.load("bccd", "test")
    if "recall" in sections:
        proposals([p for p in paths if ocula.load(p).info.arch == "faster-rcnn"], test)
    if "test" in sections:
        accuracy_and_speed(paths, test, args.int8)


def proposals(paths: list[Path], test) -> None:
    """The RPN's recall of the test boxes by its best 300 / 1000 proposals at IoU 0.5 / 0.7."""
    from ocula.tasks.detect_rpn import proposal_recall

    images, targets = zip(*(test[i] for i in range(len(test))))
    rows = []
    for path in paths:
        recall = proposal_recall(ocula.load(path, device="cpu").module, images, targets)
        rows.append([f"ocula faster-rcnn ({path})", *(f"{v:.3f}" for v in recall.values())])
    record("BCCD Faster R-CNN proposal recall",
           markdown_table(["detector", *(k.replace("recall@", "recall, top ") for k in recall)], rows)
           + f"\n\nBCCD test split, {len(images)} images, {sum(len(t['labels']) for t in targets)} boxes: the share "
           "of boxes that one of the RPN's best N proposals (after its NMS at 0.7) overlaps at IoU >= t, at the "
           "model's input size.")


def int8_timings(path: Path, info, images) -> dict[str, str]:
    """Model.predict per image on an int8 ONNX file at 1 and 2 ONNX Runtime threads (no torch columns)."""
    from ocula.api import Model
    from ocula.export.onnx import OnnxModule

    out = {"torch1": "-", "torch2": "-"}
    for threads in (1, 2):
        model = Model(OnnxModule(path, info, threads=threads))
        out[f"ort{threads}"] = f"{median_ms(lambda im: model.predict(im), images):.1f}"
    return out


def accuracy_and_speed(paths: list[Path], test, int8: bool = False) -> None:
    images = [test[i][0] for i in range(10)]
    calibration = min(CompressConfig.calibration, len(registry.load("bccd", "train")))
    rows, errors, parity = [], [], []
    for path in paths:
        model = ocula.load(path)
        torch.set_num_threads(2)
        minutes, settings = settings_of(path, model)
        t = timings(model, path, images)
        parity.append(t["parity"])
        variants = [(model, path.name, t, settings)]
        if int8 and detect.is_fcos(model.module):
            quantized = ocula.compress(path, "int8", path.with_name(f"{path.stem}-int8.onnx"), progress=False)
            variants.append((quantized, f"int8 of {path.name}", int8_timings(quantized.path, quantized.info, images),
                             "int8 post-training static quantization (`ocula compress --method int8`: ONNX Runtime "
                             f"QDQ, per-channel weights, activations calibrated on {calibration} training images; "
                             "decoding in float)"))
        for m, label, t, how in variants:
            r = m.evaluate("bccd", split="test")
            rows.append([f"ocula {model.info.arch} ({label}, {path.parent})", f"{r['map50']:.3f}", f"{r['map']:.3f}",
                         *(f"{r['ap50'][c]:.3f}" for c in test.classes), minutes,
                         f"{t['torch1']} / {t['torch2']}", f"{t['ort1']} / {t['ort2']}", how])
            errors += [[rows[-1][0], f"{counting_threshold(m):g}", *e] for e in error_breakdown(m, test)]
            print(rows[-1], errors[-3:], flush=True)
    header = ["detector", "test mAP@.5", "test mAP@[.5:.95]", "AP@.5 WBC", "AP@.5 RBC", "AP@.5 Platelets",
              "train min", "torch ms/img (1 / 2 threads)", "ORT ms/img (1 / 2 threads)", "settings"]
    body = markdown_table(header, REFERENCES + rows)
    body += ("\n\nBCCD test split, 72 images, pycocotools (100 detections per class and image). Inference: one "
             "640x480 test image at a time through Model.predict (letterbox resize to the model's input size, "
             "network, decoding, NMS, detections above the model's counting threshold; the ORT column runs the "
             "exported file, written beside the model file: FCOS's network with NMS after ORT, Faster R-CNN's "
             "whole detector with NMS in the graph), median over 10 images of the best of 3; the machine was shared "
             "with other jobs, so timings are rough. " + "; ".join(parity) + ".")
    body += ("\n\nWhere the errors are (test split, detections above the model's counting threshold, tuned by F1 on "
             "val; a hit is IoU >= 0.5 with an unmatched box of the same class):\n\n")
    body += markdown_table(["detector", "score >=", "class", "hits", "misses", "false alarms next to a labelled "
                            "box (IoU 0.1-0.5)", "false alarms on no labelled box"], errors)
    archs = sorted({row[0].split()[1] for row in rows})
    # A run of one detector gets its own section, so the other's last figures stay in RESULTS.md.
    record("BCCD detection" + ("" if archs == sorted(detect.MODELS) else f": {', '.join(archs)}"), body)


if __name__ == "__main__":
    main()
