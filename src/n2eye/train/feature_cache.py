"""Frozen-vision feature cache: each image goes through the vision tower once, ever.

With the vision tower frozen its output for an image never changes, so the grids (pre-projector, so the
projector still trains) are stored on disk keyed by a hash of the preprocessed pixels and of the encoder,
and reused across epochs and runs. Writes are atomic; a changed encoder gets a fresh namespace.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def encoder_fingerprint(model) -> str:
    """Hash of the vision config, the feature layer and a sample of every vision weight (cheap, and changes when
    the weights do)."""
    base = model.model
    digest = hashlib.sha256()
    digest.update(json.dumps(base.config.vision_config.to_dict(), sort_keys=True, default=str).encode())
    digest.update(str(base.config.vision_feature_layer).encode())
    for name, tensor in sorted(base.vision_tower.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 256)][:256].float().cpu().numpy().tobytes()
        digest.update(name.encode() + sample)
    return digest.hexdigest()[:16]


def pixel_key(pixels: torch.Tensor) -> str:
    return hashlib.sha256(pixels.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


class VisionFeatureCache:
    """Disk cache of vision-tower grids for one encoder; `grids(pixel_values)` returns one tensor per image."""

    def __init__(self, model, cache_dir: str | os.PathLike, batch_size: int = 16):
        self.model = model
        self.dir = Path(cache_dir) / encoder_fingerprint(model)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.batch_size = batch_size
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def grids(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        keys = [pixel_key(p) for p in pixel_values]
        missing = [i for i, k in enumerate(keys) if not self._path(k).exists()]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            with torch.no_grad():
                computed = self.model.model.encode_images(pixel_values[chunk])
            for index, grid in zip(chunk, computed):
                path = self._path(keys[index])
                tmp = path.with_suffix(f".tmp-{os.getpid()}")
                save_file({"grid": grid.contiguous().cpu()}, str(tmp))
                os.replace(tmp, path)
        return [load_file(str(self._path(k)))["grid"] for k in keys]
