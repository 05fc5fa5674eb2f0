"""The `n2eye` command: one subcommand per job, each a thin call into a module (also callable from Python).

Every subcommand is a (config dataclass, function) pair: the dataclass is the flag and YAML schema, the function
is the Python API. Only the chosen subcommand's module is imported, so `n2eye --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import NamedTuple

from .cli_args import add_dataclass_arguments, config_from_args


class Command(NamedTuple):
    help: str
    module: str  # n2eye.<module>
    config: str  # its config dataclass
    run: str  # its entry function, taking the config


COMMANDS: dict[str, Command] = {
    "build": Command("assemble a model from LFM2 + SigLIP backbones (or a preset) and save it", "build", "BuildConfig", "build_and_report"),
    "demo": Command("train an N2-Eye from scratch on CPU, prove it learned, and show it", "demo.command", "DemoConfig", "run_demo"),
    "train": Command("train on CRAG-MM or your own chat data (projector, full or LoRA)", "train.trainer", "TrainConfig", "train"),
    "merge": Command("fold a LoRA adapter into a plain checkpoint", "train.merge", "MergeConfig", "merge_and_report"),
    "eval": Command("score a model on held-out conversations, per question type", "eval.runner", "EvalConfig", "evaluate"),
    "generate": Command("answer a prompt (and image), or a JSONL file of requests", "infer.generate", "GenerateConfig", "generate_and_print"),
    "serve": Command("OpenAI-compatible HTTP server with a web chat page", "infer.server", "ServeConfig", "serve"),
    "bench": Command("inference speed against plain transformers (decode bf16/int8/int4, prefill, TTFT)", "bench", "BenchConfig", "run_bench"),
    "convert": Command("change formats: import transformers Lfm2Vl (LFM2-VL) checkpoints; export to native Lfm2Vl (vLLM) or GGUF (llama.cpp)", "convert", "ConvertConfig", "convert_and_report"),
    "chat": Command("chat in the terminal (/image, /system, /reset), answers streamed", "infer.chat", "ChatConfig", "chat"),
}  # fmt: skip


# Packages that come with an extra rather than the core install: a command that needs one says how to get it.
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "starlette": "serve", "pydantic": "serve", "openai": "dev",
          "selenium": "dev", "psutil": "dev", "pytest": "dev", "llama_cpp": "gguf"}  # fmt: skip


def missing_package(command: str, err: ModuleNotFoundError) -> SystemExit:
    """What a command says, instead of a traceback, when a package it needs is not installed: which package, and
    the `pip install` that brings it. A missing module of n2eye itself is a broken install: re-raised as is."""
    package = (err.name or "").split(".")[0]
    if package in ("", "n2eye"):
        raise err
    extra = EXTRAS.get(package)
    fix = f'pip install "n2eye[{extra}]"' if extra else f"pip install {package}"
    print(f"n2eye {command}: error: this command needs the Python package '{package}', which is not installed. "
          f"Fix: {fix}", file=sys.stderr)  # fmt: skip
    return SystemExit(2)


def _module(name: str):
    try:
        return importlib.import_module(f"n2eye.{COMMANDS[name].module}")
    except ModuleNotFoundError as err:
        raise missing_package(name, err) from None


def make_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the subcommand named in `argv` gets its flags (and its module imported)."""
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="n2eye", description="Build, train, evaluate and serve N2-Eye models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help)
        if name == selected:
            add_dataclass_arguments(p, getattr(_module(name), command.config))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = make_parser(argv).parse_args(argv)
    command = COMMANDS[args.command]
    module = _module(args.command)
    try:
        getattr(module, command.run)(config_from_args(getattr(module, command.config), args))
    except ModuleNotFoundError as err:  # a lazily imported optional package (uvicorn in `serve`, say)
        raise missing_package(args.command, err) from None
    except (ValueError, OSError) as err:
        print(f"n2eye {args.command}: error: {err}", file=sys.stderr)
        return 2
    finally:
        close_process_group()
    return 0


def close_process_group() -> None:
    """Closes a launcher's (accelerate, torchrun) process group before the process exits: left open, gloo's worker
    threads meet the interpreter's teardown and a rank could abort after its work was done ("terminate called
    without an active exception", exit code -6, seen in about 1 of 3 two-process runs)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
