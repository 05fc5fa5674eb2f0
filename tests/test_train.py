"""`n2eye train`: labels, learning, what each mode trains, resume, truncation, bad rows."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from conftest import draw_shapes

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}


def write_messages_dataset(folder: Path, n: int = 8, bad_rows: bool = False) -> Path:
    """A messages-format JSONL: one image per conversation, a colour question, two turns."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        draw_shapes(size=(64, 64), background=(240, 240, 240), color=COLOURS[colour]).save(folder / f"img{i}.png")
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image", "image": f"img{i}.png"},
                                                 {"type": "text", "text": "What colour is the circle?"}]},
                    {"role": "assistant", "content": colour},
                    {"role": "user", "content": "Is it a circle?"},
                    {"role": "assistant", "content": "yes"},
                ]
            }
        )  # fmt: skip
    if bad_rows:
        (folder / "broken.png").write_bytes(b"not a png at all")
        rows.append({"messages": [{"role": "user", "content": [{"type": "image", "image": "broken.png"}]},
                                  {"role": "assistant", "content": "x"}]})  # fmt: skip
        rows.append({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]})
        rows.append({"messages": []})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_messages_dataset(tmp_path_factory.mktemp("data"))


def run_train(tiny_checkpoint, data, out, callbacks=None, **options):
    from n2eye.train.config import TrainConfig
    from n2eye.train.trainer import train

    settings = {"max_steps": 6, "lr": 1e-3, "batch_size": 2, "grad_accum": 1, "bf16": False,
                "gradient_checkpointing": False, "logging_steps": 1, "seed": 7, **options}  # fmt: skip
    return train(TrainConfig(model=str(tiny_checkpoint), data=str(data), out=str(out), **settings), callbacks)


def test_unmasked_labels_decode_to_exactly_the_answers(tiny_model):
    from n2eye.data.collate import encode_conversation

    _, processor = tiny_model
    conversation = {
        "messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
            {"role": "assistant", "content": "Red, mostly."},
            {"role": "user", "content": "And the shape?"},
            {"role": "assistant", "content": "A circle."},
            {"role": "user", "content": "Count?"},
            {"role": "assistant", "content": "3"},
        ],
        "images": [draw_shapes()],
    }
    example = encode_conversation(processor, conversation, max_length=2048)
    supervised = [t for t in example["labels"] if t != -100]
    assert processor.tokenizer.decode(supervised) == "Red, mostly.<|im_end|>A circle.<|im_end|>3<|im_end|>"
    last = encode_conversation(processor, conversation, max_length=2048, last_turn_only=True)
    assert processor.tokenizer.decode([t for t in last["labels"] if t != -100]) == "3<|im_end|>"
    assert example["pixel_values"].shape[0] == 1


def test_truncation_never_cuts_an_image_block_and_skips_what_cannot_fit(tiny_model):
    from n2eye.data.collate import TRUNCATED_FROM, encode_conversation
    from n2eye.data.report import SkipRow

    _, processor = tiny_model
    conversation = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "Hello there."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
            {"role": "assistant", "content": "Blue."},
        ],
        "images": [draw_shapes()],
    }
    full = encode_conversation(processor, conversation, max_length=4096)
    ids = full["input_ids"]
    start = ids.index(processor.tokenizer.convert_tokens_to_ids("<|image_start|>"))
    # a limit falling inside the image block cuts before the block and drops that image
    cut = encode_conversation(processor, conversation, max_length=start + 10)
    assert len(cut["input_ids"]) == start and "pixel_values" not in cut or len(cut["pixel_values"]) == 0
    assert processor.image_token_id not in cut["input_ids"]
    assert processor.tokenizer.decode([t for t in cut["labels"] if t != -100]) == "Hello there.<|im_end|>"
    assert cut[TRUNCATED_FROM] == len(ids) and TRUNCATED_FROM not in full  # the cut is reported, not silent
    # nothing supervised fits -> skipped with a reason, never a zero-loss sample
    with pytest.raises(SkipRow) as info:
        encode_conversation(processor, conversation, max_length=20)
    assert info.value.reason == "too_long"


def test_overfits_a_small_set(tiny_checkpoint, tmp_path):
    data = write_messages_dataset(tmp_path / "d", n=4)
    run_train(tiny_checkpoint, data, tmp_path / "run", max_steps=60, lr=5e-3, batch_size=4, train="full")
    losses = [json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(l)]  # fmt: skip
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])
    result = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert Path(result["loss_curve"]).stat().st_size > 1000


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "mode, train_vision, should_change",
    [
        ("projector", False, {"projector"}),
        ("full", False, {"projector", "language_model"}),
        ("projector", True, {"projector", "vision_tower"}),
    ],
)
def test_each_mode_changes_only_its_parameters(tiny_checkpoint, dataset, tmp_path, mode, train_vision, should_change):
    out = run_train(tiny_checkpoint, dataset, tmp_path / mode, max_steps=2, train=mode, train_vision=train_vision)
    before, after = _state(tiny_checkpoint), _state(out)
    assert before.keys() == after.keys()
    changed_parts = set()
    for name in before:
        part = next(p for p in ("vision_tower", "multi_modal_projector", "language_model") if p in name)
        part = "projector" if part == "multi_modal_projector" else part
        if not torch.equal(before[name], after[name]):
            changed_parts.add(part)
    assert changed_parts == should_change
    trainable = json.loads((tmp_path / mode / "train_result.json").read_text())["trainable_parameters"]
    assert {k for k, v in trainable.items() if v} == should_change


def test_lora_trains_adapters_and_projector_then_merges(tiny_checkpoint, dataset, tmp_path):
    from transformers import AutoModelForCausalLM

    out = run_train(tiny_checkpoint, dataset, tmp_path / "lora", max_steps=3, train="lora", merge=True, lora_r=4)
    assert out.name == "merged"
    result = json.loads((tmp_path / "lora" / "train_result.json").read_text())
    assert result["trainable_parameters"]["vision_tower"] == 0
    assert result["trainable_parameters"]["projector"] > 0 and result["trainable_parameters"]["language_model"] > 0
    adapter = load_file(str(tmp_path / "lora" / "adapter" / "adapter_model.safetensors"))
    targets = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapter if ".lora_" in name}
    assert targets == {"q_proj", "k_proj", "v_proj", "out_proj", "in_proj", "w1", "w2", "w3"}
    assert not any("vision_tower" in name and ".lora_" in name for name in adapter)
    before, after = _state(tiny_checkpoint), _state(out)
    assert before.keys() == after.keys()
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert not any("vision_tower" in n for n in changed)
    assert any("multi_modal_projector" in n for n in changed) and any("language_model" in n for n in changed)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert model.lm_head.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


class CrashAfterSave(TrainerCallback):
    """Simulates a kill right after checkpoint `step` is on disk."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("simulated kill")


def test_kill_and_resume_ends_with_the_same_weights(tiny_checkpoint, dataset, tmp_path):
    straight = run_train(tiny_checkpoint, dataset, tmp_path / "straight", save_every=3)
    with pytest.raises(KeyboardInterrupt):
        run_train(tiny_checkpoint, dataset, tmp_path / "killed", save_every=3, callbacks=[CrashAfterSave(3)])
    assert (tmp_path / "killed" / "checkpoint-3").is_dir() and not (tmp_path / "killed" / "final").exists()
    resumed = run_train(tiny_checkpoint, dataset, tmp_path / "killed", save_every=3, resume=True)
    a, b = _state(straight), _state(resumed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)
    steps = [json.loads(l)["step"] for l in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] >= 6


def test_checkpoints_load_with_plain_transformers(tiny_checkpoint, dataset, tmp_path):
    run_train(tiny_checkpoint, dataset, tmp_path / "ckpts", max_steps=4, save_every=2, save_total_limit=1)
    folders = sorted(p.name for p in (tmp_path / "ckpts").iterdir() if p.name.startswith("checkpoint-"))
    assert folders == ["checkpoint-4"]  # rotation kept the latest only
    assert not (tmp_path / "ckpts" / ".staging").exists()
    script = (
        "import sys; from transformers import AutoModelForCausalLM, AutoProcessor;"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True);"
        "p = AutoProcessor.from_pretrained(sys.argv[1], trust_remote_code=True); print(type(m).__name__)"
    )
    for folder in ("checkpoint-4", "final"):
        result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ckpts" / folder)],
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert result.returncode == 0 and "N2EyeForConditionalGeneration" in result.stdout, result.stderr[-2000:]


def test_bad_rows_are_skipped_counted_and_reported(tiny_checkpoint, tmp_path):
    data = write_messages_dataset(tmp_path / "d", n=4, bad_rows=True)
    run_train(tiny_checkpoint, data, tmp_path / "run", max_steps=1)
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert skipped["kept"] == 4 and skipped["skipped"] == 3
    assert skipped["reasons"] == {"image_corrupt": 1, "unknown_role": 1, "empty_turns": 1}


def test_all_bad_or_unknown_format_fails_before_training(tiny_checkpoint, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "wizard", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="every row was skipped"):
        run_train(tiny_checkpoint, bad, tmp_path / "run1")
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="question"):
        run_train(tiny_checkpoint, unknown, tmp_path / "run2")
    assert not (tmp_path / "run1" / "final").exists() and not (tmp_path / "run2" / "final").exists()


def test_unwritable_output_fails_at_once(tiny_checkpoint, dataset, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    result = subprocess.run(
        [sys.executable, "-m", "n2eye.cli", "train", "--model", str(tiny_checkpoint), "--data", str(dataset),
         "--out", str(blocker / "run"), "--max-steps", "1", "--no-bf16"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2
    assert "file.txt" in result.stderr and "encoding" not in result.stderr


def test_train_config_from_yaml_and_checks(tmp_path):
    from n2eye.cli import make_parser
    from n2eye.cli_args import config_from_args
    from n2eye.train.config import TrainConfig

    yaml_file = tmp_path / "recipe.yaml"
    yaml_file.write_text("model: m\ndata: d\nout: o\ntrain: lora\nlora_r: 8\n")
    argv = ["train", "--config", str(yaml_file), "--lr", "1e-4", "--no-bf16"]
    args = make_parser(argv).parse_args(argv)
    cfg = config_from_args(TrainConfig, args)
    assert (cfg.train, cfg.lora_r, cfg.lr, cfg.bf16, cfg.vision_lr) == ("lora", 8, 1e-4, False, 1e-5)
    defaults = TrainConfig(model="m", data="d", out="o")  # the N2-Eye card's recipe
    assert (defaults.batch_size, defaults.grad_accum, defaults.lr, defaults.epochs) == (2, 4, 2e-5, 1.0)
    assert (defaults.bf16, defaults.max_length, defaults.gradient_checkpointing) == (True, 2048, True)
    with pytest.raises(ValueError, match="--train"):
        TrainConfig(model="m", data="d", out="o", train="everything")


def test_trainer_args_reach_training_arguments_and_are_checked(tmp_path):
    """Any TrainingArguments option goes through --trainer-args (flags or a YAML mapping); one n2eye sets itself
    is refused with its flag, a typo with the close match; the table of n2eye's own is the truth."""
    from n2eye.cli import make_parser
    from n2eye.cli_args import config_from_args
    from n2eye.train.config import OWN_TRAINING_ARGUMENTS, TrainConfig
    from n2eye.train.trainer import own_training_arguments, training_arguments

    argv = ["train", "--model", "m", "--data", "d", "--out", str(tmp_path / "o"), "--no-bf16",
            "--trainer-args", "max_grad_norm=0.25", "optim=adafactor", "dataloader_num_workers=1"]  # fmt: skip
    cfg = config_from_args(TrainConfig, make_parser(argv).parse_args(argv))
    args = training_arguments(cfg, has_eval=False)
    assert (args.max_grad_norm, args.optim, args.dataloader_num_workers) == (0.25, "adafactor", 1)
    assert training_arguments(TrainConfig(model="m", data="d", out=str(tmp_path / "p"), bf16=False), False).max_grad_norm == 1.0
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: m\ndata: d\nout: {tmp_path / 'q'}\nbf16: false\ntrainer_args:\n  max_grad_norm: 0.5\n")
    argv = ["train", "--config", str(recipe)]
    assert training_arguments(config_from_args(TrainConfig, make_parser(argv).parse_args(argv)), False).max_grad_norm == 0.5
    with pytest.raises(ValueError, match="from --lr; use that flag"):
        TrainConfig(model="m", data="d", out="o", trainer_args=["learning_rate=1e-3"])
    with pytest.raises(ValueError, match="Did you mean max_grad_norm"):
        TrainConfig(model="m", data="d", out="o", trainer_args=["max_grad_nrom=1"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        TrainConfig(model="m", data="d", out="o", trainer_args=["max_grad_norm"])
    assert own_training_arguments(cfg, has_eval=True).keys() == OWN_TRAINING_ARGUMENTS.keys()


def test_training_arguments_are_exactly_what_the_flags_say(tmp_path):
    """The whole TrainingArguments of a run, for the card's defaults and for a run that sets every computed option
    (wsd, --save-every, --eval-every, --report-to), against a hard-written expectation: deriving n2eye's options
    from TrainConfig's field metadata must not move one of them."""
    from transformers import TrainingArguments

    from n2eye.train.config import TrainConfig
    from n2eye.train.trainer import own_training_arguments, training_arguments

    always = {"activation_checkpointing_kwargs": {"use_reentrant": False}, "remove_unused_columns": False,
              "include_num_input_tokens_seen": "non_padding", "use_cpu": not torch.cuda.is_available(),
              "accelerator_config": {"dispatch_batches": False}}  # fmt: skip
    card = TrainConfig(model="m", data="d", out=str(tmp_path / "card"))
    card_expected = {
        "output_dir": str(tmp_path / "card"), "num_train_epochs": 1.0, "max_steps": -1, "learning_rate": 2e-5,
        "lr_scheduler_type": "cosine", "lr_scheduler_kwargs": {}, "per_device_train_batch_size": 2,
        "per_device_eval_batch_size": 2, "gradient_accumulation_steps": 4, "save_strategy": "no", "save_steps": 500,
        "save_total_limit": 3, "eval_strategy": "no", "eval_steps": None,
        "bf16": not torch.cuda.is_available() or torch.cuda.is_bf16_supported(), "activation_checkpointing": True,
        "seed": 42, "data_seed": 42, "warmup_steps": 0.03, "weight_decay": 0.0, "logging_steps": 1, "report_to": [],
        **always,
    }  # fmt: skip
    custom = TrainConfig(
        model="m", data="d", out=str(tmp_path / "custom"), epochs=2.0, max_steps=100, lr=1e-3, lr_schedule="wsd",
        decay_ratio=0.3, batch_size=4, grad_accum=1, eval_every=10, save_every=20, save_total_limit=1, bf16=False,
        gradient_checkpointing=False, seed=7, warmup_ratio=0.1, weight_decay=0.01, logging_steps=5,
        report_to="tensorboard,wandb", trainer_args=["max_grad_norm=0.5", "dataloader_num_workers=2"],
    )  # fmt: skip
    custom_expected = {
        "output_dir": str(tmp_path / "custom"), "num_train_epochs": 2.0, "max_steps": 100, "learning_rate": 1e-3,
        "lr_scheduler_type": "warmup_stable_decay", "lr_scheduler_kwargs": {"num_decay_steps": 30},
        "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "gradient_accumulation_steps": 1,
        "save_strategy": "steps", "save_steps": 20, "save_total_limit": 1, "eval_strategy": "steps", "eval_steps": 10,
        "bf16": False, "activation_checkpointing": False, "seed": 7, "data_seed": 7, "warmup_steps": 0.1,
        "weight_decay": 0.01, "logging_steps": 5, "report_to": ["tensorboard", "wandb"], **always,
    }  # fmt: skip
    assert own_training_arguments(card, has_eval=False) == card_expected
    assert own_training_arguments(custom, has_eval=True) == custom_expected
    assert own_training_arguments(custom, has_eval=False)["eval_strategy"] == "no"  # --eval-every without --eval-data
    for cfg, expected, extra in [(card, card_expected, {}),
                                 (custom, custom_expected, {"max_grad_norm": 0.5, "dataloader_num_workers": 2})]:  # fmt: skip
        built = TrainingArguments(**{"dataloader_num_workers": 0, "disable_tqdm": False, **extra, **expected})
        assert training_arguments(cfg, has_eval=cfg is custom).to_dict() == built.to_dict()


def test_every_training_argument_field_names_a_real_option_and_has_help():
    """Each `ta_field` names TrainingArguments options that exist, and its --help is never empty: its own docstring,
    or transformers' help with the options n2eye owns written as n2eye's flags."""
    import dataclasses

    from transformers import TrainingArguments

    from n2eye.cli_args import field_help
    from n2eye.train.config import OWN_TRAINING_ARGUMENTS, TrainConfig

    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    helps = field_help(TrainConfig)
    fields = [f for f in dataclasses.fields(TrainConfig) if "training_arguments" in f.metadata]
    assert {f.name for f in fields} >= {"out", "epochs", "lr", "batch_size", "seed", "bf16", "save_every"}
    for f in fields:
        assert set(f.metadata["training_arguments"]) <= known, f.name
        assert helps[f.name].strip(), f.name
    assert set(OWN_TRAINING_ARGUMENTS) <= known
    some = ("per_device_eval_batch_size", "data_seed", "warmup_steps", "lr_scheduler_kwargs", "use_cpu")
    assert [OWN_TRAINING_ARGUMENTS[o] for o in some] == ["--batch-size", "--seed", "--warmup-ratio", "--decay-ratio", None]
    assert helps["grad_accum"].endswith("Effective batch size = --batch-size * num_devices * --grad-accum.")
    assert helps["max_steps"].startswith("Overrides --epochs.")
    assert "~20% slower" in helps["gradient_checkpointing"]  # transformers' own "%%" escape undone
    assert helps["lr"].startswith("Peak learning rate")  # n2eye's docstring, where it has something to add


class CountVisionCalls(TrainerCallback):
    """Counts vision-tower forwards during training (after any feature-cache precompute)."""

    def __init__(self):
        self.calls = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from n2eye.train.modes import base

        base(model).vision_tower.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def test_feature_cache_skips_the_vision_tower_with_the_same_loss(tiny_checkpoint, dataset, tmp_path, capsys):
    plain, cached = CountVisionCalls(), CountVisionCalls()
    options = {"max_steps": 8, "epochs": 2, "feature_cache_dir": str(tmp_path / "features")}
    run_train(tiny_checkpoint, dataset, tmp_path / "plain", callbacks=[plain], feature_cache=False, **options)
    run_train(tiny_checkpoint, dataset, tmp_path / "cached", callbacks=[cached], feature_cache=True, **options)
    assert plain.calls == 8 and cached.calls == 0  # 8 images over 2 epochs: the cache needs none
    torch.testing.assert_close(torch.tensor(_losses(tmp_path / "cached")), torch.tensor(_losses(tmp_path / "plain")))
    assert "4 reused, 4 computed" in capsys.readouterr().out  # 4 distinct pictures among the 8 rows
    run_train(tiny_checkpoint, dataset, tmp_path / "again", feature_cache=True, **options)
    assert "8 reused, 0 computed" in capsys.readouterr().out


def test_bf16_run_fills_the_cache_under_autocast_in_its_own_namespace(tiny_model, tmp_path):
    """A bf16 run caches what its own training forward computes (2.5x faster to fill than float32 on a CPU at the
    so400m shapes), stored in the tower's dtype; a float32 run never reads those grids."""
    from n2eye.train.feature_cache import VisionFeatureCache

    model, processor = tiny_model
    pixels = processor.image_processor(images=[draw_shapes(shape="square")], return_tensors="pt")["pixel_values"]
    float32 = VisionFeatureCache(model, tmp_path)
    bf16 = VisionFeatureCache(model, tmp_path, bf16=True, device="cpu")
    assert float32.dir != bf16.dir
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model.model.encode_images(pixels)[0]
    grid = bf16.grids(pixels)[0]
    assert grid.dtype == torch.float32 and (bf16.misses, bf16.hits) == (1, 0)
    torch.testing.assert_close(grid, expected.float(), rtol=0, atol=0)
    assert not torch.equal(float32.grids(pixels)[0], grid)  # float32 computed its own
    assert torch.equal(VisionFeatureCache(model, tmp_path, bf16=True).grids(pixels)[0], grid)


def test_conversations_cut_at_max_length_are_counted_and_reported(tiny_checkpoint, dataset, tmp_path, capsys):
    """A cut conversation trains on what fits, and the run says how many were cut and how to keep them whole."""
    run_train(tiny_checkpoint, dataset, tmp_path / "run", max_steps=2, max_length=112)
    report = json.loads((tmp_path / "run" / "train_result.json").read_text())["skipped"]
    assert report["truncated"] == 8 and report["skipped"] == 0
    assert "123 tokens with images; --max-length is 112" in report["truncated_examples"][0]["detail"]
    assert report["truncated_examples"][0]["row"] not in ("None", "")  # names the source row
    assert "8 cut at the length limit" in capsys.readouterr().out
    run_train(tiny_checkpoint, dataset, tmp_path / "whole", max_steps=2)
    assert json.loads((tmp_path / "whole" / "train_result.json").read_text())["skipped"]["truncated"] == 0


def test_wsd_schedule_holds_the_peak_rate_then_decays(tiny_checkpoint, dataset, tmp_path):
    from n2eye.train.config import TrainConfig

    run_train(tiny_checkpoint, dataset, tmp_path / "run", max_steps=10, warmup_ratio=0.2, lr_schedule="wsd",
              decay_ratio=0.3)  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = {r["step"]: r["learning_rate"] for r in records if "learning_rate" in r}
    assert rates[1] < rates[2] < 1e-3  # linear warmup over 2 steps
    assert all(rates[step] == pytest.approx(1e-3) for step in range(3, 9))  # stable at --lr
    assert rates[8] > rates[9] > rates[10] > 0  # then it decays over the last 3 steps (logged: the rate used)
    with pytest.raises(ValueError, match="--max-steps"):
        TrainConfig(model="m", data="d", out="o", lr_schedule="wsd")
    with pytest.raises(ValueError, match="--lr-schedule"):
        TrainConfig(model="m", data="d", out="o", lr_schedule="exponential")


def test_held_out_loss_is_logged_every_n_steps(tiny_checkpoint, dataset, tmp_path):
    run_train(tiny_checkpoint, dataset, tmp_path / "run", max_steps=4, eval_data=str(dataset), eval_every=2)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    eval_steps = [r["step"] for r in records if "eval_loss" in r]
    assert eval_steps[:2] == [2, 4] and all(r["eval_loss"] > 0 for r in records if "eval_loss" in r)


def test_streaming_training_encodes_on_the_fly(tiny_checkpoint, tmp_path):
    data = write_messages_dataset(tmp_path / "d", n=6, bad_rows=True)
    out = run_train(tiny_checkpoint, data, tmp_path / "run", streaming=True, max_steps=4)
    assert (out / "model.safetensors").exists()
    skipped = json.loads((tmp_path / "run" / "skipped.json").read_text())
    assert skipped["kept"] >= 6 and skipped["reasons"]["image_corrupt"] >= 1
    with pytest.raises(ValueError, match="--max-steps"):
        run_train(tiny_checkpoint, data, tmp_path / "run2", streaming=True, max_steps=-1)


def test_streaming_source_shorter_than_one_step_still_trains(tiny_checkpoint, tmp_path):
    """4 rows, batch 2, gradient accumulation 4: one pass is half an optimizer step. The Trainer used to begin
    epoch after epoch without ever stepping (a run that never ended); the stream now starts over by itself."""
    import threading

    data = write_messages_dataset(tmp_path / "d", n=4)
    done: list = []
    worker = threading.Thread(target=lambda: done.append(run_train(tiny_checkpoint, data, tmp_path / "run",
                              streaming=True, max_steps=2, batch_size=2, grad_accum=4)), daemon=True)  # fmt: skip
    worker.start()
    worker.join(timeout=240)
    assert done and (done[0] / "model.safetensors").exists(), "streaming training did not finish"
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2


def test_n2eye_merge_equals_train_merge(tiny_checkpoint, dataset, tmp_path):
    run_train(tiny_checkpoint, dataset, tmp_path / "lora", max_steps=2, train="lora", lora_r=4, merge=True)
    result = subprocess.run(
        [sys.executable, "-m", "n2eye.cli", "merge", "--adapter", str(tmp_path / "lora" / "adapter"),
         "--out", str(tmp_path / "merged-cli")], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    a, b = _state(tmp_path / "lora" / "merged"), _state(tmp_path / "merged-cli")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


def test_several_specs_in_one_run(tiny_checkpoint, tmp_path):
    first = write_messages_dataset(tmp_path / "a", n=3)
    second = write_messages_dataset(tmp_path / "b", n=2, bad_rows=True)
    run_train(tiny_checkpoint, f"{first},{second}", tmp_path / "run", max_steps=1, max_samples=0)
    result = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert result["train_conversations"] == 5 and result["skipped"]["skipped"] == 3


def test_vision_tower_gets_its_own_learning_rate(tiny_checkpoint):
    from n2eye.modeling.modeling_n2eye import N2EyeForConditionalGeneration
    from n2eye.train.modes import configure_trainable, parameter_groups

    model = configure_trainable(N2EyeForConditionalGeneration.from_pretrained(tiny_checkpoint), "projector", True)
    groups = parameter_groups(model, lr=1e-3, vision_lr=1e-5)
    vision_ids = {id(p) for p in model.model.vision_tower.parameters()}
    assert [g["lr"] for g in groups] == [1e-3, 1e-5]
    assert {id(p) for p in groups[1]["params"]} == vision_ids
    assert not vision_ids & {id(p) for p in groups[0]["params"]}


@pytest.mark.slow  # subprocess-heavy: CI's second tier (pytest -m slow)
def test_train_step_benchmark_runs_as_documented(tmp_path):
    """benchmarks/README's `python benchmarks/train_step.py`, shortened: all four variants timed under both
    allocator settings, JSON written."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "train_step.json"
    done = subprocess.run(
        [sys.executable, str(root / "benchmarks" / "train_step.py"), "--steps", "1", "--rounds", "1", "--sessions", "40",
         "--out", str(out)],
        capture_output=True, text=True, timeout=300, cwd=root,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    for name in ("reference", "ours_dense_mask", "ours", "ours_bf16"):
        assert result[f"{name}_s_per_step"] > 0 and result[f"{name}_kept_memory_s_per_step"] > 0
    assert result["reference_speedup"] == 1.0 and result["machine"]
    assert "python benchmarks/train_step.py" in (root / "benchmarks" / "README.md").read_text()


_FREED_MEMORY_PROBE = """
import sys, torch
from n2eye.train.cpu_allocator import keep_freed_memory
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
if sys.argv[1] == 'keep':
    assert keep_freed_memory()
x = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page touched
before = rss()
del x
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_keep_freed_memory_stops_handing_tensor_memory_back_to_the_kernel():
    """The default returns a freed 64 MiB tensor to the kernel at once (the next step faults in fresh pages);
    after `keep_freed_memory()` (what `n2eye train` calls on CPU) the memory stays for reuse."""

    def dropped(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", _FREED_MEMORY_PROBE, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])

    assert dropped("default") > 48 * 2**20
    assert dropped("keep") < 8 * 2**20
