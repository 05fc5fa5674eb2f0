"""N2EyeProcessor with LFM2-VL's image policy (SigLIP2 NaFlex + pixel unshuffle), against transformers' Lfm2Vl.

Text: transformers' own `Lfm2VlProcessor.__call__` runs with our tokenizer and a stand-in image processor that returns
the reference's `image_rows` / `image_cols` / `image_sizes`, computed by `Lfm2VlImageProcessor.resize_and_split`
itself (shape only, through the torchvision stand-in of tests/test_image_policy.py); its expansion
(`replace_image_token` / `_build_image_tokens`) and tokenization are then the reference's, and the token ids must
equal ours. Pixels: for crops that need no resize, our patches equal a numpy transcription of the reference's
`convert_image_to_patches` and fused rescale/normalise (`image_processing_lfm2_vl.py`), bit for bit. Resized crops
differ from torchvision's by at most one grey level before normalisation (tests/test_image_policy.py measures it).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from n2eye.modeling.image_policy import ImagePolicy, UnsupportedImageSize, image_layout, tile_marker
from test_image_policy import _ref_run, _reference

BIG, SMALL = (1600, 1200), (100, 80)  # 3x2 tiles + thumbnail; one upscaled image
EXPECTED_TOKENS = {BIG: 6 * 256 + 18 * 13, SMALL: 9 * 8}  # thumbnail 576x416, small resized to 288x256


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def processor(naflex_checkpoint):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(naflex_checkpoint, trust_remote_code=True)


def _prompt(processor, n_images: int = 2) -> str:
    content = [{"type": "image"}, {"type": "text", "text": "and"}] * n_images + [{"type": "text", "text": "Compare."}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


# ---- transformers' Lfm2VlProcessor, run for real on the text side -----------------------------------------------
def _reference_processor(processor):
    """transformers' `Lfm2VlProcessor` with our tokenizer and an image processor that answers with the reference's
    own layout arithmetic (no pixels: the text expansion only reads rows, cols and resized sizes)."""
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.models.lfm2_vl.processing_lfm2_vl import Lfm2VlProcessor

    base = ImagePolicy.from_dict({k: v for k, v in processor.image_policy.items() if k != "max_num_patches"})

    class ReferenceLayouts(ImageProcessingMixin):
        valid_kwargs = _reference().Lfm2VlImageProcessorKwargs
        model_input_names = ["pixel_values", "pixel_attention_mask", "spatial_shapes"]

        def __init__(self):
            super().__init__()
            for name, value in base.to_dict().items():
                setattr(self, name, value)

        def __call__(self, images, **kwargs):
            policy = base.replace(**{k: v for k, v in kwargs.items() if k in base.to_dict()})
            runs = [_ref_run(image.width, image.height, policy) for sample in images for image in sample]
            return {"image_rows": [r["rows"] for r in runs], "image_cols": [r["cols"] for r in runs],
                    "image_sizes": [list(r["size_hw"]) for r in runs]}  # fmt: skip

    return Lfm2VlProcessor(ReferenceLayouts(), processor.tokenizer, chat_template=processor.chat_template)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"max_image_tokens": 64}, {"do_image_splitting": False}, {"use_thumbnail": False}, {"min_image_tokens": 32}],
)
def test_token_ids_equal_transformers_lfm2vl(processor, overrides):
    text = _prompt(processor)
    images = [_noise(*BIG), _noise(*SMALL, seed=1)]
    ours = processor(text=text, images=images, **overrides)
    reference = _reference_processor(processor)
    theirs = reference(text=[text], images=[images], **overrides)
    assert ours["input_ids"] == theirs["input_ids"]
    policy = ImagePolicy.from_dict({**processor.image_policy, **overrides, "max_num_patches": None}, strict=False)
    layouts = [image_layout(*size, policy) for size in (BIG, SMALL)]
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert ours["input_ids"][0].count(image_id) == sum(layout.total_tokens for layout in layouts)
    assert ours["spatial_shapes"].tolist() == [list(s) for layout in layouts for s in layout.spatial_shapes]
    if not overrides:
        assert [layout.total_tokens for layout in layouts] == [EXPECTED_TOKENS[BIG], EXPECTED_TOKENS[SMALL]]


def test_token_ids_without_image_special_tokens(processor):
    """`use_image_special_tokens=False` (a processor setting here, a call option in transformers): no markers."""
    import copy

    plain = copy.copy(processor)
    plain.use_image_special_tokens = False
    text = _prompt(processor)
    images = [_noise(*BIG), _noise(*SMALL, seed=1)]
    ours = plain(text=text, images=images)
    theirs = _reference_processor(processor)(text=[text], images=[images], use_image_special_tokens=False)
    assert ours["input_ids"] == theirs["input_ids"]
    assert processor.tokenizer.convert_tokens_to_ids("<|img_thumbnail|>") not in ours["input_ids"][0]


def test_expanded_text_order(processor):
    """Tiles row-major with their markers, then the thumbnail; one crop: no tile or thumbnail marker."""
    out = processor(text="<image><image>", images=[_noise(*BIG), _noise(*SMALL)], return_text_replacement_offsets=True)
    big, small = (r["replacement"] for r in out["text_replacement_offsets"][0])
    markers = [tile_marker(r, c) for r in (1, 2) for c in (1, 2, 3)]
    expected = "<|image_start|>" + "".join(m + "<image>" * 256 for m in markers)
    assert big == expected + "<|img_thumbnail|>" + "<image>" * 234 + "<|image_end|>"
    assert small == "<|image_start|>" + "<image>" * 72 + "<|image_end|>"


# ---- pixels ------------------------------------------------------------------------------------------------------
def _np_patches(image: Image.Image, patch: int, mean, std, rescale: float) -> np.ndarray:
    """transformers' Lfm2Vl pixels for a crop that needs no resize, in numpy: `rescale_and_normalize` (fused:
    `(x - mean / rescale) / (std / rescale)` in float32) then `convert_image_to_patches`
    (reshape (c, h/p, p, w/p, p), permute to (h/p, w/p, p, p, c), flatten)."""
    x = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)
    mean = np.asarray(mean, dtype=np.float32) * (1.0 / rescale)
    std = np.asarray(std, dtype=np.float32) * (1.0 / rescale)
    x = (x - mean[:, None, None]) / std[:, None, None]
    c, h, w = x.shape
    x = x.reshape(c, h // patch, patch, w // patch, patch).transpose(1, 3, 2, 4, 0)
    return x.reshape((h // patch) * (w // patch), -1)


def _reference_pixels(processor, image: Image.Image) -> np.ndarray:
    ip = processor.image_processor
    return _np_patches(image, 16, ip.image_mean, ip.image_std, ip.rescale_factor)


def test_pixel_patches_exact_without_resize(processor):
    image = _noise(320, 512, seed=3)  # whole merged patches, 160 tokens: used as is
    out = processor(text="<image>", images=[image])
    expected = _reference_pixels(processor, image)
    assert out["spatial_shapes"].tolist() == [[32, 20]]
    assert out["pixel_values"].shape == (1, 1024, 768) and out["pixel_values"].dtype == torch.float32
    assert out["pixel_attention_mask"].dtype == torch.int32 and out["spatial_shapes"].dtype == torch.int64
    assert np.array_equal(out["pixel_values"][0, :640].numpy(), expected)
    assert not out["pixel_values"][0, 640:].any()
    assert out["pixel_attention_mask"][0].tolist() == [1] * 640 + [0] * 384

    # the patch order is also SigLIP2's own (its image processor at the same size, no resize)
    siglip2 = processor.image_processor(image, do_resize=False, max_num_patches=1024, return_tensors="pt")
    torch.testing.assert_close(out["pixel_values"], siglip2["pixel_values"], atol=1e-6, rtol=0)


def test_tiles_exact_when_the_image_is_a_whole_grid(processor):
    image = _noise(1536, 1024, seed=4)  # exactly 3x2 tiles of 512: the tiles are plain crops
    out = processor(text="<image>", images=[image])
    shapes = out["spatial_shapes"].tolist()
    assert shapes[:6] == [[32, 32]] * 6 and len(shapes) == 7
    for index, tile in enumerate(image_layout(1536, 1024).tiles):
        expected = _reference_pixels(processor, image.crop(tile.box))
        assert np.array_equal(out["pixel_values"][index].numpy(), expected), index
        assert int(out["pixel_attention_mask"][index].sum()) == 1024


# ---- settings --------------------------------------------------------------------------------------------------
def test_per_call_overrides_change_counts_not_the_config(processor):
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    stored = dict(processor.image_policy)
    default = processor(text="<image>", images=[_noise(*BIG)])
    assert default["input_ids"][0].count(image_id) == EXPECTED_TOKENS[BIG]
    assert tuple(default["pixel_values"].shape) == (7, 1024, 768)

    small = processor(text="<image>", images=[_noise(*BIG)], max_image_tokens=64, do_image_splitting=False)
    assert small["input_ids"][0].count(image_id) == 6 * 9  # 1600x1200 -> 288x192
    assert small["spatial_shapes"].tolist() == [[12, 18]]
    assert tuple(small["pixel_values"].shape) == (1, 256, 768)  # padded to max_image_tokens x 2**2

    padded = processor(text="<image>", images=[_noise(*SMALL)], max_num_patches=2048)
    assert tuple(padded["pixel_values"].shape) == (1, 2048, 768)
    assert processor.image_policy == stored

    messages = [{"role": "user", "content": [{"type": "image", "image": _noise(*BIG)}, {"type": "text", "text": "Hi"}]}]
    chat = processor.apply_chat_template(messages, tokenize=True, return_dict=True, max_image_tokens=64,
                                         do_image_splitting=False)  # fmt: skip
    assert chat["input_ids"][0].count(image_id) == 54


def test_settings_are_saved_and_loaded(processor, tmp_path):
    from transformers import AutoProcessor

    from n2eye.checkpoint import copy_modeling_files

    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())["image_policy"]
    assert saved == processor.image_policy
    assert saved["max_image_tokens"] == 256 and saved["tile_size"] == 512 and saved["max_num_patches"] is None
    saved.update(max_image_tokens=64, do_image_splitting=False)
    config = json.loads((tmp_path / "processor_config.json").read_text())
    config["image_policy"] = saved
    (tmp_path / "processor_config.json").write_text(json.dumps(config))
    copy_modeling_files(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path, trust_remote_code=True)
    out = reloaded(text="<image>", images=[_noise(*BIG)])
    assert out["spatial_shapes"].tolist() == [[12, 18]]


@pytest.mark.parametrize(
    "size,overrides,error,match",
    [
        (SMALL, {"min_image_tokens": 300}, ValueError, "min_image_tokens \\(300\\) is more than max_image_tokens"),
        (SMALL, {"min_tiles": 5, "max_tiles": 2}, ValueError, "min_tiles \\(5\\) is more than max_tiles"),
        (SMALL, {"tile_size": 500}, ValueError, "tile_size \\(500\\) must be a multiple"),
        (SMALL, {"max_num_patches": 100}, ValueError, "max_num_patches=100"),
        ((10, 40), {}, ValueError, "Image 1 of 1: .*smaller than one encoder patch"),
        ((30, 9000), {}, ValueError, "aspect ratio \\(300:1\\) is too extreme"),
        (SMALL, {"max_image_tokens": "64"}, Exception, "max_image_tokens"),
    ],
)
def test_bad_input_is_refused_clearly(processor, size, overrides, error, match):
    """(The processor is the checkpoint's copy, so its UnsupportedImageSize is that module's: checked by name.)"""
    with pytest.raises(error, match=match) as excinfo:
        processor(text="<image>", images=[_noise(*size)], **overrides)
    if size in ((10, 40), (30, 9000)):
        assert type(excinfo.value).__name__ == UnsupportedImageSize.__name__


def test_policy_needs_naflex_and_marker_tokens(processor, tiny_checkpoint):
    from transformers import AutoProcessor, AutoTokenizer

    from n2eye.modeling.processing_n2eye import N2EyeProcessor

    fixed = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    with pytest.raises(ValueError, match="needs a SigLIP2 NaFlex image processor"):
        N2EyeProcessor(fixed.image_processor, fixed.tokenizer, patch_size=8, image_policy={"encoder_patch_size": 8})
    with pytest.raises(ValueError, match="image_policy.downsample_factor is 2 but the model's is 1"):
        N2EyeProcessor(processor.image_processor, processor.tokenizer, patch_size=16, image_policy={})
    # a tokenizer without the markers (the tiny preset's): unsplit images work, tiled ones are refused
    bare = N2EyeProcessor(processor.image_processor, AutoTokenizer.from_pretrained(tiny_checkpoint), patch_size=16,
                          downsample_factor=2, image_policy={})  # fmt: skip
    assert bare(text="<image>", images=[_noise(*SMALL)])["spatial_shapes"].tolist() == [[16, 18]]
    with pytest.raises(ValueError, match="lacks the image marker token"):
        bare(text="<image>", images=[_noise(*BIG)])


# ---- tokens: build, control-token checks, generation -----------------------------------------------------------
def test_build_adds_the_marker_tokens_as_special(processor):
    from n2eye.modeling.image_policy import image_marker_tokens
    from n2eye.modeling.processing_n2eye import never_generated_token_ids

    tokenizer = processor.tokenizer
    markers = image_marker_tokens()
    assert len(markers) == 101 and markers[0] == "<|img_row_1_col_1|>" and markers[-2] == "<|img_row_10_col_10|>"
    added = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    assert set(markers) <= set(added)
    assert {added[m] for m in markers} <= set(never_generated_token_ids(tokenizer))
    for marker in markers[:3]:
        assert tokenizer.encode(marker, add_special_tokens=False) == [added[marker]]


@pytest.mark.parametrize("text", ["<|img_thumbnail|>", "see <|img_row_2_col_3|>", "<|img_row_12_col_40|> x"])
def test_control_token_check_covers_markers(processor, text):
    messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
    with pytest.raises(ValueError, match="control token") as excinfo:
        processor.apply_chat_template(messages, tokenize=False)
    assert type(excinfo.value).__name__ == "ControlTokenError"


def test_fixed_resolution_processor_unchanged(tiny_checkpoint):
    """The tiny preset (SigLIP, fixed 64 px): no policy, no markers, pixel_values as before; policy-only
    settings are refused rather than ignored."""
    from transformers import AutoProcessor

    fixed = AutoProcessor.from_pretrained(tiny_checkpoint, trust_remote_code=True)
    assert fixed.image_policy is None
    assert json.loads((tiny_checkpoint / "processor_config.json").read_text())["image_policy"] is None
    assert "<|img_thumbnail|>" not in fixed.tokenizer.get_vocab()
    out = fixed(text="<image>", images=[_noise(*BIG)])
    assert tuple(out["pixel_values"].shape) == (1, 3, 64, 64)
    assert out["input_ids"][0].count(fixed.image_token_id) == 64
    with pytest.raises(ValueError, match="image policy, which this processor does not use"):
        fixed(text="<image>", images=[_noise(*BIG)], max_image_tokens=64)


# ---- the checkpoint in a fresh process ------------------------------------------------------------------------
FRESH = textwrap.dedent(
    """
    import sys
    import numpy as np, torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True, dtype=dtype).eval()
    rng = np.random.default_rng(0)
    big = Image.fromarray(rng.integers(0, 256, (1200, 1600, 3), dtype=np.uint8))
    small = Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image", "image": big}, {"type": "text", "text": "and"},
                                             {"type": "image", "image": small}, {"type": "text", "text": "?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    n_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        out = model(**{k: v for k, v in inputs.items() if k != "assistant_masks"})
    assert not any(name.startswith("n2eye") for name in sys.modules), "the user's process must not need n2eye"
    print("CROPS", inputs["spatial_shapes"].tolist())
    print("TOKENS", n_tokens, "FEATURES", out.image_hidden_states.shape[0], "LOGITS", tuple(out.logits.shape))
    """
)


def run_fresh_process_check(checkpoint: Path, tmp_path: Path, dtype: str = "float32") -> None:
    """Loads `checkpoint` with plain transformers in a fresh process, processes a conversation with a 1600x1200
    (3x2 tiles + thumbnail) and a 100x80 image, and runs the model's forward on it: one feature per `<image>`."""
    for name in ("image_policy.py", "naflex_images.py", "processing_n2eye.py"):
        assert (checkpoint / name).is_file()
    script = tmp_path / "fresh.py"
    script.write_text(FRESH)
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "PYTHONNOUSERSITE": "1"}
    result = subprocess.run([sys.executable, "-I", str(script), str(checkpoint), dtype], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    tokens = EXPECTED_TOKENS[BIG] + EXPECTED_TOKENS[SMALL]
    assert f"CROPS {[[32, 32]] * 6 + [[26, 36], [16, 18]]}" in result.stdout
    assert f"TOKENS {tokens} FEATURES {tokens} LOGITS" in result.stdout


def test_checkpoint_in_a_fresh_process(naflex_checkpoint, tmp_path):
    run_fresh_process_check(naflex_checkpoint, tmp_path)
