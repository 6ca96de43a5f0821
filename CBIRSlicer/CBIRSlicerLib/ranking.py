"""From image hits to case results: vote counting, pooled embeddings, and late interaction (MaxSim).

MaxSim after ColBERT, as Khun Jush et al. use it for slice-to-volume retrieval: a candidate
case's score is the mean over query images of the best cosine between that query image and any
of the case's items. The first stage (nearest-neighbour hits) picks the candidates; MaxSim
re-ranks them exactly. Every result also names its best match: the item whose mean similarity
to the query images is highest, so the viewer can jump there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("maxsim", "votes", "pooled")


@dataclass
class CaseScore:
    """One case's score, its per-query-image scores, votes and best-matching item."""

    case_row: int
    score: float
    votes: int
    per_image: list[float]
    best_item: int


def candidate_cases(hit_ids: np.ndarray, hit_scores: np.ndarray, case_of: dict[int, int], limit: int) -> dict[int, int]:
    """Cases hit in the first stage, with their vote counts, the ``limit`` most-voted (ties by best score)."""
    votes: dict[int, int] = {}
    best: dict[int, float] = {}
    for ids, scores in zip(hit_ids, hit_scores):
        for item, score in zip(ids, scores):
            if item < 0 or item not in case_of:
                continue
            row = case_of[item]
            votes[row] = votes.get(row, 0) + 1
            best[row] = max(best.get(row, -np.inf), float(score))
    order = sorted(votes, key=lambda r: (-votes[r], -best[r]))
    return {r: votes[r] for r in order[:limit]}


def score_case(queries: np.ndarray, item_vectors: np.ndarray, item_ids: np.ndarray, method: str, votes: int) -> CaseScore | None:
    """Score one candidate case from its item vectors (rows aligned with item_ids)."""
    if not len(item_ids):
        return None
    similarity = queries @ item_vectors.T  # (query images, items)
    per_image = similarity.max(axis=1)
    best_item = int(item_ids[int(np.argmax(similarity.mean(axis=0)))])
    if method == "maxsim":
        score = float(per_image.mean())
    elif method == "pooled":
        pooled_items = item_vectors.mean(axis=0)
        pooled_query = queries.mean(axis=0)
        score = float(pooled_items @ pooled_query / (np.linalg.norm(pooled_items) * np.linalg.norm(pooled_query) + 1e-12))
    elif method == "votes":
        score = float(votes)
    else:
        raise ValueError(f"unknown ranking method '{method}'; use one of {', '.join(METHODS)}")
    return CaseScore(-1, score, votes, [round(float(v), 5) for v in per_image], best_item)


def rank(scores: list[CaseScore]) -> list[CaseScore]:
    """Best first; ties broken by votes, then by the best single image score."""
    return sorted(scores, key=lambda s: (-s.score, -s.votes, -max(s.per_image)))
