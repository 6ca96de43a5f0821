"""The typed query and answer: every value written as JSON reads back equal (Hypothesis round trips), the query modes are
defined once, and a made query's spec is what the answer says."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from CBIRSlicerLib.errors import ParameterError
from CBIRSlicerLib.imaging.roi import RoiBox
from CBIRSlicerLib.retrieval.answers import BestMatch, CaseResult, SearchAnswer
from CBIRSlicerLib.retrieval.marks import Feedback
from CBIRSlicerLib.retrieval.queries import MATCH_INTENTS, QUERY_MODES, VOLUME_MODES, Prior, QuerySpec
from CBIRSlicerLib.retrieval.saved_search import FileRef, IndexRef, SavedQuery, SavedSearch, SearchSettings
from CBIRSlicerLib.retrieval.suggestion import NoSuggestion, Suggestion

# Millimetres as answers carry them (to a micrometre), sizes positive; scores as floats of any precision.
mm = st.integers(-400_000, 400_000).map(lambda v: v / 1000)
size = st.integers(1, 300_000).map(lambda v: v / 1000)
points = st.tuples(mm, mm, mm)
names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
maybe = lambda strategy: st.none() | strategy
shares = st.integers(0, 1000).map(lambda v: v / 1000)
marks = st.dictionaries(names, maybe(st.integers(0, 10**9)), max_size=3)
feedbacks = st.builds(Feedback, marks, marks)
levels = st.integers(-400, 10_000).map(lambda v: v / 10)  # standard body levels, as the answer carries them (0.1 mm)
priors = st.builds(Prior, maybe(st.sampled_from(["CT", "MR"])), maybe(st.sampled_from(["HEAD", "CHEST", "ABDOMEN"])),
                   st.lists(st.sampled_from(["HEAD", "NECK", "CHEST", "ABDOMEN"]), max_size=3, unique=True).map(tuple),
                   maybe(st.tuples(levels, levels).map(lambda pair: tuple(sorted(pair)))))


@st.composite
def specs(draw, modes=QUERY_MODES) -> QuerySpec:
    """A spec with the fields its mode carries (what the answer's query holds for that mode)."""
    mode = draw(st.sampled_from(modes))
    feedback = draw(maybe(feedbacks))
    common = {"prior": draw(maybe(priors)), "match": draw(st.sampled_from(MATCH_INTENTS)), "feedback": feedback,
              "feedback_strategy": draw(st.sampled_from(["rocchio", "linear"])) if feedback is not None else None,
              "margin_mm": draw(st.sampled_from([0.0, 2.5]))}
    if mode == "text":
        return QuerySpec("text", text=draw(names), **common)
    if mode == "item":
        return QuerySpec("item", axis=draw(st.sampled_from(["axial", "coronal"])), item=draw(st.integers(0, 10**9)),
                         case_id=draw(maybe(names)), **common)
    fields = {"volume": draw(maybe(names.map(lambda n: "/data/" + n))), "axis": draw(st.sampled_from(["axial", "sagittal"]))}
    if mode in ("roi", "segment"):
        fields["roi"] = RoiBox(draw(points), (draw(size), draw(size), draw(size)))
    if mode == "segment":
        fields["segment"] = draw(maybe(names))
    if mode == "slice":
        fields.update(point=draw(maybe(points)), slice_index=draw(maybe(st.integers(0, 999))))
    if mode == "volume":
        fields["slices"] = draw(maybe(st.integers(1, 16)))
    return QuerySpec(mode, **fields, **common)


def through_json(data: dict) -> dict:
    return json.loads(json.dumps(data))


@given(specs())
def test_a_query_spec_reads_back_equal(spec):
    assert QuerySpec.from_json(through_json(spec.to_json())) == spec


best_matches = st.builds(BestMatch, st.sampled_from(["axial", "coronal"]), st.integers(0, 999), points,
                         st.sampled_from(["slice", "tile", "blob", "cell"]), maybe(st.integers(0, 10**12)),
                         st.tuples(*[st.integers(0, 512)] * 4), st.tuples(points, points), maybe(points), maybe(points),
                         maybe(st.sampled_from(["anatomy", "look-alike"])))


@st.composite
def case_results(draw) -> CaseResult:
    series = draw(maybe(names))
    return CaseResult(draw(st.integers(1, 100)), draw(names), draw(names), draw(names), draw(st.floats(-1, 1)),
                      draw(st.integers(0, 10**6)), draw(st.lists(st.floats(-1, 1), max_size=4)), draw(maybe(names)),
                      draw(st.lists(names, max_size=3)), draw(best_matches), draw(maybe(names)), series,
                      draw(maybe(names)) if series is not None else None)


suggestions = st.builds(Suggestion, names, names, shares, shares, st.integers(0, 10), st.integers(0, 10), st.integers(0, 10),
                        st.lists(names, max_size=3), st.dictionaries(names, shares, max_size=3), names)
answers = st.builds(SearchAnswer, specs(), st.sampled_from(["maxsim", "votes", "pooled"]), st.lists(case_results(), max_size=3),
                    maybe(names), st.none() | suggestions | st.builds(NoSuggestion, names, names))


@settings(max_examples=60)
@given(answers)
def test_an_answer_reads_back_equal_through_its_json(answer):
    data = through_json(answer.to_json())
    assert SearchAnswer.from_json(data) == answer and SearchAnswer.from_json(data).to_json() == data


@st.composite
def saved_searches(draw) -> SavedSearch:
    spec = draw(specs())
    volume = FileRef(spec.volume, "ab" * 32) if spec.volume else None
    mask = FileRef("/data/labels.nii.gz", "cd" * 32) if spec.mode == "segment" and draw(st.booleans()) else None
    query = SavedQuery(spec, volume, mask, draw(st.integers(1, 9)) if mask else None)
    settings_ = SearchSettings(draw(names), "digest", draw(st.integers(1, 50)), spec.axis, "maxsim", draw(st.booleans()),
                               draw(st.dictionaries(names, names, max_size=2)), draw(st.booleans()), spec.margin_mm)
    index = IndexRef("/data/index", "2025-01-01T00:00:00+00:00", "2025-01-02T00:00:00+00:00", draw(maybe(names)), "handcrafted",
                     "digest", draw(st.integers(0, 10**6)))
    answer = draw(answers)
    return SavedSearch(query, settings_, index, answer, draw(feedbacks), answer.to_json().get("suggestion"),
                       "2025-01-03T00:00:00+00:00", draw(maybe(names)))


@settings(max_examples=60)
@given(saved_searches())
def test_a_saved_search_reads_back_equal(saved):
    assert SavedSearch.from_json(through_json(saved.to_json())) == saved


def test_the_query_modes_are_one_list_and_a_wrong_mode_or_intent_is_refused():
    assert QUERY_MODES == ("roi", "segment", "slice", "volume", "text", "item") and set(VOLUME_MODES) < set(QUERY_MODES)
    with pytest.raises(ParameterError, match="query mode"):
        QuerySpec("ball")  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="match intent"):
        QuerySpec("roi", match="both")  # type: ignore[arg-type]
    with pytest.raises(ParameterError, match="query mode"):
        QuerySpec.from_json({"mode": "ball"})


def test_a_segment_query_keeps_the_answers_form_mode_roi_with_its_segment():
    spec = QuerySpec("segment", volume="/data/ct.nii.gz", roi=RoiBox((1.0, 2.0, 3.0), (4.0, 5.0, 6.0)), segment="liver")
    assert spec.to_json() == {"volume": "/data/ct.nii.gz", "axis": "axial", "mode": "roi", "roi_ras": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
                              "segment": "liver"}
    assert QuerySpec.from_json(spec.to_json()).mode == "segment"
