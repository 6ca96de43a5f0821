"""The ``qt`` module as PythonQt gives it to a Slicer module, made of real Qt (PySide6) plus the adapters PythonQt's API needs.

Every QObject class of QtCore/QtGui/QtWidgets is here as a subclass with :class:`PythonQtObject` mixed in, so that,
as under PythonQt:

- Qt properties are read and written as attributes (``button.enabled = False``, ``listWidget.currentRow``); a
  property wins over the getter method of the same name, as in PythonQt; ``name`` is the object name;
- ``obj.connect("clicked(bool)", slot)`` connects by signature; the slot gets as many of the signal's arguments as it
  takes (PythonQt passes fewer to a slot that takes fewer); ``vtkSomething*`` arguments travel as Python objects.

Errors are not hidden: connecting a signal the object does not have raises; writing an attribute that is neither a Qt
property nor a Python attribute the object already has raises (PythonQt would add it silently: stricter here, to catch
misspelt property names); an exception raised in a slot is recorded in :data:`SLOT_ERRORS` and re-raised, and the tests
fail on it. Every connection and every call of a connected slot is recorded (:data:`CONNECTIONS`), so a test can check
that each handler a widget connected has run.

Enums are spelt as PythonQt spells them (``qt.Qt.WaitCursor``, ``qt.QMessageBox.Ok``): PySide6 accepts those spellings
itself. ``QUiLoader`` makes these adapter classes for the widgets of a .ui file and the registered stand-ins for its
custom (CTK, qMRML) classes; see :class:`QUiLoader`.
"""

from __future__ import annotations

import inspect
import re
import types
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field

from PySide6 import QtCore, QtGui, QtUiTools, QtWidgets

for _module in (QtCore, QtGui, QtWidgets):
    globals().update({_name: getattr(_module, _name) for _name in dir(_module) if _name.startswith("Q") or _name == "Qt"})
Property, Signal, Slot = QtCore.Property, QtCore.Signal, QtCore.Slot


@dataclass
class Connection:
    """One ``connect`` made through the adapter, and how often its slot ran."""

    sender: str
    signature: str
    slot: str
    calls: int = 0
    errors: list = field(default_factory=list)


CONNECTIONS: list[Connection] = []
SLOT_ERRORS: list[BaseException] = []
_PROPERTIES: dict[type, frozenset] = {}
_LOADING: list = []  # while QUiLoader loads: PySide's loader sets the named children as attributes of the root, as PythonQt shows them


def _properties(obj) -> frozenset:
    cls = type(obj)
    names = _PROPERTIES.get(cls)
    if names is None:
        meta = QtCore.QObject.metaObject(obj)
        names = _PROPERTIES[cls] = frozenset(meta.property(i).name() for i in range(meta.propertyCount()))
    return names


def _slot_arity(slot) -> int | None:
    """How many positional arguments a slot takes (None: any number), as PythonQt counts them."""
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty for p in parameters)


def _find_signal(obj, signature: str) -> str:
    """The signal's signature as Qt knows it; raises when the object has no such signal."""
    wanted = bytes(QtCore.QMetaObject.normalizedSignature(signature)).decode()
    as_python = re.sub(r"\bvtk\w+\*", "PyObject", wanted)  # PythonQt's VTK pointers: Python objects here
    meta = QtCore.QObject.metaObject(obj)
    for i in range(meta.methodCount()):
        method = meta.method(i)
        if method.methodType() == QtCore.QMetaMethod.Signal and bytes(method.methodSignature()).decode() in (wanted, as_python):
            return bytes(method.methodSignature()).decode()
    raise AttributeError(f"{meta.className()} '{QtCore.QObject.objectName(obj)}' has no signal {signature}")


class PythonQtObject:
    """PythonQt's view of a QObject: properties as attributes, ``name``, ``connect(signature, slot)``."""

    def __getattribute__(self, name: str):
        if name[0] != "_":
            if name in _properties(self):
                return QtCore.QObject.property(self, name)
            if name == "name":
                return QtCore.QObject.objectName(self)
            if name == "connect":  # Shiboken would answer with QObject's static connect
                return types.MethodType(PythonQtObject.connect, self)
        return super().__getattribute__(name)

    def __setattr__(self, name: str, value) -> None:
        if name in _properties(self):
            if not QtCore.QObject.setProperty(self, name, value):
                raise TypeError(f"{type(self).__name__}.{name} cannot be set to {value!r}")
            return
        if name == "name":
            QtCore.QObject.setObjectName(self, value)
            return
        if name[0] != "_" and not hasattr(self, name) and not (_LOADING and isinstance(value, QtCore.QObject)):
            raise AttributeError(f"{type(self).__name__} has no property or attribute '{name}'")
        super().__setattr__(name, value)

    def connect(self, signature: str, slot) -> bool:
        """``obj.connect("signal(args)", callable)`` as in PythonQt."""
        found = _find_signal(self, signature)
        record = Connection(QtCore.QObject.objectName(self) or type(self).__name__, signature,
                            getattr(slot, "__qualname__", repr(slot)))
        CONNECTIONS.append(record)
        arity = _slot_arity(slot)

        def call(*args):
            record.calls += 1
            try:
                return slot(*(args if arity is None else args[:arity]))
            except BaseException as error:
                record.errors.append(error)
                SLOT_ERRORS.append(error)
                raise

        connection = QtCore.QObject.connect(self, QtCore.SIGNAL(found), call)
        self.__dict__.setdefault("_pythonqt_slots", []).append(call)  # keep the closure alive with the object
        return bool(connection)


def _adapt(qt_class: type) -> type:
    return type(qt_class.__name__, (PythonQtObject, qt_class), {"__module__": __name__})


for _name, _value in list(globals().items()):
    if isinstance(_value, type) and issubclass(_value, QtCore.QObject) and _name.startswith("Q") and _name != "QApplication":
        globals()[_name] = _adapt(_value)

CUSTOM_WIDGETS: dict[str, type] = {}


def register_custom_widget(cls: type) -> type:
    """Make a stand-in class known to :class:`QUiLoader` under its (Slicer) class name."""
    CUSTOM_WIDGETS[cls.__name__] = cls
    return cls


class QUiLoader(QtUiTools.QUiLoader):
    """Qt's .ui loader, making the adapter classes and registered stand-ins, and strict about what Slicer's loader does.

    A class the .ui names that is neither a Qt widget nor a registered stand-in, or a (non-dynamic) property the .ui
    sets that its class does not declare, raises after loading, where Qt would only warn. The .ui's own connections
    (such as ``mrmlSceneChanged(vtkMRMLScene*)`` to ``setMRMLScene(vtkMRMLScene*)``) are made through
    :meth:`PythonQtObject.connect`, since their MRML-typed signatures exist only in Slicer's C++ classes.
    """

    def __init__(self, parent=None):
        super().__init__(parent)
        self.problems: list[str] = []

    def createWidget(self, className: str, parent=None, name: str = ""):
        cls = CUSTOM_WIDGETS.get(className) or globals().get(className)
        if not (isinstance(cls, type) and issubclass(cls, PythonQtObject) and issubclass(cls, QtWidgets.QWidget)):
            self.problems.append(f"no widget class {className} (named {name})")
            cls = globals()["QWidget"]
        widget = cls(parent)
        widget.setObjectName(name)
        return widget

    def load(self, device, parent=None):
        text = bytes(device.readAll()).decode("utf-8")
        tree = ElementTree.fromstring(text)
        connections = tree.find("connections")
        if connections is not None:
            tree.remove(connections)
        buffer = QtCore.QBuffer()
        buffer.setData(ElementTree.tostring(tree))
        buffer.open(QtCore.QIODevice.ReadOnly)
        _LOADING.append(self)
        try:
            widget = super().load(buffer, parent)
        finally:
            _LOADING.remove(self)
        if widget is None:
            raise RuntimeError(f"Qt could not load the .ui: {self.errorString()}")
        self._check_properties(tree, widget)
        for connection in connections if connections is not None else []:
            sender, receiver = (self._named(widget, connection.findtext(key)) for key in ("sender", "receiver"))
            slot_name = connection.findtext("slot").split("(")[0]
            sender.connect(connection.findtext("signal"), getattr(receiver, slot_name))
        if self.problems:
            raise RuntimeError("the .ui does not load as in Slicer: " + "; ".join(self.problems))
        return widget

    @staticmethod
    def _named(root, name: str):
        return root if QtCore.QObject.objectName(root) == name else QtCore.QObject.findChild(root, QtCore.QObject, name)

    def _check_properties(self, tree, root) -> None:
        for element in tree.iter("widget"):
            widget = self._named(root, element.get("name"))
            for prop in element.findall("property"):
                if prop.get("stdset") != "0" and prop.get("name") not in _properties(widget):
                    self.problems.append(f"{element.get('class')} {element.get('name')} has no property {prop.get('name')}")
