"""Packaging rules a Slicer extension must keep: every script listed in CMake, cheap imports, Slicer only in mrml.py."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "CBIRSlicer" / "CBIRSlicerLib"
HEAVY = ("torch", "faiss", "open_clip", "monai", "transformers", "timm", "matplotlib")


def test_every_lib_script_is_listed_in_the_module_cmakelists():
    listed = set(re.findall(r"\$\{MODULE_NAME\}Lib/(\w+\.py)", (ROOT / "CBIRSlicer" / "CMakeLists.txt").read_text()))
    present = {p.name for p in LIB.glob("*.py")}
    assert present == listed, f"missing from CMakeLists: {present - listed}; listed but absent: {listed - present}"


def test_top_level_cmake_names_the_extension_and_depends_on_pytorch():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert "project(CBIRSlicer)" in text and 'set(EXTENSION_DEPENDS "PyTorch")' in text
    assert (ROOT / "LICENSE").exists() and (ROOT / "CBIRSlicer" / "Resources" / "Icons" / "CBIRSlicer.png").exists()


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_only_the_mrml_glue_imports_slicer_qt_or_ctk():
    for path in LIB.glob("*.py"):
        found = _imported_modules(path) & {"slicer", "qt", "ctk", "vtk"}
        assert not found or path.name == "mrml.py", f"{path.name} imports {found}"


def test_importing_the_library_loads_no_heavy_package():
    code = ("import sys, CBIRSlicerLib, CBIRSlicerLib.cli, CBIRSlicerLib.slicing, CBIRSlicerLib.readers,"
            " CBIRSlicerLib.embedding, CBIRSlicerLib.worker, CBIRSlicerLib.index, CBIRSlicerLib.search,"
            " CBIRSlicerLib.scene_search, CBIRSlicerLib.views, CBIRSlicerLib.thumbnails, CBIRSlicerLib.index_build,"
            " CBIRSlicerLib.evaluation, CBIRSlicerLib.demo, CBIRSlicerLib.report;"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_module_file_imports_nothing_heavy_at_file_scope():
    tree = ast.parse((ROOT / "CBIRSlicer" / "CBIRSlicer.py").read_text())
    top = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
    assert not top & set(HEAVY), top
