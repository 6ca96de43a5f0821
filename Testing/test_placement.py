"""Placing a match anatomically: the prior over a case's items, and registration carrying a point into a moved copy."""

from __future__ import annotations

import numpy as np

from CBIRSlicerLib.imaging import registration, synthetic
from CBIRSlicerLib.imaging.volume import Volume
from CBIRSlicerLib.retrieval import placement

SHAPE, SPACING = (60, 60, 44), (2.0, 2.0, 2.5)


def _moved_copy(degrees_about_s: float, shift) -> tuple[Volume, Volume, np.ndarray, np.ndarray]:
    """The default phantom, and a copy whose voxel at RAS x shows the phantom at R x + t (a patient moved in the scanner)."""
    matrix = synthetic.centered_matrix(SHAPE, SPACING)
    original = synthetic.render(matrix, SHAPE)
    rotation = synthetic.rotation(degrees_about_s=degrees_about_s)
    moved = np.eye(4)
    moved[:3, :3], moved[:3, 3] = rotation, shift
    copy = synthetic.render(moved @ matrix, SHAPE)
    return original, Volume.from_array(copy.array, matrix), rotation, np.asarray(shift, float)


def test_registration_carries_a_point_into_a_moved_copy():
    original, copy, rotation, shift = _moved_copy(7.0, (9.0, -6.0, 5.0))
    point = np.array([12.0, -8.0, 6.0])  # the centre of the first ball
    truth = np.linalg.solve(rotation, point - shift)  # where the copy shows it
    query_image, target_image = registration.coarse_image(original), registration.coarse_image(copy)
    placed = registration.place(original, point, copy, None, query_image, target_image)
    assert np.linalg.norm(np.array(placed.ras) - truth) < 3.0, (placed, truth)
    assert np.linalg.norm(point - truth) > 8.0  # the copy really moved: the identity would be wrong


def test_a_clearly_better_look_alike_elsewhere_wins_for_a_finding_but_not_for_a_region():
    centres = np.array([[0.0, 0, 0], [100.0, 0, 0], [8.0, 0, 0]])
    sizes, axes = np.full(3, 16.0), np.array(["axial"] * 3, dtype=object)
    agreed = np.array([0.90, 0.99, 0.905])  # a lesion-like item 100 mm away is 0.085 more alike than the anatomical place
    best, spot, anatomical = placement.anatomical_match(agreed, centres, sizes, axes, (1.0, 0.0, 0.0),
                                                        placement.look_alike_margin(20.0))
    assert best == 1 and not anatomical and np.allclose(spot, centres[1])
    best, spot, anatomical = placement.anatomical_match(agreed, centres, sizes, axes, (1.0, 0.0, 0.0),
                                                        placement.look_alike_margin(80.0))
    assert best == 2 and anatomical  # the most alike item holding the placed point
    assert np.allclose(spot, (1.0, 0.0, 0.0))  # the registered point is the focus: finer than the item grid


def test_a_result_that_agrees_with_the_box_keeps_the_anatomical_place_even_for_a_small_box():
    centres = np.array([[0.0, 0, 0], [100.0, 0, 0]])
    sizes, axes = np.full(2, 16.0), np.array(["axial"] * 2, dtype=object)
    agreed = np.array([0.90, 0.99])
    finding = placement.look_alike_margin(20.0)
    for agreement, anatomical_wins in ((0.95, True), (placement.AGREEMENT_MIN - 0.01, False), (float("nan"), False)):
        _, _, anatomical = placement.anatomical_match(agreed, centres, sizes, axes, (1.0, 0.0, 0.0), finding, agreement)
        assert anatomical is anatomical_wins, agreement


def test_a_focal_finding_disagrees_with_its_place_in_a_case_without_it():
    """The box around a ball (2.5 radii, as the demo's lesion queries) agrees with a moved copy that has the ball (0.98
    today), not with a copy whose ball is gone (0.47): that case's place is anatomy without the finding."""
    matrix = synthetic.centered_matrix(SHAPE, SPACING)
    blobs = [*synthetic.default_blobs()[1:], synthetic.Blob((0.0, 0.0, 0.0), 10.0, 300.0, "ball")]
    original = synthetic.render(matrix, SHAPE, blobs=blobs)
    point, box = np.zeros(3), 2.5 * blobs[-1].radius
    moved = np.eye(4)
    moved[:3, :3], moved[:3, 3] = synthetic.rotation(degrees_about_s=7.0), (9.0, -6.0, 5.0)
    copies = {"moved": Volume.from_array(synthetic.render(moved @ matrix, SHAPE, blobs=blobs).array, matrix),
              "without": synthetic.render(matrix, SHAPE, blobs=blobs[:-1])}
    query_image = registration.coarse_image(original)
    agreements = {name: registration.place(original, point, copy, None, query_image, registration.coarse_image(copy), box).agreement
                  for name, copy in copies.items()}
    assert agreements["moved"] > 0.9 and agreements["without"] < placement.AGREEMENT_MIN - 0.1, agreements
    unboxed = registration.place(original, point, copies["moved"], None, query_image, registration.coarse_image(copies["moved"]))
    assert np.isnan(unboxed.agreement)  # no box given (a slice query): nothing measured


def test_the_margin_grows_from_findings_to_regions():
    assert placement.look_alike_margin(20.0) == placement.FINDING_MARGIN
    assert placement.look_alike_margin(None) == placement.look_alike_margin(200.0) == placement.REGION_MARGIN
    middle = placement.look_alike_margin((placement.FINDING_MAX_MM + placement.REGION_MIN_MM) / 2)
    assert abs(middle - (placement.FINDING_MARGIN + placement.REGION_MARGIN) / 2) < 1e-9


def test_the_deformable_stage_follows_a_structure_that_moved_against_its_surroundings():
    # A copy in which a ball of 20 mm sits 6.4 mm from where it is in the original while the body and the other objects
    # stay: the affine stages register the body; the demons stage on the ball's neighbourhood follows the ball.
    matrix = synthetic.centered_matrix(SHAPE, SPACING)
    blobs = synthetic.default_blobs()
    blobs[0] = synthetic.Blob(blobs[0].center, 10.0, 300.0, "ball")
    original = synthetic.render(matrix, SHAPE, blobs=blobs)
    point, moved_by = np.array(blobs[0].center), np.array([0.0, 4.0, 5.0])
    blobs[0] = synthetic.Blob(tuple(point + moved_by), 10.0, 300.0, "ball")
    copy = synthetic.render(matrix, SHAPE, blobs=blobs)
    query_image, target_image = registration.coarse_image(original), registration.coarse_image(copy)
    initial = registration.global_transform(query_image, target_image)
    placed = np.array(registration.place(original, point, copy, initial, query_image, target_image).ras)
    assert np.linalg.norm(placed - (point + moved_by)) < 3.0, placed
    deform_mm = registration.DEFORM_MM
    try:
        registration.DEFORM_MM = 0.0
        affine = np.array(registration.place(original, point, copy, initial, query_image, target_image).ras)
    finally:
        registration.DEFORM_MM = deform_mm
    assert np.linalg.norm(affine - (point + moved_by)) > np.linalg.norm(placed - (point + moved_by)) + 3.0, (affine, placed)
