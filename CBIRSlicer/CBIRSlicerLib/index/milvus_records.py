"""The records a Milvus-backed index keeps of itself on the server (meta collection): the manifest, read with its seal,
format and layout checked; the writer's lease (one writer at a time, renewed by a heartbeat thread, taken over once
stale); the ids reserved ahead of use; the name of the fitted transform's record."""

from __future__ import annotations

import copy
import os
import socket
import threading
import time
import uuid
from typing import Any

from ..clock import now_utc
from ..errors import CBIRError, IndexCorruptError, IndexLockedError, IndexMismatchError, ParameterError
from .files import FORMAT
from .integrity import SEAL, seal
from .items import IndexSettings
from .milvus_catalog import MilvusCatalog
from .milvus_connection import MilvusLocation

LAYOUT = 1  # the collections' layout (milvus_catalog); a newer one is refused
LEASE_VARIABLE = "CBIR_MILVUS_LEASE_SECONDS"
DEFAULT_LEASE_SECONDS = 60.0
RESERVE_ROWS, RESERVE_ITEMS = 1_024, 1 << 20  # ids reserved ahead of use, so a crash never lets two writers share one
DIGEST_PROPERTY = "cbirslicer.model_digest"
_writing_here: set[str] = set()  # indexes this process holds the lease of (a second writer here is refused at once)


def lease_seconds() -> float:
    """How long a writer's lease lasts without a heartbeat (CBIR_MILVUS_LEASE_SECONDS, default 60)."""
    try:
        return max(1.0, float(os.environ.get(LEASE_VARIABLE, DEFAULT_LEASE_SECONDS)))
    except ValueError:
        raise ParameterError(f"{LEASE_VARIABLE} must be a number of seconds") from None


class WriterLease:
    """The one-writer rule on a server: a lease record renewed by a heartbeat thread, taken over only once it is stale."""

    def __init__(self, catalog: MilvusCatalog, location: MilvusLocation):
        self.catalog, self.location = catalog, location
        self.token = uuid.uuid4().hex
        self.holder = f"process {os.getpid()} on {socket.gethostname()} since {now_utc()}"
        self.seconds = lease_seconds()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.key = f"{location.uri}#{location.collection}"

    def current(self) -> dict[str, Any] | None:
        """The lease record as stored, if a live writer holds it."""
        found = self.catalog.meta("writer")
        if not found or found.get("token") == self.token:
            return found
        alive = time.time() - float(found.get("beat", 0)) < self.seconds
        # A milvus-lite file is held by one process (its own file lock): a lease left in it is a dead process's.
        return found if alive and self.location.local_path is None else None

    def acquire(self) -> None:
        """Take the lease, or IndexLockedError naming the holder."""
        if self.key in _writing_here:
            raise IndexLockedError(f"{self.location.display}: the index is being written by this process already "
                                   "(only one writer at a time)")
        found = self.current()
        if found and found.get("token") != self.token:
            raise IndexLockedError(f"{self.location.display}: the index is being written by {found.get('holder')}; wait for it to "
                                   "finish (only one writer at a time)")
        self._beat()
        if self.location.local_path is None:
            time.sleep(0.3)  # two writers that read 'free' at once: the later write wins, the other sees it and stands back
            found = self.catalog.meta("writer")
            if not found or found.get("token") != self.token:
                raise IndexLockedError(f"{self.location.display}: the index is being written by "
                                       f"{(found or {}).get('holder', 'another process')}; wait for it to finish")
        _writing_here.add(self.key)
        self._thread = threading.Thread(target=self._renew, name="cbir-milvus-lease", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        self.catalog.set_meta("writer", {"holder": self.holder, "token": self.token, "beat": time.time()})

    def _renew(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                self._beat()
            except CBIRError:  # the server is away: the writer's own calls say so; the lease lapses if it stays away
                pass

    def release(self) -> None:
        """Stop renewing and remove the lease (if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        _writing_here.discard(self.key)
        try:
            found = self.catalog.meta("writer")
            if found and found.get("token") == self.token:
                self.catalog.delete_meta("writer")
        except CBIRError:  # the server is away: the lease lapses by itself
            pass


def transform_record(checksum: str) -> str:
    """The meta record holding a fitted transform's bytes."""
    return f"transform:{checksum}"


def read_manifest(catalog: MilvusCatalog, location: MilvusLocation) -> dict[str, Any]:
    """The index's manifest record, its seal and format checked."""
    manifest = catalog.meta("manifest")
    where = f"{location.display} (record 'manifest')"
    if not isinstance(manifest, dict):
        raise IndexCorruptError(f"{where}: missing; the collections hold no CBIRSlicer manifest")
    if manifest.get("format") != FORMAT:
        raise IndexCorruptError(f"{where}: not a CBIRSlicer index manifest")
    recorded = manifest.get(SEAL)
    if recorded is None or seal(copy.deepcopy(manifest))[SEAL] != recorded:
        raise IndexCorruptError(f"{where}: its checksum does not match its content; it was altered or is damaged")
    store = manifest.get("store") or {}
    if store.get("kind") != "milvus" or int(store.get("layout", 0)) > LAYOUT:
        raise IndexMismatchError(f"{location.display}: written by a newer CBIRSlicer (Milvus layout {store.get('layout')}, this one "
                                 f"reads up to {LAYOUT}); update CBIRSlicer to use it")
    try:
        int(manifest["model"]["fingerprint"]["dim"])
        IndexSettings.from_stored(manifest["settings"])
        manifest["index_type"]["current"]
    except (KeyError, TypeError, ValueError, CBIRError) as error:
        raise IndexCorruptError(f"{where}: lacks or garbles {error}") from None
    return manifest
