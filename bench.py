"""Speed of every pipeline stage at the paper's shapes, against the official figures.

    python bench.py                      # one GPU: full-size models (random weights), bf16, compiled
    python bench.py --stages dit256,sr540 --no-compile
    python bench.py --offload layers     # peak memory / slowdown of streaming the DiT's layers
    torchrun --nproc-per-node 4 bench.py --stages sr540,sr1080   # sequence-parallel scaling
    python bench.py --tiny               # CPU smoke run at a tiny size: eager vs compiled
    python bench.py --quant int8         # the stages with 8-bit block linears (DiTs, text encoder)
    python bench.py --gemm               # bf16 vs int8 / fp8 weight-only GEMMs at the DiT's shapes (any device)
    python bench.py --memory             # weight bytes per network and --quant mode, counted from built modules

The official figures (README of GAIR-NLP/daVinci-MagiHuman, one H100, a 5 s clip): 256p 2.0 s (DiT
1.6 s + decode 0.4 s), 540p 8.0 s (+ SR 5.1 s, decode 1.3 s), 1080p 38.4 s (+ SR 31.0 s, decode
5.8 s). The shapes are theirs: 5 s = 126 frames = 32 latent frames; base 448x256, distilled, 8
steps, no CFG; SR 5 steps, cond pass only (both official SR examples), 896x512 full attention and
1920x1088 with 32 local-attention layers. Weights are random (no download needed): speed does not
depend on their values. Times are CUDA-event medians over `--reps` runs after `--warmup` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import load_weights
import model as dit_lib
import quant
import sample
import text_encoder as te
import vae

PEAK_BF16_TFLOPS = 989.0  # H100/H200 SXM dense bf16 datasheet figure
SECONDS = 5
TEXT_TOKENS = 200  # a typical enhanced prompt (prompts run from ~100 to the 640-token cap)
OFFICIAL_MS = {"dit256": 1600, "sr540": 5100, "sr1080": 31000, "turbo256": 400, "turbo540": 1300, "turbo1080": 5800}

# ==================================================================================================
# FLOPs: matmuls of the 40 layers, attention, embedders and heads
# ==================================================================================================


def dit_flops(cfg: dit_lib.DiTConfig, T: int, h: int, w: int, num_audio: int, num_text: int) -> float:
    """FLOPs of one DiT forward (multiply-add = 2), local attention counted by the pairs it visits."""
    D, d, H, G = cfg.hidden_size, cfg.head_dim, cfg.num_heads_q, cfg.num_heads_kv
    tpf = (h // 2) * (w // 2)
    Nv = T * tpf
    L = Nv + num_audio + num_text
    qkv = H * d + 2 * G * d + (H if cfg.enable_attn_gating else 0)
    per_token = 0
    for i in range(cfg.num_layers):
        inner = 4 * D if i in cfg.gelu7_layers else dit_lib.swiglu7_intermediate(D)
        up = inner if i in cfg.gelu7_layers else 2 * inner
        per_token += 2 * D * qkv + 2 * H * d * D + 2 * D * up + 2 * inner * D
    # Local layers: video queries of frame i see video frames within +-R plus all audio/text keys.
    R = cfg.frame_receptive_field
    frames_seen = sum(min(T - 1, i + R) - max(0, i - R) + 1 for i in range(T))
    local_pairs = tpf * tpf * frames_seen + Nv * (L - Nv) + (L - Nv) * L
    attn = sum(4 * d * H * (local_pairs if i in cfg.local_attn_layers else L * L) for i in range(cfg.num_layers))
    embed = 2 * D * (cfg.video_in_channels * Nv + cfg.audio_in_channels * num_audio + cfg.text_in_channels * num_text)
    heads = 2 * D * (cfg.video_in_channels * Nv + cfg.audio_in_channels * num_audio)
    return per_token * L + attn + embed + heads


# ==================================================================================================
# Timing
# ==================================================================================================


def time_ms(fn, device, warmup: int, reps: int) -> tuple[float, float]:
    """(median ms, peak memory GiB) of fn() after `warmup` calls; CUDA events on GPU."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1000 * (time.perf_counter() - t0))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return statistics.median(times), peak


@dataclass
class Row:
    stage: str
    shape: str
    ms: float
    flops: float | None = None
    official_ms: float | None = None
    peak_gib: float = float("nan")
    note: str = ""


def format_table(rows: list[Row], device_name: str) -> str:
    head = f"{'stage':<16}{'shape':<30}{'ms':>10}{'TFLOP':>9}{'TFLOP/s':>9}{'%peak':>7}{'official':>10}{'ratio':>7}{'peak GiB':>10}  note"
    lines = [f"device: {device_name}", head, "-" * len(head)]
    for r in rows:
        tf = f"{r.flops / 1e12:9.1f}" if r.flops else f"{'-':>9}"
        rate = r.flops / 1e12 / (r.ms / 1e3) if r.flops else None
        rate_s = f"{rate:9.0f}" if rate is not None else f"{'-':>9}"
        pct = f"{100 * rate / PEAK_BF16_TFLOPS:6.0f}%" if rate is not None else f"{'-':>7}"
        off = f"{r.official_ms:10.0f}" if r.official_ms else f"{'-':>10}"
        ratio = f"{r.ms / r.official_ms:7.2f}" if r.official_ms else f"{'-':>7}"
        peak = f"{r.peak_gib:10.1f}" if r.peak_gib == r.peak_gib else f"{'-':>10}"  # NaN on CPU
        lines.append(f"{r.stage:<16}{r.shape:<30}{r.ms:10.1f}{tf}{rate_s}{pct}{off}{ratio}{peak}  {r.note}")
    return "\n".join(lines)


# ==================================================================================================
# The stages
# ==================================================================================================


def preset_dit(preset: str, device, dtype, tiny: bool, offload: str, compile: bool, sp=None, quant_mode="none"):
    """A DiT of a released preset (or its tiny twin) with random weights, placed as `offload` says."""
    cfg = dit_lib.dit_config(preset)
    if tiny:  # same features (coords style, local layers) at a few MB
        cfg = dit_lib.dit_config("tiny", coords_style=cfg.coords_style, frame_receptive_field=2,
                                 local_attn_layers=[1, 2] if cfg.local_attn_layers else [])
    dit = dit_lib.random_dit(cfg, block_dtype=dtype, seed=0, device="cpu" if offload == "layers" else device)
    quant.quantize_modules(dit, quant_mode)
    if offload == "layers":
        dit_lib.LayerStreamer(dit, device)
        for name_, child in dit.named_children():
            if name_ != "block":
                child.to(device)
    if sp is not None:
        sp.apply(dit)
    if compile and offload != "layers":
        dit_lib.compile_layers(dit)
    return dit


def text_features(cfg, device, n=TEXT_TOKENS):
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(1, n, cfg.text_in_channels, generator=g).to(device), torch.tensor([n])


def bench_dit256(args, device, dtype, sp) -> Row:
    """The distilled base pass: 8 steps, one forward each, at 448x256 (latent 32x16x28)."""
    size = (64, 32) if args.tiny else (448, 256)
    dit = preset_dit("distill", device, dtype, args.tiny, args.offload, args.compile, sp, args.quant)
    text, tl = text_features(dit.cfg, device, 8 if args.tiny else TEXT_TOKENS)
    cfg = sample.preset("distill")
    frames = sample.num_frames_for(1 if args.tiny else SECONDS)
    hw = sample.latent_size(*size)

    def run():
        sample.base_pass(dit, cfg, text, tl, num_frames=frames, latent_hw=hw,
                         noise=sample.Noise(0, device), progress=False)

    ms, peak = time_ms(run, device, args.warmup, args.reps)
    T = sample.latent_length(frames)
    flops = cfg.num_inference_steps * dit_flops(dit.cfg, T, *hw, frames, int(tl[0]))
    return Row("dit256", f"8 x [{T},{hw[0]},{hw[1]}]+{frames}a+{int(tl[0])}t", ms, flops, OFFICIAL_MS["dit256"], peak)


def bench_sr(args, device, dtype, sp, which: str) -> Row:
    """The SR pass: 5 UniPC steps, cond only, at 896x512 (full) or 1920x1088 (local attention)."""
    base = (64, 32) if args.tiny else (448, 256)
    sr_w, sr_h = (128, 64) if args.tiny else sample.sr_size_for(*base, which)
    dit = preset_dit(f"{which}_sr", device, dtype, args.tiny, args.offload, args.compile, sp, args.quant)
    text, tl = text_features(dit.cfg, device, 8 if args.tiny else TEXT_TOKENS)
    cfg = sample.preset(f"{which}_sr")
    frames = sample.num_frames_for(1 if args.tiny else SECONDS)
    T, (lh, lw), sr_hw = sample.latent_length(frames), sample.latent_size(*base), sample.latent_size(sr_w, sr_h)
    g = torch.Generator(device="cpu").manual_seed(0)
    br_video = torch.randn(1, 48, T, lh, lw, generator=g).to(device)
    br_audio = torch.randn(1, frames, 64, generator=g).to(device)

    def run():
        sample.sr_pass(dit, cfg, br_video, br_audio, text, tl, sr_latent_hw=sr_hw,
                         noise=sample.Noise(0, device), progress=False)

    ms, peak = time_ms(run, device, args.warmup, args.reps)
    flops = cfg.sr_num_inference_steps * dit_flops(dit.cfg, T, *sr_hw, frames, int(tl[0]))
    name = f"sr{which[:-1]}"
    return Row(name, f"5 x [{T},{sr_hw[0]},{sr_hw[1]}]+{frames}a+{int(tl[0])}t", ms, flops, OFFICIAL_MS[name], peak)


def bench_decode(args, device, dtype, which: str) -> Row:
    """Turbo VAE decode of a 5 s latent at the stage's size."""
    sizes = {"256": (448, 256), "540": (896, 512), "1080": (1920, 1088)}
    w, h = (64, 32) if args.tiny else sizes[which]
    cfg = vae.TurboVAEDConfig.tiny() if args.tiny else vae.TurboVAEDConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        turbo = vae.TurboVAED(cfg).to(device=device, dtype=dtype).eval()
    if args.compile:
        turbo.decoder.compile(dynamic=False)
    frames = sample.num_frames_for(1 if args.tiny else SECONDS)
    lh, lw = sample.latent_size(w, h)
    latent = torch.randn(1, 48, sample.latent_length(frames), lh, lw, device=device)
    ms, peak = time_ms(lambda: turbo.decode(latent), device, args.warmup, args.reps)
    name = f"turbo{which}"
    return Row(name, f"[{latent.shape[2]},{lh},{lw}] -> {w}x{h}", ms, None, OFFICIAL_MS[name], peak)


def bench_audio(args, device) -> Row:
    cfg = vae.OobleckConfig.tiny() if args.tiny else vae.OobleckConfig()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        audio_vae = vae.OobleckVAE(cfg).to(device).eval()  # fp32, as upstream
    frames = sample.num_frames_for(1 if args.tiny else SECONDS)
    latent = torch.randn(1, frames, 64, device=device)

    def run():
        vae.resample_to_44k(audio_vae.decode(latent))

    ms, peak = time_ms(run, device, args.warmup, args.reps)
    return Row("audio decode", f"{frames} latents -> 44.1 kHz", ms, None, None, peak, "incl. resample")


def bench_text(args, device, dtype) -> Row:
    cfg = te.T5GemmaEncoderConfig.tiny() if args.tiny else te.T5GemmaEncoderConfig()
    with torch.device("meta"):
        enc = te.T5GemmaEncoder(cfg)
    enc = enc.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.02)
    quant.quantize_modules(enc, args.quant)
    ids = torch.randint(4, cfg.vocab_size, (1, TEXT_TOKENS), device=device)
    ms, peak = time_ms(lambda: enc(ids), device, args.warmup, args.reps)
    return Row("text encode", f"{TEXT_TOKENS} tokens", ms, None, None, peak)


STAGES = ("text", "dit256", "sr540", "sr1080", "turbo256", "turbo540", "turbo1080", "audio")


# ==================================================================================================
# 8-bit weights: GEMM speed and weight memory (`--gemm`, `--memory`)
# ==================================================================================================

# The DiT's block linears (released config): rows x columns of one expert's weight.
DIT_LINEARS = {"linear_qkv": (7208, 5120), "linear_proj": (5120, 5120), "up_gate_proj": (2 * 13652, 5120),
               "down_proj": (5120, 13652)}


def bench_gemm(args, device) -> str:
    """One linear of the DiT at `--gemm-tokens` rows: bf16 F.linear against quant.QuantLinear in int8
    and fp8 (dequantize-on-the-fly, the path --quant runs). Same inputs, same run; the ratio is
    quantized / bf16 time. (torch's int8 weight-only CPU kernel `_weight_int8pack_mm` is not used: it
    crashed on the 7208-row qkv weight here, and was 2.8x slower than bf16 on a 3072x3072 one.)"""
    import torch.nn.functional as F

    M = args.gemm_tokens
    dtype = torch.bfloat16
    lines = [f"weight-only GEMMs on {device_label(device)}, {M} tokens, {torch.get_num_threads()} threads, "
             f"median of {args.reps} after {args.warmup} warm-up",
             f"{'linear':<14}{'shape':<16}{'bf16 ms':>9}{'int8 ms':>9}{'ratio':>7}{'fp8 ms':>9}{'ratio':>7}"]
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, (N, K) in DIT_LINEARS.items():
        w = (torch.randn(N, K, generator=g) * K ** -0.5).to(device=device, dtype=dtype)
        x = torch.randn(1, M, K, generator=g).to(device=device, dtype=dtype)
        times = {"bf16": time_ms(lambda: F.linear(x, w), device, args.warmup, args.reps)[0]}
        for mode in ("int8", "fp8"):
            lin = quant.QuantLinear(K, N, 1, mode, dtype, device=device)
            lin.weight.data, lin.weight_scale.data = quant.quantize_weight(w, mode)
            times[mode] = time_ms(lambda: lin(x), device, args.warmup, args.reps)[0]
        lines.append(f"{name:<14}{f'{N}x{K}':<16}{times['bf16']:9.1f}{times['int8']:9.1f}{times['int8'] / times['bf16']:7.2f}"
                     f"{times['fp8']:9.1f}{times['fp8'] / times['bf16']:7.2f}")
    return "\n".join(lines)


def device_label(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"


def weight_memory_table() -> str:
    """Bytes of weights per network and --quant mode, summed over the parameters and buffers of the
    networks built on the meta device at the released configs (nothing allocated, nothing guessed)."""
    import text_encoder as te
    import vae

    nets = {}
    for mode in quant.MODES:
        with torch.device("meta"):
            nets[("DiT (each of base/distill/SR)", mode)] = quant.quantize_modules(
                dit_lib.DiT(dit_lib.dit_config("distill"), block_dtype=torch.bfloat16), mode)
            nets[("T5-Gemma encoder", mode)] = quant.quantize_modules(
                te.T5GemmaEncoder(te.T5GemmaEncoderConfig()).to(torch.bfloat16), mode)
    with torch.device("meta"):
        others = {"Turbo VAE decoder (bf16)": vae.TurboVAED(vae.TurboVAEDConfig()).to(torch.bfloat16),
                  "Wan2.2 VAE (bf16)": vae.WanVAE(vae.WanVAEConfig()).to(torch.bfloat16),
                  "audio VAE (fp32)": vae.OobleckVAE(vae.OobleckConfig())}
    lines = ["weights in GB (1e9 bytes), counted from modules built on the meta device",
             f"{'network':<32}{'none':>8}{'int8':>8}{'fp8':>8}   of which not quantized"]
    for net in ("DiT (each of base/distill/SR)", "T5-Gemma encoder"):
        b = {m: quant.weight_bytes(nets[(net, m)]) for m in quant.MODES}
        lines.append(f"{net:<32}" + "".join(f"{b[m]['total'] / 1e9:8.2f}" for m in quant.MODES) + f"   {b['int8']['other'] / 1e9:.2f}")
        if net.startswith("DiT"):
            layer = max(sum(p.numel() * p.element_size() for p in lay.parameters()) for lay in nets[(net, "int8")].block.layers)
            layer_bf16 = max(sum(p.numel() * p.element_size() for p in lay.parameters()) for lay in nets[(net, "none")].block.layers)
            lines.append(f"{'  largest DiT layer (streamed)':<32}{layer_bf16 / 1e9:8.2f}{layer / 1e9:8.2f}{layer / 1e9:8.2f}")
    for net, m in others.items():
        nb = quant.weight_bytes(m)["total"] / 1e9
        lines.append(f"{net:<32}{nb:8.2f}{nb:8.2f}{nb:8.2f}")
    return "\n".join(lines)


def run_stages(args, device, dtype, sp=None) -> list[Row]:
    rows = []
    for stage in args.stages:
        if stage == "text":
            rows.append(bench_text(args, device, dtype))
        elif stage == "dit256":
            rows.append(bench_dit256(args, device, dtype, sp))
        elif stage in ("sr540", "sr1080"):
            rows.append(bench_sr(args, device, dtype, sp, stage[2:] + "p"))
        elif stage.startswith("turbo"):
            rows.append(bench_decode(args, device, dtype, stage[5:]))
        elif stage == "audio":
            rows.append(bench_audio(args, device))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def scaling(args, argv) -> int:
    """--nproc N: run the stages under torchrun with 1 and with N ranks and print the speed-up."""
    child = [a for a in (argv if argv is not None else sys.argv[1:])]
    k = child.index("--nproc") if "--nproc" in child else None
    child = child[:k] + child[k + 2:] if k is not None else [a for a in child if not a.startswith("--nproc=")]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in (1, args.nproc):
            out = Path(tmp) / f"{world}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(world),
                   "--master-port", str(29500 + world), __file__, *child, "--json-out", str(out)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                print(r.stdout + r.stderr, file=sys.stderr)
                return r.returncode
            results[world] = json.loads(out.read_text())
    one, many = results[1], results[args.nproc]
    lines = [f"sequence-parallel scaling on {one['device']}: 1 vs {args.nproc} ranks",
             f"{'stage':<16}{'1 rank ms':>12}{f'{args.nproc} ranks ms':>14}{'speed-up':>10}{'efficiency':>12}"]
    for a, b in zip(one["rows"], many["rows"]):
        speedup = a["ms"] / b["ms"]
        lines.append(f"{a['stage']:<16}{a['ms']:12.1f}{b['ms']:14.1f}{speedup:10.2f}{speedup / args.nproc:11.0%}")
    print("\n".join(lines))
    return 0


def main(argv=None) -> int:
    p = load_weights.OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="CPU smoke run at a tiny size (eager, then compiled)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    p.add_argument("--reps", type=int, default=None, help="timed runs per stage (median; default 3, tiny 2)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (compilation happens here)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="torch.compile the DiT layers and the Turbo decoder")
    p.add_argument("--offload", choices=["none", "layers"], default="none", help="stream the DiT layers from host memory")
    p.add_argument("--nproc", type=int, default=1, help="compare 1 rank with N sequence-parallel ranks (runs torchrun)")
    p.add_argument("--json-out", default=None, help=argparse.SUPPRESS)  # used by --nproc for its children
    p.add_argument("--quant", choices=list(quant.MODES), default="none", help="8-bit block linears in the DiT and text stages")
    p.add_argument("--gemm", action="store_true", help="only time bf16 vs int8/fp8 weight-only GEMMs at the DiT's linear shapes")
    p.add_argument("--gemm-tokens", type=int, default=512, help="rows of the GEMM input for --gemm (default 512)")
    p.add_argument("--memory", action="store_true", help="only print the weight bytes per network and --quant mode")
    args = p.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    bad = sorted(set(args.stages) - set(STAGES))
    if bad:
        p.error(f"unknown stage(s) {bad}; choose from {list(STAGES)}")
    if args.reps is not None and args.reps < 1 or args.warmup < 0 or args.nproc < 1 or args.gemm_tokens < 1:
        p.error("--reps, --nproc and --gemm-tokens must be >= 1, --warmup >= 0")
    if args.json_out:
        load_weights.check_output_path(args.json_out, "--json-out")
    args.reps = args.reps or (2 if args.tiny else 3)
    torch.set_grad_enabled(False)  # inference only: no autograd graphs, no saved activations
    if args.memory:
        print(weight_memory_table())
        return 0
    if args.gemm:
        print(bench_gemm(args, torch.device("cuda" if torch.cuda.is_available() else "cpu")))
        return 0

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return scaling(args, argv)
    distributed = "WORLD_SIZE" in os.environ
    if args.tiny and not distributed:
        device, dtype = torch.device("cpu"), torch.float32
        tables = []
        for compiled in (False, True):
            args.compile = compiled
            rows = run_stages(args, device, dtype)
            for r in rows:  # the official figures are for the full model on an H100: no ratio here
                r.official_ms = None
            quant_note = f", quant={args.quant}" if args.quant != "none" else ""
            tables.append(format_table(rows, f"CPU, tiny configs, {'compiled' if compiled else 'eager'}{quant_note}"))
        print("\n\n".join(tables))
        return 0

    if not args.tiny and not torch.cuda.is_available():
        p.error("no CUDA device: the full-size benchmark needs a GPU (use --tiny for the CPU smoke run)")
    sp, rank = None, 0
    if args.tiny:  # a torchrun child of `--tiny --nproc N`: CPU ranks talking over gloo
        device, dtype = torch.device("cpu"), torch.float32
        args.compile = False
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device, dtype = torch.device("cuda", torch.cuda.current_device()), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = False  # as upstream (PyTorch's default)
    if distributed:
        rank, world, _ = dit_lib.init_distributed(device)
        sp = dit_lib.SequenceParallel() if world > 1 else None
        # Only the DiT stages are split across ranks; the others would just repeat on every rank.
        args.stages = [s for s in args.stages if s in ("dit256", "sr540", "sr1080")]
    rows = run_stages(args, device, dtype, sp)
    if rank == 0:
        name = "CPU (tiny configs)" if args.tiny else torch.cuda.get_device_name(device)
        world = sp.world if sp is not None else 1
        print(format_table(rows, f"{name} x{world}, {str(dtype)[6:]}, compile={args.compile}, "
                                 f"offload={args.offload}, quant={args.quant}, {time.strftime('%Y-%m-%d')}"))
        if args.json_out:
            rows_json = [{"stage": r.stage, "ms": r.ms, "peak_gib": r.peak_gib} for r in rows]
            text = json.dumps({"device": name, "world": world, "rows": rows_json})
            load_weights.atomic_write(Path(args.json_out), lambda tmp: Path(tmp).write_text(text))
    if distributed:
        dit_lib.end_distributed()
    return 0


if __name__ == "__main__":
    # Bad flags, Ctrl-C, SIGTERM, out of memory: one line on stderr, exit status 2.
    raise SystemExit(load_weights.guarded(main))
