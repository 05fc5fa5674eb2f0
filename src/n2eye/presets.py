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
    """

    name: str
    description: str
    lm: str | None
    vision: str | None
    projector: str = "mlp"
    lm_config: str | None = None
    vision_config: str | None = None
    image_processor_config: str | None = None


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        description="random-init LFM2 (hidden 64, 4 layers) + SigLIP (64px, patch 8) + locally trained tokenizer; seconds on CPU",
        lm=None,
        vision=None,
        projector="mlp",
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
