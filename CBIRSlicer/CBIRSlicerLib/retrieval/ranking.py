"""From image hits to case results: vote counting, pooled embeddings, and late interaction (MaxSim).

MaxSim after ColBERT, as Khun Jush et al. use it for slice-to-volume retrieval: a candidate
case's score is the (weighted) mean over query images of the best cosine between that query image
and any of the case's items. The first stage (nearest-neighbour hits) picks the candidates; MaxSim
re-ranks them exactly. Every result also names its best match, so the viewer can jump there: the
item of the highest weighted mean similarity to the query images. For a region query the images
are weighted, in the score and in placing the match, by how alike they are to the region's central
image (:func:`centre_weights`): a reader centres the box on what they ask about, and the box's
first and last slices often hold only the tissue around it; those agree with tissue anywhere, and
with equal weights they pulled matches off the object and tissue-alike cases up (docs/benchmarks.md).

Items sit on a grid (tiles every half tile, slices every few mm), so the best item's centre can
lie up to half a step from what matched. The result's *focus* refines it: the similarity-weighted
centre of the items of the best item's size and axis that overlap it, weighted by
exp((s - s_best) / FOCUS_TEMPERATURE). Overlapping tiles that all hold the matched object surround
it, so their weighted centre falls on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..threads import one_blas_thread

METHODS = ("maxsim", "votes", "pooled")
MAX_RESULTS = 1000  # k at most: more cases than a reader looks at; each shown case is located (and placed), which costs
FOCUS_TEMPERATURE = 0.01  # cosine units: an item 0.03 below the best weighs 5 %
CENTRE_TEMPERATURE = 0.05  # cosine units: a query image 0.15 less like the central one than it is to itself weighs 5 %


@dataclass
class CaseScore:
    """One case's score, its per-query-image scores, votes and best-matching item."""

    case_row: int
    score: float
    votes: int
    per_image: list[float]
    best_item: int
    focus_ras: tuple[float, float, float] | None = None


def candidate_cases(hit_ids: np.ndarray, hit_scores: np.ndarray, case_of, limit: int) -> dict[int, int]:
    """Cases hit in the first stage, with their vote counts, the ``limit`` most-voted (ties by best score).

    ``case_of`` maps item id -> case row: a dict, or an array indexed by id.
    """
    ids, scores = np.asarray(hit_ids).ravel(), np.asarray(hit_scores, np.float64).ravel()
    if isinstance(case_of, dict):
        rows = np.array([case_of.get(int(i), -1) if i >= 0 else -1 for i in ids], np.int64)
    else:
        rows = np.where(ids >= 0, np.asarray(case_of)[np.maximum(ids, 0)], -1)
    valid = rows >= 0
    if not valid.any():
        return {}
    unique, inverse, votes = np.unique(rows[valid], return_inverse=True, return_counts=True)
    best = np.full(len(unique), -np.inf)
    np.maximum.at(best, inverse, scores[valid])
    order = np.lexsort((-best, -votes))[:limit]  # most votes first, then the best single score
    return {int(unique[n]): int(votes[n]) for n in order}


def focus(similarity: np.ndarray, best: int, centres: np.ndarray, sizes: np.ndarray, axes: np.ndarray) -> np.ndarray:
    """Similarity-weighted centre (RAS) of the items like the best one (same axis and size) that overlap it."""
    alike = (axes == axes[best]) & np.isclose(sizes, sizes[best])
    overlapping = alike & np.all(np.abs(centres - centres[best]) < sizes[best] / 2 + 1e-6, axis=1)
    weights = np.exp((similarity[overlapping] - similarity[best]) / FOCUS_TEMPERATURE)
    return weights @ centres[overlapping] / weights.sum()


def similarities(queries: np.ndarray, blocks: list[np.ndarray]) -> list[np.ndarray]:
    """Query-to-item cosines (query images x items) for several cases' item vectors.

    Each block is multiplied as (items x dim) @ (dim x queries), transposed after: the blocks are views into the
    store's row-major storage, so this reads them in place, where joining them first copied every vector
    (16 images x 30 cases x 500 items: 3 ms instead of 9-13 ms; docs/benchmarks.md). They run on one BLAS thread,
    so no idle BLAS threads spin against the next FAISS search (:mod:`threads`).
    """
    transposed = np.ascontiguousarray(np.asarray(queries, np.float32).T)
    with one_blas_thread():
        return [(block @ transposed).T for block in blocks]


def score_case(similarity: np.ndarray, method: str, votes: int, queries: np.ndarray | None = None,
               item_vectors: np.ndarray | None = None, weights: np.ndarray | None = None) -> CaseScore:
    """One candidate case's score from its query-to-item similarities (query images x items).

    ``queries`` and ``item_vectors`` are needed by the pooled method only; ``weights`` (the query images', summing to 1;
    default equal) by maxsim.
    """
    per_image = similarity.max(axis=1)
    if method == "maxsim":
        score = float(per_image.mean() if weights is None else np.asarray(weights) @ per_image)
    elif method == "pooled":
        pooled_items = item_vectors.mean(axis=0)
        pooled_query = queries.mean(axis=0)
        score = float(pooled_items @ pooled_query / (np.linalg.norm(pooled_items) * np.linalg.norm(pooled_query) + 1e-12))
    elif method == "votes":
        score = float(votes)
    else:
        raise ValueError(f"unknown ranking method '{method}'; use one of {', '.join(METHODS)}")
    return CaseScore(-1, score, votes, np.round(per_image.astype(np.float64), 5).tolist(), -1)


def centre_weights(queries: np.ndarray) -> np.ndarray:
    """Weights (summing to 1) of a region query's images, in slice order, by their likeness to its central image.

    exp((cos(image, centre) - 1) / CENTRE_TEMPERATURE): the central image (the mean of the two central ones for an even
    count) and those that look like it count; images of other content, such as the tissue beyond the object's ends,
    count little. Measured on four synthetic cohorts with boxes of 2, 2.5 and 3 lesion radii (docs/benchmarks.md):
    T from 0.03 to 0.1 localise alike; weights by distance from the centre instead of by likeness did not help.
    """
    queries = np.asarray(queries, np.float64)
    count = len(queries)
    centre = queries[(count - 1) // 2:count // 2 + 1].mean(axis=0)
    likeness = queries @ centre / max(float(np.linalg.norm(centre)), 1e-12)
    weights = np.exp((likeness - likeness.max()) / CENTRE_TEMPERATURE)
    return weights / weights.sum()


def locate(similarity: np.ndarray, centres: np.ndarray, sizes: np.ndarray, axes: np.ndarray,
           weights: np.ndarray | None = None) -> tuple[int, np.ndarray]:
    """A case's best match (position in its item arrays: the item of the highest weighted mean similarity) and its focus.

    ``weights`` are the query images' (default equal). Measured against alternatives on the synthetic cohort
    (docs/benchmarks.md): the central query image alone, the best single image, the median over images, weights by
    distance from the ROI centre, by how peaked an image's similarities are or by pixel contrast, per-image z-scores,
    and laying the query's slices on the case's slices around each place.
    """
    agreed = similarity.mean(axis=0) if weights is None else np.asarray(weights) @ similarity
    best = int(np.argmax(agreed))
    return best, focus(agreed, best, centres, sizes, axes)


def rank(scores: list[CaseScore]) -> list[CaseScore]:
    """Best first; ties broken by votes, then by the best single image score."""
    return sorted(scores, key=lambda s: (-s.score, -s.votes, -max(s.per_image)))
