"""A first build that fails leaves nothing behind.

``cbir index build`` and the module's Index button create an index folder and then fill it. When that first fill ends
with no case in the index (the PACS refused the credentials, every series was skipped, the user pressed Ctrl-C before
the first case), an empty index folder left behind would look like an index to the next command and to the user. So
what the build made goes: the folder itself if it was new, else only the files the build added beside the user's.
An index that holds a case, even from a build that stopped half way, is kept: the next build resumes it.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def undone_if_empty(folder: str) -> Iterator[None]:
    """Around creating an index in ``folder`` and its first build: afterwards (or on any exception), an index without a
    complete case is removed with what it added; the folder and the files that were there before stay. A Milvus location's
    collections are dropped (:func:`milvus_index.drop_if_empty`)."""
    from .milvus_connection import is_milvus_location

    if is_milvus_location(folder):
        from .milvus_index import drop_if_empty

        try:
            yield
        finally:
            drop_if_empty(folder)
        return
    folder = os.path.abspath(folder)
    before = set(os.listdir(folder)) if os.path.isdir(folder) else None
    try:
        yield
    except BaseException:
        _undo_if_empty(folder, before)
        raise
    _undo_if_empty(folder, before)


def holds_a_case(folder: str) -> bool:
    """Whether the index in ``folder`` has at least one complete case (False when there is no readable index)."""
    from ..errors import CBIRError
    from .folder import Index

    try:
        index = Index.open(folder)
    except (CBIRError, OSError, ValueError):
        return False
    try:
        return index.catalog.count("cases") > 0
    finally:
        index.catalog.close()


def _undo_if_empty(folder: str, before: set[str] | None) -> None:
    if not os.path.isdir(folder) or holds_a_case(folder):
        return
    if before is None:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for name in set(os.listdir(folder)) - before:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.remove(path)
            except OSError:
                pass
