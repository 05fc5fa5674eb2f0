"""transformers Lfm2Vl <-> N2-Eye: the two models have the same modules and weight names (N2-Eye's layout follows
Lfm2Vl), so a conversion is a config mapping, a strict state-dict copy and the processor files rewritten.

Import (`--to n2eye`) keeps the source's tokenizer (ids, special tokens), its image settings and generation
config; its chat template is kept verbatim unless N2-Eye's renders every probe conversation the same text
(then N2-Eye's is used: its `{% generation %}` blocks give training its assistant masks). Export (`--to lfm2-vl`)
writes a native folder (`model_type: lfm2_vl`, no Python files) that `Lfm2VlForConditionalGeneration` and
therefore vLLM load without remote code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CONVERT_REPORT, atomic_write_dir, check_writable, default_generation_config
from ..modeling.naflex_images import POLICY_SETTINGS, default_settings

# Normalisation keys of the image processor config, shared by Lfm2VlImageProcessor and Siglip2ImageProcessor.
NORMALIZATION_KEYS = ("do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std")
LFM2VL_IMAGE_PROCESSORS = ("Lfm2VlImageProcessor", "Lfm2VlImageProcessorFast")
REQUIRED_TOKENS = ("<image>", "<|image_start|>", "<|image_end|>", "<|im_start|>", "<|im_end|>")
# Options Lfm2VlConfig and N2EyeConfig both have, with the same names and meanings: copied as they are both ways.
SHARED_CONFIG_FIELDS = ("projector_hidden_size", "projector_hidden_act", "projector_bias", "projector_use_layernorm",
                        "downsample_factor", "image_token_id", "tie_word_embeddings")  # fmt: skip
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class ConversionError(ValueError):
    """The source is not what the conversion needs; the message says what it is and what would work."""


# ---- reading a source --------------------------------------------------------------------------------------------
def _is_local(source: str) -> bool:
    return os.path.isdir(os.path.expanduser(source))


def check_local_source(source: str, expected: str) -> None:
    """A local folder must hold a config and weights; a path-like source that doesn't exist says so."""
    path = Path(source).expanduser()
    looks_local = source.startswith((".", "/", "~")) or source.count("/") > 1
    if not path.is_dir():
        if looks_local:
            raise ConversionError(f"--model {source}: no such folder. Give a checkpoint folder or a hub id ({expected}).")
        return  # a hub id: from_pretrained downloads it
    if not (path / "config.json").is_file():
        raise ConversionError(f"--model {source} has no config.json: it is not a transformers checkpoint folder.")
    if (path / "adapter_config.json").is_file() and not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConversionError(f"--model {source} is a LoRA adapter, not a full model: merge it first "
                              f"(`n2eye merge --adapter {source} --out MERGED`), then convert MERGED.")  # fmt: skip
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise ConversionError(
            f"--model {source} has a config.json but no weights (model.safetensors, its shard index, or "
            "pytorch_model.bin): the download or copy is incomplete. Fetch the whole repository again."
        )


def read_json_file(source: str, name: str) -> dict | None:
    """A JSON file of a checkpoint folder or hub repo (None when it has none)."""
    from transformers.utils import cached_file

    try:
        path = cached_file(source, name, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None
    if path is None:
        return None
    try:
        return json.loads(Path(path).read_text())
    except ValueError as err:
        raise ConversionError(f"{source}/{name} is not valid JSON ({err}); the file is damaged.") from None


def _load_strict(model_class, source: str, dtype: torch.dtype | None, what: str):
    """`from_pretrained` that refuses, instead of random-initialising, weights missing from the folder or of the
    wrong shape for its config."""
    kwargs = {"dtype": dtype} if dtype is not None else {"dtype": "auto"}
    try:
        model, info = model_class.from_pretrained(source, output_loading_info=True, **kwargs)
    except (RuntimeError, ValueError) as err:
        raise ConversionError(f"{source}: its weights do not fit its config.json ({what}): {err}".strip()) from None
    missing = [k for k in info.get("missing_keys", ()) if k != "lm_head.weight"]
    mismatched = list(info.get("mismatched_keys", ()))
    if missing or mismatched:
        detail = f"missing {missing[:4]}" if missing else f"wrong shape {mismatched[:4]}"
        raise ConversionError(
            f"{source}: the weights do not match its config.json ({what}): {detail}. The folder mixes files of "
            "different models or its config was edited; use the folder as published."
        )
    return model.eval()


# ---- import: Lfm2Vl -> N2-Eye --------------------------------------------------------------------------------------
def n2eye_config_from_lfm2vl(config) -> Any:
    """N2EyeConfig with Lfm2Vl's architecture: SigLIP2 NaFlex + pixel unshuffle + LFM2, same widths and options."""
    from ..modeling.configuration_n2eye import N2EyeConfig

    return N2EyeConfig(
        text_config=config.text_config.to_dict(),
        vision_config=config.vision_config.to_dict(),
        projector_type="pixel_unshuffle_mlp",
        vision_feature_layer=-1,
        **{name: getattr(config, name) for name in SHARED_CONFIG_FIELDS},
    )


def image_settings_from_lfm2vl(preprocessor: dict) -> tuple[dict, dict]:
    """(image_policy settings, Siglip2ImageProcessor kwargs) from an `Lfm2VlImageProcessor` config."""
    kind = preprocessor.get("image_processor_type")
    if kind not in LFM2VL_IMAGE_PROCESSORS:
        raise ConversionError(
            f"preprocessor_config.json names image_processor_type {kind!r}, not one of {list(LFM2VL_IMAGE_PROCESSORS)}"
            ": this is not an LFM2-VL image processor."
        )
    settings = {k: preprocessor[k] for k in POLICY_SETTINGS if preprocessor.get(k) is not None}
    if isinstance(settings.get("resample"), str):
        settings.pop("resample")  # a name such as "bilinear" is also the class default
    try:
        policy = default_settings(**settings)
    except ValueError as err:
        raise ConversionError(f"preprocessor_config.json: {err}") from None
    image_processor = {k: preprocessor[k] for k in NORMALIZATION_KEYS if k in preprocessor}
    image_processor.update(patch_size=policy["encoder_patch_size"], max_num_patches=policy["max_num_patches"])
    return policy, image_processor


def probe_conversations() -> list[dict]:
    """Conversations both templates must render alike for N2-Eye's template to stand in for the source's."""
    image, text = {"type": "image"}, {"type": "text", "text": "What is this?"}
    tools = [{"name": "get_weather", "description": "Weather now.", "parameters": {"type": "object", "properties":
             {"location": {"type": "string"}}, "required": ["location"]}}]  # fmt: skip
    return [
        {"messages": [{"role": "user", "content": "Hi"}], "add_generation_prompt": True},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [image, text]}],
         "add_generation_prompt": True},
        {"messages": [{"role": "user", "content": [text, image, image]}, {"role": "assistant", "content": "Two cats."},
                      {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "Gone."}]},
        {"messages": [{"role": "user", "content": "Weather in Paris?"},
                      {"role": "assistant", "content": '<|tool_call_start|>[get_weather(location="Paris")]<|tool_call_end|>'},
                      {"role": "tool", "content": '{"temperature": 21}'}], "tools": tools, "add_generation_prompt": True},
    ]  # fmt: skip


def templates_agree(tokenizer, source_template: str, our_template: str) -> tuple[bool, str]:
    """(same text on every probe, why not): renders each probe with both templates (N2-Eye's with no default
    system prompt, as a converted model has none)."""
    for index, probe in enumerate(probe_conversations()):
        kwargs = {"tools": probe.get("tools"), "add_generation_prompt": probe.get("add_generation_prompt", False),
                  "tokenize": False}  # fmt: skip
        try:
            theirs = tokenizer.apply_chat_template(probe["messages"], chat_template=source_template, **kwargs)
        except Exception as err:  # noqa: BLE001 - a template that can't render a probe is simply not compared on it
            return False, f"the source's template fails on probe {index + 1} ({err})"
        ours = tokenizer.apply_chat_template(probe["messages"], chat_template=our_template, default_system_prompt="",
                                             **kwargs)  # fmt: skip
        if ours != theirs:
            return False, f"probe {index + 1} renders differently: source {theirs!r} vs N2-Eye {ours!r}"
    return True, ""


def _source_chat_template(source: str, tokenizer) -> str | None:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    processor = read_json_file(source, "chat_template.json") or {}
    return processor.get("chat_template")


def _check_tokenizer(tokenizer, config) -> None:
    vocab = tokenizer.get_vocab()
    missing = [t for t in REQUIRED_TOKENS if t not in vocab]
    if missing:
        raise ConversionError(f"The source's tokenizer lacks {missing}: it is not an LFM2-VL tokenizer.")
    if vocab["<image>"] != config.image_token_id:
        raise ConversionError(
            f"config.json says image_token_id {config.image_token_id} but the tokenizer's <image> is "
            f"{vocab['<image>']}: the tokenizer and the config are from different models."
        )
    if len(tokenizer) > config.text_config.vocab_size:
        raise ConversionError(
            f"The tokenizer has {len(tokenizer)} tokens but the model's vocabulary is {config.text_config.vocab_size}:"
            " the tokenizer and the weights are from different models."
        )


def import_lfm2vl(source: str, out: str | Path, dtype: torch.dtype | None = None) -> tuple[Path, dict]:
    """A transformers Lfm2Vl checkpoint (hub id or folder) -> an N2-Eye checkpoint folder. Returns (path, report)."""
    from transformers import AutoConfig, AutoTokenizer, Lfm2VlForConditionalGeneration

    from ..build import siglip2_image_processor_class
    from ..checkpoint import modeling_source_dir, save_checkpoint
    from ..modeling.modeling_n2eye import N2EyeForConditionalGeneration
    from ..modeling.processing_n2eye import N2EyeProcessor

    check_local_source(source, "e.g. LiquidAI/LFM2-VL-450M")
    kind = (read_json_file(source, "config.json") or {}).get("model_type")  # read, not run: no remote code
    if kind != "lfm2_vl":
        hint = " It is already an N2-Eye checkpoint." if kind == "n2eye" else ""
        raise ConversionError(
            f"{source} is a {kind!r} checkpoint; `--to n2eye` imports transformers Lfm2Vl checkpoints "
            f"(model_type 'lfm2_vl', e.g. LiquidAI/LFM2-VL-450M, LiquidAI/LFM2-VL-1.6B).{hint}"
        )
    config = AutoConfig.from_pretrained(source)
    check_writable(out)
    tokenizer = AutoTokenizer.from_pretrained(source)
    _check_tokenizer(tokenizer, config)
    preprocessor = read_json_file(source, "preprocessor_config.json")
    if preprocessor is None:
        raise ConversionError(f"{source} has no preprocessor_config.json: its image settings are unknown.")
    policy, image_processor_kwargs = image_settings_from_lfm2vl(preprocessor)
    processor_config = read_json_file(source, "processor_config.json") or {}

    source_model = _load_strict(Lfm2VlForConditionalGeneration, source, dtype, "Lfm2VlForConditionalGeneration")
    n2eye_config = n2eye_config_from_lfm2vl(source_model.config)
    model = N2EyeForConditionalGeneration(n2eye_config).to(source_model.dtype)
    state = source_model.state_dict()
    dropped = sorted(k for k in state if ".vision_tower.head." in k)  # SigLIP's pooling head: never used by Lfm2Vl
    model.load_state_dict({k: v for k, v in state.items() if k not in dropped}, strict=True)
    model.tie_weights()
    model.eval()

    ours = (modeling_source_dir() / "chat_template.jinja").read_text()
    theirs = _source_chat_template(source, tokenizer)
    if theirs is None:
        template, template_note = ours, "the source has none: N2-Eye's LFM2 ChatML template"
    else:
        same, why = templates_agree(tokenizer, theirs, ours)
        template = ours if same else theirs
        template_note = (f"N2-Eye's (renders all {len(probe_conversations())} probe conversations exactly as the "
                         "source's, and marks assistant turns for training)") if same else (
                         f"the source's, kept verbatim ({why}); `n2eye train` needs {{% generation %}} blocks")  # fmt: skip
    tokenizer.chat_template = template
    processor = N2EyeProcessor(
        image_processor=siglip2_image_processor_class()(**image_processor_kwargs),
        tokenizer=tokenizer,
        chat_template=template,
        patch_size=n2eye_config.vision_config.patch_size,
        downsample_factor=n2eye_config.downsample_factor,
        default_system_prompt=None,
        use_image_special_tokens=processor_config.get("use_image_special_tokens", True),
        image_policy=policy,
    )
    generation = read_json_file(source, "generation_config.json")
    if generation is not None:
        from transformers import GenerationConfig

        generation_config = GenerationConfig.from_dict(generation)
    else:
        generation_config = default_generation_config(tokenizer)
    report = {
        "converted_from": source,
        "to": "n2eye",
        "weights": len(state) - len(dropped),
        "dropped_weights": dropped,
        "chat_template": template_note,
        "image_policy": policy,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    path = save_checkpoint(model, processor, out, generation_config, extra_json={CONVERT_REPORT: report})
    if template is not ours:
        (path / "chat_template.jinja").write_text(template)  # copy_modeling_files wrote ours over it
    return path, report


# ---- export: N2-Eye -> Lfm2Vl --------------------------------------------------------------------------------------
def exportable_reason(config, processor) -> str | None:
    """Why this N2-Eye cannot be written as Lfm2Vl (None when it can)."""
    problems = []
    if config.vision_config.model_type != "siglip2_vision_model":
        problems.append(f"its vision encoder is {config.vision_config.model_type!r} (fixed resolution), Lfm2Vl's is "
                        "SigLIP2 NaFlex ('siglip2_vision_model')")  # fmt: skip
    if config.projector_type != "pixel_unshuffle_mlp":
        problems.append(f"its projector is {config.projector_type!r}, Lfm2Vl's is 'pixel_unshuffle_mlp'")
    if config.vision_feature_layer != -1:
        problems.append(f"it reads vision layer {config.vision_feature_layer}, Lfm2Vl the last one (-1)")
    if getattr(processor, "image_policy", None) is None:
        problems.append("its processor has no LFM2-VL image policy (tiles, thumbnail, min/max image tokens)")
    if not problems:
        return None
    return (
        "; ".join(problems) + ". Lfm2Vl (and vLLM) run exactly SigLIP2 NaFlex + pixel unshuffle: build that shape "
        "(`n2eye build --preset lfm2-vl-450m`, or --vision google/siglip2-base-patch16-naflex --projector "
        "pixel_unshuffle_mlp), train it, then export it."
    )


def lfm2vl_config_from_n2eye(config) -> Any:
    from transformers import Lfm2VlConfig

    vision = config.vision_config.to_dict()
    vision["vision_use_head"] = False
    return Lfm2VlConfig(
        text_config=config.text_config.to_dict(),
        vision_config=vision,
        **{name: getattr(config, name) for name in SHARED_CONFIG_FIELDS},
    )


def lfm2vl_preprocessor_config(processor) -> dict:
    """`preprocessor_config.json` for `Lfm2VlImageProcessor` with this processor's policy and normalisation."""
    policy = dict(processor.image_policy)
    max_num_patches = policy.pop("max_num_patches", None) or processor.image_processor.max_num_patches
    ip = processor.image_processor
    normalization = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k in NORMALIZATION_KEYS
                     if (v := getattr(ip, k, None)) is not None}  # fmt: skip
    return {"image_processor_type": "Lfm2VlImageProcessor", "processor_class": "Lfm2VlProcessor", **policy,
            "do_resize": True, "size": {"height": policy["tile_size"], "width": policy["tile_size"]},
            "do_pad": True, **normalization, "max_num_patches": max_num_patches}  # fmt: skip


def export_lfm2vl(source: str, out: str | Path) -> tuple[Path, dict]:
    """An N2-Eye checkpoint of Lfm2Vl shape -> a native transformers Lfm2Vl folder. Returns (path, report)."""
    from transformers import AutoProcessor, Lfm2VlForConditionalGeneration

    from ..model_card import lineage_records, write_card
    from ..modeling.modeling_n2eye import N2EyeForConditionalGeneration
    from .templates import exported_chat_template

    check_local_source(source, "an N2-Eye checkpoint folder")
    kind = (read_json_file(source, "config.json") or {}).get("model_type")
    if kind != "n2eye":
        raise ConversionError(f"{source} is a {kind!r} checkpoint; `--to lfm2-vl` exports N2-Eye checkpoints "
                              "(`n2eye build`, `n2eye train` or `--to n2eye` outputs).")  # fmt: skip
    processor = AutoProcessor.from_pretrained(source, trust_remote_code=True)
    model = _load_strict(N2EyeForConditionalGeneration, source, None, "N2-Eye")
    reason = exportable_reason(model.config, processor)
    if reason:
        raise ConversionError(f"{source} can't be written as transformers Lfm2Vl: {reason}")
    check_writable(out)
    lfm2vl = Lfm2VlForConditionalGeneration(lfm2vl_config_from_n2eye(model.config)).to(model.dtype).eval()
    lfm2vl.load_state_dict(model.state_dict(), strict=True)
    lfm2vl.tie_weights()
    lfm2vl.generation_config = model.generation_config
    tokenizer = processor.tokenizer
    # transformers' Lfm2VlProcessor renders it without our processor: our default system prompt goes into it
    tokenizer.chat_template = exported_chat_template(processor.chat_template, processor.default_system_prompt)

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        lfm2vl.save_pretrained(tmp, max_shard_size="2GB")
        tokenizer.save_pretrained(tmp)
        tokenizer_config = json.loads((tmp / "tokenizer_config.json").read_text())
        tokenizer_config.pop("auto_map", None)
        tokenizer_config["processor_class"] = "Lfm2VlProcessor"  # was N2EyeProcessor
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        (tmp / "preprocessor_config.json").write_text(json.dumps(lfm2vl_preprocessor_config(processor), indent=2) + "\n")
        processor_config = {"processor_class": "Lfm2VlProcessor",
                            "use_image_special_tokens": processor.use_image_special_tokens}  # fmt: skip
        (tmp / "processor_config.json").write_text(json.dumps(processor_config, indent=2) + "\n")
        for stray in tmp.glob("*.py"):  # nothing that would need trust_remote_code
            stray.unlink()
        (tmp / CONVERT_REPORT).write_text(json.dumps(report, indent=2) + "\n")  # what it is, where from
        for name, record in lineage_records(source).items():  # what the weights came from, for the card
            (tmp / name).write_text(json.dumps(record, indent=2, default=str) + "\n")
        write_card(tmp, model_id=str(Path(out).expanduser().resolve()))

    report = {"converted_from": source, "to": "lfm2-vl", "weights": len(lfm2vl.state_dict()),
              "parameters": sum(p.numel() for p in lfm2vl.parameters())}  # fmt: skip
    return atomic_write_dir(out, write), report


__all__ = ["ConversionError", "export_lfm2vl", "import_lfm2vl", "templates_agree"]
