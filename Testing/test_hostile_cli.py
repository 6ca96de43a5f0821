"""The second hostile corpus, the command-line part: exports, saved searches and answers, filters and options,
the compressed store, re-sealed manifests, full disks and degenerate volumes, and the frictions a new user met.

Every case runs the real command line (in this process) on one small compressed index built once for the module (cases
named with a spreadsheet formula, XML specials and signs), or on a copy of it, and asserts one of two ends: refused in
one line that names the file or the argument and the problem (exit 1; argparse's own refusals exit 2), or done right.
Either way no traceback, and nothing stored changed: the index's files are byte for byte what they were (a refusal), or
the index still verifies (a writer stopped by a full disk). The DICOM-source part is ``test_hostile_sources.py``; the
first corpus is ``test_index_fuzz.py``'s.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import shutil
import sqlite3

import numpy as np
import pytest

from CBIRSlicerLib import cli
from CBIRSlicerLib.atomic import write_json_atomically
from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.index import keyed_seal
from CBIRSlicerLib.index.files import CATALOG, MANIFEST, ROWS
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.integrity import file_record, seal
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.models.registry import create_embedder

SHAPE = (32, 32, 16)
SETTINGS = IndexSettings(axes=["axial"], stride_mm=4.0, tile_sizes_mm=[20.0], blobs_per_slice=4, thumbnail_px=32)
# Names a spreadsheet would run (=, +, -, @) and that XML must escape (&, <, >, quotes); the last one is the query.
NAMES = ["=HYPERLINK(1)", "a&b<c>'d\"", "+plus", "-minus", "@at", "query"]
ROI = "0,0,0,20,20,12"


def _ball(n: int):
    rng = np.random.default_rng(n)
    centre = tuple(rng.uniform(-6, 6, 3) * np.array([1, 1, 0.4]))
    kind = "ball" if n % 2 == 0 else "shell"
    blob = synthetic.Blob(centre, 6.0, 300.0 if kind == "ball" else 250.0, kind, 2.0)
    return synthetic.render(synthetic.centered_matrix(SHAPE, (1.5, 1.5, 2.0)), SHAPE, blobs=[blob], body_radii=(26, 24, 40))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(index folder, case paths by name, query path): five hostile-named cases in a compressed (IVF-PQ) index."""
    folder = tmp_path_factory.mktemp("hostile_cases")
    paths = {name: synthetic.write_volume(_ball(n), str(folder / f"{name}.nii.gz")) for n, name in enumerate(NAMES)}
    index_dir = str(tmp_path_factory.mktemp("hostile_index") / "idx")
    embedder = create_embedder("handcrafted")
    with Index.create(index_dir, embedder, SETTINGS, "ivfpq") as index:
        assert len(index.add_sources([paths[n] for n in NAMES[:-1]], embedder).added) == 5
    assert Index.open(index_dir).store.kind == "ivfpq"  # past the 1,000 vectors its codes train on
    return index_dir, paths, paths["query"]


@pytest.fixture(scope="module")
def saved(corpus, tmp_path_factory):
    """A search saved with --save (ROI, k 5, no placement): its path."""
    index_dir, _, query = corpus
    path = str(tmp_path_factory.mktemp("hostile_searches") / "search.json")
    assert cli.main(["search", "--index", index_dir, "--volume", query, "--roi-ras", ROI, "-k", "5", "--no-place", "--save",
                     path]) == 0
    return path


def run(capsys, *args):
    """The CLI in this process: (exit code, stdout, stderr); a refusal by argparse is its exit code."""
    try:
        code = cli.main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def refused(code, err, *words, status=1):
    """A refusal: the exit status, one line on stderr, no traceback, every one of ``words`` in it."""
    assert code == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def snapshot(folder):
    """What an index folder holds, byte for byte (its lock file aside)."""
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if name != ".lock"}


@pytest.fixture
def copy(corpus, tmp_path):
    target = str(tmp_path / "copy")
    shutil.copytree(corpus[0], target, ignore=shutil.ignore_patterns(".lock"))
    return target


# ----- exports: CSV cells a spreadsheet would run, scenes with XML specials ------------------------------------------------
def test_csv_export_escapes_formula_cells_and_keeps_numbers(saved, tmp_path, capsys):
    side = tmp_path / "labels.local.csv"
    answer = json.load(open(saved))["answer"]["results"]
    ids = [r["case_id"] for r in answer]
    with open(side, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case_id", "column", "value", "at", "by", "index"])
        for case_id, value in zip(ids, ["=1+1", "-3.2", "@SUM(A1)", "\tcmd", "+2e3"]):
            writer.writerow([case_id, "finding", value, "2026-01-01T00:00:00+00:00", "", ""])
    out = tmp_path / "out.csv"
    code, text, err = run(capsys, "export", saved, "--csv", out, "--local-labels", side)
    assert code == 0 and "5 results" in text, err
    rows = list(csv.DictReader(open(out, newline="", encoding="utf-8")))
    by_name = {r["name"]: r for r in rows}
    assert set(by_name) == {"'=HYPERLINK(1)", "a&b<c>'d\"", "'+plus", "'-minus", "'@at"}  # names, escaped where they start a formula
    assert [r["finding"] for r in rows] == ["'=1+1", "-3.2", "'@SUM(A1)", "'\tcmd", "+2e3"]  # numbers stay numbers
    for row in rows:
        assert not row["case_id"].startswith(("=", "+", "-", "@")) and float(row["score"]) > 0
        for value in row.values():  # a cell starting like a formula is a plain number or begins with a quote
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")) or np.isfinite(float(value)), value
        assert all(np.isfinite(float(row[c])) for c in ("match_r", "match_a", "match_s"))  # signed coordinates stay numbers


@pytest.mark.parametrize("suffix", [".mrml", ".mrb"])
def test_a_scene_of_files_named_with_xml_specials_is_valid_and_reads_back_whole(corpus, saved, tmp_path, capsys, suffix):
    pytest.importorskip("slicer")
    import zipfile
    from xml.etree import ElementTree

    out = str(tmp_path / f"scene{suffix}")
    code, text, err = run(capsys, "export", saved, "--scene", out)
    assert code == 0 and "6 volumes, 6 ROIs" in text and err == "", err
    if suffix == ".mrml":
        ElementTree.parse(out)  # well-formed: MRML wrote the & of 'a&b<c>...' raw into fileName before
    else:
        with zipfile.ZipFile(out) as bundle:
            ElementTree.fromstring(bundle.read(next(n for n in bundle.namelist() if n.endswith(".mrml"))))
    from conftest import open_scene_file

    opened = open_scene_file(out, str(tmp_path / "cache"))
    scene = opened.scene
    volumes = {scene.GetNthNodeByClass(n, "vtkMRMLScalarVolumeNode").GetName(): scene.GetNthNodeByClass(n, "vtkMRMLScalarVolumeNode")
               for n in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))}
    rois = [scene.GetNthNodeByClass(n, "vtkMRMLMarkupsROINode").GetName()
            for n in range(scene.GetNumberOfNodesByClass("vtkMRMLMarkupsROINode"))]
    assert len(volumes) == 6 and len(rois) == 6
    assert all(node.GetImageData() is not None and node.GetImageData().GetDimensions() == SHAPE for node in volumes.values())
    assert any(name.endswith(". a&b<c>'d\"") for name in volumes) and "Query ROI" in rois


def test_a_scene_whose_volumes_are_gone_says_so_in_one_line(saved, tmp_path, capfd):
    pytest.importorskip("slicer")
    data = json.load(open(saved))
    for result in data["answer"]["results"]:
        result["source"] = str(tmp_path / "gone" / os.path.basename(result["source"]))
    gone = tmp_path / "gone.json"
    gone.write_text(json.dumps(data))
    capfd.readouterr()
    code = cli.main(["export", str(gone), "--scene", str(tmp_path / "gone.mrml")])
    out, err = capfd.readouterr()  # file descriptors: VTK and ITK write there, past Python's streams
    assert code == 0 and "1 volumes, 1 ROIs" in out
    assert len(err.strip().splitlines()) == 1 and "left out 5 of 5 results" in err and "does not exist" in err, err


# ----- the compressed store and the seal --------------------------------------------------------------------------------
def test_a_zeroed_compressed_store_is_refused_when_a_search_reads_it(corpus, copy, capsys):
    _, _, query = corpus
    code, good, _ = run(capsys, "search", "--index", copy, "--volume", query, "--no-place", "--json", "-k", "3")
    assert code == 0
    rows = os.path.join(copy, ROWS)
    with open(rows, "r+b") as handle:  # zeroed in place: same size, so opening (which checks sizes) cannot tell
        handle.write(bytes(os.path.getsize(rows)))
    before = snapshot(copy)
    code, out, err = run(capsys, "search", "--index", copy, "--volume", query, "--no-place", "--json", "-k", "3")
    refused(code, err, rows, "checksum differs", "damaged", "cbir index repair")
    assert out == "" and snapshot(copy) == before  # no answer, nothing written
    code, out, _ = run(capsys, "index", "verify", "--index", copy, "--no-sources")
    assert code == 1 and "vectors.f16" in out


def _edit_and_reseal(folder, keep_keyed=True):
    """A catalog edited by hand (a case renamed), its checksum and the manifest's own sealed again with the public formula."""
    with sqlite3.connect(os.path.join(folder, CATALOG)) as db:
        db.execute("UPDATE cases SET name = 'edited' WHERE name = '+plus'")
    db.close()
    manifest = json.load(open(os.path.join(folder, MANIFEST)))
    manifest["files"][CATALOG] = file_record(os.path.join(folder, CATALOG))
    if not keep_keyed:
        manifest.pop(keyed_seal.FIELD)
    write_json_atomically(os.path.join(folder, MANIFEST), seal(manifest))


def test_a_catalog_edited_and_resealed_is_refused(corpus, copy, capsys):
    _, _, query = corpus
    _edit_and_reseal(copy)
    before = snapshot(copy)
    code, out, _ = run(capsys, "index", "verify", "--index", copy, "--no-sources")
    assert code == 1 and "keyed seal does not match" in out
    code, out, err = run(capsys, "search", "--index", copy, "--volume", query, "--no-place", "-k", "2")
    refused(code, err, os.path.join(copy, MANIFEST), "keyed seal does not match", "edited outside CBIRSlicer")
    code, _, err = run(capsys, "index", "add", query, "--index", copy)
    refused(code, err, "keyed seal does not match")
    code, _, err = run(capsys, "index", "trust", "--index", copy)
    refused(code, err, "edited since", "cbir index repair")
    assert out == "" and snapshot(copy) == before


def test_a_stripped_seal_or_another_key_opens_but_is_not_vouched_for_until_trusted(corpus, copy, capsys, monkeypatch, tmp_path):
    _, _, query = corpus
    _edit_and_reseal(copy, keep_keyed=False)
    before = snapshot(copy)
    code, out, err = run(capsys, "search", "--index", copy, "--volume", query, "--no-place", "-k", "5")
    assert code == 0 and "edited" in out  # a copy must open: the checksums still hold ...
    assert "not sealed under any key" in err and "cbir index trust" in err  # ... and the reader is told what they cannot
    code, out, _ = run(capsys, "index", "verify", "--index", copy, "--no-sources")
    assert code == 1 and "not sealed under any key" in out
    code, _, err = run(capsys, "index", "add", query, "--index", copy)
    refused(code, err, "not sealed under any key", f"cbir index trust --index {copy}")
    assert snapshot(copy) == before
    code, out, _ = run(capsys, "index", "trust", "--index", copy)
    assert code == 0 and "now sealed under this machine's key" in out
    assert run(capsys, "index", "verify", "--index", copy, "--no-sources")[0] == 0
    # The same index read where another key is (another machine): it opens, with the note; verify cannot vouch.
    monkeypatch.setenv(keyed_seal.KEY_VARIABLE, "another machine's key")
    code, out, err = run(capsys, "search", "--index", copy, "--volume", query, "--no-place", "-k", "2")
    assert code == 0 and "sealed under another key" in err
    assert run(capsys, "index", "verify", "--index", copy, "--no-sources")[0] == 1
    # Where there is no key at all (a reader who never wrote an index): opens quietly, verify says what it did not check.
    monkeypatch.delenv(keyed_seal.KEY_VARIABLE)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "empty-config"))
    code, out, err = run(capsys, "search", "--index", copy, "--volume", query, "--no-place", "-k", "2")
    assert code == 0 and err == ""
    code, out, _ = run(capsys, "index", "verify", "--index", copy, "--no-sources")
    assert code == 0 and "keyed seal was not checked" in out
    assert not os.path.exists(tmp_path / "empty-config")  # readers make no key


# ----- filters, options and saved searches -------------------------------------------------------------------------------
@pytest.mark.parametrize("args, words, status", [
    (["--filter", "name=a", "--filter", "name=b"], ["filter field 'name' is given twice"], 1),
    (["--slice-ras", "0,0,500"], ["query.nii.gz", "lies outside the volume", "S -15.0..15.0"], 1),
    (["-k", "-1"], ["argument -k", "-1 is outside 1..1000"], 2),
    (["-k", "0"], ["argument -k", "0 is outside"], 2),
    (["-k", "99999999999999999999"], ["argument -k"], 2),
    (["-k", "nan"], ["argument -k", "not a whole number"], 2),
    (["--roi-ras", ROI, "--margin-mm=-1e9"], ["argument --margin-mm", "from 0 mm to 100 mm"], 2),
    (["--roi-ras", ROI, "--margin-mm=nan"], ["argument --margin-mm"], 2),
    (["--roi-ras", ROI, "--margin-mm=1e300"], ["argument --margin-mm"], 2),
], ids=["repeated-filter", "slice-outside", "k-negative", "k-zero", "k-huge", "k-nan", "margin-negative", "margin-nan",
        "margin-huge"])
def test_options_that_would_answer_something_else_are_refused(corpus, capsys, args, words, status):
    index_dir, _, query = corpus
    before = snapshot(index_dir)
    code, out, err = run(capsys, "search", "--index", index_dir, "--volume", query, "--no-place", *args)
    refused(code, err, *words, status=status)
    assert out == "" and snapshot(index_dir) == before


@pytest.mark.parametrize("item", ["99999999999999999999999", "nan", "-5"])
def test_like_of_an_impossible_item_is_refused(corpus, capsys, item):
    code, _, err = run(capsys, "search", "--index", corpus[0], f"--like={item}")
    refused(code, err, "argument --like", status=2)


def _saved_with(saved, tmp_path, change) -> str:
    data = json.load(open(saved))
    change(data)
    path = str(tmp_path / "changed.json")
    with open(path, "w") as handle:
        handle.write(data if isinstance(data, str) else json.dumps(data))
    return path


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("change, words", [
    (lambda d: d["settings"].update(k=-3), ["settings.k is -3"]),
    (lambda d: d["settings"].update(k="ten"), ["settings.k is 'ten'"]),
    (lambda d: d["settings"].update(margin_mm=-1e9), ["settings.margin_mm"]),
    (lambda d: d["settings"].update(axis="oblique"), ["axis 'oblique'"]),
    (lambda d: d["query"]["description"].update(deep=json.loads("[" * 500 + "]" * 500)), []),  # deep, but JSON reads it
], ids=["k-negative", "k-text", "margin", "axis", "deep-but-fine"])
def test_saved_searches_with_impossible_settings_are_refused(saved, tmp_path, capsys, change, words):
    path = _saved_with(saved, tmp_path, change)
    code, out, err = run(capsys, "rerun", path)
    if not words:
        assert code == 0, err
        return
    refused(code, err, path, "saved search is malformed", *words)


def test_json_nested_too_deeply_or_holding_nan_is_refused_naming_the_file(corpus, saved, tmp_path, capsys):
    index_dir, _, query = corpus
    deep = tmp_path / "deep.json"
    deep.write_text('{"format": "cbirslicer-search", "query": ' + DEEP + "}")
    refused(*run(capsys, "rerun", deep)[::2], str(deep), "nested too deeply")
    refused(*run(capsys, "export", deep, "--csv", tmp_path / "x.csv")[::2], str(deep), "nested too deeply")
    refused(*run(capsys, "search", "--index", index_dir, "--from", deep)[::2], str(deep), "nested too deeply")
    markups = tmp_path / "deep.mrk.json"
    markups.write_text(DEEP)
    refused(*run(capsys, "search", "--index", index_dir, "--volume", query, "--roi", markups)[::2], str(markups), "nested too deeply")
    nan = tmp_path / "nan.json"
    nan.write_text(open(saved).read().replace('"k": 5', '"k": NaN'))
    refused(*run(capsys, "rerun", nan)[::2], str(nan), "NaN")
    assert not (tmp_path / "x.csv").exists()


def test_answers_given_to_from_that_name_other_cases_or_shapes_are_refused(corpus, tmp_path, capsys):
    index_dir, _, query = corpus
    code, out, _ = run(capsys, "search", "--index", index_dir, "--volume", query, "--no-place", "--json", "-k", "3")
    answer = json.loads(out)

    def written(change) -> str:
        data = json.loads(json.dumps(answer))
        change(data)
        path = tmp_path / f"answer{len(os.listdir(tmp_path))}.json"
        path.write_text(json.dumps(data))
        return str(path)

    first = answer["results"][0]
    marked = written(lambda d: d["query"].update(feedback={"relevant": {"cdeadbeefdeadbee": first["best_match"]["item_id"]}}))
    refused(*run(capsys, "search", "--index", index_dir, "--from", marked, "--no-place")[::2], marked, "cdeadbeefdeadbee",
            "does not hold")
    for change, words in [(lambda d: d["query"].update(feedback="x"), ["feedback marks"]),
                          (lambda d: d["query"].update(mode="item", item="x"), ["its query cannot be read"]),
                          (lambda d: d.update(results=[1, 2]), ["a result without a case id"]),
                          (lambda d: d.update(query=[]), ["no query and results"])]:
        path = written(change)
        refused(*run(capsys, "search", "--index", index_dir, "--from", path, "--no-place")[::2], path, *words)


# ----- degenerate volumes ---------------------------------------------------------------------------------------------------
def _degenerate(tmp_path, kind):
    import SimpleITK as sitk

    volume = _ball(0)
    image = volume.to_sitk()
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    if kind == "origin-1e30":
        image.SetOrigin((1e30, 1e30, 1e30))
    elif kind == "spacing-1e9":
        image.SetSpacing((1e9, 1e9, 1e9))
    elif kind in ("all-nan", "constant"):
        array[:] = np.nan if kind == "all-nan" else 7.0
        flat = sitk.GetImageFromArray(array)
        flat.CopyInformation(image)
        image = flat
    path = str(tmp_path / f"{kind}.nrrd")
    sitk.WriteImage(image, path)
    return path


@pytest.mark.parametrize("kind, words", [("origin-1e30", ["1e+30 mm from the RAS origin"]),
                                         ("spacing-1e9", ["voxel size 1e+09"]),
                                         ("all-nan", ["all NaN or infinite"]),
                                         ("constant", ["every finite voxel is 7"])])
def test_degenerate_volumes_are_refused_as_queries_and_skipped_by_builds(corpus, copy, tmp_path, capsys, kind, words):
    path = _degenerate(tmp_path, kind)
    before = snapshot(corpus[0])
    refused(*run(capsys, "search", "--index", corpus[0], "--volume", path, "--no-place")[::2], path, *words)
    assert snapshot(corpus[0]) == before
    code, out, err = run(capsys, "index", "add", path, "--index", copy)
    assert code == 1 and f"skipped {path}: " in out and words[0] in out, out
    assert err.strip().splitlines()[-1].endswith("nothing indexed (every file was skipped)")
    assert run(capsys, "index", "verify", "--index", copy, "--no-sources")[0] == 0
    assert Index.open(copy).catalog.count("cases") == 5


# ----- full disks -------------------------------------------------------------------------------------------------------------
def test_a_full_disk_is_said_as_such_and_loses_nothing(corpus, copy, capsys, monkeypatch):
    import faiss

    from CBIRSlicerLib.index import integrity

    case_id = Index.open(copy).catalog.cases()[0].case_id
    before = snapshot(copy)

    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(integrity.os, "fsync", full)  # the manifest's temporary file cannot be written out
    code, _, err = run(capsys, "label", case_id, "finding=mass", "--index", copy)
    refused(code, err, os.path.join(copy, MANIFEST), "No space left on device", "previous version is kept")
    assert snapshot(copy) == before and not [n for n in os.listdir(copy) if ".tmp-" in n]
    monkeypatch.undo()
    # A catalog SQLite cannot write: said as a full disk, not as damage.
    from CBIRSlicerLib.index import labels

    def sqlite_full(*args, **kwargs):
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(labels, "set_label", sqlite_full)
    code, _, err = run(capsys, "label", case_id, "finding=mass", "--index", copy)
    line = refused(code, err, os.path.join(copy, CATALOG), "disk is full", "nothing committed was lost", "free space")
    assert "the index is damaged" not in line and "not damaged" in line
    monkeypatch.undo()
    # The vectors file cannot be written while cases are added: one line naming it; the cases already there stay searchable.
    def faiss_full(*args):
        raise RuntimeError("Error in faiss::write_index: write error in vectors.faiss.tmp: 5 != 17 (No space left on device)")

    monkeypatch.setattr(faiss, "write_index", faiss_full)
    code, _, err = run(capsys, "index", "add", corpus[2], "--index", copy)
    assert code == 1 and err.strip().splitlines()[-1] == (f"cbir: error: {os.path.join(copy, 'vectors.faiss')}: cannot be written "
                                                           "(No space left on device); the previous version is kept")
    monkeypatch.undo()
    assert not [n for n in os.listdir(copy) if ".tmp-" in n]
    code, out, _ = run(capsys, "search", "--index", copy, "--volume", corpus[2], "--no-place", "--json", "-k", "10")
    assert code == 0 and len(json.loads(out)["results"]) == 5
    assert run(capsys, "index", "add", corpus[2], "--index", copy)[0] == 0  # the next writer tidies and goes on
    assert Index.open(copy).verify(check_sources=False) == []


# ----- what a new user meets ----------------------------------------------------------------------------------------------
def test_index_cases_lists_ids_names_modality_body_part_and_labels(corpus, copy, capsys):
    index = Index.open(copy)
    first = index.catalog.cases()[0]
    assert run(capsys, "label", first.case_id, "finding=cyst", "--index", copy)[0] == 0
    code, out, _ = run(capsys, "index", "cases", "--index", copy)
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 5
    assert lines[0].split()[:4] == [first.case_id, first.name, "CT", first.body_part] and "finding=cyst" in lines[0]
    code, out, _ = run(capsys, "index", "cases", "--index", copy, "--json")
    listed = json.loads(out)
    assert {c["case_id"] for c in listed} == {c.case_id for c in index.catalog.cases()}
    assert listed[0]["labels"] == {"finding": "cyst"} and listed[0]["modality"] == "CT"


def test_text_results_show_id_modality_body_part_and_match_and_say_why_fewer(corpus, capsys):
    index_dir, _, query = corpus
    code, out, err = run(capsys, "search", "--index", index_dir, "--volume", query, "--roi-ras", ROI, "--no-place", "-k", "10")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 7  # the query, five results, the note
    index = Index.open(index_dir)
    for line in lines[1:6]:
        case = index.catalog.case_by_id(line.split()[3])  # rank, score, name, case id, modality, body part, the match
        assert case is not None and f"{case.modality} {case.body_part}" in line
        assert "most alike: " in line and " on axial slice " in line and case.source in line
    assert lines[6] == "note: 5 of the 10 cases asked for: the index holds 5 cases"  # the query is not one of them


def test_from_takes_a_saved_search_and_the_note_counts_the_judged_cases(corpus, saved, capsys):
    index_dir = corpus[0]
    first = json.load(open(saved))["answer"]["results"][0]["case_id"]
    code, out, err = run(capsys, "search", "--index", index_dir, "--from", saved, "--relevant", first, "--no-place", "--json",
                         "-k", "5")
    assert code == 0, err
    answer = json.loads(out)
    assert first not in [r["case_id"] for r in answer["results"]] and len(answer["results"]) == 4
    assert answer["query"]["feedback"]["relevant"] == {first: json.load(open(saved))["answer"]["results"][0]["best_match"]["item_id"]}
    assert answer["note"] == "4 of the 5 cases asked for: the index holds 5 cases; 1 left out (already judged)"


def test_precision_plot_ticks_are_whole_numbers():
    from CBIRSlicerLib.plots import precision_figure

    figure = precision_figure({"m": {"k": [1, 3, 5], "micro": [0.5, 0.4, 0.3], "macro": [0.5, 0.4, 0.3], "chance": 0.2}})
    ticks = [t for t in figure.axes[0].get_xticks() if 1 <= t <= 5]
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks)


def test_library_warnings_are_one_line(capsys, corpus, monkeypatch):
    import warnings

    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)  # put back after the test
    assert run(capsys, "index", "info", "--index", corpus[0])[0] == 0
    shown = warnings.formatwarning("a library's\nwarning of two lines", RuntimeWarning, "/x/numpy/core.py", 12, "line = 1 / 0")
    assert shown == "cbir: warning: a library's warning of two lines (RuntimeWarning, core.py:12)\n"


def test_a_label_that_is_not_one_line_of_text_is_refused(copy, capsys):
    case_id = Index.open(copy).catalog.cases()[0].case_id
    before = snapshot(copy)
    for value in ("a\nb", "x\x1b[31m", "y" * 1001):
        line = refused(*run(capsys, "label", case_id, f"finding={value}", "--index", copy)[::2], "label value")
        assert "\x1b" not in line
    assert snapshot(copy) == before
