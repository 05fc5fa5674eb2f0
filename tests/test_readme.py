"""Every command in the README runs: the main command's n2eye steps and the Python example."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def block_after(marker: str) -> str:
    match = re.search(rf"<!-- {marker} -->\s*```\w+\n(.*?)```", README, re.S)
    assert match, f"README lost its {marker} block"
    return match.group(1).strip()


def test_ci_runs_the_readme_test_command():
    command = block_after("test-command")
    assert "pytest" in command and "torch==2.13.0" in command
    ci = (ROOT / ".ci" / "run").read_text()
    assert "test-command" in ci


def test_accelerate_configs_parse():
    import yaml

    for name in ("fsdp.yaml", "deepspeed-zero2.yaml"):
        config = yaml.safe_load((ROOT / "examples" / "accelerate" / name).read_text())
        assert config["distributed_type"] in ("FSDP", "DEEPSPEED") and config["num_machines"] == 1


def test_main_command_and_python_example(tmp_path):
    command = block_after("main-command")
    assert "torch==2.13.0" in command
    steps = [s.strip() for s in command.split("&&") if s.strip().startswith("n2eye ")]
    assert [s.split()[1] for s in steps] == ["build", "generate"]
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "example.png", tmp_path / "docs" / "example.png")
    n2eye = [sys.executable, "-m", "n2eye.cli"]
    for step in steps:
        result = subprocess.run(n2eye + shlex.split(step)[1:], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (step, result.stderr[-2000:])
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    train = block_after("train-command")
    result = subprocess.run(n2eye + shlex.split(train)[1:], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    run = tmp_path / "runs" / "colours"
    assert (run / "final" / "model.safetensors").exists() and (run / "loss_curve.png").exists()
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses[-1] < losses[0] / 2, losses
    evaluate = block_after("eval-command")
    result = subprocess.run(n2eye + shlex.split(evaluate)[1:], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((run / "eval.json").read_text())["per_type"].keys() == {"colour", "shape"}
    for marker in ("python-api", "python-quantize"):
        api = tmp_path / f"{marker}.py"
        api.write_text(block_after(marker))
        result = subprocess.run([sys.executable, str(api)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (marker, result.stderr[-2000:])
    shutil.copy(ROOT / "examples" / "requests.jsonl", tmp_path / "examples" / "requests.jsonl")
    generate = block_after("generate-command")
    result = subprocess.run(n2eye + shlex.split(generate)[1:], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == 3
    chat = subprocess.run(n2eye + ["chat", "--model", "tiny-n2eye", "--max-new-tokens", "4"], cwd=tmp_path,
                          input="/image docs/example.png\nHi\n/quit\n", capture_output=True, text=True, timeout=300)  # fmt: skip
    assert chat.returncode == 0 and chat.stdout.count("n2eye> ") == 1, chat.stderr[-2000:]
    serve = shlex.split(block_after("serve-command"))
    server = subprocess.Popen(n2eye + serve[1:], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import time
        import urllib.request

        for _ in range(240):
            try:
                urllib.request.urlopen("http://127.0.0.1:8000/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        client = tmp_path / "client.py"
        client.write_text(block_after("openai-example"))
        result = subprocess.run([sys.executable, str(client)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "prompt_tokens" in result.stdout
    finally:
        server.terminate()
        server.wait(timeout=30)
    ddp = shlex.split(block_after("ddp-command"))
    assert ddp[:2] == ["accelerate", "launch"]
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", *ddp[2:]], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "runs" / "ddp" / "final" / "model.safetensors").exists()
    script = tmp_path / "example.py"
    script.write_text(block_after("python-example"))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
