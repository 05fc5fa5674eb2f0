"""Attention over packed rows, one sample at a time: the cost of the samples, not of the row.

A packed row holds several samples (the trainer's `pack_length`); a dense block-diagonal mask makes SDPA compute
every (query, key) pair of the row and throw most away, and a mask also rules out its causal fast path. Here the
samples are gathered into batches of like length, each run with ``is_causal=True``, and the outputs scattered
back: on a 400-token row of three samples the attention does about a third of the work.

Registered as the attention implementation ``"n2eye_packed_sdpa"`` (with SDPA's mask function): for anything but
a :class:`PackedSegments` mask it *is* SDPA, so a model may keep it for generation and unpacked batches. Ships
inside checkpoints with the modeling code (imports only torch and transformers); a process may import both this
module and a checkpoint's copy, and whichever registers last serves both, so the mask is recognised by its
``scatter``, not its class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

PACKED_SDPA = "n2eye_packed_sdpa"
BUCKET = 32  # samples are padded up to a multiple of this and batched with others of that length


@dataclass
class PackedSegments:
    """Where each packed sample sits in the flattened (batch * seq) positions, grouped by padded length.

    ``gather``: for every bucket in turn, its (n, L) rows of flattened positions, flattened (past a sample's end a
    row repeats the sample's last position: causal attention never lets a real query see those). ``shapes``: each
    bucket's (n, L). ``scatter``: for each flattened position, its row in the gathered order, or one past the
    end (a zero output) for positions in no sample: gaps between samples and padding, which no real token attends
    to and no label reads."""

    gather: torch.Tensor
    shapes: list[tuple[int, int]]
    scatter: torch.Tensor

    @property
    def buckets(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per bucket, its (n, L) positions and the mask of real ones (a view for tests and debugging)."""
        out, offset = [], 0
        for n, length in self.shapes:
            rows = torch.arange(offset, offset + n * length, device=self.gather.device)
            index = self.gather[offset : offset + n * length].view(n, length)
            out.append((index, (self.scatter[index] == rows.view(n, length))))
            offset += n * length
        return out

    @classmethod
    def from_positions(cls, position_ids: torch.Tensor, token_mask: torch.Tensor) -> PackedSegments:
        """Samples from a packed batch: a sample is a run of real tokens (``token_mask`` 1) that starts at position
        0 and ends at the next position 0 or the next masked token (the packing collator's layout)."""
        real = token_mask.bool().reshape(-1)
        pos = position_ids.reshape(-1)
        seq = token_mask.shape[-1]
        device = real.device
        flat = torch.arange(real.numel(), device=device)
        previous_real = torch.zeros_like(real)
        previous_real[1:] = real[:-1]
        previous_real[::seq] = False  # rows do not continue into the next row
        starts = real & ((pos == 0) | ~previous_real)
        start_index = flat[starts]
        segment = torch.cumsum(starts.long(), 0) - 1
        lengths = torch.bincount(segment[real], minlength=len(start_index))
        by_length: dict[int, list[int]] = {}
        for i, n in enumerate(lengths.tolist()):
            by_length.setdefault(-(-n // BUCKET) * BUCKET, []).append(i)
        gathers, shapes = [], []
        scatter = torch.full((real.numel(),), int(sum(len(m) * p for p, m in by_length.items())), device=device)
        offset = 0
        for padded, members in sorted(by_length.items()):
            n = lengths[members]
            offsets = torch.arange(padded, device=device)
            index = start_index[members][:, None] + torch.minimum(offsets[None, :], (n - 1)[:, None])
            valid = offsets[None, :] < n[:, None]
            rows = torch.arange(offset, offset + index.numel(), device=device).view(index.shape)
            scatter[index[valid]] = rows[valid]
            gathers.append(index.reshape(-1))
            shapes.append(tuple(index.shape))
            offset += index.numel()
        return cls(torch.cat(gathers), shapes, scatter)


def packed_sdpa_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | PackedSegments | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA per packed sample when `attention_mask` is a :class:`PackedSegments`, plain SDPA otherwise.
    query: (batch, heads, seq, dim), key/value: (batch, kv_heads, seq, dim) -> (batch, seq, heads, dim)."""
    if not hasattr(attention_mask, "scatter"):  # duck-typed: a checkpoint's copy of this module registers too
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )  # fmt: skip
    batch, heads, seq, dim = query.shape
    kv_heads = key.shape[1]
    # one gather for q, k and v (its backward, an index_add, is the costly part on CPU: once, not per bucket)
    qkv = torch.cat([query, key, value], dim=1).transpose(1, 2).reshape(batch * seq, heads + 2 * kv_heads, dim)
    gathered = qkv.index_select(0, attention_mask.gather)
    outputs, offset = [], 0
    for n, length in attention_mask.shapes:
        chunk = gathered[offset : offset + n * length].view(n, length, -1, dim).transpose(1, 2)
        q, k, v = chunk.split([heads, kv_heads, kv_heads], dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scaling, dropout_p=dropout if module.training else 0.0,
            enable_gqa=kv_heads != heads,
        )  # fmt: skip
        outputs.append(out.transpose(1, 2).reshape(n * length, heads, dim))
        offset += n * length
    outputs.append(query.new_zeros(1, heads, dim))  # what positions in no sample get
    flat = torch.cat(outputs).index_select(0, attention_mask.scatter)
    return flat.view(batch, seq, heads, dim), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention_forward)
AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)
