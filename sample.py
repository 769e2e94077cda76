"""Sampling for daVinci-MagiHuman: settings, sizes, noise, schedules, the loop, the pipeline, the CLI.

    python sample.py --prompt "A woman in a red coat says: welcome back."   (python sample.py --help)

Mirrors the official repository (GAIR-NLP/daVinci-MagiHuman):
- `inference/pipeline/scheduler_unipc.py`: `FlowUniPCMultistepScheduler` (flow-matching UniPC,
  bh2, order 2, predictor + corrector) and `step_ddim`, as `flow_schedule`, `FlowUniPC`, `step_ddim`;
- `inference/pipeline/video_generate.py`: `MagiEvaluator.evaluate_with_latent` and
  `schedule_latent_step` (the loop, CFG, the dispatch between the updates) as `denoise`, the base
  half of `evaluate` as `base_pass`, and the ZeroSNR table (the negative prompt is in text_encoder.py);
- `inference/pipeline/pipeline.py`: the seeding (`Noise`), and `inference/common/config.py`:
  `EvaluationConfig` (`SampleConfig`).
- `inference/pipeline/{pipeline,entry,video_process}.py`: the order of the stages (`generate`), the
  input and output files (`read_image`, `read_audio`, `write_mp4`) and the command line (`main`).
The SR stage is in sr.py. Facts: ../shared/spec/sampling.md (§ numbers below refer to it).

Reading order: settings and sizes, `Noise`, schedules, the two updates, `denoise` (the loop),
`base_pass`, then the pipeline: inputs, outputs, `Models` (which networks live where), `generate`,
and the command line.

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

from load_weights import atomic_write

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


# ==================================================================================================
# Inputs: prompt, sizes, reference image, audio file (spec §3, §5, §6)
# ==================================================================================================

AUDIO_RATE = 51200  # the rate the pipeline declares for VAE waveforms: 25 latents/s x 2048 samples
OUT_RATE = 44100  # the rate of the written audio (the VAE's true training rate)
SR_SHORT_SIDE = {"540p": 512, "1080p": 1088}  # SR target of the shorter side (official 896x512, 1920x1088)


class InputError(ValueError):
    """Bad user input: reported as one line on stderr with exit status 2."""


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' -> (W, H) in pixels."""
    try:
        w, h = (int(v) for v in str(text).lower().split("x"))
    except ValueError:
        raise InputError(f"--size must look like 448x256 (width x height in pixels), got {text!r}") from None
    if w < 32 or h < 32:
        raise InputError(f"--size {w}x{h} is too small: width and height must be at least 32 px")
    return w, h


def sr_size_for(width: int, height: int, sr: str) -> tuple[int, int]:
    """SR pixel size: the shorter side becomes 512 (540p) or 1088 (1080p), the other scales with it,
    rounded to a multiple of 32 (448x256 -> 896x512 and 1920x1088, the official pairs)."""
    short = SR_SHORT_SIDE[sr]
    scale = short / min(width, height)
    other = int(round(max(width, height) * scale / 32)) * 32
    return (other, short) if width >= height else (short, other)


def read_image(path):
    """The TI2V reference image as a PIL RGB image (EXIF orientation applied later, in vae.py)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise InputError(f"--image {path}: file not found") from None
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"--image {path}: not a readable image ({e.__class__.__name__})") from None
    return image


def read_audio(path, seconds: float | None) -> torch.Tensor:
    """An audio file -> mono float32 [S] at 51.2 kHz, quantised to int16 first, as the official
    `whisper.load_audio(path, sr=51200)` does with the ffmpeg CLI. PyAV runs the same FFmpeg
    resampler (libswresample) that the CLI uses by default. Trimmed to `seconds`, never padded."""
    import av

    try:
        container = av.open(str(path))
    except FileNotFoundError:
        raise InputError(f"--audio {path}: file not found") from None
    except (av.error.FFmpegError, OSError) as e:
        raise InputError(f"--audio {path}: not a readable audio file ({e.__class__.__name__})") from None
    with container:
        if not container.streams.audio:
            raise InputError(f"--audio {path}: the file has no audio stream")
        resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)
        chunks = []
        try:
            for frame in container.decode(audio=0):
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]  # flush
        except av.error.FFmpegError as e:
            raise InputError(f"--audio {path}: cannot decode the audio ({e.__class__.__name__})") from None
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    if seconds is not None:
        pcm = pcm[: int(seconds * AUDIO_RATE)]
    if len(pcm) < 2048:
        raise InputError(f"--audio {path}: shorter than one audio latent (2048 samples at 51.2 kHz, 40 ms)")
    return torch.from_numpy(pcm.astype(np.float32) / 32768.0)  # int16 / 32768, as upstream


# ==================================================================================================
# Outputs: uint8 frames, mp4 (H.264 + AAC) and wav, written atomically (spec §9)
# ==================================================================================================


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """Decoded video [1, 3, F, H, W] in ~[-1, 1] -> uint8 [F, H, W, 3]."""
    x = (0.5 * video[0].float() + 0.5).clamp(0, 1)  # 3 F H W
    # Truncation, not rounding: numpy's astype(uint8) upstream.
    return (x.permute(1, 2, 3, 0) * 255).cpu().numpy().astype(np.uint8)  # F H W 3


def write_mp4(path, frames: np.ndarray, audio: np.ndarray | None, fps: int = 25) -> None:
    """frames uint8 [F, H, W, 3], audio float32 [N, 2] at 44.1 kHz -> one mp4: H.264 yuv420p + AAC.

    Upstream writes the video with imageio (libx264, CRF 10, yuv420p) and muxes a 16-bit wav into AAC
    with the ffmpeg CLI; here both streams go into one file in one pass with PyAV.
    """
    import av

    def write(tmp):
        with av.open(str(tmp), mode="w", format="mp4") as out:
            v = out.add_stream("libx264", rate=fps)
            v.width, v.height, v.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            v.options = {"crf": "10"}  # imageio's quality 8 maps to CRF 10
            a = None
            if audio is not None:
                a = out.add_stream("aac", rate=OUT_RATE)
                a.layout = "stereo"
            for f in frames:
                out.mux(v.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            out.mux(v.encode())
            if a is not None:
                pcm = np.ascontiguousarray(audio.T.astype(np.float32))  # [2, N] planar
                step = 1024  # one AAC frame
                for k in range(0, pcm.shape[1], step):
                    frame = av.AudioFrame.from_ndarray(pcm[:, k : k + step], format="fltp", layout="stereo")
                    frame.sample_rate, frame.pts = OUT_RATE, k
                    out.mux(a.encode(frame))
                out.mux(a.encode())

    atomic_write(path, write)


def write_wav(path, audio: np.ndarray, rate: int = OUT_RATE) -> None:
    """float32 [N, 2] -> 16-bit PCM wav (soundfile's default subtype upstream)."""
    import wave

    pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")

    def write(tmp):
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(audio.shape[1])
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm.tobytes())

    atomic_write(path, write)


# ==================================================================================================
# The networks of a run: from a weights folder or tiny and random; placed by the offload mode
# ==================================================================================================


class Models:
    """Builds each network on first use and keeps it where the offload mode says.

    offload "none": everything stays on the device once loaded (fastest; needs ~80 GB for the
    full 1080p pipeline). "model": a network is on the device only during its stage and is moved
    to host memory afterwards. "layers": as "model", and the DiTs stream their 40 layers from
    pinned host memory one at a time (model.LayerStreamer), so the 15B DiT fits a 24 GB card.
    `builders[name](device)` returns the network (called with "cpu" for streamed DiTs).
    """

    def __init__(self, builders: dict, device, dtype=torch.bfloat16, offload: str = "none",
                 compile: bool = False, sp=None, keep_released: bool = True):
        if offload not in ("none", "model", "layers"):
            raise ValueError(f"offload must be none, model or layers, got {offload!r}")
        self.builders, self.device, self.dtype, self.offload = builders, torch.device(device), dtype, offload
        self.compile, self.sp, self.loaded = compile, sp, {}
        # A one-shot run (the CLI) never needs a released network again: free it instead of
        # spending a device-to-host copy on it.
        self.keep_released = keep_released

    def get(self, name: str):
        import model as dit_lib

        m = self.loaded.get(name)
        is_dit = name in ("dit", "sr_dit")
        if m is None:
            stream = is_dit and self.offload == "layers"
            m = self.builders[name]("cpu" if stream else self.device)
            if stream:
                dit_lib.LayerStreamer(m, self.device)
            if is_dit and self.sp is not None:
                self.sp.apply(m)
            if is_dit and self.compile and not stream:
                dit_lib.compile_layers(m)
            self.loaded[name] = m
        if isinstance(m, torch.nn.Module) and not (is_dit and self.offload == "layers"):
            m.to(self.device)
        return m

    def release(self, name: str) -> None:
        """The stage that needed `name` is over: move it off the device unless offload is "none"."""
        m = self.loaded.get(name)
        if isinstance(m, torch.nn.Module) and self.offload != "none" and self.device.type != "cpu":
            if not self.keep_released:
                return self.drop(name)
            if not (name in ("dit", "sr_dit") and self.offload == "layers"):
                m.to("cpu")
            torch.cuda.empty_cache()

    def drop(self, name: str) -> None:
        self.loaded.pop(name, None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# Rough sizes in GB for choosing an offload mode: weights at their pipeline dtypes (DiT and T5-Gemma
# bf16, audio VAE fp32) and the largest activations of a stage at each output size (the DiT's MLP
# temporaries, the Turbo decode window; README "Memory").
WEIGHTS_GB = {"dit": 30.6, "text_encoder": 18.5, "wan": 1.4, "turbo": 0.2, "audio_vae": 0.6}
ACTIVATIONS_GB = {"none": 4.0, "540p": 10.0, "1080p": 26.0}


def choose_offload(device, sr: str) -> str:
    """--offload auto: everything resident if it fits in 90% of the card, else one network at a
    time if the largest stage fits, else stream the DiT's layers."""
    device = torch.device(device)
    if device.type != "cuda":
        return "none"
    total = torch.cuda.get_device_properties(device).total_memory / 1e9
    dits = 1 + (sr != "none")
    everything = sum(WEIGHTS_GB.values()) + (dits - 1) * WEIGHTS_GB["dit"] + ACTIVATIONS_GB[sr]
    if everything < 0.9 * total:
        return "none"
    if max(WEIGHTS_GB["dit"], WEIGHTS_GB["text_encoder"]) + ACTIVATIONS_GB[sr] < 0.9 * total:
        return "model"
    return "layers"


def release_builders(weights, model: str, sr: str, vae_kind: str, dtype: torch.dtype) -> dict:
    """Builders for the released networks under `weights` (layout: load_weights.py, "The release")."""
    from pathlib import Path

    import load_weights as lw
    from model import dit_config

    w = Path(weights)
    return {
        "dit": lambda dev: lw.load_dit(w / "daVinci-MagiHuman" / model, dit_config(model), dtype, dev),
        "sr_dit": lambda dev: lw.load_dit(w / "daVinci-MagiHuman" / f"{sr}_sr", dit_config(f"{sr}_sr"), dtype, dev),
        "text_encoder": lambda dev: lw.load_text_encoder(w / lw.TEXT_DIR, dtype, dev),
        "tokenizer": lambda dev: lw.load_text_tokenizer(w / lw.TEXT_DIR),
        "turbo": lambda dev: lw.load_turbo_vaed(w / lw.TURBO_JSON, w / lw.TURBO_CKPT, dtype, dev),
        "wan": lambda dev: lw.load_wan_vae(w / lw.WAN_VAE_PTH, dtype, dev),
        "audio_vae": lambda dev: lw.load_audio_vae(w / lw.AUDIO_DIR, dev),  # always fp32, as upstream
    }


def tiny_builders(dtype: torch.dtype, seed: int = 0) -> dict:
    """Tiny networks with seeded random weights: the whole pipeline in seconds on a laptop CPU."""
    import model as dit_lib
    import text_encoder as te
    import vae

    def seeded(make):
        def build(dev):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return make().to(dev)
        return build

    def dit(name):
        def build(dev):
            cfg = dit_lib.dit_config("tiny", coords_style="v1" if name == "sr" else "v2")
            return dit_lib.init_random_(dit_lib.DiT(cfg, block_dtype=dtype).to(dev), seed).eval()
        return build

    return {
        "dit": dit("base"),
        "sr_dit": dit("sr"),
        "text_encoder": seeded(lambda: te.T5GemmaEncoder(te.T5GemmaEncoderConfig.tiny()).eval()),
        "tokenizer": lambda dev: te.GemmaTokenizer(te.tiny_tokenizer()),
        "turbo": seeded(lambda: vae.TurboVAED(vae.TurboVAEDConfig.tiny()).eval()),
        "wan": seeded(lambda: vae.WanVAE(vae.WanVAEConfig.tiny()).eval()),
        "audio_vae": seeded(lambda: vae.OobleckVAE(vae.OobleckConfig.tiny()).eval()),
    }


def lora_builders(builders: dict, specs: list, merge: bool, dit_preset: str, device) -> dict:
    """`builders` with LoRA files (`FILE[:SCALE]`, train.py's adapters) on the base DiT, merged into its
    weights or attached unmerged (load_weights.LoRAHooks). Every file is checked against the DiT's
    shapes on the meta device first, so a LoRA that does not fit stops before any weights load."""
    import load_weights as lw
    from model import DiT, dit_config

    with torch.device("meta"):
        meta_dit = DiT(dit_config(dit_preset))  # shapes only, no memory
    loras = []
    for spec in specs:
        path, sep, scale = spec.rpartition(":")
        try:
            path, scale = (path, float(scale)) if sep else (spec, 1.0)
        except ValueError:  # a colon that is part of the path
            path, scale = spec, 1.0
        lw.load_lora(path, meta_dit)
        loras.append((path, scale))
    build_dit = builders["dit"]

    def build(dev):
        dit = build_dit(dev)
        for path, scale in loras:
            lora = lw.load_lora(path, dit)
            if merge:
                lw.merge_lora(dit, lora, scale)
            else:
                lw.LoRAHooks(dit, lora.to(device), scale)
        return dit

    return {**builders, "dit": build}


# ==================================================================================================
# The pipeline: prompt (+ image / audio) -> frames and waveform (MagiEvaluator.evaluate, spec §0)
# ==================================================================================================


@dataclass
class Request:
    prompt: str
    seconds: int | None = 4  # None with an audio file: take the audio's length
    size: tuple[int, int] = (448, 256)  # requested base width x height in pixels
    sr: str = "none"  # "none", "540p" or "1080p"
    image: object = None  # PIL image (TI2V)
    audio: torch.Tensor | None = None  # mono float32 at 51.2 kHz (A2V)
    seed: int = 42
    vae: str = "turbo"  # video decoder: "turbo" (official default) or "wan"


class Timer:
    """Wall time per stage (device work waited for), for the table printed at the end."""

    def __init__(self, device):
        self.device, self.times = torch.device(device), {}

    def __call__(self, name):
        import contextlib
        import time

        @contextlib.contextmanager
        def stage():
            start = time.perf_counter()
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
        return stage()


def encode_text(models: Models, text: str, text_weights=None):
    """(features [1, n, C] float32 on the device, n). With released weights (`text_weights`, the
    T5-Gemma folder) the features are cached on disk by weights + text, so the negative prompt (and
    a repeated prompt) never loads the 18 GB encoder again."""
    import load_weights as lw
    import text_encoder as te

    def compute():
        return te.encode_prompt(models.get("text_encoder"), models.get("tokenizer"), text)

    if text_weights is None:
        feats, n = compute()
    else:
        variant = f"{models.device.type}/{models.dtype}/{te.TEXT_MAX_LEN}"
        feats, n = lw.cached_text_features(text_weights, text, compute, variant=variant)
    return feats.to(models.device), torch.tensor([n])


def generate(models: Models, req: Request, cfg: SampleConfig, *, text_weights=None, progress=True,
             timer: Timer | None = None, decode: bool = True, latents: dict | None = None):
    """One request -> (frames uint8 [F, H, W, 3], audio float32 [N, 2] at 44.1 kHz), or the latents
    (video, audio) when `decode` is False. Stages in the official order (spec §0). `latents`, if a
    dict, receives the final latents ("video" [1, 48, T, h, w], "audio" [1, N, 64])."""
    import text_encoder as te
    import vae

    timer = timer or Timer(models.device)
    device = models.device
    noise = Noise(req.seed, device)  # every draw of the run, in the official order
    lh, lw = latent_size(*req.size)

    with timer("text encode"):
        # An empty prompt is refused here, before any heavy work.
        text, text_len = encode_text(models, req.prompt, text_weights)
        text_null = text_null_len = None
        if cfg.cfg_number == 2 or (cfg.use_sr_model and cfg.sr_cfg_number == 2):
            text_null, text_null_len = encode_text(models, te.NEGATIVE_PROMPT, text_weights)
        models.release("text_encoder")

    audio_latent = None
    num_frames = None if req.seconds is None else num_frames_for(req.seconds, cfg.fps)
    if req.audio is not None:
        with timer("audio encode"):
            audio_vae = models.get("audio_vae")
            # A2V: the posterior sample is RNG draw #1 (before the video noise); length from the audio.
            audio_latent = audio_vae.encode_a2v(req.audio.to(device), noise=noise)  # [1, L, 64]
            num_frames = audio_latent.shape[1]
            models.release("audio_vae")

    image_latent = sr_image_latent = None
    sr_hw = None
    if cfg.use_sr_model:
        sr_w, sr_h = sr_size_for(*req.size, req.sr)
        sr_hw = latent_size(sr_w, sr_h)
    if req.image is not None:
        with timer("image encode"):
            wan = models.get("wan")
            image_latent = wan.encode_image(vae.image_to_tensor(req.image, 16 * lh, 16 * lw).to(device))
            if sr_hw is not None:  # encoded again at SR size, not upsampled (pitfall 6)
                sr_image_latent = wan.encode_image(vae.image_to_tensor(req.image, 16 * sr_hw[0], 16 * sr_hw[1]).to(device))
            models.release("wan")

    with timer("DiT"):
        video, audio = base_pass(
            models.get("dit"), cfg, text, text_len, text_null, text_null_len, num_frames=num_frames,
            latent_hw=(lh, lw), noise=noise, image_latent=image_latent, audio_latent=audio_latent,
            progress=progress)
        models.release("dit")

    if cfg.use_sr_model:
        import sr as sr_stage

        with timer("SR"):
            video, audio = sr_stage.sr_pass(
                models.get("sr_dit"), cfg, video, audio, text, text_len, text_null, text_null_len,
                sr_latent_hw=sr_hw, noise=noise, image_latent=sr_image_latent, progress=progress)
            models.release("sr_dit")
    if latents is not None:
        latents.update(video=video.detach().cpu().contiguous(), audio=audio.detach().cpu().contiguous())
    if not decode:
        return video, audio

    with timer("decode video"):
        decoder = models.get(req.vae)
        frames = to_uint8_frames(decoder.decode(video))  # Turbo: unclamped; Wan: clamped to [-1, 1]
        models.release(req.vae)
        # The decoders give 4(T-1)+1 frames, fewer than the audio's when 25·seconds is not a multiple
        # of 4 (2 s: 49 frames, 51 audio latents). Upstream muxes the shorter video anyway and players
        # hold its last frame; we repeat that frame so both streams last num_frames / 25 s.
        missing = audio.shape[1] - frames.shape[0]
        if missing > 0:
            frames = np.concatenate([frames, np.repeat(frames[-1:], missing, axis=0)])
    with timer("decode audio"):
        audio_vae = models.get("audio_vae")
        wave_51k = audio_vae.decode(audio)  # [1, 2, 2048 N] at the declared 51.2 kHz
        audio_44k = vae.resample_to_44k(wave_51k)  # [1764 N, 2] float32 (scipy's FFT resample)
        models.release("audio_vae")
    return frames, audio_44k


# ==================================================================================================
# Command line
# ==================================================================================================

EXAMPLES = """examples:
  python sample.py --prompt "A woman in a red coat looks into the camera and says: welcome back."
  python sample.py --prompt-file prompt.txt --image face.png            # TI2V: start from a photo
  python sample.py --prompt-file prompt.txt --audio speech.wav          # A2V: animate given speech
  python sample.py --prompt-file prompt.txt --sr 540p                   # 896x512 through latent SR
  python sample.py --prompt "a person says hello" --tiny-random --seconds 2   # no weights, any CPU
"""


def build_parser():
    import argparse

    p = argparse.ArgumentParser(
        prog="sample.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Generate a talking-person video with its speech (one mp4) from a text prompt, "
                    "optionally from a reference image (TI2V) or a given audio track (A2V).")
    g = p.add_argument_group("what to generate")
    g.add_argument("--prompt", help="the text prompt (describe the person, what they say and how)")
    g.add_argument("--prompt-file", help="read the prompt from this text file instead")
    g.add_argument("--image", help="reference image for the first frame (TI2V)")
    g.add_argument("--audio", help="speech/audio track to animate (A2V); the clip takes its length")
    g.add_argument("--seconds", type=int, default=None, help="clip length in seconds (default 4; with --audio, the audio's length)")
    g.add_argument("--size", default="448x256", help="base video size WxH in pixels, floored to multiples of 32 (default 448x256)")
    g.add_argument("--sr", choices=["none", "540p", "1080p"], default="none",
                   help="latent super-resolution to 540p (896x512) or 1080p (1920x1088) (default none)")
    g.add_argument("--seed", type=int, default=42, help="random seed (default 42, as upstream)")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=["distill", "base"], default="distill",
                   help="distill: 8 steps, no CFG (default); base: 32 steps with CFG")
    m.add_argument("--steps", type=int, default=None, help="sampling steps of the base pass (default 8 / 32)")
    m.add_argument("--vae", choices=["turbo", "wan"], default="turbo", help="video decoder (default turbo)")
    m.add_argument("--weights", default=None, help="folder with the released weights (default $MAGIHUMAN_WEIGHTS or ./weights)")
    m.add_argument("--tiny-random", action="store_true", help="tiny networks with random weights: try the pipeline without weights")
    m.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="LoRA adapters for the DiT (train.py --lora-rank; repeatable; SCALE default 1)")
    m.add_argument("--lora-merge", action="store_true",
                   help="merge the adapters into the DiT's weights once (default: run them unmerged; same output)")
    m.add_argument("--toy", action="store_true", help="the toy world of toy.py (bouncing balls that beep, 32x32, "
                   "checkpoints/toy_*; --weights picks another toy checkpoint folder)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="output mp4 (default magihuman_<seconds>s_<WxH>.mp4)")
    o.add_argument("--wav", action="store_true", help="also write the audio alone next to the mp4")
    o.add_argument("--latents", default=None, help="also save the final video/audio latents to this .safetensors file")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    r.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="bfloat16: the official numerics (default on GPU); float32: exact reference (default on CPU)")
    r.add_argument("--offload", choices=["auto", "none", "model", "layers"], default="auto",
                   help="none: all networks stay on the GPU; model: one network at a time; layers: also stream "
                        "the DiT's layers from host memory (24 GB cards); auto (default): the fastest that fits")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the DiT layers (default: on for CUDA)")
    return p


def _resolve(args):
    """Validate the arguments and turn them into (Request, SampleConfig, output path)."""
    import os
    from pathlib import Path

    if args.prompt_file:
        try:
            args.prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except OSError as e:
            raise InputError(f"--prompt-file {args.prompt_file}: cannot read it ({e.strerror})") from None
    if not args.prompt or not args.prompt.strip():
        raise InputError("the prompt is empty: pass --prompt \"...\" or --prompt-file FILE")
    if args.seconds is not None and args.seconds <= 0:
        raise InputError(f"--seconds must be a positive whole number, got {args.seconds}")
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps must be at least 1, got {args.steps}")
    size = parse_size(args.size)
    floored = tuple(16 * v for v in reversed(latent_size(*size)))
    if floored != size:
        print(f"note: size {size[0]}x{size[1]} is floored to {floored[0]}x{floored[1]} (multiples of 32, as upstream)")
    image = read_image(args.image) if args.image else None
    audio = read_audio(args.audio, args.seconds) if args.audio else None
    seconds = args.seconds if (args.seconds is not None or audio is not None) else 4
    if audio is not None and args.seconds is None:
        seconds = None
    cfg = preset(args.model)
    if args.steps is not None:
        cfg = replace(cfg, num_inference_steps=args.steps)
    if args.sr != "none":
        # Both official SR examples: SR model on, cond pass only (sr_cfg_number = 1).
        cfg = replace(cfg, use_sr_model=True, sr_cfg_number=1)
    req = Request(prompt=args.prompt, seconds=seconds, size=size, sr=args.sr, image=image, audio=audio,
                  seed=args.seed, vae=args.vae)
    out = args.out
    if out is None:
        secs = seconds if seconds is not None else round(len(audio) / AUDIO_RATE)
        out = f"magihuman_{secs}s_{size[0]}x{size[1]}"
        if args.sr != "none":
            out += "_{}x{}".format(*sr_size_for(*size, args.sr))
        out += ".mp4"
    out = Path(out)
    if out.is_dir() or not out.parent.is_dir() or not os.access(out.parent, os.W_OK):
        raise InputError(f"--out {out}: cannot write there (the folder must exist and be writable)")
    return req, cfg, out


def _check_weights(weights, args) -> None:
    import load_weights as lw

    models = [args.model] + ([f"{args.sr}_sr"] if args.sr != "none" else [])
    missing = lw.missing_files(weights, models, args.vae, image=bool(args.image))
    if missing:
        raise InputError(f"weights folder {weights} is missing {', '.join(missing)}; fetch them with: "
                         f"python load_weights.py download {weights}  (or use --tiny-random to try without weights)")


def main(argv=None) -> int:
    import os
    import sys
    from pathlib import Path

    import load_weights as lw

    args = build_parser().parse_args(argv)
    if args.toy:
        return toy_main(args)
    try:
        req, cfg, out = _resolve(args)
        weights = Path(args.weights or os.environ.get("MAGIHUMAN_WEIGHTS", "weights"))
        if not args.tiny_random:
            _check_weights(weights, args)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        rank, sp = _init_distributed(device)
        if sp is not None and device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
        compile_ = args.compile if args.compile is not None else device.type == "cuda"
        builders = tiny_builders(dtype) if args.tiny_random else release_builders(weights, args.model, args.sr, args.vae, dtype)
        if args.lora:
            builders = lora_builders(builders, args.lora, args.lora_merge, "tiny" if args.tiny_random else args.model, device)
        offload = choose_offload(device, args.sr) if args.offload == "auto" else args.offload
        models = Models(builders, device, dtype, offload, compile_, sp, keep_released=False)
        timer = Timer(device)
        text_weights = None if args.tiny_random else weights / lw.TEXT_DIR
        latents = {}
        result = generate(models, req, cfg, text_weights=text_weights, progress=not args.quiet and rank == 0,
                          timer=timer, decode=rank == 0, latents=latents)
        if rank == 0:
            frames, audio = result
            with timer("write"):
                write_mp4(out, frames, audio, fps=cfg.fps)
                if args.wav:
                    write_wav(out.with_suffix(".wav"), audio)
                if args.latents:
                    from safetensors.torch import save_file

                    atomic_write(args.latents, lambda tmp: save_file(latents, str(tmp)))
            print(f"wrote {out} ({frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]} at {cfg.fps} fps, "
                  f"{audio.shape[0] / OUT_RATE:.2f} s of audio)")
            print(format_timings(timer.times))
        if sp is not None:
            import torch.distributed as dist

            dist.barrier()  # the other ranks wait for rank 0's files before gloo/NCCL is torn down
    except (InputError, lw.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output written", file=sys.stderr)
        return 2
    finally:
        _end_distributed()
    return 0


def format_timings(times: dict) -> str:
    rows = [f"  {name:<14}{t:8.2f} s" for name, t in times.items()]
    return "\n".join(["stage timings:"] + rows + [f"  {'total':<14}{sum(times.values()):8.2f} s"])


def _init_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group and split the DiT's sequence over the
    ranks (model.SequenceParallel). Every rank draws the same noise (same seed, same order); only
    rank 0 decodes and writes."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, None
    import torch.distributed as dist
    from model import SequenceParallel

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend)
    return dist.get_rank(), SequenceParallel()


def _end_distributed():
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# ==================================================================================================
# The toy world (toy.py; trained by train.py, distilled by distill.py --toy)
# ==================================================================================================

TOY_CHECKPOINTS = {"base": "checkpoints/toy_base", "distill": "checkpoints/toy_distill"}


def toy_generate(folder, prompt: str, seconds: int = 2, seed: int = 42, model: str = "distill",
                 steps: int | None = None, progress: bool = True):
    """One toy clip through the same base pass as the real model (base: CFG against the null prompt
    and UniPC; distill: step_ddim, no CFG) -> (frames uint8 [F, 32, 32, 3], audio float32 [64 N] at
    1600 Hz). F = 25·seconds + 1: the last decoded frame is repeated up to the audio's length."""
    import load_weights as lw
    import toy

    dit_cfg, norm, words = toy.read_toy_json(folder)
    try:
        text = words.encode(prompt)[None]  # [1, n, C]
    except toy.VocabError as e:
        raise InputError(str(e)) from None
    dit = lw.load_dit(folder, dit_cfg, torch.float32, "cpu")
    cfg = preset(model) if steps is None else preset(model, num_inference_steps=steps)
    num_frames = num_frames_for(seconds)
    video, audio = base_pass(dit, cfg, text, torch.tensor([text.shape[1]]), words.null()[None], torch.tensor([1]),
                             num_frames=num_frames, latent_hw=(16, 16), noise=Noise(seed), progress=progress)
    frames, wave = toy.Codec(norm).decode(video, audio)
    frames = frames[0]
    frames = np.concatenate([frames, np.repeat(frames[-1:], num_frames - len(frames), axis=0)])
    return frames, wave[0]


def toy_main(args) -> int:
    """`sample.py --toy`: write an mp4 of a toy clip (frames upscaled 8x nearest, audio at 44.1 kHz)."""
    import sys
    import time
    from pathlib import Path

    import load_weights as lw
    import toy

    try:
        prompt = args.prompt
        if args.prompt_file:
            try:
                prompt = Path(args.prompt_file).read_text(encoding="utf-8")
            except OSError as e:
                raise InputError(f"--prompt-file {args.prompt_file}: cannot read it ({e.strerror})") from None
        if not prompt or not prompt.strip():
            raise InputError(f"the prompt is empty: pass e.g. --prompt \"{toy.ALL_PROMPTS[0]}\"")
        toy.WordTable(1).words(prompt)  # words outside the toy's vocabulary: one line, before any loading
        seconds = 2 if args.seconds is None else args.seconds
        if seconds <= 0:
            raise InputError(f"--seconds must be a positive whole number, got {seconds}")
        if args.steps is not None and args.steps < 1:
            raise InputError(f"--steps must be at least 1, got {args.steps}")
        if args.image or args.audio or args.sr != "none":
            raise InputError("--toy makes text-to-video+audio only (no --image, --audio or --sr)")
        folder = Path(args.weights) if args.weights else Path(__file__).resolve().parent / TOY_CHECKPOINTS[args.model]
        out = Path(args.out or f"toy_{seconds}s.mp4")
        if out.is_dir() or not out.parent.is_dir():
            raise InputError(f"--out {out}: cannot write there (the folder must exist)")
        start = time.perf_counter()
        frames, wave = toy_generate(folder, prompt, seconds, args.seed, args.model, args.steps, not args.quiet)
        write_mp4(out, toy.upsample_frames(frames), toy.audio_to_44k(wave), fps=25)
    except (InputError, ValueError, lw.CheckpointError) as e:  # VocabError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({len(frames)} frames 256x256 at 25 fps, {len(wave) / toy.AUDIO_RATE:.2f} s of audio) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
