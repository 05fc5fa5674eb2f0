"""Dataset rows -> Conversations, one adapter per format, with format auto-detection and skip counting.

A Conversation is `{"messages": [HF chat messages], "images": [RGB PIL images]}` (+ `"metadata"`, and
`"tools"` when the row has them): user content is a list of `{"type": "image"}` / `{"type": "text"}` items,
image items matched in order to `images`; assistant content is a string (plus OpenAI `tool_calls`).
Bad rows are skipped with a reason in a `SkipReport`; only a wrong format (checked before any row is
read) or a dataset whose every row is bad stops a run.

`<image>` in text is an image placeholder only where a format says so: a LLaVA or ShareGPT human turn, and a
`messages` user turn written as a string in a row whose `images` column holds images (taken in order). Anywhere else
it is a control token typed into text, and the row is skipped as `control_token` (as the processor does for the other
ones); more placeholders than images is `image_count_mismatch`, with what to fix.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from n2eye.data.cragmm import (
    CRAGMM_DESCRIPTION,
    CRAGMM_REQUIRED_COLUMNS,
    CragLabels,
    cragmm_to_conversation,
)
from n2eye.data.format_names import FORMATS
from n2eye.images import ImageCache, image_item_source, resolve_image
from n2eye.data.report import (
    ANSWER_WITHOUT_TURN,
    CONTROL_TOKEN,
    EMPTY_TURNS,
    IMAGE_COUNT_MISMATCH,
    IMAGE_MISSING,
    MALFORMED_ROW,
    NO_ASSISTANT_TURN,
    TURN_WITHOUT_ANSWER,
    UNKNOWN_ROLE,
    SkipReport,
    SkipRow,
)
from n2eye.data.sources import column_names, load_source, spec_base_dir

logger = logging.getLogger(__name__)

Conversation = dict[str, Any]
REQUIRED_COLUMNS: dict[str, tuple[str, ...]] = {
    "cragmm": CRAGMM_REQUIRED_COLUMNS,
    "messages": ("messages",),
    "llava": ("conversations",),
    "cauldron": ("images", "texts"),
    "sharegpt": ("conversations",),  # or `messages` holding from/value turns (`TURN_COLUMNS`)
}
# The columns a format may hold its turns in, in the order they are looked for.
TURN_COLUMNS = {"sharegpt": ("conversations", "messages")}
FORMAT_DESCRIPTIONS = {
    "cragmm": CRAGMM_DESCRIPTION,
    "messages": "messages: a `messages` column in HF chat format (images inline as content items or in an `images` column)",
    "llava": "llava: a `conversations` column of {from: human|gpt, value} turns and an `image` file name",
    "cauldron": "cauldron: an `images` list and `texts` of {user, assistant, source} turns (the_cauldron)",
    "sharegpt": "sharegpt: `conversations` (or `messages`) of {from: human|gpt|system|function_call|observation, "
    "value} turns with an `images` list (and optional `tools`, `system`; LlamaFactory / ms-swift)",
}
CHAT_ROLES = ("system", "user", "assistant", "tool")
LLAVA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
SHAREGPT_ROLES = {**LLAVA_ROLES, "function_call": "function_call", "observation": "tool", "tool": "tool"}
IMAGE_TOKEN = "<image>"


def describe_formats() -> str:
    return "; ".join(FORMAT_DESCRIPTIONS[name] for name in FORMATS)


def _has_columns(name: str, found: list[str]) -> bool:
    required = REQUIRED_COLUMNS[name]
    if name in TURN_COLUMNS:  # any one of the turn columns will do
        required = tuple(c for c in required if c not in TURN_COLUMNS[name])
        return all(c in found for c in required) and any(c in found for c in TURN_COLUMNS[name])
    return all(c in found for c in required)


def detect_format(columns: Iterable[str], message_keys: Iterable[str] | None = None) -> str:
    """The format the columns name; a clear ValueError when none does.

    `conversations` is ShareGPT when an `images` (plural) or `tools` column is beside it and no `image`, else LLaVA
    (as before). `message_keys`, the keys of a `messages` turn, tell chat role/content from ShareGPT from/value
    there, which the column names cannot.
    """
    found = list(columns)
    if _has_columns("cragmm", found):
        return "cragmm"
    if "messages" in found:
        keys = set(message_keys or ())
        return "sharegpt" if {"from", "value"} & keys and not {"role", "content"} & keys else "messages"
    if "conversations" in found:
        return "sharegpt" if ("images" in found or "tools" in found) and "image" not in found else "llava"
    if _has_columns("cauldron", found):
        return "cauldron"
    raise ValueError(
        f"Could not detect the data format: found columns {', '.join(found) or '(none)'}. "
        f"Expected one of: {describe_formats()}. Pass --format to choose one, or rename the columns."
    )


def check_format(format: str, columns: Iterable[str], message_keys: Iterable[str] | None = None) -> str:
    """Resolves "auto" and checks an explicit format's columns, before any row is converted."""
    found = list(columns)
    if format == "auto":
        return detect_format(found, message_keys)
    if format not in FORMATS:
        raise ValueError(f"Unknown format {format!r}; use auto, {', '.join(FORMATS)}.")
    if not _has_columns(format, found):
        needed = [c for c in REQUIRED_COLUMNS[format] if c not in found]
        if format in TURN_COLUMNS:
            needed = [c for c in needed if c not in TURN_COLUMNS[format]] + [" or ".join(TURN_COLUMNS[format])]
        raise ValueError(
            f"Format {format!r} needs column(s) {', '.join(needed)}, found columns {', '.join(found) or '(none)'}. "
            f"Expected {FORMAT_DESCRIPTIONS[format]}."
        )
    return format


# ----------------------------------------------------------------------------------------------- helpers


def _maybe_json(value: Any, what: str) -> Any:
    """Columns sometimes hold JSON text instead of nested values (CSV, hand-written files)."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise SkipRow(MALFORMED_ROW, f"{what} is not valid JSON: {err}") from err
    return value


def _drop_none(item: Mapping[str, Any]) -> dict[str, Any]:
    """Arrow gives every struct all keys seen in the column; the absent ones come back as None."""
    return {k: v for k, v in item.items() if v is not None}


def _split_image_tokens(text: str) -> list[dict[str, Any]]:
    """"<image>\\nWhat is it?" -> [image item, text item]; whitespace next to a token is dropped."""
    parts = text.split(IMAGE_TOKEN)
    items: list[dict[str, Any]] = []
    for index, part in enumerate(parts):
        if index > 0:
            items.append({"type": "image"})
            part = part.lstrip()
        if index < len(parts) - 1:
            part = part.rstrip()
        if part:
            items.append({"type": "text", "text": part})
    return items


def _check_no_image_token(text: str, where: str, why: str) -> None:
    """Refuses `<image>` where it is no image placeholder (skipped as `control_token`, naming where it is)."""
    if IMAGE_TOKEN in text:
        raise SkipRow(
            CONTROL_TOKEN,
            f"{where} contains the control token {IMAGE_TOKEN!r}, which is no image placeholder here ({why}). Remove "
            "it or escape it (e.g. '< image >'); images go in content items ({'type': 'image', ...}).",
        )


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and value == "":
        return []
    return [value]


def _inline_image_source(item: Mapping[str, Any]) -> Any:
    """Where an image content item says its image is (None when it relies on the `images` column)."""
    return image_item_source(dict(item))


def _text_only(content: Any, role: str, where: str = "") -> str:
    """System/assistant content as one string; image items there are not supported. `where`: the message's
    place (`messages[3]`), to name it if the text holds an `<image>`."""
    if content is None:
        return ""
    if isinstance(content, str):
        text = content
    elif isinstance(content, (list, tuple)):
        texts = []
        for item in content:
            if isinstance(item, str):
                texts.append(item)
                continue
            if not isinstance(item, Mapping):
                raise SkipRow(MALFORMED_ROW, f"a {role} content item is a {type(item).__name__}, not a dict")
            item = _drop_none(item)
            if item.get("type") != "text" or not isinstance(item.get("text", ""), str):
                raise SkipRow(MALFORMED_ROW, f"{role} messages may only hold text, got a {item.get('type')!r} item")
            texts.append(item.get("text", ""))
        text = "".join(texts)
    else:
        raise SkipRow(MALFORMED_ROW, f"{role} content is a {type(content).__name__}")
    _check_no_image_token(text, f"{where or role}.content", f"a {role} message; only user text holds images")
    return text


# ------------------------------------------------------------------------------------------ messages


def messages_to_conversation(
    row: Mapping[str, Any],
    *,
    image_cache: ImageCache | None = None,
    base_dir: str | os.PathLike | None = None,
    require_assistant: bool = True,
) -> Conversation:
    """A `messages` row (HF chat format) -> Conversation; images inline or from a parallel `images` column."""
    from n2eye.modeling.tool_calls import normalize_tool_calls

    cache = image_cache or ImageCache()
    raw = _maybe_json(row.get("messages"), "messages")
    if raw is None or (isinstance(raw, (list, tuple)) and len(raw) == 0):
        raise SkipRow(EMPTY_TURNS, "no messages")
    if not isinstance(raw, (list, tuple)):
        raise SkipRow(MALFORMED_ROW, f"messages is a {type(raw).__name__}, expected a list")
    column_images = _as_list(row.get("images"))
    next_column = 0
    sources: list[Any] = []

    def take_column_image(index: int, placeholder: bool) -> Any:
        """The next image of the `images` column, for an `<image>` in user text or an image item with no source."""
        nonlocal next_column
        if next_column >= len(column_images):
            what = "'<image>' placeholders in its user text" if placeholder else "image items without a source"
            raise SkipRow(
                IMAGE_COUNT_MISMATCH,
                f"the row has more {what} (at message {index}) than images in its `images` column "
                f"({len(column_images)}): each '<image>' in user text and each {{'type': 'image'}} item without "
                "a source takes the next image of that column. Add the missing image(s) to `images`, or remove "
                "the extra placeholder(s).",
            )
        next_column += 1
        return column_images[next_column - 1]

    messages: list[dict[str, Any]] = []
    for index, message in enumerate(raw):
        if not isinstance(message, Mapping):
            raise SkipRow(MALFORMED_ROW, f"message {index} is a {type(message).__name__}, not a dict")
        message = _drop_none(message)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise SkipRow(UNKNOWN_ROLE, f"message {index} has role {role!r}; allowed: {', '.join(CHAT_ROLES)}")
        content = message.get("content")
        if role == "user":
            if isinstance(content, str):
                if not column_images:  # `<image>` is a placeholder only for images in an `images` column
                    _check_no_image_token(content, f"messages[{index}].content", "the row has no `images` column "
                                          "entries for it to stand for")  # fmt: skip
                items = _split_image_tokens(content)
                for item in items:
                    if item["type"] == "image":
                        sources.append(take_column_image(index, placeholder=True))
            elif isinstance(content, (list, tuple)):
                items = []
                for position, item in enumerate(content):
                    if isinstance(item, str):
                        _check_no_image_token(item, f"messages[{index}].content[{position}]", "a text item; images "
                                              "are separate {'type': 'image'} items")  # fmt: skip
                        items.append({"type": "text", "text": item})
                        continue
                    if not isinstance(item, Mapping):
                        raise SkipRow(MALFORMED_ROW, f"message {index} has a content item that is not a dict")
                    item = _drop_none(item)
                    kind = item.get("type")
                    if kind == "text":
                        if not isinstance(item.get("text", ""), str):
                            raise SkipRow(MALFORMED_ROW, f"message {index} has a text item without string text")
                        _check_no_image_token(item.get("text", ""), f"messages[{index}].content[{position}].text",
                                              "a text item; images are separate {'type': 'image'} items")  # fmt: skip
                        items.append({"type": "text", "text": item.get("text", "")})
                    elif kind in ("image", "image_url"):
                        source = _inline_image_source(item)
                        sources.append(source if source is not None else take_column_image(index, placeholder=False))
                        items.append({"type": "image"})
                    else:
                        raise SkipRow(MALFORMED_ROW, f"message {index} has an unsupported content type {kind!r}")
            else:
                raise SkipRow(MALFORMED_ROW, f"message {index} (user) has no content")
            if not items:
                raise SkipRow(MALFORMED_ROW, f"message {index} (user) is empty")
            messages.append({"role": "user", "content": items})
        elif role == "system":
            messages.append({"role": "system", "content": _text_only(content, role, f"messages[{index}]")})
        elif role == "assistant":
            out: dict[str, Any] = {"role": "assistant", "content": _text_only(content, role, f"messages[{index}]")}
            tool_calls = _maybe_json(message.get("tool_calls"), f"message {index} tool_calls")
            if tool_calls:
                if not isinstance(tool_calls, (list, tuple)):
                    raise SkipRow(MALFORMED_ROW, f"message {index} tool_calls is not a list")
                out["tool_calls"] = [
                    _drop_none(call) if isinstance(call, Mapping) else call for call in tool_calls
                ]
            if not out["content"] and not out.get("tool_calls"):
                raise SkipRow(MALFORMED_ROW, f"message {index} (assistant) is empty")
            messages.append(out)
        else:  # tool
            out = {"role": "tool", "content": content if content is not None else ""}
            for key in ("tool_call_id", "name"):
                if key in message:
                    out[key] = message[key]
            messages.append(out)
    if next_column != len(column_images):
        raise SkipRow(
            IMAGE_COUNT_MISMATCH,
            f"{len(column_images)} entries in the `images` column but only {next_column} placeholder(s) use them "
            "('<image>' in user text, or {'type': 'image'} items without a source): add a placeholder where each "
            "image goes, or remove the unused images.",
        )
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise SkipRow(NO_ASSISTANT_TURN, "no assistant message to learn from")
    try:
        messages = normalize_tool_calls(messages)
    except ValueError as err:
        raise SkipRow(MALFORMED_ROW, str(err)) from err
    images = [resolve_image(source, cache, base_dir) for source in sources]
    conversation: Conversation = {"messages": messages, "images": images, "metadata": {"format": "messages"}}
    if row.get("id") is not None:
        conversation["metadata"]["id"] = row.get("id")
    extra = _maybe_json(row.get("metadata"), "metadata")  # e.g. per-turn question types for `n2eye eval`
    if isinstance(extra, Mapping):
        conversation["metadata"].update({k: v for k, v in extra.items() if k != "format"})
    tools = _maybe_json(row.get("tools"), "tools")
    if tools:
        conversation["tools"] = tools
    return conversation


# --------------------------------------------------------------------------------------------- LLaVA


def llava_to_conversation(
    row: Mapping[str, Any],
    *,
    image_cache: ImageCache | None = None,
    image_root: str | os.PathLike | None = None,
    require_assistant: bool = True,
) -> Conversation:
    """A LLaVA row (`image` + `conversations` of from/value turns) -> Conversation.

    `<image>` in a human turn becomes an image item where it stands; a row with an image and no token
    gets it at the start of the first human turn (as LLaVA's own loader does).
    """
    cache = image_cache or ImageCache()
    turns = _maybe_json(row.get("conversations"), "conversations")
    if turns is None or (isinstance(turns, (list, tuple)) and len(turns) == 0):
        raise SkipRow(EMPTY_TURNS, "no conversations")
    if not isinstance(turns, (list, tuple)):
        raise SkipRow(MALFORMED_ROW, f"conversations is a {type(turns).__name__}, expected a list")
    images = _as_list(row.get("image"))
    parsed: list[tuple[str, str]] = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise SkipRow(MALFORMED_ROW, f"turn {index} is not a dict")
        speaker = turn.get("from", turn.get("role"))
        role = LLAVA_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            hint = ""
            if str(speaker).lower() in SHAREGPT_ROLES:  # function_call / observation: LlamaFactory's layout
                hint = " (function_call and observation turns are ShareGPT's: pass --format sharegpt)"
            raise SkipRow(UNKNOWN_ROLE, f"turn {index} is from {speaker!r}; expected human or gpt{hint}")
        value = turn.get("value", turn.get("content"))
        if not isinstance(value, str):
            raise SkipRow(MALFORMED_ROW, f"turn {index} has no string value")
        if role != "user":
            _check_no_image_token(value, f"conversations[{index}].value", f"a {speaker} turn; only human turns "
                                  "hold image placeholders")  # fmt: skip
        parsed.append((role, value))
    tokens = sum(value.count(IMAGE_TOKEN) for role, value in parsed if role == "user")
    if tokens == 0 and images:
        first_user = next((i for i, (role, _) in enumerate(parsed) if role == "user"), None)
        if first_user is None:
            raise SkipRow(MALFORMED_ROW, "an image but no human turn to put it in")
        parsed[first_user] = ("user", IMAGE_TOKEN * len(images) + "\n" + parsed[first_user][1])
        tokens = len(images)
    if tokens and not images:
        raise SkipRow(
            IMAGE_MISSING,
            f"{tokens} '<image>' placeholder(s) in the human turns but the row names no image: set its `image`, "
            "or remove the '<image>' text",
        )
    if tokens != len(images):
        raise SkipRow(
            IMAGE_COUNT_MISMATCH,
            f"{tokens} '<image>' placeholder(s) in the human turns for {len(images)} image(s) in `image`: each "
            "'<image>' marks where the next image goes, so the counts must match. "
            + ("Remove the extra '<image>' text, or list the missing images." if tokens > len(images)
               else "Put an '<image>' where each image goes, or remove the unused images."),
        )  # fmt: skip
    messages: list[dict[str, Any]] = []
    for role, value in parsed:
        if role == "user":
            items = _split_image_tokens(value)
            if not items:
                raise SkipRow(MALFORMED_ROW, "an empty human turn")
            messages.append({"role": "user", "content": items})
        else:
            messages.append({"role": role, "content": value})
    if require_assistant and not any(m["role"] == "assistant" and m["content"] for m in messages):
        raise SkipRow(NO_ASSISTANT_TURN, "no gpt turn to learn from")
    loaded = [resolve_image(source, cache, image_root) for source in images]
    conversation: Conversation = {"messages": messages, "images": loaded, "metadata": {"format": "llava"}}
    if row.get("id") is not None:
        conversation["metadata"]["id"] = row.get("id")
    return conversation


# ------------------------------------------------------------------------------------------ Cauldron


def _turn_list(row: Mapping[str, Any], column: str) -> list[Any]:
    turns = _maybe_json(row.get(column), column)
    if turns is None or (isinstance(turns, (list, tuple)) and len(turns) == 0):
        raise SkipRow(EMPTY_TURNS, f"no {column}")
    if not isinstance(turns, (list, tuple)):
        raise SkipRow(MALFORMED_ROW, f"{column} is a {type(turns).__name__}, expected a list")
    return list(turns)


def _as_messages_row(row: Mapping[str, Any], messages: list[dict[str, Any]], images: list[Any], **kwargs: Any):
    """Converts rebuilt chat messages through the `messages` adapter, so every format checks images, control tokens
    and tool calls the same way and gives the same Conversation."""
    rebuilt = {"messages": messages, "images": images, "id": row.get("id"), "tools": row.get("tools")}
    return messages_to_conversation(rebuilt, **kwargs)


def cauldron_to_conversation(
    row: Mapping[str, Any],
    *,
    image_cache: ImageCache | None = None,
    base_dir: str | os.PathLike | None = None,
    require_assistant: bool = True,
) -> Conversation:
    """A Cauldron row (`images` + `texts` of {user, assistant, source}) -> Conversation.

    Every image goes before the first user text (as the Idefics2 recipe that made the set puts them); each turn's
    `source` (the sub-dataset) becomes its question type (`metadata["qtypes"]`), so `n2eye eval` scores per source.
    """
    turns = _turn_list(row, "texts")
    images = _as_list(row.get("images"))
    messages: list[dict[str, Any]] = []
    sources: list[str] = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise SkipRow(MALFORMED_ROW, f"texts[{index}] is a {type(turn).__name__}, not a dict")
        user, assistant = turn.get("user"), turn.get("assistant")
        for name, text in (("user", user), ("assistant", assistant)):
            if text is not None and not isinstance(text, str):
                raise SkipRow(MALFORMED_ROW, f"texts[{index}].{name} is a {type(text).__name__}, not a string")
        if not user or not user.strip():
            raise SkipRow(ANSWER_WITHOUT_TURN, f"texts[{index}] has an answer but no user text")
        content = [{"type": "image"} for _ in images] if index == 0 else []
        messages.append({"role": "user", "content": [*content, {"type": "text", "text": user}]})
        if assistant and assistant.strip():
            messages.append({"role": "assistant", "content": assistant})
        elif require_assistant or index < len(turns) - 1:
            raise SkipRow(TURN_WITHOUT_ANSWER, f"texts[{index}] has no assistant answer")
        sources.append(str(turn.get("source") or "all"))
    conversation = _as_messages_row(
        row, messages, images, image_cache=image_cache, base_dir=base_dir, require_assistant=require_assistant
    )
    conversation["metadata"].update(format="cauldron", source=sources[0], qtypes=sources)
    return conversation


# ------------------------------------------------------------------------------------------ ShareGPT


def _sharegpt_tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    """A `function_call` turn's value (JSON `{"name", "arguments"}` or a list of them) -> OpenAI `tool_calls`."""
    calls = _maybe_json(value, f"{where} (function_call)")
    calls = calls if isinstance(calls, (list, tuple)) else [calls]
    out = []
    for call in calls:
        if not isinstance(call, Mapping) or not isinstance(call.get("name"), str) or not call["name"]:
            raise SkipRow(
                MALFORMED_ROW,
                f"{where} (function_call) must be JSON {{\"name\": ..., \"arguments\": {{...}}}} "
                f"or a list of them, got {str(value)[:120]!r}",
            )
        out.append({"type": "function", "function": {"name": call["name"], "arguments": call.get("arguments") or {}}})
    return out


def sharegpt_to_conversation(
    row: Mapping[str, Any],
    *,
    image_cache: ImageCache | None = None,
    base_dir: str | os.PathLike | None = None,
    require_assistant: bool = True,
) -> Conversation:
    """A ShareGPT row (LlamaFactory / ms-swift: `conversations` or `messages` of from/value turns, `images`, optional
    `tools` and `system`) -> Conversation.

    Each `<image>` in a human turn takes the next image of `images`; a row with images and no `<image>` at all gets
    them at the start of its first human turn (as ms-swift and LLaVA do), any other count is `image_count_mismatch`.
    `function_call` turns become assistant tool calls, `observation` turns tool responses. A row must end on an
    answer (LlamaFactory drops the unanswered last turn; here the row is skipped and counted).
    """
    column = next((c for c in TURN_COLUMNS["sharegpt"] if row.get(c) is not None), "conversations")
    turns = _turn_list(row, column)
    images = _as_list(row.get("images"))
    messages: list[dict[str, Any]] = []
    system = row.get("system")
    if isinstance(system, str) and system:
        messages.append({"role": "system", "content": system})
    markers = 0
    for index, turn in enumerate(turns):
        if not isinstance(turn, Mapping):
            raise SkipRow(MALFORMED_ROW, f"{column}[{index}] is a {type(turn).__name__}, not a dict")
        speaker = turn.get("from", turn.get("role"))
        role = SHAREGPT_ROLES.get(str(speaker).lower()) if speaker is not None else None
        if role is None:
            raise SkipRow(UNKNOWN_ROLE, f"{column}[{index}] is from {speaker!r}; expected human, gpt, system, "
                          "function_call or observation")  # fmt: skip
        value = turn.get("value", turn.get("content"))
        if role == "function_call":
            calls = _sharegpt_tool_calls(value, f"{column}[{index}]")
            messages.append({"role": "assistant", "content": "", "tool_calls": calls})
            continue
        if not isinstance(value, str):
            raise SkipRow(MALFORMED_ROW, f"{column}[{index}] has no string value")
        if role == "user":
            markers += value.count(IMAGE_TOKEN)
        else:
            _check_no_image_token(value, f"{column}[{index}].value", f"a {speaker} turn; only human turns hold "
                                  "image placeholders")  # fmt: skip
        if role == "assistant" and not value.strip():
            raise SkipRow(TURN_WITHOUT_ANSWER, f"{column}[{index}] (gpt) is empty")
        messages.append({"role": role, "content": value})
    if markers == 0 and images:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is None:
            raise SkipRow(MALFORMED_ROW, "images but no human turn to put them in")
        first_user["content"] = IMAGE_TOKEN * len(images) + "\n" + first_user["content"]
    elif markers != len(images):
        raise SkipRow(
            IMAGE_COUNT_MISMATCH,
            f"{markers} '<image>' marker(s) in the human turns for {len(images)} image(s) in `images`: each "
            "'<image>' takes the next image, so the counts must match. Add or remove '<image>' markers or images.",
        )
    if require_assistant:
        if not any(m["role"] == "assistant" for m in messages):
            raise SkipRow(NO_ASSISTANT_TURN, "no gpt or function_call turn to learn from")
        if messages[-1]["role"] != "assistant":
            last = messages[-1]["role"]
            raise SkipRow(TURN_WITHOUT_ANSWER, f"the row ends on a {last} turn, with no gpt answer after it")
    conversation = _as_messages_row(
        row, messages, images, image_cache=image_cache, base_dir=base_dir, require_assistant=require_assistant
    )
    conversation["metadata"]["format"] = "sharegpt"
    return conversation


# The formats read as chat messages (image paths relative to the data's folder).
CHAT_ADAPTERS = {
    "messages": messages_to_conversation,
    "cauldron": cauldron_to_conversation,
    "sharegpt": sharegpt_to_conversation,
}


# ------------------------------------------------------------------------------------ running it all


@dataclass
class ConversationAdapter:
    """Converts one row of a known format; raises `SkipRow` for rows it cannot use.

    Usable on its own for map-style access (`adapter(dataset[i])`); `iter_conversations` wraps it with
    skip counting.
    """

    format: str
    labels: CragLabels
    image_cache: ImageCache
    base_dir: Path | None = None
    image_root: Path | None = None
    eval_resize: bool = False
    require_assistant: bool = True

    def __call__(self, row: Mapping[str, Any]) -> Conversation:
        if not isinstance(row, Mapping):
            raise SkipRow(MALFORMED_ROW, f"row is a {type(row).__name__}, not a dict")
        if self.format == "cragmm":
            return cragmm_to_conversation(
                row, labels=self.labels, image_cache=self.image_cache, base_dir=self.base_dir, eval_resize=self.eval_resize
            )
        if self.format in CHAT_ADAPTERS:
            return CHAT_ADAPTERS[self.format](
                row, image_cache=self.image_cache, base_dir=self.base_dir, require_assistant=self.require_assistant
            )
        return llava_to_conversation(
            row,
            image_cache=self.image_cache,
            image_root=self.image_root or self.base_dir,
            require_assistant=self.require_assistant,
        )


def _dataset_columns(dataset: Any) -> list[str]:
    names = column_names(dataset)
    if names is not None:
        return names
    if isinstance(dataset, (list, tuple)):
        first = dataset[0] if dataset else None
    else:  # an IterableDataset without known features: look at its first row
        first = next(iter(dataset), None)
    return list(first) if isinstance(first, Mapping) else []


def _message_keys(dataset: Any) -> list[str]:
    """The keys of the first turn in a `messages` column: role/content is chat, from/value ShareGPT, and only the
    data tells. Read from the features when they describe the turns (no row read); otherwise from the first row of
    that one column (a JSON-text column, a list of dicts, or a stream without features)."""
    features = getattr(dataset, "features", None)
    if features and "messages" in features:
        inner = getattr(features["messages"], "feature", features["messages"])  # List(...) -> its item
        if isinstance(inner, Mapping):
            return list(inner)
    try:
        if isinstance(dataset, (list, tuple)):
            first = dataset[0] if dataset else None
        else:
            first = next(iter(dataset.select_columns(["messages"])), None)
        turns = _maybe_json(first.get("messages"), "messages") if isinstance(first, Mapping) else None
    except SkipRow:
        return []
    turn = turns[0] if isinstance(turns, (list, tuple)) and turns else None
    return list(turn) if isinstance(turn, Mapping) else []


def make_adapter(
    dataset: Any,
    format: str = "auto",
    *,
    base_dir: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    image_cache: ImageCache | None = None,
    eval_resize: bool = False,
    require_assistant: bool = True,
) -> ConversationAdapter:
    """Checks the format against the dataset's columns (ValueError if unknown) and builds its adapter."""
    if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise ValueError(f"Got a DatasetDict with splits {', '.join(dataset)}; pass one split (e.g. dataset['validation']).")
    columns = _dataset_columns(dataset)
    message_keys = _message_keys(dataset) if format == "auto" and "messages" in columns else None
    resolved = check_format(format, columns, message_keys)
    return ConversationAdapter(
        format=resolved,
        labels=CragLabels.from_features(getattr(dataset, "features", None)),
        image_cache=image_cache or ImageCache(),
        base_dir=Path(base_dir) if base_dir is not None else None,
        image_root=Path(image_root).expanduser().resolve() if image_root is not None else None,
        eval_resize=eval_resize,
        require_assistant=require_assistant,
    )


def _no_image_decoding(feature: Any) -> tuple[Any, bool]:
    """A copy of `feature` with every `Image` set to decode=False (so a corrupt image skips a row
    instead of raising inside `datasets`), and whether anything changed."""
    from datasets import Image as ImageFeature

    if isinstance(feature, ImageFeature):
        if not feature.decode:
            return feature, False
        new = copy.copy(feature)
        new.decode = False
        return new, True
    if isinstance(feature, dict):
        from datasets import Features

        items, changed = {}, False
        for key, value in feature.items():
            items[key], sub = _no_image_decoding(value)
            changed = changed or sub
        if not changed:
            return feature, False
        return (Features(items) if isinstance(feature, Features) else items), True
    if hasattr(feature, "feature"):
        inner, changed = _no_image_decoding(feature.feature)
        if changed:
            feature = copy.copy(feature)
            feature.feature = inner
        return feature, changed
    return feature, False


def raw_image_view(dataset: Any) -> Any:
    """The dataset, for iterating, with image decoding turned off, never rewriting its data: top-level image columns
    by a metadata-only cast, images nested in lists or structs (The Cauldron's `images`, CRAG-MM turns) by iterating
    the same Arrow data without decoding (`datasets.Dataset.cast` would write a copy of the whole dataset)."""
    features = getattr(dataset, "features", None)
    if not features:
        return dataset
    new_features, changed = _no_image_decoding(features)
    if not changed:
        return dataset
    from datasets import Image as ImageFeature

    changed_columns = [name for name in features if new_features[name] is not features[name]]
    if all(isinstance(new_features[name], ImageFeature) for name in changed_columns):
        for name in changed_columns:  # metadata-only change, no data rewritten
            dataset = dataset.cast_column(name, new_features[name])
        return dataset
    if isinstance(dataset, datasets.Dataset):
        return dataset.to_iterable_dataset().decode(False)  # same rows, same order, images as {bytes, path}
    return dataset.cast(new_features)  # a stream: cast lazily, row by row


def _row_id(row: Any, index: int) -> Any:
    if isinstance(row, Mapping):
        for key in ("session_id", "id"):
            if row.get(key) is not None:
                return row.get(key)
    return index


def _generate(dataset: Any, adapter: ConversationAdapter, report: SkipReport, check_all_bad: bool) -> Iterator[Conversation]:
    total = 0
    skipped_before = report.skipped  # e.g. malformed JSON lines, counted when the file was read
    for index, row in enumerate(dataset):
        total += 1
        try:
            conversation = adapter(row)
        except SkipRow as skip:
            report.add(skip.reason, _row_id(row, index), skip.detail)
            logger.debug("skipped row %s: %s", _row_id(row, index), skip)
            continue
        except Exception as err:  # a row must never end the run; the report keeps what went wrong
            report.add(MALFORMED_ROW, _row_id(row, index), f"{type(err).__name__}: {err}")
            logger.debug("skipped row %s", _row_id(row, index), exc_info=True)
            continue
        report.add_kept()
        conversation.setdefault("metadata", {})["row"] = _row_id(row, index)  # names it in later skip reports
        yield conversation
    if report.skipped:
        logger.warning("data: %s", report.summary())
    if check_all_bad:
        report.raise_if_all_bad(total, skipped=report.skipped - skipped_before)


def iter_conversations(
    dataset: Any,
    format: str = "auto",
    *,
    report: SkipReport | None = None,
    base_dir: str | os.PathLike | None = None,
    image_root: str | os.PathLike | None = None,
    image_cache: ImageCache | None = None,
    eval_resize: bool = False,
    require_assistant: bool = True,
    check_all_bad: bool = True,
) -> Iterator[Conversation]:
    """Yields one Conversation per usable row of `dataset` (a Dataset, IterableDataset or list of dicts).

    The format is checked now (ValueError naming expected and found columns); rows are converted lazily.
    Skipped rows are counted in `report`; at the end of a pass where every row was skipped,
    `NoUsableRowsError` is raised (unless `check_all_bad=False`). `base_dir` resolves relative image paths,
    `image_root` is LLaVA's image folder (default `base_dir`), `eval_resize` resizes CRAG-MM egocentric
    images to 960x1280 as the benchmark's evaluation does.
    """
    adapter = make_adapter(
        dataset,
        format,
        base_dir=base_dir,
        image_root=image_root,
        image_cache=image_cache,
        eval_resize=eval_resize,
        require_assistant=require_assistant,
    )
    report = report if report is not None else SkipReport()
    report.format_description = FORMAT_DESCRIPTIONS[adapter.format]
    report.columns = _dataset_columns(dataset)
    return _generate(raw_image_view(dataset), adapter, report, check_all_bad)


def load_conversations(
    spec: str | os.PathLike,
    format: str = "auto",
    *,
    split: str | None = None,
    streaming: bool = False,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    **options: Any,
) -> Iterator[Conversation]:
    """`load_source(spec)` + `iter_conversations`, with relative image paths resolved against SPEC's folder.

    `options` go to `iter_conversations` (report, image_root, image_cache, eval_resize, ...). A JSON Lines file's
    malformed lines are counted in the report too (`malformed_json_line`, row `FILE:LINE`).
    """
    if options.get("report") is None:
        options["report"] = SkipReport()
    dataset = load_source(
        spec, split=split, streaming=streaming, revision=revision, cache_dir=cache_dir, report=options["report"]
    )
    options.setdefault("base_dir", spec_base_dir(spec))
    return iter_conversations(dataset, format, **options)



def split_specs(specs: str | os.PathLike) -> list[str]:
    """`--data a.parquet,b.jsonl` -> both; each SPEC is read with its own format detection."""
    return [part.strip() for part in str(specs).split(",") if part.strip()]


def load_many(
    specs: str | os.PathLike, format: str = "auto", *, report: SkipReport | None = None, **options: Any
) -> Iterator[Conversation]:
    """Conversations from one or several comma-separated SPECs, in order. Every SPEC's format is checked before
    the first row is read; skips are counted per SPEC (so "every row bad" is judged per SPEC) and merged."""
    report = report if report is not None else SkipReport()
    streams = []
    for spec in split_specs(specs):
        own = SkipReport()
        streams.append((own, load_conversations(spec, format, report=own, **options)))

    def chained() -> Iterator[Conversation]:
        merged = 0
        try:
            for own, stream in streams:
                yield from stream
                report.merge(own)
                merged += 1
        finally:  # also when the reader stops early (close()), so the counts stay complete
            for own, _ in streams[merged:]:
                report.merge(own)

    return chained()
