"""Turning a `--data SPEC` string into a `datasets` Dataset (or IterableDataset when streaming).

SPEC is a local file (json, jsonl, parquet, csv, arrow), a folder (a `save_to_disk` dataset, or data files
that `datasets` can read, split names taken from the file names), or a hub dataset name; `:split` is
optional. Files default to the split "train"; folders and hub datasets take "train", else "validation",
else their first split (CRAG-MM ships only validation/public_test).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import datasets

AnyDataset = datasets.Dataset | datasets.IterableDataset

FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
PREFERRED_SPLITS = ("train", "validation")

_SPEC_RE = re.compile(r"(?P<target>.+?):(?P<split>[A-Za-z0-9_.-]+(?:\[[^\]]*\])?)")


def parse_spec(spec: str | os.PathLike) -> tuple[str, str | None]:
    """Splits `target[:split]`; an existing path is never split (so odd file names still work)."""
    text = os.fspath(spec)
    if os.path.exists(text):
        return text, None
    match = _SPEC_RE.fullmatch(text)
    if match and not match.group("target").endswith(("http", "https")):
        return match.group("target"), match.group("split")
    return text, None


def _looks_local(target: str) -> bool:
    return (
        target.startswith((".", "/", "~", "\\"))
        or os.path.splitext(target)[1].lower() in FILE_BUILDERS
        or bool(re.match(r"^[A-Za-z]:[\\/]", target))
    )


def spec_base_dir(spec: str | os.PathLike) -> Path | None:
    """The folder relative image paths in SPEC's rows resolve against (None for hub datasets)."""
    target, _ = parse_spec(spec)
    path = Path(target).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_file():
        return path.resolve().parent
    return None


def _base_split(split: str) -> str:
    return split.split("[", 1)[0]


def choose_split(available: list[str], requested: str | None, where: str) -> str:
    """The requested split if present, else train / validation / the first one."""
    names = [str(s) for s in available]
    if not names:
        raise ValueError(f"{where} has no splits.")
    if requested is not None:
        if _base_split(requested) not in names:
            raise ValueError(f"{where} has no split {requested!r}; available splits: {', '.join(names)}.")
        return requested
    for name in PREFERRED_SPLITS:
        if name in names:
            return name
    return names[0]


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _load_saved(path: Path, split: str | None, streaming: bool) -> AnyDataset:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        name = choose_split(list(loaded.keys()), split, f"Saved dataset {path}")
        if "[" in name:
            raise ValueError(f"Split slicing ({name!r}) is not supported for save_to_disk folders; use {_base_split(name)!r}.")
        loaded = loaded[name]
    # A single saved split is whatever split the user names (as a single data file is).
    return loaded.to_iterable_dataset() if streaming else loaded


def _load_file(path: Path, split: str | None, streaming: bool, cache_dir: str | None) -> AnyDataset:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"Unsupported data file {path}: use one of {', '.join(sorted(FILE_BUILDERS))}, "
            "a folder, or a hub dataset name."
        )
    split = split or "train"
    return datasets.load_dataset(
        builder,
        data_files={_base_split(split): [str(path)]},
        split=split,
        streaming=streaming,
        cache_dir=cache_dir,
    )


def _load_folder(path: Path, split: str | None, streaming: bool, cache_dir: str | None) -> AnyDataset:
    if _is_saved_dataset(path):
        return _load_saved(path, split, streaming)
    try:
        builder = datasets.load_dataset_builder(str(path), cache_dir=cache_dir)
    except Exception as err:  # datasets raises several types for "nothing readable here"
        raise ValueError(
            f"Folder {path} is neither a saved dataset (save_to_disk) nor a folder of data files "
            f"(parquet, json, jsonl, csv, images): {err}"
        ) from err
    available = list(builder.config.data_files or {})
    name = choose_split(available, split, f"Folder {path}")
    return datasets.load_dataset(str(path), split=name, streaming=streaming, cache_dir=cache_dir)


def _load_hub(
    name: str, split: str | None, streaming: bool, config: str | None, revision: str | None, cache_dir: str | None
) -> AnyDataset:
    if split is None:
        available = datasets.get_dataset_split_names(name, config, revision=revision)
        split = choose_split(available, None, f"Hub dataset {name}")
    return datasets.load_dataset(
        name, config, split=split, streaming=streaming, revision=revision, cache_dir=cache_dir
    )


def load_source(
    spec: str | os.PathLike,
    *,
    split: str | None = None,
    streaming: bool = False,
    config: str | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> AnyDataset:
    """Loads SPEC (`file`, `folder`, `hub/name`, each with optional `:split`) as one split.

    `split` overrides the SPEC's suffix; `config`/`revision` apply to hub datasets (e.g. CRAG-MM's
    `revision="v0.1.2"`); `cache_dir` is where `datasets` keeps its Arrow cache.
    """
    target, spec_split = parse_spec(spec)
    split = split or spec_split
    cache = os.fspath(cache_dir) if cache_dir is not None else None
    path = Path(target).expanduser()
    if path.is_dir():
        return _load_folder(path, split, streaming, cache)
    if path.is_file():
        return _load_file(path, split, streaming, cache)
    if _looks_local(target):
        raise FileNotFoundError(f"Data {target!r} does not exist (expected a file, a folder or a hub dataset name).")
    return _load_hub(target, split, streaming, config, revision, cache)


def column_names(dataset: Any) -> list[str] | None:
    """Column names without reading data when the dataset knows them; None when it does not."""
    names = getattr(dataset, "column_names", None)
    if names:
        return list(names)
    features = getattr(dataset, "features", None)
    if features:
        return list(features)
    return None
