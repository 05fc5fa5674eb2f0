"""The shapes world as files that `n2eye train` and `n2eye eval` read through their adapters, and as text for the
demo's tokenizer.

One-image sessions are written in the CRAG-MM v0.1.2 layout (`write_cragmm`); two-image and tool-call sessions
do not fit CRAG-MM and go to a `messages` JSONL file beside it (`write_messages`). `write_demo_dataset` writes
the train and held-out splits, `manifest.json` and the chance levels.

Where the question type ends up after the adapters (`conversation_qtypes` reads both, one per user turn):
* CRAG-MM parquet: `conversation["metadata"]["turns"][i]["query_category"]` (a ClassLabel whose names are
  `QTYPES`);
* messages JSONL: the adapter keeps only the row `id`, so the id is `"<session_id>:<qtype>+<qtype>..."`
  (`conversation["metadata"]["id"]`); the file also has a `metadata` column with the qtypes, which the
  adapter drops today.

Run as a program it writes a dataset for code that must not import the demo (the training figure of
`n2eye bench`), and prints the written paths as one line of JSON:
    python -m n2eye.demo.writers OUT_DIR --sessions N --heldout M [--seed 0] [--size 96] [--colour-sentences]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image

from .baselines import blind_baseline, chance_levels, qtype_counts
from .questions import MAX_TURNS, MIN_TURNS, MIX, QTYPES, TOOLS, QuestionMix, Session, in_sentences, make_sessions
from .world import COLOURS, GRID, MAX_OBJECTS, MIN_OBJECTS, SHAPES, SIDE_FRACTIONS, pixel_statistics

DOMAIN_NAMES = ("shapes",)
DYNAMISM_NAMES = ("static",)
IMAGE_QUALITY_NAMES = ("clean",)


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_hash(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def cragmm_features() -> Any:
    """CRAG-MM v0.1.2 features (turns/answers as dicts of lists) with our own label names."""
    from datasets import ClassLabel, Features, List, Value
    from datasets import Image as ImageFeature

    return Features(
        {
            "session_id": Value("string"),
            "image": ImageFeature(),
            "image_url": Value("string"),
            "turns": {
                "interaction_id": List(Value("string")),
                "query": List(Value("string")),
                "domain": List(ClassLabel(names=list(DOMAIN_NAMES))),
                "query_category": List(ClassLabel(names=list(QTYPES))),
                "dynamism": List(ClassLabel(names=list(DYNAMISM_NAMES))),
                "image_quality": List(ClassLabel(names=list(IMAGE_QUALITY_NAMES))),
            },
            "answers": {"interaction_id": List(Value("string")), "ans_full": List(Value("string"))},
        }
    )


def cragmm_row(session: Session) -> dict[str, Any]:
    """One CRAG-MM v0.1.2 row (labels as integers, as on the hub)."""
    if session.kind != "cragmm":
        raise ValueError(f"session {session.session_id} is {session.kind}; only one-image sessions fit CRAG-MM")
    ids = [f"{session.session_id}-t{i}" for i in range(len(session.turns))]
    n = len(ids)
    return {
        "session_id": session.session_id,
        "image": {"bytes": png_bytes(session.scenes[0].image), "path": None},
        "image_url": "",
        "turns": {
            "interaction_id": ids,
            "query": [t.question for t in session.turns],
            "domain": [0] * n,
            "query_category": [QTYPES.index(t.qtype) for t in session.turns],
            "dynamism": [0] * n,
            "image_quality": [0] * n,
        },
        "answers": {"interaction_id": ids, "ans_full": [t.answer for t in session.turns]},
    }


def session_messages(session: Session, image_items: Sequence[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """HF chat messages for a session: all images in the first user turn, OpenAI-style tool calls.

    `image_items` are the image content items (default `{"type": "image"}`, as the adapters return them).
    """
    items = list(image_items) if image_items is not None else [{"type": "image"} for _ in session.scenes]
    messages: list[dict[str, Any]] = []
    for index, turn in enumerate(session.turns):
        content = (items if index == 0 else []) + [{"type": "text", "text": turn.question}]
        messages.append({"role": "user", "content": content})
        if turn.tool_call is None:
            messages.append({"role": "assistant", "content": turn.answer})
            continue
        call_id = f"call_{index}"
        call = {"id": call_id, "type": "function", "function": dict(turn.tool_call)}
        messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        name = turn.tool_call["name"]
        messages.append({"role": "tool", "tool_call_id": call_id, "name": name, "content": turn.tool_result})
        messages.append({"role": "assistant", "content": turn.answer})
    return messages


def messages_id(session: Session) -> str:
    """The row id of an extra session, `<session_id>:<qtype>+<qtype>...` (one per user turn): the id is the
    one row field the messages adapter keeps, so it carries the qtypes."""
    return f"{session.session_id}:{'+'.join(t.qtype for t in session.turns)}"


def qtypes_from_id(row_id: str) -> list[str]:
    return row_id.rsplit(":", 1)[-1].split("+")


def to_conversation(session: Session) -> dict[str, Any]:
    """The Conversation the adapters would read back from the written files (for in-memory use)."""
    conversation: dict[str, Any] = {
        "messages": session_messages(session),
        "images": list(session.images),
        "metadata": {
            "format": "synthetic",
            "session_id": session.session_id,
            "kind": session.kind,
            "qtypes": [t.qtype for t in session.turns],
        },
    }
    if session.tools:
        conversation["tools"] = session.tools
    return conversation


def conversation_qtypes(conversation: dict[str, Any]) -> list[str]:
    """One qtype per user turn of a Conversation read back by either adapter (or from `to_conversation`)."""
    meta = conversation.get("metadata") or {}
    if meta.get("format") == "cragmm":
        return [str(t["query_category"]) for t in meta["turns"]]
    if meta.get("format") == "synthetic":
        return list(meta["qtypes"])
    return qtypes_from_id(str(meta.get("id", "")))


def write_messages(sessions: Sequence[Session], out_dir: str | Path, split: str) -> Path | None:
    """The two-image / tool-call sessions as `<split>-extra.jsonl`, images as PNGs in `<split>-images/`."""
    extra = [s for s in sessions if s.kind != "cragmm"]
    out = Path(out_dir)
    if not extra:
        (out / f"{split}-extra.jsonl").unlink(missing_ok=True)  # never leave a stale file from an earlier run
        return None
    image_dir = out / f"{split}-images"
    image_dir.mkdir(parents=True, exist_ok=True)
    path = out / f"{split}-extra.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for session in extra:
            items = []
            for k, scene in enumerate(session.scenes):
                name = f"{session.session_id}-{k}.png"
                scene.image.save(image_dir / name, format="PNG")
                items.append({"type": "image", "image": f"{split}-images/{name}"})
            row: dict[str, Any] = {
                "id": messages_id(session),
                "messages": session_messages(session, items),
                "metadata": {
                    "session_id": session.session_id,
                    "kind": session.kind,
                    "qtypes": [t.qtype for t in session.turns],
                    "split": split,
                },
            }
            if session.tools:
                row["tools"] = session.tools
            fh.write(json.dumps(row) + "\n")
    return path


def write_cragmm(sessions: Sequence[Session], out_dir: str | Path, split: str) -> Path:
    """One-image sessions as `<split>.parquet` in the CRAG-MM v0.1.2 layout; the others via `write_messages`."""
    import datasets

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [cragmm_row(s) for s in sessions if s.kind == "cragmm"]
    path = out / f"{split}.parquet"
    features = cragmm_features()
    columns = {name: [row[name] for row in rows] for name in features}  # from_dict: also fine with no rows
    datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
    write_messages(sessions, out, split)
    return path


def _heldout_sessions(
    n: int, seed: int, seen: set[str], size: int = 96, mix: QuestionMix | None = None
) -> list[Session]:
    """Held-out sessions whose images never appear in train (pixel hashes), from a disjoint seed."""
    kept: list[Session] = []
    attempt = 0
    while len(kept) < n:
        batch = make_sessions(n, seed + 7919 * (attempt + 1), size=size, id_prefix="heldout", mix=mix)
        kept += [s for s in batch if not any(image_hash(i) in seen for i in s.images)]
        attempt += 1
    kept = kept[:n]
    for index, session in enumerate(kept):
        session.session_id = f"heldout-{index:06d}"
    return kept


def tokenizer_corpus(n_sessions: int = 600, seed: int = 104723) -> list[str]:
    """The world's phrasing (questions, answers, tool results and schemas) from sessions of their own seed, for
    the demo's tokenizer to learn its words whole, as the real LFM2 vocabulary has them: the model-card grounding
    prompt is then 44 tokens instead of 82 and a world's text ~16% shorter, so each training step of packed rows
    holds more conversations. Coordinates stay "0" "." "NN" (digits are split before merging)."""
    texts = [json.dumps(TOOLS)]
    for session in make_sessions(n_sessions, seed, id_prefix="tokenizer"):
        texts.append(" ".join(f"{t.question} {t.answer} {t.tool_result or ''}".strip() for t in session.turns))
    return texts


def write_demo_dataset(
    out_dir: str | Path, n_train: int, n_heldout: int, seed: int = 0, *, size: int = 96,
    colour_sentences: bool = False,
    mix: QuestionMix | None = None,
) -> dict[str, Any]:
    """Train and held-out splits (CRAG-MM parquet + extra JSONL each), `manifest.json`, and chance levels.
    `colour_sentences`: colour answers as "The circle is red." (`colour_sentence`) instead of "red";
    `mix`: see `make_sessions`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    train = make_sessions(n_train, seed, size=size, id_prefix="train", mix=mix)
    seen = {image_hash(image) for s in train for image in s.images}
    heldout = _heldout_sessions(n_heldout, seed, seen, size, mix)
    if colour_sentences:
        train, heldout = [in_sentences(x) for x in train], [in_sentences(x) for x in heldout]
    result: dict[str, Any] = {"out_dir": out}
    manifest: dict[str, Any] = {
        "world": {
            "image_size": size,
            "shapes": list(SHAPES),
            "colours": list(COLOURS),
            "objects_per_image": [MIN_OBJECTS, MAX_OBJECTS],
            "grid": GRID,
            "object_side_fraction_of_cell": list(SIDE_FRACTIONS),
            "turns_per_session": [MIN_TURNS, MAX_TURNS],
            "colour_answers": "sentences" if colour_sentences else "words",
            "question_mix": asdict(mix or MIX),
        },
        "pixel_statistics": dict(zip(("mean", "std"), pixel_statistics(i for s in train for i in s.images))),
        "qtypes": list(QTYPES),
        "qtype_location": {
            "cragmm": 'metadata["turns"][i]["query_category"]',
            "messages": 'metadata["id"] = "<session_id>:<qtype>+<qtype>..." (one per user turn)',
        },
        "grounding_score": "n2eye.eval.scoring.grounding_score: optimal one-to-one IoU matching, summed, divided by max(#predicted, #true) boxes",
        "seed": seed,
        "splits": {},
    }
    for split, sessions in (("train", train), ("heldout", heldout)):
        cragmm = write_cragmm(sessions, out, split)
        extra = out / f"{split}-extra.jsonl"
        paths = {"cragmm": cragmm, "messages": extra if extra.is_file() else None}
        result[split] = paths
        manifest["splits"][split] = {
            "cragmm": cragmm.name,
            "messages": extra.name if extra.is_file() else None,
            "sessions": len(sessions),
            "qtype_counts": qtype_counts(sessions),
        }
    levels = chance_levels(heldout) if heldout else chance_levels()
    result["chance_levels"] = levels
    manifest["chance_levels"] = levels
    manifest["blind_baseline"] = blind_baseline(train, heldout) if train and heldout else {}
    result["blind_baseline"] = manifest["blind_baseline"]
    manifest_path = out / "manifest.json"
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    result["manifest"] = manifest_path
    return result


def main(argv: list[str] | None = None) -> int:
    """`python -m n2eye.demo.writers`: `write_demo_dataset` in a process of its own; prints the paths as JSON."""
    parser = argparse.ArgumentParser(prog="python -m n2eye.demo.writers", description=main.__doc__)
    parser.add_argument("out_dir", help="folder to write (train/held-out parquet, extra JSONL, manifest.json)")
    parser.add_argument("--sessions", type=int, required=True, help="training sessions")
    parser.add_argument("--heldout", type=int, default=0, help="held-out sessions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=96, help="image side in pixels")
    parser.add_argument("--colour-sentences", action="store_true", help='colour answers as "The circle is red."')
    args = parser.parse_args(argv)
    written = write_demo_dataset(args.out_dir, args.sessions, args.heldout, args.seed, size=args.size,
                                 colour_sentences=args.colour_sentences)  # fmt: skip
    paths = {split: {kind: str(path) if path else None for kind, path in written[split].items()}
             for split in ("train", "heldout")}  # fmt: skip
    print(json.dumps({**paths, "manifest": str(written["manifest"])}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
