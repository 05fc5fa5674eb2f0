"""Idefics2-style image splitting for fixed-resolution encoders (the tiny preset: SigLIP at 64 px, 64 tokens a crop):
each image larger than the encoder becomes its four quadrants (row-major) + the whole image, 5 crops and 5x the
tokens, through the processor, the model, training (collator, truncation, packing, feature cache), the engine and
its sessions, and the server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_naflex_pipeline import (
    _data_uri,
    _loss_by_sample,
    _spans,
    assert_last_answer_is_uncached,
    picture,
)
from test_train import _losses, run_train

BIG, ODD, SMALL = (150, 110), (131, 91), (48, 40)  # SMALL fits the 64 px encoder: one crop even when splitting
PER_CROP = 64
SPLIT = {"do_image_splitting": True}  # copy it for apply_chat_template, which adds to its processor_kwargs


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return tiny_model


def quadrants(image) -> list:
    """The expected crops, written out independently of the processor's code: PIL boxes, then the whole image."""
    w, h = image.size
    return [image.crop(box) for box in [(0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h),
                                         (w // 2, h // 2, w, h)]] + [image]  # fmt: skip


def chat(sizes: list[tuple[int, int]], answer: str = "Red.", seed: int = 0) -> dict:
    content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": "What colour?"}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
            "images": [picture(size, seed + i) for i, size in enumerate(sizes)]}  # fmt: skip


# ---- processor -----------------------------------------------------------------------------------------------------
def test_split_crops_are_the_quadrants_then_the_whole_image(loaded):
    """5 crops for an image larger than the encoder (odd sides: the right / bottom quadrants get the extra pixel),
    equal to the image processor run on the PIL crops; one crop for an image that fits; one text block per image."""
    _, processor = loaded
    odd, small = picture(ODD), picture(SMALL, seed=1)
    plain = processor(text="<image> and <image>", images=[odd, small], return_tensors="pt")
    assert tuple(plain["pixel_values"].shape) == (2, 3, 64, 64)
    assert (plain["input_ids"][0] == processor.image_token_id).sum() == 2 * PER_CROP
    split = processor(text="<image> and <image>", images=[odd, small], return_tensors="pt", **SPLIT)
    expected = processor.image_processor([*quadrants(odd), small], return_tensors="pt")["pixel_values"]
    assert tuple(split["pixel_values"].shape) == (6, 3, 64, 64)
    assert torch.equal(split["pixel_values"], expected)
    assert torch.equal(split["pixel_values"][4], plain["pixel_values"][0])  # the whole image is the unsplit crop
    assert len({c.numpy().tobytes() for c in split["pixel_values"]}) == 6  # noise: every crop differs
    ids = split["input_ids"][0].tolist()
    start, end = processor.tokenizer.convert_tokens_to_ids([processor.image_start_token, processor.image_end_token])
    blocks = [ids[i + 1 : ids.index(end, i)] for i, t in enumerate(ids) if t == start]
    assert [len(b) for b in blocks] == [5 * PER_CROP, PER_CROP]  # one block per image, its crops' tokens in it
    assert all(set(b) == {processor.image_token_id} for b in blocks) and ids.count(processor.image_token_id) == 384
    assert processor.image_token_counts(split) == [PER_CROP] * 6


@pytest.mark.parametrize("size, crops", [((64, 64), 1), ((65, 64), 5), ((64, 200), 5), ((1, 200), 1), ((30, 20), 1)])
def test_which_images_are_split(loaded, size, crops):
    """Split when either side is larger than the encoder's 64 px; an image that fits stays whole (its quadrants would
    only be upscaled), as does one without quadrants (1 px wide)."""
    _, processor = loaded
    out = processor(text="<image>", images=[picture(size)], **SPLIT)
    assert len(out["pixel_values"]) == crops and out["input_ids"][0].count(processor.image_token_id) == crops * 64


def test_checkpoint_default_and_per_call_override(tiny_checkpoint, tmp_path):
    """`image_splitting` in processor_config.json is the default (saved again by save_pretrained); a call's
    `do_image_splitting` overrides it either way."""
    from transformers import AutoProcessor

    config = json.loads((tiny_checkpoint / "processor_config.json").read_text())
    assert config["image_splitting"] is False
    folder = Path(shutil.copytree(tiny_checkpoint, tmp_path / "split"))
    (folder / "processor_config.json").write_text(json.dumps({**config, "image_splitting": True}))
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    assert processor.image_splitting is True
    image = picture(BIG)
    assert len(processor(text="<image>", images=[image])["pixel_values"]) == 5
    assert len(processor(text="<image>", images=[image], do_image_splitting=False)["pixel_values"]) == 1
    processor.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "processor_config.json").read_text())["image_splitting"] is True


def test_bad_settings_are_refused_with_the_reason(loaded, tiny_checkpoint):
    from transformers import Siglip2ImageProcessor

    from n2eye.image_settings import checked_image_settings
    from n2eye.modeling.processing_n2eye import N2EyeProcessor

    _, processor = loaded
    assert checked_image_settings(processor, {**SPLIT, "min_image_tokens": None}) == SPLIT
    with pytest.raises(ValueError, match=r"\['max_image_tokens'\] set LFM2-VL's image policy.*do_image_splitting"):
        checked_image_settings(processor, {**SPLIT, "max_image_tokens": 64})
    with pytest.raises(ValueError, match="image policy, which this processor does not use"):
        processor(text="<image>", images=[picture(BIG)], do_image_splitting=True, min_image_tokens=8)
    with pytest.raises(ValueError, match="do_image_splitting must be True or False, got 'yes'"):
        checked_image_settings(processor, {"do_image_splitting": "yes"})
    parts = {"tokenizer": processor.tokenizer, "chat_template": processor.chat_template}
    with pytest.raises(ValueError, match="image_splitting must be true or false"):
        N2EyeProcessor(image_processor=processor.image_processor, image_splitting="yes", **parts)
    with pytest.raises(ValueError, match="is for fixed-resolution encoders.*Siglip2ImageProcessor"):
        N2EyeProcessor(image_processor=Siglip2ImageProcessor(patch_size=8), image_splitting=True, **parts)
    naflex = N2EyeProcessor(image_processor=Siglip2ImageProcessor(patch_size=8), **parts)
    with pytest.raises(ValueError, match="image policy, which this processor does not use"):
        checked_image_settings(naflex, SPLIT)  # NaFlex without the policy: no splitting of either kind


# ---- model -----------------------------------------------------------------------------------------------------------
def test_crop_features_land_at_their_positions(loaded):
    """The split forward's logits equal a forward on embeddings built by hand: the features of each PIL crop
    (encoded one at a time) written at the image positions in order: quadrants row-major, whole, next image."""
    model, processor = loaded
    big, small = picture(BIG), picture(SMALL, seed=1)
    content = [{"type": "image", "image": big}, {"type": "text", "text": "and"}, {"type": "image", "image": small}]
    messages = [{"role": "user", "content": content}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs=dict(SPLIT))  # fmt: skip
    with torch.no_grad():
        logits = model(**inputs).logits
        crops = [processor.image_processor(c, return_tensors="pt")["pixel_values"] for c in [*quadrants(big), small]]
        features = torch.cat([model.model.get_image_features(c)[0] for c in crops])
        embeds = model.get_input_embeddings()(inputs["input_ids"]).clone()
        positions = (inputs["input_ids"][0] == processor.image_token_id).nonzero().flatten()
        assert len(positions) == len(features) == 6 * PER_CROP
        embeds[0, positions] = features
        manual = model(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits
        torch.testing.assert_close(logits, manual, rtol=1e-5, atol=1e-5)
        swapped = inputs["pixel_values"][[1, 0, 2, 3, 4, 5]]  # two quadrants the other way round: other logits
        assert not torch.allclose(model(**{**inputs, "pixel_values": swapped}).logits, logits, atol=1e-5)


# ---- training data -------------------------------------------------------------------------------------------------
def test_truncation_packing_and_batching_keep_whole_images(loaded):
    """A cut inside the second turn's image keeps the first image's 5 crops; packed and batched rows give each sample
    the loss it has alone."""
    from n2eye.data.collate import Collator, encode_conversation
    from n2eye.data.packing import GAP, PackedCollator, pack_examples

    model, processor = loaded
    first, second = chat([BIG]), chat([ODD], "Blue.", seed=1)  # two turns: the first answer survives the cut
    row = {"messages": first["messages"] + second["messages"], "images": first["images"] + second["images"]}
    full = encode_conversation(processor, row, max_length=4096, image_settings=SPLIT)
    assert len(full["pixel_values"]) == 10 and full["input_ids"].count(processor.image_token_id) == 10 * PER_CROP
    cut = encode_conversation(processor, row, max_length=len(full["input_ids"]) - 100, image_settings=SPLIT)
    assert torch.equal(cut["pixel_values"], full["pixel_values"][:5])
    assert cut["input_ids"].count(processor.image_token_id) == 5 * PER_CROP
    text_only = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}
    rows = [chat([BIG]), chat([SMALL, ODD], "Blue.", seed=3), text_only]
    examples = [encode_conversation(processor, r, max_length=4096, image_settings=SPLIT) for r in rows]
    assert [len(e.get("pixel_values", [])) for e in examples] == [5, 6, 0]
    pad = processor.tokenizer.pad_token_id
    single = {i: _loss_by_sample(model, Collator(pad)([e]), _spans([e], [0]))[0] for i, e in enumerate(examples)}
    batch = Collator(pad)(examples)
    assert batch["pixel_values"].shape == (11, 3, 64, 64)
    together = _loss_by_sample(model, batch, _spans(examples, [0, 1, 2]))
    bins = pack_examples(examples, max_length=4096)
    assert len(bins) == 1
    packed = _loss_by_sample(model, PackedCollator(pad)(bins), _spans(examples, [], gap=GAP, packed=True))
    for i in single:
        torch.testing.assert_close(together[i], single[i], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(packed[i], single[i], rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("split-data")
    rows = []
    for i, sizes in enumerate([[BIG], [SMALL], [ODD, SMALL], [BIG]]):
        items = []
        for j, size in enumerate(sizes):
            picture(size, seed=10 * i + j).save(folder / f"img{i}-{j}.png")
            items.append({"type": "image", "image": f"img{i}-{j}.png"})
        rows.append({"messages": [{"role": "user", "content": items + [{"type": "text", "text": "Colour?"}]},
                                  {"role": "assistant", "content": ("red", "green", "blue")[i % 3]}]})  # fmt: skip
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_training_with_splitting_and_the_feature_cache(tiny_checkpoint, dataset, tmp_path, capsys):
    """`image_splitting=True` trains on 5 crops per large image: the feature cache computes each crop once and
    gives the losses of a run without it."""
    options = {"max_steps": 2, "batch_size": 2, "image_splitting": True, "feature_cache_dir": str(tmp_path / "f")}
    run_train(tiny_checkpoint, dataset, tmp_path / "plain", feature_cache=False, **options)
    run_train(tiny_checkpoint, dataset, tmp_path / "cached", feature_cache=True, **options)
    assert "0 reused, 17 computed" in capsys.readouterr().out  # 5 + 1 + (5 + 1) + 5 crops, all distinct
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "cached")), torch.tensor(_losses(tmp_path / "plain")))


# ---- engine, server, CLI -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eye(tiny_checkpoint):
    import n2eye

    return n2eye.load(tiny_checkpoint, image_settings=SPLIT)


def test_engine_splits_and_the_session_cache_equals_uncached_generate(eye):
    big, small = picture(BIG), picture(SMALL, seed=1)
    messages = [{"role": "user", "content": [{"type": "image", "image": big}, {"type": "text", "text": "?"}]}]
    split = eye.count_prompt_tokens(messages)
    assert split - eye.count_prompt_tokens(messages, image_settings={"do_image_splitting": False}) == 4 * PER_CROP
    session = eye.session()
    before = eye.vision_cache.encoded
    turns = [[{"type": "image", "image": big}, {"type": "text", "text": "What is it?"}], "And the colour?",
             [{"type": "image", "image": small}, {"type": "text", "text": "And this one?"}]]  # fmt: skip
    for turn in turns:
        session.send(turn, temperature=0, max_new_tokens=3)
    assert eye.vision_cache.encoded - before == 6, "each crop encoded once per session"
    pixels = eye.processor(text="<image><image>", images=[big, small], return_tensors="pt", **SPLIT)["pixel_values"]
    assert len(pixels) == sum(5 if max(image.size) > 64 else 1 for image in (big, small))  # larger than 64 px: split
    assert_last_answer_is_uncached(eye, session, [big, small], **SPLIT)


def test_server_takes_do_image_splitting_within_its_own(eye):
    pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
    from test_server import Server

    photo = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(picture(BIG))}},
                                         {"type": "text", "text": "What is it?"}]}  # fmt: skip
    splitting = Server(eye)
    plain = Server(eye.__class__(eye.model, eye.processor))
    try:
        status, full = splitting.post({"messages": [photo], "max_tokens": 2})
        assert status == 200
        status, off = splitting.post({"messages": [photo], "max_tokens": 2, "do_image_splitting": False})
        assert status == 200 and full["usage"]["prompt_tokens"] - off["usage"]["prompt_tokens"] == 4 * PER_CROP
        status, vllm = splitting.post({"messages": [photo], "max_tokens": 2, "mm_processor_kwargs": SPLIT})
        assert status == 200 and vllm["usage"]["prompt_tokens"] == full["usage"]["prompt_tokens"]
        status, body = plain.post({"messages": [photo], "max_tokens": 2, **SPLIT})
        assert status == 400 and "does not split images" in body["error"]["message"]
        assert "--image-splitting" in body["error"]["message"]
        status, body = plain.post({"messages": [photo], "max_tokens": 2, "do_image_splitting": False})
        assert status == 200 and body["usage"]["prompt_tokens"] == off["usage"]["prompt_tokens"]
        for fields in ({"max_image_tokens": 64}, {**SPLIT, "min_image_tokens": 8}):
            status, body = splitting.post({"messages": [photo], "max_tokens": 2, **fields})
            assert status == 400 and "fixed resolution; it takes do_image_splitting only" in body["error"]["message"]
        status, body = splitting.post({"messages": [photo], "max_tokens": 2, "do_image_splitting": 1})
        assert status == 400 and "do_image_splitting must be true or false" in body["error"]["message"]
    finally:
        splitting.stop()
        plain.stop()


def test_image_splitting_flag_help_names_both_encoders():
    from n2eye.cli import COMMANDS, _module, make_parser
    from n2eye.cli_args import config_from_args, field_help

    cls = getattr(_module("generate"), COMMANDS["generate"].config)
    argv = ["generate", "--model", "m", "--prompt", "hi", "--image-splitting"]
    assert config_from_args(cls, make_parser(argv).parse_args(argv)).image_settings() == SPLIT
    help_text = " ".join(field_help(cls)["image_splitting"].split())
    assert "--no-image-splitting turns tiles off" in help_text and "Idefics2-style splitting on" in help_text
