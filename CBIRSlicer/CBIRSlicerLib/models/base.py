"""The embedder contract: images (and, for CLIP-family models, text) to L2-normalised float32 vectors.

Every embedder has a dimension and a :class:`Fingerprint` (name, config, weights checksum,
preprocessing) that an index stores, so vectors from different models never mix. Which
embedder a model name stands for is decided in :mod:`.registry`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from ..errors import ModelError

VOLUME_FAMILIES = ("i3d",)  # fingerprint families of 3D models (they embed volumes, not 2D images)
ImageProgress = Callable[[int, int], None]  # called with (images done, images in all)
ShouldStop = Callable[[], bool]


@dataclass(frozen=True)
class Fingerprint:
    """What makes two embedders' vectors comparable: family, config, weights checksum and preprocessing.

    ``name`` and ``source`` say where the model came from and are kept for people to read; they
    are not part of the identity, so a hub checkpoint and a copy of it in a local folder match.
    """

    name: str
    family: str
    dim: int
    config: dict = field(default_factory=dict)
    weights_sha256: str | None = None
    preprocessing: dict = field(default_factory=dict)
    source: str = ""

    IDENTITY = ("family", "dim", "config", "weights_sha256", "preprocessing")

    def __post_init__(self) -> None:
        # Store config and preprocessing as their JSON round trip (tuples become lists) so a
        # fingerprint read back from a manifest compares equal to a freshly made one.
        for key in ("config", "preprocessing"):
            object.__setattr__(self, key, json.loads(json.dumps(getattr(self, key), sort_keys=True, default=str)))

    def as_dict(self) -> dict:
        """Plain JSON form (what the index manifest stores)."""
        return asdict(self)

    def digest(self) -> str:
        """A short stable hash of the identity fields."""
        identity = {key: getattr(self, key) for key in self.IDENTITY}
        return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def differences(self, other: Fingerprint | dict) -> list[str]:
        """Human-readable list of the identity fields that differ from another fingerprint (empty: compatible)."""
        mine, theirs = self.as_dict(), other if isinstance(other, dict) else other.as_dict()
        return [f"{key}: {mine.get(key)!r} != {theirs.get(key)!r}" for key in self.IDENTITY if mine.get(key) != theirs.get(key)]


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=-1, keepdims=True)
    return np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)


def check_images(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Validate a batch: each image is (rows, cols) or (rows, cols, 1|3), non-empty; uint8 or float in [0, 1]."""
    checked = []
    for n, image in enumerate(images):
        array = np.asarray(image)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3) or min(array.shape[:2]) < 1:
            raise ModelError(f"image {n} has shape {array.shape}; expected (rows, cols) or (rows, cols, 3)")
        if array.dtype != np.uint8:
            array = np.round(np.clip(np.nan_to_num(array.astype(np.float32)), 0.0, 1.0) * 255).astype(np.uint8)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        checked.append(np.ascontiguousarray(array))
    return checked


def choose_device(requested: str | None = None) -> str:
    """'cuda', then 'mps', then 'cpu', unless a device is requested (argument or CBIR_DEVICE)."""
    requested = requested or os.environ.get("CBIR_DEVICE") or "auto"
    if requested != "auto":
        return requested
    try:
        import torch
    except ImportError:
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def available_cores() -> int:
    """CPU cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


@dataclass
class VolumeFeatures:
    """What a 3D model makes of a whole volume in one pass: a feature map and where its cells lie.

    ``cells`` (nx, ny, nz, dim) raw features; ``centres_ras`` (nx, ny, nz, 3); ``foreground`` (nx, ny, nz) share of a
    cell's input that is body, not air or padding; ``cell_mm`` the cell's extent along R, A, S; ``whole`` the unit
    vector of the whole volume.
    """

    cells: np.ndarray
    centres_ras: np.ndarray
    foreground: np.ndarray
    cell_mm: np.ndarray
    whole: np.ndarray


def modality_warning(embedder, *modalities: str | None) -> str | None:
    """A warning when a model made for some modalities (astra-ct: CT) is given an image of another one (the file's word
    or what the voxels look like); None when it was made for any or all of them agree."""
    wanted = tuple(getattr(embedder, "modalities", ()) or ())
    seen = {m.upper() for m in modalities if m}
    if not wanted or not seen or seen <= set(wanted):
        return None
    return (f"model '{embedder.name}' was made for {'/'.join(wanted)} images; this volume is {'/'.join(sorted(seen))}: its "
            "vectors may mean little")


class Embedder:
    """Base class: subclasses set name, dim, fingerprint, supports_text and implement ``_embed_batch``.

    A 3D model sets ``embeds_volumes`` and implements ``embed_volume(volume) -> VolumeFeatures`` and
    ``embed_region(volume, roi) -> vector`` instead of the 2D image path.
    """

    name: str = ""
    dim: int = 0
    supports_text: bool = False
    embeds_volumes: bool = False
    device: str = "cpu"
    fingerprint: Fingerprint
    default_batch_size: int = 16
    # How this model's index items get their vectors unless the settings say: 'crops' (each item embedded on its own)
    # or 'dense' (pooled from one pass over the slice, :mod:`.dense`); chosen per model by measurement (docs/benchmarks.md).
    default_region_strategy: str = "crops"
    supports_dense: bool = False
    # The modalities a model was trained on (DICOM words); empty: any. An index warns and flags a case of another one.
    modalities: tuple[str, ...] = ()

    def _embed_batch(self, images: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def _embed_text(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError

    def embed_images(self, images: Sequence[np.ndarray], batch_size: int | None = None,
                     progress: ImageProgress | None = None, should_stop: ShouldStop | None = None) -> np.ndarray:
        """Vectors (N, dim), float32, L2-normalised, for uint8 RGB / grey images; stops early if ``should_stop()``."""
        images = check_images(images)
        batch_size = max(1, batch_size or self.default_batch_size)
        out = np.zeros((len(images), self.dim), np.float32)
        for start in range(0, len(images), batch_size):
            if should_stop is not None and should_stop():
                from ..errors import JobCancelled

                raise JobCancelled(f"stopped after {start} of {len(images)} images")
            batch = images[start:start + batch_size]
            out[start:start + len(batch)] = l2_normalize(self._embed_batch(batch))
            if progress is not None:
                progress(start + len(batch), len(images))
        return out

    def embed_dense(self, images: Sequence[np.ndarray], pixel_mm, cell_mm: float | None = None, boxes=None,
                    batch_size: int | None = None) -> list:
        """A :class:`.dense.DenseGrid` per image (cells of ``cell_mm``; only windows covering ``boxes`` when given)."""
        raise ModelError(f"model '{self.name}' has no dense features; index it with region_strategy 'crops'")

    def dense_passes(self, image_shape: tuple[int, int], pixel_mm: float, cell_mm: float, box=None) -> int:
        """Forward passes ``embed_dense`` takes for one image (0: no network, as for the weight-free model)."""
        return 0

    def embed_text(self, texts: Sequence[str]) -> np.ndarray:
        """Vectors (N, dim) for phrases such as 'pleural effusion' (CLIP-family models only)."""
        if not self.supports_text:
            raise ModelError(f"model '{self.name}' embeds images only; text search needs a CLIP-family model such as biomedclip")
        texts = [str(t) for t in texts]
        if not texts or any(not t.strip() for t in texts):
            raise ModelError("text queries must be non-empty phrases")
        return l2_normalize(self._embed_text(texts))

    def describe(self) -> dict:
        """What a user or the worker reports about the loaded model."""
        return {"name": self.name, "dim": self.dim, "device": self.device, "supports_text": self.supports_text,
                "embeds_volumes": self.embeds_volumes,
                "fingerprint": self.fingerprint.as_dict(), "digest": self.fingerprint.digest()}
