"""Relevance feedback: the user marks shown cases relevant or not, and searches again.

Each marked case stands for the item it matched best when it was marked (its best match in the answer
the user judged). Two ways to use the marks, measured against each other on the phantom cohorts and the
real-image benchmark with simulated feedback (``benchmarks/reading_room.py``, ``docs/benchmarks.md``):

* ``rocchio``: each query vector moves towards the relevant items' mean and away from the others'
  (alpha 1, beta 0.75, gamma 0.25, re-normalised), then the search runs as before;
* ``linear``: a ridge classifier on the marked items (and the query's vectors, as relevant) re-scores
  every first-stage candidate case by its best item under the classifier, added to its similarity.

Cases already judged are left out of the new answer (residual ranking): the user has seen them, and a
gain cannot come from keeping the marked cases on top. Marks accumulate over rounds in the answer's
``query.feedback``, so ``cbir search --from`` an answer made with feedback carries its earlier marks.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import CBIRError, ParameterError
from .marks import Feedback

if TYPE_CHECKING:  # for the annotations only: the searcher and the query are handed in
    from .queries import Query
    from .search import Searcher

STRATEGIES = ("rocchio", "linear")
# One round on the phantom cohorts: Rocchio mP@5 0.46 -> 0.80 and 0.30 -> 0.63, the linear re-scoring 0.32 / 0.35; the
# real-image benchmark could not tell them apart (nothing relevant left after one round; docs/benchmarks.md).
DEFAULT_STRATEGY = "rocchio"
ROCCHIO = (1.0, 0.75, 0.25)  # alpha (query), beta (relevant), gamma (not relevant): the textbook weights
RIDGE = 1.0  # the linear model's penalty (unit vectors; a handful of marks)


def feedback_from_answer(answer: dict[str, Any], relevant: list[str], not_relevant: list[str], path: str = "the answer") -> Feedback:
    """The earlier answer's marks plus new ones on its results (each stands for its best match there)."""
    try:
        marks = Feedback.from_json(answer.get("query", {}).get("feedback"))
    except ParameterError as error:
        raise ParameterError(f"{path}: {error}") from None

    def item_of(result: dict[str, Any]) -> int | None:
        best = result.get("best_match")
        item = best.get("item_id") if isinstance(best, dict) else None
        return item if isinstance(item, int) and not isinstance(item, bool) else None

    items = {r["case_id"]: item_of(r) for r in answer.get("results", [])}
    both = set(relevant) & set(not_relevant)
    if both:
        raise ParameterError(f"case(s) {', '.join(sorted(both))} marked both relevant and not relevant")
    for case_id, is_relevant in [(c, True) for c in relevant] + [(c, False) for c in not_relevant]:
        if case_id not in items:
            raise ParameterError(f"{path}: case '{case_id}' is not among its results ({', '.join(items) or 'none'})")
        marks.mark(case_id, items[case_id], is_relevant)
    return marks


def _marked_items(index, marks: dict[str, int | None], query_vectors: np.ndarray) -> np.ndarray:
    """The stored (raw) vectors of the marked cases' items; a case marked without an item gives its item most like the query."""
    ids = []
    excluded = index.excluded_ids()
    for case_id, item in marks.items():
        case = index.catalog.case_by_id(case_id)
        if case is None or case.status != "complete":
            raise ParameterError(f"{index.folder}: the case '{case_id}' marked in the feedback is not in this index (another "
                                 "index's answer, or removed since); leave its mark out")
        own = index.catalog.item_ids([case.row])
        if item is None or int(item) in set(excluded.tolist()) or int(item) not in set(own.tolist()):
            # no item, one removed since, or one that is not the case's: the case's item most like the query stands for it
            own = own[~np.isin(own, excluded)]
            if not len(own):
                continue
            item = int(own[np.argmax((index.store.vectors_of(own) @ query_vectors.T).max(axis=1))])
        ids.append(int(item))
    return index.store.vectors_of(np.array(ids, np.int64)) if ids else np.zeros((0, index.store.dim), np.float32)


def rocchio(vectors: np.ndarray, relevant: np.ndarray, not_relevant: np.ndarray, weights=ROCCHIO) -> np.ndarray:
    """Each query vector moved towards the relevant vectors' mean and away from the others', unit length again."""
    alpha, beta, gamma = weights
    moved = alpha * np.asarray(vectors, np.float64)
    if len(relevant):
        moved = moved + beta * np.asarray(relevant, np.float64).mean(axis=0)
    if len(not_relevant):
        moved = moved - gamma * np.asarray(not_relevant, np.float64).mean(axis=0)
    norms = np.linalg.norm(moved, axis=1, keepdims=True)
    return (moved / np.where(norms > 0, norms, 1.0)).astype(np.float32)


def linear_model(positives: np.ndarray, negatives: np.ndarray, ridge: float = RIDGE) -> np.ndarray:
    """A ridge classifier's weight vector (targets +1 / -1), solved in its dual form (few marks, many dimensions)."""
    x = np.concatenate([positives, negatives]).astype(np.float64)
    y = np.concatenate([np.ones(len(positives)), -np.ones(len(negatives))])
    return x.T @ np.linalg.solve(x @ x.T + ridge * np.eye(len(x)), y)


class LinearRescorer:
    """Adds each candidate case's best item score under a linear model (z-scored, at the scores' spread) to its score."""

    def __init__(self, searcher, positives: np.ndarray, negatives: np.ndarray):
        self.searcher, self.positives, self.negatives = searcher, positives, negatives

    def __call__(self, scored, compared: np.ndarray, transform) -> None:
        if not scored.scores:
            return
        prepare = transform.apply if transform is not None else (lambda v: np.asarray(v, np.float32))
        positives = np.concatenate([prepare(self.positives), compared]) if len(self.positives) else compared
        negatives = prepare(self.negatives) if len(self.negatives) else np.zeros((0, compared.shape[1]), np.float32)
        weight = linear_model(positives, negatives)
        store, items = self.searcher.index.store, scored.items
        model = np.array([float((prepare(store.vectors_of(items.ids[scored.members[s.case_row]])) @ weight).max())
                          for s in scored.scores])
        original = np.array([s.score for s in scored.scores])
        spread = model.std()
        if spread <= 1e-12:
            return
        shift = (model - model.mean()) / spread * (original.std() or 1.0)
        for score, extra in zip(scored.scores, shift):
            score.score = float(score.score + extra)


def search_again(searcher, query, feedback: Feedback, k: int = 10, filters: dict[str, str] | None = None, method: str = "maxsim",
                 strategy: str = DEFAULT_STRATEGY, prior: bool = True):
    """A new answer using the marks; the judged cases are left out of it. Its ``query.feedback`` holds every mark."""
    if strategy not in STRATEGIES:
        raise ParameterError(f"feedback strategy must be one of {', '.join(STRATEGIES)}, not '{strategy}'")
    index = searcher.index
    vectors = searcher.query_vectors(query)
    judged_rows = []
    for case_id in feedback.judged:
        case = index.catalog.case_by_id(case_id)
        if case is not None:
            judged_rows.append(case.row)
    relevant = _marked_items(index, feedback.relevant, vectors)
    not_relevant = _marked_items(index, feedback.not_relevant, vectors)
    spec = dataclasses.replace(query.spec, feedback=Feedback.from_json(feedback.to_json()), feedback_strategy=strategy)
    again = dataclasses.replace(query, spec=spec, exclude_rows=sorted(set(query.exclude_rows) | set(judged_rows)))
    rescore = None
    if strategy == "rocchio" and feedback:
        again.vectors = rocchio(vectors, relevant, not_relevant)
    elif strategy == "linear" and feedback:
        rescore = LinearRescorer(searcher, relevant, not_relevant)
    answer = searcher.search(again, k, filters, method, prior=prior, rescore=rescore)
    if prior and query.spec.prior is None and again.spec.prior is not None:
        query.spec = dataclasses.replace(query.spec, prior=again.spec.prior)  # what the search inferred, kept for the next
    return answer


def query_from_answer(answer: dict[str, Any], searcher: Searcher, path: str = "the answer") -> Query:
    """The query an answer JSON was made for, made again from its ``query`` (volume, ROI, slice, text, item).

    Its marks are not carried over (:func:`search_again` gives the query every mark); a segment query is made again as
    its box (the answer names the segment, not the label map it came from)."""
    from .queries import QuerySpec, load_volume_for_query, make_query

    try:
        spec = QuerySpec.from_json(answer.get("query") or {})
    except (KeyError, TypeError, ValueError, CBIRError) as error:
        raise ParameterError(f"{path}: its query cannot be read ({error})") from None
    spec = dataclasses.replace(spec, feedback=None, feedback_strategy=None)
    if spec.mode in ("text", "item"):
        return make_query(spec, None, searcher.index)
    if not spec.volume:
        raise ParameterError(f"{path}: its query ({spec.mode}) cannot be made again: it names no volume file")
    if spec.mode == "segment":
        spec = dataclasses.replace(spec, mode="roi", segment=None)
    return make_query(spec, load_volume_for_query(spec.volume), searcher.index)
