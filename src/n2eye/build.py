"""Assemble an N2-Eye model from an LFM2 language model and a SigLIP/SigLIP2 vision encoder, and save it.

Backbones come from the hub or local folders through the real `from_pretrained`, from a named preset, or
(`random_init`) from the preset's bundled configs with no download.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    Siglip2ImageProcessor,
    SiglipImageProcessor,
)

from .cache import cache_root
from .checkpoint import check_writable, default_generation_config, save_checkpoint
from .modeling.configuration_n2eye import (
    SUPPORTED_PROJECTOR_TYPES,
    SUPPORTED_TEXT_MODEL_TYPES,
    SUPPORTED_VISION_MODEL_TYPES,
    N2EyeConfig,
)
from .modeling.image_policy import image_marker_tokens
from .modeling.modeling_n2eye import N2EyeForConditionalGeneration
from .modeling.naflex_images import default_settings
from .modeling.processing_n2eye import LFM2_SPECIAL_TOKENS, N2EyeProcessor
from .presets import get_preset, load_bundled_json

# Tokens N2-Eye needs; added when the LM's tokenizer lacks them (LFM2 has the chat and tool tokens, not the image ones).
REQUIRED_SPECIAL_TOKENS = (
    *LFM2_SPECIAL_TOKENS[LFM2_SPECIAL_TOKENS.index("<|im_start|>") :],
    "<image>",
    "<|image_start|>",
    "<|image_end|>",
)
_VISION_CONTAINER_TYPES = {"siglip": "siglip_vision_model", "siglip2": "siglip2_vision_model"}
# Bundled preprocessor configs name their class; NaFlex encoders (SigLIP2 *-naflex) use Siglip2ImageProcessor.
_IMAGE_PROCESSORS = {"SiglipImageProcessor": SiglipImageProcessor, "Siglip2ImageProcessor": Siglip2ImageProcessor}


@dataclass
class BuildConfig:
    """What `n2eye build` assembles."""

    out: str
    """Folder to write the checkpoint to (replaced atomically if it exists)."""
    preset: str | None = None
    """Named recipe (`tiny`, `n2eye-1.3b`, `lfm2-vl-450m`, `lfm2-vl-1.6b`); sets lm, vision and projector unless
    given."""
    lm: str | None = None
    """LFM2 language model: hub id or local folder."""
    vision: str | None = None
    """SigLIP / SigLIP2 vision encoder: hub id or local folder."""
    projector: str | None = None
    """`mlp` (the N2-Eye card) or `pixel_unshuffle_mlp` (LFM2-VL); the preset's when not given."""
    random_init: bool = False
    """Build the preset's shapes from bundled configs with random weights, without downloading."""
    dtype: str = "float32"
    """Weight dtype to save: float32, bfloat16 or float16."""
    seed: int = 0
    """Seed for the randomly initialised parts (projector; everything with random_init)."""
    vision_feature_layer: int = -1
    """Vision hidden state fed to the projector (-1: last, after post-layernorm)."""

    def __post_init__(self) -> None:
        if self.preset is None and (self.lm is None or self.vision is None):
            raise ValueError("Give --preset NAME, or both --lm and --vision (hub id or local path).")
        if self.random_init and self.preset is None:
            raise ValueError("--random-init builds a preset's shapes: give --preset too.")
        if self.projector is not None and self.projector not in SUPPORTED_PROJECTOR_TYPES:
            raise ValueError(f"Unknown projector {self.projector!r}; choose one of {list(SUPPORTED_PROJECTOR_TYPES)}.")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"Unknown dtype {self.dtype!r}; choose float32, bfloat16 or float16.")
        if self.preset is not None:
            get_preset(self.preset)  # validates the name early


def cache_dir() -> Path:
    """Where generated fixtures live between runs (override with N2EYE_CACHE): the one cache root."""
    return cache_root()


def uses_image_policy(vision_model_type: str, projector: str) -> bool:
    """Whether a build gets LFM2-VL's image policy (native resolution, tiles + thumbnail): the LFM2-VL layout,
    a SigLIP2 NaFlex encoder with the pixel-unshuffle projector (both LFM2-VL presets). Others keep their image
    processor's own resizing."""
    return vision_model_type == "siglip2_vision_model" and projector == "pixel_unshuffle_mlp"


def add_special_tokens(tokenizer, image_markers: bool = False) -> list[str]:
    """Adds the N2-Eye special tokens the tokenizer lacks (with `image_markers`, also LFM2-VL's tile and
    thumbnail markers, which the image policy writes); returns the ones added."""
    vocab = tokenizer.get_vocab()
    wanted = [*REQUIRED_SPECIAL_TOKENS, *(image_marker_tokens() if image_markers else ())]
    missing = [t for t in wanted if t not in vocab]
    if missing:
        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], special_tokens=True)
    return missing


def check_source(name_or_path: str, flag: str, example: str) -> None:
    """A path-like source that doesn't exist gets a clear error instead of the hub's repo-id message."""
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(name_or_path)):
        raise ValueError(
            f"{flag} {name_or_path}: the folder {name_or_path} does not exist; give an existing local folder or a "
            f"hub id like {example}."
        )


def load_language_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """Loads an LFM2 causal LM and its tokenizer; rejects other architectures with the supported list."""
    check_source(name_or_path, "--lm", "LiquidAI/LFM2-1.2B")
    config = AutoConfig.from_pretrained(name_or_path)
    if config.model_type not in SUPPORTED_TEXT_MODEL_TYPES:
        raise ValueError(
            f"{name_or_path} is a {config.model_type!r} model; N2-Eye's language model must be one of "
            f"{list(SUPPORTED_TEXT_MODEL_TYPES)} (e.g. LiquidAI/LFM2-350M, LiquidAI/LFM2-1.2B)."
        )
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    return model, tokenizer


def vision_config_of(config) -> object:
    """The vision-tower config of a SigLIP/SigLIP2 checkpoint (full dual-encoder or vision-only)."""
    if config.model_type in _VISION_CONTAINER_TYPES:
        return config.vision_config
    if config.model_type in SUPPORTED_VISION_MODEL_TYPES:
        return config
    raise ValueError(
        f"Unsupported vision encoder type {config.model_type!r}; N2-Eye supports SigLIP and SigLIP2 checkpoints "
        f"(model types {sorted(_VISION_CONTAINER_TYPES)} or {list(SUPPORTED_VISION_MODEL_TYPES)}), e.g. "
        "google/siglip2-so400m-patch14-384."
    )


def load_vision_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """Loads the vision tower (from a full SigLIP checkpoint or a vision-only one) and its image processor."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    check_source(name_or_path, "--vision", "google/siglip2-so400m-patch14-384")
    # Only the vision tower is built and loaded; a dual encoder's text half is skipped, so its warnings (the
    # "unexpected keys" report, SigLIP text-config token ids) are expected and silenced.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        vision_config = vision_config_of(AutoConfig.from_pretrained(name_or_path))
        vision = AutoModel.from_pretrained(name_or_path, config=vision_config, dtype=dtype)
    finally:
        hf_logging.set_verbosity(verbosity)
    if not isinstance(vision, PreTrainedModel) or vision.config.model_type != vision_config.model_type:
        raise ValueError(f"Could not find a vision tower in {name_or_path} ({type(vision).__name__}).")
    image_processor = AutoImageProcessor.from_pretrained(name_or_path)
    return vision, image_processor


def image_policy_settings(config: N2EyeConfig) -> dict | None:
    """The processor's `image_policy` for this model (transformers' Lfm2Vl defaults at the model's patch size and
    merge factor), or None when the build does not use the policy."""
    if not uses_image_policy(config.vision_config.model_type, config.projector_type):
        return None
    merge = config.vision_config.patch_size * config.projector_factor
    tile = 512 if 512 % merge == 0 else max(merge, round(512 / merge) * merge)  # LFM2-VL's 512 px tiles
    return default_settings(
        encoder_patch_size=config.vision_config.patch_size, downsample_factor=config.projector_factor, tile_size=tile
    )


def make_processor(tokenizer, image_processor, config: N2EyeConfig) -> N2EyeProcessor:
    from .checkpoint import modeling_source_dir

    tokenizer.chat_template = (modeling_source_dir() / "chat_template.jinja").read_text()
    tokenizer.padding_side = "left"  # batched generation; the training collator pads on its own
    tokenizer.init_kwargs["padding_side"] = "left"  # saved into tokenizer_config.json
    return N2EyeProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        patch_size=config.vision_config.patch_size,
        downsample_factor=config.projector_factor,
        image_policy=image_policy_settings(config),
    )


def make_config(
    text_config,
    vision_config,
    tokenizer,
    projector: str,
    vision_feature_layer: int = -1,
    projector_hidden_size: int | None = None,
    vision_layers: int | None = None,
) -> N2EyeConfig:
    """projector_hidden_size: the projector MLP's width (None: the LM hidden size); vision_layers: keep only the
    vision tower's first N encoder layers (None: all)."""
    text_config.bos_token_id = tokenizer.bos_token_id
    text_config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    text_config.pad_token_id = tokenizer.pad_token_id
    vision_dict = vision_config.to_dict()
    if vision_layers is not None:
        if not 1 <= vision_layers <= vision_dict["num_hidden_layers"]:
            raise ValueError(
                f"vision_layers={vision_layers}: the vision encoder has {vision_dict['num_hidden_layers']} layers."
            )
        vision_dict["num_hidden_layers"] = vision_layers
    return N2EyeConfig(
        text_config=text_config.to_dict(),
        vision_config=vision_dict,
        projector_type=projector,
        projector_hidden_size=projector_hidden_size,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=vision_feature_layer,
        tie_word_embeddings=True,
    )


_VISION_LAYER_KEY = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


def assemble(
    lm,
    tokenizer,
    vision,
    image_processor,
    projector: str = "mlp",
    vision_feature_layer: int = -1,
    seed: int = 0,
    projector_hidden_size: int | None = None,
    vision_layers: int | None = None,
):
    """Builds an N2-Eye from loaded backbones: adds tokens, copies weights, resizes tied embeddings."""
    add_special_tokens(tokenizer, image_markers=uses_image_policy(vision.config.model_type, projector))
    config = make_config(
        lm.config, vision.config, tokenizer, projector, vision_feature_layer, projector_hidden_size, vision_layers
    )
    torch.manual_seed(seed)
    model = N2EyeForConditionalGeneration(config).to(lm.dtype)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    n_layers = config.vision_config.num_hidden_layers
    vision_state = {
        k: v
        for k, v in vision.state_dict().items()
        if not k.startswith("head.")
        and not ((m := _VISION_LAYER_KEY.search(k)) and int(m.group(1)) >= n_layers)  # layers dropped by the preset
    }
    model.model.vision_tower.load_state_dict(vision_state)
    if config.freeze_vision:
        model.model.vision_tower.requires_grad_(False)
    if len(tokenizer) > config.text_config.vocab_size:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    model.tie_weights()
    model.eval()
    return model, make_processor(tokenizer, image_processor, config)


def build_random(preset_name: str, seed: int = 0):
    """The preset's exact shapes with random weights, from bundled configs (no download)."""
    from .fixtures import train_tiny_tokenizer

    preset = get_preset(preset_name)
    if preset.lm_config is None:  # the tiny presets are random-init by construction
        return build_from_sources(*_tiny_sources(preset.projector == "pixel_unshuffle_mlp"), projector=preset.projector,
                                  seed=seed, projector_hidden_size=preset.projector_hidden_size)  # fmt: skip
    text_config = AutoConfig.for_model(**load_bundled_json(preset.lm_config))
    vision_config = AutoConfig.for_model(**load_bundled_json(preset.vision_config))
    processor_config = load_bundled_json(preset.image_processor_config)
    image_processor_class = _IMAGE_PROCESSORS[processor_config.get("image_processor_type", "SiglipImageProcessor")]
    image_processor = image_processor_class(**_without_type(processor_config))
    tokenizer = train_tiny_tokenizer(cache_dir() / "tokenizer")
    add_special_tokens(tokenizer, image_markers=uses_image_policy(vision_config.model_type, preset.projector))
    config = make_config(
        text_config,
        vision_config,
        tokenizer,
        preset.projector,
        projector_hidden_size=preset.projector_hidden_size,
        vision_layers=preset.vision_layers,
    )
    torch.manual_seed(seed)
    model = N2EyeForConditionalGeneration(config).eval()
    return model, make_processor(tokenizer, image_processor, config)


def _without_type(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("image_processor_type", "processor_class")}


def _tiny_sources(naflex: bool = False) -> tuple[str, str]:
    from .fixtures import make_tiny_backbones

    paths = make_tiny_backbones(cache_dir() / "tiny-backbones")
    return str(paths["lm"]), str(paths["naflex_vision" if naflex else "vision"])


def siglip2_image_processor_class():
    """SigLIP2's image processor class: the Pillow one where torchvision is missing (LFM2-VL's image policy makes
    the crops with Pillow anyway)."""
    from transformers.utils.import_utils import is_torchvision_available

    if is_torchvision_available():
        return Siglip2ImageProcessor
    from transformers import Siglip2ImageProcessorPil

    return Siglip2ImageProcessorPil


def build_from_sources(
    lm: str,
    vision: str,
    projector: str = "mlp",
    vision_feature_layer: int = -1,
    seed: int = 0,
    projector_hidden_size: int | None = None,
    vision_layers: int | None = None,
):
    """Loads both backbones with `from_pretrained` (hub id or local folder) and assembles them."""
    lm_model, tokenizer = load_language_model(lm)
    vision_model, image_processor = load_vision_model(vision)
    return assemble(
        lm_model, tokenizer, vision_model, image_processor, projector, vision_feature_layer, seed,
        projector_hidden_size, vision_layers,
    )  # fmt: skip


def build(cfg: BuildConfig) -> Path:
    """`n2eye build`: assemble and save a complete checkpoint folder; returns its path."""
    check_writable(cfg.out)
    preset = get_preset(cfg.preset) if cfg.preset else None
    projector = cfg.projector or (preset.projector if preset else "mlp")
    if cfg.random_init:
        sources = {"lm": preset.lm, "vision": preset.vision, "random_init": True}  # shapes only
        model, processor = build_random(cfg.preset, seed=cfg.seed)
        if projector != preset.projector:
            raise ValueError("--projector can't change a --random-init preset; build from --lm/--vision instead.")
    else:
        if preset is not None and preset.lm is None:
            lm, vision = _tiny_sources(preset.projector == "pixel_unshuffle_mlp")
        else:
            lm = cfg.lm or preset.lm
            vision = cfg.vision or preset.vision
        sources = {"lm": lm, "vision": vision, "random_init": False}  # what the weights came from (model card)
        # The preset's projector width holds for its projector, its vision depth for its own vision encoder.
        same_projector = preset is not None and projector == preset.projector
        same_vision = preset is not None and cfg.vision is None
        model, processor = build_from_sources(
            lm, vision, projector, cfg.vision_feature_layer, cfg.seed,
            projector_hidden_size=preset.projector_hidden_size if same_projector else None,
            vision_layers=preset.vision_layers if same_vision else None,
        )  # fmt: skip
    model.to(getattr(torch, cfg.dtype))
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    check_writable(cfg.out, need_bytes=n_bytes)
    summary = {"build": dataclasses.asdict(cfg), "sources": sources, "parameters": count_parameters(model)}
    generation_config = default_generation_config(processor.tokenizer)
    return save_checkpoint(model, processor, cfg.out, generation_config, extra_json={"n2eye_build.json": summary})


def count_parameters(model) -> dict[str, int]:
    """Parameters per part (tied embeddings counted once)."""
    parts = {
        "language_model": model.model.language_model,
        "vision_tower": model.model.vision_tower,
        "projector": model.model.multi_modal_projector,
    }
    counts = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def build_and_report(cfg: BuildConfig) -> Path:
    """`n2eye build`: build, then print what was built."""
    import json

    out = build(cfg)
    config = N2EyeConfig.from_pretrained(out)
    text, vision = config.text_config, config.vision_config
    print(f"Built N2-Eye checkpoint in {out}")
    print(f"  language model: {text.model_type} hidden {text.hidden_size} x {text.num_hidden_layers} layers, vocab {text.vocab_size}")
    size = f"{vision.image_size}px" if hasattr(vision, "image_size") else "NaFlex (native resolution)"
    print(
        f"  vision: {vision.model_type} {size} patch {vision.patch_size}, {vision.num_hidden_layers} layers; "
        f"projector {config.projector_type} (hidden {config.projector_hidden_size})"
    )
    summary = json.loads((out / "n2eye_build.json").read_text())
    print("  parameters: " + ", ".join(f"{k} {v:,}" for k, v in summary["parameters"].items()))
    return out
