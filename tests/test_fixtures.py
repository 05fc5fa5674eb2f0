"""Offline fixtures: tiny LFM2-style tokenizer, tiny LFM2 / SigLIP backbones, bundled presets."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

try:
    import n2eye.fixtures  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from n2eye.fixtures import (
    LFM2_SPECIAL_TOKENS,
    load_preset,
    make_tiny_backbones,
    make_tiny_siglip,
    train_tiny_tokenizer,
)
from n2eye.fixtures.backbones import _DONE_MARKER, _build_atomically

LFM2_1_2B_PARAMS = 1_170_340_608  # == "Parameters" on the LiquidAI/LFM2-1.2B model card
SO400M_VISION_PARAMS = 428_225_600  # SiglipVisionModel incl. the attention-pooling head
SO400M_HEAD_PARAMS = 15_238_352

ROUND_TRIP_TEXTS = [
    "Hello world\n",
    "\n",
    "line one\nline two\n\n  indented\tand tabbed\r\n",
    '[{"label": "circle", "bbox": [0.12, 0.5, 0.3, 0.9]}]',
    '<|tool_call_start|>[get_weather(location="Paris")]<|tool_call_end|>',
    "café naïve Zürich — 東京 日本語 한국어 العربية Ελλάδα 🙂🚀 ½ °C",
    "<|startoftext|><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
    "   leading and trailing spaces   ",
    "",
]


@pytest.fixture(scope="session")
def backbones(tmp_path_factory):
    return make_tiny_backbones(tmp_path_factory.mktemp("backbones"))


@pytest.fixture(scope="session")
def tokenizer(backbones):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(backbones["lm"])


@pytest.fixture(scope="session")
def lm(backbones):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(backbones["lm"]).eval()


def _meta_params(model_cls, config) -> int:
    with torch.device("meta"):
        model = model_cls(config)
    return sum(p.numel() for p in model.parameters())


# --- tokenizer ---------------------------------------------------------------


def test_special_tokens_are_single_ids_in_lfm2_order(tokenizer):
    for i, token in enumerate(LFM2_SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == i
        assert tokenizer.encode(token, add_special_tokens=False) == [i]
        assert tokenizer.decode([i]) == token
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|pad|>", 0)
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|startoftext|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 7)
    assert len(tokenizer) == 1024
    assert tokenizer.model_max_length == 32768


def test_image_tokens_are_not_added(tokenizer):
    vocab = tokenizer.get_vocab()
    for token in ("<image>", "<|image_start|>", "<|image_end|>"):
        assert token not in vocab
        assert len(tokenizer.encode(token, add_special_tokens=False)) > 1


def test_bos_is_prepended_like_the_real_lfm2_tokenizer(tokenizer):
    ids = tokenizer("Hello world").input_ids
    bare = tokenizer("Hello world", add_special_tokens=False).input_ids
    assert ids == [1] + bare
    assert 1 not in bare and 7 not in bare
    # A prompt that already starts with <|startoftext|> must be tokenized without special tokens.
    prompt = "<|startoftext|><|im_start|>user\nHi<|im_end|>\n"
    assert tokenizer(prompt, add_special_tokens=False).input_ids[:2] == [1, 6]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_decode_encode_round_trips(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(tokenizer.encode(text)) == "<|startoftext|>" + text
    assert tokenizer.decode(tokenizer.encode(text), skip_special_tokens=True) == text.replace(
        "<|startoftext|>", ""
    ).replace("<|im_start|>", "").replace("<|im_end|>", "").replace("<|tool_call_start|>", "").replace(
        "<|tool_call_end|>", ""
    )


def test_newline_is_a_token(tokenizer):
    ids = tokenizer.encode("\n", add_special_tokens=False)
    assert len(ids) == 1 and tokenizer.decode(ids) == "\n"

def test_box_coordinates_tokenize_in_one_layout(tokenizer):
    """Every two-decimal coordinate is "0" "." "NN" (like the real LFM2 vocabulary, which holds all 1-3 digit
    numbers): the round tens used to split ("0.30" as 0 . 3 0 beside "0.35" as 0 . 35)."""
    assert_coordinates_in_one_layout(tokenizer)


def assert_coordinates_in_one_layout(tokenizer) -> None:
    for i in range(100):
        assert tokenizer.tokenize(f"0.{i:02d}") == ["0", ".", f"{i:02d}"], i
    assert tokenizer.tokenize("1.00") == ["1", ".", "00"]



def test_demo_tokenizer_learns_the_worlds_words_and_keeps_coordinates_whole(tmp_path, tokenizer):
    """The demo's tokenizer also trains on the shapes world's phrasing: the model-card grounding prompt comes out
    in far fewer tokens than from the generic tiny tokenizer (so packed rows hold more conversations), and box
    coordinates keep their one layout."""
    from n2eye.demo import questions, writers
    from n2eye.demo.command import DEMO_VOCAB

    demo = train_tiny_tokenizer(tmp_path, vocab_size=DEMO_VOCAB, extra_corpus=writers.tokenizer_corpus())
    prompt = questions.grounding_question("triangle")
    assert len(demo.tokenize(prompt)) <= 0.6 * len(tokenizer.tokenize(prompt))
    for word in ("Detect", "instances", "Coordinates", "normalized", "triangle"):
        assert len(demo.tokenize(" " + word)) == 1, word
    assert_coordinates_in_one_layout(demo)
    assert demo.decode(demo.encode(prompt, add_special_tokens=False)) == prompt


def test_tokenizer_training_is_deterministic(tmp_path, backbones):
    train_tiny_tokenizer(tmp_path, vocab_size=1024)
    fresh = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    saved = json.loads((backbones["lm"] / "tokenizer.json").read_text(encoding="utf-8"))
    assert fresh["model"]["vocab"] == saved["model"]["vocab"]
    assert fresh["model"]["merges"] == saved["model"]["merges"]
    assert fresh["post_processor"] == saved["post_processor"]


# --- tiny LFM2 -----------------------------------------------------------------


def test_tiny_lfm2_forward_generate_and_tied_embeddings(lm, tokenizer):
    assert type(lm).__name__ == "Lfm2ForCausalLM"
    cfg = lm.config
    assert cfg.model_type == "lfm2"
    assert set(cfg.layer_types) == {"conv", "full_attention"}
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 7, 0)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.vocab_size == len(tokenizer) == 1024
    assert lm.lm_head.weight is lm.get_input_embeddings().weight

    enc = tokenizer("There is a red circle.\n", return_tensors="pt")
    n = enc.input_ids.shape[1]
    with torch.no_grad():
        logits = lm(**enc).logits
        out = lm.generate(**enc, max_new_tokens=3, min_new_tokens=3, do_sample=False)
    assert logits.shape == (1, n, cfg.vocab_size)
    assert torch.isfinite(logits).all()
    assert out.shape == (1, n + 3)
    assert torch.equal(out[0, :n], enc.input_ids[0])


def test_tiny_backbones_layout(backbones):
    lm_files = {p.name for p in backbones["lm"].iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= lm_files
    vision_files = {p.name for p in backbones["vision"].iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= vision_files
    cfg = json.loads((backbones["vision"] / "config.json").read_text(encoding="utf-8"))
    assert cfg["model_type"] == "siglip"
    assert cfg["vision_config"]["model_type"] == "siglip_vision_model"
    assert cfg["text_config"]["model_type"] == "siglip_text_model"


# --- tiny SigLIP ---------------------------------------------------------------


def test_tiny_siglip_vision_tower_from_full_checkpoint(backbones):
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, SiglipVisionModel

    vision = SiglipVisionModel.from_pretrained(backbones["vision"]).eval()
    processor = AutoImageProcessor.from_pretrained(backbones["vision"])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 64, 64)
    assert pixel_values.min() >= -1.0 and pixel_values.max() <= 1.0
    with torch.no_grad():
        hidden = vision(pixel_values=pixel_values).last_hidden_state
    assert hidden.shape == (1, (64 // 8) ** 2, 32)

    # Same weights as the vision tower of the full model.
    full = AutoModel.from_pretrained(backbones["vision"]).eval()
    assert type(full).__name__ == "SiglipModel"
    with torch.no_grad():
        again = full.vision_model(pixel_values=pixel_values).last_hidden_state
    torch.testing.assert_close(again, hidden)


def test_tiny_siglip_is_deterministic(tmp_path, backbones):
    from safetensors.torch import load_file

    make_tiny_siglip(tmp_path / "again")
    a = load_file(tmp_path / "again" / "model.safetensors")
    b = load_file(backbones["vision"] / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- bundled reference configs --------------------------------------------------


def test_lfm2_1_2b_preset_param_count():
    from transformers import Lfm2Config, Lfm2ForCausalLM

    config = Lfm2Config(**load_preset("lfm2-1.2b"))
    assert config.layer_types == [
        "conv", "conv", "full_attention", "conv", "conv", "full_attention", "conv", "conv",
        "full_attention", "conv", "full_attention", "conv", "full_attention", "conv", "full_attention", "conv",
    ]
    assert (config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (2048, 32, 8)
    assert (config.vocab_size, config.conv_L_cache, config.intermediate_size) == (65536, 3, 12288)
    assert config.tie_word_embeddings
    assert _meta_params(Lfm2ForCausalLM, config) == LFM2_1_2B_PARAMS


def test_siglip2_so400m_preset_param_count():
    from transformers import SiglipVisionConfig, SiglipVisionModel

    raw = load_preset("siglip2-so400m-patch14-384")
    assert raw["model_type"] == "siglip_vision_model"
    config = SiglipVisionConfig(**raw)
    assert (config.image_size // config.patch_size) ** 2 == 729
    assert _meta_params(SiglipVisionModel, config) == SO400M_VISION_PARAMS
    config.vision_use_head = False
    assert _meta_params(SiglipVisionModel, config) == SO400M_VISION_PARAMS - SO400M_HEAD_PARAMS


def test_siglip2_so400m_preprocessor_preset(tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor

    raw = load_preset("siglip2-so400m-patch14-384.preprocessor")
    assert raw["image_processor_type"] == "SiglipImageProcessor"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(raw), encoding="utf-8")
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    assert dict(processor.size) == {"height": 384, "width": 384}
    assert int(processor.resample) == 2
    assert list(processor.image_mean) == [0.5] * 3 and list(processor.image_std) == [0.5] * 3
    out = processor(images=Image.new("RGB", (500, 300), (255, 0, 0)), return_tensors="pt")["pixel_values"]
    assert out.shape == (1, 3, 384, 384)
    torch.testing.assert_close(out[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


# --- idempotence / atomicity ------------------------------------------------------


def _snapshot(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*"))}


def test_make_tiny_backbones_is_idempotent(backbones):
    root = backbones["lm"].parent
    before = _snapshot(root)
    again = make_tiny_backbones(root)
    assert again == backbones
    assert _snapshot(root) == before
    assert all((p / _DONE_MARKER).is_file() for p in again.values())
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_incomplete_folder_is_rebuilt_and_failed_build_leaves_nothing(tmp_path):
    final = tmp_path / "thing"
    final.mkdir()
    (final / "half-written.bin").write_text("junk")  # no completion marker

    def build(d: Path) -> None:
        (d / "weights.bin").write_text("ok")

    assert _build_atomically(final, build) == final
    assert sorted(p.name for p in final.iterdir()) == sorted([_DONE_MARKER, "weights.bin"])

    def crash(d: Path) -> None:
        (d / "partial.bin").write_text("x")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        _build_atomically(tmp_path / "other", crash)
    assert not (tmp_path / "other").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing"]
