"""An index folder: manifest, FAISS vectors, SQLite catalog with thumbnails; :class:`Index` creates, opens and closes it.

Its parts: the file names and format (:mod:`files`), the write lock (:mod:`lock`), upkeep and the seal
(:mod:`maintenance`), writing cases (:mod:`writer`), checking (:mod:`verify`) and repairing (:mod:`repair`).

Folder layout (format version 2, or 3 with a compressed 'ivfpq' store; :mod:`files`)::

    manifest.json    format, model fingerprint, slicing settings, index type, counts, privacy, state, and the size and
                     per-chunk SHA-256 of every file it owns, sealed by a checksum of itself (:mod:`integrity`) and an
                     HMAC under this machine's seal key (:mod:`keyed_seal`)
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
from typing import Any

from ..clock import now_utc
from ..errors import CBIRError, IndexCorruptError, IndexMismatchError, InputError
from ..models.base import Embedder
from . import keyed_seal, privacy, vector_transform
from .catalog import Catalog
from .faiss_store import VectorStore, choose_kind
from .files import BASE_VERSION, CATALOG, CLEAN, FORMAT, FORMAT_VERSION, MANIFEST, ROWS, TRANSFORM, VECTORS, WRITING, recovery_hint
from .integrity import file_record, read_manifest, record_problem
from .items import IndexSettings
from .lock import FolderLock, writer_active
from .verify import verify
from .writer import IndexWriter


def model_of(folder: str) -> str:
    """The model an index folder was built with, from its manifest alone (no checksums: for choosing what to install or
    load before the index is opened)."""
    path = os.path.join(os.path.abspath(folder), MANIFEST)
    try:
        return str(read_manifest(path, require_seal=False)["model"]["name"])
    except (KeyError, TypeError) as error:
        raise IndexCorruptError(f"{path}: lacks or garbles {error}; {recovery_hint(os.path.dirname(path))}") from None


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
    def open(cls, folder: str, writable: bool = False, strict: bool = True, trust: bool = False) -> Index:
        """Open an existing index, checking it.

        Readers need no lock and write nothing. A writer takes the lock, checks every checksum of a clean index (it is
        about to seal what it finds), and tidies an interrupted build. ``strict=False`` (verify) collects mismatches in
        :attr:`problems` instead of raising; a part that cannot be read at all still raises. A writer refuses an index not
        sealed under this machine's key unless ``trust`` (``cbir index trust``: it is then sealed under it; :mod:`keyed_seal`).
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
                index = cls._open_checked(folder, writable, strict, lock, trust)
            except IndexCorruptError:
                # A writer may have begun between our reading the manifest and the files: its 'writing' state then says so.
                if writable or not writer_active(folder):
                    raise
                index = cls._open_checked(folder, writable, strict, lock, trust)
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        if writable:
            try:
                index._begin_writing()
            except BaseException:  # a full disk or a read-only file: nothing was changed; let the next writer in
                index.catalog.close()
                if lock is not None:
                    lock.release()
                raise
            index._purge_pending()
            if index.transform_dropped:  # a pin that no longer matches its file: fitted again now, as it was fitted on
                index._maybe_refit_transform()
            # A build killed before its first fit is fitted when the run resuming it commits, on every case, as a clean build
            # is: fitted here, on the cases the killed run had finished, it ranked otherwise until the index doubled.
            index._maybe_retrain_codes()  # a writer killed between refitting the transform and training the codes again
        return index

    @classmethod
    def _open_checked(cls, folder: str, writable: bool, strict: bool, lock: FolderLock | None, trust: bool = False) -> Index:
        """Open and check the parts: the manifest (format, seal, fields, the keyed seal against this machine's key), the
        owned files' sizes, the vectors' checksum before FAISS reads them; for a writer of a clean index every owned file's
        checksums; the counts."""
        checks = _Checks(folder, strict)
        manifest, legacy = _checked_manifest(folder, writable)
        sealed = checks.keyed_seal(manifest, legacy, writable, trust)
        state = manifest.get("state", CLEAN)
        live = state == WRITING and not writable and writer_active(folder)
        checked = state == CLEAN  # a writer's work in progress, or a dead writer's, has no checksums to match yet
        files = manifest.get("files") or {VECTORS: {}, CATALOG: {}}
        checks.sizes(files, checked)
        vectors_path = os.path.join(folder, VECTORS)
        if checked and files.get(VECTORS):
            # Checked before FAISS reads it: a damaged header could make FAISS allocate or read without bound.
            found = record_problem(vectors_path, files[VECTORS], file_record(vectors_path))
            if found:
                raise IndexCorruptError(f"{found}; {recovery_hint(folder)}")
        store = VectorStore.load(vectors_path, manifest["index_type"]["current"], int(manifest["model"]["fingerprint"]["dim"]))
        if checked and strict and not writable and store.rows is not None and files.get(ROWS):
            store.rows.expect(files[ROWS], recovery_hint(folder))  # checked chunk by chunk as searches read it
        catalog = Catalog(os.path.join(folder, CATALOG), readonly=not writable)
        try:
            rows_checked = checks.owned_files(files, store) if checked and writable else 0
            if state == WRITING and writable:
                found = catalog.integrity_problems()
                if found:
                    checks.problem(found[0])
            if checked:
                checks.counts(dict(manifest["counts"]), catalog, store)
        except BaseException:
            catalog.close()
            raise
        index = cls(folder, manifest, catalog, store, lock)
        index.problems = checks.problems
        index._rows_checked_bytes = rows_checked
        index.legacy = legacy
        index.writer_active = live
        index.interrupted = state == WRITING and not live
        index.seal_status = sealed
        return index

    def close(self) -> None:
        """Save pending work and seal the manifest (writers), close the catalog, release the lock."""
        if self._lock is not None:
            self._maybe_change_structure()  # a removal's tombstones compacted, as at every commit
            self.checkpoint()
            pinned = self.manifest.get("transform")
            if pinned is not None and "checksum" not in pinned:  # never fitted (a killed build tidied, a remove): fit now
                self._maybe_refit_transform()
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

    def info(self) -> dict[str, Any]:
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
                "seal": {keyed_seal.OK: "keyed, this machine's key", keyed_seal.FOREIGN: keyed_seal.describe(self.manifest),
                         keyed_seal.UNCHECKED: "not checked: no seal key on this machine",
                         keyed_seal.ALTERED: "altered"}.get(self.seal_status, self.seal_status),
                "patient_ids": self.privacy_policy}

    def verify(self, check_sources: bool = True) -> list[str]:
        """Problems found (empty when all is well): checksums, SQLite's integrity check, every vector finite and unit,
        every item with a vector and every vector with an item, counts, and (unless told not to) the source files."""
        return verify(self, check_sources)


def _checked_manifest(folder: str, writable: bool) -> tuple[dict[str, Any], bool]:
    """The manifest, checked: our format, a version this release reads (an older one: read-only), the seal, the fields
    opening needs; and whether it is of an older format."""
    path = os.path.join(folder, MANIFEST)
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
        int(manifest["model"]["fingerprint"]["dim"])
        str(manifest["index_type"]["current"])
        dict(manifest["counts"])
        IndexSettings.from_stored(manifest["settings"])
        if not isinstance(manifest["model"]["name"], str):
            raise TypeError("a model name")
    except (KeyError, TypeError, ValueError, CBIRError) as error:
        raise IndexCorruptError(f"{path}: lacks or garbles {error}; {recovery_hint(folder)}") from None
    return manifest, legacy


class _Checks:
    """The checks of an opening index that a lenient open (verify) collects instead of raising."""

    def __init__(self, folder: str, strict: bool):
        self.folder, self.strict = folder, strict
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        """Raise it (a strict open), or keep it for verify to report."""
        if self.strict:
            raise IndexCorruptError(f"{text}; {recovery_hint(self.folder)}")
        self.problems.append(text)

    def sizes(self, files: dict[str, Any], checked: bool) -> None:
        """Every owned file is there (else raise: nothing can be read), and of the size the seal says."""
        for name, recorded in files.items():
            path = os.path.join(self.folder, name)
            if not os.path.isfile(path):
                raise IndexCorruptError(f"{path}: missing; {recovery_hint(self.folder)}")
            if checked and recorded and os.path.getsize(path) != recorded.get("size"):
                self.problem(f"{path}: holds {os.path.getsize(path)} bytes, the manifest says {recorded.get('size')}")

    def owned_files(self, files: dict[str, Any], store: VectorStore) -> int:
        """A writer about to seal: every owned file is what the last seal vouched for. Returns the bytes of the rows file
        checked (sealing re-hashes only what is appended after them)."""
        rows_checked = 0
        for name, recorded in files.items():
            if name == VECTORS or not recorded:
                continue
            found = record_problem(os.path.join(self.folder, name), recorded, file_record(os.path.join(self.folder, name)))
            if found:
                self.problem(found)
            elif name == ROWS and store.rows is not None:
                rows_checked = min(int(recorded.get("size", 0)), store.rows.count * store.rows.row_bytes)
        return rows_checked

    def keyed_seal(self, manifest: dict[str, Any], legacy: bool, writable: bool, trust: bool) -> str:
        """The manifest's keyed seal against this machine's key (keyed_seal.status): one that does not match is a problem,
        another key's (or none) is refused by a writer unless ``trust`` and reported by verify. Format 1 had no seals."""
        path = os.path.join(self.folder, MANIFEST)
        if legacy:
            return keyed_seal.FOREIGN
        sealed = keyed_seal.status(manifest, keyed_seal.writer_key() if writable else keyed_seal.reader_key())
        if sealed == keyed_seal.ALTERED:
            self.problem(f"{path}: its keyed seal does not match its content: it was edited outside CBIRSlicer (or damaged) "
                         "and sealed again without this machine's key")
        elif sealed == keyed_seal.FOREIGN and writable and not trust:
            raise IndexMismatchError(
                f"{self.folder}: {keyed_seal.describe(manifest)}, so this machine cannot vouch that nobody edited it and does "
                f"not write to it: check it and seal it under this machine's key with 'cbir index trust --index {self.folder}'")
        elif sealed == keyed_seal.FOREIGN and not self.strict:
            self.problems.append(f"{path}: {keyed_seal.describe(manifest)}: edits made outside CBIRSlicer cannot be detected "
                                 f"here; 'cbir index trust --index {self.folder}' checks it and seals it under this machine's key")
        return sealed

    def counts(self, counts: dict[str, Any], catalog: Catalog, store: VectorStore) -> None:
        """The manifest's counts against the catalog's and the store's."""
        actual = {"cases": catalog.count("cases"), "items": catalog.count("items"), "vectors": store.count,
                  "tombstones": catalog.count("tombstones")}
        differ = [f"{k} {counts.get(k)} in the manifest, {v} found" for k, v in actual.items() if counts.get(k) != v]
        if differ:
            self.problem(f"{self.folder}: counts disagree: " + "; ".join(differ))
