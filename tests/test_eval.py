"""`n2eye eval`: every assistant turn answered with the dataset's history, scored per question type."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "colours" / "train.jsonl"


def test_eval_scores_every_turn_per_type(trained_tiny, tmp_path):
    from n2eye.eval.runner import EvalConfig, evaluate

    result = evaluate(EvalConfig(model=str(trained_tiny), data=str(EXAMPLES), out=str(tmp_path / "r.json")))
    assert json.loads((tmp_path / "r.json").read_text())["n"] == 16
    assert set(result["per_type"]) == {"colour", "shape"}
    assert all(r["qtype"] in ("colour", "shape") and "prediction" in r for r in result["predictions"])
    # history from the dataset: the shape question is asked after the gold colour answer
    second = [r for r in result["predictions"] if r["qtype"] == "shape"]
    assert second and all(r["question"] == "Which shape is it?" for r in second)
    blank = evaluate(EvalConfig(model=str(trained_tiny), data=str(EXAMPLES), out=str(tmp_path / "b.json"),
                                blank_images=True))  # fmt: skip
    # with every picture grey, the colour answer can no longer follow the image
    assert len({r["prediction"] for r in blank["predictions"] if r["qtype"] == "colour"}) == 1


def test_eval_with_a_quantized_language_model(trained_tiny, tmp_path):
    """`--quantize int8`: the same turns, answered by the weight-only int8 model (what quantization costs)."""
    from n2eye.eval.runner import EvalConfig, evaluate

    plain = evaluate(EvalConfig(model=str(trained_tiny), data=str(EXAMPLES), out=str(tmp_path / "p.json")))
    int8 = evaluate(EvalConfig(model=str(trained_tiny), data=str(EXAMPLES), out=str(tmp_path / "q.json"),
                               quantize="int8"))  # fmt: skip
    assert json.loads((tmp_path / "q.json").read_text())["config"]["quantize"] == "int8"
    same = sum(a["prediction"] == b["prediction"] for a, b in zip(plain["predictions"], int8["predictions"]))
    assert same >= 0.8 * len(plain["predictions"]), (same, len(plain["predictions"]))


def test_eval_cli_and_unwritable_output(trained_tiny, tmp_path):
    result = subprocess.run([sys.executable, "-m", "n2eye.cli", "eval", "--model", str(trained_tiny), "--data",
                             str(EXAMPLES), "--out", str(tmp_path / "out" / "eval.json"), "--max-samples", "2"],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "colour" in result.stdout and json.loads((tmp_path / "out" / "eval.json").read_text())["n"] == 4
    bad = subprocess.run([sys.executable, "-m", "n2eye.cli", "eval", "--model", str(trained_tiny), "--data",
                          str(EXAMPLES), "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "is a folder" in bad.stderr


def test_answers_cut_at_max_new_tokens_are_counted_and_reported(trained_tiny, tmp_path, capsys):
    """A limit shorter than the answers: each cut answer is marked, counted, and the run says how to fix it
    (the demo's old 96-token limit cut 4-box grounding answers, scored 0 as unparsable JSON)."""
    from n2eye.eval.runner import EvalConfig, evaluate

    cut = evaluate(EvalConfig(model=str(trained_tiny), data=str(EXAMPLES), out=str(tmp_path / "c.json"), max_new_tokens=1,
                              max_samples=2))  # fmt: skip
    assert cut["cut_at_max_new_tokens"] == 4 and all(r["cut_at_max_new_tokens"] for r in cut["predictions"])
    assert "raise --max-new-tokens" in capsys.readouterr().out
    whole = evaluate(EvalConfig(model=str(trained_tiny), data=str(EXAMPLES), out=str(tmp_path / "w.json"), max_samples=2))
    assert whole["cut_at_max_new_tokens"] == 0 and "raise --max-new-tokens" not in capsys.readouterr().out
