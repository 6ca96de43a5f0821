"""Result cases as volume nodes: loaded from their source path once, reused after.

Loading is injected (Slicer's ``slicer.util.loadVolume`` in the module; ``vtkSlicerVolumesLogic``
in the tests), so the reuse rules are plain code: a node already in the scene is reused if it
was loaded for that source before (tagged with an attribute) or if the user loaded the same file
themselves (its storage node names it).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from ..errors import InputError

SOURCE_ATTRIBUTE = "CBIRSlicer.source"

Loader = Callable[[str, str], object]  # (path, node name) -> volume node in the scene


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


def result_volume_node(scene, case: IndexedCase, load: Loader):
    """The volume node of an indexed case (a search result): reused if already loaded, else loaded from its source path."""
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
