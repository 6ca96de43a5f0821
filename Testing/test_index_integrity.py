"""An index that never lies: each case as a user meets it, through the `cbir` command line.

Damaged, missing, older and read-only indexes; filters on fields no case has; every bad input of the issue
as one line on stderr with exit code 1; repair; patient IDs kept only as a keyed hash.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3

import numpy as np
import pytest
import SimpleITK as sitk

from CBIRSlicerLib import cli
from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.index.files import CATALOG, MANIFEST, VECTORS
from CBIRSlicerLib.index.folder import Index

SHAPE = (24, 24, 12)
SMALL = ["--model", "handcrafted", "--stride-mm", "8", "--tiles-mm", "", "--blobs", "0"]


def write_case(path, seed=0, array=None):
    """A small phantom (a ball somewhere), or the given voxels on its grid."""
    rng = np.random.default_rng(seed)
    blob = synthetic.Blob(tuple(rng.uniform(-6, 6, 3) * np.array([1, 1, 0.3])), 5.0, 300.0)
    volume = synthetic.render(synthetic.centered_matrix(SHAPE, (2.0, 2.0, 2.0)), SHAPE, blobs=[blob], body_radii=(18, 18, 30))
    if array is not None:  # written as MetaImage: ITK's NIfTI reader turns NaN into 0
        volume.array = array
        path = str(path).replace(".nii.gz", ".mha")
    return synthetic.write_volume(volume, str(path))


def cbir(capsys, *args):
    """Run cbir in-process: (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(err, *needles):
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("cbir: error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cases")
    paths = [write_case(folder / f"case{n}.nii.gz", n) for n in range(3)]
    with open(folder / "labels.csv", "w") as handle:
        handle.write("path,label\n" + "".join(f"{p},{'ball' if n < 2 else 'other'}\n" for n, p in enumerate(paths)))
    return folder, paths


@pytest.fixture(scope="module")
def built(cases, tmp_path_factory):
    folder, _ = cases
    index = tmp_path_factory.mktemp("index") / "idx"
    assert cli.main(["index", "build", str(folder), "--index", str(index), "--labels", str(folder / "labels.csv"), *SMALL]) == 0
    return str(index)


@pytest.fixture
def copy(built, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(built, target, ignore=shutil.ignore_patterns(".lock"))
    return str(target)


def search(capsys, index, query, *more):
    return cbir(capsys, "search", "--index", index, "--volume", query, "--json", "-k", "3", *more)


def overwrite_block(path, block, size=4096, seed=0):
    """Overwrite one 4 KiB block (or the file's tail) with other bytes."""
    with open(path, "r+b") as handle:
        handle.seek(block * size)
        old = handle.read(size)
        noise = np.random.default_rng(seed + block).integers(0, 256, len(old), dtype=np.uint8).tobytes()
        handle.seek(block * size)
        handle.write(bytes(a ^ (b or 1) for a, b in zip(old, noise)))  # every byte changes
    return old


def restore_block(path, block, old, size=4096):
    with open(path, "r+b") as handle:
        handle.seek(block * size)
        handle.write(old)


# ----- silently wrong answers, now errors ------------------------------------------------------------------------------
def test_every_4k_block_of_every_owned_file_is_caught_by_verify(copy, capsys):
    assert cbir(capsys, "index", "verify", "--index", copy)[0] == 0
    manifest = json.load(open(os.path.join(copy, MANIFEST)))
    owned = [*manifest["files"], MANIFEST]
    assert set(owned) == {VECTORS, CATALOG, MANIFEST, "transform.npz"}  # the learned vector transform is owned too
    checked = 0
    for name in owned:
        path = os.path.join(copy, name)
        for block in range((os.path.getsize(path) + 4095) // 4096):
            old = overwrite_block(path, block)
            code, out, err = cbir(capsys, "index", "verify", "--index", copy, "--no-sources")
            assert code == 1 and "Traceback" not in err, (name, block)
            assert "index is consistent" not in out
            restore_block(path, block, old)
            checked += 1
    assert checked > 10 and cbir(capsys, "index", "verify", "--index", copy)[0] == 0


def test_a_damaged_vectors_block_is_an_error_for_search_add_and_verify(copy, cases, capsys):
    folder, paths = cases
    before = open(os.path.join(copy, VECTORS), "rb").read()
    overwrite_block(os.path.join(copy, VECTORS), 1)
    code, out, err = search(capsys, copy, paths[0])
    assert code == 1 and out == "" and "NaN" not in out
    one_line_error(err, VECTORS, "damaged", "cbir index repair")
    code, out, err = cbir(capsys, "index", "add", str(folder), "--index", copy)
    one_line_error(err, VECTORS, "damaged")
    assert code == 1 and open(os.path.join(copy, VECTORS), "rb").read() != before  # left as it was found, not re-sealed
    code, out, err = cbir(capsys, "index", "verify", "--index", copy)
    assert code == 1 and "checksum differs" in err + out


@pytest.mark.parametrize("name", [VECTORS, CATALOG])
def test_a_missing_part_is_an_error_never_an_empty_answer(copy, cases, capsys, name):
    folder, paths = cases
    os.remove(os.path.join(copy, name))
    code, out, err = search(capsys, copy, paths[0])
    assert code == 1 and out == ""
    one_line_error(err, os.path.join(copy, name), "missing", "repair")
    for args in (["add", str(folder)], ["remove", "c0"], ["refresh"], ["info"], ["verify"]):
        code, out, err = cbir(capsys, "index", *args, "--index", copy)
        assert code == 1, args
        one_line_error(err, "missing")
    assert not os.path.exists(os.path.join(copy, name))  # nothing recreated an empty one


def test_a_damaged_catalog_block_is_caught_by_verify_and_refused_by_add(copy, cases, capsys):
    folder, _ = cases
    overwrite_block(os.path.join(copy, CATALOG), 2)
    code, out, err = cbir(capsys, "index", "verify", "--index", copy, "--no-sources")
    assert code == 1 and CATALOG in out + err
    code, out, err = cbir(capsys, "index", "add", str(folder), "--index", copy)
    assert code == 1
    one_line_error(err, CATALOG, "damaged")


@pytest.mark.parametrize("damage", ["truncate-manifest", "truncate-catalog", "garbage-catalog"])
def test_a_truncated_or_corrupt_part_is_one_line_in_every_command(copy, cases, capsys, damage):
    folder, paths = cases
    name = MANIFEST if damage == "truncate-manifest" else CATALOG
    path = os.path.join(copy, name)
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 3] if damage.startswith("truncate") else b"SQLite format 3\x00" + os.urandom(8000))
    for args in (["search", "--index", copy, "--volume", paths[0]], ["index", "info", "--index", copy],
                 ["index", "verify", "--index", copy], ["index", "add", str(folder), "--index", copy]):
        code, out, err = cbir(capsys, *args)
        assert code == 1, args
        one_line_error(err, name)


def test_search_never_prints_a_nan_score(copy, cases, capsys):
    _, paths = cases
    # A NaN written where a vector lies, with the manifest re-sealed over it: only the score check stands in the way.
    from CBIRSlicerLib.atomic import write_json_atomically
    from CBIRSlicerLib.index.integrity import file_record, seal

    index = Index.open(copy)
    vector = index.store.reconstruct(index.store.ids()[:1])[0]
    index.catalog.close()
    data = bytearray(open(os.path.join(copy, VECTORS), "rb").read())
    at = bytes(data).find(vector.astype(np.float32).tobytes())
    assert at > 0
    data[at:at + 4] = np.float32(np.nan).tobytes()
    open(os.path.join(copy, VECTORS), "wb").write(bytes(data))
    manifest = json.load(open(os.path.join(copy, MANIFEST)))
    manifest["files"][VECTORS] = file_record(os.path.join(copy, VECTORS))
    from CBIRSlicerLib.index.keyed_seal import sign  # sealed again as a writer here would: damage its checksums cannot see

    write_json_atomically(os.path.join(copy, MANIFEST), seal(sign(manifest)))
    code, out, err = cbir(capsys, "search", "--index", copy, "--volume", paths[1], "--json", "-k", "3")
    assert "NaN" not in out
    assert code == 1 and "NaN" in one_line_error(err, "damaged")
    code, out, _ = cbir(capsys, "index", "verify", "--index", copy, "--no-sources")
    assert code == 1 and "NaN or infinite" in out


# ----- filters -----------------------------------------------------------------------------------------------------------
def test_a_filter_on_a_field_no_case_has_is_an_error_listing_the_fields(built, cases, capsys):
    _, paths = cases
    for field in ("no_such_field=1", "series_uid=1.2.3"):  # NIfTI cases have no series UID (their modality is inferred)
        code, out, err = search(capsys, built, paths[0], "--filter", field)
        assert code == 1 and out == ""
        line = one_line_error(err, field.split("=")[0], "no case of the index has it", "fields that exist")
        assert "label" in line and "name" in line


def test_a_filter_matching_no_case_says_so(built, cases, capsys):
    _, paths = cases
    code, out, err = search(capsys, built, paths[0], "--filter", "label=nothing-like-this")
    answer = json.loads(out)
    assert code == 0 and answer["results"] == [] and "label=nothing-like-this" in answer["note"]
    assert "no case of the index matches" in err
    code, out, _ = search(capsys, built, paths[0], "--filter", "label=ball")
    assert code == 0 and 1 <= len(json.loads(out)["results"]) <= 2  # the query's own case is left out


# ----- read-only indexes -------------------------------------------------------------------------------------------------
def test_readers_write_nothing_and_a_read_only_copy_answers_the_same(built, cases, capsys, tmp_path, request):
    _, paths = cases
    before = {name: open(os.path.join(built, name), "rb").read() for name in os.listdir(built)}
    code, expected, _ = search(capsys, built, paths[0])
    assert code == 0
    for args in (["index", "info", "--index", built], ["index", "verify", "--index", built]):
        assert cbir(capsys, *args)[0] == 0
    from CBIRSlicerLib.retrieval.queries import load_volume_for_query, volume_query
    from CBIRSlicerLib.scene.search_session import SearchSession, shutdown_services

    session = SearchSession(built)  # the Slicer module's way in: an index plus a model in a worker process
    try:
        answer = session.start(volume_query(load_volume_for_query(paths[0]), "axial", session.index), k=3).wait(timeout=60)
        assert [r.case_id for r in answer.results] == [r["case_id"] for r in json.loads(expected)["results"]]
    finally:
        session.close()
        shutdown_services()  # no worker left running after the test
    after = {name: open(os.path.join(built, name), "rb").read() for name in os.listdir(built)}
    assert after == before  # no -wal, -shm, -journal or lock file, and no byte changed
    nobody = request.getfixturevalue("other_user")  # skips without root and setpriv
    # A copy nobody may write (a DVD, a teaching archive), read by a user who cannot write it: the CLI and the module's logic.
    # Outside pytest's own temporary root: a pytest session starting meanwhile (another test run) makes that root 0700 again.
    import pathlib
    import tempfile

    outside = pathlib.Path(tempfile.mkdtemp(prefix="cbir-readonly-"))
    shared = outside / "shared"
    shutil.copytree(built, shared / "idx", ignore=shutil.ignore_patterns(".lock"))
    shutil.copy(paths[0], shared / "query.nii.gz")
    for folder, _, files in os.walk(outside):
        os.chmod(folder, 0o555)
        for name in files:
            os.chmod(os.path.join(folder, name), 0o444)
    os.chmod(outside, 0o555)
    readonly = str(shared / "idx")

    def run(*args):
        return nobody.run("-m", "CBIRSlicerLib.cli", *args, home=str(outside))

    try:
        for args in (["index", "info", "--index", readonly], ["index", "verify", "--index", readonly, "--no-sources"]):
            result = run(*args)
            assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
        result = run("search", "--index", readonly, "--volume", str(shared / "query.nii.gz"), "--json", "-k", "3")
        assert result.returncode == 0, result.stderr
        mine, theirs = json.loads(expected), json.loads(result.stdout)
        assert [r["case_id"] for r in theirs["results"]] == [r["case_id"] for r in mine["results"]]
        assert [r["score"] for r in theirs["results"]] == [r["score"] for r in mine["results"]]
        query = str(shared / "query.nii.gz")
        # The module's panel reads the index with index_summary and searches it with a Searcher over the session's index
        # (the session's worker process is not started as 'nobody': the module's logic is what is checked here).
        logic = ("from CBIRSlicerLib.scene.search_session import index_summary; from CBIRSlicerLib.index.folder import Index; "
                 "from CBIRSlicerLib.retrieval.search import Searcher; "
                 "from CBIRSlicerLib.retrieval.queries import volume_query, load_volume_for_query; "
                 "import json; "
                 f"s = index_summary({readonly!r}); i = Index.open({readonly!r}); q = load_volume_for_query({query!r}); "
                 "a = Searcher(i).search(volume_query(q, 'axial', i), 3); "
                 "print(json.dumps([s['counts'], [r.case_id for r in a.results]]))")
        result = nobody.run("-c", logic, home=str(outside))
        assert result.returncode == 0, result.stderr
        counts, ids = json.loads(result.stdout)
        assert counts["cases"] == 3 and ids == [r["case_id"] for r in mine["results"]]
        assert sorted(os.listdir(readonly)) == sorted(n for n in os.listdir(built) if n != ".lock")
    finally:
        for folder, _, _files in os.walk(outside):
            os.chmod(folder, 0o755)
        shutil.rmtree(outside)


# ----- bad input, one line each -------------------------------------------------------------------------------------------
def test_negative_numbers_after_roi_ras_and_slice_ras_with_a_space(built, cases, capsys, tmp_path):
    _, paths = cases
    code, out, err = cbir(capsys, "slices", paths[0], "--out", tmp_path / "s", "--roi-ras", "-4,-3,-2,10,10,6")
    assert code == 0, err
    entries = json.load(open(tmp_path / "s" / "slices.json"))
    assert entries and all(abs(e["ras"][2] + 2) <= 3.01 for e in entries)
    code, out, err = search(capsys, built, paths[1], "--slice-ras", "-4,-3,-2")
    assert code == 0, err
    assert json.loads(out)["query"]["mode"] == "slice" and abs(json.loads(out)["query"]["ras"][2] + 2) <= 1.01


def test_a_nan_roi_centre_is_named_as_such(cases, capsys, tmp_path):
    _, paths = cases
    code, _, err = cbir(capsys, "slices", paths[0], "--out", tmp_path, "--roi-ras", "nan,0,0,10,10,10")
    assert code == 1
    line = one_line_error(err, "ROI centre")
    assert "size" not in line


def test_nan_and_constant_volumes_are_refused_for_indexing_some_nan_is_a_warning(tmp_path, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    nan = np.full(SHAPE[::-1], np.nan, np.float32)
    write_case(folder / "all_nan.nii.gz", array=nan)
    write_case(folder / "constant.nii.gz", array=np.full(SHAPE[::-1], 7, np.int16))
    code, out, err = cbir(capsys, "index", "build", folder, "--index", tmp_path / "idx", *SMALL)
    assert code == 1 and "all NaN" in out and "constant" in out
    one_line_error(err, "nothing indexed", "every file was skipped")
    assert not (tmp_path / "idx").exists()  # a first build that indexed nothing leaves no empty index behind (issue 27)
    some = synthetic.render(synthetic.centered_matrix(SHAPE, (2.0,) * 3), SHAPE).array.astype(np.float32)
    some[0, :4, :4] = np.nan
    write_case(folder / "some_nan.nii.gz", array=some)
    code, out, err = cbir(capsys, "index", "build", folder, "--index", tmp_path / "idx", *SMALL)
    assert code == 0 and "1 case(s) added" in out and "warning" in out and "16 of" in out


def test_index_add_refuses_slicing_flags_that_differ_from_the_pinned_ones(copy, cases, capsys):
    folder, _ = cases
    code, _, err = cbir(capsys, "index", "add", folder, "--index", copy, "--axes", "coronal", "--stride-mm", "1")
    assert code == 1
    one_line_error(err, "--axes coronal", "['axial']", "--stride-mm 1", "8.0")
    code, out, err = cbir(capsys, "index", "verify", "--index", copy)
    assert code == 0 and "a writer stopped" not in err + out  # a refusal leaves the index sealed, not 'interrupted'
    code, out, _ = cbir(capsys, "index", "add", folder, "--index", copy, "--stride-mm", "8")  # the pinned value is fine
    assert code == 0 and "3 unchanged" in out
    code, _, err = cbir(capsys, "index", "remove", "no-such-case", "--index", copy)
    assert code == 1 and "is not a case of the index" in err
    code, out, err = cbir(capsys, "index", "verify", "--index", copy)
    assert code == 0 and err == ""


def test_an_empty_folder_or_an_all_skipped_build_exits_1(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, _, err = cbir(capsys, "index", "build", tmp_path / "empty", "--index", tmp_path / "i1", *SMALL)
    assert code == 1
    one_line_error(err, "nothing indexed", "no volume files")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("not a volume")
    (tmp_path / "junk" / "broken.nii.gz").write_bytes(b"\x1f\x8b garbage")
    code, out, err = cbir(capsys, "index", "build", tmp_path / "junk", "--index", tmp_path / "i2", *SMALL)
    assert code == 1 and "2 skipped" in out
    one_line_error(err, "nothing indexed", "every file was skipped")


def _mha_with(path, spacing="2 2 2", matrix="1 0 0 0 1 0 0 0 1"):
    image = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32))
    sitk.WriteImage(image, str(path))
    data = open(path, "rb").read()
    head, sep, voxels = data.partition(b"ElementDataFile = LOCAL\n")
    lines = [line for line in head.decode().splitlines() if not line.startswith(("ElementSpacing", "TransformMatrix"))]
    lines += [f"ElementSpacing = {spacing}", f"TransformMatrix = {matrix}"]
    open(path, "wb").write(("\n".join(lines) + "\n").encode() + sep + voxels)
    return str(path)


@pytest.mark.parametrize("spacing, matrix, needle", [
    ("0 2 2", "1 0 0 0 1 0 0 0 1", "spacing 0 x 2 x 2"),
    ("-1 2 2", "1 0 0 0 1 0 0 0 1", "every spacing must be a positive number"),
    ("2 2 2", "1 0 0 1 0 0 0 0 1", "singular direction matrix"),
    ("2 2 2", "1 0 0 0.5 0.866 0 0 0 1", "not orthonormal"),
])
def test_geometry_problems_are_named_as_such(tmp_path, capsys, spacing, matrix, needle):
    path = _mha_with(tmp_path / "odd.mha", spacing, matrix)
    code, _, err = cbir(capsys, "slices", path, "--out", tmp_path / "out")
    assert code == 1
    line = one_line_error(err, path, needle)
    assert "truncated or corrupt" not in line


@pytest.mark.parametrize("content", [
    "roi_ras,volume\n\"1,2,3,10,10,10\"\n",  # a short row: the volume column missing
    b"volume\n\xff\xfe\xfa.nii.gz\n",  # not UTF-8
])
def test_bad_batch_csv_is_one_line(built, tmp_path, capsys, content):
    path = tmp_path / "batch.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code, out, err = cbir(capsys, "search", "--index", built, "--batch", path)
    assert code == 1 and out == ""
    one_line_error(err, str(path))


# ----- repair and older indexes --------------------------------------------------------------------------------------------
def test_repair_reembeds_from_the_sources_and_never_drops_cases_silently(copy, cases, capsys, tmp_path):
    folder, paths = cases
    _, expected, _ = search(capsys, copy, paths[0])
    os.remove(os.path.join(copy, VECTORS))
    code, out, err = cbir(capsys, "index", "repair", "--index", copy)
    assert code == 0 and "3 case(s) re-embedded" in out, err
    assert cbir(capsys, "index", "verify", "--index", copy)[0] == 0
    _, answer, _ = search(capsys, copy, paths[0])
    strip = [{k: r[k] for k in ("case_id", "score", "labels")} for r in json.loads(expected)["results"]]
    assert [{k: r[k] for k in ("case_id", "score", "labels")} for r in json.loads(answer)["results"]] == strip
    code, out, _ = cbir(capsys, "index", "repair", "--index", copy)
    assert code == 0 and "nothing to repair" in out
    # A case whose source is gone stops the repair until the user says to leave it out.
    moved = tmp_path / "moved.nii.gz"
    shutil.move(paths[2], moved)
    try:
        overwrite_block(os.path.join(copy, VECTORS), 0)
        code, _, err = cbir(capsys, "index", "repair", "--index", copy)
        assert code == 1
        one_line_error(err, "1 of 3 case(s) cannot be re-embedded", paths[2], "--drop-missing")
        assert cbir(capsys, "index", "verify", "--index", copy)[0] == 1  # untouched
        code, out, _ = cbir(capsys, "index", "repair", "--index", copy, "--drop-missing")
        assert code == 0 and "left out" in out and paths[2] in out
        code, out, _ = cbir(capsys, "index", "info", "--index", copy, "--json")
        assert json.loads(out)["counts"]["cases"] == 2
    finally:
        shutil.move(moved, paths[2])


def test_repair_fits_the_vector_transform_again_so_scores_stay_what_they_were(cases, capsys, tmp_path):
    """A repaired index searches through a vector transform fitted on its re-embedded vectors, as the index it replaces did
    (a repair that rebuilt without it left readers comparing raw vectors: other scores, and the pin gone)."""
    folder, paths = cases
    index = str(tmp_path / "dense")  # 2 mm slices and 16 mm tiles: enough vectors (> 29) to whiten the 116-d descriptor
    assert cbir(capsys, "index", "build", folder, "--index", index, "--model", "handcrafted", "--stride-mm", "2",
                "--tiles-mm", "16", "--blobs", "0")[0] == 0
    pinned = json.load(open(os.path.join(index, MANIFEST)))["transform"]
    assert pinned["kind"] == "whiten" and "checksum" in pinned, pinned
    _, expected, _ = search(capsys, index, paths[0], "--no-place")
    os.remove(os.path.join(index, VECTORS))
    code, out, err = cbir(capsys, "index", "repair", "--index", index)
    assert code == 0 and "3 case(s) re-embedded" in out, err
    repaired = json.load(open(os.path.join(index, MANIFEST)))["transform"]
    assert repaired["kind"] == "whiten" and repaired["fitted_on"] == pinned["fitted_on"], repaired
    assert cbir(capsys, "index", "verify", "--index", index)[0] == 0
    assert Index.open(index).transform is not None
    _, answer, _ = search(capsys, index, paths[0], "--no-place")
    before, after = json.loads(expected)["results"], json.loads(answer)["results"]
    assert [r["case_id"] for r in after] == [r["case_id"] for r in before]
    assert np.allclose([r["score"] for r in after], [r["score"] for r in before], atol=1e-4)


def _as_format_1(folder):
    """What an index of format 1 looked like: WAL catalog, manifest without checksums, state or privacy."""
    from CBIRSlicerLib.index.integrity import SEAL

    manifest = json.load(open(os.path.join(folder, MANIFEST)))
    for key in ("files", "state", "privacy", SEAL):
        manifest.pop(key, None)
    manifest["format_version"] = 1
    with open(os.path.join(folder, MANIFEST), "w") as handle:
        json.dump(manifest, handle)
    db = sqlite3.connect(os.path.join(folder, CATALOG))
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("DROP TABLE meta")
    db.close()


def test_an_older_index_is_searched_read_only_and_repair_brings_it_up_to_date(copy, cases, capsys):
    folder, paths = cases
    _, expected, _ = search(capsys, copy, paths[0])
    _as_format_1(copy)
    code, out, err = search(capsys, copy, paths[0])
    assert code == 0 and "index format 1" in err
    assert [r["case_id"] for r in json.loads(out)["results"]] == [r["case_id"] for r in json.loads(expected)["results"]]
    code, _, err = cbir(capsys, "index", "add", folder, "--index", copy)
    assert code == 1
    one_line_error(err, "older CBIRSlicer (index format 1)", "cbir index repair", "cbir index build")
    code, out, err = cbir(capsys, "index", "repair", "--index", copy)
    assert code == 0, err
    assert json.load(open(os.path.join(copy, MANIFEST)))["format_version"] == 2
    assert cbir(capsys, "index", "add", folder, "--index", copy)[0] == 0


def test_a_newer_format_is_refused_in_one_line(copy, capsys):
    from CBIRSlicerLib.atomic import write_json_atomically
    from CBIRSlicerLib.index.integrity import seal

    manifest = json.load(open(os.path.join(copy, MANIFEST)))
    manifest["format_version"] = 99
    write_json_atomically(os.path.join(copy, MANIFEST), seal(manifest))
    code, _, err = cbir(capsys, "index", "info", "--index", copy)
    assert code == 1
    one_line_error(err, "newer CBIRSlicer", "update")


# ----- privacy -----------------------------------------------------------------------------------------------------------------
def test_patient_ids_are_stored_only_as_a_keyed_hash_unless_kept_on_purpose(tmp_path, capsys, monkeypatch):
    from test_readers import phantom, write_dicom_series

    folder = tmp_path / "dicom"
    files = write_dicom_series(phantom(), folder, "1.2.3.4.900")
    for path in files:  # add who the patient is, as a scanner would
        image = sitk.ReadImage(path)
        image.SetMetaData("0010|0020", "PAT-0042")
        image.SetMetaData("0010|0010", "Doe^Jane")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(path)
        writer.Execute(image)
    monkeypatch.setenv("CBIR_PATIENT_KEY", "site-secret")
    assert cbir(capsys, "index", "build", folder, "--index", tmp_path / "idx", *SMALL)[0] == 0
    raw = open(tmp_path / "idx" / CATALOG, "rb").read() + open(tmp_path / "idx" / MANIFEST, "rb").read()
    assert b"PAT-0042" not in raw and b"Doe" not in raw
    case = Index.open(str(tmp_path / "idx")).catalog.cases()[0]
    from CBIRSlicerLib.index.privacy import patient_key

    assert case.metadata["patient_key"] == patient_key("PAT-0042", b"site-secret") and "patient_id" not in case.metadata
    assert patient_key("PAT-0042", b"another-site") != case.metadata["patient_key"]
    assert cbir(capsys, "index", "build", folder, "--index", tmp_path / "kept", *SMALL, "--keep-patient-ids")[0] == 0
    assert Index.open(str(tmp_path / "kept")).catalog.cases()[0].metadata["patient_id"] == "PAT-0042"


def test_the_readme_filter_example_returns_results_on_the_data_it_builds(cases, tmp_path, capsys):
    import re

    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    build = next(line for line in readme.splitlines() if line.startswith("cbir index build") and "--labels" in line)
    field, value = re.search(r"--filter (\w+)=(\S+)", readme).groups()
    assert field == "label" and "--labels labels.csv" in build  # the README builds with the labels its filter uses
    folder, paths = cases
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\n" + "".join(f"{p},{value if n else 'cyst'}\n" for n, p in enumerate(paths)))
    assert cbir(capsys, "index", "build", folder, "--index", tmp_path / "idx", "--labels", labels, *SMALL)[0] == 0
    code, out, _ = search(capsys, str(tmp_path / "idx"), paths[0], "--filter", f"{field}={value}")
    assert code == 0 and len(json.loads(out)["results"]) == 2


def test_a_lost_manifest_is_rebuilt_by_repair_from_the_catalogs_copy(copy, cases, capsys):
    _, paths = cases
    _, expected, _ = search(capsys, copy, paths[0])
    os.remove(os.path.join(copy, MANIFEST))
    code, out, err = search(capsys, copy, paths[0])
    assert code == 1 and out == ""
    one_line_error(err, MANIFEST, "missing", "cbir index repair")
    code, out, err = cbir(capsys, "index", "repair", "--index", copy)
    assert code == 0 and "3 case(s) re-embedded" in out, err
    assert cbir(capsys, "index", "verify", "--index", copy)[0] == 0
    _, answer, _ = search(capsys, copy, paths[0])
    assert [r["case_id"] for r in json.loads(answer)["results"]] == [r["case_id"] for r in json.loads(expected)["results"]]


def test_the_patient_key_lives_outside_the_index_in_the_users_config(tmp_path, monkeypatch):
    from CBIRSlicerLib.index import privacy

    monkeypatch.delenv("CBIR_PATIENT_KEY", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    first = privacy.patient_key("PAT-1")
    path = tmp_path / "config" / "cbirslicer" / "patient-key"
    assert path.is_file() and (path.stat().st_mode & 0o777) == 0o600 and len(path.read_text()) == 64
    assert privacy.patient_key("PAT-1") == first != privacy.patient_key("PAT-2")
    assert privacy.private_metadata({"patient_id": "PAT-1", "modality": "CT"}) == {"modality": "CT", "patient_key": first}


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_verify_names_vectors_that_are_not_finite_or_not_unit_and_add_refuses_them(kind):
    from CBIRSlicerLib.errors import ModelError
    from CBIRSlicerLib.index.faiss_store import VectorStore

    vectors = np.random.default_rng(1).normal(size=(300, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    store = VectorStore.create(16, kind)
    store.add(vectors, np.arange(100, 400))
    assert store.vector_problems() == []
    storage = store._storage()
    storage[5, 3] = np.nan
    storage[7] *= 1.01
    assert store.vector_problems() == ["1 stored vector(s) hold NaN or infinite numbers (first id 105)",
                                       "1 stored vector(s) are not of unit length (first id 107)"]
    for bad in (vectors[:2] * 2, np.full((2, 16), np.nan, np.float32), np.zeros((2, 16), np.float32)):
        with pytest.raises(ModelError):
            store.add(bad, np.array([1, 2]))
