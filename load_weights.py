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

`--quant int8|fp8` (quant.py): the DiT and text-encoder loaders quantize the block linears tensor by
tensor as they are read, and `python load_weights.py quantize SRC DST --quant int8` writes the
saved-quantized form they read directly (section at the end).

It also holds the few file and command-line helpers every entry point shares (sample.py, distill.py,
bench.py, this file): atomic all-or-none writes, output/input path checks, `--device` parsing and
`guarded`, which turns bad input, a full disk, Ctrl-C or SIGTERM into one line and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import zstandard
from safetensors import safe_open
from safetensors.torch import load as load_safetensors, load_file, save_file
from torch import nn

import quant
from model import DiT
from text_encoder import GemmaTokenizer, T5GemmaEncoder, T5GemmaEncoderConfig
from vae import OobleckConfig, OobleckVAE, TurboVAED, TurboVAEDConfig, WanVAE, WanVAEConfig

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
    try:
        return load_safetensors(data)
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


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")


def _refuse_non_regular(path: Path) -> None:
    # The rename below replaces whatever sits at `path`: only ever a regular file (or nothing), never
    # a device node (`--out /dev/null` as root), a folder or a fifo.
    if os.path.lexists(path) and not Path(path).is_file():
        raise InputError(f"{path}: exists and is not a regular file; refusing to replace it")


def atomic_write_all(items) -> None:
    """`items`: [(path, write)]. Run every `write(tmp_path)`, then rename all results into place.
    All or none: on any failure (Ctrl-C, SIGTERM through `sigterm_as_interrupt`, a full disk) every
    temporary file is removed, and so is any output already renamed, so readers never see half a
    file or half of a run's files."""
    items = [(Path(p), w) for p, w in items]
    tmps, done = [], []
    try:
        for path, write in items:
            tmps.append(_tmp_name(path))
            write(tmps[-1])
        for path, _ in items:
            _refuse_non_regular(path)
        for (path, _), tmp in zip(items, tmps):
            os.replace(tmp, path)
            done.append(path)
    except BaseException as e:
        for p in tmps + done:
            p.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is not None:  # name the output, not its removed temp
            names = {str(t): str(p) for t, (p, _) in zip(tmps, items)}
            e.filename = names.get(str(e.filename), e.filename)
        raise


def atomic_write(path, write) -> None:
    """Run `write(tmp_path)` and rename the result to `path`; on any failure (Ctrl-C included) the
    temporary file is removed and `path` is left as it was, so readers never see half a file."""
    atomic_write_all([(path, write)])


# ==================================================================================================
# Command-line plumbing shared by every entry point (sample.py, distill.py, bench.py, this file)
# ==================================================================================================
# The promise: bad input is one line on stderr and exit status 2, never a traceback, never a
# half-written or clobbered file. Each entry point validates everything it can before building a
# network, and its main runs inside `guarded`, which turns what is left (a full disk, Ctrl-C,
# SIGTERM, a file that turns out unreadable half-way) into that one line.


class InputError(ValueError):
    """Bad user input (a flag, a file, a size): reported as one line on stderr with exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the usage block first)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def check_output_path(path, flag: str) -> Path:
    """An output path a user gave: an existing regular file (replaced atomically) or a new name in an
    existing folder we may write to. Symlinks are followed (the file they name is written). Returns
    the resolved path, so two flags naming one file can be told apart (`check_distinct`)."""
    text = str(path)
    if not text:
        raise InputError(f"{flag}: empty file name")
    real = Path(os.path.realpath(text))
    if os.path.lexists(real) and not real.is_file():
        kind = "a folder" if real.is_dir() else "not a regular file (a device, fifo or socket)"
        raise InputError(f"{flag} {text}: {kind}; give the name of a file to write")
    if not real.parent.is_dir():
        raise InputError(f"{flag} {text}: folder {real.parent} does not exist")
    if not os.access(real.parent, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {text}: folder {real.parent} is not writable")
    try:
        name_max = os.pathconf(real.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    extra = len(os.fsencode(_tmp_name(real).name)) - len(os.fsencode(real.name))
    if len(os.fsencode(real.name)) + extra > name_max:  # the temporary name must fit too
        raise InputError(f"{flag} {text}: file name too long (at most {name_max - extra} bytes here)")
    return real


def check_distinct(outputs: dict) -> None:
    """`outputs`: {flag: resolved path}. Two outputs of one run must never be the same file."""
    seen = {}
    for flag, p in outputs.items():
        key = p
        if p.exists():
            st = p.stat()
            key = (st.st_dev, st.st_ino)  # hard links too
        if key in seen:
            raise InputError(f"{flag} and {seen[key]} name the same file {p}; give two different names")
        seen[key] = flag


def check_input_file(path, flag: str, max_bytes: int | None = None) -> Path:
    """An input file a user gave: it must exist and be a regular file (a fifo or /dev/stdin would
    block, a folder would fail later with a worse message)."""
    p = Path(str(path))
    if not p.exists():
        raise InputError(f"{flag} {path}: file not found")
    if not p.is_file():
        raise InputError(f"{flag} {path}: not a regular file")
    if max_bytes is not None and p.stat().st_size > max_bytes:
        raise InputError(f"{flag} {path}: {p.stat().st_size / 1e6:.1f} MB, more than the {max_bytes / 1e6:g} MB allowed")
    return p


def available_memory(device) -> int:
    """Bytes a run can use: total memory of a CUDA device, else the host's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_device(text: str | None) -> torch.device:
    """--device: cpu, cuda or cuda:N (default: cuda when available); refused if it is not there."""
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {text}: not a device; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise InputError(f"--device {text}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {text}: no CUDA device on this machine (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


@contextlib.contextmanager
def sigterm_as_interrupt():
    """While inside: SIGTERM (kill, a job scheduler's timeout) raises KeyboardInterrupt like Ctrl-C,
    so `atomic_write_all` removes its temporary files instead of dying with them on disk."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_sigterm(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    old = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def one_line(text) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return " ".join(lines) if lines else "(no message)"


def guarded(body, user_errors=(InputError, ), interrupted=lambda: "interrupted: no output written") -> int:
    """Run `body()` (returns an exit status or None) and turn what a user can cause into one line on
    stderr and exit status 2: `user_errors` (bad input; CheckpointError is always one), OS errors
    (a full disk, a file that vanished, no network), running out of memory, Ctrl-C and SIGTERM.
    `interrupted()` gives the line for Ctrl-C/SIGTERM (it can say what was already written)."""
    import sys

    with sigterm_as_interrupt():
        try:
            status = body()
            return 0 if status is None else status
        except (CheckpointError, *user_errors) as e:
            message = f"error: {one_line(e)}"
        except (MemoryError, torch.OutOfMemoryError) as e:
            message = (f"error: out of memory ({one_line(e) if str(e) else 'host memory'}): lower --size, "
                       "--seconds or --sr, or use --offload model/layers on a GPU")
        except OSError as e:
            what = e.strerror or one_line(e)
            where = f": {e.filename}" if getattr(e, "filename", None) else ""
            message = f"error: {what}{where}"
        except KeyboardInterrupt:
            message = interrupted()
    print(message, file=sys.stderr)
    return 2


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


# ==================================================================================================
# The DiT (base, distill, 540p SR, 1080p SR): `model.safetensors`, or shards + index, or `.zst` shards
# ==================================================================================================

DIT_INDEX = "model.safetensors.index.json"
DIT_SINGLE = "model.safetensors"


def _safetensors_keys(path: Path) -> list[str]:
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return list(f.keys())
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


def _read_zst(path: Path, keys) -> dict[str, torch.Tensor]:
    """A zstd-compressed safetensors shard, decompressed in memory (upstream pipes `zstd -d -c`)."""
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


def read_weight_map(index: Path) -> dict[str, str]:
    """{tensor name: shard file name} of a `model.safetensors.index.json`."""
    try:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({_first_line(e)})") from None
    return weight_map


def dit_checkpoint_files(folder: str | os.PathLike) -> tuple[dict[str, list[str]], str]:
    """Which keys live in which file: {file path: [keys]} and a name for messages.

    The official loader's rule (`inference/infra/checkpoint/load_model_checkpoint.py`): with
    `model.safetensors.index.json`, read its `weight_map` and, per shard, prefer `<shard>.zst` when
    it exists; without it, read `model.safetensors`.
    """
    folder = Path(folder)
    if folder.is_file() and folder.suffix == ".safetensors":
        return {str(folder): _safetensors_keys(folder)}, str(folder)
    index = folder / DIT_INDEX
    if index.is_file():
        files: dict[str, list[str]] = {}
        for key, shard in read_weight_map(index).items():
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


@contextlib.contextmanager
def _tensor_reader(path: Path, keys):
    """`get(name)` for one shard: plain safetensors are read one tensor at a time (memory-mapped,
    so a converted tensor never waits for the rest of its shard); a `.zst` shard is decompressed whole."""
    if path.suffix == ".zst":
        tensors = _read_zst(path, keys)
        yield tensors.__getitem__
        return
    from safetensors import safe_open

    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        f = safe_open(str(path), framework="pt", device="cpu")
        present = set(f.keys())
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    with f:
        missing = set(keys) - present
        if missing:
            raise CheckpointError(f"{path}: missing key(s) listed in the index: {_short_list(missing)}")
        yield f.get_tensor


def read_checkpoint(files: dict[str, list[str]], expected: dict[str, torch.Tensor], source: str,
                    device="cpu", rename: dict[str, str] | None = None, note: str = "") -> dict[str, torch.Tensor]:
    """Read every listed key, casting each tensor to its module's dtype and moving it to `device` as
    it is read, so an fp32 file never sits in memory whole next to its bf16 copy.

    The key sets are compared first (from the index or the file headers), so a wrong checkpoint
    fails before gigabytes are read. `rename` maps checkpoint names to module names (default: the
    same); `note` follows the file name in messages (e.g. which prefix was stripped).
    Quantized models (quant.py): a float weight whose module slot is 8-bit is quantized right here,
    one tensor at a time; a saved-quantized weight (`X.weight` 8-bit + `X.weight_scale`) goes in as
    it is, or is dequantized for a float model.
    """
    rename = rename or {}
    where = {rename.get(k, k): (path, k) for path, keys in files.items() for k in keys}
    missing, unexpected = _key_problems(where.keys(), expected)
    if missing or unexpected:
        parts = ([f"missing key(s): {_short_list(missing)}"] if missing else []) + (
            [f"unexpected key(s): {_short_list(unexpected)}"] if unexpected else [])
        raise CheckpointError(f"{source}{note}: " + "; ".join(parts))
    sd = {}
    for path, keys in files.items():
        with _tensor_reader(Path(path), keys) as get:
            for name in keys:
                k = rename.get(name, name)
                if _is_scale_of(k, where):
                    continue  # read together with its weight
                t = get(name)
                if tuple(t.shape) != tuple(expected[k].shape):
                    raise CheckpointError(f"{path}{note}: key {k} has shape {tuple(t.shape)}, expected {tuple(expected[k].shape)}")

                def scale():
                    if k + quant.SCALE_SUFFIX not in where:
                        raise CheckpointError(f"{path}{note}: key {k} is {t.dtype} but {k}{quant.SCALE_SUFFIX} is missing")
                    spath, sname = where[k + quant.SCALE_SUFFIX]
                    if spath == path:
                        return get(sname)
                    with _tensor_reader(Path(spath), [sname]) as sget:
                        return sget(sname)

                sd.update(_convert(k, t, scale, expected, device, f"{path}{note}"))
    return sd


def _is_scale_of(k: str, present) -> bool:
    """Is `k` the `<linear>.weight_scale` of a weight that is also present?"""
    return k.endswith(quant.SCALE_SUFFIX) and k[: -len(quant.SCALE_SUFFIX)] in present


def _key_problems(present, expected) -> tuple[set, set]:
    """(missing, unexpected) keys of a checkpoint against a module, either side possibly quantized:
    a scale the module wants may be made here (float file), one the file has may be used up here
    (float module)."""
    present = set(present)
    missing = {k for k in expected.keys() - present if not _is_scale_of(k, present)}
    unexpected = {k for k in present - expected.keys() if not _is_scale_of(k, expected)}
    return missing, unexpected


def _convert(k: str, t: torch.Tensor, scale, expected: dict, device, source: str) -> dict[str, torch.Tensor]:
    """One checkpoint tensor -> the module tensor(s) for key k: cast, quantized or dequantized.
    `scale()` reads the file's `k_scale` (only called for a saved-quantized weight)."""
    want = expected[k].dtype
    have_q, want_q = quant.mode_of(t.dtype), quant.mode_of(want)
    if have_q is None and want_q is None:
        return {k: t.to(device=device, dtype=want)}
    if have_q is None:  # a float weight into an 8-bit slot: quantize on the target device
        q, s = quant.quantize_weight(t.to(device), want_q)
        return {k: q, k + quant.SCALE_SUFFIX: s}
    s = scale().to(device=device, dtype=torch.float32)
    if tuple(s.shape) != (t.shape[0],):
        raise CheckpointError(f"{source}: key {k}{quant.SCALE_SUFFIX} has shape {tuple(s.shape)}, expected ({t.shape[0]},)")
    if want_q is None:  # a saved-quantized weight into a float model
        return {k: quant.dequantize_weight(t.to(device), s, want)}
    if want_q != have_q:
        raise CheckpointError(f"{source}: key {k} is stored as {have_q}, the model was asked for {want_q}: "
                              "quantize from the original (float) checkpoint instead")
    return {k: t.to(device), k + quant.SCALE_SUFFIX: s}


def convert_state_dict(sd: dict[str, torch.Tensor], expected: dict, source: str, device="cpu") -> dict:
    """The in-memory twin of read_checkpoint's conversion (golden harness, tests): quantize,
    dequantize or cast each tensor for the module whose state dict is `expected`."""
    missing, unexpected = _key_problems(sd.keys(), expected)
    if missing or unexpected:
        return dict(sd)  # let load_state_dict_strict name the problem
    out = {}
    for k, t in sd.items():
        if _is_scale_of(k, sd):
            continue
        if tuple(t.shape) != tuple(expected[k].shape):
            return dict(sd)
        def scale():
            if k + quant.SCALE_SUFFIX not in sd:
                raise CheckpointError(f"{source}: key {k} is {t.dtype} but {k}{quant.SCALE_SUFFIX} is missing")
            return sd[k + quant.SCALE_SUFFIX]

        out.update(_convert(k, t, scale, expected, device, source))
    return out


def _dit_on_meta(cfg, block_dtype, quant_mode="none"):
    with torch.device("meta"):
        return quant.quantize_modules(DiT(cfg, block_dtype=block_dtype), quant_mode)


def dit_from_state_dict(sd: dict[str, torch.Tensor], cfg, source: str, block_dtype=torch.bfloat16,
                        device="cpu", quant="none"):
    """A DiT from an in-memory state dict under the official key names (strict), in eval mode.
    `quant` ("int8"/"fp8") stores the block linears in 8 bits (quant.py); `sd` may be either form."""
    model = _dit_on_meta(cfg, block_dtype, quant)
    sd = convert_state_dict(sd, model.state_dict(), source, device)
    return load_state_dict_strict(model, sd, source).eval()


def load_dit(folder: str | os.PathLike, cfg, block_dtype=torch.bfloat16, device="cpu", quant="none"):
    """The DiT from a checkpoint folder in any official layout (single file, shards + index, `.zst`).

    Released dtypes: base is bf16 on disk, distill and SR fp32; either way the block
    linears become `block_dtype` and everything else float32, as the official module dtypes do.
    `quant` ("int8"/"fp8"): the block linears are quantized tensor by tensor as they are read (no
    float copy of the model at any point); a checkpoint written by `quantize` loads directly.
    """
    model = _dit_on_meta(cfg, block_dtype, quant)
    files, source = dit_checkpoint_files(folder)
    sd = read_checkpoint(files, model.state_dict(), source, device)
    return load_state_dict_strict(model, sd, source).eval()


# ==================================================================================================
# Text encoder (T5-Gemma 9B UL2, encoder half only) and its on-disk embedding cache
# ==================================================================================================
# The release (google/t5gemma-9b-9b-ul2) is a T5GemmaForConditionalGeneration saved as safetensors
# shards + `model.safetensors.index.json`. Only the `model.encoder.*` tensors are read (about 18.5 GB
# of the 37.9 GB): the decoder half is skipped by name and its shards are never opened unless they
# also hold encoder tensors. The tokenizer is `tokenizer.json` plus the BOS/EOS flags of
# `tokenizer_config.json`.

TEXT_ENCODER_PREFIXES = ("model.encoder.", "encoder.")  # the release uses the first; accept both
TEXT_SKIPPED_PREFIXES = ("model.decoder.", "decoder.", "lm_head.")  # the other half of the checkpoint


def _text_encoder_names(names, source: str) -> dict[str, str]:
    """Map checkpoint names to our module names (prefix stripped); skip the decoder; refuse the rest."""
    out, unknown = {}, []
    for name in names:
        prefix = next((p for p in TEXT_ENCODER_PREFIXES if name.startswith(p)), None)
        if prefix is not None:
            out[name] = name[len(prefix):]
        elif not name.startswith(TEXT_SKIPPED_PREFIXES):
            unknown.append(name)  # neither half: a different model, or a key we do not know about
    if len(set(out.values())) != len(out):  # the same tensor under both prefixes: which one is right?
        raise CheckpointError(f"{source}: encoder keys present under both prefixes {TEXT_ENCODER_PREFIXES}")
    if unknown:
        raise CheckpointError(f"{source}: unexpected key(s) outside encoder/decoder: {_short_list(unknown)}")
    if not out:
        raise CheckpointError(f"{source}: no text-encoder tensors (expected keys under {TEXT_ENCODER_PREFIXES[0]})")
    return out


def _meta_text_encoder(config, dtype, quant_mode="none"):
    # Meta device: 9.2B parameters get no storage and no random init before the real tensors arrive.
    with torch.device("meta"):
        return quant.quantize_modules(T5GemmaEncoder(config).to(dtype), quant_mode)


def text_encoder_from_state_dict(sd: dict, config, dtype=torch.float32, device="cpu", source="<state dict>",
                                 quant="none"):
    """Build the encoder from an in-memory state dict under the release's names (golden harness path).

    `config` is a T5GemmaEncoderConfig or a config.json dict. Decoder keys are ignored, anything
    else must match the module exactly.
    """
    if isinstance(config, dict):
        config = T5GemmaEncoderConfig.from_dict(config)
    names = _text_encoder_names(sd.keys(), source)
    return _finish_text_encoder(config, {short: sd[name] for name, short in names.items()}, dtype, device, source, quant)


TEXT_KEYS_NOTE = f" (keys after '{TEXT_ENCODER_PREFIXES[0]}')"  # messages name keys without the prefix


def _finish_text_encoder(config, sd: dict, dtype, device, source: str, quant_mode="none"):
    """Shared tail of both loaders: strict assign-load into a meta-built encoder, eval mode."""
    module = _meta_text_encoder(config, dtype, quant_mode)
    # no-op for tensors read per shard; casts/quantizes an in-memory state dict
    sd = convert_state_dict(sd, module.state_dict(), source + TEXT_KEYS_NOTE, device)
    return load_state_dict_strict(module, sd, source + TEXT_KEYS_NOTE).eval()


def _read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({_first_line(e)})") from None


def load_text_encoder_config(weights_dir):
    """The encoder sub-config of `<weights_dir>/config.json` as a T5GemmaEncoderConfig."""
    path = Path(weights_dir) / "config.json"
    raw = _read_json(path)
    try:
        # The release's config.json is the whole encoder-decoder config; from_dict takes its "encoder".
        return T5GemmaEncoderConfig.from_dict(raw)
    except (TypeError, ValueError) as e:  # unknown types or inconsistent values, e.g. layer_types
        raise CheckpointError(f"{path}: bad text-encoder config ({_first_line(e)})") from None


def load_text_encoder(weights_dir, dtype=torch.bfloat16, device="cpu", quant="none"):
    """The T5-Gemma encoder from a release folder (config.json + sharded safetensors), strictly.

    bf16 by default (as the official pipeline runs it); float32 on request. Tensors are read shard by
    shard, cast and moved to `device` at once, so host memory holds at most one shard's encoder part.
    About 18.5 GB in bf16: on a 24 GB card, encode on CPU (`device="cpu"`) or move it off the card
    after encoding (sample.Models does), and use `cached_text_features` to skip it on later runs.
    `quant` ("int8"/"fp8"): the layers' projections are quantized as read (10.2 GB in all, `python bench.py --memory`).
    """
    weights_dir = Path(weights_dir)
    config = load_text_encoder_config(weights_dir)
    index_path = weights_dir / "model.safetensors.index.json"
    if index_path.is_file():
        weight_map = read_weight_map(index_path)
        source = str(index_path)
    else:  # an unsharded save: one model.safetensors
        single = weights_dir / "model.safetensors"
        weight_map = {k: single.name for k in _safetensors_keys(single)}
        source = str(single)
    names = _text_encoder_names(weight_map.keys(), source)
    # Group the encoder keys by shard: a shard holding only decoder tensors is never opened.
    files: dict[str, list[str]] = {}
    for name in names:
        files.setdefault(str(weights_dir / weight_map[name]), []).append(name)
    # The DiT's reader: key sets checked before any data is read, each shard cast and moved as it is
    # read (the host never holds more than one shard), a mis-shaped key reported with its shard.
    expected = _meta_text_encoder(config, dtype, quant).state_dict(keep_vars=True)
    sd = read_checkpoint(dict(sorted(files.items())), expected, source, device, rename=names, note=TEXT_KEYS_NOTE)
    return _finish_text_encoder(config, sd, dtype, device, source, quant)


def load_text_tokenizer(weights_dir):
    """`<weights_dir>/tokenizer.json` with the BOS/EOS flags of tokenizer_config.json (defaults: BOS, no EOS)."""
    weights_dir = Path(weights_dir)
    flags_path = weights_dir / "tokenizer_config.json"
    flags = _read_json(flags_path) if flags_path.is_file() else {}
    # GemmaTokenizerFast's defaults when the keys are absent: add_bos_token True, add_eos_token False.
    add_bos, add_eos = flags.get("add_bos_token", True), flags.get("add_eos_token", False)
    try:
        return GemmaTokenizer(weights_dir / "tokenizer.json", add_bos=bool(add_bos), add_eos=bool(add_eos))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def text_weights_identity(weights_dir) -> list:
    """Cheap identity of a text-encoder folder: (name, size, mtime_ns) of its weight/tokenizer/config files.

    Hashing 18 GB of contents would take longer than encoding; a changed or replaced file changes
    its size or mtime.
    """
    weights_dir = Path(weights_dir)
    if not weights_dir.is_dir():
        raise CheckpointError(f"{weights_dir}: text-encoder folder not found")
    files = sorted(p for p in weights_dir.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".model"))
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "davinci-magihuman" / "text"


def cached_text_features(weights_dir, text: str, compute, variant: str = "", cache_dir=None):
    """`compute()` -> (features (1, n, D) float32 on CPU, n), memoised on disk by weights identity + text.

    `variant` must name whatever else the result depends on (dtype, device type, max length), e.g.
    "bfloat16/cuda/640". The encoder is only needed when `compute` runs, so a caller that loads it
    lazily inside `compute` skips the 18 GB load entirely on a cache hit (e.g. the negative prompt).
    """
    # The text goes into the key verbatim (hashed), so a one-character edit is a different entry.
    key_src = json.dumps({"weights": text_weights_identity(weights_dir), "variant": variant, "text": text})
    key = hashlib.sha256(key_src.encode("utf-8")).hexdigest()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"{key}.safetensors"
    if path.is_file():
        try:
            features = load_file(str(path))["features"]
            return features, features.shape[1]
        except Exception:
            pass  # a truncated or foreign file: recompute and overwrite it
    features, n = compute()
    features = features.detach().float().cpu().contiguous()  # hits and misses both return CPU tensors
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file({"features": features}, str(tmp), metadata={"n": str(n)}))
    except OSError as e:  # a read-only or full disk only costs the next run an encode
        warnings.warn(f"text-feature cache not written to {cache_dir} ({_first_line(e)})", stacklevel=2)
    return features, n


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


def wan_vae_from_state_dict(sd: dict, config=None, source: str = "Wan2.2 VAE state dict"):
    """Wan2.2 VAE (encoder + decoder, 196 keys for the released config) from a plain state dict."""
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


# ==================================================================================================
# LoRA adapters of the DiT's block linears: build, read/write (safetensors), attach or merge
# ==================================================================================================
# No official LoRA exists; the file format follows the common `lora_A`/`lora_B` convention so other
# tools can read it. For every adapted linear `<module>` (its checkpoint key minus `.weight`, e.g.
# `block.layers.0.attention.linear_qkv`) with checkpoint weight W [out, in]:
#     <module>.lora_A.weight  [r, in]      <module>.lora_B.weight  [out, r]
#     W' = W + scale · (alpha / r) · B @ A          alpha: metadata "lora_alpha" (default r)
# The sandwich layers' expert linears hold 3 experts stacked on dim 0 (W is [3·out_e, in]); their
# adapter shares A across experts and each expert takes its rows of B, which is exactly the plain
# update of the stacked W, so a tool that knows nothing of experts merges it correctly.

LORA_TARGETS = ("attention.linear_qkv", "attention.linear_proj", "mlp.up_gate_proj", "mlp.down_proj")
LORA_FORMAT = "magihuman-lora-v1"


class LoRALinear(nn.Module):
    """One adapter, fp32: lora_A [r, in] ~ N(0, 1/in), lora_B [out, r] = 0 (the update starts at 0)."""

    def __init__(self, in_features: int, out_features: int, rank: int, num_experts: int = 1,
                 alpha: float | None = None, generator: torch.Generator | None = None, device=None):
        super().__init__()
        self.rank, self.num_experts = rank, num_experts
        self.alpha = float(rank if alpha is None else alpha)
        # Bias-free nn.Linear so the keys read `lora_A.weight` / `lora_B.weight`, as the format says.
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device)
        if self.lora_A.weight.device.type != "meta":
            with torch.no_grad():
                self.lora_A.weight.copy_(torch.randn(rank, in_features, generator=generator) / in_features**0.5)
                self.lora_B.weight.zero_()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self, x: torch.Tensor, sizes=None) -> torch.Tensor:
        """The update's output for the linear's input x [B, L, in] -> [B, L, out] float32."""
        h = F.linear(x.float(), self.lora_A.weight)  # [B, L, r]
        if self.num_experts == 1:
            return F.linear(h, self.lora_B.weight) * self.scale
        # Experts split the sequence by modality exactly like model.ExpertLinear (video, audio, text).
        rows = self.lora_B.weight.chunk(self.num_experts, dim=0)  # E x [out_e, r]
        return torch.cat([F.linear(p, rows[e]) for e, p in enumerate(h.split(sizes, dim=1))], dim=1) * self.scale

    def weight_delta(self) -> torch.Tensor:
        """(alpha / r) · B @ A  [out, in] float32: what merging adds to the weight."""
        return self.scale * (self.lora_B.weight.float() @ self.lora_A.weight.float())


class LoRA(nn.Module):
    """A set of adapters, held under the DiT's module names, so `state_dict()` has the file's keys."""

    def __init__(self, adapters: dict):
        super().__init__()
        self.names = list(adapters)
        for name, adapter in adapters.items():
            parent = self
            for part in name.split(".")[:-1]:  # empty containers mirror the DiT's module tree
                if not hasattr(parent, part):
                    parent.add_module(part, nn.Module())
                parent = getattr(parent, part)
            parent.add_module(name.split(".")[-1], adapter)

    def adapters(self) -> list:
        return [(n, self.get_submodule(n)) for n in self.names]

    @property
    def rank(self) -> int:
        return self.adapters()[0][1].rank

    @property
    def alpha(self) -> float:
        return self.adapters()[0][1].alpha


def lora_target_modules(dit: nn.Module, targets=LORA_TARGETS) -> dict:
    """name -> linear for every block linear whose name ends with one of `targets`."""
    return {n: m for n, m in dit.named_modules()
            if n.endswith(tuple(targets)) and hasattr(m, "in_features") and hasattr(m, "num_experts")}


def new_lora(dit: nn.Module, rank: int, alpha: float | None = None, targets=LORA_TARGETS, seed: int = 0) -> LoRA:
    """Fresh adapters (B = 0: the adapted DiT equals the base) on every target linear of `dit`."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    modules = lora_target_modules(dit, targets)
    if not modules:
        raise ValueError(f"no linear of the DiT matches the LoRA targets {list(targets)}; "
                         f"choose from {list(LORA_TARGETS)}")
    g = torch.Generator().manual_seed(seed)
    return LoRA({n: LoRALinear(m.in_features, m.out_features * m.num_experts, rank, m.num_experts, alpha, g)
                 for n, m in modules.items()})


def save_lora(path, state_dict: dict, alpha: float, metadata: dict | None = None) -> None:
    """Adapters (`LoRA.state_dict()`) -> safetensors (atomic): the keys above, fp32, alpha and rank in
    the metadata."""
    from safetensors.torch import save_file

    sd = {k: v.detach().float().cpu().contiguous() for k, v in state_dict.items()}
    rank = next(v.shape[0] for k, v in sd.items() if k.endswith(".lora_A.weight"))
    meta = {"format": LORA_FORMAT, "lora_alpha": repr(float(alpha)), "lora_rank": str(rank), **(metadata or {})}
    atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata={k: str(v) for k, v in meta.items()}))


def load_lora(path, dit: nn.Module) -> LoRA:
    """Adapters from a LoRA file, checked against `dit` strictly: every key must be
    `<linear>.lora_{A,B}.weight` of a block linear of this DiT, in pairs, with fitting shapes; anything
    else stops with one line naming the key and the file."""
    from safetensors import safe_open

    path = Path(path)
    sd = read_safetensors(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    if not sd:
        raise CheckpointError(f"{path}: no tensors (not a LoRA file)")
    modules = lora_target_modules(dit, ("",))  # any linear of the DiT may carry an adapter
    pairs: dict[str, dict] = {}
    for k in sorted(sd):
        name, dot, tail = k.rpartition(".lora_")
        if not dot or tail not in ("A.weight", "B.weight"):
            raise CheckpointError(f"{path}: key {k} is not '<module>.lora_A.weight' or '<module>.lora_B.weight'")
        if name not in modules:
            raise CheckpointError(f"{path}: key {k} names no linear of this DiT ({name})")
        pairs.setdefault(name, {})[tail[0]] = sd[k]
    alpha = float(meta["lora_alpha"]) if "lora_alpha" in meta else None
    adapters = {}
    for name in [n for n in modules if n in pairs]:  # the DiT's module order, whatever the file's
        ab, m = pairs[name], modules[name]
        for part in "AB":
            if part not in ab:
                raise CheckpointError(f"{path}: key {name}.lora_{part}.weight is missing (its pair is present)")
        A, B = ab["A"], ab["B"]
        r, out, n_in = A.shape[0], m.out_features * m.num_experts, m.in_features
        for part, t, want in (("A", A, (r, n_in)), ("B", B, (out, r))):
            if tuple(t.shape) != want:
                raise CheckpointError(f"{path}: key {name}.lora_{part}.weight has shape {tuple(t.shape)}, "
                                      f"expected {want} for this DiT")
        a = LoRALinear(n_in, out, r, m.num_experts, alpha, device="meta")
        a.load_state_dict({"lora_A.weight": A.float().clone(), "lora_B.weight": B.float().clone()}, assign=True)
        adapters[name] = a
    return LoRA(adapters)


class LoRAHooks:
    """Adapters attached to a DiT unmerged, as forward hooks: out += scale · delta(x). The DiT's own
    weights and state dict stay untouched; `remove()` detaches them again."""

    def __init__(self, dit: nn.Module, lora: LoRA, scale: float = 1.0):
        self.handles = []
        for name, adapter in lora.adapters():
            module = dit.get_submodule(name)
            self.handles.append(module.register_forward_hook(self._hook(adapter, scale)))

    @staticmethod
    def _hook(adapter: LoRALinear, scale: float):
        def add_delta(module, args, out):
            sizes = args[1] if len(args) > 1 else None  # block linears are called as (x, sizes)
            return out + (scale * adapter.delta(args[0], sizes)).to(out.dtype)  # fp32 update, added in out's dtype

        return add_delta

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@torch.no_grad()
def merge_lora(dit: nn.Module, lora: LoRA, scale: float = 1.0) -> nn.Module:
    """W += scale · (alpha / r) · B @ A in place (fp32 sum, rounded once to W's dtype); a negative
    scale unmerges (exactly only for fp32 weights: a bf16 weight is rounded at each merge)."""
    for name, adapter in lora.adapters():
        w = getattr(dit.get_submodule(name), "weight", None)  # [out, in]
        if w is None or w.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise InputError(f"{name}: cannot merge a LoRA into {getattr(w, 'dtype', 'quantized')} weights; "
                             "merge before quantizing, or run the adapters unmerged")
        w.copy_((w.float() + scale * adapter.weight_delta().to(w.device)).to(w.dtype))
    return dit


# ==================================================================================================
# The release as a folder: where each file lives, what a run needs, and the download command
# ==================================================================================================
# `--weights DIR` holds the four released repositories side by side, each in its own layout:
#   DIR/daVinci-MagiHuman/{base,distill,540p_sr,1080p_sr}/   the DiTs (any layout load_dit reads)
#   DIR/daVinci-MagiHuman/turbo_vae/                          Turbo VAE decoder json + .ckpt
#   DIR/t5gemma-9b-9b-ul2/                                    text encoder (encoder shards only needed)
#   DIR/stable-audio-open-1.0/                                audio VAE (inside model.safetensors)
#   DIR/Wan2.2-TI2V-5B/Wan2.2_VAE.pth                         Wan2.2 VAE (TI2V encoder, --vae wan)

REPOS = {  # Hugging Face repository -> folder name under DIR
    "GAIR/daVinci-MagiHuman": "daVinci-MagiHuman",
    "google/t5gemma-9b-9b-ul2": "t5gemma-9b-9b-ul2",
    "stabilityai/stable-audio-open-1.0": "stable-audio-open-1.0",
    "Wan-AI/Wan2.2-TI2V-5B": "Wan2.2-TI2V-5B",
}
DIT_MODELS = ("base", "distill", "540p_sr", "1080p_sr")
TURBO_JSON = "daVinci-MagiHuman/turbo_vae/TurboV3-Wan22-TinyShallow_7_7.json"
TURBO_CKPT = "daVinci-MagiHuman/turbo_vae/checkpoint-340000.ckpt"
WAN_VAE_PTH = "Wan2.2-TI2V-5B/Wan2.2_VAE.pth"
TEXT_DIR = "t5gemma-9b-9b-ul2"
AUDIO_DIR = "stable-audio-open-1.0"
TEXT_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "model.safetensors.index.json")


def required_files(models=("distill",), vae: str = "turbo", image: bool = False) -> list[str]:
    """Paths (relative to DIR) a run needs; a DiT folder counts as present if it has either index
    or single file, so it is listed by its index name and checked with `_dit_present`."""
    need = [f"daVinci-MagiHuman/{m}" for m in models]
    need += [f"{TEXT_DIR}/config.json", f"{TEXT_DIR}/tokenizer.json", f"{TEXT_DIR}/model.safetensors.index.json",
             f"{AUDIO_DIR}/model.safetensors", f"{AUDIO_DIR}/model_config.json"]
    if vae == "turbo":
        need += [TURBO_JSON, TURBO_CKPT]
    if vae == "wan" or image:
        need.append(WAN_VAE_PTH)
    return need


def missing_files(weights_dir, models=("distill",), vae: str = "turbo", image: bool = False) -> list[str]:
    weights_dir = Path(weights_dir)
    missing = []
    for rel in required_files(models, vae, image):
        p = weights_dir / rel
        present = ((p / DIT_INDEX).is_file() or (p / DIT_SINGLE).is_file()) if rel.split("/")[-1] in DIT_MODELS else p.is_file()
        if not present:
            missing.append(rel)
    return missing


def download_patterns(models=DIT_MODELS) -> dict[str, list[str]]:
    """What `download` fetches per repository: only the files a run reads. The text encoder's shards
    are added afterwards from its index (only those that hold `model.encoder.*` tensors)."""
    bad = sorted(set(models) - set(DIT_MODELS))
    if bad:
        raise ValueError(f"unknown model(s) {bad}; choose from {list(DIT_MODELS)}")
    return {
        "GAIR/daVinci-MagiHuman": [f"{m}/*" for m in models] + ["turbo_vae/*"],
        "google/t5gemma-9b-9b-ul2": list(TEXT_FILES),
        "stabilityai/stable-audio-open-1.0": ["model.safetensors", "model_config.json"],  # VAE = pretransform.*
        "Wan-AI/Wan2.2-TI2V-5B": ["Wan2.2_VAE.pth"],  # the VAE only, not the 5B video model
    }


def encoder_shards(index_path) -> list[str]:
    """The shards of the T5-Gemma release that hold encoder tensors (the decoder half is skipped)."""
    weight_map = read_weight_map(Path(index_path))
    return sorted({shard for key, shard in weight_map.items() if key.startswith(TEXT_ENCODER_PREFIXES)})


def download(weights_dir, models=DIT_MODELS) -> None:
    """Fetch exactly the needed files with huggingface_hub (optional dependency)."""
    try:  # lazy on purpose: huggingface_hub is an optional dependency, needed only here
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    except ImportError:
        raise CheckpointError(
            "downloading needs huggingface_hub: pip install huggingface_hub==2.4.0 "
            "(or fetch the files listed in README.md by hand into " + str(weights_dir) + ")") from None
    weights_dir = Path(weights_dir)
    patterns_by_repo = download_patterns(models)  # refuses unknown model names before any network use
    if os.path.lexists(weights_dir) and not weights_dir.is_dir():
        raise InputError(f"{weights_dir}: exists and is not a folder")
    if not weights_dir.is_dir() and not weights_dir.parent.is_dir():
        raise InputError(f"{weights_dir}: its parent folder {weights_dir.parent} does not exist")
    for repo, patterns in patterns_by_repo.items():
        local = weights_dir / REPOS[repo]
        try:
            snapshot_download(repo, local_dir=local, allow_patterns=patterns)
            if repo == "google/t5gemma-9b-9b-ul2":
                shards = encoder_shards(local / "model.safetensors.index.json")
                snapshot_download(repo, local_dir=local, allow_patterns=shards)
        except GatedRepoError:
            raise CheckpointError(f"{repo} is gated: accept its licence at https://huggingface.co/{repo}, "
                                  "then log in with `hf auth login` and run this again") from None
        except RepositoryNotFoundError:
            raise CheckpointError(f"{repo}: repository not found (or not visible without logging in)") from None
        except (CheckpointError, KeyboardInterrupt):
            raise
        except Exception as e:  # no network, a proxy, a full disk: huggingface_hub/httpx raise many kinds
            raise CheckpointError(f"cannot download {repo} ({type(e).__name__}: {_first_line(e)}); check the "
                                  "network (or HF_ENDPOINT), or fetch the files listed in README.md by hand") from None


# ==================================================================================================
# Saved-quantized checkpoints: `python load_weights.py quantize SRC DST --quant int8|fp8`
# ==================================================================================================
# DST is a folder in the DiT layout (`model.safetensors.index.json` + shards), which load_dit and
# load_text_encoder read like any release: block linears as `<name>.weight` (int8 / float8_e4m3fn) +
# `<name>.weight_scale` (float32), everything else as it was on disk. The index's metadata names the
# mode. For a T5-Gemma folder only the encoder half is written, with its config and tokenizer files.

QUANT_SHARD_BYTES = 4 << 30


def _is_text_encoder_folder(src: Path) -> bool:
    try:
        cfg = json.loads((src / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and (str(cfg.get("model_type", "")).startswith("t5gemma") or "encoder" in cfg)


def _quantize_sources(src: Path) -> tuple[dict[str, list[str]], str, list[Path]]:
    """({file: [keys]}, source name, files to copy) of a DiT checkpoint or a T5-Gemma folder."""
    if _is_text_encoder_folder(src):  # the text encoder: encoder keys only
        index = src / "model.safetensors.index.json"
        weight_map = read_weight_map(index) if index.is_file() else {k: "model.safetensors" for k in _safetensors_keys(src / "model.safetensors")}
        names = _text_encoder_names(weight_map.keys(), str(src))
        files: dict[str, list[str]] = {}
        for name in names:
            files.setdefault(str(src / weight_map[name]), []).append(name)
        extra = [src / f for f in TEXT_FILES if f != "model.safetensors.index.json" and (src / f).is_file()]
        return dict(sorted(files.items())), str(src), extra
    files, source = dit_checkpoint_files(src)
    return files, source, []


def quantize_checkpoint(src, dst, mode: str, shard_bytes: int = QUANT_SHARD_BYTES, progress: bool = False) -> dict:
    """Write the saved-quantized form of checkpoint `src` (DiT folder/file or T5-Gemma folder) to the
    new folder `dst`. Reads one tensor at a time and holds at most one output shard (`shard_bytes`);
    `dst` appears only when complete. Returns {"tensors", "quantized", "bytes_in", "bytes_out"}."""
    import shutil

    from safetensors.torch import save_file

    quant.check_mode(mode)
    if mode == "none":
        raise ValueError("quantize needs --quant int8 or fp8")
    src, dst = Path(src), Path(dst)
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists (choose a new folder)")
    if not dst.parent.is_dir():
        raise CheckpointError(f"{dst.parent}: folder not found")
    files, source, extra = _quantize_sources(src)
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    stats = {"tensors": 0, "quantized": 0, "bytes_in": 0, "bytes_out": 0}
    shard, shard_size, weight_map, shards = {}, 0, {}, []

    def flush():
        nonlocal shard, shard_size
        if shard:
            name = f"quantized-{len(shards) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"quant": mode})
            weight_map.update({k: name for k in shard})
            shards.append(name)
            shard, shard_size = {}, 0

    total = sum(len(k) for k in files.values())
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=f"quantize {mode}", unit="tensor")
    try:
        tmp.mkdir()
        for path, keys in files.items():
            with _tensor_reader(Path(path), keys) as get:
                for name in keys:
                    t = get(name)
                    stats["tensors"] += 1
                    stats["bytes_in"] += t.numel() * t.element_size()
                    if quant.mode_of(t.dtype) is not None:
                        raise CheckpointError(f"{path}: {name} is already quantized ({t.dtype}); quantize the float checkpoint")
                    out = {name: t.contiguous()}
                    if quant.is_block_linear_weight(name, t.shape) and t.is_floating_point():
                        q, s = quant.quantize_weight(t, mode)
                        out = {name: q, name + quant.SCALE_SUFFIX: s}
                        stats["quantized"] += 1
                    for k, v in out.items():
                        shard[k] = v
                        shard_size += v.numel() * v.element_size()
                        stats["bytes_out"] += v.numel() * v.element_size()
                    if shard_size >= shard_bytes:
                        flush()
                    if bar is not None:
                        bar.update(1)
        flush()
        meta = {"quant": mode, "quantized_from": source, "total_size": str(stats["bytes_out"])}
        (tmp / DIT_INDEX).write_text(json.dumps({"metadata": meta, "weight_map": weight_map}, indent=1))
        for f in extra:
            shutil.copy2(f, tmp / f.name)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return stats


def checkpoint_quant_mode(folder) -> str:
    """"int8"/"fp8" for a folder written by quantize_checkpoint, "none" otherwise (from the index)."""
    index = Path(folder) / DIT_INDEX
    if not index.is_file():
        return "none"
    try:
        return json.loads(index.read_text()).get("metadata", {}).get("quant", "none")
    except (OSError, ValueError, AttributeError):
        return "none"


def main(argv=None) -> int:
    import time

    parser = OneLineParser(
        prog="load_weights.py", description="Fetch the released weights into a folder (needs huggingface_hub), "
                                            "or write an 8-bit copy of a DiT / text-encoder checkpoint.")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("download", help="download the files sample.py needs into DIR")
    d.add_argument("dir", help="weights folder (sample.py's --weights)")
    d.add_argument("--models", default=",".join(DIT_MODELS),
                   help=f"comma-separated DiTs to fetch (default: all of {','.join(DIT_MODELS)})")
    q = sub.add_parser("quantize", help="write SRC (a DiT folder or the T5-Gemma folder) with 8-bit block linears to DST",
                       description="Quantize the block linears of a DiT checkpoint (any official layout) or of the "
                                   "T5-Gemma encoder to int8 or fp8 (per-output-channel scales) and write them to the "
                                   "new folder DST, which load_dit / load_text_encoder (and sample.py --quant) read "
                                   "directly. To use it in a weights folder, put DST in place of the original.")
    q.add_argument("src", help="e.g. weights/daVinci-MagiHuman/distill or weights/t5gemma-9b-9b-ul2")
    q.add_argument("dst", help="new folder to create")
    q.add_argument("--quant", choices=["int8", "fp8"], required=True, help="storage of the block linears")
    args = parser.parse_args(argv)

    def body():
        if args.command == "quantize":
            start = time.perf_counter()
            st = quantize_checkpoint(args.src, args.dst, args.quant, progress=True)
            print(f"wrote {args.dst}: {st['quantized']} of {st['tensors']} tensors in {args.quant}, "
                  f"{st['bytes_in'] / 1e9:.2f} GB -> {st['bytes_out'] / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s")
            return
        models = [m for m in args.models.split(",") if m]
        if not models:
            raise InputError("--models is empty: name at least one of " + ",".join(DIT_MODELS))
        download(args.dir, models)
        print(f"weights ready in {args.dir}")

    interrupted = {"download": "interrupted: the download stopped (run the command again to resume it)",
                   "quantize": "interrupted: nothing written"}[args.command]
    return guarded(body, user_errors=(InputError, ValueError), interrupted=lambda: interrupted)


if __name__ == "__main__":
    raise SystemExit(main())
