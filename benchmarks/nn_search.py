"""Nearest-neighbour search and recognition with ocula.index, recorded in RESULTS.md.

    python benchmarks/nn_search.py ann     # ann-benchmarks' fashion-mnist-784-euclidean: recall@10 vs QPS
    python benchmarks/nn_search.py twd       # TWD vs brute force, 60k Fashion-MNIST references (pixels or
                                             # --vectors from ocula embed)
    python benchmarks/nn_search.py omniglot  # embeddings trained on background set 1 only: the 20 one-shot
                                             # runs, then many-class recognition on background set 2 (TWD etc.)

ann: raw 784-d pixels, the 60k training images as the gallery, the 10k test images as queries, k = 10, recall as
ann-benchmarks counts it (a returned neighbour counts when its distance is within the 10th true distance). Every
backend is searched through ocula; hnswlib and faiss are also called directly on the same built index, as the
reference points. QPS: all queries in one batched call (the slow exact trees and the pure-Python forest on a
subset of the queries, as noted).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import markdown_table, record  # noqa: E402

from ocula.index import build_index  # noqa: E402

SWEEPS = {  # backend -> (build parameters, search knob, values, queries used)
    "brute": ({}, None, [None], 10_000),
    "kdtree": ({}, None, [None], 200),
    "balltree": ({}, None, [None], 200),
    "kdforest": ({"trees": 4, "leaf_size": 16}, "checks", [64, 256, 1024, 4096], 1000),
    "hnswlib": ({"M": 16, "ef_construction": 200}, "ef", [10, 20, 40, 80, 160, 320], 10_000),
    "faiss-hnsw": ({"M": 32, "ef_construction": 40}, "ef", [16, 32, 64, 128, 256, 512], 10_000),
    "faiss-ivf": ({"nlist": 1024}, "nprobe", [1, 2, 4, 8, 16, 32, 64], 10_000),
    "faiss-ivfpq": ({"nlist": 1024, "m": 56, "bits": 8, "refine": 10}, "nprobe", [4, 8, 16, 32, 64], 10_000),
}


def load_average() -> float:
    return os.getloadavg()[0]


def recall(ids: np.ndarray, gallery: np.ndarray, queries: np.ndarray, true_kth: np.ndarray) -> float:
    """ann-benchmarks' k-nn recall: returned ids whose true distance is within the k-th true distance (+1e-3)."""
    d = ((gallery[ids] - queries[:, None]) ** 2).sum(-1) ** 0.5
    return float((d <= true_kth[:, None] + 1e-3).mean())


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def ann(args) -> None:
    from ocula.data.layout import open_dataset

    gallery = open_dataset("fashion-mnist", "train").images.reshape(60_000, -1).astype(np.float32)
    queries = open_dataset("fashion-mnist", "test").images.reshape(10_000, -1).astype(np.float32)
    k = 10
    exact = build_index(gallery, "brute")
    true_d, _ = exact.search(queries, k, threads=2)
    true_kth = np.sqrt(true_d[:, -1].astype(np.float64))
    rows, best = [], {}
    print(f"load average before: {load_average():.2f}", flush=True)
    for backend in args.backends:
        build, knob, values, n_q = SWEEPS[backend]
        build_s, index = timed(lambda: build_index(gallery, backend, **build))
        q = queries[:n_q]
        for value in values:
            search = {knob: value} if knob else {}
            for threads in args.threads:
                variants = [("ocula", lambda: index.search(q, k, threads=threads, **search)[1])]
                if backend == "hnswlib":
                    index.graph.set_ef(value)
                    variants.append(("hnswlib direct",
                                     lambda: index.graph.knn_query(q, k=k, num_threads=threads)[0]))
                if backend.startswith("faiss"):
                    variants.append(("faiss direct", lambda: _faiss_direct(index, q, k, threads, search)))
                for who, fn in variants:
                    fn()  # warm-up (allocations, faiss parameter set)
                    seconds, ids = timed(fn)
                    r, qps = recall(np.asarray(ids), gallery, q, true_kth[:n_q]), n_q / seconds
                    rows.append([backend, who, f"{knob}={value}" if knob else "exact", threads, f"{r:.4f}",
                                 f"{qps:,.0f}", n_q, f"{build_s:.1f}", f"{load_average():.2f}"])
                    print(" | ".join(map(str, rows[-1])), flush=True)
                    for target in (0.9, 0.99):
                        key = (target, threads, backend, who)
                        if r >= target and qps > best.get(key, 0):
                            best[key] = qps
    summary = [[f"{t:.2f}", th, b, who, f"{qps:,.0f}"] for (t, th, b, who), qps in sorted(best.items())]
    body = (f"Gallery 60,000 x 784 raw pixels, queries 10,000 (fewer where noted), k = 10; load average "
            f"{args.load_before:.2f} before the run. QPS = queries / wall seconds of one batched search call; "
            "build seconds: hnswlib on 1 thread (a reproducible graph), faiss with its default OpenMP threads "
            "(2).\n\n"
            + markdown_table(["backend", "called", "setting", "threads", "recall@10", "QPS", "queries",
                              "build s", "load"], rows)
            + "\n\nBest QPS at recall >= 0.9 and >= 0.99:\n\n"
            + markdown_table(["recall", "threads", "backend", "called", "QPS"], summary)
            + "\n\nPublished anchors (ann-benchmarks fork, 2021, 2 vCPUs, one thread, one query per call): hnswlib "
              "9,948 / 5,075 QPS at recall 0.9 / 0.99; faiss HNSW 5,870 / 3,466; faiss IVF 2,557 / 1,016; BLAS "
              "brute force 30; scikit-learn KDTree 15.")
    if args.record:
        record("Nearest-neighbour search: fashion-mnist-784-euclidean", body)
    else:
        print(body)


def _faiss_direct(index, q, k, threads, search):
    import faiss

    faiss.omp_set_num_threads(threads)
    index._set(**search)
    return index.index.search(q, k)[1]


OMNIGLOT = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "omniglot"
GLYPH = 28  # Omniglot's 105x105 drawings shrunk as in most one-shot work


def glyph(data: bytes) -> np.ndarray:
    """A 105x105 drawing (black strokes on white) as 28x28 bright strokes on black, like MNIST."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("L").resize((GLYPH, GLYPH), Image.Resampling.BOX)
    return 255 - np.asarray(image, dtype=np.uint8)


def omniglot_set(name: str):
    """A background set as an ImageSet: one class per character (alphabet/characterNN), 20 drawers each."""
    import zipfile

    from ocula.data.classification import ImageSet

    with zipfile.ZipFile(OMNIGLOT / f"{name}.zip") as z:
        files = sorted(n for n in z.namelist() if n.endswith(".png"))
        classes = sorted({"/".join(n.split("/")[1:3]) for n in files})
        index = {c: i for i, c in enumerate(classes)}
        images = np.stack([glyph(z.read(n)) for n in files])
        labels = np.array([index["/".join(n.split("/")[1:3])] for n in files])
    return ImageSet(images, labels, classes, 255.0, f"omniglot-{name}")


def one_shot_runs():
    """The 20 official 20-way one-shot runs: (20 training glyphs, 20 test glyphs, the test glyphs' true class)."""
    import zipfile

    runs = []
    with zipfile.ZipFile(OMNIGLOT / "all_runs.zip") as z:
        for r in range(1, 21):
            pairs = [line.split() for line in z.read(f"run{r:02d}/class_labels.txt").decode().split("\n") if line]
            train_files = sorted({t for _, t in pairs})
            runs.append((np.stack([glyph(z.read(f)) for f in train_files]),
                         np.stack([glyph(z.read(q)) for q, _ in pairs]),
                         np.array([train_files.index(t) for _, t in pairs])))
    return runs


def omniglot(args) -> None:
    import torch

    from ocula.engine.trainer import TrainConfig
    from ocula.modelfile import load_model, save_model
    from ocula.tasks.embed import embed
    from ocula.tasks.recognize import train_embedder

    sets = args.background
    tag = "+".join(sets) + ("-rot" if args.rotations else "")
    model_file = Path(f"runs/recognize/omniglot-{tag}/model.ocula")
    background = join([omniglot_set(f"images_background_{name}") for name in sets])
    config = TrainConfig(epochs=args.epochs, batch_size=128, lr=3e-3, threads=max(args.threads), seed=0)
    if model_file.is_file() and not args.retrain:
        model = load_model(model_file, device="cpu")
        if "epochs" not in model.info.metrics:
            raise SystemExit(f"{model_file} does not record its epochs (an older benchmark wrote it): add --retrain")
    else:
        start = time.perf_counter()
        model = train_embedder(with_rotations(background) if args.rotations else background, config,
                               widths=args.widths, progress=True)
        model.info.metrics.update(train_seconds=round(time.perf_counter() - start, 1), epochs=config.epochs)
        save_model(model_file, model, model.info)
    epochs, train_seconds = model.info.metrics["epochs"], model.info.metrics["train_seconds"]  # the file's own
    torch.set_num_threads(1)
    vec = lambda images: embed(model, images, normalize=True)
    if args.validate:  # choose the recipe on small2's characters, never on the official runs
        if "small2" in sets:
            raise SystemExit("--validate needs an embedder that never saw small2: --background small1")
        data = omniglot_set("images_background_small2")
        print(f"{tag}, {epochs} epochs ({train_seconds} s): 20-way one-shot error on 1000 episodes of "
              f"small2 characters: {100 * episode_error(vec(data.images), data.labels):.2f} %")
        return
    errors = []
    for train_glyphs, test_glyphs, truth in one_shot_runs():
        _, ids = build_index(vec(train_glyphs), "brute").search(vec(test_glyphs), 1)
        errors.append(float((ids[:, 0] != truth).mean()))
    lines = [f"Embedder: cnn widths {args.widths} ({sum(p.numel() for p in model.parameters()):,} parameters) trained "
             f"with a normalised softmax (scale 16) on background {' + '.join(sets)} only "
             f"({len(background.classes)} characters"
             f"{', each rotated by 0, 90, 180 and 270 degrees as 4 classes' if args.rotations else ''}, "
             f"{len(background)} glyphs at {GLYPH}x{GLYPH}), {epochs} epochs, {train_seconds} s; unit "
             f"{model.head[-1].in_features}-d penultimate embeddings. Load average {args.load_before:.2f} at start.",
             "", markdown_table(["one-shot 20-way (20 official runs)", "error %", "runs' error % (min-max)"],
                                [["1-NN, cosine", f"{100 * np.mean(errors):.1f}",
                                  f"{100 * min(errors):.0f}-{100 * max(errors):.0f}"]]),
             "", "Anchors (Lake et al. 2015, on the full background set): people 4.5 %, Bayesian program learning "
             "3.3 %, Siamese convnet 8.0 %."]
    section = "Nearest-neighbour recognition: Omniglot"
    if sets == ["small1"]:  # many-class recognition runs on small2, so only an embedder that never saw it
        lines += many_class(vec, background, args)
    else:
        section += f" one-shot, embedder on {' + '.join(sets)}"
    record(section, "\n".join(lines)) if args.record else print("\n".join(lines))


def with_rotations(data):
    """Each character rotated by 90, 180 and 270 degrees as three more classes (Vinyals et al. 2016): four times
    the classes for the metric to separate, from the same drawings."""
    from ocula.data.classification import ImageSet

    n = len(data.classes)
    return ImageSet(np.concatenate([np.rot90(data.images, r, axes=(1, 2)) for r in range(4)]),
                    np.concatenate([data.labels + r * n for r in range(4)]),
                    [f"{c}@{90 * r}" for r in range(4) for c in data.classes], data.value_max, data.name + "-rot")


def episode_error(vectors: np.ndarray, labels: np.ndarray, *, episodes: int = 1000, way: int = 20) -> float:
    """Error of cosine 1-NN on random `way`-way one-shot episodes, built like the official runs: `way` characters,
    one drawing of each as the reference and another as the query (seed 0)."""
    rng = np.random.default_rng(0)
    wrong = 0
    for _ in range(episodes):
        picks = [rng.choice(np.flatnonzero(labels == c), 2, replace=False)
                 for c in rng.choice(np.unique(labels), way, replace=False)]
        ref, query = vectors[[p[0] for p in picks]], vectors[[p[1] for p in picks]]
        wrong += int(((query @ ref.T).argmax(1) != np.arange(way)).sum())
    return wrong / (episodes * way)


def join(sets: list):
    """Image sets as one, their classes kept apart."""
    from ocula.data.classification import ImageSet

    offsets = np.cumsum([0] + [len(s.classes) for s in sets])
    return ImageSet(np.concatenate([s.images for s in sets]),
                    np.concatenate([s.labels + o for s, o in zip(sets, offsets)]),
                    [f"{s.name}/{c}" for s in sets for c in s.classes], 255.0, "+".join(s.name for s in sets))


def k_shot(labels: np.ndarray, k: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """k reference indices per class drawn at random, and the rest as queries."""
    ref = np.concatenate([rng.choice(np.flatnonzero(labels == c), k, replace=False) for c in np.unique(labels)])
    return ref, np.setdiff1d(np.arange(len(labels)), ref)


GRANULES = (32, 64)  # TWD's m, as in the issue


def choose_thresholds(g, gl, q, ql) -> tuple[dict, float]:
    """TWD's delta for each m and the ratio baseline's threshold (m = 32) on held-out data (never the test
    queries): the most pruning whose error stays within 0.5 points of brute-force 1-NN there."""
    from ocula.index.twd import ThreeWayDecisions

    exact = float((gl[build_index(g, "brute").search(q, 1)[1][:, 0]] != ql).mean())

    def ok(rule, m=32, **p):
        errors = ThreeWayDecisions(m=m, rule=rule, **p).fit(g, gl).predict(q).labels != ql
        return float(errors.mean()) <= exact + 0.005

    deltas = {m: next(d for d in (1.05, 1.1, 1.2, 1.3, 1.5, 2.0, 3.0, 1e9) if ok("twd", m, delta=d))
              for m in GRANULES}
    ratio = next(r for r in (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 1e-9) if ok("ratio", ratio=r))
    return deltas, ratio


def many_class(vec, background, args) -> list[str]:
    """Background set 2 (never seen in training): k references per character, the other drawers as queries."""
    data = omniglot_set("images_background_small2")
    vectors = vec(data.images)
    rng = np.random.default_rng(0)
    seen = vec(background.images)
    out = ["", f"Many-class recognition on background small2 ({len(data.classes)} characters never seen in training): "
           "k references per character drawn at random (seed 0), the other drawers' glyphs as queries; time per "
           "query on one thread, all queries in one call (marked batch) or one query per call; TWD and the ratio "
           "baseline take all queries in one call too. TWD's delta and "
           "the ratio baseline's threshold were chosen on background small1 (the training characters), never on "
           "these queries.", ""]
    rows = []
    for k in args.k:
        ref, query = k_shot(background.labels, k, np.random.default_rng(1))
        deltas, ratio = choose_thresholds(seen[ref], background.labels[ref], seen[query], background.labels[query])
        ref, query = k_shot(data.labels, k, rng)
        g, gl, q, ql = vectors[ref], data.labels[ref], vectors[query], data.labels[query]
        compare(rows, k, g, gl, q, ql, deltas, ratio, softmax=True,
                backends=(*BACKENDS[:-1], ("faiss-ivf", {"nlist": 32})))
    return out + [markdown_table(TABLE, rows)]


BACKENDS = (("kdtree", {}), ("balltree", {}), ("kdforest", {}), ("hnswlib", {}), ("faiss-hnsw", {}),
            ("faiss-ivf", {}))
TABLE = ["k", "references", "classifier", "error %", "ms / query", "faster than batched brute force",
         "fewer distance terms than brute force"]


def compare(rows: list, k, g, gl, q, ql, deltas: dict, ratio: float, *, softmax: bool, backends=(),
            per_call: int | None = None) -> None:
    """Error and time per query of each classifier over the gallery (g, gl) for the queries (q, ql)."""
    from sklearn.linear_model import LogisticRegression

    from ocula.index.twd import ThreeWayDecisions

    brute_ms = {}

    def row(name, predict, batched=False, terms=None, n=len(q)):
        seconds, labels = timed(predict)
        ms = 1000 * seconds / n
        if name == "brute-force 1-NN":
            brute_ms["batched"] = ms
        rows.append([k, len(g), name, f"{100 * float((labels != ql[:n]).mean()):.2f}",
                     f"{ms:.3f}" + (" (batch)" if batched else ""),
                     f"{brute_ms['batched'] / ms:.1f}x" if brute_ms else "",
                     f"{g.size / terms:.1f}x" if terms else ""])

    if softmax:
        model = LogisticRegression(max_iter=2000, C=10).fit(g, gl)
        row("softmax regression", lambda: model.predict(q), batched=True)
    brute = build_index(g, "brute")
    row("brute-force 1-NN", lambda: gl[brute.search(q, 1)[1][:, 0]], batched=True)
    n = per_call or len(q)
    row(f"brute-force 1-NN, one query per call{f' (first {n})' if n < len(q) else ''}",
        lambda: gl[np.concatenate([brute.search(x[None], 1)[1][:, 0] for x in q[:n]])], n=n)
    pca = build_index(g, "brute", pca=64)
    row("PCA-64 1-NN", lambda: gl[pca.search(q, 1)[1][:, 0]], batched=True, terms=len(g) * 64)
    for backend, params in backends:
        index = build_index(g, backend, **params)
        row(f"{backend} 1-NN", lambda: gl[index.search(q, 1)[1][:, 0]], batched=True)
    for m, delta in deltas.items():
        twd = ThreeWayDecisions(m=m, delta=delta).fit(g, gl)
        row(f"TWD m={m}, delta={delta}", lambda: twd.predict(q).labels, terms=twd.predict(q).terms.mean())
    baseline = ThreeWayDecisions(m=32, rule="ratio", ratio=ratio).fit(g, gl)
    row(f"distance ratio m=32, ratio={ratio}", lambda: baseline.predict(q).labels,
        terms=baseline.predict(q).terms.mean())


def twd(args) -> None:
    """TWD against brute force on a large gallery: a training split as references and its test split as queries,
    Fashion-MNIST's raw pixels (784-d) or vector files of embeddings (`ocula embed`, e.g. CIFAR-10). delta and the
    ratio threshold are chosen with the training split's last 10k (or fifth) as queries against the rest."""
    from ocula.data.layout import open_dataset
    from ocula.tasks.embed import load_vectors

    if args.vectors:
        (g, gl, meta), (q, ql, _) = load_vectors(args.vectors[0]), load_vectors(args.vectors[1])
        data = meta["source"]["data"]
        what = f"{data} embeddings {args.vectors[0]} / {args.vectors[1]} ({g.shape[1]}-d)"
    else:
        train, test = open_dataset("fashion-mnist", "train"), open_dataset("fashion-mnist", "test")
        g, q = (d.images.reshape(len(d), -1).astype(np.float32) for d in (train, test))
        gl, ql, data = train.labels, test.labels, "Fashion-MNIST"
        what = "Fashion-MNIST raw pixels (784-d)"
    import torch

    torch.set_num_threads(1)
    # Held-out training images pick the thresholds: a random split, since embedding files list images by class.
    order = np.random.default_rng(0).permutation(len(g))
    cut = len(g) - min(10_000, len(g) // 5)
    ref, held = order[:cut], order[cut:cut + 2000]
    deltas, ratio = choose_thresholds(g[ref], gl[ref], g[held], gl[held])
    rows = []
    compare(rows, "all", g, gl, q, ql, deltas, ratio, softmax=bool(args.vectors), per_call=500,
            backends=BACKENDS[3:] if args.vectors else ())  # the trees take minutes here: see the ann workload
    body = (f"{what}: {len(g):,} training images as references, the {len(q):,} test images as queries, "
            f"one thread; load average {args.load_before:.2f} at start. delta and the ratio threshold were chosen "
            f"on the training split (2,000 random images of it against {cut:,} others), never "
            "on the test queries.\n\n" + markdown_table(TABLE, rows))
    record(f"TWD vs brute force: {data} {'embeddings' if args.vectors else 'pixels'}", body) if args.record \
        else print(body)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("workload", choices=["ann", "omniglot", "twd"])
    p.add_argument("--vectors", nargs=2, metavar=("GALLERY", "QUERIES"), help="twd: vector files from ocula embed")
    p.add_argument("--epochs", type=int, default=20, help="omniglot: embedder training epochs")
    p.add_argument("--widths", type=int, nargs="+", default=[32, 64, 256], help="omniglot: the embedder's cnn")
    p.add_argument("--retrain", action="store_true", help="omniglot: train the embedder even if its file exists")
    p.add_argument("--background", nargs="+", default=["small1"], choices=["small1", "small2"],
                   help="omniglot: background sets the embedder learns from (small2 too: one-shot runs only)")
    p.add_argument("--k", type=int, nargs="+", default=[1, 5], help="omniglot: references per class")
    p.add_argument("--rotations", action="store_true", help="omniglot: rotated characters as more classes")
    p.add_argument("--validate", action="store_true",
                   help="omniglot: only score one-shot episodes on small2 (an embedder trained on small1)")
    p.add_argument("--backends", nargs="+", default=list(SWEEPS))
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--no-record", dest="record", action="store_false", help="print only; leave RESULTS.md alone")
    args = p.parse_args()
    args.load_before = load_average()
    {"ann": ann, "omniglot": omniglot, "twd": twd}[args.workload](args)


if __name__ == "__main__":
    main()
