"""``cbir index``: build, add, remove, info, verify, refresh, repair and suggest-labels on an index folder."""

from __future__ import annotations

import argparse
import contextlib
import json
import os

from ..errors import CBIRError
from ..index import keyed_seal
from .common import number, progress_printer, read_labels, sizes_mm, state_note, whole_number


def _sizes_mm(text: str | None) -> list[float]:
    """A comma-separated list of sizes in mm ('' or None: none); each was checked when parsed (common.sizes_mm)."""
    return [float(t) for t in text.split(",") if t.strip()] if text else []


# Slicing flags of 'index build' / 'add' with their defaults; 'add' takes the index's pinned values for those not given.
SLICING_DEFAULTS = {"axes": "axial", "stride_mm": 5.0, "tiles_mm": "32", "tile_overlap": 0.5, "blobs": 12,
                    "blob_sizes_mm": "16,24,32", "region_strategy": "auto"}


SLICING_FIELDS = {"axes": "axes", "stride_mm": "stride_mm", "tiles_mm": "tile_sizes_mm", "tile_overlap": "tile_overlap",
                  "blobs": "blobs_per_slice", "blob_sizes_mm": "blob_sizes_mm", "region_strategy": "region_strategy"}


def _settings_from(args: argparse.Namespace, defaults: dict):
    """IndexSettings from the slicing flags, taking ``defaults`` (flag name -> value) for those not given."""
    from ..index.items import IndexSettings

    value = {name: getattr(args, name) if getattr(args, name) is not None else defaults[name] for name in SLICING_DEFAULTS}
    axes = value["axes"] if isinstance(value["axes"], list) else str(value["axes"]).split(",")
    sizes = {k: value[k] if isinstance(value[k], list) else _sizes_mm(value[k]) for k in ("tiles_mm", "blob_sizes_mm")}
    return IndexSettings(axes=axes, stride_mm=value["stride_mm"], tile_sizes_mm=sizes["tiles_mm"], tile_overlap=value["tile_overlap"],
                         blobs_per_slice=value["blobs"], blob_sizes_mm=sizes["blob_sizes_mm"],
                         region_strategy=value["region_strategy"])


def _refuse_other_slicing(args: argparse.Namespace, index) -> None:
    """'index add' with slicing flags: each must equal the index's pinned value (an index cuts every case alike)."""
    from ..errors import IndexMismatchError

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
    from ..index.dicom_sources import DicomOptions
    from ..index.dicomweb_listing import SeriesFilter, parse_date_range

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
    from ..index.first_build import undone_if_empty
    from ..index.location import create_index, index_exists, open_index
    from ..models.registry import create_embedder

    exists = index_exists(args.index)
    if args.action == "add" and not exists:
        raise CBIRError(f"{args.index}: no index there yet; create it with 'cbir index build'")
    if not args.sources:
        raise CBIRError(f"index {args.action}: name the files or folders to index")
    if exists:
        index = open_index(args.index, writable=True)
        try:
            embedder = create_embedder(args.model or index.model_name(), device=args.device)
            if args.action == "build":  # resuming or extending a build: the slicing must be the same
                index.check_settings(_settings_from(args, SLICING_DEFAULTS))
            else:
                _refuse_other_slicing(args, index)
        except BaseException as error:
            index.__exit__(type(error), error, None)
            raise
    # A first build that ends without a case (refused credentials, every series skipped, Ctrl-C) leaves nothing behind.
    with contextlib.nullcontext() if exists else undone_if_empty(args.index):
        if not exists:
            settings = _settings_from(args, SLICING_DEFAULTS)
            embedder = create_embedder(args.model or "biomedclip", device=args.device)
            index = create_index(args.index, embedder, settings, args.index_type, keep_patient_ids=args.keep_patient_ids)
        with index:
            if args.dask:  # cases embedded on a Dask cluster's workers, stored here as they come
                from ..index.dask_build import add_sources_on_dask

                report = add_sources_on_dask(index, args.sources, args.dask, index.model_name(), args.device,
                                             progress_printer("indexing"), read_labels(args.labels))
            else:
                report = index.add_sources(args.sources, embedder, progress=progress_printer("indexing"),
                                           labels=read_labels(args.labels), dicom=_dicom_options(args))
    print(report.summary())
    if exists or report.indexed:
        opened = open_index(args.index)
        try:
            info = opened.info()
        finally:
            opened.close()
        print(f"index {info['folder']}: {info['counts']['cases']} cases, {info['counts']['vectors']} vectors "
              f"({info['index_type']}), model {info['model']}")
    if not report.indexed:
        what = ", ".join(args.sources)
        reason = "every file was skipped" if report.skipped else "no volume files or DICOM series were found"
        raise CBIRError(f"{what}: nothing indexed ({reason})" + ("" if exists else f"; no index was made in {args.index}"))
    return 0


def _index_other(args: argparse.Namespace) -> int:
    """cbir index remove / info / verify / refresh / repair."""
    from ..index.location import is_server_location, open_index

    if args.action == "remove":
        with open_index(args.index, writable=True) as index:
            removed = index.remove(args.sources)
        print(f"removed {len(removed)} case(s): {', '.join(removed)}")
        return 0
    if args.action == "refresh":
        from ..models.registry import create_embedder

        with open_index(args.index, writable=True) as index:
            report = index.refresh(create_embedder(args.model or index.model_name(), device=args.device),
                                   progress_printer("refreshing"))
        print(report.summary())
        return 0
    if args.action == "trust":
        return _trust(args)
    if args.action == "repair":
        from ..index.repair import repair
        from ..models.registry import create_embedder

        if is_server_location(args.index):
            raise CBIRError(f"{args.index}: repair rebuilds an index folder from its files; a Milvus server keeps its own data "
                            "safe (replicas, backups): check it with 'cbir index verify', and build it again if it is damaged")

        report = repair(args.index, lambda name: create_embedder(args.model or name, device=args.device), args.drop_missing,
                        progress_printer("re-embedding"))
        print(report.summary())
        return 0
    index = open_index(args.index, strict=args.action != "verify")
    state_note(index)
    if args.action == "suggest-labels":
        return _suggest_labels(args, index)
    if args.action == "cases":
        return _cases(args, index)
    if args.action == "info":
        info = index.info()
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            counts = info["counts"]
            per_case = f", {info['bytes_per_case'] / 2**10:.0f} KiB per case" if info["bytes_per_case"] else ""
            size = f"{info['bytes'] / 2**20:.1f} MiB on disk" if info["bytes"] is not None else "kept by the Milvus server"
            print(f"index {info['folder']}")
            print(f"  model {info['model']} ({info['dim']}-d, fingerprint {info['model_digest']})")
            print(f"  {counts['cases']} cases, {counts['items']} items, {counts['vectors']} vectors ({info['index_type']}), "
                  f"{counts['tombstones']} tombstones")
            print(f"  {size}{per_case}")
            print(f"  settings {json.dumps(info['settings'])}")
            print(f"  created {info['created']}, updated {info['updated']}")
        return 0
    problems = index.verify(check_sources=not args.no_sources)
    for problem in problems:
        print(f"problem: {problem}")
    if index.seal_status == keyed_seal.UNCHECKED:
        print(f"note: the keyed seal was not checked: no seal key on this machine ({keyed_seal.KEY_VARIABLE} or "
              f"{keyed_seal.key_path()}); its checksums catch damage, not edits made outside CBIRSlicer")
    print("index is consistent" if not problems else f"{len(problems)} problem(s) found")
    return 0 if not problems else 1


def _cases(args: argparse.Namespace, index) -> int:
    """cbir index cases: every case's id, name, modality, body part and labels (what 'label' and '--relevant' need)."""
    from ..index import labels

    cases = index.catalog.cases()
    merged = labels.merged_labels(cases, labels.read_side_file(args.local_labels or labels.SIDE_FILE))
    rows = [{"case_id": c.case_id, "name": c.name, "modality": c.modality, "body_part": c.body_part,
             "labels": merged.get(c.case_id, {}), "source": c.source} for c in cases]
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"{index.folder}: no cases yet")
    for row in rows:
        tags = ", ".join(f"{k}={v}" for k, v in sorted(row["labels"].items())) or "-"
        print(f"{row['case_id']}  {row['name'] or '-':<24} {row['modality'] or '?':<4} {row['body_part'] or '?':<10} {tags}  "
              f"{row['source']}")
    return 0


def _trust(args: argparse.Namespace) -> int:
    """cbir index trust: check every file of an index sealed elsewhere, then seal it under this machine's key."""
    from ..errors import IndexCorruptError
    from ..index.folder import Index

    index = Index.open(args.index, strict=False)
    try:
        if index.seal_status == keyed_seal.OK:
            print(f"{index.folder}: already sealed under this machine's key; nothing to do")
            return 0
        if index.seal_status == keyed_seal.ALTERED:
            raise IndexCorruptError(f"{index.folder}: sealed under this machine's key and edited since; it is not trusted: "
                                    f"'cbir index repair --index {index.folder}' re-embeds its cases from their sources")
        problems = [p for p in index.verify(check_sources=False) if "cbir index trust" not in p]
    finally:
        index.catalog.close()
    if problems:
        raise IndexCorruptError(f"{index.folder}: not trusted, {len(problems)} problem(s): {problems[0]}")
    with Index.open(args.index, writable=True, trust=True):
        pass  # closing seals it under this machine's key
    print(f"{index.folder}: every file matches its checksums, vectors and items agree; now sealed under this machine's key "
          f"(id {keyed_seal.key_id(keyed_seal.writer_key())})")
    return 0


def _suggest_labels(args: argparse.Namespace, index) -> int:
    """cbir index suggest-labels: unlabelled cases whose label would help the suggestions most (active learning)."""
    from ..retrieval.suggestion import labels_to_ask_for

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


def register(commands) -> None:
    """The index command."""
    index = commands.add_parser("index", help="build, extend, check an index of volumes")
    index.add_argument("action", choices=["build", "add", "remove", "info", "verify", "refresh", "repair", "trust", "cases",
                                          "suggest-labels"])
    index.add_argument("sources", nargs="*", help="files and folders to index (build, add), a DICOM database (ctkdb:PATH or "
                       "Slicer's ctkDICOM.sql) or a PACS (dicomweb:URL), or case ids / sources (remove)")
    index.add_argument("--index", required=True, help="index folder, or milvus://HOST:PORT/COLLECTION (credentials from "
                       "CBIR_MILVUS_TOKEN or CBIR_MILVUS_USER/PASSWORD or CBIR_MILVUS_AUTH_FILE), or a milvus-lite .db file")
    index.add_argument("--model", help="embedding model (build: default biomedclip; later: the index's own)")
    # Slicing flags have no argparse default: 'add' must tell a flag given from one left out (SLICING_DEFAULTS).
    index.add_argument("--axes", help="comma-separated axes to index (default axial)")
    index.add_argument("--stride-mm", type=number(0, 1000, " mm", low_open=True), help="distance between indexed slices (default 5 mm)")
    index.add_argument("--tiles-mm", type=sizes_mm("--tiles-mm"),
                       help="tile sizes in mm for region queries, comma-separated; '' for none (default 32)")
    index.add_argument("--tile-overlap", type=number(0, 0.95),
                       help="overlap of neighbouring tiles, 0 to <1 (default 0.5; 0.75 places matches better, 4x the items)")
    index.add_argument("--blobs", type=whole_number(0, 1000),
                       help="per slice, how many blob-like places (lesion candidates) get crops centred on them (default 12; 0 for none)")
    index.add_argument("--blob-sizes-mm", type=sizes_mm("--blob-sizes-mm"),
                       help="sizes in mm of the crops around each blob, comma-separated (default 16,24,32)")
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
    index.add_argument("--dask", metavar="SCHEDULER", help="build, add: embed the cases on a Dask cluster (tcp://HOST:8786, or "
                       "local:N for N worker processes on this machine); each worker loads the model once")
    index.add_argument("--json", action="store_true", help="info or cases as JSON")
    index.add_argument("--local-labels", metavar="FILE", help="cases: label side file to merge (default ./labels.local.csv)")
    index.add_argument("--no-sources", action="store_true", help="verify: skip checksumming the source files")
    _add_dicom_arguments(index)
    index.add_argument("--column", help="suggest-labels: the label column (default 'label' or 'finding')")
    index.add_argument("--count", type=whole_number(1, 100_000), default=10, help="suggest-labels: how many cases to list (default 10)")
    index.set_defaults(run=lambda a: _index_build(a) if a.action in ("build", "add") else _index_other(a))
