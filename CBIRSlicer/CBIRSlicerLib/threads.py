"""Thread pools of the numerical libraries: keep numpy's BLAS from fighting FAISS's OpenMP threads.

numpy's OpenBLAS runs its products on a pool of threads that keep spinning for a while after each
call, and FAISS walks its graph on an OpenMP pool of its own. When a search alternates the two (a
FAISS walk, then MaxSim products, then the next query's walk) each pool's spinning threads take
cores from the other: on 2 cores a 16-image query at 1 M vectors walked its graphs in ~50 ms after
multi-threaded products and in ~27 ms after single-threaded ones, while the products themselves
(a few 500 x 512 by 512 x 16 blocks) gained nothing from a second thread (docs/benchmarks.md).
So the re-scoring products run on one BLAS thread; the previous limits come back afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

# threadpoolctl's view of the loaded libraries, kept since finding them costs milliseconds (None: not looked yet;
# False: threadpoolctl is missing or could not inspect this runtime).
_controller = None


@contextlib.contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the enclosed numpy products on a single BLAS thread (a no-op where threadpoolctl is not installed)."""
    global _controller
    if _controller is None:
        try:
            from threadpoolctl import ThreadpoolController

            _controller = ThreadpoolController()
        except Exception:  # not installed, or a runtime it cannot inspect: the same results at the old speed
            _controller = False
    if not _controller:
        yield
        return
    with _controller.limit(limits=1, user_api="blas"):
        yield



@contextlib.contextmanager
def itk_threads(count: int) -> Iterator[None]:
    """Run the enclosed ITK filters and registrations on ``count`` threads each (ITK's global default, restored after).

    Placement registers several results at once, one Python thread each (SimpleITK releases the GIL): there each
    registration is best on one thread, since ITK's threads cost 12-15 % more CPU than they save on images this small
    (docs/benchmarks.md, "Where placement's time goes"). The default is global to ITK, so it is set only around such work.
    """
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(max(1, int(count)))
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)
