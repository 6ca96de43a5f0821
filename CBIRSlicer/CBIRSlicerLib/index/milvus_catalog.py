"""A Milvus-backed index's catalog and vectors: four collections on the server, read and written as the folder's
SQLite catalog and FAISS store are (:mod:`searchable`).

::

    COLLECTION              one entity per item: id (the item id), case row, kind, axis, slice, plane, centre and size
                            (what ranking reads), its box and bounds (JSON), the filterable fields of its case (modality,
                            body part, study date, keyed patient hash, labels, other metadata as JSON; lower case) and its
                            vector; vector index HNSW (M 32, efConstruction 80) or FLAT, inner product; INVERTED on case_row
    COLLECTION_cases        one entity per case: row, case id, source, series UID, shape, status, voxel digest, and the
                            whole CaseRecord as JSON
    COLLECTION_thumbnails   one per indexed slice: zlib'd uint8 pixels, base64
    COLLECTION_meta         the index's own records by name (the manifest, the fitted transform, the calibration, the
                            writer's lease), JSON split in parts of at most 60,000 characters

Every Milvus collection must hold a vector field: the last three carry a constant 2-d ``slot``. Why the case's filterable
fields are copied onto its items: a filter then runs inside the approximate search (Milvus evaluates the expression
per segment before the graph walk), so a filtered query walks only allowed items, as FAISS's id selectors do for the
folder, without shipping the allowed ids (millions, at a department's scale). A label given later rewrites the case's
items (a few thousand entities).

What a reader sees: only items of cases at or below the manifest's ``committed_row`` (the rows a writer's last
checkpoint made complete; rows only grow), so a reader never finds a case whose vectors are half written, and a
killed writer's pending cases (purged by the next writer) are never searched. Milvus has no transactions: the order
of writes (case row first, pending; then its thumbnails and items; the status and the watermark at the checkpoint)
is what the folder's SQLite transaction gave.

Vectors come back from Milvus as Python lists, slowly: a case's items are read once with their vectors (the search
scores every candidate case over all its items) and kept per case in a bounded cache (``CBIR_MILVUS_CACHE_MB``, 512 MB by
default); a complete case's items never change, so the cache is never stale.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import IndexCorruptError, ModelError, ParameterError
from .catalog import COLUMN_FILTERS, CaseRecord, ItemArrays, ItemRecord
from .milvus_connection import MilvusConnection
from .searchable import Allowed, CaseFilter

PART_CHARS = 60_000  # a meta record's parts (Milvus's VARCHAR holds at most 65,535 characters)
BATCH = 2_000  # entities per upsert (512-d: 4 MB a request)
READ_BATCH = 4_096  # rows per query-iterator page (Milvus allows 16,384)
SLOT = [1.0, 0.0]  # the constant vector of the cases, thumbnails and meta collections
HNSW_M, HNSW_EF_CONSTRUCTION = 32, 80  # as the folder's HNSW (faiss_store)
HNSW_EF_SEARCH = 1024  # as the folder's
MANIFEST_REFRESH_SECONDS = 2.0  # a reader looks at the manifest (the watermark) at most this often
CACHE_VARIABLE = "CBIR_MILVUS_CACHE_MB"
PROMOTED = ("study_date", "patient_key")  # metadata keys with fields of their own on the items (filtered most)
MAX_LABELS = 64
IDENTITY_FILTERS = ("case_id", "name", "source", "series_uid")  # a case's own identity: filtered by its rows


@dataclass(frozen=True)
class CollectionNames:
    """The four collections of one index."""

    items: str

    @property
    def cases(self) -> str:
        return f"{self.items}_cases"

    @property
    def thumbnails(self) -> str:
        return f"{self.items}_thumbnails"

    @property
    def meta(self) -> str:
        return f"{self.items}_meta"

    def all(self) -> tuple[str, str, str, str]:
        return self.items, self.cases, self.thumbnails, self.meta


def filter_text(value: Any) -> str:
    """A value as filters compare it: text, lower case (SQLite's ``lower(CAST(... AS TEXT))`` in the folder's catalog)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value).strip().lower() if value is not None else ""


def literal(text: str) -> str:
    """A string literal of Milvus's expression language."""
    return json.dumps(text, ensure_ascii=False)


def id_expression(ids: np.ndarray, field: str = "id") -> str:
    """A condition true for exactly these ids, as runs (a case's items have consecutive ids) and single ids."""
    ids = np.unique(np.asarray(ids, np.int64))
    if not len(ids):
        return "false"
    breaks = np.flatnonzero(np.diff(ids) != 1)
    starts, ends = ids[np.r_[0, breaks + 1]], ids[np.r_[breaks, len(ids) - 1]]
    single = starts[starts == ends]
    clauses = [f"({field} >= {a} and {field} <= {b})" for a, b in zip(starts, ends) if a != b]
    if len(single):
        clauses.append(f"{field} in [{','.join(str(int(i)) for i in single)}]")
    return "(" + " or ".join(clauses) + ")"


def case_fields(case: CaseRecord) -> dict[str, Any]:
    """The filterable fields a case gives each of its items (lower case; what the folder's filters compare)."""
    meta = case.metadata or {}
    extra = {str(k): filter_text(v) for k, v in meta.items() if isinstance(v, (str, int, float, bool)) and k not in PROMOTED}
    return {"modality": filter_text(case.modality)[:64], "body_part": filter_text(case.body_part)[:64],
            "study_date": filter_text(meta.get("study_date"))[:32], "patient_key": filter_text(meta.get("patient_key"))[:64],
            "labels": [filter_text(label)[:256] for label in case.labels][:MAX_LABELS], "extra": extra}


@dataclass
class CaseBlock:
    """A case's items as arrays, ordered by id, with their vectors."""

    ids: np.ndarray
    axes: np.ndarray
    centres: np.ndarray
    sizes: np.ndarray
    vectors: np.ndarray

    @property
    def bytes(self) -> int:
        return int(self.vectors.nbytes + self.centres.nbytes + 64 * len(self.ids))


def schemas(dim: int, vector_index: dict) -> dict[str, tuple[Any, Any]]:
    """(schema, index parameters) of each collection kind, for vectors of ``dim``."""
    from pymilvus import DataType, MilvusClient

    def slot_index(schema):
        schema.add_field("slot", DataType.FLOAT_VECTOR, dim=2)
        params = MilvusClient.prepare_index_params()
        params.add_index("slot", index_type="FLAT", metric_type="L2")
        return schema, params

    items = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    items.add_field("id", DataType.INT64, is_primary=True)
    items.add_field("case_row", DataType.INT64)
    items.add_field("kind", DataType.VARCHAR, max_length=32)
    items.add_field("axis", DataType.VARCHAR, max_length=16)
    items.add_field("slice_index", DataType.INT64)
    items.add_field("plane", DataType.INT64)
    for name in ("ras_r", "ras_a", "ras_s", "size_mm"):
        items.add_field(name, DataType.DOUBLE)
    items.add_field("place", DataType.VARCHAR, max_length=1024)
    items.add_field("modality", DataType.VARCHAR, max_length=64)
    items.add_field("body_part", DataType.VARCHAR, max_length=64)
    items.add_field("study_date", DataType.VARCHAR, max_length=32)
    items.add_field("patient_key", DataType.VARCHAR, max_length=64)
    items.add_field("labels", DataType.ARRAY, element_type=DataType.VARCHAR, max_capacity=MAX_LABELS, max_length=256)
    items.add_field("extra", DataType.JSON)
    items.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
    item_params = MilvusClient.prepare_index_params()
    item_params.add_index("vector", **vector_index)
    for name in ("case_row", "modality", "body_part", "study_date", "patient_key"):
        item_params.add_index(name, index_type="INVERTED")

    cases = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    cases.add_field("row", DataType.INT64, is_primary=True)
    cases.add_field("case_id", DataType.VARCHAR, max_length=128)
    cases.add_field("source", DataType.VARCHAR, max_length=4096)
    cases.add_field("series_uid", DataType.VARCHAR, max_length=256)
    cases.add_field("shape", DataType.VARCHAR, max_length=128)
    cases.add_field("status", DataType.VARCHAR, max_length=16)
    cases.add_field("digest", DataType.VARCHAR, max_length=128)
    cases.add_field("first_item", DataType.INT64)  # a case's items have consecutive ids: first_item .. + item_count - 1
    cases.add_field("item_count", DataType.INT64)
    cases.add_field("record", DataType.VARCHAR, max_length=65_535)
    thumbnails = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    thumbnails.add_field("key", DataType.VARCHAR, is_primary=True, max_length=128)
    thumbnails.add_field("case_row", DataType.INT64)
    thumbnails.add_field("pixels", DataType.VARCHAR, max_length=65_535)
    meta = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    meta.add_field("key", DataType.VARCHAR, is_primary=True, max_length=256)
    meta.add_field("name", DataType.VARCHAR, max_length=200)
    meta.add_field("part", DataType.INT64)
    meta.add_field("value", DataType.VARCHAR, max_length=65_535)
    return {"items": (items, item_params), "cases": slot_index(cases), "thumbnails": slot_index(thumbnails),
            "meta": slot_index(meta)}


class MilvusCollections:
    """The connection and collections of one index, and what its catalog and vector views share: the watermark, the
    id allocation of a writer, the per-case cache of items and vectors."""

    def __init__(self, connection: MilvusConnection, names: CollectionNames, dim: int):
        self.connection = connection
        self.names = names
        self.dim = dim
        self.committed_row = 0  # items of cases above this row are not searched (a writer's work in progress)
        self.manifest_seen = 0.0  # when a reader last read the manifest (its watermark)
        self.refresh: Callable[[], None] | None = None  # reads the manifest again (set by the index)
        self.blocks: OrderedDict[int, CaseBlock] = OrderedDict()
        self.block_bytes = 0
        self.cache_bytes = int(float(os.environ.get(CACHE_VARIABLE, "512")) * 2**20)
        self.row_of_item: dict[int, int] = {}  # case row of the items recent searches returned
        self.cases: OrderedDict[int, CaseRecord] = OrderedDict()  # recently read case records by row
        self.ranges: dict[int, tuple[int, int]] = {}  # case row -> (its first item id, how many): its items without a query
        connection.on_reload = lambda _connection: self.load()

    # ----- the collections ----------------------------------------------------------------------
    def call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """A call of the client, retried while the server does not answer."""
        return self.connection.call(what, method, *args, **kwargs)

    def exists(self) -> bool:
        """Whether the index's collections are there (all four, or it is damaged: IndexCorruptError)."""
        found = set(self.call("listing collections", "list_collections"))
        present = [n for n in self.names.all() if n in found]
        if present and len(present) < 4:
            missing = ", ".join(n for n in self.names.all() if n not in found)
            raise IndexCorruptError(f"{self.connection.location.display}: the collection(s) {missing} are missing; the index is "
                                    "damaged (drop its collections and build it again)")
        return bool(present)

    def create(self, vector_index: dict, properties: dict[str, str]) -> None:
        """The four collections, empty, with their indexes, loaded."""
        made = schemas(self.dim, vector_index)
        for kind, name in zip(("items", "cases", "thumbnails", "meta"), self.names.all()):
            schema, params = made[kind]
            self.call(f"creating {name}", "create_collection", name, schema=schema, index_params=params,
                      consistency_level="Strong", properties=properties if kind == "items" else None)
        self.load()

    def load(self) -> None:
        """Load every collection into the server's memory (again after a restart)."""
        for name in self.names.all():
            self.connection.client().load_collection(name)

    def properties(self) -> dict[str, Any]:
        """The items collection's properties and vector field (what the server itself says the index is)."""
        described = self.call("describing the collection", "describe_collection", self.names.items)
        dims = [int(f.get("params", {}).get("dim", 0)) for f in described.get("fields", []) if f.get("name") == "vector"]
        return {**(described.get("properties") or {}), "vector_dim": dims[0] if dims else None}

    def drop(self) -> None:
        """Drop the index's collections (a failed create, or a test)."""
        for name in self.names.all():
            self.call(f"dropping {name}", "drop_collection", name)

    def upsert(self, collection: str, rows: list[dict], what: str) -> None:
        """Write entities by primary key, a batch at a time (asked again after a lost answer, nothing doubles)."""
        for start in range(0, len(rows), BATCH):
            self.call(what, "upsert", collection, rows[start:start + BATCH])

    def delete(self, collection: str, expression: str, what: str) -> None:
        self.call(what, "delete", collection, filter=expression)

    def query(self, collection: str, expression: str, fields: list[str], what: str) -> list[dict]:
        """Every entity matching an expression (paged; the whole reading asked again if the server stops answering)."""

        def read(client: Any) -> list[dict]:
            found: list[dict] = []
            pages = client.query_iterator(collection, batch_size=READ_BATCH, filter=expression, output_fields=fields)
            try:
                while True:
                    page = pages.next()
                    if not page:
                        return found
                    found.extend(page)
            finally:
                pages.close()

        return self.connection.retrying(what, read)

    def count(self, collection: str, expression: str = "") -> int:
        """How many entities match an expression."""
        found = self.call("counting", "query", collection, filter=expression, output_fields=["count(*)"])
        return int(found[0]["count(*)"]) if found else 0

    # ----- what readers may see -----------------------------------------------------------------
    def visible(self) -> str:
        """The condition on items every search and reading of complete cases adds: committed rows only."""
        if self.refresh is not None and time.monotonic() - self.manifest_seen > MANIFEST_REFRESH_SECONDS:
            self.refresh()
        return f"case_row <= {int(self.committed_row)}"

    # ----- the per-case cache -------------------------------------------------------------------
    def case_blocks(self, rows: Iterable[int]) -> dict[int, CaseBlock]:
        """The items and vectors of some cases (read once per case, then from the cache)."""
        rows = [int(r) for r in rows]
        wanted = [r for r in dict.fromkeys(rows) if r not in self.blocks]
        fresh: dict[int, CaseBlock] = {}
        if wanted:
            found = self.query(self.names.items, f"case_row in [{','.join(map(str, wanted))}]",
                               ["id", "case_row", "axis", "ras_r", "ras_a", "ras_s", "size_mm", "vector"], "reading items")
            by_row: dict[int, list[dict]] = {r: [] for r in wanted}
            for entity in found:
                by_row.setdefault(int(entity["case_row"]), []).append(entity)
            for row, entities in by_row.items():
                entities.sort(key=lambda e: int(e["id"]))
                vectors = np.array([e["vector"] for e in entities], np.float32).reshape(len(entities), self.dim)
                fresh[row] = CaseBlock(np.array([int(e["id"]) for e in entities], np.int64),
                                       np.array([e["axis"] for e in entities], dtype=object),
                                       np.array([[e["ras_r"], e["ras_a"], e["ras_s"]] for e in entities], np.float64).reshape(-1, 3),
                                       np.array([e["size_mm"] for e in entities], np.float64), vectors)
            for row, block in fresh.items():
                if row <= self.committed_row:  # complete: its items never change again
                    self._keep(row, block)
        out = {}
        for row in rows:
            block = fresh.get(row) or self.blocks.get(row)
            if block is not None:
                if row in self.blocks:
                    self.blocks.move_to_end(row)
                out[row] = block
        return out

    def _keep(self, row: int, block: CaseBlock) -> None:
        self.blocks[row] = block
        self.block_bytes += block.bytes
        for item in block.ids.tolist():
            self.row_of_item[item] = row
        while self.block_bytes > self.cache_bytes and len(self.blocks) > 1:
            _, dropped = self.blocks.popitem(last=False)
            self.block_bytes -= dropped.bytes

    def forget(self, rows: Iterable[int] | None = None) -> None:
        """Drop cached cases (all of them with None): their items changed (labels) or were removed."""
        for row in list(self.blocks) if rows is None else [int(r) for r in rows]:
            block = self.blocks.pop(row, None)
            if block is not None:
                self.block_bytes -= block.bytes
            self.cases.pop(row, None)
            self.ranges.pop(row, None)
        if rows is None:
            self.cases.clear()
        if len(self.row_of_item) > 2_000_000:
            self.row_of_item.clear()


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
    def set_meta(self, key: str, value: dict) -> None:
        """Store a JSON value under a key (in parts; stale parts of a longer earlier value removed)."""
        text = json.dumps(value)
        parts = [text[n:n + PART_CHARS] for n in range(0, len(text), PART_CHARS)] or [""]
        rows = [{"key": f"{key}#{n}", "name": key, "part": n, "value": part, "slot": SLOT} for n, part in enumerate(parts)]
        self.collections.upsert(self.names.meta, rows, f"writing {key}")
        self.collections.delete(self.names.meta, f"name == {literal(key)} and part >= {len(parts)}", f"writing {key}")

    def meta(self, key: str) -> dict | None:
        """A stored JSON value, or None."""
        found = self.collections.query(self.names.meta, f"name == {literal(key)}", ["part", "value"], f"reading {key}")
        if not found:
            return None
        text = "".join(e["value"] for e in sorted(found, key=lambda e: int(e["part"])))
        try:
            return json.loads(text)
        except ValueError:
            raise IndexCorruptError(f"{self.path}: the record '{key}' is not whole JSON; the index is damaged") from None

    def delete_meta(self, key: str) -> None:
        self.collections.delete(self.names.meta, f"name == {literal(key)}", f"removing {key}")

    def close(self) -> None:
        """Nothing to close here: the index closes the connection."""

    def transaction(self) -> contextlib.AbstractContextManager:
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
    def _case(self, entity: dict) -> CaseRecord:
        try:
            data = json.loads(entity["record"])
            case = CaseRecord(entity["case_id"], entity["source"], data.get("name") or "", entity["series_uid"] or None,
                              data.get("checksum"), data.get("modality"), data.get("body_part"), data.get("shape") or [],
                              data.get("spacing") or [], data.get("ijk_to_ras") or [], data.get("labels") or [],
                              data.get("metadata") or {}, entity["status"], int(entity["row"]))
        except (KeyError, TypeError, ValueError) as error:
            raise IndexCorruptError(f"{self.path}: a case record cannot be decoded ({error}); the index is damaged") from None
        if int(entity.get("item_count") or 0) > 0:
            self.collections.ranges[case.row] = (int(entity["first_item"]), int(entity["item_count"]))
        if case.status == "complete":
            self.collections.cases[case.row] = case
            while len(self.collections.cases) > 4096:
                self.collections.cases.popitem(last=False)
        return case

    _CASE_FIELDS = ["row", "case_id", "source", "series_uid", "status", "record", "first_item", "item_count"]

    def _cases(self, expression: str, what: str = "reading cases") -> list[CaseRecord]:
        found = self.collections.query(self.names.cases, expression, self._CASE_FIELDS, what)
        return [self._case(e) for e in sorted(found, key=lambda e: int(e["row"]))]

    def _entity(self, case: CaseRecord, digest: str | None, added_at: float) -> dict:
        record = {"name": case.name, "checksum": case.checksum, "modality": case.modality, "body_part": case.body_part,
                  "shape": case.shape, "spacing": case.spacing, "ijk_to_ras": case.ijk_to_ras, "labels": case.labels,
                  "metadata": case.metadata, "added_at": added_at}
        text = json.dumps(record)
        if len(text) > 65_535:
            raise ParameterError(f"case {case.case_id}: its record ({len(text)} characters of JSON) is longer than a Milvus text "
                                 "field holds (65,535); its metadata is too large")
        first, count = self.collections.ranges.get(int(case.row), (0, 0))
        return {"row": int(case.row), "case_id": case.case_id, "source": case.source[:4096], "series_uid": case.series_uid or "",
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

    def set_case_labels(self, row: int, labels: list[str], metadata: dict) -> None:
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

        return [case.row for case in self.cases() if matches(case)]

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

    def _item(self, entity: dict) -> ItemRecord:
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
            rows = [c.row for c in self.cases() if c.row <= committed]
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


class MilvusVectors:
    """The vectors of a Milvus-backed index: nearest items filtered inside the search, and stored vectors by id."""

    def __init__(self, collections: MilvusCollections, kind: str, metric_params: dict):
        self.collections = collections
        self.names = collections.names
        self.dim = collections.dim
        self.kind = kind  # the vector index on the server: 'hnsw' or 'flat'
        self.metric_params = metric_params
        self.ef_search = HNSW_EF_SEARCH
        self.rows = None  # no float16 rows file (what faiss_store's compressed store has)
        self.transform = None

    scores_transformed = False  # scores are raw inner products (the folder's first stage folds a transform into the query)

    @property
    def count(self) -> int:
        """Vectors stored (a writer's pending ones too)."""
        return self.collections.count(self.names.items)

    def ids(self) -> np.ndarray:
        """Every id held (committed or not), sorted."""
        found = self.collections.query(self.names.items, "id >= 0", ["id"], "reading item ids")
        return np.sort(np.array([int(e["id"]) for e in found], np.int64))

    def remove(self, ids: np.ndarray) -> bool:
        """Delete items (for real: Milvus needs no tombstones)."""
        if len(ids):
            self.collections.delete(self.names.items, id_expression(np.asarray(ids)), "removing items")
        return True

    def save(self, path: str | None = None) -> None:
        """Nothing to save: the server keeps what it acknowledged."""

    def _condition(self, allowed: Allowed, excluded: np.ndarray | None) -> str:
        clauses = [self.collections.visible()]
        if isinstance(allowed, CaseFilter):
            clauses.append(f"({allowed.expression})")
        elif allowed is not None:
            clauses.append(id_expression(np.asarray(allowed)))
        if excluded is not None and len(excluded):
            clauses.append(f"not {id_expression(np.asarray(excluded))}")
        return " and ".join(clauses)

    def search(self, queries: np.ndarray, k: int, allowed: Allowed = None, excluded: np.ndarray | None = None,
               ef_search: int | None = None, raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query among the allowed items minus the excluded ones, filtered inside Milvus's search;
        -1 pads. Scores are raw inner products (``raw`` changes nothing here)."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, int(k))
        scores = np.full((len(queries), k), -np.inf, np.float32)
        ids = np.full((len(queries), k), -1, np.int64)
        if not np.all(np.isfinite(queries)):
            raise ModelError("a query vector is not finite (NaN or infinite); nothing can be ranked with it")
        if (isinstance(allowed, CaseFilter) and not allowed.matching) or (isinstance(allowed, np.ndarray) and not len(allowed)):
            return scores, ids
        params: dict[str, Any] = {"metric_type": "IP"}
        if self.kind == "hnsw":
            params["params"] = {"ef": max(ef_search or self.ef_search, k)}
        found = self.collections.call("searching", "search", self.names.items, data=list(queries), limit=k,
                                      filter=self._condition(allowed, excluded), output_fields=["case_row"],
                                      search_params=params, anns_field="vector")
        rows = self.collections.row_of_item
        for n, hits in enumerate(found):
            for m, hit in enumerate(list(hits)[:k]):
                item = int(hit["id"])
                ids[n, m], scores[n, m] = item, float(hit["distance"])
                rows[item] = int(hit["entity"]["case_row"])
        if not np.all(np.isfinite(scores[ids >= 0])):
            raise IndexCorruptError(f"{self.collections.connection.location.display}: a stored vector gives a score that is not a "
                                    "number; the index is damaged: run 'cbir index verify'")
        return scores, ids

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of some ids (from the per-case cache when their case is there), float32."""
        return self.reconstruct(ids)

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of some ids (N, dim) float32; KeyError naming ids that are not held."""
        return self._reconstruct(np.ascontiguousarray(ids, dtype=np.int64), read_cases=True)

    def _reconstruct(self, ids: np.ndarray, read_cases: bool) -> np.ndarray:
        out = np.empty((len(ids), self.dim), np.float32)
        if not len(ids):
            return out
        done = np.zeros(len(ids), bool)
        rows = self.collections.row_of_item
        for row in {rows[i] for i in ids.tolist() if i in rows}:
            block = self.collections.blocks.get(row)
            if block is None:
                continue
            at = np.minimum(np.searchsorted(block.ids, ids), len(block.ids) - 1)
            hit = (block.ids[at] == ids) & ~done
            out[hit] = block.vectors[at[hit]]
            done |= hit
        missing = ids[~done]
        if len(missing) and read_cases and self._read_cases_of(missing):
            return self._reconstruct(ids, read_cases=False)
        if len(missing):
            wanted = np.unique(missing)
            found: dict[int, np.ndarray] = {}
            for start in range(0, len(wanted), READ_BATCH):
                chunk = [int(i) for i in wanted[start:start + READ_BATCH]]
                for entity in self.collections.call("reading vectors", "get", self.names.items, ids=chunk,
                                                    output_fields=["case_row", "vector"]):
                    found[int(entity["id"])] = np.asarray(entity["vector"], np.float32)
                    rows[int(entity["id"])] = int(entity["case_row"])
            absent = [int(i) for i in wanted if int(i) not in found]
            if absent:
                raise KeyError(f"ids not in the store: {absent[:5]}")
            out[~done] = np.stack([found[int(i)] for i in missing])
        return out

    def _read_cases_of(self, ids: np.ndarray) -> bool:
        """Read the whole cases of some ids into the cache when they hold at most 4x as many items (a first stage's hits
        fall in the candidate cases that MaxSim reads whole next); whether it did."""
        rows = self.collections.row_of_item
        cases = {rows.get(int(i)) for i in np.unique(ids)}
        if None in cases or not cases or any(r > self.collections.committed_row for r in cases):
            return False
        ranges = self.collections.ranges
        unknown = [r for r in cases if r not in ranges]
        if unknown:
            for entity in self.collections.query(self.names.cases, f"row in [{','.join(map(str, unknown))}]",
                                                 ["row", "first_item", "item_count"], "reading cases"):
                if int(entity["item_count"] or 0) > 0:
                    ranges[int(entity["row"])] = (int(entity["first_item"]), int(entity["item_count"]))
        if any(r not in ranges for r in cases):
            return False
        if sum(ranges[r][1] for r in cases) > 4 * len(ids):
            return False
        self.collections.case_blocks(sorted(cases))
        return all(r in self.collections.blocks for r in cases)

    def vector_problems(self, batch: int = READ_BATCH) -> list[str]:
        """Every stored vector checked: finite and of unit length (the model's L2-normalised output)."""
        from .faiss_store import UNIT_TOLERANCE

        not_finite = not_unit = 0
        first_nan = first_off = None
        for entity in self.collections.query(self.names.items, "id >= 0", ["id", "vector"], "reading every vector"):
            vector = np.asarray(entity["vector"], np.float64)
            if not np.all(np.isfinite(vector)):
                not_finite += 1
                first_nan = first_nan if first_nan is not None else int(entity["id"])
            elif abs(float(vector @ vector) - 1) > 2 * UNIT_TOLERANCE:
                not_unit += 1
                first_off = first_off if first_off is not None else int(entity["id"])
        problems = []
        if not_finite:
            problems.append(f"{not_finite} stored vector(s) hold NaN or infinite numbers (first id {first_nan})")
        if not_unit:
            problems.append(f"{not_unit} stored vector(s) are not of unit length (first id {first_off})")
        return problems
