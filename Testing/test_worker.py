"""The background embedding service: never blocks the caller, cancels before the job ends, survives failures.

No timing bounds here (a loaded machine makes any of them flaky): what is asserted is what happened, in order.
How fast a cancel lands and how long a caller's tick may wait are measured, not tested."""

from __future__ import annotations

import time

import numpy as np
import pytest

from CBIRSlicerLib.errors import JobCancelled, ModelError, WorkerError
from CBIRSlicerLib.models import handcrafted, worker
from CBIRSlicerLib.models.registry import create_embedder
from CBIRSlicerLib.models.worker import EmbeddingService


def _images(n, size=96, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((size, size, 3)) * 255).astype(np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def service():
    with EmbeddingService("handcrafted") as running:
        running.wait_ready(60)
        yield running


def test_a_200_image_job_never_delays_the_callers_event_loop(service):
    images = _images(200)
    ticks, seen = 0, []
    job = service.submit_images(images)  # returns at once: sending happens on a writer thread
    while not job.wait(0):
        time.sleep(0.01)  # a simulated GUI event loop ticking every 10 ms
        ticks += 1
        seen.append(job.poll().done)
    # The loop ran while the job was in flight: ticks with the job unfinished, and progress seen part way (a caller
    # blocked by submit or by progress() would see the job only finished). No bound on a tick's delay: that is time.
    assert ticks > 5 and seen == sorted(seen) and 0 < max(seen) <= 200
    assert any(0 < done < 200 for done in seen), sorted(set(seen))
    vectors = job.result()
    assert np.array_equal(vectors, create_embedder("handcrafted").embed_images(images))
    progress = job.poll()
    assert progress.state == "done" and progress.done == 200 and progress.rate > 0


def test_cancel_stops_a_job_before_it_ends(service):
    job = service.submit_images(_images(3000, size=128))
    while job.poll().done == 0:
        time.sleep(0.01)
    job.cancel()  # returns once the worker acknowledged it, or once it was killed for not doing so (HARD_CANCEL_S)
    assert job.wait(60), "job still running after cancel"
    assert job.poll().state == "cancelled" and job.poll().done < 3000
    with pytest.raises(JobCancelled):
        job.result()
    assert service.submit_images(_images(2)).result(30).shape == (2, handcrafted.DIM)


def test_a_failing_job_reports_its_error_and_the_next_job_succeeds(service):
    bad = service.submit_images([np.zeros((8, 8, 3), np.uint8), np.zeros((4, 4, 2), np.uint8)])
    with pytest.raises(WorkerError, match=r"image 1 has shape \(4, 4, 2\)") as caught:
        bad.result(30)
    assert "handcrafted" in str(caught.value) and bad.poll().state == "failed"
    good = service.submit_images(_images(3))
    assert good.result(30).shape == (3, handcrafted.DIM)


def test_text_on_an_image_only_model_fails_cleanly(service):
    with pytest.raises(WorkerError, match="images only"):
        service.submit_text(["pleural effusion"]).result(30)


def test_the_model_is_loaded_once_for_several_jobs(tmp_path):
    from random_checkpoints import write_open_clip_folder

    folder = write_open_clip_folder(str(tmp_path / "clip"))
    with EmbeddingService(f"local-dir:{folder}", device="cpu") as service:
        info = service.wait_ready(120)
        assert info["dim"] == 32 and info["supports_text"]
        jobs = [service.submit_images(_images(4, seed=s)) for s in range(3)] + [service.submit_text(["nodule", "effusion"])]
        shapes = [job.result(120).shape for job in jobs]
        assert shapes == [(4, 32)] * 3 + [(2, 32)]
        assert service.model_loads == 1
        reference = create_embedder(f"local-dir:{folder}", device="cpu").embed_images(_images(4, seed=0))
        assert np.abs(jobs[0].result() - reference).max() < 1e-5


def test_a_cancel_the_worker_cannot_honour_in_time_restarts_it(monkeypatch):
    monkeypatch.setattr(worker, "HARD_CANCEL_S", 0.0)  # every cancel takes the kill path
    with EmbeddingService("handcrafted") as service:
        service.wait_ready(60)
        job = service.submit_images(_images(2000, size=128))
        while job.poll().done == 0:
            time.sleep(0.01)
        job.cancel()
        assert job.wait(60) and job.poll().state == "cancelled" and job.poll().done < 2000
        assert service.submit_images(_images(2)).result(60).shape == (2, handcrafted.DIM)
        assert service.model_loads == 2  # the restart is visible, not hidden


def test_a_model_that_cannot_load_is_reported():
    with EmbeddingService("no-such-model") as service:
        with pytest.raises(ModelError, match="unknown model 'no-such-model'"):
            service.wait_ready(60)


def test_shutdown_ends_the_worker_and_pending_jobs():
    service = EmbeddingService("handcrafted").start()
    service.wait_ready(60)
    job = service.submit_images(_images(3000, size=128))
    process = service._process
    service.shutdown(timeout=5)
    assert process.poll() is not None
    assert job.wait(5) and job.poll().state in ("cancelled", "done")
