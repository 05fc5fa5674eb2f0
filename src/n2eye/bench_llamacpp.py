"""llama.cpp as a second reference in `n2eye bench`: the same weights exported to GGUF (`n2eye convert --to gguf`'s
writer), run by llama.cpp itself through llama-cpp-python with the same thread count, timed in alternation with
our paths in one loop. Pairs: our bf16 / int8 / int4 against llama.cpp's BF16 / Q8_0 / Q4_0."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# our decode variant -> the llama.cpp format it is compared with
PAIRS = {"bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}


def available() -> str | None:
    """None when llama-cpp-python can be used, else why not (printed by the bench)."""
    try:
        import llama_cpp  # noqa: F401
    except ModuleNotFoundError:
        return "llama-cpp-python is not installed (pip install 'n2eye[gguf]')"
    return None


class LlamaCppModels:
    """The model's language model in llama.cpp, one `Llama` per format, from GGUF files in a temporary folder."""

    def __init__(self, model, tokenizer, quants: list[str], threads: int, n_ctx: int = 2048):
        from llama_cpp import Llama

        from .convert.to_gguf import write_language_model

        self.folder = Path(tempfile.mkdtemp(prefix="n2eye-llamacpp-"))
        self.models: dict[str, Any] = {}
        for quant in quants:
            path = self.folder / f"lm-{quant}.gguf"
            write_language_model(model, tokenizer, None, path, quant, "bench")
            self.models[quant] = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                       n_batch=n_ctx, verbose=False)  # fmt: skip

    def generate(self, quant: str, ids: torch.Tensor, n: int) -> list[int]:
        """n greedy tokens after the prompt `ids` (prefilled afresh each call, as ours are)."""
        llm = self.models[quant]
        llm.reset()
        out = []
        for token in llm.generate(ids[0].tolist(), temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == n:
                break
        return out

    def prefill(self, quant: str, ids: torch.Tensor) -> None:
        llm = self.models[quant]
        llm.reset()
        llm.eval(ids[0].tolist())

    def close(self) -> None:
        import shutil

        for llm in self.models.values():
            llm.close()
        self.models.clear()
        shutil.rmtree(self.folder, ignore_errors=True)


def prefill_records(ours: dict[str, Any], llama: LlamaCppModels, ids: torch.Tensor, repeats: int) -> list[dict]:
    """Prompt tokens/s of our variants (`ours[bits]`: a model, logits of the last position only, as the engine
    prefills) against llama.cpp's matching format, timed in alternation."""
    best = {name: float("inf") for name in [*ours, *(f"llamacpp_{PAIRS[b]}" for b in ours)]}

    def run_ours(model):
        with torch.inference_mode():
            model(input_ids=ids, logits_to_keep=1)

    for round_ in range(repeats + 1):  # round 0 warms up
        for bits, model in ours.items():
            for name, fn in ((bits, lambda m=model: run_ours(m)),
                             (f"llamacpp_{PAIRS[bits]}", lambda q=PAIRS[bits]: llama.prefill(q, ids))):  # fmt: skip
                start = time.perf_counter()
                fn()
                if round_:
                    best[name] = min(best[name], time.perf_counter() - start)
    n = ids.shape[1]
    from .bench import _record

    return [_record(f"llamacpp_prefill_{PAIRS[bits]}", "tokens/s", n / best[bits], n / best[f"llamacpp_{PAIRS[bits]}"],
                    ours_path=bits, prompt_tokens=n) for bits in ours]  # fmt: skip


__all__ = ["PAIRS", "LlamaCppModels", "available", "prefill_records"]
