"""The super-resolution (SR) stage's own maths: base-resolution latents -> the SR loop's inputs.

Mirrors the SR half of `MagiEvaluator.evaluate` in the official
`inference/pipeline/video_generate.py` (upsample, ZeroSNR renoise, the audio mix, the per-frame
video guidance of `evaluate_with_latent(use_sr_model=True)`), the `ZeroSNRDDPMDiscretization`
table it renoises with, and the `SR2_1080` override of `inference/common/config.py` (the 1080p SR
DiT's local-attention layers).

The SR DiT is the base network (model.py) built with coords_style "v1" and, for 1080p, local
attention in 32 of its 40 layers: `model.dit_config("540p_sr")` / `("1080p_sr")`. The sampling
settings of the two official SR examples are `sample.preset("540p_sr")` / `("1080p_sr")`.
This file is plain tensor maths and imports no other file of the project: `sample.sr_pass` builds
the SR loop's inputs from these pieces and runs the same denoising loop as the base pass.
`noise` below is any object with `randn(shape, name)` (sample.Noise); `cfg` any object with the
SR fields of sample.SampleConfig.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# ==================================================================================================
# The ZeroSNR table the SR input is renoised with
# ==================================================================================================


def zero_snr_table(n: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> torch.Tensor:
    """Signal coefficient S[k] for k = 0 (clean) .. n-1 (pure noise) of `ZeroSNRDDPMDiscretization`.

    Upstream calls the result "sigmas", but it multiplies the signal: SR renoises with
    x = S[220] * x + sqrt(1 - S[220]^2) * eps (S[220] ~ 0.8389).
    """
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, n, dtype=torch.float64) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas.numpy(), axis=0)  # float64, like upstream
    q = torch.tensor(alphas_cumprod, dtype=torch.float32).sqrt()  # float32 from here on
    # Rescale so the last entry is exactly 0 (zero terminal SNR) and the first is kept.
    # Upstream flips the table twice (get_sigmas and flip=True); the flips cancel.
    return (q - q[-1]) * (q[0] / (q[0] - q[-1]))


# ==================================================================================================
# The pieces of the SR input
# ==================================================================================================


def upsample_latent(video: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[1, 48, T, h, w] -> [1, 48, T, H, W]: trilinear with T kept, i.e. bilinear per frame."""
    T = video.shape[2]
    # align_corners=True as upstream: corners map to corners; False gives other in-between values.
    return F.interpolate(video, size=(T, *latent_hw), mode="trilinear", align_corners=True)


def renoise(x: torch.Tensor, noise_value: int, noise) -> torch.Tensor:
    """x = S[k] * x + sqrt(1 - S[k]^2) * eps with S the ZeroSNR table; k = 0 returns x unchanged."""
    if noise_value == 0:
        return x  # upstream skips the draw too
    if not 0 < noise_value < 1000:
        raise ValueError(f"noise_value must be in 0..999 (a ZeroSNR index), got {noise_value}")
    a = zero_snr_table()[noise_value]  # float32 0-d, ~0.8389 at 220
    return x * a + noise.randn(x.shape, "sr_video") * (1 - a**2) ** 0.5


def audio_input(br_audio: torch.Tensor, noise_scale: float, noise) -> torch.Tensor:
    """The SR DiT's audio input: noise_scale * eps + (1 - noise_scale) * base audio [1, N, 64].

    Deliberately not variance-preserving, as upstream: the DiT has no timestep input and reads the
    noise level off this exact mix. The SR pass's audio prediction is discarded afterwards.
    """
    return noise.randn(br_audio.shape, "sr_audio") * noise_scale + br_audio * (1 - noise_scale)


def sr_video_guidance(latent_T: int, cfg, device=None) -> torch.Tensor:
    """Per-latent-frame SR video CFG scale [1, 1, T, 1, 1] (no t > 500 switch in SR)."""
    g = torch.full((1, 1, latent_T, 1, 1), cfg.sr_video_txt_guidance_scale, dtype=torch.float32, device=device)
    if cfg.use_cfg_trick:
        # The first cfg_trick_start_frame *latent* frames get the smaller scale, in T2V as well as TI2V.
        g[:, :, : cfg.cfg_trick_start_frame] = min(cfg.cfg_trick_value, cfg.sr_video_txt_guidance_scale)
    return g
