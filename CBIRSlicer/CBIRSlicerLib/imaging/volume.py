"""A scalar 3D volume: voxels plus exact geometry, with RAS helpers.

The array is indexed ``[k, j, i]`` (slowest to fastest), the same layout as
``SimpleITK.GetArrayFromImage`` and ``slicer.util.arrayFromVolume``; the 4x4
``ijk_to_ras`` matrix maps a voxel index ``(i, j, k)`` to RAS millimetres, the same
matrix a Slicer volume node gives with ``GetIJKToRASMatrix``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from ..errors import DimensionError, GeometryFileError, InputError
from .coordinates import ijk_to_ras_from_lps_geometry, lps_geometry_from_ijk_to_ras

MIN_SPACING_MM, MAX_SPACING_MM = 0.01, 1000.0  # a micro-CT's 10 micrometres to a metre: what a body scan can be
MAX_COORDINATE_MM = 1e6  # a kilometre from the scanner's origin: far beyond any scanner, well inside float precision


@dataclass(eq=False)
class Volume:
    """Voxels ``[k, j, i]`` and their IJK-to-RAS matrix, with what the file says about them."""

    array: np.ndarray
    ijk_to_ras: np.ndarray
    name: str = ""
    source: str | None = None
    modality: str | None = None
    series_uid: str | None = None
    body_part: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise DimensionError(self.source, f"expected a 3D volume, got an array of {self.array.ndim} dimensions")
        if min(self.array.shape) < 1:
            raise DimensionError(self.source, f"volume has an empty axis (shape {self.array.shape})")
        matrix = np.asarray(self.ijk_to_ras, dtype=float)
        if matrix.shape != (4, 4) or not np.all(np.isfinite(matrix)):
            raise InputError(self.source, "IJK-to-RAS must be a finite 4x4 matrix")
        if abs(np.linalg.det(matrix[:3, :3])) < 1e-12:
            raise InputError(self.source, "IJK-to-RAS matrix is singular (zero spacing or degenerate axes)")
        spacing = np.linalg.norm(matrix[:3, :3], axis=0)
        if spacing.min() < MIN_SPACING_MM or spacing.max() > MAX_SPACING_MM:
            raise GeometryFileError(self.source, f"voxel size {' x '.join(f'{s:g}' for s in spacing)} mm is outside "
                                                 f"{MIN_SPACING_MM:g}-{MAX_SPACING_MM:g} mm: not a scan of a body")
        far = float(np.abs(self._corners(matrix)).max())
        if far > MAX_COORDINATE_MM:
            # At 1e30 mm a float cannot tell voxels 1.5 mm apart: every slice fell on one place and the volume became 1 item.
            raise GeometryFileError(self.source, f"its voxels lie up to {far:.3g} mm from the RAS origin (at most "
                                                 f"{MAX_COORDINATE_MM:g} mm): coordinates that large lose the voxel spacing")
        self.ijk_to_ras = matrix

    def _corners(self, matrix: np.ndarray) -> np.ndarray:
        i, j, k = (n - 1 for n in self.array.shape[::-1])
        corners = np.array([[a, b, c, 1.0] for a in (0, i) for b in (0, j) for c in (0, k)])
        return (corners @ matrix.T)[:, :3]

    @classmethod
    def from_array(cls, array_kji: np.ndarray, ijk_to_ras: np.ndarray, **metadata) -> Volume:
        """Build a volume from an in-memory ``[k, j, i]`` array and its IJK-to-RAS matrix (as Slicer hands them over)."""
        return cls(array=np.asarray(array_kji), ijk_to_ras=np.array(ijk_to_ras, dtype=float), **metadata)

    @classmethod
    def from_sitk(cls, image, **metadata) -> Volume:
        """Build a volume from a 3D scalar SimpleITK image (geometry in LPS)."""
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise DimensionError(metadata.get("source"), f"expected a 3D image, got {image.GetDimension()}D")
        matrix = ijk_to_ras_from_lps_geometry(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
        return cls(array=sitk.GetArrayFromImage(image), ijk_to_ras=matrix, **metadata)

    def to_sitk(self, array: np.ndarray | None = None):
        """This volume (or another array on the same grid) as a SimpleITK image with LPS geometry."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(self.array if array is None else array)
        origin, spacing, direction = lps_geometry_from_ijk_to_ras(self.ijk_to_ras)
        image.SetOrigin(origin)
        image.SetSpacing(spacing)
        image.SetDirection(direction)
        return image

    @cached_property
    def voxel_digest(self) -> str:
        """SHA-1 of the shape and the voxel values as float32: equal for the same scan in any file format or dtype."""
        import hashlib

        digest = hashlib.sha1(repr(tuple(self.array.shape)).encode())
        for plane in self.array:  # one plane at a time: no float copy of the whole volume
            digest.update(np.ascontiguousarray(plane, dtype=np.float32).tobytes())
        return digest.hexdigest()

    @property
    def shape_ijk(self) -> tuple[int, int, int]:
        """Number of voxels along i, j, k."""
        k, j, i = self.array.shape
        return (i, j, k)

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size along i, j, k in millimetres."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def directions(self) -> np.ndarray:
        """Unit RAS direction of the i, j, k axes, as the columns of a 3x3 matrix."""
        return self.ijk_to_ras[:3, :3] / self.spacing

    @cached_property
    def ras_to_ijk(self) -> np.ndarray:
        """Inverse of ``ijk_to_ras``."""
        return np.linalg.inv(self.ijk_to_ras)

    def ijk_to_ras_points(self, ijk: np.ndarray) -> np.ndarray:
        """Map continuous voxel indices (..., 3) in (i, j, k) order to RAS millimetres."""
        ijk = np.asarray(ijk, dtype=float)
        return ijk @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ras_to_ijk_points(self, ras: np.ndarray) -> np.ndarray:
        """Map RAS millimetres (..., 3) to continuous voxel indices in (i, j, k) order."""
        ras = np.asarray(ras, dtype=float)
        return ras @ self.ras_to_ijk[:3, :3].T + self.ras_to_ijk[:3, 3]

    def corners_ras(self) -> np.ndarray:
        """RAS positions of the centres of the 8 corner voxels, shape (8, 3)."""
        i, j, k = (n - 1 for n in self.shape_ijk)
        corners = np.array([[a, b, c] for a in (0, i) for b in (0, j) for c in (0, k)], dtype=float)
        return self.ijk_to_ras_points(corners)

    @property
    def center_ras(self) -> np.ndarray:
        """RAS position of the volume's centre."""
        return self.corners_ras().mean(axis=0)

    def finite_float32(self) -> np.ndarray:
        """The voxels as float32 with NaN and infinities replaced by the finite extremes, so no step downstream sees them."""
        data = np.asarray(self.array, dtype=np.float32)
        finite = np.isfinite(data)
        if finite.all():
            return data
        if not finite.any():
            return np.zeros_like(data)
        low, high = float(data[finite].min()), float(data[finite].max())
        return np.nan_to_num(data, nan=low, posinf=high, neginf=low)

    def describe(self) -> str:
        """One line a user can read: name, size, spacing, modality."""
        size = "x".join(str(n) for n in self.shape_ijk)
        spacing = "x".join(f"{s:.3g}" for s in self.spacing)
        return f"{self.name or self.source or 'volume'}: {size} voxels of {spacing} mm, modality {self.modality or 'unknown'}"
