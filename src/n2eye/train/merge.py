"""`n2eye merge`: fold a LoRA adapter from `n2eye train --train lora` into a plain, self-contained checkpoint."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import check_writable, save_checkpoint
from ..model_card import MERGE_RECORD, lineage_records


@dataclass
class MergeConfig:
    """Options of `n2eye merge`."""

    adapter: str
    """Adapter folder written by a LoRA run (RUN/adapter or RUN/checkpoint-N)."""
    out: str
    """Folder for the merged checkpoint."""
    base: str | None = None
    """Base checkpoint (default: the one recorded in the adapter's adapter_config.json)."""


def merge(cfg: MergeConfig) -> Path:
    """Loads base + adapter, merges the LoRA weights (the projector comes fully trained from the adapter), saves."""
    from peft import PeftModel

    from ..modeling.modeling_n2eye import N2EyeForConditionalGeneration
    from ..modeling.processing_n2eye import N2EyeProcessor

    adapter = Path(cfg.adapter)
    config_file = adapter / "adapter_config.json"
    if not config_file.exists():
        raise ValueError(f"{adapter} has no adapter_config.json; give the adapter folder of a --train lora run.")
    base = cfg.base or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{config_file} does not name its base model; pass --base.")
    check_writable(cfg.out)
    model = N2EyeForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    processor = N2EyeProcessor.from_pretrained(base, trust_remote_code=True)
    # what the weights came from: the base's build, the adapter's training run, and this merge (for the card)
    records = {**lineage_records(base), **lineage_records(adapter),
               MERGE_RECORD: {"adapter": str(adapter.resolve()), "base": str(base)}}  # fmt: skip
    return save_checkpoint(merged, processor, cfg.out, generation_config=merged.generation_config, extra_json=records)


def merge_and_report(cfg: MergeConfig) -> Path:
    out = merge(cfg)
    print(f"Merged checkpoint: {out}")
    return out
