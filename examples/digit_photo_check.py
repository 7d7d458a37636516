"""Score a digit model on rendered phone photos of MNIST test digits: the photo set the bundled model's recipe was
selected on. The digits are not the package's sample photos (those are each class's first test digit, skipped
here) and are rendered with another seed by the same renderer.

    python examples/digit_photo_check.py MODEL [--n 300] [--data-dir ../shared/datasets]
"""

import argparse

import numpy as np
from make_sample_photos import render

import ocula
from ocula.data import registry


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--data-dir")
    args = ap.parse_args()
    test = registry.load("mnist", "test", args.data_dir)
    samples = {int(np.flatnonzero(test.labels == k)[0]) for k in range(10)}
    indices = [i for i in range(len(test)) if i not in samples][-args.n:]  # the end of the test split
    rng = np.random.default_rng(7)
    photos = [np.asarray(render(test.images[i], rng)) for i in indices]
    model = ocula.load(args.model, device="cpu")
    results = model.predict(photos)
    truth = [model.info.classes[test.labels[i]] for i in indices]
    wrong = [(i, t, r.name) for i, t, r in zip(indices, truth, results) if r.name != t]
    print(f"{len(photos) - len(wrong)}/{len(photos)} rendered photos read correctly "
          f"({1 - len(wrong) / len(photos):.3f}); misread (test index, true, read): {wrong[:20]}")


if __name__ == "__main__":
    main()
