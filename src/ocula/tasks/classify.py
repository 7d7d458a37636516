"""Classification: build, train, evaluate and run classifiers on grayscale image sets (digits, MNIST, ...)."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ocula.data.classification import ImageSet
from ocula.engine.batches import ArrayBatches, random_affine
from ocula.engine.trainer import TrainConfig, Trainer
from ocula.fileio import write_json
from ocula.modelfile import ModelInfo, save_model
from ocula.models import build
from ocula.models.classifiers import RBFSVC

CNN_WIDTHS = [32, 64, 128]  # default stage widths; benchmarks pass narrower ones for MNIST speed
# Augmentation strength per input size (8x8 digits tolerate less shift than 28x28).
AUGMENT = {8: dict(shift=0.08, rotate=8, scale=0.08), 28: dict(shift=0.1, rotate=10, scale=0.1)}
# Clothes are photographed upright and mirror-symmetric: flips help, rotations do not.
DATASET_AUGMENT = {"fashion-mnist": dict(shift=0.08, rotate=0, scale=0.05, hflip=True)}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[N, H, W] in the native value range -> float32 [N, 1, H, W] (models normalise internally)."""
    return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).unsqueeze(1)


def model_info(data: ImageSet, arch: str, args: dict) -> ModelInfo:
    h, w = data.images.shape[1:]
    return ModelInfo(task="classify", arch=arch, args=args, classes=list(data.classes),
                     preprocess={"input_size": [h, w], "channels": 1, "value_max": data.value_max,
                                 "style": "digits" if data.value_max == 16 else "mnist",
                                 "scores": "votes" if arch == "svc" else "logits", "dataset": data.name})


def fit_svc(train: ImageSet, *, gamma: float = 0.001, C: float = 1.0):
    """The source document's SVC (gamma=0.001), fitted by scikit-learn, returned as an exact torch module."""
    from sklearn.svm import SVC

    svc = SVC(gamma=gamma, C=C).fit(train.images.reshape(len(train), -1), train.labels)
    model = RBFSVC.from_sklearn(svc).eval()
    return model, model_info(train, "svc", {"n_features": model.n_features, "n_support": model.n_support,
                                            "gamma": model.gamma})


def tune_svc(train: ImageSet, *, folds: int = 5, seed: int = 0):
    """Grid search over C and gamma by stratified k-fold CV on the training split only."""
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.svm import SVC

    grid = {"C": [1, 3, 10, 30], "gamma": [0.0003, 0.001, 0.002, 0.004]}
    search = GridSearchCV(SVC(), grid, cv=StratifiedKFold(folds, shuffle=True, random_state=seed), n_jobs=1)
    search.fit(train.images.reshape(len(train), -1), train.labels)
    return search.best_params_


def cnn_args(train: ImageSet, **overrides) -> dict:
    x = train.images.astype(np.float64) / train.value_max
    args = dict(num_classes=len(train.classes), in_channels=1, value_max=train.value_max,
                mean=round(float(x.mean()), 4), std=round(float(x.std()), 4),
                widths=CNN_WIDTHS)
    args.update(overrides)
    return args


def split_validation(data: ImageSet, fraction: float, seed: int):
    """A stratified, seeded hold-out from the training split, for checkpoint selection and early stopping."""
    if fraction <= 0:
        return data, None
    from sklearn.model_selection import train_test_split

    tr, va = train_test_split(np.arange(len(data)), test_size=fraction, random_state=seed, stratify=data.labels)
    return data.subset(tr), data.subset(va)


def train_cnn(train: ImageSet, config: TrainConfig, *, val: ImageSet | None = None, run_dir: Path | None = None,
              resume: bool = False, progress: bool = True, augment: bool = True, arch_args: dict | None = None):
    """Train the CNN with the shared engine; returns (model, info, history)."""
    torch.manual_seed(config.seed)
    args = arch_args or cnn_args(train)
    model = build("cnn", **args)
    info = model_info(train, "cnn", args)
    size = train.images.shape[1]
    params = DATASET_AUGMENT.get(train.name) or AUGMENT.get(size, AUGMENT[28])
    aug = (lambda x, g: random_affine(x, g, **params)) if augment else None
    batches = ArrayBatches(to_tensor(train.images), torch.from_numpy(train.labels), config.batch_size,
                           augment=aug, drop_last=len(train) > config.batch_size)

    def loss_fn(m, x, y):
        return F.cross_entropy(m(x), y, label_smoothing=config.label_smoothing)

    evaluate_fn = None
    if val is not None:
        vx, vy = to_tensor(val.images), torch.from_numpy(val.labels)

        def evaluate_fn(m):
            logits = batched_forward(m, vx)
            return {"loss": float(F.cross_entropy(logits, vy)), "accuracy": float((logits.argmax(1) == vy).float().mean())}

    trainer = Trainer(model, config, loss_fn=loss_fn, train_batches=batches, evaluate_fn=evaluate_fn, info=info,
                      run_dir=run_dir, progress=progress)
    history = trainer.fit(resume=resume)
    return trainer.model, info, history


@torch.no_grad()
def batched_forward(model, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def scores_to_probabilities(scores: torch.Tensor, kind: str) -> torch.Tensor:
    """Logits -> softmax; SVC votes -> share of the one-vs-one duels won."""
    if kind == "votes":
        return scores / (scores.shape[1] - 1)
    return scores.softmax(1)


def evaluate(model, data: ImageSet) -> dict:
    """Accuracy, per-class precision / recall / F1, confusion matrix, predictions."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    pred = batched_forward(model, to_tensor(data.images)).argmax(1).numpy()
    p, r, f, support = precision_recall_fscore_support(data.labels, pred, labels=range(len(data.classes)),
                                                       zero_division=0)
    return {"accuracy": float((pred == data.labels).mean()), "n": len(data),
            "per_class": {c: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                              "support": int(support[i])} for i, c in enumerate(data.classes)},
            "confusion": confusion_matrix(data.labels, pred, labels=range(len(data.classes))).tolist(),
            "predictions": pred.tolist()}


def plot_confusion(confusion, classes, path: Path, title: str = "") -> Path:
    from ocula.plots import pyplot, save_figure

    plt = pyplot()
    cm = np.asarray(confusion)
    fig, ax = plt.subplots(figsize=(1 + 0.55 * len(classes), 1 + 0.5 * len(classes)))
    ax.imshow(cm, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            if cm[i, j]:
                ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=8,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    return save_figure(fig, path)


def plot_misclassified(data: ImageSet, predictions, path: Path, limit: int = 64) -> Path:
    from ocula.plots import image_grid

    pred = np.asarray(predictions)
    all_wrong = np.flatnonzero(pred != data.labels)
    wrong = all_wrong[:limit]
    titles = [f"true {data.classes[data.labels[i]]}\npred {data.classes[pred[i]]}" for i in wrong]
    return image_grid(data.images[wrong], titles, path, value_max=data.value_max,
                      title=f"{len(all_wrong)} misclassified of {len(data)}")


def write_evaluation(model, data: ImageSet, out_dir: Path, prefix: str = "") -> dict:
    """Evaluate and write eval.json, the confusion-matrix PNG and the grid of misclassified images."""
    result = evaluate(model, data)
    out_dir = Path(out_dir)
    plot_confusion(result["confusion"], data.classes, out_dir / f"{prefix}confusion.png",
                   f"{data.name}: accuracy {result['accuracy']:.4f} on {len(data)}")
    plot_misclassified(data, result["predictions"], out_dir / f"{prefix}misclassified.png")
    write_json(out_dir / f"{prefix}eval.json", {k: v for k, v in result.items() if k != "predictions"})
    return result


def train(dataset: str, model_name: str, config: TrainConfig, *, run_dir: Path, data_dir=None,
          val_fraction: float = 0.1, resume: bool = False, progress: bool = True, svc_gamma: float = 0.001,
          svc_C: float = 1.0) -> dict:
    """Train `model_name` ('svc' or 'cnn') on `dataset`, evaluate on its test split, fill the run folder."""
    from ocula.data import registry

    run_dir = Path(run_dir)
    train_set, test_set = registry.load(dataset, "train", data_dir), registry.load(dataset, "test", data_dir)
    write_json(run_dir / "config.json", {"task": "classify", "dataset": dataset, "model": model_name,
                                         "val_fraction": val_fraction, "train": asdict(config),
                                         **({"svc": {"gamma": svc_gamma, "C": svc_C}} if model_name == "svc" else {})})
    start = time.perf_counter()
    if model_name == "svc":
        model, info = fit_svc(train_set, gamma=svc_gamma, C=svc_C)
    elif model_name == "cnn":
        fit_set, val_set = split_validation(train_set, val_fraction, config.seed)
        model, info, _ = train_cnn(fit_set, config, val=val_set, run_dir=run_dir, resume=resume, progress=progress)
        if val_set is not None and (run_dir / "best.ocula").is_file():
            from ocula.modelfile import load_model

            model = load_model(run_dir / "best.ocula")
            info = model.info
    else:
        raise ValueError(f"unknown classifier {model_name!r} (svc or cnn)")
    seconds = time.perf_counter() - start
    result = write_evaluation(model, test_set, run_dir)
    info.metrics = {"test_accuracy": result["accuracy"], "train_seconds": round(seconds, 2)}
    save_model(run_dir / "model.ocula", model, info)
    summary = {"dataset": dataset, "model": model_name, "test_accuracy": result["accuracy"],
               "train_seconds": round(seconds, 2), "model_file": str(run_dir / "model.ocula")}
    write_json(run_dir / "summary.json", summary)
    return summary


def predict_photo(model, path, steps_path: Path | None = None) -> dict:
    """Classify one photographed digit with the model's own preprocessing; optionally draw every stage."""
    from ocula.data.digit_photo import draw_steps, prepare_digit

    pre = model.info.preprocess
    array, steps = prepare_digit(path, style=pre["style"], size=tuple(pre["input_size"]))
    with torch.no_grad():
        scores = model(to_tensor(array[None]))
    probs = scores_to_probabilities(scores, pre.get("scores", "logits"))[0]
    best = int(probs.argmax())
    result = {"file": str(path), "label": best, "class": model.info.classes[best],
              "probability": round(float(probs[best]), 4),
              "probabilities": {c: round(float(p), 4) for c, p in zip(model.info.classes, probs)}}
    if steps_path:
        draw_steps(steps, steps_path, f"{Path(path).name}: {result['class']} ({result['probability']:.2f})")
    return result
