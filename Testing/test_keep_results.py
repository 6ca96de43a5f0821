"""Results a user keeps: saved searches re-run to the same answer, what changed on a newer index,
exports as CSV and as a Slicer scene opened again with slicer-core, labels in the index (verify stays green) or in the
side file of a read-only index, and the module's logic for all of it on real MRML."""

from __future__ import annotations

import csv
import json
import os
import pathlib
import shutil
import tempfile

import numpy as np
import pytest
from volume_helpers import write_blob_cases

from CBIRSlicerLib import cli
from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.imaging.readers import read_volume
from CBIRSlicerLib.imaging.roi import RoiBox
from CBIRSlicerLib.index import labels
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.retrieval import saved_search
from CBIRSlicerLib.retrieval.saved_search import SavedSearch

SHAPE = (32, 32, 16)
SETTINGS = {"axes": ["axial"], "stride_mm": 4.0, "tile_sizes_mm": [20.0], "thumbnail_px": 48}
QUERY_BALL = (2.0, -3.0, 1.0)
ROI = "2,-3,1,20,20,12"


def _ball(centre, body=(26, 24, 40)):
    blob = synthetic.Blob(centre, 6.0, 300.0, "ball", 2.0)
    return synthetic.render(synthetic.centered_matrix(SHAPE, (1.5, 1.5, 2.0)), SHAPE, blobs=[blob], body_radii=body)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(index folder, case paths, query path): five small phantoms indexed with the handcrafted model, a new ball as query."""
    from CBIRSlicerLib.models.registry import create_embedder

    folder = tmp_path_factory.mktemp("keep_cases")
    paths = write_blob_cases(str(folder), 5, seed=3, shape=SHAPE)
    index_dir = str(tmp_path_factory.mktemp("keep_index") / "idx")
    embedder = create_embedder("handcrafted")
    with Index.create(index_dir, embedder, IndexSettings(**SETTINGS)) as index:
        assert len(index.add_sources(paths, embedder).added) == 5
    query = synthetic.write_volume(_ball(QUERY_BALL), str(folder / "query_ball.nii.gz"))
    return index_dir, paths, query


def cbir(capsys, *args):
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def saved_file(built, tmp_path_factory):
    """A search saved by 'cbir search --save' (ROI query, k 3, no placement), with the JSON answer it printed."""
    index_dir, _, query = built
    path = tmp_path_factory.mktemp("keep_searches") / "ball.json"
    from contextlib import redirect_stdout
    from io import StringIO

    printed = StringIO()
    with redirect_stdout(printed):
        assert cli.main(["search", "--index", index_dir, "--volume", query, "--roi-ras", ROI, "-k", "3", "--no-place",
                         "--json", "--save", str(path)]) == 0
    return str(path), json.loads(printed.getvalue())


def test_a_saved_search_reloads_and_reruns_to_the_same_answer(built, saved_file, capsys):
    path, printed = saved_file
    index_dir, _, query = built
    data = json.loads(pathlib.Path(path).read_text())
    assert data["format"] == "cbirslicer-search" and data["format_version"] == 1
    assert data["query"]["volume"]["path"] == os.path.abspath(query)
    assert data["query"]["volume"]["sha256"] == saved_search.content_sha256(query)
    assert data["query"]["roi"] == {"ras": [2.0, -3.0, 1.0, 20.0, 20.0, 12.0]}
    assert data["settings"]["k"] == 3 and data["settings"]["placement"] is False and data["settings"]["model"] == "handcrafted"
    assert data["index"]["path"] == os.path.abspath(index_dir) and data["index"]["cases"] == 5
    assert data["feedback"] == {"relevant": {}, "not_relevant": {}} and data["suggestion"] is None
    saved = SavedSearch.load(path)
    assert saved.answer.to_json() == printed  # the typed answer read back gives the printed JSON exactly
    run = saved_search.rerun(saved)
    assert run.changes.same and run.changes.index == "same"
    assert run.answer.to_json() == printed
    code, out, _ = cbir(capsys, "rerun", path)
    assert code == 0 and out.strip() == "re-run on the same index: the same cases in the same order"


def test_a_rerun_on_a_newer_index_reports_the_new_and_dropped_cases(built, saved_file, tmp_path, capsys):
    path, printed = saved_file
    index_dir, _, _ = built
    newer = str(tmp_path / "newer")
    shutil.copytree(index_dir, newer, ignore=shutil.ignore_patterns(".lock"))
    # The newer index: the first result removed, a case much like the query added (it comes third, after the other two).
    twin = synthetic.write_volume(_ball(QUERY_BALL, body=(25, 23, 40)), str(tmp_path / "twin_ball.nii.gz"))
    from CBIRSlicerLib.models.registry import create_embedder

    embedder = create_embedder("handcrafted")
    before = [r["case_id"] for r in printed["results"]]
    with Index.open(newer, writable=True) as index:
        assert len(index.add_sources([twin], embedder).added) == 1
        twin_id = index.catalog.cases()[-1].case_id
        assert index.remove([before[0]]) == [before[0]]
    code, out, _ = cbir(capsys, "rerun", path, "--index", newer, "--json")
    assert code == 0
    report = json.loads(out)
    assert [r["case_id"] for r in report["answer"]["results"]] == [before[1], before[2], twin_id]
    assert report["changes"] == {"index": "newer", "same": False, "new": [twin_id], "dropped": [before[0]],
                                 "moved": [{"case_id": before[1], "was": 2, "now": 1}, {"case_id": before[2], "was": 3, "now": 2}]}
    code, out, _ = cbir(capsys, "rerun", path, "--index", newer)
    assert out.splitlines()[0] == "re-run on a newer version of the index: 1 new, 1 dropped, 2 moved"


def _one_line_error(code, err):
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("cbir: error: ") and "Traceback" not in err, err
    return lines[0]


def test_saved_search_errors_are_one_line_naming_the_file(built, saved_file, tmp_path, capsys):
    path, _ = saved_file
    data = json.loads(pathlib.Path(path).read_text())
    bad = tmp_path / "truncated.json"
    bad.write_text(pathlib.Path(path).read_text()[:200])
    line = _one_line_error(*cbir(capsys, "rerun", bad)[::2])
    assert str(bad) in line and "not valid JSON" in line
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hello": 1}))
    assert "not a saved search" in _one_line_error(*cbir(capsys, "export", other, "--csv", tmp_path / "x.csv")[::2])
    lacking = tmp_path / "lacking.json"
    lacking.write_text(json.dumps({k: v for k, v in data.items() if k != "settings"}))
    assert "lacks the field 'settings'" in _one_line_error(*cbir(capsys, "rerun", lacking)[::2])
    # A different model: the index's fingerprint is not the one the search was made with.
    model = tmp_path / "model.json"
    model.write_text(json.dumps({**data, "settings": {**data["settings"], "model": "dinov2:small", "model_digest": "0" * 12}}))
    line = _one_line_error(*cbir(capsys, "rerun", model)[::2])
    assert line.startswith(f"cbir: error: {model}: made with model 'dinov2:small'") and "built with model 'handcrafted'" in line
    # The query file changed since, then is gone.
    moved = tmp_path / "query.nii.gz"
    shutil.copy(data["query"]["volume"]["path"], moved)
    changed = tmp_path / "changed.json"
    volume = {"path": str(moved), "sha256": data["query"]["volume"]["sha256"]}  # no relative path to fall back on
    changed.write_text(json.dumps({**data, "query": {**data["query"], "volume": volume}}))
    synthetic.write_volume(_ball((5.0, 5.0, 0.0)), str(moved))
    line = _one_line_error(*cbir(capsys, "rerun", changed)[::2])
    assert str(moved) in line and "changed since it was saved" in line
    moved.unlink()
    line = _one_line_error(*cbir(capsys, "rerun", changed)[::2])
    assert str(moved) in line and "does not exist" in line


def test_csv_export_has_a_row_per_result_with_the_match_and_labels(built, saved_file, tmp_path, capsys):
    path, printed = saved_file
    index_dir, _, _ = built
    copy = str(tmp_path / "idx")
    shutil.copytree(index_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    data = json.loads(pathlib.Path(path).read_text())
    data["index"]["path"] = copy
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps(data))
    first = printed["results"][0]
    assert cbir(capsys, "label", first["case_id"], "finding=nodule", "--index", copy)[0] == 0
    code, out, _ = cbir(capsys, "export", mine, "--csv", tmp_path / "out.csv")
    assert code == 0 and "3 results" in out
    with open(tmp_path / "out.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    assert [r["case_id"] for r in rows] == [r["case_id"] for r in printed["results"]]
    for row, result in zip(rows, printed["results"]):
        spot = result["best_match"]["focus_ras"] or result["best_match"]["ras"]
        assert float(row["score"]) == pytest.approx(result["score"], abs=1e-5)
        assert [float(row[k]) for k in ("match_r", "match_a", "match_s")] == pytest.approx(spot, abs=1e-3)
        assert row["path"] == result["source"] and row["modality"] == (result["modality"] or "")
        assert row["body_part"] == (result["body_part"] or "")
    assert rows[0]["finding"] == "nodule" and rows[1]["finding"] == rows[2]["finding"] == ""


def test_label_in_the_index_keeps_verify_green_and_can_be_filtered(built, tmp_path, capsys):
    index_dir, paths, query = built
    copy = str(tmp_path / "idx")
    shutil.copytree(index_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    index = Index.open(copy)
    case = index.catalog.cases()[1]
    index.close()
    code, out, _ = cbir(capsys, "label", case.case_id, "diagnosis=cyst", "--index", copy, "--by", "dr. a")
    assert code == 0 and "written to the index" in out and "by dr. a" in out
    index = Index.open(copy)
    stored = index.catalog.case_by_id(case.case_id)
    index.close()
    assert stored.metadata["diagnosis"] == "cyst" and stored.metadata["labelled"]["diagnosis"]["by"] == "dr. a"
    assert cbir(capsys, "index", "verify", "--index", copy)[0] == 0  # the manifest's checksums were sealed again
    code, out, _ = cbir(capsys, "search", "--index", copy, "--volume", query, "--filter", "diagnosis=cyst", "--no-place", "--json")
    assert [r["case_id"] for r in json.loads(out)["results"]] == [case.case_id]
    assert cbir(capsys, "label", case.case_id, "label=benign", "--index", copy)[0] == 0  # no --by: nobody recorded
    code, out, _ = cbir(capsys, "label", case.case_id, "--index", copy)
    assert out.split() == ["diagnosis=cyst", "label=benign"]
    index = Index.open(copy)
    stored = index.catalog.case_by_id(case.case_id)
    index.close()
    assert stored.labels == ["benign"] and "by" not in stored.metadata["labelled"]["label"]
    assert "field the index sets itself" in _one_line_error(*cbir(capsys, "label", case.case_id, "window=1", "--index", copy)[::2])
    assert "not a case of the index" in _one_line_error(*cbir(capsys, "label", "c000", "a=b", "--index", copy)[::2])


def test_label_on_a_read_only_index_goes_to_the_side_file_and_is_merged(built, saved_file, capsys, other_user):
    index_dir, _, _ = built
    outside = pathlib.Path(tempfile.mkdtemp(prefix="cbir-keep-readonly-"))
    shared, mine = outside / "shared", outside / "mine"
    shutil.copytree(index_dir, shared / "idx", ignore=shutil.ignore_patterns(".lock"))
    readonly = str(shared / "idx")
    before = {n: (shared / "idx" / n).read_bytes() for n in os.listdir(readonly)}
    mine.mkdir()
    os.chown(mine, 65534, 65534)
    for folder, _, files in os.walk(shared):
        os.chmod(folder, 0o555)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
    os.chmod(outside, 0o755)
    index = Index.open(readonly)
    case_id = index.catalog.cases()[0].case_id
    index.close()
    side = str(mine / labels.SIDE_FILE)
    try:
        result = other_user.run("-m", "CBIRSlicerLib.cli", "label", case_id, "finding=cyst", "--index", readonly, "--local-labels",
                                side, home=str(mine))
        assert result.returncode == 0, result.stderr
        assert f"written to {side} (the index cannot be written: {readonly} is read-only)" in result.stdout
        result = other_user.run("-m", "CBIRSlicerLib.cli", "label", case_id, "--index", readonly, "--local-labels", side,
                                home=str(mine))
        assert result.returncode == 0 and result.stdout.split() == ["finding=cyst"], result.stderr
        entries = labels.read_side_file(side)
        assert [(e.case_id, e.column, e.value, e.by, e.index) for e in entries] == [(case_id, "finding", "cyst", None, readonly)]
        assert labels.labels_of(readonly, [case_id], side) == {case_id: {"finding": "cyst"}}
        assert {n: (shared / "idx" / n).read_bytes() for n in os.listdir(readonly)} == before  # the index is untouched
    finally:
        for folder, _, _files in os.walk(outside):
            os.chmod(folder, 0o755)
        shutil.rmtree(outside)


def test_side_file_merge_takes_the_later_value():
    from CBIRSlicerLib.index.catalog import CaseRecord

    case = CaseRecord("c1", "/x.nii", labels=["benign"],
                      metadata={"finding": "cyst", "labelled": {"finding": {"at": "2026-01-02T00:00:00+00:00"}}})
    side = [labels.LabelEntry("c1", "finding", "nodule", "2026-01-01T00:00:00+00:00"),  # older than the index's: loses
            labels.LabelEntry("c1", "label", "malignant", "2026-01-01T00:00:00+00:00"),  # the index's has no time: wins
            labels.LabelEntry("c2", "finding", "mass", "2026-01-01T00:00:00+00:00"),
            labels.LabelEntry("c2", "finding", "", "2026-01-03T00:00:00+00:00")]  # a later empty value takes it away
    assert labels.merged_labels([case], side) == {"c1": {"finding": "cyst", "label": "malignant"}, "c2": {}}


# ----- Slicer scenes (slicer-core) -----------------------------------------------------------------------------------------


def _nodes(scene, class_name):
    return {scene.GetNthNodeByClass(n, class_name).GetName(): scene.GetNthNodeByClass(n, class_name)
            for n in range(scene.GetNumberOfNodesByClass(class_name))}


@pytest.mark.parametrize("suffix", [".mrb", ".mrml"])
def test_an_exported_scene_opens_with_the_query_results_and_boxes_in_place(built, saved_file, tmp_path, capsys, suffix):
    pytest.importorskip("slicer")
    from CBIRSlicerLib.scene.keep_results import CASE_ATTRIBUTE
    from CBIRSlicerLib.scene.nodes import matrix_to_numpy

    path, printed = saved_file
    _, _, query = built
    out = str(tmp_path / f"scene{suffix}")
    code, text, _ = cbir(capsys, "export", path, "--scene", out)
    assert code == 0 and "4 volumes, 4 ROIs" in text
    from conftest import open_scene_file

    opened = open_scene_file(out, str(tmp_path / "cache"))
    volumes = _nodes(opened.scene, "vtkMRMLScalarVolumeNode")
    rois = _nodes(opened.scene, "vtkMRMLMarkupsROINode")
    assert len(volumes) == 4 and len(rois) == 4

    def ijk_to_ras(node):
        import vtk

        matrix = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(matrix)
        return matrix_to_numpy(matrix)

    def box(node):
        centre = [0.0, 0.0, 0.0]
        node.GetCenter(centre)
        return np.array(centre), np.array(node.GetSize())

    def bounds(node):
        found = [0.0] * 6
        node.GetRASBounds(found)
        return np.array(found[0::2]), np.array(found[1::2])

    query_node = volumes["Query: query_ball"]
    assert query_node.GetImageData().GetDimensions() == SHAPE
    assert np.allclose(ijk_to_ras(query_node), read_volume(query).ijk_to_ras, atol=1e-4)
    centre, size = box(rois["Query ROI"])
    assert np.allclose(centre, [2.0, -3.0, 1.0]) and np.allclose(size, [20.0, 20.0, 12.0])
    for result in printed["results"]:
        title = result["name"] or result["case_id"]
        node = volumes[f"{result['rank']}. {title}"]
        assert node.GetImageData().GetDimensions() == SHAPE
        assert np.allclose(ijk_to_ras(node), read_volume(result["source"]).ijk_to_ras, atol=1e-4)
        match = rois[f"Match {result['rank']}: {title}"]
        assert match.GetAttribute(CASE_ATTRIBUTE) == result["case_id"]
        low, high = (np.array(b) for b in result["best_match"]["bounds_ras"])
        centre, size = box(match)
        assert np.allclose(centre, (low + high) / 2, atol=1e-6)
        assert np.allclose(size, np.maximum(high - low, 1.0), atol=1e-6)
        inside_low, inside_high = bounds(node)  # the box lies in its result's volume
        assert np.all(centre >= inside_low - 1e-6) and np.all(centre <= inside_high + 1e-6)


# ----- the module's logic on real MRML ------------------------------------------------------------------------------------
def test_module_logic_saves_reloads_exports_and_labels(built, tmp_path):
    pytest.importorskip("slicer")
    from conftest import headless_slicer

    from CBIRSlicerLib.errors import ParameterError
    from CBIRSlicerLib.models.registry import create_embedder
    from CBIRSlicerLib.retrieval.search import Searcher
    from CBIRSlicerLib.scene import keep_results as keep
    from CBIRSlicerLib.scene.nodes import node_from_volume
    from CBIRSlicerLib.scene.search_session import query_from_nodes

    index_dir, _, query = built
    copy = str(tmp_path / "idx")
    shutil.copytree(index_dir, copy, ignore=shutil.ignore_patterns(".lock"))
    app = headless_slicer()
    scene = app.scene
    with pytest.raises(ParameterError, match="has not been saved yet"):
        keep.searches_folder(scene)
    scene.SetURL(str(tmp_path / "reading" / "case.mrml"))
    folder = keep.searches_folder(scene)
    assert folder == str(tmp_path / "reading" / "CBIR searches")
    assert keep.searches_folder(scene, str(tmp_path / "collection")) == str(tmp_path / "collection")

    node = app.volumes.AddArchetypeVolume(query, "query")
    roi = keep.roi_node_for(scene, RoiBox((2.0, -3.0, 1.0), (20.0, 20.0, 12.0)), "ROI")
    index = Index.open(copy)
    searcher = Searcher(index, create_embedder("handcrafted"))
    made = query_from_nodes(index, node, "axial", "roi", roi_node=roi)
    answer = searcher.search(made, 3)
    settings = saved_search.SearchSettings("handcrafted", searcher.embedder.fingerprint.digest(), 3)
    settings.placement = False
    path = keep.save_search(folder, index, made, answer, settings, node, saved_search.Feedback({answer.results[0].case_id: None}, {}))
    assert os.path.dirname(path) == folder and keep.saved_searches(folder) == [path]
    unsaved = node_from_volume(scene, read_volume(query), "unsaved copy")
    with pytest.raises(ParameterError, match="no file behind it"):
        keep.save_search(folder, index, query_from_nodes(index, unsaved, "axial", "roi", roi_node=roi), answer, settings, unsaved)

    # Reloaded into a new scene: the query volume loaded from its file, the ROI where it was; searching again answers the same.
    other = headless_slicer()
    reloaded = keep.reload_search(path, other.scene, lambda p, name: other.volumes.AddArchetypeVolume(p, name))
    assert list(reloaded.saved.feedback.relevant) == [answer.results[0].case_id]
    centre = [0.0, 0.0, 0.0]
    reloaded.roi_node.GetCenter(centre)
    assert centre == pytest.approx([2.0, -3.0, 1.0]) and list(reloaded.roi_node.GetSize()) == pytest.approx([20.0, 20.0, 12.0])
    again = searcher.search(query_from_nodes(index, reloaded.volume_node, "axial", "roi", roi_node=reloaded.roi_node), 3)
    assert again.to_json() == reloaded.saved.answer.to_json()
    assert saved_search.compare(reloaded.saved.answer, again).same

    # Label a result (the index is writable: into it), then export the CSV with the label.
    written = keep.label_result(copy, answer.results[1].case_id, "finding", "cyst", folder, by="reader 1")
    assert written.where == "index"
    index.close()
    assert Index.open(copy).verify(check_sources=False) == []
    csv_path = keep.export_csv(reloaded.saved, str(tmp_path / "out.csv"), folder)
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["finding"] for r in rows] == ["", "cyst", ""]
    exported = keep.export_scene(reloaded.saved, str(tmp_path / "scene.mrb"))
    assert len(exported.volumes) == 4 and len(exported.rois) == 4 and os.path.getsize(exported.path) > 0


def test_a_search_from_a_label_map_keeps_the_map_and_its_label(built, tmp_path, capsys):
    from CBIRSlicerLib.imaging.roi import roi_of_label
    from CBIRSlicerLib.imaging.volume import Volume

    index_dir, _, query = built
    volume = read_volume(query)
    mask = np.zeros(volume.array.shape, np.uint8)
    mask[2:7, 10:18, 14:22] = 2  # a block of label 2 near the ball (k, j, i)
    mask_path = synthetic.write_volume(Volume.from_array(mask, volume.ijk_to_ras, name="mask"), str(tmp_path / "seg.nii.gz"))
    path = tmp_path / "from_mask.json"
    code, _, err = cbir(capsys, "search", "--index", index_dir, "--volume", query, "--roi-mask", mask_path, "--label", "2", "-k", "2",
                        "--no-place", "--save", path)
    assert code == 0 and f"saved the search to {path}" in err
    roi = json.loads(path.read_text())["query"]["roi"]
    assert roi["label"] == 2 and roi["mask"]["path"] == os.path.abspath(mask_path)
    assert roi["mask"]["sha256"] == saved_search.content_sha256(mask_path)
    assert roi["ras"] == pytest.approx(roi_of_label(mask_path, 2).as_list(), abs=1e-3)
    assert saved_search.rerun(SavedSearch.load(str(path))).changes.same
    mask[2:7, 10:18, 14:22] = 3
    synthetic.write_volume(Volume.from_array(mask, volume.ijk_to_ras, name="mask"), mask_path)
    line = _one_line_error(*cbir(capsys, "rerun", path)[::2])
    assert mask_path in line and "the ROI label map of the saved search changed since it was saved" in line
