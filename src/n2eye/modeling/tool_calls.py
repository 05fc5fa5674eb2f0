"""LFM2-style Pythonic tool calls: format, parse and normalize.

The model writes tool calls as ``<|tool_call_start|>[name(key=value, ...)]<|tool_call_end|>`` where every value is
JSON (the chat template renders them with ``tojson``). This module turns that text into OpenAI-style tool calls and
back, so serving code and the chat template agree byte for byte.

Only the Python standard library is imported here: the file is copied into model checkpoints and loaded with
``trust_remote_code``.
"""

from __future__ import annotations

import ast
import copy
import json
import math
import re
import secrets
from typing import Any

__all__ = [
    "TOOL_CALL_START",
    "TOOL_CALL_END",
    "ToolCallParseError",
    "format_tool_calls",
    "parse_tool_calls",
    "normalize_tool_calls",
]

TOOL_CALL_START = "<|tool_call_start|>"
TOOL_CALL_END = "<|tool_call_end|>"

_EXPECTED_FORM = (
    "expected a Python-style list of calls with keyword arguments and literal (JSON or Python) values, e.g. "
    f'{TOOL_CALL_START}[get_weather(location="Paris", days=2)]{TOOL_CALL_END}'
)
_JSON_NAMES = {"true": True, "false": False, "null": None}
_MAX_QUOTE = 200


class ToolCallParseError(ValueError):
    """Raised when generated tool-call text is not in the form the model is trained to produce."""


def _quote(text: str, limit: int = _MAX_QUOTE) -> str:
    """Quote (and truncate) offending text for an error message, so huge generations don't flood logs."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return repr(text)


def _error(problem: str, text: str) -> ToolCallParseError:
    return ToolCallParseError(f"Malformed tool call {_quote(text)}: {problem}; {_EXPECTED_FORM}")


# --------------------------------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------------------------------


def _json_value(value: Any) -> str:
    """Render a value exactly like transformers' ``tojson`` filter (json.dumps defaults, ensure_ascii=False)."""
    return json.dumps(value, ensure_ascii=False)


def _call_parts(tool_call: dict[str, Any]) -> tuple[str, Any]:
    """Accept both OpenAI ``{"type": "function", "function": {...}}`` and bare ``{"name": ..., "arguments": ...}``."""
    if not isinstance(tool_call, dict):
        raise ValueError(f"Each tool call must be a dict, got {type(tool_call).__name__}: {tool_call!r}")
    fn = tool_call["function"] if "function" in tool_call else tool_call
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ValueError(
            'Each tool call needs a function name: {"type": "function", "function": {"name": ..., "arguments": {...}}}'
            f' or {{"name": ..., "arguments": {{...}}}}; got {tool_call!r}'
        )
    return fn["name"], fn.get("arguments")


def _arguments_dict(name: str, arguments: Any) -> dict[str, Any]:
    """Coerce tool-call arguments (dict, JSON string, or None) into a dict."""
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        if not arguments.strip():
            return {}
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"Arguments of tool {name!r} are not valid JSON ({e}): {_quote(arguments)}") from e
    if not isinstance(arguments, dict):
        raise ValueError(f"Arguments of tool {name!r} must be a JSON object (dict), got: {_quote(repr(arguments))}")
    return arguments


def call_name_and_arguments(tool_call: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(name, arguments dict) of an OpenAI-style or bare call; arguments may be a dict, a JSON string or missing."""
    name, arguments = _call_parts(tool_call)
    return name, _arguments_dict(name, arguments)


def format_tool_calls(tool_calls: list[dict[str, Any]]) -> str:
    """Render tool calls as the chat template does: ``<|tool_call_start|>[f(a="x", n=2)]<|tool_call_end|>``.

    Accepts OpenAI-style or bare calls; ``arguments`` may be a dict, a JSON string, or missing. Returns "" for no
    calls (the template renders nothing then).
    """
    if not tool_calls:
        return ""
    rendered = []
    for tool_call in tool_calls:
        name, arguments = call_name_and_arguments(tool_call)
        args = ", ".join(f"{key}={_json_value(value)}" for key, value in arguments.items())
        rendered.append(f"{name}({args})")
    return f"{TOOL_CALL_START}[{', '.join(rendered)}]{TOOL_CALL_END}"


# --------------------------------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------------------------------


class _JsonNames(ast.NodeTransformer):
    """Map the JSON literals true/false/null (bare names to Python) to constants, so literal_eval accepts them."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _JSON_NAMES:
            return ast.copy_location(ast.Constant(_JSON_NAMES[node.id]), node)
        return node


def _dotted_name(node: ast.AST) -> str | None:
    """``f`` -> "f", ``math.add`` -> "math.add"; anything else (calls, subscripts) -> None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted_name(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _check_json(value: Any, where: str, source: str) -> Any:
    """Make a literal JSON-compatible (tuples -> lists) and reject what JSON can't represent (sets, bytes, NaN...)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise _error(f"{where} is not a finite number", source)
        return value
    if isinstance(value, (list, tuple)):
        return [_check_json(v, where, source) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise _error(f"{where} has a non-string dict key {k!r}", source)
            out[k] = _check_json(v, where, source)
        return out
    raise _error(f"{where} has a value of type {type(value).__name__}, which is not JSON", source)


def _parse_call(node: ast.AST, source: str) -> tuple[str, dict[str, Any]]:
    if not isinstance(node, ast.Call):
        segment = ast.get_source_segment(source, node) or source
        raise _error(f"{_quote(segment, 80)} is not a function call", source)
    name = _dotted_name(node.func)
    if name is None:
        raise _error("the called function must be a (dotted) name", source)
    if node.args:
        raise _error(f"{name}() has positional arguments; only keyword arguments are allowed", source)
    arguments: dict[str, Any] = {}
    for keyword in node.keywords:
        if keyword.arg is None:
            raise _error(f"{name}() uses **kwargs; only explicit keyword arguments are allowed", source)
        if keyword.arg in arguments:
            raise _error(f"{name}() repeats the keyword argument {keyword.arg!r}", source)
        where = f"argument {keyword.arg!r} of {name}()"
        try:
            value = ast.literal_eval(_JsonNames().visit(keyword.value))
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError) as e:
            segment = ast.get_source_segment(source, keyword.value) or ""
            raise _error(f"{where} is not a literal value ({_quote(segment, 80)})", source) from e
        arguments[keyword.arg] = _check_json(value, where, source)
    return name, arguments


def _parse_block(source: str) -> list[tuple[str, dict[str, Any]]]:
    """Parse the inside of one tool-call block into (name, arguments) pairs."""
    stripped = source.strip()
    if not stripped:
        raise _error("the tool call block is empty", source)
    try:
        tree = ast.parse(stripped, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError) as e:
        detail = getattr(e, "msg", None) or str(e)
        raise _error(f"not valid call syntax ({detail})", source) from e
    body = tree.body
    if isinstance(body, (ast.List, ast.Tuple)):
        nodes = body.elts
    elif isinstance(body, ast.Call):
        nodes = [body]
    else:
        raise _error("expected a list of calls", source)
    return [_parse_call(node, stripped) for node in nodes]


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Extract every tool-call block from generated text.

    Returns the remaining text (blocks removed, stripped) and OpenAI-style tool calls whose ``arguments`` are JSON
    strings, ready for an OpenAI-compatible response. Raises ToolCallParseError for malformed or unterminated blocks.
    """
    pieces: list[str] = []
    calls: list[dict[str, Any]] = []
    pos = 0
    while True:
        start = text.find(TOOL_CALL_START, pos)
        if start < 0:
            tail = text[pos:]
            if TOOL_CALL_END in tail:
                raise ToolCallParseError(
                    f"Found {TOOL_CALL_END} without a matching {TOOL_CALL_START} in {_quote(tail)}; {_EXPECTED_FORM}"
                )
            pieces.append(tail)
            break
        before = text[pos:start]
        if TOOL_CALL_END in before:
            raise ToolCallParseError(
                f"Found {TOOL_CALL_END} without a matching {TOOL_CALL_START} in {_quote(before)}; {_EXPECTED_FORM}"
            )
        pieces.append(before)
        body_start = start + len(TOOL_CALL_START)
        end = text.find(TOOL_CALL_END, body_start)
        if end < 0:
            raise ToolCallParseError(
                f"Unterminated tool call block (no {TOOL_CALL_END}): {_quote(text[start:])}; {_EXPECTED_FORM}"
            )
        body = text[body_start:end]
        if TOOL_CALL_START in body:
            raise _error(f"nested {TOOL_CALL_START}", body)
        for name, arguments in _parse_block(body):
            calls.append(
                {
                    "id": f"call_{len(calls)}_{secrets.token_hex(4)}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
                }
            )
        pos = end + len(TOOL_CALL_END)
    return "".join(pieces).strip(), calls


# --------------------------------------------------------------------------------------------------------------------
# Normalizing chat messages for the template
# --------------------------------------------------------------------------------------------------------------------


def normalize_tool_calls(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Return a copy of ``messages`` with JSON-string tool-call arguments parsed into dicts.

    OpenAI clients send ``arguments`` as JSON strings, but the chat template needs dicts to render ``key=value``.
    Only the assistant messages with tool calls are copied (images in other messages are shared, not deep-copied);
    the input is never modified. Bad JSON raises ValueError naming the message index and the tool.
    """
    out: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        tool_calls = message.get("tool_calls") if isinstance(message, dict) else None
        if not tool_calls or message.get("role") != "assistant":
            out.append(message)
            continue
        new_calls = []
        for tool_call in tool_calls:
            if not isinstance(tool_call, dict):
                new_calls.append(copy.deepcopy(tool_call))
                continue
            new_call = copy.deepcopy(tool_call)
            fn = new_call["function"] if isinstance(new_call.get("function"), dict) else new_call
            if isinstance(fn.get("arguments"), str):
                name = fn.get("name", "(unnamed)")
                try:
                    fn["arguments"] = _arguments_dict(name, fn["arguments"])
                except ValueError as e:
                    raise ValueError(f"Message {index}, tool call {name!r}: {e}") from e
            new_calls.append(new_call)
        out.append({**message, "tool_calls": new_calls})
    return out
