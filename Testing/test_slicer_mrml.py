"""MRML glue against real MRML classes (slicer-core): volume nodes under transforms, rotated ROIs, scene volumes."""

from __future__ import annotations

import numpy as np
import pytest

from CBIRSlicerLib.errors import GeometryError
from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.imaging.slicing import extract_slices
from CBIRSlicerLib.imaging.volume import Volume
from CBIRSlicerLib.scene.nodes import (
    matrix_to_numpy,
    node_from_volume,
    numpy_to_matrix,
    roi_corners_from_node,
    roi_from_node,
    volume_files_in_scene,
    volume_from_node,
)

slicer = pytest.importorskip("slicer")

SHAPE = (24, 20, 16)
BRIGHT_IJK = (17, 5, 11)


def _rigid(degrees_about_s: float, degrees_about_r: float, shift) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = synthetic.rotation(degrees_about_r, 0.0, degrees_about_s)
    matrix[:3, 3] = shift
    return matrix


def _marked_volume() -> Volume:
    """A dark volume with one bright voxel at BRIGHT_IJK, on an anisotropic, shifted grid."""
    array = np.zeros(SHAPE[::-1], np.int16)
    i, j, k = BRIGHT_IJK
    array[k, j, i] = 1000
    matrix = synthetic.centered_matrix(SHAPE, (1.5, 1.0, 2.0), center=(4.0, -6.0, 10.0))
    return Volume.from_array(array, matrix, name="marked")


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def _transform(scene, matrix, parent=None):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    node.SetMatrixTransformToParent(numpy_to_matrix(matrix))
    if parent is not None:
        node.SetAndObserveTransformNodeID(parent.GetID())
    return node


def test_volume_without_transform_round_trips(scene):
    volume = _marked_volume()
    node = node_from_volume(scene, volume)
    back = volume_from_node(node)
    assert np.array_equal(back.array, volume.array) and np.allclose(back.ijk_to_ras, volume.ijk_to_ras)
    assert back.source is None and back.name == "marked"


def test_volume_under_nested_linear_transforms_is_hardened(scene):
    volume = _marked_volume()
    node = node_from_volume(scene, volume)
    outer = _transform(scene, _rigid(30.0, 0.0, (5.0, 0.0, -3.0)))
    inner = _transform(scene, _rigid(0.0, -20.0, (0.0, 12.0, 4.0)), parent=outer)
    node.SetAndObserveTransformNodeID(inner.GetID())

    core = volume_from_node(node)
    # The known point: the bright voxel's centre, where Slicer itself puts it in the world.
    world = [0.0, 0.0, 0.0]
    node.TransformPointToWorld(volume.ijk_to_ras_points(np.array(BRIGHT_IJK, float)).tolist(), world)
    expected = _rigid(30.0, 0.0, (5.0, 0.0, -3.0)) @ _rigid(0.0, -20.0, (0.0, 12.0, 4.0)) @ volume.ijk_to_ras
    assert np.allclose(core.ijk_to_ras, expected)
    assert np.allclose(core.ijk_to_ras_points(np.array(BRIGHT_IJK, float)), world, atol=1e-9)
    assert np.allclose(core.ras_to_ijk_points(world), BRIGHT_IJK, atol=1e-9)
    # Moving the point far from the untransformed one shows the transform was really applied.
    assert np.linalg.norm(np.array(world) - volume.ijk_to_ras_points(np.array(BRIGHT_IJK, float))) > 5.0

    # Slicer's own hardening gives the same grid.
    node.HardenTransform()
    assert node.GetParentTransformNode() is None
    ijk_to_ras = numpy_to_matrix(np.eye(4))
    node.GetIJKToRASMatrix(ijk_to_ras)
    assert np.allclose(matrix_to_numpy(ijk_to_ras), core.ijk_to_ras, atol=1e-9)


def test_slices_of_a_transformed_volume_show_the_point_where_slicer_draws_it(scene):
    volume = _marked_volume()
    node = node_from_volume(scene, volume)
    node.SetAndObserveTransformNodeID(_transform(scene, _rigid(0.0, 0.0, (7.0, -11.0, 5.0))).GetID())
    world = [0.0, 0.0, 0.0]
    node.TransformPointToWorld(volume.ijk_to_ras_points(np.array(BRIGHT_IJK, float)).tolist(), world)
    images = extract_slices(volume_from_node(node), "axial")
    hit = min(images, key=lambda image: abs(image.ras[2] - world[2]))
    row, col = (round(v) for v in hit.ras_to_pixel(world))
    assert abs(hit.ras[2] - world[2]) < 1e-6 and hit.pixels[row, col] == 1000
    assert np.unravel_index(np.argmax(hit.pixels), hit.pixels.shape) == (row, col)


def test_shearing_transform_is_refused(scene):
    node = node_from_volume(scene, _marked_volume())
    shear = np.eye(4)
    shear[0, 1] = 0.4
    node.SetAndObserveTransformNodeID(_transform(scene, shear).GetID())
    with pytest.raises(GeometryError, match="shears"):
        volume_from_node(node)


def test_non_linear_transform_is_refused(scene):
    node = node_from_volume(scene, _marked_volume())
    grid = scene.AddNewNodeByClass("vtkMRMLGridTransformNode")
    node.SetAndObserveTransformNodeID(grid.GetID())
    if grid.IsTransformToWorldLinear():
        pytest.skip("an empty grid transform counts as linear in this slicer-core")
    with pytest.raises(GeometryError, match="non-linear"):
        volume_from_node(node)


def _roi(scene, center, size, rotation=None):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenter(*center)
    roi.SetSize(*size)
    if rotation is not None:
        object_to_node = np.eye(4)
        object_to_node[:3, :3] = rotation
        object_to_node[:3, 3] = center
        roi.SetAndObserveObjectToNodeMatrix(numpy_to_matrix(object_to_node))
    return roi


def _bounds(node) -> np.ndarray:
    bounds = [0.0] * 6
    node.GetRASBounds(bounds)
    return np.array(bounds)


def test_axis_aligned_roi_is_its_centre_and_size(scene):
    box = roi_from_node(_roi(scene, (10.0, -20.0, 30.0), (20.0, 40.0, 10.0)))
    assert np.allclose(box.center, (10, -20, 30)) and np.allclose(box.size, (20, 40, 10))


def test_rotated_roi_maps_its_eight_corners_exactly(scene):
    rotation = synthetic.rotation(15.0, -25.0, 40.0)
    center, size = np.array([10.0, -20.0, 30.0]), np.array([20.0, 40.0, 10.0])
    roi = _roi(scene, center, size, rotation)
    corners = roi_corners_from_node(roi)
    # The corners, by hand: centre + rotation @ (+-half sizes along the ROI's own axes).
    signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], float)
    assert np.allclose(corners, center + (signs * size / 2) @ rotation.T)
    # Each corner lies at distance half-size from the centre along each of the ROI's world axes.
    axes = np.zeros((3, 3))
    roi.GetXAxisWorld(axes[0])
    roi.GetYAxisWorld(axes[1])
    roi.GetZAxisWorld(axes[2])
    assert np.allclose(np.abs((corners - center) @ axes.T), size / 2)
    box = roi_from_node(roi)
    assert np.allclose(np.r_[box.low, box.high][[0, 3, 1, 4, 2, 5]], _bounds(roi))
    # The box is bigger than the ROI: a rotated ROI does not fit its own size.
    assert all(b > s for b, s in zip(box.size, size))


def test_roi_under_a_transform_is_in_world_coordinates(scene):
    rotation = synthetic.rotation(0.0, 0.0, 30.0)
    center, size = np.array([5.0, 6.0, 7.0]), np.array([12.0, 8.0, 4.0])
    roi = _roi(scene, center, size, rotation)
    parent = _rigid(90.0, 10.0, (-3.0, 4.0, 20.0))
    roi.SetAndObserveTransformNodeID(_transform(scene, parent).GetID())
    corners = roi_corners_from_node(roi)
    signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], float)
    local = center + (signs * size / 2) @ rotation.T
    assert np.allclose(corners, local @ parent[:3, :3].T + parent[:3, 3])
    world_centre = [0.0, 0.0, 0.0]
    roi.GetCenterWorld(world_centre)
    box = roi_from_node(roi)
    assert np.allclose(box.center, world_centre)
    assert np.allclose(np.r_[box.low, box.high][[0, 3, 1, 4, 2, 5]], _bounds(roi))


def test_unplaced_roi_is_refused(scene):
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    with pytest.raises(GeometryError, match="not been placed"):
        roi_from_node(roi)


def test_scene_volume_files(scene, tmp_path, mrml_volumes_logic):
    path = synthetic.write_volume(_marked_volume(), str(tmp_path / "marked.nrrd"))
    loaded = mrml_volumes_logic.AddArchetypeVolume(path, "marked")
    files, skipped = volume_files_in_scene(mrml_volumes_logic.GetMRMLScene())
    assert path in files and volume_from_node(loaded).source == path
    node_from_volume(scene, _marked_volume(), "in memory")
    files, skipped = volume_files_in_scene(scene)
    assert files == [] and skipped[0][0] == "in memory" and "not saved" in skipped[0][1]
    mrml_volumes_logic.GetMRMLScene().RemoveNode(loaded)
