"""Dataclass configs <-> argparse flags and YAML files, so every flag is also settable from `--config`.

Field docstrings (a string literal right after the field) become the flag's help text (else the field's
metadata["help"], a string or a function called when the parser is built); booleans get real
`--flag / --no-flag` switches (never `type=bool`, where "False" would parse as True).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any

import yaml


def field_docs(cls: type) -> dict[str, str]:
    """Maps field name -> the docstring written under it in the class body."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                if isinstance(nxt.value.value, str):
                    docs[node.target.id] = nxt.value.value.strip()
    return docs


def field_help(cls: type) -> dict[str, str]:
    """Maps field name -> its flag's help: the docstring under it (in its class or a dataclass it inherits from,
    e.g. `image_settings.ImageOptions`), else its metadata["help"] (a function, for a help read from a library
    too slow to import for every command)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(field_docs(klass))
    for f in dataclasses.fields(cls):
        if not docs.get(f.name) and "help" in f.metadata:
            text = f.metadata["help"]
            docs[f.name] = text() if callable(text) else text
    return docs


def _base_type(annotation: Any) -> type:
    """`int | None` -> int; `str` -> str."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0]) if args else str
    if origin in (list, tuple):
        return list
    return annotation if isinstance(annotation, type) else str


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per dataclass field (`out_dir` -> `--out-dir`), defaults left to the dataclass."""
    docs = field_help(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        base = _base_type(hints[f.name])
        help_text = docs.get(f.name, "").replace("%", "%%")  # argparse formats help with %
        if base is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif base is list:
            parser.add_argument(flag, dest=f.name, nargs="+", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=base, default=None, help=help_text)
    parser.add_argument("--config", dest="_config", default=None, help="YAML file whose keys set the same options")


def config_from_args(cls: type, args: argparse.Namespace):
    """YAML values first, then explicit flags on top; the dataclass checks itself in __post_init__."""
    values: dict[str, Any] = {}
    if getattr(args, "_config", None):
        loaded = yaml.safe_load(Path(args._config).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args._config} must hold a mapping of option: value.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(k.replace("-", "_") for k in loaded) - names)
        if unknown:
            raise ValueError(f"Unknown option(s) in {args._config}: {unknown}. Known: {sorted(names)}.")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    for f in dataclasses.fields(cls):
        value = getattr(args, f.name, None)
        if value is not None:
            values[f.name] = value
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError("Missing required option(s): " + ", ".join("--" + m.replace("_", "-") for m in missing))
    return cls(**values)
