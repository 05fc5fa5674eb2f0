"""The one place for images outside a checkpoint: find the image in a content item, load it, fetch it, cache it.

Finding, loading and fetching live in `modeling/image_io.py` (checkpoints ship it, so a model loaded with plain
transformers reads images the same way) and are re-exported here; this module adds what only training and
evaluation need: web images fetched once into a local cache, so every epoch (and every process) reads the same
bytes, and a dataset row's image value turned into an image or a counted skip (`resolve_image`).

Cached files are keyed by the sha256 of the URL and written atomically (temp file + rename), so concurrent
data-loader workers never see half a file. Decoding goes through `load_image`, with its size/pixel caps; fetching
through `read_url`, the one fetcher (size cap, timeout, and with `public_only` the SSRF guard the server uses).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image

from n2eye.modeling.image_io import (
    IMAGE_SOURCE_KEYS,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    URL_TIMEOUT_S,
    ImageLoadError,
    ImageURLRefused,
    image_item_source,
    is_image_item,
    load_image,
    read_url,
)

__all__ = [
    "IMAGE_SOURCE_KEYS", "MAX_IMAGE_BYTES", "MAX_IMAGE_PIXELS", "URL_TIMEOUT_S", "ImageCache", "ImageFetchError",
    "ImageLoadError", "ImageURLRefused", "default_cache_dir", "image_item_source", "is_image_item", "is_url",
    "load_image", "openai_content", "read_url", "resolve_image",
]  # fmt: skip


def image_data_uri(source: Any) -> str:
    """An image (anything `load_image` takes) as a PNG data URI: lossless, so a server that receives it (llama.cpp,
    an OpenAI-compatible agent) sees the pixels N2-Eye's processor sees."""
    import base64
    import io

    buffer = io.BytesIO()
    load_image(source).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def openai_content(content: Any) -> Any:
    """Chat content with its image items (PIL images, paths, URLs, HF or OpenAI style) as OpenAI `image_url` items
    holding data URIs; text items and plain-string content as they are."""
    if not isinstance(content, list):
        return content
    return [{"type": "image_url", "image_url": {"url": image_data_uri(image_item_source(item))}}
            if isinstance(item, dict) and item.get("type") in ("image", "image_url") else item
            for item in content]  # fmt: skip


class ImageFetchError(ImageLoadError):
    """A URL could not be downloaded (network error, HTTP error, timeout or over the size cap)."""


def default_cache_dir() -> Path:
    """`$N2EYE_CACHE/images`, else `~/.cache/n2eye/images` (the one cache root, `n2eye.cache`)."""
    from n2eye.cache import cache_root

    return cache_root() / "images"


def is_url(source: Any) -> bool:
    return isinstance(source, str) and source.startswith(("http://", "https://"))


class ImageCache:
    """Downloads each URL once and decodes images with the project's limits."""

    def __init__(
        self,
        cache_dir: str | os.PathLike | None = None,
        *,
        timeout: float = URL_TIMEOUT_S,
        max_bytes: int = MAX_IMAGE_BYTES,
        max_pixels: int = MAX_IMAGE_PIXELS,
    ) -> None:
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    def path_for(self, url: str) -> Path:
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()
        return self.cache_dir / digest[:2] / digest

    def _download(self, url: str) -> bytes:
        try:
            return read_url(url, timeout=self.timeout, max_bytes=self.max_bytes)
        except ImageLoadError as err:
            raise ImageFetchError(str(err)) from err

    def fetch(self, url: str) -> Path:
        """Returns the local file for `url`, downloading it on the first call. Only decodable images are cached."""
        path = self.path_for(url)
        if path.is_file():
            return path
        data = self._download(url)
        # Check it decodes before caching, so an HTML error page is not kept as an "image".
        load_image(data, max_bytes=self.max_bytes, max_pixels=self.max_pixels)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        return path

    def load(self, source: Any) -> Image.Image:
        """An RGB image from a URL (through the cache) or anything `load_image` accepts."""
        if is_url(source):
            source = str(self.fetch(source))
        return load_image(source, timeout=self.timeout, max_bytes=self.max_bytes, max_pixels=self.max_pixels)


def resolve_image(source: Any, cache: ImageCache, base_dir: str | os.PathLike | None = None) -> Image.Image:
    """Loads one row's image, turning every failure into a `SkipRow` with a stable reason.

    Accepts what rows hold: a PIL image, a `datasets` Image value `{"bytes", "path"}`, raw bytes, a URL
    (cached), a data URI, or a path (relative paths resolve against `base_dir`).
    """
    from n2eye.data.report import (
        IMAGE_CORRUPT,
        IMAGE_FETCH_FAILED,
        IMAGE_MISSING,
        MALFORMED_ROW,
        SkipRow,
    )

    if isinstance(source, dict):  # datasets Image feature with decode=False
        data, path = source.get("bytes"), source.get("path")
        source = data if data else path
    if source is None or (isinstance(source, (str, bytes, bytearray)) and len(source) == 0):
        raise SkipRow(IMAGE_MISSING, "no image given")
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str) and not is_url(source) and not source.startswith("data:"):
        text = source.removeprefix("file://")
        path = Path(text).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = Path(base_dir) / path
        if not path.is_file():
            raise SkipRow(IMAGE_MISSING, f"image file not found: {path}")
        source = str(path)
    elif not isinstance(source, (str, bytes, bytearray, Image.Image)):
        raise SkipRow(MALFORMED_ROW, f"unsupported image value of type {type(source).__name__}")
    try:
        return cache.load(source)
    except ImageFetchError as err:
        raise SkipRow(IMAGE_FETCH_FAILED, str(err)) from err
    except ImageLoadError as err:
        raise SkipRow(IMAGE_CORRUPT, str(err)) from err
