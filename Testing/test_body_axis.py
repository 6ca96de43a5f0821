"""The body coordinate (imaging/body_axis.py) on real patients it was not made from.

Patients: the first four *reporting* head-and-neck patients (benchmarks/patient_split.py) in cases.csv order that
hold the brainstem, both parotids and the mandible inside the body's extent; the template was built from tuning
patients only. Without the
shared data these tests skip, saying so; the head CT and brain MR come from Debian packages (.ci/run fetches them).
Bounds are several times tighter than a wrong axis would give (an axis off by one region is 100 mm or more off);
docs/benchmarks.md ("Body coordinate") has the full figures.
"""

from __future__ import annotations

import csv
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import patient_split
import real_data

from CBIRSlicerLib.imaging import body_axis
from CBIRSlicerLib.imaging.body_axis import BodyAxis

ORGANS = {1: "brainstem", 3: "right_parotid", 4: "left_parotid", 7: "mandible"}


def _organ_s(labels, axis) -> dict[str, float]:
    """Centroid S of each organ that lies whole inside the body's extent (crops here store a thin tube of tissue
    around some organs beyond the body: such an organ has no level to agree on)."""
    out = {}
    for value, name in ORGANS.items():
        kji = np.argwhere(labels.array == value)
        if kji.size:
            s = labels.ijk_to_ras_points(kji[:, ::-1].astype(float))[:, 2]
            if axis.s_range[0] < s.min() and s.max() < axis.s_range[1]:
                out[name] = float(s.mean())
    return out


def _slab(volume, centre_s: float, thickness_mm: float):
    import real_anatomy

    centre = volume.center_ras.copy()
    centre[2] = centre_s
    return real_anatomy.slab_around(volume, centre, thickness_mm)


@pytest.fixture(scope="module")
def patients():
    """Four reporting patients: (id, CT volume, organ centroid S, axis)."""
    from CBIRSlicerLib.imaging.readers import read_volume

    try:
        folder = real_data.shared_data_dir() / "real" / "head-neck-ct"
    except real_data.RealDataError as error:
        pytest.skip(f"shared data not available: {error}")
    with open(folder / "cases.csv", newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if patient_split.part(r["case"]) == "reporting"
                and {"Brainstem", "RightParotid", "LeftParotid", "Mandible"} <= set(r["organs"].split(","))]
    out = []
    for row in rows:
        volume = read_volume(folder / f"{row['case']}_ct.nii.gz")
        axis = body_axis.body_axis(volume)
        organs = _organ_s(read_volume(folder / f"{row['case']}_labels.nii.gz"), axis)
        if len(organs) == len(ORGANS):
            out.append((row["case"], volume, organs, axis))
        if len(out) == 4:
            return out
    pytest.fail("fewer than four reporting patients hold the four organs in view")


def test_levels_map_both_ways_and_say_none_outside():
    axis = BodyAxis(slope=0.9, offset=50.0, s_range=(-100.0, 20.0), uncertainty_mm=4.0, cost=0.5, modality="CT", planes=60)
    assert axis.level_at(0.0) == pytest.approx(45.0) and axis.level_at(-100.0) == pytest.approx(135.0)
    assert axis.s_at(axis.level_at(-37.5)) == pytest.approx(-37.5)
    assert axis.level_at(21.0) is None and axis.level_at(21.0, margin_mm=2.0) == pytest.approx(26.1)
    assert axis.s_at(0.0) is None  # the vertex (S = 50) lies above this volume's body
    assert axis.level_range == pytest.approx((27.0, 135.0))
    assert axis.level_of_point([10.0, -5.0, -10.0]) == pytest.approx(54.0)
    assert BodyAxis.from_dict(axis.to_dict()) == axis
    assert axis.reliable and not BodyAxis(0.9, 50.0, (-100.0, 20.0), 4.0, 1.5, "CT", 60).reliable


def test_organ_levels_agree_across_patients(patients):
    """Each organ's centroid level, carried from one patient into each other one, lands near that patient's organ."""
    errors = {name: [] for name in ORGANS.values()}
    for p_id, _, p_organs, p_axis in patients:
        for q_id, _, q_organs, q_axis in patients:
            if p_id == q_id:
                continue
            for name in ORGANS.values():
                s = q_axis.s_at(p_axis.level_at(p_organs[name]), margin_mm=15.0)  # organs may touch the body's end
                errors[name].append(abs(s - q_organs[name]) if s is not None else 99.0)
    every = np.concatenate([np.array(e) for e in errors.values()])
    print({name: np.round(e, 1).tolist() for name, e in errors.items()})
    assert np.median(every) <= 12.0 and np.percentile(every, 90) <= 30.0
    standard = body_axis.load_template().landmarks
    for _, _, organs, axis in patients:  # and each lies near the standard's level of that organ
        assert abs(axis.level_at(organs["right_parotid"]) - standard["right_parotid"]) <= 20.0


def test_a_slab_finds_its_level_in_other_patients(patients):
    """A 50 mm slab of one patient around the parotids, aligned on its own, points at the parotids of the others."""
    _, volume, organs, _ = patients[0]
    centre = organs["right_parotid"]
    axis = body_axis.body_axis(_slab(volume, centre, 50.0))
    assert axis is not None and axis.s_range[1] - axis.s_range[0] <= 52.0
    level = axis.level_at(centre)
    errors = [abs(q_axis.s_at(level) - q_organs["right_parotid"]) for _, _, q_organs, q_axis in patients[1:]]
    print("slab errors (mm):", np.round(errors, 1))
    assert max(errors) <= 25.0


def test_a_level_outside_the_field_of_view_has_no_place(patients):
    """The first lumbar vertebra's level lies in no head-and-neck CT; the parotids' lies in none of the abdomen."""
    standard = body_axis.load_template().landmarks
    for _, _, _, axis in patients:
        assert axis.s_at(standard["L1"]) is None and axis.s_at(standard["right_parotid"]) is not None
    try:
        abdomen = real_data.abdomen_ct()
    except real_data.RealDataError as error:
        pytest.skip(f"real abdominal CT not available: {error}")
    from CBIRSlicerLib.imaging.readers import read_volume

    axis = body_axis.body_axis(read_volume(abdomen.image))
    assert axis.s_at(standard["right_parotid"]) is None and axis.s_at(standard["L1"]) is not None


def test_head_ct_and_brain_mr_start_at_the_vertex():
    """The real head CT and the brain MR (shape features only: no Hounsfield scale) both end at the top of the skull."""
    from CBIRSlicerLib.imaging.readers import read_volume

    for name, item in real_data.prepare(names=("head_ct", "brain_mr")).items():
        axis = body_axis.body_axis(read_volume(item.image))
        assert axis.modality == item.modality
        assert abs(axis.level_range[0]) <= 25.0, (name, axis)
        assert 130.0 <= axis.level_range[1] <= 200.0, (name, axis)  # both end between the skull base and the jaw


def test_too_little_body_gives_no_axis(patients):
    _, volume, organs, _ = patients[0]
    assert body_axis.body_axis(_slab(volume, organs["mandible"], 12.0)) is None
