"""Greedy decoding without `generate`'s per-token machinery: one forward per token on the model's own cache.

Why: on a CPU, a small model's decode step is short enough that `generate`'s logits processors, stopping
criteria and bookkeeping cost a visible share of it. This loop does the same greedy computation (same forward,
same cache, argmax), so its tokens equal `generate(do_sample=False)`'s; it is what `n2eye bench` times as ours.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


@torch.inference_mode()
def greedy_decode(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    end_ids: Iterable[int] = (),
    cache=None,
    **prefill_inputs,
) -> tuple[torch.Tensor, object]:
    """Returns (new token ids [1, n], cache). `prefill_inputs` (pixel_values, vision_features, ...) go to the
    first forward only; `cache` continues an earlier conversation (its tokens are not in `input_ids`)."""
    from transformers import DynamicCache

    if input_ids.shape[0] != 1:
        raise ValueError("greedy_decode runs one sequence; use N2Eye.generate_batch for batches")
    cache = cache if cache is not None else DynamicCache(config=model.config)
    stop = {int(i) for i in end_ids}
    seen = cache.get_seq_length()
    length = seen + input_ids.shape[1]
    out = model(input_ids=input_ids, past_key_values=cache, use_cache=True, logits_to_keep=1,
                attention_mask=torch.ones((1, length), dtype=torch.long, device=input_ids.device),
                **prefill_inputs)  # fmt: skip
    suppressed = list(getattr(model.generation_config, "suppress_tokens", None) or [])

    def pick(logits: torch.Tensor) -> torch.Tensor:  # generate's SuppressTokensLogitsProcessor, then argmax
        if suppressed:
            logits = logits.clone()
            logits[:, suppressed] = -float("inf")
        return logits.argmax(-1, keepdim=True)

    token = pick(out.logits[:, -1])
    tokens = [token]
    for _ in range(max_new_tokens - 1):
        if int(token) in stop:
            break
        length += 1
        out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1,
                    position_ids=torch.tensor([[length - 1]], device=input_ids.device))  # fmt: skip
        token = pick(out.logits[:, -1])
        tokens.append(token)
    return torch.cat(tokens, dim=1), cache
