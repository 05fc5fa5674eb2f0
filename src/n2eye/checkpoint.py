"""Writing complete, self-contained N2-Eye checkpoint folders, atomically.

A folder holds the weights (safetensors, tied embeddings stored once), config with `auto_map`, tokenizer,
image processor, processor config, `chat_template.jinja`, `generation_config.json` and the `modeling/` files,
so `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works in a fresh process with only
transformers installed. Training reuses this for its checkpoints.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from transformers import GenerationConfig

# Files copied verbatim into every checkpoint; one source of truth (tests check the copies are identical).
MODELING_FILES = (
    "configuration_n2eye.py",
    "modeling_n2eye.py",
    "processing_n2eye.py",
    "image_io.py",
    "image_policy.py",
    "naflex_images.py",
    "packed_attention.py",
    "tool_calls.py",
)
MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_n2eye.N2EyeConfig",
    "AutoModel": "modeling_n2eye.N2EyeModel",
    "AutoModelForCausalLM": "modeling_n2eye.N2EyeForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_n2eye.N2EyeForConditionalGeneration",
}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_n2eye.N2EyeProcessor"}
# LFM2-VL's recommended text generation settings (model card).
GENERATION_DEFAULTS = {"do_sample": True, "temperature": 0.1, "min_p": 0.15, "repetition_penalty": 1.05}


def modeling_source_dir() -> Path:
    return Path(str(resources.files("n2eye").joinpath("modeling")))


def copy_modeling_files(out_dir: str | Path) -> None:
    """Copies the shipped modeling files (and the chat template) into a checkpoint folder."""
    src = modeling_source_dir()
    for name in (*MODELING_FILES, "chat_template.jinja"):
        shutil.copyfile(src / name, Path(out_dir) / name)


def default_generation_config(tokenizer, **overrides) -> GenerationConfig:
    """Generation settings that stop at `<|im_end|>`, never sample structure tokens (`<image>`, `<|im_start|>`, ...)
    and use LFM2-VL's sampling defaults."""
    from .modeling.processing_n2eye import never_generated_token_ids

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    settings = {
        **GENERATION_DEFAULTS,
        "suppress_tokens": never_generated_token_ids(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": im_end,
        "pad_token_id": tokenizer.pad_token_id,
        **overrides,
    }
    return GenerationConfig(**settings)


CONVERT_REPORT = "n2eye_convert.json"  # written by `n2eye convert` into every folder it makes


def is_n2eye_checkpoint(folder: Path) -> bool:
    """True for a folder holding an N2-Eye config, or one `n2eye convert` wrote (safe to replace with a newer one)."""
    if (folder / CONVERT_REPORT).is_file():
        return True
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "n2eye"
    except (OSError, ValueError):
        return False


def check_writable(out_dir: str | Path, need_bytes: int = 0) -> None:
    """Fails early (before any long work) when the output folder can't be written or the disk is too full."""
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise OSError(f"--out {out} is a file, not a folder; choose a folder path.")
    if out.is_dir() and any(out.iterdir()) and not is_n2eye_checkpoint(out):
        raise OSError(
            f"{out} exists and is not an N2-Eye checkpoint; refusing to replace it. Choose a new or empty folder."
        )
    parent = out.parent
    for ancestor in (parent, *parent.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise OSError(f"Cannot create {parent}: {ancestor} is a file, not a folder. Choose another --out.")
            break
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"Cannot create {parent}: {err}. Choose another --out folder.") from err
    if not os.access(parent, os.W_OK):
        raise PermissionError(f"Output folder {parent} is not writable. Choose another --out folder.")
    free = shutil.disk_usage(parent).free
    if need_bytes and free < need_bytes * 1.1:
        raise OSError(
            f"Not enough disk space in {parent}: {free / 1e9:.2f} GB free, about {need_bytes / 1e9:.2f} GB needed."
        )


def check_file_writable(path: str | Path) -> Path:
    """For result files: the folder exists (or can be made) and is writable, and the path is not a folder."""
    out = Path(path).expanduser().resolve()
    if out.is_dir():
        raise OSError(f"{out} is a folder; give a file path such as {out / 'result.json'}.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"Cannot create {out.parent}: {err}. Choose another output path.") from err
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(f"{out.parent} is not writable. Choose another output path.")
    return out


def write_text_atomic(path: Path, text: str) -> None:
    """tmp + replace: a reader (or a killed writer) never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: Path, payload: Any) -> None:
    """A JSON file (indented, anything not JSON as its str) written atomically."""
    write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def atomic_write_dir(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Runs `write(tmp_dir)` then renames tmp_dir to out_dir, so a crash never leaves a half-written folder.
    An existing out_dir is replaced only after the new one is complete."""
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_checkpoint(
    model,
    processor,
    out_dir: str | Path,
    generation_config: GenerationConfig | None = None,
    extra_json: dict[str, dict] | None = None,
) -> Path:
    """Saves model + processor + modeling code (+ `extra_json` files, the records) and the model card rendered from
    them (`model_card`) as one loadable folder, atomically."""
    from .model_card import write_card

    model.config.auto_map = dict(MODEL_AUTO_MAP)
    processor.auto_map = dict(PROCESSOR_AUTO_MAP)
    if generation_config is not None:
        model.generation_config = generation_config

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp, max_shard_size="2GB")
        processor.save_pretrained(tmp)
        copy_modeling_files(tmp)
        for name, payload in (extra_json or {}).items():
            (tmp / name).write_text(json.dumps(payload, indent=2, default=str) + "\n")
        write_card(tmp, model_id=str(Path(out_dir).expanduser().resolve()))

    return atomic_write_dir(out_dir, write)
