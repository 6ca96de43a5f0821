"""Queries: what is asked (:class:`QuerySpec`, the one typed query), and what a search needs of it (:class:`Query`).

A :class:`QuerySpec` says what a user asked, whoever asks (the command line, the module, a saved search, relevance
feedback): the mode (:data:`QUERY_MODES`), the query volume by path, the axis, the ROI box, the slice's point, the
phrase, the item, the segment, the kind to rank first (prior), the match intent and the marks. Its ``to_json`` is the
answer's ``query`` (the CLI contract) and ``from_json`` reads it back. :func:`make_query` is the one way from a spec
(and the loaded volume) to a :class:`Query`: the few model-ready images cut and windowed exactly as the index cut its
cases (its pinned settings), or the vectors an item already has, and which cases it must not find (its own).
:mod:`search` embeds and answers it.
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast, get_args

import numpy as np

from ..errors import GeometryError, InputError, ParameterError
from ..imaging import body_parts, body_region
from ..imaging.intensity import choose_window, to_uint8_rgb
from ..imaging.roi import RoiBox, Segment
from ..imaging.slicing import SliceImage, crop_box, extract_slices, montage_planes, nearest_slice, plan_grid, planes_in
from ..imaging.volume import Volume
from ..index import privacy
from ..index.searchable import SearchableIndex
from .marks import Feedback

T = TypeVar("T")

MAX_QUERY_IMAGES = 16  # a query embeds at most this many images: about a second or two of ViT-B on a CPU

QueryMode = Literal["roi", "segment", "slice", "volume", "text", "item"]
QUERY_MODES: tuple[QueryMode, ...] = get_args(QueryMode)  # the one list of query modes
VOLUME_MODES: tuple[QueryMode, ...] = ("roi", "segment", "slice", "volume")  # the modes asked of a query volume
# Which place a placed match should show: a look-alike of a focal finding, the same anatomy, or decided from the box.
MatchIntent = Literal["auto", "finding", "anatomy"]
MATCH_INTENTS: tuple[MatchIntent, ...] = get_args(MatchIntent)
Point = tuple[float, float, float]


def _point(values: Iterable[float]) -> Point:
    return cast(Point, tuple(float(v) for v in values))


def _rounded(values: Iterable[float]) -> list[float]:
    """Millimetres as the answer carries them: to a micrometre."""
    return [round(float(v), 3) for v in values]


@dataclass(frozen=True)
class Prior:
    """The kind of case ranked first: the query's modality and body region (DICOM's words; None: unknown), the regions
    it covers and the standard body levels it holds (around its point, or its whole volume's; imaging/body_axis)."""

    modality: str | None
    body_part: str | None
    regions: tuple[str, ...] = ()
    levels: tuple[float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        """The answer's ``query.prior``."""
        return {"modality": self.modality, "body_part": self.body_part, "regions": list(self.regions),
                "levels": [round(float(v), 1) for v in self.levels] if self.levels else None}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Prior:
        """Back from the answer's ``query.prior`` (answers saved before the regions and levels: their body part alone)."""
        levels = data.get("levels")
        return cls(data.get("modality"), data.get("body_part"), tuple(data.get("regions") or ()),
                   (float(levels[0]), float(levels[1])) if levels else None)

    @classmethod
    def of_kind(cls, kind: body_region.Kind) -> Prior:
        """The record of a query's kind as the search found it."""
        return cls.from_json(kind.to_json())

    def kind(self) -> body_region.Kind:
        """The kind to compare cases with (regions from the body part when none were recorded)."""
        return body_region.Kind(self.modality, self.regions or body_parts.regions_of(self.body_part), self.levels)


@dataclass(frozen=True)
class QuerySpec:
    """What is asked: the mode and what that mode needs; after :func:`make_query`, also what making it found.

    ``volume`` is the query volume's absolute path (None when it has no file, as a volume made in Slicer); ``roi`` the
    box searched (roi and segment modes); ``point`` the RAS point the slice goes through (slice mode; once made, the
    slice's own centre); ``segment`` the segment's name; ``prior`` the kind ranked first (None until a search infers it
    from the volume); ``match`` what a placed match should show (:data:`MATCH_INTENTS`); ``feedback`` the marks a search
    again used, with its ``feedback_strategy``. Once made: ``slice_index`` (slice), ``slices`` (volume: how many were
    cut) and ``case_id`` (item: its case).
    """

    mode: QueryMode
    volume: str | None = None
    axis: str = "axial"
    roi: RoiBox | None = None
    point: Point | None = None
    text: str | None = None
    item: int | None = None
    segment: str | None = None
    prior: Prior | None = None
    match: MatchIntent = "auto"
    feedback: Feedback | None = None
    feedback_strategy: str | None = None
    margin_mm: float = 0.0
    slice_index: int | None = None
    slices: int | None = None
    case_id: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in QUERY_MODES:
            raise ParameterError(f"query mode must be one of {', '.join(QUERY_MODES)}, not '{self.mode}'")
        if self.match not in MATCH_INTENTS:
            raise ParameterError(f"match intent must be one of {', '.join(MATCH_INTENTS)}, not '{self.match}'")

    def to_json(self) -> dict[str, Any]:
        """The answer's ``query`` (the CLI contract): the keys of its mode, then the prior, marks, intent and margin.

        A segment query says mode 'roi' with its ``segment`` name, as the answers always have (its box is an ROI's).
        """
        if self.mode == "text":
            out: dict[str, Any] = {"text": self.text, "mode": "text"}
        elif self.mode == "item":
            out = {"item": self.item, "case_id": self.case_id, "mode": "item", "axis": self.axis}
        else:
            out = {"volume": self.volume, "axis": self.axis, "mode": "roi" if self.mode == "segment" else self.mode}
            if self.mode in ("roi", "segment"):
                out["roi_ras"] = _rounded(self.roi.as_list()) if self.roi is not None else None
            if self.mode == "segment":
                out["segment"] = self.segment
            if self.mode == "slice":
                out.update(slice_index=self.slice_index, ras=_rounded(self.point) if self.point is not None else None)
            if self.mode == "volume":
                out["slices"] = self.slices
        if self.prior is not None:
            out["prior"] = self.prior.to_json()
        if self.feedback is not None:
            out.update(feedback=self.feedback.to_json(), feedback_strategy=self.feedback_strategy)
        if self.match != "auto":
            out["match"] = self.match
        if self.margin_mm:
            out["margin_mm"] = self.margin_mm
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuerySpec:
        """Back from an answer's ``query`` (raises ParameterError on an unknown mode, KeyError / ValueError when malformed)."""
        mode = "segment" if data.get("mode") == "roi" and "segment" in data else data.get("mode")
        if mode not in QUERY_MODES:
            raise ParameterError(f"query mode must be one of {', '.join(QUERY_MODES)}, not '{mode}'")
        roi = data.get("roi_ras")
        point = data.get("ras")
        return cls(cast(QueryMode, mode), data.get("volume"), data.get("axis", "axial"),
                   RoiBox(tuple(roi[:3]), tuple(roi[3:])) if roi else None, _point(point) if point is not None else None,
                   data.get("text"), int(data["item"]) if data.get("item") is not None else None, data.get("segment"),
                   Prior.from_json(data["prior"]) if data.get("prior") else None, data.get("match", "auto"),
                   Feedback.from_json(data["feedback"]) if "feedback" in data else None, data.get("feedback_strategy"),
                   float(data.get("margin_mm", 0.0)), data.get("slice_index"), data.get("slices"), data.get("case_id"))


@dataclass
class Query:
    """What a search needs of a query: its spec, images (or ready vectors), the cases to leave out, and its volume."""

    spec: QuerySpec
    images: list[np.ndarray] = field(default_factory=list)
    vectors: np.ndarray | None = None
    exclude_sources: list[str] = field(default_factory=list)
    exclude_rows: list[int] = field(default_factory=list)  # the query volume's own cases, found by content or series
    exclude_item: int | None = None
    volume: Volume | None = None  # the query's volume: 3D models embed it (or the ROI's part); placement registers it
    centre_ras: Point | None = None  # the point asked about, for placing matches anatomically
    segment: Segment | None = None  # a query by segment: its voxels weight the placement's registration
    # Dense indexes (region_strategy 'dense'): ``images`` are whole slices and each one's vector is pooled from its
    # dense grid over ``boxes`` (pixel boxes in that slice), exactly as the index pooled its items.
    boxes: list[tuple[int, int, int, int]] | None = None
    pixel_mm: list[float] | None = None

    @property
    def mode(self) -> QueryMode:
        """The spec's mode."""
        return self.spec.mode

    @property
    def roi(self) -> RoiBox | None:
        """The box searched (roi and segment queries)."""
        return self.spec.roi


def make_query(spec: QuerySpec, volume: Volume | None, index: SearchableIndex, segment: Segment | None = None) -> Query:
    """The one way from what is asked to what a search needs: the images cut from ``volume`` as the index cut its cases
    (roi, segment: ``segment`` its voxels, else its box alone; slice; volume), an item's own vector, or a phrase (its
    vector is the model's: :meth:`search.Searcher.query_vectors` or the session's worker embeds it)."""
    if spec.mode == "text":
        if not (spec.text or "").strip():
            raise ParameterError("type a phrase to search for")
        return Query(spec)
    if spec.mode == "item":
        if spec.item is None:
            raise ParameterError("a 'more like this' query names an item")
        return _item(spec, index)
    if volume is None:
        raise ParameterError(f"a {spec.mode} query needs its volume")
    _searchable(volume)
    spec = dataclasses.replace(spec, volume=os.path.abspath(volume.source) if volume.source else None)
    if spec.mode == "segment" and segment is not None:
        made = _roi(dataclasses.replace(spec, roi=segment.box, segment=segment.name), volume, index)
        return dataclasses.replace(made, centre_ras=_point(segment.centre), segment=segment)
    if spec.mode in ("roi", "segment"):
        if spec.roi is None:
            raise ParameterError("choose or place an ROI first, or query the current slice or the whole volume")
        return _roi(spec, volume, index)
    if spec.mode == "slice":
        return _slice(spec, volume, index)
    return _volume(spec, volume, index)


def roi_query(volume: Volume, roi: RoiBox, axis: str, index: SearchableIndex, margin_mm: float = 0.0) -> Query:
    """An ROI query (:func:`make_query` of mode 'roi')."""
    return make_query(QuerySpec("roi", axis=axis, roi=roi, margin_mm=margin_mm), volume, index)


def segment_query(volume: Volume, segment: Segment, axis: str, index: SearchableIndex, margin_mm: float = 0.0) -> Query:
    """A segment's query (:func:`make_query` of mode 'segment'): its box, asking about its deepest point."""
    return make_query(QuerySpec("segment", axis=axis, margin_mm=margin_mm), volume, index, segment)


def slice_query(volume: Volume, axis: str, index: SearchableIndex, ras: Iterable[float] | None = None) -> Query:
    """The slice through a RAS point, default the volume's centre (:func:`make_query` of mode 'slice')."""
    return make_query(QuerySpec("slice", axis=axis, point=_point(ras) if ras is not None else None), volume, index)


def volume_query(volume: Volume, axis: str, index: SearchableIndex) -> Query:
    """A whole volume (:func:`make_query` of mode 'volume')."""
    return make_query(QuerySpec("volume", axis=axis), volume, index)


def text_query(text: str) -> Query:
    """A phrase, for CLIP-family models (:func:`make_query` of mode 'text'; the searcher embeds it)."""
    return Query(QuerySpec("text", text=text))


def item_query(index: SearchableIndex, item_id: int) -> Query:
    """'More like this' from an indexed item (:func:`make_query` of mode 'item')."""
    return make_query(QuerySpec("item", item=int(item_id)), None, index)


def _sample(items: list[T], count: int) -> list[T]:
    """At most ``count`` items evenly spread over a list (first and last kept)."""
    if len(items) <= count:
        return items
    return [items[i] for i in montage_planes(0, len(items) - 1, count)]


def _own(volume: Volume, index: SearchableIndex) -> dict[str, Any]:
    """How to leave the query volume's own case out: its path, and the cases holding the same voxels or series.

    A copy of an indexed file elsewhere, in another format, or a volume loaded into Slicer from DICOM has another
    path (or none), so paths alone miss it. The voxels are hashed only when some indexed case has the same shape.
    """
    rows = set(index.catalog.case_rows_with_content(volume.shape_ijk, lambda: volume.voxel_digest))
    if volume.series_uid:
        rows.update(index.catalog.case_rows_of_series(volume.series_uid))
    rows.update(_same_patient(volume, index))
    return {"exclude_sources": [volume.source] if volume.source else [], "exclude_rows": sorted(rows)}


def _same_patient(volume: Volume, index: SearchableIndex) -> list[int]:
    """The indexed cases of the query's patient (other series and studies): similar *cases* are other patients.

    The index keeps only a keyed hash of patient IDs (:mod:`privacy`); the query's ID is hashed the same way.
    """
    patient = (volume.extra or {}).get("patient_id")
    if not patient or "patient_key" not in index.catalog.filter_fields():
        return []
    return index.catalog.case_rows_matching({"patient_key": privacy.patient_key(str(patient))})


_SEARCHABLE: weakref.WeakSet[Volume] = weakref.WeakSet()  # volumes found searchable: a session queries one volume many times


def _searchable(volume: Volume) -> None:
    """Refuse a query volume with nothing to search for (every voxel NaN, infinite or alike): its answer would be noise."""
    from ..index.writer import content_problem

    if volume in _SEARCHABLE:
        return
    refused, _ = content_problem(volume)
    if refused:
        raise InputError(volume.source, f"{refused}; it cannot be a query")
    _SEARCHABLE.add(volume)


def _dense(index: SearchableIndex) -> bool:
    return index.settings.region_strategy == "dense"


def _roi(spec: QuerySpec, volume: Volume, index: SearchableIndex) -> Query:
    """The slices an ROI spans, cropped to it (at most MAX_QUERY_IMAGES, evenly spread); whole, with the box, if dense."""
    roi, axis = cast(RoiBox, spec.roi), spec.axis
    window = choose_window(volume, index.settings.window)
    centre = _point(roi.center)
    if _dense(index):
        grid = plan_grid(volume, axis)
        box = crop_box(grid, roi, spec.margin_mm)
        slices = _sample(extract_slices(volume, axis, roi, crop=False, grid=grid), MAX_QUERY_IMAGES)
        return Query(spec, [to_uint8_rgb(s.pixels, window) for s in slices], **_own(volume, index), volume=volume,
                     centre_ras=centre, boxes=[box] * len(slices), pixel_mm=[s.pixel_mm for s in slices])
    crops = _sample(extract_slices(volume, axis, roi, crop=True, margin_mm=spec.margin_mm), MAX_QUERY_IMAGES)
    return Query(spec, [to_uint8_rgb(c.pixels, window) for c in crops], **_own(volume, index), volume=volume, centre_ras=centre)


def _slice(spec: QuerySpec, volume: Volume, index: SearchableIndex) -> Query:
    """One whole slice: the one through the spec's point (default the volume's centre)."""
    window = choose_window(volume, index.settings.window)
    if spec.point is not None:
        _inside(volume, spec.point)
    asked = volume.center_ras if spec.point is None else np.asarray(spec.point, float)
    image = nearest_slice(extract_slices(volume, spec.axis), asked)
    made = dataclasses.replace(spec, slice_index=image.slice_index, point=_point(image.ras))
    return Query(made, [to_uint8_rgb(image.pixels, window)], **_own(volume, index), volume=volume,
                 centre_ras=_point(image.ras), **_whole_boxes(index, [image]))


def _inside(volume: Volume, ras: Iterable[float]) -> None:
    """Refuse a point outside the volume (half a voxel of slack): its nearest slice would answer for a place not scanned."""
    point = np.asarray(ras, float)
    if point.shape != (3,) or not np.all(np.isfinite(point)):
        raise GeometryError(f"the point RAS {list(np.ravel(point))} must be three finite numbers (mm)")
    ijk = volume.ras_to_ijk_points(point[None])[0]
    if np.all(ijk >= -0.5) and np.all(ijk <= np.array(volume.shape_ijk) - 0.5):
        return
    corners = volume.corners_ras()
    span = ", ".join(f"{a} {lo:.1f}..{hi:.1f}" for a, lo, hi in zip("RAS", corners.min(axis=0), corners.max(axis=0)))
    where = f"{volume.source}: " if volume.source else ""
    raise GeometryError(f"{where}the point RAS ({', '.join(f'{v:g}' for v in point)}) lies outside the volume ({span} mm)")


def _volume(spec: QuerySpec, volume: Volume, index: SearchableIndex, count: int = MAX_QUERY_IMAGES) -> Query:
    """A whole volume: ``count`` whole slices evenly spread along the axis."""
    window = choose_window(volume, index.settings.window)
    grid = plan_grid(volume, spec.axis)
    first, last = planes_in(grid)
    planes = montage_planes(first, last, count)
    images = [s for s in extract_slices(volume, spec.axis, grid=grid) if s.plane in set(planes)]
    return Query(dataclasses.replace(spec, slices=len(images)), [to_uint8_rgb(s.pixels, window) for s in images],
                 **_own(volume, index), volume=volume, **_whole_boxes(index, images))


def _whole_boxes(index: SearchableIndex, images: list[SliceImage]) -> dict[str, Any]:
    """For a dense index, whole slices pool their whole grid (as the index's slice items do)."""
    if not _dense(index):
        return {}
    return {"boxes": [(0, 0, *s.pixels.shape) for s in images], "pixel_mm": [s.pixel_mm for s in images]}


def _item(spec: QuerySpec, index: SearchableIndex) -> Query:
    """'More like this': an indexed item's own vector; its case is left out."""
    item_id = int(cast(int, spec.item))
    item = index.catalog.items([item_id]).get(item_id) if 0 < item_id < 2**63 else None
    if item is None or item.case_row is None:
        raise ParameterError(f"item {item_id} is not in the index {index.folder}")
    case = index.catalog.case_by_row(item.case_row)
    made = dataclasses.replace(spec, case_id=case.case_id, axis=item.axis)
    return Query(made, vectors=index.store.reconstruct(np.array([item_id])), exclude_sources=[case.source], exclude_item=item_id)


def parse_filters(pairs: list[str] | None) -> dict[str, str]:
    """'FIELD=VALUE' strings to a dict; every filter must hold (AND), so a field given twice is refused.

    Refused rather than read as 'either value': a case has one value per column, so two values of one field could only be
    meant as OR, while every other pair of filters means AND; one meaning per option keeps the answer what was asked. Two
    values of one field are two searches."""
    filters: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"filter '{pair}' must look like FIELD=VALUE, for example modality=CT")
        key = key.strip()
        if key in filters:
            raise ParameterError(f"filter field '{key}' is given twice ({key}={filters[key]}, {key}={value.strip()}): every "
                                 "filter must hold, and a case has one value per field; search once per value")
        filters[key] = value.strip()
    return filters


def load_volume_for_query(path: str) -> Volume:
    """Read a query volume, with a clear error if it is missing."""
    from ..imaging.readers import read_volume

    if not os.path.exists(path):
        raise InputError(path, "does not exist")
    return read_volume(path)
