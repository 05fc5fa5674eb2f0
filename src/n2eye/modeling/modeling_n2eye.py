"""N2-Eye model: SigLIP/SigLIP2 vision tower -> projector -> features at the `<image>` positions of LFM2.

Ships inside every checkpoint (``trust_remote_code=True``): imports only torch and transformers. The layout
(``model.vision_tower``, ``model.multi_modal_projector``, ``model.language_model``, ``lm_head``) follows
transformers' Lfm2Vl so a NaFlex + ``pixel_unshuffle_mlp`` checkpoint maps onto it unchanged.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, ModelOutput

from .configuration_n2eye import N2EyeConfig
from .packed_attention import PACKED_SDPA, PackedSegments


class N2EyeMultiModalProjector(nn.Module):
    """Maps a grid of vision features to LM embeddings: optional pixel unshuffle, LayerNorm, Linear-act-Linear."""

    def __init__(self, config: N2EyeConfig):
        super().__init__()
        self.factor = config.projector_factor
        in_channels = config.vision_config.hidden_size * self.factor**2
        use_layer_norm = self.factor > 1 and config.projector_use_layernorm
        self.layer_norm = nn.LayerNorm(in_channels) if use_layer_norm else None
        self.linear_1 = nn.Linear(in_channels, config.projector_hidden_size, bias=config.projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(config.projector_hidden_size, config.text_config.hidden_size, bias=config.projector_bias)

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        """grid: (batch, h, w, channels) -> (batch, tokens, lm_hidden)."""
        if self.factor > 1:
            grid = self.pixel_unshuffle(grid)
        if self.layer_norm is not None:
            grid = self.layer_norm(grid)
        hidden = self.linear_2(self.act(self.linear_1(grid)))
        return hidden.reshape(hidden.shape[0], -1, hidden.shape[-1])

    def pixel_unshuffle(self, grid: torch.Tensor) -> torch.Tensor:
        """Merge each factor x factor block into one vector (same channel order as Lfm2Vl). Odd grids
        (e.g. 27x27 for so400m-patch14-384) are zero-padded up to a multiple of the factor first."""
        f = self.factor
        b, h, w, c = grid.shape
        pad_h, pad_w = (-h) % f, (-w) % f
        if pad_h or pad_w:
            grid = nn.functional.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
            h, w = h + pad_h, w + pad_w
        grid = grid.reshape(b, h, w // f, c * f)
        grid = grid.permute(0, 2, 1, 3)
        grid = grid.reshape(b, w // f, h // f, c * f * f)
        return grid.permute(0, 2, 1, 3)


@dataclass
class N2EyeCausalLMOutputWithPast(ModelOutput):
    """Causal LM output plus the projected image features of this forward (if images were given)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor] | None = None
    attentions: tuple[torch.Tensor] | None = None
    image_hidden_states: torch.Tensor | None = None


@dataclass
class N2EyeModelOutputWithPast(BaseModelOutputWithPast):
    image_hidden_states: torch.Tensor | None = None


class N2EyePreTrainedModel(PreTrainedModel):
    config_class = N2EyeConfig
    config: N2EyeConfig
    base_model_prefix = "model"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _skip_keys_device_placement = ["past_key_values"]
    _no_split_modules = ["Lfm2DecoderLayer", "SiglipEncoderLayer", "Siglip2EncoderLayer"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Loading re-creates parameters (requires_grad=True), so the vision freeze is applied again here."""
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True
        base = model.model if hasattr(model, "model") else model
        if model.config.freeze_vision:
            base.vision_tower.requires_grad_(False)
        return loaded


class N2EyeModel(N2EyePreTrainedModel):
    """Vision tower + projector + LFM2 backbone (no LM head)."""

    def __init__(self, config: N2EyeConfig):
        super().__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = N2EyeMultiModalProjector(config)
        self.language_model = AutoModel.from_config(config.text_config)
        self.post_init()
        if config.freeze_vision:
            self.vision_tower.requires_grad_(False)

    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def encode_images(
        self,
        pixel_values: torch.Tensor,
        spatial_shapes: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Runs the vision tower and returns one (h, w, channels) feature grid per crop, in input order.

        Fixed resolution: pixel_values (n_crops, 3, H, W). SigLIP2 NaFlex: pixel_values (n_crops, patches, 3*p*p)
        with `spatial_shapes` (n_crops, 2) and `pixel_attention_mask` (n_crops, patches), as the processor returns
        them; crops with the same number of real patches run together with no padding. Why: a crop's features then
        never depend on what it was batched or padded with (SDPA's sums change in the last bits with the padded
        length), so cached features equal recomputed ones exactly, and no work goes into padding.
        """
        if spatial_shapes is None and self.config.vision_config.model_type == "siglip2_vision_model":
            raise ValueError(
                "This checkpoint's vision encoder is SigLIP2 NaFlex: its images need the processor's `spatial_shapes` "
                "and `pixel_attention_mask` too. Pass the processor's whole output (as the model's forward and "
                "generate take it), not `pixel_values` alone."
            )
        if spatial_shapes is None:
            feats = self._vision_features(pixel_values)
            n, tokens, c = feats.shape
            side = int(round(tokens**0.5))
            if side * side != tokens:
                raise ValueError(f"Vision tower returned {tokens} patch features per image, not a square grid.")
            return list(feats.reshape(n, side, side, c).unbind(0))
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        lengths = [h * w for h, w in shapes]
        if pixel_attention_mask is not None:
            real = pixel_attention_mask.sum(dim=1).tolist()
            if [int(r) for r in real] != lengths:
                raise ValueError(f"pixel_attention_mask marks {real} real patches per crop but spatial_shapes "
                                 f"{shapes} say {lengths}: pass the processor's output unchanged.")  # fmt: skip
        grids: list[torch.Tensor | None] = [None] * len(shapes)
        for length in sorted(set(lengths)):
            group = [i for i, n in enumerate(lengths) if n == length]
            index = torch.tensor(group, device=pixel_values.device)
            feats = self._vision_features(
                pixel_values[index, :length],
                spatial_shapes=spatial_shapes[index.to(spatial_shapes.device)],
                pixel_attention_mask=torch.ones(len(group), length, dtype=torch.int32, device=pixel_values.device),
            )
            for row, i in enumerate(group):
                grids[i] = feats[row, :length].reshape(*shapes[i], -1)
        return grids

    def _vision_features(self, pixel_values: torch.Tensor, **naflex) -> torch.Tensor:
        """The vision tower's patch features at `vision_feature_layer` (no gradients when the tower is frozen)."""
        tower_trainable = any(p.requires_grad for p in self.vision_tower.parameters())
        layer = self.config.vision_feature_layer
        with torch.set_grad_enabled(torch.is_grad_enabled() and tower_trainable):
            out = self.vision_tower(pixel_values=pixel_values.to(self.vision_tower.dtype), return_dict=True,
                                    output_hidden_states=layer != -1, **naflex)  # fmt: skip
            return out.last_hidden_state if layer == -1 else out.hidden_states[layer]

    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        spatial_shapes: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Projected features, one (tokens_i, lm_hidden) tensor per crop, in order (at fixed resolution one crop per
        image, or 5 with Idefics2-style splitting: the quadrants row-major, then the whole image)."""
        grids = self.encode_images(pixel_values, spatial_shapes, pixel_attention_mask)
        return self.project_grids(grids)

    def project_grids(self, grids: list[torch.Tensor]) -> list[torch.Tensor]:
        """Projects vision feature grids (e.g. from a feature cache) into LM embeddings."""
        proj_dtype = self.multi_modal_projector.linear_1.weight.dtype
        if grids and all(g.shape == grids[0].shape for g in grids):
            return list(self.multi_modal_projector(torch.stack(grids).to(proj_dtype)).unbind(0))
        return [self.multi_modal_projector(g.unsqueeze(0).to(proj_dtype))[0] for g in grids]

    def merge_image_features(
        self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor, image_features: list[torch.Tensor]
    ) -> torch.Tensor:
        """Writes the image features into the `<image>` positions, in order; counts must match exactly."""
        mask = input_ids == self.config.image_token_id
        n_positions = int(mask.sum())
        n_features = sum(int(f.shape[0]) for f in image_features)
        if n_positions != n_features:
            per_image = [int(f.shape[0]) for f in image_features]
            raise ValueError(
                f"Image features and image tokens do not match: the input has {n_positions} <image> positions but "
                f"the {len(image_features)} image(s) give {n_features} features (per image: {per_image}). Likely "
                "causes: a different number of images than <image> items in the conversation, text tokenized with "
                "the tokenizer instead of the processor (which expands each <image> to the image's token count), "
                "or truncation that cut an image block."
            )
        feats = torch.cat(image_features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(mask.unsqueeze(-1).to(inputs_embeds.device), feats)

    def packed_masks(
        self, allowed: torch.Tensor, token_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
    ) -> dict:
        """Per-layer-type masks for packed samples: for attention the block-diagonal (batch, 1, q, k) mask
        (boolean for SDPA/flex, additive for eager) or, with ``n2eye_packed_sdpa``, where each sample sits (its
        attention then runs per sample); and the 2D token mask that zeroes gaps before each conv."""
        implementation = self.config.text_config._attn_implementation
        if implementation == PACKED_SDPA and token_mask is not None and position_ids is not None:
            return {"full_attention": PackedSegments.from_positions(position_ids, token_mask), "conv": token_mask}
        if implementation == "eager":
            dtype = self.language_model.dtype
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
                ~allowed, torch.finfo(dtype).min
            )
        return {"full_attention": allowed, "conv": token_mask}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        spatial_shapes: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        vision_features: list[torch.Tensor] | None = None,
        packed_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> N2EyeModelOutputWithPast:
        """`vision_features`: precomputed vision-tower grids (one (h, w, c) tensor per crop, e.g. from a feature
        cache) used instead of `pixel_values`; the projector still runs, so it can train."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if pixel_values is not None and vision_features is not None:
            raise ValueError("Pass either pixel_values or precomputed vision_features, not both.")
        image_features = None
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            n_image_tokens = int((input_ids == self.config.image_token_id).sum())
            if vision_features is not None:
                image_features = self.project_grids(list(vision_features))
            elif pixel_values is not None:
                image_features = self.get_image_features(pixel_values, spatial_shapes, pixel_attention_mask)
            if image_features is not None:
                inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features)
            elif n_image_tokens:
                raise ValueError(
                    f"input_ids contain {n_image_tokens} <image> tokens but no pixel_values were given. Build the "
                    "inputs with the processor (AutoProcessor / N2EyeProcessor.apply_chat_template with the images), "
                    "not the tokenizer alone, and pass pixel_values to the model."
                )
        if packed_attention_mask is not None:
            attention_mask = self.packed_masks(packed_attention_mask, attention_mask, position_ids)
        outputs = self.language_model(
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        return N2EyeModelOutputWithPast(
            last_hidden_state=outputs.last_hidden_state,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=torch.cat(image_features, 0) if image_features else None,
        )


class N2EyeForConditionalGeneration(N2EyePreTrainedModel, GenerationMixin):
    """The N2-Eye chat model: `AutoModelForCausalLM` / `AutoModelForImageTextToText` / `AutoModel` entry point."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}

    def __init__(self, config: N2EyeConfig):
        super().__init__(config)
        self.model = N2EyeModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.lm_head = value

    @property
    def vision_tower(self) -> nn.Module:
        return self.model.vision_tower

    @property
    def multi_modal_projector(self) -> nn.Module:
        return self.model.multi_modal_projector

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    def get_image_features(self, pixel_values, spatial_shapes=None, pixel_attention_mask=None) -> list[torch.Tensor]:
        return self.model.get_image_features(pixel_values, spatial_shapes, pixel_attention_mask)

    def prepare_inputs_for_generation(self, *args, is_first_iteration: bool | None = False, **kwargs):
        """Like pixel_values, precomputed vision_features only go in on the prefill step when caching."""
        inputs = super().prepare_inputs_for_generation(*args, is_first_iteration=is_first_iteration, **kwargs)
        if not is_first_iteration and kwargs.get("use_cache", True):
            inputs.pop("vision_features", None)
        return inputs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        spatial_shapes: torch.Tensor | None = None,
        pixel_attention_mask: torch.Tensor | None = None,
        vision_features: list[torch.Tensor] | None = None,
        packed_attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> N2EyeCausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            spatial_shapes=spatial_shapes,
            pixel_attention_mask=pixel_attention_mask,
            vision_features=vision_features,
            packed_attention_mask=packed_attention_mask,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        loss = None
        if labels is not None and self.training and isinstance(logits_to_keep, int) and logits_to_keep == 0:
            loss, logits = self._loss_on_labelled_positions(hidden_states, labels, **kwargs)
        else:
            if isinstance(logits_to_keep, int) and logits_to_keep > 0:
                hidden_states = hidden_states[:, -logits_to_keep:, :]
            elif isinstance(logits_to_keep, torch.Tensor):
                hidden_states = hidden_states[:, logits_to_keep, :]
            logits = self.lm_head(hidden_states)
            if labels is not None:
                loss = self.loss_function(
                    logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs
                )
        return N2EyeCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
        )

    def _loss_on_labelled_positions(
        self, hidden_states: torch.Tensor, labels: torch.Tensor, shift_labels: torch.Tensor | None = None, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss from the logits of labelled positions only: in chat SFT most tokens (system, user turns,
        images) carry no label, and the output head (and its logits: seq x vocab floats, 512 MB per 2048-token row
        of LFM2's 65k vocabulary) is the widest layer. Same loss as `loss_function` on all logits; the returned
        logits are the labelled positions' only, shape (n_labelled, vocab), so this runs in training mode only."""
        if shift_labels is None:
            shift_labels = nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
        keep = shift_labels != -100
        logits = self.lm_head(hidden_states[keep])
        loss = self.loss_function(
            logits=logits, labels=None, shift_labels=shift_labels[keep], vocab_size=self.config.text_config.vocab_size,
            **kwargs,
        )  # fmt: skip
        return loss, logits


__all__ = ["N2EyeForConditionalGeneration", "N2EyeModel", "N2EyePreTrainedModel"]
