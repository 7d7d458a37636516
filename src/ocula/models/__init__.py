"""Pure nn.Modules, built by architecture name so a model file can name its architecture and arguments."""

from __future__ import annotations

import importlib

from ocula.errors import OculaError

# name -> "module:builder"; builders take keyword-only arguments that are recorded in the model file.
ARCHITECTURES = {
    "svc": "ocula.models.classifiers:RBFSVC",
    "cnn": "ocula.models.classifiers:SmallCNN",
    "backbone-classifier": "ocula.models.classifiers:BackboneClassifier",
    "airbench": "ocula.models.airbench:AirbenchNet",
    "unet": "ocula.models.unet:UNet",
    "normalized-unet": "ocula.models.unet:NormalizedUNet",
    "fcos": "ocula.models.detection.fcos:FCOS",
    "faster-rcnn": "ocula.models.detection.builders:faster_rcnn_fpn",
    "compressed": "ocula.compression.layers:build_compressed",  # a base architecture with pruned / factorised layers
    "gallery-recognizer": "ocula.index.recognizer:GalleryRecognizer",  # an embedder + references (models floor)
    "mlp-autoencoder": "ocula.models.autoencoders:MLPAutoencoder",
    "conv-autoencoder": "ocula.models.autoencoders:ConvAutoencoder",
    "pca": "ocula.models.autoencoders:PCA",
    "dcgan": "ocula.models.autoencoders:DCGAN",
}


def build(arch: str, **kwargs):
    if arch not in ARCHITECTURES:
        raise OculaError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    module, name = ARCHITECTURES[arch].split(":")
    return getattr(importlib.import_module(module), name)(**kwargs)
