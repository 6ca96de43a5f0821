"""Modality and body region of a volume from the image itself, for files that do not say (NIfTI, NRRD, bare DICOM).

Modality: CT when the voxels hold air on the Hounsfield scale (:func:`intensity.looks_like_ct`), else MR
(the only other kind the index holds so far). Body region, from the anatomy on a ~4 mm grid: the body
is the largest connected part above -500 HU (CT) or above a tenth of the 99th percentile (MR), which
leaves out head rests and tables; a head is at most 210 mm wide from right to left in its median slice;
otherwise a chest holds lung (air below -400 HU inside the body's outline, slice by slice) in at least
12 % of the body's volume, and anything else is an abdomen (abdomen and pelvis are not told apart yet).
Values are DICOM's words (CT, MR; HEAD, CHEST, ABDOMEN) so one filter matches read and inferred ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .intensity import looks_like_ct
from .volume import Volume

# Body regions that share a border (DICOM's words): a scan labelled one often holds the other's edge (an abdominal CT the
# lung bases, a chest CT the liver dome), and the inference reads one label from coverage that can straddle both.
NEIGHBOURS = {frozenset(pair) for pair in (("HEAD", "NECK"), ("NECK", "CHEST"), ("CHEST", "ABDOMEN"), ("ABDOMEN", "PELVIS"))}
GRID_MM = 4.0
HEAD_WIDTH_MM = 210.0
LUNG_FRACTION = 0.12


@dataclass
class Inferred:
    """What the image says about itself, with the measurements behind it."""

    modality: str
    body_part: str
    width_mm: float
    lung_fraction: float


def corners_lps(image) -> np.ndarray:
    """LPS positions of the centres of a SimpleITK image's 8 corner voxels, shape (8, 3)."""
    size = image.GetSize()
    return np.array([image.TransformIndexToPhysicalPoint((a, b, c)) for a in (0, size[0] - 1) for b in (0, size[1] - 1)
                     for c in (0, size[2] - 1)])


def axis_aligned(image, spacing_mm: float, fill: float):
    """A SimpleITK image resampled (linear) on the identity-direction LPS grid of ``spacing_mm`` that covers it: axis 0
    of its array runs inferior to superior, whatever the scan's orientation."""
    import SimpleITK as sitk

    corners = corners_lps(image)
    low, high = corners.min(axis=0), corners.max(axis=0)
    size = [max(1, int(np.ceil((high[a] - low[a]) / spacing_mm)) + 1) for a in range(3)]
    return sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, tuple(low), (spacing_mm,) * 3,
                         (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), float(fill), sitk.sitkFloat32)


def body_threshold(array: np.ndarray, ct: bool) -> float:
    """The intensity above which a voxel is body, not air: -500 HU for CT, a tenth of the 99th percentile for MR."""
    return -500.0 if ct else 0.1 * float(np.percentile(array, 99))


def _resampled(volume: Volume, fill: float):
    """The volume on an axis-aligned RAS-ordered grid of GRID_MM (SimpleITK image, LPS, identity direction)."""
    return axis_aligned(volume.to_sitk(volume.finite_float32()), GRID_MM, fill)


def infer(volume: Volume) -> Inferred:
    """Modality and body region measured on the image (whatever the file says)."""
    import SimpleITK as sitk

    ct = looks_like_ct(Volume(volume.array, volume.ijk_to_ras))  # the voxels alone, not the file's modality
    image = _resampled(volume, -1024.0 if ct else 0.0)
    array = sitk.GetArrayFromImage(image)  # [S, P, L] on the LPS grid: axis 0 runs inferior to superior
    threshold = body_threshold(array, ct)
    parts = sitk.RelabelComponent(sitk.ConnectedComponent(image > threshold))
    body = sitk.GetArrayFromImage(parts) == 1
    if not body.any():
        return Inferred("CT" if ct else "MR", "UNKNOWN", 0.0, 0.0)
    widths = [np.ptp(np.nonzero(plane.any(axis=0))[0]) * GRID_MM for plane in body if plane.any()]
    width = float(np.median(widths))
    outline = np.stack([sitk.GetArrayFromImage(sitk.BinaryFillhole(sitk.GetImageFromArray(plane.astype(np.uint8))))
                        for plane in body]) > 0
    lung = float(np.sum(outline & ~body & (array < -400)) / max(1, outline.sum())) if ct else 0.0
    if width <= HEAD_WIDTH_MM:
        region = "HEAD"
    elif ct and lung >= LUNG_FRACTION:
        region = "CHEST"
    else:
        region = "ABDOMEN" if ct else "UNKNOWN"
    return Inferred("CT" if ct else "MR", region, round(width, 1), round(lung, 4))


def neighbours(region: str, other: str) -> bool:
    """Whether two body regions (DICOM's words, any case) share a border."""
    return frozenset((region.upper(), other.upper())) in NEIGHBOURS


def fill_in(volume: Volume) -> dict[str, str]:
    """Set a volume's modality and body part from the image where the file left them empty; returns their sources."""
    sources = {"modality_source": "dicom" if volume.modality else "inferred",
               "body_part_source": "dicom" if volume.body_part else "inferred"}
    if volume.modality and volume.body_part:
        return sources
    found = infer(volume)
    volume.modality = volume.modality or found.modality
    if not volume.body_part and found.body_part != "UNKNOWN":
        volume.body_part = found.body_part
    elif not volume.body_part:
        sources["body_part_source"] = "none"
    return sources
