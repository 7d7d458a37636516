"""ocula.index: exact backends find the exact neighbours, approximate ones find most, saved indexes answer the
same, added references are found, and bad input gets one line."""

import numpy as np
import pytest

from ocula.errors import OculaError
from ocula.index import BACKENDS, build_index, load_index

EXACT = ("brute", "kdtree", "balltree")
# small galleries, small codebooks; IVF-PQ re-ranks 16k candidates by exact distance
SMALL = {"faiss-ivf": dict(nlist=8), "faiss-ivfpq": dict(nlist=8, m=8, bits=4, refine=16)}


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(600, 16)).astype(np.float32)
    queries = rng.normal(size=(40, 16)).astype(np.float32)
    d = ((queries[:, None] - gallery[None]) ** 2).sum(-1)
    return gallery, queries, np.argsort(d, 1)[:, :5], np.sort(d, 1)[:, :5]


@pytest.mark.parametrize("backend", EXACT)
def test_exact_backends_return_the_exact_neighbours(data, backend):
    gallery, queries, ids, dists = data
    d, i = build_index(gallery, backend).search(queries, k=5)
    assert (i == ids).all()
    np.testing.assert_allclose(d, dists, rtol=1e-4, atol=1e-4)


def test_forest_is_exact_when_it_checks_every_reference(data):
    gallery, queries, ids, _ = data
    index = build_index(gallery, "kdforest", trees=3, leaf_size=8)
    # checks count a reference once per tree that offers it: three trees, three times the gallery covers all
    assert (index.search(queries, k=5, checks=3 * len(gallery))[1] == ids).all()
    few = index.search(queries, k=5, checks=32)[1]
    assert (few == ids).mean() < 1  # with few checks it is approximate, as it should be: not a brute force


@pytest.mark.parametrize("backend", ["kdforest", "hnswlib", "faiss-hnsw", "faiss-ivf", "faiss-ivfpq"])
def test_approximate_backends_find_most_neighbours_and_load_identically(data, backend, tmp_path):
    gallery, queries, ids, _ = data
    index = build_index(gallery, backend, **SMALL.get(backend, {}))
    search = {"checks": 300} if backend == "kdforest" else {}
    d, i = index.search(queries, k=5, **search)
    recall = np.mean([len(set(a) & set(b)) / 5 for a, b in zip(i, ids)])
    assert recall >= 0.9
    loaded = load_index(index.save(tmp_path / "gallery.index"))
    d2, i2 = loaded.search(queries, k=5, **search)
    assert (i2 == i).all() and np.allclose(d2, d)
    assert type(loaded) is BACKENDS[backend] and len(loaded) == len(gallery)


def test_cosine_and_pca_travel_with_the_file(data, tmp_path):
    gallery, queries, _, _ = data
    index = build_index(gallery * 7, "brute", metric="cosine", pca=8)
    d, i = index.search(queries, k=3)
    loaded = load_index(index.save(tmp_path / "g.index"))
    assert (loaded.search(queries, k=3)[1] == i).all()
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    cos = build_index(gallery, "brute", metric="cosine").search(queries, k=1)[0][:, 0]
    np.testing.assert_allclose(cos, 1 - (unit(queries) @ unit(gallery).T).max(1), atol=1e-5)
    assert index.pca.components.shape == (8, 16)


@pytest.mark.parametrize("backend", ["brute", "kdtree", "kdforest", "hnswlib"])
def test_added_references_are_found_without_rebuilding(data, backend):
    gallery, queries, _, _ = data
    index = build_index(gallery, backend)
    ids = index.add(queries[:5] + 1e-3)
    assert list(ids) == list(range(600, 605)) and len(index) == 605
    assert (index.search(queries[:5], k=1)[1][:, 0] == ids).all()


@pytest.mark.parametrize("bad, message", [
    (np.zeros((3, 15), np.float32), "dimension 15"),
    (np.full((2, 16), np.nan, np.float32), "NaN"),
    (np.zeros((0, 16), np.float32), "empty"),
    (np.zeros((2, 4, 4), np.float32), "2-D"),
])
def test_bad_queries_get_one_line(data, bad, message):
    index = build_index(data[0], "brute")
    with pytest.raises(OculaError, match=message) as e:
        index.search(bad)
    assert "\n" not in str(e.value)


def test_bad_galleries_options_and_files_get_one_line(tmp_path):
    with pytest.raises(OculaError, match="empty"):
        build_index(np.zeros((0, 4)), "hnswlib")
    with pytest.raises(OculaError, match="NaN"):
        build_index(np.array([[1.0, np.nan]]), "kdtree")
    with pytest.raises(OculaError, match="unknown index backend"):
        build_index(np.ones((2, 2)), "annoy")
    with pytest.raises(OculaError, match="unknown search option"):
        build_index(np.ones((2, 2)), "brute").search(np.ones((1, 2)), nprobe=3)
    (tmp_path / "x.index").write_bytes(b"not an index")
    with pytest.raises(OculaError, match="not an ocula index file"):
        load_index(tmp_path / "x.index")
