"""The Cauldron and ShareGPT (LlamaFactory / ms-swift) layouts: each must give exactly the Conversations its
`messages`-format equivalent gives through the same `load_many` (messages, pixels, tools), be auto-detected from
its columns (LLaVA still LLaVA), count its bad rows under the usual reasons, and train and evaluate.

Fixtures are built locally with `datasets`: saved datasets (`save_to_disk`), parquet and JSON files, images
embedded (`List(Image())`) or as paths next to the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from datasets import Features, List, Value
from datasets import Image as ImageFeature
from test_data_formats import IMAGES, write_images

from n2eye.data import SkipReport, detect_format, iter_conversations, load_source
from n2eye.data.formats import load_many, make_adapter
from n2eye.images import ImageCache

# ------------------------------------------------------------------------------------------ the Cauldron

# (row, its texts, its images by key); each row's messages equivalent puts every image before the first user text.
CAULDRON = [
    ([("What colour is the circle?", "Red.", "vqav2"), ("Is it big?", "No.", "vqav2")], ["s1"]),
    ([("Compare the two pictures.", "A green square, then a blue circle.", "nlvr2")], ["s2", "s3"]),
    ([("What is written here?\nAnswer briefly.", "Nothing.", "ocrvqa")], []),  # text-only rows exist too
]
CAULDRON_BAD = [  # (texts, images, the reason it is skipped for)
    ([("What is it?", "", "vqav2")], ["s1"], "turn_without_answer"),
    ([("First?", "Yes.", "vqav2"), ("Second?", "", "vqav2")], ["s1"], "turn_without_answer"),
    ([], ["s1"], "empty_turns"),
    ([("What does <image> mean?", "A picture.", "vqav2")], ["s1"], "control_token"),
    ([("", "An orphan answer.", "vqav2")], ["s1"], "answer_without_turn"),
]
CAULDRON_FEATURES = Features({
    "images": List(ImageFeature()),
    "texts": List({"user": Value("string"), "assistant": Value("string"), "source": Value("string")}),
})  # fmt: skip


def cauldron_row(texts, keys) -> dict:
    return {"images": [IMAGES[k] for k in keys],
            "texts": [{"user": u, "assistant": a, "source": s} for u, a, s in texts]}  # fmt: skip


def cauldron_messages(texts, keys) -> list[dict]:
    messages = []
    for index, (user, assistant, _source) in enumerate(texts):
        images = [{"type": "image"} for _ in keys] if index == 0 else []
        messages += [{"role": "user", "content": [*images, {"type": "text", "text": user}]},
                     {"role": "assistant", "content": assistant}]  # fmt: skip
    return messages


# ---------------------------------------------------------------------------------------------- ShareGPT

ITEM = {"type": "object", "properties": {"item": {"type": "string"}}, "required": ["item"]}
LOOKUP = {"name": "lookup_price", "description": "Look up a price.", "parameters": ITEM}
CART = {"name": "add_to_cart", "description": "Add to the cart.", "parameters": {"type": "object", "properties": {}}}


def call(name, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


# (id, ShareGPT turns, images by key, tools, system) and the messages each must become.
SHAREGPT = [
    ("g-two-turns", [("human", "<image>\nWhat colour is the circle?"), ("gpt", "Red."), ("human", "Is it big?"),
                     ("gpt", "No.")], ["s1"], None, "Be brief.",
     [{"role": "system", "content": "Be brief."},
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
      {"role": "assistant", "content": "Red."},
      {"role": "user", "content": [{"type": "text", "text": "Is it big?"}]},
      {"role": "assistant", "content": "No."}]),
    ("g-two-images", [("human", "Compare <image> with <image>."), ("gpt", "Green square, blue circle.")],
     ["s2", "s3"], None, None,
     [{"role": "user", "content": [{"type": "text", "text": "Compare"}, {"type": "image"},
                                   {"type": "text", "text": "with"}, {"type": "image"}, {"type": "text", "text": "."}]},
      {"role": "assistant", "content": "Green square, blue circle."}]),
    ("g-tool", [("human", "<image>How much is it?"),
                ("function_call", json.dumps({"name": "lookup_price", "arguments": {"item": "red circle"}})),
                ("observation", json.dumps({"price": 3})), ("gpt", "Three dollars.")], ["s1"], [LOOKUP, CART], None,
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How much is it?"}]},
      {"role": "assistant", "content": "", "tool_calls": [call("lookup_price", item="red circle")]},
      {"role": "tool", "content": json.dumps({"price": 3})},
      {"role": "assistant", "content": "Three dollars."}]),
    ("g-two-calls", [("human", "Price it and add it."),  # a list of calls; arguments as JSON text too
                     ("function_call", json.dumps([{"name": "lookup_price", "arguments": '{"item": "cup"}'},
                                                   {"name": "add_to_cart", "arguments": {}}])),
                     ("observation", "3 dollars; added"), ("gpt", "Done.")], [], [LOOKUP, CART], None,
     [{"role": "user", "content": [{"type": "text", "text": "Price it and add it."}]},
      {"role": "assistant", "content": "", "tool_calls": [call("lookup_price", item="cup"), call("add_to_cart")]},
      {"role": "tool", "content": "3 dollars; added"},
      {"role": "assistant", "content": "Done."}]),
    ("g-no-marker", [("human", "Describe it."), ("gpt", "A blue circle.")], ["s3"], None, None,  # images go first
     [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]},
      {"role": "assistant", "content": "A blue circle."}]),
]  # fmt: skip
SHAREGPT_BAD = [  # (id, turns, images, the reason it is skipped for)
    ("b-markers", [("human", "<image><image>Both?"), ("gpt", "Yes.")], ["s1"], "image_count_mismatch"),
    ("b-images", [("human", "<image>This?"), ("gpt", "Yes.")], ["s1", "s2"], "image_count_mismatch"),
    ("b-ends-on-human", [("human", "<image>Hi"), ("gpt", "Hello."), ("human", "And?")], ["s1"], "turn_without_answer"),
    ("b-no-gpt", [("human", "<image>Hi")], ["s1"], "no_assistant_turn"),
    ("b-role", [("human", "<image>Hi"), ("bot", "Hello.")], ["s1"], "unknown_role"),
    ("b-call", [("human", "Hi"), ("function_call", "lookup_price(item='x')"), ("gpt", "ok")], [], "malformed_row"),
]  # fmt: skip


def sharegpt_row(sid, turns, images, tools=None, system=None, column="conversations") -> dict:
    return {"id": sid, column: [{"from": f, "value": v} for f, v in turns], "images": images,
            "tools": json.dumps(tools) if tools else None, "system": system}  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# ----------------------------------------------------------------------------------------------- helpers


def load(spec, tmp_path, fmt="auto"):
    report = SkipReport()
    convs = list(load_many(str(spec), fmt, report=report, cache_dir=tmp_path / "hf",
                           image_cache=ImageCache(tmp_path / "image-cache")))  # fmt: skip
    return convs, report


def key(conv) -> tuple:
    """What must be equal: messages, pixels, tools."""
    images = [(image.mode, image.size, image.tobytes()) for image in conv["images"]]
    return json.dumps(conv["messages"], sort_keys=True), images, json.dumps(conv.get("tools"), sort_keys=True)


@pytest.fixture(scope="module")
def cauldron(tmp_path_factory) -> dict[str, Path]:
    """The Cauldron fixture as a saved dataset and as parquet (good and bad rows mixed), and its messages
    equivalent (the good rows only) as JSON Lines with image paths."""
    root = tmp_path_factory.mktemp("cauldron")
    rows = [cauldron_row(*CAULDRON[0]), cauldron_row(*CAULDRON_BAD[0][:2]), cauldron_row(*CAULDRON[1])]
    rows += [cauldron_row(texts, keys) for texts, keys, _ in CAULDRON_BAD[1:]] + [cauldron_row(*CAULDRON[2])]
    dataset = datasets.Dataset.from_list(rows, features=CAULDRON_FEATURES)
    dataset.save_to_disk(root / "saved")
    dataset.to_parquet(root / "cauldron.parquet")
    paths = write_images(root / "equivalent")
    equivalent = [{"messages": cauldron_messages(texts, keys), "images": [paths[k].name for k in keys]}
                  for texts, keys in CAULDRON]  # fmt: skip
    write_jsonl(root / "equivalent" / "messages.jsonl", equivalent)
    return {"saved": root / "saved", "parquet": root / "cauldron.parquet",
            "messages": root / "equivalent" / "messages.jsonl"}  # fmt: skip


@pytest.fixture(scope="module")
def sharegpt(tmp_path_factory) -> dict[str, Path]:
    """The ShareGPT fixture as LlamaFactory writes it (a JSON file, image paths next to it), as a saved dataset and
    as parquet with embedded images, the parquet one in a `messages` column; and its messages equivalent."""
    root = tmp_path_factory.mktemp("sharegpt")
    paths = write_images(root)
    good = [(sid, turns, keys, tools, system) for sid, turns, keys, tools, system, _ in SHAREGPT]
    bad = [(sid, turns, keys, None, None) for sid, turns, keys, _ in SHAREGPT_BAD]
    ordered = [good[0], bad[0], good[1], *bad[1:], *good[2:]]
    as_json = [sharegpt_row(sid, turns, [paths[k].name for k in keys], tools, system)
               for sid, turns, keys, tools, system in ordered]  # fmt: skip
    (root / "sharegpt.json").write_text(json.dumps(as_json, indent=1))
    features = Features({
        "id": Value("string"), "images": List(ImageFeature()), "tools": Value("string"), "system": Value("string"),
        "conversations": List({"from": Value("string"), "value": Value("string")}),
    })  # fmt: skip
    embedded = [sharegpt_row(sid, turns, [IMAGES[k] for k in keys], tools, system)
                for sid, turns, keys, tools, system in ordered]  # fmt: skip
    dataset = datasets.Dataset.from_list(embedded, features=features)
    dataset.save_to_disk(root / "saved")
    dataset.rename_column("conversations", "messages").to_parquet(root / "messages-column.parquet")
    equivalent = [{"id": sid, "messages": json.dumps(messages), "images": [paths[k].name for k in keys],
                   "tools": json.dumps(tools) if tools else None}
                  for sid, _turns, keys, tools, _system, messages in SHAREGPT]  # fmt: skip
    write_jsonl(root / "messages.jsonl", equivalent)
    return {"json": root / "sharegpt.json", "saved": root / "saved", "parquet": root / "messages-column.parquet",
            "messages": root / "messages.jsonl"}  # fmt: skip


# ----------------------------------------------------------------------------------------------- tests


def test_cauldron_rows_equal_their_messages_equivalent(cauldron, tmp_path):
    expected, report = load(cauldron["messages"], tmp_path)
    assert report.skipped == 0 and len(expected) == len(CAULDRON)
    assert [len(c["images"]) for c in expected] == [1, 2, 0]
    for layout in ("saved", "parquet"):
        assert detect_format(load_source(cauldron[layout], cache_dir=tmp_path / "hf").column_names) == "cauldron"
        for fmt in ("auto", "cauldron"):
            convs, report = load(cauldron[layout], tmp_path, fmt)
            assert [key(c) for c in convs] == [key(c) for c in expected], (layout, fmt)
            assert [c["metadata"]["format"] for c in convs] == ["cauldron"] * 3
            assert [c["metadata"]["qtypes"] for c in convs] == [["vqav2", "vqav2"], ["nlvr2"], ["ocrvqa"]]
            assert [c["metadata"]["source"] for c in convs] == ["vqav2", "nlvr2", "ocrvqa"]
            assert report.counts == {"turn_without_answer": 2, "empty_turns": 1, "control_token": 1,
                                     "answer_without_turn": 1}  # fmt: skip
            assert [e["row"] for e in report.examples["turn_without_answer"]] == ["1", "3"]  # row numbers
            assert report.kept == 3


def test_sharegpt_rows_equal_their_messages_equivalent(sharegpt, tmp_path):
    expected, report = load(sharegpt["messages"], tmp_path)
    assert report.skipped == 0 and [c["messages"] for c in expected] == [row[-1] for row in SHAREGPT]
    assert [len(c["images"]) for c in expected] == [1, 2, 1, 0, 1]
    assert expected[2]["tools"] == [LOOKUP, CART] and "tools" not in expected[0]
    for layout in ("json", "saved", "parquet"):
        columns = load_source(sharegpt[layout], cache_dir=tmp_path / "hf").column_names
        assert ("messages" in columns) == (layout == "parquet")
        for fmt in ("auto", "sharegpt"):
            convs, report = load(sharegpt[layout], tmp_path, fmt)
            assert [key(c) for c in convs] == [key(c) for c in expected], (layout, fmt)
            assert [c["metadata"]["id"] for c in convs] == [row[0] for row in SHAREGPT]
            assert {c["metadata"]["format"] for c in convs} == {"sharegpt"}
            assert report.counts == {"image_count_mismatch": 2, "turn_without_answer": 1, "no_assistant_turn": 1,
                                     "unknown_role": 1, "malformed_row": 1}  # fmt: skip
            assert [e["row"] for e in report.examples["image_count_mismatch"]] == ["b-markers", "b-images"]
            assert report.examples["unknown_role"][0]["row"] == "b-role"


def test_detection_by_columns_keeps_llava_and_chat_messages(tmp_path):
    """`conversations` + `images` (or `tools`) is ShareGPT, + `image` or alone LLaVA; a `messages` column is
    ShareGPT only when its turns are from/value, read from the features (or the first row when there are none)."""
    assert detect_format(["id", "image", "conversations"]) == "llava"
    assert detect_format(["conversations"]) == "llava"
    assert detect_format(["conversations", "images"]) == "sharegpt"
    assert detect_format(["conversations", "tools"]) == "sharegpt"
    assert detect_format(["images", "texts"]) == "cauldron"
    assert detect_format(["messages", "images"]) == "messages"
    assert detect_format(["messages", "images"], ["from", "value"]) == "sharegpt"
    assert detect_format(["messages", "images"], ["role", "content"]) == "messages"

    write_images(tmp_path)
    llava = [{"id": "a", "image": "s1.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                              {"from": "gpt", "value": "Red."}]}]  # fmt: skip
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    convs, report = load(tmp_path / "llava.json", tmp_path)
    assert report.skipped == 0 and convs[0]["metadata"]["format"] == "llava"

    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]
    gpt = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo."}]
    with_features = datasets.Dataset.from_list([{"messages": gpt}])
    json_text = datasets.Dataset.from_list([{"messages": json.dumps(gpt)}])  # CSV-style: features say string
    for data in (with_features, with_features.to_iterable_dataset(), json_text, [{"messages": gpt}]):
        assert make_adapter(data).format == "sharegpt"
    for data in (datasets.Dataset.from_list([{"messages": chat}]), [{"messages": json.dumps(chat)}]):
        assert make_adapter(data).format == "messages"
    (convert,) = iter_conversations([{"messages": gpt}])
    assert convert["messages"] == [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                   {"role": "assistant", "content": "Yo."}]  # fmt: skip
    with pytest.raises(ValueError, match=r"Format 'sharegpt' needs column\(s\) conversations or messages"):
        make_adapter([{"texts": []}], "sharegpt")
    with pytest.raises(ValueError, match=r"Format 'cauldron' needs column\(s\) images, texts"):
        make_adapter([{"conversations": []}], "cauldron")


def test_format_names_reach_the_train_and_eval_options():
    from n2eye.cli_args import field_docs
    from n2eye.data.formats import FORMAT_DESCRIPTIONS, FORMATS
    from n2eye.eval.runner import EvalConfig
    from n2eye.train.config import TrainConfig

    assert {"cauldron", "sharegpt"} <= set(FORMATS) and set(FORMAT_DESCRIPTIONS) == set(FORMATS)
    for cls in (TrainConfig, EvalConfig):
        assert all(name in field_docs(cls)["format"] for name in FORMATS), cls.__name__
    assert TrainConfig(model="m", data="d", out="o", format="sharegpt").format == "sharegpt"
    with pytest.raises(ValueError, match="cauldron, sharegpt; got 'alpaca'"):
        TrainConfig(model="m", data="d", out="o", format="alpaca")
    with pytest.raises(ValueError, match="cauldron, sharegpt; got 'alpaca'"):
        EvalConfig(model="m", data="d", out="o", format="alpaca")


class AlwaysRed:
    """An engine stand-in for `n2eye eval`: answers "Red." to everything and keeps what it was asked."""

    processor = None

    def __init__(self) -> None:
        self.histories: list = []

    def complete_batch(self, histories, **options):
        self.histories += histories
        return [{"text": "Red.", "finish_reason": "stop"} for _ in histories]


def test_cauldron_source_is_the_eval_question_type(cauldron, tmp_path):
    from n2eye.eval.runner import EvalConfig, evaluate, turn_requests

    convs, _ = load(cauldron["saved"], tmp_path)
    assert [r["qtype"] for c in convs for r in turn_requests(c)] == ["vqav2", "vqav2", "nlvr2", "ocrvqa"]
    engine = AlwaysRed()
    result = evaluate(EvalConfig(model="unused", data=str(cauldron["saved"]), out=str(tmp_path / "e.json")), engine)
    assert {name: (row["n"], row["mean_score"]) for name, row in result["per_type"].items()} == {
        "vqav2": (2, 0.5), "nlvr2": (1, 0.0), "ocrvqa": (1, 0.0)}  # fmt: skip
    assert result["skipped"]["skipped"] == len(CAULDRON_BAD)
    first = engine.histories[0][0]["content"]  # the images reach the model, before the question
    assert [item["type"] for item in first] == ["image", "text"] and first[0]["image"].size == IMAGES["s1"].size


@pytest.mark.parametrize("layout", ["cauldron", "sharegpt"])
def test_train_runs_on_each_layout_and_reports_its_skips(layout, cauldron, sharegpt, tiny_checkpoint, tmp_path):
    from n2eye.train.config import TrainConfig
    from n2eye.train.trainer import train

    data = cauldron["saved"] if layout == "cauldron" else sharegpt["json"]
    out = tmp_path / "run"
    train(TrainConfig(model=str(tiny_checkpoint), data=str(data), out=str(out), max_steps=1, batch_size=2,
                      grad_accum=1, bf16=False, gradient_checkpointing=False, lr=1e-3, seed=3))  # fmt: skip
    result = json.loads((out / "train_result.json").read_text())
    expected = ({"turn_without_answer": 2, "empty_turns": 1, "control_token": 1, "answer_without_turn": 1}
                if layout == "cauldron" else
                {"image_count_mismatch": 2, "turn_without_answer": 1, "no_assistant_turn": 1, "unknown_role": 1,
                 "malformed_row": 1})  # fmt: skip
    assert result["skipped"]["reasons"] == expected
    assert result["train_conversations"] == (len(CAULDRON) if layout == "cauldron" else len(SHAREGPT))
    assert (out / "final").is_dir()


def test_text_only_sharegpt_read_as_llava_says_which_format_to_pass(tmp_path):
    """Without an `images` or `tools` column a ShareGPT file looks like LLaVA by its columns; its function_call rows
    are then skipped with the flag that reads them, and `--format sharegpt` keeps them."""
    rows = [{"conversations": [{"from": "human", "value": "Weather in Paris?"},
                               {"from": "function_call", "value": json.dumps({"name": "get_weather",
                                                                              "arguments": {"location": "Paris"}})},
                               {"from": "observation", "value": "18 C"}, {"from": "gpt", "value": "18 C."}]},
            {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}]  # fmt: skip
    (tmp_path / "tools.json").write_text(json.dumps(rows))
    convs, report = load(tmp_path / "tools.json", tmp_path)
    skipped = report.to_dict()
    assert len(convs) == 1 and skipped["reasons"] == {"unknown_role": 1}
    assert "pass --format sharegpt" in skipped["examples"]["unknown_role"][0]["detail"]
    convs, report = load(tmp_path / "tools.json", tmp_path, fmt="sharegpt")
    assert len(convs) == 2 and report.skipped == 0
    assert convs[0]["messages"][1]["tool_calls"][0]["function"]["name"] == "get_weather"


def test_nested_images_are_read_without_rewriting_the_dataset(cauldron, sharegpt, tmp_path, monkeypatch):
    """Images inside a list (every Cauldron subset, ShareGPT's embedded `images`) are read raw from the same Arrow
    data: `datasets.Dataset.cast`, which writes a copy of the whole dataset, is never called."""
    expected = [key(c) for c in load(cauldron["saved"], tmp_path)[0]]

    def no_rewrite(*args, **kwargs):
        raise AssertionError("the dataset was rewritten to turn image decoding off")

    monkeypatch.setattr(datasets.Dataset, "cast", no_rewrite)
    assert [key(c) for c in load(cauldron["saved"], tmp_path)[0]] == expected
    convs, report = load(sharegpt["saved"], tmp_path)
    assert convs and report.kept == len(convs)
