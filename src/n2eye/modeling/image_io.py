"""Loading images from what users pass (PIL, path, URL, data URI, bytes) with clear errors and limits.

Ships inside checkpoints: standard library + Pillow only. Every failure is a `ImageLoadError` (a
`ValueError`) naming the image and the fix, never a bare PIL traceback or silently wrong pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import urllib.error
import urllib.request
import warnings

from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 64_000_000  # ~8000x8000; larger is almost surely a mistake or a decompression bomb
MAX_IMAGE_BYTES = 50 * 1024 * 1024
URL_TIMEOUT_S = 15.0


class ImageLoadError(ValueError):
    """An image could not be read; the message says which one and what to do."""


def _describe(source) -> str:
    text = source if isinstance(source, str) else type(source).__name__
    return text[:80] + ("..." if len(text) > 80 else "")


def _read_url(url: str, timeout: float, max_bytes: int) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "n2eye"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(max_bytes + 1)
    except (urllib.error.URLError, TimeoutError, OSError) as err:
        raise ImageLoadError(f"Could not fetch image URL {_describe(url)}: {err}. Check the URL or pass a local file.") from err
    if len(data) > max_bytes:
        raise ImageLoadError(f"Image at {_describe(url)} is larger than {max_bytes} bytes; resize it or raise the cap.")
    return data


def _decode_data_uri(uri: str) -> bytes:
    header, _, payload = uri.partition(",")
    if ";base64" not in header:
        raise ImageLoadError(f"Data URI {_describe(uri)} is not base64; use data:image/png;base64,<data>.")
    try:
        return base64.b64decode(payload, validate=False)
    except (binascii.Error, ValueError) as err:
        raise ImageLoadError(f"Data URI {_describe(uri)} has invalid base64: {err}.") from err


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to RGB: alpha is composited on white, 16/32-bit greyscale is rescaled to 8 bits,
    palettes are expanded, and the EXIF orientation is applied."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose the picture
        pass
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(arr.round().astype("uint8"), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def load_image(
    source,
    *,
    timeout: float = URL_TIMEOUT_S,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Returns an RGB PIL image from a PIL image, a path, an http(s) URL, a data URI or raw bytes."""
    if isinstance(source, Image.Image):
        image = source
    else:
        if isinstance(source, (bytes, bytearray)):
            data = bytes(source)
        elif isinstance(source, os.PathLike) or isinstance(source, str):
            text = os.fspath(source)
            if text.startswith(("http://", "https://")):
                data = _read_url(text, timeout, max_bytes)
            elif text.startswith("data:"):
                data = _decode_data_uri(text)
            elif os.path.isfile(text):
                if os.path.getsize(text) > max_bytes:
                    raise ImageLoadError(f"Image file {_describe(text)} is larger than {max_bytes} bytes.")
                with open(text, "rb") as fh:
                    data = fh.read()
            else:
                raise ImageLoadError(
                    f"Image {_describe(text)} is not an existing file, an http(s) URL or a data URI."
                )
        else:
            raise ImageLoadError(
                f"Unsupported image input of type {type(source).__name__}; pass a PIL image, a path, a URL or a data URI."
            )
        image = _open_bytes(data, source, max_pixels)
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageLoadError(f"Image {_describe(source)} has zero size ({width}x{height}).")
    if width * height > max_pixels:
        raise ImageLoadError(
            f"Image {_describe(source)} has {width}x{height} pixels, over the cap of {max_pixels}; "
            "resize it first (it may be a decompression bomb)."
        )
    return to_rgb(image)


def _open_bytes(data: bytes, source, max_pixels: int) -> Image.Image:
    """Opens lazily, checks the pixel count from the header, and only then decodes."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise ImageLoadError(
                    f"Image {_describe(source)} has {width}x{height} pixels, over the cap of {max_pixels}; "
                    "resize it first (it may be a decompression bomb)."
                )
            image.load()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(f"Image {_describe(source)} is too large to decode safely ({err}); resize it first.") from err
    except Exception as err:  # PIL raises many types for corrupt data
        raise ImageLoadError(
            f"Image {_describe(source)} is corrupt or not an image ({type(err).__name__}: {err}). "
            "Re-export it as PNG/JPEG or drop it."
        ) from err
    return image
