"""N2-Eye -> GGUF for llama.cpp: the LFM2 language model (arch `lfm2`, with its tokenizer and chat template) and,
for Lfm2Vl-shaped models, the vision side as an `mmproj` file (projector type `lfm2`).

Names, keys and layouts follow llama.cpp's own converter (`convert_hf_to_gguf.py`, LFM2Model / LFM2VLModel),
through the `gguf` package's tensor-name maps; quantization (Q8_0, Q4_0) is gguf's implementation of llama.cpp's
formats. Parity is proven by llama.cpp itself in the tests (llama-cpp-python).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0")
# mmproj metadata of ours: the fixed image token count a fixed-resolution encoder needs llama.cpp to keep
IMAGE_TOKENS_KEY = "n2eye.image_tokens"


class GGUFExportError(ValueError):
    """What can't be written as GGUF, and why; raised before any file is written."""


def _gguf():
    try:
        import gguf
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("`n2eye convert --to gguf` needs the gguf package: pip install gguf", name="gguf") from err
    return gguf


def tensor_type(gguf, name: str, shape: tuple[int, ...], quant: str):
    """The GGML type a tensor is stored in: norms, biases and the short-conv kernels (rows of 3) stay F32, as in
    llama.cpp's converter; matrices take the requested type, quantized ones only where rows are whole blocks."""
    types = gguf.GGMLQuantizationType
    if len(shape) < 2 or name.endswith(".shortconv.conv.weight") or quant == "f32":
        return types.F32
    wanted = {"f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0, "q4_0": types.Q4_0}[quant]
    block = gguf.GGML_QUANT_SIZES[wanted][0]
    return wanted if shape[-1] % block == 0 else types.F16


def _to_numpy(tensor: torch.Tensor, ggml_type, gguf) -> np.ndarray:
    types = gguf.GGMLQuantizationType
    values = tensor.detach().to(torch.float32).cpu().numpy()
    if ggml_type == types.F32:
        return values
    if ggml_type == types.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, ggml_type)


# ---- the language model ------------------------------------------------------------------------------------------
def tokenizer_vocab(tokenizer, vocab_size: int, gguf) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges) as llama.cpp's BPE ("gpt2") vocabulary takes them: special added tokens
    are CONTROL (matched in text only when parsing special tokens, as transformers does), other added tokens
    USER_DEFINED, ids beyond the tokenizer up to the model's vocabulary UNUSED placeholders."""
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    model = state["model"]
    if model.get("type") != "BPE":
        raise GGUFExportError(f"the tokenizer is {model.get('type')!r}; llama.cpp's LFM2 vocabulary is byte-level BPE.")
    by_id: dict[int, str] = {i: t for t, i in model["vocab"].items()}
    kinds = {i: gguf.TokenType.NORMAL for i in by_id}
    for added in state.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED
    if max(by_id) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(by_id)} but the model's vocabulary is {vocab_size}.")
    tokens, types = [], []
    for i in range(vocab_size):
        tokens.append(by_id.get(i, f"[PAD{i}]"))
        types.append(int(kinds.get(i, gguf.TokenType.UNUSED)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def write_language_model(model, tokenizer, chat_template: str | None, path: Path, quant: str, name: str) -> dict:
    """The LFM2 language model as a GGUF file (arch `lfm2`); returns what was written."""
    gguf = _gguf()
    text = model.config.text_config
    lm = model.model.language_model
    layer_types = list(text.layer_types)
    if any(t not in ("conv", "full_attention") for t in layer_types):
        raise GGUFExportError(f"layer types {sorted(set(layer_types))}: llama.cpp's lfm2 runs conv and full_attention.")
    arch = gguf.MODEL_ARCH.LFM2
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name)
    writer.add_context_length(text.max_position_embeddings)
    writer.add_embedding_length(text.hidden_size)
    writer.add_block_count(text.num_hidden_layers)
    writer.add_feed_forward_length(int(lm.layers[0].feed_forward.w1.weight.shape[0]))
    writer.add_head_count(text.num_attention_heads)
    writer.add_head_count_kv([text.num_key_value_heads if t != "conv" else 0 for t in layer_types])
    rope = (getattr(text, "rope_parameters", None) or {}).get("rope_theta") or getattr(text, "rope_theta", 1e6)
    writer.add_rope_freq_base(float(rope))
    writer.add_layer_norm_rms_eps(float(text.norm_eps))
    writer.add_vocab_size(text.vocab_size)
    writer.add_shortconv_l_cache(int(text.conv_L_cache))
    writer.add_file_type({"f32": 0, "f16": 1, "bf16": 32, "q8_0": 7, "q4_0": 2}[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    tokens, types, merges = tokenizer_vocab(tokenizer, text.vocab_size, gguf)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("lfm2")  # LFM2's split regex (our tokenizers use the same one)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    writer.add_pad_token_id(tokenizer.pad_token_id)
    # as llama.cpp's converter reads it from the tokenizer: LFM2's adds <|startoftext|> to plain text
    writer.add_add_bos_token(tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id])
    if chat_template:
        writer.add_chat_template(chat_template)

    names = gguf.get_tensor_name_map(arch, text.num_hidden_layers)
    written = {}
    for hf_name, tensor in lm.state_dict().items():
        key = f"model.{hf_name}"
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise GGUFExportError(f"no llama.cpp name for the language-model tensor {key}.")
        if ".conv.conv." in key:
            tensor = tensor.squeeze(1)  # (channels, 1, L) -> (channels, L): llama.cpp's conv op is 2D
        ggml_type = tensor_type(gguf, target, tuple(tensor.shape), quant)
        writer.add_tensor(target, _to_numpy(tensor, ggml_type, gguf), raw_dtype=ggml_type)
        written[target] = ggml_type.name
    if not model.config.tie_word_embeddings:
        weight = model.lm_head.weight
        ggml_type = tensor_type(gguf, "output.weight", tuple(weight.shape), quant)
        writer.add_tensor("output.weight", _to_numpy(weight, ggml_type, gguf), raw_dtype=ggml_type)
        written["output.weight"] = ggml_type.name
    _finish(writer)
    return {"file": path.name, "tensors": len(written), "types": sorted(set(written.values()))}


def mmproj_unsupported(model, processor) -> str | None:
    """Why llama.cpp's LFM2-VL vision path (`PROJECTOR_TYPE_LFM2`: a SigLIP ViT whose learned position embeddings
    are resized to the image, 2x2 pixel unshuffle, LayerNorm, Linear-GELU-Linear, last layer) can't run this model's
    vision side, or None. It runs the Lfm2Vl shape, and a fixed-resolution SigLIP with that projector too: at the
    encoder's own size nothing is resized, so it is the same computation (llama.cpp then needs the image token
    count fixed at run time, see `fixed_image_tokens`)."""
    from .lfm2vl import exportable_reason

    config = model.config
    if config.vision_config.model_type == "siglip2_vision_model":
        return exportable_reason(config, processor)
    problems = []
    if config.projector_type != "pixel_unshuffle_mlp" or not config.projector_use_layernorm:
        problems.append(f"its projector is {config.projector_type!r}; llama.cpp's LFM2 vision path runs the "
                        "pixel-unshuffle projector (2x2, LayerNorm, Linear-GELU-Linear), and no llama.cpp projector "
                        "type runs the card's Linear-GELU-Linear on SigLIP exactly")  # fmt: skip
    if config.vision_feature_layer != -1:
        problems.append(f"it reads vision layer {config.vision_feature_layer}; llama.cpp the last one")
    grid = config.vision_config.image_size // config.vision_config.patch_size
    if grid % config.downsample_factor:
        problems.append(f"its {grid}x{grid} patch grid is not whole {config.downsample_factor}x{config.downsample_factor}"
                        " blocks (we pad it; llama.cpp does not)")  # fmt: skip
    if getattr(processor, "image_splitting", False):
        problems.append("its processor splits images (Idefics2-style), which llama.cpp's LFM2 path does not")
    return "; ".join(problems) + "." if problems else None


def fixed_image_tokens(model) -> int | None:
    """The image token count a fixed-resolution SigLIP model takes (None for NaFlex): run llama.cpp with
    `--image-min-tokens N --image-max-tokens N` so its LFM2 preprocessor keeps images at the encoder's size."""
    vision = model.config.vision_config
    if vision.model_type == "siglip2_vision_model":
        return None
    return (vision.image_size // vision.patch_size // model.config.downsample_factor) ** 2


def write_mmproj(model, processor, path: Path, quant: str, name: str) -> dict:
    """The vision tower and projector as llama.cpp's `mmproj` file (arch `clip`, projector type `lfm2`): SigLIP2
    NaFlex with its linear patch embedding written as the 16x16 convolution llama.cpp runs, position embeddings
    resized by llama.cpp to each image, pixel unshuffle, LayerNorm, Linear-GELU-Linear."""
    gguf = _gguf()
    config = model.config
    vision = config.vision_config
    writer = gguf.GGUFWriter(str(path), "clip")
    writer.add_name(f"{name} vision")
    writer.add_file_type(0 if quant == "f32" else 1)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(gguf.VisionProjectorType.LFM2)
    writer.add_vision_projection_dim(config.text_config.hidden_size)
    writer.add_vision_image_size(getattr(vision, "image_size", 256))  # NaFlex: none; llama.cpp's converter writes 256
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    writer.add_vision_block_count(vision.num_hidden_layers)
    writer.add_vision_head_count(vision.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(float(vision.layer_norm_eps))
    writer.add_vision_projector_scale_factor(int(config.downsample_factor))
    writer.add_vision_use_gelu(True)
    if (tokens := fixed_image_tokens(model)) is not None:  # read by n2eye.infer.llamacpp (llama.cpp has no key)
        writer.add_uint32(IMAGE_TOKENS_KEY, tokens)
    image_processor = processor.image_processor
    mean, std = image_processor.image_mean, image_processor.image_std
    writer.add_vision_image_mean([float(v) for v in (mean if isinstance(mean, (list, tuple)) else [mean] * 3)])
    writer.add_vision_image_std([float(v) for v in (std if isinstance(std, (list, tuple)) else [std] * 3)])

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, max(vision.num_hidden_layers, 3))
    tower = {k.removeprefix("vision_model."): v for k, v in model.model.vision_tower.state_dict().items()}
    state = {**{f"vision_tower.vision_model.{k}": v for k, v in tower.items()},
             **{f"multi_modal_projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()}}  # fmt: skip
    written = {}
    p = vision.patch_size
    for key, tensor in state.items():
        target = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise GGUFExportError(f"no llama.cpp name for the vision tensor {key}.")
        if key.endswith("embeddings.patch_embedding.weight") and tensor.dim() == 2:  # NaFlex: Linear over (p, p, 3)
            tensor = tensor.reshape(tensor.shape[0], p, p, 3).permute(0, 3, 1, 2).contiguous()
        # F32: norms, biases and the position embeddings (llama.cpp adds them to F32 activations as they are when
        # an image needs no resizing of them, and its add takes no F16 there); F16 the matrices
        keep_f32 = quant == "f32" or tensor.dim() < 2 or target.startswith("v.position_embd")
        ggml_type = gguf.GGMLQuantizationType.F32 if keep_f32 else gguf.GGMLQuantizationType.F16
        writer.add_tensor(target, _to_numpy(tensor, ggml_type, gguf), raw_dtype=ggml_type)
        written[target] = ggml_type.name
    _finish(writer)
    return {"file": path.name, "tensors": len(written), "types": sorted(set(written.values()))}


def _finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def model_name(source: str) -> str:
    """The files' name: the checkpoint folder's, or its run's for a training output (runs/NAME/final -> NAME)."""
    path = Path(source).expanduser().resolve()
    generic = path.name in ("final", "merged") or path.name.startswith("checkpoint-")
    return path.parent.name if generic and path.parent.name else path.name


def export_gguf(source: str, out: str | Path, quant: str = "f16") -> tuple[Path, dict[str, Any]]:
    """An N2-Eye checkpoint -> `out/<name>-<QUANT>.gguf` (+ `out/mmproj-<name>-f16.gguf` for Lfm2Vl shapes)."""
    from transformers import AutoProcessor

    from ..checkpoint import CONVERT_REPORT, atomic_write_dir, check_writable
    from ..model_card import lineage_records, write_card
    from ..modeling.modeling_n2eye import N2EyeForConditionalGeneration
    from .lfm2vl import ConversionError, check_local_source, read_json_file
    from .templates import exported_chat_template

    if quant not in QUANTS:
        raise GGUFExportError(f"--quant {quant!r}: choose one of {list(QUANTS)}.")
    _gguf()
    check_local_source(source, "an N2-Eye checkpoint folder")
    kind = (read_json_file(source, "config.json") or {}).get("model_type")
    if kind != "n2eye":
        raise ConversionError(f"{source} is a {kind!r} checkpoint; `--to gguf` exports N2-Eye checkpoints "
                              "(import an Lfm2Vl one first with `--to n2eye`).")  # fmt: skip
    check_writable(out)
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    model = N2EyeForConditionalGeneration.from_pretrained(source, dtype=torch.float32).eval()
    name = model_name(source)
    report: dict[str, Any] = {"converted_from": source, "to": "gguf", "quant": quant}

    why_no_vision = mmproj_unsupported(model, processor)
    vision_type = "f32" if quant == "f32" else "f16"

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        template = exported_chat_template(processor.chat_template, processor.default_system_prompt, keep_generation=False)
        report["language_model"] = write_language_model(
            model, processor.tokenizer, template, tmp / f"{name}-{quant.upper()}.gguf", quant, name
        )
        if why_no_vision is None:
            report["mmproj"] = write_mmproj(model, processor, tmp / f"mmproj-{name}-{vision_type}.gguf", vision_type, name)
            if (tokens := fixed_image_tokens(model)) is not None:
                report["mmproj"]["image_tokens"] = tokens
        else:
            report["mmproj_skipped"] = (
                "llama.cpp's vision path for this family (projector type lfm2) runs the Lfm2Vl shape only, and "
                + why_no_vision.replace("Lfm2Vl (and vLLM) run exactly", "it runs exactly")
                + " The language model is exported; llama.cpp runs it on text."
            )

    report["parameters"] = sum(p.numel() for p in model.model.language_model.parameters())

    def write_all(tmp: Path) -> None:
        write(tmp)
        report["weights"] = report["language_model"]["tensors"]
        (tmp / CONVERT_REPORT).write_text(json.dumps(report, indent=2) + "\n")  # what it is, where from
        for name, record in lineage_records(source).items():  # what the weights came from, for the card
            (tmp / name).write_text(json.dumps(record, indent=2, default=str) + "\n")
        write_card(tmp, model_id=str(Path(out).expanduser().resolve()))

    return atomic_write_dir(out, write_all), report


__all__ = ["QUANTS", "GGUFExportError", "export_gguf", "fixed_image_tokens", "tensor_type", "tokenizer_vocab",
           "write_language_model", "write_mmproj"]
