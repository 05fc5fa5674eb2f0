"""The "shapes world": a synthetic multi-turn VQA set that a tiny vision-language model learns on CPU.

Why it exists: `n2eye demo` must show, in minutes and without downloads, that a model trained from scratch
*sees*. So every answer here depends on the image, answers are short canonical words, and each question type
is balanced so that a text-only guess stays at chance (`chance_levels`, `blind_baseline`).

The world: a 96x96 image (by default) with a light, low-saturation plain background and 1-4 objects, one per
cell of a 3x3 grid: a circle, square or triangle in red, green, blue or yellow, 16-28 px wide. Sessions are CRAG-MM-like
(one image, 2-6 mixed turns) and are written in the CRAG-MM v0.1.2 layout (`write_cragmm`); two-image and
tool-call sessions do not fit CRAG-MM and go to a `messages` JSONL file beside it (`write_messages`).

Where the question type ends up after the adapters (`conversation_qtypes` reads both, one per user turn):
* CRAG-MM parquet: `conversation["metadata"]["turns"][i]["query_category"]` (a ClassLabel whose names are
  `QTYPES`);
* messages JSONL: the adapter keeps only the row `id`, so the id is `"<session_id>:<qtype>+<qtype>..."`
  (`conversation["metadata"]["id"]`); the file also has a `metadata` column with the qtypes, which the
  adapter drops today.

Blind to the image, nothing beats chance by much: answers are dealt from shuffled decks or balanced by
symmetry, and a session never asks what its earlier turns give away (see `_Knowledge`). `blind_baseline`
measures the best text-only guess on held-out sessions; `chance_levels` gives the reference per qtype.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ..eval import scoring

# ------------------------------------------------------------------------------------------- the world

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Saturated, far apart in hue: a tiny ViT separates them from a few pixels; names are one common word each.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 90, 220),
    "yellow": (235, 195, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
# Light and low-saturation, so no background can be mistaken for an object colour (or for blank grey 128).
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (236, 236, 236),
    (244, 238, 222),
    (222, 232, 240),
    (236, 226, 238),
    (226, 238, 228),
    (242, 230, 222),
)
BLANK_GREY = (128, 128, 128)
OBJECT_JITTER = 12  # per-channel colour jitter of objects: variety without changing the colour's name
BACKGROUND_JITTER = 6
MIN_OBJECTS, MAX_OBJECTS = 1, 4
# Objects sit one per cell of a GRID x GRID layout, centred (give or take CELL_JITTER px) in their cell: the
# demo's vision tower sees one cell per image token (patch 16, pixel unshuffle 2 at 96 px), so a from-scratch
# encoder learns shapes in minutes instead of having to find them anywhere in the image.
GRID = 3
SIDE_FRACTIONS = (0.5, 0.625, 0.75, 0.875)  # object side as a fraction of the cell: 16-28 px at 96 px
CELL_JITTER = 2
SNAP = 2  # positions and sizes on a 2 px grid: fewer distinct box coordinates to learn
SIDE_MARGIN = 0.12  # "left"/"right" (and top/bottom) only when the centre is this far from the middle
BIGGER_RATIO = 1.3  # "which is bigger" only when both side and area differ by this factor
AREA_FACTOR = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}

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
DOMAIN_NAMES = ("shapes",)
DYNAMISM_NAMES = ("static",)
IMAGE_QUALITY_NAMES = ("clean",)

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
OPENING_WEIGHTS = {"none": 0.25, "yes_no": 0.15, "count-objects": 0.15, "count-shape": 0.35, "more": 0.1}
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
class SceneObject:
    """One drawn object; `bbox` in pixels [x1, y1, x2, y2) and `bbox_norm` divided by the image side."""

    shape: str
    colour: str
    size: int
    bbox: tuple[int, int, int, int]
    bbox_norm: tuple[float, float, float, float]

    @property
    def center(self) -> tuple[float, float]:
        return (self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2

    @property
    def area(self) -> float:
        return AREA_FACTOR[self.shape] * self.size * self.size

    def cell(self, image_size: int) -> int:
        """Index (row-major) of the GRID x GRID cell holding the object's centre."""
        cell = image_size / GRID
        x, y = self.center
        return min(GRID - 1, int(y // cell)) * GRID + min(GRID - 1, int(x // cell))


@dataclass
class Scene:
    """An RGB image and the ground truth of what is drawn on it."""

    image: Image.Image
    objects: list[SceneObject]
    size: int
    background: tuple[int, int, int]

    def count(self, shape: str | None = None, colour: str | None = None) -> int:
        return len(self.find(shape, colour))

    def find(self, shape: str | None = None, colour: str | None = None) -> list[SceneObject]:
        return [o for o in self.objects if shape in (None, o.shape) and colour in (None, o.colour)]


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


# ---------------------------------------------------------------------------------------------- scenes


def _snap(value: float) -> int:
    return int(round(value / SNAP)) * SNAP


def _jitter(rng: random.Random, rgb: tuple[int, int, int], amount: int) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _place(rng: random.Random, sides: list[int], size: int) -> list[tuple[int, int]]:
    """Top-left corners for boxes of `sides`: distinct random cells, each box centred in its cell (jittered)."""
    cell = size // GRID
    corners = []
    for side, index in zip(sides, rng.sample(range(GRID * GRID), len(sides))):
        row, col = divmod(index, GRID)
        slack = min(CELL_JITTER, (cell - side) // 2)
        x = col * cell + (cell - side) // 2 + _snap(rng.randint(-slack, slack))
        y = row * cell + (cell - side) // 2 + _snap(rng.randint(-slack, slack))
        corners.append((min(max(x, col * cell), (col + 1) * cell - side), min(max(y, row * cell), (row + 1) * cell - side)))
    return corners


def _draw(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb: tuple[int, int, int]) -> None:
    x1, y1, x2, y2 = box[0], box[1], box[2] - 1, box[3] - 1
    if shape == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=rgb)
    elif shape == "square":
        draw.rectangle((x1, y1, x2, y2), fill=rgb)
    else:
        draw.polygon([(x1, y2), (x2, y2), ((x1 + x2) / 2, y1)], fill=rgb)


def object_sides(size: int) -> list[int]:
    """The object side lengths (px) a scene of `size` px can hold, smallest first."""
    return sorted({_snap(f * (size // GRID)) for f in SIDE_FRACTIONS})


def make_scene(
    rng: random.Random,
    size: int = 96,
    *,
    shapes: Sequence[str] | None = None,
    colours: Sequence[str] | None = None,
    n_objects: int | None = None,
) -> Scene:
    """A random scene; `shapes`/`colours` (one per object) or `n_objects` pin its contents, the rest is random."""
    if shapes is not None:
        n = len(shapes)
    elif colours is not None:
        n = len(colours)
    else:
        n = n_objects if n_objects is not None else rng.randint(MIN_OBJECTS, MAX_OBJECTS)
    if not MIN_OBJECTS <= n <= MAX_OBJECTS:
        raise ValueError(f"a scene holds {MIN_OBJECTS}-{MAX_OBJECTS} objects, got {n}")
    shape_list = list(shapes) if shapes is not None else [rng.choice(SHAPES) for _ in range(n)]
    colour_list = list(colours) if colours is not None else [rng.choice(COLOURS) for _ in range(n)]
    cell = size // GRID
    sides = sorted((_snap(rng.choice(SIDE_FRACTIONS) * cell) for _ in range(n)), reverse=True)
    corners = _place(rng, sides, size)
    background = _jitter(rng, rng.choice(BACKGROUNDS), BACKGROUND_JITTER)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    objects = []
    for shape, colour, side, (x, y) in zip(shape_list, colour_list, sides, corners):
        box = (x, y, x + side, y + side)
        _draw(draw, shape, box, _jitter(rng, PALETTE[colour], OBJECT_JITTER))
        norm = tuple(v / size for v in box)
        objects.append(SceneObject(shape, colour, side, box, norm))  # type: ignore[arg-type]
    return Scene(image=image, objects=objects, size=size, background=background)


# ------------------------------------------------------------------------------------ question helpers


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


def side_of(obj: SceneObject, axis: str, size: int) -> str | None:
    """"left"/"right" (axis x) or "top"/"bottom" (axis y) when clearly off-centre, else None."""
    centre = obj.center[0 if axis == "x" else 1]
    offset = centre - size / 2
    if abs(offset) < SIDE_MARGIN * size:
        return None
    if axis == "x":
        return "left" if offset < 0 else "right"
    return "top" if offset < 0 else "bottom"


def bigger_of(a: SceneObject, b: SceneObject) -> SceneObject | None:
    """The clearly bigger one (side and drawn area both BIGGER_RATIO larger), else None."""
    for big, small in ((a, b), (b, a)):
        if big.size >= BIGGER_RATIO * small.size and big.area >= BIGGER_RATIO * small.area:
            return big
    return None


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


def _opening(rng: random.Random, decks: _Decks, size: int) -> tuple[_Candidate | None, Scene]:
    """The optional first turn and its scene, answer first (dealt), so each of its question texts is balanced."""
    kind = rng.choices(list(OPENING_WEIGHTS), weights=list(OPENING_WEIGHTS.values()))[0]
    if kind in ("none", "yes_no"):
        scene = make_scene(rng, size)
        return (_yes_no_turn(rng, decks, scene) if kind == "yes_no" else None), scene
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
    rng: random.Random, decks: _Decks, session_id: str, size: int, middle_modes: dict[str, float] | None = None
) -> Session:
    """One image, 2-6 turns: an optional opening (count, more-than or yes/no), middle turns, optional grounding."""
    while True:
        know = _Knowledge()
        opening, scene = _opening(rng, decks, size)
        turns: list[Turn] = []
        if opening is not None:
            know.learn(opening)
            turns.append(opening.turn)
        target = rng.randint(MIN_TURNS, MAX_TURNS)
        ground = rng.random() < GROUNDING_PROBABILITY
        modes = dict(middle_modes or MIDDLE_MODES)
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
    middle_modes: dict[str, float] | None = None,
) -> list[Session]:
    """`n` sessions, deterministic for `seed` (and a prefix of a longer run with the same seed). `middle_modes`:
    the weights of a session's middle-turn mode (default `MIDDLE_MODES`)."""
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
            sessions.append(_cragmm_session(rng, decks, session_id, size, middle_modes))
    return sessions


# ------------------------------------------------------------------------------------------- scoring
# Grounding is scored with the same functions as `n2eye eval`, so chance levels and results compare.


def _boxes(answer: str) -> list[list[float]]:
    return [box["bbox"] for box in scoring.parse_boxes(answer) or []]


def _fixed_box_score(box: Sequence[float], target: str) -> float:
    """Grounding score of always answering one fixed box."""
    return scoring.grounding_score([{"label": "", "bbox": list(box)}], target)["iou"]


def _all_turns(sessions: Iterable[Session]) -> Iterable[Turn]:
    for session in sessions:
        yield from session.turns


def turn_label(turn: Turn) -> str:
    """What is scored for a turn: the answer, or for tool turns "name(item)" of the expected call."""
    if turn.tool_call is not None:
        return f"{turn.tool_call['name']}({turn.tool_call['arguments']['item']})"
    return turn.answer


def _best_fixed_box_score(targets: list[str]) -> float:
    """Expected grounding score of the best single fixed box (the mean box, or a centred square)."""
    boxes = [box for t in targets for box in _boxes(t)]
    if not boxes:
        return 0.0
    mean = [sum(b[i] for b in boxes) / len(boxes) for i in range(4)]
    guesses = [mean] + [[0.5 - h, 0.5 - h, 0.5 + h, 0.5 + h] for h in (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)]
    return max(sum(_fixed_box_score(g, t) for t in targets) / len(targets) for g in guesses)


def chance_levels(sessions: Sequence[Session] | None = None) -> dict[str, float]:
    """Accuracy (IoU for grounding) a model that ignores the image can expect, per qtype.

    Fixed by construction where answers are balanced (colour 1/4, shape 1/3, binary 1/2, tool 1/4);
    measured on `sessions` (default: a fixed reference sample) for count (largest answer share) and
    grounding (best fixed box).
    """
    if sessions is None:
        return dict(_reference_chance())
    counts = Counter(t.answer for t in _all_turns(sessions) if t.qtype == "count")
    grounding = [t.answer for t in _all_turns(sessions) if t.qtype == "grounding"]
    return {
        "colour": 1 / len(COLOURS),
        "shape": 1 / len(SHAPES),
        "count": max(counts.values()) / sum(counts.values()) if counts else 0.0,
        "position": 0.5,
        "yes_no": 0.5,
        "comparison": 0.5,
        "grounding": _best_fixed_box_score(grounding),
        "two_image": 0.5,
        "tool_call": 1 / len(COLOURS),
    }


@lru_cache(maxsize=1)
def _reference_chance() -> tuple[tuple[str, float], ...]:
    return tuple(chance_levels(make_sessions(1500, seed=20240601)).items())


def blind_baseline(train: Sequence[Session], evaluate: Sequence[Session]) -> dict[str, float]:
    """The best text-only model, measured: the majority answer per question text on `train`, scored on
    `evaluate` (grounding: the train mean box). Near `chance_levels` means the questions need the image."""
    by_text: dict[str, Counter[str]] = defaultdict(Counter)
    by_type: dict[str, Counter[str]] = defaultdict(Counter)
    train_boxes: dict[str, list[list[float]]] = defaultdict(list)
    for turn in _all_turns(train):
        if turn.qtype == "grounding":
            train_boxes[turn.question] += _boxes(turn.answer)
            continue
        by_text[turn.question][turn_label(turn)] += 1
        by_type[turn.qtype][turn_label(turn)] += 1
    scores: dict[str, list[float]] = defaultdict(list)
    all_boxes = [b for boxes in train_boxes.values() for b in boxes]
    for turn in _all_turns(evaluate):
        if turn.qtype == "grounding":
            boxes = train_boxes.get(turn.question) or all_boxes
            guess = [sum(b[i] for b in boxes) / len(boxes) for i in range(4)] if boxes else [0.25, 0.25, 0.75, 0.75]
            scores["grounding"].append(_fixed_box_score(guess, turn.answer))
            continue
        counter = by_text.get(turn.question) or by_type.get(turn.qtype) or Counter()
        guess = counter.most_common(1)[0][0] if counter else ""
        scores[turn.qtype].append(float(guess == turn_label(turn)))
    return {q: sum(v) / len(v) for q, v in scores.items()}


def qtype_counts(sessions: Iterable[Session]) -> dict[str, int]:
    return dict(Counter(t.qtype for t in _all_turns(sessions)))


# ------------------------------------------------------------------------------------------- writing


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_hash(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def cragmm_features() -> Any:
    """CRAG-MM v0.1.2 features (turns/answers as dicts of lists) with our own label names."""
    from datasets import ClassLabel, Features, List, Value
    from datasets import Image as ImageFeature

    return Features(
        {
            "session_id": Value("string"),
            "image": ImageFeature(),
            "image_url": Value("string"),
            "turns": {
                "interaction_id": List(Value("string")),
                "query": List(Value("string")),
                "domain": List(ClassLabel(names=list(DOMAIN_NAMES))),
                "query_category": List(ClassLabel(names=list(QTYPES))),
                "dynamism": List(ClassLabel(names=list(DYNAMISM_NAMES))),
                "image_quality": List(ClassLabel(names=list(IMAGE_QUALITY_NAMES))),
            },
            "answers": {"interaction_id": List(Value("string")), "ans_full": List(Value("string"))},
        }
    )


def cragmm_row(session: Session) -> dict[str, Any]:
    """One CRAG-MM v0.1.2 row (labels as integers, as on the hub)."""
    if session.kind != "cragmm":
        raise ValueError(f"session {session.session_id} is {session.kind}; only one-image sessions fit CRAG-MM")
    ids = [f"{session.session_id}-t{i}" for i in range(len(session.turns))]
    n = len(ids)
    return {
        "session_id": session.session_id,
        "image": {"bytes": png_bytes(session.scenes[0].image), "path": None},
        "image_url": "",
        "turns": {
            "interaction_id": ids,
            "query": [t.question for t in session.turns],
            "domain": [0] * n,
            "query_category": [QTYPES.index(t.qtype) for t in session.turns],
            "dynamism": [0] * n,
            "image_quality": [0] * n,
        },
        "answers": {"interaction_id": ids, "ans_full": [t.answer for t in session.turns]},
    }


def session_messages(session: Session, image_items: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """HF chat messages for a session: all images in the first user turn, OpenAI-style tool calls.

    `image_items` are the image content items (default `{"type": "image"}`, as the adapters return them).
    """
    items = list(image_items) if image_items is not None else [{"type": "image"} for _ in session.scenes]
    messages: list[dict[str, Any]] = []
    for index, turn in enumerate(session.turns):
        content = (items if index == 0 else []) + [{"type": "text", "text": turn.question}]
        messages.append({"role": "user", "content": content})
        if turn.tool_call is None:
            messages.append({"role": "assistant", "content": turn.answer})
            continue
        call_id = f"call_{index}"
        call = {"id": call_id, "type": "function", "function": dict(turn.tool_call)}
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        name = turn.tool_call["name"]
        messages.append({"role": "tool", "tool_call_id": call_id, "name": name, "content": turn.tool_result})
        messages.append({"role": "assistant", "content": turn.answer})
    return messages


def messages_id(session: Session) -> str:
    """The row id of an extra session, `<session_id>:<qtype>+<qtype>...` (one per user turn): the id is the
    one row field the messages adapter keeps, so it carries the qtypes."""
    return f"{session.session_id}:{'+'.join(t.qtype for t in session.turns)}"


def qtypes_from_id(row_id: str) -> list[str]:
    return row_id.rsplit(":", 1)[-1].split("+")


def to_conversation(session: Session) -> dict[str, Any]:
    """The Conversation the adapters would read back from the written files (for in-memory use)."""
    conversation: dict[str, Any] = {
        "messages": session_messages(session),
        "images": list(session.images),
        "metadata": {
            "format": "synthetic",
            "session_id": session.session_id,
            "kind": session.kind,
            "qtypes": [t.qtype for t in session.turns],
        },
    }
    if session.tools:
        conversation["tools"] = session.tools
    return conversation


def blank_image(size: int = 96) -> Image.Image:
    """Uniform grey (no object or background colour is near it): the image for the needs-the-image check."""
    return Image.new("RGB", (size, size), BLANK_GREY)


def conversation_qtypes(conversation: dict[str, Any]) -> list[str]:
    """One qtype per user turn of a Conversation read back by either adapter (or from `to_conversation`)."""
    meta = conversation.get("metadata") or {}
    if meta.get("format") == "cragmm":
        return [str(t["query_category"]) for t in meta["turns"]]
    if meta.get("format") == "synthetic":
        return list(meta["qtypes"])
    return qtypes_from_id(str(meta.get("id", "")))


def write_messages(sessions: Sequence[Session], out_dir: str | Path, split: str) -> Path | None:
    """The two-image / tool-call sessions as `<split>-extra.jsonl`, images as PNGs in `<split>-images/`."""
    extra = [s for s in sessions if s.kind != "cragmm"]
    out = Path(out_dir)
    if not extra:
        (out / f"{split}-extra.jsonl").unlink(missing_ok=True)  # never leave a stale file from an earlier run
        return None
    image_dir = out / f"{split}-images"
    image_dir.mkdir(parents=True, exist_ok=True)
    path = out / f"{split}-extra.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for session in extra:
            items = []
            for k, scene in enumerate(session.scenes):
                name = f"{session.session_id}-{k}.png"
                scene.image.save(image_dir / name, format="PNG")
                items.append({"type": "image", "image": f"{split}-images/{name}"})
            row: dict[str, Any] = {
                "id": messages_id(session),
                "messages": session_messages(session, items),
                "metadata": {
                    "session_id": session.session_id,
                    "kind": session.kind,
                    "qtypes": [t.qtype for t in session.turns],
                    "split": split,
                },
            }
            if session.tools:
                row["tools"] = session.tools
            fh.write(json.dumps(row) + "\n")
    return path


def write_cragmm(sessions: Sequence[Session], out_dir: str | Path, split: str) -> Path:
    """One-image sessions as `<split>.parquet` in the CRAG-MM v0.1.2 layout; the others via `write_messages`."""
    import datasets

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [cragmm_row(s) for s in sessions if s.kind == "cragmm"]
    path = out / f"{split}.parquet"
    features = cragmm_features()
    columns = {name: [row[name] for row in rows] for name in features}  # from_dict: also fine with no rows
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
    write_messages(sessions, out, split)
    return path


def _heldout_sessions(
    n: int, seed: int, seen: set[str], size: int = 96, middle_modes: dict[str, float] | None = None
) -> list[Session]:
    """Held-out sessions whose images never appear in train (pixel hashes), from a disjoint seed."""
    kept: list[Session] = []
    attempt = 0
    while len(kept) < n:
        batch = make_sessions(n, seed + 7919 * (attempt + 1), size=size, id_prefix="heldout", middle_modes=middle_modes)
        kept += [s for s in batch if not any(image_hash(i) in seen for i in s.images)]
        attempt += 1
    kept = kept[:n]
    for index, session in enumerate(kept):
        session.session_id = f"heldout-{index:06d}"
    return kept


def tokenizer_corpus(n_sessions: int = 600, seed: int = 104723) -> list[str]:
    """The world's phrasing (questions, answers, tool results and schemas) from sessions of their own seed, for
    the demo's tokenizer to learn its words whole, as the real LFM2 vocabulary has them: the model-card grounding
    prompt is then 44 tokens instead of 82 and a world's text ~16% shorter, so each training step of packed rows
    holds more conversations. Coordinates stay "0" "." "NN" (digits are split before merging)."""
    texts = [json.dumps(TOOLS)]
    for session in make_sessions(n_sessions, seed, id_prefix="tokenizer"):
        texts.append(" ".join(f"{t.question} {t.answer} {t.tool_result or ''}".strip() for t in session.turns))
    return texts


def pixel_statistics(images: Iterable[Image.Image], limit: int = 500) -> tuple[list[float], list[float]]:
    """Per-channel mean and std (0..1) of up to `limit` images: the image processor's normalisation.

    Why: with the usual 0.5/0.5, this world's light backgrounds map every empty cell to a large vector shared by
    all images, and a model trained from scratch then sees nothing (measured: a one-object colour question stayed
    at chance for 120 steps; normalised with the data's own statistics it was right every time within 30).
    """
    import numpy as np

    total, total_sq, n = np.zeros(3), np.zeros(3), 0
    for index, image in enumerate(images):
        if index >= limit:
            break
        pixels = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255.0
        total += pixels.sum(0)
        total_sq += (pixels**2).sum(0)
        n += len(pixels)
    if not n:
        raise ValueError("pixel_statistics needs at least one image")
    mean = total / n
    std = np.sqrt(np.maximum(total_sq / n - mean**2, 1e-12))
    return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]


def write_demo_dataset(
    out_dir: str | Path, n_train: int, n_heldout: int, seed: int = 0, *, size: int = 96,
    colour_sentences: bool = False,
    middle_modes: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Train and held-out splits (CRAG-MM parquet + extra JSONL each), `manifest.json`, and chance levels.
    `colour_sentences`: colour answers as "The circle is red." (`colour_sentence`) instead of "red";
    `middle_modes`: see `make_sessions`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = make_sessions(n_train, seed, size=size, id_prefix="train", middle_modes=middle_modes)
    seen = {image_hash(image) for s in train for image in s.images}
    heldout = _heldout_sessions(n_heldout, seed, seen, size, middle_modes)
    if colour_sentences:
        train, heldout = [in_sentences(x) for x in train], [in_sentences(x) for x in heldout]
    result: dict[str, Any] = {"out_dir": out}
    manifest: dict[str, Any] = {
        "world": {
            "image_size": size,
            "shapes": list(SHAPES),
            "colours": list(COLOURS),
            "objects_per_image": [MIN_OBJECTS, MAX_OBJECTS],
            "grid": GRID,
            "object_side_fraction_of_cell": list(SIDE_FRACTIONS),
            "turns_per_session": [MIN_TURNS, MAX_TURNS],
            "colour_answers": "sentences" if colour_sentences else "words",
            "middle_modes": middle_modes or MIDDLE_MODES,
        },
        "pixel_statistics": dict(zip(("mean", "std"), pixel_statistics(i for s in train for i in s.images))),
        "qtypes": list(QTYPES),
        "qtype_location": {
            "cragmm": 'metadata["turns"][i]["query_category"]',
            "messages": 'metadata["id"] = "<session_id>:<qtype>+<qtype>..." (one per user turn)',
        },
        "grounding_score": "n2eye.eval.scoring.grounding_score: optimal one-to-one IoU matching, summed, divided by max(#predicted, #true) boxes",
        "seed": seed,
        "splits": {},
    }
    for split, sessions in (("train", train), ("heldout", heldout)):
        cragmm = write_cragmm(sessions, out, split)
        extra = out / f"{split}-extra.jsonl"
        paths = {"cragmm": cragmm, "messages": extra if extra.is_file() else None}
        result[split] = paths
        manifest["splits"][split] = {
            "cragmm": cragmm.name,
            "messages": extra.name if extra.is_file() else None,
            "sessions": len(sessions),
            "qtype_counts": qtype_counts(sessions),
        }
    levels = chance_levels(heldout) if heldout else chance_levels()
    result["chance_levels"] = levels
    manifest["chance_levels"] = levels
    manifest["blind_baseline"] = blind_baseline(train, heldout) if train and heldout else {}
    result["blind_baseline"] = manifest["blind_baseline"]
    manifest_path = out / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    result["manifest"] = manifest_path
    return result
