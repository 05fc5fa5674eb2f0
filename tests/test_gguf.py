"""`n2eye convert --to gguf`, proven by llama.cpp itself (llama-cpp-python): its tokenization of our chats equals
ours, its logits match ours within each format's bound, its greedy answers are ours; bad requests write nothing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

# Max |llama.cpp logit - ours| as a share of our largest |logit|, per stored format (measured on the tiny model:
# f32 1.6e-4, f16 4e-4, bf16 3e-3, q8_0 1.1e-2, q4_0 0.13; the bounds leave room for other CPUs' kernels).
BOUNDS = {"f32": 1e-3, "f16": 5e-3, "bf16": 2e-2, "q8_0": 5e-2, "q4_0": 0.3}


def _llama(path, **kwargs):
    llama_cpp = pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install 'n2eye[gguf]'")
    return llama_cpp.Llama(model_path=str(path), n_ctx=2048, logits_all=True, verbose=False, n_threads=2, **kwargs)


def _export(checkpoint, out, quant):
    from n2eye.convert import ConvertConfig, convert

    path, report = convert(ConvertConfig(model=str(checkpoint), to="gguf", out=str(out), quant=quant))
    return path / report["language_model"]["file"], report


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(tiny_checkpoint, trust_remote_code=True, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)


def _chat_text(processor, image=None) -> str:
    tools = [{"name": "get_weather", "description": "Weather now.", "parameters": {"type": "object", "properties":
              {"location": {"type": "string"}}}}]  # fmt: skip
    content = [{"type": "text", "text": "What colour is the circle? Answer in 3 words, then call a tool."}]
    if image is not None:
        content.insert(0, {"type": "image", "image": image})
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": content},
                {"role": "assistant", "content": "Red, I think.",
                 "tool_calls": [{"name": "get_weather", "arguments": {"location": "Paris"}}]},
                {"role": "tool", "content": '{"temperature": 21}'}, {"role": "user", "content": "Thanks! 123 4567"}]  # fmt: skip
    return processor.apply_chat_template(messages, tools=tools, add_generation_prompt=True)


def test_llamacpp_tokenizes_our_chats_as_we_do(tiny, tmp_path):
    """A chat with a system prompt, tools, an image block (its expanded <image> tokens), a tool call and response:
    the same ids from llama.cpp's tokenizer (special tokens parsed) as from ours."""
    from conftest import draw_shapes

    _, processor = tiny
    path, _ = _export(processor_path(processor), tmp_path / "gguf", "f32")
    llm = _llama(path, vocab_only=True)
    try:
        for image in (None, draw_shapes()):
            text = _chat_text(processor, image)
            inputs = processor(images=[image] if image is not None else None, text=text, return_text_replacement_offsets=False)
            expanded = processor.tokenizer.decode(inputs["input_ids"][0])
            ours = list(inputs["input_ids"][0])
            assert llm.tokenize(expanded.encode(), add_bos=False, special=True) == ours
    finally:
        llm.close()


def processor_path(processor):
    """The checkpoint folder a processor was loaded from."""
    return processor.tokenizer.name_or_path


@pytest.mark.parametrize("quant", ["f32", "f16", "bf16", "q8_0", "q4_0"])
def test_llamacpp_logits_match_ours(tiny, tmp_path, quant):
    model, processor = tiny
    path, report = _export(processor_path(processor), tmp_path / "gguf", quant)
    assert report["language_model"]["types"] == (["F32"] if quant == "f32" else sorted({"F32", quant.upper()}))
    text = _chat_text(processor)
    ids = list(processor(text=text)["input_ids"][0])
    llm = _llama(path)
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    scale = float(np.abs(ours).max())
    assert float(np.abs(theirs - ours).max()) <= BOUNDS[quant] * scale
    if quant in ("f32", "f16"):
        assert (theirs.argmax(-1) == ours.argmax(-1)).mean() > 0.95


def test_a_trained_model_answers_the_same_through_llamacpp(trained_tiny, tmp_path):
    """Greedy decoding of a trained model's text prompt: llama.cpp (f32) writes our tokens."""
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(trained_tiny, trust_remote_code=True, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(trained_tiny, trust_remote_code=True)
    path, _ = _export(trained_tiny, tmp_path / "gguf", "f32")
    prompt = processor.apply_chat_template([{"role": "user", "content": "What colour is the shape?"}],
                                           add_generation_prompt=True)  # fmt: skip
    ids = list(processor(text=prompt)["input_ids"][0])
    with torch.no_grad():
        ours = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=8, do_sample=False, min_p=None,
                              temperature=None, repetition_penalty=1.0, suppress_tokens=None)[0, len(ids):].tolist()  # fmt: skip
    llm = _llama(path)
    try:
        theirs = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
            theirs.append(token)
            if len(theirs) == len(ours) or token == llm.token_eos():
                break
    finally:
        llm.close()
    assert theirs == ours


def test_the_gguf_file_says_what_it_is(tiny, tmp_path):
    gguf = pytest.importorskip("gguf")
    model, processor = tiny
    path, _ = _export(processor_path(processor), tmp_path / "gguf", "q8_0")
    reader = gguf.GGUFReader(str(path))
    fields = {name: field for name, field in reader.fields.items()}

    def value(name):
        field = fields[name]
        return field.contents() if hasattr(field, "contents") else field.parts[field.data[0]]

    assert value("general.architecture") == "lfm2"
    assert value("tokenizer.ggml.pre") == "lfm2" and value("tokenizer.ggml.model") == "gpt2"
    assert value("lfm2.shortconv.l_cache") == 3
    text = model.config.text_config
    assert value("lfm2.attention.head_count_kv") == [0 if t == "conv" else text.num_key_value_heads
                                                     for t in text.layer_types]  # fmt: skip
    assert "<|im_start|>" in value("tokenizer.chat_template")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.shortconv.conv.weight"] == "F32"
    assert types["token_embd_norm.weight"] == "F32" and "output.weight" not in types  # tied, as llama.cpp reads it


def test_bad_gguf_requests_write_nothing(tiny_checkpoint, source_lfm2vl, tmp_path):
    from n2eye.convert import ConvertConfig, convert
    from n2eye.convert.lfm2vl import ConversionError

    with pytest.raises(ValueError, match="choose one of"):
        convert(ConvertConfig(model=str(tiny_checkpoint), to="gguf", out=str(tmp_path / "a"), quant="q3_k"))
    with pytest.raises(ValueError, match="--quant applies to --to gguf"):
        ConvertConfig(model=str(tiny_checkpoint), to="n2eye", out=str(tmp_path / "a"), quant="q8_0")
    with pytest.raises(ConversionError, match="exports N2-Eye checkpoints"):
        convert(ConvertConfig(model=str(source_lfm2vl), to="gguf", out=str(tmp_path / "a")))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="is a file"):
        convert(ConvertConfig(model=str(tiny_checkpoint), to="gguf", out=str(blocker)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.fixture(scope="module")
def source_lfm2vl(tmp_path_factory):
    from n2eye.fixtures.lfm2vl import make_tiny_lfm2vl

    return make_tiny_lfm2vl(tmp_path_factory.mktemp("lfm2vl") / "src")


def test_gguf_needs_only_the_gguf_package(tiny_checkpoint, tmp_path):
    """The export runs with llama.cpp unimportable (only `gguf` is needed) and writes every language-model tensor."""
    import subprocess
    import sys

    script = (
        "import sys; sys.modules['llama_cpp'] = None\n"
        "from n2eye.cli import main\n"
        f"sys.exit(main(['convert', '--model', {str(tiny_checkpoint)!r}, '--to', 'gguf', '--out', {str(tmp_path / 'out')!r}]))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "tensors (F16, F32)" in done.stdout
    gguf = pytest.importorskip("gguf")
    (path,) = (tmp_path / "out").glob("*-F16.gguf")
    from safetensors.torch import load_file

    lm = [k for k in load_file(tiny_checkpoint / "model.safetensors") if k.startswith("model.language_model.")]
    assert len(gguf.GGUFReader(str(path)).tensors) == len(lm)


# ---- the vision side: mmproj for Lfm2Vl shapes ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def lfm2vl_gguf(tmp_path_factory):
    """A tiny Lfm2Vl-shaped N2-Eye (`n2eye build --preset tiny-lfm2-vl`) and its f32 GGUF pair."""
    from n2eye.build import BuildConfig, build

    checkpoint = build(BuildConfig(out=str(tmp_path_factory.mktemp("eye") / "tiny-lfm2-vl"), preset="tiny-lfm2-vl"))
    path, report = _export(checkpoint, tmp_path_factory.mktemp("gguf") / "out", "f32")
    assert report["mmproj"]["file"] == "mmproj-tiny-lfm2-vl-f32.gguf"
    return checkpoint, path, path.parent / report["mmproj"]["file"]


def _picture(width: int, height: int, seed: int = 0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _data_uri(image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.mark.parametrize("size", [(256, 256), (640, 480), (1024, 1024)])
def test_llamacpp_sees_images_as_we_do(lfm2vl_gguf, size):
    """llama.cpp's own multimodal path (mtmd: its preprocessing, tiling, vision graph) on our mmproj: the prompt's
    last logits equal ours within 1e-3 of their scale, and the greedy answer is ours. Sizes: native (no resize),
    resized to the token budget, and 2x2 tiles of 512 px + a resized thumbnail."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install 'n2eye[gguf]'")
    from llama_cpp.llama_chat_format import MTMDChatHandler

    import n2eye

    checkpoint, language_model, mmproj = lfm2vl_gguf
    eye = n2eye.load(checkpoint)
    image = _picture(*size)
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe."}]}]
    inputs = eye._encode(messages)
    inputs.pop("assistant_masks", None)
    with torch.no_grad():
        ours = eye.model(**inputs).logits[0, -1].float().numpy()
    our_answer = eye.chat(messages, max_new_tokens=4, temperature=0, repetition_penalty=1.0)
    llm = _llama(language_model, chat_handler=MTMDChatHandler(clip_model_path=str(mmproj), verbose=False))
    try:
        reply = llm.create_chat_completion(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(image)}},
                                                   {"type": "text", "text": "Describe."}]}],
            temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=4)  # fmt: skip
        n = int(inputs["input_ids"].shape[1])
        assert reply["usage"]["prompt_tokens"] == n  # same layout: markers, tiles, thumbnail, image tokens
        theirs = np.array(llm.scores[n - 1])
    finally:
        llm.close()
    assert float(np.abs(theirs - ours).max()) <= 1e-3 * float(np.abs(ours).max())
    assert reply["choices"][0]["message"]["content"] == our_answer


def test_fixed_resolution_mlp_models_export_their_language_model_and_say_why_not_the_rest(tiny_checkpoint, tmp_path):
    path, report = _export(tiny_checkpoint, tmp_path / "out", "f16")
    records = ["README.md", "n2eye_build.json", "n2eye_convert.json"]  # the model card and what it is rendered from
    assert "mmproj" not in report and sorted(p.name for p in path.parent.iterdir()) == sorted([*records, path.name])
    assert json.loads((path.parent / "n2eye_convert.json").read_text())["mmproj_skipped"] == report["mmproj_skipped"]
    again, _ = _export(tiny_checkpoint, tmp_path / "out", "q8_0")  # a folder n2eye wrote is replaced, not refused
    assert sorted(p.name for p in again.parent.iterdir()) == sorted([*records, again.name])
    assert "'mlp'" in report["mmproj_skipped"] and "language model is exported" in report["mmproj_skipped"]


def test_a_fixed_resolution_siglip_with_the_unshuffle_projector_runs_in_llamacpp(tiny_unshuffle_checkpoint, tmp_path):
    """SigLIP at its own size + the pixel-unshuffle projector (the demo's shape) is llama.cpp's LFM2 vision path
    with no resize: the mmproj carries the image token count, `n2eye.infer.llamacpp` applies it, and llama.cpp's
    prompt and last logits are ours for images at the encoder's size (larger ones llama.cpp would cut into its
    512 px tiles: resize them first)."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install 'n2eye[gguf]'")
    import n2eye
    from n2eye.infer.llamacpp import image_tokens, load_llamacpp

    path, report = _export(tiny_unshuffle_checkpoint, tmp_path / "out", "f32")
    assert report["mmproj"]["image_tokens"] == 16 == image_tokens(path.parent / report["mmproj"]["file"])
    eye = n2eye.load(tiny_unshuffle_checkpoint)
    llm = load_llamacpp(path.parent, n_ctx=1024, logits_all=True, n_threads=2)
    try:
        for image in (_picture(64, 64), _picture(64, 64, seed=1)):
            messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Hi"}]}]
            inputs = eye._encode(messages)
            inputs.pop("assistant_masks", None)
            with torch.no_grad():
                ours = eye.model(**inputs).logits[0, -1].float().numpy()
            reply = llm.create_chat_completion(
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _data_uri(image)}},
                                                       {"type": "text", "text": "Hi"}]}],
                temperature=0.0, top_k=1, repeat_penalty=1.0, max_tokens=2)  # fmt: skip
            n = int(inputs["input_ids"].shape[1])
            assert reply["usage"]["prompt_tokens"] == n
            theirs = np.array(llm.scores[n - 1])
            assert float(np.abs(theirs - ours).max()) <= 1e-3 * float(np.abs(ours).max())
    finally:
        llm.close()


@pytest.fixture(scope="module")
def trained_unshuffle(tiny_unshuffle_checkpoint, tmp_path_factory):
    """The tiny SigLIP + pixel-unshuffle model after a short run on examples/colours (64 px images, its own size)."""
    from pathlib import Path

    from n2eye.train.config import TrainConfig
    from n2eye.train.trainer import train

    data = Path(__file__).resolve().parents[1] / "examples" / "colours" / "train.jsonl"
    out = tmp_path_factory.mktemp("trained-unshuffle") / "colours"
    return train(TrainConfig(model=str(tiny_unshuffle_checkpoint), data=str(data), out=str(out), max_steps=60,
                             lr=3e-3, batch_size=4, grad_accum=1, bf16=False, gradient_checkpointing=False, seed=1))  # fmt: skip


def test_eval_through_llamacpp_scores_what_n2eye_scores(trained_unshuffle, tmp_path):
    """`n2eye eval --gguf DIR`: llama.cpp renders, tokenizes and sees every held-out question (its chat template,
    its image path) and answers each turn as N2-Eye does: the same predictions, so the same scores (f32); q8_0
    within a point per type here."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install 'n2eye[gguf]'")
    from pathlib import Path

    from n2eye.eval.runner import EvalConfig, evaluate

    data = Path(__file__).resolve().parents[1] / "examples" / "colours" / "train.jsonl"
    ours = evaluate(EvalConfig(model=str(trained_unshuffle), data=str(data), out=str(tmp_path / "ours.json"),
                               max_new_tokens=6))  # fmt: skip
    # it learned (half the turns right, answers that vary): the comparison is not between two blank answers
    assert ours["overall"] >= 0.5 and len({p["prediction"] for p in ours["predictions"]}) >= 3
    for quant in ("f32", "q8_0"):
        path, _ = _export(trained_unshuffle, tmp_path / quant, quant)
        theirs = evaluate(EvalConfig(model=str(trained_unshuffle), data=str(data), gguf=str(path.parent),
                                     out=str(tmp_path / f"{quant}.json"), max_new_tokens=6))  # fmt: skip
        if quant == "f32":
            assert [p["prediction"] for p in theirs["predictions"]] == [p["prediction"] for p in ours["predictions"]]
        for qtype, row in ours["per_type"].items():
            assert abs(theirs["per_type"][qtype]["mean_score"] - row["mean_score"]) <= (0 if quant == "f32" else 0.13)


def test_a_vocabulary_llamacpp_cannot_express_is_refused_before_anything_is_written(tiny_checkpoint, tmp_path):
    """llama.cpp's lfm2 vocabulary is byte-level BPE: another tokenizer model (here WordLevel) is refused with the
    reason, and the export folder is not left behind half-written."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from n2eye.convert import ConvertConfig, convert
    from n2eye.convert.to_gguf import GGUFExportError

    source = tmp_path / "wordlevel"
    shutil.copytree(tiny_checkpoint, source)
    from transformers import AutoTokenizer

    original = AutoTokenizer.from_pretrained(source)
    vocab = {token: index for token, index in original.get_vocab().items()}
    word_level = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|pad|>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, bos_token="<|startoftext|>",
                                        eos_token="<|im_end|>", pad_token="<|pad|>")  # fmt: skip
    tokenizer.save_pretrained(source)
    with pytest.raises(GGUFExportError, match="WordLevel.*byte-level BPE"):
        convert(ConvertConfig(model=str(source), to="gguf", out=str(tmp_path / "out")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wordlevel"]
