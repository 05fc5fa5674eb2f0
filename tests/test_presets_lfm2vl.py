"""The LFM2-VL presets (`lfm2-vl-450m`, `lfm2-vl-1.6b`): LiquidAI's LFM2-VL shapes from bundled configs, offline.

Published figures (what the counts below are checked against):
- Totals are the Hugging Face safetensors parameter counts of the released checkpoints (the "Model size" on
  https://huggingface.co/LiquidAI/LFM2-VL-450M (451M) and https://huggingface.co/LiquidAI/LFM2-VL-1.6B (1.58B),
  exact values from https://huggingface.co/api/models/LiquidAI/<repo>?expand[]=safetensors, as recorded in
  github.com/AlexsJones/llmfit scripts/scrape_hf_models.py: 450,822,656 and 1,584,804,000).
- Language models: the "Parameters" row of the LiquidAI/LFM2-350M and LiquidAI/LFM2-1.2B model cards
  (354,483,968 and 1,170,340,608).
- Vision encoders: the LFM2-VL card says "SigLIP2 NaFlex base (86M)" and "SigLIP2 NaFlex shape-optimized (400M)";
  the exact figures below follow from the checkpoints' config.json (vision_config; LFM2-VL-1.6B sets
  `vision_feature_layer: -2`, so its tower keeps 26 of so400m's 27 layers, then the post-layernorm) and, with the
  projector's, add up to the published totals exactly.
- Projector: config.json `projector_hidden_size: 2560`, `projector_bias: true`, `downsample_factor: 2`
  (LayerNorm(4*vision_hidden), Linear(4*vision_hidden -> 2560), GELU, Linear(2560 -> LM hidden)).
"""

from __future__ import annotations

import json

import pytest
import torch

LFM2_VL_450M = {  # LiquidAI/LFM2-VL-450M
    "language_model": 354_483_968,  # LiquidAI/LFM2-350M card
    "vision_tower": 85_843_200,  # siglip2-base-patch16-naflex, 12 layers, no pooling head ("86M")
    "projector": 10_495_488,  # 2*3072 + (3072*2560 + 2560) + (2560*1024 + 1024)
    "total": 450_822_656,  # HF safetensors total ("451M")
}
LFM2_VL_1_6B = {  # LiquidAI/LFM2-VL-1.6B
    "language_model": 1_170_340_608,  # LiquidAI/LFM2-1.2B card
    "vision_tower": 397_410_208,  # siglip2-so400m-patch16-naflex, first 26 of 27 layers, no pooling head ("400M")
    "projector": 17_053_184,  # 2*4608 + (4608*2560 + 2560) + (2560*2048 + 2048)
    "total": 1_584_804_000,  # HF safetensors total ("1.58B")
}
PUBLISHED = {"lfm2-vl-450m": LFM2_VL_450M, "lfm2-vl-1.6b": LFM2_VL_1_6B}
SHAPES = {  # preset: (vision hidden, vision layers, LM hidden)
    "lfm2-vl-450m": (768, 12, 1024),
    "lfm2-vl-1.6b": (1152, 26, 2048),
}


def meta_build(preset: str):
    """The preset's `--random-init` build path, on the meta device (no memory for weights)."""
    from n2eye.build import build_random

    with torch.device("meta"):
        return build_random(preset)


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_models(preset):
    from n2eye.build import count_parameters

    model, _ = meta_build(preset)
    counts = count_parameters(model)
    assert counts == PUBLISHED[preset]
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]  # tied head counted once


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_naflex_vision_and_lfm2_vl_projector(preset):
    from transformers import Siglip2VisionModel

    model, processor = meta_build(preset)
    config = model.config
    vision_hidden, vision_layers, lm_hidden = SHAPES[preset]
    assert config.vision_config.model_type == "siglip2_vision_model"  # SigLIP2 NaFlex
    assert isinstance(model.model.vision_tower, Siglip2VisionModel)
    assert (config.vision_config.hidden_size, config.vision_config.num_hidden_layers) == (vision_hidden, vision_layers)
    assert (config.vision_config.patch_size, config.vision_config.num_patches) == (16, 256)
    assert len(model.model.vision_tower.encoder.layers) == vision_layers
    assert not config.vision_config.vision_use_head and config.vision_feature_layer == -1
    assert config.projector_type == "pixel_unshuffle_mlp" and config.projector_factor == 2
    assert (config.projector_hidden_size, config.projector_hidden_act, config.projector_bias) == (2560, "gelu", True)
    shapes = {k: tuple(v.shape) for k, v in model.model.multi_modal_projector.state_dict().items()}
    assert shapes == {
        "layer_norm.weight": (4 * vision_hidden,),
        "layer_norm.bias": (4 * vision_hidden,),
        "linear_1.weight": (2560, 4 * vision_hidden),
        "linear_1.bias": (2560,),
        "linear_2.weight": (lm_hidden, 2560),
        "linear_2.bias": (lm_hidden,),
    }
    assert config.text_config.hidden_size == lm_hidden and config.tie_word_embeddings
    assert type(processor.image_processor).__name__.startswith("Siglip2ImageProcessor")
    assert (processor.patch_size, processor.downsample_factor) == (16, 2)


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_same_tensors_as_transformers_lfm2vl(preset):
    """Every tensor name and shape equals transformers' own Lfm2VlForConditionalGeneration with the same
    configs, so the preset maps onto the Lfm2Vl layout unchanged."""
    from transformers import Lfm2VlConfig, Lfm2VlForConditionalGeneration

    model, _ = meta_build(preset)
    c = model.config
    with torch.device("meta"):
        reference = Lfm2VlForConditionalGeneration(
            Lfm2VlConfig(
                text_config=c.text_config.to_dict(),
                vision_config=c.vision_config.to_dict(),
                projector_hidden_size=c.projector_hidden_size,
                projector_bias=c.projector_bias,
                downsample_factor=c.downsample_factor,
            )
        )
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert ours == theirs
    assert sum(p.numel() for p in reference.parameters()) == PUBLISHED[preset]["total"]


def test_bundled_configs():
    from transformers import Lfm2Config

    from n2eye.presets import load_bundled_json

    lm = Lfm2Config(**load_bundled_json("lfm2-350m.json"))
    assert (lm.hidden_size, lm.num_hidden_layers, lm.num_attention_heads, lm.num_key_value_heads) == (1024, 16, 16, 8)
    assert lm.layer_types == [
        "conv", "conv", "full_attention", "conv", "conv", "full_attention", "conv", "conv",
        "full_attention", "conv", "full_attention", "conv", "full_attention", "conv", "full_attention", "conv",
    ]  # fmt: skip
    assert (lm.vocab_size, lm.intermediate_size) == (65536, 6656)  # 6656 auto-adjusted to a 4608-wide SwiGLU
    for name, (hidden, ffn, layers, heads) in {
        "siglip2-base-patch16-naflex": (768, 3072, 12, 12),
        "siglip2-so400m-patch16-naflex": (1152, 4304, 27, 16),  # the full encoder; lfm2-vl-1.6b keeps 26
    }.items():
        raw = load_bundled_json(f"{name}.json")
        assert raw["model_type"] == "siglip2_vision_model"
        assert (raw["hidden_size"], raw["intermediate_size"], raw["num_hidden_layers"], raw["num_attention_heads"]) == (
            hidden, ffn, layers, heads)  # fmt: skip
        assert (raw["patch_size"], raw["num_patches"]) == (16, 256)
        pre = load_bundled_json(f"{name}.preprocessor.json")
        assert pre["image_processor_type"] == "Siglip2ImageProcessor"
        assert (pre["patch_size"], pre["max_num_patches"], pre["resample"]) == (16, 256, 2)


def test_presets_are_listed_in_help_and_in_the_unknown_preset_error(capsys):
    from n2eye.cli import make_parser
    from n2eye.presets import get_preset

    with pytest.raises(ValueError) as excinfo:
        get_preset("lfm2-vl")
    for name in ("lfm2-vl-450m", "lfm2-vl-1.6b"):
        assert name in str(excinfo.value)
    with pytest.raises(SystemExit):
        make_parser(["build", "--help"]).parse_args(["build", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "`lfm2-vl-450m`" in help_text and "`lfm2-vl-1.6b`" in help_text


def test_lfm2_vl_450m_random_init_builds_a_checkpoint(tmp_path, capsys):
    """`n2eye build --preset lfm2-vl-450m --random-init` (about 12 s and 1.7 GB on 2 CPU cores): a complete folder,
    the published counts printed, LFM2-VL's image policy in its processor, and through plain transformers a tiled
    conversation in a fresh process (about 15 s) and a small image through generate."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from conftest import draw_shapes
    from n2eye.build import BuildConfig, build_and_report
    from n2eye.modeling.image_policy import image_marker_tokens
    from test_processor_naflex import run_fresh_process_check

    out = build_and_report(BuildConfig(out=str(tmp_path / "lfm2-vl-450m"), preset="lfm2-vl-450m", random_init=True,
                                       dtype="bfloat16"))  # fmt: skip
    printed = capsys.readouterr().out
    expected = "language_model 354,483,968, vision_tower 85,843,200, projector 10,495,488, total 450,822,656"
    assert f"parameters: {expected}" in printed
    assert "siglip2_vision_model NaFlex" in printed and "projector pixel_unshuffle_mlp (hidden 2560)" in printed
    assert json.loads((out / "n2eye_build.json").read_text())["parameters"] == LFM2_VL_450M
    config = json.loads((out / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "siglip2_vision_model"
    assert (config["projector_hidden_size"], config["projector_bias"], config["downsample_factor"]) == (2560, True, 2)
    for name in ("model.safetensors", "tokenizer.json", "processor_config.json", "chat_template.jinja",
                 "generation_config.json", "modeling_n2eye.py", "image_policy.py"):  # fmt: skip
        assert (out / name).is_file(), name
    policy = json.loads((out / "processor_config.json").read_text())["image_policy"]
    assert policy["encoder_patch_size"] == 16 and policy["downsample_factor"] == 2 and policy["tile_size"] == 512
    added = {t["content"] for t in json.loads((out / "tokenizer.json").read_text())["added_tokens"] if t["special"]}
    assert set(image_marker_tokens()) <= added
    run_fresh_process_check(out, tmp_path, dtype="bfloat16")

    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": draw_shapes(size=(200, 120))},
                                             {"type": "text", "text": "Hi"}]}]  # fmt: skip
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    inputs.pop("assistant_masks", None)
    assert inputs["spatial_shapes"].tolist() == [[14, 22]]  # 200x120 upscaled to 352x224: 64..256 tokens of 32px
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 7 * 11  # 2x2 pixel unshuffle
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 1


def test_vision_layers_drop_the_last_encoder_layers_when_built_from_weights(tmp_path, n2eye_cache):
    """From real backbones (as `build --preset lfm2-vl-1.6b` does with google/siglip2-so400m-patch16-naflex), the
    preset's vision_layers keeps the encoder's first layers with their weights and drops the rest."""
    from transformers import Siglip2ImageProcessor, Siglip2VisionConfig, Siglip2VisionModel

    from n2eye.build import build_from_sources
    from n2eye.fixtures import make_tiny_backbones

    paths = make_tiny_backbones(n2eye_cache / "tiny-backbones")
    folder = tmp_path / "naflex"
    torch.manual_seed(0)
    config = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                                 patch_size=16, num_patches=64)  # fmt: skip
    Siglip2VisionModel(config).save_pretrained(folder)
    Siglip2ImageProcessor(patch_size=16, max_num_patches=64).save_pretrained(folder)
    model, _ = build_from_sources(str(paths["lm"]), str(folder), "pixel_unshuffle_mlp", projector_hidden_size=48,
                                  vision_layers=2)  # fmt: skip
    source = Siglip2VisionModel.from_pretrained(folder)
    tower = model.model.vision_tower
    assert model.config.vision_config.num_hidden_layers == 2 and len(tower.encoder.layers) == 2
    for i in range(2):
        torch.testing.assert_close(tower.encoder.layers[i].mlp.fc1.weight, source.encoder.layers[i].mlp.fc1.weight)
    torch.testing.assert_close(tower.post_layernorm.weight, source.post_layernorm.weight)
    assert model.model.multi_modal_projector.linear_1.weight.shape == (48, 4 * 32)
    with pytest.raises(ValueError, match="vision_layers=4: the vision encoder has 3 layers"):
        build_from_sources(str(paths["lm"]), str(folder), "pixel_unshuffle_mlp", vision_layers=4)
