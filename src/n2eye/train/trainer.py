"""`n2eye train`: HF Trainer configured for N2-Eye, with atomic loadable checkpoints, metrics and a loss curve.

One loop for every mode (projector / full / LoRA, optional vision training). Data: any SPEC the adapters read,
prepared by `data.examples.prepare_datasets` (bad rows and samples that can't fit skipped, counted and reported,
never fatal).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from ..checkpoint import check_writable, copy_modeling_files, save_checkpoint
from ..data.examples import abstention_of, prepare_datasets
from ..data.report import SkipReport
from ..image_settings import checked_image_settings
from ..model_card import TRAIN_RECORD, lineage_records, record_training, training_record
from ..modeling.modeling_n2eye import N2EyeForConditionalGeneration
from ..modeling.packed_attention import PACKED_SDPA
from ..modeling.processing_n2eye import N2EyeProcessor
from .config import LR_SCHEDULES, TrainConfig, copied_training_arguments
from .cpu_allocator import keep_freed_memory
from .modes import configure_trainable, count_trainable, merge_lora, parameter_groups

STAGING = ".staging"


class MetricsCallback(TrainerCallback):
    """Appends every log (loss, lr, tokens/s, eval loss) to out/metrics.jsonl, so runs can be plotted and compared."""

    def __init__(self, path: Path):
        self.path = path
        self._last = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        now, tokens = time.perf_counter(), state.num_input_tokens_seen
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        if self._last is not None and now > self._last[0] and "loss" in logs:
            record["tokens_per_s"] = (tokens - self._last[1]) / (now - self._last[0])
        self._last = (now, tokens)
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")


class N2EyeTrainer(Trainer):
    """Trainer with vision/LM learning-rate groups and atomic, self-contained checkpoints."""

    def __init__(self, *args, lr_groups: dict, **kwargs):
        super().__init__(*args, **kwargs)
        self._lr_groups = lr_groups
        self._staging: Path | None = None

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = parameter_groups(model or self.model, **self._lr_groups)
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, betas=(0.9, 0.999), eps=1e-8)
        return self.optimizer

    def _get_output_dir(self, trial) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            copy_modeling_files(output_dir or self.args.output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        """Writes checkpoint-N under out/.staging, then renames it into place: never a half checkpoint."""
        run_dir = Path(self.args.output_dir)
        self._staging = run_dir / STAGING
        if self.args.should_save:
            shutil.rmtree(self._staging, ignore_errors=True)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        if self.args.should_save:
            name = f"checkpoint-{self.state.global_step}"
            final = run_dir / name
            if final.exists():
                shutil.rmtree(final)
            (run_dir / STAGING / name).rename(final)
            shutil.rmtree(run_dir / STAGING, ignore_errors=True)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )


def plot_loss_curve(metrics_path: Path, out_png: Path) -> Path | None:
    """Training (and held-out) loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    held_out = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
    if not train:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train loss", color="tab:blue")
    if held_out:
        ax.plot(*zip(*held_out), "o-", label="held-out loss", color="tab:orange")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens, log scale)")
    ax.set_yscale("log")  # the late, small gains (learning to use the image) stay visible
    ax.set_title("N2-Eye training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def uses_bf16(cfg: TrainConfig) -> bool:
    """--bf16, unless the GPU can't run it (then float32, as the Trainer would refuse bf16 there)."""
    return cfg.bf16 and (not torch.cuda.is_available() or torch.cuda.is_bf16_supported())


def make_feature_cache(model, cfg: TrainConfig, device: torch.device | None = None):
    """The frozen-vision feature cache for this run, or None when the vision tower trains or the cache is off.
    `device`: this process's (a GPU under torchrun / accelerate), where the Trainer will put the model anyway."""
    if not cfg.feature_cache or cfg.train_vision:
        return None
    from ..cache import cache_root
    from .feature_cache import VisionFeatureCache

    return VisionFeatureCache(model, cfg.feature_cache_dir or cache_root() / "features", bf16=uses_bf16(cfg),
                              device=device)  # fmt: skip


def own_training_arguments(cfg: TrainConfig, has_eval: bool) -> dict[str, Any]:
    """The TrainingArguments n2eye sets: its flags declared with `config.ta_field` passed on as they are, those
    computed from its flags, and those it always sets (`config.OWN_TRAINING_ARGUMENTS` says which sets which)."""
    computed = dict(
        lr_scheduler_type=LR_SCHEDULES[cfg.lr_schedule],
        lr_scheduler_kwargs=(
            {"num_decay_steps": max(1, round(cfg.decay_ratio * cfg.max_steps))} if cfg.lr_schedule == "wsd" else {}
        ),
        bf16=uses_bf16(cfg),
        save_strategy="steps" if cfg.save_every else "no",
        save_steps=cfg.save_every or 500,
        eval_strategy="steps" if has_eval and cfg.eval_every else "no",
        eval_steps=cfg.eval_every or None,
        report_to=[] if cfg.report_to in ("", "none") else cfg.report_to.split(","),
    )
    fixed = dict(
        activation_checkpointing_kwargs={"use_reentrant": False},
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        use_cpu=not torch.cuda.is_available(),
        # batches hold per-image tensors (pixel_values, vision_features) whose first dim is not the batch size,
        # so each process builds its own batches instead of having rank 0 slice them
        accelerator_config={"dispatch_batches": False},
    )
    return {**copied_training_arguments(cfg), **computed, **fixed}


def training_arguments(cfg: TrainConfig, has_eval: bool) -> TrainingArguments:
    """The TrainingArguments of a run: n2eye's own, then any other option from `--trainer-args` (checked in
    TrainConfig not to name one of n2eye's own), over two defaults those may change."""
    defaults = {"dataloader_num_workers": 0, "disable_tqdm": False}
    return TrainingArguments(**{**defaults, **cfg.trainer_args, **own_training_arguments(cfg, has_eval)})


def check_marks_assistant_turns(chat_template: str | None, model: str) -> None:
    """Labels come from the template's `{% generation %}` blocks: without them every row would have no label."""
    if not chat_template or not re.search(r"\{%-?\s*generation\s*-?%\}", chat_template):
        raise ValueError(
            f"{model}'s chat template has no {{% generation %}} blocks, so training can't tell the assistant's tokens "
            "(its labels) from the prompt. `n2eye convert --to n2eye` keeps a source's template only when N2-Eye's "
            "renders differently; put N2-Eye's template (n2eye/modeling/chat_template.jinja) in the folder's "
            "chat_template.jinja if the model's format is LFM2 ChatML, or add {% generation %} around assistant turns."
        )


def train(cfg: TrainConfig, callbacks: list[TrainerCallback] | None = None) -> Path:
    """Runs `n2eye train`; returns the folder of the final model (out/final, or out/merged for --merge)."""
    out = Path(cfg.out)
    check_writable(out / "final")
    out.mkdir(parents=True, exist_ok=True)
    set_seed(cfg.seed)
    if cfg.keep_freed_memory and not torch.cuda.is_available():
        keep_freed_memory()
    processor = N2EyeProcessor.from_pretrained(cfg.model, trust_remote_code=True)
    checked_image_settings(processor, cfg.image_settings())  # a bad --max-image-tokens fails before any work
    check_marks_assistant_turns(processor.chat_template, cfg.model)
    model = N2EyeForConditionalGeneration.from_pretrained(cfg.model, dtype=torch.float32)
    if cfg.pack and model.config.text_config._attn_implementation == "sdpa":
        model.set_attn_implementation({"text_config": PACKED_SDPA})  # attention per packed sample: same result
    n_bytes = sum(p.numel() for p in model.parameters()) * 2  # a bf16-or-better copy per checkpoint
    check_writable(out / "final", need_bytes=n_bytes)

    report, eval_report = SkipReport(), SkipReport()
    args = training_arguments(cfg, has_eval=bool(cfg.eval_data))  # first: it sets up the processes and the device
    abstention = abstention_of(cfg)
    train_set, eval_set, collator, n_conversations = prepare_datasets(
        cfg, processor, model, report, eval_report, args, make_feature_cache(model, cfg, args.device), abstention
    )

    lora = {"r": cfg.lora_r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout}
    model = configure_trainable(model, cfg.train, cfg.train_vision, lora)
    if cfg.gradient_checkpointing and cfg.train == "lora":
        model.enable_input_require_grads()
    trainable = count_trainable(model)
    print("trainable parameters: " + ", ".join(f"{k} {v:,}" for k, v in trainable.items()))

    metrics_path = out / "metrics.jsonl"
    resume_from = get_last_checkpoint(str(out)) if cfg.resume and out.exists() else None
    if cfg.resume and resume_from is None:
        print(f"--resume: no complete checkpoint in {out}, starting from the beginning")
    if resume_from is None and metrics_path.exists():
        metrics_path.unlink()
    trainer = N2EyeTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=collator,
        processing_class=processor,
        callbacks=[MetricsCallback(metrics_path), *(callbacks or [])],
        lr_groups={"lr": cfg.lr, "vision_lr": cfg.vision_lr, "weight_decay": cfg.weight_decay},
    )
    trainer.train(resume_from_checkpoint=resume_from)
    if eval_set is not None:
        trainer.evaluate()  # logged (metrics.jsonl, loss curve) by the callbacks

    final_model = trainer.model
    target = out / ("adapter" if cfg.train == "lora" and not cfg.merge else "merged" if cfg.train == "lora" else "final")
    if not trainer.is_world_process_zero():  # data parallel: rank 0 writes the results
        return target
    summary = {
        "config": dataclasses.asdict(cfg),
        "train_conversations": n_conversations,
        "train_rows": None if cfg.streaming else len(train_set),
        "abstention_conversations": None if abstention is None or cfg.streaming else abstention.count,
        "skipped": report.to_dict(),
        "eval_skipped": eval_report.to_dict() if eval_set is not None else None,
        "trainable_parameters": trainable,
        "global_step": trainer.state.global_step,
        "final_train_loss": next(
            (h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), math.nan
        ),
    }
    (out / "skipped.json").write_text(json.dumps(summary["skipped"], indent=2) + "\n")
    png = plot_loss_curve(metrics_path, out / "loss_curve.png")
    summary["loss_curve"] = str(png) if png else None
    summary["model"] = str(target)
    if cfg.train == "lora":
        final_model.save_pretrained(out / "adapter")
        processor.save_pretrained(out / "adapter")
        record_training(out / "adapter", summary, base=cfg.model)  # the run's record and card, over PEFT's
        if cfg.merge:
            final_model = merge_lora(final_model)
    if cfg.train != "lora" or cfg.merge:  # the base's records, this run's, and the card rendered from them
        records = {**lineage_records(cfg.model), TRAIN_RECORD: training_record(summary)}
        save_checkpoint(final_model, processor, target, generation_config=final_model.generation_config,
                        extra_json=records)  # fmt: skip
    (out / "train_result.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print(f"model: {target}\nloss curve: {png}\nskipped rows: {report.summary()}")
    return target
