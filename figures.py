"""The README's figures, drawn from the project's own code with Pillow (no plotting library).

    python figures.py            # writes docs/*.png (a few seconds on a CPU, no weights needed)

Each figure calls the functions it illustrates (model.py's packing, mask and RoPE, sample.py's
schedules), so a change there shows up here when the script is run again. Figures:
- docs/packed_sequence.png: one request's token sequence [video | audio | text] and which expert
  weights each token meets in each of the 40 layers (the "sandwich");
- docs/local_attention.png: the attention mask of a local-attention layer;
- docs/rope_time.png: where the RoPE puts video, audio and text tokens on the time axis;
- docs/sigma_grids.png: the noise levels (σ) of the base, distilled and SR passes;
- docs/toy_world.png: the toy world of toy.py and what the untrained, trained and distilled toy
  DiTs make of one prompt (checkpoints/toy_*; about 10 s on a CPU).
New figures register in FIGURES at the bottom.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

import model
import sample
import sr

OUT = Path(__file__).resolve().parent / "docs"
# Modality colours used by every figure: video, audio, text (and the shared weights).
COLORS = {"video": (66, 133, 244), "audio": (234, 67, 53), "text": (52, 168, 83), "shared": (170, 170, 170)}
MODALITIES = ("video", "audio", "text")


def font(size: int = 14):
    return ImageFont.load_default(size=size)


def text(draw, xy, s, size=14, fill=(0, 0, 0), anchor="la"):
    draw.text(xy, s, fill=fill, font=font(size), anchor=anchor)


def one_request(width=64, height=64, seconds=1, text_tokens=10):
    """The token layout of a small request, sized by sample.py and packed by model.py."""
    lh, lw = sample.latent_size(width, height)
    frames = sample.num_frames_for(seconds)  # also the number of audio tokens
    T = sample.latent_length(frames)
    with torch.device("meta"):  # only the packing methods are used: no weights are allocated
        dit = model.DiT(model.dit_config("tiny"))
    layout = dit.layout((1, sample.Z_DIM, T, lh, lw), frames, [text_tokens])
    return layout, (T, lh, lw), frames


# ==================================================================================================
# 1. The packed sequence and the sandwich experts
# ==================================================================================================


def packed_sequence(path: Path) -> None:
    layout, (T, lh, lw), frames = one_request()
    cfg = model.DiTConfig()  # the released 40-layer layer lists
    kinds = [m for m, n in zip(MODALITIES, layout.sizes) for _ in range(n)]
    cell, left, top = 9, 90, 120
    W, H = left + cell * len(kinds) + 30, top + cell * cfg.num_layers + 90
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    text(d, (10, 10), f"One request, packed: 64x64 px, 1 s -> video {T}x{lh // 2}x{lw // 2} = {layout.num_video} "
                      f"tokens | audio {layout.num_audio} | text {layout.num_text}  (L = {layout.length})", 16)
    text(d, (10, 34), "Each row is a layer; colour = whose weights the token meets there (norms, qkv, proj, MLP).", 14)
    text(d, (10, 54), f"Layers {cfg.mm_layers[:4]} and {cfg.mm_layers[4:]} hold one expert per modality; "
                      f"the {cfg.num_layers - len(cfg.mm_layers)} middle layers share one.", 14)
    # The token strip, with the latent frame of each video token.
    frame = layout.frame_ids()
    for i, k in enumerate(kinds):
        x = left + i * cell
        d.rectangle([x, top - 28, x + cell - 2, top - 12], fill=COLORS[k])
        if k == "video" and i % layout.tokens_per_frame == 0:
            text(d, (x, top - 44), f"f{int(frame[i])}", 11)
    text(d, (left - 80, top - 28), "tokens", 13)
    for layer in range(cfg.num_layers):
        y = top + layer * cell
        mm = layer in cfg.mm_layers
        for i, k in enumerate(kinds):
            x = left + i * cell
            d.rectangle([x, y, x + cell - 2, y + cell - 2], fill=COLORS[k] if mm else COLORS["shared"])
        if layer % 4 == 0 or layer == cfg.num_layers - 1:
            text(d, (left - 10, y - 1), f"layer {layer}", 11, anchor="ra")
    y = top + cfg.num_layers * cell + 16
    for j, (name, c) in enumerate(list(COLORS.items())):
        d.rectangle([left + j * 150, y, left + j * 150 + 14, y + 14], fill=c)
        text(d, (left + j * 150 + 20, y), name + (" expert" if name != "shared" else " weights"), 13)
    img.save(path)


# ==================================================================================================
# 2. The mask of a local-attention layer
# ==================================================================================================


def local_attention(path: Path, receptive_field: int = 2) -> None:
    layout, (T, lh, lw), _ = one_request(width=64, height=64, seconds=2, text_tokens=8)
    mask = model.dense_attn_mask(layout, receptive_field)[0, 0]  # [L, L] True = attend
    L, px, left, top = layout.length, 5, 70, 76
    img = Image.new("RGB", (max(left + L * px + 190, 860), top + L * px + 40), "white")
    d = ImageDraw.Draw(img)
    text(d, (10, 10), f"Local attention (frame_receptive_field = {receptive_field}; the 1080p SR model uses "
                      f"{model.DiTConfig().frame_receptive_field})", 16)
    text(d, (10, 32), f"row = query, column = key; coloured = attends. A video token sees the video tokens of "
                      f"frames within ±{receptive_field}", 13)
    text(d, (10, 50), "and all audio and text tokens; audio and text tokens see everything.", 13)
    kinds = [m for m, n in zip(MODALITIES, layout.sizes) for _ in range(n)]
    for q in range(L):
        for k in range(L):
            if mask[q, k]:
                c = tuple(int(v * 0.75) for v in COLORS[kinds[q]])
                d.rectangle([left + k * px, top + q * px, left + k * px + px - 1, top + q * px + px - 1], fill=c)
    edges = [0, layout.num_video, layout.num_video + layout.num_audio, L]
    for e in edges:
        d.line([left + e * px, top, left + e * px, top + L * px], fill=(0, 0, 0))
        d.line([left, top + e * px, left + L * px, top + e * px], fill=(0, 0, 0))
    for name, lo, hi in zip(MODALITIES, edges[:-1], edges[1:]):
        text(d, (left - 6, top + (lo + hi) * px // 2), name, 12, anchor="rm")
        text(d, (left + L * px + 10, top + (lo + hi) * px // 2),
             f"{name}: {hi - lo} tokens" + (f" ({T} frames)" if name == "video" else ""), 12, anchor="lm")
    img.save(path)


# ==================================================================================================
# Pillow line charts (just enough for the two plots below)
# ==================================================================================================


class Chart:
    """A plot area with linear axes; `xy(x, y)` maps data to pixels."""

    def __init__(self, img, box, xlim, ylim, title, xlabel, ylabel):
        self.d, self.box, self.xlim, self.ylim = ImageDraw.Draw(img), box, xlim, ylim
        x0, y0, x1, y1 = box
        self.d.rectangle(box, outline=(0, 0, 0))
        text(self.d, (x0, y0 - 22), title, 14)
        text(self.d, ((x0 + x1) // 2, y1 + 30), xlabel, 12, anchor="ma")
        text(self.d, (x0 - 36, (y0 + y1) // 2), ylabel, 12, anchor="rm")

    def xy(self, x, y):
        x0, y0, x1, y1 = self.box
        fx = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
        fy = (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        return x0 + fx * (x1 - x0), y1 - fy * (y1 - y0)

    def ticks(self, xs, ys, fmt_x="{:g}", fmt_y="{:g}"):
        for x in xs:
            px, py = self.xy(x, self.ylim[0])
            self.d.line([px, py, px, py + 4], fill=(0, 0, 0))
            text(self.d, (px, py + 6), fmt_x.format(x), 11, anchor="ma")
        for y in ys:
            px, py = self.xy(self.xlim[0], y)
            self.d.line([px - 4, py, px, py], fill=(0, 0, 0))
            text(self.d, (px - 6, py), fmt_y.format(y), 11, anchor="rm")

    def hline(self, y, color=(150, 150, 150), label=None):
        (ax, ay), (bx, _) = self.xy(self.xlim[0], y), self.xy(self.xlim[1], y)
        for x in range(int(ax), int(bx), 8):  # dashed
            self.d.line([x, ay, min(x + 4, bx), ay], fill=color)
        if label:
            text(self.d, (ax + 6, ay - 3), label, 11, fill=color, anchor="ld")

    def series(self, xs, ys, color, r=3, line=True):
        pts = [self.xy(x, y) for x, y in zip(xs, ys)]
        if line and len(pts) > 1:
            self.d.line(pts, fill=color, width=2)
        for px, py in pts:
            self.d.ellipse([px - r, py - r, px + r, py + r], fill=color)


# ==================================================================================================
# 3. RoPE time coordinates
# ==================================================================================================


def rope_time(path: Path) -> None:
    layout, (T, lh, lw), frames = one_request(width=64, height=32, seconds=1, text_tokens=8)
    img = Image.new("RGB", (980, 660), "white")
    text(ImageDraw.Draw(img), (10, 10), "Where the RoPE puts each token on the time axis (64x32 px, 1 s: "
                                        f"{T} latent frames, {frames} audio tokens, {layout.num_text} text tokens)", 16)
    for row, (style, who) in enumerate((("v2", "base and distilled DiT"), ("v1", "SR DiT"))):
        coords = model.sequence_coords(T, lh // 2, lw // 2, frames, layout.num_text, style)
        t = model.rope_positions(coords)[:, 0]  # the time column RoPE rotates by
        c = Chart(img, (130, 70 + row * 300, 950, 300 + row * 300), (0, layout.length), (-0.5, T - 0.5),
                  f"coords_style {style!r} ({who})", "position in the packed sequence", "RoPE time")
        c.ticks(range(0, layout.length + 1, 20), range(0, T))
        edges = [0, layout.num_video, layout.num_video + layout.num_audio, layout.length]
        for name, lo, hi in zip(MODALITIES, edges[:-1], edges[1:]):
            c.series(range(lo, hi), t[lo:hi].tolist(), COLORS[name], r=2, line=False)
            px, _ = c.xy((lo + hi) / 2, T - 0.5)
            text(c.d, (px, 70 + row * 300 + 6), name, 12, fill=COLORS[name], anchor="ma")
    img.save(path)


# ==================================================================================================
# 4. The σ grids of the three passes
# ==================================================================================================


def sigma_grids(path: Path) -> None:
    base, distill_cfg, sr_cfg = sample.preset("base"), sample.preset("distill"), sample.preset("540p_sr")
    grids = [
        (f"base: {base.num_inference_steps} UniPC steps, CFG", base.num_inference_steps, COLORS["video"]),
        (f"distilled: {distill_cfg.num_inference_steps} step_ddim steps, no CFG", distill_cfg.num_inference_steps,
         COLORS["audio"]),
        (f"SR: {sr_cfg.sr_num_inference_steps} UniPC steps on the renoised upsampled latent",
         sr_cfg.sr_num_inference_steps, COLORS["text"]),
    ]
    img = Image.new("RGB", (900, 600), "white")
    c = Chart(img, (110, 60, 870, 470), (0, 1), (0, 1.02),
              f"sigma per step (shift {base.shift}): one curve, sampled at N points; the last step lands on sigma = 0",
              "step k / N", "sigma")
    c.ticks([0, 0.25, 0.5, 0.75, 1], [0, 0.25, 0.5, 0.75, 1])
    c.hline(sample.GUIDANCE_SWITCH_T / 1000, label="t = 500: base video CFG drops to 2.0 below")
    renoise = float(sr.zero_snr_table()[sr_cfg.noise_value])
    for j, (label, n, color) in enumerate(grids):
        _, sigmas = sample.flow_schedule(n, base.shift)
        c.series([k / n for k in range(n + 1)], sigmas.tolist(), color)
        c.d.rectangle([110, 530 + 18 * j, 122, 542 + 18 * j], fill=color)
        text(c.d, (128, 528 + 18 * j), label, 12)
    text(c.d, (540, 530), f"SR input: upsampled base latent x {renoise:.3f}", 12)
    text(c.d, (540, 546), f"+ noise x {(1 - renoise ** 2) ** 0.5:.3f} (ZeroSNR index {sr_cfg.noise_value}),", 12)
    text(c.d, (540, 562), "yet the SR schedule starts again at t = 999", 12)
    img.save(path)


# ==================================================================================================
# 5. The toy world: what the committed toy checkpoints make, against the world itself
# ==================================================================================================


def toy_world(path: Path, prompt: str = "a blue ball bounces with a high beep", seed: int = 2) -> None:
    """Rows: a clip of the world, then what an untrained DiT (random weights, the same shape), the
    trained base (CFG + UniPC) and the distilled student (8 steps) make for the same prompt and seed,
    through sample.toy_generate. Each row: every second frame of the first second, then the ball's
    row per frame over 2 s (toy.measure_frames) with the floor contacts (black dots) and the beep
    onsets (red ticks) that toy.measure finds."""
    import tempfile

    from safetensors.torch import save_file

    import toy

    here = Path(__file__).resolve().parent
    base, distilled = (here / sample.TOY_CHECKPOINTS[m] for m in ("base", "distill"))
    colour, pitch = (w for w in prompt.split() if w in toy.COLOURS or w in toy.PITCHES)
    _, frames, wave = toy.make_clip(7, 2.0, colour, pitch)
    rows = [("the world (clip seed 7)", frames, wave)]
    with tempfile.TemporaryDirectory() as untrained:
        cfg, norm, _ = toy.read_toy_json(base)
        save_file(model.random_dit(cfg).state_dict(), str(Path(untrained) / "model.safetensors"))
        toy.write_toy_json(untrained, cfg, norm)
        for label, folder, sampler in (("untrained DiT", untrained, "base"), ("toy_base (CFG, UniPC)", base, "base"),
                                       ("toy_distill (8 steps)", distilled, "distill")):
            frames, wave = sample.toy_generate(folder, prompt, 2, seed, sampler, progress=False)
            rows.append((label, frames, wave))
    k, strip = 2, 13  # every 2nd frame, 13 of them (~1 s)
    cell = toy.SIZE * k
    W, H = 160 + strip * cell + 460, 50 + len(rows) * (cell + 30)
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    text(d, (10, 10), f'"{prompt}", sampling seed {seed}: frames 0, 2, .., 24 (left); ball row per frame, '
                      "floor contacts and beep onsets over 2 s (right)", 14)
    for r, (label, frames, wave) in enumerate(rows):
        top = 40 + r * (cell + 30)
        text(d, (10, top + cell // 2), label, 12, anchor="lm")
        for j in range(strip):
            img.paste(Image.fromarray(frames[2 * j]).resize((cell, cell), Image.NEAREST), (160 + j * cell, top))
        m = toy.measure(frames, wave, toy.AUDIO_RATE, num_frames=len(frames))
        _, y = toy.measure_frames(frames)
        c = Chart(img, (160 + strip * cell + 30, top, W - 20, top + cell), (0, len(frames) - 1), (toy.SIZE, 0), "", "", "")
        c.hline(toy.FLOOR_ROW)
        seen = [(i, v) for i, v in enumerate(y.tolist()) if v == v]  # NaN: no ball in that frame
        c.series([i for i, _ in seen], [v for _, v in seen], COLORS["video"], r=1)
        c.series(m.contacts, [toy.FLOOR_ROW] * len(m.contacts), (0, 0, 0), r=4, line=False)
        for o in m.onsets:
            px, py = c.xy(o, 0)
            d.line([px, py, px, py + 12], fill=COLORS["audio"], width=3)
        text(d, (W - 20, top + cell + 3), f"{len(m.contacts)} contacts, {len(m.onsets)} beeps, {m.synced} in sync, "
             f"colour {m.colour}, pitch {m.pitch}", 11, anchor="ra")
    img.save(path)


FIGURES = {
    "packed_sequence.png": packed_sequence,
    "local_attention.png": local_attention,
    "rope_time.png": rope_time,
    "sigma_grids.png": sigma_grids,
    "toy_world.png": toy_world,
}


def main() -> int:
    OUT.mkdir(exist_ok=True)
    for name, draw in FIGURES.items():
        draw(OUT / name)
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
