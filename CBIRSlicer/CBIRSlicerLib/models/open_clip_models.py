"""open_clip models (BiomedCLIP by default): hub, built-in tags and local folders, one loading path."""

from __future__ import annotations

import json
import os

import numpy as np

from ..digests import file_sha256
from ..errors import ModelError, ModelUnavailableError
from .base import Fingerprint
from .torch_runtime import TorchEmbedder, hub_snapshot, weights_file

OPEN_CLIP_FILES = ("open_clip_config.json", "open_clip_pytorch_model.bin", "open_clip_model.safetensors")
WEIGHT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _local_folder(folder: str, model_name: str) -> tuple[str, str]:
    """(config path, weights path) of an open_clip folder, or a ModelUnavailableError saying what is missing."""
    folder = os.path.abspath(os.path.expanduser(folder))
    config = os.path.join(folder, "open_clip_config.json")
    if not os.path.isdir(folder):
        raise ModelUnavailableError(f"model '{model_name}': folder {folder} does not exist")
    if not os.path.isfile(config):
        raise ModelUnavailableError(f"model '{model_name}': {folder} has no open_clip_config.json (the open_clip hub layout)")
    weights = weights_file(folder, WEIGHT_NAMES)
    if weights is None:
        raise ModelUnavailableError(f"model '{model_name}': {folder} has no weights ({' or '.join(WEIGHT_NAMES)})")
    return config, weights


class OpenClipEmbedder(TorchEmbedder):
    """An open_clip CLIP model: image tower for images, text tower for phrases."""

    supports_text = True

    def __init__(self, name: str, identifier: str, device: str, precision: str = "auto", threads: int | None = None):
        super().__init__(device, precision, threads)
        import open_clip

        self.name = name
        if identifier.startswith("openclip:"):
            _, arch, tag = identifier.split(":")
            pretrained_cfg = open_clip.get_pretrained_cfg(arch, tag)
            if not pretrained_cfg:
                raise ModelError(f"open_clip has no pretrained weights '{tag}' for {arch}; see open_clip.list_pretrained()")
            try:
                weights = open_clip.download_pretrained(pretrained_cfg)
            except Exception as error:
                raise ModelUnavailableError(f"model '{name}': weights could not be downloaded ({error})") from None
            model_name, config = arch, {"model_cfg": open_clip.get_model_config(arch), "pretrained": tag}
            create_args = {"pretrained": weights}
        else:
            if identifier.startswith("hf-hub:"):
                folder = hub_snapshot(identifier[len("hf-hub:"):], name, list(OPEN_CLIP_FILES))
            else:
                folder = identifier[len("local-dir:"):]
            config_path, weights = _local_folder(folder, name)
            with open(config_path, encoding="utf-8") as handle:
                config = json.load(handle)
            if "model_cfg" not in config:
                raise ModelError(f"model '{name}': {config_path} has no 'model_cfg'")
            # The same open_clip code path as a hub checkpoint, from the local copy.
            model_name, create_args = f"local-dir:{os.path.dirname(config_path)}", {}
        try:
            model, _, transform = open_clip.create_model_and_transforms(model_name, device=device, **create_args)
        except (OSError, RuntimeError, ValueError) as error:
            raise ModelUnavailableError(f"model '{name}' could not be created: {str(error).splitlines()[0]}") from None
        self.model = model.eval()
        self.transform = transform
        self._tokenizer_name = model_name
        self._tokenizer = None
        self.dim = int(config["model_cfg"]["embed_dim"])
        preprocess_cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.fingerprint = Fingerprint(
            name=name, family="open_clip", dim=self.dim,
            source=identifier, config={"model_cfg": config["model_cfg"], "pretrained": config.get("pretrained")},
            weights_sha256=file_sha256(weights),
            preprocessing={k: (list(v) if isinstance(v, tuple) else v) for k, v in preprocess_cfg.items()},
        )

    def preprocess(self, images: list[np.ndarray]):
        """open_clip's own transform (resize, centre crop, normalise) applied to each image."""
        import torch
        from PIL import Image

        return torch.stack([self.transform(Image.fromarray(image)) for image in images])

    def _features(self, pixels):
        return self.model.encode_image(pixels)

    def _dense_geometry(self) -> tuple[int, int]:
        visual = self.model.visual
        if hasattr(visual, "trunk"):  # a timm tower (BiomedCLIP)
            embed = visual.trunk.patch_embed
            return int(embed.img_size[0]), int(embed.patch_size[0])
        if not hasattr(visual, "patch_size"):
            raise ModelError(f"model '{self.name}' is not a vision transformer: it has no patch tokens for dense features")
        return int(visual.image_size[0]), int(visual.patch_size[0])

    def _normalisation(self) -> tuple[list[float], list[float]]:
        step = next((t for t in getattr(self.transform, "transforms", []) if hasattr(t, "mean") and hasattr(t, "std")), None)
        if step is None:
            raise ModelError(f"model '{self.name}': no normalisation step in its preprocessing")
        return list(step.mean), list(step.std)

    def _tokens(self, pixels):
        """Final-layer patch tokens through the same head the image vector takes: ``ln_post`` then ``proj``."""
        visual = self.model.visual
        if hasattr(visual, "trunk"):
            x = visual.trunk.forward_features(pixels)  # timm: the final norm is applied
            tokens = visual.head(x[:, getattr(visual.trunk, "num_prefix_tokens", 1):])
        else:
            if getattr(visual, "attn_pool", None) is not None:
                raise ModelError(f"model '{self.name}' pools with attention; its patch tokens are not in the embedding space")
            x = visual.ln_post(visual.transformer(visual._embeds(pixels)))
            side = pixels.shape[-1] // self._dense_geometry()[1]
            tokens = x[:, x.shape[1] - side * side:]
            if visual.proj is not None:
                tokens = tokens @ visual.proj
        side = int(round(tokens.shape[1] ** 0.5))
        return tokens.reshape(tokens.shape[0], side, side, -1)

    def _embed_text(self, texts: list[str]) -> np.ndarray:
        import open_clip
        import torch

        if self._tokenizer is None:
            self._tokenizer = open_clip.get_tokenizer(self._tokenizer_name)
        tokens = self._tokenizer(texts).to(self.device)
        with torch.inference_mode():
            return self.model.encode_text(tokens).float().cpu().numpy()
