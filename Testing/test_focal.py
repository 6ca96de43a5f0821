"""A focal finding stands out from the tissue around it on every side; an organ or a tube does not."""

from __future__ import annotations

import numpy as np

from CBIRSlicerLib.imaging import synthetic
from CBIRSlicerLib.imaging.focal import FOCAL_MIN, focality
from CBIRSlicerLib.imaging.roi import RoiBox
from CBIRSlicerLib.imaging.volume import Volume

SHAPE, SPACING = (64, 64, 64), (1.5, 1.5, 1.5)


def _volume(values) -> Volume:
    """A CT-like volume from a function of RAS points (a 96 mm cube centred on the origin, with noise)."""
    matrix = synthetic.centered_matrix(SHAPE, SPACING)
    k, j, i = np.mgrid[0:SHAPE[2], 0:SHAPE[1], 0:SHAPE[0]]
    ras = np.stack([i, j, k], axis=-1) @ matrix[:3, :3].T + matrix[:3, 3]
    noise = np.random.default_rng(0).normal(0.0, 8.0, ras.shape[:-1])
    return Volume.from_array((values(ras) + noise).astype(np.float32), matrix)


def test_a_ball_in_tissue_is_focal_even_against_a_wall_but_a_tube_and_a_border_are_not():
    def ball(ras, centre=(0.0, 0.0, 0.0)):
        return np.where(np.linalg.norm(ras - np.array(centre), axis=-1) <= 8.0, 120.0, 40.0)

    box = RoiBox((0.0, 0.0, 0.0), (20.0, 20.0, 20.0))
    assert focality(_volume(ball), box).contrast > 3 * FOCAL_MIN
    # against a wall: one side of the ball is other tissue (a tumour on the pleura)
    assert focality(_volume(lambda ras: np.where(ras[..., 0] > 14.0, -100.0, ball(ras))), box).focal
    # a tube along S (the cord): the tissue continues above and below the box
    tube = _volume(lambda ras: np.where(np.linalg.norm(ras[..., :2], axis=-1) <= 8.0, 120.0, 40.0))
    assert focality(tube, box).contrast < FOCAL_MIN
    # an organ box at a border between two tissues
    border = _volume(lambda ras: np.where(ras[..., 1] > 0.0, 120.0, 40.0))
    assert not focality(border, box).focal


def test_padding_outside_the_stored_region_is_not_tissue():
    # A ball in tissue, stored only within 11 mm of its centre (exactly -1000 beyond, as the OpenKBP CTs hold it): the
    # columns fall in the padding and are left out; with fewer than four columns there is nothing to tell. Without the
    # padding rule the columns would read -1000 all round and make the ball look focal.
    volume = _volume(lambda ras: np.where(np.linalg.norm(ras, axis=-1) <= 8.0, 120.0, 40.0))
    matrix = volume.ijk_to_ras
    k, j, i = np.mgrid[0:SHAPE[2], 0:SHAPE[1], 0:SHAPE[0]]
    ras = np.stack([i, j, k], axis=-1) @ matrix[:3, :3].T + matrix[:3, 3]
    padded = np.where(np.linalg.norm(ras, axis=-1) <= 11.0, volume.array, -1000.0).astype(np.float32)
    assert focality(Volume.from_array(padded, matrix), RoiBox((0.0, 0.0, 0.0), (20.0, 20.0, 20.0))) is None
