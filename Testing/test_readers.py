"""readers.py: every supported format, every bad input (with the right error and the path named), DICOM series checks.

Volumes are small synthetic phantoms (24x20x12) with anisotropic spacing and, where it matters, an oblique
orientation, so a wrong axis order, a dropped flip or a lost spacing changes numbers the tests compare.
"""

from __future__ import annotations

import os
import shutil
import struct

import numpy as np
import pytest
import SimpleITK as sitk
from volume_helpers import is_dicom_series, read_volumes, reorient

from CBIRSlicerLib.errors import (
    CBIRError,
    DicomSeriesError,
    DimensionError,
    EmptySourceError,
    InputError,
    UnreadableFileError,
    UnsupportedFormatError,
)
from CBIRSlicerLib.imaging import readers, synthetic
from CBIRSlicerLib.imaging.readers import CaseSource, discover, read_case, read_volume, read_volume_file

SHAPE = (24, 20, 12)  # i, j, k
SPACING = (0.8, 0.9, 2.5)
# A right-handed oblique orientation: rotated about all three axes, with i and j reversed.
OBLIQUE = synthetic.rotation(20.0, -10.0, 30.0) @ np.diag([1.0, -1.0, -1.0])
STUDY_UID = "1.2.826.0.1.3680043.2.1125.7.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def phantom(directions=None, shape=SHAPE, spacing=SPACING, center=(3.0, -2.0, 5.0)):
    """An int16 CT-like phantom on a grid centred on ``center``."""
    return synthetic.render(synthetic.centered_matrix(shape, spacing, directions, center), shape)


def raises(error_type, path, call, *args, **kwargs):
    """Call, assert it raises exactly ``error_type`` whose message names ``path``; return the exception."""
    with pytest.raises(CBIRError) as info:
        result = call(*args, **kwargs)
        if hasattr(result, "__next__"):
            list(result)
    error = info.value
    assert type(error) is error_type, f"{type(error).__name__}: {error}"
    assert str(path) in str(error), str(error)
    assert error.path == str(path)
    return error


def write_dicom_series(volume, folder, series_uid, modality="CT", body_part="CHEST", prefix="slice", description=None):
    """One DICOM file per k slice of ``volume`` with explicit geometry tags (SimpleITK's DicomSeriesFromArray pattern)."""
    os.makedirs(folder, exist_ok=True)
    image = volume.to_sitk()
    direction = np.array(image.GetDirection()).reshape(3, 3)
    orientation = "\\".join(f"{v:.8f}" for v in (*direction[:, 0], *direction[:, 1]))
    spacing = image.GetSpacing()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    paths = []
    for k in range(image.GetDepth()):
        slice_image = image[:, :, k]
        position = image.TransformIndexToPhysicalPoint((0, 0, k))
        tags = {
            "0008|0060": modality,
            "0020|000e": series_uid,
            "0020|000d": STUDY_UID,
            "0020|0032": "\\".join(f"{p:.8f}" for p in position),
            "0020|0037": orientation,
            "0020|0013": str(k + 1),
            "0018|0015": body_part,
            "0008|0016": CT_IMAGE_STORAGE,
            "0008|0018": f"{series_uid}.{k + 1}",
            "0028|0030": f"{spacing[1]:.8f}\\{spacing[0]:.8f}",
            "0018|0050": f"{spacing[2]:.8f}",
        }
        if description:
            tags["0008|103e"] = description
        for tag, value in tags.items():
            slice_image.SetMetaData(tag, value)
        path = os.path.join(str(folder), f"{prefix}{k:03d}.dcm")
        writer.SetFileName(path)
        writer.Execute(slice_image)
        paths.append(path)
    return paths


def assert_same_volume(read, source, tolerance=1e-3):
    np.testing.assert_allclose(read.ijk_to_ras, source.ijk_to_ras, atol=tolerance)
    assert read.array.shape == source.array.shape
    np.testing.assert_array_equal(read.array, source.array)


# ---------------------------------------------------------------------------------------------------------------
# Plain volume files


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".nhdr"])
def test_volume_file_round_trip_keeps_voxels_and_oblique_geometry(tmp_path, suffix):
    source = phantom(OBLIQUE)
    path = synthetic.write_volume(source, str(tmp_path / f"case1{suffix}"))
    volume = read_volume_file(path)
    # NIfTI stores the matrix as float32: 1e-4 mm is far below any real error (a flip moves voxels by mm).
    assert_same_volume(volume, source, tolerance=1e-4)
    assert volume.array.dtype == np.int16
    np.testing.assert_allclose(volume.spacing, SPACING, atol=1e-5)
    assert volume.name == "case1"
    assert volume.source == path
    assert volume.modality is None and volume.series_uid is None
    # The same file through the other entry points.
    assert_same_volume(read_volume(path), source, tolerance=1e-4)
    [again] = list(read_volumes(path))
    assert_same_volume(again, source, tolerance=1e-4)


def test_name_and_source_metadata(tmp_path):
    path = synthetic.write_volume(phantom(), str(tmp_path / "case1.nii.gz"))
    volume = read_volume(tmp_path / "case1.nii.gz")  # a Path works too
    assert volume.name == "case1"
    assert volume.source == path
    dotted = synthetic.write_volume(phantom(), str(tmp_path / "patient.v2.nrrd"))
    assert read_volume_file(dotted).name == "patient.v2"


def test_volume_suffix_and_case_name():
    assert readers.volume_suffix("/a/B.NII.GZ") == ".nii.gz"
    assert readers.volume_suffix("x.nii") == ".nii"
    assert readers.volume_suffix("x.nhdr") == ".nhdr"
    assert readers.volume_suffix("x.gz") is None
    assert readers.volume_suffix("x.dcm") is None
    assert readers._case_name("/data/case1.nii.gz") == "case1"
    assert readers._case_name("/data/series_folder/") == "series_folder"


def test_folder_with_one_volume_file_reads_it(tmp_path):
    source = phantom()
    synthetic.write_volume(source, str(tmp_path / "only.mha"))
    (tmp_path / "README.md").write_text("notes")
    volume = read_volume(tmp_path)
    assert_same_volume(volume, source)
    assert volume.name == "only"


def test_folder_with_two_volume_files_is_ambiguous(tmp_path):
    synthetic.write_volume(phantom(), str(tmp_path / "a.nii.gz"))
    synthetic.write_volume(phantom(), str(tmp_path / "b.nrrd"))
    error = raises(InputError, tmp_path, read_volume, tmp_path)
    assert "2 volumes" in str(error) and "a.nii.gz" in str(error) and "b.nrrd" in str(error)
    assert [v.name for v in read_volumes(tmp_path)] == ["a", "b"]


# ---------------------------------------------------------------------------------------------------------------
# 1. Unsupported formats


@pytest.mark.parametrize("name, content", [("notes.txt", b"not an image"), ("picture.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64)])
def test_unsupported_format(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    for call in (read_volume_file, read_volume, read_volumes):
        error = raises(UnsupportedFormatError, path, call, path)
        assert "unsupported format" in str(error)


def test_folder_given_to_read_volume_file(tmp_path):
    error = raises(InputError, tmp_path, read_volume_file, tmp_path)
    assert "is a folder" in str(error)


# ---------------------------------------------------------------------------------------------------------------
# 2. Corrupt, truncated, empty and missing files


def test_garbage_nifti_is_unreadable(tmp_path):
    path = tmp_path / "garbage.nii.gz"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes())
    error = raises(UnreadableFileError, path, read_volume_file, path)
    assert "Exception thrown in SimpleITK" not in str(error)  # the ITK noise is trimmed to the reason
    assert "Unable to determine ImageIO reader" in str(error)
    raises(UnreadableFileError, path, read_volume, path)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_truncated_pixel_data_is_unreadable(tmp_path, suffix):
    path = str(tmp_path / f"cut{suffix}")
    synthetic.write_volume(phantom(), path, compress=False)
    data = open(path, "rb").read()
    full_bytes = int(np.prod(SHAPE)) * 2
    assert len(data) > full_bytes  # header + raw int16 voxels
    with open(path, "wb") as handle:
        handle.write(data[: len(data) - full_bytes // 3])
    # The header is intact: SimpleITK still reads the image information...
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    assert reader.GetSize() == SHAPE
    # ...but the voxels are cut short.
    error = raises(UnreadableFileError, path, read_volume_file, path)
    assert "pixel data cannot be read" in str(error)
    if suffix == ".nrrd":
        assert f"not {int(np.prod(SHAPE))}" in str(error)  # Teem's own count of the voxels it expected


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_is_unreadable(tmp_path, suffix):
    """ITK pads a truncated NIfTI with zeros without complaint; readers.py must catch it."""
    path = str(tmp_path / f"cut{suffix}")
    synthetic.write_volume(phantom(), path)
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) - len(data) // 3] if suffix == ".nii" else data[: len(data) // 2])
    assert sitk.ReadImage(path).GetSize() == SHAPE  # the silent padding this guards against
    error = raises(UnreadableFileError, path, read_volume_file, path)
    assert "truncated" in str(error)
    if suffix == ".nii":
        expected = 352 + int(np.prod(SHAPE)) * 2  # header + extension flag, then int16 voxels
        assert f"promises {expected}" in str(error)


def test_nifti_with_damaged_compressed_stream_is_unreadable(tmp_path):
    path = str(tmp_path / "flipped_bits.nii.gz")
    synthetic.write_volume(phantom(), path)
    data = bytearray(open(path, "rb").read())
    data[-6] ^= 0xFF  # inside the gzip CRC-32 trailer: every voxel decompresses, the checksum fails
    open(path, "wb").write(bytes(data))
    raises(UnreadableFileError, path, read_volume_file, path)


def test_uncompressed_nifti_named_nii_gz_still_reads(tmp_path):
    """ITK reads a plain NIfTI misnamed .nii.gz; the truncation check goes by the gzip magic, not the name."""
    source = phantom()
    path = tmp_path / "plain_named.nii.gz"
    shutil.copyfile(synthetic.write_volume(source, str(tmp_path / "source.nii")), path)
    assert open(path, "rb").read(2) != b"\x1f\x8b"
    assert_same_volume(read_volume_file(path), source, tolerance=1e-4)


@pytest.mark.parametrize("order", ["<", ">"])
def test_nifti2_header_length_check(tmp_path, order):
    """The length check also parses NIfTI-2 headers (either byte order); ITK 5.4 itself cannot read NIfTI-2 yet."""
    header = bytearray(540)
    struct.pack_into(order + "i8s", header, 0, 540, b"n+2\0\r\n\x1a\n")
    struct.pack_into(order + "hh8q", header, 12, 4, 16, 3, *SHAPE, 1, 1, 1, 1)  # int16, 16 bits, 24x20x12
    struct.pack_into(order + "q", header, 168, 544)  # vox_offset: header plus the 4-byte extension flag
    voxels = int(np.prod(SHAPE)) * 2
    complete, cut = tmp_path / "complete.nii", tmp_path / "cut.nii"
    complete.write_bytes(bytes(header) + b"\0" * (4 + voxels))
    cut.write_bytes(bytes(header) + b"\0" * (4 + voxels - 10))
    assert readers._nifti_data_problem(str(complete)) is None
    problem = readers._nifti_data_problem(str(cut))
    assert f"holds {544 + voxels - 10} bytes where its header promises {544 + voxels}" in problem


def test_nifti_with_extra_trailing_bytes_still_reads(tmp_path):
    path = str(tmp_path / "padded.nii")
    source = phantom()
    synthetic.write_volume(source, path)
    with open(path, "ab") as handle:
        handle.write(b"\0" * 100)
    assert_same_volume(read_volume_file(path), source)


def test_mhd_without_its_raw_file_is_unreadable(tmp_path):
    path = str(tmp_path / "header.mhd")
    synthetic.write_volume(phantom(), path, compress=False)
    os.remove(tmp_path / "header.raw")
    raises(UnreadableFileError, path, read_volume_file, path)


@pytest.mark.parametrize("name", ["empty.nii.gz", "empty.nrrd", "empty.mha", "empty.dcm"])
def test_empty_file_is_unreadable(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"")
    error = raises(UnreadableFileError, path, read_volume_file, path)
    assert "empty (0 bytes)" in str(error)


def test_missing_path_is_unreadable(tmp_path):
    path = tmp_path / "nowhere" / "case.nii.gz"
    for call in (read_volume_file, read_volume, read_volumes):
        error = raises(UnreadableFileError, path, call, path)
        assert "does not exist" in str(error)


# ---------------------------------------------------------------------------------------------------------------
# 3. Not a scalar 3D volume


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_2d_image_is_rejected(tmp_path, suffix):
    path = str(tmp_path / f"flat{suffix}")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((20, 24), np.int16)), path)
    error = raises(DimensionError, path, read_volume_file, path)
    assert "2D image (24x20)" in str(error)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_single_slice_3d_image_is_rejected(tmp_path, suffix):
    path = str(tmp_path / f"one_slice{suffix}")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 20, 24), np.int16)), path)
    error = raises(DimensionError, path, read_volume_file, path)
    assert "2D image (24x20)" in str(error)


def test_4d_image_is_rejected(tmp_path):
    path = str(tmp_path / "dynamic.nii.gz")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 12, 20, 24), np.int16), isVector=False), path)
    error = raises(DimensionError, path, read_volume_file, path)
    assert "4D image (24x20x12x3)" in str(error)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_4d_image_with_one_time_point_reads_as_3d(tmp_path, suffix):
    path = str(tmp_path / f"one_time_point{suffix}")
    array = np.arange(int(np.prod(SHAPE)), dtype=np.int16).reshape(1, *SHAPE[::-1])
    image = sitk.GetImageFromArray(array, isVector=False)
    image.SetSpacing((*SPACING, 1.0))
    image.SetOrigin((10.0, -20.0, 30.0, 0.0))
    sitk.WriteImage(image, path)
    volume = read_volume_file(path)
    assert volume.array.shape == SHAPE[::-1]
    np.testing.assert_array_equal(volume.array, array[0])
    # LPS (10, -20, 30) is RAS (-10, 20, 30); LPS axes are -R and -A.
    expected = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
    expected[:3, 3] = (-10.0, 20.0, 30.0)
    np.testing.assert_allclose(volume.ijk_to_ras, expected, atol=1e-5)


def test_4d_image_of_one_slice_and_one_time_point_is_2d(tmp_path):
    path = str(tmp_path / "flat4d.nrrd")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((1, 1, 20, 24), np.int16), isVector=False), path)
    error = raises(DimensionError, path, read_volume_file, path)
    assert "2D image (24x20)" in str(error)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_rgb_volume_is_rejected(tmp_path, suffix):
    path = str(tmp_path / f"colour{suffix}")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((*SHAPE[::-1], 3), np.uint8), isVector=True), path)
    error = raises(DimensionError, path, read_volume_file, path)
    assert "3 components per voxel" in str(error)


# ---------------------------------------------------------------------------------------------------------------
# 4. Empty folders


def test_empty_folder(tmp_path):
    error = raises(EmptySourceError, tmp_path, read_volume, tmp_path)
    assert "no volume files or DICOM series" in str(error)
    raises(EmptySourceError, tmp_path, read_volumes, tmp_path)


def test_folder_of_side_files_only_is_empty(tmp_path):
    (tmp_path / "README.md").write_text("# nothing")
    (tmp_path / "meta.json").write_text("{}")
    raises(EmptySourceError, tmp_path, read_volume, tmp_path)
    raises(EmptySourceError, tmp_path, read_volumes, tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# 5. DICOM


def test_dicom_series_reads_with_exact_geometry_and_voxels(tmp_path):
    source = phantom(OBLIQUE)
    folder = tmp_path / "series"
    files = write_dicom_series(source, folder, "1.2.3.4.100")
    volume = read_volume(folder)
    assert_same_volume(volume, source)
    np.testing.assert_allclose(volume.spacing, SPACING, atol=1e-5)
    assert volume.array.dtype == np.int16
    assert volume.modality == "CT"
    assert volume.series_uid == "1.2.3.4.100"
    assert volume.body_part == "CHEST"
    assert volume.source == str(folder)
    assert volume.name == "series-.3.4.100"  # folder name and the UID's last 8 characters, without a description
    [case] = discover([folder]).cases
    assert case.series_uid == "1.2.3.4.100" and case.files == tuple(files) and is_dicom_series(case)
    assert case.label == f"{folder} [series 1.2.3.4.100]"
    assert_same_volume(read_case(case), source)
    assert_same_volume(readers.read_dicom_series(folder, "1.2.3.4.100"), source)


def test_dicom_series_description_names_the_volume(tmp_path):
    write_dicom_series(phantom(), tmp_path, "1.2.3.4.101", description="Chest CT 2.5mm")
    volume = read_volume(tmp_path)
    assert volume.name == "Chest CT 2.5mm"
    assert volume.extra["series_description"] == "Chest CT 2.5mm"


def test_left_handed_dicom_source_reads_as_the_same_anatomy_in_slice_normal_order(tmp_path):
    """k running against row x column: GDCM stacks slices along the normal, so k comes back reversed, same anatomy."""
    source = phantom(np.diag([1.0, 1.0, -1.0]))
    write_dicom_series(source, tmp_path, "1.2.3.4.102")
    volume = read_volume(tmp_path)
    expected = reorient(source, (0, 1, 2), (False, False, True))
    assert_same_volume(volume, expected)
    assert volume.ijk_to_ras[2, 2] == pytest.approx(SPACING[2], abs=1e-6)  # the source had -2.5
    np.testing.assert_allclose(volume.center_ras, source.center_ras, atol=1e-4)


def test_dicom_without_suffix_is_found_by_magic(tmp_path):
    source = phantom()
    for path in write_dicom_series(source, tmp_path, "1.2.3.4.103"):
        os.rename(path, path[: -len(".dcm")])
    assert readers.is_dicom_file(tmp_path / "slice000")
    [case] = discover([tmp_path]).cases
    assert len(case.files) == SHAPE[2]
    assert_same_volume(read_volume(tmp_path), source)


def test_is_dicom_file(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"\0" * 200)
    assert not readers.is_dicom_file(plain)
    assert readers.is_dicom_file(tmp_path / "absent.DCM")  # by suffix alone
    assert not readers.is_dicom_file(tmp_path / "absent")


def test_two_series_in_one_folder(tmp_path):
    first, second = phantom(), phantom(OBLIQUE, spacing=(1.0, 1.0, 2.0))
    write_dicom_series(first, tmp_path, "1.2.3.4.201", prefix="a")
    write_dicom_series(second, tmp_path, "1.2.3.4.202", prefix="b")
    found = discover([tmp_path])
    assert sorted(c.series_uid for c in found.cases) == ["1.2.3.4.201", "1.2.3.4.202"]
    assert [len(c.files) for c in found.cases] == [SHAPE[2], SHAPE[2]]
    assert found.skipped == []
    volumes = {v.series_uid: v for v in read_volumes(tmp_path)}
    assert set(volumes) == {"1.2.3.4.201", "1.2.3.4.202"}
    assert_same_volume(volumes["1.2.3.4.201"], first)
    assert_same_volume(volumes["1.2.3.4.202"], second)
    error = raises(InputError, tmp_path, read_volume, tmp_path)
    assert "2 volumes" in str(error) and "1.2.3.4.201" in str(error) and "1.2.3.4.202" in str(error)
    picked = read_volume(tmp_path, series_uid="1.2.3.4.202")
    assert picked.series_uid == "1.2.3.4.202"
    assert_same_volume(picked, second)
    error = raises(EmptySourceError, tmp_path, read_volume, tmp_path, series_uid="9.9.9")
    assert "9.9.9" in str(error)


def test_series_in_nested_folders_are_found(tmp_path):
    first, second = phantom(), phantom(OBLIQUE)
    write_dicom_series(first, tmp_path / "patient1" / "study" / "ct", "1.2.3.4.301")
    write_dicom_series(second, tmp_path / "patient2", "1.2.3.4.302")
    (tmp_path / "patient3").mkdir()
    synthetic.write_volume(first, str(tmp_path / "patient3" / "scan.nii.gz"))
    found = discover([tmp_path])
    assert [(os.path.relpath(c.path, tmp_path), c.series_uid) for c in found.cases] == [
        (os.path.join("patient1", "study", "ct"), "1.2.3.4.301"),
        ("patient2", "1.2.3.4.302"),
        (os.path.join("patient3", "scan.nii.gz"), None),
    ]
    volumes = list(read_volumes(tmp_path))
    assert [v.series_uid for v in volumes] == ["1.2.3.4.301", "1.2.3.4.302", None]
    assert_same_volume(volumes[0], first)
    assert_same_volume(volumes[1], second)
    assert_same_volume(volumes[2], first, tolerance=1e-4)
    assert discover([tmp_path], recursive=False).cases == []
    raises(InputError, tmp_path, read_volume, tmp_path)
    assert read_volume(tmp_path, series_uid="1.2.3.4.302").source == str(tmp_path / "patient2")


def test_missing_middle_slice(tmp_path):
    files = write_dicom_series(phantom(), tmp_path, "1.2.3.4.400")
    os.remove(files[6])
    error = raises(DicomSeriesError, tmp_path, read_volume, tmp_path)
    assert "missing" in str(error)
    assert "gap of 5.00 mm" in str(error) and "spacing is 2.50 mm" in str(error)
    raises(DicomSeriesError, tmp_path, read_volumes, tmp_path)


def test_missing_slice_in_a_short_series(tmp_path):
    """Three slices left of four: the gaps are 2.5 and 5 mm; still 'missing', not merely 'uneven'."""
    files = write_dicom_series(phantom(shape=(24, 20, 4)), tmp_path, "1.2.3.4.401")
    os.remove(files[2])
    error = raises(DicomSeriesError, tmp_path, read_volume, tmp_path)
    assert "missing" in str(error) and "gap of 5.00 mm" in str(error)


def test_uneven_slice_spacing(tmp_path):
    files = write_dicom_series(phantom(), tmp_path, "1.2.3.4.402")
    # Move slice 5 by 0.3 mm along the slice normal (S): gaps of 2.8 and 2.2 mm around it (not 1.5x: not 'missing').
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[5])
    image = reader.Execute()
    x, y, z = (float(v) for v in image.GetMetaData("0020|0032").split("\\"))
    image.SetMetaData("0020|0032", f"{x:.8f}\\{y:.8f}\\{z + 0.3:.8f}")
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(files[5])
    writer.Execute(image)
    error = raises(DicomSeriesError, tmp_path, read_volume, tmp_path)
    assert "uneven slice spacing (2.20 to 2.80 mm)" in str(error)


def test_duplicate_slices(tmp_path):
    source = phantom()
    write_dicom_series(source, tmp_path, "1.2.3.4.403", prefix="a")
    write_dicom_series(source, tmp_path, "1.2.3.4.403", prefix="b")
    error = raises(DicomSeriesError, tmp_path, read_volume, tmp_path)
    assert f"{SHAPE[2]} duplicate slice position(s)" in str(error)


def test_mixed_slice_sizes(tmp_path):
    write_dicom_series(phantom(), tmp_path, "1.2.3.4.500")
    odd = write_dicom_series(phantom(shape=(20, 20, 12)), tmp_path / "tmp", "1.2.3.4.500", prefix="odd")
    shutil.move(odd[5], tmp_path / "slice005.dcm")
    shutil.rmtree(tmp_path / "tmp")
    [case] = discover([tmp_path]).cases  # GDCM groups by UID only: one series of mixed files
    assert len(case.files) == SHAPE[2]
    error = raises(DicomSeriesError, tmp_path, read_volume, tmp_path)
    assert "mixes slice sizes (20x20, 24x20)" in str(error)


def test_mixed_orientations(tmp_path):
    write_dicom_series(phantom(), tmp_path, "1.2.3.4.600")
    turned = write_dicom_series(phantom(synthetic.rotation(0, 0, 30)), tmp_path / "tmp", "1.2.3.4.600", prefix="turned")
    shutil.move(turned[5], tmp_path / "slice005.dcm")
    shutil.rmtree(tmp_path / "tmp")
    error = raises(DicomSeriesError, tmp_path, read_volume, tmp_path)
    assert "mixes slice orientations" in str(error)


def test_lone_single_slice_dicom(tmp_path):
    files = write_dicom_series(phantom(), tmp_path, "1.2.3.4.700")
    for path in files[1:]:
        os.remove(path)
    error = raises(DimensionError, files[0], read_volume_file, files[0])
    assert "2D image (24x20)" in str(error)
    raises(DimensionError, files[0], read_volume, files[0])
    # Through the folder, the error still names the file at fault.
    raises(DimensionError, files[0], read_volume, tmp_path)


def test_multiframe_dicom_file(tmp_path):
    """sitk.WriteImage of a 3D image to .dcm gives one Enhanced CT multi-frame file (SOP 1.2.840.10008.5.1.4.1.1.2.1).

    GDCM keeps the whole geometry in its per-frame functional groups: origin, oblique direction and the 2.5 mm
    spacing along k all come back. (ITK 5.4's GDCM writer refuses int16 3D images, 'DICOM does not support this
    component type', so the voxels are shifted to uint16 here.)
    """
    source = phantom(OBLIQUE)
    stored = (source.array.astype(np.int32) + 1024).astype(np.uint16)
    image = source.to_sitk(stored)
    image.SetMetaData("0008|0060", "CT")
    path = str(tmp_path / "multiframe.dcm")
    sitk.WriteImage(image, path)
    volume = read_volume_file(path)
    assert volume.array.shape == SHAPE[::-1]
    np.testing.assert_array_equal(volume.array, stored)
    np.testing.assert_allclose(volume.ijk_to_ras, source.ijk_to_ras, atol=1e-3)
    np.testing.assert_allclose(volume.spacing, SPACING, atol=1e-4)
    assert volume.modality == "CT"
    assert volume.series_uid  # GDCM generated one
    assert volume.name == "multiframe"
    # Found in a folder, it is a one-file series, and reads the same way.
    [case] = discover([tmp_path]).cases
    assert case.files == (path,) and not is_dicom_series(case) and case.series_uid == volume.series_uid
    from_folder = read_volume(tmp_path)
    np.testing.assert_array_equal(from_folder.array, stored)
    assert from_folder.series_uid == volume.series_uid


def test_unparseable_dicom_file_is_reported_skipped(tmp_path):
    source = phantom()
    write_dicom_series(source, tmp_path, "1.2.3.4.800")
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x01" * 300)
    found = discover([tmp_path])
    assert len(found.cases) == 1 and len(found.cases[0].files) == SHAPE[2]
    assert found.skipped == [(str(junk), "not a readable DICOM image")]
    assert_same_volume(read_volume(tmp_path), source)


# ---------------------------------------------------------------------------------------------------------------
# 6. discover on a mixed folder


def test_discover_counts_and_skips(tmp_path):
    volume = phantom()
    for name in ("a.nii.gz", "b.nrrd", "c.mha"):
        synthetic.write_volume(volume, str(tmp_path / name))
    synthetic.write_volume(volume, str(tmp_path / "d.mhd"), compress=False)  # beside its d.raw, which is ignored
    (tmp_path / "notes.txt").write_text("scanned 2024")
    (tmp_path / "README.md").write_text("# cohort")
    (tmp_path / "meta.json").write_text("{}")
    (tmp_path / "DICOMDIR").write_bytes(b"\0" * 10)
    (tmp_path / "._a.nii.gz").write_bytes(b"\0\5\26\7" + b"\0" * 60)  # macOS resource fork: hidden, not a volume
    (tmp_path / "sub").mkdir()
    synthetic.write_volume(volume, str(tmp_path / "sub" / "e.nii"))
    (tmp_path / "sub" / "table.xyz").write_text("1,2")

    found = discover([tmp_path])
    assert [os.path.relpath(c.path, tmp_path) for c in found.cases] == [
        "a.nii.gz", "b.nrrd", "c.mha", "d.mhd", os.path.join("sub", "e.nii"),
    ]
    assert all(c.series_uid is None and c.files == () and not is_dicom_series(c) for c in found.cases)
    assert found.skipped == [(str(tmp_path / "notes.txt"), "unsupported format"),
                             (str(tmp_path / "sub" / "table.xyz"), "unsupported format")]
    shallow = discover([tmp_path], recursive=False)
    assert len(shallow.cases) == 4 and len(shallow.skipped) == 1
    # Every case found reads, with the voxels written.
    volumes = list(read_volumes(tmp_path))
    assert [v.name for v in volumes] == ["a", "b", "c", "d", "e"]
    for read in volumes:
        assert_same_volume(read, volume, tolerance=1e-4)


def test_discover_on_files_and_missing_paths(tmp_path):
    case = synthetic.write_volume(phantom(), str(tmp_path / "a.nrrd"))
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    missing = tmp_path / "missing"
    found = discover([case, notes, missing])
    assert found.cases == [CaseSource(path=case)]
    assert found.cases[0].label == case
    assert found.skipped == [(str(notes), "unsupported format"), (str(missing), "does not exist")]
