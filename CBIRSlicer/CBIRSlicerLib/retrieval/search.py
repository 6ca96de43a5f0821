"""Queries (:mod:`queries`: a slice, an ROI, a whole volume, a phrase, a result item) answered on an index as ranked cases.

A query's images (cut and windowed as the index cut its cases) are embedded; their vectors go
through a filtered nearest-neighbour search; the hits become case results (:mod:`ranking`), each
with its best-matching item for the viewer. A search runs in steps, each a method of
:class:`Searcher`: the query's vectors, its scope (what it must not find, what the filters allow),
the first stage (candidate cases by nearest items), scoring every candidate case exactly, locating
the shown cases' best matches, and packaging the typed answer (:mod:`answers`); then, after the
list is shown, :meth:`Searcher.place` places each match anatomically (:mod:`placement`).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import IndexCorruptError, ParameterError
from ..imaging.volume import Volume
from ..index import vector_transform
from ..index.catalog import ItemArrays
from ..index.searchable import Allowed, SearchableIndex
from ..models.base import VOLUME_FAMILIES, Embedder
from ..models.registry import create_embedder
from ..models.requests import EmbeddingKind, EmbeddingRequest
from ..threads import one_blas_thread
from . import ranking, result_registration
from .answers import BestMatch, CaseResult, SearchAnswer
from .queries import Prior, Query, load_volume_for_query
from .result_registration import PlacementJob, QueryGrid, Registered

if TYPE_CHECKING:
    from ..imaging import body_region

# HNSW breadth per image when a query has several images: at 1 M vectors a 16-image query then agrees with an exact
# first stage on 95 % of its top 10 cases, in 47-49 ms on 2 cores (docs/benchmarks.md); single images keep the store's 1,024.
MULTI_IMAGE_EF_SEARCH = 512
# A dense region query embeds only the windows over its box, on as many of the box's slices as fit this many forward
# passes (about 2 s of ViT-B/16 on 2 cores; docs/benchmarks.md); the weight-free model takes every slice.
DENSE_QUERY_PASSES = 6
# The first stage looks at most this many nearest items per query image when its first look found fewer cases than asked
# (Milvus caps a search's top-k at 16,384).
WIDEST_FIRST_STAGE = 6_400


def first_stage_hits(k: int) -> int:
    """Nearest items the first stage looks at per query image by default, for k cases asked."""
    return max(100, 10 * k)


def through(transform: vector_transform.VectorTransform | None, blocks: list[np.ndarray]) -> list[np.ndarray]:
    """Stored vectors put through the index's vector transform (unchanged without one), on one BLAS thread.

    One BLAS thread, as for the products (threads.py): a 512 x 512 product per case cost 0.4 CPU s a query on 2 busy
    cores with OpenBLAS's pool, 0.1 s on one thread (30 cases at 1 M region vectors; docs/benchmarks.md).
    """
    if transform is None:
        return blocks
    with one_blas_thread():
        return [transform.apply(block) for block in blocks]


def embedding_request(query: Query, index: SearchableIndex) -> EmbeddingRequest | None:
    """What the query needs embedded on this index, or None (its vectors are there: an item's, or embedded already).

    Decided from the index alone (its model's family and region strategy), so a search in the module starts before the
    worker's model has loaded: a 3D model embeds the ROI's part of the volume or all of it; a dense index pools each
    slice's grid over its boxes, a region query only on as many slices as fit DENSE_QUERY_PASSES; a phrase is the
    model's text; otherwise the images.
    """
    if query.vectors is not None:
        return None
    if query.mode == "text":
        return EmbeddingRequest(EmbeddingKind.TEXT, texts=[query.spec.text or ""])
    if index.fingerprint.get("family") in VOLUME_FAMILIES:
        if query.volume is None or query.mode not in ("roi", "segment", "volume"):
            raise ParameterError(f"model '{index.model_name()}' is a 3D CT encoder: it answers region (--roi-ras) and "
                                 f"whole-volume queries, not {query.mode} queries (a single slice holds too little depth for it)")
        return EmbeddingRequest(EmbeddingKind.VOLUME, volume=query.volume, roi=query.roi if query.mode != "volume" else None)
    if not query.images:
        raise ParameterError("the query holds no images (an ROI outside the volume?)")
    if query.boxes is not None:
        settings = index.settings
        return EmbeddingRequest(EmbeddingKind.REGIONS, images=query.images, boxes=query.boxes, pixel_mm=query.pixel_mm,
                                cell_mm=settings.dense_cell_mm, pooling=settings.dense_pooling,
                                passes=DENSE_QUERY_PASSES if _region(query) else None)
    return EmbeddingRequest(EmbeddingKind.IMAGES, images=query.images)


def _region(query: Query) -> bool:
    """Whether the query asks about a box (an ROI or a segment's), not whole slices."""
    return query.mode in ("roi", "segment")


def volume_model_other_scale(index: SearchableIndex, query: Query) -> np.ndarray:
    """Items a 3D model's query must not match: an ROI is compared with regions, a whole volume with whole volumes.

    A whole volume's vector is the mean of all its cells, so it is like every region a little; left in, it came
    first for ROI queries and put every best match at the case's centre (docs/benchmarks.md).
    """
    mode = query.mode
    if mode == "item":  # 'more like this': like the item's own scale
        item = index.catalog.items([query.exclude_item]).get(query.exclude_item)
        mode = "volume" if item is not None and item.kind == "volume" else "roi"
    if mode == "volume":
        return index.catalog.item_ids_of_kinds(["volume"], negate=True)
    return index.catalog.item_ids_of_kinds(["volume"])


COARSE_IMAGES_KEPT = 32  # a 4 mm copy of a 400 mm cube is 1 M voxels (4 MB): 128 MB at most


class _Recent:
    """The last few values by key (least recently used dropped first)."""

    def __init__(self, size: int):
        self.size, self.values = size, {}

    def get(self, key):
        value = self.values.pop(key, None)
        if value is not None:
            self.values[key] = value
        return value

    def put(self, key, value):
        self.values[key] = value
        while len(self.values) > self.size:
            self.values.pop(next(iter(self.values)))
        return value


@dataclass
class SearchScope:
    """Which items a search may return: none of ``excluded``; with filters, only those ``allowed`` (item ids, or a server
    store's case filter; None: any)."""

    excluded: np.ndarray
    allowed: Allowed = None
    left_out_cases: list[int] = dataclasses.field(default_factory=list)  # case rows left out (own, judged): the fewer note
    allowed_cases: list[int] | None = None  # case rows the filters allow (None: no filters)


@dataclass
class CaseItems:
    """One case's searchable items (as arrays) and each one's similarity to the query (weighted over its images)."""

    ids: np.ndarray
    centres: np.ndarray
    sizes: np.ndarray
    axes: np.ndarray
    agreed: np.ndarray


@dataclass
class ScoredCases:
    """The candidate cases scored: their items (as arrays), and per case its score, its items and their similarities."""

    items: ItemArrays
    scores: list[ranking.CaseScore]
    members: dict[int, np.ndarray]  # case row -> mask over ``items`` of the case's searchable items
    similarities: dict[int, np.ndarray]  # case row -> query images x the case's items


def query_weights(query: Query, vectors: np.ndarray) -> np.ndarray | None:
    """How much each query image counts: a region's by likeness to its central image; other queries' alike (None)."""
    # A region's images are its slices in order, centred on what the reader boxed.
    return ranking.centre_weights(vectors) if _region(query) else None


class Searcher:
    """Answers queries on one index with its model (loaded once)."""

    def __init__(self, index: SearchableIndex, embedder: Embedder | None = None, model: str | None = None, device: str | None = None):
        self.index = index
        self.embedder = embedder or create_embedder(model or index.model_name(), device=device)
        index.check_model(self.embedder)
        self._coarse_images = _Recent(COARSE_IMAGES_KEPT)  # results' registration grids (ResultGrid): the same cases come back often
        # The last query volume's grid and its whole-volume registrations into each result: the next ROI on the same
        # volume (a session queries several) needs only the local stages.
        self._query_grid: QueryGrid | None = None
        # The last query volume's modality and body region as inferred from its image (~70 ms of CPU, as much as the rest of
        # a search's ranking at 1 M region vectors; docs/benchmarks.md): the next ROI on the same volume reuses them.
        self._query_kind: tuple[Volume, body_region.Inferred] | None = None

    def query_vectors(self, query: Query) -> np.ndarray:
        """The query's vectors for the first stage: what :func:`embedding_request` says it needs, run by the searcher's
        model (kept on the query: placing the matches later compares them again)."""
        request = embedding_request(query, self.index)
        if request is not None:
            query.vectors = request.run(self.embedder)
        return query.vectors

    def excluded_items(self, query: Query) -> np.ndarray:
        """Items no answer to this query may show, whatever its scope: those removed from the index, and for a 3D model
        the other scale's (:func:`volume_model_other_scale`)."""
        excluded = self.index.excluded_ids()
        if self.embedder.embeds_volumes:
            excluded = np.union1d(excluded, volume_model_other_scale(self.index, query))
        return excluded

    def scope(self, query: Query, filters: dict[str, str] | None = None) -> SearchScope:
        """The items the query must not find (its own case, removed items, the item it started from) and the filters' items."""
        catalog = self.index.catalog
        # A path and the same file reached through a symbolic link are one case.
        own = {form(s) for s in query.exclude_sources for form in (os.path.abspath, os.path.realpath)}
        excluded_rows = sorted(set(catalog.case_rows_of_sources(own)) | set(query.exclude_rows))
        excluded = np.union1d(self.excluded_items(query), catalog.item_ids(excluded_rows) if excluded_rows else [])
        if query.exclude_item is not None:
            excluded = np.union1d(excluded, [query.exclude_item])
        allowed_rows = catalog.case_rows_matching(filters) if filters else None  # a field no case has raises there
        # Item ids for the folder; a store that filters inside its own search (Milvus) gets the filters as its condition.
        allowed = self.index.allowed_items(filters) if filters else None
        return SearchScope(excluded, allowed, excluded_rows, allowed_rows)

    def first_stage(self, vectors: np.ndarray, scope: SearchScope, k: int, hits_per_image: int | None = None,
                    transform=None) -> dict[int, int]:
        """Candidate cases (case row -> votes) from each query image's nearest items inside the scope (raw query vectors)."""
        hits_per_image = hits_per_image or first_stage_hits(k)
        # Many query images each only need to find candidate cases, which MaxSim then scores exactly, so each walks a
        # narrower graph; what that costs in agreement with an exact first stage is measured (MULTI_IMAGE_EF_SEARCH).
        breadth = MULTI_IMAGE_EF_SEARCH if len(vectors) > 1 else None
        if transform is None:
            scores, ids = self.index.store.search(vectors, hits_per_image, allowed=scope.allowed, excluded=scope.excluded,
                                                  ef_search=breadth, raw=True)
        else:  # the transform folded into the query, then the hits re-scored exactly (vector_transform.first_stage)
            scores, ids = vector_transform.first_stage(self.index.store, transform, vectors, hits_per_image, allowed=scope.allowed,
                                                       excluded=scope.excluded, ef_search=breadth)
        case_of = self.index.catalog.case_rows_of_items(np.unique(ids[ids >= 0]))
        return ranking.candidate_cases(ids, scores, case_of, limit=max(3 * k, 30))

    def score_cases(self, vectors: np.ndarray, candidates: dict[int, int], scope: SearchScope, method: str,
                    weights: np.ndarray | None = None, transform=None) -> ScoredCases:
        """Every candidate case scored exactly against all its items in the scope (cases left with none are dropped).

        With a transform, ``vectors`` are the query's transformed vectors and the stored ones go through it too.
        """
        items = self.index.catalog.item_arrays(candidates)
        keep = ~np.isin(items.ids, scope.excluded)
        members = [keep & (items.case_rows == row) for row in candidates]
        blocks = through(transform, [self.index.store.vectors_of(items.ids[mine]) for mine in members])
        scored = ScoredCases(items, [], {}, {})
        for (row, votes), mine, block, similarity in zip(candidates.items(), members, blocks,
                                                         ranking.similarities(vectors, blocks)):
            if not mine.any():
                continue
            score = ranking.score_case(similarity, method, votes, vectors, block, weights)
            score.case_row = row
            scored.scores.append(score)
            scored.members[row], scored.similarities[row] = mine, similarity
        return scored

    @staticmethod
    def locate(scored: ScoredCases, shown: list[ranking.CaseScore], weights: np.ndarray | None = None) -> None:
        """Where each shown case matched (its best item and the focus around it): only for the cases shown."""
        items = scored.items
        for result in shown:
            mine, similarity = scored.members[result.case_row], scored.similarities[result.case_row]
            best, spot = ranking.locate(similarity, items.centres[mine], items.sizes[mine], items.axes[mine], weights)
            result.best_item, result.focus_ras = int(items.ids[mine][best]), tuple(float(v) for v in spot)

    def package(self, query: Query, method: str, shown: list[ranking.CaseScore]) -> SearchAnswer:
        """The typed answer: each shown case (best first) with its catalog details and best match."""
        catalog = self.index.catalog
        best_items = catalog.items([r.best_item for r in shown])
        results = [CaseResult.of_case(rank, catalog.case_by_row(r.case_row), r.score, r.votes, r.per_image,
                                      BestMatch.of_item(best_items[r.best_item], r.focus_ras))
                   for rank, r in enumerate(shown, start=1)]
        return SearchAnswer(query.spec, method, results)

    def search(self, query: Query, k: int = 10, filters: dict[str, str] | None = None, method: str = "maxsim",
               hits_per_image: int | None = None, prior: bool = True, rescore=None) -> SearchAnswer:
        """The k most similar cases, best first, each with where it matched (``to_json()``: the CLI's JSON answer).

        ``rescore(scored, compared, transform)``, if given, may change the candidates' scores before ranking
        (relevance feedback's linear model, :mod:`feedback`).

        ``prior``: cases of the query volume's own modality and body region (as the catalog holds them: DICOM, else
        inferred from the image) come before the others (:meth:`same_kind_first`); ``False`` ranks by similarity alone.
        """
        if method not in ranking.METHODS:
            raise ParameterError(f"ranking must be one of {', '.join(ranking.METHODS)}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= ranking.MAX_RESULTS:
            raise ParameterError(f"the number of cases asked for (k) must be a whole number from 1 to {ranking.MAX_RESULTS}, "
                                 f"not {k!r}")
        vectors = self.query_vectors(query)
        scope = self.scope(query, filters)
        if scope.allowed is not None and not len(scope.allowed):
            return SearchAnswer(query.spec, method, [],
                                note="no case of the index matches the filters " + ", ".join(f"{k}={v}" for k, v in filters.items()))
        transform = self.transform_for(query)
        hits = hits_per_image or first_stage_hits(k)
        candidates = self.first_stage(vectors, scope, k, hits, transform)
        # Fewer candidate cases than asked for, where the scope holds more: the nearest items crowded into a few cases
        # (a small index of dense region vectors: litemedsam answered 6-9 of 10 on 11 cases). Look further, 4x a round.
        if len(candidates) < k:
            in_scope = len(self.cases_in_scope(scope))
            while len(candidates) < min(k, in_scope) and hits < WIDEST_FIRST_STAGE:
                hits *= 4
                candidates = self.first_stage(vectors, scope, k, hits, transform)
        compared = vectors if transform is None else transform.apply(vectors)
        weights = query_weights(query, compared)
        scored = self.score_cases(compared, candidates, scope, method, weights, transform)
        if rescore is not None:
            rescore(scored, compared, transform)
        shown = ranking.rank(scored.scores)
        if prior:
            shown = self.same_kind_first(query, shown)
        shown = shown[:k]
        if any(not np.isfinite(r.score) for r in shown):  # never a NaN score: only damaged vectors give one
            raise IndexCorruptError(f"{self.index.folder}: a case scores NaN; the index is damaged: run 'cbir index verify' and "
                                    "'cbir index repair'")
        self.locate(scored, shown, weights)
        answer = self.package(query, method, shown)
        found = (self.fewer_note(query, scope, k, len(shown)) if len(shown) < k else None, self.modality_note(query))
        notes = [note for note in found if note is not None]
        return dataclasses.replace(answer, note="; ".join(notes)) if notes else answer

    def transform_for(self, query: Query) -> vector_transform.VectorTransform | None:
        """The index's vector transform as this query's vectors are compared through it: none for text (the transform
        is learned on image vectors, :mod:`vector_transform`)."""
        return None if query.mode == "text" else self.index.transform

    def modality_note(self, query: Query) -> str | None:
        """A warning when the index's model was made for other modalities than the query's (an MR on astra-ct's index):
        the search runs all the same, and the answer says so."""
        if query.volume is None or not getattr(self.embedder, "modalities", ()):
            return None
        from ..imaging.intensity import looks_like_ct
        from ..models.base import modality_warning

        seen = query.volume.modality or ("CT" if looks_like_ct(query.volume) else "MR")
        warning = modality_warning(self.embedder, seen)
        return warning.replace("this volume", "the query") if warning else None

    def _cases_allowed(self, scope: SearchScope) -> set[int]:
        """Rows of the cases the filters allow (all the index's cases without filters)."""
        return set(self.index.catalog.case_rows_matching({})) if scope.allowed_cases is None else set(scope.allowed_cases)

    def cases_in_scope(self, scope: SearchScope) -> set[int]:
        """Rows of the cases a search may show: those the filters allow, less those it leaves out."""
        return self._cases_allowed(scope) - set(scope.left_out_cases)

    def fewer_note(self, query: Query, scope: SearchScope, k: int, shown: int) -> str:
        """Why an answer shows fewer cases than asked for: the cases the index can show, and those left out."""
        catalog = self.index.catalog
        complete = self._cases_allowed(scope)
        left_out = complete & set(scope.left_out_cases)
        marked = query.spec.feedback.judged if query.spec.feedback is not None else []
        judged = {case.row for case in map(catalog.case_by_id, marked) if case is not None}
        kinds = [what for what, rows in (("already judged", left_out & judged), ("the query's own case", left_out - judged)) if rows]
        held = f"{len(complete)} case{'s' if len(complete) != 1 else ''}" + (" matching the filters" if scope.allowed_cases is
                                                                                 not None else "")
        why = f"; {len(left_out)} left out ({' and '.join(kinds)})" if left_out else ""
        if shown >= len(complete) - len(left_out):
            return f"{shown} of the {k} cases asked for: the index holds {held}{why}"
        return (f"{shown} of the {k} cases asked for: the index holds {held}{why}, but only {shown} came among the first "
                "stage's nearest items")


    def _inferred(self, volume: Volume) -> body_region.Inferred:
        """The query volume's modality, body region and body axis as inferred from its image (:func:`body_region.infer`),
        once per volume."""
        from ..imaging import body_region

        if self._query_kind is None or self._query_kind[0] is not volume:
            self._query_kind = (volume, body_region.infer(volume))
        return self._query_kind[1]

    def same_kind_first(self, query: Query, ranked: list[ranking.CaseScore]) -> list[ranking.CaseScore]:
        """Ranked cases in four groups, each in its own order: the query's modality and anatomy; its modality with a
        neighbouring or unknown region; another modality of its anatomy; the rest (:func:`body_region.prior_group`).

        A soft prior, not a filter: on real CT the weight-free descriptor ranked a brain MR or a head CT above the other
        patient's abdomen for many organ queries (docs/benchmarks.md); cases of another kind still follow. Anatomy is
        compared by the standard body levels held (the query's point, or its whole volume, against each case's levels
        as indexed) or by a shared region, so a region read wrong from a header (PARTIALBODY) or from an odd crop costs
        the right case nothing. The query's kind is recorded in its spec (the answer's query.prior).
        """
        from ..imaging import body_region

        if query.volume is None or not ranked:
            return ranked
        if query.spec.prior is None:
            kind = body_region.query_kind(query.volume, self._inferred(query.volume), query.centre_ras)
            query.spec = dataclasses.replace(query.spec, prior=Prior.of_kind(kind))
        wanted = query.spec.prior.kind()

        def group(score: ranking.CaseScore) -> int:
            case = self.index.catalog.case_by_row(score.case_row)
            return body_region.prior_group(wanted, body_region.case_kind(case.modality, case.body_part, case.metadata))

        groups = [group(s) for s in ranked]
        return [s for n in range(4) for s, g in zip(ranked, groups) if g == n]

    def place(self, query: Query, answer: SearchAnswer, loader=None, limit: int | None = None,
              workers: int | None = None) -> SearchAnswer:
        """The answer with each shown match placed (see :mod:`placement`): both places (the same anatomy, the most
        similar finding), the one the query's match intent asks for shown, never a point outside the result's volume.

        Needs the query's volume and centre (ROI and slice queries); other answers come back unchanged. ``loader`` reads
        a result's volume from its source (default: the file readers; called from worker threads, so it must not touch
        the scene); a result whose volume cannot be read keeps its descriptor match. Meant to run after the list is
        shown: it reads volumes and registers, about a second of CPU a result. ``workers`` results are registered at
        once (default: one per core, at most :data:`result_registration.PLACE_WORKERS`), each on its own ITK thread;
        the index is read only from the calling thread.
        """

        if query.volume is None or query.centre_ras is None or not answer.results:
            return answer
        placing = self._placing(query)
        if placing is None:  # a volume too thin to smooth at the coarse grid: nothing to register
            return answer
        shown = answer.results if limit is None else answer.results[:limit]
        jobs = [self._placement_job(result) for result in shown]
        box_mm = max(round(v, 3) for v in query.roi.size) if query.roi is not None else None
        reach_mm = query.roi.size[2] / 2 if query.roi is not None else 0.0  # how far the box reaches along the body

        centre, read = query.centre_ras, loader or load_volume_for_query

        def register(job: PlacementJob | None) -> Registered | None:
            return None if job is None else result_registration.register_result(placing, job, centre, read, box_mm, reach_mm)

        def alike() -> dict[int, CaseItems]:
            """The results' items against the query, read while they register. Compared as the search compared them
            (through the index's vector transform), so the look-alike a placed result carries is the search's own."""
            transform = self.transform_for(query)
            vectors = self.query_vectors(query)
            compared = vectors if transform is None else transform.apply(vectors)
            rows = [job.case_row for job in jobs if job is not None]
            return self.case_items(rows, compared, query_weights(query, compared), self.excluded_items(query), transform)

        registered, items = result_registration.register_all(jobs, register, workers, alike)
        # a case left with no searchable item (removed since the search) keeps its match
        placed = [self._placed(query, result, items[job.case_row], done, placing)
                  if job is not None and done is not None and job.case_row in items else result
                  for result, job, done in zip(shown, jobs, registered)]
        for job, done in zip(jobs, registered):  # kept in the calling thread: the same cases come back often
            if job is not None and done is not None and job.grid is None:
                self._coarse_images.put(job.result.source, done.grid)
        return dataclasses.replace(answer, results=placed + list(answer.results[len(shown):]))

    def _placement_job(self, result: CaseResult) -> PlacementJob | None:
        """What registering one result needs from the index (read here, in the calling thread): its case, stored body
        axis and any registration grid kept from before; None for a case no longer in the index (removed since the
        search: it keeps its match)."""
        case = self.index.catalog.case_by_id(result.case_id)
        if case is None or case.row is None:
            return None
        return PlacementJob(result, case.row, case.metadata.get("body_axis"), self._coarse_images.get(result.source))

    def case_items(self, rows: list[int], vectors: np.ndarray, weights: np.ndarray | None, excluded: np.ndarray,
                   transform: vector_transform.VectorTransform | None = None) -> dict[int, CaseItems]:
        """Each case's searchable items and their similarity to the query (``vectors`` compared as the search compares
        them), by case row: what placement chooses a result's look-alike from."""
        scored = self.score_cases(vectors, dict.fromkeys(rows, 0), SearchScope(excluded), "maxsim", weights, transform)
        items, found = scored.items, {}
        for row, mine in scored.members.items():
            similarity = scored.similarities[row]
            agreed = similarity.mean(axis=0) if weights is None else weights @ similarity
            found[row] = CaseItems(items.ids[mine], items.centres[mine], items.sizes[mine], items.axes[mine], agreed)
        return found

    def _placed(self, query: Query, result: CaseResult, items: CaseItems, done: Registered,
                placing: QueryGrid) -> CaseResult:
        """A result with its best match placed: the registered point judged against its items (:func:`placement.choose`)."""
        from . import placement

        if done.where is None:
            choice = placement.choose(items.agreed, items.centres, items.sizes, items.axes, None, False, query.spec.match, placing.focal)
        else:
            where, window = done.where, done.window
            level_items = None if window is None else np.abs(items.centres[:, 2] - window.s_mm) <= window.half_mm
            choice = placement.choose(items.agreed, items.centres, items.sizes, items.axes, where.ras, done.grid.holds(where.ras),
                                      query.spec.match, placing.focal, where.agreement, placement.rejected(where), level_items)
        item_id = int(items.ids[choice.item])
        anatomy = None if choice.anatomy_ras is None else choice.anatomy_ras.tolist()
        match = BestMatch.of_item(self.index.catalog.items([item_id])[item_id], choice.focus_ras.tolist(), anatomy,
                                  choice.shown, choice.look_alike_ras.tolist(), choice.in_view, choice.note)
        return dataclasses.replace(result, best_match=match)

    def _placing(self, query: Query) -> QueryGrid | None:
        """What placement needs of the query volume, once per volume: its registration grid, body axis and focality."""
        from ..imaging.focal import focality

        if query.volume is None:
            return None
        if self._query_grid is None or self._query_grid.volume is not query.volume:
            try:  # the axis as the index keeps its cases' (body_region.fill_in): none where the rules found it wrong
                self._query_grid = QueryGrid.of(query.volume, self._inferred(query.volume).placeable_axis)
            except RuntimeError:
                return None
        placing = self._query_grid
        found = focality(query.volume, query.roi) if query.roi is not None else None
        placing.focal = bool(found is not None and found.focal)
        return placing
