"""A seeded fuzz of `n2eye serve` (loopback only, bounded): a few thousand malformed request bodies and image
payloads. No answer may be a 5xx, /health must answer after every one, and threads and memory must come back."""

from __future__ import annotations

import base64
import gc
import io
import json
import random
import threading

import pytest
from PIL import Image

from test_server import EXAMPLES, Server
from test_server_hardening import health, raw_post

pytest.importorskip("fastapi", reason="the server needs the [serve] extra")

N_REQUESTS = 2000
CONTROL = ["<|im_start|>", "<|im_end|>", "<image>", "<|image_start|>", "<|tool_call_start|>", "<|pad|>"]


def _png(size=(24, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _image_urls(rng: random.Random) -> list[str]:
    png = _png()
    uri = lambda data, kind="image/png": f"data:{kind};base64," + base64.b64encode(data).decode()  # noqa: E731
    return [
        uri(png),
        uri(png[: len(png) // 2]),  # truncated
        uri(b"\x89PNG\r\n\x1a\n" + bytes(rng.randrange(256) for _ in range(64))),  # a header and noise
        uri(b"GIF89a" + b"\x00" * 20, "image/gif"),
        "data:image/png;base64,!!!not base64!!!",
        "data:image/png,raw",
        "data:",
        "http://127.0.0.1:1/x.png",
        "http://[::1]/x.png",
        "http://169.254.169.254/latest/meta-data",
        "http://0x7f000001/x.png",
        "http://127.0.0.1:8000\\@1.1.1.1/x",
        "http://user:pass@example.invalid/x.png",
        "https://",
        "file:///etc/passwd",
        "/etc/passwd",
        "ftp://example.invalid/x.png",
        "",
        "x" * 5000,
    ]


def _junk(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 2**31, -(2**63), 10**30, 0.5, -0.0, 1e308])
    if kind == 3:
        return rng.choice(["", "x", "user", "assistant", "tool", "system", "image_url", "text", "\u0000", "\ud7ff",
                           "é" * 50, rng.choice(CONTROL) + " hi"])  # fmt: skip
    if kind == 4:
        return "".join(chr(rng.randrange(1, 0x3000)) for _ in range(rng.randrange(40)))
    if kind == 5:
        return rng.choice([[], {}, "null", "[]"])
    if kind == 6:
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        keys = ["role", "content", "type", "text", "image_url", "url", "tool_calls", "function", "name", "arguments"]
        return {rng.choice(keys): _junk(rng, depth + 1) for _ in range(rng.randrange(4))}
    return {"type": "image_url", "image_url": {"url": rng.choice(_image_urls(rng))}}


def _body(rng: random.Random) -> bytes:
    """One request: mostly a valid request with one or two fields broken, sometimes broken JSON."""
    roll = rng.random()
    if roll < 0.08:
        raw = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
        return rng.choice([raw[: rng.randrange(len(raw))], bytes(rng.randrange(256) for _ in range(rng.randrange(80))),
                           b"[" * 5000 + b"]" * 5000, b'{"messages": NaN}', b"", b"null", b'"text"',
                           b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 1e999}'])  # fmt: skip
    text = rng.choice(["What colour is it?", "hi", "Detect all instances of: circle.", rng.choice(CONTROL)])
    content: object = text
    if rng.random() < 0.5:
        image = {"type": "image_url", "image_url": {"url": rng.choice(_image_urls(rng))}}
        content = [image, {"type": "text", "text": text}]
    body: dict = {"messages": [{"role": "user", "content": content}], "max_tokens": 2, "temperature": 0}
    fields = ["messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop", "tools",
              "tool_choice", "stream", "stream_options", "model", "seed", "messages.role", "messages.content",
              "messages.tool_calls", "messages.extra"]  # fmt: skip
    for field in rng.sample(fields, rng.randrange(1, 3)):
        value = _junk(rng)
        if field.startswith("messages."):
            if not (isinstance(body["messages"], list) and body["messages"] and isinstance(body["messages"][0], dict)):
                continue
            key = field.split(".")[1]
            body["messages"][0][key] = value
            if rng.random() < 0.5:
                body["messages"].append({"role": "assistant", "content": "", "tool_calls": _junk(rng)})
        else:
            body[field] = value
    if rng.random() < 0.2:
        body["stream"] = True
    return json.dumps(body).encode()


def test_fuzzed_requests_never_get_a_5xx_and_resources_come_back(trained_tiny):
    import n2eye
    import psutil

    engine = n2eye.load(trained_tiny)
    server = Server(engine, max_new_tokens=4, queue_limit=8, max_images=2, max_request_bytes=2_000_000)
    process = psutil.Process()
    rng = random.Random(0)
    try:
        for _ in range(5):  # warm-up: lazy imports, first generation, thread pools
            raw_post(server, json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode())
        gc.collect()
        threads, rss = threading.active_count(), process.memory_info().rss
        statuses: dict[int, int] = {}
        for index in range(N_REQUESTS):
            body = _body(rng)
            status, payload = raw_post(server, body)
            statuses[status] = statuses.get(status, 0) + 1
            assert status < 500, (index, body[:300], status, payload[:300])
            if status == 200 and payload.startswith(b"data: "):
                assert payload.rstrip().endswith(b"data: [DONE]") and b'"error"' not in payload, payload[-300:]
            if index % 10 == 0:
                assert health(server)["status"] == "ok"
        assert health(server)["in_flight"] == 0
        print(f"{N_REQUESTS} fuzzed requests: " + ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items())))
        assert statuses.get(200, 0) > 50 and sum(v for k, v in statuses.items() if 400 <= k < 500) > N_REQUESTS // 2
        gc.collect()
        assert threading.active_count() <= threads + 2, (threading.active_count(), threads)
        grown = process.memory_info().rss - rss
        assert grown < 200 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"
    finally:
        server.stop()
