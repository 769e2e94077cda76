"""DMD-2 distillation of the joint audio-video DiT into an 8-step, CFG-free student.

daVinci-MagiHuman's 8-step `distill` checkpoint was made with DMD-2 (Yin et al. 2024, "Improved
Distribution Matching Distillation"), but no training code was released. This file is that code,
written from the DMD-2 paper and its public ports (tianweiy/DMD2, CausVid, Self-Forcing, FastVideo);
It mirrors no official file; the student it
trains is sampled exactly like the official distilled model (`step_ddim` on the 8-σ shift-5 grid of
`inference/pipeline/scheduler_unipc.py`, no CFG), so the result loads through
`load_weights.load_dit` and runs in `sample.py` as a distilled model.

The idea in a few lines:
- Three copies of the DiT: the frozen teacher gives the "real" score (with CFG against the negative
  prompt, video/audio scales as in the base sampler); a trainable "fake" score (the critic) tracks
  what the student currently generates; the student (generator) starts as the teacher.
- The student runs its own 8-step sampler from noise (backward simulation) and its x0 at a random
  step is re-noised to a random σ. Where teacher and critic disagree about that noisy sample, the
  student is pushed towards the teacher: ∇ ∝ (x0_fake − x0_real), normalised per sample and modality.
- The critic learns plain flow matching on the student's (detached) samples, N times per student
  step (two time-scale update rule). Optionally a GAN head on critic features and a LoRA critic.
- The DiT is timestep-free: no network call ever sees σ. σ only enters the noising and the
  velocity <-> x0 conversions (x0 = x − σ·v).

Latents are handled as a tuple with one tensor per modality, (video [B, 48, T, h, w], audio
[B, N, 64]); every per-modality loss is a separate mean with its own weight.

Run: `torchrun --nproc-per-node 8 distill.py --teacher DIR --prompts FILE --out DIR` (FSDP2; the
same script runs as one plain process too; the prompts are encoded once with T5-Gemma and cached),
`python distill.py --tiny-random --out DIR` (CPU demo with random weights). README's appendix
has the memory/GPU estimates. The DMD code is generic over the network: `test_all.py` runs
the very same `Distiller` on a 2-D Gaussian-mixture toy through `velocity_fn`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed._composable import checkpoint
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import load_weights
import model as dit_lib
import sample
import text_encoder as te
from model import DiT, DiTConfig, dit_config
from sample import GUIDANCE_SWITCH_T, LATE_VIDEO_GUIDANCE, SIGMA_MAX, SampleConfig, shift_sigma

Latents = tuple  # one tensor per modality: (video [B, 48, T, h, w], audio [B, N, 64])
MODALITIES = ("video", "audio")

# ==================================================================================================
# Configuration
# ==================================================================================================


@dataclass
class DistillConfig:
    """Every knob of a DMD-2 run. Defaults are for the 15B joint DiT; [E] marks choices of ours
    (no upstream value exists); the rest follow the DMD2 paper or the public port named beside them."""

    # Student sampler: K steps on the shifted grid of `set_timesteps(K, shift=5)`.
    steps: int = 8
    grid_shift: float = 5.0
    grid_sigma_max: float = SIGMA_MAX  # the scheduler's float32(0.999); the 2-D toy uses 1
    # Real score: the base sampler's CFG, video 5.0 while t > 500 else 2.0, audio 5.0 always.
    cfg_video_high: float = SampleConfig.video_txt_guidance_scale  # while t > cfg_switch_t
    cfg_video_low: float = LATE_VIDEO_GUIDANCE  # after the switch
    cfg_switch_t: int = GUIDANCE_SWITCH_T  # the sampler's switch; change it only to experiment
    cfg_audio: float = SampleConfig.audio_txt_guidance_scale
    # Noise levels of the DMD and critic losses (as the flow-matching ports): σ = clamp(shift(u), lo, hi), u ~ U[0, 1).
    dmd_shift: float = 5.0
    dmd_sigma_min: float = 0.02
    dmd_sigma_max: float = 0.98
    critic_shift: float = 5.0
    critic_sigma_min: float = 0.02
    critic_sigma_max: float = 0.98
    # Per-modality loss weights [E]: each modality's loss is its own mean.
    video_weight: float = 1.0
    audio_weight: float = 1.0
    # Two time-scale update rule and optimisers: lr 2e-6 for both as CausVid (Wan, bidirectional);
    # betas (0, 0.999) as Self-Forcing and FastVideo LTX-2; wd 0.01 and clip 10 as DMD2 [R][V].
    critic_ratio: int = 5  # critic steps per generator step
    batch_size: int = 1  # per process
    lr_generator: float = 2e-6
    lr_critic: float = 2e-6
    betas: tuple = (0.0, 0.999)
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    # EMA of the student: decay 0.99 from generator step 200 (Self-Forcing, FastVideo); 0 = off.
    ema_decay: float = 0.99
    ema_start: int = 200
    # Optional GAN head on critic features (DMD2's diffusion-GAN); needs real paired latents. Weights are DMD2 SDXL's.
    gan: bool = False
    gan_layer: int = 20  # the critic layer whose output the head reads [E]: the middle of 40
    gan_hidden: int = 256
    gan_gen_weight: float = 5e-3
    gan_disc_weight: float = 1e-2
    # LoRA critic: 0 = full critic; r > 0 = rank-r adapters on the frozen teacher [V DMD2_wanx].
    critic_lora_rank: int = 0
    critic_lora_alpha: float = 0.0  # 0 means alpha = rank (scale 1)
    # Speed/memory: bf16 autocast around the fp32 student/critic, activation checkpointing.
    autocast: bool = True  # only takes effect on CUDA ...
    autocast_cpu: bool = False  # ... unless this is on too, and the CPU has native bf16 GEMMs (`cpu_bf16_is_fast`) [E]
    grad_checkpointing: bool = True  # per-layer activation checkpointing (needed at 15B)
    seed: int = 0

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.steps < 1 or self.critic_ratio < 1 or self.batch_size < 1:
            raise ValueError("steps, critic_ratio and batch_size must all be >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        # Every other knob a user can type: finite, and in the range where the formulas mean something.
        for name, value in asdict(self).items():
            for v in (value if isinstance(value, tuple) else (value,)):
                if isinstance(v, float) and not math.isfinite(v):
                    raise ValueError(f"{name} must be a finite number, got {v}")
        for lo, hi, what in ((self.grid_sigma_max, None, "grid_sigma_max"), (self.dmd_sigma_min, self.dmd_sigma_max, "dmd"),
                             (self.critic_sigma_min, self.critic_sigma_max, "critic")):
            if hi is None and not 0 < lo <= 1:
                raise ValueError(f"{what} must be in (0, 1], got {lo}")
            if hi is not None and not 0 <= lo < hi <= 1:
                raise ValueError(f"{what}_sigma_min/max must satisfy 0 <= min < max <= 1, got {lo}, {hi}")
        if min(self.grid_shift, self.dmd_shift, self.critic_shift, self.grad_clip) <= 0:
            raise ValueError("the shifts and grad_clip must be > 0")
        if min(self.lr_generator, self.lr_critic, self.weight_decay, self.video_weight, self.audio_weight,
               self.gan_gen_weight, self.gan_disc_weight, self.critic_lora_rank, self.critic_lora_alpha,
               self.ema_start, self.gan_layer) < 0:
            raise ValueError("learning rates, weights, decays, critic_lora_rank/alpha, ema_start and gan_layer must be >= 0")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.gan_hidden < 1 or not 0 <= self.cfg_switch_t <= 1000 or not 0 <= self.seed < 2**63:
            raise ValueError("gan_hidden must be >= 1, cfg_switch_t in [0, 1000], seed in [0, 2**63)")


# ==================================================================================================
# Flow-matching conventions and noise levels
# ==================================================================================================


def per_sample(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """σ [B] -> [B, 1, ..., 1] broadcastable against x, on x's device."""
    return sigma.to(x.device).view(-1, *[1] * (x.dim() - 1))  # [B] -> [B, 1, ..., 1]


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε (the scheduler's `add_noise`, and `step_ddim`'s re-noise)."""
    s = per_sample(sigma, x0).to(x0.dtype)  # stays in the latents' dtype (float32, as upstream)
    return (1 - s) * x0 + s * noise


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0̂ = x_σ − σ·v, in float64: DMD takes differences of nearly equal predictions."""
    return x.double() - per_sample(sigma, x).double() * v.double()


def velocity_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """v = (x_σ − x0̂)/σ, the inverse of `x0_from_velocity` (σ > 0)."""
    return (x.double() - x0.double()) / per_sample(sigma, x).double()


def student_sigmas(steps: int, shift: float = 5.0, sigma_max: float = SIGMA_MAX) -> torch.Tensor:
    """The distilled sampler's grid σ_0 > ... > σ_{K-1} > σ_K = 0, float32 [K + 1]: the sampler's
    own `sample.flow_schedule(K, shift)` (K = 8 gives 0.9998, 0.9720, 0.9373, 0.8926, 0.8331,
    0.7497, 0.6247, 0.4164, 0). σ_max is a parameter only so the 2-D toy can use the grid 1 - k/K.
    """
    return sample.flow_schedule(steps, shift, sigma_max=sigma_max)[1]


def training_sigmas(n: int, shift: float, lo: float, hi: float, generator: torch.Generator) -> torch.Tensor:
    """σ [n] for the DMD/critic losses: u ~ U[0, 1), shifted, then clamped (the flow-matching ports).

    The clamp after a shift of 5 puts ~9% of draws exactly on σ = hi; that is what the ports do.
    """
    u = torch.rand(n, generator=generator, dtype=torch.float64)  # one σ per sample, on the CPU RNG
    return shift_sigma(u, shift).clamp(lo, hi).float()  # float32 like the scheduler's sigmas


# ==================================================================================================
# The DMD gradient and the losses
# ==================================================================================================


def dmd_direction(x0: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """g = (x0_fake − x0_real) / n, with n = mean |x0 − x0_real| per sample (float64; DMD2's normaliser).

    The score difference s_fake − s_real is proportional to x0_real − x0_fake at a given (x_σ, σ),
    so −g points from what the student makes towards what the teacher would make. Dividing by the
    per-sample distance to the teacher's prediction is DMD's weighting: it equalises the step size
    across samples and noise levels. NaN/inf (n = 0) become finite numbers, as upstream does.
    """
    x0, real, fake = x0.detach().double(), x0_real.double(), x0_fake.double()
    dims = tuple(range(1, x0.dim()))  # every non-batch dim: one scalar per sample
    norm = (x0 - real).abs().mean(dim=dims, keepdim=True)  # [B, 1, ...]
    return torch.nan_to_num((fake - real) / norm)


def dmd_loss(x0: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """½·mean (x0 − stopgrad(x0 − g))²: its gradient w.r.t. x0 is exactly g / numel(x0).

    The value (½·mean g²) is not a quality metric; log mean |g| instead.
    """
    x0 = x0.double()
    target = (x0 - g).detach()  # the stop-grad trick: the teacher/critic never see a gradient
    return 0.5 * F.mse_loss(x0, target)


def flow_loss(v: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """Flow matching on (detached) student samples: mean (v_fake − (ε − x0))² (the "flow" loss)."""
    return F.mse_loss(v.float(), (noise - x0).float())  # float32 even when v came out of bf16 autocast


def gan_generator_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return F.softplus(-logits_fake).mean()  # non-saturating: −log σ(ℓ_fake)


def gan_discriminator_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> torch.Tensor:
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


def cpu_bf16_is_fast() -> bool:
    """Whether this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX).

    Only then does bf16 autocast on the CPU pay. Elsewhere (AVX2-only CPUs such as many AMD EPYC
    cloud cores) oneDNN emulates the bf16 GEMMs: measured on one, a toy training step took 12.5 s
    in bf16 against 0.52 s in float32, so the CPU bf16 switches of train.py and distill.py fall
    back to float32 there. The checks are torch's own CPU-feature queries (private, hence getattr).
    """
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def bf16_autocast(device: torch.device, on: bool):
    """bf16 autocast on `device` when `on`, except on a CPU without native bf16 (float32 there);
    the one place train.py's and distill.py's `amp()` decide it."""
    on = on and (device.type != "cpu" or cpu_bf16_is_fast())
    return torch.autocast(device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()


# ==================================================================================================
# Networks around the DiT: text batches, the velocity call, LoRA critic, GAN head, EMA
# ==================================================================================================


@dataclass
class Text:
    """A batch of text features: `features` [B, L, C] padded, the first `lens[b]` rows real."""

    features: torch.Tensor
    lens: list

    def to(self, device) -> "Text":
        return Text(self.features.to(device), self.lens)


def dit_velocity(net: nn.Module, x: Latents, sigma: torch.Tensor, text: Text) -> Latents:
    """(v_video, v_audio) from the DiT. σ is deliberately NOT passed: the DiT is timestep-free and
    reads the noise level off the latents (the σ argument exists for networks that need it, e.g. the
    2-D toy of the tests)."""
    video, audio = x  # modality order = MODALITIES
    return net(video, audio, text.features, text.lens)  # text_len keeps the padding out of the sequence


class LoRA(nn.Module):
    """Low-rank adapter for one `ExpertLinear`: one (A, B) pair per expert, B = 0 at start so the
    adapted network starts equal to the base."""

    def __init__(self, linear: nn.Module, rank: int, alpha: float, generator=None):
        super().__init__()
        E, n_in, n_out = linear.num_experts, linear.in_features, linear.out_features
        self.num_experts, self.scale = E, alpha / rank
        # A ~ N(0, 1/n_in) keeps the rank-r features at unit scale; B = 0 makes the delta start at 0.
        self.lora_A = nn.Parameter(torch.randn(E, rank, n_in, generator=generator) / math.sqrt(n_in))  # [E, r, in]
        self.lora_B = nn.Parameter(torch.zeros(E, n_out, rank))  # [E, out, r]

    def forward(self, x: torch.Tensor, sizes) -> torch.Tensor:
        # Experts split the sequence by modality exactly like ExpertLinear does (video, audio, text).
        parts = x.split(sizes, dim=1) if self.num_experts > 1 else [x]
        out = [p.float() @ self.lora_A[e].T @ self.lora_B[e].T for e, p in enumerate(parts)]  # [B, n_e, out]
        return torch.cat(out, dim=1) * self.scale


LORA_TARGETS = ("attention.linear_qkv", "attention.linear_proj", "mlp.up_gate_proj", "mlp.down_proj")


class LoRACritic(nn.Module):
    """The fake score as LoRA adapters on the frozen teacher (as DMD2's Wan port): adapters on = critic,
    off = real score. Saves a full trainable 15B copy (weights, grads, Adam states).

    The adapters are attached with forward hooks on the teacher's linears, so model.py is untouched
    and the teacher's state dict keeps its official keys.
    """

    def __init__(self, teacher: nn.Module, rank: int, alpha: float = 0.0, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.adapters = nn.ModuleDict()
        self.on = False
        for name, module in teacher.named_modules():
            if name.endswith(LORA_TARGETS):
                key = name.replace(".", "_")  # ModuleDict keys cannot hold dots
                self.adapters[key] = LoRA(module, rank, alpha or rank, g)
                module.register_forward_hook(self._hook(key))

    def _hook(self, key):
        def add_delta(module, args, out):
            if not self.on:
                return None  # teacher pass: output unchanged
            sizes = args[1] if len(args) > 1 else None  # ExpertLinear is called as (x, sizes)
            return out + self.adapters[key](args[0], sizes).to(out.dtype)  # delta in fp32, added in out's dtype

        return add_delta

    @contextlib.contextmanager
    def active(self):
        self.on = True
        try:
            yield
        finally:
            self.on = False


class FeatureTap:
    """Captures the output of one module during a forward (a forward hook: model.py stays as is).

    `pool(out, args)` turns the module output into a list of token groups [B, n, D]; for the DiT
    (`dit_token_groups`) these are the video tokens and the audio tokens of a layer's output.
    """

    def __init__(self, module: nn.Module, pool: Callable):
        self.pool, self.groups, self.on = pool, None, False
        module.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if self.on:
            self.groups = self.pool(out, args)

    @contextlib.contextmanager
    def capture(self):
        self.on, self.groups = True, None
        try:
            yield self
        finally:
            self.on = False


def dit_token_groups(out: torch.Tensor, args) -> list:
    """A TransformerLayer output [B, L, D] -> [video tokens [B, Nv, D], audio tokens [B, Na, D]].

    The layer is called as layer(x, rope, sizes, ...), sizes = rows of (video, audio, text), so
    args[2] says where each modality is. Text tokens are left out: the head judges the generated
    content, not the prompt.
    """
    Nv, Na = args[2][0], args[2][1]
    return [out[:, :Nv], out[:, Nv : Nv + Na]]


class GanHead(nn.Module):
    """One realism logit per sample from critic features [E].

    A per-token MLP, a mean over each token group (video, audio), and an MLP on the concatenated
    pools, so the head sees both modalities together and can judge audio-video agreement.
    """

    def __init__(self, in_dim: int, num_groups: int = 2, hidden: int = 256):
        super().__init__()
        self.token_mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU())
        self.out = nn.Sequential(nn.Linear(num_groups * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, groups: list) -> torch.Tensor:
        pooled = [self.token_mlp(g.float()).mean(dim=1) for g in groups]  # each [B, hidden]
        return self.out(torch.cat(pooled, dim=-1)).squeeze(-1)  # [B]


class EMA:
    """Exponential moving average of the student's parameters (same sharding as the parameters)."""

    def __init__(self, net: nn.Module, decay: float, start: int):
        self.decay, self.start = decay, start
        # fp32 copies named like the parameters (DTensors sharded like them under FSDP2).
        self.shadow = {n: p.detach().clone() for n, p in net.named_parameters()}

    @torch.no_grad()
    def update(self, net: nn.Module, step: int):
        # Before `start` the EMA just follows the student (early students change too fast to average).
        decay = self.decay if step >= self.start else 0.0
        for n, p in net.named_parameters():
            self.shadow[n].lerp_(p.detach(), 1 - decay)  # shadow += (1 − decay)·(p − shadow)


# ==================================================================================================
# Prompts and real data
# ==================================================================================================


class PromptBank:
    """Text features of every training prompt ([n_i, C] each) and of the negative prompt."""

    def __init__(self, features: list, negative: torch.Tensor):
        if not features:
            raise ValueError("no prompts to train on")
        # Caches hold fp16 (the official bf16 -> fp16 round trip); the DiT takes float32.
        self.features, self.negative = [f.float() for f in features], negative.float()

    def __len__(self):
        return len(self.features)

    def batch(self, idx) -> Text:
        return pad_text([self.features[int(i)] for i in idx])

    def negative_batch(self, B: int) -> Text:
        return pad_text([self.negative] * B)


def pad_text(feats: list) -> Text:
    """[n_i, C] tensors -> Text([B, max n, C] zero-padded, lens)."""
    lens = [f.shape[0] for f in feats]
    out = feats[0].new_zeros(len(feats), max(lens), feats[0].shape[-1])  # [B, Lmax, C]
    for b, f in enumerate(feats):
        out[b, : lens[b]] = f  # the rows past lens[b] never enter the DiT's sequence
    return Text(out, lens)


class RealData:
    """Real paired latents with their text, for the GAN: video [M, ...], audio [M, ...], text."""

    def __init__(self, video: torch.Tensor, audio: torch.Tensor, text: list):
        if not (len(video) == len(audio) == len(text)) or len(video) == 0:
            raise ValueError("real data needs the same (non-zero) number of video, audio and text items")
        self.video, self.audio, self.text = video.float(), audio.float(), text

    def batch(self, idx):
        idx = torch.as_tensor(idx)
        return (self.video[idx], self.audio[idx]), pad_text([self.text[int(i)] for i in idx])


# ==================================================================================================
# The distiller: backward simulation, generator turn, critic turn, TTUR
# ==================================================================================================


class Distiller:
    """Holds the networks, optimisers, EMA and RNG state, and runs one DMD-2 iteration per
    `train_step()`.

    teacher: frozen DiT (real score). student: trainable copy (generator). critic: trainable copy
    (fake score), or None together with `lora` (a LoRACritic on the teacher). `latent_shapes`: the
    per-sample shape of every modality. `velocity_fn(net, x, σ, text)` is the only place a network
    is called (DiT: `dit_velocity`). `gan_tap`/`gan_head`/`real_data`: the optional GAN.
    `mesh`: the FSDP2 device mesh when running distributed (None: one process).
    """

    def __init__(self, cfg: DistillConfig, teacher, student, critic, latent_shapes, prompts: PromptBank, *,
                 lora: LoRACritic | None = None, gan_tap: FeatureTap | None = None, gan_head: nn.Module | None = None,
                 real_data: RealData | None = None, velocity_fn=dit_velocity, device="cpu", rank=0, mesh=None):
        if (critic is None) == (lora is None):
            raise ValueError("give exactly one of critic (full fake score) and lora (LoRA fake score)")
        if cfg.gan and (gan_tap is None or gan_head is None or real_data is None):
            raise ValueError("the GAN needs gan_tap, gan_head and real_data")
        self.cfg, self.device, self.rank, self.mesh = cfg, torch.device(device), rank, mesh
        self.teacher, self.student, self.critic, self.lora = teacher, student, critic, lora
        self.gan_tap, self.gan_head, self.real_data = gan_tap, gan_head, real_data
        self.latent_shapes, self.prompts, self.velocity_fn = [tuple(s) for s in latent_shapes], prompts, velocity_fn
        self.sigmas = student_sigmas(cfg.steps, cfg.grid_shift, cfg.grid_sigma_max)  # [K + 1], CPU float32
        self.weights = (cfg.video_weight, cfg.audio_weight)  # λ per modality, in MODALITIES order

        self.teacher.requires_grad_(False).eval()  # frozen: never a .grad, never a step
        self.critic_params = list((critic or lora).parameters()) + (list(gan_head.parameters()) if gan_head else [])
        # Small modules that are not FSDP-sharded (LoRA adapters, GAN head): their grads are averaged by hand.
        self.replicated = (list(lora.parameters()) if lora else []) + (list(gan_head.parameters()) if gan_head else [])
        # Two optimisers, one per player, each with its own learning rate (TTUR).
        opt = dict(betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.opt_g = torch.optim.AdamW(self.student.parameters(), lr=cfg.lr_generator, **opt)
        self.opt_c = torch.optim.AdamW(self.critic_params, lr=cfg.lr_critic, **opt)
        self.ema = EMA(student, cfg.ema_decay, cfg.ema_start) if cfg.ema_decay > 0 else None

        # Two RNGs: `shared` is seeded identically on every rank (the backward-simulation step k
        # must agree across ranks), `noise` differs per rank (prompts, σ, ε). Both on the CPU,
        # so a seed gives the same draws on any device.
        self.shared_gen = torch.Generator().manual_seed(cfg.seed)
        self.noise_gen = torch.Generator().manual_seed(cfg.seed + 1 + 1000 * rank)
        # iteration = critic steps; a generator step happens on every critic_ratio-th iteration.
        self.iteration = self.generator_steps = self.critic_steps = 0

    # ---- small helpers -------------------------------------------------------------------------

    def randn(self, B: int, generator: torch.Generator | None = None) -> Latents:
        """Fresh N(0, I) noise for every modality, drawn on a CPU RNG in modality order."""
        g = generator or self.noise_gen
        # Drawn on the CPU then moved: the same seed gives the same noise on any device.
        return tuple(torch.randn(B, *s, generator=g).to(self.device) for s in self.latent_shapes)

    def amp(self):
        """bf16 autocast around fp32 student/critic calls on CUDA, as DMD2 trains (on CPU only with
        autocast_cpu, and only where the CPU multiplies bf16 natively)."""
        return bf16_autocast(self.device, self.cfg.autocast and (self.device.type == "cuda" or self.cfg.autocast_cpu))

    def guidance_scales(self, sigma: torch.Tensor) -> tuple:
        """Per-sample CFG scales (video, audio) [B] at σ, as the base sampler applies them."""
        t = (sigma.double() * 1000).long()  # the scheduler's truncated int timestep; switch is t > 500
        video = torch.where(t > self.cfg.cfg_switch_t, self.cfg.cfg_video_high, self.cfg.cfg_video_low)
        # Audio keeps one scale at every σ (the official audio CFG has no switch).
        return video.double(), torch.full_like(video, self.cfg.cfg_audio, dtype=torch.float64)

    # ---- the three scores ----------------------------------------------------------------------

    def student_velocity(self, net, x, sigma, text):
        # `net` is the student or, for evaluation, a copy holding its EMA weights.
        with self.amp():
            return self.velocity_fn(net, x, sigma, text)

    def fake_velocity(self, x, sigma, text):
        if self.lora is not None:
            with self.lora.active():  # the teacher + adapters; bf16 base weights, no autocast needed
                return self.velocity_fn(self.teacher, x, sigma, text)
        with self.amp():  # full critic: fp32 master weights, bf16 GEMMs on CUDA
            return self.velocity_fn(self.critic, x, sigma, text)

    @torch.no_grad()
    def real_x0(self, x: Latents, sigma: torch.Tensor, text: Text) -> Latents:
        """The teacher's guided x0 prediction per modality (float64): v = v_u + w·(v_c − v_u)."""
        # No autocast: the teacher holds bf16 block weights, so it runs the official numerics as is.
        v_cond = self.velocity_fn(self.teacher, x, sigma, text)
        scales = self.guidance_scales(sigma)
        if all(bool((s == 1).all()) for s in scales):
            v = v_cond  # w = 1 is plain conditional: skip the negative pass (and its rounding)
        else:
            # One negative-prompt pass shared by video and audio, each with its own scale (base sampler).
            v_neg = self.velocity_fn(self.teacher, x, sigma, self.prompts.negative_batch(len(sigma)).to(self.device))
            v = tuple(vu.double() + per_sample(s, vu).double() * (vc.double() - vu.double())
                      for vc, vu, s in zip(v_cond, v_neg, scales))
        return tuple(x0_from_velocity(xm, vm, sigma) for xm, vm in zip(x, v))

    # ---- student sampling -------------------------------------------------------------------

    def rollout(self, net, text: Text, stop: int, grad: bool = False, generator=None) -> Latents:
        """Run the K-step student sampler from pure noise up to step `stop` and return its x0̂ there.

        Steps 0..stop−1 run without gradient; step `stop` runs with gradient iff `grad`. Between
        steps x0̂ is re-noised to the next σ with fresh noise: exactly the official `step_ddim`.
        stop = K − 1 is a full inference run (the last re-noise, to σ_K = 0, would be a no-op).
        """
        B = len(text.lens)
        x = self.randn(B, generator)  # pure noise, treated as σ_0 = 0.9998 like the official sampler
        for k in range(stop + 1):
            sigma = self.sigmas[k].expand(B)  # [B]
            with torch.set_grad_enabled(grad and k == stop):
                v = self.student_velocity(net, x, sigma, text)
                x0 = tuple(x0_from_velocity(xm, vm, sigma).float() for xm, vm in zip(x, v))
            if k == stop:
                return x0  # float32 x0̂ at σ_k (with its graph to the student iff grad)
            # Fresh noise per step and modality, video first then audio, as `step_ddim` draws it.
            x = tuple(add_noise(m, n, self.sigmas[k + 1].expand(B)) for m, n in zip(x0, self.randn(B, generator)))

    @torch.no_grad()
    def sample(self, net, text: Text, seed: int = 0) -> Latents:
        """A full K-step sample (inference), e.g. with the EMA student; its own RNG, so evaluating
        does not disturb the training RNG stream."""
        g = torch.Generator().manual_seed(seed)
        return self.rollout(net, text.to(self.device), self.cfg.steps - 1, generator=g)

    # ---- one iteration ---------------------------------------------------------------------------

    def train_step(self) -> dict:
        """One DMD-2 iteration: a student batch by backward simulation, a generator update every
        `critic_ratio` iterations, and a critic update every iteration (TTUR)."""
        cfg = self.cfg
        generator_turn = self.iteration % cfg.critic_ratio == 0  # iterations 0, N, 2N, ...: ⌈M/N⌉ of M
        # Each rank draws its own prompts (prompts with replacement; the list is small next to the run).
        idx = torch.randint(len(self.prompts), (cfg.batch_size,), generator=self.noise_gen)
        text = self.prompts.batch(idx).to(self.device)
        # The exit step k is drawn from the shared RNG so every rank rolls out to the same step.
        k = int(torch.randint(cfg.steps, (1,), generator=self.shared_gen))
        # Critic-only iterations still need a fresh student batch, just without a graph.
        x0 = self.rollout(self.student, text, k, grad=generator_turn)
        logs = {"k": k}
        if generator_turn:
            logs.update(self.generator_update(x0, text))
        # The same batch, detached, trains the critic: it must follow the student's current outputs.
        logs.update(self.critic_update(tuple(m.detach() for m in x0), text))
        self.iteration += 1
        return logs

    def generator_update(self, x0: Latents, text: Text) -> dict:
        """DMD loss per modality (+ GAN generator loss) -> clip -> AdamW step -> EMA."""
        cfg = self.cfg
        with self.critic_frozen():
            g = self.dmd_directions(x0, text)
            losses = [dmd_loss(m, gm) for m, gm in zip(x0, g)]
            loss = sum(w * l for w, l in zip(self.weights, losses))
            logs = {f"dmd_{n}": l.item() for n, l in zip(MODALITIES, losses)}
            logs.update({f"grad_{n}": gm.abs().mean().item() for n, gm in zip(MODALITIES, g)})
            if cfg.gan:
                # The gradient flows through the (frozen) critic and head into x0.
                lg = gan_generator_loss(self.gan_logits(x0, text))
                loss = loss + cfg.gan_gen_weight * lg
                logs["gan_g"] = lg.item()
            with self.critic_backward():
                loss.backward()
            logs["gnorm_g"] = clip_grad_norm(list(self.student.parameters()), cfg.grad_clip)
            self.opt_g.step()
            self.zero_grads()
        self.generator_steps += 1
        if self.ema is not None:
            self.ema.update(self.student, self.generator_steps)
        return logs

    @contextlib.contextmanager
    def critic_frozen(self):
        """The generator turn leaves the critic without gradients ([R] does the same). It also makes
        the critic's no-grad passes run the same CPU kernels as the frozen teacher's, so at init
        (critic = teacher) the two agree bit for bit."""
        for p in self.critic_params:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in self.critic_params:
                p.requires_grad_(True)

    @torch.no_grad()
    def dmd_directions(self, x0: Latents, text: Text) -> list:
        """g per modality for a student batch x0: re-noise, ask teacher (CFG) and critic."""
        cfg, B = self.cfg, len(text.lens)
        sigma = training_sigmas(B, cfg.dmd_shift, cfg.dmd_sigma_min, cfg.dmd_sigma_max, self.noise_gen)
        # One σ per sample shared by video and audio (as at inference), independent noise each.
        x_t = tuple(add_noise(m.detach(), n, sigma) for m, n in zip(x0, self.randn(B)))
        real = self.real_x0(x_t, sigma, text)
        fake = tuple(x0_from_velocity(xm, vm, sigma) for xm, vm in zip(x_t, self.fake_velocity(x_t, sigma, text)))
        return [dmd_direction(m, r, f) for m, r, f in zip(x0, real, fake)]  # per modality, own normaliser

    def critic_update(self, x0: Latents, text: Text) -> dict:
        """Flow matching on the detached student samples (+ GAN discriminator loss) -> step."""
        cfg, B = self.cfg, len(text.lens)
        sigma = training_sigmas(B, cfg.critic_shift, cfg.critic_sigma_min, cfg.critic_sigma_max, self.noise_gen)
        noise = self.randn(B)
        x_t = tuple(add_noise(m, n, sigma) for m, n in zip(x0, noise))  # same σ for both modalities
        v = self.fake_velocity(x_t, sigma, text)  # conditional only: the critic never uses CFG (DMD2)
        losses = [flow_loss(vm, n, m) for vm, n, m in zip(v, noise, x0)]
        loss = sum(w * l for w, l in zip(self.weights, losses))
        logs = {f"critic_{n}": l.item() for n, l in zip(MODALITIES, losses)}
        if cfg.gan:
            # Real paired latents with their own prompts: D learns real vs. student at random σ.
            idx = torch.randint(len(self.real_data.video), (B,), generator=self.noise_gen)
            real, real_text = self.real_data.batch(idx)
            real = tuple(m.to(self.device) for m in real)
            ld = gan_discriminator_loss(self.gan_logits(x0, text), self.gan_logits(real, real_text.to(self.device)))
            loss = loss + cfg.gan_disc_weight * ld
            logs["gan_d"] = ld.item()
        with self.critic_backward():
            loss.backward()
        average_replicated_grads(self.replicated, self.mesh)  # LoRA/head grads: FSDP does not see them
        logs["gnorm_c"] = clip_grad_norm(self.critic_params, cfg.grad_clip)
        self.opt_c.step()
        self.zero_grads()
        self.critic_steps += 1
        return logs

    def gan_logits(self, x0: Latents, text: Text) -> torch.Tensor:
        """Diffusion-GAN: re-noise x0 at σ ~ U[0, 1), run the critic, read its tapped features."""
        B = len(text.lens)
        sigma = torch.rand(B, generator=self.noise_gen)  # [R]: t uniform over the whole [0, 1000)
        x_t = tuple(add_noise(m, n, sigma) for m, n in zip(x0, self.randn(B)))
        with self.gan_tap.capture() as tap:
            self.fake_velocity(x_t, sigma, text)  # the full forward runs; only the tapped layer is used
        return self.gan_head(tap.groups)

    def critic_backward(self):
        """Backward passes run with the LoRA adapters on: activation checkpointing re-runs the
        critic's layers during backward and must see the same network (the teacher's own passes
        are no-grad, so they are never re-run)."""
        return self.lora.active() if self.lora is not None else contextlib.nullcontext()

    def zero_grads(self):
        # Both optimisers after every update, as DMD2 does: no stale gradient crosses turns.
        self.opt_g.zero_grad(set_to_none=True)
        self.opt_c.zero_grad(set_to_none=True)

    # ---- the distilled model -------------------------------------------------------------------

    def ema_student_state_dict(self, keep: bool = True) -> dict:
        """Full state dict of the EMA student (or the student without EMA), official keys, on CPU
        (buffers such as the RoPE bands come from the student)."""
        shadow = self.ema.shadow if self.ema is not None else {}
        sd = {k: gather(shadow.get(k, v), keep) for k, v in self.student.state_dict().items()}
        return sd if keep else {}

    # ---- training state (optimisers, EMA, RNG, counters) ---------------------------------------

    def train_state(self) -> dict:
        """This rank's share of the training state as flat tensors (safetensors-friendly)."""
        # RNG states are uint8 tensors, so everything fits in one safetensors file per rank.
        out = {"rng.shared": self.shared_gen.get_state(), "rng.noise": self.noise_gen.get_state()}
        out.update(optimizer_tensors(self.opt_g, self.student, "opt_g"))
        out.update(optimizer_tensors(self.opt_c, self.critic_modules(), "opt_c"))
        if self.ema is not None:
            out.update({f"ema.{k}": local(v) for k, v in self.ema.shadow.items()})
        return out

    def load_train_state(self, tensors: dict, counters: dict, source: str):
        self.shared_gen.set_state(tensors["rng.shared"])
        self.noise_gen.set_state(tensors["rng.noise"])
        load_optimizer_tensors(self.opt_g, self.student, "opt_g", tensors, source)
        load_optimizer_tensors(self.opt_c, self.critic_modules(), "opt_c", tensors, source)
        if self.ema is not None:
            for k, v in self.ema.shadow.items():
                if f"ema.{k}" not in tensors:
                    raise load_weights.CheckpointError(f"{source}: missing key ema.{k}")
                with torch.no_grad():
                    local(v).copy_(tensors[f"ema.{k}"])  # into this rank's shard, in place
        self.iteration, self.generator_steps, self.critic_steps = (
            counters["iteration"], counters["generator_steps"], counters["critic_steps"])

    def critic_modules(self) -> nn.Module:
        """The trainable fake-score side as one module (for parameter names): critic/LoRA + GAN head."""
        parts = nn.ModuleDict({"critic": self.critic or self.lora})
        if self.gan_head is not None:
            parts["gan_head"] = self.gan_head
        return parts


# ==================================================================================================
# Distributed (FSDP2) and gradient helpers; each is a no-op in a single process
# ==================================================================================================


def init_distributed(device: str | None):
    """(rank, world size, mesh, device). Under torchrun: one process per GPU (or CPU with gloo)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world, device = dit_lib.init_distributed(device)
    if world == 1:  # plain `python distill.py`: no process group
        return 0, 1, None, device
    return rank, world, init_device_mesh(device.type, (world,)), device  # 1-D mesh: plain FSDP


def prepare_dit(net: DiT, mesh, checkpointing: bool) -> DiT:
    """Activation checkpointing per layer and FSDP2 sharding (one unit per layer, then the root).

    The composable `checkpoint` and `fully_shard` keep parameter names unchanged, so state dicts
    keep the official keys (no wrapper prefixes to strip).
    """
    if checkpointing:

        for layer in net.block.layers:
            checkpoint(layer)  # keep only each layer's input; recompute the inside during backward
    if mesh is not None:

        for layer in net.block.layers:
            fully_shard(layer, mesh=mesh)  # each layer is gathered just before it runs, freed after
        fully_shard(net, mesh=mesh)  # the rest: embedders, final norms and linears
    return net


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a (possibly FSDP-sharded) tensor."""
    return t.to_local() if hasattr(t, "to_local") else t


def gather(t: torch.Tensor, keep: bool = True) -> torch.Tensor | None:
    """The full tensor on the CPU (a collective under FSDP: every rank must call it); ranks that
    will not write it pass keep=False and drop it, so only one host copy of a 15B model exists."""
    full = t.full_tensor() if hasattr(t, "full_tensor") else t
    return full.detach().cpu() if keep else None


def full_state_dict(module: nn.Module, keep: bool = True) -> dict:
    # One tensor at a time, so a 15B model is never gathered on a GPU whole.
    sd = {k: gather(v, keep) for k, v in module.state_dict().items()}
    return sd if keep else {}


def average_replicated_grads(params: list, mesh):
    """Average the gradients of un-sharded parameters over ranks (FSDP does this for the rest)."""
    if mesh is None:
        return
    for p in params:  # the modules are small (LoRA, GAN head): one all-reduce per tensor is fine
        if p.grad is not None:
            dist.all_reduce(p.grad)  # SUM (gloo has no AVG), then divide
            p.grad /= dist.get_world_size()


def clip_grad_norm(params: list, max_norm: float) -> float:
    """Clip to one global norm over all parameters, sharded (DTensor) and plain ones mixed; returns it."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    groups = {}
    for g in grads:  # DTensor and plain gradients cannot go into one norm computation
        groups.setdefault(hasattr(g, "full_tensor"), []).append(g)
    norms = [torch.nn.utils.get_total_norm(gs) for gs in groups.values()]
    total = math.sqrt(sum(float(gather(n)) ** 2 for n in norms))  # gather: the sharded norm is partial
    coef = min(1.0, max_norm / (total + 1e-6))  # the same rule as torch's clip_grad_norm_
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total


def optimizer_tensors(opt: torch.optim.Optimizer, module: nn.Module, prefix: str) -> dict:
    """AdamW state as flat tensors named after the parameters: `{prefix}.{param}.{exp_avg|...}`."""
    out = {}
    for name, p in module.named_parameters():
        for key, value in opt.state.get(p, {}).items():  # step (a CPU scalar), exp_avg, exp_avg_sq
            out[f"{prefix}.{name}.{key}"] = local(value).detach().cpu().contiguous()  # this rank's shard
    return out


def load_optimizer_tensors(opt, module: nn.Module, prefix: str, tensors: dict, source: str):
    """Inverse of `optimizer_tensors`, strictly; shards are re-wrapped like their (sharded) parameters."""
    known = set()
    for name, p in module.named_parameters():
        keys = {key: f"{prefix}.{name}.{key}" for key in ("step", "exp_avg", "exp_avg_sq")}
        present = [k for k in keys.values() if k in tensors]
        if not present:
            continue  # a parameter that never had a gradient has no Adam state yet
        if len(present) < len(keys):
            missing = sorted(set(keys.values()) - set(present))
            raise load_weights.CheckpointError(f"{source}: missing key(s) {missing}")
        known.update(present)
        state = {"step": tensors[keys["step"]]}  # a CPU scalar, as Adam keeps it
        for key in ("exp_avg", "exp_avg_sq"):
            t = tensors[keys[key]].to(local(p).device, copy=True)  # own storage, not a file view
            if t.shape != local(p).shape:
                raise load_weights.CheckpointError(
                    f"{source}: {keys[key]} has shape {tuple(t.shape)}, expected {tuple(local(p).shape)}")
            if hasattr(p, "device_mesh"):  # FSDP2: Adam's moments are sharded like p
                t = DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            state[key] = t
        opt.state[p] = state
    unknown = {k for k in tensors if k.startswith(prefix + ".")} - known
    if unknown:
        raise load_weights.CheckpointError(f"{source}: unexpected key(s) {sorted(unknown)[:4]}")


# ==================================================================================================
# Checkpoints: official-key safetensors for the networks, per-rank training state
# ==================================================================================================

STUDENT_DIR, EMA_DIR, CRITIC_DIR = "student", "student_ema", "critic"
LORA_FILE, HEAD_FILE, STATE_FILE = "critic_lora.safetensors", "gan_head.safetensors", "state.json"


def save_checkpoint(d: Distiller, out: str | os.PathLike) -> Path:
    """Write `out/ckpt-{iteration}/` and point `out/latest` at it.

    - student_ema/model.safetensors: THE distilled model (EMA student, or the student without EMA),
      official keys, float32 like the released distill checkpoint: `load_weights.load_dit` reads it.
    - student/, critic/ (or critic_lora.safetensors), gan_head.safetensors: for resuming.
    - train_state_rank{r}.safetensors: optimiser moments, EMA shards and RNG states of each rank.
    - state.json (written last, so a folder without it is incomplete): counters, config, world size.
    """
    folder = Path(out) / f"ckpt-{d.iteration:07d}"
    rank0 = d.rank == 0
    files = [(f"{STUDENT_DIR}/model.safetensors", lambda keep: full_state_dict(d.student, keep)),
             (f"{EMA_DIR}/model.safetensors", d.ema_student_state_dict)]
    if d.critic is not None:
        files.append((f"{CRITIC_DIR}/model.safetensors", lambda keep: full_state_dict(d.critic, keep)))
    else:
        files.append((LORA_FILE, lambda keep: full_state_dict(d.lora, keep)))
    if d.gan_head is not None:
        files.append((HEAD_FILE, lambda keep: full_state_dict(d.gan_head, keep)))
    for name, state_dict in files:  # one network at a time: gather (every rank), write (rank 0)
        sd = state_dict(rank0)  # a collective: every rank must take part, only rank 0 keeps it
        if rank0:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / name))
        del sd
    folder.mkdir(parents=True, exist_ok=True)
    # Optimiser moments stay sharded: each rank writes its own part (resume with the same world size).
    save_file(d.train_state(), str(folder / f"train_state_rank{d.rank}.safetensors"))
    barrier(d.mesh)  # every file is on disk before state.json marks the folder complete
    if rank0:
        counters = dict(iteration=d.iteration, generator_steps=d.generator_steps, critic_steps=d.critic_steps)
        world = 1 if d.mesh is None else d.mesh.size()
        state = dict(counters=counters, world_size=world, config=asdict(d.cfg))
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
        (Path(out) / "latest").write_text(folder.name)  # moved only once the folder is complete
    barrier(d.mesh)
    return folder


def barrier(mesh):
    if mesh is not None:
        dist.barrier()


def latest_checkpoint(out: str | os.PathLike, resume: bool = True) -> Path | None:
    """The folder named in `out/latest`, if it is complete; else None. Without `resume`, a run must not
    start over in a folder that already holds one: its checkpoints would be overwritten one by one."""
    pointer = Path(out) / "latest"
    if not pointer.is_file():
        return None
    if not resume:
        raise ValueError(f"{out} already holds a run (latest: {pointer.read_text().strip()}); "
                         "--resume continues it, or choose another --out")
    folder = Path(out) / pointer.read_text().strip()
    if not (folder / STATE_FILE).is_file():
        raise load_weights.CheckpointError(f"{folder}: incomplete checkpoint (no {STATE_FILE})")
    return folder


def resume_training_state(d: Distiller, folder: Path):
    """Optimiser moments, EMA, RNG and counters from `folder` (networks were loaded before)."""
    state = json.loads((folder / STATE_FILE).read_text())
    world = 1 if d.mesh is None else d.mesh.size()
    if state["world_size"] != world:
        raise load_weights.CheckpointError(
            f"{folder}: saved with {state['world_size']} processes, resuming with {world}; use the same number")
    path = folder / f"train_state_rank{d.rank}.safetensors"
    d.load_train_state(load_weights.read_safetensors(path), state["counters"], str(path))


def load_small_module(module: nn.Module, path: Path) -> nn.Module:
    """LoRA adapters / GAN head from safetensors, strictly (before the optimisers are built)."""
    # Cloned: safetensors hands out views into one file buffer; own (aligned) storage keeps the CPU
    # kernels, and so a resumed run, bit-identical to an uninterrupted one.
    sd = {k: v.clone() for k, v in load_weights.read_safetensors(path).items()}
    return load_weights.load_state_dict_strict(module, sd, str(path))


# ==================================================================================================
# Building the three networks
# ==================================================================================================


def load_network(source, cfg: DiTConfig, block_dtype, device, mesh, checkpointing: bool) -> DiT:
    """A DiT from a checkpoint folder (any official layout) or an in-memory state dict, strictly.

    One process: `load_weights.load_dit` / `dit_from_state_dict`. Distributed: build on `meta`,
    shard with FSDP2, then rank 0 reads the checkpoint into host memory (strict key/shape check)
    and broadcasts it tensor by tensor, so a GPU never holds more than its shard plus one tensor.
    """
    if mesh is None:
        if isinstance(source, dict):
            # Cloned: dit_from_state_dict assigns the given tensors, and three networks share this dict.
            sd = {k: v.clone() for k, v in source.items()}
            net = load_weights.dit_from_state_dict(sd, cfg, "in-memory teacher", block_dtype, device)
        else:
            net = load_weights.load_dit(source, cfg, block_dtype, device)
        return prepare_dit(net, None, checkpointing)

    with torch.device("meta"):
        net = DiT(cfg, block_dtype=block_dtype)
    expected = net.state_dict()  # full shapes and dtypes, taken before sharding
    prepare_dit(net, mesh, checkpointing)
    net.to_empty(device=device)  # real (uninitialised) storage for this rank's shards only
    sd = {}  # the other ranks receive their shards from rank 0
    if dist.get_rank() == 0:
        if isinstance(source, dict):
            sd = {k: v.to(expected[k].dtype) for k, v in source.items()}
        else:
            files, name = load_weights.dit_checkpoint_files(source)
            sd = load_weights.read_checkpoint(files, expected, name)
    set_model_state_dict(net, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return net.eval()


def random_dit_state_dict(cfg: DiTConfig, seed: int) -> dict:
    """Random teacher weights for --tiny-random (norm deltas small, linears ~ 1/sqrt(fan-in))."""
    return dit_lib.random_dit(cfg, block_dtype=torch.float32, seed=seed, norm_std=0.1).state_dict()


def latent_shapes(seconds: float, width: int, height: int, fps: int = 25) -> tuple:
    """Per-sample (video, audio) latent shapes for a clip, sized by the sampler's own rules:
    frames = 25·s + 1 (one audio latent per frame), `sample.latent_length`, `sample.latent_size`."""
    frames = int(seconds * fps) + 1  # seconds may be fractional here (sample.num_frames_for: whole)
    h, w = sample.latent_size(width, height)
    return (sample.Z_DIM, sample.latent_length(frames), h, w), (frames, sample.AUDIO_DIM)


# ==================================================================================================
# Text features: encoded once with text_encoder.py, then read from a cache file
# ==================================================================================================


def read_prompts(path) -> list:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: prompt file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts (one per line expected)")
    return prompts


def write_text_features(path, prompts: list, features: list, negative: torch.Tensor):
    """The cache format: `prompt_{i:06d}` [n_i, C] per prompt, `negative` [n, C]; the prompt texts in
    the metadata so a cache can be checked against the prompt file. Stored as float16, which is
    exactly what the official pipeline feeds the DiT (bf16 encoder -> fp16 -> fp32)."""
    # Zero-padded names sort in prompt order; one [n_i, C] tensor each (no padding stored).
    tensors = {f"prompt_{i:06d}": f.to(torch.float16).contiguous() for i, f in enumerate(features)}
    tensors["negative"] = negative.to(torch.float16).contiguous()
    save_file(tensors, str(path), metadata={f"prompt_{i:06d}": p for i, p in enumerate(prompts)})


def read_text_features(path, prompts: list, text_channels: int) -> PromptBank:
    path = Path(path)
    tensors = load_weights.read_safetensors(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}  # prompt texts; a hand-made cache may have none
    for i, p in enumerate(prompts):
        key = f"prompt_{i:06d}"
        if key not in tensors:
            raise ValueError(f"{path}: no features for prompt {i + 1} ({key}); rebuild the cache for this prompt file")
        if meta.get(key, p) != p:
            raise ValueError(f"{path}: prompt {i + 1} differs from the cached one; rebuild the cache")
    for k, t in tensors.items():
        if t.dim() != 2 or t.shape[1] != text_channels or t.shape[0] < 1:
            raise ValueError(f"{path}: {k} has shape {tuple(t.shape)}, expected [n >= 1, {text_channels}]")
    if "negative" not in tensors:
        raise ValueError(f"{path}: no 'negative' (negative-prompt features) entry")
    return PromptBank([tensors[f"prompt_{i:06d}"] for i in range(len(prompts))], tensors["negative"])


def encode_text_features(path, prompts: list, device, text_encoder_dir, rank: int = 0, text_channels: int | None = None):
    """Encode every prompt and the negative prompt once with T5-Gemma (as sample.py does: whole
    prompt, bf16 -> fp16 -> fp32, at most 640 rows) and cache them at `path`. Rank 0 encodes, the
    others wait for the file; the 9B encoder is freed before training starts."""
    if rank == 0:
        text_encoder_dir = Path(text_encoder_dir)
        device = torch.device(device)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        enc = load_weights.load_text_encoder(text_encoder_dir, dtype, device)
        tok = load_weights.load_text_tokenizer(text_encoder_dir)
        feats = [te.encode_prompt(enc, tok, p)[0][0].cpu() for p in prompts]  # [n_i, C] each
        negative = te.encode_prompt(enc, tok, te.NEGATIVE_PROMPT)[0][0].cpu()
        del enc
        if text_channels is not None and negative.shape[1] != text_channels:
            # checked before the cache is written: a wrong cache would fail every later run too
            raise ValueError(f"{text_encoder_dir}: the text encoder gives {negative.shape[1]} features per "
                             f"token, the DiT reads {text_channels}; is this the t5gemma-9b-9b-ul2 folder?")
        path.parent.mkdir(parents=True, exist_ok=True)
        # Other ranks (and later runs) only ever see a complete file.
        load_weights.atomic_write(path, lambda tmp: write_text_features(tmp, prompts, feats, negative))
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ==================================================================================================
# Putting it together: build() and the command line
# ==================================================================================================


def build(teacher, prompts: PromptBank, cfg: DistillConfig, dit_cfg: DiTConfig, shapes, *, device, rank=0,
          mesh=None, resume_from: Path | None = None, real_data: RealData | None = None, teacher_dtype=None):
    """Teacher, student, critic (full or LoRA), optional GAN head -> a ready `Distiller`.

    `teacher` is a checkpoint folder or a state dict. With `resume_from`, the student, critic,
    adapters and head come from that checkpoint and the training state is restored.
    """
    device = torch.device(device)
    # bf16 block weights on GPU = the official numerics; fp32 on CPU (tiny runs, exact tests).
    teacher_dtype = teacher_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    ckpt = None if resume_from is None else Path(resume_from)
    lora_mode = cfg.critic_lora_rank > 0
    # The LoRA critic backpropagates through the teacher, so it gets activation checkpointing too.
    teacher_net = load_network(teacher, dit_cfg, teacher_dtype, device, mesh, cfg.grad_checkpointing and lora_mode)
    # Student and critic keep fp32 master weights: bf16 weights would swallow updates of lr 2e-6.
    student = load_network(ckpt / STUDENT_DIR if ckpt else teacher, dit_cfg, torch.float32, device, mesh,
                           cfg.grad_checkpointing)
    critic = lora = None
    if lora_mode:
        lora = LoRACritic(teacher_net, cfg.critic_lora_rank, cfg.critic_lora_alpha, seed=cfg.seed)
        if ckpt:
            load_small_module(lora, ckpt / LORA_FILE)
        lora.to(device)  # replicated on every rank (0.26 B parameters at rank 64)
    else:
        critic = load_network(ckpt / CRITIC_DIR if ckpt else teacher, dit_cfg, torch.float32, device, mesh,
                              cfg.grad_checkpointing)
    tap = head = None
    if cfg.gan:
        backbone = teacher_net if lora_mode else critic  # the head reads the critic's own features
        tap = FeatureTap(backbone.block.layers[cfg.gan_layer], dit_token_groups)
        torch.manual_seed(cfg.seed)  # the head's init is part of the run's seed
        head = GanHead(dit_cfg.hidden_size, 2, cfg.gan_hidden)
        if ckpt:
            load_small_module(head, ckpt / HEAD_FILE)
        head.to(device)
    d = Distiller(cfg, teacher_net, student, critic, shapes, prompts, lora=lora, gan_tap=tap, gan_head=head,
                  real_data=real_data, device=device, rank=rank, mesh=mesh)
    if ckpt:  # after the optimisers exist: their moments are loaded into them
        resume_training_state(d, ckpt)
    return d


def main(teacher=None, prompts=None, text_features=None, text_encoder=None, out="distill_out", tiny_random=False, iters=1000,
         seconds=None, width=448, height=256, gan_data=None, save_every=200, log_every=10, resume=False,
         device=None, toy=False, **overrides):
    """Train with DMD-2 and write checkpoints to `out` (see `save_checkpoint`); `overrides` are
    DistillConfig fields."""
    if seconds is None:
        seconds = 2.0 if toy else 4.0  # the toy: the length its samples are measured at (sample.py --toy)
    if not (math.isfinite(seconds) and seconds > 0):
        raise load_weights.InputError(f"--seconds must be a positive number, got {seconds}")
    latent_shapes(seconds, width, height)  # refuses sizes under 32 px
    if not (tiny_random or toy):
        _check_inputs(teacher, prompts, text_features, out)
    elif os.path.lexists(out) and not Path(out).is_dir():
        raise load_weights.InputError(f"--out {out}: exists and is not a folder")
    rank, world, mesh, device = init_distributed(device)
    cfg = DistillConfig(**overrides)
    if cfg.gan_layer < 0:
        raise ValueError("--gan-layer must be >= 0")
    real = None
    toy_info = None
    if toy:
        # The toy world (toy.py): the teacher is a train.py checkpoint, the prompts are the world's 8.
        import toy as toy_lib

        teacher = Path(teacher or Path(__file__).resolve().parent / "checkpoints" / "toy_base")
        dit_cfg, norm, words = toy_lib.read_toy_json(teacher)
        bank = PromptBank([words.encode(p) for p in toy_lib.ALL_PROMPTS], words.null())
        T, N = toy_lib.num_latents(seconds)
        shapes = ((dit_cfg.latent_channels, T, 16, 16), (N, dit_cfg.audio_in_channels))
        cfg.gan_layer = min(cfg.gan_layer, dit_cfg.num_layers - 1)
        if gan_data is not None:
            raise load_weights.InputError("--toy makes its own GAN data (clips of the world); drop --gan-data")
        if cfg.gan:
            # The toy's real data is the world itself: TOY_GAN_CLIPS clips of fixed seeds, encoded
            # by the codec, with their own prompts (the released model needs --gan-data instead).
            seeds = range(TOY_GAN_FIRST_SEED, TOY_GAN_FIRST_SEED + TOY_GAN_CLIPS)
            video, audio, texts = toy_lib.Codec(norm).encode_seeds(seeds, seconds)  # [M, 48, T, 16, 16], [M, N, 64]
            real = RealData(video, audio, [words.encode(p) for p in texts])
        toy_info = (toy_lib, dit_cfg, norm)
    elif tiny_random:
        # Everything random and tiny: a CPU demo of the full loop (and the CLI test).
        dit_cfg = dit_config("tiny")
        g = torch.Generator().manual_seed(1234)  # the same "teacher" and "prompts" on every rank and run
        teacher = random_dit_state_dict(dit_cfg, seed=1234)
        bank = PromptBank([torch.randn(n, dit_cfg.text_in_channels, generator=g) for n in (5, 7, 3, 6)],
                          torch.randn(8, dit_cfg.text_in_channels, generator=g))
        shapes = ((dit_cfg.latent_channels, 2, 4, 4), (5, dit_cfg.audio_in_channels))  # 2 latent frames, 5 audio
        cfg.gan_layer = min(cfg.gan_layer, dit_cfg.num_layers - 1)  # the default (20) is for 40 layers
        if cfg.gan:
            real = RealData(torch.randn(4, *shapes[0], generator=g), torch.randn(4, *shapes[1], generator=g),
                            [bank.features[i] for i in range(4)])
    else:
        if teacher is None or prompts is None:
            raise ValueError("--teacher and --prompts are required (or use --tiny-random)")
        dit_cfg = dit_config("base")  # the teacher is the released base model (same config as distill)
        if cfg.gan_layer >= dit_cfg.num_layers:
            raise ValueError(f"--gan-layer must be < {dit_cfg.num_layers}")
        shapes = latent_shapes(seconds or 4.0, width, height)
        texts = read_prompts(prompts)
        features = Path(text_features or Path(out) / "text_features.safetensors")
        if not features.is_file():  # computed once, then every run (and resume) reads the cache
            text_dir = Path(text_encoder or Path(teacher).parent.parent / load_weights.TEXT_DIR)
            if not (text_dir / "config.json").is_file():
                raise ValueError(f"{features} does not exist and no text encoder was found at {text_dir}: "
                                 "pass --text-encoder DIR (the t5gemma-9b-9b-ul2 folder) or --text-features FILE")
            encode_text_features(features, texts, device, text_dir, rank, dit_cfg.text_in_channels)
        bank = read_text_features(features, texts, dit_cfg.text_in_channels)
        if cfg.gan:
            if gan_data is None:
                raise ValueError("--gan needs --gan-data (real paired latents, see RealData)")
            real = read_real_data(gan_data, shapes, dit_cfg.text_in_channels)
    ckpt = latest_checkpoint(out, resume)  # --resume without a checkpoint starts fresh
    d = build(teacher, bank, cfg, dit_cfg, shapes, device=device, rank=rank, mesh=mesh, resume_from=ckpt,
              real_data=real)
    if rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        print(f"distill: {world} process(es) on {device}; student grid {[round(s, 4) for s in d.sigmas.tolist()]}; "
              + (f"resumed from {ckpt} at iteration {d.iteration}" if ckpt else "from the teacher"))
    # The bar counts iterations (= critic steps); a resumed run starts where the checkpoint stopped.
    bar = tqdm(range(d.iteration, iters), initial=d.iteration, total=iters, disable=rank != 0, dynamic_ncols=True)
    t0 = time.time()
    for _ in bar:
        logs = d.train_step()
        if rank == 0 and (d.iteration % log_every == 0 or d.iteration == iters):
            logs.update(iteration=d.iteration, generator_steps=d.generator_steps, seconds=round(time.time() - t0, 1))
            with open(Path(out) / "log.jsonl", "a") as f:
                f.write(json.dumps(logs) + "\n")
            bar.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in logs.items()))
        if d.iteration % save_every == 0 or d.iteration == iters:  # every rank: saving is collective
            folder = save_checkpoint(d, out)
            if rank == 0 and toy_info is not None:  # the toy's constants travel with every network
                lib, dcfg, norm = toy_info
                for sub in (EMA_DIR, STUDENT_DIR):
                    lib.write_toy_json(folder / sub, dcfg, norm, {"seconds": seconds, "distilled_from": str(teacher)})
            if rank == 0:
                bar.write(f"saved {folder} (distilled model: {folder / EMA_DIR})")
    return d


def _check_inputs(teacher, prompts, text_features, out) -> None:
    """Every path and size of a real run, checked before a network is built or a file written."""
    if teacher is None or prompts is None:
        raise load_weights.InputError("--teacher and --prompts are required (or use --tiny-random)")
    if not Path(teacher).is_dir():
        raise load_weights.InputError(f"--teacher {teacher}: folder not found (the released base model's folder)")
    load_weights.dit_checkpoint_files(teacher)  # names the missing index/shard if the folder is not a checkpoint
    if os.path.lexists(out) and not Path(out).is_dir():
        raise load_weights.InputError(f"--out {out}: exists and is not a folder")
    if not Path(out).is_dir() and not Path(out).absolute().parent.is_dir():
        raise load_weights.InputError(f"--out {out}: folder {Path(out).absolute().parent} does not exist")
    if text_features is not None and os.path.lexists(text_features) and not Path(text_features).is_file():
        raise load_weights.InputError(f"--text-features {text_features}: not a regular file")


def read_real_data(path, shapes, text_channels: int) -> RealData:
    """GAN data file: `video` [M, 48, T, h, w], `audio` [M, N, 64], `text` [M, L, C], `text_len` [M]."""
    t = load_weights.read_safetensors(path)
    for k in ("video", "audio", "text", "text_len"):
        if k not in t:
            raise ValueError(f"{path}: missing tensor {k!r} (need video, audio, text, text_len)")
    if tuple(t["video"].shape[1:]) != tuple(shapes[0]) or tuple(t["audio"].shape[1:]) != tuple(shapes[1]):
        raise ValueError(f"{path}: latents {tuple(t['video'].shape[1:])}, {tuple(t['audio'].shape[1:])} do not "
                         f"match the training size {shapes[0]}, {shapes[1]}")
    # The GAN compares like with like: real latents must have the training clip's exact shape.
    if t["text"].dim() != 3 or t["text"].shape[-1] != text_channels:
        raise ValueError(f"{path}: text must be [M, L, {text_channels}], got {tuple(t['text'].shape)}")
    return RealData(t["video"], t["audio"], [t["text"][i, : int(n)] for i, n in enumerate(t["text_len"])])


def add_config_flags(p: argparse.ArgumentParser, config_cls) -> None:
    """Every field of the dataclass `config_cls` becomes a flag of the same name (`--gan / --no-gan`
    for booleans, two floats for `betas`), with the field's default. train.py uses it too."""
    for f in config_cls.__dataclass_fields__.values():
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool" or isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name == "betas":
            p.add_argument(flag, type=float, nargs=2, default=f.default)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)


# `distill.py --toy` defaults (the run that made checkpoints/toy_distill, README "Train it yourself"):
# a 6 M-parameter student moves far faster than a 15B one, so lr 100x the real run's and a short EMA.
# DMD alone makes a silent toy student, so the GAN is on, its real clips the world's own (fixed seeds:
# a run repeats exactly), read at the middle of the 4 layers (as 20 is of the released 40), and
# weighted 3: unweighted, its gradient on the student's samples is of the DMD term's size, so
# DMD2's SDXL weight 5e-3 would make it ~1% of the update (measured, README).
TOY_GAN_CLIPS, TOY_GAN_FIRST_SEED = 512, 1_000_000
# σ of the DMD and critic losses drawn with shift 3 instead of 5 (as train.py's toy recipe): more
# weight on low noise, where a beep's time inside a 4-frame latent frame is settled (sync 77% of the
# 16 test clips at 250 iterations against 71% with shift 5, README).
TOY_DEFAULTS = dict(iters=250, save_every=50, lr_generator=2e-4, lr_critic=2e-4, ema_decay=0.95, ema_start=10,
                    grad_checkpointing=False, autocast_cpu=True, gan=True, gan_layer=2, gan_gen_weight=3.0,
                    dmd_shift=3.0, critic_shift=3.0)


def parse_args(argv=None):
    p = load_weights.OneLineParser(description="DMD-2 distillation of the daVinci-MagiHuman DiT into an "
                                "8-step CFG-free student. Multi-GPU: torchrun --nproc-per-node N distill.py ...")
    p.add_argument("--teacher", help="teacher DiT checkpoint folder (the released base model)")
    p.add_argument("--prompts", help="text file, one prompt per line")
    p.add_argument("--text-features", help="cached text features (safetensors; default OUT/text_features.safetensors)")
    p.add_argument("--text-encoder", help="T5-Gemma folder used to compute the features once "
                                          "(default: t5gemma-9b-9b-ul2 beside the daVinci-MagiHuman folder)")
    p.add_argument("--out", default="distill_out", help="output folder for checkpoints and log.jsonl")
    p.add_argument("--tiny-random", action="store_true", help="tiny random DiT and text on CPU (demo / test)")
    p.add_argument("--toy", action="store_true", help="the toy world of toy.py: --teacher is a train.py --toy "
                   "checkpoint (default checkpoints/toy_base), the prompts are the world's 8")
    p.add_argument("--iters", type=int, default=1000, help="total iterations (critic steps)")
    p.add_argument("--seconds", type=float, default=None, help="clip length (default 4; 2 with --toy)")
    p.add_argument("--width", type=int, default=448)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    p.add_argument("--device", default=None)
    p.add_argument("--gan-data", help="real paired latents for --gan (safetensors: video, audio, text, text_len)")
    add_config_flags(p, DistillConfig)  # every DistillConfig field (defaults = the real-run values)
    if p.parse_known_args(argv)[0].toy:  # argparse itself finds --toy (abbreviations included)
        p.set_defaults(**TOY_DEFAULTS)  # the toy's recipe; any flag given still wins
    args = p.parse_args(argv)
    if args.iters < 1 or args.save_every < 1 or args.log_every < 1:
        p.error("--iters, --save-every and --log-every must be >= 1")
    return args


def cli(argv=None) -> int:
    """The command line: bad input (every ValueError here is one), a full disk, Ctrl-C or SIGTERM give
    one line on stderr and exit status 2; checkpoints are written atomically."""
    args = parse_args(argv)
    return load_weights.guarded(lambda: main(**vars(args)) and None, user_errors=(ValueError,),
                                interrupted=lambda: "interrupted: checkpoints saved so far are complete (--resume continues)")


if __name__ == "__main__":
    raise SystemExit(cli())
