"""The FAISS side of an index: inner-product search over L2-normalised vectors with stable int64 ids.

Two structures, chosen by size (overridable): ``flat`` (exact, ``IndexFlatIP``) up to
``FLAT_MAX_FLOATS`` numbers held (50,000 vectors of 512-d), then ``hnsw`` (``IndexHNSWFlat``, M=32). HNSW keeps the full vectors, so the
scores it returns for its candidates are exact inner products; only the candidate set is
approximate. Filters and removed ids are applied inside the search through FAISS id selectors.
A restrictive filter falls back to an exact search over just the allowed vectors, so a filtered
query still returns as many hits as asked for when enough exist.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import IndexCorruptError, ModelError, ParameterError

# Exact search costs in proportion to vectors x dimension: 175 ms at 1 M x 512 on the project machine, so it stays
# under ~10 ms per query up to 50,000 512-d vectors, or 220,000 of the handcrafted model's 116-d ones.
FLAT_MAX_FLOATS = 50_000 * 512
UNIT_TOLERANCE = 1e-3  # stored vectors are the model's L2-normalised output: |norm - 1| above this is damage
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 1024  # measured at 1 M x 512: recall@10 0.98 at 5.5 ms (128 gave 0.60), docs/benchmarks.md
EXACT_FALLBACK_FRACTION = 0.05  # filters allowing less than this share of vectors are searched exactly
KINDS = ("auto", "flat", "hnsw")


def choose_kind(count: int, requested: str = "auto", dim: int = 512) -> str:
    """The structure for an index of ``count`` vectors of ``dim``: the requested one, or flat up to FLAT_MAX_FLOATS, then HNSW."""
    if requested not in KINDS:
        raise ParameterError(f"index type must be one of {', '.join(KINDS)}, not '{requested}'")
    if requested != "auto":
        return requested
    return "flat" if count * dim <= FLAT_MAX_FLOATS else "hnsw"


class VectorStore:
    """A FAISS index with an id map; add, remove, search with selectors, reconstruct, save atomically."""

    def __init__(self, index, kind: str, dim: int):
        self.index = index
        self.kind = kind
        self.dim = dim
        self.ef_search = HNSW_EF_SEARCH  # HNSW: candidates kept while walking the graph (recall against speed)
        self._id_array: np.ndarray | None = None  # ids in storage order, cached until the store changes
        self._storage_view: np.ndarray | None = None  # the raw vectors, cached until the store changes (FAISS may move them)
        self._sorted: tuple[np.ndarray, bool] | None = None  # (the id array it was checked on, whether it is sorted)

    @classmethod
    def create(cls, dim: int, kind: str) -> VectorStore:
        """An empty store of a given structure."""
        import faiss

        if kind == "flat":
            base = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            base = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            base.hnsw.efSearch = HNSW_EF_SEARCH
        else:
            raise ParameterError(f"unknown index type '{kind}'")
        return cls(faiss.IndexIDMap2(base), kind, dim)

    @classmethod
    def load(cls, path: str, kind: str, dim: int) -> VectorStore:
        """Read a saved store."""
        import faiss

        try:
            index = faiss.read_index(path)
        except (RuntimeError, MemoryError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise IndexCorruptError(f"{path}: FAISS index cannot be read ({reason}); the file is damaged") from None
        if index.d != dim:
            raise IndexCorruptError(f"{path}: vectors have {index.d} dimensions, the manifest says {dim}")
        if not isinstance(index, faiss.IndexIDMap2):  # read_index hands back the owning object, already of its own class
            raise IndexCorruptError(f"{path}: not a FAISS index with an id map; the file is damaged")
        return cls(index, kind, dim)

    def save(self, path: str) -> None:
        """Write to a temporary file, then rename over the old one, so a crash never leaves half a file."""
        import faiss

        temporary = f"{path}.tmp-{os.getpid()}"
        faiss.write_index(self.index, temporary)
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    @property
    def count(self) -> int:
        """Vectors held (removed-but-tombstoned ones included)."""
        return int(self.index.ntotal)

    def ids(self) -> np.ndarray:
        """Every id held, in storage order."""
        import faiss

        if self._id_array is None:
            id_map = self.index.id_map
            # SWIG extension modules share one type table: once SimpleITK is loaded, FAISS's std::vector<int64_t>
            # can come back as SimpleITK's VectorInt64 proxy (same C++ object), which vector_to_array refuses.
            if hasattr(id_map, "data"):
                self._id_array = faiss.vector_to_array(id_map).astype(np.int64)
            else:
                self._id_array = np.fromiter(id_map, dtype=np.int64, count=self.count)
        return self._id_array

    def _ids_sorted(self) -> bool:
        """Whether ids increase with storage position (they do unless ids were added out of order)."""
        if self._sorted is None or self._sorted[0] is not self._id_array:
            stored = self.ids()
            self._sorted = (stored, bool(np.all(stored[1:] > stored[:-1])))
        return self._sorted[1]

    def _storage(self) -> np.ndarray | None:
        """The raw (count, dim) float32 vectors in storage order, as a view into FAISS's memory (None if not flat-coded).

        Looked up once per state of the store: finding it through SWIG cost ~0.1 ms, 3 ms for a query's 30 cases.
        """
        import faiss

        if self._storage_view is not None and len(self._storage_view) == self.count:
            return self._storage_view
        inner = faiss.downcast_index(self.index.index)
        flat = faiss.downcast_index(inner.storage) if hasattr(inner, "storage") else inner
        if not hasattr(flat, "get_xb") or flat.ntotal == 0:
            return None
        self._storage_view = faiss.rev_swig_ptr(flat.get_xb(), flat.ntotal * flat.d).reshape(flat.ntotal, flat.d)
        return self._storage_view

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of some ids, for re-scoring: a view into FAISS's storage when they lie together (a case's items
        are added together, so they do), else gathered. Use the result before the store changes."""
        ids = np.asarray(ids, dtype=np.int64)
        stored, storage = self.ids(), self._storage()
        if not len(ids) or storage is None or not self._ids_sorted():
            return self.reconstruct(ids)
        positions = np.searchsorted(stored, ids)
        positions = np.minimum(positions, len(stored) - 1)
        if not np.array_equal(stored[positions], ids):
            raise KeyError(f"ids not in the store: {ids[stored[positions] != ids][:5].tolist()}")
        if positions[-1] - positions[0] + 1 == len(ids) and np.all(np.diff(positions) == 1):
            return storage[positions[0]:positions[-1] + 1]
        return storage[positions]

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors under the given ids."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(ids):
            raise ValueError(f"expected ({len(ids)}, {self.dim}) vectors, got {vectors.shape}")
        bad = vector_problem(vectors)
        if bad:
            raise ModelError(f"the model returned {bad}; nothing of this volume was stored")
        if len(ids):
            self.index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
            self._id_array = self._storage_view = None

    def remove(self, ids: np.ndarray) -> bool:
        """Delete ids where the structure can (flat: True); HNSW cannot, so the caller keeps tombstones (False)."""
        import faiss

        if self.kind != "flat":
            return False
        self.index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))
        self._id_array = self._storage_view = None
        return True

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of some ids (N, dim)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        return self.index.reconstruct_batch(ids)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               excluded: np.ndarray | None = None, ef_search: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query among allowed ids (all if None) minus excluded ones; -1 pads.

        ``ef_search`` overrides the HNSW breadth for this call (a many-image query needs less per image).
        """
        import faiss

        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        k = max(1, int(k))
        excluded = np.asarray(excluded if excluded is not None else [], dtype=np.int64)
        if allowed is not None:
            allowed = np.setdiff1d(np.asarray(allowed, dtype=np.int64), excluded)
            if len(allowed) == 0:
                return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
            if self.kind != "flat" and len(allowed) < EXACT_FALLBACK_FRACTION * self.count:
                return self._exact_subset(queries, k, allowed)
            selector = faiss.IDSelectorBatch(allowed)
        elif len(excluded):
            selector = faiss.IDSelectorNot(faiss.IDSelectorBatch(excluded))
        else:
            selector = None
        if self.kind == "hnsw":
            breadth = max(ef_search or self.ef_search, 2 * k)
            params = faiss.SearchParametersHNSW(efSearch=breadth, sel=selector) if selector else \
                faiss.SearchParametersHNSW(efSearch=breadth)
        else:
            params = faiss.SearchParameters(sel=selector) if selector else None
        if not np.all(np.isfinite(queries)):
            raise ModelError("a query vector is not finite (NaN or infinite); nothing can be ranked with it")
        scores, ids = self.index.search(queries, k, params=params)
        if not np.all(np.isfinite(scores[ids >= 0])):
            raise IndexCorruptError("vectors.faiss: a stored vector gives a score that is not a number; the index is damaged: "
                                    "run 'cbir index verify' and 'cbir index repair'")
        if allowed is not None and self.kind != "flat":
            # A filtered graph walk can come back short; the exact answer is cheap for those rows.
            wanted = min(k, len(allowed))
            short = np.flatnonzero((ids >= 0).sum(axis=1) < wanted)
            if len(short):
                exact_scores, exact_ids = self._exact_subset(queries[short], k, allowed)
                scores[short], ids[short] = exact_scores, exact_ids
        return scores, ids

    def _exact_subset(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vectors = self.reconstruct(allowed)
        similarity = queries @ vectors.T
        top = np.argsort(-similarity, axis=1)[:, :k]
        scores = np.take_along_axis(similarity, top, axis=1)
        ids = allowed[top]
        if top.shape[1] < k:
            pad = k - top.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return scores.astype(np.float32), ids.astype(np.int64)

    def rebuilt(self, kind: str, excluded: np.ndarray | None = None) -> VectorStore:
        """A new store of a given structure holding every vector except excluded ids (compaction)."""
        keep = np.setdiff1d(self.ids(), np.asarray(excluded if excluded is not None else [], dtype=np.int64))
        fresh = VectorStore.create(self.dim, kind)
        for start in range(0, len(keep), 10_000):
            chunk = keep[start:start + 10_000]
            fresh.add(self.reconstruct(chunk), chunk)
        return fresh

    def vector_problems(self, batch: int = 65_536) -> list[str]:
        """Every stored vector checked: finite and of unit length (the model's L2-normalised output)."""
        not_finite = not_unit = 0
        first_nan = first_off = None
        ids = self.ids()
        storage = self._storage()  # the raw vectors in storage order, when the structure keeps them flat (no copying)
        for start in range(0, self.count, batch):
            chunk = ids[start:start + batch]
            vectors = storage[start:start + batch] if storage is not None else self.reconstruct(chunk)
            finite = np.all(np.isfinite(vectors), axis=1)
            unit = np.zeros(len(chunk), bool)
            unit[finite] = np.abs(np.einsum("ij,ij->i", vectors[finite], vectors[finite], dtype=np.float64) - 1) <= 2 * UNIT_TOLERANCE
            not_finite += int((~finite).sum())
            not_unit += int((finite & ~unit).sum())
            if first_nan is None and not finite.all():
                first_nan = int(chunk[np.flatnonzero(~finite)[0]])
            if first_off is None and not (unit | ~finite).all():
                first_off = int(chunk[np.flatnonzero(~unit & finite)[0]])
        problems = []
        if not_finite:
            problems.append(f"{not_finite} stored vector(s) hold NaN or infinite numbers (first id {first_nan})")
        if not_unit:
            problems.append(f"{not_unit} stored vector(s) are not of unit length (first id {first_off})")
        return problems


def vector_problem(vectors: np.ndarray) -> str | None:
    """Why vectors cannot be stored (not finite, not L2-normalised), or None."""
    finite = np.all(np.isfinite(vectors), axis=1)
    if not finite.all():
        return f"{int((~finite).sum())} of {len(vectors)} vectors with NaN or infinite numbers"
    norms = np.linalg.norm(vectors.astype(np.float64), axis=1)
    off = np.abs(norms - 1) > UNIT_TOLERANCE
    if off.any():
        return f"{int(off.sum())} of {len(vectors)} vectors not of unit length (norm {norms[off][0]:.4g})"
    return None
