"""`--min-image-tokens`, `--max-image-tokens`, `--[no-]image-splitting`: the image budget for one run.

Why a mixin: train, eval, generate, chat and serve take the same three options with the same meaning (flags and
YAML alike, through `cli_args`); each config dataclass inherits them from here instead of declaring them five
times. Unset options keep the checkpoint's settings (processor_config.json: LFM2-VL's `image_policy` for SigLIP2
NaFlex, `image_splitting` for fixed-resolution encoders); set ones go to the processor as per-call overrides
(`processor(..., max_image_tokens=64)`), so the checkpoint itself is never changed. Fixed-resolution encoders take
only the splitting option (Idefics2-style: 4 crops + the whole image); the token budgets are refused there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The processor call options these flags set (transformers' Lfm2VlImageProcessor names).
IMAGE_SETTINGS = ("min_image_tokens", "max_image_tokens", "do_image_splitting")


@dataclass(kw_only=True)
class ImageOptions:
    """The image options shared by every command that runs a model on images."""

    min_image_tokens: int | None = None
    """Fewest tokens per image (LFM2-VL image policy; default: the checkpoint's, 64). Small images are upscaled."""
    max_image_tokens: int | None = None
    """Most tokens per image or tile (LFM2-VL image policy; default: the checkpoint's, 256). Lower is faster."""
    image_splitting: bool | None = None
    """SigLIP2 NaFlex: --no-image-splitting turns tiles off (large images are resized into --max-image-tokens, not
    split into 512 px tiles + a thumbnail; default: the checkpoint's, on). Fixed-resolution encoders (SigLIP at
    e.g. 384 px): --image-splitting turns Idefics2-style splitting on (4 quadrant crops + the whole image, 5x the
    tokens, for images larger than the encoder's size; default: the checkpoint's, off)."""

    def image_settings(self) -> dict[str, Any]:
        """The processor call options these flags set (unset ones left out)."""
        values = {"min_image_tokens": self.min_image_tokens, "max_image_tokens": self.max_image_tokens,
                  "do_image_splitting": self.image_splitting}  # fmt: skip
        return {k: v for k, v in values.items() if v is not None}


def checked_image_settings(processor: Any, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """`settings` (unset ones dropped) once the processor accepts them: a ValueError naming the setting otherwise
    (min above max, a wrong type, or a token budget for a processor without LFM2-VL's image policy, e.g. a
    fixed-resolution encoder, which takes `do_image_splitting` only)."""
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    check = getattr(processor, "policy_for_call", None)
    if settings and check is not None:
        check(dict(settings))  # pops what it reads from its argument: a copy
    return settings


def effective_policy(processor: Any, settings: Mapping[str, Any] | None = None):
    """The `ImagePolicy` the processor applies with `settings`, or None when it has no image policy."""
    check = getattr(processor, "policy_for_call", None)
    if check is None or getattr(processor, "image_policy", None) is None:
        return None
    return check(dict(checked_image_settings(processor, settings)))[0]


def fixed_resolution_splitting(processor: Any, settings: Mapping[str, Any] | None = None) -> bool | None:
    """Whether a fixed-resolution processor splits images (Idefics2-style) with `settings`; None for a processor
    that cannot (a NaFlex one, whose splitting is its policy's, or a checkpoint's older code without the option)."""
    splits = getattr(processor, "splits_images", None)
    if splits is None or getattr(processor, "image_policy", None) is not None or not processor.fixed_resolution:
        return None
    return splits(checked_image_settings(processor, settings).get("do_image_splitting"))


__all__ = ["IMAGE_SETTINGS", "ImageOptions", "checked_image_settings", "effective_policy", "fixed_resolution_splitting"]
