"""`n2eye convert`: every format change, one command. `--to n2eye` imports a transformers Lfm2Vl checkpoint
(LiquidAI's LFM2-VL family); `--to lfm2-vl` exports an N2-Eye of that shape as a native transformers Lfm2Vl
folder (hence vLLM); `--to gguf` writes llama.cpp's files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

FORMATS = ("n2eye", "lfm2-vl", "gguf")


@dataclass
class ConvertConfig:
    """What `n2eye convert` reads and writes."""

    model: str
    """The checkpoint to convert: a folder, or a hub id (e.g. LiquidAI/LFM2-VL-450M for --to n2eye)."""
    to: str
    """Target format: `n2eye` (import a transformers Lfm2Vl checkpoint), `lfm2-vl` (export to native Lfm2Vl) or
    `gguf` (llama.cpp: the language model, and the vision side as an mmproj where llama.cpp runs it)."""
    out: str
    """Folder to write (atomically; a folder n2eye wrote before is replaced, anything else is refused)."""
    dtype: str | None = None
    """Weights dtype for --to n2eye (float32, bfloat16, float16); default: the source's."""
    quant: str | None = None
    """GGUF weights for --to gguf: f32, f16 (default), bf16, q8_0 or q4_0 (llama.cpp's formats)."""

    def __post_init__(self) -> None:
        if self.to not in FORMATS:
            raise ValueError(f"--to {self.to!r}: choose one of {list(FORMATS)}.")
        if self.dtype is not None and self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--dtype {self.dtype!r}: choose float32, bfloat16 or float16.")
        if self.quant is not None and self.to != "gguf":
            raise ValueError("--quant applies to --to gguf.")
        if self.dtype is not None and self.to != "n2eye":
            raise ValueError("--dtype applies to --to n2eye; an export keeps the checkpoint's dtype.")


def convert(cfg: ConvertConfig) -> tuple[Path, dict]:
    """Runs the conversion; returns (output folder, report)."""
    from .lfm2vl import export_lfm2vl, import_lfm2vl

    if cfg.to == "n2eye":
        return import_lfm2vl(cfg.model, cfg.out, getattr(torch, cfg.dtype) if cfg.dtype else None)
    if cfg.to == "gguf":
        from .to_gguf import export_gguf

        return export_gguf(cfg.model, cfg.out, cfg.quant or "f16")
    return export_lfm2vl(cfg.model, cfg.out)


def convert_and_report(cfg: ConvertConfig) -> Path:
    """`n2eye convert`: convert, then say what was written and how to load it."""
    path, report = convert(cfg)
    how = "written" if cfg.to == "gguf" else "copied unchanged"
    print(f"Converted {cfg.model} -> {cfg.to} in {path} ({report['parameters']:,} parameters, "
          f"{report['weights']} weight tensors {how})")  # fmt: skip
    if cfg.to == "n2eye":
        print(f"  chat template: {report['chat_template']}")
        if report["dropped_weights"]:
            print(f"  not carried (unused by Lfm2Vl's forward): {', '.join(report['dropped_weights'])}")
        print(f"  next: n2eye chat --model {path}   or   n2eye train --model {path} --data ...")
    elif cfg.to == "gguf":
        for part in ("language_model", "mmproj"):
            if part in report:
                print(f"  {report[part]['file']}: {report[part]['tensors']} tensors ({', '.join(report[part]['types'])})")
        if "mmproj_skipped" in report:
            print(f"  no mmproj: {report['mmproj_skipped']}")
        if "mmproj" in report:
            tokens = report["mmproj"].get("image_tokens")
            fixed = f" --image-min-tokens {tokens} --image-max-tokens {tokens}" if tokens else ""
            print(f"  llama.cpp: llama-mtmd-cli -m {path}/{report['language_model']['file']} --mmproj "
                  f"{path}/{report['mmproj']['file']}{fixed} --image IMAGE -p PROMPT")  # fmt: skip
            if tokens:
                print(f"  (a fixed-resolution encoder: {tokens} image tokens keep images at its own size, as N2-Eye)")
        else:
            print(f"  llama.cpp: llama-cli -m {path}/{report['language_model']['file']}")
    else:
        print("  loads with plain transformers, no remote code: "
              f"Lfm2VlForConditionalGeneration.from_pretrained({str(path)!r}); vLLM: vllm serve {path}")  # fmt: skip
    return path


__all__ = ["FORMATS", "ConvertConfig", "convert", "convert_and_report"]
