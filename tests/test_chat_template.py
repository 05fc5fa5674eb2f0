"""Golden tests for the N2-Eye (LFM2 ChatML) chat template, rendered with transformers' own jinja machinery."""

from __future__ import annotations

from pathlib import Path

import pytest
from jinja2.exceptions import TemplateError
from transformers.utils.chat_template_utils import render_jinja_template

TEMPLATE_PATH = Path(__file__).parents[1] / "src" / "n2eye" / "modeling" / "chat_template.jinja"
TEMPLATE = TEMPLATE_PATH.read_text(encoding="utf-8")
BOS = "<|startoftext|>"
DEFAULT_SYSTEM = "You are a helpful assistant trained by Liquid AI. You can see and understand images."

CANDY_URL = "https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/candy.JPG"

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city.",
        "parameters": {
            "type": "object",
            "properties": {"location": {"type": "string", "description": "City name"}},
            "required": ["location"],
        },
    },
}


def render(messages, **kwargs) -> str:
    kwargs.setdefault("bos_token", BOS)
    rendered, _ = render_jinja_template([messages], chat_template=TEMPLATE, **kwargs)
    return rendered[0]


def render_with_spans(messages, **kwargs) -> tuple[str, list[tuple[int, int]]]:
    kwargs.setdefault("bos_token", BOS)
    rendered, indices = render_jinja_template(
        [messages], chat_template=TEMPLATE, return_assistant_tokens_mask=True, **kwargs
    )
    return rendered[0], indices[0]


# ---------------------------------------------------------------------------------------------------------------------
# Golden renders
# ---------------------------------------------------------------------------------------------------------------------


def test_plain_chat_uses_default_system_prompt():
    messages = [
        {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": "Hi, how can I help?"},
    ]
    assert render(messages) == (
        "<|startoftext|><|im_start|>system\n"
        "You are a helpful assistant trained by Liquid AI. You can see and understand images.<|im_end|>\n"
        "<|im_start|>user\n"
        "Hello!<|im_end|>\n"
        "<|im_start|>assistant\n"
        "Hi, how can I help?<|im_end|>\n"
    )


def test_image_chat_example():
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What is on the table?"}],
        },
        {"role": "assistant", "content": "A red mug."},
    ]
    assert render(messages) == (
        "<|startoftext|><|im_start|>system\n"
        "You are a helpful assistant trained by Liquid AI. You can see and understand images.<|im_end|>\n"
        "<|im_start|>user\n"
        "<image>What is on the table?<|im_end|>\n"
        "<|im_start|>assistant\n"
        "A red mug.<|im_end|>\n"
    )


def test_model_card_example_with_generation_prompt():
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "url": CANDY_URL},
                {"type": "text", "text": "What animal is on the candy?"},
            ],
        }
    ]
    assert render(messages, add_generation_prompt=True) == (
        "<|startoftext|><|im_start|>system\n"
        "You are a helpful assistant trained by Liquid AI. You can see and understand images.<|im_end|>\n"
        "<|im_start|>user\n"
        "<image>What animal is on the candy?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_system_tools_tool_call_and_response():
    messages = [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "What's the weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Paris"}}}
            ],
        },
        {"role": "tool", "content": {"temperature_c": 18, "condition": "sunny"}},
        {"role": "assistant", "content": "It is 18 °C and sunny in Paris."},
    ]
    assert render(messages, tools=[WEATHER_TOOL]) == (
        "<|startoftext|><|im_start|>system\n"
        "You are a weather bot.\n"
        'List of tools: <|tool_list_start|>[{"type": "function", "function": {"name": "get_weather", '
        '"description": "Get the current weather for a city.", "parameters": {"type": "object", '
        '"properties": {"location": {"type": "string", "description": "City name"}}, '
        '"required": ["location"]}}}]<|tool_list_end|><|im_end|>\n'
        "<|im_start|>user\n"
        "What's the weather in Paris?<|im_end|>\n"
        "<|im_start|>assistant\n"
        '<|tool_call_start|>[get_weather(location="Paris")]<|tool_call_end|><|im_end|>\n'
        "<|im_start|>tool\n"
        '<|tool_response_start|>{"temperature_c": 18, "condition": "sunny"}<|tool_response_end|><|im_end|>\n'
        "<|im_start|>assistant\n"
        "It is 18 °C and sunny in Paris.<|im_end|>\n"
    )


def test_two_images_in_one_turn():
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "path": "a.png"},
                {"type": "text", "text": "This is a cat. "},
                {"type": "image", "path": "b.png"},
                {"type": "text", "text": "Is this the same cat?"},
            ],
        },
        {"role": "assistant", "content": "Yes, both show the same tabby cat."},
    ]
    assert render(messages) == (
        "<|startoftext|><|im_start|>system\n"
        "You are a helpful assistant trained by Liquid AI. You can see and understand images.<|im_end|>\n"
        "<|im_start|>user\n"
        "<image>This is a cat. <image>Is this the same cat?<|im_end|>\n"
        "<|im_start|>assistant\n"
        "Yes, both show the same tabby cat.<|im_end|>\n"
    )


MULTI_TURN = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]},
    {"role": "assistant", "content": "A dog running on a beach."},
    {"role": "user", "content": "What color is the dog?"},
    {"role": "assistant", "content": "Brown with white paws."},
    {"role": "user", "content": [{"type": "text", "text": "Is it sunny?"}]},
    {"role": "assistant", "content": "Yes, the sky is clear."},
]


def test_multi_turn_image_in_first_turn_only():
    assert render(MULTI_TURN) == (
        "<|startoftext|><|im_start|>system\n"
        "You are a helpful assistant trained by Liquid AI. You can see and understand images.<|im_end|>\n"
        "<|im_start|>user\n"
        "<image>Describe the image.<|im_end|>\n"
        "<|im_start|>assistant\n"
        "A dog running on a beach.<|im_end|>\n"
        "<|im_start|>user\n"
        "What color is the dog?<|im_end|>\n"
        "<|im_start|>assistant\n"
        "Brown with white paws.<|im_end|>\n"
        "<|im_start|>user\n"
        "Is it sunny?<|im_end|>\n"
        "<|im_start|>assistant\n"
        "Yes, the sky is clear.<|im_end|>\n"
    )


# ---------------------------------------------------------------------------------------------------------------------
# System prompt handling
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", None])
def test_empty_default_system_prompt_gives_no_system_block(value):
    messages = [{"role": "user", "content": "Hi"}]
    assert render(messages, default_system_prompt=value) == "<|startoftext|><|im_start|>user\nHi<|im_end|>\n"


def test_custom_default_system_prompt():
    messages = [{"role": "user", "content": "Hi"}]
    assert render(messages, default_system_prompt="Be terse.") == (
        "<|startoftext|><|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_first_system_message_overrides_default_and_accepts_text_items():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "terse."}]},
        {"role": "user", "content": "Hi"},
    ]
    assert render(messages, default_system_prompt="ignored") == (
        "<|startoftext|><|im_start|>system\nBe terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


def test_empty_first_system_message_gives_no_system_block():
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": "Hi"}]
    assert render(messages) == "<|startoftext|><|im_start|>user\nHi<|im_end|>\n"


def test_tools_without_system_prompt_have_no_leading_newline():
    tool = {"name": "add", "parameters": {"type": "object"}}
    messages = [{"role": "user", "content": "1+1?"}]
    assert render(messages, tools=[tool], default_system_prompt="") == (
        "<|startoftext|><|im_start|>system\n"
        'List of tools: <|tool_list_start|>[{"name": "add", "parameters": {"type": "object"}}]<|tool_list_end|>'
        "<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
    )


def test_tools_are_appended_to_builtin_default():
    tool = {"name": "add"}
    text = render([{"role": "user", "content": "x"}], tools=[tool])
    assert text.startswith(
        f'<|startoftext|><|im_start|>system\n{DEFAULT_SYSTEM}\nList of tools: <|tool_list_start|>[{{"name": "add"}}]'
        "<|tool_list_end|><|im_end|>\n"
    )


def test_later_system_message_renders_as_normal_message():
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "system", "content": "Switch to French."},
    ]
    assert render(messages, default_system_prompt="") == (
        "<|startoftext|><|im_start|>user\nHi<|im_end|>\n<|im_start|>system\nSwitch to French.<|im_end|>\n"
    )


def test_bos_token_appears_once():
    text = render(MULTI_TURN, add_generation_prompt=True)
    assert text.count(BOS) == 1 and text.startswith(BOS)


# ---------------------------------------------------------------------------------------------------------------------
# Content and tool details
# ---------------------------------------------------------------------------------------------------------------------


def test_openai_image_url_item_renders_image_token():
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    assert render(messages, default_system_prompt="") == (
        "<|startoftext|><|im_start|>user\n<image>What is this?<|im_end|>\n"
    )


def test_missing_or_none_content_is_empty():
    messages = [{"role": "user"}, {"role": "assistant", "content": None}]
    assert render(messages, default_system_prompt="") == (
        "<|startoftext|><|im_start|>user\n<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
    )


def test_tool_calls_bare_form_multiple_calls_and_value_types():
    messages = [
        {
            "role": "assistant",
            "content": "Working on it.",
            "tool_calls": [
                {"name": "search", "arguments": {"query": "café \"best\"", "limit": 2, "exact": True}},
                {"name": "math.add", "arguments": {"xs": [1, 2.5, None], "opts": {"round": False, "k": "v"}}},
                {"name": "now", "arguments": {}},
            ],
        }
    ]
    assert render(messages, default_system_prompt="") == (
        "<|startoftext|><|im_start|>assistant\n"
        '<|tool_call_start|>[search(query="café \\"best\\"", limit=2, exact=true), '
        'math.add(xs=[1, 2.5, null], opts={"round": false, "k": "v"}), now()]<|tool_call_end|>'
        "Working on it.<|im_end|>\n"
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("plain text", "plain text"),
        ([{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "ab"),
        ({"ok": True}, '{"ok": true}'),
        ([1, 2], "[1, 2]"),
        ([], "[]"),
        (42, "42"),
        (None, ""),
    ],
)
def test_tool_response_content(content, expected):
    messages = [{"role": "tool", "content": content}]
    assert render(messages, default_system_prompt="") == (
        f"<|startoftext|><|im_start|>tool\n<|tool_response_start|>{expected}<|tool_response_end|><|im_end|>\n"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Errors (transformers' raise_exception raises jinja2.exceptions.TemplateError)
# ---------------------------------------------------------------------------------------------------------------------


def test_unknown_role_raises():
    with pytest.raises(TemplateError, match=r"Unknown message role 'bot'.*system, user, assistant, tool"):
        render([{"role": "bot", "content": "hi"}])


def test_unknown_content_type_raises():
    messages = [{"role": "user", "content": [{"type": "video", "video": "x.mp4"}]}]
    with pytest.raises(TemplateError, match=r"Unsupported content type 'video'.*text, image, image_url"):
        render(messages)


def test_string_tool_call_arguments_raise():
    messages = [
        {
            "role": "assistant",
            "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}],
        }
    ]
    with pytest.raises(TemplateError, match=r"arguments must be a dict.*'f'"):
        render(messages)


# ---------------------------------------------------------------------------------------------------------------------
# Generation spans ({% generation %}) for assistant masks
# ---------------------------------------------------------------------------------------------------------------------


def test_generation_spans_cover_assistant_content_and_im_end():
    text, spans = render_with_spans(MULTI_TURN)
    assert [text[start:end] for start, end in spans] == [
        "A dog running on a beach.<|im_end|>",
        "Brown with white paws.<|im_end|>",
        "Yes, the sky is clear.<|im_end|>",
    ]
    assert text == render(MULTI_TURN)


def test_generation_spans_include_tool_calls():
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "tool_calls": [{"name": "get_weather", "arguments": {"location": "Paris"}}]},
        {"role": "tool", "content": "18C"},
        {"role": "assistant", "content": "It is 18C."},
    ]
    text, spans = render_with_spans(messages, tools=[WEATHER_TOOL], add_generation_prompt=True)
    assert [text[start:end] for start, end in spans] == [
        '<|tool_call_start|>[get_weather(location="Paris")]<|tool_call_end|><|im_end|>',
        "It is 18C.<|im_end|>",
    ]
    for _, end in spans:
        assert text[end] == "\n"


def test_template_variables_are_only_real_inputs():
    # Processors route apply_chat_template kwargs to the template by this set, so internal names must not leak into it.
    from transformers.utils.chat_template_utils import _get_template_variables

    assert _get_template_variables(TEMPLATE) == {
        "messages",
        "tools",
        "add_generation_prompt",
        "bos_token",
        "default_system_prompt",
    }
