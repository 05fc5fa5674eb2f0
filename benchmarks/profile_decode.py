"""Where a decoded token's time goes, ours against llama.cpp's, on the same weights (LFM2-1.2B shapes by default).

Ours, per format (bf16, bf16 + our opt-in kernel, int8, int4), in milliseconds per token:
- `generate`: transformers' `generate` (what `n2eye.load(...).chat` runs), greedy, per new token;
- `forward`: one decode step of the model alone (a token, the cache), no `generate` around it;
- `linears`: every language-model linear layer and the output head on one row, back to back: the weight-reading work;
the rest of `forward` is the non-linear work (short convs, attention, norms, embeddings), `generate` minus `forward`
its loop (logits processors, stopping criteria, cache updates). llama.cpp, per format (BF16, Q8_0, Q4_0): its own
counters (`llama_perf_context`: eval time per token) and its token rate through `Llama.generate`. Each side's weight
bytes per token over its eval time gives the read rate it reaches; with the measured streaming read of the machine:
its share of the bandwidth. Needs llama-cpp-python.

    python benchmarks/profile_decode.py --out profile.json         # ~4 min at the LFM2-1.2B shapes
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from n2eye.bench import (
    machine_name,
    memory_read_bandwidth,
    quantize_language_model,
    random_decode_setup,
    weight_bytes_per_token,  # fmt: skip
    weight_sharing_copy,
)
from n2eye.bench_llamacpp import LlamaCppModels
from n2eye.infer.fast_decode import use_fast_decode
from n2eye.infer.quantize import Int4Linear, Int8Linear


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def our_profile(model, ids: torch.Tensor, tokens: int, repeats: int) -> dict:
    from transformers import DynamicCache

    def generate(n):
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, repetition_penalty=1.0)  # fmt: skip

    per_token = (best(lambda: generate(tokens), repeats) - best(lambda: generate(1), repeats)) / (tokens - 1)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    n, token = ids.shape[1], ids[:, -1:]
    steps = []
    for i in range(1 + repeats * 8):  # consecutive decode steps (the conv state can't be rolled back), best kept
        start = time.perf_counter()
        with torch.inference_mode():
            model(input_ids=token, past_key_values=cache, use_cache=True, position_ids=torch.tensor([[n + i]]))
        steps.append(time.perf_counter() - start)
    forward = min(steps[1:])
    kinds = (torch.nn.Linear, Int8Linear, Int4Linear)  # plain, our bf16 kernel's (a Linear), quantized
    layers = [m for m in (*model.model.language_model.modules(), model.lm_head) if isinstance(m, kinds)]
    inputs = {id(layer): torch.randn(1, 1, layer.in_features, dtype=torch.bfloat16) for layer in layers}

    def linears():
        with torch.inference_mode():
            for layer in layers:
                layer(inputs[id(layer)])

    linear = best(linears, repeats * 3)
    return {"generate_ms": 1e3 * per_token, "forward_ms": 1e3 * forward, "linears_ms": 1e3 * linear,
            "nonlinear_ms": 1e3 * (forward - linear), "generate_loop_ms": 1e3 * (per_token - forward),
            "weight_bytes_per_token": weight_bytes_per_token(model)}  # fmt: skip


def llamacpp_profile(llama: LlamaCppModels, quant: str, ids: torch.Tensor, tokens: int, repeats: int) -> dict:
    import os

    import llama_cpp

    llm = llama.models[quant]
    rates = []
    for _ in range(repeats):
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        start = time.perf_counter()
        llama.generate(quant, ids, tokens)
        rates.append(time.perf_counter() - start)
        data = llama_cpp.llama_perf_context(llm.ctx)
    eval_ms = data.t_eval_ms / max(1, data.n_eval)
    file_bytes = os.path.getsize(llama.folder / f"lm-{quant}.gguf")
    return {"eval_ms": eval_ms, "n_eval": data.n_eval, "prompt_eval_ms": data.t_p_eval_ms,
            "file_bytes": file_bytes, "wall_s_best": min(rates)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="n2eye-1.3b")
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    model, ids, tokenizer = random_decode_setup(args.preset, with_tokenizer=True)
    bandwidth = memory_read_bandwidth()
    ours = {}
    for name in ("bf16", "bf16_kernel", "int8", "int4"):
        variant = weight_sharing_copy(model)
        if name.startswith("int"):
            quantize_language_model(variant, name)
        fast = use_fast_decode(variant, bf16_kernel=name == "bf16_kernel")
        if name == "bf16_kernel" and not fast["bf16_linear"]:
            continue
        ours[name] = our_profile(variant, ids, args.new_tokens, args.repeats)
        del variant
    llama = LlamaCppModels(model, tokenizer, ["bf16", "q8_0", "q4_0"],
                           threads=torch.get_num_threads())  # fmt: skip
    try:
        theirs = {q: llamacpp_profile(llama, q, ids, args.new_tokens, args.repeats) for q in llama.models}
    finally:
        llama.close()
    bandwidth = max(bandwidth, memory_read_bandwidth())
    for r in ours.values():
        r["linears_read_share"] = r["weight_bytes_per_token"] / (r["linears_ms"] / 1e3) / 1e9 / bandwidth
        r["generate_read_share"] = r["weight_bytes_per_token"] / (r["generate_ms"] / 1e3) / 1e9 / bandwidth
    for r in theirs.values():
        r["eval_read_share"] = r["file_bytes"] / (r["eval_ms"] / 1e3) / 1e9 / bandwidth
    result = {"machine": machine_name(), "preset": args.preset, "bandwidth_gb_s": bandwidth, "ours": ours,
              "llamacpp": theirs}  # fmt: skip
    print(f"{result['machine']}, streaming read {bandwidth:.1f} GB/s")
    for name, r in ours.items():
        print(f"ours {name:12s} generate {r['generate_ms']:.1f} ms/token = forward {r['forward_ms']:.1f} (linears "
              f"{r['linears_ms']:.1f}, {100 * r['linears_read_share']:.0f}% of the bandwidth; the rest "
              f"{r['nonlinear_ms']:.1f}) + generate's loop {r['generate_loop_ms']:.1f}")  # fmt: skip
    for name, r in theirs.items():
        print(f"llama.cpp {name:7s} eval {r['eval_ms']:.1f} ms/token ({100 * r['eval_read_share']:.0f}% of the bandwidth)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
