"""Stand-in for ``slicer.parameterNodeWrapper``: typed parameters over a vtkMRMLScriptedModuleNode and their GUI binding.

Imitates Slicer's documented behaviour (Base/Python/slicer/parameterNodeWrapper: wrapper.py, serializers.py,
guiConnectors.py) for what the module uses, and no more:

- ``@parameterNodeWrapper`` turns the annotated class into a wrapper of a scripted module node; each annotation is a
  property stored in the node as text (str, int, bool, pathlib.Path) or as a node reference (vtkMRML node classes);
  a missing value is written with its default first (the class value, else "", 0, False, ``Path()`` or None).
- ``Annotated[..., Choice([...])]`` and ``Annotated[int, WithinRange(a, b)]`` refuse other values (ValueError).
- Writing a value modifies the node once (``NodeModify``), so observers of ``ModifiedEvent`` see the new value.
- ``connectGui(ui)`` binds each widget whose dynamic property ``SlicerParameterName`` names a parameter (``ui`` is a
  widget or the object of ``slicer.util.childWidgetVariables``): it writes the values to the widgets at once, widget
  changes write the parameter, node changes rewrite every bound widget; it returns a tag for ``disconnectGui(tag)``,
  which stops both directions for those widgets. A widget/type pair Slicer has no connector for raises.
- Connectors as Slicer's: QCheckBox-bool (stateChanged), QSpinBox-int (valueChanged, range from WithinRange),
  QComboBox-Choice (items are the choices, currentIndexChanged), QLineEdit-str (textChanged),
  ctkPathLineEdit-Path (currentPathChanged), qMRMLNodeComboBox-node (currentNodeChanged; nodeTypes set from the type).

Not done: parameter packs, enums, lists and dicts, unions, float widgets, GUI creation, ``Default``/``Minimum``.
"""

from __future__ import annotations

import pathlib
import typing
from dataclasses import dataclass

import slicer
import vtk

SlicerParameterNamePropertyName = "SlicerParameterName"


@dataclass(frozen=True)
class Choice:
    """The value must be one of ``choices``."""

    choices: tuple

    def __init__(self, choices):
        object.__setattr__(self, "choices", tuple(choices))

    def validate(self, value) -> None:
        if value not in self.choices:
            raise ValueError(f"Value '{value}' must be within {list(self.choices)}")


@dataclass(frozen=True)
class WithinRange:
    """The value must lie in [minimum, maximum]."""

    minimum: float
    maximum: float

    def validate(self, value) -> None:
        if not self.minimum <= value <= self.maximum:
            raise ValueError(f"Value {value} must be within [{self.minimum}, {self.maximum}]")


def _is_node_type(kind) -> bool:
    return isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)


class _Parameter:
    """How one annotated member is stored in the node."""

    def __init__(self, name: str, annotation, default):
        self.name = name
        self.kind, self.validators = annotation, []
        if typing.get_origin(annotation) is typing.Annotated:
            self.kind, *self.validators = typing.get_args(annotation)
        if not (self.kind in (str, int, bool, pathlib.Path) or _is_node_type(self.kind)):
            raise TypeError(f"Unable to create serializer for member {name} of type {annotation}")
        defaults = {str: "", int: 0, bool: False, pathlib.Path: pathlib.Path()}
        self.default = default if default is not _NO_DEFAULT else defaults.get(self.kind)

    def isIn(self, node) -> bool:
        if _is_node_type(self.kind):
            return self.name in _roles(node)
        return node.GetParameterNamesAsCommaSeparatedList().split(",").count(self.name) > 0

    def read(self, node):
        if _is_node_type(self.kind):
            return node.GetNodeReference(self.name)
        text = node.GetParameter(self.name)
        return text == "True" if self.kind is bool else self.kind(text)

    def write(self, node, value) -> None:
        if _is_node_type(self.kind):
            if value is not None and not isinstance(value, self.kind):
                raise ValueError(f"{self.name} must be a {self.kind.__name__} or None, not {type(value).__name__}")
            node.SetNodeReferenceID(self.name, value.GetID() if value is not None else None)
            return
        if not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            raise ValueError(f"{self.name} must be a {self.kind.__name__}, not {type(value).__name__}")
        for validator in self.validators:
            validator.validate(value)
        node.SetParameter(self.name, str(value))


_NO_DEFAULT = object()


def _roles(node) -> list[str]:
    return [node.GetNthNodeReferenceRole(n) for n in range(node.GetNumberOfNodeReferenceRoles())]


def parameterNodeWrapper(classtype):
    """Class decorator: the annotated class becomes a typed wrapper of a parameter node, with GUI binding."""
    hints = typing.get_type_hints(classtype, include_extras=True)
    parameters = {name: _Parameter(name, kind, classtype.__dict__.get(name, _NO_DEFAULT)) for name, kind in hints.items()}
    for name in parameters:
        setattr(classtype, name, property(lambda self, n=name: self.getValue(n), lambda self, value, n=name: self.setValue(n, value)))
    classtype.allParameters = parameters
    classtype.__init__, classtype._parameter = _init, _parameter
    for method in (getValue, setValue, connectGui, disconnectGui, StartModify, EndModify, AddObserver, RemoveObserver, Modified):
        setattr(classtype, method.__name__, method)
    return classtype


def _init(self, parameterNode) -> None:
    self.parameterNode = parameterNode
    self._guis, self._nextTag, self._updatingGui = {}, 0, False
    for parameter in self.allParameters.values():
        if not parameter.isIn(parameterNode):
            parameter.write(parameterNode, parameter.default)


def getValue(self, name: str):
    return self._parameter(name).read(self.parameterNode)


def setValue(self, name: str, value) -> None:
    with slicer.util.NodeModify(self.parameterNode):
        self._parameter(name).write(self.parameterNode, value)


def StartModify(self):
    return self.parameterNode.StartModify()


def EndModify(self, wasModified):
    return self.parameterNode.EndModify(wasModified)


def AddObserver(self, event, callback, priority=0.0):
    return self.parameterNode.AddObserver(event, callback, priority)


def RemoveObserver(self, tag) -> None:
    self.parameterNode.RemoveObserver(tag)


def Modified(self) -> None:
    self.parameterNode.Modified()


def connectGui(self, gui) -> int:
    """Bind the widgets that name a parameter; returns the tag for disconnectGui."""
    widgets = gui.findChildren(slicer_qt().QWidget) if hasattr(gui, "isWidgetType") else list(vars(gui).values())
    named = {w.property(SlicerParameterNamePropertyName): w for w in widgets if w.property(SlicerParameterNamePropertyName)}
    connectors = {name: _connector(widget, self._parameter(name)) for name, widget in named.items()}
    tag, self._nextTag = self._nextTag, self._nextTag + 1
    self._guis[tag] = connectors
    for name, connector in connectors.items():
        connector.write(self.getValue(name))
        connector.listen(lambda name=name, connector=connector: self._updatingGui or self.setValue(name, connector.read()))
    self.AddObserver(vtk.vtkCommand.ModifiedEvent, lambda caller, event: _updateGui(self))
    return tag


def disconnectGui(self, tag) -> None:
    """Stop the binding made by connectGui (both directions)."""
    for connector in self._guis.pop(tag, {}).values():
        connector.listen(None)


def _updateGui(self) -> None:
    if self._updatingGui:
        return
    self._updatingGui = True
    try:
        for connectors in self._guis.values():
            for name, connector in connectors.items():
                connector.write(self.getValue(name))
    finally:
        self._updatingGui = False


def _parameter(self, name: str) -> _Parameter:
    try:
        return self.allParameters[name]
    except KeyError:
        raise ValueError(f"Cannot find a param with the given name: {name}") from None


def slicer_qt():
    import qt

    return qt


class _Connector:
    """One widget bound to one parameter: which signal says it changed, how to read and write it."""

    def __init__(self, widget, signal: str, read, write):
        self.widget, self.signal, self.read, self.write, self.slot = widget, signal, read, write, None

    def listen(self, callback) -> None:
        signal = getattr(self.widget, self.signal)
        if self.slot is not None:
            signal.disconnect(self.slot)
        self.slot = (lambda *args: callback()) if callback is not None else None
        if self.slot is not None:
            signal.connect(self.slot)


def _connector(widget, parameter: _Parameter) -> _Connector:
    qt = slicer_qt()
    kind, cls = parameter.kind, type(widget)
    if cls is qt.QCheckBox and kind is bool:
        return _Connector(widget, "stateChanged", lambda: widget.checked, lambda value: setattr(widget, "checked", value))
    if cls is qt.QSpinBox and kind is int:
        for validator in parameter.validators:
            if isinstance(validator, WithinRange):
                widget.setRange(validator.minimum, validator.maximum)
        return _Connector(widget, "valueChanged", lambda: widget.value, lambda value: setattr(widget, "value", value))
    if cls is qt.QComboBox and kind in (str, int, bool):
        choices = next((v.choices for v in parameter.validators if isinstance(v, Choice)), None)
        if choices is None:
            raise RuntimeError("ComboBoxToStringableConnector requires the Choice annotation to be used.")
        widget.clear()
        widget.addItems([str(c) for c in choices])
        return _Connector(widget, "currentIndexChanged", lambda: choices[widget.currentIndex],
                          lambda value: setattr(widget, "currentIndex", choices.index(value)))
    if cls is qt.QLineEdit and kind is str:
        return _Connector(widget, "textChanged", lambda: widget.text, lambda value: setattr(widget, "text", value))
    if cls.__name__ == "ctkPathLineEdit" and kind is pathlib.Path:
        return _Connector(widget, "currentPathChanged", lambda: pathlib.Path(widget.currentPath),
                          lambda value: setattr(widget, "currentPath", str(value)))
    if cls is getattr(slicer, "qMRMLNodeComboBox", None) and _is_node_type(kind):
        widget.nodeTypes = [kind.__name__]
        return _Connector(widget, "currentNodeChanged", widget.currentNode, widget.setCurrentNode)
    raise RuntimeError(f"Unable to create GUI connector from datatype '{kind}' to widget type '{cls}'")
