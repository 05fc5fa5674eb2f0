"""The walk from dataset rows to what the Trainer batches: read SPEC through the format adapters, encode each
conversation (or skip and count it), swap pixels for cached frozen-vision features, pack rows, pick the collator.

Every bad row and every sample that can't fit is skipped and counted in a `SkipReport`, never fatal; a sample cut
at the length limit is kept and counted. `prepare_datasets` is the one entry: `n2eye train` calls it with its
config (any object with the `TrainConfig` fields it reads).
"""

from __future__ import annotations

from typing import Any

import torch

from ..vision_inputs import VisionInputs
from .abstention import DEFAULT_ABSTAIN_ANSWER, Abstention
from .collate import TRUNCATED_FROM, Collator, encode_conversation
from .packing import PackedCollator, conv_gap, pack_examples
from .report import SkipReport, SkipRow


def _row_of(conversation: dict):
    """The source row's session id, id or index (set by the format adapters' reader), for skip reports."""
    return (conversation.get("metadata") or {}).get("row")


def encode_or_skip(
    processor,
    conversation: dict,
    max_length: int,
    last_turn_only: bool,
    report: SkipReport,
    image_settings: dict[str, Any] | None = None,
) -> dict | None:
    """One conversation encoded for training, or None when it is skipped (counted in `report` with its reason);
    a conversation cut at `max_length` is kept and counted as truncated."""
    try:
        example = encode_conversation(processor, conversation, max_length, last_turn_only, image_settings)
    except SkipRow as skip:
        report.add_kept(-1)  # the adapter counted it as kept; tokenization skipped it
        report.add(skip.reason, _row_of(conversation), skip.detail)
        return None
    full = example.pop(TRUNCATED_FROM, None)
    if full is not None:
        report.add_truncated(_row_of(conversation), f"{full} tokens with images; --max-length is {max_length}")
    return example


def encode_dataset(
    processor,
    spec: str,
    fmt: str,
    max_length: int,
    last_turn_only: bool,
    max_samples: int,
    report: SkipReport,
    image_settings: dict[str, Any] | None = None,
    abstention: Abstention | None = None,
) -> list[dict]:
    """Reads SPEC through the format adapters and tokenizes every usable conversation (skips counted); with
    `abstention`, its share of conversations is turned into "I don't know" samples first."""
    from tqdm.auto import tqdm

    from .formats import load_many

    examples = []
    source = load_many(spec, fmt, report=report)
    stream = abstention.apply(source) if abstention else source
    for conversation in tqdm(stream, desc=f"encoding {spec}", unit="conv"):
        example = encode_or_skip(processor, conversation, max_length, last_turn_only, report, image_settings)
        if example is None:
            continue
        examples.append(example)
        if max_samples and len(examples) >= max_samples:
            break
    source.close()
    if not examples:
        raise ValueError(f"No usable training sample in {spec}: {report.summary()}")
    return examples


class StreamingExamples(torch.utils.data.IterableDataset):
    """Encodes conversations on the fly from a streaming source, for datasets too large to hold in memory.
    Bad rows and samples that can't fit are skipped and counted as they come. The stream starts over at its end
    (the run stops at --max-steps): a source shorter than one optimizer step's batches made the Trainer begin
    epoch after epoch without ever stepping."""

    def __init__(self, processor, cfg: Any, report: SkipReport, feature_cache=None,
                 abstention: Abstention | None = None):  # fmt: skip
        self.processor, self.cfg, self.report, self.feature_cache = processor, cfg, report, feature_cache
        self.abstention = abstention

    def __iter__(self):
        while True:
            produced = 0
            for example in self._one_pass():
                produced += 1
                yield example
            if not produced:
                raise ValueError(f"No usable training sample in {self.cfg.data}: {self.report.summary()}")

    def _one_pass(self):
        from .formats import load_many

        cfg = self.cfg
        stream = load_many(cfg.data, cfg.format, streaming=True, report=self.report, check_all_bad=False)
        abstention = self.abstention
        for conversation in abstention.apply(stream) if abstention else stream:
            example = encode_or_skip(self.processor, conversation, cfg.max_length, cfg.last_turn_only, self.report,
                                     cfg.image_settings())  # fmt: skip
            if example is None:
                continue
            if self.feature_cache is not None:
                crops = VisionInputs.pop_from(example)
                if crops is not None:
                    example["vision_features"] = self.feature_cache.grids(crops)
            yield example


def attach_cached_features(cache, examples: list[dict], state) -> None:
    """Replaces each example's image crops with cached vision-tower grids, one per crop (computed now if new).
    `state`: the run's accelerate PartialState; under data parallel each process computes its share of the new
    images, then all read the whole set."""
    from tqdm.auto import tqdm

    keys: dict[int, list[str]] = {}  # id(example) -> its crops' keys, for the examples this process filled
    with state.split_between_processes(examples) as share:
        for example in tqdm(share, desc="vision feature cache", unit="conv"):
            crops = VisionInputs.of(example)
            if crops is not None:
                keys[id(example)] = cache.fill(crops)
    state.wait_for_everyone()  # every process's share is on disk now
    for example in examples:
        crops = VisionInputs.pop_from(example)
        if crops is not None:
            example["vision_features"] = cache.load(keys.get(id(example)) or cache.keys(crops))
    where = f" (process {state.process_index} of {state.num_processes}, its share)" if state.num_processes > 1 else ""
    print(f"vision feature cache {cache.dir}: {cache.hits} reused, {cache.misses} computed{where}")


def abstention_of(cfg: Any) -> Abstention | None:
    """The --abstain-fraction option of a train config, or None when it is off."""
    fraction = getattr(cfg, "abstain_fraction", 0.0)
    if not fraction:
        return None
    return Abstention(fraction, getattr(cfg, "abstain_answer", DEFAULT_ABSTAIN_ANSWER), cfg.seed)


def prepare_datasets(cfg: Any, processor, model, report: SkipReport, eval_report: SkipReport, args, cache=None,
                     abstention: Abstention | None = None):  # fmt: skip
    """Train/eval examples (encoded, or streamed), feature-cached and packed as configured, and their collator.
    `args`: the run's TrainingArguments (its processes share the feature cache's work); `cache`: the run's
    frozen-vision feature cache (`train.feature_cache`), or None; `abstention`: the training data's
    "I don't know" option (`abstention_of(cfg)`), which counts what it changed (the eval data is never changed)."""
    if cfg.streaming:
        from .formats import load_many

        load_many(cfg.data, cfg.format, streaming=True)  # checks every SPEC's format before anything runs
        train_set = StreamingExamples(processor, cfg, report, cache, abstention)
    else:
        train_set = encode_dataset(processor, cfg.data, cfg.format, cfg.max_length, cfg.last_turn_only,
                                   cfg.max_samples, report, cfg.image_settings(), abstention)  # fmt: skip
        print(f"train: {len(train_set)} conversations; {report.summary()}")
        if abstention is not None:
            print(f"abstention: {abstention.count} conversations with images withheld and answers "
                  f"{abstention.answer!r} (--abstain-fraction {abstention.fraction})")  # fmt: skip
    eval_set = None
    if cfg.eval_data:
        eval_set = encode_dataset(processor, cfg.eval_data, cfg.format, cfg.max_length, cfg.last_turn_only, 0,
                                  eval_report, cfg.image_settings())  # fmt: skip
    if cache is not None:
        attach_cached_features(cache, ([] if cfg.streaming else train_set) + (eval_set or []), args.distributed_state)
    collator = Collator(processor.tokenizer.pad_token_id)
    n_conversations = None if cfg.streaming else len(train_set)
    if cfg.pack:
        gap = conv_gap(model.config.text_config)
        train_set = pack_examples(train_set, cfg.max_length, gap)
        eval_set = pack_examples(eval_set, cfg.max_length, gap) if eval_set else eval_set
        collator = PackedCollator(processor.tokenizer.pad_token_id)
        print(f"packing: {n_conversations} conversations in {len(train_set)} rows of <= {cfg.max_length} tokens")
    return train_set, eval_set, collator, n_conversations
