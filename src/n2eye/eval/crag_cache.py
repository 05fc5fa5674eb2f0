"""What makes a killed `eval --protocol crag-mm` run resumable: answers and verdicts cached by content.

Why by content: a key is the sha256 of everything that decides the value (for an answer: the agent's identity,
the generation settings and the exact history with image pixels; for a verdict: the judge, its prompt and the
question / ground truth / prediction), so a rerun reuses exactly what it would have computed again and nothing
else: another model, judge, prompt or data simply misses. Entries are appended to `<out>.partial.jsonl` and
flushed one by one (a line cut by a kill is ignored); the file is removed once the result is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image


def partial_path(out: Path) -> Path:
    """Where the cache of the result file `out` lives."""
    return out.with_name(out.name + ".partial.jsonl")


def digest(value: Any) -> str:
    """sha256 of a JSON-serialisable value (keys sorted)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def weights_fingerprint(model: str | None) -> list[list[Any]]:
    """(name, size, mtime) of a local checkpoint's weight files: a model retrained in place gets new keys."""
    if not model or not Path(model).is_dir():
        return []
    files = sorted(p for p in Path(model).iterdir() if p.suffix in (".safetensors", ".bin", ".gguf") or p.name == "config.json")
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]


class HistoryDigest:
    """Digests of chat histories, images by their pixels (each image hashed once per run)."""

    def __init__(self) -> None:
        self._images: dict[int, tuple[Image.Image, str]] = {}

    def image(self, image: Image.Image) -> str:
        known = self._images.get(id(image))
        if known is None or known[0] is not image:
            value = hashlib.sha256(image.tobytes()).hexdigest() + f":{image.mode}:{image.size}"
            known = self._images[id(image)] = (image, value)
        return known[1]

    def __call__(self, messages: Sequence[Mapping[str, Any]]) -> list[Any]:
        out = []
        for message in messages:
            content = message.get("content")
            if isinstance(content, list):
                content = [self.image(i["image"]) if i.get("type") == "image" and "image" in i else i.get("text")
                           for i in content]  # fmt: skip
            out.append([message.get("role"), content, message.get("tool_calls")])
        return out


class ResultCache:
    """Append-only `{"kind", "key", "value"}` lines; `get(kind, key)` / `put(kind, key, value)` are thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[tuple[str, str], Any] = {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[(entry["kind"], entry["key"])] = entry["value"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill
        self.loaded = {kind: sum(k == kind for k, _ in self.entries) for kind in ("answer", "verdict")}
        self.hits = {"answer": 0, "verdict": 0}
        self._lock = threading.Lock()
        self._file = None

    def get(self, kind: str, key: str) -> Any:
        value = self.entries.get((kind, key))
        if value is not None:
            with self._lock:
                self.hits[kind] += 1
        return value

    def put(self, kind: str, key: str, value: Any) -> None:
        line = json.dumps({"kind": kind, "key": key, "value": value}, default=str) + "\n"
        with self._lock:
            self.entries[(kind, key)] = value
            if self._file is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._file = self.path.open("a", encoding="utf-8")
            self._file.write(line)
            self._file.flush()

    def close(self, remove: bool = False) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
            if remove and self.path.exists():
                os.unlink(self.path)
