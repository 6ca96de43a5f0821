"""Keeping results from the scene: save a search, reload it, export it as CSV or as a Slicer scene, label a result.

Saved searches go to a folder next to the saved scene (``CBIR searches``), or to a collection folder the user
chose; the label side file of a read-only index goes to the same folder. A scene export builds a scene of its
own (query and result volumes as nodes, the ROI and each match box as markups ROI nodes at their RAS places)
and writes it with MRML's own writers: ``vtkMRMLScene.WriteToMRB`` for a bundle (the data copied in), or
``vtkMRMLScene.Commit`` for an ``.mrml`` that refers to the volumes where they are.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import dataclass, field

import numpy as np

from ..atomic import replaced
from ..errors import InputError, ParameterError
from ..imaging.roi import RoiBox
from ..index import labels as case_labels
from ..retrieval import saved_search
from ..retrieval.answers import BestMatch, SearchAnswer
from ..retrieval.marks import Feedback
from ..retrieval.queries import VOLUME_MODES
from ..retrieval.saved_search import SavedSearch, SearchSettings
from .layout import MATCH_BOX_THICKNESS_MM
from .nodes import fresh_scene, mrml_url_decoded, node_from_volume, quiet_vtk
from .result_volumes import SOURCE_ATTRIBUTE, find_volume_node

SEARCHES_FOLDER = "CBIR searches"
CASE_ATTRIBUTE = "CBIRSlicer.case_id"
RANK_ATTRIBUTE = "CBIRSlicer.rank"
SCENE_SUFFIXES = (".mrb", ".mrml")


def searches_folder(scene, collection: str | None = None) -> str:
    """Where saved searches go: the collection folder if set, else ``CBIR searches`` next to the saved scene."""
    if collection and collection.strip():
        return os.path.abspath(collection.strip())
    url = scene.GetURL() if scene is not None else ""
    if not url:
        raise ParameterError("the scene has not been saved yet: save it first (its searches go next to it), or choose a "
                             "collection folder for saved searches")
    return os.path.join(os.path.dirname(os.path.abspath(url)), SEARCHES_FOLDER)


def side_file(folder: str) -> str:
    """The label side file of read-only indexes, in the searches folder."""
    return os.path.join(folder, case_labels.SIDE_FILE)


def _query_file_problem(volume_node) -> str | None:
    """Why a query volume node's file does not hold what was searched (None when it does)."""
    if volume_node is None:
        return None
    storage = volume_node.GetStorageNode()
    if storage is None or not storage.GetFileName():
        return f"the query volume '{volume_node.GetName()}' has no file behind it: save it (File > Save Data) first"
    if volume_node.GetModifiedSinceRead():
        return f"the query volume '{volume_node.GetName()}' changed since it was read: save it first"
    if volume_node.GetParentTransformNode() is not None:
        return f"the query volume '{volume_node.GetName()}' is under a transform: harden it and save it first"
    return None


def save_search(folder: str, index, query, answer: SearchAnswer, settings: SearchSettings, volume_node=None,
                feedback: Feedback | None = None, suggestion: dict | None = None, name: str | None = None) -> str:
    """Save a search made from the scene into a folder (a new file, named by time and mode); returns its path."""
    problem = _query_file_problem(volume_node)
    if problem and query.mode in VOLUME_MODES:
        raise ParameterError(problem)
    saved = saved_search.make(query, answer, index, settings, feedback=feedback, suggestion=suggestion, name=name)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(folder, f"search-{stamp}-{saved.query.mode}.json")
    number = 1
    while os.path.exists(path):
        number += 1
        path = os.path.join(folder, f"search-{stamp}-{saved.query.mode}-{number}.json")
    return saved.save(path)


def saved_searches(folder: str) -> list[str]:
    """The saved searches in a folder, newest first."""
    if not os.path.isdir(folder):
        return []
    found = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith(".json")]
    return sorted(found, key=os.path.getmtime, reverse=True)


@dataclass
class Reloaded:
    """A saved search brought back into the scene: the search, its query volume node and its ROI node (if it had one)."""

    saved: SavedSearch
    volume_node: object | None
    roi_node: object | None


def roi_node_for(scene, roi: RoiBox, name: str = "Query ROI (saved)"):
    """A markups ROI node for a box (RAS centre and size)."""
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    node.CreateDefaultDisplayNodes()
    node.SetCenter(*roi.center)
    node.SetSize(*roi.size)
    return node


def reload_search(path: str, scene, load) -> Reloaded:
    """Bring a saved search back: its query volume (reused if in the scene, else loaded and checked unchanged) and ROI.

    ``load(path, name)`` loads a volume into the scene (Slicer's loadVolume in the module). The saved answer is
    shown as it was; searching again re-runs it on the open index.
    """
    saved = SavedSearch.load(path)
    spec = saved.query
    node = roi = None
    if spec.volume is not None:
        spec.volume.check("the query volume")
        node = find_volume_node(scene, spec.volume.path)
        if node is None:
            node = load(spec.volume.path, os.path.basename(spec.volume.path).split(".")[0])
            if node is None:
                raise InputError(spec.volume.path, "Slicer could not load the query volume of the saved search")
            node.SetAttribute(SOURCE_ATTRIBUTE, spec.volume.path)
    if spec.spec.roi is not None:
        roi = roi_node_for(scene, spec.spec.roi)
    return Reloaded(saved, node, roi)


def export_csv(saved: SavedSearch, path: str, searches: str | None = None) -> str:
    """The saved answer as CSV, with each case's labels (the index's, merged with the side file in ``searches``)."""
    ids = [r.case_id for r in saved.answer.results]
    merged = case_labels.labels_of(saved.index.path, ids, side_file(searches) if searches else None)
    return saved_search.write_csv(saved.answer, path, merged)


def label_result(index_folder: str, case_id: str, column: str, value: str, searches: str, by: str | None = None):
    """Label a result from the panel: in the index if it can be written, else in the side file of the searches folder."""
    return case_labels.set_label(index_folder, case_id, column, value, by, side_file(searches))


# ----- scene export --------------------------------------------------------------------------------------------------
def match_box(best: BestMatch) -> RoiBox:
    """The box of a result's best-matching item (given a little depth along its axis, as the result view shows it)."""
    low, high = (np.array(b, float) for b in best.bounds_ras)
    return RoiBox(tuple((low + high) / 2), tuple(np.maximum(high - low, MATCH_BOX_THICKNESS_MM)))


@dataclass
class ExportedScene:
    """What a scene export wrote: the file, its volume and ROI nodes by name, and results left out (with why)."""

    path: str
    volumes: list[str] = field(default_factory=list)
    rois: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _volume_node(made, path: str, name: str):
    """A volume node for a file (Slicer's reader) or a DICOM folder (the core reader, no file behind the node)."""
    from ..imaging.readers import read_volume

    if not os.path.exists(path):
        raise InputError(path, "does not exist (moved or deleted since the search)")
    if os.path.isdir(path):
        node = node_from_volume(made.scene, read_volume(path), name)
    else:
        node = made.volumes.AddArchetypeVolume(path, name)  # VTK's messages are kept from the terminal (export_scene)
    if node is None:
        raise InputError(path, "Slicer could not load this volume")
    node.SetAttribute(SOURCE_ATTRIBUTE, os.path.abspath(path))
    return node


def _roi(scene, roi: RoiBox, name: str, locked: bool = True):
    node = roi_node_for(scene, roi, name)
    node.SetLocked(locked)
    display = node.GetDisplayNode()
    if display is not None:
        display.SetFillOpacity(0.0)
    node.AddDefaultStorageNode()
    return node


def export_scene(saved: SavedSearch, path: str) -> ExportedScene:
    """Write a saved search as a Slicer scene: ``.mrb`` (a bundle with copies of the data) or ``.mrml`` (refers to the files).

    Nodes: the query volume, its ROI ('Query ROI'), each result's volume ('1. name', ...) and its match box
    ('Match 1: name', ...), each at its RAS place; results whose volume is not there any more are listed as skipped.
    """
    path = os.path.abspath(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in SCENE_SUFFIXES:
        raise ParameterError(f"{path}: a scene file must end in .mrb or .mrml")
    with quiet_vtk():  # a volume Slicer cannot read makes VTK and ITK print a hundred lines; the skipped list says it in one
        return _export_scene(saved, path, suffix)


def _export_scene(saved: SavedSearch, path: str, suffix: str) -> ExportedScene:
    made = fresh_scene()
    scene = made.scene
    out = ExportedScene(path)
    if saved.query.volume is not None:
        saved.query.volume.check("the query volume")
        node = _volume_node(made, saved.query.volume.path, "Query: " + os.path.basename(saved.query.volume.path).split(".")[0])
        out.volumes.append(node.GetName())
    if saved.query.spec.roi is not None:
        roi = _roi(scene, saved.query.spec.roi, "Query ROI", locked=False)
        out.rois.append(roi.GetName())
    for result in saved.answer.results:
        try:
            node = _volume_node(made, result.source, f"{result.rank}. {result.title}")
        except (InputError, OSError) as error:
            out.skipped.append((result.case_id, str(error)))
            continue
        node.SetAttribute(CASE_ATTRIBUTE, result.case_id)
        node.SetAttribute(RANK_ATTRIBUTE, str(result.rank))
        box = _roi(scene, match_box(result.best_match), f"Match {result.rank}: {result.title}")
        box.SetAttribute(CASE_ATTRIBUTE, result.case_id)
        box.SetAttribute(RANK_ATTRIBUTE, str(result.rank))
        out.volumes.append(node.GetName())
        out.rois.append(box.GetName())
    if not out.volumes:
        raise InputError(path, "nothing to export: neither the query volume nor any result volume could be read")
    _write_scene(made, path, suffix)
    return out


def _write_scene(made, path: str, suffix: str) -> None:
    """Write the scene with MRML's writers, under a temporary name renamed into place."""
    import shutil
    import tempfile

    scene = made.scene
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    stem = os.path.splitext(os.path.basename(path))[0]
    if suffix == ".mrb":
        # The bundle's folder inside is named after the file: write it under its own name in a temporary folder.
        work = tempfile.mkdtemp(prefix=".cbir-export-", dir=folder)
        try:
            if not scene.WriteToMRB(os.path.join(work, os.path.basename(path))):
                raise InputError(path, "MRML could not write the scene bundle")
            _repair_bundle(os.path.join(work, os.path.basename(path)), path)
            os.replace(os.path.join(work, os.path.basename(path)), path)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    data = os.path.join(folder, f"{stem}_data")  # the ROI files (and any volume without a file) beside the scene
    os.makedirs(data, exist_ok=True)
    scene.SetRootDirectory(folder)
    for n in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(n)
        if not (node.IsA("vtkMRMLMarkupsNode") or node.IsA("vtkMRMLScalarVolumeNode")):
            continue  # only what the export made: the logics' own nodes (colour tables) stay as Slicer has them
        storage = node.GetStorageNode()
        if storage is None:
            node.AddDefaultStorageNode()
            storage = node.GetStorageNode()
        if storage is None:
            continue
        if not storage.GetFileName() or node.IsA("vtkMRMLMarkupsNode"):
            safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in node.GetName())
            storage.SetFileName(os.path.join(data, f"{safe}.{storage.GetDefaultWriteFileExtension()}"))
            if not storage.WriteData(node):
                raise InputError(storage.GetFileName(), "MRML could not write this file of the scene")
    with replaced(path) as temporary:
        scene.SetURL(path)
        if not scene.Commit(temporary):
            raise InputError(path, "MRML could not write the scene")
        with open(temporary, encoding="utf-8") as handle:
            text = readable_scene(handle.read(), path, lambda name: os.path.exists(os.path.join(folder, name)))
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.write(text)


# MRML URL-encodes a file name in a scene file (space, %, quotes, < and >) but writes an & raw, which is not XML: the
# scene file is then not well-formed and Slicer loads nothing from it (vtkMRMLNode::URLEncodeString, slicer-core 4.0).
_FILE_REFERENCE = re.compile(r'(\s(?:fileName|fileListMember\d+)=")([^"]*)(")')
_XML_SPECIALS = {"&": "&amp;", "<": "&lt;", ">": "&gt;", "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"}


def _file_references_escaped(text: str) -> str:
    return _FILE_REFERENCE.sub(lambda m: m[1] + "".join(_XML_SPECIALS.get(c, c) for c in m[2]) + m[3], text)


def readable_scene(text: str, path: str, exists) -> str:
    """A scene file's text as Slicer can read it: well-formed XML whose every file reference (decoded as MRML decodes it,
    relative to the scene) ``exists``; file references MRML left unescaped are escaped. Else an InputError naming ``path``."""
    from xml.etree import ElementTree

    problem = ""
    for candidate in (text, _file_references_escaped(text)):
        try:
            root = ElementTree.fromstring(candidate)
        except ElementTree.ParseError as error:
            problem = f"not well-formed XML ({error})"
            continue
        names = [mrml_url_decoded(value) for element in root.iter() for key, value in element.attrib.items()
                 if key == "fileName" or re.fullmatch(r"fileListMember\d+", key)]
        missing = [name for name in names if not exists(name)]
        if not missing:
            return candidate
        problem = f"it refers to {missing[0]}, which is not there"
    raise InputError(path, f"MRML wrote a scene that Slicer could not read: {problem}")


def _repair_bundle(bundle: str, path: str) -> None:
    """The scene file inside an .mrb made readable (:func:`readable_scene`), the bundle rewritten with it."""
    import zipfile

    with zipfile.ZipFile(bundle) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    scenes = [name for name in members if name.lower().endswith(".mrml")]
    if len(scenes) != 1:
        raise InputError(path, f"MRML wrote a bundle with {len(scenes)} scene files, not one")
    inside = os.path.dirname(scenes[0])
    text = readable_scene(members[scenes[0]].decode("utf-8"), path,
                          lambda name: os.path.normpath(os.path.join(inside, name)).replace(os.sep, "/") in members)
    members[scenes[0]] = text.encode("utf-8")
    with zipfile.ZipFile(bundle, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
