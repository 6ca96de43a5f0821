"""The module's logic on a tiny handcrafted index with real MRML (slicer-core): searches from scene nodes in the
background worker, result thumbnails, result volumes loaded once, background index builds, and the whole
click-a-result path ending in the side-by-side view at the best match."""

from __future__ import annotations

import os
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import headless_slicer
from volume_helpers import read_png

from CBIRSlicerLib.errors import InputError, JobCancelled, ParameterError
from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.imaging.readers import read_volume
from CBIRSlicerLib.index.background_build import BuildSpec, IndexBuild
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.progress import State
from CBIRSlicerLib.scene import layout as views
from CBIRSlicerLib.scene.nodes import matrix_to_numpy, node_from_volume, numpy_to_matrix
from CBIRSlicerLib.scene.result_volumes import SOURCE_ATTRIBUTE, find_volume_node, result_volume_node
from CBIRSlicerLib.scene.search_session import SearchSession, case_window, describe_index, index_summary, is_index_folder, query_from_nodes
from CBIRSlicerLib.scene.thumbnails import OUTLINE_RGB, result_thumbnail, write_result_thumbnails

slicer = pytest.importorskip("slicer")

SHAPE = (32, 32, 16)
SETTINGS = {"axes": ["axial"], "stride_mm": 4.0, "tile_sizes_mm": [20.0], "thumbnail_px": 48}
BLOBS = [((-8.0, 6.0, 2.0), "ball"), ((7.0, -5.0, -4.0), "shell"), ((6.0, 7.0, 4.0), "ball"), ((-6.0, -7.0, 0.0), "shell")]


def _case(center, kind) -> object:
    blob = synthetic.Blob(center, 6.0, 300.0 if kind == "ball" else 250.0, kind, 2.0)
    return synthetic.render(synthetic.centered_matrix(SHAPE, (1.5, 1.5, 2.0)), SHAPE, blobs=[blob], body_radii=(22, 21, 30))


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    """(index folder, case paths) of four phantoms indexed with the handcrafted model, built in-process."""
    from CBIRSlicerLib.models.registry import create_embedder

    folder = tmp_path_factory.mktemp("slicer_cases")
    paths = [synthetic.write_volume(_case(c, k), str(folder / f"case{n}_{k}.nii.gz")) for n, (c, k) in enumerate(BLOBS)]
    index_dir = str(tmp_path_factory.mktemp("slicer_index") / "idx")
    embedder = create_embedder("handcrafted")
    with Index.create(index_dir, embedder, IndexSettings(**SETTINGS)) as index:
        assert len(index.add_sources(paths, embedder).added) == 4
    return index_dir, paths


@pytest.fixture(scope="module")
def session(tiny_index):
    session = SearchSession(tiny_index[0])
    yield session
    session.close()


@pytest.fixture(scope="module")
def app():
    """A scene set up as Slicer sets it up: application logic, colours, volumes logic (file loading), layout logic."""
    return headless_slicer(layout=True)


@pytest.fixture
def scene(app):
    yield app.scene
    for node in [app.scene.GetNthNodeByClass(n, "vtkMRMLScalarVolumeNode")
                 for n in range(app.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]:
        app.scene.RemoveNode(node)


def _loader(logic):
    return lambda path, name: logic.AddArchetypeVolume(path, name)


def test_index_info_for_the_panel(tiny_index, tmp_path):
    index_dir, _ = tiny_index
    assert is_index_folder(index_dir) and not is_index_folder(str(tmp_path)) and not is_index_folder("")
    info = index_summary(index_dir)
    assert info["model"] == "handcrafted" and info["counts"]["cases"] == 4
    assert describe_index(info).startswith("4 cases, ") and "model handcrafted" in describe_index(info)


NEW_BALL = (5.0, -6.0, 2.0)  # a ball phantom that is not in the index: the query of the ROI tests


def _balls(paths) -> dict:
    """Source path -> lesion centre of the indexed cases that hold a ball."""
    return {os.path.abspath(paths[n]): BLOBS[n][0] for n, (_, kind) in enumerate(BLOBS) if kind == "ball"}


def _roi(scene, center):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(*center)
    roi.SetSize(20.0, 20.0, 12.0)
    return roi


def test_an_roi_on_a_new_phantom_finds_a_case_of_its_kind_with_the_match_on_the_lesion(tiny_index, session, scene):
    _, paths = tiny_index
    query = node_from_volume(scene, _case(NEW_BALL, "ball"), "new ball")
    answer = session.start(query_from_nodes(session.index, query, "axial", "roi", roi_node=_roi(scene, NEW_BALL)), k=3)
    answer = answer.wait(timeout=60)
    balls = _balls(paths)
    first = answer.results[0]
    assert first.source in balls, [r.name for r in answer.results]
    # The best match lies on that case's ball: within its radius along the axis, inside its box in plane.
    center, best = np.array(balls[first.source]), first.best_match
    assert abs(best.ras[2] - center[2]) <= 6.0
    low, high = np.array(best.bounds_ras[0]), np.array(best.bounds_ras[1])
    assert np.all(low[:2] - 1e-6 <= center[:2]) and np.all(center[:2] <= high[:2] + 1e-6)


def _ball_mask(volume, center, radius=6.0) -> np.ndarray:
    """The (k, j, i) voxels of a volume within ``radius`` mm of a RAS point."""
    k, j, i = np.indices(volume.array.shape)
    ras = volume.ijk_to_ras_points(np.stack([i.ravel(), j.ravel(), k.ravel()], axis=1).astype(float))
    return (np.linalg.norm(ras - np.asarray(center), axis=1) <= radius).reshape(volume.array.shape)


def test_a_segment_or_a_label_map_is_a_query_region_with_its_mask(tiny_index, session, scene):
    import vtk
    from vtk.util import numpy_support

    from CBIRSlicerLib.imaging.volume import Volume

    _, paths = tiny_index
    phantom = _case(NEW_BALL, "ball")
    query = node_from_volume(scene, phantom, "new ball")
    mask = _ball_mask(phantom, NEW_BALL)
    # A label map volume node: label 3 on the ball, label 1 elsewhere in a corner.
    labels = np.where(mask, 3, 0).astype(np.uint8)
    labels[:2, :2, :2] = 1
    label_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    label_node.SetIJKToRASMatrix(numpy_to_matrix(phantom.ijk_to_ras))
    label_node.SetAndObserveImageData(node_from_volume(scene, Volume.from_array(labels, phantom.ijk_to_ras), "tmp").GetImageData())
    # A Segment Editor segmentation: the same ball as a binary labelmap on a grid of its own (offset extent, 1 mm).
    grid = slicer.vtkOrientedImageData()
    grid.SetExtent(10, 49, 20, 59, 5, 34)
    grid.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    grid.SetSpacing(1.0, 1.0, 1.0)
    grid.SetOrigin(-30.0, -40.0, -20.0)
    k, j, i = np.indices((30, 40, 40))
    ras = np.stack([i + 10 - 30.0, j + 20 - 40.0, k + 5 - 20.0], axis=-1)
    inside = np.linalg.norm(ras - np.array(NEW_BALL), axis=-1) <= 6.0
    numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars())[:] = inside.ravel().astype(np.uint8)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segments")
    segmentation.GetSegmentation().SetSourceRepresentationName("Binary labelmap")
    segment = slicer.vtkSegment()
    segment.SetName("ball")
    segment.AddRepresentation("Binary labelmap", grid)
    segmentation.GetSegmentation().AddSegment(segment)
    try:
        by_label = query_from_nodes(session.index, query, "axial", "segment", segment_node=label_node, segment="3")
        by_segment = query_from_nodes(session.index, query, "axial", "segment", segment_node=segmentation, segment="ball")
        for asked in (by_label, by_segment):
            # The box holds the ball (radius 6 mm, voxel-rounded), the point asked about is its centre, the mask its voxels.
            assert np.allclose(asked.roi.center, NEW_BALL, atol=1.0) and np.all(np.array(asked.roi.size) >= 11.0)
            assert np.all(np.array(asked.roi.size) <= 14.0)
            assert np.linalg.norm(np.array(asked.centre_ras) - NEW_BALL) <= 1.5  # a voxel centre: within half a voxel diagonal
            assert np.all(np.linalg.norm(asked.segment.points - NEW_BALL, axis=1) <= 6.0 + 1e-6)
        assert len(by_segment.segment.points) == int(inside.sum())
        assert by_label.segment.name == "labels 3" and by_segment.segment.name == "ball"
        # The first label and the first segment are the defaults; a missing one is named.
        assert query_from_nodes(session.index, query, "axial", "segment", segment_node=label_node).segment.name == "labels 1"
        with pytest.raises(ParameterError, match="no segment 'liver'"):
            query_from_nodes(session.index, query, "axial", "segment", segment_node=segmentation, segment="liver")
        with pytest.raises(ParameterError, match="no label 7"):
            query_from_nodes(session.index, query, "axial", "segment", segment_node=label_node, segment="7")
        with pytest.raises(ParameterError, match="segmentation or a label map"):
            query_from_nodes(session.index, query, "axial", "segment")
        # Searched as an ROI query, with the region/modality prior on (default) or off.
        balls = _balls(paths)
        on = session.start(by_segment, k=3).wait(timeout=60)
        again = query_from_nodes(session.index, query, "axial", "segment", segment_node=segmentation)  # the first segment
        off = session.start(again, k=3, prior=False).wait(timeout=60)
        assert on.results[0].source in balls and off.results[0].source in balls
        assert on.query.prior is not None and off.query.prior is None
    finally:
        scene.RemoveNode(segmentation)
        scene.RemoveNode(label_node)


def test_an_unsaved_copy_of_a_case_does_not_find_itself_in_any_mode(tiny_index, session, scene):
    _, paths = tiny_index
    copy = node_from_volume(scene, read_volume(paths[2]), "query copy")  # no file behind it: found by its voxels
    for mode in ("volume", "slice", "roi"):
        roi = _roi(scene, BLOBS[2][0]) if mode == "roi" else None
        query = query_from_nodes(session.index, copy, "axial", mode, roi_node=roi, slice_ras=BLOBS[2][0])
        answer = session.start(query, k=3).wait(timeout=60)
        assert answer.query.mode == mode and len(answer.results) == 3
        assert os.path.abspath(paths[2]) not in [r.source for r in answer.results], mode


def test_a_loaded_case_does_not_find_itself(tiny_index, session, app, scene):
    _, paths = tiny_index
    node = app.volumes.AddArchetypeVolume(paths[0], "case0")
    answer = session.start(query_from_nodes(session.index, node, "axial", "volume"), k=3).wait(timeout=60)
    assert os.path.abspath(paths[0]) not in [r.source for r in answer.results]


def test_query_needs_a_volume_and_an_roi_in_roi_mode(session, scene):
    with pytest.raises(ParameterError, match="query volume"):
        query_from_nodes(session.index, None)
    node = node_from_volume(scene, _case(*BLOBS[0]), "q")
    with pytest.raises(ParameterError, match="place an ROI"):
        query_from_nodes(session.index, node, mode="roi")
    with pytest.raises(ParameterError, match="query mode"):
        query_from_nodes(session.index, node, mode="montage")


def test_search_polls_while_embedding_and_cancels(session, scene):
    node = node_from_volume(scene, _case(*BLOBS[1]), "q")
    query = query_from_nodes(session.index, node, "axial", "volume")
    query.images = query.images * 40  # enough work to catch it running
    pending = session.start(query, k=2)
    while pending.poll().state == State.LOADING_MODEL:
        time.sleep(0.01)
    assert pending.poll().state == State.RUNNING and pending.poll().total == len(query.images)
    pending.cancel()
    assert pending.poll().state == "cancelled"
    with pytest.raises(JobCancelled):
        pending.wait(timeout=5)
    # The worker stays up with its model: the next search needs no reload.
    loads = session.service.model_loads
    answer = session.start(query_from_nodes(session.index, node, "axial", "volume"), k=2).wait(timeout=60)
    assert len(answer.results) == 2 and session.service.model_loads == loads


def test_more_like_this_answers_without_embedding(tiny_index, session, scene):
    _, paths = tiny_index
    copy = node_from_volume(scene, read_volume(paths[1]), "q")
    answer = session.start(query_from_nodes(session.index, copy, "axial", "volume"), k=2).wait(timeout=60)
    item = answer.results[0].best_match.item_id
    pending = session.more_like(item, k=2)
    assert pending.job is None and pending.poll().state == "done"
    assert answer.results[0].case_id not in [r.case_id for r in pending.answer.results]


def test_result_thumbnails_come_from_the_index_with_the_match_outlined(tiny_index, session, scene, tmp_path):
    _, paths = tiny_index
    copy = node_from_volume(scene, read_volume(paths[3]), "q")
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(*BLOBS[3][0])
    roi.SetSize(20.0, 20.0, 10.0)
    answer = session.start(query_from_nodes(session.index, copy, "axial", "roi", roi_node=roi), k=3).wait(timeout=60)
    catalog = session.index.catalog
    first = answer.results[0]
    rgb = result_thumbnail(catalog, first)
    item = catalog.items([first.best_match.item_id])[first.best_match.item_id]
    grey = catalog.thumbnail(item.case_row, item.axis, item.plane)
    assert rgb.shape == (*grey.shape, 3) and rgb.dtype == np.uint8 and max(grey.shape) == SETTINGS["thumbnail_px"]
    outlined = np.all(rgb == OUTLINE_RGB, axis=2)
    # An ROI query matches a tile; the outline sits where the tile is: its box scaled from slice pixels
    # (32 x 32 at 1.5 mm) to the thumbnail.
    assert first.best_match.kind == "tile"
    rows, cols = np.nonzero(outlined)
    r0, c0, r1, c1 = first.best_match.box
    scale = grey.shape[0] / 32
    assert abs(rows.min() - r0 * scale) <= 1 and abs(rows.max() - (r1 * scale - 1)) <= 1.5
    assert abs(cols.min() - c0 * scale) <= 1 and abs(cols.max() - (c1 * scale - 1)) <= 1.5
    assert np.array_equal(rgb[..., 0][~outlined], grey[~outlined])  # elsewhere, the stored pixels themselves
    assert np.array_equal(result_thumbnail(catalog, first, mark_match=False)[..., 1], grey)

    files = write_result_thumbnails(catalog, answer, str(tmp_path / "thumbs"))
    assert set(files) == {r.case_id for r in answer.results}
    assert np.array_equal(read_png(files[first.case_id]), rgb)


def test_result_volumes_are_loaded_once_and_moved_files_are_named(tiny_index, session, scene, app, tmp_path):
    _, paths = tiny_index
    loads = []

    def load(path, name):
        loads.append(path)
        return app.volumes.AddArchetypeVolume(path, name)

    result = SimpleNamespace(case_id="c0", name="case0", source=paths[0])  # a search result or a catalog case
    node = result_volume_node(scene, result, load)
    assert node.GetAttribute(SOURCE_ATTRIBUTE) == os.path.abspath(paths[0]) and loads == [os.path.abspath(paths[0])]
    assert result_volume_node(scene, result, load) is not None and len(loads) == 1
    assert result_volume_node(scene, result, load).GetID() == node.GetID()
    # A volume the user opened from the same file is reused too.
    own = app.volumes.AddArchetypeVolume(paths[1], "mine")
    assert find_volume_node(scene, paths[1]).GetID() == own.GetID()
    assert result_volume_node(scene, SimpleNamespace(case_id="c1", name="", source=paths[1]), load).GetID() == own.GetID()
    assert len(loads) == 1

    moved = str(tmp_path / "gone.nii.gz")
    with pytest.raises(InputError, match="no longer at the path.*cbir index remove c9"):
        result_volume_node(scene, SimpleNamespace(case_id="c9", name="gone", source=moved), load)


def test_background_build_reports_progress_and_stops_on_cancel(tiny_index, tmp_path):
    _, paths = tiny_index
    folder = str(tmp_path / "built")
    build = IndexBuild(BuildSpec(folder, paths[:2], model="handcrafted", settings=SETTINGS)).start()
    seen = []
    while not build.finished:
        seen.append(build.poll())
        time.sleep(0.02)
    assert build.state == "done", build.error
    assert len(build.report.added) == 2 and build.report.vectors > 0
    assert build.poll().done == build.poll().total == 2 and build.poll().rate > 0
    assert index_summary(folder)["counts"]["cases"] == 2

    # Extending it: new cases only; a cancel stops after the case in hand and keeps what is complete.
    extra = str(tmp_path / "extra")
    os.makedirs(extra)
    for n in range(6):
        shutil.copy(paths[n % 4], os.path.join(extra, f"more{n}.nii.gz"))
    build = IndexBuild(BuildSpec(folder, [extra])).start()
    while build.poll().done < 1 and not build.finished:
        time.sleep(0.01)
    build.cancel()
    assert build.wait(timeout=30) and build.state == "cancelled"
    cases = index_summary(folder)["counts"]["cases"]
    assert 2 < cases < 8 and cases == 2 + len(build.report.added)
    assert len(build.report.skipped) == 6 - len(build.report.added)
    assert all(reason == "not reached (stopped)" for _, reason in build.report.skipped)
    assert Index.open(folder).verify(check_sources=False) == []


def test_background_build_failure_is_reported(tmp_path):
    build = IndexBuild(BuildSpec(str(tmp_path / "idx"), [str(tmp_path)], model="no-such-model")).start()
    assert build.wait(timeout=30) and build.state == "failed" and "unknown model" in build.error


def test_clicking_a_result_shows_it_side_by_side_at_its_best_match(tiny_index, session, app, scene):
    """What the module does when a result is clicked: load (once), switch layout, place both views."""
    _, paths = tiny_index
    layout_node = app.layout_node
    layout_node.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
    query_node = node_from_volume(scene, _case(NEW_BALL, "ball"), "query")
    answer = session.start(query_from_nodes(session.index, query_node, "axial", "roi", roi_node=_roi(scene, NEW_BALL)), k=2)
    first = answer.wait(timeout=60).results[0]
    balls = _balls(paths)
    assert first.source in balls
    matched = balls[first.source]

    result_node = result_volume_node(scene, first, _loader(app.volumes))
    state = views.show_side_by_side(scene, layout_node, views.query_target(query_node, "axial", NEW_BALL),
                                    views.result_target(first.best_match, result_node))
    right = views.slice_node(scene, views.RESULT_VIEW)
    assert right.GetOrientation() == "Axial"
    assert right.GetSliceOffset() == pytest.approx(first.best_match.ras[2])
    assert views.composite_node(scene, views.RESULT_VIEW).GetBackgroundVolumeID() == result_node.GetID()
    assert views.slice_node(scene, views.QUERY_VIEW).GetSliceOffset() == pytest.approx(NEW_BALL[2])
    # The result view shows a voxel plane of the case as Slicer loaded it, and that plane cuts the ball.
    ras_to_ijk = numpy_to_matrix(np.eye(4))
    result_node.GetRASToIJKMatrix(ras_to_ijk)
    k = matrix_to_numpy(ras_to_ijk) @ np.r_[first.best_match.ras, 1.0]
    assert abs(k[2] - round(k[2])) < 1e-6
    assert abs(right.GetSliceOffset() - matched[2]) <= 6.0
    # Shown in the window the index cut its images with.
    window = case_window(session.index, first.case_id)
    assert views.apply_window(result_node, window)
    assert result_node.GetDisplayNode().GetWindow() == pytest.approx(window["upper"] - window["lower"])
    assert views.restore_layout(layout_node, state)
    assert layout_node.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView


def test_queries_of_an_unchanged_node_share_one_volume_so_placement_reuses_its_grid(tiny_index, session, scene):
    """The searcher keeps its last query volume's registration grid by object; the module must hand it the same object
    while the node is unchanged, and a new one once its voxels or its place in the world change."""
    from vtk.util import numpy_support

    node = node_from_volume(scene, _case(NEW_BALL, "ball"), "same node")
    first = query_from_nodes(session.index, node, "axial", "roi", roi_node=_roi(scene, NEW_BALL))
    second = query_from_nodes(session.index, node, "axial", "roi", roi_node=_roi(scene, BLOBS[0][0]))
    assert second.volume is first.volume and second.roi != first.roi
    scalars = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())
    scalars[:10] += 100  # the voxels change (as slicer.util.updateVolumeFromArray does): a new copy of them
    node.GetImageData().Modified()
    changed = query_from_nodes(session.index, node, "axial", "volume")
    assert changed.volume is not first.volume and changed.volume.array.ravel()[0] == first.volume.array.ravel()[0] + 100.0
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform.SetMatrixTransformToParent(numpy_to_matrix(np.array([[1, 0, 0, 5.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])))
    node.SetAndObserveTransformNodeID(transform.GetID())
    moved = query_from_nodes(session.index, node, "axial", "volume")
    assert moved.volume is not changed.volume and moved.volume.ijk_to_ras[0, 3] == pytest.approx(changed.volume.ijk_to_ras[0, 3] + 5.0)
    scene.RemoveNode(transform)
