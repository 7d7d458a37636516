"""Detection: the task protocol (see `ocula.tasks`) for box datasets (BCCD, or a VOC / COCO / YOLO folder):
train, evaluate with COCO mAP, predict, draw and count, export.

Two detectors share one face here: "fcos" (ocula's one-stage anchor-free CSP/PAN detector) and "faster-rcnn"
(two-stage, on the same CSP/PAN features; ResNet-18 + FPN with `--weights`). Both run at the model's recorded
`input_size` (multiples of 32): an image is resized to fit it (aspect kept), padded with grey to it, and the boxes
are scaled back to the image's pixels.

Training follows a budget of wall-clock minutes or of steps (the engine's LearningRateBudget: warm-up + cosine
over the budget), and the best validation checkpoint of the weights' exponential moving average is the result.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ocula.data.box_transforms import augment, colour_jitter
from ocula.data.images import as_rgb
from ocula.engine.callbacks import EMA, CSVLogger, LearningRateBudget, ModelCheckpoint, TerminateOnNaN
from ocula.engine.device import device_of
from ocula.engine.trainer import TrainConfig, Trainer
from ocula.errors import OculaError
from ocula.fileio import write_json
from ocula.modelfile import ModelInfo
from ocula.models import build

DIVISOR = 32
PAD_VALUE = 114.0  # grey, the fill of training crops that reach past the image
# Per detector: architecture arguments (num_classes added), training defaults and batches between validations.
# Faster R-CNN shares fcos's CSP backbone, PAN neck and bf16 recipe: in side-by-side 5-minute val trials it reached
# mAP@.5 0.867 where ResNet-18 + FPN with GroupNorm in float32 reached 0.428 (6x the images/s; benchmarks/RESULTS.md).
# Anchors of 32/64/128 px on strides 8/16/32 span BCCD's cells at 0.8x (platelets ~24 px, WBCs ~150 px).
RCNN_PROPOSALS = dict(rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=1000, rpn_pre_nms_top_n_test=1000,
                      rpn_post_nms_top_n_test=300, box_batch_size_per_image=256, box_detections_per_img=150)
PRESETS = {
    "fcos": dict(arch="fcos", args=dict(widths=[16, 32, 64, 128, 256], depths=[1, 2, 2, 1], neck_width=64),
                 train=dict(batch_size=8, lr=2e-3, weight_decay=0.05, bf16=True, channels_last=True),
                 steps_per_epoch=100),
    "faster-rcnn": dict(arch="faster-rcnn",
                        args=dict(backbone="csp-pan", widths=[16, 32, 64, 128, 256], depths=[1, 2, 2, 1],
                                  fpn_width=64, anchor_sizes=[[32], [64], [128]], roi_aligned=True,
                                  **RCNN_PROPOSALS),
                        train=dict(batch_size=8, lr=2e-3, weight_decay=0.05, bf16=True, channels_last=True),
                        steps_per_epoch=100),
}
# `--weights` loads torchvision's ResNet-18: Faster R-CNN then takes that backbone with an FPN (P2..P5).
RESNET_RCNN_ARGS = dict(backbone="resnet18", norm_layer="batch", fpn_width=128, **RCNN_PROPOSALS)
MODELS = tuple(PRESETS)
OPTIONS = dict(minutes=40.0, steps_per_epoch=None, weights=None, input_size=None, ignore_missing=None,
               val_fraction=0.1)
FCOS_LOSS = dict(radius=1.5, quality=True)  # quality focal loss: +0.02 val mAP@.5 in 6-minute trials
# Per dataset: the (h, w) images are resized to, and whether a class missing from an image that nearly all
# images show is treated as unlabelled rather than absent (`ignored_classes`). BCCD's 480 x 640 smears go to
# 0.8x (platelets stay ~24 px), and a BCCD smear without a labelled RBC has unlabelled RBCs (a known defect).
DATASETS = {"bccd": dict(input_size=(384, 512), ignore_missing=True)}
MAX_SIDE = 640  # other datasets: the typical image, scaled down to this long side, in multiples of 32
SCORE_THRESH = 0.4  # drawn / counted detections; evaluation uses every detection above 0.05
NMS_THRESH = 0.6  # FCOS's class-wise NMS IoU unless the model file records one tuned on validation


# --- running a detector at its input size ------------------------------------------------------------------
def default_input_size(data) -> tuple[int, int]:
    """The median image size of `data`, shrunk to at most MAX_SIDE on the long side, rounded to multiples of 32."""
    h = float(np.median([r.height for r in data.records]))
    w = float(np.median([r.width for r in data.records]))
    s = min(1.0, MAX_SIDE / max(h, w))
    return max(DIVISOR, round(h * s / DIVISOR) * DIVISOR), max(DIVISOR, round(w * s / DIVISOR) * DIVISOR)


def letterbox(image: np.ndarray, size) -> tuple[torch.Tensor, float]:
    """uint8 HxWx3 -> float [3, *size] 0..255: fitted into `size` (aspect kept) and padded to it, and the scale.
    Resampling and padding match the training crops (plain bilinear, grey fill); every image becomes the same
    tensor whatever else is in its batch."""
    h, w = image.shape[:2]
    s = min(size[0] / h, size[1] / w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None]
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
    return F.pad(x[0], (0, size[1] - nw, 0, size[0] - nh), value=PAD_VALUE), s


def is_fcos(model) -> bool:
    return model.info.arch == "fcos" if hasattr(model, "info") else hasattr(model, "heads")


@torch.no_grad()
def detect_tensor(model, x: torch.Tensor, *, score_thresh: float = 0.05, nms_thresh: float | None = None) -> list[dict]:
    """Detections for a float batch [N, 3, H, W] (0..255, already at the model's size), in its pixels, on the
    CPU. FCOS runs its class-wise NMS at `nms_thresh` (default: the model file's)."""
    from ocula.models.detection.fcos import postprocess

    model.eval()
    x = x.to(device_of(model))
    if is_fcos(model):
        boxes, scores = model(x)
        dets = postprocess(boxes.float(), scores.float(), score_thresh=score_thresh,
                           nms_thresh=nms_threshold(model) if nms_thresh is None else nms_thresh)
    elif hasattr(model, "session"):  # RCNNGraph in ONNX Runtime: one image a run, its thresholds baked in
        dets = []
        for image in x:
            boxes, scores, labels = model(image[None])
            keep = scores > score_thresh  # as RoIHeads keeps them
            dets.append({"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]})
    else:
        model.roi_heads.score_thresh = score_thresh
        info = getattr(model, "info", None)
        if info and "nms_thresh" in info.preprocess:
            model.roi_heads.nms_thresh = info.preprocess["nms_thresh"]
        dets = model(list(x / 255.0))
    return [{k: v.cpu() for k, v in d.items()} for d in dets]


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
    from ocula.data.boxes import box_iou_np

    tp = fp = fn = 0
    for t, d in zip(targets, detections):
        keep = d["scores"] >= thresh
        boxes, labels = d["boxes"][keep], d["labels"][keep]
        order = np.argsort(-d["scores"][keep])
        overlap = box_iou_np(boxes[order], t["boxes"])
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
    """Pick FCOS's class-wise NMS IoU threshold by mAP@.5 on `data` (a validation split: overlapping RBCs make it
    matter) and record it in the model's preprocessing; returns {threshold: mAP@.5}. The network runs once: only
    the NMS is repeated per threshold."""
    images, targets = zip(*(data[i] for i in range(len(data))))
    outputs = _network_outputs(model, list(images))
    scores = {t: coco_evaluate(list(targets), _to_image_pixels(outputs, list(images), nms_thresh=t),
                               data.classes)["map50"] for t in candidates}
    model.info.preprocess["nms_thresh"] = max(scores, key=scores.get)
    return scores


def _batches(images: list[np.ndarray], size, batch_size: int):
    """Letterboxed batches [B, 3, *size] with their scales."""
    for i in range(0, len(images), batch_size):
        chunk = [letterbox(im, size) for im in images[i:i + batch_size]]
        yield torch.stack([x for x, _ in chunk]), [s for _, s in chunk]


def _network_outputs(model, images: list[np.ndarray], batch_size: int = 8) -> list[tuple]:
    """FCOS's decoded cells (boxes [P, 4], scores [P, C]) and letterbox scale per image, before NMS, on the CPU."""
    out = []
    with torch.no_grad():
        for x, scales in _batches(images, model.info.preprocess["input_size"], batch_size):
            boxes, scores = model.eval()(x.to(device_of(model)))
            out += [(b.float().cpu(), c.float().cpu(), s) for b, c, s in zip(boxes, scores, scales)]
    return out


def _in_image(d: dict, scale: float, image: np.ndarray) -> dict:
    """Boxes from the letterboxed input back to the image's own pixels, clipped to it; numpy arrays."""
    boxes = (d["boxes"] / scale).numpy()
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, image.shape[1])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, image.shape[0])
    return {"boxes": boxes, "scores": d["scores"].numpy(), "labels": d["labels"].numpy()}


def _to_image_pixels(outputs, images, *, score_thresh: float = 0.05, nms_thresh: float = NMS_THRESH) -> list[dict]:
    from ocula.models.detection.fcos import postprocess

    return [_in_image(postprocess(b[None], c[None], score_thresh=score_thresh, nms_thresh=nms_thresh)[0], s, im)
            for (b, c, s), im in zip(outputs, images)]


def detect_images(model, images: list[np.ndarray], *, score_thresh: float = 0.05, batch_size: int = 8) -> list[dict]:
    """Per image {boxes (image pixels), scores, labels} as numpy arrays."""
    results = []
    for start, (x, scales) in zip(range(0, len(images), batch_size),
                                  _batches(images, model.info.preprocess["input_size"], batch_size)):
        dets = detect_tensor(model, x, score_thresh=score_thresh)
        results += [_in_image(d, s, im) for d, s, im in zip(dets, scales, images[start:start + batch_size])]
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


def show(data, n: int, path: Path) -> Path:
    """A sheet of `n` images with their boxes drawn."""
    from ocula.data.draw import draw_samples
    from ocula.data.images import save_png

    return save_png(draw_samples(data, n), path)


def evaluate(model, data, out_dir: Path | None = None) -> dict:
    """COCO mAP, mAP@.5 and AP@.5 per class; with `out_dir`, also eval.json, PR curves and drawn predictions."""
    if out_dir is not None:
        return write_evaluation(model, data, out_dir)
    images, targets = zip(*(data[i] for i in range(len(data))))
    return coco_evaluate(list(targets), detect_images(model, list(images)), data.classes)


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
    """`steps` random batches of augmented crops per epoch, drawn from images held in memory. With
    `ignore_missing`, classes an image lacks but nearly all images show count as unlabelled (`ignored_classes`)."""

    def __init__(self, data, *, batch_size: int, steps: int, size, ignore_missing: bool = False,
                 scale=(0.6, 1.0)):
        self.images = [torch.from_numpy(np.array(data[i][0])).permute(2, 0, 1) for i in range(len(data))]
        self.targets = [data.target(i) for i in range(len(data))]
        self.ignore = ignored_classes(self.targets, len(data.classes)) if ignore_missing else \
            torch.zeros(len(data), len(data.classes), dtype=torch.bool)
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


def detector_loss(model, x, targets):
    """Sum of the detector's training losses (FCOS: focal + GIoU + centerness; Faster R-CNN: RPN + box head).
    `model` may be wrapped (DistributedDataParallel): the detector inside decides which loss applies."""
    detector = getattr(model, "module", model)
    if is_fcos(detector):
        from ocula.models.detection.fcos import FCOSLoss

        ignore = torch.stack([t["ignore"] for t in targets])
        return sum(FCOSLoss(num_classes=detector.num_classes, **FCOS_LOSS)(model(x), targets, ignore).values())
    losses = model(list(x.float() / 255.0), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    return sum(losses.values())


def model_info(model_name: str, classes, args: dict, dataset: str, input_size) -> ModelInfo:
    return ModelInfo(task="detect", arch=PRESETS[model_name]["arch"], args=args, classes=list(classes),
                     preprocess={"input_size": list(input_size), "channels": 3, "value_max": 255.0,
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
    """A fresh detector and its recorded arguments; optionally with a torchvision ImageNet backbone checkpoint,
    whose batch norm is then frozen (its statistics are better than any a batch of 4 could estimate)."""
    if backbone_weights and model_name != "faster-rcnn":
        raise OculaError(f"--weights loads a torchvision backbone into faster-rcnn, not {model_name}")
    default = RESNET_RCNN_ARGS if backbone_weights else PRESETS[model_name]["args"]
    args = {**(arch_args or default), "num_classes": num_classes}
    if backbone_weights:
        args["norm_layer"] = "batch"  # torchvision checkpoints carry batch-norm statistics
    model = build(PRESETS[model_name]["arch"], **args)
    if backbone_weights:
        from ocula.models.backbones import load_weights
        from ocula.models.backbones.norms import freeze_batch_norm

        load_weights(model.backbone.body, backbone_weights, skip_head=True)
        freeze_batch_norm(model.backbone.body)
    return model, args


def fit(model_name: str, train_set, val_set, config: TrainConfig, *, run_dir: Path, minutes: float | None,
        steps_per_epoch: int = 50, input_size=(512, 512), ignore_missing: bool = False, progress: bool = True,
        resume: bool = False, arch_args: dict | None = None, dataset: str = "",
        backbone_weights: Path | None = None):
    """Train for `minutes` of wall clock or config.epochs epochs of `steps_per_epoch` batches, whichever ends first
    (minutes=None: the steps alone, exactly repeatable); returns (the EMA model of the best validation epoch, or
    the last one without validation, history)."""
    from ocula.engine.device import runtime

    if config.ema:
        raise OculaError("detection always keeps its own moving average of the weights (decay 0.998); --ema is "
                         "for classify and segment")
    with runtime(seed=config.seed):  # the same initial weights for the same seed, global RNG left alone
        model, args = build_detector(model_name, len(train_set.classes), arch_args, backbone_weights)
    info = model_info(model_name, train_set.classes, args, dataset, input_size)
    batches = DetectionBatches(train_set, batch_size=config.batch_size, steps=steps_per_epoch, size=input_size,
                               ignore_missing=ignore_missing)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = EMA(model)
    ema.module.info = info
    evaluate_fn = None
    if val_set is not None:
        val_images, val_targets = zip(*(val_set[i] for i in range(len(val_set))))

        def evaluate_fn(_):
            return summary_of(coco_evaluate(list(val_targets), detect_images(ema.module, list(val_images)),
                                            val_set.classes))

    budget = LearningRateBudget(seconds=minutes * 60 if minutes else None, steps=config.epochs * steps_per_epoch)
    callbacks = [TerminateOnNaN(), budget, ema, ModelCheckpoint(run_dir / "best.ocula", config.monitor, "max", ema),
                 CSVLogger(run_dir / "metrics.csv")]
    trainer = Trainer(model, config, loss_fn=detector_loss, train_batches=batches, evaluate_fn=evaluate_fn,
                      info=info, run_dir=run_dir, callbacks=callbacks, progress=progress)
    history = trainer.fit(resume=resume)
    best = run_dir / "best.ocula"
    if val_set is not None and best.is_file():
        from ocula.modelfile import load_model

        return load_model(best, device=config.device), history
    return ema.module, history


def load_data(data: str, split: str, data_dir=None):
    from ocula.data.layout import open_dataset

    return open_dataset(data, split, data_dir)


def _train_val_test(data: str, data_dir, val_fraction: float, seed: int):
    """The dataset's own train / val / test splits; a folder without them is split into train and a seeded
    `val_fraction` hold-out (no test)."""
    from ocula.data.layout import splits

    have = splits(data, data_dir)
    if "train" in have:
        train_set = load_data(data, "train", data_dir)
        val_set = load_data(data, "val", data_dir) if "val" in have else None
    else:
        train_set, val_set = load_data(data, have[0], data_dir), None
    if val_set is None and val_fraction > 0 and len(train_set) > 1:
        order = np.random.default_rng(seed).permutation(len(train_set))
        n_val = max(1, round(val_fraction * len(train_set)))
        train_set, val_set = train_set.subset(np.sort(order[n_val:])), train_set.subset(np.sort(order[:n_val]))
    return train_set, val_set, load_data(data, "test", data_dir) if "test" in have else None


def train(data: str, model_name: str, config: TrainConfig, *, run_dir: Path, data_dir=None, resume: bool = False,
          progress: bool = True, minutes: float | None = 40.0, steps_per_epoch: int | None = None,
          weights: str | None = None, input_size=None, ignore_missing: bool | None = None, val_fraction: float = 0.1):
    """Train on the train split, select on val (tuning FCOS's NMS and the drawing threshold there), evaluate once
    on test when the dataset has one. Returns (model, summary)."""
    run_dir = Path(run_dir)
    setup = DATASETS.get(data, {})
    steps_per_epoch = steps_per_epoch or PRESETS[model_name]["steps_per_epoch"]
    train_set, val_set, test_set = _train_val_test(data, data_dir, val_fraction, config.seed)
    input_size = tuple(input_size or setup.get("input_size") or default_input_size(train_set))
    if len(input_size) != 2 or any(v <= 0 or v % DIVISOR for v in input_size):
        raise OculaError(f"input_size must be a height and width in multiples of {DIVISOR}, got {list(input_size)}")
    ignore_missing = setup.get("ignore_missing", False) if ignore_missing is None else ignore_missing
    model, history = fit(model_name, train_set, val_set, config, run_dir=run_dir, minutes=minutes,
                         steps_per_epoch=steps_per_epoch, input_size=input_size, ignore_missing=ignore_missing,
                         progress=progress, resume=resume, dataset=data,
                         backbone_weights=Path(weights) if weights else None)
    summary = {"epochs": len(history), "input_size": list(input_size)}
    if val_set is not None:
        summary["val_map50_per_nms"] = tune_nms(model, val_set) if is_fcos(model) else {}  # R-CNN keeps 0.5
        summary["val_f1"] = round(tune_score_threshold(model, val_set), 4)
    summary.update(nms_thresh=model.info.preprocess.get("nms_thresh"),
                   score_thresh=model.info.preprocess["score_thresh"])
    if test_set is not None:
        result = write_evaluation(model, test_set, run_dir, prefix="test-")
        summary.update({f"test_{k}": round(v, 4) for k, v in summary_of(result).items()})
    model.info.metrics = {**{k: v for k, v in model.info.metrics.items() if k.startswith("val_")},
                          **{k: v for k, v in summary.items() if k.startswith("test_")}}
    return model, summary


# --- prediction ----------------------------------------------------------------------------------------------
@dataclass
class Detections:
    """One image's answer: boxes (xyxy, image pixels), scores and labels of the detections above the threshold."""

    source: str
    image: np.ndarray  # the RGB input, for drawing
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    classes: list[str]

    @property
    def counts(self) -> dict[str, int]:
        return {c: int((self.labels == k).sum()) for k, c in enumerate(self.classes)}

    def describe(self) -> str:
        return f"{self.source}: " + ", ".join(f"{c} {n}" for c, n in self.counts.items())

    def to_json(self) -> dict:
        return {"file": self.source, "counts": self.counts,
                "detections": [{"class": self.classes[int(lab)], "score": round(float(s), 4),
                                "box": [round(float(v), 1) for v in b]}
                               for b, s, lab in zip(self.boxes, self.scores, self.labels)]}

    def save(self, out_dir: Path, stem: str) -> dict:
        """STEM-boxes.png (the boxes drawn) and STEM-boxes.json in `out_dir`."""
        from ocula.data.draw import draw_boxes
        from ocula.data.images import save_png

        image = save_png(draw_boxes(self.image, self.boxes, self.labels, self.scores, self.classes),
                         Path(out_dir) / f"{stem}-boxes.png")
        return {"image": str(image), "json": str(write_json(Path(out_dir) / f"{stem}-boxes.json", self.to_json()))}


def predict(model, images: list[np.ndarray], sources: list[str], *, batch_size: int = 8,
            score_thresh: float | None = None) -> list[Detections]:
    """Detect objects in RGB images of any size; `score_thresh` overrides the model file's (tuned on val)."""
    thresh = model.info.preprocess.get("score_thresh", SCORE_THRESH) if score_thresh is None else score_thresh
    images = [as_rgb(im) for im in images]
    dets = detect_images(model, images, score_thresh=thresh, batch_size=batch_size)
    return [Detections(src, im, d["boxes"], d["scores"], d["labels"], list(model.info.classes))
            for src, im, d in zip(sources, images, dets)]


def calibration_inputs(model, data: str, data_dir, n: int, seed: int) -> list[np.ndarray]:
    """A seeded sample of `n` training images letterboxed to the model's input, for int8 calibration."""
    from ocula.compression.quantize import sample

    dataset = load_data(data, "train", data_dir)
    size = model.info.preprocess["input_size"]
    return [letterbox(dataset[int(i)][0], size)[0][None].numpy() for i in np.sort(sample(len(dataset), n, seed))]


# --- ONNX ------------------------------------------------------------------------------------------------------
def export(model, fmt: str, path: Path) -> str:
    """ONNX with the model file's info in its metadata (`ocula.load` reads it). FCOS: input 'image' float
    [N, 3, H, W] 0..255 (H, W multiples of 32, dynamic), outputs 'boxes' [N, P, 4] and 'scores' [N, P, C], decoding
    in the graph and class-wise NMS after ONNX Runtime, as after torch. Faster R-CNN: the whole detector, NMS
    included (`RCNNGraph`): input 'image' [1, 3, H, W] at the model's input size, outputs 'boxes' [D, 4], 'scores'
    [D], 'labels' [D] above the evaluation threshold 0.05. The check compares torch's and ORT's detections."""
    from ocula.export.onnx import write_info

    if fmt != "onnx":
        raise OculaError(f"detection models export to ONNX only, not {fmt}")
    h, w = model.info.preprocess["input_size"]
    x = torch.rand(1, 3, h, w) * 255
    if is_fcos(model):
        out, note = _export_fcos(model, path, x)
    else:
        out, note = _export_rcnn(model, path, x)
    write_info(out, model.info)
    return f"{out} (ONNX Runtime vs torch: {note})"


def _export_fcos(model, path: Path, x: torch.Tensor) -> tuple[Path, str]:
    from ocula.export.onnx import check_parity, export_onnx, onnx_session, run_onnx
    from ocula.models.detection.fcos import postprocess

    out = export_onnx(model, path, outputs=("boxes", "scores"), dynamic_hw=True)
    diff = check_parity(model, out, x)
    settings = dict(score_thresh=0.3, nms_thresh=nms_threshold(model))
    with torch.no_grad():
        ref = postprocess(*model(x), **settings)
    got = postprocess(*(torch.from_numpy(a) for a in run_onnx(onnx_session(out), x)), **settings)
    if any(detection_gap(a, b, min_score=settings["score_thresh"]) is None for a, b in zip(ref, got)):
        raise OculaError("ONNX Runtime detections differ from torch", out)
    return out, f"same detections, outputs within {diff:.2e}; NMS runs after ORT"


def _export_rcnn(model, path: Path, x: torch.Tensor) -> tuple[Path, str]:
    from ocula.export.onnx import export_onnx, onnx_session, run_onnx
    from ocula.models.detection.rcnn_graph import RCNNGraph

    detect_tensor(model, x, score_thresh=0.05)  # sets the thresholds the graph bakes in
    graph = RCNNGraph(model, tuple(x.shape[-2:]))
    with warnings.catch_warnings():  # the tracer says sizes become constants: the graph is for this input size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        out = export_onnx(graph, path, outputs=("boxes", "scores", "labels"), example=x, input_name="image",
                          axes={name: {0: "detections"} for name in ("boxes", "scores", "labels")})
    with torch.no_grad():
        ref = dict(zip(("boxes", "scores", "labels"), graph(x)))
    got = dict(zip(ref, (torch.from_numpy(a) for a in run_onnx(onnx_session(out), x))))
    found = ref["scores"][ref["scores"] >= 0.3]
    if len(found) > 1 and found.max() - found.min() < 0.01:
        # An untrained head scores every RoI alike, and which of tied detections NMS keeps is arbitrary.
        return out, f"{len(found)} detections tied at score {float(found.max()):.3f}, not compared; NMS in the graph"
    gap = detection_gap(ref, got, min_score=0.3)
    if gap is None:
        raise OculaError("ONNX Runtime detections differ from torch", out)
    return out, (f"the same {len(found)} detections above 0.3 on a random image, boxes within {gap:.2e} px; "
                 "NMS in the graph")


def detection_gap(a: dict, b: dict, *, min_score: float) -> float | None:
    """Largest box difference (px) between two detection sets above `min_score`, compared as sets (near-equal
    scores may come in another order); None when they hold different labels."""
    a, b = ({k: np.asarray(d[k])[np.asarray(d["scores"]) >= min_score] for k in ("boxes", "scores", "labels")}
            for d in (a, b))
    ia, ib = np.lexsort((*a["boxes"].T, a["labels"])), np.lexsort((*b["boxes"].T, b["labels"]))
    if not np.array_equal(a["labels"][ia], b["labels"][ib]):
        return None
    return float(np.abs(a["boxes"][ia] - b["boxes"][ib]).max(initial=0.0))
