"""The three autoencoders of daVinci-MagiHuman: Wan2.2 video VAE, TurboVAED decoder, Oobleck audio VAE.

Mirrors, in the official repository (GAIR-NLP/daVinci-MagiHuman):
- `inference/model/vae2_2/vae2_2_module.py` (= upstream Wan-Video/Wan2.2 `wan/modules/vae2_2.py`): the
  Wan2.2 VAE, used to encode the TI2V reference image, and as the fallback video decoder;
- `inference/model/turbo_vaed/turbo_vaed_module.py` (from hustvl/Turbo-VAED): the default video decoder;
- `inference/model/sa_audio/*` (= Stability-AI/stable-audio-tools `autoencoders.py`, `blocks.py`,
  `bottleneck.py`): the Stable Audio Open 1.0 "Oobleck" audio VAE;
- `inference/pipeline/video_process.py`: image crop, A2V audio chunking, the 51.2 -> 44.1 kHz resample.

Shapes: B batch, C channels, T frames (latent or pixel, said where it matters), H, W height, width,
L audio length. Video is [-1, 1] on both sides of every VAE. Latents are *normalised* (the per-channel
48 mean/std of the Wan2.2 VAE are applied inside encode/decode), as the DiT sees them.

Wan keeps its official chunked, cached, causal computation (one latent frame per decoder call, as
upstream); every cached conv is exactly a full-sequence causal conv, so `frames_per_chunk` can also
decode everything in one call (a test checks both agree). No file I/O here: the
checkpoint readers are in load_weights.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from scipy.signal import resample
from torch import nn

# ==================================================================================================
# Shared pieces: latent statistics, patchify, up-sampling helpers, big-conv slicing
# ==================================================================================================

# Per-channel mean/std of the 48 Wan2.2 latent channels (Python literals in the official code, in no
# weight file). Both video models use them; normalise = (mu - mean) / std, de-normalise the inverse.
LATENT_MEAN = (
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557,
    -0.1382, 0.0542, 0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825,
    -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230,
    -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
    0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
)  # fmt: skip
LATENT_STD = (
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013,
    0.8158, 1.0344, 0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978,
    0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093,
    0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
    0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
)  # fmt: skip


def latent_stats(dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, inv_std) as [1, 48, 1, 1, 1] in `dtype`.

    inv_std = 1/std is computed *in* `dtype` from std already rounded to `dtype`: the official wrapper
    casts mean/std to bf16 and recomputes 1/std in bf16 (up to 0.6% off the fp32 value), and the code
    then divides by inv_std rather than multiplying by std.
    """
    mean = torch.tensor(LATENT_MEAN, dtype=dtype, device=device).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENT_STD, dtype=dtype, device=device).view(1, -1, 1, 1, 1)
    return mean, 1.0 / std


def patchify(x: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Space-to-depth: pixel (c, y=p*i+q, x=p*j+r) -> channel c*p*p + r*p + q (x-offset more significant)."""
    b, c, t, hp, wp = x.shape
    x = x.view(b, c, t, hp // p, p, wp // p, p)  # B C T (H q) (W r) -> B C T H q W r
    x = x.permute(0, 1, 6, 4, 2, 3, 5)  # -> B C r q T H W
    return x.reshape(b, c * p * p, t, hp // p, wp // p)  # -> B (C r q) T H W


def unpatchify(x: torch.Tensor, p: int = 2) -> torch.Tensor:
    """Exact inverse of `patchify` (Wan and TurboVAED use the same channel order)."""
    b, cpp, t, h, w = x.shape
    x = x.view(b, cpp // (p * p), p, p, t, h, w)  # B (C r q) T H W -> B C r q T H W
    x = x.permute(0, 1, 4, 5, 3, 6, 2)  # -> B C T H q W r
    return x.reshape(b, cpp // (p * p), t, h * p, w * p)  # -> B C T (H q) (W r)


def interleave_time(x: torch.Tensor) -> torch.Tensor:
    """Output of a C -> 2C temporal up-sampling conv to 2T frames: frame 2k = channels [0, C) at time k,
    frame 2k+1 = channels [C, 2C) at time k (both models' `time_conv`)."""
    b, c2, t, h, w = x.shape
    x = x.view(b, 2, c2 // 2, t, h, w)  # B (2 C) T H W -> B 2 C T H W
    x = x.permute(0, 2, 3, 1, 4, 5)  # -> B C T 2 H W
    return x.reshape(b, c2 // 2, 2 * t, h, w)  # -> B C (T 2) H W


def per_frame(fn, x: torch.Tensor) -> torch.Tensor:
    """Apply a 2-D module to every frame of B C T H W."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))  # B C T H W -> (B T) C H W
    return y.view(b, t, *y.shape[1:]).transpose(1, 2)  # (B T) C' H' W' -> B C' T H' W'


class Upsample2x(nn.Module):
    """Spatial nearest x2 (the official `nearest-exact`, which equals plain nearest at factor 2).

    The official code round-trips through fp32 to work around old bf16 kernels; copying values is exact
    in any dtype, so we skip it (same numbers, half the memory at 1080p). No weights.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


# Largest conv3d input (elements) given to one kernel call. Bigger inputs are cut along time, which is
# exact (each output frame only reads its own kt input frames); it keeps cuDNN within 32-bit indexing
# and bounds its workspace at 1080p (Turbo's widest activation is 128 x 36 x 544 x 960 = 2.4e9 elements).
# It never triggers at 256p or 540p.
CONV3D_MAX_ELEMENTS = 2**30


def conv3d_sliced(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for an input already padded in time, run in time slices when it is very large."""
    kt, st = conv.kernel_size[0], conv.stride[0]
    t_out = (x.shape[2] - kt) // st + 1
    frame = max(x[:, :, 0].numel(), x.shape[0] * conv.out_channels * x.shape[3] * x.shape[4])
    n = max(1, (CONV3D_MAX_ELEMENTS // frame - kt) // st + 1)  # output frames per call

    def conv_slice(i):  # output frames [i, i + n) read input frames [i*st, (i+n-1)*st + kt)
        xs = x[:, :, i * st : (i + n - 1) * st + kt]
        return F.conv3d(xs, conv.weight, conv.bias, conv.stride, conv.padding)

    if n >= t_out:
        return conv_slice(0)
    first = conv_slice(0)
    out = first.new_empty(*first.shape[:2], t_out, *first.shape[3:])  # filled in place: no second copy
    out[:, :, :n] = first
    for i in range(n, t_out, n):
        out[:, :, i : i + n] = conv_slice(i)
    return out


# ==================================================================================================
# Wan2.2 VAE: causal 3-D conv encoder/decoder, 48 latent channels at stride 4x16x16
# ==================================================================================================


@dataclass
class WanVAEConfig:
    """Constructor arguments of the official `WanVAE_`; defaults are what MagiHuman instantiates."""

    dim: int = 160  # encoder base width
    dec_dim: int = 256  # decoder base width (the constructor default, never overridden)
    z_dim: int = 48
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple = ()  # stored by the official code but unused: only the middle blocks attend
    temperal_downsample: tuple = (False, True, True)  # official spelling; the decoder uses it reversed
    dropout: float = 0.0

    @classmethod
    def from_dict(cls, d: dict) -> "WanVAEConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown Wan VAE config field(s): {sorted(unknown)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)

    @classmethod
    def tiny(cls) -> "WanVAEConfig":
        """About 1M parameters with the released structure (for --tiny-random runs and tests)."""
        return cls(dim=8, dec_dim=8)


class CausalConv3d(nn.Conv3d):
    """Conv3d padded with 2*p_t zero frames in front and none behind, so output frame t sees inputs <= t.

    With a `cache` dict (one per encode/decode pass) the conv is streamed chunk by chunk: the last 2*p_t
    input frames are kept and put in front of the next chunk instead of zeros. This is the official
    feature cache, and gives exactly the full-sequence causal conv whatever the chunking.
    """

    def __init__(self, in_dim, out_dim, kernel_size, stride=1, padding=0):
        kernel_size = nn.modules.utils._triple(kernel_size)
        padding = nn.modules.utils._triple(padding)
        # spatial padding stays inside the conv (zeros, like the official F.pad); time is padded by hand
        super().__init__(in_dim, out_dim, kernel_size, stride, padding=(0, padding[1], padding[2]))
        self.front = 2 * padding[0]  # frames of history this conv needs

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        # 1x1x1 convs and the stride-2 down-sampling time conv have no time padding: no history needed
        if self.front > 0:
            prev = cache.get(self) if cache is not None else None
            if prev is None:  # start of the sequence: zero history
                prev = x.new_zeros(*x.shape[:2], self.front, *x.shape[3:])
            x = torch.cat([prev, x], 2)  # B C (front + T) H W
            if cache is not None:
                cache[self] = x[:, :, -self.front :].clone()  # clone: a view would pin the whole input
        return conv3d_sliced(self, x)


class RMS_norm(nn.Module):
    """Wan's RMS norm: L2-normalise over channels (eps 1e-12 on the norm), times sqrt(C) and gamma."""

    def __init__(self, dim: int, images: bool = True):
        super().__init__()
        # gamma is (C,1,1) for the 4-D attention input and (C,1,1,1) for 5-D video, as in the checkpoint
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))
        self.scale = dim**0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the official "+ self.bias" adds the constant 0.0 (no bias parameter exists); omitted
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """norm -> SiLU -> conv3 -> norm -> SiLU -> dropout -> conv3, plus a 1x1x1 shortcut when widths differ.

    `residual` keeps the official Sequential indices (0..6) because the checkpoint keys use them.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.residual = nn.Sequential(
            RMS_norm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMS_norm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        r = self.residual
        # each 3x3x3 conv keeps its own history: the last frames of its input (after the SiLU)
        h = r[2](r[1](r[0](x)), cache)  # B Cin T H W -> B Cout T H W
        h = r[6](r[5](r[4](r[3](h))), cache)
        return h + self.shortcut(x)  # the 1x1x1 shortcut needs no history


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame (not causal: time never mixes)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMS_norm(dim)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = x.transpose(1, 2).reshape(b * t, c, h, w)  # B C T H W -> (B T) C H W
        qkv = self.to_qkv(self.norm(y)).view(b * t, 1, 3 * c, h * w)  # -> (B T) 1 3C (H W)
        # q = channels [0, C), k = [C, 2C), v = [2C, 3C): one head whose dimension is all C channels
        q, k, v = qkv.transpose(2, 3).chunk(3, dim=-1)  # each (B T) 1 (H W) C
        # head dim 640/1024 is too wide for flash attention: SDPA picks mem-efficient or math kernels,
        # which is fine (one latent frame at a time; 8160 tokens at 1080p)
        y = F.scaled_dot_product_attention(q, k, v)  # default scale 1/sqrt(C)
        y = y.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)  # (B T) (H W) C -> (B T) C H W
        y = self.proj(y)
        return y.view(b, t, c, h, w).transpose(1, 2) + x  # (B T) C H W -> B C T H W


class Resample(nn.Module):
    """Spatial x2 (up or down, per frame), with a temporal x2 `time_conv` for the *3d modes.

    `resample` keeps index 0 = pad/upsample (no weights) and 1 = Conv2d, as the checkpoint keys do.
    """

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim, 3, padding=1))
        else:  # down: pad right/bottom by one, then a stride-2 conv with no padding
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))  # no padding at all

    def forward(self, x: torch.Tensor, cache: dict, first_chunk: bool) -> torch.Tensor:
        if self.mode == "upsample3d":
            # Frame 0 of the sequence is never up-sampled in time, and the time conv's zero history
            # starts at frame 1, so frame 1 does not see frame 0 (the official "Rep" cache rule).
            if first_chunk:
                head, rest = x[:, :, :1], x[:, :, 1:]
                if rest.shape[2] > 0:
                    x = torch.cat([head, interleave_time(self.time_conv(rest, cache))], 2)
            else:
                x = interleave_time(self.time_conv(x, cache))  # B 2C T H W -> B C 2T H W
        x = per_frame(self.resample, x)  # B C T H W -> B C T 2H 2W (up) or B C T H/2 W/2 (down)
        if self.mode == "downsample3d":
            # Frame 0 passes alone (1 image frame -> 1 latent frame); later outputs take the stride-2
            # windows (0,1,2), (2,3,4), ... over the whole sequence, carried across chunks by one frame.
            seq = x if first_chunk else torch.cat([cache[self], x], 2)  # B C (1 + T) H W
            # the official first chunk skips the time conv entirely (its input is a single frame)
            out = self.time_conv(seq) if seq.shape[2] >= 3 else seq[:, :, :0]
            cache[self] = x[:, :, -1:].clone()
            x = torch.cat([x[:, :, :1], out], 2) if first_chunk else out
        return x


class AvgDown3D(nn.Module):
    """Weight-free encoder shortcut: fold each ft x fs x fs block into channels, then average groups."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, factor_t, factor_s
        if (in_dim * factor_t * factor_s * factor_s) % out_dim:
            raise ValueError(f"Wan VAE: stage {in_dim} -> {out_dim} cannot pool its shortcut (dim_mult?)")
        self.group = in_dim * factor_t * factor_s * factor_s // out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        # zero frames in *front* up to a multiple of ft: for one image the ft=2 shortcut sees (0, x0)
        x = F.pad(x, (0, 0, 0, 0, (-x.shape[2]) % ft, 0))
        b, c, t, h, w = x.shape
        x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs)  # B C (T ft) (H fs) (W fs)
        x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # -> B C ft fs fs T H W
        x = x.reshape(b, self.out_dim, self.group, t // ft, h // fs, w // fs)  # -> B out group T H W
        return x.mean(dim=2)


class DupUp3D(nn.Module):
    """Weight-free decoder shortcut: repeat channels, unfold them into ft x fs x fs blocks."""

    def __init__(self, in_dim: int, out_dim: int, factor_t: int, factor_s: int):
        super().__init__()
        self.out_dim, self.ft, self.fs = out_dim, factor_t, factor_s
        if (out_dim * factor_t * factor_s * factor_s) % in_dim:
            raise ValueError(f"Wan VAE: stage {in_dim} -> {out_dim} cannot copy its shortcut (dim_mult?)")
        self.repeats = out_dim * factor_t * factor_s * factor_s // in_dim

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        ft, fs = self.ft, self.fs
        b, _, t, h, w = x.shape
        x = x.repeat_interleave(self.repeats, dim=1)  # B (out ft fs fs) T H W
        x = x.view(b, self.out_dim, ft, fs, fs, t, h, w)  # -> B out ft fs fs T H W
        x = x.permute(0, 1, 5, 2, 6, 3, 7, 4)  # -> B out T ft H fs W fs
        x = x.reshape(b, self.out_dim, t * ft, h * fs, w * fs)  # -> B out (T ft) (H fs) (W fs)
        # like the main path, the sequence's first frame is not doubled in time
        return x[:, :, ft - 1 :] if first_chunk else x


class Down_ResidualBlock(nn.Module):
    """Encoder stage: residual blocks, then (optionally) a Resample, plus the AvgDown3D shortcut."""

    def __init__(self, in_dim, out_dim, dropout, mult, temperal_downsample=False, down_flag=False):
        super().__init__()
        ft, fs = (2 if temperal_downsample else 1), (2 if down_flag else 1)
        # the last stage has ft = fs = 1: an identity shortcut that is still added (official quirk)
        self.avg_shortcut = AvgDown3D(in_dim, out_dim, ft, fs)
        blocks = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(mult)]
        if down_flag:
            blocks.append(Resample(out_dim, "downsample3d" if temperal_downsample else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cache: dict, first_chunk: bool) -> torch.Tensor:
        # the shortcut pads each chunk on its own; the official chunks (1 frame, then 4 or 2) make that
        # the same as padding the whole sequence once
        shortcut = self.avg_shortcut(x)
        for m in self.downsamples:
            x = m(x, cache, first_chunk) if isinstance(m, Resample) else m(x, cache)
        return x + shortcut


class Up_ResidualBlock(nn.Module):
    """Decoder stage: residual blocks, then (optionally) a Resample, plus the DupUp3D shortcut."""

    def __init__(self, in_dim, out_dim, dropout, mult, temperal_upsample=False, up_flag=False):
        super().__init__()
        ft, fs = (2 if temperal_upsample else 1), (2 if up_flag else 1)
        # the last stage (no up-sampling) has no stage shortcut at all, unlike the encoder's last stage
        self.avg_shortcut = DupUp3D(in_dim, out_dim, ft, fs) if up_flag else None
        blocks = [ResidualBlock(in_dim if i == 0 else out_dim, out_dim, dropout) for i in range(mult)]
        if up_flag:
            blocks.append(Resample(out_dim, "upsample3d" if temperal_upsample else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor, cache: dict, first_chunk: bool) -> torch.Tensor:
        h = x
        for m in self.upsamples:
            h = m(h, cache, first_chunk) if isinstance(m, Resample) else m(h, cache)
        if self.avg_shortcut is not None:
            h = h + self.avg_shortcut(x, first_chunk)
        return h


class Encoder3d(nn.Module):
    """12 patchified channels -> 2*z_dim (mu, log-variance), spatial /8, temporal /4."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.dim * u for u in (1, *cfg.dim_mult)]
        n = len(cfg.dim_mult)
        tdown = list(cfg.temperal_downsample) + [False] * n
        self.conv1 = CausalConv3d(12, dims[0], 3, padding=1)
        p = cfg.dropout
        stages = [
            Down_ResidualBlock(dims[i], dims[i + 1], p, cfg.num_res_blocks, tdown[i], down_flag=i != n - 1)
            for i in range(n)
        ]
        self.downsamples = nn.Sequential(*stages)
        c = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(c, c, p), AttentionBlock(c), ResidualBlock(c, c, p))
        head_conv = CausalConv3d(c, 2 * cfg.z_dim, 3, padding=1)
        self.head = nn.Sequential(RMS_norm(c, images=False), nn.SiLU(), head_conv)

    def forward(self, x: torch.Tensor, cache: dict, first_chunk: bool) -> torch.Tensor:
        x = self.conv1(x, cache)  # B 12 T H W -> B dim T H W
        for stage in self.downsamples:  # H, W halve at every stage but the last; T at the *3d ones
            x = stage(x, cache, first_chunk)
        x = self.middle[2](self.middle[1](self.middle[0](x, cache)), cache)  # RB, attention, RB
        return self.head[2](self.head[1](self.head[0](x)), cache)  # norm, SiLU, conv -> B 2z T' H' W'


class Decoder3d(nn.Module):
    """z_dim -> 12 patchified channels, spatial x8, temporal x4 (frame 0 of the sequence stays 1 frame)."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dec_dim * u for u in (mult[-1], *mult[::-1])]
        n = len(mult)
        tup = list(cfg.temperal_downsample[::-1]) + [False] * n
        c, p = dims[0], cfg.dropout
        self.conv1 = CausalConv3d(cfg.z_dim, c, 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(c, c, p), AttentionBlock(c), ResidualBlock(c, c, p))
        # num_res_blocks + 1 residual blocks per decoder stage (official)
        stages = [
            Up_ResidualBlock(dims[i], dims[i + 1], p, cfg.num_res_blocks + 1, tup[i], up_flag=i != n - 1)
            for i in range(n)
        ]
        self.upsamples = nn.Sequential(*stages)
        c = dims[-1]
        self.head = nn.Sequential(RMS_norm(c, images=False), nn.SiLU(), CausalConv3d(c, 12, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: dict, first_chunk: bool) -> torch.Tensor:
        x = self.conv1(x, cache)  # B z T h w -> B 4dec T h w
        x = self.middle[2](self.middle[1](self.middle[0](x, cache)), cache)  # RB, attention, RB
        for stage in self.upsamples:  # x2 in H, W per stage but the last; x2 in T at the *3d ones
            x = stage(x, cache, first_chunk)
        return self.head[2](self.head[1](self.head[0](x)), cache)  # -> B 12 T' 8h 8w


class WanVAE(nn.Module):
    """The official `WanVAE_` (its attributes are the keys of `Wan2.2_VAE.pth`) plus the
    `Wan2_2_VAE` wrapper's normalisation, chunking and clamp. Runs in the dtype of its weights (the
    pipeline uses bf16, as the official `.to(bf16)`)."""

    def __init__(self, cfg: WanVAEConfig = WanVAEConfig()):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder3d(cfg)
        self.conv1 = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)  # -> (mu, log-variance)
        self.conv2 = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)  # on the whole latent, before the decoder
        self.decoder = Decoder3d(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] -> normalised posterior mean [B, z, 1+(T-1)//4, H/16, W/16], fp32.

        Frames past 1 + 4*((T-1)//4) are dropped silently, as the official encode does.
        """
        if video.dim() != 5 or video.shape[1] != 3 or video.shape[3] % 16 or video.shape[4] % 16:
            shape = tuple(video.shape)
            raise ValueError(f"Wan VAE encode expects [B, 3, T, H, W], H and W multiples of 16; got {shape}")
        x = patchify(video.to(self.device, self.dtype))  # B 3 T (H 2) (W 2) -> B 12 T H W
        n = 1 + (x.shape[2] - 1) // 4
        # official chunking: frame 0 alone, then 4 frames per latent frame, caches carried across
        chunks = [x[:, :, :1]] + [x[:, :, 1 + 4 * i : 5 + 4 * i] for i in range(n - 1)]
        cache: dict = {}  # per-conv history, empty = start of the sequence
        h = [self.encoder(c, cache, first_chunk=i == 0) for i, c in enumerate(chunks)]
        h = torch.cat(h, 2)  # n x B 2z 1 h w -> B 2z n h w
        mu = self.conv1(h)[:, : self.cfg.z_dim]  # log-variance discarded: the mean, never a sample
        # normalised in the model dtype (all-bf16 in the pipeline), converted to fp32 only at the end
        mean, inv_std = latent_stats(mu.dtype, mu.device)
        return ((mu - mean) * inv_std).float()

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """TI2V reference image [B, 3, H, W] in [-1, 1] -> normalised latent [B, z, 1, H/16, W/16], fp32."""
        if image.dim() != 4:
            raise ValueError(f"encode_image expects [B, 3, H, W], got {tuple(image.shape)}")
        return self.encode(image[:, :, None])  # B 3 H W -> B 3 1 H W

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, frames_per_chunk: int = 1) -> torch.Tensor:
        """Normalised latent [B, z, T, h, w] -> video [B, 3, 4(T-1)+1, 16h, 16w] clamped to [-1, 1], fp32.

        `frames_per_chunk` latent frames go through the decoder per call (1 = official, least memory;
        any value gives the same numbers since every cached conv equals the full-sequence conv).
        """
        if latent.dim() != 5 or latent.shape[1] != self.cfg.z_dim:
            shape = tuple(latent.shape)
            raise ValueError(f"Wan VAE decode expects [B, {self.cfg.z_dim}, T, h, w]; got {shape}")
        if frames_per_chunk < 1:
            raise ValueError(f"frames_per_chunk must be >= 1, got {frames_per_chunk}")
        z = latent.to(self.device, self.dtype)
        mean, inv_std = latent_stats(z.dtype, z.device)
        z = self.conv2(z / inv_std + mean)  # de-normalise by dividing by 1/std, in the model dtype
        cache: dict = {}  # per-conv history carried from chunk to chunk
        chunks = range(0, z.shape[2], frames_per_chunk)
        # the first chunk's latent frame 0 becomes pixel frame 0 alone; every later latent gives 4 frames
        out = [self.decoder(z[:, :, i : i + frames_per_chunk], cache, first_chunk=(i == 0)) for i in chunks]
        video = unpatchify(torch.cat(out, 2))  # B 12 T' h' w' -> B 3 T' (h' 2) (w' 2)
        return video.float().clamp_(-1.0, 1.0)  # only the Wan path clamps (Turbo does not)


def image_to_tensor(image, height: int, width: int) -> torch.Tensor:
    """TI2V preprocessing of a PIL image (`video_process.py` upstream) -> [1, 3, height, width] float32 in [-1, 1].

    EXIF transpose + RGB (diffusers `load_image`), centre crop to the target aspect ratio *without*
    resizing (`resizecrop`), then one LANCZOS resize (diffusers `VideoProcessor.preprocess`).
    """
    image = ImageOps.exif_transpose(image).convert("RGB")
    w, h = image.size
    if (w, h) != (width, height):
        if h / w > height / width:
            new_w, new_h = w, int(w * height / width)
        else:
            new_w, new_h = int(h * width / height), h
        # float box as in the official code; PIL rounds each coordinate (half to even)
        image = image.crop(((w - new_w) / 2, (h - new_h) / 2, (w + new_w) / 2, (h + new_h) / 2))
    # sizes are multiples of 16 already, so the processor's own rounding is a no-op
    image = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    x = torch.from_numpy(np.array(image).astype(np.float32) / 255.0)  # H W 3 in [0, 1]
    return (2.0 * x - 1.0).permute(2, 0, 1)[None]  # H W 3 -> 1 3 H W


# ==================================================================================================
# TurboVAED: the distilled, non-causal video decoder, run in overlapping windows
# ==================================================================================================


@dataclass
class TurboVAEDConfig:
    """Fields of the official `TurboVAED` config; defaults are `TurboV3-Wan22-TinyShallow_7_7.json`
    (the released JSON), *not* the class defaults, which describe another network.

    Lists are in encoder order (widest last), as in the JSON; the decoder reverses them.
    """

    in_channels: int = 3  # unused (kept for the JSON)
    out_channels: int = 3
    latent_channels: int = 48
    decoder_block_out_channels: tuple = (64, 128, 256, 512)
    decoder_layers_per_block: tuple = (2, 2, 2, 3, 3)  # reversed: mid, up0, up1, up2, up3
    decoder_spatio_temporal_scaling: tuple = (False, True, True, True)
    decoder_spatio_only: tuple = (False, True, False, False)
    decoder_is_dw_conv: tuple = (False, False, False, False, False)
    decoder_dw_kernel_size: int = 5
    decoder_causal: bool = False
    patch_size: int = 2
    patch_size_t: int = 1
    resnet_norm_eps: float = 1e-6
    scaling_factor: float = 1.0  # unused
    first_chunk_size: int = 7
    step_size: int = 7
    spatial_compression_ratio: int = 16
    temporal_compression_ratio: int = 4
    use_unpatchify: bool = True

    def __post_init__(self):
        # the variants the released file does not use are not implemented; refuse rather than misbuild
        if any(self.decoder_is_dw_conv):
            raise ValueError("TurboVAED: decoder_is_dw_conv (depthwise convs) is not supported")
        if self.decoder_causal:
            raise ValueError("TurboVAED: decoder_causal must be false (the official code asserts it)")
        if not self.use_unpatchify or self.patch_size != 2 or self.patch_size_t != 1:
            raise ValueError("TurboVAED: only use_unpatchify, patch_size 2, patch_size_t 1 are supported")
        if self.first_chunk_size < 1 or self.step_size < 1:
            raise ValueError("TurboVAED: first_chunk_size and step_size must be >= 1")
        n = len(self.decoder_block_out_channels)
        lens = len(self.decoder_layers_per_block), len(self.decoder_spatio_temporal_scaling)
        if lens + (len(self.decoder_spatio_only),) != (n + 1, n, n):
            raise ValueError(
                "TurboVAED: decoder_layers_per_block needs one entry more than decoder_block_out_channels, "
                "decoder_spatio_temporal_scaling and decoder_spatio_only as many"
            )

    @classmethod
    def from_dict(cls, d: dict) -> "TurboVAEDConfig":
        """Known fields only: like the official from_config, other keys (`aligned_feature_*` training
        settings, `_class_name`, ...) are ignored. Missing keys take the released values."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})

    @classmethod
    def tiny(cls) -> "TurboVAEDConfig":
        return cls(decoder_block_out_channels=(8, 12, 16, 24))


class TurboConv3d(nn.Module):
    """Conv3d whose time axis is padded by *replicating* the edge frames on both sides (the official
    `TurboVAEDCausalConv3d`, which despite its name is not causal). The extra `.conv` level is in the keys."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size):
        super().__init__()
        k = nn.modules.utils._triple(kernel_size)
        self.conv = nn.Conv3d(in_dim, out_dim, k, padding=(0, k[1] // 2, k[2] // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = (self.conv.kernel_size[0] - 1) // 2  # 1 for the 3x3x3 and (3,1,1) convs, 0 for 1x1x1
        if p > 0:
            x = torch.cat([x[:, :, :1]] * p + [x] + [x[:, :, -1:]] * p, 2)  # B C (p + T + p) H W
        return conv3d_sliced(self.conv, x)


# Turbo RMS-norm temporaries are fp32; they are made a few frames at a time, at most this many elements.
_NORM_SLICE_ELEMENTS = 2**28


def turbo_rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean_c(x^2) + eps) with no weight; statistics and product in fp32, rounded once to x's
    dtype (official numerics). Done in time slices so the fp32 copies stay small at 1080p."""
    out = torch.empty_like(x)
    step = max(1, _NORM_SLICE_ELEMENTS // max(1, x[:, :, 0].numel()))  # frames per slice
    for t in range(0, x.shape[2], step):
        xs = x[:, :, t : t + step].float()  # bf16 -> fp32 is exact, like the official type promotion
        # the product stays fp32 until the assignment rounds it to out's dtype (the official `.to(dtype)`)
        out[:, :, t : t + step] = xs * torch.rsqrt(xs.square().mean(1, keepdim=True) + eps)
    return out


class TurboResnetBlock(nn.Module):
    """norm -> act -> conv3 -> norm -> SiLU -> conv3, plus a shortcut that is *normalised first*
    (norm3, eps resnet_norm_eps) and 1x1x1-projected when widths differ. No norm has weights."""

    def __init__(self, in_dim: int, out_dim: int, eps: float, relu_first: bool = False):
        super().__init__()
        self.relu_first = relu_first  # official `is_upsampler_modified`: ReLU replaces the first SiLU
        self.eps = eps
        self.conv1 = TurboConv3d(in_dim, out_dim, 3)
        self.conv2 = TurboConv3d(out_dim, out_dim, 3)
        self.conv_shortcut = TurboConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Activations run in place on the norms' fresh outputs, and `h` is rebound before each conv so the
        # previous tensor is freed: at 1080p every activation-sized buffer is 4.8 GB.
        h = turbo_rms_norm(x, 1e-8)  # norm1 and norm2 use a hard-coded 1e-8, only norm3 uses eps
        h = F.relu_(h) if self.relu_first else F.silu(h, inplace=True)
        h = self.conv1(h)  # B Cin T H W -> B Cout T H W
        h = F.silu(turbo_rms_norm(h, 1e-8), inplace=True)  # the second activation is always SiLU
        h = self.conv2(h)  # dropout 0 omitted
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(turbo_rms_norm(x, self.eps))
        return h + x


class TurboResample(nn.Module):
    """The official `WanResample` (Turbo version): [time_conv C->2C + interleave], then per frame
    nearest x2 and a 3x3 Conv2d; channels unchanged."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim, 3, padding=1))
        self.time_conv = TurboConv3d(dim, dim * 2, (3, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        if self.time_conv is not None:
            x = interleave_time(self.time_conv(x))  # B 2C T H W -> B C 2T H W
            if first_chunk:
                # pixel frame 0 = the odd (second-half channel) output of latent frame 0; the even is dropped
                x = x[:, :, 1:]
        return per_frame(self.resample, x)


class TurboMidBlock(nn.Module):
    def __init__(self, dim: int, num_layers: int, eps: float):
        super().__init__()
        self.resnets = nn.ModuleList([TurboResnetBlock(dim, dim, eps) for _ in range(num_layers)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for r in self.resnets:
            x = r(x)
        return x


class TurboUpBlock(nn.Module):
    """conv_in (width change, SiLU) -> upsampler -> resnets; in that order (official)."""

    def __init__(self, in_dim, out_dim, num_layers, eps, scale: bool, spatio_only: bool):
        super().__init__()
        self.conv_in = TurboResnetBlock(in_dim, out_dim, eps) if in_dim != out_dim else None
        self.upsamplers = nn.ModuleList([TurboResample(out_dim, temporal=not spatio_only)]) if scale else None
        # the resnets of up-sampling blocks start with ReLU, everything else with SiLU (official)
        resnets = [TurboResnetBlock(out_dim, out_dim, eps, relu_first=scale) for _ in range(num_layers)]
        self.resnets = nn.ModuleList(resnets)

    def forward(self, x: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        if self.conv_in is not None:
            x = self.conv_in(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, first_chunk)
        for r in self.resnets:
            x = r(x)
        return x


class TurboDecoder3d(nn.Module):
    """One window: latent [B, 48, n, h, w] -> video [B, 3, 4n-3 (first window) or 4n, 16h, 16w]."""

    def __init__(self, cfg: TurboVAEDConfig):
        super().__init__()
        widths = cfg.decoder_block_out_channels[::-1]  # config lists are in encoder order
        layers = cfg.decoder_layers_per_block[::-1]
        scale = cfg.decoder_spatio_temporal_scaling[::-1]
        only2d = cfg.decoder_spatio_only[::-1]
        eps = cfg.resnet_norm_eps
        self.conv_in = TurboConv3d(cfg.latent_channels, widths[0], 3)
        self.mid_block = TurboMidBlock(widths[0], layers[0], eps)
        dims = [widths[0], *widths]
        blocks = [
            TurboUpBlock(dims[i], dims[i + 1], layers[i + 1], eps, scale[i], only2d[i])
            for i in range(len(widths))
        ]
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_out = TurboConv3d(widths[-1], cfg.out_channels * cfg.patch_size**2, 3)
        self.patch_size = cfg.patch_size

    def forward(self, z: torch.Tensor, first_chunk: bool) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))  # B 48 n h w -> B 512 n h w
        # released: up0 512 (x2 T, H, W), up1 256 (x2 T, H, W), up2 128 (x2 H, W only), up3 64 (no scaling)
        for block in self.up_blocks:
            x = block(x, first_chunk)
        x = self.conv_out(F.silu(turbo_rms_norm(x, 1e-8)))  # final weightless norm, SiLU -> B 12 T 8h 8w
        return unpatchify(x, self.patch_size)  # B (3 r q) T H W -> B 3 T (H q) (W r)


class TurboVAED(nn.Module):
    """The official `TurboVAED`: `decoder` (keys `decoder.*`) plus its sliding-window `decode`."""

    def __init__(self, cfg: TurboVAEDConfig = TurboVAEDConfig()):
        super().__init__()
        self.cfg = cfg
        self.decoder = TurboDecoder3d(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv_in.conv.weight.device

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, output_device=None) -> torch.Tensor:
        """Normalised latent [B, 48, N, h, w] -> video [B, 3, 4(N-1)+1, 16h, 16w], fp32, *unclamped*.

        The windows are part of the numerics (the decoder is not causal and sees several latents):
        first window [0, F+1), then [i-1, i+S+1) for i = F, F+S, ..., the last one [i-1, i+S); one latent
        of overlap on each side is decoded and its 4 pixel frames dropped. `output_device` (e.g. "cpu")
        moves each window's frames off the GPU at once, as the official 1080p offload mode does.
        """
        cfg = self.cfg
        if latent.dim() != 5 or latent.shape[1] != cfg.latent_channels:
            shape = tuple(latent.shape)
            raise ValueError(f"TurboVAED decode expects [B, {cfg.latent_channels}, N, h, w]; got {shape}")
        # rounded to the model dtype *before* de-normalising, as upstream
        z = latent.to(self.device, self.dtype)
        mean, inv_std = latent_stats(torch.float32, z.device)  # fp32 constants even in bf16 (official)
        z = (z / inv_std + mean).to(self.dtype)
        first, step, r = cfg.first_chunk_size, cfg.step_size, cfg.temporal_compression_ratio
        n = z.shape[2]
        # pad to first + k*step latents (at least `first`) so the windows tile the sequence exactly
        pad = first - n if n < first else (-(n - first)) % step
        # pad the end with copies of the last latent: this changes the last real frames too (official)
        z = torch.cat([z, z[:, :, -1:].expand(-1, -1, pad, -1, -1)], 2)
        total = n + pad

        def keep(x):
            return x.to(output_device) if output_device is not None else x

        if total == first:  # a single window, no context to trim: 4*first - 3 frames
            chunks = [keep(self.decoder(z, first_chunk=True))]
        else:
            # first window: latents [0, first] with one latent of right context, whose 4 frames are dropped
            chunks = [keep(self.decoder(z[:, :, : first + 1], first_chunk=True)[:, :, :-r])]
            for i in range(first, total, step):
                last = i + step == total
                # one latent of left context always, of right context unless this is the last window
                out = self.decoder(z[:, :, i - 1 : i + step + (0 if last else 1)], first_chunk=False)
                chunks.append(keep(out[:, :, r:] if last else out[:, :, r:-r]))  # 4*step frames kept
        video = torch.cat(chunks, 2)  # B 3 4(total-1)+1 H W
        return video[:, :, : video.shape[2] - pad * r].float()  # drop the padding's frames -> 4(n-1)+1


# ==================================================================================================
# Oobleck audio VAE (Stable Audio Open 1.0 pretransform): 2 ch waveform <-> 64 ch latent at /2048
# ==================================================================================================

# The pipeline calls the VAE's waveforms 51.2 kHz (the VAE was trained at 44.1 kHz), so that
# 51200 / 2048 = 25 latents per second = one audio latent per video frame at 25 fps.
PIPELINE_SAMPLE_RATE = 51200
# A2V inputs longer than this are encoded in overlapping windows (29 s at 51.2 kHz = 725 latents)
A2V_WINDOW_SAMPLES = 29 * PIPELINE_SAMPLE_RATE


@dataclass
class OobleckConfig:
    """The pretransform section of SAO 1.0 `model_config.json`; defaults are the released values."""

    io_channels: int = 2
    channels: int = 128
    c_mults: tuple = (1, 2, 4, 8, 16)
    strides: tuple = (2, 4, 4, 8, 8)
    latent_dim: int = 64  # decoder input; the encoder outputs 2 * latent_dim (mean, scale)
    encoder_latent_dim: int = 128
    final_tanh: bool = False
    sample_rate: int = 44100  # the rate the VAE was trained at (the pipeline's resample target)

    @classmethod
    def from_dict(cls, d: dict, sample_rate: int = 44100) -> "OobleckConfig":
        """From the pretransform `config` dict ({encoder, decoder, bottleneck, latent_dim, ...})."""
        try:
            enc, dec = d["encoder"], d["decoder"]
            ec, dc = enc["config"], dec["config"]
            if enc["type"] != "oobleck" or dec["type"] != "oobleck" or d["bottleneck"]["type"] != "vae":
                raise ValueError("only oobleck encoder/decoder with a 'vae' bottleneck is supported")
            if not ec.get("use_snake", False) or not dc.get("use_snake", False):
                raise ValueError("only use_snake=true is supported")
            if dc.get("use_nearest_upsample") or any(c.get("antialias_activation") for c in (ec, dc)):
                raise ValueError("nearest-upsample and anti-aliased variants are not supported")
            shared = ("channels", "c_mults", "strides")
            if any(ec[k] != dc[k] for k in shared):  # both sides come from the same JSON types
                raise ValueError("encoder and decoder must share channels, c_mults and strides")
            io = d.get("io_channels", 2)
            if ec.get("in_channels", io) != io or dc.get("out_channels", io) != io:
                raise ValueError("in/out channels must equal io_channels")
            if ec["latent_dim"] != 2 * dc["latent_dim"]:
                raise ValueError("a 'vae' bottleneck needs encoder latent_dim = 2 * decoder latent_dim")
            return cls(
                io_channels=io,
                channels=ec["channels"],
                c_mults=tuple(ec["c_mults"]),
                strides=tuple(ec["strides"]),
                latent_dim=dc["latent_dim"],
                encoder_latent_dim=ec["latent_dim"],
                final_tanh=dc.get("final_tanh", True),  # the library default is true; SAO 1.0 sets false
                sample_rate=sample_rate,
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed Oobleck config (missing or wrong field {e})") from None

    @property
    def hop(self) -> int:
        return math.prod(self.strides)  # 2048 samples per latent

    @classmethod
    def tiny(cls) -> "OobleckConfig":
        return cls(channels=4)


class SnakeBeta(nn.Module):
    """x + 1/(exp(beta) + 1e-9) * sin(x * exp(alpha))^2, per channel; alpha and beta stored as logs."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(dim))
        self.beta = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.alpha.exp()[None, :, None]  # C -> 1 C 1
        b = self.beta.exp()[None, :, None]
        # official order (exp, +1e-9, reciprocal, multiply), not a division: keeps the last bits
        return x + (1.0 / (b + 1e-9)) * torch.sin(x * a).pow(2)


def weight_norm(v: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Legacy `torch.nn.utils.weight_norm` (dim 0): w = v * (g / ||v||), norm over all dims but 0, no eps."""
    return v * (g / v.norm(dim=tuple(range(1, v.dim())), keepdim=True))


class WNConv1d(nn.Module):
    """Weight-normalised Conv1d. We keep `weight_g`/`weight_v` as stored in the release (so the strict load
    needs no renaming) and form the weight on each call: a few microseconds next to the conv itself."""

    def __init__(self, in_dim, out_dim, kernel_size, stride=1, padding=0, dilation=1, bias=True):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1, 1))
        self.weight_v = nn.Parameter(torch.randn(out_dim, in_dim, kernel_size))  # only its direction counts
        self.bias = nn.Parameter(torch.zeros(out_dim)) if bias else None
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = weight_norm(self.weight_v, self.weight_g)
        return F.conv1d(x, w, self.bias, self.stride, self.padding, self.dilation)


class WNConvTranspose1d(nn.Module):
    """Weight-normalised ConvTranspose1d; its v is [in, out, k], so the norm is per *input* channel."""

    def __init__(self, in_dim, out_dim, kernel_size, stride=1, padding=0):
        super().__init__()
        self.weight_g = nn.Parameter(torch.ones(in_dim, 1, 1))
        self.weight_v = nn.Parameter(torch.randn(in_dim, out_dim, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_dim))
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = weight_norm(self.weight_v, self.weight_g)
        return F.conv_transpose1d(x, w, self.bias, self.stride, self.padding)


class ResidualUnit(nn.Module):
    """x + [Snake, WNConv1d k7 dilation d (length kept), Snake, WNConv1d k1](x)."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.layers = nn.Sequential(
            SnakeBeta(dim),
            WNConv1d(dim, dim, 7, dilation=dilation, padding=3 * dilation),
            SnakeBeta(dim),
            WNConv1d(dim, dim, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the official unit runs through torch.utils.checkpoint (the module is never put in eval mode);
        # that changes memory during training only, not the numbers
        return x + self.layers(x)


class EncoderBlock(nn.Module):
    """Three residual units at the input width (dilations 1, 3, 9), Snake, then a strided conv down."""

    def __init__(self, in_dim: int, out_dim: int, stride: int):
        super().__init__()
        self.layers = nn.Sequential(
            ResidualUnit(in_dim, 1),
            ResidualUnit(in_dim, 3),
            ResidualUnit(in_dim, 9),
            SnakeBeta(in_dim),
            WNConv1d(in_dim, out_dim, 2 * stride, stride=stride, padding=math.ceil(stride / 2)),  # L -> L / s
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DecoderBlock(nn.Module):
    """Snake, a strided transposed conv up (output_padding 0), then three residual units at the new width."""

    def __init__(self, in_dim: int, out_dim: int, stride: int):
        super().__init__()
        self.layers = nn.Sequential(
            SnakeBeta(in_dim),
            # L -> L * s exactly
            WNConvTranspose1d(in_dim, out_dim, 2 * stride, stride=stride, padding=math.ceil(stride / 2)),
            ResidualUnit(out_dim, 1),
            ResidualUnit(out_dim, 3),
            ResidualUnit(out_dim, 9),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class OobleckEncoder(nn.Module):
    """[B, 2, S] -> [B, 2*latent_dim, S // 2048]: channels 0..63 mean, 64..127 pre-softplus scale."""

    def __init__(self, cfg: OobleckConfig):
        super().__init__()
        ch = [cfg.channels * m for m in (1, *cfg.c_mults)]  # the official code prefixes c_mults with 1
        # each strided conv maps L to floor(L / s) (even strides): S samples -> S // 2048 latents
        self.layers = nn.Sequential(
            WNConv1d(cfg.io_channels, ch[0], 7, padding=3),
            *[EncoderBlock(ch[i], ch[i + 1], s) for i, s in enumerate(cfg.strides)],
            SnakeBeta(ch[-1]),
            WNConv1d(ch[-1], cfg.encoder_latent_dim, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class OobleckDecoder(nn.Module):
    """[B, latent_dim, L] -> [B, 2, 2048 L], unclamped (final_tanh false, last conv without bias)."""

    def __init__(self, cfg: OobleckConfig):
        super().__init__()
        ch = [cfg.channels * m for m in (1, *cfg.c_mults)]
        n = len(cfg.strides)
        # widest first; each transposed conv maps L to exactly L * s
        self.layers = nn.Sequential(
            WNConv1d(cfg.latent_dim, ch[-1], 7, padding=3),
            *[DecoderBlock(ch[i], ch[i - 1], cfg.strides[i - 1]) for i in range(n, 0, -1)],
            SnakeBeta(ch[0]),
            WNConv1d(ch[0], cfg.io_channels, 7, padding=3, bias=False),
            nn.Tanh() if cfg.final_tanh else nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def vae_bottleneck(pre: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """Sample the posterior: mean + eps * (softplus(scale) + 1e-4), eps ~ N(0, 1) of shape [B, 64, L].

    The official encode *samples* (it does not return the mean): one randn_like(mean) from the device's
    global RNG, which is what eps=None does. Pass `eps` to supply that draw.
    """
    mean, scale = pre.chunk(2, dim=1)  # B 128 L -> 2 x B 64 L
    stdev = F.softplus(scale) + 1e-4  # torch defaults (beta 1, threshold 20); the KL term is not computed
    if eps is None:
        eps = torch.randn_like(mean)
    return eps.to(mean) * stdev + mean  # no latent scale or shift: the SAO pretransform scale is 1


class OobleckVAE(nn.Module):
    """The SAO 1.0 autoencoder (keys after `pretransform.model.`); `encoder`/`decoder` may be left out
    (`parts`) when only one direction is needed. Runs in fp32, as the official pipeline does."""

    def __init__(self, cfg: OobleckConfig = OobleckConfig(), parts=("encoder", "decoder")):
        super().__init__()
        self.cfg = cfg
        self.encoder = OobleckEncoder(cfg) if "encoder" in parts else None
        self.decoder = OobleckDecoder(cfg) if "decoder" in parts else None

    @torch.no_grad()
    def encode(self, audio: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Waveform [B, 2, S] -> sampled latent [B, S // 2048, 64] (pipeline layout, time first).

        `eps`, if given, is the bottleneck's standard-normal draw, in the VAE's own layout [B, 64, S // 2048]
        (the layout the official randn_like draws in, so a seeded generator reproduces it).
        """
        if self.encoder is None:
            raise ValueError("this OobleckVAE was built without its encoder")
        if audio.dim() != 3 or audio.shape[1] != self.cfg.io_channels or audio.shape[2] < self.cfg.hop:
            want = f"[B, {self.cfg.io_channels}, S >= {self.cfg.hop}]"
            raise ValueError(f"audio encode expects {want}; got {tuple(audio.shape)}")
        dev = self.encoder.layers[0].weight_v.device
        latent = vae_bottleneck(self.encoder(audio.to(dev, torch.float32)), eps)  # B 64 L
        return latent.transpose(1, 2)  # B 64 L -> B L 64

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Audio latent [B, N, 64] (pipeline layout) -> waveform [B, 2, 2048 N] at the pipeline's 51.2 kHz."""
        if self.decoder is None:
            raise ValueError("this OobleckVAE was built without its decoder")
        if latent.dim() != 3 or latent.shape[2] != self.cfg.latent_dim:
            raise ValueError(f"audio decode expects [B, N, {self.cfg.latent_dim}], got {tuple(latent.shape)}")
        latent = latent.to(self.decoder.layers[0].weight_v.device, torch.float32)
        return self.decoder(latent.transpose(1, 2))  # B N 64 -> B 64 N -> B 2 (2048 N)

    @torch.no_grad()
    def encode_a2v(self, mono: torch.Tensor, noise=None, window: int = A2V_WINDOW_SAMPLES) -> torch.Tensor:
        """A2V input audio [S] (mono, 51.2 kHz, int16-quantised by the ffmpeg load) -> latent [1, L, 64]
        (`video_process.py` upstream).

        Up to `window` samples: one call, L = S // 2048. Longer: windows of `window` samples every
        window/2, each zero-padded at the end to full length and sampled with its own noise (drawn in
        order), merged with a linear cross-fade over the overlap, trimmed to ceil(S / 2048) latents.
        `noise` supplies the posterior draws: any object with `randn(shape, name)` (the pipeline's
        `sample.Noise`); None draws from the device's global RNG like the official code.
        """
        if mono.dim() != 1:
            raise ValueError(f"encode_a2v expects a mono waveform [S], got {tuple(mono.shape)}")
        s = mono.shape[0]

        def encode_mono(a):  # one posterior sample of a mono clip
            shape = (1, self.cfg.latent_dim, a.shape[0] // self.cfg.hop)
            eps = None if noise is None else noise.randn(shape, "audio_posterior")
            return self.encode(a.float()[None, None].expand(1, 2, -1), eps)  # S -> 1 2 S: mono duplicated

        if s <= window:
            return encode_mono(mono)
        step = window // 2
        feats = []
        for start in range(0, s, step):
            chunk = F.pad(mono[start : start + window], (0, max(0, start + window - s)))  # zero-pad the tail
            feats.append(encode_mono(chunk))  # 1 L 64
            if start + window >= s:
                break
        merged = merge_overlapping(feats)
        # ceil, unlike the short path's floor (official); hop = window / latents-per-window exactly
        return merged[:, : math.ceil(s * feats[0].shape[1] / window)]


def merge_overlapping(feats: list[torch.Tensor], overlap_ratio: float = 0.5) -> torch.Tensor:
    """Official `merge_overlapping_vae_features`: chunks [B, n, C] placed every n - int(n*ratio) frames;
    on each overlap the output fades linearly from the previous chunks to the new one."""
    b, n, c = feats[0].shape
    overlap = int(n * overlap_ratio)
    # the windows advance by n/2 = 362.5 latents but chunks are placed every 363: chunk k sits k/2 frame late
    step = n - overlap
    out = feats[0].new_zeros(b, (len(feats) - 1) * step + n, c)
    out[:, :n] = feats[0]
    j = torch.arange(overlap, dtype=torch.float64, device=out.device)
    w_prev = ((overlap - j) / overlap).to(out.dtype)[None, :, None]  # computed in double, as Python floats
    w_new = (j / overlap).to(out.dtype)[None, :, None]
    for k, f in enumerate(feats[1:], start=1):
        s = k * step
        out[:, s : s + overlap] = w_prev * out[:, s : s + overlap] + w_new * f[:, :overlap]
        out[:, s + overlap : s + n] = f[:, overlap:]
    return out


def resample_to_44k(audio: torch.Tensor) -> np.ndarray:
    """Decoded waveform [1, 2, T] at the pipeline's 51.2 kHz -> float32 array [T * 441/512, 2] at 44.1 kHz.

    Exactly the official `resample_audio_sinc(x, 441/512)`, which despite its name is
    `scipy.signal.resample`: the FFT method over the whole clip (periodic edges, Nyquist bin doubled).
    """
    x = audio[0].detach().float().cpu().numpy().T  # 2 T -> T 2, time-major as post_process hands it over
    return resample(x, int(x.shape[0] * 441 / 512)).astype(np.float32, copy=False)
