"""Windows: presets, automatic choice by modality or Hounsfield range, percentile scaling, output forms."""

from __future__ import annotations

import numpy as np
import pytest

from CBIRSlicerLib.errors import ParameterError
from CBIRSlicerLib.imaging import intensity
from CBIRSlicerLib.imaging.volume import Volume


def _volume(array, modality=None):
    return Volume.from_array(np.asarray(array), np.eye(4), modality=modality)


def test_presets_have_the_reading_room_values():
    soft = intensity.choose_window(_volume(np.zeros((2, 2, 2))), "soft-tissue")
    assert (soft.lower, soft.upper) == (-160.0, 240.0)
    lung = intensity.choose_window(_volume(np.zeros((2, 2, 2))), "lung")
    assert (lung.lower, lung.upper) == (-1350.0, 150.0)
    custom = intensity.choose_window(_volume(np.zeros((2, 2, 2))), "80,40")
    assert (custom.lower, custom.upper, custom.name) == (0.0, 80.0, "custom")


def test_auto_uses_the_ct_preset_for_ct_and_percentiles_otherwise():
    rng = np.random.default_rng(0)
    ct_like = rng.integers(-1024, 1500, size=(10, 20, 20)).astype(np.int16)
    assert intensity.choose_window(_volume(ct_like)).name == "soft-tissue"  # Hounsfield-range check
    mr_like = rng.integers(0, 1200, size=(10, 20, 20)).astype(np.int16)
    assert intensity.choose_window(_volume(mr_like)).name == "percentile"
    # The DICOM modality wins over the check, both ways.
    assert intensity.choose_window(_volume(mr_like, "CT")).name == "soft-tissue"
    assert intensity.choose_window(_volume(ct_like, "MR")).name == "percentile"


def test_percentile_window_is_robust_to_outliers():
    values = np.arange(100_000, dtype=np.float32).reshape(10, 100, 100)
    values[0, 0, 0] = 1e9  # a hot pixel must not stretch the window
    window = intensity.percentile_window(_volume(values))
    assert window.lower == pytest.approx(500.0, abs=1.0)
    assert window.upper == pytest.approx(99_500.0, abs=1.0)


def test_to_uint8_rgb_maps_the_window_linearly():
    window = intensity.Window(0.0, 100.0)
    rgb = intensity.to_uint8_rgb(np.array([[-50.0, 0.0, 50.0, 100.0, 400.0]]), window)
    assert rgb.shape == (1, 5, 3) and rgb.dtype == np.uint8
    assert rgb[0, :, 0].tolist() == [0, 0, 128, 255, 255]
    assert np.array_equal(rgb[..., 0], rgb[..., 2])


@pytest.mark.parametrize("array", [np.full((3, 3, 3), 7.0), np.full((3, 3, 3), np.nan), np.array([[[np.inf, -np.inf, 1.0]]])])
def test_degenerate_volumes_give_a_usable_window(array):
    window = intensity.choose_window(_volume(array))
    assert window.upper > window.lower
    out = intensity.to_uint8_rgb(array[0], window)
    assert out.dtype == np.uint8


def test_nan_pixels_map_to_black():
    rgb = intensity.to_uint8_rgb(np.array([[np.nan, np.inf, -np.inf]]), intensity.Window(0.0, 1.0))
    assert rgb[0, :, 0].tolist() == [0, 255, 0]


@pytest.mark.parametrize("text", ["sharp", "400", "0,40", "-5,10", "a,b"])
def test_bad_window_names_are_parameter_errors(text):
    with pytest.raises(ParameterError):
        intensity.parse_window(text)
