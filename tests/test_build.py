"""`n2eye build` as users run it: presets, backbones from local folders, the full-size random-init shapes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import draw_shapes

LFM2_1_2B_PARAMS = 1_170_340_608  # the LiquidAI/LFM2-1.2B model card


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "n2eye.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_build_from_local_backbones_adds_tokens_and_keeps_weights(tmp_path, n2eye_cache):
    from transformers import AutoModelForCausalLM, AutoTokenizer, SiglipVisionModel

    from n2eye.build import BuildConfig, build
    from n2eye.fixtures import make_tiny_backbones

    paths = make_tiny_backbones(n2eye_cache / "tiny-backbones")
    lm_tokenizer = AutoTokenizer.from_pretrained(paths["lm"])
    assert "<image>" not in lm_tokenizer.get_vocab()  # like the real LFM2 tokenizer
    out = build(BuildConfig(out=str(tmp_path / "m"), lm=str(paths["lm"]), vision=str(paths["vision"])))
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    lm = AutoModelForCausalLM.from_pretrained(paths["lm"])
    vision = SiglipVisionModel.from_pretrained(paths["vision"])
    n_old = lm.config.vocab_size
    # original rows kept, new rows added for <image>, <|image_start|>, <|image_end|>; head tied to embeddings
    assert model.config.text_config.vocab_size == n_old + 3
    torch.testing.assert_close(model.get_input_embeddings().weight[:n_old], lm.get_input_embeddings().weight)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    layer = model.model.vision_tower.encoder.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(layer, vision.encoder.layers[0].self_attn.q_proj.weight)
    summary = json.loads((out / "n2eye_build.json").read_text())
    assert summary["parameters"]["total"] == sum(p.numel() for p in model.parameters())


@pytest.mark.slow  # subprocess-heavy: CI's second tier (pytest -m slow)
def test_naflex_checkpoint_generates_through_transformers_and_our_engine(tmp_path, n2eye_cache):
    """A SigLIP2 NaFlex encoder builds and runs through plain transformers (the processor's whole output) and
    through our engine, which passes its spatial_shapes and pixel_attention_mask on (tests/test_naflex_pipeline.py
    checks the engine's answers against generate)."""
    from transformers import (AutoModelForImageTextToText, AutoProcessor, Siglip2ImageProcessor, Siglip2VisionConfig,
                              Siglip2VisionModel)  # fmt: skip

    import n2eye
    from n2eye.build import BuildConfig, build
    from n2eye.fixtures import make_tiny_backbones

    paths = make_tiny_backbones(n2eye_cache / "tiny-backbones")
    vision = tmp_path / "naflex"
    config = Siglip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 patch_size=16, num_patches=64)  # fmt: skip
    Siglip2VisionModel(config).save_pretrained(vision)
    Siglip2ImageProcessor(patch_size=16, max_num_patches=64).save_pretrained(vision)
    out = build(BuildConfig(out=str(tmp_path / "m"), lm=str(paths["lm"]), vision=str(vision),
                            projector="pixel_unshuffle_mlp"))  # fmt: skip
    messages = [{"role": "user", "content": [{"type": "image", "image": draw_shapes(size=(200, 120))},
                                             {"type": "text", "text": "Colour?"}]}]  # fmt: skip
    model = AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")  # fmt: skip
    inputs.pop("assistant_masks", None)
    assert "spatial_shapes" in inputs
    generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 2
    answer = n2eye.load(out).chat(messages, max_new_tokens=2, temperature=0)
    assert isinstance(answer, str)


def test_cli_build_and_generate_tiny(tmp_path):
    out = tmp_path / "tiny-n2eye"
    result = run_cli("build", "--preset", "tiny", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Built N2-Eye checkpoint" in result.stdout and "projector mlp" in result.stdout
    image = tmp_path / "img.png"
    draw_shapes().save(image)
    result = run_cli("generate", "--model", str(out), "--image", str(image), "--prompt", "What colour is the circle?",
                     "--max-new-tokens", "5", "--temperature", "0")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]


def test_cli_build_from_yaml_config(tmp_path):
    config = tmp_path / "build.yaml"
    config.write_text(f"preset: tiny\nprojector: pixel_unshuffle_mlp\nout: {tmp_path / 'from-yaml'}\n")
    result = run_cli("build", "--config", str(config))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "from-yaml" / "config.json").read_text())["projector_type"] == "pixel_unshuffle_mlp"
    bad = tmp_path / "bad.yaml"
    bad.write_text("preset: tiny\nprojektor: mlp\n")
    result = run_cli("build", "--config", str(bad), "--out", str(tmp_path / "x"))
    assert result.returncode == 2 and "projektor" in result.stderr


def expected_n2eye_1_3b_parameters() -> dict[str, int]:
    """Counted independently from the bundled backbone configs, on the meta device."""
    from transformers import Lfm2Config, Lfm2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from n2eye.presets import load_bundled_json

    with torch.device("meta"):
        lm = Lfm2ForCausalLM(Lfm2Config(**load_bundled_json("lfm2-1.2b.json")))
        vision_config = SiglipVisionConfig(**load_bundled_json("siglip2-so400m-patch14-384.json"))
        vision_config.vision_use_head = False  # N2-Eye uses patch features; the pooling head is dropped
        vision = SiglipVisionModel(vision_config)
    lm_params = sum(p.numel() for p in lm.parameters())
    vision_params = sum(p.numel() for p in vision.parameters())
    hidden, vis = 2048, 1152
    projector = vis * hidden + hidden + hidden * hidden + hidden  # Linear(1152->2048), GELU, Linear(2048->2048)
    return {"language_model": lm_params, "vision_tower": vision_params, "projector": projector,
            "total": lm_params + vision_params + projector}  # fmt: skip


@pytest.mark.slow  # subprocess-heavy: CI's second tier (pytest -m slow)
def test_n2eye_1_3b_random_init_shapes_and_generates(tmp_path):
    expected = expected_n2eye_1_3b_parameters()
    assert expected["language_model"] == LFM2_1_2B_PARAMS
    out = tmp_path / "n2eye-1.3b"
    result = run_cli("build", "--preset", "n2eye-1.3b", "--random-init", "--dtype", "bfloat16", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "n2eye_build.json").read_text())
    assert summary["parameters"] == expected
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.bfloat16).eval()
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": draw_shapes()}, {"type": "text", "text": "Hi"}]}]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert inputs["pixel_values"].shape == (1, 3, 384, 384)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 729
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=1, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 1


@pytest.mark.parametrize("preset", ["tiny", "n2eye-1.3b"])
def test_presets_listed_in_unknown_preset_error(preset):
    from n2eye.presets import get_preset

    with pytest.raises(ValueError, match=preset):
        get_preset("nope")


def test_every_command_help_prints(capsys):
    """`n2eye <command> --help` for every command: field docstrings become help text, and a '%' in one must not
    break argparse's formatting (`n2eye train --help` once crashed on "1.07x ... 20%")."""
    from n2eye.cli import COMMANDS, make_parser

    for name in COMMANDS:
        with pytest.raises(SystemExit) as done:
            make_parser([name, "--help"]).parse_args([name, "--help"])
        assert done.value.code == 0, name
        assert "--" in capsys.readouterr().out, name


@pytest.mark.parametrize("blocked", ["fastapi", "uvicorn"])
def test_a_missing_extra_names_the_install_that_fixes_it(tmp_path, blocked):
    """`n2eye serve` without the [serve] extra says which `pip install` fixes it instead of a traceback, whether
    the package is imported with the command's module (fastapi) or inside its run (uvicorn)."""
    import subprocess
    import sys

    argv, fix = ["serve", "--model", str(tmp_path / "none")], 'pip install "n2eye[serve]"'
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            f"from n2eye.cli import main\nsys.exit(main({argv!r}))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and f"'{blocked}'" in done.stderr and fix in done.stderr, done.stderr
