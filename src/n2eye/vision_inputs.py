"""The image part of a processor output as a sequence of crops: what every consumer moves between the processor and
the vision tower (training examples, both collators, the feature cache, the engine's image cache).

Why one class: a fixed-resolution encoder gives one crop per image, or 5 with Idefics2-style splitting (the
quadrants row-major, then the whole image), all as `pixel_values` (n, 3, H, W); SigLIP2 NaFlex gives one or more
per image (LFM2-VL's tiles, row-major, then the thumbnail) under transformers' own keys: `pixel_values`
(n, patches, 3*p*p), `pixel_attention_mask` (n, patches), `spatial_shapes` (n, 2). Selecting crops,
joining crops of different sizes (padding to a common patch count), keying them and handing them to the model are
then one set of operations, written once, and crops always stay in conversation order.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

KEYS = ("pixel_values", "pixel_attention_mask", "spatial_shapes")


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    """The tensor's bytes whatever its dtype (numpy has no bfloat16)."""
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


@dataclass(frozen=True)
class VisionInputs:
    """Crops for the vision tower, in order. NaFlex crops carry `spatial_shapes` and `pixel_attention_mask`; their
    patches are the first h*w rows of `pixel_values[i]`, the rest is padding."""

    pixel_values: torch.Tensor
    spatial_shapes: torch.Tensor | None = None
    pixel_attention_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if (self.spatial_shapes is None) != (self.pixel_attention_mask is None):
            raise ValueError("NaFlex crops need both spatial_shapes and pixel_attention_mask (the processor's output).")
        if self.naflex and not len(self.pixel_values) == len(self.spatial_shapes) == len(self.pixel_attention_mask):
            raise ValueError(
                f"{len(self.pixel_values)} crops of pixel_values but {len(self.spatial_shapes)} spatial_shapes and "
                f"{len(self.pixel_attention_mask)} attention masks."
            )

    # ---- from and to dicts ---------------------------------------------------------------------------------------
    @classmethod
    def of(cls, value: VisionInputs | torch.Tensor | Mapping[str, Any] | None) -> VisionInputs | None:
        """Crops from a processor output / example / batch (its `KEYS`), a fixed-resolution pixel tensor, or crops;
        None when there is no image (no `pixel_values`, or zero crops)."""
        if value is None or isinstance(value, VisionInputs):
            crops = value
        elif isinstance(value, torch.Tensor):
            crops = cls(value)
        else:
            pixels = value.get("pixel_values")
            if pixels is None:
                return None
            shapes, mask = value.get("spatial_shapes"), value.get("pixel_attention_mask")
            crops = cls(torch.as_tensor(pixels), None if shapes is None else torch.as_tensor(shapes),
                        None if mask is None else torch.as_tensor(mask))  # fmt: skip
        return crops if crops is not None and len(crops) else None

    @classmethod
    def pop_from(cls, mapping: MutableMapping[str, Any]) -> VisionInputs | None:
        """Like `of`, removing the image keys from `mapping` (e.g. before swapping them for cached features)."""
        crops = cls.of(mapping)
        for key in KEYS:
            mapping.pop(key, None)
        return crops

    def put_into(self, mapping: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        """Writes the crops under transformers' keys (NaFlex's two extra keys only for NaFlex crops)."""
        mapping["pixel_values"] = self.pixel_values
        if self.naflex:
            mapping["spatial_shapes"] = self.spatial_shapes
            mapping["pixel_attention_mask"] = self.pixel_attention_mask
        return mapping

    def model_kwargs(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """The keyword arguments of `encode_images` / `get_image_features` / the model's forward."""
        kwargs = dict(self.put_into({}))
        return {k: v.to(device) for k, v in kwargs.items()} if device is not None else kwargs

    # ---- shape -----------------------------------------------------------------------------------------------------
    @property
    def naflex(self) -> bool:
        return self.spatial_shapes is not None

    def __len__(self) -> int:
        return len(self.pixel_values)

    def patch_counts(self) -> list[int]:
        """Each NaFlex crop's real patches (h * w of its spatial shape)."""
        if not self.naflex:
            raise ValueError("Fixed-resolution crops have no per-crop patch count.")
        return [int(h) * int(w) for h, w in self.spatial_shapes.tolist()]

    # ---- selecting and joining -----------------------------------------------------------------------------------
    def select(self, indices: Sequence[int]) -> VisionInputs:
        """These crops, in this order; NaFlex padding trimmed to the longest of them."""
        index = torch.as_tensor(list(indices), dtype=torch.long)
        if not self.naflex:
            return VisionInputs(self.pixel_values[index])
        picked = VisionInputs(self.pixel_values[index], self.spatial_shapes[index], self.pixel_attention_mask[index])
        return picked.compact()

    def compact(self) -> VisionInputs:
        """NaFlex crops padded only to their longest crop (the processor pads to `max_num_patches`): less memory per
        kept example. The features do not change: the encoder runs each crop without padding (`encode_images`)."""
        if not self.naflex or not len(self):
            return self
        longest = max(self.patch_counts())
        return VisionInputs(self.pixel_values[:, :longest].contiguous(), self.spatial_shapes,
                            self.pixel_attention_mask[:, :longest].contiguous())  # fmt: skip

    @classmethod
    def concat(cls, parts: Iterable[VisionInputs | None]) -> VisionInputs | None:
        """The crops of `parts` one after the other (None and empty parts skipped); NaFlex crops padded to the
        longest part. Fixed-resolution and NaFlex crops never mix (one model has one encoder)."""
        parts = [p for p in parts if p is not None and len(p)]
        if not parts:
            return None
        if len({p.naflex for p in parts}) > 1:
            raise ValueError("Cannot batch fixed-resolution and NaFlex crops together: they come from two encoders.")
        if not parts[0].naflex:
            return cls(torch.cat([p.pixel_values for p in parts], dim=0))
        longest = max(p.pixel_values.shape[1] for p in parts)
        pixels = [torch.nn.functional.pad(p.pixel_values, (0, 0, 0, longest - p.pixel_values.shape[1])) for p in parts]
        masks = [torch.nn.functional.pad(p.pixel_attention_mask, (0, longest - p.pixel_attention_mask.shape[1]))
                 for p in parts]  # fmt: skip
        return cls(torch.cat(pixels), torch.cat([p.spatial_shapes for p in parts]), torch.cat(masks))

    @classmethod
    def gather(cls, items: Iterable[Mapping[str, Any]]) -> VisionInputs | None:
        """All crops of several examples, in example order (a batch's images)."""
        return cls.concat(cls.of(item) for item in items)

    # ---- identity --------------------------------------------------------------------------------------------------
    def keys(self) -> list[str]:
        """One content key per crop: the sha256 of what the encoder sees. A fixed-resolution crop: its pixels. A
        NaFlex crop: its spatial shape and its real patches (never the padding), so the key changes with the image
        and with every setting that changes the crop (token budget, splitting, tile size, thumbnail, resampling,
        normalisation), and equal crops share a key whatever `max_num_patches` padded them to."""
        if not self.naflex:
            return [hashlib.sha256(_raw_bytes(p)).hexdigest() for p in self.pixel_values]
        keys = []
        for pixels, (h, w) in zip(self.pixel_values, self.spatial_shapes.tolist()):
            digest = hashlib.sha256(f"naflex {h}x{w} {pixels.dtype}\n".encode())
            digest.update(_raw_bytes(pixels[: h * w]))
            keys.append(digest.hexdigest())
        return keys


__all__ = ["KEYS", "VisionInputs"]
