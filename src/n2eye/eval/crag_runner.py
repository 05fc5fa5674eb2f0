"""`n2eye eval --protocol crag-mm`: the CRAG-MM truthfulness protocol run end to end on a model.

Why a separate runner: the exact-match eval asks every turn with the dataset's gold history, while CRAG-MM asks
turn by turn with the agent's OWN earlier answers, each cut to `--max-answer-tokens`, as the history (what the
official kit does). Turn k of every session is generated in one batch, then turn k+1, so sessions still batch.
Verdicts, the early stop and the aggregates come from `crag_protocol` (pure scoring); this module only produces
the answers (a local model, or any OpenAI-compatible server through `crag_agent`), asks the judge (`--concurrency`
calls at a time, each retried within bounds) and writes the result. Answers and verdicts are cached by content
(`crag_cache`) as they come, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image

from ..checkpoint import write_json_atomic
from ..data.collate import fill_images
from .crag_cache import HistoryDigest, ResultCache, digest, partial_path, weights_fingerprint
from .crag_protocol import SESSIONS_TO_SKIP, aggregate, is_exact_match, is_missing, score_session
from .openai_client import ChatClient, ChatError, bounded_map

DEFAULT_JUDGE_PROMPT = Path(__file__).with_name("crag_judge_prompt.txt")
NO_JUDGE_NOTE = (
    "no judge (--judge-url): only exact match counts as correct, so accuracy is a lower bound and the "
    "hallucination count an upper bound"
)
GROUPS = ("domain", "query_category", "image_quality")
_JSON_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)


# --------------------------------------------------------------------------------------------- judge


def parse_accuracy(text: str) -> bool | None:
    """`{"accuracy": true|false}` anywhere in the judge's reply (code fences, prose around it); None otherwise."""
    candidates = [text.strip()] + _JSON_OBJECT.findall(text)
    for candidate in candidates:
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict) and isinstance(value.get("accuracy"), bool):
            return value["accuracy"]
    return None


class HttpJudge:
    """The LLM judge behind an OpenAI-compatible chat-completions server: `judge(query, ground_truth, prediction)`
    -> `(accuracy or None when unparsable, reply text)`. Raises `ChatError` after `DEFAULT_TRIES` failed calls,
    which `crag_protocol.judge_turn` records as an error and scores as not correct (the kit does the same)."""

    def __init__(self, url: str, model: str, prompt: str, api_key: str | None = None, timeout: float = 60.0) -> None:
        self.client = ChatClient(url, api_key=api_key, timeout=timeout)
        self.model = model
        self.prompt = prompt

    @property
    def url(self) -> str:
        return self.client.url

    @property
    def api_key(self) -> str | None:
        return self.client.api_key

    def render(self, query: str, ground_truth: str, prediction: str) -> str:
        """The prompt with its three fields filled (str.replace: the template's JSON braces stay as written)."""
        return (
            self.prompt.replace("{question}", query)
            .replace("{ground_truth}", ground_truth)
            .replace("{prediction}", prediction)
        )

    def __call__(self, query: str, ground_truth: str, prediction: str) -> tuple[bool | None, str]:
        text, _ = self.client.complete({
            "model": self.model,
            "messages": [{"role": "user", "content": self.render(query, ground_truth, prediction)}],
            "temperature": 0,
        })  # fmt: skip
        return parse_accuracy(text), text


def _api_key(variable: str | None, flag: str) -> str | None:
    if not variable:
        return None
    key = os.environ.get(variable)
    if not key:
        raise ValueError(f"{flag} {variable}: that environment variable is not set.")
    return key


def make_judge(cfg: Any) -> HttpJudge | None:
    """The judge of `cfg` (None without --judge-url); a named key variable that is unset is an error now."""
    if not cfg.judge_url:
        return None
    api_key = _api_key(cfg.judge_api_key_env, "--judge-api-key-env")
    prompt = Path(cfg.judge_prompt or DEFAULT_JUDGE_PROMPT).read_text(encoding="utf-8")
    missing = [f for f in ("{question}", "{ground_truth}", "{prediction}") if f not in prompt]
    if missing:
        raise ValueError(f"judge prompt {cfg.judge_prompt or DEFAULT_JUDGE_PROMPT} lacks {', '.join(missing)}.")
    return HttpJudge(cfg.judge_url, cfg.judge_model, prompt, api_key, timeout=cfg.judge_timeout)


def make_agent(cfg: Any):
    """The OpenAI-compatible agent server of --agent-url."""
    from .crag_agent import HttpAgent

    api_key = _api_key(cfg.agent_api_key_env, "--agent-api-key-env")
    return HttpAgent(cfg.agent_url, cfg.agent_model, api_key=api_key, concurrency=cfg.concurrency)


def judge_all(judge: HttpJudge, asks: Mapping[str, tuple[str, str, str]], cache: ResultCache,
              concurrency: int) -> dict[str, Any]:  # fmt: skip
    """Every distinct (question, ground truth, prediction) judged, `concurrency` calls at a time: key -> (ok, raw)
    or the ChatError. Successful calls are cached (a resumed run skips them); failures are not."""
    from tqdm.auto import tqdm

    results: dict[str, Any] = {}
    todo = []
    for key, ask in asks.items():
        cached = cache.get("verdict", key)
        if cached is not None:
            results[key] = tuple(cached)
        else:
            todo.append((key, ask))
    lock = threading.Lock()

    def one(item: tuple[str, tuple[str, str, str]]) -> None:
        key, (query, gold, prediction) = item
        try:
            value: Any = judge(query, gold, prediction)
            cache.put("verdict", key, list(value))
        except ChatError as exc:
            value = exc
        with lock:
            results[key] = value
            bar.update(1)

    with tqdm(total=len(todo), desc="crag-mm judge", unit="call") as bar:
        bounded_map(one, todo, concurrency)
    return results


# --------------------------------------------------------------------------------------------- answers


def answer_tokenizer(cfg: Any, engine: Any) -> tuple[Any, str, int]:
    """(tokenizer, its name, special tokens it adds): --answer-tokenizer, else the model's own (a local model's
    processor, or --agent-model's tokenizer by name for a server). The special tokens count inside the budget, as
    in the kit (Llama-3.2's BOS takes one of the 75 places)."""
    from transformers import AutoTokenizer

    if cfg.answer_tokenizer or engine.processor is None:
        name = cfg.answer_tokenizer or cfg.agent_model
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"could not load the answer tokenizer {name!r} ({type(err).__name__}: {str(err)[:200]}); pass "
                "--answer-tokenizer NAME_OR_PATH (the official kit counts with meta-llama/Llama-3.2-1B-Instruct)."
            ) from None
    else:
        tokenizer = engine.processor.tokenizer
        name = str(getattr(tokenizer, "name_or_path", "") or cfg.model)
    reserved = len(tokenizer("")["input_ids"])
    return tokenizer, name, reserved


def _question_text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(i.get("text", "") for i in content if isinstance(i, dict) and i.get("type") == "text").strip()
    return str(content or "")


class Session:
    """One conversation being replayed: the messages, the history so far (the agent's own answers) and its turns."""

    def __init__(self, index: int, conversation: Mapping[str, Any], blank: bool) -> None:
        images = conversation.get("images") or []
        if blank:
            images = [Image.new("RGB", image.size, (128, 128, 128)) for image in images]
        self.messages = fill_images(conversation["messages"], images)
        self.tools = conversation.get("tools")
        meta = conversation.get("metadata") or {}
        self.session_id = meta.get("session_id") if meta.get("session_id") is not None else index
        self.is_ego = bool(meta.get("egocentric", not meta.get("image_url")))
        self.turn_meta = meta.get("turns") if isinstance(meta.get("turns"), list) else []
        self.history: list[dict[str, Any]] = []
        self.pos = 0
        self.turns: list[dict[str, Any]] = []

    def next_gold(self) -> str | None:
        """Moves the history up to the next assistant turn; its gold answer, or None when the session is done."""
        while self.pos < len(self.messages):
            message = self.messages[self.pos]
            self.pos += 1
            if message["role"] == "assistant":
                return message.get("content") or ""
            self.history.append(message)
        return None

    def record(self, gold: str, answer: str, truncated: str, finish_reason: Any, error: str | None = None) -> None:
        """Stores the turn and puts the agent's truncated answer into the history (what the next turn sees); an
        agent server's failed call is an empty answer with its `agent_error`."""
        index = len(self.turns)
        meta = self.turn_meta[index] if index < len(self.turn_meta) else {}
        self.turns.append({
            "session_id": self.session_id, "turn": index, "question": _question_text(self.history[-1]["content"]),
            "ground_truth": gold, "answer": answer, "truncated_answer": truncated, "is_ego": self.is_ego,
            "cut_at_max_new_tokens": finish_reason == "length", "agent_error": error,
            **{k: meta.get(k) for k in ("interaction_id", *GROUPS, "dynamism")},
        })  # fmt: skip
        self.history.append({"role": "assistant", "content": truncated})


def agent_identity(cfg: Any, engine: Any, image_settings: Mapping[str, Any]) -> dict[str, Any]:
    """What decides an answer besides its history: the agent (server and model, or checkpoint with its weight files'
    sizes and times, quantization, GGUF) and the generation settings. Part of every answer's cache key."""
    if cfg.agent_url:
        agent = {"url": engine.url, "model": cfg.agent_model}
    else:
        agent = {"model": cfg.model, "weights": weights_fingerprint(cfg.model), "quantize": cfg.quantize,
                 "gguf": cfg.gguf, "gguf_weights": weights_fingerprint(cfg.gguf)}  # fmt: skip
    return {**agent, "max_new_tokens": cfg.max_new_tokens, "image_settings": dict(image_settings),
            "blank_images": cfg.blank_images}  # fmt: skip


def generate_answers(cfg: Any, engine: Any, sessions: Sequence[Session], truncate, image_settings,
                     cache: ResultCache, identity: Mapping[str, Any]) -> None:  # fmt: skip
    """Turn k of every session in batches, then turn k+1: each history holds the agent's own truncated answers.
    Answers found in `cache` (same agent, same history) are not generated again; new ones are cached as they come,
    except an agent server's failed calls."""
    from tqdm.auto import tqdm

    history_digest = HistoryDigest()
    total = sum(sum(m["role"] == "assistant" for m in s.messages) for s in sessions)
    with tqdm(total=total, desc="crag-mm answers", unit="turn") as bar:
        pending = [(s, g) for s in sessions if (g := s.next_gold()) is not None]
        while pending:
            todo = []
            for session, gold in pending:
                key = digest([identity, session.tools, history_digest(session.history)])
                cached = cache.get("answer", key)
                if cached is None:
                    todo.append((session, gold, key))
                else:
                    session.record(gold, cached["text"], truncate(cached["text"]), cached.get("finish_reason"))
                    bar.update(1)
            for start in range(0, len(todo), cfg.batch_size):
                chunk = todo[start : start + cfg.batch_size]
                groups: dict[str, list[tuple[Session, str, str]]] = {}
                for item in chunk:
                    groups.setdefault(json.dumps(item[0].tools, sort_keys=True), []).append(item)
                for tools_key, group in groups.items():
                    completions = engine.complete_batch(
                        [list(s.history) for s, _, _ in group], tools=json.loads(tools_key), do_sample=False,
                        max_new_tokens=cfg.max_new_tokens, repetition_penalty=1.0, image_settings=image_settings,
                    )  # fmt: skip
                    for (session, gold, key), completion in zip(group, completions):
                        text = completion["text"]
                        if completion.get("finish_reason") != "error":
                            cache.put("answer", key, {"text": text, "finish_reason": completion.get("finish_reason")})
                        session.record(gold, text, truncate(text), completion.get("finish_reason"),
                                       completion.get("error"))  # fmt: skip
                bar.update(len(chunk))
            pending = [(s, g) for s, _ in pending if (g := s.next_gold()) is not None]


# --------------------------------------------------------------------------------------------- report


def format_crag_table(title: str, metrics: Mapping[str, Mapping[str, Any]]) -> str:
    """Fixed-width table: one row per group value with counts, rates (%) and the truthfulness score."""
    header = ["n", "correct", "missing", "halluc.", "early stop", "acc %", "halluc. %", "truthful.", "multi-turn"]

    def pct(v: Any) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    def num(v: Any) -> str:
        return "-" if v is None else f"{v:+.3f}"

    rows = [[str(name), str(m["n"]), str(m["correct"]), str(m["missing"]), str(m["hallucination"]),
             str(m["early_stop"]), pct(m["accuracy"]), pct(m["hallucination_rate"]), num(m["truthfulness"]),
             num(m["multi_turn_conversation_score"])] for name, m in metrics.items()]  # fmt: skip
    table = [[title, *header], *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in table]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def print_report(result: Mapping[str, Any]) -> None:
    """The overall line, one table per group, egocentric, and the no-judge caveat."""
    print(format_crag_table("crag-mm", {"overall": result["overall"], "egocentric": result["egocentric"]}))
    for group in GROUPS:
        print()
        print(format_crag_table(group, result[f"per_{group}"]))
    if result.get("note"):
        print(f"\nnote: {result['note']}")


def load_sessions(cfg: Any, report: Any) -> tuple[list[Session], list[str]]:
    """The sessions of `cfg.data` (up to --max-samples), less the kit's SESSIONS_TO_SKIP (returned by id)."""
    from ..data.formats import load_many

    sessions, skipped = [], []
    for n, conversation in enumerate(load_many(cfg.data, cfg.format, report=report)):
        if cfg.max_samples and n >= cfg.max_samples:
            break
        session = Session(n, conversation, cfg.blank_images)
        if str(session.session_id) in SESSIONS_TO_SKIP:
            skipped.append(str(session.session_id))
            continue
        sessions.append(session)
    return sessions, skipped


def judge_asks(sessions: Sequence[Session], judge: HttpJudge) -> dict[str, tuple[str, str, str]]:
    """The turns the judge must see (neither an exact match nor "I don't know"), keyed by their cache key."""
    identity = {"url": judge.url, "model": judge.model, "prompt": judge.prompt}
    asks = {}
    for session in sessions:
        for turn in session.turns:
            prediction = turn["truncated_answer"]
            if is_exact_match(prediction, turn["ground_truth"]) or is_missing(prediction):
                continue
            ask = (turn["question"], turn["ground_truth"], prediction)
            asks[digest([identity, *ask])] = ask
    return asks


def run_crag(cfg: Any, engine: Any, image_settings: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """Answers, judges and aggregates every session of `cfg.data`; writes `out` atomically and returns the result.

    Resumable: answers and verdicts go to `<out>.partial.jsonl` as they come, a rerun of the same command picks them
    up, and the file is removed once `out` is written."""
    from ..data.report import SkipReport
    from .crag_protocol import truncate_answer

    judge = make_judge(cfg)
    tokenizer, tokenizer_name, reserved = answer_tokenizer(cfg, engine)
    report = SkipReport()
    sessions, kit_skipped = load_sessions(cfg, report)
    cache = ResultCache(partial_path(out))
    if any(cache.loaded.values()):
        print(f"resuming from {cache.path}: {cache.loaded['answer']} answers, {cache.loaded['verdict']} verdicts")

    def truncate(text: str) -> str:
        return truncate_answer(text, tokenizer, cfg.max_answer_tokens, reserved)

    generate_answers(cfg, engine, sessions, truncate, dict(image_settings), cache,
                     agent_identity(cfg, engine, image_settings))  # fmt: skip
    verdicts: dict[str, Any] = {}
    asks: dict[str, tuple[str, str, str]] = {}
    if judge is not None:
        asks = judge_asks(sessions, judge)
        verdicts = judge_all(judge, asks, cache, cfg.concurrency)
    by_ask = {ask: verdicts[key] for key, ask in asks.items()}

    def judged(query: str, ground_truth: str, prediction: str) -> tuple[bool | None, str]:
        value = by_ask[(query, ground_truth, prediction)]
        if isinstance(value, Exception):
            raise value
        return value

    records: list[dict[str, Any]] = []
    for session in sessions:
        records.extend(score_session(session.turns, judged if judge else None, tokenizer, cfg.max_answer_tokens,
                                     reserved))  # fmt: skip
    judge_errors = sum(isinstance(v, Exception) for v in verdicts.values())
    agent_errors = sum(bool(r.get("agent_error")) for r in records)
    result: dict[str, Any] = {
        "protocol": "crag-mm",
        "judge": None if judge is None else {"url": judge.url, "model": judge.model,
                                             "prompt_file": str(cfg.judge_prompt or DEFAULT_JUDGE_PROMPT)},
        "agent": {"url": engine.url, "model": cfg.agent_model} if cfg.agent_url else {"model": cfg.model},
        "note": NO_JUDGE_NOTE if judge is None else None,
        "answer_tokenizer": tokenizer_name,
        "reserved_special_tokens": reserved,
        "max_answer_tokens": cfg.max_answer_tokens,
        "early_stop_as_missing": cfg.early_stop_as_missing,
        **aggregate(records, groups=GROUPS, count_early_stop_as_missing=cfg.early_stop_as_missing),
        "cut_at_max_new_tokens": sum(r["cut_at_max_new_tokens"] for r in records),
        "judge_calls": len(asks),
        "judge_errors": judge_errors,
        "agent_errors": agent_errors,
        "resumed": dict(cache.hits),
        "kit_skipped_sessions": kit_skipped,
        "skipped": report.to_dict(),
        "config": asdict(cfg),
        "turns": records,
    }  # fmt: skip
    write_json_atomic(out, result)
    failed = judge_errors + agent_errors
    cache.close(remove=not failed)  # kept after failures: the same command then retries only those calls
    print_report(result)
    for count, what in ((judge_errors, "judge calls failed every try (scored as not correct)"),
                        (agent_errors, "agent calls failed every try (scored as empty answers)")):  # fmt: skip
        if count:
            print(f"warning: {count} {what}; the rest is kept in {cache.path}: rerun the same command to retry "
                  "only the failed calls")
    print(f"results: {out}")
    return result
