"""Queries (a slice, an ROI, a whole volume, a phrase, a result item) against an index, answered as ranked cases.

A query becomes a few model-ready images, cut and windowed exactly as the index cut its cases
(its pinned settings); their vectors go through a filtered nearest-neighbour search; the hits
become case results (:mod:`ranking`), each with its best-matching item for the viewer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError, ParameterError
from ..imaging.intensity import choose_window, to_uint8_rgb
from ..imaging.roi import RoiBox
from ..imaging.slicing import extract_slices, montage_planes, nearest_slice, plan_grid, planes_in
from ..imaging.volume import Volume
from ..index.folder import Index
from ..models.base import Embedder
from ..models.registry import create_embedder
from . import ranking

MAX_QUERY_IMAGES = 16  # a query embeds at most this many images: about a second or two of ViT-B on a CPU
# HNSW breadth per image when a query has several images: at 1 M vectors a 16-image query then agrees with an exact
# first stage on 95 % of its top 10 cases, in 47-49 ms on 2 cores (docs/benchmarks.md); single images keep the store's 1,024.
MULTI_IMAGE_EF_SEARCH = 512


@dataclass
class Query:
    """What to search for: images (or ready vectors), a description for the answer, cases to leave out."""

    description: dict
    images: list[np.ndarray] = field(default_factory=list)
    vectors: np.ndarray | None = None
    exclude_sources: list[str] = field(default_factory=list)
    exclude_rows: list[int] = field(default_factory=list)  # the query volume's own cases, found by content or series
    exclude_item: int | None = None
    volume: Volume | None = None  # 3D models embed the volume (or the ROI's sub-volume) itself, not its images
    roi: RoiBox | None = None


def _sample(items: list, count: int) -> list:
    """At most ``count`` items evenly spread over a list (first and last kept)."""
    if len(items) <= count:
        return items
    return [items[i] for i in montage_planes(0, len(items) - 1, count)]


def _own(volume: Volume, index: Index) -> dict:
    """How to leave the query volume's own case out: its path, and the cases holding the same voxels or series.

    A copy of an indexed file elsewhere, in another format, or a volume loaded into Slicer from DICOM has another
    path (or none), so paths alone miss it. The voxels are hashed only when some indexed case has the same shape.
    """
    rows = set(index.catalog.case_rows_with_content(volume.shape_ijk, lambda: volume.voxel_digest))
    if volume.series_uid:
        rows.update(index.catalog.case_rows_of_series(volume.series_uid))
    return {"exclude_sources": [volume.source] if volume.source else [], "exclude_rows": sorted(rows)}


def _describe(volume: Volume, axis: str, mode: str, **more) -> dict:
    source = os.path.abspath(volume.source) if volume.source else None
    return {"volume": source, "axis": axis, "mode": mode, **more}


def roi_query(volume: Volume, roi: RoiBox, axis: str, index: Index, margin_mm: float = 0.0) -> Query:
    """The slices an ROI spans, cropped to it (at most MAX_QUERY_IMAGES, evenly spread)."""
    window = choose_window(volume, index.settings.window)
    crops = _sample(extract_slices(volume, axis, roi, crop=True, margin_mm=margin_mm), MAX_QUERY_IMAGES)
    return Query(_describe(volume, axis, "roi", roi_ras=[round(v, 3) for v in roi.as_list()]),
                 [to_uint8_rgb(c.pixels, window) for c in crops], **_own(volume, index), volume=volume, roi=roi)


def slice_query(volume: Volume, axis: str, index: Index, ras=None) -> Query:
    """One whole slice: the one through a RAS point (default the volume's centre)."""
    window = choose_window(volume, index.settings.window)
    image = nearest_slice(extract_slices(volume, axis), volume.center_ras if ras is None else np.asarray(ras, float))
    return Query(_describe(volume, axis, "slice", slice_index=image.slice_index, ras=[round(float(v), 3) for v in image.ras]),
                 [to_uint8_rgb(image.pixels, window)], **_own(volume, index), volume=volume)


def volume_query(volume: Volume, axis: str, index: Index, count: int = MAX_QUERY_IMAGES) -> Query:
    """A whole volume: ``count`` whole slices evenly spread along the axis."""
    window = choose_window(volume, index.settings.window)
    grid = plan_grid(volume, axis)
    first, last = planes_in(grid)
    planes = montage_planes(first, last, count)
    images = [s for s in extract_slices(volume, axis, grid=grid) if s.plane in set(planes)]
    return Query(_describe(volume, axis, "volume", slices=len(images)), [to_uint8_rgb(s.pixels, window) for s in images],
                 **_own(volume, index), volume=volume)


def text_query(text: str, embedder: Embedder) -> Query:
    """A phrase, for CLIP-family models."""
    return Query({"text": text, "mode": "text"}, vectors=embedder.embed_text([text]))


def item_query(index: Index, item_id: int) -> Query:
    """'More like this': an indexed item's own vector; its case is left out."""
    item = index.catalog.items([item_id]).get(int(item_id))
    if item is None:
        raise ParameterError(f"item {item_id} is not in the index {index.folder}")
    case = index.catalog.case_by_row(item.case_row)
    return Query({"item": int(item_id), "case_id": case.case_id, "mode": "item", "axis": item.axis},
                 vectors=index.store.reconstruct(np.array([item_id])), exclude_sources=[case.source], exclude_item=int(item_id))


def volume_model_vectors(embedder: Embedder, query: Query) -> np.ndarray:
    """A 3D model's query vector: the ROI's (the cells of one pass that overlap it), or the whole volume's; not slices."""
    mode = query.description.get("mode")
    if query.volume is None or mode not in ("roi", "volume"):
        raise ParameterError(f"model '{embedder.name}' is a 3D CT encoder: it answers region (--roi-ras) and whole-volume "
                             f"queries, not {mode or 'image'} queries (a single slice holds too little depth for it)")
    if mode == "roi":
        return embedder.embed_region(query.volume, query.roi)[None]
    return embedder.embed_volume(query.volume).whole[None]


def volume_model_other_scale(index: Index, query: Query) -> np.ndarray:
    """Items a 3D model's query must not match: an ROI is compared with regions, a whole volume with whole volumes.

    A whole volume's vector is the mean of all its cells, so it is like every region a little; left in, it came
    first for ROI queries and put every best match at the case's centre (docs/benchmarks.md).
    """
    mode = query.description.get("mode")
    if mode == "item":  # 'more like this': like the item's own scale
        item = index.catalog.items([query.exclude_item]).get(query.exclude_item)
        mode = "volume" if item is not None and item.kind == "volume" else "roi"
    if mode == "volume":
        return index.catalog.item_ids_of_kinds(["volume"], negate=True)
    return index.catalog.item_ids_of_kinds(["volume"])


def parse_filters(pairs: list[str] | None) -> dict[str, str]:
    """'FIELD=VALUE' strings to a dict."""
    filters = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ParameterError(f"filter '{pair}' must look like FIELD=VALUE, for example modality=CT")
        filters[key.strip()] = value.strip()
    return filters


class Searcher:
    """Answers queries on one index with its model (loaded once)."""

    def __init__(self, index: Index, embedder: Embedder | None = None, model: str | None = None, device: str | None = None):
        self.index = index
        self.embedder = embedder or create_embedder(model or index.model_name(), device=device)
        index.check_model(self.embedder)

    def vectors(self, query: Query) -> np.ndarray:
        """The query's vectors (embedding its images if needed)."""
        if query.vectors is not None:
            return query.vectors
        if self.embedder.embeds_volumes:
            return volume_model_vectors(self.embedder, query)
        if not query.images:
            raise ParameterError("the query holds no images (an ROI outside the volume?)")
        return self.embedder.embed_images(query.images)

    def search(self, query: Query, k: int = 10, filters: dict[str, str] | None = None, method: str = "maxsim",
               hits_per_image: int | None = None) -> dict:
        """Ranked cases as the JSON-ready answer of the CLI contract."""
        if method not in ranking.METHODS:
            raise ParameterError(f"ranking must be one of {', '.join(ranking.METHODS)}")
        catalog, store = self.index.catalog, self.index.store
        queries = self.vectors(query)
        # A path and the same file reached through a symbolic link are one case.
        own = {form(s) for s in query.exclude_sources for form in (os.path.abspath, os.path.realpath)}
        excluded_rows = sorted(set(catalog.case_rows_of_sources(own)) | set(query.exclude_rows))
        excluded = np.union1d(self.index.excluded_ids(), catalog.item_ids(excluded_rows) if excluded_rows else [])
        if query.exclude_item is not None:
            excluded = np.union1d(excluded, [query.exclude_item])
        if self.embedder.embeds_volumes:
            excluded = np.union1d(excluded, volume_model_other_scale(self.index, query))
        allowed_rows = catalog.case_rows_matching(filters) if filters else None
        allowed = catalog.item_ids(allowed_rows) if allowed_rows is not None else None
        hits_per_image = hits_per_image or max(100, 10 * k)
        # Many query images each only need to find candidate cases, which MaxSim then scores exactly, so each walks a
        # narrower graph; what that costs in agreement with an exact first stage is measured (MULTI_IMAGE_EF_SEARCH).
        breadth = MULTI_IMAGE_EF_SEARCH if len(queries) > 1 else None
        scores, ids = store.search(queries, hits_per_image, allowed=allowed, excluded=excluded, ef_search=breadth)
        case_of = catalog.case_rows_of_items(np.unique(ids[ids >= 0]))
        candidates = ranking.candidate_cases(ids, scores, case_of, limit=max(3 * k, 30))
        items = catalog.item_arrays(candidates)
        keep = ~np.isin(items.ids, excluded)
        members = [keep & (items.case_rows == row) for row in candidates]
        blocks = [store.vectors_of(items.ids[mine]) for mine in members]
        # A region's images are its slices in order, centred on what the reader boxed; other queries weigh theirs alike.
        weights = ranking.centre_weights(queries) if query.description.get("mode") == "roi" else None
        results, located = [], {}
        for (row, votes), mine, vectors, similarity in zip(candidates.items(), members, blocks,
                                                          ranking.similarities(queries, blocks)):
            if not mine.any():
                continue
            scored = ranking.score_case(similarity, method, votes, queries, vectors, weights)
            scored.case_row = row
            results.append(scored)
            located[row] = (mine, similarity)
        ranked = ranking.rank(results)[:k]
        for result in ranked:  # where each shown case matched: only for the cases shown
            mine, similarity = located[result.case_row]
            best, spot = ranking.locate(similarity, items.centres[mine], items.sizes[mine], items.axes[mine], weights)
            result.best_item, result.focus_ras = int(items.ids[mine][best]), tuple(float(v) for v in spot)
        best_items = catalog.items([r.best_item for r in ranked])
        answer = []
        for rank_number, result in enumerate(ranked, start=1):
            case = catalog.case_by_row(result.case_row)
            answer.append({"rank": rank_number, "case_id": case.case_id, "source": case.source, "name": case.name,
                           "score": round(result.score, 5), "votes": result.votes, "per_image_scores": result.per_image,
                           "modality": case.modality, "labels": case.labels,
                           "best_match": {**best_items[result.best_item].best_match(),
                                          "focus_ras": [round(v, 3) for v in result.focus_ras]}})
        return {"query": query.description, "ranking": method, "results": answer}


def load_volume_for_query(path: str) -> Volume:
    """Read a query volume, with a clear error if it is missing."""
    from ..imaging.readers import read_volume

    if not os.path.exists(path):
        raise InputError(path, "does not exist")
    return read_volume(path)
