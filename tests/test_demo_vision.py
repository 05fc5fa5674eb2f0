"""The demo's vision pretraining: per-cell labels are right, the tower learns to tell every cell's colour, shape,
size and box edges within a few seconds, and ends frozen (as a pretrained SigLIP is in the real recipe)."""

from __future__ import annotations

import random

import pytest


def test_cell_labels_name_each_objects_cell_and_mark_the_rest_empty():
    from n2eye.demo import world
    from n2eye.demo.vision import BOX_EDGES, SIDES, cell_labels, edge_classes

    scene = world.make_scene(random.Random(3), 96, shapes=["circle", "triangle"], colours=["red", "blue"])
    labels = cell_labels(scene)
    cells = {o.cell(96): o for o in scene.objects}
    assert len(cells) == 2  # one object per cell
    for index in range(9):
        if index in cells:
            obj = cells[index]
            assert labels["colour"][index] == world.COLOURS.index(obj.colour)
            assert labels["shape"][index] == world.SHAPES.index(obj.shape)
            assert world.object_sides(96)[labels["size"][index]] == obj.size
            assert [labels[edge][index] * world.SNAP for edge in BOX_EDGES] == list(obj.bbox)
            for axis, words in SIDES.items():
                side = world.side_of(obj, axis, 96)
                assert labels[f"side_{axis}"][index] == (words.index(side) if side else 2)
        else:
            assert (labels["colour"][index], labels["shape"][index], labels["size"][index]) == (4, 3, 4)
            assert {labels[edge][index] for edge in BOX_EDGES} == {edge_classes(96) - 1}
            assert labels["side_x"][index] == labels["side_y"][index] == 2


def test_object_cell_is_the_grid_cell_of_its_centre():
    from n2eye.demo import world

    rng = random.Random(0)
    for _ in range(50):
        scene = world.make_scene(rng, 96)
        for obj in scene.objects:
            row, col = divmod(obj.cell(96), 3)
            assert col * 32 <= obj.center[0] < (col + 1) * 32 and row * 32 <= obj.center[1] < (row + 1) * 32


def test_pretraining_teaches_the_tower_every_cell_then_freezes_it(tmp_path):
    import torch

    from n2eye.demo import world
    from n2eye.demo.command import demo_model
    from n2eye.demo.vision import pretrain_vision_tower
    from n2eye.fixtures import train_tiny_tokenizer

    rng = random.Random(0)
    mean, std = world.pixel_statistics(world.make_scene(rng, 96).image for _ in range(200))
    model, processor = demo_model(train_tiny_tokenizer(tmp_path / "tok"), 0, image_mean=mean, image_std=std)
    lm_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    result = pretrain_vision_tower(model, processor, steps=60, seed=1, progress=False)
    accuracy = result["cell_accuracy"]
    assert accuracy["colour"] >= 0.97 and accuracy["shape"] >= 0.95 and accuracy["size"] >= 0.9, accuracy
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert model.config.freeze_vision is True
    after = model.model.language_model.state_dict()
    assert all(torch.equal(lm_before[k], after[k]) for k in lm_before)  # only the tower is pretrained


def test_pretraining_refuses_a_model_without_one_token_per_cell():
    from n2eye.build import build_random
    from n2eye.demo.vision import pretrain_vision_tower

    model, processor = build_random("tiny")
    with pytest.raises(ValueError, match="one image token per grid cell"):
        pretrain_vision_tower(model, processor, steps=1, progress=False)


def test_alignment_makes_every_image_token_read_as_its_cells_words(tmp_path):
    """With `word_ids`, the projector is aligned too: each object's image token, read through the language model's
    frozen word embeddings (as its output layer would), names the object's colour, shape and side, and ranks its
    box's numbers high (in its top four, mostly); the language model itself is left as it was, and the projector
    stays trainable."""
    import torch

    from n2eye.demo import world
    from n2eye.demo.command import VISION_PRETRAIN_STEPS, demo_model, word_ids
    from n2eye.demo.vision import pretrain_vision_tower
    from n2eye.fixtures import train_tiny_tokenizer

    rng = random.Random(0)
    mean, std = world.pixel_statistics(world.make_scene(rng, 96).image for _ in range(200))
    tokenizer = train_tiny_tokenizer(tmp_path / "tok")
    model, processor = demo_model(tokenizer, 0, image_mean=mean, image_std=std)
    lm_before = {k: v.clone() for k, v in model.model.language_model.state_dict().items()}
    words = word_ids(tokenizer, box_edges=True)
    assert tokenizer.decode(words["colour"][0]) == "red red" and tokenizer.decode(words["x1"][20]) == "42"
    untrained = pretrain_vision_tower(model, processor, steps=0, seed=1, word_ids=words, progress=False)
    assert untrained["cell_accuracy"]["colour_word"] < 0.5
    model, processor = demo_model(tokenizer, 0, image_mean=mean, image_std=std)
    steps = VISION_PRETRAIN_STEPS
    accuracy = pretrain_vision_tower(model, processor, steps=steps, seed=1, word_ids=words, progress=False)["cell_accuracy"]
    assert accuracy["colour_word"] >= 0.95 and accuracy["shape_word"] >= 0.95, accuracy
    assert accuracy["side_x_word"] >= 0.95 and accuracy["side_y_word"] >= 0.95, accuracy
    assert min(accuracy[f"{edge}_word"] for edge in ("x1", "y1", "x2", "y2")) >= 0.5, accuracy  # of 49; chance 8%
    after = model.model.language_model.state_dict()
    assert all(torch.equal(lm_before[k], after[k]) for k in lm_before)
    assert all(p.requires_grad for p in model.model.multi_modal_projector.parameters())
