"""The panel harness itself: its ``qt`` adapters and stand-ins do not hide errors, and its parameter-node wrapper binds
widgets as Slicer's parameterNodeWrapper is documented to (typed values, defaults, Choice/WithinRange, two-way binding
through ``SlicerParameterName``, disconnectGui)."""

from __future__ import annotations

import os
import pathlib
import sys
import types
from typing import Annotated

import pytest

pytest.importorskip("slicer")
pytest.importorskip("PySide6")
pytest.importorskip("pytestqt")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import slicer
from conftest import headless_slicer
from slicer_harness import parameter_nodes, qt, stand_ins
from slicer_harness.parameter_nodes import Choice, WithinRange, parameterNodeWrapper


@pytest.fixture(scope="session")
def qapp_cls():
    return stand_ins.qSlicerApplication


@pytest.fixture
def env(qapp, monkeypatch):
    """A scene as ``slicer.mrmlScene`` and the ``qt`` adapter as the ``qt`` module, as the panel tests have them."""
    headless = headless_slicer()
    monkeypatch.setattr(slicer, "mrmlScene", headless.scene, raising=False)
    monkeypatch.setattr(slicer, "qMRMLNodeComboBox", stand_ins.qMRMLNodeComboBox, raising=False)
    monkeypatch.setitem(sys.modules, "qt", qt)
    return headless


# ----- qt adapters -----------------------------------------------------------------------------------------------

def test_properties_read_and_written_as_attributes_as_in_pythonqt(qapp):
    button = qt.QPushButton()
    button.text = "Find similar"
    button.enabled = False
    assert button.text == "Find similar" and button.enabled is False and not button.isEnabled()
    button.objectName = "findSimilarButton"
    assert button.name == "findSimilarButton"
    with pytest.raises(AttributeError, match="QPushButton has no property or attribute 'enable'"):
        button.enable = True  # a misspelt property: PythonQt would add it silently
    with pytest.raises(TypeError, match="maximum cannot be set"):
        qt.QProgressBar().maximum = "a hundred"


def test_connect_by_signature_passes_as_many_arguments_as_the_slot_takes(qapp):
    box, calls = qt.QCheckBox(), []
    box.connect("toggled(bool)", lambda: calls.append("none"))
    box.connect("toggled(bool)", lambda checked: calls.append(checked))
    box.checked = True
    assert calls == ["none", True]
    record = qt.CONNECTIONS[-1]
    assert (record.signature, record.calls) == ("toggled(bool)", 1)
    with pytest.raises(AttributeError, match="has no signal clicked\\(int\\)"):
        box.connect("clicked(int)", print)
    with pytest.raises(AttributeError, match="has no signal currentPathChanged"):
        box.connect("currentPathChanged(QString)", print)


def test_an_exception_in_a_slot_is_recorded_and_raised(qapp, qtbot):
    timer = qt.QTimer()
    qt.SLOT_ERRORS.clear()

    def fail():
        raise ValueError("in a slot")

    timer.connect("timeout()", fail)
    with qtbot.captureExceptions() as caught:
        timer.timeout.emit()
    assert [str(e) for e in qt.SLOT_ERRORS] == ["in a slot"] and caught
    qt.SLOT_ERRORS.clear()


def test_the_ui_loader_refuses_unknown_classes_and_properties(qapp):
    def ui(widget: str, prop: str) -> bytes:
        return (f'<ui version="4.0"><class>W</class><widget class="QWidget" name="W"><layout class="QVBoxLayout" name="l">'
                f'<item><widget class="{widget}" name="child"><property name="{prop}"><bool>true</bool></property></widget>'
                f'</item></layout></widget></ui>').encode()

    def load(data: bytes):
        buffer = qt.QBuffer()
        buffer.setData(data)
        buffer.open(qt.QIODevice.ReadOnly)
        return qt.QUiLoader().load(buffer)

    assert type(load(ui("ctkCollapsibleGroupBox", "collapsed")).findChild(qt.QtWidgets.QWidget, "child")).__name__ == \
        "ctkCollapsibleGroupBox"
    with pytest.raises(RuntimeError, match="no widget class ctkSliderWidget"):
        load(ui("ctkSliderWidget", "enabled"))
    with pytest.raises(RuntimeError, match="QCheckBox child has no property collapsed"):
        load(ui("QCheckBox", "collapsed"))


def test_node_combo_box_lists_the_scenes_nodes_of_its_types(env):
    scene = env.scene
    combo = stand_ins.qMRMLNodeComboBox()
    combo.nodeTypes = ["vtkMRMLScalarVolumeNode"]
    combo.noneEnabled = True
    combo.setMRMLScene(scene)
    changes = []
    combo.currentNodeChanged.connect(changes.append)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "roi")
    assert [combo.itemText(n) for n in range(combo.count)] == ["(none)", "ct"] and combo.currentNode() is None
    combo.setCurrentNode(volume)
    assert combo.currentNode() is volume and changes == [volume]
    scene.RemoveNode(volume)
    assert combo.currentNode() is None and changes == [volume, None]
    with pytest.raises(AttributeError):
        combo.addEnable = True


# ----- parameter-node wrapper ------------------------------------------------------------------------------------

@parameterNodeWrapper
class _Parameters:
    folder: pathlib.Path
    mode: Annotated[str, Choice(["Region", "Slice"])] = "Slice"
    k: Annotated[int, WithinRange(1, 100)] = 10
    text: str = ""
    linked: bool = False
    volume: slicer.vtkMRMLScalarVolumeNode


def _node(scene):
    return scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")


def test_values_are_typed_defaulted_and_stored_in_the_node(env):
    node = _node(env.scene)
    p = _Parameters(node)
    assert (p.folder, p.mode, p.k, p.text, p.linked, p.volume) == (pathlib.Path(), "Slice", 10, "", False, None)
    assert node.GetParameter("mode") == "Slice" and node.GetParameter("k") == "10"  # defaults written at once
    volume = env.scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    p.volume, p.k, p.linked, p.folder = volume, 7, True, pathlib.Path("/data/index")
    assert node.GetNodeReference("volume") is volume and node.GetParameter("linked") == "True"
    assert _Parameters(node).k == 7 and _Parameters(node).folder == pathlib.Path("/data/index")  # read back from the node
    with pytest.raises(ValueError, match="within"):
        p.mode = "Volume"
    with pytest.raises(ValueError, match="within"):
        p.k = 0
    with pytest.raises(ValueError, match="must be a int"):
        p.k = "7"
    with pytest.raises(ValueError, match="Cannot find a param"):
        p.getValue("nothing")


def test_writing_a_value_modifies_the_node_once(env):
    p = _Parameters(_node(env.scene))
    events = []
    p.AddObserver(parameter_nodes.vtk.vtkCommand.ModifiedEvent, lambda caller, event: events.append(p.k))
    p.k = 42
    assert events == [42]  # observers see the new value


def _ui():
    """Widgets named as in a .ui, with SlicerParameterName, gathered as slicer.util.childWidgetVariables does."""
    widgets = {"folderEdit": (stand_ins.ctkPathLineEdit(), "folder"), "modeBox": (qt.QComboBox(), "mode"),
               "kSpin": (qt.QSpinBox(), "k"), "textEdit": (qt.QLineEdit(), "text"), "linkBox": (qt.QCheckBox(), "linked"),
               "volumeBox": (stand_ins.qMRMLNodeComboBox(), "volume")}
    ui = types.SimpleNamespace()
    for name, (widget, parameter) in widgets.items():
        widget.setProperty(parameter_nodes.SlicerParameterNamePropertyName, parameter)
        setattr(ui, name, widget)
    return ui


def test_connect_gui_binds_both_ways_until_disconnected(env):
    scene = env.scene
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    ui = _ui()
    ui.volumeBox.noneEnabled = True
    ui.volumeBox.setMRMLScene(scene)
    p = _Parameters(_node(scene))
    tag = p.connectGui(ui)
    # The node's values reach the widgets at once; the combo box holds the choices; the spin box the range.
    assert [ui.modeBox.itemText(n) for n in range(ui.modeBox.count)] == ["Region", "Slice"] and ui.modeBox.currentText == "Slice"
    assert (ui.kSpin.value, ui.kSpin.minimum, ui.kSpin.maximum) == (10, 1, 100) and ui.folderEdit.currentPath == "."
    assert ui.volumeBox.nodeTypes == ["vtkMRMLScalarVolumeNode"]
    # The user's edits reach the node ...
    ui.kSpin.value = 25
    ui.modeBox.currentIndex = 0
    ui.textEdit.text = "cyst"
    ui.linkBox.checked = True
    ui.folderEdit.currentPath = "/data/index"
    ui.volumeBox.setCurrentNode(volume)
    assert (p.k, p.mode, p.text, p.linked, p.folder, p.volume) == (25, "Region", "cyst", True, pathlib.Path("/data/index"), volume)
    # ... and the node's changes reach the widgets.
    p.k, p.mode, p.volume = 3, "Slice", None
    assert (ui.kSpin.value, ui.modeBox.currentText, ui.volumeBox.currentNode()) == (3, "Slice", None)
    p.disconnectGui(tag)
    ui.kSpin.value = 50
    p.text = "solid"
    assert p.k == 3 and ui.textEdit.text == "cyst"


def test_connect_gui_refuses_a_widget_slicer_has_no_connector_for(env):
    ui = types.SimpleNamespace(slider=qt.QSlider())
    ui.slider.setProperty(parameter_nodes.SlicerParameterNamePropertyName, "text")
    with pytest.raises(RuntimeError, match="Unable to create GUI connector"):
        _Parameters(_node(env.scene)).connectGui(ui)
    ui = types.SimpleNamespace(box=qt.QComboBox())
    ui.box.setProperty(parameter_nodes.SlicerParameterNamePropertyName, "text")  # a plain str: no Choice to list
    with pytest.raises(RuntimeError, match="requires the Choice annotation"):
        _Parameters(_node(env.scene)).connectGui(ui)
