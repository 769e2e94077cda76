"""The daVinci-MagiHuman diffusion transformer: one token sequence, plain self-attention, 15B.

Mirrors the official `inference/model/dit/dit_module.py` (the modules) and the packing half of
`inference/pipeline/data_proxy.py` (tokens, coordinates, local-attention ranges, unpacking) of
GAIR-NLP/daVinci-MagiHuman.

The whole model in a few lines:
- Video latents [48, T, h, w] become tokens of 2x2 patches (192 features), audio latents [N, 64] are
  one token per frame, text features [n, 3584] one token per T5-Gemma token. They are packed into ONE
  sequence  [video | audio | text]  and every layer is plain self-attention over all of it: there is
  no cross-attention.
- "Sandwich" experts: the first and last 4 layers (`mm_layers`) hold three copies of every weight,
  one per modality (video, audio, text, stacked along dim 0); the 32 middle layers share one.
- No timestep input at all: the network infers the noise level from the latents themselves.
- Each attention head has a sigmoid gate (one scalar per token and head) computed by the same
  projection as q, k and v.
- Positions: an element-wise Fourier RoPE over (time, row, column) on 96 of the 128 head dims.

Dimension letters: B batch, L packed sequence length, D hidden size, H query heads, G kv heads
(query groups), d head dim, T latent frames, h/w latent height/width, C channels.

Numerics (those of the official module's dtypes and casts): the residual stream, norms, RoPE,
activations and gates are float32; block linears hold bf16 weights and run bf16 GEMMs; attention
runs on bf16 q/k/v. With
`block_dtype=torch.float32` every one of those bf16 casts becomes float32 (the "out32" reference).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

PATCH = 2  # spatial patch size; the temporal patch size is 1 (DataProxyConfig)

# ==================================================================================================
# Configuration
# ==================================================================================================


@dataclass
class DiTConfig:
    """The official `ModelConfig` fields (defaults = the released 15B model's config), plus the two
    data-proxy settings that change what the network computes (`coords_style`,
    `frame_receptive_field`)."""

    num_layers: int = 40
    hidden_size: int = 5120
    head_dim: int = 128
    num_query_groups: int = 8  # kv heads (GQA): 40 query heads share 8 kv heads
    video_in_channels: int = 192  # 48 latent channels x 2x2 patch
    audio_in_channels: int = 64
    text_in_channels: int = 3584  # T5-Gemma-9B encoder width
    mm_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 36, 37, 38, 39])
    gelu7_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    local_attn_layers: list[int] = field(default_factory=list)
    post_norm_layers: list[int] = field(default_factory=list)
    enable_attn_gating: bool = True
    # Data-proxy settings: "v2" for base/distill, "v1" for the SR models (only the text RoPE differs).
    coords_style: str = "v2"
    frame_receptive_field: int = 11  # local layers: video sees latent frames within +-11

    @property
    def num_heads_q(self) -> int:
        return self.hidden_size // self.head_dim

    @property
    def num_heads_kv(self) -> int:
        return self.num_query_groups

    @property
    def latent_channels(self) -> int:
        return self.video_in_channels // (PATCH * PATCH)

    def __post_init__(self):
        if self.hidden_size % self.head_dim or self.num_heads_q % self.num_heads_kv:
            raise ValueError(
                f"hidden_size {self.hidden_size} / head_dim {self.head_dim} must give a whole number of "
                f"query heads divisible by num_query_groups {self.num_query_groups}"
            )
        if self.coords_style not in ("v1", "v2"):
            raise ValueError(f"coords_style must be 'v1' or 'v2', got {self.coords_style!r}")
        for name in ("mm_layers", "gelu7_layers", "local_attn_layers", "post_norm_layers"):
            bad = [i for i in getattr(self, name) if not 0 <= i < self.num_layers]
            if bad:
                raise ValueError(f"{name} has layer indices outside 0..{self.num_layers - 1}: {bad}")
        if self.local_attn_layers and self.frame_receptive_field < 0:
            raise ValueError("local_attn_layers need frame_receptive_field >= 0")


# 1080p SR (env SR2_1080 upstream): every layer is local except every 4th of the first 32.
SR_1080P_LOCAL_LAYERS = [i for i in range(40) if not (i % 4 == 3 and i < 32)]

# The released models: one network; SR differs only in coords style and (1080p) local attention.
DIT_PRESETS = {
    "base": DiTConfig(),
    "distill": DiTConfig(),
    "540p_sr": DiTConfig(coords_style="v1"),
    "1080p_sr": DiTConfig(coords_style="v1", local_attn_layers=SR_1080P_LOCAL_LAYERS),
    # Not released: a few-MB model with the same structure, for --tiny-random runs and tests.
    "tiny": DiTConfig(
        num_layers=4, hidden_size=128, head_dim=32, num_query_groups=2, text_in_channels=48,
        mm_layers=[0, 3], gelu7_layers=[0],
    ),
}


def dit_config(name: str, **overrides) -> DiTConfig:
    """A preset by name (`base`, `distill`, `540p_sr`, `1080p_sr`, `tiny`), optionally changed."""
    if name not in DIT_PRESETS:
        raise ValueError(f"unknown DiT preset {name!r}; choose from {sorted(DIT_PRESETS)}")
    return replace(DIT_PRESETS[name], **overrides)


# ==================================================================================================
# Building blocks: expert norms and linears
# ==================================================================================================


class ExpertRMSNorm(nn.Module):
    """`MultiModalityRMSNorm`: float32 RMSNorm with weights stored as deltas, y = x̂ · (1 + w).

    With 3 experts the weight is [3·dim] (video | audio | text) and each modality's rows of the
    sequence get their own slice. `sizes` splits the sequence dim (dim 1) into those rows.
    """

    def __init__(self, dim: int, num_experts: int = 1, eps: float = 1e-6):
        super().__init__()
        self.dim, self.num_experts, self.eps = dim, num_experts, eps
        # Zero-initialised deltas, as upstream (an un-loaded norm is the identity gain).
        self.weight = nn.Parameter(torch.zeros(dim * num_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        t = x.float()
        t = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.num_experts == 1:
            t = t * (1 + self.weight)
        else:
            # Each modality's block of rows gets its own (1 + w_e); the splits are views, no copy.
            w = (1 + self.weight).view(self.num_experts, self.dim)  # [3, dim]
            t = torch.cat([part * w[e] for e, part in enumerate(t.split(sizes, dim=1))], dim=1)
        return t.to(x.dtype)  # back to the input dtype, as upstream


class ExpertLinear(nn.Module):
    """`BaseLinear` / `NativeMoELinear`: a bias-free linear with 1 or 3 experts stacked on dim 0.

    The output has the dtype of the GEMM (the weight's dtype): upstream casts the input to bf16 and
    returns the bf16 product, and every call site then casts as it needs.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int = 1, dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.num_experts = in_features, out_features, num_experts
        self.weight = nn.Parameter(torch.empty(out_features * num_experts, in_features, dtype=dtype))

    @property
    def compute_dtype(self) -> torch.dtype:
        """The GEMM's dtype, which the call sites cast to (a drop-in with 8-bit storage has its own)."""
        return self.weight.dtype

    def forward(self, x: torch.Tensor, sizes: list[int] | None = None) -> torch.Tensor:
        x = x.to(self.weight.dtype)
        if self.num_experts == 1:
            return F.linear(x, self.weight)
        # Expert e = modality e multiplies its own [out, in] chunk (video, audio, text order).
        chunks = self.weight.chunk(self.num_experts, dim=0)
        return torch.cat([F.linear(part, chunks[e]) for e, part in enumerate(x.split(sizes, dim=1))], dim=1)


def swiglu7(u: torch.Tensor) -> torch.Tensor:
    """Clamped SwiGLU with the GPT-OSS +1 on the linear branch; float32 math, as upstream."""
    u = u.float()
    # Interleaved split: even columns are the gate, odd columns the linear branch (not halves).
    gate, lin = u[..., 0::2], u[..., 1::2]
    gate = gate.clamp(max=7.0)  # upper clamp only on the gate
    lin = lin.clamp(-7.0, 7.0)
    return gate * torch.sigmoid(1.702 * gate) * (lin + 1)


def gelu7(u: torch.Tensor) -> torch.Tensor:
    """The un-gated variant of the first layers: z·σ(1.702 z) with z = min(u, 7); no +1."""
    z = u.float().clamp(max=7.0)
    return z * torch.sigmoid(1.702 * z)


def swiglu7_intermediate(hidden_size: int) -> int:
    # int(H·4·2/3) rounded down to a multiple of 4: 13652 for H = 5120 (the released MLP width).
    return int(hidden_size * 4 * 2 / 3) // 4 * 4


# ==================================================================================================
# Rotary position embedding (element-wise Fourier RoPE)
# ==================================================================================================


class ElementWiseFourierEmbed(nn.Module):
    """coords [L, 9] -> rope [L, 2·3·nb] = [sin_t sin_h sin_w | cos_t cos_h cos_w], nb = head_dim/8.

    The 9 columns are (position t, h, w | grid size S_t, S_h, S_w | reference size R_t, R_h, R_w).
    """

    def __init__(self, head_dim: int):
        super().__init__()
        nb = head_dim // 8
        # ω_k = 1/10000^(k/nb). A persistent buffer: the checkpoint's values win over this formula
        # (they may be bf16-rounded in the release), so always load it from the file.
        self.register_buffer("bands", 1.0 / 10000.0 ** (torch.arange(nb, dtype=torch.float32) / nb))

    def forward(self, coords: torch.Tensor) -> torch.Tensor:
        # (p - c)·s, then ·ω in exactly this order (float32 rounding matters for the tight goldens).
        angle = rope_positions(coords).unsqueeze(-1) * self.bands  # [..., L, 3, nb]
        return torch.cat([angle.sin(), angle.cos()], dim=-2).flatten(-2)  # [..., L, 6·nb]


def rope_positions(coords: torch.Tensor) -> torch.Tensor:
    """coords [..., L, 9] -> the effective (t, h, w) positions [..., L, 3] that RoPE rotates by:
    (position - centre) · (reference - 1) / (size - 1), rows and columns centred, time not."""
    pos, size, ref = coords[..., 0:3], coords[..., 3:6], coords[..., 6:9]  # [..., L, 3] each
    scale = (ref - 1) / (size - 1)
    # 0/0 where a block is a single position on an axis with a reference of 1: scale 1 there.
    scale = torch.where((ref == 1) & (size == 1), torch.ones_like(scale), scale)
    if not torch.isfinite(scale).all():
        raise ValueError("RoPE scale is not finite (v1 coordinates need at least 2 text tokens)")
    center = (size - 1) / 2
    center[..., 0] = 0  # time is never centered; rows and columns are
    return (pos - center) * scale


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first 6·nb dims of every head (96 of 128); the rest pass through.

    x [B, L, heads, d], rope [B, L, 6·nb] from ElementWiseFourierEmbed (sin half first).
    """
    sin, cos = rope.unsqueeze(-2).chunk(2, dim=-1)  # [B, L, 1, 3·nb] each
    sin, cos = torch.cat([sin, sin], dim=-1), torch.cat([cos, cos], dim=-1)  # [c, c]: cat, not interleave
    n = sin.shape[-1]
    xr, rest = x[..., :n], x[..., n:]
    x1, x2 = xr.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)  # rotate_half pairs j with j + 3·nb
    return torch.cat([xr * cos + rotated * sin, rest], dim=-1)


# ==================================================================================================
# Attention masks: local attention and batch padding
# ==================================================================================================


@dataclass
class SeqLayout:
    """Where things are in one packed sequence [video Nv | audio Na | text Nt | padding].

    Samples of a batch share Nv and Na; text lengths may differ, so shorter samples are padded to
    the longest and `kv_len` holds each sample's true length (None when nobody is padded).
    """

    num_video: int
    num_audio: int
    num_text: int  # the longest text in the batch
    tokens_per_frame: int
    kv_len: list[int] | None = None

    @property
    def length(self) -> int:
        return self.num_video + self.num_audio + self.num_text

    @property
    def sizes(self) -> list[int]:
        """Rows of each modality (video, audio, text), in order: how the expert ops split dim 1."""
        return [self.num_video, self.num_audio, self.num_text]

    def frame_ids(self, device=None) -> torch.Tensor:
        """Latent frame of every token; -1 for audio/text (they see and are seen by everything)."""
        idx = torch.arange(self.length, device=device)
        return torch.where(idx < self.num_video, idx // self.tokens_per_frame, -1)


def dense_attn_mask(layout: SeqLayout, receptive_field: int | None, device=None) -> torch.Tensor | None:
    """Boolean SDPA mask [B or 1, 1, L, L] (True = attend), or None when every pair attends.

    Local (`calc_local_qk_range` in data_proxy.py): video frame i sees video frames within
    ±receptive_field plus all audio and text; audio and text see everything. Same as the official
    q/k range pairs, as a dense predicate.
    """
    mask = None
    if receptive_field is not None:
        f = layout.frame_ids(device)
        fq, fk = f[:, None], f[None, :]
        mask = ((fq < 0) | (fk < 0) | ((fq - fk).abs() <= receptive_field))[None, None]  # [1, 1, L, L]
    if layout.kv_len is not None:
        keys_ok = torch.arange(layout.length, device=device)[None, :] < torch.tensor(layout.kv_len, device=device)[:, None]
        keys_ok = keys_ok[:, None, None, :]  # [B, 1, 1, L]
        mask = keys_ok if mask is None else (mask & keys_ok)
    return mask


def flex_block_mask(layout: SeqLayout, receptive_field: int | None, batch: int, device):
    """The same predicate as `dense_attn_mask`, as a FlexAttention BlockMask (block-sparse: the
    kernel skips the 128x128 tiles a 1080p local layer never looks at)."""
    frame = layout.frame_ids(device)
    kv_len = torch.tensor(layout.kv_len or [layout.length] * batch, device=device)
    R = -1 if receptive_field is None else receptive_field

    def mask_mod(b, h, q, k):
        fq, fk = frame[q], frame[k]
        local = (R < 0) | (fq < 0) | (fk < 0) | ((fq - fk).abs() <= R)
        return local & (k < kv_len[b])

    L = layout.length
    return create_block_mask(mask_mod, batch, None, L, L, device=device)


def attention_masks(layout: SeqLayout, receptive_field: int | None, batch: int, device, use_flex: bool):
    """(mask of the full layers, mask of the local layers), built once per shape, outside the layers.
    `receptive_field` None: the model has no local layers.

    None means "every pair attends" and takes the plain SDPA path (flash attention on GPU). Masks
    are FlexAttention BlockMasks when `use_flex` (GPU), dense boolean SDPA masks otherwise (CPU).
    """
    build = (lambda R: flex_block_mask(layout, R, batch, device)) if use_flex else (
        lambda R: dense_attn_mask(layout, R, device))
    full = None if layout.kv_len is None else build(None)
    return full, None if receptive_field is None else build(receptive_field)


# The FlexAttention kernel per device type, chosen at the first call on that type: compiled on GPU
# (eager flex would materialise the whole score matrix), eager on CPU (where compiling buys nothing).
_FLEX_KERNELS: dict = {}


def attention(q, k, v, mask=None):
    """softmax(q kᵀ/√d) v with GQA (query head n uses kv head n // (H/G)), non-causal.

    q [B, H, L, d], k/v [B, G, L, d] -> [B, H, L, d]. `mask` is None, a boolean SDPA mask or a
    FlexAttention BlockMask (see `attention_masks`); all three compute the same function.
    """
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    if isinstance(mask, torch.Tensor):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    kernel = _FLEX_KERNELS.get(q.device.type)
    if kernel is None:
        kernel = torch.compile(flex_attention, dynamic=False) if q.is_cuda else flex_attention
        _FLEX_KERNELS[q.device.type] = kernel
    return kernel(q, k, v, block_mask=mask, enable_gqa=True)


# ==================================================================================================
# Transformer layer: gated GQA attention + clamped MLP, each with 1 or 3 experts
# ==================================================================================================


class Attention(nn.Module):
    """Pre-norm, fused q|k|v|gate projection, q/k RMSNorm, RoPE, GQA attention, sigmoid gate, proj."""

    def __init__(self, cfg: DiTConfig, num_experts: int, local: bool, dtype):
        super().__init__()
        D, d = cfg.hidden_size, cfg.head_dim
        self.H, self.G, self.d = cfg.num_heads_q, cfg.num_heads_kv, d
        self.gate_size = self.H if cfg.enable_attn_gating else 0
        self.local = local
        self.pre_norm = ExpertRMSNorm(D, num_experts)
        # Per expert the rows are [q H·d | k G·d | v G·d | gate H] (7208 rows in the release).
        self.linear_qkv = ExpertLinear(D, self.H * d + 2 * self.G * d + self.gate_size, num_experts, dtype)
        self.linear_proj = ExpertLinear(self.H * d, D, num_experts, dtype)
        self.q_norm = ExpertRMSNorm(d, num_experts)  # per head, one weight shared by all heads
        self.k_norm = ExpertRMSNorm(d, num_experts)

    def forward(self, x, rope, sizes: list[int], mask, attn_fn=attention):
        B, L, _ = x.shape
        cdt = self.linear_qkv.compute_dtype  # bf16 on the official path, float32 on the exact path
        qkv = self.linear_qkv(self.pre_norm(x, sizes).to(cdt), sizes).float()  # [B, L, H·d + 2·G·d + H]
        q, k, v, g = qkv.split([self.H * self.d, self.G * self.d, self.G * self.d, self.gate_size], dim=-1)
        q = self.q_norm(q.view(B, L, self.H, self.d), sizes)  # [B, L, H, d]
        k = self.k_norm(k.view(B, L, self.G, self.d), sizes)  # [B, L, G, d]
        v = v.view(B, L, self.G, self.d)  # v is not normalised
        q, k = apply_rope(q, rope), apply_rope(k, rope)  # float32, q and k only
        q, k, v = (t.to(cdt).transpose(1, 2) for t in (q, k, v))  # B L H d -> B H L d
        out = attn_fn(q, k, v, mask)
        out = out.transpose(1, 2)  # B H L d -> B L H d
        if self.gate_size:
            out = out * torch.sigmoid(g).unsqueeze(-1)  # one gate per token and head; float32 product
        out = out.reshape(B, L, self.H * self.d).to(cdt)  # head-major, as the proj weight expects
        return self.linear_proj(out, sizes)  # stays in the GEMM dtype (bf16), added to fp32 residual


class MLP(nn.Module):
    """Pre-norm, up projection, gelu7 (no gate) or interleaved swiglu7, down projection."""

    def __init__(self, cfg: DiTConfig, num_experts: int, gelu7_layer: bool, dtype):
        super().__init__()
        D = cfg.hidden_size
        inner = 4 * D if gelu7_layer else swiglu7_intermediate(D)
        up = inner if gelu7_layer else 2 * inner  # swiglu7 needs gate and linear columns
        self.act = gelu7 if gelu7_layer else swiglu7
        self.pre_norm = ExpertRMSNorm(D, num_experts)
        self.up_gate_proj = ExpertLinear(D, up, num_experts, dtype)
        self.down_proj = ExpertLinear(inner, D, num_experts, dtype)

    def forward(self, x, sizes: list[int]):
        cdt = self.up_gate_proj.compute_dtype
        u = self.up_gate_proj(self.pre_norm(x, sizes).to(cdt), sizes)
        a = self.act(u).to(cdt)  # activation in float32, fed to the GEMM in its dtype
        return self.down_proj(a, sizes).float()  # the MLP branch is added as float32


class TransformerLayer(nn.Module):
    """x += Attn(x); x += MLP(x) on a float32 residual stream (optional post-norms on the branches)."""

    def __init__(self, cfg: DiTConfig, i: int, dtype):
        super().__init__()
        n = 3 if i in cfg.mm_layers else 1
        self.attention = Attention(cfg, n, local=i in cfg.local_attn_layers, dtype=dtype)
        self.mlp = MLP(cfg, n, gelu7_layer=i in cfg.gelu7_layers, dtype=dtype)
        self.post_norm = i in cfg.post_norm_layers
        if self.post_norm:  # not instantiated in the released config (post_norm_layers = [])
            self.attn_post_norm = ExpertRMSNorm(cfg.hidden_size, n)
            self.mlp_post_norm = ExpertRMSNorm(cfg.hidden_size, n)

    def forward(self, x, rope, sizes: list[int], masks, attn_fn=attention):
        """x [B, L, D] fp32; sizes: rows per modality; masks: (full-layer mask, local-layer mask)."""
        a = self.attention(x, rope, sizes, masks[self.attention.local], attn_fn)
        if self.post_norm:
            a = self.attn_post_norm(a, sizes)
        x = x + a  # fp32 + bf16 -> fp32
        m = self.mlp(x, sizes)
        if self.post_norm:
            m = self.mlp_post_norm(m, sizes)
        return x + m


class TransformerBlock(nn.Module):
    """The 40 layers (a module of its own so the checkpoint keys read `block.layers.{i}.*`)."""

    def __init__(self, cfg: DiTConfig, dtype):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(cfg, i, dtype) for i in range(cfg.num_layers))


# ==================================================================================================
# Token packing: natural shapes <-> one sequence with 9-column coordinates (data_proxy.py)
# ==================================================================================================


def patchify(video: torch.Tensor) -> torch.Tensor:
    """[B, C, T, h, w] -> [B, T·(h/2)·(w/2), C·4], tokens raster (t, i, j), features channel-major.

    Feature index f = 4c + 2pH + pW: the im2col (`nn.Unfold`) order upstream uses on the input.
    """
    B, C, T, h, w = video.shape
    x = video.reshape(B, C, T, h // PATCH, PATCH, w // PATCH, PATCH)  # B C T i pH j pW
    x = x.permute(0, 2, 3, 5, 1, 4, 6)  # B T i j C pH pW
    return x.reshape(B, T * (h // PATCH) * (w // PATCH), C * PATCH * PATCH)


def unpatchify(tokens: torch.Tensor, T: int, h: int, w: int) -> torch.Tensor:
    """[B, Nv, 4·C] -> [B, C, T, h, w] with the OUTPUT feature order f = C·(2pH + pW) + c.

    Deliberately not the inverse of `patchify`: upstream unpacks "(pT pH pW C)" (patch-position
    major) while it packs channel-major, and the released `final_linear_video` rows follow that.
    """
    B, C = tokens.shape[0], tokens.shape[-1] // (PATCH * PATCH)
    x = tokens.reshape(B, T, h // PATCH, w // PATCH, PATCH, PATCH, C)  # B T i j pH pW C
    x = x.permute(0, 6, 1, 2, 4, 3, 5)  # B C T i pH j pW
    return x.reshape(B, C, T, h, w)


def _block_coords(shape, ref, t_offset: float = 0.0) -> torch.Tensor:
    """`get_coords`: meshgrid positions (t, h, w) row-major, plus constant size and ref columns."""
    St, Sh, Sw = shape
    t, i, j = torch.meshgrid(torch.arange(St), torch.arange(Sh), torch.arange(Sw), indexing="ij")
    pos = torch.stack([t.flatten() + t_offset, i.flatten(), j.flatten()], dim=-1).float()  # [n, 3]
    const = torch.tensor([*shape, *ref], dtype=torch.float32).expand(pos.shape[0], 6)
    return torch.cat([pos, const], dim=-1)  # [n, 9]


def sequence_coords(T: int, hp: int, wp: int, num_audio: int, num_text: int, style: str) -> torch.Tensor:
    """The [L, 9] coordinates of one sample's [video | audio | text] sequence (`get_coords` in data_proxy.py).

    hp, wp are the token grid (h/2, w/2). Video uses its own grid as reference ("extra"
    interpolation, hard-coded upstream); audio is one column of `num_audio` times referenced to T
    latent frames, so audio frame j sits at video time j·(T-1)/(Na-1).
    """
    video = _block_coords((T, hp, wp), (T, hp, wp))
    if style == "v1":
        audio = _block_coords((num_audio, 1, 1), (T, 1, 1))
        text = _block_coords((num_text, 1, 1), (2, 1, 1))  # text times spread over [0, 1]
    else:
        # v2 references audio to (Na-1)//4+1, which equals T in every pipeline path.
        audio = _block_coords((num_audio, 1, 1), ((num_audio - 1) // 4 + 1, 1, 1))
        # Scale (1-1)/(Nt-1) = 0: every text token sits at position 0, i.e. RoPE is the identity.
        text = _block_coords((num_text, 1, 1), (1, 1, 1), t_offset=-num_text)
    return torch.cat([video, audio, text], dim=0)


# ==================================================================================================
# The model
# ==================================================================================================


class Adapter(nn.Module):
    """Per-modality input embedders (float32 nn.Linear with bias) and the RoPE table."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.video_embedder = nn.Linear(cfg.video_in_channels, D)
        self.text_embedder = nn.Linear(cfg.text_in_channels, D)
        self.audio_embedder = nn.Linear(cfg.audio_in_channels, D)
        self.rope = ElementWiseFourierEmbed(cfg.head_dim)


class DiT(nn.Module):
    """daVinci-MagiHuman's DiT: (noisy video, noisy audio, text features) -> (video, audio) velocity.

    `block_dtype` is the dtype of the block linears and of the GEMM/attention inputs:
    torch.bfloat16 is the official numerics, torch.float32 the exact reference path. Embedders,
    heads, norms and the residual stream are float32 either way.
    """

    def __init__(self, cfg: DiTConfig, block_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.cfg = cfg
        self.adapter = Adapter(cfg)
        self.block = TransformerBlock(cfg, block_dtype)
        self.final_norm_video = ExpertRMSNorm(cfg.hidden_size)
        self.final_norm_audio = ExpertRMSNorm(cfg.hidden_size)
        self.final_linear_video = nn.Linear(cfg.hidden_size, cfg.video_in_channels, bias=False)
        self.final_linear_audio = nn.Linear(cfg.hidden_size, cfg.audio_in_channels, bias=False)
        # Set by `SequenceParallel.apply(dit)` to split the sequence across ranks (multi-GPU).
        self.sp: SequenceParallel | None = None
        # Masks as FlexAttention block masks (True) or dense SDPA masks (False); None: GPU -> flex.
        self.use_flex: bool | None = None
        self._tables: dict = {}  # per-shape RoPE tables and masks, built on the first call

    # ---- packing -------------------------------------------------------------------------------

    def layout(self, video_shape, num_audio: int, text_len: list[int]) -> SeqLayout:
        _, _, T, h, w = video_shape
        if h % PATCH or w % PATCH:
            raise ValueError(f"latent height and width must be even, got {h}x{w}")
        tpf = (h // PATCH) * (w // PATCH)
        longest = max(text_len)
        padded = any(n != longest for n in text_len)
        kv_len = [T * tpf + num_audio + n for n in text_len] if padded else None
        return SeqLayout(T * tpf, num_audio, longest, tpf, kv_len)

    def rope(self, video_shape, layout: SeqLayout, text_len: list[int], device) -> torch.Tensor:
        """RoPE table [B, L, 6·nb]; rows past a sample's text length are filled with zeros."""
        _, _, T, h, w = video_shape
        tables = []
        for n in text_len:
            coords = sequence_coords(T, h // PATCH, w // PATCH, layout.num_audio, n, self.cfg.coords_style)
            r = self.adapter.rope(coords.to(device))
            tables.append(F.pad(r, (0, 0, 0, layout.length - r.shape[0])))
        return torch.stack(tables)

    def shape_tables(self, video_shape, layout: SeqLayout, text_len: list[int], device):
        """(rope, masks) for this request shape, built once and reused by every later step: all
        that depends only on shapes stays out of the layer loop (and out of the sampling loop)."""
        use_flex = self.use_flex if self.use_flex is not None else torch.device(device).type == "cuda"
        bands = self.adapter.rope.bands
        key = (tuple(video_shape), layout.num_audio, tuple(text_len), str(device), use_flex,
               bands.data_ptr(), bands._version)  # new bands (a reload) -> new tables
        if key not in self._tables:
            rope = self.rope(video_shape, layout, text_len, device)
            R = self.cfg.frame_receptive_field if self.cfg.local_attn_layers else None
            masks = attention_masks(layout, R, len(text_len), device, use_flex)
            if len(self._tables) >= 4:  # cond and uncond passes alternate two shapes; keep a few
                self._tables.clear()
            self._tables[key] = (rope, masks)
        return self._tables[key]

    def embed(self, video, audio, text, text_len: list[int], layout: SeqLayout) -> torch.Tensor:
        """Embed each modality with its own float32 linear and concatenate: [B, L, D]."""
        text = text[:, : layout.num_text]
        if layout.kv_len is not None:
            # Zero the padding rows so nothing non-finite can leak through masked keys.
            keep = torch.arange(layout.num_text, device=text.device)[None, :] < torch.tensor(text_len, device=text.device)[:, None]
            text = torch.where(keep[..., None], text, torch.zeros((), dtype=text.dtype, device=text.device))
        a = self.adapter
        return torch.cat(
            [a.video_embedder(patchify(video)), a.audio_embedder(audio), a.text_embedder(text)], dim=1
        ).float()

    # ---- forward -------------------------------------------------------------------------------

    def forward(self, video: torch.Tensor, audio: torch.Tensor, text: torch.Tensor, text_len):
        """video [B, 48, T, h, w], audio [B, Na, 64], text [B, Lpad, C] whose first text_len[b] rows
        are real (text_len: [B] ints or int tensor) -> (v_video [B, 48, T, h, w], v_audio [B, Na, 64]).

        Each sample attends only within itself (upstream packs a batch into one sequence and lets
        samples see each other; the pipeline only ever uses B = 1).
        """
        self._check_inputs(video, audio, text)
        text_len = [int(n) for n in (text_len.tolist() if torch.is_tensor(text_len) else text_len)]
        if len(text_len) != video.shape[0] or min(text_len) < 1 or max(text_len) > text.shape[1]:
            raise ValueError(f"text_len {text_len} does not fit text of shape {tuple(text.shape)}")
        B, _, T, h, w = video.shape
        layout = self.layout(video.shape, audio.shape[1], text_len)                     # L = Nv + Na + Nt rows
        rope, masks = self.shape_tables(video.shape, layout, text_len, video.device)    # rope [B, L, 6·nb]
        x = self.embed(video.float(), audio.float(), text.float(), text_len, layout)    # [B, L, D] fp32
        sizes, attn_fn = layout.sizes, attention                                        # [Nv, Na, Nt] rows per expert
        if self.sp is not None:                                                         # sequence parallel: P ranks
            x, rope, sizes = self.sp.shard(x, rope, layout)                             # [B, L/P, D], [B, L/P, 6·nb]
            attn_fn = self.sp.attention                                                 # all-to-all around attention
        for layer in self.block.layers:
            x = layer(x, rope, sizes, masks, attn_fn)                                   # [B, L (or L/P), D] fp32
        if self.sp is not None:
            x = self.sp.gather(x, layout)                                               # [B, L, D] on every rank
        return self.head(x, layout, T, h, w)                                            # [B, 48, T, h, w], [B, Na, 64]

    def head(self, x: torch.Tensor, layout: SeqLayout, T: int, h: int, w: int):
        """Final per-modality norm + linear, then unpack to natural shapes (text rows dropped)."""
        Nv, Na = layout.num_video, layout.num_audio
        v = self.final_linear_video(self.final_norm_video(x[:, :Nv]))  # [B, Nv, 192]
        a = self.final_linear_audio(self.final_norm_audio(x[:, Nv : Nv + Na]))  # [B, Na, 64]
        return unpatchify(v, T, h, w), a

    def _check_inputs(self, video, audio, text):
        cfg = self.cfg
        if video.dim() != 5 or video.shape[1] != cfg.latent_channels:
            raise ValueError(f"video must be [B, {cfg.latent_channels}, T, h, w], got {tuple(video.shape)}")
        if audio.dim() != 3 or audio.shape[-1] != cfg.audio_in_channels or audio.shape[0] != video.shape[0]:
            raise ValueError(f"audio must be [B, N, {cfg.audio_in_channels}], got {tuple(audio.shape)}")
        if text.dim() != 3 or text.shape[-1] != cfg.text_in_channels or text.shape[0] != video.shape[0]:
            raise ValueError(f"text must be [B, L, {cfg.text_in_channels}], got {tuple(text.shape)}")


# ==================================================================================================
# Sequence parallelism (Ulysses): shard the tokens, all-to-all to head shards around attention
# ==================================================================================================


class SequenceParallel:
    """Split the packed sequence across the ranks of a process group (Ulysses-style).

    Every rank holds L/P rows of the residual stream (the sequence padded to a multiple of P). All
    token-wise work (norms, projections, MLPs, experts) runs on those rows. Attention needs every
    key, so around it q/k/v go through an all-to-all from "my rows, all heads" to "all rows, my
    heads", each rank attends over the whole sequence for H/P heads, and a second all-to-all
    brings the output back. The heads at the end run on the re-gathered sequence on every rank,
    so all ranks return the same velocities and can draw the same noise.

    Heads: query heads are split in contiguous blocks. When P divides the kv heads G, kv heads
    split the same way (GQA keeps its grouping). Otherwise kv heads are replicated to one per query
    head first (the released 40/8 model on 5 GPUs). When P does not even divide H (e.g. 3 GPUs),
    `pad_heads=True` (the fallback) adds zero query heads up to a multiple of P; their outputs are
    dropped. With `pad_heads=False` such a world size is refused.
    """

    def __init__(self, group=None, pad_heads: bool = True):
        self.dist, self.group = dist, group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.pad_heads = pad_heads

    def apply(self, dit: "DiT") -> "DiT":
        H, G, P = dit.cfg.num_heads_q, dit.cfg.num_heads_kv, self.world
        if H % P and not self.pad_heads:
            raise ValueError(f"{P} ranks cannot split {H} query heads ({G} kv heads); use a world size "
                             f"dividing {H} or allow the head-padding fallback (pad_heads=True)")
        self.check_same_weights(dit)
        dit.sp = self
        return dit

    def check_same_weights(self, module: nn.Module) -> None:
        """Fail early if ranks loaded different weights (a silent source of garbage otherwise)."""
        with torch.no_grad():
            sums = [p.detach().double().sum() for p in module.state_dict().values()]
            local = torch.stack([torch.stack(sums).sum(), torch.stack([s.abs() for s in sums]).sum()])
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        self.dist.all_gather(gathered, local, group=self.group)
        for r, other in enumerate(gathered):
            if not torch.equal(other, gathered[0]):
                raise ValueError(f"rank {r} holds different DiT weights than rank 0 (checksum mismatch)")

    # ---- sequence sharding ------------------------------------------------------------------

    def shard(self, x, rope, layout: SeqLayout):
        """Pad [B, L, ...] to a multiple of P rows and keep this rank's block of rows.

        Returns (x, rope, sizes): `sizes` splits this rank's rows by modality for the expert ops.
        The padding rows (zeros at the end of the last rank, cut off before attention and after
        the gather) need some expert to pass through; they go with the text expert, the last one.
        """
        L, P = layout.length, self.world
        per = -(-L // P)
        start, end = self.rank * per, (self.rank + 1) * per
        x = F.pad(x, (0, 0, 0, per * P - L))[:, start:end]
        rope = F.pad(rope, (0, 0, 0, per * P - L))[:, start:end]
        self.length = L  # the true length, for cutting the padding off inside attention
        cuts = [0, layout.num_video, layout.num_video + layout.num_audio, max(end, L)]
        sizes = [max(0, min(end, hi) - max(start, lo)) for lo, hi in zip(cuts[:-1], cuts[1:])]
        return x, rope, sizes

    def gather(self, x, layout: SeqLayout):
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self.dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=1)[:, : layout.length]

    # ---- attention over head shards -----------------------------------------------------------

    def _to_heads(self, t):
        """[B, h·P, Lp, d] (my rows, all heads) -> [B, h, Lp·P, d] (all rows, my heads)."""
        B, HP, Lp, d = t.shape
        P = self.world
        t = t.reshape(B, P, HP // P, Lp, d).transpose(0, 1).contiguous()  # [P(dest), B, h, Lp, d]
        out = torch.empty_like(t)
        self.dist.all_to_all_single(out, t, group=self.group)  # out[src] = src's rows of my heads
        return out.permute(1, 2, 0, 3, 4).reshape(B, HP // P, P * Lp, d)

    def _to_rows(self, t):
        """The inverse: [B, h, Lp·P, d] -> [B, h·P, Lp, d]."""
        B, h, L, d = t.shape
        P = self.world
        t = t.reshape(B, h, P, L // P, d).permute(2, 0, 1, 3, 4).contiguous()  # [P(dest), B, h, Lp, d]
        out = torch.empty_like(t)
        self.dist.all_to_all_single(out, t, group=self.group)  # out[src] = my rows of src's heads
        return out.transpose(0, 1).reshape(B, P * h, L // P, d)

    def attention(self, q, k, v, mask):
        """Drop-in for `attention` on this rank's rows: q [B, H, Lp, d], k/v [B, G, Lp, d].
        `mask` is the whole sequence's (built before sharding)."""
        H, G, P = q.shape[1], k.shape[1], self.world
        if G % P:  # kv heads cannot be split: one kv head per query head instead (same attention)
            k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
        pad = -H % P
        if pad:  # fallback: zero query heads (and their kv) up to a multiple of P, dropped after
            q = F.pad(q, (0, 0, 0, 0, 0, pad))
            if k.shape[1] == H:
                k, v = F.pad(k, (0, 0, 0, 0, 0, pad)), F.pad(v, (0, 0, 0, 0, 0, pad))
        q, k, v = self._to_heads(q), self._to_heads(k), self._to_heads(v)
        L = self.length  # the padding rows at the end are cut off, so no mask is needed for them
        out = attention(q[:, :, :L], k[:, :, :L], v[:, :, :L], mask)
        out = F.pad(out, (0, 0, 0, q.shape[2] - L))
        return self._to_rows(out)[:, :H]


def init_distributed(device, world_size: int | None = None, **init_kwargs) -> tuple[int, int, torch.device]:
    """Join the process group of a multi-process run; returns (rank, world size, this rank's device).

    Under torchrun (WORLD_SIZE > 1, or `world_size` given with `rank` and `init_method` in
    `init_kwargs`): NCCL on GPUs with one GPU per process picked by LOCAL_RANK, gloo on CPUs.
    A plain run returns (0, 1, device) and starts nothing. Safe to call again in the same process.
    """
    device = torch.device(device)
    world = int(world_size if world_size is not None else os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world_size is not None:  # an explicit group (the tests' file rendezvous), not torchrun's env
        init_kwargs["world_size"] = world_size
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", **init_kwargs)
    return dist.get_rank(), dist.get_world_size(), device


def end_distributed(barrier: bool = True) -> None:
    """Leave the process group, if any. With `barrier`, first wait for every rank: a gloo rank whose
    peer tears down while it still talks to it aborts. (On an error path pass barrier=False: a peer
    that failed may never arrive.)"""
    if dist.is_available() and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


# ==================================================================================================
# Speed and memory: compiled layers, layer-by-layer weight streaming
# ==================================================================================================


def compile_layers(dit: "DiT", **kwargs) -> "DiT":
    """torch.compile each transformer layer in place (regional compilation).

    Inductor fuses the elementwise work between the GEMMs (norms, casts, RoPE, gates, clamps).
    Layers of the same structure share compiled code, so the 40 layers cost a handful of
    compilations. `Module.compile` keeps parameter names, so state dicts stay the official keys.
    Shapes are fixed for a run (dynamic=False): a new resolution recompiles.
    """
    for layer in dit.block.layers:
        layer.compile(dynamic=False, **kwargs)
    return dit


class LayerStreamer:
    """Keep the 40 layers' weights in (pinned) host memory; copy each to the GPU just before it runs.

    The copy of layer i+1 is issued on a side stream while layer i computes, so on a fast host link
    the transfer hides behind the compute; at most two layers (~3.3 GB in bf16) are on the GPU at a
    time, so the 15B DiT runs on a 24 GB card. Everything outside `block.layers` (embedders, heads,
    ~21M parameters) stays resident. Works on CPU too (the "device copy" is then a plain copy),
    which is how the tests check that streaming changes no number.
    """

    def __init__(self, dit: "DiT", device):
        self.device = torch.device(device)
        self.layers = list(dit.block.layers)
        cuda = self.device.type == "cuda"
        # The master copy of every layer lives on the host (pinned so copies can be asynchronous).
        self.host = []
        for layer in self.layers:
            params = dict(layer.named_parameters())
            host = {n: (p.detach().cpu().pin_memory() if cuda else p.detach().cpu().clone()) for n, p in params.items()}
            for n, p in params.items():
                p.data = host[n]
            self.host.append(host)
        self.stream = torch.cuda.Stream(self.device) if cuda else None
        self.pending: dict[int, tuple[dict, object]] = {}
        for i, layer in enumerate(self.layers):
            layer.register_forward_pre_hook(lambda mod, args, i=i: self._before(i))
            layer.register_forward_hook(lambda mod, args, out, i=i: self._after(i))

    def _fetch(self, i: int) -> None:
        if self.stream is None:
            self.pending[i] = ({n: t.to(self.device, copy=True) for n, t in self.host[i].items()}, None)
            return
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            on_gpu = {n: t.to(self.device, non_blocking=True) for n, t in self.host[i].items()}
            done = torch.cuda.Event()
            done.record(self.stream)
        self.pending[i] = (on_gpu, done)

    def _before(self, i: int) -> None:
        if i not in self.pending:
            self._fetch(i)
        on_gpu, done = self.pending.pop(i)
        if done is not None:
            torch.cuda.current_stream(self.device).wait_event(done)
            for t in on_gpu.values():  # allocated on the side stream, used on the compute stream
                t.record_stream(torch.cuda.current_stream(self.device))
        for n, p in self.layers[i].named_parameters():
            p.data = on_gpu[n]
        self._fetch((i + 1) % len(self.layers))  # the next layer (wrapping: the next step's first)

    def _after(self, i: int) -> None:
        for n, p in self.layers[i].named_parameters():
            p.data = self.host[i][n]  # drop the device copy; the allocator reuses its memory


def init_random_(dit: "DiT", seed: int = 0, norm_std: float = 0.0) -> "DiT":
    """Random weights in place (for `--tiny-random`, benchmarks and tests; no checkpoint needed).

    Linears get N(0, 1/fan_in), biases zero, the RoPE bands their formula, norm deltas zero
    (identity gains, as upstream's init) or N(0, norm_std²) (tests use that so a mis-routed expert
    norm shows). Drawn from a generator on the weights' device, so the same seed gives the same
    model on every rank.
    """
    g = torch.Generator(device=next(dit.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g, device=p.device) * p.shape[-1] ** -0.5)
            elif "norm" in name and norm_std > 0:
                p.copy_(torch.randn(p.shape, generator=g, device=p.device) * norm_std)
            else:
                p.zero_()
        nb = dit.adapter.rope.bands.numel()
        dit.adapter.rope.bands.copy_(1.0 / 10000.0 ** (torch.arange(nb, dtype=torch.float32) / nb))
    return dit


def random_dit(cfg: DiTConfig, block_dtype: torch.dtype = torch.float32, seed: int = 0, norm_std: float = 0.0,
               device="cpu") -> "DiT":
    """A DiT with random weights (`init_random_`) in eval mode, built directly on `device`.

    The one helper for `--tiny-random`, the benchmarks, distillation's random teacher and the tests.
    Built on the meta device first, so a 15B model never holds a throw-away initialisation.
    """
    with torch.device("meta"):
        dit = DiT(cfg, block_dtype=block_dtype)
    return init_random_(dit.to_empty(device=device), seed, norm_std).eval()


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
