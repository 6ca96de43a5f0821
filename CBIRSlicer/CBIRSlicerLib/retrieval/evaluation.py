"""Retrieval metrics and the evaluation protocols: labelled volumes, class folders of 2D images, the lesion cohort.

Modified precision@k after Denner et al. 2024: k is capped at the number of index items of the
query's class (so a class with 3 other members is judged on its top 3); reported micro (mean over
queries) and macro (mean of per-class means). mAP@k is the mean over queries of the average
precision over the top k. Recall@k is the share of the relevant cases found in the top k.
Localisation: the best match (its focus) of a relevant result lies inside that case's
ground-truth region (an ROI box of the labels CSV; a lesion sphere of the synthetic cohort).
Every protocol is leave-one-case-out: a query never finds its own case.
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
class Evaluation:
    """Per-query records and the summary of an evaluation run."""

    records: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    curve: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        """JSON form."""
        return {"summary": self.summary, "curve": self.curve, "records": self.records}


def recall_at_k(ranked_relevant: Sequence[bool], k: int, relevant_total: int) -> float | None:
    """Share of all relevant items found in the top k; None when nothing relevant exists."""
    if relevant_total <= 0:
        return None
    return float(np.sum(np.asarray(ranked_relevant[:k], dtype=bool))) / relevant_total


def record(query: str, label: str, ranked: list, relevant: list[bool], relevant_total: int, ks: Sequence[int],
           located: list[bool] | None = None) -> dict:
    """One query's outcome with its per-k metrics."""
    out = {"query": query, "label": label, "ranked": ranked, "relevant": relevant, "relevant_total": relevant_total,
           "located": located or []}
    for k in ks:
        out[f"mP@{k}"] = modified_precision_at_k(relevant, k, relevant_total)
        out[f"AP@{k}"] = average_precision_at_k(relevant, k, relevant_total)
        out[f"R@{k}"] = recall_at_k(relevant, k, relevant_total)
    return out


def summarise(records: list[dict], ks: Sequence[int], candidates: int, **extra) -> Evaluation:
    """Micro/macro modified P@k, mAP@k, recall@k, localisation, chance level and the P@k curve of some records.

    ``candidates`` is how many items each query chooses among (for chance mP@1).
    """
    classes = [r["label"] for r in records]
    summary = {"queries": len(records), "scored": sum(1 for r in records if r["relevant_total"] > 0), **extra}
    for k in ks:
        summary[f"mP@{k}_micro"], summary[f"mP@{k}_macro"] = micro_macro([r[f"mP@{k}"] for r in records], classes)
        summary[f"mAP@{k}"] = micro_macro([r[f"AP@{k}"] for r in records], classes)[0]
        summary[f"recall@{k}"] = micro_macro([r[f"R@{k}"] for r in records], classes)[0]
    located = [x for r in records for x in r["located"]]
    summary["localised"] = float(np.mean(located)) if located else None
    summary["localised_count"] = f"{sum(located)}/{len(located)}"
    scored = [r for r in records if r["relevant_total"] > 0]
    summary["chance_mP@1"] = float(np.mean([r["relevant_total"] / candidates for r in scored])) if scored and candidates else None
    depth = max(ks)
    curve = {"k": list(range(1, depth + 1)),
             "micro": [micro_macro([modified_precision_at_k(r["relevant"], k, r["relevant_total"]) for r in records], classes)[0]
                       for k in range(1, depth + 1)],
             "macro": [micro_macro([modified_precision_at_k(r["relevant"], k, r["relevant_total"]) for r in records], classes)[1]
                       for k in range(1, depth + 1)]}
    return Evaluation(records, summary, curve)


def format_summary(summary: dict, ks: Sequence[int]) -> str:
    """The summary as a small text table."""
    lines = [f"{'k':>4}  {'mP@k micro':>10}  {'mP@k macro':>10}  {'mAP@k':>7}  {'recall@k':>8}"]
    for k in ks:
        lines.append(f"{k:>4}  {summary[f'mP@{k}_micro']:>10.3f}  {summary[f'mP@{k}_macro']:>10.3f}  "
                     f"{summary[f'mAP@{k}']:>7.3f}  {summary[f'recall@{k}']:>8.3f}")
    if summary.get("localised") is not None:
        lines.append(f"localised: {summary['localised']:.3f} ({summary['localised_count']} best matches of relevant results "
                     "inside the ground-truth region)")
    if summary.get("chance_mP@1") is not None:
        lines.append(f"chance mP@1: {summary['chance_mP@1']:.3f}; {summary['queries']} queries, {summary['scored']} with a relevant case")
    knn = summary.get("knn")
    if knn and knn.get("accuracy") is not None and knn.get("ece") is not None:
        lines.append(f"suggested finding (k-NN vote of the top {knn['k']}): accuracy {knn['accuracy']:.3f}, balanced "
                     f"{knn['balanced_accuracy']:.3f}, ECE {knn['ece']:.3f} (cross-fitted calibration); chance "
                     f"{knn['chance_majority']:.3f} (majority) / {knn['chance_uniform']:.3f} (uniform)")
    return "\n".join(lines)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class LabelledVolume:
    """One row of a labels CSV: a volume, its label, and optionally the region the label is about."""

    path: str
    label: str
    roi: object = None  # RoiBox or None


def read_labelled_csv(path: str) -> list[LabelledVolume]:
    """Rows path,label[,roi_ras] (paths relative to the CSV; several rows per volume allowed)."""
    import csv

    from ..errors import InputError
    from ..imaging.roi import RoiBox

    if not os.path.isfile(path):
        raise InputError(path, "does not exist")
    rows = []
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or not {"path", "label"} <= set(reader.fieldnames):
            raise InputError(path, f"a labels CSV needs the columns path,label[,roi_ras]; found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            if not (row.get("path") or "").strip() or not (row.get("label") or "").strip():
                raise InputError(path, f"line {line}: path and label must not be empty")
            roi_text = (row.get("roi_ras") or "").strip()
            try:
                roi = RoiBox.parse(roi_text) if roi_text else None
            except Exception as error:  # the ROI parser's message says what is wrong with the numbers
                raise InputError(path, f"line {line}: {error}") from None
            rows.append(LabelledVolume(os.path.normpath(os.path.join(base, row["path"].strip())), row["label"].strip(), roi))
    if not rows:
        raise InputError(path, "holds no rows")
    return rows


def read_class_folders(folder: str) -> list[tuple[str, str]]:
    """(image path, class) for every 2D image in the sub-folders of a folder, one sub-folder per class."""
    from ..errors import InputError

    pairs = []
    for label in sorted(os.listdir(folder)):
        sub = os.path.join(folder, label)
        if os.path.isdir(sub):
            pairs += [(os.path.join(sub, f), label) for f in sorted(os.listdir(sub)) if f.lower().endswith(IMAGE_SUFFIXES)]
    if not pairs:
        raise InputError(folder, f"holds no class sub-folders with images ({', '.join(IMAGE_SUFFIXES)})")
    return pairs


def _image_as_rgb(path: str) -> np.ndarray:
    """A 2D image file as uint8 RGB (16-bit and float images scaled from their own range)."""
    import SimpleITK as sitk

    from ..errors import InputError

    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(path))
    except RuntimeError as error:
        raise InputError(path, f"cannot be read as an image ({str(error).strip().splitlines()[-1]})") from None
    array = np.squeeze(array)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = array[..., :3]
    elif array.ndim != 2:
        raise InputError(path, f"is not a 2D image (array shape {array.shape})")
    if array.dtype != np.uint8:
        low, high = float(array.min()), float(array.max())
        array = np.round((array.astype(np.float64) - low) / (high - low or 1.0) * 255).astype(np.uint8)
    return np.repeat(array[..., None], 3, axis=2) if array.ndim == 2 else np.ascontiguousarray(array)


def evaluate_images(folder: str, embedder, ks: Sequence[int] = (1, 3, 5, 10)) -> Evaluation:
    """Denner et al.'s protocol on a folder per class of 2D images: exact search, each image against all the others."""
    from ..index.faiss_store import VectorStore

    pairs = read_class_folders(folder)
    vectors = embedder.embed_images([_image_as_rgb(p) for p, _ in pairs])
    store = VectorStore.create(vectors.shape[1], "flat")
    store.add(vectors, np.arange(len(pairs), dtype=np.int64))
    labels = [label for _, label in pairs]
    sizes = {label: labels.count(label) for label in set(labels)}
    depth = min(max(ks), len(pairs) - 1)
    records = []
    for n, (path, label) in enumerate(pairs):
        _, ids = store.search(vectors[n:n + 1], depth, excluded=np.array([n]))
        ranked = [int(i) for i in ids[0] if i >= 0]
        records.append(record(os.path.relpath(path, folder), label, [os.path.relpath(pairs[i][0], folder) for i in ranked],
                              [labels[i] == label for i in ranked], sizes[label] - 1, ks))
    return summarise(records, ks, len(pairs) - 1, input=os.path.abspath(folder), protocol="2D images, leave-one-out",
                     model=embedder.name)


def evaluate_volumes(rows: list[LabelledVolume], searcher, ks: Sequence[int] = (1, 3, 5, 10), axis: str = "axial",
                     method: str = "maxsim") -> Evaluation:
    """Labelled volumes against an index holding them: one query per row (its ROI, else the whole volume).

    Relevant cases hold a row with the query's label; a relevant result is localised when its focus lies in one of
    that case's ROIs with the query's label.
    """
    from ..imaging.readers import read_volume
    from .queries import roi_query, volume_query

    labels_of: dict[str, set[str]] = {}
    regions: dict[tuple[str, str], list] = {}
    for row in rows:
        labels_of.setdefault(row.path, set()).add(row.label)
        if row.roi is not None:
            regions.setdefault((row.path, row.label), []).append(row.roi)
    depth = max(ks)
    records = []
    volumes: dict[str, object] = {}
    began = time.monotonic()
    for row in rows:
        if row.path not in volumes:
            volumes = {row.path: read_volume(row.path)}  # rows of one volume are usually together; keep one in memory
        volume = volumes[row.path]
        if row.roi is not None:
            query = roi_query(volume, row.roi, axis, searcher.index)
        else:
            query = volume_query(volume, axis, searcher.index)
        answer = searcher.search(query, k=depth, method=method)
        ranked = [r.source for r in answer.results]
        relevant = [row.label in labels_of.get(source, set()) for source in ranked]
        located = []
        for result, is_relevant in zip(answer.results, relevant):
            boxes = regions.get((result.source, row.label))
            if is_relevant and boxes:
                located.append(any(box.contains(result.best_match.spot) for box in boxes))
        relevant_total = sum(1 for path, labels in labels_of.items() if path != row.path and row.label in labels)
        name = os.path.basename(row.path) + (f" roi {','.join(f'{v:g}' for v in row.roi.as_list())}" if row.roi else "")
        item = record(name, row.label, [os.path.basename(s) for s in ranked], relevant, relevant_total, ks, located)
        item["case"], item["scores"] = row.path, [r.score for r in answer.results]
        item["neighbour_labels"] = [sorted(labels_of.get(source, set())) for source in ranked]
        records.append(item)
    evaluation = summarise(records, ks, len(labels_of) - 1, protocol="volumes, leave-one-case-out", axis=axis, ranking=method,
                           seconds_per_query=(time.monotonic() - began) / max(1, len(rows)))
    evaluation.summary["knn"] = knn_summary(records)
    return evaluation


def knn_summary(records: list[dict], k: int = 10) -> dict:
    """The suggested finding, leave-one-case-out: k-NN accuracy, balanced accuracy and calibration beside chance.

    Each record needs ``label``, ``case``, ``scores`` and ``neighbour_labels`` (its ranked cases' labels). The
    confidence of each vote comes from a calibration fitted on the votes of the other cases' queries only
    (cross-fitted); ``calibration`` is the one fitted on every vote, which ``cbir evaluate`` pins in the index.
    """
    from .suggestion import balanced_accuracy, expected_calibration_error, fit_calibration, vote

    votes = []
    for r in records:
        shares = vote(r["neighbour_labels"][:k], r.get("vote_scores", r["scores"])[:k])
        winner, share = next(iter(shares.items())) if shares else (None, 0.0)
        votes.append((r["case"], r["label"], winner, share))
        r["suggestion"] = {"label": winner, "share": round(share, 3)}
    answered = [v for v in votes if v[2] is not None]
    right = [w == t for _, t, w, _ in answered]
    crossed = [fit_calibration([o[3] for o in answered if o[0] != case], [o[2] == o[1] for o in answered if o[0] != case],
                               "cross").confidence(share) for case, _, _, share in answered]
    truth = [v[1] for v in votes]
    counts = {label: truth.count(label) for label in set(truth)}
    calibration = fit_calibration([v[3] for v in answered], right, "evaluation queries (leave-one-case-out)", counts)
    return {"k": k, "queries": len(votes), "answered": len(answered),
            "accuracy": float(np.mean([v[2] == v[1] for v in votes])) if votes else None,
            "balanced_accuracy": balanced_accuracy(truth, [v[2] for v in votes]),
            "ece": expected_calibration_error(crossed, right), "ece_raw_share": expected_calibration_error([v[3] for v in answered], right),
            "chance_majority": max(counts.values()) / len(truth) if truth else None,
            "chance_uniform": 1 / len(counts) if counts else None, "calibration": calibration.to_json()}


def evaluate_lesions(searcher, truth: dict[str, list], paths: dict[str, str], ks=(1, 3, 5), roi_scale: float = 2.5,
                     method: str = "maxsim", axis: str = "axial", use_focus: bool = True, place: bool = False) -> Evaluation:
    """The synthetic cohort: one ROI query per lesion (a cube of ``roi_scale`` radii); relevant cases hold the same kind.

    Localised: the best match of a relevant result lies inside a lesion of that kind (within its radius of its centre).
    """
    from ..imaging.readers import read_volume
    from ..imaging.roi import RoiBox
    from .queries import roi_query

    kinds_of = {name: {lesion.kind for lesion in lesions} for name, lesions in truth.items()}
    by_source = {os.path.abspath(p): name for name, p in paths.items()}
    records = []
    depth = max(ks)
    began = time.monotonic()
    for name, lesions in truth.items():
        volume = read_volume(paths[name])
        for lesion in lesions:
            side = roi_scale * lesion.radius_mm
            query = roi_query(volume, RoiBox(lesion.center, (side, side, side)), axis, searcher.index)
            answer = searcher.search(query, k=max(depth, len(truth)), method=method)
            if place:
                answer = searcher.place(query, answer, limit=depth)
            ranked = [by_source.get(r.source) for r in answer.results]
            relevant = [lesion.kind in kinds_of.get(other, set()) for other in ranked]
            relevant_total = sum(1 for other in truth if other != name and lesion.kind in kinds_of[other])
            located = []
            for r, other, is_relevant in zip(answer.results[:depth], ranked, relevant):
                if not is_relevant:
                    continue
                spot = np.array(r.best_match.focus_ras if use_focus else r.best_match.ras)
                located.append(any(np.linalg.norm(spot - np.array(t.center)) <= t.radius_mm
                                   for t in truth[other] if t.kind == lesion.kind))
            item = record(name, lesion.kind, ranked, relevant, relevant_total, ks, located)
            item["best_matches"] = [r.best_match.to_json() for r in answer.results[:depth]]
            item["scores"] = [r.score for r in answer.results[:depth]]
            item["case"], item["vote_scores"] = name, [r.score for r in answer.results]
            item["neighbour_labels"] = [sorted(kinds_of.get(other, set())) for other in ranked]
            records.append(item)
    evaluation = summarise(records, ks, len(truth) - 1, protocol="lesion ROI queries, leave-one-case-out", ranking=method,
                           roi_scale=roi_scale, seconds_per_query=(time.monotonic() - began) / max(1, len(records)))
    evaluation.summary["knn"] = knn_summary(records)
    return evaluation
