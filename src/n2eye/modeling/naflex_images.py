"""LFM2-VL's image policy as SigLIP2 NaFlex inputs: images -> crops -> `pixel_values`, `pixel_attention_mask`,
`spatial_shapes`, as transformers' `Lfm2VlImageProcessor` returns them.

Why a module of its own: the processor ships inside checkpoints and cannot use the reference (it needs
torchvision). `image_policy` decides the crops and makes them with Pillow; this turns them into the reference's
tensors with the same keys, layout, dtypes and float operations: rescale and normalise fused as its torchvision
backend does (`(x - mean / rescale) / (std / rescale)` in float32), each crop cut into encoder patches flattened in
(patch row, patch col) order with (y, x, channel) inside a patch (its `convert_image_to_patches`), zero-padded to
`max_num_patches` with an int32 1/0 mask; crops are image by image, tiles row-major, then the thumbnail.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from .image_policy import ImageLayout, ImagePolicy, UnsupportedImageSize, image_layout, resize_and_split

# What the processor config keeps under `image_policy` (and a call may override): the policy's settings plus
# `max_num_patches`, the length every crop is padded to (None: the reference's, derived from the policy).
POLICY_SETTINGS: tuple[str, ...] = (*(f.name for f in dataclasses.fields(ImagePolicy)), "max_num_patches")


def default_settings(**changes: Any) -> dict[str, Any]:
    """The settings dict a processor config stores: transformers' Lfm2Vl defaults with `changes` (validated)."""
    policy, _ = resolve_settings(changes)
    return {**policy.to_dict(), "max_num_patches": changes.get("max_num_patches")}


def resolve_settings(
    settings: Mapping[str, Any], overrides: Mapping[str, Any] | None = None
) -> tuple[ImagePolicy, int]:
    """(policy, pad length) from stored settings and per-call overrides; a bad combination raises a ValueError
    that names the setting (min_image_tokens > max_image_tokens, a tile size that is not whole merged patches, ...)."""
    merged = {**settings, **(overrides or {})}
    pad = merged.pop("max_num_patches", None)
    policy = ImagePolicy.from_dict(merged)
    if pad is None:
        return policy, policy.max_num_patches
    if isinstance(pad, bool) or not isinstance(pad, int) or pad < policy.max_num_patches:
        raise ValueError(
            f"max_num_patches={pad!r}: every crop is padded to this many encoder patches, and under these settings "
            f"a crop can have up to {policy.max_num_patches} (max(max_image_tokens x downsample_factor**2, "
            "(tile_size / encoder_patch_size)**2)). Raise it, or leave it unset to use that."
        )
    return policy, pad


@dataclass(frozen=True)
class Normalization:
    """Rescale / normalise settings, from the image processor (`preprocessor_config.json`) unless a call overrides."""

    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: float | tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: float | tuple[float, ...] = (0.5, 0.5, 0.5)

    @classmethod
    def of(cls, image_processor: Any, overrides: Mapping[str, Any] | None = None) -> Normalization:
        """The image processor's settings, each replaced by `overrides[name]` when given."""
        overrides = overrides or {}
        values = {}
        for field in dataclasses.fields(cls):
            value = overrides.get(field.name, getattr(image_processor, field.name, None))
            if value is None:
                value = field.default
            values[field.name] = tuple(value) if isinstance(value, (list, tuple)) else value
        return cls(**values)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (channels, h, w) -> float32, with the reference's operations (fused when both are on)."""
        values = pixels.to(torch.float32)
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, dtype=torch.float32)
            std = torch.tensor(self.image_std, dtype=torch.float32)
            if self.do_rescale:
                mean, std = mean * (1.0 / self.rescale_factor), std * (1.0 / self.rescale_factor)
            shape = (-1, 1, 1) if mean.dim() else ()
            return values.sub(mean.reshape(shape)).div(std.reshape(shape))
        return values * self.rescale_factor if self.do_rescale else values


def crop_patches(crop: Image.Image, patch_size: int, normalization: Normalization) -> torch.Tensor:
    """(patch rows * patch cols, patch_size * patch_size * 3) for one RGB crop whose sides are whole patches."""
    pixels = torch.from_numpy(np.array(crop, dtype=np.uint8)).permute(2, 0, 1)
    values = normalization(pixels)
    channels, height, width = values.shape
    rows, cols = height // patch_size, width // patch_size
    patches = values.reshape(channels, rows, patch_size, cols, patch_size).permute(1, 3, 2, 4, 0)
    return patches.reshape(rows * cols, -1)


def naflex_inputs(
    images: Sequence[Image.Image], policy: ImagePolicy, max_num_patches: int, normalization: Normalization
) -> tuple[dict[str, torch.Tensor], list[ImageLayout]]:
    """The NaFlex tensors for `images` (all their crops, in order) and each image's layout (its text expansion).
    An image the policy cannot take raises `UnsupportedImageSize` naming which image it is."""
    from .image_io import to_rgb

    layouts, crops = [], []
    for index, image in enumerate(images):
        image = image if image.mode == "RGB" else to_rgb(image)  # first: EXIF orientation may swap the sides
        try:
            layout = image_layout(image.width, image.height, policy)
        except UnsupportedImageSize as err:
            raise UnsupportedImageSize(f"Image {index + 1} of {len(images)}: {err}") from None
        pictures = resize_and_split(image, policy)
        if [p.size for p in pictures] != [(c.width, c.height) for c in layout.crops]:  # a bug, never user input
            raise RuntimeError(f"Crops {[p.size for p in pictures]} do not match the layout {layout}.")
        crops.extend(crop_patches(p, policy.encoder_patch_size, normalization) for p in pictures)
        layouts.append(layout)
    width = 3 * policy.encoder_patch_size**2
    pixel_values = torch.zeros(len(crops), max_num_patches, width, dtype=torch.float32)
    mask = torch.zeros(len(crops), max_num_patches, dtype=torch.int32)
    for i, patches in enumerate(crops):
        pixel_values[i, : len(patches)] = patches
        mask[i, : len(patches)] = 1
    shapes = [shape for layout in layouts for shape in layout.spatial_shapes]
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).reshape(len(shapes), 2)
    return {"pixel_values": pixel_values, "pixel_attention_mask": mask, "spatial_shapes": spatial_shapes}, layouts


__all__ = ["POLICY_SETTINGS", "Normalization", "crop_patches", "default_settings", "naflex_inputs", "resolve_settings"]
