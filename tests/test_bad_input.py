"""Bad input gets a clear error naming the problem and the fix (or a documented conversion), never a bare
traceback or silently wrong pixels: images, processor/model mismatches and `n2eye build` arguments.

All offline: URLs are served by a local `http.server` on 127.0.0.1.
"""

from __future__ import annotations

import base64
import functools
import http.server
import io
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from n2eye.modeling.image_io import MAX_IMAGE_PIXELS, ImageLoadError, load_image, to_rgb

from conftest import draw_shapes

# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def png_bytes(image: Image.Image, **save_kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG", **save_kwargs)
    return buf.getvalue()


def noisy_png(size=(64, 48)) -> bytes:
    """A PNG that does not compress away, so a truncated copy loses real pixel data."""
    arr = np.random.RandomState(0).randint(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return png_bytes(Image.fromarray(arr))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def crafted_png(width: int, height: int, *, with_pixels: bool = True) -> bytes:
    """A 1-bit greyscale PNG whose header says width x height. With pixels it is a complete, valid file whose
    all-zero rows compress to almost nothing (a decompression bomb); without, it is a header only, which would fail
    as truncated if anything tried to decode it."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
    chunks = [b"\x89PNG\r\n\x1a\n", header]
    if with_pixels:
        row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
        comp = zlib.compressobj(9)
        block = row * 1000
        parts = [comp.compress(block) for _ in range(height // 1000)]
        parts.append(comp.compress(row * (height % 1000)))
        parts.append(comp.flush())
        chunks.append(_chunk(b"IDAT", b"".join(parts)))
    chunks.append(_chunk(b"IEND", b""))
    return b"".join(chunks)


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def error_type_name(excinfo) -> str:
    # Through the processor, the error class comes from the checkpoint's own copy of image_io.py (remote code),
    # so it is a different class object than n2eye.modeling.image_io.ImageLoadError: compare by name.
    return type(excinfo.value).__name__


def image_message(content_item: dict, text: str = "What is this?") -> list[dict]:
    return [{"role": "user", "content": [content_item, {"type": "text", "text": text}]}]


def process_messages(processor, messages, **kwargs):
    return processor.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", **kwargs
    )


# ---------------------------------------------------------------------------------------------------------------------
# A local HTTP server (no network)
# ---------------------------------------------------------------------------------------------------------------------


class _Handler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_GET(self) -> None:
        if self.path == "/no-length.png":  # a body without Content-Length: the read cap must still hold
            body = Path(self.directory, "ok.png").read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture(scope="module")
def http_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("www")
    (root / "ok.png").write_bytes(png_bytes(draw_shapes()))
    (root / "page.html").write_text("<html><body><img src='ok.png'></body></html>")
    handler = functools.partial(_Handler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def server(http_root, monkeypatch):
    """The local server's base URL, with any proxy from the environment bypassed for 127.0.0.1."""
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1,localhost")
    return http_root


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/image.png"


# ---------------------------------------------------------------------------------------------------------------------
# 1. Images: load_image
# ---------------------------------------------------------------------------------------------------------------------


def test_random_bytes_with_png_name_is_corrupt(tmp_path):
    path = tmp_path / "random.png"
    path.write_bytes(np.random.RandomState(1).bytes(600))
    with pytest.raises(ImageLoadError, match="corrupt") as excinfo:
        load_image(path)
    message = str(excinfo.value)
    assert "random.png" in message and "Re-export" in message
    assert "BytesIO" not in message  # no internal object reprs in the message


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_truncated_png_is_corrupt(tmp_path, keep):
    data = noisy_png()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ImageLoadError, match="corrupt") as excinfo:
        load_image(str(path))
    assert "truncated.png" in str(excinfo.value)


def test_truncated_jpeg_and_empty_bytes_are_corrupt(tmp_path):
    buf = io.BytesIO()
    Image.open(io.BytesIO(noisy_png())).save(buf, "JPEG")
    with pytest.raises(ImageLoadError, match="corrupt"):
        load_image(buf.getvalue()[: buf.tell() // 2])
    with pytest.raises(ImageLoadError, match="corrupt"):
        load_image(b"")


def test_lazily_opened_truncated_pil_image_is_corrupt(tmp_path):
    data = noisy_png()
    path = tmp_path / "half.png"
    path.write_bytes(data[: len(data) // 2])
    lazy = Image.open(path)  # the header is fine; decoding fails
    with pytest.raises(ImageLoadError, match="corrupt"):
        load_image(lazy)


def test_missing_path(tmp_path):
    missing = tmp_path / "nope" / "missing.png"
    with pytest.raises(ImageLoadError, match="does not exist") as excinfo:
        load_image(str(missing))
    message = str(excinfo.value)
    assert "missing.png" in message and "Check the path" in message


def test_relative_missing_path_names_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ImageLoadError, match="relative to the current folder"):
        load_image("photos/cat.jpg")


@pytest.mark.parametrize("source", ["", "   "])
def test_empty_path(source):
    with pytest.raises(ImageLoadError, match="empty"):
        load_image(source)


def test_folder_instead_of_file(tmp_path):
    with pytest.raises(ImageLoadError, match="is a folder"):
        load_image(tmp_path)


def test_pathlike_and_file_url_load(image_path):
    assert load_image(image_path).size == (96, 80)
    assert load_image(f"file://{image_path}").size == (96, 80)


def test_file_over_max_bytes(image_path):
    with pytest.raises(ImageLoadError, match="over the cap of 100 bytes") as excinfo:
        load_image(image_path, max_bytes=100)
    assert "max_bytes" in str(excinfo.value)


@pytest.mark.parametrize("source", [3, 2.5, {"path": "x.png"}, ["x.png"], None, object()])
def test_unsupported_types(source):
    with pytest.raises(ImageLoadError, match="Unsupported image input of type") as excinfo:
        load_image(source)
    assert type(source).__name__ in str(excinfo.value)
    assert "PIL image" in str(excinfo.value)  # says what to pass instead


def test_image_load_error_is_a_value_error():
    assert issubclass(ImageLoadError, ValueError)


# ---- modes -------------------------------------------------------------------------------------------------------


def _rgba():
    im = Image.new("RGBA", (3, 1))
    im.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red
    im.putpixel((1, 0), (0, 0, 255, 255))  # opaque blue
    im.putpixel((2, 0), (0, 0, 0, 128))  # half-transparent black
    return im


def _la():
    im = Image.new("LA", (2, 1))
    im.putpixel((0, 0), (0, 0))
    im.putpixel((1, 0), (100, 255))
    return im


def _palette_with_transparency():
    im = Image.new("P", (2, 1))
    im.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0  # palette index 0 (red) is transparent
    return im


def _one_bit():
    im = Image.new("1", (2, 1), 0)
    im.putpixel((1, 0), 1)
    return im


def _colour_key_rgb():
    im = Image.new("RGB", (2, 1), (0, 0, 0))
    im.putpixel((1, 0), (9, 9, 9))
    return Image.open(io.BytesIO(png_bytes(im, transparency=(0, 0, 0))))  # tRNS colour key: black is transparent


WHITE, BLACK = (255, 255, 255), (0, 0, 0)

# name -> (make the image, file format that keeps the mode or None, {(x, y): expected RGB})
MODE_CASES = {
    "RGBA": (_rgba, "PNG", {(0, 0): WHITE, (1, 0): (0, 0, 255), (2, 0): (127, 127, 127)}),
    "LA": (_la, "PNG", {(0, 0): WHITE, (1, 0): (100, 100, 100)}),
    "L": (lambda: Image.fromarray(np.array([[0, 200]], np.uint8)), "PNG", {(0, 0): BLACK, (1, 0): (200,) * 3}),
    "I;16": (
        lambda: Image.fromarray(np.array([[1000, 3000, 2000]], np.uint16)),
        "PNG",
        {(0, 0): BLACK, (1, 0): WHITE, (2, 0): (128,) * 3},  # min -> 0, max -> 255, linear between
    ),
    "I;16 constant": (lambda: Image.fromarray(np.full((1, 2), 65535, np.uint16)), "PNG", {(0, 0): WHITE}),
    "I": (lambda: Image.fromarray(np.array([[-5, 70000]], np.int32)), "TIFF", {(0, 0): BLACK, (1, 0): WHITE}),
    "F": (
        lambda: Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)),
        "TIFF",
        {(0, 0): BLACK, (1, 0): (128,) * 3, (2, 0): WHITE},
    ),
    "F with NaN": (
        lambda: Image.fromarray(np.array([[np.nan, 0.0, 2.0, 4.0, np.inf]], np.float32)),
        None,
        {(0, 0): BLACK, (1, 0): BLACK, (2, 0): (128,) * 3, (3, 0): WHITE, (4, 0): BLACK},  # NaN/inf -> the minimum
    ),
    "P": (_palette_with_transparency, "PNG", {(0, 0): WHITE, (1, 0): (0, 255, 0)}),
    "PA": (lambda: Image.new("PA", (2, 1)), None, {(0, 0): WHITE}),
    "CMYK": (lambda: _cmyk(), "TIFF", {(0, 0): (255, 0, 0), (1, 0): WHITE}),
    "1": (_one_bit, "PNG", {(0, 0): BLACK, (1, 0): WHITE}),
    "RGB colour key": (_colour_key_rgb, None, {(0, 0): WHITE, (1, 0): (9, 9, 9)}),
    "RGBa": (lambda: Image.new("RGBa", (1, 1), (0, 0, 0, 0)), None, {(0, 0): WHITE}),
    "La": (lambda: Image.new("La", (1, 1), (0, 0)), None, {(0, 0): WHITE}),
    "LAB": (lambda: Image.new("LAB", (1, 1), (128, 128, 128)), None, {(0, 0): (119, 119, 119)}),  # L*=50 grey
}


def _cmyk():
    im = Image.new("CMYK", (2, 1), (0, 0, 0, 0))
    im.putpixel((0, 0), (0, 255, 255, 0))  # no cyan, full magenta + yellow: red
    return im


def _check_pixels(result: Image.Image, expected: dict, tolerance: int = 1) -> None:
    assert result.mode == "RGB"
    for xy, rgb in expected.items():
        got = result.getpixel(xy)
        assert all(abs(g - e) <= tolerance for g, e in zip(got, rgb)), f"pixel {xy}: got {got}, expected {rgb}"


@pytest.mark.parametrize("name", list(MODE_CASES))
def test_modes_convert_to_rgb(name):
    make, _, expected = MODE_CASES[name]
    image = make()
    result = load_image(image)
    assert result.size == image.size
    _check_pixels(result, expected)
    _check_pixels(to_rgb(make()), expected)


@pytest.mark.parametrize("name", [n for n, case in MODE_CASES.items() if case[1]])
def test_modes_convert_to_rgb_from_files(tmp_path, name):
    make, fmt, expected = MODE_CASES[name]
    image = make()
    path = tmp_path / f"image.{fmt.lower()}"
    image.save(path, fmt, **({"transparency": 0} if name == "P" else {}))
    assert Image.open(path).mode.split(";")[0] == image.mode.split(";")[0]  # the file really holds that mode
    _check_pixels(load_image(path), expected)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, "JPEG", exif=exif, quality=95)
    result = load_image(path)
    assert result.size == (20, 40)
    top, bottom = result.getpixel((10, 5)), result.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60  # the left (red) half is on top after the rotation
    assert bottom[2] > 200 and bottom[0] < 60


# ---- size --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(0, 5), (5, 0), (0, 0)])
def test_zero_size_pil_image(size):
    with pytest.raises(ImageLoadError, match="zero size") as excinfo:
        load_image(Image.new("RGB", size))
    message = str(excinfo.value)
    assert f"{size[0]}x{size[1]}" in message and "at least 1x1" in message


def test_decompression_bomb_file_is_refused_before_decoding(tmp_path):
    data = crafted_png(20000, 20000)
    assert len(data) < 200_000  # 400 million pixels in a small file
    assert Image.open(io.BytesIO(crafted_png(16, 16))).convert("L").getpixel((3, 3)) == 0  # the layout is valid PNG
    path = tmp_path / "bomb.png"
    path.write_bytes(data)
    with pytest.raises(ImageLoadError, match=r"400000000 pixels, over the cap of 64000000") as excinfo:
        load_image(path)
    assert "decompression bomb" in str(excinfo.value) and "max_pixels" in str(excinfo.value)


@pytest.mark.parametrize("side", [9000, 10000, 20000])  # below, inside and above Pillow's own warning range
def test_pixel_cap_is_checked_from_the_header(side):
    header_only = crafted_png(side, side, with_pixels=False)  # decoding it would fail as truncated/corrupt
    with pytest.raises(ImageLoadError, match=f"over the cap of {MAX_IMAGE_PIXELS}") as excinfo:
        load_image(header_only)
    assert "corrupt" not in str(excinfo.value)
    assert str(side * side) in str(excinfo.value)


def test_max_pixels_lower_than_the_image():
    with pytest.raises(ImageLoadError, match=r"96x80 = 7680 pixels, over the cap of 1000"):
        load_image(png_bytes(draw_shapes()), max_pixels=1000)
    with pytest.raises(ImageLoadError, match="over the cap of 1000"):
        load_image(draw_shapes(), max_pixels=1000)  # PIL images too
    assert load_image(png_bytes(draw_shapes()), max_pixels=96 * 80).size == (96, 80)


def test_max_pixels_governs_not_pillows_warning_limit(monkeypatch):
    """Pillow warns above PIL.Image.MAX_IMAGE_PIXELS: that must not fail an image that max_pixels allows."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_image(png_bytes(draw_shapes())).size == (96, 80)  # 7680 px: over 5000, under 2 x 5000


def test_pillows_hard_limit_above_max_pixels_is_explained(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow refuses > 2000 pixels while opening
    with pytest.raises(ImageLoadError, match="PIL.Image.MAX_IMAGE_PIXELS"):
        load_image(png_bytes(draw_shapes()), max_pixels=10_000)


# ---- data URIs and base64 ------------------------------------------------------------------------------------------


def test_data_uri_loads():
    image = draw_shapes()
    result = load_image(data_uri(png_bytes(image)))
    assert result.size == image.size and result.getpixel((0, 0)) == image.getpixel((0, 0))


def test_data_uri_with_wrapped_lines_and_urlsafe_alphabet_loads():
    payload = base64.b64encode(noisy_png()).decode()
    wrapped = "\n".join(payload[i : i + 76] for i in range(0, len(payload), 76))
    assert load_image("data:image/png;base64," + wrapped).size == (64, 48)
    urlsafe = base64.urlsafe_b64encode(noisy_png()).decode()
    assert "-" in urlsafe or "_" in urlsafe
    assert load_image("data:image/png;base64," + urlsafe).size == (64, 48)


@pytest.mark.parametrize(
    "uri, expected",
    [
        ("data:image/png;base64,@@@not*base64!!", "invalid base64"),
        ("data:image/png;base64,iVBORw0KGgo=AAAA$$", "invalid base64"),
        ("data:image/png," + base64.b64encode(b"\x89PNG").decode(), "not base64"),
        ("data:image/png;base64", "no ','"),
        ("data:image/png;base64,   ", "empty"),
        ("data:image/png;base64," + base64.b64encode(b"hello, not an image").decode(), "corrupt"),
    ],
)
def test_broken_data_uris(uri, expected):
    with pytest.raises(ImageLoadError, match=re.escape(expected)) as excinfo:
        load_image(uri)
    assert "Data URI" in str(excinfo.value) or expected == "corrupt"


def test_bare_base64_of_an_image_loads():
    """transformers' {"type": "image", "base64": ...} item passes the bare base64 string through."""
    assert load_image(base64.b64encode(png_bytes(draw_shapes())).decode()).size == (96, 80)


def test_data_uri_over_max_bytes():
    with pytest.raises(ImageLoadError, match="over the cap of 100 bytes"):
        load_image(data_uri(noisy_png()), max_bytes=100)


# ---- URLs ----------------------------------------------------------------------------------------------------------


def test_http_url_loads(server):
    result = load_image(f"{server}/ok.png", timeout=5)
    assert result.size == (96, 80) and result.getpixel((0, 0)) == (30, 120, 200)


def test_http_404(server):
    with pytest.raises(ImageLoadError, match="HTTP 404") as excinfo:
        load_image(f"{server}/missing.png", timeout=5)
    assert "missing.png" in str(excinfo.value) and "Check the URL" in str(excinfo.value)


def test_unreachable_port(closed_port_url, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    with pytest.raises(ImageLoadError, match="Could not fetch image URL") as excinfo:
        load_image(closed_port_url, timeout=5)
    assert closed_port_url in str(excinfo.value)


@pytest.mark.parametrize("name", ["ok.png", "no-length.png"])  # with and without a Content-Length header
def test_http_response_over_max_bytes(server, name):
    with pytest.raises(ImageLoadError, match="over the cap of 100 bytes|larger than 100 bytes") as excinfo:
        load_image(f"{server}/{name}", timeout=5, max_bytes=100)
    assert "max_bytes" in str(excinfo.value)
    assert load_image(f"{server}/{name}", timeout=5).size == (96, 80)


def test_http_html_page_instead_of_image(server):
    with pytest.raises(ImageLoadError, match="text/html page, not an image"):
        load_image(f"{server}/page.html", timeout=5)


# ---------------------------------------------------------------------------------------------------------------------
# 1b. Images through the processor's chat template
# ---------------------------------------------------------------------------------------------------------------------


def test_processor_loads_path_url_data_uri_and_base64_items(tiny_model, image_path, server):
    _, processor = tiny_model
    png = image_path.read_bytes()
    items = [
        {"type": "image", "path": str(image_path)},
        {"type": "image", "url": f"{server}/ok.png"},
        {"type": "image", "url": data_uri(png)},
        {"type": "image", "base64": base64.b64encode(png).decode()},
    ]
    for item in items:
        inputs = process_messages(processor, image_message(item))
        assert inputs["pixel_values"].shape[0] == 1, item


@pytest.mark.parametrize(
    "make_item, expected",
    [
        (lambda d, s: {"type": "image", "path": str(_write(d / "bad.png", b"\x89PNG" + bytes(range(200))))}, "corrupt"),
        (lambda d, s: {"type": "image", "path": str(_write(d / "cut.png", noisy_png()[:300]))}, "corrupt"),
        (lambda d, s: {"type": "image", "path": str(d / "missing.png")}, "does not exist"),
        (
            lambda d, s: {"type": "image", "path": str(_write(d / "bomb.png", crafted_png(20000, 20000)))},
            "over the cap",
        ),
        (lambda d, s: {"type": "image", "url": f"{s}/missing.png"}, "HTTP 404"),
        (lambda d, s: {"type": "image", "url": "data:image/png;base64,%%%"}, "invalid base64"),
        (lambda d, s: {"type": "image", "url": "data:image/png,abc"}, "not base64"),
    ],
    ids=["random-bytes", "truncated", "missing", "bomb", "http-404", "bad-base64", "not-base64"],
)
def test_processor_bad_image_items(tiny_model, tmp_path, server, make_item, expected):
    _, processor = tiny_model
    with pytest.raises(ValueError, match=re.escape(expected)) as excinfo:
        process_messages(processor, image_message(make_item(tmp_path, server)))
    assert error_type_name(excinfo) == "ImageLoadError"


def test_processor_converts_rgba_file_on_white(tiny_model, tmp_path):
    _, processor = tiny_model
    path = tmp_path / "transparent.png"
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(path)
    inputs = process_messages(processor, image_message({"type": "image", "path": str(path)}))
    white = processor.image_processor(Image.new("RGB", (64, 64), WHITE), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(inputs["pixel_values"], white)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------------------------------
# 2. Processor / model mismatches
# ---------------------------------------------------------------------------------------------------------------------


def _chat_text(processor, n_images: int, text: str = "Describe.") -> str:
    content = [{"type": "image"}] * n_images + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def test_more_image_items_than_images(tiny_model):
    _, processor = tiny_model
    text = _chat_text(processor, 2)
    assert text.count("<image>") == 2
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\).*but 1 image\(s\) were given"):
        processor(text=text, images=[draw_shapes()])


def test_images_but_no_image_placeholder(tiny_model):
    _, processor = tiny_model
    with pytest.raises(ValueError, match=r"0 <image> placeholder\(s\).*but 1 image\(s\) were given"):
        processor(text=_chat_text(processor, 0), images=[draw_shapes()])


def test_placeholder_but_no_images(tiny_model):
    _, processor = tiny_model
    with pytest.raises(ValueError, match=r"1 <image> placeholder\(s\) but no images were passed"):
        processor(text=_chat_text(processor, 1))


def test_per_sample_image_lists_that_do_not_match(tiny_model):
    _, processor = tiny_model
    with pytest.raises(ValueError, match=r"the text has \[1\] and the images are \[2\] per sample"):
        processor(text=[_chat_text(processor, 1)], images=[[draw_shapes(), draw_shapes()]])


def test_model_with_image_tokens_but_no_pixel_values(tiny_model, image_path):
    model, processor = tiny_model
    inputs = process_messages(processor, image_message({"type": "image", "path": str(image_path)}))
    n_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with pytest.raises(ValueError, match="no pixel_values were given") as excinfo:
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
    assert f"{n_tokens} <image> tokens" in str(excinfo.value) and "processor" in str(excinfo.value)


def test_model_with_two_images_for_one_image_block(tiny_model, image_path):
    model, processor = tiny_model
    inputs = process_messages(processor, image_message({"type": "image", "path": str(image_path)}))
    n_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())
    two = torch.cat([inputs["pixel_values"], inputs["pixel_values"]])
    with pytest.raises(ValueError) as excinfo:
        model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=two)
    message = str(excinfo.value)
    assert f"{n_tokens} <image> positions" in message
    assert f"2 image(s) give {2 * n_tokens} features" in message


def test_tokenizer_instead_of_processor_fails_clearly_in_generate(tiny_model, image_path):
    """The model card's flow with `processor.tokenizer` in place of the processor: one unexpanded <image>, no
    pixel_values. It must fail with the no-pixel_values error, not generate from a text-only prompt."""
    model, processor = tiny_model
    messages = image_message({"type": "image", "path": str(image_path)})
    inputs = processor.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    assert "pixel_values" not in inputs
    with pytest.raises(ValueError, match="no pixel_values were given") as excinfo:
        model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert "processor" in str(excinfo.value)


def _mixed_batch(image_path):
    other = draw_shapes(shape="square", color=(20, 200, 20))
    return [
        [{"role": "user", "content": [{"type": "text", "text": "No image in this one."}]}],
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "path": str(image_path)},
                    {"type": "image", "image": other},
                    {"type": "text", "text": "Compare the two."},
                ],
            }
        ],
    ]


def test_batch_with_zero_and_two_images(tiny_model, image_path):
    model, processor = tiny_model
    batch = _mixed_batch(image_path)
    # Right padding, explicitly: then each row's real tokens sit at the same positions as when processed alone.
    inputs = process_messages(processor, batch, processor_kwargs={"padding": True, "padding_side": "right"})
    assert inputs["pixel_values"].shape[0] == 2
    image_id = model.config.image_token_id
    per_row = (inputs["input_ids"] == image_id).sum(dim=1).tolist()
    assert per_row[0] == 0 and per_row[1] > 0

    # The same through processor(text=..., images=...) with one (possibly empty) image list per sample.
    texts = [processor.apply_chat_template(conv, add_generation_prompt=True) for conv in batch]
    direct = processor(
        text=texts, images=[[], [load_image(image_path), batch[1][0]["content"][1]["image"]]], padding=True,
        padding_side="right", return_tensors="pt",
    )
    torch.testing.assert_close(direct["pixel_values"], inputs["pixel_values"])
    assert direct["input_ids"].tolist() == inputs["input_ids"].tolist()

    # Each row's logits equal that conversation processed alone.
    with torch.no_grad():
        batched = model(**inputs).logits
        for row, conv in enumerate(batch):
            alone = process_messages(processor, conv)
            n = alone["input_ids"].shape[1]
            assert inputs["input_ids"][row, :n].tolist() == alone["input_ids"][0].tolist()
            torch.testing.assert_close(batched[row, :n], model(**alone).logits[0], atol=1e-4, rtol=1e-4)


def test_batched_generate_matches_one_by_one(tiny_model, image_path):
    model, processor = tiny_model
    batch = _mixed_batch(image_path)
    inputs = process_messages(processor, batch, processor_kwargs={"padding": True})
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)[:, inputs["input_ids"].shape[1] :]
        for row, conv in enumerate(batch):
            alone = process_messages(processor, conv)
            expected = model.generate(**alone, max_new_tokens=4, do_sample=False)[0, alone["input_ids"].shape[1] :]
            assert out[row].tolist() == expected.tolist(), f"row {row}"


# ---------------------------------------------------------------------------------------------------------------------
# 3. Build errors
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_backbones(n2eye_cache):
    from n2eye.fixtures import make_tiny_backbones

    return make_tiny_backbones(n2eye_cache / "tiny-backbones")  # the folder `build --preset tiny` uses


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny local LlamaForCausalLM with a tokenizer: a causal LM that is not LFM2."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from n2eye.fixtures import train_tiny_tokenizer

    out = tmp_path_factory.mktemp("llama")
    tokenizer = train_tiny_tokenizer(out, vocab_size=512)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory) -> Path:
    """A tiny local ViTModel: an image encoder that is not SigLIP."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    out = tmp_path_factory.mktemp("vit")
    ViTModel(
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, image_size=32,
                  patch_size=8)
    ).save_pretrained(out)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(out)
    return out


def _build(**kwargs):
    from n2eye.build import BuildConfig, build

    return build(BuildConfig(**kwargs))


def test_unknown_preset_lists_known_ones(tmp_path):
    with pytest.raises(ValueError, match="Unknown preset 'tiniest'") as excinfo:
        _build(out=str(tmp_path / "out"), preset="tiniest")
    assert "tiny" in str(excinfo.value) and "n2eye-1.3b" in str(excinfo.value)
    assert not (tmp_path / "out").exists()


def test_non_lfm2_language_model_is_refused(tmp_path, llama_dir, tiny_backbones):
    with pytest.raises(ValueError, match="'llama' model") as excinfo:
        _build(out=str(tmp_path / "out"), lm=str(llama_dir), vision=str(tiny_backbones["vision"]))
    assert "['lfm2']" in str(excinfo.value) and str(llama_dir) in str(excinfo.value)
    assert not (tmp_path / "out").exists()


def test_non_siglip_vision_model_is_refused(tmp_path, vit_dir, tiny_backbones):
    with pytest.raises(ValueError, match="Unsupported vision encoder type 'vit'") as excinfo:
        _build(out=str(tmp_path / "out"), lm=str(tiny_backbones["lm"]), vision=str(vit_dir))
    message = str(excinfo.value)
    assert "SigLIP and SigLIP2" in message and "siglip2" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({"random_init": True, "lm": "a/b", "vision": "c/d"}, "--random-init builds a preset's shapes: give --preset"),
        ({"random_init": True}, "Give --preset NAME, or both --lm and --vision"),
        (
            {"preset": "tiny", "projector": "foo"},
            "Unknown projector 'foo'; choose one of ['mlp', 'pixel_unshuffle_mlp']",
        ),
        ({"lm": "LiquidAI/LFM2-350M"}, "both --lm and --vision"),
        ({"vision": "google/siglip2-base-patch16-224"}, "both --lm and --vision"),
        ({"preset": "tiny", "dtype": "fp8"}, "Unknown dtype 'fp8'"),
    ],
    ids=["random-init-without-preset", "random-init-alone", "bad-projector", "no-vision", "no-lm", "bad-dtype"],
)
def test_bad_build_options(tmp_path, kwargs, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        _build(out=str(tmp_path / "out"), **kwargs)


def test_unwritable_output_folder_fails_before_any_work(tmp_path, monkeypatch):
    import n2eye.build as build_module

    def must_not_run(*args, **kwargs):
        raise AssertionError("the backbones were loaded before the output folder was checked")

    monkeypatch.setattr(build_module, "build_from_sources", must_not_run)
    monkeypatch.setattr(build_module, "build_random", must_not_run)
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    with pytest.raises(OSError) as excinfo:
        _build(out=str(blocker / "out"), preset="tiny")
    assert str(blocker) in str(excinfo.value) and "--out" in str(excinfo.value)
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_out_over_existing_non_checkpoint_is_refused(tmp_path, kind):
    target = tmp_path / "precious"
    keep = target / "notes.txt" if kind == "folder" else target
    keep.parent.mkdir(parents=True, exist_ok=True)
    keep.write_text("my notes")
    try:
        with pytest.raises((ValueError, OSError), match="precious"):
            _build(out=str(target), preset="tiny")
    finally:
        assert keep.is_file() and keep.read_text() == "my notes", "the user's data at --out was deleted"


def test_missing_local_backbone_folder_is_named(tmp_path, tiny_backbones):
    missing = tmp_path / "models" / "lfm2"
    with pytest.raises((ValueError, OSError)) as excinfo:
        _build(out=str(tmp_path / "out"), lm=str(missing), vision=str(tiny_backbones["vision"]))
    message = str(excinfo.value)
    assert str(missing) in message and re.search(r"does not exist|no such|not found", message, re.I)


def test_cli_build_error_exits_2_with_a_message(tmp_path):
    env = {**os.environ, "N2EYE_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "n2eye.cli", "build", "--preset", "tiniest", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "n2eye build: error: Unknown preset 'tiniest'" in result.stderr
    assert "tiny" in result.stderr and "n2eye-1.3b" in result.stderr
    assert "Traceback" not in result.stderr
