"""`n2eye demo` mechanics: every stage writes its outputs, a rerun resumes, a bad --out fails at once.

The learning targets (accuracy beside chance and beside blanked images) are checked by the demo run itself;
see the Status section of the README for where they stand."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_stages_outputs_and_resume(tmp_path):
    from n2eye.demo import DemoConfig, run_demo

    out = tmp_path / "demo"
    result = run_demo(DemoConfig(out=str(out), quick=True, steps=3))
    for name in ("result.json", "eval.json", "eval-blank.json", "heldout_examples.png", "run/loss_curve.png"):
        assert (out / name).exists(), name
    saved = json.loads((out / "result.json").read_text())
    assert saved["per_type"] and saved["chance"]["colour"] == 0.25 and "colour" in saved["blanked_per_type"]
    assert result["api_example"]["question"]
    stamp = (out / "run" / "final" / "model.safetensors").stat().st_mtime
    run_demo(DemoConfig(out=str(out), quick=True, steps=3))  # resumes: finished stages are not redone
    assert (out / "run" / "final" / "model.safetensors").stat().st_mtime == stamp
    other = subprocess.run([sys.executable, "-m", "n2eye.cli", "demo", "--quick", "--steps", "4", "--out", str(out)],
                           capture_output=True, text=True, timeout=300)  # fmt: skip
    assert other.returncode == 2 and "--restart" in other.stderr


def test_demo_unwritable_out_fails_at_once(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = subprocess.run([sys.executable, "-m", "n2eye.cli", "demo", "--quick", "--out", str(blocker / "d")],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2 and "file" in result.stderr and "[1/5]" not in result.stdout
