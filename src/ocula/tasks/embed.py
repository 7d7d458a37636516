"""Embeddings from any ocula classifier (its penultimate features) or autoencoder (its code), and vector files to
keep them in.

A vector file is safetensors: `vectors` [n, d] float32 and `labels` [n] int64, with JSON metadata (ids, class
names, the model and data they came from). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ocula.errors import OculaError
from ocula.fileio import atomic_path
from ocula.tasks.classify import prepare

FORMAT = "ocula-vectors"


@torch.no_grad()
def embed(model, images, *, batch_size: int = 256, normalize: bool = False, sources=None) -> np.ndarray:
    """[n, d] float32 penultimate features of `images` (HxW(xC) arrays or an NxHxW(xC) stack), prepared by the
    model's recorded preprocessing and computed in batches on the model's device."""
    from ocula.engine.device import device_of

    if not hasattr(model, "penultimate"):
        raise OculaError(f"a {model.info.arch} model has no penultimate features to embed with; use a network "
                         "classifier (cnn or a backbone) or an autoencoder")
    pre, sources = model.info.preprocess, sources or ["<image>"] * len(images)
    model.eval()
    device, out = device_of(model), []
    for i in range(0, len(images), batch_size):
        batch = np.stack([prepare(im, pre, src)[0] for im, src in zip(images[i:i + batch_size],
                                                                      sources[i:i + batch_size])])
        f = model.penultimate(torch.from_numpy(batch).to(device)).float()
        out.append((torch.nn.functional.normalize(f, dim=1) if normalize else f).cpu().numpy())
    return np.concatenate(out)


def save_vectors(path: str | Path, vectors: np.ndarray, labels: np.ndarray, *, ids: list[str],
                 classes: list[str], source: dict) -> Path:
    from safetensors.numpy import save

    meta = {"format": FORMAT, "ids": ids, "classes": classes, "source": source}
    with atomic_path(path) as tmp:
        tmp.write_bytes(save({"vectors": np.ascontiguousarray(vectors, np.float32),
                              "labels": np.asarray(labels, np.int64)}, metadata={FORMAT: json.dumps(meta)}))
    return Path(path)


def load_vectors(path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(vectors, labels, metadata with ids, classes and source)."""
    from ocula.index.base import read_arrays

    arrays, meta = read_arrays(path, FORMAT, "vector")
    if {"vectors", "labels"} - set(arrays):
        raise OculaError("not an ocula vector file (no vectors or labels)", path)
    return arrays["vectors"], arrays["labels"], meta


def embed_data(model_path: str | Path, data: str, out: str | Path, *, split: str = "train", device: str = "auto",
               batch_size: int = 256, normalize: bool = False, rule: str = "1nn", k: int = 5, data_dir=None) -> str:
    """Embed a split of a dataset or class folder with a model file. `out` ending in .ocula: a recogniser model
    (that model + these images as its gallery, decided by `rule`; from a recogniser, the same one with these
    images added to its references), else a vector file. Says what it wrote."""
    from ocula.modelfile import load_model, save_model
    from ocula.tasks.classify import load_data

    model = load_model(model_path, device=device)
    images = load_data(data, split, data_dir)
    if str(out).endswith(".ocula"):
        from ocula.tasks.recognize import add_references, build_recognizer

        if model.info.task == "recognize":  # a recogniser grows: its references plus these, nothing retrained
            recognizer = add_references(model, images, batch_size=batch_size)
        else:
            recognizer = build_recognizer(model, images, rule, k=k, normalize=True, batch_size=batch_size)
            recognizer.info.preprocess["dataset"] = data
        save_model(out, recognizer, recognizer.info)
        return (f"{out}: {recognizer.rule} recogniser over {len(recognizer.gallery)} references of "
                f"{len(recognizer.info.classes)} classes")
    vectors = embed(model, images.images, batch_size=batch_size, normalize=normalize)
    ids = [f"{split}/{i}" for i in range(len(images))]
    save_vectors(out, vectors, images.labels, ids=ids, classes=list(images.classes),
                 source={"model": str(model_path), "data": data, "split": split, "normalized": normalize})
    return f"{out}: {vectors.shape[0]} vectors of dimension {vectors.shape[1]}"
