"""CRAG-MM truthfulness protocol (n2eye.eval.crag_protocol): verdicts, early stop, truncation, aggregates.

Expected numbers are computed by hand from the inline fixture below (arithmetic in the comments).
"""

from __future__ import annotations

import pytest

from n2eye.eval.crag_protocol import (
    aggregate,
    apply_early_stop,
    clean_text,
    is_missing,
    judge_turn,
    score_session,
    score_sessions,
    truncate_answer,
)


class WhitespaceTokenizer:
    """encode = split on whitespace, decode = join with single spaces."""

    def encode(self, text):
        return text.split()

    def decode(self, ids):
        return " ".join(ids)


class KwargTokenizer(WhitespaceTokenizer):
    """Like a transformers tokenizer: adds a BOS unless told not to, and records the switches it got."""

    def __init__(self):
        self.calls = []

    def encode(self, text, add_special_tokens=True):
        self.calls.append(("encode", add_special_tokens))
        return (["<bos>"] if add_special_tokens else []) + text.split()

    def decode(self, ids, skip_special_tokens=False):
        self.calls.append(("decode", skip_special_tokens))
        return " ".join(i for i in ids if not (skip_special_tokens and i == "<bos>"))


LONG_LEMON = " ".join(["filler"] * 79 + ["lemon"])  # 80 words; "lemon" is word 80, past the 74 kept


def fake_judge_factory():
    """Judge: correct iff the ground truth occurs in the prediction; raises on the question "boom"."""
    calls = []

    def judge(query, ground_truth, prediction):
        calls.append(query)
        if query == "boom":
            raise RuntimeError("judge API down")
        return ground_truth.lower() in prediction.lower()

    return judge, calls


def _t(sid, turn, q, gt, a, domain, qc, iq, ego):
    return {
        "session_id": sid,
        "turn": turn,
        "question": q,
        "ground_truth": gt,
        "answer": a,
        "domain": domain,
        "query_category": qc,
        "image_quality": iq,
        "is_ego": ego,
    }


# Hand-computed per turn: judged verdict (before early stop) / final verdict.
#   C = correct, M = missing, H = hallucination, ES = early_stop
FIXTURE = [
    # S1 food/simple/normal, ego. C, C, M, H. Turns 2-3 are two failures in a row, but turn 3 is the last: no ES.
    _t("S1", 0, "What fruit?", "apple", "Apple ", "food", "simple", "normal", True),  # exact after strip+lower
    _t("S1", 1, "Colour?", "red", "It is red.", "food", "simple", "normal", True),  # judge: True
    _t("S1", 2, "Origin?", "Spain", "I don\u2019t know.", "food", "simple", "normal", True),  # curly apostrophe
    _t("S1", 3, "Year?", "1990", "It was 1985", "food", "simple", "normal", True),  # judge: False
    # S2 plants/multi-hop/low light, not ego. Judged H, M, C, C, H; turns 0-1 fail -> turns 2, 3, 4 are ES.
    _t("S2", 0, "Tree?", "oak", "maple", "plants", "multi-hop", "low light", False),
    _t("S2", 1, "Leaf colour?", "green", "I DO NOT KNOW!", "plants", "multi-hop", "low light", False),
    _t("S2", 2, "Height class?", "tall", "tall", "plants", "multi-hop", "low light", False),
    _t("S2", 3, "How high?", "10 m", "10 m " + " ".join(["x"] * 80), "plants", "multi-hop", "low light", False),
    _t("S2", 4, "Edible?", "yes", "no", "plants", "multi-hop", "low light", False),
    # S3 food/comparison/normal, ego, given out of order. C, H (judge raises), C.
    _t("S3", 2, "Animal?", "cat", "a cat", "food", "comparison", "normal", True),
    _t("S3", 0, "City?", "Paris", "paris", "food", "comparison", "normal", True),
    _t("S3", 1, "boom", "blue", "navy", "food", "comparison", "normal", True),
    # S4 plants/simple/normal, not ego, single turn. M (no apostrophe at all).
    _t("S4", 0, "Flower?", "rose", "i dont know", "plants", "simple", "normal", False),
    # S5 food/simple, not ego; image quality differs per turn. H (truncation drops "lemon"), C.
    _t("S5", 0, "Citrus?", "lemon", LONG_LEMON, "food", "simple", "blurred", False),
    _t("S5", 1, "Again?", "Lemon", "lemon", "food", "simple", "normal", False),
]

EXPECTED = {
    ("S1", 0): ("correct", "correct"),
    ("S1", 1): ("correct", "correct"),
    ("S1", 2): ("missing", "missing"),
    ("S1", 3): ("hallucination", "hallucination"),
    ("S2", 0): ("hallucination", "hallucination"),
    ("S2", 1): ("missing", "missing"),
    ("S2", 2): ("correct", "early_stop"),
    ("S2", 3): ("correct", "early_stop"),
    ("S2", 4): ("hallucination", "early_stop"),
    ("S3", 0): ("correct", "correct"),
    ("S3", 1): ("hallucination", "hallucination"),
    ("S3", 2): ("correct", "correct"),
    ("S4", 0): ("missing", "missing"),
    ("S5", 0): ("hallucination", "hallucination"),
    ("S5", 1): ("correct", "correct"),
}


@pytest.fixture()
def scored():
    judge, calls = fake_judge_factory()
    records = score_sessions(FIXTURE, judge, WhitespaceTokenizer())
    return records, calls


def test_verdicts_and_early_stop(scored):
    records, _ = scored
    got = {(r["session_id"], r["turn"]): (r["judged_verdict"], r["verdict"]) for r in records}
    assert got == EXPECTED
    # Sessions keep first-appearance order, turns are sorted by index (S3 was given 2, 0, 1).
    assert [(r["session_id"], r["turn"]) for r in records][9:12] == [("S3", 0), ("S3", 1), ("S3", 2)]
    for r in records:
        assert set(r) >= {"session_id", "turn", "question", "ground_truth", "answer", "truncated_answer",
                          "verdict", "judge_raw", "domain", "is_ego"}


def test_judge_called_only_when_needed_and_failures_are_not_correct(scored):
    records, calls = scored
    # Not asked for exact matches or abstentions; still asked for early-stopped turns (the kit judges every turn).
    assert calls == ["Colour?", "Year?", "Tree?", "How high?", "Edible?", "boom", "Animal?", "Citrus?"]  # S3 in turn order
    by_key = {(r["session_id"], r["turn"]): r for r in records}
    boom = by_key[("S3", 1)]
    assert boom["verdict"] == "hallucination"
    assert boom["judge_raw"].startswith("error: RuntimeError: judge API down")
    assert by_key[("S3", 2)]["verdict"] == "correct"  # the run went on after the failure
    assert by_key[("S1", 1)]["judge_raw"] is True
    assert by_key[("S1", 0)]["judge_raw"] is None and by_key[("S1", 0)]["is_exact_match"] is True


def test_truncation_inside_sessions(scored):
    records, _ = scored
    by_key = {(r["session_id"], r["turn"]): r for r in records}
    lemon = by_key[("S5", 0)]
    assert lemon["answer"] == LONG_LEMON
    assert lemon["truncated_answer"] == " ".join(["filler"] * 74)  # 75 - 1 reserved for Llama's BOS
    assert lemon["verdict"] == "hallucination"  # the ground truth was past the cut
    assert len(by_key[("S2", 3)]["truncated_answer"].split()) == 74
    assert by_key[("S1", 0)]["truncated_answer"] == "Apple "  # fits: returned verbatim


def test_aggregate_overall(scored):
    records, _ = scored
    overall = aggregate(records)["overall"]
    # N = 4 + 5 + 3 + 1 + 2 = 15. Kit counts use the judged verdicts (before early stop):
    # correct = S1 2 + S2 2 + S3 2 + S5 1 = 7; missing = S1 1 + S2 1 + S4 1 = 3; hallucination = 15 - 7 - 3 = 5.
    assert (overall["n"], overall["sessions"]) == (15, 5)
    assert (overall["correct"], overall["missing"], overall["hallucination"]) == (7, 3, 5)
    assert overall["early_stop"] == 3
    assert overall["exact_match"] == 4  # S1/0, S2/2, S3/0, S5/1
    assert overall["accuracy"] == pytest.approx(7 / 15)
    assert overall["missing_rate"] == pytest.approx(3 / 15)
    assert overall["hallucination_rate"] == pytest.approx(5 / 15)
    assert overall["exact_match_rate"] == pytest.approx(4 / 15)
    # truthfulness = (2*7 + 3) / 15 - 1 = 17/15 - 1 = 2/15
    assert overall["truthfulness"] == pytest.approx(2 / 15)
    # Per session (final verdicts; ES is neither correct nor hallucination):
    #   S1 2/4 - 1/4 = 1/4; S2 0/5 - 1/5 = -1/5; S3 2/3 - 1/3 = 1/3; S4 0 - 0 = 0; S5 1/2 - 1/2 = 0
    #   mean = (15/60 - 12/60 + 20/60) / 5 = 23/300
    assert overall["multi_turn_conversation_score"] == pytest.approx(23 / 300)


def test_aggregate_early_stop_counted_as_missing(scored):
    records, _ = scored
    overall = aggregate(records, count_early_stop_as_missing=True)["overall"]
    # S2 turns 2, 3 (judged C) and 4 (judged H) become missing: correct 7 - 2 = 5, missing 3 + 3 = 6,
    # hallucination 15 - 5 - 6 = 4; truthfulness = (10 + 6) / 15 - 1 = 1/15; exact match 4 - 1 (S2/2) = 3.
    assert (overall["correct"], overall["missing"], overall["hallucination"]) == (5, 6, 4)
    assert overall["truthfulness"] == pytest.approx(1 / 15)
    assert overall["exact_match"] == 3
    assert overall["multi_turn_conversation_score"] == pytest.approx(23 / 300)  # unchanged


def test_aggregate_groups(scored):
    records, _ = scored
    agg = aggregate(records)
    assert set(agg) == {"overall", "per_domain", "per_query_category", "per_image_quality", "egocentric"}

    food, plants = agg["per_domain"]["food"], agg["per_domain"]["plants"]
    # food = S1 (4) + S3 (3) + S5 (2) = 9: correct 2+2+1 = 5, missing 1, hallucination 3;
    # truthfulness (10 + 1)/9 - 1 = 2/9; mts (1/4 + 1/3 + 0)/3 = 7/36
    assert (food["n"], food["correct"], food["missing"], food["hallucination"]) == (9, 5, 1, 3)
    assert food["truthfulness"] == pytest.approx(2 / 9)
    assert food["multi_turn_conversation_score"] == pytest.approx(7 / 36)
    # plants = S2 (5) + S4 (1) = 6: correct 2, missing 2, hallucination 2; truthfulness (4+2)/6 - 1 = 0;
    # mts (-1/5 + 0)/2 = -1/10
    assert (plants["n"], plants["correct"], plants["missing"], plants["hallucination"]) == (6, 2, 2, 2)
    assert plants["truthfulness"] == pytest.approx(0.0)
    assert plants["multi_turn_conversation_score"] == pytest.approx(-0.1)
    assert plants["early_stop"] == 3

    qc = agg["per_query_category"]
    # simple = S1 + S4 + S5 = 7: correct 3, missing 2, hallucination 2; truthfulness (6+2)/7 - 1 = 1/7;
    # mts (1/4 + 0 + 0)/3 = 1/12
    assert (qc["simple"]["n"], qc["simple"]["correct"], qc["simple"]["missing"]) == (7, 3, 2)
    assert qc["simple"]["truthfulness"] == pytest.approx(1 / 7)
    assert qc["simple"]["multi_turn_conversation_score"] == pytest.approx(1 / 12)
    # comparison = S3: 2 C, 1 H -> truthfulness 4/3 - 1 = 1/3, mts 1/3
    assert qc["comparison"]["truthfulness"] == pytest.approx(1 / 3)
    assert qc["comparison"]["multi_turn_conversation_score"] == pytest.approx(1 / 3)
    # multi-hop = S2: 2 C, 1 M, 2 H -> truthfulness (4+1)/5 - 1 = 0, mts -1/5
    assert qc["multi-hop"]["truthfulness"] == pytest.approx(0.0)
    assert qc["multi-hop"]["multi_turn_conversation_score"] == pytest.approx(-0.2)

    iq = agg["per_image_quality"]
    assert set(iq) == {"normal", "low light", "blurred"}
    # normal = S1 (4) + S3 (3) + S4 (1) + S5/1 = 9: correct 2+2+0+1 = 5, missing 2, hallucination 2;
    # truthfulness (10+2)/9 - 1 = 1/3; mts (1/4 + 1/3 + 0 + 1)/4 = 19/48 (S5 contributes only its turn 1: 1 - 0)
    normal = iq["normal"]
    assert (normal["n"], normal["correct"], normal["missing"], normal["hallucination"]) == (9, 5, 2, 2)
    assert normal["truthfulness"] == pytest.approx(1 / 3)
    assert normal["multi_turn_conversation_score"] == pytest.approx(19 / 48)
    # blurred = S5/0 alone: one hallucination. The kit's formula gives truthfulness 0.0 when total == 1.
    blurred = iq["blurred"]
    assert (blurred["n"], blurred["hallucination"], blurred["hallucination_rate"]) == (1, 1, 1.0)
    assert blurred["truthfulness"] == 0.0
    assert blurred["multi_turn_conversation_score"] == pytest.approx(-1.0)

    ego = agg["egocentric"]
    # ego = S1 + S3 = 7: correct 4, missing 1, hallucination 2; truthfulness (8+1)/7 - 1 = 2/7;
    # mts (1/4 + 1/3)/2 = 7/24
    assert (ego["n"], ego["correct"], ego["missing"], ego["hallucination"]) == (7, 4, 1, 2)
    assert ego["truthfulness"] == pytest.approx(2 / 7)
    assert ego["multi_turn_conversation_score"] == pytest.approx(7 / 24)


def test_aggregate_missing_group_key_and_empty_subset():
    recs = [{"session_id": "a", "turn": 0, "judged_verdict": "correct", "verdict": "correct"},
            {"session_id": "a", "turn": 1, "judged_verdict": "missing", "verdict": "missing"}]
    agg = aggregate(recs, groups=("domain",))
    assert list(agg["per_domain"]) == ["unknown"]
    assert agg["per_domain"]["unknown"]["truthfulness"] == pytest.approx((2 * 1 + 1) / 2 - 1)  # 1/2
    assert agg["egocentric"]["n"] == 0 and agg["egocentric"]["accuracy"] is None
    assert agg["egocentric"]["multi_turn_conversation_score"] is None


def test_judge_none_is_exact_match_only():
    records = score_sessions(FIXTURE, None, WhitespaceTokenizer())
    verdicts = {(r["session_id"], r["turn"]): r["verdict"] for r in records}
    # S1: C, H ("It is red." not exact), M, then turns 1-2 both fail -> turn 3 is ES.
    assert [verdicts[("S1", i)] for i in range(4)] == ["correct", "hallucination", "missing", "early_stop"]
    # S3: "a cat" is no longer correct; the "boom" turn is not judged, so no error is recorded.
    assert [verdicts[("S3", i)] for i in range(3)] == ["correct", "hallucination", "hallucination"]
    assert all(r["judge_raw"] is None for r in records)
    overall = aggregate(records)["overall"]
    # judged correct = exact matches only: S1/0, S2/2, S3/0, S5/1 = 4; missing 3; hallucination 15 - 7 = 8
    assert (overall["correct"], overall["missing"], overall["hallucination"]) == (4, 3, 8)
    assert overall["truthfulness"] == pytest.approx((8 + 3) / 15 - 1)


@pytest.mark.parametrize(
    "answer, missing",
    [
        ("I don't know", True),
        ("I DON'T KNOW.", True),
        ("i dont know", True),
        ("I don\u2019t know", True),  # curly apostrophe deleted like any punctuation
        ("Sorry, I do not know the answer.", True),
        ("Hi, don't know", True),  # substring of "hi dont know": the kit's test is a plain `in`
        ("I do not knowingly guess", True),  # also a substring hit in the kit
        ("I don't-know", False),  # hyphen deleted -> "i dontknow"
        ("I don't  know", False),  # two spaces are kept
        ("idk", False),
        ("I dunno", False),
        ("I didn't know that", False),
        ("I'm not sure", False),
    ],
)
def test_is_missing_variants(answer, missing):
    assert is_missing(answer) is missing


def test_clean_text_matches_kit():
    assert clean_text("I Don't KNOW!! caf\u00e9 42") == "i dont know caf 42"


def test_judge_turn_rules():
    def always(value):
        return lambda q, gt, pred: value

    assert judge_turn("Apple.", "apple", "q", None) == ("hallucination", None)  # punctuation breaks exact match
    assert judge_turn(" APPLE ", "apple", "q", always(False)) == ("correct", None)  # exact match beats the judge
    assert judge_turn("I don't know", "apple", "q", always(True)) == ("missing", None)  # judge not asked
    assert judge_turn("a red apple", "apple", "q", always(None)) == ("hallucination", None)  # unparsable verdict
    assert judge_turn("a red apple", "apple", "q", always("yes")) == ("hallucination", "yes")  # only True counts
    assert judge_turn("a red apple", "apple", "q", always((True, "Result: CORRECT"))) == ("correct",
                                                                                          "Result: CORRECT")


@pytest.mark.parametrize(
    "verdicts, expected",
    [
        ([], []),
        (["hallucination"], ["hallucination"]),
        (["missing", "hallucination"], ["missing", "hallucination"]),
        (["correct", "missing", "correct", "missing", "correct"], ["correct", "missing", "correct", "missing",
                                                                   "correct"]),
        (["hallucination", "correct", "missing", "missing", "correct", "correct"],
         ["hallucination", "correct", "missing", "missing", "early_stop", "early_stop"]),
        (["missing", "missing", "missing"], ["missing", "missing", "early_stop"]),
    ],
)
def test_apply_early_stop(verdicts, expected):
    assert apply_early_stop(verdicts) == expected


def test_truncate_answer_generic():
    tok = WhitespaceTokenizer()
    words = [f"w{i}" for i in range(100)]
    assert truncate_answer(" ".join(words), tok) == " ".join(words[:74])
    assert truncate_answer(" ".join(words), tok, max_tokens=5, reserved_special_tokens=0) == "w0 w1 w2 w3 w4"
    assert truncate_answer("a  b\tc", tok, max_tokens=3, reserved_special_tokens=0) == "a  b\tc"  # fits: verbatim
    with pytest.raises(ValueError):
        truncate_answer("a", tok, max_tokens=0, reserved_special_tokens=1)

    kw = KwargTokenizer()
    assert truncate_answer("a b c d e", kw, max_tokens=3) == "a b"
    assert kw.calls == [("encode", False), ("decode", True)]


def test_truncate_answer_matches_kit_with_tokenizers_library():
    """The kit's path (Tokenizer with a BOS post-processor, enable_truncation(75), encode, decode) gives our text."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, processors

    words = [f"w{i}" for i in range(90)]
    vocab = {"<bos>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(words)}}

    def build():
        tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
        tok.decoder = decoders.WordPiece(prefix="##")  # joins word tokens with spaces
        tok.add_special_tokens(["<bos>"])
        return tok

    kit = build()
    kit.enable_truncation(max_length=75)
    answer = " ".join(words)
    kit_text = kit.decode(kit.encode_batch([answer])[0].ids)
    assert kit_text == " ".join(words[:74])
    assert truncate_answer(answer, build()) == kit_text


def test_score_session_rejects_mixed_sessions():
    with pytest.raises(ValueError):
        score_session(FIXTURE[:5], None, WhitespaceTokenizer())
    assert score_session([], None, WhitespaceTokenizer()) == []
