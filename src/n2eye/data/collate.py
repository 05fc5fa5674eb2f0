"""Conversation -> training Example (input_ids, labels and the image crops), and batching.

Labels come from the chat template's `{% generation %}` blocks (assistant answers and their `<|im_end|>`),
so they can't drift from the rendered text. Truncation counts image tokens and never cuts inside an image
block; a sample with no supervised token left is skipped (`too_long`), never trained on with zero loss. Message
text carrying a chat control token (`<|im_start|>`, `<image>`, ...), which the processor refuses with a
`ControlTokenError`, is skipped as `control_token`, its detail naming the token and where it is.

Images travel as crops under transformers' keys (`vision_inputs.VisionInputs`): one per image for fixed-resolution
encoders (5 with Idefics2-style splitting: quadrants + the whole image); tiles + thumbnail per image, each with its
`spatial_shapes` row and `pixel_attention_mask`, for NaFlex.
"""

from __future__ import annotations

from typing import Any

import torch

from ..images import image_item_source, is_image_item
from ..vision_inputs import VisionInputs
from .report import CONTROL_TOKEN, IMAGE_COUNT_MISMATCH, SkipRow

TOO_LONG = "too_long"
IGNORE_INDEX = -100


def fill_images(messages: list[dict], images: list) -> list[dict]:
    """Puts the i-th image into the i-th `{"type": "image"}` placeholder so the processor can load it."""
    filled, index = [], 0
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            items = []
            for item in content:
                if is_image_item(item) and image_item_source(item) is None:
                    if index >= len(images):
                        raise SkipRow(IMAGE_COUNT_MISMATCH, f"more image items than the {len(images)} images")
                    item = {"type": "image", "image": images[index]}
                    index += 1
                items.append(item)
            message = {**message, "content": items}
        filled.append(message)
    if index != len(images):
        raise SkipRow(IMAGE_COUNT_MISMATCH, f"{index} image items for {len(images)} images")
    return filled


def _is_control_token_error(err: BaseException) -> bool:
    """The processor's `ControlTokenError`, also from a checkpoint's own copy of the processor module (loaded
    with trust_remote_code, so a different class object than n2eye's)."""
    return any(cls.__name__ == "ControlTokenError" for cls in type(err).__mro__)


def _keep_last_span(mask: list[int]) -> list[int]:
    """Only the final contiguous run of assistant tokens stays supervised (last-turn-only training)."""
    out = [0] * len(mask)
    end = max((i for i, m in enumerate(mask) if m), default=-1)
    i = end
    while i >= 0 and mask[i]:
        out[i] = 1
        i -= 1
    return out


def _truncation_point(
    ids: list[int], max_length: int, start_id: int, end_id: int, image_id: int | None = None
) -> int:
    """`max_length`, moved back to the start of an image block the cut would fall inside (with no
    `<|image_start|>` / `<|image_end|>` around images, to the start of the run of `<image>` tokens)."""
    if len(ids) <= max_length:
        return len(ids)
    cut = max_length
    opened = None
    for i, token in enumerate(ids[:cut]):
        if token == start_id:
            opened = i
        elif token == end_id:
            opened = None
    cut = opened if opened is not None else cut
    while image_id is not None and 0 < cut < len(ids) and ids[cut] == image_id and ids[cut - 1] == image_id:
        cut -= 1
    return cut


TRUNCATED_FROM = "truncated_from"  # key of an encoded example that was cut at max_length: its full length


def kept_crops(processor, crops: VisionInputs | None, image_tokens: int) -> VisionInputs | None:
    """The crops whose `<image>` tokens are among the first `image_tokens` (what truncation kept), padding trimmed.
    Truncation only cuts before an image block, so the kept tokens end on an image boundary."""
    if crops is None:
        return None
    counts = processor.image_token_counts(crops.model_kwargs())  # per crop: NaFlex tiles differ, fixed ones don't
    keep, total = 0, 0
    while keep < len(counts) and total + counts[keep] <= image_tokens:
        total += counts[keep]
        keep += 1
    if total != image_tokens:  # a bug in truncation, never bad data
        raise RuntimeError(f"{image_tokens} image tokens kept do not end on a crop boundary ({counts}).")
    return crops.select(range(keep)) if keep else None


def encode_conversation(
    processor,
    conversation: dict[str, Any],
    max_length: int,
    last_turn_only: bool = False,
    image_settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenizes one Conversation for training. Raises SkipRow(`too_long`) when nothing supervised fits, and
    SkipRow(`control_token`) when message or tool text carries a chat control token; a
    conversation cut at `max_length` that still has supervised tokens carries its full length under
    TRUNCATED_FROM, so the caller can count and report it (`SkipReport.add_truncated`). `image_settings`: the
    run's image overrides (`min_image_tokens`, `max_image_tokens`, `do_image_splitting`; fixed resolution: the last)."""
    messages = fill_images(conversation["messages"], conversation.get("images") or [])
    try:
        out = processor.apply_chat_template(
            messages,
            tools=conversation.get("tools"),
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            return_tensors=None,
            processor_kwargs=dict(image_settings or {}),
        )
    except ValueError as err:
        if _is_control_token_error(err):  # e.g. "<|im_start|>assistant ..." typed into a user message
            raise SkipRow(CONTROL_TOKEN, str(err)) from err
        raise
    ids = list(out["input_ids"][0])
    mask = list(out["assistant_masks"][0])
    if last_turn_only:
        mask = _keep_last_span(mask)
    tokenizer = processor.tokenizer
    start_id = tokenizer.convert_tokens_to_ids(processor.image_start_token)
    end_id = tokenizer.convert_tokens_to_ids(processor.image_end_token)
    cut = _truncation_point(ids, max_length, start_id, end_id, processor.image_token_id)
    ids, mask = ids[:cut], mask[:cut]
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    if not any(label != IGNORE_INDEX for label in labels):
        raise SkipRow(TOO_LONG, f"{len(out['input_ids'][0])} tokens with images; --max-length is {max_length}")
    example = {"input_ids": ids, "labels": labels}
    if cut < len(out["input_ids"][0]):
        example[TRUNCATED_FROM] = len(out["input_ids"][0])  # the caller's SkipReport counts it (add_truncated)
    crops = kept_crops(processor, VisionInputs.of(out), ids.count(processor.image_token_id))
    if crops is not None:
        crops.put_into(example)
    return example


class Collator:
    """Pads a list of Examples (right padding) and concatenates their image crops in sample order."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        longest = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), longest), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            input_ids[row, :n] = torch.as_tensor(example["input_ids"])
            labels[row, :n] = torch.as_tensor(example["labels"])
            attention_mask[row, :n] = 1
        batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
        crops = VisionInputs.gather(examples)  # NaFlex crops padded to the batch's longest
        if crops is not None:
            crops.put_into(batch)
        grids = [g for e in examples for g in e.get("vision_features") or []]
        if grids:  # from the frozen-vision feature cache
            batch["vision_features"] = grids
        return batch
