"""Searching an index from what is in the Slicer scene, without freezing the GUI.

A :class:`SearchSession` holds one open index and the model it was built with, running in a
background :class:`~CBIRSlicerLib.models.worker.EmbeddingService` process (started once and reused, so
the model loads once per Slicer session). A query is made from a volume node plus an ROI node,
a slice position or the whole volume (:func:`query_from_nodes`, fast: cutting a few slices); its
images are embedded in the worker while the caller polls :meth:`PendingSearch.poll` from a
timer (the one progress protocol, :mod:`progress`); the nearest-neighbour search and ranking then take
milliseconds on the caller's thread.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, cast

import numpy as np

from ..errors import CBIRError, JobCancelled, ParameterError
from ..imaging.volume import Volume
from ..index.files import MANIFEST
from ..index.location import index_exists, is_server_location, location_key, open_index
from ..index.searchable import SearchableIndex
from ..models.base import Embedder, Fingerprint
from ..models.worker import EmbeddingService, Job
from ..progress import PendingCall, Progress, State
from ..retrieval.answers import CaseResult, SearchAnswer
from ..retrieval.feedback import DEFAULT_STRATEGY, search_again
from ..retrieval.marks import Feedback
from ..retrieval.queries import VOLUME_MODES, Query, QuerySpec, make_query
from ..retrieval.search import Searcher, embedding_request
from .nodes import node_state, roi_from_node, segment_from_node, volume_from_node

_services: dict[tuple[str, str | None, str | None], EmbeddingService] = {}


def embedding_service(model: str, python: str | None = None, device: str | None = None) -> EmbeddingService:
    """The session's worker for a model, started on first use and reused after (the model loads once)."""
    key = (model, python, device)
    service = _services.get(key)
    if service is None:
        service = _services[key] = EmbeddingService(model=model, device=device, python=python)
    return service.start()


def shutdown_services() -> None:
    """Stop every worker this session started (Slicer calls this when the module is cleaned up)."""
    while _services:
        _, service = _services.popitem()
        service.shutdown()


def is_index_folder(folder: str | os.PathLike | None) -> bool:
    """Whether a folder holds an index (a manifest), so the panel can offer 'open' or 'build'; never asks a server."""
    return bool(folder) and not is_server_location(folder) and os.path.isfile(os.path.join(str(folder), MANIFEST))


def is_index_location(location: str | os.PathLike | None) -> bool:
    """Whether a location names an index: a folder holding one, or a Milvus location (its server is asked when it opens)."""
    return is_server_location(location) or is_index_folder(location)


def same_location(location: str, index: SearchableIndex) -> bool:
    """Whether a location names the index that is open (a folder by its absolute path, Milvus by its location)."""
    try:
        return location_key(location) == index.folder
    except CBIRError:  # a malformed location names no open index
        return False


def existing_model(location: str) -> str | None:
    """The model of the index at a location, or None when there is none yet (a Milvus location asks its server)."""
    if not (index_exists(location) if is_server_location(location) else is_index_folder(location)):
        return None
    return index_summary(location)["model"]


def index_summary(folder: str) -> dict[str, Any]:
    """What the index panel shows: model, cases, vectors, dates (the index's own info), read without a lock."""
    index = open_index(folder)
    try:
        return index.info()
    finally:
        index.close()


def describe_index(info: dict[str, Any]) -> str:
    """One line for the panel from :func:`index_summary`."""
    counts = info["counts"]
    return (f"{counts['cases']} cases, {counts['vectors']} vectors ({info['index_type']}), model {info['model']}; "
            f"updated {info['updated']}")


def case_window(index: SearchableIndex, case_id: str) -> dict[str, Any] | None:
    """The intensity window the index cut a case's images with ({'name', 'lower', 'upper'}), to show it the same way."""
    case = index.catalog.case_by_id(case_id)
    return case.metadata.get("window") if case is not None else None


class ServiceModel(Embedder):
    """The model of a running EmbeddingService, seen as an Embedder: its identity, with images embedded in the worker."""

    def __init__(self, service: EmbeddingService, info: dict[str, Any]):
        self.service = service
        self.name = info["name"]
        self.dim = int(info["dim"])
        self.device = info.get("device", "cpu")
        self.supports_text = bool(info.get("supports_text"))
        self.embeds_volumes = bool(info.get("embeds_volumes"))
        self.fingerprint = Fingerprint(**info["fingerprint"])

    def _embed_batch(self, images: list[np.ndarray]) -> np.ndarray:
        return self.service.submit_images(images).result()

    def _embed_text(self, texts: list[str]) -> np.ndarray:
        return self.service.submit_text(texts).result()


_recent_volume: dict[str, Any] = {}  # the last query node's state and Volume (one, so a large CT is held once at most)


def query_volume(volume_node) -> Volume:
    """The node's Volume: the same object while the node's voxels and geometry are unchanged, so what the searcher keeps
    of its last query volume (the 4 mm grid and its registration into each result) serves the next ROI on it."""
    state = node_state(volume_node)
    if _recent_volume.get("state") != state:
        _recent_volume.clear()  # drop the old voxels before copying new ones
        _recent_volume.update(state=state, volume=volume_from_node(volume_node))
    return _recent_volume["volume"]


def query_from_nodes(index: SearchableIndex, volume_node, axis: str = "axial", mode: str = "roi", roi_node=None,
                     slice_ras: Sequence[float] | None = None, segment_node=None, segment: str | int | None = None) -> Query:
    """A query from the scene: the ROI's slices (mode 'roi'), a segment's ('segment': a segmentation node's segment, by
    name or ID, or a label of a label map node), the slice through a point ('slice') or the whole volume."""
    if mode not in VOLUME_MODES:
        raise ParameterError(f"query mode must be one of {', '.join(VOLUME_MODES)}, not '{mode}'")
    if volume_node is None:
        raise ParameterError("choose a query volume first")
    volume = query_volume(volume_node)
    if mode == "roi" and roi_node is None:
        raise ParameterError("choose or place an ROI first, or query the current slice or the whole volume")
    # Three numbers as QuerySpec types it; make_query checks the point against the volume.
    point = cast("tuple[float, float, float]", tuple(float(v) for v in slice_ras)) if mode == "slice" and slice_ras is not None else None
    spec = QuerySpec(mode, axis=axis, roi=roi_from_node(roi_node) if mode == "roi" else None, point=point)
    return make_query(spec, volume, index, segment_from_node(segment_node, segment) if mode == "segment" else None)


class PendingSearch:
    """One search whose query images are being embedded in the background; poll it from a timer."""

    def __init__(self, session: SearchSession, query: Query, job: Job | None, k: int, filters: dict[str, str] | None,
                 ranking: str, prior: bool = True, feedback: Feedback | None = None):
        self.session, self.query, self.job = session, query, job
        self.k, self.filters, self.ranking, self.prior = k, filters, ranking, prior
        self.feedback = feedback  # marks of earlier results: the search runs again with them (retrieval.feedback)
        self.answer: SearchAnswer | None = None
        self.error: Exception | None = None
        self.cancelled = False
        if job is None:  # the query already holds its vectors ('more like this'): answer at once
            self._finish()

    def poll(self) -> Progress:
        """Advance the search if its vectors are ready (ranking runs here, on the caller's thread); say where it stands."""
        if self.answer is not None:
            return Progress(State.DONE, 1, 1)
        if self.cancelled:
            return Progress(State.CANCELLED, message="cancelled")
        if self.error is not None:
            return Progress(State.FAILED, message=str(self.error))
        progress = self.job.poll()
        if progress.state == State.DONE:
            self.query.vectors = self.job.result()
            self._finish()
            return self.poll()
        if progress.finished:
            try:
                self.job.result(timeout=0)
            except JobCancelled:
                self.cancelled = True
            except Exception as error:  # the worker's reason, shown to the user
                self.error = error
            return self.poll()
        state = State.RUNNING if self.session.service.ready else State.LOADING_MODEL
        return Progress(state, progress.done, progress.total, rate=progress.rate, eta_s=progress.eta_s)

    def _finish(self) -> None:
        try:
            if self.feedback:
                answer = search_again(self.session.searcher(), self.query, self.feedback, self.k, self.filters, self.ranking,
                                      DEFAULT_STRATEGY, prior=self.prior)
            else:
                answer = self.session.searcher().search(self.query, self.k, self.filters, self.ranking, prior=self.prior)
            self.answer = self.session.with_suggestion(answer)
        except CBIRError as error:
            self.error = error

    def cancel(self) -> None:
        """Stop embedding the query (the worker stays up with its model loaded)."""
        if self.job is not None and self.answer is None:
            self.job.cancel()
        self.cancelled = self.answer is None

    def wait(self, timeout: float | None = None) -> SearchAnswer:
        """Block until the answer is ready (scripts and tests); raises the search's error."""
        if self.job is not None:
            self.job.wait(timeout)
        progress = self.poll()
        if progress.state == State.DONE:
            return self.answer
        if progress.state == State.CANCELLED:
            raise JobCancelled("search cancelled")
        raise self.error or TimeoutError(f"search still {progress.state} after {timeout} s")


class PendingPlacement(PendingCall):
    """Placing a shown answer's matches anatomically, on a background thread; :meth:`poll` it from a timer, as a search.

    The list is shown first; this refines where each result matched (:meth:`Searcher.place`), which reads every shown
    result's volume and registers the query's neighbourhood into it: about a second a result, so never on the GUI
    thread. SimpleITK releases the GIL while it works, so the GUI stays responsive. ``answer`` is the placed answer;
    ``error`` why placing failed (the unplaced list stays).
    """

    def __init__(self, searcher: Searcher, query: Query, answer: SearchAnswer, loader=None):
        super().__init__(lambda call: searcher.place(query, answer, loader), name="cbir-placement")

    @property
    def answer(self) -> SearchAnswer | None:
        """The placed answer, once placed."""
        return self.value

    def wait(self, timeout: float | None = None) -> SearchAnswer | None:
        """Block until placed (scripts and tests); the placed answer, or None if it failed or is not done."""
        super().wait(timeout)
        return self.answer


class SearchSession:
    """An index opened for searching, with its model running in a background worker."""

    def __init__(self, folder: str | SearchableIndex, model: str | None = None, python: str | None = None,
                 device: str | None = None):
        # an index already open is not opened again
        self.index = open_index(folder) if isinstance(folder, (str, os.PathLike)) else folder
        self.model = model or self.index.model_name()
        self.service = embedding_service(self.model, python, device)
        self._searcher: Searcher | None = None
        self._suggester = None

    def close(self) -> None:
        """Close the index (the worker stays, for the next index built with the same model)."""
        self.index.close()

    def info(self) -> dict[str, Any]:
        """The index's info (model, counts, dates)."""
        return self.index.info()

    def searcher(self) -> Searcher:
        """The searcher over the index; waits for the model identity, which the worker sends once it has loaded."""
        if self._searcher is None:
            model = ServiceModel(self.service, self.service.wait_ready())
            self._searcher = Searcher(self.index, embedder=model)  # refuses a model other than the index's
        return self._searcher

    def start(self, query: Query, k: int = 10, filters: dict[str, str] | None = None, ranking: str = "maxsim",
              prior: bool = True) -> PendingSearch:
        """Start a search: what the query needs embedded goes to the worker at once; returns without waiting.

        ``prior``: cases of the query's own modality and body region first (:meth:`Searcher.search`); off, all alike."""
        # The searcher's own rule, decided from the index, so a search starts without waiting for the worker's model to load.
        request = embedding_request(query, self.index)
        job = self.service.submit(request) if request is not None else None
        return PendingSearch(self, query, job, k, filters, ranking, prior)

    def start_text(self, text: str, k: int = 10, filters: dict[str, str] | None = None) -> PendingSearch:
        """Start a search for a phrase (CLIP-family models)."""
        return self.start(make_query(QuerySpec("text", text=text), None, self.index), k, filters)

    def start_placement(self, search: PendingSearch, loader=None) -> PendingPlacement | None:
        """Place a finished search's matches in the background (ROI and slice queries); None when there is nothing to place."""
        if search.answer is None or search.query.volume is None or not search.answer.results:
            return None
        return PendingPlacement(self.searcher(), search.query, search.answer, loader)

    def more_like(self, item_id: int, k: int = 10, filters: dict[str, str] | None = None) -> PendingSearch:
        """'More like this': the result's best-matching item as the query; answered at once (no embedding)."""
        return self.start(make_query(QuerySpec("item", item=int(item_id)), None, self.index), k, filters)

    def with_suggestion(self, answer: SearchAnswer) -> SearchAnswer:
        """The answer with its suggested finding (or why there is none) when the index's cases carry labels."""
        from ..retrieval.suggestion import Suggester

        if self._suggester is None:
            self._suggester = Suggester(self.index)
        return self._suggester.attach(answer)

    def search_again(self, search: PendingSearch, marks: Feedback, k: int | None = None,
                     filters: dict[str, str] | None = None) -> PendingSearch:
        """The finished search's query again with the results marked relevant or not (judged cases left out); at once."""
        if search.answer is None or search.query.vectors is None:
            raise ParameterError("search first, then mark results relevant or not and search again")
        if not marks:
            raise ParameterError("mark at least one result relevant or not relevant first")
        return PendingSearch(self, search.query, None, k or search.k, filters if filters is not None else search.filters,
                             search.ranking, search.prior, Feedback.from_json(marks.to_json()))

    def labels_to_ask_for(self, count: int = 10) -> list[dict[str, Any]]:
        """Unlabelled cases whose label would help the suggestions most (retrieval.suggestion.labels_to_ask_for)."""
        from ..retrieval.suggestion import labels_to_ask_for

        return labels_to_ask_for(self.index, None, count)


def suggestion_text(answer: SearchAnswer | None) -> str:
    """The panel's line above the results: the suggestion with its confidence and support, why there is none, or ''."""
    found = answer.suggestion if answer is not None else None
    return found.line() if found is not None else ""


def mark_result(marks: Feedback, result: CaseResult, relevant: bool | None) -> None:
    """Mark a shown result relevant (True) or not (False), or clear it (None): it stands for its best match."""
    marks.mark(result.case_id, result.best_match.item_id, relevant)


def result_mark(marks: Feedback, result: CaseResult) -> str:
    """The mark a result row shows: '[relevant] ', '[not relevant] ' or ''."""
    if result.case_id in marks.relevant:
        return "[relevant] "
    return "[not relevant] " if result.case_id in marks.not_relevant else ""


def labels_to_ask_text(session: SearchSession, count: int = 5) -> str:
    """The panel's list of the cases to label next (by name), or that every case is labelled."""
    wanted = session.labels_to_ask_for(count)
    if not wanted:
        return "Every case is labelled."
    names = []
    for entry in wanted:
        case = session.index.catalog.case_by_id(entry["case_id"])
        names.append(f"{case.name or case.case_id} ({entry['uncertainty']:.2f})")
    return "Label next (uncertainty): " + ", ".join(names)
