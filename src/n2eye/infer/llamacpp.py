"""Run a `n2eye convert --to gguf` folder with llama.cpp from Python (llama-cpp-python, the [gguf] extra), as
N2-Eye runs the checkpoint: the language model, and its mmproj with the image token count it needs.

llama.cpp's LFM2 vision path sizes images between 64 and 256 tokens unless told otherwise; a fixed-resolution
encoder needs exactly its own count (stored in the mmproj as `n2eye.image_tokens`), given here through mtmd's
context parameters, as `--image-min-tokens N --image-max-tokens N` does on llama.cpp's command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..images import openai_content


def gguf_files(folder: str | Path) -> tuple[Path, Path | None]:
    """(language model, mmproj or None) of an export folder."""
    folder = Path(folder)
    mmproj = sorted(folder.glob("mmproj-*.gguf"))
    models = sorted(p for p in folder.glob("*.gguf") if not p.name.startswith("mmproj-"))
    if len(models) != 1 or len(mmproj) > 1:
        raise ValueError(f"{folder}: expected one language-model .gguf and at most one mmproj-*.gguf (as "
                         f"`n2eye convert --to gguf` writes), found {[p.name for p in folder.glob('*.gguf')]}.")  # fmt: skip
    return models[0], (mmproj[0] if mmproj else None)


def image_tokens(mmproj: str | Path) -> int | None:
    """The fixed image token count an mmproj written by n2eye asks for (None: llama.cpp's own sizing)."""
    import gguf

    from ..convert.to_gguf import IMAGE_TOKENS_KEY

    field = gguf.GGUFReader(str(mmproj)).fields.get(IMAGE_TOKENS_KEY)
    return None if field is None else int(field.contents())


def chat_handler(mmproj: str | Path, verbose: bool = False):
    """llama-cpp-python's multimodal chat handler for this mmproj, with its image token count applied."""
    from llama_cpp.llama_chat_format import MTMDChatHandler

    tokens = image_tokens(mmproj)

    class N2EyeMTMDChatHandler(MTMDChatHandler):
        def _init_mtmd_context(self, llama_model) -> None:
            if self.mtmd_ctx is not None or tokens is None:
                return super()._init_mtmd_context(llama_model)
            module = self._mtmd_cpp
            default = module.mtmd_context_params_default

            def with_tokens():
                params = default()
                params.image_min_tokens = params.image_max_tokens = tokens
                return params

            module.mtmd_context_params_default = with_tokens
            try:
                super()._init_mtmd_context(llama_model)
            finally:
                module.mtmd_context_params_default = default

    return N2EyeMTMDChatHandler(clip_model_path=str(mmproj), verbose=verbose)


def load_llamacpp(folder: str | Path, n_ctx: int = 4096, **kwargs: Any):
    """A `llama_cpp.Llama` for an export folder, with the multimodal handler when it has an mmproj."""
    from llama_cpp import Llama

    model, mmproj = gguf_files(folder)
    handler = chat_handler(mmproj, verbose=kwargs.get("verbose", False)) if mmproj else None
    return Llama(model_path=str(model), chat_handler=handler, n_ctx=n_ctx, **{"verbose": False, **kwargs})


class LlamaCppEngine:
    """The part of `n2eye.load(...)`'s engine that `n2eye eval` uses, run by llama.cpp on a GGUF export: the prompt
    is rendered and evaluated by llama.cpp (its chat template, tokenizer, image preprocessing and vision graph),
    answers are greedy with N2-Eye's never-generated tokens suppressed, and decoded by the checkpoint's tokenizer
    as N2-Eye decodes (tool-call markers kept), so the two are scored alike."""

    def __init__(self, folder: str | Path, processor, n_ctx: int = 2048, threads: int | None = None):
        import torch

        from ..modeling.processing_n2eye import never_generated_token_ids

        self.processor = processor
        self.tokenizer = processor.tokenizer
        # without logits_all: llama.cpp computes the output layer for each batch's last position only (no
        # n_ctx x vocabulary score table); the greedy loop reads that row from the context itself
        self.llm = load_llamacpp(folder, n_ctx=n_ctx, n_threads=threads or torch.get_num_threads())
        self._n_vocab = self.llm.n_vocab()
        self._suppress = never_generated_token_ids(self.tokenizer)
        self._end_ids = {self.tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}

    def complete(self, messages: list[dict], tools: list[dict] | None = None, max_new_tokens: int = 256) -> dict:
        import numpy as np

        history = [{**m, "content": openai_content(m.get("content"))} for m in messages]
        llm = self.llm
        # the prompt: rendered, tokenized and evaluated by llama.cpp (one greedy token sampled and dropped)
        llm.create_chat_completion(messages=history, tools=tools, max_tokens=1, temperature=0.0, top_k=1,
                                   repeat_penalty=1.0)  # fmt: skip
        prompt_tokens = llm.n_tokens
        generated: list[int] = []
        while len(generated) < max_new_tokens:  # logits of the last evaluated position (a copy: llama.cpp reuses it)
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(self._n_vocab,)).astype(np.float32)
            logits[self._suppress] = -np.inf
            token = int(logits.argmax())
            generated.append(token)
            if token in self._end_ids:
                break
            llm.eval([token])
        ended = bool(generated) and generated[-1] in self._end_ids
        text = self.tokenizer.decode([t for t in generated if t not in self._end_ids], skip_special_tokens=False)
        return {"text": text, "prompt_tokens": prompt_tokens, "completion_tokens": len(generated),
                "finish_reason": "stop" if ended else "length"}  # fmt: skip

    def complete_batch(self, conversations: list[list[dict]], tools: list[dict] | None = None,
                       image_settings: dict | None = None, max_new_tokens: int = 256, **_: Any) -> list[dict]:  # fmt: skip
        """One conversation at a time (llama.cpp's multimodal path takes one prompt); greedy whatever is asked."""
        if image_settings:
            raise ValueError("Image settings apply to N2-Eye's processor; llama.cpp sizes images itself.")
        return [self.complete(c, tools, max_new_tokens) for c in conversations]

    def close(self) -> None:
        self.llm.close()


__all__ = ["LlamaCppEngine", "chat_handler", "gguf_files", "image_tokens", "load_llamacpp"]
