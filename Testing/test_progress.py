"""The one progress protocol: every background piece of work answers ``poll()`` with a Progress of the same States."""

from __future__ import annotations

import json

from CBIRSlicerLib.progress import FINAL, Progress, State


def test_a_running_snapshot_has_a_rate_and_time_left_and_a_finished_one_only_its_rate():
    running = Progress.timed(State.RUNNING, 10, 40, since=100.0, until=105.0)
    assert running.rate == 2.0 and running.eta_s == 15.0 and not running.finished
    done = Progress.timed(State.DONE, 40, 40, since=100.0, until=120.0)
    assert done.rate == 2.0 and done.eta_s is None and done.finished
    assert Progress.timed(State.QUEUED, 0, 40, since=None).rate == 0.0


def test_states_are_their_words_so_they_print_and_compare_as_before():
    assert State.LOADING_MODEL == "loading model" and json.dumps(State.CANCELLED) == '"cancelled"'
    assert FINAL == {State.DONE, State.FAILED, State.CANCELLED}


def test_builds_searches_placements_and_jobs_answer_the_same_poll():
    from CBIRSlicerLib.index.background_build import IndexBuild
    from CBIRSlicerLib.models.worker import Job
    from CBIRSlicerLib.scene.search_session import PendingPlacement, PendingSearch

    for kind in (IndexBuild, PendingSearch, PendingPlacement, Job):
        assert kind.poll.__annotations__["return"] in ("Progress", Progress), kind
