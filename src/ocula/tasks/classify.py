"""Classification: the task protocol (see `ocula.tasks`) for image -> label, on any image set (digits, MNIST,
CIFAR-10, a folder of class folders) with the source document's SVC, a small CNN or a named backbone."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ocula.data.classification import ImageSet
from ocula.engine.batches import ArrayBatches, FlipTranslateBatches, random_affine
from ocula.engine.callbacks import LearningRateBudget
from ocula.engine.trainer import TrainConfig, Trainer
from ocula.errors import OculaError
from ocula.fileio import write_json
from ocula.modelfile import ModelInfo
from ocula.models import build
from ocula.models.backbones import list_backbones
from ocula.models.classifiers import RBFSVC

MODELS = ("cnn", "svc", "airbench", *list_backbones())
# labels_per_class: train on that many labelled images of each class (seeded); encoder: a model file whose layers
# initialise the network (`pretrained_weights`); self_train: rounds of pseudo-labelling the rest (`self_training`).
OPTIONS = dict(val_fraction=0.1, svc_gamma=0.001, svc_C=1.0, widths=None, width_mult=None, minutes=None,
               labels_per_class=0, encoder=None, self_train=0)
# How photos become model input, by the dataset that made the model (image folders and CIFAR-10: 'resize').
PHOTO_STYLES = {"digits": "digits", "mnist": "mnist", "fashion-mnist": "fashion"}
CNN_WIDTHS = [32, 64, 128]  # default stage widths
# MNIST needs less: 16-32-64 reaches 0.996 in a quarter of the compute (README, benchmarks/mnist.py).
DATASET_WIDTHS = {"mnist": [16, 32, 64]}
# Augmentation strength per input size (8x8 digits tolerate less shift than 28x28).
AUGMENT = {8: dict(shift=0.08, rotate=8, scale=0.08), 28: dict(shift=0.1, rotate=10, scale=0.1)}
# Clothes are photographed upright and mirror-symmetric: flips help, rotations do not.
DATASET_AUGMENT = {"fashion-mnist": dict(shift=0.08, rotate=0, scale=0.05, hflip=True)}
COLOUR = dict(shift=0.1, rotate=0, scale=0.1, hflip=True)  # natural photos: mirror and shift, as for CIFAR
# airbench94's recipe (batch 1024, Nesterov SGD, triangular schedule, label smoothing 0.2, BN biases 64x faster,
# lookahead every 5 steps). It states lr 11.5 and decoupled weight decay 0.0153 per 1024 images of a summed loss
# with momentum 0.85; for torch's SGD on a mean loss that is lr 11.5 / (1 + 1 / (1 - 0.85)) = 1.5 and weight
# decay 0.0153 / (1 + 1 / (1 - 0.85)) / 1.5 = 0.00133 (the same step and the same decay per step).
AIRBENCH = dict(epochs=10, batch_size=1024, optimizer="sgd", lr=1.5, momentum=0.85, weight_decay=0.00133,
                schedule="triangle", warmup=0.23, label_smoothing=0.2, norm_lr_scale=64.0, lookahead=5,
                bf16=True, channels_last=True, monitor="val_accuracy", mode="max")
AIRBENCH_WIDTHS = [64, 256, 256]
SELF_TRAIN_EPOCHS, SELF_TRAIN_BATCH = 2, 128  # per self-training round (`self_train`)


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """[N, H, W] or [N, H, W, C] in the native value range -> float32 [N, C, H, W] (models normalise inside)."""
    x = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    return x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()


def model_info(data: ImageSet, arch: str, args: dict) -> ModelInfo:
    h, w = data.images.shape[1:3]
    return ModelInfo(task="classify", arch=arch, args=args, classes=list(data.classes),
                     preprocess={"input_size": [h, w], "channels": data.channels, "value_max": data.value_max,
                                 "style": PHOTO_STYLES.get(data.name, "resize"),
                                 "scores": "votes" if arch == "svc" else "logits", "dataset": data.name})


def fit_svc(train: ImageSet, *, gamma: float = 0.001, C: float = 1.0):
    """The source document's SVC (gamma=0.001), fitted by scikit-learn, returned as an exact torch module."""
    from sklearn.svm import SVC

    if train.channels != 1:
        raise OculaError(f"the SVC classifies grey images; {train.name} has {train.channels} channels: use cnn")
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


def _stats(train: ImageSet) -> tuple:
    """Mean and std on the 0..1 scale: one value for grey images, one per channel for colour."""
    x = train.images.reshape(len(train), -1, train.channels)[:20_000].astype(np.float64) / train.value_max
    mean, std = x.mean((0, 1)), x.std((0, 1))
    if train.channels == 1:
        return round(float(mean[0]), 4), round(float(std[0]), 4)
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def cnn_args(train: ImageSet, **overrides) -> dict:
    mean, std = _stats(train)
    args = dict(num_classes=len(train.classes), in_channels=train.channels, value_max=train.value_max,
                mean=mean, std=std, widths=CNN_WIDTHS)
    args.update(overrides)
    return args


def backbone_args(train: ImageSet, backbone: str, width_mult: float | None = None) -> dict:
    mean, std = _stats(train)
    args = dict(backbone=backbone, num_classes=len(train.classes), in_channels=train.channels,
                value_max=train.value_max, mean=mean, std=std, small_input=min(train.images.shape[1:3]) <= 64)
    if width_mult is not None:
        if not backbone.startswith("mobilenet"):
            raise OculaError(f"width_mult thins the MobileNets; {backbone} has no width multiplier")
        args["width_mult"] = width_mult
    return args


def labelled_split(data: ImageSet, per_class: int, seed: int) -> tuple[ImageSet, ImageSet]:
    """(`per_class` images of each class drawn with `seed`, the rest): the few labels of a semi-supervised
    setting and the images whose labels it does not use."""
    rng = np.random.default_rng(seed)
    picked = [rng.choice(np.flatnonzero(data.labels == k), per_class, replace=False)
              for k in range(len(data.classes)) if (data.labels == k).sum() >= per_class]
    if len(picked) < len(data.classes):
        raise OculaError(f"{data.name} has a class with fewer than {per_class} images; lower labels_per_class")
    labelled = np.zeros(len(data), bool)
    labelled[np.concatenate(picked)] = True
    return data.subset(labelled), data.subset(~labelled)


def pseudo_labels(model, pool: ImageSet, share: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices, predicted labels) of the `share` of `pool` the model is surest of within each predicted class:
    class by class, so that a class the model finds hard is not crowded out by the easy ones."""
    probs = batched_forward(model, to_tensor(pool.images)).softmax(1)
    confidence, predicted = probs.max(1)
    keep = []
    for k in predicted.unique():
        members = torch.nonzero(predicted == k).flatten()
        keep.append(members[confidence[members].argsort(descending=True)[:math.ceil(share * len(members))]])
    keep = torch.cat(keep).sort().values.numpy()
    return keep, predicted.numpy()[keep]


def self_training(model, labelled: ImageSet, pool: ImageSet, config: TrainConfig, *, rounds: int, run_dir: Path,
               val: ImageSet | None, progress: bool, **network_args):
    """Curriculum self-training (Cascante-Bonilla et al. 2021): round r of `rounds` pseudo-labels the unlabelled
    `pool` with the last model, keeps the surest r/rounds of each predicted class, and trains a network from the
    same starting weights (`network_args`: arch, arch_args, pretrained) on the labelled images plus those; the
    fresh start keeps one round's mistakes from settling into the next. Returns (model, info, one note per round:
    how many pseudo-labels, and how many were right by the pool's hidden labels)."""
    # The pseudo-labelled set is hundreds of times the labelled one: a few epochs, at a batch that pays on CPU.
    round_config = replace(config, epochs=SELF_TRAIN_EPOCHS, batch_size=max(config.batch_size, SELF_TRAIN_BATCH))
    notes = []
    for r in range(1, rounds + 1):
        keep, labels = pseudo_labels(model, pool, r / rounds)
        notes.append({"round": r, "pseudo_labels": len(keep),
                      "pseudo_label_accuracy": round(float((labels == pool.labels[keep]).mean()), 4)})
        mixed = ImageSet(np.concatenate([labelled.images, pool.images[keep]]),
                         np.concatenate([labelled.labels, labels]), labelled.classes, labelled.value_max,
                         labelled.name)
        model, info = fit_network(mixed, round_config, val=val, run_dir=run_dir / "self-train" / f"round-{r}",
                                  progress=progress, **network_args)
    return model, info, notes


def split_validation(data: ImageSet, fraction: float, seed: int):
    """A stratified, seeded hold-out from the training split, for checkpoint selection and early stopping."""
    if fraction <= 0:
        return data, None
    from sklearn.model_selection import train_test_split

    tr, va = train_test_split(np.arange(len(data)), test_size=fraction, random_state=seed, stratify=data.labels)
    return data.subset(tr), data.subset(va)


def train_cnn(train: ImageSet, config: TrainConfig, *, val: ImageSet | None = None, run_dir: Path | None = None,
              resume: bool = False, progress: bool = True, augment: bool = True, arch: str = "cnn",
              arch_args: dict | None = None, pretrained: dict | None = None, minutes: float | None = None,
              model=None, loss=None):
    """Train a network classifier ('cnn', 'airbench' or 'backbone-classifier') with the shared engine; returns
    (model, info, history). `pretrained`: the state of every layer but the head (`pretrained_weights`), the new
    head starting at random; `model`: go on training this one
    (with its .info), as compression's fine-tuning does; `loss(m, x, y)`: instead of cross-entropy (distillation);
    `minutes`: stop at this wall-clock budget (or after config.epochs), the learning rate warming up and then
    following a cosine over the budget so the run ends at a low rate wherever it stops."""
    from ocula.engine.device import runtime

    images, labels = to_tensor(train.images), torch.from_numpy(train.labels)
    if model is None:
        args = arch_args or cnn_args(train)
        with runtime(seed=config.seed):  # the same initial weights for the same seed, global RNG left alone
            model = build(arch, **args)
        if pretrained is not None:
            missing, unexpected = model.load_state_dict(pretrained, strict=False)
            if unexpected or set(missing) != head_keys(model):
                raise ValueError(f"pretrained state does not fit {arch}: missing {missing}, unexpected {unexpected}")
        elif hasattr(model, "init_from_data"):
            model.init_from_data(images)  # airbench's whitening filters come from the training images
        info = model_info(train, arch, args)
    else:
        info = model.info
    drop_last = len(train) > config.batch_size
    if info.arch == "airbench":
        batches = FlipTranslateBatches(images, labels, config.batch_size, translate=2 if augment else 0,
                                       seed=config.seed, drop_last=drop_last)
    else:
        size = train.images.shape[1]
        params = DATASET_AUGMENT.get(train.name) or AUGMENT.get(size, AUGMENT[28] if train.channels == 1 else COLOUR)
        aug = (lambda x, g: random_affine(x, g, **params)) if augment else None
        batches = ArrayBatches(images, labels, config.batch_size, augment=aug, drop_last=drop_last)

    def cross_entropy(m, x, y):
        return F.cross_entropy(m(x), y, label_smoothing=config.label_smoothing)

    evaluate_fn = None
    if val is not None:
        vx, vy = to_tensor(val.images), torch.from_numpy(val.labels)

        def evaluate_fn(m):
            with single_view(m):
                logits = batched_forward(m, vx)
            return {"loss": float(F.cross_entropy(logits, vy)),
                    "accuracy": float((logits.argmax(1) == vy).float().mean())}

    trainer = Trainer(model, config, loss_fn=loss or cross_entropy, train_batches=batches, evaluate_fn=evaluate_fn,
                      info=info, run_dir=run_dir, progress=progress)
    if minutes:
        # Set after the trainer's own schedule each step, so the budget's rate is the one used.
        trainer.callbacks.append(LearningRateBudget(seconds=minutes * 60, steps=config.epochs * len(batches)))
    history = trainer.fit(resume=resume)
    return trainer.kept_model, info, history


def head_keys(model) -> set[str]:
    """The parameter names of the model's last linear layer: the head a new set of classes replaces."""
    name = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][-1]
    return {f"{name}.{p}" for p, _ in model.get_submodule(name).named_parameters(recurse=False)}


def pretrained_weights(path, model_name: str, device="cpu") -> tuple[dict, dict]:
    """(state of every layer but the head, the architecture arguments that take it) from a model file that
    initialises a `model_name` classifier: a classifier of that architecture trained on other data (CIFAR-10's
    airbench for airbench), or for the cnn also a conv autoencoder's encoder. The normalisation stays the
    pretrained one: the layers learnt on its scale."""
    from ocula.modelfile import load_model

    model = load_model(path, device=device)
    info = model.info
    if info.task == "represent" and model_name == "cnn":
        from ocula.tasks.represent import encoder_weights

        features, args = encoder_weights(model, path)
        return {f"features.{k}": v for k, v in features.items()}, args
    if info.task != "classify" or info.args.get("backbone", info.arch) != model_name:
        found = info.args.get("backbone", info.arch)
        raise OculaError(f"--encoder for {model_name} takes a classifier of that architecture (or, for the cnn, "
                         f"a conv autoencoder), not this {found} {info.task} model", path)
    head = head_keys(model)
    return ({k: v for k, v in model.state_dict().items() if k not in head},
            {k: v for k, v in info.args.items() if k != "num_classes"})


def network(train: ImageSet, model_name: str, *, widths: list[int] | None = None, width_mult: float | None = None,
            encoder: str | None = None, device="cpu") -> tuple[str, dict, dict | None]:
    """(architecture, its arguments, pretrained state or None) of a `model_name` network classifier for `train`,
    started from the model file `encoder` when given."""
    if model_name == "cnn":
        arch, args = "cnn", cnn_args(train, widths=widths or DATASET_WIDTHS.get(train.name, CNN_WIDTHS))
    elif model_name == "airbench":
        arch, args = "airbench", cnn_args(train, widths=widths or AIRBENCH_WIDTHS)
    else:
        arch, args = "backbone-classifier", backbone_args(train, model_name, width_mult)
    if not encoder:
        return arch, args, None
    pretrained, encoder_args = pretrained_weights(encoder, model_name, device)
    if encoder_args["in_channels"] != train.channels:
        raise OculaError(f"the encoder takes {encoder_args['in_channels']}-channel images; {train.name} has "
                         f"{train.channels}", encoder)
    return arch, {**args, **encoder_args}, pretrained


@contextmanager
def single_view(model):
    """The model without its test-time augmentation (`tta`) inside the block: validation during training scores
    one view, as the augmented views would multiply its cost (airbench's six views)."""
    tta = getattr(model, "tta", 0)
    if tta:
        model.tta = 0
    try:
        yield model
    finally:
        if tta:
            model.tta = tta


@torch.no_grad()
def batched_forward(model, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Outputs for a CPU batch, computed on the model's device in chunks, returned on the CPU."""
    from ocula.engine.device import device_of

    model.eval()
    device = device_of(model)
    return torch.cat([model(x[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def scores_to_probabilities(scores: torch.Tensor, kind: str) -> torch.Tensor:
    """Logits -> softmax; SVC votes -> each class's share of all votes (the K(K-1)/2 one-vs-one duels), which
    sums to 1 and ranks classes as the votes do."""
    if kind == "votes":
        return scores / scores.sum(1, keepdim=True)
    return scores.softmax(1)


def evaluate(model, data: ImageSet, out_dir: Path | None = None) -> dict:
    """Accuracy, per-class precision / recall / F1 and the confusion matrix; with `out_dir`, also eval.json, the
    confusion-matrix PNG and a grid of the misclassified images."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    if out_dir is not None:
        return write_evaluation(model, data, out_dir)
    _check_fits(model, data)
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


def _check_fits(model, data: ImageSet) -> None:
    pre = model.info.preprocess
    shape = [*data.images.shape[1:3], data.channels]
    if shape != [*pre["input_size"], pre["channels"]] or list(data.classes) != list(model.info.classes):
        raise OculaError(f"dataset {data.name} ({shape[0]}x{shape[1]}x{shape[2]}, classes {list(data.classes)}) "
                         f"does not fit the model ({pre['input_size'][0]}x{pre['input_size'][1]}x{pre['channels']}, "
                         f"classes {model.info.classes})")


def write_evaluation(model, data: ImageSet, out_dir: Path, prefix: str = "") -> dict:
    """Evaluate and write eval.json, the confusion-matrix PNG and the grid of misclassified images."""
    result = evaluate(model, data)
    out_dir = Path(out_dir)
    plot_confusion(result["confusion"], data.classes, out_dir / f"{prefix}confusion.png",
                   f"{data.name}: accuracy {result['accuracy']:.4f} on {len(data)}")
    plot_misclassified(data, result["predictions"], out_dir / f"{prefix}misclassified.png")
    write_json(out_dir / f"{prefix}eval.json", {k: v for k, v in result.items() if k != "predictions"})
    return result


# --- the task protocol -----------------------------------------------------------------------------------------
def default_config(model_name: str, **overrides) -> TrainConfig:
    if model_name not in MODELS:
        raise OculaError(f"unknown classifier {model_name!r}; choose one of {', '.join(MODELS)}")
    # Backbones: bf16 autocast + channels-last make a CIFAR ResNet-18 step 2.6x faster than float32 on 2 cores.
    fast = dict(bf16=True, channels_last=True) if model_name not in ("cnn", "svc") else {}
    recipe = AIRBENCH if model_name == "airbench" else {}
    return TrainConfig(**{"monitor": "val_loss", "mode": "min", **fast, **recipe, **overrides})


def load_data(data: str, split: str, data_dir=None, size=None) -> ImageSet:
    """A split of a registered dataset or of an image folder (resized to `size` when its images differ)."""
    from ocula.data.classification import load_image_folder
    from ocula.data.layout import open_dataset

    if Path(data).is_dir():
        return load_image_folder(data, split, size=size)
    return open_dataset(data, split, data_dir)


def show(data: ImageSet, n: int, path: Path) -> Path:
    """A grid of `n` images spread evenly over the dataset (folders are sorted by class) with their class names."""
    from ocula.plots import image_grid

    idx = np.unique(np.linspace(0, len(data) - 1, min(n, len(data))).round().astype(int))
    return image_grid(data.images[idx], [data.classes[int(y)] for y in data.labels[idx]], path,
                      value_max=data.value_max, title=f"{data.name}: {len(idx)} of {len(data)}")


def fit_network(train: ImageSet, config: TrainConfig, *, val: ImageSet | None, run_dir: Path, **kwargs):
    """`train_cnn`, then the checkpoint selected on `val` when there is one: (model, info)."""
    model, info, _ = train_cnn(train, config, val=val, run_dir=run_dir, **kwargs)
    if val is not None and (run_dir / "best.ocula").is_file():
        from ocula.modelfile import load_model

        model = load_model(run_dir / "best.ocula", device=config.device)
        info = model.info
    return model, info


def train(data: str, model_name: str, config: TrainConfig, *, run_dir: Path, data_dir=None, resume: bool = False,
          progress: bool = True, val_fraction: float = 0.1, svc_gamma: float = 0.001, svc_C: float = 1.0,
          widths: list[int] | None = None, width_mult: float | None = None, minutes: float | None = None,
          labels_per_class: int = 0, encoder: str | None = None, self_train: int = 0):
    """Fit on the train split (or `labels_per_class` images of each class), select on val (the dataset's own, else
    a stratified `val_fraction` of the training images), and score the test split once when there is one.
    `widths`: the cnn's or airbench's stage widths; `width_mult`: a MobileNet's width multiplier; `minutes`: a
    wall-clock budget (see `train_cnn`); `encoder`: a model file that initialises the network (`pretrained_weights`);
    `self_train`: with `labels_per_class`, that many rounds of pseudo-labelling the rest of the training split
    (`self_training`, each round in run_dir/self-train/round-R). Returns (model with .info, summary)."""
    from ocula.data.layout import splits

    have = splits(data, data_dir)
    train_set = load_data(data, "train", data_dir)
    if self_train and (not labels_per_class or model_name == "svc" or resume):
        raise OculaError("self_train pseudo-labels the images left out by labels_per_class, for a network "
                         "classifier, in a new run (not with resume)")
    if labels_per_class:
        train_set, unlabelled = labelled_split(train_set, labels_per_class, config.seed)
    summary = {}
    if model_name == "svc":
        if encoder:
            raise OculaError("--encoder initialises a network classifier, not the svc")
        model, info = fit_svc(train_set, gamma=svc_gamma, C=svc_C)
    else:
        fit_set, val_set = ((train_set, load_data(data, "val", data_dir, train_set.images.shape[1:3]))
                            if "val" in have else split_validation(train_set, val_fraction, config.seed))
        arch, args, pretrained = network(fit_set, model_name, widths=widths,
                                         width_mult=width_mult, encoder=encoder, device=config.device)
        start = dict(arch=arch, arch_args=args, pretrained=pretrained)
        model, info = fit_network(fit_set, config, val=val_set, run_dir=run_dir, resume=resume, progress=progress,
                                  minutes=minutes, **start)
        if self_train:
            model, info, summary["self_train"] = self_training(model, fit_set, unlabelled, config, rounds=self_train,
                                                             run_dir=run_dir, val=val_set, progress=progress,
                                                             **start)
    info.preprocess["dataset"] = data  # the name or folder to evaluate on again (a folder's ImageSet name is short)
    model.info = info
    if "test" in have:
        result = write_evaluation(model, load_data(data, "test", data_dir, train_set.images.shape[1:3]), run_dir,
                                  prefix="test-")
        summary["test_accuracy"] = result["accuracy"]
    info.metrics = {**{k: v for k, v in info.metrics.items() if k.startswith("val_")},
                    **{k: v for k, v in summary.items() if k != "self_train"}}
    return model, summary


@dataclass
class Classification:
    """One image's answer: the label, its class name and probability, every class's probability."""

    source: str
    label: int
    name: str
    probability: float
    probabilities: dict[str, float]
    steps: dict = field(default_factory=dict, repr=False)  # preprocessing stages of a photo, for drawing

    def describe(self) -> str:
        return f"{self.source}: {self.name} (probability {self.probability:.2f})"

    def to_json(self) -> dict:
        return {"file": self.source, "label": self.label, "class": self.name,
                "probability": round(self.probability, 4),
                "probabilities": {c: round(p, 4) for c, p in self.probabilities.items()}}

    def save(self, out_dir: Path, stem: str) -> dict:
        """Draw the preprocessing stages of a photo as STEM-steps.png."""
        from ocula.data.digit_photo import draw_steps

        if not self.steps:
            return {}
        path = draw_steps(self.steps, Path(out_dir) / f"{stem}-steps.png",
                          f"{Path(self.source).name}: {self.name} ({self.probability:.2f})")
        return {"steps": str(path)}


def prepare(image: np.ndarray, pre: dict, source: str = "<image>") -> tuple[np.ndarray, dict]:
    """[C, H, W] float32 model input and the drawn stages. An image already of the training data's shape is taken
    as it is (an array from the dataset); any other goes through the model's recorded photo recipe."""
    from ocula.data.photo import prepare_photo

    h, w = pre["input_size"]
    a = image[..., None] if image.ndim == 2 else image
    if pre["channels"] == 1 and a.shape[2] == 3 and (a == a[..., :1]).all():
        a = a[..., :1]  # a grey picture saved as RGB
    if a.shape == (h, w, pre["channels"]):
        return np.ascontiguousarray(a.transpose(2, 0, 1), np.float32), {}
    return prepare_photo(image, style=pre["style"], size=(h, w), channels=pre["channels"], name=source)


def predict(model, images: list[np.ndarray], sources: list[str], *, batch_size: int = 256) -> list[Classification]:
    pre = model.info.preprocess
    prepared = [prepare(im, pre, src) for im, src in zip(images, sources)]
    scores = batched_forward(model, torch.from_numpy(np.stack([a for a, _ in prepared])), batch_size)
    probs = scores_to_probabilities(scores.double(), pre.get("scores", "logits")).numpy()
    classes = model.info.classes
    return [Classification(src, int(p.argmax()), classes[int(p.argmax())], float(p.max()),
                           {c: float(v) for c, v in zip(classes, p)}, steps)
            for src, p, (_, steps) in zip(sources, probs, prepared)]


def calibration_inputs(model, data, data_dir, n: int, seed: int) -> list[np.ndarray]:
    """A seeded sample of `n` training images (of dataset `data`, or an ImageSet such as the part left after the
    validation hold-out) as input batches, for int8 calibration (`ocula compress`)."""
    from ocula.compression.quantize import sample

    images = (data if isinstance(data, ImageSet) else load_data(data, "train", data_dir)).images
    x = to_tensor(images[np.sort(sample(len(images), n, seed))]).numpy()
    return [x[i:i + 32] for i in range(0, len(x), 32)]


def export(model, fmt: str, path: Path) -> str:
    """ONNX (checked against torch on random input) or CoreML."""
    if fmt == "coreml":
        from ocula.export.coreml import export_coreml

        return f"{export_coreml(model, path)}"
    from ocula.export.onnx import check_parity, export_onnx

    out = export_onnx(model, path)
    return f"{out} (ONNX Runtime vs torch: max abs difference {check_parity(model, out):.2e})"
