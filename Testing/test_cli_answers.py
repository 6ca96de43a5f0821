"""The CLI's search answers are what they were recorded as (roots normalised), within stated tolerances.

Identifiers, ranks, counts, kinds and strings must be equal; scores may differ by :data:`SCORE_TOLERANCE` and
millimetres by :data:`MM_TOLERANCE`: the same code on another CPU (another BLAS, other SIMD sums) moves the fifth
decimal of a cosine and the hundredth of a millimetre of a focus, never a ranking. A change that alters the answers on
purpose re-records ``Testing/data/cli_answers.json`` with ``python Testing/cli_answers.py Testing/data/cli_answers.json``
and says so in its commit.
"""

from __future__ import annotations

import json
import math
import os

from cli_answers import record

RECORDED = os.path.join(os.path.dirname(__file__), "data", "cli_answers.json")
# Cosine units: answers round to 5 decimals; float32 sums (and the fitted whitening) on another CPU moved per-image scores
# by up to 1.5e-4 between the recording machine and a 2-core test machine, far below any gap that reorders cases.
SCORE_TOLERANCE = 5e-4
# Millimetres: a focus is a mean weighted by exp(similarity / 0.01) (ranking.FOCUS_TEMPERATURE), so 1e-4 of cosine moves
# a weight by 1 % and the focus, over items 4-10 mm apart, by about 0.1 mm (measured: 0.106 mm); well under a voxel.
MM_TOLERANCE = 0.5
SCORE_KEYS = {"score", "per_image_scores"}
MM_KEYS = {"focus_ras", "ras", "roi_ras", "bounds_ras", "placed_ras"}


def differences(got, want, path: str = "", key: str = "") -> list[str]:
    """Where two answers differ beyond the tolerances (numbers under score and millimetre keys), else exactly."""
    if isinstance(want, dict) and isinstance(got, dict):
        if set(got) != set(want):
            return [f"{path or '/'}: keys {sorted(set(got) ^ set(want))} in only one"]
        return [d for name in sorted(want) for d in differences(got[name], want[name], f"{path}/{name}", name)]
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{path}: {len(got)} entries, recorded {len(want)}"]
        return [d for n, (g, w) in enumerate(zip(got, want)) for d in differences(g, w, f"{path}[{n}]", key)]
    numbers = (int, float)
    if isinstance(want, float) and isinstance(got, numbers) and not isinstance(got, bool):
        tolerance = SCORE_TOLERANCE if key in SCORE_KEYS else MM_TOLERANCE if key in MM_KEYS else 0.0
        if math.isclose(got, want, rel_tol=0.0, abs_tol=tolerance):
            return []
        return [f"{path}: {got} != {want} (tolerance {tolerance})"]
    return [] if type(got) is type(want) and got == want else [f"{path}: {got!r} != {want!r}"]


def test_the_comparison_keeps_ids_exact_and_numbers_within_tolerance():
    recorded = {"results": [{"item_id": 7, "score": 0.64157, "focus_ras": [69.3, 0.0, 1.0], "name": "case001"}]}
    near = {"results": [{"item_id": 7, "score": 0.64158, "focus_ras": [69.31, 0.0, 1.0], "name": "case001"}]}
    assert differences(near, recorded) == []
    for change, where in (({"item_id": 8}, "item_id"), ({"score": 0.6430}, "score"), ({"focus_ras": [70.0, 0.0, 1.0]}, "focus_ras"),
                          ({"name": "case002"}, "name")):
        found = differences({"results": [{**near["results"][0], **change}]}, recorded)
        assert len(found) == 1 and where in found[0], found


def test_search_answers_equal_the_recorded_ones(tmp_path):
    answers = record(os.path.realpath(str(tmp_path)))
    with open(RECORDED, encoding="utf-8") as handle:
        recorded = json.load(handle)
    found = differences(json.loads(json.dumps(answers)), recorded)
    assert not found, "\n".join(found[:20])
