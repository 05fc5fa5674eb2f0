"""`--min-image-tokens`, `--max-image-tokens`, `--no-image-splitting`: LFM2-VL's image budget for one run.

Why a mixin: train, eval, generate, chat and serve take the same three options with the same meaning (flags and
YAML alike, through `cli_args`); each config dataclass inherits them from here instead of declaring them five
times. Unset options keep the checkpoint's `image_policy` (processor_config.json); set ones go to the processor as
per-call overrides (`processor(..., max_image_tokens=64)`), so the checkpoint itself is never changed.
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
    """--no-image-splitting: never split large images into 512 px tiles + a thumbnail; resize them into
    --max-image-tokens instead (LFM2-VL image policy; default: the checkpoint's, splitting on)."""

    def image_settings(self) -> dict[str, Any]:
        """The processor call options these flags set (unset ones left out)."""
        values = {"min_image_tokens": self.min_image_tokens, "max_image_tokens": self.max_image_tokens,
                  "do_image_splitting": self.image_splitting}  # fmt: skip
        return {k: v for k, v in values.items() if v is not None}


def checked_image_settings(processor: Any, settings: Mapping[str, Any] | None) -> dict[str, Any]:
    """`settings` (unset ones dropped) once the processor accepts them: a ValueError naming the setting otherwise
    (min above max, a wrong type, or a processor without LFM2-VL's image policy, e.g. a fixed-resolution encoder)."""
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


__all__ = ["IMAGE_SETTINGS", "ImageOptions", "checked_image_settings", "effective_policy"]
