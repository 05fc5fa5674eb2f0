"""Scoring for ``n2eye eval``: (prediction, reference, question type) -> scores, and their aggregation.

Pure Python (stdlib + our tool-call parser), so scores can be recomputed from saved predictions without a model or a
GPU. Question types:

* ``"grounding"``: answers are JSON boxes ``[{"label": str, "bbox": [x1, y1, x2, y2]}, ...]`` normalized to 0..1;
  scored by IoU after matching predicted to reference boxes.
* ``"tool_call"``: answers are ``<|tool_call_start|>[name(key=value)]<|tool_call_end|>``; scored by tool name and
  arguments against OpenAI-style reference calls.
* anything else: exact match after conservative VQA-style normalization.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from n2eye.modeling.tool_calls import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    ToolCallParseError,
    call_name_and_arguments,
    parse_tool_calls,
)

__all__ = [
    "normalize_answer",
    "exact_match",
    "parse_boxes",
    "box_iou",
    "grounding_score",
    "tool_call_score",
    "score_turn",
    "aggregate",
    "format_table",
]

# --------------------------------------------------------------------------------------------------------------------
# Exact match
# --------------------------------------------------------------------------------------------------------------------

_ARTICLES = frozenset({"a", "an", "the"})
_NUMBER_WORDS = {
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_TRAILING_PUNCT = ".,!?;:。，！？；："
_QUOTES = "\"'`“”‘’«»"


def normalize_answer(text: Any) -> str:
    """Normalize a short answer the way VQA exact match does, so "The circle." and "circle" compare equal.

    Lowercases, strips surrounding quotes and trailing punctuation, drops the articles a/an/the (unless the answer is
    nothing but articles, e.g. option "a"), maps the number words zero..ten to digits and collapses whitespace.
    Deliberately conservative: inner punctuation, plurals and synonyms are left alone.
    """
    text = "" if text is None else str(text)
    text = text.lower().strip()
    previous = None
    while text != previous:  # '"Red."' and 'red".' both peel down to 'red'
        previous = text
        text = text.rstrip(_TRAILING_PUNCT).strip()
        if len(text) >= 2 and text[0] in _QUOTES and text[-1] in _QUOTES:
            text = text[1:-1].strip()
    tokens = text.split()
    kept = [token for token in tokens if token not in _ARTICLES]
    if kept:
        tokens = kept
    return " ".join(_NUMBER_WORDS.get(token, token) for token in tokens)


def exact_match(prediction: Any, reference: Any) -> float:
    """1.0 if the normalized prediction equals the normalized reference (or any of a list of references), else 0.0."""
    references = reference if isinstance(reference, (list, tuple)) else [reference]
    predicted = normalize_answer(prediction)
    return 1.0 if any(predicted == normalize_answer(ref) for ref in references) else 0.0


# --------------------------------------------------------------------------------------------------------------------
# Grounding
# --------------------------------------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[A-Za-z0-9_+-]*\s*\n?(.*?)```", re.DOTALL)
_MAX_JSON_STARTS = 256  # bounds the work on long garbage generations full of brackets
_BOX_KEYS = ("bbox", "box", "bbox_2d")


def _number(value: Any) -> float | None:
    """A finite float from a number or a numeric string ("0.5"); None otherwise (bools are not numbers)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _clean_bbox(raw: Any) -> list[float] | None:
    """Four coordinates clamped to [0, 1] and ordered (x1 <= x2, y1 <= y2); None if not four numbers."""
    if isinstance(raw, str):  # "bbox": "[0.1, 0.2, 0.3, 0.4]"
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            return None
    if not isinstance(raw, (list, tuple)) or len(raw) != 4:
        return None
    coords = [_number(v) for v in raw]
    if any(c is None for c in coords):
        return None
    x1, y1, x2, y2 = (min(1.0, max(0.0, c)) for c in coords)  # type: ignore[type-var]
    return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


def _clean_boxes(data: Any) -> list[dict[str, Any]] | None:
    """Validate decoded JSON as boxes; any malformed item makes the whole answer unparseable (a format error)."""
    if isinstance(data, Mapping):
        data = [data]
    if not isinstance(data, list):
        return None
    if len(data) == 4 and all(_number(v) is not None for v in data):  # a bare [x1, y1, x2, y2]
        data = [data]
    boxes = []
    for item in data:
        if isinstance(item, Mapping):
            raw = next((item[key] for key in _BOX_KEYS if key in item), None)
            label = item.get("label", "")
            if not isinstance(label, (str, int, float)) or isinstance(label, bool):
                return None
            label = str(label)
        else:  # a bare [x1, y1, x2, y2] in a list
            raw, label = item, ""
        bbox = _clean_bbox(raw)
        if bbox is None:
            return None
        boxes.append({"label": label, "bbox": bbox})
    return boxes


def parse_boxes(text: Any) -> list[dict[str, Any]] | None:
    """Parse a grounding answer into ``[{"label": str, "bbox": [x1, y1, x2, y2]}, ...]``, or None if unparseable.

    Generations wrap JSON in prose and code fences, emit one object instead of a list, or quote numbers; all of that
    is tolerated so the score measures localisation rather than formatting. Coordinates are clamped to [0, 1] and
    swapped corners are reordered. Already-decoded lists/dicts are accepted too (references are often stored so).
    ``[]`` is a valid answer ("nothing to find").
    """
    if not isinstance(text, str):
        return _clean_boxes(text)
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    decoder = json.JSONDecoder()
    for candidate in candidates:
        candidate = candidate.strip()
        try:
            boxes = _clean_boxes(json.loads(candidate))
        except json.JSONDecodeError:
            boxes = None
        if boxes is not None:
            return boxes
        # JSON embedded in prose: try each '[' / '{' in order, first one that decodes to boxes wins. Starts inside
        # JSON that decoded but isn't boxes are skipped, so one bad box can't let a subset of the list through.
        starts = [i for i, ch in enumerate(candidate) if ch in "[{"][:_MAX_JSON_STARTS]
        decoded_until = 0
        for start in starts:
            if start < decoded_until:
                continue
            try:
                data, decoded_until = decoder.raw_decode(candidate, start)
            except json.JSONDecodeError:
                continue
            boxes = _clean_boxes(data)
            if boxes is not None:
                return boxes
    return None


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two ``[x1, y1, x2, y2]`` boxes; 0.0 when the union is empty."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    inter_w = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    inter_h = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = inter_w * inter_h
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def _max_weight_assignment(weights: list[list[float]]) -> list[tuple[int, int]]:
    """Optimal one-to-one (row, column) pairs maximizing the total weight (Hungarian algorithm, O(n^2 m)).

    Written here because scipy is not a dependency; box counts are small, but a degenerate generation can list
    hundreds of boxes, where trying permutations would never finish.
    """
    if not weights or not weights[0]:
        return []
    transpose = len(weights) > len(weights[0])
    if transpose:
        weights = [list(col) for col in zip(*weights)]
    n, m = len(weights), len(weights[0])
    cost = [[0.0] * (m + 1)] + [[0.0] + [-w for w in row] for row in weights]  # 1-indexed, minimized
    inf = math.inf
    u, v = [0.0] * (n + 1), [0.0] * (m + 1)
    owner, way = [0] * (m + 1), [0] * (m + 1)  # owner[j]: row assigned to column j
    for i in range(1, n + 1):
        owner[0], j0 = i, 0
        min_v, used = [inf] * (m + 1), [False] * (m + 1)
        while True:
            used[j0] = True
            i0, delta, j1 = owner[j0], inf, 0
            for j in range(1, m + 1):
                if not used[j]:
                    reduced = cost[i0][j] - u[i0] - v[j]
                    if reduced < min_v[j]:
                        min_v[j], way[j] = reduced, j0
                    if min_v[j] < delta:
                        delta, j1 = min_v[j], j
            for j in range(m + 1):
                if used[j]:
                    u[owner[j]] += delta
                    v[j] -= delta
                else:
                    min_v[j] -= delta
            j0 = j1
            if owner[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            owner[j0] = owner[j1]
            j0 = j1
    pairs = [(owner[j] - 1, j - 1) for j in range(1, m + 1) if owner[j]]
    return sorted((c, r) for r, c in pairs) if transpose else sorted(pairs)


def grounding_score(prediction: Any, reference: Any) -> dict[str, Any]:
    """Match predicted to reference boxes and score localisation and labels.

    Matching maximizes the number of same-label pairs first, then total IoU (optimal, not greedy), so box order never
    matters. Both scores divide by ``max(len(pred), len(ref))``: missing and extra boxes count as 0, so listing many
    boxes can't game the score. No boxes predicted for no boxes expected scores 1.0. An unparseable prediction scores
    0 with ``parsed`` False; an unparseable reference raises ValueError (bad eval data should not score silently).
    """
    ref_boxes = parse_boxes(reference)
    if ref_boxes is None:
        raise ValueError(f"Grounding reference is not a list of boxes: {reference!r:.200}")
    pred_boxes = parse_boxes(prediction)
    if pred_boxes is None:
        return {"iou": 0.0, "label_match": 0.0, "parsed": False}
    total = max(len(pred_boxes), len(ref_boxes))
    if total == 0:
        return {"iou": 1.0, "label_match": 1.0, "parsed": True}
    pred_labels = [normalize_answer(box["label"]) for box in pred_boxes]
    ref_labels = [normalize_answer(box["label"]) for box in ref_boxes]
    ious = [[box_iou(p["bbox"], r["bbox"]) for r in ref_boxes] for p in pred_boxes]
    bonus = min(len(pred_boxes), len(ref_boxes)) + 1.0  # > any IoU sum: label agreement wins lexicographically
    weights = [
        [ious[i][j] + (bonus if pred_labels[i] == ref_labels[j] else 0.0) for j in range(len(ref_boxes))]
        for i in range(len(pred_boxes))
    ]
    pairs = _max_weight_assignment(weights)
    iou_sum = sum(ious[i][j] for i, j in pairs)
    label_hits = sum(1 for i, j in pairs if pred_labels[i] == ref_labels[j])
    return {"iou": iou_sum / total, "label_match": label_hits / total, "parsed": True}


# --------------------------------------------------------------------------------------------------------------------
# Tool calls
# --------------------------------------------------------------------------------------------------------------------

# A tool-call list whose special tokens were dropped by decode(skip_special_tokens=True): "[get_weather(city=...)]".
_BARE_CALL_LIST = re.compile(r"^\[\s*[A-Za-z_][\w.]*\s*\(.*\)\s*\]$", re.DOTALL)


def _predicted_calls(prediction: Any) -> list[tuple[str, dict[str, Any]]] | None:
    """Calls in a generation (text or already-parsed calls); None when they are malformed."""
    if not isinstance(prediction, str):
        if isinstance(prediction, Mapping):  # a single call
            prediction = [prediction]
        try:
            return [call_name_and_arguments(call) for call in prediction or []]
        except (ValueError, TypeError):
            return None
    try:
        _, calls = parse_tool_calls(prediction)
        stripped = prediction.strip()
        if not calls and TOOL_CALL_START not in prediction and _BARE_CALL_LIST.match(stripped):
            _, calls = parse_tool_calls(f"{TOOL_CALL_START}{stripped}{TOOL_CALL_END}")
    except ToolCallParseError:
        return None
    return [call_name_and_arguments(call) for call in calls]


def _values_match(predicted: Any, reference: Any) -> bool:
    """Argument equality: strings after normalize_answer, numbers numerically, containers element by element."""
    if isinstance(reference, bool) or isinstance(predicted, bool):
        return isinstance(reference, bool) and isinstance(predicted, bool) and predicted == reference
    if isinstance(reference, (int, float)):
        return isinstance(predicted, (int, float)) and math.isclose(predicted, reference, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(reference, str):
        return isinstance(predicted, str) and normalize_answer(predicted) == normalize_answer(reference)
    if isinstance(reference, Mapping):
        return (
            isinstance(predicted, Mapping)
            and set(predicted) == set(reference)
            and all(_values_match(predicted[k], reference[k]) for k in reference)
        )
    if isinstance(reference, (list, tuple)):
        return (
            isinstance(predicted, (list, tuple))
            and len(predicted) == len(reference)
            and all(_values_match(p, r) for p, r in zip(predicted, reference))
        )
    return predicted == reference


def _arguments_match(predicted: dict[str, Any], reference: dict[str, Any]) -> bool:
    """Every reference argument present and equal; extra predicted arguments (e.g. optional defaults) are allowed."""
    return all(key in predicted and _values_match(predicted[key], value) for key, value in reference.items())


def _perfect_matching(compatible: list[list[bool]]) -> bool:
    """Whether every reference (column) can be paired with its own compatible prediction (row): Kuhn's algorithm."""
    n_rows = len(compatible)
    n_cols = len(compatible[0]) if compatible else 0
    row_of: list[int | None] = [None] * n_cols
    col_of: list[int | None] = [None] * n_rows

    def augment(col: int, seen: set[int]) -> bool:
        for row in range(n_rows):
            if compatible[row][col] and row not in seen:
                seen.add(row)
                if col_of[row] is None or augment(col_of[row], seen):  # type: ignore[arg-type]
                    col_of[row], row_of[col] = col, row
                    return True
        return False

    return all(augment(col, set()) for col in range(n_cols))


def tool_call_score(prediction: Any, reference_calls: Any) -> dict[str, Any]:
    """Score predicted tool calls against reference OpenAI-style calls (arguments as dicts or JSON strings).

    ``prediction`` is generated text (parsed with ``parse_tool_calls``; a ``[f(x=1)]`` list whose special tokens were
    stripped by decoding is accepted too) or already-parsed call(s). Parallel calls are compared order-free.
    ``name_match``: the predicted tool names equal the reference's. ``args_match``: names match and each reference
    call pairs with its own predicted call carrying all its arguments. Malformed calls score 0 with ``parsed`` False.
    An empty reference means "answer without a tool": predicting no call scores 1.
    """
    if isinstance(reference_calls, str):
        _, reference_calls = parse_tool_calls(reference_calls)
    references = [call_name_and_arguments(call) for call in reference_calls or []]
    predicted = _predicted_calls(prediction)
    if predicted is None:
        return {"name_match": 0.0, "args_match": 0.0, "parsed": False}
    names_ok = sorted(name for name, _ in predicted) == sorted(name for name, _ in references)
    args_ok = names_ok and _perfect_matching(
        [[p_name == r_name and _arguments_match(p_args, r_args) for r_name, r_args in references]
         for p_name, p_args in predicted]
    )
    return {"name_match": float(names_ok), "args_match": float(args_ok), "parsed": True}


# --------------------------------------------------------------------------------------------------------------------
# Turns, aggregation and reporting
# --------------------------------------------------------------------------------------------------------------------


def score_turn(prediction: Any, reference: Any, qtype: str, reference_tool_calls: Any = None) -> dict[str, Any]:
    """Score one answer by its question type; ``"score"`` (0..1) is the headline number every type has.

    ``grounding``: grounding_score keys, score = iou. ``tool_call``: tool_call_score keys, score = name_match *
    args_match; the reference calls come from ``reference_tool_calls``, else from ``reference`` (calls or text).
    Anything else: exact match.
    """
    if qtype == "grounding":
        result: dict[str, Any] = grounding_score(prediction, reference)
        result["score"] = result["iou"]
    elif qtype == "tool_call":
        result = tool_call_score(prediction, reference if reference_tool_calls is None else reference_tool_calls)
        result["score"] = result["name_match"] * result["args_match"]
    else:
        result = {"score": exact_match(prediction, reference)}
    result["qtype"] = qtype
    return result


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def aggregate(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Summarize scored turns (score_turn outputs, possibly with extra keys) per question type and overall.

    Returns ``{"per_type": {qtype: {"n", "mean_score", ...}}, "overall": float, "macro": float, "n": int}``:
    grounding adds ``mean_iou``, tool_call adds ``name_acc`` and ``args_acc``, and both add ``parse_rate``.
    ``overall`` weights every turn equally; ``macro`` every type equally, so a large easy type can't hide a weak
    small one. Both are None for no records.
    """
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for index, record in enumerate(records):
        if "score" not in record or "qtype" not in record:
            raise ValueError(f"Record {index} needs 'score' and 'qtype' (use score_turn): {dict(record)!r:.200}")
        groups.setdefault(str(record["qtype"]), []).append(record)
    per_type: dict[str, dict[str, Any]] = {}
    for qtype in sorted(groups):
        group = groups[qtype]
        stats: dict[str, Any] = {"n": len(group), "mean_score": _mean([float(r["score"]) for r in group])}
        if qtype == "grounding":
            stats["mean_iou"] = _mean([float(r.get("iou", r["score"])) for r in group])
        elif qtype == "tool_call":
            stats["name_acc"] = _mean([float(r.get("name_match", 0.0)) for r in group])
            stats["args_acc"] = _mean([float(r.get("args_match", 0.0)) for r in group])
        if qtype in ("grounding", "tool_call"):
            stats["parse_rate"] = _mean([float(bool(r.get("parsed", True))) for r in group])
        per_type[qtype] = stats
    all_scores = [float(r["score"]) for r in records]
    return {
        "per_type": per_type,
        "overall": _mean(all_scores) if all_scores else None,
        "macro": _mean([s["mean_score"] for s in per_type.values()]) if per_type else None,
        "n": len(all_scores),
    }


def _per_type(table: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """Accept aggregate()'s whole output or its ``per_type`` part."""
    if table is None:
        return {}
    per_type = table.get("per_type")
    return per_type if isinstance(per_type, Mapping) else table


def _fraction(value: Any) -> float | None:
    """A 0..1 score from a number or an aggregate() per-type dict; None if missing."""
    if isinstance(value, Mapping):
        value = value.get("mean_score")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _percent(value: Any) -> str:
    fraction = _fraction(value)
    return "-" if fraction is None else f"{100.0 * fraction:.1f}"


def format_table(
    per_type: Mapping[str, Any],
    chance: Mapping[str, Any] | None = None,
    blanked: Mapping[str, Any] | None = None,
) -> str:
    """Fixed-width table of per-type results next to the chance and blanked-image baselines, for the eval report.

    ``per_type`` is aggregate()'s output (or its ``per_type``); ``chance`` and ``blanked`` map question types to a
    0..1 score or to per-type dicts (e.g. the aggregate of a blanked-image run). Scores are shown as percentages
    (IoU for grounding); anything missing is "-". Rows are the union of types, sorted by name.
    """
    results, chance_map, blanked_map = _per_type(per_type), _per_type(chance), _per_type(blanked)
    header = ["question type", "n", "acc/IoU %", "chance %", "blanked %"]
    rows = []
    for qtype in sorted(set(results) | set(chance_map) | set(blanked_map)):
        stats = results.get(qtype)
        n = stats.get("n") if isinstance(stats, Mapping) else None
        rows.append(
            [
                str(qtype),
                "-" if n is None else str(n),
                _percent(stats),
                _percent(chance_map.get(qtype)),
                _percent(blanked_map.get(qtype)),
            ]
        )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (cell.rjust(width) for cell, width in zip(cells[1:], widths[1:]))
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])
