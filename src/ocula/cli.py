"""The shell face: parse arguments, call the library, print. Heavy imports happen inside each command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ocula.errors import OculaError

RUNS = Path("runs")


# --- data ------------------------------------------------------------------------------------------------
def cmd_data_list(args):
    from ocula.data.registry import all_datasets

    for info in all_datasets():
        print(f"{info.name:15s} {info.task:9s} {info.description}")


def cmd_data_info(args):
    from ocula.data import registry

    info = registry.get_info(args.name)
    print(f"name:        {info.name}\ntask:        {info.task}\ndescription: {info.description}")
    print(f"splits:      {', '.join(info.splits)}\nlicence:     {info.license}")
    root = registry.find_root(info, args.data_dir)
    print(f"local copy:  {root or 'bundled with scikit-learn'}")
    for name, url in info.urls.items():
        print(f"source:      {url}  md5 {info.md5.get(name, '-')}")
    for split in info.splits:
        data = registry.load(args.name, split, args.data_dir)
        print(f"{split:12s} {len(data)} items")


def cmd_data_show(args):
    from ocula.api import show_data

    print(show_data(args.name, split=args.split, n=args.n, out=args.out, data_dir=args.data_dir))


def _detection_source(args):
    """A registered detection dataset by name, or a folder with --format."""
    from ocula.data import detection, registry

    if args.format:
        return detection.load_detection(args.source, args.format, split=args.split)
    return registry.load(args.source, args.split or "trainval", args.data_dir)


def cmd_data_check(args):
    from ocula.data.detection import check

    report = check(_detection_source(args))
    print(report.text())


def cmd_data_convert(args):
    from ocula.data.detection import convert

    print(convert(args.src, args.src_format, args.dst, args.dst_format, split=args.split))


# --- train / evaluate / export / predict: thin dispatches over ocula.api ---------------------------------------
def _train_settings(args) -> dict:
    """The trainer's settings (TrainConfig) and every task's own options (ocula.tasks.<task>.OPTIONS) that were
    given on the command line; a new task option needs only its flag here, not a second list."""
    from dataclasses import fields

    from ocula.engine.trainer import TrainConfig
    from ocula.tasks import TASKS, get_task

    names = {f.name for f in fields(TrainConfig)}.union(*(get_task(t).OPTIONS for t in TASKS))
    return {k: getattr(args, k) for k in sorted(names) if getattr(args, k, None) is not None}


def _mask_policy(args) -> None:
    """--strict-masks: segmentation masks with any value that is not exactly a class value are refused."""
    from ocula.data.segmentation import MASK_POLICY

    MASK_POLICY.strict = args.strict_masks


def cmd_train(args):
    import ocula
    from ocula.engine import distributed

    _mask_policy(args)
    if not (args.dataset or args.config):
        raise OculaError("name a dataset or folder to train on, or pass --config runs/.../config.json")
    settings = _train_settings(args)
    model = ocula.train(args.dataset, args.model, config=args.config, name=args.name, runs_dir=args.runs_dir,
                        resume=args.resume, overwrite=args.overwrite, data_dir=args.data_dir,
                        progress=not args.quiet, **settings)
    if distributed.is_main():
        print(json.dumps(model.summary))


def cmd_evaluate(args):
    import ocula
    from ocula.engine import distributed

    if not distributed.is_main():  # evaluation is not sharded: under torchrun, rank 0 scores the whole split
        return 0

    _mask_policy(args)
    model = ocula.load(args.model, device=args.device)
    name = f"eval-{Path(args.data or 'own').name}-{args.split or 'default'}"
    out = Path(args.out or Path(args.model).parent / name)
    result = model.evaluate(args.data, split=args.split, data_dir=args.data_dir, out=out)
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()
                      if isinstance(v, (int, float))}))
    print(f"eval.json and figures in {out}")


def cmd_export(args):
    import ocula

    print(ocula.load(args.model, device="cpu").export(args.format, args.out))


def cmd_compress(args):
    import ocula

    settings = {k: getattr(args, k) for k in ("amount", "widths", "epochs", "lr", "batch_size", "temperature", "alpha",
                                              "calibration", "seed", "threads", "device", "bf16", "channels_last")
                if getattr(args, k) is not None}
    model = ocula.compress(args.model, args.method, args.out, data=args.data, data_dir=args.data_dir,
                           progress=not args.quiet, **settings)
    print(json.dumps({k: v for k, v in model.summary.items() if k != "settings"}))


def cmd_predict(args):
    import ocula
    from ocula.data.images import list_images
    from ocula.engine import distributed
    from ocula.engine.device import resolve_device

    model = ocula.load(args.model, device=distributed.setup(resolve_device(args.device)))
    files = []
    for item in args.inputs:
        files += list_images(item) if Path(item).is_dir() else [Path(item)]
    single = len(files) == 1
    # A job-array task takes its --shard; torchrun ranks split the files and rank 0 prints the merged result.
    index, count = args.shard or (distributed.rank(), distributed.world_size())
    files = distributed.shard(files, index, count)
    options = {k: getattr(args, k) for k in ("batch_size", "min_area", "pixel_size", "score_thresh", "mode",
                                             "cell_diameter", "opening")
               if getattr(args, k) is not None}
    out, failed = [], 0
    for f in files:  # one file at a time: a bad file is reported and the others are still predicted
        try:
            r = model.predict(f, **options)[0]
            saved = r.save(Path(args.out), f.stem) if args.out else {}
        except OculaError as e:
            if single:
                raise
            failed += 1
            out.append({"file": str(f), "error": str(e)})
            print(f"ocula: error: {e}", file=sys.stderr)
            continue
        out.append({**r.to_json(), **saved})
        if not args.json:
            print(r.describe() + ("; " + ", ".join(saved.values()) if saved else ""))
    parts = distributed.gather((out, failed)) if not args.shard else [(out, failed)]
    if not distributed.is_main() and not args.shard:
        return 0
    out, failed = [r for part, _ in parts for r in part], sum(f for _, f in parts)
    if args.json:
        print(json.dumps(out[0] if single else out, indent=2))
    return 1 if failed else 0


def cmd_inspect(args):
    from ocula.models.detection.receptive_field import feature_cell_box
    from ocula.models.inspect import inspect_model

    if args.model == "rpn":
        return _inspect_rpn(args)
    if args.inputs:
        raise OculaError(f"inspect takes one model, got also {' '.join(args.inputs)} (did you mean inspect rpn?)")
    model, size, channels = _model_to_inspect(args)
    found = inspect_model(model, size, channels)
    print(f"{'layer':34s} {'type':>17s} {'output':>16s} {'params':>11s} {'MFLOPs':>9s} {'RF':>7s} {'jump':>5s}")
    for r in found.rows:
        rf = (_fmt(r.rf.r), _fmt(r.rf.j)) if r.rf else ("", "")
        print(f"{r.name[-34:]:34s} {r.kind[:17]:>17s} {'x'.join(map(str, r.shape)):>16s} {r.params:>11,} "
              f"{r.flops / 1e6:>9.2f} {rf[0]:>7s} {rf[1]:>5s}")
    print(f"total: {found.params:,} parameters, {found.flops / 1e6:,.1f} MFLOPs ({found.flops / 2e6:,.1f} M "
          f"multiply-adds) per {size[0]}x{size[1]}x{channels} image")
    if args.cell:
        last = [r.rf for r in found.rows if r.rf][-1]
        print(f"feature cell {tuple(args.cell)} of {last.name} (receptive field {_fmt(last.r)}, jump {_fmt(last.j)}, "
              f"start {_fmt(last.start)}) sees image box (x0, y0, x1, y1) = "
              f"{tuple(round(v, 1) for v in feature_cell_box(last, *args.cell))}")


def _inspect_rpn(args):
    """ocula inspect rpn MODEL IMAGE: the RPN's anchors, anchor labels and proposals drawn, proposal recall."""
    import ocula
    from ocula.data.images import read_image
    from ocula.tasks.detect_rpn import boxes_for, draw_rpn, proposal_recall

    if len(args.inputs) != 2:
        raise OculaError("inspect rpn takes a Faster R-CNN model file and an image: ocula inspect rpn MODEL IMAGE")
    model = ocula.load(args.inputs[0], device="cpu")
    if not hasattr(model.module, "rpn"):
        raise OculaError("not a Faster R-CNN in torch: inspect rpn takes a faster-rcnn .ocula file", args.inputs[0])
    image_path = Path(args.inputs[1])
    image = read_image(image_path)
    boxes = boxes_for(image_path, Path(args.boxes) if args.boxes else None)
    source = "its annotation"
    if boxes is None:  # no annotation: the model's own detections stand in for the true boxes
        boxes, source = model.predict(image)[0].boxes, "the model's detections (no annotation found)"
    counts = draw_rpn(model.module, image, boxes, Path(args.out))
    print(f"{args.out}: {counts['anchors']} anchors, {counts['per_cell']} per cell; against {len(boxes)} boxes "
          f"from {source}: {counts['positive']} positive, {counts['negative']} negative, {counts['ignored']} ignored")
    recall = proposal_recall(model.module, [image], [{"boxes": boxes}])
    print("proposal recall: " + ", ".join(f"{k} {v:.3f}" for k, v in recall.items()))


def _model_to_inspect(args):
    """(module, (height, width), channels) for a model file, a backbone name or an architecture name + --arg."""
    if Path(args.model).is_file():
        import ocula

        model = ocula.load(args.model, device="cpu")
        pre = model.info.preprocess
        size = tuple(args.size or pre.get("input_size", (224, 224)))
        return model.module, size, pre.get("channels", 3)
    from ocula.models import ARCHITECTURES, build
    from ocula.models.backbones import build_backbone, list_backbones

    kwargs = dict(_key_value(a) for a in args.arg)
    if args.model in list_backbones():
        builder = build_backbone
    elif args.model in ARCHITECTURES:
        builder = build
    else:
        raise OculaError(f"{args.model!r} is neither a model file nor an architecture; known: "
                         f"{', '.join(list_backbones() + sorted(ARCHITECTURES))}")
    try:
        model = builder(args.model, **kwargs)
    except TypeError as e:  # a missing or unknown keyword
        raise OculaError(f"cannot build {args.model} with {kwargs}: {e}") from None
    return model, tuple(args.size or (224, 224)), kwargs.get("in_channels", 3)


def _key_value(text: str):
    """KEY=VALUE with VALUE read as JSON when it parses (numbers, true, lists), else as a string."""
    key, sep, value = text.partition("=")
    if not sep:
        raise OculaError(f"--arg takes KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def cmd_filters(args):
    import numpy as np
    import torch
    from PIL import Image

    from ocula.data.images import open_image, to_mode
    from ocula.filters import lecture_panels
    from ocula.plots import filter_panels

    image = to_mode(open_image(args.image), "L")
    image.thumbnail((args.max_side, args.max_side), Image.Resampling.LANCZOS)  # sigma is in pixels of this size
    gray = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    panels = [(t, m.numpy(), kind) for t, m, kind in lecture_panels(gray, sigma=args.sigma)]
    print(filter_panels(panels, args.out, title=f"{Path(args.image).name} ({image.width}x{image.height}, grey)"))


def _shard(text: str) -> tuple[int, int]:
    try:
        index, count = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {text!r}") from None
    if not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"shard index must be in 0..{count - 1}, got {index}")
    return index, count


def _fmt(v) -> str:
    """A per-axis pair prints as one number when both axes agree."""
    if isinstance(v, tuple):
        return _fmt(v[0]) if v[0] == v[1] else "x".join(_fmt(x) for x in v)
    return f"{v:g}"


def cmd_embed(args):
    from ocula.tasks.embed import embed_data

    print(embed_data(args.model, args.data, args.out, split=args.split, device=args.device,
                     batch_size=args.batch_size, normalize=args.normalize, rule=args.rule, k=args.k,
                     data_dir=args.data_dir))


def cmd_sample(args):
    import ocula
    from ocula.fileio import write_npy
    from ocula.plots import image_grid

    model = ocula.load(args.model, device=args.device)
    images = model.sample(args.n, seed=args.seed, interpolate=args.interpolate, steps=args.steps)
    out = Path(args.out or Path(args.model).with_name("interpolation.png" if args.interpolate else "samples.png"))
    image_grid(images, [""] * len(images), out, value_max=model.info.preprocess["value_max"],
               cols=len(images) if args.interpolate else 8)
    write_npy(out.with_suffix(".npy"), images.astype("float32"))
    print(f"{out} and {out.with_suffix('.npy')}: {len(images)} images")


def cmd_demo(args):
    from ocula.demo import run_demo

    run_demo(Path(args.runs_dir))


def cmd_serve(args):
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise OculaError("serving needs FastAPI and uvicorn: pip install 'ocula[serve]'") from None
    from ocula.serve.app import Limits
    from ocula.serve.server import run

    limits = Limits(max_bytes=args.max_bytes, max_pixels=args.max_pixels, timeout=args.timeout,
                    max_concurrent=args.max_concurrent)
    run(args.models, host=args.host, port=args.port, limits=limits, cors_origins=tuple(args.cors_origin))


# --- parser ---------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from ocula import __version__

    p = argparse.ArgumentParser(prog="ocula", description="ocula: image recognition from data to a served model, "
                                "fast on an ordinary CPU.")
    p.add_argument("--version", action="version", version=f"ocula {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def command(name, func, help, parent=sub):
        c = parent.add_parser(name, help=help, description=help)
        c.set_defaults(func=func)
        return c

    def data_dir(c):
        c.add_argument("--data-dir", help="folder holding local dataset copies (default: $OCULA_DATA_DIR, ...)")

    data = sub.add_parser("data", help="list, describe, draw, check and convert datasets")
    dsub = data.add_subparsers(dest="data_command", required=True)
    command("list", cmd_data_list, "registered datasets", dsub)
    c = command("info", cmd_data_info, "where a dataset is, its source, licence and split sizes", dsub)
    c.add_argument("name")
    data_dir(c)
    c = command("show", cmd_data_show, "a PNG grid of samples with labels, masks or boxes", dsub)
    c.add_argument("name")
    c.add_argument("--split")
    c.add_argument("-n", type=int, default=32, help="number of samples")
    c.add_argument("--out", help="PNG path (default NAME-SPLIT.png)")
    data_dir(c)
    c = command("check", cmd_data_check, "report annotation problems of a detection dataset", dsub)
    c.add_argument("source", help="registered name (bccd) or folder")
    c.add_argument("--format", choices=["voc", "coco", "yolo"], help="format of a folder")
    c.add_argument("--split")
    data_dir(c)
    c = command("convert", cmd_data_convert, "convert detection annotations between VOC, COCO and YOLO", dsub)
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--from", dest="src_format", required=True, choices=["voc", "coco", "yolo"])
    c.add_argument("--to", dest="dst_format", required=True, choices=["voc", "coco", "yolo"])
    c.add_argument("--split")

    def device(c):
        c.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N or mps")

    def strict_masks(c):
        c.add_argument("--strict-masks", action="store_true", help="segment: refuse a mask with any value that is "
                       "not exactly a class value (default: values within 32 grey levels are snapped, with a warning)")

    c = command("train", cmd_train, "train a model; writes runs/<task>/<name>/ (the task follows from the data)")
    c.add_argument("dataset", nargs="?", help="registered name (ocula data list) or a folder: class folders "
                   "(train/<class>/), images/ + masks/, or VOC / COCO / YOLO")
    c.add_argument("--model", help="classify: cnn (default), svc, airbench (fast CIFAR-10), resnet18, ...; "
                   "segment: unet (default), unet-seed; detect: fcos (default), faster-rcnn; class folders also: "
                   "1nn, knn, map (recognize by nearest neighbours, with --embedder)")
    c.add_argument("--config", help="rerun the run recorded in this config.json (other options override it)")
    c.add_argument("--name", help="run name (default DATASET-MODEL)")
    # Unset options keep the task's defaults (e.g. classify: 30 epochs, batch 128, lr 3e-3, one-cycle;
    # segment: 40 epochs, batch 8, LR on plateau, early stopping 10; detect: a 40-minute budget).
    c.add_argument("--epochs", type=int)
    c.add_argument("--batch-size", type=int)
    c.add_argument("--lr", type=float)
    c.add_argument("--weight-decay", type=float)
    c.add_argument("--optimizer", choices=["adamw", "sgd"])
    c.add_argument("--schedule", choices=["onecycle", "triangle", "cosine", "plateau", "constant"])
    c.add_argument("--label-smoothing", type=float)
    c.add_argument("--ema", type=float, metavar="DECAY", help="classify, segment: keep and evaluate a moving "
                   "average of the weights (e.g. 0.99 per step; default off)")
    c.add_argument("--early-stopping", type=int, metavar="PATIENCE")
    c.add_argument("--val-fraction", type=float, help="share of train held out for selection when the data has "
                   "no val split (default 0.1)")
    c.add_argument("--widths", type=int, nargs="+", help="classify: the cnn's stage widths (default 32 64 128)")
    c.add_argument("--width-mult", type=float, help="classify: a MobileNet's width multiplier (default 1.0)")
    c.add_argument("--embedder", help="recognize (--model 1nn, knn or map): the classifier file that embeds")
    c.add_argument("--k", type=int, help="recognize: neighbours for knn (default 5)")
    c.add_argument("--labels-per-class", type=int, help="classify: train on this many labelled images per class")
    c.add_argument("--self-train", type=int, metavar="ROUNDS", help="classify, with --labels-per-class: rounds of "
                   "pseudo-labelling the other training images, surest first, and training again on them")
    c.add_argument("--encoder", help="classify: a model file that initialises the network: a classifier of the same "
                   "architecture (e.g. airbench on CIFAR-10) or, for the cnn, a conv autoencoder")
    c.add_argument("--code-size", type=int, help="represent: the code's dimension (default per model)")
    c.add_argument("--penalty", type=float, help="represent: sparsity or contractive weight, or the VAE's KL weight")
    c.add_argument("--sparsity", choices=["l1", "kl"], help="represent: L1 on the code or KL to --rho")
    c.add_argument("--rho", type=float, help="represent: target mean activation of a KL-sparse code (0.05)")
    c.add_argument("--noise", choices=["gaussian", "masking", "salt-pepper"], help="represent: denoising corruption")
    c.add_argument("--noise-level", type=float, help="represent: Gaussian sigma or share of pixels hit (0.5)")
    c.add_argument("--likelihood", choices=["bernoulli", "gaussian"], help="represent: the VAE's p(x | z)")
    c.add_argument("--kl-warmup", type=int, metavar="EPOCHS", help="represent: epochs over which the KL weight rises")
    c.add_argument("--binarize", action=argparse.BooleanOptionalAction, help="represent: train the VAE on "
                   "dynamically binarized images")
    c.add_argument("--iw-samples", type=int, help="represent: importance samples of the VAE's NLL (5000)")
    c.add_argument("--feature-model", help="represent: a classifier file whose features score samples (Frechet)")
    c.add_argument("--fold", type=int, help="segment: validate on cross-validation fold K of 5 instead")
    c.add_argument("--crop", type=int, help="segment: training crop size in px (default per dataset)")
    c.add_argument("--crops-per-epoch", type=int, help="segment: cap on the random crops per epoch")
    c.add_argument("--cell-diameter", type=float, metavar="PX", help="segment: px a white cell spans inside the "
                   "model; images are resampled to it from the diameter measured on their masks (blood: 64, 0 = "
                   "native scale)")
    c.add_argument("--stain", choices=["reinhard", "macenko", "white", "neutral", "none"],
                   help="segment: colour normalisation ('white': white balance; 'neutral': the lamp's colour "
                   "taken out, its brightness kept)")
    c.add_argument("--flips", action=argparse.BooleanOptionalAction, help="segment: average predictions over flips")
    c.add_argument("--minutes", type=float, help="detect and classify: wall-clock budget (detect: default 40); "
                   "with --epochs, whichever ends first")
    c.add_argument("--steps-per-epoch", type=int, help="detect: batches between validations")
    c.add_argument("--input-size", type=int, nargs=2, metavar=("H", "W"), help="detect: size images are fitted to")
    c.add_argument("--weights", help="detect: torchvision ImageNet checkpoint (.pth) for faster-rcnn's backbone")
    c.add_argument("--seed", type=int)
    c.add_argument("--threads", type=int)
    device(c)
    c.set_defaults(device=None)
    c.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="mixed precision (default: on for segmentation and FCOS, off for classification)")
    c.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="channels-last memory format")
    c.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile")
    c.add_argument("--sync-bn", action=argparse.BooleanOptionalAction,
                   help="under torchrun: batch-norm statistics over the global batch")
    c.add_argument("--resume", action="store_true", help="continue the run from its last.ocula")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--runs-dir", default=str(RUNS))
    c.add_argument("--quiet", action="store_true")
    strict_masks(c)
    data_dir(c)

    c = command("evaluate", cmd_evaluate, "score a model on a dataset split: accuracy and confusion matrix, "
                "mAP, or Dice / IoU per class and image")
    c.add_argument("model")
    c.add_argument("--data", help="dataset name or folder (default: the one it was trained on)")
    c.add_argument("--split", help="default: test, else val")
    c.add_argument("--out", help="folder for eval.json and figures")
    strict_masks(c)
    device(c)
    data_dir(c)

    c = command("export", cmd_export, "export a model file to ONNX (checked with ONNX Runtime) or CoreML")
    c.add_argument("model")
    c.add_argument("--format", required=True, choices=["onnx", "coreml"])
    c.add_argument("--out")

    from ocula.compression import AMOUNT, METHODS

    c = command("compress", cmd_compress, "compress a classifier (pruning, distillation, int8 with or without "
                "quantization-aware training, low rank or binarization) or any network to int8; writes a new "
                "model file and prints its size and FLOPs")
    c.add_argument("model")
    c.add_argument("--method", required=True, choices=list(METHODS),
                   help="; ".join(f"{k}: {v}" for k, v in METHODS.items()))
    c.add_argument("--out", required=True, help="the new model file (.ocula; .onnx for int8 and qat)")
    c.add_argument("--amount", type=float, help="magnitude: share of weights zeroed; structured: share of FLOPs "
                   "removed; tucker, cp: rank as a share of channels; distill: student widths as a share of the "
                   f"teacher's (defaults {AMOUNT})")
    c.add_argument("--widths", type=int, nargs="+", help="distill: the student cnn's stage widths (needed when the "
                   "teacher is not a cnn)")
    c.add_argument("--epochs", type=int, help="fine-tuning epochs (distill: the student's; qat: through simulated "
                   "int8; default 2)")
    c.add_argument("--lr", type=float)
    c.add_argument("--batch-size", type=int)
    c.add_argument("--temperature", type=float, help="distill: softmax temperature (default 4)")
    c.add_argument("--alpha", type=float, help="distill: weight of the teacher's soft targets (default 0.9)")
    c.add_argument("--calibration", type=int, help="int8, qat: training images that calibrate (default 512; a "
                   "segmenter sees one tile of each, a detector each letterboxed image)")
    c.add_argument("--data", help="dataset to fine-tune / calibrate on (default: the one it was trained on)")
    c.add_argument("--seed", type=int)
    c.add_argument("--threads", type=int)
    c.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="fine-tune under bf16 autocast")
    c.add_argument("--channels-last", action=argparse.BooleanOptionalAction)
    c.add_argument("--quiet", action="store_true")
    device(c)
    data_dir(c)

    c = command("predict", cmd_predict, "predict image files or folders: labels, masks and cell tables, or boxes")
    c.add_argument("model")
    c.add_argument("inputs", nargs="+")
    c.add_argument("--json", action="store_true")
    c.add_argument("--out", default="predictions", help="folder for what each task draws: preprocessing stages, "
                   "masks, overlays and cell tables, boxes; '' for none")
    c.add_argument("--batch-size", type=int)
    c.add_argument("--pixel-size", type=float, metavar="UM", help="segment: micrometres per pixel for cell sizes")
    c.add_argument("--cell-diameter", type=float, metavar="PX", help="segment: px a white cell spans in these "
                   "images, to resample them to the model's scale (default: assume the model's own, and say so)")
    c.add_argument("--min-area", type=int, metavar="PX",
                   help="segment: drop predicted objects smaller than this (default: the model file's)")
    c.add_argument("--opening", action="store_true", default=None, help="segment: also remove what is narrower "
                   "than the training cells ever are, such as red-cell rims joined to a white cell")
    c.add_argument("--score-thresh", type=float, help="detect: keep boxes scoring this (default: the model's)")
    mode = c.add_mutually_exclusive_group()
    for name in ("embed", "reconstruct", "denoise"):
        mode.add_argument(f"--{name}", dest="mode", action="store_const", const=name,
                          help=f"represent: {name} the images (default reconstruct)")
    c.add_argument("--shard", type=_shard, metavar="I/N", help="predict only the I-th of N equal parts of the "
                   "inputs (a cluster job array); under torchrun the ranks split them by themselves")
    device(c)

    c = command("inspect", cmd_inspect, "per layer: output shape, parameters, FLOPs, receptive field and jump")
    c.add_argument("model", help="a model file, or a backbone / architecture name (resnet18, mobilenet_v1, ...), "
                   "or rpn followed by a Faster R-CNN model file and an image")
    c.add_argument("inputs", nargs="*", metavar="MODEL IMAGE", help="after rpn: draw the RPN's anchors of one "
                   "cell, the anchor labels for the image's boxes and the top proposals, and give proposal recall")
    c.add_argument("--out", default="rpn.png", help="rpn: the PNG to write")
    c.add_argument("--boxes", help="rpn: the image's Pascal VOC annotation (default: Annotations/STEM.xml beside "
                   "a VOC image's folder, else the model's own detections)")
    c.add_argument("--arg", action="append", default=[], metavar="KEY=VALUE",
                   help="an argument of the named architecture, e.g. --arg width_mult=0.5 --arg small_input=true")
    c.add_argument("--size", type=int, nargs=2, metavar=("H", "W"),
                   help="input size (default: the model file's, else 224 224)")
    c.add_argument("--cell", type=int, nargs=2, metavar=("ROW", "COL"),
                   help="map this cell of the last conv / pool layer back to its box in the image")

    c = command("filters", cmd_filters, "the lecture's filter panels on an image: Gaussian, Prewitt, Sobel, "
                "gradient magnitude and orientation, Laplacian, LoG, DoG, a Gabor bank (borders reflect-101)")
    c.add_argument("image")
    c.add_argument("--out", default="filters.png", help="the panel PNG")
    c.add_argument("--sigma", type=float, default=2.0, help="Gaussian scale in pixels (after --max-side)")
    c.add_argument("--max-side", type=int, default=512, help="shrink the image to this long side first")

    c = command("embed", cmd_embed, "penultimate-layer embeddings of a dataset split: a vector file "
                "(safetensors: vectors, labels, ids), or with --out X.ocula a nearest-neighbour recogniser over them "
                "(from a recogniser: the same one with these images added to its references)")
    c.add_argument("model", help="a network classifier's or a recogniser's model file")
    c.add_argument("data", help="registered dataset name or a folder of class folders")
    c.add_argument("--out", required=True, help="vectors.safetensors, or gallery.ocula for a recogniser")
    c.add_argument("--split", default="train")
    c.add_argument("--normalize", action="store_true", help="unit-length vectors (a recogniser always is)")
    c.add_argument("--rule", default="1nn", choices=["1nn", "knn", "map"], help="a recogniser's decision rule")
    c.add_argument("--k", type=int, default=5, help="neighbours voting under --rule knn")
    c.add_argument("--batch-size", type=int, default=256)
    device(c)
    data_dir(c)

    c = command("sample", cmd_sample, "images from a VAE's or GAN's prior, or the decoded line between two images")
    c.add_argument("model")
    c.add_argument("--n", type=int, default=64)
    c.add_argument("--interpolate", nargs=2, metavar=("A", "B"), help="two image files to interpolate between")
    c.add_argument("--steps", type=int, default=10, help="images on the interpolation line")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", help="PNG path (default samples.png or interpolation.png beside the model); the "
                   "images also as .npy")
    device(c)

    c = command("demo", cmd_demo, "the digit recognizer end to end in under a minute")
    c.add_argument("--runs-dir", default=str(RUNS))

    c = command("serve", cmd_serve, "the web page and HTTP API (/v1/predict, /docs) for model files")
    c.add_argument("models", nargs="*", help="model files, each served under its file name (default: the bundled "
                   "digit model); an ONNX export beside a file runs in ONNX Runtime")
    c.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    c.add_argument("--port", type=int, default=8000)
    c.add_argument("--max-bytes", type=int, default=10 * 2**20, help="largest upload in bytes")
    c.add_argument("--max-pixels", type=int, default=40_000_000, help="largest image in pixels")
    c.add_argument("--timeout", type=float, default=30.0, help="seconds one prediction may take")
    c.add_argument("--max-concurrent", type=int, default=32, help="predictions held at once; more get 503")
    c.add_argument("--cors-origin", action="append", default=[], help="allow this origin's pages to call the API "
                   "(repeatable; default: none)")
    return p


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"ocula: warning: {message}\n"


def main(argv=None) -> None:
    import warnings

    args = build_parser().parse_args(argv)
    warnings.formatwarning = _one_line_warning
    try:
        code = args.func(args) or 0
    except OculaError as e:
        print(f"ocula: error: {e}", file=sys.stderr)
        code = 1
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        code = 0
    except KeyboardInterrupt:
        print("ocula: interrupted", file=sys.stderr)
        code = 130
    if "torch.distributed" in sys.modules:  # a torchrun rank leaves its process group before it exits
        from ocula.engine.distributed import cleanup

        cleanup(failed=code != 0)
    sys.exit(code)
