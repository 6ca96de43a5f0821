"""What an index holds for one volume: whole slices along the chosen axes, tiles of them, and crops around blobs.

A region-of-interest query is a crop, so comparing it only with whole slices compares unlike
with unlike. Each indexed slice is therefore also cut into square tiles of a few physical sizes
(with overlap), and into squares of a few sizes centred on its most blob-like places (:mod:`blobs`),
so an object that falls across tile edges is also held once centred, as a reader's box around
it would hold it. Items that are mostly background are skipped. Every item keeps where it lies
(axis, slice index, RAS centre, pixel box in the slice plane, RAS bounds) for the viewer.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import ParameterError
from ..imaging.blobs import detect_blobs
from ..imaging.intensity import Window, choose_window, to_uint8_rgb
from ..imaging.resize import resize_bilinear
from ..imaging.slicing import AXES, Resampler, SliceImage, extract_slices
from ..imaging.volume import Volume
from .catalog import ItemRecord

REGION_STRATEGIES = ("auto", "crops", "dense")


@dataclass
class IndexSettings:
    """Slicing parameters an index is built with; the manifest pins them so every case is cut alike."""

    axes: list[str] = field(default_factory=lambda: ["axial"])
    stride_mm: float = 5.0
    tile_sizes_mm: list[float] = field(default_factory=lambda: [32.0])
    tile_overlap: float = 0.5
    min_foreground: float = 0.2
    window: str = "auto"
    thumbnail_px: int = 96
    blobs_per_slice: int = 12
    blob_sizes_mm: list[float] = field(default_factory=lambda: [16.0, 24.0, 32.0])
    # Item vectors: 'crops' (each embedded on its own), 'dense' (pooled from one grid per slice, models/dense.py), or
    # 'auto' (the model's default, resolved when the index is created and pinned from then on).
    region_strategy: str = "auto"
    dense_cell_mm: float = 10.0
    dense_pooling: str = "mean"

    def __post_init__(self) -> None:
        if not self.axes or any(a not in AXES for a in self.axes):
            raise ParameterError(f"axes must be among {', '.join(AXES)}, got {self.axes}")
        if not self.stride_mm > 0:
            raise ParameterError(f"stride must be positive, got {self.stride_mm} mm")
        if any(not t > 0 for t in self.tile_sizes_mm) or not 0 <= self.tile_overlap < 1:
            raise ParameterError("tile sizes must be positive and the overlap in [0, 1)")
        if self.blobs_per_slice < 0 or any(not b > 0 for b in self.blob_sizes_mm):
            raise ParameterError("blobs per slice must be 0 or more and blob crop sizes positive")
        if self.region_strategy not in REGION_STRATEGIES:
            raise ParameterError(f"region strategy must be one of {', '.join(REGION_STRATEGIES)}, not '{self.region_strategy}'")
        if not self.dense_cell_mm > 0 or self.dense_pooling not in ("mean", "gem"):
            raise ParameterError(f"dense cells must be positive ({self.dense_cell_mm} mm) and pooling mean or gem "
                                 f"('{self.dense_pooling}')")
        self.dense_cell_mm = float(self.dense_cell_mm)
        self.stride_mm = float(self.stride_mm)
        self.tile_sizes_mm = [float(t) for t in self.tile_sizes_mm]
        self.blobs_per_slice = int(self.blobs_per_slice)
        self.blob_sizes_mm = [float(b) for b in self.blob_sizes_mm]

    @classmethod
    def from_stored(cls, stored: dict) -> IndexSettings:
        """Settings as a manifest stores them; an index made before blob items (or dense vectors) existed has none (crops)."""
        return cls(**{"blobs_per_slice": 0, "blob_sizes_mm": [], "region_strategy": "crops", **stored})

    def resolved(self, embedder) -> IndexSettings:
        """These settings with 'auto' replaced by the model's default region strategy (what an index pins)."""
        if self.region_strategy != "auto":
            return self
        strategy = "crops" if embedder.embeds_volumes else embedder.default_region_strategy
        return IndexSettings(**{**self.as_dict(), "region_strategy": strategy})

    def as_dict(self) -> dict:
        """JSON form."""
        return asdict(self)

    def differences(self, other: dict) -> list[str]:
        """Fields that differ from a stored settings dict."""
        mine = self.as_dict()
        stored = IndexSettings.from_stored(other).as_dict()
        return [f"{k}: {stored[k]!r} in the index, {mine[k]!r} asked for" for k in mine
                if stored[k] != mine[k] and not (k == "region_strategy" and mine[k] == "auto")]


@dataclass
class VolumeItems:
    """The items of one volume, their model-ready images, and slice thumbnails keyed by (axis, plane)."""

    items: list[ItemRecord]
    images: list[np.ndarray]
    thumbnails: dict[tuple[str, int], np.ndarray]
    window: Window


def thumbnail(grey: np.ndarray, size: int) -> np.ndarray:
    """A uint8 grey thumbnail whose longer side is ``size`` pixels."""
    rows, cols = grey.shape
    scale = size / max(rows, cols)
    out = resize_bilinear(grey.astype(np.float32), max(1, round(rows * scale)), max(1, round(cols * scale)))
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _positions(length: int, tile: int, step: int) -> list[int]:
    """Start offsets of tiles along one side, the last one flush with the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile + 1, step))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def _item(image: SliceImage, kind: str, box_in_image: tuple[int, int, int, int], size_mm: float) -> ItemRecord:
    r0, c0, r1, c1 = box_in_image
    # The four corner pixels and the centre at once: image.pixel_to_ras's arithmetic, in the same order, on arrays.
    rows = np.array([r0, r0, r1 - 1, r1 - 1, (r0 + r1 - 1) / 2], float)
    cols = np.array([c0, c1 - 1, c0, c1 - 1, (c0 + c1 - 1) / 2], float)
    points = np.asarray(image.origin) + (cols * image.pixel_mm)[:, None] * image.right + (rows * image.pixel_mm)[:, None] * image.down
    corners, centre = points[:4], points[4]
    br, bc = image.box[0], image.box[1]
    return ItemRecord(kind, image.axis, image.slice_index, image.plane, tuple(centre), (br + r0, bc + c0, br + r1, bc + c1),
                      tuple(corners.min(axis=0)), tuple(corners.max(axis=0)), float(size_mm))


def _foreground(rgb: np.ndarray) -> np.ndarray:
    """Pixels above ~5 % of the window: not air or the padding around the volume."""
    return rgb[..., 0] > 12


def tiles_of(image: SliceImage, rgb: np.ndarray, settings: IndexSettings) -> list[tuple[ItemRecord, np.ndarray]]:
    """Square tiles of one slice at each configured size, skipping those that are mostly background."""
    rows, cols = image.pixels.shape
    foreground = _foreground(rgb)
    out = []
    for size_mm in settings.tile_sizes_mm:
        side = max(2, int(round(size_mm / image.pixel_mm)))
        if side >= max(rows, cols):
            continue  # the whole slice is already an item of that size
        step = max(1, int(round(side * (1 - settings.tile_overlap))))
        for r0 in _positions(rows, side, step):
            for c0 in _positions(cols, side, step):
                r1, c1 = min(rows, r0 + side), min(cols, c0 + side)
                if foreground[r0:r1, c0:c1].mean() < settings.min_foreground:
                    continue
                out.append((_item(image, "tile", (r0, c0, r1, c1), size_mm), rgb[r0:r1, c0:c1]))
    return out


def blob_crops_of(image: SliceImage, rgb: np.ndarray, settings: IndexSettings) -> list[tuple[ItemRecord, np.ndarray]]:
    """Squares of each configured size centred on the slice's strongest blobs, skipping those mostly background."""
    if not settings.blobs_per_slice or not settings.blob_sizes_mm:
        return []
    rows, cols = image.pixels.shape
    foreground = _foreground(rgb)
    out = []
    for blob in detect_blobs(rgb[..., 0] / 255.0, image.pixel_mm, settings.blobs_per_slice):
        for size_mm in settings.blob_sizes_mm:
            half = max(1, int(round(size_mm / 2 / image.pixel_mm)))
            r0, c0 = max(0, blob.row - half), max(0, blob.col - half)
            r1, c1 = min(rows, blob.row + half + 1), min(cols, blob.col + half + 1)
            if foreground[r0:r1, c0:c1].mean() < settings.min_foreground:
                continue
            out.append((_item(image, "blob", (r0, c0, r1, c1), size_mm), rgb[r0:r1, c0:c1]))
    return out


def volume_items(volume: Volume, settings: IndexSettings) -> VolumeItems:
    """Slices (with their tiles and blob crops) of a volume as catalog items plus the uint8 RGB images to embed."""
    window = choose_window(volume, settings.window)
    resampler = Resampler(volume)
    items, images, thumbs = [], [], {}
    for axis in settings.axes:
        for image in extract_slices(volume, axis, stride_mm=settings.stride_mm, resampler=resampler):
            rgb = to_uint8_rgb(image.pixels, window)
            rows, cols = image.pixels.shape
            items.append(_item(image, "slice", (0, 0, rows, cols), max(rows, cols) * image.pixel_mm))
            images.append(rgb)
            thumbs[(axis, image.plane)] = thumbnail(rgb[..., 0], settings.thumbnail_px)
            for item, crop in tiles_of(image, rgb, settings) + blob_crops_of(image, rgb, settings):
                items.append(item)
                images.append(crop)
    return VolumeItems(items, images, thumbs, window)


def slice_regions(image: SliceImage, rgb: np.ndarray, settings: IndexSettings) -> list[tuple[ItemRecord, tuple[int, int, int, int]]]:
    """The items of one slice (itself, its tiles, its blob crops) with their pixel boxes in the slice image."""
    rows, cols = image.pixels.shape
    out = [(_item(image, "slice", (0, 0, rows, cols), max(rows, cols) * image.pixel_mm), (0, 0, rows, cols))]
    br, bc = image.box[0], image.box[1]
    for item, _ in tiles_of(image, rgb, settings) + blob_crops_of(image, rgb, settings):
        r0, c0, r1, c1 = item.box
        out.append((item, (r0 - br, c0 - bc, r1 - br, c1 - bc)))
    return out


def volume_items_dense(volume: Volume, settings: IndexSettings, embedder) -> tuple[VolumeItems, np.ndarray]:
    """The same items as :func:`volume_items`, their vectors pooled from one dense grid per slice (models/dense.py)."""
    from ..models.dense import pool_regions

    window = choose_window(volume, settings.window)
    resampler = Resampler(volume)
    items, vectors, thumbs = [], [], {}
    for axis in settings.axes:
        slices = extract_slices(volume, axis, stride_mm=settings.stride_mm, resampler=resampler)
        rgbs = [to_uint8_rgb(image.pixels, window) for image in slices]
        # The items' boxes (blob detection: ~5 % of a ViT's time) are found on a thread while the model runs.
        with ThreadPoolExecutor(1, thread_name_prefix="cbir-items") as pool:
            regions = pool.submit(lambda pairs: [slice_regions(image, rgb, settings) for image, rgb in pairs], list(zip(slices, rgbs)))
            grids = embedder.embed_dense(rgbs, [image.pixel_mm for image in slices], settings.dense_cell_mm)
            regions = regions.result()
        for image, rgb, grid, boxes in zip(slices, rgbs, grids, regions):
            thumbs[(axis, image.plane)] = thumbnail(rgb[..., 0], settings.thumbnail_px)
            items += [item for item, _ in boxes]
            vectors.append(pool_regions(grid, [box for _, box in boxes], settings.dense_pooling))  # a slice's items in one product
    return VolumeItems(items, [], thumbs, window), np.concatenate(vectors or [np.zeros((0, embedder.dim))]).astype(np.float32)


# ----- 3D models: one pass over the volume, regions are cells of its feature map ---------------------------------
REGION_CELLS = (1, 2)  # region items: single feature-map cells and 2 x 2 x 2 windows of them (docs/benchmarks.md)


def _cell_regions(cells: np.ndarray, centres: np.ndarray, foreground: np.ndarray, cell_mm: np.ndarray, span: int,
                  min_foreground: float) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """(vector, centre, low, high) of every ``span``-cubed window of cells (stride one cell) that is mostly body."""
    grid = np.array(cells.shape[:3])
    if np.any(grid < span):
        return []
    out = []
    for a in range(grid[0] - span + 1):
        for b in range(grid[1] - span + 1):
            for c in range(grid[2] - span + 1):
                window = (slice(a, a + span), slice(b, b + span), slice(c, c + span))
                if foreground[window].mean() < min_foreground:
                    continue
                centre = centres[window].reshape(-1, 3).mean(axis=0)
                half = cell_mm * span / 2
                out.append((cells[window].reshape(-1, cells.shape[-1]).mean(axis=0), centre, centre - half, centre + half))
    return out


def volume_items_3d(volume: Volume, embedder, settings: IndexSettings) -> tuple[VolumeItems, np.ndarray]:
    """A 3D model's items of a volume: the whole volume and cell regions of one feature-map pass, with their vectors.

    Each item is placed for the viewer on the axial slice through its centre (``slice_index``, ``box`` in that
    slice's pixels), so results show side by side as the 2D models' do; thumbnails are kept for those slices.
    """
    from ..imaging.slicing import nearest_slice
    from ..models.base import l2_normalize

    window = choose_window(volume, settings.window)
    features = embedder.embed_volume(volume)
    corners = volume.corners_ras()
    low_volume, high_volume = corners.min(axis=0), corners.max(axis=0)
    regions = [("volume", features.whole, np.asarray(volume.center_ras, float), low_volume, high_volume)]
    for span in REGION_CELLS:
        kind = "cell" if span == 1 else f"cell{span}"
        regions += [(kind, *region) for region in _cell_regions(features.cells, features.centres_ras, features.foreground,
                                                                 features.cell_mm, span, settings.min_foreground)]
    slices = extract_slices(volume, "axial", stride_mm=settings.stride_mm)
    items, vectors, thumbs = [], [], {}
    for kind, vector, centre, low, high in regions:
        low, high = np.maximum(low, low_volume), np.minimum(high, high_volume)
        image = nearest_slice(slices, centre)
        rows, cols = image.pixels.shape
        pixels = np.array([image.ras_to_pixel(p) for p in (low, high)])
        r0, c0 = np.clip(np.floor(pixels.min(axis=0)).astype(int), 0, [rows - 1, cols - 1])
        r1, c1 = np.clip(np.ceil(pixels.max(axis=0)).astype(int) + 1, [r0 + 1, c0 + 1], [rows, cols])
        items.append(ItemRecord(kind, "axial", image.slice_index, image.plane, tuple(float(v) for v in centre),
                                (int(r0), int(c0), int(r1), int(c1)), tuple(float(v) for v in low),
                                tuple(float(v) for v in high), float(np.max(high - low))))
        vectors.append(vector)
        if ("axial", image.plane) not in thumbs:
            thumbs[("axial", image.plane)] = thumbnail(to_uint8_rgb(image.pixels, window)[..., 0], settings.thumbnail_px)
    return VolumeItems(items, [], thumbs, window), l2_normalize(np.array(vectors, np.float32))
