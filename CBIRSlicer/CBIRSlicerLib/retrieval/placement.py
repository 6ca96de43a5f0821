"""Placing a match anatomically: which place a result shows, the same anatomy or the most similar finding, and why.

Descriptor matching finds *where things look alike*; in real anatomy many places look alike (a
slab of abdomen resembles the slabs above and below it, one vertebra the next), so the best
matching item of a case can sit at the wrong level or on the wrong organ. Placement answers a
different question: where in the result lies the same anatomical place as the query's centre?
The query volume is registered into the result's volume (:mod:`imaging.registration`) and the query centre carried
through. Every placed result then carries both places: the **same anatomy** (the registered place, when the result's
field of view holds it) and the **most similar finding** (the descriptor's look-alike), and says which one it shows:

* ``match="anatomy"``: the same anatomy; ``match="finding"``: the look-alike;
* ``match="auto"`` (the default) decides from the query's content: a box around a focal finding (it stands out from
  the tissue around it on every side, :mod:`imaging.focal`) asks for the finding, unless the result, registered, looks
  like the query's box there (then the finding is at its anatomical place and the two agree); any other box asks for
  the anatomy.

Whatever is asked, a shown point lies inside the result's volume: when the query's anatomical place is not in the
result's field of view (its level outside the result's body, or the registered point outside the volume), the result
says so and shows its look-alike instead. When the registration is rejected (it left the level the body coordinate
allows, or the result does not resemble the query's neighbourhood there), the anatomy shown is the look-alike within
the level window: the place of the right level that looks most like the query.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..imaging.registration import SPACING_MM
from . import ranking
from .queries import MATCH_INTENTS

if TYPE_CHECKING:
    from ..imaging.registration import LevelWindow, Placement

NOT_IN_VIEW = "not in this series' field of view"
REJECTED = "registration rejected: shown at the level of the query, where it looks most alike"
# A focal query's registered place counts as its finding when the result there correlates with the query's box at least
# this much (the correlation of the two boxes on the 4 mm grid after the last stage). A focal finding has no counterpart
# at its place in another patient (phantom lesions placed into other phantoms: median 0.12, highest 0.64 of 120);
# anatomy does (real structures between pseudo-patients: median 0.95).
AGREEMENT_MIN = 0.7
# A registration is rejected when the result, registered, correlates with the query's 64 mm neighbourhood less than this
# (the context a correct placement shares with the query whatever the box holds); measured on tuning patients.
CONTEXT_AGREEMENT_MIN = -1.0


@dataclass(frozen=True)
class Choice:
    """What a placed result shows: the item and focus shown, both places, which one is shown, and why."""

    item: int  # position in the case's item arrays of the item shown
    focus_ras: np.ndarray  # the point shown (always inside the result's volume)
    anatomy_ras: np.ndarray | None  # the same anatomy; None when not in the result's field of view
    look_alike_ras: np.ndarray  # the most similar finding (the descriptor's look-alike)
    shown: str  # "anatomy" or "look-alike"
    in_view: bool  # whether the result's field of view holds the query's anatomical place
    note: str | None = None


def look_alike(agreed: np.ndarray, centres: np.ndarray, sizes: np.ndarray, axes: np.ndarray,
               allowed: np.ndarray | None = None) -> tuple[int, np.ndarray]:
    """The most alike item (among ``allowed`` ones, if given and any) and its similarity-weighted focus."""
    agreed = np.asarray(agreed, float)
    if allowed is not None and np.any(allowed):
        masked = np.where(allowed, agreed, -np.inf)
        best = int(np.argmax(masked))
        keep = np.asarray(allowed, bool)
        # the focus weighs only allowed items, so it stays in the window
        within = np.flatnonzero(keep)
        spot = ranking.focus(agreed[keep], int(np.flatnonzero(within == best)[0]), centres[keep], sizes[keep], axes[keep])
        return best, spot
    best = int(np.argmax(agreed))
    return best, ranking.focus(agreed, best, centres, sizes, axes)


def item_at(agreed: np.ndarray, centres: np.ndarray, sizes: np.ndarray, point: np.ndarray) -> int:
    """The item standing for a point: the most alike of those holding it (within half their size), else the nearest."""
    distance = np.linalg.norm(np.asarray(centres, float) - np.asarray(point, float), axis=1)
    near = distance <= np.maximum(np.asarray(sizes, float) / 2, SPACING_MM)
    if near.any():
        return int(np.flatnonzero(near)[np.argmax(np.asarray(agreed, float)[near])])
    return int(np.argmin(distance))


def rejected(where: Placement) -> bool:
    """Whether a registration (:class:`imaging.registration.Placement`) is rejected: it left the level window, or the
    result there does not resemble the query's neighbourhood."""
    return bool(where.within_window is False or where.context_agreement < CONTEXT_AGREEMENT_MIN)


def better(candidates: list[Placement], window: LevelWindow | None = None) -> Placement:
    """Of registrations of one point from different starts (:class:`imaging.registration.Placement`), the one kept:
    those ending within the level ``window`` first, then the highest agreement with the query's box (else with its
    64 mm neighbourhood); its ``within_window`` set from the window."""
    if not candidates:
        raise RuntimeError("no start to register from")

    def score(where: Placement) -> tuple[bool, float]:
        agreement = where.agreement if np.isfinite(where.agreement) else where.context_agreement
        inside = window is None or window.holds(where.ras)
        return bool(inside), float(agreement) if np.isfinite(agreement) else -np.inf

    best = max(candidates, key=score)
    return dataclasses.replace(best, within_window=None if window is None else window.holds(best.ras))


def wants_finding(match: str, focal: bool, agreement: float) -> bool:
    """Whether a result shows the most similar finding rather than the same anatomy (for a place in view)."""
    if match not in MATCH_INTENTS:
        raise ValueError(f"match must be one of {', '.join(MATCH_INTENTS)}, not {match!r}")
    if match != "auto":
        return match == "finding"
    return bool(focal and not agreement >= AGREEMENT_MIN)  # NaN agreement (nothing measured) does not agree


def choose(agreed: np.ndarray, centres: np.ndarray, sizes: np.ndarray, axes: np.ndarray, anatomy_ras: Sequence[float] | np.ndarray | None,
           in_view: bool,
           match: str = "auto", focal: bool = False, agreement: float = float("nan"), rejected: bool = False,
           level_items: np.ndarray | None = None) -> Choice:
    """What a result shows, given its items' likeness to the query (``agreed``), the registered place (``anatomy_ras``),
    whether that place is in the result's field of view, the intent, the query's focality, the result's agreement with
    the query's box there, whether the registration was rejected, and the items within the level window the body
    coordinate allows (for a rejected registration)."""
    finding, finding_spot = look_alike(agreed, centres, sizes, axes)
    if not in_view:
        return Choice(finding, finding_spot, None, finding_spot, "look-alike", False, NOT_IN_VIEW)
    anatomy = np.asarray(anatomy_ras, float)
    if wants_finding(match, focal, agreement):
        return Choice(finding, finding_spot, anatomy, finding_spot, "look-alike", True)
    if rejected:
        best, spot = look_alike(agreed, centres, sizes, axes, level_items)
        return Choice(best, spot, anatomy, finding_spot, "look-alike", True, REJECTED)
    return Choice(item_at(agreed, centres, sizes, anatomy), anatomy, anatomy, finding_spot, "anatomy", True)

