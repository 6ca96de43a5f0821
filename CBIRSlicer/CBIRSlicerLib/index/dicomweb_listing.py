"""What a DICOM series listing holds (a Slicer DICOM database's or a PACS's), and a PACS's listing read without trust.

:class:`SeriesEntry` and :class:`SeriesFilter` are shared by both kinds of source. A QIDO-RS answer must be DICOM JSON
(:class:`ListingShapeError` says what else came, in one line); its UIDs must be UIDs (they name download folders).
:func:`page_through` pages a listing until a page brings nothing new, and stops after :data:`MAX_LISTING_PAGES`. A
server that ignores ``offset`` sends its first page again: when that page was full (:data:`LISTING_PAGE` series, the most
asked for) the series after it cannot be listed and the listing is refused; when it was shorter the listing may be whole,
or the server caps its answers at that many series, which nothing in the answer tells: it goes on, with a note.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import ParameterError, printable

# Where a listing stops: a server that ignores 'offset' repeats its first page (caught at once: nothing new), one that
# invents new series forever is stopped here. A page of 1,000 series is about 1 MB of DICOM JSON.
LISTING_PAGE = 1000
MAX_LISTING_PAGES = 10_000
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # DICOM's rule (PS3.5 9.1); a UID also names a folder of downloads

# QIDO attribute tags (DICOM JSON model keys).
_STUDY_UID, _SERIES_UID, _MODALITY, _BODY_PART = "0020000D", "0020000E", "00080060", "00180015"
_STUDY_DATE, _DESCRIPTION, _INSTANCES = "00080020", "0008103E", "00201209"
FIELDS = ["StudyDate", "BodyPartExamined", "SeriesDescription", "NumberOfSeriesRelatedInstances", "Modality"]


@dataclass(frozen=True)
class SeriesEntry:
    """One series a DICOM database or a PACS lists: its UIDs and what the listing says about it."""

    study_uid: str
    series_uid: str
    modality: str | None = None
    body_part: str | None = None
    study_date: str | None = None
    description: str | None = None
    instances: int | None = None

    @property
    def label(self) -> str:
        """How messages name it: the series UID, with its description when there is one."""
        return f"series {self.series_uid}" + (f" ({self.description})" if self.description else "")


@dataclass(frozen=True)
class SeriesFilter:
    """Which series to index: modalities (any of), a study date range (DICOM dates, inclusive, open ends), a body part."""

    modalities: tuple[str, ...] = ()
    date_from: str | None = None
    date_to: str | None = None
    body_part: str | None = None

    def matches(self, entry: SeriesEntry) -> bool:
        """Whether a listed series passes (a value the listing lacks passes: the server filtered on it, or cannot)."""
        if self.modalities and entry.modality and entry.modality.upper() not in {m.upper() for m in self.modalities}:
            return False
        if self.body_part and entry.body_part and entry.body_part.upper() != self.body_part.upper():
            return False
        if entry.study_date and self.date_from and entry.study_date < self.date_from:
            return False
        return not (entry.study_date and self.date_to and entry.study_date > self.date_to)

    def qido_date(self) -> str | None:
        """The study date range as QIDO-RS writes it (DICOM range matching), or None."""
        if not (self.date_from or self.date_to):
            return None
        if self.date_from == self.date_to:
            return self.date_from
        return f"{self.date_from or ''}-{self.date_to or ''}"


def _date(text: str, what: str) -> str:
    digits = text.replace("-", "") if len(text) == 10 else text  # 2024-01-31 or 20240131
    try:
        if len(digits) != 8 or not digits.isdigit():
            raise ValueError(text)
        datetime.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        raise ParameterError(f"{what} '{text}': expected a date as YYYYMMDD or YYYY-MM-DD") from None
    return digits


def parse_date_range(text: str | None) -> tuple[str | None, str | None]:
    """'20240101-20241231', '2024-01-01..2024-12-31', '20240101-' or '-20241231', or one date: (from, to) as YYYYMMDD."""
    if not text:
        return None, None
    text = text.strip()
    if ".." in text:
        low, high = text.split("..", 1)
    elif len(text) in (8, 10) and (text.isdigit() or text.count("-") == 2):
        low = high = text
    elif text.count("-") == 1:
        low, high = text.split("-", 1)
    else:
        raise ParameterError(f"--study-date '{text}': expected FROM-TO as YYYYMMDD-YYYYMMDD (either end may be left out)")
    found = (_date(low, "--study-date") if low else None, _date(high, "--study-date") if high else None)
    if found[0] and found[1] and found[0] > found[1]:
        raise ParameterError(f"--study-date '{text}': the range ends before it begins")
    return found



class ListingShapeError(ValueError):
    """A server's listing is not DICOM JSON as QIDO-RS defines it."""


def _kind(value: object) -> str:
    """What a JSON value is, in JSON's words."""
    names = {str: "a string", bool: "a boolean", int: "a number", float: "a number", dict: "an object", list: "an array"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


def _value(attributes: dict[str, Any], tag: str) -> str | None:
    """An attribute's first value as text (control characters escaped), None when absent; ListingShapeError when the
    server sent something that is not a DICOM JSON attribute."""
    element = attributes.get(tag)
    if element is None:
        return None
    if not isinstance(element, dict):
        raise ListingShapeError(f"attribute {tag} is {_kind(element)}, not an object")
    values = element.get("Value")
    if values is None or values == []:
        return None
    if not isinstance(values, list):
        raise ListingShapeError(f'attribute {tag} has a "Value" that is {_kind(values)}, not an array')
    first = values[0]
    if isinstance(first, dict):  # a person name: {"Alphabetic": ...}
        first = first.get("Alphabetic")
    if first is None:
        return None
    if not isinstance(first, (str, int, float)) or isinstance(first, bool):
        raise ListingShapeError(f"attribute {tag} has a value that is {_kind(first)}")
    return printable(str(first).strip()[:1024])


def entry_of(attributes: object) -> SeriesEntry | None:
    """A listed series as an entry, None when it lacks its UIDs; ListingShapeError when it is not DICOM JSON."""
    if not isinstance(attributes, dict):
        raise ListingShapeError(f"a listed series is {_kind(attributes)}, not an object")
    study, series = _value(attributes, _STUDY_UID), _value(attributes, _SERIES_UID)
    if not study or not series:
        return None
    for uid in (study, series):
        check_uid(uid)
    count = _value(attributes, _INSTANCES)
    return SeriesEntry(study, series, _value(attributes, _MODALITY), _value(attributes, _BODY_PART), _value(attributes, _STUDY_DATE),
                       _value(attributes, _DESCRIPTION), int(count) if count and count.isdigit() and len(count) <= 9 else None)


def check_uid(uid: str) -> str:
    """The UID, when it is one (digits and dots, at most 64 characters: it also names a folder); ListingShapeError if not."""
    if not isinstance(uid, str) or len(uid) > 64 or not _UID.fullmatch(uid):
        raise ListingShapeError(f"'{printable(str(uid))[:80]}' is not a DICOM UID (digits and dots, at most 64)")
    return uid


def as_listing(answer: object) -> list[Any]:
    """A QIDO-RS answer, when it is an array; ListingShapeError when it is not."""
    if not isinstance(answer, list):
        raise ListingShapeError(f"the answer is {_kind(answer)}, not an array of series (DICOM JSON)")
    return answer


@dataclass
class Listing:
    """The series a listing holds that pass the filter, and what the user should know of how it was listed."""

    entries: dict[str, SeriesEntry] = field(default_factory=dict)  # series UID -> entry
    notes: list[str] = field(default_factory=list)


def page_through(page: Callable[[int, int], list[Any]], wanted: SeriesFilter, listing: Listing) -> None:
    """Every series of a paged listing (``page(offset, limit)``: one answer, of at most ``limit`` series) into ``listing``,
    those that pass ``wanted``; ListingShapeError past MAX_LISTING_PAGES, or when a server that ignores 'offset' leaves
    series it cannot list."""
    seen: set[str] = set()
    first: list[str] | None = None
    offset, pages = 0, 0
    while True:
        answer = page(offset, LISTING_PAGE)
        entries = [e for e in map(entry_of, answer) if e is not None]
        uids = [e.series_uid for e in entries]
        new = [e for e in entries if e.series_uid not in seen]
        if not new:
            if offset and uids and uids == first:  # not the end: the first page again
                _ignored_offset(len(answer), offset, listing)
            break  # the end (or a listing that shifted under the paging: what it lost, it lost)
        first = uids if first is None else first
        pages += 1
        if pages > MAX_LISTING_PAGES:
            raise ListingShapeError(f"the server kept paging past {MAX_LISTING_PAGES} pages of {LISTING_PAGE} "
                                    "series; refused (narrow the listing with --modality or --study-date)")
        seen.update(e.series_uid for e in new)
        listing.entries.update((e.series_uid, e) for e in new if wanted.matches(e))
        offset += len(answer)


def _ignored_offset(count: int, offset: int, listing: Listing) -> None:
    """A server sent its first page again at ``offset``: refused when the page was full, else noted."""
    said = f"the server ignores 'offset' (asked for the series after the first {offset}, it sent the same {count} again)"
    if count >= LISTING_PAGE:
        raise ListingShapeError(f"{said}: the series after them cannot be listed; narrow the listing with --modality or "
                                f"--study-date until it holds fewer than {LISTING_PAGE}")
    listing.notes.append(f"{said}; if it also caps its answers at {count} series, it holds more than were listed: narrow "
                         "the listing with --modality or --study-date to check")
