"""`n2eye generate`: one image + prompt -> answer, through the same path a transformers user takes."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GenerateConfig:
    """Options of `n2eye generate`."""

    model: str
    """Checkpoint folder (or hub id) made by `n2eye build` / `n2eye train`."""
    prompt: str
    """The user's question."""
    image: str | None = None
    """Image path, http(s) URL or data URI (optional: text-only prompts work too)."""
    system: str | None = None
    """System prompt (default: the checkpoint's default system prompt)."""
    max_new_tokens: int = 64
    """Most tokens to generate."""
    do_sample: bool | None = None
    """Sample instead of greedy decoding (default: the checkpoint's generation_config)."""
    temperature: float | None = None
    """Sampling temperature (default: the checkpoint's, 0.1 for LFM2-VL settings)."""
    seed: int = 0
    """Random seed for sampling."""


def load(path: str, dtype: torch.dtype | None = None):
    """Loads model and processor exactly as a transformers user would (`trust_remote_code=True`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=dtype)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    return model.eval(), processor


def build_messages(prompt: str, image: str | None = None, system: str | None = None) -> list[dict]:
    """A one-turn conversation in HF chat format, image first as in the N2-Eye card."""
    content = ([{"type": "image", "url": image}] if image else []) + [{"type": "text", "text": prompt}]
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


def generate(cfg: GenerateConfig) -> str:
    """Returns the model's answer to one prompt (and image)."""
    model, processor = load(cfg.model)
    inputs = processor.apply_chat_template(
        build_messages(cfg.prompt, cfg.image, cfg.system),
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    options = {"max_new_tokens": cfg.max_new_tokens}
    if cfg.do_sample is not None:
        options["do_sample"] = cfg.do_sample
    if cfg.temperature is not None:
        options["temperature"] = cfg.temperature
    torch.manual_seed(cfg.seed)
    with torch.inference_mode():
        out = model.generate(**inputs, **options)
    return processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def generate_and_print(cfg: GenerateConfig) -> str:
    answer = generate(cfg)
    print(answer)
    return answer
