"""The compressed store's layout: 4-bit product-quantisation codes, how many inverted lists and how many a query scans,
how many vectors train the codes, and the float16 rows file that re-scores the candidates exactly (:mod:`faiss_store`
holds the store itself).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ..errors import IndexCorruptError

# One 4-bit code per 2 dimensions (128 B for 512-d; one per dimension where 2 does not divide it), scanned with FAISS's
# SIMD "fast scan": 5-10x the codes per second of 8-bit codes (49-102 against 10.5 M codes/s, 16 queries, 2 loaded cores).
# The codes only pick candidates, the float16 rows re-score them exactly; at 10 M a query must scan many lists to find
# neighbours that k-means spread over them (docs/benchmarks.md, "10 M again"). At 1 M x 512 a 16-image query's top-10
# cases agreed with an exact first stage 0.95 with these codes (41 ms p50), 0.82 with one 4-bit code per 4 dimensions
# (64 B) and 0.953 with the former 8-bit codes per 4 dimensions (71 ms).
PQ_DIMS_PER_CODE = 2
PQ_BITS = 4
# Inverted lists scanned per query: an eighth of them, at least 128 (1 M x 512, 1,024 lists: 128 scanned gave case agreement
# 0.953 with 8-bit codes; 64 / 256: 0.947 / 0.970).
IVF_PROBE_SHARE = 8
IVF_NPROBE = 128
VECTORS_PER_LIST = 1_000  # past 1 M vectors, lists grow with the count (sqrt(count) below): 8,192 at 10 M
RERANK_FACTOR = 4  # candidates from the codes per hit asked for, re-scored from the float16 rows
RERANK_MIN = 256  # at least this many candidates per query
TRAIN_SAMPLE = 200_000  # the codes train on an even sample of this many vectors, or 64 per list where that is more,
TRAIN_PER_LIST = 64  # at most TRAIN_MAX (k-means of 8,192 lists on 524,288 vectors: 6-11 minutes on 2 cores)
TRAIN_MAX = 1_000_000
ROWS_SUFFIX = ".f16"  # the rows file beside a vectors file: vectors.faiss -> vectors.f16
ROW_DTYPE = np.dtype("<f2")


def rows_path_of(path: str) -> str:
    """The float16 rows file that goes with a vectors file (``vectors.faiss`` -> ``vectors.f16``)."""
    return os.path.splitext(path)[0] + ROWS_SUFFIX


def pq_layout(dim: int) -> int:
    """Sub-quantizers for ``dim``: dim / PQ_DIMS_PER_CODE, or dim / 2, / 1 where that does not divide it."""
    for width in (PQ_DIMS_PER_CODE, 2, 1):
        if dim % width == 0:
            return dim // width
    return dim


def list_count(count: int) -> int:
    """Inverted lists for ``count`` vectors: the power of two nearest sqrt(count) or count / VECTORS_PER_LIST, whichever is
    more, 16 to 65,536. Few lists each hold many clusters of neighbours, whose members k-means then scatters over many
    lists (measured at 10 M: docs/benchmarks.md); sqrt(count) lists are cheap to train on 2 cores."""
    wanted = max(1.0, np.sqrt(count), count / VECTORS_PER_LIST)
    return int(min(65_536, max(16, 2 ** round(np.log2(wanted)))))


def probe_count(lists: int) -> int:
    """Inverted lists a query scans: one in IVF_PROBE_SHARE, at least IVF_NPROBE (all of them for small stores)."""
    return int(min(lists, max(IVF_NPROBE, lists // IVF_PROBE_SHARE)))


def train_size(count: int) -> int:
    """Vectors to train the codes of ``count`` on: TRAIN_SAMPLE or TRAIN_PER_LIST per inverted list (k-means wants at
    least 39), whichever is more, at least 16,384, at most TRAIN_MAX."""
    return int(min(count, TRAIN_MAX, max(TRAIN_SAMPLE, TRAIN_PER_LIST * list_count(count), 16_384)))


class RowFile:
    """Float16 rows (N, dim) in a file, appended in place and read through a read-only memory map."""

    def __init__(self, path: str, dim: int, count: int):
        self.path, self.dim, self.count = path, dim, count
        self._map: np.ndarray | None = None
        self._expected: dict[str, Any] | None = None  # the manifest's record of the file, for readers (expect)
        self._verified: set[int] = set()  # chunks of the record found intact
        self._recovery = ""

    def expect(self, record: dict[str, Any], recovery: str = "") -> None:
        """Check rows against the manifest's per-chunk SHA-256 when a search first reads them (readers of a sealed index).

        Why lazily: the rows file is the largest of an index (10 GB at 10 M vectors) and a search reads a few thousand of
        its rows, so hashing it whole at every open would cost more than the searches; checking each 4 MiB chunk the first
        time a search reads from it means no answer is ever computed from unchecked bytes, at most one chunk's hashing
        (about 5 ms) per chunk read, once per open index. ``recovery``: the end of the error (how to repair)."""
        self._expected, self._verified, self._recovery = record, set(), recovery

    def verify(self, positions: np.ndarray) -> None:
        """Raise IndexCorruptError if a chunk holding any of these rows differs from the manifest's record."""
        if self._expected is None:
            return
        positions = np.asarray(positions, np.int64).ravel()
        if not len(positions):
            return
        chunk = int(self._expected.get("chunk_bytes") or 0)
        digests, size = self._expected.get("sha256") or [], int(self._expected.get("size") or 0)
        if chunk <= 0:
            return
        starts = positions * self.row_bytes
        needed = set(np.unique(np.concatenate([starts // chunk, (starts + self.row_bytes - 1) // chunk])).tolist())
        needed -= self._verified
        if not needed:
            return
        import hashlib

        data = self.rows().reshape(-1).view(np.uint8)  # the mapped bytes searches read (a replaced file keeps its map)
        for number in sorted(needed):
            low, high = number * chunk, min(size, (number + 1) * chunk)
            if number >= len(digests) or high > len(data) or hashlib.sha256(data[low:high].data).hexdigest() != digests[number]:
                raise IndexCorruptError(f"{self.path}: checksum differs from the manifest in the chunk at bytes {low}-{high - 1} "
                                        f"(read by this search): the file is damaged{'; ' + self._recovery if self._recovery else ''}")
            self._verified.add(number)

    @property
    def row_bytes(self) -> int:
        return self.dim * ROW_DTYPE.itemsize

    def check(self) -> None:
        """Raise if the file is missing or holds fewer rows than the FAISS file says."""
        if not os.path.isfile(self.path):
            raise IndexCorruptError(f"{self.path}: missing; the compressed index keeps its vectors there")
        size = os.path.getsize(self.path)
        if size < self.count * self.row_bytes:
            raise IndexCorruptError(f"{self.path}: holds {size // self.row_bytes} vectors, the FAISS file {self.count}; "
                                   "the file is damaged")

    def rows(self) -> np.ndarray:
        """The (count, dim) float16 rows, memory-mapped read-only (page cache, not process memory)."""
        if self._map is None or len(self._map) != self.count:
            if self.count == 0:
                self._map = np.zeros((0, self.dim), ROW_DTYPE)
            else:
                self._map = np.memmap(self.path, dtype=ROW_DTYPE, mode="r", shape=(self.count, self.dim))
        return self._map

    def append(self, vectors: np.ndarray) -> None:
        """Write rows after the last counted one (over anything a killed writer left there)."""
        mode = "r+b" if os.path.exists(self.path) else "w+b"
        try:
            with open(self.path, mode) as handle:
                handle.truncate(self.count * self.row_bytes)
                handle.seek(self.count * self.row_bytes)
                handle.write(np.ascontiguousarray(vectors, ROW_DTYPE).tobytes())
        except OSError as error:  # rows past the counted ones are ignored and overwritten by the next writer
            raise OSError(error.errno, f"cannot be written ({error.strerror or error})", self.path) from None
        self.count += len(vectors)
        self._map = None

    def flush(self) -> None:
        """Drop the map and make the file durable."""
        self._map = None
        if os.path.exists(self.path):
            with open(self.path, "rb+") as handle:
                handle.truncate(self.count * self.row_bytes)
                os.fsync(handle.fileno())
