"""Placing a match anatomically: the prior over a case's items, and registration carrying a point into a moved copy."""

from __future__ import annotations

import numpy as np

from CBIRSlicerLib.imaging import levels, registration, synthetic
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


def _items():
    """Three items: one at the registered place, a look-alike 100 mm away (more alike), one 40 mm away."""
    centres = np.array([[0.0, 0, 0], [100.0, 0, 0], [40.0, 0, 0]])
    return np.array([0.90, 0.99, 0.95]), centres, np.full(3, 16.0), np.array(["axial"] * 3, dtype=object)


def test_auto_shows_the_finding_for_a_focal_box_and_the_anatomy_for_an_organ_box():
    agreed, centres, sizes, axes = _items()
    focal = placement.choose(agreed, centres, sizes, axes, (1.0, 0.0, 0.0), True, "auto", focal=True, agreement=0.2)
    assert focal.shown == "look-alike" and focal.item == 1 and np.allclose(focal.focus_ras, centres[1])
    assert np.allclose(focal.anatomy_ras, (1.0, 0.0, 0.0)) and focal.in_view and focal.note is None  # both places carried
    organ = placement.choose(agreed, centres, sizes, axes, (1.0, 0.0, 0.0), True, "auto", focal=False, agreement=0.2)
    assert organ.shown == "anatomy" and organ.item == 0 and np.allclose(organ.focus_ras, (1.0, 0.0, 0.0))
    assert np.allclose(organ.look_alike_ras, centres[1])
    # a focal box whose place in the result looks like it: the finding is at its anatomical place
    agreeing = placement.choose(agreed, centres, sizes, axes, (1.0, 0.0, 0.0), True, "auto", focal=True,
                                agreement=placement.AGREEMENT_MIN + 0.01)
    assert agreeing.shown == "anatomy"
    nothing = placement.choose(agreed, centres, sizes, axes, (1.0, 0.0, 0.0), True, "auto", focal=True)  # NaN: no box
    assert nothing.shown == "look-alike"


def test_the_user_overrides_auto_both_ways():
    agreed, centres, sizes, axes = _items()
    asked = {match: placement.choose(agreed, centres, sizes, axes, (1.0, 0.0, 0.0), True, match, focal=focal, agreement=0.2)
             for match, focal in (("anatomy", True), ("finding", False))}
    assert asked["anatomy"].shown == "anatomy" and asked["finding"].shown == "look-alike"
    try:
        placement.choose(agreed, centres, sizes, axes, (1.0, 0.0, 0.0), True, "organ")
    except ValueError as error:
        assert "auto, finding, anatomy" in str(error)
    else:
        raise AssertionError("an unknown intent must be refused")


def test_a_place_outside_the_field_of_view_shows_the_look_alike_and_says_so():
    agreed, centres, sizes, axes = _items()
    for match in placement.MATCH_INTENTS:
        choice = placement.choose(agreed, centres, sizes, axes, (1.0, 0.0, 300.0), False, match)
        assert choice.shown == "look-alike" and not choice.in_view and choice.anatomy_ras is None
        assert choice.note == placement.NOT_IN_VIEW and np.allclose(choice.focus_ras, centres[1])


def test_a_rejected_registration_shows_the_look_alike_within_the_level_window():
    agreed, centres, sizes, axes = _items()
    window = np.array([True, False, True])  # the 100 mm look-alike lies at another level
    choice = placement.choose(agreed, centres, sizes, axes, (1.0, 0.0, 0.0), True, "auto", rejected=True, level_items=window)
    assert choice.shown == "look-alike" and choice.item == 2 and np.allclose(choice.focus_ras, centres[2])
    assert choice.note == placement.REJECTED and np.allclose(choice.look_alike_ras, centres[1])


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


def test_of_two_starts_the_registration_in_the_level_window_that_agrees_better_is_kept():
    def where(s_mm: float, agreement: float, context: float = 0.5) -> registration.Placement:
        return registration.Placement((0.0, 0.0, s_mm), "local", 0.0, 0.1, agreement, context)

    window = registration.LevelWindow(0.0, 30.0, 1.0, (0.0, 0.0, 0.0))
    level, whole = where(5.0, 0.6), where(12.0, 0.8)
    assert placement.better([level, whole]).ras == whole.ras  # no window: the better agreeing
    kept = placement.better([level, whole], window)
    assert kept.ras == whole.ras and kept.within_window is True
    far = where(80.0, 0.95)  # agrees best, but 80 mm from the level the body coordinate allows
    kept = placement.better([level, far], window)
    assert kept.ras == level.ras and kept.within_window is True
    alone = placement.better([far], window)  # nothing else: kept, but said to lie outside the window (then rejected)
    assert alone.within_window is False and placement.rejected(alone)
    # a slice query measures no box agreement: the neighbourhood's agreement decides
    unboxed = [where(5.0, float("nan"), 0.2), where(10.0, float("nan"), 0.7)]
    assert placement.better(unboxed, window).ras == (0.0, 0.0, 10.0)


def test_a_fine_series_gives_the_registration_grid_of_a_coarse_one():
    """The 4 mm grid of the phantom sampled at 0.8 x 0.8 x 1 mm (block means, then a Gaussian for the width left) lies
    where the 2 x 2 x 2.5 mm sampling's does and shows the same: 1.6 HU apart on average today; the fine series merely
    point-sampled at 4 mm is 9.3 HU off."""
    import SimpleITK as sitk

    fine_shape, fine_spacing = (150, 150, 110), (0.8, 0.8, 1.0)
    coarse = registration.coarse_image(synthetic.render(synthetic.centered_matrix(SHAPE, SPACING), SHAPE))
    fine_volume = synthetic.render(synthetic.centered_matrix(fine_shape, fine_spacing), fine_shape)
    fine = registration.coarse_image(fine_volume)
    assert fine.GetSize() == coarse.GetSize() == (30, 30, 28)
    assert np.allclose(fine.GetOrigin(), coarse.GetOrigin(), atol=0.01)  # both centred on the same 4 mm grid
    reference = sitk.GetArrayFromImage(coarse).astype(np.float64)
    apart = np.mean(np.abs(sitk.GetArrayFromImage(fine) - reference))
    sampled = sitk.Resample(fine_volume.to_sitk(fine_volume.finite_float32()), coarse, sitk.Transform(), sitk.sitkLinear, -1000.0)
    assert apart < 4.0 < np.mean(np.abs(sitk.GetArrayFromImage(sampled) - reference)), apart


def test_the_level_start_is_registered_only_where_it_could_change_the_answer(monkeypatch):
    """The whole-volume start runs first; the level start too only where it starts 15 mm or more away from it and the
    whole-volume answer does not already agree with the box (>= 0.95)."""
    from CBIRSlicerLib.retrieval import result_registration as rr

    original, copy, rotation, shift = _moved_copy(7.0, (9.0, -6.0, 5.0))
    point = np.array([12.0, -8.0, 6.0])
    query = rr.QueryGrid.of(original, None)
    target = rr.ResultGrid.of(copy, None)
    window = registration.LevelWindow(0.0, float("inf"), 1.0, tuple(point))
    places = []
    real_place = registration.place
    monkeypatch.setattr(registration, "place", lambda *a, **k: places.append(a) or real_place(*a, **k))

    def level_start(offset_mm: float):
        def start(*_):
            import SimpleITK as sitk

            return sitk.TranslationTransform(3, (0.0, 0.0, offset_mm))
        return start

    def placed(offset_mm: float, keep: float) -> registration.Placement:
        places.clear()
        query.global_transforms.clear()
        monkeypatch.setattr(levels, "level_transform", level_start(offset_mm))
        monkeypatch.setattr(rr, "KEEP_WHOLE_VOLUME_AGREEMENT", keep)
        return rr.register_point(query, target, "copy", point, 30.0, window)

    agreed = placed(60.0, 0.95)  # a level start 60 mm off, but the whole-volume answer agrees: it alone
    assert len(places) == 1 and agreed.agreement >= 0.95
    truth = np.linalg.solve(rotation, point - shift)
    assert np.linalg.norm(np.array(agreed.ras) - truth) < 3.0
    both = placed(60.0, 1.1)  # nothing agrees enough: both run, the better agreeing kept (the whole-volume one)
    assert len(places) == 2 and np.allclose(both.ras, agreed.ras, atol=0.1)
    whole = registration.carry(query.global_transforms["copy"], point)
    unmoved = registration.carry(level_start(0.0)(), point)  # the identity: where that level start puts the point
    assert 8.0 < np.linalg.norm(unmoved - whole) < rr.SAME_START_MM  # the copy moved ~11 mm: the starts are alike
    placed(0.0, 1.1)  # a level start within 15 mm of the whole-volume one: the local stage would end alike
    assert len(places) == 1
