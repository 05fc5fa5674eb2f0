"""Named N2-Eye shapes: which backbones a preset uses and the bundled configs that build it without a download."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Preset:
    """A named model recipe.

    lm / vision: hub ids (or None for the locally generated tiny fixtures).
    lm_config / vision_config / image_processor_config: bundled JSON files in `n2eye/presets/` used by
    `--random-init` to build the same shapes with no network.
    projector_hidden_size: the projector MLP's hidden width (None: the LM hidden size).
    vision_layers: keep only the first N encoder layers of the vision tower (None: all of them); LFM2-VL-1.6B
    keeps 26 of so400m's 27 (its `vision_feature_layer: -2`), then the post-layernorm, as Lfm2Vl does.
    """

    name: str
    description: str
    lm: str | None
    vision: str | None
    projector: str = "mlp"
    lm_config: str | None = None
    vision_config: str | None = None
    image_processor_config: str | None = None
    projector_hidden_size: int | None = None
    vision_layers: int | None = None


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        description="random-init LFM2 (hidden 64, 4 layers) + SigLIP (64px, patch 8) + locally trained tokenizer; seconds on CPU",
        lm=None,
        vision=None,
        projector="mlp",
    ),
    "tiny-lfm2-vl": Preset(
        name="tiny-lfm2-vl",
        description="the tiny LFM2 + a random-init SigLIP2 NaFlex (patch 16, 2 layers) + pixel-unshuffle projector: "
        "the LFM2-VL shape (native resolution, 512 px tiles + thumbnail) in seconds on CPU",
        lm=None,
        vision=None,
        projector="pixel_unshuffle_mlp",
        projector_hidden_size=48,
    ),
    "n2eye-1.3b": Preset(
        name="n2eye-1.3b",
        description="LiquidAI/LFM2-1.2B + google/siglip2-so400m-patch14-384 + MLP projector (the N2-Eye card)",
        lm="LiquidAI/LFM2-1.2B",
        vision="google/siglip2-so400m-patch14-384",
        projector="mlp",
        lm_config="lfm2-1.2b.json",
        vision_config="siglip2-so400m-patch14-384.json",
        image_processor_config="siglip2-so400m-patch14-384.preprocessor.json",
    ),
    # The LFM2-VL shapes (transformers' Lfm2Vl layout): SigLIP2 NaFlex + pixel unshuffle (2x2), LayerNorm,
    # Linear(4*vision_hidden -> 2560) + bias, GELU, Linear(2560 -> LM hidden) + bias.
    "lfm2-vl-450m": Preset(
        name="lfm2-vl-450m",
        description="LiquidAI/LFM2-350M + google/siglip2-base-patch16-naflex + pixel-unshuffle projector "
        "(LFM2-VL-450M's shapes, 450,822,656 parameters)",
        lm="LiquidAI/LFM2-350M",
        vision="google/siglip2-base-patch16-naflex",
        projector="pixel_unshuffle_mlp",
        lm_config="lfm2-350m.json",
        vision_config="siglip2-base-patch16-naflex.json",
        image_processor_config="siglip2-base-patch16-naflex.preprocessor.json",
        projector_hidden_size=2560,
    ),
    "lfm2-vl-1.6b": Preset(
        name="lfm2-vl-1.6b",
        description="LiquidAI/LFM2-1.2B + google/siglip2-so400m-patch16-naflex (first 26 of 27 layers) + "
        "pixel-unshuffle projector (LFM2-VL-1.6B's shapes, 1,584,804,000 parameters)",
        lm="LiquidAI/LFM2-1.2B",
        vision="google/siglip2-so400m-patch16-naflex",
        projector="pixel_unshuffle_mlp",
        lm_config="lfm2-1.2b.json",
        vision_config="siglip2-so400m-patch16-naflex.json",
        image_processor_config="siglip2-so400m-patch16-naflex.preprocessor.json",
        projector_hidden_size=2560,
        vision_layers=26,
    ),
}


def get_preset(name: str) -> Preset:
    """Returns the preset or raises with the list of known ones."""
    if name not in PRESETS:
        known = ", ".join(f"{p.name} ({p.description})" for p in PRESETS.values())
        raise ValueError(f"Unknown preset {name!r}. Known presets: {known}.")
    return PRESETS[name]


def load_bundled_json(filename: str) -> dict:
    """Reads a config shipped in the package (no network)."""
    return json.loads(resources.files("n2eye").joinpath("presets", filename).read_text())
