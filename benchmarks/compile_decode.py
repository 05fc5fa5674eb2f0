"""Does torch.compile pay for decode on this CPU? Our greedy loop on PyTorch's kernels, on our exact fast paths
(`n2eye.load`'s default), and with the model's forward under `torch.compile(dynamic=True)`, side by side in one
run, timed in alternation.

    python benchmarks/compile_decode.py [--preset n2eye-1.3b] [--out benchmarks/results/compile_decode.json]

Random-init bf16 weights at the preset's shapes, a 64-token prompt; rates leave the prefill out. Also records
the compile time (the first call) and whether the compiled model's greedy tokens equal the eager model's.
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

    from n2eye.bench import machine_name, paired_decode_rates, random_decode_setup, weight_sharing_copy
    from n2eye.infer.decode import greedy_decode
    from n2eye.infer.fast_decode import use_fast_decode

    model, ids = random_decode_setup(args.preset)
    fast = weight_sharing_copy(model)
    use_fast_decode(fast)
    compiled = weight_sharing_copy(model)
    compiled.forward = torch.compile(compiled.forward, dynamic=True)
    start = time.perf_counter()
    greedy_decode(compiled, ids, 4)
    compile_s = time.perf_counter() - start
    generators = {
        "pytorch_kernels": lambda k: greedy_decode(model, ids, k),
        "fast_paths": lambda k: greedy_decode(fast, ids, k),
        "compiled": lambda k: greedy_decode(compiled, ids, k),
    }
    rates = paired_decode_rates(generators, args.new_tokens, args.rounds)
    eager_tokens = greedy_decode(model, ids, args.new_tokens)[0]
    result = {
        "machine": machine_name(),
        "preset": args.preset,
        "compile_s": compile_s,
        **{f"{name}_tokens_per_s": rate for name, rate in rates.items()},
        **{f"{name}_speedup": rate / rates["pytorch_kernels"] for name, rate in rates.items()},
        "compiled_same_tokens": torch.equal(greedy_decode(compiled, ids, args.new_tokens)[0], eager_tokens),
        "fast_paths_same_tokens": torch.equal(greedy_decode(fast, ids, args.new_tokens)[0], eager_tokens),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
