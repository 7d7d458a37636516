"""Model files shipped inside the package, so `ocula serve` and `ocula demo` read photos with no training first.

digits-mnist.ocula: the MNIST CNN made by `python -m ocula.weights.make_digit_model` (see that file for the recipe
and README.md for its checksum); digits-mnist.onnx beside it is its ONNX export, which the server runs.
"""

from pathlib import Path

DIGIT_MODEL = Path(__file__).parent / "digits-mnist.ocula"
