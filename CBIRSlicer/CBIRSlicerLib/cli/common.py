"""What several ``cbir`` commands share: the parser, option values checked as they are parsed, the progress line, the
index state note, a labels CSV."""

from __future__ import annotations

import argparse
import math
import os
import sys

from ..errors import CBIRError
from ..imaging.slicing import MAX_MARGIN_MM  # noqa: F401 (the bounds the commands check their options against)
from ..retrieval.ranking import MAX_RESULTS  # noqa: F401


class Parser(argparse.ArgumentParser):
    """argparse's parser with its errors in one line (the problem and where to read the options), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def whole_number(low: int, high: int, why: str = ""):
    """An argparse type: a whole number from ``low`` to ``high`` (``why``: what the bounds are for, said when refused)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is outside {low}..{high}{why}")
        return value

    parse.__name__ = "whole number"
    return parse


def number(low: float, high: float, unit: str = "", low_open: bool = False, why: str = ""):
    """An argparse type: a finite number from ``low`` to ``high`` (``low_open``: ``low`` itself refused), in ``unit``."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
        inside = (value > low if low_open else value >= low) and value <= high
        if not math.isfinite(value) or not inside:
            bound = f"{'more than' if low_open else 'from'} {low:g}{unit} {'and at most' if low_open else 'to'} {high:g}{unit}"
            raise argparse.ArgumentTypeError(f"{text} must be {bound}{why}")
        return value

    parse.__name__ = "number"
    return parse


def sizes_mm(option: str, high: float = 1000.0):
    """An argparse type: comma-separated sizes in mm, each more than 0 and at most ``high`` ('' for none)."""
    def parse(text: str) -> str:
        for part in (t for t in text.split(",") if t.strip()):
            number(0.0, high, " mm", low_open=True)(part.strip())
        return text

    parse.__name__ = f"{option} sizes"
    return parse


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
