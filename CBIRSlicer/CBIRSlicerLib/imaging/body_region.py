"""Modality and body region of a volume from the image itself, and which of the file's words to believe.

Modality: CT when the voxels hold air on the Hounsfield scale (:func:`intensity.looks_like_ct`), else MR (the only
other kind the index holds so far). Body region: where the volume lies on the standard body axis
(:mod:`body_axis`), cut into bands of level (:data:`BANDS`: head, neck, chest, abdomen, pelvis, legs); the regions a
volume covers are the bands holding at least 30 mm or a third of its body, its region the band holding most. Checks
from the image itself guard the axis: lungs (air or, on MR, dark holes filling at least a tenth of the body's
section) in 40 % of the planes or more make it CHEST, however narrow its field of view (a chest CT is never HEAD),
unless the axis places it in the abdomen and they fill under a tenth of the section (lung bases);
a chest with lungs in under a tenth of its planes is none; a head wider than 230 mm is none; a body as narrow as a
head is no adult trunk. When the axis cannot be had (under 20 mm of body), fits badly, fails the width check or, on
CT, places brain (planes at least half at 20-45 HU) below the head in a body as narrow as a head (brain lies only above
the skull base), the rules of old decide: a body at most 230 mm wide is a head, anything wider the abdomen or pelvis.

A DICOM Body Part Examined counts only when it names a region (:mod:`body_parts`, the Annex L terms):
``PARTIALBODY``, ``WHOLEBODY``, empty values and free text leave the image to decide (:func:`fill_in`).
Values are DICOM's words (CT, MR; HEAD, NECK, CHEST, ABDOMEN, PELVIS, LEG) so one filter matches read and inferred ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import body_axis, body_parts
from .volume import Volume

# Body regions that share a border (DICOM's words): a scan labelled one often holds the other's edge (an abdominal CT the
# lung bases, a chest CT the liver dome), and the inference reads one label from coverage that can straddle both.
NEIGHBOURS = {frozenset(pair) for pair in (("HEAD", "NECK"), ("NECK", "CHEST"), ("CHEST", "ABDOMEN"), ("ABDOMEN", "PELVIS"),
                                           ("PELVIS", "LEG"))}
GRID_MM = 4.0
HEAD_WIDTH_MM = 230.0  # the widest adult head is under 210 mm; a trunk (or shoulders) is wider
# Bands of the standard level (mm from the vertex, imaging/body_axis): below the jaw (hyoid) the neck, the lung
# apices and shoulders the chest, between diaphragm dome and lung bases the abdomen, the sacral promontory (L5-S1)
# the pelvis, below the lesser trochanters the legs. From the template's landmarks (larynx at C5 223, L1 563) and
# textbook vertebral heights; a band edge is a convention, the neighbours of NEIGHBOURS absorb its uncertainty.
BANDS = (("HEAD", -1e9, 190.0), ("NECK", 190.0, 275.0), ("CHEST", 275.0, 520.0), ("ABDOMEN", 520.0, 720.0),
         ("PELVIS", 720.0, 900.0), ("LEG", 900.0, 1e9))
MIN_BAND_MM = 30.0
LUNG_SHARE = 0.08  # air (CT) or dark holes (MR) in the middle and back of a section: lungs, not airway or bowel gas
CHEST_LUNG_PLANES = 0.4  # lungs in this share of the planes make a chest (a chest CT: 0.7-1; an abdomen from the dome: < 0.3)
NO_LUNG_PLANES = 0.1  # lungs in fewer planes than this: no chest
# Lungs in a volume the axis places in the abdomen are its lung bases unless they fill a tenth of the section (median
# over planes): the lung apices of the head-and-neck CTs' upper chest fill 12-20 % (10th-90th percentile), the lung
# bases in the abdominal CT's top 40 mm 2.5 % (at most 13 %).
CHEST_LUNG_SHARE = 0.10
TRUNK = ("CHEST", "ABDOMEN", "PELVIS")
FEW_PLANES = 3  # planes of body (6 mm) enough to read a region from the body axis (not to place by: body_axis wants 10)
# An axis fitted worse than body_axis.RELIABLE_COST is not believed (the rules decide), except over a long volume
# (LONG_MM), where a misfit that high comes from some odd planes rather than from a free fit: head-and-neck CTs whose
# head rest and mask are part of the body's outline (3 of 170 here, costs 1.22-1.25) tell their region up to
# REGION_COST, while 40-60 mm slabs fitted at 1.21-1.43 were crops of a neck-like box around the brainstem.
REGION_COST = 1.5
LONG_MM = 150.0
MIN_BODY_WIDTH_MM = 80.0  # narrower than any adult head, neck or trunk: a tube of stored tissue, not a body's section
# Brain: a plane whose section is at least half at the density of brain (body_axis.BRAIN_HU, 20-45 HU) holds brain.
# No neck's does: its muscle lies among fat, bone and air (and, enhanced, above 45 HU); on the tuning patients'
# 40 mm slabs at the larynx and the mandible (2 x 52 patients) at most 0.36 of a plane, while the planes of stored
# brain (the planning CTs keep the brain but not always the skull around it) hold 0.5-0.8. Brain can lie only above
# the skull base: an axis that places a third of a narrow body's planes of brain below the head's band is wrong
# (a crop of brain without its skull read as a neck-like box), and the rules decide.
BRAIN_SHARE = 0.5
BRAIN_PLANES = 1 / 3


@dataclass
class Inferred:
    """What the image says about itself, with the measurements behind it."""

    modality: str
    body_part: str  # the region holding most of the body (DICOM's word), or UNKNOWN
    width_mm: float
    lung_fraction: float  # share of the planes with lungs in view
    regions: tuple[str, ...] = ()  # every region the volume covers, head to feet
    levels: tuple[float, float] | None = None  # standard levels of the body's top and bottom planes
    how: str = "none"  # "axis", "axis+lungs" (the lungs overruled it), "rules", "brain" (the rules, as the axis
    # placed brain below the head) or "none"
    axis: body_axis.BodyAxis | None = field(default=None, repr=False)

    @property
    def placeable_axis(self) -> body_axis.BodyAxis | None:
        """The body axis placement may go by: none where the rules found it wrong (brain it placed below the head) or it
        was fitted to a few planes (enough to name a region, not to place by)."""
        if self.how == "brain" or self.axis is None or self.axis.planes < body_axis.MIN_PLANES:
            return None
        return self.axis


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


def regions_of_levels(top: float, bottom: float) -> tuple[tuple[str, ...], str]:
    """The bands a level range covers (at least MIN_BAND_MM or a third of it), head to feet, and the one covering most."""
    extent = max(bottom - top, 1e-6)
    cover = {name: max(0.0, min(bottom, high) - max(top, low)) for name, low, high in BANDS}
    primary = max(cover, key=lambda name: cover[name])
    covered = tuple(name for name, _, _ in BANDS if cover[name] >= min(MIN_BAND_MM, extent / 3) and cover[name] > 0)
    return covered or (primary,), primary


def _lung_planes(prof: body_axis.Profile) -> tuple[float, float]:
    """Share of the profile's body planes whose section holds lungs, and the median share of lung in a section."""
    if not prof.body.any():
        return 0.0, 0.0
    share = prof.values[prof.body, prof.features.index(body_axis.LUNG_FEATURE)]
    return float(np.mean(share >= LUNG_SHARE)), float(np.median(share))


def _brain_below_head(prof: body_axis.Profile, axis: body_axis.BodyAxis | None) -> float:
    """Share of a CT profile's body planes that hold brain (BRAIN_SHARE) where the axis places them below the head."""
    if axis is None or body_axis.BRAIN_FEATURE not in prof.features or not prof.body.any():
        return 0.0
    brain = prof.values[prof.body, prof.features.index(body_axis.BRAIN_FEATURE)] >= BRAIN_SHARE
    levels = [axis.level_at(float(s)) for s in prof.s_mm[prof.body][brain]]
    return sum(level is not None and level > BANDS[0][2] for level in levels) / int(prof.body.sum())


def infer(volume: Volume) -> Inferred:
    """Modality and body region measured on the image (whatever the file says)."""
    prof = body_axis.profile(volume)
    if not prof.body.any():
        return Inferred(prof.modality, "UNKNOWN", 0.0, 0.0)
    width = float(np.median(prof.values[prof.body, prof.features.index("width")]))
    lungs, lung_share = _lung_planes(prof)
    # a few planes of body (a crop's edge) still tell a region, if not a level to place by
    axis = body_axis.align(prof) or body_axis.align(prof, min_planes=FEW_PLANES)
    long = axis is not None and axis.s_range[1] - axis.s_range[0] >= LONG_MM
    # brain below the head's band in a body as narrow as a head: the axis placed a crop of brain as a neck
    misplaced_brain = width <= HEAD_WIDTH_MM and _brain_below_head(prof, axis) >= BRAIN_PLANES
    trusted = (axis is not None and axis.cost <= (REGION_COST if long else body_axis.RELIABLE_COST)
               and width >= MIN_BODY_WIDTH_MM and not misplaced_brain)
    regions, primary = regions_of_levels(*axis.level_range) if trusted and axis is not None else ((), "UNKNOWN")
    levels = _rounded(axis.level_range) if trusted and axis is not None and axis.reliable else None
    # lungs in most planes: a chest, however narrow its field of view or odd its fit (on MR, where bone, sinuses and
    # fluid are dark too, only a body wider than a head)
    lung_bases = trusted and primary in ("ABDOMEN", "PELVIS") and lung_share < CHEST_LUNG_SHARE  # above an abdomen
    if lungs >= CHEST_LUNG_PLANES and not lung_bases and (prof.modality == "CT" or width > HEAD_WIDTH_MM):
        how = "axis" if primary == "CHEST" else "lungs"
        return Inferred(prof.modality, "CHEST", round(width, 1), round(lungs, 3),
                        tuple(sorted({*regions, "CHEST"}, key=_order)), levels, how, axis)
    if trusted and not (width <= HEAD_WIDTH_MM and primary in TRUNK):  # a body as narrow as a head is no adult trunk
        how = "axis"
        if primary == "CHEST" and lungs < NO_LUNG_PLANES:  # a chest without lungs is not one
            primary, how = ("ABDOMEN" if width > HEAD_WIDTH_MM else "NECK"), "axis+lungs"
        elif primary == "HEAD" and width > HEAD_WIDTH_MM:  # nor a head wider than any head
            primary, how = ("NECK" if "NECK" in regions else "CHEST" if lungs >= NO_LUNG_PLANES else "ABDOMEN"), "axis+width"
        regions = tuple(sorted({*regions, primary}, key=_order))
        return Inferred(prof.modality, primary, round(width, 1), round(lungs, 3), regions, levels, how, axis)
    if width <= HEAD_WIDTH_MM:
        how = "brain" if misplaced_brain else "rules"
        return Inferred(prof.modality, "HEAD", round(width, 1), round(lungs, 3), ("HEAD",), None, how, axis)
    # wider than a head, without lungs in most planes: the abdomen or pelvis (which of the two, only the axis tells)
    return Inferred(prof.modality, "ABDOMEN", round(width, 1), round(lungs, 3), ("ABDOMEN", "PELVIS"), None, "rules", axis)


def _rounded(levels: tuple[float, float]) -> tuple[float, float]:
    return round(levels[0], 1), round(levels[1], 1)


def _order(region: str) -> int:
    names = [name for name, _, _ in BANDS]
    return names.index(region) if region in names else len(names)


def neighbours(region: str, other: str) -> bool:
    """Whether two body regions (DICOM's words, any case, combined terms too) share a border but no region."""
    return body_parts.adjacent(region, other)


def trusted_body_part(volume: Volume) -> str | None:
    """The volume's Body Part Examined when it names a region (Annex L terms), else None (the image must decide)."""
    return volume.body_part if body_parts.names_region(volume.body_part) else None


def fill_in(volume: Volume) -> dict[str, Any]:
    """Set a volume's modality and body part from the image where the file is silent or says nothing a search can use
    (PARTIALBODY, WHOLEBODY, free text); returns what the catalog keeps about where they came from: their sources,
    the file's own word when it was set aside, the regions covered and the body coordinate."""
    told = volume.body_part
    trusted = trusted_body_part(volume)
    found = infer(volume)
    sources: dict[str, Any] = {"modality_source": "dicom" if volume.modality else "inferred",
                               "body_part_source": "dicom" if trusted else "inferred"}
    volume.modality = volume.modality or found.modality
    if trusted:
        sources["regions"] = list(body_parts.regions_of(trusted))
    elif found.body_part != "UNKNOWN":
        volume.body_part = found.body_part
        sources["regions"] = list(found.regions)
    else:
        volume.body_part = None
        sources["body_part_source"] = "none"
    if told and not trusted:
        sources["body_part_dicom"] = told  # kept for the record, not used
    if found.modality != volume.modality.upper():
        sources["modality_image"] = found.modality  # the voxels look like another modality than the file says
    if found.placeable_axis is not None:  # placement reads it (a wrong one is not kept: placement then infers again)
        sources["body_axis"] = found.placeable_axis.to_dict()
    if found.axis is not None:
        sources["levels"] = list(found.levels) if found.levels else None
    return sources


@dataclass(frozen=True)
class Kind:
    """What a query or an indexed case is, for the search's prior: modality, regions, and the levels it holds."""

    modality: str | None
    regions: tuple[str, ...] = ()
    levels: tuple[float, float] | None = None  # standard levels held (head end first); a query's: around its point

    def to_json(self) -> dict:
        """The answer's record of the query's kind."""
        return {"modality": self.modality, "body_part": self.regions[0] if len(self.regions) == 1 else
                ("+".join(self.regions) or None), "regions": list(self.regions),
                "levels": [round(v, 1) for v in self.levels] if self.levels else None}


LEVEL_MARGIN_MM = 25.0  # a query point's level window: its axis' error across patients (p90 12-28 mm, benchmarks)
MIN_SHARED_MM = 30.0  # a case holds a whole-volume query's levels when they share this much (or a third of the shorter)


def query_kind(volume: Volume, found: Inferred, centre_ras=None) -> Kind:
    """A query's kind: the file's modality (else the image's); the file's region when it names one, else the
    image's; the levels held around the query's point (its axis' level there, +-LEVEL_MARGIN_MM) or by the whole
    volume. The region of a point query is the band of its level, when the level is known."""
    modality = (volume.modality or found.modality or "").upper() or None
    trusted = trusted_body_part(volume)
    regions = body_parts.regions_of(trusted) if trusted else found.regions
    levels = found.levels
    if centre_ras is not None and found.levels is not None and found.axis is not None:
        level = found.axis.level_at(float(centre_ras[2]), margin_mm=LEVEL_MARGIN_MM)
        if level is not None:
            margin = LEVEL_MARGIN_MM + found.axis.uncertainty_mm
            levels = (level - margin, level + margin)
            if not trusted:
                regions = regions_of_levels(level, level + 1e-3)[0]
    return Kind(modality, tuple(regions), levels)


def case_kind(modality: str | None, body_part: str | None, metadata: dict) -> Kind:
    """An indexed case's kind from its catalog record (regions and levels as fill_in stored them; older indexes:
    the body part's regions only)."""
    named = body_parts.regions_of(body_part)
    stored = tuple(metadata.get("regions") or ())
    regions = stored if stored and (not named or set(named) <= set(stored)) else named  # the body part, if set since, wins
    levels = metadata.get("levels")
    return Kind((modality or "").upper() or None, regions, tuple(levels) if levels else None)


def _levels_shared(query: tuple[float, float], case: tuple[float, float]) -> float:
    """How much of the body's length (standard mm) a query and a case both hold (negative: the gap between them)."""
    return min(query[1], case[1]) - max(query[0], case[0])


def _holds_levels(query: tuple[float, float], case: tuple[float, float]) -> bool:
    shorter = min(query[1] - query[0], case[1] - case[0])
    return _levels_shared(query, case) >= min(MIN_SHARED_MM, shorter / 3)


def same_anatomy(query: Kind, case: Kind) -> bool:
    """Whether a case holds the query's anatomy, strictly (for who may vote on a suggestion): by the levels held where
    both have them, else by a shared region; a query nobody placed is like every case."""
    if query.levels is not None and case.levels is not None:
        return _holds_levels(query.levels, case.levels)
    if not query.regions:
        return True
    return bool(set(query.regions) & set(case.regions))


def prior_group(query: Kind, case: Kind) -> int:
    """0: the query's modality and its anatomy; 1: its modality, with a neighbouring or unknown region or levels near
    but not held; 2: another modality of its anatomy (a head CT for a brain MR); 3: the rest.

    Its anatomy: the case holds the query's levels (where both have them) or shares a region with it. Either suffices,
    so neither a region read wrong (a PARTIALBODY header, an odd crop) nor a level placed wrong costs the right case
    its place; and a chest CT that holds the liver dome counts for a liver query.
    """
    groups = []
    if query.levels is not None and case.levels is not None:
        shared = _levels_shared(query.levels, case.levels)
        groups.append(0 if _holds_levels(query.levels, case.levels) else 1 if shared > -2 * LEVEL_MARGIN_MM else 2)
    if not query.regions:  # nobody knows where the query lies: the modality alone decides
        groups.append(0)
    elif not case.regions:
        groups.append(1)
    elif set(query.regions) & set(case.regions):
        groups.append(0)
    else:
        groups.append(1 if any(neighbours(a, b) for a in query.regions for b in case.regions) else 2)
    anatomy = min(groups)
    if query.modality and case.modality != query.modality:
        return 2 if anatomy == 0 and (query.regions or query.levels is not None) else 3
    return anatomy if anatomy < 2 else 3
