"""Blob detection: where compact objects sit in a slice, bright or dark, and not on edges or lines."""

import numpy as np

from CBIRSlicerLib.imaging.blobs import detect_blobs, gaussian_blur


def disc_image(shape=(96, 96), background=0.5, discs=(), noise=0.0, seed=0):
    """A grey image in [0, 1] with discs given as (row, col, radius_px, value)."""
    rows, cols = np.mgrid[0:shape[0], 0:shape[1]]
    image = np.full(shape, background)
    for r, c, radius, value in discs:
        image[np.hypot(rows - r, cols - c) <= radius] = value
    image += np.random.default_rng(seed).normal(0, noise, shape)
    return np.clip(image, 0, 1)


def test_gaussian_blur_keeps_the_mean_and_spreads_a_point_with_the_right_width():
    point = np.zeros((41, 41))
    point[20, 20] = 1.0
    blurred = gaussian_blur(point, 3.0)
    assert abs(blurred.sum() - 1.0) < 1e-9
    rows, cols = np.mgrid[0:41, 0:41]
    variance = (blurred * (rows - 20) ** 2).sum()
    assert 8.6 < variance < 9.0  # sigma 3 px; the taps stop at 3 sigma, which trims the variance by about 1.6 %


def test_bright_and_dark_discs_are_found_at_their_centres_and_sizes_strongest_first():
    # 2 mm pixels: a bright disc of radius 5 px (10 mm) and a dark, lower-contrast one of radius 4 px (8 mm), in noise.
    image = disc_image(discs=[(30, 30, 5, 0.95), (65, 60, 4, 0.40)], noise=0.025)
    blobs = detect_blobs(image, 2.0, count=2)
    assert len(blobs) == 2
    bright, dark = blobs
    assert bright.response > dark.response
    assert abs(bright.row - 30) <= 1 and abs(bright.col - 30) <= 1
    assert abs(dark.row - 65) <= 1 and abs(dark.col - 60) <= 1
    assert 5.7 <= bright.radius_mm <= 11.3 and 4.0 <= dark.radius_mm <= 11.3


def test_an_edge_and_a_line_are_not_blobs_but_a_faint_disc_beside_them_is():
    with_edge = disc_image(discs=[(48, 70, 5, 0.40)])
    with_edge[:, :20] = 0.0  # a strong straight edge, as air against the body
    with_line = disc_image(discs=[(48, 70, 5, 0.40)])
    with_line[80:82, :] = 1.0  # a bright line across the slice, four times the disc's contrast
    for image in (with_edge, with_line):
        blobs = detect_blobs(image, 2.0, count=1)
        assert [(b.row, b.col) for b in blobs] == [(48, 70)]


def test_nothing_is_found_in_a_flat_image_and_count_zero_asks_for_nothing():
    assert detect_blobs(np.full((64, 64), 0.5), 2.0, count=5) == []
    assert detect_blobs(disc_image(discs=[(30, 30, 5, 0.95)]), 2.0, count=0) == []


def test_the_fast_blur_and_shape_test_give_the_textbook_sums():
    # The blur pairs symmetric taps and the shape test looks only at candidates; both must equal the plain formulas:
    # an edge-padded sum over every tap, and second differences of the whole image (0 on its border).
    from CBIRSlicerLib.imaging.blobs import EDGE_RATIO, _blob_like

    image = np.random.default_rng(3).random((37, 52))
    sigma = 2.5
    radius = int(np.ceil(3 * sigma))
    taps = np.exp(-np.arange(-radius, radius + 1) ** 2 / (2 * sigma ** 2))
    taps /= taps.sum()
    padded = np.pad(image, radius, mode="edge")
    vertical = sum(w * padded[n:n + 37, :] for n, w in enumerate(taps))
    assert np.allclose(gaussian_blur(image, sigma), sum(w * vertical[:, n:n + 52] for n, w in enumerate(taps)), atol=1e-14)
    dog = gaussian_blur(image, 1.0) - gaussian_blur(image, 1.5)
    dyy, dxx, dxy = (np.zeros_like(dog) for _ in range(3))
    dyy[1:-1] = dog[2:] - 2 * dog[1:-1] + dog[:-2]
    dxx[:, 1:-1] = dog[:, 2:] - 2 * dog[:, 1:-1] + dog[:, :-2]
    dxy[1:-1, 1:-1] = (dog[2:, 2:] - dog[2:, :-2] - dog[:-2, 2:] + dog[:-2, :-2]) / 4
    determinant = dxx * dyy - dxy ** 2
    expected = (determinant > 0) & ((dxx + dyy) ** 2 < determinant * (EDGE_RATIO + 1) ** 2 / EDGE_RATIO)
    rows, cols = np.nonzero(np.ones(dog.shape, bool))
    assert 0 < expected.sum() < expected.size and np.array_equal(_blob_like(dog, rows, cols), expected.ravel())
