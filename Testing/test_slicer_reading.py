"""The module's reading-room logic with real MRML (slicer-core): the suggestion line of a search from scene
nodes, marks on results and 'search again', and the labels to ask for, on a small labelled handcrafted index."""

from __future__ import annotations

import os

import pytest
from conftest import headless_slicer

from CBIRSlicerLib.errors import ParameterError
from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.retrieval.feedback import Feedback
from CBIRSlicerLib.retrieval.suggestion import Suggester
from CBIRSlicerLib.scene import search_session
from CBIRSlicerLib.scene.nodes import node_from_volume

slicer = pytest.importorskip("slicer")

SHAPE = (32, 32, 16)
SETTINGS = {"axes": ["axial"], "stride_mm": 4.0, "tile_sizes_mm": [20.0], "thumbnail_px": 48}
CENTRES = [(-8.0, 6.0, 2.0), (7.0, -5.0, -4.0), (6.0, 7.0, 4.0), (-6.0, -7.0, 0.0), (0.0, 8.0, 0.0), (8.0, 0.0, 2.0),
           (-7.0, 0.0, 2.0)]


def _kind(n):
    return "ball" if n % 2 == 0 else "shell"


def _case(center, kind):
    blob = synthetic.Blob(center, 6.0, 300.0 if kind == "ball" else 250.0, kind, 2.0)
    return synthetic.render(synthetic.centered_matrix(SHAPE, (1.5, 1.5, 2.0)), SHAPE, blobs=[blob], body_radii=(22, 21, 30))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    from CBIRSlicerLib.models.registry import create_embedder

    folder = tmp_path_factory.mktemp("reading_cases")
    paths = [synthetic.write_volume(_case(c, _kind(n)), str(folder / f"case{n}_{_kind(n)}.nii.gz")) for n, c in enumerate(CENTRES)]
    index_dir = str(folder / "idx")
    embedder = create_embedder("handcrafted")
    with Index.create(index_dir, embedder, IndexSettings(**SETTINGS)) as index:  # the last case is left unlabelled
        index.add_sources(paths, embedder, labels={os.path.abspath(p): [_kind(n)] for n, p in enumerate(paths[:6])})
    opened = search_session.SearchSession(index_dir)
    yield opened
    opened.close()


def test_suggestion_line_marks_and_search_again_from_scene_nodes(session):
    app = headless_slicer()
    volume = node_from_volume(app.scene, _case((4.0, -6.0, 2.0), "ball"), "new ball")
    roi = app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(4.0, -6.0, 2.0)
    roi.SetSize(20.0, 20.0, 12.0)
    first = session.start(search_session.query_from_nodes(session.index, volume, "axial", "roi", roi_node=roi), k=6)
    answer = first.wait(timeout=60)
    expected = Suggester(session.index).suggest(answer)
    assert answer.suggestion == expected and expected.label == "ball"  # a ball phantom: the balls outvote the rings
    line = search_session.suggestion_text(answer)
    assert line == f"Suggested: ball (conf {expected.confidence:.2f}), based on {expected.support} of 6 similar cases"
    assert expected.supporting_cases == [r.case_id for r in answer.results if r.labels == ["ball"]]

    marks = Feedback()
    with pytest.raises(ParameterError, match="mark at least one"):
        session.search_again(first, marks)
    search_session.mark_result(marks, answer.results[0], True)
    search_session.mark_result(marks, answer.results[1], False)
    assert search_session.result_mark(marks, answer.results[0]) == "[relevant] "
    assert search_session.result_mark(marks, answer.results[1]) == "[not relevant] "
    assert search_session.result_mark(marks, answer.results[2]) == ""
    again = session.search_again(first, marks)
    assert again.job is None and again.poll().state == "done"  # the query's vectors are kept: nothing to embed
    judged = {answer.results[0].case_id, answer.results[1].case_id}
    assert judged.isdisjoint(r.case_id for r in again.answer.results) and len(again.answer.results) == 5
    assert again.answer.query.feedback.not_relevant == {answer.results[1].case_id: answer.results[1].best_match.item_id}
    assert again.answer.suggestion is not None  # the new list has its own suggestion

    wanted = session.labels_to_ask_for(3)
    assert [w["case_id"] for w in wanted] == [c.case_id for c in session.index.catalog.cases() if not c.labels]
    assert search_session.suggestion_text(None) == ""
    assert search_session.labels_to_ask_text(session) == f"Label next (uncertainty): case6_ball ({wanted[0]['uncertainty']:.2f})"
