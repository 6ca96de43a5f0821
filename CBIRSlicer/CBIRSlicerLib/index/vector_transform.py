"""A learned, pinned transform of an index's vectors (centering, or PCA whitening with shrinkage) so that scores separate.

A model's L2-normalised vectors of unrelated images share a large common part: the handcrafted
descriptor's cosines lie between 0.9 and 0.98 for nearly everything. Subtracting the index's mean
vector (centering) and evening out the variance along its principal directions (whitening) leaves
what differs between images; the result is normalised again, so scores stay cosines.

Whitening is ZCA with shrinkage towards the mean eigenvalue: with the covariance C = V diag(l) V^T
of the centred vectors, ``W = V diag((1 - a) l + a mean(l))^(-1/2) V^T`` and
``T(x) = (x - m) W / |(x - m) W|``. a = 1 is centering; a < 1 lets rare directions count more.
Too few vectors estimate neither the mean nor the covariance (:func:`choose_kind`), so small
indexes fall back to centering or to no transform at all.

The stored vectors stay the model's raw output (``vectors.faiss``): the transform is a small file
beside them (``transform.npz``), pinned in the manifest by kind, parameter checksum, date and the
number of vectors it was fitted on, and refitted when the index has grown REFIT_GROWTH-fold since,
which re-encodes nothing. At search time the first stage asks the raw store with the *folded*
query ``W W^T (q - m)``: its inner product with a raw x is the transformed, un-normalised score
plus a per-query constant (:meth:`VectorTransform.fold`); a few times more hits than asked for are
re-scored exactly (:func:`first_stage`), and the candidates' MaxSim scores are exact cosines of
transformed, re-normalised vectors (:meth:`VectorTransform.apply`). No second FAISS index is kept.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

import numpy as np

from ..atomic import replaced
from ..clock import now_utc
from ..errors import IndexCorruptError, ParameterError

TRANSFORM_FILE = "transform.npz"
KINDS = ("identity", "center", "whiten")
DEFAULT_KIND = "whiten"  # measured against centering and none: benchmarks/vector_transform.py, docs/benchmarks.md
SHRINKAGE = 0.3  # a: the weight of the mean eigenvalue in each whitened direction's variance (docs/benchmarks.md)
# Fallback for small indexes (docs/benchmarks.md): whitening (a = 0.3) fitted to 30 of the 116-d handcrafted vectors of
# the demo cohort scored as one fitted to all 62,000, fitted to 10 as no transform. So below CENTER_MIN_VECTORS nothing is
# transformed, and whitening needs WHITEN_MIN_PER_DIM vectors per dimension (30 of 116); centering in between, which
# only models of more dimensions reach (a 512-d one: 30-127 vectors).
CENTER_MIN_VECTORS = 30
WHITEN_MIN_PER_DIM = 0.25
# The folded first stage misses the stored vectors' transformed norms, so it fetches this many times the hits asked for and
# re-scores them exactly: on the demo cohort its top 100 items then hold 98-99 % of the exact top 100 (1x: 52-61 %).
FOLD_OVERFETCH = 8
REFIT_GROWTH = 2.0  # refit when the index holds this many times the vectors the transform was fitted on
FIT_SAMPLE = 200_000  # at most this many vectors (an even sample) are read to fit: the covariance settles long before


@dataclass
class VectorTransform:
    """A fitted transform: kind, mean, matrix (dim x dim, None for centering), and what it was fitted on."""

    kind: str
    mean: np.ndarray | None
    matrix: np.ndarray | None
    fitted_on: int
    fitted: str
    shrinkage: float | None = None

    def apply(self, vectors: np.ndarray) -> np.ndarray:
        """Transformed, re-normalised vectors (N, dim) float32; identity returns them as they are."""
        vectors = np.asarray(vectors, np.float32)
        if self.kind == "identity":
            return vectors
        out = vectors - self.mean
        if self.matrix is not None:
            out = out @ self.matrix
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def fold(self, queries: np.ndarray) -> np.ndarray:
        """Queries for an inner-product search of the raw vectors that ranks them by the un-normalised transformed score.

        x . W W^T (q - m) = T'(x) . T'(q) + m . W W^T (q - m), with T'(x) = (x - m) W: the same order for one query,
        except that the stored vectors' transformed norms are not divided out (the MaxSim re-scoring does that).
        """
        queries = np.asarray(queries, np.float32)
        if self.kind == "identity":
            return queries
        folded = queries - self.mean
        if self.matrix is not None:
            folded = folded @ self.matrix @ self.matrix.T
        return folded / np.maximum(np.linalg.norm(folded, axis=1, keepdims=True), 1e-12)

    def checksum(self) -> str:
        """SHA-256 of the kind and the parameters' bytes (float32, little-endian)."""
        digest = hashlib.sha256(self.kind.encode())
        for array in (self.mean, self.matrix):
            if array is not None:
                digest.update(np.ascontiguousarray(array, "<f4").tobytes())
        return digest.hexdigest()

    def manifest_entry(self) -> dict:
        """What the manifest pins: kind, parameters' checksum, when fitted, on how many vectors (the file holds the rest)."""
        return {"kind": self.kind, "checksum": self.checksum(), "fitted": self.fitted, "fitted_on": self.fitted_on,
                "file": TRANSFORM_FILE}

    def to_bytes(self) -> bytes:
        """The parameters as the ``.npz`` bytes :meth:`save` writes (a server-held index keeps these bytes as they are)."""
        arrays = {"kind": np.array(self.kind), "fitted_on": np.array(self.fitted_on), "fitted": np.array(self.fitted),
                  "shrinkage": np.array(np.nan if self.shrinkage is None else self.shrinkage)}
        if self.mean is not None:
            arrays["mean"] = self.mean.astype("<f4")
        if self.matrix is not None:
            arrays["matrix"] = self.matrix.astype("<f4")
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()

    def save(self, path: str) -> None:
        """Write the parameters atomically (temporary file, then rename)."""
        with replaced(path) as temporary, open(temporary, "wb") as handle:
            handle.write(self.to_bytes())


def first_stage(store, transform: VectorTransform, queries: np.ndarray, k: int, **options) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (transformed cosines, ids) per query from a store of raw vectors: FOLD_OVERFETCH x k hits of the folded
    queries, re-scored exactly (``options`` go to ``VectorStore.search``: allowed, excluded, ef_search). A compressed
    store whose codes encode the transform answers with transformed cosines itself."""
    if getattr(store, "scores_transformed", False):
        return store.search(queries, k, **options)
    scores, ids = store.search(transform.fold(queries), FOLD_OVERFETCH * k, **options)
    found = ids >= 0
    exact = np.full(ids.shape, -np.inf, np.float32)
    if found.any():
        vectors = transform.apply(store.reconstruct(ids[found]))
        exact[found] = np.einsum("nd,nd->n", vectors, transform.apply(queries)[np.nonzero(found)[0]])
    order = np.argsort(-exact, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(exact, order, axis=1), np.take_along_axis(ids, order, axis=1)


def identity(count: int = 0) -> VectorTransform:
    """No transform (what an index without one does)."""
    return VectorTransform("identity", None, None, count, now_utc())


def load(path: str, entry: dict, dim: int) -> VectorTransform:
    """Read a saved transform and check it against its manifest entry (kind, checksum) and the vectors' dimension."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise IndexCorruptError(f"{path}: the vector transform cannot be read ({error})") from None
    return from_bytes(data, entry, dim, path)


def from_bytes(data: bytes, entry: dict, dim: int, name: str) -> VectorTransform:
    """A transform from the bytes :meth:`VectorTransform.to_bytes` made, checked against its pin; ``name`` says where they
    were kept, for errors."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            kind = str(arrays["kind"])
            mean = np.array(arrays["mean"], np.float32) if "mean" in arrays else None
            matrix = np.array(arrays["matrix"], np.float32) if "matrix" in arrays else None
            shrinkage = float(arrays["shrinkage"])
            loaded = VectorTransform(kind, mean, matrix, int(arrays["fitted_on"]), str(arrays["fitted"]),
                                     None if np.isnan(shrinkage) else shrinkage)
    except (OSError, KeyError, ValueError) as error:
        raise IndexCorruptError(f"{name}: the vector transform cannot be read ({error})") from None
    if loaded.kind not in KINDS or (mean is not None and mean.shape != (dim,)) or \
            (matrix is not None and matrix.shape != (dim, dim)):
        raise IndexCorruptError(f"{name}: not a vector transform of {dim}-d vectors (kind {loaded.kind!r})")
    if loaded.checksum() != entry.get("checksum") or loaded.kind != entry.get("kind"):
        raise IndexCorruptError(f"{name}: the vector transform differs from the one the manifest pins "
                                f"({entry.get('kind')}, checksum {str(entry.get('checksum'))[:12]}); open the index for writing "
                                "('cbir index add') to fit it again")
    return loaded


def choose_kind(requested: str, count: int, dim: int) -> str:
    """The kind a fit of ``count`` vectors of ``dim`` can support: the requested one, or a simpler one for few vectors."""
    if requested not in KINDS:
        raise ParameterError(f"vector transform must be one of {', '.join(KINDS)}, not '{requested}'")
    if requested == "identity" or count < CENTER_MIN_VECTORS:
        return "identity"
    if requested == "whiten" and count < WHITEN_MIN_PER_DIM * dim:
        return "center"
    return requested


def fit(vectors: np.ndarray, requested: str = DEFAULT_KIND, shrinkage: float = SHRINKAGE, count: int | None = None,
        fallback: bool = True) -> VectorTransform:
    """Fit a transform to some vectors (rows), falling back to a simpler kind for few of them (:func:`choose_kind`).

    ``count`` is how many vectors the index held when ``vectors`` (maybe a sample) were taken; default their number.
    ``fallback=False`` fits the requested kind to however few vectors (to measure where the fallback should begin).
    """
    vectors = np.asarray(vectors, np.float64)
    count = len(vectors) if count is None else int(count)
    if vectors.ndim != 2:
        raise ParameterError(f"a vector transform is fitted to (N, dim) vectors, not shape {vectors.shape}")
    if not 0 <= shrinkage <= 1:
        raise ParameterError(f"shrinkage must lie in [0, 1], not {shrinkage}")
    kind = choose_kind(requested, len(vectors), vectors.shape[1]) if fallback else choose_kind(requested, 1 << 62, 1)
    if kind == "identity":
        return identity(count)
    mean = vectors.mean(axis=0)
    if kind == "center":
        return VectorTransform("center", mean.astype(np.float32), None, count, now_utc())
    centred = vectors - mean
    covariance = centred.T @ centred / len(vectors)
    values, axes = np.linalg.eigh(covariance)
    values = np.maximum(values, 0.0)
    shrunk = (1 - shrinkage) * values + shrinkage * values.mean()
    if not values.mean() > 0:
        return VectorTransform("center", mean.astype(np.float32), None, count, now_utc())
    matrix = (axes / np.sqrt(shrunk)) @ axes.T
    # Scaled so that centering and whitening give vectors of like size before normalising (only for readability).
    matrix *= np.sqrt(values.mean())
    return VectorTransform("whiten", mean.astype(np.float32), matrix.astype(np.float32), count, now_utc(), float(shrinkage))


def needs_refit(entry: dict | None, count: int) -> bool:
    """Whether an index of ``count`` live vectors should (re)fit: never fitted, or grown REFIT_GROWTH-fold since."""
    if entry is None or "checksum" not in entry:
        return count > 0
    return count >= REFIT_GROWTH * max(1, int(entry.get("fitted_on", 0)))


def sample_rows(count: int, limit: int = FIT_SAMPLE) -> np.ndarray:
    """Positions of an even sample of at most ``limit`` of ``count`` rows."""
    if count <= limit:
        return np.arange(count)
    return np.unique(np.linspace(0, count - 1, limit).round().astype(np.int64))

