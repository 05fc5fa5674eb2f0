"""The Foundation contract: loading with plain transformers, save/load, tied embeddings, generation, image merge."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from conftest import draw_shapes

CARD_EXAMPLE = textwrap.dedent(
    """
    import sys
    from transformers import {auto_class}, AutoProcessor

    path, image = sys.argv[1], sys.argv[2]
    model = {auto_class}.from_pretrained(path, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    messages = [
        {{
            "role": "user",
            "content": [
                {{"type": "image", "url": image}},
                {{"type": "text", "text": "What animal is on the candy?"}},
            ],
        }},
    ]
    inputs = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    ).to(model.device)
    outputs = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    new_tokens = outputs[0][inputs["input_ids"].shape[-1]:]
    print(processor.decode(new_tokens))
    assert len(new_tokens) >= 1
    assert not any(name.startswith("n2eye") for name in sys.modules), "the user's process must not need n2eye"
    print("MODEL_CLASS", type(model).__name__, "PIXELS", tuple(inputs["pixel_values"].shape))
    """
)


@pytest.mark.parametrize("auto_class", ["AutoModelForCausalLM", "AutoModelForImageTextToText"])
def test_card_example_in_fresh_process(tiny_checkpoint, image_path, tmp_path, auto_class):
    script = tmp_path / "card.py"
    script.write_text(CARD_EXAMPLE.format(auto_class=auto_class))
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONNOUSERSITE": "1"}
    result = subprocess.run(
        [sys.executable, "-I", str(script), str(tiny_checkpoint), str(image_path)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "MODEL_CLASS N2EyeForConditionalGeneration PIXELS (1, 3, 64, 64)" in result.stdout


def test_automodel_gives_base_model(tiny_checkpoint):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    assert type(model).__name__ == "N2EyeModel"
    assert hasattr(model, "vision_tower") and hasattr(model, "language_model")


def test_checkpoint_folder_is_complete(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    for required in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
        "generation_config.json",
        "configuration_n2eye.py",
        "modeling_n2eye.py",
        "processing_n2eye.py",
    ):
        assert required in names, f"{required} missing from the checkpoint"
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForImageTextToText"}
    generation = json.loads((tiny_checkpoint / "generation_config.json").read_text())
    assert (generation["temperature"], generation["min_p"], generation["repetition_penalty"]) == (0.1, 0.15, 1.05)
    assert not any(name.startswith(".") for name in names), "temporary files left behind"


def test_shipped_modeling_files_equal_package_sources(tiny_checkpoint):
    from n2eye.checkpoint import MODELING_FILES, modeling_source_dir

    for name in (*MODELING_FILES, "chat_template.jinja"):
        assert (tiny_checkpoint / name).read_bytes() == (modeling_source_dir() / name).read_bytes(), name


def _inputs(processor, n_images=1, text="Describe the picture."):
    content = [{"type": "image", "image": draw_shapes(shape=s)} for s in ("circle", "square")[:n_images]]
    messages = [{"role": "user", "content": content + [{"type": "text", "text": text}]}]
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )


def _stored_tensor_names(folder: Path) -> list[str]:
    names = []
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as fh:
            names += list(fh.keys())
    return names


def test_save_load_identical_logits_and_tied_embeddings(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model, processor = tiny_model
    inputs = _inputs(processor)
    with torch.no_grad():
        before = model(**inputs).logits
    model.save_pretrained(tmp_path / "copy")
    names = _stored_tensor_names(tmp_path / "copy")
    assert "lm_head.weight" not in names and "model.language_model.embed_tokens.weight" in names
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "copy", trust_remote_code=True).eval()
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    with torch.no_grad():
        after = loaded(**inputs).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_resize_keeps_embeddings_tied(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    old = model.config.text_config.vocab_size
    model.resize_token_embeddings(old + 5)
    assert model.lm_head.weight.shape[0] == old + 5
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    model.save_pretrained(tmp_path / "resized")
    assert "lm_head.weight" not in _stored_tensor_names(tmp_path / "resized")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "resized", trust_remote_code=True)
    assert loaded.config.text_config.vocab_size == old + 5
    assert torch.equal(loaded.lm_head.weight, loaded.get_input_embeddings().weight)
    assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()


def test_generate_with_and_without_cache_agree(tiny_model):
    model, processor = tiny_model
    inputs = _inputs(processor)
    with torch.no_grad():
        cached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=True, repetition_penalty=1.0)
        uncached = model.generate(**inputs, max_new_tokens=8, do_sample=False, use_cache=False, repetition_penalty=1.0)
    assert torch.equal(cached, uncached)


def test_sampling_generation_runs_and_is_seeded(tiny_model):
    model, processor = tiny_model
    inputs = _inputs(processor)
    outs = []
    for _ in range(2):
        torch.manual_seed(123)
        with torch.no_grad():
            outs.append(model.generate(**inputs, max_new_tokens=6, do_sample=True, temperature=1.0, min_p=0.0))
    assert torch.equal(outs[0], outs[1]) and outs[0].shape[1] > inputs["input_ids"].shape[1]


def test_batched_left_padded_greedy_equals_one_by_one(tiny_model):
    model, processor = tiny_model
    conversations = [
        [{"role": "user", "content": [{"type": "image", "image": draw_shapes()}, {"type": "text", "text": "Colour?"}]}],
        [{"role": "user", "content": "A much longer question with no image at all, just words."}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": draw_shapes(shape="square")},
                    {"type": "text", "text": "and"},
                    {"type": "image", "image": draw_shapes(background=(0, 0, 0))},
                    {"type": "text", "text": "Which has more circles?"},
                ],
            }
        ],
    ]
    options = {"max_new_tokens": 6, "do_sample": False, "repetition_penalty": 1.0}
    singles = []
    for conv in conversations:
        inputs = processor.apply_chat_template(
            conv, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        )
        with torch.no_grad():
            singles.append(model.generate(**inputs, **options)[0, inputs["input_ids"].shape[1] :].tolist())
    processor.tokenizer.padding_side = "left"
    batch = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True},
    )
    assert batch["pixel_values"].shape[0] == 3
    with torch.no_grad():
        batched = model.generate(**batch, **options)[:, batch["input_ids"].shape[1] :].tolist()
    pad = processor.tokenizer.pad_token_id
    eos = model.generation_config.eos_token_id
    for single, row in zip(singles, batched):
        row = row[: len(single)]
        assert row == single or (eos in single and row[: single.index(eos) + 1] == single[: single.index(eos) + 1]), (
            row,
            single,
            pad,
        )


def test_two_images_land_at_their_positions_in_order(tiny_model):
    model, processor = tiny_model
    images = [draw_shapes(shape="circle"), draw_shapes(shape="square", color=(20, 200, 20))]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": images[0]},
                {"type": "text", "text": "versus"},
                {"type": "image", "image": images[1]},
                {"type": "text", "text": "Which is green?"},
            ],
        }
    ]
    inputs = processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    captured = {}

    def capture(module, args, kwargs, out):
        captured["embeds"] = kwargs["inputs_embeds"]

    hook = model.model.language_model.register_forward_hook(capture, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    per_image = len(positions) // 2
    assert per_image == 64
    with torch.no_grad():
        expected = [model.get_image_features(inputs["pixel_values"][i : i + 1])[0] for i in range(2)]
    embeds = captured["embeds"][0]
    torch.testing.assert_close(embeds[positions[:per_image]], expected[0])
    torch.testing.assert_close(embeds[positions[per_image:]], expected[1])
    assert not torch.allclose(expected[0], expected[1])
    # each image block is delimited by <|image_start|> ... <|image_end|> and comes in text order
    text = processor.decode(inputs["input_ids"][0])
    assert text.count("<|image_start|>") == 2 and text.count("<|image_end|>") == 2
    assert text.index("versus") > text.index("<|image_end|>")


def test_assistant_mask_covers_exactly_the_answers(tiny_model):
    _, processor = tiny_model
    messages = [
        {"role": "user", "content": [{"type": "image", "image": draw_shapes()}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "And the shape?"},
        {"role": "assistant", "content": "A circle, top left."},
    ]
    out = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    ids = out["input_ids"][0]
    mask = out["assistant_masks"][0].bool()
    decoded = processor.tokenizer.decode(ids[mask])
    assert decoded == "Red.<|im_end|>A circle, top left.<|im_end|>"
    # the image block sits before the answers and is never in the mask
    assert not mask[ids == processor.image_token_id].any()


def _labelled_batch(processor, messages):
    """Model inputs for `messages` and their labels: the assistant tokens, -100 elsewhere."""
    batch = processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True, return_tensors="pt"
    )
    return batch, batch["input_ids"].masked_fill(batch.pop("assistant_masks") == 0, -100)


def test_gradient_checkpointing_and_frozen_vision(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters()), "vision must be frozen by default"
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    messages = [
        {"role": "user", "content": [{"type": "image", "image": draw_shapes()}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "Red."},
    ]
    batch, labels = _labelled_batch(processor, messages)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert model.model.multi_modal_projector.linear_1.weight.grad is not None
    assert model.get_input_embeddings().weight.grad is not None
    assert all(p.grad is None for p in model.model.vision_tower.parameters())
    assert model.model.language_model.gradient_checkpointing


def test_pixel_unshuffle_projector_token_count(tiny_unshuffle_checkpoint):
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(tiny_unshuffle_checkpoint, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tiny_unshuffle_checkpoint, trust_remote_code=True)
    inputs = _inputs(processor)
    n = int((inputs["input_ids"] == model.config.image_token_id).sum())
    assert n == 16  # 64px / patch 8 = 8x8 grid, merged 2x2
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 3


def test_pixel_unshuffle_pads_odd_grids():
    from n2eye.modeling.configuration_n2eye import N2EyeConfig
    from n2eye.modeling.modeling_n2eye import N2EyeMultiModalProjector

    config = N2EyeConfig(
        text_config={"model_type": "lfm2", "hidden_size": 16, "num_hidden_layers": 1, "vocab_size": 10,
                     "intermediate_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "layer_types": ["conv"]},
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 8, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "intermediate_size": 16, "image_size": 27 * 14, "patch_size": 14},
        projector_type="pixel_unshuffle_mlp",
    )  # fmt: skip
    projector = N2EyeMultiModalProjector(config)
    grid = torch.randn(2, 27, 27, 8)
    assert projector(grid).shape == (2, 14 * 14, 16)  # so400m-patch14-384: 27x27 -> 196 tokens
    # block (0,0) of the unshuffled grid holds exactly the 2x2 top-left features
    merged = projector.pixel_unshuffle(grid)
    assert merged.shape == (2, 14, 14, 32)
    assert set(merged[0, 0, 0].tolist()) == set(grid[0, :2, :2].reshape(-1).tolist())
    # the padded edge block only holds the last row's real features plus zeros
    assert (merged[0, 13, 13] == 0).sum() == 3 * 8


def test_generic_config_errors_list_supported_types():
    from n2eye.modeling.configuration_n2eye import N2EyeConfig

    with pytest.raises(ValueError, match="lfm2"):
        N2EyeConfig(text_config={"model_type": "llama"})
    with pytest.raises(ValueError, match="siglip_vision_model"):
        N2EyeConfig(vision_config={"model_type": "clip_vision_model"})
    with pytest.raises(ValueError, match="pixel_unshuffle_mlp"):
        N2EyeConfig(projector_type="qformer")


def test_training_loss_from_labelled_logits_equals_full_loss(tiny_checkpoint):
    """In training mode the head runs on labelled positions only; loss and gradients must be those of the full
    logits (mean, and summed over `num_items_in_batch` as the Trainer does for gradient accumulation)."""
    from transformers import AutoModelForCausalLM, AutoProcessor
    from transformers.loss.loss_utils import ForCausalLMLoss

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": draw_shapes()}, {"type": "text", "text": "Colour?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": "And the shape?"},
        {"role": "assistant", "content": "A circle."},
    ]
    batch, labels = _labelled_batch(processor, messages)
    n_labelled = int((labels != -100).sum())
    vocab = model.config.text_config.vocab_size
    for num_items in (None, torch.tensor(7)):
        extra = {} if num_items is None else {"num_items_in_batch": num_items}
        results = []
        for training in (True, False):
            model.train(training)
            model.zero_grad()
            out = model(**batch, labels=labels, **extra)
            if not training:  # eval mode keeps every position's logits; the loss is recomputed from them
                assert out.logits.shape[1] == labels.shape[1]
                torch.testing.assert_close(out.loss, ForCausalLMLoss(out.logits, labels, vocab, **extra))
            else:
                assert out.logits.shape == (n_labelled, vocab)
            out.loss.backward()
            results.append((out.loss.detach(), model.model.multi_modal_projector.linear_1.weight.grad.clone()))
        (train_loss, train_grad), (eval_loss, eval_grad) = results
        torch.testing.assert_close(train_loss, eval_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(train_grad, eval_grad, rtol=1e-4, atol=1e-7)
