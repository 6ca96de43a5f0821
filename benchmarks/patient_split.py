"""The one split of the real head-and-neck patients into a tuning part and a reporting part.

Every benchmark and every method tuned on ``real/head-neck-ct`` uses this split, so that no figure reported comes
from a patient that anything was tuned on. The rule depends on the patient's id alone (not on the order of the
files, the number of patients present or the machine): a patient reports when the first 8 hex digits of the
SHA-256 of its id (``train_pt_N``, as in ``cases.csv``) make an odd number, and tunes when they make an even
one. Of the 170 patients here, 104 tune and 66 report.

    python benchmarks/patient_split.py      # print both parts
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

TUNING = "tuning"
REPORTING = "reporting"
_CASE = re.compile(r"(train_pt_\d+)")


def case_id(name: str) -> str:
    """The patient id (``train_pt_N``) in a file name, path or id."""
    found = _CASE.search(str(name))
    if not found:
        raise ValueError(f"{name}: no head-and-neck patient id (train_pt_N) in it")
    return found.group(1)


def part(name: str) -> str:
    """'tuning' or 'reporting' for a patient id, file name or path."""
    digest = hashlib.sha256(case_id(name).encode("ascii")).hexdigest()
    return REPORTING if int(digest[:8], 16) % 2 else TUNING


def split(names: Iterable[str]) -> tuple[list[str], list[str]]:
    """The given names (ids, file names or paths) as (tuning, reporting), each in the order given."""
    names = list(names)
    return [n for n in names if part(n) == TUNING], [n for n in names if part(n) == REPORTING]


def main() -> None:
    import csv
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from real_data import shared_data_dir

    with open(shared_data_dir() / "real" / "head-neck-ct" / "cases.csv", newline="") as handle:
        cases = [row["case"] for row in csv.DictReader(handle)]
    tuning, reporting = split(cases)
    print(f"{len(tuning)} tuning: {' '.join(tuning)}")
    print(f"{len(reporting)} reporting: {' '.join(reporting)}")


if __name__ == "__main__":
    main()
