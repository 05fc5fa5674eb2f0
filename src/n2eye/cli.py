"""The `n2eye` command: one subcommand per job, each a thin call into a module (also callable from Python)."""

from __future__ import annotations

import argparse
import json
import sys

from .cli_args import add_dataclass_arguments, config_from_args


def _cmd_build(args: argparse.Namespace) -> int:
    from .build import BuildConfig, build, count_parameters

    cfg = config_from_args(BuildConfig, args)
    out = build(cfg)
    from .modeling.configuration_n2eye import N2EyeConfig

    config = N2EyeConfig.from_pretrained(out)
    print(f"Built N2-Eye checkpoint in {out}")
    print(
        f"  language model: {config.text_config.model_type} hidden {config.text_config.hidden_size} x "
        f"{config.text_config.num_hidden_layers} layers, vocab {config.text_config.vocab_size}"
    )
    print(
        f"  vision: {config.vision_config.model_type} {config.vision_config.image_size}px patch "
        f"{config.vision_config.patch_size}; projector {config.projector_type}"
    )
    summary = json.loads((out / "n2eye_build.json").read_text()) if (out / "n2eye_build.json").exists() else None
    if summary:
        print("  parameters: " + ", ".join(f"{k} {v:,}" for k, v in summary["parameters"].items()))
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .infer.generate import GenerateConfig, generate

    print(generate(config_from_args(GenerateConfig, args)))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train.config import TrainConfig
    from .train.trainer import train

    train(config_from_args(TrainConfig, args))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from .train.merge import MergeConfig, merge

    print(f"Merged checkpoint: {merge(config_from_args(MergeConfig, args))}")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from .eval.runner import EvalConfig, evaluate

    cfg = config_from_args(EvalConfig, args)
    evaluate(cfg)
    print(f"results: {cfg.out}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    run_demo(config_from_args(DemoConfig, args))
    return 0


def make_parser() -> argparse.ArgumentParser:
    from .build import BuildConfig
    from .infer.generate import GenerateConfig

    parser = argparse.ArgumentParser(prog="n2eye", description="Build, train, evaluate and serve N2-Eye models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build", help="assemble a model from LFM2 + SigLIP backbones (or a preset) and save it")
    add_dataclass_arguments(p, BuildConfig)
    p.set_defaults(func=_cmd_build)
    from .demo import DemoConfig

    p = sub.add_parser("demo", help="train an N2-Eye from scratch on CPU, prove it learned, and show it")
    add_dataclass_arguments(p, DemoConfig)
    p.set_defaults(func=_cmd_demo)
    from .train.config import TrainConfig

    p = sub.add_parser("train", help="train on CRAG-MM or your own chat data (projector, full or LoRA)")
    add_dataclass_arguments(p, TrainConfig)
    p.set_defaults(func=_cmd_train)
    from .train.merge import MergeConfig

    p = sub.add_parser("merge", help="fold a LoRA adapter into a plain checkpoint")
    add_dataclass_arguments(p, MergeConfig)
    p.set_defaults(func=_cmd_merge)
    from .eval.runner import EvalConfig

    p = sub.add_parser("eval", help="score a model on held-out conversations, per question type")
    add_dataclass_arguments(p, EvalConfig)
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("generate", help="answer one prompt about one image")
    add_dataclass_arguments(p, GenerateConfig)
    p.set_defaults(func=_cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:
        print(f"n2eye {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
