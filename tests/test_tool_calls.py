"""Tests for the Pythonic tool-call parser/formatter (n2eye/modeling/tool_calls.py)."""

from __future__ import annotations

import copy
import importlib.util
import json
import re
from pathlib import Path

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

MODELING_DIR = Path(__file__).parents[1] / "src" / "n2eye" / "modeling"


def _load_tool_calls_module():
    # Load by path: the module is standalone (stdlib only) and must not depend on the n2eye package importing cleanly.
    spec = importlib.util.spec_from_file_location("n2eye_tool_calls_under_test", MODELING_DIR / "tool_calls.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tc = _load_tool_calls_module()
ToolCallParseError = tc.ToolCallParseError
format_tool_calls = tc.format_tool_calls
parse_tool_calls = tc.parse_tool_calls
normalize_tool_calls = tc.normalize_tool_calls

TEMPLATE = (MODELING_DIR / "chat_template.jinja").read_text(encoding="utf-8")
START, END = "<|tool_call_start|>", "<|tool_call_end|>"


def names_and_args(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


# ---------------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------------


def test_parse_single_call():
    text, calls = parse_tool_calls(f'{START}[f(a="x", n=2)]{END}')
    assert text == ""
    assert len(calls) == 1
    call = calls[0]
    assert call["type"] == "function"
    assert re.fullmatch(r"call_0_[0-9a-f]+", call["id"])
    assert call["function"]["name"] == "f"
    assert isinstance(call["function"]["arguments"], str)
    assert json.loads(call["function"]["arguments"]) == {"a": "x", "n": 2}


def test_parse_multiple_calls_and_blocks_with_unique_ids():
    _, calls = parse_tool_calls(f"{START}[f(a=1), g(b=2)]{END} and {START}[h()]{END}")
    assert names_and_args(calls) == [("f", {"a": 1}), ("g", {"b": 2}), ("h", {})]
    ids = [c["id"] for c in calls]
    assert [i.split("_")[1] for i in ids] == ["0", "1", "2"]
    assert len(set(ids)) == 3


def test_parse_keeps_surrounding_text():
    text, calls = parse_tool_calls(f"  Let me check. {START}[f(x=1)]{END} One moment.\n")
    assert text == "Let me check.  One moment."
    assert names_and_args(calls) == [("f", {"x": 1})]


def test_parse_text_without_calls():
    assert parse_tool_calls("  Just an answer.\n") == ("Just an answer.", [])


def test_parse_json_and_python_literals():
    _, calls = parse_tool_calls(f"{START}[f(a=true, b=false, c=null, d=True, e=False, g=None)]{END}")
    assert names_and_args(calls) == [("f", {"a": True, "b": False, "c": None, "d": True, "e": False, "g": None})]


def test_parse_nested_values_and_quotes():
    src = f"""{START}[f(xs=[1, -2.5, [true, null]], cfg={{"k": {{"deep": [false]}}, 'py': 'single'}}, t=(1, 2))]{END}"""
    _, calls = parse_tool_calls(src)
    assert names_and_args(calls) == [
        ("f", {"xs": [1, -2.5, [True, None]], "cfg": {"k": {"deep": [False]}, "py": "single"}, "t": [1, 2]})
    ]


def test_parse_unicode_kept_unescaped():
    _, calls = parse_tool_calls(f'{START}[f(city="Zürich")]{END}')
    assert calls[0]["function"]["arguments"] == '{"city": "Zürich"}'


def test_parse_single_call_without_brackets_and_dotted_name():
    _, calls = parse_tool_calls(f'{START}math.add(a=1, b=2){END}')
    assert names_and_args(calls) == [("math.add", {"a": 1, "b": 2})]


def test_parse_empty_list():
    assert parse_tool_calls(f"Nothing to do. {START}[]{END}") == ("Nothing to do.", [])


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"{START}[f(a=1{END}", r"not valid call syntax"),
        (f"{START}[f(1, 2)]{END}", r"positional arguments"),
        (f"{START}[f(a=x)]{END}", r"argument 'a' of f\(\) is not a literal value"),
        (f"{START}[f(a=g())]{END}", r"not a literal value"),
        (f"{START}[f(a=1, a=2)]{END}", r"repeats the keyword argument 'a'"),
        (f"{START}[f(**kw)]{END}", r"\*\*kwargs"),
        (f"{START}[42]{END}", r"is not a function call"),
        (f"{START}[f()()]{END}", r"must be a \(dotted\) name"),
        (f'{START}"just a string"{END}', r"expected a list of calls"),
        (f"{START}   {END}", r"empty"),
        (f"{START}[f(s={{1, 2}})]{END}", r"not JSON"),
        (f"{START}[f(b=b'x')]{END}", r"not JSON"),
        (f"{START}[f(d={{1: 2}})]{END}", r"non-string dict key"),
        (f"{START}[f(a=1e999)]{END}", r"not a finite number"),
        (f"ok {START}[f(a=1)]", r"Unterminated tool call block"),
        (f"ok [f(a=1)]{END}", r"without a matching"),
        (f"{START}[f(a=1)]{START}[g()]{END}", r"nested"),
    ],
)
def test_malformed_raises_helpful_error(text, expected):
    with pytest.raises(ToolCallParseError, match=expected) as info:
        parse_tool_calls(text)
    message = str(info.value)
    assert "expected a Python-style list of calls" in message
    assert isinstance(info.value, ValueError)


def test_error_quotes_offending_text_truncated():
    long_arg = "y" * 1000
    with pytest.raises(ToolCallParseError) as info:
        parse_tool_calls(f"{START}[f({long_arg})]{END}")
    message = str(info.value)
    assert "f(yyyy" in message
    assert "..." in message
    assert len(message) < 600


# ---------------------------------------------------------------------------------------------------------------------
# Formatting
# ---------------------------------------------------------------------------------------------------------------------

CALLS = [
    {"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Paris"}}},
    {"name": "search", "arguments": {"query": 'café "best"', "limit": 2, "exact": True, "none": None}},
    {"name": "math.add", "arguments": {"xs": [1, 2.5, [3]], "opts": {"round": False, "nested": {"k": []}}}},
    {"name": "now", "arguments": {}},
    {"name": "noargs"},
]


def test_format_examples():
    assert format_tool_calls([CALLS[0]]) == f'{START}[get_weather(location="Paris")]{END}'
    assert format_tool_calls([{"name": "f", "arguments": '{"a": "x", "n": 2}'}]) == f'{START}[f(a="x", n=2)]{END}'
    assert format_tool_calls([{"name": "f", "arguments": ""}]) == f"{START}[f()]{END}"
    assert format_tool_calls([]) == ""


def test_format_matches_template_rendering():
    messages = [{"role": "assistant", "content": None, "tool_calls": CALLS}]
    rendered, _ = render_jinja_template([messages], chat_template=TEMPLATE, bos_token="", default_system_prompt="")
    assert rendered[0] == f"<|im_start|>assistant\n{format_tool_calls(CALLS)}<|im_end|>\n"


def test_format_json_string_arguments_match_dict_arguments():
    as_strings = [
        {"type": "function", "function": {"name": c.get("function", c)["name"],
                                           "arguments": json.dumps(c.get("function", c).get("arguments") or {})}}
        for c in CALLS
    ]
    assert format_tool_calls(as_strings) == format_tool_calls(CALLS)


def test_round_trip():
    _, parsed = parse_tool_calls(format_tool_calls(CALLS))
    expected = [(c.get("function", c)["name"], c.get("function", c).get("arguments") or {}) for c in CALLS]
    assert names_and_args(parsed) == expected


def test_round_trip_from_openai_output():
    _, parsed = parse_tool_calls(f"{START}[a(x=[1, {{\"y\": null}}]), b(s='it\\'s')]{END}")
    _, reparsed = parse_tool_calls(format_tool_calls(parsed))
    assert names_and_args(reparsed) == names_and_args(parsed) == [("a", {"x": [1, {"y": None}]}), ("b", {"s": "it's"})]


@pytest.mark.parametrize(
    ("calls", "expected"),
    [
        ([{"name": "f", "arguments": "{not json"}], r"not valid JSON"),
        ([{"name": "f", "arguments": "[1, 2]"}], r"must be a JSON object"),
        ([{"arguments": {}}], r"function name"),
        (["f(a=1)"], r"must be a dict"),
    ],
)
def test_format_bad_input_raises(calls, expected):
    with pytest.raises(ValueError, match=expected):
        format_tool_calls(calls)


# ---------------------------------------------------------------------------------------------------------------------
# normalize_tool_calls
# ---------------------------------------------------------------------------------------------------------------------


def test_normalize_parses_json_strings_without_touching_input():
    image = object()  # stands in for a PIL image: must be shared, not copied
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": '{"a": [1, 2]}'}},
                {"name": "g", "arguments": {"b": True}},
                {"name": "h", "arguments": ""},
            ],
        },
        {"role": "tool", "content": '{"kept": "as string"}'},
    ]
    snapshot = copy.deepcopy(messages[1:])
    out = normalize_tool_calls(messages)

    assert messages[1:] == snapshot
    assert out is not messages
    assert out[0]["content"][0]["image"] is image
    assert out[2] == messages[2]
    assert out[1]["tool_calls"] == [
        {"id": "call_0", "type": "function", "function": {"name": "f", "arguments": {"a": [1, 2]}}},
        {"name": "g", "arguments": {"b": True}},
        {"name": "h", "arguments": {}},
    ]
    # The normalized messages render with the template.
    rendered, _ = render_jinja_template([out], chat_template=TEMPLATE, bos_token="", default_system_prompt="")
    assert f"{START}[f(a=[1, 2]), g(b=true), h()]{END}<|im_end|>" in rendered[0]


def test_normalize_bad_json_names_message_and_tool():
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "lookup", "arguments": "{"}}]},
    ]
    with pytest.raises(ValueError, match=r"Message 1, tool call 'lookup'.*not valid JSON"):
        normalize_tool_calls(messages)


def test_module_imports_only_stdlib():
    import ast as _ast
    import sys

    tree = _ast.parse((MODELING_DIR / "tool_calls.py").read_text(encoding="utf-8"))
    roots = set()
    for node in _ast.walk(tree):
        if isinstance(node, _ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, _ast.ImportFrom):
            assert node.level == 0, "relative imports are not allowed in tool_calls.py"
            roots.add(node.module.split(".")[0])
    assert roots <= set(sys.stdlib_module_names) | {"__future__"}
