"""The demo model's training step on CPU, side by side in one run: float32 with the output head on every
position (plain transformers' causal-LM loss) against ours, the head on the labelled positions only (what
N2-Eye's model does in training mode), with the packed rows' block-diagonal mask computed whole and with attention
per packed sample (what `n2eye train --pack` runs), in float32 and under bf16 autocast (`n2eye train --bf16`); each with
glibc's default allocator and with freed memory kept in the process (`n2eye train` on CPU, `cpu_allocator`).

    python benchmarks/train_step.py [--steps 20] [--rounds 3] [--sessions 400] [--out benchmarks/results/train_step.json]

Same packed batches (rows of the demo's length and number, from the shapes world), frozen vision tower; each
variant's median over its forward + backward + AdamW steps, alternating variants step by step so a noisy host
slows all alike. The allocator setting holds for a whole process, so the two settings run in child processes
taking turns, `--rounds` times each, `--steps` steps per variant per child.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


VARIANTS = ("reference", "ours_dense_mask", "ours", "ours_bf16")
ALLOCATORS = ("default", "kept_memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="child processes per allocator setting, alternating")
    parser.add_argument("--sessions", type=int, default=400, help="shapes-world sessions to pack into batches")
    parser.add_argument("--out", default="benchmarks/results/train_step.json")
    parser.add_argument("--child", choices=ALLOCATORS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    from n2eye.bench import machine_name

    times = {(name, alloc): [] for name in VARIANTS for alloc in ALLOCATORS}
    info: dict = {}
    for _ in range(args.rounds):
        for alloc in ALLOCATORS:
            command = [sys.executable, __file__, "--child", alloc, "--steps", str(args.steps), "--sessions", str(args.sessions)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"child ({alloc}) failed:\n{done.stderr[-3000:]}")
            child = json.loads(done.stdout.strip().splitlines()[-1])
            info = child["info"]
            for name in VARIANTS:
                times[(name, alloc)] += child["times"][name]
    result = {"machine": machine_name(), **info, "steps": args.steps, "rounds": args.rounds}
    base = statistics.median(times[("reference", "default")])
    for (name, alloc), ts in times.items():
        key = name if alloc == "default" else f"{name}_{alloc}"
        result[f"{key}_s_per_step"] = statistics.median(ts)
        result[f"{key}_speedup"] = base / statistics.median(ts)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


def measure(args) -> dict:
    """One child: the allocator set for this process, then every variant timed in alternation."""
    from n2eye.train.cpu_allocator import keep_freed_memory

    if args.child == "kept_memory" and not keep_freed_memory():
        raise SystemExit("keep_freed_memory() had no effect here (not glibc?)")

    from transformers.loss.loss_utils import ForCausalLMLoss

    from n2eye.data.collate import encode_conversation
    from n2eye.data.packing import PackedCollator, conv_gap, pack_examples
    from n2eye.demo import questions, world, writers
    from n2eye.demo.command import FULL, IMAGE_SIZE, demo_model
    from n2eye.fixtures import train_tiny_tokenizer
    from n2eye.modeling.packed_attention import PACKED_SDPA

    pack_length, rows_per_step = FULL["pack_length"], FULL["batch_size"]  # the demo's packed steps
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tiny_tokenizer(Path(tmp) / "tokenizer")
    sessions = questions.make_sessions(args.sessions, seed=0, size=IMAGE_SIZE)
    mean, std = world.pixel_statistics([im for s in sessions for im in s.images])
    model, processor = demo_model(tokenizer, 0, image_mean=mean, image_std=std)
    model.model.vision_tower.requires_grad_(False)
    model.train()
    examples = [encode_conversation(processor, writers.to_conversation(s), pack_length) for s in sessions]
    rows = pack_examples(examples, pack_length, conv_gap(model.config.text_config))
    collate = PackedCollator(tokenizer.pad_token_id)
    n = rows_per_step
    batches = [collate(rows[i : i + n]) for i in range(0, len(rows) - n + 1, n)] or [collate(rows)]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    vocab = model.config.text_config.vocab_size

    def attention(name):  # the packed rows' block-diagonal mask whole (SDPA), or attention per sample
        model.config.text_config._attn_implementation = name

    def reference(batch):  # every position's logits in float32, then the loss over the labelled ones
        attention("sdpa")
        logits = model.lm_head(model.model(**{k: v for k, v in batch.items() if k != "labels"}).last_hidden_state)
        return ForCausalLMLoss(logits, batch["labels"], vocab)

    def ours_dense_mask(batch):
        attention("sdpa")
        return model(**batch).loss

    def ours(batch):
        attention(PACKED_SDPA)
        return model(**batch).loss

    def ours_bf16(batch):
        attention(PACKED_SDPA)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(**batch).loss

    variants = (("reference", reference), ("ours_dense_mask", ours_dense_mask), ("ours", ours), ("ours_bf16", ours_bf16))
    times: dict[str, list[float]] = {name: [] for name, _ in variants}
    for step in range(args.steps + 2):  # the first two of each are warm-up
        batch = batches[step % len(batches)]
        for name, fn in variants:
            start = time.perf_counter()
            fn(batch).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step >= 2:
                times[name].append(time.perf_counter() - start)
    tokens = statistics.mean(int(b["attention_mask"].sum()) for b in batches)
    layers = model.config.text_config.layer_types
    info = {
        "model": f"n2eye demo model (LFM2 hidden 128 x {len(layers)} layers: {', '.join(layers)}; SigLIP 96 px x 1 layer, vision frozen)",
        "batch": f"{rows_per_step} packed rows of {pack_length} tokens ({tokens:.0f} real tokens)",
    }
    return {"info": info, "times": times}


if __name__ == "__main__":
    main()
