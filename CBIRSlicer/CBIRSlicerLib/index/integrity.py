"""What an index's manifest vouches for: the size and SHA-256 of every file it owns, per 4 MiB chunk, and of itself.

The manifest is sealed at each commit of the index: ``files`` maps each owned file's name to
``{"size", "chunk_bytes", "sha256": [one hex digest per chunk]}`` and ``self_sha256`` is the digest
of the manifest's canonical JSON without that key. Chunks let a check say where a file is damaged.
SQLite's journal, FAISS's temporary files and the folder lock are not owned data.
"""

from __future__ import annotations

import hashlib
import json
import os

from ..errors import IndexCorruptError

CHUNK_BYTES = 4 << 20
SEAL = "self_sha256"


class ChunkHasher:
    """SHA-256 of consecutive fixed-size chunks of a byte stream, fed in pieces of any size."""

    def __init__(self, chunk_bytes: int = CHUNK_BYTES):
        self.chunk_bytes = chunk_bytes
        self.digests: list[str] = []
        self.size = 0
        self._current = hashlib.sha256()
        self._filled = 0

    def update(self, data: bytes | memoryview) -> None:
        """Feed the next bytes of the stream."""
        view = memoryview(data)
        while len(view):
            take = min(len(view), self.chunk_bytes - self._filled)
            self._current.update(view[:take])
            self._filled += take
            self.size += take
            view = view[take:]
            if self._filled == self.chunk_bytes:
                self.digests.append(self._current.hexdigest())
                self._current, self._filled = hashlib.sha256(), 0

    def record(self) -> dict:
        """The manifest entry of what was fed: size, chunk size and the chunks' digests."""
        digests = self.digests + ([self._current.hexdigest()] if self._filled or not self.digests else [])
        return {"size": self.size, "chunk_bytes": self.chunk_bytes, "sha256": digests}


def file_record(path: str, chunk_bytes: int = CHUNK_BYTES, known: dict | None = None, known_bytes: int = 0) -> dict:
    """Size and per-chunk SHA-256 of a file; the whole chunks within its first ``known_bytes`` are taken from ``known``
    (its earlier record), for an append-only file whose start was checked against that record."""
    hasher = ChunkHasher(chunk_bytes)
    kept = 0
    if known and int(known.get("chunk_bytes", 0)) == chunk_bytes:
        kept = min(int(known_bytes), int(known.get("size", 0)), os.path.getsize(path)) // chunk_bytes
        kept = min(kept, len(known.get("sha256", [])))
    hasher.digests, hasher.size = list(known["sha256"][:kept]) if kept else [], kept * chunk_bytes
    with open(path, "rb") as handle:
        handle.seek(hasher.size)
        while True:
            block = handle.read(1 << 20)
            if not block:
                break
            hasher.update(block)
    return hasher.record()


def record_problem(path: str, recorded: dict, actual: dict) -> str | None:
    """Where a file differs from its manifest entry (size, or the first damaged chunk), or None when it matches."""
    if actual["size"] != recorded.get("size"):
        return f"{path}: holds {actual['size']} bytes, the manifest says {recorded.get('size')}"
    chunk = int(recorded.get("chunk_bytes", CHUNK_BYTES))
    if chunk != actual["chunk_bytes"]:
        return record_problem(path, recorded, file_record(path, chunk))
    bad = [n for n, (a, b) in enumerate(zip(actual["sha256"], recorded.get("sha256", []))) if a != b]
    if len(actual["sha256"]) != len(recorded.get("sha256", [])):
        bad = bad or [min(len(actual["sha256"]), len(recorded.get("sha256", [])))]
    if not bad:
        return None
    return (f"{path}: checksum differs from the manifest in {len(bad)} of {len(actual['sha256'])} chunk(s), first at bytes "
            f"{bad[0] * chunk}-{min(actual['size'], (bad[0] + 1) * chunk) - 1}: the file is damaged")


def _canonical(manifest: dict) -> bytes:
    return json.dumps({k: v for k, v in manifest.items() if k != SEAL}, sort_keys=True, separators=(",", ":")).encode()


def seal(manifest: dict) -> dict:
    """The manifest with its own checksum set."""
    manifest[SEAL] = hashlib.sha256(_canonical(manifest)).hexdigest()
    return manifest


def read_manifest(path: str, require_seal: bool = True) -> dict:
    """A manifest read and its seal checked; a truncated or altered one is an IndexCorruptError naming the file."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
        manifest = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise IndexCorruptError(f"{path}: damaged, not valid JSON ({str(error).splitlines()[0]})") from None
    if not isinstance(manifest, dict):
        raise IndexCorruptError(f"{path}: damaged, not a JSON object")
    recorded = manifest.get(SEAL)
    if recorded is None:
        if require_seal:
            raise IndexCorruptError(f"{path}: has no checksum of itself ({SEAL}); it was altered or is damaged")
        return manifest
    if hashlib.sha256(_canonical(manifest)).hexdigest() != recorded:
        raise IndexCorruptError(f"{path}: its checksum does not match its content; it was altered or is damaged")
    return manifest
