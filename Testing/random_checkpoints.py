"""Random-weight checkpoints written in the real on-disk layouts (open_clip folder, transformers folder).

Pretrained weights cannot always be downloaded (offline sites, CI). These folders load through
exactly the same code path as a real checkpoint (``local-dir:PATH``, ``hf-vit:PATH``), so tests,
benchmarks and installation checks exercise the real loaders; the vectors they give mean nothing.
"""

from __future__ import annotations

import json
import os

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
# The BiomedCLIP image tower's shape (ViT-B/16 at 224 px, 512-d): same compute, random weights.
VIT_B16_CLIP = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12},
}


def write_open_clip_folder(folder: str, model_cfg: dict | None = None, seed: int = 0) -> str:
    """Write open_clip_config.json + open_clip_pytorch_model.bin with random weights; returns the folder."""
    import open_clip
    import torch

    os.makedirs(folder, exist_ok=True)
    config = {"model_cfg": model_cfg or TINY_CLIP,
              "preprocess_cfg": {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize_mode": "shortest"}}
    with open(os.path.join(folder, "open_clip_config.json"), "w") as handle:
        json.dump(config, handle, indent=1)
    torch.manual_seed(seed)
    model = open_clip.create_model(f"local-dir:{folder}")
    torch.save(model.state_dict(), os.path.join(folder, "open_clip_pytorch_model.bin"))
    return folder


def write_dinov2_folder(folder: str, hidden_size: int = 32, layers: int = 2, image_size: int = 56, seed: int = 0) -> str:
    """Write a transformers DINOv2 checkpoint (config, safetensors, image processor) with random weights."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    config = Dinov2Config(hidden_size=hidden_size, num_hidden_layers=layers, num_attention_heads=2,
                          intermediate_size=2 * hidden_size, image_size=image_size, patch_size=14)
    Dinov2Model(config).save_pretrained(folder)
    # The facebook/dinov2-* processor settings, scaled to the tiny image size (256 -> 224 there).
    processor = BitImageProcessor(size={"shortest_edge": image_size * 256 // 224},
                                  crop_size={"height": image_size, "width": image_size}, do_center_crop=True,
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3)
    processor.save_pretrained(folder)
    return folder
