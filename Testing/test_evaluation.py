"""Retrieval metrics and cbir evaluate against values computed by hand."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from CBIRSlicerLib import cli
from CBIRSlicerLib.errors import InputError
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.retrieval.evaluation import average_precision_at_k, micro_macro, modified_precision_at_k, read_labelled_csv


def test_modified_precision_caps_k_at_the_class_size():
    ranked = [True, False, True, True, False]
    assert modified_precision_at_k(ranked, 1, 3) == 1.0
    assert modified_precision_at_k(ranked, 3, 3) == pytest.approx(2 / 3)  # k capped at 3 relevant items
    assert modified_precision_at_k(ranked, 5, 3) == pytest.approx(2 / 3)  # still capped at 3
    assert modified_precision_at_k(ranked, 5, 10) == pytest.approx(3 / 5)  # plain P@5 when the class is large
    assert modified_precision_at_k(ranked, 3, 0) is None


def test_average_precision_at_k_by_hand():
    ranked = [True, False, True, True, False]
    # Relevant at ranks 1, 3, 4: precisions 1/1, 2/3, 3/4; over min(k, relevant) = 3.
    assert average_precision_at_k(ranked, 5, 3) == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)
    assert average_precision_at_k(ranked, 2, 3) == pytest.approx(1 / 2)  # only rank 1 counts, over min(2, 3)
    assert average_precision_at_k([False, False], 2, 1) == 0.0


def test_micro_and_macro_differ_when_classes_are_unbalanced():
    values = [1.0, 1.0, 1.0, 0.0, None]
    classes = ["a", "a", "a", "b", "b"]
    micro, macro = micro_macro(values, classes)
    assert micro == pytest.approx(0.75) and macro == pytest.approx(0.5)
    assert all(math.isnan(v) for v in micro_macro([None], ["a"]))


RADII = {"small": (10, 13, 17), "mid": (20, 29), "large": (35,)}


def _disc_folders(root):
    """A folder per class of bright discs on a dark ground; the handcrafted model ranks them by nearness of radius."""
    from CBIRSlicerLib.imaging.png import write_png

    yy, xx = np.mgrid[0:96, 0:96]
    for label, radii in RADII.items():
        os.makedirs(root / label)
        for r in radii:
            grey = np.where(np.hypot(yy - 47.5, xx - 47.5) <= r, 200, 40).astype(np.uint8)
            write_png(np.repeat(grey[..., None], 3, axis=2), root / label / f"r{r}.png")
    return root


def test_cbir_evaluate_reproduces_metrics_computed_by_hand(tmp_path, capsys):
    # Rankings by nearness of radius (asserted below), relevant = same class, k capped at the class size - 1:
    #   r10: 13 17 | 20 29 35  -> small has 2 others: P@1 1, P@3 (cap 2) 1,   AP@3 1,             R@1 1/2
    #   r13: 10 17 | 20 ...    ->                      P@1 1, P@3 1,           AP@3 1,             R@1 1/2
    #   r17: 20 13 10 ...      ->                      P@1 0, P@3 (top 2) 1/2, AP@3 (1/2+2/3)/2,   R@1 0
    #   r20: 17 13 29 10 35    -> mid has 1 other:     P@1 0, P@3 (cap 1) 0,   AP@3 (1/3)/1,       R@1 0
    #   r29: 35 20 ...         ->                      P@1 0, P@3 0,           AP@3 (1/2)/1,       R@1 0
    #   r35: the only 'large': no relevant item, left out of every mean.
    folder = _disc_folders(tmp_path / "discs")
    out = tmp_path / "report"
    assert cli.main(["evaluate", str(folder), "--model", "handcrafted", "-k", "1,3", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    ranked = {r["query"]: [name.split("/")[1] for name in r["ranked"]] for r in report["records"]}
    assert ranked["small/r17.png"][:3] == ["r20.png", "r13.png", "r10.png"]
    assert ranked["mid/r20.png"][:3] == ["r17.png", "r13.png", "r29.png"]
    assert ranked["mid/r29.png"][:2] == ["r35.png", "r20.png"]
    summary = report["summary"]
    assert summary["queries"] == 6 and summary["scored"] == 5
    assert summary["mP@1_micro"] == pytest.approx(2 / 5) and summary["mP@1_macro"] == pytest.approx((2 / 3 + 0) / 2)
    assert summary["mP@3_micro"] == pytest.approx(2.5 / 5) and summary["mP@3_macro"] == pytest.approx((2.5 / 3 + 0) / 2)
    assert summary["mAP@3"] == pytest.approx((1 + 1 + (1 / 2 + 2 / 3) / 2 + 1 / 3 + 1 / 2) / 5)
    assert summary["recall@1"] == pytest.approx(1 / 5) and summary["recall@3"] == pytest.approx(1.0)
    assert report["curve"]["k"] == [1, 2, 3] and report["curve"]["micro"][0] == pytest.approx(2 / 5)
    assert (out / "precision_at_k.png").stat().st_size > 1000 and json.loads((out / "evaluation.json").read_text())["summary"]


@pytest.mark.slow
def test_cbir_evaluate_labelled_volumes_with_regions(tmp_path, capsys):
    from CBIRSlicerLib.imaging import synthetic

    cases = synthetic.make_cohort(6, seed=3, kinds=("enhancing", "cyst"))
    paths = synthetic.write_cohort(cases, str(tmp_path / "cohort"))
    rows = ["path,label,roi_ras"]
    for case, path in zip(cases, paths):
        lesion = case.lesions[0]
        side = 2.5 * lesion.radius_mm
        roi = ",".join(f"{v:.2f}" for v in (*lesion.center, side, side, side))
        rows.append(f'{os.path.basename(path)},{lesion.kind},"{roi}"')
    labels = tmp_path / "cohort" / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    out = tmp_path / "report"
    assert cli.main(["evaluate", str(labels), "--model", "handcrafted", "-k", "1,3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mP@k micro" in text and "localised" in text
    report = json.loads((out / "evaluation.json").read_text())
    summary = report["summary"]
    assert summary["queries"] == 6 and summary["chance_mP@1"] == pytest.approx(2 / 5)
    # Same-kind cases come first more often than chance; best matches land in the labelled regions.
    assert summary["mP@3_micro"] > summary["chance_mP@1"] + 0.2 and summary["localised"] >= 0.8
    assert all(os.path.basename(p) not in r["ranked"] for p, r in zip(paths, report["records"]))  # never itself
    assert Index.open(str(out / "index")).info()["counts"]["cases"] == 6
    # The suggested finding, leave-one-case-out: the vote of each query's ranked cases, against its own label.
    from CBIRSlicerLib.retrieval.suggestion import vote

    knn = summary["knn"]
    winners = [next(iter(vote(r["neighbour_labels"], r["scores"])), None) for r in report["records"]]
    assert knn["accuracy"] == pytest.approx(sum(w == r["label"] for w, r in zip(winners, report["records"])) / 6)
    assert knn["chance_majority"] == pytest.approx(0.5) and knn["accuracy"] > 0.5 and "suggested finding" in text
    index = Index.open(str(out / "index"))
    assert index.catalog.meta("suggestion_calibration")["label"]["fitted_on"] == knn["answered"] == 6
    assert sorted(c.labels[0] for c in index.catalog.cases()) == sorted(c.lesions[0].kind for c in cases)


def test_labels_csv_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "labels.csv"
    bad.write_text("path,label,roi_ras\na.nii.gz,cyst,\"1,2,3\"\n")
    with pytest.raises(InputError, match=r"labels.csv.*line 2.*six"):
        read_labelled_csv(str(bad))
    bad.write_text("file,kind\na.nii.gz,cyst\n")
    with pytest.raises(InputError, match="path,label"):
        read_labelled_csv(str(bad))
