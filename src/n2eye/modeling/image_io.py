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
import time
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


IMAGE_ITEM_TYPES = ("image", "image_url")
IMAGE_SOURCE_KEYS = ("image", "url", "path", "base64")


def is_image_item(item) -> bool:
    """A chat content item that stands for an image (HF's `{"type": "image"}`, OpenAI's `{"type": "image_url"}`)."""
    return isinstance(item, dict) and item.get("type") in IMAGE_ITEM_TYPES


def image_item_source(item: dict):
    """Where an image content item says its image is: OpenAI's `image_url` (`{"url": ...}` or a bare string) or
    HF's `image` / `url` / `path` / `base64` keys; None for a bare placeholder (`{"type": "image"}`, filled from a
    row's images). The one reading of an image item, for the collator, the engine, the server and the adapters."""
    if item.get("type") == "image_url":
        value = item.get("image_url")
        value = value.get("url") if isinstance(value, dict) else value
        if value is not None and value != "":
            return value
    for key in IMAGE_SOURCE_KEYS:
        value = item.get(key)
        if value is not None and not (isinstance(value, str) and value == ""):
            return value
    return None


def _describe(source) -> str:
    if isinstance(source, Image.Image):
        return f"<PIL {source.mode} image {source.size[0]}x{source.size[1]}>"
    if isinstance(source, (bytes, bytearray)):
        return f"<{len(source)} bytes>"
    text = os.fspath(source) if isinstance(source, os.PathLike) else source if isinstance(source, str) else None
    if text is None:
        return f"<{type(source).__name__}>"
    return text[:80] + ("..." if len(text) > 80 else "")


class ImageURLRefused(ImageLoadError):
    """A URL the caller's policy refuses: malformed, or (with `public_only`) not on the public internet."""


MAX_REDIRECTS = 3


def _split_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path?query) of an http(s) URL, strictly: URLs that different parsers read differently
    (a backslash, credentials, whitespace or control characters) are refused rather than guessed at."""
    from urllib.parse import urlsplit

    if any(c in url for c in "\\\x00") or any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise ImageURLRefused(f"Image URL {_describe(url)} has a backslash, a space or a control character; refused.")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as err:
        raise ImageURLRefused(f"Image URL {_describe(url)} is malformed ({err}).") from err
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ImageURLRefused(f"Image URL {_describe(url)} is not an http(s) URL with a host.")
    if "@" in parts.netloc:
        raise ImageURLRefused(f"Image URL {_describe(url)} carries credentials (user@host); refused.")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), target


def is_public_address(address: str) -> bool:
    """True for an address on the public internet: not private, loopback, link-local, shared (100.64.0.0/10),
    reserved or multicast (`is_global`, which `is_private` alone misses for shared space)."""
    import ipaddress

    ip = ipaddress.ip_address(address.split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _public_address(host: str, port: int) -> str:
    """Resolves `host` once; every address it has must be public. Returns the one to connect to, so the address
    checked is the address used (no second lookup for DNS rebinding to change)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as err:
        raise ImageLoadError(f"Image URL host {host!r} does not resolve: {err}.") from err
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        if not is_public_address(address):
            raise ImageURLRefused(
                f"Image URL host {host!r} resolves to a non-public address ({address}); refused (private networks "
                "are off limits to clients; a server operator can allow them: n2eye serve --allow-private-urls)."
            )
    if not addresses:
        raise ImageLoadError(f"Image URL host {host!r} does not resolve.")
    return addresses[0]


def _pinned_connection(scheme: str, host: str, port: int, address: str, timeout: float):
    """An HTTP(S) connection to `address` that still speaks to `host` (Host header, TLS SNI and certificate)."""
    import http.client
    import socket

    base = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection

    class Pinned(base):
        def connect(self) -> None:
            sock = socket.create_connection((address, self.port), self.timeout)
            self.sock = self._context.wrap_socket(sock, server_hostname=self.host) if scheme == "https" else sock

    return Pinned(host, port, timeout=timeout)


def _read_public_url(url: str, timeout: float, max_bytes: int) -> tuple[bytes, str]:
    """GETs an image from the public internet only: each hop (redirects included, at most `MAX_REDIRECTS`) is
    parsed strictly, resolved once, checked, and connected to at the checked address; `timeout` bounds the whole
    fetch, not only each read."""
    import http.client
    from urllib.parse import urljoin

    deadline = time.monotonic() + timeout
    for _ in range(MAX_REDIRECTS + 1):
        scheme, host, port, target = _split_url(url)
        address = _public_address(host, port)
        conn = _pinned_connection(scheme, host, port, address, timeout)
        try:
            conn.request("GET", target, headers={"User-Agent": "n2eye", "Accept": "image/*"})
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308):
                location = response.getheader("Location")
                if not location:
                    raise ImageLoadError(f"Image URL {_describe(url)} redirects without a Location.")
                url = urljoin(url, location)
                continue
            if response.status != 200:
                raise ImageLoadError(
                    f"Could not fetch image URL {_describe(url)}: HTTP {response.status} {response.reason}. Check "
                    "the URL."
                )
            _check_length(url, response.getheader("Content-Length"), max_bytes)
            chunks, size = [], 0
            while size <= max_bytes:
                if time.monotonic() > deadline:
                    raise ImageLoadError(f"Fetching image URL {_describe(url)} took over {timeout:.0f} s; refused.")
                chunk = response.read(min(65536, max_bytes + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            return b"".join(chunks), response.getheader("Content-Type") or ""
        except ImageLoadError:
            raise
        except (http.client.HTTPException, OSError, ValueError) as err:
            raise ImageLoadError(f"Could not fetch image URL {_describe(url)}: {err}. Check the URL.") from err
        finally:
            conn.close()
    raise ImageLoadError(f"Image URL {_describe(url)} redirects more than {MAX_REDIRECTS} times; refused.")


def _check_length(url: str, length: str | None, max_bytes: int) -> None:
    if length and length.isdigit() and int(length) > max_bytes:
        raise ImageLoadError(
            f"Image at {_describe(url)} is {int(length)} bytes, over the cap of {max_bytes} bytes; "
            "use a smaller image or raise max_bytes."
        )


def read_url(
    url: str, timeout: float = URL_TIMEOUT_S, max_bytes: int = MAX_IMAGE_BYTES, public_only: bool = False
) -> bytes:
    """The bytes at an http(s) URL, capped at `max_bytes`. `public_only` (what a server facing strangers needs):
    only public addresses, checked at every redirect and pinned against DNS rebinding; otherwise urllib as usual
    (proxies honoured, a user's own network allowed)."""
    if public_only:
        data, content_type = _read_public_url(url, timeout, max_bytes)
    else:
        _split_url(url)
        request = urllib.request.Request(url, headers={"User-Agent": "n2eye"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                _check_length(url, response.headers.get("Content-Length"), max_bytes)
                content_type = response.headers.get("Content-Type") or ""
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
                f"Could not fetch image URL {_describe(url)}: {err}. Check the URL and the network, or pass a local "
                "file."
            ) from err
    if len(data) > max_bytes:
        raise ImageLoadError(
            f"Image at {_describe(url)} is larger than {max_bytes} bytes (the cap); use a smaller image or raise "
            "max_bytes."
        )
    content_type = content_type.split(";")[0].strip().lower()
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


def _source_bytes(source, timeout: float, max_bytes: int, public_only: bool = False) -> bytes:
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
            return read_url(text, timeout, max_bytes, public_only)
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
    public_only: bool = False,
) -> Image.Image:
    """Returns an RGB PIL image from a PIL image, a path (or file:// URL), an http(s) URL, a data URI, bare base64
    of a PNG/JPEG/GIF/WebP/TIFF, or raw bytes. The pixel cap is checked from the header, before decoding.
    `public_only`: URLs must point at the public internet (`read_url`)."""
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
        image = _open_bytes(_source_bytes(source, timeout, max_bytes, public_only), source, max_pixels)
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
