"""Data parallel: `accelerate launch` with 2 CPU processes (gloo) equals one process with the same global batch."""

from __future__ import annotations

import pytest

import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # subprocess-heavy: CI's second tier (pytest -m slow)
def test_two_process_gloo_equals_single_process(tiny_checkpoint, tmp_path):
    common = ["train", "--model", str(tiny_checkpoint), "--data", str(ROOT / "examples" / "colours" / "train.jsonl"),
              "--max-steps", "4", "--grad-accum", "1", "--lr", "1e-3", "--no-bf16", "--no-gradient-checkpointing",
              "--seed", "3"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "n2eye.cli", *common, "--batch-size", "2", "--out",
                             str(tmp_path / "single"), "--feature-cache-dir", str(tmp_path / "features-single")],
                            capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert single.returncode == 0, single.stderr[-2000:]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "n2eye.cli"]  # fmt: skip
    ddp = subprocess.run([*launch, *common, "--batch-size", "1", "--out", str(tmp_path / "ddp"),
                          "--feature-cache-dir", str(tmp_path / "features-ddp")],
                         capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    # the frozen-vision cache: each process computed its share of the pictures, together all of them once
    (computed,) = [int(n) for n in re.findall(r"(\d+) computed\n", single.stdout)]
    shares = {int(rank): int(n) for n, rank in re.findall(r"(\d+) computed \(process (\d) of 2", ddp.stdout)}
    assert set(shares) == {0, 1} and all(shares.values()) and sum(shares.values()) <= computed + 1, ddp.stdout[-2000:]
    assert len(list((tmp_path / "features-ddp").rglob("*.safetensors"))) == computed
    a = load_file(str(tmp_path / "single" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "ddp" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(a[n], t) for n, t in load_file(str(tiny_checkpoint / "model.safetensors")).items())
