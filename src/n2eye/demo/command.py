"""`n2eye demo`: train an N2-Eye from scratch on CPU in minutes, prove it learned to see, and show it.

Steps (each resumable: run the same command again after an interruption):
1. the synthetic shapes world (CRAG-MM v0.1.2 parquet + a messages JSONL for two-image and tool-call sessions);
2. a small N2-Eye sized for CPU; no pretrained encoder exists offline, so its vision tower is first pretrained on
   the world's labelled grid cells (`demo.vision`), then frozen as in the real recipe;
3. `n2eye train` on it (the real training path: projector and language model, checkpoints every few steps);
4. `n2eye eval` on held-out sessions, again with every image blanked to grey (the text-prior baseline);
5. a loss curve, a picture of held-out questions with answers and predicted boxes, a table beside chance,
   one answer through `n2eye.load(...).chat`, and `result.json` (written last and atomically).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import check_writable, default_generation_config, save_checkpoint


@dataclass
class DemoConfig:
    """Options of `n2eye demo`."""

    out: str = "n2eye-demo"
    """Output folder (data, model, run, figures, result.json)."""
    quick: bool = False
    """A 3-minute version: less data, fewer steps and a smaller model (colour and counting right; the other
    targets need the full run)."""
    seed: int = 0
    """Seed for the world, the initialisation and training."""
    steps: int = 0
    """Training steps (0: the default for the mode)."""
    restart: bool = False
    """Start over instead of resuming an interrupted demo in --out."""


# Sizes chosen for under 10 minutes on 2 CPU cores (quick: under 3). Batches are packed rows of `pack_length`
# tokens, the longest conversation (a tool-call session, ~400 tokens) fitting whole (cut tool sessions taught no
# closed call). Float32: bf16 autocast is faster per step but lost the learned circuits. What each setting bought,
# measured, and what was tried and not kept: docs/demo-notes.md. In short:
# - align_projector: the vision pretraining also aligns the projector with the language model's word embeddings
#   (each image token reads as its cell's colour, shape and box numbers, `demo.vision`), as an LLaVA-style
#   alignment stage does: the language model starts from features it can copy instead of forming each
#   question-to-image circuit by chance, which is what made the runs differ between seeds and CPU kinds;
# - conv_kernel 10 (LFM2's is 3): the short convolution carries the question's object word (7-8 tokens back,
#   across the chat template) to the answer position, so answering takes one attention hop (to the image)
#   instead of two;
# - four attention layers with a 256-wide MLP, box-edge probes, a tokenizer that knows the world's words and
#   more shape than "bigger" questions: grounding (a coordinate takes more hops than a word).
# --quick says colour answers as sentences ("The circle is red.": the object's name right before the colour) and
# keeps the earlier, smaller model with LFM2's kernel of 3: in 450-650 steps, with a kernel of 10 or as the full
# recipe shortened, it learnt count and shape but not colour (26-45% in four runs); this one, in 1100 steps, colour
# 98-99% and count 84-96% at seeds 0-2 in 2.5-2.7 minutes (2026-12-06, attention per packed sample: at 950 steps
# seed 1's colour stayed at 63%; 650 steps: count 71%, 850: 78%).
FULL = {"n_train": 24000, "n_heldout": 300, "steps": 2000, "batch_size": 10, "pack_length": 400, "lr": 1e-3,
        "colour_sentences": False, "attention_layers": 4, "mlp_size": 256, "world_tokenizer": True,
        "box_edge_probes": True, "earlier_question_mix": False, "align_projector": True, "conv_kernel": 10}
QUICK = {"n_train": 1500, "n_heldout": 200, "steps": 1100, "batch_size": 7, "pack_length": 400, "lr": 1e-3,
         "colour_sentences": True, "attention_layers": 3, "mlp_size": 384, "world_tokenizer": False,
         "box_edge_probes": False, "earlier_question_mix": True, "align_projector": True, "conv_kernel": 3}
# The held-out targets for the full run (grounding: mean IoU); result.json and the printout show each.
TARGETS = {"colour": 0.9, "count": 0.9, "shape": 0.8, "position": 0.8, "grounding": 0.5}
IMAGE_SIZE = 96
# The demo's tokenizer also learns the world's phrasing (`writers.tokenizer_corpus`); 2048 leaves room for every
# two-decimal coordinate to stay one "NN" token (at 1024 the world's words crowd some out: "0.45" -> 0 . 4 5).
DEMO_VOCAB = 2048
VISION_PRETRAIN_STEPS = 150  # per-cell probes are ~100% right after ~50 steps of 64 scenes (a few seconds)


def demo_model(
    tokenizer,
    seed: int,
    *,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
    attention_layers: int = FULL["attention_layers"],
    mlp_size: int = FULL["mlp_size"],
    conv_kernel: int = FULL["conv_kernel"],
):
    """A CPU-sized N2-Eye: LFM2 (hidden 128, one short-convolution layer then `attention_layers` attention layers:
    a grounding coordinate takes more hops than a one-word answer: the label, its object, which number) + SigLIP
    (96 px, patch 16, 1 layer) + pixel-unshuffle projector: 9 image tokens, one per cell of the shapes world's
    3x3 grid. `image_mean`/`image_std`: the training images' statistics (`world.pixel_statistics`), saved in
    the processor for inference."""
    from transformers import Lfm2Config, SiglipImageProcessor, SiglipVisionConfig

    from ..build import add_special_tokens, make_config, make_processor
    from ..modeling.modeling_n2eye import N2EyeForConditionalGeneration

    add_special_tokens(tokenizer)
    text_config = Lfm2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=mlp_size,
        block_auto_adjust_ff_dim=False,
        num_hidden_layers=1 + attention_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        layer_types=["conv"] + ["full_attention"] * attention_layers,
        max_position_embeddings=2048,
        conv_L_cache=conv_kernel,
        tie_word_embeddings=True,
    )
    vision_config = SiglipVisionConfig(
        image_size=IMAGE_SIZE, patch_size=16, hidden_size=128, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=256,
    )  # fmt: skip
    image_processor = SiglipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        resample=2,
        image_mean=image_mean or [0.5] * 3,
        image_std=image_std or [0.5] * 3,
    )
    config = make_config(text_config, vision_config, tokenizer, "pixel_unshuffle_mlp")
    config.freeze_vision = False
    torch.manual_seed(seed)
    model = N2EyeForConditionalGeneration(config)
    processor = make_processor(tokenizer, image_processor, config)
    processor.default_system_prompt = ""  # short prompts: the demo trains and answers without a system message
    return model, processor


def word_ids(tokenizer, box_edges: bool = False) -> dict[str, list[list[int]]]:
    """Per colour, shape and side of the world, the token ids naming it: alone ("red", a bare answer), after a
    space (" red", in a question or a sentence) and, for shapes, plural (" circles", in counting questions). With
    `box_edges`, also per box edge (`vision.BOX_EDGES`) and pixel class, the token of the two decimals a
    grounding answer prints for it ("40" of "0.40")."""
    from .questions import plural
    from .vision import BOX_EDGES, SIDES, edge_classes
    from .world import COLOURS, SHAPES, SNAP

    def ids(*words: str) -> list[int]:
        return [tokenizer.encode(w, add_special_tokens=False)[0] for w in words]

    words = {"colour": [ids(c, " " + c) for c in COLOURS],
             "shape": [ids(s, " " + s, " " + plural(s)) for s in SHAPES],
             **{f"side_{axis}": [ids(w, " " + w) for w in sides] for axis, sides in SIDES.items()}}  # fmt: skip
    if box_edges:
        pixels = [c * SNAP for c in range(edge_classes(IMAGE_SIZE) - 1)]
        decimals = [ids(f"{min(1.0, p / IMAGE_SIZE):.2f}"[2:]) for p in pixels]
        words.update({edge: decimals for edge in BOX_EDGES})
    return words


def _stage_done(path: Path) -> bool:
    return (path / ".done").exists()


def _mark_done(path: Path, info: dict | None = None) -> None:
    (path / ".done").write_text(json.dumps(info or {}))


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Runs (or resumes) the demo and returns the result dict also written to out/result.json."""
    from ..eval.runner import EvalConfig, evaluate
    from ..eval.scoring import format_table
    from ..fixtures import train_tiny_tokenizer
    from ..train.config import TrainConfig
    from ..train.trainer import train
    from .baselines import chance_levels
    from .questions import EARLIER_MIX
    from .writers import tokenizer_corpus, write_demo_dataset

    settings = dict(QUICK if cfg.quick else FULL)
    if cfg.steps:
        settings["steps"] = cfg.steps
    out = Path(cfg.out).expanduser().resolve()
    check_writable(out / "model-init", need_bytes=200_000_000)
    if cfg.restart and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = json.dumps({"settings": settings, "seed": cfg.seed}, sort_keys=True)
    if (out / "settings.json").exists() and (out / "settings.json").read_text() != stamp:
        raise ValueError(f"{out} holds a demo made with other settings; use --restart or another --out.")
    (out / "settings.json").write_text(stamp)
    (out / "result.json").unlink(missing_ok=True)  # a result is only ever the final one of a complete run
    timings: dict[str, float] = {}
    start = time.perf_counter()

    print("[1/5] shapes world")
    data_dir = out / "data"
    if not _stage_done(data_dir):
        shutil.rmtree(data_dir, ignore_errors=True)
        mix = EARLIER_MIX if settings["earlier_question_mix"] else None  # None: questions.MIX
        written = write_demo_dataset(data_dir, settings["n_train"], settings["n_heldout"], seed=cfg.seed,
                                     size=IMAGE_SIZE, colour_sentences=settings["colour_sentences"],
                                     mix=mix)  # fmt: skip
        _mark_done(data_dir, {k: {kk: str(vv) for kk, vv in v.items()} for k, v in written.items()
                              if k in ("train", "heldout")})  # fmt: skip
    paths = json.loads((data_dir / ".done").read_text())
    train_spec = ",".join(p for p in paths["train"].values() if p and p != "None")
    heldout_spec = ",".join(p for p in paths["heldout"].values() if p and p != "None")
    timings["data_s"] = time.perf_counter() - start

    print("[2/5] model, and its vision tower pretrained on the world's labelled grid cells (then frozen)")
    init_dir = out / "model-init"
    if not _stage_done(init_dir):
        from .vision import pretrain_vision_tower

        if settings["world_tokenizer"]:
            tokenizer = train_tiny_tokenizer(out / "tokenizer", vocab_size=DEMO_VOCAB, extra_corpus=tokenizer_corpus())
        else:
            tokenizer = train_tiny_tokenizer(out / "tokenizer")
        stats = json.loads((data_dir / "manifest.json").read_text())["pixel_statistics"]
        model, processor = demo_model(tokenizer, cfg.seed, image_mean=stats["mean"], image_std=stats["std"],
                                      attention_layers=settings["attention_layers"], mlp_size=settings["mlp_size"],
                                      conv_kernel=settings["conv_kernel"])
        words = word_ids(tokenizer, settings["box_edge_probes"]) if settings["align_projector"] else None
        vision = pretrain_vision_tower(model, processor, steps=VISION_PRETRAIN_STEPS, seed=cfg.seed, image_size=IMAGE_SIZE,
                                       box_edges=settings["box_edge_probes"], word_ids=words)
        print(f"  per-cell probe accuracy on fresh scenes: {vision['cell_accuracy']}")
        save_checkpoint(model, processor, init_dir, default_generation_config(tokenizer))
        _mark_done(init_dir, {"vision_pretraining": vision})
    vision_pretraining = json.loads((init_dir / ".done").read_text()).get("vision_pretraining")

    print("[3/5] training (projector and language model from scratch; vision tower frozen)")
    t0 = time.perf_counter()
    run_dir = out / "run"
    model_dir = run_dir / "final"
    if not _stage_done(run_dir):
        train(
            TrainConfig(
                model=str(init_dir), data=train_spec, out=str(run_dir), train="full", train_vision=False,
                lr=settings["lr"], lr_schedule="wsd", max_steps=settings["steps"],
                batch_size=settings["batch_size"], grad_accum=1, max_length=settings["pack_length"], pack=True, bf16=False,
                gradient_checkpointing=False, warmup_ratio=0.05, weight_decay=0.01, logging_steps=max(1, min(10, settings["steps"] // 20)),
                save_every=max(50, settings["steps"] // 5), save_total_limit=1, resume=True, seed=cfg.seed,
                feature_cache=False,
            )
        )  # fmt: skip
        _mark_done(run_dir)
    timings["train_s"] = time.perf_counter() - t0

    print("[4/5] held-out evaluation (real images, then every image blanked to grey)")
    t0 = time.perf_counter()
    from ..infer.engine import load

    engine = load(model_dir)
    real = evaluate(EvalConfig(model=str(model_dir), data=heldout_spec, out=str(out / "eval.json")), engine)
    blank = evaluate(
        EvalConfig(model=str(model_dir), data=heldout_spec, out=str(out / "eval-blank.json"), blank_images=True),
        engine,
    )
    timings["eval_s"] = time.perf_counter() - t0

    print("[5/5] figures and one question through the Python API")
    chance = chance_levels()
    table = format_table(real["per_type"], chance, blank["per_type"])
    from .figures import draw_heldout_examples

    shutil.rmtree(out / "images", ignore_errors=True)
    example = draw_heldout_examples(engine, heldout_spec, out / "heldout_examples.png", images_dir=out / "images")
    timings["total_s"] = time.perf_counter() - start
    result = {
        "config": asdict(cfg),
        "settings": settings,
        "vision_pretraining": vision_pretraining,
        "per_type": real["per_type"],
        "blanked_per_type": blank["per_type"],
        "chance": chance,
        "targets": _targets(real["per_type"]),
        "overall": real["overall"],
        "model": str(model_dir),
        "loss_curve": str(run_dir / "loss_curve.png"),
        "examples_picture": str(out / "heldout_examples.png"),
        "api_example": example,
        "timings_s": timings,
        "machine": _machine(),
    }
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(out / "result.json")
    print()
    print(table)
    print("\ntargets: " + ", ".join(
        f"{q} {t['score'] * 100:.0f}% (>= {t['target'] * 100:.0f}%: {'met' if t['met'] else 'not met'})"
        for q, t in result["targets"].items()))  # fmt: skip
    print(f"\nAsked through n2eye.load({str(model_dir)!r}).chat(...): {example['question']!r}")
    print(f"  answer: {example['answer']!r}   (truth: {example['truth']!r})")
    print(f"\nloss curve: {run_dir / 'loss_curve.png'}\nexamples:   {out / 'heldout_examples.png'}")
    print(f"result:     {out / 'result.json'}   ({timings['total_s'] / 60:.1f} min on {result['machine']})")
    print(f"\n{next_step(model_dir)}")
    return result


def next_step(model_dir: Path) -> str:
    """The hint printed last: talk to the model just trained, in the browser (with the install that needs)."""
    import importlib.util
    import os

    def shown(path: Path) -> str:  # relative to where the user is, when it lies below
        relative = os.path.relpath(path)
        return str(path) if relative.startswith("..") else relative

    serve = f"n2eye serve --model {shown(model_dir)}"
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        serve = f'pip install "n2eye[serve]" && {serve}'
    return (
        "Next: talk to the model you just trained, in your browser (answers, boxes drawn, tool calls):\n"
        f"  {serve}\nthen open http://127.0.0.1:8000/ and drop in a held-out image from "
        f"{shown(model_dir.parents[1] / 'images')}/ (or draw your own shapes)."
    )


def _targets(per_type: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for qtype, target in TARGETS.items():
        score = float((per_type.get(qtype) or {}).get("mean_score", 0.0))
        out[qtype] = {"target": target, "score": round(score, 4), "met": score >= target}
    return out


def _machine() -> str:
    from ..bench import machine_name

    return machine_name()
