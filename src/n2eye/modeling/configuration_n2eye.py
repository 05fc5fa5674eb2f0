"""N2-Eye configuration: an LFM2 language model, a SigLIP/SigLIP2 vision tower and a projector.

This file ships inside every checkpoint (loaded with ``trust_remote_code=True``), so it imports only
transformers. It holds architecture only; preprocessing lives in the image processor and the processor.
"""

from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec

SUPPORTED_TEXT_MODEL_TYPES = ("lfm2",)
# "siglip_vision_model" covers SigLIP and the fixed-resolution SigLIP2 checkpoints (they use the SigLIP
# architecture); "siglip2_vision_model" is SigLIP2 NaFlex (native resolution, variable tokens per image).
SUPPORTED_VISION_MODEL_TYPES = ("siglip_vision_model", "siglip2_vision_model")
SUPPORTED_PROJECTOR_TYPES = ("mlp", "pixel_unshuffle_mlp")


class N2EyeConfig(PreTrainedConfig):
    r"""
    text_config (`dict` or `PreTrainedConfig`): the LFM2 language model's config.
    vision_config (`dict` or `PreTrainedConfig`): the SigLIP / SigLIP2 vision tower's config.
    projector_type (`str`, defaults to `"mlp"`): `"mlp"` (Linear-GELU-Linear, as the N2-Eye card) or
        `"pixel_unshuffle_mlp"` (pixel unshuffle by `downsample_factor`, LayerNorm, MLP, as LFM2-VL).
    projector_hidden_size (`int`, *optional*): the MLP's hidden width; defaults to the LM hidden size.
    projector_hidden_act (`str`, defaults to `"gelu"`): the MLP's activation.
    projector_bias (`bool`, defaults to `True`): biases in the projector's linear layers.
    downsample_factor (`int`, defaults to 2): pixel-unshuffle factor (`pixel_unshuffle_mlp` only).
    projector_use_layernorm (`bool`, defaults to `True`): LayerNorm after the pixel unshuffle (`pixel_unshuffle_mlp`
        only), as Lfm2Vl's option of that name.
    image_token_id (`int`): id of the `<image>` token whose positions receive image features.
    vision_feature_layer (`int`, defaults to -1): which vision hidden state feeds the projector; -1 is the
        last one after SigLIP's post-layernorm, other values index `hidden_states`.
    freeze_vision (`bool`, defaults to `True`): keep the vision tower frozen (no gradients).
    """

    model_type = "n2eye"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="lfm2"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    projector_type: str = "mlp"
    projector_hidden_size: int | None = None
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    downsample_factor: int = 2
    projector_use_layernorm: bool = True
    image_token_id: int = 396
    vision_feature_layer: int = -1
    freeze_vision: bool = True
    tie_word_embeddings: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.text_config.model_type not in SUPPORTED_TEXT_MODEL_TYPES:
            raise ValueError(
                f"Unsupported language model type {self.text_config.model_type!r}; "
                f"N2-Eye supports {list(SUPPORTED_TEXT_MODEL_TYPES)} (LiquidAI LFM2 of any size)."
            )
        if self.vision_config.model_type not in SUPPORTED_VISION_MODEL_TYPES:
            raise ValueError(
                f"Unsupported vision model type {self.vision_config.model_type!r}; N2-Eye supports "
                f"{list(SUPPORTED_VISION_MODEL_TYPES)} (SigLIP, SigLIP2 fixed-resolution, SigLIP2 NaFlex)."
            )
        if self.projector_type not in SUPPORTED_PROJECTOR_TYPES:
            raise ValueError(
                f"Unknown projector_type {self.projector_type!r}; choose one of {list(SUPPORTED_PROJECTOR_TYPES)}."
            )
        if self.downsample_factor < 1:
            raise ValueError(f"downsample_factor must be >= 1, got {self.downsample_factor}.")
        if self.projector_hidden_size is None:
            self.projector_hidden_size = self.text_config.hidden_size
        # The vision tower's pooling head is never used (we take patch features), so it is not built.
        if hasattr(self.vision_config, "vision_use_head"):
            self.vision_config.vision_use_head = False

    @property
    def projector_factor(self) -> int:
        """Spatial merge factor of the projector: 1 for `mlp`, `downsample_factor` for pixel unshuffle."""
        return self.downsample_factor if self.projector_type == "pixel_unshuffle_mlp" else 1


__all__ = ["N2EyeConfig"]
