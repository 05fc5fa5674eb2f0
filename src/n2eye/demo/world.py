"""The shapes world's pictures: what a scene holds, how it is drawn, and the facts questions ask about it.

Why it exists: `n2eye demo` must show, in minutes and without downloads, that a model trained from scratch
*sees*; this is what it sees. A 96x96 image (by default) with a light, low-saturation plain background and 1-4
objects, one per cell of a 3x3 grid: a circle, square or triangle in red, green, blue or yellow, 16-28 px wide.
Also here: where an object clearly sits (`side_of`) and which of two is clearly bigger (`bigger_of`), the grey
image of the needs-the-image check (`blank_image`), and the images' own statistics for the processor
(`pixel_statistics`). Questions about scenes: `questions`; files: `writers`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw

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


def blank_image(size: int = 96) -> Image.Image:
    """Uniform grey (no object or background colour is near it): the image for the needs-the-image check."""
    return Image.new("RGB", (size, size), BLANK_GREY)


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
