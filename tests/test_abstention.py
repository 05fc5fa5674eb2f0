"""`n2eye train --abstain-fraction`: which conversations become "I don't know" samples, what they look like once
encoded, and that a run reports how many it made."""

from __future__ import annotations

import json

import pytest

from conftest import draw_shapes
from n2eye.data.abstention import Abstention, chosen, withhold
from n2eye.eval.crag_protocol import is_missing
from test_train import run_train, write_messages_dataset


def conversation(i: int, with_image: bool = True, tool_call: bool = False) -> dict:
    first = [{"type": "image"}, {"type": "text", "text": f"What is {i}?"}] if with_image else f"What is {i}?"
    messages = [{"role": "user", "content": first}, {"role": "assistant", "content": f"answer {i}"},
                {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "more"}]  # fmt: skip
    if tool_call:
        call = {"type": "function", "function": {"name": "lookup", "arguments": {"q": "x"}}}
        messages[1] = {"role": "assistant", "content": "", "tool_calls": [call]}
        messages.insert(2, {"role": "tool", "content": "42"})
    return {"messages": messages, "images": [draw_shapes(size=(40, 30))] if with_image else []}


def test_choice_is_deterministic_and_close_to_the_fraction():
    picks = [chosen(7, i, 0.25) for i in range(4000)]
    assert picks == [chosen(7, i, 0.25) for i in range(4000)]  # same seed, same choice (resume, every process)
    assert 0.22 < sum(picks) / len(picks) < 0.28
    assert picks != [chosen(8, i, 0.25) for i in range(4000)]
    assert not any(chosen(7, i, 0.0) for i in range(100))


def test_withheld_conversation_is_grey_and_answers_abstain():
    original = conversation(3, tool_call=True)
    changed = withhold(original, "I don't know.")
    image = changed["images"][0]
    assert image.size == (40, 30) and image.getextrema() == ((128, 128), (128, 128), (128, 128))
    answers = [m for m in changed["messages"] if m["role"] == "assistant"]
    assert answers[0]["tool_calls"] == original["messages"][1]["tool_calls"]  # tool calls kept as they are
    assert [m["content"] for m in answers[1:]] == ["I don't know."]
    assert all(is_missing(m["content"]) for m in answers[1:])  # what CRAG-MM scores as missing, not hallucination
    assert changed["metadata"]["abstention"] is True
    assert original["messages"][-1]["content"] == "more" and original["images"][0].getextrema() != image.getextrema()


def test_only_conversations_with_images_are_changed_and_counted():
    option = Abstention(0.5, seed=3)
    items = [conversation(i, with_image=i % 2 == 0) for i in range(40)]
    out = list(option.apply(items))
    expected = [i for i in range(40) if i % 2 == 0 and chosen(3, i, 0.5)]
    assert [i for i, c in enumerate(out) if (c.get("metadata") or {}).get("abstention")] == expected
    assert option.count == len(expected) > 0
    assert all(out[i] is items[i] for i in range(40) if i not in expected)


@pytest.mark.parametrize(("fraction", "answer", "message"), [(1.0, "x", "in \\[0, 1\\)"), (-0.1, "x", "in \\[0, 1\\)"),
                                                             (0.2, "  ", "must not be empty")])  # fmt: skip
def test_bad_settings_are_refused(fraction, answer, message, tmp_path):
    from n2eye.train.config import TrainConfig

    with pytest.raises(ValueError, match=message):
        TrainConfig(model="m", data="d", out=str(tmp_path), abstain_fraction=fraction, abstain_answer=answer)


def test_encoded_abstention_sample_supervises_the_phrase_on_a_grey_image(tiny_model):
    from n2eye.data.collate import encode_conversation

    _, processor = tiny_model
    sample = withhold(conversation(1), "I don't know.")
    example = encode_conversation(processor, sample, max_length=2048)
    supervised = [t for t in example["labels"] if t != -100]
    assert processor.tokenizer.decode(supervised) == "I don't know.<|im_end|>I don't know.<|im_end|>"
    pixels = example["pixel_values"]
    assert float(pixels.max() - pixels.min()) == 0.0  # one uniform value: the grey image, normalised


def test_a_training_run_makes_and_reports_its_abstention_samples(tiny_checkpoint, tmp_path, capsys):
    data = write_messages_dataset(tmp_path / "data", n=8)
    run_train(tiny_checkpoint, data, tmp_path / "run", max_steps=2, abstain_fraction=0.5, seed=11)
    result = json.loads((tmp_path / "run" / "train_result.json").read_text())
    expected = sum(chosen(11, i, 0.5) for i in range(8))
    assert result["abstention_conversations"] == expected > 0
    assert result["config"]["abstain_fraction"] == 0.5
    assert f"abstention: {expected} conversations" in capsys.readouterr().out


def test_default_run_changes_nothing(tiny_checkpoint, tmp_path):
    data = write_messages_dataset(tmp_path / "data", n=4)
    run_train(tiny_checkpoint, data, tmp_path / "run", max_steps=1)
    assert json.loads((tmp_path / "run" / "train_result.json").read_text())["abstention_conversations"] is None



def test_streaming_run_applies_the_option_as_it_reads(tiny_checkpoint, tmp_path, monkeypatch):
    from n2eye.data import abstention

    seen = []
    real = abstention.withhold
    monkeypatch.setattr(abstention, "withhold", lambda conv, answer: seen.append(answer) or real(conv, answer))
    data = write_messages_dataset(tmp_path / "data", n=8)
    run_train(tiny_checkpoint, data, tmp_path / "run", max_steps=2, streaming=True, abstain_fraction=0.5, seed=11,
              abstain_answer="No idea.")  # fmt: skip
    assert seen and set(seen) == {"No idea."}
    assert json.loads((tmp_path / "run" / "train_result.json").read_text())["abstention_conversations"] is None
