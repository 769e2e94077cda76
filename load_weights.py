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
