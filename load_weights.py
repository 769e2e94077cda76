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

from model import DiT

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
# The DiT (base, distill, 540p SR, 1080p SR): `model.safetensors`, or shards + index, or `.zst` shards
# ==================================================================================================

DIT_INDEX = "model.safetensors.index.json"
DIT_SINGLE = "model.safetensors"


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _read_zst(path: Path, keys) -> dict[str, torch.Tensor]:
    """A zstd-compressed safetensors shard, decompressed in memory (upstream pipes `zstd -d -c`)."""
    import zstandard

    try:
        with open(path, "rb") as f:
            data = zstandard.ZstdDecompressor().stream_reader(f).read()
    except zstandard.ZstdError as e:
        raise CheckpointError(f"{path}: not a valid zstd file ({e})") from None
    tensors = read_safetensors_bytes(data, str(path))
    missing = set(keys) - tensors.keys()
    if missing:
        raise CheckpointError(f"{path}: missing key(s) listed in the index: {_short_list(missing)}")
    return {k: tensors[k] for k in keys}


def dit_checkpoint_files(folder: str | os.PathLike) -> tuple[dict[str, list[str]], str]:
    """Which keys live in which file: {file path: [keys]} and a name for messages.

    The official loader's rule (spec dit §12): with `model.safetensors.index.json`, read its
    `weight_map` and, per shard, prefer `<shard>.zst` when it exists; without it, read
    `model.safetensors`.
    """
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".safetensors":
        return {str(folder): _safetensors_keys(folder)}, str(folder)
    index = folder / DIT_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({e})") from None
        files: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            files.setdefault(shard, []).append(key)
        resolved = {}
        for shard, keys in files.items():
            zst, plain = folder / (shard + ".zst"), folder / shard
            if not zst.is_file() and not plain.is_file():
                raise CheckpointError(f"{index}: shard {shard} (or {shard}.zst) not found in {folder}")
            resolved[str(zst if zst.is_file() else plain)] = keys
        return resolved, str(index)
    single = folder / DIT_SINGLE
    if single.is_file():
        return {str(single): _safetensors_keys(single)}, str(single)
    raise CheckpointError(f"{folder}: no {DIT_INDEX} or {DIT_SINGLE} found")


def read_checkpoint(files: dict[str, list[str]], expected: dict[str, torch.Tensor], source: str,
                    device="cpu") -> dict[str, torch.Tensor]:
    """Read every listed key, casting each tensor to its module's dtype and moving it to `device` as
    it is read, so an fp32 file never sits in memory whole next to its bf16 copy.

    The key sets are compared first (from the index or the file headers), so a wrong checkpoint
    fails before gigabytes are read.
    """
    listed = {k for keys in files.values() for k in keys}
    missing, unexpected = expected.keys() - listed, listed - expected.keys()
    if missing or unexpected:
        parts = ([f"missing key(s): {_short_list(missing)}"] if missing else []) + (
            [f"unexpected key(s): {_short_list(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{source}: " + "; ".join(parts))
    sd = {}
    for path, keys in files.items():
        tensors = _read_zst(Path(path), keys) if path.endswith(".zst") else read_safetensors(path, keys)
        for k, t in tensors.items():
            if tuple(t.shape) != tuple(expected[k].shape):
                raise CheckpointError(f"{path}: key {k} has shape {tuple(t.shape)}, expected {tuple(expected[k].shape)}")
            sd[k] = t.to(device=device, dtype=expected[k].dtype)
    return sd


def _dit_on_meta(cfg, block_dtype):
    with torch.device("meta"):
        return DiT(cfg, block_dtype=block_dtype)


def dit_from_state_dict(sd: dict[str, torch.Tensor], cfg, source: str, block_dtype=torch.bfloat16,
                        device="cpu"):
    """A DiT from an in-memory state dict under the official key names (strict), in eval mode."""
    model = _dit_on_meta(cfg, block_dtype)
    sd = {k: v.to(device) for k, v in sd.items()}
    return load_state_dict_strict(model, sd, source).eval()


def load_dit(folder: str | os.PathLike, cfg, block_dtype=torch.bfloat16, device="cpu"):
    """The DiT from a checkpoint folder in any official layout (single file, shards + index, `.zst`).

    Released dtypes (spec §12): base is bf16 on disk, distill and SR fp32; either way the block
    linears become `block_dtype` and everything else float32, as the official module dtypes do.
    """
    model = _dit_on_meta(cfg, block_dtype)
    files, source = dit_checkpoint_files(folder)
    sd = read_checkpoint(files, model.state_dict(), source, device)
    return load_state_dict_strict(model, sd, source).eval()
