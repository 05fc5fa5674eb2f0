"""`n2eye eval`: answer every assistant turn of held-out conversations and score it per question type.

Each turn is asked with the dataset's own history before it (earlier gold answers, tool responses), through the
same `n2eye.load(...).generate_batch` path as inference, greedy. `--blank-images` replaces every image with
uniform grey: the score that remains is what text priors alone can do. `--protocol crag-mm` runs the CRAG-MM
truthfulness protocol instead (`crag_runner`: the model's own truncated answers as history, optional LLM judge).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from ..data.collate import fill_images
from ..data.format_names import FORMATS
from ..image_settings import ImageOptions, checked_image_settings
from .scoring import aggregate, format_table, score_turn

PROTOCOLS = ("exact", "crag-mm")


@dataclass(kw_only=True)
class EvalConfig(ImageOptions):
    """Options of `n2eye eval`."""

    model: str | None = None
    """Checkpoint folder (or hub id); required unless --agent-url names a server to evaluate instead."""
    data: str
    """Held-out SPEC (file, folder or hub dataset, optional :split)."""
    out: str
    """Result JSON: per-type scores, overall, and every prediction."""
    format: str = "auto"
    """Data format: auto, cragmm, messages, llava, cauldron or sharegpt."""
    batch_size: int = 16
    """Turns generated together."""
    max_new_tokens: int = 256
    """Longest answer; an answer cut here scores as written (usually 0) and is counted as cut in the result."""
    max_samples: int = 0
    """Evaluate only the first N conversations (0: all)."""
    blank_images: bool = False
    """Replace every image with uniform grey (the text-prior baseline)."""
    quantize: str | None = None
    """Evaluate the model with weight-only int8 or int4 language-model layers (what quantization costs)."""
    trust_remote_code: bool = False
    """Run the checkpoint's own code when it differs from the installed n2eye's (only for checkpoints you trust)."""
    gguf: str | None = None
    """Evaluate this checkpoint's GGUF export (a `n2eye convert --to gguf` folder) through llama.cpp instead:
    llama.cpp renders, tokenizes and sees each prompt; answers are greedy and scored as N2-Eye's are."""
    protocol: str = "exact"
    """Scoring: exact (per-type exact match, history from the dataset) or crag-mm (the CRAG-MM truthfulness
    protocol: the model's own truncated answers as history, exact match / "I don't know" / optional LLM judge,
    early stop, truthfulness per domain, query category, image quality and egocentric)."""
    judge_url: str | None = None
    """crag-mm: OpenAI-compatible server of the LLM judge (base URL or .../v1/chat/completions). Without it only
    exact match counts as correct, so hallucinations are an upper bound."""
    judge_model: str | None = None
    """crag-mm: the judge's model name (required with --judge-url)."""
    judge_api_key_env: str | None = None
    """crag-mm: NAME of the environment variable holding the judge's API key (the key itself never goes in flags)."""
    judge_prompt: str | None = None
    """crag-mm: judge prompt file with {question}, {ground_truth} and {prediction}; default: the shipped one."""
    max_answer_tokens: int = 75
    """crag-mm: answers are cut to this many tokens (special tokens included) before judging and as history."""
    answer_tokenizer: str | None = None
    """crag-mm: tokenizer (name or path) that counts --max-answer-tokens; default: the model's own (the official kit
    uses meta-llama/Llama-3.2-1B-Instruct; with --agent-url: --agent-model's tokenizer)."""
    agent_url: str | None = None
    """crag-mm: evaluate this OpenAI-compatible chat server (vLLM, llama.cpp's llama-server, n2eye serve, a hosted
    API) instead of a local --model: images sent as data URIs, history as the protocol says, greedy."""
    agent_model: str | None = None
    """crag-mm: the model name the --agent-url server should run (required with --agent-url)."""
    agent_api_key_env: str | None = None
    """crag-mm: NAME of the environment variable holding the agent server's API key."""
    concurrency: int = 8
    """crag-mm: requests in flight at once to the judge (and to --agent-url); each is retried up to 3 times."""
    judge_timeout: float = 60.0
    """crag-mm: seconds before a judge call is given up (then retried, then counted as not correct)."""
    early_stop_as_missing: bool = False
    """crag-mm: also count the turns after an early stop as missing in the counts and truthfulness (the reading of
    the CRAG-MM paper); default: the official kit's arithmetic, which applies the early stop to the multi-turn
    conversation score only. Both are in every result's turn records."""

    def __post_init__(self) -> None:
        """Refuses option combinations that would silently be ignored."""
        if self.format not in ("auto", *FORMATS):
            raise ValueError(f"--format must be one of auto, {', '.join(FORMATS)}; got {self.format!r}.")
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"Unknown --protocol {self.protocol!r}; choose one of: {', '.join(PROTOCOLS)}.")
        crag_only = {"judge_url": self.judge_url, "judge_model": self.judge_model,
                     "judge_api_key_env": self.judge_api_key_env, "judge_prompt": self.judge_prompt,
                     "answer_tokenizer": self.answer_tokenizer, "agent_url": self.agent_url,
                     "agent_model": self.agent_model, "agent_api_key_env": self.agent_api_key_env}  # fmt: skip
        given = [f"--{k.replace('_', '-')}" for k, v in crag_only.items() if v is not None]
        changed = {"max_answer_tokens": 75, "concurrency": 8, "judge_timeout": 60.0, "early_stop_as_missing": False}
        given += [f"--{k.replace('_', '-')}" for k, default in changed.items() if getattr(self, k) != default]
        if self.protocol != "crag-mm" and given:
            raise ValueError(f"{', '.join(given)} only apply to --protocol crag-mm (got --protocol {self.protocol}).")
        if self.judge_url and not self.judge_model:
            raise ValueError("--judge-url needs --judge-model (the model name the judge server should run).")
        if not self.judge_url and (self.judge_model or self.judge_api_key_env):
            raise ValueError("--judge-model and --judge-api-key-env need --judge-url (where the judge runs).")
        if self.max_answer_tokens < 2:
            raise ValueError(f"--max-answer-tokens must be at least 2, got {self.max_answer_tokens}.")
        if self.judge_prompt is not None and not Path(self.judge_prompt).is_file():
            raise ValueError(f"--judge-prompt {self.judge_prompt} is not a file.")
        if self.concurrency < 1 or self.judge_timeout <= 0:
            raise ValueError("--concurrency must be at least 1 and --judge-timeout above 0.")
        self._check_agent()

    def _check_agent(self) -> None:
        """A server (--agent-url) or a local checkpoint (--model), and only the flags that apply to it."""
        if self.agent_url is None:
            if self.agent_model or self.agent_api_key_env:
                raise ValueError("--agent-model and --agent-api-key-env need --agent-url (the server to evaluate).")
            if not self.model:
                raise ValueError("Missing required option(s): --model (or --agent-url with --protocol crag-mm).")
            return
        if not self.agent_model:
            raise ValueError("--agent-url needs --agent-model (the model name the server should run).")
        local = {"--model": self.model, "--quantize": self.quantize, "--gguf": self.gguf,
                 "--trust-remote-code": self.trust_remote_code or None, **{
                     f"--{k.replace('_', '-').replace('do-', '')}": v for k, v in self.image_settings().items()}}  # fmt: skip
        given = [flag for flag, value in local.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to a local model, not to --agent-url (the server runs its own "
                             "model with its own image settings).")  # fmt: skip


def question_type(conversation: dict, turn_index: int) -> str:
    """The question type of the `turn_index`-th user turn, from the dataset's metadata (CRAG-MM per-turn labels,
    a `qtypes` list / `qtype` in a messages row's metadata, or the Cauldron's per-turn `source` as `qtypes`)."""
    meta = conversation.get("metadata") or {}
    turns = meta.get("turns")
    if isinstance(turns, list) and turn_index < len(turns):
        turn = turns[turn_index] or {}
        return str(turn.get("qtype") or turn.get("query_category") or "all")
    qtypes = meta.get("qtypes")
    if isinstance(qtypes, list) and turn_index < len(qtypes):
        return str(qtypes[turn_index])
    return str(meta.get("qtype") or "all")


def turn_requests(conversation: dict, blank: bool = False) -> list[dict[str, Any]]:
    """One request per assistant turn: the history before it, the reference answer (or tool calls), the type."""
    images = conversation.get("images") or []
    if blank:
        images = [Image.new("RGB", image.size, (128, 128, 128)) for image in images]
    messages = fill_images(conversation["messages"], images)
    requests, user_turn = [], -1
    for index, message in enumerate(messages):
        if message["role"] == "user":
            user_turn += 1
        if message["role"] != "assistant":
            continue
        if message.get("tool_calls"):
            qtype = "tool_call"
        elif index and messages[index - 1]["role"] == "tool":
            qtype = "tool_answer"  # the answer written from a tool's result
        else:
            qtype = question_type(conversation, max(user_turn, 0))
        requests.append(
            {
                "history": messages[:index],
                "reference": message.get("content") or "",
                "reference_tool_calls": message.get("tool_calls"),
                "qtype": qtype,
                "tools": conversation.get("tools"),
            }
        )
    return requests


def _llamacpp_engine(cfg: EvalConfig):
    """llama.cpp on the GGUF export, with the checkpoint's processor for decoding and image items."""
    from ..infer.llamacpp import LlamaCppEngine
    from ..modeling.processing_n2eye import N2EyeProcessor

    if cfg.quantize:
        raise ValueError("--quantize applies to N2-Eye's engine; a GGUF export carries its own format (--quant).")
    return LlamaCppEngine(cfg.gguf, N2EyeProcessor.from_pretrained(cfg.model, trust_remote_code=True))  # our class


def evaluate(cfg: EvalConfig, engine=None) -> dict[str, Any]:
    """Runs the evaluation, writes cfg.out (JSON) and returns the result."""
    from tqdm.auto import tqdm

    from ..checkpoint import check_file_writable, write_json_atomic
    from ..data.formats import load_many
    from ..data.report import SkipReport
    from ..infer.engine import load

    out = check_file_writable(cfg.out)  # fail now, not after the long part
    if cfg.agent_url:
        from .crag_runner import make_agent, run_crag

        return run_crag(cfg, engine or make_agent(cfg), {}, out)
    if engine is None and cfg.gguf:
        engine = _llamacpp_engine(cfg)
    engine = engine or load(cfg.model, quantize=cfg.quantize, trust_remote_code=cfg.trust_remote_code)
    image_settings = checked_image_settings(engine.processor, cfg.image_settings())
    if cfg.protocol == "crag-mm":
        from .crag_runner import run_crag

        return recorded(cfg, run_crag(cfg, engine, image_settings, out), out)
    report = SkipReport()
    requests = []
    for n, conversation in enumerate(load_many(cfg.data, cfg.format, report=report)):
        if cfg.max_samples and n >= cfg.max_samples:
            break
        for request in turn_requests(conversation, blank=cfg.blank_images):
            request["conversation"] = n
            requests.append(request)
    records = []
    with tqdm(total=len(requests), desc="eval" + (" (blank images)" if cfg.blank_images else ""), unit="turn") as bar:
        # group by tool list: one generate call shares one system prompt layout
        for start in range(0, len(requests), cfg.batch_size):
            chunk = requests[start : start + cfg.batch_size]
            groups: dict[str, list[dict]] = {}
            for request in chunk:
                groups.setdefault(json.dumps(request["tools"], sort_keys=True), []).append(request)
            for tools_key, group in groups.items():
                completions = engine.complete_batch(
                    [r["history"] for r in group],
                    tools=json.loads(tools_key),
                    do_sample=False,
                    max_new_tokens=cfg.max_new_tokens,
                    repetition_penalty=1.0,
                    image_settings=image_settings,
                )
                for request, completion in zip(group, completions):
                    prediction = completion["text"]
                    scored = score_turn(prediction, request["reference"], request["qtype"], request["reference_tool_calls"])
                    question = request["history"][-1]["content"]
                    if isinstance(question, list):
                        question = " ".join(i.get("text", "<image>") for i in question if isinstance(i, dict))
                    records.append({"conversation": request["conversation"], "question": question,
                                    "reference": request["reference"], "prediction": prediction,
                                    "cut_at_max_new_tokens": completion["finish_reason"] == "length", **scored})  # fmt: skip
            bar.update(len(chunk))
    summary = aggregate(records) if records else {"per_type": {}, "overall": None, "macro": None, "n": 0}
    cut = sum(r["cut_at_max_new_tokens"] for r in records)
    result = {"config": asdict(cfg), **summary, "cut_at_max_new_tokens": cut, "skipped": report.to_dict(),
              "predictions": records}
    write_json_atomic(out, result)
    print(format_table(summary["per_type"]))
    if cut:
        print(f"warning: {cut} of {len(records)} answers were cut at --max-new-tokens {cfg.max_new_tokens} (scored as "
              "written, usually 0); raise --max-new-tokens if the references are longer")
    print(f"results: {out}")
    return recorded(cfg, result, out)


def recorded(cfg: EvalConfig, result: dict[str, Any], out: Path) -> dict[str, Any]:
    """Keeps the result as the evaluated folder's latest eval and re-renders its model card (`model_card`): the
    checkpoint's, or with --gguf the GGUF export's (what was measured); a remote agent (--agent-url) has no folder
    here. Never fails the eval."""
    from ..model_card import record_eval

    if not getattr(cfg, "agent_url", None):
        record_eval(cfg.gguf or cfg.model, result, out)
    return result
