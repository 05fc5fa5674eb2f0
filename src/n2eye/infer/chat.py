"""`n2eye chat`: an interactive terminal chat with streamed answers and history kept in a cached session."""

from __future__ import annotations

import sys
from dataclasses import dataclass

from ..image_settings import ImageOptions

HELP = """commands: /image PATH_OR_URL (attach to your next message)  /system TEXT (new system prompt, new chat)
          /reset (new chat)  /help  /quit"""


@dataclass
class ChatConfig(ImageOptions):
    """Options of `n2eye chat`."""

    model: str
    """Checkpoint folder (or hub id)."""
    system: str | None = None
    """System prompt (default: the checkpoint's)."""
    image: str | None = None
    """An image to attach to the first message."""
    max_new_tokens: int = 256
    """Most tokens per answer."""
    temperature: float | None = None
    """Sampling temperature; 0 for greedy (default: the checkpoint's, 0.1)."""
    trust_remote_code: bool = False
    """Run the checkpoint's own code when it differs from the installed n2eye's (only for checkpoints you trust)."""


def chat(cfg: ChatConfig, stdin=None, stdout=None) -> int:
    """Runs the loop until /quit or end of input; returns the number of answers given."""
    from .engine import load

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    engine = load(cfg.model, trust_remote_code=cfg.trust_remote_code, image_settings=cfg.image_settings())
    system, pending_images = cfg.system, [cfg.image] if cfg.image else []
    session = engine.session(system=system)
    answers = 0
    print(f"N2-Eye chat with {cfg.model}. {HELP}", file=stdout, flush=True)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/help":
            print(HELP, file=stdout)
            continue
        if line == "/reset" or line.startswith("/system"):
            if line.startswith("/system"):
                system = line[len("/system") :].strip() or None
            session = engine.session(system=system)
            pending_images = []
            print("(new chat" + (f", system: {system}" if system else "") + ")", file=stdout, flush=True)
            continue
        if line.startswith("/image"):
            source = line[len("/image") :].strip()
            if not source:
                print("usage: /image PATH_OR_URL", file=stdout)
                continue
            pending_images.append(source)
            print(f"(image attached to your next message: {source})", file=stdout, flush=True)
            continue
        content = [{"type": "image", "url": source} for source in pending_images] + [{"type": "text", "text": line}]
        print("n2eye> ", end="", file=stdout, flush=True)
        try:
            session.send(content, on_text=lambda t: print(t, end="", file=stdout, flush=True),
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature)  # fmt: skip
        except ValueError as err:  # a bad image: say so and keep chatting
            session.messages.pop()
            print(f"(error: {err})", file=stdout, flush=True)
            continue
        finally:
            pending_images = []
        answers += 1
        print(file=stdout, flush=True)
    return answers
