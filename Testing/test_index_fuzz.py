"""Property-based and fuzz tests: readers, ROI and CLI argument parsing, and the index against a model of it.

Each property has a bounded number of examples and no deadline, so the file stays within about a minute on 2 cores.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from CBIRSlicerLib import cli
from CBIRSlicerLib.cli import program
from CBIRSlicerLib.cli import search as cli_search
from CBIRSlicerLib.errors import CBIRError, ParameterError
from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.imaging.readers import CaseSource, read_volume_file
from CBIRSlicerLib.imaging.roi import RoiBox
from CBIRSlicerLib.index.folder import Index
from CBIRSlicerLib.index.items import IndexSettings
from CBIRSlicerLib.index.writer import BuildReport, case_id_for
from CBIRSlicerLib.models.registry import create_embedder

SHAPE = (16, 16, 8)
TINY = IndexSettings(axes=["axial"], stride_mm=8.0, tile_sizes_mm=[], blobs_per_slice=0)
# Derandomised (the same examples on every run, so the suite is repeatable) and without an example database in the tree.
QUIET = {"deadline": None, "derandomize": True, "database": None,
         "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]}
FUZZ = settings(max_examples=40, **QUIET)


def _volume(seed=0):
    rng = np.random.default_rng(seed)
    blob = synthetic.Blob(tuple(rng.uniform(-4, 4, 3) * np.array([1, 1, 0.3])), 4.0, 300.0)
    return synthetic.render(synthetic.centered_matrix(SHAPE, (2.0, 2.0, 2.0)), SHAPE, blobs=[blob], body_radii=(12, 12, 20))


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    folder = tmp_path_factory.mktemp("originals")
    return {suffix: open(synthetic.write_volume(_volume(), str(folder / f"v{suffix}"), compress=False), "rb").read()
            for suffix in (".nii", ".nii.gz", ".nrrd", ".mha")}


def _read_or_refuse(path):
    """The reader's contract: a usable volume, or a CBIRError naming the file; nothing else."""
    try:
        volume = read_volume_file(path)
    except CBIRError as error:
        assert path in str(error) and "\n" not in str(error).strip()
        return None
    assert volume.array.ndim == 3 and np.all(np.isfinite(volume.ijk_to_ras))
    assert np.all(volume.spacing > 0)
    return volume


@FUZZ
@given(suffix=st.sampled_from([".nii", ".nii.gz", ".nrrd", ".mha"]), data=st.data())
def test_readers_survive_truncation_and_byte_flips(originals, suffix, data):
    raw = bytearray(originals[suffix])
    how = data.draw(st.sampled_from(["truncate", "flip", "both"]))
    if how in ("flip", "both"):
        # Mostly in the header, where a flip changes what the file claims; the voxels matter less.
        for position in data.draw(st.lists(st.integers(0, min(len(raw), 600) - 1), min_size=1, max_size=4)):
            raw[position] = data.draw(st.integers(0, 255))
    if how in ("truncate", "both"):
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"fuzzed{suffix}")
        with open(path, "wb") as handle:
            handle.write(bytes(raw))
        _read_or_refuse(path)


HEADER_FIELDS = {".mha": ("ElementSpacing", "TransformMatrix", "Offset", "DimSize", "ElementType", "NDims"),
                 ".nrrd": ("space directions", "space origin", "sizes", "type", "dimension", "encoding")}
FIELD_VALUES = st.one_of(
    st.lists(st.sampled_from(["0", "-1", "1", "2", "1e308", "nan", "inf", "-0", "0.5", "abc", "(1,0,0)", "(0,0,0)", "3"]),
             min_size=0, max_size=9).map(" ".join),
    st.text(alphabet="0123456789 .-,()eabcnfi", max_size=30))


@FUZZ
@given(suffix=st.sampled_from([".mha", ".nrrd"]), data=st.data())
def test_readers_refuse_random_header_fields_in_one_line(originals, suffix, data):
    raw = originals[suffix]
    split = raw.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n") if suffix == ".mha" else raw.index(b"\n\n") + 2
    header, voxels = raw[:split].decode("latin-1").splitlines(), raw[split:]
    name = data.draw(st.sampled_from(HEADER_FIELDS[suffix]))
    value = data.draw(FIELD_VALUES)
    separator = " = " if suffix == ".mha" else ": "
    header = [f"{name}{separator}{value}" if line.startswith(name + separator.rstrip()) else line for line in header]
    if name == "DimSize" and all(v.isdigit() for v in value.split()) and math.prod(int(v) for v in value.split() or [0]) > 10**7:
        return  # a header asking for gigabytes is ITK's to refuse, slowly; not what this property is about
    if name == "sizes" and all(v.isdigit() for v in value.split()) and math.prod(int(v) for v in value.split() or [0]) > 10**7:
        return
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, f"fuzzed{suffix}")
        with open(path, "wb") as handle:
            handle.write(("\n".join(header) + "\n" + ("" if suffix == ".mha" else "\n")).encode("latin-1") + voxels)
        _read_or_refuse(path)


# ----- ROI and argument parsing -------------------------------------------------------------------------------------------------
NUMBERS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.integers(-10**6, 10**6))


@settings(max_examples=200, **QUIET)
@given(values=st.lists(NUMBERS, min_size=0, max_size=8), option=st.sampled_from(["--roi-ras", "--slice-ras"]))
def test_number_lists_reach_the_options_whatever_their_sign(values, option):
    text = ",".join(repr(float(v)) if isinstance(v, float) else str(v) for v in values)
    if not text:
        return
    command = ["slices", "v.nii.gz", "--out", "o"] if option == "--roi-ras" else ["search", "--index", "i", "--volume", "v.nii.gz"]
    args = cli.build_parser().parse_args(program.join_negative_values([*command, option, text]))
    assert getattr(args, option[2:].replace("-", "_")) == text
    if option == "--slice-ras":
        try:
            point = cli_search.ras_point(text)
        except ParameterError as error:
            assert "--slice-ras" in str(error)
            assert len(values) != 3 or not all(math.isfinite(float(v)) for v in values)
        else:
            assert len(point) == 3 and np.allclose(point, [float(v) for v in values])
        return
    try:
        roi = RoiBox.parse(text)
    except ParameterError as error:
        numbers = [float(v) for v in values]
        assert len(numbers) != 6 or not all(map(math.isfinite, numbers)) or min(numbers[3:]) <= 0
        assert ("centre" in str(error)) == (len(numbers) == 6 and not all(map(math.isfinite, numbers[:3])))
    else:
        assert np.allclose(roi.as_list(), [float(v) for v in values]) and min(roi.size) > 0


@settings(max_examples=100, **QUIET)
@given(text=st.text(max_size=40))
def test_any_roi_text_is_a_box_or_a_parameter_error(text):
    try:
        roi = RoiBox.parse(text)
    except ParameterError:
        return
    assert all(map(math.isfinite, roi.as_list())) and min(roi.size) > 0


# ----- the index against a model of what it should hold ---------------------------------------------------------------------
OPERATIONS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True)),
    st.tuples(st.just("remove"), st.integers(0, 3)),
    st.tuples(st.just("change-and-refresh"), st.integers(0, 3)),
    st.tuples(st.just("kill-while-adding"), st.integers(0, 3), st.booleans()),
), min_size=1, max_size=6)


@pytest.fixture(scope="module")
def embedder():
    return create_embedder("handcrafted")


@settings(max_examples=8, **QUIET)
@given(operations=OPERATIONS)
def test_index_matches_a_model_through_add_remove_refresh_and_kills(embedder, operations):
    work = tempfile.mkdtemp()
    try:
        paths = [synthetic.write_volume(_volume(n), os.path.join(work, f"case{n}.mha")) for n in range(4)]
        versions = [0] * 4
        model: dict[str, int] = {}  # case id -> version of its file the index holds
        folder = os.path.join(work, "idx")
        Index.create(folder, embedder, TINY).close()
        for operation in operations:
            kind, which = operation[0], operation[1]
            if kind == "add":
                with Index.open(folder, writable=True) as index:
                    index.add_sources([paths[n] for n in which], embedder)
                model.update({case_id_for(CaseSource(os.path.abspath(paths[n]))): versions[n] for n in which})
            elif kind == "remove":
                key = case_id_for(CaseSource(os.path.abspath(paths[which])))
                if key in model:
                    with Index.open(folder, writable=True) as index:
                        index.remove([key])
                    del model[key]
            elif kind == "change-and-refresh":
                versions[which] += 1
                synthetic.write_volume(_volume(10 * which + versions[which]), paths[which])
                with Index.open(folder, writable=True) as index:
                    index.refresh(embedder)
                for n, path in enumerate(paths):
                    key = case_id_for(CaseSource(os.path.abspath(path)))
                    if key in model:
                        model[key] = versions[n]
            else:  # a writer killed mid-add: before its vectors are saved, or after, before the cases are marked complete
                index = Index.open(folder, writable=True)
                index._index_source(CaseSource(os.path.abspath(paths[which])), embedder, [], BuildReport())
                if operation[2]:
                    index.store.save(os.path.join(folder, "vectors.faiss"))
                index._lock.release()  # what the OS does when the process dies
                index.catalog.close()
                reader = Index.open(folder)
                assert reader.interrupted and "a writer stopped" in reader.state_note()
                reader.catalog.close()
                # A new case was pending and goes; an indexed one was unchanged: the model stays as it was.
                with Index.open(folder, writable=True):
                    pass  # the next writer tidies
            reader = Index.open(folder)
            try:
                held = {c.case_id: c for c in reader.catalog.cases()}
                assert set(held) == set(model), (operations, operation)
                assert not reader.interrupted and reader.verify(check_sources=False) == []
                assert reader.catalog.count("cases") == reader.manifest["counts"]["cases"] == len(model)
            finally:
                reader.catalog.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
