"""`n2eye convert`: every format change, one command. `--to n2eye` imports a transformers Lfm2Vl checkpoint
(LiquidAI's LFM2-VL family); `--to lfm2-vl` exports an N2-Eye of that shape as a native transformers Lfm2Vl
folder (hence vLLM)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

FORMATS = ("n2eye", "lfm2-vl")


@dataclass
class ConvertConfig:
    """What `n2eye convert` reads and writes."""

    model: str
    """The checkpoint to convert: a folder, or a hub id (e.g. LiquidAI/LFM2-VL-450M for --to n2eye)."""
    to: str
    """Target format: `n2eye` (import a transformers Lfm2Vl checkpoint) or `lfm2-vl` (export to native Lfm2Vl)."""
    out: str
    """Folder to write (written atomically; an existing N2-Eye folder is replaced, anything else is refused)."""
    dtype: str | None = None
    """Weights dtype for --to n2eye (float32, bfloat16, float16); default: the source's."""

    def __post_init__(self) -> None:
        if self.to not in FORMATS:
            raise ValueError(f"--to {self.to!r}: choose one of {list(FORMATS)}.")
        if self.dtype is not None and self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {self.dtype!r}: choose float32, bfloat16 or float16.")


def convert(cfg: ConvertConfig) -> tuple[Path, dict]:
    """Runs the conversion; returns (output folder, report)."""
    from .lfm2vl import export_lfm2vl, import_lfm2vl

    if cfg.to == "n2eye":
        return import_lfm2vl(cfg.model, cfg.out, getattr(torch, cfg.dtype) if cfg.dtype else None)
    if cfg.dtype is not None:
        raise ValueError("--dtype applies to --to n2eye; an export keeps the checkpoint's dtype.")
    return export_lfm2vl(cfg.model, cfg.out)


def convert_and_report(cfg: ConvertConfig) -> Path:
    """`n2eye convert`: convert, then say what was written and how to load it."""
    path, report = convert(cfg)
    print(f"Converted {cfg.model} -> {cfg.to} in {path} ({report['parameters']:,} parameters, "
          f"{report['weights']} weight tensors copied unchanged)")  # fmt: skip
    if cfg.to == "n2eye":
        print(f"  chat template: {report['chat_template']}")
        if report["dropped_weights"]:
            print(f"  not carried (unused by Lfm2Vl's forward): {', '.join(report['dropped_weights'])}")
        print(f"  next: n2eye chat --model {path}   or   n2eye train --model {path} --data ...")
    else:
        print("  loads with plain transformers, no remote code: "
              f"Lfm2VlForConditionalGeneration.from_pretrained({str(path)!r}); vLLM: vllm serve {path}")  # fmt: skip
    return path


__all__ = ["FORMATS", "ConvertConfig", "convert", "convert_and_report"]
