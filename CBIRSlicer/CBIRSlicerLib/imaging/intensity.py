"""From raw voxel values to display/model intensities: CT windows and robust percentile scaling.

A window is chosen once per volume (never per slice) so every image of a volume, and every
volume of a modality, maps intensities the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import ParameterError
from .volume import Volume

# CT presets as (width, level) in Hounsfield units; the usual radiology reading windows.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "soft-tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (1800.0, 400.0),
    "brain": (80.0, 40.0),
}
DEFAULT_CT_PRESET = "soft-tissue"
PERCENTILES = (0.5, 99.5)
# Percentiles are estimated on at most this many voxels (an even stride through the volume).
_SAMPLE_VOXELS = 2_000_000


@dataclass(frozen=True)
class Window:
    """A linear intensity mapping: ``lower`` maps to 0 and ``upper`` to 1, clipped."""

    lower: float
    upper: float
    name: str = "custom"

    @classmethod
    def from_width_level(cls, width: float, level: float, name: str = "custom") -> Window:
        """A window from its width and level (centre), as CT viewers state them."""
        if not width > 0:
            raise ParameterError(f"window width must be positive, got {width}")
        return cls(level - width / 2, level + width / 2, name)

    @property
    def width(self) -> float:
        """Upper minus lower."""
        return self.upper - self.lower

    @property
    def level(self) -> float:
        """Centre of the window."""
        return (self.upper + self.lower) / 2

    def describe(self) -> str:
        """Short text such as 'soft-tissue W400/L40'."""
        return f"{self.name} W{self.width:.4g}/L{self.level:.4g}"

    def as_dict(self) -> dict:
        """JSON form."""
        return {"name": self.name, "lower": float(self.lower), "upper": float(self.upper)}


def _sample(volume: Volume) -> np.ndarray:
    """Finite voxel values, subsampled by a fixed stride so large volumes stay fast and results repeatable."""
    flat = np.asarray(volume.array).reshape(-1)
    step = max(1, flat.size // _SAMPLE_VOXELS)
    values = flat[::step].astype(np.float64)
    return values[np.isfinite(values)]


def looks_like_ct(volume: Volume) -> bool:
    """Whether a volume is CT: by its DICOM modality when known, else by a Hounsfield-range check."""
    if volume.modality:
        return volume.modality.upper() == "CT"
    values = _sample(volume)
    if values.size == 0:
        return False
    # CT holds air (about -1000 HU, or padding down to -3024) in a real share of its voxels, and
    # nothing beyond the HU scale; MR and most other images have no such negative values.
    air = np.mean(values <= -900)
    return bool(air >= 0.01 and values.min() >= -4100 and values.max() <= 32767)


PADDING_SHARE = 0.01  # a lowest value held by at least this share of the voxels is padding, not tissue


def padding_value(volume: Volume) -> float | None:
    """The volume's padding value: its lowest value when at least PADDING_SHARE of the voxels hold exactly it (outside
    a scanner's field of view, a stored region's outside, an MR's zero background); None when there is none."""
    sample = _sample(volume)
    lowest = sample.min()
    return float(lowest) if np.count_nonzero(sample == lowest) >= PADDING_SHARE * sample.size else None


def percentile_window(volume: Volume, percentiles: tuple[float, float] = PERCENTILES) -> Window:
    """Robust window from the 0.5th to 99.5th percentile of the volume's finite voxels."""
    values = _sample(volume)
    if values.size == 0:
        return Window(0.0, 1.0, "percentile")
    lower, upper = np.percentile(values, percentiles)
    if upper <= lower:  # constant (or nearly constant) volume
        lower, upper = float(values.min()), float(values.max())
        if upper <= lower:
            upper = lower + 1.0
    return Window(float(lower), float(upper), "percentile")


def parse_window(text: str) -> str | tuple[float, float]:
    """Parse a --window value: 'auto', 'percentile', a preset name, or 'W,L' numbers."""
    text = text.strip().lower()
    if text in ("auto", "percentile") or text in CT_PRESETS:
        return text
    parts = text.split(",")
    if len(parts) == 2:
        try:
            width, level = float(parts[0]), float(parts[1])
        except ValueError:
            pass
        else:
            Window.from_width_level(width, level)  # validates the width
            return width, level
    names = ", ".join(["auto", "percentile", *CT_PRESETS])
    raise ParameterError(f"window '{text}' is not one of {names}, nor W,L numbers such as 400,40")


def choose_window(volume: Volume, spec: str | tuple[float, float] = "auto") -> Window:
    """The window for a volume: a preset, custom W/L, percentile scaling, or 'auto' (CT preset for CT, else percentile)."""
    if isinstance(spec, str):
        spec = parse_window(spec)
    if isinstance(spec, tuple):
        return Window.from_width_level(*spec)
    if spec == "auto":
        spec = DEFAULT_CT_PRESET if looks_like_ct(volume) else "percentile"
    if spec == "percentile":
        return percentile_window(volume)
    return Window.from_width_level(*CT_PRESETS[spec], name=spec)


def apply_window(pixels: np.ndarray, window: Window) -> np.ndarray:
    """Map raw values to float32 in [0, 1]; NaN becomes 0, infinities clip to the ends."""
    width = window.width if window.width > 0 else 1.0
    scaled = (np.asarray(pixels, dtype=np.float32) - np.float32(window.lower)) / np.float32(width)
    return np.clip(np.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)


def to_uint8_rgb(pixels: np.ndarray, window: Window) -> np.ndarray:
    """Windowed grey image as (rows, cols, 3) uint8, the form PNG files and thumbnails take."""
    grey = np.round(apply_window(pixels, window) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)
