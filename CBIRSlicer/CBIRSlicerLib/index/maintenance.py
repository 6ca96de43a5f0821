"""An open index folder's parts and their upkeep: checkpoints, structure changes, the fitted vector transform, and the
manifest, marked 'writing' while work is in progress and sealed 'clean' with fresh checksums when a writer commits.

:class:`IndexFolder` is the base of :class:`writer.IndexWriter` and :class:`folder.Index`: what every open index holds
(manifest, catalog, vector store, the lock of a writer) and what a writer does to keep the files whole.
"""

from __future__ import annotations

import os
import time

import numpy as np

from ..atomic import write_json_atomically
from ..clock import now_utc
from ..errors import CBIRError, IndexCorruptError, IndexMismatchError
from ..models.base import Embedder
from ..threads import one_blas_thread
from . import keyed_seal, privacy, vector_transform
from .catalog import Catalog
from .faiss_store import VectorStore, choose_kind
from .files import BASE_VERSION, CATALOG, CLEAN, FORMAT_VERSION, MANIFEST, ROWS, TRANSFORM, VECTORS, WRITING
from .integrity import file_record, seal
from .items import IndexSettings
from .lock import FolderLock
from .searchable import Allowed


def load_transform(folder: str, manifest: dict) -> vector_transform.VectorTransform | None:
    """The pinned vector transform of an index, or None (none fitted yet, identity, or an index older than transforms)."""
    pinned = manifest.get("transform") or {}
    if "checksum" not in pinned or pinned.get("kind") == "identity":
        return None
    path = os.path.join(folder, TRANSFORM)
    if not os.path.isfile(path):
        raise IndexCorruptError(f"{path}: missing, though the manifest pins a {pinned.get('kind')} vector transform; "
                                "open the index for writing ('cbir index add') to fit it again")
    return vector_transform.load(path, pinned, int(manifest["model"]["fingerprint"]["dim"]))


class IndexFolder:
    """An open index folder: manifest, catalog and vector store (and a writer's lock), kept whole as they change."""

    def __init__(self, folder: str, manifest: dict, catalog: Catalog, store: VectorStore, lock: FolderLock | None):
        self.folder = folder
        self.manifest = manifest
        self.catalog = catalog
        self.store = store
        self._lock = lock
        self._seal_key = keyed_seal.writer_key() if lock is not None else None  # writers seal every manifest with it
        self._pending_rows: list[int] = []
        self._last_checkpoint = time.monotonic()
        self.problems: list[str] = []  # what a lenient open (verify) found instead of raising
        # Bytes at the start of the rows file (compressed stores) checked against the last seal when this writer opened:
        # the file is append-only until a compaction replaces it, so sealing re-hashes only what came after (10 GB at 10 M).
        self._rows_checked_bytes = 0
        self.interrupted = False  # a writer died before sealing the index: its complete cases are still whole
        self.writer_active = False  # a reader opened it while a writer works on it: counts and checksums are in flux
        self.transform_dropped = False
        try:
            self.transform = load_transform(folder, manifest)  # None: compare raw vectors, as indexes made before it did
        except IndexCorruptError:
            if lock is None:
                raise
            # A writer killed between writing a refitted transform and the manifest that pins it: fit again now (open).
            self.transform, self.transform_dropped = None, True
            manifest["transform"] = {key: manifest["transform"][key] for key in ("requested", "shrinkage")}
        if store.kind == "ivfpq":
            store.transform = self.transform  # what its codes encode (retrained with it; _maybe_retrain_codes)

    legacy = False  # written in a format older than BASE_VERSION: searched as it is, never changed
    seal_status = "ok"  # how the manifest's keyed seal stands with this machine's key (keyed_seal.status), set on open

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
        if self.seal_status == keyed_seal.FOREIGN:
            return (f"{keyed_seal.describe(self.manifest)} (a copy from elsewhere?): its checksums catch damage but not edits "
                    f"made outside CBIRSlicer; 'cbir index trust --index {self.folder}' checks it and seals it under this "
                    "machine's key")
        return None

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

    def _require_writer(self) -> None:
        if self._lock is None:
            raise CBIRError(f"{self.folder}: index opened read-only")

    def _begin_writing(self) -> None:
        """Say in the manifest that the files are about to change, before anything changes."""
        self.manifest["state"] = WRITING
        self._write_manifest()

    def _write_manifest(self) -> None:
        """The manifest written atomically, keyed-sealed under this machine's key and then checksummed (keyed_seal)."""
        write_json_atomically(os.path.join(self.folder, MANIFEST), seal(keyed_seal.sign(self.manifest, self._seal_key)))

    def checkpoint(self) -> None:
        """Save vectors atomically, then mark pending cases complete, then the manifest (still 'writing'); nothing else.

        Run at timed intervals while a build goes on, so it only saves: the structure (flat, HNSW, compressed) and the
        vector transform change at :meth:`commit`, so what they are does not depend on the machine's speed."""
        self._require_writer()
        self.store.save(os.path.join(self.folder, VECTORS))
        if self._pending_rows:
            with self.catalog.transaction():
                self.catalog.set_status(self._pending_rows, "complete")
            self._pending_rows = []
        self._save_manifest()
        self._last_checkpoint = time.monotonic()

    def commit(self) -> None:
        """The end of a unit of work (an add, a removal, a refresh, closing): the structure the index's size asks for
        (:meth:`_maybe_change_structure`), a checkpoint, then the vector transform refitted if the index has grown."""
        self._require_writer()
        self._maybe_change_structure()
        self.checkpoint()
        self._maybe_refit_transform()

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
        self.manifest["updated"] = now_utc()
        self.manifest["counts"] = self._counts()
        self.manifest["format_version"] = self._written_version()
        self.manifest["state"] = WRITING
        self._write_manifest()

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
        self._write_manifest()

    def allowed_items(self, filters: dict[str, str]) -> Allowed:
        """The ids of the items of the complete cases the filters allow (a field no case has raises ParameterError)."""
        return self.catalog.item_ids(self.catalog.case_rows_matching(filters))

    def excluded_ids(self) -> np.ndarray:
        """Ids in the vectors file that searches must not return: tombstones and unfinished cases."""
        pending = self.catalog.item_ids([c.row for c in self.catalog.cases(status="pending")])
        return np.union1d(self.catalog.tombstones(), pending).astype(np.int64)
