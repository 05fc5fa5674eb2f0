"""Fast inference pieces: weight-only int8/int4 linears, the greedy decode loop, and `n2eye bench`."""

from __future__ import annotations

import json
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


def test_greedy_decode_equals_generate_and_int8_stays_close(tiny_checkpoint):
    from n2eye.infer.decode import greedy_decode
    from n2eye.infer.quantize import quantize_language_model
    from n2eye.modeling.modeling_n2eye import N2EyeForConditionalGeneration

    model = _spread_weights(N2EyeForConditionalGeneration.from_pretrained(tiny_checkpoint).eval())
    ids = torch.randint(20, model.config.text_config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, min_new_tokens=20,
                             do_sample=False, repetition_penalty=1.0)[:, 24:]  # fmt: skip
    ours, cache = greedy_decode(model, ids, 20)
    assert len(set(ref[0].tolist())) > 3, "the test model must not repeat one token"
    assert torch.equal(ours, ref)
    assert cache.get_seq_length() == 24 + 19  # the last token is returned, not yet run
    with torch.inference_mode():
        full = model(input_ids=ids).logits[0, -1]
    quantize_language_model(model, "int8")
    with torch.inference_mode():
        q = model(input_ids=ids).logits[0, -1]
    assert (q - full).abs().max() < 0.05 * full.abs().max()


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
    assert decode["decode_bf16"]["logit_max_abs_diff"] == 0
    assert decode["decode_int4"]["weight_bytes_per_token"] < decode["decode_int8"]["weight_bytes_per_token"] \
        < decode["decode_bf16"]["weight_bytes_per_token"]  # fmt: skip
    assert "| decode_int8 |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 1000


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
    answer = eye.chat([{"role": "user", "content": "Hello"}], max_new_tokens=4, temperature=0)
    assert isinstance(answer, str)
