"""The side-by-side view: a two-slice-view layout (query left, result right) and where each view looks.

Functions take the scene, the layout node and plain data (a result's :class:`BestMatch`), and only
call methods on the MRML nodes handed to them, so they run the same in Slicer and in
``slicer-core`` tests. The two views have their own names instead of reusing Red and Yellow:
leaving the layout then gives the user's own views back exactly as they were, with their
volumes, offsets and zoom untouched.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import GeometryError
from ..imaging.slicing import VIEW_FRAMES, check_axis
from ..retrieval.answers import BestMatch

QUERY_VIEW = "CBIRQuery"
RESULT_VIEW = "CBIRResult"
# Layout ids below 100 are Slicer's own; an unusual number keeps clear of other extensions' custom layouts.
LAYOUT_ID = 8701
FOUR_UP = 3  # vtkMRMLLayoutNode.SlicerLayoutFourUpView: where "restore" goes when nothing else is known
ORIENTATIONS = {"axial": "Axial", "coronal": "Coronal", "sagittal": "Sagittal"}
AXIS_OF_ORIENTATION = {v: k for k, v in ORIENTATIONS.items()}
VIEW_LABELS = {QUERY_VIEW: ("Q", "#F34A33"), RESULT_VIEW: ("M", "#EDD54C")}
FIT_MARGIN = 1.05  # a little air around the volume when fitting a view to it
MATCH_BOX_NAME = "CBIR best match"
PLACES_NAME = "CBIR places"  # a placed match's two places, marked in the result view
MATCH_BOX_THICKNESS_MM = 1.0  # a best match is one plane; give its box some depth so the slice view shows it


def layout_description(query_axis: str = "axial", result_axis: str = "axial") -> str:
    """Slicer layout XML for two slice views side by side: the query on the left, the result on the right."""
    items = []
    for name, axis in ((QUERY_VIEW, query_axis), (RESULT_VIEW, result_axis)):
        label, colour = VIEW_LABELS[name]
        items.append(
            f' <item>\n  <view class="vtkMRMLSliceNode" singletontag="{name}">\n'
            f'   <property name="orientation" action="default">{ORIENTATIONS[check_axis(axis)]}</property>\n'
            f'   <property name="viewlabel" action="default">{label}</property>\n'
            f'   <property name="viewcolor" action="default">{colour}</property>\n'
            "  </view>\n </item>\n")
    return '<layout type="horizontal" split="true">\n' + "".join(items) + "</layout>\n"


def register_layout(layout_node, layout_id: int = LAYOUT_ID) -> int:
    """Add (or update) the side-by-side layout description on the layout node; returns its id."""
    xml = layout_description()
    if layout_node.IsLayoutDescription(layout_id):
        layout_node.SetLayoutDescription(layout_id, xml)
    else:
        layout_node.AddLayoutDescription(layout_id, xml)
    return layout_id


def _nodes(scene, class_name: str) -> list:
    collection = scene.GetNodesByClass(class_name)
    return [collection.GetItemAsObject(n) for n in range(collection.GetNumberOfItems())]


def slice_node(scene, view_name: str):
    """The slice node of a named view (None until the layout has created it)."""
    return next((n for n in _nodes(scene, "vtkMRMLSliceNode") if n.GetLayoutName() == view_name), None)


def composite_node(scene, view_name: str):
    """The slice composite node of a named view (which volumes it shows), created as Slicer would if missing."""
    found = next((n for n in _nodes(scene, "vtkMRMLSliceCompositeNode") if n.GetLayoutName() == view_name), None)
    if found is not None:
        return found
    # Slicer's slice logic creates this when the view widget appears, and adopts an existing one with the
    # same layout name; creating it here lets the placement work before (or without) the widget.
    node = scene.CreateNodeByClass("vtkMRMLSliceCompositeNode")
    node.SetLayoutName(view_name)
    node.SetSingletonTag(view_name)
    node = scene.AddNode(node)
    return node


@dataclass(frozen=True)
class ViewTarget:
    """What one view should show: a volume node, along an axis, centred on a RAS point, fitted to some bounds."""

    volume_node_id: str
    axis: str
    ras: tuple[float, float, float]
    bounds: tuple[float, float, float, float, float, float] | None = None  # RAS xmin, xmax, ymin, ymax, zmin, zmax


@dataclass
class SideBySide:
    """What showing the side-by-side layout changed, so that it can be undone."""

    previous_layout: int
    layout_id: int = LAYOUT_ID


def volume_bounds(volume_node) -> tuple[float, ...]:
    """World RAS bounds of a volume node (parent transform included), as Slicer computes them."""
    bounds = [0.0] * 6
    volume_node.GetRASBounds(bounds)
    return tuple(bounds)


def fit_to_bounds(node, bounds) -> None:
    """Set a slice node's field of view so a RAS box fills the view (keeping the view's aspect ratio)."""
    slice_to_ras = np.array([[node.GetSliceToRAS().GetElement(r, c) for c in range(4)] for r in range(4)])
    low, high = np.array(bounds[0::2], float), np.array(bounds[1::2], float)
    corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    extent_x = np.ptp(corners @ slice_to_ras[:3, 0])
    extent_y = np.ptp(corners @ slice_to_ras[:3, 1])
    width, height, _ = node.GetDimensions()
    aspect = height / width if width else 1.0
    fov_x = max(extent_x, extent_y / aspect) * FIT_MARGIN
    node.SetFieldOfView(fov_x, fov_x * aspect, node.GetFieldOfView()[2])


def place_view(scene, view_name: str, target: ViewTarget) -> None:
    """Show a volume in a named view along an axis, fitted to its bounds, at the slice through a RAS point."""
    node = slice_node(scene, view_name)
    if node is None:
        raise GeometryError(f"the view '{view_name}' does not exist; switch to the side-by-side layout first")
    composite = composite_node(scene, view_name)
    composite.SetBackgroundVolumeID(target.volume_node_id)
    composite.SetForegroundVolumeID(None)
    composite.SetLabelVolumeID(None)
    node.SetOrientation(ORIENTATIONS[check_axis(target.axis)])
    if target.bounds is not None:
        # The whole volume in view (its centre in the middle), so the match is seen in its context.
        fit_to_bounds(node, target.bounds)
        node.JumpSliceByCentering(*(float(v) for v in (np.array(target.bounds[0::2]) + target.bounds[1::2]) / 2))
    # Offsetting moves only the slice: the offset becomes the point's position along the view normal.
    node.JumpSliceByOffsetting(*(float(v) for v in target.ras))


def show_side_by_side(scene, layout_node, query: ViewTarget | None, result: ViewTarget, link: bool = False,
                      state: SideBySide | None = None) -> SideBySide:
    """Switch to the side-by-side layout and place both views (the query view stays as it is without a target)."""
    layout_id = register_layout(layout_node, state.layout_id if state else LAYOUT_ID)
    current = layout_node.GetViewArrangement()
    if state is not None and current == layout_id:
        previous = state.previous_layout  # showing another result: keep the layout from before the first one
    else:
        previous = current if current != layout_id else FOUR_UP
    layout_node.SetViewArrangement(layout_id)
    # Unlinked while placing: linked views copy each other's slice moves, which would drag the query view to the result.
    link_views(scene, False)
    if query is not None:
        place_view(scene, QUERY_VIEW, query)
    place_view(scene, RESULT_VIEW, result)
    link_views(scene, link)
    return SideBySide(previous, layout_id)


def link_views(scene, linked: bool) -> None:
    """Link (or unlink) the two views, so that scrolling or zooming one moves the other."""
    for name in (QUERY_VIEW, RESULT_VIEW):
        composite_node(scene, name).SetLinkedControl(1 if linked else 0)


def restore_layout(layout_node, state: SideBySide | None) -> bool:
    """Give back the layout from before the side-by-side view, if it is still showing; True if it changed."""
    if state is None or layout_node.GetViewArrangement() != state.layout_id:
        return False  # the user has moved on to another layout: leave it
    layout_node.SetViewArrangement(state.previous_layout)
    return True


def result_target(best: BestMatch, volume_node) -> ViewTarget:
    """Where the result view should look for one search result: its best match's slice, centred on the match's focus.

    The focus (the similarity-weighted centre of the items around the best one) places the match
    better in-plane; along the axis the view stays on the best item's own slice, a voxel plane.
    """
    ras = np.array(best.ras, float)
    if best.focus_ras is not None:
        normal = int(np.argmax(np.abs(VIEW_FRAMES[best.axis][2])))
        ras = np.where(np.arange(3) == normal, ras, np.asarray(best.focus_ras, float))
    return ViewTarget(volume_node.GetID(), best.axis, tuple(float(v) for v in ras), volume_bounds(volume_node))


def query_target(volume_node, axis: str, ras) -> ViewTarget:
    """Where the query view should look: the query volume along the query axis, at the ROI centre or query slice."""
    return ViewTarget(volume_node.GetID(), axis, tuple(float(v) for v in ras), volume_bounds(volume_node))


def view_position(node) -> tuple[str, np.ndarray]:
    """(axis, RAS centre) of what a slice view shows now: the 'current slice' of a query."""
    orientation = node.GetOrientation()
    if orientation not in AXIS_OF_ORIENTATION:
        raise GeometryError(f"the view '{node.GetLayoutName()}' shows a {orientation} plane; set it to axial, "
                            "coronal or sagittal to query its slice")
    matrix = node.GetSliceToRAS()
    return AXIS_OF_ORIENTATION[orientation], np.array([matrix.GetElement(r, 3) for r in range(3)])


def roi_in_view(scene, node, size_mm: float | None = None, name: str = "Query ROI"):
    """A new box ROI centred on what a slice view shows (a quarter of its width across unless size_mm is given)."""
    _, centre = view_position(node)
    side = float(size_mm) if size_mm else max(node.GetFieldOfView()[0] / 4, 10.0)
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    roi.CreateDefaultDisplayNodes()
    roi.SetCenter(*(float(v) for v in centre))
    roi.SetSize(side, side, side)
    return roi


def apply_window(volume_node, window: dict | None) -> bool:
    """Show a volume in an intensity window ({'lower', 'upper'}, as the index stores it); True if applied."""
    display = volume_node.GetDisplayNode()
    if not window or display is None:
        return False
    lower, upper = float(window["lower"]), float(window["upper"])
    display.AutoWindowLevelOff()
    display.SetWindowLevel(upper - lower, (upper + lower) / 2)
    return True


def show_match_box(scene, best: BestMatch, box_node=None):
    """An ROI outlining a result's best-matching region, shown in the result view only; reused when given."""
    low, high = (np.array(b, float) for b in best.bounds_ras)
    size = np.maximum(high - low, MATCH_BOX_THICKNESS_MM)
    if box_node is None or scene.GetNodeByID(box_node.GetID()) is None:
        box_node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", MATCH_BOX_NAME)
        box_node.CreateDefaultDisplayNodes()
    box_node.SetCenter(*((low + high) / 2))
    box_node.SetSize(*size)
    box_node.SetLocked(True)
    display = box_node.GetDisplayNode()
    if display is not None:
        display.SetFillOpacity(0.0)  # an outline: the matching region itself stays visible
    view = slice_node(scene, RESULT_VIEW)
    if display is not None and view is not None:
        display.SetViewNodeIDs([view.GetID()])
    return box_node


def show_places(scene, best: BestMatch, places_node=None):
    """Both places of a placed match marked in the result view: "same anatomy" (the registered place, when the case's
    field of view holds it) and "look-alike" (the most similar finding); reused when given, emptied for an unplaced one."""
    if places_node is None or scene.GetNodeByID(places_node.GetID()) is None:
        places_node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", PLACES_NAME)
        places_node.CreateDefaultDisplayNodes()
    places_node.RemoveAllControlPoints()
    for label, point in (("same anatomy", best.placed_ras), ("look-alike", best.look_alike_ras)):
        if point is not None:
            places_node.AddControlPoint(*(float(v) for v in point), label)
    places_node.SetLocked(True)
    display = places_node.GetDisplayNode()
    view = slice_node(scene, RESULT_VIEW)
    if display is not None and view is not None:
        display.SetViewNodeIDs([view.GetID()])
    return places_node
