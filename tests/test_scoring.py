"""Scoring for `n2eye eval`: normalization, boxes, IoU, matching, tool calls, aggregation and the report table."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from n2eye.eval.scoring import (
    _max_weight_assignment,
    aggregate,
    box_iou,
    exact_match,
    format_table,
    grounding_score,
    normalize_answer,
    parse_boxes,
    score_turn,
    tool_call_score,
)
from n2eye.modeling.tool_calls import format_tool_calls

# --------------------------------------------------------------------------------------------------------------------
# Exact match
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("Red.", "red"),
        ("  RED  ", "red"),
        ("Two", "2"),
        ("two", "2"),
        ("Ten!", "10"),
        ("the circle", "circle"),
        ("A red   square", "red square"),
        ('"red"', "red"),
        ("'red'", "red"),
        ("“red”", "red"),
        ('"Red."', "red"),
        ('"red".', "red"),
        ("Yes.", "yes"),
        ("a", "a"),  # an answer that is only an article is kept
    ],
)
def test_exact_match_equal_after_normalization(prediction, reference):
    assert exact_match(prediction, reference) == 1.0


@pytest.mark.parametrize(
    ("prediction", "reference"),
    [
        ("red", "blue"),
        ("circles", "circle"),  # conservative: no stemming
        ("eleven", "11"),  # only zero..ten are mapped
        ("yes, it is", "yes"),
        ("3.5", "35"),  # inner punctuation is kept
        ("", "red"),
    ],
)
def test_exact_match_different(prediction, reference):
    assert exact_match(prediction, reference) == 0.0


def test_normalize_answer_values():
    assert normalize_answer("  The   Two  Circles. ") == "2 circles"
    assert normalize_answer(None) == ""
    assert normalize_answer(3) == "3"
    assert normalize_answer("an") == "an"


def test_exact_match_accepts_several_references():
    assert exact_match("Blue", ["red", "blue"]) == 1.0
    assert exact_match("green", ["red", "blue"]) == 0.0


# --------------------------------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------------------------------

CIRCLE = {"label": "circle", "bbox": [0.1, 0.1, 0.4, 0.4]}
SQUARE = {"label": "square", "bbox": [0.5, 0.5, 0.9, 0.9]}


def test_parse_boxes_plain_json():
    assert parse_boxes(json.dumps([CIRCLE, SQUARE])) == [CIRCLE, SQUARE]
    assert parse_boxes("[]") == []


def test_parse_boxes_code_fence_and_prose():
    text = f"Here are the boxes:\n```json\n{json.dumps([CIRCLE])}\n```\nHope this helps."
    assert parse_boxes(text) == [CIRCLE]
    assert parse_boxes(f"Sure [see below]: {json.dumps([CIRCLE, SQUARE])} done.") == [CIRCLE, SQUARE]


def test_parse_boxes_single_object_and_string_numbers():
    assert parse_boxes(json.dumps(CIRCLE)) == [CIRCLE]
    text = '{"label": "circle", "bbox": ["0.1", "0.1", " 0.4", "0.4"]}'
    assert parse_boxes(text) == [CIRCLE]


def test_parse_boxes_swapped_and_out_of_range_coordinates():
    text = '[{"label": "circle", "bbox": [0.4, 0.9, 0.1, -0.2]}, {"label": "dot", "bbox": [1.5, 0, 2, 1]}]'
    boxes = parse_boxes(text)
    assert boxes == [
        {"label": "circle", "bbox": [0.1, 0.0, 0.4, 0.9]},
        {"label": "dot", "bbox": [1.0, 0.0, 1.0, 1.0]},
    ]


def test_parse_boxes_accepts_decoded_data():
    assert parse_boxes([CIRCLE]) == [CIRCLE]
    assert parse_boxes(CIRCLE) == [CIRCLE]


@pytest.mark.parametrize(
    "text",
    [
        "I cannot see any circles.",
        "",
        "[{",
        '[{"label": "circle", "bbox": [0.1, 0.2, 0.3]}]',  # three coordinates
        '[{"label": "circle", "bbox": [0.1, 0.2, 0.3, "far"]}]',
        '[{"label": "circle", "bbox": [0.1, 0.2, 0.3, NaN]}]',
        '[{"label": "circle"}]',
        '["circle", "square"]',
        '{"answer": 3}',
        "```json\nnot json\n```",
        None,
        42,
    ],
)
def test_parse_boxes_garbage_is_none(text):
    assert parse_boxes(text) is None


def test_parse_boxes_one_bad_item_spoils_the_list():
    """A subset of the list must not sneak through via the fallback search for embedded JSON."""
    text = json.dumps([{"label": "circle", "bbox": [0.1, 0.2, 0.3]}, SQUARE])
    assert parse_boxes(text) is None


def test_box_iou_values():
    assert box_iou([0.1, 0.1, 0.4, 0.4], [0.1, 0.1, 0.4, 0.4]) == pytest.approx(1.0)
    assert box_iou([0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]) == 0.0
    assert box_iou([0.0, 0.0, 0.5, 0.5], [0.5, 0.0, 1.0, 0.5]) == 0.0  # touching edges
    assert box_iou([0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0]) == pytest.approx(0.5)  # half inside
    assert box_iou([0.0, 0.0, 0.5, 1.0], [0.25, 0.0, 0.75, 1.0]) == pytest.approx(1 / 3)  # half overlapping
    assert box_iou([0.2, 0.2, 0.2, 0.2], [0.2, 0.2, 0.2, 0.2]) == 0.0  # empty union


# --------------------------------------------------------------------------------------------------------------------
# Grounding
# --------------------------------------------------------------------------------------------------------------------


def test_grounding_boxes_in_swapped_order_score_perfectly():
    result = grounding_score(json.dumps([SQUARE, CIRCLE]), [CIRCLE, SQUARE])
    assert result == {"iou": pytest.approx(1.0), "label_match": 1.0, "parsed": True}


def test_grounding_same_label_is_matched_first():
    """Labels decide the pairing before IoU: the circle box is scored against the circle, not the nearer square."""
    pred = [{"label": "circle", "bbox": SQUARE["bbox"]}, {"label": "square", "bbox": CIRCLE["bbox"]}]
    result = grounding_score(pred, [CIRCLE, SQUARE])
    assert result["label_match"] == 1.0
    assert result["iou"] == 0.0


def test_grounding_wrong_labels_still_match_by_iou():
    pred = [{"label": "ring", "bbox": CIRCLE["bbox"]}, {"label": "diamond", "bbox": SQUARE["bbox"]}]
    result = grounding_score(pred, [SQUARE, CIRCLE])
    assert result["iou"] == pytest.approx(1.0)
    assert result["label_match"] == 0.0


def test_grounding_labels_are_normalized():
    result = grounding_score([{"label": "The Circle", "bbox": CIRCLE["bbox"]}], [CIRCLE])
    assert result["label_match"] == 1.0


def test_grounding_missing_box_lowers_score():
    result = grounding_score(json.dumps([CIRCLE]), [CIRCLE, SQUARE])
    assert result["iou"] == pytest.approx(0.5)
    assert result["label_match"] == pytest.approx(0.5)


def test_grounding_extra_boxes_lower_score():
    extra = [CIRCLE, SQUARE, {"label": "circle", "bbox": [0.0, 0.6, 0.2, 0.8]}, {"label": "star", "bbox": [0, 0, 1, 1]}]
    result = grounding_score(extra, [CIRCLE, SQUARE])
    assert result["iou"] == pytest.approx(0.5)
    assert result["label_match"] == pytest.approx(0.5)


def test_grounding_partial_overlap():
    pred = [{"label": "box", "bbox": [0.0, 0.0, 0.5, 1.0]}]
    ref = [{"label": "box", "bbox": [0.25, 0.0, 0.75, 1.0]}]
    assert grounding_score(pred, ref)["iou"] == pytest.approx(1 / 3)


def test_grounding_unparseable_and_empty():
    assert grounding_score("no idea", [CIRCLE]) == {"iou": 0.0, "label_match": 0.0, "parsed": False}
    assert grounding_score("[]", []) == {"iou": 1.0, "label_match": 1.0, "parsed": True}
    assert grounding_score("[]", [CIRCLE]) == {"iou": 0.0, "label_match": 0.0, "parsed": True}
    assert grounding_score([CIRCLE], "[]")["iou"] == 0.0


def test_grounding_bad_reference_raises():
    with pytest.raises(ValueError, match="reference"):
        grounding_score([CIRCLE], "not boxes")


def test_assignment_is_optimal():
    """The Hungarian matcher agrees with brute force on small random (also rectangular) weight matrices."""
    rng = random.Random(0)
    for _ in range(200):
        n, m = rng.randint(1, 5), rng.randint(1, 5)
        weights = [[rng.choice([0.0, rng.random(), 3.0 + rng.random()]) for _ in range(m)] for _ in range(n)]
        pairs = _max_weight_assignment(weights)
        assert len(pairs) == min(n, m)
        assert len({i for i, _ in pairs}) == len({j for _, j in pairs}) == len(pairs)
        if n <= m:
            best = max(sum(weights[i][p[i]] for i in range(n)) for p in itertools.permutations(range(m), n))
        else:
            best = max(sum(weights[p[j]][j] for j in range(m)) for p in itertools.permutations(range(n), m))
        assert sum(weights[i][j] for i, j in pairs) == pytest.approx(best)


def test_grounding_many_boxes_is_fast():
    rng = random.Random(1)
    boxes = [{"label": "dot", "bbox": sorted([rng.random(), rng.random()]) * 2} for _ in range(150)]
    result = grounding_score(list(reversed(boxes)), boxes)
    assert result["label_match"] == 1.0


# --------------------------------------------------------------------------------------------------------------------
# Tool calls
# --------------------------------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "arguments": {"location": "Paris", "days": 2}}}
WEATHER_JSON = {
    "type": "function",
    "function": {"name": "get_weather", "arguments": json.dumps({"location": "Paris", "days": 2})},
}


def test_tool_call_exact():
    text = format_tool_calls([WEATHER])
    assert tool_call_score(text, [WEATHER]) == {"name_match": 1.0, "args_match": 1.0, "parsed": True}


def test_tool_call_json_string_reference_and_normalized_strings():
    text = '<|tool_call_start|>[get_weather(location="paris.", days=2.0)]<|tool_call_end|>'
    assert tool_call_score(text, [WEATHER_JSON]) == {"name_match": 1.0, "args_match": 1.0, "parsed": True}


def test_tool_call_right_name_wrong_argument():
    text = '<|tool_call_start|>[get_weather(location="London", days=2)]<|tool_call_end|>'
    assert tool_call_score(text, [WEATHER]) == {"name_match": 1.0, "args_match": 0.0, "parsed": True}
    text = '<|tool_call_start|>[get_weather(location="Paris", days="2")]<|tool_call_end|>'  # a string is not 2
    assert tool_call_score(text, [WEATHER])["args_match"] == 0.0
    text = '<|tool_call_start|>[get_weather(location="Paris")]<|tool_call_end|>'  # missing argument
    assert tool_call_score(text, [WEATHER])["args_match"] == 0.0


def test_tool_call_extra_arguments_allowed():
    text = '<|tool_call_start|>[get_weather(location="Paris", days=2, unit="celsius")]<|tool_call_end|>'
    assert tool_call_score(text, [WEATHER])["args_match"] == 1.0


def test_tool_call_wrong_name():
    text = '<|tool_call_start|>[get_time(location="Paris", days=2)]<|tool_call_end|>'
    assert tool_call_score(text, [WEATHER]) == {"name_match": 0.0, "args_match": 0.0, "parsed": True}


@pytest.mark.parametrize(
    "text",
    [
        "<|tool_call_start|>[get_weather(location=Paris)]<|tool_call_end|>",
        "<|tool_call_start|>[get_weather(location='Paris'",
        "[get_weather(location=Paris)]",  # tokens stripped by decoding, body broken
    ],
)
def test_tool_call_malformed(text):
    assert tool_call_score(text, [WEATHER]) == {"name_match": 0.0, "args_match": 0.0, "parsed": False}


def test_tool_call_without_special_tokens():
    """decode(skip_special_tokens=True) drops <|tool_call_start|>/<|tool_call_end|>; the bare list still scores."""
    assert tool_call_score('[get_weather(location="Paris", days=2)]', [WEATHER])["args_match"] == 1.0


def test_tool_call_plain_text_answer():
    assert tool_call_score("It is sunny in Paris.", [WEATHER]) == {
        "name_match": 0.0,
        "args_match": 0.0,
        "parsed": True,
    }
    assert tool_call_score("It is sunny in Paris.", []) == {"name_match": 1.0, "args_match": 1.0, "parsed": True}


def test_tool_call_parallel_calls_any_order():
    paris = {"name": "get_weather", "arguments": {"location": "Paris"}}
    rome = {"name": "get_weather", "arguments": {"location": "Rome"}}
    text = '<|tool_call_start|>[get_weather(location="Rome"), get_weather(location="Paris")]<|tool_call_end|>'
    assert tool_call_score(text, [paris, rome])["args_match"] == 1.0
    one = '<|tool_call_start|>[get_weather(location="Rome")]<|tool_call_end|>'
    assert tool_call_score(one, [paris, rome]) == {"name_match": 0.0, "args_match": 0.0, "parsed": True}


def test_tool_call_needs_a_perfect_pairing():
    """A prediction with extra arguments fits two references; the pairing must still give each its own call."""
    refs = [{"name": "f", "arguments": {"a": 1}}, {"name": "f", "arguments": {"a": 1, "b": 2}}]
    preds = [{"name": "f", "arguments": {"a": 1, "b": 2}}, {"name": "f", "arguments": {"a": 1}}]
    assert tool_call_score(preds, refs)["args_match"] == 1.0
    preds = [{"name": "f", "arguments": {"a": 1}}, {"name": "f", "arguments": {"a": 1}}]
    assert tool_call_score(preds, refs)["args_match"] == 0.0


def test_tool_call_prediction_as_calls():
    assert tool_call_score([WEATHER_JSON], [WEATHER])["args_match"] == 1.0
    assert tool_call_score(WEATHER_JSON, [WEATHER])["args_match"] == 1.0  # one call, not in a list
    bad = [{"type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]
    assert tool_call_score(bad, [WEATHER])["parsed"] is False


# --------------------------------------------------------------------------------------------------------------------
# Turns and aggregation
# --------------------------------------------------------------------------------------------------------------------


def test_score_turn_dispatch():
    assert score_turn("Red.", "red", "color") == {"score": 1.0, "qtype": "color"}
    grounding = score_turn(json.dumps([CIRCLE]), [CIRCLE, SQUARE], "grounding")
    assert grounding["qtype"] == "grounding"
    assert grounding["score"] == grounding["iou"] == pytest.approx(0.5)
    text = '<|tool_call_start|>[get_weather(location="London", days=2)]<|tool_call_end|>'
    call = score_turn(text, "", "tool_call", reference_tool_calls=[WEATHER])
    assert call == {"name_match": 1.0, "args_match": 0.0, "parsed": True, "score": 0.0, "qtype": "tool_call"}
    # Without reference_tool_calls the reference itself holds the calls (as calls or as rendered text).
    assert score_turn(format_tool_calls([WEATHER]), [WEATHER], "tool_call")["score"] == 1.0
    assert score_turn(format_tool_calls([WEATHER]), format_tool_calls([WEATHER]), "tool_call")["score"] == 1.0


ROME_CALL = '<|tool_call_start|>[get_weather(location="Rome", days=2)]<|tool_call_end|>'


def _records() -> list[dict]:
    records = [
        score_turn("red", "red", "color"),
        score_turn("blue", "red", "color"),
        score_turn("Three", "3", "count"),
        score_turn(json.dumps([CIRCLE]), [CIRCLE, SQUARE], "grounding"),  # iou 0.5
        score_turn("garbage", [CIRCLE], "grounding"),  # iou 0, unparsed
        score_turn(format_tool_calls([WEATHER]), None, "tool_call", [WEATHER]),  # 1, 1
        score_turn(ROME_CALL, None, "tool_call", [WEATHER]),  # 1, 0
        score_turn("<|tool_call_start|>[oops(", None, "tool_call", [WEATHER]),  # 0, 0
    ]
    records[0]["id"] = "extra keys are fine"
    return records


def test_aggregate_numbers():
    result = aggregate(_records())
    per_type = result["per_type"]
    assert list(per_type) == ["color", "count", "grounding", "tool_call"]
    assert per_type["color"] == {"n": 2, "mean_score": 0.5}
    assert per_type["count"] == {"n": 1, "mean_score": 1.0}
    assert per_type["grounding"] == {
        "n": 2, "mean_score": pytest.approx(0.25), "mean_iou": pytest.approx(0.25), "parse_rate": 0.5
    }
    assert per_type["tool_call"] == {
        "n": 3,
        "mean_score": pytest.approx(1 / 3),
        "name_acc": pytest.approx(2 / 3),
        "args_acc": pytest.approx(1 / 3),
        "parse_rate": pytest.approx(2 / 3),
    }
    assert result["n"] == 8
    assert result["overall"] == pytest.approx((1 + 0 + 1 + 0.5 + 0 + 1 + 0 + 0) / 8)
    assert result["macro"] == pytest.approx((0.5 + 1.0 + 0.25 + 1 / 3) / 4)


def test_aggregate_empty_and_bad_records():
    assert aggregate([]) == {"per_type": {}, "overall": None, "macro": None, "n": 0}
    with pytest.raises(ValueError, match="score_turn"):
        aggregate([{"qtype": "color"}])


def test_aggregate_is_json_serializable():
    json.dumps(aggregate(_records()))


# --------------------------------------------------------------------------------------------------------------------
# Report table
# --------------------------------------------------------------------------------------------------------------------


def test_format_table_rows_and_baselines():
    result = aggregate(_records())
    blanked = aggregate([score_turn("blue", "red", "color"), score_turn("3", "3", "count")])
    table = format_table(result["per_type"], chance={"color": 0.1, "count": 0.25}, blanked=blanked)
    lines = table.splitlines()
    assert "question type" in lines[0] and "chance" in lines[0] and "blanked" in lines[0]
    rows = {line.split()[0]: line.split()[1:] for line in lines[2:]}
    assert list(rows) == ["color", "count", "grounding", "tool_call"]  # sorted by name
    assert rows["color"] == ["2", "50.0", "10.0", "0.0"]
    assert rows["count"] == ["1", "100.0", "25.0", "100.0"]
    assert rows["grounding"] == ["2", "25.0", "-", "-"]
    assert rows["tool_call"] == ["3", "33.3", "-", "-"]
    assert len({len(line) for line in lines[:2]}) == 1  # header and rule line up


def test_format_table_accepts_whole_aggregate_and_missing_types():
    table = format_table(aggregate(_records()), blanked={"ocr": 0.2})
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines()[2:]}
    assert rows["ocr"] == ["-", "-", "-", "20.0"]
    assert rows["color"][-2:] == ["-", "-"]
