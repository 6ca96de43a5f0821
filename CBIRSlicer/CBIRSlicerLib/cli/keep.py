"""``cbir rerun``, ``cbir export`` and ``cbir label``: what a user keeps of searches, and labels given after indexing."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import CBIRError


def _rerun(args: argparse.Namespace) -> int:
    """cbir rerun: run a saved search again on its index (or a newer one) and say which cases came and went."""
    from ..retrieval import saved_search

    saved = saved_search.SavedSearch.load(args.search)
    run = saved_search.rerun(saved, args.index, device=args.device)
    if args.update:
        saved_search.with_answer(saved, run).save(args.search)
    if args.json:
        print(json.dumps({"changes": run.changes.to_json(), "answer": run.answer.to_json()}, indent=1))
        return 0
    print(run.changes.summary())
    titles = {r.case_id: r.title for r in (*saved.answer.results, *run.answer.results)}
    for case_id in run.changes.new:
        print(f"  new      {titles[case_id]} ({case_id})")
    for case_id in run.changes.dropped:
        print(f"  dropped  {titles[case_id]} ({case_id})")
    for case_id, was, now in run.changes.moved:
        print(f"  moved    {titles[case_id]} ({case_id}): rank {was} -> {now}")
    if args.update:
        print(f"updated {os.path.abspath(args.search)} with the new answer")
    return 0


def _export(args: argparse.Namespace) -> int:
    """cbir export: a saved search's results as CSV and / or as a Slicer scene (.mrb or .mrml)."""
    from ..index import labels
    from ..retrieval import saved_search

    if not args.csv and not args.scene:
        raise CBIRError("cbir export: give --csv OUT.csv and / or --scene OUT.mrb (or .mrml)")
    saved = saved_search.SavedSearch.load(args.search)
    if args.csv:
        side = args.local_labels or os.path.join(os.path.dirname(os.path.abspath(args.search)), labels.SIDE_FILE)
        merged = labels.labels_of(saved.index.path, [r.case_id for r in saved.answer.results], side)
        print(f"wrote {saved_search.write_csv(saved.answer, args.csv, merged)} ({len(saved.answer.results)} results)")
    if args.scene:
        try:
            from ..scene.keep_results import export_scene
        except ImportError as error:  # outside Slicer the MRML classes come from the slicer-core package
            raise CBIRError(f"{args.scene}: writing a Slicer scene needs MRML (pip install slicer-core, or run in Slicer): "
                            f"{error}") from None
        out = export_scene(saved, args.scene)
        print(f"wrote {out.path}: {len(out.volumes)} volumes, {len(out.rois)} ROIs")
        if out.skipped:  # one line: the first reason in full, the other cases by id
            (first, why), others = out.skipped[0], [case_id for case_id, _ in out.skipped[1:]]
            more = f"; also {', '.join(others[:5])}{' and more' if len(others) > 5 else ''}" if others else ""
            print(f"cbir: note: left out {len(out.skipped)} of {len(saved.answer.results)} results whose volume could not be "
                  f"read: {first} ({why}){more}", file=sys.stderr)
    return 0


def _label(args: argparse.Namespace) -> int:
    """cbir label: give a case a label (in the index, or in the side file of a read-only index), or list its labels."""
    from ..index import labels

    side = args.local_labels or labels.SIDE_FILE
    if args.assignment:
        column, value = labels.parse_assignment(args.assignment)
        written = labels.set_label(args.index, args.case_id, column, value, args.by, side)
        where = ("the index" if written.where == "index" else
                 f"{written.path} (the index cannot be written: {written.reason})")
        print(f"{args.case_id}: {column}={value} written to {where} at {written.entry.at}"
              + (f" by {written.entry.by}" if written.entry.by else ""))
        return 0
    from ..index.location import open_index

    index = open_index(args.index)
    try:
        if index.catalog.case_by_id(args.case_id) is None:
            raise CBIRError(f"{args.case_id}: is not a case of the index {index.folder}")
    finally:
        index.close()
    for column, value in sorted(labels.labels_of(args.index, [args.case_id], side)[args.case_id].items()):
        print(f"{column}={value}")
    return 0


def register(commands) -> None:
    """The rerun, export and label commands."""
    rerun = commands.add_parser("rerun", help="run a saved search (cbir search --save) again and show which cases came and went")
    rerun.add_argument("search", help="a saved search (JSON)")
    rerun.add_argument("--index", help="another index folder to run it on (default: the one it was saved with)")
    rerun.add_argument("--update", action="store_true", help="write the new answer into the saved search (feedback kept)")
    rerun.add_argument("--device", help="cuda, mps or cpu")
    rerun.add_argument("--json", action="store_true", help="the changes and the new answer as JSON")
    rerun.set_defaults(run=_rerun)

    export = commands.add_parser("export", help="a saved search's results as CSV and / or a Slicer scene (.mrb, .mrml)")
    export.add_argument("search", help="a saved search (JSON)")
    export.add_argument("--csv", metavar="OUT.csv", help="one row per result: rank, case, score, body part, modality, match RAS, "
                                                        "path, labels")
    export.add_argument("--scene", metavar="OUT.mrb", help="query and results as volume nodes, the ROI and match boxes as "
                                                          "markups ROIs (.mrb bundles copies of the data; .mrml refers to the files)")
    export.add_argument("--local-labels", metavar="FILE", help="label side file to merge (default: labels.local.csv next to the "
                                                              "saved search)")
    export.set_defaults(run=_export)

    label = commands.add_parser("label", help="give an indexed case a label (COLUMN=VALUE), or list its labels")
    label.add_argument("case_id", help="the case id (from a search answer)")
    label.add_argument("assignment", nargs="?", metavar="COLUMN=VALUE", help="e.g. diagnosis=adenocarcinoma; an empty value "
                                                                            "takes the label away; none: list the case's labels")
    label.add_argument("--index", required=True, help="index folder, or milvus://HOST:PORT/COLLECTION, or a milvus-lite .db file")
    label.add_argument("--by", help="who gives the label (recorded only if given)")
    label.add_argument("--local-labels", metavar="FILE", help="side file for a read-only index (default ./labels.local.csv)")
    label.set_defaults(run=_label)
