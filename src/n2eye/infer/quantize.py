"""Weight-only int8 / int4 for the language model's linear layers and output head (CPU decode).

Why: CPU decoding is bound by memory traffic; every token reads every LM weight once. int8 halves the bytes of
bf16 and int4 quarters them, so decode gets faster by about that factor while activations stay in bf16.
Decode rows go through our AVX-512 VNNI kernels (`n2eye.kernels`, activations quantized to int8 blocks on the
fly) where the CPU has them, else through PyTorch's weight-only kernels (`torch._weight_int8pack_mm`, per output
channel scales; `torch._weight_int4pack_mm_for_cpu`, asymmetric groups along the input dimension). The vision
tower and the projector run once per image and stay as they are. Quantization changes numbers, so it is opt-in
(`n2eye.load(path, quantize="int8")`); `benchmarks/README.md` gives its logit error and speed.
"""

from __future__ import annotations

import torch
from torch import nn

BITS = ("int8", "int4")
INT4_GROUP = 128  # our kernel's group; layers whose width it doesn't divide fall back to 64 or 32


FAST_MAX_ROWS = 8  # up to this many activation rows (decode, small batches) use the matrix-vector kernels


def _kernels():
    from ..kernels import gemv

    return gemv()


class Int8Linear(nn.Module):
    """y = x @ (q * scale).T + bias with q int8 [out, in] and one scale per output channel.

    With our kernels (`n2eye.kernels`, AVX-512 VNNI) q is stored offset to uint8 (q + 128, the unsigned operand
    `vpdpbusd` takes; flipping the sign bit in the loop instead cost 20% of its speed) and decode rows go through
    them. Prefill rows (more than `FAST_MAX_ROWS`) run one bf16 matrix product on q itself (its integers are exact
    in bf16), the per-channel scale applied to the output in float32: `torch._weight_int8pack_mm` ran a 512-token
    LFM2-1.2B prefill at about a tenth of bf16's speed, and dequantizing q * scale first cost as much as the product. Without our kernels, `torch._weight_int8pack_mm` takes the decode rows."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        self.in_features, self.out_features, self.dtype = linear.in_features, linear.out_features, dtype
        self.fast = _kernels() is not None and self.in_features % 32 == 0
        self.register_buffer("qweight", (q.to(torch.int16) + 128).to(torch.uint8) if self.fast else q)
        self.register_buffer("scale", scale if self.fast else scale.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as `dtype` [out, in]: q * scale, rounded once."""
        q = self.qweight.to(torch.int16) - 128 if self.fast else self.qweight
        return (q.float() * self.scale.float()[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if rows.shape[0] > FAST_MAX_ROWS:  # prefill: x @ q.T in bf16 (q's integers are exact there), then * scale
            q = self.qweight.to(self.dtype)
            if self.fast:
                q.sub_(128)  # in place: one bf16 copy of the weight per call, not two
            out = (nn.functional.linear(rows.to(self.dtype), q).float() * self.scale.float()).to(self.dtype)
        elif not self.fast:
            out = torch._weight_int8pack_mm(rows.to(self.dtype), self.qweight, self.scale)
        else:
            out = _kernels().int8_gemv(rows, self.qweight, self.scale).to(self.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


class Int4Linear(nn.Module):
    """Asymmetric 4-bit groups of `group_size` input channels: w = q * scale + min, q in 0..15.

    Our kernel takes groups of 128, 64 bytes each (low nibbles: the group's weights 0..63, high nibbles:
    64..127) with fp16 scale/min [out, groups]; otherwise the weights are packed for
    `torch._weight_int4pack_mm_for_cpu`."""

    def __init__(self, linear: nn.Linear, group_size: int = INT4_GROUP, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        out_f, in_f = linear.out_features, linear.in_features
        fitting = [g for g in (group_size, 64, 32) if g <= group_size and in_f % g == 0]
        if not fitting:
            raise ValueError(f"in_features {in_f} is not a multiple of the int4 group size {group_size} (nor of 32)")
        group_size = fitting[0]
        groups = linear.weight.detach().float().reshape(out_f, in_f // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = (high - low).clamp(min=1e-8) / 15.0
        q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32)
        self.in_features, self.out_features, self.group_size, self.dtype = in_f, out_f, group_size, dtype
        self.fast = _kernels() is not None and group_size == 128
        if self.fast:
            halves = q.to(torch.uint8).reshape(out_f, in_f // 128, 2, 64)
            self.register_buffer("qweight", (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(out_f, in_f // 2).contiguous())
            self.register_buffer("scales", scale.to(torch.float16).contiguous())
            self.register_buffer("mins", low.to(torch.float16).contiguous())
        else:
            self.register_buffer("qweight", torch._convert_weight_to_int4pack_for_cpu(q.reshape(out_f, in_f), 2))
            # The kernel computes (q - 8) * scale + zero, so zero = min + 8 * scale; layout [groups, out, 2].
            self.register_buffer(
                "scales_and_zeros", torch.stack([scale, low + 8 * scale], -1).transpose(0, 1).contiguous().to(dtype)
            )
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as `dtype` [out, in] (prefill runs one matmul on it in bf16: half the traffic of fp32)."""
        if not self.fast:
            return self._stock(torch.eye(self.in_features, dtype=self.dtype)).T.to(dtype)
        packed = self.qweight.reshape(self.out_features, self.in_features // 128, 1, 64)
        q = torch.cat([packed & 0x0F, packed >> 4], dim=2).reshape(self.out_features, -1, 128).to(dtype)
        w = torch.addcmul(self.mins.to(dtype)[..., None], q, self.scales.to(dtype)[..., None])
        return w.reshape(self.out_features, self.in_features)

    def _stock(self, rows: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(
            rows.to(self.dtype).contiguous(), self.qweight, self.group_size, self.scales_and_zeros
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows = x.reshape(-1, shape[-1])
        if not self.fast:
            out = self._stock(rows)
        elif rows.shape[0] <= FAST_MAX_ROWS:
            out = _kernels().int4_gemv(rows, self.qweight, self.scales, self.mins).to(self.dtype)
        else:
            out = nn.functional.linear(rows.to(self.dtype), self.dequantized(self.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)


def language_model_linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, layer) for every nn.Linear of the LM and the output head: what decode reads per token.
    The vision tower and projector run once per image and are left out."""
    root = getattr(model, "language_model", model)  # N2-Eye: the LFM2 body; a plain LM: itself
    found = [(p, name, c) for p in root.modules() for name, c in p.named_children() if isinstance(c, nn.Linear)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear):
        found += [(model, name, c) for name, c in model.named_children() if c is head]
    return found


def quantize_language_model(model: nn.Module, bits: str, group_size: int = INT4_GROUP) -> dict[str, int]:
    """Replaces the LM's nn.Linear layers and the output head in place; returns counts of what was replaced.

    A tied output head gets its own quantized copy (the embedding table stays for lookups). Layers whose shape
    the kernel can't take stay in their dtype and are counted as `kept`."""
    if bits not in BITS:
        raise ValueError(f"quantize must be one of {', '.join(BITS)}, got {bits!r}")
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("weight-only int8/int4 here uses PyTorch's CPU kernels; load the model on the CPU")
    targets = language_model_linears(model)
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
