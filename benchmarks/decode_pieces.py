"""Each CPU decode fast path on its own, side by side in one run (bf16, greedy, through `generate`):
PyTorch's kernels, + the fused short conv (exact: what `n2eye.load` runs), + our bf16 matrix-vector kernel
(opt-in: `bf16_kernel=True`), both.

    python benchmarks/decode_pieces.py [--preset n2eye-1.3b] [--new-tokens 32] [--out benchmarks/results/decode_pieces.json]

Random-init weights at the preset's shapes; a 64-token prompt; rates leave the prefill out ((n - 1) tokens over
the time beyond a 1-token generation), best of `--rounds` rounds that time the variants in alternation. Each
variant's greedy tokens are compared with PyTorch's (`<name>_same_tokens`): the fused conv is exact; the bf16
kernel sums in another order, and on random weights, whose logits are nearly tied, that can flip a token.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="n2eye-1.3b")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default="benchmarks/results/decode_pieces.json")
    args = parser.parse_args()

    from n2eye.bench import greedy_generate, machine_name, paired_decode_rates, random_decode_setup, weight_sharing_copy
    from n2eye.infer.fast_decode import use_bf16_decode_kernel, use_fast_short_conv

    model, ids = random_decode_setup(args.preset)
    variants = {
        "pytorch_kernels": lambda m: None,
        "fused_short_conv": use_fast_short_conv,
        "bf16_kernel": use_bf16_decode_kernel,
        "both": lambda m: (use_fast_short_conv(m), use_bf16_decode_kernel(m)),
    }
    result: dict = {"machine": machine_name(), "preset": args.preset, "new_tokens": args.new_tokens}
    models = {}
    for name, enable in variants.items():
        models[name] = model if name == "pytorch_kernels" else weight_sharing_copy(model)
        enable(models[name])
    generators = {name: (lambda k, m=m: greedy_generate(m, ids, k)) for name, m in models.items()}
    rates = paired_decode_rates(generators, args.new_tokens, args.rounds)  # alternating: host noise hits all alike
    tokens = {name: greedy_generate(m, ids, args.new_tokens)[0] for name, m in models.items()}
    for name in variants:
        result[f"{name}_tokens_per_s"] = rates[name]
        result[f"{name}_same_tokens"] = torch.equal(tokens[name], tokens["pytorch_kernels"])
        print(f"{name}: {rates[name]:.2f} tokens/s", flush=True)
    base = result["pytorch_kernels_tokens_per_s"]
    for name in variants:
        result[f"{name}_speedup"] = result[f"{name}_tokens_per_s"] / base
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
