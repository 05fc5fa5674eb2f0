"""Counting the rows a data adapter had to skip, so a bad row costs one example and not the run.

Reasons are short stable slugs (`image_missing`, `turn_without_answer`, ...) that tests, logs and the
training result JSON can rely on; examples keep a few row ids per reason so users can find the rows.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

# The slugs adapters use; others are allowed, these are the documented ones.
IMAGE_MISSING = "image_missing"
IMAGE_CORRUPT = "image_corrupt"
IMAGE_FETCH_FAILED = "image_fetch_failed"
IMAGE_COUNT_MISMATCH = "image_count_mismatch"
EMPTY_TURNS = "empty_turns"
UNKNOWN_ROLE = "unknown_role"
ANSWER_WITHOUT_TURN = "answer_without_turn"
TURN_WITHOUT_ANSWER = "turn_without_answer"
NO_ASSISTANT_TURN = "no_assistant_turn"
MALFORMED_ROW = "malformed_row"
# A line of a JSON Lines file that is not one JSON object; its example's row is `FILE:LINE`.
MALFORMED_JSON_LINE = "malformed_json_line"
# Message text carrying a chat-format control token (`<|im_start|>`, `<image>` where the format has no image
# placeholder, ...); the detail names the token and where it is (the processor's `ControlTokenError` message).
CONTROL_TOKEN = "control_token"


class SkipRow(ValueError):
    """Raised by an adapter for a row it cannot use; `iter_conversations` records it and goes on."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class NoUsableRowsError(ValueError):
    """Every row of a dataset was skipped: almost always the wrong format, image folder or split."""


MAX_DETAIL = 500  # characters of an example's detail kept (a ControlTokenError message is ~300)


class SkipReport:
    """Per-reason counts of skipped rows plus a few example row ids (and what was wrong with them)."""

    def __init__(self, max_examples: int = 3) -> None:
        self.max_examples = max_examples
        self.counts: Counter[str] = Counter()
        self.examples: dict[str, list[dict[str, str]]] = {}
        self.kept = 0
        self.truncated = 0  # kept, but cut at --max-length: the cut-off turns are not trained on
        self.truncated_examples: list[dict[str, str]] = []
        self.format_description: str | None = None
        self.columns: list[str] | None = None

    def add(self, reason: str, row_id: Any = None, detail: str = "") -> None:
        """Count one skipped row under `reason`; keep its id and detail if this reason has few examples yet."""
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < self.max_examples:
            examples.append({"row": str(row_id), "detail": detail[:MAX_DETAIL]})

    def add_kept(self, n: int = 1) -> None:
        self.kept += n

    def add_truncated(self, row_id: Any = None, detail: str = "") -> None:
        """Count one kept row that was cut at the length limit (its later tokens are lost to training)."""
        self.truncated += 1
        if len(self.truncated_examples) < self.max_examples:
            self.truncated_examples.append({"row": str(row_id), "detail": detail[:MAX_DETAIL]})

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def __bool__(self) -> bool:  # a report is "truthy" only when something was skipped
        return self.skipped > 0

    def merge(self, other: SkipReport) -> None:
        """Adds another report's counts (e.g. from a data-loader worker)."""
        for reason, count in other.counts.items():
            self.counts[reason] += count
            examples = self.examples.setdefault(reason, [])
            for example in other.examples.get(reason, []):
                if len(examples) < self.max_examples:
                    examples.append(example)
        self.kept += other.kept
        self.truncated += other.truncated
        room = self.max_examples - len(self.truncated_examples)
        self.truncated_examples.extend(other.truncated_examples[: max(0, room)])

    def _reasons_text(self) -> str:
        parts = []
        for reason, count in self.counts.most_common():
            rows = ", ".join(e["row"] for e in self.examples.get(reason, []))
            first = next((e["detail"] for e in self.examples.get(reason, []) if e["detail"]), "")
            text = f"{reason} x{count}"
            if rows:
                text += f" (rows {rows})"
            if first:
                text += f" [{first}]"
            parts.append(text)
        return "; ".join(parts) if parts else "none"

    def summary(self) -> str:
        """One line for logs: how many rows were kept (and cut at the length limit) and skipped, and why."""
        kept = f"kept {self.kept} rows"
        if self.truncated:
            rows = ", ".join(e["row"] for e in self.truncated_examples)
            first = next((e["detail"] for e in self.truncated_examples if e["detail"]), "")
            kept += (f" ({self.truncated} cut at the length limit, their later turns not trained on: rows {rows}"
                     f"{' [' + first + ']' if first else ''}; raise --max-length to keep them whole)")  # fmt: skip
        if not self.counts:
            return f"{kept}, skipped none"
        return f"{kept}, skipped {self.skipped}: {self._reasons_text()}"

    def to_dict(self) -> dict[str, Any]:
        """Machine-readable form for result JSON files."""
        return {
            "kept": self.kept,
            "truncated": self.truncated,
            "truncated_examples": list(self.truncated_examples),
            "skipped": self.skipped,
            "reasons": dict(self.counts.most_common()),
            "examples": {reason: list(examples) for reason, examples in self.examples.items()},
        }

    def raise_if_all_bad(self, total: int, skipped: int | None = None) -> None:
        """Raises `NoUsableRowsError` when `total` rows were seen and every one was skipped. `skipped`: how many of
        those `total` were skipped (default: all this report counts; pass it when the report also holds skips from
        elsewhere, e.g. malformed lines counted before the rows were read)."""
        skipped = self.skipped if skipped is None else skipped
        if total <= 0 or skipped < total:
            return
        expected = self.format_description or "a supported format"
        columns = ", ".join(self.columns) if self.columns else "(unknown)"
        raise NoUsableRowsError(
            f"every row was skipped: {self._reasons_text()}; expected {expected}, found columns {columns}. "
            "Check --format, the image folder (--image-root) and the split."
        )

    def __repr__(self) -> str:
        return f"SkipReport({self.summary()})"
