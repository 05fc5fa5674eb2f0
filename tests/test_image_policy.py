"""LFM2-VL's image policy (n2eye.modeling.image_policy) against transformers' own Lfm2Vl code, token for token.

transformers' `image_processing_lfm2_vl` imports torchvision, which is not installed here (nor needed by our
checkpoints). The harness below imports it with an empty stand-in module for torchvision, then calls the reference's
own methods: the arithmetic ones directly, `resize_and_split` on an instance made without `__init__` with
`torch.nn.functional.interpolate(antialias=True)` as `tvF.resize` (what torchvision runs for tensors on the CPU:
on uint8 directly, or through float32 and rounding), and `Lfm2VlProcessor.replace_image_token` on a processor
whose `__init__` stopped at the type check of its fake image processor (after setting its token strings). The
stand-ins live only inside `_reference()` / `_torchvision_resize()`; nothing of them is left in `sys.modules`.

GOLDEN was printed from that reference (transformers 5.23) and is checked against it here, so the table stays
honest when transformers changes; our module is checked against the table.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import random
import sys
import types

import pytest
import torch
from PIL import Image

from n2eye.modeling.image_policy import (
    IMAGE_THUMBNAIL_TOKEN,
    ImagePolicy,
    UnsupportedImageSize,
    expand_image_tokens,
    image_layout,
    is_image_too_large,
    resize_and_split,
    smart_resize,
    target_ratios,
    thumbnail_size,
    tile_grid,
    tile_marker,
)

REF_MODULE = "transformers.models.lfm2_vl.image_processing_lfm2_vl"


# ---- the reference ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _reference() -> types.ModuleType:
    """transformers' image_processing_lfm2_vl, imported with a throwaway torchvision stand-in."""
    import transformers.image_processing_backends  # noqa: F401  (imported for real before the stand-in exists)
    import transformers.models.lfm2_vl  # noqa: F401
    from transformers.utils.import_utils import is_torchvision_available

    if is_torchvision_available():  # the real one: no stand-in needed
        return importlib.import_module(REF_MODULE)
    names = ("torchvision", "torchvision.transforms", "torchvision.transforms.v2",
             "torchvision.transforms.v2.functional")
    saved = {name: sys.modules.get(name) for name in names}
    stand_ins = {name: types.ModuleType(name) for name in names}
    stand_ins["torchvision.transforms.v2"].functional = stand_ins["torchvision.transforms.v2.functional"]
    try:
        sys.modules.update(stand_ins)
        sys.modules.pop(REF_MODULE, None)
        module = importlib.import_module(REF_MODULE)
        package = sys.modules["transformers.models.lfm2_vl"]
        if package.__dict__.get("image_processing_lfm2_vl") is module:
            del package.__dict__["image_processing_lfm2_vl"]
        return module
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
        sys.modules.pop(REF_MODULE, None)  # only our handle keeps the stand-in-backed module


@contextlib.contextmanager
def _torchvision_resize(pixel_path: str | None):
    """`TorchvisionBackend.resize` runnable without torchvision. `tvF.resize` becomes torch's antialiased bilinear
    interpolation, as torchvision runs it on CPU tensors: on the uint8 tensor itself ("uint8", its path on AVX2
    CPUs) or through float32 and rounding back ("float", its path elsewhere); None gives zeros of the new size,
    for shape-only runs."""
    import transformers.image_processing_backends as backends
    from transformers.image_utils import PILImageResampling

    def resize(image, size, interpolation, antialias):
        assert interpolation == "bilinear", interpolation
        if pixel_path is None:
            return torch.zeros(*image.shape[:-2], *size, dtype=image.dtype)
        source = image if pixel_path == "uint8" else image.float()
        out = torch.nn.functional.interpolate(source, size=list(size), mode="bilinear", antialias=antialias,
                                              align_corners=False)
        return out if pixel_path == "uint8" else out.round().clamp(0, 255).to(image.dtype)

    tvf = types.SimpleNamespace(InterpolationMode=types.SimpleNamespace(LANCZOS="lanczos"), resize=resize)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backends, "tvF", tvf, raising=False)
        mp.setattr(backends, "pil_torch_interpolation_mapping", {PILImageResampling.BILINEAR: "bilinear"})
        yield


def _ref_processor(policy: ImagePolicy):
    """An `Lfm2VlProcessor` with the reference token strings and a stand-in image processor holding `policy`."""
    from transformers.models.lfm2_vl.processing_lfm2_vl import Lfm2VlProcessor

    processor = Lfm2VlProcessor.__new__(Lfm2VlProcessor)
    fake_tokenizer = types.SimpleNamespace(convert_tokens_to_ids=lambda token: 0)
    with pytest.raises(TypeError):  # ProcessorMixin refuses the stand-in, after the token strings are set
        Lfm2VlProcessor.__init__(processor, image_processor=types.SimpleNamespace(), tokenizer=fake_tokenizer)
    processor.image_processor = types.SimpleNamespace(**policy.to_dict())
    return processor


def _ref_image_processor():
    proc_cls = _reference().Lfm2VlImageProcessor
    return proc_cls.__new__(proc_cls)  # no __init__: it would require torchvision


def _ref_run(width: int, height: int, policy: ImagePolicy, pixels: torch.Tensor | None = None,
             pixel_path: str = "uint8") -> dict:
    """The reference's crops, grid, image size and placeholder text for one image."""
    ip = _ref_image_processor()
    # as Lfm2VlImageProcessor._preprocess: splitting off means min_tiles = max_tiles = 1
    min_tiles, max_tiles = (policy.min_tiles, policy.max_tiles) if policy.do_image_splitting else (1, 1)
    images = pixels[None] if pixels is not None else torch.zeros(1, 3, 1, 1, dtype=torch.uint8).expand(
        1, 3, height, width)
    from transformers.image_utils import PILImageResampling

    with _torchvision_resize(pixel_path if pixels is not None else None):
        crops, rows, cols, sizes = ip.resize_and_split(
            images, downsample_factor=policy.downsample_factor, min_tiles=min_tiles, max_tiles=max_tiles,
            use_thumbnail=policy.use_thumbnail, min_image_tokens=policy.min_image_tokens,
            max_image_tokens=policy.max_image_tokens, encoder_patch_size=policy.encoder_patch_size,
            tile_size=policy.tile_size, max_pixels_tolerance=policy.max_pixels_tolerance,
            resample=PILImageResampling.BILINEAR,
        )
    crops = [c.squeeze(0) if c.dim() == 4 else c for c in crops[0]]
    inputs = {"image_rows": rows, "image_cols": cols, "image_sizes": sizes}
    processor = _ref_processor(policy)
    texts = {
        special: processor.replace_image_token(inputs, 0, use_image_special_tokens=special, **policy.to_dict())
        for special in (True, False)
    }
    return {"rows": rows[0], "cols": cols[0], "size_hw": tuple(sizes[0]), "crops": crops, "text": texts[True],
            "plain_text": texts[False]}


def _ref_consistent(run: dict, policy: ImagePolicy) -> bool:
    """Whether the reference's output fits together: every crop within the patch count it pads to (its
    `_preprocess`'s max_num_patches) and as many `<image>` tokens in the text as the crops give the model."""
    p, f = policy.encoder_patch_size, policy.downsample_factor
    tile_patches = (policy.tile_size // p) ** 2 if policy.do_image_splitting else 0
    max_num_patches = max(policy.max_image_tokens * f * f, tile_patches)
    shapes = [(c.shape[-2] // p, c.shape[-1] // p) for c in run["crops"]]
    fits = all(h * w <= max_num_patches for h, w in shapes)
    tokens = sum(math.ceil(h / f) * math.ceil(w / f) for h, w in shapes)
    return fits and tokens == run["text"].count("<image>")


def _ref_golden_row(width: int, height: int, policy: ImagePolicy):
    run = _ref_run(width, height, policy)
    if not _ref_consistent(run, policy):
        return REFUSED
    rows, cols = run["rows"], run["cols"]
    crops = [(c.shape[-1], c.shape[-2]) for c in run["crops"]]
    thumbnail = crops[-1] if len(crops) == rows * cols + 1 else None
    return (run["size_hw"][1], run["size_hw"][0]), (rows, cols), thumbnail, run["text"].count("<image>")


# ---- the golden table ---------------------------------------------------------------------------------------------
POLICIES = {
    "default": {},
    "no_split": {"do_image_splitting": False},
    "card": {"min_image_tokens": 32},  # LFM2.5-VL-450M's model card
    "max64": {"max_image_tokens": 64},
    "max64_no_split": {"max_image_tokens": 64, "do_image_splitting": False},
    "min64_max64": {"min_image_tokens": 64, "max_image_tokens": 64},
    "min64_max64_no_split": {"min_image_tokens": 64, "max_image_tokens": 64, "do_image_splitting": False},
    "no_thumbnail": {"use_thumbnail": False},
    "min_tiles1": {"min_tiles": 1},
}
SIZES = [
    (16, 16), (32, 32), (100, 150), (333, 517), (64, 2048), (2048, 64), (512, 512), (513, 512), (720, 720),
    (724, 724), (721, 727), (960, 768), (1000, 800), (1024, 768), (1600, 1200), (960, 1280), (1920, 1080),
    (4000, 3000), (30, 9000), (9000, 30), (100, 30000),
]
REFUSED = "refused"

# (width, height): {policy: ((resized w, h), (rows, cols), thumbnail (w, h) or None, <image> tokens) or REFUSED}.
# Worth a look: 720x720 is one 256-token image but 724x724 is 2x2 tiles + thumbnail = 1280 tokens (the split
# threshold); max_image_tokens=64 makes a 512x512 image cost 1088 tokens, not fewer (the threshold drops but tiles
# stay 512 px); 960x768 and 1000x800 (both 5:4, an exact tie between 2x2 and 3x2) split differently by area;
# 100x150 under the default policy gets 70 tokens (min_image_tokens, rounded up).
GOLDEN = {
    (16, 16): {
        "default": ((256, 256), (1, 1), None, 64),
        "no_split": ((256, 256), (1, 1), None, 64),
        "card": ((192, 192), (1, 1), None, 36),
        "max64": ((256, 256), (1, 1), None, 64),
        "max64_no_split": ((256, 256), (1, 1), None, 64),
        "min64_max64": ((256, 256), (1, 1), None, 64),
        "min64_max64_no_split": ((256, 256), (1, 1), None, 64),
        "no_thumbnail": ((256, 256), (1, 1), None, 64),
        "min_tiles1": ((256, 256), (1, 1), None, 64),
    },
    (32, 32): {
        "default": ((256, 256), (1, 1), None, 64),
        "no_split": ((256, 256), (1, 1), None, 64),
        "card": ((192, 192), (1, 1), None, 36),
        "max64": ((256, 256), (1, 1), None, 64),
        "max64_no_split": ((256, 256), (1, 1), None, 64),
        "min64_max64": ((256, 256), (1, 1), None, 64),
        "min64_max64_no_split": ((256, 256), (1, 1), None, 64),
        "no_thumbnail": ((256, 256), (1, 1), None, 64),
        "min_tiles1": ((256, 256), (1, 1), None, 64),
    },
    (100, 150): {
        "default": ((224, 320), (1, 1), None, 70),
        "no_split": ((224, 320), (1, 1), None, 70),
        "card": ((160, 224), (1, 1), None, 35),
        "max64": ((224, 320), (1, 1), None, 70),
        "max64_no_split": REFUSED,
        "min64_max64": ((224, 320), (1, 1), None, 70),
        "min64_max64_no_split": REFUSED,
        "no_thumbnail": ((224, 320), (1, 1), None, 70),
        "min_tiles1": ((224, 320), (1, 1), None, 70),
    },
    (333, 517): {
        "default": ((320, 512), (1, 1), None, 160),
        "no_split": ((320, 512), (1, 1), None, 160),
        "card": ((320, 512), (1, 1), None, 160),
        "max64": ((192, 288), (3, 2), (192, 288), 1590),
        "max64_no_split": ((192, 288), (1, 1), None, 54),
        "min64_max64": ((192, 288), (3, 2), (192, 288), 1590),
        "min64_max64_no_split": ((192, 288), (1, 1), None, 54),
        "no_thumbnail": ((320, 512), (1, 1), None, 160),
        "min_tiles1": ((320, 512), (1, 1), None, 160),
    },
    (64, 2048): {
        "default": ((64, 2048), (1, 1), None, 128),
        "no_split": ((64, 2048), (1, 1), None, 128),
        "card": ((64, 2048), (1, 1), None, 128),
        "max64": ((32, 1440), (1, 1), None, 45),
        "max64_no_split": ((32, 1440), (1, 1), None, 45),
        "min64_max64": ((32, 1440), (1, 1), None, 45),
        "min64_max64_no_split": ((32, 1440), (1, 1), None, 45),
        "no_thumbnail": ((64, 2048), (1, 1), None, 128),
        "min_tiles1": ((64, 2048), (1, 1), None, 128),
    },
    (2048, 64): {
        "default": ((2048, 64), (1, 1), None, 128),
        "no_split": ((2048, 64), (1, 1), None, 128),
        "card": ((2048, 64), (1, 1), None, 128),
        "max64": ((1440, 32), (1, 1), None, 45),
        "max64_no_split": ((1440, 32), (1, 1), None, 45),
        "min64_max64": ((1440, 32), (1, 1), None, 45),
        "min64_max64_no_split": ((1440, 32), (1, 1), None, 45),
        "no_thumbnail": ((2048, 64), (1, 1), None, 128),
        "min_tiles1": ((2048, 64), (1, 1), None, 128),
    },
    (512, 512): {
        "default": ((512, 512), (1, 1), None, 256),
        "no_split": ((512, 512), (1, 1), None, 256),
        "card": ((512, 512), (1, 1), None, 256),
        "max64": ((256, 256), (2, 2), (256, 256), 1088),
        "max64_no_split": ((256, 256), (1, 1), None, 64),
        "min64_max64": ((256, 256), (2, 2), (256, 256), 1088),
        "min64_max64_no_split": ((256, 256), (1, 1), None, 64),
        "no_thumbnail": ((512, 512), (1, 1), None, 256),
        "min_tiles1": ((512, 512), (1, 1), None, 256),
    },
    (513, 512): {
        "default": ((512, 512), (1, 1), None, 256),
        "no_split": ((512, 512), (1, 1), None, 256),
        "card": ((512, 512), (1, 1), None, 256),
        "max64": ((256, 224), (2, 2), (256, 224), 1080),
        "max64_no_split": ((256, 224), (1, 1), None, 56),
        "min64_max64": ((256, 224), (2, 2), (256, 224), 1080),
        "min64_max64_no_split": ((256, 224), (1, 1), None, 56),
        "no_thumbnail": ((512, 512), (1, 1), None, 256),
        "min_tiles1": ((512, 512), (1, 1), None, 256),
    },
    (720, 720): {
        "default": ((512, 512), (1, 1), None, 256),
        "no_split": ((512, 512), (1, 1), None, 256),
        "card": ((512, 512), (1, 1), None, 256),
        "max64": ((256, 256), (2, 2), (256, 256), 1088),
        "max64_no_split": ((256, 256), (1, 1), None, 64),
        "min64_max64": ((256, 256), (2, 2), (256, 256), 1088),
        "min64_max64_no_split": ((256, 256), (1, 1), None, 64),
        "no_thumbnail": ((512, 512), (1, 1), None, 256),
        "min_tiles1": ((512, 512), (1, 1), None, 256),
    },
    (724, 724): {
        "default": ((512, 512), (2, 2), (512, 512), 1280),
        "no_split": ((512, 512), (1, 1), None, 256),
        "card": ((512, 512), (2, 2), (512, 512), 1280),
        "max64": ((256, 256), (2, 2), (256, 256), 1088),
        "max64_no_split": ((256, 256), (1, 1), None, 64),
        "min64_max64": ((256, 256), (2, 2), (256, 256), 1088),
        "min64_max64_no_split": ((256, 256), (1, 1), None, 64),
        "no_thumbnail": ((512, 512), (2, 2), None, 1024),
        "min_tiles1": ((512, 512), (1, 1), None, 256),
    },
    (721, 727): {
        "default": ((480, 512), (2, 2), (480, 512), 1264),
        "no_split": ((480, 512), (1, 1), None, 240),
        "card": ((480, 512), (2, 2), (480, 512), 1264),
        "max64": ((224, 256), (2, 2), (224, 256), 1080),
        "max64_no_split": ((224, 256), (1, 1), None, 56),
        "min64_max64": ((224, 256), (2, 2), (224, 256), 1080),
        "min64_max64_no_split": ((224, 256), (1, 1), None, 56),
        "no_thumbnail": ((480, 512), (2, 2), None, 1024),
        "min_tiles1": REFUSED,
    },
    (960, 768): {
        "default": ((544, 448), (2, 2), (544, 448), 1262),
        "no_split": ((544, 448), (1, 1), None, 238),
        "card": ((544, 448), (2, 2), (544, 448), 1262),
        "max64": ((256, 224), (2, 2), (256, 224), 1080),
        "max64_no_split": ((256, 224), (1, 1), None, 56),
        "min64_max64": ((256, 224), (2, 2), (256, 224), 1080),
        "min64_max64_no_split": ((256, 224), (1, 1), None, 56),
        "no_thumbnail": ((544, 448), (2, 2), None, 1024),
        "min_tiles1": ((544, 448), (2, 2), (544, 448), 1262),
    },
    (1000, 800): {
        "default": ((544, 448), (2, 3), (544, 448), 1774),
        "no_split": ((544, 448), (1, 1), None, 238),
        "card": ((544, 448), (2, 3), (544, 448), 1774),
        "max64": ((256, 224), (2, 3), (256, 224), 1592),
        "max64_no_split": ((256, 224), (1, 1), None, 56),
        "min64_max64": ((256, 224), (2, 3), (256, 224), 1592),
        "min64_max64_no_split": ((256, 224), (1, 1), None, 56),
        "no_thumbnail": ((544, 448), (2, 3), None, 1536),
        "min_tiles1": ((544, 448), (2, 3), (544, 448), 1774),
    },
    (1024, 768): {
        "default": ((576, 416), (2, 3), (576, 416), 1770),
        "no_split": ((576, 416), (1, 1), None, 234),
        "card": ((576, 416), (2, 3), (576, 416), 1770),
        "max64": ((288, 192), (2, 3), (288, 192), 1590),
        "max64_no_split": ((288, 192), (1, 1), None, 54),
        "min64_max64": ((288, 192), (2, 3), (288, 192), 1590),
        "min64_max64_no_split": ((288, 192), (1, 1), None, 54),
        "no_thumbnail": ((576, 416), (2, 3), None, 1536),
        "min_tiles1": ((576, 416), (2, 3), (576, 416), 1770),
    },
    (1600, 1200): {
        "default": ((576, 416), (2, 3), (576, 416), 1770),
        "no_split": ((576, 416), (1, 1), None, 234),
        "card": ((576, 416), (2, 3), (576, 416), 1770),
        "max64": ((288, 192), (2, 3), (288, 192), 1590),
        "max64_no_split": ((288, 192), (1, 1), None, 54),
        "min64_max64": ((288, 192), (2, 3), (288, 192), 1590),
        "min64_max64_no_split": ((288, 192), (1, 1), None, 54),
        "no_thumbnail": ((576, 416), (2, 3), None, 1536),
        "min_tiles1": ((576, 416), (2, 3), (576, 416), 1770),
    },
    (960, 1280): {
        "default": ((416, 576), (3, 2), (416, 576), 1770),
        "no_split": ((416, 576), (1, 1), None, 234),
        "card": ((416, 576), (3, 2), (416, 576), 1770),
        "max64": ((192, 288), (3, 2), (192, 288), 1590),
        "max64_no_split": ((192, 288), (1, 1), None, 54),
        "min64_max64": ((192, 288), (3, 2), (192, 288), 1590),
        "min64_max64_no_split": ((192, 288), (1, 1), None, 54),
        "no_thumbnail": ((416, 576), (3, 2), None, 1536),
        "min_tiles1": ((416, 576), (3, 2), (416, 576), 1770),
    },
    (1920, 1080): {
        "default": ((672, 384), (2, 4), (672, 384), 2300),
        "no_split": ((672, 384), (1, 1), None, 252),
        "card": ((672, 384), (2, 4), (672, 384), 2300),
        "max64": ((320, 192), (2, 4), (320, 192), 2108),
        "max64_no_split": ((320, 192), (1, 1), None, 60),
        "min64_max64": ((320, 192), (2, 4), (320, 192), 2108),
        "min64_max64_no_split": ((320, 192), (1, 1), None, 60),
        "no_thumbnail": ((672, 384), (2, 4), None, 2048),
        "min_tiles1": ((672, 384), (2, 4), (672, 384), 2300),
    },
    (4000, 3000): {
        "default": ((576, 416), (2, 3), (576, 416), 1770),
        "no_split": ((576, 416), (1, 1), None, 234),
        "card": ((576, 416), (2, 3), (576, 416), 1770),
        "max64": ((288, 192), (2, 3), (288, 192), 1590),
        "max64_no_split": ((288, 192), (1, 1), None, 54),
        "min64_max64": ((288, 192), (2, 3), (288, 192), 1590),
        "min64_max64_no_split": ((288, 192), (1, 1), None, 54),
        "no_thumbnail": ((576, 416), (2, 3), None, 1536),
        "min_tiles1": ((576, 416), (2, 3), (576, 416), 1770),
    },
    (30, 9000): {
        "default": REFUSED,
        "no_split": REFUSED,
        "card": REFUSED,
        "max64": ((32, 4416), (10, 1), (32, 4416), 2698),
        "max64_no_split": REFUSED,
        "min64_max64": ((32, 4416), (10, 1), (32, 4416), 2698),
        "min64_max64_no_split": REFUSED,
        "no_thumbnail": REFUSED,
        "min_tiles1": REFUSED,
    },
    (9000, 30): {
        "default": REFUSED,
        "no_split": REFUSED,
        "card": REFUSED,
        "max64": ((4416, 32), (1, 10), (4416, 32), 2698),
        "max64_no_split": REFUSED,
        "min64_max64": ((4416, 32), (1, 10), (4416, 32), 2698),
        "min64_max64_no_split": REFUSED,
        "no_thumbnail": REFUSED,
        "min_tiles1": REFUSED,
    },
    (100, 30000): {
        "default": REFUSED,
        "no_split": REFUSED,
        "card": REFUSED,
        "max64": ((32, 4416), (10, 1), (32, 4416), 2698),
        "max64_no_split": REFUSED,
        "min64_max64": ((32, 4416), (10, 1), (32, 4416), 2698),
        "min64_max64_no_split": REFUSED,
        "no_thumbnail": ((32, 8864), (10, 1), None, 2560),
        "min_tiles1": REFUSED,
    },
}


def _golden_cases():
    return [(w, h, name) for (w, h) in SIZES for name in POLICIES]


def _policy(name: str) -> ImagePolicy:
    return ImagePolicy(**POLICIES[name])


def _our_golden_row(width: int, height: int, policy: ImagePolicy):
    try:
        layout = image_layout(width, height, policy)
    except UnsupportedImageSize:
        return REFUSED
    thumbnail = (layout.thumbnail.width, layout.thumbnail.height) if layout.thumbnail else None
    return layout.resized_size, (layout.rows, layout.cols), thumbnail, layout.total_tokens


def test_golden_table_is_complete():
    assert sorted(GOLDEN) == sorted(SIZES)
    assert all(sorted(row) == sorted(POLICIES) for row in GOLDEN.values())
    assert len(SIZES) >= 12


@pytest.mark.parametrize("width,height,name", _golden_cases())
def test_layout_matches_golden(width, height, name):
    assert _our_golden_row(width, height, _policy(name)) == GOLDEN[(width, height)][name]


@pytest.mark.parametrize("width,height", SIZES)
def test_golden_matches_transformers(width, height):
    """Each row is what transformers computes; REFUSED rows are exactly those where its output is inconsistent."""
    for name in POLICIES:
        assert _ref_golden_row(width, height, _policy(name)) == GOLDEN[(width, height)][name], name


@pytest.mark.parametrize("width,height", SIZES)
def test_text_and_crops_match_transformers(width, height):
    """Same placeholder text (with and without special tokens) and the same crop sizes, in order."""
    for name in POLICIES:
        policy = _policy(name)
        if GOLDEN[(width, height)][name] == REFUSED:
            with pytest.raises(UnsupportedImageSize):
                image_layout(width, height, policy)
            continue
        layout = image_layout(width, height, policy)
        run = _ref_run(width, height, policy)
        assert expand_image_tokens(layout) == run["text"], name
        assert expand_image_tokens(layout, use_image_special_tokens=False) == run["plain_text"], name
        assert [(c.width, c.height) for c in layout.crops] == [(c.shape[-1], c.shape[-2]) for c in run["crops"]]
        assert layout.sequence_length() == len(_split_tokens(run["text"]))
        assert layout.sequence_length(use_image_special_tokens=False) == layout.total_tokens
        assert thumbnail_size(width, height, policy) == (
            (layout.thumbnail.width, layout.thumbnail.height) if layout.thumbnail else None)


def _split_tokens(text: str) -> list[str]:
    import re

    return re.findall(r"<image>|<\|[a-z0-9_]+\|>", text)


def test_expansion_shape():
    """A 2x3 split reads start, six row/col markers each with 256 tokens, thumbnail marker + its tokens, end."""
    layout = image_layout(960, 1280)
    assert (layout.rows, layout.cols, layout.tokens_per_tile) == (3, 2, 256)
    text = expand_image_tokens(layout)
    expected = "<|image_start|>"
    for row in range(1, 4):
        for col in range(1, 3):
            expected += f"<|img_row_{row}_col_{col}|>" + "<image>" * 256
    expected += IMAGE_THUMBNAIL_TOKEN + "<image>" * layout.thumbnail.tokens + "<|image_end|>"
    assert text == expected
    assert tile_marker(3, 2) == "<|img_row_3_col_2|>"
    assert expand_image_tokens(image_layout(333, 517), "<im>") == "<|image_start|>" + "<im>" * 160 + "<|image_end|>"


# ---- the arithmetic pieces, swept against the reference ---------------------------------------------------------
def test_target_ratios_order_matches_reference():
    ip = _ref_image_processor()
    for low in range(1, 5):
        for high in range(low, 17):
            assert target_ratios(low, high) == ip._target_ratios(low, high), (low, high)


def _sweep_sizes(n: int = 1500) -> list[tuple[int, int]]:
    rng = random.Random(24)
    sizes = [(rng.randint(16, 5000), rng.randint(16, 5000)) for _ in range(n)]
    sizes += [(rng.randint(16, 200), rng.randint(2000, 9000)) for _ in range(n // 10)]
    # exact aspect ties between two grids (1.25 sits between 1x1 / 2x2 and 3x2), around the area threshold
    sizes += [(5 * k, 4 * k) for k in range(100, 400, 3)] + [(4 * k, 5 * k) for k in range(100, 400, 3)]
    return sizes


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_arithmetic_sweep_matches_reference(name):
    policy = _policy(name)
    ip = _ref_image_processor()
    p, f = policy.encoder_patch_size, policy.downsample_factor
    low, high = policy.tile_range
    for width, height in _sweep_sizes():
        assert smart_resize(width, height, policy) == ip.smart_resize(
            height, width, f, policy.min_image_tokens, policy.max_image_tokens, p), (width, height)
        assert is_image_too_large(width, height, policy) == ip._is_image_too_large(
            height, width, policy.max_image_tokens, p, f, policy.max_pixels_tolerance), (width, height)
        cols, rows, *_ = ip._get_grid_layout(height, width, low, high, policy.tile_size)
        assert tile_grid(width, height, policy) == (rows, cols), (width, height)


# ---- pixels -----------------------------------------------------------------------------------------------------
def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    array = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8).numpy()
    return Image.fromarray(array, "RGB")


def _chw(image: Image.Image) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).contiguous()


def test_pixels_exact_without_resize():
    # 320x512 is already whole merged patches within 64..256 tokens: one crop, the image itself
    image = _noise(320, 512)
    (crop,) = resize_and_split(image)
    assert crop.size == (320, 512) and crop.tobytes() == image.tobytes()
    # 1536x1024 is exactly a 3x2 grid of 512 tiles: the tiles are plain crops, and equal transformers' tiles
    image = _noise(1536, 1024, seed=1)
    crops = resize_and_split(image)
    layout = image_layout(1536, 1024)
    assert (layout.rows, layout.cols) == (2, 3) and len(crops) == 7
    for tile, crop in zip(layout.tiles, crops):
        assert crop.tobytes() == image.crop(tile.box).tobytes()
    run = _ref_run(1536, 1024, ImagePolicy(), pixels=_chw(image))
    for ours, theirs in zip(crops[:6], run["crops"][:6]):
        assert torch.equal(_chw(ours), theirs)
    # the thumbnail is a resize: Pillow's bilinear, within 1 level of torchvision's
    thumb = crops[6]
    assert thumb.tobytes() == image.resize(thumb.size, Image.Resampling.BILINEAR).tobytes()
    _assert_close_to_torchvision(_chw(thumb), run["crops"][6])


def _assert_close_to_torchvision(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """Pillow vs torchvision's antialiased bilinear: never more than 1 grey level apart. How many values are 1
    apart depends on the scale factors (rounding of the two passes): from none to about a quarter on noise."""
    assert ours.shape == theirs.shape
    diff = (ours.int() - theirs.int()).abs()
    assert diff.max().item() <= 1
    fraction = (diff > 0).float().mean().item()
    assert fraction < 0.35
    return fraction


@pytest.mark.parametrize("size", [(333, 517), (1600, 1200), (100, 150)])
def test_pixels_resized_close_to_transformers(size):
    image = _noise(*size, seed=2)
    policy = ImagePolicy()
    layout = image_layout(*size, policy)
    crops = resize_and_split(image, policy)
    canvas = image.resize(layout.canvas_size, Image.Resampling.BILINEAR)
    assert [c.size for c in crops] == [(c.width, c.height) for c in layout.crops]
    for tile, crop in zip(layout.tiles, crops):  # our tiles are a straightforward PIL resize, then crops
        expected = canvas.crop(tile.box) if layout.is_multi_tile else canvas
        assert crop.tobytes() == expected.tobytes()
    for pixel_path in ("uint8", "float"):
        run = _ref_run(*size, policy, pixels=_chw(image), pixel_path=pixel_path)
        assert len(run["crops"]) == len(crops)
        for ours, theirs in zip(crops, run["crops"]):
            _assert_close_to_torchvision(_chw(ours), theirs)


def test_resize_and_split_converts_to_rgb():
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent: white after compositing
    (crop,) = resize_and_split(rgba)
    assert crop.mode == "RGB" and crop.size == (256, 256)
    assert crop.getpixel((10, 10)) == (255, 255, 255)


# ---- errors -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings,match",
    [
        ({"min_image_tokens": 300}, r"min_image_tokens \(300\) is more than max_image_tokens \(256\)"),
        ({"max_image_tokens": 0}, "max_image_tokens must be a positive integer"),
        ({"tile_size": 0}, "tile_size must be a positive integer"),
        ({"encoder_patch_size": -16}, "encoder_patch_size must be a positive integer"),
        ({"downsample_factor": 1.5}, "downsample_factor must be a positive integer"),
        ({"min_tiles": True}, "min_tiles must be a positive integer"),
        ({"min_tiles": 5, "max_tiles": 4}, r"min_tiles \(5\) is more than max_tiles \(4\)"),
        ({"tile_size": 500}, r"tile_size \(500\) must be a multiple of .* \(32 px\).*use 480"),
        ({"max_pixels_tolerance": 0}, "max_pixels_tolerance must be a positive finite number"),
        ({"max_pixels_tolerance": float("nan")}, "max_pixels_tolerance must be a positive finite number"),
        ({"do_image_splitting": "false"}, "do_image_splitting must be True or False"),
        ({"resample": 9}, "resample must be a PIL filter code"),
    ],
)
def test_policy_validation(settings, match):
    with pytest.raises(ValueError, match=match):
        ImagePolicy(**settings)


def test_policy_dict_round_trip():
    policy = ImagePolicy(min_image_tokens=32, max_tiles=4)
    assert ImagePolicy.from_dict(policy.to_dict()) == policy
    assert policy.replace(max_tiles=6).max_tiles == 6
    # min_tiles > max_tiles is allowed while splitting is off, as in transformers
    assert ImagePolicy(do_image_splitting=False, min_tiles=5, max_tiles=4).tile_range == (1, 1)
    assert ImagePolicy.from_dict({"resample": "bicubic"}).resample == 3
    processor_config = {**ImagePolicy().to_dict(), "image_mean": [0.5] * 3, "do_pad": True,
                        "image_processor_type": "Lfm2VlImageProcessor"}
    assert ImagePolicy.from_dict(processor_config, strict=False) == ImagePolicy()
    with pytest.raises(ValueError, match=r"Unknown ImagePolicy setting\(s\) \['do_pad', 'image_mean'.*strict=False"):
        ImagePolicy.from_dict(processor_config)
    with pytest.raises(ValueError, match="resample 'cubic' is not one of"):
        ImagePolicy.from_dict({"resample": "cubic"})
    with pytest.raises(ValueError, match="needs a dict"):
        ImagePolicy.from_dict([("tile_size", 512)])


def test_max_num_patches_matches_reference_default():
    assert ImagePolicy().max_num_patches == 1024
    assert ImagePolicy(do_image_splitting=False, max_image_tokens=64).max_num_patches == 256
    assert ImagePolicy(max_image_tokens=64).max_num_patches == 1024  # a 512 tile is 1024 patches


@pytest.mark.parametrize(
    "size,settings,match",
    [
        ((0, 512), {}, "0x512 pixels: it is empty"),
        ((512, 0), {}, "512x0 pixels: it is empty"),
        ((-3, 40), {}, "it is empty"),
        ((15, 400), {}, "smaller than one encoder patch: the minimum is 16x16"),
        ((400, 1), {}, "the minimum is 16x16"),
        ((1, 10000), {}, "the minimum is 16x16"),
        ((12.0, 40), {}, "width must be an integer"),
        ((30, 9000), {}, r"aspect ratio \(300:1\) is too extreme"),
        ((9000, 30), {"do_image_splitting": False}, r"aspect ratio \(300:1\) is too extreme"),
        ((100, 30000), {}, r"thumbnail .* aspect ratio \(300:1\)"),
        ((100, 150), {"min_image_tokens": 64, "max_image_tokens": 64, "do_image_splitting": False},
         r"min_image_tokens \(64\) is too close to max_image_tokens \(64\)"),
        ((721, 727), {"min_tiles": 1}, r"single 512x512 tile \(256 tokens\).*writes 240 tokens.*min_tiles >= 2"),
    ],
)
def test_bad_image_sizes(size, settings, match):
    with pytest.raises(UnsupportedImageSize, match=match):
        image_layout(*size, ImagePolicy(**settings))
    assert issubclass(UnsupportedImageSize, ValueError)


def test_refusals_are_where_transformers_goes_wrong():
    """The size/aspect refusals above (not the under-one-patch one) are cases where transformers' own output
    does not fit together; its accepted neighbours do."""
    for (w, h), settings in [((30, 9000), {}), ((100, 30000), {}), ((721, 727), {"min_tiles": 1}),
                             ((100, 150), {"min_image_tokens": 64, "max_image_tokens": 64,
                                           "do_image_splitting": False})]:
        assert not _ref_consistent(_ref_run(w, h, ImagePolicy(**settings)), ImagePolicy(**settings)), (w, h)
    for (w, h), settings in [((40, 9000), {}), ((724, 724), {"min_tiles": 1}),
                             ((100, 150), {"min_image_tokens": 64, "max_image_tokens": 64})]:
        assert _ref_consistent(_ref_run(w, h, ImagePolicy(**settings)), ImagePolicy(**settings)), (w, h)
        image_layout(w, h, ImagePolicy(**settings))


def test_resize_and_split_refuses_tiny_image():
    with pytest.raises(UnsupportedImageSize, match="minimum is 16x16"):
        resize_and_split(Image.new("RGB", (8, 8)))


def test_stand_ins_left_nothing_behind():
    module = _reference()
    assert sys.modules.get("torchvision") is None or sys.modules["torchvision"].__spec__ is not None
    assert sys.modules.get(REF_MODULE) is not module
    assert sys.modules["transformers.models.lfm2_vl"].__dict__.get("image_processing_lfm2_vl") is not module


def test_integral_sizes_and_imports():
    import ast
    import pathlib

    import numpy as np

    import n2eye.modeling.image_policy as module

    assert image_layout(np.int64(1024), np.int32(768)) == image_layout(1024, 768)
    # ships inside checkpoints: the standard library and Pillow only (image_io, lazily, for non-RGB images)
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    top = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
    top |= {node.module.split(".")[0] for node in tree.body if isinstance(node, ast.ImportFrom) and node.level == 0}
    assert top <= {"__future__", "collections", "dataclasses", "math", "numbers", "typing", "PIL"}, top
