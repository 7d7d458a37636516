"""ocula: the whole image-recognition path, fast on an ordinary CPU.

Heavy libraries (torch, onnxruntime) are imported lazily so that `import ocula` and `ocula --help` stay instant.
"""

__version__ = "0.1.0"

from ocula.errors import OculaError


def load(path, device: str = "auto"):
    """Load a model file onto `device`: an `ocula.api.Model` with .predict, .evaluate, .export, .info, .module."""
    from ocula.api import load

    return load(path, device)


def train(data=None, model=None, **settings):
    """Train a model on a dataset name or folder; returns the trained `ocula.api.Model` (see `ocula.api.train`)."""
    from ocula.api import train

    return train(data, model, **settings)


def compress(model, method, out, **settings):
    """Compress a classifier's model file into `out` by pruning, distillation, int8, low rank or binarization; returns
    the new `ocula.api.Model` (see `ocula.compression.compress`)."""
    from ocula.compression import compress

    return compress(model, method, out, **settings)


__all__ = ["OculaError", "compress", "load", "train", "__version__"]
