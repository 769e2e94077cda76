"""Sampling for daVinci-MagiHuman: settings, sizes, noise, schedules, the loop, the pipeline, the CLI.

    python sample.py --prompt "A woman in a red coat says: welcome back."   (python sample.py --help)

Mirrors the official repository (GAIR-NLP/daVinci-MagiHuman):
- `inference/pipeline/scheduler_unipc.py`: `FlowUniPCMultistepScheduler` (flow-matching UniPC,
  bh2, order 2, predictor + corrector) and `step_ddim`, as `flow_schedule`, `FlowUniPC`, `step_ddim`;
- `inference/pipeline/video_generate.py`: `MagiEvaluator.evaluate_with_latent` and
  `schedule_latent_step` (the loop, CFG, the dispatch between the updates) as `denoise`, the base
  half of `evaluate` as `base_pass` and the loop of its SR half as `sr_pass` (the SR inputs and
  the ZeroSNR table are in sr.py, the negative prompt in text_encoder.py);
- `inference/pipeline/pipeline.py`: the seeding (`Noise`), and `inference/common/config.py`:
  `EvaluationConfig` (`SampleConfig`).
- `inference/pipeline/{pipeline,entry,video_process}.py`: the order of the stages (`generate`), the
  input and output files (`read_image`, `read_audio`, `write_mp4`) and the command line (`main`).
The SR stage's own maths is in sr.py; `sr_pass` here runs it through the same loop.

Reading order: settings and sizes, `Noise`, schedules, the two updates, `denoise` (the loop),
`base_pass` and `sr_pass`, then the pipeline: inputs, outputs, `Models` (which networks live where), `generate`,
and the command line.

The DiT is any callable `dit(video, audio, text, text_len) -> (v_video, v_audio)` (model.py's DiT,
or a replay stub in the tests): video [1, 48, T, h, w], audio [1, N, 64], text [1, L, C] of which
the first text_len rows are real; it returns flow-matching velocities of the same shapes. It gets no
timestep: the noise level is read off the latents alone.

Flow convention: x_sigma = (1 - sigma) * x0 + sigma * eps, velocity v, so x0 = x - sigma * v.
Every latent stays float32 (the DiT does its own bf16 casts inside).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time
import warnings
import wave
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import av
import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, UnidentifiedImageError
from safetensors.torch import save_file
from tqdm import tqdm

import load_weights as lw
import model as dit_lib
import quant as q8
import sr as sr_stage
import text_encoder as te
import toy
import vae
from load_weights import InputError, atomic_write_all
from model import DiT, dit_config

# ==================================================================================================
# Settings (official EvaluationConfig, inference/common/config.py) and the example presets
# ==================================================================================================


@dataclass
class SampleConfig:
    """Sampling settings; field names and defaults are the official `EvaluationConfig`'s. Two of its
    fields live where they are used: `t5_gemma_target_length` is text_encoder.TEXT_MAX_LEN (640) and
    `use_turbo_vae` is `Request.vae` ("turbo", the official default, or "wan").

    The official `use_sr_model` switch is not here: `Request.sr` ("none", "540p", "1080p") is the
    one SR switch, and the sr_* fields below apply when it is on.
    """

    fps: int = 25
    num_inference_steps: int = 32  # base pass
    video_txt_guidance_scale: float = 5.0  # base video CFG while t > 500 (2.0 after, hard-coded)
    audio_txt_guidance_scale: float = 5.0  # audio CFG, constant
    shift: float = 5.0  # timestep shift, base and SR
    cfg_number: int = 2  # 1: cond pass only (-> step_ddim, the distilled model); 2: cond + uncond
    sr_cfg_number: int = 2  # the same for the SR pass (never step_ddim there)
    sr_num_inference_steps: int = 5
    noise_value: int = 220  # ZeroSNR index of the renoise before SR; 0 disables it
    sr_video_txt_guidance_scale: float = 3.5  # SR video CFG (only with sr_cfg_number = 2)
    use_cfg_trick: bool = True  # cap the SR guidance on the first latent frames ...
    cfg_trick_start_frame: int = 13  # ... this many, counted in latent frames ...
    cfg_trick_value: float = 2.0  # ... at this value
    sr_audio_noise_scale: float = 0.7  # SR audio input = 0.7 * noise + 0.3 * base audio


# The four example configs (example/*/config.json), under the names of model.DIT_PRESETS so one
# name picks both. The official "distill": true key is ignored upstream; the distilled behaviour
# comes from cfg_number = 1 and 8 steps alone. Both SR examples set sr_cfg_number = 1, so SR
# guidance and the cfg trick are off there; 1080p differs from 540p only in the SR DiT's local
# attention layers (model.DIT_PRESETS["1080p_sr"]).
PRESETS = {
    "base": SampleConfig(),
    "distill": SampleConfig(cfg_number=1, num_inference_steps=8),
    "540p_sr": SampleConfig(sr_cfg_number=1),
    "1080p_sr": SampleConfig(sr_cfg_number=1),
}


def preset(name: str, **overrides) -> SampleConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


# ==================================================================================================
# Sizes
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
# Noise: every random draw of a run goes through one Noise object
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
# Schedules: the shifted flow-matching timesteps (the ZeroSNR table of SR is in sr.py)
# ==================================================================================================


def shift_sigma(sigma, shift: float):
    """The timestep shift sigma' = shift * sigma / (1 + (shift - 1) * sigma) (numpy or torch)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def train_sigmas(num_train_timesteps: int = 1000) -> np.ndarray:
    """The scheduler's training grid sigma = 1 - alpha, alpha = linspace(1, 1/n, n) reversed, stored as
    float32 upstream: from float32(0.999) = 0.99900001287... (not 1) down to exactly 0."""
    alphas = np.linspace(1, 1 / num_train_timesteps, num_train_timesteps)[::-1].copy()
    return (1.0 - alphas).astype(np.float32)


SIGMA_MAX = float(train_sigmas()[0])  # where every schedule starts: float32(0.999), not 1


def flow_schedule(steps: int, shift: float, num_train_timesteps: int = 1000,
                  sigma_max: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps [steps] int64, sigmas [steps + 1] float32 ending in 0) of `set_timesteps(steps, shift)`.

    NumPy float64 as upstream, so the truncated integer timesteps come out bit-identical.
    `sigma_max` None: the training grid's (SIGMA_MAX); another value only for toy problems.
    """
    if int(steps) < 1:
        raise ValueError(f"the number of sampling steps must be >= 1, got {steps}")
    grid = train_sigmas(num_train_timesteps)
    sigma_min = float(grid[-1])
    if sigma_max is None:
        sigma_max = float(grid[0])
    sigmas = np.linspace(sigma_max, sigma_min, steps + 1).copy()[:-1]  # float64, last (0) dropped
    # The shift is applied here only: the official scheduler is constructed with shift 1 and gets
    # the real shift from set_timesteps, so it is applied once, not twice.
    sigmas = shift_sigma(sigmas, shift)
    # Truncated toward zero, not rounded: the t > 500 guidance switch compares these integers.
    timesteps = torch.from_numpy(sigmas * num_train_timesteps).to(torch.int64)
    sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
    return timesteps, sigmas


# ==================================================================================================
# The updates: flow-matching UniPC (bh2, order 2) and the distilled model's step_ddim (scheduler_unipc.py)
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
        self.last_order = 1  # the previous predictor's order: the corrector reuses it, not the current one

    def _alpha_sigma_lambda(self, k: int):
        sigma = self.sigmas[k]
        alpha = 1 - sigma
        return alpha, sigma, torch.log(alpha) - torch.log(sigma)  # lambda = +inf at sigma = 0

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        i = self.i
        if i >= self.steps:
            raise RuntimeError(f"FlowUniPC: all {self.steps} steps already taken")
        # x0 prediction from the *uncorrected* input sample, as upstream (not from the corrected one).
        m_i = x - self.sigmas[i] * v
        # Corrector (UniC), from step 1 on: redo the previous predictor step using m_i.
        if i > 0:
            x = self._correct(m_i)
        self.m = (self.m + [m_i])[-2:]
        # Order: 1 for the first step (warm-up), 2 after, 1 again at the last step (lower_order_final
        # applies at every N upstream: there is no "< 15 steps" guard as in other UniPC ports).
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
# The denoising loop (evaluate_with_latent + schedule_latent_step in video_generate.py)
# ==================================================================================================

GUIDANCE_SWITCH_T = 500  # base video CFG: the configured scale while the int timestep t > 500 ...
LATE_VIDEO_GUIDANCE = 2.0  # ... and this hard-coded scale after (upstream hard-codes both)


def base_video_guidance(t: int, cfg: SampleConfig) -> float:
    """Base video CFG scale: the configured one while t > 500 (int timestep), then a hard-coded 2.0."""
    return cfg.video_txt_guidance_scale if t > GUIDANCE_SWITCH_T else LATE_VIDEO_GUIDANCE


@dataclass
class Prompt:
    """The text context of one loop: the prompt's features and, for CFG, the negative prompt's."""

    text: torch.Tensor  # [1, L, C], the first text_len rows real
    text_len: torch.Tensor  # [1]
    null: torch.Tensor | None = None  # the negative prompt (cfg_number = 2 only)
    null_len: torch.Tensor | None = None


@dataclass
class Plan:
    """How one loop steps and guides: built from SampleConfig by `base_pass` and `sr_pass`."""

    steps: int
    shift: float
    cfg_number: int  # 1: one cond pass per step; 2: cond + uncond (negative prompt) on the same latents
    video_guidance: Callable[[int], float | torch.Tensor]  # int timestep -> scale (SR: [1, 1, T, 1, 1])
    audio_guidance: float  # constant: the audio CFG has no t > 500 switch
    ddim: bool  # step_ddim for video then audio (the distilled model); else UniPC
    step_audio: bool  # UniPC steps the audio too; False keeps it (A2V, SR). step_ddim always steps it

    def __post_init__(self):
        if self.cfg_number not in (1, 2):
            raise ValueError(f"cfg_number must be 1 (cond only) or 2 (cond + uncond), got {self.cfg_number}")


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale) -> torch.Tensor:
    """Classifier-free guidance: uncond + scale * (cond - uncond)."""
    return uncond + scale * (cond - uncond)


def _record(trace: dict, **tensors) -> None:
    for k, val in tensors.items():
        trace.setdefault(k, []).append(val.detach().clone())


@torch.no_grad()  # sampling never needs gradients; loaded parameters still have requires_grad set
def denoise(dit: Callable, video: torch.Tensor, audio: torch.Tensor, prompt: Prompt, plan: Plan, *,
            image_latent: torch.Tensor | None = None, noise: Noise | None = None, trace: dict | None = None,
            progress: bool = True, desc: str = "denoise") -> tuple[torch.Tensor, torch.Tensor]:
    """Run `plan.steps` denoising steps from (video, audio); returns the final (video, audio) latents.

    `image_latent` (TI2V) is pinned into frame 0 before every call and after the loop. step_ddim
    draws from `noise`. `trace`, if a dict, collects per step what the DiT was fed (x_*) and
    returned (vc_* cond, vu_* uncond) and the guided velocity (vg_*).
    """
    if plan.cfg_number == 2 and (prompt.null is None or prompt.null_len is None):
        raise ValueError("cfg_number = 2 needs the negative-prompt context (text_null, text_null_len)")
    if plan.ddim and noise is None:
        raise ValueError("step_ddim draws fresh noise every step: pass a Noise object")
    # Upstream works on clones of the inputs, and the TI2V pin below writes in place.
    video, audio = video.clone(), audio.clone()
    # Two independent schedulers, as upstream; in A2V and SR the audio one is never stepped.
    video_sched, audio_sched = FlowUniPC(plan.steps, plan.shift), FlowUniPC(plan.steps, plan.shift)
    sigmas = video_sched.sigmas
    for i, t in enumerate(tqdm(video_sched.timesteps.tolist(), desc=desc, disable=not progress)):
        if image_latent is not None:
            # In place, before every call, so the UniPC corrector also sees the pinned frame.
            video[:, :, :1] = image_latent[:, :, :1]
        # 1) Velocities: the cond pass, and with CFG the uncond pass on the same latents.
        vc_video, vc_audio = dit(video, audio, prompt.text, prompt.text_len)
        v_video, v_audio = vc_video, vc_audio
        if plan.cfg_number == 2:
            vu_video, vu_audio = dit(video, audio, prompt.null, prompt.null_len)
            v_video = guide(vc_video, vu_video, plan.video_guidance(t))
            # Computed even where the audio is not stepped (A2V, SR), as upstream.
            v_audio = guide(vc_audio, vu_audio, plan.audio_guidance)
            if trace is not None:
                _record(trace, vu_video=vu_video, vu_audio=vu_audio)
        if trace is not None:
            _record(trace, x_video=video, x_audio=audio, vc_video=vc_video, vc_audio=vc_audio,
                    vg_video=v_video, vg_audio=v_audio)
        # 2) The update.
        if plan.ddim:
            # One video draw, then one audio draw, every step including the last (where the draw is
            # multiplied by sigma = 0): the official draw order. The audio is stepped even in A2V,
            # renoising the given audio: an upstream quirk we keep.
            video = step_ddim(sigmas, i, v_video, video, noise.randn(video.shape, "step_video"))
            audio = step_ddim(sigmas, i, v_audio, audio, noise.randn(audio.shape, "step_audio"))
        else:
            video = video_sched.step(v_video, video)
            if plan.step_audio:
                audio = audio_sched.step(v_audio, audio)
    if image_latent is not None:
        video[:, :, :1] = image_latent[:, :, :1]  # pinned once more after the loop, as upstream
    return video, audio


# ==================================================================================================
# The two passes: base (the first half of MagiEvaluator.evaluate) and SR (its second half)
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
    from `noise` by the audio encoder) is held fixed by UniPC, but stepped (renoised) by step_ddim
    as upstream does. The distilled model is cfg_number = 1, which is what selects step_ddim
    upstream (its config's "distill" key is never read).
    """
    lh, lw = latent_hw
    shape_video = (1, Z_DIM, latent_length(num_frames), lh, lw)
    if image_latent is not None and tuple(image_latent.shape[-2:]) != (lh, lw):
        raise ValueError(f"image latent is {tuple(image_latent.shape[-2:])} but the video latent is {(lh, lw)}")
    if audio_latent is None:
        # Audio is drawn FIRST, then the video: the official draw order.
        audio = noise.randn((1, num_frames, AUDIO_DIM), "audio_init")
    else:
        if tuple(audio_latent.shape) != (1, num_frames, AUDIO_DIM):
            raise ValueError(f"audio latent has shape {tuple(audio_latent.shape)}, expected {(1, num_frames, AUDIO_DIM)}")
        audio = audio_latent.to(device=noise.device, dtype=torch.float32)
    # TI2V draws the full video too; frame 0 of it is overwritten before the first call.
    video = noise.randn(shape_video, "video_init")
    plan = Plan(steps=cfg.num_inference_steps, shift=cfg.shift, cfg_number=cfg.cfg_number,
                video_guidance=lambda t: base_video_guidance(t, cfg),
                audio_guidance=cfg.audio_txt_guidance_scale,
                ddim=cfg.cfg_number == 1,
                step_audio=audio_latent is None)  # UniPC leaves given (A2V) audio alone
    prompt = Prompt(text, text_len, text_null, text_null_len)
    return denoise(dit, video, audio, prompt, plan, image_latent=image_latent, noise=noise, trace=trace,
                   progress=progress, desc="base")


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

    `sr_latent_hw` is `latent_size(sr_width, sr_height)`. TI2V: `image_latent` is the image encoded
    again at SR size [1, 48, 1, H, W]. Draws: video renoise, then audio mix noise (sr.py).
    `trace` as in `denoise`, plus `sr_in_video` / `sr_in_audio`, the SR loop's inputs.
    """
    if image_latent is not None and tuple(image_latent.shape[-2:]) != tuple(sr_latent_hw):
        raise ValueError(f"SR image latent is {tuple(image_latent.shape[-2:])}, expected {tuple(sr_latent_hw)}")
    x = sr_stage.renoise(sr_stage.upsample_latent(br_video, sr_latent_hw), cfg.noise_value, noise)
    a_in = sr_stage.audio_input(br_audio, cfg.sr_audio_noise_scale, noise)
    if trace is not None:
        trace["sr_in_video"], trace["sr_in_audio"] = x.clone(), a_in.clone()
    g = sr_stage.sr_video_guidance(x.shape[2], cfg, device=x.device)
    # A fresh full schedule starting at t = 999 although the input is only partly renoised, as
    # upstream. UniPC on video only: SR never uses step_ddim, even with sr_cfg_number = 1.
    plan = Plan(steps=cfg.sr_num_inference_steps, shift=cfg.shift, cfg_number=cfg.sr_cfg_number,
                video_guidance=lambda t: g, audio_guidance=cfg.audio_txt_guidance_scale,
                ddim=False, step_audio=False)
    prompt = Prompt(text, text_len, text_null, text_null_len)
    video, _ = denoise(sr_dit, x, a_in, prompt, plan, image_latent=image_latent, noise=noise, trace=trace,
                       progress=progress, desc="sr")
    # Upstream returns the base audio: the SR pass's audio prediction is discarded.
    return video, br_audio.clone()


# ==================================================================================================
# Inputs: prompt, sizes, reference image, audio file
# ==================================================================================================

AUDIO_RATE = 51200  # the rate the pipeline declares for VAE waveforms: 25 latents/s x 2048 samples
OUT_RATE = 44100  # the rate of the written audio (the VAE's true training rate)
SR_SHORT_SIDE = {"540p": 512, "1080p": 1088}  # SR target of the shorter side (official 896x512, 1920x1088)


# InputError (load_weights.py) is bad user input: one line on stderr, exit status 2.
PROMPT_FILE_MAX_BYTES = 1_000_000  # a prompt is a paragraph or two; anything bigger is a wrong file
MIN_IMAGE_SIDE = 32  # smaller reference images carry no usable picture after the crop and resize


def parse_size(text: str, flag: str = "--size") -> tuple[int, int]:
    """'WxH' -> (W, H) in pixels."""
    try:
        w, h = (int(v) for v in str(text).strip().lower().split("x"))
    except ValueError:
        raise InputError(f"{flag} must look like 448x256 (width x height in pixels), got {text!r}") from None
    if w < 32 or h < 32:
        raise InputError(f"{flag} {w}x{h} is too small: width and height must be at least 32 px")
    return w, h


def floored_size(width: int, height: int) -> tuple[int, int]:
    """The pixel size a request really runs at: floored to multiples of 32 (480x272 -> 480x256)."""
    lh, lw = latent_size(width, height)
    return VAE_STRIDE[2] * lw, VAE_STRIDE[1] * lh


def sr_size_for(width: int, height: int, sr: str) -> tuple[int, int]:
    """SR pixel size: the shorter side of the base size *as run* (floored to multiples of 32) becomes
    512 (540p) or 1088 (1080p), the other side scales with it, rounded to a multiple of 32:
    448x256 -> 896x512 / 1920x1088 (the official pairs), 480x272 (runs as 480x256) -> 960x512 /
    2048x1088. Scaling the requested size instead would squeeze the picture (480x272 -> 896x512)."""
    width, height = floored_size(width, height)
    short = SR_SHORT_SIDE[sr]
    scale = short / min(width, height)
    other = int(max(width, height) * scale / 32 + 0.5) * 32  # half up, explicitly
    return (other, short) if width >= height else (short, other)


def read_prompt_file(path) -> str:
    """The prompt as the official scripts pass it, `"$(<prompt.txt)"`: UTF-8 text with the trailing
    newlines removed (the shell strips them; every other character, spaces and CRs too, is kept)."""
    p = lw.check_input_file(path, "--prompt-file", PROMPT_FILE_MAX_BYTES)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"--prompt-file {path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    return text.rstrip("\n")


def read_image(path):
    """The TI2V reference image as a PIL RGB image (EXIF orientation applied later, in vae.py)."""
    lw.check_input_file(path, "--image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # > 89 Mpx: refuse, do not warn
            image = Image.open(path)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InputError(f"--image {path}: over {Image.MAX_IMAGE_PIXELS:,} pixels (PIL's decompression-bomb "
                         "limit); scale it down first") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise InputError(f"--image {path}: not a readable image ({e.__class__.__name__})") from None
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        # PIL's convert("RGB") (what upstream's loader runs) clips these to 0..255: a white or black frame.
        raise InputError(f"--image {path}: a {image.mode} (16/32-bit or float) image; save it as 8-bit RGB")
    if min(image.size) < MIN_IMAGE_SIDE:
        raise InputError(f"--image {path}: {image.size[0]}x{image.size[1]} px; width and height must be at "
                         f"least {MIN_IMAGE_SIDE} px")
    return image


def read_audio(path, seconds: float | None) -> torch.Tensor:
    """An audio file -> mono float32 [S] at 51.2 kHz, quantised to int16 first, as the official
    `whisper.load_audio(path, sr=51200)` does with the ffmpeg CLI. PyAV runs the same FFmpeg
    resampler (libswresample) that the CLI uses by default. Trimmed to `seconds` (as upstream),
    never padded; an MP4/M4A's declared duration is honoured (the CLI applies the container's end
    trim, PyAV's decoder does not: AAC would come out ~10 ms long, sometimes one latent more)."""
    lw.check_input_file(path, "--audio")
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        raise InputError(f"--audio {path}: not a readable audio file ({e.__class__.__name__})") from None
    with container:
        if not container.streams.audio:
            raise InputError(f"--audio {path}: the file has no audio stream")
        stream = container.streams.audio[0]
        keep = None if seconds is None else int(seconds * AUDIO_RATE)
        if "mp4" in container.format.name and stream.duration and stream.time_base:
            declared = int(round(float(stream.duration * stream.time_base) * AUDIO_RATE))
            keep = declared if keep is None else min(keep, declared)
        resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE)
        chunks, have = [], 0
        try:
            for frame in container.decode(stream):
                for f in resampler.resample(frame):
                    chunks.append(f.to_ndarray().reshape(-1))
                    have += len(chunks[-1])
                if keep is not None and have >= keep:
                    break  # a long file is not decoded past what is used
            else:
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]  # flush
        except (av.error.FFmpegError, ValueError) as e:
            raise InputError(f"--audio {path}: cannot decode the audio ({e.__class__.__name__})") from None
    pcm = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    if keep is not None:
        pcm = pcm[:keep]
    if len(pcm) < 2048:
        raise InputError(f"--audio {path}: shorter than one audio latent (2048 samples at 51.2 kHz, 40 ms)")
    return torch.from_numpy(pcm.astype(np.float32) / 32768.0)  # int16 / 32768, as upstream


# ==================================================================================================
# Outputs: uint8 frames, mp4 (H.264 + AAC) and wav, written atomically
# ==================================================================================================


def to_uint8_frames(video: torch.Tensor) -> np.ndarray:
    """Decoded video [1, 3, F, H, W] in ~[-1, 1] -> uint8 [F, H, W, 3]."""
    x = (0.5 * video[0].float() + 0.5).clamp(0, 1)  # 3 F H W
    # Truncation, not rounding: numpy's astype(uint8) upstream.
    return (x.permute(1, 2, 3, 0) * 255).cpu().numpy().astype(np.uint8)  # F H W 3


# Output containers by file extension: each holds H.264 + AAC as written here. Anything else is
# refused rather than written as MP4 data under a misleading name.
CONTAINERS = {".mp4": "mp4", ".mov": "mov", ".mkv": "matroska"}
# libx264 picks its thread count from the machine's cores, and the count changes the bitstream: a
# fixed count keeps it out of the bytes (see also x264_params).
X264_THREADS = 4


def x264_params() -> dict:
    """Extra libx264 options that keep its output a function of its input alone.

    On CPUs with AVX-512, x264's AVX-512 code (in the macroblock-tree rate control: `mbtree=0` or
    `rc-lookahead=0` also make it stable) reads heap bytes it never wrote, so the same frames gave a
    different bitstream now and then (about 1 run in 6 at 64x32; with MALLOC_PERTURB_ set, each fill
    byte gave its own bytes). Capping x264 at its AVX2 code gives, on clean memory, the same bytes as
    the AVX-512 code and is stable. Every AVX-512 CPU has AVX2, so the cap never asks for an
    instruction the CPU lacks; elsewhere x264 keeps its own detection."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return {}
    return {"x264-params": "asm=AVX2"} if "avx512f" in flags and "avx2" in flags else {}


def to_yuv420p(frame: np.ndarray):
    """uint8 [H, W, 3] RGB -> a yuv420p av.VideoFrame through swscale's bicubic filter: what the ffmpeg
    CLI (upstream's imageio writer) does, to the bit; PyAV's own default is bilinear."""
    return av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p", interpolation="BICUBIC")


def pcm16(audio: np.ndarray) -> np.ndarray:
    """float [N, C] -> int16 [N, C]: clipped to [-1, 1], scaled by 32767 and rounded, as a 16-bit
    wav is written upstream (the decoder overshoots +-1 now and then)."""
    return (np.clip(audio, -1.0, 1.0) * 32767.0).round().astype("<i2")


def mp4_writer(frames: np.ndarray, audio: np.ndarray | None, fps: int = 25, container: str = "mp4",
               progress: bool = False):
    """A `write(path)` for `atomic_write_all`: frames uint8 [F, H, W, 3], audio float32 [N, 2] at
    44.1 kHz -> one file: H.264 yuv420p (CRF 10) + AAC.

    Upstream writes the video with imageio (libx264, CRF 10, yuv420p) and muxes a 16-bit wav into AAC
    with the ffmpeg CLI; here both streams go into one file in one pass with PyAV, with what the CLI
    does by default: RGB -> yuv420p through swscale's bicubic filter (PyAV's own default is bilinear)
    and the AAC encoder fed the 16-bit samples (so clipped, never above full scale).
    """
    def write(tmp):
        with av.open(str(tmp), mode="w", format=container) as out:
            v = out.add_stream("libx264", rate=fps)
            v.width, v.height, v.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            v.codec_context.thread_count = X264_THREADS
            v.options = {"crf": "10", **x264_params()}  # imageio's quality 8 maps to CRF 10
            a = None
            if audio is not None:
                a = out.add_stream("aac", rate=OUT_RATE)
                a.layout = "stereo"
            for f in tqdm(frames, desc="write video", disable=not progress, leave=False):
                out.mux(v.encode(to_yuv420p(f)))
            out.mux(v.encode())
            if a is not None:
                pcm = np.ascontiguousarray(pcm16(audio).T)  # [2, N] int16, planar
                step = 1024  # one AAC frame
                for k in range(0, pcm.shape[1], step):
                    frame = av.AudioFrame.from_ndarray(pcm[:, k : k + step], format="s16p", layout="stereo")
                    frame.sample_rate, frame.pts = OUT_RATE, k
                    out.mux(a.encode(frame))
                out.mux(a.encode())

    return write


def wav_writer(audio: np.ndarray, rate: int = OUT_RATE):
    """A `write(path)` for `atomic_write_all`: float32 [N, 2] -> 16-bit PCM wav (soundfile's default
    subtype upstream)."""
    pcm = pcm16(audio)

    def write(tmp):
        with wave.open(str(tmp), "wb") as w:
            w.setnchannels(audio.shape[1])
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm.tobytes())

    return write


def write_mp4(path, frames: np.ndarray, audio: np.ndarray | None, fps: int = 25) -> None:
    """`mp4_writer` into `path` atomically; the container follows the extension (CONTAINERS)."""
    container = CONTAINERS.get(Path(path).suffix.lower())
    if container is None:
        raise InputError(f"{path}: the extension must be one of {', '.join(CONTAINERS)}")
    atomic_write_all([(path, mp4_writer(frames, audio, fps, container))])


def write_wav(path, audio: np.ndarray, rate: int = OUT_RATE) -> None:
    atomic_write_all([(path, wav_writer(audio, rate))])


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

    A stage says which networks it needs with `with models.use(name) as net:`; when the block
    ends the network leaves the device (offload "model"/"layers") or is freed (`keep_released`
    False: a one-shot run never needs it again, so no device-to-host copy is spent on it).
    """

    def __init__(self, builders: dict, device, dtype=torch.bfloat16, offload: str = "none",
                 compile: bool = False, sp=None, keep_released: bool = True, quant: str = "none"):
        if offload not in ("none", "model", "layers"):
            raise ValueError(f"offload must be none, model or layers, got {offload!r}")
        self.builders, self.device, self.dtype, self.offload = builders, torch.device(device), dtype, offload
        self.compile, self.sp, self.loaded = compile, sp, {}
        self.quant = quant  # what the builders store the block linears in (part of the text-cache key)
        self.keep_released = keep_released

    @contextlib.contextmanager
    def use(self, name: str, lazy: bool = False):
        """Load `name` onto the device, yield it, and release it when the block ends. `lazy`: yield
        nothing and load only if the block calls `get(name)` (the text encoder on a cache hit)."""
        try:
            yield None if lazy else self.get(name)
        finally:
            self._release(name)

    def get(self, name: str):
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

    def _release(self, name: str) -> None:
        """The stage that needed `name` is over: move it off the device unless offload is "none"."""
        m = self.loaded.get(name)
        if not (isinstance(m, torch.nn.Module) and self.offload != "none" and self.device.type != "cpu"):
            return
        if not self.keep_released:
            del self.loaded[name]
        elif not (name in ("dit", "sr_dit") and self.offload == "layers"):
            m.to("cpu")
        torch.cuda.empty_cache()


# Rough sizes in GB for choosing an offload mode: weights at their pipeline dtypes (DiT and T5-Gemma
# bf16, audio VAE fp32) and the largest activations of a stage at each output size (the DiT's MLP
# temporaries, the Turbo decode window; README, appendix "Memory per run").
WEIGHTS_GB = {"dit": 30.6, "text_encoder": 18.5, "wan": 1.4, "turbo": 0.2, "audio_vae": 0.6}
WEIGHTS_GB_8BIT = {"dit": 15.4, "text_encoder": 10.2}  # --quant int8/fp8 (`python bench.py --memory`)
ACTIVATIONS_GB = {"none": 4.0, "540p": 10.0, "1080p": 26.0}


def choose_offload(device, sr: str, quant: str = "none") -> str:
    """--offload auto: everything resident if it fits in 90% of the card, else one network at a
    time if the largest stage fits, else stream the DiT's layers."""
    device = torch.device(device)
    if device.type != "cuda":
        return "none"
    total = torch.cuda.get_device_properties(device).total_memory / 1e9
    weights = {**WEIGHTS_GB, **(WEIGHTS_GB_8BIT if quant != "none" else {})}
    dits = 1 + (sr != "none")
    everything = sum(weights.values()) + (dits - 1) * weights["dit"] + ACTIVATIONS_GB[sr]
    if everything < 0.9 * total:
        return "none"
    if max(weights["dit"], weights["text_encoder"]) + ACTIVATIONS_GB[sr] < 0.9 * total:
        return "model"
    return "layers"


def release_builders(weights, model: str, sr: str, dtype: torch.dtype, quant: str = "none") -> dict:
    """Builders for the released networks under `weights` (layout: load_weights.py, "The release").
    `quant` stores the block linears of the DiTs and the text encoder in int8/fp8 (quant.py); with
    "none", a folder written by `load_weights.py quantize` keeps its own 8-bit mode."""
    w, dit_config = Path(weights), dit_lib.dit_config
    dit_dir, sr_dir, text_dir = w / "daVinci-MagiHuman" / model, w / "daVinci-MagiHuman" / f"{sr}_sr", w / lw.TEXT_DIR

    def q(folder):
        return quant if quant != "none" else lw.checkpoint_quant_mode(folder)

    return {
        "dit": lambda dev: lw.load_dit(dit_dir, dit_config(model), dtype, dev, quant=q(dit_dir)),
        "sr_dit": lambda dev: lw.load_dit(sr_dir, dit_config(f"{sr}_sr"), dtype, dev, quant=q(sr_dir)),
        "text_encoder": lambda dev: lw.load_text_encoder(text_dir, dtype, dev, quant=q(text_dir)),
        "tokenizer": lambda dev: lw.load_text_tokenizer(w / lw.TEXT_DIR),
        "turbo": lambda dev: lw.load_turbo_vaed(w / lw.TURBO_JSON, w / lw.TURBO_CKPT, dtype, dev),
        "wan": lambda dev: lw.load_wan_vae(w / lw.WAN_VAE_PTH, dtype, dev),
        "audio_vae": lambda dev: lw.load_audio_vae(w / lw.AUDIO_DIR, dev),  # always fp32, as upstream
    }


def tiny_builders(dtype: torch.dtype, seed: int = 0, quant: str = "none") -> dict:
    """Tiny networks with seeded random weights: the whole pipeline in seconds on a laptop CPU.
    `quant` quantizes the DiTs' and the text encoder's block linears after the random init."""

    def seeded(make):
        def build(dev):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return make().to(dev)
        return build

    def dit(name):
        def build(dev):
            cfg = dit_lib.dit_config("tiny", coords_style="v1" if name == "sr" else "v2")
            return q8.quantize_modules(dit_lib.random_dit(cfg, block_dtype=dtype, seed=seed, device=dev), quant)
        return build

    return {
        "dit": dit("base"),
        "sr_dit": dit("sr"),
        "text_encoder": seeded(lambda: q8.quantize_modules(te.T5GemmaEncoder(te.T5GemmaEncoderConfig.tiny()).eval(), quant)),
        "tokenizer": lambda dev: te.GemmaTokenizer(te.tiny_tokenizer()),
        "turbo": seeded(lambda: vae.TurboVAED(vae.TurboVAEDConfig.tiny()).eval()),
        "wan": seeded(lambda: vae.WanVAE(vae.WanVAEConfig.tiny()).eval()),
        "audio_vae": seeded(lambda: vae.OobleckVAE(vae.OobleckConfig.tiny()).eval()),
    }


def lora_builders(builders: dict, specs: list, merge: bool, dit_preset: str, device) -> dict:
    """`builders` with LoRA files (`FILE[:SCALE]`, train.py's adapters) on the base DiT, merged into its
    weights or attached unmerged (load_weights.LoRAHooks). Every file is checked against the DiT's
    shapes on the meta device first, so a LoRA that does not fit stops before any weights load."""
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
# The pipeline: prompt (+ image / audio) -> frames and waveform (MagiEvaluator.evaluate)
# ==================================================================================================


@dataclass
class Request:
    prompt: str
    seconds: int | None = 4  # None with an audio file: take the audio's length
    size: tuple[int, int] = (448, 256)  # requested base width x height in pixels
    sr: str = "none"  # "none", "540p" or "1080p"
    sr_size: tuple[int, int] | None = None  # SR width x height in pixels (None: sr_size_for(size, sr))
    image: object = None  # PIL image (TI2V)
    audio: torch.Tensor | None = None  # mono float32 at 51.2 kHz (A2V)
    seed: int = 42
    vae: str = "turbo"  # video decoder: "turbo" (official default) or "wan"


class Timer:
    """Wall time per stage (device work waited for), for the table printed at the end."""

    def __init__(self, device):
        self.device, self.times = torch.device(device), {}

    def __call__(self, name):
        @contextlib.contextmanager
        def stage():
            start = time.perf_counter()
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start
        return stage()


def encode_text(models: Models, text: str, text_weights=None, progress: bool = False):
    """(features [1, n, C] float32 on the device, n). With released weights (`text_weights`, the
    T5-Gemma folder) the features are cached on disk by weights + text, so the negative prompt (and
    a repeated prompt) never loads the 18 GB encoder again."""

    def compute():
        encoder = models.get("text_encoder")
        with call_bar(list(encoder.layers), len(encoder.layers), "text encode", progress), warnings.catch_warnings():
            if text == te.NEGATIVE_PROMPT:
                # Cut to 640 tokens like any prompt (as upstream); a warning about it is nothing a user
                # can act on (it fires with the tiny byte-level tokenizer of --tiny-random).
                warnings.simplefilter("ignore")
            return te.encode_prompt(encoder, models.get("tokenizer"), text)

    if text_weights is None:
        feats, n = compute()
    else:
        variant = f"{models.device.type}/{models.dtype}/{te.TEXT_MAX_LEN}"
        variant += f"/{models.quant}" if models.quant != "none" else ""  # 8-bit weights change the features
        feats, n = lw.cached_text_features(text_weights, text, compute, variant=variant)
    return feats.to(models.device), torch.tensor([n])


def call_bar(modules, total: int, desc: str, enabled: bool):
    """A progress bar that advances once per forward call of any of `modules` (the networks stay
    free of progress code): the text encoder's layers, the video decoder's windows."""
    @contextlib.contextmanager
    def bar():
        if not enabled:
            yield
            return
        pbar = tqdm(total=total, desc=desc)

        def tick(*_):  # a forward hook must return None (anything else replaces the output)
            pbar.update(1)

        hooks = [m.register_forward_hook(tick) for m in modules]
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            pbar.close()
    return bar()


def decoder_calls(decoder, latent_frames: int) -> int:
    """How many times `decoder.decode` runs its inner decoder: once per latent frame (Wan, causal),
    once per window (Turbo: the first `first_chunk_size` latents, then `step_size` at a time)."""
    cfg = decoder.cfg
    if not hasattr(cfg, "first_chunk_size"):
        return latent_frames
    first, step = cfg.first_chunk_size, cfg.step_size
    return 1 if latent_frames <= first else 1 + -(-(latent_frames - first) // step)


def generate(models: Models, req: Request, cfg: SampleConfig, *, text_weights=None, progress=True,
             timer: Timer | None = None, decode: bool = True, latents: dict | None = None):
    """One request -> (frames uint8 [F, H, W, 3], audio float32 [N, 2] at 44.1 kHz), or the latents
    (video, audio) when `decode` is False. Stages in the official order (pipeline.py, then
    MagiEvaluator.evaluate). `latents`, if a dict, receives the final latents ("video"
    [1, 48, T, h, w], "audio" [1, N, 64]). SR runs when `req.sr` is "540p" or "1080p" (the
    official `use_sr_model`), with the sr_* settings of `cfg`."""
    timer = timer or Timer(models.device)
    device = models.device
    noise = Noise(req.seed, device)  # every draw of the run, in the official order
    lh, lw = latent_size(*req.size)
    use_sr = req.sr != "none"

    with timer("text encode"), models.use("text_encoder", lazy=True):
        # An empty prompt is refused here, before any heavy work.
        text, text_len = encode_text(models, req.prompt, text_weights, progress)
        text_null = text_null_len = None
        if cfg.cfg_number == 2 or (use_sr and cfg.sr_cfg_number == 2):
            text_null, text_null_len = encode_text(models, te.NEGATIVE_PROMPT, text_weights, progress)

    audio_latent = None
    num_frames = None if req.seconds is None else num_frames_for(req.seconds, cfg.fps)
    if req.audio is not None:
        with timer("audio encode"), models.use("audio_vae") as audio_vae:
            # A2V: the posterior sample is RNG draw #1 (before the video noise); length from the audio.
            audio_latent = audio_vae.encode_a2v(req.audio.to(device), noise=noise)  # [1, L, 64]
            num_frames = audio_latent.shape[1]

    image_latent = sr_image_latent = None
    sr_hw = latent_size(*(req.sr_size or sr_size_for(*req.size, req.sr))) if use_sr else None
    if req.image is not None:
        with timer("image encode"), models.use("wan") as wan:
            image_latent = wan.encode_image(vae.image_to_tensor(req.image, 16 * lh, 16 * lw).to(device))
            if use_sr:  # encoded again at SR size, not upsampled, as upstream
                sr_image_latent = wan.encode_image(vae.image_to_tensor(req.image, 16 * sr_hw[0], 16 * sr_hw[1]).to(device))

    with timer("DiT"), models.use("dit") as dit:
        video, audio = base_pass(
            dit, cfg, text, text_len, text_null, text_null_len, num_frames=num_frames,
            latent_hw=(lh, lw), noise=noise, image_latent=image_latent, audio_latent=audio_latent,
            progress=progress)

    if use_sr:
        with timer("SR"), models.use("sr_dit") as sr_dit:
            video, audio = sr_pass(
                sr_dit, cfg, video, audio, text, text_len, text_null, text_null_len,
                sr_latent_hw=sr_hw, noise=noise, image_latent=sr_image_latent, progress=progress)
    if latents is not None:
        latents.update(video=video.detach().cpu().contiguous(), audio=audio.detach().cpu().contiguous())
    if not decode:
        return video, audio

    with timer("decode video"), models.use(req.vae) as decoder:
        with call_bar([decoder.decoder], decoder_calls(decoder, video.shape[2]), "decode video", progress):
            frames = to_uint8_frames(decoder.decode(video))  # Turbo: unclamped; Wan: clamped to [-1, 1]
    # The decoders give 4(T-1)+1 frames, fewer than the audio's when 25·seconds is not a multiple
    # of 4 (2 s: 49 frames, 51 audio latents). Upstream muxes the shorter video anyway and players
    # hold its last frame; we repeat that frame so both streams last num_frames / 25 s.
    missing = audio.shape[1] - frames.shape[0]
    if missing > 0:
        frames = np.concatenate([frames, np.repeat(frames[-1:], missing, axis=0)])
    with timer("decode audio"), models.use("audio_vae") as audio_vae:
        wave_51k = audio_vae.decode(audio)  # [1, 2, 2048 N] at the declared 51.2 kHz
        audio_44k = vae.resample_to_44k(wave_51k)  # [1764 N, 2] float32 (scipy's FFT resample)
    return frames, audio_44k


# ==================================================================================================
# Command line
# ==================================================================================================

EXAMPLES = """examples:
  python sample.py --prompt "A woman in a red coat looks into the camera and says: welcome back."
  python sample.py --prompt-file prompt.txt --image face.png            # TI2V: start from a photo
  python sample.py --prompt-file prompt.txt --audio speech.wav          # A2V: animate given speech
  python sample.py --prompt-file prompt.txt --sr 540p                   # distilled base, then SR to 896x512
  python sample.py --prompt-file prompt.txt --model base --sr 540p      # the official 540p example
  python sample.py --prompt "a person says hello" --tiny-random --seconds 2   # no weights, any CPU
"""


def build_parser():
    p = lw.OneLineParser(
        prog="sample.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES,
        description="Generate a talking-person video with its speech (one mp4) from a text prompt, "
                    "optionally from a reference image (TI2V) or a given audio track (A2V).")
    g = p.add_argument_group("what to generate")
    g.add_argument("--prompt", help="the text prompt (describe the person, what they say and how)")
    g.add_argument("--prompt-file", help="read the prompt from this UTF-8 text file instead (trailing newlines "
                                         "are dropped, as the shell's \"$(<file)\" in the official scripts)")
    g.add_argument("--image", help="reference image for the first frame (TI2V)")
    g.add_argument("--audio", help="speech/audio track to animate (A2V); its first --seconds are used, "
                                   "a shorter track sets the clip's length")
    g.add_argument("--seconds", type=int, default=None,
                   help="clip length in whole seconds (default 4, as upstream; 2 with --toy, the length its "
                   "checkpoints are measured at)")
    g.add_argument("--size", default="448x256", help="base video size WxH in pixels, floored to multiples of 32 (default 448x256)")
    g.add_argument("--sr", choices=["none", "540p", "1080p"], default="none",
                   help="latent super-resolution with the 540p or 1080p SR model: the shorter side becomes "
                        "512 or 1088 px (448x256 -> 896x512 or 1920x1088) (default none)")
    g.add_argument("--sr-size", default=None, help="explicit SR size WxH (with --sr; upstream's --sr_width/--sr_height)")
    g.add_argument("--seed", type=int, default=42, help=f"random seed, 0 to {2**63 - 1} (default 42, as upstream)")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=["distill", "base"], default="distill",
                   help="the model of the base pass (also before --sr): distill: 8 steps, no CFG (default, "
                        "the paper's speed setting); base: 32 steps with CFG (the official examples)")
    m.add_argument("--steps", type=int, default=None, help="sampling steps of the base pass, 1 to 1000 (default 8 / 32)")
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
    o.add_argument("--out", default=None, help="output video, .mp4 (or .mov, .mkv) (default magihuman_<seconds>s_<WxH>.mp4)")
    o.add_argument("--wav", action="store_true", help="also write the audio alone, as OUT with the extension .wav")
    o.add_argument("--latents", default=None, help="also save the final video/audio latents to this .safetensors file")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    r = p.add_argument_group("runtime")
    r.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    r.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="bfloat16: the official numerics (default on GPU); float32: exact reference (default on CPU)")
    r.add_argument("--offload", choices=["auto", "none", "model", "layers"], default="auto",
                   help="none: all networks stay on the GPU; model: one network at a time; layers: also stream "
                        "the DiT's layers from host memory (24 GB cards); auto (default): the fastest that fits")
    r.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the DiT layers (default: on for CUDA)")
    r.add_argument("--quant", choices=["none", "int8", "fp8"], default="none",
                   help="store the block linears of the DiTs and the text encoder in 8 bits (about half the weight "
                        "memory; README 'Low VRAM'). none (default): as on disk")
    return p


MAX_STEPS = 1000  # the training grid has 1000 timesteps; more steps would repeat integer timesteps


def _resolve(args):
    """Validate every argument, read the inputs and check every output path, before any network is
    built. Returns (Request, SampleConfig, {flag: output path})."""
    if args.seconds is None:
        args.seconds = 4  # upstream's default
    if args.prompt_file and args.prompt is not None:
        raise InputError("give --prompt or --prompt-file, not both")
    prompt = read_prompt_file(args.prompt_file) if args.prompt_file else args.prompt
    if not prompt or not prompt.strip():
        raise InputError("the prompt is empty: pass --prompt \"...\" or --prompt-file FILE")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes on the command line arrive as lone surrogates
        raise InputError("the prompt is not valid UTF-8 text") from None
    if args.seconds <= 0:
        raise InputError(f"--seconds must be a positive whole number, got {args.seconds}")
    if args.lora_merge and args.quant != "none":
        raise InputError("--lora-merge needs float weights: drop --quant, or run the adapters unmerged (no --lora-merge)")
    if not 0 <= args.seed < 2**63:
        raise InputError(f"--seed must be between 0 and {2**63 - 1}, got {args.seed}")
    if args.steps is not None and not 1 <= args.steps <= MAX_STEPS:
        raise InputError(f"--steps must be between 1 and {MAX_STEPS}, got {args.steps}")
    size = parse_size(args.size)
    floored = floored_size(*size)
    if floored != size:
        print(f"note: size {size[0]}x{size[1]} is floored to {floored[0]}x{floored[1]} (multiples of 32, as upstream)")
    sr_size = None
    if args.sr_size is not None:
        if args.sr == "none":
            raise InputError("--sr-size needs --sr 540p or --sr 1080p (which SR model to run)")
        sr_size = floored_size(*parse_size(args.sr_size, "--sr-size"))
        if sr_size[0] < floored[0] or sr_size[1] < floored[1]:
            raise InputError(f"--sr-size {sr_size[0]}x{sr_size[1]} is smaller than the base size {floored[0]}x{floored[1]}")
    elif args.sr != "none":
        sr_size = sr_size_for(*size, args.sr)
    outputs = _output_paths(args, size, sr_size)
    image = read_image(args.image) if args.image else None
    audio = read_audio(args.audio, args.seconds) if args.audio else None
    seconds = args.seconds
    if audio is not None:
        if len(audio) >= args.seconds * AUDIO_RATE:
            print(f"note: the audio is used up to --seconds {args.seconds} (as upstream)")
        seconds = None  # A2V: the length comes from the (trimmed) audio
    cfg = preset(args.model)
    if args.steps is not None:
        cfg = replace(cfg, num_inference_steps=args.steps)
    if args.sr != "none":
        # Both official SR examples: SR model on, cond pass only (sr_cfg_number = 1).
        cfg = replace(cfg, sr_cfg_number=1)
    req = Request(prompt=prompt, seconds=seconds, size=size, sr=args.sr, sr_size=sr_size, image=image,
                  audio=audio, seed=args.seed, vae=args.vae)
    return req, cfg, outputs


def _output_paths(args, size, sr_size) -> dict:
    """{flag: resolved path} of every file the run writes, each checked (a regular file or a new
    name in a writable folder, the right extension, no two the same) before any work is done."""
    out = args.out
    if out is None:
        out = f"magihuman_{args.seconds}s_{size[0]}x{size[1]}"
        if sr_size is not None:
            out += "_{}x{}".format(*sr_size)
        out += ".mp4"
    if Path(out).suffix.lower() not in CONTAINERS:
        raise InputError(f"--out {out}: the extension must be one of {', '.join(CONTAINERS)} "
                         "(the file is H.264 + AAC in that container)")
    outputs = {"--out": lw.check_output_path(out, "--out")}
    if args.wav:
        outputs["--wav"] = lw.check_output_path(outputs["--out"].with_suffix(".wav"), "--wav")
    if args.latents:
        outputs["--latents"] = lw.check_output_path(args.latents, "--latents")
    lw.check_distinct(outputs)
    return outputs


def _check_weights(weights, args) -> None:
    models = [args.model] + ([f"{args.sr}_sr"] if args.sr != "none" else [])
    missing = lw.missing_files(weights, models, args.vae, image=bool(args.image))
    if missing:
        raise InputError(f"weights folder {weights} is missing {', '.join(missing)}; fetch them with: "
                         f"python load_weights.py download {weights}  (or use --tiny-random to try without weights)")


def memory_needed(req: Request, cfg: SampleConfig, model: str, dtype: torch.dtype, tiny: bool,
                  on_gpu: bool, quant: str = "none") -> dict:
    """A lower bound of the memory a request needs, in bytes: {"device": ..., "host": ...}.

    Counted: the decoded video at its peak in `to_uint8_frames` (float32 output, the scaled copy,
    the x255 copy: 36 bytes per pixel on the device; on a GPU the host then holds a float32 copy,
    the uint8 frames and the padded frames, 18 bytes), the DiT's residual stream (two copies of
    tokens x hidden in float32) and, on CPU with released weights, the largest network at the run's
    dtype. Real use is higher (measured peak RSS on CPU with --tiny-random: 0.97 GB for the default
    clip, 2.3 GB at --sr 540p, against bounds of 0.45 and 1.8 GB); a request over this bound
    cannot run at all, so it is refused before anything is allocated.
    """
    num_frames = len(req.audio) // 2048 if req.audio is not None else num_frames_for(req.seconds, cfg.fps)
    T = latent_length(num_frames)
    w, h = req.sr_size if req.sr != "none" else floored_size(*req.size)
    pixels = max(4 * (T - 1) + 1, num_frames) * w * h
    tokens = T * (h // 32) * (w // 32) + num_frames + 640
    hidden = dit_config("tiny" if tiny else model).hidden_size
    dit_act = 2 * tokens * hidden * 4
    decode_device = pixels * 3 * 12 + (0 if on_gpu else pixels * 3)  # + the uint8 frames on CPU
    host = pixels * 3 * (4 + 1 + 1) if on_gpu else 0
    weights = 0
    if not tiny and not on_gpu:
        weights = int(max(WEIGHTS_GB["dit"], WEIGHTS_GB["text_encoder"]) * 1e9 * (2 if dtype == torch.float32 else 1))
        if quant != "none":  # 8-bit block linears whatever the compute dtype
            weights = int(max(WEIGHTS_GB_8BIT.values()) * 1e9)
    return {"device": max(dit_act, decode_device) + weights, "host": host}


def _check_memory(req, cfg, args, device, dtype) -> None:
    need = memory_needed(req, cfg, args.model, dtype, args.tiny_random, device.type == "cuda", args.quant)
    have = {"device": lw.available_memory(device), "host": lw.available_memory("cpu")}
    if device.type == "cpu":
        need = {"device": need["device"] + need["host"]}
    for where, n in need.items():
        if n > have[where]:
            what = "host" if where == "host" or device.type == "cpu" else str(device)
            hint = "lower --seconds, --size or --sr" + ("" if args.tiny_random or device.type == "cuda"
                                                         else ", or run on a GPU (--device cuda)")
            raise InputError(f"this request needs at least {n / 1e9:.1f} GB of {what} memory and "
                             f"{have[where] / 1e9:.1f} GB is available: {hint}")


def _check_prompt_memory(tokenizer, prompt: str, device) -> None:
    """The text encoder reads the whole prompt at once (the DiT then keeps the first 640 tokens), and
    its attention masks alone take 2 L^2 bytes: refuse a prompt that cannot fit."""
    n = len(tokenizer.encode(prompt))
    need, have = 2 * n * n, lw.available_memory(device)
    if need > have:
        raise InputError(f"the prompt is {n} tokens; encoding it needs at least {need / 1e9:.0f} GB and "
                         f"{have / 1e9:.1f} GB is available: shorten it (the DiT reads only the first 640 tokens)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    written = []

    def interrupted():
        if written:
            return f"interrupted: after writing {', '.join(map(str, written))}"
        return "interrupted: no output written"

    return lw.guarded(lambda: (toy_main if args.toy else _run)(args, written), interrupted=interrupted)


def _run(args, written: list) -> None:
    req, cfg, outputs = _resolve(args)
    weights = Path(args.weights or os.environ.get("MAGIHUMAN_WEIGHTS", "weights"))
    if not args.tiny_random:
        _check_weights(weights, args)
    device = lw.parse_device(args.device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    _check_memory(req, cfg, args, device, dtype)
    builders = (tiny_builders(dtype, quant=args.quant) if args.tiny_random
                else release_builders(weights, args.model, args.sr, dtype, args.quant))
    if args.lora:  # every file checked against the DiT's shapes here, before any weights load
        builders = lora_builders(builders, args.lora, args.lora_merge, "tiny" if args.tiny_random else args.model, device)
    _check_prompt_memory(builders["tokenizer"]("cpu"), req.prompt, device)
    if args.compile and device.type == "cpu":
        check_cpu_compiler()
    try:
        rank, sp = _init_distributed(device)
        if sp is not None and device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        compile_ = args.compile if args.compile is not None else device.type == "cuda"
        offload = choose_offload(device, args.sr, args.quant) if args.offload == "auto" else args.offload
        models = Models(builders, device, dtype, offload, compile_, sp, keep_released=False, quant=args.quant)
        timer = Timer(device)
        text_weights = None if args.tiny_random else weights / lw.TEXT_DIR
        latents = {}
        result = generate(models, req, cfg, text_weights=text_weights, progress=not args.quiet and rank == 0,
                          timer=timer, decode=rank == 0, latents=latents)
        if rank == 0:
            frames, audio = result
            out = outputs["--out"]
            items = [(out, mp4_writer(frames, audio, cfg.fps, CONTAINERS[out.suffix.lower()], not args.quiet))]
            if "--wav" in outputs:
                items.append((outputs["--wav"], wav_writer(audio)))
            if "--latents" in outputs:
                items.append((outputs["--latents"], lambda tmp: save_file(latents, str(tmp))))
            with timer("write"):
                atomic_write_all(items)  # all or none
            written += [p for p, _ in items]
            print(f"wrote {_shown(out)} ({frames.shape[0]} frames {frames.shape[2]}x{frames.shape[1]} at {cfg.fps} fps, "
                  f"{audio.shape[0] / OUT_RATE:.2f} s of audio)")
            print(format_timings(timer.times))
        if sp is not None:
            dist.barrier()  # the other ranks wait for rank 0's files before gloo/NCCL is torn down
    finally:
        dit_lib.end_distributed(barrier=False)  # the success path has met at its barrier above


def check_cpu_compiler() -> None:
    """torch.compile on CPU writes C++: without a compiler it would fail deep inside the first step."""
    try:
        # Lazy on purpose: a private torch module, needed only for --compile on a CPU.
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:
        raise InputError("--compile on CPU needs a C++ compiler (g++ or clang++, or set CXX); "
                         "install one or drop --compile") from None


def _shown(path) -> str:
    """A path printable on any terminal (undecodable bytes in file names become escapes)."""
    return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def format_timings(times: dict) -> str:
    rows = [f"  {name:<14}{t:8.2f} s" for name, t in times.items()]
    return "\n".join(["stage timings:"] + rows + [f"  {'total':<14}{sum(times.values()):8.2f} s"])


def _init_distributed(device):
    """Under torchrun (WORLD_SIZE > 1): join the process group and split the DiT's sequence over the
    ranks (model.SequenceParallel). Every rank draws the same noise (same seed, same order); only
    rank 0 decodes and writes."""
    rank, world, _ = dit_lib.init_distributed(device)
    return rank, (dit_lib.SequenceParallel() if world > 1 else None)


# ==================================================================================================
# The toy world (toy.py; trained by train.py, distilled by distill.py --toy)
# ==================================================================================================

TOY_CHECKPOINTS = {"base": "checkpoints/toy_base", "distill": "checkpoints/toy_distill"}


def toy_generate(folder, prompt: str, seconds: int = 2, seed: int = 42, model: str = "distill",
                 steps: int | None = None, progress: bool = True):
    """One toy clip through the same base pass as the real model (base: CFG against the null prompt
    and UniPC; distill: step_ddim, no CFG) -> (frames uint8 [F, 32, 32, 3], audio float32 [64 N] at
    1600 Hz). F = 25·seconds + 1: the last decoded frame is repeated up to the audio's length."""
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


def toy_main(args, written: list) -> None:
    """`sample.py --toy`: write an mp4 of a toy clip (frames upscaled 8x nearest, audio at 44.1 kHz).
    Bad input is checked with the same helpers as the real pipeline, before any network is built."""
    prompt = read_prompt_file(args.prompt_file) if args.prompt_file else args.prompt
    if not prompt or not prompt.strip():
        raise InputError(f"the prompt is empty: pass e.g. --prompt \"{toy.ALL_PROMPTS[0]}\"")
    try:
        toy.WordTable(1).words(prompt)  # words outside the toy's vocabulary: one line, before any loading
    except ValueError as e:
        raise InputError(str(e)) from None
    seconds = 2 if args.seconds is None else args.seconds
    if not 0 < seconds <= 60:
        raise InputError(f"--toy: --seconds must be a whole number from 1 to 60, got {seconds}")
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps must be at least 1, got {args.steps}")
    if args.image or args.audio or args.sr != "none":
        raise InputError("--toy makes text-to-video+audio only (no --image, --audio or --sr)")
    folder = Path(args.weights) if args.weights else Path(__file__).resolve().parent / TOY_CHECKPOINTS[args.model]
    out = lw.check_output_path(args.out or f"toy_{seconds}s.mp4", "--out")
    if out.suffix.lower() not in CONTAINERS:
        raise InputError(f"--out {out}: the extension must be one of {', '.join(CONTAINERS)}")
    start = time.perf_counter()
    frames, wave = toy_generate(folder, prompt, seconds, args.seed, args.model, args.steps, not args.quiet)
    write_mp4(out, toy.upsample_frames(frames), toy.audio_to_44k(wave), fps=25)
    written.append(out)
    print(f"wrote {_shown(out)} ({len(frames)} frames 256x256 at 25 fps, {len(wave) / toy.AUDIO_RATE:.2f} s of audio) "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    raise SystemExit(main())
