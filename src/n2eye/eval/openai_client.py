"""A small OpenAI-compatible chat-completions client for the CRAG-MM judge and agent servers.

Why not the `openai` package: it is a dev extra, and the protocol needs only one POST with bounded retries and a
timeout. Every failure mode a server can show (refused connection, timeout, HTTP 4xx/5xx, a body that is not the
chat-completions shape) becomes one `ChatError` after `tries` attempts, so callers count it instead of dying.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from ..images import openai_content

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_TRIES = 3
"""Tries per call (the official CRAG-MM kit also gives up after 3)."""
DEFAULT_BACKOFF_S = 1.0
"""Wait before the 2nd try; doubled before each later one."""


class ChatError(RuntimeError):
    """A chat-completions call that failed every try; the message names the server and the last error."""


def chat_completions_url(url: str) -> str:
    """A base URL (`http://host:8000`, `.../v1`) or the full endpoint, as the `/v1/chat/completions` endpoint."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """HF chat messages (image items holding PIL images) as OpenAI messages (images as `image_url` data URIs)."""
    return [{**message, "content": openai_content(message.get("content"))} for message in messages]


class ChatClient:
    """POSTs chat-completions requests to one server: `complete(body) -> (text, finish_reason)`."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = DEFAULT_TIMEOUT_S,
                 tries: int = DEFAULT_TRIES, backoff: float | None = None) -> None:  # fmt: skip
        self.url = chat_completions_url(url)
        self.api_key = api_key
        self.timeout = timeout
        self.tries = tries
        self.backoff = DEFAULT_BACKOFF_S if backoff is None else backoff

    def _post(self, body: bytes) -> tuple[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout) as response:
            reply = json.loads(response.read().decode("utf-8"))
        choice = reply["choices"][0]
        content = choice["message"].get("content")
        if content is None and choice["message"].get("tool_calls"):
            content = json.dumps(choice["message"]["tool_calls"])
        if not isinstance(content, str):
            raise TypeError(f"the message content is a {type(content).__name__}, not text")
        return content, choice.get("finish_reason")

    def complete(self, payload: dict[str, Any]) -> tuple[str, Any]:
        """The reply text and finish reason; `ChatError` after `tries` failed attempts (with backoff between)."""
        body = json.dumps(payload).encode("utf-8")
        error: Exception | None = None
        for attempt in range(self.tries):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                return self._post(body)
            except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
                error = exc
        raise ChatError(f"{self.url} failed {self.tries} times, last: {type(error).__name__}: {error}")


T = TypeVar("T")


def bounded_map(fn: Callable[[Any], T], items: Sequence[Any], concurrency: int) -> list[T]:
    """`[fn(x) for x in items]` with at most `concurrency` calls in flight. An exception (Ctrl-C included) cancels
    the calls not yet started, so an interrupted run stops after the ones in flight instead of all of them."""
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futures = [pool.submit(fn, item) for item in items]
        return [future.result() for future in futures]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
