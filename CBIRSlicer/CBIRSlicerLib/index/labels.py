"""Labels a user gives a case after indexing (a finding, a diagnosis, any column): in the index, or beside it.

On an index the user may write, a label is a catalog update made under the folder's writer lock and committed
like any other write (the manifest's checksums are sealed again, so ``verify`` stays green): the value goes
to the case's metadata under the column's name (so ``--filter COLUMN=VALUE`` finds it), and when and by whom
(only if given) to ``metadata["labelled"][COLUMN]``. The column ``label`` sets the case's label list instead
(what ``--labels`` gave at index time). On an index the user may not write (a shared, read-only copy), the
label goes to a side file, ``labels.local.csv`` next to the user's searches, merged when labels are read
(:func:`merged_labels`); of two values for one case and column, the later one counts (a value without a
time, given at index time, loses to any dated one).
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass

from ..clock import now_utc
from ..errors import IndexLockedError, IndexMismatchError, InputError, ParameterError
from .catalog import COLUMN_FILTERS, CaseRecord
from .files import CATALOG, MANIFEST
from .folder import Index
from .location import is_server_location, open_index

SIDE_FILE = "labels.local.csv"
SIDE_COLUMNS = ["case_id", "column", "value", "at", "by", "index"]
LABEL = "label"  # the column of the case's label list
PROVENANCE = "labelled"  # metadata key: column -> {"at", "by"}
_COLUMN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_ .-]{0,63}$")
# Metadata the index writes itself: a label must not overwrite it.
RESERVED = {*COLUMN_FILTERS, "labels", PROVENANCE, "window", "patient_key", "patient_id", "body_part_source", "modality_source"}


@dataclass(frozen=True)
class LabelEntry:
    """One label given to a case: column, value, when (UTC, ISO 8601), by whom (only if the user said)."""

    case_id: str
    column: str
    value: str
    at: str
    by: str | None = None
    index: str | None = None  # the index folder it was given on (side file only)


@dataclass(frozen=True)
class LabelWrite:
    """Where a label went: 'index' (the catalog, committed) or 'side file' (with its path), and why there."""

    entry: LabelEntry
    where: str
    path: str
    reason: str = ""


MAX_VALUE = 1000  # characters: a finding, a grade, a short note


def parse_assignment(text: str) -> tuple[str, str]:
    """'COLUMN=VALUE' to (column, value), the column checked (a name of letters, digits, _ . - or spaces, not a field of the index)."""
    column, sep, value = text.partition("=")
    column, value = column.strip(), value.strip()
    if not sep or not column:
        raise ParameterError(f"label '{text}' must look like COLUMN=VALUE, for example diagnosis=adenocarcinoma")
    check_column(column)
    check_value(value)
    return column, value


def check_value(value: str) -> None:
    """Refuse a label value that is not one line of text (a newline or an escape sequence would break a side-file line or
    the terminal) or is longer than a label."""
    if not value.isprintable():
        raise ParameterError(f"label value {value!r} holds a control character; a label is one line of text")
    if len(value) > MAX_VALUE:
        raise ParameterError(f"label value of {len(value)} characters is longer than a label ({MAX_VALUE} at most)")


def check_column(column: str) -> None:
    """Refuse a column name that is malformed or a field the index sets itself."""
    if not _COLUMN_NAME.match(column):
        raise ParameterError(f"label column '{column}' must start with a letter and hold only letters, digits, spaces, _ . or - "
                             "(64 characters at most)")
    if column.lower() in RESERVED:
        raise ParameterError(f"label column '{column}' is a field the index sets itself; choose another name")


def writable_reason(folder: str) -> str | None:
    """Why this process cannot write the index (None when it can): its folder or its files are read-only."""
    for path in (folder, *(os.path.join(folder, name) for name in (MANIFEST, CATALOG))):
        if os.path.exists(path) and not os.access(path, os.W_OK):
            return f"{path} is read-only"
    return None


def set_label(folder: str, case_id: str, column: str, value: str, by: str | None = None, side_file: str | None = None,
              at: str | None = None) -> LabelWrite:
    """Give a case a label: in the index (writer lock, commit) if it can be written, else in the side file."""
    check_column(column)
    check_value(value)
    if is_server_location(folder):  # a Milvus-backed index: written through its writer (the server checks who may)
        with open_index(folder, writable=True) as index:
            entry = LabelEntry(case_id, column, value, at or now_utc(), by.strip() if by and by.strip() else None, index.folder)
            _write_to_index(index, entry)
        return LabelWrite(entry, "index", index.folder)
    folder = os.path.abspath(folder)
    entry = LabelEntry(case_id, column, value, at or now_utc(), by.strip() if by and by.strip() else None, folder)
    reason = writable_reason(folder)
    if reason is None:
        try:
            with Index.open(folder, writable=True) as index:
                _write_to_index(index, entry)
            return LabelWrite(entry, "index", folder)
        except IndexLockedError:
            raise
        except IndexMismatchError:  # an older index format: searchable as it is, written only after a repair
            reason = "it is in an older index format, read-only until 'cbir index repair'"
        except PermissionError as error:  # a share that refuses writes though it looks writable
            reason = f"{error.filename or folder} cannot be written ({error.strerror})"
    index = Index.open(folder)
    try:
        if index.catalog.case_by_id(case_id) is None:
            raise InputError(case_id, f"is not a case of the index {folder}")
    finally:
        index.close()
    if not side_file:
        raise ParameterError(f"{folder}: the index cannot be written ({reason}) and no side file was given for the label")
    append_side_file(side_file, entry)
    return LabelWrite(entry, "side file", os.path.abspath(side_file), reason)


def _write_to_index(index: Index, entry: LabelEntry) -> None:
    """The catalog update of one label, inside one transaction (sealed when the index closes)."""
    case = index.catalog.case_by_id(entry.case_id)
    if case is None or case.status != "complete":
        raise InputError(entry.case_id, f"is not a case of the index {index.folder}")
    metadata = dict(case.metadata)
    labels = list(case.labels)
    if entry.column != LABEL and entry.column in metadata and entry.column not in (metadata.get(PROVENANCE) or {}):
        raise ParameterError(f"label column '{entry.column}' is a field the index took from the image of {entry.case_id}; "
                             "choose another name")
    if entry.column == LABEL:
        labels = [entry.value] if entry.value else []
    elif entry.value:
        metadata[entry.column] = entry.value
    else:  # an empty value takes the label away
        metadata.pop(entry.column, None)
    provenance = dict(metadata.get(PROVENANCE) or {})
    provenance[entry.column] = {"at": entry.at, **({"by": entry.by} if entry.by else {})}
    metadata[PROVENANCE] = provenance
    with index.catalog.transaction():
        index.catalog.set_case_labels(case.row, labels, metadata)


def append_side_file(path: str, entry: LabelEntry) -> None:
    """Add one label to the side file (created with its header when new)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        read_side_file(path)  # never append to a file that is not ours
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        if new:
            writer.writerow(SIDE_COLUMNS)
        writer.writerow([entry.case_id, entry.column, entry.value, entry.at, entry.by or "", entry.index or ""])
        handle.flush()
        os.fsync(handle.fileno())


def read_side_file(path: str | None) -> list[LabelEntry]:
    """The labels of a side file, oldest first ([] when there is none); a malformed one is an InputError naming it."""
    if not path or not os.path.exists(path):
        return []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None or not {"case_id", "column", "value", "at"} <= set(reader.fieldnames):
                raise InputError(path, f"label side file needs the columns {','.join(SIDE_COLUMNS)}")
            rows = list(reader)
    except UnicodeDecodeError as error:
        raise InputError(path, f"label side file is not UTF-8 text (byte {error.start})") from None
    except csv.Error as error:
        raise InputError(path, f"label side file cannot be parsed ({error})") from None
    return [LabelEntry(r["case_id"], r["column"], r["value"] or "", r["at"], r.get("by") or None, r.get("index") or None)
            for r in rows]


def case_label_values(case: CaseRecord) -> dict[str, tuple[str, str | None, str | None]]:
    """A case's labels as the index holds them: column -> (value, when, by); 'label' from its label list."""
    provenance = case.metadata.get(PROVENANCE) or {}
    found = {}
    if case.labels or LABEL in provenance:
        given = provenance.get(LABEL, {})
        found[LABEL] = (";".join(case.labels), given.get("at"), given.get("by"))
    for column, given in provenance.items():
        if column != LABEL and column in case.metadata:
            found[column] = (str(case.metadata[column]), given.get("at"), given.get("by"))
    return found


def merged_labels(cases: list[CaseRecord], side: list[LabelEntry]) -> dict[str, dict[str, str]]:
    """Case id -> column -> value: the index's labels with the side file's merged in (the later of two values counts)."""
    merged: dict[str, dict[str, tuple[str, str | None]]] = {}
    for case in cases:
        merged[case.case_id] = {column: (value, at) for column, (value, at, _) in case_label_values(case).items()}
    for entry in side:  # oldest first: a later row of the file replaces an earlier one
        known = merged.setdefault(entry.case_id, {}).get(entry.column)
        if known is None or known[1] is None or known[1] <= entry.at:
            merged[entry.case_id][entry.column] = (entry.value, entry.at)
    return {case_id: {c: v for c, (v, _) in columns.items() if v} for case_id, columns in merged.items()}


def labels_of(folder: str | None, case_ids: list[str], side_file: str | None = None) -> dict[str, dict[str, str]]:
    """Merged labels (index and side file) of some cases; an index that is not there gives the side file's alone."""
    cases: list[CaseRecord] = []
    if folder and (is_server_location(folder) or os.path.isfile(os.path.join(folder, MANIFEST))):
        index = open_index(folder)
        try:
            cases = [c for c in (index.catalog.case_by_id(i) for i in case_ids) if c is not None]
        finally:
            index.close()
    merged = merged_labels(cases, read_side_file(side_file))
    return {case_id: merged.get(case_id, {}) for case_id in case_ids}
