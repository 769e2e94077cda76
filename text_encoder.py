"""T5-Gemma 9B (UL2) text encoder, its tokenizer, and the prompt processing of daVinci-MagiHuman.

daVinci-MagiHuman conditions its DiT on the last hidden state of the *encoder* half of
google/t5gemma-9b-9b-ul2. The official code gets it from `transformers` 4.56.0; this file is a plain
PyTorch re-implementation of exactly what that call computes. It mirrors:
- `inference/model/t5_gemma/t5_gemma_model.py` and `inference/pipeline/prompt_process.py` (official
  repo): how the encoder is called and how its output becomes the DiT's text context;
- transformers 4.56.0 `models/t5gemma/modeling_t5gemma.py` (T5GemmaEncoder and its layers) on its
  default "sdpa" attention path, plus `GemmaTokenizerFast`'s handling of BOS/EOS.

The encoder is a bidirectional Gemma-2 stack: embedding scaled by sqrt(hidden), then layers that
alternate a sliding-window layer (symmetric window |i-j| < W) and a full-attention layer, each with
GQA attention, half-split RoPE, a gelu-tanh gated MLP and four (1+w) RMSNorms (pre and post around
each sub-layer), then a final RMSNorm. Quirks of the reference kept on purpose:
- NO attention-logit softcap: transformers' SDPA path silently drops Gemma-2's tanh(s/50)*50;
- the embedding scale is sqrt(hidden) rounded to the compute dtype (bf16: 59.75, not 59.8665);
- the output goes bf16 -> fp16 -> fp32, and only the first 640 rows are kept *after* encoding.

This file knows no files: load_weights.py builds the encoder from the release (`load_text_encoder`),
reads the tokenizer's flags (`load_text_tokenizer`) and keeps the on-disk embedding cache.

Dimension letters used in shape comments:
  B batch, L tokens, D hidden_size, H query heads, K key/value heads, E head_dim, F intermediate_size.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# ==================================================================================================
# Config
# ==================================================================================================

SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class T5GemmaEncoderConfig:
    """The encoder sub-config of t5gemma-9b-9b-ul2 (`config.json["encoder"]`, same field names).

    Defaults are the released values (spec audio_text §3.1). Fields of config.json that do not change
    the encoder's forward (dropout, initializer_range, use_cache, ...) are not listed and are ignored.
    """

    vocab_size: int = 256000
    hidden_size: int = 3584
    intermediate_size: int = 14336
    num_hidden_layers: int = 42
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    head_dim: int = 256
    hidden_activation: str = "gelu_pytorch_tanh"
    max_position_embeddings: int = 8192  # informational: RoPE is computed for any length
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attention_bias: bool = False
    query_pre_attn_scalar: int = 256  # attention scale = 256**-0.5 = 1/16
    sliding_window: int = 4096
    layer_types: list | None = None  # None -> the default rule: even layers sliding, odd layers full
    attn_logit_softcapping: float | None = 50.0  # read but NOT applied: the reference SDPA path drops it
    final_logit_softcapping: float | None = 30.0  # LM head only, unused by the encoder
    pad_token_id: int = 0
    eos_token_id: int = 1
    bos_token_id: int = 2

    def __post_init__(self):
        if self.layer_types is None:
            # transformers' default rule: "sliding_attention" if (i + 1) % 2 else "full_attention"
            self.layer_types = [SLIDING if (i + 1) % 2 else FULL for i in range(self.num_hidden_layers)]
        self.layer_types = list(self.layer_types)
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise ValueError(f"unknown layer type(s) {bad}; expected {SLIDING!r} or {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even (half-split RoPE)")
        if self.hidden_activation != "gelu_pytorch_tanh":  # torch's gelu(approximate="tanh"), all we implement
            raise ValueError(f"hidden_activation {self.hidden_activation!r} is not supported (gelu_pytorch_tanh)")

    @classmethod
    def from_dict(cls, d: dict) -> "T5GemmaEncoderConfig":
        """From a config.json dict: the whole T5Gemma config (its "encoder" entry is used) or the sub-config."""
        if isinstance(d.get("encoder"), dict):
            d = d["encoder"]
        if d.get("rope_scaling") not in (None, {}):
            raise ValueError(f"rope_scaling {d['rope_scaling']!r} is not supported (the release uses none)")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def tiny(cls, **overrides) -> "T5GemmaEncoderConfig":
        """A few-kB random-weight config for tests and `--tiny-random` (hidden 48 = the tiny DiT's text width)."""
        base = dict(vocab_size=512, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                    sliding_window=8)
        return cls(**{**base, **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


# ==================================================================================================
# Building blocks: RMSNorm, RoPE, attention, MLP
# ==================================================================================================


class T5GemmaRMSNorm(nn.Module):
    """Gemma RMSNorm: computed in fp32, scaled by (1 + w), cast back to the input dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        # Stored as an offset from 1 (the release's init is zeros), hence the (1 + w) below.
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        # Multiply by (1 + w) in fp32 *before* casting back: the order the reference uses.
        return (y * (1.0 + self.weight.float())).type_as(x)


def rope_cos_sin(length: int, head_dim: int, theta: float, device, dtype):
    """RoPE tables (L, E) for positions 0..L-1, computed in fp32 then rounded to the compute dtype.

    Half-split (NeoX) layout: frequency j drives dims j and j + E/2, hence cat(freqs, freqs).
    """
    # Exponent is an int64 arange cast to fp32, divided by E, as the reference computes it.
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponent)  # (E/2,)
    pos = torch.arange(length, device=device, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq[None, :]  # (L, E/2)
    emb = torch.cat([freqs, freqs], dim=-1)  # (L, E)
    # The reference rounds cos/sin to the weights' dtype (bf16) before using them.
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(t, cos, sin):
    """t' = t*cos + rotate_half(t)*sin on (B, heads, L, E), in t's dtype."""
    half = t.shape[-1] // 2
    rotated = torch.cat([-t[..., half:], t[..., :half]], dim=-1)  # (B, heads, L, E)
    return t * cos + rotated * sin


def attention_masks(key_mask, window: int):
    """Boolean SDPA masks (B, 1, L, L), True = may attend, for both layer types.

    key_mask (B, L) bool marks real (non-padding) keys. Sliding layers also require |i - j| < window:
    the reference window is symmetric and bidirectional, and exclusive at distance `window`.
    """
    B, L = key_mask.shape
    keys = key_mask[:, None, None, :].expand(B, 1, L, L)  # (B, 1, L, L)
    idx = torch.arange(L, device=key_mask.device)
    band = (idx[:, None] - idx[None, :]).abs() < window  # (L, L)
    # Always an explicit tensor, even when all True: the reference passes one, which also fixes
    # which SDPA kernels may run on GPU (and so the low bits).
    return {FULL: keys, SLIDING: keys & band}


class T5GemmaSelfAttention(nn.Module):
    """Bidirectional GQA self-attention through SDPA (no softcap, see module docstring)."""

    def __init__(self, cfg: T5GemmaEncoderConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.scale = cfg.query_pre_attn_scalar ** -0.5  # not head_dim**-0.5 (equal in the release: 256)
        D, bias = cfg.hidden_size, cfg.attention_bias
        self.q_proj = nn.Linear(D, self.n_head * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(D, self.n_kv * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, D, bias=bias)

    def forward(self, x, cos, sin, mask):
        B, L, _ = x.shape
        H, K, E = self.n_head, self.n_kv, self.head_dim
        q = self.q_proj(x).view(B, L, H, E).transpose(1, 2)  # B L (H E) -> B H L E
        k = self.k_proj(x).view(B, L, K, E).transpose(1, 2)  # B L (K E) -> B K L E
        v = self.v_proj(x).view(B, L, K, E).transpose(1, 2)  # B L (K E) -> B K L E
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # GQA: query head i uses kv head i // (H/K). K/V are repeated *before* SDPA (not enable_gqa),
        # as the reference does, so the same SDPA kernels run.
        k = k[:, :, None].expand(B, K, H // K, L, E).reshape(B, H, L, E)  # B K L E -> B (K r) L E
        v = v[:, :, None].expand(B, K, H // K, L, E).reshape(B, H, L, E)  # B K L E -> B (K r) L E
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # (B, H, L, E)
        y = y.transpose(1, 2).reshape(B, L, H * E)  # B H L E -> B L (H E)
        return self.o_proj(y)


class T5GemmaMLP(nn.Module):
    """Gated MLP: down(gelu_tanh(gate(x)) * up(x)), all in the compute dtype."""

    def __init__(self, cfg: T5GemmaEncoderConfig):
        super().__init__()
        D, Fi = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(D, Fi, bias=False)
        self.up_proj = nn.Linear(D, Fi, bias=False)
        self.down_proj = nn.Linear(Fi, D, bias=False)

    def forward(self, x):
        return self.down_proj(F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x))


# ==================================================================================================
# Encoder
# ==================================================================================================


class T5GemmaEncoderLayer(nn.Module):
    """x += post_norm(attn(pre_norm(x))); x += post_norm(mlp(pre_norm(x))): Gemma-2's sandwich norms."""

    def __init__(self, cfg: T5GemmaEncoderConfig, layer_type: str):
        super().__init__()
        self.layer_type = layer_type  # which mask this layer uses (sliding or full)
        D, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.pre_self_attn_layernorm = T5GemmaRMSNorm(D, eps)
        self.self_attn = T5GemmaSelfAttention(cfg)
        self.post_self_attn_layernorm = T5GemmaRMSNorm(D, eps)
        self.pre_feedforward_layernorm = T5GemmaRMSNorm(D, eps)
        self.mlp = T5GemmaMLP(cfg)
        self.post_feedforward_layernorm = T5GemmaRMSNorm(D, eps)

    def forward(self, x, cos, sin, masks):
        # The post-norms act on the sub-layer output *before* the residual add.
        x = x + self.post_self_attn_layernorm(self.self_attn(self.pre_self_attn_layernorm(x), cos, sin,
                                                             masks[self.layer_type]))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x


class T5GemmaEncoder(nn.Module):
    """The encoder half of T5-Gemma; attribute names are the release's keys after `model.encoder.`.

    Runs in the dtype of its weights (bf16 as released, float32 for exact checks; on a GPU a float32
    run also needs TF32 matmuls off, PyTorch's default).
    """

    def __init__(self, cfg: T5GemmaEncoderConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList(T5GemmaEncoderLayer(cfg, t) for t in cfg.layer_types)
        self.norm = T5GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, attention_mask=None):
        """input_ids (B, L) int -> last_hidden_state (B, L, D) in the weights' dtype.

        attention_mask (B, L), 1 = real token, 0 = padding (keys only; all ones for daVinci's prompts).
        """
        cfg = self.config
        if input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be (batch, tokens) with at least one token, got {tuple(input_ids.shape)}")
        B, L = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.bool, device=input_ids.device)
        x = self.embed_tokens(input_ids)  # (B, L, D)
        # sqrt(D) is rounded to the compute dtype first (bf16(sqrt(3584)) = 59.75) and the multiply
        # happens in that dtype, exactly as the reference does.
        x = x * torch.tensor(cfg.hidden_size ** 0.5, dtype=x.dtype, device=x.device)
        cos, sin = rope_cos_sin(L, cfg.head_dim, cfg.rope_theta, x.device, x.dtype)  # (L, E) each
        masks = attention_masks(attention_mask.to(device=x.device, dtype=torch.bool), cfg.sliding_window)
        for layer in self.layers:
            x = layer(x, cos, sin, masks)
        # No final softcap and no projection: last_hidden_state is the final norm's output.
        return self.norm(x)


# ==================================================================================================
# Tokenizer
# ==================================================================================================


class GemmaTokenizer:
    """The release's tokenizer.json run by the `tokenizers` package, special tokens added by hand.

    transformers' GemmaTokenizerFast *replaces* tokenizer.json's post-processor by a template built
    from add_bos_token (default True) and add_eos_token (default False), so the ids are
    [<bos>] + BPE(text), no <eos>. We encode without special tokens and add them ourselves, never
    trusting the file's template. Padding and truncation are switched off: the whole prompt is encoded.
    """

    def __init__(self, tokenizer, add_bos: bool = True, add_eos: bool = False):
        from tokenizers import Tokenizer

        if isinstance(tokenizer, (str, Path)):
            path = Path(tokenizer)
            if not path.is_file():
                raise ValueError(f"{path}: tokenizer file not found")
            try:
                tok = Tokenizer.from_file(str(path))
            except Exception as e:
                raise ValueError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0]})") from None
        elif isinstance(tokenizer, Tokenizer):
            tok = Tokenizer.from_str(tokenizer.to_str())  # private copy: we change its settings below
        else:
            raise TypeError(f"expected a tokenizers.Tokenizer or a path, got {type(tokenizer).__name__}")
        # GemmaTokenizerFast disables both for a default call; a raw tokenizer.json may enable them.
        tok.no_truncation()
        tok.no_padding()
        self.tok, self.add_bos, self.add_eos = tok, add_bos, add_eos
        self.bos_id, self.eos_id = self._special("<bos>"), self._special("<eos>")

    def _special(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise ValueError(f"tokenizer has no {token} token")
        return i

    def encode(self, text: str) -> list[int]:
        """Token ids of one prompt: [<bos>] + BPE(text) (+ [<eos>] only if add_eos)."""
        if not isinstance(text, str):
            raise ValueError(f"prompt must be a string, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("prompt is empty: give a text prompt to condition on")
        ids = self.tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * self.add_bos + ids + [self.eos_id] * self.add_eos


def tiny_tokenizer():
    """A small in-memory Gemma-like tokenizer (`tokenizers.Tokenizer`) for tests and `--tiny-random`.

    Ids 0..3 are <pad>, <eos>, <bos>, <unk> (as in Gemma), then the 256 byte-fallback tokens
    <0x00>..<0xFF>, then "▁" (space) and printable ASCII: 355 ids, fits a vocab of 512. No merges,
    so each ASCII character is one token and anything else falls back to its UTF-8 bytes.
    """
    from tokenizers import Tokenizer, models, normalizers

    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>"])}
    vocab.update({f"<0x{b:02X}>": 4 + b for b in range(256)})
    for ch in ["▁"] + [chr(c) for c in range(33, 127)]:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")  # Gemma's SentencePiece-style space marker
    tok.add_special_tokens(["<pad>", "<eos>", "<bos>", "<unk>"])
    return tok


# ==================================================================================================
# Prompt processing (prompt_process.py)
# ==================================================================================================

TEXT_MAX_LEN = 640  # EvaluationConfig.t5_gemma_target_length: the DiT sees at most 640 text rows

# The fixed negative prompt of `inference/pipeline/video_generate.py` (1719 characters, no trailing
# newline), assembled from the same three parts as upstream: visual, audio and speech defects.
NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
    "messy background, three legs, many people in the background, walking backwards"
) + (
    ", low quality, worst quality, poor quality, noise, background noise, hiss, hum, buzz, crackle, static, "
    "compression artifacts, MP3 artifacts, digital clipping, distortion, muffled, muddy, unclear, echo, reverb, "
    "room echo, over-reverberated, hollow sound, distant, washed out, harsh, shrill, piercing, grating, tinny, "
    "thin sound, boomy, bass-heavy, flat EQ, over-compressed, abrupt cut, jarring transition, sudden silence, "
    "looping artifact, music, instrumental, sirens, alarms, crowd noise, unrelated sound effects, chaotic, "
    "disorganized, messy, cheap sound"
) + (
    ", emotionless, flat delivery, deadpan, lifeless, apathetic, robotic, mechanical, monotone, flat intonation, "
    "undynamic, boring, reading from a script, AI voice, synthetic, text-to-speech, TTS, insincere, fake emotion, "
    "exaggerated, overly dramatic, melodramatic, cheesy, cringey, hesitant, unconfident, tired, weak voice, "
    "stuttering, stammering, mumbling, slurred speech, mispronounced, bad articulation, lisp, vocal fry, "
    "creaky voice, mouth clicks, lip smacks, wet mouth sounds, heavy breathing, audible inhales, plosives, "
    "p-pops, coughing, clearing throat, sneezing, speaking too fast, rushed, speaking too slow, dragged out, "
    "unnatural pauses, awkward silence, choppy, disjointed, multiple speakers, two voices, background talking, "
    "out of tune, off-key, autotune artifacts"
)
NEGATIVE_PROMPT_SHA256 = "4515a21f8d125d12e5a42b23e65bb09f46ea9817567f1834ad556e8cd1852c4b"


def encode_prompt(encoder: T5GemmaEncoder, tokenizer: GemmaTokenizer, prompt: str, max_len: int = TEXT_MAX_LEN):
    """One prompt -> (features (1, n, D) float32 on the encoder's device, n), n = min(tokens, max_len).

    The official pipeline pads to 640 rows with zeros and passes n along so the padding never
    reaches the DiT; we return the n real rows only.
    """
    ids = tokenizer.encode(prompt)  # refuses an empty prompt with a clear error
    device = encoder.embed_tokens.weight.device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)  # (1, L)
    with torch.no_grad():
        # Encode the WHOLE prompt: attention is bidirectional, so cutting tokens first would change
        # every output row (a real bug in a third-party port).
        hidden = encoder(input_ids)  # (1, L, D) in the encoder's dtype (bf16 in the release)
        # Official quirk kept: bf16 -> fp16 round trip (fp16 subnormals/overflow included) -> fp32.
        hidden = hidden.half()
        if hidden.shape[1] > max_len:
            warnings.warn(f"prompt is {hidden.shape[1]} tokens; the DiT only sees the first {max_len} "
                          f"(the whole prompt was encoded, the rest of the rows are dropped)", stacklevel=2)
            hidden = hidden[:, :max_len]  # (1, max_len, D)
        features = hidden.float()  # (1, n, D)
    return features, features.shape[1]

