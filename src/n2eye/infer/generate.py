"""`n2eye generate`: one image + prompt, or a JSONL file of requests, through `n2eye.load` (the one code path)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..image_settings import ImageOptions


@dataclass
class GenerateConfig(ImageOptions):
    """Options of `n2eye generate`."""

    model: str
    """Checkpoint folder (or hub id) made by `n2eye build` / `n2eye train`."""
    prompt: str | None = None
    """The user's question (one request)."""
    image: str | None = None
    """Image path, http(s) URL or data URI for --prompt (optional: text-only prompts work too)."""
    system: str | None = None
    """System prompt (default: the checkpoint's default system prompt)."""
    requests: str | None = None
    """JSONL file of requests, one per line: {"prompt", "image"?, "system"?} or {"messages": [...]}."""
    out: str | None = None
    """JSONL file for the results of --requests (default: print them)."""
    batch_size: int = 8
    """Requests generated together with --requests."""
    max_new_tokens: int = 64
    """Most tokens to generate."""
    temperature: float | None = None
    """Sampling temperature; 0 for greedy (default: the checkpoint's generation_config, 0.1)."""
    min_p: float | None = None
    """Min-p sampling threshold (default: the checkpoint's, 0.15)."""
    repetition_penalty: float | None = None
    """Repetition penalty (default: the checkpoint's, 1.05)."""
    seed: int = 0
    """Random seed for sampling."""

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.requests is None):
            raise ValueError("Give either --prompt (one request) or --requests FILE.jsonl.")
    trust_remote_code: bool = False
    """Run the checkpoint's own code when it differs from the installed n2eye's (only for checkpoints you trust)."""


def build_messages(prompt: str, image: str | None = None, system: str | None = None) -> list[dict]:
    """A one-turn conversation in HF chat format, image first as in the N2-Eye card."""
    content = ([{"type": "image", "url": image}] if image else []) + [{"type": "text", "text": prompt}]
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


def request_messages(request: dict[str, Any], line: int) -> list[dict]:
    if "messages" in request:
        return request["messages"]
    if "prompt" not in request:
        raise ValueError(f"line {line}: a request needs 'prompt' (and optional 'image', 'system') or 'messages'.")
    return build_messages(request["prompt"], request.get("image"), request.get("system"))


def generate(cfg: GenerateConfig) -> str | list[dict]:
    """The answer to --prompt, or the list of results of --requests (also written to --out)."""
    from tqdm.auto import tqdm

    from .engine import load

    options = {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "min_p": cfg.min_p,
               "repetition_penalty": cfg.repetition_penalty}  # fmt: skip
    torch.manual_seed(cfg.seed)
    if cfg.prompt is not None:
        engine = load(cfg.model, trust_remote_code=cfg.trust_remote_code, image_settings=cfg.image_settings())
        return engine.chat(build_messages(cfg.prompt, cfg.image, cfg.system), **options)
    lines = [line for line in Path(cfg.requests).read_text().splitlines() if line.strip()]
    requests = []
    for number, line in enumerate(lines, 1):
        try:
            requests.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{cfg.requests} line {number} is not JSON: {err}") from err
    engine = load(cfg.model, trust_remote_code=cfg.trust_remote_code, image_settings=cfg.image_settings())
    results = []
    for start in tqdm(range(0, len(requests), cfg.batch_size), desc="generate", unit="batch"):
        chunk = requests[start : start + cfg.batch_size]
        batch, indices = [], []
        for offset, request in enumerate(chunk):
            try:
                batch.append(request_messages(request, start + offset + 1))
                indices.append(offset)
            except ValueError as err:  # one bad request never stops the file
                results.append({"line": start + offset + 1, "error": str(err)})
        try:
            answers = engine.generate_batch(batch, **options) if batch else []
        except ValueError as err:  # e.g. an unreadable image: answer the others one by one
            answers = []
            for messages in batch:
                try:
                    answers.append(engine.chat(messages, **options))
                except ValueError as single:
                    answers.append({"error": str(single)})
        for offset, answer in zip(indices, answers):
            record = {"line": start + offset + 1, **({"answer": answer} if isinstance(answer, str) else answer)}
            results.append(record)
    results.sort(key=lambda r: r["line"])
    if cfg.out:
        Path(cfg.out).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in results))
    return results


def generate_and_print(cfg: GenerateConfig) -> str | list[dict]:
    result = generate(cfg)
    if isinstance(result, str):
        print(result)
    elif not cfg.out:
        for record in result:
            print(json.dumps(record, ensure_ascii=False))
    else:
        errors = sum("error" in r for r in result)
        print(f"{len(result)} results in {cfg.out} ({errors} errors)")
    return result
