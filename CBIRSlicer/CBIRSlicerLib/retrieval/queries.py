"""Queries: what to search for, built from a volume (an ROI, a segment, a slice, the whole volume), a phrase or an
indexed item, cut and windowed exactly as the index cut its cases (its pinned settings).

A :class:`Query` holds the images to embed (or ready vectors), the description the answer repeats, and which cases
it must not find (its own). :mod:`search` embeds and answers it.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, ParameterError
from ..imaging.intensity import choose_window, to_uint8_rgb
from ..imaging.roi import RoiBox, Segment
from ..imaging.slicing import crop_box, extract_slices, montage_planes, nearest_slice, plan_grid, planes_in
from ..imaging.volume import Volume
from ..index import privacy
from ..index.searchable import SearchableIndex
from ..models.base import Embedder

MAX_QUERY_IMAGES = 16  # a query embeds at most this many images: about a second or two of ViT-B on a CPU


@dataclass
class Query:
    """What to search for: images (or ready vectors), a description for the answer, cases to leave out."""

    description: dict
    images: list[np.ndarray] = field(default_factory=list)
    vectors: np.ndarray | None = None
    exclude_sources: list[str] = field(default_factory=list)
    exclude_rows: list[int] = field(default_factory=list)  # the query volume's own cases, found by content or series
    exclude_item: int | None = None
    volume: Volume | None = None  # the query's volume: 3D models embed it (or the ROI's part); placement registers it
    roi: RoiBox | None = None
    centre_ras: tuple[float, float, float] | None = None  # the point asked about, for placing matches anatomically
    segment: Segment | None = None  # a query by segment: its voxels weight the placement's registration
    # Dense indexes (region_strategy 'dense'): ``images`` are whole slices and each one's vector is pooled from its
    # dense grid over ``boxes`` (pixel boxes in that slice), exactly as the index pooled its items.
    boxes: list[tuple[int, int, int, int]] | None = None
    pixel_mm: list[float] | None = None


def _sample(items: list, count: int) -> list:
    """At most ``count`` items evenly spread over a list (first and last kept)."""
    if len(items) <= count:
        return items
    return [items[i] for i in montage_planes(0, len(items) - 1, count)]


def _own(volume: Volume, index: SearchableIndex) -> dict:
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


def _describe(volume: Volume, axis: str, mode: str, **more) -> dict:
    source = os.path.abspath(volume.source) if volume.source else None
    return {"volume": source, "axis": axis, "mode": mode, **more}


def _dense(index: SearchableIndex) -> bool:
    return index.settings.region_strategy == "dense"


def roi_query(volume: Volume, roi: RoiBox, axis: str, index: SearchableIndex, margin_mm: float = 0.0) -> Query:
    """The slices an ROI spans, cropped to it (at most MAX_QUERY_IMAGES, evenly spread); whole, with the box, if dense."""
    window = choose_window(volume, index.settings.window)
    if _dense(index):
        grid = plan_grid(volume, axis)
        box = crop_box(grid, roi, margin_mm)
        slices = _sample(extract_slices(volume, axis, roi, crop=False, grid=grid), MAX_QUERY_IMAGES)
        return Query(_describe(volume, axis, "roi", roi_ras=[round(v, 3) for v in roi.as_list()]),
                     [to_uint8_rgb(s.pixels, window) for s in slices], **_own(volume, index), volume=volume, roi=roi,
                     centre_ras=tuple(float(v) for v in roi.center), boxes=[box] * len(slices),
                     pixel_mm=[s.pixel_mm for s in slices])
    crops = _sample(extract_slices(volume, axis, roi, crop=True, margin_mm=margin_mm), MAX_QUERY_IMAGES)
    return Query(_describe(volume, axis, "roi", roi_ras=[round(v, 3) for v in roi.as_list()]),
                 [to_uint8_rgb(c.pixels, window) for c in crops], **_own(volume, index), volume=volume, roi=roi,
                 centre_ras=tuple(float(v) for v in roi.center))


def segment_query(volume: Volume, segment: Segment, axis: str, index: SearchableIndex, margin_mm: float = 0.0) -> Query:
    """A segment's box as an ROI query, asking about the segment's deepest point, with its voxels for placement."""
    query = roi_query(volume, segment.box, axis, index, margin_mm)
    query.description["segment"] = segment.name
    return dataclasses.replace(query, centre_ras=segment.centre, segment=segment)


def slice_query(volume: Volume, axis: str, index: SearchableIndex, ras=None) -> Query:
    """One whole slice: the one through a RAS point (default the volume's centre)."""
    window = choose_window(volume, index.settings.window)
    image = nearest_slice(extract_slices(volume, axis), volume.center_ras if ras is None else np.asarray(ras, float))
    return Query(_describe(volume, axis, "slice", slice_index=image.slice_index, ras=[round(float(v), 3) for v in image.ras]),
                 [to_uint8_rgb(image.pixels, window)], **_own(volume, index), volume=volume,
                 centre_ras=tuple(float(v) for v in image.ras), **_whole_boxes(index, [image]))


def volume_query(volume: Volume, axis: str, index: SearchableIndex, count: int = MAX_QUERY_IMAGES) -> Query:
    """A whole volume: ``count`` whole slices evenly spread along the axis."""
    window = choose_window(volume, index.settings.window)
    grid = plan_grid(volume, axis)
    first, last = planes_in(grid)
    planes = montage_planes(first, last, count)
    images = [s for s in extract_slices(volume, axis, grid=grid) if s.plane in set(planes)]
    return Query(_describe(volume, axis, "volume", slices=len(images)), [to_uint8_rgb(s.pixels, window) for s in images],
                 **_own(volume, index), volume=volume, **_whole_boxes(index, images))


def _whole_boxes(index: SearchableIndex, images: list) -> dict:
    """For a dense index, whole slices pool their whole grid (as the index's slice items do)."""
    if not _dense(index):
        return {}
    return {"boxes": [(0, 0, *s.pixels.shape) for s in images], "pixel_mm": [s.pixel_mm for s in images]}


def text_query(text: str, embedder: Embedder) -> Query:
    """A phrase, for CLIP-family models."""
    return Query({"text": text, "mode": "text"}, vectors=embedder.embed_text([text]))


def item_query(index: SearchableIndex, item_id: int) -> Query:
    """'More like this': an indexed item's own vector; its case is left out."""
    item = index.catalog.items([item_id]).get(int(item_id))
    if item is None:
        raise ParameterError(f"item {item_id} is not in the index {index.folder}")
    case = index.catalog.case_by_row(item.case_row)
    return Query({"item": int(item_id), "case_id": case.case_id, "mode": "item", "axis": item.axis},
                 vectors=index.store.reconstruct(np.array([item_id])), exclude_sources=[case.source], exclude_item=int(item_id))


def parse_filters(pairs: list[str] | None) -> dict[str, str]:
    """'FIELD=VALUE' strings to a dict."""
    filters = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"filter '{pair}' must look like FIELD=VALUE, for example modality=CT")
        filters[key.strip()] = value.strip()
    return filters


def load_volume_for_query(path: str) -> Volume:
    """Read a query volume, with a clear error if it is missing."""
    from ..imaging.readers import read_volume

    if not os.path.exists(path):
        raise InputError(path, "does not exist")
    return read_volume(path)
