"""Dataset adapters: CRAG-MM (both hub layouts), messages JSONL, LLaVA JSON, sources, URL cache, skip counting.

Everything is built locally with `datasets` (ClassLabel, Image, Sequence / list-of-struct features) and a
127.0.0.1 http.server thread; no network.
"""

from __future__ import annotations

import base64
import io
import json
import os
import random
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import datasets
import pytest
from datasets import ClassLabel, Features, List, Sequence, Value
from datasets import Image as ImageFeature
from PIL import Image, ImageDraw

from n2eye.data import (
    NoUsableRowsError,
    SkipReport,
    detect_format,
    find_class_label,
    iter_conversations,
    load_conversations,
    load_source,
    parse_spec,
)
from n2eye.images import ImageCache

# ------------------------------------------------------------------------------------------ fixtures

# Two label orders per field: nothing in the adapter may depend on the order.
LABELS_A = {
    "domain": ["animal", "food", "book", "shopping"],
    "query_category": ["reasoning", "simple-knowledge", "simple-recognition", "multi-hop"],
    "dynamism": ["fast-changing", "static", "slow-changing"],
    "image_quality": ["rotated", "low light", "normal"],
}
LABELS_B = {name: list(reversed(names)) for name, names in LABELS_A.items()}
LABELS_B["domain"] = ["shopping", "animal", "book", "food"]


def picture(color, shape="circle", size=(40, 32)) -> Image.Image:
    image = Image.new("RGB", size, (20, 30, 40))
    draw = ImageDraw.Draw(image)
    box = (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4)
    (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=color)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


IMAGES = {
    "s1": picture((250, 20, 20)),
    "s2": picture((20, 250, 20), "square", (48, 36)),
    "s3": picture((20, 20, 250)),
}

# Plain-Python sessions: labels as names, images by key; the fixtures encode them per layout.
SESSIONS = [
    {
        "session_id": "s1",
        "image_quality": "normal",
        "turns": [
            ("s1-a", "What animal is this?", "animal", "simple-recognition", "static"),
            ("s1-b", "How long does it live?", "animal", "simple-knowledge", "slow-changing"),
        ],
        "answers": {"s1-a": "A red fox.", "s1-b": "About three years in the wild."},
    },
    {
        "session_id": "s2",
        "image_quality": "low light",
        "turns": [
            ("s2-a", "What is this product?", "shopping", "simple-recognition", "static"),
            ("s2-b", "How much does it cost?", "shopping", "simple-knowledge", "fast-changing"),
            ("s2-c", "Is it cheaper than the blue one?", "shopping", "reasoning", "fast-changing"),
        ],
        "answers": {"s2-a": "A green box.", "s2-b": "Ten dollars.", "s2-c": "Yes, by two dollars."},
    },
    {
        "session_id": "s3",
        "image_quality": "rotated",
        "turns": [
            ("s3-a", "Which book is this?", "book", "simple-recognition", "static"),
            ("s3-b", "Who wrote it?", "book", "multi-hop", "static"),
        ],
        "answers": {"s3-a": "Moby-Dick.", "s3-b": "Herman Melville."},
    },
]
WEB_SESSIONS = {"s2"}  # in the mixed fixtures s2 is a web image (image_url), the others egocentric


class _Server:
    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"


@pytest.fixture(scope="module")
def server():
    files = {f"/{key}.png": png_bytes(image) for key, image in IMAGES.items()}
    files["/corrupt.png"] = b"<html>not an image</html>"
    srv = _Server(files)
    old = os.environ.get("NO_PROXY")
    os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    srv.thread.start()
    yield srv
    srv.httpd.shutdown()
    srv.httpd.server_close()
    if old is None:
        os.environ.pop("NO_PROXY", None)
    else:
        os.environ["NO_PROXY"] = old


def _turn_features(labels, with_quality: bool) -> dict:
    fields = {
        "interaction_id": Value("string"),
        "domain": ClassLabel(names=labels["domain"]),
        "query_category": ClassLabel(names=labels["query_category"]),
        "dynamism": ClassLabel(names=labels["dynamism"]),
        "query": Value("string"),
    }
    if with_quality:
        fields["image_quality"] = ClassLabel(names=labels["image_quality"])
    return fields


def _answers_in_random_order(session, seed: int) -> list[tuple[str, str]]:
    answers = list(session["answers"].items())
    random.Random(seed).shuffle(answers)
    if [a for a, _ in answers] == [t[0] for t in session["turns"]]:
        answers.reverse()  # make sure the order really differs from the turns
    return answers


def _image_fields(session, server, all_urls: bool) -> tuple:
    sid = session["session_id"]
    if all_urls or sid in WEB_SESSIONS:
        return None, server.url(f"{sid}.png")
    return IMAGES[sid], None


def build_v011(server, *, all_urls: bool = False, labels=LABELS_A) -> datasets.Dataset:
    """CRAG-MM v0.1.1 layout: turns/answers are lists of dicts; image_quality on the row."""
    features = Features(
        {
            "session_id": Value("string"),
            "image": ImageFeature(),
            "image_url": Value("string"),
            "image_quality": ClassLabel(names=labels["image_quality"]),
            "turns": List(_turn_features(labels, with_quality=False)),
            "answers": List({"interaction_id": Value("string"), "ans_full": Value("string")}),
        }
    )
    rows = []
    for seed, session in enumerate(SESSIONS):
        image, url = _image_fields(session, server, all_urls)
        rows.append(
            {
                "session_id": session["session_id"],
                "image": image,
                "image_url": url,
                "image_quality": labels["image_quality"].index(session["image_quality"]),
                "turns": [
                    {
                        "interaction_id": iid,
                        "domain": labels["domain"].index(domain),
                        "query_category": labels["query_category"].index(category),
                        "dynamism": labels["dynamism"].index(dynamism),
                        "query": query,
                    }
                    for iid, query, domain, category, dynamism in session["turns"]
                ],
                "answers": [{"interaction_id": i, "ans_full": a} for i, a in _answers_in_random_order(session, seed)],
            }
        )
    return datasets.Dataset.from_list(rows, features=features)


def build_v012(server, *, all_urls: bool = False, labels=LABELS_B) -> datasets.Dataset:
    """CRAG-MM v0.1.2 layout: turns/answers are dicts of lists (Sequence of a struct); image_quality per turn."""
    features = Features(
        {
            "session_id": Value("string"),
            "image": ImageFeature(),
            "image_url": Value("string"),
            "turns": Sequence(_turn_features(labels, with_quality=True)),
            "answers": Sequence({"interaction_id": Value("string"), "ans_full": Value("string")}),
        }
    )
    rows = []
    for seed, session in enumerate(SESSIONS):
        image, url = _image_fields(session, server, all_urls)
        turns = session["turns"]
        answers = _answers_in_random_order(session, seed + 10)
        rows.append(
            {
                "session_id": session["session_id"],
                "image": image,
                "image_url": url,
                "turns": {
                    "interaction_id": [t[0] for t in turns],
                    "domain": [labels["domain"].index(t[2]) for t in turns],
                    "query_category": [labels["query_category"].index(t[3]) for t in turns],
                    "dynamism": [labels["dynamism"].index(t[4]) for t in turns],
                    "query": [t[1] for t in turns],
                    "image_quality": [labels["image_quality"].index(session["image_quality"])] * len(turns),
                },
                "answers": {"interaction_id": [a[0] for a in answers], "ans_full": [a[1] for a in answers]},
            }
        )
    return datasets.Dataset.from_list(rows, features=features)


def conv_key(conv, *, full_metadata: bool = True):
    """A comparable form: messages, pixels, and metadata (or only the per-turn labels)."""
    images = [(img.mode, img.size, img.tobytes()) for img in conv["images"]]
    meta = conv["metadata"] if full_metadata else conv["metadata"]["turns"]
    return json.dumps(conv["messages"], sort_keys=True), images, json.dumps(meta, sort_keys=True)


def expected_messages(session) -> list[dict]:
    messages = []
    for index, (iid, query, *_rest) in enumerate(session["turns"]):
        content = ([{"type": "image"}] if index == 0 else []) + [{"type": "text", "text": query}]
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": session["answers"][iid]}]
    return messages


def convert(dataset, tmp_path, fmt="auto", **kwargs):
    report = kwargs.pop("report", None) or SkipReport()
    cache = kwargs.pop("image_cache", None) or ImageCache(tmp_path / "image-cache", timeout=5)
    convs = list(iter_conversations(dataset, fmt, report=report, image_cache=cache, **kwargs))
    return convs, report


# --------------------------------------------------------------------------------------------- CRAG-MM


def test_cragmm_both_layouts_and_urls_give_the_same_conversations(server, tmp_path):
    v011, v012 = build_v011(server), build_v012(server)
    # The fixtures really are the two layouts, with different label orders.
    assert isinstance(v011.features["turns"], List) and isinstance(v012.features["turns"], dict)
    assert find_class_label(v011.features, "turns", "domain").names != find_class_label(v012.features, "turns", "domain").names
    assert find_class_label(v011.features, "image_quality") is not None
    assert find_class_label(v012.features, "turns", "image_quality") is not None

    a, report_a = convert(v011, tmp_path)
    b, report_b = convert(v012, tmp_path)
    assert report_a.skipped == report_b.skipped == 0 and report_a.kept == 3
    assert [conv_key(c) for c in a] == [conv_key(c) for c in b]

    for conv, session in zip(a, SESSIONS):
        assert conv["messages"] == expected_messages(session)  # answers matched by id despite the shuffle
        assert len(conv["images"]) == 1 and conv["images"][0].mode == "RGB"
        assert conv["images"][0].tobytes() == IMAGES[session["session_id"]].tobytes()
        meta = conv["metadata"]
        assert meta["session_id"] == session["session_id"]
        assert meta["egocentric"] is (session["session_id"] not in WEB_SESSIONS)
        assert [t["interaction_id"] for t in meta["turns"]] == [t[0] for t in session["turns"]]
        assert [(t["domain"], t["query_category"], t["dynamism"]) for t in meta["turns"]] == [
            tuple(t[2:]) for t in session["turns"]
        ]
        assert {t["image_quality"] for t in meta["turns"]} == {session["image_quality"]}

    # Every image as a web URL: same messages, pixels and labels.
    url_convs, report = convert(build_v012(server, all_urls=True, labels=LABELS_A), tmp_path)
    assert report.kept == 3
    assert [conv_key(c, full_metadata=False) for c in url_convs] == [conv_key(c, full_metadata=False) for c in a]
    assert all(not c["metadata"]["egocentric"] for c in url_convs)


def test_cragmm_eval_resize_only_touches_egocentric_images(server, tmp_path):
    convs, _ = convert(build_v011(server), tmp_path, eval_resize=True)
    sizes = {c["metadata"]["session_id"]: c["images"][0].size for c in convs}
    assert sizes == {"s1": (960, 1280), "s2": IMAGES["s2"].size, "s3": (960, 1280)}


def test_url_images_are_fetched_once(server, tmp_path):
    dataset = build_v012(server, all_urls=True)
    cache = ImageCache(tmp_path / "cache", timeout=5)
    before = len(server.requests)
    first, _ = convert(dataset, tmp_path, image_cache=cache)
    assert len(server.requests) - before == 3
    second, _ = convert(dataset, tmp_path, image_cache=ImageCache(tmp_path / "cache", timeout=5))
    assert len(server.requests) - before == 3  # the second pass reads the cache only
    assert [conv_key(c) for c in first] == [conv_key(c) for c in second]
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.startswith(".part-")]


# --------------------------------------------------------------------------------------------- sources


def test_sources_save_to_disk_parquet_and_streaming(server, tmp_path):
    dataset = build_v012(server)
    reference = [conv_key(c) for c in convert(dataset, tmp_path)[0]]
    hf_cache = tmp_path / "hf-cache"

    single = tmp_path / "saved-single"
    dataset.save_to_disk(str(single))
    as_dict = tmp_path / "saved-dict"
    datasets.DatasetDict({"validation": dataset}).save_to_disk(str(as_dict))
    parquet_file = tmp_path / "crag.parquet"
    dataset.to_parquet(str(parquet_file))
    parquet_dir = tmp_path / "pq"
    parquet_dir.mkdir()
    dataset.to_parquet(str(parquet_dir / "validation-00000-of-00001.parquet"))

    specs = [str(single), str(as_dict), f"{as_dict}:validation", str(parquet_file), f"{parquet_file}:validation", str(parquet_dir)]
    for spec in specs:
        for streaming in (False, True):
            loaded = load_source(spec, streaming=streaming, cache_dir=hf_cache)
            assert isinstance(loaded, datasets.IterableDataset) is streaming, spec
            got = [conv_key(c) for c in convert(loaded, tmp_path)[0]]
            assert got == reference, (spec, streaming)

    # The one-call path, and a clear error for a split that is not there.
    convs = list(load_conversations(f"{parquet_file}:validation", cache_dir=hf_cache, image_cache=ImageCache(tmp_path / "c")))
    assert [conv_key(c) for c in convs] == reference
    with pytest.raises(ValueError, match="no split 'test'.*validation"):
        load_source(f"{as_dict}:test")
    with pytest.raises(FileNotFoundError):
        load_source(str(tmp_path / "missing.jsonl"))


def test_parse_spec():
    assert parse_spec("org/name:validation") == ("org/name", "validation")
    assert parse_spec("data/x.jsonl:train[:10]") == ("data/x.jsonl", "train[:10]")
    assert parse_spec("org/name") == ("org/name", None)
    assert parse_spec("C:\\data\\x.json") == ("C:\\data\\x.json", None)


# -------------------------------------------------------------------------------------- messages/LLaVA


def write_images(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for key, image in IMAGES.items():
        paths[key] = folder / f"{key}.png"
        image.save(paths[key])
    return paths


def data_uri(image: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()


def test_messages_jsonl_inline_and_images_column(tmp_path):
    write_images(tmp_path / "imgs")
    rows = [
        {"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image", "image": "imgs/s1.png"}, {"type": "text", "text": "What is red?"}]},
            {"role": "assistant", "content": "A circle."},
        ]},
        {"messages": [
            {"role": "user", "content": [{"type": "text", "text": "Compare "}, {"type": "image", "url": data_uri(IMAGES["s2"])},
                                         {"type": "image_url", "image_url": {"url": data_uri(IMAGES["s3"])}}]},
            {"role": "assistant", "content": [{"type": "text", "text": "Green vs blue."}]},
        ]},
        {"messages": [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "And this?"}]},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "<image>\nAnd that?"},
            {"role": "assistant", "content": "Red."},
        ], "images": ["imgs/s3.png", "imgs/s1.png"]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert detect_format(load_source(path, cache_dir=tmp_path / "hf").column_names) == "messages"

    report = SkipReport()
    convs = list(load_conversations(path, cache_dir=tmp_path / "hf", report=report, image_cache=ImageCache(tmp_path / "c")))
    assert report.skipped == 0 and len(convs) == 3
    one, two, three = convs
    assert one["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is red?"}]},
        {"role": "assistant", "content": "A circle."},
    ]
    assert [im.tobytes() for im in one["images"]] == [IMAGES["s1"].tobytes()]
    assert two["messages"][0]["content"] == [{"type": "text", "text": "Compare "}, {"type": "image"}, {"type": "image"}]
    assert two["messages"][1]["content"] == "Green vs blue."
    assert [im.tobytes() for im in two["images"]] == [IMAGES["s2"].tobytes(), IMAGES["s3"].tobytes()]
    assert three["messages"][2]["content"] == [{"type": "image"}, {"type": "text", "text": "And that?"}]
    assert [im.tobytes() for im in three["images"]] == [IMAGES["s3"].tobytes(), IMAGES["s1"].tobytes()]


def test_llava_json_with_image_folder(tmp_path):
    write_images(tmp_path / "pictures")
    rows = [
        {"id": "a", "image": "s1.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the circle?"},
            {"from": "gpt", "value": "Red."},
            {"from": "human", "value": "Is it big?"},
            {"from": "gpt", "value": "No."},
        ]},
        {"id": "b", "image": "s2.png", "conversations": [
            {"from": "human", "value": "Describe it."}, {"from": "gpt", "value": "A green square."},
        ]},
        {"id": "c", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
    ]
    path = tmp_path / "llava.json"
    path.write_text(json.dumps(rows))
    report = SkipReport()
    convs = list(load_conversations(path, "llava", cache_dir=tmp_path / "hf", report=report,
                                    image_root=tmp_path / "pictures", image_cache=ImageCache(tmp_path / "c")))
    assert report.skipped == 0, report.summary()
    a, b, c = convs
    assert a["messages"] == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the circle?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "text", "text": "Is it big?"}]},
        {"role": "assistant", "content": "No."},
    ]
    assert a["images"][0].tobytes() == IMAGES["s1"].tobytes()
    assert b["messages"][0]["content"][0] == {"type": "image"}  # no token: the image goes first
    assert c["images"] == [] and c["metadata"]["id"] == "c"

    # Without image_root the JSON file's folder is used: these images are not there.
    report = SkipReport()
    convs = list(load_conversations(path, cache_dir=tmp_path / "hf", report=report, image_cache=ImageCache(tmp_path / "c")))
    assert len(convs) == 1 and report.counts == {"image_missing": 2}


# ----------------------------------------------------------------------------------------------- bad rows


def test_bad_cragmm_rows_are_counted_and_skipped(server, tmp_path):
    good = build_v011(server).to_list()  # raw Arrow values: images as {"bytes", "path"}, labels as ints
    features = build_v011(server).features
    base = dict(good[0])

    def variant(sid, **changes):
        row = dict(base, session_id=sid)
        row.update(changes)
        return row

    turns = base["turns"]
    bad = [
        variant("no-image", image=None, image_url=None),
        variant("corrupt", image={"bytes": b"garbage", "path": None}),
        variant("unfetchable", image=None, image_url=server.url("missing.png")),
        variant("html-as-image", image=None, image_url=server.url("corrupt.png")),
        variant("no-turns", turns=[]),
        variant("orphan-answer", answers=base["answers"] + [{"interaction_id": "nope", "ans_full": "x"}]),
        variant("unanswered", answers=base["answers"][:1]),
    ]
    assert len(turns) == 2
    rows = [good[0], *bad, good[2]]
    dataset = datasets.Dataset.from_list(rows, features=features)
    convs, report = convert(dataset, tmp_path)
    assert [c["metadata"]["session_id"] for c in convs] == ["s1", "s3"]
    assert report.counts == {
        "image_missing": 1,
        "image_corrupt": 2,
        "image_fetch_failed": 1,
        "empty_turns": 1,
        "answer_without_turn": 1,
        "turn_without_answer": 1,
    }
    assert report.examples["image_fetch_failed"][0]["row"] == "unfetchable"
    assert report.to_dict()["kept"] == 2 and "image_corrupt x2" in report.summary()


def test_bad_messages_and_llava_rows_are_counted_and_skipped(server, tmp_path):
    write_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    ok = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}, {"role": "assistant", "content": "Yo."}]
    rows = [
        {"id": "good", "messages": ok, "images": ["s1.png"]},
        {"id": "missing", "messages": ok, "images": ["nope.png"]},
        {"id": "corrupt", "messages": ok, "images": ["broken.png"]},
        {"id": "fetch", "messages": ok, "images": [server.url("missing.png")]},
        {"id": "empty", "messages": [], "images": []},
        {"id": "role", "messages": [{"role": "robot", "content": "beep"}, ok[1]], "images": []},
        {"id": "malformed", "messages": [{"role": "user", "content": [{"type": "video"}]}, ok[1]], "images": []},
        {"id": "count", "messages": ok, "images": ["s1.png", "s2.png"]},
        {"id": "good-url", "messages": ok, "images": [server.url("s2.png")]},
    ]
    convs, report = convert(rows, tmp_path, base_dir=tmp_path)
    assert [c["metadata"]["id"] for c in convs] == ["good", "good-url"]
    assert report.counts == {
        "image_missing": 1, "image_corrupt": 1, "image_fetch_failed": 1, "empty_turns": 1,
        "unknown_role": 1, "malformed_row": 1, "image_count_mismatch": 1,
    }

    llava = [
        {"id": "fine", "image": "s1.png", "conversations": [{"from": "human", "value": "<image> what?"}, {"from": "gpt", "value": "x"}]},
        {"id": "who", "image": "s1.png", "conversations": [{"from": "bot", "value": "<image> what?"}, {"from": "gpt", "value": "x"}]},
        {"id": "none", "image": "s1.png", "conversations": []},
        {"id": "lost", "image": "gone.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
    ]
    convs, report = convert(llava, tmp_path, base_dir=tmp_path)
    assert [c["metadata"]["id"] for c in convs] == ["fine"]
    assert report.counts == {"unknown_role": 1, "empty_turns": 1, "image_missing": 1}


def test_every_row_bad_raises_a_clear_error(tmp_path):
    rows = [{"id": i, "image": f"missing-{i}.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]} for i in range(3)]
    stream = iter_conversations(rows, image_cache=ImageCache(tmp_path / "c"), base_dir=tmp_path)
    with pytest.raises(NoUsableRowsError, match=r"every row was skipped: image_missing x3.*expected llava.*found columns id, image, conversations"):
        list(stream)


def test_unknown_format_fails_before_reading_rows(tmp_path):
    dataset = datasets.Dataset.from_list([{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"found columns question, answer.*turns, answers.*`messages`.*`conversations`"):
        iter_conversations(dataset)  # raised at the call, not on the first next()
    with pytest.raises(ValueError, match=r"Format 'cragmm' needs column\(s\) turns, answers, found columns question, answer"):
        iter_conversations(dataset, "cragmm")


def test_messages_dataset_with_nested_image_feature(tmp_path):
    """HF-hub style `images: List(Image())`: a corrupt image skips its row instead of breaking `datasets`."""
    ok = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Yo."}]},
    ]
    features = Features({
        "messages": List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}),
        "images": List(ImageFeature()),
    })
    rows = [{"messages": ok, "images": [IMAGES["s1"]]}, {"messages": ok, "images": [{"bytes": b"bad", "path": None}]}]
    dataset = datasets.Dataset.from_list(rows, features=features)
    for data in (dataset, dataset.to_iterable_dataset()):
        convs, report = convert(data, tmp_path)
        assert report.counts == {"image_corrupt": 1}
        assert convs[0]["messages"][1] == {"role": "assistant", "content": "Yo."}
        assert convs[0]["images"][0].tobytes() == IMAGES["s1"].tobytes()
    with pytest.raises(ValueError, match="DatasetDict with splits train"):
        iter_conversations(datasets.DatasetDict({"train": dataset}))


def test_package_exports_resolve_lazily():
    """`import n2eye.data` (and `n2eye.demo`) pulls in none of their modules' heavy imports until a name is used;
    a name that isn't exported is an AttributeError, and dir() lists the exports."""
    import subprocess
    import sys

    code = (
        "import sys, n2eye.data, n2eye.demo\n"
        "assert 'datasets' not in sys.modules and 'n2eye.demo.command' not in sys.modules\n"
        "assert 'load_source' in dir(n2eye.data) and 'run_demo' in dir(n2eye.demo)\n"
        "from n2eye.data import load_source\n"
        "assert 'n2eye.data.sources' in sys.modules and n2eye.data.load_source is load_source\n"
        "try:\n    n2eye.data.no_such_name\nexcept AttributeError as err:\n    print(err)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "module 'n2eye.data' has no attribute 'no_such_name'" in out
