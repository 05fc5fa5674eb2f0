"""Packing several conversations into one sequence, with no token seeing another sample.

Isolation for LFM2's two kinds of layers:
- attention: a block-diagonal causal mask (each sample attends only to itself) and positions restarting at 0;
- short convolution (kernel `conv_L_cache`, 3 in LFM2): `gap` = kernel - 1 masked positions between samples. LFM2
  zeroes masked positions before every conv, so a sample's first tokens see zeros, exactly like the zero padding
  at a sequence start.
Image crops (and NaFlex's spatial shapes and masks) keep their order because samples keep theirs.
"""

from __future__ import annotations

from typing import Any

import torch

from ..vision_inputs import VisionInputs
from .collate import IGNORE_INDEX

GAP = 2  # masked positions between samples for LFM2's kernel of 3 (`conv_L_cache`): kernel - 1


def conv_gap(text_config) -> int:
    """The gap a model needs between packed samples: its short convolution's kernel - 1 (0 without conv layers)."""
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types and "conv" not in layer_types:
        return 0
    return int(getattr(text_config, "conv_L_cache", GAP + 1)) - 1


def pack_examples(examples: list[dict[str, Any]], max_length: int, gap: int = GAP) -> list[dict[str, Any]]:
    """Greedy first-fit of examples (in order) into bins of at most `max_length` tokens, `gap` positions between
    samples (`conv_gap`)."""
    bins: list[list[dict[str, Any]]] = []
    sizes: list[int] = []
    for example in examples:
        need = len(example["input_ids"])
        for i, used in enumerate(sizes):
            if used + gap + need <= max_length:
                bins[i].append(example)
                sizes[i] = used + gap + need
                break
        else:
            bins.append([example])
            sizes.append(need)
    return [{"segments": b, "gap": gap} for b in bins]


class PackedCollator:
    """Turns packed bins into one row each: input_ids, labels, position_ids, the 2D mask (0 at gaps and
    padding, used by the conv layers and token counting) and the 4D block-diagonal `packed_attention_mask`."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def _row(self, segments: list[dict[str, Any]], gap: int):
        ids, labels, positions, mask, segment_of = [], [], [], [], []
        for index, example in enumerate(segments):
            if index:
                ids += [self.pad_token_id] * gap
                labels += [IGNORE_INDEX] * gap
                positions += list(range(gap))
                mask += [0] * gap
                segment_of += [-1] * gap
            n = len(example["input_ids"])
            ids += list(example["input_ids"])
            labels += list(example["labels"])
            positions += list(range(n))
            mask += [1] * n
            segment_of += [index] * n
        return ids, labels, positions, mask, segment_of

    def __call__(self, bins: list[dict[str, Any]]) -> dict[str, Any]:
        rows = [self._row(b["segments"], b["gap"]) for b in bins]
        longest = max(len(r[0]) for r in rows)
        batch_size = len(rows)
        input_ids = torch.full((batch_size, longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros((batch_size, longest), dtype=torch.long)
        attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)
        segment = torch.full((batch_size, longest), -2, dtype=torch.long)
        for r, (ids, lab, pos, msk, seg) in enumerate(rows):
            n = len(ids)
            input_ids[r, :n] = torch.tensor(ids)
            labels[r, :n] = torch.tensor(lab)
            position_ids[r, :n] = torch.tensor(pos)
            attention_mask[r, :n] = torch.tensor(msk)
            segment[r, :n] = torch.tensor(seg)
        causal = torch.ones(longest, longest, dtype=torch.bool).tril()
        same = segment[:, :, None] == segment[:, None, :]
        real = segment[:, :, None] >= 0
        # real tokens: causal within their sample; gaps and padding attend to themselves only (outputs unused)
        allowed = (same & real & causal) | torch.eye(longest, dtype=torch.bool)
        batch = {
            "input_ids": input_ids,
            "labels": labels,
            "position_ids": position_ids,
            "attention_mask": attention_mask,
            "packed_attention_mask": allowed[:, None, :, :],
        }
        crops = VisionInputs.gather(s for b in bins for s in b["segments"])  # in sample order, as the tokens
        if crops is not None:
            crops.put_into(batch)
        grids = [g for b in bins for s in b["segments"] for g in s.get("vision_features") or []]
        if grids:
            batch["vision_features"] = grids
        return batch
