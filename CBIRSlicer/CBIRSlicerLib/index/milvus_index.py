"""An index held by Milvus (a server, or a milvus-lite file): :class:`MilvusIndex` creates, opens, writes and checks it.

It answers what the folder's :class:`folder.Index` answers (:mod:`searchable`), so searching, placement, feedback,
suggestions, saved searches and the module work on it unchanged, and it reuses the folder writer's logic of which
cases to add, skip, replace or remove (:class:`writer.IndexWriter`); what differs is where things are kept
(:mod:`milvus_collections`, :mod:`milvus_catalog`, :mod:`milvus_vectors`; its own records in
:mod:`milvus_records`) and how a commit is made:

* **The manifest** is the folder's (format, model fingerprint and digest, slicing settings, index type, privacy, counts,
  state, the pinned vector transform), plus ``store`` (Milvus, the collection), ``committed_row`` (the watermark readers
  search below) and sealed with the same checksum of itself; it is a record in the index's meta collection. The items
  collection also carries the model digest as a collection property, so ``verify`` checks what the server holds against
  the manifest. The fitted transform's ``.npz`` bytes are a record named by their checksum, written before the manifest
  that pins them (a reader never meets a pin without its transform).
* **One writer at a time**: a lease record (holder, token, heartbeat every few seconds from a thread) instead of the
  folder's OS lock; a lease not renewed for ``CBIR_MILVUS_LEASE_SECONDS`` (60) belonged to a writer that died. A
  milvus-lite file is opened by one process at a time anyway.
* **Resumable**: a case is written pending, then its thumbnails and items; a checkpoint marks the pending cases complete
  and moves the watermark. A writer that opens the index purges pending cases (a killed writer's), so a build run again
  after a crash or a server restart adds each case once. Ids are reserved ahead in a record, never reused.
"""

from __future__ import annotations

import base64
import os
import time
from types import TracebackType
from typing import Any

import numpy as np

from ..clock import now_utc
from ..errors import CBIRError, IndexCorruptError, InputError, ParameterError
from ..models.base import Embedder
from . import privacy, vector_transform
from .catalog import CaseRecord, ItemRecord
from .faiss_store import vector_problem
from .files import BASE_VERSION, CLEAN, FORMAT, WRITING
from .integrity import SEAL, seal
from .items import IndexSettings
from .milvus_catalog import MilvusCatalog
from .milvus_collections import CollectionNames, MilvusCollections, vector_index
from .milvus_connection import MilvusConnection, MilvusLocation, parse_location
from .milvus_records import (
    DIGEST_PROPERTY,
    LAYOUT,
    RESERVE_ITEMS,
    RESERVE_ROWS,
    WriterLease,
    lease_seconds,
    read_manifest,
    transform_record,
)
from .milvus_vectors import MilvusVectors
from .searchable import CaseFilter
from .verify import verify
from .writer import IndexWriter


class MilvusIndex(IndexWriter):
    """An index in Milvus collections. Open with :meth:`create` or :meth:`open` (or :func:`location.open_index`)."""

    # The folder writer's logic over the server's catalog, vectors and lease: they answer as the folder's do (what
    # searchable.CatalogView and VectorView name, and what the writer calls) without being the folder's classes.
    catalog: MilvusCatalog  # type: ignore[assignment]
    store: MilvusVectors  # type: ignore[assignment]
    _lock: WriterLease | None  # type: ignore[assignment]

    def __init__(self, location: MilvusLocation, collections: MilvusCollections, manifest: dict[str, Any], writable: bool):
        self.location = location
        self.folder = location.display
        self.manifest = manifest
        self.collections = collections
        self.catalog = MilvusCatalog(collections, readonly=not writable)
        self.store = MilvusVectors(collections, manifest["index_type"]["current"], {})
        self._lock: WriterLease | None = WriterLease(self.catalog, location) if writable else None
        self._pending_rows: list[int] = []
        self._last_checkpoint = time.monotonic()
        self.problems: list[str] = []
        self._rows_checked_bytes = 0
        self.interrupted = False
        self.writer_active = False
        collections.committed_row = int(manifest.get("committed_row", 0))
        collections.manifest_seen = time.monotonic()
        if not writable:
            collections.refresh = self._refresh
        self.transform = None
        self.reserved = dict(manifest.get("allocation") or {"row": 1, "item": 1})
        self._committed: dict[str, int] | None = {"cases": 0, "items": 0} if writable else None  # counted at open

    # ----- opening --------------------------------------------------------------------------------
    @classmethod
    def create(cls, where: str, embedder: Embedder, settings: IndexSettings, index_type: str = "auto",
               keep_patient_ids: bool = False) -> MilvusIndex:
        """A new, empty index in collections that do not exist yet."""
        location = parse_location(where)
        settings = settings.resolved(embedder)
        if settings.region_strategy == "dense" and not embedder.supports_dense:
            raise InputError(location.display, f"model '{embedder.name}' has no dense features; use region strategy 'crops'")
        kind, index_params = vector_index(index_type, location.local_path is not None)
        collections = MilvusCollections(MilvusConnection(location), CollectionNames(location.collection), embedder.dim)
        if collections.exists():
            collections.connection.close()
            raise InputError(location.display, "already holds an index; use 'cbir index add' to extend it")
        digest = embedder.fingerprint.digest()
        collections.create(index_params, {DIGEST_PROPERTY: digest, "cbirslicer.format": FORMAT})
        manifest = {
            "format": FORMAT, "format_version": BASE_VERSION, "created": now_utc(), "updated": now_utc(),
            "model": {"name": embedder.name, "digest": digest, "fingerprint": embedder.fingerprint.as_dict()},
            "settings": settings.as_dict(), "index_type": {"requested": index_type, "current": kind},
            "privacy": {"patient_ids": privacy.KEPT if keep_patient_ids else privacy.HASHED},
            "counts": {"cases": 0, "items": 0, "vectors": 0, "tombstones": 0}, "state": WRITING,
            "transform": {"requested": vector_transform.DEFAULT_KIND, "shrinkage": vector_transform.SHRINKAGE},
            "store": {"kind": "milvus", "layout": LAYOUT, "collection": location.collection, "vector_index": index_params},
            "committed_row": 0, "allocation": {"row": 1, "item": 1},
        }
        index = cls(location, collections, manifest, writable=True)
        try:
            if index._lock is not None:  # always: a new index is opened for writing
                index._lock.acquire()
            index.catalog.set_meta("identity", index._identity())
            index._reserve(1, 1)
            index._save_manifest()
        except BaseException:
            index._close_connection()
            raise
        return index

    @classmethod
    def open(cls, where: str, writable: bool = False, strict: bool = True) -> MilvusIndex:
        """Open an existing index, checking its manifest's seal and format, the server's vector size and model digest
        against it, and (clean) the counts; a writer takes the lease, purges a killed writer's pending cases and refits."""
        location = parse_location(where)
        collections = MilvusCollections(MilvusConnection(location), CollectionNames(location.collection), 0)
        try:
            if not collections.exists():
                raise InputError(location.display, f"holds no CBIRSlicer index (no collection '{location.collection}'); build one "
                                                   f"with 'cbir index build SOURCES --index {location.display}'")
            collections.load()
            manifest = read_manifest(MilvusCatalog(collections, readonly=True), location)
            collections.dim = int(manifest["model"]["fingerprint"]["dim"])
            index = cls(location, collections, manifest, writable)
            index._check(strict)
            if index._lock is not None:  # writable
                index._lock.acquire()
        except BaseException:
            collections.connection.close()
            raise
        try:
            if writable:
                index._begin_writing()
                index._purge_pending()
            index._load_transform(writable)
            if writable:
                index._maybe_refit_transform()
        except BaseException:
            index._abandon()
            raise
        return index

    def _check(self, strict: bool) -> None:
        """The cheap facts: the server's vector size and model digest, and (a clean index) the counts."""
        def problem(text: str) -> None:
            if strict:
                raise IndexCorruptError(f"{text}; see 'cbir index verify --index {self.folder}'")
            self.problems.append(text)

        found = self.collections.properties()
        if found.get("vector_dim") != self.collections.dim:
            problem(f"{self.folder}: the server holds vectors of {found.get('vector_dim')} dimensions, the manifest's model "
                    f"{self.collections.dim}")
        if found.get(DIGEST_PROPERTY) not in (None, self.manifest["model"]["digest"]):
            problem(f"{self.folder}: the server's collection was made for model {found.get(DIGEST_PROPERTY)}, the manifest "
                    f"says {self.manifest['model']['digest']}")
        state = self.manifest.get("state", CLEAN)
        self.writer_active = state == WRITING and self._lock is None and self._lease_alive()
        self.interrupted = state == WRITING and not self.writer_active
        if state == CLEAN:
            counts = self.manifest.get("counts", {})
            actual = {"cases": self.catalog.count("cases"), "items": self.catalog.count("items")}
            differ = [f"{k} {counts.get(k)} in the manifest, {v} on the server" for k, v in actual.items() if counts.get(k) != v]
            if differ:
                problem(f"{self.folder}: counts disagree: " + "; ".join(differ))

    def _lease_alive(self) -> bool:
        found = self.catalog.meta("writer")
        return found is not None and time.time() - float(found.get("beat", 0)) < lease_seconds()

    def _load_transform(self, writable: bool) -> None:
        pinned = self.manifest.get("transform") or {}
        self.transform = None
        if "checksum" not in pinned or pinned.get("kind") == "identity":
            return
        name = transform_record(pinned["checksum"])
        stored = self.catalog.meta(name)
        try:
            if stored is None:
                raise IndexCorruptError(f"{self.folder}: the record {name} is missing, though the manifest pins a "
                                        f"{pinned.get('kind')} vector transform; open the index for writing ('cbir index add') "
                                        "to fit it again")
            self.transform = vector_transform.from_bytes(base64.b64decode(stored["npz"]), pinned, self.collections.dim,
                                                         f"{self.folder} ({name})")
        except IndexCorruptError:
            if not writable:
                raise
            self.transform = None  # refitted by the writer now (open)
            self.manifest["transform"] = {key: pinned[key] for key in ("requested", "shrinkage")}

    def _refresh(self) -> None:
        """A reader's look at the manifest: the watermark (cases committed since it opened) and whether it changed."""
        self.collections.manifest_seen = time.monotonic()
        manifest = read_manifest(self.catalog, self.location)
        if manifest.get(SEAL) == self.manifest.get(SEAL):
            return
        self.collections.cases.clear()  # a label may have changed (a case's items and vectors never do)
        refitted = (manifest.get("transform") or {}).get("checksum") != (self.manifest.get("transform") or {}).get("checksum")
        self.manifest = manifest
        if refitted:
            self._load_transform(False)
        self.collections.committed_row = int(manifest.get("committed_row", 0))

    # ----- what the folder's upkeep did, on the server ---------------------------------------------
    def _reserve(self, row: int, item: int) -> None:
        """Make sure ids below (row, item) are reserved for this writer (a record, ahead of use, never given twice)."""
        if row < self.reserved["row"] and item < self.reserved["item"]:
            return
        self.reserved = {"row": max(self.reserved["row"], row + RESERVE_ROWS), "item": max(self.reserved["item"], item + RESERVE_ITEMS)}
        self.catalog.set_meta("allocation", self.reserved)

    def _begin_writing(self) -> None:
        """Say in the manifest that the index is about to change; continue the ids after everything ever reserved."""
        stored = self.catalog.meta("allocation") or self.manifest.get("allocation") or {"row": 1, "item": 1}
        self.catalog.next_row, self.catalog.next_item = int(stored["row"]), int(stored["item"])
        self.reserved = {"row": self.catalog.next_row, "item": self.catalog.next_item}
        self.catalog.reserve = self._reserve
        self._reserve(self.catalog.next_row, self.catalog.next_item)
        self.manifest["state"] = WRITING
        self.catalog.set_meta("manifest", seal(self.manifest))

    def _purge_pending(self) -> None:
        """Remove a killed writer's pending cases, and any item whose case row is gone (a delete cut short); then count
        what is committed (every item left)."""
        pending = [c.row for c in self.catalog.cases(status="pending") if c.row is not None]
        if pending:
            self.catalog.delete_cases(pending)
        kept = [c.row for c in self.catalog.cases(status=None) if c.row is not None and c.row > self.collections.committed_row]
        condition = f"case_row > {self.collections.committed_row}"
        if kept:
            condition += f" and case_row not in [{','.join(map(str, kept))}]"
        self.collections.delete(self.collections.names.items, condition, "removing orphaned items")
        self._committed = {"cases": self.catalog.count("cases"), "items": self.catalog.count("items")}
        if pending:
            self._save()

    def _remove_rows(self, rows: list[int]) -> None:
        committed = [r for r in rows if r not in self._pending_rows and r <= self.collections.committed_row]
        if self._committed is not None and committed:
            self._committed["cases"] -= len(committed)
            self._committed["items"] -= len(self.catalog.item_ids(committed))
        self.catalog.delete_cases(rows)
        self._pending_rows = [r for r in self._pending_rows if r not in rows]

    def _store_case(self, record: CaseRecord, items: list[ItemRecord], vectors: np.ndarray, digest: str | None,
                    thumbnails: dict[tuple[str, int], np.ndarray] | None = None) -> int:
        """Write a case (pending), its thumbnails and its items with their vectors; the next checkpoint completes it."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(items), self.collections.dim):
            raise ValueError(f"expected ({len(items)}, {self.collections.dim}) vectors, got {vectors.shape}")
        bad = vector_problem(vectors) if len(vectors) else None
        if bad:
            raise ParameterError(f"the model returned {bad}; nothing of this volume was stored")
        row = self.catalog.add_case(record, time.time(), digest)
        if thumbnails:
            self.catalog.add_thumbnails(row, thumbnails)
        self.catalog.add_items(row, items, vectors)
        self._pending_rows.append(row)
        return row

    def checkpoint(self) -> None:
        """Mark the pending cases complete, then move the watermark readers search below (the manifest, still 'writing')."""
        self._require_writer()
        if self._pending_rows:
            if self._committed is not None:  # always, for a writer
                self._committed["cases"] += len(self._pending_rows)
                self._committed["items"] += len(self.catalog.item_ids(self._pending_rows))
            self.catalog.set_status(self._pending_rows, "complete")
            self.manifest["committed_row"] = max(int(self.manifest.get("committed_row", 0)), *self._pending_rows)
            self.collections.committed_row = self.manifest["committed_row"]
            self._pending_rows = []
        self._save_manifest()
        self._last_checkpoint = time.monotonic()

    def _maybe_change_structure(self) -> None:
        """Nothing: the server keeps its own index structure and compacts deletions itself."""

    def compact(self, kind: str | None = None) -> None:
        """Ask the server to compact its segments (deleted entities dropped)."""
        self._require_writer()
        try:
            self.collections.call("compacting", "compact", self.collections.names.items)
        except CBIRError:  # milvus-lite compacts on its own schedule
            pass

    def _maybe_retrain_codes(self) -> None:
        """Nothing: the server's index encodes raw vectors."""

    def _maybe_refit_transform(self) -> None:
        """Fit the vector transform on the committed vectors when none is fitted or the index has doubled since (as the
        folder does, on the same sample of the same ids), its bytes kept in a record before the manifest pins them."""
        pinned = self.manifest.get("transform")
        if pinned is None:
            return
        live = self.catalog.item_ids()
        if not vector_transform.needs_refit(pinned, len(live)):
            return
        from ..threads import one_blas_thread

        sample = live[vector_transform.sample_rows(len(live))]
        with one_blas_thread():
            fitted = vector_transform.fit(self.store.reconstruct(sample), pinned["requested"], pinned["shrinkage"], count=len(live))
        entry = fitted.manifest_entry()
        entry.pop("file", None)
        self.catalog.set_meta(transform_record(entry["checksum"]), {"npz": base64.b64encode(fitted.to_bytes()).decode()})
        old = (self.manifest.get("transform") or {}).get("checksum")
        self.manifest["transform"] = {"requested": pinned["requested"], "shrinkage": pinned["shrinkage"], **entry,
                                      "record": transform_record(entry["checksum"])}
        self.transform = None if fitted.kind == "identity" else fitted
        self._save_manifest()
        if old and old != entry["checksum"]:
            self.catalog.delete_meta(transform_record(old))

    def _save(self) -> None:
        self._save_manifest()

    def _counts(self) -> dict[str, Any]:
        """Complete cases and their items: a writer keeps them as it commits and removes (a filtered count is a scan on
        milvus-lite); a reader asks (the items then include a running writer's pending ones)."""
        if self._committed is not None:
            cases, items = self._committed["cases"], self._committed["items"]
        else:
            cases, items = self.catalog.count("cases"), self.catalog.count("items")
        return {"cases": cases, "items": items, "vectors": items, "tombstones": 0}

    def _save_manifest(self) -> None:
        """The manifest of work in progress: counts so far, the watermark, state 'writing'."""
        self.manifest["updated"] = now_utc()
        self.manifest["counts"] = self._counts()
        self.manifest["allocation"] = dict(self.reserved)
        self.manifest["state"] = WRITING
        self.catalog.set_meta("manifest", seal(self.manifest))

    def _seal_manifest(self) -> None:
        """Commit: the counts, the ids given out, state 'clean', and the seal."""
        self.manifest["updated"] = now_utc()
        self.manifest["counts"] = self._counts()
        self.manifest["allocation"] = {"row": self.catalog.next_row, "item": self.catalog.next_item}
        self.manifest["state"] = CLEAN
        self.catalog.set_meta("allocation", self.manifest["allocation"])
        self.catalog.set_meta("manifest", seal(self.manifest))

    def own_file(self, name: str) -> None:
        raise ParameterError(f"{self.folder}: a Milvus-backed index owns no files")

    def excluded_ids(self) -> np.ndarray:
        """Ids searches must not return: items of cases above the watermark (a writer's work in progress)."""
        found = self.collections.query(self.collections.names.items, f"case_row > {int(self.collections.committed_row)}",
                                       ["id"], "reading item ids")
        return np.sort(np.array([int(e["id"]) for e in found], np.int64))

    def allowed_items(self, filters: dict[str, str]) -> CaseFilter:
        """The filters as a condition the server evaluates inside its search (a field no case has raises ParameterError)."""
        return self.catalog.case_filter(filters)

    # ----- closing ----------------------------------------------------------------------------------
    def close(self) -> None:
        """Commit pending work and seal the manifest (writers), release the lease, close the connection."""
        try:
            if self._lock is not None:
                self.checkpoint()
                self._seal_manifest()
                self._lock.release()
                self._lock = None
        finally:
            self._close_connection()

    def _abandon(self) -> None:
        """Leave without committing: pending cases stay pending (the next writer purges them)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self._close_connection()

    def _close_connection(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        self.collections.connection.close()

    def __enter__(self) -> MilvusIndex:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        if kind is not None and self._lock is not None:
            if issubclass(kind, CBIRError) and not issubclass(kind, (IndexCorruptError,)) and not _server_gone(value):
                try:  # a refusal: drop what is unfinished and seal the rest, as the folder does
                    self.catalog.delete_cases(self._pending_rows)
                    self._pending_rows = []
                    self.close()
                    return
                except CBIRError:
                    pass
            self._abandon()
            return
        self.close()

    # ----- describing and checking -----------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What the index is: model, settings, type, counts, size (a local milvus-lite file's; None on a server), state."""
        size = None
        if self.location.local_path is not None:
            size = sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(self.location.local_path)
                       for name in names)
        counts = self._counts()
        return {"folder": self.folder, "model": self.manifest["model"]["name"], "model_digest": self.manifest["model"]["digest"],
                "dim": self.fingerprint["dim"], "created": self.manifest["created"], "updated": self.manifest["updated"],
                "index_type": self.store.kind, "settings": self.manifest["settings"], "transform": self.manifest.get("transform"),
                "counts": counts, "bytes": size,
                "bytes_per_case": round(size / counts["cases"]) if size and counts["cases"] else None,
                "format_version": self.manifest["format_version"], "state": self.state_note() or "clean",
                "patient_ids": self.privacy_policy, "store": "milvus"}

    def state_note(self) -> str | None:
        """A line for the user when the index is not simply clean (being written, interrupted)."""
        if self.writer_active:
            return "being written by another process: counts may change and readers see the cases committed so far"
        if self.interrupted:
            return ("a writer stopped before finishing; its committed cases are whole, the rest is removed by the next "
                    f"'cbir index add --index {self.folder}'")
        return None

    def verify(self, check_sources: bool = True) -> list[str]:
        """Problems found: the server's vector size and model digest against the manifest, every vector finite and unit,
        every item with a complete case and every complete case's items committed, counts against the server's, and
        (unless told not to) the source files."""
        problems = verify(self, check_sources)
        found = self.collections.properties()
        if found.get(DIGEST_PROPERTY) != self.manifest["model"]["digest"]:
            problems.append(f"{self.folder}: the server's collection says model {found.get(DIGEST_PROPERTY)}, the manifest "
                            f"{self.manifest['model']['digest']}")
        stored = self.collections.count(self.collections.names.items)
        if self.manifest.get("state") == CLEAN and stored != self.manifest["counts"]["items"]:
            problems.append(f"{self.folder}: the server holds {stored} items, the manifest counts {self.manifest['counts']['items']}")
        rows = {c.row for c in self.catalog.cases(status=None)}
        orphans = self.collections.count(self.collections.names.items, f"case_row not in [{','.join(map(str, rows))}]"
                                         if rows else "id >= 0")
        if orphans:
            problems.append(f"{self.folder}: {orphans} item(s) belong to no case")
        pinned = self.manifest.get("transform") or {}
        if "checksum" in pinned and pinned.get("kind") != "identity" and self.transform is None:
            problems.append(f"{self.folder}: the pinned vector transform ({pinned.get('kind')}) could not be loaded")
        return problems


def drop_if_empty(where: str) -> None:
    """Drop an index's collections when it holds no complete case (a first build that failed); a milvus-lite file made for
    it goes too. Nothing happens when the server cannot be asked (the next build tidies, as after a crash)."""
    import shutil

    location = parse_location(where)
    collections = MilvusCollections(MilvusConnection(location), CollectionNames(location.collection), 0)
    try:
        if not collections.exists() or MilvusCatalog(collections, readonly=True).count("cases"):
            return
        collections.drop()
        left = set(collections.call("listing collections", "list_collections"))
    except CBIRError:
        return
    finally:
        collections.connection.close()
    if location.local_path is not None and not left:
        shutil.rmtree(location.local_path, ignore_errors=True)


def _server_gone(error: BaseException | None) -> bool:
    from ..errors import StoreUnavailableError

    return isinstance(error, StoreUnavailableError)
