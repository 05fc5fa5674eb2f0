"""`n2eye demo`: every stage writes its outputs, a rerun resumes, a bad --out fails at once, and the 3-minute
`--quick` run really learns from the images (beside chance and beside the same model with grey images).

The full run's targets are reported in the README (Status and "The demo"), measured by the demo itself."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow  # subprocess-heavy: CI's second tier (pytest -m slow)
def test_readme_quick_demo_learns_colour_and_count_from_the_images(tmp_path):
    """The README's `n2eye demo --quick` command as written: colour and counting at its bar of 80% (95-100% and
    93-96% measured at seeds 0-2 on an Intel Xeon; chance 25% and 22%), and both back near chance when the same
    model gets grey images (so the answers come from the pixels, not from text priors)."""
    import shlex

    from test_readme import block_after

    argv = shlex.split(block_after("demo-quick-command"))
    assert argv[:3] == ["n2eye", "demo", "--quick"] and argv[3] == "--out"
    out = tmp_path / argv[4]
    done = subprocess.run([sys.executable, "-m", "n2eye.cli", *argv[1:4], str(out)], capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "blanked %" in done.stdout and "answer:" in done.stdout
    result = json.loads((out / "result.json").read_text())
    for qtype in ("colour", "count"):
        chance, real, blank = result["chance"][qtype], result["per_type"][qtype], result["blanked_per_type"][qtype]
        assert real["n"] >= 30
        assert real["mean_score"] >= 0.8, (qtype, real, chance)  # the --quick bar (80%); 93-100% measured
        assert blank["mean_score"] <= chance + 0.1, (qtype, blank, chance)
    assert json.loads((out / "data" / "manifest.json").read_text())["world"]["colour_answers"] == "sentences"
    print(f"quick demo: {result['timings_s']['total_s'] / 60:.1f} minutes on {result['machine']}")  # timed in docs
    for name in ("eval.json", "eval-blank.json", "heldout_examples.png", "run/loss_curve.png", "data/manifest.json"):
        assert (out / name).exists(), name
    assert result["chance"]["colour"] == 0.25 and result["api_example"]["question"]
    assert set(result["targets"]) == {"colour", "count", "shape", "position", "grounding"}

    # Run again: finished stages are not redone (the trained model stays as it was), the result is rewritten.
    from n2eye.demo.command import DemoConfig, run_demo

    stamp = (out / "run" / "final" / "model.safetensors").stat().st_mtime
    again = run_demo(DemoConfig(out=str(out), quick=True))
    assert (out / "run" / "final" / "model.safetensors").stat().st_mtime == stamp
    assert again["per_type"]["count"] == real
    other = subprocess.run([sys.executable, "-m", "n2eye.cli", "demo", "--quick", "--steps", "4", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert other.returncode == 2 and "--restart" in other.stderr


def test_demo_unwritable_out_fails_at_once(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = subprocess.run([sys.executable, "-m", "n2eye.cli", "demo", "--quick", "--out", str(blocker / "d")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "file" in result.stderr and "[1/5]" not in result.stdout


def test_demo_model_learns_a_colour_when_normalised_with_the_data_statistics(tmp_path):
    """The image path learns from scratch within a few dozen steps once pixels are normalised with the training
    images' own mean/std (with 0.5/0.5 the same run stayed at chance: the light background dominated every token)."""
    import random

    import torch

    from n2eye.demo import questions, world, writers
    from n2eye.data.collate import Collator, encode_conversation
    from n2eye.demo.command import demo_model
    from n2eye.fixtures import train_tiny_tokenizer
    from n2eye.train.modes import parameter_groups

    rng = random.Random(0)
    scenes = [world.make_scene(rng, 96, n_objects=1) for _ in range(1100)]
    mean, std = world.pixel_statistics(s.image for s in scenes[:1000])
    model, processor = demo_model(train_tiny_tokenizer(tmp_path / "tok"), 0, image_mean=mean, image_std=std)
    assert list(processor.image_processor.image_mean) == mean

    def example(scene):
        turn = questions.Turn("What colour is the object?", scene.objects[0].colour, "colour")
        session = questions.Session("x", "cragmm", [scene], [turn])
        return encode_conversation(processor, writers.to_conversation(session), 512)

    train, held = [example(s) for s in scenes[:1000]], [example(s) for s in scenes[1000:]]
    collate = Collator(processor.tokenizer.pad_token_id)
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(parameter_groups(model, 1e-3, 1e-3))
    model.train()
    for step in range(60):
        batch = collate(train[(step * 32) % 960 : (step * 32) % 960 + 32])
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    batch = collate(held)
    with torch.no_grad():
        predicted = model(**{k: v for k, v in batch.items() if k != "labels"}).logits.argmax(-1)
    labels = batch["labels"]
    first = (labels != -100).int().argmax(-1)  # the colour word: first supervised token of each row
    rows = torch.arange(len(held))
    accuracy = (predicted[rows, first - 1] == labels[rows, first]).float().mean().item()
    assert accuracy >= 0.8, f"held-out colour accuracy {accuracy:.2f} after 60 steps"


def test_every_demo_conversation_fits_the_packed_rows_whole(tmp_path):
    """The demo packs rows of FULL["pack_length"] tokens: no conversation may be cut (a cut tool-call session
    loses its call, and the model then never learns to close one: measured at 256-token rows, tool calls 0%)."""
    from n2eye.data.report import SkipReport
    from n2eye.demo.command import FULL, IMAGE_SIZE, QUICK, demo_model
    from n2eye.demo.writers import write_demo_dataset
    from n2eye.fixtures import train_tiny_tokenizer
    from n2eye.data.examples import encode_dataset

    written = write_demo_dataset(tmp_path / "data", 400, 10, seed=3, size=IMAGE_SIZE)
    _, processor = demo_model(train_tiny_tokenizer(tmp_path / "tok"), 0)
    lengths = []
    for path in (p for p in written["train"].values() if p):
        report = SkipReport()
        examples = encode_dataset(processor, str(path), "auto", 4096, False, 0, report)
        assert report.skipped == 0 and report.truncated == 0
        lengths += [len(e["input_ids"]) for e in examples]
    assert len(lengths) == 400 and max(lengths) > 300  # the tool-call sessions are the long ones
    assert max(lengths) <= min(FULL["pack_length"], QUICK["pack_length"]), max(lengths)
