"""Shared fixtures: synthetic phantoms in many storage orientations, and a headless MRML scene (slicer-core)."""

from __future__ import annotations

import numpy as np
import pytest
from volume_helpers import reorient

from CBIRSlicerLib.imaging import synthetic

FORMATS = (".nii.gz", ".nrrd", ".mha")
SHAPE = (40, 36, 28)


def _canonical(spacing=(1.0, 1.0, 1.0), origin_shift=(0.0, 0.0, 0.0)):
    matrix = synthetic.centered_matrix(SHAPE, spacing)
    matrix[:3, 3] += origin_shift
    return synthetic.render(matrix, SHAPE, body_radii=(18.0, 16.0, 14.0))


def _blobs():
    return [synthetic.Blob((6.0, -5.0, 3.0), 4.0, 300.0), synthetic.Blob((-7.0, 6.0, -4.0), 3.5, -400.0),
            synthetic.Blob((2.0, 7.0, 6.0), 4.5, 150.0, "shell", 1.5)]


def make_case(name: str):
    """(canonical volume, twin volume, exact): the twin holds the same anatomy stored another way."""
    spacing, shift = (1.0, 1.0, 1.0), (0.0, 0.0, 0.0)
    if name == "anisotropic":
        spacing = (0.8, 1.2, 2.0)
    if name == "nonzero-origin":
        shift = (-120.5, 48.0, 310.25)
    matrix = synthetic.centered_matrix(SHAPE, spacing)
    matrix[:3, 3] += shift
    blobs = [synthetic.Blob(tuple(np.add(b.center, shift)), b.radius, b.value, b.kind, b.wall_mm) for b in _blobs()]
    body_centre = tuple(shift)
    canonical = _render(matrix, SHAPE, blobs, body_centre)
    storage = {
        "identity": ((0, 1, 2), (False, False, False)),
        "flip-lr": ((0, 1, 2), (True, False, False)),
        "upside-down": ((0, 1, 2), (False, False, True)),
        "rot90-axial": ((1, 0, 2), (True, False, False)),
        "sagittal-stored": ((1, 2, 0), (False, True, False)),
        "coronal-stored": ((0, 2, 1), (True, True, False)),
        "anisotropic": ((2, 0, 1), (False, True, True)),
        "nonzero-origin": ((0, 1, 2), (True, True, True)),
    }
    if name == "oblique":
        directions = synthetic.rotation(12.0, -8.0, 20.0)
        twin = _render(synthetic.centered_matrix(SHAPE, spacing, directions), SHAPE, blobs, body_centre)
        return canonical, twin, False, blobs
    permutation, flips = storage[name]
    return canonical, reorient(canonical, permutation, flips), True, blobs


def _render(matrix, shape, blobs, body_centre):
    i, j, k = shape
    kk, jj, ii = np.meshgrid(np.arange(k), np.arange(j), np.arange(i), indexing="ij")
    ras = np.stack([ii, jj, kk], -1).astype(float) @ matrix[:3, :3].T + matrix[:3, 3]
    values = synthetic.phantom_values(ras, blobs, (18.0, 16.0, 14.0), body_centre)
    from CBIRSlicerLib.imaging.volume import Volume

    return Volume.from_array(np.round(values).astype(np.int16), matrix, name="phantom")


CASES = ("identity", "flip-lr", "upside-down", "rot90-axial", "sagittal-stored", "coronal-stored",
         "anisotropic", "nonzero-origin", "oblique")


def headless_slicer(layout: bool = False):
    """A scene set up as Slicer sets one up, without the application: the product's own scene
    (:func:`scene.nodes.fresh_scene`: application, colour, volumes and markups logics), and optionally the layout logic
    (made after the application logic, so slice views get their orientation presets).

    MRML logics hold each other by weak pointers: the returned namespace keeps every object alive.
    """
    from types import SimpleNamespace

    slicer = pytest.importorskip("slicer")
    from CBIRSlicerLib.scene.nodes import fresh_scene

    made = fresh_scene()
    layout_logic = layout_node = None
    if layout:
        layout_logic = slicer.vtkMRMLLayoutLogic()
        layout_logic.SetMRMLApplicationLogic(made.app_logic)
        layout_logic.SetMRMLScene(made.scene)
        layout_node = layout_logic.GetLayoutNode()
    return SimpleNamespace(scene=made.scene, app_logic=made.app_logic, volumes=made.volumes, layout_node=layout_node,
                           keep_alive=(made.keep_alive, layout_logic))


def open_scene_file(path: str, cache: str):
    """A scene file opened as Slicer opens it, in a :func:`headless_slicer` scene: an .mrb through ReadFromMRB (its files
    unpacked under ``cache``), an .mrml through Connect. The returned namespace keeps every object alive."""
    slicer = pytest.importorskip("slicer")
    opened = headless_slicer()
    scene = opened.scene
    if path.endswith(".mrb"):
        manager = slicer.vtkCacheManager()
        manager.SetRemoteCacheDirectory(cache)
        io = slicer.vtkDataIOManager()
        io.SetCacheManager(manager)
        scene.SetDataIOManager(io)
        scene.SetCacheManager(manager)
        opened.io = (io, manager)
        assert scene.ReadFromMRB(path)
    else:
        scene.SetURL(path)
        assert scene.Connect()
    return opened


@pytest.fixture(scope="session")
def mrml_volumes_logic():
    """A vtkSlicerVolumesLogic on a fresh scene, set up as Slicer does, to load files headlessly."""
    headless = headless_slicer()
    logic = headless.volumes
    logic.keep_alive = headless
    return logic


@pytest.fixture(scope="session")
def other_user():
    """Python as user nobody, over a readable install of CBIRSlicerLib that this run arranges (``other_user.py``), so the
    tests that switch user pass from a checkout in a private folder too. Skipped without root and setpriv."""
    import os
    import shutil

    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv to run as a user who cannot write the index")
    from other_user import NoReadableInstall, readable_install

    try:
        user = readable_install()
    except NoReadableInstall as error:
        pytest.skip(f"no readable install for user nobody: {error}")
    yield user
    user.remove()
