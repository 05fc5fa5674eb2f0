"""Do torch.compile and a static cache pay for decode on this CPU? `generate` (greedy) on PyTorch's kernels, on our
exact fast paths (`n2eye.load`'s default), with transformers' StaticCache (preallocated KV, LFM2's conv states
in it too) instead of the dynamic cache, with the forward under `torch.compile(dynamic=True)`, and the two
together (`torch.compile` without dynamic shapes on the static cache: one graph for every step, the way
transformers compiles decode), side by side in one run, timed in alternation.

    python benchmarks/compile_decode.py [--preset n2eye-1.3b] [--out benchmarks/results/compile_decode.json]

Random-init bf16 weights at the preset's shapes, a 64-token prompt; rates leave the prefill out. Also records
the compile times (the first calls) and whether each variant's greedy tokens equal the eager model's.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="n2eye-1.3b")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", default="benchmarks/results/compile_decode.json")
    args = parser.parse_args()

    from transformers import StaticCache

    from n2eye.bench import greedy_generate, machine_name, paired_decode_rates, random_decode_setup, weight_sharing_copy
    from n2eye.infer.fast_decode import use_fast_decode

    model, ids = random_decode_setup(args.preset)
    fast = weight_sharing_copy(model)
    use_fast_decode(fast)
    compiled = weight_sharing_copy(model)
    compiled.forward = torch.compile(compiled.forward, dynamic=True)
    start = time.perf_counter()
    greedy_generate(compiled, ids, 4)
    compile_s = time.perf_counter() - start
    cache_len = ids.shape[1] + args.new_tokens + 1  # one length for every call: the static graph compiles once

    def static_cache():
        return StaticCache(config=model.config, max_cache_len=cache_len)

    compiled_static = weight_sharing_copy(model)
    compiled_static.forward = torch.compile(compiled_static.forward, dynamic=False)
    start = time.perf_counter()
    greedy_generate(compiled_static, ids, 4, static_cache())
    compile_static_s = time.perf_counter() - start
    generators = {
        "pytorch_kernels": lambda k: greedy_generate(model, ids, k),
        "fast_paths": lambda k: greedy_generate(fast, ids, k),
        "static_cache": lambda k: greedy_generate(model, ids, k, static_cache()),
        "compiled": lambda k: greedy_generate(compiled, ids, k),
        "compiled_static_cache": lambda k: greedy_generate(compiled_static, ids, k, static_cache()),
    }
    rates = paired_decode_rates(generators, args.new_tokens, args.rounds)
    eager_tokens = greedy_generate(model, ids, args.new_tokens)[0]
    result = {
        "machine": machine_name(),
        "preset": args.preset,
        "compile_s": compile_s,
        "compile_static_cache_s": compile_static_s,
        **{f"{name}_tokens_per_s": rate for name, rate in rates.items()},
        **{f"{name}_speedup": rate / rates["pytorch_kernels"] for name, rate in rates.items()},
        **{f"{name}_same_tokens": torch.equal(generate(args.new_tokens)[0], eager_tokens)
           for name, generate in generators.items() if name != "pytorch_kernels"},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
