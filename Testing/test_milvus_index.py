"""A Milvus-backed index (milvus-lite, embedded in the test process) answers as the index folder on the same cases.

The same cohort is built twice through the CLI, into a folder and into a milvus-lite file, both exact (flat); every
query's JSON answer must be the folder's within the tolerances of the recorded CLI answers
(``test_cli_answers.differences``: ids, ranks, votes and strings exact, scores within 5e-4). Real head-and-neck CT is
built into HNSW on the server: its top-10 cases must hold >= 95 % of the exact folder's. Also: filters run inside the
server's search, labels written to the server filter at once, ``verify`` checks against the server, a killed writer's
pending case is purged, locations and credentials, and a server that is not there is one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli_answers import differences

from CBIRSlicerLib.cli import main
from CBIRSlicerLib.errors import InputError, ParameterError
from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.index import milvus_connection
from CBIRSlicerLib.index.location import index_exists, is_server_location, open_index

pytest.importorskip("pymilvus")  # the test extra installs it (pyproject.toml); without it the folder is all there is

# Small cases and a coarse cut (about 600 items a case): milvus-lite is pure Python, its cost grows with the rows it returns.
SLICING = ["--model", "handcrafted", "--axes", "axial", "--stride-mm", "12", "--blobs", "3", "--blob-sizes-mm", "24", "--tiles-mm", "48"]
SMALL = {"shape": (64, 64, 32), "spacing": (3.0, 3.0, 5.0)}


def cbir(*argv: str) -> tuple[int, str, str]:
    """Run the CLI in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def answer(index: str, *query: str) -> dict:
    code, out, err = cbir("search", "--index", index, "-k", "3", "--json", "--no-place", *query)
    assert code == 0, err
    return json.loads(out)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A 4-case synthetic cohort with labels, indexed into a folder and into a milvus-lite file."""
    work = tmp_path_factory.mktemp("milvus")
    cohort = synthetic.make_cohort(4, seed=3, **SMALL)
    paths = synthetic.write_cohort(cohort, str(work / "cohort"))
    truth = synthetic.read_cohort(str(work / "cohort" / synthetic.COHORT_CSV))
    labels = work / "labels.csv"
    with open(labels, "w") as handle:
        handle.write("path,label\n")
        for path in paths:
            kinds = sorted({lesion.kind for lesion in truth[os.path.basename(path).split(".")[0]]})
            handle.writelines(f"{path},{kind}\n" for kind in kinds)
    folder, lite = str(work / "folder"), str(work / "cases.db")
    for index in (folder, f"milvus://{lite}"):  # both exact (flat): the answers must then be the same, votes included
        code, out, err = cbir("index", "build", str(work / "cohort"), "--index", index, *SLICING, "--labels", str(labels),
                              "--index-type", "flat")
        assert code == 0, err
    return {"work": work, "paths": paths, "truth": truth, "folder": folder, "lite": lite, "uri": f"milvus://{lite}"}


def _queries(built) -> list[list[str]]:
    by_name = {os.path.basename(p).split(".")[0]: p for p in built["paths"]}
    queries = []
    for name, lesions in sorted(built["truth"].items()):
        lesion = lesions[0]
        side = 5 * lesion.radius_mm
        queries.append(["--volume", by_name[name], "--roi-ras=" + ",".join(f"{v:.3f}" for v in (*lesion.center, side, side, side))])
    return queries[:2] + [["--volume", built["paths"][0]], ["--like", "7"]]


def test_a_milvus_index_answers_every_query_as_the_folder(built):
    for query in _queries(built):
        folder, milvus = answer(built["folder"], *query), answer(built["uri"], *query)
        assert folder["results"], query
        found = differences(milvus, folder)
        assert not found, (query, found[:5])


def test_filters_run_inside_the_server_search_as_the_folders_catalog_filters(built):
    volume = built["paths"][0]
    kinds = sorted({lesion.kind for lesions in built["truth"].values() for lesion in lesions})
    for filters in (["--filter", "modality=ct"], ["--filter", f"label={kinds[0]}"], ["--filter", f"label={kinds[-1].upper()}"],
                    ["--filter", "modality=CT", "--filter", f"label={kinds[0]}"]):
        folder, milvus = answer(built["folder"], "--volume", volume, *filters), answer(built["uri"], "--volume", volume, *filters)
        assert not differences(milvus, folder), filters
    names = {os.path.basename(p).split(".")[0]: {lesion.kind for lesion in built["truth"][os.path.basename(p).split(".")[0]]}
             for p in built["paths"]}
    own = os.path.basename(volume).split(".")[0]
    kind = next(k for k in kinds if any(k in held for name, held in names.items() if name != own))
    got = answer(built["uri"], "--volume", volume, "--filter", f"label={kind}", "-k", "10")
    assert got["results"] and {r["name"] for r in got["results"]} == {n for n, held in names.items() if kind in held} - {own}
    code, _, err = cbir("search", "--index", built["uri"], "--volume", volume, "--filter", "nosuchfield=1", "--no-place")
    assert code == 1 and "filter field 'nosuchfield'" in err and len(err.strip().splitlines()) == 1


def test_info_verify_and_the_pinned_model_and_transform_are_the_folders(built):
    folder, milvus = open_index(built["folder"]), open_index(built["uri"])
    try:
        assert milvus.info()["counts"] == folder.info()["counts"]
        assert milvus.manifest["model"]["digest"] == folder.manifest["model"]["digest"]
        pinned_f, pinned_m = folder.manifest["transform"], milvus.manifest["transform"]
        assert pinned_m["kind"] == pinned_f["kind"] == "whiten" and pinned_m["checksum"] == pinned_f["checksum"]
        assert np.allclose(milvus.transform.matrix, folder.transform.matrix, atol=1e-6)
        assert milvus.verify(check_sources=True) == []
        case = folder.catalog.cases()[1]
        assert np.allclose(milvus.store.vectors_of(folder.catalog.item_ids([case.row])),
                           folder.store.vectors_of(folder.catalog.item_ids([case.row])), atol=1e-6)
        assert np.array_equal(milvus.catalog.thumbnail(case.row, "axial", 5), folder.catalog.thumbnail(case.row, "axial", 5))
    finally:
        folder.close()
        milvus.close()
    code, out, _ = cbir("index", "verify", "--index", built["uri"])
    assert code == 0 and "index is consistent" in out


def test_a_label_given_later_filters_at_once_and_a_killed_writers_case_is_purged(built):
    case_id = open_index(built["folder"]).catalog.cases()[2].case_id
    code, _, err = cbir("label", case_id, "diagnosis=Adenoma", "--index", built["uri"])
    assert code == 0, err
    got = answer(built["uri"], "--volume", built["paths"][0], "--filter", "diagnosis=adenoma", "-k", "10")
    assert [r["case_id"] for r in got["results"]] == [case_id]
    # A writer that dies after writing a case's items and before its checkpoint: readers never see that case, and the
    # next writer removes it; the counts stay what they were.
    index = open_index(built["uri"], writable=True)
    before = index._counts()
    record = index.catalog.cases()[0]
    items = index.catalog.items_of_cases([record.row])[record.row]
    vectors = index.store.vectors_of(np.array([i.id for i in items]))
    record.case_id, record.row = "c-killed", None
    row = index._store_case(record, items, vectors, None)
    reader_hits = open_index(built["uri"]).store.search(vectors[:3], 5)[1]  # (a second client of the same file)
    assert not np.isin(reader_hits, index.catalog.item_ids([row])).any()
    index._abandon()  # killed: no checkpoint, no seal
    again = open_index(built["uri"])
    assert again.interrupted and again.catalog.case_by_id("c-killed").status == "pending"
    again.close()
    with open_index(built["uri"], writable=True) as writer:
        assert writer.catalog.case_by_id("c-killed") is None and writer._counts() == before
    reopened = open_index(built["uri"])
    assert not reopened.interrupted and reopened.verify(check_sources=False) == []
    reopened.close()


def test_locations_and_credentials(tmp_path, monkeypatch):
    place = milvus_connection.parse_location("milvus://pacs.example.org/dept_ct")
    assert (place.uri, place.collection, place.display) == ("http://pacs.example.org:19530", "dept_ct", "milvus://pacs.example.org:19530/dept_ct")
    assert milvus_connection.parse_location("milvus+https://h:443/c").uri == "https://h:443"
    # The module's index field is a pathlib.Path, which folds '//': the location still means the same.
    assert milvus_connection.parse_location(str(Path("milvus://pacs.example.org/dept_ct"))) == place
    assert milvus_connection.parse_location(str(Path(f"milvus://{tmp_path}/x.db"))).local_path == str(tmp_path / "x.db")
    local = milvus_connection.parse_location(f"milvus://{tmp_path}/x.db?collection=ct")
    assert (local.local_path, local.collection) == (str(tmp_path / "x.db"), "ct")
    assert is_server_location(str(tmp_path / "x.db")) and not is_server_location(str(tmp_path / "folder"))
    with pytest.raises(ParameterError, match="credentials in the location are refused"):
        milvus_connection.parse_location("milvus://admin:secret@h:19530/c")
    with pytest.raises(ParameterError, match="collection name"):
        milvus_connection.parse_location("milvus://h:19530/bad-name")
    monkeypatch.setenv("CBIR_MILVUS_TOKEN", "tok")
    assert milvus_connection.credentials() == {"token": "tok"}
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"user": "reader", "password": "pw"}))
    monkeypatch.setenv("CBIR_MILVUS_AUTH_FILE", str(auth))
    assert milvus_connection.credentials() == {"user": "reader", "password": "pw"}
    auth.write_text("{}")
    with pytest.raises(InputError, match="neither"):
        milvus_connection.credentials()
    auth.write_text("[" * 100_000 + "]" * 100_000)  # nested too deep for the JSON parser: one line, as for a PACS
    with pytest.raises(InputError, match="is not JSON"):
        milvus_connection.credentials()
    auth.write_text(json.dumps({"token": {"secret": "s3cr3t"}}))
    with pytest.raises(InputError, match='"token" must be a string') as refused:
        milvus_connection.credentials()
    assert "s3cr3t" not in str(refused.value)
    assert not index_exists(str(tmp_path / "none.db"))


def test_a_server_that_is_not_there_is_one_line_without_the_secret(monkeypatch, tmp_path):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("CBIR_MILVUS_RETRY_SECONDS", "1")
    monkeypatch.setenv("CBIR_MILVUS_TOKEN", "s3cret-token")
    code, out, err = cbir("search", "--index", f"milvus://127.0.0.1:{port}/cases", "--text", "a lesion")
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"milvus://127.0.0.1:{port}/cases: the Milvus server does not answer" in lines[0], err
    assert "s3cret" not in err and "Traceback" not in err


def test_a_milvus_lite_file_open_in_another_process_is_one_clear_line(built, tmp_path):
    import subprocess
    import sys

    shutil.copytree(built["lite"], tmp_path / "copy.db")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pymilvus import MilvusClient; "
                               f"MilvusClient({str(tmp_path / 'copy.db')!r}); print('open', flush=True); sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        code, _, err = cbir("index", "info", "--index", str(tmp_path / "copy.db"))
        assert code == 1 and "open in another process" in err and "milvus-lite server --data-dir" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_a_real_volume_set_answers_as_the_folder(tmp_path):
    """Head-and-neck CT of three real patients, organ boxes of one queried against all: HNSW on the server against the
    folder's exact search, case recall@10 and the common cases' scores."""
    import SimpleITK as sitk

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    import real_data

    try:
        real = str(real_data.shared_data_dir() / "real" / "head-neck-ct")
    except real_data.RealDataError as error:
        pytest.skip(f"shared data not available: {error}")
    patients = ["train_pt_1", "train_pt_2", "train_pt_3"]
    cases = tmp_path / "cases"
    cases.mkdir()
    for patient in patients:
        os.symlink(os.path.join(real, f"{patient}_ct.nii.gz"), cases / f"{patient}_ct.nii.gz")
    slicing = ["--model", "handcrafted", "--stride-mm", "15", "--blobs", "4", "--tiles-mm", "64", "--blob-sizes-mm", "24"]
    folder, uri = str(tmp_path / "folder"), f"milvus://{tmp_path / 'real.db'}"
    for index, kind in ((folder, "flat"), (uri, "hnsw")):
        code, _, err = cbir("index", "build", str(cases), "--index", index, *slicing, "--index-type", kind)
        assert code == 0, err
    labels = sitk.ReadImage(os.path.join(real, f"{patients[0]}_labels.nii.gz"))
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(labels)
    query = str(cases / f"{patients[0]}_ct.nii.gz")
    recalls = []
    for label in stats.GetLabels()[:3]:
        x0, y0, z0, sx, sy, sz = stats.GetBoundingBox(label)
        corners = [labels.TransformIndexToPhysicalPoint((x, y, z)) for x, y, z in ((x0, y0, z0), (x0 + sx, y0 + sy, z0 + sz))]
        centre = [(a + b) / 2 for a, b in zip(*corners)]
        lps_to_ras = (-1, -1, 1)
        roi = [c * f for c, f in zip(centre, lps_to_ras)] + [max(abs(a - b), 20.0) for a, b in zip(*corners)]
        argv = ["--volume", query, "--roi-ras=" + ",".join(f"{v:.2f}" for v in roi)]
        exact, approximate = answer(folder, *argv, "-k", "10"), answer(uri, *argv, "-k", "10")
        wanted = [r["case_id"] for r in exact["results"]]
        found = [r["case_id"] for r in approximate["results"]]
        recalls.append(len(set(found) & set(wanted)) / len(wanted))
        scores = {r["case_id"]: r["score"] for r in approximate["results"]}
        assert all(abs(scores[r["case_id"]] - r["score"]) <= 5e-4 for r in exact["results"] if r["case_id"] in scores)
    assert len(recalls) == 3 and np.mean(recalls) >= 0.95, recalls
