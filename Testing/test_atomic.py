"""Files written whole or not at all (atomic.py) and the one clock (clock.py)."""

from __future__ import annotations

import datetime
import json
import os

import pytest

from CBIRSlicerLib.atomic import replaced, write_json_atomically
from CBIRSlicerLib.clock import now_utc


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path):
    path = str(tmp_path / "manifest.json")
    write_json_atomically(path, {"version": 1})
    with pytest.raises(ValueError):
        write_json_atomically(path, {"version": 2, "bad": float("nan")})  # refused mid-write: NaN is not JSON
    with pytest.raises(RuntimeError), replaced(path) as temporary:
        with open(temporary, "w") as handle:
            handle.write('{"version": 3')  # half written, then the writer fails
        raise RuntimeError("killed")
    assert json.load(open(path)) == {"version": 1} and os.listdir(tmp_path) == ["manifest.json"]
    write_json_atomically(path, {"version": 4})
    assert json.load(open(path)) == {"version": 4} and os.listdir(tmp_path) == ["manifest.json"]


def test_an_exclusive_write_keeps_a_file_made_first(tmp_path):
    path = str(tmp_path / "key")
    for text in ("first", "second"):
        with replaced(path, exclusive=True) as temporary, open(temporary, "w") as handle:
            handle.write(text)
    assert open(path).read() == "first" and os.listdir(tmp_path) == ["key"]


def test_the_clock_is_utc_to_the_second():
    stamp = datetime.datetime.fromisoformat(now_utc())
    assert stamp.utcoffset() == datetime.timedelta(0) and stamp.microsecond == 0
    assert abs((datetime.datetime.now(datetime.timezone.utc) - stamp).total_seconds()) < 5
