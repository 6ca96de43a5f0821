"""Each step of a search on its own (scope, first stage, case scoring, locating, packaging) and the typed answer's JSON.

A tiny index of four small phantoms (handcrafted model) is built once; every step is checked against
what it must compute, worked out here from the catalog and the stored vectors directly.
"""

from __future__ import annotations

import json
import os
import sqlite3

import numpy as np
import pytest

from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.imaging.readers import read_volume
from CBIRSlicerLib.imaging.roi import RoiBox
from CBIRSlicerLib.index.catalog import CaseRecord, ItemRecord
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.models.registry import create_embedder
from CBIRSlicerLib.retrieval import ranking
from CBIRSlicerLib.retrieval.answers import BestMatch, CaseResult, SearchAnswer
from CBIRSlicerLib.retrieval.queries import Query, QuerySpec, roi_query, volume_query
from CBIRSlicerLib.retrieval.search import Searcher, SearchScope, query_weights

SHAPE = (28, 28, 12)
BLOBS = [((-6.0, 5.0, 2.0), "ball"), ((6.0, -5.0, -2.0), "shell"), ((5.0, 6.0, 2.0), "ball"), ((-5.0, -6.0, 0.0), "shell")]


@pytest.fixture(scope="module")
def searcher(tmp_path_factory):
    work = tmp_path_factory.mktemp("steps")
    paths = []
    for n, (center, kind) in enumerate(BLOBS):
        blob = synthetic.Blob(center, 5.0, 300.0 if kind == "ball" else 250.0, kind, 2.0)
        volume = synthetic.render(synthetic.centered_matrix(SHAPE, (1.5, 1.5, 2.0)), SHAPE, blobs=[blob], body_radii=(19, 18, 30))
        paths.append(synthetic.write_volume(volume, str(work / f"case{n}_{kind}.nii.gz")))
    embedder = create_embedder("handcrafted")
    settings = IndexSettings(axes=["axial"], stride_mm=4.0, tile_sizes_mm=[15.0], blobs_per_slice=2, blob_sizes_mm=[12.0])
    with Index.create(str(work / "index"), embedder, settings) as index:
        index.add_sources(paths, embedder)
    found = Searcher(Index.open(str(work / "index")), embedder)
    found.paths = paths
    return found


def _row(searcher, path) -> int:
    return searcher.index.catalog.case_rows_of_sources([os.path.abspath(path)])[0]


def _roi_query(searcher, n=0) -> Query:
    volume = read_volume(searcher.paths[n])
    return roi_query(volume, RoiBox(BLOBS[n][0], (14.0, 14.0, 8.0)), "axial", searcher.index)


def test_scope_leaves_out_the_query_case_its_link_and_item_and_keeps_the_filtered_cases(searcher, tmp_path):
    catalog = searcher.index.catalog
    own = _row(searcher, searcher.paths[1])
    link = tmp_path / "link.nii.gz"
    os.symlink(searcher.paths[1], link)
    other_item = int(catalog.item_ids([_row(searcher, searcher.paths[3])])[0])
    scope = searcher.scope(Query(QuerySpec("volume"), exclude_sources=[str(link)], exclude_item=other_item))
    assert set(scope.excluded.tolist()) == set(catalog.item_ids([own]).tolist()) | {other_item}
    assert scope.allowed is None
    ball_rows = [_row(searcher, searcher.paths[n]) for n in (0, 2)]
    # Readers open the catalog read-only: the test writes through a connection of its own.
    writer = sqlite3.connect(os.path.join(searcher.index.folder, "catalog.sqlite"), isolation_level=None)
    before = writer.execute("SELECT id, modality FROM cases").fetchall()  # CT, inferred from the phantoms' HU
    writer.execute("UPDATE cases SET modality = 'MR' WHERE id IN (?, ?)", ball_rows)
    try:
        filtered = searcher.scope(Query(QuerySpec("volume")), {"modality": "MR"})
    finally:
        writer.executemany("UPDATE cases SET modality = ? WHERE id = ?", [(m, r) for r, m in before])
        writer.close()
    assert sorted(filtered.allowed.tolist()) == sorted(catalog.item_ids(ball_rows).tolist()) and filtered.excluded.size == 0


def test_first_stage_votes_are_the_hits_per_case_and_never_an_excluded_case(searcher):
    query = _roi_query(searcher)
    vectors = searcher.query_vectors(query)
    scope = searcher.scope(query)
    own = _row(searcher, searcher.paths[0])
    candidates = searcher.first_stage(vectors, scope, k=3, hits_per_image=20)
    assert own not in candidates and set(candidates) <= {_row(searcher, p) for p in searcher.paths}
    # Votes: how many of each image's 20 nearest allowed items belong to the case (exact search on a flat store).
    _, ids = searcher.index.store.search(vectors, 20, excluded=scope.excluded)
    case_of = searcher.index.catalog.case_rows_of_items(np.unique(ids))
    expected = {}
    for item in ids.ravel():
        expected[case_of[int(item)]] = expected.get(case_of[int(item)], 0) + 1
    assert candidates == expected and sum(candidates.values()) == 20 * len(vectors)
    assert list(candidates.values()) == sorted(candidates.values(), reverse=True)  # most voted first


def test_case_scores_are_maxsim_over_every_item_of_the_case_and_cases_without_items_drop_out(searcher):
    query = _roi_query(searcher)
    vectors = searcher.query_vectors(query)
    rows = [_row(searcher, p) for p in searcher.paths]
    candidates = {row: 1 for row in rows[1:]}
    dropped = rows[3]
    scope = SearchScope(np.asarray(searcher.index.catalog.item_ids([dropped])))
    weights = query_weights(query, vectors)
    scored = searcher.score_cases(vectors, candidates, scope, "maxsim", weights)
    assert [s.case_row for s in scored.scores] == rows[1:3] and dropped not in scored.members
    for score in scored.scores:
        items = searcher.index.store.vectors_of(searcher.index.catalog.item_ids([score.case_row]))
        similarity = vectors @ items.T
        assert score.score == pytest.approx(float(weights @ similarity.max(axis=1)), abs=1e-5)
        assert score.per_image == pytest.approx(similarity.max(axis=1), abs=1e-5) and score.votes == 1
    assert query_weights(Query(QuerySpec("volume")), vectors) is None and weights.sum() == pytest.approx(1.0)


def test_case_vectors_go_through_the_transform_on_one_blas_thread(searcher, monkeypatch):
    import contextlib

    from CBIRSlicerLib.index import vector_transform
    from CBIRSlicerLib.retrieval import search

    inside, seen = [False], []

    @contextlib.contextmanager
    def recording():
        inside[0] = True
        yield
        inside[0] = False

    fitted = vector_transform.fit(searcher.index.store.vectors_of(searcher.index.catalog.item_ids()), "center", 0.3)

    class Spy:
        def apply(self, vectors):
            seen.append(inside[0])
            return fitted.apply(vectors)

    monkeypatch.setattr(search, "one_blas_thread", recording)
    query = _roi_query(searcher)
    vectors = fitted.apply(searcher.query_vectors(query))
    rows = [_row(searcher, p) for p in searcher.paths[1:]]
    scored = searcher.score_cases(vectors, {row: 1 for row in rows}, SearchScope(np.zeros(0, np.int64)), "maxsim", transform=Spy())
    assert seen == [True] * len(rows) and [s.case_row for s in scored.scores] == rows
    for score in scored.scores:  # exact cosines of the transformed vectors
        items = fitted.apply(searcher.index.store.vectors_of(searcher.index.catalog.item_ids([score.case_row])))
        assert score.score == pytest.approx(float((vectors @ items.T).max(axis=1).mean()), abs=1e-5)


def test_locate_names_the_item_of_highest_weighted_similarity_and_a_focus_near_it(searcher):
    query = _roi_query(searcher, 2)
    vectors = searcher.query_vectors(query)
    row = _row(searcher, searcher.paths[0])
    scope = searcher.scope(query)
    weights = query_weights(query, vectors)
    scored = searcher.score_cases(vectors, {row: 5}, scope, "maxsim", weights)
    shown = scored.scores[:1]
    searcher.locate(scored, shown, weights)
    ids = searcher.index.catalog.item_ids([row])
    agreed = weights @ (vectors @ searcher.index.store.vectors_of(ids).T)
    assert shown[0].best_item == int(ids[np.argmax(agreed)])
    best = searcher.index.catalog.items([shown[0].best_item])[shown[0].best_item]
    assert np.all(np.abs(np.array(shown[0].focus_ras) - best.ras) <= best.size_mm / 2 + 1e-6)


def test_package_numbers_the_shown_cases_and_describes_them_from_the_catalog(searcher):
    query = _roi_query(searcher)
    shown = [ranking.CaseScore(_row(searcher, searcher.paths[n]), 0.9 - n / 10, 7 - n, [0.5, 0.25], -1) for n in (2, 1)]
    for score in shown:
        score.best_item = int(searcher.index.catalog.item_ids([score.case_row])[-1])
        score.focus_ras = (1.23456, -2.0, 3.0004)
    answer = searcher.package(query, "maxsim", shown)
    assert answer.query is query.spec and answer.ranking == "maxsim"
    assert [r.rank for r in answer.results] == [1, 2]
    assert [r.source for r in answer.results] == [os.path.abspath(searcher.paths[n]) for n in (2, 1)]
    first = answer.results[0]
    item = searcher.index.catalog.items([shown[0].best_item])[shown[0].best_item]
    assert first.score == 0.7 and first.votes == 5 and first.name == "case2_ball"
    assert first.best_match == BestMatch.of_item(item, (1.23456, -2.0, 3.0004))
    assert first.best_match.focus_ras == (1.235, -2.0, 3.0) and first.best_match.item_id == item.id


def test_search_runs_the_steps_and_its_json_is_the_contract(searcher):
    answer = searcher.search(volume_query(read_volume(searcher.paths[3]), "axial", searcher.index), k=2)
    assert isinstance(answer, SearchAnswer) and len(answer.results) == 2
    assert os.path.abspath(searcher.paths[3]) not in [r.source for r in answer.results]
    data = answer.to_json()
    assert list(data) == ["query", "ranking", "results"]
    assert list(data["results"][0]) == ["rank", "case_id", "source", "name", "score", "votes", "per_image_scores",
                                        "modality", "body_part", "labels", "best_match"]
    assert list(data["results"][0]["best_match"]) == ["axis", "slice_index", "ras", "kind", "item_id", "box", "bounds_ras",
                                                      "focus_ras"]
    assert json.loads(json.dumps(data)) == data  # plain JSON types only


def test_answer_values_are_rounded_when_made_so_the_viewer_and_the_json_agree():
    item = ItemRecord("tile", "coronal", 9, 9, (4.00049, -3.6, 7.5), (10, 4, 30, 24), (-6.0, -3.6, -2.5), (14.0, -3.6, 17.5), 20.0, id=12)
    best = BestMatch.of_item(item, np.array([4.1234567, -3.6, 7.0]))
    assert best.ras == (4.0, -3.6, 7.5) and best.focus_ras == (4.123, -3.6, 7.0) and best.spot == best.focus_ras
    case = CaseRecord("c1", "/data/one.nii.gz", name="", labels=["cyst"])
    result = CaseResult.of_case(1, case, 0.123456789, np.int64(4), [0.5], best)
    assert result.score == 0.12346 and type(result.votes) is int and result.title == "c1"
    assert result.to_json()["best_match"] == {"axis": "coronal", "slice_index": 9, "ras": [4.0, -3.6, 7.5], "kind": "tile",
                                              "item_id": 12, "box": [10, 4, 30, 24],
                                              "bounds_ras": [[-6.0, -3.6, -2.5], [14.0, -3.6, 17.5]], "focus_ras": [4.123, -3.6, 7.0]}
    unplaced = BestMatch.of_item(item)
    assert unplaced.spot == unplaced.ras and unplaced.to_json()["focus_ras"] is None
    assert "placed_ras" not in unplaced.to_json() and "shown" not in unplaced.to_json()  # nothing said before placement


def test_a_placed_match_says_what_it_shows_and_reads_back():
    item = ItemRecord("tile", "axial", 9, 9, (4.0, -3.6, 7.5), (10, 4, 30, 24), (-6.0, -13.6, 7.5), (14.0, 6.4, 7.5), 20.0, id=12)
    for shown in ("anatomy", "look-alike"):
        best = BestMatch.of_item(item, (5.0, -3.0, 7.5), placed_ras=(5.0, -3.0, 7.5), shown=shown)
        data = best.to_json()
        assert data["shown"] == shown and data["placed_ras"] == [5.0, -3.0, 7.5]
        assert BestMatch.from_json(json.loads(json.dumps(data))) == best


def test_the_query_patients_other_cases_are_left_out_by_their_keyed_hash(searcher, monkeypatch):
    from CBIRSlicerLib.index import privacy

    monkeypatch.setenv(privacy.KEY_VARIABLE, "site-secret")
    catalog = searcher.index.catalog
    row = _row(searcher, searcher.paths[2])
    writer = sqlite3.connect(os.path.join(searcher.index.folder, "catalog.sqlite"), isolation_level=None)
    (before,) = writer.execute("SELECT metadata FROM cases WHERE id = ?", (row,)).fetchone()
    stored = {**json.loads(before), "patient_key": privacy.patient_key("PAT-7")}  # what indexing a DICOM series of PAT-7 keeps
    writer.execute("UPDATE cases SET metadata = ? WHERE id = ?", (json.dumps(stored), row))
    try:
        query = _roi_query(searcher, 0)
        assert row not in query.exclude_rows  # a NIfTI query: no patient ID, nothing more left out
        volume = read_volume(searcher.paths[0])
        volume.extra["patient_id"] = "PAT-7"  # the same patient as case 2, another series
        query = roi_query(volume, RoiBox(BLOBS[0][0], (14.0, 14.0, 8.0)), "axial", searcher.index)
        assert row in query.exclude_rows
        assert set(catalog.item_ids([row]).tolist()) <= set(searcher.scope(query).excluded.tolist())
        assert "PAT-7" not in json.dumps(stored)  # the index holds the hash, never the ID
    finally:
        writer.execute("UPDATE cases SET metadata = ? WHERE id = ?", (before, row))
        writer.close()


def test_the_query_volumes_kind_is_inferred_once_per_volume(searcher, monkeypatch):
    from CBIRSlicerLib.imaging import body_region

    inferred = []
    real = body_region.infer
    monkeypatch.setattr(body_region, "infer", lambda volume: inferred.append(volume) or real(volume))
    searcher._query_kind = None
    ranked = [ranking.CaseScore(_row(searcher, p), 0.5, 1, [0.5], -1) for p in searcher.paths]
    volume, other = read_volume(searcher.paths[0]), read_volume(searcher.paths[1])
    first = searcher.same_kind_first(_query_on(searcher, volume, 0), ranked)
    assert len(inferred) == 1 and searcher.same_kind_first(_query_on(searcher, volume, 2), ranked) == first
    assert inferred == [volume]  # a second ROI on the same volume: not inferred again
    volume.modality = "MR"  # what the volume says still counts over what was inferred
    query = _query_on(searcher, volume, 0)
    searcher.same_kind_first(query, ranked)
    assert inferred == [volume] and query.spec.prior.modality == "MR"
    searcher.same_kind_first(_query_on(searcher, other, 1), ranked)
    assert inferred == [volume, other]  # another volume is inferred


def _query_on(searcher, volume, n) -> Query:
    return roi_query(volume, RoiBox(BLOBS[n][0], (14.0, 14.0, 8.0)), "axial", searcher.index)


def test_same_kind_first_moves_the_query_kind_up_and_keeps_the_others_in_order(searcher):
    rows = [_row(searcher, p) for p in searcher.paths]
    writer = sqlite3.connect(os.path.join(searcher.index.folder, "catalog.sqlite"), isolation_level=None)
    before = writer.execute("SELECT id, modality, body_part, metadata FROM cases").fetchall()
    kinds = {rows[0]: ("CT", "ABDOMEN"), rows[1]: ("MR", "HEAD"), rows[2]: ("CT", "HEAD"), rows[3]: ("MR", "HEAD")}
    writer.executemany("UPDATE cases SET modality = ?, body_part = ?, metadata = '{}' WHERE id = ?",
                       [(m, b, r) for r, (m, b) in kinds.items()])  # regions as a header says them: no levels (an older index)
    try:
        ranked = [ranking.CaseScore(row, 0.9 - 0.1 * n, 1, [0.9], -1) for n, row in enumerate(rows)]
        volume = read_volume(searcher.paths[0])
        volume.modality, volume.body_part = "MR", "HEAD"  # as DICOM would say
        query = volume_query(volume, "axial", searcher.index)
        # the query's kind, then a head of another modality, then the rest
        assert [s.case_row for s in searcher.same_kind_first(query, ranked)] == [rows[1], rows[3], rows[2], rows[0]]
        prior = query.spec.prior
        assert (prior.modality, prior.body_part, prior.regions) == ("MR", "HEAD", ("HEAD",))
        volume.body_part = None  # region unknown here: the modality alone decides (the phantom is inferred HEAD-sized)
        query = volume_query(volume, "axial", searcher.index)
        assert [s.case_row for s in searcher.same_kind_first(query, ranked)][:2] == [rows[1], rows[3]]
        # An abdominal CT query: a CT read as CHEST (a neighbouring region) comes after the abdomens, then the abdominal
        # MR (another modality of the same region), then the head.
        kinds = {rows[0]: ("CT", "HEAD"), rows[1]: ("CT", "CHEST"), rows[2]: ("MR", "ABDOMEN"), rows[3]: ("CT", "ABDOMEN")}
        writer.executemany("UPDATE cases SET modality = ?, body_part = ? WHERE id = ?", [(m, b, r) for r, (m, b) in kinds.items()])
        volume.modality, volume.body_part = "CT", "ABDOMEN"
        query = volume_query(volume, "axial", searcher.index)
        assert [s.case_row for s in searcher.same_kind_first(query, ranked)] == [rows[3], rows[1], rows[2], rows[0]]
    finally:
        writer.executemany("UPDATE cases SET modality = ?, body_part = ?, metadata = ? WHERE id = ?",
                           [(m, b, d, r) for r, m, b, d in before])
        writer.close()


def test_a_first_stage_that_finds_too_few_cases_looks_further(searcher, monkeypatch):
    query = _roi_query(searcher)
    first = searcher.first_stage(searcher.query_vectors(query), searcher.scope(query), 3, 1, searcher.index.transform)
    assert len(first) < 3  # one nearest item per query image crowds into fewer cases than the 3 others
    looked = []
    original = Searcher.first_stage
    monkeypatch.setattr(Searcher, "first_stage", lambda self, *a, **kw: looked.append(a[3]) or original(self, *a, **kw))
    answer = searcher.search(query, k=3, hits_per_image=1)
    assert len(answer.results) == 3 and answer.note is None  # every other case, found by looking 4x further a round
    assert looked[0] == 1 and all(b == 4 * a for a, b in zip(looked, looked[1:])) and len(looked) >= 2
    assert _row(searcher, searcher.paths[0]) not in {searcher.index.catalog.case_by_id(r.case_id).row for r in answer.results}
