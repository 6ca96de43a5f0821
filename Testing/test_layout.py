"""Packaging and layout rules: every script listed in CMake, cheap imports, Slicer only in the scene glue, the road's import order,
and rooms of one purpose (each piece defined in its own module, the CLI's command modules joined by its program)."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "CBIRSlicer" / "CBIRSlicerLib"
HEAVY = ("torch", "faiss", "open_clip", "monai", "transformers", "timm", "matplotlib", "pymilvus", "grpc", "dask", "distributed")


def test_every_lib_script_is_listed_in_the_module_cmakelists():
    listed = set(re.findall(r"\$\{MODULE_NAME\}Lib/([\w/]+\.py)", (ROOT / "CBIRSlicer" / "CMakeLists.txt").read_text()))
    present = {p.relative_to(LIB).as_posix() for p in LIB.rglob("*.py")}
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


def test_only_the_scene_glue_imports_slicer_qt_or_ctk():
    for path in LIB.rglob("*.py"):
        found = _imported_modules(path) & {"slicer", "qt", "ctk", "vtk"}
        assert not found or path.relative_to(LIB).as_posix() == "scene/nodes.py", f"{path} imports {found}"


# The road, in order: a subpackage may import only those before it; the base layer (top-level modules that are
# not entry points) imports none of them; nothing imports the entry modules.
ROAD = ("imaging", "models", "index", "retrieval", "scene")
ENTRY = {"cli", "demo", "report", "plots"}


def _lib_imports(path: Path) -> set[str]:
    """The library modules a file imports, as dotted names relative to CBIRSlicerLib (``imaging.volume``, ``errors``)."""
    here = path.relative_to(LIB).with_suffix("").parts
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[:-1])[: len(here) - node.level] if node.level > 1 else list(here[:-1])
                target = base + (node.module.split(".") if node.module else [])
                names = [".".join(target + [a.name]) for a in node.names] if not node.module else [".".join(target)]
            elif node.module and node.module.split(".")[0] == "CBIRSlicerLib":
                names = [node.module.partition(".")[2] or a.name for a in node.names]
            else:
                continue
            found |= {n for n in names if n}
        elif isinstance(node, ast.Import):
            found |= {a.name.partition(".")[2] for a in node.names if a.name.startswith("CBIRSlicerLib.")}
    return found


def _group(module: str) -> str:
    head = module.split(".")[0]
    return head if head in ROAD else ("entry" if head in ENTRY else "base")


def test_subpackages_import_only_earlier_ones_and_nothing_imports_the_entry_modules():
    rank = {"base": -1, **{name: n for n, name in enumerate(ROAD)}}
    for path in LIB.rglob("*.py"):
        mine = _group(".".join(path.relative_to(LIB).with_suffix("").parts))
        for target in _lib_imports(path):
            theirs = _group(target)
            if mine == "entry":
                continue
            assert theirs != "entry", f"{path.relative_to(LIB)} imports the entry module {target}"
            assert rank[theirs] <= rank[mine], f"{path.relative_to(LIB)} ({mine}) imports {target} ({theirs}), a later layer"


def test_library_modules_have_no_import_cycle():
    graph = {}
    for path in LIB.rglob("*.py"):
        name = ".".join(path.relative_to(LIB).with_suffix("").parts).removesuffix(".__init__")
        graph[name] = {t for t in _lib_imports(path) if t != name}
    modules = set(graph)
    graph = {name: {t if t in modules else t.rsplit(".", 1)[0] for t in targets} & modules for name, targets in graph.items()}
    state = {}

    def visit(node, trail):
        state[node] = "open"
        for nxt in graph[node]:
            assert state.get(nxt) != "open", f"import cycle: {' -> '.join(trail + [node, nxt])}"
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_importing_the_library_loads_no_heavy_package():
    modules = sorted("CBIRSlicerLib." + ".".join(p.relative_to(LIB).with_suffix("").parts).removesuffix(".__init__")
                     for p in LIB.rglob("*.py"))
    code = f"import sys, importlib\nfor m in {modules!r}: importlib.import_module(m)\nprint([m for m in {HEAVY!r} if m in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_module_file_imports_the_library_at_file_scope_and_nothing_heavy():
    """The module file imports the library once at the top; those imports, and what they import, load nothing heavy."""
    tree = ast.parse((ROOT / "CBIRSlicer" / "CBIRSlicer.py").read_text())
    top, library = set(), set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            top.add(node.module.split(".")[0])
            if node.module.split(".")[0] == "CBIRSlicerLib":
                library |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in _library_modules() else node.module
                            for a in node.names}
    assert not top & set(HEAVY), top
    assert {"CBIRSlicerLib.scene.layout", "CBIRSlicerLib.scene.search_session"} <= library, library
    inner = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.col_offset > 0
             and (n.module or "").startswith("CBIRSlicerLib")]
    assert not inner, f"library imports inside functions (import it once at the top): {inner}"
    code = ("import sys, importlib\n"
            f"for m in {sorted(library)!r}: importlib.import_module(m)\n"
            f"print([m for m in {HEAVY!r} if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def _library_modules() -> set[str]:
    return {"CBIRSlicerLib." + ".".join(p.relative_to(LIB).with_suffix("").parts).removesuffix(".__init__") for p in LIB.rglob("*.py")}


# ----- rooms of one purpose ----------------------------------------------------------------------------------------------
# Where each piece lives: defined (at module level) in exactly this module, and nowhere else in the library.
ROOMS = {
    "clock.py": {"now_utc"},
    "atomic.py": {"replaced", "write_json_atomically"},
    "imaging/registration.py": {"coarse_image", "neighbourhood", "level_starts", "global_transform", "local_affine",
                                "deformation", "agreement", "carry", "place", "Placement"},
    "index/files.py": {"MANIFEST", "VECTORS", "CATALOG", "ROWS", "TRANSFORM", "recovery_hint"},
    "index/lock.py": {"FolderLock", "writer_active"},
    "index/maintenance.py": {"IndexFolder", "load_transform"},
    "index/writer.py": {"IndexWriter", "BuildReport", "EmbeddedCase", "case_id_for", "source_checksum", "content_problem"},
    "index/verify.py": {"verify"},
    "index/repair.py": {"repair", "RepairReport"},
    "index/folder.py": {"Index"},
    "retrieval/queries.py": {"Query", "QuerySpec", "make_query", "QUERY_MODES", "VOLUME_MODES", "MATCH_INTENTS", "Prior",
                             "roi_query", "segment_query", "slice_query", "volume_query", "text_query", "item_query",
                             "parse_filters", "load_volume_for_query"},
    "retrieval/search.py": {"Searcher", "embedding_request"},
    "retrieval/marks.py": {"Feedback"},
    "retrieval/suggestion.py": {"Suggestion", "NoSuggestion"},
    "models/requests.py": {"EmbeddingKind", "EmbeddingRequest"},
    "progress.py": {"State", "Progress", "PendingCall"},
    "retrieval/placement.py": {"choose", "Choice", "NOT_IN_VIEW", "AGREEMENT_MIN"},
    "index/compressed.py": {"RowFile", "pq_layout", "list_count", "probe_count", "train_size", "rows_path_of"},
    "dependencies.py": {"Host", "ensure", "requirements", "missing_requirements"},
    "retrieval/saved_search.py": {"SavedSearch", "rerun"},
    "scene/keep_results.py": {"save_search", "reload_search", "export_scene", "label_result"},
    "cli/program.py": {"main", "build_parser"},
}


def _defined(path: Path) -> set[str]:
    """Names a module defines at its top level: functions, classes, assigned names."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def test_each_piece_is_defined_in_its_room_and_nowhere_else():
    defined = {p.relative_to(LIB).as_posix(): _defined(p) for p in LIB.rglob("*.py")}
    for room, names in ROOMS.items():
        assert names <= defined[room], f"{room} lacks {names - defined[room]}"
        for module, found in defined.items():
            assert module == room or not names & found, f"{module} defines {names & found}, which belong to {room}"


def test_registration_stages_run_only_in_the_registration_room():
    """SimpleITK's registration machinery is called from imaging/registration.py alone (placement decides, search loops)."""
    for path in LIB.rglob("*.py"):
        text = path.read_text()
        if "ImageRegistrationMethod" in text or "DemonsRegistrationFilter" in text:
            assert path.relative_to(LIB).as_posix() == "imaging/registration.py", path


def test_every_cli_command_module_registers_its_own_parsers_and_the_program_joins_them_all():
    cli = LIB / "cli"
    commands = {p.stem for p in cli.glob("*.py") if "register" in _defined(p)}
    assert commands == {"volumes", "index", "search", "evaluate", "models", "keep"}, commands
    program = ast.parse((cli / "program.py").read_text())
    joined = {a.name for n in ast.walk(program) if isinstance(n, ast.ImportFrom) and n.level == 1 and not n.module
              for a in n.names}
    assert commands <= joined, f"program.py does not join {commands - joined}"
    helpers = {p.stem for p in cli.glob("*.py")} - commands
    assert helpers == {"__init__", "__main__", "program", "common"}, helpers


def test_one_clock_and_one_atomic_write():
    """Stored times come from clock.now_utc and in-place writes go through atomic.replaced: no module has its own."""
    for path in LIB.rglob("*.py"):
        name, text = path.relative_to(LIB).as_posix(), path.read_text()
        assert "timezone.utc" not in text or name == "clock.py", f"{name} reads the clock itself"
        # The one other temporary: a compaction's new rows file, which the vector store's save moves into place.
        temporaries = text.count(".tmp-{os.getpid()}") - (name == "index/maintenance.py")
        assert temporaries <= 0 or name == "atomic.py", f"{name} writes a temporary file and renames it itself"


# Library files longer than this hold more than one purpose; each exception says why it is one for now.
MAX_LINES = 500
LONG_FILES: set[str] = set()  # none now (the PACS client and the Milvus store were split)


def test_no_library_file_is_longer_than_its_purpose_needs():
    long = {p.relative_to(LIB).as_posix(): len(p.read_text().splitlines()) for p in LIB.rglob("*.py")}
    over = {name: lines for name, lines in long.items() if lines > MAX_LINES and name not in LONG_FILES}
    assert not over, f"library files over {MAX_LINES} lines: {over}"


def test_the_design_notes_name_every_module_in_their_table_of_rooms():
    text = (ROOT / "docs" / "design.md").read_text()
    rooms = text[text.index("## Rooms"):text.index("## Decisions")]
    for path in LIB.rglob("*.py"):
        name = path.relative_to(LIB).as_posix()
        if path.name == "__init__.py":
            continue
        shown = f"`{name}`" if name.startswith("cli/") else f"`{path.name}`"
        assert shown in rooms, f"docs/design.md's table of rooms does not name {name}"


def test_product_code_names_no_issue_numbers():
    """Comments say why in the code's own words; which issue asked for it is the commit log's to say."""
    for path in [*LIB.rglob("*.py"), ROOT / "CBIRSlicer" / "CBIRSlicer.py"]:
        found = re.findall(r"[Ii]ssues? ?#?\d+", path.read_text())
        assert not found, f"{path.relative_to(ROOT)} names {found}"
