"""Frozen-vision feature cache: each image goes through the vision tower once, ever.

With the vision tower frozen its output for an image never changes, so the grids (pre-projector, so the
projector still trains) are stored on disk keyed by a hash of the preprocessed pixels and of the encoder,
and reused across epochs and runs. Writes are atomic; a changed encoder gets a fresh namespace.

The grids are computed the way the run's training forward would compute them: on the run's device and, for a
bf16 run, under bf16 autocast (its own namespace, so a float32 run never reuses bf16 grids). Filling the cache
therefore costs what one epoch's vision forwards cost without it, not more (on a CPU, float32 took 2.5x as long
as bf16 autocast at the so400m shapes), and on a GPU host it runs on the GPU, not on the CPU the model was
loaded on.
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

    def __init__(self, model, cache_dir: str | os.PathLike, batch_size: int = 16, bf16: bool = False,
                 device: str | torch.device | None = None):  # fmt: skip
        self.model = model
        self.bf16 = bf16
        self.dir = Path(cache_dir) / (encoder_fingerprint(model) + ("-bf16" if bf16 else ""))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.batch_size = batch_size
        if device is not None:  # the trainer moves the rest of the model there later
            model.model.vision_tower.to(device)
        self.hits = 0
        self.misses = 0

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.safetensors"

    def grids(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """One grid per image: read from disk, computed and stored first where new."""
        return self.load(self.fill(pixel_values))

    def fill(self, pixel_values: torch.Tensor) -> list[str]:
        """Computes and stores the grids of the images not on disk yet (counted as hits / misses); returns every
        image's key for `load`."""
        keys = [pixel_key(p) for p in pixel_values]
        missing = [i for i, k in enumerate(keys) if not self._path(k).exists()]
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            computed = self._encode(pixel_values[chunk])
            for index, grid in zip(chunk, computed):
                path = self._path(keys[index])
                tmp = path.with_suffix(f".tmp-{os.getpid()}")
                save_file({"grid": grid.contiguous().cpu()}, str(tmp))
                os.replace(tmp, path)
        return keys

    @staticmethod
    def keys(pixel_values: torch.Tensor) -> list[str]:
        """The cache keys of these images (their preprocessed pixels)."""
        return [pixel_key(p) for p in pixel_values]

    def load(self, keys: list[str]) -> list[torch.Tensor]:
        return [load_file(str(self._path(k)))["grid"] for k in keys]

    def _encode(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """The tower's grids for new images, on the tower's device, in the run's precision, stored in the
        tower's dtype (what the projector takes outside autocast too)."""
        tower = self.model.model.vision_tower
        device = next(tower.parameters()).device
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            grids = self.model.model.encode_images(pixels.to(device))
        return [g.to(tower.dtype) for g in grids]
