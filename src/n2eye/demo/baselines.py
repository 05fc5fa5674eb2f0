"""What a model blind to the image can score on the shapes world, per question type: the reference that shows
the demo's model learned from the images.

`chance_levels` gives the reference per qtype (fixed by construction where answers are balanced, measured for
count and grounding); `blind_baseline` measures the best text-only guess on held-out sessions. Grounding is
scored with the same functions as `n2eye eval`, so chance levels and results compare.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from functools import lru_cache

from ..eval import scoring
from .questions import Session, Turn, make_sessions
from .world import COLOURS, SHAPES

def _boxes(answer: str) -> list[list[float]]:
    return [box["bbox"] for box in scoring.parse_boxes(answer) or []]


def _fixed_box_score(box: Sequence[float], target: str) -> float:
    """Grounding score of always answering one fixed box."""
    return scoring.grounding_score([{"label": "", "bbox": list(box)}], target)["iou"]


def _all_turns(sessions: Iterable[Session]) -> Iterable[Turn]:
    for session in sessions:
        yield from session.turns


def turn_label(turn: Turn) -> str:
    """What is scored for a turn: the answer, or for tool turns "name(item)" of the expected call."""
    if turn.tool_call is not None:
        return f"{turn.tool_call['name']}({turn.tool_call['arguments']['item']})"
    return turn.answer


def _best_fixed_box_score(targets: list[str]) -> float:
    """Expected grounding score of the best single fixed box (the mean box, or a centred square)."""
    boxes = [box for t in targets for box in _boxes(t)]
    if not boxes:
        return 0.0
    mean = [sum(b[i] for b in boxes) / len(boxes) for i in range(4)]
    guesses = [mean] + [[0.5 - h, 0.5 - h, 0.5 + h, 0.5 + h] for h in (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)]
    return max(sum(_fixed_box_score(g, t) for t in targets) / len(targets) for g in guesses)


def chance_levels(sessions: Sequence[Session] | None = None) -> dict[str, float]:
    """Accuracy (IoU for grounding) a model that ignores the image can expect, per qtype.

    Fixed by construction where answers are balanced (colour 1/4, shape 1/3, binary 1/2, tool 1/4);
    measured on `sessions` (default: a fixed reference sample) for count (largest answer share) and
    grounding (best fixed box).
    """
    if sessions is None:
        return dict(_reference_chance())
    counts = Counter(t.answer for t in _all_turns(sessions) if t.qtype == "count")
    grounding = [t.answer for t in _all_turns(sessions) if t.qtype == "grounding"]
    return {
        "colour": 1 / len(COLOURS),
        "shape": 1 / len(SHAPES),
        "count": max(counts.values()) / sum(counts.values()) if counts else 0.0,
        "position": 0.5,
        "yes_no": 0.5,
        "comparison": 0.5,
        "grounding": _best_fixed_box_score(grounding),
        "two_image": 0.5,
        "tool_call": 1 / len(COLOURS),
    }


@lru_cache(maxsize=1)
def _reference_chance() -> tuple[tuple[str, float], ...]:
    return tuple(chance_levels(make_sessions(1500, seed=20240601)).items())


def blind_baseline(train: Sequence[Session], evaluate: Sequence[Session]) -> dict[str, float]:
    """The best text-only model, measured: the majority answer per question text on `train`, scored on
    `evaluate` (grounding: the train mean box). Near `chance_levels` means the questions need the image."""
    by_text: dict[str, Counter[str]] = defaultdict(Counter)
    by_type: dict[str, Counter[str]] = defaultdict(Counter)
    train_boxes: dict[str, list[list[float]]] = defaultdict(list)
    for turn in _all_turns(train):
        if turn.qtype == "grounding":
            train_boxes[turn.question] += _boxes(turn.answer)
            continue
        by_text[turn.question][turn_label(turn)] += 1
        by_type[turn.qtype][turn_label(turn)] += 1
    scores: dict[str, list[float]] = defaultdict(list)
    all_boxes = [b for boxes in train_boxes.values() for b in boxes]
    for turn in _all_turns(evaluate):
        if turn.qtype == "grounding":
            boxes = train_boxes.get(turn.question) or all_boxes
            guess = [sum(b[i] for b in boxes) / len(boxes) for i in range(4)] if boxes else [0.25, 0.25, 0.75, 0.75]
            scores["grounding"].append(_fixed_box_score(guess, turn.answer))
            continue
        counter = by_text.get(turn.question) or by_type.get(turn.qtype) or Counter()
        guess = counter.most_common(1)[0][0] if counter else ""
        scores[turn.qtype].append(float(guess == turn_label(turn)))
    return {q: sum(v) / len(v) for q, v in scores.items()}


def qtype_counts(sessions: Iterable[Session]) -> dict[str, int]:
    return dict(Counter(t.qtype for t in _all_turns(sessions)))
