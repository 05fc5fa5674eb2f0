"""Turning a `--data SPEC` string into a `datasets` Dataset (or IterableDataset when streaming).

SPEC is a local file (json, jsonl, parquet, csv, arrow), a folder (a `save_to_disk` dataset, or data files
that `datasets` can read, split names taken from the file names), or a hub dataset name; `:split` is
optional. Files default to the split "train"; folders and hub datasets take "train", else "validation",
else their first split (CRAG-MM ships only validation/public_test).

JSON Lines files are checked line by line first (one pass, constant memory): a line that is not one JSON object is
skipped and counted (`malformed_json_line`, with its file and line number) instead of aborting the whole load inside
`datasets`, and a file with no usable line fails at once with a message naming it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets

from n2eye.data.report import MALFORMED_JSON_LINE, NoUsableRowsError, SkipReport

logger = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------------- JSON Lines


@dataclass
class JsonLinesScan:
    """What one pass over a JSON Lines file found: usable lines, malformed ones (the first few with what is wrong)."""

    path: Path
    good: int = 0
    bad: int = 0
    examples: list[tuple[int, str]] = field(default_factory=list)  # (line number, what is wrong)


def _parse_json_line(raw: bytes, number: int) -> tuple[dict | None, str | None]:
    """(row, None) for a line holding one JSON object, (None, what is wrong) otherwise, (None, None) if blank."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, f"not UTF-8 text ({err.reason} at byte {err.start})"
    if number == 1:
        text = text.lstrip("\ufeff")  # a byte-order mark, as `datasets` also accepts
    if not text.strip():
        return None, None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg} at column {err.colno})"
    except RecursionError:
        return None, "not valid JSON (nested too deeply)"
    if not isinstance(value, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(value), "a number")
        return None, f"{kind}, not a JSON object"
    return value, None


def iter_json_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, row, problem) for every non-blank line, read one line at a time: `row` is the line's JSON
    object, or None with `problem` saying what is wrong with it."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            row, problem = _parse_json_line(raw, number)
            if row is not None or problem is not None:
                yield number, row, problem


def scan_json_lines(path: str | os.PathLike, max_examples: int = 3) -> JsonLinesScan:
    """One pass over the file (constant memory): counts its usable and malformed lines."""
    scan = JsonLinesScan(Path(path))
    for number, row, problem in iter_json_lines(path):
        if row is not None:
            scan.good += 1
        else:
            scan.bad += 1
            if len(scan.examples) < max_examples:
                scan.examples.append((number, problem or ""))
    return scan


def _first_content(path: Path) -> bytes:
    """The file's first non-blank line, stripped (b"" when the file has none)."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle):
            if number == 0 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark
                raw = raw[3:]
            stripped = raw.strip()
            if stripped:
                return stripped
    return b""


def is_json_lines(path: str | os.PathLike) -> bool:
    """True for a .jsonl file, or a .json file whose first non-blank line is a whole JSON object, unless the file
    is one JSON array (which `datasets` reads as a whole, as before)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".jsonl"):
        return False
    line = _first_content(path)
    if line.startswith(b"["):
        return False
    if suffix == ".jsonl" or not line:
        return True
    return line.startswith(b"{") and line.endswith(b"}")


def _no_usable_lines(scan: JsonLinesScan) -> NoUsableRowsError:
    path = scan.path
    if scan.bad == 0:
        return NoUsableRowsError(
            f"Data file {path} is empty: it has no line to read. A JSON Lines file holds one JSON object per line, "
            'e.g. {"messages": [...]}; write the data into it or point --data at the file that has it.'
        )
    shown = "; ".join(f"line {number}: {problem}" for number, problem in scan.examples)
    more = f"; and {scan.bad - len(scan.examples)} more" if scan.bad > len(scan.examples) else ""
    return NoUsableRowsError(
        f"Data file {path} has no usable line: all {scan.bad} non-blank line(s) are malformed ({shown}{more}). "
        "Each line of a JSON Lines file must be one complete JSON object in UTF-8, e.g. "
        '{"messages": [...]}; fix those lines (a pretty-printed JSON document belongs in a .json file).'
    )


def _report_bad_lines(scan: JsonLinesScan, report: SkipReport | None) -> None:
    """Counts every malformed line in `report` (the first few with FILE:LINE and what is wrong)."""
    if report is None:
        logger.warning("data %s: skipping %d malformed line(s), e.g. %s", scan.path, scan.bad,
                       "; ".join(f"line {n}: {p}" for n, p in scan.examples))  # fmt: skip
        return
    for number, problem in scan.examples:
        report.add(MALFORMED_JSON_LINE, f"{scan.path}:{number}", f"line {number} of {scan.path}: {problem}")
    report.counts[MALFORMED_JSON_LINE] += scan.bad - len(scan.examples)  # counted; the examples are full


def _good_json_rows(path: str, size: int, mtime_ns: int) -> Iterator[dict]:
    """The JSON objects of the file's usable lines (`size`/`mtime_ns` only key `datasets`' cache to this version
    of the file)."""
    for _number, row, _problem in iter_json_lines(path):
        if row is not None:
            yield row


def _load_json_lines(path: Path, split: str, streaming: bool, cache_dir: str | None, report: SkipReport | None):
    """A JSON Lines file through `datasets`, its malformed lines skipped and counted (None: read it the usual way)."""
    scan = scan_json_lines(path, max_examples=report.max_examples if report is not None else 3)
    if scan.good == 0:
        raise _no_usable_lines(scan)
    if scan.bad == 0:
        return None  # the usual `load_dataset("json")`, unchanged
    _report_bad_lines(scan, report)
    stat = path.stat()
    gen_kwargs = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    name = datasets.NamedSplit(_base_split(split))
    if streaming:
        if "[" in split:
            raise ValueError(f"Split slicing ({split!r}) is not supported when streaming; use {_base_split(split)!r}.")
        return datasets.IterableDataset.from_generator(_good_json_rows, gen_kwargs=gen_kwargs, split=name)
    dataset = datasets.Dataset.from_generator(_good_json_rows, gen_kwargs=gen_kwargs, split=name, cache_dir=cache_dir)
    if "[" in split:
        (part,) = datasets.ReadInstruction.from_spec(split).to_absolute({_base_split(split): len(dataset)})
        dataset = dataset.select(range(part.from_, part.to))
    return dataset


# ----------------------------------------------------------------------------------------------- loading


def _load_file(
    path: Path, split: str | None, streaming: bool, cache_dir: str | None, report: SkipReport | None = None
) -> AnyDataset:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"Unsupported data file {path}: use one of {', '.join(sorted(FILE_BUILDERS))}, "
            "a folder, or a hub dataset name."
        )
    split = split or "train"
    if builder == "json" and is_json_lines(path):
        dataset = _load_json_lines(path, split, streaming, cache_dir, report)
        if dataset is not None:
            return dataset
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
    report: SkipReport | None = None,
) -> AnyDataset:
    """Loads SPEC (`file`, `folder`, `hub/name`, each with optional `:split`) as one split.

    `split` overrides the SPEC's suffix; `config`/`revision` apply to hub datasets (e.g. CRAG-MM's
    `revision="v0.1.2"`); `cache_dir` is where `datasets` keeps its Arrow cache. A JSON Lines file's malformed
    lines are left out and counted in `report` (`malformed_json_line`, row `FILE:LINE`); an empty file, or one
    with no usable line, raises `NoUsableRowsError` naming it.
    """
    target, spec_split = parse_spec(spec)
    split = split or spec_split
    cache = os.fspath(cache_dir) if cache_dir is not None else None
    path = Path(target).expanduser()
    if path.is_dir():
        return _load_folder(path, split, streaming, cache)
    if path.is_file():
        return _load_file(path, split, streaming, cache, report)
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
