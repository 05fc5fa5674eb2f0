"""Where a demo model looks when it answers: attention from the answer position to the asked object's image token.

    python benchmarks/demo_attention_probe.py n2eye-demo/run/final [--scenes 300] [--shape-question "Which shape is {c}?"]

For "What colour is the <shape>?" (find the object by its shape) and "What shape is the <colour> object?" (find
it by its colour) on fresh 4-object scenes, prints each attention layer x head's mean attention on the asked
object's token, and how often the answer is right (docs/demo-notes.md, 2026-12-06: find-by-shape forms a sharp
lookup, find-by-colour does not). Needs a model trained by `n2eye demo` (96 px, one image token per grid cell).
"""

from __future__ import annotations

import argparse
import random

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from n2eye.demo.world import SHAPES, make_scene


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--shape-question", default="What shape is the {c} object?")
    args = parser.parse_args()
    processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(args.model, trust_remote_code=True, attn_implementation="eager")
    model.eval()
    size = model.config.vision_config.image_size
    rng = random.Random(123)
    attention: dict[str, torch.Tensor] = {}
    right: dict[str, int] = {"colour": 0, "shape": 0}
    asked: dict[str, int] = {"colour": 0, "shape": 0}
    for _ in range(args.scenes):
        scene = make_scene(rng, size, shapes=[rng.choice(SHAPES) for _ in range(4)])
        for kind in ("colour", "shape"):
            if kind == "colour":
                objects = [o for o in scene.objects if scene.count(o.shape) == 1]
            else:
                objects = [o for o in scene.objects if scene.count(colour=o.colour) == 1]
            if len(scene.objects) != 4 or not objects:
                continue
            obj = rng.choice(objects)
            question = f"What colour is the {obj.shape}?" if kind == "colour" else args.shape_question.format(c=obj.colour)
            truth = obj.colour if kind == "colour" else obj.shape
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = processor(text=text, images=[scene.image], return_tensors="pt")
            with torch.no_grad():
                out = model(**inputs, output_attentions=True)
            answer = processor.tokenizer.decode(out.logits[0, -1].argmax()).strip()
            right[kind] += answer == truth
            asked[kind] += 1
            image_positions = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
            target = image_positions[obj.cell(size)]
            layers = torch.stack([a[0, :, -1, target] for a in out.attentions if a is not None])
            attention[kind] = attention.get(kind, 0) + layers
    for kind, name in (("colour", "find by shape, answer its colour"), ("shape", "find by colour, answer its shape")):
        print(f"{name}: {asked[kind]} questions, {100 * right[kind] / max(1, asked[kind]):.1f}% right")
        print("  attention on the asked object's token (rows: attention layers, columns: heads):")
        for row in (attention[kind] / max(1, asked[kind])).tolist():
            print("   " + " ".join(f"{v:.2f}" for v in row))


if __name__ == "__main__":
    main()
