"""A suggested finding from the neighbours: a similarity-weighted vote over a label column of the top k cases.

The vote gives each labelled case among the top k a weight from its score (a softmax over the k scores
with the scores' own spread as temperature, so it does not depend on the model's score scale); a case
with several labels in the column splits its weight between them. The winner's share of the votes is
turned into a confidence by a calibration (Platt scaling on the logit of the share) fitted on the
leave-one-case-out votes of ``cbir evaluate``'s labelled queries and pinned into the index
(:func:`pin_calibration`); without one the confidence is the raw share, and the answer says so (a
calibration fitted on demand on pooled case vectors was measured worse than none). Nothing is suggested when the column has too few
labelled cases per class (:data:`MIN_PER_CLASS`, measured in ``docs/benchmarks.md``) or no case among
the top k carries a label; a suggestion always comes with its confidence and its supporting cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import Field, asdict, dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

import numpy as np

from ..errors import IndexCorruptError, ParameterError

if TYPE_CHECKING:  # for the annotations only (body_region loads with the first vote)
    from ..imaging.body_region import Kind
    from ..index.catalog import CaseRecord
    from ..index.searchable import SearchableIndex
    from .queries import QuerySpec

SUGGEST_K = 10
DEFAULT_COLUMNS = ("label", "finding")
# Labelled cases per class below which nothing is suggested: on the phantom cohorts (benchmarks/reading_room.py, 4
# kinds, chance 0.25) leave-one-case-out accuracy with 1 labelled case per class is 0.74-0.75, 17-20 points below
# all labels (0.92-0.96), and 5-6 % of queries find no labelled case in their top 10; with 2 per class it is
# 0.88-0.92, within 5 points (docs/benchmarks.md, "The reading room").
MIN_PER_CLASS = 2
# A suggestion needs this many labelled neighbours of the query's kind among the top k (fewer: it abstains, as it
# should for an abdominal MR among head CTs), and a calibrated confidence of at least MIN_CONFIDENCE (below it the
# suggestion is more likely wrong than right). Measured on real labelled cases (benchmarks/suggestions.py).
MIN_SIMILAR = 3
MIN_CONFIDENCE = 0.5
CALIBRATION_META = "suggestion_calibration"
UNCALIBRATED = "none: the raw vote share (run 'cbir evaluate' with a labels CSV on this index to calibrate it)"


class Ranked(Protocol):
    """What a vote reads of a ranked result (an answer's CaseResult, or a benchmark's own): its case and its score."""

    @property
    def case_id(self) -> str: ...
    @property
    def score(self) -> float: ...


class Answer(Protocol):
    """What a suggestion reads of a search's answer: answers.SearchAnswer, a dataclass whose ``suggestion`` field holds the
    suggestion made from it (named here by what it holds: answers imports this module)."""

    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    @property
    def query(self) -> QuerySpec: ...
    @property
    def results(self) -> Sequence[Ranked]: ...


AnswerT = TypeVar("AnswerT", bound=Answer)


def case_labels(case: CaseRecord, column: str) -> list[str]:
    """A case's values in a label column: 'label' is the case's labels; a catalog column or a metadata key otherwise."""
    if column in ("label", "labels"):
        return [str(v) for v in case.labels if str(v).strip()]
    value = getattr(case, column, None) if column in ("modality", "body_part", "name") else case.metadata.get(column)
    if value is None or value == "":
        return []
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def default_column(index: SearchableIndex) -> str | None:
    """The column a suggestion is made from when the user names none: 'label' or 'finding', if some case has it."""
    cases = index.catalog.cases()
    for column in DEFAULT_COLUMNS:
        if any(case_labels(case, column) for case in cases):
            return column
    return None


def vote(labels: Sequence[Sequence[str]], scores: Sequence[float]) -> dict[str, float]:
    """Each label's share of a similarity-weighted vote (shares sum to 1; unlabelled neighbours do not vote)."""
    weights = vote_weights(scores)
    tally: dict[str, float] = {}
    for names, weight in zip(labels, weights):
        for name in dict.fromkeys(names):
            tally[name] = tally.get(name, 0.0) + weight / len(set(names))
    total = sum(tally.values())
    return {name: value / total for name, value in sorted(tally.items(), key=lambda kv: -kv[1])} if total > 0 else {}


def vote_weights(scores: Sequence[float]) -> np.ndarray:
    """Softmax weights of scores at the temperature of their own spread (equal weights when the scores are equal)."""
    values = np.asarray(scores, float)
    if not len(values):
        return values
    spread = float(values.std())
    if spread <= 1e-9:
        return np.ones_like(values)
    weights: np.ndarray = np.exp((values - values.max()) / spread)
    return weights


@dataclass(frozen=True)
class Calibration:
    """Winner's vote share -> probability the suggestion is right: sigmoid(slope * logit(share) + intercept)."""

    slope: float = 1.0
    intercept: float = 0.0
    fitted_on: int = 0  # leave-one-case-out votes it was fitted on
    source: str = "identity"  # 'index cases (pooled vectors)', 'evaluation queries', or 'identity'
    min_per_class: int = MIN_PER_CLASS
    classes: dict[str, int] = field(default_factory=dict)  # label -> labelled cases, as counted when fitted

    def confidence(self, share: float) -> float:
        """The calibrated probability that the winner of a vote with this share is right."""
        share = min(max(float(share), 1e-4), 1 - 1e-4)
        return float(1.0 / (1.0 + math.exp(-(self.slope * math.log(share / (1 - share)) + self.intercept))))

    def to_json(self) -> dict[str, Any]:
        """JSON form (pinned in the index's catalog)."""
        return asdict(self)


def fit_calibration(shares: Sequence[float], correct: Sequence[bool], source: str, classes: dict[str, int] | None = None,
                    ridge: float = 1.0) -> Calibration:
    """Platt scaling of winner shares against right/wrong, shrunk towards the identity (slope 1, intercept 0).

    With few votes the ridge keeps the map near the raw shares; Newton steps on the penalised log-likelihood.
    """
    x = np.log(np.clip(np.asarray(shares, float), 1e-4, 1 - 1e-4) / (1 - np.clip(np.asarray(shares, float), 1e-4, 1 - 1e-4)))
    y = np.asarray(correct, float)
    theta = np.array([1.0, 0.0])
    if len(x):
        design = np.stack([x, np.ones_like(x)], axis=1)
        prior = np.array([1.0, 0.0])
        for _ in range(50):
            p = 1 / (1 + np.exp(-(design @ theta)))
            gradient = design.T @ (p - y) + ridge * (theta - prior)
            hessian = (design * (p * (1 - p))[:, None]).T @ design + ridge * np.eye(2)
            step = np.linalg.solve(hessian, gradient)
            theta = theta - step
            if np.abs(step).max() < 1e-8:
                break
    return Calibration(float(theta[0]), float(theta[1]), int(len(x)), source, MIN_PER_CLASS, dict(classes or {}))


def expected_calibration_error(confidences: Sequence[float], correct: Sequence[bool], bins: int = 10) -> float | None:
    """ECE: the mean over equal-width confidence bins of |accuracy - mean confidence|, weighted by the bin's share."""
    conf, right = np.asarray(confidences, float), np.asarray(correct, float)
    if not len(conf):
        return None
    which = np.minimum((conf * bins).astype(int), bins - 1)
    return float(sum(abs(right[which == b].mean() - conf[which == b].mean()) * np.mean(which == b)
                     for b in range(bins) if np.any(which == b)))


def balanced_accuracy(truth: Sequence[str], predicted: Sequence[str | None]) -> float | None:
    """Mean over true classes of the share predicted right (no prediction counts as wrong)."""
    classes = sorted(set(truth))
    if not classes:
        return None
    return float(np.mean([np.mean([p == t for t, p in zip(truth, predicted) if t == c]) for c in classes]))


@dataclass(frozen=True)
class Suggestion:
    """A suggested label, its calibrated confidence, and the cases behind it."""

    column: str
    label: str
    confidence: float
    share: float  # the winner's share of the similarity-weighted vote
    support: int  # cases among the top k voting for it
    considered: int  # the top k cases looked at
    labelled: int  # of those, cases with a label in the column
    supporting_cases: list[str]
    votes: dict[str, float]  # every label's share
    calibration: str

    def line(self) -> str:
        """The panel's line: 'Suggested: X (conf 0.82), based on 7 of 10 similar cases'."""
        return (f"Suggested: {self.label} (conf {self.confidence:.2f}), based on {self.support} of {self.considered} "
                "similar cases")

    def to_json(self) -> dict[str, Any]:
        """The CLI JSON's ``suggestion``."""
        return {"column": self.column, "label": self.label, "confidence": round(self.confidence, 3), "share": round(self.share, 3),
                "support": self.support, "considered": self.considered, "labelled": self.labelled,
                "supporting_cases": list(self.supporting_cases), "votes": {k: round(v, 3) for k, v in self.votes.items()},
                "calibration": self.calibration, "text": self.line()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Suggestion:
        """Back from the CLI JSON's ``suggestion`` (its ``text`` is made again by :meth:`line`)."""
        return cls(str(data["column"]), str(data["label"]), float(data["confidence"]), float(data["share"]), int(data["support"]),
                   int(data["considered"]), int(data["labelled"]), [str(c) for c in data["supporting_cases"]],
                   {str(k): float(v) for k, v in data["votes"].items()}, str(data["calibration"]))


@dataclass(frozen=True)
class NoSuggestion:
    """Why an index whose cases carry labels suggests nothing for an answer."""

    column: str
    reason: str

    def line(self) -> str:
        """The panel's line: 'No suggestion: why'."""
        return f"No suggestion: {self.reason}"

    def to_json(self) -> dict[str, Any]:
        """The CLI JSON's ``suggestion`` when there is none."""
        return {"column": self.column, "label": None, "reason": self.reason}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> NoSuggestion:
        """Back from the CLI JSON's ``suggestion`` when there is none."""
        return cls(str(data["column"]), str(data["reason"]))


def suggestion_from_json(data: dict[str, Any] | None) -> Suggestion | NoSuggestion | None:
    """An answer's suggestion back from JSON: a suggested label, why there is none, or None (an index without labels)."""
    if data is None:
        return None
    return NoSuggestion.from_json(data) if data.get("label") is None else Suggestion.from_json(data)


def class_counts(index: SearchableIndex, column: str) -> dict[str, int]:
    """Labelled cases per label of a column."""
    counts: dict[str, int] = {}
    for case in index.catalog.cases():
        for name in set(case_labels(case, column)):
            counts[name] = counts.get(name, 0) + 1
    return counts


def enough_labels(counts: dict[str, int], min_per_class: int = MIN_PER_CLASS) -> bool:
    """Whether a column can support a suggestion: at least two classes with ``min_per_class`` labelled cases each."""
    return sum(1 for n in counts.values() if n >= min_per_class) >= 2


def suggest_from(results: Iterable[Ranked], column: str, labels_of: Callable[[Ranked], list[str]], calibration: Calibration,
                 counts: dict[str, int], k: int = SUGGEST_K, similar: Callable[[Ranked], bool] | None = None) -> Suggestion | None:
    """The suggestion from ranked results (``labels_of(result)`` gives a result's labels); None when it cannot be made
    or abstains (:func:`decide` says why)."""
    found = decide(results, column, labels_of, calibration, counts, k, similar)
    return found if isinstance(found, Suggestion) else None


def decide(results: Iterable[Ranked], column: str, labels_of: Callable[[Ranked], list[str]], calibration: Calibration,
           counts: dict[str, int], k: int = SUGGEST_K, similar: Callable[[Ranked], bool] | None = None) -> Suggestion | str:
    """A suggestion, or why there is none: too few labels in the index, too few labelled neighbours of the query's kind
    (``similar(result)``: the case holds the query's anatomy, :func:`body_region.same_anatomy`; unlike ones do not
    vote), or a calibrated confidence below MIN_CONFIDENCE (more likely wrong than right: it abstains)."""
    top = list(results)[:k]
    if not enough_labels(counts, calibration.min_per_class):
        return (f"too few labelled cases: a suggestion needs at least two labels with {calibration.min_per_class} cases each "
                f"in '{column}' (the index has {dict(sorted(counts.items()))})")
    alike = [similar(r) if similar is not None else True for r in top]
    labels = [labels_of(r) if like else [] for r, like in zip(top, alike)]
    voters = sum(1 for names in labels if names)
    if voters < MIN_SIMILAR:
        unlike = sum(1 for r, like in zip(top, alike) if labels_of(r) and not like)
        return (f"too few similar labelled cases: {voters} of the top {len(top)} hold the query's anatomy and a label in "
                f"'{column}' (at least {MIN_SIMILAR} needed)" + (f"; {unlike} labelled cases of another kind do not vote"
                                                                 if unlike else ""))
    shares = vote(labels, [r.score for r in top])
    winner, share = next(iter(shares.items()))
    if counts.get(winner, 0) < calibration.min_per_class:
        return f"the vote's winner '{winner}' has fewer than {calibration.min_per_class} labelled cases in the index"
    confidence = calibration.confidence(share)
    if confidence < MIN_CONFIDENCE:
        return (f"low confidence: '{winner}' at {confidence:.2f} (vote share {share:.2f} among {voters} similar labelled "
                f"cases) is more likely wrong than right")
    supporting = [r.case_id for r, names in zip(top, labels) if winner in names]
    return Suggestion(column, winner, confidence, share, len(supporting), len(top), voters, supporting, shares,
                      calibration.source)


POOLED_ITEMS = 8192  # items per case averaged for its pooled vector (evenly spread): bounds the cost of a big case


def pooled_case_vectors(index: SearchableIndex, rows: Sequence[int], per_case: int = POOLED_ITEMS) -> np.ndarray:
    """Each case's items' mean vector (through the index's transform, if any), unit length: one row per case."""
    out = []
    excluded = index.excluded_ids()
    for row in rows:
        ids = index.catalog.item_ids([row])
        ids = ids[~np.isin(ids, excluded)]
        if len(ids) > per_case:
            ids = ids[np.linspace(0, len(ids) - 1, per_case).round().astype(int)]
        block = index.store.vectors_of(ids) if len(ids) else np.zeros((1, index.store.dim), np.float32)
        if index.transform is not None and len(ids):
            block = index.transform.apply(block)
        mean = np.asarray(block, np.float64).mean(axis=0)
        out.append(mean / (np.linalg.norm(mean) or 1.0))
    return np.array(out).reshape(len(out), -1)


@dataclass
class CaseVotes:
    """Leave-one-case-out k-NN votes over pooled case vectors: per case its labels and vote (empty when unlabelled)."""

    case_ids: list[str]
    labels: list[list[str]]
    votes: list[dict[str, float]]
    vectors: np.ndarray


def _row(case: CaseRecord) -> int:
    """A stored case's catalog row (every case a catalog reads back has one)."""
    if case.row is None:
        raise IndexCorruptError(f"the catalog's case {case.case_id} has no row")
    return case.row


def loco_case_votes(index: SearchableIndex, column: str, k: int = SUGGEST_K) -> CaseVotes:
    """Every case's vote from its k most similar labelled cases (itself left out), on pooled case vectors."""
    cases = index.catalog.cases()
    vectors = pooled_case_vectors(index, [_row(c) for c in cases])
    labels = [case_labels(c, column) for c in cases]
    labelled = np.array([bool(names) for names in labels])
    votes = []
    similarity = vectors @ vectors.T if len(cases) else np.zeros((0, 0))
    for n in range(len(cases)):
        scores = np.where(labelled, similarity[n], -np.inf)
        scores[n] = -np.inf
        order = [int(j) for j in np.argsort(-scores)[:k] if np.isfinite(scores[j])]
        votes.append(vote([labels[j] for j in order], [float(similarity[n, j]) for j in order]))
    return CaseVotes([c.case_id for c in cases], labels, votes, vectors)


def index_calibration(index: SearchableIndex, column: str, k: int = SUGGEST_K) -> Calibration:
    """The calibration pinned for this column by ``cbir evaluate``, else none: the confidence is then the raw vote share.

    A calibration fitted on demand on the index's own leave-one-case-out votes of pooled case vectors
    (``benchmarks/reading_room.py``) made region queries' confidences worse, not better (expected calibration error
    0.25 and 0.62 against 0.14 and 0.19 for the raw share on the phantom cohorts; docs/benchmarks.md), so it is
    measured but not used.
    """
    pinned = (index.catalog.meta(CALIBRATION_META) or {}).get(column)
    if pinned:
        return Calibration(**pinned)
    return Calibration(source=UNCALIBRATED, classes=class_counts(index, column))


def pin_calibration(index: SearchableIndex, column: str, calibration: Calibration) -> None:
    """Keep a calibration in the index's catalog for later searches (needs the index open for writing)."""
    pinned = dict(index.catalog.meta(CALIBRATION_META) or {})
    pinned[column] = calibration.to_json()
    with index.catalog.transaction():
        index.catalog.set_meta(CALIBRATION_META, pinned)


class Suggester:
    """Suggestions for one index and label column; the calibration is fitted once, on first use."""

    def __init__(self, index: SearchableIndex, column: str | None = None, k: int = SUGGEST_K):
        self.index, self.k = index, k
        self.column = column or default_column(index)
        if column and not class_counts(index, column):
            raise ParameterError(f"--suggest {column}: no case of the index {index.folder} has a value in that column "
                                 "(use 'label' for the labels given at index time, or a metadata field)")
        self._calibration: Calibration | None = None
        self._counts: dict[str, int] | None = None
        self._labels: dict[str, list[str]] = {}
        self._kinds: dict[str, Kind | None] = {}
        self.reason: str | None = None  # why the last answer got no suggestion

    @property
    def calibration(self) -> Calibration:
        """The column's pinned calibration, else none (the raw share); none either without a column."""
        if self._calibration is None:
            self._calibration = (index_calibration(self.index, self.column, self.k) if self.column is not None
                                 else Calibration(source=UNCALIBRATED))
        return self._calibration

    def labels_of(self, result: Ranked) -> list[str]:
        """A result's labels in the column (none without a column)."""
        if self.column is None:
            return []
        if result.case_id not in self._labels:
            case = self.index.catalog.case_by_id(result.case_id)
            self._labels[result.case_id] = case_labels(case, self.column) if case is not None else []
        return self._labels[result.case_id]

    def similar(self, answer: Answer) -> Callable[[Ranked], bool] | None:
        """Whether a result holds the query's anatomy (its kind, as the search's prior recorded it); None: all alike."""
        from ..imaging import body_region

        prior = answer.query.prior
        if prior is None:
            return None
        wanted = prior.kind()

        def alike(result: Ranked) -> bool:
            if result.case_id not in self._kinds:
                case = self.index.catalog.case_by_id(result.case_id)
                self._kinds[result.case_id] = (body_region.case_kind(case.modality, case.body_part, case.metadata)
                                               if case is not None else None)
            kind = self._kinds[result.case_id]
            # strictly the query's anatomy (the levels decide where both have them; the prior's order lets a shared
            # region suffice); the modality counts for the search's order, not here: a finding holds across CT and MR
            return kind is not None and body_region.same_anatomy(wanted, kind)

        return alike

    def suggest(self, answer: Answer) -> Suggestion | None:
        """The answer's suggestion, or None (no column, too few labels, too few similar labelled neighbours, low
        confidence: ``reason`` says which)."""
        self.reason = None
        if self.column is None:
            return None
        if self._counts is None:
            self._counts = class_counts(self.index, self.column)
        found = decide(answer.results, self.column, self.labels_of, self.calibration, self._counts, self.k,
                       self.similar(answer))
        if isinstance(found, Suggestion):
            return found
        self.reason = found
        return None

    def attach(self, answer: AnswerT) -> AnswerT:
        """The answer with its suggestion, or with why there is none; unchanged when the index has no label column."""
        import dataclasses

        if self.column is None:
            return answer
        found = self.suggest(answer)
        if found is None:
            return dataclasses.replace(answer, suggestion=NoSuggestion(self.column, self.reason or "no suggestion"))
        return dataclasses.replace(answer, suggestion=found)


def labels_to_ask_for(index: SearchableIndex, column: str | None = None, count: int = 10,
                      k: int = SUGGEST_K) -> list[dict[str, Any]]:
    """Unlabelled cases whose label would help most: uncertain under the current vote, spread over the embedding space.

    Greedy: each pick maximises uncertainty x distance (1 - cosine of pooled vectors) to the nearest labelled or
    already picked case. Uncertainty is 1 - (top share - second share); a case with no labelled neighbour scores 1.
    """
    column = column or default_column(index) or "label"
    votes = loco_case_votes(index, column, k)
    labelled = [n for n, names in enumerate(votes.labels) if names]
    pool = [n for n, names in enumerate(votes.labels) if not names]
    uncertainty: dict[int, float] = {}
    for n in pool:
        shares = list(votes.votes[n].values())
        uncertainty[n] = 1.0 - (shares[0] - (shares[1] if len(shares) > 1 else 0.0)) if shares else 1.0
    chosen: list[int] = []
    out = []
    while pool and len(chosen) < count:
        anchors = labelled + chosen
        if anchors:
            distance = 1.0 - (votes.vectors[pool] @ votes.vectors[anchors].T).max(axis=1)
        else:
            distance = np.ones(len(pool))
        value = np.array([uncertainty[n] for n in pool]) * np.maximum(distance, 1e-6)
        best = int(np.argmax(value))
        pick = pool.pop(best)
        chosen.append(pick)
        out.append({"case_id": votes.case_ids[pick], "uncertainty": round(uncertainty[pick], 3),
                    "distance": round(float(distance[best]), 4), "value": round(float(value[best]), 5),
                    "current_vote": {k: round(v, 3) for k, v in votes.votes[pick].items()}})
    return out
