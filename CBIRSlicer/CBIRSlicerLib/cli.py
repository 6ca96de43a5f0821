"""The ``cbir`` command line. Errors of our own hierarchy become one line on stderr and exit code 1."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

from .errors import CBIRError


def _slices(args: argparse.Namespace) -> int:
    """cbir slices: write what the model will see for a volume, as PNGs plus slices.json."""
    from .imaging.intensity import choose_window, to_uint8_rgb
    from .imaging.png import write_png
    from .imaging.readers import read_volume
    from .imaging.roi import RoiBox
    from .imaging.slicing import extract_slices, make_montage, parse_layout

    roi = RoiBox.parse(args.roi_ras) if args.roi_ras else None
    layout = parse_layout(args.montage) if args.montage else None
    volume = read_volume(args.volume, series_uid=args.series)
    window = choose_window(volume, args.window)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    crop = not args.no_crop
    entries = []
    if layout:
        montage = make_montage(volume, args.axis, layout, roi, crop, args.margin_mm)
        name = f"montage_{args.axis}_{layout[0]}x{layout[1]}.png"
        write_png(to_uint8_rgb(montage.pixels, window), out / name)
        entries.append({"file": name, **montage.describe()})
    else:
        images = extract_slices(volume, args.axis, roi, crop, args.margin_mm, args.stride_mm, args.stride)
        used = set()
        for image in images:
            name = f"{args.axis}_{image.slice_index:04d}.png"
            n = 1
            while name in used:  # oblique reslicing can put two planes on one rounded index
                name = f"{args.axis}_{image.slice_index:04d}_{n}.png"
                n += 1
            used.add(name)
            write_png(to_uint8_rgb(image.pixels, window), out / name)
            entries.append({"file": name, **image.describe()})
    for entry in entries:
        entry["window"] = window.as_dict()
    with open(out / "slices.json", "w") as handle:
        json.dump(entries, handle, indent=1)
    what = "montage" if layout else f"{args.axis} image{'s' if len(entries) != 1 else ''}"
    print(f"{volume.describe()}\nwrote {len(entries)} {what} (window {window.describe()}) and slices.json to {out}")
    return 0


def _synth(args: argparse.Namespace) -> int:
    """cbir synth: write a synthetic CT-like phantom with objects at known RAS positions."""
    from .imaging.synthetic import centered_matrix, default_blobs, render, write_volume

    shape = (args.size, args.size, max(8, args.size * 3 // 4))
    volume = render(centered_matrix(shape, (args.spacing,) * 3), shape, modality=None)
    write_volume(volume, args.path)
    print(f"wrote {volume.describe()} to {args.path}")
    for blob in default_blobs():
        print(f"  {blob.kind} of {blob.value:g} HU, radius {blob.radius:g} mm, centre RAS {list(blob.center)}")
    return 0


MODEL_HELP = (
    ("biomedclip", "BiomedCLIP ViT-B/16, 512-d, image + text (default; downloads once to the Hugging Face cache)"),
    ("openclip:ARCH:PRETRAINED", "any open_clip model, e.g. openclip:ViT-B-16:openai"),
    ("hf-hub:ORG/REPO", "an open_clip model on the Hugging Face hub"),
    ("local-dir:PATH", "an open_clip folder (open_clip_config.json + weights), for sites without internet"),
    ("dinov2[:small|base|large|giant]", "DINOv2 CLS token, image only"),
    ("rad-dino", "RAD-DINO (microsoft/rad-dino) CLS token, image only"),
    ("hf-vit:REPO_OR_PATH", "any transformers vision backbone, CLS token, image only"),
    ("handcrafted", "intensity, gradient and texture descriptor; no weights, always offline"),
    ("astra-ct", "3D CT encoder (Merlin's I3D ResNet-152, Astra_CTRG weights), 2048-d; ROI and volume queries; pip extra ct3d"),
    ("i3d:PATH", "3D CT encoder from any Merlin-architecture I3D ResNet-152 checkpoint file"),
)


def _models(args: argparse.Namespace) -> int:
    """cbir models list | info NAME: what can be used, and what a model is once loaded."""
    if args.action == "list":
        width = max(len(name) for name, _ in MODEL_HELP)
        for name, text in MODEL_HELP:
            print(f"{name:<{width}}  {text}")
        return 0
    from .models.registry import create_embedder

    embedder = create_embedder(args.name, device=args.device)
    info = embedder.describe()
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(f"{info['name']}: {info['dim']}-d on {info['device']}, text {'yes' if info['supports_text'] else 'no'}, "
              f"fingerprint {info['digest']}, weights sha256 {info['fingerprint']['weights_sha256'] or '-'}")
    return 0


def _progress_printer(what: str):
    """A progress callback drawing one updating line on a terminal, or a line per step otherwise."""
    import time

    began = time.monotonic()
    tty = sys.stderr.isatty()

    def show(done: int, total: int, label: str) -> None:
        elapsed = time.monotonic() - began
        rate = done / elapsed if elapsed > 0 and done else 0.0
        eta = f", {(total - done) / rate:.0f} s left" if rate > 0 and done < total else ""
        width = 24
        filled = int(width * done / total) if total else width
        line = f"{what} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{eta}  {os.path.basename(label)[:40]}"
        print(("\r" + line.ljust(100)) if tty else line, end="" if tty and done < total else "\n", file=sys.stderr, flush=True)

    return show


def _read_labels(path: str | None) -> dict[str, list[str]]:
    """path,label rows (several rows per path allowed) from a CSV file."""
    import csv

    if not path:
        return {}
    labels: dict[str, list[str]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if "path" not in row or "label" not in row:
                raise CBIRError(f"{path}: labels CSV needs the columns path,label")
            labels.setdefault(os.path.abspath(row["path"]), []).append(row["label"])
    return labels


def _sizes_mm(text: str | None) -> list[float]:
    """A comma-separated list of sizes in mm ('' or None: none)."""
    return [float(t) for t in text.split(",") if t] if text else []


# Slicing flags of 'index build' / 'add' with their defaults; 'add' takes the index's pinned values for those not given.
SLICING_DEFAULTS = {"axes": "axial", "stride_mm": 5.0, "tiles_mm": "32", "tile_overlap": 0.5, "blobs": 12,
                    "blob_sizes_mm": "16,24,32", "region_strategy": "auto"}
SLICING_FIELDS = {"axes": "axes", "stride_mm": "stride_mm", "tiles_mm": "tile_sizes_mm", "tile_overlap": "tile_overlap",
                  "blobs": "blobs_per_slice", "blob_sizes_mm": "blob_sizes_mm", "region_strategy": "region_strategy"}


def _settings_from(args: argparse.Namespace, defaults: dict):
    """IndexSettings from the slicing flags, taking ``defaults`` (flag name -> value) for those not given."""
    from .index.items import IndexSettings

    value = {name: getattr(args, name) if getattr(args, name) is not None else defaults[name] for name in SLICING_DEFAULTS}
    axes = value["axes"] if isinstance(value["axes"], list) else str(value["axes"]).split(",")
    sizes = {k: value[k] if isinstance(value[k], list) else _sizes_mm(value[k]) for k in ("tiles_mm", "blob_sizes_mm")}
    return IndexSettings(axes=axes, stride_mm=value["stride_mm"], tile_sizes_mm=sizes["tiles_mm"], tile_overlap=value["tile_overlap"],
                         blobs_per_slice=value["blobs"], blob_sizes_mm=sizes["blob_sizes_mm"],
                         region_strategy=value["region_strategy"])


def _refuse_other_slicing(args: argparse.Namespace, index) -> None:
    """'index add' with slicing flags: each must equal the index's pinned value (an index cuts every case alike)."""
    from .errors import IndexMismatchError

    pinned = index.settings.as_dict()
    given = {name: getattr(args, name) for name in SLICING_DEFAULTS if getattr(args, name) is not None}
    if not given:
        return
    asked = _settings_from(args, {name: pinned[SLICING_FIELDS[name]] for name in SLICING_DEFAULTS}).as_dict()
    differ = [f"--{name.replace('_', '-')} {getattr(args, name)} (the index has {pinned[SLICING_FIELDS[name]]})"
              for name in given if asked[SLICING_FIELDS[name]] != pinned[SLICING_FIELDS[name]]
              and not (name == "region_strategy" and asked[name] == "auto")]
    if differ:
        raise IndexMismatchError(f"{index.folder}: slicing settings are pinned when an index is built; asked for " + ", ".join(differ)
                                 + ": leave the flags out, or build a new index with them")


def _dicom_options(args: argparse.Namespace):
    """Which series of a DICOM database or PACS source to index, where downloads go, the credentials file, the timeout."""
    from .index.dicom_sources import DicomOptions
    from .index.dicomweb import SeriesFilter, parse_date_range

    low, high = parse_date_range(args.study_date)
    modalities = tuple(m.strip().upper() for m in (args.modality or "").split(",") if m.strip())
    if args.keep_downloads:
        os.makedirs(args.keep_downloads, exist_ok=True)
    return DicomOptions(SeriesFilter(modalities, low, high, args.body_part), args.keep_downloads, args.auth_file, args.timeout)


def _add_dicom_arguments(index: argparse.ArgumentParser) -> None:
    """'index build/add' flags for DICOM database (ctkdb:PATH) and DICOMweb (dicomweb:URL) sources."""
    dicom = index.add_argument_group("DICOM database and DICOMweb sources (ctkdb:PATH or Slicer's ctkDICOM.sql, dicomweb:URL)")
    dicom.add_argument("--modality", help="only series of these modalities, comma-separated (e.g. CT,MR)")
    dicom.add_argument("--study-date", metavar="FROM-TO",
                       help="only studies in this date range, YYYYMMDD-YYYYMMDD (an end may be left out)")
    dicom.add_argument("--body-part", help="only series with this Body Part Examined (e.g. CHEST)")
    dicom.add_argument("--keep-downloads", metavar="DIR", help="keep series fetched over DICOMweb here (default: removed once embedded)")
    dicom.add_argument("--auth-file", metavar="FILE",
                       help='DICOMweb credentials, JSON {"token": ...} or {"user": ..., "password": ...} (else the environment: '
                            "CBIR_DICOMWEB_TOKEN, or CBIR_DICOMWEB_USER and CBIR_DICOMWEB_PASSWORD)")
    dicom.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the DICOMweb server (default 30)")


def _index_build(args: argparse.Namespace) -> int:
    """cbir index build / add: create (or resume) an index and add sources to it."""
    from .index.folder import MANIFEST, Index
    from .models.registry import create_embedder

    exists = os.path.exists(os.path.join(args.index, MANIFEST))
    if args.action == "add" and not exists:
        raise CBIRError(f"{args.index}: no index there yet; create it with 'cbir index build'")
    if not args.sources:
        raise CBIRError(f"index {args.action}: name the files or folders to index")
    if exists:
        index = Index.open(args.index, writable=True)
        try:
            embedder = create_embedder(args.model or index.model_name(), device=args.device)
            if args.action == "build":  # resuming or extending a build: the slicing must be the same
                index.check_settings(_settings_from(args, SLICING_DEFAULTS))
            else:
                _refuse_other_slicing(args, index)
        except BaseException as error:
            index.__exit__(type(error), error, None)
            raise
    else:
        settings = _settings_from(args, SLICING_DEFAULTS)
        embedder = create_embedder(args.model or "biomedclip", device=args.device)
        index = Index.create(args.index, embedder, settings, args.index_type, keep_patient_ids=args.keep_patient_ids)
    with index:
        report = index.add_sources(args.sources, embedder, progress=_progress_printer("indexing"),
                                   labels=_read_labels(args.labels), dicom=_dicom_options(args))
    print(report.summary())
    info = Index.open(args.index).info()
    print(f"index {info['folder']}: {info['counts']['cases']} cases, {info['counts']['vectors']} vectors "
          f"({info['index_type']}), model {info['model']}")
    if not report.indexed:
        what = ", ".join(args.sources)
        reason = "every file was skipped" if report.skipped else "no volume files or DICOM series were found"
        raise CBIRError(f"{what}: nothing indexed ({reason})")
    return 0


def _state_note(index) -> None:
    """Tell the user (stderr) when an index is older, being written, or was interrupted."""
    note = index.state_note()
    if note:
        print(f"cbir: note: {index.folder}: {note}", file=sys.stderr)


def _index_other(args: argparse.Namespace) -> int:
    """cbir index remove / info / verify / refresh / repair."""
    from .index.folder import Index

    if args.action == "remove":
        with Index.open(args.index, writable=True) as index:
            removed = index.remove(args.sources)
        print(f"removed {len(removed)} case(s): {', '.join(removed)}")
        return 0
    if args.action == "refresh":
        from .models.registry import create_embedder

        with Index.open(args.index, writable=True) as index:
            report = index.refresh(create_embedder(args.model or index.model_name(), device=args.device),
                                   _progress_printer("refreshing"))
        print(report.summary())
        return 0
    if args.action == "repair":
        from .index.folder import repair
        from .models.registry import create_embedder

        report = repair(args.index, lambda name: create_embedder(args.model or name, device=args.device), args.drop_missing,
                        _progress_printer("re-embedding"))
        print(report.summary())
        return 0
    index = Index.open(args.index, strict=args.action != "verify")
    _state_note(index)
    if args.action == "suggest-labels":
        return _suggest_labels(args, index)
    if args.action == "info":
        info = index.info()
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            counts = info["counts"]
            per_case = f", {info['bytes_per_case'] / 2**10:.0f} KiB per case" if info["bytes_per_case"] else ""
            print(f"index {info['folder']}")
            print(f"  model {info['model']} ({info['dim']}-d, fingerprint {info['model_digest']})")
            print(f"  {counts['cases']} cases, {counts['items']} items, {counts['vectors']} vectors ({info['index_type']}), "
                  f"{counts['tombstones']} tombstones")
            print(f"  {info['bytes'] / 2**20:.1f} MiB on disk{per_case}")
            print(f"  settings {json.dumps(info['settings'])}")
            print(f"  created {info['created']}, updated {info['updated']}")
        return 0
    problems = index.verify(check_sources=not args.no_sources)
    for problem in problems:
        print(f"problem: {problem}")
    print("index is consistent" if not problems else f"{len(problems)} problem(s) found")
    return 0 if not problems else 1


def _suggest_labels(args: argparse.Namespace, index) -> int:
    """cbir index suggest-labels: unlabelled cases whose label would help the suggestions most (active learning)."""
    from .retrieval.suggestion import labels_to_ask_for

    if args.count < 1:
        raise CBIRError(f"--count must be 1 or more; got {args.count}")
    wanted = labels_to_ask_for(index, args.column, args.count)
    if args.json:
        print(json.dumps(wanted, indent=1))
        return 0
    if not wanted:
        print("every case is labelled")
    for n, entry in enumerate(wanted, start=1):
        vote = ", ".join(f"{k} {v:.2f}" for k, v in entry["current_vote"].items()) or "no labelled neighbour"
        print(f"{n:>3}. {entry['case_id']}  uncertainty {entry['uncertainty']:.2f}, distance {entry['distance']:.3f}  ({vote})")
    return 0


def _ras_point(text: str) -> list[float]:
    """'R,A,S' in mm, the form of --slice-ras."""
    from .errors import ParameterError

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
    for number, row in enumerate(rows, start=2):
        if not (row.get("volume") or "").strip():
            raise CBIRError(f"{path}: row {number} has no volume (a short row?)")
    return rows


def _search(args: argparse.Namespace) -> int:
    """cbir search: similar cases for a volume, an ROI, a slice, a phrase, an item, or a batch of queries."""
    from .imaging.roi import RoiBox, read_markups_roi, segment_of_label
    from .index.folder import Index
    from .retrieval.answers import SearchAnswer
    from .retrieval.queries import (
        item_query,
        load_volume_for_query,
        parse_filters,
        roi_query,
        segment_query,
        slice_query,
        text_query,
        volume_query,
    )
    from .retrieval.search import Searcher

    index = Index.open(args.index)
    _state_note(index)
    searcher = Searcher(index, model=args.model, device=args.device)
    filters = parse_filters(args.filter)
    if filters and not index.catalog.case_rows_matching(filters):  # a field no case has raises there
        print(f"cbir: note: no case of the index matches the filters {filters}; the answer is empty", file=sys.stderr)

    made = {}  # the last query, for --save

    def volume_search(path: str, roi: RoiBox | None, segment=None) -> SearchAnswer:
        volume = load_volume_for_query(path)
        if segment is not None:
            query = segment_query(volume, segment, args.axis, index, args.margin_mm)
        elif roi is not None:
            query = roi_query(volume, roi, args.axis, index, args.margin_mm)
        elif args.slice_ras:
            query = slice_query(volume, args.axis, index, _ras_point(args.slice_ras))
        else:
            query = volume_query(volume, args.axis, index)
        made["query"] = query
        answer = searcher.search(query, args.k, filters, args.ranking, prior=not args.no_prior)
        return answer if args.no_place else searcher.place(query, answer)

    if args.save and args.batch:
        raise CBIRError("--save keeps one search; it does not go with --batch")
    suggest = _suggester(args, index)
    if args.from_answer and (args.volume or args.text or args.like is not None or args.batch):
        raise CBIRError("--from searches again for an earlier answer's query: give no other query with it")
    if args.batch:
        rows = _read_batch(args.batch)
        for row in rows:
            text = (row.get("roi_ras") or "").strip()
            try:
                line = suggest(volume_search(row["volume"], RoiBox.parse(text) if text else None)).to_json()
            except CBIRError as error:
                line = {"query": {"volume": os.path.abspath(row["volume"]), "roi_ras": text or None}, "error": str(error)}
            print(json.dumps(line), flush=True)
        return 0
    if args.from_answer:
        made["query"], answer = _feedback_search(args, searcher, filters)
    elif args.relevant or args.not_relevant:
        raise CBIRError("--relevant and --not-relevant mark results of an earlier answer: give it with --from ANSWER.json")
    elif args.text:
        made["query"] = text_query(args.text, searcher.embedder)
        answer = searcher.search(made["query"], args.k, filters, args.ranking)
    elif args.like is not None:
        made["query"] = item_query(index, args.like)
        answer = searcher.search(made["query"], args.k, filters, args.ranking)
    elif args.volume:
        roi = RoiBox.parse(args.roi_ras) if args.roi_ras else read_markups_roi(args.roi) if args.roi else None
        segment = segment_of_label(args.roi_mask, args.label) if args.roi_mask else None
        answer = volume_search(args.volume, roi, segment)
    else:
        raise CBIRError("give a query: --volume PATH [--roi-ras ... | --roi FILE], --text PHRASE, --like ITEM or --batch FILE.csv")
    answer = suggest(answer)
    if args.save:
        _save_search(args, index, searcher, made["query"], answer, filters)
    if args.json:
        print(json.dumps(answer.to_json(), indent=1))
        return 0
    print(f"query: {json.dumps(answer.query)}  (ranking {answer.ranking})")
    if answer.suggestion is not None:
        print(answer.suggestion.line() if hasattr(answer.suggestion, "line") else f"no suggestion: {answer.suggestion['reason']}")
    if not answer.results:
        print("no results")
    for result in answer.results:
        best = result.best_match
        where = f"{best.axis} slice {best.slice_index} at RAS ({', '.join(f'{v:.1f}' for v in best.ras)})"
        print(f"{result.rank:>3}. {result.score:.3f}  {result.title:<28} {where}  {result.source}")
    return 0


# ----- results a user keeps: saved searches, re-runs, exports, labels ------------------------------------------------
def _save_search(args: argparse.Namespace, index, searcher, query, answer, filters: dict) -> None:
    """cbir search --save: keep the search (query file and its SHA-256, ROI, settings, index, answer) as JSON."""
    from .retrieval import saved_search
    from .retrieval.feedback import Feedback

    settings = saved_search.SearchSettings(args.model or index.model_name(), searcher.embedder.fingerprint.digest(), args.k,
                                           args.axis, args.ranking, not args.no_prior and query.description.get("mode") not in
                                           ("text", "item"), filters, not args.no_place and query.volume is not None,
                                           args.margin_mm)
    mask = (args.roi_mask, args.label) if args.roi_mask else None
    marks = Feedback.from_json(answer.query.get("feedback"))  # a search made --from an answer keeps its marks
    path = saved_search.make(query, answer, index, settings, mask, marks, answer.to_json().get("suggestion")).save(args.save)
    print(f"cbir: saved the search to {path}", file=sys.stderr)


def _rerun(args: argparse.Namespace) -> int:
    """cbir rerun: run a saved search again on its index (or a newer one) and say which cases came and went."""
    from .retrieval import saved_search

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
    from .index import labels
    from .retrieval import saved_search

    if not args.csv and not args.scene:
        raise CBIRError("cbir export: give --csv OUT.csv and / or --scene OUT.mrb (or .mrml)")
    saved = saved_search.SavedSearch.load(args.search)
    if args.csv:
        side = args.local_labels or os.path.join(os.path.dirname(os.path.abspath(args.search)), labels.SIDE_FILE)
        merged = labels.labels_of(saved.index.path, [r.case_id for r in saved.answer.results], side)
        print(f"wrote {saved_search.write_csv(saved.answer, args.csv, merged)} ({len(saved.answer.results)} results)")
    if args.scene:
        try:
            from .scene.saved_searches import export_scene
        except ImportError as error:  # outside Slicer the MRML classes come from the slicer-core package
            raise CBIRError(f"{args.scene}: writing a Slicer scene needs MRML (pip install slicer-core, or run in Slicer): "
                            f"{error}") from None
        out = export_scene(saved, args.scene)
        print(f"wrote {out.path}: {len(out.volumes)} volumes, {len(out.rois)} ROIs")
        for case_id, why in out.skipped:
            print(f"  left out {case_id}: {why}", file=sys.stderr)
    return 0


def _label(args: argparse.Namespace) -> int:
    """cbir label: give a case a label (in the index, or in the side file of a read-only index), or list its labels."""
    from .index import labels

    side = args.local_labels or labels.SIDE_FILE
    if args.assignment:
        column, value = labels.parse_assignment(args.assignment)
        written = labels.set_label(args.index, args.case_id, column, value, args.by, side)
        where = ("the index" if written.where == "index" else
                 f"{written.path} (the index cannot be written: {written.reason})")
        print(f"{args.case_id}: {column}={value} written to {where} at {written.entry.at}"
              + (f" by {written.entry.by}" if written.entry.by else ""))
        return 0
    from .index.folder import Index

    index = Index.open(args.index)
    try:
        if index.catalog.case_by_id(args.case_id) is None:
            raise CBIRError(f"{args.case_id}: is not a case of the index {index.folder}")
    finally:
        index.close()
    for column, value in sorted(labels.labels_of(args.index, [args.case_id], side)[args.case_id].items()):
        print(f"{column}={value}")
    return 0


def _keep_parsers(commands) -> None:
    """The subcommands of results a user keeps: rerun, export, label."""
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
    label.add_argument("--index", required=True, help="index folder")
    label.add_argument("--by", help="who gives the label (recorded only if given)")
    label.add_argument("--local-labels", metavar="FILE", help="side file for a read-only index (default ./labels.local.csv)")
    label.set_defaults(run=_label)


def _suggester(args: argparse.Namespace, index):
    """Adds the suggested finding to an answer (issue 19); answers of an index without labels are left as they are."""
    if args.suggest == "none":
        return lambda answer: answer
    from .retrieval.suggestion import Suggester

    suggester = Suggester(index, args.suggest)
    return suggester.attach


def _case_ids(text: str | None) -> list[str]:
    return [v.strip() for v in (text or "").split(",") if v.strip()]


def _feedback_search(args: argparse.Namespace, searcher, filters) -> tuple:
    """cbir search --from ANSWER.json [--relevant IDS] [--not-relevant IDS]: (the query, its new answer) using the marks."""
    from .retrieval.feedback import feedback_from_answer, query_from_answer, search_again

    try:
        with open(args.from_answer, encoding="utf-8") as handle:
            earlier = json.load(handle)
    except FileNotFoundError:
        raise CBIRError(f"{args.from_answer}: answer JSON does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CBIRError(f"{args.from_answer}: not a JSON answer of 'cbir search --json' ({error})") from None
    if not isinstance(earlier, dict) or "query" not in earlier or "results" not in earlier:
        raise CBIRError(f"{args.from_answer}: not a JSON answer of 'cbir search --json' (no query and results)")
    marks = feedback_from_answer(earlier, _case_ids(args.relevant), _case_ids(args.not_relevant), args.from_answer)
    query = query_from_answer(earlier, searcher, args.from_answer)
    answer = search_again(searcher, query, marks, args.k, filters, earlier.get("ranking", args.ranking), args.feedback,
                          prior=not args.no_prior)
    return query, answer if args.no_place else searcher.place(query, answer)


def _parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise CBIRError(f"-k must be comma-separated whole numbers, like 1,3,5,10; got '{text}'") from None
    if not ks or ks[0] < 1:
        raise CBIRError(f"-k values must be 1 or more; got '{text}'")
    return ks


def _evaluate(args: argparse.Namespace) -> int:
    """cbir evaluate: retrieval metrics on labelled volumes (CSV) or a folder per class of 2D images."""
    from .index.folder import MANIFEST, Index
    from .index.items import IndexSettings
    from .models.registry import create_embedder
    from .plots import precision_curve_png
    from .retrieval.evaluation import evaluate_images, evaluate_volumes, format_summary, read_labelled_csv
    from .retrieval.search import Searcher

    ks = _parse_ks(args.k)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if os.path.isdir(args.input):
        embedder = create_embedder(args.model or "biomedclip", device=args.device)
        evaluation = evaluate_images(args.input, embedder, ks)
    elif os.path.isfile(args.input):
        rows = read_labelled_csv(args.input)
        folder = args.index or str(out / "index")
        if os.path.exists(os.path.join(folder, MANIFEST)):
            index = Index.open(folder, writable=True)
            embedder = create_embedder(args.model or index.model_name(), device=args.device)
        else:
            embedder = create_embedder(args.model or "biomedclip", device=args.device)
            index = Index.create(folder, embedder, IndexSettings(axes=[args.axis]))
        labels: dict[str, list[str]] = {}
        for row in rows:  # the cases carry the CSV's labels, for suggestions on later searches of this index
            mine = labels.setdefault(os.path.abspath(row.path), [])
            if row.label not in mine:
                mine.append(row.label)
        with index:  # indexes what is missing; already indexed, unchanged files are skipped
            report = index.add_sources(sorted({r.path for r in rows}), embedder, progress=_progress_printer("indexing"),
                                       labels=labels)
        if report.skipped:
            print(report.summary(), file=sys.stderr)
        evaluation = evaluate_volumes(rows, Searcher(Index.open(folder), embedder), ks, args.axis, args.ranking)
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
    from .index.folder import Index
    from .retrieval.suggestion import Calibration, pin_calibration

    if knn and knn.get("answered"):
        with Index.open(folder, writable=True) as index:
            pin_calibration(index, "label", Calibration(**knn["calibration"]))


def _demo(args: argparse.Namespace) -> int:
    """cbir demo: synthetic cohort, index, ROI queries, evaluation and an HTML report."""
    from .demo import DEMO_KS, run_demo
    from .retrieval.evaluation import format_summary

    summary = run_demo(args.out, args.model, args.cases, args.seed, args.device, progress=_progress_printer("indexing"),
                       log=lambda line: print(line, flush=True))
    print(format_summary(summary, DEMO_KS))
    print(f"done in {summary['seconds']} s; open {summary['report']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every ``cbir`` command."""
    parser = argparse.ArgumentParser(prog="cbir", description="Content-based image retrieval for radiology volumes.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    slices = commands.add_parser("slices", help="write the 2D images the model sees for a volume (PNG + slices.json)")
    slices.add_argument("volume", help="volume file (NIfTI, NRRD, MHA/MHD, DICOM) or a DICOM folder")
    slices.add_argument("--out", required=True, help="output folder")
    slices.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    slices.add_argument("--roi-ras", metavar="CX,CY,CZ,SX,SY,SZ",
                        help="ROI centre and size in RAS mm, as Slicer shows them")
    stride = slices.add_mutually_exclusive_group()
    stride.add_argument("--stride-mm", type=float, help="distance between slices in mm")
    stride.add_argument("--stride", type=int, help="distance between slices in slices")
    slices.add_argument("--window", default="auto",
                        help="auto, percentile, soft-tissue, lung, bone, brain, or W,L (default auto)")
    slices.add_argument("--montage", metavar="RxC", help="tile R x C evenly spaced slices into one image")
    slices.add_argument("--no-crop", action="store_true", help="with an ROI, keep whole slices instead of cropping to it")
    slices.add_argument("--margin-mm", type=float, default=0.0, help="margin around the ROI crop (mm)")
    slices.add_argument("--series", help="DICOM series UID, when a folder holds several")
    slices.set_defaults(run=_slices)

    synth = commands.add_parser("synth", help="write a synthetic CT-like phantom volume to try things on")
    synth.add_argument("path", help="output file (.nii.gz, .nrrd, .mha)")
    synth.add_argument("--size", type=int, default=96, help="voxels along R and A (default 96)")
    synth.add_argument("--spacing", type=float, default=1.0, help="voxel size in mm (default 1)")
    synth.set_defaults(run=_synth)

    index = commands.add_parser("index", help="build, extend, check an index of volumes")
    index.add_argument("action", choices=["build", "add", "remove", "info", "verify", "refresh", "repair", "suggest-labels"])
    index.add_argument("sources", nargs="*", help="files and folders to index (build, add), a DICOM database (ctkdb:PATH or "
                       "Slicer's ctkDICOM.sql) or a PACS (dicomweb:URL), or case ids / sources (remove)")
    index.add_argument("--index", required=True, help="index folder")
    index.add_argument("--model", help="embedding model (build: default biomedclip; later: the index's own)")
    # Slicing flags have no argparse default: 'add' must tell a flag given from one left out (SLICING_DEFAULTS).
    index.add_argument("--axes", help="comma-separated axes to index (default axial)")
    index.add_argument("--stride-mm", type=float, help="distance between indexed slices (default 5 mm)")
    index.add_argument("--tiles-mm", help="tile sizes in mm for region queries, comma-separated; '' for none (default 32)")
    index.add_argument("--tile-overlap", type=float,
                       help="overlap of neighbouring tiles, 0 to <1 (default 0.5; 0.75 places matches better, 4x the items)")
    index.add_argument("--blobs", type=int,
                       help="per slice, how many blob-like places (lesion candidates) get crops centred on them (default 12; 0 for none)")
    index.add_argument("--blob-sizes-mm", help="sizes in mm of the crops around each blob, comma-separated (default 16,24,32)")
    index.add_argument("--region-strategy", choices=("auto", "crops", "dense"),
                       help="item vectors: each crop embedded ('crops'), or pooled from one pass per slice ('dense'); "
                            "default auto: dense for ViTs, crops for handcrafted (docs/design.md)")
    index.add_argument("--keep-patient-ids", action="store_true",
                       help="build: keep patient IDs from DICOM headers in the catalog (default: only a keyed hash of them)")
    index.add_argument("--drop-missing", action="store_true",
                       help="repair: leave out cases whose sources are gone or unreadable (default: refuse and list them)")
    index.add_argument("--index-type", default="auto", choices=["auto", "flat", "hnsw", "ivfpq"],
                       help="FAISS structure (default auto: flat, HNSW, then compressed IVF-PQ by size)")
    index.add_argument("--labels", help="CSV with path,label rows: labels of the cases, for filters and evaluation")
    index.add_argument("--device", help="cuda, mps or cpu (default: the best available)")
    index.add_argument("--json", action="store_true", help="info as JSON")
    index.add_argument("--no-sources", action="store_true", help="verify: skip checksumming the source files")
    _add_dicom_arguments(index)
    index.add_argument("--column", help="suggest-labels: the label column (default 'label' or 'finding')")
    index.add_argument("--count", type=int, default=10, help="suggest-labels: how many cases to list (default 10)")
    index.set_defaults(run=lambda a: _index_build(a) if a.action in ("build", "add") else _index_other(a))

    search = commands.add_parser("search", help="find the cases most similar to a volume, an ROI, a slice or a phrase")
    search.add_argument("--index", required=True, help="index folder")
    what = search.add_mutually_exclusive_group()
    what.add_argument("--volume", help="query volume (whole volume unless --roi-ras, --roi or --slice-ras)")
    what.add_argument("--text", help="a phrase (CLIP-family models), e.g. 'pleural effusion'")
    what.add_argument("--batch", help="CSV with columns volume[,roi_ras]; answers one JSON line per row")
    what.add_argument("--like", type=int, metavar="ITEM", help="more like this: an item id from a previous answer")
    area = search.add_mutually_exclusive_group()
    area.add_argument("--roi-ras", metavar="CX,CY,CZ,SX,SY,SZ", help="ROI centre and size in RAS mm")
    area.add_argument("--roi", metavar="FILE.mrk.json", help="a Slicer markups ROI file")
    area.add_argument("--roi-mask", metavar="LABELMAP",
                      help="a label map on the query's patient: query the segment --label (its box; its deepest point is placed)")
    search.add_argument("--label", type=int, default=1, help="the label of --roi-mask to query (default 1)")
    area.add_argument("--slice-ras", metavar="R,A,S", help="query the one slice through this RAS point")
    search.add_argument("-k", type=int, default=10, help="number of cases (default 10)")
    search.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    search.add_argument("--filter", action="append", metavar="FIELD=VALUE", help="modality=CT, label=..., any catalog field")
    search.add_argument("--ranking", default="maxsim", choices=["maxsim", "votes", "pooled"], help="case ranking (default maxsim)")
    search.add_argument("--margin-mm", type=float, default=0.0, help="margin around the ROI crops")
    search.add_argument("--no-prior", action="store_true",
                        help="rank by similarity alone; by default cases of the query's modality and body region come first")
    search.add_argument("--no-place", action="store_true",
                        help="keep each result's best-looking item as its match, without placing the query's anatomical place "
                             "in it (registration; reads each shown result's volume, about a second a result)")
    search.add_argument("--model", help="load the index's model from elsewhere, e.g. local-dir:PATH (fingerprints must match)")
    search.add_argument("--device", help="cuda, mps or cpu")
    search.add_argument("--json", action="store_true", help="answer as JSON")
    search.add_argument("--save", metavar="SEARCH.json", help="keep the search (query, ROI, settings, index, answer) to re-run "
                                                             "or export later")
    _feedback_arguments(search)
    search.set_defaults(run=_search)

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
    demo.add_argument("--cases", type=int, default=12, help="cases in the cohort (default 12)")
    demo.add_argument("--seed", type=int, default=0, help="cohort seed (default 0)")
    demo.add_argument("--device", help="cuda, mps or cpu")
    demo.set_defaults(run=_demo)

    models = commands.add_parser("models", help="list the embedding models, or load one and show its fingerprint")
    models.add_argument("action", choices=["list", "info"])
    models.add_argument("name", nargs="?", default="biomedclip", help="model name for 'info' (default biomedclip)")
    models.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    models.add_argument("--json", action="store_true", help="print the description as JSON")
    models.set_defaults(run=_models)
    _keep_parsers(commands)
    return parser


def _feedback_arguments(search: argparse.ArgumentParser) -> None:
    """The suggestion and relevance-feedback options of 'cbir search' (issue 19)."""
    from .retrieval.feedback import DEFAULT_STRATEGY, STRATEGIES

    search.add_argument("--suggest", metavar="COLUMN",
                        help="label column to suggest a finding from: 'label' (the --labels of index build), a metadata field, "
                             "or 'none' (default: 'label' or 'finding' when cases have one)")
    search.add_argument("--from", dest="from_answer", metavar="ANSWER.json",
                        help="search again for the query of an earlier JSON answer, using --relevant / --not-relevant marks")
    search.add_argument("--relevant", metavar="CASE_ID,...", help="with --from: results of that answer that are relevant")
    search.add_argument("--not-relevant", metavar="CASE_ID,...", help="with --from: results of that answer that are not")
    search.add_argument("--feedback", default=DEFAULT_STRATEGY, choices=STRATEGIES,
                        help=f"how marks change the search (default {DEFAULT_STRATEGY}; see docs/benchmarks.md)")


# Options whose value is a list of numbers that may start with a minus sign ('--roi-ras -9,-7,34,30,30,30').
NUMBER_LIST_OPTIONS = ("--roi-ras", "--slice-ras")
_NEGATIVE_LIST = re.compile(r"^-\s*(\d|\.\d|nan|inf)", re.IGNORECASE)


def _join_negative_values(argv: list[str]) -> list[str]:
    """'--roi-ras -9,...' as '--roi-ras=-9,...': argparse would take a value starting with '-' for an option."""
    joined, n = [], 0
    while n < len(argv):
        if argv[n] in NUMBER_LIST_OPTIONS and n + 1 < len(argv) and _NEGATIVE_LIST.match(argv[n + 1]):
            joined.append(f"{argv[n]}={argv[n + 1]}")
            n += 2
        else:
            joined.append(argv[n])
            n += 1
    return joined


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``cbir`` console script."""
    import sqlite3

    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    try:
        return args.run(args)
    except CBIRError as error:
        print(f"cbir: error: {error}", file=sys.stderr)
        return 1
    except sqlite3.DatabaseError as error:  # a catalog damaged past what opening it checks
        where = f"{os.path.join(os.path.abspath(args.index), 'catalog.sqlite')}: " if getattr(args, "index", None) else ""
        print(f"cbir: error: {where}cannot be read ({error}); the index is damaged: see 'cbir index verify', "
              "then 'cbir index repair'", file=sys.stderr)
        return 1
    except OSError as error:  # disk full, permission denied: the user can act on these
        where = f"{error.filename}: " if getattr(error, "filename", None) else ""
        print(f"cbir: error: {where}{error.strerror or error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
