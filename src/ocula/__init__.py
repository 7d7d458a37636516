"""ocula: the whole image-recognition path, fast on an ordinary CPU.

Heavy libraries (torch, onnxruntime) are imported lazily so that `import ocula` and `ocula --help` stay instant.
"""

__version__ = "0.1.0"

from ocula.errors import OculaError


def load(path):
    """Load a saved ocula model file (see `ocula.modelfile`)."""
    from ocula.modelfile import load_model

    return load_model(path)


__all__ = ["OculaError", "load", "__version__"]
