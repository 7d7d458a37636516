"""Recognition by nearest neighbours: the task protocol (see `ocula.tasks`) for a gallery recogniser, an
embedding network plus labelled reference images (`ocula.index.recognizer`). New classes need no training: embed
their images into the gallery. Its output reads like a classifier's, so prediction, evaluation and export are
the classification task's own.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ocula.data.classification import ImageSet
from ocula.engine.trainer import TrainConfig
from ocula.errors import OculaError
from ocula.index.recognizer import RULES, GalleryRecognizer
from ocula.modelfile import ModelInfo
from ocula.tasks.classify import evaluate, export, load_data, predict, show, write_evaluation
from ocula.tasks.embed import embed

MODELS = RULES
OPTIONS = dict(embedder=None, k=5, normalize=True)


def default_config(model_name: str, **overrides) -> TrainConfig:
    if model_name not in MODELS:
        raise OculaError(f"unknown recognition rule {model_name!r}; choose one of {', '.join(MODELS)}")
    return TrainConfig(**overrides)


def build_recognizer(embedder, gallery: ImageSet, rule: str = "1nn", *, k: int = 5, normalize: bool = True,
                     batch_size: int = 256) -> GalleryRecognizer:
    """A recogniser whose references are `gallery`'s images, embedded by `embedder` (a loaded model)."""
    if rule not in RULES:
        raise OculaError(f"unknown recognition rule {rule!r}; choose one of {', '.join(RULES)}")
    vectors = embed(embedder, gallery.images, batch_size=batch_size, normalize=normalize)
    info = embedder.info
    return _assemble({"arch": info.arch, "args": info.args}, embedder, info.preprocess, vectors, gallery.labels,
                     list(gallery.classes), rule=rule, k=k, normalize=normalize, dataset=gallery.name,
                     extra={"embedder_dataset": info.preprocess.get("dataset")})


def add_references(model: GalleryRecognizer, images: ImageSet, *, batch_size: int = 256) -> GalleryRecognizer:
    """A new recogniser: `model`'s references plus `images`' (classes it did not know are appended to its
    classes). Nothing is trained: the new images go through the same embedder."""
    info = model.info
    if info.task != "recognize":
        raise OculaError(f"references can only be added to a recogniser (task recognize), not a {info.task} model")
    vectors = embed(model, images.images, batch_size=batch_size, normalize=model.normalize)
    classes = list(info.classes) + [c for c in images.classes if c not in info.classes]
    new_labels = np.array([classes.index(images.classes[i]) for i in images.labels], np.int64)
    preprocess = {k: v for k, v in info.preprocess.items() if k not in ("scores", "dataset")}
    return _assemble(info.args["embedder"], model.embedder, preprocess,
                     np.concatenate([model.gallery.cpu().numpy(), vectors]),
                     np.concatenate([model.labels.cpu().numpy(), new_labels]), classes, rule=model.rule, k=model.k,
                     normalize=model.normalize, dataset=f"{info.preprocess.get('dataset')}+{images.name}",
                     extra=info.extra)


def _assemble(spec: dict, embedder, preprocess: dict, vectors: np.ndarray, labels: np.ndarray, classes: list[str],
              *, rule: str, k: int, normalize: bool, dataset: str, extra: dict) -> GalleryRecognizer:
    """The recogniser module and its ModelInfo: `embedder`'s weights, the reference vectors and their labels."""
    from ocula.engine.device import device_of
    from ocula.index import build_index

    args = {"embedder": spec, "size": len(vectors), "dim": vectors.shape[1], "num_classes": len(classes),
            "rule": rule, "k": k, "normalize": normalize, "temperature": _temperature(vectors, build_index)}
    model = GalleryRecognizer(**args)
    model.embedder.load_state_dict(embedder.state_dict())
    model.gallery.copy_(torch.from_numpy(vectors))
    model.labels.copy_(torch.from_numpy(labels.astype(np.int64)))
    model.to(device_of(embedder)).eval()
    model.info = ModelInfo(task="recognize", arch="gallery-recognizer", args=args, classes=classes,
                           preprocess={**preprocess, "scores": "votes", "dataset": dataset}, extra=dict(extra))
    return model


def train_embedder(train: ImageSet, config: TrainConfig, *, scale: float = 16.0, widths=(32, 64, 128),
                   augment: dict | None = None, run_dir: Path | None = None, progress: bool = True):
    """A cnn trained with a normalised softmax (NormFace / cosine classifier): logits = scale * cos(feature,
    class weight), so the penultimate features of one class gather around a direction, and unit embeddings of
    classes never seen in training are compared by angle. The result is an ordinary 'cnn' classifier file."""
    import torch.nn.functional as F

    from ocula.engine.batches import ArrayBatches, random_affine
    from ocula.engine.device import runtime
    from ocula.engine.trainer import Trainer
    from ocula.models import build
    from ocula.tasks.classify import cnn_args, model_info, to_tensor

    args = cnn_args(train, widths=list(widths))
    with runtime(seed=config.seed):
        model = build("cnn", **args)
    info = model_info(train, "cnn", args)
    params = augment or dict(shift=0.08, rotate=10, scale=0.1)

    def loss_fn(m, x, y):
        f = F.normalize(m.penultimate(x).float(), dim=1)
        w = F.normalize(m.head[-1].weight, dim=1)
        return F.cross_entropy(scale * f @ w.T, y, label_smoothing=config.label_smoothing)

    batches = ArrayBatches(to_tensor(train.images), torch.from_numpy(train.labels.astype(np.int64)),
                           config.batch_size, augment=lambda x, g: random_affine(x, g, **params), drop_last=True)
    trainer = Trainer(model, config, loss_fn=loss_fn, train_batches=batches, info=info, run_dir=run_dir,
                      progress=progress)
    trainer.fit()
    trainer.kept_model.info = info
    return trainer.kept_model.eval()


def _temperature(vectors: np.ndarray, build_index) -> float:
    """Median squared distance from a reference to its nearest other reference: the scale of 'near'."""
    if len(vectors) < 2:
        return 1.0
    d = build_index(vectors, "brute").search(vectors, k=2)[0][:, 1]
    return float(max(np.median(d), 1e-6))


def train(data: str, model_name: str, config: TrainConfig, *, run_dir: Path, data_dir=None, resume: bool = False,
          progress: bool = True, embedder: str | None = None, k: int = 5, normalize: bool = True):
    """'Training' is embedding the train split as the gallery; scored on the test split when there is one."""
    from ocula.data.layout import splits
    from ocula.modelfile import load_model

    if not embedder:
        raise OculaError("recognition needs an embedder: a classifier model file (option embedder)")
    model = build_recognizer(load_model(embedder, device=config.device or "cpu"),
                             load_data(data, "train", data_dir), model_name, k=k, normalize=normalize)
    model.info.preprocess["dataset"] = data
    summary = {}
    if "test" in splits(data, data_dir):
        size = tuple(model.info.preprocess["input_size"])
        summary["test_accuracy"] = write_evaluation(model, load_data(data, "test", data_dir, size), run_dir,
                                                    prefix="test-")["accuracy"]
    model.info.metrics = dict(summary)
    return model, summary


__all__ = ["MODELS", "OPTIONS", "add_references", "build_recognizer", "default_config", "evaluate", "export",
           "load_data", "predict", "show", "train", "train_embedder"]
