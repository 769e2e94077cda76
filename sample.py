"""Sampling for daVinci-MagiHuman: settings, sizes, noise, schedules, the updates and the base loop.

Mirrors the official repository (GAIR-NLP/daVinci-MagiHuman):
- `inference/pipeline/scheduler_unipc.py`: `FlowUniPCMultistepScheduler` (flow-matching UniPC,
  bh2, order 2, predictor + corrector) and `step_ddim`, as `flow_schedule`, `FlowUniPC`, `step_ddim`;
- `inference/pipeline/video_generate.py`: `MagiEvaluator.evaluate_with_latent` and
  `schedule_latent_step` (the loop, CFG, the dispatch between the updates) as `denoise`, the base
  half of `evaluate` as `base_pass`, the ZeroSNR table and the negative prompt;
- `inference/pipeline/pipeline.py`: the seeding (`Noise`), and `inference/common/config.py`:
  `EvaluationConfig` (`SampleConfig`).
The SR stage is in sr.py. Facts: ../shared/spec/sampling.md (§ numbers below refer to it).

The DiT is any callable `dit(video, audio, text, text_len) -> (v_video, v_audio)` (model.py's DiT,
or a replay stub in the tests): video [1, 48, T, h, w], audio [1, N, 64], text [1, L, C] of which
the first text_len rows are real; it returns flow-matching velocities of the same shapes. It gets no
timestep: the noise level is read off the latents alone.

Flow convention: x_sigma = (1 - sigma) * x0 + sigma * eps, velocity v, so x0 = x - sigma * v.
Every latent stays float32 (the DiT does its own bf16 casts inside).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

# ==================================================================================================
# Settings (official EvaluationConfig, inference/common/config.py) and the example presets
# ==================================================================================================


@dataclass
class SampleConfig:
    """Sampling settings; field names and defaults are the official `EvaluationConfig`'s."""

    fps: int = 25
    num_inference_steps: int = 32  # base pass
    video_txt_guidance_scale: float = 5.0  # base video CFG while t > 500 (2.0 after, hard-coded)
    audio_txt_guidance_scale: float = 5.0  # audio CFG, constant
    t5_gemma_target_length: int = 640  # prompts are truncated at this many tokens
    shift: float = 5.0  # timestep shift, base and SR
    cfg_number: int = 2  # 1: cond pass only (-> step_ddim, the distilled model); 2: cond + uncond
    sr_cfg_number: int = 2  # the same for the SR pass (never step_ddim there)
    use_sr_model: bool = False
    sr_num_inference_steps: int = 5
    noise_value: int = 220  # ZeroSNR index of the renoise before SR; 0 disables it
    sr_video_txt_guidance_scale: float = 3.5  # SR video CFG (only with sr_cfg_number = 2)
    use_cfg_trick: bool = True  # cap the SR guidance on the first latent frames ...
    cfg_trick_start_frame: int = 13  # ... this many, counted in latent frames ...
    cfg_trick_value: float = 2.0  # ... at this value
    sr_audio_noise_scale: float = 0.7  # SR audio input = 0.7 * noise + 0.3 * base audio
    use_turbo_vae: bool = True  # decode with TurboVAED rather than the Wan2.2 decoder


# The four example configs (example/*/config.json), under the names of model.DIT_PRESETS so one
# name picks both. The official "distill": true key is ignored upstream; the distilled behaviour
# comes from cfg_number = 1 and 8 steps alone. Both SR examples set sr_cfg_number = 1, so SR
# guidance and the cfg trick are off there; 1080p differs from 540p only in the SR DiT's local
# attention layers (model.DIT_PRESETS["1080p_sr"]).
PRESETS = {
    "base": SampleConfig(),
    "distill": SampleConfig(cfg_number=1, num_inference_steps=8),
    "540p_sr": SampleConfig(use_sr_model=True, sr_cfg_number=1),
    "1080p_sr": SampleConfig(use_sr_model=True, sr_cfg_number=1),
}


def preset(name: str, **overrides) -> SampleConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# The official default negative prompt (video_generate.py), encoded once at start-up for the
# uncond pass: a visual list, an audio list and a speech list, joined exactly as upstream does
# (1719 characters, no trailing newline; test_all.py checks its SHA-256 against the spec).
NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, "
    "static, overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, "
    "extra fingers, poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, "
    "fused fingers, still picture, messy background, three legs, many people in the background, "
    "walking backwards"
    ", low quality, worst quality, poor quality, noise, background noise, hiss, hum, buzz, crackle, "
    "static, compression artifacts, MP3 artifacts, digital clipping, distortion, muffled, muddy, "
    "unclear, echo, reverb, room echo, over-reverberated, hollow sound, distant, washed out, harsh, "
    "shrill, piercing, grating, tinny, thin sound, boomy, bass-heavy, flat EQ, over-compressed, "
    "abrupt cut, jarring transition, sudden silence, looping artifact, music, instrumental, sirens, "
    "alarms, crowd noise, unrelated sound effects, chaotic, disorganized, messy, cheap sound"
    ", emotionless, flat delivery, deadpan, lifeless, apathetic, robotic, mechanical, monotone, "
    "flat intonation, undynamic, boring, reading from a script, AI voice, synthetic, text-to-speech, "
    "TTS, insincere, fake emotion, exaggerated, overly dramatic, melodramatic, cheesy, cringey, "
    "hesitant, unconfident, tired, weak voice, stuttering, stammering, mumbling, slurred speech, "
    "mispronounced, bad articulation, lisp, vocal fry, creaky voice, mouth clicks, lip smacks, "
    "wet mouth sounds, heavy breathing, audible inhales, plosives, p-pops, coughing, clearing "
    "throat, sneezing, speaking too fast, rushed, speaking too slow, dragged out, unnatural pauses, "
    "awkward silence, choppy, disjointed, multiple speakers, two voices, background talking, "
    "out of tune, off-key, autotune artifacts"
)

# ==================================================================================================
# Sizes (spec §3)
# ==================================================================================================

VAE_STRIDE = (4, 16, 16)  # time, height, width: pixels per latent
Z_DIM = 48  # video latent channels
AUDIO_DIM = 64  # audio latent channels (one audio latent per video frame)


def latent_size(width: int, height: int) -> tuple[int, int]:
    """Pixel size -> (latent_h, latent_w), floored to even latents (multiples of 32 px) as upstream.

    The DiT's 2x2 patches need even latents, so 480x272 becomes 480x256 (latent 16x30).
    """
    if int(width) < 32 or int(height) < 32:
        raise ValueError(f"video size {width}x{height} is too small: width and height must be >= 32 px")
    lh = (int(height) // VAE_STRIDE[1]) // 2 * 2
    lw = (int(width) // VAE_STRIDE[2]) // 2 * 2
    return lh, lw


def num_frames_for(seconds: int, fps: int = 25) -> int:
    """T2V/TI2V pixel frames: seconds * fps + 1 (101 for 4 s); A2V takes the audio latent length."""
    if int(seconds) < 1:
        raise ValueError(f"seconds must be a positive integer, got {seconds}")
    return int(seconds) * fps + 1


def latent_length(num_frames: int) -> int:
    """Latent frames of a causal 4x time stride: 101 -> 26, 100 (A2V, 4 s) -> 25."""
    return (int(num_frames) - 1) // VAE_STRIDE[0] + 1


# ==================================================================================================
# Noise: every random draw of a run goes through one Noise object (spec §2)
# ==================================================================================================


class Noise:
    """Draws float32 standard normals in the order the caller asks, and logs (name, shape) of each.

    Default: seeded like the official `torch.manual_seed(seed)` (inside `fork_rng`) followed by
    `torch.randn` on the run's device. A fresh generator seeded with `seed` starts the same stream as
    the default generator after `manual_seed` (CPU: Mersenne Twister; CUDA: Philox, offset 0), and
    leaves the global RNG state alone, which is what the official `fork_rng` achieves. Upstream
    draws on CUDA, so a seed reproduces official noise only when `device` is a CUDA device.

    `Noise.replay(tensors)` hands out the given tensors instead, in order, and fails on a shape
    mismatch or a draw too many: the golden cases give every official draw this way.
    """

    def __init__(self, seed: int = 42, device="cpu", replay: list[torch.Tensor] | None = None):
        self.device = torch.device(device)
        self.log: list[tuple[str, tuple[int, ...]]] = []
        self._queue = None if replay is None else list(replay)
        self._gen = None
        if replay is None:
            self._gen = torch.Generator(device=self.device)
            self._gen.manual_seed(int(seed))

    @classmethod
    def replay(cls, tensors: list[torch.Tensor], device="cpu") -> "Noise":
        return cls(device=device, replay=tensors)

    def randn(self, shape, name: str) -> torch.Tensor:
        shape = tuple(int(s) for s in shape)
        self.log.append((name, shape))
        if self._queue is None:
            return torch.randn(shape, generator=self._gen, device=self.device, dtype=torch.float32)
        if not self._queue:
            raise ValueError(f"noise replay: draw #{len(self.log)} ({name}, {shape}) asked past the end of the list")
        eps = self._queue.pop(0)
        if tuple(eps.shape) != shape:
            raise ValueError(f"noise replay: draw #{len(self.log)} ({name}) wants shape {shape}, list has {tuple(eps.shape)}")
        return eps.to(device=self.device, dtype=torch.float32)


# ==================================================================================================
# Schedules: the shifted flow-matching timesteps and the ZeroSNR table (spec §7.2, §8.3)
# ==================================================================================================


def flow_schedule(steps: int, shift: float, num_train_timesteps: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [steps] int64, sigmas [steps + 1] float32 ending in 0) of `set_timesteps(steps, shift)`.

    NumPy float64 as upstream, so the truncated integer timesteps come out bit-identical.
    """
    if int(steps) < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
    # Training grid sigma = 1 - alpha, alpha = linspace(1, 1/n, n) reversed; stored as float32 upstream,
    # so sigma_max = float32(0.999) = 0.99900001287..., sigma_min = 0.
    alphas = np.linspace(1, 1 / num_train_timesteps, num_train_timesteps)[::-1].copy()
    train_sigmas = (1.0 - alphas).astype(np.float32)
    sigma_max, sigma_min = float(train_sigmas[0]), float(train_sigmas[-1])
    sigmas = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]  # float64, last (0) dropped
    # The shift is applied here only: the official constructor runs with shift 1 (pitfall 1).
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    # Truncated toward zero, not rounded: the t > 500 guidance switch compares these integers.
    timesteps = torch.from_numpy(sigmas * num_train_timesteps).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    return timesteps, sigmas


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
# The updates: flow-matching UniPC (bh2, order 2) and the distilled model's step_ddim (spec §7.4-7.5)
# ==================================================================================================


class FlowUniPC:
    """One official `FlowUniPCMultistepScheduler` after `set_timesteps(steps, shift=shift)`.

    Call `step(v, x)` once per timestep, in order. Upstream looks the step index up from t; the
    timesteps are unique, so counting calls gives the same index. Scalars are float32 0-d CPU
    tensors as upstream (they combine with latents on any device).
    """

    def __init__(self, steps: int, shift: float):
        self.timesteps, self.sigmas = flow_schedule(steps, shift)
        self.steps = int(steps)
        self.i = 0  # index of the next step
        self.m: list[torch.Tensor] = []  # x0 predictions of the last two steps, oldest first
        self.last_sample = None  # the (corrected) sample the previous predictor started from
        self.last_order = 1  # the previous predictor's order; the corrector reuses it (pitfall 4)

    def _alpha_sigma_lambda(self, k: int):
        sigma = self.sigmas[k]
        alpha = 1 - sigma
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)  # lambda = +inf at sigma = 0

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        i = self.i
        if i >= self.steps:
            raise RuntimeError(f"FlowUniPC: all {self.steps} steps already taken")
        # x0 prediction from the *uncorrected* input sample (pitfall 4).
        m_i = x - self.sigmas[i] * v
        # Corrector (UniC), from step 1 on: redo the previous predictor step using m_i.
        if i > 0:
            x = self._correct(m_i)
        self.m = (self.m + [m_i])[-2:]
        # Order: 1 for the first step (warm-up), 2 after, 1 again at the last step (lower_order_final
        # applies at every N upstream, there is no "< 15 steps" guard; pitfall 3).
        order = min(2, self.steps - i, i + 1)
        self.last_order = order
        self.last_sample = x
        x_next = self._predict(x, order)
        self.i += 1
        return x_next

    def _predict(self, x: torch.Tensor, order: int) -> torch.Tensor:
        """UniP-bh2 from sigma_i to sigma_{i+1}; at the last step sigma = 0 and this returns m_i exactly."""
        i = self.i
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i + 1)
        _, sigma_s, lambda_s = self._alpha_sigma_lambda(i)
        h = lambda_t - lambda_s
        phi = torch.expm1(-h)  # bh2: B(h) = phi = e^-h - 1
        m0 = self.m[-1]
        x_next = sigma_t / sigma_s * x - alpha_t * phi * m0
        if order == 2:
            _, _, lambda_p = self._alpha_sigma_lambda(i - 1)
            r = (lambda_p - lambda_s) / h
            d1 = (self.m[-2] - m0) / r
            # The order-2 predictor coefficient is a fixed 0.5 upstream, not a solve.
            x_next = x_next - alpha_t * phi * (0.5 * d1)
        return x_next.to(x.dtype)

    def _correct(self, m_i: torch.Tensor) -> torch.Tensor:
        """UniC-bh2: the previous step from sigma_{i-1} to sigma_i again, now also using m_i."""
        i, order = self.i, self.last_order
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(i)
        _, sigma_s, lambda_s = self._alpha_sigma_lambda(i - 1)
        h = lambda_t - lambda_s
        hh = -h
        phi = torch.expm1(hh)
        m0 = self.m[-1]  # m_{i-1}
        x = self.last_sample
        x_c = sigma_t / sigma_s * x - alpha_t * phi * m0
        if order == 1:
            return (x_c - alpha_t * phi * (0.5 * (m_i - m0))).to(x.dtype)
        _, _, lambda_p = self._alpha_sigma_lambda(i - 2)
        r = (lambda_p - lambda_s) / h
        d1 = (self.m[-2] - m0) / r
        # rho solves [[1, 1], [r, 1]] rho = [b1, b2], with b_k from the phi_k recursion of bh2.
        b1 = (phi / hh - 1) / phi
        b2 = ((phi / hh - 1) / hh - 0.5) * 2 / phi
        R = torch.stack([torch.ones(2), torch.stack([r, torch.ones(())])])  # [[1, 1], [r, 1]]
        rho = torch.linalg.solve(R, torch.stack([b1, b2]))  # float32 solve, as upstream
        return (x_c - alpha_t * phi * (rho[0] * d1 + rho[1] * (m_i - m0))).to(x.dtype)


def step_ddim(sigmas: torch.Tensor, i: int, v: torch.Tensor, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The distilled model's stochastic step: jump to x0, then renoise to sigma_{i+1} with fresh eps.

    At the last step sigma_{i+1} = 0 and this returns x0, but upstream still draws eps (so must we).
    """
    x0 = x - sigmas[i] * v
    return sigmas[i + 1] * eps + (1 - sigmas[i + 1]) * x0


# ==================================================================================================
# The denoising loop (evaluate_with_latent + schedule_latent_step, spec §8.1)
# ==================================================================================================


def base_video_guidance(t: int, cfg: SampleConfig) -> float:
    """Base video CFG scale: the configured one while t > 500 (int timestep), then a hard-coded 2.0."""
    return cfg.video_txt_guidance_scale if t > 500 else 2.0


@torch.no_grad()  # sampling never needs gradients; loaded parameters still have requires_grad set
def denoise(
    dit: Callable,
    video: torch.Tensor,
    audio: torch.Tensor,
    text: torch.Tensor,
    text_len: torch.Tensor,
    text_null: torch.Tensor | None,
    text_null_len: torch.Tensor | None,
    *,
    steps: int,
    shift: float,
    cfg_number: int,
    video_guidance: Callable[[int], float | torch.Tensor],
    audio_guidance: float,
    ddim: bool,
    step_audio: bool,
    image_latent: torch.Tensor | None = None,
    noise: Noise | None = None,
    trace: dict | None = None,
    progress: bool = True,
    desc: str = "denoise",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `steps` denoising steps from (video, audio); returns the final (video, audio) latents.

    cfg_number 1: one cond pass per step; 2: cond + one uncond pass (negative prompt) on the same
    latents, shared by video and audio. `video_guidance(t)` gives the video scale at int timestep t
    (a float, or a [1, 1, T, 1, 1] tensor for SR). ddim: `step_ddim` for video then audio (always
    both, as upstream), drawing from `noise`; else UniPC for video, and for audio if `step_audio`.
    `image_latent` (TI2V) is pinned into frame 0 before every call and after the loop.
    `trace`, if a dict, collects per step what the DiT was fed / returned and the guided velocity.
    """
    if cfg_number not in (1, 2):
        raise ValueError(f"cfg_number must be 1 (cond only) or 2 (cond + uncond), got {cfg_number}")
    if cfg_number == 2 and (text_null is None or text_null_len is None):
        raise ValueError("cfg_number = 2 needs the negative-prompt context (text_null, text_null_len)")
    if ddim and noise is None:
        raise ValueError("step_ddim draws fresh noise every step: pass a Noise object")
    # Upstream works on clones of the inputs, and the TI2V pin below writes in place.
    video, audio = video.clone(), audio.clone()
    # Two independent schedulers, as upstream; in A2V and SR the audio one is never stepped.
    video_sched, audio_sched = FlowUniPC(steps, shift), FlowUniPC(steps, shift)
    sigmas = video_sched.sigmas
    for i, t in enumerate(tqdm(video_sched.timesteps.tolist(), desc=desc, disable=not progress)):
        if image_latent is not None:
            # In place, before every call: the corrector then sees the pinned frame (pitfall 6).
            video[:, :, :1] = image_latent[:, :, :1]
        vc_video, vc_audio = dit(video, audio, text, text_len)
        if cfg_number == 2:
            vu_video, vu_audio = dit(video, audio, text_null, text_null_len)
            v_video = vu_video + video_guidance(t) * (vc_video - vu_video)
            # Audio CFG is constant (no t > 500 switch); computed even where the audio is not stepped.
            v_audio = vu_audio + audio_guidance * (vc_audio - vu_audio)
        else:
            v_video, v_audio = vc_video, vc_audio
        if trace is not None:
            rec = {"x_video": video, "x_audio": audio, "vc_video": vc_video, "vc_audio": vc_audio,
                   "vg_video": v_video, "vg_audio": v_audio}
            if cfg_number == 2:
                rec.update(vu_video=vu_video, vu_audio=vu_audio)
            for k, val in rec.items():
                trace.setdefault(k, []).append(val.detach().clone())
        if ddim:
            # One video draw, then one audio draw, every step including the last (pitfall 5).
            # The audio is stepped even in A2V, renoising the given audio: an upstream quirk we keep.
            video = step_ddim(sigmas, i, v_video, video, noise.randn(video.shape, "step_video"))
            audio = step_ddim(sigmas, i, v_audio, audio, noise.randn(audio.shape, "step_audio"))
        else:
            video = video_sched.step(v_video, video)
            if step_audio:
                audio = audio_sched.step(v_audio, audio)
    if image_latent is not None:
        video[:, :, :1] = image_latent[:, :, :1]  # pinned once more after the loop, as upstream
    return video, audio


# ==================================================================================================
# The base pass (the first half of MagiEvaluator.evaluate, spec §0 step 3, §8.2)
# ==================================================================================================


def base_pass(
    dit: Callable,
    cfg: SampleConfig,
    text: torch.Tensor,
    text_len: torch.Tensor,
    text_null: torch.Tensor | None = None,
    text_null_len: torch.Tensor | None = None,
    *,
    num_frames: int,
    latent_hw: tuple[int, int],
    noise: Noise,
    image_latent: torch.Tensor | None = None,
    audio_latent: torch.Tensor | None = None,
    trace: dict | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw the initial noise and denoise at base resolution; returns (video, audio) latents.

    T2V: audio and video start from noise. TI2V: also `image_latent` [1, 48, 1, h, w], the image
    encoded at base size. A2V: `audio_latent` [1, num_frames, 64] (the encoded audio, already drawn
    from `noise` by the audio encoder) is held fixed, except under step_ddim (pitfall 7).
    The distilled model is cfg_number = 1, which selects step_ddim (pitfall 12).
    """
    lh, lw = latent_hw
    shape_video = (1, Z_DIM, latent_length(num_frames), lh, lw)
    if image_latent is not None and tuple(image_latent.shape[-2:]) != (lh, lw):
        raise ValueError(f"image latent is {tuple(image_latent.shape[-2:])} but the video latent is {(lh, lw)}")
    if audio_latent is None:
        # Audio is drawn FIRST, then the video (pitfall 5).
        audio = noise.randn((1, num_frames, AUDIO_DIM), "audio_init")
    else:
        if tuple(audio_latent.shape) != (1, num_frames, AUDIO_DIM):
            raise ValueError(f"audio latent has shape {tuple(audio_latent.shape)}, expected {(1, num_frames, AUDIO_DIM)}")
        audio = audio_latent.to(device=noise.device, dtype=torch.float32)
    # TI2V draws the full video too; frame 0 of it is overwritten before the first call.
    video = noise.randn(shape_video, "video_init")
    ddim = cfg.cfg_number == 1
    return denoise(
        dit, video, audio, text, text_len, text_null, text_null_len,
        steps=cfg.num_inference_steps, shift=cfg.shift, cfg_number=cfg.cfg_number,
        video_guidance=lambda t: base_video_guidance(t, cfg),
        audio_guidance=cfg.audio_txt_guidance_scale,
        ddim=ddim,
        step_audio=audio_latent is None,  # UniPC leaves given (A2V) audio alone; step_ddim does not
        image_latent=image_latent, noise=noise, trace=trace, progress=progress, desc="base",
    )
