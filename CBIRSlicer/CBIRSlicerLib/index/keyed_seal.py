"""The manifest's keyed seal: an HMAC of the manifest under a key kept outside the index, so that an index edited by hand
and re-sealed with its public checksum is refused where the key is.

The manifest's own checksum (``self_sha256``, :mod:`integrity`) and the files' checksums it lists catch damage, but anyone
can compute them again after editing a catalog. A writer therefore also seals each manifest with HMAC-SHA-256 under this
machine's seal key (the environment variable ``CBIR_SEAL_KEY``, else a random key made by the first writer in the user's
config folder, readable by the user only, as the patient key of :mod:`privacy`), stored as ``keyed_seal: {key_id, hmac}``;
``key_id`` names the key (a hash of it), never the key.

What each side does (``status``):

* ``ok``: sealed under this machine's key, and it matches.
* ``altered``: sealed under this machine's key, and it does not match: edited outside CBIRSlicer. Refused by readers,
  writers and verify alike.
* ``foreign``: sealed under another key, or not keyed at all (an index from another machine or user, one written before
  keyed seals, or one whose keyed seal was stripped). It must still open (copies are how indexes travel, and its
  checksums still catch damage): readers open it with a note, ``verify`` calls it a problem (it cannot vouch that nobody
  edited it), writers refuse it until ``cbir index trust`` has checked every file and sealed it under this key; sealing it
  on a write would vouch for what nobody checked.
* ``unchecked``: no seal key on this machine (a reader who never wrote an index, a read-only account): nothing to check
  with, so readers say nothing and ``verify`` notes it.

Readers never make a key (they write nothing); the first writer does.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from typing import Any

from ..atomic import replaced
from ..errors import CBIRError

KEY_VARIABLE = "CBIR_SEAL_KEY"
FIELD = "keyed_seal"
OK, ALTERED, FOREIGN, UNCHECKED = "ok", "altered", "foreign", "unchecked"
_UNSIGNED = ("self_sha256", FIELD)  # the parts of the manifest the HMAC does not cover: the seals themselves


def key_path() -> str:
    """Where this user's seal key lives when the environment does not give one."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "cbirslicer", "seal-key")


def _read_key() -> bytes | None:
    given = os.environ.get(KEY_VARIABLE)
    if given:
        return given.encode()
    try:
        with open(key_path()) as handle:
            return handle.read().strip().encode() or None
    except OSError:
        return None


def reader_key() -> bytes | None:
    """This machine's seal key, or None where there is none (readers never make one)."""
    return _read_key()


def writer_key() -> bytes:
    """This machine's seal key, made (random, readable by the user only) if there is none yet."""
    key = _read_key()
    if key is not None:
        return key
    path = key_path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with replaced(path, exclusive=True) as temporary:  # whole or not at all; a key another process made first wins
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32))
    except OSError as error:  # a read-only home: the writer cannot seal, so it must not write
        raise CBIRError(f"{path}: the seal key for the indexes you write cannot be made ({error.strerror or error}); set "
                        f"{KEY_VARIABLE} (or XDG_CONFIG_HOME to a folder you may write)") from None
    return _read_key() or b""


def key_id(key: bytes) -> str:
    """A public name of a key (not the key): which key sealed an index."""
    return hashlib.sha256(b"cbirslicer seal key id\0" + key).hexdigest()[:16]


def _mac(manifest: dict[str, Any], key: bytes) -> str:
    body = json.dumps({k: v for k, v in manifest.items() if k not in _UNSIGNED}, sort_keys=True, separators=(",", ":"))
    return hmac.new(key, b"cbirslicer manifest\0" + body.encode(), hashlib.sha256).hexdigest()


def sign(manifest: dict[str, Any], key: bytes | None = None) -> dict[str, Any]:
    """The manifest with its keyed seal set (under ``key``, default this machine's writer key); seal it after this."""
    key = key if key is not None else writer_key()
    manifest[FIELD] = {"key_id": key_id(key), "hmac": _mac(manifest, key)}
    return manifest


def status(manifest: dict[str, Any], key: bytes | None) -> str:
    """How the manifest's keyed seal stands with ``key`` (this machine's, or None): OK, ALTERED, FOREIGN or UNCHECKED."""
    if key is None:
        return UNCHECKED
    found = manifest.get(FIELD)
    if not isinstance(found, dict) or found.get("key_id") != key_id(key):
        return FOREIGN
    return OK if hmac.compare_digest(str(found.get("hmac", "")), _mac(manifest, key)) else ALTERED


def describe(manifest: dict[str, Any]) -> str:
    """Which key sealed the manifest, in words (for notes and info)."""
    found = manifest.get(FIELD)
    if isinstance(found, dict) and isinstance(found.get("key_id"), str):
        shown = found["key_id"][:16]
        return f"sealed under another key (id {shown if all(c in '0123456789abcdef' for c in shown) else 'malformed'})"
    return "not sealed under any key"
