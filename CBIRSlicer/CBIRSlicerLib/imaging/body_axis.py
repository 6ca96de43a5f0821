"""A body coordinate shared by all patients: the level of every axial plane on one head-to-feet axis.

The level is in millimetres of a standard adult, 0 at the vertex of the skull and growing toward the feet
(the standard's landmarks are in :data:`STANDARD_LANDMARKS`). A volume gets its levels by aligning what each of
its axial planes looks like (a :class:`Profile`: body area, width and depth; for CT also the share of bone, air,
fat and bone-enclosed tissue and the bone's width) with a :class:`Template` of the same measurements along the
standard axis, made from real patients (``benchmarks/body_axis_template.py``: head-and-neck CTs of the tuning
patients placed by their organs, the abdominal CT by its vertebrae, the head CT by the alignment itself). The
map from the patient's superior coordinate S to the level is linear, ``level = slope * (offset - S)``: the
slope absorbs body size (a tall patient's neck is longer in mm but spans the same levels), the offset absorbs
the field of view (a volume may start anywhere), and the alignment compares shares and shapes, so contrast and
crops of the field of view count little. MR has no Hounsfield scale: it is aligned on the body's area, width and
depth only, which makes its level coarser (its ``uncertainty_mm`` says so).

``body_axis(volume)`` gives a :class:`BodyAxis`; ``level_at(s)`` and ``s_at(level)`` go both ways and answer
None outside the volume's body (a level the field of view does not hold has no place in it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from .intensity import looks_like_ct
from .volume import Volume

PROFILE_VERSION = 1  # bump when what a profile measures changes (the builder caches profiles by it)
GRID_MM = (4.0, 4.0, 2.0)  # the profile's grid: 4 mm in the plane (shapes), 2 mm between planes (levels)
CT_FEATURES = ("log_area", "width", "depth", "bone", "air", "enclosed", "fat", "bone_width")
SHAPE_FEATURES = ("log_area", "width", "depth")  # what MR can be aligned on
TEMPLATE_FILE = Path(__file__).with_name("body_axis_template.json")
# Standard levels (mm from the vertex) of landmarks, for the regions and the user's orientation; the head-and-neck
# organs are the tuning patients' means (written into the template), the trunk's from textbook ratios.
STANDARD_LANDMARKS: dict[str, float] = {}
SLOPES = np.exp(np.linspace(np.log(0.8), np.log(1.25), 21))  # body size: 0.8 to 1.25 standard mm per patient mm
SLOPE_PRIOR_SD = 0.1  # log-slope spread of adults (a prior, so short volumes do not stretch to fit)
MIN_PLANES = 10  # planes with body needed to align at all (20 mm)
GAP_COST = 1.5  # a plane placed beyond the template's known levels (the legs): a poor match, not a bar
ABOVE_COST = 4.0  # a plane of body placed above the vertex: impossible
MIN_KNOWN = 0.6  # share of a volume's planes that must fall on the template's known levels


@dataclass
class Profile:
    """Measurements of each axial plane of a volume, on the profile grid (planes from inferior to superior)."""

    s_mm: np.ndarray  # superior coordinate (RAS S, mm) of each plane, ascending
    values: np.ndarray  # (planes, features) in the order of ``features``
    body: np.ndarray  # bool per plane: the plane holds enough body to be measured
    features: tuple[str, ...]
    modality: str  # CT or MR (measured, not read)


@dataclass(frozen=True)
class Template:
    """The profile of the standard body: median and spread of each feature in bins along the level."""

    levels: np.ndarray  # bin centres, mm from the vertex
    median: np.ndarray  # (features, bins), NaN where no patient covers a bin
    spread: np.ndarray  # (features, bins): robust standard deviation across patients, floored
    features: tuple[str, ...]
    landmarks: dict[str, float] = field(default_factory=dict)
    source: str = ""

    @property
    def bin_mm(self) -> float:
        """Width of a bin."""
        return float(self.levels[1] - self.levels[0])


@dataclass
class BodyAxis:
    """Where a volume lies on the standard body axis: ``level = slope * (offset - S)`` within its body's extent."""

    slope: float  # standard mm per patient mm
    offset: float  # S (mm) where the level would be 0 (the vertex, if it were in view)
    s_range: tuple[float, float]  # S extent of the volume's body (lowest, highest plane with body), mm
    uncertainty_mm: float  # half-width of the offsets that fit almost as well, in level mm
    cost: float  # mean robust misfit of the planes to the template (about 0.3-0.6 fits well, above 1 poorly)
    modality: str
    planes: int  # planes with body that were aligned

    @property
    def level_range(self) -> tuple[float, float]:
        """Levels of the body's highest and lowest planes (head end first)."""
        return (self._level(self.s_range[1]), self._level(self.s_range[0]))

    def _level(self, s: float) -> float:
        return float(self.slope * (self.offset - s))

    def level_at(self, s_mm: float, margin_mm: float = 0.0) -> float | None:
        """The level of the axial plane at superior coordinate ``s_mm`` (RAS S); None outside the body's extent."""
        if not self.s_range[0] - margin_mm <= s_mm <= self.s_range[1] + margin_mm:
            return None
        return self._level(s_mm)

    def level_of_point(self, ras) -> float | None:
        """The level of a RAS point (its S coordinate); None outside the body's extent."""
        return self.level_at(float(np.asarray(ras, float)[2]))

    def s_at(self, level: float, margin_mm: float = 0.0) -> float | None:
        """The superior coordinate (RAS S, mm) where ``level`` lies in this volume; None when outside its body's extent."""
        s = self.offset - float(level) / self.slope
        return s if self.s_range[0] - margin_mm <= s <= self.s_range[1] + margin_mm else None

    def to_dict(self) -> dict:
        """JSON form (for the catalog and answers)."""
        return {"slope": round(self.slope, 5), "offset": round(self.offset, 3), "s_range": [round(v, 3) for v in self.s_range],
                "uncertainty_mm": round(self.uncertainty_mm, 2), "cost": round(self.cost, 4), "modality": self.modality,
                "planes": self.planes}

    @classmethod
    def from_dict(cls, data: dict) -> BodyAxis:
        """Inverse of :meth:`to_dict`."""
        return cls(float(data["slope"]), float(data["offset"]), (float(data["s_range"][0]), float(data["s_range"][1])),
                   float(data["uncertainty_mm"]), float(data["cost"]), str(data["modality"]), int(data["planes"]))


def _corners_lps(image) -> np.ndarray:
    size = image.GetSize()
    return np.array([image.TransformIndexToPhysicalPoint((a, b, c)) for a in (0, size[0] - 1) for b in (0, size[1] - 1)
                     for c in (0, size[2] - 1)])


def resampled(volume: Volume, fill: float) -> tuple[np.ndarray, float]:
    """The volume on the axis-aligned profile grid ([S, P, L], axis 0 inferior to superior) and the S of plane 0."""
    import SimpleITK as sitk

    image = volume.to_sitk(volume.finite_float32())
    corners = _corners_lps(image)
    low, high = corners.min(axis=0), corners.max(axis=0)
    size = [max(1, int(np.ceil((high[a] - low[a]) / GRID_MM[a])) + 1) for a in range(3)]
    out = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, tuple(low), GRID_MM,
                        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), float(fill), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out), float(low[2])


def _fill_planes(mask: np.ndarray) -> np.ndarray:
    """Holes filled in each axial plane (lungs and airways are holes of the body's outline in the plane, not in 3D).

    One connected-component pass for the whole stack: the planes, each framed by a ring of background, are
    interleaved with full planes of foreground, so background connects within a plane only; what is not connected
    to a plane's frame is a hole (a per-plane hole filling costs seconds on noisy planes).
    """
    import SimpleITK as sitk

    planes, rows, cols = mask.shape
    stack = np.ones((2 * planes, rows + 2, cols + 2), np.uint8)
    stack[0::2] = 0
    stack[0::2, 1:-1, 1:-1] = mask
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray((stack == 0).astype(np.uint8))))
    outside = np.unique(labels[0::2, 0, 0])
    return ~np.isin(labels[0::2, 1:-1, 1:-1], outside)


def _largest_part(mask: np.ndarray) -> np.ndarray:
    import SimpleITK as sitk

    parts = sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8))))
    return sitk.GetArrayFromImage(parts) == 1


def _extent_mm(mask: np.ndarray, axis: int) -> np.ndarray:
    """Extent of a mask along an in-plane axis (1: P, 2: L) for each plane, in mm (0 where empty)."""
    present = mask.any(axis=3 - axis)
    n = present.shape[1]
    first = np.argmax(present, axis=1)
    last = n - 1 - np.argmax(present[:, ::-1], axis=1)
    return np.where(present.any(axis=1), (last - first + 1) * GRID_MM[2 - axis], 0.0)


def profile(volume: Volume) -> Profile:
    """What each axial plane of a volume looks like, measured on the profile grid."""
    ct = looks_like_ct(Volume(volume.array, volume.ijk_to_ras))  # the voxels alone, not the file's word
    array, s0 = resampled(volume, -1024.0 if ct else 0.0)
    threshold = -500.0 if ct else 0.1 * float(np.percentile(array, 99))
    body = _largest_part(array > threshold)
    outline = _fill_planes(body)
    area = outline.sum(axis=(1, 2)).astype(float)
    pixel = GRID_MM[0] * GRID_MM[1]
    present = area * pixel >= 400.0  # 4 cm^2: a plane through the vertex's cap or a cropped edge is not measured
    share = np.maximum(area, 1.0)
    columns = [np.log10(np.maximum(area * pixel, 1.0)), _extent_mm(outline, 2), _extent_mm(outline, 1)]
    if ct:
        bone = (array > 200.0) & outline
        enclosed = _fill_planes(bone) & ~bone
        width = np.maximum(columns[1], 1.0)
        columns += [bone.sum(axis=(1, 2)) / share, ((array < -400.0) & outline).sum(axis=(1, 2)) / share,
                    enclosed.sum(axis=(1, 2)) / share, ((array > -190.0) & (array < -30.0) & outline).sum(axis=(1, 2)) / share,
                    _extent_mm(bone, 2) / width]
    s = s0 + GRID_MM[2] * np.arange(array.shape[0])
    return Profile(s, np.stack(columns, axis=1), present, CT_FEATURES if ct else SHAPE_FEATURES, "CT" if ct else "MR")


def load_template(path: str | Path | None = None) -> Template:
    """The standard body's template (the packaged one unless ``path`` names another)."""
    return _load_template(str(path or TEMPLATE_FILE))


@lru_cache(maxsize=4)
def _load_template(path: str) -> Template:
    data = json.loads(Path(path).read_text())
    median = np.array(data["median"], dtype=float)
    spread = np.array(data["spread"], dtype=float)
    return Template(np.array(data["levels"], dtype=float), median, spread, tuple(data["features"]),
                    {k: float(v) for k, v in data.get("landmarks", {}).items()}, data.get("source", ""))


def template_to_json(template: Template) -> str:
    """JSON text of a template (NaN as null), as the builder writes it."""
    def rows(matrix):
        return [[None if not np.isfinite(v) else round(float(v), 5) for v in row] for row in matrix]

    return json.dumps({"features": list(template.features), "levels": [round(float(v), 3) for v in template.levels],
                       "median": rows(template.median), "spread": rows(template.spread),
                       "landmarks": {k: round(v, 2) for k, v in template.landmarks.items()}, "source": template.source},
                      indent=None, separators=(",", ":"))


def _costs(s: np.ndarray, values: np.ndarray, template: Template, slope: float, offsets: np.ndarray) -> np.ndarray:
    """Mean robust misfit of the planes placed by ``level = slope * (offset - s)`` for each offset."""
    levels = slope * (offsets[:, None] - s[None, :])  # (offsets, planes)
    index = np.rint((levels - template.levels[0]) / template.bin_mm).astype(int)
    above = index < 0
    index = np.clip(index, 0, template.levels.size - 1)
    median = template.median[:, index]  # (features, offsets, planes)
    known = ~above & np.isfinite(median[0])
    spread = template.spread[:, index]
    residual = (values.T[:, None, :] - np.nan_to_num(median)) / spread
    # Cauchy negative log-likelihood: a cropped or odd plane counts, but boundedly; log(spread) so that a loosely
    # known stretch of the template is not a cheaper place to put planes than a well-known one
    typical = np.median(template.spread, axis=1)[:, None, None]
    per_plane = np.mean(np.log1p(residual ** 2) + np.log(spread / typical), axis=0)
    cost = np.where(known, per_plane, np.where(above, ABOVE_COST, GAP_COST)).mean(axis=1)
    return np.where(known.mean(axis=1) >= MIN_KNOWN, cost, np.inf)


def align(prof: Profile, template: Template | None = None) -> BodyAxis | None:
    """The linear map of a profile onto the template that fits best; None when too little body to align."""
    template = template or load_template()
    columns = [template.features.index(name) for name in prof.features]
    tmpl = Template(template.levels, template.median[columns], template.spread[columns], prof.features)
    s, values = prof.s_mm[prof.body], prof.values[prof.body]
    if s.size < MIN_PLANES:
        return None
    low, high = float(template.levels[0]), float(template.levels[-1])
    step = 4.0
    best = (np.inf, 1.0, 0.0)
    table = {}
    for slope in SLOPES:
        # offsets that put at least part of the volume on the template's levels
        offsets = np.arange(s.min() + low / slope - 100.0, s.max() + high / slope + 100.0, step)
        cost = _costs(s, values, tmpl, slope, offsets) + (np.log(slope) / SLOPE_PRIOR_SD) ** 2 / (2 * s.size) * 4
        table[slope] = (offsets, cost)
        k = int(np.argmin(cost))
        if cost[k] < best[0]:
            best = (float(cost[k]), float(slope), float(offsets[k]))
    # refine the offset at the best slope on a 0.5 mm step
    _, slope, offset = best
    fine = np.arange(offset - step, offset + step + 0.25, 0.5)
    cost = _costs(s, values, tmpl, slope, fine) + (np.log(slope) / SLOPE_PRIOR_SD) ** 2 / (2 * s.size) * 4
    k = int(np.argmin(cost))
    best_cost, offset = float(cost[k]), float(fine[k])
    # uncertainty: the spread of levels (at the body's centre) of all fits within a small margin of the best
    centre = float(np.median(s))
    near = [slope_ * (offsets[c] - centre) for slope_, (offsets, costs) in table.items()
            for c in np.nonzero(costs <= best_cost + 0.02)[0]]
    level_centre = slope * (offset - centre)
    uncertainty = max(float(np.max(np.abs(np.array(near) - level_centre))) if near else 0.0, GRID_MM[2])
    return BodyAxis(slope, offset, (float(s.min()), float(s.max())), uncertainty, best_cost, prof.modality, int(s.size))


def body_axis(volume: Volume, template: Template | None = None) -> BodyAxis | None:
    """The standard levels of a volume's axial planes; None when it holds too little body to tell (under 20 mm)."""
    return align(profile(volume), template)
