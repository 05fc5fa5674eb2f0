"""`n2eye serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over `n2eye.load`.

Routes: `POST /v1/chat/completions` (streaming SSE or not), `GET /v1/models`, `GET /health`, and the web chat page
at `/`. Non-streaming requests wait in a bounded queue and are answered in batches (one `generate` call per batch
of compatible requests); past the queue limit the answer is 429. Every bad input gets an OpenAI-style 4xx error
body and the server goes on serving.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import queue
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

# module-level: FastAPI resolves the route annotations (`Request`) from this module's globals
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class ServeConfig:
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


class APIError(Exception):
    """An OpenAI-style error: HTTP status, message, type, param, code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---- images ----------------------------------------------------------------------------------------------------
def check_public_url(url: str) -> None:
    """Refuses URLs whose host resolves to a private, loopback, link-local or reserved address."""
    host = urlparse(url).hostname
    if not host:
        raise APIError(400, f"Image URL {url[:80]!r} has no host.", param="messages")
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror as err:
        raise APIError(400, f"Image URL host {host!r} does not resolve: {err}.", param="messages") from err
    for info in infos:
        address = ipaddress.ip_address(info[4][0])
        if address.is_private or address.is_loopback or address.is_link_local or address.is_reserved or address.is_multicast:
            raise APIError(
                400,
                f"Image URL host {host!r} resolves to a private address ({address}); refused. "
                "Start the server with --allow-private-urls to allow it.",
                param="messages",
                code="private_url",
            )


def load_request_image(url: str, cfg: ServeConfig):
    """An image from an OpenAI `image_url`: data URI, http(s) URL (public unless allowed) or, if enabled, a path."""
    from ..modeling.image_io import load_image

    if url.startswith("data:"):
        source = url
    elif url.startswith(("http://", "https://")):
        if not cfg.allow_private_urls:
            check_public_url(url)
        source = url
    else:
        if not cfg.allow_local_files:
            raise APIError(
                400,
                "Image URLs must be data URIs or http(s) URLs; local file paths are disabled "
                "(start the server with --allow-local-files to enable them).",
                param="messages",
            )
        source = url[len("file://") :] if url.startswith("file://") else url
    try:
        return load_image(source, timeout=10.0, max_bytes=cfg.max_image_bytes, max_pixels=cfg.max_image_pixels)
    except ValueError as err:
        raise APIError(400, f"Bad image: {err}", param="messages", code="invalid_image") from err


def to_hf_messages(messages: Any, cfg: ServeConfig) -> tuple[list[dict], int]:
    """OpenAI chat messages -> HF chat messages with loaded images; returns them and the image count."""
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
                    items.append({"type": "text", "text": str(item.get("text", ""))})
                elif kind in ("image_url", "image"):
                    raw = item.get("image_url") if kind == "image_url" else item.get("url") or item.get("image")
                    url = raw.get("url") if isinstance(raw, dict) else raw
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
        if message.get("tool_calls"):
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

    def group_key(self) -> str:
        return json.dumps([self.tools, self.options], sort_keys=True, default=str)


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
                results = self.engine.complete_batch([j.messages for j in batch], first.tools, **first.options)
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


# ---- the app ---------------------------------------------------------------------------------------------------
def generation_options(body: dict, cfg: ServeConfig) -> dict[str, Any]:
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise APIError(400, "max_tokens must be a positive integer.", param="max_tokens")
    if max_tokens > cfg.max_new_tokens:
        raise APIError(400, f"max_tokens {max_tokens} is over this server's cap of {cfg.max_new_tokens}.",
                       param="max_tokens")  # fmt: skip
    options: dict[str, Any] = {"max_new_tokens": max_tokens}
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:
            if not isinstance(value, (int, float)) or value < 0:
                raise APIError(400, f"{name} must be a number >= 0.", param=name)
            options[name] = float(value)
    return options


def create_app(engine, cfg: ServeConfig):
    """The FastAPI app; `engine` is an `N2Eye` (so tests can serve any loaded model)."""
    app = FastAPI(title="N2-Eye", version="1")
    model_name = cfg.model_name or Path(str(cfg.model)).name
    batcher = Batcher(engine, cfg.max_batch)
    state = {"in_flight": 0}

    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return JSONResponse(err.body(), status_code=err.status)

    @app.middleware("http")
    async def auth(request: Request, call_next):
        if cfg.api_key and request.url.path not in ("/health", "/") and not request.url.path.startswith("/static"):
            if request.headers.get("authorization") != f"Bearer {cfg.api_key}":
                err = APIError(401, "Missing or wrong API key: send 'Authorization: Bearer KEY'.", "authentication_error",
                               code="invalid_api_key")  # fmt: skip
                return JSONResponse(err.body(), status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "in_flight": state["in_flight"]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "n2eye"}]}

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (Path(__file__).parent / "web" / "index.html").read_text()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"The request body is not valid JSON: {err}.") from err
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.")
        if body.get("model") not in (None, model_name):
            raise APIError(404, f"The model {body.get('model')!r} does not exist; this server serves {model_name!r}.",
                           param="model", code="model_not_found")  # fmt: skip
        tools = body.get("tools") or None
        if tools is not None and not isinstance(tools, list):
            raise APIError(400, "'tools' must be a list.", param="tools")
        options = generation_options(body, cfg)
        if state["in_flight"] >= cfg.queue_limit:
            raise APIError(429, f"Too many requests in flight ({cfg.queue_limit}); retry shortly.", "rate_limit_error",
                           code="queue_full")  # fmt: skip
        state["in_flight"] += 1
        handed_off = False  # a stream decrements the count itself when it ends
        try:
            loop = asyncio.get_running_loop()
            messages, _ = await loop.run_in_executor(None, to_hf_messages, body.get("messages"), cfg)
            prompt_tokens = await loop.run_in_executor(None, engine.count_prompt_tokens, messages, tools)
            if prompt_tokens > cfg.max_prompt_tokens:
                raise APIError(400, f"The prompt has {prompt_tokens} tokens (images included), over the limit of "
                               f"{cfg.max_prompt_tokens}.", param="messages", code="context_length_exceeded")  # fmt: skip
            completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            if body.get("stream"):
                handed_off = True
                return StreamingResponse(
                    stream_chunks(engine, messages, tools, options, model_name, completion_id, prompt_tokens, state,
                                  include_usage=bool((body.get("stream_options") or {}).get("include_usage"))),
                    media_type="text/event-stream",
                )  # fmt: skip
            future = loop.create_future()
            batcher.jobs.put(Job(messages, tools, options, future, loop))
            result = await future
        except ValueError as err:
            raise APIError(400, str(err), param="messages") from err
        finally:
            if not handed_off:
                state["in_flight"] -= 1
        return completion_body(engine, result, model_name, completion_id)

    return app


def completion_body(engine, result: dict, model_name: str, completion_id: str) -> dict:
    content, calls = engine.processor.parse_tool_calls(result["text"])
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


async def stream_chunks(engine, messages, tools, options, model_name, completion_id, prompt_tokens, state,
                        include_usage: bool = False):  # fmt: skip
    """Server-sent events in OpenAI's chunk format; tool calls arrive as one final delta."""
    loop = asyncio.get_running_loop()
    chunks: asyncio.Queue = asyncio.Queue()
    created = int(time.time())

    def event(delta: dict, finish=None, usage=None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def produce() -> None:
        try:
            for piece in engine.chat(messages, tools=tools, stream=True, **options):
                loop.call_soon_threadsafe(chunks.put_nowait, piece)
        except Exception as err:  # reported in the stream, the server goes on
            loop.call_soon_threadsafe(chunks.put_nowait, err)
        loop.call_soon_threadsafe(chunks.put_nowait, None)

    threading.Thread(target=produce, daemon=True).start()
    try:
        yield event({"role": "assistant", "content": ""})
        text, shown = "", 0
        while (piece := await chunks.get()) is not None:
            if isinstance(piece, Exception):
                yield f"data: {json.dumps(APIError(500, str(piece), 'server_error').body())}\n\n"
                break
            text += piece
            visible = text.split("<|tool_call_start|>")[0]  # markup is never streamed as content
            if len(visible) > shown:
                yield event({"content": visible[shown:]})
                shown = len(visible)
        _, calls = engine.processor.parse_tool_calls(text) if "<|tool_call_start|>" in text else ("", [])
        if calls:
            delta = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
            yield event(delta, finish="tool_calls")
        else:
            completion_tokens = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
            yield event({}, finish="length" if completion_tokens >= options["max_new_tokens"] else "stop")
        if include_usage:
            completion_tokens = len(engine.tokenizer(text, add_special_tokens=False)["input_ids"])
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                     "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
            yield f"data: {json.dumps({'id': completion_id, 'object': 'chat.completion.chunk', 'created': created, 'model': model_name, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        state["in_flight"] -= 1


def serve(cfg: ServeConfig) -> None:
    """`n2eye serve`: loads the model and runs uvicorn until interrupted."""
    import uvicorn

    from .engine import load

    engine = load(cfg.model)
    print(f"N2-Eye serving {cfg.model} on http://{cfg.host}:{cfg.port} (OpenAI API at /v1, chat page at /)")
    uvicorn.run(create_app(engine, cfg), host=cfg.host, port=cfg.port, log_level="warning")
