"""Whether a query box holds a focal finding: something that stands out from the tissue around it on every side.

A box drawn around a lesion (a nodule in the lung, a cyst in the liver, a bright spot in the brain) holds a blob whose
intensity differs from the tissue that surrounds it, and that tissue is alike all around. A box drawn around an organ
or a region holds anatomy that continues past the box (the cord above and below, the brainstem into the midbrain) or
that borders different tissues on different sides (a parotid between fat, muscle and bone). The measure compares the
box's core (the ellipsoid of 0.35 of its size) with six columns just outside the box, one along each axis direction, as
wide as the core and reaching from 1.15 to 1.6 box half-sides from the centre:

    contrast = (the second smallest |core - column| of the six) / (the spread of the other five columns + 2 noise)

The second smallest difference, not the smallest, lets a lesion touch one wall (a lung tumour on the pleura); a
structure that continues both ways (a tube) matches two columns and scores low. Medians throughout; voxels holding the
volume's padding value (outside the scanner's field of view or a stored region) are left out.

Measured with that core (a rim lesion's necrotic centre; a core of half the box mixed its wall in), on tuning
data: phantom lesions of the demo cohorts (seeds 0-3, boxes of 2.5 radii) 0.50 to 36, median 3; organ boxes of 20
tuning head-and-neck patients median 0.06 (the cord and the larynx, air among soft tissue, up to 3); abdominal organs of
the shared CT median 0.12 (ribs, vertebrae, the cord, the spleen 0.75-1.5; a lung lobe's box 4.3); brain MR regions
median 0.12, at most 0.94. A box above :data:`FOCAL_MIN` reads as focal; anatomy that reads so is still shown as
anatomy wherever the registered result looks like the query's box there (:mod:`retrieval.placement`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .intensity import looks_like_ct, padding_value
from .roi import RoiBox
from .volume import Volume

FOCAL_MIN = 0.45
CORE = 0.35  # the core: the ellipsoid of this share of the box's half-sides
COLUMN_WIDTH = 0.35  # the columns' half-width across, in box half-sides
RING = (1.15, 1.6)  # the columns' reach along their axis, in box half-sides from the centre
CT_NOISE_HU = 10.0
MR_NOISE_SHARE = 0.02  # of the box's 99th percentile
MIN_VOXELS = 5


@dataclass(frozen=True)
class Focality:
    """How much a box's core stands out from the tissue around it (:data:`FOCAL_MIN`), with what it was measured on."""

    contrast: float
    core: float  # median of the core
    columns: tuple[float, ...]  # median of each column with enough voxels

    @property
    def focal(self) -> bool:
        """Whether the box reads as a focal finding."""
        return bool(self.contrast >= FOCAL_MIN)


def focality(volume: Volume, roi: RoiBox) -> Focality | None:
    """The box's focality; None when the box (with its surroundings) holds too little of the volume to tell."""
    half = np.asarray(roi.size, float) / 2
    centre = np.asarray(roi.center, float)
    reach = half * RING[1]
    corners = np.array([[a, b, c] for a in (-1, 1) for b in (-1, 1) for c in (-1, 1)]) * reach + centre
    ijk = volume.ras_to_ijk_points(corners)
    low = np.maximum(np.floor(ijk.min(axis=0)).astype(int), 0)
    high = np.minimum(np.ceil(ijk.max(axis=0)).astype(int), np.array(volume.shape_ijk) - 1)
    if np.any(high < low):
        return None
    values = np.asarray(volume.array[low[2]:high[2] + 1, low[1]:high[1] + 1, low[0]:high[0] + 1], dtype=float)
    k, j, i = np.mgrid[low[2]:high[2] + 1, low[1]:high[1] + 1, low[0]:high[0] + 1]
    ras = volume.ijk_to_ras_points(np.stack([i, j, k], axis=-1).reshape(-1, 3).astype(float)).reshape(values.shape + (3,))
    rel = (ras - centre) / half  # the box is |rel| <= 1 on every axis
    valid = np.ones(values.shape, bool)
    padding = padding_value(volume)
    if padding is not None:
        valid &= values != padding
    core_values = values[valid & (np.linalg.norm(rel, axis=-1) <= CORE)]
    if core_values.size < MIN_VOXELS:
        return None
    columns = []
    for axis in range(3):
        across = [a for a in range(3) if a != axis]
        narrow = (np.abs(rel[..., across[0]]) <= COLUMN_WIDTH) & (np.abs(rel[..., across[1]]) <= COLUMN_WIDTH)
        for sign in (-1.0, 1.0):
            along = sign * rel[..., axis]
            column = values[valid & narrow & (along > RING[0]) & (along <= RING[1])]
            if column.size >= MIN_VOXELS:
                columns.append(float(np.median(column)))
    if len(columns) < 4:  # the box sits at the volume's edge: too little around it to tell
        return None
    core = float(np.median(core_values))
    ct = looks_like_ct(volume)
    noise = CT_NOISE_HU if ct else MR_NOISE_SHARE * float(np.percentile(values[valid], 99))
    by_difference = sorted(columns, key=lambda value: abs(value - core))
    rest = by_difference[1:]
    contrast = abs(by_difference[1] - core) / (max(rest) - min(rest) + 2 * noise)
    return Focality(round(float(contrast), 3), core, tuple(columns))
