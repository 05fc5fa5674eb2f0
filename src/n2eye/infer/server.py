"""`n2eye serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over `n2eye.load`.

Routes: `POST /v1/chat/completions` (streaming SSE or not), `GET /v1/models`, `GET /health`, and the web chat page
at `/`. Besides OpenAI's fields a request may set LFM2-VL's image budget (`min_image_tokens`, `max_image_tokens`,
`do_image_splitting`, top level or in vLLM's `mm_processor_kwargs`), within the server's own (`request_image_settings`;
a fixed-resolution model takes `do_image_splitting` only, its Idefics2-style splitting); `/v1/models` gives the
server's (`image_settings` of the model: defaults and limits, null for a fixed-resolution model).
Non-streaming requests wait in a bounded queue and are answered in batches (one `generate` call per batch of
compatible requests); past the queue limit the answer is 429. Every bad input gets an OpenAI-style 4xx error
body and the server goes on serving.

Security model (README, "Serving"): binds 127.0.0.1 by default; `--api-key` guards every route but /health and
the page (compared in constant time; the page asks for the key); a loopback server answers only requests whose
Host is a loopback name (DNS rebinding) and refuses cross-origin browser requests (Origin, and a JSON
Content-Type, which a page on another site cannot send without a CORS preflight we never grant); bodies are
capped; image URLs are fetched only from public addresses, checked at every redirect and pinned against DNS
rebinding (`image_io.read_url`); message text never carries chat-format control tokens (400,
`processing_n2eye.ControlTokenError`); checkpoint code runs only when it is the installed package's or trusted.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# module-level: FastAPI resolves the route annotations (`Request`) from this module's globals
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from ..image_settings import IMAGE_SETTINGS, ImageOptions, effective_policy, fixed_resolution_splitting

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class ServeConfig(ImageOptions):
    """Options of `n2eye serve`."""

    model: str
    """Checkpoint folder (or hub id) to serve."""
    host: str = "127.0.0.1"
    """Address to bind (127.0.0.1: this machine only)."""
    port: int = 8000
    """TCP port."""
    api_key: str | None = None
    """Require `Authorization: Bearer KEY` on every route but /health."""
    model_name: str | None = None
    """Model id clients use (default: the checkpoint folder's name)."""
    allow_local_files: bool = False
    """Accept image URLs that are local file paths (off: a client could read the server's files)."""
    allow_private_urls: bool = False
    """Accept image URLs resolving to private/loopback addresses (off: prevents SSRF into your network)."""
    max_image_bytes: int = 20_000_000
    """Largest image accepted, in bytes."""
    max_image_pixels: int = 16_000_000
    """Largest image accepted, in pixels."""
    max_images: int = 8
    """Most images per request."""
    max_prompt_tokens: int = 8192
    """Longest prompt accepted, image tokens included."""
    max_new_tokens: int = 1024
    """Cap on max_tokens per request."""
    max_batch: int = 8
    """Requests answered together in one generate call."""
    queue_limit: int = 64
    """Requests waiting or running at once; more get HTTP 429."""
    max_request_bytes: int = 64_000_000
    """Largest request body accepted, in bytes (413 beyond)."""
    allowed_hosts: str = ""
    """Comma-separated Host names this server answers to (default: loopback names when bound to loopback, any
    otherwise); a guard against DNS rebinding."""
    trust_remote_code: bool = False
    """Run a checkpoint's own code even when it differs from the installed n2eye's (only for checkpoints you trust)."""


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, type, param, code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- images ----------------------------------------------------------------------------------------------------
def load_request_image(url: str, cfg: ServeConfig):
    """An image from an OpenAI `image_url`: data URI, http(s) URL (public unless allowed) or, if enabled, a path."""
    from ..images import ImageURLRefused, load_image

    if not url.startswith(("data:", "http://", "https://")):
        if not cfg.allow_local_files:
            raise APIError(
                400,
                "Image URLs must be data URIs or http(s) URLs; local file paths are disabled "
                "(start the server with --allow-local-files to enable them).",
                param="messages",
            )
        url = url[len("file://") :] if url.startswith("file://") else url
    try:
        return load_image(url, timeout=10.0, max_bytes=cfg.max_image_bytes, max_pixels=cfg.max_image_pixels,
                          public_only=not cfg.allow_private_urls)  # fmt: skip
    except ImageURLRefused as err:
        raise APIError(400, f"Image URL refused: {err}", param="messages", code="private_url") from err
    except ValueError as err:
        raise APIError(400, f"Bad image: {err}", param="messages", code="invalid_image") from err


def check_tool_calls(calls: Any, index: int) -> None:
    """An assistant message's `tool_calls`: a list of {"type": "function", "function": {"name", "arguments"}}."""
    where = f"messages[{index}].tool_calls"
    if not isinstance(calls, list):
        raise APIError(400, f"{where} must be a list of tool calls.", param="messages")
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise APIError(400, f'{where}[{i}] must be {{"type": "function", "function": {{"name": ..., '
                           '"arguments": ...}}}}.', param="messages")  # fmt: skip
        if not isinstance(function.get("arguments", "{}"), (str, dict)):
            raise APIError(400, f"{where}[{i}].function.arguments must be a JSON string or an object.",
                           param="messages")  # fmt: skip


def check_tools(tools: Any) -> list[dict] | None:
    """The request's `tools`: None, or a list of {"type": "function", "function": {"name": ..., ...}}."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise APIError(400, "'tools' must be a list.", param="tools")
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
            raise APIError(400, f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., '
                           '"parameters": {...}}}}.', param="tools")  # fmt: skip
        if not isinstance(function.get("parameters", {}), dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON Schema object.", param="tools")
    return tools


def to_hf_messages(messages: Any, cfg: ServeConfig) -> tuple[list[dict], int]:
    """OpenAI chat messages -> HF chat messages with loaded images; returns them and the image count."""
    from ..images import image_item_source, is_image_item

    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty list.", param="messages")
    out, n_images = [], 0
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            role = message.get("role") if isinstance(message, dict) else None
            raise APIError(400, f"messages[{index}] has role {role!r}; use one of {list(ROLES)}.", param="messages")
        content = message.get("content")
        if isinstance(content, list):
            items = []
            for item in content:
                kind = item.get("type") if isinstance(item, dict) else None
                if kind == "text":
                    if not isinstance(item.get("text", ""), str):
                        raise APIError(400, f"messages[{index}] has a text item whose text is not a string.",
                                       param="messages")  # fmt: skip
                    items.append({"type": "text", "text": item.get("text", "")})
                elif is_image_item(item):
                    url = image_item_source(item)
                    if not isinstance(url, str) or not url:
                        raise APIError(400, f"messages[{index}] has an image item without a URL.", param="messages")
                    n_images += 1
                    if n_images > cfg.max_images:
                        raise APIError(400, f"Too many images: at most {cfg.max_images} per request.", param="messages")
                    items.append({"type": "image", "image": load_request_image(url, cfg)})
                else:
                    raise APIError(400, f"messages[{index}] has an unsupported content item {kind!r}.", param="messages")
            content = items
        elif content is not None and not isinstance(content, str):
            raise APIError(400, f"messages[{index}].content must be a string or a list of items.", param="messages")
        converted = {"role": message["role"], "content": content if content is not None else ""}
        if message.get("tool_calls") is not None:
            check_tool_calls(message["tool_calls"], index)
            converted["tool_calls"] = message["tool_calls"]
        out.append(converted)
    from ..modeling.tool_calls import normalize_tool_calls

    try:
        return normalize_tool_calls(out), n_images
    except ValueError as err:
        raise APIError(400, str(err), param="messages") from err


# ---- batching --------------------------------------------------------------------------------------------------
@dataclass
class Job:
    messages: list[dict]
    tools: list[dict] | None
    options: dict[str, Any]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    image_settings: dict[str, Any] | None = None

    def group_key(self) -> str:
        return json.dumps([self.tools, self.options, self.image_settings], sort_keys=True, default=str)


class Batcher:
    """One worker thread answering queued jobs in batches of compatible ones (same tools and options)."""

    def __init__(self, engine, max_batch: int):
        self.engine, self.max_batch = engine, max_batch
        self.jobs: queue.Queue[Job] = queue.Queue()
        threading.Thread(target=self._run, daemon=True, name="n2eye-batcher").start()

    def _run(self) -> None:
        while True:
            first = self.jobs.get()
            batch = [first]
            time.sleep(0.005)  # let concurrent arrivals join
            held: list[Job] = []
            while len(batch) < self.max_batch:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                (batch if job.group_key() == first.group_key() else held).append(job)
            for job in held:
                self.jobs.put(job)
            try:
                results = self.engine.complete_batch([j.messages for j in batch], first.tools,
                                                     image_settings=first.image_settings, **first.options)  # fmt: skip
                for job, result in zip(batch, results):
                    job.loop.call_soon_threadsafe(_resolve, job.future, result, None)
            except Exception as err:  # one failing batch must not stop the worker
                for job in batch:
                    job.loop.call_soon_threadsafe(_resolve, job.future, None, err)


def _resolve(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


# ---- the request ---------------------------------------------------------------------------------------------
class GenerationFailed(Exception):
    """`generate` itself failed: the server's fault, never the client's (500, and the server goes on)."""


def _number(body: dict, name: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"{name} must be a finite number.", param=name)
    if value > high or value < low or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"{name} must be in {interval}; got {value}.", param=name)
    return float(value)


def generation_options(body: dict, cfg: ServeConfig) -> dict[str, Any]:
    """Checks the sampling fields of a request and returns the engine's options (every field a client can send
    is either honoured or refused with a 400, never silently replaced)."""
    field = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = 256 if body.get(field) is None else body[field]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise APIError(400, f"{field} must be a positive integer; got {json.dumps(max_tokens)[:40]}.", param=field)
    if max_tokens > cfg.max_new_tokens:
        raise APIError(400, f"{field} {max_tokens} is over this server's cap of {cfg.max_new_tokens}.", param=field)
    options: dict[str, Any] = {"max_new_tokens": max_tokens}
    temperature = _number(body, "temperature", 0.0, 2.0)
    if temperature is not None:
        options["temperature"] = temperature
    top_p = _number(body, "top_p", 0.0, 1.0, low_open=True)
    if top_p is not None:
        options["top_p"] = top_p
    n = body.get("n")
    if n is not None and (isinstance(n, bool) or n != 1):
        raise APIError(400, "n must be 1: this server returns one choice per request.", param="n")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or not all(isinstance(x, str) and x for x in stops):
            raise APIError(400, "stop must be a non-empty string or a list of 1-4 non-empty strings.", param="stop")
        options["stop"] = stops
    return options


def server_image_policy(engine):
    """The `ImagePolicy` this server applies to images (the checkpoint's, under `--min/max-image-tokens` and
    `--no-image-splitting`), or None for a model without LFM2-VL's image policy (a fixed-resolution encoder)."""
    try:
        return effective_policy(engine.processor, engine.image_settings)
    except ValueError as err:  # the server's own settings were checked at load: not the client's fault
        raise APIError(500, f"The server's image settings are invalid: {err}", "server_error") from err


def server_image_settings(engine) -> dict[str, Any] | None:
    """What `GET /v1/models` tells clients (the web page) about images: the settings a request gets by default,
    which are also its limits (a request may lower `max_image_tokens`, not raise it, and may turn
    `do_image_splitting` on only where it is on), or None where the model takes images at one fixed resolution
    and refuses these settings."""
    policy = server_image_policy(engine)
    if policy is None:
        return None
    return {"min_image_tokens": policy.min_image_tokens, "max_image_tokens": policy.max_image_tokens,
            "do_image_splitting": policy.do_image_splitting}  # fmt: skip


def request_image_settings(body: dict, engine) -> dict[str, Any]:
    """The request's LFM2-VL image settings (`min_image_tokens`, `max_image_tokens`, `do_image_splitting`: top level,
    or in vLLM's `mm_processor_kwargs`), checked: a 400 for a wrong type, min above max, a token budget for a model
    without the image policy (fixed resolution: `do_image_splitting` only), or a budget above the server's
    (`--max-image-tokens`, `--[no-]image-splitting`, else the checkpoint's): a request may ask for fewer image tokens
    than the server gives, never more (so it may turn splitting off, and on only where the server splits)."""
    settings = {name: body[name] for name in IMAGE_SETTINGS if body.get(name) is not None}
    extra = body.get("mm_processor_kwargs")
    if extra is not None:
        if not isinstance(extra, dict) or set(extra) - set(IMAGE_SETTINGS):
            raise APIError(400, f"mm_processor_kwargs must be an object with only {list(IMAGE_SETTINGS)}.",
                           param="mm_processor_kwargs")  # fmt: skip
        settings.update({k: v for k, v in extra.items() if v is not None})
    if not settings:
        return {}
    for name, value in settings.items():
        if name == "do_image_splitting":
            if not isinstance(value, bool):
                raise APIError(400, f"{name} must be true or false.", param=name)
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise APIError(400, f"{name} must be a positive integer; got {json.dumps(value)[:40]}.", param=name)
    server = server_image_policy(engine)
    if server is None:
        return fixed_resolution_settings(settings, engine)
    if settings.get("max_image_tokens", 0) > server.max_image_tokens:
        raise APIError(400, f"max_image_tokens {settings['max_image_tokens']} is over this server's "
                       f"{server.max_image_tokens}; a request may lower it, not raise it.", param="max_image_tokens")
    if settings.get("do_image_splitting") and not server.do_image_splitting:
        raise APIError(400, "do_image_splitting: this server does not split images into tiles.",
                       param="do_image_splitting")  # fmt: skip
    try:
        effective_policy(engine.processor, {**engine.image_settings, **settings})
    except ValueError as err:  # e.g. min_image_tokens above max_image_tokens
        raise APIError(400, f"Bad image settings: {err}", param=next(iter(settings))) from err
    return settings


def fixed_resolution_settings(settings: dict[str, Any], engine) -> dict[str, Any]:
    """A fixed-resolution model's share of `request_image_settings`: `do_image_splitting` (Idefics2-style, 5x the
    tokens) within the server's; the token budgets, which only LFM2-VL's image policy reads, are a 400."""
    splits = fixed_resolution_splitting(engine.processor, engine.image_settings)
    refused = sorted(set(settings) - ({"do_image_splitting"} if splits is not None else set()))
    if refused:
        takes = "; it takes do_image_splitting only" if splits is not None else ""
        raise APIError(400, f"{refused} set LFM2-VL's image policy, which this model does not use (its vision encoder "
                       f"takes images at one fixed resolution{takes}).", param=refused[0])  # fmt: skip
    if settings.get("do_image_splitting") and not splits:
        raise APIError(400, "do_image_splitting: this server does not split images (a fixed-resolution model; start "
                       "it with --image-splitting to allow Idefics2-style splitting).", param="do_image_splitting")
    return settings


@dataclass
class ChatRequest:
    """A chat completion request, checked field by field before it takes a slot."""

    messages: Any
    tools: list[dict] | None
    options: dict[str, Any]
    stream: bool
    include_usage: bool
    image_settings: dict[str, Any] | None = None


def parse_request(body: Any, cfg: ServeConfig, model_name: str, engine) -> ChatRequest:
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    if body.get("model") not in (None, model_name):
        raise APIError(404, f"The model {str(body.get('model'))[:80]!r} does not exist; this server serves "
                       f"{model_name!r}.", param="model", code="model_not_found")  # fmt: skip
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise APIError(400, "stream must be true or false.", param="stream")
    stream_options = body.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise APIError(400, 'stream_options must be an object, e.g. {"include_usage": true}.', param="stream_options")
    include_usage = (stream_options or {}).get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise APIError(400, "stream_options.include_usage must be true or false.", param="stream_options")
    tools = check_tools(body.get("tools"))
    images = request_image_settings(body, engine)
    return ChatRequest(body.get("messages"), tools, generation_options(body, cfg), bool(stream), include_usage, images)


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def parse_json(raw: bytes) -> Any:
    """The request body as JSON: strict (no NaN/Infinity), and a 400 for anything else, nesting bombs included."""
    try:
        return json.loads(raw, parse_constant=_refuse_constant)
    except RecursionError as err:
        raise APIError(400, "The request body is nested too deeply.") from err
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        raise APIError(400, f"The request body is not valid JSON: {str(err)[:200]}.") from err


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 once it passes `limit` bytes (by its Content-Length, or while it arrives)."""
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > limit:
        raise APIError(413, f"The request body is {int(length)} bytes, over this server's limit of {limit}.",
                       code="request_too_large")  # fmt: skip
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"The request body is over this server's limit of {limit} bytes.",
                           code="request_too_large")  # fmt: skip
        chunks.append(chunk)
    return b"".join(chunks)


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def allowed_host_names(cfg: ServeConfig) -> set[str] | None:
    """The Host names this server answers to; None: any (a server bound to a public address)."""
    if cfg.allowed_hosts:
        return {h.strip().lower() for h in cfg.allowed_hosts.split(",") if h.strip()}
    if cfg.host in LOOPBACK_NAMES or cfg.host.startswith("127."):
        return set(LOOPBACK_NAMES) | {cfg.host}
    return None


def _host_name(host_header: str) -> str:
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


# ---- the app ---------------------------------------------------------------------------------------------------
class Slots:
    """Requests in flight (waiting or generating), with release that runs exactly once per slot taken."""

    def __init__(self, limit: int):
        self.limit, self.in_flight = limit, 0

    def take(self):
        if self.in_flight >= self.limit:
            raise APIError(429, f"Too many requests in flight ({self.limit}); retry shortly.", "rate_limit_error",
                           code="queue_full")  # fmt: skip
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1

        return release


class SlotStreamingResponse(StreamingResponse):
    """Gives the request's slot back when the response ends, however it ends (done, error, client gone, or never
    started)."""

    def __init__(self, content, release, **kwargs):
        super().__init__(content, **kwargs)
        self.release = release

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.release()


def create_app(engine, cfg: ServeConfig):
    """The FastAPI app; `engine` is an `N2Eye` (so tests can serve any loaded model)."""
    app = FastAPI(title="N2-Eye", version="1")
    model_name = cfg.model_name or Path(str(cfg.model)).name
    batcher = Batcher(engine, cfg.max_batch)
    slots = Slots(cfg.queue_limit)
    hosts = allowed_host_names(cfg)
    expected_auth = f"Bearer {cfg.api_key}".encode() if cfg.api_key else None

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    def refuse(status: int, message: str, type_: str, code: str) -> JSONResponse:
        return JSONResponse(APIError(status, message, type_, code=code).body(), status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        host = _host_name(request.headers.get("host", ""))
        if hosts is not None and host not in hosts:
            return refuse(403, f"Host {host[:80]!r} is not served here (a guard against DNS rebinding); start the "
                          "server with --allowed-hosts NAME to answer to it.", "permission_error", "host_not_allowed")
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1].lower() != request.headers.get("host", "").lower():
            return refuse(403, f"Cross-origin request from {origin[:80]!r} refused.", "permission_error",
                          "cross_origin")  # fmt: skip
        if expected_auth and request.url.path not in ("/health", "/"):
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected_auth):
                return refuse(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.",
                              "authentication_error", "invalid_api_key")  # fmt: skip
        if request.method == "POST":
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type != "application/json":
                return refuse(415, "Send the request body as JSON with 'Content-Type: application/json'.",
                              "invalid_request_error", "unsupported_media_type")  # fmt: skip
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "in_flight": slots.in_flight,
                "auth": bool(cfg.api_key)}  # fmt: skip

    @app.get("/v1/models")
    async def models():
        entry = {"id": model_name, "object": "model", "created": 0, "owned_by": "n2eye",
                 "image_settings": server_image_settings(engine)}  # fmt: skip
        return {"object": "list", "data": [entry]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (Path(__file__).parent / "web" / "index.html").read_text()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse_request(parse_json(await read_body(request, cfg.max_request_bytes)), cfg, model_name, engine)
        release = slots.take()
        try:
            loop = asyncio.get_running_loop()
            try:
                messages, _ = await loop.run_in_executor(None, to_hf_messages, chat.messages, cfg)
                prompt_tokens = await loop.run_in_executor(None, engine.count_prompt_tokens, messages, chat.tools,
                                                           chat.image_settings)  # fmt: skip
            except ValueError as err:  # the chat template's own checks (control tokens, roles, images)
                code = "control_token" if type(err).__name__ == "ControlTokenError" else None
                raise APIError(400, str(err), param="messages", code=code) from err
            if prompt_tokens > cfg.max_prompt_tokens:
                raise APIError(400, f"The prompt has {prompt_tokens} tokens (images included), over the limit of "
                               f"{cfg.max_prompt_tokens}.", param="messages", code="context_length_exceeded")  # fmt: skip
            completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            if chat.stream:
                stream = stream_chunks(engine, messages, chat.tools, chat.options, model_name, completion_id,
                                       prompt_tokens, include_usage=chat.include_usage,
                                       image_settings=chat.image_settings)  # fmt: skip
                response = SlotStreamingResponse(stream, release, media_type="text/event-stream")
                release = None  # the response gives the slot back
                return response
            future = loop.create_future()
            batcher.jobs.put(Job(messages, chat.tools, chat.options, future, loop, chat.image_settings))
            try:
                result = await future
            except Exception as err:
                raise APIError(500, f"Generation failed: {type(err).__name__}: {str(err)[:300]}", "server_error",
                               code="generation_failed") from err  # fmt: skip
        finally:
            if release is not None:
                release()
        return completion_body(engine, result, model_name, completion_id)

    return app


def split_tool_calls(engine, text: str) -> tuple[str, list[dict]]:
    """(content, tool_calls) of generated text; an unfinished or malformed call (cut by max_tokens, say) stays out
    of both: content is the text before it."""
    from ..modeling.tool_calls import TOOL_CALL_START, ToolCallParseError

    try:
        return engine.processor.parse_tool_calls(text)
    except ToolCallParseError:
        return text.split(TOOL_CALL_START)[0], []


def completion_body(engine, result: dict, model_name: str, completion_id: str) -> dict:
    content, calls = split_tool_calls(engine, result["text"])
    message: dict[str, Any] = {"role": "assistant", "content": content}
    finish = result["finish_reason"]
    if calls:
        message["tool_calls"] = calls
        finish = "tool_calls"
    usage = {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
             "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}  # fmt: skip
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage,
    }


async def stream_chunks(engine, messages, tools, options, model_name, completion_id, prompt_tokens,
                        include_usage: bool = False, image_settings: dict[str, Any] | None = None):  # fmt: skip
    """Server-sent events in OpenAI's chunk format; tool calls arrive as one final delta. Always ends with a finish
    chunk and `[DONE]` (an error mid-stream is reported as an error event first); a client that goes away stops
    the generation and its threads."""
    from ..modeling.tool_calls import TOOL_CALL_START

    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue = asyncio.Queue()
    created = int(time.time())
    cancel = threading.Event()

    def event(delta: dict, finish=None, usage=None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(chunks.put_nowait, item)
        except RuntimeError:  # the event loop is gone (server shutting down)
            cancel.set()

    def produce() -> None:
        pieces = None
        try:
            pieces = engine.chat(messages, tools=tools, stream=True, cancel=cancel, image_settings=image_settings,
                                 **options)  # fmt: skip
            for piece in pieces:
                if cancel.is_set():
                    break
                put(piece)
        except Exception as err:  # reported in the stream, the server goes on
            put(err)
        finally:
            if hasattr(pieces, "close"):
                pieces.close()  # ends the generation thread
            put(None)

    worker = threading.Thread(target=produce, daemon=True, name="n2eye-stream-producer")
    worker.start()
    failed = False
    try:
        yield event({"role": "assistant", "content": ""})
        text, shown = "", 0
        while (piece := await chunks.get()) is not None:
            if isinstance(piece, Exception):
                error = APIError(500, f"Generation failed: {type(piece).__name__}: {str(piece)[:300]}", "server_error",
                                 code="generation_failed")  # fmt: skip
                yield f"data: {json.dumps(error.body())}\n\n"
                failed = True
                continue
            text += piece
            visible = text.split(TOOL_CALL_START)[0]  # markup is never streamed as content
            if len(visible) > shown:
                yield event({"content": visible[shown:]})
                shown = len(visible)
        _, calls = split_tool_calls(engine, text) if TOOL_CALL_START in text else ("", [])
        completion_tokens = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
        if calls:
            yield event({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}, finish="tool_calls")
        else:
            cut = completion_tokens >= options["max_new_tokens"] and not failed
            yield event({}, finish="length" if cut else "stop")
        if include_usage:
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
            yield f"data: {json.dumps({'id': completion_id, 'object': 'chat.completion.chunk', 'created': created, 'model': model_name, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # the client went away, or the stream is done: the generation and both threads end


def serve(cfg: ServeConfig) -> None:
    """`n2eye serve`: loads the model and runs uvicorn until interrupted."""
    import uvicorn

    from .engine import load

    engine = load(cfg.model, trust_remote_code=cfg.trust_remote_code, image_settings=cfg.image_settings())
    print(f"N2-Eye serving {cfg.model} on http://{cfg.host}:{cfg.port} (OpenAI API at /v1, chat page at /)")
    uvicorn.run(create_app(engine, cfg), host=cfg.host, port=cfg.port, log_level="warning")
