"""The super-resolution (SR) stage: base-resolution latents -> SR latents with the SR DiT.

Mirrors the SR half of `MagiEvaluator.evaluate` in the official
`inference/pipeline/video_generate.py` (upsample, ZeroSNR renoise, the audio mix, then
`evaluate_with_latent(use_sr_model=True)`), and the `SR2_1080` override of
`inference/common/config.py` (the 1080p SR DiT's local-attention layers). Facts:
../shared/spec/sampling.md §8.3 and ../shared/spec/dit.md §8.

The SR DiT is the base network (model.py) built with coords_style "v1" and, for 1080p, local
attention in 32 of its 40 layers: `model.dit_config("540p_sr")` / `("1080p_sr")`. The sampling
settings of the two official SR examples are `sample.preset("540p_sr")` / `("1080p_sr")`.
Everything else here is plain tensor maths around `sample.denoise`.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from sample import Noise, SampleConfig, denoise, zero_snr_table

# ==================================================================================================
# The pieces of the SR input
# ==================================================================================================


def upsample_latent(video: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """[1, 48, T, h, w] -> [1, 48, T, H, W]: trilinear with T kept, i.e. bilinear per frame."""
    T = video.shape[2]
    # align_corners=True as upstream: corners map to corners; False gives other in-between values.
    return F.interpolate(video, size=(T, *latent_hw), mode="trilinear", align_corners=True)


def renoise(x: torch.Tensor, noise_value: int, noise: Noise) -> torch.Tensor:
    """x = S[k] * x + sqrt(1 - S[k]^2) * eps with S the ZeroSNR table; k = 0 returns x unchanged."""
    if noise_value == 0:
        return x  # upstream skips the draw too
    if not 0 < noise_value < 1000:
        raise ValueError(f"noise_value must be in 0..999 (a ZeroSNR index), got {noise_value}")
    a = zero_snr_table()[noise_value]  # float32 0-d, ~0.8389 at 220
    return x * a + noise.randn(x.shape, "sr_video") * (1 - a**2) ** 0.5


def sr_video_guidance(latent_T: int, cfg: SampleConfig, device=None) -> torch.Tensor:
    """Per-latent-frame SR video CFG scale [1, 1, T, 1, 1] (no t > 500 switch in SR)."""
    g = torch.full((1, 1, latent_T, 1, 1), cfg.sr_video_txt_guidance_scale, dtype=torch.float32, device=device)
    if cfg.use_cfg_trick:
        # The first cfg_trick_start_frame *latent* frames get the smaller scale, in T2V as well as TI2V.
        g[:, :, : cfg.cfg_trick_start_frame] = min(cfg.cfg_trick_value, cfg.sr_video_txt_guidance_scale)
    return g


# ==================================================================================================
# The SR pass
# ==================================================================================================


def sr_pass(
    sr_dit: Callable,
    cfg: SampleConfig,
    br_video: torch.Tensor,
    br_audio: torch.Tensor,
    text: torch.Tensor,
    text_len: torch.Tensor,
    text_null: torch.Tensor | None = None,
    text_null_len: torch.Tensor | None = None,
    *,
    sr_latent_hw: tuple[int, int],
    noise: Noise,
    image_latent: torch.Tensor | None = None,
    trace: dict | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Base latents (br_video, br_audio) -> (SR video latent, audio latent to decode).

    `sr_latent_hw` is `sample.latent_size(sr_width, sr_height)`. TI2V: `image_latent` is the image
    encoded again at SR size [1, 48, 1, H, W]. Draws: video renoise, then audio mix noise.
    `trace` as in `sample.denoise`, plus `sr_in_video` / `sr_in_audio`, the SR loop's inputs.
    """
    if image_latent is not None and tuple(image_latent.shape[-2:]) != tuple(sr_latent_hw):
        raise ValueError(f"SR image latent is {tuple(image_latent.shape[-2:])}, expected {tuple(sr_latent_hw)}")
    x = renoise(upsample_latent(br_video, sr_latent_hw), cfg.noise_value, noise)
    # Upstream returns the base audio: the SR pass's audio prediction is discarded (pitfall 9).
    audio_out = br_audio.clone()
    # The SR model's audio input: a fixed mix, deliberately not variance-preserving (the DiT has no
    # timestep, so it reads the noise level off this exact mix; pitfall 22).
    s = cfg.sr_audio_noise_scale
    a_in = noise.randn(br_audio.shape, "sr_audio") * s + br_audio * (1 - s)
    if trace is not None:
        trace["sr_in_video"], trace["sr_in_audio"] = x.clone(), a_in.clone()
    g = sr_video_guidance(x.shape[2], cfg, device=x.device)
    # A fresh full schedule starting at t = 999 although the input is only partly renoised (pitfall 10).
    # UniPC on video only: never step_ddim in SR, even with sr_cfg_number = 1 (spec §7.7).
    video, _ = denoise(
        sr_dit, x, a_in, text, text_len, text_null, text_null_len,
        steps=cfg.sr_num_inference_steps, shift=cfg.shift, cfg_number=cfg.sr_cfg_number,
        video_guidance=lambda t: g, audio_guidance=cfg.audio_txt_guidance_scale,
        ddim=False, step_audio=False,
        image_latent=image_latent, noise=noise, trace=trace, progress=progress, desc="sr",
    )
    return video, audio_out
