"""Self-supervised vision transformers through transformers (DINOv2, RAD-DINO, any backbone): the CLS token."""

from __future__ import annotations

import os

import numpy as np

from ..digests import file_sha256
from ..errors import ModelError, ModelUnavailableError
from .base import Fingerprint
from .torch_runtime import TorchEmbedder, hub_snapshot, weights_file

WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")


class HFVisionEmbedder(TorchEmbedder):
    """A transformers vision backbone with its own image processor; the embedding is the CLS token."""

    supports_text = False

    def __init__(self, name: str, identifier: str, device: str, precision: str = "auto", threads: int | None = None):
        super().__init__(device, precision, threads)
        from transformers import AutoImageProcessor, AutoModel

        self.name = name
        if os.path.isdir(identifier):
            folder = os.path.abspath(identifier)
        else:
            folder = hub_snapshot(identifier, name, ["*.json", "*.safetensors"])
            if weights_file(folder, WEIGHT_NAMES) is None:  # older repositories ship only a .bin
                folder = hub_snapshot(identifier, name, ["*.json", "pytorch_model.bin"])
        weights = weights_file(folder, WEIGHT_NAMES)
        if weights is None or not os.path.isfile(os.path.join(folder, "config.json")):
            raise ModelUnavailableError(f"model '{name}': {folder} needs config.json, preprocessor_config.json and "
                                        f"{' or '.join(WEIGHT_NAMES)}")
        try:
            self.processor = AutoImageProcessor.from_pretrained(folder)
            self.model = AutoModel.from_pretrained(folder).eval().to(device)
        except (OSError, ValueError) as error:
            reason = str(error).splitlines()[0]
            raise ModelUnavailableError(f"model '{name}' could not be loaded from {folder}: {reason}") from None
        self.dim = int(self.model.config.hidden_size)
        processor_cfg = {k: v for k, v in self.processor.to_dict().items() if not k.startswith("_")}
        self.fingerprint = Fingerprint(
            name=name, family="hf_vision", dim=self.dim,
            source=identifier, config={"model_type": self.model.config.model_type,
                    "hidden_size": self.dim, "layers": self.model.config.num_hidden_layers,
                    "patch_size": getattr(self.model.config, "patch_size", None), "pooling": "cls"},
            weights_sha256=file_sha256(weights),
            preprocessing=processor_cfg,
        )

    def preprocess(self, images: list[np.ndarray]):
        """The checkpoint's own image processor (resize, crop, rescale, normalise)."""
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    def _features(self, pixels):
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]

    def _dense_geometry(self) -> tuple[int, int]:
        patch = getattr(self.model.config, "patch_size", None)
        if not patch:
            raise ModelError(f"model '{self.name}' is not a vision transformer: it has no patch tokens for dense features")
        crop = getattr(self.processor, "crop_size", None) or getattr(self.processor, "size", None) or {}
        side = crop.get("height") or crop.get("shortest_edge") or self.model.config.image_size
        return int(side), int(patch)

    def _normalisation(self) -> tuple[list[float], list[float]]:
        return list(self.processor.image_mean), list(self.processor.image_std)

    def _tokens(self, pixels):
        """Final-layer patch tokens after the backbone's layer norm: the space the CLS vector lies in."""
        hidden = self.model(pixel_values=pixels).last_hidden_state
        side = pixels.shape[-1] // self._dense_geometry()[1]
        return hidden[:, hidden.shape[1] - side * side:].reshape(hidden.shape[0], side, side, -1)
