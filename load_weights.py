"""Every released checkpoint format -> state dicts -> our modules, strictly.

Mirrors the loading code of the official repository (GAIR-NLP/daVinci-MagiHuman):
`inference/infra/checkpoint/load_model_checkpoint.py` and `inference/model/dit/dit_model.py` for the
DiT; the VAE and text-encoder loaders are in their own sections below.

Unlike the official loader (which calls `load_state_dict(strict=False)` and carries on), every load
here is strict: a missing, unexpected or mis-shaped key stops with one message that names the key(s)
and the file. A partially loaded 15B model still produces plausible-looking video, so silence would
be the worst failure mode.

Models are built on the `meta` device and loaded with `assign=True`, so a 15B model never exists
twice in host memory and no time is spent on a random initialisation that is thrown away.
Pickled files are only ever read with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

# ==================================================================================================
# Shared pieces: errors, file readers, the strict loader
# ==================================================================================================


class CheckpointError(ValueError):
    """A checkpoint that does not match the module it is loaded into (the message says how)."""


def _short_list(keys, n: int = 6) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def read_safetensors(path: str | os.PathLike, keys=None) -> dict[str, torch.Tensor]:
    """Read a .safetensors file (or only `keys` of it) into CPU tensors."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            names = list(f.keys()) if keys is None else list(keys)
            missing = set(names) - set(f.keys())
            if missing:
                raise CheckpointError(f"{path}: missing key(s) listed in the index: {_short_list(missing)}")
            return {k: f.get_tensor(k) for k in names}
    except CheckpointError:
        raise
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def read_safetensors_bytes(data: bytes, source: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    try:
        return load(data)
    except Exception as e:
        raise CheckpointError(f"{source}: not a readable safetensors payload ({e})") from None


def read_torch(path: str | os.PathLike) -> dict:
    """`torch.load` with `weights_only=True`: tensors, dicts, lists and numbers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        # Old-style (non-zipfile) pickles cannot be memory-mapped; retry without mmap.
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path}: refused to load ({_first_line(e)})") from None
    except Exception as e:  # pickle.UnpicklingError for anything that is not plain tensors/containers
        raise CheckpointError(f"{path}: refused to load ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def load_state_dict_strict(module: nn.Module, sd: dict[str, torch.Tensor], source: str) -> nn.Module:
    """Load `sd` into `module` (usually built on the meta device) with `assign=True`.

    Each tensor is cast to the dtype of the module's own parameter/buffer, so the module's dtype
    policy wins, as in the official loader (which `copy_`s into existing tensors): fp32 files are
    rounded to bf16 for bf16 block linears, bf16 files are upcast for fp32 norms and embedders.
    """
    expected = module.state_dict(keep_vars=True)
    missing = expected.keys() - sd.keys()
    unexpected = sd.keys() - expected.keys()
    problems = []
    if missing:
        problems.append(f"missing key(s): {_short_list(missing)}")
    if unexpected:
        problems.append(f"unexpected key(s): {_short_list(unexpected)}")
    for k in sorted(expected.keys() & sd.keys()):
        if tuple(sd[k].shape) != tuple(expected[k].shape):
            problems.append(f"key {k} has shape {tuple(sd[k].shape)}, expected {tuple(expected[k].shape)}")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))
    cast = {k: v.to(dtype=expected[k].dtype) for k, v in sd.items()}
    module.load_state_dict(cast, strict=True, assign=True)
    return module


def materialize_meta(module: nn.Module, device="cpu") -> nn.Module:
    """Give real (uninitialised) storage to anything still on `meta` (used when no checkpoint exists)."""
    return module.to_empty(device=device)


# ==================================================================================================
# Video and audio VAEs: Wan2.2_VAE.pth, TurboVAED .ckpt + json, Stable Audio Open safetensors + json
# ==================================================================================================
# Mirrors `inference/model/vae2_2/vae2_2_model.py`, `inference/model/turbo_vaed/turbo_vaed_model.py` and
# `inference/model/sa_audio/sa_audio_model.py`. Each format has a path loader (what the pipeline calls)
# and an in-memory loader (what the golden harness calls); the path loader ends in the in-memory one.
# The in-memory loaders return fp32 modules on CPU in eval mode; the path loaders then move them to the
# requested device and dtype (bf16 for the two video models in the pipeline, as upstream; the audio VAE
# is always fp32, upstream never casts it).

# The key mapping, as data. Wan: none (plain state_dict, no prefix). Turbo: the EMA dict's DDP prefix is
# stripped and the training-only feature-alignment heads are dropped. SAO: only keys under the
# pretransform prefix belong to the VAE (the rest of model.safetensors is the audio DiT and conditioners).
TURBO_EMA_KEY = "ema_state_dict"
TURBO_STRIP_PREFIX = "module."
TURBO_DROP_PREFIXES = ("aligned_feature_projection_heads.",)
SAO_PREFIX = "pretransform.model."


def _tensor_dict(obj, source: str, what: str) -> dict[str, torch.Tensor]:
    ok = isinstance(obj, dict) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())
    if not ok:
        raise CheckpointError(f"{source}: expected {what} (a dict name -> tensor), got {type(obj).__name__}")
    return obj


def _read_json(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def wan_vae_from_state_dict(sd: dict, config=None, source: str = "Wan2.2 VAE state dict"):
    """Wan2.2 VAE (encoder + decoder, 196 keys for the released config) from a plain state dict."""
    from vae import WanVAE, WanVAEConfig

    config = config if isinstance(config, WanVAEConfig) else WanVAEConfig.from_dict(config or {})
    with torch.device("meta"):
        model = WanVAE(config)
    return load_state_dict_strict(model, _tensor_dict(sd, source, "a Wan2.2 VAE state dict"), source).eval()


def load_wan_vae(path, dtype=torch.float32, device="cpu", config=None):
    """`Wan2.2-TI2V-5B/Wan2.2_VAE.pth`, a pickled plain state dict (read with weights_only=True).
    The pipeline asks for bf16, as the official `.to(bf16)`."""
    model = wan_vae_from_state_dict(read_torch(path), config, source=str(path))
    return model.to(device=device, dtype=dtype)


def turbo_state_dict_from_ckpt(ckpt, source: str) -> dict[str, torch.Tensor]:
    """The decoder weights of a Turbo-VAED training checkpoint: its EMA dict, `module.` stripped (only where
    present, as the official loader does), the training-only alignment heads dropped."""
    if not isinstance(ckpt, dict) or TURBO_EMA_KEY not in ckpt:
        raise CheckpointError(f"{source}: not a TurboVAED checkpoint (no '{TURBO_EMA_KEY}' entry)")
    ema = _tensor_dict(ckpt[TURBO_EMA_KEY], source, f"'{TURBO_EMA_KEY}'")
    sd = {}
    for k, v in ema.items():
        k = k[len(TURBO_STRIP_PREFIX) :] if k.startswith(TURBO_STRIP_PREFIX) else k
        if not k.startswith(TURBO_DROP_PREFIXES):
            sd[k] = v
    return sd


def turbo_vaed_from_state_dict(sd: dict, config=None, source: str = "TurboVAED state dict"):
    """TurboVAED (80 `decoder.*` keys for the released config) from a stripped state dict + config dict."""
    from vae import TurboVAED, TurboVAEDConfig

    try:
        config = config if isinstance(config, TurboVAEDConfig) else TurboVAEDConfig.from_dict(config or {})
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{source}: bad TurboVAED config ({e})") from None
    with torch.device("meta"):
        model = TurboVAED(config)
    return load_state_dict_strict(model, _tensor_dict(sd, source, "a TurboVAED state dict"), source).eval()


def load_turbo_vaed(config_path, ckpt_path, dtype=torch.float32, device="cpu"):
    """`turbo_vae/TurboV3-Wan22-TinyShallow_7_7.json` + `turbo_vae/checkpoint-340000.ckpt` (weights_only
    read: a checkpoint holding anything but tensors and containers is refused). The pipeline asks for bf16."""
    config = _read_json(config_path)
    sd = turbo_state_dict_from_ckpt(read_torch(ckpt_path), source=str(ckpt_path))
    model = turbo_vaed_from_state_dict(sd, config, source=f"{ckpt_path} (config {config_path})")
    return model.to(device=device, dtype=dtype)


def oobleck_config_from_json(cfg: dict, source: str = "model_config.json"):
    """SAO `model_config.json` -> OobleckConfig. Accepts the released text-to-audio layout
    (`model.pretransform.config`) and a stand-alone autoencoder config (`model_type` "autoencoder")."""
    from vae import OobleckConfig

    try:
        if cfg.get("model_type") == "autoencoder":
            ae = cfg["model"]
        else:
            pre = cfg["model"]["pretransform"]
            if pre.get("type") != "autoencoder" or "pretransform" in pre.get("config", {}):
                raise ValueError("the pretransform must be a plain (not nested) autoencoder")
            ae = pre["config"]
        return OobleckConfig.from_dict(ae, sample_rate=cfg.get("sample_rate", 44100))
    except (KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{source}: no autoencoder config found ({e!r})") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def oobleck_from_state_dict(sd: dict, config, parts=("encoder", "decoder"), source: str = "SAO state dict"):
    """OobleckVAE from keys *after* `pretransform.model.` (e.g. `decoder.layers.0.weight_g`).

    Only the requested `parts` are built and loaded; keys of the other part are ignored, anything else
    must match exactly. `config` is an OobleckConfig or a model_config.json dict.
    """
    from vae import OobleckConfig, OobleckVAE

    config = config if isinstance(config, OobleckConfig) else oobleck_config_from_json(config, source)
    sd = _tensor_dict(sd, source, "an audio VAE state dict")
    other = tuple(f"{p}." for p in ("encoder", "decoder") if p not in parts)
    sd = {k: v for k, v in sd.items() if not (other and k.startswith(other))}
    with torch.device("meta"):
        model = OobleckVAE(config, parts=parts)
    return load_state_dict_strict(model, sd, source).eval()


def load_audio_vae(folder, device="cpu", parts=("encoder", "decoder")):
    """`stable-audio-open-1.0/` (its `model.safetensors` + `model_config.json`): only the VAE's tensors
    are read. Always fp32, as upstream (it never casts the audio VAE)."""
    from safetensors import safe_open

    folder = Path(folder)
    config_path, path = folder / "model_config.json", folder / "model.safetensors"
    config = oobleck_config_from_json(_read_json(config_path), str(config_path))
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            # everything under the prefix except the part not asked for: strays still fail the strict load
            skip = tuple(f"{SAO_PREFIX}{p}." for p in ("encoder", "decoder") if p not in parts)
            names = [k for k in f.keys() if k.startswith(SAO_PREFIX) and not (skip and k.startswith(skip))]
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if not names:
        raise CheckpointError(f"{path}: no '{SAO_PREFIX}*' tensors (not a Stable Audio Open checkpoint?)")
    sd = {k[len(SAO_PREFIX) :]: v for k, v in read_safetensors(path, names).items()}
    return oobleck_from_state_dict(sd, config, parts, source=str(path)).to(device)
