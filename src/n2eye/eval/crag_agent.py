"""Any OpenAI-compatible chat server as the CRAG-MM agent (`n2eye eval --protocol crag-mm --agent-url ...`).

Why: the point of running the benchmark's protocol is to put N2-Eye beside other models (an LFM2-VL in vLLM, a
llama.cpp server, a hosted model) on the same questions, history rule and scoring. The agent answers with the same
`complete_batch` interface as N2-Eye's engine, so `crag_runner` does not know which one it drives; images travel
as PNG data URIs, requests run `concurrency` at a time, and a call that fails every try becomes an empty answer
marked `agent_error` (counted, never cached, retried by a resumed run) instead of stopping the evaluation.
"""

from __future__ import annotations

from typing import Any

from .openai_client import ChatClient, ChatError, bounded_map, openai_messages


class HttpAgent:
    """`complete_batch(histories, tools=..., max_new_tokens=...)` answered by a chat-completions server, greedy."""

    processor = None  # no local processor: the server renders and tokenizes

    def __init__(self, url: str, model: str, api_key: str | None = None, concurrency: int = 4,
                 timeout: float = 300.0) -> None:  # fmt: skip
        self.client = ChatClient(url, api_key=api_key, timeout=timeout)
        self.model = model
        self.concurrency = concurrency

    @property
    def url(self) -> str:
        return self.client.url

    def _one(self, history: list[dict[str, Any]], tools: Any, max_new_tokens: int) -> dict[str, Any]:
        payload: dict[str, Any] = {"model": self.model, "messages": openai_messages(history), "temperature": 0,
                                   "max_tokens": max_new_tokens}  # fmt: skip
        if tools:
            payload["tools"] = tools
        try:
            text, finish = self.client.complete(payload)
        except ChatError as exc:
            return {"text": "", "finish_reason": "error", "error": str(exc)}
        return {"text": text, "finish_reason": finish}

    def complete_batch(self, histories: list[list[dict[str, Any]]], tools: Any = None, max_new_tokens: int = 256,
                       **_: Any) -> list[dict[str, Any]]:  # fmt: skip
        """One answer per history, in order; sampling options are the protocol's (greedy), image settings the
        server's own."""
        return bounded_map(lambda h: self._one(h, tools, max_new_tokens), histories, self.concurrency)
