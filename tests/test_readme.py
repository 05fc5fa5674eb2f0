"""Every command in the README runs: the first command (in CI), the build, train, eval, serve, generate and
scale-out commands and the Python examples (here)."""

from __future__ import annotations

import pytest

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


def test_ci_runs_the_readme_first_command_then_the_test_command():
    """CI (.ci/run) runs the README's first command as written (a fresh venv, the core install, the demo), then the
    test command (the [dev] extra, pytest), then the slow tier."""
    main, tests = block_after("main-command"), block_after("test-command")
    assert main.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
    assert "pip install torch==2.13.0 -e . &&" in main and main.endswith("n2eye demo --out n2eye-demo")
    assert "pytest" in tests and "torch==2.13.0" in tests and '".[dev]"' in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert "main-command" in ci and "test-command" in ci and "n2eye-demo/result.json" in ci
    assert ci.index('bash -c "$main"') < ci.index('bash -c "$tests"') < ci.rindex("pytest -m slow")


def test_the_demo_names_the_readme_serve_command_as_its_next_step(monkeypatch, tmp_path):
    """The demo's last lines are the README's serve command, with the install it needs when [serve] is missing."""
    import importlib.util

    from n2eye.demo.command import next_step

    monkeypatch.chdir(tmp_path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert block_after("serve-demo-command") in next_step(tmp_path / "n2eye-demo" / "run" / "final")
    monkeypatch.setattr(importlib.util, "find_spec", real)
    hint = next_step(tmp_path / "n2eye-demo" / "run" / "final")
    assert "n2eye serve --model n2eye-demo/run/final" in hint and "pip install" not in hint


def test_accelerate_configs_parse():
    import yaml

    for name in ("fsdp.yaml", "deepspeed-zero2.yaml"):
        config = yaml.safe_load((ROOT / "examples" / "accelerate" / name).read_text())
        assert config["distributed_type"] in ("FSDP", "DEEPSPEED") and config["num_machines"] == 1


@pytest.mark.slow  # subprocess-heavy: CI's second tier (pytest -m slow)
def test_every_readme_command_and_python_example(tmp_path):
    steps = [block_after("build-command"), block_after("generate-image-command")]
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


@pytest.mark.slow  # subprocess-heavy: CI's second tier (pytest -m slow)
def test_readme_lfm2vl_round_trip(tmp_path):
    """The README's convert block as written, with one substitution: the hub id LiquidAI/LFM2-VL-450M becomes a
    local folder of the same kind (a tiny Lfm2Vl made by transformers' own classes; no model hub here). The export
    then loads with plain transformers, no remote code."""
    from n2eye.fixtures.lfm2vl import make_tiny_lfm2vl

    source = make_tiny_lfm2vl(tmp_path / "LFM2-VL-tiny")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    n2eye = [sys.executable, "-m", "n2eye.cli"]
    lines = block_after("convert-command").splitlines()
    assert len(lines) == 4 and "LiquidAI/LFM2-VL-450M" in lines[0]
    for line in lines:
        args = [str(source) if a == "LiquidAI/LFM2-VL-450M" else a for a in shlex.split(line)]
        result = subprocess.run(n2eye + args[1:], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, (line, result.stderr[-2000:])
    exported = tmp_path / "lfm2-vl-450m-colours"
    check = ("from transformers import AutoModelForImageTextToText as A; "
             f"print(type(A.from_pretrained({str(exported)!r})).__name__)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "Lfm2VlForConditionalGeneration", result.stderr[-2000:]
    assert not list(exported.glob("*.py"))
    assert sorted(p.name for p in (tmp_path / "gguf").iterdir()) == [
        "README.md", "lfm2vl-Q8_0.gguf", "mmproj-lfm2vl-f16.gguf", "n2eye_convert.json", "n2eye_train.json"]  # fmt: skip
    card = (tmp_path / "gguf" / "README.md").read_text()
    assert "lfm2vl-Q8_0.gguf" in card and "llama" in card  # the card names its files and how llama.cpp runs them


@pytest.mark.slow  # subprocess-heavy: CI's second tier (pytest -m slow)
def test_readme_crag_mm_command_with_n2eye_serve_as_agent_and_judge(tiny_checkpoint, tmp_path, monkeypatch):
    """The README's CRAG-MM block as written, with what needs the internet made local: the hub dataset becomes a
    local CRAG-MM parquet, both servers become one `n2eye serve` of the tiny checkpoint (named as the README's
    agent model), the gated Llama tokenizer the tiny checkpoint's. Every turn is answered through the server
    (images as data URIs) and judged by it (a random model's verdicts are unparsable: not correct, counted)."""
    pytest.importorskip("fastapi", reason="the server needs the [serve] extra")
    import socket
    import time
    import urllib.request

    from test_crag_eval import write_crag

    sessions = [("r1", "ego", "food", "simple", "normal", [("What dish is this?", "pizza", ""), ("Is it hot?", "yes", "")]),
                ("r2", "ego", "vehicle", "simple", "low", [("What brand is the car?", "Toyota", "")])]  # fmt: skip
    data = write_crag(tmp_path, "http://unused", sessions)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    n2eye = [sys.executable, "-m", "n2eye.cli"]
    server = subprocess.Popen(n2eye + ["serve", "--model", str(tiny_checkpoint), "--port", str(port), "--model-name",
                                       "LiquidAI/LFM2-VL-1.6B"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        local = {"crag-mm-2025/crag-mm-multi-turn-public:validation": str(data), "http://localhost:8000": base,
                 "https://api.openai.com": base, "gpt-4o-mini": "LiquidAI/LFM2-VL-1.6B",
                 "meta-llama/Llama-3.2-1B-Instruct": str(tiny_checkpoint)}  # fmt: skip
        args = [local.get(a, a) for a in shlex.split(block_after("crag-command"))]
        assert args[:4] == ["n2eye", "eval", "--protocol", "crag-mm"] and base in args
        env = {**__import__("os").environ, "OPENAI_API_KEY": "sk-local", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        result = subprocess.run(n2eye + args[1:] + ["--max-new-tokens", "8"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600, env=env)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
    finally:
        server.terminate()
        server.wait(timeout=30)
    out = json.loads((tmp_path / "crag.json").read_text())
    assert out["agent"]["model"] == "LiquidAI/LFM2-VL-1.6B" and out["agent_errors"] == 0
    assert out["overall"]["n"] == 3 and set(out["per_domain"]) == {"food", "vehicle"}
    assert out["judge"]["model"] == "LiquidAI/LFM2-VL-1.6B" and out["judge_errors"] == 0
    assert out["answer_tokenizer"] == str(tiny_checkpoint)
    assert all(t["agent_error"] is None for t in out["turns"])  # the server answered every turn
