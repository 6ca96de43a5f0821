"""Helpers only the tests (and benchmarks) use, kept out of the shipped library: volumes stored another way, a point
inside a volume's grid, every volume of a folder, reading PNGs back, and whether a case is a DICOM series."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from CBIRSlicerLib.errors import EmptySourceError
from CBIRSlicerLib.imaging.readers import CaseSource, discover, read_case, read_volume_file
from CBIRSlicerLib.imaging.volume import Volume


def reorient(volume: Volume, permutation=(0, 1, 2), flips=(False, False, False)) -> Volume:
    """The same voxels stored in another order: new axis a is old axis ``permutation[a]``, reversed where ``flips[a]``."""
    old_ijk = np.transpose(volume.array, (2, 1, 0))  # [i, j, k]
    new_ijk = np.transpose(old_ijk, permutation)
    old_shape = volume.shape_ijk
    index_map = np.zeros((4, 4))  # new (i, j, k, 1) -> old (i, j, k, 1)
    index_map[3, 3] = 1.0
    for new_axis, old_axis in enumerate(permutation):
        if flips[new_axis]:
            new_ijk = np.flip(new_ijk, axis=new_axis)
            index_map[old_axis, new_axis] = -1.0
            index_map[old_axis, 3] = old_shape[old_axis] - 1
        else:
            index_map[old_axis, new_axis] = 1.0
    array = np.ascontiguousarray(np.transpose(new_ijk, (2, 1, 0)))
    return Volume.from_array(array, volume.ijk_to_ras @ index_map, name=volume.name, modality=volume.modality)


def contains_ras(volume: Volume, ras: np.ndarray, tolerance_voxels: float = 0.5) -> bool:
    """Whether a RAS point lies inside a volume's voxel grid (voxel centres extended by half a voxel)."""
    ijk = volume.ras_to_ijk_points(ras)
    upper = np.array(volume.shape_ijk) - 1 + tolerance_voxels
    return bool(np.all(ijk >= -tolerance_voxels) and np.all(ijk <= upper))


def read_png(path: str | Path) -> np.ndarray:
    """Read a PNG as a (rows, cols, channels) uint8 array."""
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return array if array.ndim == 3 else array[..., None]


def is_dicom_series(case: CaseSource) -> bool:
    """Whether a case is a DICOM series of several files."""
    return case.series_uid is not None and len(case.files) > 1


def read_volumes(path: str | Path) -> Iterator[Volume]:
    """Every volume in a file or folder (recursively), one per file or DICOM series."""
    if not os.path.isdir(str(path)):
        # One file: the same checks, and the same precise errors, as read_volume_file.
        yield read_volume_file(path)
        return
    found = discover([path])
    if not found.cases:
        raise EmptySourceError(path, "holds no volume files or DICOM series")
    for source in found.cases:
        yield read_case(source)


def write_blob_cases(folder: str, count: int = 6, seed: int = 0, shape=(40, 40, 20)) -> list[str]:
    """Small phantoms: even cases hold a bright ball, odd ones a ring, at random places (NIfTI files in a folder)."""
    from CBIRSlicerLib.imaging import synthetic

    rng = np.random.default_rng(seed)
    paths = []
    for n in range(count):
        kind = "ball" if n % 2 == 0 else "shell"
        centre = tuple(rng.uniform(-8, 8, 3) * np.array([1, 1, 0.5]))
        blob = synthetic.Blob(centre, 6.0, 300.0 if kind == "ball" else 250.0, kind, 2.0)
        volume = synthetic.render(synthetic.centered_matrix(shape, (1.5, 1.5, 2.0)), shape, blobs=[blob], body_radii=(26, 24, 40))
        paths.append(synthetic.write_volume(volume, os.path.join(folder, f"case{n}_{kind}.nii.gz")))
    return paths
