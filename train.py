"""Flow-matching training of the daVinci-MagiHuman DiT: the toy world on a laptop CPU, any data source
that yields latents, FSDP2 under torchrun.

    python train.py --toy --out runs/toy                     # the toy world (toy.py) on the CPU
    python train.py --data latents.safetensors --preset base --init-from DIR --out runs/ft
    torchrun --nproc-per-node 8 train.py --data ... --out ...   # FSDP2, the same code as distill.py

The official release has no training code; this file mirrors no official file. What it trains is
exactly what sample.py samples: a `model.DiT` that maps noisy (video, audio) latents plus text
features to the flow-matching velocity, with no timestep input.

The objective (the convention of sample.py's samplers):
- x_σ = (1 − σ)·x0 + σ·ε, target v = ε − x0, loss = mean (v̂ − v)² per modality (video and audio
  each their own mean, summed with weights 1).
- One σ per sample, shared by video and audio (they are denoised together at one σ when sampling).
- σ = shift(u), u ~ logit-normal(0, 1) (SD3's "lognorm"), shift(u) = s·u / (1 + (s − 1)·u) with
  s = --sigma-shift (default 3): the samplers use s = 5 on a uniform grid and so spend most of
  their steps at high σ; s = 3 with logit-normal puts the median σ at 0.75 and still trains
  every σ in (0, 1).
- Text dropped to the negative prompt for --text-dropout of the samples (default 10%), so that
  classifier-free guidance (cond vs. negative prompt, as sample.py's base pass) has an uncond model.
- AdamW, linear warm-up, gradient clipping, an EMA of the weights (what gets sampled), fp32 master
  weights with optional bf16 autocast, optional per-layer activation checkpointing.

A data source is any object with `batch(B, generator) -> (video [B, 48, T, h, w], audio [B, N, 64],
distill.Text)` and `negative` (the negative-prompt features [n, C]); `ToyData` renders clips from
toy.py on the fly, `LatentFile` reads pre-encoded latents. Checkpoints (`OUT/ckpt-NNNNNNN/`):
`model.safetensors` = the EMA weights under the official key names (load_weights.load_dit reads it,
sample.py samples it), `raw/model.safetensors` the live weights, `train_state_rank{r}.safetensors`
optimiser moments, EMA and RNG, `state.json` the counters, `toy.json` the toy's constants.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import distill
import load_weights
from model import DiT, dit_config, random_dit

# ==================================================================================================
# Configuration
# ==================================================================================================


@dataclass
class TrainConfig:
    """Every knob of a run (defaults: the toy run of README "Train it yourself")."""

    batch_size: int = 4  # per process
    lr: float = 1e-3
    warmup: int = 100  # steps of linear learning-rate warm-up
    betas: tuple = (0.9, 0.99)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    ema_decay: float = 0.995
    ema_start: int = 200  # the EMA follows the weights exactly before this step
    text_dropout: float = 0.1  # fraction of samples trained with the negative prompt (for CFG)
    sigma_shift: float = 3.0
    logit_mean: float = 0.0
    logit_std: float = 1.0
    video_weight: float = 1.0
    audio_weight: float = 1.0
    bf16: bool = False  # bf16 autocast around the fp32 network (CPU and CUDA)
    grad_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.batch_size < 1 or self.lr <= 0 or not 0 <= self.ema_decay < 1 or not 0 <= self.text_dropout <= 1:
            raise ValueError("need batch_size >= 1, lr > 0, 0 <= ema_decay < 1, 0 <= text_dropout <= 1")


# ==================================================================================================
# Noise levels and the loss
# ==================================================================================================


def training_sigmas(n: int, cfg: TrainConfig, generator: torch.Generator) -> torch.Tensor:
    """σ [n]: u = sigmoid(N(m, s²)), then the sampler's shift map (see the module docstring)."""
    u = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator, dtype=torch.float64))
    return distill.shift_sigma(u, cfg.sigma_shift).float()


def flow_matching_loss(net, x0: tuple, text: distill.Text, sigma: torch.Tensor, noise: tuple, cfg: TrainConfig):
    """(total loss, per-modality losses): v̂ = net(x_σ) against v = ε − x0, one σ per sample."""
    x = tuple(distill.add_noise(m, e, sigma) for m, e in zip(x0, noise))
    v = distill.dit_velocity(net, x, sigma, text)
    losses = [F.mse_loss(vm.float(), (e - m).float()) for vm, e, m in zip(v, noise, x0)]
    total = cfg.video_weight * losses[0] + cfg.audio_weight * losses[1]
    return total, losses


# ==================================================================================================
# Data sources
# ==================================================================================================


class ToyData:
    """Clips of the toy world rendered on the fly: a clip's seed is drawn from the training RNG."""

    def __init__(self, seconds: float, norm, words):
        import toy

        self.toy, self.seconds = toy, seconds
        self.codec, self.words = toy.Codec(norm), words
        self.negative = words.null()  # [1, C]

    def batch(self, B: int, generator: torch.Generator):
        seeds = torch.randint(2**31 - 1, (B,), generator=generator).tolist()
        clips = [self.toy.make_clip(s, self.seconds) for s in seeds]
        frames = torch.stack([torch.from_numpy(f) for _, f, _ in clips]).numpy()
        audio = torch.stack([torch.from_numpy(a) for _, _, a in clips]).numpy()
        video, audio = self.codec.encode(frames, audio)  # [B, 48, T, 16, 16], [B, N, 64]
        text = distill.pad_text([self.words.encode(p.prompt) for p, _, _ in clips])
        return video, audio, text


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
        return self.cfg.lr * min(1.0, (step + 1) / max(1, self.cfg.warmup))

    def amp(self):
        on = self.cfg.bf16
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if on else contextlib.nullcontext()

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
            import torch.distributed as dist

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
        from safetensors.torch import save_file

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


def latest_checkpoint(out) -> Path | None:
    pointer = Path(out) / "latest"
    if not pointer.is_file():
        return None
    folder = Path(out) / pointer.read_text().strip()
    if not (folder / "state.json").is_file():
        raise load_weights.CheckpointError(f"{folder}: incomplete checkpoint (no state.json)")
    return folder


# ==================================================================================================
# Putting it together
# ==================================================================================================


def main(toy=False, data=None, preset="tiny", out="runs/toy", steps=3000, seconds=2.0, init_from=None,
         resume=False, save_every=250, log_every=10, device=None, threads=None, progress=True, **overrides):
    """Train and write checkpoints to `out`; returns the Trainer. `overrides` are TrainConfig fields."""
    from tqdm import tqdm

    if threads:
        torch.set_num_threads(int(threads))
    rank, world, mesh, device = distill.init_distributed(device)
    cfg = TrainConfig(**overrides)
    extra = {}
    if toy:
        import toy as toy_lib

        if init_from is not None and (Path(init_from) / toy_lib.TOY_JSON).is_file():
            dit_cfg, norm, words = toy_lib.read_toy_json(init_from)
        else:
            dit_cfg = toy_lib.toy_dit_config()
            norm = toy_lib.measure_normalisation()  # seeds 0..255: the same constants on every run
            words = toy_lib.WordTable(dit_cfg.text_in_channels)
        source = ToyData(seconds, norm, words)
        extra[toy_lib.TOY_JSON] = lambda folder: toy_lib.write_toy_json(folder, dit_cfg, norm, {"seconds": seconds})
    else:
        if data is None:
            raise ValueError("give --toy or --data FILE (pre-encoded latents, see LatentFile)")
        dit_cfg = dit_config(preset)
        source = LatentFile(data, dit_cfg.text_in_channels)
    ckpt = latest_checkpoint(out) if resume else None
    if ckpt is not None:
        init = ckpt / "raw"  # the live weights; the EMA comes with the training state
    elif init_from is not None:
        init = init_from  # any layout load_weights reads; full fine-tuning
    else:
        init = random_dit(dit_cfg, seed=cfg.seed).state_dict()
    net = distill.load_network(init, dit_cfg, torch.float32, device, mesh, cfg.grad_checkpointing)
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
    for _ in bar:
        logs = trainer.train_step()
        bar.set_postfix(loss=f"{logs['loss']:.4f}")
        if rank == 0 and (trainer.step % log_every == 0 or trainer.step == steps):
            now = time.time()
            logs.update(step=trainer.step, seconds=round(now - t0, 1), sec_per_step=round((now - last) / log_every, 3))
            last = now
            with open(Path(out) / "log.jsonl", "a") as f:
                f.write(json.dumps(logs) + "\n")
        if trainer.step % save_every == 0 or trainer.step == steps:
            folder = trainer.save(out, extra)
            if rank == 0:
                bar.write(f"saved {folder} (step {trainer.step}, loss {logs['loss']:.4f})")
    return trainer


def evaluate_toy(folder, model: str = "base", clips: int = 16, seconds: int = 2, steps: int | None = None,
                 workdir=None, verbose: bool = False) -> dict:
    """The metrics of issue 14 on mp4s written by sample.py's toy pipeline: clip i uses prompt
    i mod 8 and seed i div 8 + 1 (so 8 clips cover every prompt once), then toy.score."""
    import tempfile

    import sample
    import toy

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
    p = argparse.ArgumentParser(description="Flow-matching training of the daVinci-MagiHuman DiT (toy world or "
                                "pre-encoded latents). Multi-GPU: torchrun --nproc-per-node N train.py ...")
    p.add_argument("--toy", action="store_true", help="train the toy world of toy.py (CPU, minutes)")
    p.add_argument("--data", help="pre-encoded latents (safetensors: video, audio, text, text_len, negative)")
    p.add_argument("--preset", default="tiny", help="DiT preset of model.py for --data (default tiny)")
    p.add_argument("--out", default="runs/toy", help="output folder: checkpoints and log.jsonl")
    p.add_argument("--steps", type=int, default=3000, help="total optimiser steps")
    p.add_argument("--seconds", type=float, default=2.0, help="toy clip length in seconds (default 2)")
    p.add_argument("--init-from", help="start from this checkpoint folder (any layout load_weights reads)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/latest")
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("--evaluate", metavar="DIR", help="do not train: measure the toy checkpoint DIR through "
                   "sample.py's pipeline and the checker of toy.py (with --model, --clips)")
    p.add_argument("--model", choices=["base", "distill"], default="base", help="--evaluate: sampler (default base)")
    p.add_argument("--clips", type=int, default=16, help="--evaluate: number of clips (default 16 = 8 prompts x 2 seeds)")
    for f in TrainConfig.__dataclass_fields__.values():  # every TrainConfig field is a flag
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        elif f.name == "betas":
            p.add_argument(flag, type=float, nargs=2, default=f.default)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    args = p.parse_args(argv)
    if args.steps < 1 or args.save_every < 1 or args.log_every < 1:
        p.error("--steps, --save-every and --log-every must be >= 1")
    return args


if __name__ == "__main__":
    args = parse_args()
    try:
        evaluate, model, clips = args.evaluate, args.model, args.clips
        del args.evaluate, args.model, args.clips
        if evaluate:
            import toy

            if args.threads:
                torch.set_num_threads(args.threads)
            s = evaluate_toy(evaluate, model, clips, int(args.seconds), verbose=args.progress)
            print(json.dumps(s))
            print(f"{evaluate} ({model}): {toy.describe(s)} -> {'PASS' if toy.passes(s) else 'below the thresholds'}")
        else:
            main(**vars(args))
    except (ValueError, load_weights.CheckpointError) as e:  # bad input: one line, no traceback, exit 2
        print(f"train.py: error: {e}", file=sys.stderr)
        sys.exit(2)
