"""The CLI's search answers are what they were before the library moved into subpackages (byte for byte, roots normalised).

A change that alters the JSON on purpose re-records ``Testing/data/cli_answers.json`` with
``python Testing/cli_answers.py Testing/data/cli_answers.json`` and says so in its commit.
"""

from __future__ import annotations

import json
import os

from cli_answers import record

RECORDED = os.path.join(os.path.dirname(__file__), "data", "cli_answers.json")


def test_search_answers_equal_the_recorded_ones(tmp_path):
    answers = record(os.path.realpath(str(tmp_path)))
    with open(RECORDED, encoding="utf-8") as handle:
        recorded = handle.read()
    assert json.dumps(answers, indent=1, sort_keys=True) + "\n" == recorded
