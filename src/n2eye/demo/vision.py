"""Pretrains the demo's vision tower on the shapes world, standing in for a pretrained SigLIP.

The real recipe starts from a pretrained encoder (siglip2-so400m) and keeps it frozen; none exists offline. So
the demo first teaches the tower what a pretrained encoder would already know: for every cell of the 3x3 grid
(one image token each after pixel unshuffle), which colour, shape and size is there, if any, where the edges of
its box are, and where the cell is. Linear probes on the projector's unshuffled input are the objective; they are
thrown away afterwards and the tower is frozen, as in the real recipe. A frozen tower also makes each training
step ~25% cheaper (no backward through it), and the language model then learns from features that already
separate what questions ask about.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

from . import world

BOX_EDGES = ("x1", "y1", "x2", "y2")
SIDES = {"x": ("left", "right"), "y": ("top", "bottom")}  # the words a position answer gives (`world.side_of`)


def edge_classes(image_size: int) -> int:
    """Classes of one box-edge probe: the edge's pixel coordinate in SNAP steps (0..image_size), plus empty."""
    return image_size // world.SNAP + 2


def cell_labels(scene: world.Scene) -> dict[str, list[int]]:
    """Per cell (row-major), the class index of its colour, shape and size and of each edge of its object's box
    (`BOX_EDGES`, in SNAP-pixel steps; the last class of each: empty), the cell's row and column: where each
    token sits, which position and grounding answers need, and the side its object is clearly on (`SIDES`; the
    last class: near the middle, or empty). The box edges are what a grounding answer prints;
    with only the size and the cell to go on, the language model printed boxes of a middling size (IoU ~0.7
    on the right object)."""
    cells = world.GRID * world.GRID
    sizes = world.object_sides(scene.size)
    empty_edge = edge_classes(scene.size) - 1
    labels = {
        "colour": [len(world.COLOURS)] * cells,
        "shape": [len(world.SHAPES)] * cells,
        "size": [len(sizes)] * cells,
        "row": [cell // world.GRID for cell in range(cells)],
        "column": [cell % world.GRID for cell in range(cells)],
        **{edge: [empty_edge] * cells for edge in BOX_EDGES},
        **{f"side_{axis}": [len(SIDES[axis])] * cells for axis in SIDES},
    }
    for obj in scene.objects:
        cell = obj.cell(scene.size)
        labels["colour"][cell] = world.COLOURS.index(obj.colour)
        labels["shape"][cell] = world.SHAPES.index(obj.shape)
        labels["size"][cell] = sizes.index(obj.size)
        for edge, pixel in zip(BOX_EDGES, obj.bbox):
            labels[edge][cell] = pixel // world.SNAP
        for axis, words in SIDES.items():
            side = world.side_of(obj, axis, scene.size)
            labels[f"side_{axis}"][cell] = words.index(side) if side else len(words)
    return labels


def _cell_features(model, grids: torch.Tensor) -> torch.Tensor:
    """(images, cells, channels): the vision grids pixel-unshuffled as the projector sees them."""
    merged = model.model.multi_modal_projector.pixel_unshuffle(grids)
    n, h, w, c = merged.shape
    if h * w != world.GRID * world.GRID:
        raise ValueError(
            f"vision pretraining needs one image token per grid cell ({world.GRID}x{world.GRID}); "
            f"this model makes {h}x{w}"
        )
    return merged.reshape(n, h * w, c)


def pretrain_vision_tower(
    model,
    processor,
    *,
    steps: int = 150,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    image_size: int = 96,
    box_edges: bool = True,
    word_ids: dict[str, list[list[int]]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Trains `model`'s vision tower in place on fresh random scenes, then freezes it. Returns the probes'
    per-cell accuracy on held-out scenes, per attribute. `box_edges`: also probe each box's edges (`BOX_EDGES`).
    `word_ids` (attribute -> per class, the token ids that name it): also align the projector, so that each image
    token, read through the language model's (frozen, tied) word embeddings, names what is in its cell (its
    colour, shape and side; with box edges, the numbers of its box ranked high: `{edge}_word` counts them in the
    top four), as an LLaVA-style alignment stage makes image tokens read as words; the language model then starts
    from features it can copy."""
    from tqdm.auto import tqdm

    tower = model.model.vision_tower
    tower.requires_grad_(True)
    config = model.config
    channels = config.vision_config.hidden_size * config.projector_factor**2
    classes = {"colour": len(world.COLOURS) + 1, "shape": len(world.SHAPES) + 1,
               "size": len(world.object_sides(image_size)) + 1, "row": world.GRID, "column": world.GRID,
               **({edge: edge_classes(image_size) for edge in BOX_EDGES} if box_edges else {})}  # fmt: skip
    generator = torch.Generator().manual_seed(seed)
    heads = nn.ModuleDict({name: nn.Linear(channels, n) for name, n in classes.items()})
    for head in heads.values():
        nn.init.normal_(head.weight, std=channels**-0.5, generator=generator)
        nn.init.zeros_(head.bias)
    params = list(tower.parameters()) + list(heads.parameters())
    if word_ids:
        params += list(model.model.multi_modal_projector.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed + 7919)  # not the world's training or held-out seed
    tower.train()
    bar = tqdm(range(steps), desc="vision pretraining", unit="step", disable=not progress)
    for _ in bar:
        scenes = [world.make_scene(rng, image_size) for _ in range(batch_size)]
        loss, _ = _probe_loss(model, processor, heads, scenes, word_ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    tower.eval()
    with torch.no_grad():
        held = random.Random(seed + 104729)
        _, accuracy = _probe_loss(model, processor, heads, [world.make_scene(held, image_size) for _ in range(256)],
                                  word_ids)
    tower.requires_grad_(False)
    model.config.freeze_vision = True
    return {"steps": steps, "batch_size": batch_size, "cell_accuracy": accuracy}


def _probe_loss(model, processor, heads: nn.ModuleDict, scenes: list[world.Scene], word_ids=None):
    pixels = processor.image_processor([s.image for s in scenes], return_tensors="pt")["pixel_values"]
    grids = torch.stack(model.model.encode_images(pixels))
    features = _cell_features(model, grids)
    labels = [cell_labels(s) for s in scenes]
    loss = features.new_zeros(())
    accuracy = {}
    for name, head in heads.items():
        target = torch.tensor([lab[name] for lab in labels])
        logits = head(features)
        loss = loss + nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        accuracy[name] = round(float((logits.argmax(-1) == target).float().mean()), 4)
    if word_ids:
        tokens = model.model.multi_modal_projector(grids)  # (images, cells, lm hidden): what the LM reads
        tokens = tokens * torch.rsqrt(tokens.pow(2).mean(-1, keepdim=True) + 1e-6)  # as the LM's final norm would
        embeddings = model.get_input_embeddings().weight.detach()
        for name, classes in word_ids.items():
            target = torch.tensor([lab[name] for lab in labels]).reshape(-1)
            target = target.masked_fill(target >= len(classes), -100)  # empty cells name nothing
            for variant in range(len(classes[0])):
                words = embeddings[[ids[variant] for ids in classes]]
                logits = (tokens @ words.T).reshape(-1, len(classes))
                loss = loss + nn.functional.cross_entropy(logits, target, ignore_index=-100)
            top = len(BOX_EDGES) if name in BOX_EDGES else 1  # a cell's four edges share the numbers' tokens
            right = (logits.topk(top, -1).indices == target[:, None]).any(-1)[target >= 0]
            accuracy[f"{name}_word"] = round(float(right.float().mean()), 4)
    return loss, accuracy
