"""`n2eye convert`: a transformers Lfm2Vl checkpoint (made with transformers' own classes, saved as LiquidAI's
repos are) comes in, answers token for token and logit for logit as `Lfm2VlForConditionalGeneration`, trains,
serves, and goes back out as a native Lfm2Vl folder with identical weights that loads without remote code."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_naflex_pipeline import BIG, SMALL, picture, write_mixed_dataset
from test_processor_naflex import _reference_processor

ATOL = 1e-4  # the bar for logits in float32


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    from n2eye.fixtures.lfm2vl import make_tiny_lfm2vl

    return make_tiny_lfm2vl(tmp_path_factory.mktemp("lfm2vl") / "LFM2-VL-tiny")


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory) -> Path:
    from n2eye.convert import ConvertConfig, convert

    path, report = convert(ConvertConfig(model=str(source), to="n2eye", out=str(tmp_path_factory.mktemp("c") / "eye")))
    assert report["weights"] == 84 and report["dropped_weights"] == []
    assert report["chat_template"].startswith("N2-Eye's")
    return path


@pytest.fixture(scope="module")
def pair(source, converted):
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        Lfm2VlForConditionalGeneration,
    )

    reference = Lfm2VlForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    ours = AutoModelForImageTextToText.from_pretrained(converted, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(converted, trust_remote_code=True)
    return reference, ours, processor


def _two_image_prompt(processor) -> str:
    content = [{"type": "image"}, {"type": "text", "text": "and"}, {"type": "image"}, {"type": "text", "text": "?"}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def test_converted_processor_keeps_the_source_tokenizer_and_settings(source, converted, pair):
    from transformers import AutoTokenizer

    _, ours, processor = pair
    theirs = AutoTokenizer.from_pretrained(source)
    assert processor.tokenizer.get_vocab() == theirs.get_vocab()
    assert ours.config.image_token_id == theirs.convert_tokens_to_ids("<image>") == processor.image_token_id
    preprocessor = json.loads((source / "preprocessor_config.json").read_text())
    for name, value in processor.image_policy.items():
        assert preprocessor[name] == value, name
    assert processor.default_system_prompt is None  # LFM2-VL has no default system prompt
    # the same text as the source's own template, with N2-Eye's assistant marks for training
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == theirs.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=False)  # fmt: skip
    assert json.loads((source / "generation_config.json").read_text())["min_p"] == ours.generation_config.min_p


def test_token_ids_equal_transformers_lfm2vl_processor(pair):
    """A tiled 1600x1200 image and an upscaled 100x80 one: transformers' Lfm2VlProcessor expansion, same ids."""
    _, _, processor = pair
    text = _two_image_prompt(processor)
    images = [picture(BIG), picture(SMALL, seed=1)]
    ours = processor(images=images, text=text)["input_ids"][0]
    reference = _reference_processor(processor)(images=[images], text=text)["input_ids"][0]
    assert list(ours) == list(reference)
    assert list(ours).count(processor.image_token_id) == 6 * 256 + 18 * 13 + 9 * 8


@pytest.mark.parametrize("with_images", [True, False])
def test_logits_equal_lfm2vl_for_conditional_generation(pair, with_images):
    reference, ours, processor = pair
    if with_images:
        inputs = processor(images=[picture(BIG), picture(SMALL, seed=1)], text=_two_image_prompt(processor),
                           return_tensors="pt")  # fmt: skip
        assert inputs["pixel_values"].shape[0] == 8  # 6 tiles + thumbnail + the small image
    else:
        text = processor.apply_chat_template([{"role": "user", "content": "Hello there"}], add_generation_prompt=True)
        inputs = processor(text=text, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**inputs).logits
        got = ours(**inputs).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= ATOL
    assert expected.std().item() > 0.05  # logits that vary: the comparison can fail


def test_greedy_answers_equal_lfm2vl(pair):
    reference, ours, processor = pair
    inputs = processor(images=[picture(BIG)], text=processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
        add_generation_prompt=True), return_tensors="pt")  # fmt: skip
    settings = {"max_new_tokens": 6, "do_sample": False, "min_p": None, "temperature": None,
                "repetition_penalty": 1.0, "suppress_tokens": None}  # fmt: skip
    with torch.no_grad():
        assert torch.equal(ours.generate(**inputs, **settings), reference.generate(**inputs, **settings))


@pytest.fixture(scope="module")
def exported(converted, tmp_path_factory) -> Path:
    from n2eye.convert import ConvertConfig, convert

    path, report = convert(ConvertConfig(model=str(converted), to="lfm2-vl", out=str(tmp_path_factory.mktemp("x") / "out")))
    assert report["weights"] == 84
    return path


def test_export_is_native_lfm2vl_with_identical_weights(source, exported):
    assert not list(exported.glob("*.py"))
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "lfm2_vl" and "auto_map" not in config
    assert config["architectures"] == ["Lfm2VlForConditionalGeneration"]
    for name in ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        text = (exported / name).read_text()
        assert "n2eye" not in text.lower() and "auto_map" not in text, name
    assert json.loads((exported / "n2eye_convert.json").read_text())["to"] == "lfm2-vl"  # says what it is
    theirs, ours = load_file(source / "model.safetensors"), load_file(exported / "model.safetensors")
    assert sorted(theirs) == sorted(ours)
    for key in theirs:
        assert torch.equal(theirs[key], ours[key]), key
    reference = json.loads((source / "preprocessor_config.json").read_text())
    assert json.loads((exported / "preprocessor_config.json").read_text()) == reference


def test_export_loads_in_a_fresh_process_without_remote_code(exported, source):
    """Plain transformers, no trust_remote_code: the config, the model (same logits as the source on a prompt)
    and the tokenizer; every image-processor setting is one Lfm2VlImageProcessor takes (max_num_patches: one it
    computes, as LiquidAI's files carry it)."""
    script = textwrap.dedent(f"""
        import json, torch
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoTokenizer
        config = AutoConfig.from_pretrained({str(exported)!r})
        model = AutoModelForImageTextToText.from_pretrained({str(exported)!r}).eval()
        source = AutoModelForImageTextToText.from_pretrained({str(source)!r}).eval()
        tokenizer = AutoTokenizer.from_pretrained({str(exported)!r})
        ids = tokenizer.apply_chat_template([{{"role": "user", "content": "Hi"}}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        with torch.no_grad():
            diff = (model(input_ids=ids).logits - source(input_ids=ids).logits).abs().max().item()
        print(json.dumps({{"class": type(model).__name__, "diff": diff,
                          "remote": bool(getattr(config, "auto_map", None))}}))
    """)
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"class": "Lfm2VlForConditionalGeneration", "diff": 0.0, "remote": False}
    # (the image processor class imports torchvision, absent here: its settings are checked by name instead)
    from test_image_policy import _reference
    from transformers.processing_utils import ImagesKwargs

    known = set(_reference().Lfm2VlImageProcessorKwargs.__annotations__) | set(ImagesKwargs.__annotations__)
    settings = json.loads((exported / "preprocessor_config.json").read_text())
    assert sorted(set(settings) - known) == ["image_processor_type", "max_num_patches", "processor_class"]


def test_reimport_of_an_export_gives_the_same_checkpoint(converted, exported, tmp_path):
    from n2eye.convert import ConvertConfig, convert

    again, _ = convert(ConvertConfig(model=str(exported), to="n2eye", out=str(tmp_path / "again")))
    a, b = load_file(converted / "model.safetensors"), load_file(again / "model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    first, second = (json.loads((p / "processor_config.json").read_text()) for p in (converted, again))
    assert first == second


# ---- the whole loop on an imported model ---------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "full", "projector"])
def test_train_serve_eval_and_export_an_imported_model(converted, mode, tmp_path):
    """Train on images of several sizes (every mode: LoRA with the vision tower unfrozen, full, projector only),
    evaluate, serve a 1600x1200 photo through the OpenAI API, export: the exported Lfm2Vl gives the trained
    model's logits."""
    from test_train import run_train
    from transformers import (
        AutoModelForImageTextToText,
        AutoProcessor,
        Lfm2VlForConditionalGeneration,
    )

    import n2eye
    from n2eye.convert import ConvertConfig, convert
    from n2eye.eval.runner import EvalConfig, evaluate

    data = write_mixed_dataset(tmp_path / "data")
    options = {"train": mode, "max_steps": 2, "batch_size": 2, "max_length": 4096, "feature_cache": False}
    if mode == "lora":
        options.update(train_vision=True, merge=True)
    trained = run_train(converted, data, tmp_path / "run", **options)
    before, after = load_file(converted / "model.safetensors"), load_file(Path(trained) / "model.safetensors")
    changed = {k.split(".")[1] for k in before if not torch.equal(before[k], after[k])}
    expected = {"lora": {"multi_modal_projector", "language_model", "vision_tower"},
                "full": {"multi_modal_projector", "language_model"}, "projector": {"multi_modal_projector"}}  # fmt: skip
    assert changed == expected[mode]

    result = evaluate(EvalConfig(model=str(trained), data=str(data), out=str(tmp_path / "eval.json"),
                                 max_new_tokens=2, batch_size=4))  # fmt: skip
    assert result["n"] == 7

    if mode == "lora":
        pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
        from test_naflex_pipeline import _data_uri
        from test_server import Server

        server = Server(n2eye.load(trained))
        try:
            photo = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(picture(BIG))}},
                                                 {"type": "text", "text": "What is it?"}]}  # fmt: skip
            reply = server.client().chat.completions.create(model="tiny-eye", messages=[photo], max_tokens=3)
            assert reply.choices[0].message.role == "assistant" and reply.usage.prompt_tokens > 1770
        finally:
            server.stop()

    out, _ = convert(ConvertConfig(model=str(trained), to="lfm2-vl", out=str(tmp_path / "native")))
    native = Lfm2VlForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ours = AutoModelForImageTextToText.from_pretrained(trained, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(trained, trust_remote_code=True)
    inputs = processor(images=[picture(BIG, seed=3)], text=processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
        add_generation_prompt=True), return_tensors="pt")  # fmt: skip
    with torch.no_grad():
        assert (native(**inputs).logits - ours(**inputs).logits).abs().max().item() <= ATOL


# ---- what can't be converted, and why --------------------------------------------------------------------------------
def _copy(source: Path, to: Path) -> Path:
    shutil.copytree(source, to)
    return to


def _with_config(source: Path, to: Path, **changes) -> Path:
    """A copy of `source` whose config.json has `changes`."""
    folder = _copy(source, to)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def _convert(model, to="n2eye", out=None, tmp_path=None):
    from n2eye.convert import ConvertConfig, convert

    return convert(ConvertConfig(model=str(model), to=to, out=str(out or tmp_path / "out")))


def test_refusals_name_the_problem(source, converted, tiny_checkpoint, tmp_path):
    from n2eye.convert.lfm2vl import ConversionError

    no_weights = _copy(source, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="no weights"):
        _convert(no_weights, tmp_path=tmp_path)

    with pytest.raises(ConversionError, match="do not (match|fit) its config.json"):
        _convert(_with_config(source, tmp_path / "wrong-config", projector_hidden_size=40), tmp_path=tmp_path)
    with pytest.raises(ConversionError, match="different models"):
        _convert(_with_config(source, tmp_path / "wrong-image-id", image_token_id=5), tmp_path=tmp_path)

    with pytest.raises(ConversionError, match="already an N2-Eye checkpoint"):
        _convert(converted, tmp_path=tmp_path)
    with pytest.raises(ConversionError, match="no such folder"):
        _convert(tmp_path / "missing" / "folder", tmp_path=tmp_path)
    with pytest.raises(ConversionError, match="fixed resolution.*'mlp'.*n2eye build --preset lfm2-vl-450m"):
        _convert(tiny_checkpoint, to="lfm2-vl", tmp_path=tmp_path)
    with pytest.raises(ConversionError, match="exports N2-Eye checkpoints"):
        _convert(source, to="lfm2-vl", tmp_path=tmp_path)
    with pytest.raises(ValueError, match="choose one of"):
        _convert(source, to="onnx", tmp_path=tmp_path)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    with pytest.raises(OSError, match="refusing to replace it"):
        _convert(source, out=taken)
    assert (taken / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written folders left


def test_a_different_chat_template_is_kept_and_training_says_why_it_cannot(tmp_path):
    """A source whose template renders differently keeps it verbatim (prompts as the original's); training it
    then stops before any work, naming the missing {% generation %} blocks."""
    from test_train import run_train

    from n2eye.fixtures.lfm2vl import LFM2_VL_STYLE_TEMPLATE, make_tiny_lfm2vl

    other = LFM2_VL_STYLE_TEMPLATE.replace('"<|im_start|>system\\n"', '"<|im_start|>system (custom)\\n"')
    source = make_tiny_lfm2vl(tmp_path / "src", chat_template=other)
    path, report = _convert(source, tmp_path=tmp_path)
    assert "kept verbatim" in report["chat_template"] and "probe 2" in report["chat_template"]
    assert (path / "chat_template.jinja").read_text() == other
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    assert processor.chat_template == other
    data = write_mixed_dataset(tmp_path / "data")
    with pytest.raises(ValueError, match="no \\{% generation %\\} blocks"):
        run_train(path, data, tmp_path / "run")


def test_cli_prints_what_it_wrote(source, tmp_path, capsys):
    from n2eye.cli import main

    assert main(["convert", "--model", str(source), "--to", "n2eye", "--out", str(tmp_path / "eye")]) == 0
    out = capsys.readouterr().out
    assert "84 weight tensors copied unchanged" in out and "n2eye chat --model" in out
    assert main(["convert", "--model", str(tmp_path / "eye"), "--to", "lfm2-vl", "--out", str(tmp_path / "hf")]) == 0
    assert "Lfm2VlForConditionalGeneration.from_pretrained" in capsys.readouterr().out
    assert main(["convert", "--model", str(tmp_path / "nope"), "--to", "n2eye", "--out", str(tmp_path / "x")]) == 2
    assert "no such folder" in capsys.readouterr().err
