"""Loading images from what users pass (PIL, path, URL, data URI, bytes) with clear errors and limits.

Ships inside checkpoints: standard library + Pillow (+ numpy, for high-bit-depth greyscale) only. Every failure
is an `ImageLoadError` (a `ValueError`) naming the image and the fix, never a bare PIL traceback or silently
wrong pixels.

Conversions `to_rgb` applies (documented, tested):

* alpha (RGBA, LA, La, RGBa, PA, palette or colour-key transparency) is composited on white;
* 16/32-bit integer and float greyscale (I;16*, I, F) is rescaled so its minimum is 0 and its maximum 255
  (a constant image keeps its level: I;16 by /65535, F in [0, 1] by x255, otherwise clipped to 0..255;
  NaN/inf count as the minimum);
* palettes, 1-bit, L, CMYK, YCbCr, HSV are converted with Pillow; LAB goes through a LAB -> sRGB colour transform;
* the EXIF orientation is applied.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.error
import urllib.request
import warnings

from PIL import Image, ImageOps

MAX_IMAGE_PIXELS = 64_000_000  # ~8000x8000; larger is almost surely a mistake or a decompression bomb
MAX_IMAGE_BYTES = 50 * 1024 * 1024
URL_TIMEOUT_S = 15.0

# Base64 of the magic bytes of common formats: a bare base64 string (transformers' {"type": "image", "base64": ...}
# chat item) is recognised by these, so a path that does not exist is never mistaken for image data.
_BASE64_IMAGE_PREFIXES = ("iVBORw0KGgo", "/9j/", "R0lGOD", "UklGR", "SUkq", "TU0AK")
_BASE64_CHARS = re.compile(r"^[A-Za-z0-9+/=_\-\s]+$")


class ImageLoadError(ValueError):
    """An image could not be read; the message says which one and what to do."""


def _describe(source) -> str:
    if isinstance(source, Image.Image):
        return f"<PIL {source.mode} image {source.size[0]}x{source.size[1]}>"
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    text = os.fspath(source) if isinstance(source, os.PathLike) else source if isinstance(source, str) else None
    if text is None:
        return f"<{type(source).__name__}>"
    return text[:80] + ("..." if len(text) > 80 else "")


def _read_url(url: str, timeout: float, max_bytes: int) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "n2eye"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise ImageLoadError(
                    f"Image at {_describe(url)} is {int(length)} bytes, over the cap of {max_bytes} bytes; "
                    "use a smaller image or raise max_bytes."
                )
            content_type = (response.headers.get("Content-Type") or "").split(";")[0].strip().lower()
            data = response.read(max_bytes + 1)
    except ImageLoadError:
        raise
    except urllib.error.HTTPError as err:
        raise ImageLoadError(
            f"Could not fetch image URL {_describe(url)}: HTTP {err.code} {err.reason}. Check the URL or pass a "
            "local file."
        ) from err
    except (urllib.error.URLError, TimeoutError, OSError, ValueError) as err:
        raise ImageLoadError(
            f"Could not fetch image URL {_describe(url)}: {err}. Check the URL and the network, or pass a local file."
        ) from err
    if len(data) > max_bytes:
        raise ImageLoadError(
            f"Image at {_describe(url)} is larger than {max_bytes} bytes (the cap); use a smaller image or raise "
            "max_bytes."
        )
    if content_type in ("text/html", "application/xhtml+xml") and data.lstrip()[:1] == b"<":
        raise ImageLoadError(
            f"URL {_describe(url)} returned a {content_type} page, not an image; link to the image file itself "
            "(e.g. the 'raw' / 'resolve' URL), not the page that shows it."
        )
    return data


def _b64decode(payload: str, what: str) -> bytes:
    payload = "".join(payload.split())  # base64 is often wrapped over lines
    try:
        if "-" in payload or "_" in payload:
            return base64.urlsafe_b64decode(payload.encode("ascii"))
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageLoadError(
            f"{what} has invalid base64 ({err}); encode the file bytes with base64.b64encode(...).decode()."
        ) from err


def _decode_data_uri(uri: str) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma:
        raise ImageLoadError(
            f"Data URI {_describe(uri)} has no ',' before the data; use data:image/png;base64,<data>."
        )
    if ";base64" not in header.lower():
        raise ImageLoadError(f"Data URI {_describe(uri)} is not base64; use data:image/png;base64,<data>.")
    if not payload.strip():
        raise ImageLoadError(f"Data URI {_describe(uri)} is empty; put the base64 image data after the ','.")
    return _b64decode(payload, f"Data URI {_describe(uri)}")


def _looks_like_base64_image(text: str) -> bool:
    return len(text) >= 16 and text.startswith(_BASE64_IMAGE_PREFIXES) and bool(_BASE64_CHARS.match(text[:4096]))


def _rescale_to_l(image: Image.Image) -> Image.Image:
    """High-bit-depth greyscale (I;16*, I, F) -> 8-bit L: min -> 0, max -> 255."""
    import numpy as np

    arr = np.asarray(image).astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return Image.new("L", image.size, 0)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    arr = np.where(finite, arr, lo)
    if hi > lo:
        arr = (arr - lo) / (hi - lo) * 255.0
    elif image.mode.startswith("I;16"):
        arr = arr / 65535.0 * 255.0
    elif image.mode == "F" and 0.0 <= lo <= 1.0:
        arr = arr * 255.0
    return Image.fromarray(np.clip(arr, 0, 255).round().astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Converts any PIL mode to RGB: alpha is composited on white, 16/32-bit greyscale is rescaled to 8 bits,
    palettes are expanded, and the EXIF orientation is applied (see the module docstring for the rules)."""
    try:
        image = ImageOps.exif_transpose(image)
    except Exception:  # a broken EXIF block must not lose the picture
        pass
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = _rescale_to_l(image)
    if image.mode == "LAB":
        from PIL import ImageCms

        transform = ImageCms.buildTransformFromOpenProfiles(
            ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"), "LAB", "RGB"
        )
        image = ImageCms.applyTransform(image, transform)
    if image.mode == "La":  # premultiplied LA: Pillow converts it only to LA
        image = image.convert("LA")
    if image.mode in ("P", "PA", "L", "RGB") and "transparency" in image.info:
        image = image.convert("RGBA")  # palette / colour-key transparency
    if image.mode in ("RGBA", "LA", "RGBa", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB") if image.mode != "RGB" else image


def _source_bytes(source, timeout: float, max_bytes: int) -> bytes:
    """The encoded image bytes from bytes, a path, an http(s)/file URL, a data URI or bare base64."""
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
        what = f"Image {_describe(source)}"
    elif isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if isinstance(text, bytes):
            text = os.fsdecode(text)
        what = f"Image {_describe(text)}"
        if not text.strip():
            raise ImageLoadError("Image path is an empty string; pass a file path, a URL, a data URI or a PIL image.")
        if text.startswith(("http://", "https://")):
            return _read_url(text, timeout, max_bytes)
        if text.startswith("data:"):
            data = _decode_data_uri(text)
        else:
            path = os.path.expanduser(text[7:] if text.startswith("file://") else text)
            if os.path.isfile(path):
                size = os.path.getsize(path)
                if size > max_bytes:
                    raise ImageLoadError(
                        f"Image file {_describe(text)} is {size} bytes, over the cap of {max_bytes} bytes; "
                        "resize it or raise max_bytes."
                    )
                try:
                    with open(path, "rb") as fh:
                        return fh.read()
                except OSError as err:
                    raise ImageLoadError(f"Could not read image file {_describe(text)}: {err}.") from err
            if _looks_like_base64_image(text):
                data = _b64decode(text, "Base64 image data")
            elif os.path.isdir(path):
                raise ImageLoadError(f"Image path {_describe(text)} is a folder, not an image file; name one file.")
            else:
                where = "" if os.path.isabs(path) else f" (relative to the current folder {os.getcwd()})"
                raise ImageLoadError(
                    f"Image file {_describe(text)} does not exist{where}. Check the path, or pass an http(s) URL, "
                    "a data:image/...;base64 URI, bytes or a PIL image."
                )
    else:
        raise ImageLoadError(
            f"Unsupported image input of type {type(source).__name__}; pass a PIL image, a path, a URL, a data URI "
            "or bytes."
        )
    if len(data) > max_bytes:
        raise ImageLoadError(
            f"{what} is {len(data)} bytes, over the cap of {max_bytes} bytes; resize it or raise max_bytes."
        )
    return data


def _too_many_pixels(source, width: int, height: int, max_pixels: int) -> ImageLoadError:
    return ImageLoadError(
        f"Image {_describe(source)} has {width}x{height} = {width * height} pixels, over the cap of {max_pixels} "
        "pixels; resize it first or raise max_pixels (it may be a decompression bomb). Nothing was decoded."
    )


def load_image(
    source,
    *,
    timeout: float = URL_TIMEOUT_S,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> Image.Image:
    """Returns an RGB PIL image from a PIL image, a path (or file:// URL), an http(s) URL, a data URI, bare base64
    of a PNG/JPEG/GIF/WebP/TIFF, or raw bytes. The pixel cap is checked from the header, before decoding."""
    if isinstance(source, Image.Image):
        image = source
        width, height = image.size
        if width * height > max_pixels:
            raise _too_many_pixels(source, width, height, max_pixels)
        try:
            image.load()  # a lazily opened, truncated file fails here, not deep inside the image processor
        except Exception as err:
            raise ImageLoadError(
                f"Image {_describe(source)} is corrupt or truncated ({type(err).__name__}: {err}). "
                "Re-export it as PNG/JPEG or drop it."
            ) from err
    else:
        image = _open_bytes(_source_bytes(source, timeout, max_bytes), source, max_pixels)
    width, height = image.size
    if width == 0 or height == 0:
        raise ImageLoadError(
            f"Image {_describe(source)} has zero size ({width}x{height}); pass an image at least 1x1 pixel "
            "(check the crop or resize that produced it)."
        )
    if width * height > max_pixels:
        raise _too_many_pixels(source, width, height, max_pixels)
    try:
        return to_rgb(image)
    except Exception as err:
        raise ImageLoadError(
            f"Image {_describe(source)} in mode {image.mode} could not be converted to RGB "
            f"({type(err).__name__}: {err}); convert it to RGB yourself (image.convert('RGB'))."
        ) from err


def _open_bytes(data: bytes, source, max_pixels: int) -> Image.Image:
    """Opens lazily, checks the pixel count from the header, and only then decodes.

    `max_pixels` is the cap that applies; Pillow's own warning at `PIL.Image.MAX_IMAGE_PIXELS` is silenced (our
    check comes right after the header is read). Pillow still refuses images over twice its limit while opening;
    that is reported as our cap, or, when `max_pixels` is higher, with how to raise Pillow's limit too."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > max_pixels:
                raise _too_many_pixels(source, width, height, max_pixels)
            image.load()
    except ImageLoadError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        match = re.search(r"\((\d+) pixels\)", str(err))
        pixels = int(match.group(1)) if match else None
        if pixels is None or pixels > max_pixels:
            shown = f"{pixels} pixels" if pixels is not None else "more pixels than Pillow allows"
            raise ImageLoadError(
                f"Image {_describe(source)} has {shown}, over the cap of {max_pixels} pixels; resize it first or "
                "raise max_pixels (it may be a decompression bomb). Nothing was decoded."
            ) from err
        raise ImageLoadError(
            f"Image {_describe(source)} has {pixels} pixels: within max_pixels={max_pixels} but over Pillow's own "
            f"limit ({err}); also raise PIL.Image.MAX_IMAGE_PIXELS to load it."
        ) from err
    except Image.UnidentifiedImageError as err:
        raise ImageLoadError(
            f"Image {_describe(source)} is corrupt or not an image (not a format Pillow recognises). "
            "Re-export it as PNG/JPEG or drop it."
        ) from err
    except Exception as err:  # PIL raises many types for corrupt data
        raise ImageLoadError(
            f"Image {_describe(source)} is corrupt or not an image ({type(err).__name__}: {err}). "
            "Re-export it as PNG/JPEG or drop it."
        ) from err
    return image
