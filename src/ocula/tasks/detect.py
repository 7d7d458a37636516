"""Detection: train detectors on box datasets (BCCD), evaluate with COCO mAP, predict, draw and count.

Two detectors share one face here: "fcos" (ocula's one-stage anchor-free CSP/PAN detector) and "faster-rcnn"
(ResNet-18 + FPN, GroupNorm). Both run at the model's recorded `input_size`: an image is resized to fit it
(aspect kept), zero-padded to a multiple of 32, and the boxes are scaled back to the image's own pixels.

Training follows a wall-clock budget: the learning rate is a warm-up + cosine over the budget's seconds rather
than over steps, so a run that has to stop at, say, 40 minutes still ends at a low learning rate; the best
validation checkpoint (of the weights' exponential moving average) is the result.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ocula.data.box_transforms import augment, colour_jitter
from ocula.engine.callbacks import Callback, CSVLogger, TerminateOnNaN
from ocula.engine.trainer import TrainConfig, Trainer
from ocula.errors import OculaError
from ocula.fileio import atomic_path, write_json
from ocula.modelfile import ModelInfo, save_model
from ocula.models import build

DIVISOR = 32
PAD_VALUE = 114.0  # grey, the fill of training crops that reach past the image
# Per detector: architecture arguments (num_classes added), training defaults and batches between validations.
# Faster R-CNN trains in float32: the RoIAlign module rejects bfloat16 features.
PRESETS = {
    "fcos": dict(arch="fcos", args=dict(widths=[16, 32, 64, 128, 256], depths=[1, 2, 2, 1], neck_width=64),
                 train=dict(batch_size=8, lr=2e-3, weight_decay=0.05, bf16=True, channels_last=True),
                 steps_per_epoch=100),
    "faster-rcnn": dict(arch="faster-rcnn",
                        args=dict(backbone="resnet18", norm_layer="group", fpn_width=128,
                                  rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000,
                                  rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=300,
                                  box_batch_size_per_image=256, box_detections_per_img=150),
                        train=dict(batch_size=4, lr=1e-3, weight_decay=0.05, bf16=False, channels_last=False),
                        steps_per_epoch=50),
}
FCOS_LOSS = dict(radius=1.5, quality=True)  # quality focal loss: +0.02 val mAP@.5 in 6-minute trials
INPUT_SIZE = (384, 512)  # h, w the 480 x 640 BCCD smears are resized to (0.8x): platelets stay ~24 px
SCORE_THRESH = 0.4  # drawn / counted detections; evaluation uses every detection above 0.05
NMS_THRESH = 0.6  # FCOS's class-wise NMS IoU unless the model file records one tuned on validation


# --- running a detector at its input size ------------------------------------------------------------------
def letterbox(image: np.ndarray, size) -> tuple[torch.Tensor, float]:
    """uint8 HxWx3 -> float [3, h, w] 0..255 fitted into `size` (aspect kept), padded to multiples of 32; scale.
    Resampling and padding match the training crops (plain bilinear, grey fill)."""
    h, w = image.shape[:2]
    s = min(size[0] / h, size[1] / w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None]
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
    ph, pw = -(-nh // DIVISOR) * DIVISOR, -(-nw // DIVISOR) * DIVISOR
    return F.pad(x[0], (0, pw - nw, 0, ph - nh), value=PAD_VALUE), s


def is_fcos(model) -> bool:
    return model.info.arch == "fcos" if hasattr(model, "info") else hasattr(model, "heads")


@torch.no_grad()
def detect_tensor(model, x: torch.Tensor, *, score_thresh: float = 0.05) -> list[dict]:
    """Detections for a float batch [N, 3, H, W] (0..255, already at the model's size), in its pixels."""
    from ocula.models.detection.fcos import postprocess

    model.eval()
    if is_fcos(model):
        boxes, scores = model(x)
        return postprocess(boxes, scores, score_thresh=score_thresh, nms_thresh=nms_threshold(model))
    model.roi_heads.score_thresh = score_thresh
    info = getattr(model, "info", None)
    if info and "nms_thresh" in info.preprocess:
        model.roi_heads.nms_thresh = info.preprocess["nms_thresh"]
    return model(list(x / 255.0))


def greedy_match(overlap: np.ndarray, iou: float = 0.5) -> np.ndarray:
    """For IoUs [detections in score order, truths]: the truth each detection takes, -1 for none. Greedy and
    one-to-one: a detection takes the unmatched truth it overlaps most, when that overlap is >= iou."""
    taken = np.zeros(overlap.shape[1], bool)
    match = np.full(len(overlap), -1)
    for i, row in enumerate(overlap):
        free = np.where(taken, 0, row)
        if len(free) and free.max() >= iou:
            match[i] = free.argmax()
            taken[match[i]] = True
    return match


def f1_at(targets: list[dict], detections: list[dict], thresh: float, iou: float = 0.5) -> float:
    """F1 of the detections scoring >= thresh: greedy one-to-one matching by score, same class, IoU >= iou."""
    from ocula.data.detection import box_iou

    tp = fp = fn = 0
    for t, d in zip(targets, detections):
        keep = d["scores"] >= thresh
        boxes, labels = d["boxes"][keep], d["labels"][keep]
        order = np.argsort(-d["scores"][keep])
        overlap = box_iou(np.asarray(boxes[order], float), np.asarray(t["boxes"], float))
        overlap[labels[order][:, None] != t["labels"][None, :]] = 0
        hits = int((greedy_match(overlap, iou) >= 0).sum())
        tp, fp, fn = tp + hits, fp + len(order) - hits, fn + len(t["labels"]) - hits
    return 2 * tp / max(2 * tp + fp + fn, 1)


def tune_score_threshold(model, data, candidates=np.arange(0.2, 0.71, 0.05)) -> float:
    """The score threshold for drawing and counting: best F1 on `data` (validation), recorded in the model."""
    images, targets = zip(*(data[i] for i in range(len(data))))
    dets = detect_images(model, list(images))
    f1 = {round(float(t), 2): f1_at(list(targets), dets, t) for t in candidates}
    model.info.preprocess["score_thresh"] = max(f1, key=f1.get)
    return f1[model.info.preprocess["score_thresh"]]


def nms_threshold(model) -> float:
    info = getattr(model, "info", None)
    return info.preprocess.get("nms_thresh", NMS_THRESH) if info else NMS_THRESH


def tune_nms(model, data, candidates=(0.4, 0.45, 0.5, 0.55, 0.6)) -> dict[float, float]:
    """Pick the class-wise NMS IoU threshold by mAP@.5 on `data` (a validation split: overlapping RBCs make it
    matter) and record it in the model's preprocessing; returns {threshold: mAP@.5}."""
    images, targets = zip(*(data[i] for i in range(len(data))))
    scores = {}
    for t in candidates:
        model.info.preprocess["nms_thresh"] = t
        scores[t] = coco_evaluate(list(targets), detect_images(model, list(images)), data.classes)["map50"]
    model.info.preprocess["nms_thresh"] = max(scores, key=scores.get)
    return scores


def detect_images(model, images: list[np.ndarray], *, size=None, score_thresh: float = 0.05,
                  batch_size: int = 8) -> list[dict]:
    """Per image {boxes (image pixels), scores, labels} as numpy arrays."""
    size = size or model.info.preprocess["input_size"]
    results = []
    for i in range(0, len(images), batch_size):
        chunk = [letterbox(im, size) for im in images[i:i + batch_size]]
        h = max(x.shape[1] for x, _ in chunk)
        w = max(x.shape[2] for x, _ in chunk)
        x = torch.stack([F.pad(t, (0, w - t.shape[2], 0, h - t.shape[1])) for t, _ in chunk])
        for (_, s), im, d in zip(chunk, images[i:i + batch_size], detect_tensor(model, x, score_thresh=score_thresh)):
            boxes = (d["boxes"] / s).numpy()
            boxes[:, 0::2] = boxes[:, 0::2].clip(0, im.shape[1])
            boxes[:, 1::2] = boxes[:, 1::2].clip(0, im.shape[0])
            results.append({"boxes": boxes, "scores": d["scores"].numpy(), "labels": d["labels"].numpy()})
    return results


# --- COCO evaluation -----------------------------------------------------------------------------------------
def coco_evaluate(targets: list[dict], detections: list[dict], classes) -> dict:
    """mAP@[.5:.95], mAP@.5 and per-class AP@.5 (pycocotools), plus the IoU-0.5 precision/recall curves.

    `targets` hold numpy boxes/labels (and optionally `difficult`, evaluated as COCO crowd regions: neither found
    nor missed); `detections` boxes/scores/labels, image for image.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, annotations, results = [], [], []
    for i, (t, d) in enumerate(zip(targets, detections)):
        images.append({"id": i})
        crowd = t.get("difficult", np.zeros(len(t["labels"]), bool))
        for b, lab, c in zip(np.asarray(t["boxes"], float), t["labels"], crowd):
            w, h = b[2] - b[0], b[3] - b[1]
            annotations.append({"id": len(annotations) + 1, "image_id": i, "category_id": int(lab) + 1,
                                "bbox": [b[0], b[1], w, h], "area": w * h, "iscrowd": int(c)})
        for b, s, lab in zip(np.asarray(d["boxes"], float), d["scores"], d["labels"]):
            results.append({"image_id": i, "category_id": int(lab) + 1, "score": float(s),
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]]})
    per_class = {c: 0.0 for c in classes}
    empty = {"map": 0.0, "map50": 0.0, "ap50": per_class, "curves": {}}
    if not annotations or not results:
        return empty
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress and tables
        gt = COCO()
        gt.dataset = {"images": images, "annotations": annotations,
                      "categories": [{"id": k + 1, "name": c} for k, c in enumerate(classes)]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(results), "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    precision = ev.eval["precision"][0, :, :, 0, -1]  # IoU 0.5, all recall points, classes, all areas, 100 dets
    curves = {}
    for k, c in enumerate(classes):
        p = precision[:, k]
        per_class[c] = float(p[p > -1].mean()) if (p > -1).any() else 0.0
        curves[c] = p.tolist()
    return {"map": float(ev.stats[0]), "map50": float(ev.stats[1]), "ap50": per_class,
            "curves": curves, "recall": ev.params.recThrs.tolist()}


def plot_pr_curves(result: dict, path: Path, title: str = "") -> Path:
    from ocula.plots import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for c, p in result["curves"].items():
        p = np.asarray(p)
        ax.plot(np.asarray(result["recall"])[p > -1], p[p > -1], label=f"{c} AP@.5 {result['ap50'][c]:.3f}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower left")
    ax.set_title(title or f"IoU 0.5: mAP@.5 {result['map50']:.3f}")
    return save_figure(fig, path)


def evaluate(model, data, *, size=None) -> dict:
    images, targets = zip(*(data[i] for i in range(len(data))))
    return coco_evaluate(list(targets), detect_images(model, list(images), size=size), data.classes)


def summary_of(result: dict) -> dict:
    return {"map50": result["map50"], "map": result["map"], **{f"ap50_{c}": v for c, v in result["ap50"].items()}}


def write_evaluation(model, data, out_dir: Path, prefix: str = "") -> dict:
    """eval.json, the PR-curve PNG and a sheet of predictions on the first images."""
    from ocula.data.draw import draw_boxes
    from ocula.data.images import save_png

    out_dir = Path(out_dir)
    images, targets = zip(*(data[i] for i in range(len(data))))
    dets = detect_images(model, list(images))
    result = coco_evaluate(list(targets), dets, data.classes)
    plot_pr_curves(result, out_dir / f"{prefix}pr_curves.png",
                   f"{data.name}: mAP@.5 {result['map50']:.3f}, mAP@[.5:.95] {result['map']:.3f}")
    for i in range(min(4, len(images))):
        keep = dets[i]["scores"] >= model.info.preprocess.get("score_thresh", SCORE_THRESH)
        save_png(draw_boxes(images[i], dets[i]["boxes"][keep], dets[i]["labels"][keep], dets[i]["scores"][keep],
                            data.classes), out_dir / f"{prefix}predictions-{i}.png")
    write_json(out_dir / f"{prefix}eval.json", {"n": len(data), **summary_of(result)})
    return result


# --- training ------------------------------------------------------------------------------------------------
def ignored_classes(targets: list[dict], num_classes: int, common: float = 0.9) -> torch.Tensor:
    """[N, C] bool: classes present in at least `common` of the images but absent from this one. BCCD smears
    nearly all show RBCs and a WBC; a smear with none labelled has unlabelled cells (a known defect), so their
    negatives must not teach the model to miss them."""
    present = np.stack([np.bincount(t["labels"], minlength=num_classes) > 0 for t in targets])
    usual = present.mean(0) >= common
    return torch.from_numpy(~present & usual[None])


class DetectionBatches:
    """`steps` random batches of augmented crops per epoch, drawn from images held in memory."""

    def __init__(self, data, *, batch_size: int, steps: int, size=INPUT_SIZE, scale=(0.6, 1.0)):
        self.images = [torch.from_numpy(np.array(data[i][0])).permute(2, 0, 1) for i in range(len(data))]
        self.targets = [data.target(i) for i in range(len(data))]
        self.ignore = ignored_classes(self.targets, len(data.classes))
        self.batch_size, self.steps, self.size, self.scale = batch_size, steps, tuple(size), scale

    def __len__(self) -> int:
        return self.steps

    def __call__(self, g: torch.Generator):
        for _ in range(self.steps):
            xs, ys = [], []
            for i in torch.randint(len(self.images), (self.batch_size,), generator=g).tolist():
                t = self.targets[i]
                x, boxes, labels = augment(self.images[i], torch.from_numpy(t["boxes"]),
                                           torch.from_numpy(t["labels"]), self.size, g, scale=self.scale)
                xs.append(x)
                ys.append({"boxes": boxes, "labels": labels, "ignore": self.ignore[i]})
            yield colour_jitter(torch.stack(xs), g), ys


class TimeBudget(Callback):
    """Learning rate = linear warm-up then cosine to `final` x peak over `seconds` of wall clock; stop at the end."""

    def __init__(self, seconds: float, *, warmup: float = 0.03, final: float = 0.02):
        self.seconds, self.warmup, self.final = seconds, warmup, final
        self.start = None

    def begin(self, trainer) -> None:
        self.start, self.peak = time.perf_counter(), trainer.config.lr
        self._set(trainer, 0.0)

    def _set(self, trainer, t: float) -> None:
        if t < self.warmup:
            f = 0.05 + 0.95 * t / self.warmup
        else:
            f = self.final + (1 - self.final) * 0.5 * (1 + math.cos(math.pi * (t - self.warmup) / (1 - self.warmup)))
        for group in trainer.optimizer.param_groups:
            group["lr"] = self.peak * f

    def on_batch_end(self, trainer, loss):
        t = (time.perf_counter() - self.start) / self.seconds
        if t >= 1:
            trainer.stop(f"time budget of {self.seconds / 60:.1f} minutes reached")
        self._set(trainer, min(t, 1.0))


class EMA(Callback):
    """Exponential moving average of the weights (and BN statistics); the average is what gets evaluated and kept.
    The decay ramps up from 0 so the early, fast-changing weights are not averaged in for long."""

    def __init__(self, model, *, decay: float = 0.998, ramp: float = 300):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.ramp, self.updates = decay, ramp, 0

    @torch.no_grad()
    def on_batch_end(self, trainer, loss):
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.ramp))
        for e, m in zip(self.module.state_dict().values(), trainer.model.state_dict().values()):
            if e.dtype.is_floating_point:
                e.mul_(d).add_(m.detach(), alpha=1 - d)
            else:
                e.copy_(m)


class BestEMA(Callback):
    """Save the EMA weights as `best.ocula` whenever the monitored validation metric improves."""

    def __init__(self, ema: EMA, path: Path, monitor: str):
        self.ema, self.path, self.monitor, self.best = ema, Path(path), monitor, -math.inf

    def on_epoch_end(self, trainer, logs):
        if logs.get(self.monitor, -math.inf) > self.best:
            self.best = logs[self.monitor]
            trainer.info.metrics = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
            save_model(self.path, self.ema.module, trainer.info)


def detector_loss(model, x, targets):
    """Sum of the detector's training losses (FCOS: focal + GIoU + centerness; Faster R-CNN: RPN + box head)."""
    if is_fcos(model):
        from ocula.models.detection.fcos import FCOSLoss

        ignore = torch.stack([t["ignore"] for t in targets])
        return sum(FCOSLoss(num_classes=model.num_classes, **FCOS_LOSS)(model(x), targets, ignore).values())
    losses = model(list(x.float() / 255.0), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    return sum(losses.values())


def model_info(model_name: str, classes, args: dict, dataset: str) -> ModelInfo:
    return ModelInfo(task="detect", arch=PRESETS[model_name]["arch"], args=args, classes=list(classes),
                     preprocess={"input_size": list(INPUT_SIZE), "channels": 3, "value_max": 255.0,
                                 "score_thresh": SCORE_THRESH, "dataset": dataset})


def default_config(model_name: str, **overrides) -> TrainConfig:
    if model_name not in PRESETS:
        raise OculaError(f"unknown detector {model_name!r}; choose {' or '.join(PRESETS)}")
    settings = dict(epochs=1000, optimizer="adamw", schedule="constant", monitor="val_map50", mode="max",
                    **PRESETS[model_name]["train"])
    settings.update(overrides)
    return TrainConfig(**settings)


def build_detector(model_name: str, num_classes: int, arch_args: dict | None = None,
                   backbone_weights: Path | None = None):
    """A fresh detector and its recorded arguments; optionally with a torchvision ImageNet backbone checkpoint."""
    args = {**(arch_args or PRESETS[model_name]["args"]), "num_classes": num_classes}
    if backbone_weights:
        if model_name != "faster-rcnn":
            raise OculaError(f"--weights loads a torchvision backbone into faster-rcnn, not {model_name}")
        args["norm_layer"] = "batch"  # torchvision checkpoints carry batch-norm statistics
    model = build(PRESETS[model_name]["arch"], **args)
    if backbone_weights:
        from ocula.models.backbones import load_weights

        load_weights(model.backbone.body, backbone_weights, skip_head=True)
    return model, args


def fit(model_name: str, train_set, val_set, config: TrainConfig, *, run_dir: Path, minutes: float,
        steps_per_epoch: int = 50, progress: bool = True, arch_args: dict | None = None, dataset: str = "",
        backbone_weights: Path | None = None):
    """Train for `minutes` of wall clock (or config.epochs epochs of `steps_per_epoch` batches, whichever ends
    first); returns the EMA model of the best validation epoch (or the last one without validation).
    `backbone_weights`: a torchvision ImageNet checkpoint for Faster R-CNN's backbone (its batch norm is then used)."""
    torch.manual_seed(config.seed)
    model, args = build_detector(model_name, len(train_set.classes), arch_args, backbone_weights)
    info = model_info(model_name, train_set.classes, args, dataset)
    batches = DetectionBatches(train_set, batch_size=config.batch_size, steps=steps_per_epoch)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model)
    budget = TimeBudget(minutes * 60)
    evaluate_fn = None
    if val_set is not None:
        val_images, val_targets = zip(*(val_set[i] for i in range(len(val_set))))

        def evaluate_fn(_):
            dets = detect_images(ema.module, list(val_images), size=INPUT_SIZE)
            return summary_of(coco_evaluate(list(val_targets), dets, val_set.classes))

    callbacks = [TerminateOnNaN(), budget, ema, BestEMA(ema, run_dir / "best.ocula", config.monitor),
                 CSVLogger(run_dir / "metrics.csv")]
    trainer = Trainer(model, config, loss_fn=detector_loss, train_batches=batches, evaluate_fn=evaluate_fn,
                      info=info, run_dir=run_dir, callbacks=callbacks, progress=progress)
    budget.begin(trainer)
    history = trainer.fit()
    best = run_dir / "best.ocula"
    if val_set is not None and best.is_file():
        from ocula.modelfile import load_model

        return load_model(best), history
    ema.module.info = info
    return ema.module, history


def train(dataset: str, model_name: str, config: TrainConfig, *, run_dir: Path, minutes: float = 40.0,
          data_dir=None, steps_per_epoch: int | None = None, progress: bool = True,
          backbone_weights: Path | None = None) -> dict:
    """Train on the dataset's train split, select on val, evaluate once on test; fill the run folder."""
    from ocula.data import registry

    run_dir = Path(run_dir)
    steps_per_epoch = steps_per_epoch or PRESETS[model_name]["steps_per_epoch"]
    train_set, val_set, test_set = (registry.load(dataset, s, data_dir) for s in ("train", "val", "test"))
    write_json(run_dir / "config.json", {"task": "detect", "dataset": dataset, "model": model_name,
                                         "minutes": minutes, "steps_per_epoch": steps_per_epoch,
                                         "input_size": list(INPUT_SIZE), "train": asdict(config)})
    start = time.perf_counter()
    model, history = fit(model_name, train_set, val_set, config, run_dir=run_dir, minutes=minutes,
                         steps_per_epoch=steps_per_epoch, progress=progress, dataset=dataset,
                         backbone_weights=backbone_weights)
    nms_scores = tune_nms(model, val_set) if is_fcos(model) else {}  # Faster R-CNN keeps the paper's 0.5
    val_f1 = tune_score_threshold(model, val_set)
    seconds = time.perf_counter() - start
    result = write_evaluation(model, test_set, run_dir, prefix="test-")
    info = model.info
    info.metrics = {**{f"val_{k}": v for k, v in info.metrics.items() if k.startswith("val_")},
                    **{f"test_{k}": v for k, v in summary_of(result).items()}, "train_seconds": round(seconds, 1),
                    "epochs": len(history)}
    save_model(run_dir / "model.ocula", model, info)
    summary = {"dataset": dataset, "model": model_name, **{f"test_{k}": round(v, 4)
               for k, v in summary_of(result).items()}, "train_minutes": round(seconds / 60, 2),
               "epochs": len(history), "nms_thresh": model.info.preprocess.get("nms_thresh"),
               "score_thresh": model.info.preprocess["score_thresh"], "val_f1": round(val_f1, 4),
               "val_map50_per_nms": nms_scores, "model_file": str(run_dir / "model.ocula")}
    write_json(run_dir / "summary.json", summary)
    return summary


# --- prediction ----------------------------------------------------------------------------------------------
def predict_file(model, path, out_dir: Path | None, *, score_thresh: float | None = None) -> dict:
    """Detect cells in one image: drawn PNG (and the JSON result) in `out_dir`, and the count per class."""
    from ocula.data.draw import draw_boxes
    from ocula.data.images import read_image, save_png

    path = Path(path)
    image = read_image(path)
    thresh = model.info.preprocess.get("score_thresh", SCORE_THRESH) if score_thresh is None else score_thresh
    d = detect_images(model, [image], score_thresh=thresh)[0]
    classes = model.info.classes
    counts = {c: int((d["labels"] == k).sum()) for k, c in enumerate(classes)}
    result = {"file": str(path), "counts": counts,
              "detections": [{"class": classes[int(lab)], "score": round(float(s), 4),
                              "box": [round(float(v), 1) for v in b]}
                             for b, s, lab in zip(d["boxes"], d["scores"], d["labels"])]}
    if out_dir is not None:
        out_dir = Path(out_dir)
        result["image"] = str(save_png(draw_boxes(image, d["boxes"], d["labels"], d["scores"], classes),
                                       out_dir / f"{path.stem}-boxes.png"))
        result["json"] = str(write_json(out_dir / f"{path.stem}-boxes.json", result))
    return result


# --- ONNX ------------------------------------------------------------------------------------------------------
def export_onnx(model, path, *, opset: int = 17) -> Path:
    """The FCOS detector with its decoding in the graph: input 'image' float [N, 3, H, W] 0..255 (H, W multiples
    of 32, dynamic), outputs 'boxes' [N, P, 4] and 'scores' [N, P, C]. Class-wise NMS runs after ONNX Runtime
    (`onnx_detect`, ocula's batched NMS), exactly as after torch."""
    if not is_fcos(model):
        raise OculaError(f"ONNX export supports the fcos detector; {model.info.arch} keeps data-dependent proposal "
                         "and NMS loops that are not exported")
    model.eval()
    h, w = model.info.preprocess["input_size"]
    x = torch.rand(1, 3, h, w) * 255
    axes = {0: "batch", 2: "height", 3: "width"}
    with atomic_path(path) as tmp:
        try:
            torch.onnx.export(model, (x,), str(tmp), input_names=["image"], output_names=["boxes", "scores"],
                              dynamic_axes={"image": axes, "boxes": {0: "batch", 1: "cells"},
                                            "scores": {0: "batch", 1: "cells"}}, opset_version=opset, dynamo=False)
        except Exception as e:  # the exporter's errors are long; keep the first line
            raise OculaError(f"ONNX export failed: {str(e).strip().splitlines()[0]}", path) from None
    return Path(path)


def onnx_detect(session, x: torch.Tensor, *, score_thresh: float = 0.05,
                nms_thresh: float = NMS_THRESH) -> list[dict]:
    from ocula.models.detection.fcos import postprocess

    boxes, scores = session.run(None, {"image": x.numpy()})
    return postprocess(torch.from_numpy(boxes), torch.from_numpy(scores), score_thresh=score_thresh,
                       nms_thresh=nms_thresh)


def check_onnx_parity(model, path, x: torch.Tensor | None = None, *, score_thresh: float = 0.3) -> float:
    """Largest box-corner difference (px) between torch and ONNX Runtime, over the decoded boxes of every cell
    and over the detections; raises unless both give the same detections with the same labels."""
    from ocula.export.onnx import onnx_session
    from ocula.models.detection.fcos import postprocess

    if x is None:
        h, w = model.info.preprocess["input_size"]
        x = torch.rand(1, 3, h, w) * 255
    with torch.no_grad():
        boxes, scores = model.eval()(x)
    ort_boxes, ort_scores = (torch.from_numpy(a) for a in onnx_session(path).run(None, {"image": x.numpy()}))
    settings = dict(score_thresh=score_thresh, nms_thresh=nms_threshold(model))
    ref, got = postprocess(boxes, scores, **settings), postprocess(ort_boxes, ort_scores, **settings)
    worst = float((boxes - ort_boxes).abs().max())
    for a, b in zip(ref, got):
        if len(a["labels"]) != len(b["labels"]) or not torch.equal(a["labels"], b["labels"]):
            raise OculaError("ONNX Runtime detections differ from torch", path)
        if len(a["boxes"]):
            worst = max(worst, float((a["boxes"] - b["boxes"]).abs().max()))
    return worst
