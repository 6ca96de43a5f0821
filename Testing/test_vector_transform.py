"""The learned vector transform: fit/apply math, fallback for few vectors, pinned in the manifest, applied alike to queries
and stored vectors, refitted when the index doubles, and indexes without one unchanged."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from volume_helpers import write_blob_cases

from CBIRSlicerLib.errors import IndexCorruptError, ParameterError
from CBIRSlicerLib.index import vector_transform
from CBIRSlicerLib.index.files import MANIFEST, TRANSFORM
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.models.registry import create_embedder
from CBIRSlicerLib.retrieval.queries import item_query
from CBIRSlicerLib.retrieval.search import Searcher

SHAPE = (40, 40, 20)
SETTINGS = IndexSettings(axes=["axial"], stride_mm=4.0, tile_sizes_mm=[20.0])
# Four points around (1, 2): variance 4.5 along x, 0.5 along y.
POINTS = np.array([[4.0, 2.0], [-2.0, 2.0], [1.0, 3.0], [1.0, 1.0]])


def test_centering_and_whitening_on_known_points():
    centred = vector_transform.fit(POINTS, "center", fallback=False)
    assert centred.kind == "center" and np.allclose(centred.mean, [1, 2])
    assert np.allclose(centred.apply([[4.0, 3.0]]), [[3 / np.sqrt(10), 1 / np.sqrt(10)]], atol=1e-6)
    # Full whitening evens out the two variances: (3, 1) becomes (3 / sqrt(4.5), 1 / sqrt(0.5)), i.e. 45 degrees.
    white = vector_transform.fit(POINTS, "whiten", shrinkage=0.0, fallback=False)
    assert white.kind == "whiten" and np.allclose(white.apply([[4.0, 3.0]]), [[np.sqrt(0.5), np.sqrt(0.5)]], atol=1e-6)
    centred_points = POINTS - POINTS.mean(axis=0)
    whitened = centred_points @ white.matrix
    assert np.allclose(np.cov(whitened.T, bias=True), 2.5 * np.eye(2), atol=1e-5)  # scaled to the mean eigenvalue 2.5
    # Shrinkage 0.5: variances 0.5 * (4.5, 0.5) + 0.5 * 2.5 = (3.5, 1.5).
    half = vector_transform.fit(POINTS, "whiten", shrinkage=0.5, fallback=False)
    expected = np.array([3 / np.sqrt(3.5), 1 / np.sqrt(1.5)])
    assert np.allclose(half.apply([[4.0, 3.0]]), [expected / np.linalg.norm(expected)], atol=1e-6)
    # Shrinkage 1 is centering.
    assert np.allclose(vector_transform.fit(POINTS, "whiten", 1.0, fallback=False).apply(POINTS), centred.apply(POINTS), atol=1e-6)
    assert np.allclose(np.linalg.norm(half.apply(POINTS), axis=1), 1, atol=1e-6)
    with pytest.raises(ParameterError, match="shrinkage"):
        vector_transform.fit(POINTS, "whiten", shrinkage=1.5)
    with pytest.raises(ParameterError, match="must be one of"):
        vector_transform.fit(POINTS, "pca")


def test_folded_query_ranks_raw_vectors_by_the_transformed_score():
    rng = np.random.default_rng(1)
    raw = rng.normal(size=(600, 8)) + 3
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    fitted = vector_transform.fit(raw, "whiten", 0.1)
    assert fitted.kind == "whiten"
    query = raw[:3]
    unnormalised = ((raw - fitted.mean) @ fitted.matrix) @ ((query - fitted.mean) @ fitted.matrix).T
    folded = raw @ fitted.fold(query).T
    # Equal up to a positive scale and an offset per query: the same order of stored vectors.
    for column in range(3):
        slope, offset = np.polyfit(unnormalised[:, column], folded[:, column], 1)
        assert slope > 0 and np.allclose(folded[:, column], slope * unnormalised[:, column] + offset, atol=1e-5)


def test_first_stage_finds_the_exact_transformed_neighbours():
    from CBIRSlicerLib.index.faiss_store import VectorStore

    rng = np.random.default_rng(2)
    raw = rng.normal(size=(2000, 16)) * np.linspace(3, 0.2, 16) + 2
    raw = (raw / np.linalg.norm(raw, axis=1, keepdims=True)).astype(np.float32)
    store = VectorStore.create(16, "flat")
    store.add(raw, np.arange(2000) + 100)
    fitted = vector_transform.fit(raw, "whiten", 0.3)
    queries = raw[:4]
    scores, ids = vector_transform.first_stage(store, fitted, queries, 10, excluded=np.array([100]))
    exact = fitted.apply(queries) @ fitted.apply(raw).T
    exact[:, 0] = -np.inf  # id 100 excluded
    assert np.array_equal(ids, np.argsort(-exact, axis=1)[:, :10] + 100)
    assert np.allclose(scores, np.sort(exact, axis=1)[:, ::-1][:, :10], atol=1e-5)


def test_small_fits_fall_back():
    dim = 512
    least = int(np.ceil(vector_transform.WHITEN_MIN_PER_DIM * dim))
    vectors = np.random.default_rng(0).normal(size=(least, dim))
    assert vector_transform.fit(vectors[:vector_transform.CENTER_MIN_VECTORS - 1]).kind == "identity"
    assert vector_transform.fit(vectors[:vector_transform.CENTER_MIN_VECTORS]).kind == "center"
    assert vector_transform.fit(vectors[:-1]).kind == "center"
    assert vector_transform.fit(vectors).kind == "whiten"
    assert vector_transform.needs_refit(None, 10) and not vector_transform.needs_refit({"checksum": "x", "fitted_on": 10}, 19)
    assert vector_transform.needs_refit({"checksum": "x", "fitted_on": 10}, 20)


@pytest.fixture(scope="module")
def embedder():
    return create_embedder("handcrafted")


@pytest.fixture(scope="module")
def grown(tmp_path_factory, embedder):
    """An index of 2 cases, then grown to 4 (refit) and 5 (no refit); manifests and stored vectors after each step."""
    cases = str(tmp_path_factory.mktemp("cases"))
    paths = write_blob_cases(cases, 5)
    folder = str(tmp_path_factory.mktemp("index") / "idx")
    steps = []
    with Index.create(folder, embedder, SETTINGS) as index:
        index.add_sources(paths[:2], embedder)
    for upto in (4, 5):
        steps.append(_state(folder))
        with Index.open(folder, writable=True) as index:
            index.add_sources(paths[:upto], embedder)
    steps.append(_state(folder))
    return folder, steps


def _state(folder):
    index = Index.open(folder)
    ids = index.store.ids()
    state = {"manifest": json.load(open(os.path.join(folder, MANIFEST))), "ids": ids.copy(), "raw": index.store.reconstruct(ids)}
    index.close()
    return state


def test_pinned_in_manifest_and_reloaded_identical(grown):
    folder, (two, four, five) = grown
    pinned = two["manifest"]["transform"]
    assert len(two["ids"]) > 500
    assert pinned["kind"] == "whiten" and pinned["requested"] == "whiten" and pinned["fitted_on"] == len(two["ids"])
    assert pinned["shrinkage"] == vector_transform.SHRINKAGE and len(pinned["checksum"]) == 64 and pinned["fitted"]
    index = Index.open(folder)
    assert os.path.isfile(os.path.join(folder, TRANSFORM)) and index.info()["transform"] == five["manifest"]["transform"]
    assert index.transform.checksum() == five["manifest"]["transform"]["checksum"]
    # Fitted on the four cases' vectors when the index doubled: the same numbers again from those vectors.
    fitted = vector_transform.fit(four["raw"], "whiten")
    assert index.transform.fitted_on == len(four["ids"])
    assert np.allclose(index.transform.mean, fitted.mean, atol=1e-6) and np.allclose(index.transform.matrix, fitted.matrix, atol=1e-4)
    reopened = Index.open(folder)
    assert np.array_equal(reopened.transform.matrix, index.transform.matrix)
    assert np.array_equal(reopened.transform.mean, index.transform.mean)
    index.close()
    reopened.close()


def test_refit_when_doubled_and_raw_vectors_kept(grown):
    _, (two, four, five) = grown
    assert four["manifest"]["transform"]["fitted_on"] == len(four["ids"]) >= 2 * len(two["ids"])
    assert four["manifest"]["transform"]["checksum"] != two["manifest"]["transform"]["checksum"]
    assert five["manifest"]["transform"] == four["manifest"]["transform"]  # grown less than twofold: kept
    # The stored vectors stay the model's raw unit vectors: the first cases' are bit for bit those of before the refit.
    assert np.array_equal(four["raw"][:len(two["ids"])], two["raw"]) and np.allclose(np.linalg.norm(five["raw"], axis=1), 1, atol=1e-5)


def test_query_and_stored_vectors_transformed_alike(grown, embedder):
    folder, _ = grown
    index = Index.open(folder)
    searcher = Searcher(index, embedder)
    transform = index.transform
    stored = index.store.ids()
    # The item least like the mean: a query whose transformed and raw scores differ most.
    item = int(stored[np.argmax(np.linalg.norm(index.store.reconstruct(stored) - transform.mean, axis=1))])
    answer = searcher.search(item_query(index, item), k=3)
    query = index.store.reconstruct(np.array([item]))
    for result in answer.results:
        case = index.catalog.case_by_id(result.case_id)
        items = index.store.reconstruct(np.array([i.id for i in index.catalog.items_of_cases([case.row])[case.row]], np.int64))
        expected = float((transform.apply(items) @ transform.apply(query).T).max())
        assert result.score == pytest.approx(expected, abs=1e-5)
        assert abs(result.score - float((items @ query.T).max())) > 1e-3  # not the raw cosine
    index.close()


def test_tampered_transform_refused_by_readers_and_writers(grown, tmp_path):
    import shutil

    folder, _ = grown
    copy = str(tmp_path / "copy")
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(".lock"))
    vector_transform.fit(POINTS, "center", fallback=False).save(os.path.join(copy, TRANSFORM))
    # The transform is an owned file of the sealed manifest: readers refuse it, and writers never seal damage.
    for writable in (False, True):
        with pytest.raises(IndexCorruptError, match="transform.npz: holds .* bytes, the manifest says"):
            Index.open(copy, writable=writable)


def test_index_without_transform_compares_raw_vectors(grown, embedder, tmp_path):
    import shutil

    folder, _ = grown
    copy = str(tmp_path / "old")
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns(".lock", TRANSFORM))
    path = os.path.join(copy, MANIFEST)
    manifest = json.load(open(path))
    del manifest["transform"]  # as an index made before transforms
    manifest["files"].pop(TRANSFORM, None)
    from CBIRSlicerLib.atomic import write_json_atomically
    from CBIRSlicerLib.index.integrity import seal
    from CBIRSlicerLib.index.keyed_seal import sign

    write_json_atomically(path, seal(sign(manifest)))
    index = Index.open(copy)
    assert index.transform is None
    item = int(index.store.ids()[5])
    answer = Searcher(index, embedder).search(item_query(index, item), k=3)
    query = index.store.reconstruct(np.array([item]))
    for result in answer.results:
        case = index.catalog.case_by_id(result.case_id)
        ids = np.array([i.id for i in index.catalog.items_of_cases([case.row])[case.row]], np.int64)
        assert result.score == pytest.approx(float((index.store.reconstruct(ids) @ query.T).max()), abs=1e-5)
    assert answer.results[-1].score > 0.9
    index.close()
    with Index.open(copy, writable=True) as writer:
        writer.checkpoint()
    assert "transform" not in json.load(open(path)) and not os.path.exists(os.path.join(copy, TRANSFORM))


def test_small_index_falls_back_to_identity(tmp_path, embedder):
    paths = write_blob_cases(str(tmp_path), 1)
    folder = str(tmp_path / "small")
    with Index.create(folder, embedder, IndexSettings(axes=["axial"], stride_mm=4.0, tile_sizes_mm=[], blobs_per_slice=0)) as index:
        index.add_sources(paths, embedder)
    index = Index.open(folder)
    pinned = index.manifest["transform"]
    assert pinned["kind"] == "identity" and pinned["fitted_on"] == index.store.count < vector_transform.CENTER_MIN_VECTORS
    assert index.transform is None
    index.close()
