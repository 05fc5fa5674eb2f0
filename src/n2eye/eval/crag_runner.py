"""`n2eye eval --protocol crag-mm`: the CRAG-MM truthfulness protocol run end to end on a model.

Why a separate runner: the exact-match eval asks every turn with the dataset's gold history, while CRAG-MM asks
turn by turn with the agent's OWN earlier answers, each cut to `--max-answer-tokens`, as the history (what the
official kit does). Turn k of every session is generated in one batch, then turn k+1, so sessions still batch.
Verdicts, the early stop and the aggregates come from `crag_protocol` (pure scoring); this module only produces
the answers, talks to the judge and writes the result.

The judge is asked sequentially, one request at a time (bounded concurrency is a later step).
"""

from __future__ import annotations

import json
import os
import re
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.collate import fill_images
from .crag_protocol import aggregate, score_session

DEFAULT_JUDGE_PROMPT = Path(__file__).with_name("crag_judge_prompt.txt")
JUDGE_TIMEOUT_S = 60.0
JUDGE_TRIES = 3
"""Tries per judge call (the kit also gives up after 3); a call that fails them all leaves the turn not correct."""
JUDGE_BACKOFF_S = 1.0
"""Wait before the 2nd try; doubled before each later one."""
NO_JUDGE_NOTE = (
    "no judge (--judge-url): only exact match counts as correct, so accuracy is a lower bound and the "
    "hallucination count an upper bound"
)
GROUPS = ("domain", "query_category", "image_quality")
_JSON_OBJECT = re.compile(r"\{.*?\}", re.DOTALL)


# --------------------------------------------------------------------------------------------- judge


def chat_completions_url(url: str) -> str:
    """A base URL (`http://host:8000`, `.../v1`) or the full endpoint, as the `/v1/chat/completions` endpoint."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


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
    -> `(accuracy or None when unparsable, reply text)`. Raises after `JUDGE_TRIES` failed calls, which
    `crag_protocol.judge_turn` records as an error and scores as not correct."""

    def __init__(self, url: str, model: str, prompt: str, api_key: str | None = None,
                 timeout: float = JUDGE_TIMEOUT_S) -> None:  # fmt: skip
        self.url = chat_completions_url(url)
        self.model = model
        self.prompt = prompt
        self.api_key = api_key
        self.timeout = timeout

    def render(self, query: str, ground_truth: str, prediction: str) -> str:
        """The prompt with its three fields filled (str.replace: the template's JSON braces stay as written)."""
        return (
            self.prompt.replace("{question}", query)
            .replace("{ground_truth}", ground_truth)
            .replace("{prediction}", prediction)
        )

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            reply = json.loads(response.read().decode("utf-8"))
        content = reply["choices"][0]["message"]["content"]
        if not isinstance(content, str):
            raise TypeError(f"the judge's message content is a {type(content).__name__}, not text")
        return content

    def __call__(self, query: str, ground_truth: str, prediction: str) -> tuple[bool | None, str]:
        body = json.dumps({
            "model": self.model,
            "messages": [{"role": "user", "content": self.render(query, ground_truth, prediction)}],
            "temperature": 0,
        }).encode("utf-8")  # fmt: skip
        error: Exception | None = None
        for attempt in range(JUDGE_TRIES):
            if attempt:
                time.sleep(JUDGE_BACKOFF_S * 2 ** (attempt - 1))
            try:
                text = self._post(body)
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
                error = exc
                continue
            return parse_accuracy(text), text
        raise RuntimeError(f"judge at {self.url} failed {JUDGE_TRIES} times, last: {type(error).__name__}: {error}")


def make_judge(cfg: Any) -> HttpJudge | None:
    """The judge of `cfg` (None without --judge-url); a named key variable that is unset is an error now."""
    if not cfg.judge_url:
        return None
    api_key = None
    if cfg.judge_api_key_env:
        api_key = os.environ.get(cfg.judge_api_key_env)
        if not api_key:
            raise ValueError(f"--judge-api-key-env {cfg.judge_api_key_env}: that environment variable is not set.")
    prompt = Path(cfg.judge_prompt or DEFAULT_JUDGE_PROMPT).read_text(encoding="utf-8")
    missing = [f for f in ("{question}", "{ground_truth}", "{prediction}") if f not in prompt]
    if missing:
        raise ValueError(f"judge prompt {cfg.judge_prompt or DEFAULT_JUDGE_PROMPT} lacks {', '.join(missing)}.")
    return HttpJudge(cfg.judge_url, cfg.judge_model, prompt, api_key)


# --------------------------------------------------------------------------------------------- answers


def answer_tokenizer(cfg: Any, engine: Any) -> tuple[Any, str, int]:
    """(tokenizer, its name, special tokens it adds): --answer-tokenizer, else the model's own. The special tokens
    count inside the budget, as in the kit (Llama-3.2's BOS takes one of the 75 places)."""
    if cfg.answer_tokenizer:
        from transformers import AutoTokenizer

        tokenizer, name = AutoTokenizer.from_pretrained(cfg.answer_tokenizer), cfg.answer_tokenizer
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

    def record(self, gold: str, answer: str, truncated: str, finish_reason: Any) -> None:
        """Stores the turn and puts the agent's truncated answer into the history (what the next turn sees)."""
        index = len(self.turns)
        meta = self.turn_meta[index] if index < len(self.turn_meta) else {}
        self.turns.append({
            "session_id": self.session_id, "turn": index, "question": _question_text(self.history[-1]["content"]),
            "ground_truth": gold, "answer": answer, "is_ego": self.is_ego,
            "cut_at_max_new_tokens": finish_reason == "length",
            **{k: meta.get(k) for k in ("interaction_id", *GROUPS, "dynamism")},
        })  # fmt: skip
        self.history.append({"role": "assistant", "content": truncated})


def generate_answers(cfg: Any, engine: Any, sessions: Sequence[Session], truncate, image_settings) -> None:
    """Turn k of every session in batches, then turn k+1: each history holds the agent's own truncated answers."""
    from tqdm.auto import tqdm

    total = sum(sum(m["role"] == "assistant" for m in s.messages) for s in sessions)
    with tqdm(total=total, desc="crag-mm answers", unit="turn") as bar:
        pending = [(s, g) for s in sessions if (g := s.next_gold()) is not None]
        while pending:
            for start in range(0, len(pending), cfg.batch_size):
                chunk = pending[start : start + cfg.batch_size]
                groups: dict[str, list[tuple[Session, str]]] = {}
                for session, gold in chunk:
                    groups.setdefault(json.dumps(session.tools, sort_keys=True), []).append((session, gold))
                for tools_key, group in groups.items():
                    completions = engine.complete_batch(
                        [list(s.history) for s, _ in group], tools=json.loads(tools_key), do_sample=False,
                        max_new_tokens=cfg.max_new_tokens, repetition_penalty=1.0, image_settings=image_settings,
                    )  # fmt: skip
                    for (session, gold), completion in zip(group, completions):
                        text = completion["text"]
                        session.record(gold, text, truncate(text), completion.get("finish_reason"))
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


def run_crag(cfg: Any, engine: Any, image_settings: Mapping[str, Any], out: Path) -> dict[str, Any]:
    """Answers, judges and aggregates every session of `cfg.data`; writes `out` atomically and returns the result."""
    from tqdm.auto import tqdm

    from ..data.formats import load_many
    from ..data.report import SkipReport
    from .crag_protocol import truncate_answer

    judge = make_judge(cfg)
    tokenizer, tokenizer_name, reserved = answer_tokenizer(cfg, engine)
    report = SkipReport()
    sessions = []
    for n, conversation in enumerate(load_many(cfg.data, cfg.format, report=report)):
        if cfg.max_samples and n >= cfg.max_samples:
            break
        sessions.append(Session(n, conversation, cfg.blank_images))

    def truncate(text: str) -> str:
        return truncate_answer(text, tokenizer, cfg.max_answer_tokens, reserved)

    generate_answers(cfg, engine, sessions, truncate, dict(image_settings))
    records: list[dict[str, Any]] = []
    with tqdm(total=sum(len(s.turns) for s in sessions), desc="crag-mm verdicts", unit="turn") as bar:
        for session in sessions:
            records.extend(score_session(session.turns, judge, tokenizer, cfg.max_answer_tokens, reserved))
            bar.update(len(session.turns))
    result: dict[str, Any] = {
        "protocol": "crag-mm",
        "judge": None if judge is None else {"url": judge.url, "model": judge.model,
                                             "prompt_file": str(cfg.judge_prompt or DEFAULT_JUDGE_PROMPT)},
        "note": NO_JUDGE_NOTE if judge is None else None,
        "answer_tokenizer": tokenizer_name,
        "reserved_special_tokens": reserved,
        "max_answer_tokens": cfg.max_answer_tokens,
        **aggregate(records, groups=GROUPS),
        "cut_at_max_new_tokens": sum(r["cut_at_max_new_tokens"] for r in records),
        "skipped": report.to_dict(),
        "config": asdict(cfg),
        "turns": records,
    }  # fmt: skip
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(out)
    print_report(result)
    print(f"results: {out}")
    return result
