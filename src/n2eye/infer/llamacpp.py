"""Run a `n2eye convert --to gguf` folder with llama.cpp from Python (llama-cpp-python, the [gguf] extra), as
N2-Eye runs the checkpoint: the language model, and its mmproj with the image token count it needs.

llama.cpp's LFM2 vision path sizes images between 64 and 256 tokens unless told otherwise; a fixed-resolution
encoder needs exactly its own count (stored in the mmproj as `n2eye.image_tokens`), given here through mtmd's
context parameters, as `--image-min-tokens N --image-max-tokens N` does on llama.cpp's command line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


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


__all__ = ["chat_handler", "gguf_files", "image_tokens", "load_llamacpp"]
