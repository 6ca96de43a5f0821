"""Placing a match anatomically: which place a result shows, the registered one or a look-alike elsewhere.

Descriptor matching finds *where things look alike*; in real anatomy many places look alike (a
slab of abdomen resembles the slabs above and below it, one vertebra the next), so the best
matching item of a case can sit at the wrong level or on the wrong organ. Placement answers a
different question: where in the result lies the same anatomical place as the query's centre?
The query volume is registered into the result's volume (:mod:`imaging.registration`: whole-volume similarity and
affine, a local affine on the query's neighbourhood, a demons deformation) and the query centre carried through. Which
place a result then shows, the anatomical place or a clearly more alike item elsewhere, depends on what the query box
asks (:func:`look_alike_margin`) and on how well the result agrees with the query's box there (:data:`AGREEMENT_MIN`).
"""

from __future__ import annotations

import numpy as np

from ..imaging.registration import SPACING_MM
from . import ranking

# Which place a result shows: the anatomical place (registration) unless some item elsewhere is clearly more alike.
# "Clearly" depends on what the box asks. A tight box around a focal finding asks for look-alikes (a lesion of the same
# kind sits anywhere in another patient); a box around an organ or a region asks for the same place (tissue looks alike
# at many levels, and a look-alike elsewhere is the wrong answer). Measured with handcrafted on the demo cohorts (lesion
# boxes of 2.5 radii, 15-30 mm: a margin of 0.02 keeps 100 % of lesion matches) and on the real-anatomy benchmark
# (docs/benchmarks.md, "Placement: an affine start"): every look-alike that beat the anatomical place for a box of
# 30-60 mm there was wrong, by gaps up to 0.2 (raw cosines); from 35 mm the margin is 0.3.
FINDING_MAX_MM = 30.0  # a box whose largest side is at most this is read as a focal finding (the demo's largest lesion box)
REGION_MIN_MM = 35.0  # at least this: a region; in between the margin grows linearly
FINDING_MARGIN = 0.02  # cosine units by which a look-alike must beat the anatomical place
REGION_MARGIN = 0.3
# Whatever the box, the anatomical place also wins when the result, registered, looks like the query's box there: the
# correlation of the two boxes on the 4 mm grid after the last stage. A focal finding has no counterpart at its place in
# another patient (phantom lesions placed into other phantoms: median 0.12, highest 0.64 of 120); anatomy does (real
# structures between pseudo-patients: median 0.95; the look-alikes kept for 20-30 mm boxes of lung lobes and a
# vertebra: 0.89-0.98). Uniform tissue (a liver's inside) correlates poorly and is left to the margin.
AGREEMENT_MIN = 0.7


def look_alike_margin(box_mm: float | None) -> float:
    """How much more alike (cosine) an item elsewhere must be than the anatomical place, for a query box's largest side."""
    if box_mm is None:  # a whole slice: a region
        return REGION_MARGIN
    share = np.clip((box_mm - FINDING_MAX_MM) / (REGION_MIN_MM - FINDING_MAX_MM), 0.0, 1.0)
    return float(FINDING_MARGIN + share * (REGION_MARGIN - FINDING_MARGIN))


def anatomical_match(agreed: np.ndarray, centres: np.ndarray, sizes: np.ndarray, axes: np.ndarray, placed_ras,
                     margin: float, agreement: float = float("nan")) -> tuple[int, np.ndarray, bool]:
    """A case's best item given the placed point, the match's focus, and whether the anatomical place won.

    ``agreed`` is each item's weighted mean similarity to the query images (as :func:`ranking.locate` computes it). The
    anatomical place is the most alike item holding the placed point (within half its size); it wins if the result
    agrees with the query's box there (``agreement`` >= :data:`AGREEMENT_MIN`) or no item anywhere beats it by more
    than ``margin``. When it wins, the placed point is the focus (registration is finer than the item grid); otherwise
    the look-alike and its similarity-weighted focus stand.
    """
    agreed = np.asarray(agreed, float)
    distance = np.linalg.norm(np.asarray(centres, float) - np.asarray(placed_ras, float), axis=1)
    near = distance <= np.maximum(np.asarray(sizes, float) / 2, SPACING_MM)
    alike = int(np.argmax(agreed))
    if near.any():
        anatomical = int(np.flatnonzero(near)[np.argmax(agreed[near])])
        if agreement >= AGREEMENT_MIN or agreed[alike] - agreed[anatomical] <= margin:
            return anatomical, np.asarray(placed_ras, float), True
    return alike, ranking.focus(agreed, alike, centres, sizes, axes), False
