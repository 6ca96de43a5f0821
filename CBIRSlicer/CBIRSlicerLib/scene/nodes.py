"""MRML glue: volume and ROI nodes in, plain core objects out (and a core Volume back into a node).

Runs inside Slicer and with the PyPI package ``slicer-core`` (real MRML classes without Qt),
which is how the tests exercise it. Everything here is in Slicer's *world* RAS: a node under a
linear parent transform is seen where Slicer draws it, because the transform is folded into
the geometry (hardened) on the way out. Non-linear transforms are refused with a message.
"""

from __future__ import annotations

import contextlib
import os

import numpy as np

from ..errors import DimensionError, GeometryError, ParameterError
from ..imaging.roi import RoiBox, Segment, segment_of_array
from ..imaging.volume import Volume

ORTHOGONALITY_TOLERANCE = 1e-4  # a hardened matrix whose axes are skewed beyond this would need resampling


def matrix_to_numpy(vtk_matrix) -> np.ndarray:
    """A vtkMatrix4x4 as a 4x4 numpy array."""
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def numpy_to_matrix(array: np.ndarray):
    """A 4x4 numpy array as a vtkMatrix4x4."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def to_world_matrix(node) -> np.ndarray:
    """4x4 matrix from a transformable node's own RAS to world RAS: identity without a parent transform."""
    import vtk

    transform = node.GetParentTransformNode()
    if transform is None:
        return np.eye(4)
    if not transform.IsTransformToWorldLinear():
        raise GeometryError(
            f"'{node.GetName()}' is under the non-linear transform '{transform.GetName()}'; harden the transform "
            "(Data module: right-click the node, 'Harden transform') or remove it before searching")
    matrix = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(matrix)
    return matrix_to_numpy(matrix)


def _storage_file(node) -> str | None:
    storage = node.GetStorageNode()
    name = storage.GetFileName() if storage is not None else None
    return os.path.abspath(name) if name else None


def node_state(node) -> tuple:
    """What a volume node's Volume depends on: its ID, its voxels' modification time and its IJK-to-world matrix."""
    import vtk

    image = node.GetImageData()
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    world = to_world_matrix(node) @ matrix_to_numpy(matrix)
    return node.GetID(), image.GetMTime() if image is not None else None, tuple(np.round(world, 9).ravel())


def volume_from_node(node) -> Volume:
    """A core Volume from a scalar volume node: voxels copied, geometry in world RAS (parent transform hardened)."""
    import vtk
    from vtk.util import numpy_support

    image = node.GetImageData()
    if image is None:
        raise DimensionError(None, f"volume node '{node.GetName()}' has no image data")
    if image.GetNumberOfScalarComponents() != 1:
        raise DimensionError(None, f"volume node '{node.GetName()}' has {image.GetNumberOfScalarComponents()} components "
                                   "per voxel; similar-case search needs a scalar (grey) volume")
    dims = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    array = np.array(scalars, copy=True).reshape(dims[2], dims[1], dims[0])
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_world = to_world_matrix(node) @ matrix_to_numpy(matrix)
    axes = ijk_to_world[:3, :3] / np.linalg.norm(ijk_to_world[:3, :3], axis=0)
    if np.abs(axes.T @ axes - np.eye(3)).max() > ORTHOGONALITY_TOLERANCE:
        raise GeometryError(f"the transform of '{node.GetName()}' shears its voxel grid; harden it with resampling "
                            "(Resample Scalar/Vector/DWI Volume) before searching")
    return Volume.from_array(array, ijk_to_world, name=node.GetName(), source=_storage_file(node))


def segment_from_node(node, segment: str | int | None = None) -> Segment:
    """A query :class:`Segment` from a segmentation node (a segment by name or ID; default the first) or a label map
    volume node (a label value; default the smallest present), in world RAS (parent transforms applied)."""
    import vtk
    from vtk.util import numpy_support

    if node is None:
        raise ParameterError("choose a segmentation or a label map for the segment query")
    if node.IsA("vtkMRMLSegmentationNode"):
        segmentation = node.GetSegmentation()
        if segmentation.GetNumberOfSegments() == 0:
            raise ParameterError(f"segmentation '{node.GetName()}' has no segment; outline one in the Segment Editor")
        segment_id = segmentation.GetNthSegmentID(0) if segment in (None, "") else str(segment)
        if segmentation.GetSegment(segment_id) is None:
            segment_id = segmentation.GetSegmentIdBySegmentName(str(segment))
        if not segment_id or segmentation.GetSegment(segment_id) is None:
            names = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
            raise ParameterError(f"segmentation '{node.GetName()}' has no segment '{segment}' (segments: {', '.join(names)})")
        found = segmentation.GetSegment(segment_id)
        image = found.GetRepresentation("Binary labelmap")
        if image is None:
            raise ParameterError(f"segment '{found.GetName()}' of '{node.GetName()}' has no binary labelmap; show it in 2D first")
        extent = image.GetExtent()
        dims = [extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1]
        if min(dims) <= 0:
            raise ParameterError(f"segment '{found.GetName()}' of '{node.GetName()}' is empty")
        array = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        start = np.eye(4)
        start[:3, 3] = extent[0], extent[2], extent[4]  # the array's first voxel is the extent's start
        ijk_to_world = to_world_matrix(node) @ matrix_to_numpy(matrix) @ start
        return segment_of_array(array == found.GetLabelValue(), ijk_to_world, found.GetName())
    labels = volume_from_node(node)
    values = np.unique(labels.array)
    values = values[values != 0]
    if values.size == 0:
        raise ParameterError(f"label map '{node.GetName()}' has no labelled voxel")
    label = int(values.min()) if segment in (None, "") else int(segment)
    if label not in values:
        raise ParameterError(f"label map '{node.GetName()}' has no label {label} (labels: {values[:20].tolist()})")
    return segment_of_array(labels.array == label, labels.ijk_to_ras, f"{node.GetName()} {label}")


def node_from_volume(scene, volume: Volume, name: str | None = None):
    """A new scalar volume node in a scene holding a core Volume's voxels and geometry (no file behind it)."""
    import vtk
    from vtk.util import numpy_support

    array = np.ascontiguousarray(volume.array)
    k, j, i = array.shape
    image = vtk.vtkImageData()
    image.SetDimensions(i, j, k)
    scalars = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or volume.name or "volume")
    node.SetIJKToRASMatrix(numpy_to_matrix(volume.ijk_to_ras))
    node.SetAndObserveImageData(image)
    node.CreateDefaultDisplayNodes()
    return node


def roi_corners_from_node(node) -> np.ndarray:
    """World RAS positions of a markups ROI's 8 corners, shape (8, 3): rotation and parent transform included."""
    if node.GetNumberOfControlPoints() == 0:
        raise GeometryError(f"ROI '{node.GetName()}' has not been placed yet; place it in a slice view first")
    to_world_matrix(node)  # refuses non-linear parents, whose object-to-world matrix would be only an approximation
    bounds = [0.0] * 6
    node.GetObjectBounds(bounds)  # in the ROI's own (object) frame, centred on the origin
    corners = np.array([[x, y, z, 1.0] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]])
    return (corners @ matrix_to_numpy(node.GetObjectToWorldMatrix()).T)[:, :3]


def roi_from_node(node) -> RoiBox:
    """The axis-aligned RAS box holding a markups ROI exactly: the bounds of its 8 world corners."""
    corners = roi_corners_from_node(node)
    low, high = corners.min(axis=0), corners.max(axis=0)
    if np.any(high - low <= 0):
        raise GeometryError(f"ROI '{node.GetName()}' has zero size along an axis; give it a size in the Markups module")
    return RoiBox.from_bounds(low, high)


def volume_files_in_scene(scene) -> tuple[list[str], list[tuple[str, str]]]:
    """Files behind the scalar volume nodes of a scene (to index them), and the nodes skipped with the reason."""
    files, skipped = [], []
    collection = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    for n in range(collection.GetNumberOfItems()):
        node = collection.GetItemAsObject(n)
        if node.IsA("vtkMRMLLabelMapVolumeNode"):
            continue
        path = _storage_file(node)
        if path is None or not os.path.exists(path):
            skipped.append((node.GetName(), "not saved to a file; save it (File > Save Data) to index it"))
        elif node.GetModifiedSinceRead():
            skipped.append((node.GetName(), f"changed since it was read from {path}; save it first"))
        elif path not in files:
            files.append(path)
    return files, skipped


@contextlib.contextmanager
def quiet_vtk():
    """VTK's and ITK's messages (a missing or unreadable file gives a hundred lines of them) kept from the terminal while
    the block runs; yields a function giving what they said."""
    import vtk

    window = vtk.vtkStringOutputWindow()
    previous = vtk.vtkOutputWindow.GetInstance()
    verbosity = vtk.vtkLogger.GetCurrentVerbosityCutoff()
    vtk.vtkOutputWindow.SetInstance(window)
    vtk.vtkLogger.SetStderrVerbosity(vtk.vtkLogger.VERBOSITY_OFF)
    try:
        yield window.GetOutput
    finally:
        vtk.vtkOutputWindow.SetInstance(previous)
        vtk.vtkLogger.SetStderrVerbosity(verbosity)


def mrml_url_decoded(text: str) -> str:
    """A file name as MRML reads it from a scene file's fileName attribute (its own URL decoding)."""
    import slicer

    return slicer.vtkMRMLScalarVolumeNode().URLDecodeString(text)


def fresh_scene():
    """A new MRML scene with the logics that load volumes and write markups, set up as Slicer sets one up (scene exports).

    MRML logics hold each other by weak pointers: keep the returned namespace alive while the scene is used.
    """
    import tempfile
    from types import SimpleNamespace

    import slicer

    scene = slicer.vtkMRMLScene()
    app_logic = slicer.vtkSlicerApplicationLogic()
    main = getattr(getattr(slicer, "app", None), "applicationLogic", lambda: None)()
    with tempfile.TemporaryDirectory() as home:
        # The colour logic reads the colour files of Slicer's share folder when it meets the scene: Slicer's own in Slicer,
        # an empty one under slicer-core (its built-in tables are enough; without a folder it logs an error).
        if main is not None and main.GetHomeDirectory():
            app_logic.SetHomeDirectory(main.GetHomeDirectory())
            app_logic.SetShareDirectory(main.GetShareDirectory())
        else:
            os.makedirs(os.path.join(home, "share", "ColorFiles"))
            app_logic.SetHomeDirectory(home)
            app_logic.SetShareDirectory("share")
        app_logic.SetMRMLScene(scene)
        colors = slicer.vtkSlicerColorLogic()
        colors.SetMRMLApplicationLogic(app_logic)
        colors.SetMRMLScene(scene)
    app_logic.SetModuleLogic("Colors", colors)
    volumes = slicer.vtkSlicerVolumesLogic()
    volumes.SetMRMLApplicationLogic(app_logic)
    volumes.SetMRMLScene(scene)
    markups = slicer.vtkSlicerMarkupsLogic()  # registers the markups storage nodes with the scene
    markups.SetMRMLApplicationLogic(app_logic)
    markups.SetMRMLScene(scene)
    return SimpleNamespace(scene=scene, app_logic=app_logic, volumes=volumes, keep_alive=(colors, markups))
