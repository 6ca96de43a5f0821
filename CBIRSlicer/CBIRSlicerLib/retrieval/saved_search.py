"""A search a user keeps: what was asked (the query volume by path and SHA-256, the ROI), with which settings, on which
index (its folder and manifest identity), what came back, and what the user said about it (feedback).

Saved as versioned JSON (``format: cbirslicer-search``, ``format_version: 1``; docs/design.md has the fields), written
atomically. A saved search re-runs against the same index or a newer version of it (:func:`rerun`), which refuses a
query file that changed since, an index built with another model, and reports which cases came and went
(:func:`compare`). The answer is kept exactly as the CLI prints it (``SearchAnswer.to_json``) and read back into the
typed answer (``SearchAnswer.from_json``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import replaced, write_json_atomically
from ..clock import now_utc
from ..digests import file_sha256
from ..errors import CBIRError, IndexMismatchError, InputError, ParameterError
from ..imaging.slicing import AXES, MAX_MARGIN_MM
from ..index.location import is_server_location, open_index
from ..index.searchable import SearchableIndex
from ..json_input import read_json
from .answers import SearchAnswer
from .marks import Feedback  # one type for marks: relevance feedback's (case id -> item id), kept as it is
from .queries import QUERY_MODES, VOLUME_MODES, QuerySpec
from .ranking import MAX_RESULTS, METHODS

FORMAT = "cbirslicer-search"
FORMAT_VERSION = 1


def content_sha256(path: str) -> str:
    """SHA-256 of a query file; of a folder (a DICOM series), of its files' digests in name order."""
    if os.path.isdir(path):
        import hashlib

        digest = hashlib.sha256()
        for name in sorted(os.listdir(path)):
            inner = os.path.join(path, name)
            if os.path.isfile(inner):
                digest.update(f"{name}:{file_sha256(inner)}\n".encode())
        return digest.hexdigest()
    return file_sha256(path)


@dataclass(frozen=True)
class FileRef:
    """A file the search depends on: its absolute path and its SHA-256 when saved (a changed file is noticed)."""

    path: str
    sha256: str

    @classmethod
    def of(cls, path: str) -> FileRef:
        """A reference to an existing file, hashed now."""
        path = os.path.abspath(path)
        if not os.path.exists(path):
            raise InputError(path, "does not exist")
        return cls(path, content_sha256(path))

    def to_json(self, beside: str | None = None) -> dict:
        """Path, file URI and digest; with ``beside`` (the JSON's folder) also the path relative to it."""
        data = {"path": self.path, "uri": Path(self.path).as_uri(), "sha256": self.sha256}
        if beside:
            try:
                data["relative"] = os.path.relpath(self.path, beside)
            except ValueError:  # another drive (Windows): no relative path
                pass
        return data

    @classmethod
    def from_json(cls, data: dict, beside: str | None = None) -> FileRef:
        """Back from JSON; a file no longer at its path but at the same place relative to the JSON (a moved folder) is found."""
        path = data["path"]
        if not os.path.exists(path) and beside and data.get("relative"):
            moved = os.path.normpath(os.path.join(beside, data["relative"]))
            if os.path.exists(moved):
                path = moved
        return cls(path, data["sha256"])

    def check(self, what: str) -> None:
        """Refuse a file that is gone or whose content changed since the search was saved."""
        if not os.path.exists(self.path):
            raise InputError(self.path, f"{what} of the saved search does not exist any more (moved or deleted)")
        if content_sha256(self.path) != self.sha256:
            raise InputError(self.path, f"{what} of the saved search changed since it was saved (SHA-256 differs); "
                                        "search it again and save a new search")


@dataclass
class SavedQuery:
    """What was asked (:class:`queries.QuerySpec`) and the files it was asked of: the query volume and, for a segment
    from a label map (``--roi-mask``), that map and its label, each with its SHA-256 when saved."""

    spec: QuerySpec
    volume: FileRef | None = None
    mask: FileRef | None = None
    mask_label: int | None = None

    @property
    def mode(self) -> str:
        """The spec's mode."""
        return self.spec.mode

    def to_json(self, beside: str | None = None) -> dict:
        """The JSON form (format 1: the mode as the answer says it, the files, the box, the slice's point, the phrase, the
        item, and the answer's ``query`` as ``description``)."""
        spec = self.spec
        roi = spec.to_json().get("roi_ras")
        return {"mode": spec.to_json()["mode"], "volume": self.volume.to_json(beside) if self.volume else None,
                "roi": ({"ras": roi, **({"mask": self.mask.to_json(beside), "label": self.mask_label} if self.mask else {})}
                        if roi else None),
                "slice_ras": spec.to_json().get("ras") if spec.mode == "slice" else None, "text": spec.text, "item": spec.item,
                "description": spec.to_json()}

    @classmethod
    def from_json(cls, data: dict, beside: str | None = None) -> SavedQuery:
        """Back from JSON; the spec is the description's, its volume wherever the file was found again."""
        roi = data.get("roi") or {}
        volume = FileRef.from_json(data["volume"], beside) if data.get("volume") else None
        described = dict(data.get("description") or {})
        if not described:  # the fields alone
            described = {"mode": data["mode"], "roi_ras": roi.get("ras"), "ras": data.get("slice_ras"), "text": data.get("text"),
                         "item": data.get("item")}
        described["mode"] = data["mode"] if described.get("mode") is None else described["mode"]
        if described["mode"] not in QUERY_MODES:
            raise ValueError(f"query mode '{described['mode']}' is not one of {', '.join(QUERY_MODES)}")
        spec = QuerySpec.from_json(described)
        if volume is not None:
            spec = dataclasses.replace(spec, volume=volume.path)
        return cls(spec, volume, FileRef.from_json(roi["mask"], beside) if roi.get("mask") else None, roi.get("label"))


@dataclass
class SearchSettings:
    """How the search was made: the model (as loaded, and its fingerprint digest), k, axis, ranking, prior, filters, placement."""

    model: str
    model_digest: str
    k: int = 10
    axis: str = "axial"
    ranking: str = "maxsim"
    prior: bool = True
    filters: dict[str, str] = field(default_factory=dict)
    placement: bool = True
    margin_mm: float = 0.0

    def to_json(self) -> dict:
        """The JSON form."""
        return {"model": self.model, "model_digest": self.model_digest, "k": self.k, "axis": self.axis, "ranking": self.ranking,
                "prior": self.prior, "filters": dict(self.filters), "placement": self.placement, "margin_mm": self.margin_mm}

    @classmethod
    def from_json(cls, data: dict) -> SearchSettings:
        """Back from JSON; a k, axis, ranking or margin no search could have used is a ValueError saying which."""
        settings = cls(str(data["model"]), str(data["model_digest"]), data["k"], str(data["axis"]), str(data["ranking"]),
                       bool(data["prior"]), {str(k): str(v) for k, v in (data.get("filters") or {}).items()},
                       bool(data["placement"]), float(data.get("margin_mm", 0.0)))
        if isinstance(settings.k, bool) or not isinstance(settings.k, int) or not 1 <= settings.k <= MAX_RESULTS:
            raise ValueError(f"settings.k is {settings.k!r}: a search asks for 1 to {MAX_RESULTS} cases")
        if not math.isfinite(settings.margin_mm) or not 0 <= settings.margin_mm <= MAX_MARGIN_MM:
            raise ValueError(f"settings.margin_mm is {settings.margin_mm}: a margin is 0 to {MAX_MARGIN_MM:g} mm")
        if settings.axis not in AXES or settings.ranking not in METHODS:
            raise ValueError(f"settings axis '{settings.axis}' or ranking '{settings.ranking}' is not one this CBIRSlicer knows "
                             f"({', '.join(AXES)}; {', '.join(METHODS)})")
        return settings


@dataclass
class IndexRef:
    """The index searched: its folder and what identifies its version (created, updated, the manifest's own checksum)."""

    path: str
    created: str
    updated: str
    manifest_sha256: str | None
    model: str
    model_digest: str
    cases: int

    @classmethod
    def of(cls, index: SearchableIndex) -> IndexRef:
        """The reference of an open index."""
        manifest = index.manifest
        return cls(index.folder, manifest["created"], manifest["updated"], manifest.get("self_sha256"), manifest["model"]["name"],
                   manifest["model"]["digest"], int(manifest["counts"]["cases"]))

    def to_json(self) -> dict:
        """The JSON form."""
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict) -> IndexRef:
        """Back from JSON."""
        return cls(str(data["path"]), str(data["created"]), str(data["updated"]), data.get("manifest_sha256"), str(data["model"]),
                   str(data["model_digest"]), int(data["cases"]))

    def relation(self, other: IndexRef) -> str:
        """How another index stands to this one: 'same' (unchanged), 'newer' (the same index, written since) or 'other'."""
        if other.created != self.created:
            return "other"
        return "same" if other.manifest_sha256 == self.manifest_sha256 else "newer"


@dataclass
class SavedSearch:
    """A kept search: query, settings, index, answer, feedback, and a suggestion kept as it was given."""

    query: SavedQuery
    settings: SearchSettings
    index: IndexRef
    answer: SearchAnswer
    feedback: Feedback = field(default_factory=Feedback)
    suggestion: dict | None = None
    saved: str = field(default_factory=now_utc)
    name: str | None = None
    path: str | None = field(default=None, compare=False)  # the file it was read from (not written into it)

    def to_json(self, beside: str | None = None) -> dict:
        """The file's JSON (``beside``: the folder it goes to, for paths relative to it)."""
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "saved": self.saved, "name": self.name,
                "query": self.query.to_json(beside), "settings": self.settings.to_json(), "index": self.index.to_json(),
                "answer": self.answer.to_json(), "feedback": self.feedback.to_json(), "suggestion": self.suggestion}

    def save(self, path: str) -> str:
        """Write the search to a JSON file atomically (a temporary file renamed over it); returns the absolute path."""
        path = os.path.abspath(path)
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        write_json_atomically(path, self.to_json(folder))
        return path

    @classmethod
    def from_json(cls, data: dict, beside: str | None = None) -> SavedSearch:
        """Back from the file's JSON (raises KeyError / ValueError / TypeError on a malformed one; :func:`load` names the file)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a saved search (no \"format\": \"{FORMAT}\")")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"saved-search format {version} is newer than this CBIRSlicer reads ({FORMAT_VERSION}); update it")
        return cls(SavedQuery.from_json(data["query"], beside), SearchSettings.from_json(data["settings"]),
                   IndexRef.from_json(data["index"]), SearchAnswer.from_json(data["answer"]), Feedback.from_json(data.get("feedback")),
                   data.get("suggestion"), str(data.get("saved") or ""), data.get("name"))

    @classmethod
    def load(cls, path: str) -> SavedSearch:
        """A saved search from its file; a missing, unreadable or malformed file is one InputError naming it and the problem."""
        path = os.path.abspath(path)
        data = read_json(path, "saved search")
        try:
            saved = cls.from_json(data, os.path.dirname(path))
            saved.path = path
            return saved
        except KeyError as error:
            raise InputError(path, f"saved search lacks the field {error}") from None
        except (ValueError, TypeError, IndexError, AttributeError, CBIRError) as error:
            raise InputError(path, f"saved search is malformed: {error}") from None


def make(query, answer: SearchAnswer, index: SearchableIndex, settings: SearchSettings, mask: tuple[str, int] | None = None,
         feedback: Feedback | None = None, suggestion: dict | None = None, name: str | None = None) -> SavedSearch:
    """A saved search of a search just made (``query``: the queries.Query it answered; ``mask``: (label map, label))."""
    spec = query.spec
    if spec.mode in VOLUME_MODES and not spec.volume:
        raise ParameterError("the query volume has no file behind it; save it to a file first, so the saved search can find it again")
    saved = SavedQuery(spec, FileRef.of(spec.volume) if spec.volume else None, FileRef.of(mask[0]) if mask else None,
                       int(mask[1]) if mask else None)
    return SavedSearch(saved, settings, IndexRef.of(index), answer, feedback or Feedback(), suggestion, name=name)


def build_query(saved: SavedSearch, index: SearchableIndex, loader=None):
    """The query of a saved search, made again from its files (checked unchanged first) on an index."""
    from ..imaging.roi import segment_of_label
    from . import queries

    asked, settings = saved.query, saved.settings
    # Made afresh, as when it was first asked: the kind ranked first inferred again, the marks kept by the saved search.
    spec = dataclasses.replace(asked.spec, axis=settings.axis, margin_mm=settings.margin_mm, prior=None, feedback=None,
                               feedback_strategy=None)
    if spec.mode == "item" and index.manifest["created"] != saved.index.created:
        raise ParameterError(f"{index.folder}: a 'more like this' search names an item of the index it was made on "
                             f"({saved.index.path}); it re-runs only there")
    if spec.mode in ("text", "item"):
        return queries.make_query(spec, None, index)
    asked.volume.check("the query volume")
    segment = None
    if asked.mask is not None:
        asked.mask.check("the ROI label map")
        segment = segment_of_label(asked.mask.path, int(asked.mask_label or 1)) if spec.mode == "segment" else None
    return queries.make_query(spec, (loader or queries.load_volume_for_query)(asked.volume.path), index, segment)


def check_model(saved: SavedSearch, index: SearchableIndex) -> None:
    """Refuse an index built with another model than the saved search used (their scores and cases do not compare)."""
    digest = index.manifest["model"]["digest"]
    if digest != saved.settings.model_digest:
        raise IndexMismatchError(f"{saved.path or 'the saved search'}: made with model '{saved.settings.model}' "
                                 f"({saved.settings.model_digest}), but the index {index.folder} is built with model "
                                 f"'{index.model_name()}' ({digest}); re-run it on an index of that model, or search this index anew")


@dataclass
class AnswerChanges:
    """What changed between a saved answer and a new one: cases new and dropped, cases that moved, the index's relation."""

    new: list[str]
    dropped: list[str]
    moved: list[tuple[str, int, int]]  # case id, rank before, rank now
    index: str  # same, newer or other (IndexRef.relation)

    @property
    def same(self) -> bool:
        """Whether the same cases came back in the same order."""
        return not self.new and not self.dropped and not self.moved

    def summary(self) -> str:
        """One line for the terminal or the panel."""
        where = {"same": "the same index", "newer": "a newer version of the index", "other": "another index"}[self.index]
        return f"re-run on {where}: {self.brief()}"

    def brief(self) -> str:
        """What changed, in a few words (no index relation)."""
        if self.same:
            return "the same cases in the same order"
        return f"{len(self.new)} new, {len(self.dropped)} dropped, {len(self.moved)} moved"

    def to_json(self) -> dict:
        """The JSON form."""
        return {"index": self.index, "same": self.same, "new": self.new, "dropped": self.dropped,
                "moved": [{"case_id": c, "was": a, "now": b} for c, a, b in self.moved]}


def compare(before: SearchAnswer, after: SearchAnswer, index: str = "same") -> AnswerChanges:
    """The changes from one answer to another, by case id."""
    was = {r.case_id: r.rank for r in before.results}
    now = {r.case_id: r.rank for r in after.results}
    return AnswerChanges([c for c in now if c not in was], [c for c in was if c not in now],
                         [(c, was[c], now[c]) for c in now if c in was and was[c] != now[c]], index)


@dataclass
class Rerun:
    """A saved search run again: the new answer, what changed, and the index it ran on."""

    answer: SearchAnswer
    changes: AnswerChanges
    index: IndexRef


def rerun(saved: SavedSearch, index_folder: str | None = None, searcher=None, loader=None, device: str | None = None) -> Rerun:
    """Run a saved search again, on its own index (default) or another folder (a newer copy of it); compare the answers.

    ``searcher``: a Searcher already open on the index (the model is then not loaded again).
    """
    from .search import Searcher

    if searcher is None:
        folder = index_folder or saved.index.path
        if not is_server_location(folder) and not os.path.isdir(folder):
            raise InputError(folder, "the index of the saved search is not there; give another with --index")
        index = open_index(folder)
        check_model(saved, index)
        searcher = Searcher(index, model=saved.settings.model, device=device)
    index = searcher.index
    check_model(saved, index)
    query = build_query(saved, index, loader)
    settings = saved.settings
    answer = searcher.search(query, settings.k, settings.filters or None, settings.ranking, prior=settings.prior)
    if settings.placement:
        answer = searcher.place(query, answer, loader)
    ref = IndexRef.of(index)
    return Rerun(answer, compare(saved.answer, answer, saved.index.relation(ref)), ref)


def with_answer(saved: SavedSearch, run: Rerun) -> SavedSearch:
    """The saved search updated with a re-run's answer and index (feedback and suggestion kept)."""
    return dataclasses.replace(saved, answer=run.answer, index=run.index, saved=now_utc())



CSV_COLUMNS = ["rank", "case_id", "name", "score", "body_part", "modality", "match_r", "match_a", "match_s", "match_axis",
               "match_kind", "path"]


_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(text: str) -> str:
    """A text cell a spreadsheet will not run (OWASP CSV injection): one starting with = + - @, a tab or a carriage return
    gets a leading single quote, unless it is a plain number (-3.2 stays a number)."""
    text = str(text)
    if text.startswith(_FORMULA_STARTS) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def write_csv(answer: SearchAnswer, path: str, labels: dict[str, dict[str, str]] | None = None) -> str:
    """One row per result (rank, case, score, body part, modality, the match's RAS point, path, then one column per label).

    The match's point is the one the viewer centres on (:attr:`BestMatch.spot`: the placed or similarity-weighted
    focus, else the best item's centre). Written atomically; returns the absolute path.
    """
    import csv

    labels = labels or {}
    columns = sorted({c for values in labels.values() for c in values}, key=lambda c: (c != "label", c.lower()))
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with replaced(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(CSV_COLUMNS + [safe_cell(c) for c in columns])
        for result in answer.results:
            spot = result.best_match.spot
            mine = labels.get(result.case_id, {})
            writer.writerow([result.rank, *map(safe_cell, (result.case_id, result.name)), f"{result.score:.5f}",
                             *map(safe_cell, (result.body_part or "", result.modality or "")), *(f"{v:.3f}" for v in spot),
                             *map(safe_cell, (result.best_match.axis, result.best_match.kind, result.source)),
                             *(safe_cell(mine.get(c, "")) for c in columns)])
    return path
