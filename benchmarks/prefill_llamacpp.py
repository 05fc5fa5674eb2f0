"""Prefill of 512 tokens at the LFM2-1.2B shapes: our bf16 / int8 / int4 against llama.cpp's BF16 / Q8_0 / Q4_0 on
the same weights, timed in alternation (what `n2eye bench` records as llamacpp_prefill_*, without the rest of the
bench). Needs llama-cpp-python. Usage: python benchmarks/prefill_llamacpp.py [--preset tiny]"""

import argparse

import torch, json
from n2eye.bench import random_decode_setup, weight_sharing_copy, quantize_language_model
from n2eye.bench_llamacpp import LlamaCppModels, prefill_records
from n2eye.build import build_random
from n2eye.infer.fast_decode import use_fast_decode
parser = argparse.ArgumentParser()
parser.add_argument("--preset", default="n2eye-1.3b")
args = parser.parse_args()
model, _ = random_decode_setup(args.preset)
variants = {"bf16": weight_sharing_copy(model)}
use_fast_decode(variants["bf16"])
v = weight_sharing_copy(model); quantize_language_model(v, "int8"); use_fast_decode(v); variants["int8"] = v
v = weight_sharing_copy(model); quantize_language_model(v, "int4"); use_fast_decode(v); variants["int4"] = v
tok = build_random(args.preset)[1].tokenizer
llama = LlamaCppModels(model, tok, ["bf16", "q8_0", "q4_0"], threads=torch.get_num_threads())
torch.manual_seed(1)
ids = torch.randint(20, model.config.text_config.vocab_size, (1, 512))
try:
    for r in prefill_records(variants, llama, ids, 3):
        print(json.dumps({k: r[k] for k in ("name", "ours", "reference", "ratio")}))
finally:
    llama.close()
