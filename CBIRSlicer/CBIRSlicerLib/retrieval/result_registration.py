"""Registering the query's point into shown results, several at once: the registration side of :meth:`Searcher.place`.

The searcher reads what it needs from the index in its own thread (:class:`PlacementJob`); here each result's volume is
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
    from ..imaging.registration import LevelWindow, Placement

# Results registered at once: each worker holds a result's volume while it is gridded, so more would cost memory for
# little (placing 10 results is ~20 registrations of ~0.3 s).
PLACE_WORKERS = 4


@dataclass
class QueryGrid:
    """The query volume as placement uses it: its coarse grid, body axis, focality (of the last box asked on it) and its
    whole-volume registrations into each result (the next box on the same volume needs only the local stages)."""

    volume: Volume
    image: object
    axis: object
    focal: bool = False
    global_transforms: dict[str, Any] = field(default_factory=dict)  # result source -> transform; written by one worker per source


@dataclass(frozen=True)
class ResultGrid:
    """A result volume as placement uses it: its coarse grid, voxel grid (to keep shown points inside) and body axis."""

    image: object
    ijk_to_ras: np.ndarray
    shape_ijk: tuple[int, int, int]
    axis: object

    def holds(self, ras: Sequence[float] | np.ndarray) -> bool:
        """Whether a RAS point lies on the volume's voxel grid (to the outer faces of its edge voxels)."""
        ijk = np.linalg.solve(self.ijk_to_ras[:3, :3], np.asarray(ras, float) - self.ijk_to_ras[:3, 3])
        return bool(np.all(ijk >= -0.5) and np.all(ijk <= np.array(self.shape_ijk) - 0.5))


@dataclass
class PlacementJob:
    """One shown result to place, with what the index says of it (read in the searcher's thread)."""

    result: CaseResult
    ids: np.ndarray
    centres: np.ndarray
    sizes: np.ndarray
    axes: np.ndarray
    agreed: np.ndarray  # each item's similarity to the query (weighted over the query's images)
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
    from ..imaging import body_axis, body_region, registration

    volume = loader(source)
    axis = body_axis.BodyAxis.from_dict(stored_axis) if stored_axis else body_region.infer(volume).placeable_axis
    return ResultGrid(registration.coarse_image(volume), volume.ijk_to_ras, volume.shape_ijk, axis)


def register_point(query: QueryGrid, target: ResultGrid, source: str, asked: Sequence[float], box_mm: float | None,
                   window: LevelWindow | None) -> Placement:
    """The asked point registered into a result from two starts, the body coordinate's level (the same level, the
    bodies' centres) and the whole-volume registration; the one that agrees better with the query is kept
    (:func:`placement.better`). Both always run: keeping the level start alone where it already agreed with the box
    (>= 0.7) cost nothing on tuning head-and-neck patients (93.3 % of 150 pairs either way) but took the abdominal
    pseudo-patients from 81.8 % to 70.5 % inside (docs/benchmarks.md, "Where placement's time goes")."""
    from ..imaging import registration
    from . import placement

    starts: list[object] = []
    level = window if window is not None else registration.start_window(query.axis, target.axis, asked)
    if level is not None:
        starts.append(registration.level_transform(query.image, target.image, level))
    if source not in query.global_transforms:
        query.global_transforms[source] = registration.global_transform(query.image, target.image)
    starts.append(query.global_transforms[source])
    candidates = [registration.place(query.volume, asked, None, start, query.image, target.image, box_mm)
                  for start in starts if start is not None]
    return placement.better(candidates, window)


def register_result(query: QueryGrid, job: PlacementJob, centre_ras: Sequence[float], loader: Callable[[str], Volume],
                    box_mm: float | None, reach_mm: float) -> Registered | None:
    """One result's registration (a worker thread's part: volumes and ITK only); None when the result's volume cannot be
    read or is too small to register, so it keeps its look-alike."""
    from ..errors import CBIRError
    from ..imaging import registration

    try:
        grid = job.grid or result_grid(job.result.source, loader, job.stored_axis)
    except (CBIRError, OSError, RuntimeError):  # moved, unreadable, or too thin for the coarse grid
        return None
    # The query's level in the result (the body coordinate): not there at all, or where, and which point of the box to
    # ask about (its centre, or the part of the box the result's field of view holds)
    in_view, window = registration.level_window(query.axis, grid.axis, centre_ras, reach_mm)
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


def register_all(jobs: list[Job], register: Callable[[Job], Answer], workers: int | None = None) -> list[Answer]:
    """Every job registered, in order: ``workers`` at once (default one per core, at most :data:`PLACE_WORKERS`), ITK's
    threads shared out among them."""
    count = max(1, min(workers or min(available_cores(), PLACE_WORKERS), len(jobs)))
    if count == 1:
        return [register(job) for job in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with itk_threads(max(1, available_cores() // count)), ThreadPoolExecutor(count, "cbir-place") as pool:
        return list(pool.map(register, jobs))
