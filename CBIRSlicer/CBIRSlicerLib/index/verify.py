"""Checking an index whole: checksums, SQLite's integrity check, vectors finite and unit, items and vectors matched one to
one, counts, and the source files (what ``cbir index verify`` reports; :meth:`folder.Index.verify`)."""

from __future__ import annotations

import os

import numpy as np

from ..imaging.readers import CaseSource, discover
from .catalog import CaseRecord
from .dicom_sources import is_remote_source
from .files import CLEAN, VECTORS
from .integrity import file_record, record_problem
from .maintenance import IndexFolder
from .writer import source_checksum


def verify(index: IndexFolder, check_sources: bool = True) -> list[str]:
    """Problems found (empty when all is well): checksums, SQLite's integrity check, every vector finite and unit,
    every item with a vector and every vector with an item, counts, and (unless told not to) the source files."""
    problems = list(index.problems)
    if index.interrupted:
        problems.append(f"{index.folder}: " + index.state_note())
    elif not index.legacy and not index.writer_active and index._lock is None and index.manifest.get("state") == CLEAN:
        problems += _file_problems(index, problems)
    problems += index.catalog.integrity_problems()
    problems += index.store.vector_problems()
    problems += _pairing_problems(index)
    if check_sources:
        problems += [problem for case in index.catalog.cases() for problem in _source_problems(case)]
    return problems


def _file_problems(index: IndexFolder, known: list[str]) -> list[str]:
    """Owned files whose size or chunk checksums differ from the seal (the vectors were hashed as they were read)."""
    problems = []
    for name, recorded in (index.manifest.get("files") or {}).items():
        path = os.path.join(index.folder, name)
        if name == VECTORS or not recorded or any(p.startswith(path + ":") for p in known):
            continue
        found = record_problem(path, recorded, file_record(path)) if os.path.isfile(path) else f"{path}: missing"
        if found:
            problems.append(found)
    return problems


def _pairing_problems(index: IndexFolder) -> list[str]:
    """Items without a vector, vectors without an item, duplicate ids, and vectors of another size than the model's."""
    problems = []
    catalog_ids = index.catalog.item_ids()
    stored = index.store.ids()
    live = np.setdiff1d(stored, index.excluded_ids())
    if len(np.unique(stored)) != len(stored):
        problems.append(f"vectors file holds {len(stored) - len(np.unique(stored))} duplicate ids")
    missing = np.setdiff1d(catalog_ids, stored)
    extra = np.setdiff1d(live, catalog_ids)
    if len(missing):
        problems.append(f"{len(missing)} catalog items have no vector (first id {missing[0]})")
    if len(extra):
        problems.append(f"{len(extra)} vectors have no catalog item (first id {extra[0]})")
    if index.store.count and index.store.dim != index.fingerprint["dim"]:
        problems.append(f"vectors have {index.store.dim} dimensions, the model {index.fingerprint['dim']}")
    return problems


def _source_problems(case: CaseRecord) -> list[str]:
    """A case's source gone, its series gone from its folder, or its content changed since it was indexed."""
    if is_remote_source(case.source):
        return []  # in a DICOM database or a PACS: not checksummed here (a server may recompress what it sends)
    if not os.path.exists(case.source):
        return [f"{case.source}: source of case {case.case_id} is missing"]
    files_of = CaseSource(case.source, case.series_uid)
    if os.path.isdir(case.source):
        found = [c for c in discover([case.source], recursive=False).cases if c.series_uid == case.series_uid]
        if not found:
            return [f"{case.source}: series {case.series_uid} of case {case.case_id} is no longer there"]
        files_of = found[0]
    if source_checksum(files_of) != case.checksum:
        return [f"{case.source}: changed since it was indexed (checksum differs); run 'cbir index add' to refresh"]
    return []
