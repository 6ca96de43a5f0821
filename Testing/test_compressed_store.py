"""The compressed store ('ivfpq'): codes find candidates, float16 rows on disk re-score them exactly; deletions, filters,
transform refresh, reopening and integrity as for the other structures. Small sets, the type forced."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from volume_helpers import write_blob_cases

from CBIRSlicerLib.errors import IndexCorruptError
from CBIRSlicerLib.index import vector_transform
from CBIRSlicerLib.index.compressed import list_count, probe_count, rows_path_of, train_size
from CBIRSlicerLib.index.faiss_store import VectorStore, choose_kind
from CBIRSlicerLib.index.files import MANIFEST, ROWS
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.models.registry import create_embedder
from CBIRSlicerLib.retrieval.queries import item_query
from CBIRSlicerLib.retrieval.search import Searcher

DIM = 32
SETTINGS = IndexSettings(axes=["axial"], stride_mm=4.0, tile_sizes_mm=[20.0])


def clustered(count=3000, clusters=30, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    vectors = centres[rng.integers(0, clusters, count)] + 0.6 * rng.standard_normal((count, DIM)).astype(np.float32)
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """The same 3,000 clustered vectors (ids 10, 13, 16, ...) in an exact store and a compressed one saved and reopened."""
    vectors = clustered()
    ids = 10 + 3 * np.arange(len(vectors), dtype=np.int64)
    flat = VectorStore.create(DIM, "flat")
    flat.add(vectors, ids)
    path = str(tmp_path_factory.mktemp("store") / "vectors.faiss")
    built = VectorStore.create(DIM, "ivfpq", rows_path_of(path) + ".new", vectors)
    for start in range(0, len(vectors), 1000):  # added in pieces, as cases are
        built.add(vectors[start:start + 1000], ids[start:start + 1000])
    built.save(path)
    queries = vectors[::100] + 0.1 * np.random.default_rng(1).standard_normal((30, DIM)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return vectors, ids, flat, VectorStore.load(path, "ivfpq", DIM), queries, path


def test_compressed_search_finds_the_exact_neighbours_with_exact_scores(stores):
    vectors, ids, flat, store, queries, path = stores
    assert store.count == 3000 and np.array_equal(store.ids(), ids)
    assert os.path.getsize(rows_path_of(path)) == 3000 * DIM * 2  # float16 rows
    exact_scores, exact_ids = flat.search(queries, 10)
    scores, found = store.search(queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact_ids)])
    assert recall >= 0.95
    # Scores are re-computed from the rows: the exact cosines, to float16 rounding of the stored vectors.
    position = (found - 10) // 3
    expected = np.einsum("qkd,qd->qk", vectors[position], queries)
    assert np.abs(scores - expected).max() < 2e-3
    rounded = np.einsum("qkd,qd->qk", vectors[position].astype(np.float16).astype(np.float32), queries)
    assert np.abs(scores - rounded).max() < 1e-5
    # The rows are memory-mapped, and vectors_of reads them back as float32.
    assert isinstance(store.rows.rows(), np.memmap)
    assert np.abs(store.vectors_of(ids[100:600]) - vectors[100:600]).max() < 1e-3
    assert np.abs(store.reconstruct(ids[[7, 3, 2999]]) - vectors[[7, 3, 2999]]).max() < 1e-3


def test_compressed_search_honours_removals_and_filters(stores):
    vectors, ids, flat, store, queries, _ = stores
    excluded = ids[:1500]
    _, found = store.search(queries, 10, excluded=excluded)
    assert (found >= 0).all() and not np.isin(found, excluded).any()
    for allowed in (ids[::4], ids[::50]):  # through the codes' selector, and the exact fallback for a narrow filter
        scores, found = store.search(queries, 10, allowed=allowed, excluded=ids[:8])
        exact_scores, exact_ids = flat.search(queries, 10, allowed=np.setdiff1d(allowed, ids[:8]))
        assert np.isin(found, np.setdiff1d(allowed, ids[:8])).all() and (found >= 0).all()
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact_ids)]) >= 0.95
        assert np.abs(scores[:, 0] - exact_scores[:, 0]).max() < 2e-3
    assert store.remove(ids[:5]) is False  # the index keeps tombstones, as for HNSW
    assert store.vector_problems() == []


def test_codes_of_a_transform_rank_by_the_transformed_cosine_and_raw_queries_scan(stores, tmp_path):
    vectors, ids, _, _, queries, _ = stores
    transform = vector_transform.fit(vectors, "whiten")
    store = VectorStore.create(DIM, "ivfpq", str(tmp_path / "v.f16"), vectors, transform)
    store.add(vectors, ids)
    assert store.scores_transformed
    scores, found = store.search(queries, 10)
    exact = transform.apply(vectors) @ transform.apply(queries).T
    exact_ids = ids[np.argsort(-exact, axis=0)[:10].T]
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, exact_ids)]) >= 0.95
    assert np.abs(scores[:, 0] - exact.max(axis=0)).max() < 2e-3
    # vector_transform.first_stage leaves such a store to answer itself (no folded query).
    staged_scores, staged = vector_transform.first_stage(store, transform, queries, 10)
    assert np.array_equal(staged, found)
    raw_scores, raw_found = store.search(queries[:3], 5, raw=True, excluded=ids[:1])  # text: raw cosines, every row read
    raw = vectors @ queries[:3].T
    raw[0] = -np.inf
    assert np.array_equal(raw_found, ids[np.argsort(-raw, axis=0)[:5].T])


def test_auto_choice_by_size_and_small_forced_indexes_stay_flat():
    assert choose_kind(50_000, dim=512) == "flat" and choose_kind(2_000_000, dim=512) == "hnsw"
    assert choose_kind(2_000_001, dim=512) == "ivfpq" and choose_kind(8_000_000, dim=116) == "hnsw"
    assert choose_kind(999, "ivfpq") == "flat" and choose_kind(1000, "ivfpq") == "ivfpq"


def test_lists_grow_with_the_store_not_with_its_training_sample(tmp_path):
    import faiss

    # sqrt(count) lists up to 1 M, then one per ~1,000 vectors (8,192 at 10 M, trained on 64 a list); an eighth scanned.
    assert [list_count(n) for n in (3_000, 1_000_000, 10_000_000)] == [64, 1024, 8192]
    assert train_size(10_000_000) == 64 * 8192 and train_size(1_000_000) == 200_000
    assert [probe_count(n) for n in (64, 1024, 8192)] == [64, 128, 1024]
    vectors = clustered(40_000, 200)
    flat = VectorStore.create(DIM, "flat")
    flat.add(vectors, np.arange(len(vectors), dtype=np.int64))
    # Trained on 16,384 of the 40,000 vectors, the compacted store still has the lists 40,000 vectors want.
    fresh = flat.rebuilt("ivfpq", rows_path=str(tmp_path / "vectors.f16"))
    assert faiss.extract_index_ivf(fresh.index.index).nlist == list_count(40_000) == 256 and fresh.nprobe == 128


@pytest.fixture(scope="module")
def embedder():
    return create_embedder("handcrafted")


@pytest.fixture(scope="module")
def built(tmp_path_factory, embedder):
    """Six phantom cases in a forced 'ivfpq' index (flat for two cases, compressed once past 1,000 vectors, its codes
    trained again when the transform is refitted at the doubling)."""
    cases = str(tmp_path_factory.mktemp("cases"))
    paths = write_blob_cases(cases, 6)
    compressed = str(tmp_path_factory.mktemp("indexes") / "compressed")
    with Index.create(compressed, embedder, SETTINGS, index_type="ivfpq") as index:
        index.add_sources(paths[:2], embedder)
        assert index.store.kind == "flat" and index.store.count < 1000
    first = json.load(open(os.path.join(compressed, MANIFEST)))
    with Index.open(compressed, writable=True) as index:
        index.add_sources(paths, embedder)
    return None, compressed, first, paths


def test_forced_ivfpq_index_answers_as_exact_maxsim_over_its_cases(built, embedder):
    _, compressed, first, _ = built
    manifest = json.load(open(os.path.join(compressed, MANIFEST)))
    assert first["index_type"]["current"] == "flat" and first["format_version"] == 2
    assert manifest["index_type"]["current"] == "ivfpq" and manifest["format_version"] == 3
    assert ROWS in manifest["files"] and manifest["files"][ROWS]["size"] == manifest["counts"]["vectors"] * 116 * 2
    index = Index.open(compressed)  # reopened read-only from disk
    assert index.store.kind == "ivfpq" and index.store.count == manifest["counts"]["vectors"]
    transform = index.transform
    stored = index.store.ids()
    unusual = np.argsort(-np.linalg.norm(index.store.reconstruct(stored) - transform.mean, axis=1))
    for item in (int(stored[unusual[0]]), int(stored[unusual[5]]), int(stored[40])):
        got = Searcher(index, embedder).search(item_query(index, item), k=4, prior=False)
        # Exact answer: every other case's best transformed cosine to the item, from the stored rows.
        query = transform.apply(index.store.reconstruct(np.array([item])))
        own = index.catalog.case_rows_of_items(np.array([item]))[item]
        best = {}
        for row, items in index.catalog.items_of_cases([c.row for c in index.catalog.cases() if c.row != own]).items():
            vectors = transform.apply(index.store.reconstruct(np.array([i.id for i in items], np.int64)))
            best[index.catalog.case_by_row(row).case_id] = float((vectors @ query.T).max())
        # The four best scores, each that of its case (phantoms share identical background tiles: ties in any order).
        assert np.allclose([r.score for r in got.results], sorted(best.values(), reverse=True)[:4], atol=1e-4)
        assert all(abs(r.score - best[r.case_id]) < 1e-4 for r in got.results)
    assert index.verify(check_sources=False) == []
    index.close()


def test_transform_refresh_retrains_the_codes(built):
    import faiss

    _, compressed, first, _ = built
    manifest = json.load(open(os.path.join(compressed, MANIFEST)))
    pinned = manifest["transform"]["checksum"]
    assert pinned != first["transform"]["checksum"] and manifest["index_type"]["codes_transform"] == pinned
    index = Index.open(compressed)
    ivf = faiss.extract_index_ivf(index.store.index.index)
    ids = index.store.ids()[np.arange(0, index.store.count, 97)]
    raw = index.store.reconstruct(ids)
    old = vector_transform.load(os.path.join(compressed, "transform.npz"), manifest["transform"], 116)

    def estimates(queries):  # each query's score against its own vector's codes, as the codes alone estimate it
        out = []
        for vector_id, query in zip(ids, np.ascontiguousarray(queries, np.float32)):
            params = faiss.SearchParametersIVF(nprobe=ivf.nlist, sel=faiss.IDSelectorBatch(np.array([vector_id])))
            scores, found = index.store.index.search(query[None], 1, params=params)
            assert found[0, 0] == vector_id
            out.append(scores[0, 0])
        return np.array(out)

    # The codes hold the refitted transform's output: a transformed vector scores far higher against its own codes than
    # the raw vector does (codes of raw vectors would give the reverse).
    assert estimates(old.apply(raw)).mean() > estimates(raw).mean() + 0.2
    index.close()


def test_removing_a_case_keeps_it_out(built, embedder, tmp_path):
    import shutil

    _, compressed, _, paths = built
    copy = str(tmp_path / "copy")
    shutil.copytree(compressed, copy, ignore=shutil.ignore_patterns(".lock"))
    with Index.open(copy, writable=True) as index:
        index.remove([paths[1]])
        removed_items = len(index.catalog.tombstones())
    index = Index.open(copy)
    tombstones = index.catalog.tombstones()
    assert removed_items > 0 and len(tombstones) == removed_items
    answer = Searcher(index, embedder).search(item_query(index, int(np.setdiff1d(index.store.ids(), tombstones)[0])), k=10)
    assert all(r.source != os.path.abspath(paths[1]) for r in answer.results) and len(answer.results) == 4
    assert index.verify(check_sources=False) == []
    index.close()


def test_verify_and_writers_catch_a_flipped_byte_in_the_rows(built, tmp_path):
    import shutil

    _, compressed, _, _ = built
    copy = str(tmp_path / "flipped")
    shutil.copytree(compressed, copy, ignore=shutil.ignore_patterns(".lock"))
    path = os.path.join(copy, ROWS)
    with open(path, "r+b") as handle:
        handle.seek(5000)
        byte = handle.read(1)
        handle.seek(5000)
        handle.write(bytes([byte[0] ^ 0x10]))
    index = Index.open(copy)  # readers check the rows' size only (they are read a few at a time)
    problems = index.verify(check_sources=False)
    assert any(p.startswith(path + ": checksum differs from the manifest in 1 of") for p in problems)
    index.close()
    with pytest.raises(IndexCorruptError, match="vectors.f16: checksum differs"):
        Index.open(copy, writable=True)
    with open(path, "ab") as handle:
        handle.truncate(os.path.getsize(path) - 2 * 116 * 3)
    with pytest.raises(IndexCorruptError, match="vectors.f16"):
        Index.open(copy)


def test_sealing_after_an_add_hashes_only_the_new_rows_and_records_the_whole_file(built, embedder, tmp_path, monkeypatch):
    import shutil

    from CBIRSlicerLib.index import folder, integrity, maintenance

    _, compressed, _, _ = built
    copy = str(tmp_path / "copy")
    shutil.copytree(compressed, copy, ignore=shutil.ignore_patterns(".lock"))
    os.makedirs(tmp_path / "more")
    more = write_blob_cases(str(tmp_path / "more"), 2, seed=5)
    trusted = []
    real = integrity.file_record

    def recording(path, chunk_bytes=integrity.CHUNK_BYTES, known=None, known_bytes=0):
        if path.endswith(ROWS):
            trusted.append(known_bytes if known is not None else 0)
        return real(path, chunk_bytes, known, known_bytes)

    for module in (folder, maintenance):  # opening checks the files, the seal records them
        monkeypatch.setattr(module, "file_record", recording)
    before = os.path.getsize(os.path.join(copy, ROWS))
    with Index.open(copy, writable=True) as index:
        index.add_sources(more, embedder)
        assert index.store.kind == "ivfpq"
    rows = os.path.join(copy, ROWS)
    manifest = json.load(open(os.path.join(copy, MANIFEST)))
    # Opening checked the whole file (nothing trusted); the seal trusted exactly the rows that open had checked.
    assert os.path.getsize(rows) > before and trusted == [0, before]
    assert manifest["files"][ROWS] == real(rows, manifest["files"][ROWS]["chunk_bytes"])
    assert Index.open(copy).verify(check_sources=False) == []


def test_a_record_of_an_appended_file_reuses_the_checked_chunks_and_hashes_the_rest(tmp_path):
    from CBIRSlicerLib.index.integrity import file_record

    path = tmp_path / "rows.f16"
    path.write_bytes(bytes(range(256)) * 40)  # 10,240 bytes: chunks of 4,096
    old = file_record(str(path), 4096)
    with open(path, "ab") as handle:
        handle.write(b"\x07" * 5000)
    full = file_record(str(path), 4096)
    assert file_record(str(path), 4096, old, 10_240) == full and len(full["sha256"]) == 4
    # Only whole chunks inside the checked bytes are taken on trust: damage there goes unseen, damage after it does not.
    with open(path, "r+b") as handle:
        handle.write(b"\xff")
    assert file_record(str(path), 4096, old, 10_240) == full
    assert file_record(str(path), 4096, old, 4095)["sha256"][0] != full["sha256"][0]
