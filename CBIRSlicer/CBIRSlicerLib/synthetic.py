"""Synthetic CT-like volumes with objects at known RAS positions, on any voxel grid.

The phantom is a continuous function of RAS position, so the same anatomy can be sampled
on a canonical grid, a flipped or permuted one, or an oblique one; tests compare what the
slicer makes of each, and the demo builds its cohort from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .volume import Volume

AIR_HU = -1000.0
SOFT_TISSUE_HU = 40.0
EDGE_MM = 0.7  # width of the smooth edge of every object, so resampling is well behaved


@dataclass(frozen=True)
class Blob:
    """A spherical object: solid ('ball') or hollow ('shell', wall of ``wall_mm``), value in HU."""

    center: tuple[float, float, float]
    radius: float
    value: float
    kind: str = "ball"
    wall_mm: float = 2.0


def _smooth_inside(distance: np.ndarray, radius: float) -> np.ndarray:
    """1 inside a radius, 0 outside, with a logistic edge of EDGE_MM."""
    return 1.0 / (1.0 + np.exp(np.clip((distance - radius) / EDGE_MM * 4.0, -60, 60)))


def phantom_values(ras: np.ndarray, blobs: list[Blob], body_radii: tuple[float, float, float] | None,
                   body_center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """Phantom intensity (HU) at RAS points (..., 3): air, an ellipsoidal soft-tissue body, then the blobs."""
    ras = np.asarray(ras, dtype=np.float64)
    values = np.full(ras.shape[:-1], AIR_HU)
    if body_radii is not None:
        scaled = (ras - np.asarray(body_center)) / np.asarray(body_radii)
        # Distance-like measure in mm along the smallest radius keeps the edge width sensible.
        distance = (np.linalg.norm(scaled, axis=-1) - 1.0) * min(body_radii)
        values += (SOFT_TISSUE_HU - AIR_HU) * _smooth_inside(distance, 0.0)
    for blob in blobs:
        distance = np.linalg.norm(ras - np.asarray(blob.center), axis=-1)
        inside = _smooth_inside(distance, blob.radius)
        if blob.kind == "shell":
            inside = inside - _smooth_inside(distance, blob.radius - blob.wall_mm)
        values = values + (blob.value - values) * inside
    return values


def grid_matrix(spacing=(1.0, 1.0, 1.0), directions=None, origin=(0.0, 0.0, 0.0)) -> np.ndarray:
    """4x4 IJK-to-RAS matrix from spacing, RAS unit axis directions (columns) and RAS origin."""
    directions = np.eye(3) if directions is None else np.asarray(directions, float)
    matrix = np.eye(4)
    matrix[:3, :3] = directions @ np.diag(np.asarray(spacing, float))
    matrix[:3, 3] = origin
    return matrix


def centered_matrix(shape_ijk, spacing=(1.0, 1.0, 1.0), directions=None, center=(0.0, 0.0, 0.0)) -> np.ndarray:
    """IJK-to-RAS matrix whose grid is centred on a RAS point."""
    matrix = grid_matrix(spacing, directions)
    middle = (np.asarray(shape_ijk, float) - 1) / 2
    matrix[:3, 3] = np.asarray(center, float) - matrix[:3, :3] @ middle
    return matrix


def rotation(degrees_about_r: float = 0.0, degrees_about_a: float = 0.0, degrees_about_s: float = 0.0) -> np.ndarray:
    """Rotation matrix (RAS), applied about R, then A, then S."""
    def about(axis: int, degrees: float) -> np.ndarray:
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        a, b = [n for n in range(3) if n != axis]
        m = np.eye(3)
        m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
        return m
    return about(2, degrees_about_s) @ about(1, degrees_about_a) @ about(0, degrees_about_r)


def default_blobs() -> list[Blob]:
    """Three distinct objects placed asymmetrically, so any flip or swap of axes shows."""
    return [
        Blob((12.0, -8.0, 6.0), 6.0, 300.0, "ball"),
        Blob((-14.0, 10.0, -5.0), 5.0, -400.0, "ball"),
        Blob((4.0, 14.0, 12.0), 7.0, 150.0, "shell"),
    ]


def render(ijk_to_ras: np.ndarray, shape_ijk, blobs: list[Blob] | None = None,
           body_radii: tuple[float, float, float] | None = (40.0, 30.0, 60.0), name: str = "phantom",
           modality: str | None = None, dtype=np.int16) -> Volume:
    """Sample the phantom at the voxel centres of a grid, as a Volume (int16 HU by default, like CT)."""
    blobs = default_blobs() if blobs is None else blobs
    i, j, k = shape_ijk
    kk, jj, ii = np.meshgrid(np.arange(k), np.arange(j), np.arange(i), indexing="ij")
    ijk = np.stack([ii, jj, kk], axis=-1).astype(np.float64)
    ras = ijk @ np.asarray(ijk_to_ras)[:3, :3].T + np.asarray(ijk_to_ras)[:3, 3]
    values = phantom_values(ras, blobs, body_radii)
    array = np.round(values).astype(dtype) if np.issubdtype(np.dtype(dtype), np.integer) else values.astype(dtype)
    return Volume.from_array(array, ijk_to_ras, name=name, modality=modality)


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


def write_volume(volume: Volume, path: str, compress: bool = True) -> str:
    """Write a volume in the format its suffix names (.nii.gz, .nrrd, .mha, ...), geometry included."""
    import SimpleITK as sitk

    sitk.WriteImage(volume.to_sitk(), str(path), compress)
    return str(path)
