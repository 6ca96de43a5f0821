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
                    "blob_sizes_mm": "16,24,32"}
SLICING_FIELDS = {"axes": "axes", "stride_mm": "stride_mm", "tiles_mm": "tile_sizes_mm", "tile_overlap": "tile_overlap",
                  "blobs": "blobs_per_slice", "blob_sizes_mm": "blob_sizes_mm"}


def _settings_from(args: argparse.Namespace, defaults: dict):
    """IndexSettings from the slicing flags, taking ``defaults`` (flag name -> value) for those not given."""
    from .index.items import IndexSettings

    value = {name: getattr(args, name) if getattr(args, name) is not None else defaults[name] for name in SLICING_DEFAULTS}
    axes = value["axes"] if isinstance(value["axes"], list) else str(value["axes"]).split(",")
    sizes = {k: value[k] if isinstance(value[k], list) else _sizes_mm(value[k]) for k in ("tiles_mm", "blob_sizes_mm")}
    return IndexSettings(axes=axes, stride_mm=value["stride_mm"], tile_sizes_mm=sizes["tiles_mm"], tile_overlap=value["tile_overlap"],
                         blobs_per_slice=value["blobs"], blob_sizes_mm=sizes["blob_sizes_mm"])


def _refuse_other_slicing(args: argparse.Namespace, index) -> None:
    """'index add' with slicing flags: each must equal the index's pinned value (an index cuts every case alike)."""
    from .errors import IndexMismatchError

    pinned = index.settings.as_dict()
    given = {name: getattr(args, name) for name in SLICING_DEFAULTS if getattr(args, name) is not None}
    if not given:
        return
    asked = _settings_from(args, {name: pinned[SLICING_FIELDS[name]] for name in SLICING_DEFAULTS}).as_dict()
    differ = [f"--{name.replace('_', '-')} {getattr(args, name)} (the index has {pinned[SLICING_FIELDS[name]]})"
              for name in given if asked[SLICING_FIELDS[name]] != pinned[SLICING_FIELDS[name]]]
    if differ:
        raise IndexMismatchError(f"{index.folder}: slicing settings are pinned when an index is built; asked for " + ", ".join(differ)
                                 + ": leave the flags out, or build a new index with them")


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
                                   labels=_read_labels(args.labels))
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
    from .imaging.roi import RoiBox, read_markups_roi, roi_of_label
    from .index.folder import Index
    from .retrieval.answers import SearchAnswer
    from .retrieval.search import (
        Searcher,
        item_query,
        load_volume_for_query,
        parse_filters,
        roi_query,
        slice_query,
        text_query,
        volume_query,
    )

    index = Index.open(args.index)
    _state_note(index)
    searcher = Searcher(index, model=args.model, device=args.device)
    filters = parse_filters(args.filter)
    if filters and not index.catalog.case_rows_matching(filters):  # a field no case has raises there
        print(f"cbir: note: no case of the index matches the filters {filters}; the answer is empty", file=sys.stderr)

    def volume_search(path: str, roi: RoiBox | None) -> SearchAnswer:
        volume = load_volume_for_query(path)
        if roi is not None:
            query = roi_query(volume, roi, args.axis, index, args.margin_mm)
        elif args.slice_ras:
            query = slice_query(volume, args.axis, index, _ras_point(args.slice_ras))
        else:
            query = volume_query(volume, args.axis, index)
        answer = searcher.search(query, args.k, filters, args.ranking, prior=not args.no_prior)
        return answer if args.no_place else searcher.place(query, answer)

    if args.batch:
        rows = _read_batch(args.batch)
        for row in rows:
            text = (row.get("roi_ras") or "").strip()
            try:
                line = volume_search(row["volume"], RoiBox.parse(text) if text else None).to_json()
            except CBIRError as error:
                line = {"query": {"volume": os.path.abspath(row["volume"]), "roi_ras": text or None}, "error": str(error)}
            print(json.dumps(line), flush=True)
        return 0
    if args.text:
        answer = searcher.search(text_query(args.text, searcher.embedder), args.k, filters, args.ranking)
    elif args.like is not None:
        answer = searcher.search(item_query(index, args.like), args.k, filters, args.ranking)
    elif args.volume:
        roi = RoiBox.parse(args.roi_ras) if args.roi_ras else read_markups_roi(args.roi) if args.roi else None
        roi = roi_of_label(args.roi_mask, args.label) if args.roi_mask else roi
        answer = volume_search(args.volume, roi)
    else:
        raise CBIRError("give a query: --volume PATH [--roi-ras ... | --roi FILE], --text PHRASE, --like ITEM or --batch FILE.csv")
    if args.json:
        print(json.dumps(answer.to_json(), indent=1))
        return 0
    print(f"query: {json.dumps(answer.query)}  (ranking {answer.ranking})")
    if not answer.results:
        print("no results")
    for result in answer.results:
        best = result.best_match
        where = f"{best.axis} slice {best.slice_index} at RAS ({', '.join(f'{v:.1f}' for v in best.ras)})"
        print(f"{result.rank:>3}. {result.score:.3f}  {result.title:<28} {where}  {result.source}")
    return 0


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
        with index:  # indexes what is missing; already indexed, unchanged files are skipped
            report = index.add_sources(sorted({r.path for r in rows}), embedder, progress=_progress_printer("indexing"))
        if report.skipped:
            print(report.summary(), file=sys.stderr)
        evaluation = evaluate_volumes(rows, Searcher(Index.open(folder), embedder), ks, args.axis, args.ranking)
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
    index.add_argument("action", choices=["build", "add", "remove", "info", "verify", "refresh", "repair"])
    index.add_argument("sources", nargs="*", help="files and folders to index (build, add), or case ids / sources (remove)")
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
    area.add_argument("--roi-mask", metavar="LABELMAP", help="a label map on the query's patient: the box around --label")
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
    return parser


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
