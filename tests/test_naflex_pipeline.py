"""One vision path at native resolution: a tiny LFM2-VL-layout checkpoint (SigLIP2 NaFlex + pixel unshuffle) through
the collator, packing, the feature cache, training and resume, the engine and its sessions, the server and eval,
with images of several sizes: a 1600x1200 photo (3x2 tiles + thumbnail: 7 crops), 100x80 (upscaled) and 300x500."""

from __future__ import annotations

import base64
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_packing import _per_sample_losses
from test_train import CrashAfterSave, _losses, _state, run_train

BIG, SMALL, TALL = (1600, 1200), (100, 80), (300, 500)
MARKED = 1770 + 7  # the 1600x1200 photo's image tokens and its 6 tile markers and thumbnail marker


def picture(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """Noise: every tile of every picture differs (a plain background would give equal tiles, cached once)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def conversation(sizes: list[tuple[int, int]], answer: str = "A red circle.", seed: int = 0) -> dict:
    content = [{"type": "image"} for _ in sizes] + [{"type": "text", "text": "What do you see?"}]
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}],
            "images": [picture(size, seed + i) for i, size in enumerate(sizes)]}  # fmt: skip


MIXED = [[BIG], [SMALL], [TALL, SMALL], []]  # the last: text only


@pytest.fixture(scope="module")
def loaded(naflex_checkpoint):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(naflex_checkpoint, trust_remote_code=True).eval()
    return model, AutoProcessor.from_pretrained(naflex_checkpoint, trust_remote_code=True)


@pytest.fixture(scope="module")
def examples(loaded):
    from n2eye.data.collate import encode_conversation

    _, processor = loaded
    rows = [conversation(sizes) if sizes else {"messages": [{"role": "user", "content": "Hi, no picture?"},
                                                             {"role": "assistant", "content": "Hello."}]}
            for sizes in MIXED]  # fmt: skip
    return [encode_conversation(processor, row, max_length=4096) for row in rows]


def _loss_by_sample(model, batch, spans: dict) -> dict:
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    return _per_sample_losses(logits, batch["labels"], spans)


def _spans(examples, rows: list[int], gap: int = 0, packed: bool = False) -> dict:
    """(row, position) of each supervised token -> its sample, for examples laid out one per row or packed."""
    spans, offset = {}, 0
    for i, example in enumerate(examples):
        row = 0 if packed else rows[i]
        for p, label in enumerate(example["labels"]):
            if label != -100:
                spans[(row, offset + p)] = i
        if packed:
            offset += len(example["input_ids"]) + gap
    return spans


# ---- encoder, collator, packing ------------------------------------------------------------------------------------
def test_crop_features_do_not_depend_on_batching_or_padding(loaded):
    """`encode_images` runs NaFlex crops grouped by length without padding: a crop's grid is bit-identical alone,
    in a batch of other sizes, or padded to 4096 patches; this is what makes cache == no cache exact."""
    from n2eye.vision_inputs import VisionInputs

    model, processor = loaded
    out = processor(text="<image><image>", images=[picture(BIG), picture(TALL)])
    crops = VisionInputs.of(out)
    assert len(crops) == 8 and crops.pixel_values.shape[1] == 1024
    together = model.model.encode_images(**crops.model_kwargs())
    alone = [model.model.encode_images(**crops.select([i]).model_kwargs())[0] for i in range(len(crops))]
    for a, b in zip(together, alone):
        assert torch.equal(a, b)
    tall, extra = crops.select([7]), 4096 - crops.patch_counts()[7]
    padded = VisionInputs(torch.nn.functional.pad(tall.pixel_values, (0, 0, 0, extra)), tall.spatial_shapes,
                          torch.nn.functional.pad(tall.pixel_attention_mask, (0, extra)))  # fmt: skip
    with_a_tile = VisionInputs.concat([crops.select([0]), padded])
    assert with_a_tile.pixel_values.shape[1] == 4096
    assert torch.equal(model.model.encode_images(**with_a_tile.model_kwargs())[1], alone[7])
    assert [tuple(g.shape[:2]) for g in together] == [tuple(s) for s in out["spatial_shapes"].tolist()]


def test_collator_keeps_every_crop_in_order_and_the_same_loss(loaded, examples):
    """Examples carry transformers' keys with their own crops (padding trimmed to their longest); a batch joins them
    in sample order padded to the batch's longest; one padded batch gives each sample the loss it has alone."""
    from n2eye.data.collate import Collator

    model, processor = loaded
    assert [len(e.get("pixel_values", [])) for e in examples] == [7, 1, 2, 0]
    assert examples[1]["pixel_values"].shape[1] == examples[1]["spatial_shapes"].prod().item() < 1024
    pad = processor.tokenizer.pad_token_id
    batch = Collator(pad)(examples)
    assert batch["pixel_values"].shape == (10, 1024, 768) and batch["pixel_attention_mask"].shape == (10, 1024)
    shapes = [s for e in examples if "spatial_shapes" in e for s in e["spatial_shapes"].tolist()]
    assert batch["spatial_shapes"].tolist() == shapes
    single = {i: _loss_by_sample(model, Collator(pad)([e]), _spans([e], [0]))[0] for i, e in enumerate(examples)}
    together = _loss_by_sample(model, batch, _spans(examples, list(range(len(examples)))))
    for i in together:
        torch.testing.assert_close(together[i], single[i], rtol=1e-4, atol=1e-4)


def test_packed_and_unpacked_give_the_same_per_sample_loss(loaded, examples):
    from n2eye.data.collate import Collator
    from n2eye.data.packing import GAP, PackedCollator, pack_examples

    model, processor = loaded
    pad = processor.tokenizer.pad_token_id
    single = {i: _loss_by_sample(model, Collator(pad)([e]), _spans([e], [0]))[0] for i, e in enumerate(examples)}
    bins = pack_examples(examples, max_length=8192)
    assert len(bins) == 1 and len(bins[0]["segments"]) == 4
    packed = PackedCollator(pad)(bins)
    assert packed["pixel_values"].shape[0] == 10 and packed["spatial_shapes"].shape == (10, 2)
    got = _loss_by_sample(model, packed, _spans(examples, [], gap=GAP, packed=True))
    for i in single:
        torch.testing.assert_close(got[i], single[i], rtol=1e-4, atol=1e-4)


def test_truncation_keeps_the_crops_of_the_images_it_keeps(loaded):
    from n2eye.data.collate import encode_conversation

    _, processor = loaded
    row = conversation([BIG])
    second = conversation([SMALL], "Blue.", seed=1)
    row = {"messages": row["messages"] + second["messages"], "images": row["images"] + second["images"]}
    full = encode_conversation(processor, row, max_length=4096)
    cut = encode_conversation(processor, row, max_length=len(full["input_ids"]) - 20)  # inside the small image
    assert len(full["pixel_values"]) == 8 and len(cut["pixel_values"]) == 7
    assert cut["spatial_shapes"].tolist() == full["spatial_shapes"][:7].tolist()
    image_id = processor.image_token_id
    assert cut["input_ids"].count(image_id) == sum((h // 2) * (w // 2) for h, w in cut["spatial_shapes"].tolist())
    plain = copy.copy(processor)  # no <|image_start|> / <|image_end|> (nor tile markers): the cut backs off the run
    plain.use_image_special_tokens = False
    full = encode_conversation(plain, row, max_length=4096)
    cut = encode_conversation(plain, row, max_length=len(full["input_ids"]) - 20)
    assert len(cut["pixel_values"]) == 7 and cut["input_ids"].count(image_id) == 1770


# ---- feature cache --------------------------------------------------------------------------------------------------
def test_feature_cache_keys_follow_the_crops(loaded, tmp_path):
    """Keyed by what the encoder sees: a changed token budget or no splitting changes the crops it changes (the
    thumbnail, a resized image: new keys, never a stale grid) and reuses the ones it keeps (the 512 px tiles); the
    same crops padded to another max_num_patches share their keys; cached grids equal the model's exactly."""
    from n2eye.train.feature_cache import VisionFeatureCache
    from n2eye.vision_inputs import VisionInputs

    model, processor = loaded
    cache = VisionFeatureCache(model, tmp_path)
    image = picture(BIG)
    default = VisionInputs.of(processor(text="<image>", images=[image]))
    assert [len(cache.fill(default)), cache.misses, cache.hits] == [7, 7, 0]
    # unsplit, the image is resized as the thumbnail was: the same crop, the same key (reused, rightly)
    for settings, new in (({"max_image_tokens": 64}, 1), ({"do_image_splitting": False}, 0),
                          ({"min_image_tokens": 128, "max_image_tokens": 128}, 1)):  # fmt: skip
        crops = VisionInputs.of(processor(text="<image>", images=[image], **settings))
        misses = cache.misses
        for grid, expected in zip(cache.grids(crops), model.model.encode_images(**crops.model_kwargs())):
            assert torch.equal(grid, expected), settings
        assert cache.misses - misses == new, settings
    assert len(set(cache.keys(crops)) - set(cache.keys(default))) == 1  # the thumbnail
    wider = VisionInputs.of(processor(text="<image>", images=[image], max_num_patches=2048))
    assert wider.pixel_values.shape[1] == 2048 and cache.keys(wider) == cache.keys(default)
    hits = cache.hits
    cache.fill(wider)
    assert cache.hits - hits == 7


def write_mixed_dataset(folder: Path) -> Path:
    """Messages JSONL over mixed-size images: tiled, upscaled, tall, two in one turn, and a text-only row."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, sizes in enumerate([[BIG], [SMALL], [TALL], [SMALL, TALL], [BIG], [TALL]]):
        colour = ("red", "green", "blue")[i % 3]
        items = []
        for j, size in enumerate(sizes):
            picture(size, seed=10 * i + j).save(folder / f"img{i}-{j}.png")
            items.append({"type": "image", "image": f"img{i}-{j}.png"})
        rows.append({"messages": [{"role": "user", "content": items + [{"type": "text", "text": "Colour?"}]},
                                  {"role": "assistant", "content": colour}]})  # fmt: skip
    rows.append({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> Path:
    return write_mixed_dataset(tmp_path_factory.mktemp("mixed"))


def test_training_with_the_feature_cache_equals_training_without(naflex_checkpoint, mixed, tmp_path, capsys):
    options = {"max_steps": 4, "batch_size": 2, "max_length": 4096, "feature_cache_dir": str(tmp_path / "features")}
    run_train(naflex_checkpoint, mixed, tmp_path / "plain", feature_cache=False, **options)
    run_train(naflex_checkpoint, mixed, tmp_path / "cached", feature_cache=True, **options)
    assert "0 reused, 19 computed" in capsys.readouterr().out  # 7+1+1+2+7+1 crops, all distinct pictures
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "cached")), torch.tensor(_losses(tmp_path / "plain")))
    run_train(naflex_checkpoint, mixed, tmp_path / "small", feature_cache=True, max_image_tokens=64, **options)
    # a new token budget: the crops it changes are new (2 thumbnails; each 300x500 is now too large for one crop:
    # 3 x (6 tiles + thumbnail)), the ones it keeps are reused (12 tiles of 512 px, the two 100x80 images)
    assert "14 reused, 23 computed" in capsys.readouterr().out


def test_packed_training_and_exact_resume(naflex_checkpoint, mixed, tmp_path):
    """--pack over mixed sizes, killed after its checkpoint and resumed: the weights of the straight run."""
    options = {"max_steps": 4, "batch_size": 1, "max_length": 4096, "pack": True, "feature_cache": False,
               "save_every": 2}  # fmt: skip
    straight = run_train(naflex_checkpoint, mixed, tmp_path / "straight", **options)
    with pytest.raises(KeyboardInterrupt):
        run_train(naflex_checkpoint, mixed, tmp_path / "killed", callbacks=[CrashAfterSave(2)], **options)
    resumed = run_train(naflex_checkpoint, mixed, tmp_path / "killed", resume=True, **options)
    a, b = _state(straight), _state(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    assert json.loads((tmp_path / "straight" / "train_result.json").read_text())["train_rows"] < 7


# ---- engine, session, server, eval -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eye(naflex_checkpoint):
    import n2eye

    return n2eye.load(naflex_checkpoint)


def _uncached_answer(eye, prompt_ids: torch.Tensor, images: list, max_new_tokens: int, **settings) -> torch.Tensor:
    """Plain transformers generate over the whole prompt: pixels (all crops) in, no vision or KV cache."""
    pixels = eye.processor(text="<image>" * len(images), images=images, return_tensors="pt", **settings)
    crops = {k: pixels[k] for k in ("pixel_values", "spatial_shapes", "pixel_attention_mask") if k in pixels}
    with torch.no_grad():
        out = eye.model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), **crops,
                                 do_sample=False, max_new_tokens=max_new_tokens, use_cache=False)  # fmt: skip
    return out[0, prompt_ids.shape[1] :]


def assert_last_answer_is_uncached(eye, session, images: list, **settings) -> None:
    """The cached session's last answer (3 greedy tokens) is what plain `generate` writes over its whole prompt."""
    ids = session.ids
    answer_ids = eye.tokenizer(session.messages[-1]["content"], add_special_tokens=False)["input_ids"]
    for cut in (len(answer_ids) + 1, len(answer_ids)):  # with or without the closing <|im_end|>
        prompt = ids[:, : ids.shape[1] - cut]
        if eye.decode(_uncached_answer(eye, prompt, images, 3, **settings)) == session.messages[-1]["content"]:
            return
    pytest.fail("the cached session's last answer differs from uncached generate")


def test_session_with_a_tiled_image_equals_uncached_generate(eye):
    big, small = picture(BIG), picture(SMALL, seed=1)
    session = eye.session()
    before = eye.vision_cache.encoded
    turns = [[{"type": "image", "image": big}, {"type": "text", "text": "What is it?"}], "And the colour?",
             [{"type": "image", "image": small}, {"type": "text", "text": "And this one?"}]]  # fmt: skip
    prefilled = []
    for turn in turns:
        start = session.prefilled_tokens
        session.send(turn, temperature=0, max_new_tokens=3)
        prefilled.append(session.prefilled_tokens - start)
    assert eye.vision_cache.encoded - before == 8, "each crop encoded once per session"
    assert prefilled[0] > 1770 and prefilled[1] < 30 and prefilled[2] < 100
    assert_last_answer_is_uncached(eye, session, [big, small])
    one_shot = [{"role": "user", "content": turns[0]}]
    inputs = eye.processor.apply_chat_template(one_shot, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt")  # fmt: skip
    expected = _uncached_answer(eye, inputs["input_ids"], [big], 4)
    assert eye.chat(one_shot, temperature=0, max_new_tokens=4) == eye.decode(expected)


def test_image_settings_per_call_and_per_engine(eye, naflex_checkpoint, tiny_checkpoint):
    import n2eye

    messages = [{"role": "user", "content": [{"type": "image", "image": picture(BIG)}, {"type": "text", "text": "?"}]}]
    full = eye.count_prompt_tokens(messages)
    small = eye.count_prompt_tokens(messages, image_settings={"max_image_tokens": 64, "do_image_splitting": False})
    assert full - small == MARKED - 54
    low = n2eye.load(naflex_checkpoint, image_settings={"max_image_tokens": 64, "do_image_splitting": False})
    assert low.count_prompt_tokens(messages) == small
    assert low.session().images_kwargs == {"max_image_tokens": 64, "do_image_splitting": False}
    with pytest.raises(ValueError, match="min_image_tokens \\(300\\) is more than max_image_tokens"):
        n2eye.load(naflex_checkpoint, image_settings={"min_image_tokens": 300})
    with pytest.raises(ValueError, match="image policy, which this processor does not use"):
        n2eye.load(tiny_checkpoint, image_settings={"max_image_tokens": 64})


@pytest.mark.parametrize("command", ["train", "eval", "generate", "chat", "serve"])
def test_image_flags_on_every_command(command, tmp_path):
    from n2eye.cli import COMMANDS, _module, make_parser
    from n2eye.cli_args import config_from_args, field_help

    cls = getattr(_module(command), COMMANDS[command].config)
    required = {"train": ["--data", "d", "--out", "o"], "eval": ["--data", "d", "--out", "o"],
                "generate": ["--prompt", "hi"]}.get(command, [])  # fmt: skip
    argv = [command, "--model", "m", *required, "--max-image-tokens", "64", "--min-image-tokens", "32",
            "--no-image-splitting"]  # fmt: skip
    cfg = config_from_args(cls, make_parser(argv).parse_args(argv))
    assert cfg.image_settings() == {"min_image_tokens": 32, "max_image_tokens": 64, "do_image_splitting": False}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("max_image_tokens: 128\nimage_splitting: true\n")
    argv = [command, "--config", str(recipe), "--model", "m", *required]
    cfg = config_from_args(cls, make_parser(argv).parse_args(argv))
    assert cfg.image_settings() == {"max_image_tokens": 128, "do_image_splitting": True}
    assert "512 px tiles" in field_help(cls)["image_splitting"]


def _data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_server_takes_a_tiled_image_and_refuses_bad_image_settings(eye, tiny_checkpoint):
    pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
    from test_server import Server

    photo = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(picture(BIG))}},
                                         {"type": "text", "text": "What is it?"}]}  # fmt: skip
    s = Server(eye)
    try:
        policy = {"min_image_tokens": 64, "max_image_tokens": 256, "do_image_splitting": True}
        assert s.get("/v1/models")["data"][0]["image_settings"] == policy  # what the web page offers
        client = s.client()
        full = client.chat.completions.create(model="tiny-eye", messages=[photo], max_tokens=3, temperature=0)
        assert full.choices[0].message.role == "assistant" and full.usage.prompt_tokens > 1770
        low = client.chat.completions.create(model="tiny-eye", messages=[photo], max_tokens=3, temperature=0,
                                             extra_body={"max_image_tokens": 64, "do_image_splitting": False})
        assert full.usage.prompt_tokens - low.usage.prompt_tokens == MARKED - 54
        vllm_style = {"max_image_tokens": 64, "do_image_splitting": False}
        status, body = s.post({"messages": [photo], "max_tokens": 3, "mm_processor_kwargs": vllm_style})
        assert status == 200 and body["usage"]["prompt_tokens"] == low.usage.prompt_tokens
        stream = client.chat.completions.create(model="tiny-eye", messages=[photo], max_tokens=3, stream=True,
                                                extra_body={"max_image_tokens": 64})  # fmt: skip
        assert [c for c in stream][-1].choices[0].finish_reason in ("stop", "length")
        bad = [({"max_image_tokens": 0}, "max_image_tokens must be a positive integer"),
               ({"max_image_tokens": "64"}, "max_image_tokens must be a positive integer"),
               ({"max_image_tokens": 64.5}, "max_image_tokens must be a positive integer"),
               ({"max_image_tokens": 100000}, "over this server's 256"),
               ({"min_image_tokens": 128, "max_image_tokens": 64}, "is more than max_image_tokens"),
               ({"do_image_splitting": "no"}, "do_image_splitting must be true or false"),
               ({"mm_processor_kwargs": {"tile_size": 64}}, "mm_processor_kwargs must be an object with only"),
               ({"mm_processor_kwargs": [64]}, "mm_processor_kwargs must be an object")]  # fmt: skip
        for fields, message in bad:
            status, body = s.post({"messages": [photo], "max_tokens": 3, **fields})
            assert status == 400 and message in body["error"]["message"], (fields, status, body)
        assert s.post({"messages": [photo], "max_tokens": 2})[0] == 200  # and it goes on serving
    finally:
        s.stop()
    import n2eye

    capped = Server(eye.__class__(eye.model, eye.processor, image_settings={"do_image_splitting": False}))
    fixed = Server(n2eye.load(tiny_checkpoint))
    try:
        assert capped.get("/v1/models")["data"][0]["image_settings"]["do_image_splitting"] is False
        status, body = capped.post({"messages": [photo], "max_tokens": 2, "do_image_splitting": True})
        assert status == 400 and "does not split images" in body["error"]["message"]
        status, body = fixed.post({"messages": [{"role": "user", "content": "Hi"}], "max_image_tokens": 64})
        assert status == 400 and "fixed resolution" in body["error"]["message"]
    finally:
        capped.stop()
        fixed.stop()


def test_eval_runs_on_tiled_images(naflex_checkpoint, mixed, tmp_path):
    from n2eye.eval.runner import EvalConfig, evaluate

    result = evaluate(EvalConfig(model=str(naflex_checkpoint), data=str(mixed), out=str(tmp_path / "r.json"),
                                 max_new_tokens=2, batch_size=4, max_image_tokens=64))  # fmt: skip
    assert result["n"] == 7 and result["config"]["max_image_tokens"] == 64
    assert json.loads((tmp_path / "r.json").read_text())["n"] == 7
