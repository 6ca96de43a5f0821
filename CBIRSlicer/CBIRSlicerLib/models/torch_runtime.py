"""What every torch-based embedder shares: device placement, precision choice, CPU threads, hub downloads."""

from __future__ import annotations

import contextlib
import os
import sys

import numpy as np

from ..errors import ModelError, ModelUnavailableError
from .base import Embedder, available_cores, check_images

MIN_MIXED_PRECISION_COSINE = 0.999
# Slices whose dense canvases are made in one go (resize, pad, normalise; a volume's slices share one shape), on one
# torch thread: each small torch op on the model's 2 threads made them wait on each other at a barrier, which on 2
# loaded cores cost more CPU than the op (a case's canvases and window copies: ~1.5-3 CPU s more; docs/benchmarks.md).
# 8 canvases of a 512-px CT: ~30 MB.
CANVAS_GROUP = 8


# glibc's mallopt parameters: above M_MMAP_THRESHOLD a block is a fresh mmap (zeroed page by page when first touched,
# unmapped when freed); above M_TRIM_THRESHOLD of free space at the heap's top, the heap is given back.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
KEPT_BUFFER_BYTES = 1 << 30
_buffers_kept = False


def keep_large_buffers(limit: int = KEPT_BUFFER_BYTES) -> bool:
    """Let glibc serve blocks up to ``limit`` bytes from its heap and keep them when freed (True if it did; once a process).

    torch allocates every activation afresh; a block past glibc's mmap threshold (32 MB at most by default) is mapped
    for the op and unmapped after it, so each pass zeroes its large activations again page by page. LiteMedSAM's first
    stage holds 64-MB ones: 180,000 page faults and ~0.45 CPU s of system time per slice, ~1.6 s per slice in batches
    of 4, gone with the buffers kept (docs/benchmarks.md, "litemedsam"). Process-wide, and the process keeps its peak
    memory; Slicer embeds in its worker process. A no-op off glibc.
    """
    global _buffers_kept
    if _buffers_kept:
        return True
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        _buffers_kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, ctypes.c_int(limit))
                             and libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(min(2 * limit, 2 ** 31 - 1))))
    except (OSError, AttributeError):
        return False
    return _buffers_kept


def passive_threads() -> bool:
    """OMP_WAIT_POLICY=PASSIVE unless the environment sets it, if torch is not loaded yet (True if it now applies).

    OpenMP's threads spin at each op's barrier by default; on cores other processes also use, a waiting thread spins
    while the one it waits for is descheduled. LiteMedSAM on 2 threads of 2 loaded cores took 3.0-3.5 CPU s per slice
    spinning, 1.45-1.5 s passive (docs/benchmarks.md, "litemedsam"). The OpenMP runtime reads the setting once, when
    torch loads it, so it is set before the first ``import torch`` or not at all; it holds for the whole process.
    """
    if "torch" in sys.modules:
        return os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE"


def hub_cache_dir() -> str:
    """Where Hugging Face keeps downloaded models (HF_HUB_CACHE / HF_HOME respected)."""
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except ImportError:
        return os.path.join(os.path.expanduser("~"), ".cache", "huggingface", "hub")


def hub_snapshot(repo_id: str, model_name: str, patterns: list[str]) -> str:
    """Local folder of a hub repository: from the cache, or downloaded into it with progress bars."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as error:  # offline, unknown repo, refused: all end the same way for the user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelUnavailableError(
            f"model '{model_name}' ({repo_id}) is not in the Hugging Face cache at {hub_cache_dir()} and could not "
            f"be downloaded ({reason}). Run it once on a machine with internet access and copy that cache, or put "
            f"the checkpoint in a folder and use --model local-dir:/path/to/folder (open_clip models: "
            f"open_clip_config.json + open_clip_pytorch_model.bin; transformers models: hf-vit:/path/to/folder)."
        ) from None


def load_checkpoint(path: str) -> object:
    """A torch checkpoint file's contents (tensors only: ``weights_only``); a corrupt or foreign file is one line."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or foreign file: say which and why, in one line
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"{path}: not a readable torch checkpoint ({reason})") from None


def weights_file(folder: str, candidates: tuple[str, ...]) -> str | None:
    """The first existing weights file of a checkpoint folder."""
    for name in candidates:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


class TorchEmbedder(Embedder):
    """An embedder backed by a torch module: subclasses provide ``preprocess`` and ``_features``."""

    default_batch_size = 16

    def __init__(self, device: str, precision: str = "auto", threads: int | None = None):
        import torch

        if precision not in ("auto", "fp32", "fp16", "bf16"):
            raise ModelError(f"precision must be auto, fp32, fp16 or bf16, not '{precision}'")
        self.device = device
        self.requested_precision = precision
        self.precision: str | None = None if precision == "auto" else precision
        self.precision_check: dict | None = None
        if device == "cpu":
            # Use the cores we were given; in Slicer the worker process is given one less than the machine has.
            torch.set_num_threads(max(1, threads or available_cores()))

    def preprocess(self, images: list[np.ndarray]):
        """The model's own preprocessing of uint8 RGB images, as a (N, 3, H, W) float tensor."""
        raise NotImplementedError

    def _features(self, pixels):
        raise NotImplementedError

    def _autocast(self, precision: str):
        import torch

        if precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if precision == "fp16" else torch.bfloat16
        device_type = "cuda" if self.device.startswith("cuda") else self.device
        return torch.autocast(device_type=device_type, dtype=dtype)

    def _run(self, pixels, precision: str) -> np.ndarray:
        import torch

        with torch.inference_mode(), self._autocast(precision):
            return self._features(pixels).float().cpu().numpy()

    def _choose_precision(self, pixels) -> str:
        """fp32 on CPU and MPS; on CUDA fp16 (or bf16) when it keeps cosine >= 0.999 to fp32 on a real batch."""
        if not self.device.startswith("cuda"):
            return "fp32"
        reference = self._run(pixels, "fp32")
        for candidate in ("fp16", "bf16"):
            cosine = _min_cosine(reference, self._run(pixels, candidate))
            if cosine >= MIN_MIXED_PRECISION_COSINE:
                self.precision_check = {"precision": candidate, "min_cosine": cosine}
                return candidate
        self.precision_check = {"precision": "fp32", "min_cosine": cosine}
        return "fp32"

    def _embed_batch(self, images: list[np.ndarray]) -> np.ndarray:
        pixels = self.preprocess(images).to(self.device)
        if self.precision is None:
            self.precision = self._choose_precision(pixels)
        return self._run(pixels, self.precision)

    # ----- dense features: patch tokens of windows over the slice at a resolution where a patch is one cell -------
    default_region_strategy = "dense"
    supports_dense = True

    def _dense_geometry(self) -> tuple[int, int]:
        """(input side, patch side) in model pixels."""
        raise NotImplementedError

    def _normalisation(self) -> tuple[list[float], list[float]]:
        """The model's per-channel mean and standard deviation of [0, 1] pixels."""
        raise NotImplementedError

    def _tokens(self, pixels):
        """Patch tokens (N, side, side, dim) in the embedding space for a batch of normalised windows."""
        raise NotImplementedError

    def _canvases(self, images: list[np.ndarray], plan) -> np.ndarray:
        """Images of one shape resized so a patch covers a cell, padded with black (air) to the plan's canvas, normalised:
        (N, 3, rows, cols) float32, each op once for all of them (each image's numbers are what it gets alone), on one
        torch thread (see CANVAS_GROUP)."""
        import torch
        import torch.nn.functional as F

        with _torch_threads(1):
            return self._canvases_now(images, plan, torch, F)

    def _canvases_now(self, images, plan, torch, F) -> np.ndarray:
        mean, std = self._normalisation()
        shape = images[0].shape[:2]
        pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
        size = (max(1, round(shape[0] * plan.scale)), max(1, round(shape[1] * plan.scale)))
        if size != tuple(shape):
            pixels = F.interpolate(pixels, size=size, mode="bilinear", antialias=True, align_corners=False)
        canvas = torch.zeros((len(images), 3, *plan.canvas))
        canvas[:, :, :min(size[0], plan.canvas[0]), :min(size[1], plan.canvas[1])] = pixels[:, :, :plan.canvas[0], :plan.canvas[1]]
        return canvas.sub_(torch.tensor(mean)[:, None, None]).div_(torch.tensor(std)[:, None, None]).numpy()

    def dense_passes(self, image_shape: tuple[int, int], pixel_mm: float, cell_mm: float, box=None) -> int:
        """Windows (forward passes) of one image, all or those a box needs."""
        from .dense import plan_windows

        window, patch = self._dense_geometry()
        return len(plan_windows(tuple(image_shape), pixel_mm, cell_mm, window, patch).windows(window, box))

    def embed_dense(self, images, pixel_mm, cell_mm: float | None = None, boxes=None, batch_size: int | None = None) -> list:
        """Patch-token grids of whole images from windows of the model's input size (:mod:`.dense`), batched."""
        import torch

        from .dense import DENSE_CELL_MM, plan_windows, stitch

        images = check_images(images)
        sizes = list(pixel_mm) if np.ndim(pixel_mm) else [float(pixel_mm)] * len(images)
        window, patch = self._dense_geometry()
        plans = [plan_windows(image.shape[:2], mm, cell_mm or DENSE_CELL_MM, window, patch) for image, mm in zip(images, sizes)]
        starts = [plan.windows(window, None if boxes is None else boxes[n]) for n, plan in enumerate(plans)]
        jobs = [(n, start) for n in range(len(images)) for start in starts[n]]
        tokens: dict[int, list[np.ndarray]] = {n: [] for n in range(len(images))}
        batch_size = max(1, batch_size or self.default_batch_size)
        canvases: dict[int, object] = {}
        last_job = {n: i for i, (n, _) in enumerate(jobs)}
        for first in range(0, len(jobs), batch_size):
            batch = jobs[first:first + batch_size]
            for n, _ in batch:
                if n not in canvases:
                    canvases.update(self._next_canvases(images, plans, n, CANVAS_GROUP))
            # numpy copies the windows on this thread; a torch.stack would wake the model's idle threads for a copy.
            pixels = torch.from_numpy(np.stack([canvases[n][:, r:r + window, c:c + window] for n, (r, c) in batch]))
            pixels = pixels.to(self.device)
            if self.precision is None:
                self.precision = self._choose_precision(pixels)
            with torch.inference_mode(), self._autocast(self.precision):
                out = self._tokens(pixels).float().cpu().numpy()
            for (n, _), grid in zip(batch, out):
                tokens[n].append(grid)
            for n in {n for n, _ in batch if last_job[n] < first + batch_size}:
                canvases.pop(n)  # done with that image
        return [stitch(plans[n], images[n].shape[:2], tokens[n], starts[n], patch) for n in range(len(images))]

    def _next_canvases(self, images: list[np.ndarray], plans: list, first: int, count: int) -> dict:
        """Canvases of image ``first`` and the next ones of its shape and plan (up to ``count``), made together."""
        group = [first]
        while len(group) < count and group[-1] + 1 < len(images) and images[group[-1] + 1].shape == images[first].shape \
                and plans[group[-1] + 1] == plans[first]:
            group.append(group[-1] + 1)
        made = self._canvases([images[n] for n in group], plans[first])
        return {n: made[k] for k, n in enumerate(group)}

    def describe(self) -> dict:
        """Adds the precision in use to the base description."""
        return {**super().describe(), "precision": self.precision or self.requested_precision}


@contextlib.contextmanager
def _torch_threads(count: int):
    """Run the enclosed torch ops on ``count`` intra-op threads, then give the previous number back."""
    import torch

    before = torch.get_num_threads()
    if before == count:
        yield
        return
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Smallest row-wise cosine similarity between two batches of vectors."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return float(np.min(np.sum(a * b, axis=1)))
