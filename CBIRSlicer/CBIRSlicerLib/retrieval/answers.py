"""A search's answer as typed values: the ranked cases, each with where it matched best.

The viewer, the thumbnails and the widget read these attributes; :meth:`SearchAnswer.to_json`
gives the CLI's JSON contract (key order and rounding as the CLI has always printed them,
checked against recorded answers by ``Testing/test_cli_answers.py``) and ``from_json`` reads it
back (saved searches, ``cbir search --from``). Values are rounded when an answer is made, so
what the viewer places and what the JSON says are the same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ..index.catalog import CaseRecord, ItemRecord
from .queries import QuerySpec
from .suggestion import NoSuggestion, Suggestion, suggestion_from_json

Point = tuple[float, float, float]


def _point(values: Sequence[float]) -> Point:
    """Three coordinates (RAS mm) rounded to a micrometre, as the answer carries them."""
    return tuple(round(float(v), 3) for v in values)  # type: ignore[return-value]


@dataclass(frozen=True)
class BestMatch:
    """Where a case matched best: its item (a slice, a tile or a blob crop), the item's place, and the match's focus."""

    axis: str
    slice_index: int
    ras: Point  # the item's centre
    kind: str  # slice, tile or blob
    item_id: int | None
    box: tuple[int, int, int, int]  # row0, col0, row1, col1 in the slice's pixels
    bounds_ras: tuple[Point, Point]  # the item's RAS corners (low, high)
    focus_ras: Point | None = None  # the similarity-weighted centre of the items around it (ranking.focus)
    placed_ras: Point | None = None  # the query's centre carried into the case by registration (placement), once placed
    # Once placed, what the match shows: "anatomy" (the registered place: the focus is placed_ras) or "look-alike" (an item
    # elsewhere clearly more alike, for a focal finding); None before placement.
    shown: str | None = None

    @classmethod
    def of_item(cls, item: ItemRecord, focus_ras: Sequence[float] | None = None,
                placed_ras: Sequence[float] | None = None, shown: str | None = None) -> BestMatch:
        """The best match an indexed item makes, with the focus found around it (and, once placed, the placed point and
        what the match shows)."""
        return cls(item.axis, int(item.slice_index), _point(item.ras), item.kind, int(item.id) if item.id is not None else None,
                   tuple(int(v) for v in item.box), (_point(item.low_ras), _point(item.high_ras)),
                   _point(focus_ras) if focus_ras is not None else None, _point(placed_ras) if placed_ras is not None else None,
                   shown)

    @property
    def spot(self) -> Point:
        """The point that stands for the match: its focus, else the item's centre."""
        return self.focus_ras if self.focus_ras is not None else self.ras

    def to_json(self) -> dict:
        """The JSON form of the CLI contract."""
        return {"axis": self.axis, "slice_index": self.slice_index, "ras": list(self.ras), "kind": self.kind,
                "item_id": self.item_id, "box": list(self.box), "bounds_ras": [list(self.bounds_ras[0]), list(self.bounds_ras[1])],
                "focus_ras": list(self.focus_ras) if self.focus_ras is not None else None,
                **({"placed_ras": list(self.placed_ras)} if self.placed_ras is not None else {}),
                **({"shown": self.shown} if self.shown is not None else {})}

    @classmethod
    def from_json(cls, data: dict) -> BestMatch:
        """Back from its JSON form."""
        def point(values):
            return _point(values) if values is not None else None

        return cls(data["axis"], int(data["slice_index"]), _point(data["ras"]), data["kind"],
                   int(data["item_id"]) if data["item_id"] is not None else None, tuple(int(v) for v in data["box"]),
                   (_point(data["bounds_ras"][0]), _point(data["bounds_ras"][1])), point(data.get("focus_ras")),
                   point(data.get("placed_ras")), data.get("shown"))


@dataclass(frozen=True)
class CaseResult:
    """One ranked case: who it is, its score (and per query image), first-stage votes, and its best match."""

    rank: int
    case_id: str
    source: str
    name: str
    score: float
    votes: int
    per_image_scores: list[float]
    modality: str | None
    labels: list[str]
    best_match: BestMatch
    body_part: str | None = None
    series_uid: str | None = None  # a DICOM series' UIDs: how a result from a DICOM database or a PACS is found again
    study_uid: str | None = None

    @classmethod
    def of_case(cls, rank: int, case: CaseRecord, score: float, votes: int, per_image_scores: list[float],
                best_match: BestMatch) -> CaseResult:
        """A result for a catalog case (its score rounded to 5 decimals, as the answer carries it)."""
        return cls(rank, case.case_id, case.source, case.name, round(float(score), 5), int(votes), list(per_image_scores),
                   case.modality, list(case.labels), best_match, case.body_part, case.series_uid, case.metadata.get("study_uid"))

    @property
    def title(self) -> str:
        """What to call the case: its name, else its id."""
        return self.name or self.case_id

    def to_json(self) -> dict:
        """The JSON form of the CLI contract."""
        return {"rank": self.rank, "case_id": self.case_id, "source": self.source, "name": self.name, "score": self.score,
                "votes": self.votes, "per_image_scores": list(self.per_image_scores), "modality": self.modality,
                "body_part": self.body_part, "labels": list(self.labels), "best_match": self.best_match.to_json(),
                **({"series_uid": self.series_uid, "study_uid": self.study_uid} if self.series_uid else {})}

    @classmethod
    def from_json(cls, data: dict) -> CaseResult:
        """Back from its JSON form."""
        return cls(int(data["rank"]), data["case_id"], data["source"], data["name"], float(data["score"]), int(data["votes"]),
                   [float(v) for v in data["per_image_scores"]], data["modality"], list(data["labels"]),
                   BestMatch.from_json(data["best_match"]), data.get("body_part"), data.get("series_uid"), data.get("study_uid"))


@dataclass(frozen=True)
class SearchAnswer:
    """A search's answer: the query (as made), the ranking method, the cases best first."""

    query: QuerySpec
    ranking: str
    results: list[CaseResult] = field(default_factory=list)
    note: str | None = None  # why there are no results, when the search itself could say (a filter no case matches)
    # A suggested finding or, on an index with labels but nothing to suggest, why not; None on an index without labels.
    suggestion: Suggestion | NoSuggestion | None = None

    def to_json(self) -> dict:
        """The CLI's JSON answer (``suggestion`` only on an index whose cases carry labels)."""
        out = {"query": self.query.to_json(), "ranking": self.ranking, "results": [r.to_json() for r in self.results],
               **({"note": self.note} if self.note else {})}
        if self.suggestion is not None:
            out["suggestion"] = self.suggestion.to_json()
        return out

    @classmethod
    def from_json(cls, data: dict) -> SearchAnswer:
        """Back from the CLI's JSON answer (``to_json`` of it gives the same JSON)."""
        return cls(QuerySpec.from_json(data["query"]), data["ranking"], [CaseResult.from_json(r) for r in data["results"]],
                   data.get("note"), suggestion_from_json(data.get("suggestion")))
