"""2D images along the patient axes, ROI crops and montages, each knowing where it came from.

Every axis has a fixed view frame (the screen-right, screen-down and normal directions in
RAS), the same as Slicer's Red (axial), Green (coronal) and Yellow (sagittal) views, so an
image looks the same whatever order and direction the volume was stored in. Images are
resampled with SimpleITK onto a grid of planes perpendicular to the patient axis:

* For volumes whose axes are (up to sign and order) the patient axes, the planes are the
  volume's own voxel planes, so values are the stored voxels (no interpolation along the
  normal) and ``slice_index`` is exact.
* Oblique volumes are resliced onto true patient-axis planes, as Slicer shows them by
  default; ``slice_index`` is then the voxel index (along the voxel axis nearest the
  normal) of the image centre, rounded.

In-plane pixels are square, with the smaller of the two in-plane voxel sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..errors import GeometryError, ParameterError
from .coordinates import RAS_TO_LPS, ras_to_lps
from .roi import RoiBox
from .volume import Volume

AXES = ("axial", "coronal", "sagittal")
MAX_MARGIN_MM = 100.0  # context around an ROI crop: more is the whole slice, which a slice query asks for

# (screen right, screen down, normal) in RAS for each axis: Slicer's slice-view orientation
# presets (vtkMRMLSliceNode), with "down" the opposite of the view's up direction.
VIEW_FRAMES: dict[str, tuple[tuple[float, float, float], ...]] = {
    "axial": ((-1.0, 0.0, 0.0), (0.0, -1.0, 0.0), (0.0, 0.0, 1.0)),
    "coronal": ((-1.0, 0.0, 0.0), (0.0, 0.0, -1.0), (0.0, 1.0, 0.0)),
    "sagittal": ((0.0, -1.0, 0.0), (0.0, 0.0, -1.0), (1.0, 0.0, 0.0)),
}


def check_axis(axis: str) -> str:
    """Return the axis name if known, else raise ParameterError."""
    if axis not in VIEW_FRAMES:
        raise ParameterError(f"unknown axis '{axis}'; expected one of {', '.join(AXES)}")
    return axis


@dataclass(frozen=True)
class SliceGrid:
    """Planes perpendicular to one patient axis that cover a volume: origin, pixel and plane spacing, sizes."""

    axis: str
    origin: tuple[float, float, float]  # RAS centre of pixel (row 0, column 0) on plane 0
    pixel_mm: float
    plane_mm: float
    rows: int
    cols: int
    planes: int
    voxel_axis: int  # 0, 1, 2 for the i, j, k axis nearest the normal

    @property
    def frame(self) -> np.ndarray:
        """Rows: the RAS unit vectors of increasing column, increasing row, increasing plane."""
        return np.array(VIEW_FRAMES[self.axis])

    def to_ras(self, plane, row, col) -> np.ndarray:
        """RAS position of a (plane, row, column) grid point; arguments may be arrays."""
        right, down, normal = self.frame
        offsets = (np.multiply.outer(np.asarray(col, float) * self.pixel_mm, right)
                   + np.multiply.outer(np.asarray(row, float) * self.pixel_mm, down)
                   + np.multiply.outer(np.asarray(plane, float) * self.plane_mm, normal))
        return np.asarray(self.origin) + offsets


@dataclass(eq=False)
class SliceImage:
    """One 2D image (raw intensities, float32) and where every pixel of it lies in RAS."""

    pixels: np.ndarray
    axis: str
    slice_index: int
    plane: int
    origin: np.ndarray  # RAS centre of pixel (0, 0)
    pixel_mm: float
    kind: str = "slice"  # "slice" (whole plane) or "crop" (part of it)
    box: tuple[int, int, int, int] = (0, 0, 0, 0)  # row0, col0, row1, col1 (exclusive) in the full plane

    @property
    def right(self) -> np.ndarray:
        """RAS direction of increasing column."""
        return np.array(VIEW_FRAMES[self.axis][0])

    @property
    def down(self) -> np.ndarray:
        """RAS direction of increasing row."""
        return np.array(VIEW_FRAMES[self.axis][1])

    @property
    def normal(self) -> np.ndarray:
        """RAS direction of increasing plane position."""
        return np.array(VIEW_FRAMES[self.axis][2])

    def pixel_to_ras(self, row, col) -> np.ndarray:
        """RAS position of a pixel centre (row, column may be fractional)."""
        return np.asarray(self.origin) + float(col) * self.pixel_mm * self.right + float(row) * self.pixel_mm * self.down

    def ras_to_pixel(self, ras) -> tuple[float, float]:
        """Continuous (row, column) of a RAS point projected onto this image."""
        delta = np.asarray(ras, float) - np.asarray(self.origin)
        return float(delta @ self.down / self.pixel_mm), float(delta @ self.right / self.pixel_mm)

    @property
    def ras(self) -> np.ndarray:
        """RAS position of the image centre."""
        rows, cols = self.pixels.shape
        return self.pixel_to_ras((rows - 1) / 2, (cols - 1) / 2)

    def bounds_ras(self) -> tuple[np.ndarray, np.ndarray]:
        """Minimum and maximum RAS corners of the pixel centres."""
        rows, cols = self.pixels.shape
        corners = np.array([self.pixel_to_ras(r, c) for r in (0, rows - 1) for c in (0, cols - 1)])
        return corners.min(axis=0), corners.max(axis=0)

    def describe(self) -> dict:
        """Plain JSON-ready description: axis, slice index, RAS centre, size, pixel size, box."""
        return {
            "axis": self.axis,
            "slice_index": int(self.slice_index),
            "ras": [round(float(v), 4) for v in self.ras],
            "kind": self.kind,
            "size": [int(n) for n in self.pixels.shape],
            "pixel_mm": round(float(self.pixel_mm), 6),
            "box": [int(v) for v in self.box],
        }


@dataclass(eq=False)
class Montage:
    """Several evenly spaced slices tiled row by row into one image."""

    pixels: np.ndarray
    axis: str
    layout: tuple[int, int]  # grid rows, grid columns
    tiles: list[SliceImage] = field(default_factory=list)

    @property
    def slice_index(self) -> int:
        """Slice index of the middle tile, the montage's representative slice."""
        return self.tiles[len(self.tiles) // 2].slice_index

    @property
    def ras(self) -> np.ndarray:
        """Centre of the tiled region: the mean of the first and last tile centres."""
        return (self.tiles[0].ras + self.tiles[-1].ras) / 2

    def describe(self) -> dict:
        """Plain JSON-ready description, with every tile's slice index and RAS centre."""
        return {
            "axis": self.axis,
            "slice_index": int(self.slice_index),
            "ras": [round(float(v), 4) for v in self.ras],
            "kind": "montage",
            "size": [int(n) for n in self.pixels.shape],
            "layout": list(self.layout),
            "tiles": [{"slice_index": int(t.slice_index), "ras": [round(float(v), 4) for v in t.ras]} for t in self.tiles],
        }


def plan_grid(volume: Volume, axis: str) -> SliceGrid:
    """The planes perpendicular to ``axis`` that cover the volume, on its voxel planes when it is not oblique."""
    right, down, normal = np.array(VIEW_FRAMES[check_axis(axis)])
    alignment = np.abs(volume.directions.T @ normal)
    voxel_axis = int(np.argmax(alignment))
    in_plane = [a for a in range(3) if a != voxel_axis]
    pixel_mm = float(min(volume.spacing[in_plane]))
    plane_mm = float(volume.spacing[voxel_axis])
    corners = volume.corners_ras()
    low = np.array([(corners @ e).min() for e in (right, down, normal)])
    high = np.array([(corners @ e).max() for e in (right, down, normal)])
    # The tolerance keeps float noise from dropping the last voxel plane.
    cols, rows = (int(math.floor((high[i] - low[i]) / pixel_mm + 1e-4)) + 1 for i in (0, 1))
    planes = int(math.floor((high[2] - low[2]) / plane_mm + 1e-4)) + 1
    origin = low[0] * right + low[1] * down + low[2] * normal
    return SliceGrid(axis, tuple(float(v) for v in origin), pixel_mm, plane_mm, rows, cols, planes, voxel_axis)


def _interval(box: RoiBox, direction: np.ndarray) -> tuple[float, float]:
    """Projection of an axis-aligned box onto a direction."""
    a, b = box.low * direction, box.high * direction
    return float(np.minimum(a, b).sum()), float(np.maximum(a, b).sum())


def _index_range(low_mm: float, high_mm: float, start_mm: float, step_mm: float, count: int, what: str) -> tuple[int, int]:
    """Indices (first, last inclusive) of grid points inside [low, high]; the nearest one for a region thinner than a step."""
    eps = 1e-6
    first = max(0, math.ceil((low_mm - start_mm) / step_mm - eps))
    last = min(count - 1, math.floor((high_mm - start_mm) / step_mm + eps))
    if first <= last:
        return first, last
    centre = ((low_mm + high_mm) / 2 - start_mm) / step_mm
    if -0.5 <= centre <= count - 0.5 and high_mm - low_mm < step_mm:
        nearest = int(min(count - 1, max(0, round(centre))))
        return nearest, nearest
    raise GeometryError(f"the ROI lies outside the volume along {what}")


def planes_in(grid: SliceGrid, roi: RoiBox | None = None) -> tuple[int, int]:
    """First and last plane (inclusive) that an ROI spans, or all planes."""
    if roi is None:
        return 0, grid.planes - 1
    normal = grid.frame[2]
    low, high = _interval(roi, normal)
    return _index_range(low, high, float(np.dot(grid.origin, normal)), grid.plane_mm, grid.planes, f"the {grid.axis} normal")


def crop_box(grid: SliceGrid, roi: RoiBox, margin_mm: float = 0.0) -> tuple[int, int, int, int]:
    """Rows and columns (row0, col0, row1, col1; ends exclusive) of the pixels inside an ROI plus a margin."""
    if not (math.isfinite(margin_mm) and 0 <= margin_mm <= MAX_MARGIN_MM):
        raise ParameterError(f"the margin around an ROI must be 0 to {MAX_MARGIN_MM:g} mm, not {margin_mm} mm")
    right, down, _ = grid.frame
    boxes = []
    for direction, count, name in ((down, grid.rows, "rows"), (right, grid.cols, "columns")):
        low, high = _interval(roi, direction)
        start = float(np.dot(grid.origin, direction))
        boxes.append(_index_range(low - margin_mm, high + margin_mm, start, grid.pixel_mm, count, f"the {grid.axis} {name}"))
    (r0, r1), (c0, c1) = boxes
    return r0, c0, r1 + 1, c1 + 1


def select_planes(grid: SliceGrid, roi: RoiBox | None = None, stride_mm: float | None = None,
                  stride: int | None = None) -> list[int]:
    """Planes to extract: those the ROI spans (or all), every ``stride`` planes or every ``stride_mm`` millimetres."""
    first, last = planes_in(grid, roi)
    if stride_mm is not None and stride is not None:
        raise ParameterError("give a stride in millimetres or in slices, not both")
    step = 1
    if stride_mm is not None:
        if not stride_mm > 0:
            raise ParameterError(f"stride must be positive, got {stride_mm} mm")
        step = max(1, round(stride_mm / grid.plane_mm))
    elif stride is not None:
        if stride < 1:
            raise ParameterError(f"stride must be at least 1 slice, got {stride}")
        step = int(stride)
    return list(range(first, last + 1, step))


def fill_value(volume: Volume) -> float:
    """Value for pixels outside the volume: its smallest finite voxel (air in CT, background in MR)."""
    data = np.asarray(volume.array)
    finite = data[np.isfinite(data)] if data.dtype.kind == "f" else data
    return float(finite.min()) if finite.size else 0.0


class Resampler:
    """Resamples planes of one volume; converts the volume to a float SimpleITK image once."""

    def __init__(self, volume: Volume):
        self.volume = volume
        self.image = volume.to_sitk(volume.finite_float32())
        self.fill = fill_value(volume)

    def planes(self, grid: SliceGrid, planes: list[int], box: tuple[int, int, int, int] | None = None) -> np.ndarray:
        """Pixels (len(planes), rows, cols) of the given planes, restricted to a (row0, col0, row1, col1) box."""
        r0, c0, r1, c1 = box or (0, 0, grid.rows, grid.cols)
        if not planes:
            return np.zeros((0, r1 - r0, c1 - c0), np.float32)
        steps = np.diff(planes)
        if len(planes) == 1 or np.all(steps == steps[0]):
            return self._run(grid, planes[0], int(steps[0]) if len(steps) else 1, len(planes), r0, c0, r1, c1)
        return np.concatenate([self._run(grid, p, 1, 1, r0, c0, r1, c1) for p in planes])

    def _run(self, grid: SliceGrid, first: int, step: int, count: int, r0: int, c0: int, r1: int, c1: int) -> np.ndarray:
        """One SimpleITK resample onto a regular block of the grid."""
        import SimpleITK as sitk

        direction_lps = RAS_TO_LPS @ grid.frame.T  # columns: right, down, normal in LPS
        reference = sitk.Image([c1 - c0, r1 - r0, count], sitk.sitkFloat32)
        reference.SetSpacing((grid.pixel_mm, grid.pixel_mm, grid.plane_mm * step))
        reference.SetDirection(tuple(direction_lps.ravel()))
        reference.SetOrigin(tuple(ras_to_lps(grid.to_ras(first, r0, c0))))
        output = sitk.Resample(self.image, reference, sitk.Transform(), sitk.sitkLinear, self.fill, sitk.sitkFloat32)
        return sitk.GetArrayFromImage(output)  # [plane, row, col]


def _slice_index(volume: Volume, grid: SliceGrid, centre_ras: np.ndarray) -> int:
    """Voxel index along the voxel axis nearest the normal, at an image centre (exact for non-oblique volumes)."""
    ijk = volume.ras_to_ijk_points(centre_ras)
    count = volume.shape_ijk[grid.voxel_axis]
    return int(min(count - 1, max(0, round(float(ijk[grid.voxel_axis])))))


def _images(volume: Volume, grid: SliceGrid, planes: list[int], box: tuple[int, int, int, int] | None,
            resampler: Resampler | None) -> list[SliceImage]:
    """SliceImages for chosen planes of a grid, cropped to a pixel box when one is given."""
    full = (0, 0, grid.rows, grid.cols)
    box = box or full
    stack = (resampler or Resampler(volume)).planes(grid, planes, box)
    images = []
    for plane, pixels in zip(planes, stack):
        image = SliceImage(pixels, grid.axis, 0, plane, grid.to_ras(plane, box[0], box[1]), grid.pixel_mm,
                           "slice" if box == full else "crop", box)
        image.slice_index = _slice_index(volume, grid, image.ras)
        images.append(image)
    return images


def extract_slices(
    volume: Volume,
    axis: str = "axial",
    roi: RoiBox | None = None,
    crop: bool = True,
    margin_mm: float = 0.0,
    stride_mm: float | None = None,
    stride: int | None = None,
    grid: SliceGrid | None = None,
    resampler: Resampler | None = None,
) -> list[SliceImage]:
    """Images along a patient axis (all, or the ones an ROI spans, cropped to it unless ``crop`` is False)."""
    grid = grid or plan_grid(volume, axis)
    planes = select_planes(grid, roi, stride_mm, stride)
    box = crop_box(grid, roi, margin_mm) if roi is not None and crop else None
    return _images(volume, grid, planes, box, resampler)


def parse_layout(text: str) -> tuple[int, int]:
    """Parse a montage grid 'RxC' (for example '4x4')."""
    parts = text.lower().replace(" ", "").split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ParameterError(f"montage grid '{text}' must look like RxC, for example 4x4")
    return int(parts[0]), int(parts[1])


def montage_planes(first: int, last: int, count: int) -> list[int]:
    """Up to ``count`` distinct planes evenly spaced from first to last (inclusive)."""
    available = last - first + 1
    if available <= count:
        return list(range(first, last + 1))
    return sorted({int(round(v)) for v in np.linspace(first, last, count)})


def make_montage(
    volume: Volume,
    axis: str = "axial",
    layout: tuple[int, int] = (4, 4),
    roi: RoiBox | None = None,
    crop: bool = True,
    margin_mm: float = 0.0,
    resampler: Resampler | None = None,
) -> Montage:
    """Tile R x C evenly spaced slices of a volume (or of an ROI) into one image, row by row; spare tiles stay empty."""
    grid_rows, grid_cols = layout
    grid = plan_grid(volume, axis)
    first, last = planes_in(grid, roi)
    box = crop_box(grid, roi, margin_mm) if roi is not None and crop else None
    resampler = resampler or Resampler(volume)
    tiles = _images(volume, grid, montage_planes(first, last, grid_rows * grid_cols), box, resampler)
    height, width = tiles[0].pixels.shape
    pixels = np.full((grid_rows * height, grid_cols * width), resampler.fill, np.float32)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, grid_cols)
        pixels[r * height:(r + 1) * height, c * width:(c + 1) * width] = tile.pixels
    return Montage(pixels, grid.axis, layout, tiles)


def nearest_slice(images: list[SliceImage], ras) -> SliceImage:
    """The image whose plane lies closest to a RAS point."""
    if not images:
        raise GeometryError("no images to search")
    ras = np.asarray(ras, float)
    return min(images, key=lambda image: abs(float(np.dot(ras - image.origin, image.normal))))
