"""A Milvus-backed index's four collections on the server: their names, schemas and vector index, the calls on them
(upsert, query, count), the expressions filters become, the watermark readers see below, the per-case cache.
:mod:`milvus_catalog` and :mod:`milvus_vectors` read and write them as the folder's SQLite catalog and FAISS store are.

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

import json
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import IndexCorruptError, ParameterError
from .catalog import CaseRecord
from .faiss_store import KINDS
from .milvus_connection import MilvusConnection

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


def schemas(dim: int, vector_index: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """(schema, index parameters) of each collection kind, for vectors of ``dim``."""
    from pymilvus import DataType, MilvusClient

    def slot_index(schema: Any) -> tuple[Any, Any]:
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

    def create(self, vector_index: dict[str, Any], properties: dict[str, str]) -> None:
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

    def upsert(self, collection: str, rows: list[dict[str, Any]], what: str) -> None:
        """Write entities by primary key, a batch at a time (asked again after a lost answer, nothing doubles)."""
        for start in range(0, len(rows), BATCH):
            self.call(what, "upsert", collection, rows[start:start + BATCH])

    def delete(self, collection: str, expression: str, what: str) -> None:
        self.call(what, "delete", collection, filter=expression)

    def query(self, collection: str, expression: str, fields: list[str], what: str) -> list[dict[str, Any]]:
        """Every entity matching an expression (paged; the whole reading asked again if the server stops answering)."""

        def read(client: Any) -> list[dict[str, Any]]:
            found: list[dict[str, Any]] = []
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
            by_row: dict[int, list[dict[str, Any]]] = {r: [] for r in wanted}
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
            cached = fresh.get(row) or self.blocks.get(row)
            if cached is not None:
                if row in self.blocks:
                    self.blocks.move_to_end(row)
                out[row] = cached
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


def vector_index(kind: str, local: bool) -> tuple[str, dict[str, Any]]:
    """The server's vector index for a requested index type: HNSW (M 32, efConstruction 80, as the folder's) or FLAT."""
    if kind not in KINDS:
        raise ParameterError(f"index type must be one of {', '.join(KINDS)}, not '{kind}'")
    if kind == "flat":
        return "flat", {"index_type": "FLAT", "metric_type": "IP"}
    if kind == "ivfpq":
        if local:
            raise ParameterError("milvus-lite has no product-quantised index; use --index-type hnsw or flat with a .db file "
                                 "(a Milvus server builds IVF_PQ)")
        return "ivfpq", {"index_type": "IVF_PQ", "metric_type": "IP", "params": {"nlist": 4096, "m": 64, "nbits": 8}}
    # 'auto' is HNSW: Milvus searches a growing segment exactly until it seals, so small collections lose nothing.
    return "hnsw", {"index_type": "HNSW", "metric_type": "IP", "params": {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION}}
