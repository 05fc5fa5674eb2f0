"""CRAG-MM multi-turn sessions (hub `crag-mm-2025/crag-mm-multi-turn-public`) as Conversations.

Schema (as published on the hub and read by the benchmark's own `utils/crag_batch_iterator.py`):
a row has `session_id`, `image` (embedded egocentric image, or None) and `image_url` (web image), `turns`
(`interaction_id`, `query`, `domain`, `query_category`, `dynamism`, and in v0.1.2 `image_quality`) and
`answers` (`interaction_id`, `ans_full`). v0.1.1 stores turns/answers as lists of dicts with
`image_quality` on the row; v0.1.2 as dicts of lists. The labels are integer `ClassLabel`s whose order
differs between releases, so they are decoded through the dataset's own features, never a fixed list.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from n2eye.images import ImageCache, resolve_image
from n2eye.data.report import (
    ANSWER_WITHOUT_TURN,
    EMPTY_TURNS,
    MALFORMED_ROW,
    TURN_WITHOUT_ANSWER,
    SkipRow,
)

CRAGMM_REQUIRED_COLUMNS = ("turns", "answers")
CRAGMM_DESCRIPTION = (
    "cragmm: columns session_id, turns, answers and image and/or image_url "
    "(CRAG-MM multi-turn, e.g. crag-mm-2025/crag-mm-multi-turn-public)"
)
LABEL_FIELDS = ("domain", "query_category", "dynamism", "image_quality")
EVAL_EGO_SIZE = (960, 1280)  # width x height, what the benchmark's evaluation resizes egocentric images to


def _unwrap(feature: Any) -> Any:
    """Strips List / LargeList / legacy Sequence wrappers down to the item feature."""
    from datasets import ClassLabel

    seen = 0
    while feature is not None and not isinstance(feature, (ClassLabel, dict)) and hasattr(feature, "feature") and seen < 8:
        feature = feature.feature
        seen += 1
    return feature


def find_class_label(features: Mapping[str, Any] | None, *path: str) -> Any:
    """The `ClassLabel` at `path` (e.g. "turns", "domain"), looking through list/sequence/struct nesting."""
    from datasets import ClassLabel

    node: Any = features
    for key in path:
        node = _unwrap(node)
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    node = _unwrap(node)
    return node if isinstance(node, ClassLabel) else None


@dataclass
class CragLabels:
    """Integer-label decoders read from a dataset's features (turn-level and row-level)."""

    turn: dict[str, Any] = field(default_factory=dict)
    row: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_features(cls, features: Mapping[str, Any] | None) -> CragLabels:
        labels = cls()
        if not features:
            return labels
        for name in LABEL_FIELDS:
            turn_label = find_class_label(features, "turns", name)
            if turn_label is not None:
                labels.turn[name] = turn_label
            row_label = find_class_label(features, name)
            if row_label is not None:
                labels.row[name] = row_label
        return labels

    @staticmethod
    def _decode(label: Any, value: Any) -> Any:
        if label is None or isinstance(value, str) or value is None or isinstance(value, bool):
            return value
        if isinstance(value, int) and 0 <= value < label.num_classes:
            return label.int2str(value)
        return value

    def decode_turn(self, name: str, value: Any) -> Any:
        return self._decode(self.turn.get(name), value)

    def decode_row(self, name: str, value: Any) -> Any:
        return self._decode(self.row.get(name), value)


def records(value: Any, what: str) -> list[dict[str, Any]]:
    """Lists of dicts (v0.1.1) and dicts of lists (v0.1.2) both as a list of dicts."""
    if value is None:
        return []
    if isinstance(value, Mapping):
        columns = {k: v for k, v in value.items()}
        if not columns:
            return []
        lengths = {len(v) if isinstance(v, (list, tuple)) else -1 for v in columns.values()}
        if -1 in lengths or len(lengths) != 1:
            raise SkipRow(MALFORMED_ROW, f"{what} is a dict whose values are not lists of one length")
        (length,) = lengths
        return [{k: v[i] for k, v in columns.items()} for i in range(length)]
    if isinstance(value, (list, tuple)):
        if not all(isinstance(item, Mapping) for item in value):
            raise SkipRow(MALFORMED_ROW, f"{what} holds items that are not dicts")
        return [dict(item) for item in value]
    raise SkipRow(MALFORMED_ROW, f"{what} is a {type(value).__name__}, expected a list of dicts or a dict of lists")


def _text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip():
        return value
    return None


def is_egocentric(row: Mapping[str, Any]) -> bool:
    """The benchmark's rule: egocentric when image_url is None or empty."""
    url = row.get("image_url")
    return url is None or len(url) == 0


def cragmm_to_conversation(
    row: Mapping[str, Any],
    *,
    labels: CragLabels | None = None,
    image_cache: ImageCache | None = None,
    base_dir: str | os.PathLike | None = None,
    eval_resize: bool = False,
) -> dict[str, Any]:
    """One CRAG-MM session -> one Conversation (image in the first user turn, then Q/A pairs in turn order).

    Raises `SkipRow` for rows that cannot be used. Per-turn labels, ids and the egocentric flag go to
    `conversation["metadata"]`, not into the messages.
    """
    labels = labels or CragLabels()
    session_id = row.get("session_id")
    turns = records(row.get("turns"), "turns")
    if not turns:
        raise SkipRow(EMPTY_TURNS, "the session has no turns")
    turn_ids: list[str] = []
    for index, turn in enumerate(turns):
        interaction_id = turn.get("interaction_id")
        if interaction_id is None or str(interaction_id) == "":
            raise SkipRow(MALFORMED_ROW, f"turn {index} has no interaction_id")
        if _text(turn.get("query")) is None:
            raise SkipRow(MALFORMED_ROW, f"turn {interaction_id} has an empty query")
        turn_ids.append(str(interaction_id))
    if len(set(turn_ids)) != len(turn_ids):
        raise SkipRow(MALFORMED_ROW, "two turns share an interaction_id")

    answers: dict[str, str] = {}
    for index, answer in enumerate(records(row.get("answers"), "answers")):
        interaction_id = answer.get("interaction_id")
        text = _text(answer.get("ans_full"))
        if interaction_id is None or str(interaction_id) == "" or text is None:
            raise SkipRow(MALFORMED_ROW, f"answer {index} lacks an interaction_id or ans_full")
        if str(interaction_id) in answers:
            raise SkipRow(MALFORMED_ROW, f"two answers for interaction_id {interaction_id}")
        answers[str(interaction_id)] = text
    orphans = [i for i in answers if i not in set(turn_ids)]
    if orphans:
        raise SkipRow(ANSWER_WITHOUT_TURN, f"answers for interaction_id(s) {', '.join(orphans)} match no turn")
    unanswered = [i for i in turn_ids if i not in answers]
    if unanswered:
        raise SkipRow(TURN_WITHOUT_ANSWER, f"turn(s) {', '.join(unanswered)} have no answer")

    egocentric = is_egocentric(row)
    image_value = row.get("image")
    empty_image = image_value is None or (isinstance(image_value, dict) and not image_value.get("bytes") and not image_value.get("path"))
    source = row.get("image_url") if empty_image and not egocentric else image_value
    image = resolve_image(source, image_cache or ImageCache(), base_dir)
    if eval_resize and egocentric:
        image = image.resize(EVAL_EGO_SIZE, Image.Resampling.BICUBIC)

    row_quality = labels.decode_row("image_quality", row.get("image_quality"))
    messages: list[dict[str, Any]] = []
    turn_meta: list[dict[str, Any]] = []
    for index, (turn, interaction_id) in enumerate(zip(turns, turn_ids)):
        content: list[dict[str, Any]] = [{"type": "image"}] if index == 0 else []
        content.append({"type": "text", "text": turn["query"]})
        messages.append({"role": "user", "content": content})
        messages.append({"role": "assistant", "content": answers[interaction_id]})
        meta = {"interaction_id": interaction_id}
        for name in ("domain", "query_category", "dynamism"):
            meta[name] = labels.decode_turn(name, turn.get(name))
        quality = turn.get("image_quality")
        meta["image_quality"] = labels.decode_turn("image_quality", quality) if quality is not None else row_quality
        turn_meta.append(meta)

    return {
        "messages": messages,
        "images": [image],
        "metadata": {
            "format": "cragmm",
            "session_id": session_id,
            "egocentric": egocentric,
            "image_url": None if egocentric else row.get("image_url"),
            "turns": turn_meta,
        },
    }
