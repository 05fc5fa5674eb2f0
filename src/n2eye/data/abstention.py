"""`n2eye train --abstain-fraction F`: teach the model to say "I don't know" where it cannot know.

Why: CRAG-MM's truthfulness scores a wrong answer -1 and "I don't know" 0, so a model that guesses when it can't
see loses to one that abstains. For a fraction F of the training conversations that have images, every image is
withheld (replaced by uniform grey of the same size, what `n2eye eval --blank-images` shows) and every plain
assistant answer becomes the abstention phrase; tool calls stay as they are. The choice is a hash of the seed and
the conversation's position in the data, so a run (and its resume, and every process of a distributed run)
picks the same conversations.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from PIL import Image

DEFAULT_ABSTAIN_ANSWER = "I don't know."
"""An answer the CRAG-MM kit counts as missing ("i dont know" once punctuation is removed)."""
WITHHELD_GREY = (128, 128, 128)


def chosen(seed: int, index: int, fraction: float) -> bool:
    """True for about `fraction` of indices, the same ones for the same seed on every machine."""
    value = int.from_bytes(hashlib.sha256(f"abstain:{seed}:{index}".encode()).digest()[:8], "big")
    return value / 2**64 < fraction


def withhold(conversation: dict[str, Any], answer: str) -> dict[str, Any]:
    """The conversation with its images greyed out and its plain answers replaced by `answer`."""
    out = dict(conversation)
    out["images"] = [Image.new("RGB", image.size, WITHHELD_GREY) for image in conversation.get("images") or []]
    messages = copy.deepcopy(conversation["messages"])
    for message in messages:
        if message["role"] == "assistant" and not message.get("tool_calls"):
            message["content"] = answer
        if isinstance(message.get("content"), list):  # inline image items (a `messages` row's own images)
            for item in message["content"]:
                if item.get("type") == "image" and isinstance(item.get("image"), Image.Image):
                    item["image"] = Image.new("RGB", item["image"].size, WITHHELD_GREY)
    out["messages"] = messages
    out["metadata"] = {**(conversation.get("metadata") or {}), "abstention": True}
    return out


def has_images(conversation: dict[str, Any]) -> bool:
    if conversation.get("images"):
        return True
    return any(
        isinstance(m.get("content"), list) and any(i.get("type") == "image" for i in m["content"])
        for m in conversation["messages"]
    )


@dataclass
class Abstention:
    """The option's settings and how many conversations it changed (for train_result.json)."""

    fraction: float
    answer: str = DEFAULT_ABSTAIN_ANSWER
    seed: int = 42
    count: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"--abstain-fraction must be in [0, 1), got {self.fraction}.")
        if not self.answer.strip():
            raise ValueError("--abstain-answer must not be empty.")

    def apply(self, conversations: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """The conversations, the chosen ones with images withheld and answers replaced."""
        for index, conversation in enumerate(conversations):
            if self.fraction and has_images(conversation) and chosen(self.seed, index, self.fraction):
                self.count += 1
                yield withhold(conversation, self.answer)
            else:
                yield conversation
