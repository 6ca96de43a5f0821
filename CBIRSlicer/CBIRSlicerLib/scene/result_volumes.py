"""Result cases as volume nodes: loaded from their source path once, reused after.

Loading is injected (Slicer's ``slicer.util.loadVolume`` in the module; ``vtkSlicerVolumesLogic``
in the tests), so the reuse rules are plain code: a node already in the scene is reused if it
was loaded for that source before (tagged with an attribute) or if the user loaded the same file
themselves (its storage node names it).

A case from a DICOM database or a PACS (source ``ctkdb:`` / ``dicomweb:``) is found by its series UID instead:
``locate`` gives its files (the database's own, or fetched into a local cache on first use) and ``load_series`` makes
the node (Slicer's DICOM module by series UID in the module; the library's reader under slicer-core).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from ..errors import InputError
from ..imaging.readers import CaseSource
from ..index.dicom_sources import is_remote_source

SOURCE_ATTRIBUTE = "CBIRSlicer.source"

Loader = Callable[[str, str], object]  # (path, node name) -> volume node in the scene
SeriesLoader = Callable[[CaseSource, str], object]  # (the series' local files, node name) -> volume node in the scene


class IndexedCase(Protocol):
    """A case of the index as a search result (``CaseResult``) or a catalog row (``CaseRecord``) names it."""

    case_id: str
    source: str
    name: str


def _volume_nodes(scene) -> list:
    collection = scene.GetNodesByClass("vtkMRMLScalarVolumeNode")
    nodes = [collection.GetItemAsObject(n) for n in range(collection.GetNumberOfItems())]
    return [n for n in nodes if not n.IsA("vtkMRMLLabelMapVolumeNode")]


def find_volume_node(scene, source: str):
    """A volume node in the scene that holds a source file (loaded by us, or by the user from the same file); None if none."""
    source = os.path.abspath(source)
    for node in _volume_nodes(scene):
        if node.GetAttribute(SOURCE_ATTRIBUTE) == source:
            return node
    for node in _volume_nodes(scene):
        storage = node.GetStorageNode()
        name = storage.GetFileName() if storage is not None else None
        if name and os.path.abspath(name) == source and not node.GetModifiedSinceRead():
            return node
    return None


def read_series_node(scene, series: CaseSource, name: str):
    """A series' volume node made by the library's reader (the geometry the index saw); Slicer's DICOM module is the
    module's first choice, this is its fallback and what runs under slicer-core."""
    from ..imaging.readers import read_case
    from .nodes import node_from_volume

    return node_from_volume(scene, read_case(series), name)


def remote_key(case: IndexedCase) -> str:
    """What tags the node of a DICOM database's or PACS's series: its source and series UID."""
    return f"{case.source}|{getattr(case, 'series_uid', None)}"


def result_volume_node(scene, case: IndexedCase, load: Loader, locate: Callable[[IndexedCase], CaseSource] | None = None,
                       load_series: SeriesLoader | None = None):
    """The volume node of an indexed case (a search result): reused if already loaded, else loaded from its source path,
    or (a DICOM database's or PACS's series) from the files ``locate`` finds or fetches."""
    if is_remote_source(case.source):
        key = remote_key(case)
        for node in _volume_nodes(scene):
            if node.GetAttribute(SOURCE_ATTRIBUTE) == key:
                return node
        if locate is None or load_series is None:
            raise InputError(case.source, f"case '{case.name or case.case_id}' lives in a DICOM database or a PACS; "
                                          "this viewer was given no way to fetch it")
        node = load_series(locate(case), case.name or case.case_id)
        if node is None:
            raise InputError(case.source, f"series {getattr(case, 'series_uid', None)} could not be loaded")
        node.SetAttribute(SOURCE_ATTRIBUTE, key)
        return node
    source = os.path.abspath(case.source)
    node = find_volume_node(scene, source)
    if node is not None:
        return node
    if not os.path.exists(source):
        raise InputError(source, f"case '{case.name or case.case_id}' is no longer at the path it was indexed "
                                 "from (moved or deleted); put it back, or re-index it with 'cbir index add' and remove "
                                 f"the old entry with 'cbir index remove {case.case_id}'")
    node = load(source, case.name or os.path.basename(source))
    if node is None:
        raise InputError(source, "Slicer could not load this volume")
    node.SetAttribute(SOURCE_ATTRIBUTE, source)
    return node
