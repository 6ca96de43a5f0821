"""Type checking that only gets better: mypy's errors against the recorded baseline (.mypy-baseline.txt).

Fails (exit 1) when an error appears that the baseline does not hold; errors fixed since are reported, and
``--update`` writes the baseline again, only ever shrinking it (it refuses to record an error of a code and message the
baseline does not hold as often; code moved to another file takes its errors along). An error is its file, code and
message, without its line number, so moving code within a file does not count as a new error.

    python tools/mypy_baseline.py            # the check .ci/run runs
    python tools/mypy_baseline.py --update   # after fixing errors: record the smaller baseline

There is no way to record new errors: code that brings some is typed out before it is merged (a merge conflict in the
baseline: take main's, then ``--update``). Only when there is no baseline file does ``--update`` record what there is;
deleting the file to start again (a mypy upgrade that rewords its messages) is a commit of its own, its diff read.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE = ROOT / ".mypy-baseline.txt"
LINE = re.compile(r"^(?P<path>[^:]+):\d+(?::\d+)?: error: (?P<message>.*?)\s+\[(?P<code>[\w-]+)\]$")


def current_errors() -> Counter:
    """mypy's errors now, as 'path: [code] message' with how often each occurs."""
    result = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"), "--no-error-summary",
                             "--hide-error-context", "--no-color-output", "--show-absolute-path"],
                            cwd=ROOT, capture_output=True, text=True)
    if result.returncode not in (0, 1) or "error: " not in result.stdout and result.returncode == 1:
        sys.exit(f"mypy did not run: {result.stderr.strip() or result.stdout.strip()}")
    found = Counter()
    for line in result.stdout.splitlines():
        match = LINE.match(line.strip())
        if match:
            path = Path(match["path"]).resolve().relative_to(ROOT).as_posix()
            found[f"{path}: [{match['code']}] {match['message']}"] += 1
    return found


def read_baseline() -> Counter:
    if not BASELINE.exists():
        return Counter()
    return Counter(line for line in BASELINE.read_text(encoding="utf-8").splitlines() if line.strip())


def _without_paths(errors: Counter) -> Counter:
    """The errors counted by code and message alone."""
    counted: Counter = Counter()
    for line, count in errors.items():
        counted[line.split(": ", 1)[1]] += count
    return counted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", action="store_true", help="record the baseline again (it may only shrink)")
    args = parser.parse_args(argv)
    now, recorded = current_errors(), read_baseline()
    new, fixed = now - recorded, recorded - now
    for line in sorted(new.elements()):
        print(f"new type error: {line}")
    if fixed:
        print(f"{sum(fixed.values())} recorded error(s) fixed since; run 'python tools/mypy_baseline.py --update' to shrink the baseline")
    if args.update:
        # Code moved to another file brings its errors along: accepted when no kind of error (code and message) grows.
        grown = _without_paths(now) - _without_paths(recorded)
        if grown and BASELINE.exists():  # the first baseline records what there is
            print("not updated: the baseline only shrinks; fix the new errors first")
            return 1
        BASELINE.write_text("".join(f"{line}\n" for line in sorted(now.elements())), encoding="utf-8")
        print(f"baseline: {sum(now.values())} error(s)")
        return 0
    print(f"mypy: {sum(now.values())} error(s), {sum(recorded.values())} in the baseline, {sum(new.values())} new")
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
