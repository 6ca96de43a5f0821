"""``cbir search``: similar cases for a volume, an ROI, a segment, a slice, a phrase, an item or a batch of queries."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass

from ..errors import CBIRError
from .common import MAX_MARGIN_MM, MAX_RESULTS, number, state_note, whole_number

# retrieval.queries.MATCH_INTENTS (Testing/test_cli.py checks they agree): not imported here, the parser is built before
# the library loads (importing the query module costs most of a second on every command)
MATCH_CHOICES = ("auto", "finding", "anatomy")


def ras_point(text: str) -> list[float]:
    """'R,A,S' in mm, the form of --slice-ras."""
    from ..errors import ParameterError

    try:
        values = [float(v) for v in text.replace(" ", "").split(",")]
    except ValueError:
        raise ParameterError(f"--slice-ras '{text}' is not three numbers R,A,S") from None
    if len(values) != 3 or not all(map(math.isfinite, values)):
        raise ParameterError(f"--slice-ras '{text}' must be three finite numbers R,A,S (mm)")
    return values


def _read_batch(path: str) -> list[dict]:
    """The rows of a --batch CSV (volume[,roi_ras]), each with a volume; a bad file is one error naming it."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        raise CBIRError(f"{path}: batch CSV does not exist") from None
    except UnicodeDecodeError as error:
        raise CBIRError(f"{path}: batch CSV is not UTF-8 text (byte {error.start} cannot be decoded)") from None
    except csv.Error as error:
        raise CBIRError(f"{path}: batch CSV cannot be parsed ({error})") from None
    if rows and "volume" not in rows[0]:
        raise CBIRError(f"{path}: batch CSV needs a 'volume' column (and optionally 'roi_ras')")
    for line, row in enumerate(rows, start=2):
        if not (row.get("volume") or "").strip():
            raise CBIRError(f"{path}: row {line} has no volume (a short row?)")
    return rows


@dataclass
class _Opened:
    """What one 'cbir search' works on: its arguments, the index, its searcher and the metadata filters."""

    args: argparse.Namespace
    index: object
    searcher: object
    filters: dict


def _open(args: argparse.Namespace) -> _Opened:
    """The index and its searcher; a note (stderr) when the filters match no case."""
    from ..index.location import open_index
    from ..retrieval.queries import parse_filters
    from ..retrieval.search import Searcher

    index = open_index(args.index)
    state_note(index)
    searcher = Searcher(index, model=args.model, device=args.device)
    filters = parse_filters(args.filter)
    if filters and not index.catalog.case_rows_matching(filters):  # a field no case has raises there
        print(f"cbir: note: no case of the index matches the filters {filters}; the answer is empty", file=sys.stderr)
    return _Opened(args, index, searcher, filters)


def _search(args: argparse.Namespace) -> int:
    """cbir search: similar cases for a volume, an ROI, a slice, a phrase, an item, or a batch of queries."""
    opened = _open(args)
    if args.save and args.batch:
        raise CBIRError("--save keeps one search; it does not go with --batch")
    suggest = _suggester(args, opened.index)
    if args.from_answer and (args.volume or args.text or args.like is not None or args.batch):
        raise CBIRError("--from searches again for an earlier answer's query: give no other query with it")
    if args.batch:
        _batch(opened, suggest)
        return 0
    query, answer = _one_search(opened)
    answer = suggest(answer)
    if args.save:
        _save_search(args, opened.index, opened.searcher, query, answer, opened.filters)
    _print_answer(answer, args.json)
    return 0


def _volume_search(opened: _Opened, path: str, roi=None, segment=None) -> tuple:
    """(query, answer) for a query volume: a segment's box, an ROI, the slice through --slice-ras, or the whole volume."""
    from ..retrieval.queries import load_volume_for_query, roi_query, segment_query, slice_query, volume_query

    args, index, searcher = opened.args, opened.index, opened.searcher
    volume = load_volume_for_query(path)
    if segment is not None:
        query = segment_query(volume, segment, args.axis, index, args.margin_mm)
    elif roi is not None:
        query = roi_query(volume, roi, args.axis, index, args.margin_mm)
    elif args.slice_ras:
        query = slice_query(volume, args.axis, index, ras_point(args.slice_ras))
    else:
        query = volume_query(volume, args.axis, index)
    query.spec = dataclasses.replace(query.spec, match=args.match)
    answer = searcher.search(query, args.k, opened.filters, args.ranking, prior=not args.no_prior)
    return query, answer if args.no_place else searcher.place(query, answer)


def _batch(opened: _Opened, suggest) -> None:
    """--batch: one JSON line per CSV row; a row that fails answers with its error, and the others go on."""
    from ..imaging.roi import RoiBox

    for row in _read_batch(opened.args.batch):
        text = (row.get("roi_ras") or "").strip()
        try:
            line = suggest(_volume_search(opened, row["volume"], RoiBox.parse(text) if text else None)[1]).to_json()
        except CBIRError as error:
            line = {"query": {"volume": os.path.abspath(row["volume"]), "roi_ras": text or None}, "error": str(error)}
        print(json.dumps(line), flush=True)


def _one_search(opened: _Opened) -> tuple:
    """(query, answer) of the one query the arguments give: --from an answer, a phrase, an item, or a volume."""
    from ..imaging.roi import RoiBox, read_markups_roi, segment_of_label
    from ..retrieval.queries import item_query, text_query

    args, searcher = opened.args, opened.searcher
    if args.from_answer:
        return _feedback_search(args, searcher, opened.filters)
    if args.relevant or args.not_relevant:
        raise CBIRError("--relevant and --not-relevant mark results of an earlier answer: give it with --from ANSWER.json")
    if args.text:
        query = text_query(args.text)
    elif args.like is not None:
        query = item_query(opened.index, args.like)
    elif args.volume:
        roi = RoiBox.parse(args.roi_ras) if args.roi_ras else read_markups_roi(args.roi) if args.roi else None
        segment = segment_of_label(args.roi_mask, args.label) if args.roi_mask else None
        return _volume_search(opened, args.volume, roi, segment)
    else:
        raise CBIRError("give a query: --volume PATH [--roi-ras ... | --roi FILE], --text PHRASE, --like ITEM or --batch FILE.csv")
    return query, searcher.search(query, args.k, opened.filters, args.ranking)


def _print_answer(answer, as_json: bool) -> None:
    """The answer as JSON, or as lines: the query, the suggestion, one line per result."""
    from ..retrieval.suggestion import NoSuggestion

    if as_json:
        print(json.dumps(answer.to_json(), indent=1))
        return
    print(f"query: {json.dumps(answer.query.to_json())}  (ranking {answer.ranking})")
    if isinstance(answer.suggestion, NoSuggestion):
        print(f"no suggestion: {answer.suggestion.reason}")
    elif answer.suggestion is not None:
        print(answer.suggestion.line())
    if not answer.results:
        print("no results")
    for result in answer.results:
        print(result_line(result))
    if answer.note:
        print(f"note: {answer.note}")


SHOWN = {"anatomy": "same anatomy", "look-alike": "look-alike", None: "most alike"}


def result_line(result) -> str:
    """One result as a line: rank, score, name, case id, modality and body part, and what its match shows where."""
    best = result.best_match
    kind = f"{result.modality or '?'} {result.body_part or '?'}"
    where = f"{best.kind} on {best.axis} slice {best.slice_index} at RAS ({', '.join(f'{v:.1f}' for v in best.spot)})"
    if best.note:  # placed: why a look-alike stands in for the anatomy (not in this series' field of view; rejected)
        where += f" ({best.note})"
    return (f"{result.rank:>3}. {result.score:.3f}  {result.title:<24} {result.case_id}  {kind:<12} "
            f"{SHOWN.get(best.shown, best.shown)}: {where}  {result.source}")


def _save_search(args: argparse.Namespace, index, searcher, query, answer, filters: dict) -> None:
    """cbir search --save: keep the search (query file and its SHA-256, ROI, settings, index, answer) as JSON."""
    from ..retrieval import saved_search
    from ..retrieval.marks import Feedback

    settings = saved_search.SearchSettings(args.model or index.model_name(), searcher.embedder.fingerprint.digest(), args.k,
                                           args.axis, args.ranking, not args.no_prior and query.mode not in
                                           ("text", "item"), filters, not args.no_place and query.volume is not None,
                                           args.margin_mm)
    mask = (args.roi_mask, args.label) if args.roi_mask else None
    marks = answer.query.feedback or Feedback()  # a search made --from an answer keeps its marks
    path = saved_search.make(query, answer, index, settings, mask, marks, answer.to_json().get("suggestion")).save(args.save)
    print(f"cbir: saved the search to {path}", file=sys.stderr)


def _suggester(args: argparse.Namespace, index):
    """Adds the suggested finding to an answer; answers of an index without labels are left as they are."""
    if args.suggest == "none":
        return lambda answer: answer
    from ..retrieval.suggestion import Suggester

    suggester = Suggester(index, args.suggest)
    return suggester.attach


def _case_ids(text: str | None) -> list[str]:
    return [v.strip() for v in (text or "").split(",") if v.strip()]


def _feedback_search(args: argparse.Namespace, searcher, filters) -> tuple:
    """cbir search --from ANSWER.json [--relevant IDS] [--not-relevant IDS]: (the query, its new answer) using the marks."""
    from ..retrieval.feedback import feedback_from_answer, query_from_answer, search_again

    earlier = _earlier_answer(args.from_answer)
    marks = feedback_from_answer(earlier, _case_ids(args.relevant), _case_ids(args.not_relevant), args.from_answer)
    unknown = [c for c in marks.judged if searcher.index.catalog.case_by_id(c) is None]
    if unknown:  # an answer of another index, or cases removed since: their marks would stand for nothing here
        raise CBIRError(f"{args.from_answer}: marks case(s) {', '.join(unknown[:5])} that the index {searcher.index.folder} "
                        "does not hold (an answer of another index, or removed since)")
    query = query_from_answer(earlier, searcher, args.from_answer)
    answer = search_again(searcher, query, marks, args.k, filters, earlier.get("ranking", args.ranking), args.feedback,
                          prior=not args.no_prior)
    return query, answer if args.no_place else searcher.place(query, answer)


def _earlier_answer(path: str) -> dict:
    """The answer JSON of --from: a 'cbir search --json' answer, or a saved search's answer with its marks."""
    from ..json_input import read_json
    from ..retrieval import saved_search
    from ..retrieval.marks import Feedback

    data = read_json(path, "answer JSON")
    if isinstance(data, dict) and data.get("format") == saved_search.FORMAT:  # a --save file: checked as 'cbir rerun' does
        saved = saved_search.SavedSearch.load(path)
        earlier = saved.answer.to_json()
        marks = Feedback.from_json(earlier["query"].get("feedback"))
        for case_id, item in saved.feedback.relevant.items():
            marks.mark(case_id, item, True)
        for case_id, item in saved.feedback.not_relevant.items():
            marks.mark(case_id, item, False)
        earlier["query"]["feedback"] = marks.to_json()
        return earlier
    if not isinstance(data, dict) or not isinstance(data.get("query"), dict) or not isinstance(data.get("results"), list):
        raise CBIRError(f"{path}: not a JSON answer of 'cbir search --json' nor a saved search of 'cbir search --save' "
                        "(no query and results)")
    if not all(isinstance(r, dict) and isinstance(r.get("case_id"), str) for r in data["results"]):
        raise CBIRError(f"{path}: not a JSON answer of 'cbir search --json': a result without a case id")
    return data


def _feedback_arguments(search: argparse.ArgumentParser) -> None:
    """The suggestion and relevance-feedback options of 'cbir search'."""
    from ..retrieval.feedback import DEFAULT_STRATEGY, STRATEGIES

    search.add_argument("--suggest", metavar="COLUMN",
                        help="label column to suggest a finding from: 'label' (the --labels of index build), a metadata field, "
                             "or 'none' (default: 'label' or 'finding' when cases have one)")
    search.add_argument("--from", dest="from_answer", metavar="ANSWER.json",
                        help="search again for the query of an earlier JSON answer (--json) or saved search (--save), using "
                             "--relevant / --not-relevant marks")
    search.add_argument("--relevant", metavar="CASE_ID,...", help="with --from: results of that answer that are relevant")
    search.add_argument("--not-relevant", metavar="CASE_ID,...", help="with --from: results of that answer that are not")
    search.add_argument("--feedback", default=DEFAULT_STRATEGY, choices=STRATEGIES,
                        help=f"how marks change the search (default {DEFAULT_STRATEGY}; see docs/benchmarks.md)")


def register(commands) -> None:
    """The search command."""
    search = commands.add_parser("search", help="find the cases most similar to a volume, an ROI, a slice or a phrase")
    search.add_argument("--index", required=True, help="index folder, or milvus://HOST:PORT/COLLECTION, or a milvus-lite .db file")
    what = search.add_mutually_exclusive_group()
    what.add_argument("--volume", help="query volume (whole volume unless --roi-ras, --roi or --slice-ras)")
    what.add_argument("--text", help="a phrase (CLIP-family models), e.g. 'pleural effusion'")
    what.add_argument("--batch", help="CSV with columns volume[,roi_ras]; answers one JSON line per row")
    what.add_argument("--like", type=whole_number(1, 2**63 - 1), metavar="ITEM", help="more like this: an item id from a previous answer")
    area = search.add_mutually_exclusive_group()
    area.add_argument("--roi-ras", metavar="CX,CY,CZ,SX,SY,SZ", help="ROI centre and size in RAS mm")
    area.add_argument("--roi", metavar="FILE.mrk.json", help="a Slicer markups ROI file")
    area.add_argument("--roi-mask", metavar="LABELMAP",
                      help="a label map on the query's patient: query the segment --label (its box; its deepest point is placed)")
    search.add_argument("--label", type=whole_number(1, 2**31 - 1), default=1, help="the label of --roi-mask to query (default 1)")
    area.add_argument("--slice-ras", metavar="R,A,S", help="query the one slice through this RAS point")
    search.add_argument("-k", type=whole_number(1, MAX_RESULTS), default=10, help=f"number of cases, 1 to {MAX_RESULTS} (default 10)")
    search.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    search.add_argument("--filter", action="append", metavar="FIELD=VALUE", help="modality=CT, label=..., any catalog field")
    search.add_argument("--ranking", default="maxsim", choices=["maxsim", "votes", "pooled"], help="case ranking (default maxsim)")
    search.add_argument("--margin-mm", type=number(0, MAX_MARGIN_MM, " mm"), default=0.0,
                        help=f"margin around the ROI crops, 0 to {MAX_MARGIN_MM:g} mm (default 0)")
    search.add_argument("--no-prior", action="store_true",
                        help="rank by similarity alone; by default cases of the query's modality and body region come first")
    search.add_argument("--no-place", action="store_true",
                        help="keep each result's best-looking item as its match, without placing the query's anatomical place "
                             "in it (registration; reads each shown result's volume, about a second a result)")
    search.add_argument("--match", choices=MATCH_CHOICES, default="auto",
                        help="what a placed match shows: 'finding' the most similar finding (a lesion of the same kind "
                             "anywhere), 'anatomy' the same anatomical place, 'auto' (default) a box around a focal finding its "
                             "finding, any other box the anatomy; every placed match carries both")
    search.add_argument("--model", help="load the index's model from elsewhere, e.g. local-dir:PATH (fingerprints must match)")
    search.add_argument("--device", help="cuda, mps or cpu")
    search.add_argument("--json", action="store_true", help="answer as JSON")
    search.add_argument("--save", metavar="SEARCH.json", help="keep the search (query, ROI, settings, index, answer) to re-run "
                                                             "or export later")
    _feedback_arguments(search)
    search.set_defaults(run=_search)
