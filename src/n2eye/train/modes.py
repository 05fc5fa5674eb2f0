"""What trains in each mode: one model, three options (never a copied loop per method).

projector: only the projector. full: projector + language model. lora: LoRA adapters on the LFM2 linear layers
(attention q/k/v/out, conv in/out projections, w1/w2/w3 MLP) + the full projector. `train_vision` unfreezes
the vision tower in any mode, at its own learning rate.
"""

from __future__ import annotations

import torch

# LFM2 linear layers: attention (q_proj, k_proj, v_proj, out_proj), short conv (in_proj, out_proj), MLP (w1, w2, w3).
# The regex is anchored on `language_model` so SigLIP's own q/k/v/out_proj layers never get adapters.
LFM2_LORA_TARGETS = r".*language_model\..*\.(q_proj|k_proj|v_proj|out_proj|in_proj|w1|w2|w3)"


def configure_trainable(model, mode: str, train_vision: bool = False, lora: dict | None = None):
    """Sets requires_grad for the mode; returns the model to train (a peft model for `lora`)."""
    model.requires_grad_(False)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        options = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, **(lora or {})}
        # modules_to_save: the projector trains fully and is stored in the adapter, so adapter + base is complete
        config = LoraConfig(
            target_modules=LFM2_LORA_TARGETS,
            modules_to_save=["multi_modal_projector"],
            bias="none",
            task_type="CAUSAL_LM",
            **options,
        )
        model = get_peft_model(model, config)
    else:
        if mode == "full":
            base(model).language_model.requires_grad_(True)
        base(model).multi_modal_projector.requires_grad_(True)
    base(model).vision_tower.requires_grad_(train_vision)
    return model


def base(model):
    """The N2EyeModel inside a (possibly peft-wrapped) N2EyeForConditionalGeneration."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.model


def parameter_groups(model, lr: float, vision_lr: float, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer groups: the vision tower at `vision_lr`, everything else trainable at `lr`."""
    vision_ids = {id(p) for p in base(model).vision_tower.parameters()}
    vision, other = [], []
    for p in model.parameters():
        if p.requires_grad:
            (vision if id(p) in vision_ids else other).append(p)
    groups = [{"params": other, "lr": lr, "weight_decay": weight_decay}]
    if vision:
        groups.append({"params": vision, "lr": vision_lr, "weight_decay": weight_decay})
    return groups


def count_trainable(model) -> dict[str, int]:
    """Trainable parameters per part, for the run summary and the tests."""
    parts = {
        "vision_tower": base(model).vision_tower,
        "projector": base(model).multi_modal_projector,
        "language_model": base(model).language_model,
    }
    return {name: sum(p.numel() for p in part.parameters() if p.requires_grad) for name, part in parts.items()}


def merge_lora(model) -> torch.nn.Module:
    """Folds LoRA weights into the base linear layers and returns the plain N2-Eye model."""
    return model.merge_and_unload()
