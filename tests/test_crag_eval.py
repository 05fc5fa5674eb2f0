"""`n2eye eval --protocol crag-mm`: a scripted agent, a scripted judge server, and hand-computed verdicts.

The agent is a stand-in engine (the tiny checkpoint's real processor, scripted answers per question) that records
every history it was asked with; the judge and the web image come from one 127.0.0.1 http.server thread.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

import datasets
import pytest
from datasets import Features, List, Sequence, Value
from datasets import Image as ImageFeature
from PIL import Image

from n2eye.eval import crag_protocol, crag_runner, openai_client
from n2eye.eval.runner import EvalConfig, evaluate

LONG = "MADE2019 " + "and then it was painted again " * 40
# (session, image source, domain, category, quality, [(question, gold, scripted answer)])
SESSIONS = [
    ("s1", "ego", "vehicle", "simple", "normal", [
        ("What brand is the car?", "Toyota", "toyota"),  # exact match (case-insensitive)
        ("What year was it made?", "2019", LONG),  # judged on its truncation: true
        ("How fast can it go?", "200 km/h", "I don't know."),  # missing
    ]),
    ("s2", "web", "plants", "comparison", "low", [
        ("What flower is this?", "A rose", "a tulip"),  # judge: false
        ("What colour is it?", "red", "GARBAGE colour"),  # judge replies prose -> unparsable
        ("Where does it grow?", "gardens", "in gardens"),  # judge: true, but early-stopped
    ]),
    ("s3", "ego", "food", "simple", "normal", [
        ("What dish is this?", "pizza", "ERROR500 dish"),  # judge answers HTTP 500 every time
        ("Is it hot?", "yes", "Yes"),  # exact match
    ]),
]  # fmt: skip
SCRIPT = {q: a for *_, turns in SESSIONS for q, _, a in turns}


def png(color) -> bytes:
    buffer = BytesIO()
    Image.new("RGB", (32, 24), color).save(buffer, format="PNG")
    return buffer.getvalue()


class Server:
    """GET /<name>.png serves the web image; POST /v1/chat/completions is the scripted judge (records prompts, keeps
    the most calls it had in flight at once, answers HTTP 500 to prompts holding a marker of `broken`, stalls on
    SLOW); POST /agent/v1/chat/completions is a scripted OpenAI-compatible agent (answers from SCRIPT, records
    requests, 500 on AGENTFAIL)."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        self.agent_requests: list[dict] = []
        self.broken = {"ERROR500"}
        self.delay = 0.0
        self.inflight = self.max_inflight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                self.reply(200, png((0, 200, 0)), "image/png")

            def reply(self, code, body=b"", kind="application/json"):
                self.send_response(code)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def answer(self, text):
                message = {"role": "assistant", "content": text}
                self.reply(200, json.dumps({"choices": [{"message": message, "finish_reason": "stop"}]}).encode())

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path.startswith("/agent/"):
                    server.agent_requests.append(request)
                    question = request["messages"][-1]["content"][-1]["text"]
                    if "AGENTFAIL" in question:
                        return self.reply(500)
                    return self.answer(SCRIPT[question])
                prompt = request["messages"][-1]["content"]
                with server.lock:
                    server.prompts.append(prompt)
                    server.inflight += 1
                    server.max_inflight = max(server.max_inflight, server.inflight)
                try:
                    time.sleep(server.delay + (2.0 if "SLOW" in prompt else 0.0))
                    if any(marker in prompt for marker in server.broken):
                        return self.reply(500)
                    if "GARBAGE" in prompt:
                        return self.answer("I think it is probably right.")
                    if "MADE2019" in prompt or "in gardens" in prompt:
                        return self.answer('Sure: ```json\n{"accuracy": true}\n```')
                    return self.answer('{"accuracy": false}')
                finally:
                    with server.lock:
                        server.inflight -= 1

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.handle_error = lambda *args: None  # a client that timed out and left: expected here
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(openai_client, "DEFAULT_BACKOFF_S", 0.01)
    srv = Server()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


def write_crag(tmp_path, base: str, sessions=SESSIONS, layout: str = "v0.1.2"):
    """CRAG-MM as published: v0.1.2 (turns/answers dicts of lists, image_quality per turn) as parquet, or v0.1.1
    (lists of dicts, image_quality on the row) as a saved dataset. Egocentric sessions embed their image, web ones
    have an image_url on the local server."""
    names = ("interaction_id", "query", "domain", "query_category", "dynamism")
    turn = {k: Value("string") for k in names + (("image_quality",) if layout == "v0.1.2" else ())}
    answer = {"interaction_id": Value("string"), "ans_full": Value("string")}
    columns = {"session_id": Value("string"), "image": ImageFeature(), "image_url": Value("string")}
    if layout == "v0.1.2":
        features = Features({**columns, "turns": Sequence(turn), "answers": Sequence(answer)})
    else:
        features = Features({**columns, "image_quality": Value("string"), "turns": List(turn), "answers": List(answer)})
    rows = []
    for sid, source, domain, category, quality, turns in sessions:
        ids = [f"{sid}-t{i}" for i in range(len(turns))]
        row = {"session_id": sid,
               "image": Image.open(BytesIO(png((200, 0, 0)))) if source == "ego" else None,
               "image_url": f"{base}/{sid}.png" if source == "web" else None}  # fmt: skip
        labels = {"domain": domain, "query_category": category, "dynamism": "static"}
        if layout == "v0.1.2":
            labels["image_quality"] = quality
            row["turns"] = {"interaction_id": ids, "query": [t[0] for t in turns],
                            **{k: [v] * len(turns) for k, v in labels.items()}}  # fmt: skip
            row["answers"] = {"interaction_id": ids, "ans_full": [t[1] for t in turns]}
        else:
            row["image_quality"] = quality
            row["turns"] = [{"interaction_id": i, "query": t[0], **labels} for i, t in zip(ids, turns)]
            row["answers"] = [{"interaction_id": i, "ans_full": t[1]} for i, t in reversed(list(zip(ids, turns)))]
        rows.append(row)
    dataset = datasets.Dataset.from_list(rows, features=features)
    if layout == "v0.1.2":
        path = tmp_path / "crag.parquet"
        dataset.to_parquet(str(path))
    else:
        path = tmp_path / "crag-saved"
        dataset.save_to_disk(str(path))
    return path


@pytest.fixture(params=["v0.1.2", "v0.1.1"])
def crag_data(server, tmp_path, request):
    """Both CRAG-MM layouts: s1, s3 egocentric (embedded), s2 a web image_url."""
    return write_crag(tmp_path, server.base, layout=request.param)


class ScriptedEngine:
    """Answers each question from SCRIPT; keeps every history it was asked with (a copy of each message)."""

    def __init__(self, processor) -> None:
        self.processor = processor
        self.histories: list[list[dict]] = []

    def complete_batch(self, histories, **kwargs):
        assert kwargs["do_sample"] is False
        out = []
        for history in histories:
            self.histories.append([dict(m) for m in history])
            question = " ".join(i["text"] for i in history[-1]["content"] if i.get("type") == "text")
            out.append({"text": SCRIPT[question], "finish_reason": "stop"})
        return out


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    from n2eye.modeling.processing_n2eye import N2EyeProcessor

    return N2EyeProcessor.from_pretrained(str(tiny_checkpoint), trust_remote_code=True)


def by_turn(result) -> dict[tuple[str, int], dict]:
    return {(r["session_id"], r["turn"]): r for r in result["turns"]}


def test_crag_mm_with_a_judge(server, crag_data, processor, tmp_path, capsys):
    engine = ScriptedEngine(processor)
    cfg = EvalConfig(model="unused", data=str(crag_data), out=str(tmp_path / "r.json"), format="cragmm",
                     protocol="crag-mm", judge_url=server.base, judge_model="judge-1", max_answer_tokens=13)  # fmt: skip
    result = evaluate(cfg, engine=engine)
    assert json.loads((tmp_path / "r.json").read_text())["overall"] == result["overall"]
    turns = by_turn(result)

    # truncation: 13 tokens including the special tokens the tokenizer adds; the judge and the history see it cut
    tokenizer = processor.tokenizer
    reserved = result["reserved_special_tokens"]
    assert reserved == len(tokenizer("")["input_ids"])
    cut = turns[("s1", 1)]["truncated_answer"]
    assert cut.startswith("MADE2019") and len(cut) < len(LONG)
    assert len(tokenizer.encode(cut, add_special_tokens=False)) <= 13 - reserved
    assert result["max_answer_tokens"] == 13 and result["answer_tokenizer"]

    # the history of each turn holds the agent's own truncated answers, not the gold ones
    asked = {h[-1]["content"][-1]["text"]: h for h in engine.histories}
    third = asked["How fast can it go?"]
    assert [m["content"] for m in third if m["role"] == "assistant"] == ["toyota", cut]
    assert isinstance(third[0]["content"][0]["image"], Image.Image)  # the image stays in the first user turn
    assert [m["content"] for m in asked["Where does it grow?"] if m["role"] == "assistant"] == ["a tulip", "GARBAGE colour"]

    verdicts = {k: (r["judged_verdict"], r["verdict"]) for k, r in turns.items()}
    assert verdicts == {
        ("s1", 0): ("correct", "correct"), ("s1", 1): ("correct", "correct"), ("s1", 2): ("missing", "missing"),
        ("s2", 0): ("hallucination", "hallucination"), ("s2", 1): ("hallucination", "hallucination"),
        ("s2", 2): ("correct", "early_stop"),
        ("s3", 0): ("hallucination", "hallucination"), ("s3", 1): ("correct", "correct"),
    }  # fmt: skip
    assert turns[("s1", 0)]["judge_raw"] is None and turns[("s3", 1)]["judge_raw"] is None  # exact: not asked
    assert turns[("s1", 1)]["judge_raw"].startswith("Sure:")
    assert turns[("s2", 1)]["judge_raw"] == "I think it is probably right."
    assert turns[("s3", 0)]["judge_raw"].startswith("error: ChatError") and "500" in turns[("s3", 0)]["judge_raw"]
    # asked: s1 t1, s2 t0..t2 once each, s3 t0 three times (HTTP 500); never for exact matches or "I don't know"
    assert len(server.prompts) == 7 and sum("ERROR500" in p for p in server.prompts) == 3
    judged_long = next(p for p in server.prompts if "MADE2019" in p)
    assert "Ground truth: 2019" in judged_long and f"Prediction: {cut}\n" in judged_long and LONG not in judged_long

    # by hand (the kit's arithmetic: counts before the early stop): 8 turns, 4 correct, 1 missing, 3 hallucinated
    overall = result["overall"]
    assert (overall["n"], overall["correct"], overall["missing"], overall["hallucination"]) == (8, 4, 1, 3)
    assert overall["early_stop"] == 1 and overall["exact_match"] == 2 and overall["sessions"] == 3
    assert overall["accuracy"] == pytest.approx(0.5) and overall["truthfulness"] == pytest.approx(9 / 8 - 1)
    # sessions: s1 2/3 - 0, s2 0 - 2/3 (h, h, early stop), s3 1/2 - 1/2 -> mean 0
    assert overall["multi_turn_conversation_score"] == pytest.approx(0.0)
    ego = result["egocentric"]  # s1 + s3
    assert (ego["n"], ego["correct"], ego["missing"], ego["hallucination"]) == (5, 3, 1, 1)
    assert set(result["per_domain"]) == {"vehicle", "plants", "food"}
    assert result["per_query_category"]["simple"]["n"] == 5 and result["per_image_quality"]["low"]["n"] == 3
    assert result["judge"] == {"url": server.base + "/v1/chat/completions", "model": "judge-1",
                               "prompt_file": str(crag_runner.DEFAULT_JUDGE_PROMPT)}  # fmt: skip
    assert result["note"] is None
    printed = capsys.readouterr().out
    assert "crag-mm" in printed and "vehicle" in printed and "upper bound" not in printed


def test_crag_mm_without_a_judge_is_exact_match_only(server, crag_data, processor, tmp_path, capsys):
    engine = ScriptedEngine(processor)
    cfg = EvalConfig(model="unused", data=str(crag_data), out=str(tmp_path / "r.json"), format="cragmm",
                     protocol="crag-mm")  # fmt: skip
    result = evaluate(cfg, engine=engine)
    assert result["judge"] is None and "upper bound" in result["note"] and not server.prompts
    assert "upper bound" in capsys.readouterr().out
    overall = result["overall"]
    # only the two exact matches are correct; s1 t1, s2 t0..t2, s3 t0 are hallucinations (at most)
    assert (overall["n"], overall["correct"], overall["missing"], overall["hallucination"]) == (8, 2, 1, 5)
    assert by_turn(result)[("s2", 2)]["verdict"] == "early_stop"
    assert result["max_answer_tokens"] == 75 and by_turn(result)[("s1", 1)]["truncated_answer"] != LONG


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--judge-url", "http://127.0.0.1:9"], "only apply to --protocol crag-mm"),
        (["--max-answer-tokens", "10"], "only apply to --protocol crag-mm"),
        (["--protocol", "crag-mm", "--judge-url", "http://127.0.0.1:9"], "--judge-url needs --judge-model"),
        (["--protocol", "crag-mm", "--judge-model", "m"], "need --judge-url"),
        (["--protocol", "bogus"], "Unknown --protocol 'bogus'"),
        (["--protocol", "crag-mm", "--max-answer-tokens", "1"], "at least 2"),
        (["--protocol", "crag-mm", "--judge-url", "http://x", "--judge-model", "m", "--judge-prompt", "/nope.txt"],
         "is not a file"),
    ],
)  # fmt: skip
def test_cli_refuses_bad_flag_combinations(flags, message, tmp_path, capsys):
    from n2eye.cli import main

    code = main(["eval", "--model", "m", "--data", "d.jsonl", "--out", str(tmp_path / "o.json"), *flags])
    assert code == 2 and message in capsys.readouterr().err


def test_judge_reply_parsing_and_endpoint():
    assert crag_runner.parse_accuracy('{"accuracy": true}') is True
    assert crag_runner.parse_accuracy('Verdict:\n```json\n{"accuracy": false}\n```') is False
    assert crag_runner.parse_accuracy('{"accuracy": "yes"}') is None and crag_runner.parse_accuracy("yes") is None
    assert openai_client.chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert openai_client.chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"


def test_judge_key_variable_must_be_set(monkeypatch, tmp_path):
    monkeypatch.delenv("N2EYE_TEST_JUDGE_KEY", raising=False)
    cfg = EvalConfig(model="m", data="d", out=str(tmp_path / "o.json"), protocol="crag-mm", judge_url="http://x",
                     judge_model="j", judge_api_key_env="N2EYE_TEST_JUDGE_KEY")  # fmt: skip
    with pytest.raises(ValueError, match="N2EYE_TEST_JUDGE_KEY: that environment variable is not set"):
        crag_runner.make_judge(cfg)
    monkeypatch.setenv("N2EYE_TEST_JUDGE_KEY", "sk-test")
    assert crag_runner.make_judge(cfg).api_key == "sk-test"


# --------------------------------------------------------------------------------------------- agent server


def crag_cfg(data, tmp_path, server, **kwargs) -> EvalConfig:
    values = {"model": "unused", "data": str(data), "out": str(tmp_path / "r.json"), "format": "cragmm",
              "protocol": "crag-mm", "judge_url": server.base, "judge_model": "judge-1", "max_answer_tokens": 13,
              **kwargs}  # fmt: skip
    return EvalConfig(**values)


def test_an_openai_compatible_agent_server_gets_the_same_verdicts(server, crag_data, processor, tmp_path):
    """--agent-url: the same sessions through a chat server score exactly as through a local engine; images go as
    PNG data URIs with their pixels, the history holds the agent's own truncated answers, greedy."""
    local = evaluate(crag_cfg(crag_data, tmp_path, server, out=str(tmp_path / "local.json")),
                     engine=ScriptedEngine(processor))  # fmt: skip
    remote_cfg = crag_cfg(crag_data, tmp_path, server, model=None, agent_url=server.base + "/agent",
                          agent_model="lfm2-vl", answer_tokenizer=str(tiny_checkpoint_dir(processor)))  # fmt: skip
    remote = evaluate(remote_cfg)
    assert remote["agent"] == {"url": server.base + "/agent/v1/chat/completions", "model": "lfm2-vl"}
    strip = ("judge_raw",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in remote["turns"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in local["turns"]]  # fmt: skip
    assert remote["overall"] == local["overall"] and remote["agent_errors"] == 0

    assert len(server.agent_requests) == 8
    assert all(r["model"] == "lfm2-vl" and r["temperature"] == 0 and r["max_tokens"] == 256 for r in server.agent_requests)
    third = next(r for r in server.agent_requests if r["messages"][-1]["content"][-1]["text"] == "How fast can it go?")
    first_user = third["messages"][0]["content"]
    assert first_user[0]["type"] == "image_url" and first_user[0]["image_url"]["url"].startswith("data:image/png;base64,")
    sent = Image.open(BytesIO(base64.b64decode(first_user[0]["image_url"]["url"].split(",", 1)[1])))
    assert sent.convert("RGB").tobytes() == Image.open(BytesIO(png((200, 0, 0)))).convert("RGB").tobytes()
    cut = by_turn(local)[("s1", 1)]["truncated_answer"]
    assert [m["content"] for m in third["messages"] if m["role"] == "assistant"] == ["toyota", cut]


def tiny_checkpoint_dir(processor):
    return processor.tokenizer.name_or_path


def test_agent_failures_are_counted_not_fatal(server, processor, tmp_path):
    sessions = [("f1", "ego", "food", "simple", "normal", [("AGENTFAIL what is it?", "soup", "-"),
                                                           ("Is it hot?", "yes", "Yes")])]  # fmt: skip
    data = write_crag(tmp_path, server.base, sessions)
    cfg = crag_cfg(data, tmp_path, server, model=None, agent_url=server.base + "/agent", agent_model="m",
                   answer_tokenizer=tiny_checkpoint_dir(processor))  # fmt: skip
    result = evaluate(cfg)
    turns = by_turn(result)
    assert result["agent_errors"] == 1 and "failed 3 times" in turns[("f1", 0)]["agent_error"]
    assert turns[("f1", 0)]["answer"] == "" and turns[("f1", 0)]["verdict"] == "hallucination"
    assert turns[("f1", 1)]["verdict"] == "correct"
    assert sum("AGENTFAIL" in r["messages"][-1]["content"][-1]["text"] for r in server.agent_requests) == 3
    # kept for a rerun that retries only the failed call
    assert crag_runner.partial_path(tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--protocol", "crag-mm", "--agent-url", "http://127.0.0.1:9"], "--agent-url needs --agent-model"),
        (["--protocol", "crag-mm", "--agent-model", "m"], "need --agent-url"),
        (["--protocol", "crag-mm", "--agent-url", "http://x", "--agent-model", "m", "--model", "m"],
         "--model apply to a local model"),
        (["--protocol", "crag-mm", "--agent-url", "http://x", "--agent-model", "m", "--max-image-tokens", "64"],
         "--max-image-tokens apply to a local model"),
        (["--agent-url", "http://x", "--agent-model", "m"], "only apply to --protocol crag-mm"),
        (["--protocol", "crag-mm", "--concurrency", "0"], "--concurrency must be at least 1"),
    ],
)  # fmt: skip
def test_agent_flag_combinations_are_checked(flags, message, tmp_path, capsys):
    from n2eye.cli import main

    code = main(["eval", "--data", "d.jsonl", "--out", str(tmp_path / "o.json"), *flags])
    assert code == 2 and message in capsys.readouterr().err


def test_model_or_agent_is_required(tmp_path, capsys):
    from n2eye.cli import main

    assert main(["eval", "--data", "d.jsonl", "--out", str(tmp_path / "o.json")]) == 2
    assert "--model (or --agent-url" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- judge robustness


def test_judge_calls_run_concurrently_within_the_bound(server, processor, tmp_path):
    sessions = [(f"c{i}", "ego", "food", "simple", "normal", [(f"Question {i}?", "x", f"guess {i}")]) for i in range(6)]
    for _, *_rest, turns in sessions:
        SCRIPT.update({q: a for q, _, a in turns})
    data = write_crag(tmp_path, server.base, sessions)
    server.delay = 0.3
    result = evaluate(crag_cfg(data, tmp_path, server, concurrency=2), engine=ScriptedEngine(processor))
    assert result["judge_calls"] == 6 and len(server.prompts) == 6
    assert server.max_inflight == 2  # two at once, never more
    assert result["overall"]["hallucination"] == 6


def test_a_judge_that_times_out_is_retried_then_counted(server, processor, tmp_path, capsys):
    sessions = [("t1", "ego", "food", "simple", "normal", [("What is SLOW food?", "snail", "SLOW snail soup"),
                                                           ("Is it hot?", "yes", "Yes")])]  # fmt: skip
    SCRIPT.update({q: a for q, _, a in sessions[0][-1]})
    data = write_crag(tmp_path, server.base, sessions)
    result = evaluate(crag_cfg(data, tmp_path, server, judge_timeout=0.2), engine=ScriptedEngine(processor))
    turn = by_turn(result)[("t1", 0)]
    assert turn["verdict"] == "hallucination" and "timed out" in turn["judge_raw"]
    assert sum("SLOW" in p for p in server.prompts) == 3 and result["judge_errors"] == 1
    assert by_turn(result)[("t1", 1)]["verdict"] == "correct"
    assert "1 judge calls failed every try" in capsys.readouterr().out


def test_a_killed_run_resumes_from_its_cached_answers_and_verdicts(server, crag_data, processor, tmp_path, monkeypatch):
    """A run killed while judging keeps the answers it made and the verdicts it got; the same command then asks
    the model nothing again and the judge only what it had not answered; the finished result equals a clean run's."""
    clean = evaluate(crag_cfg(crag_data, tmp_path, server, out=str(tmp_path / "clean.json")),
                     engine=ScriptedEngine(processor))  # fmt: skip
    server.prompts.clear()
    calls = {"n": 0}
    real_judge = crag_runner.HttpJudge.__call__

    def dies_on_third_call(self, *args):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise KeyboardInterrupt  # the user's Ctrl-C, mid-judging
        return real_judge(self, *args)

    monkeypatch.setattr(crag_runner.HttpJudge, "__call__", dies_on_third_call)
    cfg = crag_cfg(crag_data, tmp_path, server, concurrency=1)
    with pytest.raises(KeyboardInterrupt):
        evaluate(cfg, engine=ScriptedEngine(processor))
    partial = crag_runner.partial_path(tmp_path / "r.json")
    assert partial.exists() and not (tmp_path / "r.json").exists()
    monkeypatch.setattr(crag_runner.HttpJudge, "__call__", real_judge)

    judged_before = len(server.prompts)
    engine = ScriptedEngine(processor)
    resumed = evaluate(cfg, engine=engine)
    assert engine.histories == []  # every answer came from the cache
    assert resumed["resumed"] == {"answer": 8, "verdict": 2}
    # 7 judge calls in a clean run (s3 t0 three times); the two cached ones are not asked again
    assert len(server.prompts) - judged_before == 7 - 2
    assert resumed["overall"] == clean["overall"] and resumed["turns"] == clean["turns"]
    assert partial.exists() == (resumed["judge_errors"] > 0)  # kept only for the call that failed (HTTP 500)


def test_a_rerun_after_judge_failures_retries_only_those(server, crag_data, processor, tmp_path):
    cfg = crag_cfg(crag_data, tmp_path, server)
    first = evaluate(cfg, engine=ScriptedEngine(processor))
    assert first["judge_errors"] == 1 and crag_runner.partial_path(tmp_path / "r.json").exists()
    server.broken = set()  # the judge recovers
    server.prompts.clear()
    engine = ScriptedEngine(processor)
    second = evaluate(cfg, engine=engine)
    assert engine.histories == [] and len(server.prompts) == 1 and "ERROR500" in server.prompts[0]
    assert second["judge_errors"] == 0 and by_turn(second)[("s3", 0)]["judge_raw"] == '{"accuracy": false}'
    assert not crag_runner.partial_path(tmp_path / "r.json").exists()


def test_the_kits_skipped_sessions_are_left_out(server, processor, tmp_path):
    skip_id = sorted(crag_protocol.SESSIONS_TO_SKIP)[0]
    sessions = [(skip_id, "ego", "food", "simple", "normal", [("Is it hot?", "yes", "Yes")]),
                ("k1", "ego", "food", "simple", "normal", [("Is it hot?", "yes", "Yes")])]  # fmt: skip
    data = write_crag(tmp_path, server.base, sessions)
    result = evaluate(crag_cfg(data, tmp_path, server), engine=ScriptedEngine(processor))
    assert result["kit_skipped_sessions"] == [skip_id] and result["overall"]["n"] == 1


def test_early_stop_as_missing_counts_the_stopped_turns(server, processor, tmp_path):
    sessions = [("e1", "ego", "food", "simple", "normal", [("Q one?", "a", "I don't know"), ("Q two?", "b", "zz"),
                                                           ("Q three?", "c", "c"), ("Q four?", "d", "d")])]  # fmt: skip
    SCRIPT.update({q: a for q, _, a in sessions[0][-1]})
    data = write_crag(tmp_path, server.base, sessions)
    kit = evaluate(crag_cfg(data, tmp_path, server), engine=ScriptedEngine(processor))
    paper = evaluate(crag_cfg(data, tmp_path, server, early_stop_as_missing=True), engine=ScriptedEngine(processor))
    # judged: missing, hallucination, correct, correct; early stop after turn 1 -> turns 2, 3 stopped
    assert [r["verdict"] for r in kit["turns"]] == ["missing", "hallucination", "early_stop", "early_stop"]
    k, p = kit["overall"], paper["overall"]
    assert (k["correct"], k["missing"], k["hallucination"]) == (2, 1, 1) and k["truthfulness"] == pytest.approx(0.25)
    assert (p["correct"], p["missing"], p["hallucination"]) == (0, 3, 1) and p["truthfulness"] == pytest.approx(-0.25)
    assert k["multi_turn_conversation_score"] == p["multi_turn_conversation_score"] == pytest.approx(-0.25)
    assert paper["early_stop_as_missing"] is True
