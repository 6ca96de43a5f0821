"""Answers survive their JSON: ``SearchAnswer.from_json(answer.to_json())`` is the same answer, and a
saved search written and read back holds it unchanged, for any values the types allow. Before, a reloaded search lost
its results' series and study UIDs, so a result from a DICOM database or a PACS could no longer be opened."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from CBIRSlicerLib.imaging.roi import RoiBox
from CBIRSlicerLib.retrieval.answers import BestMatch, CaseResult, SearchAnswer
from CBIRSlicerLib.retrieval.queries import QuerySpec
from CBIRSlicerLib.retrieval.saved_search import IndexRef, SavedQuery, SavedSearch, SearchSettings

QUIET = settings(max_examples=60, deadline=None, derandomize=True, database=None)
NUMBER = st.floats(-1e4, 1e4, allow_nan=False).map(lambda v: round(v, 3))
POINT = st.tuples(NUMBER, NUMBER, NUMBER)
TEXT = st.text(max_size=12)
UID = st.lists(st.integers(0, 10**6).map(str), min_size=2, max_size=8).map(".".join)

BEST = st.builds(BestMatch, st.sampled_from(["axial", "coronal", "sagittal"]), st.integers(0, 999), POINT,
                 st.sampled_from(["slice", "tile", "blob"]), st.none() | st.integers(0, 10**9),
                 st.tuples(*[st.integers(0, 512)] * 4), st.tuples(POINT, POINT), st.none() | POINT, st.none() | POINT,
                 st.none() | st.sampled_from(["anatomy", "look-alike"]))


@st.composite
def results(draw, rank: int) -> CaseResult:
    series = draw(st.none() | UID)
    study = draw(UID) if series is not None else None  # the JSON carries the study with its series
    return CaseResult(rank, draw(TEXT), draw(TEXT), draw(TEXT), round(draw(st.floats(-1, 1)), 5), draw(st.integers(0, 999)),
                      draw(st.lists(st.floats(-1, 1, allow_nan=False), max_size=4)), draw(st.none() | TEXT),
                      draw(st.lists(TEXT, max_size=3)),
                      draw(BEST), draw(st.none() | TEXT), series, study)


@st.composite
def answers(draw) -> SearchAnswer:
    count = draw(st.integers(0, 4))
    return SearchAnswer(QuerySpec(draw(st.sampled_from(["slice", "volume"]))), draw(st.sampled_from(["maxsim", "mean"])),
                        [draw(results(n + 1)) for n in range(count)], draw(st.none() | st.text(min_size=1, max_size=20)))


@QUIET
@given(answer=answers())
def test_an_answer_survives_its_json(answer):
    text = json.dumps(answer.to_json(), allow_nan=False)
    again = SearchAnswer.from_json(json.loads(text))
    assert again == answer
    assert json.dumps(again.to_json(), allow_nan=False) == text


@settings(max_examples=15, deadline=None, derandomize=True, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(answer=answers())
def test_a_saved_search_file_keeps_its_answer(answer, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved")
    saved = SavedSearch(SavedQuery(QuerySpec("roi", roi=RoiBox((1.0, 2.0, 3.0), (20.0, 20.0, 10.0)))), SearchSettings("handcrafted", "abc"),
                        IndexRef(str(folder / "index"), "2026-12-07", "2026-12-07", None, "handcrafted", "abc", 12), answer)
    assert SavedSearch.load(saved.save(str(folder / "search.json"))).answer == answer


def test_a_pacs_result_keeps_its_uids_through_a_saved_answer():
    match = BestMatch("axial", 3, (1.0, 2.0, 3.0), "slice", 7, (0, 0, 32, 32), ((0.0, 0.0, 0.0), (4.0, 4.0, 4.0)))
    result = CaseResult(1, "c001", "dicomweb:http://pacs/dicom-web", "case", 0.9, 3, [0.9], "CT", [], match, "ABDOMEN",
                        "1.2.840.1.2.3", "1.2.840.1.2")
    spec = QuerySpec("roi", roi=RoiBox((1.0, 2.0, 3.0), (20.0, 20.0, 10.0)))
    again = SearchAnswer.from_json(json.loads(json.dumps(SearchAnswer(spec, "maxsim", [result]).to_json())))
    assert (again.results[0].series_uid, again.results[0].study_uid) == ("1.2.840.1.2.3", "1.2.840.1.2")
