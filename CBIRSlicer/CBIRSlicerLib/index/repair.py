"""Repairing an index: every case re-embedded from the sources its catalog lists, into new files moved in manifest last."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import CBIRError, IndexCorruptError, IndexMismatchError, InputError
from ..imaging.readers import CaseSource, discover
from ..models.base import Embedder
from . import privacy
from .catalog import Catalog
from .dicom_sources import is_remote_source
from .files import CATALOG, MANIFEST, ROWS, TRANSFORM, VECTORS
from .folder import Index
from .integrity import read_manifest
from .items import IndexSettings
from .lock import FolderLock
from .writer import CaseProgress, source_checksum


@dataclass
class RepairReport:
    """What a repair did: cases re-embedded (some from sources changed since), and cases that could not be."""

    reembedded: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    lost: list[tuple[str, str]] = field(default_factory=list)
    note: str = ""

    def summary(self) -> str:
        """A paragraph for the terminal."""
        if self.note:
            return self.note
        lines = [f"repaired: {len(self.reembedded)} case(s) re-embedded from their sources"
                 + (f" ({len(self.changed)} changed since they were indexed, now indexed as they are)" if self.changed else "")
                 + (f"; {len(self.lost)} left out (--drop-missing)" if self.lost else "")]
        lines += [f"  left out {label}: {why}" for label, why in self.lost]
        return "\n".join(lines)


def _repair_sources(rows: list[tuple]) -> tuple[list[tuple[CaseSource, str | None, list[str]]], list[tuple[str, str]]]:
    """The sources of catalog cases (source, series UID, checksum, labels) that are still there, and those that are not."""
    found, lost = [], []
    for source, series_uid, checksum, labels in rows:
        label = f"{source} [series {series_uid}]" if series_uid else source
        if is_remote_source(source):
            lost.append((label, "it came from a DICOM database or a PACS: index it again with 'cbir index add' on that source"))
        elif not os.path.exists(source):
            lost.append((label, "its source is missing"))
        elif os.path.isdir(source):
            series = [c for c in discover([source], recursive=False).cases if c.series_uid == series_uid]
            if series:
                found.append((series[0], checksum, json.loads(labels or "[]")))
            else:
                lost.append((label, "its DICOM series is no longer in that folder"))
        else:
            found.append((CaseSource(source), checksum, json.loads(labels or "[]")))
    return found, lost


def repair(folder: str, make_embedder: Callable[[str], Embedder], drop_missing: bool = False,
           progress: CaseProgress | None = None) -> RepairReport:
    """Re-embed every case of a damaged (or older-format, or interrupted) index from the sources its catalog lists.

    Nothing is dropped silently: cases whose sources are gone stop the repair unless ``drop_missing``. The new files are
    built beside the old ones and moved in, manifest last. An index whose list of cases cannot be read must be rebuilt.
    """
    import shutil

    folder = os.path.abspath(folder)
    if not os.path.isdir(folder) or not any(os.path.exists(os.path.join(folder, f)) for f in (MANIFEST, CATALOG, VECTORS)):
        raise InputError(folder, "is not a CBIRSlicer index folder")
    whole = _already_whole(folder)
    if whole is not None:
        return whole
    lock = FolderLock(folder)
    lock.acquire()
    work = os.path.join(folder, ".repair")
    try:
        identity, rows = _identity_and_cases(folder)
        embedder = make_embedder(identity["model"]["name"])
        differences = embedder.fingerprint.differences(identity["model"]["fingerprint"])
        if differences:
            raise IndexMismatchError(f"{folder}: model '{embedder.name}' is not the one the index was built with; differs in "
                                     + "; ".join(differences))
        sources, lost = _repair_sources(rows)
        report = RepairReport(lost=lost)
        if report.lost and not drop_missing:
            raise CBIRError(f"{folder}: {len(report.lost)} of {len(rows)} case(s) cannot be re-embedded ({report.lost[0][0]}: "
                            f"{report.lost[0][1]}); restore their sources and repair again, or repair with --drop-missing "
                            "to leave them out")
        if os.path.exists(work):
            shutil.rmtree(work)
        _rebuild(work, identity, embedder, sources, report, drop_missing, progress)
        _move_in(work, folder)
        return report
    finally:
        if os.path.exists(work):
            shutil.rmtree(work, ignore_errors=True)
        lock.release()


def _already_whole(folder: str) -> RepairReport | None:
    """The report for an index that needs no re-embedding (an interrupted one only its writer's tidying), else None."""
    import sqlite3

    try:
        index = Index.open(folder, strict=False)
        problems = [p for p in index.verify(check_sources=False) if not (index.interrupted and "a writer stopped" in p)]
        healthy = not index.legacy and not index.writer_active and not problems
        interrupted = index.interrupted
        index.catalog.close()
        if healthy and interrupted:
            Index.open(folder, writable=True).close()
            return RepairReport(note=f"{folder}: finished what an interrupted writer left; the index is consistent")
        if healthy:
            return RepairReport(note=f"{folder}: the index is consistent; nothing to repair")
    except (CBIRError, OSError, sqlite3.DatabaseError):
        pass
    return None


def _identity_and_cases(folder: str) -> tuple[dict, list[tuple]]:
    """What the index is (model, settings: the manifest's, else the catalog's copy) and its complete cases' sources."""
    import sqlite3

    manifest_path, catalog_path = os.path.join(folder, MANIFEST), os.path.join(folder, CATALOG)
    identity, why = None, ""
    try:
        identity = read_manifest(manifest_path, require_seal=False)
        if identity.get("format_version", 0) >= 2:
            read_manifest(manifest_path)
    except (CBIRError, OSError) as error:
        identity, why = None, str(error)
    try:
        catalog = Catalog(catalog_path, readonly=True)
        identity = identity or catalog.meta("identity")
        rows = catalog.db.execute("SELECT source, series_uid, checksum, labels FROM cases WHERE status = 'complete' "
                                  "ORDER BY id").fetchall()
        catalog.close()
    except (CBIRError, sqlite3.DatabaseError) as error:
        raise IndexCorruptError(f"{catalog_path}: its list of cases cannot be read ({str(error).split('; ')[0]}), so the index "
                                f"cannot be repaired: move the folder away and rebuild it with 'cbir index build SOURCES "
                                f"--index {folder}'") from None
    if identity is None:
        raise IndexCorruptError(f"{why or manifest_path + ': missing'}; the catalog holds no copy of the model and settings "
                                f"(an older index), so rebuild it with 'cbir index build SOURCES --index NEW_FOLDER'")
    return identity, rows


def _rebuild(work: str, identity: dict, embedder: Embedder, sources: list[tuple[CaseSource, str | None, list[str]]],
             report: RepairReport, drop_missing: bool, progress: CaseProgress | None) -> None:
    """A new index in ``work`` with the same model and settings, the cases re-embedded into it through the writer."""
    settings = IndexSettings.from_stored(identity["settings"])
    keep = identity.get("privacy", {}).get("patient_ids") == privacy.KEPT
    fresh = Index.create(work, embedder, settings, identity["index_type"]["requested"], keep_patient_ids=keep)
    labels = {source: case_labels for source, _, case_labels in sources}  # a CaseSource is frozen: a key
    try:
        # The public writer path: checkpoints, and the vector transform fitted on the re-embedded vectors, as a build does.
        built = fresh.add_cases([source for source, _, _ in sources], embedder, labels.__getitem__, progress)
        if built.skipped and not drop_missing:
            raise CBIRError(f"{os.path.dirname(work)}: {len(built.skipped)} case(s) cannot be re-embedded ({built.skipped[0][0]}: "
                            f"{built.skipped[0][1]}); fix them and repair again, or repair with --drop-missing to leave them out")
        added = set(built.added)
        for source, checksum, _ in sources:
            if source.label in added:
                report.reembedded.append(source.label)
                if source_checksum(source) != checksum:
                    report.changed.append(source.label)
        report.lost += built.skipped
        fresh.close()
    except BaseException:
        fresh.__exit__(BaseException, None, None)
        raise


def _move_in(work: str, folder: str) -> None:
    """The rebuilt files moved over the old ones: rows and transform (or their absence) first, the manifest last."""
    catalog_path = os.path.join(folder, CATALOG)
    for suffix in ("-journal", "-wal", "-shm"):  # an old journal must never be applied to the new catalog
        if os.path.exists(catalog_path + suffix):
            os.remove(catalog_path + suffix)
    for name in (ROWS, TRANSFORM):  # the transform is pinned by the new manifest: moved in before it
        if os.path.exists(os.path.join(work, name)):
            os.replace(os.path.join(work, name), os.path.join(folder, name))
        elif os.path.exists(os.path.join(folder, name)):
            os.remove(os.path.join(folder, name))
    for name in (VECTORS, CATALOG, MANIFEST):
        os.replace(os.path.join(work, name), os.path.join(folder, name))
