"""Every stand-in of the harness, in one place: the parts of the Slicer application that no package provides.

Real, not stood in: Qt (PySide6, through the ``qt`` adapters in ``qt.py``), MRML and Slicer's logics (slicer-core:
scene, volumes, layout logic, slice and markups nodes), ``slicer.util`` (slicer-core ships Slicer's own util.py:
loadUI, childWidgetVariables, tryWithErrorDisplay, errorDisplay, VTKObservationMixin, loadVolume...), ``vtk``.

Stood in, each imitating the documented Slicer behaviour named in its docstring and no more:

=============================  ======================================================================================
qSlicerApplication             ``slicer.app``: a real QApplication with Slicer's extra methods
qSlicerIOManager               ``slicer.app.coreIOManager()``: loads volume files (all ``slicer.util.loadVolume`` needs)
qSlicerLayoutManager           ``slicer.app.layoutManager()``: holds the layout logic; draws no views
qSlicerMainWindow              the main window (``slicer.util.mainWindow()``), holding the module panel
ctkMessageBox                  the message box of ``slicer.util.messageBox``: records, answers OK without waiting
ctkCollapsibleButton           CTK's collapsible section (a group box here), ``text`` and ``collapsed``
ctkCollapsibleGroupBox         CTK's collapsible group box, ``collapsed``
ctkPathLineEdit                CTK's path field: ``currentPath``, ``currentPathChanged(QString)``
qMRMLWidget                    ``setMRMLScene`` / ``mrmlSceneChanged(vtkMRMLScene*)``
qMRMLNodeComboBox              MRML node selector: lists the scene's nodes of ``nodeTypes``
qSlicerScriptedModulePanel     the module panel Slicer gives a scripted widget as ``parent`` (``isEntered``)
ModuleParent                   the ``parent`` of a ScriptedLoadableModule (title, categories, help...)
ScriptedLoadableModule*        ``slicer.ScriptedLoadableModule`` base classes (Module, Widget, Logic, Test)
parameterNodeWrapper           ``slicer.parameterNodeWrapper``: a larger imitation with its own tests, in
                               ``parameter_nodes.py`` (typed parameters, Choice/WithinRange, connectGui)
=============================  ======================================================================================

None hides an error of the module: they are built on the ``qt`` adapter classes, so an unknown property or signal
raises, and attributes they do not define raise AttributeError.
"""

from __future__ import annotations

import os
import sys
import unittest

import slicer
import vtk

from . import qt

MESSAGES: list[dict] = []  # what ctkMessageBox was asked to show, in order


class qSlicerApplication(qt.PythonQtObject, qt.QtWidgets.QApplication):
    """``slicer.app`` (qSlicerApplication): paths, testing flag, application logic, IO and layout managers."""

    slicerHome = temporaryPath = None
    testing = False  # as a user runs Slicer: errors are shown in message boxes, not only logged

    def setUp(self, home: str, app_logic, volumes_logic, scene) -> None:
        self.slicerHome, self.temporaryPath = home, os.path.join(home, "tmp")
        self._app_logic, self._io, self._layout = app_logic, qSlicerIOManager(volumes_logic), qSlicerLayoutManager(app_logic, scene)

    def testingEnabled(self) -> bool:
        return self.testing

    def applicationLogic(self):
        return self._app_logic

    def coreIOManager(self):
        return self._io

    def layoutManager(self):
        return self._layout


class qSlicerIOManager:
    """``coreIOManager()``: ``fileType`` and ``loadNodes`` for volume files, read by Slicer's vtkSlicerVolumesLogic."""

    def __init__(self, volumes_logic):
        self.volumes = volumes_logic  # the application's, set up with colours as Slicer sets it up
        self.loaded: list[str] = []

    def fileType(self, path: str) -> str:
        return "VolumeFile"

    def loadNodes(self, fileType: str, properties: dict, loadedNodes, messages) -> bool:
        if fileType != "VolumeFile":
            messages.AddMessage(vtk.vtkCommand.ErrorEvent, f"the stand-in IO manager reads only volumes, not {fileType}")
            return False
        path = properties["fileName"]
        node = self.volumes.AddArchetypeVolume(path, properties.get("name") or os.path.basename(path))
        if node is None:
            return False
        self.loaded.append(path)
        loadedNodes.AddItem(node)
        return True  # "show": False is what the module asks; this manager never shows anything


class qSlicerLayoutManager:
    """``layoutManager()``: its ``layoutLogic()`` is the scene's real vtkMRMLLayoutLogic; no view widgets are drawn."""

    def __init__(self, app_logic, scene):
        self._logic = slicer.vtkMRMLLayoutLogic()
        self._logic.SetMRMLApplicationLogic(app_logic)
        self._logic.SetMRMLScene(scene)

    def layoutLogic(self):
        return self._logic

    @property
    def layout(self) -> int:
        return self._logic.GetLayoutNode().GetViewArrangement()


class qSlicerMainWindow(qt.QMainWindow):
    """The main window: found by ``slicer.util.mainWindow()`` through its object name; holds the module panel."""

    def __init__(self, panel):
        super().__init__()
        self.setObjectName("qSlicerMainWindow")
        self.setCentralWidget(panel)


class ctkMessageBox(qt.QMessageBox):
    """The box ``slicer.util.messageBox`` shows: its title, text and details are recorded, then it answers OK at once."""

    def exec_(self) -> int:
        MESSAGES.append({"title": self.windowTitle.strip(), "text": self.text, "details": self.detailedText,
                         "icon": self.icon})
        return qt.QMessageBox.Ok

    exec = exec_


@qt.register_custom_widget
class ctkCollapsibleButton(qt.QGroupBox):
    """CTK's collapsible section: a titled box whose ``text`` is its title; ``collapsed`` hides its contents."""

    def _text(self) -> str:
        return self.title

    def _set_text(self, text: str) -> None:
        self.title = text

    def _collapsed(self) -> bool:
        return bool(self.__dict__.get("_is_collapsed", False))

    def _set_collapsed(self, collapsed: bool) -> None:
        self.__dict__["_is_collapsed"] = collapsed
        self._show_contents()
        qt.QtCore.QTimer.singleShot(0, self, self._show_contents)  # also the contents the .ui adds after setting it

    def _show_contents(self) -> None:
        for child in self.findChildren(qt.QtWidgets.QWidget, options=qt.Qt.FindDirectChildrenOnly):
            child.setVisible(not self._collapsed())

    text = qt.Property(str, _text, _set_text)
    collapsed = qt.Property(bool, _collapsed, _set_collapsed)


@qt.register_custom_widget
class ctkCollapsibleGroupBox(qt.QGroupBox):
    """CTK's collapsible group box: ``collapsed`` hides its contents (the .ui starts the build section collapsed)."""

    _collapsed, _set_collapsed = ctkCollapsibleButton._collapsed, ctkCollapsibleButton._set_collapsed
    _show_contents = ctkCollapsibleButton._show_contents
    collapsed = qt.Property(bool, _collapsed, _set_collapsed)


@qt.register_custom_widget
class ctkPathLineEdit(qt.QWidget):
    """CTK's path field: ``currentPath``; ``currentPathChanged(QString)`` when it changes, typed or set. No browse button."""

    currentPathChanged = qt.Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._edit = qt.QtWidgets.QLineEdit(self)
        qt.QtWidgets.QHBoxLayout(self).addWidget(self._edit)
        self.layout().setContentsMargins(0, 0, 0, 0)
        self._edit.textChanged.connect(self.currentPathChanged.emit)

    def _path(self) -> str:
        return self._edit.text()

    def _set_path(self, path: str) -> None:
        self._edit.setText(path)  # emits currentPathChanged only when the text changes, as CTK does

    currentPath = qt.Property(str, _path, _set_path)
    filters = qt.Property(int, lambda self: 0, lambda self, value: None)  # the .ui's Dirs|Drives|...: no file dialog here


@qt.register_custom_widget
class qMRMLWidget(qt.QWidget):
    """A widget holding a scene: ``setMRMLScene`` emits ``mrmlSceneChanged(vtkMRMLScene*)``, which the .ui forwards."""

    mrmlSceneChanged = qt.Signal(object)

    def setMRMLScene(self, scene) -> None:
        self.__dict__["_scene"] = scene
        self.mrmlSceneChanged.emit(scene)

    def mrmlScene(self):
        return self.__dict__.get("_scene")


@qt.register_custom_widget
class qMRMLNodeComboBox(qt.QComboBox):
    """MRML node selector: the scene's nodes of ``nodeTypes`` (by name), '(none)' first when ``noneEnabled``; emits
    ``currentNodeChanged(vtkMRMLNode*)`` when the selection changes. Not done: adding, removing or renaming nodes."""

    currentNodeChanged = qt.Signal(object)

    def __init__(self, parent=None):
        super().__init__(parent)
        self._types, self._none, self._scene, self._nodes = [], False, None, []
        self.currentIndexChanged.connect(lambda index: self.currentNodeChanged.emit(self.currentNode()))

    def setMRMLScene(self, scene) -> None:
        self._scene = scene
        for event in (scene.NodeAddedEvent, scene.NodeRemovedEvent, scene.EndCloseEvent):
            scene.AddObserver(event, lambda caller, name: self._refresh())
        self._refresh()

    def _refresh(self, **changes) -> None:
        self.__dict__.update(changes)
        scene, current = self._scene, self.currentNode()
        nodes = [scene.GetNthNode(n) for n in range(scene.GetNumberOfNodes())] if scene is not None else []
        self._nodes = [None] * self._none + [n for n in nodes if any(n.IsA(t) for t in self._types)]
        with qt.QSignalBlocker(self):
            self.clear()
            self.addItems([node.GetName() if node else "(none)" for node in self._nodes])
        self.setCurrentNode(current if current in self._nodes else None, before=current)

    def currentNode(self):
        return self._nodes[self.currentIndex] if 0 <= self.currentIndex < len(self._nodes) else None

    def setCurrentNode(self, node, before=False) -> None:
        before = self.currentNode() if before is False else before
        with qt.QSignalBlocker(self):
            self.setCurrentIndex(self._nodes.index(node) if node in self._nodes else -1)
        if self.currentNode() is not before:
            self.currentNodeChanged.emit(self.currentNode())

    nodeTypes = qt.Property(list, lambda self: list(self._types), lambda self, types: self._refresh(_types=list(types)))
    noneEnabled = qt.Property(bool, lambda self: self._none, lambda self, on: self._refresh(_none=bool(on)))
    addEnabled = removeEnabled = showChildNodeTypes = qt.Property(bool, lambda self: False, lambda self, on: None)


class qSlicerScriptedModulePanel(qt.QWidget):
    """The panel Slicer gives a scripted module widget as ``parent``: a vertical layout, and ``isEntered``."""

    def __init__(self):
        super().__init__()
        self.setObjectName("CBIRSlicerPanel")
        qt.QtWidgets.QVBoxLayout(self)
        self.__dict__["_entered"] = False

    isEntered = qt.Property(bool, lambda self: self._entered, lambda self, on: self.__dict__.update(_entered=bool(on)))


class ModuleParent:
    """The ``parent`` a ScriptedLoadableModule fills in (qSlicerScriptedLoadableModule's properties); others raise."""

    __slots__ = ("title", "categories", "dependencies", "contributors", "helpText", "acknowledgementText")


class ScriptedLoadableModule:
    """Base of the module class: keeps ``parent`` (Slicer also adds the module to the module list: not done here)."""

    def __init__(self, parent):
        self.parent = parent


class ScriptedLoadableModuleLogic:
    """Base logic: ``moduleName`` from the class name; ``getParameterNode`` as Slicer's (the singleton node of the module)."""

    def __init__(self, parent=None):
        self.moduleName = type(self).__name__.removesuffix("Logic")

    def getParameterNode(self):
        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
            node.SetAttribute("ModuleName", self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleWidget:
    """Base widget: ``parent`` panel and its ``layout``, ``resourcePath``; no developer (Reload and Test) section."""

    def __init__(self, parent=None):
        self.parent, self.layout = parent, parent.layout()
        self.moduleName = type(self).__name__.removesuffix("Widget")
        self.reloads = 0

    def resourcePath(self, filename: str) -> str:
        return os.path.join(os.path.dirname(sys.modules[type(self).__module__].__file__), "Resources", filename)

    def setup(self) -> None:
        pass

    def onReload(self) -> None:
        self.reloads += 1  # Slicer's slicer.util.reloadScriptedModule re-runs the file; the harness only counts


class ScriptedLoadableModuleTest(unittest.TestCase):
    """Base self-test: ``delayDisplay`` only logs here (it shows a popup in Slicer)."""

    def delayDisplay(self, message, msec=None):
        pass
