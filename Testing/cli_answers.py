"""The CLI's search answers on a small demo cohort, with path roots normalised: recorded once, compared after.

Kept apart from the test so the same code can record the answers of an earlier version of the
library (``python Testing/cli_answers.py OUT.json`` with that version first on ``sys.path``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile

CASES, SEED = 5, 0
ROI_SCALE = 2.5  # the demo's ROI: a cube of 2.5 lesion radii
ROOT = "<root>"


def _synthetic():
    try:
        from CBIRSlicerLib.imaging import synthetic
    except ImportError:  # the flat layout before the subpackages
        from CBIRSlicerLib import synthetic
    return synthetic


def _cbir(*argv: str) -> str:
    from CBIRSlicerLib.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(argv))
    if code != 0:
        raise RuntimeError(f"cbir {' '.join(argv)} exited {code}")
    return out.getvalue()


def record(work: str) -> list[dict]:
    """Build the cohort's index with the CLI and return every query's JSON answer, paths under ``work`` as <root>."""
    synthetic = _synthetic()
    cohort_dir, index_dir = os.path.join(work, "cohort"), os.path.join(work, "index")
    paths = synthetic.write_cohort(synthetic.make_cohort(CASES, seed=SEED), cohort_dir)
    _cbir("index", "build", cohort_dir, "--index", index_dir, "--model", "handcrafted", "--axes", "axial", "--stride-mm", "4")
    truth = synthetic.read_cohort(os.path.join(cohort_dir, synthetic.COHORT_CSV))
    by_name = {os.path.basename(p).split(".")[0]: p for p in paths}
    queries = []
    for name, lesions in truth.items():
        for lesion in lesions:
            side = 2 * ROI_SCALE * lesion.radius_mm
            roi = ",".join(f"{v:.3f}" for v in (*lesion.center, side, side, side))
            queries.append(["--volume", by_name[name], f"--roi-ras={roi}"])
    first = paths[0]
    queries += [["--volume", first], ["--volume", first, "--slice-ras=0,0,0"], ["--like", "1"]]
    answers = []
    for query in queries:
        # Without placement: its registration sums in ITK's threads, so placed points can differ by a micrometre from run to
        # run (tested on its own in test_placement.py); everything else in the answer is deterministic.
        text = _cbir("search", "--index", index_dir, "-k", "3", "--json", "--no-place", *query)
        answers.append(_normalised(json.loads(text.replace(work, ROOT))))
    return answers


def _normalised(answer: dict) -> dict:
    """Case ids hash the source's absolute path, so they are replaced by the case's name."""
    if "case_id" in answer["query"]:
        answer["query"]["case_id"] = "<id of the item's case>"
    for result in answer.get("results", []):
        result["case_id"] = f"<id of {result['name']}>"
    return answer


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        result = record(os.path.realpath(folder))
    with open(sys.argv[1], "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1, sort_keys=True)
        handle.write("\n")
