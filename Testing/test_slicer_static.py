"""Static checks of the Slicer module that would otherwise only fail inside Slicer: the .ui file against the code,
signals against the widget classes, parameter-node bindings, CMake lists and referenced resources."""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "CBIRSlicer"
MODULE_FILE = MODULE_DIR / "CBIRSlicer.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CBIRSlicer.ui"

# Signals (PythonQt signatures) of the widget classes the .ui uses, from the Qt 5 / CTK / qMRML headers.
_BUTTON = {"clicked()", "clicked(bool)", "pressed()", "released()", "toggled(bool)"}
SIGNALS = {
    "QPushButton": _BUTTON,
    "QCheckBox": _BUTTON | {"stateChanged(int)"},
    "QListWidget": {"currentRowChanged(int)", "itemClicked(QListWidgetItem*)", "itemDoubleClicked(QListWidgetItem*)",
                    "itemActivated(QListWidgetItem*)", "itemSelectionChanged()",
                    "currentItemChanged(QListWidgetItem*,QListWidgetItem*)"},
    "QComboBox": {"currentIndexChanged(int)", "currentIndexChanged(QString)", "currentTextChanged(QString)", "activated(int)"},
    "QLineEdit": {"textChanged(QString)", "textEdited(QString)", "editingFinished()", "returnPressed()"},
    "QSpinBox": {"valueChanged(int)", "valueChanged(QString)", "editingFinished()"},
    "QPlainTextEdit": {"textChanged()"},
    "ctkPathLineEdit": {"currentPathChanged(QString)", "validInputChanged(bool)"},
    "ctkCollapsibleButton": _BUTTON | {"contentsCollapsed(bool)"},
    "ctkCollapsibleGroupBox": {"toggled(bool)", "clicked(bool)"},
    "qMRMLNodeComboBox": {"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)", "currentNodeIDChanged(QString)",
                          "nodeActivated(vtkMRMLNode*)", "nodeAdded(vtkMRMLNode*)", "nodeAddedByUser(vtkMRMLNode*)",
                          "nodeAboutToBeRemoved(vtkMRMLNode*)"},
    "qMRMLWidget": {"mrmlSceneChanged(vtkMRMLScene*)"},
}
SLOTS = {"qMRMLNodeComboBox": {"setMRMLScene(vtkMRMLScene*)"}}
# Python-style signal attributes (widget.clicked.connect) -> the signal names they stand for.
SIGNAL_ATTRIBUTES = {cls: {s.split("(")[0] for s in signals} for cls, signals in SIGNALS.items()}
# Which widget classes the parameter-node wrapper can bind a field type to (its GUI connectors, Slicer 5.8).
CONNECTORS = {
    "bool": {"QCheckBox", "QPushButton"},
    "int": {"QSpinBox", "QSlider"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget"},
    "str": {"QLineEdit", "QTextEdit"},
    "choice": {"QComboBox"},
    "path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}
QT_CLASSES = {"QWidget", "QLabel", "QPushButton", "QCheckBox", "QListWidget", "QComboBox", "QLineEdit", "QSpinBox",
              "QProgressBar", "QPlainTextEdit", "QGroupBox"}


@pytest.fixture(scope="module")
def ui():
    return ET.parse(UI_FILE).getroot()


@pytest.fixture(scope="module")
def widgets(ui) -> dict[str, str]:
    """Widget name -> class, for every widget in the .ui."""
    found = [(w.get("name"), w.get("class")) for w in ui.iter("widget")]
    names = [name for name, _ in found]
    assert len(names) == len(set(names)), "widget names must be unique"
    return dict(found)


@pytest.fixture(scope="module")
def source() -> str:
    return MODULE_FILE.read_text()


def _parameter_fields() -> dict[str, str]:
    """Field name -> annotation text of the @parameterNodeWrapper class in the module file."""
    tree = ast.parse(MODULE_FILE.read_text())
    classes = [node for node in tree.body if isinstance(node, ast.ClassDef)
               and any(ast.unparse(d) == "parameterNodeWrapper" for d in node.decorator_list)]
    assert len(classes) == 1, "expected one @parameterNodeWrapper class"
    return {node.target.id: ast.unparse(node.annotation) for node in classes[0].body if isinstance(node, ast.AnnAssign)}


def _kind(annotation: str) -> str:
    if "Choice(" in annotation:
        return "choice"
    base = re.sub(r"^Annotated\[([^,\]]+).*$", r"\1", annotation).strip()
    if base.startswith("vtkMRML"):
        return "node"
    if base.startswith("pathlib."):
        return "path"
    return base


def test_ui_is_a_qmrml_widget_with_declared_custom_widgets(ui, widgets):
    top = ui.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "CBIRSlicer" and ui.findtext("class") == "CBIRSlicer"
    declared = {c.findtext("class") for c in ui.iter("customwidget")}
    used = set(widgets.values())
    assert used - QT_CLASSES <= declared, f"custom widgets not declared: {used - QT_CLASSES - declared}"
    assert used <= QT_CLASSES | declared


def test_every_ui_name_the_code_uses_exists(source, widgets):
    used = set(re.findall(r"self\.ui\.(\w+)", source))
    assert used, "the module uses no widget from the .ui?"
    assert used <= set(widgets), f"not in {UI_FILE.name}: {sorted(used - set(widgets))}"


def test_every_connected_signal_exists_on_its_widget_class(source, widgets):
    connections = re.findall(r"self\.ui\.(\w+)\.connect\(\s*\"([^\"]+)\"", source)
    attribute_connections = re.findall(r"self\.ui\.(\w+)\.(\w+)\.connect\(", source)
    assert connections or attribute_connections
    for name, signal in connections:
        cls = widgets[name]
        assert signal.replace(" ", "") in SIGNALS[cls], f"{name} ({cls}) has no signal {signal}"
    for name, attribute in attribute_connections:
        cls = widgets[name]
        assert attribute in SIGNAL_ATTRIBUTES[cls], f"{name} ({cls}) has no signal {attribute}"


def test_ui_connections_name_real_widgets_signals_and_slots(ui, widgets):
    for connection in ui.iter("connection"):
        sender, receiver = connection.findtext("sender"), connection.findtext("receiver")
        signal, slot = connection.findtext("signal"), connection.findtext("slot")
        assert signal in SIGNALS[widgets[sender]], f"{sender} has no signal {signal}"
        assert slot in SLOTS.get(widgets[receiver], set()), f"{receiver} has no slot {slot}"
    # Every node selector gets the scene, or it would stay empty.
    receivers = {c.findtext("receiver") for c in ui.iter("connection") if c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    assert receivers == {name for name, cls in widgets.items() if cls == "qMRMLNodeComboBox"}


def test_every_parameter_binding_is_a_field_of_a_type_the_widget_can_show(ui, widgets):
    fields = _parameter_fields()
    bound = {}
    for widget in ui.iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    assert bound, "no widget is bound to the parameter node"
    assert set(bound) <= set(fields), f"bound to no parameter-node field: {sorted(set(bound) - set(fields))}"
    assert set(fields) <= set(bound), f"fields with no widget: {sorted(set(fields) - set(bound))}"
    for name, cls in bound.items():
        kind = _kind(fields[name])
        assert cls in CONNECTORS[kind], f"{name}: a {fields[name]} cannot be bound to a {cls}"


def test_module_cmakelists_lists_every_script_and_resource():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = set(re.findall(r"\$\{MODULE_NAME\}(Lib/\w+\.py|\.py)", text))
    assert ".py" in scripts  # the module file itself
    present = {f"Lib/{p.name}" for p in (MODULE_DIR / "CBIRSlicerLib").glob("*.py")} | {".py"}
    assert scripts == present, f"missing: {present - scripts}; listed but absent: {scripts - present}"
    block = re.search(r"set\(MODULE_PYTHON_RESOURCES(.*?)\)", text, re.S).group(1)
    resources = {line.strip().replace("${MODULE_NAME}", "CBIRSlicer") for line in block.splitlines() if line.strip()}
    on_disk = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    # The library's own data files (a body-coordinate template) travel with it as resources too.
    on_disk |= {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "CBIRSlicerLib").rglob("*")
                if p.is_file() and p.suffix not in (".py", ".pyc") and "__pycache__" not in p.parts}
    assert resources == on_disk, f"missing: {on_disk - resources}; listed but absent: {resources - on_disk}"


def test_resources_the_code_references_exist(source):
    for relative in re.findall(r"resourcePath\(\"([^\"]+)\"\)", source):
        assert (MODULE_DIR / "Resources" / relative).is_file(), relative
    for relative in re.findall(r"os\.path\.join\(os\.path\.dirname\(__file__\), \"Resources\", \"([^\"]+)\"\)", source):
        assert (MODULE_DIR / "Resources" / relative).is_file(), relative


def test_extension_urls_point_at_files_in_the_repository():
    text = (ROOT / "CMakeLists.txt").read_text()
    urls = re.findall(r"set\(EXTENSION_(?:ICONURL|SCREENSHOTURLS) \"([^\"]+)\"\)", text)
    assert len(urls) == 2
    for url in " ".join(urls).split():
        relative = url.split("/main/", 1)[1]
        assert (ROOT / relative).is_file() and relative.endswith(".png"), url


def _is_import_with_fallback(node: ast.AST) -> bool:
    """``try: <imports> except ImportError: <functions or assignments>``: the translation function and its stand-in."""
    return (isinstance(node, ast.Try) and all(isinstance(n, (ast.Import, ast.ImportFrom)) for n in node.body)
            and len(node.handlers) == 1 and ast.unparse(node.handlers[0].type) == "ImportError"
            and all(isinstance(n, (ast.FunctionDef, ast.Assign)) for n in node.handlers[0].body)
            and not node.orelse and not node.finalbody)


def test_module_file_imports_no_heavy_package_and_runs_nothing_at_import():
    tree = ast.parse(MODULE_FILE.read_text())
    for node in tree.body:
        # Only imports, assignments of constants, classes and functions at file scope: no code runs at import.
        allowed = (ast.Import, ast.ImportFrom, ast.Assign, ast.ClassDef, ast.FunctionDef, ast.Expr)
        assert isinstance(node, allowed) or _is_import_with_fallback(node), ast.unparse(node)
        if isinstance(node, ast.Expr):
            assert isinstance(node.value, ast.Constant), ast.unparse(node)  # docstrings only


# Where the module shows text to the user: widget properties it sets, and the display functions it calls.
SHOWN_PROPERTIES = {"text", "toolTip", "plainText", "title", "helpText", "acknowledgementText"}
SHOWN_CALLS = {"errorDisplay", "warningDisplay", "infoDisplay", "confirmOkCancelDisplay", "tryWithErrorDisplay",
               "QListWidgetItem", "RuntimeError"}


def _is_literal_text(node: ast.AST) -> bool:
    """Text written in the code and not passed through ``_()``: a string constant, an f-string, or either joined."""
    if isinstance(node, (ast.JoinedStr,)) or (isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.strip()):
        return True
    if isinstance(node, ast.BinOp):
        return _is_literal_text(node.left) or _is_literal_text(node.right)
    if isinstance(node, ast.IfExp):
        return _is_literal_text(node.body) or _is_literal_text(node.orelse)
    return False


def test_user_visible_strings_go_through_the_translation_function(source):
    """As Slicer's module template does: every text the user sees is ``_("...")`` (``.format()`` after, never an f-string)."""
    tree = ast.parse(source)
    tests = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "CBIRSlicerTest")
    in_tests = {id(n) for n in ast.walk(tests)}
    shown = []
    for node in ast.walk(tree):
        if id(node) in in_tests:
            continue  # the self-test's progress messages are for developers
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr in SHOWN_PROPERTIES for t in node.targets):
            shown.append(node.value)
        elif isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name in SHOWN_CALLS:
                shown.extend(node.args[:1] + [k.value for k in node.keywords if k.arg == "windowTitle"])
    assert len(shown) > 30, "fewer user-visible texts found than the module shows: the check is looking in the wrong place"
    bare = [ast.unparse(value) for value in shown if _is_literal_text(value)]
    assert not bare, f"shown without _(): {bare}"
    translated = re.findall(r"\b_\(\s*\"", source)
    assert len(translated) > 40
    assert "from slicer.i18n import tr as _" in source


def test_extensions_index_entry_follows_the_catalog_schema():
    import json

    entry = json.loads((ROOT / "CBIRSlicer.json").read_text())
    allowed = {"$schema", "category", "scm_url", "scm_revision", "scm_type", "build_dependencies", "build_subdirectory",
               "enabled", "tier"}
    assert {"$schema", "category", "scm_url"} <= set(entry) <= allowed
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json")
    assert entry["build_dependencies"] == ["PyTorch"] and entry["tier"] in (1, 3, 5)
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert f'set(EXTENSION_CATEGORY "{entry["category"]}")' in cmake
    project = re.search(r"project\((\w+)\)", cmake).group(1)
    assert (ROOT / f"{project}.json").is_file() and not project.startswith("Slicer")  # Extensions Index naming rules


def test_workflow_runs_the_self_test_in_a_named_slicer_release():
    text = (ROOT / ".github" / "workflows" / "slicer.yml").read_text()
    assert re.search(r'version: "5\.\d+\.\d+"', text) and "xvfb-run" in text
    assert "runUnitTest(" in text and "'CBIRSlicer')" in text and "--testing" in text
    assert "Slicer 5.8" in MODULE_FILE.read_text()  # the self-test names the API version it targets
