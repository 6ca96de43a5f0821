"""The one clock of stored times: UTC, ISO 8601, to the second (manifests, locks, labels, transforms, saved searches)."""

from __future__ import annotations

import datetime


def now_utc() -> str:
    """The time now, as stored: ``2025-01-31T12:00:00+00:00``."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
