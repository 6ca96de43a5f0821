"""``cbir evaluate`` and ``cbir demo``: retrieval metrics on labelled data, and the synthetic demo with its report."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import CBIRError
from .common import MAX_RESULTS, progress_printer, whole_number


def _parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise CBIRError(f"-k must be comma-separated whole numbers, like 1,3,5,10; got '{text}'") from None
    if not ks or ks[0] < 1 or ks[-1] > MAX_RESULTS:
        raise CBIRError(f"-k values must be 1 to {MAX_RESULTS}; got '{text}'")
    return ks


def _evaluate(args: argparse.Namespace) -> int:
    """cbir evaluate: retrieval metrics on labelled volumes (CSV) or a folder per class of 2D images."""
    from ..index.items import IndexSettings
    from ..index.location import create_index, index_exists, open_index
    from ..models.registry import create_embedder
    from ..plots import precision_curve_png
    from ..retrieval.evaluation import evaluate_images, evaluate_volumes, format_summary, read_labelled_csv
    from ..retrieval.search import Searcher

    ks = _parse_ks(args.k)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if os.path.isdir(args.input):
        embedder = create_embedder(args.model or "biomedclip", device=args.device)
        evaluation = evaluate_images(args.input, embedder, ks)
    elif os.path.isfile(args.input):
        rows = read_labelled_csv(args.input)
        folder = args.index or str(out / "index")
        if index_exists(folder):
            index = open_index(folder, writable=True)
            embedder = create_embedder(args.model or index.model_name(), device=args.device)
        else:
            embedder = create_embedder(args.model or "biomedclip", device=args.device)
            index = create_index(folder, embedder, IndexSettings(axes=[args.axis]))
        labels: dict[str, list[str]] = {}
        for row in rows:  # the cases carry the CSV's labels, for suggestions on later searches of this index
            mine = labels.setdefault(os.path.abspath(row.path), [])
            if row.label not in mine:
                mine.append(row.label)
        with index:  # indexes what is missing; already indexed, unchanged files are skipped
            report = index.add_sources(sorted({r.path for r in rows}), embedder, progress=progress_printer("indexing"),
                                       labels=labels)
        if report.skipped:
            print(report.summary(), file=sys.stderr)
        evaluation = evaluate_volumes(rows, Searcher(open_index(folder), embedder), ks, args.axis, args.ranking)
        _pin_knn_calibration(folder, evaluation.summary.get("knn"))
    else:
        raise CBIRError(f"{args.input}: no such file or folder (give a labels CSV or a folder per class of 2D images)")
    evaluation.summary["model"] = embedder.name
    evaluation.summary["input"] = os.path.abspath(args.input)
    curve = {**evaluation.curve, "chance": evaluation.summary.get("chance_mP@1")}
    evaluation.summary["figure"] = precision_curve_png({embedder.name: curve}, str(out / "precision_at_k.png"),
                                                       f"{os.path.basename(args.input)}: {embedder.name}")
    with open(out / "evaluation.json", "w") as handle:
        json.dump(evaluation.as_dict(), handle, indent=1)
    if args.json:
        print(json.dumps(evaluation.as_dict(), indent=1))
    else:
        print(f"{evaluation.summary['protocol']}, model {embedder.name}: {evaluation.summary['queries']} queries")
        print(format_summary(evaluation.summary, ks))
        print(f"wrote {out / 'evaluation.json'} and {out / 'precision_at_k.png'}")
    return 0


def _pin_knn_calibration(folder: str, knn: dict | None) -> None:
    """Keep the suggestion's calibration fitted on the evaluation's votes in the index (searches prefer it)."""
    from ..index.location import open_index
    from ..retrieval.suggestion import Calibration, pin_calibration

    if knn and knn.get("answered"):
        with open_index(folder, writable=True) as index:
            pin_calibration(index, "label", Calibration(**knn["calibration"]))


def _demo(args: argparse.Namespace) -> int:
    """cbir demo: synthetic cohort, index, ROI queries, evaluation and an HTML report."""
    from ..demo import DEMO_KS, run_demo
    from ..retrieval.evaluation import format_summary

    summary = run_demo(args.out, args.model, args.cases, args.seed, args.device, progress=progress_printer("indexing"),
                       log=lambda line: print(line, flush=True))
    print(format_summary(summary, DEMO_KS))
    print(f"done in {summary['seconds']} s; open {summary['report']}")
    return 0


def register(commands) -> None:
    """The evaluate and demo commands."""
    evaluate = commands.add_parser("evaluate", help="retrieval metrics (modified P@k, mAP@k, recall@k, localisation) "
                                                    "on labelled volumes or a folder per class of 2D images")
    evaluate.add_argument("input", help="CSV with path,label[,roi_ras] rows (volumes), or a folder with one sub-folder per class "
                                        "of 2D images")
    evaluate.add_argument("--out", default="evaluation", help="folder for evaluation.json and precision_at_k.png (default ./evaluation)")
    evaluate.add_argument("--index", help="volumes: the index to search (built or extended from the CSV; default OUT/index)")
    evaluate.add_argument("--model", help="embedding model (default biomedclip, or the index's own)")
    evaluate.add_argument("-k", default="1,3,5,10", help="cut-offs, comma-separated (default 1,3,5,10)")
    evaluate.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    evaluate.add_argument("--ranking", default="maxsim", choices=["maxsim", "votes", "pooled"], help="case ranking (default maxsim)")
    evaluate.add_argument("--device", help="cuda, mps or cpu")
    evaluate.add_argument("--json", action="store_true", help="print the whole report as JSON")
    evaluate.set_defaults(run=_evaluate)
    demo = commands.add_parser("demo", help="synthetic cohort -> index -> ROI queries -> evaluation and an HTML report")
    demo.add_argument("--out", default="cbir-demo", help="output folder (default ./cbir-demo)")
    demo.add_argument("--model", default="handcrafted", help="embedding model (default handcrafted: nothing to download)")
    demo.add_argument("--cases", type=whole_number(8, 400, " (2 or more of each of the demo's 4 lesion kinds)"), default=12,
                      help="cases in the cohort, 8 to 400 (default 12)")
    demo.add_argument("--seed", type=whole_number(0, 2**32 - 1), default=0, help="cohort seed (default 0)")
    demo.add_argument("--device", help="cuda, mps or cpu")
    demo.set_defaults(run=_demo)
