"""A Milvus-backed index's vectors (:class:`MilvusVectors`): what :class:`faiss_store.VectorStore` answers (nearest
items with filters evaluated inside the search, stored vectors by id, checks), from the items collection."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import IndexCorruptError, ModelError
from .milvus_collections import (
    HNSW_EF_SEARCH,
    READ_BATCH,
    MilvusCollections,
    id_expression,
)
from .searchable import Allowed, CaseFilter


class MilvusVectors:
    """The vectors of a Milvus-backed index: nearest items filtered inside the search, and stored vectors by id."""

    def __init__(self, collections: MilvusCollections, kind: str, metric_params: dict[str, Any]):
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
        found = [rows.get(int(i)) for i in np.unique(ids)]
        cases = {r for r in found if r is not None}
        if len(cases) < len(set(found)) or not cases or any(r > self.collections.committed_row for r in cases):
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
        from .faiss_store import UNIT_TOLERANCE, stored_vector_problems

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
        return stored_vector_problems(not_finite, first_nan, not_unit, first_off)
