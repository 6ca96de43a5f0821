"""The index catalog: cases, items and thumbnails in one SQLite file (no pickle; JSON for structured fields).

An item is one vector in the FAISS index; its integer id is the FAISS id. Ids come from an
AUTOINCREMENT key, so they are never reused after a removal.
"""

from __future__ import annotations

import json
import os
import sqlite3
import urllib.parse
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from ..errors import IndexCorruptError, ParameterError

SCHEMA = """
CREATE TABLE IF NOT EXISTS cases (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    case_id TEXT UNIQUE NOT NULL,
    name TEXT,
    source TEXT NOT NULL,
    series_uid TEXT,
    checksum TEXT,
    modality TEXT,
    body_part TEXT,
    shape TEXT,
    spacing TEXT,
    ijk_to_ras TEXT,
    labels TEXT DEFAULT '[]',
    metadata TEXT DEFAULT '{}',
    status TEXT NOT NULL DEFAULT 'pending',
    added_at REAL
);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    case_row INTEGER NOT NULL REFERENCES cases(id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    axis TEXT NOT NULL,
    slice_index INTEGER NOT NULL,
    plane INTEGER NOT NULL,
    ras_r REAL, ras_a REAL, ras_s REAL,
    box TEXT,
    low_ras TEXT,
    high_ras TEXT,
    size_mm REAL
);
CREATE INDEX IF NOT EXISTS items_case ON items(case_row);
CREATE TABLE IF NOT EXISTS thumbnails (
    case_row INTEGER NOT NULL REFERENCES cases(id) ON DELETE CASCADE,
    axis TEXT NOT NULL,
    plane INTEGER NOT NULL,
    rows INTEGER, cols INTEGER,
    pixels BLOB,
    PRIMARY KEY (case_row, axis, plane)
);
CREATE TABLE IF NOT EXISTS tombstones (id INTEGER PRIMARY KEY);
-- What a case's voxels are, so a query from a copy of an indexed volume (another path, another format, a
-- Slicer node) still leaves its own case out. A table of its own: readers that predate it ignore it.
CREATE TABLE IF NOT EXISTS contents (
    case_row INTEGER PRIMARY KEY REFERENCES cases(id) ON DELETE CASCADE,
    digest TEXT NOT NULL
);
-- The index's identity (model, settings) copied from the manifest, so a repair can work without one.
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
TABLES = ("cases", "items", "thumbnails", "tombstones")
BUSY_SECONDS = 30.0  # a reader waits this long for a writer's commit (rollback journal: commits are short)
COLUMN_FILTERS = ("case_id", "name", "source", "series_uid", "modality", "body_part")


@dataclass
class CaseRecord:
    """One indexed case (a volume file or a DICOM series)."""

    case_id: str
    source: str
    name: str = ""
    series_uid: str | None = None
    checksum: str | None = None
    modality: str | None = None
    body_part: str | None = None
    shape: list[int] = field(default_factory=list)
    spacing: list[float] = field(default_factory=list)
    ijk_to_ras: list[list[float]] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    metadata: dict = field(default_factory=dict)
    status: str = "pending"
    row: int | None = None

    def as_dict(self) -> dict:
        """JSON-ready description for results and `info`."""
        return {"case_id": self.case_id, "name": self.name, "source": self.source, "series_uid": self.series_uid,
                "modality": self.modality, "body_part": self.body_part, "shape": self.shape, "spacing": self.spacing,
                "labels": self.labels, "metadata": self.metadata}


@dataclass
class ItemRecord:
    """One indexed image: a whole slice, a tile of one or a crop around a blob in one, with where it lies (RAS mm) in its case."""

    kind: str
    axis: str
    slice_index: int
    plane: int
    ras: tuple[float, float, float]
    box: tuple[int, int, int, int]
    low_ras: tuple[float, float, float]
    high_ras: tuple[float, float, float]
    size_mm: float
    id: int | None = None
    case_row: int | None = None


@dataclass
class ItemArrays:
    """Items of some cases as parallel arrays: id, case row, axis, RAS centre (n, 3), size in mm."""

    ids: np.ndarray
    case_rows: np.ndarray
    axes: np.ndarray
    centres: np.ndarray
    sizes: np.ndarray


class Catalog:
    """SQLite access for one index folder."""

    def __init__(self, path: str, readonly: bool = False, create: bool = False):
        self.path = path
        self.readonly = readonly
        if not create and not os.path.isfile(path):
            raise IndexCorruptError(f"{path}: missing")
        try:
            if readonly:
                # No journal mode change, no schema, no files created: a copy on a DVD or a share others only read works.
                # Where the folder cannot be written at all, nobody writes the file either: immutable skips locking.
                uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
                if not os.access(os.path.dirname(os.path.abspath(path)) or ".", os.W_OK):
                    uri += "&immutable=1"
                self.db = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False, timeout=BUSY_SECONDS)
            else:
                self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=BUSY_SECONDS)
                self.db.execute("PRAGMA foreign_keys = ON")
                # A rollback journal, not WAL: committed data is then always in the file itself, so the manifest's checksum
                # covers it and a read-only copy needs no -wal or -shm file beside it.
                self.db.execute("PRAGMA journal_mode = DELETE")
                self.db.executescript(SCHEMA)
            found = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as error:
            raise IndexCorruptError(f"{path}: cannot be read as an SQLite catalog ({error}); the file is damaged") from None
        missing = [t for t in TABLES if t not in found]
        if missing:
            self.db.close()
            raise IndexCorruptError(f"{path}: lacks the table(s) {', '.join(missing)}; the file is damaged")

    def integrity_problems(self) -> list[str]:
        """SQLite's own full check of the file (every page, every index)."""
        try:
            rows = [r[0] for r in self.db.execute("PRAGMA integrity_check")]
        except sqlite3.DatabaseError as error:
            return [f"{self.path}: SQLite integrity check failed ({error})"]
        return [] if rows == ["ok"] else [f"{self.path}: SQLite integrity check: " + "; ".join(rows[:5])]

    def set_meta(self, key: str, value: dict) -> None:
        """Store a JSON value under a key."""
        self.db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self, key: str) -> dict | None:
        """A stored JSON value, or None (older catalogs have no meta table)."""
        try:
            row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.OperationalError:
            return None
        return json.loads(row[0]) if row else None

    def close(self) -> None:
        """Close the database."""
        self.db.close()

    def transaction(self) -> _Transaction:
        """A context manager running its block in one transaction."""
        return _Transaction(self.db)

    # ----- cases ---------------------------------------------------------------------------------
    def _case(self, row: sqlite3.Row | tuple) -> CaseRecord:
        try:
            (rid, case_id, name, source, series_uid, checksum, modality, body_part, shape, spacing, matrix,
             labels, metadata, status, _added) = row
            return CaseRecord(case_id, source, name or "", series_uid, checksum, modality, body_part,
                              json.loads(shape or "[]"), json.loads(spacing or "[]"), json.loads(matrix or "[]"),
                              json.loads(labels or "[]"), json.loads(metadata or "{}"), status, rid)
        except (ValueError, TypeError) as error:  # what only a damaged file holds
            raise IndexCorruptError(f"{self.path}: a case row cannot be decoded ({error}); the file is damaged") from None

    def add_case(self, case: CaseRecord, added_at: float) -> int:
        """Insert a case (status 'pending' until its vectors are saved); returns its row id."""
        cursor = self.db.execute(
            "INSERT INTO cases (case_id, name, source, series_uid, checksum, modality, body_part, shape, spacing, "
            "ijk_to_ras, labels, metadata, status, added_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (case.case_id, case.name, case.source, case.series_uid, case.checksum, case.modality, case.body_part,
             json.dumps(case.shape), json.dumps(case.spacing), json.dumps(case.ijk_to_ras), json.dumps(case.labels),
             json.dumps(case.metadata), case.status, added_at))
        case.row = cursor.lastrowid
        return case.row

    def cases(self, status: str | None = "complete") -> list[CaseRecord]:
        """All cases (of a status, or any status with None)."""
        query = "SELECT * FROM cases" + (" WHERE status = ?" if status else "") + " ORDER BY id"
        return [self._case(r) for r in self.db.execute(query, (status,) if status else ())]

    def case_by_id(self, case_id: str) -> CaseRecord | None:
        """A case by its public id."""
        row = self.db.execute("SELECT * FROM cases WHERE case_id = ?", (case_id,)).fetchone()
        return self._case(row) if row else None

    def case_by_row(self, row_id: int) -> CaseRecord:
        """A case by its row id."""
        return self._case(self.db.execute("SELECT * FROM cases WHERE id = ?", (row_id,)).fetchone())

    def set_case_labels(self, row: int, labels: list[str], metadata: dict) -> None:
        """Replace a case's label list and metadata (a label given after indexing: index.labels)."""
        self.db.execute("UPDATE cases SET labels = ?, metadata = ? WHERE id = ?", (json.dumps(labels), json.dumps(metadata), int(row)))

    def set_status(self, rows: Iterable[int], status: str) -> None:
        """Mark cases complete (or pending)."""
        self.db.executemany("UPDATE cases SET status = ? WHERE id = ?", [(status, r) for r in rows])

    def delete_cases(self, rows: Iterable[int]) -> None:
        """Delete cases with their items and thumbnails."""
        self.db.executemany("DELETE FROM cases WHERE id = ?", [(r,) for r in rows])

    def set_content(self, row: int, digest: str) -> None:
        """Record what a case's voxels are (:attr:`Volume.voxel_digest`)."""
        self.db.execute("INSERT OR REPLACE INTO contents (case_row, digest) VALUES (?, ?)", (int(row), digest))

    def case_rows_with_content(self, shape: Sequence[int], digest_of: Callable[[], str]) -> list[int]:
        """Rows of the cases whose voxels are the same; ``digest_of`` is only called when some case has the shape."""
        # The shape is the cases' own column, written as add_case writes it (a JSON list of ints).
        found = self.db.execute("SELECT contents.case_row, contents.digest FROM contents JOIN cases ON cases.id = contents.case_row "
                                "WHERE cases.shape = ?", (json.dumps([int(n) for n in shape]),)).fetchall()
        if not found:
            return []
        digest = digest_of()
        return [row for row, other in found if other == digest]

    def case_rows_of_series(self, series_uid: str) -> list[int]:
        """Rows of the cases indexed from a DICOM series."""
        return [r[0] for r in self.db.execute("SELECT id FROM cases WHERE series_uid = ?", (series_uid,))]

    def filter_fields(self) -> list[str]:
        """Fields some complete case has a value for: filterable columns, 'label' and metadata keys."""
        fields = [c for c in COLUMN_FILTERS
                  if self.db.execute(f"SELECT 1 FROM cases WHERE status = 'complete' AND {c} IS NOT NULL AND {c} != '' LIMIT 1").fetchone()]
        if self.db.execute("SELECT 1 FROM cases, json_each(cases.labels) WHERE status = 'complete' LIMIT 1").fetchone():
            fields.append("label")
        keys = self.db.execute("SELECT DISTINCT json_each.key FROM cases, json_each(cases.metadata) WHERE status = 'complete' "
                               "AND json_each.type NOT IN ('object', 'array', 'null') ORDER BY 1")
        return fields + [k for (k,) in keys if k not in fields]

    def case_rows_matching(self, filters: dict[str, str]) -> list[int]:
        """Rows of complete cases whose columns, labels or metadata equal the filter values (all must match).

        A field no case has is a ParameterError listing the fields that exist, never an empty answer.
        """
        known = self.filter_fields()
        unknown = [k for k in filters if (k if k != "labels" else "label") not in known]
        if unknown:
            raise ParameterError(f"filter field '{unknown[0]}': no case of the index has it; fields that exist: "
                                 f"{', '.join(known) or 'none'}")
        clauses, values = ["status = 'complete'"], []
        for key, value in filters.items():
            if key in COLUMN_FILTERS:
                clauses.append(f"lower({key}) = lower(?)")
                values.append(value)
            elif key in ("label", "labels"):
                clauses.append("EXISTS (SELECT 1 FROM json_each(cases.labels) WHERE lower(json_each.value) = lower(?))")
                values.append(value)
            else:
                clauses.append("lower(CAST(json_extract(metadata, ?) AS TEXT)) = lower(?)")
                values.extend([f'$."{key}"', value])
        query = f"SELECT id FROM cases WHERE {' AND '.join(clauses)}"
        return [r[0] for r in self.db.execute(query, values)]

    # ----- items ---------------------------------------------------------------------------------
    def add_items(self, case_row: int, items: list[ItemRecord]) -> np.ndarray:
        """Insert items of a case; returns their new ids (the FAISS ids), in order."""
        ids = []
        for item in items:
            cursor = self.db.execute(
                "INSERT INTO items (case_row, kind, axis, slice_index, plane, ras_r, ras_a, ras_s, box, low_ras, high_ras, size_mm) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (case_row, item.kind, item.axis, int(item.slice_index), int(item.plane), *map(float, item.ras),
                 json.dumps([int(v) for v in item.box]), json.dumps([float(v) for v in item.low_ras]),
                 json.dumps([float(v) for v in item.high_ras]), float(item.size_mm)))
            item.id, item.case_row = cursor.lastrowid, case_row
            ids.append(cursor.lastrowid)
        return np.array(ids, dtype=np.int64)

    def _item(self, row) -> ItemRecord:
        try:
            rid, case_row, kind, axis, slice_index, plane, r, a, s, box, low, high, size = row
            return ItemRecord(kind, axis, slice_index, plane, (r, a, s), tuple(json.loads(box)), tuple(json.loads(low)),
                              tuple(json.loads(high)), size, rid, case_row)
        except (ValueError, TypeError) as error:  # what only a damaged file holds
            raise IndexCorruptError(f"{self.path}: an item row cannot be decoded ({error}); the file is damaged") from None

    def items(self, ids: Iterable[int]) -> dict[int, ItemRecord]:
        """Items by id."""
        ids = [int(i) for i in ids]
        found = {}
        for start in range(0, len(ids), 900):  # SQLite's parameter limit
            chunk = ids[start:start + 900]
            rows = self.db.execute(f"SELECT * FROM items WHERE id IN ({','.join('?' * len(chunk))})", chunk)
            found.update({row[0]: self._item(row) for row in rows})
        return found

    def items_of_cases(self, case_rows: Iterable[int]) -> dict[int, list[ItemRecord]]:
        """Every item of the given cases, grouped by case row."""
        rows = [int(r) for r in case_rows]
        grouped: dict[int, list[ItemRecord]] = {r: [] for r in rows}
        for start in range(0, len(rows), 900):
            chunk = rows[start:start + 900]
            query = f"SELECT * FROM items WHERE case_row IN ({','.join('?' * len(chunk))}) ORDER BY id"
            for row in self.db.execute(query, chunk):
                grouped[row[1]].append(self._item(row))
        return grouped

    def item_ids(self, case_rows: Iterable[int] | None = None) -> np.ndarray:
        """Ids of the items of some cases (or of all complete cases), sorted."""
        if case_rows is None:
            query = "SELECT items.id FROM items JOIN cases ON cases.id = items.case_row WHERE cases.status = 'complete'"
            return np.array(sorted(r[0] for r in self.db.execute(query)), dtype=np.int64)
        return self.item_arrays(case_rows).ids

    def item_arrays(self, case_rows: Iterable[int]) -> ItemArrays:
        """The items of some cases as arrays (what ranking needs, without building a record per item), ordered by id."""
        rows = [int(r) for r in case_rows]
        found = []
        for start in range(0, len(rows), 900):
            chunk = rows[start:start + 900]
            found += self.db.execute(f"SELECT id, case_row, axis, ras_r, ras_a, ras_s, size_mm FROM items "
                                     f"WHERE case_row IN ({','.join('?' * len(chunk))})", chunk).fetchall()
        found.sort()
        return ItemArrays(np.array([f[0] for f in found], np.int64), np.array([f[1] for f in found], np.int64),
                          np.array([f[2] for f in found], dtype=object),
                          np.array([f[3:6] for f in found], np.float64).reshape(-1, 3), np.array([f[6] for f in found], np.float64))

    def item_ids_of_kinds(self, kinds: Iterable[str], negate: bool = False) -> np.ndarray:
        """Ids of the items of some kinds (or, with ``negate``, of every other kind), sorted."""
        kinds = list(kinds)
        test = "NOT IN" if negate else "IN"
        found = self.db.execute(f"SELECT id FROM items WHERE kind {test} ({','.join('?' * len(kinds))}) ORDER BY id", kinds)
        return np.array([f[0] for f in found], np.int64)

    def case_rows_of_items(self, ids: Iterable[int]) -> dict[int, int]:
        """Case row of each item id."""
        ids = [int(i) for i in ids]
        found: dict[int, int] = {}
        for start in range(0, len(ids), 900):
            chunk = ids[start:start + 900]
            found.update(self.db.execute(f"SELECT id, case_row FROM items WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def case_rows_of_sources(self, sources: Iterable[str]) -> list[int]:
        """Rows of the cases indexed from some source paths."""
        sources = list(sources)
        if not sources:
            return []
        return [r[0] for r in self.db.execute(f"SELECT id FROM cases WHERE source IN ({','.join('?' * len(sources))})", sources)]

    def count(self, table: str) -> int:
        """Rows in a table (cases counts complete ones only)."""
        if table not in (*TABLES, "contents"):
            raise ValueError(f"no table {table}")
        where = " WHERE status = 'complete'" if table == "cases" else ""
        return self.db.execute(f"SELECT COUNT(*) FROM {table}{where}").fetchone()[0]

    # ----- tombstones ----------------------------------------------------------------------------
    def add_tombstones(self, ids: Iterable[int]) -> None:
        """Remember ids removed from the catalog but still inside a FAISS structure that cannot delete."""
        self.db.executemany("INSERT OR IGNORE INTO tombstones (id) VALUES (?)", [(int(i),) for i in ids])

    def tombstones(self) -> np.ndarray:
        """Ids to filter out of every search until compaction."""
        return np.array([r[0] for r in self.db.execute("SELECT id FROM tombstones")], dtype=np.int64)

    def clear_tombstones(self) -> None:
        """Forget tombstones (after compaction)."""
        self.db.execute("DELETE FROM tombstones")

    # ----- thumbnails ----------------------------------------------------------------------------
    def add_thumbnail(self, case_row: int, axis: str, plane: int, grey: np.ndarray) -> None:
        """Store a small uint8 grey thumbnail of a slice (zlib-compressed raw pixels; no image library needed)."""
        grey = np.ascontiguousarray(grey, dtype=np.uint8)
        self.db.execute("INSERT OR REPLACE INTO thumbnails VALUES (?,?,?,?,?,?)",
                        (case_row, axis, int(plane), grey.shape[0], grey.shape[1], zlib.compress(grey.tobytes(), 6)))

    def thumbnail(self, case_row: int, axis: str, plane: int) -> np.ndarray | None:
        """The stored thumbnail of a slice, as uint8 (rows, cols), or None."""
        row = self.db.execute("SELECT rows, cols, pixels FROM thumbnails WHERE case_row = ? AND axis = ? AND plane = ?",
                              (case_row, axis, int(plane))).fetchone()
        if row is None:
            return None
        rows, cols, blob = row
        try:
            return np.frombuffer(zlib.decompress(blob), dtype=np.uint8).reshape(rows, cols)
        except (zlib.error, ValueError, TypeError) as error:
            raise IndexCorruptError(f"{self.path}: a thumbnail cannot be decoded ({error}); the file is damaged") from None


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, kind, value, tb):
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
        return False
