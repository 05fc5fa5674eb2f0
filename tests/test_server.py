"""`n2eye serve`: the real `openai` client against the server on 127.0.0.1, bad inputs, batching under load."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "colours"
openai = pytest.importorskip("openai", reason="the openai client comes with the [dev] extra")
pytest.importorskip("fastapi", reason="the server needs the [serve] extra")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """uvicorn in a background thread, stopped at the end."""

    def __init__(self, engine, **options):
        import uvicorn

        from n2eye.infer.server import ServeConfig, create_app

        self.port = free_port()
        self.cfg = ServeConfig(model="tiny-eye", port=self.port, **options)
        config = uvicorn.Config(create_app(engine, self.cfg), host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, api_key="unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0)

    def post(self, body: bytes | dict, headers=None):
        import urllib.error
        import urllib.request

        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        request = urllib.request.Request(self.url + "/v1/chat/completions", data=data,
                                         headers={"Content-Type": "application/json", **(headers or {})})  # fmt: skip
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def get(self, path: str, headers=None) -> dict:
        import urllib.request

        with urllib.request.urlopen(urllib.request.Request(self.url + path, headers=headers or {}), timeout=60) as r:
            return json.loads(r.read())

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def engine(trained_tiny):
    import n2eye

    return n2eye.load(trained_tiny)


@pytest.fixture(scope="module")
def server(engine):
    s = Server(engine)
    yield s
    s.stop()


def data_uri(name: str) -> str:
    return "data:image/png;base64," + base64.b64encode((EXAMPLES / name).read_bytes()).decode()


def image_message(name: str, text: str = "What colour is the shape?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(name)}},
                                         {"type": "text", "text": text}]}]  # fmt: skip


def test_openai_client_plain_image_and_stream(server, engine):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["tiny-eye"]
    assert server.get("/v1/models")["data"][0]["image_settings"] is None  # fixed resolution: nothing to set
    plain = client.chat.completions.create(model="tiny-eye", messages=[{"role": "user", "content": "Hello"}],
                                           max_tokens=5, temperature=0)  # fmt: skip
    assert plain.choices[0].message.role == "assistant" and plain.usage.prompt_tokens > 0
    image = client.chat.completions.create(model="tiny-eye", messages=image_message("red_circle.png"), max_tokens=4,
                                           temperature=0)  # fmt: skip
    expected = engine.chat([{"role": "user", "content": [{"type": "image", "path": str(EXAMPLES / "red_circle.png")},
                            {"type": "text", "text": "What colour is the shape?"}]}], temperature=0, max_new_tokens=4)
    assert image.choices[0].message.content == expected
    assert image.usage.prompt_tokens > 64  # the image's tokens are counted
    stream = client.chat.completions.create(model="tiny-eye", messages=image_message("red_circle.png"), max_tokens=4,
                                            temperature=0, stream=True)  # fmt: skip
    pieces, finish = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == expected and finish in ("stop", "length")


def test_tool_call_round_trip(engine, monkeypatch):
    """The model is scripted to call the tool (the tiny model can't); the server's parsing and the client's round
    trip are real."""
    original = engine.complete_batch

    def scripted(conversations, tools=None, **options):
        results = original(conversations, tools, **options)
        for conversation, result in zip(conversations, results):
            if tools and conversation[-1]["role"] == "user":
                result["text"] = '<|tool_call_start|>[lookup_price(item="red circle", qty=2)]<|tool_call_end|>'
        return results

    monkeypatch.setattr(engine, "complete_batch", scripted)
    s = Server(engine)
    try:
        client = s.client()
        tools = [{"type": "function", "function": {"name": "lookup_price", "description": "price of an item",
                  "parameters": {"type": "object", "properties": {"item": {"type": "string"}}}}}]  # fmt: skip
        messages = image_message("red_circle.png", "How much is it?")
        first = client.chat.completions.create(model="tiny-eye", messages=messages, tools=tools, max_tokens=8)
        call = first.choices[0].message.tool_calls[0]
        assert first.choices[0].finish_reason == "tool_calls"
        assert call.function.name == "lookup_price" and json.loads(call.function.arguments) == {"item": "red circle", "qty": 2}
        messages += [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"price": 3})}]  # fmt: skip
        final = client.chat.completions.create(model="tiny-eye", messages=messages, tools=tools, max_tokens=6)
        assert final.choices[0].finish_reason in ("stop", "length") and not final.choices[0].message.tool_calls
    finally:
        s.stop()


def test_every_bad_input_gets_a_4xx_and_the_server_goes_on(server):
    big = "data:image/png;base64," + base64.b64encode(b"\x89PNG" + b"0" * 25_000_000).decode()
    not_image = "data:image/png;base64," + base64.b64encode(b"hello, not an image").decode()
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (5000, 4000)).save(buffer, format="PNG")  # 20 M pixels in a few kB: over the pixel cap
    too_many_pixels = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    image = lambda url: [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]  # noqa: E731
    cases = [
        (b"{not json", 400, None),
        ({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found"),
        ({"messages": []}, 400, None),
        ({"messages": [{"role": "wizard", "content": "x"}]}, 400, None),
        ({"messages": image(not_image)}, 400, "invalid_image"),
        ({"messages": image(big)}, 400, "invalid_image"),
        ({"messages": image(too_many_pixels)}, 400, "invalid_image"),
        ({"messages": image(f"http://127.0.0.1:{server.port}/secret.png")}, 400, "private_url"),
        ({"messages": image("/etc/passwd")}, 400, None),
        ({"messages": image(data_uri("red_circle.png")) * 9}, 400, None),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6}, 400, None),
    ]
    for body, status, code in cases:
        got, payload = server.post(body)
        assert got == status, (body if isinstance(body, bytes) else json.dumps(body)[:200], got, payload)
        assert payload["error"]["message"] and (code is None or payload["error"]["code"] == code)
    assert server.post({"messages": [{"role": "user", "content": "still alive?"}], "max_tokens": 2})[0] == 200


def test_limits_api_key_queue_and_unreachable_url(engine):
    s = Server(engine, api_key="sekrit", max_prompt_tokens=40, allow_private_urls=True, queue_limit=0)
    try:
        import urllib.request

        with urllib.request.urlopen(s.url + "/health", timeout=10) as response:
            assert response.status == 200  # no key needed
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        assert s.client("sekrit").models.list().data[0].id == "tiny-eye"
        status, body = s.post({"messages": [{"role": "user", "content": "x"}]}, {"Authorization": "Bearer sekrit"})
        assert status == 429 and body["error"]["code"] == "queue_full"
    finally:
        s.stop()
    s = Server(engine, max_prompt_tokens=40, allow_private_urls=True)
    try:
        status, body = s.post({"messages": image_message("red_circle.png")})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        closed = free_port()
        status, body = s.post({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{closed}/x.png"}}]}]})  # fmt: skip
        assert status == 400 and "Could not fetch" in body["error"]["message"]
    finally:
        s.stop()


def test_bounded_load_no_errors_and_memory_back(server):
    import gc

    import psutil

    process = psutil.Process()
    gc.collect()
    start_rss = process.memory_info().rss
    names = sorted(p.name for p in EXAMPLES.glob("*.png"))

    def one(i: int) -> float:
        t0 = time.perf_counter()
        status, body = server.post({"messages": image_message(names[i % len(names)]), "max_tokens": 4})
        assert status == 200, body
        return time.perf_counter() - t0

    with ThreadPoolExecutor(max_workers=8) as pool:
        latencies = sorted(pool.map(one, range(64)))
    p50, p95 = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.95) - 1]
    print(f"64 requests, 8 concurrent: p50 {p50 * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms")
    gc.collect()
    grown = process.memory_info().rss - start_rss
    print(f"server process RSS after the load: {grown / 2**20:+.0f} MiB from the start")
    assert grown < 150 * 2**20, f"RSS grew by {grown / 2**20:.0f} MiB"


def test_web_page_is_served(server):
    import urllib.request

    with urllib.request.urlopen(server.url + "/", timeout=10) as response:
        page = response.read().decode()
    assert "/v1/chat/completions" in page and "drawBoxes" in page
