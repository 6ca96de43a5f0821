"""An index folder: manifest, FAISS vectors, SQLite catalog with thumbnails; built, updated, checked and repaired here.

Folder layout (format version 2)::

    manifest.json    format, model fingerprint, slicing settings, index type, counts, privacy, state, and the size and
                     per-chunk SHA-256 of every file it owns, sealed by a checksum of itself (:mod:`integrity`)
    vectors.faiss    FAISS index with stable int64 ids (the catalog's item ids); for 'ivfpq' the compressed codes
    vectors.f16      'ivfpq' only: the vectors as float16 rows, memory-mapped for exact re-scoring (:mod:`faiss_store`)
    catalog.sqlite   cases, items, thumbnails, tombstones (rollback journal: committed data is always in the file)
    transform.npz    the learned vector transform (centering or whitening), pinned in the manifest (:mod:`vector_transform`)
    .lock            held (flock) by the one process writing; readers never create it

Integrity: a writer marks the manifest ``writing`` before it changes anything and seals it ``clean``
with fresh checksums when it closes. Readers check the cheap facts (files there, sizes, counts) and
the vectors' checksum, which costs little since they read that file whole anyway; ``verify`` checks
everything; writers check everything before they touch a clean index, so they never seal damage.

Crash safety: a case is inserted as 'pending', its vectors are added in memory, and at a
checkpoint the vectors file is replaced atomically *before* the case is marked 'complete'. A
writer opening the index first purges pending cases (and their vectors, if the file got them),
so a killed build resumes without duplicates or losses.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from ..digests import file_sha256
from ..errors import CBIRError, IndexCorruptError, IndexLockedError, IndexMismatchError, InputError, ParameterError
from ..imaging.body_region import fill_in
from ..imaging.readers import CaseSource, discover, read_case
from ..imaging.volume import Volume
from ..models.base import Embedder
from ..threads import one_blas_thread
from . import privacy, vector_transform
from .catalog import CaseRecord, Catalog, ItemRecord
from .dicom_sources import DicomOptions, is_dicom_source, is_remote_source, plan
from .faiss_store import VectorStore, choose_kind, vector_problem
from .integrity import file_record, read_manifest, record_problem, seal, write_json_atomically
from .items import IndexSettings, VolumeItems, volume_items, volume_items_3d, volume_items_dense

FORMAT = "cbirslicer-index"
FORMAT_VERSION = 3  # the newest read and written; 3: an 'ivfpq' store (codes + vectors.f16), written only by such indexes
BASE_VERSION = 2  # 2: sealed manifest with file checksums, rollback-journal catalog, patient IDs hashed (what flat/HNSW write)
MANIFEST, VECTORS, CATALOG, LOCK = "manifest.json", "vectors.faiss", "catalog.sqlite", ".lock"
ROWS = "vectors.f16"  # an owned file of 'ivfpq' indexes: faiss_store.rows_path_of(VECTORS)
CLEAN, WRITING = "clean", "writing"
TRANSFORM = vector_transform.TRANSFORM_FILE  # an owned file: the learned vector transform the manifest pins


def recovery_hint(folder: str) -> str:
    """How to recover a damaged index, for the end of an error."""
    return (f"the index is damaged: see 'cbir index verify --index {folder}', then 'cbir index repair --index {folder}' "
            "re-embeds its cases from their source volumes (or rebuild it with 'cbir index build')")
# Seconds between checkpoints while building (vectors saved, cases marked complete); env CBIR_CHECKPOINT_SECONDS.
CHECKPOINT_SECONDS = float(os.environ.get("CBIR_CHECKPOINT_SECONDS", "20"))


def case_id_for(source: CaseSource) -> str:
    """A stable public id for a case: from its absolute path and series UID."""
    key = f"{os.path.abspath(source.path)}|{source.series_uid or ''}"
    return "c" + hashlib.sha1(key.encode()).hexdigest()[:15]


def remote_case_id(source: str, series_uid: str) -> str:
    """A stable public id for a series of a DICOM database or a PACS: from the source's name and the series UID."""
    return "c" + hashlib.sha1(f"{source}|{series_uid}".encode()).hexdigest()[:15]


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
    if settings.resolved(embedder).region_strategy == "dense":
        return volume_items_dense(volume, settings, embedder)
    made = volume_items(volume, settings)
    return made, embedder.embed_images(made.images)


def _load(source: CaseSource, known: dict[str, str | None]) -> tuple[str, Volume | None]:
    """A case's checksum, and its volume unless the index already holds that checksum (read ahead on a thread)."""
    checksum = source_checksum(source)
    return checksum, None if known.get(case_id_for(source)) == checksum else read_case(source)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _load_transform(folder: str, manifest: dict) -> vector_transform.VectorTransform | None:
    """The pinned vector transform of an index, or None (none fitted yet, identity, or an index older than transforms)."""
    pinned = manifest.get("transform") or {}
    if "checksum" not in pinned or pinned.get("kind") == "identity":
        return None
    path = os.path.join(folder, TRANSFORM)
    if not os.path.isfile(path):
        raise IndexCorruptError(f"{path}: missing, though the manifest pins a {pinned.get('kind')} vector transform; "
                                "open the index for writing ('cbir index add') to fit it again")
    return vector_transform.load(path, pinned, int(manifest["model"]["fingerprint"]["dim"]))


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


def writer_active(folder: str) -> bool:
    """Whether some process holds the folder's write lock now (probed without creating the lock file)."""
    path = os.path.join(folder, LOCK)
    if not os.path.exists(path):
        return False
    if os.name == "nt":
        return True  # cannot probe without taking it; assume the writer that left the file is alive
    import fcntl

    try:
        handle = open(path)
    except OSError:
        return False
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        handle.close()


def content_problem(volume: Volume) -> tuple[str | None, str | None]:
    """(why a volume cannot be indexed, a warning about it): all NaN, constant, or some voxels not finite."""
    data = np.asarray(volume.array)
    if not np.issubdtype(data.dtype, np.floating):
        low, high = data.min(), data.max()
        return (f"every voxel is {low}: a constant volume holds nothing to search for" if low == high else None), None
    finite = np.isfinite(data)
    count = int(finite.sum())
    if count == 0:
        return "no voxel holds a number (all NaN or infinite): nothing to index", None
    values = data[finite]
    if values.min() == values.max():
        return f"every finite voxel is {float(values.min()):g}: a constant volume holds nothing to search for", None
    if count < data.size:
        return None, f"{data.size - count} of {data.size} voxels are NaN or infinite; indexed as the nearest finite values"
    return None, None


@dataclass
class BuildReport:
    """What a build or an add did."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)
    vectors: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        """One paragraph for the terminal."""
        lines = [f"{len(self.added)} case(s) added, {len(self.replaced)} refreshed, {len(self.unchanged)} unchanged, "
                 f"{len(self.skipped)} skipped; {self.vectors} vectors added in {self.seconds:.1f} s"]
        lines += [f"  skipped {path}: {reason}" for path, reason in self.skipped]
        lines += [f"  warning {path}: {reason}" for path, reason in self.warnings]
        return "\n".join(lines)

    @property
    def indexed(self) -> int:
        """Cases that are in the index after this run (added, refreshed or already there)."""
        return len(self.added) + len(self.replaced) + len(self.unchanged)


Progress = Callable[[int, int, str], None]  # (cases done, cases in all, what is being done)


@dataclass
class EmbeddedCase:
    """A case whose item vectors are already computed (elsewhere, or a benchmark's synthetic cases): what
    :meth:`Index.add_embedded` stores as it is, with no source read and no model run."""

    record: CaseRecord
    items: list[ItemRecord]
    vectors: np.ndarray  # (len(items), the model's dim), L2-normalised, in the items' order
    content_digest: str | None = None  # the voxels' digest (:attr:`Volume.voxel_digest`), so a copy's query leaves it out


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
        self.problems: list[str] = []  # what a lenient open (verify) found instead of raising
        # Bytes at the start of the rows file (compressed stores) checked against the last seal when this writer opened:
        # the file is append-only until a compaction replaces it, so sealing re-hashes only what came after (10 GB at 10 M).
        self._rows_checked_bytes = 0
        self.interrupted = False  # a writer died before sealing the index: its complete cases are still whole
        self.writer_active = False  # a reader opened it while a writer works on it: counts and checksums are in flux
        try:
            self.transform = _load_transform(folder, manifest)  # None: compare raw vectors, as indexes made before it did
        except IndexCorruptError:
            if lock is None:
                raise
            # A writer killed between writing a refitted transform and the manifest that pins it: fit again now (open).
            self.transform = None
            manifest["transform"] = {key: manifest["transform"][key] for key in ("requested", "shrinkage")}
        if store.kind == "ivfpq":
            store.transform = self.transform  # what its codes encode (retrained with it; _maybe_retrain_codes)

    # ----- opening -------------------------------------------------------------------------------
    @classmethod
    def create(cls, folder: str, embedder: Embedder, settings: IndexSettings, index_type: str = "auto",
               keep_patient_ids: bool = False) -> Index:
        """A new, empty index in a folder that does not hold one yet."""
        folder = os.path.abspath(folder)
        if os.path.exists(os.path.join(folder, MANIFEST)):
            raise InputError(folder, "already holds an index; use 'cbir index add' to extend it")
        for name in (VECTORS, CATALOG):
            if os.path.exists(os.path.join(folder, name)):
                raise IndexCorruptError(f"{os.path.join(folder, name)}: an index file without a manifest; " + recovery_hint(folder))
        settings = settings.resolved(embedder)  # the model's region strategy is pinned from here on
        if settings.region_strategy == "dense" and not embedder.supports_dense:
            raise InputError(folder, f"model '{embedder.name}' has no dense features; use region strategy 'crops'")
        os.makedirs(folder, exist_ok=True)
        lock = _FolderLock(folder)
        lock.acquire()
        choose_kind(0, index_type)  # validates the name
        manifest = {
            "format": FORMAT, "format_version": BASE_VERSION, "created": _now(), "updated": _now(),
            "model": {"name": embedder.name, "digest": embedder.fingerprint.digest(), "fingerprint": embedder.fingerprint.as_dict()},
            "settings": settings.as_dict(), "index_type": {"requested": index_type, "current": choose_kind(0, index_type)},
            "privacy": {"patient_ids": privacy.KEPT if keep_patient_ids else privacy.HASHED},
            "counts": {"cases": 0, "items": 0, "vectors": 0, "tombstones": 0},
            "state": WRITING, "files": {VECTORS: {}, CATALOG: {}},
            "transform": {"requested": vector_transform.DEFAULT_KIND, "shrinkage": vector_transform.SHRINKAGE},
        }
        store = VectorStore.create(embedder.dim, manifest["index_type"]["current"])
        index = cls(folder, manifest, Catalog(os.path.join(folder, CATALOG), create=True), store, lock)
        with index.catalog.transaction():
            index.catalog.set_meta("identity", index._identity())
        index._save()
        return index

    @classmethod
    def open(cls, folder: str, writable: bool = False, strict: bool = True) -> Index:
        """Open an existing index, checking it.

        Readers need no lock and write nothing. A writer takes the lock, checks every checksum of a clean index (it is
        about to seal what it finds), and tidies an interrupted build. ``strict=False`` (verify) collects mismatches in
        :attr:`problems` instead of raising; a part that cannot be read at all still raises.
        """
        folder = os.path.abspath(folder)
        path = os.path.join(folder, MANIFEST)
        if not os.path.isfile(path):
            if any(os.path.exists(os.path.join(folder, name)) for name in (VECTORS, CATALOG)):
                raise IndexCorruptError(f"{path}: missing; " + recovery_hint(folder))
            raise InputError(folder, "is not a CBIRSlicer index (no manifest.json); build one with 'cbir index build'")
        lock = None
        if writable:
            lock = _FolderLock(folder)
            lock.acquire()
        try:
            try:
                index = cls._open_checked(folder, writable, strict, lock)
            except IndexCorruptError:
                # A writer may have begun between our reading the manifest and the files: its 'writing' state then says so.
                if writable or not writer_active(folder):
                    raise
                index = cls._open_checked(folder, writable, strict, lock)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if writable:
            index._begin_writing()
            index._purge_pending()
            index._maybe_refit_transform()  # a build killed before its first fit, or a pin that no longer matches its file
            index._maybe_retrain_codes()  # a writer killed between refitting the transform and training the codes again
        return index

    @classmethod
    def _open_checked(cls, folder: str, writable: bool, strict: bool, lock: _FolderLock | None) -> Index:
        path = os.path.join(folder, MANIFEST)
        problems: list[str] = []

        def problem(text: str) -> None:
            if strict:
                raise IndexCorruptError(f"{text}; {recovery_hint(folder)}")
            problems.append(text)

        manifest = read_manifest(path, require_seal=False)
        if manifest.get("format") != FORMAT:
            raise IndexCorruptError(f"{path}: not a CBIRSlicer index manifest")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise IndexMismatchError(f"{folder}: written by a newer CBIRSlicer (index format {version}, this one reads up to "
                                     f"{FORMAT_VERSION}); update CBIRSlicer to use it")
        legacy = version < BASE_VERSION  # format 2 is read and written as it is (3 only adds the compressed store)
        if legacy and writable:
            raise IndexMismatchError(
                f"{folder}: written by an older CBIRSlicer (index format {version}); it can be searched as it is but not changed: "
                f"'cbir index repair --index {folder}' re-embeds its cases into format {BASE_VERSION} or later in place, or rebuild it "
                "with 'cbir index build SOURCES --index NEW_FOLDER'")
        if not legacy:
            read_manifest(path)  # the seal: a version 2 manifest must carry a matching checksum of itself
        try:
            dim = int(manifest["model"]["fingerprint"]["dim"])
            kind = manifest["index_type"]["current"]
            counts = dict(manifest["counts"])
            IndexSettings.from_stored(manifest["settings"])
            if not isinstance(manifest["model"]["name"], str):
                raise TypeError("a model name")
        except (KeyError, TypeError, ValueError, CBIRError) as error:
            raise IndexCorruptError(f"{path}: lacks or garbles {error}; {recovery_hint(folder)}") from None
        state = manifest.get("state", CLEAN)
        live = state == WRITING and not writable and writer_active(folder)
        checked = state == CLEAN  # a writer's work in progress, or a dead writer's, has no checksums to match yet
        files = manifest.get("files") or {VECTORS: {}, CATALOG: {}}
        for name in files:
            if not os.path.isfile(os.path.join(folder, name)):
                raise IndexCorruptError(f"{os.path.join(folder, name)}: missing; {recovery_hint(folder)}")
            recorded = files[name]
            if checked and recorded and os.path.getsize(os.path.join(folder, name)) != recorded.get("size"):
                problem(f"{os.path.join(folder, name)}: holds {os.path.getsize(os.path.join(folder, name))} bytes, the manifest "
                        f"says {recorded.get('size')}")
        vectors_path = os.path.join(folder, VECTORS)
        if checked and files.get(VECTORS):
            # Checked before FAISS reads it: a damaged header could make FAISS allocate or read without bound.
            found = record_problem(vectors_path, files[VECTORS], file_record(vectors_path))
            if found:
                raise IndexCorruptError(f"{found}; {recovery_hint(folder)}")
        store = VectorStore.load(vectors_path, kind, dim)  # an ivfpq store's transform is set once the index loads it
        catalog = Catalog(os.path.join(folder, CATALOG), readonly=not writable)
        try:
            rows_checked = 0
            if checked and writable:  # about to seal: everything it owns must be what the last seal vouched for
                for name, recorded in files.items():
                    if name != VECTORS and recorded:
                        found = record_problem(os.path.join(folder, name), recorded, file_record(os.path.join(folder, name)))
                        if found:
                            problem(found)
                        elif name == ROWS and store.rows is not None:
                            rows_checked = min(int(recorded.get("size", 0)), store.rows.count * store.rows.row_bytes)
            if state == WRITING and writable:
                found = catalog.integrity_problems()
                if found:
                    problem(found[0])
            if checked:
                actual = {"cases": catalog.count("cases"), "items": catalog.count("items"), "vectors": store.count,
                          "tombstones": catalog.count("tombstones")}
                differ = [f"{k} {counts.get(k)} in the manifest, {v} found" for k, v in actual.items() if counts.get(k) != v]
                if differ:
                    problem(f"{folder}: counts disagree: " + "; ".join(differ))
        except BaseException:
            catalog.close()
            raise
        index = cls(folder, manifest, catalog, store, lock)
        index.problems = problems
        index._rows_checked_bytes = rows_checked
        index.legacy = legacy
        index.writer_active = live
        index.interrupted = state == WRITING and not live
        return index

    def close(self) -> None:
        """Save pending work and seal the manifest (writers), close the catalog, release the lock."""
        if self._lock is not None:
            self.checkpoint()
            self._seal_manifest()
            self._lock.release()
            self._lock = None
        self.catalog.close()

    def __enter__(self) -> Index:
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is not None and self._lock is not None:
            if issubclass(kind, CBIRError) and not issubclass(kind, IndexCorruptError):
                # A refusal (an unknown case, another model, bad settings): drop what is unfinished and seal the rest,
                # so a typo never leaves the index looking interrupted.
                try:
                    self._pending_rows = []
                    self._purge_pending()
                    self.close()
                    return
                except (CBIRError, OSError):
                    pass
            self._lock.release()  # a crash mid-case: leave it pending and the manifest 'writing'; the next writer tidies
            self._lock = None
            self.catalog.close()
            return
        self.close()

    # ----- properties ----------------------------------------------------------------------------
    legacy = False

    @property
    def fingerprint(self) -> dict:
        """The stored model fingerprint."""
        return self.manifest["model"]["fingerprint"]

    @property
    def settings(self) -> IndexSettings:
        """The stored slicing settings."""
        return IndexSettings.from_stored(self.manifest["settings"])

    @property
    def privacy_policy(self) -> str:
        """What the index keeps of patient identities (privacy.HASHED unless built to keep them)."""
        return self.manifest.get("privacy", {}).get("patient_ids", privacy.HASHED)

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

    def _identity(self) -> dict:
        """What the index is, copied into the catalog so a repair can do without the manifest."""
        return {k: self.manifest[k] for k in ("format", "format_version", "created", "model", "settings", "index_type", "privacy")}

    def own_file(self, name: str) -> None:
        """Make a file in the folder part of the index: checked on open and by verify, sealed at each commit."""
        self._require_writer()
        self.manifest.setdefault("files", {}).setdefault(name, {})

    # ----- writing -------------------------------------------------------------------------------
    def _require_writer(self) -> None:
        if self._lock is None:
            raise CBIRError(f"{self.folder}: index opened read-only")

    def _begin_writing(self) -> None:
        """Say in the manifest that the files are about to change, before anything changes."""
        self.manifest["state"] = WRITING
        write_json_atomically(os.path.join(self.folder, MANIFEST), seal(self.manifest))

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
                    labels: dict[str, list[str]] | None = None, should_stop: Callable[[], bool] | None = None,
                    dicom: DicomOptions | None = None) -> BuildReport:
        """Index new volumes, refresh changed ones (checksum), skip unchanged ones; resumable.

        A path may also be a DICOM database (``ctkdb:PATH`` or the file) or a PACS (``dicomweb:URL``): its series that pass
        ``dicom``'s filters are indexed one by one (:meth:`_add_dicom_source`)."""
        self._require_writer()
        self.check_model(embedder)
        began = time.monotonic()
        report = BuildReport()
        paths = list(paths)
        series = sum(self._add_dicom_source(spec, embedder, dicom or DicomOptions(), report, progress, should_stop)
                     for spec in [p for p in paths if is_dicom_source(p)])
        found = discover([p for p in paths if not is_dicom_source(p)])
        report.skipped.extend(found.skipped)
        # The next case is checksummed and read on a thread while this one is embedded (file reading and decompression
        # release the GIL), so the model is not kept waiting between cases.
        from concurrent.futures import ThreadPoolExecutor

        known = {}
        for source in found.cases:
            existing = self.catalog.case_by_id(case_id_for(source))
            known[case_id_for(source)] = existing.checksum if existing is not None else None
        with ThreadPoolExecutor(1, thread_name_prefix="cbir-read") as reader:
            ahead = reader.submit(_load, found.cases[0], known) if found.cases else None
            for n, source in enumerate(found.cases):
                loaded, ahead = ahead, reader.submit(_load, found.cases[n + 1], known) if n + 1 < len(found.cases) else None
                if should_stop is not None and should_stop():
                    report.skipped.extend((s.label, "not reached (stopped)") for s in found.cases[n:])
                    break
                if progress is not None:
                    progress(n, len(found.cases), source.label)
                self._index_source(source, embedder, list((labels or {}).get(os.path.abspath(source.path), [])), report,
                                   loaded)
                if time.monotonic() - self._last_checkpoint > CHECKPOINT_SECONDS:
                    self.checkpoint()
            if ahead is not None:
                ahead.cancel()
        self.checkpoint()
        self._maybe_refit_transform()
        if progress is not None:
            total = len(found.cases) or series  # a build from a DICOM database or PACS only: its series
            progress(total, total, "done")
        report.seconds = time.monotonic() - began
        return report

    def _add_dicom_source(self, spec: str, embedder: Embedder, options: DicomOptions, report: BuildReport,
                          progress: Progress | None, should_stop: Callable[[], bool] | None) -> int:
        """Index the series of a DICOM database or a PACS: each fetched (PACS) only when no case holds its series UID yet,
        embedded, then its download removed (unless kept). A series that fails is one line in ``report.skipped``; the others
        go on, and a rerun fetches only what is still missing. Returns how many series passed the filters."""
        name, planned, close = plan(spec, options)
        try:
            for n, item in enumerate(planned):
                entry = item.entry
                label = f"{name} {entry.label}"
                if should_stop is not None and should_stop():
                    report.skipped.extend((f"{name} {p.entry.label}", "not reached (stopped)") for p in planned[n:])
                    break
                if progress is not None:
                    progress(n, len(planned), label)
                case_id = remote_case_id(name, entry.series_uid)
                elsewhere = [self.catalog.case_by_row(r) for r in self.catalog.case_rows_of_series(entry.series_uid)]
                if any(c.case_id != case_id or name.startswith("dicomweb:") for c in elsewhere):
                    report.unchanged.append(label)  # indexed already (here or from another source): never fetched twice
                    continue
                try:
                    source = item.obtain(should_stop)
                except (CBIRError, OSError) as error:
                    text = str(error)
                    report.skipped.append((label, text[len(entry.label) + 2:] if text.startswith(entry.label + ": ") else text))
                    continue
                try:
                    self._index_source(source, embedder, [], report, remote=name, label=label)
                finally:
                    item.release(source)
                if time.monotonic() - self._last_checkpoint > CHECKPOINT_SECONDS:
                    self.checkpoint()
        finally:
            close()
        return len(planned)

    def _index_source(self, source: CaseSource, embedder: Embedder, labels: list[str], report: BuildReport,
                      loaded=None, remote: str | None = None, label: str | None = None) -> None:
        """Index one case (or note it unchanged or skipped, with why); ``loaded``: a future of its (checksum, volume);
        ``remote`` names a DICOM database or PACS it came from."""
        case_id = case_id_for(source) if remote is None else remote_case_id(remote, source.series_uid or "")
        label = label or source.label
        try:
            checksum, volume = loaded.result() if loaded is not None else (source_checksum(source), None)
            existing = self.catalog.case_by_id(case_id)
            if existing is not None and existing.checksum == checksum:
                report.unchanged.append(label)
                return
            volume = volume if volume is not None else read_case(source)
            refused, warning = content_problem(volume)
            if refused:
                raise InputError(None, refused)
            origin = fill_in(volume)  # modality and body part from the image where the file is silent
            made, vectors = embedded_items(volume, self.settings, embedder)
            bad = vector_problem(vectors) if len(vectors) else None
            if bad:
                raise InputError(None, f"model '{embedder.name}' returned {bad}; not indexed")
        except (CBIRError, OSError) as error:
            report.skipped.append((label, str(error)))
            return
        if warning:
            report.warnings.append((label, warning))
        if existing is not None:
            self._remove_rows([existing.row])
        record = CaseRecord(
            case_id=case_id, source=remote or os.path.abspath(source.path), name=volume.name, series_uid=volume.series_uid,
            checksum=checksum, modality=volume.modality, body_part=volume.body_part, shape=list(volume.shape_ijk),
            spacing=[round(float(s), 6) for s in volume.spacing], ijk_to_ras=volume.ijk_to_ras.round(6).tolist(),
            labels=labels, metadata={**privacy.private_metadata(volume.extra, self.privacy_policy), **origin,
                                        "window": made.window.as_dict()})
        self._store_case(record, made.items, vectors, volume.voxel_digest, made.thumbnails)
        (report.replaced if existing is not None else report.added).append(label)
        report.vectors += len(made.items)

    def _store_case(self, record: CaseRecord, items: list[ItemRecord], vectors: np.ndarray, digest: str | None,
                    thumbnails: dict | None = None) -> int:
        """Insert a case, its items and thumbnails (pending) and add its vectors; the next checkpoint completes it."""
        with self.catalog.transaction():
            row = self.catalog.add_case(record, time.time())
            if digest:
                self.catalog.set_content(row, digest)
            ids = self.catalog.add_items(row, items)
            for (axis, plane), grey in (thumbnails or {}).items():
                self.catalog.add_thumbnail(row, axis, plane, grey)
        self.store.add(vectors, ids)
        self._pending_rows.append(row)
        return row

    def add_embedded(self, cases: Iterable[EmbeddedCase], progress: Progress | None = None) -> BuildReport:
        """Store cases whose item vectors are already computed; a case id the index holds already is left unchanged.

        Committed like :meth:`add_sources` (checkpoints as it goes and at the end, the vector transform refitted when the
        index has grown), so a killed run resumes by adding the same cases again. Vectors of the wrong shape, not finite or
        not of unit length raise ParameterError naming the case; nothing of that case is stored.
        """
        self._require_writer()
        began = time.monotonic()
        report = BuildReport()
        cases = list(cases) if progress is not None else cases
        total = len(cases) if progress is not None else 0
        for n, case in enumerate(cases):
            record = case.record
            if progress is not None:
                progress(n, total, record.case_id)
            if self.catalog.case_by_id(record.case_id) is not None:
                report.unchanged.append(record.case_id)
                continue
            vectors = np.asarray(case.vectors)
            if vectors.ndim != 2 or vectors.shape != (len(case.items), self.store.dim):
                raise ParameterError(f"case {record.case_id}: {len(case.items)} items need ({len(case.items)}, {self.store.dim}) "
                                     f"vectors, got {vectors.shape}")
            bad = vector_problem(vectors) if len(vectors) else None
            if bad:
                raise ParameterError(f"case {record.case_id}: {bad}; not stored")
            record = dataclasses.replace(record, status="pending", row=None)
            self._store_case(record, [dataclasses.replace(item, id=None, case_row=None) for item in case.items],
                             vectors, case.content_digest)
            report.added.append(record.case_id)
            report.vectors += len(vectors)
            if time.monotonic() - self._last_checkpoint > CHECKPOINT_SECONDS:
                self.checkpoint()
        self.checkpoint()
        self._maybe_refit_transform()
        if progress is not None:
            progress(total, total, "done")
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
            if is_remote_source(case.source):
                continue  # a database's or PACS's series: 'cbir index add SOURCE' picks up what is new there
            if os.path.exists(case.source):
                present.append(case.source)
            else:
                report.skipped.append((case.source, "source file is missing (kept in the index; remove it explicitly)"))
        result = self.add_sources(present, embedder, progress)
        result.skipped = report.skipped + result.skipped
        return result

    def checkpoint(self) -> None:
        """Save vectors atomically, then mark pending cases complete, then the manifest (still 'writing')."""
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
        rows = os.path.join(self.folder, ROWS)
        self.store = self.store.rebuilt(kind or self.store.kind, tombstones, rows_path=f"{rows}.tmp-{os.getpid()}",
                                        transform=self.transform)
        self._rows_checked_bytes = 0  # a new rows file: hashed whole at the seal
        self.manifest["index_type"]["current"] = self.store.kind
        self.store.save(os.path.join(self.folder, VECTORS))  # an ivfpq store's rows are moved into place first
        if self.store.kind == "ivfpq":
            self.own_file(ROWS)
            self.manifest["index_type"]["codes_transform"] = self.transform.checksum() if self.transform is not None else None
        else:
            self.manifest["index_type"].pop("codes_transform", None)
            self.manifest.get("files", {}).pop(ROWS, None)  # no longer owned (opening checks every owned file is there)
            if os.path.exists(rows):
                os.remove(rows)
        with self.catalog.transaction():
            self.catalog.clear_tombstones()
        self._save_manifest()

    def _maybe_retrain_codes(self) -> None:
        """Train an ivfpq store's codes again when they encode another transform than the pinned one."""
        if self.store.kind != "ivfpq":
            return
        pinned = self.transform.checksum() if self.transform is not None else None
        if self.manifest["index_type"].get("codes_transform") != pinned:
            self.compact("ivfpq")

    def _maybe_refit_transform(self) -> None:
        """Fit the vector transform on the live vectors when none is fitted yet or the index has grown much since.

        Called when a build or an add is committed and when a writer opens the index, not at the timed checkpoints between,
        so what it is fitted on does not depend on the machine's speed."""
        pinned = self.manifest.get("transform")
        if pinned is None:  # an index made before transforms existed keeps comparing raw vectors
            return
        live = np.setdiff1d(self.store.ids(), self.excluded_ids())
        if not vector_transform.needs_refit(pinned, len(live)):
            return
        sample = live[vector_transform.sample_rows(len(live))]
        with one_blas_thread():  # a 512 x 512 covariance: one BLAS thread fits a 15,639-vector case in 1/4 of the CPU time
            fitted = vector_transform.fit(self.store.reconstruct(sample), pinned["requested"], pinned["shrinkage"], count=len(live))
        fitted.save(os.path.join(self.folder, TRANSFORM))  # before the manifest pins it: a crash leaves the old pin
        self.own_file(TRANSFORM)
        self.manifest["transform"] = {"requested": pinned["requested"], "shrinkage": pinned["shrinkage"], **fitted.manifest_entry()}
        self.transform = None if fitted.kind == "identity" else fitted
        self._save_manifest()
        self._maybe_retrain_codes()  # compressed codes encode the transform's output: trained again on it

    def _save(self) -> None:
        self.store.save(os.path.join(self.folder, VECTORS))
        self._save_manifest()

    def _counts(self) -> dict:
        return {"cases": self.catalog.count("cases"), "items": self.catalog.count("items"), "vectors": self.store.count,
                "tombstones": self.catalog.count("tombstones")}

    def _save_manifest(self) -> None:
        """The manifest of work in progress: counts so far, state 'writing', the last seal's checksums left as they were."""
        self.manifest["updated"] = _now()
        self.manifest["counts"] = self._counts()
        self.manifest["format_version"] = self._written_version()
        self.manifest["state"] = WRITING
        write_json_atomically(os.path.join(self.folder, MANIFEST), seal(self.manifest))

    def _written_version(self) -> int:
        """The format this index is written in: 3 only with a compressed store, so older releases still read the rest."""
        return FORMAT_VERSION if self.store.kind == "ivfpq" else BASE_VERSION

    def _seal_manifest(self) -> None:
        """Commit: every owned file's size and chunk checksums, the counts, state 'clean', and the seal."""
        files = self.manifest.setdefault("files", {})
        files.setdefault(VECTORS, {})
        files.setdefault(CATALOG, {})
        for name in list(files):
            path = os.path.join(self.folder, name)
            if os.path.isfile(path):
                known = self._rows_checked_bytes if name == ROWS else 0
                files[name] = file_record(path, known=files[name] if known else None, known_bytes=known)
            else:
                del files[name]  # an owned file its writer removed is no longer owned
        self.manifest["counts"] = self._counts()
        self.manifest["format_version"] = self._written_version()
        self.manifest["state"] = CLEAN
        write_json_atomically(os.path.join(self.folder, MANIFEST), seal(self.manifest))

    # ----- reading -------------------------------------------------------------------------------
    def excluded_ids(self) -> np.ndarray:
        """Ids in the vectors file that searches must not return: tombstones and unfinished cases."""
        pending = self.catalog.item_ids([c.row for c in self.catalog.cases(status="pending")])
        return np.union1d(self.catalog.tombstones(), pending).astype(np.int64)

    def info(self) -> dict:
        """What the index is: model, settings, type, counts, size on disk, format and state."""
        size = sum(os.path.getsize(os.path.join(self.folder, f)) for f in (MANIFEST, VECTORS, ROWS, CATALOG, TRANSFORM)
                   if os.path.exists(os.path.join(self.folder, f)))
        cases = self.catalog.count("cases")
        return {"folder": self.folder, "model": self.manifest["model"]["name"], "model_digest": self.manifest["model"]["digest"],
                "dim": self.fingerprint["dim"], "created": self.manifest["created"], "updated": self.manifest["updated"],
                "index_type": self.store.kind, "settings": self.manifest["settings"],
                "transform": self.manifest.get("transform"),
                "counts": {"cases": cases, "items": len(self.catalog.item_ids()), "vectors": self.store.count,
                           "tombstones": len(self.catalog.tombstones())},
                "bytes": size, "bytes_per_case": round(size / cases) if cases else None,
                "format_version": self.manifest["format_version"], "state": self.state_note() or "clean",
                "patient_ids": self.privacy_policy}

    def state_note(self) -> str | None:
        """A line for the user when the index is not simply clean (older format, being written, interrupted)."""
        if self.legacy:
            return (f"written in index format {self.manifest['format_version']} (this CBIRSlicer writes {BASE_VERSION}-{FORMAT_VERSION}): "
                    f"read-only; 'cbir index repair --index {self.folder}' brings it up to date")
        if self.writer_active:
            return "being written by another process: counts may change and checksums are not checked until it finishes"
        if self.interrupted:
            return (f"a writer stopped before finishing; its complete cases are whole, the rest is tidied by the next "
                    f"'cbir index add' or 'cbir index repair --index {self.folder}'")
        return None

    def verify(self, check_sources: bool = True) -> list[str]:
        """Problems found (empty when all is well): checksums, SQLite's integrity check, every vector finite and unit,
        every item with a vector and every vector with an item, counts, and (unless told not to) the source files."""
        problems = list(self.problems)
        files = self.manifest.get("files") or {}
        if self.interrupted:
            problems.append(f"{self.folder}: " + self.state_note())
        elif not self.legacy and not self.writer_active and self._lock is None and self.manifest.get("state") == CLEAN:
            for name, recorded in files.items():
                path = os.path.join(self.folder, name)
                if name == VECTORS or not recorded or any(p.startswith(path + ":") for p in problems):
                    continue  # the vectors were hashed as they were read (open)
                found = record_problem(path, recorded, file_record(path)) if os.path.isfile(path) else f"{path}: missing"
                if found:
                    problems.append(found)
        problems += self.catalog.integrity_problems()
        problems += self.store.vector_problems()
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
        if check_sources:
            for case in self.catalog.cases():
                if is_remote_source(case.source):
                    continue  # in a DICOM database or a PACS: not checksummed here (a server may recompress what it sends)
                if not os.path.exists(case.source):
                    problems.append(f"{case.source}: source of case {case.case_id} is missing")
                    continue
                files_of = CaseSource(case.source, case.series_uid)
                if os.path.isdir(case.source):
                    found = [c for c in discover([case.source], recursive=False).cases if c.series_uid == case.series_uid]
                    if not found:
                        problems.append(f"{case.source}: series {case.series_uid} of case {case.case_id} is no longer there")
                        continue
                    files_of = found[0]
                if source_checksum(files_of) != case.checksum:
                    problems.append(f"{case.source}: changed since it was indexed (checksum differs); run 'cbir index add' to refresh")
        return problems


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
           progress: Progress | None = None) -> RepairReport:
    """Re-embed every case of a damaged (or older-format, or interrupted) index from the sources its catalog lists.

    Nothing is dropped silently: cases whose sources are gone stop the repair unless ``drop_missing``. The new files are
    built beside the old ones and moved in, manifest last. An index whose list of cases cannot be read must be rebuilt.
    """
    import shutil
    import sqlite3

    folder = os.path.abspath(folder)
    manifest_path, catalog_path = os.path.join(folder, MANIFEST), os.path.join(folder, CATALOG)
    if not os.path.isdir(folder) or not any(os.path.exists(os.path.join(folder, f)) for f in (MANIFEST, CATALOG, VECTORS)):
        raise InputError(folder, "is not a CBIRSlicer index folder")
    try:  # an index with nothing wrong needs no re-embedding; an interrupted one only needs its writer's tidying
        index = Index.open(folder, strict=False)
        problems = [p for p in index.verify(check_sources=False) if not (index.interrupted and "a writer stopped" in p)]
        healthy = not index.legacy and not index.writer_active and not problems
        interrupted = index.interrupted
        index.catalog.close()
        if healthy:
            if interrupted:
                Index.open(folder, writable=True).close()
                return RepairReport(note=f"{folder}: finished what an interrupted writer left; the index is consistent")
            return RepairReport(note=f"{folder}: the index is consistent; nothing to repair")
    except (CBIRError, OSError, sqlite3.DatabaseError):
        pass
    lock = _FolderLock(folder)
    lock.acquire()
    work = os.path.join(folder, ".repair")
    try:
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
        embedder = make_embedder(identity["model"]["name"])
        differences = embedder.fingerprint.differences(identity["model"]["fingerprint"])
        if differences:
            raise IndexMismatchError(f"{folder}: model '{embedder.name}' is not the one the index was built with; differs in "
                                     + "; ".join(differences))
        sources, report_lost = _repair_sources(rows)
        report = RepairReport(lost=report_lost)
        if report.lost and not drop_missing:
            raise CBIRError(f"{folder}: {len(report.lost)} of {len(rows)} case(s) cannot be re-embedded ({report.lost[0][0]}: "
                            f"{report.lost[0][1]}); restore their sources and repair again, or repair with --drop-missing "
                            "to leave them out")
        if os.path.exists(work):
            shutil.rmtree(work)
        settings = IndexSettings.from_stored(identity["settings"])
        keep = identity.get("privacy", {}).get("patient_ids") == privacy.KEPT
        fresh = Index.create(work, embedder, settings, identity["index_type"]["requested"], keep_patient_ids=keep)
        built = BuildReport()
        try:
            for n, (source, checksum, labels) in enumerate(sources):
                if progress is not None:
                    progress(n, len(sources), source.label)
                before = len(built.added)
                fresh._index_source(source, embedder, labels, built)
                if len(built.added) > before:
                    report.reembedded.append(source.label)
                    if source_checksum(source) != checksum:
                        report.changed.append(source.label)
            if built.skipped and not drop_missing:
                raise CBIRError(f"{folder}: {len(built.skipped)} case(s) cannot be re-embedded ({built.skipped[0][0]}: "
                                f"{built.skipped[0][1]}); fix them and repair again, or repair with --drop-missing to leave them out")
            report.lost += built.skipped
            fresh.close()
        except BaseException:
            fresh.__exit__(BaseException, None, None)
            raise
        for suffix in ("-journal", "-wal", "-shm"):  # an old journal must never be applied to the new catalog
            if os.path.exists(catalog_path + suffix):
                os.remove(catalog_path + suffix)
        if os.path.exists(os.path.join(work, ROWS)):
            os.replace(os.path.join(work, ROWS), os.path.join(folder, ROWS))
        elif os.path.exists(os.path.join(folder, ROWS)):
            os.remove(os.path.join(folder, ROWS))
        os.replace(os.path.join(work, VECTORS), os.path.join(folder, VECTORS))
        os.replace(os.path.join(work, CATALOG), catalog_path)
        os.replace(os.path.join(work, MANIFEST), manifest_path)
        if progress is not None:
            progress(len(sources), len(sources), "done")
        return report
    finally:
        if os.path.exists(work):
            shutil.rmtree(work, ignore_errors=True)
        lock.release()
