"""The side-by-side view on real MRML layout, slice and composite nodes (slicer-core)."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import numpy as np
import pytest
from conftest import headless_slicer

from CBIRSlicerLib.errors import GeometryError
from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.retrieval.answers import BestMatch
from CBIRSlicerLib.scene import layout as views
from CBIRSlicerLib.scene.nodes import node_from_volume, roi_from_node

slicer = pytest.importorskip("slicer")

SHAPE = (30, 26, 20)


@pytest.fixture
def layout():
    """(scene, layout node) set up as Slicer does: application logic first (slice orientation presets), then layout logic."""
    headless = headless_slicer(layout=True)
    node = headless.layout_node
    node.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)
    node.keep_alive = headless  # the logics hold the scene by weak pointers
    return headless.scene, node


def _volume_node(scene, name, center=(0.0, 0.0, 0.0)):
    volume = synthetic.render(synthetic.centered_matrix(SHAPE, (1.0, 1.2, 2.5), center=center), SHAPE)
    return node_from_volume(scene, volume, name)


BEST = BestMatch("coronal", 9, (4.0, -3.6, 7.5), "tile", 12, (10, 4, 30, 24), ((-6.0, -3.6, -2.5), (14.0, -3.6, 17.5)))


def test_layout_description_names_two_slice_views():
    root = ET.fromstring(views.layout_description("axial", "sagittal"))
    assert root.tag == "layout" and root.get("type") == "horizontal"
    found = [(v.get("class"), v.get("singletontag"), v.find("property[@name='orientation']").text) for v in root.iter("view")]
    assert found == [("vtkMRMLSliceNode", views.QUERY_VIEW, "Axial"), ("vtkMRMLSliceNode", views.RESULT_VIEW, "Sagittal")]


def test_register_layout_adds_the_description_once(layout):
    scene, node = layout
    assert not node.IsLayoutDescription(views.LAYOUT_ID)
    assert views.register_layout(node) == views.LAYOUT_ID == views.register_layout(node)
    assert ET.fromstring(node.GetLayoutDescription(views.LAYOUT_ID)).tag == "layout"
    assert node.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView


def test_show_result_places_each_view_and_restore_gives_the_layout_back(layout):
    scene, node = layout
    query, result = _volume_node(scene, "query"), _volume_node(scene, "result", center=(4.0, -3.0, 6.0))
    state = views.show_side_by_side(scene, node, views.query_target(query, "axial", (1.0, 2.0, 3.75)),
                                    views.result_target(BEST, result))
    assert node.GetViewArrangement() == views.LAYOUT_ID and state.previous_layout == slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView
    assert ET.fromstring(node.GetCurrentLayoutDescription()) is not None

    left, right = views.slice_node(scene, views.QUERY_VIEW), views.slice_node(scene, views.RESULT_VIEW)
    assert left.GetOrientation() == "Axial" and left.GetSliceOffset() == pytest.approx(3.75)
    assert right.GetOrientation() == "Coronal" and right.GetSliceOffset() == pytest.approx(-3.6)
    # The view is centred on the result volume (fitted to it), and its plane passes through the best match.
    slice_to_ras = np.array([[right.GetSliceToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
    bounds = np.array(views.volume_bounds(result))
    assert np.allclose(slice_to_ras[[0, 2], 3], ((bounds[0::2] + bounds[1::2]) / 2)[[0, 2]])
    assert np.dot(np.array(BEST.ras) - slice_to_ras[:3, 3], slice_to_ras[:3, 2]) == pytest.approx(0)
    assert views.composite_node(scene, views.QUERY_VIEW).GetBackgroundVolumeID() == query.GetID()
    assert views.composite_node(scene, views.RESULT_VIEW).GetBackgroundVolumeID() == result.GetID()
    # Fitted to the result volume: coronal shows R across (30 mm) and S up (50 mm); 256 x 256 pixels, so 50 mm wins.
    assert right.GetFieldOfView()[0] == pytest.approx(20 * 2.5 * views.FIT_MARGIN)
    assert views.composite_node(scene, views.QUERY_VIEW).GetLinkedControl() == 0

    # A second result keeps the layout from before the first; restore goes back to it.
    again = views.show_side_by_side(scene, node, views.query_target(query, "axial", (0, 0, 0)), views.result_target(BEST, result),
                                    link=True, state=state)
    assert again.previous_layout == state.previous_layout
    assert views.composite_node(scene, views.RESULT_VIEW).GetLinkedControl() == 1
    assert views.restore_layout(node, again) is True
    assert node.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView
    assert views.restore_layout(node, again) is False  # nothing to undo twice


def test_restore_leaves_a_layout_the_user_chose_since(layout):
    scene, node = layout
    volume = _volume_node(scene, "v")
    state = views.show_side_by_side(scene, node, views.query_target(volume, "axial", (0, 0, 0)), views.result_target(BEST, volume))
    node.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView)
    assert views.restore_layout(node, state) is False
    assert node.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutOneUpRedSliceView


def test_standard_views_are_left_untouched(layout):
    scene, node = layout
    red = views.slice_node(scene, "Red")
    red.JumpSliceByCentering(0.0, 0.0, 12.0)
    volume = _volume_node(scene, "v")
    views.show_side_by_side(scene, node, views.query_target(volume, "sagittal", (5, 0, 0)), views.result_target(BEST, volume))
    assert red.GetOrientation() == "Axial" and red.GetSliceOffset() == pytest.approx(12.0)


def test_match_box_outlines_the_best_match_in_the_result_view_only(layout):
    scene, node = layout
    volume = _volume_node(scene, "v")
    views.show_side_by_side(scene, node, views.query_target(volume, "axial", (0, 0, 0)), views.result_target(BEST, volume))
    box = views.show_match_box(scene, BEST)
    size, centre = box.GetSize(), [0.0] * 3
    box.GetCenter(centre)
    assert np.allclose(size, (20.0, views.MATCH_BOX_THICKNESS_MM, 20.0)) and np.allclose(centre, (4.0, -3.6, 7.5))
    assert box.GetDisplayNode().GetViewNodeIDs() == (views.slice_node(scene, views.RESULT_VIEW).GetID(),)
    assert views.show_match_box(scene, BEST, box) is box  # reused, not a second node
    assert box.GetDisplayNode().GetFillOpacity() == 0.0


def test_window_of_the_index_is_applied_to_a_result_volume(layout):
    scene, _ = layout
    volume = _volume_node(scene, "v")
    assert views.apply_window(volume, {"name": "soft-tissue", "lower": -160.0, "upper": 240.0})
    display = volume.GetDisplayNode()
    assert not display.GetAutoWindowLevel() and (display.GetWindow(), display.GetLevel()) == (400.0, 40.0)
    assert not views.apply_window(volume, None)


def test_current_slice_and_roi_placed_in_a_view(layout):
    scene, node = layout
    red = views.slice_node(scene, "Red")
    red.SetOrientation("Sagittal")
    red.JumpSliceByCentering(-7.0, 3.0, 11.0)
    axis, ras = views.view_position(red)
    assert axis == "sagittal" and np.allclose(ras, (-7.0, 3.0, 11.0))
    roi = views.roi_in_view(scene, red, size_mm=24.0)
    box = roi_from_node(roi)
    assert np.allclose(box.center, (-7.0, 3.0, 11.0)) and np.allclose(box.size, 24.0)
    red.SetOrientation("Reformat")
    red.SetSliceToRASByNTP(0.6, 0.8, 0.0, 0.8, -0.6, 0.0, 0.0, 0.0, 0.0, 0)
    with pytest.raises(GeometryError, match="axial, coronal or sagittal"):
        views.view_position(red)


def test_placing_a_view_that_does_not_exist_says_so(layout):
    scene, _ = layout
    volume = _volume_node(scene, "v")
    with pytest.raises(GeometryError, match="side-by-side layout first"):
        views.place_view(scene, views.RESULT_VIEW, views.result_target(BEST, volume))
