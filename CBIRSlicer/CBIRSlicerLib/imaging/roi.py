"""Regions of interest as axis-aligned RAS boxes: centre and size in millimetres, as Slicer shows them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError, ParameterError
from .coordinates import lps_to_ras


@dataclass(frozen=True)
class RoiBox:
    """An axis-aligned box in RAS millimetres, given by its centre and full size."""

    center: tuple[float, float, float]
    size: tuple[float, float, float]

    def __post_init__(self) -> None:
        center = tuple(float(v) for v in self.center)
        size = tuple(float(v) for v in self.size)
        if len(center) != 3 or len(size) != 3:
            raise ParameterError("an ROI needs a 3D centre and a 3D size")
        if not all(np.isfinite(center)):
            raise ParameterError(f"ROI centre must be three finite numbers (mm), got {center}")
        if not all(np.isfinite(size)) or min(size) <= 0:
            raise ParameterError(f"ROI size must be positive and finite, got {size}")
        object.__setattr__(self, "center", center)
        object.__setattr__(self, "size", size)

    @classmethod
    def parse(cls, text: str) -> RoiBox:
        """Parse 'CX,CY,CZ,SX,SY,SZ' (RAS mm), the form of ``--roi-ras``."""
        try:
            values = [float(v) for v in text.replace(" ", "").split(",")]
        except ValueError:
            raise ParameterError(f"ROI '{text}' is not six numbers CX,CY,CZ,SX,SY,SZ") from None
        if len(values) != 6:
            raise ParameterError(f"ROI '{text}' has {len(values)} numbers; expected six: CX,CY,CZ,SX,SY,SZ")
        return cls(tuple(values[:3]), tuple(values[3:]))

    @classmethod
    def from_bounds(cls, low, high) -> RoiBox:
        """A box from its RAS minimum and maximum corners."""
        low, high = np.asarray(low, dtype=float), np.asarray(high, dtype=float)
        return cls(tuple((low + high) / 2), tuple(np.abs(high - low)))

    @property
    def low(self) -> np.ndarray:
        """Minimum RAS corner."""
        return np.asarray(self.center) - np.asarray(self.size) / 2

    @property
    def high(self) -> np.ndarray:
        """Maximum RAS corner."""
        return np.asarray(self.center) + np.asarray(self.size) / 2

    def as_list(self) -> list[float]:
        """[cx, cy, cz, sx, sy, sz], the JSON form."""
        return [*self.center, *self.size]

    def contains(self, ras, tolerance: float = 1e-6) -> bool:
        """Whether a RAS point is inside the box."""
        ras = np.asarray(ras, dtype=float)
        return bool(np.all(ras >= self.low - tolerance) and np.all(ras <= self.high + tolerance))


def read_markups_roi(path: str) -> RoiBox:
    """The RAS box of the first ROI in a Slicer markups file (.mrk.json); a rotated ROI gives its 8 corners' bounds."""
    from ..json_input import read_json

    data = read_json(path, "the markups file")
    try:
        markup = next(m for m in data.get("markups", []) if m.get("type") == "ROI")
        center = np.array(markup["center"], dtype=float)
        size = np.array(markup["size"], dtype=float)
        orientation = np.array(markup.get("orientation", np.eye(3).ravel()), dtype=float).reshape(3, 3)
        if center.shape != (3,) or size.shape != (3,):
            raise ValueError("an ROI's center and size are three numbers each")
    except StopIteration:
        raise InputError(path, "is not a Slicer markups ROI file (it holds no markup of type ROI)") from None
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise InputError(path, f"is not a Slicer markups ROI file ({type(error).__name__}: {error})") from None
    lps = markup.get("coordinateSystem", "LPS").upper() == "LPS"
    # Corners in the ROI's own frame, rotated by its orientation (columns = axes), in the file's frame.
    signs = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)], dtype=float)
    corners = center + (signs * size / 2) @ orientation.T
    if lps:
        corners = lps_to_ras(corners)
    return RoiBox.from_bounds(corners.min(axis=0), corners.max(axis=0))


MAX_SEGMENT_POINTS = 20000  # voxel centres kept for the mask: a 4 mm registration grid needs no more


@dataclass(frozen=True)
class Segment:
    """A structure outlined on the query's patient (a Segment Editor segment or a label of a label map).

    ``box`` is the RAS box around its voxels, ``centre`` the voxel deepest inside it (farthest from its border: inside
    even when the structure is curved, where the box centre may not be), ``points`` RAS voxel centres (evenly thinned
    to at most MAX_SEGMENT_POINTS) and ``voxel_mm`` the label map's largest spacing, for drawing the mask on other grids.
    """

    box: RoiBox
    centre: tuple[float, float, float]
    points: np.ndarray
    voxel_mm: float
    name: str = ""


def segment_of_array(mask_kji: np.ndarray, ijk_to_ras: np.ndarray, name: str = "") -> Segment:
    """A :class:`Segment` from a boolean (k, j, i) mask and its grid's 4 x 4 IJK-to-RAS matrix."""
    import SimpleITK as sitk

    mask = np.asarray(mask_kji, bool)
    where = np.argwhere(mask)
    if where.size == 0:
        raise ParameterError(f"segment '{name}' is empty")
    matrix = np.asarray(ijk_to_ras, float)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)  # (i, j, k)
    low, high = where.min(axis=0), where.max(axis=0)
    crop = np.pad(mask[low[0]:high[0] + 1, low[1]:high[1] + 1, low[2]:high[2] + 1], 1)
    image = sitk.GetImageFromArray(crop.astype(np.uint8))
    image.SetSpacing(tuple(float(v) for v in spacing))
    depth = -sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(image, insideIsPositive=False, squaredDistance=False,
                                                                  useImageSpacing=True))
    deepest = np.argwhere(depth >= depth.max() - 1e-6) - 1 + low
    centroid = where.mean(axis=0)
    centre_kji = deepest[np.argmin(np.linalg.norm((deepest - centroid) * spacing[::-1], axis=1))]

    def ras(kji: np.ndarray) -> np.ndarray:
        ijk = np.asarray(kji, float)[..., ::-1]
        return ijk @ matrix[:3, :3].T + matrix[:3, 3]

    corners_ijk = np.array([[a, b, c] for a in (low[2] - 0.5, high[2] + 0.5) for b in (low[1] - 0.5, high[1] + 0.5)
                            for c in (low[0] - 0.5, high[0] + 0.5)])
    corners = corners_ijk @ matrix[:3, :3].T + matrix[:3, 3]
    step = max(1, int(np.ceil(len(where) / MAX_SEGMENT_POINTS)))
    return Segment(RoiBox.from_bounds(corners.min(axis=0), corners.max(axis=0)), tuple(float(v) for v in ras(centre_kji)),
                   ras(where[::step]), float(spacing.max()), name)


def segment_of_label(path: str, label: int) -> Segment:
    """One label of a label map file (a Segment Editor export) as a :class:`Segment`."""
    from .readers import read_volume

    labels = read_volume(path)
    mask = np.asarray(labels.array) == label
    if not mask.any():
        present = sorted(int(v) for v in np.unique(labels.array) if v != 0)[:20]
        raise InputError(path, f"holds no voxel of label {label} (labels present: {present or 'none'})")
    return segment_of_array(mask, labels.ijk_to_ras, f"label {label}")


def roi_of_label(path: str, label: int) -> RoiBox:
    """The RAS box around one label of a label map file (a Segment Editor export): its voxels' extent, half a voxel out."""
    return segment_of_label(path, label).box
