"""Retrieval metrics and the ROI-retrieval protocol on a labelled cohort.

Modified precision@k after Denner et al. 2024: k is capped at the number of index items of the
query's class (so a class with 3 other members is judged on its top 3); reported micro (mean over
queries) and macro (mean of per-class means). mAP@k is the mean over queries of the average
precision over the top k. Localisation: the best match of a relevant result lies inside the
lesion the query asked about the kind of.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def modified_precision_at_k(ranked_relevant: Sequence[bool], k: int, relevant_total: int) -> float | None:
    """Precision over the top min(k, relevant_total) results; None when nothing relevant exists."""
    cap = min(k, relevant_total)
    if cap <= 0:
        return None
    return float(np.sum(np.asarray(ranked_relevant[:cap], dtype=bool))) / cap


def average_precision_at_k(ranked_relevant: Sequence[bool], k: int, relevant_total: int) -> float | None:
    """Average precision over the top k: mean of precision at each relevant rank, over min(k, relevant_total)."""
    cap = min(k, relevant_total)
    if cap <= 0:
        return None
    hits, total = 0, 0.0
    for rank, relevant in enumerate(ranked_relevant[:k], start=1):
        if relevant:
            hits += 1
            total += hits / rank
    return total / cap


def micro_macro(values: Sequence[float | None], classes: Sequence[str]) -> tuple[float, float]:
    """Mean over queries, and mean over classes of their means (queries with None left out)."""
    pairs = [(v, c) for v, c in zip(values, classes) if v is not None]
    if not pairs:
        return float("nan"), float("nan")
    micro = float(np.mean([v for v, _ in pairs]))
    by_class: dict[str, list[float]] = {}
    for v, c in pairs:
        by_class.setdefault(c, []).append(v)
    return micro, float(np.mean([np.mean(v) for v in by_class.values()]))


@dataclass
class RoiEvaluation:
    """Per-query records and the summary of an ROI-retrieval run."""

    records: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


def evaluate_roi_retrieval(searcher, truth: dict[str, list], paths: dict[str, str], ks=(1, 3, 5), roi_scale: float = 2.5,
                           method: str = "maxsim", axis: str = "axial") -> RoiEvaluation:
    """Leave-one-case-out ROI queries, one per lesion: relevant cases hold a lesion of the same kind."""
    from .readers import read_volume
    from .roi import RoiBox
    from .search import roi_query

    kinds_of = {name: {lesion.kind for lesion in lesions} for name, lesions in truth.items()}
    by_source = {os.path.abspath(p): name for name, p in paths.items()}
    result = RoiEvaluation()
    depth = max(max(ks), 1)
    began = time.monotonic()
    for name, lesions in truth.items():
        volume = read_volume(paths[name])
        for lesion in lesions:
            side = roi_scale * lesion.radius_mm
            query = roi_query(volume, RoiBox(lesion.center, (side, side, side)), axis, searcher.index)
            answer = searcher.search(query, k=max(depth, len(truth)), method=method)
            ranked = [by_source.get(r["source"]) for r in answer["results"]]
            relevant = [lesion.kind in kinds_of.get(other, set()) for other in ranked]
            relevant_total = sum(1 for other in truth if other != name and lesion.kind in kinds_of[other])
            located = []
            for r, other, is_relevant in zip(answer["results"][:depth], ranked, relevant):
                if not is_relevant:
                    continue
                spot = np.array(r["best_match"]["ras"])
                located.append(any(np.linalg.norm(spot - np.array(t.center)) <= t.radius_mm
                                   for t in truth[other] if t.kind == lesion.kind))
            record = {"case": name, "kind": lesion.kind, "ranked": ranked, "relevant": relevant,
                      "relevant_total": relevant_total, "located": located}
            for k in ks:
                record[f"mP@{k}"] = modified_precision_at_k(relevant, k, relevant_total)
                record[f"AP@{k}"] = average_precision_at_k(relevant, k, relevant_total)
            result.records.append(record)
    classes = [r["kind"] for r in result.records]
    summary = {"queries": len(result.records), "method": method, "roi_scale": roi_scale,
               "seconds_per_query": (time.monotonic() - began) / max(1, len(result.records))}
    for k in ks:
        summary[f"mP@{k}_micro"], summary[f"mP@{k}_macro"] = micro_macro([r[f"mP@{k}"] for r in result.records], classes)
        summary[f"mAP@{k}"] = micro_macro([r[f"AP@{k}"] for r in result.records], classes)[0]
    located = [x for r in result.records for x in r["located"]]
    summary["localised"] = float(np.mean(located)) if located else float("nan")
    summary["localised_count"] = f"{sum(located)}/{len(located)}"
    summary["chance_mP@1"] = float(np.mean([r["relevant_total"] / (len(truth) - 1) for r in result.records]))
    result.summary = summary
    return result
