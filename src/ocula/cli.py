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
    from ocula.data import registry

    info = registry.get_info(args.name)
    split = args.split or info.splits[0]
    data = registry.load(args.name, split, args.data_dir)
    out = Path(args.out or f"{args.name}-{split}.png")
    if info.task == "classify":
        from ocula.plots import image_grid

        n = min(args.n, len(data))
        image_grid(data.images[:n], [data.classes[int(y)] for y in data.labels[:n]], out, value_max=data.value_max,
                   title=f"{args.name} ({split}): first {n} of {len(data)}")
    elif info.task == "segment":
        from ocula.data.images import save_png
        from ocula.data.segmentation import mask_grid

        save_png(mask_grid(data, args.n), out)
    else:
        from ocula.data.draw import draw_samples
        from ocula.data.images import save_png

        save_png(draw_samples(data, args.n), out)
    print(out)


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


# --- train / evaluate / export / predict ------------------------------------------------------------------
def _given(args) -> dict:
    """Training options set on the command line; the others keep the task's defaults."""
    names = ("epochs", "batch_size", "lr", "schedule", "early_stopping", "weight_decay", "bf16", "channels_last")
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def _run_dir(args, task: str, model: str) -> Path:
    run_dir = Path(args.runs_dir) / task / (args.name or f"{Path(args.dataset).name}-{model}")
    if run_dir.exists() and not args.resume and not args.overwrite:
        raise OculaError("run folder exists; pass --resume to continue it, --overwrite to replace it, or --name",
                         run_dir)
    return run_dir


def cmd_train(args):
    from ocula.data import registry
    from ocula.engine.trainer import TrainConfig

    task = "segment" if Path(args.dataset).is_dir() else registry.get_info(args.dataset).task
    if task == "segment":
        return _train_segment(args)
    if task == "detect":
        return _train_detect(args)
    if task != "classify":
        raise OculaError(f"training for task {task!r} is not wired to the CLI yet; classify datasets: "
                         "digits, mnist, fashion-mnist; segment: wbc-sigtuple, wbc-zheng, isbi2012 or a folder")
    from ocula.tasks import classify

    model = args.model or "cnn"
    if model not in ("svc", "cnn"):
        raise OculaError(f"--model {model} does not classify; choose svc or cnn")
    config = TrainConfig(**_given(args), optimizer=args.optimizer, seed=args.seed,
                         label_smoothing=args.label_smoothing, monitor="val_loss", mode="min", compile=args.compile,
                         threads=args.threads)
    summary = classify.train(args.dataset, model, config, run_dir=_run_dir(args, "classify", model),
                             data_dir=args.data_dir, val_fraction=args.val_fraction, resume=args.resume,
                             progress=not args.quiet)
    print(json.dumps(summary))


def _train_segment(args):
    from ocula.tasks import segment_train

    model = args.model or "unet"
    config = segment_train.default_config(model, **_given(args), optimizer=args.optimizer, seed=args.seed,
                                          compile=args.compile, threads=args.threads)
    summary = segment_train.train(args.dataset, model, config, run_dir=_run_dir(args, "segment", model),
                                  data_dir=args.data_dir, fold=args.fold, val_fraction=args.val_fraction,
                                  crop=args.crop, crops_per_epoch=args.crops_per_epoch, resume=args.resume,
                                  progress=not args.quiet)
    print(json.dumps(summary))


def _train_detect(args):
    from ocula.tasks import detect

    model = args.model or "fcos"
    config = detect.default_config(model, **_given(args), seed=args.seed, threads=args.threads)
    summary = detect.train(args.dataset, model, config, run_dir=_run_dir(args, "detect", model),
                           minutes=args.minutes, data_dir=args.data_dir, progress=not args.quiet,
                           backbone_weights=args.weights)
    print(json.dumps(summary))


def cmd_evaluate(args):
    import ocula
    from ocula.data import registry
    from ocula.tasks import classify

    model = ocula.load(args.model)
    dataset = args.data or model.info.preprocess.get("dataset")
    if not dataset:
        raise OculaError(f"{args.model} does not name the dataset it was trained on; pass --data")
    out = Path(args.out or Path(args.model).parent / f"eval-{Path(dataset).name}-{args.split}")
    if model.info.task == "segment":
        from ocula.tasks import segment_train

        data = segment_train.load_dataset(dataset, args.data_dir, args.split)
        r = segment_train.write_evaluation(model, data, out)
        print(f"Dice {r['dice']:.4f} (mean per image {r['mean_image_dice']:.4f}), IoU {r['iou']:.4f} on "
              f"{r['images']} images of {dataset}/{args.split}; figures in {out}")
        return
    data = registry.load(dataset, args.split, args.data_dir)
    if model.info.task == "detect":
        from ocula.tasks import detect

        r = detect.write_evaluation(model, data, out)
        per_class = ", ".join(f"{c} {v:.3f}" for c, v in r["ap50"].items())
        print(f"mAP@.5 {r['map50']:.4f}, mAP@[.5:.95] {r['map']:.4f} (AP@.5 {per_class}) on {len(data)} images "
              f"of {dataset}/{args.split}; figures in {out}")
        return
    result = classify.write_evaluation(model, data, out)
    print(f"accuracy {result['accuracy']:.4f} on {result['n']} images of {dataset}/{args.split}; figures in {out}")


def cmd_export(args):
    import ocula

    model = ocula.load(args.model)
    if model.info.task == "detect":
        from ocula.tasks import detect

        if args.format != "onnx":
            raise OculaError("detection models export to ONNX only (--format onnx)")
        out = detect.export_onnx(model, args.out or Path(args.model).with_suffix(".onnx"))
        diff = detect.check_onnx_parity(model, out)
        print(f"{out} (ONNX Runtime vs torch: same detections, boxes within {diff:.2e} px; NMS runs after ORT)")
        return
    if args.format == "onnx":
        from ocula.export.onnx import check_parity, export_onnx

        dense = model.info.task == "segment"
        out = export_onnx(model, args.out or Path(args.model).with_suffix(".onnx"), dynamic_hw=dense)
        diff = check_parity(model, out)
        if dense:  # height and width are dynamic: check a size unlike the traced one too
            import torch

            pre = model.info.preprocess
            diff = max(diff, check_parity(model, out, torch.rand(1, pre["channels"], 500, 700) * pre["value_max"]))
        print(f"{out} (ONNX Runtime vs torch: max abs difference {diff:.2e})")
    else:
        from ocula.export.coreml import export_coreml

        print(export_coreml(model, args.out or Path(args.model).with_suffix(".mlpackage")))


def cmd_predict(args):
    import ocula
    from ocula.data.images import list_images
    from ocula.tasks.classify import predict_photo
    from ocula.tasks.segment_train import predict_file

    model = ocula.load(args.model)
    segment = model.info.task == "segment"
    detecting = model.info.task == "detect"
    files = []
    for item in args.inputs:
        files += list_images(item) if Path(item).is_dir() else [Path(item)]
    results, failed = [], 0
    for f in files:
        steps = None
        if args.steps:
            steps = Path(args.steps) if len(files) == 1 else Path(args.steps).with_name(
                f"{Path(args.steps).stem}-{f.stem}.png")
        try:
            if detecting:
                from ocula.tasks.detect import predict_file as detect_file

                r = detect_file(model, f, Path(args.out))
            elif segment:
                r = predict_file(model, f, Path(args.out), pixel_size=args.pixel_size, min_area=args.min_area)
            else:
                r = predict_photo(model, f, steps)
        except OculaError as e:
            if len(files) == 1:
                raise
            failed += 1
            r = {"file": str(f), "error": str(e)}
            print(f"ocula: error: {e}", file=sys.stderr)
        results.append(r)
        if not args.json and "error" not in r:
            if detecting:
                counts = ", ".join(f"{c} {n}" for c, n in r["counts"].items())
                print(f"{r['file']}: {counts}; {r['image']}, {r['json']}")
            elif segment:
                print(f"{r['file']}: {r['count']} cells; {r['mask']}, {r['overlay']}, {r['cells_csv']}")
            else:
                print(f"{r['file']}: {r['class']} (probability {r['probability']:.2f})")
    if args.json:
        print(json.dumps(results if len(results) > 1 else results[0], indent=2))
    return 1 if failed else 0


def cmd_inspect_rf(args):
    from ocula.models.detection.receptive_field import feature_cell_box, receptive_field

    if Path(args.model).is_file():
        import ocula

        model = ocula.load(args.model)
        pre = model.info.preprocess
        size, channels = tuple(pre.get("input_size", (args.size, args.size))), pre.get("channels", 3)
    else:
        from ocula.models.backbones import build_backbone

        model, size, channels = build_backbone(args.model), (args.size, args.size), 3
    rows = receptive_field(model.eval(), size, channels)
    print(f"{'layer':36s} {'kernel':>8s} {'stride':>8s} {'pad':>6s} {'RF':>10s} {'jump':>8s} {'start':>12s}")
    for r in rows:
        print(f"{r.name[:36]:36s} {_fmt(r.kernel):>8s} {_fmt(r.stride):>8s} {_fmt(r.padding):>6s} {_fmt(r.r):>10s} "
              f"{_fmt(r.j):>8s} {_fmt(r.start):>12s}")
    if rows and args.cell:
        i, j = args.cell
        print(f"feature cell ({i}, {j}) of {rows[-1].name} sees image box (x0, y0, x1, y1) = "
              f"{tuple(round(v, 1) for v in feature_cell_box(rows[-1], i, j))}")


def _fmt(v) -> str:
    """A per-axis pair prints as one number when both axes agree."""
    if isinstance(v, tuple):
        return _fmt(v[0]) if v[0] == v[1] else "x".join(_fmt(x) for x in v)
    return f"{v:g}"


def cmd_demo(args):
    from ocula.demo import run_demo

    run_demo(Path(args.runs_dir))


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

    c = command("train", cmd_train, "train a model; writes runs/<task>/<name>/")
    c.add_argument("dataset")
    c.add_argument("--model", choices=["svc", "cnn", "unet", "unet-seed", "fcos", "faster-rcnn"],
                   help="default: cnn to classify, unet to segment, fcos to detect")
    c.add_argument("--name", help="run name (default DATASET-MODEL)")
    # Unset options take the task's defaults (classify: 30 epochs, batch 128, lr 3e-3, one-cycle, weight decay
    # 5e-4; segment: 40 epochs, batch 8, lr 2e-3 / 3e-4 seed, LR on plateau, early stopping 10, weight decay 1e-4).
    c.add_argument("--epochs", type=int)
    c.add_argument("--batch-size", type=int)
    c.add_argument("--lr", type=float)
    c.add_argument("--weight-decay", type=float)
    c.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    c.add_argument("--schedule", choices=["onecycle", "cosine", "plateau", "constant"])
    c.add_argument("--label-smoothing", type=float, default=0.0)
    c.add_argument("--early-stopping", type=int, metavar="PATIENCE")
    c.add_argument("--val-fraction", type=float, default=0.1, help="share of train held out for selection")
    c.add_argument("--fold", type=int, help="segment: validate on cross-validation fold K of 5 instead")
    c.add_argument("--crop", type=int, help="segment: training crop size in px (default per dataset)")
    c.add_argument("--crops-per-epoch", type=int, help="segment: cap on the random crops per epoch")
    c.add_argument("--minutes", type=float, default=40.0, help="detect: wall-clock training budget")
    c.add_argument("--weights", help="detect: torchvision ImageNet checkpoint (.pth) for faster-rcnn's backbone")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--threads", type=int, default=0)
    c.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bfloat16 autocast (default: on for segmentation, off for classification)")
    c.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="channels-last memory format")
    c.add_argument("--compile", action="store_true", help="torch.compile")
    c.add_argument("--resume", action="store_true", help="continue from the run's last.ocula")
    c.add_argument("--overwrite", action="store_true")
    c.add_argument("--runs-dir", default=str(RUNS))
    c.add_argument("--quiet", action="store_true")
    data_dir(c)

    c = command("evaluate", cmd_evaluate, "score a model on a dataset split: accuracy and confusion matrix, "
                "mAP, or Dice / IoU per class and image")
    c.add_argument("model")
    c.add_argument("--data", help="dataset (default: the one it was trained on)")
    c.add_argument("--split", default="test")
    c.add_argument("--out")
    data_dir(c)

    c = command("export", cmd_export, "export a model file to ONNX or CoreML")
    c.add_argument("model")
    c.add_argument("--format", required=True, choices=["onnx", "coreml"])
    c.add_argument("--out")

    c = command("predict", cmd_predict, "predict files or folders: digit photos (classify), or masks, overlays "
                "and cell tables (segment)")
    c.add_argument("model")
    c.add_argument("inputs", nargs="+")
    c.add_argument("--json", action="store_true")
    c.add_argument("--steps", help="classify: PNG drawing each preprocessing stage")
    c.add_argument("--out", default="predictions", help="segment: masks, overlays and cell tables; detect: boxes "
                   "drawn (PNG) and JSON")
    c.add_argument("--pixel-size", type=float, metavar="UM", help="segment: micrometres per pixel for cell sizes")
    c.add_argument("--min-area", type=int, metavar="PX",
                   help="segment: drop predicted objects smaller than this (default: the model file's)")

    inspect = sub.add_parser("inspect", help="look inside models")
    isub = inspect.add_subparsers(dest="inspect_command", required=True)
    c = command("receptive-field", cmd_inspect_rf, "receptive field, jump and start per layer", isub)
    c.add_argument("model", help="model file or backbone name (resnet18, ...)")
    c.add_argument("--size", type=int, default=224, help="input size for a backbone name")
    c.add_argument("--cell", type=int, nargs=2, metavar=("ROW", "COL"), help="map this cell of the last layer back")

    c = command("demo", cmd_demo, "the digit recognizer end to end in under a minute")
    c.add_argument("--runs-dir", default=str(RUNS))
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
    sys.exit(code)
