"""`n2eye.load`: chat, batch generation, and multi-turn sessions that reuse the model state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "colours"


@pytest.fixture(scope="module")
def eye(trained_tiny):
    import n2eye

    return n2eye.load(trained_tiny)


def _image(name: str) -> Image.Image:
    return Image.open(EXAMPLES / name).convert("RGB")


def _question(name: str, text: str = "What colour is the shape?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": _image(name)}, {"type": "text", "text": text}]}]


def test_chat_answers_from_the_image(eye):
    answers = {name: eye.chat(_question(name), temperature=0, max_new_tokens=4) for name in
               ("red_circle.png", "blue_square.png", "green_circle.png")}  # fmt: skip
    assert set(answers.values()) <= {"red", "green", "blue", "yellow"}, answers  # learned the answer vocabulary
    assert len(set(answers.values())) >= 2, answers  # and the answer depends on the picture


def test_generate_batch_equals_one_by_one(eye):
    conversations = [_question("red_circle.png"), [{"role": "user", "content": "Hello there, no picture"}],
                     _question("yellow_square.png", "Which shape is it?")]  # fmt: skip
    batched = eye.generate_batch(conversations, temperature=0, max_new_tokens=5)
    singles = [eye.chat(c, temperature=0, max_new_tokens=5) for c in conversations]
    assert batched == singles


def test_stream_yields_the_same_text(eye):
    full = eye.chat(_question("green_square.png"), temperature=0, max_new_tokens=5)
    chunks = list(eye.chat(_question("green_square.png"), temperature=0, max_new_tokens=5, stream=True))
    assert "".join(chunks) == full and len(chunks) >= 1


def test_session_reuses_state_and_equals_full_reprefill(trained_tiny):
    import n2eye

    eye = n2eye.load(trained_tiny)  # fresh image cache: count encoder calls from zero
    calls = []
    eye.model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    session = eye.session()
    turns = [
        [{"type": "image", "image": _image("blue_circle.png")}, {"type": "text", "text": "What colour is the shape?"}],
        "Which shape is it?",
        "What colour is the shape?",
    ]
    answers, prompt_lengths = [], []
    for turn in turns:
        before = session.prefilled_tokens
        answers.append(session.send(turn, temperature=0, max_new_tokens=4))
        prompt_lengths.append(session.prefilled_tokens - before)
    assert answers[0] in {"red", "green", "blue", "yellow"} and answers[1] in {"circle", "square"}, answers
    assert len(calls) == 1, "the image must be encoded once per session"
    # later turns only run their new tokens, far fewer than the image block alone
    assert prompt_lengths[1] < 20 and prompt_lengths[2] < 20 and prompt_lengths[0] > 64
    # full re-prefill over the same tokens, without any cache, gives the same greedy answer
    ids = session.ids
    answer_len = len(eye.tokenizer(answers[2], add_special_tokens=False)["input_ids"]) + 1
    prompt = ids[:, : ids.shape[1] - answer_len]
    pixels = eye.processor.image_processor([_image("blue_circle.png")], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = eye.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), pixel_values=pixels,
                                       do_sample=False, max_new_tokens=4, use_cache=False)  # fmt: skip
    assert eye.decode(reference[0, prompt.shape[1] :]) == answers[2]
    assert torch.equal(reference[0, : ids.shape[1]], ids[0, : reference.shape[1]])


def test_chat_message_parses_tool_calls(eye, monkeypatch):
    monkeypatch.setattr(eye, "chat", lambda *a, **k: '<|tool_call_start|>[lookup(item="red circle")]<|tool_call_end|>')
    message = eye.chat_message([{"role": "user", "content": "price?"}])
    assert message["tool_calls"][0]["function"]["name"] == "lookup"
    assert message["content"] == ""


def test_generate_jsonl_requests_with_a_bad_line(trained_tiny, tmp_path):
    import json
    import subprocess
    import sys

    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "What colour is the shape?", "image": str(EXAMPLES / "red_circle.png")},
        {"oops": "no prompt"},
        {"messages": [{"role": "user", "content": "Hello"}]},
        {"prompt": "What colour?", "image": str(tmp_path / "missing.png")},
    ]) + "\n")  # fmt: skip
    out = tmp_path / "results.jsonl"
    result = subprocess.run([sys.executable, "-m", "n2eye.cli", "generate", "--model", str(trained_tiny),
                             "--requests", str(requests), "--out", str(out), "--temperature", "0",
                             "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3, 4]
    assert "answer" in records[0] and "answer" in records[2]
    assert "prompt" in records[1]["error"] and "does not exist" in records[3]["error"]
    assert "4 results" in result.stdout and "2 errors" in result.stdout


def test_terminal_chat_commands_and_streaming(trained_tiny):
    import io

    from n2eye.infer.chat import ChatConfig, chat

    script = io.StringIO(
        f"/image {EXAMPLES / 'green_square.png'}\nWhat colour is the shape?\nWhich shape is it?\n"
        "/image /no/such/file.png\nAnd this one?\n/system Answer briefly.\nHi\n/reset\n/quit\n"
    )
    output = io.StringIO()
    answers = chat(ChatConfig(model=str(trained_tiny), max_new_tokens=4, temperature=0), stdin=script, stdout=output)
    text = output.getvalue()
    assert answers == 3
    assert text.count("n2eye> ") == 4 and "(error:" in text and "system: Answer briefly." in text
    assert "(new chat)" in text


def test_chat_fills_image_placeholders_from_images(eye):
    placeholder = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
    by_argument = eye.chat(placeholder, images=[_image("yellow_circle.png")], temperature=0, max_new_tokens=4)
    inline = eye.chat(_question("yellow_circle.png"), temperature=0, max_new_tokens=4)
    assert by_argument == inline
    with pytest.raises(ValueError, match="image"):
        eye.chat(placeholder, images=[], temperature=0, max_new_tokens=4)
