"""DICOM as a source: real series written from the synthetic cohort, Slicer's CTK DICOM database, a real Orthanc over DICOMweb."""

from __future__ import annotations

import os

import numpy as np
import pytest
from dicom_helpers import write_cohort_series, write_series

from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.imaging.readers import discover, read_case, read_volume

SHAPE, SPACING = (40, 36, 12), (4.0, 4.0, 8.0)  # small: the tests must stay within ~2 minutes on 2 cores


@pytest.fixture(scope="module")
def cohort():
    """The demo cohort's 12 cases on a small grid, plus 3 more for 'index add'."""
    return synthetic.make_cohort(15, seed=0, shape=SHAPE, spacing=SPACING)


@pytest.fixture(scope="module")
def cohort_dicom(cohort, tmp_path_factory):
    """The cohort as DICOM series (one folder per case) and as NIfTI files."""
    root = tmp_path_factory.mktemp("cohort")
    series = write_cohort_series(cohort, str(root / "dicom"))
    nifti = synthetic.write_cohort(cohort, str(root / "nifti"))
    return root, series, nifti


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
