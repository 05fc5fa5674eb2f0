"""The demo's picture: held-out images with the question asked, the model's answer, the truth, and boxes."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw_heldout_examples(
    engine, heldout_spec: str, out_png: Path, n: int = 8, images_dir: Path | None = None
) -> dict[str, Any]:
    """Asks one question per held-out session (grounding ones included) through `engine.chat`, draws the image
    with question / answer / truth, predicted boxes in orange and true boxes in green; returns one example.
    `images_dir`: also saves each drawn image there as a PNG (to drop into `n2eye serve`'s page)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    from ..data.formats import load_many
    from ..eval.runner import EvalConfig, turn_requests
    from ..eval.scoring import parse_boxes

    picked: list[dict] = []
    grounding = 0
    for conversation in load_many(heldout_spec):
        if len(conversation.get("images") or []) != 1:
            continue
        for request in turn_requests(conversation):
            wanted = request["qtype"] == "grounding" and grounding < n // 3
            if wanted or (request["qtype"] not in ("grounding", "tool_call", "tool_answer") and len(picked) - grounding < n - n // 3):
                grounding += request["qtype"] == "grounding"
                picked.append({**request, "image": conversation["images"][0]})
                break
        if len(picked) >= n:
            break
    cols = 4
    rows = (len(picked) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.9 * rows), dpi=100)
    axes = axes.flatten() if hasattr(axes, "flatten") else [axes]
    example = None
    for index, (ax, item) in enumerate(zip(axes, picked), start=1):
        answer = engine.chat(item["history"], do_sample=False, max_new_tokens=EvalConfig.max_new_tokens,
                             repetition_penalty=1.0)  # as `n2eye eval` answers (96 tokens cut 4-box answers)
        image = item["image"]
        if images_dir is not None:
            images_dir.mkdir(parents=True, exist_ok=True)
            image.save(images_dir / f"heldout-{index}.png")
        ax.imshow(image)
        width, height = image.size
        for boxes, colour in ((parse_boxes(item["reference"]) if item["qtype"] == "grounding" else None, "limegreen"),
                              (parse_boxes(answer) if item["qtype"] == "grounding" else None, "orange")):
            for box in boxes or []:
                x1, y1, x2, y2 = box["bbox"] if isinstance(box, dict) else box[1]
                ax.add_patch(patches.Rectangle((x1 * width, y1 * height), (x2 - x1) * width, (y2 - y1) * height,
                                               fill=False, edgecolor=colour, linewidth=2))
        question = item["history"][-1]["content"]
        if isinstance(question, list):
            question = " ".join(t for t in (i.get("text", "") for i in question if isinstance(i, dict)) if t)
        short = question if len(question) < 60 else question.split(".")[0][:57] + "..."
        ok = answer.strip().lower().rstrip(".") == str(item["reference"]).strip().lower().rstrip(".")
        ax.set_title(f"{short}\nmodel: {answer[:40]}\ntruth: {str(item['reference'])[:40]}", fontsize=7,
                     color="darkgreen" if ok or item["qtype"] == "grounding" else "firebrick", loc="left")
        ax.axis("off")
        if example is None and item["qtype"] != "grounding":
            example = {"question": question, "answer": answer, "truth": item["reference"], "qtype": item["qtype"]}
    for ax in axes[len(picked):]:
        ax.axis("off")
    fig.suptitle("Held-out images: model answers (green boxes: truth, orange: model)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return example or {}
