"""The engine's image cache: vision-tower grids kept in memory by crop content (bounded LRU), so a picture sent
again (the next turn of a chat, the same photo from another client) is never encoded twice.

Keys are `VisionInputs.keys`: what the encoder sees, so a NaFlex image asked for with other settings (a lower
`max_image_tokens`, no splitting) gets new crops and new keys, never another setting's features. Grids equal what
the model computes from the pixels itself (`encode_images` runs NaFlex crops without padding), so answers with the
cache are the answers without it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from ..vision_inputs import VisionInputs


class VisionGridCache:
    """Bounded LRU of vision-tower grids, one per crop, keyed by the crop's content."""

    def __init__(self, model, max_items: int = 64):
        self.model = model
        self.max_items = max_items
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.encoded = 0  # crops that actually went through the vision tower

    def grids(self, crops: VisionInputs | torch.Tensor) -> list[torch.Tensor]:
        """One grid per crop, in order: the cached ones reused, the others encoded (in one call) and kept."""
        crops = VisionInputs.of(crops)
        if crops is None:
            return []
        keys = crops.keys()
        first: dict[str, int] = {}  # each new key once, at its first crop (an image sent twice is encoded once)
        for i, key in enumerate(keys):
            if key not in self.items:
                first.setdefault(key, i)
        missing = list(first.values())
        if missing:
            with torch.no_grad():
                computed = self.model.model.encode_images(**crops.select(missing).model_kwargs(self.model.device))
            self.encoded += len(missing)
            for i, grid in zip(missing, computed):
                self.items[keys[i]] = grid
        out = [self.items[key] for key in keys]
        for key in keys:
            self.items.move_to_end(key)
        while len(self.items) > self.max_items:
            self.items.popitem(last=False)
        return out


__all__ = ["VisionGridCache"]
