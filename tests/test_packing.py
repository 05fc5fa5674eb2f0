"""Packing: several conversations in one row give the same per-sample loss as unpacked, with no leakage."""

from __future__ import annotations

import pytest
import torch

from conftest import draw_shapes


def _examples(processor):
    from n2eye.data.collate import encode_conversation

    conversations = [
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]},
                      {"role": "assistant", "content": "Red."}], "images": [draw_shapes()]},
        {"messages": [{"role": "user", "content": "No picture here, just a longer question to answer?"},
                      {"role": "assistant", "content": "Then I answer in words."}], "images": []},
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "and"},
                                                   {"type": "image"}, {"type": "text", "text": "Which is green?"}]},
                      {"role": "assistant", "content": "The second."}],
         "images": [draw_shapes(shape="square"), draw_shapes(color=(20, 200, 20))]},
    ]  # fmt: skip
    return [encode_conversation(processor, c, max_length=2048) for c in conversations]


def _per_sample_losses(logits, labels, sample_of):
    """Summed next-token cross entropy of each sample's supervised tokens."""
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none")
    losses = losses.view(labels.shape[0], -1)
    out = {}
    for (row, pos), sample in sample_of.items():
        out[sample] = out.get(sample, 0.0) + losses[row, pos - 1]
    return out


def test_packed_and_unpacked_give_the_same_per_sample_loss(tiny_model):
    from n2eye.data.collate import Collator
    from n2eye.data.packing import PackedCollator, pack_examples

    model, processor = tiny_model
    examples = _examples(processor)
    pad = processor.tokenizer.pad_token_id
    expected = {}
    for i, example in enumerate(examples):
        batch = Collator(pad)([example])
        with torch.no_grad():
            logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        positions = (batch["labels"][0] != -100).nonzero().flatten().tolist()
        expected.update(_per_sample_losses(logits, batch["labels"], {(0, p): i for p in positions}))

    bins = pack_examples(examples, max_length=4096)
    assert len(bins) == 1 and len(bins[0]["segments"]) == 3
    packed = PackedCollator(pad)(bins)
    assert packed["pixel_values"].shape[0] == 3
    with torch.no_grad():
        logits = model(**{k: v for k, v in packed.items() if k != "labels"}).logits
    # map supervised positions in the packed row back to their sample
    sample_of, offset = {}, 0
    for i, example in enumerate(examples):
        for p, label in enumerate(example["labels"]):
            if label != -100:
                sample_of[(0, offset + p)] = i
        offset += len(example["input_ids"]) + 2
    got = _per_sample_losses(logits, packed["labels"], sample_of)
    for i in expected:
        torch.testing.assert_close(got[i], expected[i], rtol=1e-4, atol=1e-4)


def test_no_token_attends_across_samples(tiny_model):
    from n2eye.data.packing import PackedCollator, pack_examples

    model, processor = tiny_model
    examples = _examples(processor)
    pad = processor.tokenizer.pad_token_id
    batch = PackedCollator(pad)(pack_examples(examples, 4096))
    changed = [dict(e) for e in examples]
    changed[0] = {**changed[0], "input_ids": [7 if t not in (processor.image_token_id,) else t for t in changed[0]["input_ids"]]}
    other = PackedCollator(pad)(pack_examples(changed, 4096))
    with torch.no_grad():
        a = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        b = model(**{k: v for k, v in other.items() if k != "labels"}).logits
    first = len(examples[0]["input_ids"])
    assert not torch.allclose(a[0, :first], b[0, :first])  # the change is visible in sample 0 ...
    torch.testing.assert_close(a[0, first:], b[0, first:], rtol=1e-5, atol=1e-5)  # ... and nowhere else


def test_bins_respect_max_length():
    from n2eye.data.packing import GAP, pack_examples

    examples = [{"input_ids": [1] * n, "labels": [1] * n} for n in (50, 30, 60, 10, 45)]
    bins = pack_examples(examples, max_length=100)
    for b in bins:
        lengths = [len(s["input_ids"]) for s in b["segments"]]
        assert sum(lengths) + GAP * (len(lengths) - 1) <= 100
    assert sorted(len(s["input_ids"]) for b in bins for s in b["segments"]) == [10, 30, 45, 50, 60]


def test_train_with_packing_runs_and_learns(tiny_checkpoint, tmp_path):
    import json

    from test_train import run_train, write_messages_dataset

    from transformers import TrainerCallback

    class SeenAttention(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.implementation = model.config.text_config._attn_implementation

    seen = SeenAttention()
    data = write_messages_dataset(tmp_path / "d", n=8)
    run_train(tiny_checkpoint, data, tmp_path / "run", pack=True, max_length=512, max_steps=12, lr=3e-3, batch_size=1,
              callbacks=[seen])  # fmt: skip
    assert seen.implementation == "n2eye_packed_sdpa"  # attention per packed sample ...
    assert "n2eye_packed_sdpa" not in (tmp_path / "run" / "final" / "config.json").read_text()  # ... not saved
    result = json.loads((tmp_path / "run" / "train_result.json").read_text())
    assert result["train_conversations"] == 8 and result["train_rows"] < 8
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]  # fmt: skip
    assert losses[-1] < losses[0]


def test_the_gap_follows_the_conv_kernel(tiny_model):
    """An LFM2 with a longer short convolution (conv_L_cache 6) needs 5 masked positions between packed samples:
    with LFM2's usual 2, the first tokens of a sample saw the end of the one before it."""
    import copy

    from n2eye.data.packing import GAP, PackedCollator, conv_gap, pack_examples
    from n2eye.modeling.modeling_n2eye import N2EyeForConditionalGeneration

    model, processor = tiny_model
    assert conv_gap(model.config.text_config) == GAP
    config = copy.deepcopy(model.config)
    config.text_config.conv_L_cache = 6
    torch.manual_seed(0)
    wide = N2EyeForConditionalGeneration(config).eval()
    gap = conv_gap(config.text_config)
    assert gap == 5
    examples = _examples(processor)
    changed = [dict(e) for e in examples]
    image = processor.image_token_id
    changed[0] = {**changed[0], "input_ids": [7 if t != image else t for t in changed[0]["input_ids"]]}
    first = len(examples[0]["input_ids"])
    pad = processor.tokenizer.pad_token_id

    def logits(rows, gap):
        batch = PackedCollator(pad)(pack_examples(rows, 4096, gap))
        with torch.no_grad():
            return wide(**{k: v for k, v in batch.items() if k != "labels"}).logits[0, first:]

    torch.testing.assert_close(logits(examples, gap), logits(changed, gap), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits(examples, GAP), logits(changed, GAP), rtol=1e-5, atol=1e-5)


def _two_packed_rows(processor, gap):
    """Two packed rows (three samples and one) with `gap` masked positions between samples."""
    from n2eye.data.packing import PackedCollator, pack_examples

    examples = _examples(processor)
    bins = pack_examples(examples, 4096, gap) + pack_examples(examples[1:2], 4096, gap)
    return PackedCollator(processor.tokenizer.pad_token_id)(bins), examples


@pytest.mark.parametrize("gap", [2, 0])
def test_per_sample_attention_equals_the_block_diagonal_mask(tiny_model, gap):
    """`n2eye_packed_sdpa` (what `n2eye train --pack` runs) gives the loss, logits and gradients of SDPA with the
    dense block-diagonal mask; with no gap, samples are told apart by their restarted positions."""
    from n2eye.modeling.packed_attention import PACKED_SDPA

    model, processor = tiny_model
    batch, _ = _two_packed_rows(processor, gap)
    real = batch["attention_mask"].bool()
    text = model.config.text_config
    results = {}
    try:
        for implementation in ("sdpa", PACKED_SDPA):
            text._attn_implementation = implementation
            model.eval()
            with torch.no_grad():
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
            model.train()
            model.zero_grad()
            loss = model(**batch).loss
            loss.backward()
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            results[implementation] = (logits[real], loss.detach(), grads)
    finally:
        text._attn_implementation = "sdpa"
        model.zero_grad()
        model.eval()
    (dense_logits, dense_loss, dense_grads), (ours_logits, ours_loss, ours_grads) = results.values()
    torch.testing.assert_close(ours_logits, dense_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_loss, dense_loss, rtol=1e-6, atol=1e-6)
    assert dense_grads.keys() == ours_grads.keys() and any(g.abs().sum() > 0 for g in dense_grads.values())
    for name, grad in dense_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_packed_segments_cover_each_sample_once(tiny_model):
    """Every real position of every sample sits in exactly one bucket row, with its own sample only; gaps and
    padding in none."""
    from n2eye.modeling.packed_attention import BUCKET, PackedSegments

    _, processor = tiny_model
    batch, examples = _two_packed_rows(processor, 2)
    segments = PackedSegments.from_positions(batch["position_ids"], batch["attention_mask"])
    lengths, covered = [], []
    for index, valid in segments.buckets:
        assert index.shape == valid.shape and index.shape[1] % BUCKET == 0
        for row, keep in zip(index, valid):
            positions = row[keep].tolist()
            assert positions == list(range(positions[0], positions[0] + len(positions)))  # one contiguous sample
            lengths.append(len(positions))
            covered += positions
    expected = [len(e["input_ids"]) for e in examples] + [len(examples[1]["input_ids"])]
    assert sorted(lengths) == sorted(expected)
    real = batch["attention_mask"].reshape(-1).nonzero().flatten().tolist()
    assert sorted(covered) == real and segments.scatter.numel() == batch["attention_mask"].numel()
