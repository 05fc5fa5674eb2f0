"""LFM2-VL's image policy, token for token, with Pillow instead of torchvision.

Why this module exists: transformers' `Lfm2VlImageProcessor` (the policy the LFM2-VL family was trained with)
needs torchvision, which a checkpoint cannot count on: the files in `n2eye/modeling/` ship inside checkpoints and
import only torch, transformers and Pillow. So the arithmetic is rewritten here (same formulas, same float
operations, same tie-breaks; the comments name the reference functions in
`transformers/models/lfm2_vl/image_processing_lfm2_vl.py` and `processing_lfm2_vl.py`) and the pixels are made with
Pillow. `tests/test_image_policy.py` checks a golden table against transformers' own code.

The policy, with the defaults (a "merged patch" is `encoder_patch_size * downsample_factor` = 32 px square and
becomes one `<image>` token after the projector's pixel unshuffle):

1. An image is *too large* when its sides, rounded to whole merged patches, cover more than
   `max_image_tokens * 32**2 * max_pixels_tolerance` pixels (524,288 px, about 724 x 724).
2. A too-large image is *split* (when `do_image_splitting` and not `min_tiles == max_tiles == 1`): the grid of
   `cols x rows` tiles (`min_tiles <= cols * rows <= max_tiles`) whose ratio is closest to the image's is chosen;
   the whole image is resized to `cols * tile_size x rows * tile_size` and cut into `tile_size` squares, row-major
   (256 tokens each), followed, when `use_thumbnail` and there is more than one tile, by a thumbnail: the
   smart-resized whole image.
3. Any other image is smart-resized: each side rounded to a multiple of 32 px, then, keeping the aspect ratio,
   scaled down to at most `max_image_tokens` merged patches or up to at least `min_image_tokens`.

In the text each `<image>` becomes `<|image_start|>`, then per tile `<|img_row_R_col_C|>` + `<image>` x tokens, then
`<|img_thumbnail|>` + the thumbnail's tokens, then `<|image_end|>`; an unsplit image is `<|image_start|>` +
`<image>` x tokens + `<|image_end|>`.

Pixels: a crop that needs no resize is an exact copy, identical to transformers' (an unsplit image that is already
whole merged patches within the token range, e.g. 320x512; the tiles of an image that is already
`cols * tile_size x rows * tile_size`, e.g. the 3x2 tiles of 1536x1024, though not its thumbnail). Otherwise
Pillow's antialiased resampling (bilinear, the reference's `resample`) stands in for torchvision's
`resize(antialias=True)` on the uint8 image: they never differ by more than 1 grey level; how many values differ by
that 1 depends on the scale factors (rounding in the two passes): from none to about a quarter on random noise
(the tests measure it against torch's interpolation, torchvision's CPU path). After normalisation that is at most
1/127.5 per value.

Where transformers' own output does not fit together we refuse with a `ValueError` instead of copying it (see
`image_layout`): extreme aspect ratios, or `min_image_tokens` so close to `max_image_tokens`, that a resized image
has more patches than transformers pads to; a split into a single tile (`min_tiles=1`) whose token count in the
text would not match its pixels. Images under one encoder patch per side are refused too (transformers would
blow them up to `min_image_tokens` from almost no pixels); every other size gives exactly transformers' layout.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from PIL import Image

# The special-token strings of `Lfm2VlProcessor` (its tokenizer attributes' defaults).
IMAGE_TOKEN = "<image>"
IMAGE_START_TOKEN = "<|image_start|>"
IMAGE_END_TOKEN = "<|image_end|>"
IMAGE_THUMBNAIL_TOKEN = "<|img_thumbnail|>"

# PIL's resampling filter codes (what `preprocessor_config.json` stores as `resample`).
RESAMPLE_CODES = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def tile_marker(row: int, col: int) -> str:
    """The marker before tile (`row`, `col`), both counted from 1 as in the reference's text."""
    return f"<|img_row_{row}_col_{col}|>"


def image_marker_tokens(grid_side: int = 10) -> list[str]:
    """The tile markers for rows and columns 1..`grid_side`, row-major, then `<|img_thumbnail|>`: the tokens (and
    order) LiquidAI's LFM2-VL tokenizers add, 10 x 10 markers covering every grid `max_tiles=10` allows."""
    return [tile_marker(r, c) for r in range(1, grid_side + 1) for c in range(1, grid_side + 1)] + [
        IMAGE_THUMBNAIL_TOKEN
    ]


class UnsupportedImageSize(ValueError):
    """An image size the LFM2-VL policy cannot handle consistently; the message says why and what to do."""


# ---- settings ---------------------------------------------------------------------------------------------------
_POSITIVE_INTS = ("encoder_patch_size", "downsample_factor", "min_image_tokens", "max_image_tokens", "min_tiles",
                  "max_tiles", "tile_size")


@dataclass(frozen=True)
class ImagePolicy:
    """The settings of LFM2-VL's image policy, with `Lfm2VlImageProcessor`'s names and class defaults.

    (LFM2.5-VL's model card recommends `min_image_tokens=32` at inference; the checkpoint's processor config
    decides, the class default is 64.)
    """

    encoder_patch_size: int = 16
    downsample_factor: int = 2
    min_image_tokens: int = 64
    max_image_tokens: int = 256
    do_image_splitting: bool = True
    min_tiles: int = 2
    max_tiles: int = 10
    use_thumbnail: bool = True
    tile_size: int = 512
    max_pixels_tolerance: float = 2.0
    resample: int = RESAMPLE_CODES["bilinear"]

    def __post_init__(self) -> None:
        for name in _POSITIVE_INTS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ImagePolicy.{name} must be a positive integer, got {value!r}.")
        for name in ("do_image_splitting", "use_thumbnail"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ImagePolicy.{name} must be True or False, got {getattr(self, name)!r}.")
        tol = self.max_pixels_tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not math.isfinite(tol) or tol <= 0:
            raise ValueError(
                f"ImagePolicy.max_pixels_tolerance must be a positive finite number, got {tol!r} "
                "(2.0 is transformers' default)."
            )
        if isinstance(self.resample, bool) or self.resample not in RESAMPLE_CODES.values():
            raise ValueError(
                f"ImagePolicy.resample must be a PIL filter code 0..5 or one of {sorted(RESAMPLE_CODES)}, "
                f"got {self.resample!r}."
            )
        if self.min_image_tokens > self.max_image_tokens:
            raise ValueError(
                f"ImagePolicy.min_image_tokens ({self.min_image_tokens}) is more than max_image_tokens "
                f"({self.max_image_tokens}): lower min_image_tokens or raise max_image_tokens."
            )
        if self.do_image_splitting and self.min_tiles > self.max_tiles:
            raise ValueError(
                f"ImagePolicy.min_tiles ({self.min_tiles}) is more than max_tiles ({self.max_tiles}): lower "
                "min_tiles, raise max_tiles, or set do_image_splitting=False."
            )
        if self.tile_size % self.merge_size:
            raise ValueError(
                f"ImagePolicy.tile_size ({self.tile_size}) must be a multiple of encoder_patch_size x "
                f"downsample_factor ({self.merge_size} px) so a tile is whole merged patches; use "
                f"{max(self.merge_size, self.tile_size // self.merge_size * self.merge_size)}."
            )

    @property
    def merge_size(self) -> int:
        """Side in pixels of one merged patch, i.e. one `<image>` token (the reference's `total_factor`)."""
        return self.encoder_patch_size * self.downsample_factor

    @property
    def tile_range(self) -> tuple[int, int]:
        """(min_tiles, max_tiles) as used: (1, 1) when splitting is off, as the reference's `_preprocess` sets."""
        return (self.min_tiles, self.max_tiles) if self.do_image_splitting else (1, 1)

    @property
    def splits(self) -> bool:
        """Whether too-large images are split into tiles (the reference's test in `resize_and_split`)."""
        return self.tile_range != (1, 1)

    @property
    def max_num_patches(self) -> int:
        """Encoder patches every crop is padded to (`pixel_attention_mask` length) in the reference's output."""
        tile_patches = (self.tile_size // self.encoder_patch_size) ** 2 if self.do_image_splitting else 0
        return max(self.max_image_tokens * self.downsample_factor**2, tile_patches)

    @classmethod
    def from_dict(cls, config: Mapping[str, Any], *, strict: bool = True) -> ImagePolicy:
        """Reads the settings from a dict such as an LFM2-VL `preprocessor_config.json`.

        `strict=True` refuses keys that are not settings (catches typos); pass `strict=False` for a whole image
        processor config, whose other keys (`image_mean`, `do_pad`, ...) are then ignored. `resample` may be a
        PIL code or a name ("bilinear").
        """
        if not isinstance(config, Mapping):
            raise ValueError(f"ImagePolicy.from_dict needs a dict of settings, got {type(config).__name__}.")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - names)
        if strict and unknown:
            raise ValueError(
                f"Unknown ImagePolicy setting(s) {unknown}; the settings are {sorted(names)}. Pass strict=False to "
                "ignore other keys of an image processor config."
            )
        values = {k: v for k, v in config.items() if k in names}
        resample = values.get("resample")
        if isinstance(resample, str):
            if resample.lower() not in RESAMPLE_CODES:
                raise ValueError(f"ImagePolicy.resample {resample!r} is not one of {sorted(RESAMPLE_CODES)}.")
            values["resample"] = RESAMPLE_CODES[resample.lower()]
        elif isinstance(resample, int) and not isinstance(resample, bool):
            values["resample"] = int(resample)  # PIL / transformers enums are int subclasses
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict (the keys `Lfm2VlImageProcessor` reads)."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> ImagePolicy:
        """A copy with some settings changed (validated again)."""
        return dataclasses.replace(self, **changes)


# ---- arithmetic (sizes are (width, height), as Pillow's) ----------------------------------------------------------
def _nearest_multiple(value: float, factor: int) -> int:
    # reference: round_by_factor (Python's round, so halves go to the even multiple)
    return round(value / factor) * factor


def _tokens(pixels: int, policy: ImagePolicy) -> int:
    # reference: Lfm2VlProcessor._compute_tokens_for_image (encoder patches, then pixel unshuffle rounding up)
    return math.ceil((pixels // policy.encoder_patch_size) / policy.downsample_factor)


def smart_resize(width: int, height: int, policy: ImagePolicy) -> tuple[int, int]:
    """(width, height) an unsplit image (or a thumbnail) is resized to: whole merged patches, between
    `min_image_tokens` and `max_image_tokens` of them, aspect kept (reference: `Lfm2VlImageProcessor.smart_resize`).
    Each side stays at least one merged patch, which can break the `max_image_tokens` budget for extreme ratios."""
    m = policy.merge_size
    max_pixels = policy.max_image_tokens * m * m
    min_pixels = policy.min_image_tokens * m * m
    new_h = max(m, _nearest_multiple(height, m))
    new_w = max(m, _nearest_multiple(width, m))
    if new_h * new_w > max_pixels:
        shrink = math.sqrt((height * width) / max_pixels)
        new_h = max(m, math.floor(height / shrink / m) * m)
        new_w = max(m, math.floor(width / shrink / m) * m)
    elif new_h * new_w < min_pixels:
        grow = math.sqrt(min_pixels / (height * width))
        new_h = math.ceil(height * grow / m) * m
        new_w = math.ceil(width * grow / m) * m
    return new_w, new_h


def is_image_too_large(width: int, height: int, policy: ImagePolicy) -> bool:
    """Whether the image exceeds one image's budget by more than the tolerance, so it is split when splitting is
    on (reference: `Lfm2VlImageProcessor._is_image_too_large`; note its floor is one encoder patch, not one merged
    patch as in `smart_resize`)."""
    m, p = policy.merge_size, policy.encoder_patch_size
    rounded_h = max(p, _nearest_multiple(height, m))
    rounded_w = max(p, _nearest_multiple(width, m))
    return rounded_h * rounded_w > policy.max_image_tokens * m * m * policy.max_pixels_tolerance


def target_ratios(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    """Candidate grids (cols, rows) with `min_tiles <= cols * rows <= max_tiles`, by tile count
    (reference: `Lfm2VlImageProcessor._target_ratios`). Within one tile count the order is CPython's iteration
    order of the set of tuples, as in the reference, because it decides exact ties in `tile_grid`."""
    grids = {
        (cols, rows)
        for n in range(min_tiles, max_tiles + 1)
        for cols in range(1, n + 1)
        for rows in range(1, n + 1)
        if min_tiles <= cols * rows <= max_tiles
    }
    return sorted(grids, key=lambda grid: grid[0] * grid[1])


def tile_grid(width: int, height: int, policy: ImagePolicy) -> tuple[int, int]:
    """(rows, cols) of the tile grid a split image gets: the grid ratio closest to the image's; on an exact tie the
    later (larger) grid wins when the image has more than half as many pixels as that grid's tiles (reference:
    `find_closest_aspect_ratio` via `_get_grid_layout`). Only meaningful for an image that is split."""
    aspect = width / height
    area = width * height
    best, best_diff = (1, 1), float("inf")
    for cols, rows in target_ratios(*policy.tile_range):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best, best_diff = (cols, rows), diff
        elif diff == best_diff and area > 0.5 * (policy.tile_size * policy.tile_size * cols * rows):
            best = (cols, rows)
    return best[1], best[0]


def thumbnail_size(width: int, height: int, policy: ImagePolicy) -> tuple[int, int] | None:
    """(width, height) of the thumbnail after the tiles, or None when the image gets none (not split, a single
    tile, or `use_thumbnail=False`)."""
    if not (policy.splits and policy.use_thumbnail and is_image_too_large(width, height, policy)):
        return None
    rows, cols = tile_grid(width, height, policy)
    return smart_resize(width, height, policy) if rows * cols > 1 else None


# ---- layout -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PatchGrid:
    """One picture the vision encoder sees: its pixels, encoder patches and `<image>` tokens after unshuffle."""

    width: int
    height: int
    patch_rows: int
    patch_cols: int
    tokens: int

    @classmethod
    def of(cls, width: int, height: int, policy: ImagePolicy) -> PatchGrid:
        """The grid of a `width` x `height` picture (sides are whole merged patches wherever the policy makes one)."""
        p = policy.encoder_patch_size
        return cls(width, height, height // p, width // p, _tokens(height, policy) * _tokens(width, policy))


@dataclass(frozen=True)
class Tile(PatchGrid):
    """A tile: `row`, `col` count from 1 (as in `<|img_row_R_col_C|>`); `box` is (left, top, right, bottom) in the
    resized canvas it is cut from."""

    row: int = 1
    col: int = 1
    box: tuple[int, int, int, int] = (0, 0, 0, 0)


@dataclass(frozen=True)
class ImageLayout:
    """What the LFM2-VL policy makes of one image: the crops in order (tiles row-major, then the thumbnail) and
    their token counts. An unsplit image is one tile at (1, 1) covering the whole resized image."""

    image_size: tuple[int, int]
    resized_size: tuple[int, int]
    canvas_size: tuple[int, int]
    rows: int
    cols: int
    tiles: tuple[Tile, ...]
    thumbnail: PatchGrid | None

    @property
    def is_multi_tile(self) -> bool:
        """Whether the text gets tile markers (the reference's `rows > 1 or cols > 1`)."""
        return self.rows > 1 or self.cols > 1

    @property
    def tokens_per_tile(self) -> int:
        """`<image>` tokens of each tile (all tiles are the same size); of the whole image when unsplit."""
        return self.tiles[0].tokens

    @property
    def crops(self) -> tuple[PatchGrid, ...]:
        """Every picture given to the encoder, in the order of `resize_and_split`."""
        return self.tiles + ((self.thumbnail,) if self.thumbnail is not None else ())

    @property
    def spatial_shapes(self) -> list[tuple[int, int]]:
        """(patch rows, patch cols) per crop: the reference's `spatial_shapes` rows for this image."""
        return [(c.patch_rows, c.patch_cols) for c in self.crops]

    @property
    def total_tokens(self) -> int:
        """`<image>` tokens for the whole image (tiles + thumbnail)."""
        return sum(c.tokens for c in self.crops)

    def sequence_length(self, use_image_special_tokens: bool = True) -> int:
        """Tokenizer tokens the expanded text takes: image tokens plus start/end, tile and thumbnail markers."""
        if not use_image_special_tokens:
            return self.total_tokens
        markers = len(self.tiles) if self.is_multi_tile else 0
        return self.total_tokens + 2 + markers + (1 if self.thumbnail is not None else 0)


def _check_image_size(width: int, height: int, policy: ImagePolicy) -> tuple[int, int]:
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise UnsupportedImageSize(f"Image {name} must be an integer number of pixels, got {value!r}.")
    width, height = int(width), int(height)
    if width < 1 or height < 1:
        raise UnsupportedImageSize(f"The image is {width}x{height} pixels: it is empty. Pass a non-empty image.")
    p = policy.encoder_patch_size
    if width < p or height < p:
        raise UnsupportedImageSize(
            f"The image is {width}x{height} pixels, smaller than one encoder patch: the minimum is {p}x{p}. "
            f"Pad it (or upscale it) to at least {p} pixels on each side."
        )
    return width, height


def image_layout(width: int, height: int, policy: ImagePolicy | None = None) -> ImageLayout:
    """The layout of a `width` x `height` image under `policy` (default: transformers' defaults).

    Raises `UnsupportedImageSize` (a ValueError) where transformers would go wrong: an image under one encoder
    patch per side; a resized image (or thumbnail) with more encoder patches than transformers pads to
    (`policy.max_num_patches`; it would return a `pixel_attention_mask` that does not fit the pixels): an extreme
    aspect ratio or `min_image_tokens` rounding up past the budget; a split into a single tile (`min_tiles=1`)
    whose text token count would not match its pixels.
    """
    policy = policy if policy is not None else ImagePolicy()
    width, height = _check_image_size(width, height, policy)
    resized = smart_resize(width, height, policy)
    split = policy.splits and is_image_too_large(width, height, policy)
    thumbnail = None
    if split:
        rows, cols = tile_grid(width, height, policy)
        t = policy.tile_size
        if rows * cols == 1 and resized != (t, t):
            # reference: the single tile is resized to tile_size, but the text counts smart_resize's tokens
            raise UnsupportedImageSize(
                f"The {width}x{height} image would be split into a single {t}x{t} tile "
                f"({PatchGrid.of(t, t, policy).tokens} tokens) while transformers' Lfm2VlProcessor writes "
                f"{PatchGrid.of(*resized, policy).tokens} tokens for it (the smart-resized {resized[0]}x{resized[1]}): "
                "text and pixels would disagree. Use min_tiles >= 2 (transformers' default)."
            )
        tiles = tuple(
            Tile(*dataclasses.astuple(PatchGrid.of(t, t, policy)), row=r + 1, col=c + 1,
                 box=(c * t, r * t, (c + 1) * t, (r + 1) * t))
            for r in range(rows)
            for c in range(cols)
        )
        canvas = (cols * t, rows * t)
        if policy.use_thumbnail and rows * cols > 1:
            thumbnail = PatchGrid.of(*resized, policy)
            _check_patch_budget(width, height, thumbnail, policy, "thumbnail")
    else:
        rows = cols = 1
        canvas = resized
        single = PatchGrid.of(*resized, policy)
        _check_patch_budget(width, height, single, policy, "resized image")
        tiles = (Tile(*dataclasses.astuple(single), row=1, col=1, box=(0, 0, *resized)),)
    return ImageLayout((width, height), resized, canvas, rows, cols, tiles, thumbnail)


def _check_patch_budget(width: int, height: int, grid: PatchGrid, policy: ImagePolicy, what: str) -> None:
    patches = grid.patch_rows * grid.patch_cols
    if patches <= policy.max_num_patches:
        return
    head = (
        f"LFM2-VL's policy would make the {what} of this {width}x{height} image {grid.width}x{grid.height} pixels = "
        f"{patches} encoder patches ({grid.tokens} tokens), more than the {policy.max_num_patches} that "
        "transformers pads every crop to, so its pixel_attention_mask would not fit the pixels. "
    )
    m = policy.merge_size
    rounded = max(m, _nearest_multiple(height, m)) * max(m, _nearest_multiple(width, m))
    grown = rounded <= policy.max_image_tokens * m * m and rounded < policy.min_image_tokens * m * m
    if not grown:  # smart_resize shrank it (or kept it): the short side was held at one merged patch
        ratio = max(width, height) / min(width, height)
        raise UnsupportedImageSize(
            head + f"The aspect ratio ({ratio:.0f}:1) is too extreme (each side keeps at least {m} px): crop the "
            f"image into pieces or pad it to at most about {policy.max_image_tokens}:1."
        )
    raise UnsupportedImageSize(
        head + f"min_image_tokens ({policy.min_image_tokens}) is too close to max_image_tokens "
        f"({policy.max_image_tokens}) for this size (upscaled sides are rounded up): lower min_image_tokens or "
        "raise max_image_tokens."
    )


# ---- text -------------------------------------------------------------------------------------------------------
def expand_image_tokens(
    layout: ImageLayout,
    image_token: str = IMAGE_TOKEN,
    *,
    use_image_special_tokens: bool = True,
    image_start_token: str = IMAGE_START_TOKEN,
    image_end_token: str = IMAGE_END_TOKEN,
    image_thumbnail_token: str = IMAGE_THUMBNAIL_TOKEN,
) -> str:
    """The text that replaces one `<image>` (reference: `Lfm2VlProcessor._build_image_tokens`): start marker, per
    tile its row/col marker and tokens, the thumbnail marker and tokens, end marker; without special tokens only
    the image tokens remain, in the same order."""
    parts = [image_start_token] if use_image_special_tokens else []
    if layout.is_multi_tile:
        for tile in layout.tiles:
            if use_image_special_tokens:
                parts.append(tile_marker(tile.row, tile.col))
            parts.append(image_token * tile.tokens)
        if layout.thumbnail is not None:
            if use_image_special_tokens:
                parts.append(image_thumbnail_token)
            parts.append(image_token * layout.thumbnail.tokens)
    else:
        parts.append(image_token * layout.tiles[0].tokens)
    if use_image_special_tokens:
        parts.append(image_end_token)
    return "".join(parts)


# ---- pixels -----------------------------------------------------------------------------------------------------
def _resize(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    if image.size == tuple(size):
        return image.copy()  # no resampling: exact (torchvision's antialiased bilinear at scale 1 is the identity)
    return image.resize(size, resample=Image.Resampling(resample))


def resize_and_split(image: Image.Image, policy: ImagePolicy | None = None) -> list[Image.Image]:
    """The RGB pictures the vision encoder sees for `image`: tiles in row-major order, then the thumbnail (one
    picture when unsplit), sized as `image_layout` says (reference: `Lfm2VlImageProcessor.resize_and_split`).
    Non-RGB images are converted first with `image_io.to_rgb` (alpha on white, as transformers does; it also applies
    the EXIF orientation, as our `load_image` does for every image)."""
    policy = policy if policy is not None else ImagePolicy()
    if image.mode != "RGB":
        from .image_io import to_rgb

        image = to_rgb(image)
    layout = image_layout(image.width, image.height, policy)
    canvas = _resize(image, layout.canvas_size, policy.resample)
    if layout.is_multi_tile:
        crops = [canvas.crop(tile.box) for tile in layout.tiles]
    else:
        crops = [canvas]
    if layout.thumbnail is not None:
        crops.append(_resize(image, (layout.thumbnail.width, layout.thumbnail.height), policy.resample))
    return crops


__all__ = [
    "IMAGE_END_TOKEN",
    "IMAGE_START_TOKEN",
    "IMAGE_THUMBNAIL_TOKEN",
    "IMAGE_TOKEN",
    "ImageLayout",
    "ImagePolicy",
    "PatchGrid",
    "Tile",
    "UnsupportedImageSize",
    "expand_image_tokens",
    "image_layout",
    "image_marker_tokens",
    "is_image_too_large",
    "resize_and_split",
    "smart_resize",
    "target_ratios",
    "thumbnail_size",
    "tile_grid",
    "tile_marker",
]
