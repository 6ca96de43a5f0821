"""What several ``cbir`` commands share: the progress line, the index state note, a labels CSV."""

from __future__ import annotations

import os
import sys

from ..errors import CBIRError


def progress_printer(what: str):
    """A progress callback drawing one updating line on a terminal, or a line per step otherwise."""
    import time

    began = time.monotonic()
    tty = sys.stderr.isatty()

    def show(done: int, total: int, label: str) -> None:
        elapsed = time.monotonic() - began
        rate = done / elapsed if elapsed > 0 and done else 0.0
        eta = f", {(total - done) / rate:.0f} s left" if rate > 0 and done < total else ""
        width = 24
        filled = int(width * done / total) if total else width
        line = f"{what} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{eta}  {os.path.basename(label)[:40]}"
        print(("\r" + line.ljust(100)) if tty else line, end="" if tty and done < total else "\n", file=sys.stderr, flush=True)

    return show


def state_note(index) -> None:
    """Tell the user (stderr) when an index is older, being written, or was interrupted."""
    note = index.state_note()
    if note:
        print(f"cbir: note: {index.folder}: {note}", file=sys.stderr)


def read_labels(path: str | None) -> dict[str, list[str]]:
    """path,label rows (several rows per path allowed) from a CSV file."""
    import csv

    if not path:
        return {}
    labels: dict[str, list[str]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            if "path" not in row or "label" not in row:
                raise CBIRError(f"{path}: labels CSV needs the columns path,label")
            labels.setdefault(os.path.abspath(row["path"]), []).append(row["label"])
    return labels
