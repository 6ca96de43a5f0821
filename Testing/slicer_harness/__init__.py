"""Runs the module file ``CBIRSlicer/CBIRSlicer.py`` unchanged, in the test process, in a real Qt application over real MRML.

``qt`` is PySide6 with PythonQt's API on top (``qt.py``); ``slicer`` is slicer-core (MRML classes, logics and Slicer's
own ``slicer.util``) with the application's parts that no package provides filled in by the stand-ins listed in
``stand_ins.py`` (and the parameter-node wrapper in ``parameter_nodes.py``). The module file is loaded from disk as
Slicer loads it; nothing in it is patched or skipped.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import slicer

from . import parameter_nodes, qt, stand_ins

MODULE_FILE = Path(__file__).resolve().parents[2] / "CBIRSlicer" / "CBIRSlicer.py"


@dataclass
class Panel:
    """The module's widget in its panel, in a main window, with the scene it works on."""

    module: types.ModuleType
    widget: object
    panel: stand_ins.qSlicerScriptedModulePanel
    window: stand_ins.qSlicerMainWindow
    scene: object
    app: stand_ins.qSlicerApplication

    @property
    def ui(self):
        return self.widget.ui

    def enter(self) -> None:
        """What Slicer does when the user selects the module."""
        self.panel.isEntered = True
        self.widget.enter()

    def exit(self) -> None:
        self.widget.exit()
        self.panel.isEntered = False

    def screenshot(self, folder: str, name: str) -> str:
        """Save the panel as the user sees it (a PNG); returns its path."""
        self.app.processEvents()
        path = os.path.join(folder, name)
        if not self.panel.grab().save(path):
            raise OSError(f"could not write the screenshot {path}")
        return path

    def close(self) -> None:
        self.widget.cleanup()
        self.window.close()
        self.window.deleteLater()


def modules(scene, app) -> tuple[dict, dict]:
    """(sys.modules entries, attributes of the ``slicer`` package) that make the Slicer-like environment."""
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(scripted, name, getattr(stand_ins, name))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    for name in ("parameterNodeWrapper", "Choice", "WithinRange", "SlicerParameterNamePropertyName"):
        setattr(wrapper, name, getattr(parameter_nodes, name))
    ctk = types.ModuleType("ctk")
    for name in ("ctkMessageBox", "ctkPathLineEdit", "ctkCollapsibleButton", "ctkCollapsibleGroupBox"):
        setattr(ctk, name, getattr(stand_ins, name))
    entries = {"qt": qt, "ctk": ctk, "slicer.ScriptedLoadableModule": scripted, "slicer.parameterNodeWrapper": wrapper}
    attributes = {"app": app, "mrmlScene": scene, "ScriptedLoadableModule": scripted, "parameterNodeWrapper": wrapper,
                  "qMRMLNodeComboBox": stand_ins.qMRMLNodeComboBox, "qMRMLWidget": stand_ins.qMRMLWidget}
    return entries, attributes


def load_module_file() -> types.ModuleType:
    """Run the module file as Slicer does (a module named after the file)."""
    spec = importlib.util.spec_from_file_location("CBIRSlicer", MODULE_FILE)
    module = importlib.util.module_from_spec(spec)
    sys.modules["CBIRSlicer"] = module
    spec.loader.exec_module(module)
    return module


def start(monkeypatch, app: stand_ins.qSlicerApplication, home: Path) -> Panel:
    """Set up the application on a fresh scene, load the module file and set its widget up in a shown main window."""
    from conftest import headless_slicer

    headless = headless_slicer()
    (home / "bin").mkdir(parents=True, exist_ok=True)
    python = home / "bin" / "PythonSlicer"
    if not python.exists():  # the workers' interpreter, where a Slicer install has it: a launcher, as Slicer's is
        python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')  # (a symlink would leave this virtual environment)
        python.chmod(0o755)
    app.setUp(str(home), headless.app_logic, headless.volumes, headless.scene)
    app.__dict__["_keep_alive"] = headless
    entries, attributes = modules(headless.scene, app)
    for name, value in entries.items():
        monkeypatch.setitem(sys.modules, name, value)
    for name, value in attributes.items():
        monkeypatch.setattr(slicer, name, value, raising=False)
    monkeypatch.setitem(sys.modules, "CBIRSlicer", None)
    qt.CONNECTIONS.clear()
    qt.SLOT_ERRORS.clear()
    stand_ins.MESSAGES.clear()
    module = load_module_file()
    module.CBIRSlicer(stand_ins.ModuleParent())
    panel = stand_ins.qSlicerScriptedModulePanel()
    window = stand_ins.qSlicerMainWindow(panel)
    window.resize(460, 780)
    widget = module.CBIRSlicerWidget(panel)
    widget.setup()
    window.show()
    return Panel(module, widget, panel, window, headless.scene, app)
