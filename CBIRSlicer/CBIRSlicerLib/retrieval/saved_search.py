"""A search a user keeps: what was asked (the query volume by path and SHA-256, the ROI), with which settings, on which
index (its folder and manifest identity), what came back, and what the user said about it (feedback).

Saved as versioned JSON (``format: cbirslicer-search``, ``format_version: 1``; docs/design.md has the fields), written
atomically. A saved search re-runs against the same index or a newer version of it (:func:`rerun`), which refuses a
query file that changed since, an index built with another model, and reports which cases came and went
(:func:`compare`). The answer is kept exactly as the CLI prints it (``SearchAnswer.to_json``) and read back into the
typed answer (:func:`answer_from_json`).
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..digests import file_sha256
from ..errors import IndexMismatchError, InputError, ParameterError
from ..imaging.roi import RoiBox
from ..index.location import is_server_location, open_index
from ..index.searchable import SearchableIndex
from .answers import BestMatch, CaseResult, SearchAnswer
from .feedback import Feedback  # one type for marks: relevance feedback's (case id -> item id), kept as it is

FORMAT = "cbirslicer-search"
FORMAT_VERSION = 1
QUERY_MODES = ("roi", "slice", "volume", "text", "item")


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


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
class QuerySpec:
    """What was asked: the mode, the query volume (or a phrase, or an item), and where in it."""

    mode: str
    volume: FileRef | None = None
    roi_ras: list[float] | None = None  # centre and size (RAS mm) of the box searched, however it was given
    mask: FileRef | None = None  # a label map the box was taken from (--roi-mask), with its label
    mask_label: int | None = None
    slice_ras: list[float] | None = None
    text: str | None = None
    item: int | None = None
    description: dict = field(default_factory=dict)  # the answer's query description, as the search made it

    def to_json(self, beside: str | None = None) -> dict:
        """The JSON form."""
        return {"mode": self.mode, "volume": self.volume.to_json(beside) if self.volume else None,
                "roi": ({"ras": self.roi_ras, **({"mask": self.mask.to_json(beside), "label": self.mask_label} if self.mask else {})}
                        if self.roi_ras else None),
                "slice_ras": self.slice_ras, "text": self.text, "item": self.item, "description": self.description}

    @classmethod
    def from_json(cls, data: dict, beside: str | None = None) -> QuerySpec:
        """Back from JSON."""
        roi = data.get("roi") or {}
        mode = data["mode"]
        if mode not in QUERY_MODES:
            raise ValueError(f"query mode '{mode}' is not one of {', '.join(QUERY_MODES)}")
        return cls(mode, FileRef.from_json(data["volume"], beside) if data.get("volume") else None,
                   [float(v) for v in roi["ras"]] if roi.get("ras") else None,
                   FileRef.from_json(roi["mask"], beside) if roi.get("mask") else None, roi.get("label"),
                   data.get("slice_ras"), data.get("text"), data.get("item"), dict(data.get("description") or {}))


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
        """Back from JSON."""
        return cls(str(data["model"]), str(data["model_digest"]), int(data["k"]), str(data["axis"]), str(data["ranking"]),
                   bool(data["prior"]), {str(k): str(v) for k, v in (data.get("filters") or {}).items()}, bool(data["placement"]),
                   float(data.get("margin_mm", 0.0)))


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


def best_match_from_json(data: dict) -> BestMatch:
    """A best match back from its JSON form."""
    def point(values):
        return tuple(float(v) for v in values) if values is not None else None

    return BestMatch(data["axis"], int(data["slice_index"]), point(data["ras"]), data["kind"], data["item_id"],
                     tuple(int(v) for v in data["box"]), (point(data["bounds_ras"][0]), point(data["bounds_ras"][1])),
                     point(data.get("focus_ras")), point(data.get("placed_ras")), data.get("shown"))


def answer_from_json(data: dict) -> SearchAnswer:
    """A typed answer back from the CLI's JSON answer (``to_json`` of it gives the same JSON)."""
    results = [CaseResult(int(r["rank"]), r["case_id"], r["source"], r["name"], float(r["score"]), int(r["votes"]),
                          [float(v) for v in r["per_image_scores"]], r["modality"], list(r["labels"]),
                          best_match_from_json(r["best_match"]), r.get("body_part")) for r in data["results"]]
    return SearchAnswer(dict(data["query"]), data["ranking"], results, data.get("note"))


@dataclass
class SavedSearch:
    """A kept search: query, settings, index, answer, feedback, and a suggestion kept as it was given."""

    query: QuerySpec
    settings: SearchSettings
    index: IndexRef
    answer: SearchAnswer
    feedback: Feedback = field(default_factory=Feedback)
    suggestion: dict | None = None
    saved: str = field(default_factory=_now)
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
        temporary = f"{path}.tmp-{os.getpid()}"
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump(self.to_json(folder), handle, indent=1, allow_nan=False)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            if os.path.exists(temporary):
                os.remove(temporary)
        return path

    @classmethod
    def from_json(cls, data: dict, beside: str | None = None) -> SavedSearch:
        """Back from the file's JSON (raises KeyError / ValueError / TypeError on a malformed one; :func:`load` names the file)."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a saved search (no \"format\": \"{FORMAT}\")")
        version = data.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ValueError(f"saved-search format {version} is newer than this CBIRSlicer reads ({FORMAT_VERSION}); update it")
        return cls(QuerySpec.from_json(data["query"], beside), SearchSettings.from_json(data["settings"]),
                   IndexRef.from_json(data["index"]), answer_from_json(data["answer"]), Feedback.from_json(data.get("feedback")),
                   data.get("suggestion"), str(data.get("saved") or ""), data.get("name"))

    @classmethod
    def load(cls, path: str) -> SavedSearch:
        """A saved search from its file; a missing, unreadable or malformed file is one InputError naming it and the problem."""
        path = os.path.abspath(path)
        try:
            with open(path, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            raise InputError(path, "saved search does not exist") from None
        except UnicodeDecodeError as error:
            raise InputError(path, f"saved search is not UTF-8 text (byte {error.start})") from None
        except json.JSONDecodeError as error:
            raise InputError(path, f"saved search is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno})") from None
        except OSError as error:
            raise InputError(path, f"saved search cannot be read ({error.strerror or error})") from None
        try:
            saved = cls.from_json(data, os.path.dirname(path))
            saved.path = path
            return saved
        except KeyError as error:
            raise InputError(path, f"saved search lacks the field {error}") from None
        except (ValueError, TypeError, IndexError, AttributeError) as error:
            raise InputError(path, f"saved search is malformed: {error}") from None


def make(query, answer: SearchAnswer, index: SearchableIndex, settings: SearchSettings, mask: tuple[str, int] | None = None,
         feedback: Feedback | None = None, suggestion: dict | None = None, name: str | None = None) -> SavedSearch:
    """A saved search of a search just made (``query``: the retrieval.search.Query it answered; ``mask``: (label map, label))."""
    description = dict(query.description)
    mode = description.get("mode")
    if mode not in QUERY_MODES:
        raise ParameterError(f"a search of mode '{mode}' cannot be saved")
    volume = description.get("volume")
    if mode in ("roi", "slice", "volume") and not volume:
        raise ParameterError("the query volume has no file behind it; save it to a file first, so the saved search can find it again")
    spec = QuerySpec(mode, FileRef.of(volume) if volume else None, description.get("roi_ras"),
                     FileRef.of(mask[0]) if mask else None, int(mask[1]) if mask else None,
                     description.get("ras") if mode == "slice" else None, description.get("text"), description.get("item"),
                     description)
    return SavedSearch(spec, settings, IndexRef.of(index), answer, feedback or Feedback(), suggestion, name=name)


def build_query(saved: SavedSearch, index: SearchableIndex, embedder, loader=None):
    """The query of a saved search, made again from its files (checked unchanged first) on an index."""
    from . import queries

    spec, settings = saved.query, saved.settings
    if spec.mode == "text":
        return queries.text_query(spec.text or "", embedder)
    if spec.mode == "item":
        if index.manifest["created"] != saved.index.created:
            raise ParameterError(f"{index.folder}: a 'more like this' search names an item of the index it was made on "
                                 f"({saved.index.path}); it re-runs only there")
        return queries.item_query(index, int(spec.item))
    spec.volume.check("the query volume")
    if spec.mask is not None:
        spec.mask.check("the ROI label map")
    volume = (loader or queries.load_volume_for_query)(spec.volume.path)
    if spec.mode == "roi":
        return queries.roi_query(volume, RoiBox(tuple(spec.roi_ras[:3]), tuple(spec.roi_ras[3:])), settings.axis, index,
                                settings.margin_mm)
    if spec.mode == "slice":
        return queries.slice_query(volume, settings.axis, index, spec.slice_ras)
    return queries.volume_query(volume, settings.axis, index)  # as the CLI and the module ask: the default number of slices


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
    query = build_query(saved, index, searcher.embedder, loader)
    settings = saved.settings
    answer = searcher.search(query, settings.k, settings.filters or None, settings.ranking, prior=settings.prior)
    if settings.placement:
        answer = searcher.place(query, answer, loader)
    ref = IndexRef.of(index)
    return Rerun(answer, compare(saved.answer, answer, saved.index.relation(ref)), ref)


def with_answer(saved: SavedSearch, run: Rerun) -> SavedSearch:
    """The saved search updated with a re-run's answer and index (feedback and suggestion kept)."""
    import dataclasses

    return dataclasses.replace(saved, answer=run.answer, index=run.index, saved=_now())



CSV_COLUMNS = ["rank", "case_id", "name", "score", "body_part", "modality", "match_r", "match_a", "match_s", "match_axis",
               "match_kind", "path"]


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
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(CSV_COLUMNS + columns)
            for result in answer.results:
                spot = result.best_match.spot
                mine = labels.get(result.case_id, {})
                writer.writerow([result.rank, result.case_id, result.name, f"{result.score:.5f}", result.body_part or "",
                                 result.modality or "", *(f"{v:.3f}" for v in spot), result.best_match.axis,
                                 result.best_match.kind, result.source, *(mine.get(c, "") for c in columns)])
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path
