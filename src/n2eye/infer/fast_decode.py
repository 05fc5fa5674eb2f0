"""CPU decode fast paths built on our kernels (`n2eye.kernels`), for the two places where a decode step spends
more than the arithmetic needs.

- `FastShortConv` (exact, on by default in `n2eye.load`): LFM2's short convolution for one token as one fused op;
  transformers' fallback (no `causal_conv1d` on CPU) runs about eight tensor ops per conv layer and token, mostly
  per-op overhead. It rounds where transformers rounds: the same logits bit for bit, the same greedy tokens.
- `Bf16DecodeLinear` (opt-in: `n2eye.load(path, bf16_kernel=True)`): bf16 decode rows through an AVX-512 BF16
  matrix-vector kernel (`vdpbf16ps`, fp32 accumulation like PyTorch's). A decode step multiplies one activation
  row by every weight, so its speed is weight bytes over memory bandwidth; PyTorch's bf16 `linear` streams such a
  row well below it. Its sums run in another order than PyTorch's, so after rounding to bf16 most outputs are the
  same and the rest one bf16 step apart; through a deep model that can flip a near-tie in greedy decoding, which
  is why it is opt-in (benchmarks/README.md gives its speed and logit difference).

Prefill, batches over `MAX_ROWS` rows and anything that needs gradients keep the stock path; `N2EYE_KERNELS=0`
turns all of it off.
"""

from __future__ import annotations

import torch
from torch import nn

MAX_ROWS = 8


def _kernels():
    from ..kernels import gemv

    return gemv()


def bf16_decode_kernels():
    """The compiled kernels when this CPU can run the bf16 one, else None."""
    from ..kernels import cpu_flags

    kernels = _kernels()
    return kernels if kernels is not None and "avx512_bf16" in cpu_flags() else None


class Bf16DecodeLinear(nn.Linear):
    """An nn.Linear sharing the original's weight and bias (ties and state_dict keys unchanged) whose decode
    rows go through our kernel."""

    def __init__(self, linear: nn.Linear, kernels) -> None:
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self._kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > MAX_ROWS or x.dtype != torch.bfloat16 or (torch.is_grad_enabled() and self.weight.requires_grad):
            return super().forward(x)
        out = self._kernels.bf16_gemv(x.reshape(rows, self.in_features), self.weight)
        if self.bias is not None:
            out = out + self.bias
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def use_bf16_decode_kernel(model: nn.Module) -> int:
    """Swaps the LM's bf16 nn.Linear layers and output head (CPU) for `Bf16DecodeLinear`; returns how many.
    A no-op (0) where the kernel can't run or the model isn't bf16 on the CPU."""
    from .quantize import language_model_linears

    targets = [
        (parent, name, layer)
        for parent, name, layer in language_model_linears(model)
        if type(layer) is nn.Linear and layer.weight.dtype == torch.bfloat16 and layer.weight.device.type == "cpu"
        and layer.weight.is_contiguous()
    ]
    kernels = bf16_decode_kernels() if targets else None  # no bf16 layers: don't build the kernels
    if kernels is None:
        return 0
    for parent, name, layer in targets:
        setattr(parent, name, Bf16DecodeLinear(layer, kernels))
    return len(targets)


def _short_conv_class():
    from transformers.models.lfm2.modeling_lfm2 import Lfm2ShortConv, apply_mask_to_padding_states

    class FastShortConv(Lfm2ShortConv):
        """Lfm2ShortConv whose cached one-token step is one fused kernel call; everything else is transformers'."""

        def forward(self, hidden_states, past_key_values=None, attention_mask=None, **kwargs):
            if (
                hidden_states.shape[1] != 1
                or past_key_values is None
                or self.bias
                or hidden_states.device.type != "cpu"
                or past_key_values.is_recording_past(self.layer_idx)
                or (torch.is_grad_enabled() and self.conv.weight.requires_grad)
            ):
                return super().forward(hidden_states, past_key_values, attention_mask, **kwargs)
            state = past_key_values.get_conv_state(self.layer_idx, state_idx=0)
            if (
                state is None
                or not state.is_contiguous()
                or state.dtype != hidden_states.dtype
                or hidden_states.dtype == torch.float64  # the kernel sums in float32
            ):
                return super().forward(hidden_states, past_key_values, attention_mask, **kwargs)
            hidden_states = apply_mask_to_padding_states(hidden_states, attention_mask)
            mixed = _kernels().short_conv_decode(self.in_proj(hidden_states), state, self.conv.weight)
            return self.out_proj(mixed)

    return FastShortConv


def use_fast_short_conv(model: nn.Module) -> int:
    """Gives each LFM2 short-conv layer (CPU) the fused one-token step (the class swap keeps its parameters and
    state_dict as they are); returns how many. A no-op (0) where our kernels can't run."""
    try:
        from transformers.models.lfm2.modeling_lfm2 import Lfm2ShortConv
    except ImportError:
        return 0
    layers = [m for m in model.modules() if type(m) is Lfm2ShortConv and m.conv.weight.device.type == "cpu"]
    if not layers or _kernels() is None:
        return 0
    fast = _short_conv_class()
    for layer in layers:
        layer.__class__ = fast
    return len(layers)


def use_fast_decode(model: nn.Module, bf16_kernel: bool = False) -> dict[str, int]:
    """The exact fast path (fused short conv) and, with `bf16_kernel`, the bf16 kernel; returns how many layers
    each took (what `n2eye.load` does)."""
    return {"short_conv": use_fast_short_conv(model), "bf16_linear": use_bf16_decode_kernel(model) if bf16_kernel else 0}
