"""`TrainConfig`: every option of `n2eye train`, settable from flags and from a YAML `--config`.

Defaults are the N2-Eye card's recipe: 1 epoch, per-device batch 2 x gradient accumulation 4, lr 2e-5, bf16,
max length 2048, gradient checkpointing, vision frozen, projector + LM trained.

The options that are transformers `TrainingArguments` under an n2eye flag are declared with `ta_field`, which names
the TrainingArguments option(s) they set; what n2eye passes to transformers, which `--trainer-args` it refuses,
and the help of those with no docstring of their own all come from that one declaration.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
from dataclasses import dataclass
from typing import Any

import yaml

from ..data.abstention import Abstention
from ..data.format_names import FORMATS
from ..image_settings import ImageOptions

TRAIN_MODES = ("projector", "full", "lora")
# --lr-schedule names -> transformers' scheduler types (wsd: warmup, constant, decay: loss keeps falling at the
# peak rate instead of the rate shrinking from the first step after the warmup).
LR_SCHEDULES = {"cosine": "cosine", "linear": "linear", "wsd": "warmup_stable_decay"}
# TrainingArguments n2eye always sets itself, from no flag (their values: `trainer.own_training_arguments`).
FIXED_TRAINING_ARGUMENTS = ("activation_checkpointing_kwargs", "remove_unused_columns", "use_cpu",
                            "accelerator_config", "include_num_input_tokens_seen")  # fmt: skip


def ta_field(*options: str, default: Any = dataclasses.MISSING, computed: bool = False) -> Any:
    """A TrainConfig field that sets the TrainingArguments `options`: passed on as it is, or, when `computed`,
    turned into them by `trainer.own_training_arguments`. Without a docstring under it, its --help is transformers'
    own for the first option, read only when the parser is built (importing transformers is slow)."""
    help_text = functools.partial(training_argument_help, options[0])
    return dataclasses.field(default=default, metadata={"training_arguments": options, "computed": computed,
                                                         "help": help_text})  # fmt: skip


def training_argument_help(option: str) -> str:
    """transformers' help for TrainingArguments `option`, with the options n2eye sets from a flag written as that
    flag (`num_train_epochs` -> --epochs), since those names can't be used with `n2eye train`."""
    from transformers import TrainingArguments

    text = TrainingArguments.__dataclass_fields__[option].metadata.get("help", "")
    text = text.replace("%%", "%")  # escaped for transformers' own argparse; cli_args escapes it again
    for name, flag in OWN_TRAINING_ARGUMENTS.items():
        if flag:  # `seed` or learning_rate, not the word seed
            text = re.sub(rf"`{name}`" + (rf"|\b{name}\b" if "_" in name else ""), flag, text)
    return text


def copied_training_arguments(cfg: TrainConfig) -> dict[str, Any]:
    """{TrainingArguments option: value} for the `ta_field`s passed on as they are."""
    fields = [f for f in dataclasses.fields(cfg) if "training_arguments" in f.metadata and not f.metadata["computed"]]
    return {option: getattr(cfg, f.name) for f in fields for option in f.metadata["training_arguments"]}


def parse_trainer_args(value: list[str] | dict[str, Any] | None) -> dict[str, Any]:
    """`--trainer-args` KEY=VALUE pairs (or a YAML mapping) -> {TrainingArguments field: value}, checked against
    TrainingArguments' own fields so a typo fails before any work instead of deep inside transformers."""
    from transformers import TrainingArguments

    if not value:
        return {}
    if isinstance(value, dict):
        pairs = {str(k): v for k, v in value.items()}
    else:
        pairs = {}
        for item in value:
            key, sep, raw = str(item).partition("=")
            if not sep or not key:
                raise ValueError(f"--trainer-args takes KEY=VALUE pairs, got {item!r} (e.g. max_grad_norm=0.5).")
            pairs[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
    known = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    for key in pairs:
        if key in OWN_TRAINING_ARGUMENTS:
            flag = OWN_TRAINING_ARGUMENTS[key]
            raise ValueError(
                f"--trainer-args {key}: n2eye sets this one " + (f"from {flag}; use that flag." if flag else "itself.")
            )
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"--trainer-args {key}: not a transformers TrainingArguments option.{hint}")
    return pairs


@dataclass
class TrainConfig(ImageOptions):
    """Options of `n2eye train`. A `ta_field` with no docstring under it has nothing to add to transformers' help."""

    model: str
    """Checkpoint folder to start from (made by `n2eye build` or an earlier `n2eye train`)."""
    data: str
    """Training data SPEC: a json/jsonl/parquet file, a folder (saved dataset, parquet files) or a hub dataset, with
    optional :split; several SPECs separated by commas are read in turn, each with its own format."""
    out: str = ta_field("output_dir")
    """Run folder: checkpoints, metrics.jsonl, loss curve, skip report, final model in out/final."""
    format: str = "auto"
    """Data format: auto, cragmm, messages, llava, cauldron or sharegpt."""
    eval_data: str | None = None
    """Held-out SPEC; its loss is logged every --eval-every steps."""
    epochs: float = ta_field("num_train_epochs", default=1.0)
    max_steps: int = ta_field("max_steps", default=-1)
    lr: float = ta_field("learning_rate", default=2e-5)
    """Peak learning rate (reached after the warmup; --lr-schedule says what follows)."""
    lr_schedule: str = ta_field("lr_scheduler_type", default="cosine", computed=True)
    """After the warmup: cosine (decay to 0), linear, or wsd (stay at --lr, then a cosine decay over the last
    --decay-ratio of the steps; needs --max-steps)."""
    decay_ratio: float = ta_field("lr_scheduler_kwargs", default=0.2, computed=True)
    """wsd only: the fraction of the steps spent decaying."""
    vision_lr: float | None = None
    """Learning rate of the vision tower when --train-vision (default: --lr / 10)."""
    batch_size: int = ta_field("per_device_train_batch_size", "per_device_eval_batch_size", default=2)
    """Conversations per device per step."""
    grad_accum: int = ta_field("gradient_accumulation_steps", default=4)
    max_length: int = 2048
    """Tokens per sample, image tokens included; longer samples are cut outside image blocks or skipped."""
    train: str = "full"
    """What trains: projector (projector only), full (projector + LM) or lora (LoRA on the LM + full projector)."""
    train_vision: bool = False
    """Also train the vision tower (at --vision-lr)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha."""
    lora_dropout: float = 0.05
    """LoRA dropout."""
    merge: bool = False
    """After a LoRA run, also write out/merged: the LoRA weights merged into a plain checkpoint."""
    last_turn_only: bool = False
    """Supervise only the last assistant turn of each conversation."""
    abstain_fraction: float = 0.0
    """Teach abstention (CRAG-MM rewards "I don't know" over a wrong guess): this fraction of the training
    conversations that have images get every image withheld (uniform grey) and every answer replaced by
    --abstain-answer. 0: off."""
    abstain_answer: str = "I don't know."
    """The answer of --abstain-fraction's conversations."""
    eval_every: int = ta_field("eval_strategy", "eval_steps", default=0, computed=True)
    """Evaluate held-out loss every N steps (0: only at the end, when --eval-data is given)."""
    save_every: int = ta_field("save_strategy", "save_steps", default=0, computed=True)
    """Save a checkpoint every N steps (0: only at the end)."""
    save_total_limit: int = ta_field("save_total_limit", default=3)
    resume: bool = False
    """Continue from the latest complete checkpoint in --out (optimizer, scheduler, RNG and data position)."""
    bf16: bool = ta_field("bf16", default=True, computed=True)
    """bfloat16 mixed precision (float32 on a GPU that can't run bf16)."""
    gradient_checkpointing: bool = ta_field("activation_checkpointing", default=True)
    seed: int = ta_field("seed", "data_seed", default=42)
    """Seed for initialisation, shuffling and dropout."""
    warmup_ratio: float = ta_field("warmup_steps", default=0.03)
    """Fraction of steps for linear warmup."""
    weight_decay: float = ta_field("weight_decay", default=0.0)
    """AdamW weight decay, on every trainable parameter (biases and norms too, unlike the Trainer's own optimizer)."""
    logging_steps: int = ta_field("logging_steps", default=1)
    """Log loss/lr/throughput every N steps."""
    report_to: str = ta_field("report_to", default="none", computed=True)
    """Trackers: none, tensorboard, wandb (when installed), or a comma-separated list."""
    streaming: bool = False
    """Stream the training data (encode on the fly) instead of loading it all; needs --max-steps."""
    pack: bool = False
    """Pack several conversations into each --max-length row; no token sees another sample (block-diagonal
    attention, restarted positions, conv state reset). --batch-size then counts packed rows. With SDPA the
    attention runs per sample (`modeling/packed_attention.py`): the samples' cost, not the row's."""
    feature_cache: bool = True
    """Compute frozen vision features once per image and reuse them from disk (off with --train-vision)."""
    feature_cache_dir: str | None = None
    """Where the feature cache lives (default: $N2EYE_CACHE/features, i.e. ~/.cache/n2eye/features)."""
    max_samples: int = 0
    """Use only the first N usable conversations (0: all)."""
    keep_freed_memory: bool = True
    """On CPU, keep freed tensor memory in the process for the next step instead of returning it to the kernel
    (glibc mallopt; 1.01-1.07x faster float32 steps on the demo model, same numbers; the process holds its peak memory
    until it exits)."""

    trainer_args: list[str] | dict[str, Any] | None = None
    """Any other transformers TrainingArguments option, as KEY=VALUE pairs (YAML: a mapping), e.g.
    `--trainer-args max_grad_norm=0.5 optim=adamw_torch_fused dataloader_num_workers=2`; values are read as YAML
    scalars. Options n2eye sets from its own flags are refused here with the flag to use."""

    def __post_init__(self) -> None:
        self.trainer_args = parse_trainer_args(self.trainer_args)
        if self.train not in TRAIN_MODES:
            raise ValueError(f"--train must be one of {list(TRAIN_MODES)}, got {self.train!r}.")
        if self.format not in ("auto", *FORMATS):
            raise ValueError(f"--format must be one of auto, {', '.join(FORMATS)}; got {self.format!r}.")
        for name in ("batch_size", "grad_accum", "max_length", "logging_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}.")
        Abstention(self.abstain_fraction, self.abstain_answer)  # refuses a fraction outside [0, 1), an empty answer
        if self.max_steps <= 0 and self.epochs <= 0:
            raise ValueError("Give --epochs > 0 or --max-steps > 0.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"--lr-schedule must be one of {list(LR_SCHEDULES)}, got {self.lr_schedule!r}.")
        if self.lr_schedule == "wsd" and self.max_steps <= 0:
            raise ValueError("--lr-schedule wsd needs --max-steps (its decay starts a fixed number of steps before the end).")
        if not 0 < self.decay_ratio <= 1:
            raise ValueError(f"--decay-ratio must be in (0, 1], got {self.decay_ratio}.")
        if self.vision_lr is None:
            self.vision_lr = self.lr / 10
        if self.streaming and self.max_steps <= 0:
            raise ValueError("--streaming needs --max-steps (a stream has no length to count epochs from).")
        if self.streaming and self.pack:
            raise ValueError("--pack needs the whole dataset; it can't be combined with --streaming yet.")
        if self.merge and self.train != "lora":
            raise ValueError("--merge only applies to --train lora.")


# TrainingArguments that n2eye sets itself: from one of its flags (named here), or always (None: not settable).
OWN_TRAINING_ARGUMENTS: dict[str, str | None] = {
    **{option: "--" + f.name.replace("_", "-") for f in dataclasses.fields(TrainConfig)
       for option in f.metadata.get("training_arguments", ())},
    **dict.fromkeys(FIXED_TRAINING_ARGUMENTS),
}  # fmt: skip
