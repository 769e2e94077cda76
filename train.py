"""Flow-matching training of the daVinci-MagiHuman DiT: the toy world on a laptop CPU, any data source
that yields latents, FSDP2 under torchrun.

    python train.py --toy --out runs/toy                     # the toy world (toy.py) on the CPU
    python train.py --data latents.safetensors --preset base --init-from DIR --out runs/ft
    torchrun --nproc-per-node 8 train.py --data ... --out ...   # FSDP2, the same code as distill.py
    python train.py prepare CLIPS --weights W --out CACHE      # your clips -> cached latents (--data CACHE)
    python train.py --data CACHE --preset base --init-from W/daVinci-MagiHuman/base --lora-rank 16 --out runs/lora

The official release has no training code; this file mirrors no official file. What it trains is
exactly what sample.py samples: a `model.DiT` that maps noisy (video, audio) latents plus text
features to the flow-matching velocity, with no timestep input.

The objective (the convention of sample.py's samplers):
- x_σ = (1 − σ)·x0 + σ·ε, target v = ε − x0, loss = mean (v̂ − v)² per modality (video and audio
  each their own mean, summed with weights 1).
- One σ per sample, shared by video and audio (they are denoised together at one σ when sampling).
- σ = shift(u), shift(u) = s·u / (1 + (s − 1)·u) with s = --sigma-shift (default 3; the samplers
  use 5), and u ~ U(0, 1) (--sigma-dist uniform, the default; stratified over the batch) or
  u ~ logit-normal(m, s²) (SD3's "lognorm"). Why uniform: in the toy world the ball is a strong
  signal (up to 7 in normalised units), so where it is gets decided at σ > 0.9, while removing the
  last noise needs σ < 0.2; logit-normal trains the low tail rarely (with shift 5: 0.1% of samples
  below σ = 0.2), uniform with shift 5 gives 36% above 0.9 and 5% below 0.2. Why shift 3 and not
  the samplers' 5: timing to ±2 frames is decided inside a latent frame (4 frames), fine detail
  that is settled at low σ; shift 3 gives 25% above 0.9 and 8% below 0.2. The run with it (and
  10% text dropout, 20% long batches) is the first whose beeps meet the sync threshold (README
  "Train it yourself"; it changed the three together, so the table there cannot split the credit).
- Text dropped to the negative prompt for --text-dropout of the samples (default 10%), so that
  classifier-free guidance (cond vs. negative prompt, as sample.py's base pass) has an uncond model.
- AdamW, linear warm-up, gradient clipping, an EMA of the weights (what gets sampled), fp32 master
  weights with optional bf16 autocast, optional per-layer activation checkpointing.

A data source is any object with `batch(B, generator) -> (video [B, 48, T, h, w], audio [B, N, 64],
distill.Text)` and `negative` (the negative-prompt features [n, C]); `ToyData` renders clips from
toy.py on the fly, `LatentFile` reads pre-encoded latents, `CachedLatents` a `train.py prepare`
folder. Checkpoints (`OUT/ckpt-NNNNNNN/`):
`model.safetensors` = the EMA weights under the official key names (load_weights.load_dit reads it,
sample.py samples it), `raw/model.safetensors` the live weights, `train_state_rank{r}.safetensors`
optimiser moments, EMA and RNG, `state.json` the counters, `toy.json` the toy's constants.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

import distill
import load_weights
import sample
import text_encoder as te
import toy
import vae
from model import DiT, DiTConfig, compile_layers, dit_config, random_dit

# ==================================================================================================
# Configuration
# ==================================================================================================


@dataclass
class TrainConfig:
    """Every knob of a run (defaults: the toy run of README "Train it yourself")."""

    batch_size: int = 4  # per process
    lr: float = 2e-3
    warmup: int = 100  # steps of linear learning-rate warm-up
    lr_decay_steps: int = 4600  # > 0: cosine decay from lr to 0 at this step; 0: constant after the warm-up
    betas: tuple = (0.9, 0.99)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    ema_start: int = 200  # the EMA follows the weights exactly before this step
    text_dropout: float = 0.1  # fraction of samples trained with the negative prompt (for CFG)
    sigma_dist: str = "uniform"  # u ~ U(0, 1) ("uniform") or sigmoid(N(logit_mean, logit_std²)) ("logit-normal")
    sigma_shift: float = 3.0  # the toy's (see the module docstring); the samplers use 5
    sigma_stratified: bool = True  # the B values of u in a batch: one per stratum [i/B, (i+1)/B)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    video_weight: float = 1.0
    audio_weight: float = 1.0
    bf16: bool = True  # bf16 autocast around the fp32 network (CUDA; CPU only with native bf16: distill.cpu_bf16_is_fast)
    grad_checkpointing: bool = False
    seed: int = 0
    zero_init: bool = True  # a run from scratch starts with zero residual-branch outputs and heads
    # LoRA fine-tuning (rank 0 = full fine-tuning): adapters on the block linears named in lora_targets
    lora_rank: int = 0
    lora_alpha: float = 0.0  # 0 means alpha = rank (scale 1)
    lora_targets: str = ",".join(load_weights.LORA_TARGETS)
    lora_base_bf16: bool = True  # the frozen base's block linears in bf16 (the released numerics)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.sigma_dist not in ("uniform", "logit-normal"):
            raise ValueError(f"sigma_dist must be 'uniform' or 'logit-normal', got {self.sigma_dist!r}")
        if self.batch_size < 1 or self.lr <= 0 or not 0 <= self.ema_decay < 1 or not 0 <= self.text_dropout <= 1:
            raise ValueError("need batch_size >= 1, lr > 0, 0 <= ema_decay < 1, 0 <= text_dropout <= 1")


# ==================================================================================================
# Noise levels and the loss
# ==================================================================================================


def training_sigmas(n: int, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """σ [n]: u ~ U(0, 1) or sigmoid(N(m, s²)), then the sampler's shift map (see the module docstring).

    Stratified (the default): the n uniforms are one per stratum [i/n, (i+1)/n) in random order,
    so a small batch always spans low, middle and high noise instead of, now and then, only one;
    each u is still U(0, 1), so the objective is unchanged and only its gradient noise drops."""
    r = torch.rand(n, generator=generator, dtype=torch.float64)
    if cfg.sigma_stratified:
        r = (torch.randperm(n, generator=generator).double() + r) / n
    if cfg.sigma_dist == "uniform":
        u = r
    else:  # the logit-normal's quantile function applied to the (stratified) uniforms
        normal = torch.distributions.Normal(0.0, 1.0).icdf(r.clamp(1e-12, 1 - 1e-12))
        u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * normal)
    return distill.shift_sigma(u, cfg.sigma_shift).float()


def flow_matching_loss(net, x0: tuple, text: distill.Text, sigma: torch.Tensor, noise: tuple, cfg: TrainConfig):
    """(total loss, per-modality losses): v̂ = net(x_σ) against v = ε − x0, one σ per sample."""
    x = tuple(distill.add_noise(m, e, sigma) for m, e in zip(x0, noise))
    v = distill.dit_velocity(net, x, sigma, text)
    losses = [F.mse_loss(vm.float(), (e - m).float()) for vm, e, m in zip(v, noise, x0)]
    total = cfg.video_weight * losses[0] + cfg.audio_weight * losses[1]
    return total, losses


def fresh_weights(dit_cfg: DiTConfig, cfg: TrainConfig) -> dict:
    """The state dict a run from scratch starts from: model.random_dit's N(0, 1/fan_in) linears and,
    with `zero_init`, zeros in the last linear of every residual branch (attention `linear_proj`,
    MLP `down_proj`) and in the two heads. Every layer then starts as the identity and the network
    as the zero velocity, so the first steps grow the branches instead of undoing random ones (the
    idea of DiT's adaLN-Zero; measured on the toy: see README "Train it yourself")."""
    sd = random_dit(dit_cfg, seed=cfg.seed).state_dict()
    if cfg.zero_init:
        for k, v in sd.items():
            if k.endswith(("linear_proj.weight", "down_proj.weight")) or k.startswith("final_linear_"):
                v.zero_()
    return sd


# ==================================================================================================
# Data sources
# ==================================================================================================


class ToyData:
    """Clips of the toy world rendered on the fly: a clip's seed is drawn from the training RNG.

    With `long_fraction` > 0, each batch is, with that probability, of `long_seconds` clips instead
    of `seconds` ones: short clips make cheap steps (a 1 s clip is 482 tokens, a 2 s one 891) and
    teach everything local (the disc, the bounce, the beep, their sync); the long batches teach
    the time distances a 2 s sample spans, which RoPE would otherwise meet only at sampling time."""

    def __init__(self, seconds: float, norm, words, long_seconds: float | None = None, long_fraction: float = 0.0):
        if not 0 <= long_fraction <= 1:
            raise ValueError(f"--long-fraction must be in [0, 1], got {long_fraction}")
        if long_fraction and not long_seconds:
            raise ValueError("long_fraction > 0 needs long_seconds")
        self.seconds, self.long_seconds, self.long_fraction = seconds, long_seconds, long_fraction
        self.codec, self.words = toy.Codec(norm), words
        self.negative = words.null()  # [1, C]

    def batch(self, B: int, generator: torch.Generator):
        seconds = self.seconds
        if self.long_fraction > 0 and torch.rand((), generator=generator).item() < self.long_fraction:
            seconds = self.long_seconds
        seeds = torch.randint(2**31 - 1, (B,), generator=generator).tolist()
        video, audio, prompts = self.codec.encode_seeds(seeds, seconds)  # [B, 48, T, 16, 16], [B, N, 64]
        return video, audio, distill.pad_text([self.words.encode(p) for p in prompts])


class LatentFile:
    """Pre-encoded clips in one safetensors file: `video` [M, 48, T, h, w], `audio` [M, N, 64],
    `text` [M, L, C], `text_len` [M] and `negative` [n, C] (the negative prompt's features)."""

    def __init__(self, path, text_channels: int):
        t = load_weights.read_safetensors(path)
        if "negative" not in t:
            raise ValueError(f"{path}: missing tensor 'negative' (the negative prompt's text features)")
        shapes = (tuple(t["video"].shape[1:]), tuple(t["audio"].shape[1:])) if "video" in t and "audio" in t else None
        if shapes is None:
            raise ValueError(f"{path}: needs tensors video, audio, text, text_len, negative")
        self.data = distill.read_real_data(path, shapes, text_channels)
        self.negative = t["negative"].float()

    def batch(self, B: int, generator: torch.Generator):
        idx = torch.randint(len(self.data.video), (B,), generator=generator)
        (video, audio), text = self.data.batch(idx)
        return video, audio, text


# ==================================================================================================
# The trainer
# ==================================================================================================


class Trainer:
    """The network, optimiser, EMA and RNG of a run; `train_step()` does one optimiser step."""

    def __init__(self, cfg: TrainConfig, net: DiT, data, *, device="cpu", rank=0, mesh=None):
        self.cfg, self.net, self.data = cfg, net.train(), data
        self.device, self.rank, self.mesh = torch.device(device), rank, mesh
        self.opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        self.ema = distill.EMA(net, cfg.ema_decay, cfg.ema_start) if cfg.ema_decay > 0 else None
        # One CPU RNG per rank for clips, σ, ε and text dropout: a seed gives the same run on any device.
        self.gen = torch.Generator().manual_seed(cfg.seed + 1000 * rank)
        self.step = 0

    def lr_at(self, step: int) -> float:
        """Linear warm-up, then constant or (lr_decay_steps > 0) a cosine down to 0 at lr_decay_steps."""
        cfg = self.cfg
        lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        if cfg.lr_decay_steps > 0:
            lr *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / cfg.lr_decay_steps)))
        return lr

    def amp(self):
        # On a CPU without native bf16 GEMMs, autocast would make every step ~25x slower: float32 there.
        return distill.bf16_autocast(self.device, self.cfg.bf16)

    def train_step(self) -> dict:
        cfg, B, g = self.cfg, self.cfg.batch_size, self.gen
        video, audio, text = self.data.batch(B, g)
        # Text dropout: the dropped samples see the negative prompt, exactly what CFG's uncond pass feeds.
        drop = (torch.rand(B, generator=g) < cfg.text_dropout).tolist()
        if any(drop):
            feats = [self.data.negative if d else text.features[b, : text.lens[b]] for b, d in enumerate(drop)]
            text = distill.pad_text(feats)
        sigma = training_sigmas(B, cfg, g)  # [B], shared by both modalities
        noise = (torch.randn(video.shape, generator=g), torch.randn(audio.shape, generator=g))
        x0 = (video.to(self.device), audio.to(self.device))
        noise = tuple(e.to(self.device) for e in noise)
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        with self.amp():
            loss, (lv, la) = flow_matching_loss(self.net, x0, text.to(self.device), sigma.to(self.device), noise, cfg)
        loss.backward()
        gnorm = distill.clip_grad_norm(list(self.net.parameters()), cfg.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        if self.ema is not None:
            self.ema.update(self.net, self.step)
        losses = torch.stack([loss.detach(), lv.detach(), la.detach()])
        if self.mesh is not None:  # the logged loss is the mean over ranks

            dist.all_reduce(losses)
            losses /= self.mesh.size()
        loss, lv, la = losses.tolist()
        return {"loss": loss, "loss_video": lv, "loss_audio": la, "gnorm": gnorm, "lr": self.lr_at(self.step - 1)}

    # ---- checkpoints ---------------------------------------------------------------------------

    def ema_state_dict(self, keep: bool = True) -> dict:
        shadow = self.ema.shadow if self.ema is not None else {}
        sd = {k: distill.gather(shadow.get(k, v), keep) for k, v in self.net.state_dict().items()}
        return sd if keep else {}

    def save(self, out, extra_files: dict | None = None) -> Path:
        """OUT/ckpt-NNNNNNN/ (see the module docstring), then OUT/latest points at it."""
        folder = Path(out) / f"ckpt-{self.step:07d}"
        rank0 = self.rank == 0
        for name, state_dict in (("model.safetensors", self.ema_state_dict),
                                 ("raw/model.safetensors", lambda keep: distill.full_state_dict(self.net, keep))):
            sd = state_dict(rank0)  # collective under FSDP; only rank 0 keeps and writes it
            if rank0:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / name))
        folder.mkdir(parents=True, exist_ok=True)
        state = {"rng": self.gen.get_state()}
        state.update(distill.optimizer_tensors(self.opt, self.net, "opt"))
        if self.ema is not None:
            state.update({f"ema.{k}": distill.local(v).detach().cpu().contiguous() for k, v in self.ema.shadow.items()})
        save_file(state, str(folder / f"train_state_rank{self.rank}.safetensors"))
        distill.barrier(self.mesh)
        if rank0:
            for name, write in (extra_files or {}).items():
                write(folder)
            world = 1 if self.mesh is None else self.mesh.size()
            info = {"step": self.step, "world_size": world, "config": asdict(self.cfg)}
            (folder / "state.json").write_text(json.dumps(info, indent=1))  # last: marks the folder complete
            (Path(out) / "latest").write_text(folder.name)
        distill.barrier(self.mesh)
        return folder

    def resume(self, folder: Path) -> None:
        """Optimiser moments, EMA, RNG and step from `folder` (the live weights were loaded before)."""
        info = json.loads((folder / "state.json").read_text())
        world = 1 if self.mesh is None else self.mesh.size()
        if info["world_size"] != world:
            raise load_weights.CheckpointError(
                f"{folder}: saved with {info['world_size']} processes, resuming with {world}; use the same number")
        path = folder / f"train_state_rank{self.rank}.safetensors"
        t = load_weights.read_safetensors(path)
        self.gen.set_state(t["rng"])
        distill.load_optimizer_tensors(self.opt, self.net, "opt", t, str(path))
        if self.ema is not None:
            with torch.no_grad():
                for k, v in self.ema.shadow.items():
                    if f"ema.{k}" not in t:
                        raise load_weights.CheckpointError(f"{path}: missing key ema.{k}")
                    distill.local(v).copy_(t[f"ema.{k}"])
        self.step = info["step"]


# ==================================================================================================
# Fine-tuning on your own clips (1): prepare = a folder of clips -> cached latents, one file per clip
# ==================================================================================================
# `python train.py prepare CLIPS --weights W --out CACHE` writes CACHE/<clip>.safetensors with
#   video [48, T, h, w]  the Wan2.2 VAE posterior mean of the frames (vae.WanVAE.encode, as TI2V encodes)
#   audio [F, 64]        an Oobleck posterior sample of the mono sound at 51.2 kHz (as A2V encodes it,
#                        seed in the metadata), F = the clip's frame count (one audio latent per frame)
#   text  [n, C]         T5-Gemma features of the caption (text_encoder.encode_prompt, the sampler's cache)
# and CACHE/negative.safetensors (`negative` [n, C], the negative prompt: what text dropout trains on).
# The encoders run one at a time (T5-Gemma alone is 18.5 GB): stage by stage over every pending clip,
# each stage's result kept in CACHE/.parts/ until the clip's file is assembled, so an interrupted run
# resumes where it stopped.

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm")
NEGATIVE_FILE = "negative.safetensors"
PREPARE_STAGES = (("text", "text_encoder"), ("video", "wan"), ("audio", "audio_vae"))


@dataclass
class Clip:
    path: Path
    caption: str | None
    error: str | None = None  # found while listing (no caption, duplicate name): the clip is skipped

    @property
    def name(self) -> str:
        return self.path.stem


def find_clips(folder) -> list[Clip]:
    """Every video file in `folder` with its caption: `name.txt` beside it, else `captions.jsonl`
    (one {"file": "name.mp4", "caption": "..."} per line)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: clips folder not found")
    table = {}
    jsonl = folder / "captions.jsonl"
    if jsonl.is_file():
        for i, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    table[row["file"]] = row["caption"]
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"{jsonl}:{i}: need a JSON object with 'file' and 'caption'") from None
    clips, seen = [], set()
    for p in sorted(folder.iterdir()):
        if p.suffix.lower() not in VIDEO_SUFFIXES or p.name.startswith("."):
            continue
        txt = p.with_suffix(".txt")
        caption = txt.read_text(encoding="utf-8").strip() if txt.is_file() else table.get(p.name)
        error = None
        if p.stem in seen:
            error = f"another clip is also named {p.stem!r} (one cache file per name)"
        elif caption is None:
            error = f"no caption ({txt.name} or a captions.jsonl line)"
        elif not caption.strip():
            error = "empty caption"
        seen.add(p.stem)
        clips.append(Clip(p, caption, error))
    if not clips:
        raise ValueError(f"{folder}: no video files ({', '.join(VIDEO_SUFFIXES)})")
    return clips


def read_clip_frames(path, frames: int, width: int, height: int, fps: int = 25) -> torch.Tensor:
    """The first `frames` frames at `fps` (the source frame shown at each time i/fps; the last frame
    repeated if the clip is shorter), centre-cropped and resized like a TI2V image -> [1, 3, F, H, W]
    in [-1, 1]."""
    out = []
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as e:
        raise ValueError(f"not a readable video file ({e.strerror or type(e).__name__})") from None
    with container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        start = stream.start_time or 0  # mp4 edit lists can start the first frame past 0
        last = None
        for frame in container.decode(stream):
            t = float((frame.pts - start) * stream.time_base) if frame.pts is not None else len(out) / fps
            while len(out) < frames and last is not None and t > len(out) / fps + 1e-6:
                out.append(last)  # frame len(out) is shown from the previous source frame
            if len(out) >= frames:
                break
            last = vae.image_to_tensor(frame.to_image(), height, width)  # [1, 3, H, W]
    if last is None:
        raise ValueError("no decodable video frames")
    while len(out) < frames:
        out.append(last)
    return torch.stack(out, dim=2)  # F x [1, 3, H, W] -> [1, 3, F, H, W]


def read_clip_audio(path, frames: int, fps: int = 25) -> torch.Tensor:
    """The sound as A2V reads it (sample.read_audio: mono, 51.2 kHz, int16-quantised), cut or
    zero-padded to `frames` audio latents (2048 samples each at 25 fps) -> [frames · 2048]."""
    try:
        mono = sample.read_audio(path, None)
    except sample.InputError as e:
        raise ValueError(str(e).replace(f"--audio {path}: ", "")) from None
    n = frames * (sample.AUDIO_RATE // fps)
    return torch.nn.functional.pad(mono[:n], (0, max(0, n - len(mono))))


def clip_audio_seed(name: str, seed: int) -> int:
    """The seed of a clip's audio posterior draw: stable per name, independent of the clip order."""
    return (seed + zlib.crc32(name.encode("utf-8"))) % 2**31


def prepare(clips_dir, out, weights=None, tiny_random=False, size=(448, 256), seconds=4, device=None, seed=0,
            progress=True) -> dict:
    """Encode every clip of `clips_dir` not yet in `out` (see the banner); returns the summary
    {"done": [...], "skipped": [...], "failed": {name: message}}."""
    clips = find_clips(clips_dir)  # bad input first, before any network loads
    width, height = size
    lh, lw = sample.latent_size(width, height)
    width, height = 16 * lw, 16 * lh  # the pipeline's floor to multiples of 32
    frames = sample.num_frames_for(seconds)  # 25·s + 1 audio latents, as the sampler's T2V shapes
    vae_frames = 4 * (sample.latent_length(frames) - 1) + 1  # 4k+1 pixel frames: what the VAE keeps of them
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.float32 if tiny_random or device.type == "cpu" else torch.bfloat16
    if tiny_random:
        builders, text_weights = sample.tiny_builders(dtype, seed), None
    else:
        if weights is None:
            raise ValueError("give --weights DIR (the released encoders) or --tiny-random")
        missing = [f for f in (load_weights.TEXT_DIR + "/config.json", load_weights.WAN_VAE_PTH,
                               load_weights.AUDIO_DIR + "/model.safetensors") if not (Path(weights) / f).exists()]
        if missing:
            raise ValueError(f"weights folder {weights} is missing {', '.join(missing)}")
        builders = sample.release_builders(weights, "base", "none", dtype)
        text_weights = Path(weights) / load_weights.TEXT_DIR
    models = sample.Models(builders, device, dtype, offload="model", keep_released=False)
    out = Path(out)
    parts = out / ".parts"
    parts.mkdir(parents=True, exist_ok=True)
    failed = {c.name: f"{c.path}: {c.error}" for c in clips if c.error}
    skipped = [c.name for c in clips if c.name not in failed and (out / f"{c.name}.safetensors").is_file()]
    pending = [c for c in clips if c.name not in failed and c.name not in skipped]

    def encode(stage: str, clip: Clip) -> dict:
        if stage == "text":
            feats, _ = sample.encode_text(models, clip.caption, text_weights)  # [1, n, C]
            return {"text": feats[0].cpu()}
        if stage == "video":
            pixels = read_clip_frames(clip.path, vae_frames, width, height)  # [1, 3, 4k+1, H, W]
            return {"video": models.get("wan").encode(pixels.to(device))[0].cpu()}  # [48, T, h, w]
        mono = read_clip_audio(clip.path, frames)  # [F · 2048]
        noise = sample.Noise(clip_audio_seed(clip.name, seed), device)
        return {"audio": models.get("audio_vae").encode_a2v(mono.to(device), noise=noise)[0].cpu()}  # [F, 64]

    def save(path, tensors, metadata=None):
        tensors = {k: v.float().contiguous() for k, v in tensors.items()}
        load_weights.atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    for stage, network in PREPARE_STAGES:
        todo = [c for c in pending if c.name not in failed and not (parts / f"{c.name}.{stage}.safetensors").is_file()]
        with models.use(network, lazy=True):  # one encoder in memory at a time, loaded only if needed
            if stage == "text" and not (out / NEGATIVE_FILE).is_file():
                feats, _ = sample.encode_text(models, te.NEGATIVE_PROMPT, text_weights)
                save(out / NEGATIVE_FILE, {"negative": feats[0].cpu()})
            for clip in tqdm(todo, desc=f"prepare {stage}", disable=not progress, dynamic_ncols=True):
                try:
                    save(parts / f"{clip.name}.{stage}.safetensors", encode(stage, clip))
                except Exception as e:  # any failure of one clip (broken file, no audio, ...) is reported, not fatal
                    failed[clip.name] = f"{clip.path}: {load_weights._first_line(e)}"
                    for stale in parts.glob(f"{clip.name}.*.safetensors"):  # a fixed file starts over
                        stale.unlink()
                    tqdm.write(f"prepare: skipped {failed[clip.name]}")
    done = []
    for clip in pending:
        if clip.name in failed:
            continue
        names = [parts / f"{clip.name}.{stage}.safetensors" for stage, _ in PREPARE_STAGES]
        tensors = {}
        for p in names:
            tensors.update(load_weights.read_safetensors(p))
        meta = {"source": clip.path.name, "caption": clip.caption, "size": f"{width}x{height}", "frames": str(frames),
                "fps": "25", "audio_seed": str(clip_audio_seed(clip.name, seed)), "tiny_random": str(bool(tiny_random))}
        save(out / f"{clip.name}.safetensors", tensors, meta)
        for p in names:
            p.unlink()
        done.append(clip.name)
    if not any(parts.iterdir()):
        parts.rmdir()
    return {"done": done, "skipped": skipped, "failed": failed}


class CachedLatents:
    """The data source of a `prepare` folder (the interface of ToyData/LatentFile): every clip file
    held in memory (about 2 MB per 4 s clip at 448x256), drawn uniformly."""

    def __init__(self, folder, text_channels: int):
        folder = Path(folder)
        files = sorted(p for p in folder.glob("*.safetensors") if p.name != NEGATIVE_FILE)
        if not files:
            raise ValueError(f"{folder}: no prepared clips (run: python train.py prepare CLIPS --out {folder})")
        if not (folder / NEGATIVE_FILE).is_file():
            raise ValueError(f"{folder}: missing {NEGATIVE_FILE} (written by train.py prepare)")
        video, audio, text = [], [], []
        for p in files:
            t = load_weights.read_safetensors(p)
            for k in ("video", "audio", "text"):
                if k not in t:
                    raise ValueError(f"{p}: missing tensor {k!r} (not a prepared clip)")
            if video and (t["video"].shape != video[0].shape or t["audio"].shape != audio[0].shape):
                raise ValueError(f"{p}: latents {tuple(t['video'].shape)}, {tuple(t['audio'].shape)} differ from "
                                 f"{files[0].name}'s {tuple(video[0].shape)}, {tuple(audio[0].shape)}; prepare all "
                                 "clips with one --size and --seconds")
            if t["text"].dim() != 2 or t["text"].shape[1] != text_channels:
                raise ValueError(f"{p}: text features are {tuple(t['text'].shape)}, the DiT takes [n, {text_channels}]")
            video.append(t["video"]), audio.append(t["audio"]), text.append(t["text"].float())
        self.names = [p.stem for p in files]
        self.data = distill.RealData(torch.stack(video), torch.stack(audio), text)
        self.negative = load_weights.read_safetensors(folder / NEGATIVE_FILE)["negative"].float()  # [n, C]

    def batch(self, B: int, generator: torch.Generator):
        idx = torch.randint(len(self.data.video), (B,), generator=generator)
        (video, audio), text = self.data.batch(idx)
        return video, audio, text


# ==================================================================================================
# Fine-tuning on your own clips (2): LoRA training and progress samples
# ==================================================================================================


class LoRANet(load_weights.LoRA):
    """The frozen DiT with trainable adapters hooked in (load_weights.LoRAHooks). The adapters are this
    module's only parameters, so the Trainer's optimiser, EMA, clipping and checkpoints see them alone,
    under the LoRA file's key names; the DiT is held outside the module tree."""

    def __init__(self, dit: DiT, lora: load_weights.LoRA):
        super().__init__(dict(lora.adapters()))
        object.__setattr__(self, "dit", dit.requires_grad_(False))  # not a submodule: no params, no keys
        self.hooks = load_weights.LoRAHooks(dit, self)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()

            def average(p):  # replicated adapters on FSDP-sharded frozen weights: average their grads
                torch.distributed.all_reduce(p.grad)
                p.grad /= world

            for p in self.parameters():
                p.register_post_accumulate_grad_hook(average)

    def forward(self, *args, **kwargs):
        return self.dit(*args, **kwargs)


def lora_network(cfg: TrainConfig, dit_cfg: DiTConfig, init_from, ckpt, device, mesh) -> LoRANet:
    """Frozen base (bf16 block linears unless --no-lora-base-bf16) + fp32 adapters, resumed from `ckpt`."""
    if ckpt is not None and (ckpt / "lora_base.json").is_file():  # adapters only fit the base they were trained on
        was = json.loads((ckpt / "lora_base.json").read_text())["init_from"]
        if was != (None if init_from is None else str(init_from)):
            raise ValueError(f"{ckpt}: these adapters were trained on {was or 'random weights'}; resume with that base")
    base = init_from if init_from is not None else random_dit(dit_cfg, seed=cfg.seed).state_dict()
    dtype = torch.bfloat16 if cfg.lora_base_bf16 else torch.float32
    dit = distill.load_network(base, dit_cfg, dtype, device, mesh, cfg.grad_checkpointing)
    targets = [t.strip() for t in cfg.lora_targets.split(",") if t.strip()]
    lora = load_weights.new_lora(dit, cfg.lora_rank, cfg.lora_alpha or None, targets, cfg.seed)
    net = LoRANet(dit, lora).to(device)
    if ckpt is not None:
        distill.load_small_module(net, ckpt / "raw" / "model.safetensors")
    return net


def sample_preview(net, source: CachedLatents, path, steps: int, decoders, rank: int = 0) -> None:
    """One clip from the first cached caption (live weights, base sampler with CFG, seed 0) -> mp4:
    the same base pass as sample.py, the decoders of `decoders` (a sample.Models)."""
    video0, audio0 = source.data.video[0], source.data.audio[0]  # [48, T, h, w], [F, 64]
    text, neg = source.data.text[0], source.negative
    dev = next(iter(net.parameters())).device
    cfg = sample.preset("base", num_inference_steps=steps)
    was_training = net.training
    with torch.no_grad():
        video, audio = sample.base_pass(
            net.eval(), cfg, text[None].to(dev), torch.tensor([len(text)]), neg[None].to(dev), torch.tensor([len(neg)]),
            num_frames=audio0.shape[0], latent_hw=tuple(video0.shape[-2:]), noise=sample.Noise(0, dev), progress=False)
        net.train(was_training)
        if rank != 0:
            return
        with decoders.use("turbo") as turbo:
            frames = sample.to_uint8_frames(turbo.decode(video))
        frames = np.concatenate([frames, np.repeat(frames[-1:], audio.shape[1] - len(frames), axis=0)])
        with decoders.use("audio_vae") as audio_vae:
            wave = vae.resample_to_44k(audio_vae.decode(audio))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    sample.write_mp4(path, frames, wave)


# ==================================================================================================
# Putting it together
# ==================================================================================================


def main(toy=False, data=None, preset="tiny", out="runs/toy", steps=4600, seconds=1.0, init_from=None, toy_dit=None,
         resume=False, save_every=250, log_every=10, device=None, threads=None, progress=True, sample_every=0,
         sample_steps=16, weights=None, compile=False, long_seconds=2.0, long_fraction=0.2, **overrides):
    """Train and write checkpoints to `out`; returns the Trainer. `overrides` are TrainConfig fields."""
    if threads:
        torch.set_num_threads(int(threads))
    rank, world, mesh, device = distill.init_distributed(device)
    cfg = TrainConfig(**overrides)
    extra = {}
    ckpt = distill.latest_checkpoint(out, resume)
    if toy:
        import toy as toy_lib  # the parameter `toy` shadows the module here

        known = next((f for f in (ckpt, init_from) if f is not None and (Path(f) / toy_lib.TOY_JSON).is_file()), None)
        if known is not None:  # a resumed run (or --init-from) keeps its DiT shape and constants
            if toy_dit:
                raise ValueError(f"--toy-dit applies to new runs only; {known} has its own {toy_lib.TOY_JSON}")
            dit_cfg, norm, words = toy_lib.read_toy_json(known)
        else:
            dit_cfg = toy_lib.toy_dit_config(**parse_toy_dit(toy_dit))
            norm = toy_lib.measure_normalisation()  # seeds 0..255: the same constants on every run
            words = toy_lib.WordTable(dit_cfg.text_in_channels)
        source = ToyData(seconds, norm, words, long_seconds, long_fraction)
        clips = {"seconds": seconds, "long_seconds": long_seconds, "long_fraction": long_fraction}
        extra[toy_lib.TOY_JSON] = lambda folder: toy_lib.write_toy_json(folder, dit_cfg, norm, clips)
    else:
        if data is None:
            raise ValueError("give --toy or --data FILE (pre-encoded latents, see LatentFile)")
        dit_cfg = dit_config(preset)
        source = (CachedLatents if Path(data).is_dir() else LatentFile)(data, dit_cfg.text_in_channels)
    if ckpt is not None:
        init = ckpt / "raw"  # the live weights; the EMA comes with the training state
    elif init_from is not None:
        init = init_from  # any layout load_weights reads; full fine-tuning
    else:
        init = fresh_weights(dit_cfg, cfg)
    if cfg.lora_rank > 0:  # frozen base + adapters; checkpoints also hold lora.safetensors (EMA, sample.py --lora)
        net = lora_network(cfg, dit_cfg, init_from, ckpt, device, mesh)
        extra["lora.safetensors"] = lambda folder: load_weights.save_lora(
            folder / "lora.safetensors", trainer.ema_state_dict(), net.alpha, {"preset": preset})
        extra["lora_base.json"] = lambda folder: (folder / "lora_base.json").write_text(
            json.dumps({"init_from": None if init_from is None else str(init_from)}))
    else:
        net = distill.load_network(init, dit_cfg, torch.float32, device, mesh, cfg.grad_checkpointing)
    if compile:
        if torch.device(device).type == "cpu":
            sample.check_cpu_compiler()
        # One compiled graph per layer structure (sandwich / shared, GELU7 / SwiGLU7), text padding
        # (masked or not) and clip shape: more than dynamo's default of 8 per function.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        compile_layers(net)
    trainer = Trainer(cfg, net, source, device=device, rank=rank, mesh=mesh)
    if ckpt is not None:
        trainer.resume(ckpt)
    if rank == 0:
        Path(out).mkdir(parents=True, exist_ok=True)
        n = sum(p.numel() for p in net.parameters())
        print(f"train: {world} process(es) on {device}; DiT {dit_cfg.num_layers} layers x {dit_cfg.hidden_size} "
              f"({n / 1e6:.2f} M parameters); " + (f"resumed from {ckpt} at step {trainer.step}" if ckpt else
                                                    f"from {init_from or 'random weights'}"))
    bar = tqdm(range(trainer.step, steps), initial=trainer.step, total=steps, disable=rank != 0 or not progress,
               dynamic_ncols=True)
    t0, last = time.time(), time.time()
    decoders = None
    if sample_every and not isinstance(source, CachedLatents):
        raise ValueError("--sample-every needs --data CACHE_DIR (a train.py prepare folder: its first caption is sampled)")
    if sample_every and preset != "tiny" and weights is None:
        raise ValueError("--sample-every needs --weights DIR (the Turbo VAE and audio VAE decoders)")
    for _ in bar:
        logs = trainer.train_step()
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if rank == 0 and (trainer.step % log_every == 0 or trainer.step == steps):
            now = time.time()
            logs.update(step=trainer.step, seconds=round(now - t0, 1), sec_per_step=round((now - last) / log_every, 3))
            last = now
            with open(Path(out) / "log.jsonl", "a") as f:
                f.write(json.dumps(logs) + "\n")
        if sample_every and trainer.step % sample_every == 0:
            if decoders is None:
                decoders = sample.Models(sample.tiny_builders(torch.float32) if preset == "tiny" else
                                         sample.release_builders(weights, "base", "none", torch.bfloat16),
                                         device, offload="model")
            sample_preview(net, source, Path(out) / "samples" / f"step-{trainer.step:07d}.mp4", sample_steps, decoders, rank)
        if trainer.step % save_every == 0 or trainer.step == steps:
            folder = trainer.save(out, extra)
            if rank == 0:
                bar.write(f"saved {folder} (step {trainer.step}, loss {logs['loss']:.4f})")
    return trainer


def parse_toy_dit(text: str | None) -> dict:
    """--toy-dit '{"mm_layers": [], "enable_attn_gating": false}' -> DiTConfig overrides of the toy DiT
    (the exercises of README "Train it yourself"); a bad value is one clear line."""
    if not text:
        return {}
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--toy-dit: not JSON ({e.msg}): {text}") from None
    fields = DiTConfig.__dataclass_fields__
    if not isinstance(overrides, dict) or not all(k in fields for k in overrides):
        bad = [k for k in overrides if k not in fields] if isinstance(overrides, dict) else overrides
        raise ValueError(f"--toy-dit: expected a JSON object of DiTConfig fields ({', '.join(fields)}), got {bad}")
    return overrides


def evaluate_toy(folder, model: str = "base", clips: int = 16, seconds: int = 2, steps: int | None = None,
                 workdir=None, verbose: bool = False) -> dict:
    """The metrics of issue 14 on mp4s written by sample.py's toy pipeline: clip i uses prompt
    i mod 8 and seed i div 8 + 1 (so 8 clips cover every prompt once), then toy.score."""
    results = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        for i in range(clips):
            prompt, seed = toy.ALL_PROMPTS[i % len(toy.ALL_PROMPTS)], i // len(toy.ALL_PROMPTS) + 1
            frames, wave = sample.toy_generate(folder, prompt, seconds, seed, model, steps, progress=False)
            path = Path(tmp) / f"clip{i}.mp4"
            sample.write_mp4(path, toy.upsample_frames(frames), toy.audio_to_44k(wave), fps=toy.FPS)
            m = toy.measure_mp4(path, seconds)
            if verbose:
                print(f"{prompt!r} seed {seed}: {m}")
            results.append((prompt, m))
    return toy.score(results)


def parse_args(argv=None):
    p = load_weights.OneLineParser(description="Flow-matching training of the daVinci-MagiHuman DiT (toy world or "
                                "pre-encoded latents). Multi-GPU: torchrun --nproc-per-node N train.py ...",
                                epilog="your own clips -> cached latents first: python train.py prepare --help")
    p.add_argument("--toy", action="store_true", help="train the toy world of toy.py (CPU, minutes)")
    p.add_argument("--data", help="pre-encoded latents: a `train.py prepare` folder, or one safetensors file "
                   "(video, audio, text, text_len, negative)")
    p.add_argument("--preset", default="tiny", help="DiT preset of model.py for --data (default tiny)")
    p.add_argument("--out", default="runs/toy", help="output folder: checkpoints and log.jsonl")
    p.add_argument("--steps", type=int, default=4600, help="total optimiser steps (default 4600)")
    p.add_argument("--seconds", type=float, default=None, help="toy clip length in seconds (default 1 for training; "
                   "2 for --evaluate, the length the metrics are defined at)")
    p.add_argument("--long-seconds", type=float, default=2.0, help="toy: length of the occasional long batch (default 2)")
    p.add_argument("--long-fraction", type=float, default=0.2, help="toy: fraction of batches of --long-seconds "
                   "clips (default 0.2)")
    p.add_argument("--toy-dit", metavar="JSON", help="--toy: DiTConfig overrides of the toy DiT, e.g. "
                   "'{\"mm_layers\": []}' (new runs only; a resumed run keeps its toy.json)")
    p.add_argument("--init-from", help="start from this checkpoint folder (any layout load_weights reads)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT layers (on 2 CPU cores: about "
                   "1.3x faster steps after 1-2 minutes of compiling; needs a C++ compiler)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--sample-every", type=int, default=0, metavar="N", help="every N steps write OUT/samples/"
                   "step-N.mp4 of the first cached caption (live weights; needs --weights unless --preset tiny)")
    p.add_argument("--sample-steps", type=int, default=16, help="sampling steps of those previews (default 16)")
    p.add_argument("--weights", help="released weights folder (decoders for --sample-every)")
    p.add_argument("--evaluate", metavar="DIR", help="do not train: measure the toy checkpoint DIR through "
                   "sample.py's pipeline and the checker of toy.py (with --model, --clips)")
    p.add_argument("--model", choices=["base", "distill"], default="base", help="--evaluate: sampler (default base)")
    p.add_argument("--clips", type=int, default=16, help="--evaluate: number of clips (default 16 = 8 prompts x 2 seeds)")
    distill.add_config_flags(p, TrainConfig)  # every TrainConfig field is a flag
    args = p.parse_args(argv)
    if args.steps < 1 or args.save_every < 1 or args.log_every < 1:
        p.error("--steps, --save-every and --log-every must be >= 1")
    return args


def prepare_main(argv) -> int:
    """`train.py prepare CLIPS --out CACHE ...`: exit 0 when every clip is cached, 1 if some failed,
    2 on bad input (no such folder, no clips, bad --size, missing weights)."""
    p = load_weights.OneLineParser(prog="train.py prepare", description="Encode a folder of clips (mp4/mov/mkv/webm "
                                "+ name.txt or captions.jsonl) into cached latents for train.py --data.")
    p.add_argument("clips", help="folder of video files with their captions")
    p.add_argument("--out", required=True, help="cache folder: one safetensors per clip (resumable)")
    p.add_argument("--weights", help="released weights folder (T5-Gemma, Wan2.2 VAE, Stable Audio Open)")
    p.add_argument("--tiny-random", action="store_true", help="tiny random encoders (tests; no weights)")
    p.add_argument("--size", default="448x256", help="video size WxH, floored to multiples of 32 (default 448x256)")
    p.add_argument("--seconds", type=int, default=4, help="clip length: 25*s+1 frames, cut or padded (default 4)")
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0, help="seed of the audio posterior draws")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    a = p.parse_args(argv)

    def run() -> int:
        s = prepare(a.clips, a.out, a.weights, a.tiny_random, sample.parse_size(a.size), a.seconds, a.device, a.seed,
                    a.progress)
        print(f"prepare: {len(s['done'])} clip(s) written, {len(s['skipped'])} already done, {len(s['failed'])} failed")
        for msg in s["failed"].values():
            print(f"  failed: {msg}")
        return 1 if s["failed"] else 0

    # Bad input (no such folder, no clips, bad --size, missing weights), a full disk, Ctrl-C: one line, exit 2.
    return load_weights.guarded(run, user_errors=(ValueError,),
                                interrupted=lambda: "interrupted: finished clips are kept (a re-run skips them)")


def cli(argv=None) -> int:
    """The command line: bad input, a full disk, Ctrl-C or SIGTERM give one line on stderr and exit
    status 2 (load_weights.guarded); checkpoints are written atomically, so --resume continues."""
    args = parse_args(argv)
    evaluate, model, clips = args.evaluate, args.model, args.clips
    del args.evaluate, args.model, args.clips
    if args.seconds is None:  # training on 1 s clips, measuring on 2 s ones (as the test and README do)
        args.seconds = 2.0 if evaluate else 1.0

    def run():
        if not evaluate:
            main(**vars(args))
            return

        if args.threads:
            torch.set_num_threads(args.threads)
        s = evaluate_toy(evaluate, model, clips, int(args.seconds), verbose=args.progress)
        print(json.dumps(s))
        print(f"{evaluate} ({model}): {toy.describe(s)} -> {'PASS' if toy.passes(s) else 'below the thresholds'}")

    return load_weights.guarded(run, user_errors=(ValueError,),
                                interrupted=lambda: "interrupted: checkpoints saved so far are complete (--resume continues)")


if __name__ == "__main__":
    if sys.argv[1:2] == ["prepare"]:
        sys.exit(prepare_main(sys.argv[2:]))
    sys.exit(cli())
