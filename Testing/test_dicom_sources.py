"""DICOM as a source: real series written from the synthetic cohort, Slicer's CTK DICOM database, a real Orthanc over DICOMweb."""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np
import pytest
from dicom_helpers import (
    DEFLATED,
    JPEG2000_LOSSLESS,
    JPEGLS_LOSSLESS,
    RLE_LOSSLESS,
    FaultyProxy,
    OrthancServer,
    write_cohort_series,
    write_ctk_database,
    write_series,
)

from CBIRSlicerLib.errors import InputError, ParameterError
from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.imaging.readers import discover, read_case, read_volume
from CBIRSlicerLib.imaging.roi import RoiBox
from CBIRSlicerLib.index import dicomweb_listing
from CBIRSlicerLib.index.dicom_sources import CtkDatabase, DicomOptions, local_series
from CBIRSlicerLib.index.dicomweb import DicomWebServer
from CBIRSlicerLib.index.dicomweb_auth import PASSWORD_VARIABLE, TOKEN_VARIABLE, USER_VARIABLE
from CBIRSlicerLib.index.dicomweb_listing import SeriesFilter, parse_date_range
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.models.registry import create_embedder
from CBIRSlicerLib.retrieval.queries import roi_query
from CBIRSlicerLib.retrieval.search import Searcher

SHAPE, SPACING = (40, 36, 12), (4.0, 4.0, 8.0)  # small: the tests must stay within ~2 minutes on 2 cores
# Whole axial slices only (12 images a case): what is compared here is where cases come from, not how they are cut.
SETTINGS = IndexSettings(axes=["axial"], stride_mm=8.0, tile_sizes_mm=[], blobs_per_slice=0)


@pytest.fixture(scope="module")
def cohort():
    """The demo cohort's 12 cases on a small grid, plus 3 more for 'index add'."""
    return synthetic.make_cohort(15, seed=0, shape=SHAPE, spacing=SPACING)


@pytest.fixture(scope="module")
def cohort_dicom(cohort, tmp_path_factory):
    """The cohort as DICOM series (one folder per case; the 3 extra cases studied a year later) and as NIfTI files."""
    root = tmp_path_factory.mktemp("cohort")
    series = write_cohort_series(cohort[:12], str(root / "dicom"))
    series += write_cohort_series(cohort[12:], str(root / "dicom"), "20250310", "ABDOMEN")
    nifti = synthetic.write_cohort(cohort, str(root / "nifti"))
    return root, series, nifti


@pytest.fixture(scope="module")
def embedder():
    return create_embedder("handcrafted")


def test_written_series_read_back_with_the_same_geometry_and_voxels(cohort, cohort_dicom):
    root, series, _ = cohort_dicom
    import pydicom

    first = pydicom.dcmread(series[0].files[0])
    # Unsigned integer storage, rescaled to HU on reading: the intercept is at most -1024 and at most the lowest voxel.
    assert first.PixelRepresentation == 0 and float(first.RescaleSlope) == 1
    assert float(first.RescaleIntercept) <= min(-1024, float(cohort[0].volume.array.min()))
    read = read_volume(os.path.dirname(series[0].files[0]))
    source = cohort[0].volume
    np.testing.assert_allclose(read.ijk_to_ras, source.ijk_to_ras, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(read.array, dtype=np.int32), np.asarray(source.array, dtype=np.int32))
    assert read.modality == "CT" and read.body_part is None and read.series_uid == series[0].series_uid
    assert read.extra["study_uid"] == series[0].study_uid and read.extra["study_date"] == "20240105"
    assert read.extra["manufacturer"] == "CBIR Test Scanner" and read.extra["slice_thickness"] == "8"
    assert read.name == "case000"


def test_oblique_series_keeps_its_geometry(tmp_path):
    directions = synthetic.rotation(12.0, -8.0, 20.0)
    case = synthetic.make_case("oblique", 3, ("cyst",), shape=(32, 32, 10), spacing=(3.0, 3.0, 6.0), directions=directions)
    write_series(case.volume, str(tmp_path), "oblique")
    found = discover([str(tmp_path)]).cases
    assert len(found) == 1
    read = read_case(found[0])
    np.testing.assert_allclose(read.ijk_to_ras, case.volume.ijk_to_ras, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(read.array, dtype=np.int32), np.asarray(case.volume.array, dtype=np.int32))


# ----- Slicer's DICOM database (CTK schema) ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ctk_database(cohort_dicom, tmp_path_factory):
    """A CTK-schema database over the cohort's 15 series and one MR series, files listed relative to the database."""
    root, series, _ = cohort_dicom
    mr_case = synthetic.make_case("mr", 5, ("cyst",), shape=(32, 32, 8), spacing=(4.0, 4.0, 8.0))
    mr = write_series(mr_case.volume, str(root / "dicom" / "mr"), "mr-brain", modality="MR", body_part="HEAD", study_date="20240601")
    return write_ctk_database(str(root / "ctkDICOM.sql"), [*series, mr])


def test_ctk_database_lists_series_with_filters_and_is_never_written(ctk_database):
    before = (os.path.getsize(ctk_database), os.path.getmtime(ctk_database))
    database = CtkDatabase("ctkdb:" + ctk_database)
    assert len(database.series()) == 16
    assert [e.modality for e in database.series(SeriesFilter(("MR",)))] == ["MR"]
    ct = database.series(SeriesFilter(("CT",), *parse_date_range("20240101-20241231")))
    assert len(ct) == 12 and {e.study_date for e in ct} == {"20240105"} and {e.instances for e in ct} == {12}
    assert len(database.series(SeriesFilter((), *parse_date_range("20250101-")))) == 3
    assert len(database.series(SeriesFilter(body_part="head"))) == 1
    assert len(database.series(SeriesFilter(body_part="ABDOMEN"))) == 3
    case = database.case_source(ct[0])
    assert len(case.files) == 12 and all(os.path.isabs(f) for f in case.files)
    import sqlite3

    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        database.db.execute("DELETE FROM Series")
    database.close()
    assert (os.path.getsize(ctk_database), os.path.getmtime(ctk_database)) == before
    assert not os.path.exists(ctk_database + "-journal")


def test_not_a_ctk_database_is_named(tmp_path):
    import sqlite3

    path = str(tmp_path / "other.sqlite")
    sqlite3.connect(path).execute("CREATE TABLE Series (x)").connection.commit()
    with pytest.raises(InputError, match="lacks the table"):
        CtkDatabase(path)


def test_ctk_database_indexes_its_series_with_dicom_metadata_and_filters(ctk_database, cohort_dicom, embedder, tmp_path):
    _, series, _ = cohort_dicom
    folder = str(tmp_path / "index")
    options = DicomOptions(SeriesFilter(("CT",), *parse_date_range("20240101-20241231")))
    with Index.create(folder, embedder, SETTINGS) as index:
        report = index.add_sources([ctk_database], embedder, dicom=options)
    assert len(report.added) == 12 and not report.skipped, report.summary()
    index = Index.open(folder)
    cases = index.catalog.cases()
    by_series = {c.series_uid: c for c in cases}
    assert set(by_series) == {s.series_uid for s in series[:12]}
    case = by_series[series[0].series_uid]
    assert case.source == "ctkdb:" + os.path.abspath(ctk_database)
    assert case.name == "case000" and case.modality == "CT" and case.body_part  # the file is silent: inferred
    assert case.metadata["study_uid"] == series[0].study_uid and case.metadata["study_date"] == "20240105"
    assert case.metadata["manufacturer"] == "CBIR Test Scanner" and case.metadata["slice_thickness"] == "8"
    assert case.metadata["body_part_source"] == "inferred" and case.metadata["modality_source"] == "dicom"
    assert "patient_id" not in case.metadata and case.metadata["patient_key"]
    assert len(index.catalog.case_rows_matching({"study_date": "20240105", "manufacturer": "cbir test scanner",
                                                 "slice_thickness": "8", "modality": "CT"})) == 12
    assert index.catalog.case_rows_matching({"study_date": "20250310"}) == []
    assert index.verify() == []
    # A rerun finds nothing new; a wider date range adds exactly the 3 later studies.
    with Index.open(folder, writable=True) as index:
        again = index.add_sources([ctk_database], embedder, dicom=options)
        wider = index.add_sources(["ctkdb:" + ctk_database], embedder, dicom=DicomOptions(SeriesFilter(("CT",))))
    assert (len(again.added), len(again.unchanged)) == (0, 12)
    assert (len(wider.added), len(wider.unchanged)) == (3, 12)
    assert Index.open(folder).catalog.count("cases") == 15
    found = local_series(case.source, case.series_uid)
    assert [os.path.basename(f) for f in found.files] == [f"{k + 1:04d}.dcm" for k in range(12)]


CLI_SLICING = ["--model", "handcrafted", "--stride-mm", "8", "--tiles-mm", "", "--blobs", "0"]


def test_cli_indexes_a_ctk_database_file_with_filters(ctk_database, tmp_path, capsys):
    from CBIRSlicerLib.cli import main

    folder = str(tmp_path / "index")
    dates = ["--study-date", "2024-01-01..2024-12-31"]
    assert main(["index", "build", ctk_database, "--index", folder, *CLI_SLICING, "--modality", "mr", *dates]) == 0
    assert "1 case(s) added" in capsys.readouterr().out
    case = Index.open(folder).catalog.cases()[0]
    assert (case.modality, case.body_part, case.name) == ("MR", "HEAD", "mr-brain")
    assert main(["index", "build", ctk_database, "--index", folder, *CLI_SLICING, "--study-date", "2024-13-01"]) == 1
    assert "--study-date '2024-13-01': expected a date" in capsys.readouterr().err


# ----- a real Orthanc over DICOMweb ---------------------------------------------------------------------------------------
# Orthanc and its DICOMweb plugin are Debian packages (.ci/run installs them): a missing one fails here, it never skips.
@pytest.fixture
def orthanc_factory(tmp_path):
    """Start Orthanc servers (own storage, free port of 127.0.0.1); every one is stopped after the test."""
    started = []

    def start(series=(), users=None):
        server = OrthancServer(str(tmp_path / f"orthanc{len(started)}"), users=users)
        started.append(server)
        server.start().upload(list(series))
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def fetch_count(monkeypatch):
    """How many series were fetched over WADO-RS (every fetch, failed or not)."""
    fetched = []
    original = DicomWebServer.fetch

    def counting(self, entry, *args, **kwargs):
        fetched.append(entry.series_uid)
        return original(self, entry, *args, **kwargs)

    monkeypatch.setattr(DicomWebServer, "fetch", counting)
    return fetched


def _answers(folder: str, cohort, embedder) -> list[list[tuple[str, int, float]]]:
    """Each lesion of the first 12 cases as an ROI query: (case name, best-match slice, score) of every result."""
    searcher = Searcher(Index.open(folder), embedder)
    found = []
    for case in cohort[:12]:
        for lesion in case.lesions:
            roi = RoiBox(lesion.center, (2.5 * lesion.radius_mm,) * 3)
            answer = searcher.search(roi_query(case.volume, roi, "axial", searcher.index), k=12)
            found.append([(r.name, r.best_match.slice_index, r.score) for r in answer.results])
    return found


def test_orthanc_gives_the_same_answers_as_nifti_and_add_fetches_only_new_series(
        cohort, cohort_dicom, embedder, orthanc_factory, fetch_count, tmp_path, capsys, monkeypatch):
    root, series, nifti = cohort_dicom
    server = orthanc_factory(series[:12])
    source = "dicomweb:" + server.dicomweb_url
    from_files, from_pacs = str(tmp_path / "nifti-index"), str(tmp_path / "pacs-index")
    with Index.create(from_files, embedder, SETTINGS) as index:
        assert len(index.add_sources(nifti[:12], embedder).added) == 12
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    with Index.create(from_pacs, embedder, SETTINGS) as index:
        report = index.add_sources([source], embedder)
    assert len(report.added) == 12 and not report.skipped, report.summary()
    assert os.listdir(tmp_path / "tmp") == []  # downloads are removed once embedded
    expected, got = _answers(from_files, cohort, embedder), _answers(from_pacs, cohort, embedder)
    assert len(got) == len(expected) >= 12
    for mine, theirs in zip(got, expected):
        assert [(name, plane) for name, plane, _ in mine] == [(name, plane) for name, plane, _ in theirs]
        np.testing.assert_allclose([s for *_, s in mine], [s for *_, s in theirs], atol=1e-3)
    case = Index.open(from_pacs).catalog.cases()[0]
    assert case.source == source and case.metadata["study_uid"] in {s.study_uid for s in series}
    # Three new series on the server: 'index add' fetches exactly those three.
    server.upload(series[12:])
    fetch_count.clear()
    from CBIRSlicerLib.cli import main

    assert main(["index", "add", source, "--index", from_pacs]) == 0
    assert sorted(fetch_count) == sorted(s.series_uid for s in series[12:])
    assert "3 case(s) added, 0 refreshed, 12 unchanged, 0 skipped" in capsys.readouterr().out
    assert Index.open(from_pacs).catalog.count("cases") == 15
    # QIDO filters: body part, study date range, modality.
    web = DicomWebServer(source)
    assert {e.series_uid for e in web.series(SeriesFilter(body_part="ABDOMEN"))} == {s.series_uid for s in series[12:]}
    assert len(web.series(SeriesFilter(("CT",), *parse_date_range("20250101-20251231")))) == 3
    assert web.series(SeriesFilter(("MR",))) == []
    # Orthanc honours 'offset': paged 4 series at a time, the listing is whole and nothing is noted.
    monkeypatch.setattr(dicomweb_listing, "LISTING_PAGE", 4)
    assert sorted(e.series_uid for e in web.series()) == sorted(s.series_uid for s in series) and web.notes == []


def test_keep_downloads_keeps_each_fetched_series(cohort_dicom, orthanc_factory, tmp_path, capsys):
    from CBIRSlicerLib.cli import main

    _, series, _ = cohort_dicom
    server = orthanc_factory(series[:2])
    kept = tmp_path / "kept"
    assert main(["index", "build", "dicomweb:" + server.dicomweb_url, "--index", str(tmp_path / "index"), *CLI_SLICING,
                 "--keep-downloads", str(kept), "--modality", "CT"]) == 0
    assert sorted(os.listdir(kept)) == sorted(s.series_uid for s in series[:2])
    assert all(len(os.listdir(kept / s.series_uid)) == 12 for s in series[:2])


def test_credentials_come_from_the_environment_or_a_file_and_a_refusal_is_one_line(
        cohort_dicom, embedder, orthanc_factory, tmp_path, monkeypatch, capsys):
    from CBIRSlicerLib.cli import main

    _, series, _ = cohort_dicom
    server = orthanc_factory(series[:1], users={"alice": "s3cret"})
    source = "dicomweb:" + server.dicomweb_url
    for name in (TOKEN_VARIABLE, USER_VARIABLE, PASSWORD_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    folder = str(tmp_path / "index")
    assert main(["index", "build", source, "--index", folder, *CLI_SLICING]) == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "HTTP 401" in error and source in error
    assert not os.path.exists(folder)  # a first build that failed leaves no empty index behind
    monkeypatch.setenv(USER_VARIABLE, "alice")
    monkeypatch.setenv(PASSWORD_VARIABLE, "wrong")
    assert main(["index", "build", source, "--index", folder, *CLI_SLICING]) == 1
    assert "HTTP 401" in capsys.readouterr().err
    monkeypatch.setenv(PASSWORD_VARIABLE, "s3cret")
    assert main(["index", "build", source, "--index", folder, *CLI_SLICING]) == 0
    monkeypatch.delenv(USER_VARIABLE)
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"user": "alice", "password": "s3cret"}))
    assert main(["index", "add", source, "--index", folder, "--auth-file", str(auth)]) == 0
    assert "0 case(s) added, 0 refreshed, 1 unchanged" in capsys.readouterr().out
    with pytest.raises(ParameterError, match="credentials in the URL are refused"):
        DicomWebServer("dicomweb:http://alice:s3cret@127.0.0.1:9/dicom-web")
    auth.write_text("alice:s3cret")
    assert main(["index", "add", source, "--index", folder, "--auth-file", str(auth)]) == 1
    assert f"{auth}: is not JSON" in capsys.readouterr().err


def test_failures_are_one_line_each_the_build_goes_on_and_a_rerun_fetches_only_what_is_missing(
        cohort_dicom, embedder, orthanc_factory, fetch_count, tmp_path, monkeypatch):
    _, series, _ = cohort_dicom
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    os.makedirs(tmp_path / "tmp")
    server = orthanc_factory(series[:5])
    proxy = FaultyProxy(server.url, delay=3.0)
    try:
        source = f"dicomweb:{proxy.url}/dicom-web"
        uids = sorted(s.series_uid for s in series[:5])
        by_uid = {s.series_uid: s for s in series[:5]}
        # Listed in UID order: the 1st is deleted once listing is done, the 2nd gets HTTP 500, the 3rd is cut midway,
        # the 4th answers after the timeout; the 5th comes whole.
        proxy.faults = {uids[1]: "http-500", uids[2]: "cut", uids[3]: "slow"}

        def progress(done, total, label):
            if done == 0:
                server.delete_study(by_uid[uids[0]].study_uid)

        folder = str(tmp_path / "index")
        with Index.create(folder, embedder, SETTINGS) as index:
            report = index.add_sources([source], embedder, progress=progress, dicom=DicomOptions(timeout=1.0))
        problems = dict(report.skipped)
        assert len(report.added) == 1 and len(problems) == 4, report.summary()
        for uid in uids[:4]:
            line = next(text for label, text in problems.items() if uid in label)
            assert "\n" not in line and line.startswith("fetch failed")  # the label before it names the source and series
        reason = {uid: next(text for label, text in problems.items() if uid in label) for uid in uids[:4]}
        assert "HTTP 404" in reason[uids[0]]
        assert "HTTP 500" in reason[uids[1]]
        assert "the transfer was cut off midway" in reason[uids[2]]
        assert "no answer within 1 s (timeout)" in reason[uids[3]]
        # The faults are over: a rerun fetches only the three that failed (the deleted study is no longer listed).
        assert os.listdir(tmp_path / "tmp") == []  # nothing half-fetched is left behind
        proxy.faults = {}
        fetch_count.clear()
        with Index.open(folder, writable=True) as index:
            again = index.add_sources([source], embedder)
        assert sorted(fetch_count) == sorted(uids[1:4]) and len(again.added) == 3 and len(again.unchanged) == 1
        index = Index.open(folder)
        found = [c.series_uid for c in index.catalog.cases()]
        assert sorted(found) == sorted(uids[1:]) and index.verify() == []
    finally:
        proxy.close()


def test_killing_the_server_midway_then_rerunning_completes_the_index(cohort_dicom, embedder, orthanc_factory, fetch_count, tmp_path,
                                                                     capsys):
    _, series, _ = cohort_dicom
    server = orthanc_factory(series[:4])
    source = "dicomweb:" + server.dicomweb_url

    def progress(done, total, label):
        if done == 2:
            server.kill()

    folder = str(tmp_path / "index")
    with Index.create(folder, embedder, SETTINGS) as index:
        report = index.add_sources([source], embedder, progress=progress)
    assert len(report.added) == 2 and len(report.skipped) == 2
    assert all(text.endswith("server unreachable (connection refused: is it running?)") for _, text in report.skipped)
    from CBIRSlicerLib.cli import main

    capsys.readouterr()
    assert main(["index", "add", source, "--index", folder]) == 1  # still down: listing fails, in one line, nothing lost
    assert capsys.readouterr().err == (f"cbir: error: {source}: listing series failed: server unreachable (connection refused: "
                                       "is it running?)\n")
    assert Index.open(folder).catalog.count("cases") == 2
    server.start()
    fetch_count.clear()
    with Index.open(folder, writable=True) as index:
        again = index.add_sources([source], embedder)
    assert len(fetch_count) == 2 and len(again.added) == 2 and len(again.unchanged) == 2
    index = Index.open(folder)
    found = [c.series_uid for c in index.catalog.cases()]
    assert sorted(found) == sorted(s.series_uid for s in series[:4]) and index.verify() == []


# ----- any transfer syntax -----------------------------------------------------------------------------------------------
SYNTAXES = {"jpeg2000": JPEG2000_LOSSLESS, "jpeg-ls": JPEGLS_LOSSLESS, "rle": RLE_LOSSLESS, "deflated": DEFLATED}


@pytest.fixture(scope="module")
def compressed_series(cohort, tmp_path_factory):
    """Four cases of the cohort, each stored losslessly in another transfer syntax (its own patient, study and series)."""
    root = tmp_path_factory.mktemp("compressed")
    return {name: (cohort[n].volume, write_series(cohort[n].volume, str(root / name), f"{name}-{cohort[n].name}",
                                                  patient_id=f"TS-{name}", transfer_syntax=uid))
            for n, (name, uid) in enumerate(SYNTAXES.items())}


def _same_volume(read, volume):
    np.testing.assert_allclose(read.ijk_to_ras, volume.ijk_to_ras, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(read.array, dtype=np.int32), np.asarray(volume.array, dtype=np.int32))


def test_series_in_any_transfer_syntax_index_from_files_and_from_orthanc_as_stored(compressed_series, embedder, orthanc_factory,
                                                                                   tmp_path):
    import pydicom
    import requests
    from dicomweb_client.api import DICOMwebClient

    for name, (volume, info) in compressed_series.items():
        assert pydicom.dcmread(info.files[0]).file_meta.TransferSyntaxUID == SYNTAXES[name]
        _same_volume(read_volume(os.path.dirname(info.files[0])), volume)  # GDCM decodes every one of them
    server = orthanc_factory([info for _, info in compressed_series.values()])
    j2k = compressed_series["jpeg2000"][1]
    # What went wrong before: asked to transcode (the client's default), Orthanc cannot for JPEG 2000.
    with pytest.raises(requests.HTTPError, match="500"):
        list(DICOMwebClient(server.dicomweb_url).iter_series(j2k.study_uid, j2k.series_uid))
    source = "dicomweb:" + server.dicomweb_url
    with Index.create(str(tmp_path / "index"), embedder, SETTINGS) as index:
        report = index.add_sources([source], embedder)
    assert len(report.added) == 4 and not report.skipped, report.summary()
    cases = {c.series_uid: c for c in Index.open(str(tmp_path / "index")).catalog.cases()}
    for name, (volume, info) in compressed_series.items():
        assert cases[info.series_uid].shape == list(volume.shape_ijk)
        found = local_series(source, info.series_uid, info.study_uid, cache=str(tmp_path / "cache"))
        assert len(found.files) == len(info.files)
        # Fetched as stored (no transcoding on the way) and decoded here to the very voxels written.
        assert {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID) for f in found.files} == {SYNTAXES[name]}
        _same_volume(read_case(found), volume)


# ----- opening results (slicer-core's real MRML) -------------------------------------------------------------------------
def test_results_from_the_database_and_from_orthanc_open_at_their_matching_slice(
        cohort, cohort_dicom, ctk_database, embedder, orthanc_factory, fetch_count, tmp_path):
    slicer = pytest.importorskip("slicer")
    from conftest import headless_slicer

    from CBIRSlicerLib.errors import JobCancelled
    from CBIRSlicerLib.scene import layout as views
    from CBIRSlicerLib.scene.nodes import matrix_to_numpy, numpy_to_matrix, volume_from_node
    from CBIRSlicerLib.scene.result_volumes import read_series_node, result_volume_node

    _, series, _ = cohort_dicom
    server = orthanc_factory(series[12:])
    app = headless_slicer(layout=True)
    scene, cache = app.scene, str(tmp_path / "cache")
    by_name = {case.name: case.volume for case in cohort}
    only_abdomen = DicomOptions(SeriesFilter(body_part="ABDOMEN"))  # the three later studies, in both sources
    for n, source in enumerate([ctk_database, "dicomweb:" + server.dicomweb_url]):
        folder = str(tmp_path / f"index{n}")
        with Index.create(folder, embedder, SETTINGS) as index:
            assert len(index.add_sources([source], embedder, dicom=only_abdomen).added) == 3
        searcher = Searcher(Index.open(folder), embedder)
        lesion = cohort[12].lesions[0]
        answer = searcher.search(roi_query(cohort[12].volume, RoiBox(lesion.center, (2.5 * lesion.radius_mm,) * 3), "axial",
                                           searcher.index), k=2)
        result = answer.results[0]
        assert result.series_uid and result.study_uid and result.source.startswith(("ctkdb:", "dicomweb:"))
        progress, fetched_before = [], len(fetch_count)

        def locate(case, stop=lambda: False, seen=progress):
            return local_series(case.source, case.series_uid, case.study_uid, cache=cache,
                                progress=lambda done, total: seen.append((done, total)), should_stop=stop)

        def load(path, name):
            raise AssertionError("a DICOM database's or PACS's case is never loaded by path")

        if n == 1:  # the PACS: a cancelled first open leaves nothing behind, then it is fetched once into the cache
            with pytest.raises(JobCancelled):
                result_volume_node(scene, result, load, lambda case: locate(case, lambda: True), lambda s, name: None)
            assert not os.path.exists(os.path.join(cache, result.series_uid))
        node = result_volume_node(scene, result, load, locate, lambda found, name: read_series_node(scene, found, name))
        assert result_volume_node(scene, result, load, locate, None).GetID() == node.GetID()  # reused, not loaded again
        if n == 1:
            assert len(fetch_count) == fetched_before + 2 and progress[-1] == (12, 12)
            assert os.path.isfile(os.path.join(cache, result.series_uid, ".complete"))
            scene.RemoveNode(node)
            again = result_volume_node(scene, result, load, locate, lambda found, name: read_series_node(scene, found, name))
            assert len(fetch_count) == fetched_before + 2 and again is not None  # from the cache, not the server
            node = again
        # The node is the case as indexed, and its best-match plane is the indexed plane of that case's voxels.
        case = Index.open(folder).catalog.case_by_id(result.case_id)
        ras_to_ijk = numpy_to_matrix(np.eye(4))
        node.GetRASToIJKMatrix(ras_to_ijk)
        k = matrix_to_numpy(ras_to_ijk) @ np.r_[result.best_match.ras, 1.0]
        assert abs(k[2] - result.best_match.slice_index) < 1e-4
        np.testing.assert_allclose(matrix_to_numpy(ras_to_ijk), np.linalg.inv(np.array(case.ijk_to_ras)), atol=1e-4)
        shown = volume_from_node(node).array[result.best_match.slice_index]
        indexed = by_name[result.name].array[result.best_match.slice_index]
        np.testing.assert_array_equal(np.asarray(shown, np.int32), np.asarray(indexed, np.int32))
        views.show_side_by_side(scene, app.layout_node, None, views.result_target(result.best_match, node))
        assert views.slice_node(scene, views.RESULT_VIEW).GetSliceOffset() == pytest.approx(result.best_match.ras[2])
        assert views.composite_node(scene, views.RESULT_VIEW).GetBackgroundVolumeID() == node.GetID()
    assert slicer is not None
