"""Shared fixtures: tiny N2-Eye checkpoints built once per test session, offline, with the real build path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def n2eye_cache(tmp_path_factory) -> Path:
    """Keeps generated backbones/tokenizers inside the test session, never in the user's cache."""
    path = tmp_path_factory.mktemp("n2eye-cache")
    os.environ["N2EYE_CACHE"] = str(path)
    return path


def _build(out: Path, **kwargs) -> Path:
    from n2eye.build import BuildConfig, build

    return build(BuildConfig(out=str(out), **kwargs))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """`n2eye build --preset tiny` (MLP projector, 64 tokens per image)."""
    return _build(tmp_path_factory.mktemp("ckpt") / "tiny", preset="tiny")


@pytest.fixture(scope="session")
def tiny_unshuffle_checkpoint(tmp_path_factory) -> Path:
    """The tiny preset with the LFM2-VL pixel-unshuffle projector (16 tokens per image)."""
    return _build(tmp_path_factory.mktemp("ckpt") / "tiny-unshuffle", preset="tiny", projector="pixel_unshuffle_mlp")


@pytest.fixture(scope="session")
def naflex_checkpoint(tmp_path_factory, n2eye_cache) -> Path:
    """A tiny LFM2-VL-layout checkpoint: the tiny LM + a 2-layer SigLIP2 NaFlex (patch 16) + pixel unshuffle, built
    from local folders by the real build path (`build_from_sources`, as `n2eye build --lm --vision` does)."""
    import torch
    from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    from n2eye.build import build_from_sources
    from n2eye.checkpoint import default_generation_config, save_checkpoint
    from n2eye.fixtures import make_tiny_backbones

    paths = make_tiny_backbones(n2eye_cache / "tiny-backbones")
    vision = tmp_path_factory.mktemp("naflex-vision")
    torch.manual_seed(0)
    config = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 patch_size=16, num_patches=256)  # fmt: skip
    Siglip2VisionModel(config).save_pretrained(vision)
    Siglip2ImageProcessor(patch_size=16, max_num_patches=256).save_pretrained(vision)
    model, processor = build_from_sources(str(paths["lm"]), str(vision), "pixel_unshuffle_mlp",
                                          projector_hidden_size=48)  # fmt: skip
    out = tmp_path_factory.mktemp("ckpt") / "naflex"
    return save_checkpoint(model, processor, out, default_generation_config(processor.tokenizer))


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """Model + processor loaded the way users load them (trust_remote_code)."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    return model, processor


def draw_shapes(size=(96, 80), background=(30, 120, 200), shape="circle", color=(250, 20, 20)) -> Image.Image:
    """A small synthetic picture (no files from the network)."""
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    box = (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    return image


@pytest.fixture
def image_path(tmp_path) -> Path:
    path = tmp_path / "shapes.png"
    draw_shapes().save(path)
    return path


@pytest.fixture(scope="session")
def trained_tiny(tiny_checkpoint, tmp_path_factory) -> Path:
    """The tiny model after a short run on examples/colours: its greedy answers vary with the input."""
    from n2eye.train.config import TrainConfig
    from n2eye.train.trainer import train

    data = Path(__file__).resolve().parents[1] / "examples" / "colours" / "train.jsonl"
    out = tmp_path_factory.mktemp("trained") / "run"
    return train(TrainConfig(model=str(tiny_checkpoint), data=str(data), out=str(out), max_steps=60, lr=3e-3,
                             batch_size=4, grad_accum=1, bf16=False, gradient_checkpointing=False, seed=1))  # fmt: skip
