"""The toy world: bouncing coloured balls that beep, an exact codec in place of the VAEs, a word
table in place of T5-Gemma, and the checker that measures whether a written mp4 obeys the world.

It mirrors no official file (the release has no training code and no toy); it exists so that the
real `model.DiT`, the real packing, RoPE and A/V alignment, the real samplers of sample.py and the
real DMD-2 of distill.py can be trained, sampled and checked on a laptop CPU in minutes.
train.py trains on it, distill.py distills on it (`--toy`), sample.py samples it (`--toy`).

The world (exact, so anyone can check a sample):
- A clip of `seconds` s at 25 fps of 32x32 RGB frames: black background, one ball of radius 4 px
  in one of four colours at a fixed column x0 in [8, 24], bouncing: centre row
  y(t) = 27 - 18 |sin(pi (t - phi) / P)|, period P in [0.5, 1.0] s, phase phi in [0, P); row 0 is
  the top, the ball touches the floor at t = phi + kP.
- Sound: mono, at each floor contact a tone burst 0.8 sin(2 pi f t') exp(-t'/0.03), 0 <= t' < 0.12 s,
  f = 200 Hz ("low") or 500 Hz ("high").
- Prompt: "a {red|green|blue|yellow} ball bounces with a {low|high} beep".

The codec (exactly invertible, the real latent layout):
- video [3, 4(T-1)+1, 32, 32] in [0, 1] -> latent [48, T, 16, 16]. Latent frame 0 holds pixel frame 0
  alone (repeated 4x, like Wan's causal first frame), latent frame i >= 1 holds pixel frames
  4i-3 .. 4i. Channel = colour * 16 + frame-in-group * 4 + (dy * 2 + dx) (2x2 space-to-depth).
- audio at 1600 Hz, 64 samples per latent (40 ms = one video frame at 25 fps) -> [N, 64].
- Then each modality is normalised with one (mean, std) pair measured over the world
  (`measure_normalisation`), stored in the checkpoint's toy.json.

The text encoder: a frozen word-embedding table (one random N(0, 1) row per vocabulary word, fixed
seed) at the DiT's text width. We chose it over a random tiny T5-Gemma because the prompts come
from a 12-word grammar: a table shows the DiT exactly one token per word, keeps the features
independent of any tokenizer, and makes "a word the model never saw" a clear error rather than
silent garbage. The empty / negative prompt (for CFG) is the single row `<null>`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

FPS = 25
SIZE = 32  # frame width and height in pixels
RADIUS = 4
COLOURS = {"red": (230, 40, 40), "green": (40, 200, 40), "blue": (50, 80, 240), "yellow": (230, 210, 40)}
PITCHES = {"low": 200.0, "high": 500.0}
AUDIO_RATE = 1600  # Hz
AUDIO_PER_LATENT = 64  # samples per audio latent: 40 ms, one video frame
BEEP_SECONDS = 0.12
BEEP_DECAY = 0.03
FLOOR_ROW, BOUNCE_HEIGHT = 27.0, 18.0

VOCAB = ["<null>", "a", "ball", "bounces", "with", "beep", *COLOURS, *PITCHES]
TEXT_SEED = 20260321


def prompt_for(colour: str, pitch: str) -> str:
    return f"a {colour} ball bounces with a {pitch} beep"


ALL_PROMPTS = [prompt_for(c, p) for c in COLOURS for p in PITCHES]


# ==================================================================================================
# The world: a clip from a seed
# ==================================================================================================


@dataclass
class ClipParams:
    colour: str
    pitch: str
    x0: float  # column of the centre, pixels
    period: float  # s
    phase: float  # s, in [0, period)

    @property
    def prompt(self) -> str:
        return prompt_for(self.colour, self.pitch)

    def contacts(self, duration: float) -> np.ndarray:
        """Floor-contact times phi + kP in [0, duration)."""
        return np.arange(self.phase, duration, self.period)


def draw_params(seed: int, colour: str | None = None, pitch: str | None = None) -> ClipParams:
    """The clip parameters of `seed` (numpy PCG64): colour, pitch, x0 ~ U[8, 24], P ~ U[0.5, 1], phi ~ U[0, P)."""
    rng = np.random.default_rng(int(seed))
    c = list(COLOURS)[rng.integers(4)]
    p = list(PITCHES)[rng.integers(2)]
    x0 = rng.uniform(8, 24)
    period = rng.uniform(0.5, 1.0)
    phase = rng.uniform(0, period)
    return ClipParams(colour or c, pitch or p, x0, period, phase)


def num_latents(seconds: float) -> tuple[int, int]:
    """(latent video frames T, audio latents N) of a clip, sized like sample.py: N = 25 s + 1
    (one per video frame), T = (N - 1) // 4 + 1; the video has 4(T - 1) + 1 pixel frames."""
    n = int(round(seconds * FPS)) + 1
    return (n - 1) // 4 + 1, n


def render_video(p: ClipParams, num_frames: int) -> np.ndarray:
    """uint8 [F, 32, 32, 3]: the ball (a disc of radius 4, hard edge) on black, frame n at t = n/25."""
    t = np.arange(num_frames) / FPS
    y = FLOOR_ROW - BOUNCE_HEIGHT * np.abs(np.sin(np.pi * (t - p.phase) / p.period))  # [F]
    rows = np.arange(SIZE)[None, :, None]
    cols = np.arange(SIZE)[None, None, :]
    inside = (rows - y[:, None, None]) ** 2 + (cols - p.x0) ** 2 <= RADIUS**2  # [F, 32, 32]
    frames = np.zeros((num_frames, SIZE, SIZE, 3), np.uint8)
    frames[inside] = COLOURS[p.colour]
    return frames


def render_audio(p: ClipParams, num_samples: int) -> np.ndarray:
    """float32 [S] at 1600 Hz: a decaying tone burst at every floor contact."""
    t = np.arange(num_samples) / AUDIO_RATE
    wave = np.zeros(num_samples)
    f = PITCHES[p.pitch]
    for c in p.contacts(num_samples / AUDIO_RATE):
        tp = t - c
        on = (tp >= 0) & (tp < BEEP_SECONDS)
        wave[on] += 0.8 * np.sin(2 * np.pi * f * tp[on]) * np.exp(-tp[on] / BEEP_DECAY)
    return wave.astype(np.float32)


def make_clip(seed: int, seconds: float = 2.0, colour=None, pitch=None):
    """(params, frames uint8 [4(T-1)+1, 32, 32, 3], audio float32 [64 N] at 1600 Hz) of `seed`."""
    p = draw_params(seed, colour, pitch)
    T, N = num_latents(seconds)
    return p, render_video(p, 4 * (T - 1) + 1), render_audio(p, N * AUDIO_PER_LATENT)


# ==================================================================================================
# The codec: exact space-to-depth / reshape, then a per-modality affine normalisation
# ==================================================================================================


def encode_video(frames: torch.Tensor) -> torch.Tensor:
    """[B, 3, 4(T-1)+1, 32, 32] float -> [B, 48, T, 16, 16] (a permutation of values, exact)."""
    B, C, F, H, W = frames.shape
    if (F - 1) % 4 or C != 3:
        raise ValueError(f"toy codec wants [B, 3, 4(T-1)+1, H, W] frames, got {tuple(frames.shape)}")
    first = frames[:, :, :1].expand(B, C, 4, H, W)  # frame 0 alone, repeated to fill a group
    x = torch.cat([first, frames[:, :, 1:]], dim=2)  # [B, 3, 4T, H, W]
    T = x.shape[2] // 4
    x = x.reshape(B, C, T, 4, H // 2, 2, W // 2, 2)  # b c T f h dy w dx
    x = x.permute(0, 1, 3, 5, 7, 2, 4, 6)  # b c f dy dx T h w
    return x.reshape(B, C * 16, T, H // 2, W // 2)


def decode_video(latent: torch.Tensor) -> torch.Tensor:
    """[B, 48, T, 16, 16] -> [B, 3, 4(T-1)+1, 32, 32]; frame 0 = the mean of its 4 copies (exact on
    encoded clips, where they are equal; a fair estimate on generated ones)."""
    B, _, T, h, w = latent.shape
    x = latent.reshape(B, 3, 4, 2, 2, T, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)  # b c T f h dy w dx
    x = x.reshape(B, 3, 4 * T, 2 * h, 2 * w)
    first = x[:, :, :4].mean(dim=2, keepdim=True)
    return torch.cat([first, x[:, :, 4:]], dim=2)


def encode_audio(wave: torch.Tensor) -> torch.Tensor:
    """[B, 64 N] at 1600 Hz -> [B, N, 64]."""
    B, S = wave.shape
    if S % AUDIO_PER_LATENT:
        raise ValueError(f"audio length {S} is not a multiple of {AUDIO_PER_LATENT}")
    return wave.reshape(B, S // AUDIO_PER_LATENT, AUDIO_PER_LATENT)


def decode_audio(latent: torch.Tensor) -> torch.Tensor:
    return latent.reshape(latent.shape[0], -1)


@dataclass
class Normalisation:
    """latent = (codec(x) - mean) / std, one pair per modality (video pixels in [0, 1], audio in [-1, 1])."""

    video_mean: float
    video_std: float
    audio_mean: float
    audio_std: float


def measure_normalisation(num_clips: int = 256, seconds: float = 2.0) -> Normalisation:
    """Mean and std of each modality over the clips of seeds 0..num_clips-1 (float64 sums)."""
    v = [make_clip(s, seconds) for s in range(num_clips)]
    video = np.stack([f for _, f, _ in v]).astype(np.float64) / 255.0
    audio = np.stack([a for _, _, a in v]).astype(np.float64)
    return Normalisation(float(video.mean()), float(video.std()), float(audio.mean()), float(audio.std()))


class Codec:
    """The toy 'VAEs': clips <-> normalised latents."""

    def __init__(self, norm: Normalisation):
        self.norm = norm

    def encode(self, frames: np.ndarray, audio: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """frames uint8 [B, F, 32, 32, 3], audio float32 [B, S] -> (video [B, 48, T, 16, 16], audio [B, N, 64])."""
        n = self.norm
        x = torch.from_numpy(np.ascontiguousarray(frames)).float().div(255).permute(0, 4, 1, 2, 3)  # B 3 F H W
        video = (encode_video(x) - n.video_mean) / n.video_std
        audio = (encode_audio(torch.from_numpy(np.ascontiguousarray(audio)).float()) - n.audio_mean) / n.audio_std
        return video, audio

    def encode_seeds(self, seeds, seconds: float) -> tuple[torch.Tensor, torch.Tensor, list]:
        """The clips of `seeds` -> (video [B, 48, T, 16, 16], audio [B, N, 64], their prompts)."""
        clips = [make_clip(s, seconds) for s in seeds]
        video, audio = self.encode(np.stack([f for _, f, _ in clips]), np.stack([a for _, _, a in clips]))
        return video, audio, [p.prompt for p, _, _ in clips]

    def decode(self, video: torch.Tensor, audio: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """-> (frames uint8 [B, F, 32, 32, 3] rounded and clamped, audio float32 [B, S] at 1600 Hz)."""
        n = self.norm
        x = decode_video(video.float() * n.video_std + n.video_mean)  # B 3 F H W in ~[0, 1]
        frames = (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).cpu().numpy()
        wave = decode_audio(audio.float() * n.audio_std + n.audio_mean).cpu().numpy()
        return frames, wave


# ==================================================================================================
# The text encoder: a frozen word-embedding table
# ==================================================================================================


class VocabError(ValueError):
    """A prompt word the toy has no embedding for."""


class WordTable:
    """One fixed N(0, 1) row per vocabulary word (seed TEXT_SEED), at width `dim`."""

    def __init__(self, dim: int, seed: int = TEXT_SEED):
        g = torch.Generator().manual_seed(seed)
        self.table = torch.randn(len(VOCAB), dim, generator=g)  # [V, C]
        self.index = {w: i for i, w in enumerate(VOCAB)}

    def words(self, prompt: str) -> list[str]:
        words = [w.strip(".,!;:\"'") for w in prompt.lower().split()]
        words = [w for w in words if w]
        unknown = [w for w in words if w not in self.index or w == "<null>"]
        if unknown:
            known = " ".join(v for v in VOCAB if v != "<null>")
            raise VocabError(f"the toy model does not know the word(s) {', '.join(repr(w) for w in unknown)}; "
                             f"its vocabulary is: {known} (e.g. \"{ALL_PROMPTS[0]}\")")
        if not words:
            raise VocabError("the prompt is empty")
        return words

    def encode(self, prompt: str) -> torch.Tensor:
        """Prompt -> features [n_words, C]."""
        return self.table[[self.index[w] for w in self.words(prompt)]].clone()

    def null(self) -> torch.Tensor:
        """The empty / negative prompt: [1, C]."""
        return self.table[[0]].clone()


# ==================================================================================================
# The toy model description stored beside a checkpoint (toy.json)
# ==================================================================================================

TOY_JSON = "toy.json"


def toy_dit_config(**overrides):
    """The toy DiT: the released architecture (sandwich experts, gating, GQA, RoPE), shrunk."""
    from model import DiTConfig

    base = dict(num_layers=4, hidden_size=256, head_dim=64, num_query_groups=2, text_in_channels=64,
                mm_layers=[0, 3], gelu7_layers=[0])
    base.update(overrides)
    return DiTConfig(**base)


def write_toy_json(folder, dit_cfg, norm: Normalisation, extra: dict | None = None) -> None:
    info = {"dit": asdict(dit_cfg), "normalisation": asdict(norm), "vocab": VOCAB, "text_seed": TEXT_SEED,
            **(extra or {})}
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / TOY_JSON).write_text(json.dumps(info, indent=1))


def read_toy_json(folder):
    """(DiTConfig, Normalisation, WordTable) of a toy checkpoint folder."""
    from model import DiTConfig

    path = Path(folder) / TOY_JSON
    if not path.is_file():
        raise ValueError(f"{folder}: not a toy checkpoint (no {TOY_JSON})")
    info = json.loads(path.read_text())
    if info.get("vocab") != VOCAB:
        raise ValueError(f"{path}: the vocabulary differs from this toy.py's")
    cfg = DiTConfig(**info["dit"])
    return cfg, Normalisation(**info["normalisation"]), WordTable(cfg.text_in_channels, info["text_seed"])


# ==================================================================================================
# The checker: measure a written mp4 against the world's definition
# ==================================================================================================


def read_mp4(path) -> tuple[np.ndarray, np.ndarray, int]:
    """(frames uint8 [F, H, W, 3], mono float32 audio [S], audio rate) of an mp4, with PyAV."""
    import av

    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    with av.open(str(path)) as c:
        rate = c.streams.audio[0].rate
        chunks = [f.to_ndarray() for f in c.decode(audio=0)]  # [channels, n] planar float
    audio = np.concatenate(chunks, axis=1).mean(axis=0) if chunks else np.zeros(0, np.float32)
    return np.stack(frames), audio.astype(np.float32), rate


@dataclass
class Measurement:
    colour: str | None  # nearest world colour of the bright pixels (None: no ball seen)
    pitch: str | None  # nearest world pitch of the FFT peak (None: silence)
    contacts: list  # frames where the ball touches the floor
    onsets: list  # frames (40 ms windows) where a beep starts
    synced: int  # onsets within +-2 frames of a contact

    @property
    def count_ok(self) -> bool:
        # Every clip of the world has >= 2 contacts in 2 s (P <= 1 s), so "no ball reaches the floor
        # and at most one beep" must not count as a match.
        return len(self.contacts) > 0 and abs(len(self.onsets) - len(self.contacts)) <= 1


def measure_frames(frames: np.ndarray) -> tuple[str | None, np.ndarray]:
    """Colour of the ball and its centroid row per frame (NaN where no bright pixel) in 32x32 units.

    Frames of any multiple of 32 px are box-averaged down to 32x32 first. A pixel is "bright" when
    its largest channel exceeds 100 (the background is 0, every ball colour has a channel >= 200).
    """
    F, H, W, _ = frames.shape
    k = H // SIZE
    small = frames.astype(np.float64).reshape(F, SIZE, k, SIZE, k, 3).mean(axis=(2, 4))  # [F, 32, 32, 3]
    bright = small.max(axis=-1) > 100  # [F, 32, 32]
    rows = np.arange(SIZE)[None, :, None]
    count = bright.sum(axis=(1, 2))
    y = np.where(count > 0, (bright * rows).sum(axis=(1, 2)) / np.maximum(count, 1), np.nan)
    if count.sum() == 0:
        return None, y
    mean_rgb = small[bright].mean(axis=0)
    colour = min(COLOURS, key=lambda c: np.sum((mean_rgb - np.array(COLOURS[c])) ** 2))
    return colour, y


def floor_contacts(y: np.ndarray, min_row: float = 23.0) -> list:
    """Frames of floor contact: local maxima of the centroid row that are low enough (row >= 23),
    a plateau counting once and maxima closer than 5 frames merged (P >= 0.5 s = 12.5 frames)."""
    yy = np.where(np.isnan(y), -1.0, y)
    found = []
    for i in range(len(yy)):
        left = yy[i - 1] if i > 0 else -np.inf
        right = yy[i + 1] if i + 1 < len(yy) else -np.inf
        if yy[i] >= min_row and yy[i] >= left and yy[i] >= right:
            if found and i - found[-1] < 5:
                if yy[i] > yy[found[-1]]:
                    found[-1] = i
                continue
            found.append(i)
    return found


def beep_onsets(audio: np.ndarray, rate: int, threshold: float = 0.08) -> tuple[list, np.ndarray]:
    """Onset frames from the RMS envelope per 40 ms window: a window whose RMS exceeds `threshold`
    (a beep's first window has RMS ~0.3-0.5, silence ~0) after one below it; onsets closer than
    5 windows merged. Returns (onsets, envelope)."""
    win = int(round(rate / FPS))
    n = len(audio) // win
    env = np.sqrt((audio[: n * win].reshape(n, win).astype(np.float64) ** 2).mean(axis=1))
    loud = env > threshold
    onsets = []
    for i in range(n):
        if loud[i] and (i == 0 or not loud[i - 1]):
            if onsets and i - onsets[-1] < 5:
                continue
            onsets.append(i)
    return onsets, env


def dominant_pitch(audio: np.ndarray, rate: int) -> str | None:
    """The world pitch nearest to the FFT magnitude peak between 100 and 800 Hz (None if silent)."""
    if np.sqrt(np.mean(audio.astype(np.float64) ** 2)) < 1e-3:
        return None
    spec = np.abs(np.fft.rfft(audio.astype(np.float64)))
    freqs = np.fft.rfftfreq(len(audio), 1 / rate)
    band = (freqs >= 100) & (freqs <= 800)
    peak = freqs[band][np.argmax(spec[band])]
    return min(PITCHES, key=lambda p: abs(PITCHES[p] - peak))


def measure(frames: np.ndarray, audio: np.ndarray, rate: int, num_frames: int | None = None) -> Measurement:
    """Measure one clip. `num_frames`: only the first frames count (the mp4 repeats the last
    decoded frame to the audio's length); beeps starting after them are ignored too."""
    if num_frames is not None:
        frames = frames[:num_frames]
    colour, y = measure_frames(frames)
    contacts = floor_contacts(y)
    onsets, _ = beep_onsets(audio, rate)
    onsets = [o for o in onsets if o < len(frames)]
    synced = sum(any(abs(o - c) <= 2 for c in contacts) for o in onsets)
    return Measurement(colour, dominant_pitch(audio, rate), contacts, onsets, synced)


def measure_mp4(path, seconds: float) -> Measurement:
    frames, audio, rate = read_mp4(path)
    T, _ = num_latents(seconds)
    return measure(frames, audio, rate, num_frames=4 * (T - 1) + 1)


# The thresholds of "learned" (issue 14), over a set of clips.
THRESHOLDS = {"colour": 0.9, "pitch": 0.9, "sync": 0.75, "count": 0.75}


def score(results: list[tuple[str, Measurement]]) -> dict:
    """[(prompt, measurement)] -> fractions: colour right, pitch right, onsets synced (over all
    onsets), beep count = contact count +- 1 (over clips)."""
    n = len(results)
    colour = sum(m.colour is not None and m.colour in p.split() for p, m in results) / n
    pitch = sum(m.pitch is not None and f"{m.pitch} beep" in p for p, m in results) / n
    onsets = sum(len(m.onsets) for _, m in results)
    sync = sum(m.synced for _, m in results) / onsets if onsets else 0.0
    count = sum(m.count_ok for _, m in results) / n
    return {"colour": colour, "pitch": pitch, "sync": sync, "count": count, "clips": n, "onsets": onsets}


def passes(s: dict) -> bool:
    return all(s[k] >= v for k, v in THRESHOLDS.items())


def upsample_frames(frames: np.ndarray, factor: int = 8) -> np.ndarray:
    """Nearest-neighbour upscaling [F, H, W, 3] -> [F, 8H, 8W, 3]."""
    return frames.repeat(factor, axis=1).repeat(factor, axis=2)


def audio_to_44k(wave: np.ndarray) -> np.ndarray:
    """float32 [S] at 1600 Hz -> stereo float32 [S * 441/16, 2] at 44.1 kHz (polyphase resampling)."""
    from scipy.signal import resample_poly

    up = resample_poly(wave.astype(np.float64), 441, 16).astype(np.float32)  # 44100 / 1600 = 441 / 16
    return np.stack([up, up], axis=1)


def describe(s: dict) -> str:
    return (f"colour {s['colour']:.0%}  pitch {s['pitch']:.0%}  sync {s['sync']:.0%} of {s['onsets']} onsets  "
            f"count±1 {s['count']:.0%}  ({s['clips']} clips)")


