"""The FAISS side of an index: inner-product search over L2-normalised vectors with stable int64 ids.

Three structures, chosen by size (overridable): ``flat`` (exact, ``IndexFlatIP``) up to
``FLAT_MAX_FLOATS`` numbers held (50,000 vectors of 512-d), then ``hnsw`` (``IndexHNSWFlat``, M=32) up to
``IVFPQ_MIN_FLOATS`` (2 M vectors of 512-d), then ``ivfpq``. HNSW keeps the full vectors in RAM, so the scores it returns
for its candidates are exact inner products; only the candidate set is approximate.

``ivfpq`` (its layout and rows file: :mod:`compressed`) keeps only compressed codes in RAM (``IndexIVFPQFastScan``: 4
bits per ``PQ_DIMS_PER_CODE`` dimensions, 128 B for 512-d, in ~sqrt(N) inverted lists up to 1 M vectors, one per
~1,000 past it) and the vectors themselves as float16 rows on disk (``vectors.f16``, an owned file, memory-mapped):
the codes find ``RERANK_FACTOR`` x k candidates, the rows re-score them exactly. The codes encode the index's vector
transform's output (whitened vectors), so they are trained again with it (:meth:`VectorStore.retrained`); its scores
are then transformed cosines (``scores_transformed``). Row i of the file is the vector of the FAISS id map's i-th id;
rows past the FAISS file's count (a writer killed between the two) are ignored and overwritten.

Filters and removed ids are applied inside the search through FAISS id selectors. A restrictive filter falls back to an
exact search over just the allowed vectors, so a filtered query still returns as many hits as asked for when enough exist.
"""

from __future__ import annotations

import os

import numpy as np

from ..atomic import replaced
from ..errors import IndexCorruptError, ModelError, ParameterError
from .compressed import (
    IVF_NPROBE,
    PQ_BITS,
    RERANK_FACTOR,
    RERANK_MIN,
    RowFile,
    list_count,
    pq_layout,
    probe_count,
    rows_path_of,
    train_size,
)

# Exact search costs in proportion to vectors x dimension: 175 ms at 1 M x 512 on the project machine, so it stays
# under ~10 ms per query up to 50,000 512-d vectors, or 220,000 of the handcrafted model's 116-d ones.
FLAT_MAX_FLOATS = 50_000 * 512
UNIT_TOLERANCE = 1e-3  # stored vectors are the model's L2-normalised output: |norm - 1| above this is damage
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 1024  # measured at 1 M x 512: recall@10 0.98 at 5.5 ms (128 gave 0.60), docs/benchmarks.md
EXACT_FALLBACK_FRACTION = 0.05  # filters allowing less than this share of vectors are searched exactly
KINDS = ("auto", "flat", "hnsw", "ivfpq")
# Past this many numbers (2 M vectors of 512-d) HNSW's float vectors and graph (2.3 KB per 512-d vector: 4.6 GB) outgrow a
# workstation's RAM, and the compressed codes answer a 16-image query as fast (docs/benchmarks.md, search at 1 M and 10 M).
IVFPQ_MIN_FLOATS = 2_000_000 * 512
IVFPQ_MIN_VECTORS = 1_000  # codes need this many vectors to train on; an 'ivfpq' index holds them flat until then
def choose_kind(count: int, requested: str = "auto", dim: int = 512) -> str:
    """The structure for an index of ``count`` vectors of ``dim``: the requested one, or flat up to FLAT_MAX_FLOATS, then HNSW up
    to IVFPQ_MIN_FLOATS, then IVF-PQ (an 'ivfpq' index too small to train its codes stays flat until it can)."""
    if requested not in KINDS:
        raise ParameterError(f"index type must be one of {', '.join(KINDS)}, not '{requested}'")
    if requested == "ivfpq" and count < IVFPQ_MIN_VECTORS:
        return "flat"
    if requested != "auto":
        return requested
    if count * dim <= FLAT_MAX_FLOATS:
        return "flat"
    return "hnsw" if count * dim <= IVFPQ_MIN_FLOATS else "ivfpq"


class VectorStore:
    """A FAISS index with an id map; add, remove, search with selectors, reconstruct, save atomically.

    ``ivfpq`` stores also hold ``rows`` (the float16 vectors on disk) and ``transform`` (what their codes encode)."""

    def __init__(self, index, kind: str, dim: int, rows: RowFile | None = None, transform=None):
        self.index = index
        self.kind = kind
        self.dim = dim
        self.rows = rows
        self.transform = transform  # ivfpq: the vector transform the codes were trained on (None: raw vectors)
        self.ef_search = HNSW_EF_SEARCH  # HNSW: candidates kept while walking the graph (recall against speed)
        self.nprobe = probe_count(_lists_of(index)) if kind == "ivfpq" else IVF_NPROBE  # IVF: inverted lists scanned per query
        self.rerank_factor = RERANK_FACTOR
        self._id_array: np.ndarray | None = None  # ids in storage order, cached until the store changes
        self._storage_view: np.ndarray | None = None  # the raw vectors, cached until the store changes (FAISS may move them)
        self._sorted: tuple[np.ndarray, bool] | None = None  # (the id array it was checked on, whether it is sorted)
        self._order: np.ndarray | None = None  # argsort of the ids when they are not sorted

    @property
    def scores_transformed(self) -> bool:
        """Whether search scores are cosines of transformed vectors (an ivfpq store with a transform), not raw inner products."""
        return self.kind == "ivfpq" and self.transform is not None and self.transform.kind != "identity"

    @classmethod
    def create(cls, dim: int, kind: str, rows_path: str | None = None, train_vectors: np.ndarray | None = None,
               transform=None, opq: bool = False, lists: int | None = None) -> VectorStore:
        """An empty store of a given structure; ``ivfpq`` needs its rows file's path and vectors to train its codes on
        (raw; the transform, if any, is applied first)."""
        import faiss

        if kind == "flat":
            base = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            base = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            base.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            base.hnsw.efSearch = HNSW_EF_SEARCH
        elif kind == "ivfpq":
            if rows_path is None or train_vectors is None or len(train_vectors) < 256:
                raise ParameterError("an ivfpq store needs a rows file and at least 256 vectors to train its codes on")
            train = _encoded(np.ascontiguousarray(train_vectors, np.float32), transform)
            lists = lists or list_count(len(train_vectors))
            lists = min(lists, max(1, len(train) // 39))  # k-means wants ~39 points per list
            codes = pq_layout(dim)
            # The factory builds the chain with FAISS owning its parts (what a saved index reads back as).
            base = faiss.index_factory(dim, f"{f'OPQ{codes},' if opq else ''}IVF{lists},PQ{codes}x{PQ_BITS}fs",
                                       faiss.METRIC_INNER_PRODUCT)
            ivf = faiss.downcast_index(faiss.extract_index_ivf(base))
            ivf.cp.min_points_per_centroid = ivf.pq.cp.min_points_per_centroid = 1  # a small sample trains, without warnings
            # 10 k-means rounds on at most 256 points per code: the re-scoring makes up for rougher codes (16 codes of 4 bits a
            # sub-quantizer train in seconds; FAISS's default is 25 rounds).
            ivf.pq.cp.niter, ivf.pq.cp.max_points_per_centroid = 10, 256
            base.train(train)
            if os.path.exists(rows_path):
                os.remove(rows_path)
            return cls(faiss.IndexIDMap2(base), kind, dim, RowFile(rows_path, dim, 0), transform)
        else:
            raise ParameterError(f"unknown index type '{kind}'")
        return cls(faiss.IndexIDMap2(base), kind, dim)

    @classmethod
    def load(cls, path: str, kind: str, dim: int, transform=None) -> VectorStore:
        """Read a saved store (an ivfpq one with its rows file beside it, and the transform its codes encode)."""
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
        rows = None
        if kind == "ivfpq":
            rows = RowFile(rows_path_of(path), dim, int(index.ntotal))
            rows.check()
        return cls(index, kind, dim, rows, transform)

    def save(self, path: str) -> None:
        """Write to a temporary file, then rename over the old one, so a crash never leaves half a file.

        An ivfpq store's rows go first (flushed; moved beside ``path`` if they were written elsewhere), then its codes."""
        import faiss

        if self.rows is not None:
            self.rows.flush()
            target = rows_path_of(path)
            if os.path.abspath(self.rows.path) != os.path.abspath(target):
                os.replace(self.rows.path, target)
                self.rows.path = target
        with replaced(path) as temporary:
            faiss.write_index(self.index, temporary)

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
            self._order = None
        return self._sorted[1]

    def _positions(self, ids: np.ndarray) -> np.ndarray:
        """Storage positions of some ids (KeyError naming the first few that are not held)."""
        stored = self.ids()
        if self._ids_sorted():
            positions = np.minimum(np.searchsorted(stored, ids), max(0, len(stored) - 1))
        else:
            if self._order is None:
                self._order = np.argsort(stored, kind="stable")
            at = np.minimum(np.searchsorted(stored[self._order], ids), max(0, len(stored) - 1))
            positions = self._order[at] if len(stored) else at
        if len(ids) and (not len(stored) or not np.array_equal(stored[positions], ids)):
            missing = ids if not len(stored) else ids[stored[positions] != ids]
            raise KeyError(f"ids not in the store: {missing[:5].tolist()}")
        return positions

    def _storage(self) -> np.ndarray | None:
        """The raw (count, dim) vectors in storage order: a view into FAISS's memory (float32), or an ivfpq store's rows
        (float16, memory-mapped); None if neither.

        Looked up once per state of the store: finding it through SWIG cost ~0.1 ms, 3 ms for a query's 30 cases.
        """
        import faiss

        if self.rows is not None:
            return self.rows.rows()
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
        are added together, so they do), else gathered; an ivfpq store's float16 rows as float32. Use the result before the
        store changes."""
        ids = np.asarray(ids, dtype=np.int64)
        storage = self._storage()
        if not len(ids) or storage is None or not self._ids_sorted():
            return self.reconstruct(ids)
        positions = self._positions(ids)
        if self.rows is not None:
            self.rows.verify(positions)
        if positions[-1] - positions[0] + 1 == len(ids) and np.all(np.diff(positions) == 1):
            block = storage[positions[0]:positions[-1] + 1]
        else:
            block = storage[positions]
        return block if block.dtype == np.float32 else block.astype(np.float32)

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Add vectors under the given ids."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(vectors) != len(ids):
            raise ValueError(f"expected ({len(ids)}, {self.dim}) vectors, got {vectors.shape}")
        bad = vector_problem(vectors)
        if bad:
            raise ModelError(f"the model returned {bad}; nothing of this volume was stored")
        if len(ids):
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            if self.rows is not None:
                self.rows.count = self.count  # rows a killed writer left past the codes are overwritten
                self.rows.append(vectors)
                self.index.add_with_ids(_encoded(vectors, self.transform), ids)
            else:
                self.index.add_with_ids(vectors, ids)
            self._id_array = self._storage_view = None

    def remove(self, ids: np.ndarray) -> bool:
        """Delete ids where the structure can (flat: True); HNSW and IVF-PQ (rows on disk) cannot, so the caller keeps
        tombstones (False)."""
        import faiss

        if self.kind != "flat":
            return False
        self.index.remove_ids(faiss.IDSelectorBatch(np.ascontiguousarray(ids, dtype=np.int64)))
        self._id_array = self._storage_view = None
        return True

    def reconstruct(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of some ids (N, dim) float32 (an ivfpq store's from its float16 rows)."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        if not len(ids):
            return np.zeros((0, self.dim), np.float32)
        if self.rows is not None:
            positions = self._positions(ids)
            self.rows.verify(positions)
            order = np.argsort(positions, kind="stable")  # read the map in file order
            out = np.empty((len(ids), self.dim), np.float32)
            out[order] = self.rows.rows()[positions[order]]
            return out
        return self.index.reconstruct_batch(ids)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None,
               excluded: np.ndarray | None = None, ef_search: int | None = None, raw: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query among allowed ids (all if None) minus excluded ones; -1 pads.

        ``ef_search`` overrides the HNSW breadth for this call (a many-image query needs less per image). An ivfpq store
        takes raw queries and returns exact scores of its candidates (transformed cosines if it has a transform); ``raw``
        asks it for raw inner products instead (text queries), which its codes cannot rank: the rows are scanned.
        """
        import faiss

        if raw and self.scores_transformed:
            return self._scan_raw(np.atleast_2d(np.asarray(queries, np.float32)), max(1, int(k)), allowed, excluded)

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
        if not np.all(np.isfinite(queries)):
            raise ModelError("a query vector is not finite (NaN or infinite); nothing can be ranked with it")
        if self.kind == "ivfpq":
            scores, ids = self._search_codes(queries, k, selector)
        else:
            if self.kind == "hnsw":
                breadth = max(ef_search or self.ef_search, 2 * k)
                params = faiss.SearchParametersHNSW(efSearch=breadth, sel=selector) if selector else \
                    faiss.SearchParametersHNSW(efSearch=breadth)
            else:
                params = faiss.SearchParameters(sel=selector) if selector else None
            scores, ids = self.index.search(queries, k, params=params)
        if not np.all(np.isfinite(scores[ids >= 0])):
            raise IndexCorruptError("vectors.faiss: a stored vector gives a score that is not a number; the index is damaged: "
                                    "run 'cbir index verify' and 'cbir index repair'")
        if allowed is not None and self.kind != "flat":
            # A filtered graph walk (or a few scanned lists) can come back short; the exact answer is cheap for those rows.
            wanted = min(k, len(allowed))
            short = np.flatnonzero((ids >= 0).sum(axis=1) < wanted)
            if len(short):
                exact_scores, exact_ids = self._exact_subset(queries[short], k, allowed)
                scores[short], ids[short] = exact_scores, exact_ids
        return scores, ids

    def _search_codes(self, queries: np.ndarray, k: int, selector) -> tuple[np.ndarray, np.ndarray]:
        """IVF-PQ: RERANK_FACTOR x k candidates from the codes, re-scored exactly from the float16 rows."""
        import faiss

        coded = _encoded(queries, self.transform)
        fetch = max(self.rerank_factor * k, RERANK_MIN, k)
        params = faiss.SearchParametersIVF(nprobe=self.nprobe, sel=selector) if selector else \
            faiss.SearchParametersIVF(nprobe=self.nprobe)
        _, candidates = self.index.search(coded, fetch, params=params)
        found = candidates >= 0
        exact = np.full(candidates.shape, -np.inf, np.float32)
        if found.any():
            unique, inverse = np.unique(candidates[found], return_inverse=True)
            vectors = _encoded(self.reconstruct(unique), self.transform)
            exact[found] = np.einsum("nd,nd->n", vectors[inverse], coded[np.nonzero(found)[0]])
        order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        scores, ids = np.take_along_axis(exact, order, axis=1), np.take_along_axis(candidates, order, axis=1)
        if ids.shape[1] < k:
            pad = k - ids.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return scores.astype(np.float32), ids

    def _scan_raw(self, queries: np.ndarray, k: int, allowed, excluded, chunk: int = 262_144) -> tuple[np.ndarray, np.ndarray]:
        """Exact raw inner products over every row, a chunk at a time (slow at millions of rows; for rare text queries)."""
        ids, rows = self.ids(), self.rows.rows()
        best_scores = np.full((len(queries), k), -np.inf, np.float32)
        best_ids = np.full((len(queries), k), -1, np.int64)
        for start in range(0, len(ids), chunk):
            part = ids[start:start + chunk]
            usable = np.ones(len(part), bool)
            if allowed is not None:
                usable &= np.isin(part, allowed)
            if excluded is not None and len(excluded):
                usable &= ~np.isin(part, excluded)
            if not usable.any():
                continue
            if self.rows is not None:  # a compressed store's rows: each chunk checked the first time a search reads it
                self.rows.verify(np.arange(start, start + len(part))[usable])
            scores = queries @ np.asarray(rows[start:start + chunk][usable], np.float32).T
            merged_scores = np.concatenate([best_scores, scores], axis=1)
            merged_ids = np.concatenate([best_ids, np.broadcast_to(part[usable], scores.shape)], axis=1)
            top = np.argsort(-merged_scores, axis=1, kind="stable")[:, :k]
            best_scores, best_ids = np.take_along_axis(merged_scores, top, axis=1), np.take_along_axis(merged_ids, top, axis=1)
        return best_scores, best_ids

    def _exact_subset(self, queries: np.ndarray, k: int, allowed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vectors = self.reconstruct(allowed)
        if self.rows is not None:  # scores in the space the codes' search gives
            vectors, queries = _encoded(vectors, self.transform), _encoded(queries, self.transform)
        similarity = queries @ vectors.T
        top = np.argsort(-similarity, axis=1)[:, :k]
        scores = np.take_along_axis(similarity, top, axis=1)
        ids = allowed[top]
        if top.shape[1] < k:
            pad = k - top.shape[1]
            scores = np.pad(scores, ((0, 0), (0, pad)), constant_values=-np.inf)
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        return scores.astype(np.float32), ids.astype(np.int64)

    def rebuilt(self, kind: str, excluded: np.ndarray | None = None, rows_path: str | None = None, transform=None) -> VectorStore:
        """A new store of a given structure holding every vector except excluded ids (compaction); an ivfpq one trained
        on an even sample of them (through ``transform``), its rows written to ``rows_path`` (moved into place by save)."""
        keep = np.setdiff1d(self.ids(), np.asarray(excluded if excluded is not None else [], dtype=np.int64))
        if kind == "ivfpq":
            sample = keep[np.unique(np.linspace(0, len(keep) - 1, train_size(len(keep))).round().astype(np.int64))]
            fresh = VectorStore.create(self.dim, kind, rows_path, self.reconstruct(sample), transform, lists=list_count(len(keep)))
        else:
            fresh = VectorStore.create(self.dim, kind)
        for start in range(0, len(keep), 50_000):
            chunk = keep[start:start + 50_000]
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
            vectors = np.asarray(vectors, np.float32)
            finite = np.all(np.isfinite(vectors), axis=1)
            unit = np.zeros(len(chunk), bool)
            unit[finite] = np.abs(np.einsum("ij,ij->i", vectors[finite], vectors[finite], dtype=np.float64) - 1) <= 2 * UNIT_TOLERANCE
            not_finite += int((~finite).sum())
            not_unit += int((finite & ~unit).sum())
            if first_nan is None and not finite.all():
                first_nan = int(chunk[np.flatnonzero(~finite)[0]])
            if first_off is None and not (unit | ~finite).all():
                first_off = int(chunk[np.flatnonzero(~unit & finite)[0]])
        return stored_vector_problems(not_finite, first_nan, not_unit, first_off)


def stored_vector_problems(not_finite: int, first_nan: int | None, not_unit: int, first_off: int | None) -> list[str]:
    """What verify says of stored vectors that are not finite or not of unit length (any store), with the first id of each."""
    problems = []
    if not_finite:
        problems.append(f"{not_finite} stored vector(s) hold NaN or infinite numbers (first id {first_nan})")
    if not_unit:
        problems.append(f"{not_unit} stored vector(s) are not of unit length (first id {first_off})")
    return problems


def _lists_of(index) -> int:
    """The inverted lists of an ivfpq store's FAISS index (inside its id map)."""
    import faiss

    return int(faiss.extract_index_ivf(index.index).nlist)


def _encoded(vectors: np.ndarray, transform) -> np.ndarray:
    """What the codes hold for some raw vectors: the transform's output, or the vectors themselves (float32, contiguous)."""
    out = vectors if transform is None or transform.kind == "identity" else transform.apply(vectors)
    return np.ascontiguousarray(out, np.float32)


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
