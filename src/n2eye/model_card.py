"""Model cards: the `README.md` of every checkpoint folder N2-Eye writes, rendered from the folder's own records.

A checkpoint that leaves N2-Eye should say what it is. Each command that writes a folder leaves a JSON record in
it (`n2eye_build.json`, `n2eye_train.json`, `n2eye_merge.json`, `n2eye_convert.json`; `n2eye eval` adds
`n2eye_eval.json`), and the records a folder was made from travel with it (a trained folder keeps its base's build
record, an export keeps the trained folder's). The card is rendered from those records, `config.json` and the
weights' own headers, never from hand-written text, so it is rewritten whenever a record changes.

Rule for an existing README.md: N2-Eye rewrites it only when it carries `MARKER` (every card N2-Eye writes does);
one without the marker is someone else's (a user's notes, a hub repository's card) and is left alone. Delete the
marker line from a card to keep hand edits. Folders a command has just created itself are the exception
(`replace_foreign=True`): there a README.md can only be a library's template, such as PEFT's adapter card.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .checkpoint import write_json_atomic, write_text_atomic

CARD = "README.md"
MARKER = "<!-- n2eye:model-card -->"
BUILD_RECORD = "n2eye_build.json"
TRAIN_RECORD = "n2eye_train.json"
MERGE_RECORD = "n2eye_merge.json"
EVAL_RECORD = "n2eye_eval.json"
CONVERT_RECORD = "n2eye_convert.json"  # = checkpoint.CONVERT_REPORT (not imported: checkpoint imports this module)
# Records describing where the weights came from; copied into every folder made from a folder that has them.
LINEAGE_RECORDS = (BUILD_RECORD, TRAIN_RECORD, MERGE_RECORD)
TAGS = ["n2eye", "lfm2", "siglip"]
# Licenses of the backbones N2-Eye builds from, by hub id prefix (case-insensitive): (license, license_name).
KNOWN_LICENSES = {
    "liquidai/lfm2": ("other", "lfm1.0"),  # LFM2, LFM2-VL, LFM2.5: the LFM Open License v1.0
    "google/siglip": ("apache-2.0", None),  # SigLIP and SigLIP2
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_PARTS = {"model.language_model.": "language model", "lm_head.": "language model",
          "model.vision_tower.": "vision encoder", "model.multi_modal_projector.": "projector"}  # fmt: skip


# ---- records -------------------------------------------------------------------------------------------------------
def read_json(path: Path) -> dict[str, Any] | None:
    """A record, or None when missing or unreadable (a damaged record must not stop a card or a command)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_records(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Every N2-Eye record in `folder` (plus config.json, adapter_config.json), by file name."""
    folder = Path(folder)
    names = (*LINEAGE_RECORDS, CONVERT_RECORD, EVAL_RECORD, "config.json", "adapter_config.json")
    return {name: record for name in names if (record := read_json(folder / name)) is not None}


def lineage_records(source: str | Path | None) -> dict[str, dict[str, Any]]:
    """The records of a local `source` folder that say where its weights came from, to carry into a folder made
    from it (a hub id or a folder without records gives none)."""
    if source is None or not Path(source).expanduser().is_dir():
        return {}
    records = read_records(Path(source).expanduser())
    return {name: records[name] for name in LINEAGE_RECORDS if name in records}


def hub_dataset_ids(specs: str | None) -> list[str]:
    """The training data SPECs that are hub datasets (`owner/name[:split]` with no such local path); decided when
    the run is recorded, where relative paths still resolve."""
    from .data.sources import parse_spec

    ids = []
    for spec in (s.strip() for s in str(specs or "").split(",")):
        target, _ = parse_spec(spec) if spec else ("", None)
        file_like = target.lower().endswith((".json", ".jsonl", ".parquet", ".csv", ".arrow"))
        if _HUB_ID.fullmatch(target) and not file_like and not os.path.exists(os.path.expanduser(target)):
            ids.append(target)
    return list(dict.fromkeys(ids))


def training_record(summary: Mapping[str, Any]) -> dict[str, Any]:
    """`n2eye_train.json`: the run's train_result.json plus the hub ids of its data (for the card's metadata)."""
    config = summary.get("config") or {}
    return {**summary, "hub_datasets": hub_dataset_ids(config.get("data"))}


def record_training(folder: str | Path, summary: Mapping[str, Any], base: str | None) -> Path | None:
    """After `n2eye train` wrote `folder` without a card (the LoRA adapter: PEFT's own save): the base's lineage,
    the run's record and the card. The folder is the run's own, so PEFT's template README is replaced."""
    folder = Path(folder)
    for name, record in {**lineage_records(base), TRAIN_RECORD: training_record(summary)}.items():
        write_json_atomic(folder / name, record)
    return write_card(folder, replace_foreign=True)


# ---- evaluation record -----------------------------------------------------------------------------------------------
_EVAL_CONFIG_KEYS = ("data", "format", "protocol", "blank_images", "quantize", "gguf", "max_new_tokens", "max_samples",
                     "max_image_tokens", "min_image_tokens", "image_splitting")  # fmt: skip


def eval_record(result: Mapping[str, Any], out_path: str | Path | None) -> dict[str, Any]:
    """The latest eval's figures without its per-turn lists (`predictions`, `turns`: the result file has them)."""
    config = result.get("config") or {}
    record = {k: v for k, v in result.items() if k not in ("predictions", "turns", "config")}
    record["protocol"] = result.get("protocol") or config.get("protocol") or "exact"
    record["config"] = {k: config[k] for k in _EVAL_CONFIG_KEYS if k in config}
    record["result_file"] = str(Path(out_path).resolve()) if out_path else None
    record["recorded_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return record


def eval_kind(record: Mapping[str, Any]) -> str:
    """Which evaluation a record is (`exact`, `crag-mm`, each optionally `+blank-images`, `+int8`, `+gguf`): one
    latest result is kept per kind, so a blank-image baseline run after the real eval (as `n2eye demo` does) does
    not hide it."""
    cfg = record.get("config") or {}
    qualifiers = [
        "blank-images" if cfg.get("blank_images") else "",
        cfg.get("quantize") or "",
        "gguf" if cfg.get("gguf") else "",
    ]
    return "+".join([str(record.get("protocol") or "exact"), *[q for q in qualifiers if q]])


def record_eval(
    model_dir: str | Path | None, result: Mapping[str, Any], out_path: str | Path | None = None
) -> Path | None:
    """Keeps an `n2eye eval` result in the evaluated local folder (`n2eye_eval.json`: the latest of each
    `eval_kind`) and re-renders its card; returns the record's path. This is the hook for every eval protocol
    (`eval.runner.evaluate` calls it for exact match and crag-mm). A hub id is skipped; a folder that can't be
    written gets a warning, never an error: the eval itself succeeded and its result file is written."""
    if model_dir is None or not Path(model_dir).expanduser().is_dir():
        return None  # a hub id or a remote agent: nothing local to describe
    folder = Path(model_dir).expanduser()
    path = folder / EVAL_RECORD
    record = eval_record(result, out_path)
    evals = (read_json(path) or {}).get("evals")
    evals = {**(evals if isinstance(evals, dict) else {}), eval_kind(record): record}
    try:
        write_json_atomic(path, {"evals": evals})
        write_card(folder)
    except OSError as err:
        print(f"warning: could not record this eval in {folder} ({err}); its result is in {out_path}")
        return None
    return path


# ---- front matter ------------------------------------------------------------------------------------------------------
def base_models(records: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The backbones the weights started from: [{"role", "source", "random"}], from the build record (its
    `sources`, or for older records the preset / --lm / --vision), or the import's source."""
    build = records.get(BUILD_RECORD)
    if build is not None:
        sources = build.get("sources")
        if sources is None:  # recorded before builds named their resolved sources
            from .presets import PRESETS

            cfg = build.get("build") or {}
            preset = PRESETS.get(cfg.get("preset") or "")
            sources = {"lm": cfg.get("lm") or (preset and preset.lm), "vision": cfg.get("vision") or (preset and preset.vision),
                       "random_init": cfg.get("random_init", False)}  # fmt: skip
        random = bool(sources.get("random_init"))
        return [{"role": role, "source": sources.get(key), "random": random}
                for key, role in (("lm", "language model"), ("vision", "vision encoder")) if sources.get(key)]  # fmt: skip
    convert = records.get(CONVERT_RECORD) or {}
    if convert.get("to") == "n2eye" and convert.get("converted_from"):
        return [{"role": "LFM2-VL model", "source": convert["converted_from"], "random": False}]
    return []


def is_hub_id(source: str) -> bool:
    """`owner/name` that is not a local path (as recorded; local sources are kept in the body, not the metadata)."""
    return bool(_HUB_ID.fullmatch(source)) and not os.path.isabs(source) and not os.path.exists(source)


def license_of(sources: list[str]) -> tuple[str | None, str | None]:
    """(license, license_name) of a model made from `sources`: known only when every source's is; the LFM Open
    License governs anything made from LFM2. None when unknown (the card then names no license)."""
    found = []
    for source in sources:
        match = next((v for k, v in KNOWN_LICENSES.items() if source.lower().startswith(k)), None)
        if match is None:
            return None, None
        found.append(match)
    if not found:
        return None, None
    if ("other", "lfm1.0") in found:
        return "other", "lfm1.0"
    return found[0] if len(set(found)) == 1 else (None, None)


def folder_kind(records: Mapping[str, Mapping[str, Any]]) -> str:
    """What loads this folder: `n2eye` (remote code), `lfm2_vl` (native transformers), `gguf` (llama.cpp) or
    `adapter` (PEFT LoRA)."""
    if (records.get(CONVERT_RECORD) or {}).get("to") == "gguf":
        return "gguf"
    model_type = (records.get("config.json") or {}).get("model_type")
    if model_type in ("n2eye", "lfm2_vl"):
        return model_type
    return "adapter" if "adapter_config.json" in records else "n2eye"


def card_data(records: Mapping[str, Mapping[str, Any]]):
    """Hub metadata (`huggingface_hub.ModelCardData`): library, task, base models, data sets, license, tags."""
    from huggingface_hub import ModelCardData

    trained = [base for base in base_models(records) if not base["random"]]
    hub_sources = [base["source"] for base in trained if is_hub_id(base["source"])]
    license_, license_name = license_of([base["source"] for base in trained])
    datasets = (records.get(TRAIN_RECORD) or {}).get("hub_datasets") or None
    kwargs = {"license_name": license_name} if license_name else {}
    return ModelCardData(
        library_name={"adapter": "peft", "gguf": "gguf"}.get(folder_kind(records), "transformers"),
        pipeline_tag="image-text-to-text",
        base_model=hub_sources or None,
        datasets=datasets,
        license=license_,
        tags=list(TAGS),
        **kwargs,
    )


# ---- body sections -----------------------------------------------------------------------------------------------------
def number(value: Any) -> str:
    """Figures as the card prints them: integers with separators, floats to 4 decimals, missing as '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def setting(value: Any) -> Any:
    """A recipe value as it was given (2e-05, 1, 0.05), not as a measured figure."""
    return f"{value:g}" if isinstance(value, float) else value


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table; cells go through `number`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(number(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def parameter_counts(folder: Path) -> dict[str, int]:
    """Parameters per part, read from the safetensors headers (shapes only, no weights loaded): the weights that
    are actually in the folder, whatever wrote it. Tied embeddings are stored once, so counted once."""
    from safetensors import safe_open

    index = read_json(folder / "model.safetensors.index.json")
    files = sorted(set(index["weight_map"].values())) if index else ["model.safetensors"]
    counts = dict.fromkeys(("language model", "vision encoder", "projector"), 0)
    for name in files:
        if not (folder / name).is_file():
            return {}
        with safe_open(str(folder / name), "pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                part = next((p for prefix, p in _PARTS.items() if key.startswith(prefix)), "other")
                size = 1
                for dim in handle.get_slice(key).get_shape():
                    size *= dim
                counts[part] = counts.get(part, 0) + size
    counts["total"] = sum(counts.values())
    return counts


def how_made(records: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """One line per step that made these weights, oldest first."""
    lines = []
    build = records.get(BUILD_RECORD)
    if build is not None:
        cfg = build.get("build") or {}
        what = f"preset `{cfg['preset']}`" if cfg.get("preset") else "`--lm` / `--vision`"
        random = (
            " with random weights (`--random-init`: the preset's shapes, no download)" if cfg.get("random_init") else ""
        )
        lines.append(
            f"`n2eye build` from {what}{random}, {cfg.get('dtype', 'float32')}, projector seed {cfg.get('seed')}"
        )
    train = records.get(TRAIN_RECORD)
    if train is not None:
        cfg = train.get("config") or {}
        lines.append(f"`n2eye train --train {cfg.get('train')}` from `{cfg.get('model')}` on `{cfg.get('data')}`, "
                     f"{number(train.get('global_step'))} steps")  # fmt: skip
    merge = records.get(MERGE_RECORD)
    if merge is not None:
        lines.append(f"`n2eye merge`: LoRA adapter `{merge.get('adapter')}` merged into `{merge.get('base')}`")
    convert = records.get(CONVERT_RECORD)
    if convert is not None:
        lines.append(f"`n2eye convert --to {convert.get('to')}` from `{convert.get('converted_from')}`")
    return lines


def section_details(folder: Path, records: Mapping[str, Mapping[str, Any]]) -> str:
    """Model details: what it is made of, how, and its parameter counts per part."""
    lines = ["## Model details", ""]
    for base in base_models(records):
        note = " (shapes only: weights randomly initialised)" if base["random"] else ""
        lines.append(f"- Base {base['role']}: `{base['source']}`{note}")
    kind = folder_kind(records)
    convert = records.get(CONVERT_RECORD) or {}
    formats = {"n2eye": "N2-Eye (loads with `trust_remote_code=True`)", "adapter": "LoRA adapter (PEFT)",
               "lfm2_vl": "transformers Lfm2Vl (native, no remote code)",
               "gguf": f"GGUF for llama.cpp ({convert.get('quant')} language model weights)"}  # fmt: skip
    lines.append(f"- Format: {formats[kind]}")
    lines.append("- Model type: image-text-to-text (multimodal conversational)")
    license_, license_name = license_of([b["source"] for b in base_models(records) if not b["random"]])
    lines.append(f"- License: {license_name or license_ or 'not known from the sources; check each base model'}")
    made = how_made(records)
    if made:
        lines += ["- Made by:", *[f"  {n}. {line}" for n, line in enumerate(made, 1)]]
    if kind == "gguf":
        return "\n".join([*lines, *gguf_files(convert)])
    counts = parameter_counts(folder)
    if counts:
        lines += ["", table(["part", "parameters"], [[part, n] for part, n in counts.items() if n or part == "total"])]
    return "\n".join(lines)


def gguf_files(report: Mapping[str, Any]) -> list[str]:
    """The GGUF files of an export and what is in them (from its `n2eye_convert.json`)."""
    rows = [[part.replace("_", " "), info.get("file"), info.get("tensors"), ", ".join(info.get("types") or [])]
            for part in ("language_model", "mmproj") if isinstance(info := report.get(part), Mapping)]  # fmt: skip
    lines = ["", table(["part", "file", "tensors", "types"], rows), "",
             f"Language model parameters: {number(report.get('parameters'))}."]  # fmt: skip
    if report.get("mmproj_skipped"):
        lines += ["", f"No vision projector file (mmproj): {report['mmproj_skipped']}"]
    return lines


def section_architecture(config: Mapping[str, Any]) -> str:
    """Architecture, from config.json: the LM, the vision encoder and the projector between them."""
    if not config:
        return ""
    text, vision = config.get("text_config") or {}, config.get("vision_config") or {}
    naflex = vision.get("model_type") == "siglip2_vision_model"
    resolution = "native resolution (NaFlex)" if naflex else f"{vision.get('image_size')} px"
    projector = config.get("projector_type") or (
        "pixel_unshuffle_mlp" if config.get("model_type") == "lfm2_vl" else "mlp"
    )
    factor = (
        f", pixel unshuffle {config.get('downsample_factor')}x{config.get('downsample_factor')}"
        if "unshuffle" in projector
        else ""
    )
    rows = [
        ["language model", (f"{text.get('model_type')}: hidden {text.get('hidden_size')}, "
                            f"{text.get('num_hidden_layers')} layers, vocabulary {text.get('vocab_size')}")],
        ["vision encoder", (f"{vision.get('model_type')}: {resolution}, patch {vision.get('patch_size')}, hidden "
                            f"{vision.get('hidden_size')}, {vision.get('num_hidden_layers')} layers")],
        ["projector", f"{projector}{factor}, hidden {config.get('projector_hidden_size') or text.get('hidden_size')}"],
        ["vision feature layer", str(config.get("vision_feature_layer", -1))],
        ["image token id", str(config.get("image_token_id"))],
        ["tied embeddings", bool(config.get("tie_word_embeddings", True))],
        ["weights dtype", config.get("dtype") or config.get("torch_dtype") or text.get("dtype")],
    ]  # fmt: skip
    intro = ("Images are encoded by the vision encoder, projected into the language model's embedding space and "
             "placed at the `<image>` token positions of the chat template.")  # fmt: skip
    return "\n".join(["## Architecture", "", intro, "", table(["", ""], rows)])


def _skip_line(skipped: Mapping[str, Any] | None, what: str) -> str:
    if not skipped:
        return f"- {what}: no skip report"
    reasons = ", ".join(f"{reason} {n}" for reason, n in (skipped.get("reasons") or {}).items())
    return (f"- {what}: {number(skipped.get('kept'))} kept, {number(skipped.get('skipped'))} skipped"
            f"{f' ({reasons})' if reasons else ''}, {number(skipped.get('truncated'))} truncated")  # fmt: skip


def untrained(records: Mapping[str, Mapping[str, Any]]) -> bool:
    """Built by N2-Eye and never trained since (an import's training is its authors', not recorded here)."""
    return BUILD_RECORD in records and TRAIN_RECORD not in records


def section_training(records: Mapping[str, Mapping[str, Any]]) -> str:
    """Training: the data (rows, skips), the recipe actually run and its outcome, from `n2eye_train.json`."""
    train = records.get(TRAIN_RECORD)
    lines = ["## Training", ""]
    if train is None:
        if untrained(records):
            lines.append("Not trained yet: the projector is randomly initialised, so the model does not use its images "
                         "until `n2eye train` has run on it.")  # fmt: skip
        else:
            lines.append("Not trained by N2-Eye: converted as it was published; see the source's own card.")
        return "\n".join(lines)
    cfg = train.get("config") or {}
    lines += ["### Data", "", f"- Training data: `{cfg.get('data')}` (format {cfg.get('format')})",
              f"- Conversations read: {number(train.get('train_conversations'))}; training rows: "
              f"{number(train.get('train_rows'))}" + (" (streamed)" if cfg.get("streaming") else ""),
              _skip_line(train.get("skipped"), "Rows")]  # fmt: skip
    if cfg.get("abstain_fraction"):
        lines.append(f"- Abstention: {setting(cfg['abstain_fraction'])} of the conversations with images had them "
                     f"withheld and their answers replaced by {cfg.get('abstain_answer')!r} "
                     f"({number(train.get('abstention_conversations'))} conversations)")  # fmt: skip
    if cfg.get("eval_data"):
        lines += [f"- Held-out data: `{cfg['eval_data']}`", _skip_line(train.get("eval_skipped"), "Held-out rows")]
    bf16 = "bfloat16 mixed precision" if cfg.get("bf16") else "float32"
    recipe = [[name, setting(value)] for name, value in [
        ["mode", f"{cfg.get('train')}" + (" + vision tower" if cfg.get("train_vision") else "")],
        ["learning rate", cfg.get("lr")], ["vision learning rate", cfg.get("vision_lr") if cfg.get("train_vision") else None],
        ["schedule", f"{cfg.get('lr_schedule')}, warmup ratio {cfg.get('warmup_ratio')}"],
        ["weight decay", cfg.get("weight_decay")],
        ["batch size (per device)", cfg.get("batch_size")], ["gradient accumulation", cfg.get("grad_accum")],
        ["epochs", cfg.get("epochs")], ["max steps", cfg.get("max_steps") if (cfg.get("max_steps") or 0) > 0 else None],
        ["max length (tokens)", cfg.get("max_length")], ["precision", bf16],
        ["gradient checkpointing", cfg.get("gradient_checkpointing")], ["packing", cfg.get("pack")],
        ["last turn only", cfg.get("last_turn_only")], ["seed", cfg.get("seed")],
    ]]  # fmt: skip
    if cfg.get("train") == "lora":
        recipe.append(
            ["LoRA r / alpha / dropout", f"{cfg.get('lora_r')} / {cfg.get('lora_alpha')} / {cfg.get('lora_dropout')}"]
        )
    trainable = train.get("trainable_parameters") or {}
    results = [["steps", train.get("global_step")], ["final train loss", train.get("final_train_loss")],
               *[[f"trainable: {part.replace('_', ' ')}", n] for part, n in trainable.items()]]  # fmt: skip
    lines += ["", "### Recipe", "", table(["setting", "value"], [r for r in recipe if r[1] is not None]),
              "", "### Results", "", table(["", ""], results)]  # fmt: skip
    return "\n".join(lines)


def _exact_eval(record: Mapping[str, Any]) -> list[str]:
    per_type = record.get("per_type") or {}
    extras = ["mean_iou", "name_acc", "args_acc", "parse_rate"]
    used = [e for e in extras if any(e in s for s in per_type.values())]
    rows = [[qtype, s.get("n"), s.get("mean_score"), *[s.get(e) for e in used]] for qtype, s in per_type.items()]
    return [(f"Exact match: overall {number(record.get('overall'))} (every turn equal), macro "
             f"{number(record.get('macro'))} (every question type equal), {number(record.get('n'))} turns; "
             f"answers cut at --max-new-tokens: {number(record.get('cut_at_max_new_tokens'))}."), "",
            table(["question type", "n", "score", *used], rows)]  # fmt: skip


def _crag_eval(record: Mapping[str, Any]) -> list[str]:
    header = ["", "n", "correct", "missing", "hallucination", "accuracy", "hallucination rate", "truthfulness",
              "multi-turn score"]  # fmt: skip
    keys = ["n", "correct", "missing", "hallucination", "accuracy", "hallucination_rate", "truthfulness",
            "multi_turn_conversation_score"]  # fmt: skip

    def rows(metrics: Mapping[str, Any]) -> list[list[Any]]:
        return [[name, *[m.get(k) for k in keys]] for name, m in metrics.items() if isinstance(m, Mapping)]

    judge = record.get("judge")
    lines = [f"CRAG-MM truthfulness protocol, answers cut to {record.get('max_answer_tokens')} tokens; judge: "
             + (f"`{judge.get('model')}`" if judge else "none (exact match only)") + ".", "",
             table(header, rows({"overall": record.get("overall") or {}, "egocentric": record.get("egocentric") or {}}))]  # fmt: skip
    for key, value in record.items():
        if key.startswith("per_") and isinstance(value, Mapping) and value:
            lines += ["", f"By {key[4:].replace('_', ' ')}:", "", table([key[4:], *header[1:]], rows(value))]
    if record.get("note"):
        lines += ["", f"Note: {record['note']}"]
    return lines


def recorded_evals(records: Mapping[str, Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The kept eval results, plain ones first (then blank-image baselines, quantized, GGUF)."""
    evals = (records.get(EVAL_RECORD) or {}).get("evals")
    if not isinstance(evals, dict):
        return []
    return [evals[kind] for kind in sorted(evals, key=lambda k: (k.count("+"), k)) if isinstance(evals[kind], dict)]


def section_evaluation(records: Mapping[str, Mapping[str, Any]]) -> str:
    """The latest `n2eye eval` of each kind on this folder (`n2eye_eval.json`)."""
    lines = ["## Evaluation", ""]
    evals = recorded_evals(records)
    if not evals:
        lines.append("No evaluation recorded for this folder yet; `n2eye eval --model THIS_FOLDER --data HELD_OUT "
                     "--out result.json` records its result here.")  # fmt: skip
    for record in evals:
        cfg = record.get("config") or {}
        title = "CRAG-MM" if record.get("protocol") == "crag-mm" else "Exact match"
        flags = [flag for flag, on in (("blank images", cfg.get("blank_images")), (f"{cfg.get('quantize')} weights",
                 cfg.get("quantize")), ("through llama.cpp", cfg.get("gguf"))) if on]  # fmt: skip
        lines += [f"### {title}" + (f" ({', '.join(flags)})" if flags else ""), "",
                  (f"Latest `n2eye eval` ({record.get('recorded_at')}) on `{cfg.get('data')}`; full result: "
                   f"`{record.get('result_file')}`."), ""]  # fmt: skip
        lines += _crag_eval(record) if record.get("protocol") == "crag-mm" else _exact_eval(record)
        skipped = record.get("skipped")
        if skipped and skipped.get("skipped"):
            lines += ["", _skip_line(skipped, "Held-out rows")]
        lines.append("")
    return "\n".join(lines).rstrip()


def section_usage(model_id: str, records: Mapping[str, Mapping[str, Any]]) -> str:
    """How to load it: transformers (with the N2-Eye remote code, natively for an Lfm2Vl export) and the CLI."""
    kind = folder_kind(records)
    if kind == "gguf":
        return gguf_usage(model_id, records.get(CONVERT_RECORD) or {})
    config = records.get("config.json") or {}
    if kind == "adapter":
        return (f"## Usage\n\nA LoRA adapter: merge it into its base model, then use the merged folder.\n\n```bash\n"
                f"n2eye merge --adapter {model_id} --out merged\n```")  # fmt: skip
    native = config.get("model_type") == "lfm2_vl"
    remote = "" if native else ", trust_remote_code=True"
    snippet = f'''```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model_id = "{model_id}"
model = AutoModelForImageTextToText.from_pretrained(model_id{remote})
processor = AutoProcessor.from_pretrained(model_id{remote})
messages = [{{"role": "user", "content": [{{"type": "image", "url": "photo.jpg"}},
                                        {{"type": "text", "text": "What is in this picture?"}}]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt")
outputs = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(outputs[0][inputs["input_ids"].shape[-1]:], skip_special_tokens=True))
```'''
    if native:
        cli = ["```bash", f"vllm serve {model_id}", "```"]
    else:
        cli = ["```bash", f'n2eye generate --model {model_id} --image photo.jpg --prompt "What is in this picture?"',
               f"n2eye chat --model {model_id}", f"n2eye serve --model {model_id}",
               f"n2eye eval --model {model_id} --data HELD_OUT --out result.json"
               + ("" if is_hub_id(model_id) else "   # records its result in this card"),
               "```"]  # fmt: skip
    return "\n".join(
        ["## Usage", "", snippet, "", "With the `n2eye` command line:" if not native else "Served:", "", *cli]
    )


def gguf_usage(model_id: str, report: Mapping[str, Any]) -> str:
    """llama.cpp's commands for an export, as `n2eye convert` prints them, and `n2eye eval --gguf`."""
    lm = f"{model_id}/{(report.get('language_model') or {}).get('file')}"
    mmproj = report.get("mmproj")
    if isinstance(mmproj, Mapping):
        tokens = mmproj.get("image_tokens")
        fixed = f" --image-min-tokens {tokens} --image-max-tokens {tokens}" if tokens else ""
        run = f'llama-mtmd-cli -m {lm} --mmproj {model_id}/{mmproj.get("file")}{fixed} --image photo.jpg -p "What is in this picture?"'
    else:
        run = f"llama-cli -m {lm}   # text only: no mmproj for this shape"
    source = report.get("converted_from")
    return "\n".join(["## Usage", "", "```bash", run,
                      f"n2eye eval --gguf {model_id} --model {source} --data HELD_OUT --out result.json   # records its result here",
                      "```"])  # fmt: skip


def section_limitations(records: Mapping[str, Mapping[str, Any]]) -> str:
    """What the records say this model can't be trusted with, then what holds for every N2-Eye."""
    lines = ["## Limitations", ""]
    bases = base_models(records)
    if any(b["random"] for b in bases):
        lines.append("- Random weights: built with `--random-init` for its shapes; it has learned nothing.")
    if untrained(records):
        lines.append("- Untrained projector: until trained, answers do not depend on the image.")
    train = records.get(TRAIN_RECORD) or {}
    cfg = train.get("config") or {}
    if train and not cfg.get("train_vision"):
        lines.append("- Frozen vision encoder: it was not adapted to new visual domains.")
    if train and isinstance(train.get("train_rows"), int):
        lines.append(f"- Training scale: {number(train['train_rows'])} training rows; expect gaps outside that data.")
    if any(e.get("protocol") == "crag-mm" and not e.get("judge") for e in recorded_evals(records)):
        lines.append("- The CRAG-MM figures had no LLM judge: hallucinations are an upper bound.")
    lines += ["- Scores above are from the recorded data only; they do not measure safety or factuality elsewhere.",
              "- Like every language model it can state wrong things confidently; check answers that matter."]  # fmt: skip
    return "\n".join(lines)


# ---- the card --------------------------------------------------------------------------------------------------------
def card_title(path: Path) -> str:
    """A local folder's title: a run's `final` / `merged` / `adapter` folder is named after its run (`colours/final`)."""
    if path.name in ("final", "merged", "adapter") and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name


def render_card(folder: str | Path, model_id: str | None = None) -> str:
    """The card's full text for `folder`. `model_id`: the path or hub id the usage snippets load (default: the
    folder's absolute path)."""
    from huggingface_hub import ModelCard

    folder = Path(folder)
    records = read_records(folder)
    model_id = model_id or str(folder.resolve())
    name = model_id if is_hub_id(model_id) else card_title(Path(model_id))
    sources = ", ".join(sorted(r for r in records if r.startswith("n2eye_"))) or "config.json"
    intro = (f"An N2-Eye vision-language model (LFM2 language model + SigLIP vision encoder + projector). This card "
             f"is written by N2-Eye from the records in this folder ({sources}) and rewritten when they change; "
             "delete the marker line above to keep your own edits.")  # fmt: skip
    sections = [f"# {name}", MARKER, intro, section_details(folder, records),
                section_architecture(records.get("config.json") or {}), section_training(records),
                section_evaluation(records), section_usage(model_id, records), section_limitations(records)]  # fmt: skip
    body = "\n\n".join(section.strip() for section in sections if section and section.strip()) + "\n"
    return str(ModelCard(f"---\n{card_data(records).to_yaml()}\n---\n\n{body}"))


def is_ours(path: Path) -> bool:
    """A README.md N2-Eye may rewrite: it carries the marker."""
    try:
        return MARKER in path.read_text(errors="replace")
    except OSError:
        return False


def write_card(folder: str | Path, model_id: str | None = None, replace_foreign: bool = False) -> Path | None:
    """Writes `folder/README.md` atomically; returns its path, or None when an existing README.md is not N2-Eye's
    (no marker) and `replace_foreign` is off, which is then said once on stdout."""
    folder = Path(folder)
    path = folder / CARD
    if path.exists() and not replace_foreign and not is_ours(path):
        print(f"note: {path} was not written by N2-Eye (no {MARKER} line); left as it is, card not updated")
        return None
    write_text_atomic(path, render_card(folder, model_id))
    return path


__all__ = ["CARD", "EVAL_RECORD", "MARKER", "lineage_records", "read_records", "record_eval", "record_training",
           "render_card", "write_card"]  # fmt: skip
