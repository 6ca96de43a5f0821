"""An index folder: manifest, FAISS vectors, SQLite catalog with thumbnails; :class:`Index` creates, opens and closes it.

Its parts: the file names and format (:mod:`files`), the write lock (:mod:`lock`), upkeep and the seal
(:mod:`maintenance`), writing cases (:mod:`writer`), checking (:mod:`verify`) and repairing (:mod:`repair`).

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

import os

from ..clock import now_utc
from ..errors import CBIRError, IndexCorruptError, IndexMismatchError, InputError
from ..models.base import Embedder
from . import privacy, vector_transform
from .catalog import Catalog
from .faiss_store import VectorStore, choose_kind
from .files import BASE_VERSION, CATALOG, CLEAN, FORMAT, FORMAT_VERSION, MANIFEST, ROWS, TRANSFORM, VECTORS, WRITING, recovery_hint
from .integrity import file_record, read_manifest, record_problem
from .items import IndexSettings
from .lock import FolderLock, writer_active
from .verify import verify
from .writer import IndexWriter


class Index(IndexWriter):
    """One index folder. Open with :meth:`create` or :meth:`open`; writers hold the folder lock."""

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
        lock = FolderLock(folder)
        lock.acquire()
        choose_kind(0, index_type)  # validates the name
        manifest = {
            "format": FORMAT, "format_version": BASE_VERSION, "created": now_utc(), "updated": now_utc(),
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
            lock = FolderLock(folder)
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
    def _open_checked(cls, folder: str, writable: bool, strict: bool, lock: FolderLock | None) -> Index:
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
        return verify(self, check_sources)
