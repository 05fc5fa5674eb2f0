"""Fast inference pieces: weight-only int8/int4 linears, the CPU decode fast paths (through `generate`), and `n2eye bench`."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn


def _spread_weights(model, seed: int = 0, std: float = 0.3):
    """Random-init tiny models answer one token forever; larger weights give varied greedy outputs to compare."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


@pytest.fixture(params=["ours", "stock"])
def kernel_path(request, monkeypatch):
    """Each quantized layer test runs on our kernels (where this CPU has them) and on PyTorch's stock ones."""
    import n2eye.infer.quantize as Q
    from n2eye.kernels import unavailable_reason

    if request.param == "ours" and unavailable_reason():
        pytest.skip(f"fast kernels unavailable: {unavailable_reason()}")
    if request.param == "stock":
        monkeypatch.setattr(Q, "_kernels", lambda: None)
    return request.param


@pytest.mark.parametrize("bits", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 40])  # decode, a small batch, a prefill
def test_quantized_linear_matches_its_float_layer(bits, rows, kernel_path):
    from n2eye.infer.quantize import Int4Linear, Int8Linear

    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    x = torch.randn(rows, 1, 256)
    q = Int8Linear(linear) if bits == "int8" else Int4Linear(linear)
    assert q.fast == (kernel_path == "ours")
    y, ref = q(x).float(), linear(x)
    assert y.shape == ref.shape == (rows, 1, 96)
    rel = ((y - ref).norm() / ref.norm()).item()
    assert rel < (0.02 if bits == "int8" else 0.12), rel
    # against its own dequantized weight the kernel is exact up to bf16 output and int8 activation blocks
    own = nn.functional.linear(x, q.dequantized(), linear.bias)
    assert ((y - own).norm() / own.norm()).item() < 0.01
    # int8 keeps one byte per weight, int4 half a byte
    assert q.qweight.numel() * q.qweight.element_size() == linear.weight.numel() // (1 if bits == "int8" else 2)


def test_int4_groups_fall_back_to_what_the_width_allows_and_refuse_the_rest():
    from n2eye.infer.quantize import Int4Linear

    assert Int4Linear(nn.Linear(256, 16)).group_size == 128
    narrow = Int4Linear(nn.Linear(96, 16))  # 96 = 3 x 32
    assert narrow.group_size == 32 and not narrow.fast
    with pytest.raises(ValueError, match="group size"):
        Int4Linear(nn.Linear(48, 16))


def test_quantize_replaces_lm_linears_and_head_but_not_vision(tiny_checkpoint):
    from n2eye.infer.quantize import Int8Linear, quantize_language_model
    from n2eye.modeling.modeling_n2eye import N2EyeForConditionalGeneration

    model = N2EyeForConditionalGeneration.from_pretrained(tiny_checkpoint)
    counts = quantize_language_model(model, "int8")
    lm_linears = [m for m in model.model.language_model.modules() if isinstance(m, nn.Linear)]
    assert counts["quantized"] > 0 and not lm_linears
    assert isinstance(model.lm_head, Int8Linear)
    assert any(isinstance(m, nn.Linear) for m in model.model.vision_tower.modules())
    with pytest.raises(ValueError, match="int8, int4"):
        quantize_language_model(model, "int3")


def test_int8_logits_stay_close(tiny_checkpoint):
    from n2eye.infer.quantize import quantize_language_model
    from n2eye.modeling.modeling_n2eye import N2EyeForConditionalGeneration

    model = _spread_weights(N2EyeForConditionalGeneration.from_pretrained(tiny_checkpoint).eval())
    ids = torch.randint(20, model.config.text_config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        full = model(input_ids=ids).logits[0, -1]
    quantize_language_model(model, "int8")
    with torch.inference_mode():
        q = model(input_ids=ids).logits[0, -1]
    assert (q - full).abs().max() < 0.06 * full.abs().max()  # int8 weights, bf16 activations
    # the 24-token prefill computes what the int8 weights say: as the same weights dequantized, in float32
    from n2eye.infer.quantize import Int8Linear, language_model_linears

    for parent, name, layer in [(p, n, c) for p in model.modules() for n, c in p.named_children()]:
        if isinstance(layer, Int8Linear):
            dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            dense.weight.data = layer.dequantized()
            if layer.bias is not None:
                dense.bias.data = layer.bias.float()
            setattr(parent, name, dense)
    assert not any(isinstance(c, Int8Linear) for _, _, c in language_model_linears(model))
    with torch.inference_mode():
        exact = model(input_ids=ids).logits[0, -1]
    assert (q - exact).abs().max() < 0.02 * exact.abs().max()


@pytest.mark.slow  # subprocess-heavy: CI's second tier (pytest -m slow)
def test_readme_bench_command_writes_records_table_and_chart(tmp_path):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = re.search(r"<!-- bench-command -->\s*```\w+\n(.*?)```", readme, re.S).group(1).strip()
    args = shlex.split(command)
    assert args[:2] == ["n2eye", "bench"]
    result = subprocess.run([sys.executable, "-m", "n2eye.cli", *args[1:]], cwd=tmp_path, capture_output=True,
                            text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / args[args.index("--out") + 1]
    records = json.loads(out.read_text())
    names = [r["name"] for r in records]
    for name in ("decode_bf16", "decode_int8", "decode_int4", "prefill_bf16", "ttft_turn1", "ttft_turn5",
                 "vision_encode", "peak_rss", "memory_read_bandwidth", "train_samples",
                 "train_samples_feature_cache"):  # fmt: skip
        assert name in names, name
    for r in records:
        assert set(r) >= {"name", "unit", "ours", "reference", "ratio", "bound"}
        assert r["ours"] > 0
        if r["reference"]:
            assert r["ratio"] == pytest.approx(r["ours"] / r["reference"])
    decode = {r["name"]: r for r in records if r["name"].startswith("decode_")}
    assert 0 < decode["decode_bf16"]["bound"] < 1.5
    assert decode["decode_bf16"]["logit_max_abs_diff"] == 0  # our loop and the fused conv: exact
    if "decode_bf16_kernel" in decode:  # opt-in, where the CPU has AVX-512 BF16: the last bits differ
        assert decode["decode_bf16_kernel"]["logit_max_abs_diff"] <= 0.05 * decode["decode_bf16"]["logit_scale"]
    assert decode["decode_int4"]["weight_bytes_per_token"] < decode["decode_int8"]["weight_bytes_per_token"] \
        < decode["decode_bf16"]["weight_bytes_per_token"]  # fmt: skip
    cache = next(r for r in records if r["name"] == "train_samples_feature_cache")
    assert 0 < cache["vision_share"] < 1 and cache["max_ratio"] == pytest.approx(1 / (1 - cache["vision_share"]))
    assert cache["bound"] == pytest.approx(cache["ratio"] / cache["max_ratio"]) and cache["bound_kind"]
    assert decode["decode_bf16"]["bound_kind"] == "memory bandwidth"
    flops = next(r for r in records if r["name"] == "train_model_flops")  # full training: 6 FLOPs per parameter
    assert flops["flops_per_token"] == 6 * sum(p.numel() for p in _tiny_language_model().parameters())
    assert flops["ours"] == pytest.approx(flops["flops_per_token"] * flops["tokens_per_s"] / 1e12)
    assert 0 < flops["bound"] == pytest.approx(flops["ours"] / flops["matmul_peak_tflops"])
    assert "| decode_int8 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 1000


def test_native_resolution_figures_run_against_transformers_lfm2vl():
    """The LFM2-VL shapes' figures: the reference is transformers' own Lfm2Vl with the very weights (its image
    features equal ours), the tiled photo is 7 crops, and the first-token time covers a 1600x1200 photo."""
    from n2eye.bench import lfm2vl_reference, native_resolution_records
    from n2eye.build import build_random
    from n2eye.infer.engine import N2Eye
    from n2eye.vision_inputs import VisionInputs

    model, processor = build_random("tiny-lfm2-vl")
    reference = lfm2vl_reference(model)
    assert type(reference).__name__ == "Lfm2VlForConditionalGeneration"
    assert lfm2vl_reference(build_random("tiny")[0]) is None  # fixed resolution: no Lfm2Vl counterpart
    from PIL import Image

    crops = VisionInputs.of(processor(images=[Image.new("RGB", (1600, 1200), (90, 140, 30))], text="<image>",
                                      return_tensors="pt")).model_kwargs()  # fmt: skip
    with torch.no_grad():
        ours, theirs = model.get_image_features(**crops), reference.get_image_features(**crops).pooler_output
    assert len(ours) == len(theirs) == 7
    assert max((a - b).abs().max().item() for a, b in zip(ours, theirs)) <= 1e-5
    records = {r["name"]: r for r in native_resolution_records(N2Eye(model, processor), reference, repeats=1)}
    assert records["vision_encode_native"]["crops"] == 1 and records["vision_encode_tiles"]["crops"] == 7
    assert records["ttft_1600x1200"]["prompt_tokens"] > 1770
    assert all(r["ours"] > 0 and r["reference"] > 0 for r in records.values())


def test_bench_times_llamacpp_on_the_same_weights():
    """llama.cpp's figures pair our bf16 / int8 / int4 with its BF16 / Q8_0 / Q4_0 (decode and prefill), in the
    same timing loop as ours; what it runs is our model: its greedy tokens are ours (float32 both)."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install 'n2eye[gguf]'")
    from n2eye.bench import (
        BenchConfig,
        decode_records,
        greedy_generate,
        random_decode_setup,
    )
    from n2eye.bench_llamacpp import LlamaCppModels

    model, ids, tokenizer = random_decode_setup("tiny", prompt_tokens=16, with_tokenizer=True)
    cfg = BenchConfig(preset="tiny", new_tokens=4, decode_rounds=1, repeats=1, prompt_tokens=16)
    records = {r["name"]: r for r in decode_records(model, cfg, bandwidth=10.0, tokenizer=tokenizer)}
    pairs = {"bf16": "bf16", "int8": "q8_0", "int4": "q4_0"}
    for ours, theirs in pairs.items():
        for kind in ("decode", "prefill"):
            record = records[f"llamacpp_{kind}_{theirs}"]
            assert record["ours_path"] == ours and record["reference"] > 0 and record["ours"] > 0
            assert record["ratio"] == pytest.approx(record["ours"] / record["reference"])
        assert records[f"llamacpp_decode_{theirs}"]["ours"] == records[f"decode_{ours}"]["ours"]
    assert records["llamacpp_prefill_bf16"]["prompt_tokens"] == 128

    model = model.float()
    llama = LlamaCppModels(model, tokenizer, ["f32"], threads=1)
    try:
        assert llama.generate("f32", ids, 6) == greedy_generate(model, ids, 6)[0][0].tolist()
    finally:
        llama.close()


def _tiny_language_model():
    from n2eye.build import build_random

    return build_random("tiny")[0].model.language_model


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a host without a GPU")
def test_bench_on_cuda_without_a_gpu_says_what_to_do():
    from n2eye.bench import BenchConfig

    with pytest.raises(ValueError, match="sees no CUDA GPU.*--device cpu"):
        BenchConfig(device="cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (benchmarks/gpu/run.sh on a lent one)")
def test_bench_on_cuda_measures_against_the_gpu(tmp_path):
    """`n2eye bench --device cuda`: the CPU-only paths are skipped, decode is put against the GPU's bandwidth,
    training (n2eye train on the GPU, with and without the feature cache) against its matmul rate."""
    from n2eye.bench import BenchConfig, run_bench

    out = tmp_path / "bench.json"
    records = run_bench(BenchConfig(preset="tiny", device="cuda", out=str(out), decode_rounds=2))
    records = {r["name"]: r for r in records}
    assert not {"decode_int8", "decode_int4", "decode_bf16_kernel"} & set(records)
    assert records["decode_bf16"]["ratio"] > 0 and records["decode_bf16"]["bound"] > 0
    assert records["decode_bf16"]["logit_max_abs_diff"] == 0
    assert records["train_model_flops"]["bound"] > 0 and records["train_samples_feature_cache"]["ratio"] > 0
    assert records["peak_gpu_memory"]["ours"] > 0 and torch.cuda.get_device_name(0) in records["peak_rss"]["machine"]


def test_bench_refuses_a_folder_as_out(tmp_path):
    result = subprocess.run([sys.executable, "-m", "n2eye.cli", "bench", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "folder" in result.stderr


def test_load_with_int4_chats(tiny_checkpoint):
    import n2eye
    from n2eye.infer.quantize import Int4Linear

    eye = n2eye.load(tiny_checkpoint, quantize="int4")
    layers = [m for m in eye.model.model.language_model.modules() if isinstance(m, Int4Linear)]
    assert layers and eye.model.n2eye_quantization["quantized"] == len(layers) + isinstance(eye.model.lm_head, Int4Linear)
    from n2eye.kernels import unavailable_reason

    if not unavailable_reason():  # the fused short conv runs on the quantized layers too
        assert any(type(m).__name__ == "FastShortConv" for m in eye.model.modules())
    answer = eye.chat([{"role": "user", "content": "Hello"}], max_new_tokens=4, temperature=0)
    assert isinstance(answer, str)


def _bf16_kernel_or_skip():
    from n2eye.infer.fast_decode import bf16_decode_kernels

    kernels = bf16_decode_kernels()
    if kernels is None:
        pytest.skip("this CPU has no AVX-512 BF16 (or the kernels can't be built)")
    return kernels


@pytest.mark.parametrize("rows, in_features", [(1, 2048), (3, 96), (8, 200)])  # 96, 200: the tails past 128 / 32
def test_bf16_kernel_rounds_to_what_pytorch_linear_gives(rows, in_features):
    kernels = _bf16_kernel_or_skip()
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(1000, in_features, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, in_features, generator=g).to(torch.bfloat16)
    ours = kernels.bf16_gemv(x, w)
    exact = x.double() @ w.double().T
    assert ours.dtype == torch.float32 and ours.shape == (rows, 1000)
    assert (ours.double() - exact).abs().max() < 1e-4 * exact.abs().max()  # fp32 accumulation, not bf16
    stock = nn.functional.linear(x, w).float()
    same = (ours.to(torch.bfloat16).float() == stock).float().mean()
    step = stock.abs().clamp(min=1e-3) * 2**-7  # one bf16 step (8 significant bits)
    assert same > 0.9 and ((ours.to(torch.bfloat16).float() - stock).abs() <= step).all()


def test_bf16_decode_kernel_keeps_weights_ties_and_greedy_tokens(tiny_checkpoint):
    from n2eye.bench import greedy_generate
    from n2eye.infer.fast_decode import Bf16DecodeLinear, use_bf16_decode_kernel
    from n2eye.modeling.modeling_n2eye import N2EyeForConditionalGeneration

    _bf16_kernel_or_skip()
    model = _spread_weights(N2EyeForConditionalGeneration.from_pretrained(tiny_checkpoint)).to(torch.bfloat16).eval()
    ids = torch.randint(20, model.config.text_config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(2))
    ref, _ = greedy_generate(model, ids, 24)
    keys = list(model.state_dict())
    assert use_bf16_decode_kernel(model) > 0
    assert isinstance(model.lm_head, Bf16DecodeLinear)
    assert model.lm_head.weight is model.get_input_embeddings().weight  # the tie survives
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, Bf16DecodeLinear) for m in model.model.vision_tower.modules())
    ours, _ = greedy_generate(model, ids, 24)
    assert len(set(ref[0].tolist())) > 3 and torch.equal(ours, ref)


def test_load_runs_the_bf16_kernel_only_when_asked(tiny_checkpoint):
    import n2eye
    from n2eye.infer.fast_decode import Bf16DecodeLinear

    _bf16_kernel_or_skip()
    fast = n2eye.load(tiny_checkpoint, dtype=torch.bfloat16, bf16_kernel=True)
    assert isinstance(fast.model.lm_head, Bf16DecodeLinear)
    assert isinstance(fast.chat([{"role": "user", "content": "Hello"}], max_new_tokens=4, temperature=0), str)
    default = n2eye.load(tiny_checkpoint, dtype=torch.bfloat16)  # exact paths only by default
    assert not any(isinstance(m, Bf16DecodeLinear) for m in default.model.modules())
    assert any(type(m).__name__ == "FastShortConv" for m in default.model.modules())
    plain = n2eye.load(tiny_checkpoint, bf16_kernel=True)  # a float32 checkpoint: nothing for the bf16 kernel
    assert not any(isinstance(m, Bf16DecodeLinear) for m in plain.model.modules())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_short_conv_decode_gives_transformers_tokens_and_conv_states(tiny_checkpoint, dtype, monkeypatch):
    from n2eye.bench import greedy_generate
    from n2eye.infer import fast_decode
    from n2eye.infer.fast_decode import use_fast_short_conv
    from n2eye.kernels import unavailable_reason
    from n2eye.modeling.modeling_n2eye import N2EyeForConditionalGeneration

    if unavailable_reason():
        pytest.skip(f"fast kernels unavailable: {unavailable_reason()}")
    model = _spread_weights(N2EyeForConditionalGeneration.from_pretrained(tiny_checkpoint)).to(dtype).eval()
    ids = torch.randint(20, model.config.text_config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3))
    ref, ref_cache = greedy_generate(model, ids, 24)
    with torch.inference_mode():
        ref_generate = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                      min_new_tokens=24, do_sample=False, repetition_penalty=1.0)[:, 16:]  # fmt: skip
    keys = list(model.state_dict())
    stock = copy.deepcopy(model)
    assert use_fast_short_conv(model) == model.config.text_config.layer_types.count("conv")
    kernels, calls = fast_decode._kernels(), []

    class Counting:  # proves the fused kernel ran (and did not fall back to transformers' path)
        def short_conv_decode(self, *args):
            calls.append(1)
            return kernels.short_conv_decode(*args)

    monkeypatch.setattr(fast_decode, "_kernels", Counting)
    assert list(model.state_dict()) == keys
    ours, cache = greedy_generate(model, ids, 24)
    with torch.inference_mode():
        ours_generate = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                       min_new_tokens=24, do_sample=False, repetition_penalty=1.0)[:, 16:]  # fmt: skip
    assert len(set(ref[0].tolist())) > 3 and torch.equal(ours, ref) and torch.equal(ours_generate, ref_generate)
    assert len(calls) == 2 * 23 * len([t for t in model.config.text_config.layer_types if t == "conv"])
    conv_layers = [i for i, t in enumerate(model.config.text_config.layer_types) if t == "conv"]
    for i in conv_layers:  # the cache the next turn continues from is the same state, bit for bit
        assert torch.equal(cache.get_conv_state(i, state_idx=0), ref_cache.get_conv_state(i, state_idx=0))
    with torch.inference_mode():  # and one decode step's logits are the same bits
        step = model(input_ids=ours[:, -1:], past_key_values=cache, use_cache=True).logits
        ref_step = stock(input_ids=ours[:, -1:], past_key_values=ref_cache, use_cache=True).logits
    assert torch.equal(step, ref_step)


def _run_benchmark_script(name: str, tmp_path: Path, *args: str, short=("--new-tokens", "8", "--rounds", "1")):
    """Runs `python benchmarks/<name>.py` on the tiny preset as benchmarks/README documents it, with `short`
    settings; returns its JSON."""
    root = Path(__file__).resolve().parents[1]
    assert f"python benchmarks/{name}.py" in (root / "benchmarks" / "README.md").read_text()
    out = tmp_path / f"{name}.json"
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / f"{name}.py"), "--preset", "tiny", *short, *args, "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow  # subprocess-heavy: CI's second tier (pytest -m slow)
def test_decode_pieces_benchmark_runs_as_documented(tmp_path):
    """`python benchmarks/decode_pieces.py`: every piece timed, the exact fused conv's greedy tokens as PyTorch's."""
    result = _run_benchmark_script("decode_pieces", tmp_path)
    for name in ("pytorch_kernels", "fused_short_conv", "bf16_kernel", "both"):
        assert result[f"{name}_tokens_per_s"] > 0
    assert result["pytorch_kernels_speedup"] == 1.0 and result["fused_short_conv_same_tokens"] is True


@pytest.mark.slow  # subprocess-heavy: CI's second tier (pytest -m slow)
def test_compile_decode_benchmark_runs_as_documented(tmp_path):
    """`python benchmarks/compile_decode.py` (its two compiles take ~50 s each on the tiny preset); transformers'
    StaticCache in our loop decodes the same greedy tokens as the dynamic cache."""
    result = _run_benchmark_script("compile_decode", tmp_path)
    assert result["compile_s"] > 0 and result["compile_static_cache_s"] > 0 and result["pytorch_kernels_speedup"] == 1.0
    assert result["compiled_tokens_per_s"] > 0 and result["compiled_static_cache_tokens_per_s"] > 0
    assert result["fast_paths_same_tokens"] is True and result["static_cache_same_tokens"] is True


def test_gpu_wheel_list_pins_what_training_needs_and_leaves_torch_to_the_gpu_image():
    """benchmarks/gpu/wheels.py: what travels to a GPU machine that reaches no index (benchmarks/gpu/run.sh)."""
    import importlib.util
    from importlib import metadata

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu" / "wheels.py"
    spec = importlib.util.spec_from_file_location("gpu_wheels", path)
    wheels = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wheels)
    pinned = wheels.closure()
    for name in ("transformers", "datasets", "peft", "accelerate", "tokenizers", "huggingface-hub", "dill"):
        assert pinned[name] == metadata.version(name), name
    assert not {"torch", "numpy", "pyarrow", "sympy", "networkx"} & set(pinned)  # torch's own needs stay too
    assert not [name for name in pinned if name.startswith("nvidia")]


@pytest.mark.slow  # subprocess-heavy: CI's second tier (pytest -m slow)
def test_fetch_wheels_downloads_one_python_312_wheel_per_pinned_package(tmp_path):
    """`bash benchmarks/gpu/fetch_wheels.sh` (benchmarks/README): everything it lists, small enough to travel."""
    root = Path(__file__).resolve().parents[1]
    assert "bash benchmarks/gpu/fetch_wheels.sh" in (root / "benchmarks" / "README.md").read_text()
    python_first = f"{Path(sys.executable).parent}:{os.environ['PATH']}"  # the `python` of this venv
    env = {**os.environ, "WHEELS_DIR": str(tmp_path / "whl"), "PATH": python_first}
    done = subprocess.run(["bash", str(root / "benchmarks" / "gpu" / "fetch_wheels.sh")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    if done.returncode != 0 and re.search(r"(?i)connection|resolve|network|No matching distribution", done.stderr):
        pytest.skip(f"no package index reachable: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-2000:]
    wheels = sorted((tmp_path / "whl").glob("*.whl"))
    pinned = (tmp_path / "whl" / "requirements.txt").read_text().split()
    assert len(wheels) == len(pinned)
    for requirement in pinned:
        name, version = requirement.split("==")
        stem = re.sub(r"[-_.]+", "_", name).lower()
        assert any(w.name.lower().startswith(f"{stem}-{version}-") for w in wheels), requirement
    assert all(re.search(r"-(py3|py2.py3|py312|cp312|cp3\d*-abi3)-", w.name) for w in wheels)
    assert sum(w.stat().st_size for w in wheels) < 48 * 2**20  # the device tool carries 64 MiB with the repo


@pytest.mark.slow  # subprocess-heavy: CI's second tier (pytest -m slow)
def test_prefill_llamacpp_benchmark_runs_as_documented(tmp_path):
    """`python benchmarks/prefill_llamacpp.py`: our three prefill paths against llama.cpp's three formats."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install 'n2eye[gguf]'")
    result = _run_benchmark_script("prefill_llamacpp", tmp_path, short=("--tokens", "64", "--repeats", "1"))
    records = {r["name"]: r for r in result}
    assert sorted(records) == ["llamacpp_prefill_bf16", "llamacpp_prefill_q4_0", "llamacpp_prefill_q8_0"]
    assert all(r["ours"] > 0 and r["reference"] > 0 and r["prompt_tokens"] == 64 for r in records.values())


@pytest.mark.slow  # subprocess-heavy: CI's second tier (pytest -m slow)
def test_profile_decode_benchmark_runs_as_documented(tmp_path):
    """`python benchmarks/profile_decode.py`: a token's time split for each of our paths, llama.cpp's eval time."""
    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python: pip install 'n2eye[gguf]'")
    result = _run_benchmark_script("profile_decode", tmp_path, short=("--new-tokens", "4", "--repeats", "1"))
    for r in result["ours"].values():  # every path's linears take time (the quantized ones were missed once)
        assert r["generate_ms"] > 0 and r["forward_ms"] > 0 and 0 < r["linears_read_share"] < 5
        assert r["nonlinear_ms"] == pytest.approx(r["forward_ms"] - r["linears_ms"])
    assert set(result["llamacpp"]) == {"bf16", "q8_0", "q4_0"}
    assert all(r["eval_ms"] > 0 and r["n_eval"] >= 3 for r in result["llamacpp"].values())
