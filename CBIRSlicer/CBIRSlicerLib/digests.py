"""File checksums: one place for how a file's content is fingerprinted (model weights, source volumes)."""

from __future__ import annotations

import hashlib


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
