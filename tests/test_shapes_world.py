"""The shapes world: deterministic, correct against its own pixels, balanced, image-dependent, and readable
through our CRAG-MM and messages adapters."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from n2eye.demo import baselines, questions, world, writers
from n2eye.eval import scoring
from n2eye.data.formats import load_conversations


@pytest.fixture(scope="module")
def sessions() -> list[questions.Session]:
    return questions.make_sessions(2000, seed=11)


@pytest.fixture(scope="module")
def heldout() -> list[questions.Session]:
    return questions.make_sessions(1000, seed=12)


def all_turns(sessions):
    for session in sessions:
        for turn in session.turns:
            yield session, turn


def drawn_area(scene: world.Scene, obj: world.SceneObject) -> int:
    """Pixels inside the object's box that are not background (objects never share a box)."""
    x1, y1, x2, y2 = obj.bbox
    pixels = np.asarray(scene.image.crop((x1, y1, x2, y2)), dtype=np.int16)
    return int((np.abs(pixels - np.array(scene.background)).max(axis=-1) > 30).sum())


def side(scene: world.Scene, obj: world.SceneObject, axis: str) -> str | None:
    i = 0 if axis == "x" else 1
    centre = (obj.bbox[i] + obj.bbox[i + 2]) / 2
    if abs(centre - scene.size / 2) < 0.1 * scene.size:
        return None
    if axis == "x":
        return "left" if centre < scene.size / 2 else "right"
    return "top" if centre < scene.size / 2 else "bottom"


def expected_answer(session: questions.Session, turn: questions.Turn) -> str:
    """Recomputes a turn's answer from the scene objects (and pixels), independently of the generator."""
    q = turn.question
    scene = session.scenes[0]
    objs = scene.objects

    def having(scene, shape=None, colour=None):
        return [o for o in scene.objects if shape in (None, o.shape) and colour in (None, o.colour)]

    if m := re.fullmatch(r"What colour is the (\w+)\?", q):
        (obj,) = having(scene, shape=m[1])
        return obj.colour
    if m := re.fullmatch(r"What colour is the (\w+) in the (first|second) image\?", q):
        (obj,) = having(session.scenes[0 if m[2] == "first" else 1], shape=m[1])
        return obj.colour
    if m := re.fullmatch(r"What shape is the (\w+) object\?", q):
        (obj,) = having(scene, colour=m[1])
        return obj.shape
    if m := re.fullmatch(r"What shape is at the (top|bottom) (left|right)\?", q):
        (obj,) = [o for o in objs if side(scene, o, "y") == m[1] and side(scene, o, "x") == m[2]]
        return obj.shape
    if m := re.fullmatch(r"How many (\w+)s are there\?", q):
        return str(len(objs) if m[1] == "object" else len(having(scene, shape=m[1])))
    if m := re.fullmatch(r"Is the (\w+) (\w+) (on the left or the right|at the top or the bottom)\?", q):
        (obj,) = having(scene, shape=m[2], colour=m[1])
        answer = side(scene, obj, "x" if "left" in m[3] else "y")
        assert answer is not None, "position asked about an object near the middle"
        return answer
    if m := re.fullmatch(r"Is there a (\w+) (\w+)\?", q):
        return "yes" if having(scene, shape=m[2], colour=m[1]) else "no"
    if m := re.fullmatch(r"Are there more (\w+)s than (\w+)s\?", q):
        a, b = len(having(scene, shape=m[1])), len(having(scene, shape=m[2]))
        assert a != b, "more-than asked on a tie"
        return "yes" if a > b else "no"
    if m := re.fullmatch(r"Which is bigger, the (\w+) object or the (\w+) object\?", q):
        (a,) = having(scene, colour=m[1])
        (b,) = having(scene, colour=m[2])
        area_a, area_b = drawn_area(scene, a), drawn_area(scene, b)
        assert max(area_a, area_b) >= 1.2 * min(area_a, area_b), "bigger asked without a clear difference"
        return a.colour if area_a > area_b else b.colour
    if m := re.fullmatch(r"Detect all instances of: (\w+)\. .*", q):
        found = sorted(having(scene, shape=m[1]), key=lambda o: o.cell(scene.size))  # reading order
        assert found
        return json.dumps([{"label": o.shape, "bbox": [round(v / scene.size, 2) for v in o.bbox]} for o in found])
    if m := re.fullmatch(r"Which image has more (\w+)s\?", q):
        first, second = session.scenes
        key = (lambda s: len(s.objects)) if m[1] == "object" else (lambda s: len(having(s, shape=m[1])))
        assert key(first) != key(second), "two-image question on a tie"
        return "first" if key(first) > key(second) else "second"
    if m := re.fullmatch(r"Which image has a (\w+) (\w+)\?", q):
        has = [bool(having(s, shape=m[2], colour=m[1])) for s in session.scenes]
        assert sum(has) == 1
        return "first" if has[0] else "second"
    if m := re.fullmatch(r"(?:Look up the price of|Add) the (\w+)(?: to my cart)?\.", q):
        (obj,) = having(scene, shape=m[1])
        name = "lookup_price" if q.startswith("Look up") else "add_to_cart"
        return f"{name}({obj.colour} {obj.shape})"
    raise AssertionError(f"unexpected question {q!r}")


# ------------------------------------------------------------------------------------------------ tests


def test_sessions_are_deterministic_for_a_seed():
    make = questions.make_sessions
    a, b, c = make(40, seed=3), make(40, seed=3), make(40, seed=4)

    def key(sessions):
        return [
            (
                s.session_id,
                s.kind,
                [(t.question, t.answer, t.qtype, t.tool_call) for t in s.turns],
                [i.tobytes() for i in s.images],
            )
            for s in sessions
        ]

    assert key(a) == key(b)
    assert key(a) != key(c)
    assert key(questions.make_sessions(10, seed=3)) == key(a)[:10]  # a prefix of a longer run


def test_scenes_are_in_bounds_apart_and_drawn_as_described():
    import random

    rng = random.Random(0)
    for _ in range(300):
        scene = world.make_scene(rng, 96)
        assert scene.image.size == (96, 96) and scene.image.mode == "RGB"
        assert 1 <= len(scene.objects) <= 4
        assert max(abs(c - 128) for c in scene.background) > 60, "background must not look like blank grey"
        for i, o in enumerate(scene.objects):
            x1, y1, x2, y2 = o.bbox
            assert 0 <= x1 < x2 <= 96 and 0 <= y1 < y2 <= 96 and 16 <= x2 - x1 <= 28 and x2 - x1 == y2 - y1
            assert o.bbox_norm == tuple(v / 96 for v in o.bbox)
            # The pixel a bit above the bottom centre is inside every shape and has the object's colour.
            pixel = scene.image.getpixel(((x1 + x2) // 2, y2 - 4))
            assert max(abs(a - b) for a, b in zip(pixel, world.PALETTE[o.colour])) <= world.OBJECT_JITTER
            for p in scene.objects[i + 1 :]:
                assert x2 <= p.bbox[0] or p.bbox[2] <= x1 or y2 <= p.bbox[1] or p.bbox[3] <= y1, "objects overlap"


def test_objects_sit_one_per_grid_cell_near_its_centre():
    """The demo model sees one cell per image token, so each object must lie inside one cell, centred."""
    import random

    rng = random.Random(1)
    cell = 96 // world.GRID
    cells_used = set()
    for _ in range(300):
        scene = world.make_scene(rng, 96)
        cells = []
        for o in scene.objects:
            x1, y1, x2, y2 = o.bbox
            col, row = x1 // cell, y1 // cell
            assert (x2 - 1) // cell == col and (y2 - 1) // cell == row, f"{o} crosses a cell border"
            cx, cy = o.center
            jitter = world.CELL_JITTER + 1
            assert abs(cx - (col + 0.5) * cell) <= jitter and abs(cy - (row + 0.5) * cell) <= jitter
            cells.append((row, col))
        assert len(set(cells)) == len(cells), "two objects in one cell"
        cells_used.update(cells)
    assert len(cells_used) == world.GRID * world.GRID, "every cell is used"


def test_pixel_statistics():
    from PIL import Image

    mean, std = world.pixel_statistics([Image.new("RGB", (8, 8), (255, 0, 51))] * 3)
    assert mean == pytest.approx([1.0, 0.0, 0.2]) and std == pytest.approx([0, 0, 0], abs=1e-3)
    half = Image.new("RGB", (2, 1), (0, 0, 0))
    half.putpixel((1, 0), (255, 255, 255))
    mean, std = world.pixel_statistics([half])
    assert mean == pytest.approx([0.5] * 3) and std == pytest.approx([0.5] * 3)
    with pytest.raises(ValueError):
        world.pixel_statistics([])


def test_every_answer_is_correct(sessions):
    kinds = Counter(s.kind for s in sessions)
    assert set(kinds) == {"cragmm", "two_image", "tool_call"}
    for session in sessions:
        assert 1 <= len(session.turns) <= 6
        if session.kind == "cragmm":
            assert 2 <= len(session.turns)
        assert len(session.scenes) == (2 if session.kind == "two_image" else 1)
        for turn in session.turns:
            expected = expected_answer(session, turn)
            if turn.qtype == "grounding":
                assert json.loads(turn.answer) == json.loads(expected), (session.session_id, turn)
            else:
                assert baselines.turn_label(turn) == expected, (session.session_id, turn)
            assert turn.answer == turn.answer.strip()
            if turn.qtype not in ("grounding", "tool_call"):  # one lowercase word or a digit
                assert re.fullmatch(r"[a-z]+|[0-4]", turn.answer), turn
    assert set(baselines.qtype_counts(sessions)) == set(questions.QTYPES)


def test_answers_are_balanced_within_each_type():
    classes: dict[str, Counter] = defaultdict(Counter)
    sessions = questions.make_sessions(8000, seed=11)  # "bigger" questions are rare (~2% of turns): ~150 of them
    for session, turn in all_turns(sessions):
        if turn.qtype == "grounding":
            continue
        key = turn.qtype
        if turn.qtype == "comparison":
            if turn.answer in ("yes", "no"):
                key = "comparison-more"
            else:  # which of the two named objects is the answer
                key = "comparison-bigger"
                named = re.findall(r"the (\w+) object", turn.question)
                classes[key]["first" if named[0] == turn.answer else "second"] += 1
                continue
        elif turn.qtype == "position":
            key = "position-x" if turn.answer in ("left", "right") else "position-y"
        elif turn.qtype == "tool_call":
            classes["tool_call"][turn.tool_call["arguments"]["item"].split()[0]] += 1
            continue
        classes[key][turn.answer] += 1
    expected = {"colour", "shape", "count", "yes_no", "two_image", "tool_call"}
    expected |= {"position-x", "position-y", "comparison-more", "comparison-bigger"}
    assert set(classes) == expected
    for key, counter in classes.items():
        total = sum(counter.values())
        top = max(counter.values()) / total
        assert total >= 50, (key, total)
        if len(counter) == 2:
            assert 0.4 <= top <= 0.6, (key, counter)
        else:
            assert len(counter) >= 3 and top <= 0.4, (key, counter)


def test_grounding_answers_parse_and_match_the_objects(sessions):
    seen = 0
    for session, turn in all_turns(sessions):
        if turn.qtype != "grounding":
            continue
        seen += 1
        data = json.loads(turn.answer)
        shape = turn.question.split(": ", 1)[1].split(".", 1)[0]
        # reading order: grid row by row, left to right
        objects = sorted(session.scenes[0].find(shape), key=lambda o: o.cell(session.scenes[0].size))
        assert [d["label"] for d in data] == [shape] * len(objects)
        for d, o in zip(data, objects):
            assert all(abs(a - b) < 0.0051 for a, b in zip(d["bbox"], o.bbox_norm))
        assert scoring.grounding_score(turn.answer, turn.answer)["iou"] == 1.0
    assert seen > 100
    assert scoring.grounding_score("not json", '[{"label": "circle", "bbox": [0.1, 0.1, 0.3, 0.3]}]')["iou"] == 0.0


def test_cragmm_parquet_reads_back_through_the_adapter(tmp_path):
    sessions = questions.make_sessions(60, seed=5)
    path = writers.write_cragmm(sessions, tmp_path, "train")
    assert path == tmp_path / "train.parquet"
    convs = list(load_conversations(path, "cragmm", cache_dir=tmp_path / "hf"))
    single = [s for s in sessions if s.kind == "cragmm"]
    assert len(convs) == len(single) > 30
    for conv, session in zip(convs, single):
        assert conv["messages"] == writers.session_messages(session)
        assert conv["images"][0].tobytes() == session.scenes[0].image.tobytes()
        assert conv["metadata"]["session_id"] == session.session_id and conv["metadata"]["egocentric"]
        assert writers.conversation_qtypes(conv) == [t.qtype for t in session.turns]
        assert {t["domain"] for t in conv["metadata"]["turns"]} == {"shapes"}
        memory = writers.to_conversation(session)  # the in-memory form matches what the adapter reads
        assert memory["messages"] == conv["messages"]
        assert writers.conversation_qtypes(memory) == writers.conversation_qtypes(conv)


def test_extra_jsonl_reads_back_through_the_messages_adapter(tmp_path):
    sessions = questions.make_sessions(120, seed=6)
    writers.write_cragmm(sessions, tmp_path, "heldout")
    path = tmp_path / "heldout-extra.jsonl"
    extra = [s for s in sessions if s.kind != "cragmm"]
    convs = list(load_conversations(path, "messages", cache_dir=tmp_path / "hf"))
    assert len(convs) == len(extra) > 10
    assert {s.kind for s in extra} == {"two_image", "tool_call"}
    for conv, session in zip(convs, extra):
        assert conv["messages"] == writers.session_messages(session)
        assert [i.tobytes() for i in conv["images"]] == [i.tobytes() for i in session.images]
        assert writers.conversation_qtypes(conv) == [t.qtype for t in session.turns]
        assert writers.conversation_qtypes(conv)[0] == session.kind
        if session.kind == "tool_call":
            assert [t["function"]["name"] for t in conv["tools"]] == ["lookup_price", "add_to_cart"]
            call = conv["messages"][1]["tool_calls"][0]["function"]
            assert call == session.turns[0].tool_call
        else:
            assert "tools" not in conv


def test_questions_need_the_image(sessions, heldout):
    """With the image blanked to grey only the text is left: the same text must take several answers, and the
    best text-only predictor (majority answer per question text, fitted on other sessions) stays near chance."""
    answers: dict[str, dict[str, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for _, turn in all_turns(sessions):
        answers[turn.qtype][turn.question][baselines.turn_label(turn)] += 1
    for qtype in questions.QTYPES:
        common = {text: c for text, c in answers[qtype].items() if sum(c.values()) >= 20}
        assert common, qtype
        for text, counter in common.items():  # every frequent question text takes several answers
            assert len(counter) > 1 and max(counter.values()) / sum(counter.values()) < 0.8, (qtype, text, counter)
    chance = baselines.chance_levels(heldout)
    blind = baselines.blind_baseline(sessions, heldout)
    assert set(blind) == set(questions.QTYPES)
    for qtype, accuracy in blind.items():
        assert accuracy <= chance[qtype] + 0.1, (qtype, accuracy, chance[qtype])
    assert chance["grounding"] < 0.2 and chance["count"] < 0.3
    blank = world.blank_image()
    assert blank.getextrema() == tuple((v, v) for v in world.BLANK_GREY)
    assert all(max(abs(a - b) for a, b in zip(bg, world.BLANK_GREY)) > 60 for bg in world.BACKGROUNDS)


def test_chance_levels_cover_every_qtype():
    levels = baselines.chance_levels()
    assert set(levels) == set(questions.QTYPES)
    assert levels["colour"] == levels["tool_call"] == 0.25 and levels["shape"] == pytest.approx(1 / 3)
    assert all(0 < v <= 0.5 for v in levels.values())


def test_demo_dataset_splits_and_manifest(tmp_path):
    result = writers.write_demo_dataset(tmp_path / "demo", n_train=80, n_heldout=40, seed=2)
    manifest = json.loads(result["manifest"].read_text())
    assert set(manifest["splits"]) == {"train", "heldout"} and manifest["splits"]["heldout"]["sessions"] == 40
    assert manifest["chance_levels"] == result["chance_levels"]
    stats = manifest["pixel_statistics"]  # light backgrounds: bright mean, far from the usual 0.5
    assert all(0.75 < m < 0.95 for m in stats["mean"]) and all(0.05 < s < 0.35 for s in stats["std"])
    for split in ("train", "heldout"):
        assert result[split]["cragmm"].is_file() and result[split]["messages"].is_file()
    train = list(load_conversations(result["train"]["cragmm"], "cragmm", cache_dir=tmp_path / "hf"))
    train += list(load_conversations(result["train"]["messages"], "messages", cache_dir=tmp_path / "hf"))
    held = list(load_conversations(result["heldout"]["cragmm"], "cragmm", cache_dir=tmp_path / "hf"))
    held += list(load_conversations(result["heldout"]["messages"], "messages", cache_dir=tmp_path / "hf"))
    assert len(train) == 80 and len(held) == 40
    seen = {writers.image_hash(i) for c in train for i in c["images"]}
    assert not any(writers.image_hash(i) in seen for c in held for i in c["images"])


def test_colour_sentences_change_only_the_colour_answers(tmp_path):
    words = writers.write_demo_dataset(tmp_path / "words", n_train=60, n_heldout=30, seed=3)
    sentences = writers.write_demo_dataset(tmp_path / "sentences", n_train=60, n_heldout=30, seed=3,
                                           colour_sentences=True)
    assert json.loads(sentences["manifest"].read_text())["world"]["colour_answers"] == "sentences"
    changed = 0
    for split, fmt in (("heldout", "cragmm"), ("heldout", "messages"), ("train", "cragmm")):
        a = list(load_conversations(words[split][fmt], fmt, cache_dir=tmp_path / "hf"))
        b = list(load_conversations(sentences[split][fmt], fmt, cache_dir=tmp_path / "hf"))
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert [i.tobytes() for i in x["images"]] == [i.tobytes() for i in y["images"]]
            for qtype, (mx, my) in zip(writers.conversation_qtypes(x), _answers(x, y)):
                if qtype == "colour":  # "red" -> "The circle is red."
                    assert re.fullmatch(rf"The (circle|square|triangle) is {mx}\.", my), (mx, my)
                    changed += 1
                else:
                    assert mx == my
    assert changed > 10


def _answers(x, y):
    """(words answer, sentences answer) per user turn: each turn's last assistant message."""
    def last_answers(conv):
        out, current = [], None
        for message in conv["messages"]:
            if message["role"] == "user" and current is not None:
                out.append(current)
            if message["role"] == "assistant":
                current = message["content"]
        return out + [current]

    return list(zip(last_answers(x), last_answers(y)))



def test_the_bench_writes_the_world_through_the_writer_program_byte_for_byte(tmp_path):
    """`n2eye bench` may not import the demo: it runs `python -m n2eye.demo.writers` instead, and must get the same
    files as `write_demo_dataset` (same sessions, same seed), so that its training figures do not move."""
    from n2eye.bench import write_shapes_world

    program = write_shapes_world(tmp_path / "program", 24, 6)
    direct = writers.write_demo_dataset(tmp_path / "direct", 24, 6, seed=0, size=96)
    for split in ("train", "heldout"):
        assert {k: v and Path(v).name for k, v in program[split].items()} == \
            {k: v and v.name for k, v in direct[split].items()}  # fmt: skip
    assert Path(program["manifest"]) == tmp_path / "program" / "manifest.json"
    def files(folder: Path) -> list[Path]:
        return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())

    assert files(tmp_path / "program") == files(tmp_path / "direct")
    for name in files(tmp_path / "direct"):
        assert (tmp_path / "program" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name


def test_nothing_outside_the_demo_imports_it():
    """The demo is a leaf of n2eye (DESIGN.md, Layout): the CLI names its module in a string, the bench runs its
    writer as a program, and no module outside `n2eye/demo/` imports it."""
    import ast

    import n2eye

    root = Path(n2eye.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        if path.parent == root / "demo":
            continue
        package = ["n2eye", *path.parent.relative_to(root).parts]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
            else:
                continue
            if any(t == "n2eye.demo" or t.startswith("n2eye.demo.") for t in targets):
                offenders.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not offenders, offenders
