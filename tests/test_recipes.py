"""recipes/*.yaml: every recipe loads through the CLI (`n2eye train --config`), unknown keys refused, the card's
recipe says what the card says, and a recipe runs for real on the tiny model with the data and model swapped in."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))


def load_recipe(path: Path, *flags: str):
    from n2eye.cli import make_parser
    from n2eye.cli_args import config_from_args
    from n2eye.train.config import TrainConfig

    argv = ["train", "--config", str(path), *flags]
    return config_from_args(TrainConfig, make_parser(argv).parse_args(argv))


def test_there_are_recipes_for_the_card_and_its_variants():
    assert {p.stem for p in RECIPES} >= {"n2eye-1.3b", "n2eye-1.3b-projector", "n2eye-1.3b-lora", "own-chat-data"}


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads_through_the_cli(path):
    cfg = load_recipe(path)
    assert cfg.model and cfg.data and cfg.out
    assert f"n2eye train --config recipes/{path.name}" in path.read_text()  # says how to run it
    flagged = load_recipe(path, "--lr", "0.5", "--out", "elsewhere")  # flags win over the file
    assert flagged.lr == 0.5 and flagged.out == "elsewhere"


def test_the_card_recipe_is_the_cards():
    cfg = load_recipe(ROOT / "recipes" / "n2eye-1.3b.yaml")
    assert (cfg.batch_size, cfg.grad_accum, cfg.lr, cfg.epochs, cfg.max_length) == (2, 4, 2e-5, 1, 2048)
    assert cfg.bf16 and cfg.gradient_checkpointing and not cfg.train_vision and cfg.train == "full"
    assert cfg.format == "cragmm" and "crag-mm" in cfg.data


def test_unknown_recipe_keys_are_refused(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text((ROOT / "recipes" / "n2eye-1.3b.yaml").read_text() + "learning_rate: 1e-4\n")
    with pytest.raises(ValueError, match="learning_rate"):
        load_recipe(bad)


def test_a_recipe_runs_on_the_tiny_model(tiny_checkpoint, tmp_path):
    data = ROOT / "examples" / "colours" / "train.jsonl"
    done = subprocess.run(
        [sys.executable, "-m", "n2eye.cli", "train", "--config", str(ROOT / "recipes" / "own-chat-data.yaml"),
         "--model", str(tiny_checkpoint), "--data", str(data), "--out", str(tmp_path / "run"), "--max-steps", "2",
         "--no-bf16", "--no-gradient-checkpointing", "--eval-every", "0", "--save-every", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()
