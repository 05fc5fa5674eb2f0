"""Weight-only int8 / int4 for the language model's linear layers and output head (CPU decode).

Why: CPU decoding is bound by memory traffic; every token reads every LM weight once. int8 halves the bytes of
bf16 and int4 quarters them, so decode gets faster by about that factor while activations stay in bf16.
The matmuls are PyTorch's own weight-only kernels (`torch._weight_int8pack_mm`, per output channel scales;
`torch._weight_int4pack_mm_for_cpu`, asymmetric groups along the input dimension). The vision tower and the
projector run once per image and stay as they are. Quantization changes numbers, so it is opt-in
(`n2eye.load(path, quantize="int8")`); `benchmarks/README.md` gives its logit error and speed.
"""

from __future__ import annotations

import torch
from torch import nn

BITS = ("int8", "int4")
INT4_GROUP = 64


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias with q int8 [out, in] and one bf16 scale per output channel."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("qweight", torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        self.dtype = dtype

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(self.dtype), self.qweight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """Asymmetric 4-bit groups of `group_size` input channels: w = q * scale + min, q in 0..15."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        out_f, in_f = linear.out_features, linear.in_features
        if in_f % group_size:
            raise ValueError(f"in_features {in_f} is not a multiple of the int4 group size {group_size}")
        groups = linear.weight.detach().float().reshape(out_f, in_f // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = (high - low).clamp(min=1e-8) / 15.0
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        self.in_features, self.out_features, self.group_size, self.dtype = in_f, out_f, group_size, dtype
        self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(q.reshape(out_f, in_f), 2))
        # The kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale; layout [groups, out, 2].
        self.register_buffer(
            "scales_and_zeros", torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous().to(dtype)
        )
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch._weight_int4pack_mm_for_cpu(
            x.reshape(-1, shape[-1]).to(self.dtype).contiguous(), self.qweight, self.group_size, self.scales_and_zeros
        )
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


def quantize_language_model(model: nn.Module, bits: str, group_size: int = INT4_GROUP) -> dict[str, int]:
    """Replaces the LM's nn.Linear layers and the output head in place; returns counts of what was replaced.

    A tied output head gets its own quantized copy (the embedding table stays for lookups). Layers whose shape
    the kernel can't take stay in their dtype and are counted as `kept`."""
    if bits not in BITS:
        raise ValueError(f"quantize must be one of {', '.join(BITS)}, got {bits!r}")
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("weight-only int8/int4 here uses PyTorch's CPU kernels; load the model on the CPU")
    root = model.get_language_model() if hasattr(model, "get_language_model") else model
    targets: list[tuple[nn.Module, str, nn.Linear]] = [
        (parent, name, child)
        for parent in root.modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        targets += [(model, name, child) for name, child in model.named_children() if child is head]
    counts = {"quantized": 0, "kept": 0}
    for parent, name, linear in targets:
        try:
            new = Int8Linear(linear) if bits == "int8" else Int4Linear(linear, group_size)
        except (RuntimeError, ValueError):
            counts["kept"] += 1
            continue
        setattr(parent, name, new)
        counts["quantized"] += 1
    model.n2eye_quantization = {"bits": bits, "group_size": group_size if bits == "int4" else None, **counts}
    return counts
