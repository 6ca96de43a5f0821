"""What an index keeps of who a case is: by default no name, ID or birth date, only a keyed hash of the patient ID.

An index is often copied or shared. Retrieval needs to know which cases are the same patient (to
leave a query patient's other series out, for leave-one-patient-out evaluation), not who that is:
``patient_key`` is HMAC-SHA-256 of the patient ID under a key kept outside the index (the
environment variable ``CBIR_PATIENT_KEY``, else a random key made once in the user's config
folder), so the same patient gets the same key on this site and nobody holding only the index can
reverse it. Building with ``--keep-patient-ids`` (pinned in the manifest) keeps the header values too.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets

from ..atomic import replaced

KEY_VARIABLE = "CBIR_PATIENT_KEY"
IDENTIFYING = ("patient_id", "patient_name", "patient_birth_date")
HASHED, KEPT = "keyed-hash", "kept"


def key_path() -> str:
    """Where the site's patient key lives when the environment does not give one."""
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "cbirslicer", "patient-key")


def patient_key_secret() -> bytes:
    """The key for patient hashes: the environment's, else the config file's (made on first use, readable by the user only)."""
    given = os.environ.get(KEY_VARIABLE)
    if given:
        return given.encode()
    path = key_path()
    if not os.path.isfile(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with replaced(path, exclusive=True) as temporary:  # whole or not at all; a key another process made first wins
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(32))
    with open(path) as handle:
        return handle.read().strip().encode()


def patient_key(patient_id: str, secret: bytes | None = None) -> str:
    """The keyed hash stored in place of a patient ID."""
    return hmac.new(secret or patient_key_secret(), patient_id.strip().encode(), hashlib.sha256).hexdigest()[:32]


def private_metadata(metadata: dict, policy: str = HASHED) -> dict:
    """Header metadata as the index stores it: identifying fields replaced by ``patient_key`` unless kept on purpose."""
    kept = {k: v for k, v in metadata.items() if k not in IDENTIFYING or policy == KEPT}
    if metadata.get("patient_id"):
        kept["patient_key"] = patient_key(str(metadata["patient_id"]))
    return kept
