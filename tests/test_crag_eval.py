"""`n2eye eval --protocol crag-mm`: a scripted agent, a scripted judge server, and hand-computed verdicts.

The agent is a stand-in engine (the tiny checkpoint's real processor, scripted answers per question) that records
every history it was asked with; the judge and the web image come from one 127.0.0.1 http.server thread.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO

import datasets
import pytest
from datasets import Features, Sequence, Value
from datasets import Image as ImageFeature
from PIL import Image

from n2eye.eval import crag_runner
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
    """GET /<name>.png serves the web image; POST /v1/chat/completions is the scripted judge (records prompts)."""

    def __init__(self) -> None:
        self.prompts: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                body = png((0, 200, 0))
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = request["messages"][-1]["content"]
                server.prompts.append(prompt)
                if "ERROR500" in prompt:
                    self.send_response(500)
                    self.end_headers()
                    return
                if "GARBAGE" in prompt:
                    reply = "I think it is probably right."
                elif "MADE2019" in prompt or "in gardens" in prompt:
                    reply = 'Sure: ```json\n{"accuracy": true}\n```'
                else:
                    reply = '{"accuracy": false}'
                body = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def server(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(crag_runner, "JUDGE_BACKOFF_S", 0.01)
    srv = Server()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()


@pytest.fixture
def crag_data(server, tmp_path):
    """CRAG-MM v0.1.2 layout (dicts of lists) as parquet: s1, s3 egocentric (embedded), s2 a web image_url."""
    turn = {k: Value("string") for k in ("interaction_id", "query", "domain", "query_category", "dynamism",
                                         "image_quality")}  # fmt: skip
    features = Features({"session_id": Value("string"), "image": ImageFeature(), "image_url": Value("string"),
                         "turns": Sequence(turn),
                         "answers": Sequence({"interaction_id": Value("string"), "ans_full": Value("string")})})  # fmt: skip
    rows = []
    for sid, source, domain, category, quality, turns in SESSIONS:
        ids = [f"{sid}-t{i}" for i in range(len(turns))]
        rows.append({
            "session_id": sid,
            "image": Image.open(BytesIO(png((200, 0, 0)))) if source == "ego" else None,
            "image_url": f"{server.base}/{sid}.png" if source == "web" else None,
            "turns": {"interaction_id": ids, "query": [t[0] for t in turns], "domain": [domain] * len(turns),
                      "query_category": [category] * len(turns), "dynamism": ["static"] * len(turns),
                      "image_quality": [quality] * len(turns)},
            "answers": {"interaction_id": ids, "ans_full": [t[1] for t in turns]},
        })  # fmt: skip
    path = tmp_path / "crag.parquet"
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


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
    assert turns[("s3", 0)]["judge_raw"].startswith("error: RuntimeError") and "500" in turns[("s3", 0)]["judge_raw"]
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
    assert crag_runner.chat_completions_url("http://h:1/v1/") == "http://h:1/v1/chat/completions"
    assert crag_runner.chat_completions_url("http://h:1") == "http://h:1/v1/chat/completions"


def test_judge_key_variable_must_be_set(monkeypatch, tmp_path):
    monkeypatch.delenv("N2EYE_TEST_JUDGE_KEY", raising=False)
    cfg = EvalConfig(model="m", data="d", out=str(tmp_path / "o.json"), protocol="crag-mm", judge_url="http://x",
                     judge_model="j", judge_api_key_env="N2EYE_TEST_JUDGE_KEY")  # fmt: skip
    with pytest.raises(ValueError, match="N2EYE_TEST_JUDGE_KEY: that environment variable is not set"):
        crag_runner.make_judge(cfg)
    monkeypatch.setenv("N2EYE_TEST_JUDGE_KEY", "sk-test")
    assert crag_runner.make_judge(cfg).api_key == "sk-test"
