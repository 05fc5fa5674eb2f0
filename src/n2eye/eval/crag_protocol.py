"""The CRAG-MM truthfulness protocol (Meta, KDD Cup 2025) as pure scoring logic: no network, no model.

Every rule here follows the official kit, repository ``facebookresearch/CRAG-MM`` (snapshot 36b6b4b):

1. Truncation -- ``evaluation/evaluator.py``, ``CRAGEvaluator.__init__`` and ``truncate_agent_responses``, with
   ``MAX_RESPONSE_LENGTH_IN_TOKENS = 75`` from ``evaluation/config.py``. The kit builds
   ``tokenizers.Tokenizer.from_pretrained("meta-llama/Llama-3.2-1B-Instruct")`` with
   ``enable_truncation(max_length=75)``, encodes each response (special tokens on) and decodes it (special tokens
   skipped). ``tokenizers`` keeps room for the post-processor's special tokens inside ``max_length``, and Llama-3.2
   adds one (``<|begin_of_text|>``), so the answer keeps **74** content tokens; ``truncate_answer`` reproduces this
   with ``reserved_special_tokens=1``. The truncated text is what is stored in ``agent_response_map``, i.e. what later
   turns see as history (``generate_agent_responses``), and what is judged.
2. Per-turn verdict -- ``evaluation/evaluator.py``, ``CRAGEvaluator.evaluate_response``, with ``clean_text`` from
   ``evaluation/dataset_utils.py``. Exact match is ``answer.strip().lower() == ground_truth.strip().lower()``.
   "Missing" is ``"i dont know" in clean`` or ``"i do not know" in clean`` where ``clean`` is the answer lowercased
   with every character outside ``[a-z0-9\\s]`` deleted (so apostrophes of any kind, punctuation and case do not
   matter, but extra spaces, "idk", "I dunno" do; being a substring test, "Hi, don't know" also counts). The judge
   (``evaluation/llm_judge.py``, ``LLMJudge.evaluate(query, ground_truth, agent_response)``) is asked only when the
   answer is neither missing nor an exact match; an unparsable verdict (``None``) or a failed API call leaves the turn
   not correct, and a turn neither correct nor missing is a hallucination. Without a judge model only exact match
   counts as correct.
3. Early stop -- ``evaluation/evaluation_utils.py``, ``calculate_scores._set_is_correct_false_after_consecutive``.
   Within a session ordered by turn index, at the first ``i >= 1`` where turns ``i-1`` and ``i`` are both not correct
   (a "missing" answer is not correct, so it counts as a failure), every turn after ``i`` is set to missing
   (``is_correct = False``, ``is_miss = True``). Turns ``i-1`` and ``i`` keep their verdicts.
4. Aggregates -- ``evaluation/evaluation_utils.py``, ``calculate_scores``: ``total``, ``correct``, ``miss``,
   ``hallucination = total - (correct + miss)``, ``accuracy``, ``missing``, ``hallucination_rate``,
   ``truthfulness_score = (2 * correct + miss) / total - 1 if total > 1 else 0.0``, and
   ``mean_multi_turn_conversation_score`` = mean over sessions of ``mean(is_correct) - mean(is_hallucination)``.
   NB: the counts and truthfulness are taken *before* the early stop is applied; only the multi-turn conversation
   score sees it. ``evaluation/evaluator.py``, ``evaluate_agent_responses`` scores "all" turns and the "ego" subset
   (``is_ego`` = the turn has no ``image_url``).

Where this module differs from the official kit (on purpose):

* ``aggregate`` also reports per-``domain`` / ``query_category`` / ``image_quality`` groups, which the kit does not;
  a group's multi-turn score uses the verdicts after the session-wide early stop (the kit would recompute the early
  stop inside the subset, which for a per-turn field such as ``domain`` can split a session).
* ``aggregate(count_early_stop_as_missing=True)`` counts early-stopped turns as missing in the counts and
  truthfulness too (the reading of the CRAG-MM paper / README); the default ``False`` is the kit's arithmetic.
* An answer that is both an exact match and contains "i don't know" is "correct" here; the kit would count it both
  as correct and as missing (its hallucination count could then go negative).
* ``truncate_answer`` returns the answer unchanged when it fits (the kit always round-trips encode/decode, which is
  lossless for Llama-3.2's byte-level BPE anyway) and takes any tokenizer with ``encode``/``decode``.
* A judge that raises counts as not correct (the kit retries 3 times, then also counts the turn as not correct).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

MAX_RESPONSE_TOKENS = 75
"""``MAX_RESPONSE_LENGTH_IN_TOKENS`` in the kit's ``evaluation/config.py``."""

SESSIONS_TO_SKIP = frozenset({"04d98259-27af-41b1-a7be-5798fd1b8e95", "695b4b5c-7c65-4f7b-8968-50fe10482a16"})
"""``SESSIONS_TO_SKIP`` in the kit's ``evaluation/config.py`` (the same two for single- and multi-turn): sessions the
official evaluation leaves out; ``crag_runner`` skips them too and lists them in its result."""

VERDICTS = ("correct", "missing", "hallucination", "early_stop")

Judge = Callable[[str, str, str], Any]
"""``judge(query, ground_truth, prediction)`` -> ``bool`` or ``(bool | None, raw)``; only ``True`` means correct."""

_NON_ALNUM = re.compile(r"[^a-z0-9\s]")
_IDK_PHRASES = ("i dont know", "i do not know")


def truncate_answer(
    answer: str,
    tokenizer: Any,
    max_tokens: int = MAX_RESPONSE_TOKENS,
    reserved_special_tokens: int = 1,
) -> str:
    """Cut ``answer`` to what the kit keeps: ``max_tokens - reserved_special_tokens`` content tokens.

    The default (75, 1) matches the kit with Llama-3.2's tokenizer, whose BOS token takes one of the 75 places.
    Special tokens are not added or decoded when the tokenizer supports those switches (transformers tokenizers do).
    """
    budget = max_tokens - reserved_special_tokens
    if budget < 0:
        raise ValueError(f"max_tokens ({max_tokens}) < reserved_special_tokens ({reserved_special_tokens})")
    try:
        ids = tokenizer.encode(answer, add_special_tokens=False)
    except TypeError:
        ids = tokenizer.encode(answer)
    ids = list(getattr(ids, "ids", ids))  # a `tokenizers.Encoding` carries its ids in `.ids`
    if len(ids) <= budget:
        return answer
    try:
        return tokenizer.decode(ids[:budget], skip_special_tokens=True)
    except TypeError:
        return tokenizer.decode(ids[:budget])


def clean_text(text: str) -> str:
    """The kit's ``clean_text``: lowercase, then delete every character that is not ``[a-z0-9]`` or whitespace."""
    return _NON_ALNUM.sub("", text.lower())


def is_missing(answer: str) -> bool:
    """True when the (truncated) answer abstains: contains "i dont know" / "i do not know" after ``clean_text``."""
    cleaned = clean_text(answer)
    return any(phrase in cleaned for phrase in _IDK_PHRASES)


def is_exact_match(answer: str, ground_truth: str) -> bool:
    """The kit's exact match: equal after ``strip().lower()`` (no punctuation normalisation)."""
    return answer.strip().lower() == ground_truth.strip().lower()


def judge_turn(truncated: str, ground_truth: str, query: str, judge: Judge | None) -> tuple[str, Any]:
    """Verdict of one (already truncated) answer: ``(verdict, judge_raw)``.

    Exact match -> correct; abstention -> missing; else the judge decides, and anything but ``True`` (``False``,
    ``None``, an exception) is a hallucination. ``judge=None`` means exact match only, so the hallucination count
    is then an upper bound. ``judge_raw`` is what the judge returned (or ``"error: ..."``), None when not asked.
    """
    if is_exact_match(truncated, ground_truth):
        return "correct", None
    if is_missing(truncated):
        return "missing", None
    if judge is None:
        return "hallucination", None
    try:
        result = judge(query, ground_truth, truncated)
    except Exception as exc:  # noqa: BLE001 -- a judge failure must not stop the run: the turn is not correct
        return "hallucination", f"error: {type(exc).__name__}: {exc}"
    ok, raw = result if isinstance(result, tuple) else (result, result)
    return ("correct" if ok is True else "hallucination"), raw


def apply_early_stop(verdicts: Sequence[str]) -> list[str]:
    """After the first two consecutive not-correct turns (missing counts), mark every later turn ``early_stop``."""
    out = list(verdicts)
    for i in range(1, len(out)):
        if out[i - 1] != "correct" and out[i] != "correct":
            out[i + 1 :] = ["early_stop"] * (len(out) - i - 1)
            break
    return out


def score_session(
    turns: Sequence[Mapping[str, Any]],
    judge: Judge | None,
    tokenizer: Any,
    max_tokens: int = MAX_RESPONSE_TOKENS,
    reserved_special_tokens: int = 1,
) -> list[dict[str, Any]]:
    """Score one conversation: truncate, judge every turn, then apply the early stop.

    Each input turn needs ``session_id``, ``turn`` (index), ``question``, ``ground_truth``, ``answer``; other keys
    (``domain``, ``query_category``, ``image_quality``, ``is_ego``, ...) are carried over. Every turn is judged, as
    in the kit, so ``judged_verdict`` keeps the verdict before the early stop and ``verdict`` the one after it.
    """
    if not turns:
        return []
    sessions = {t["session_id"] for t in turns}
    if len(sessions) != 1:
        raise ValueError(f"score_session takes one session, got {sorted(map(str, sessions))}")
    ordered = sorted(turns, key=lambda t: t["turn"])
    records = []
    for t in ordered:
        truncated = truncate_answer(t["answer"], tokenizer, max_tokens, reserved_special_tokens)
        verdict, raw = judge_turn(truncated, t["ground_truth"], t["question"], judge)
        records.append(
            {
                **t,
                "truncated_answer": truncated,
                "is_exact_match": is_exact_match(truncated, t["ground_truth"]),
                "judged_verdict": verdict,
                "verdict": verdict,
                "judge_raw": raw,
            }
        )
    for rec, final in zip(records, apply_early_stop([r["judged_verdict"] for r in records])):
        rec["verdict"] = final
    return records


def score_sessions(
    turns: Iterable[Mapping[str, Any]], judge: Judge | None, tokenizer: Any, **kwargs: Any
) -> list[dict[str, Any]]:
    """``score_session`` over turns of many sessions (grouped by ``session_id``, first-appearance order)."""
    by_session: dict[Any, list[Mapping[str, Any]]] = {}
    for t in turns:
        by_session.setdefault(t["session_id"], []).append(t)
    out: list[dict[str, Any]] = []
    for session_turns in by_session.values():
        out.extend(score_session(session_turns, judge, tokenizer, **kwargs))
    return out


def _metrics(records: Sequence[Mapping[str, Any]], count_early_stop_as_missing: bool) -> dict[str, Any]:
    """The kit's ``calculate_scores`` on one set of turn records (see the module docstring, point 4)."""
    n = len(records)
    key = "verdict" if count_early_stop_as_missing else "judged_verdict"
    correct = sum(r[key] == "correct" for r in records)
    missing = sum(r[key] in ("missing", "early_stop") for r in records)
    hallucination = n - correct - missing
    exact = sum(
        bool(r.get("is_exact_match")) and not (count_early_stop_as_missing and r["verdict"] == "early_stop")
        for r in records
    )
    per_session: dict[Any, list[str]] = {}
    for r in records:
        per_session.setdefault(r["session_id"], []).append(r["verdict"])
    session_scores = [
        sum(v == "correct" for v in vs) / len(vs) - sum(v == "hallucination" for v in vs) / len(vs)
        for vs in per_session.values()
    ]
    rate = (lambda k: k / n) if n else (lambda k: None)
    return {
        "n": n,
        "sessions": len(per_session),
        "correct": correct,
        "missing": missing,
        "hallucination": hallucination,
        "early_stop": sum(r["verdict"] == "early_stop" for r in records),
        "exact_match": exact,
        "accuracy": rate(correct),
        "missing_rate": rate(missing),
        "hallucination_rate": rate(hallucination),
        "exact_match_rate": rate(exact),
        "truthfulness": (2 * correct + missing) / n - 1 if n > 1 else 0.0,  # sic: the kit gives 0.0 for n == 1
        "multi_turn_conversation_score": math.fsum(session_scores) / len(session_scores) if session_scores else None,
    }


def aggregate(
    turn_records: Sequence[Mapping[str, Any]],
    groups: Sequence[str] = ("domain", "query_category", "image_quality"),
    ego_key: str = "is_ego",
    count_early_stop_as_missing: bool = False,
) -> dict[str, Any]:
    """Overall, per-group and egocentric metrics of ``score_session`` records.

    Returns ``{"overall": m, "per_<group>": {value: m}, "egocentric": m}``; a record without a group key falls in
    ``"unknown"``. Egocentric = records whose ``ego_key`` is truthy (the kit: turns without an ``image_url``).
    """
    result: dict[str, Any] = {"overall": _metrics(turn_records, count_early_stop_as_missing)}
    for group in groups:
        buckets: dict[str, list[Mapping[str, Any]]] = {}
        for r in turn_records:
            value = r.get(group)
            buckets.setdefault("unknown" if value is None else str(value), []).append(r)
        result[f"per_{group}"] = {
            value: _metrics(recs, count_early_stop_as_missing) for value, recs in sorted(buckets.items())
        }
    result["egocentric"] = _metrics([r for r in turn_records if r.get(ego_key)], count_early_stop_as_missing)
    return result
