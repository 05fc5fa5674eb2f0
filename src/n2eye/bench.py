"""`n2eye bench`: inference and training figures side by side with their references, in one run, on one machine.

Every record is `{"name", "unit", "ours", "reference", "ratio", "bound"}` (ratio = ours / reference, higher is
better for rates, `ratio` < 1 is better for times, see `unit`). `bound` is the share of its own limit a figure
reaches, named by `bound_kind`: for decode, of the machine's measured memory read bandwidth (weights read per
token x tokens/s); for the feature cache, of the most any cache can give (Amdahl: the frozen vision tower's share
of a step); for training, of the measured bf16 matmul rate. Decode records also give `logit_max_abs_diff` against
bf16 for the quantized paths. The models are random-init at the preset's exact shapes (no download): `tiny` in
seconds, `n2eye-1.3b` (LFM2-1.2B + so400m shapes) in minutes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import bench_llamacpp as llamacpp
from .infer.fast_decode import use_fast_decode
from .infer.quantize import Int4Linear, Int8Linear, quantize_language_model
from .vision_inputs import VisionInputs


@dataclass
class BenchConfig:
    """Options of `n2eye bench`."""

    out: str = "bench.json"
    """Result JSON (a list of records); the markdown table and the PNG chart go beside it."""
    preset: str = "tiny"
    """Model shapes (random init, no download): tiny, n2eye-1.3b, or the LFM2-VL ones (tiny-lfm2-vl, lfm2-vl-450m,
    lfm2-vl-1.6b: native resolution and tiles, measured against transformers' own Lfm2Vl on the same weights)."""
    new_tokens: int = 32
    """Tokens generated per decode measurement."""
    prompt_tokens: int = 64
    """Prompt length for the decode figures (the prefill figure uses 8x this)."""
    repeats: int = 3
    """Timed repetitions per figure (the best is kept)."""
    decode_rounds: int = 6
    """Rounds of the alternating decode timing (best of each kept; noisy hosts need several)."""
    quantize: str = "int8,int4"
    """Quantized decode paths to measure (comma-separated; empty for none)."""
    threads: int = 0
    """torch threads (0: all cores)."""
    train_steps: int | None = None
    """Optimizer steps per training figure (default: 30 on tiny, 4 on n2eye-1.3b, 10 there on a GPU; 0: skip)."""
    llamacpp: bool = True
    """Also time llama.cpp (llama-cpp-python, the [gguf] extra) on the same weights exported to GGUF: decode BF16 /
    Q8_0 / Q4_0 against our bf16 / int8 / int4, and prefill; skipped with a note where it isn't installed."""
    device: str = "cpu"
    """Where the model runs: cpu, or cuda (decode against the GPU's measured memory bandwidth, training against
    its measured bf16 matmul rate; the CPU-only paths, our kernels and int8/int4, are skipped there)."""

    def __post_init__(self):
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {self.device}: PyTorch sees no CUDA GPU here (torch.cuda.is_available() "
                             "is False); run on a GPU host with a CUDA build of torch, or use --device cpu.")  # fmt: skip


# How each preset's training figures train. At the 1.3B shapes full fine-tuning needs ~26 GB (float32 weights,
# gradients and AdamW states), more than a 24 GiB CPU host: LoRA on the LM with the projector fully trained (the
# Idefics2 card's option) in the recipe's bf16 autocast, one CRAG-MM session per step. The tiny preset trains
# fully in float32 (autocast only adds casts at hidden 64).
# On a GPU the 1.3B figure runs the N2-Eye card's recipe itself: full fine-tuning, batch 2, bf16, gradient
# checkpointing.
TRAIN_SETTINGS: dict[str, dict[str, Any]] = {
    "tiny": {"train": "full", "batch_size": 8, "steps": 30, "bf16": False, "sessions": 96},
    "tiny-lfm2-vl": {"train": "full", "batch_size": 8, "steps": 30, "bf16": False, "sessions": 96},
    "n2eye-1.3b": {"train": "lora", "batch_size": 1, "steps": 4, "bf16": True, "sessions": 4},
    "lfm2-vl-450m": {"train": "lora", "batch_size": 1, "steps": 4, "bf16": True, "sessions": 4},
    "lfm2-vl-1.6b": {"train": "lora", "batch_size": 1, "steps": 4, "bf16": True, "sessions": 4},
    "n2eye-1.3b@cuda": {"train": "full", "batch_size": 2, "steps": 10, "bf16": True, "sessions": 20,
                        "gradient_checkpointing": True},
}


def train_settings(preset: str, device: str) -> dict[str, Any]:
    """How the preset's training figures train on this device (see TRAIN_SETTINGS)."""
    kind = torch.device(device).type
    return TRAIN_SETTINGS.get(f"{preset}@{kind}", TRAIN_SETTINGS[preset])


def synchronize(device: str | torch.device) -> None:
    """Waits for queued GPU work, so a timer stops when the work is done (a no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _best(fn, repeats: int, device: str | torch.device = "cpu") -> float:
    fn()  # warm-up (allocations, lazy init)
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def memory_read_bandwidth(gib: float = 1.0, repeats: int = 5, device: str | torch.device = "cpu") -> float:
    """GB/s of a streaming read (sum over a float32 buffer far larger than the caches), best of `repeats`."""
    x = torch.ones(int(gib * 2**30 // 4), dtype=torch.float32, device=device)
    seconds = _best(lambda: x.sum(), repeats, device)
    return x.numel() * 4 / seconds / 1e9


def matmul_flops(device: str | torch.device = "cpu", repeats: int = 3) -> float:
    """FLOP/s of a large bf16 matrix product on the device, best of `repeats`: the measured peak that training
    throughput is compared with (model FLOPs utilisation against what this machine can do, not a data sheet)."""
    n = 8192 if torch.device(device).type == "cuda" else 2048
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    return 2 * n**3 / _best(lambda: a @ b, repeats, device)


def weight_bytes_per_token(model) -> int:
    """Bytes of LM weights one decode step reads: every linear layer of the LM and the output head."""
    root = getattr(model, "language_model", model)  # N2-Eye: the LFM2 body; a plain LM: itself
    modules = list(root.modules())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and all(head is not m for m in modules):
        modules.append(head)
    total = 0
    for m in modules:
        if isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif isinstance(m, (Int8Linear, Int4Linear)):
            total += sum(b.numel() * b.element_size() for b in m.buffers())
    return total


def _record(name: str, unit: str, ours: float, reference: float | None, **extra: Any) -> dict[str, Any]:
    ratio = ours / reference if reference else None
    return {"name": name, "unit": unit, "ours": ours, "reference": reference, "ratio": ratio, "bound": None, **extra}


def greedy_generate(model, ids: torch.Tensor, n: int, cache=None) -> tuple[torch.Tensor, Any]:
    """n greedy tokens through transformers' `generate`, the loop `n2eye.load(...).chat` runs (what ours and the
    reference both time; they differ in the modules the model runs). Returns (new ids [1, n], the cache)."""
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, repetition_penalty=1.0, past_key_values=cache,
                             return_dict_in_generate=True)  # fmt: skip
    return out.sequences[:, ids.shape[1] :], out.past_key_values


def _last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of the prompt's last token run as a decode step (the rest prefilled into a cache first), so the
    decode-only paths (our kernels, the fused short conv) are the ones compared."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    n = ids.shape[1]
    with torch.inference_mode():
        model(input_ids=ids[:, :-1], past_key_values=cache, use_cache=True, logits_to_keep=1)
        out = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True,
                    position_ids=torch.tensor([[n - 1]], device=ids.device))  # fmt: skip
    return out.logits[0, -1].float()


def random_decode_setup(preset: str, prompt_tokens: int = 64, with_tokenizer: bool = False) -> tuple:
    """The preset's random-init model in bf16 (eval) and a seeded random prompt: what the decode figures time;
    `with_tokenizer`: also its tokenizer (what llama.cpp's GGUF needs), from the same build."""
    from .build import build_random

    model, processor = build_random(preset)
    model = model.to(torch.bfloat16).eval()
    torch.manual_seed(0)
    ids = torch.randint(20, model.config.text_config.vocab_size, (1, prompt_tokens))
    return (model, ids, processor.tokenizer) if with_tokenizer else (model, ids)


def weight_sharing_copy(model):
    """A copy of the model's modules that shares its parameters and buffers: variants that swap modules (fast
    paths, quantized layers) without a second copy of the weights in memory."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return copy.deepcopy(model, memo)


def paired_decode_rates(generators: dict[str, Any], n: int, repeats: int,
                        device: str | torch.device = "cpu") -> dict[str, float]:  # fmt: skip
    """tokens/s of each `generator(k)` (k new tokens), all timed in alternation round after round, so a noisy
    host slows each alike: (n - 1) tokens over its best n-token time minus its best 1-token time (no prefill)."""
    best = {name: [math.inf, math.inf] for name in generators}
    for generate in generators.values():
        generate(1)  # warm-up (allocations, lazy init, kernel build)
    synchronize(device)
    for _ in range(repeats):
        for name, generate in generators.items():
            for slot, k in enumerate((n, 1)):
                start = time.perf_counter()
                generate(k)
                synchronize(device)
                best[name][slot] = min(best[name][slot], time.perf_counter() - start)
    return {name: (n - 1) / max(1e-9, full - one) for name, (full, one) in best.items()}


def decode_records(model, cfg: BenchConfig, bandwidth: float, tokenizer=None) -> list[dict[str, Any]]:
    """decode_bf16 (what `n2eye.load` runs for bf16: `generate` on the exact fused short conv), decode_bf16_kernel
    (+ the opt-in bf16 kernel) and decode_int8/int4 (quantized weights), each against plain transformers
    `generate` in bf16 on the same weights (one loop for all: `greedy_generate`, the one users run), all timed in alternation in one loop, with the logit difference of
    one decode step against bf16. The bandwidth is measured again after the loop and the best is the bound."""
    torch.manual_seed(0)
    vocab = model.config.text_config.vocab_size
    ids = torch.randint(20, vocab, (1, cfg.prompt_tokens)).to(cfg.device)
    base_logits = _last_logits(model, ids)
    variants: dict[str, Any] = {}
    on_cpu = torch.device(cfg.device).type == "cpu"
    for bits in ["bf16", "bf16_kernel"] + [b.strip() for b in cfg.quantize.split(",") if b.strip()]:
        if bits != "bf16" and not on_cpu:
            print(f"  decode_{bits}: a CPU path (our kernels, weight-only int8/int4); skipped on {cfg.device}")
            continue
        variant = weight_sharing_copy(model)
        if bits.startswith("int"):
            quantize_language_model(variant, bits)
        # what n2eye.load runs: the exact fused short conv; decode_bf16_kernel adds the opt-in bf16 kernel
        fast = use_fast_decode(variant, bf16_kernel=bits == "bf16_kernel")
        if bits == "bf16_kernel" and not fast["bf16_linear"]:
            print("  decode_bf16_kernel: no AVX-512 BF16 kernel on this CPU; skipped")
            continue
        variants[bits] = variant
    generators = {"reference": lambda k: greedy_generate(model, ids, k)}
    generators.update({bits: (lambda k, v=v: greedy_generate(v, ids, k)) for bits, v in variants.items()})
    llama = _llamacpp_models(model, tokenizer, cfg, [bits for bits in variants if bits in llamacpp.PAIRS])
    if llama is not None:  # llama.cpp on the same weights, timed in the same alternation
        generators.update({f"llamacpp_{q}": (lambda k, q=q: llama.generate(q, ids, k)) for q in llama.models})
    try:
        rates = paired_decode_rates(generators, cfg.new_tokens, cfg.decode_rounds, cfg.device)
        bandwidth = max(bandwidth, memory_read_bandwidth(device=cfg.device))
        records = _decode_figures(variants, rates, ids, base_logits, bandwidth)
        if llama is not None:
            records += [_record(f"llamacpp_decode_{q}", "tokens/s", rates[bits], rates[f"llamacpp_{q}"], ours_path=bits)
                        for bits, q in llamacpp.PAIRS.items() if q in llama.models]  # fmt: skip
            torch.manual_seed(1)
            long_ids = torch.randint(20, vocab, (1, cfg.prompt_tokens * 8))
            paired = {bits: variants[bits] for bits in llamacpp.PAIRS if bits in variants}
            records += llamacpp.prefill_records(paired, llama, long_ids, cfg.repeats)
    finally:
        if llama is not None:
            llama.close()
    variants.clear()
    return records


def _llamacpp_models(model, tokenizer, cfg: BenchConfig, ours: list[str]):
    """llama.cpp with this model's language model (and `tokenizer`, the GGUF's vocabulary) in the formats matching
    `ours`, or None (said why)."""
    if not cfg.llamacpp or torch.device(cfg.device).type != "cpu" or not ours:
        return None
    why = llamacpp.available() or (None if tokenizer is not None else "no tokenizer was given for the GGUF vocabulary")
    if why:
        print(f"  llama.cpp figures skipped: {why}")
        return None
    quants = [llamacpp.PAIRS[bits] for bits in ours]
    print(f"  llama.cpp: {', '.join(q.upper() for q in quants)} on the same weights, {torch.get_num_threads()} threads")
    return llamacpp.LlamaCppModels(model, tokenizer, quants, threads=torch.get_num_threads())


def _decode_figures(variants: dict, rates: dict, ids: torch.Tensor, base_logits: torch.Tensor,
                    bandwidth: float) -> list[dict[str, Any]]:  # fmt: skip
    """Our decode records: rate against plain transformers, share of the memory bandwidth, logit difference."""
    records = []
    for bits, variant in variants.items():
        bytes_per_token = weight_bytes_per_token(variant)
        record = _record(f"decode_{bits}", "tokens/s", rates[bits], rates["reference"])
        record["bound"] = rates[bits] * bytes_per_token / 1e9 / bandwidth
        record["bound_kind"] = "memory bandwidth"
        record["bandwidth_gb_s"] = bandwidth
        record["weight_bytes_per_token"] = bytes_per_token
        record["logit_max_abs_diff"] = float((_last_logits(variant, ids) - base_logits).abs().max())
        record["logit_scale"] = float(base_logits.abs().max())
        records.append(record)
    return records


def prefill_record(model, cfg: BenchConfig) -> dict[str, Any]:
    """Prompt tokens/s: our prefill (logits of the last position only) against a plain forward."""
    torch.manual_seed(1)
    ids = torch.randint(20, model.config.text_config.vocab_size, (1, cfg.prompt_tokens * 8)).to(cfg.device)

    def ours():
        with torch.inference_mode():
            model(input_ids=ids, logits_to_keep=1)

    def reference():
        with torch.inference_mode():
            model(input_ids=ids)

    n = ids.shape[1]
    return _record("prefill_bf16", "tokens/s", n / _best(ours, cfg.repeats, cfg.device),
                   n / _best(reference, cfg.repeats, cfg.device))  # fmt: skip


def _example_image(size: int = 384):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    draw.ellipse((20, 20, size // 2, size // 2), fill=(220, 40, 40))
    draw.rectangle((size // 2, size // 2, size - 20, size - 20), fill=(40, 90, 220))
    return image


def ttft_records(engine, turns: int = 5, reference_model=None) -> list[dict[str, Any]]:
    """Time to first token of each turn of a 5-turn image chat: our cached session (only the new turn runs)
    against a plain transformers re-prefill of the whole conversation with the image encoded again (by our model's
    `generate`, or `reference_model`'s: transformers' own Lfm2Vl on the same weights for LFM2-VL shapes)."""
    reference_model = reference_model or engine.model
    image = _example_image()
    questions = ["What do you see?", "What colour is the circle?", "And the square?", "Which is bigger?",
                 "Where is the circle?"][:turns]  # fmt: skip
    warm = engine.session()  # first calls pay one-off costs (allocations, lazy init); not a turn's figure
    warm.send([{"type": "image", "image": image}, {"type": "text", "text": "Hi"}], max_new_tokens=1, temperature=0)
    session = engine.session()
    records = []
    for i, question in enumerate(questions, start=1):
        content = [{"type": "image", "image": image}, {"type": "text", "text": question}] if i == 1 else question
        start = time.perf_counter()
        session.send(content, max_new_tokens=1, temperature=0)
        ours = time.perf_counter() - start
        history = session.messages[:-1]  # the conversation up to this turn's question
        start = time.perf_counter()
        inputs = engine.processor.apply_chat_template(history, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True, return_tensors="pt")  # fmt: skip
        inputs.pop("assistant_masks", None)
        with torch.inference_mode():
            reference_model.generate(**inputs.to(engine.model.device), max_new_tokens=1, do_sample=False)
        synchronize(engine.model.device)
        reference = time.perf_counter() - start
        records.append(_record(f"ttft_turn{i}", "s", ours, reference, prompt_tokens=int(inputs["input_ids"].shape[1])))
    return records


def native_resolution_records(engine, reference_model, repeats: int) -> list[dict[str, Any]]:
    """LFM2-VL shapes (SigLIP2 NaFlex, tiles): vision encode of one image at native resolution (448x336, one crop)
    and of a 1600x1200 photo (6 tiles of 512 px + a thumbnail), and the time to first token of a one-turn chat
    about that photo, processor included. Reference: transformers' `Lfm2VlForConditionalGeneration` on the same
    weights and the same processor output (token for token transformers' Lfm2VlProcessor's)."""
    device = engine.model.device
    records = []
    for name, size in (("vision_encode_native", (448, 336)), ("vision_encode_tiles", (1600, 1200))):
        image = _example_image().resize(size)
        crops = engine.processor(images=[image], text="<image>", return_tensors="pt")
        inputs = {k: crops[k].to(device) for k in ("pixel_values", "spatial_shapes", "pixel_attention_mask")}

        def ours(inputs=inputs):
            engine.vision_cache.items.clear()  # a new image each time, as in a new chat
            with torch.inference_mode():
                engine.model.model.project_grids(engine.vision_cache.grids(VisionInputs.of(inputs)))

        def reference(inputs=inputs):
            with torch.inference_mode():
                reference_model.get_image_features(**inputs)

        records.append(_record(name, "images/s", 1 / _best(ours, repeats, device), 1 / _best(reference, repeats, device),
                               crops=int(inputs["pixel_values"].shape[0]), image_size=list(size)))  # fmt: skip
    photo = _example_image().resize((1600, 1200))
    content = [{"type": "image", "image": photo}, {"type": "text", "text": "What is in this photo?"}]

    def ours_ttft():
        engine.vision_cache.items.clear()
        engine.session().send(content, max_new_tokens=1, temperature=0)

    def reference_ttft():
        inputs = engine.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                                      tokenize=True, return_dict=True, return_tensors="pt")  # fmt: skip
        inputs.pop("assistant_masks", None)
        with torch.inference_mode():
            reference_model.generate(**inputs.to(device), max_new_tokens=1, do_sample=False)

    ours_ttft()  # one-off costs (allocations, lazy init) are not a turn's figure
    prompt = engine.count_prompt_tokens([{"role": "user", "content": content}])
    records.append(_record("ttft_1600x1200", "s", _best(ours_ttft, repeats, device),
                           _best(reference_ttft, repeats, device), prompt_tokens=prompt))  # fmt: skip
    return records


def lfm2vl_reference(model):
    """transformers' own Lfm2Vl with this model's weights (same dtype and device), or None when the model is not
    of Lfm2Vl shape (fixed-resolution encoder or MLP projector)."""
    from transformers import Lfm2VlForConditionalGeneration

    from .convert.lfm2vl import lfm2vl_config_from_n2eye

    config = model.config
    if config.vision_config.model_type != "siglip2_vision_model" or config.projector_type != "pixel_unshuffle_mlp":
        return None
    reference = Lfm2VlForConditionalGeneration(lfm2vl_config_from_n2eye(config))
    reference.load_state_dict(model.state_dict(), strict=True)
    reference.generation_config = copy.deepcopy(model.generation_config)
    return reference.to(device=model.device, dtype=model.dtype).eval()


def vision_record(engine, repeats: int) -> dict[str, Any]:
    """Images/s through the vision tower + projector (ours: the engine's encode on new images; reference: the
    model's get_image_features)."""
    pixels = engine.processor.image_processor(images=[_example_image()], return_tensors="pt")["pixel_values"]

    def ours():
        engine.vision_cache.items.clear()  # a new image each time, as in a new chat
        with torch.inference_mode():
            engine.vision_cache.grids(pixels)

    def reference():
        with torch.inference_mode():
            engine.model.get_image_features(pixels.to(engine.model.device))

    device = engine.model.device
    return _record("vision_encode", "images/s", 1 / _best(ours, repeats, device), 1 / _best(reference, repeats, device))


def vision_seconds_per_image(model, processor, bf16: bool, repeats: int) -> float:
    """The frozen vision tower's forward for one image as a training step runs it (float32 weights, bf16
    autocast when the run trains in bf16, no gradients): the work the feature cache takes out of each step."""
    tower = model.model.vision_tower
    dtype, device = tower.dtype, model.device
    # the shapes world's 96 px pictures: at native resolution they stay small (64 tokens), fixed ones are resized
    image = _example_image(96 if getattr(processor, "image_policy", None) else 384)
    crops = VisionInputs.of(processor(images=[image], text="<image>", return_tensors="pt")).model_kwargs(device)
    tower.float()  # as `n2eye train` loads it; bf16 -> float32 -> bf16 below is exact
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            return _best(lambda: model.model.encode_images(**crops), repeats, device)
    finally:
        tower.to(dtype)


def write_shapes_world(out_dir: Path, sessions: int, heldout: int, seed: int = 0, size: int = 96) -> dict[str, Any]:
    """The demo's shapes world (the same sessions as `n2eye demo` writes at `seed`), written by the demo's own
    writer in a process of its own, as `n2eye train` is run below: nothing outside `n2eye.demo` imports it.
    Returns the written paths (`{"train": {"cragmm": ..., "messages": ...}, "heldout": {...}, "manifest": ...}`)."""
    command = [sys.executable, "-m", "n2eye.demo.writers", str(out_dir), "--sessions", str(sessions),
               "--heldout", str(heldout), "--seed", str(seed), "--size", str(size)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"training figure: `{' '.join(command)}` failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def train_records(model, processor, cfg: BenchConfig, work: Path) -> list[dict[str, Any]]:
    """Training samples/s through `n2eye train` (frozen vision), without and with the frozen-vision feature cache
    (warm: filled by an untimed first run, as in a second epoch or a second run), and the most a cache could give:
    1 / (1 - the vision tower's share of a step without it)."""
    from .checkpoint import default_generation_config, save_checkpoint

    settings = train_settings(cfg.preset, cfg.device)
    steps = cfg.train_steps or settings["steps"]
    batch = settings["batch_size"]
    checkpoint = work / "model"
    save_checkpoint(model, processor, checkpoint, default_generation_config(processor.tokenizer))
    # the cache is filled for the whole dataset before a run: at the 1.3B shapes only the sessions it trains on
    written = write_shapes_world(work / "data", settings["sessions"], 8)
    spec = ",".join(str(p) for p in written["train"].values() if p)

    def run(name: str, cache: bool) -> tuple[float, float]:
        """`n2eye train` in its own process, as a user runs it (and so each run's memory goes back when it ends);
        samples over the Trainer's own train_runtime (its optimisation loop only: not loading, encoding, saving;
        its train_samples_per_second is rounded to 3 decimals, too coarse at the 1.3B shapes)."""
        flags = {"--model": checkpoint, "--data": spec, "--out": work / name, "--train": settings["train"],
                 "--max-steps": steps, "--batch-size": batch, "--grad-accum": 1, "--logging-steps": steps,
                 "--feature-cache-dir": work / "features"}  # fmt: skip
        switches = ["--bf16" if settings["bf16"] else "--no-bf16",
                    "--" + ("" if settings.get("gradient_checkpointing") else "no-") + "gradient-checkpointing",
                    "--feature-cache" if cache else "--no-feature-cache"]  # fmt: skip
        command = [sys.executable, "-m", "n2eye.cli", "train", *switches]
        command += [str(part) for pair in flags.items() for part in pair]
        env = dict(os.environ)
        if torch.device(cfg.device).type == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU figure stays on the CPU on a GPU host too
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            raise RuntimeError(f"training figure: `{' '.join(command)}` failed:\n{result.stderr[-3000:]}")
        logs = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
        final = next(r for r in reversed(logs) if "train_samples_per_second" in r)
        runtime = float(final["train_runtime"])
        return steps * batch / runtime, float(final["num_input_tokens_seen"]) / runtime

    try:
        without, _ = run("train-plain", cache=False)
        run("train-fill-cache", cache=True)
        cached, cached_tokens = run("train-cached", cache=True)
    finally:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    # CRAG-MM sessions hold one image each, so a sample's vision work is one image's forward
    vision_s = vision_seconds_per_image(model, processor, settings["bf16"], cfg.repeats)
    vision_share = min(vision_s * without, 0.99)  # seconds of vision per sample x samples per second
    common = {"batch_size": batch, "steps": steps, "train": settings["train"], "bf16": settings["bf16"]}
    # filling the cache costs one vision forward per image, in the run's precision; float32 is what a bf16 run's
    # fill cost before the fill followed the run's precision
    fill_float32 = vision_seconds_per_image(model, processor, False, cfg.repeats) if settings["bf16"] else vision_s
    cache_record = _record("train_samples_feature_cache", "samples/s", cached, without, **common,
                           vision_s_per_image=vision_s, vision_share=vision_share, max_ratio=1 / (1 - vision_share),
                           fill_s_per_image=vision_s, fill_s_per_image_float32=fill_float32,
                           note="reference: the same run without the feature cache")  # fmt: skip
    cache_record["bound"] = cache_record["ratio"] / cache_record["max_ratio"]
    cache_record["bound_kind"] = "most a cache can give (the vision share of a step)"
    # model FLOPs of the cached run (no vision work left): the LM's forward (2N per token) and backward (4N with
    # weight gradients, 2N for LoRA / projector-only, whose own weights are few); recomputation not counted
    lm_params = sum(p.numel() for p in model.model.language_model.parameters())
    per_token = (6 if settings["train"] == "full" else 4) * lm_params
    peak = matmul_flops(cfg.device)
    flops = _record("train_model_flops", "TFLOP/s", per_token * cached_tokens / 1e12, None, **common,
                    tokens_per_s=cached_tokens, flops_per_token=per_token, matmul_peak_tflops=peak / 1e12)  # fmt: skip
    flops["bound"] = per_token * cached_tokens / peak
    flops["bound_kind"] = "measured bf16 matmul rate (model FLOPs utilisation)"
    return [_record("train_samples", "samples/s", without, None, **common), cache_record, flops]


def peak_rss_record() -> dict[str, Any]:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return _record("peak_rss", "MiB", kib / 1024, None)


def machine_name(device: str | torch.device = "cpu") -> str:
    """The CPU (and the GPU, for a GPU run), its cores, torch and its threads: what every figure is named with."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    name = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.device(device).type == "cuda":
        gpu = torch.cuda.get_device_properties(torch.device(device))
        name = f"{gpu.name} ({gpu.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}) on {name}"
    return name


def markdown_table(records: list[dict[str, Any]], machine: str, preset: str) -> str:
    def fmt(v):
        return "" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = [f"`n2eye bench --preset {preset}` on {machine}", "",
             "| record | unit | ours | reference (plain transformers; llamacpp_*: llama.cpp on the same weights; for "
             "the cache, the run without it) | ratio "
             "| share of its bound |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in records:
        bound = "" if r.get("bound") is None else f"{100 * r['bound']:.0f}% ({r.get('bound_kind', 'bound')})"
        lines.append(f"| {r['name']} | {r['unit']} | {fmt(r['ours'])} | {fmt(r['reference'])} | {fmt(r['ratio'])} | {bound} |")
    return "\n".join(lines) + "\n"


def plot_ratios(records: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    shown = [r for r in records if r.get("ratio")]
    speedups = [r["ratio"] if r["unit"] != "s" else 1 / r["ratio"] for r in shown]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(shown) + 1.2))
    ax.barh([r["name"] for r in shown], speedups, color=["#2a7" if s >= 1 else "#c44" for s in speedups])
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("speed-up over the reference (x): plain transformers; llamacpp_*: llama.cpp on the same weights;\n"
                  "the feature cache: the run without it")
    ax.set_title(title, fontsize=9)
    ax.invert_yaxis()
    for y, s in enumerate(speedups):
        ax.text(s, y, f" {s:.2f}x", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def check_output_file(out: Path) -> None:
    """Fails before minutes of measuring when OUT can't be written."""
    if out.is_dir():
        raise OSError(f"--out {out} is a folder; give a file name such as bench.json")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        probe = out.with_suffix(out.suffix + ".probe")
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise OSError(f"--out {out} can't be written ({error.strerror}); choose another path") from error


def run_bench(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Runs every figure, writes OUT (JSON), OUT.md and OUT.png; returns the records."""
    from .build import build_random
    from .infer.engine import N2Eye

    out = Path(cfg.out).expanduser().resolve()
    check_output_file(out)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    machine = machine_name(cfg.device)
    print(f"n2eye bench on {machine}")
    bandwidth = memory_read_bandwidth(device=cfg.device)
    print(f"memory read bandwidth: {bandwidth:.1f} GB/s")
    model, processor = build_random(cfg.preset)
    model = model.to(device=cfg.device, dtype=torch.bfloat16).eval()
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    records = [_record("memory_read_bandwidth", "GB/s", bandwidth, None)]
    reference = lfm2vl_reference(model)  # transformers' own Lfm2Vl, for LFM2-VL shapes
    steps = [("decode", lambda: decode_records(model, cfg, bandwidth, processor.tokenizer)),
             ("prefill", lambda: [prefill_record(model, cfg)]),
             ("time to first token, 5-turn chat", lambda: ttft_records(N2Eye(model, processor),
                                                                       reference_model=reference))]  # fmt: skip
    if reference is None:
        steps.append(("vision encode", lambda: [vision_record(N2Eye(model, processor), cfg.repeats)]))
    else:
        steps.append(("native resolution and tiles, against transformers' Lfm2Vl",
                      lambda: native_resolution_records(N2Eye(model, processor), reference, cfg.repeats)))  # fmt: skip
    if cfg.train_steps != 0:
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="n2eye-bench-"))
        mode = train_settings(cfg.preset, cfg.device)["train"]
        steps.append((f"training (n2eye train --train {mode}, frozen vision)",
                      lambda: train_records(model, processor, cfg, work)))  # fmt: skip
    for label, step in steps:
        print(f"- {label}")
        for record in step():
            if "bandwidth_gb_s" in record:  # decode re-measured it: the best of the run is the machine's figure
                records[0]["ours"] = max(records[0]["ours"], record["bandwidth_gb_s"])
            records.append(record)
            print(f"  {record['name']}: ours {record['ours']:.4g} {record['unit']}, reference "
                  f"{record['reference'] if record['reference'] is None else format(record['reference'], '.4g')}"
                  f", ratio {record['ratio'] if record['ratio'] is None else format(record['ratio'], '.2f')}")  # fmt: skip
    records.append(peak_rss_record())
    if torch.device(cfg.device).type == "cuda":
        records.append(_record("peak_gpu_memory", "MiB", torch.cuda.max_memory_allocated() / 2**20, None))
    for r in records:
        r["preset"], r["machine"] = cfg.preset, machine
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(records, indent=2) + "\n")
    tmp.replace(out)
    table = markdown_table(records, machine, cfg.preset)
    out.with_suffix(".md").write_text(table)
    plot_ratios(records, out.with_suffix(".png"), f"n2eye bench --preset {cfg.preset}: {machine}")
    print(table)
    print(f"results: {out} (table {out.with_suffix('.md')}, chart {out.with_suffix('.png')})")
    return records
