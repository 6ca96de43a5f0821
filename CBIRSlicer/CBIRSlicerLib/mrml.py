"""The only module that touches Slicer: MRML nodes in, plain core objects out.

Runs inside Slicer and with the PyPI package ``slicer-core`` (real MRML classes without Qt),
which is how the tests exercise it.
"""

from __future__ import annotations

import numpy as np

from .volume import Volume


def matrix_to_numpy(vtk_matrix) -> np.ndarray:
    """A vtkMatrix4x4 as a 4x4 numpy array."""
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_from_node(node) -> Volume:
    """A core Volume from a vtkMRMLScalarVolumeNode (voxels copied; geometry in RAS, as the node holds it)."""
    import vtk
    from vtk.util import numpy_support

    image = node.GetImageData()
    if image is None:
        raise ValueError(f"volume node '{node.GetName()}' has no image data")
    dims = image.GetDimensions()
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    array = np.array(scalars, copy=True).reshape(dims[2], dims[1], dims[0])
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    storage = node.GetStorageNode()
    source = storage.GetFileName() if storage is not None else None
    return Volume.from_array(array, matrix_to_numpy(matrix), name=node.GetName(), source=source)
