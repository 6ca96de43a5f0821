"""An index folder: manifest, FAISS vectors, SQLite catalog with thumbnails; built, updated and checked here.

Folder layout (format version 1)::

    manifest.json    format, model fingerprint, slicing settings, index type, counts (JSON)
    vectors.faiss    FAISS index with stable int64 ids (the catalog's item ids)
    catalog.sqlite   cases, items, thumbnails, tombstones
    .lock            held (flock) by the one process writing

Crash safety: a case is inserted as 'pending', its vectors are added in memory, and at a
checkpoint the vectors file is replaced atomically *before* the case is marked 'complete'. A
writer opening the index first purges pending cases (and their vectors, if the file got them),
so a killed build resumes without duplicates or losses.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from ..digests import file_sha256
from ..errors import CBIRError, IndexCorruptError, IndexLockedError, IndexMismatchError, InputError
from ..imaging.readers import CaseSource, discover, read_case
from ..models.base import Embedder
from .catalog import CaseRecord, Catalog
from .faiss_store import VectorStore, choose_kind
from .items import IndexSettings, VolumeItems, volume_items, volume_items_3d

FORMAT = "cbirslicer-index"
FORMAT_VERSION = 1
MANIFEST, VECTORS, CATALOG, LOCK = "manifest.json", "vectors.faiss", "catalog.sqlite", ".lock"
# Seconds between checkpoints while building (vectors saved, cases marked complete); env CBIR_CHECKPOINT_SECONDS.
CHECKPOINT_SECONDS = float(os.environ.get("CBIR_CHECKPOINT_SECONDS", "20"))


def case_id_for(source: CaseSource) -> str:
    """A stable public id for a case: from its absolute path and series UID."""
    key = f"{os.path.abspath(source.path)}|{source.series_uid or ''}"
    return "c" + hashlib.sha1(key.encode()).hexdigest()[:15]


def source_checksum(source: CaseSource) -> str:
    """SHA-256 of a volume file, or of a DICOM series' files in order."""
    if not source.files:
        return file_sha256(source.path)
    digest = hashlib.sha256()
    for path in source.files:
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def embedded_items(volume, settings: IndexSettings, embedder: Embedder) -> tuple[VolumeItems, np.ndarray]:
    """A volume's items and their vectors: slices, tiles and blob crops for 2D models; whole volume and cells for 3D ones."""
    if embedder.embeds_volumes:
        return volume_items_3d(volume, embedder, settings)
    made = volume_items(volume, settings)
    return made, embedder.embed_images(made.images)


def _write_json(path: str, data: dict) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        json.dump(data, handle, indent=1)
    os.replace(temporary, path)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class _FolderLock:
    """An exclusive lock on the index folder that the OS releases if the holder dies."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, LOCK)
        self.handle = None

    def acquire(self) -> None:
        handle = open(self.path, "a+")
        try:
            if os.name == "nt":
                import msvcrt

                msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
            else:
                import fcntl

                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise IndexLockedError(f"{os.path.dirname(self.path)}: the index is being written by {holder}; "
                                   "wait for it to finish (only one writer at a time)") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} on {os.uname().nodename if hasattr(os, 'uname') else 'this machine'} "
                     f"since {_now()}")
        handle.flush()
        self.handle = handle

    def release(self) -> None:
        if self.handle is not None:
            self.handle.close()  # closing drops the lock
            self.handle = None


@dataclass
class BuildReport:
    """What a build or an add did."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    vectors: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """One paragraph for the terminal."""
        lines = [f"{len(self.added)} case(s) added, {len(self.replaced)} refreshed, {len(self.unchanged)} unchanged, "
                 f"{len(self.skipped)} skipped; {self.vectors} vectors added in {self.seconds:.1f} s"]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


Progress = Callable[[int, int, str], None]  # (cases done, cases in all, what is being done)


class Index:
    """One index folder. Open with :meth:`create` or :meth:`open`; writers hold the folder lock."""

    def __init__(self, folder: str, manifest: dict, catalog: Catalog, store: VectorStore, lock: _FolderLock | None):
        self.folder = folder
        self.manifest = manifest
        self.catalog = catalog
        self.store = store
        self._lock = lock
        self._pending_rows: list[int] = []
        self._last_checkpoint = time.monotonic()

    # ----- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: str, embedder: Embedder, settings: IndexSettings, index_type: str = "auto") -> Index:
        """A new, empty index in a folder that does not hold one yet."""
        folder = os.path.abspath(folder)
        if os.path.exists(os.path.join(folder, MANIFEST)):
            raise InputError(folder, "already holds an index; use 'cbir index add' to extend it")
        os.makedirs(folder, exist_ok=True)
        lock = _FolderLock(folder)
        lock.acquire()
        choose_kind(0, index_type)  # validates the name
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "created": _now(), "updated": _now(),
            "model": {"name": embedder.name, "digest": embedder.fingerprint.digest(), "fingerprint": embedder.fingerprint.as_dict()},
            "settings": settings.as_dict(), "index_type": {"requested": index_type, "current": choose_kind(0, index_type)},
            "counts": {"cases": 0, "items": 0, "vectors": 0, "tombstones": 0},
        }
        store = VectorStore.create(embedder.dim, manifest["index_type"]["current"])
        index = cls(folder, manifest, Catalog(os.path.join(folder, CATALOG)), store, lock)
        index._save()
        return index

    @classmethod
    def open(cls, folder: str, writable: bool = False) -> Index:
        """Open an existing index (readers need no lock; a writer takes it and tidies an interrupted build)."""
        folder = os.path.abspath(folder)
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            raise InputError(folder, "is not a CBIRSlicer index (no manifest.json); build one with 'cbir index build'")
        lock = None
        if writable:
            lock = _FolderLock(folder)
            lock.acquire()
        try:
            with open(path) as handle:
                manifest = json.load(handle)
            if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
                raise IndexCorruptError(f"{path}: not a CBIRSlicer index of format version {FORMAT_VERSION}")
            dim = int(manifest["model"]["fingerprint"]["dim"])
            kind = manifest["index_type"]["current"]
            vectors_path = os.path.join(folder, VECTORS)
            store = VectorStore.load(vectors_path, kind, dim) if os.path.exists(vectors_path) else VectorStore.create(dim, kind)
            index = cls(folder, manifest, Catalog(os.path.join(folder, CATALOG)), store, lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if writable:
            index._purge_pending()
        return index

    def close(self) -> None:
        """Save pending work (writers), close the catalog, release the lock."""
        if self._lock is not None:
            self.checkpoint()
            self._lock.release()
            self._lock = None
        self.catalog.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None and self._lock is not None:
            self._lock.release()  # an error mid-case: leave it pending, the next writer purges it
            self._lock = None
            self.catalog.close()
            return
        self.close()

    # ----- properties ----------------------------------------------------------------------------
    @property
    def fingerprint(self) -> dict:
        """The stored model fingerprint."""
        return self.manifest["model"]["fingerprint"]

    @property
    def settings(self) -> IndexSettings:
        """The stored slicing settings."""
        return IndexSettings.from_stored(self.manifest["settings"])

    def check_model(self, embedder: Embedder) -> None:
        """Refuse an embedder whose fingerprint differs from the one the index was built with."""
        differences = embedder.fingerprint.differences(self.fingerprint)
        if differences:
            raise IndexMismatchError(
                f"{self.folder}: built with model '{self.manifest['model']['name']}' ({self.manifest['model']['digest']}), "
                f"not '{embedder.name}' ({embedder.fingerprint.digest()}); differs in " + "; ".join(differences))

    def check_settings(self, settings: IndexSettings) -> None:
        """Refuse slicing settings that differ from the stored ones."""
        differences = settings.differences(self.manifest["settings"])
        if differences:
            raise IndexMismatchError(f"{self.folder}: slicing settings differ from the index's: " + "; ".join(differences))

    def model_name(self) -> str:
        """The model name the index was built with (what a search loads unless told otherwise)."""
        return self.manifest["model"]["name"]

    # ----- writing -------------------------------------------------------------------------------
    def _require_writer(self) -> None:
        if self._lock is None:
            raise CBIRError(f"{self.folder}: index opened read-only")

    def _purge_pending(self) -> None:
        pending = [c.row for c in self.catalog.cases(status="pending")]
        if pending:
            self._remove_rows(pending)
            self._save()

    def _remove_rows(self, rows: list[int]) -> None:
        ids = self.catalog.item_ids(rows)
        present = np.intersect1d(ids, self.store.ids())
        with self.catalog.transaction():
            if len(present) and not self.store.remove(present):
                self.catalog.add_tombstones(present)
            self.catalog.delete_cases(rows)

    def add_sources(self, paths: Iterable[str], embedder: Embedder, progress: Progress | None = None,
                    labels: dict[str, list[str]] | None = None, should_stop: Callable[[], bool] | None = None) -> BuildReport:
        """Index new volumes, refresh changed ones (checksum), skip unchanged ones; resumable."""
        self._require_writer()
        self.check_model(embedder)
        began = time.monotonic()
        report = BuildReport()
        found = discover(paths)
        report.skipped.extend(found.skipped)
        settings = self.settings
        for n, source in enumerate(found.cases):
            if should_stop is not None and should_stop():
                report.skipped.extend((s.label, "not reached (stopped)") for s in found.cases[n:])
                break
            if progress is not None:
                progress(n, len(found.cases), source.label)
            case_id = case_id_for(source)
            try:
                checksum = source_checksum(source)
                existing = self.catalog.case_by_id(case_id)
                if existing is not None and existing.checksum == checksum:
                    report.unchanged.append(source.label)
                    continue
                volume = read_case(source)
                made, vectors = embedded_items(volume, settings, embedder)
            except (CBIRError, OSError) as error:
                report.skipped.append((source.label, str(error)))
                continue
            if existing is not None:
                self._remove_rows([existing.row])
            record = CaseRecord(
                case_id=case_id, source=os.path.abspath(source.path), name=volume.name, series_uid=volume.series_uid,
                checksum=checksum, modality=volume.modality, body_part=volume.body_part, shape=list(volume.shape_ijk),
                spacing=[round(float(s), 6) for s in volume.spacing], ijk_to_ras=volume.ijk_to_ras.round(6).tolist(),
                labels=list((labels or {}).get(os.path.abspath(source.path), [])),
                metadata={**volume.extra, "window": made.window.as_dict()})
            with self.catalog.transaction():
                row = self.catalog.add_case(record, time.time())
                self.catalog.set_content(row, volume.voxel_digest)
                ids = self.catalog.add_items(row, made.items)
                for (axis, plane), grey in made.thumbnails.items():
                    self.catalog.add_thumbnail(row, axis, plane, grey)
            self.store.add(vectors, ids)
            self._pending_rows.append(row)
            (report.replaced if existing is not None else report.added).append(source.label)
            report.vectors += len(ids)
            if time.monotonic() - self._last_checkpoint > CHECKPOINT_SECONDS:
                self.checkpoint()
        self.checkpoint()
        if progress is not None:
            progress(len(found.cases), len(found.cases), "done")
        report.seconds = time.monotonic() - began
        return report

    def remove(self, case_ids: Iterable[str]) -> list[str]:
        """Remove cases by id (or by source path); returns the ids removed. Unknown ones raise InputError."""
        self._require_writer()
        rows, removed = [], []
        by_source = {c.source: c for c in self.catalog.cases()}
        for key in case_ids:
            case = self.catalog.case_by_id(key) or by_source.get(os.path.abspath(key))
            if case is None:
                raise InputError(key, f"is not a case of the index {self.folder}")
            rows.append(case.row)
            removed.append(case.case_id)
        self._remove_rows(rows)
        self._save()
        return removed

    def refresh(self, embedder: Embedder, progress: Progress | None = None) -> BuildReport:
        """Re-check every case's source: re-index changed files, report missing ones."""
        report = BuildReport()
        present = []
        for case in self.catalog.cases():
            if os.path.exists(case.source):
                present.append(case.source)
            else:
                report.skipped.append((case.source, "source file is missing (kept in the index; remove it explicitly)"))
        result = self.add_sources(present, embedder, progress)
        result.skipped = report.skipped + result.skipped
        return result

    def checkpoint(self) -> None:
        """Save vectors atomically, then mark pending cases complete, then the manifest."""
        self._require_writer()
        self._maybe_change_structure()
        self.store.save(os.path.join(self.folder, VECTORS))
        if self._pending_rows:
            with self.catalog.transaction():
                self.catalog.set_status(self._pending_rows, "complete")
            self._pending_rows = []
        self._save_manifest()
        self._last_checkpoint = time.monotonic()

    def _maybe_change_structure(self) -> None:
        """Switch flat -> HNSW when 'auto' and the index has grown past the flat limit; compact many tombstones."""
        requested = self.manifest["index_type"]["requested"]
        wanted = choose_kind(self.store.count, requested, self.store.dim)
        tombstones = self.catalog.tombstones()
        if wanted != self.store.kind or len(tombstones) > 0.2 * max(1, self.store.count):
            self.compact(wanted)

    def compact(self, kind: str | None = None) -> None:
        """Rebuild the vectors without removed ids (and in another structure if asked)."""
        self._require_writer()
        tombstones = self.catalog.tombstones()
        self.store = self.store.rebuilt(kind or self.store.kind, tombstones)
        self.manifest["index_type"]["current"] = self.store.kind
        self.store.save(os.path.join(self.folder, VECTORS))
        with self.catalog.transaction():
            self.catalog.clear_tombstones()
        self._save_manifest()

    def _save(self) -> None:
        self.store.save(os.path.join(self.folder, VECTORS))
        self._save_manifest()

    def _save_manifest(self) -> None:
        self.manifest["updated"] = _now()
        self.manifest["counts"] = {"cases": self.catalog.count("cases"), "items": len(self.catalog.item_ids()),
                                   "vectors": self.store.count, "tombstones": len(self.catalog.tombstones())}
        _write_json(os.path.join(self.folder, MANIFEST), self.manifest)

    # ----- reading -------------------------------------------------------------------------------
    def excluded_ids(self) -> np.ndarray:
        """Ids in the vectors file that searches must not return: tombstones and unfinished cases."""
        pending = self.catalog.item_ids([c.row for c in self.catalog.cases(status="pending")])
        return np.union1d(self.catalog.tombstones(), pending).astype(np.int64)

    def info(self) -> dict:
        """What the index is: model, settings, type, counts, size on disk."""
        size = sum(os.path.getsize(os.path.join(self.folder, f)) for f in (MANIFEST, VECTORS, CATALOG)
                   if os.path.exists(os.path.join(self.folder, f)))
        cases = self.catalog.count("cases")
        return {"folder": self.folder, "model": self.manifest["model"]["name"], "model_digest": self.manifest["model"]["digest"],
                "dim": self.fingerprint["dim"], "created": self.manifest["created"], "updated": self.manifest["updated"],
                "index_type": self.store.kind, "settings": self.manifest["settings"],
                "counts": {"cases": cases, "items": len(self.catalog.item_ids()), "vectors": self.store.count,
                           "tombstones": len(self.catalog.tombstones())},
                "bytes": size, "bytes_per_case": round(size / cases) if cases else None}

    def verify(self, check_sources: bool = True) -> list[str]:
        """Problems found (empty when all is well): catalog and vectors agree, counts, source files intact."""
        problems = []
        catalog_ids = self.catalog.item_ids()
        stored = self.store.ids()
        live = np.setdiff1d(stored, self.excluded_ids())
        if len(np.unique(stored)) != len(stored):
            problems.append(f"vectors file holds {len(stored) - len(np.unique(stored))} duplicate ids")
        missing = np.setdiff1d(catalog_ids, stored)
        extra = np.setdiff1d(live, catalog_ids)
        if len(missing):
            problems.append(f"{len(missing)} catalog items have no vector (first id {missing[0]})")
        if len(extra):
            problems.append(f"{len(extra)} vectors have no catalog item (first id {extra[0]})")
        if self.store.count and self.store.dim != self.fingerprint["dim"]:
            problems.append(f"vectors have {self.store.dim} dimensions, the model {self.fingerprint['dim']}")
        counts = self.manifest["counts"]
        if counts.get("cases") != self.catalog.count("cases") or counts.get("vectors") != self.store.count:
            problems.append(f"manifest counts {counts} disagree with the catalog ({self.catalog.count('cases')} cases) "
                            f"and vectors ({self.store.count})")
        if len(catalog_ids):
            sample = catalog_ids[:: max(1, len(catalog_ids) // 200)]
            norms = np.linalg.norm(self.store.reconstruct(np.intersect1d(sample, stored)), axis=1)
            if len(norms) and np.abs(norms - 1).max() > 1e-3:
                problems.append("some vectors are not unit length")
        if check_sources:
            for case in self.catalog.cases():
                if not os.path.exists(case.source):
                    problems.append(f"{case.source}: source of case {case.case_id} is missing")
                    continue
                files = CaseSource(case.source, case.series_uid)
                if os.path.isdir(case.source):
                    found = [c for c in discover([case.source], recursive=False).cases if c.series_uid == case.series_uid]
                    if not found:
                        problems.append(f"{case.source}: series {case.series_uid} of case {case.case_id} is no longer there")
                        continue
                    files = found[0]
                if source_checksum(files) != case.checksum:
                    problems.append(f"{case.source}: changed since it was indexed (checksum differs); run 'cbir index add' to refresh")
        return problems
