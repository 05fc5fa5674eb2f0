"""Sessions of questions about shapes-world scenes, every answer depending on the image.

Why it exists: the demo's model must be shown to see, so answers are short canonical words and each question
type is balanced so that a text-only guess stays at chance (`baselines` measures it). Sessions are CRAG-MM-like
(one image, 2-6 mixed turns: an optional opening, middle turns, an optional grounding request); a tenth each are
two-image and tool-call sessions. Blind to the image, nothing beats chance by much: answers are dealt from
shuffled decks or balanced by symmetry, and a session never asks what its earlier turns give away (see
`_Knowledge`). `make_sessions` is deterministic for its seed.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from PIL import Image

from .world import COLOURS, GRID, MAX_OBJECTS, MIN_OBJECTS, SHAPES, Scene, SceneObject, bigger_of, make_scene, side_of

QTYPES: tuple[str, ...] = (
    "colour",
    "shape",
    "count",
    "position",
    "yes_no",
    "comparison",
    "grounding",
    "two_image",
    "tool_call",
)
CRAGMM_QTYPES: tuple[str, ...] = QTYPES[:7]
EXTRA_QTYPES: tuple[str, ...] = ("two_image", "tool_call")
GROUNDING_PROMPT = (
    "Detect all instances of: {label}. Response must be a JSON array: "
    '[{{"label": ..., "bbox": [x1, y1, x2, y2]}}, ...]. Coordinates are normalized to [0,1].'
)
TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {"item": {"type": "string", "description": "colour and shape, e.g. red circle"}},
                "required": ["item"],
            },
        },
    }
    for name, description in (
        ("lookup_price", "Look up the price of an item in the shop."),
        ("add_to_cart", "Add an item to the shopping cart."),
    )
]
TOOL_REQUESTS = {"lookup_price": "Look up the price of the {shape}.", "add_to_cart": "Add the {shape} to my cart."}
# Session mix (make_sessions) and turn mix within a CRAG-MM session.
TWO_IMAGE_FRACTION = 0.1
TWO_IMAGE_FOLLOW_UP = 0.6  # a two-image session goes on with a colour question about one of the images
TOOL_FRACTION = 0.1
# A session may open with one counting turn: counts shift which shapes later answers favour, so at most one
# per session, always first, and no shape question or yes/no about a counted shape after it.
# yes/no is an opening too: anything known about the scene shifts which pairs are present.
# "corner" asks the shape of the object at a corner ("What shape is at the top left?"): a lookup by place, which
# the image tokens' side words make easy, that teaches a head to copy an object's *shape*; without it the only
# shape answers came from finding an object by colour, which never formed a sharp lookup (72-74% on 1500 held-out
# sessions; with it 81%, docs/demo-notes.md 2026-12-06). It counts as a shape question.
OPENING_WEIGHTS = {"none": 0.25, "yes_no": 0.15, "count-objects": 0.15, "count-shape": 0.2, "corner": 0.15, "more": 0.1}
# `n2eye demo --quick`: counting needs its steps more than shape does in its short budget (with the corner question
# its count fell from 84% to 74%), so it keeps the openings of before.
EARLIER_OPENING_WEIGHTS = {"none": 0.25, "yes_no": 0.15, "count-objects": 0.15, "count-shape": 0.35, "more": 0.1}
GROUNDING_PROBABILITY = 0.4  # a session ends with one grounding request
# Middle turns: a session asks about colours, shapes or sizes ("bigger"), chosen blind to the scene, plus
# positions; each question is drawn uniformly among those the scene allows. Mixing colour, shape and size
# questions in one session would make asking one depend on the answers of another (a colour question needs
# a shape seen once, "bigger" depends on shapes), and the type asked would hint at the answers.
# More shape than colour questions: with the aligned projector colour is learnt first and shape last (demo
# 2026-12-05: colour 97-100%, shape 66-100% at 0.5/0.4); shape 0.3, comparison 0.2 gave demo shape 62% before.
MIDDLE_MODES = {"colour": 0.4, "shape": 0.5, "comparison": 0.1}
EARLIER_MIDDLE_MODES = {"colour": 0.5, "shape": 0.3, "comparison": 0.2}  # `n2eye demo --quick` learns more on it
POSITION_WEIGHT = 0.8  # against 1.0 for the session's mode
SLOT_DRAWS = 3  # draws per middle slot before it is left empty
# Answer decks, for the answers a random scene would not balance by itself: each key deals its classes in
# shuffled blocks; the scene is built (count), ordered (more, two images) or the question chosen (yes/no)
# to match the card. Colour, shape, position, bigger and tool answers are balanced by symmetry instead (and
# must not be dealt: asking only when the scene can serve the card makes a session's later answers differ
# from its earlier ones more often than chance).
DECKS: dict[str, tuple[str, ...]] = {
    "yes_no": ("yes", "no"),
    "comparison-more": ("yes", "no"),
    "two_image": ("first", "second"),
    "count-objects": ("1", "2", "3", "4"),
    "count-shape": ("0", "1", "2", "3", "4"),
}
DECK_BLOCK = 25  # copies of each class per shuffled block
MIN_TURNS, MAX_TURNS = 2, 6


@dataclass(frozen=True)
class QuestionMix:
    """How often a CRAG-MM session opens with each kind of turn and which mode its middle turns take."""

    openings: dict[str, float]
    middle: dict[str, float]


MIX = QuestionMix(OPENING_WEIGHTS, MIDDLE_MODES)
EARLIER_MIX = QuestionMix(EARLIER_OPENING_WEIGHTS, EARLIER_MIDDLE_MODES)  # `n2eye demo --quick`


@dataclass
class Turn:
    """One user question and its canonical answer; tool turns also carry the expected call and its result."""

    question: str
    answer: str
    qtype: str
    tool_call: dict[str, Any] | None = None  # {"name": ..., "arguments": {"item": ...}}
    tool_result: str | None = None
    sentence: str | None = None  # the answer said as a sentence, for worlds written with `colour_sentences`


@dataclass
class Session:
    """One conversation: `kind` is "cragmm" (one image), "two_image" or "tool_call"."""

    session_id: str
    kind: str
    scenes: list[Scene]
    turns: list[Turn]
    tools: list[dict[str, Any]] | None = None

    @property
    def images(self) -> list[Image.Image]:
        return [scene.image for scene in self.scenes]


def plural(shape: str) -> str:
    return shape + "s"


def colour_sentence(shape: str, colour: str) -> str:
    """"The circle is red.": the colour word then follows the object's name within the short-convolution
    layers' reach, so answering takes one attention hop (to the image) instead of two (first carrying the
    question's object across the chat template). `n2eye demo --quick` trains on these: in its 2-minute budget,
    bare colour words stayed at chance and sentences reached ~60%; the full run ends higher on bare words."""
    return f"The {shape} is {colour}."


def in_sentences(session: Session) -> Session:
    """The session with every answer that has a sentence form said as that sentence."""
    turns = [replace(t, answer=t.sentence) if t.sentence else t for t in session.turns]
    return replace(session, turns=turns)


def grounding_question(shape: str) -> str:
    return GROUNDING_PROMPT.format(label=shape)


def grounding_answer(objects: Iterable[SceneObject]) -> str:
    """Compact, stable JSON, two decimals always, boxes in reading order (grid row by row, left to right): the
    order of the image tokens, so the model lists boxes in one scan (sorting by x1 instead mixed sizes and rows,
    and a from-scratch model stayed near chance on grounding)."""
    items = sorted(objects, key=reading_order)
    return "[" + ", ".join(
        '{"label": "%s", "bbox": [%.2f, %.2f, %.2f, %.2f]}' % (o.shape, *o.bbox_norm) for o in items
    ) + "]"


def reading_order(obj: SceneObject) -> tuple[int, float]:
    """Sort key: the object's grid row, then its centre from the left (normalised coordinates)."""
    x1, y1, x2, y2 = obj.bbox_norm
    return min(GRID - 1, int((y1 + y2) / 2 * GRID)), (x1 + x2) / 2


class _Decks:
    """Answer decks per key (DECKS): classes dealt in shuffled blocks, exact balance without a pattern."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.decks: dict[str, list[str]] = {}

    def deal(self, key: str) -> str:
        deck = self.decks.setdefault(key, [])
        if not deck:
            deck.extend(DECKS[key] * DECK_BLOCK)
            self.rng.shuffle(deck)
        return deck.pop()


@dataclass
class _Candidate:
    """A possible turn plus what asking it tells a reader who cannot see the image (to avoid leaks)."""

    turn: Turn
    pairs: dict[tuple[str, str], bool] = field(default_factory=dict)
    shapes: tuple[str, ...] = ()  # shapes whose count becomes (partly) known
    position: tuple[str, str, str] | None = None  # (colour, shape, axis)
    kind: str = ""  # "bigger", "more", "count", ... (default: the turn's qtype)


@dataclass
class _Knowledge:
    """What earlier turns of a session reveal; later turns whose answer would follow from it are not asked."""

    pairs: dict[tuple[str, str], bool] = field(default_factory=dict)
    counted: set[str] = field(default_factory=set)
    positions: set[tuple[str, str, str]] = field(default_factory=set)
    used: Counter[str] = field(default_factory=Counter)

    def knows_shape(self, shape: str) -> bool:
        return any(s == shape for _, s in self.pairs)

    def knows_colour(self, colour: str) -> bool:
        return any(c == colour for c, _ in self.pairs)

    def learn(self, cand: _Candidate) -> None:
        self.pairs.update(cand.pairs)
        self.counted.update(cand.shapes)
        if cand.position:
            self.positions.add(cand.position)
        self.used[cand.kind or cand.turn.qtype] += 1


def _unique_pair(scene: Scene, obj: SceneObject) -> bool:
    return scene.count(obj.shape, obj.colour) == 1


def _colour_candidates(scene: Scene, know: _Knowledge) -> list[_Candidate]:
    out = []
    if know.used["bigger"]:  # "bigger" named two colours that no other object has
        return out
    for shape in SHAPES:
        found = scene.find(shape)
        if len(found) != 1 or know.knows_shape(shape):
            continue
        colour = found[0].colour
        pairs = {(c, shape): c == colour for c in COLOURS}
        turn = Turn(f"What colour is the {shape}?", colour, "colour", sentence=colour_sentence(shape, colour))
        out.append(_Candidate(turn, pairs))
    return out


def _shape_candidates(scene: Scene, know: _Knowledge) -> list[_Candidate]:
    out: list[_Candidate] = []
    if know.counted or know.used["bigger"]:  # counts favour some shapes; "bigger" favours squares
        return out
    for colour in COLOURS:
        found = scene.find(colour=colour)
        if len(found) != 1 or know.knows_colour(colour):
            continue
        shape = found[0].shape
        pairs = {(colour, s): s == shape for s in SHAPES}
        out.append(_Candidate(Turn(f"What shape is the {colour} object?", shape, "shape"), pairs))
    return out


def _position_candidates(scene: Scene, know: _Knowledge) -> list[_Candidate]:
    out: list[_Candidate] = []
    if know.positions:  # objects take room: a second object is likelier on the other side of the first
        return out
    for obj in scene.objects:
        if not _unique_pair(scene, obj):
            continue
        for axis, words in (("x", "on the left or the right"), ("y", "at the top or the bottom")):
            answer = side_of(obj, axis, scene.size)
            if answer is None:
                continue
            question = f"Is the {obj.colour} {obj.shape} {words}?"
            out.append(
                _Candidate(
                    Turn(question, answer, "position"),
                    {(obj.colour, obj.shape): True},
                    position=(obj.colour, obj.shape, axis),
                )
            )
    return out


def _yes_no_turn(rng: random.Random, decks: _Decks, scene: Scene) -> _Candidate:
    """The opening yes/no: answer dealt, then a pair that gives it (there are 12 pairs and at most 4 objects)."""
    want = decks.deal("yes_no")
    pairs = [(c, s) for c in COLOURS for s in SHAPES if bool(scene.count(s, c)) == (want == "yes")]
    colour, shape = rng.choice(pairs)
    return _Candidate(Turn(f"Is there a {colour} {shape}?", want, "yes_no"), {(colour, shape): want == "yes"})


def _bigger_candidates(scene: Scene, know: _Knowledge) -> list[_Candidate]:
    """Before any colour/shape/position turn (their answers and the sizes depend on each other); both orders."""
    out: list[_Candidate] = []
    if know.pairs or know.positions or know.used["bigger"]:
        return out
    singles = [o for o in scene.objects if scene.count(colour=o.colour) == 1]
    for a in singles:
        for b in singles:
            big = None if a is b else bigger_of(a, b)
            if big is None:
                continue
            question = f"Which is bigger, the {a.colour} object or the {b.colour} object?"
            out.append(_Candidate(Turn(question, big.colour, "comparison"), kind="bigger"))
    return out


def _grounding_candidates(scene: Scene, know: _Knowledge) -> list[_Candidate]:
    out = []
    for shape in SHAPES:
        found = scene.find(shape)
        if not found or any(s == shape for _, s, _ in know.positions):
            continue
        out.append(_Candidate(Turn(grounding_question(shape), grounding_answer(found), "grounding")))
    return out


def _opening(
    rng: random.Random, decks: _Decks, size: int, weights: dict[str, float]
) -> tuple[_Candidate | None, Scene]:
    """The optional first turn and its scene, answer first (dealt), so each of its question texts is balanced."""
    kind = rng.choices(list(weights), weights=list(weights.values()))[0]
    if kind in ("none", "yes_no"):
        scene = make_scene(rng, size)
        return (_yes_no_turn(rng, decks, scene) if kind == "yes_no" else None), scene
    if kind == "corner":  # find by place, answer the shape; later turns may not ask shapes or places
        while True:
            scene = make_scene(rng, size)
            corners = [(o, side_of(o, "y", size), side_of(o, "x", size)) for o in scene.objects]
            corners = [c for c in corners if c[1] and c[2]]
            if corners:
                break
        obj, row, column = rng.choice(corners)
        turn = Turn(f"What shape is at the {row} {column}?", obj.shape, "shape")
        return _Candidate(turn, shapes=(obj.shape,), position=(obj.colour, obj.shape, "xy"), kind="corner"), scene
    if kind == "count-objects":
        k = int(decks.deal(kind))
        scene = make_scene(rng, size, shapes=[rng.choice(SHAPES) for _ in range(k)])
        return _Candidate(Turn("How many objects are there?", str(k), "count"), kind="count"), scene
    if kind == "count-shape":
        shape = rng.choice(SHAPES)
        k = int(decks.deal(kind))
        others = [s for s in SHAPES if s != shape]
        shapes = [shape] * k + [rng.choice(others) for _ in range(rng.randint(max(k, MIN_OBJECTS), MAX_OBJECTS) - k)]
        rng.shuffle(shapes)
        turn = Turn(f"How many {plural(shape)} are there?", str(k), "count")
        return _Candidate(turn, shapes=(shape,), kind="count"), make_scene(rng, size, shapes=shapes)
    a, b = rng.sample(SHAPES, 2)
    while (scene := make_scene(rng, size)).count(a) == scene.count(b):
        pass
    if (decks.deal("comparison-more") == "yes") != (scene.count(a) > scene.count(b)):
        a, b = b, a
    answer = "yes" if scene.count(a) > scene.count(b) else "no"
    turn = Turn(f"Are there more {plural(a)} than {plural(b)}?", answer, "comparison")
    return _Candidate(turn, shapes=(a, b), kind="more"), scene


_MIDDLE = {
    "colour": _colour_candidates,
    "shape": _shape_candidates,
    "position": _position_candidates,
    "comparison": _bigger_candidates,
}


def _cragmm_session(
    rng: random.Random, decks: _Decks, session_id: str, size: int, mix: QuestionMix = MIX
) -> Session:
    """One image, 2-6 turns: an optional opening (count, more-than, yes/no or a corner's shape), middle turns,
    optional grounding."""
    while True:
        know = _Knowledge()
        opening, scene = _opening(rng, decks, size, mix.openings)
        turns: list[Turn] = []
        if opening is not None:
            know.learn(opening)
            turns.append(opening.turn)
        target = rng.randint(MIN_TURNS, MAX_TURNS)
        ground = rng.random() < GROUNDING_PROBABILITY
        modes = dict(mix.middle)
        if opening is not None and opening.kind != "count":
            del modes["comparison"]  # "bigger" needs nothing known about the scene's colours and shapes
        if opening is not None and opening.shapes:
            del modes["shape"]  # known counts make some shapes likelier
        mode = rng.choices(list(modes), weights=list(modes.values()))[0]
        if mode == "comparison" and opening is None:  # a fresh scene with a clear size difference to ask about
            while not _bigger_candidates(scene, know):
                scene = make_scene(rng, size)
        for _ in range(target - len(turns) - int(ground)):
            for _ in range(SLOT_DRAWS):
                qtype = rng.choices((mode, "position"), weights=(1.0, POSITION_WEIGHT))[0]
                candidates = _MIDDLE[qtype](scene, know)
                if candidates:
                    cand = rng.choice(candidates)
                    know.learn(cand)
                    turns.append(cand.turn)
                    break
        if ground or len(turns) < MIN_TURNS:
            grounding = _grounding_candidates(scene, know)
            if grounding:
                turns.append(rng.choice(grounding).turn)
        if MIN_TURNS <= len(turns) <= MAX_TURNS:
            return Session(session_id, "cragmm", [scene], turns)


def _two_image_session(rng: random.Random, decks: _Decks, session_id: str, size: int) -> Session:
    """Two scenes, 1-2 turns; the image order is chosen so "first"/"second" stays balanced."""
    while True:
        a, b = make_scene(rng, size), make_scene(rng, size)
        options: list[tuple[str, str | None]] = [
            (f"Which image has more {plural(s)}?", s) for s in SHAPES if a.count(s) != b.count(s)
        ]
        if len(a.objects) != len(b.objects):
            options.append(("Which image has more objects?", None))
        if options:
            break
    question, shape = rng.choice(options)

    def more(x: Scene, y: Scene) -> bool:
        return (x.count(shape) if shape else len(x.objects)) > (y.count(shape) if shape else len(y.objects))

    want = decks.deal("two_image")
    if (want == "first") != more(a, b):
        a, b = b, a
    turns = [Turn(question, want, "two_image")]
    # A follow-up about one image: its answer (a colour) is independent of the counts compared above, which a
    # second "which image" question would not be.
    index = rng.randrange(2)
    scene = (a, b)[index]
    singles = [o for o in scene.objects if scene.count(o.shape) == 1]
    if singles and rng.random() < TWO_IMAGE_FOLLOW_UP:
        obj = rng.choice(singles)
        question = f"What colour is the {obj.shape} in the {('first', 'second')[index]} image?"
        turns.append(Turn(question, obj.colour, "colour", sentence=colour_sentence(obj.shape, obj.colour)))
    return Session(session_id, "two_image", [a, b], turns)


def _tool_session(rng: random.Random, decks: _Decks, session_id: str, size: int) -> Session:
    """1-2 tool requests naming only the shape; the call's argument needs the colour from the image."""

    def singles(scene: Scene) -> list[SceneObject]:
        return [o for o in scene.objects if scene.count(o.shape) == 1]

    while not singles(scene := make_scene(rng, size)):
        pass
    options = singles(scene)
    turns: list[Turn] = []
    for obj in rng.sample(options, min(len(options), rng.randint(1, 2))):
        name = rng.choice(list(TOOL_REQUESTS))
        item = f"{obj.colour} {obj.shape}"
        if name == "lookup_price":
            price = rng.randint(2, 9)
            result = json.dumps({"item": item, "price": price})
            final = f"The {item} costs {price} dollars."
        else:
            result = json.dumps({"item": item, "status": "added"})
            final = f"Added the {item} to your cart."
        call = {"name": name, "arguments": {"item": item}}
        turns.append(Turn(TOOL_REQUESTS[name].format(shape=obj.shape), final, "tool_call", call, result))
    return Session(session_id, "tool_call", [scene], turns, tools=TOOLS)


def make_sessions(
    n: int,
    seed: int,
    *,
    size: int = 96,
    two_image_fraction: float = TWO_IMAGE_FRACTION,
    tool_fraction: float = TOOL_FRACTION,
    id_prefix: str | None = None,
    mix: QuestionMix | None = None,
) -> list[Session]:
    """`n` sessions, deterministic for `seed` (and a prefix of a longer run with the same seed). `mix`: how
    sessions open and which mode their middle turns take (default `MIX`)."""
    rng = random.Random(seed)
    decks = _Decks(rng)
    prefix = id_prefix if id_prefix is not None else f"s{seed}"
    sessions = []
    for index in range(n):
        session_id = f"{prefix}-{index:06d}"
        draw = rng.random()
        if draw < two_image_fraction:
            sessions.append(_two_image_session(rng, decks, session_id, size))
        elif draw < two_image_fraction + tool_fraction:
            sessions.append(_tool_session(rng, decks, session_id, size))
        else:
            sessions.append(_cragmm_session(rng, decks, session_id, size, mix or MIX))
    return sessions
