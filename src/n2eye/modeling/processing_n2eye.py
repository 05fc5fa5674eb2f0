"""N2-Eye processor: tokenizer + the vision backbone's image processor + the LFM2 ChatML chat template.

Ships inside every checkpoint (``trust_remote_code=True``). Two image paths:

* the image processor's own (fixed-resolution SigLIP, or SigLIP2 NaFlex at its `max_num_patches`): each `<image>`
  becomes `<|image_start|>` + `<image>` x (that image's token count) + `<|image_end|>`, the count from the patch grid.
  A fixed-resolution processor may split images Idefics2-style (`image_splitting` in processor_config.json, or
  `do_image_splitting=True` per call): the four quadrants, row-major, then the whole image, each resized to the
  encoder's size, their tokens one after the other in that one block (see `split_quadrants`);
* LFM2-VL's image policy, when the processor config has `image_policy` (`n2eye build` sets it for SigLIP2 NaFlex +
  the pixel-unshuffle projector, the LFM2-VL layout): native resolution, large images split into tiles plus a
  thumbnail, token for token as transformers' `Lfm2VlProcessor` (see `image_policy.py`, `naflex_images.py`).
"""

# No `from __future__ import annotations`: transformers' `_merge_kwargs` reads the kwargs TypedDicts' annotations
# as classes.
import math
import re
from typing import Any

from PIL import Image
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ImagesKwargs, ProcessingKwargs, ProcessorMixin

from .image_io import IMAGE_SOURCE_KEYS, is_image_item, load_image
from .image_policy import IMAGE_THUMBNAIL_TOKEN, ImageLayout, ImagePolicy, expand_image_tokens, tile_marker
from .naflex_images import POLICY_SETTINGS, Normalization, default_settings, naflex_inputs, resolve_settings
from .tool_calls import normalize_tool_calls, parse_tool_calls

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant trained by Liquid AI. You can see and understand images."


# The special tokens of the real LFM2 tokenizer, in id order starting at 0 (the chat format's markers; the image
# tokens `<image>`, `<|image_start|>`, `<|image_end|>` are added by `n2eye build`).
LFM2_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|pad|>",
    "<|startoftext|>",
    "<|endoftext|>",
    "<|fim_pre|>",
    "<|fim_mid|>",
    "<|fim_suf|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|tool_list_start|>",
    "<|tool_list_end|>",
    "<|tool_call_start|>",
    "<|tool_call_end|>",
    "<|tool_response_start|>",
    "<|tool_response_end|>",
)

# The special tokens a model may write: the end of its turn and tool-call markers. Every other special token (turn
# and image structure, tool lists and responses, padding, reserved ones) is suppressed when generating.
GENERATED_SPECIAL_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|tool_call_start|>", "<|tool_call_end|>")


def never_generated_token_ids(tokenizer) -> list[int]:
    """Ids of the special tokens a model must never sample (`<image>`, `<|image_start|>`, `<|im_start|>`, ...):
    sampled, they would forge structure or make the next forward refuse image tokens without pixels."""
    return sorted(
        index
        for index, token in tokenizer.added_tokens_decoder.items()
        if token.special and token.content not in GENERATED_SPECIAL_TOKENS
    )


# Chat-format markers an assistant message may carry as text (LFM2-format training data writes its tool calls so).
ASSISTANT_TEXT_MARKERS = ("<|tool_call_start|>", "<|tool_call_end|>")


class ControlTokenError(ValueError):
    """Message text contains a chat-format control token (`<|im_start|>`, `<image>`, ...).

    The policy, the same in training and serving: message text never carries structure. transformers' default
    would turn such text into real control tokens, so a user could forge a turn (`<|im_start|>assistant ...`) or an
    image slot; we refuse it instead, naming the token (a 400 from the server, a counted `control_token` skip in
    training). The one exception: tool-call markers in an assistant message's text (LFM2-format data)."""

    def __init__(self, where: str, token: str) -> None:
        super().__init__(
            f"{where} contains the control token {token!r}, which message text may not carry (it would forge chat "
            "structure or an image slot). Remove it, or escape it (e.g. '<|im_start|>' -> '< |im_start| >'); "
            "images go in content items ({'type': 'image', ...}), not as '<image>' in the text."
        )
        self.where, self.token = where, token


def _strings(value: Any, path: str):
    """Every string inside a message value (content, items, tool-call arguments), with where it is."""
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, dict):
        for key, inner in value.items():
            if is_image_item(value) and key in (*IMAGE_SOURCE_KEYS, "image_url"):
                continue  # an image source, not text the template renders (a PIL image or tensor yields nothing)
            yield from _strings(inner, f"{path}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, inner in enumerate(value):
            yield from _strings(inner, f"{path}[{index}]")


def split_quadrants(image: Image.Image) -> list[Image.Image]:
    """Idefics2's split (its image processor's `split_image`): the four quadrants, row-major (with odd sides the right
    and bottom ones get the extra pixel), then the whole image. Why: a fixed-resolution encoder sees a large image
    only shrunk to its size; each quadrant at that size gives it 2x the detail per side, the whole image the context."""
    width, height = image.size
    mid_w, mid_h = width // 2, height // 2
    boxes = [(0, 0, mid_w, mid_h), (mid_w, 0, width, mid_h), (0, mid_h, mid_w, height), (mid_w, mid_h, width, height)]
    return [image.crop(box) for box in boxes] + [image]


def _side(size: Any, name: str) -> int | None:
    """`size[name]` of an image processor's `size` (a dict or transformers' SizeDict), else its `shortest_edge`."""
    get = size.get if isinstance(size, dict) else lambda key: getattr(size, key, None)
    return get(name) or get("shortest_edge")


class N2EyeImagesKwargs(ImagesKwargs, total=False):
    """Per-call overrides of the LFM2-VL image policy (`processor(..., max_image_tokens=64)`); the names and
    meanings of transformers' `Lfm2VlImageProcessor` (see `image_policy.ImagePolicy`). `do_image_splitting` also
    turns a fixed-resolution processor's Idefics2-style splitting on or off (`N2EyeProcessor.splits_images`)."""

    encoder_patch_size: int | None
    downsample_factor: int | None
    min_image_tokens: int | None
    max_image_tokens: int | None
    do_image_splitting: bool | None
    min_tiles: int | None
    max_tiles: int | None
    use_thumbnail: bool | None
    tile_size: int | None
    max_pixels_tolerance: float | None
    max_num_patches: int | None


# Settings that only the image policy reads (`resample` and `max_num_patches` are also SigLIP2's own).
_POLICY_ONLY = tuple(name for name in POLICY_SETTINGS if name not in ("resample", "max_num_patches"))
# Marker-looking text is refused in messages even when the tokenizer lacks the marker (it would be one later).
_TILE_MARKER_PATTERN = r"<\|img_row_\d+_col_\d+\|>"


class N2EyeProcessorKwargs(ProcessingKwargs, total=False):
    images_kwargs: N2EyeImagesKwargs
    _defaults = {"text_kwargs": {"add_special_tokens": False, "padding": False}}


class N2EyeProcessor(ProcessorMixin):
    """Turns chat messages with images into `input_ids`, `attention_mask`, `pixel_values` (+ `assistant_masks`).

    Args:
        image_processor: the vision backbone's image processor (e.g. `SiglipImageProcessor`).
        tokenizer: the LFM2 tokenizer with `<image>`, `<|image_start|>`, `<|image_end|>` added.
        chat_template: the LFM2 ChatML template (`chat_template.jinja`).
        patch_size: the vision tower's patch size in pixels.
        downsample_factor: the projector's spatial merge factor (1 for `mlp`, 2 for `pixel_unshuffle_mlp`).
        default_system_prompt: used when a conversation has no system message; `None` or "" for none.
        use_image_special_tokens: wrap each image's tokens in `<|image_start|>` / `<|image_end|>` (and, with the
            image policy, mark tiles and the thumbnail), as `Lfm2VlProcessor`'s option of that name.
        image_policy: LFM2-VL's image policy settings (`naflex_images.POLICY_SETTINGS`; missing ones take
            transformers' defaults) for a SigLIP2 NaFlex image processor; `None` keeps the image processor's own.
        image_splitting: fixed-resolution encoders only: split each image Idefics2-style into its four quadrants +
            the whole image (5 crops, 5x the tokens; see `fixed_crops`); a call may override it with
            `do_image_splitting=True/False`. NaFlex processors split (or not) under `image_policy` instead.
    """

    valid_processor_kwargs = N2EyeProcessorKwargs

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        patch_size: int = 14,
        downsample_factor: int = 1,
        default_system_prompt: str | None = DEFAULT_SYSTEM_PROMPT,
        use_image_special_tokens: bool = True,
        image_policy: dict | None = None,
        image_splitting: bool = False,
        **kwargs,
    ):
        self.image_token = "<image>"
        self.image_start_token = "<|image_start|>"
        self.image_end_token = "<|image_end|>"
        self.image_thumbnail_token = IMAGE_THUMBNAIL_TOKEN
        self.patch_size = patch_size
        self.downsample_factor = downsample_factor
        self.default_system_prompt = default_system_prompt
        self.use_image_special_tokens = use_image_special_tokens
        self.image_policy = None if image_policy is None else default_settings(**image_policy)
        self.image_splitting = image_splitting
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)
        if self.image_policy is not None:
            self._check_policy_fits()
        self._check_image_splitting()
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        if self.image_token_id is None or self.image_token_id == self.tokenizer.unk_token_id:
            raise ValueError(
                "The tokenizer has no <image> token. Build the checkpoint with `n2eye build`, which adds "
                "<image>, <|image_start|> and <|image_end|> to the tokenizer."
            )

    def _check_policy_fits(self) -> None:
        """The policy needs a NaFlex image processor and the model's patch size and merge factor."""
        ip = self.image_processor
        if "spatial_shapes" not in getattr(ip, "model_input_names", ()):
            raise ValueError(
                f"image_policy needs a SigLIP2 NaFlex image processor (variable resolution), but this one is "
                f"{type(ip).__name__}. Remove image_policy from processor_config.json for fixed-resolution encoders."
            )
        policy, _ = resolve_settings(self.image_policy)
        expected = {"encoder_patch_size": self.patch_size, "downsample_factor": self.downsample_factor}
        for name, value in expected.items():
            if getattr(policy, name) != value:
                raise ValueError(
                    f"image_policy.{name} is {getattr(policy, name)} but the model's is {value} (processor "
                    f"{'patch_size' if name == 'encoder_patch_size' else name}): fix processor_config.json."
                )
        if getattr(ip, "patch_size", policy.encoder_patch_size) != policy.encoder_patch_size:
            raise ValueError(
                f"image_policy.encoder_patch_size is {policy.encoder_patch_size} but the image processor's patch_size "
                f"is {ip.patch_size}: fix processor_config.json or preprocessor_config.json."
            )

    @property
    def fixed_resolution(self) -> bool:
        """Whether the image processor makes fixed-size crops (`pixel_values` (n, 3, H, W)), not SigLIP2 NaFlex's."""
        return "spatial_shapes" not in getattr(self.image_processor, "model_input_names", ())

    def _check_image_splitting(self) -> None:
        """`image_splitting` is a bool, and only for fixed-resolution processors (NaFlex splits under its policy)."""
        if not isinstance(self.image_splitting, bool):
            raise ValueError(f"image_splitting must be true or false, got {self.image_splitting!r}: fix "
                             "processor_config.json.")  # fmt: skip
        if self.image_splitting and not self.fixed_resolution:
            how = "image_policy.do_image_splitting sets its tiles" if self.image_policy is not None else "no split"
            raise ValueError(
                f"image_splitting (Idefics2-style: 4 crops + the whole image) is for fixed-resolution encoders, but "
                f"this image processor is {type(self.image_processor).__name__} (SigLIP2 NaFlex: {how}). Remove "
                "image_splitting from processor_config.json."
            )

    def splits_images(self, do_image_splitting: bool | None = None) -> bool:
        """Whether a fixed-resolution call splits images: the call's `do_image_splitting`, else `image_splitting`.
        Always False for NaFlex processors (their splitting is the image policy's)."""
        if do_image_splitting is not None and not isinstance(do_image_splitting, bool):
            raise ValueError(f"do_image_splitting must be True or False, got {do_image_splitting!r}.")
        if self.image_policy is not None or not self.fixed_resolution:
            return False
        return self.image_splitting if do_image_splitting is None else do_image_splitting

    # ---- chat template -------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """HF `apply_chat_template` plus: the processor's default system prompt, OpenAI `image_url` items and
        JSON-string tool-call arguments. Returns `assistant_masks` with `return_assistant_tokens_mask=True`."""
        kwargs.setdefault("default_system_prompt", self.default_system_prompt or "")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        conversations = [normalize_tool_calls(list(conv)) for conv in conversations]
        for conv in conversations:
            self.check_control_tokens(conv, kwargs.get("tools"))
        return super().apply_chat_template(conversations if batched else conversations[0], chat_template, **kwargs)

    def control_token_pattern(self) -> re.Pattern:
        """Every special token of the tokenizer (LFM2's, the image tokens, reserved ones), longest first."""
        if getattr(self, "_control_pattern", None) is None:
            tokens = {t.content for t in self.tokenizer.added_tokens_decoder.values() if t.special}
            tokens |= {self.image_token, self.image_start_token, self.image_end_token}
            extra = []
            if self.image_policy is not None:  # LFM2-VL's tile and thumbnail markers, in the tokenizer or not
                tokens.add(self.image_thumbnail_token)
                extra.append(_TILE_MARKER_PATTERN)
            tokens = sorted((t for t in tokens if t), key=len, reverse=True)
            self._control_pattern = re.compile("|".join([*map(re.escape, tokens), *extra]))
        return self._control_pattern

    def check_control_tokens(self, conversation: list, tools: list | None = None) -> None:
        """Raises `ControlTokenError` when message or tool text carries a control token (see its docstring)."""
        pattern = self.control_token_pattern()
        for index, message in enumerate(conversation):
            if not isinstance(message, dict):
                continue
            allowed = ASSISTANT_TEXT_MARKERS if message.get("role") == "assistant" else ()
            for key, value in message.items():
                where = f"messages[{index}].{key}"
                for path, text in _strings(value, where):
                    for match in pattern.finditer(text):
                        if not (key == "content" and match.group() in allowed):
                            raise ControlTokenError(path, match.group())
        for path, text in _strings(tools or [], "tools"):
            if match := pattern.search(text):
                raise ControlTokenError(path, match.group())

    @staticmethod
    def parse_tool_calls(text: str) -> tuple[str, list[dict]]:
        """Splits generated text into (content, OpenAI-style tool_calls)."""
        return parse_tool_calls(text)

    # ---- images ----------------------------------------------------------------------------------------
    def _nest_images(self, images, text: list[str]) -> list[list]:
        """One list of images per text, in order; a flat list is split by each text's `<image>` count."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        if any(isinstance(item, (list, tuple)) for item in images):
            nested = [list(item) if isinstance(item, (list, tuple)) else [item] for item in images]
        else:
            counts = [t.count(self.image_token) for t in text]
            if sum(counts) != len(images):
                raise ValueError(
                    f"The text has {sum(counts)} {self.image_token} placeholder(s) ({counts} per sample) but "
                    f"{len(images)} image(s) were given. Put one image item in the messages per image, or pass "
                    "images as one list per sample."
                )
            nested, start = [], 0
            for n in counts:
                nested.append(list(images[start : start + n]))
                start += n
        if len(nested) != len(text):
            raise ValueError(f"Got {len(text)} text sample(s) but image lists for {len(nested)} sample(s).")
        return [[load_image(img) for img in sample if img is not None] for sample in nested]

    def image_token_counts(self, processed: dict) -> list[int]:
        """Number of `<image>` tokens for each processed crop: the patch grid merged by the projector factor."""
        f = self.downsample_factor
        if "spatial_shapes" in processed:  # SigLIP2 NaFlex: per-image grid
            return [math.ceil(int(h) / f) * math.ceil(int(w) / f) for h, w in processed["spatial_shapes"]]
        pixel_values = processed["pixel_values"]
        height, width = pixel_values.shape[-2], pixel_values.shape[-1]
        per_image = math.ceil(height // self.patch_size / f) * math.ceil(width // self.patch_size / f)
        return [per_image] * len(pixel_values)

    def _image_replacement(self, n_tokens: int) -> str:
        body = self.image_token * n_tokens
        if self.use_image_special_tokens:
            return self.image_start_token + body + self.image_end_token
        return body

    def policy_for_call(self, images_kwargs: dict) -> tuple[ImagePolicy, int] | None:
        """(policy, pad length) with this call's overrides, popped from `images_kwargs`; None without a policy
        (then policy-only overrides are refused rather than ignored, except `do_image_splitting` for fixed-resolution
        processors, which is checked here: their Idefics2-style splitting, see `splits_images`)."""
        overrides = {k: v for k in POLICY_SETTINGS if (v := images_kwargs.pop(k, None)) is not None}
        if self.image_policy is None:
            if self.fixed_resolution and "do_image_splitting" in overrides:
                self.splits_images(overrides.pop("do_image_splitting"))
            ignored = sorted(set(overrides) & set(_POLICY_ONLY))
            if ignored:
                takes = "; do_image_splitting (Idefics2-style splitting) is the one it takes"
                fixed = takes if self.fixed_resolution else ""
                raise ValueError(
                    f"{ignored} set LFM2-VL's image policy, which this processor does not use (its image processor "
                    f"is {type(self.image_processor).__name__} without `image_policy` in processor_config.json"
                    f"{fixed}). Build with a SigLIP2 NaFlex encoder and the pixel_unshuffle_mlp projector to get it."
                )
            images_kwargs.update({k: v for k, v in overrides.items() if k not in _POLICY_ONLY})
            return None
        return resolve_settings(self.image_policy, overrides)

    def fixed_crops(self, image: Image.Image, split: bool, images_kwargs: dict) -> list[Image.Image]:
        """The pictures a fixed-resolution encoder sees for `image`: itself, or with `split` Idefics2's 4 quadrants +
        itself (`split_quadrants`). Unlike Idefics2, an image that already fits the encoder (both sides at most its
        size) stays one crop: its quadrants would only be upscaled, 5x the tokens for no detail. So does an image
        under 2 px on a side (it has no quadrants)."""
        if not split or min(image.size) < 2:
            return [image]
        size = images_kwargs.get("size") or getattr(self.image_processor, "size", None)
        width, height = (_side(size, "width"), _side(size, "height")) if size is not None else (None, None)
        if not (width and height):
            raise ValueError(
                f"Image splitting needs the encoder's image size, but the image processor's size is {size!r}: set "
                "size {height, width} in its config, or do_image_splitting=False."
            )
        if image.width <= width and image.height <= height:
            return [image]
        return split_quadrants(image)

    def _own_images(self, images: list, images_kwargs: dict, split: bool):
        """The image processor's tensors for every image's crops, in order (one crop each unless a fixed-resolution
        call splits), and each image's text: one block holding its crops' tokens one after the other."""
        crops = [self.fixed_crops(image, split, images_kwargs) for image in images]
        processed = self.image_processor([c for cs in crops for c in cs], **{**images_kwargs, "return_tensors": "pt"})
        counts, replacements, start = self.image_token_counts(processed), [], 0
        for image_crops in crops:
            replacements.append(self._image_replacement(sum(counts[start : start + len(image_crops)])))
            start += len(image_crops)
        return processed, replacements

    def _policy_images(self, images: list, images_kwargs: dict, policy: ImagePolicy, pad: int):
        """NaFlex tensors and text replacements for `images` under the LFM2-VL policy."""
        normalization = Normalization.of(self.image_processor, images_kwargs)
        data, layouts = naflex_inputs(images, policy, pad, normalization)
        self._check_marker_tokens(layouts)
        replacements = [
            expand_image_tokens(
                layout,
                self.image_token,
                use_image_special_tokens=self.use_image_special_tokens,
                image_start_token=self.image_start_token,
                image_end_token=self.image_end_token,
                image_thumbnail_token=self.image_thumbnail_token,
            )
            for layout in layouts
        ]
        return data, replacements

    def _check_marker_tokens(self, layouts: list[ImageLayout]) -> None:
        """The tile / thumbnail markers the text needs must be tokens, or they would be split into plain text."""
        if not self.use_image_special_tokens:
            return
        needed = {tile_marker(t.row, t.col) for layout in layouts if layout.is_multi_tile for t in layout.tiles}
        if any(layout.thumbnail is not None for layout in layouts):
            needed.add(self.image_thumbnail_token)
        added = {t.content for t in self.tokenizer.added_tokens_decoder.values()}
        missing = sorted(needed - added)
        if missing:
            raise ValueError(
                f"The tokenizer lacks the image marker token(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}, "
                "which this image's tiles need. Build the checkpoint with `n2eye build` (it adds <|img_row_R_col_C|> "
                "for rows and columns 1..10 and <|img_thumbnail|>), or lower max_tiles / set do_image_splitting=False."
            )

    # ---- main entry ------------------------------------------------------------------------------------
    def __call__(self, images=None, text=None, **kwargs) -> BatchFeature:
        """Tokenizes `text` (str or list) whose `<image>` placeholders match `images` (per sample, in order)."""
        if text is None:
            raise ValueError("N2EyeProcessor needs `text` (use the chat template); an image alone has no prompt.")
        text = [text] if isinstance(text, str) else list(text)
        merged = self._merge_kwargs(
            N2EyeProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )
        text_kwargs = merged["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)
        return_offsets = merged.get("return_text_replacement_offsets") or text_kwargs.pop(
            "return_text_replacement_offsets", False
        )
        counts_in_text = [t.count(self.image_token) for t in text]
        data, replacements = {}, []
        if images is not None:
            nested = self._nest_images(images, text)
            n_given = [len(sample) for sample in nested]
            if n_given != counts_in_text:
                raise ValueError(
                    f"Each sample needs one image per {self.image_token} placeholder: the text has {counts_in_text} "
                    f"and the images are {n_given} per sample."
                )
            flat = [img for sample in nested for img in sample]
            images_kwargs = dict(merged["images_kwargs"])
            split = False  # Idefics2-style, fixed resolution only (NaFlex's policy reads do_image_splitting itself)
            if self.image_policy is None and self.fixed_resolution:
                split = self.splits_images(images_kwargs.pop("do_image_splitting", None))
            policy = self.policy_for_call(images_kwargs)
            if flat and policy is not None:
                processed, replacements = self._policy_images(flat, images_kwargs, *policy)
                data.update(processed)
            elif flat:
                processed, replacements = self._own_images(flat, images_kwargs, split)
                data.update(processed)
        elif any(counts_in_text):
            raise ValueError(
                f"The text has {sum(counts_in_text)} {self.image_token} placeholder(s) but no images were passed. "
                "Pass the images (or image items in the messages) to the processor."
            )
        text, offsets = self.get_text_with_replacements(text, images_replacements=replacements)
        text_inputs = self.tokenizer(text, **text_kwargs)
        self._check_special_mm_tokens(text, text_inputs, modalities=["image"])
        if return_offsets:
            text_inputs["text_replacement_offsets"] = offsets
        data.update(text_inputs)
        return BatchFeature(data, tensor_type=return_tensors)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values", "spatial_shapes", "pixel_attention_mask"]


__all__ = ["N2EyeProcessor", "DEFAULT_SYSTEM_PROMPT", "split_quadrants"]
