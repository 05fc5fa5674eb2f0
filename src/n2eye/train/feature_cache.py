"""Frozen-vision feature cache: each image goes through the vision tower once, ever.

With the vision tower frozen its output for an image never changes, so the grids (pre-projector, so the
projector still trains) are stored on disk, one per crop, keyed by a hash of what the encoder sees
(`VisionInputs.keys`: a fixed-resolution image's pixels; a NaFlex crop's spatial shape and real patches, which
change with the image and with every setting that changes its crops: token budget, splitting, tile size,
thumbnail), and reused across epochs and runs. Writes are atomic; a changed encoder gets a fresh namespace.
NaFlex crops are encoded without padding (`encode_images`), so a cached grid is exactly what a training forward
without the cache computes, however the crops were batched.

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

from ..vision_inputs import VisionInputs


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


Crops = VisionInputs | torch.Tensor  # crops, or a fixed-resolution pixel_values tensor


class VisionFeatureCache:
    """Disk cache of vision-tower grids for one encoder; `grids(crops)` returns one tensor per crop."""

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

    def grids(self, crops: Crops) -> list[torch.Tensor]:
        """One grid per crop: read from disk, computed and stored first where new."""
        return self.load(self.fill(crops))

    def fill(self, crops: Crops) -> list[str]:
        """Computes and stores the grids of the crops not on disk yet (counted as hits / misses); returns every
        crop's key for `load`."""
        crops = VisionInputs.of(crops)
        if crops is None:
            return []
        keys = crops.keys()
        first: dict[str, int] = {}  # each new key once (a tile repeated within an image is encoded once)
        for i, key in enumerate(keys):
            if key not in first and not self._path(key).exists():
                first[key] = i
        missing = list(first.values())
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start : start + self.batch_size]
            for index, grid in zip(chunk, self._encode(crops.select(chunk))):
                path = self._path(keys[index])
                tmp = path.with_suffix(f".tmp-{os.getpid()}")
                save_file({"grid": grid.contiguous().cpu()}, str(tmp))
                os.replace(tmp, path)
        return keys

    @staticmethod
    def keys(crops: Crops) -> list[str]:
        """The cache keys of these crops (`VisionInputs.keys`)."""
        crops = VisionInputs.of(crops)
        return crops.keys() if crops is not None else []

    def load(self, keys: list[str]) -> list[torch.Tensor]:
        return [load_file(str(self._path(k)))["grid"] for k in keys]

    def _encode(self, crops: VisionInputs) -> list[torch.Tensor]:
        """The tower's grids for new crops, on the tower's device, in the run's precision, stored in the
        tower's dtype (what the projector takes outside autocast too)."""
        tower = self.model.model.vision_tower
        device = next(tower.parameters()).device
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            grids = self.model.model.encode_images(**crops.model_kwargs(device))
        return [g.to(tower.dtype) for g in grids]
