"""Prefill of 512 tokens: our bf16 / int8 / int4 against llama.cpp's BF16 / Q8_0 / Q4_0 on the same weights, timed in
alternation (what `n2eye bench` records as llamacpp_prefill_*, without the rest of the bench). Needs
llama-cpp-python (`pip install "n2eye[gguf]"`).

    python benchmarks/prefill_llamacpp.py                    # LFM2-1.2B shapes, ~2 min
    python benchmarks/prefill_llamacpp.py --preset tiny --out prefill.json
"""

from __future__ import annotations

import argparse
import json

import torch

from n2eye.bench import (
    machine_name,
    quantize_language_model,
    random_decode_setup,
    weight_sharing_copy,
)
from n2eye.bench_llamacpp import LlamaCppModels, prefill_records
from n2eye.infer.fast_decode import use_fast_decode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="n2eye-1.3b")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the records here as JSON")
    args = parser.parse_args()
    model, _, tokenizer = random_decode_setup(args.preset, with_tokenizer=True)
    variants = {"bf16": weight_sharing_copy(model)}
    for bits in ("int8", "int4"):
        variants[bits] = weight_sharing_copy(model)
        quantize_language_model(variants[bits], bits)
    for variant in variants.values():
        use_fast_decode(variant)  # what n2eye.load runs
    llama = LlamaCppModels(model, tokenizer, ["bf16", "q8_0", "q4_0"],
                           threads=torch.get_num_threads())  # fmt: skip
    torch.manual_seed(1)
    ids = torch.randint(20, model.config.text_config.vocab_size, (1, args.tokens))
    try:
        records = prefill_records(variants, llama, ids, args.repeats)
    finally:
        llama.close()
    machine = machine_name()
    for record in records:
        record["machine"], record["preset"] = machine, args.preset
        print(f"{record['name']}: ours ({record['ours_path']}) {record['ours']:.0f} tokens/s, llama.cpp "
              f"{record['reference']:.0f}, ratio {record['ratio']:.2f}")  # fmt: skip
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
