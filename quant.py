"""8-bit weights for the block linears of the DiT and the T5-Gemma encoder (`--quant int8|fp8`).

No official counterpart: upstream only runs bf16. The community asks for fp8/int8 builds because a
bf16 DiT (30.6 GB) plus the bf16 text encoder (18.5 GB) does not fit a 24 GB card.

What is quantized: every linear inside `layers.<i>.` (the DiT's four expert linears per layer,
the encoder's seven projections per layer), i.e. >99% of both networks' weights. Embedders, output
heads, norms and the encoder's token embedding stay as they are (small, or precision-critical).
Each weight row (output channel; with 3 experts stacked on dim 0, each expert's rows) gets its own
scale s = max|w_row| / qmax:

    int8  q = round(w / s) in [-127, 127]           (weight-only: activations stay bf16)
    fp8   q = float8_e4m3fn(w / s), |q| <= 448

The forward dequantises on the fly: y = (x @ q^T) * s, with q cast to the compute dtype (exact:
int8 and e4m3 values are all bf16 numbers) and the per-channel scale applied to the output, so a
bf16 copy of one linear's weight lives only for the duration of its GEMM. This is one path for
every device; the fp8 tensor-core GEMM on H100 (torch._scaled_mm, which also needs fp8
activations) is not wired up or measured here: no GPU was lent to the session that wrote this.

Why hand-written and not torchao: torchao 0.18.0 (the release for torch 2.13) installs and its
int8/fp8 weight-only configs run on CPU, but (1) its quantized weight is a tensor subclass without
`split`/`chunk`, which the 3-expert linears need (`aten.split` is unimplemented for Int8Tensor),
(2) safetensors cannot store the subclass, so the saved-quantized checkpoint would need pickles
(we only unpickle with weights_only=True) or our own unpacking anyway, and (3) importing it on a
CPU machine prints failed loads of its CUDA extensions. The ~60 lines below use only torch.

State-dict keys: a quantized linear keeps the official `<name>.weight` key (now int8 / fp8) and
adds `<name>.weight_scale` (float32, one per output row). load_weights.py reads either form into
either kind of model: a float checkpoint is quantized tensor by tensor as it is read, a
saved-quantized one is dequantized if a float model asks for it.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("none", "int8", "fp8")
STORAGE = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}  # e4m3fn's largest finite value is 448
SCALE_SUFFIX = "_scale"  # `<linear>.weight` -> `<linear>.weight_scale`

# A block linear: any 2-D weight under `layers.<i>.` (DiT `block.layers.3.mlp.down_proj.weight`,
# encoder `model.encoder.layers.3.self_attn.q_proj.weight`); norms under layers are 1-D.
_BLOCK = re.compile(r"(^|\.)layers\.\d+\.")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"quant must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def mode_of(dtype: torch.dtype) -> str | None:
    """'int8' / 'fp8' for a quantized weight's storage dtype, None for a float weight."""
    return next((m for m, d in STORAGE.items() if d == dtype), None)


def is_block_linear_weight(name: str, shape) -> bool:
    """Is checkpoint key `name` (of this shape) a weight the quant modes store in 8 bits?"""
    return name.endswith(".weight") and len(shape) == 2 and _BLOCK.search(name) is not None


@torch.no_grad()
def quantize_weight(w: torch.Tensor, mode: str, rows_per_chunk: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] (any float dtype) -> (q [out, in] int8/fp8, scale [out] float32).

    Works through `rows_per_chunk` rows at a time, so the float32 temporary is a few MB-GB slice,
    never a float32 copy of a whole 27k x 5120 weight."""
    q = torch.empty(w.shape, dtype=STORAGE[mode], device=w.device)
    scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
    for r in range(0, w.shape[0], rows_per_chunk):
        part = w[r:r + rows_per_chunk].to(torch.float32, copy=True)  # [rows, in]; own copy (changed in place)
        lo, hi = torch.aminmax(part, dim=1)  # max |w| without an |w| temporary
        s = torch.maximum(hi, -lo) / QMAX[mode]  # [rows]
        s = torch.where(s > 0, s, torch.ones_like(s))  # an all-zero row: any scale, q = 0
        part.div_(s[:, None])
        if mode == "int8":
            part.round_()
        part.clamp_(-QMAX[mode], QMAX[mode])
        q[r:r + rows_per_chunk].copy_(part)
        scale[r:r + rows_per_chunk] = s
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


class QuantLinear(nn.Module):
    """Drop-in for model.ExpertLinear (1 or 3 stacked experts, `forward(x, sizes)`) and for a
    bias-free or biased nn.Linear (`forward(x)`), with an 8-bit weight and per-row float32 scales.

    `compute_dtype` is the dtype the float layer computed in (bf16 as released, float32 on the exact
    path): inputs are cast to it and outputs come back in it, as ExpertLinear's do. Weight and scale
    are frozen Parameters, so `.to(device)`, layer streaming and `named_parameters` treat them like
    the float weights they replace.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int = 1, mode: str = "int8",
                 compute_dtype=torch.bfloat16, bias: bool = False, device=None):
        super().__init__()
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.mode, self._compute_dtype = mode, compute_dtype
        rows = out_features * num_experts
        self.weight = nn.Parameter(torch.empty(rows, in_features, dtype=STORAGE[mode], device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(rows, dtype=torch.float32, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(rows, dtype=compute_dtype, device=device), requires_grad=False) if bias else None

    @property
    def compute_dtype(self) -> torch.dtype:
        return self._compute_dtype

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, experts={self.num_experts}, {self.mode} -> {self._compute_dtype}"

    def _mm(self, x, q, s, b):
        # int8 and e4m3 values are exact in bf16/fp32; the per-row scale commutes with the GEMM.
        y = F.linear(x, q.to(x.dtype)) * s
        y = y.to(x.dtype)
        return y + b if b is not None else y

    def forward(self, x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        x = x.to(self._compute_dtype)
        if self.num_experts == 1:
            return self._mm(x, self.weight, self.weight_scale, self.bias)
        qs = self.weight.chunk(self.num_experts, dim=0)
        ss = self.weight_scale.chunk(self.num_experts, dim=0)
        bs = self.bias.chunk(self.num_experts, dim=0) if self.bias is not None else [None] * self.num_experts
        parts = x.split(sizes, dim=1)  # one modality's rows per expert (video, audio, text)
        return torch.cat([self._mm(p, qs[e], ss[e], bs[e]) for e, p in enumerate(parts)], dim=1)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) would cast fp8 weights (a floating dtype) and the scales without each
        # other: refuse rather than compute garbage. Device moves go through unchanged.
        before = (self.weight.dtype, self.weight_scale.dtype)
        out = super()._apply(fn, recurse)
        if (self.weight.dtype, self.weight_scale.dtype) != before:
            raise TypeError("a quantized linear cannot change dtype: cast the model before quantizing it")
        return out


def quantize_modules(model: nn.Module, mode: str) -> nn.Module:
    """Swap every block linear of `model` (DiT or T5-Gemma encoder) for a QuantLinear, in place.

    On the meta device (the loaders' path) this only builds the 8-bit slots, which the checkpoint
    then fills; on a real device the current float weights are quantized (tiny random models,
    benchmarks). The module's own code is untouched: it only reads `compute_dtype` and calls forward.
    """
    check_mode(mode)
    if mode == "none":
        return model
    targets = [(name, m) for name, m in model.named_modules()
               if hasattr(m, "weight") and isinstance(m.weight, torch.Tensor) and not isinstance(m, QuantLinear)
               and is_block_linear_weight(name + ".weight", m.weight.shape)]
    for name, m in targets:
        num_experts = getattr(m, "num_experts", 1)
        out_features = m.weight.shape[0] // num_experts
        has_bias = getattr(m, "bias", None) is not None
        q = QuantLinear(m.weight.shape[1], out_features, num_experts, mode, m.weight.dtype, has_bias, device=m.weight.device)
        if m.weight.device.type != "meta":
            qw, s = quantize_weight(m.weight.detach(), mode)
            q.weight.data, q.weight_scale.data = qw, s
            if has_bias:
                q.bias.data = m.bias.detach().clone()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)
    return model


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters + buffers of a built module (meta tensors count their nbytes too):
    {"block linears": ..., "other": ..., "total": ...}."""
    block = other = 0
    named = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in named:
        nb = t.numel() * t.element_size()
        if is_block_linear_weight(name, t.shape) or name.endswith(".weight" + SCALE_SUFFIX):
            block += nb
        else:
            other += nb
    return {"block linears": block, "other": other, "total": block + other}
