"""Transfer learning: how well what a network learnt on other data serves a small labelled set, measured by seeded
stratified k-fold cross-validation (issue 11's transfer table; `benchmarks/transfer.py` runs it on WBC types).

A method is a `fit_predict(train, images) -> predicted labels`: it gets the training fold as an ImageSet and the
test fold's images alone, so no method can see a test label. `cross_validate` runs it on every fold, scores accuracy
and balanced accuracy, and times it. The methods:
- `frozen(model_file, head)`: the model's penultimate features (a classifier's last hidden layer, an autoencoder's
  code), computed through the model's recorded preprocessing (`tasks.embed`: images are resized to its input
  size), standardised, then a scikit-learn head whose hyper-parameters a grid search chooses by an inner
  stratified CV of the training folds: the test fold never chooses anything;
- `trained(model_name, config, encoder=...)`: the network trained on the training folds, from the encoder file's
  weights (fine-tuning: every layer learns, the new head starts at random) or from scratch (no encoder), with one
  fixed recipe for both and the last epoch kept (no validation hold-out is taken from so few images);
- `majority()`: the training folds' most frequent class, the floor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ocula.data.classification import ImageSet, stratified_folds
from ocula.errors import OculaError

# Hyper-parameter grids of the heads, searched inside the training folds.
GRIDS = {
    "linear": {"C": [0.001, 0.01, 0.1, 1.0, 10.0]},  # logistic regression
    "svm": {"C": [0.1, 1.0, 10.0, 100.0], "gamma": ["scale", 0.1, 0.01, 0.001]},  # RBF kernel
    "knn": {"n_neighbors": [1, 3, 5, 9, 15], "weights": ["uniform", "distance"]},
}


@dataclass
class Scores:
    """One method's per-fold accuracy and balanced accuracy (the mean of the per-class recalls) and its training
    time (fit and predict) summed over the folds."""

    method: str
    accuracy: np.ndarray
    balanced_accuracy: np.ndarray
    seconds: float

    def row(self) -> list[str]:
        return [self.method, f"{self.accuracy.mean():.3f} ± {self.accuracy.std():.3f}",
                f"{self.balanced_accuracy.mean():.3f} ± {self.balanced_accuracy.std():.3f}", f"{self.seconds:.1f}"]


def cross_validate(method: str, data: ImageSet, fit_predict, *, n_folds: int = 5, seed: int = 0) -> Scores:
    """Score `fit_predict` on each fold of the seeded stratified k-fold split of `data`."""
    from sklearn.metrics import balanced_accuracy_score

    accuracy, balanced, seconds = [], [], 0.0
    for train, test in stratified_folds(data.labels, n_folds, seed):
        start = time.perf_counter()
        pred = np.asarray(fit_predict(data.subset(train), data.images[test]))
        seconds += time.perf_counter() - start
        truth = data.labels[test]
        accuracy.append(float((pred == truth).mean()))
        balanced.append(float(balanced_accuracy_score(truth, pred)))
    return Scores(method, np.array(accuracy), np.array(balanced), seconds)


def head_search(head: str, *, inner_folds: int = 5, seed: int = 0):
    """An unfitted grid search over standardised features + the `head` classifier (GRIDS), by stratified CV."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVC

    if head not in GRIDS:
        raise OculaError(f"unknown head {head!r}; choose {', '.join(GRIDS)}")
    estimator = {"linear": LogisticRegression(max_iter=5000), "svm": SVC(), "knn": KNeighborsClassifier()}[head]
    grid = {f"head__{k}": v for k, v in GRIDS[head].items()}
    return GridSearchCV(Pipeline([("scale", StandardScaler()), ("head", estimator)]), grid,
                        cv=StratifiedKFold(inner_folds, shuffle=True, random_state=seed))


def frozen(model_path, head: str, *, inner_folds: int = 5, seed: int = 0, device: str = "cpu"):
    """Off-the-shelf features of the model file + a `head` ('linear', 'svm' or 'knn') tuned on the training fold."""
    from ocula.modelfile import load_model
    from ocula.tasks.embed import embed

    model = load_model(model_path, device=device)
    head_search(head)  # an unknown head fails here, before any fold runs

    def fit_predict(train: ImageSet, images: np.ndarray) -> np.ndarray:
        search = head_search(head, inner_folds=inner_folds, seed=seed).fit(embed(model, train.images), train.labels)
        return search.predict(embed(model, images))

    return fit_predict


def trained(model_name: str, config, *, encoder=None):
    """`model_name` ('cnn', 'airbench' or a backbone) trained with `config` on the training fold, started from
    the model file `encoder` (fine-tuning) or at random (scratch)."""
    from ocula.tasks import classify

    def fit_predict(train: ImageSet, images: np.ndarray) -> np.ndarray:
        arch, args, pretrained = classify.network(train, model_name, encoder=encoder, device=config.device)
        model, _, _ = classify.train_cnn(train, config, progress=False, arch=arch, arch_args=args,
                                         pretrained=pretrained)
        return classify.batched_forward(model, classify.to_tensor(images)).argmax(1).numpy()

    return fit_predict


def majority():
    def fit_predict(train: ImageSet, images: np.ndarray) -> np.ndarray:
        return np.full(len(images), np.bincount(train.labels).argmax())

    return fit_predict
