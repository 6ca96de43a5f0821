"""Registering the query's point into shown results, several at once: the registration side of :meth:`Searcher.place`.

The searcher reads what it needs from the index in its own thread (:class:`PlacementJob`, and the results' items while
they register); here each result's volume is
read, brought to the registration grid and registered (:func:`register_result`), on a pool of worker threads
(:func:`register_all`): SimpleITK releases the GIL, so two results register on two cores at once, each on one ITK thread
(ITK's own threads cost 12-15 % more CPU than they save on images this small; docs/benchmarks.md, "Where placement's
time goes"). Nothing here touches the index or the scene. :mod:`placement` then decides what each result shows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from ..imaging.volume import Volume
from ..models.base import available_cores
from ..threads import itk_threads
from .answers import CaseResult

if TYPE_CHECKING:
    from ..imaging.levels import BodyPlanes
    from ..imaging.registration import LevelWindow, Placement

# Results registered at once: each worker holds a result's volume while it is gridded, so more would cost memory for
# little (placing 10 results is 10 whole-volume registrations of ~0.1 s and ~15 local ones of ~0.3 s).
PLACE_WORKERS = 4


@dataclass
class QueryGrid:
    """The query volume as placement uses it: its coarse grid, body axis, focality (of the last box asked on it) and its
    whole-volume registrations into each result (the next box on the same volume needs only the local stages)."""

    volume: Volume
    image: object
    axis: object
    planes: BodyPlanes  # the body's centre per plane, for level starts
    focal: bool = False
    global_transforms: dict[str, Any] = field(default_factory=dict)  # result source -> transform; written by one worker per source

    @classmethod
    def of(cls, volume: Volume, axis: object) -> QueryGrid:
        """A query volume's grid (raises RuntimeError, ITK's, for a volume too thin to smooth at the coarse grid)."""
        from ..imaging import levels, registration

        image = registration.coarse_image(volume)
        return cls(volume, image, axis, levels.body_planes(image))


@dataclass(frozen=True)
class ResultGrid:
    """A result volume as placement uses it: its coarse grid, voxel grid (to keep shown points inside) and body axis."""

    image: object
    ijk_to_ras: np.ndarray
    shape_ijk: tuple[int, int, int]
    axis: object
    planes: BodyPlanes

    @classmethod
    def of(cls, volume: Volume, axis: object) -> ResultGrid:
        """A result volume's grid (raises RuntimeError, ITK's, for a volume too thin to smooth at the coarse grid)."""
        from ..imaging import levels, registration

        image = registration.coarse_image(volume)
        return cls(image, volume.ijk_to_ras, volume.shape_ijk, axis, levels.body_planes(image))

    def holds(self, ras: Sequence[float] | np.ndarray) -> bool:
        """Whether a RAS point lies on the volume's voxel grid (to the outer faces of its edge voxels)."""
        ijk = np.linalg.solve(self.ijk_to_ras[:3, :3], np.asarray(ras, float) - self.ijk_to_ras[:3, 3])
        return bool(np.all(ijk >= -0.5) and np.all(ijk <= np.array(self.shape_ijk) - 0.5))


@dataclass
class PlacementJob:
    """One shown result to place, with what the index says of it (read in the searcher's thread)."""

    result: CaseResult
    case_row: int
    stored_axis: dict[str, Any] | None  # the body axis the index stored at build time
    grid: ResultGrid | None  # the result's grid kept from an earlier placement


@dataclass
class Registered:
    """One result's registration (a worker's answer): its grid, whether the query's level is in its view, the level
    window and the registered place (None where the level is out of view)."""

    grid: ResultGrid
    in_view: bool | None
    window: LevelWindow | None
    where: Placement | None


def result_grid(source: str, loader: Callable[[str], Volume], stored_axis: dict[str, Any] | None) -> ResultGrid:
    """A result's registration grid, voxel grid and body axis (the axis the index stored at build time, else read as the
    index would have: :attr:`body_region.Inferred.placeable_axis`)."""
    from ..imaging import body_axis, body_region

    volume = loader(source)
    return ResultGrid.of(volume, body_axis.BodyAxis.from_dict(stored_axis) if stored_axis else
                         body_region.infer(volume).placeable_axis)


# The whole-volume start's answer is kept alone when the level start puts the asked point within SAME_START_MM of it
# (the local stage from either ends alike) or when the query's box agrees with the result there at least this well (and
# it lies in the level window); otherwise the level start is registered too and the better of the two kept. Tuning
# head-and-neck pairs (824: 12 query x 20 result patients, benchmarks/placement_starts.py): 709 inside against 710 for
# always both, 312 level starts skipped (the same start alone: 252 skipped, none lost; at 0.9 instead of 0.95, 390
# skipped and 8 lost). The abdominal pseudo-patients, where the whole-volume start is the better one, stay (80.7 %;
# 81.8 % before these changes, one query of 88). The level start first instead lost them: 81.8 -> 70.5 %
# (docs/benchmarks.md, "Where placement's time goes").
KEEP_WHOLE_VOLUME_AGREEMENT = 0.95
SAME_START_MM = 15.0


def register_point(query: QueryGrid, target: ResultGrid, source: str, asked: Sequence[float], box_mm: float | None,
                   window: LevelWindow | None) -> Placement:
    """The asked point registered into a result from the whole-volume registration and, unless that is enough
    (:data:`KEEP_WHOLE_VOLUME_AGREEMENT`, :data:`SAME_START_MM`), from the body coordinate's level (the same level, the
    bodies' centres); the one that agrees better with the query is kept (:func:`placement.better`)."""
    from ..imaging import levels, registration
    from . import placement

    if source not in query.global_transforms:
        query.global_transforms[source] = registration.global_transform(query.image, target.image)
    whole = query.global_transforms[source]
    level = window if window is not None else levels.start_window(query.axis, target.axis, asked)
    start = levels.level_transform(query.planes, target.planes, level) if level is not None else None
    if start is not None and np.linalg.norm(registration.carry(start, asked) - registration.carry(whole, asked)) < SAME_START_MM:
        start = None
    candidates = [registration.place(query.volume, asked, None, whole, query.image, target.image, box_mm)]
    first = candidates[0]
    if start is not None and not (first.agreement >= KEEP_WHOLE_VOLUME_AGREEMENT and (window is None or window.holds(first.ras))):
        candidates.append(registration.place(query.volume, asked, None, start, query.image, target.image, box_mm))
    return placement.better(candidates, window)


def register_result(query: QueryGrid, job: PlacementJob, centre_ras: Sequence[float], loader: Callable[[str], Volume],
                    box_mm: float | None, reach_mm: float) -> Registered | None:
    """One result's registration (a worker thread's part: volumes and ITK only); None when the result's volume cannot be
    read or is too small to register, so it keeps its look-alike."""
    from ..errors import CBIRError
    from ..imaging import levels

    try:
        grid = job.grid or result_grid(job.result.source, loader, job.stored_axis)
    except (CBIRError, OSError, RuntimeError):  # moved, unreadable, or too thin for the coarse grid
        return None
    # The query's level in the result (the body coordinate): not there at all, or where, and which point of the box to
    # ask about (its centre, or the part of the box the result's field of view holds)
    in_view, window = levels.level_window(query.axis, grid.axis, centre_ras, reach_mm)
    if in_view is False:  # the query's anatomy lies outside the result's body: nothing to register
        return Registered(grid, in_view, window, None)
    asked = window.asked_ras if window is not None else centre_ras
    try:
        where = register_point(query, grid, job.result.source, asked, box_mm, window)
    except RuntimeError:  # ITK: a volume too small or too thin to register at the coarse grid: keep the look-alike
        return None
    return Registered(grid, in_view, window, where)


Job = TypeVar("Job")
Answer = TypeVar("Answer")


def register_all(jobs: list[Job], register: Callable[[Job], Answer], workers: int | None = None,
                 meanwhile: Callable[[], Any] | None = None) -> tuple[list[Answer], Any]:
    """Every job registered, in order: ``workers`` at once (default one per core, at most :data:`PLACE_WORKERS`), ITK's
    threads shared out among them; ``meanwhile`` (the searcher's reading of the index) runs in the calling thread while
    they register. Returns the answers and what ``meanwhile`` returned."""
    count = max(1, min(workers or min(available_cores(), PLACE_WORKERS), len(jobs)))
    if count == 1:
        answers = [register(job) for job in jobs]
        return answers, meanwhile() if meanwhile is not None else None
    from concurrent.futures import ThreadPoolExecutor

    with itk_threads(max(1, available_cores() // count)), ThreadPoolExecutor(count, "cbir-place") as pool:
        futures = [pool.submit(register, job) for job in jobs]
        also = meanwhile() if meanwhile is not None else None
        return [future.result() for future in futures], also
