"""DICOM as a source: real series written from the synthetic cohort, Slicer's CTK DICOM database, a real Orthanc over DICOMweb."""

from __future__ import annotations

import os

import numpy as np
import pytest
from dicom_helpers import write_cohort_series, write_ctk_database, write_series

from CBIRSlicerLib.errors import InputError
from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.imaging.readers import discover, read_case, read_volume
from CBIRSlicerLib.index.dicom_sources import CtkDatabase, DicomOptions, local_series
from CBIRSlicerLib.index.dicomweb import SeriesFilter, parse_date_range
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.models.registry import create_embedder

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
    series = write_cohort_series(cohort[:12], str(root / "dicom")) + write_cohort_series(cohort[12:], str(root / "dicom"), "20250310")
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
    assert read.modality == "CT" and read.body_part == "ABDOMEN" and read.series_uid == series[0].series_uid
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
    assert case.name == "case000" and case.modality == "CT" and case.body_part == "ABDOMEN"
    assert case.metadata["study_uid"] == series[0].study_uid and case.metadata["study_date"] == "20240105"
    assert case.metadata["manufacturer"] == "CBIR Test Scanner" and case.metadata["slice_thickness"] == "8"
    assert case.metadata["body_part_source"] == "dicom" and "patient_id" not in case.metadata
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
