"""A Milvus-backed index's catalog (:class:`MilvusCatalog`): what :class:`catalog.Catalog` answers (cases, items, labels,
filters, thumbnails, the index's own records), from the server's collections (:mod:`milvus_collections`)."""

from __future__ import annotations

import base64
import contextlib
import json
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from ..errors import IndexCorruptError, ParameterError
from .catalog import COLUMN_FILTERS, CaseRecord, ItemArrays, ItemRecord
from .milvus_collections import (
    IDENTITY_FILTERS,
    PART_CHARS,
    PROMOTED,
    SLOT,
    MilvusCollections,
    case_fields,
    filter_text,
    id_expression,
    literal,
)
from .searchable import CaseFilter


def stored_row(case: CaseRecord) -> int:
    """The row of a case this catalog wrote or read (every one has a row)."""
    if case.row is None:
        raise ValueError(f"case {case.case_id} has no row")
    return case.row


class MilvusCatalog:
    """The catalog of a Milvus-backed index: what :class:`catalog.Catalog` answers, from the server's collections."""

    def __init__(self, collections: MilvusCollections, readonly: bool):
        self.collections = collections
        self.names = collections.names
        self.path = collections.connection.location.display
        self.readonly = readonly
        self.next_row = self.next_item = 1  # a writer's next ids (allocated by the index, reserved ahead in meta)
        self.reserve: Callable[[int, int], None] | None = None  # makes sure ids up to (row, item) are reserved
        self._pending: dict[int, tuple[CaseRecord, str | None, float]] = {}  # this writer's cases not yet complete

    # ----- records of the index itself ---------------------------------------------------------
    def set_meta(self, key: str, value: dict[str, Any]) -> None:
        """Store a JSON value under a key (in parts; stale parts of a longer earlier value removed)."""
        text = json.dumps(value)
        parts = [text[n:n + PART_CHARS] for n in range(0, len(text), PART_CHARS)] or [""]
        rows = [{"key": f"{key}#{n}", "name": key, "part": n, "value": part, "slot": SLOT} for n, part in enumerate(parts)]
        self.collections.upsert(self.names.meta, rows, f"writing {key}")
        self.collections.delete(self.names.meta, f"name == {literal(key)} and part >= {len(parts)}", f"writing {key}")

    def meta(self, key: str) -> dict[str, Any] | None:
        """A stored JSON value, or None."""
        found = self.collections.query(self.names.meta, f"name == {literal(key)}", ["part", "value"], f"reading {key}")
        if not found:
            return None
        text = "".join(e["value"] for e in sorted(found, key=lambda e: int(e["part"])))
        try:
            value = json.loads(text)
            return value if isinstance(value, dict) else None
        except ValueError:
            raise IndexCorruptError(f"{self.path}: the record '{key}' is not whole JSON; the index is damaged") from None

    def delete_meta(self, key: str) -> None:
        self.collections.delete(self.names.meta, f"name == {literal(key)}", f"removing {key}")

    def close(self) -> None:
        """Nothing to close here: the index closes the connection."""

    def transaction(self) -> contextlib.AbstractContextManager[Any]:
        """No transactions on Milvus: the order of writes and the watermark keep readers whole (module docstring)."""
        return contextlib.nullcontext()

    def integrity_problems(self) -> list[str]:
        """What the server's own collections say against the index: each there, the vector field of the model's size."""
        found = self.collections.properties()
        if found.get("vector_dim") != self.collections.dim:
            return [f"{self.names.items}: vectors of {found.get('vector_dim')} dimensions on the server, the model's "
                    f"{self.collections.dim}"]
        return []

    # ----- cases --------------------------------------------------------------------------------
    def _case(self, entity: dict[str, Any]) -> CaseRecord:
        try:
            data = json.loads(entity["record"])
            row = int(entity["row"])
            case = CaseRecord(entity["case_id"], entity["source"], data.get("name") or "", entity["series_uid"] or None,
                              data.get("checksum"), data.get("modality"), data.get("body_part"), data.get("shape") or [],
                              data.get("spacing") or [], data.get("ijk_to_ras") or [], data.get("labels") or [],
                              data.get("metadata") or {}, entity["status"], row)
        except (KeyError, TypeError, ValueError) as error:
            raise IndexCorruptError(f"{self.path}: a case record cannot be decoded ({error}); the index is damaged") from None
        if int(entity.get("item_count") or 0) > 0:
            self.collections.ranges[row] = (int(entity["first_item"]), int(entity["item_count"]))
        if case.status == "complete":
            self.collections.cases[row] = case
            while len(self.collections.cases) > 4096:
                self.collections.cases.popitem(last=False)
        return case

    _CASE_FIELDS = ["row", "case_id", "source", "series_uid", "status", "record", "first_item", "item_count"]

    def _cases(self, expression: str, what: str = "reading cases") -> list[CaseRecord]:
        found = self.collections.query(self.names.cases, expression, self._CASE_FIELDS, what)
        return [self._case(e) for e in sorted(found, key=lambda e: int(e["row"]))]

    def _entity(self, case: CaseRecord, digest: str | None, added_at: float) -> dict[str, Any]:
        record = {"name": case.name, "checksum": case.checksum, "modality": case.modality, "body_part": case.body_part,
                  "shape": case.shape, "spacing": case.spacing, "ijk_to_ras": case.ijk_to_ras, "labels": case.labels,
                  "metadata": case.metadata, "added_at": added_at}
        text = json.dumps(record)
        if len(text) > 65_535:
            raise ParameterError(f"case {case.case_id}: its record ({len(text)} characters of JSON) is longer than a Milvus text "
                                 "field holds (65,535); its metadata is too large")
        row = stored_row(case)
        first, count = self.collections.ranges.get(row, (0, 0))
        return {"row": row, "case_id": case.case_id, "source": case.source[:4096], "series_uid": case.series_uid or "",
                "shape": json.dumps([int(n) for n in case.shape]), "status": case.status, "digest": digest or "",
                "record": text, "first_item": first, "item_count": count, "slot": SLOT}

    def add_case(self, case: CaseRecord, added_at: float, digest: str | None = None) -> int:
        """Insert a case (status 'pending' until its vectors are saved); returns its row id."""
        row = self.next_row
        if self.reserve is not None:
            self.reserve(row + 1, self.next_item)
        self.next_row += 1
        case.row = row
        case.status = "pending"
        self.collections.upsert(self.names.cases, [self._entity(case, digest, added_at)], f"writing case {case.case_id}")
        self._pending[row] = (case, digest, added_at)
        return row

    def _known(self, row: int) -> tuple[CaseRecord, str | None, float]:
        """A case as this writer holds it (pending), else as stored: record, voxel digest, when added."""
        if int(row) in self._pending:
            return self._pending[int(row)]
        stored = self.collections.query(self.names.cases, f"row == {int(row)}", self._CASE_FIELDS + ["digest"], "reading a case")
        if not stored:
            raise IndexCorruptError(f"{self.path}: case row {row} is missing; the index is damaged")
        return self._case(stored[0]), stored[0]["digest"] or None, float(json.loads(stored[0]["record"]).get("added_at") or 0)

    def cases(self, status: str | None = "complete") -> list[CaseRecord]:
        """All cases (of a status, or any status with None)."""
        return self._cases(f"status == {literal(status)}" if status else "row >= 0")

    def case_by_id(self, case_id: str) -> CaseRecord | None:
        """A case by its public id."""
        found = self._cases(f"case_id == {literal(case_id)}")
        return found[0] if found else None

    def case_by_row(self, row_id: int) -> CaseRecord:
        """A case by its row id."""
        cached = self.collections.cases.get(int(row_id))
        if cached is not None:
            return cached
        found = self._cases(f"row == {int(row_id)}")
        if not found:
            raise IndexCorruptError(f"{self.path}: case row {row_id} is missing; the index is damaged")
        return found[0]

    def set_case_labels(self, row: int, labels: list[str], metadata: dict[str, Any]) -> None:
        """Replace a case's labels and metadata, and the filterable fields of its items."""
        case, digest, added = self._known(row)
        case.labels, case.metadata = list(labels), dict(metadata)
        self.collections.upsert(self.names.cases, [self._entity(case, digest, added)], f"labelling {case.case_id}")
        fields = case_fields(case)
        items = self.collections.query(self.names.items, f"case_row == {int(row)}", ["*"], f"reading the items of {case.case_id}")
        self.collections.upsert(self.names.items, [{**e, **fields} for e in items], f"labelling the items of {case.case_id}")
        self.collections.forget([row])

    def set_status(self, rows: Iterable[int], status: str) -> None:
        """Mark cases complete (or pending)."""
        entities = []
        for row in rows:
            case, digest, added = self._known(row)
            case.status = status
            entities.append(self._entity(case, digest, added))
            if status == "complete":
                self._pending.pop(int(row), None)
        self.collections.upsert(self.names.cases, entities, "marking cases complete")

    def delete_cases(self, rows: Iterable[int]) -> None:
        """Delete cases with their items and thumbnails; the case rows last, so a writer killed midway leaves a pending case
        that the next writer purges again, never items without a case."""
        rows = [int(r) for r in rows]
        if not rows:
            return
        listed = f"[{','.join(map(str, rows))}]"
        self.collections.delete(self.names.items, f"case_row in {listed}", "removing items")
        self.collections.delete(self.names.thumbnails, f"case_row in {listed}", "removing thumbnails")
        self.collections.delete(self.names.cases, f"row in {listed}", "removing cases")
        self.collections.forget(rows)
        for row in rows:
            self._pending.pop(row, None)

    def set_content(self, row: int, digest: str) -> None:
        """Record what a case's voxels are (:attr:`Volume.voxel_digest`)."""
        case, _, added = self._known(row)
        if int(row) in self._pending:
            self._pending[int(row)] = (case, digest, added)
        self.collections.upsert(self.names.cases, [self._entity(case, digest, added)], "writing a case's digest")

    def case_rows_with_content(self, shape: Sequence[int], digest_of: Callable[[], str]) -> list[int]:
        """Rows of the cases whose voxels are the same; ``digest_of`` is only called when some case has the shape."""
        found = self.collections.query(self.names.cases, f"shape == {literal(json.dumps([int(n) for n in shape]))} and digest != \"\"",
                                       ["row", "digest"], "reading cases")
        if not found:
            return []
        digest = digest_of()
        return [int(e["row"]) for e in found if e["digest"] == digest]

    def case_rows_of_series(self, series_uid: str) -> list[int]:
        """Rows of the cases indexed from a DICOM series."""
        return [int(e["row"]) for e in self.collections.query(self.names.cases, f"series_uid == {literal(series_uid)}", ["row"],
                                                              "reading cases")]

    def case_rows_of_sources(self, sources: Iterable[str]) -> list[int]:
        """Rows of the cases indexed from some source paths."""
        sources = list(sources)
        if not sources:
            return []
        listed = "[" + ",".join(literal(s) for s in sources) + "]"
        return [int(e["row"]) for e in self.collections.query(self.names.cases, f"source in {listed}", ["row"], "reading cases")]

    def filter_fields(self) -> list[str]:
        """Fields some complete case has a value for: filterable columns, 'label' and metadata keys."""
        cases = self.cases()
        fields = [c for c in COLUMN_FILTERS if any(getattr(case, c, None) not in (None, "") for case in cases)]
        if any(case.labels for case in cases):
            fields.append("label")
        keys = sorted({k for case in cases for k, v in case.metadata.items() if v is not None and not isinstance(v, (dict, list))})
        return fields + [k for k in keys if k not in fields]

    def case_rows_matching(self, filters: dict[str, str]) -> list[int]:
        """Rows of complete cases whose columns, labels or metadata equal the filter values (all must match; any case)."""
        self._check_fields(filters)

        def matches(case: CaseRecord) -> bool:
            for key, value in filters.items():
                wanted = filter_text(value)
                if key in COLUMN_FILTERS:
                    have = [filter_text(getattr(case, key))]
                elif key in ("label", "labels"):
                    have = [filter_text(label) for label in case.labels]
                else:
                    have = [filter_text(case.metadata.get(key))] if key in case.metadata else []
                if wanted not in have:
                    return False
            return True

        return [stored_row(case) for case in self.cases() if matches(case)]

    def _check_fields(self, filters: dict[str, str]) -> None:
        known = self.filter_fields()
        unknown = [k for k in filters if (k if k != "labels" else "label") not in known]
        if unknown:
            raise ParameterError(f"filter field '{unknown[0]}': no case of the index has it; fields that exist: "
                                 f"{', '.join(known) or 'none'}")

    def case_filter(self, filters: dict[str, str]) -> CaseFilter:
        """The filters as a condition on the items' own fields, evaluated inside Milvus's search."""
        self._check_fields(filters)
        clauses = []
        for key, value in filters.items():
            wanted = literal(filter_text(value))
            if key in ("modality", "body_part", *PROMOTED):
                clauses.append(f"{key} == {wanted}")
            elif key in ("label", "labels"):
                clauses.append(f"array_contains(labels, {wanted})")
            elif key in IDENTITY_FILTERS:
                rows = self.case_rows_matching({key: value})
                clauses.append(f"case_row in [{','.join(map(str, rows))}]" if rows else "false")
            else:
                clauses.append(f"extra[{literal(key)}] == {wanted}")
        # Whether any case passes is counted on the cases (few), not the items (a filtered count of millions of items is a
        # scan); both compare the same lower-case text.
        matching = tuple(self.case_rows_matching(filters))
        return CaseFilter(dict(filters), " and ".join(clauses), len(matching), tuple(matching))

    # ----- items --------------------------------------------------------------------------------
    def add_items(self, case_row: int, items: list[ItemRecord], vectors: np.ndarray) -> np.ndarray:
        """Insert a case's items with their vectors; returns their ids, in order."""
        case = self._known(case_row)[0]
        start = self.next_item
        if self.reserve is not None:
            self.reserve(self.next_row, start + len(items))
        self.next_item += len(items)
        fields = case_fields(case)
        self.collections.ranges[int(case_row)] = (start, len(items))  # kept with the case when it is marked complete
        vectors = np.ascontiguousarray(vectors, np.float32)
        entities = []
        for n, item in enumerate(items):
            item.id, item.case_row = start + n, int(case_row)
            place = json.dumps({"box": [int(v) for v in item.box], "low": [float(v) for v in item.low_ras],
                                "high": [float(v) for v in item.high_ras]})
            entities.append({"id": start + n, "case_row": int(case_row), "kind": item.kind, "axis": item.axis,
                             "slice_index": int(item.slice_index), "plane": int(item.plane), "ras_r": float(item.ras[0]),
                             "ras_a": float(item.ras[1]), "ras_s": float(item.ras[2]), "size_mm": float(item.size_mm),
                             "place": place, **fields, "vector": vectors[n]})
        self.collections.upsert(self.names.items, entities, f"writing the items of {case.case_id}")
        return np.arange(start, start + len(items), dtype=np.int64)

    _ITEM_FIELDS = ["id", "case_row", "kind", "axis", "slice_index", "plane", "ras_r", "ras_a", "ras_s", "size_mm", "place"]

    def _item(self, entity: dict[str, Any]) -> ItemRecord:
        try:
            place = json.loads(entity["place"])
            return ItemRecord(entity["kind"], entity["axis"], int(entity["slice_index"]), int(entity["plane"]),
                              (float(entity["ras_r"]), float(entity["ras_a"]), float(entity["ras_s"])), tuple(place["box"]),
                              tuple(place["low"]), tuple(place["high"]), float(entity["size_mm"]), int(entity["id"]),
                              int(entity["case_row"]))
        except (KeyError, TypeError, ValueError) as error:
            raise IndexCorruptError(f"{self.path}: an item cannot be decoded ({error}); the index is damaged") from None

    def items(self, ids: Iterable[int]) -> dict[int, ItemRecord]:
        """Items by id."""
        ids = np.asarray([int(i) for i in ids], np.int64)
        if not len(ids):
            return {}
        found = self.collections.query(self.names.items, id_expression(ids), self._ITEM_FIELDS, "reading items")
        return {int(e["id"]): self._item(e) for e in found}

    def items_of_cases(self, case_rows: Iterable[int]) -> dict[int, list[ItemRecord]]:
        """Every item of the given cases, grouped by case row."""
        rows = [int(r) for r in case_rows]
        grouped: dict[int, list[ItemRecord]] = {r: [] for r in rows}
        if rows:
            found = self.collections.query(self.names.items, f"case_row in [{','.join(map(str, rows))}]", self._ITEM_FIELDS,
                                           "reading items")
            for entity in sorted(found, key=lambda e: int(e["id"])):
                grouped[int(entity["case_row"])].append(self._item(entity))
        return grouped

    def item_ids(self, case_rows: Iterable[int] | None = None) -> np.ndarray:
        """Ids of the items of some cases (or of all complete, committed cases), sorted: from the cases' id ranges."""
        if case_rows is None:
            self.collections.visible()
            committed = self.collections.committed_row
            rows = [row for row in map(stored_row, self.cases()) if row <= committed]
        else:
            rows = [int(r) for r in case_rows]
        ranges = self.collections.ranges
        unknown = [r for r in rows if r not in ranges]
        if unknown:
            listed = ",".join(map(str, unknown))
            for entity in self.collections.query(self.names.cases, f"row in [{listed}]", ["row", "first_item", "item_count"],
                                                 "reading cases"):
                if int(entity["item_count"] or 0) > 0:
                    ranges[int(entity["row"])] = (int(entity["first_item"]), int(entity["item_count"]))
        known = [ranges[r] for r in rows if r in ranges]
        ids = [np.arange(first, first + count, dtype=np.int64) for first, count in known]
        asked = [r for r in rows if r not in ranges]  # pending cases of a killed writer: their items as stored
        if asked:
            found = self.collections.query(self.names.items, f"case_row in [{','.join(map(str, asked))}]", ["id"],
                                           "reading item ids")
            ids.append(np.array([int(e["id"]) for e in found], np.int64))
        return np.sort(np.concatenate(ids)) if ids else np.zeros(0, np.int64)

    def item_arrays(self, case_rows: Iterable[int]) -> ItemArrays:
        """The items of some cases as arrays, ordered by id (their vectors kept for the store's :meth:`vectors_of`)."""
        blocks = self.collections.case_blocks(case_rows)
        if not blocks:
            return ItemArrays(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, dtype=object), np.zeros((0, 3)),
                              np.zeros(0))
        rows = sorted(blocks, key=lambda r: int(blocks[r].ids[0]) if len(blocks[r].ids) else 0)
        ids = np.concatenate([blocks[r].ids for r in rows])
        order = np.argsort(ids, kind="stable")
        return ItemArrays(ids[order], np.concatenate([np.full(len(blocks[r].ids), r, np.int64) for r in rows])[order],
                          np.concatenate([blocks[r].axes for r in rows])[order],
                          np.concatenate([blocks[r].centres for r in rows])[order], np.concatenate([blocks[r].sizes for r in rows])[order])

    def item_ids_of_kinds(self, kinds: Iterable[str], negate: bool = False) -> np.ndarray:
        """Ids of the items of some kinds (or, with ``negate``, of every other kind), sorted."""
        listed = "[" + ",".join(literal(k) for k in kinds) + "]"
        found = self.collections.query(self.names.items, f"kind {'not in' if negate else 'in'} {listed}", ["id"], "reading items")
        return np.sort(np.array([int(e["id"]) for e in found], np.int64))

    def case_rows_of_items(self, ids: Iterable[int]) -> dict[int, int]:
        """Case row of each item id (from what the search returned, else asked)."""
        known = self.collections.row_of_item
        ids = [int(i) for i in ids]
        missing = np.array([i for i in ids if i not in known], np.int64)
        if len(missing):
            for entity in self.collections.query(self.names.items, id_expression(missing), ["id", "case_row"], "reading items"):
                known[int(entity["id"])] = int(entity["case_row"])
        return {i: known[i] for i in ids if i in known}

    def count(self, table: str) -> int:
        """Rows in a table (cases counts complete ones only; items those of committed cases)."""
        if table == "cases":
            return self.collections.count(self.names.cases, 'status == "complete"')
        if table == "items":  # every stored item (a writer's pending ones too): a filtered count is a scan on milvus-lite
            return self.collections.count(self.names.items)
        if table == "thumbnails":
            return self.collections.count(self.names.thumbnails)
        if table in ("tombstones", "contents"):
            return 0 if table == "tombstones" else self.collections.count(self.names.cases, 'digest != ""')
        raise ValueError(f"no table {table}")

    # ----- tombstones: Milvus deletes for real ----------------------------------------------------
    def add_tombstones(self, ids: Iterable[int]) -> None:
        raise NotImplementedError("a Milvus-backed index deletes items for real; it keeps no tombstones")

    def tombstones(self) -> np.ndarray:
        """None: Milvus deletes for real."""
        return np.zeros(0, np.int64)

    def clear_tombstones(self) -> None:
        """Nothing to clear."""

    # ----- thumbnails ---------------------------------------------------------------------------
    def add_thumbnails(self, case_row: int, thumbnails: dict[tuple[str, int], np.ndarray]) -> None:
        """Store a case's slice thumbnails (uint8 grey, zlib'd, base64)."""
        rows = []
        for (axis, plane), grey in thumbnails.items():
            grey = np.ascontiguousarray(grey, dtype=np.uint8)
            packed = base64.b64encode(zlib.compress(grey.tobytes(), 6)).decode()
            rows.append({"key": f"{int(case_row)}:{axis}:{int(plane)}", "case_row": int(case_row),
                         "pixels": f"{grey.shape[0]},{grey.shape[1]},{packed}", "slot": SLOT})
        self.collections.upsert(self.names.thumbnails, rows, "writing thumbnails")

    def add_thumbnail(self, case_row: int, axis: str, plane: int, grey: np.ndarray) -> None:
        """Store one slice's thumbnail."""
        self.add_thumbnails(case_row, {(axis, plane): grey})

    def thumbnail(self, case_row: int, axis: str, plane: int) -> np.ndarray | None:
        """The stored thumbnail of a slice, as uint8 (rows, cols), or None."""
        found = self.collections.call("reading a thumbnail", "get", self.names.thumbnails, ids=[f"{int(case_row)}:{axis}:{int(plane)}"],
                                      output_fields=["pixels"])
        if not found:
            return None
        try:
            rows, cols, packed = found[0]["pixels"].split(",", 2)
            return np.frombuffer(zlib.decompress(base64.b64decode(packed)), dtype=np.uint8).reshape(int(rows), int(cols))
        except (zlib.error, ValueError, TypeError) as error:
            raise IndexCorruptError(f"{self.path}: a thumbnail cannot be decoded ({error}); the index is damaged") from None
