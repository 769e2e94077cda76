"""The project's tests: golden parity against the official code, then component tests.

Run with `python -m pytest -q test_all.py`. Everything runs on CPU in a few minutes.

Golden harness (contract in ../shared/golden/README.md): every `*.json` case in $GOLDEN_DIR
(default ../shared/golden beside the checkout) becomes one `test_golden[<case>]`. It dispatches on
the case's `kind` through GOLDEN_KINDS, loads the `w.*` tensors through load_weights.py (strict,
official key names), runs our component with every hyper-parameter read from the case's json, and
asserts every entry of `tol` (and `tol_replay` / `tol_bf16` where present) as a relative L2 error.
A kind not implemented yet is skipped with the reason "kind not implemented".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
GOLDEN_DIR = Path(os.environ.get("GOLDEN_DIR", HERE.parent / "shared" / "golden"))
GOLDEN_CASES = sorted(GOLDEN_DIR.glob("*.json"))


# ==================================================================================================
# Helpers
# ==================================================================================================


def rel_l2(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| over the whole tensor, in float64 (0/0 counts as 0)."""
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ours).all(), "non-finite values in our output"
    num, den = (ours - ref).norm().item(), ref.norm().item()
    return num / den if den > 0 else num


def check_tols(ours: dict, ref: dict, tol: dict, label: str) -> None:
    """Assert rel_l2(ours[k], ref[k]) <= tol[k] for every k in tol; every tol entry must be produced."""
    missing = [k for k in tol if k not in ours]
    assert not missing, f"{label}: outputs not produced for {missing}"
    errs = {k: rel_l2(ours[k], ref[k]) for k in tol}
    bad = {k: (e, tol[k]) for k, e in errs.items() if not e <= tol[k]}
    assert not bad, f"{label}: rel L2 over tolerance (err, tol): {bad}; all: {errs}"


def load_case(path: Path):
    from safetensors.torch import load_file

    spec = json.loads(path.read_text())
    tensors = load_file(str(path.with_suffix(".safetensors")))
    return spec, tensors


def golden_weights(tensors: dict) -> dict:
    """The `w.*` tensors under their official key names."""
    return {k[2:]: v for k, v in tensors.items() if k.startswith("w.")}


# ==================================================================================================
# Golden harness
# ==================================================================================================

GOLDEN_KINDS: dict = {}


def golden_kind(*kinds):
    """Register a runner `fn(spec, tensors)` that asserts every tolerance of a case of these kinds."""

    def register(fn):
        for k in kinds:
            GOLDEN_KINDS[k] = fn
        return fn

    return register


def test_golden_cases_present():
    assert GOLDEN_CASES, f"no golden cases found in {GOLDEN_DIR} (set GOLDEN_DIR)"


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=lambda p: p.stem)
def test_golden(case):
    spec, tensors = load_case(case)
    runner = GOLDEN_KINDS.get(spec["kind"])
    if runner is None:
        pytest.skip("kind not implemented")
    torch.manual_seed(0)
    runner(spec, tensors)


# ==================================================================================================
# Video and audio VAEs (vae.py; loaders in load_weights.py)
# ==================================================================================================

import contextlib  # noqa: E402
import math  # noqa: E402
import pickle  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402
import torch.nn.functional as F  # noqa: E402

_VAE_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def _tf32_off():
    """fp32 goldens need true fp32 convs: cuDNN TF32 alone moves the outputs by ~1e-3 (golden README)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _vae_check(spec, tensors, run, model, label):
    """fp32 run against `tol`, then (where the case gives `tol_bf16`) the bf16 path the pipeline ships."""
    model = model.to(_VAE_DEVICE)
    inputs = {k: v.to(_VAE_DEVICE) for k, v in tensors.items() if k.startswith("in.")}
    with _tf32_off():
        check_tols(run(model, inputs), tensors, spec["tol"], label)
    if "tol_bf16" in spec:
        check_tols(run(model.to(torch.bfloat16), inputs), tensors, spec["tol_bf16"], label + " (bf16)")


@golden_kind("wan_vae_encode", "wan_vae_decode")
def _golden_wan_vae(spec, tensors):
    import load_weights as lw

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "Wan2.2_VAE.pth"
        torch.save(golden_weights(tensors), path)  # the release's format: a pickled plain state dict
        model = lw.load_wan_vae(path, config=spec["config"])
    if spec["kind"] == "wan_vae_encode":
        run = lambda m, x: {"out.latent": m.encode(x["in.video"])}  # noqa: E731
    else:
        assert spec["call"].get("clamp", [-1.0, 1.0]) == [-1.0, 1.0], "Wan decode always clamps to [-1, 1]"
        run = lambda m, x: {"out.video": m.decode(x["in.latent"])}  # noqa: E731
    _vae_check(spec, tensors, run, model, spec["kind"])


def _write_turbo_ckpt(path: Path, sd: dict, extra=None):
    """A Turbo-VAED training checkpoint as the release stores it: EMA weights under `module.`, plus the
    training-only alignment heads, plus other training state."""
    ema = {"module." + k: v for k, v in sd.items()}
    for i in range(2):  # `aligned_feature_projection_heads.{0,1}.{0,1}.conv.*`, dropped by the loader
        for j in range(2):
            ema[f"module.aligned_feature_projection_heads.{i}.{j}.conv.weight"] = torch.zeros(4, 4, 1, 1, 1)
            ema[f"module.aligned_feature_projection_heads.{i}.{j}.conv.bias"] = torch.zeros(4)
    torch.save({"ema_state_dict": ema, "epoch": 3, "current_step": 340000, **(extra or {})}, path)


@golden_kind("turbo_vaed_decode")
def _golden_turbo_vaed(spec, tensors):
    import load_weights as lw

    cfg, call = spec["config"], spec["call"]
    for k in ("first_chunk_size", "step_size"):  # the windows come from the config; the call must agree
        assert call.get(k, cfg[k]) == cfg[k], f"case inconsistent: call.{k} != config.{k}"
    assert call.get("clamp") is None, "TurboVAED output is never clamped"
    with tempfile.TemporaryDirectory() as d:
        ckpt, cfg_path = Path(d) / "checkpoint-340000.ckpt", Path(d) / "TurboV3-Wan22-TinyShallow_7_7.json"
        _write_turbo_ckpt(ckpt, golden_weights(tensors))
        cfg_path.write_text(json.dumps({**cfg, "aligned_blks_indices": [0, 1]}))  # + a training-only key
        model = lw.load_turbo_vaed(cfg_path, ckpt)
    run = lambda m, x: {"out.video": m.decode(x["in.latent"])}  # noqa: E731
    _vae_check(spec, tensors, run, model, "turbo_vaed_decode")


@golden_kind("oobleck_encode", "oobleck_decode")
def _golden_oobleck(spec, tensors):
    import load_weights as lw
    from safetensors.torch import save_file

    import vae

    encode = spec["kind"] == "oobleck_encode"
    with tempfile.TemporaryDirectory() as d:
        # the release's file names and layout: the VAE under `pretransform.model.` beside the audio DiT
        weights, cfg_path = Path(d) / "model.safetensors", Path(d) / "model_config.json"
        sd = {**golden_weights(tensors), "model.model.transformer.proj_in.weight": torch.zeros(2, 2)}
        save_file(sd, str(weights))
        pretransform = {"type": "autoencoder", "config": spec["config"]["model"]}
        sao = {"model_type": "diffusion_cond", "sample_rate": spec["config"]["sample_rate"],
               "model": {"pretransform": pretransform}}  # fmt: skip
        cfg_path.write_text(json.dumps(sao))
        model = lw.load_audio_vae(d, parts=("encoder",) if encode else ("decoder",))

    def run(m, x):
        if encode:  # golden latents are in the VAE's [1, 64, L] layout; ours is [1, L, 64]
            latent = m.encode(x["in.audio"], eps=x["in.noise"]).transpose(1, 2)
            return {"out.pre_bottleneck": m.encoder(x["in.audio"]), "out.latent": latent}
        audio = m.decode(x["in.latent"].transpose(1, 2))
        return {"out.audio": audio, "out.audio_44k": torch.from_numpy(vae.resample_to_44k(audio))}

    _vae_check(spec, tensors, run, model, spec["kind"])


# ---- key tables (spec video_vae §3.9, §4.6; audio_text §1.8), written out independently of vae.py ----


def _wan_expected_keys(dim=160, dec=256, z=48) -> dict:
    keys = {}

    def conv(p, shape):
        keys[p + "weight"], keys[p + "bias"] = shape, (shape[0],)

    def rb(p, i, o):  # residual block
        keys[p + "residual.0.gamma"], keys[p + "residual.3.gamma"] = (i, 1, 1, 1), (o, 1, 1, 1)
        conv(p + "residual.2.", (o, i, 3, 3, 3))
        conv(p + "residual.6.", (o, o, 3, 3, 3))
        if i != o:
            conv(p + "shortcut.", (o, i, 1, 1, 1))

    def att(p, c):
        keys[p + "norm.gamma"] = (c, 1, 1)
        conv(p + "to_qkv.", (3 * c, c, 1, 1))
        conv(p + "proj.", (c, c, 1, 1))

    e = [dim, dim, 2 * dim, 4 * dim, 4 * dim]
    conv("encoder.conv1.", (dim, 12, 3, 3, 3))
    for s in range(4):
        rb(f"encoder.downsamples.{s}.downsamples.0.", e[s], e[s + 1])
        rb(f"encoder.downsamples.{s}.downsamples.1.", e[s + 1], e[s + 1])
        if s < 3:
            conv(f"encoder.downsamples.{s}.downsamples.2.resample.1.", (e[s + 1], e[s + 1], 3, 3))
        if s in (1, 2):
            conv(f"encoder.downsamples.{s}.downsamples.2.time_conv.", (e[s + 1], e[s + 1], 3, 1, 1))
    rb("encoder.middle.0.", e[4], e[4]), att("encoder.middle.1.", e[4]), rb("encoder.middle.2.", e[4], e[4])
    keys["encoder.head.0.gamma"] = (e[4], 1, 1, 1)
    conv("encoder.head.2.", (2 * z, e[4], 3, 3, 3))
    conv("conv1.", (2 * z, 2 * z, 1, 1, 1))
    conv("conv2.", (z, z, 1, 1, 1))
    d = [4 * dec, 4 * dec, 4 * dec, 2 * dec, dec]
    conv("decoder.conv1.", (d[0], z, 3, 3, 3))
    rb("decoder.middle.0.", d[0], d[0]), att("decoder.middle.1.", d[0]), rb("decoder.middle.2.", d[0], d[0])
    for s in range(4):
        for r in range(3):
            rb(f"decoder.upsamples.{s}.upsamples.{r}.", d[s] if r == 0 else d[s + 1], d[s + 1])
        if s < 3:
            conv(f"decoder.upsamples.{s}.upsamples.3.resample.1.", (d[s + 1], d[s + 1], 3, 3))
        if s < 2:
            conv(f"decoder.upsamples.{s}.upsamples.3.time_conv.", (2 * d[s + 1], d[s + 1], 3, 1, 1))
    keys["decoder.head.0.gamma"] = (dec, 1, 1, 1)
    conv("decoder.head.2.", (12, dec, 3, 3, 3))
    return keys


def _turbo_expected_keys() -> dict:
    keys = {}

    def conv(p, o, i, k=(3, 3, 3)):
        keys[f"decoder.{p}.conv.weight"], keys[f"decoder.{p}.conv.bias"] = (o, i, *k), (o,)

    def res(p, i, o):
        conv(p + ".conv1", o, i)
        conv(p + ".conv2", o, o)
        if i != o:
            conv(p + ".conv_shortcut", o, i, (1, 1, 1))

    conv("conv_in", 512, 48)
    for r in range(3):
        res(f"mid_block.resnets.{r}", 512, 512)
    # (block, in, out, number of resnets, has time_conv, has an upsampler)
    for b, i, o, n, tconv, up in [(0, 512, 512, 3, True, True), (1, 512, 256, 2, True, True),
                                  (2, 256, 128, 2, False, True), (3, 128, 64, 2, False, False)]:  # fmt: skip
        if i != o:
            res(f"up_blocks.{b}.conv_in", i, o)
        if tconv:
            conv(f"up_blocks.{b}.upsamplers.0.time_conv", 2 * o, o, (3, 1, 1))
        if up:
            p = f"decoder.up_blocks.{b}.upsamplers.0.resample.1."
            keys[p + "weight"], keys[p + "bias"] = (o, o, 3, 3), (o,)
        for r in range(n):
            res(f"up_blocks.{b}.resnets.{r}", o, o)
    conv("conv_out", 12, 64)
    return keys


def _oobleck_expected_keys(ch=128, mults=(1, 1, 2, 4, 8, 16), strides=(2, 4, 4, 8, 8)) -> dict:
    keys = {}

    def wn(p, o, i, k, bias=True):
        keys[p + "weight_g"], keys[p + "weight_v"] = (o, 1, 1), (o, i, k)
        if bias:
            keys[p + "bias"] = (o,)

    def snake(p, c):
        keys[p + "alpha"], keys[p + "beta"] = (c,), (c,)

    def units(p, c):
        for r in range(3):
            snake(f"{p}.layers.{r}.layers.0.", c), wn(f"{p}.layers.{r}.layers.1.", c, c, 7)
            snake(f"{p}.layers.{r}.layers.2.", c), wn(f"{p}.layers.{r}.layers.3.", c, c, 1)

    c = [ch * m for m in mults]
    wn("encoder.layers.0.", c[0], 2, 7)
    for b in range(1, 6):
        units(f"encoder.layers.{b}", c[b - 1])
        snake(f"encoder.layers.{b}.layers.3.", c[b - 1])
        wn(f"encoder.layers.{b}.layers.4.", c[b], c[b - 1], 2 * strides[b - 1])
    snake("encoder.layers.6.", c[5]), wn("encoder.layers.7.", 128, c[5], 3)
    wn("decoder.layers.0.", c[5], 64, 7)
    for b in range(1, 6):
        cin, cout, s = c[6 - b], c[5 - b], strides[5 - b]
        snake(f"decoder.layers.{b}.layers.0.", cin)
        # transposed conv: v is [in, out, k] and g [in, 1, 1]; its bias is per output channel
        keys[f"decoder.layers.{b}.layers.1.weight_g"] = (cin, 1, 1)
        keys[f"decoder.layers.{b}.layers.1.weight_v"] = (cin, cout, 2 * s)
        keys[f"decoder.layers.{b}.layers.1.bias"] = (cout,)
        for r in range(3):
            p = f"decoder.layers.{b}.layers.{r + 2}.layers."
            snake(p + "0.", cout), wn(p + "1.", cout, cout, 7)
            snake(p + "2.", cout), wn(p + "3.", cout, cout, 1)
    snake("decoder.layers.6.", c[0]), wn("decoder.layers.7.", 2, c[0], 7, bias=False)
    return keys


def _shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_vae_key_tables_released_configs():
    """Released configs built on meta: exact key sets and shapes, counts and parameter totals of the spec."""
    import vae

    with torch.device("meta"):
        wan, turbo, audio = vae.WanVAE(), vae.TurboVAED(), vae.OobleckVAE()
    wan_keys, turbo_keys, audio_keys = _shapes(wan), _shapes(turbo), _shapes(audio)
    assert wan_keys == _wan_expected_keys()
    assert sum(k.startswith("encoder.") for k in wan_keys) == 84
    assert sum(k.startswith("decoder.") for k in wan_keys) == 108
    assert len(wan_keys) == 196 and sum(p.numel() for p in wan.parameters()) == 704_688_668
    assert sum(p.numel() for p in wan.encoder.parameters()) == 149_627_776
    assert sum(p.numel() for p in wan.decoder.parameters()) == 555_049_228
    assert turbo_keys == _turbo_expected_keys() and len(turbo_keys) == 80
    assert sum(p.numel() for p in turbo.parameters()) == 107_122_892
    assert audio_keys == _oobleck_expected_keys() and len(audio_keys) == 365
    assert sum(k.startswith("encoder.") for k in audio_keys) == 183
    assert sum(p.numel() for p in audio.parameters()) == 156_112_514
    assert sum(p.numel() for p in audio.encoder.parameters()) == 77_989_888


def test_vae_strict_loading_names_key_and_file(tmp_path):
    """A missing, an extra and a mis-shaped key each stop the load with the key and the file named;
    the 8 alignment heads and the `module.` prefix are handled; a json missing nothing loads."""
    import load_weights as lw
    import vae

    cfg = vae.TurboVAEDConfig.tiny()
    sd = vae.TurboVAED(cfg).state_dict()
    cfg_path = tmp_path / "turbo.json"
    widths = list(cfg.decoder_block_out_channels)
    cfg_path.write_text(json.dumps({"decoder_block_out_channels": widths, "_class_name": "TurboVAED"}))
    good = tmp_path / "good.ckpt"
    _write_turbo_ckpt(good, sd)
    model = lw.load_turbo_vaed(cfg_path, good)
    assert torch.equal(model.decoder.conv_out.conv.weight, sd["decoder.conv_out.conv.weight"])
    broken = dict(sd)
    del broken["decoder.conv_in.conv.bias"]
    broken["decoder.extra.weight"] = torch.zeros(1)
    broken["decoder.conv_out.conv.weight"] = torch.zeros(3, 3, 3, 3, 3)
    bad = tmp_path / "bad.ckpt"
    _write_turbo_ckpt(bad, broken)
    with pytest.raises(lw.CheckpointError) as e:
        lw.load_turbo_vaed(cfg_path, bad)
    msg = str(e.value)
    assert str(bad) in msg and "decoder.conv_in.conv.bias" in msg and "decoder.extra.weight" in msg
    assert "decoder.conv_out.conv.weight has shape (3, 3, 3, 3, 3)" in msg
    no_ema = tmp_path / "no_ema.ckpt"
    torch.save({"state_dict": sd}, no_ema)
    with pytest.raises(lw.CheckpointError, match="ema_state_dict"):
        lw.load_turbo_vaed(cfg_path, no_ema)


class _NotATensor:
    """A pickled object that is neither a tensor nor a container: must never be unpickled."""

    def __reduce__(self):
        return (print, ("unpickling ran code",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the plain-pickle file, before it is refused
def test_vae_ckpt_with_pickled_object_is_refused(tmp_path):
    import load_weights as lw
    import vae

    cfg_path = tmp_path / "turbo.json"
    cfg_path.write_text(json.dumps({"decoder_block_out_channels": [8, 12, 16, 24]}))
    sd = vae.TurboVAED(vae.TurboVAEDConfig.tiny()).state_dict()
    with_obj = tmp_path / "with_object.ckpt"
    _write_turbo_ckpt(with_obj, sd, extra={"sampler_state": _NotATensor()})
    plain = tmp_path / "plain_pickle.ckpt"
    plain.write_bytes(pickle.dumps({"ema_state_dict": _NotATensor()}))
    for path in (with_obj, plain):
        with pytest.raises(lw.CheckpointError, match="refused to load") as e:
            lw.load_turbo_vaed(cfg_path, path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_vae_shape_rules_released_configs():
    """spec video_vae §7.2 on the meta device (shapes only, released widths)."""
    import vae

    with torch.device("meta"):
        wan, turbo = vae.WanVAE(), vae.TurboVAED()
    for t in (1, 5, 7, 9, 13):  # 7 frames -> 2 latents: trailing frames are dropped (official)
        video = torch.empty(1, 3, t, 32, 48, device="meta")
        assert wan.encode(video).shape == (1, 48, 1 + (t - 1) // 4, 2, 3)
    for t in (1, 2, 4):
        assert wan.decode(torch.empty(1, 48, t, 2, 3, device="meta")).shape == (1, 3, 4 * (t - 1) + 1, 32, 48)
    for n in (2, 8, 9):  # one decoder call: 4n - 3 frames for a first window, 4n otherwise
        z = torch.empty(1, 48, n, 1, 2, device="meta")
        assert turbo.decoder(z, first_chunk=True).shape == (1, 3, 4 * n - 3, 16, 32)
        assert turbo.decoder(z, first_chunk=False).shape == (1, 3, 4 * n, 16, 32)
    for n in (1, 5, 7, 8, 14, 15, 21, 22, 26, 63):
        video = turbo.decode(torch.empty(1, 48, n, 1, 1, device="meta"))
        assert video.shape == (1, 3, 4 * (n - 1) + 1, 16, 16)
    with pytest.raises(ValueError, match="multiples of 16"):
        wan.encode(torch.empty(1, 3, 1, 40, 48, device="meta"))
    with pytest.raises(ValueError, match="expects"):
        turbo.decode(torch.empty(1, 16, 3, 2, 2, device="meta"))


def test_vae_patchify_order():
    """spec video_vae §2.2 / §7.3: pixel (c, 2i+dy, 2j+dx) <-> channel 4c + 2dx + dy; exact inverses."""
    import vae

    assert vae.unpatchify(torch.arange(4.0).view(1, 4, 1, 1, 1))[0, 0, 0].tolist() == [[0, 2], [1, 3]]
    x = torch.randn(1, 3, 2, 4, 6)
    p = vae.patchify(x)
    assert p.shape == (1, 12, 2, 2, 3) and torch.equal(vae.unpatchify(p), x)
    c, i, j, dy, dx = 2, 1, 2, 1, 0
    assert p[0, 4 * c + 2 * dx + dy, 1, i, j] == x[0, c, 1, 2 * i + dy, 2 * j + dx]


def _tiny_wan():
    import vae

    torch.manual_seed(0)
    model = vae.WanVAE(vae.WanVAEConfig(dim=4, dec_dim=4)).eval()
    with torch.no_grad():  # random RMS gammas, so a wrong gamma broadcast would show
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    return model


def test_wan_decode_causal_and_full_sequence():
    """spec video_vae §7.4-5: one-latent-at-a-time (official) == one call over all latents (§3.6), and a
    prefix of latents decodes to the prefix of the frames. Both are exact up to float reassociation
    (~1e-7 relative in fp32); a cache bug gives O(1) differences, hence 1e-5."""
    model = _tiny_wan()
    z = torch.randn(1, 48, 4, 2, 3)
    full = model.decode(z)
    assert rel_l2(model.decode(z, frames_per_chunk=4), full) < 1e-5
    assert rel_l2(model.decode(z, frames_per_chunk=3), full) < 1e-5
    for k in (1, 2, 3):
        assert rel_l2(model.decode(z[:, :, :k]), full[:, :, : 4 * (k - 1) + 1]) < 1e-5


def test_turbo_decode_is_not_causal():
    """spec video_vae §7.5 the other way round: Turbo's windows and end padding see the future."""
    import vae

    torch.manual_seed(0)
    model = vae.TurboVAED(vae.TurboVAEDConfig.tiny()).eval()
    z = torch.randn(1, 48, 10, 1, 1)
    assert rel_l2(model.decode(z[:, :, :8]), model.decode(z)[:, :, :29]) > 1e-3


def test_vae_time_sliced_convs_match(monkeypatch):
    """The 1080p memory guards (conv3d cut along time, Turbo norms in slices) change no number: forced
    onto tiny inputs they agree with the one-call path up to float reassociation (~1e-6 after ~40 fp32
    layers; a wrong slice boundary is O(1))."""
    import vae

    wan = _tiny_wan()
    torch.manual_seed(1)
    turbo = vae.TurboVAED(vae.TurboVAEDConfig.tiny()).eval()
    z = torch.randn(1, 48, 3, 1, 2)
    ref_wan, ref_turbo = wan.decode(z, frames_per_chunk=3), turbo.decode(z)
    monkeypatch.setattr(vae, "CONV3D_MAX_ELEMENTS", 20000)  # a few frames per conv call at the widest layers
    monkeypatch.setattr(vae, "_NORM_SLICE_ELEMENTS", 5000)
    assert rel_l2(wan.decode(z, frames_per_chunk=3), ref_wan) < 1e-5
    assert rel_l2(turbo.decode(z), ref_turbo) < 1e-5


def _encode_image_2d(model, image):
    """spec video_vae §3.7, written independently: one frame through the encoder as 2-D ops (each 3x3x3
    causal conv = its last temporal tap, time convs unused, AvgDown3D(ft=2) = zeros / 2x2 avg pool)."""
    import vae

    def conv(c, x):
        w = c.weight[:, :, -1]
        return F.conv2d(x, w, c.bias, padding=w.shape[-1] // 2)

    def norm(n, x):
        return F.normalize(x, dim=1) * n.gamma.shape[0] ** 0.5 * n.gamma.view(1, -1, 1, 1)

    def rb(b, x):
        r = b.residual
        h = conv(r[6], F.silu(norm(r[3], conv(r[2], F.silu(norm(r[0], x))))))
        return h + (conv(b.shortcut, x) if isinstance(b.shortcut, torch.nn.Conv3d) else x)

    def attn(a, x):
        b, c, h, w = x.shape
        q, k, v = a.to_qkv(norm(a.norm, x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)
        y = torch.softmax(q @ k.transpose(1, 2) / c**0.5, dim=-1) @ v
        return a.proj(y.transpose(1, 2).reshape(b, c, h, w)) + x

    enc = model.encoder
    x = conv(enc.conv1, vae.patchify(image[:, :, None])[:, :, 0])
    for stage in enc.downsamples:
        s = F.avg_pool2d(x, 2) if stage.avg_shortcut.fs == 2 else x
        if stage.avg_shortcut.ft == 2:  # channel 2c: the zero frame padded in front; 2c+1: the image
            s = torch.stack([torch.zeros_like(s), s], dim=2).flatten(1, 2)
        for m in stage.downsamples:
            x = m.resample[1](F.pad(x, (0, 1, 0, 1))) if isinstance(m, vae.Resample) else rb(m, x)
        x = x + s
    x = rb(enc.middle[2], attn(enc.middle[1], rb(enc.middle[0], x)))
    x = conv(model.conv1, conv(enc.head[2], F.silu(norm(enc.head[0], x))))[:, :48]
    mean, inv_std = vae.latent_stats(torch.float32, "cpu")
    return ((x[:, :, None] - mean) * inv_std)


def test_wan_single_image_encode_equals_2d_recipe():
    """Float reassociation only (~1e-7); a wrong tap, pad side or shortcut order gives >1e-2."""
    model = _tiny_wan()
    image = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        assert rel_l2(model.encode_image(image), _encode_image_2d(model, image)) < 1e-5


def test_image_to_tensor_crop_and_resize():
    """spec sampling §5: 1280x720 -> 448x256 crops (10, 0, 1270, 720) then one LANCZOS resize."""
    from PIL import Image

    import vae

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (720, 1280, 3), dtype=np.uint8))
    expected = img.crop((10, 0, 1270, 720)).resize((448, 256), Image.Resampling.LANCZOS)
    expected = np.asarray(expected, np.float32)
    out = vae.image_to_tensor(img, 256, 448)
    assert out.shape == (1, 3, 256, 448) and out.dtype == torch.float32
    assert torch.equal(out[0].permute(1, 2, 0), torch.from_numpy(2.0 * (expected / 255.0) - 1.0))


class _Draws:
    """A noise source like the pipeline's (`randn(shape, name)`), logging what was drawn."""

    def __init__(self, seed):
        self.gen, self.log = torch.Generator().manual_seed(seed), []

    def randn(self, shape, name):
        self.log.append((name, tuple(shape)))
        return torch.randn(shape, generator=self.gen)


def test_oobleck_a2v_long_audio_chunking():
    """spec sampling §6 / audio_text §2.3 with a small window: chunks every window/2, zero-padded tail,
    own noise per chunk in order, cross-fade merge (re-done here as the official per-frame loop),
    ceil trim; the short path floors. Same ops on the same values: 1e-6 covers float reassociation."""
    import vae

    torch.manual_seed(0)
    model = vae.OobleckVAE(vae.OobleckConfig.tiny()).eval()
    hop, window = 2048, 5 * 2048  # 5 latents per window (odd, like the released 725): overlap 2, step 3
    audio = torch.randn(2 * window + 3000) * 0.3
    draws = _Draws(7)
    got = model.encode_a2v(audio, noise=draws, window=window)
    assert got.shape == (1, math.ceil(audio.shape[0] / hop), 64)
    assert draws.log == [("audio_posterior", (1, 64, 5))] * 4  # one draw per chunk, VAE layout

    gen, feats = torch.Generator().manual_seed(7), []
    for start in range(0, audio.shape[0], window // 2):
        chunk = torch.zeros(window)
        piece = audio[start : start + window]
        chunk[: piece.shape[0]] = piece
        eps = torch.randn(1, 64, 5, generator=gen)
        feats.append(model.encode(chunk[None, None].expand(1, 2, -1), eps=eps))
        if start + window >= audio.shape[0]:
            break
    assert len(feats) == 4
    n = feats[0].shape[1]
    overlap, step = int(n * 0.5), n - int(n * 0.5)
    out = torch.zeros(1, (len(feats) - 1) * step + n, 64)
    out[:, :n] = feats[0]
    for k, f in enumerate(feats[1:], start=1):
        s = k * step
        out[:, s + overlap : s + n] = f[:, overlap:]
        for j in range(overlap):
            out[:, s + j] = (overlap - j) / overlap * out[:, s + j] + j / overlap * f[:, j]
    assert rel_l2(got, out[:, : got.shape[1]]) < 1e-6

    short = audio[: window - 100]
    assert model.encode_a2v(short, window=window).shape == (1, short.shape[0] // hop, 64)


def test_oobleck_decode_lengths_and_resample():
    """25 latents/s convention: N latents -> 2048 N samples at 51.2 kHz -> 1764 N at 44.1 kHz."""
    import vae

    torch.manual_seed(0)
    model = vae.OobleckVAE(vae.OobleckConfig.tiny(), parts=("decoder",)).eval()
    wave = model.decode(torch.randn(1, 3, 64))
    assert wave.shape == (1, 2, 3 * 2048)
    out = vae.resample_to_44k(wave)
    assert out.shape == (3 * 1764, 2) and out.dtype == np.float32
    with pytest.raises(ValueError, match="without its encoder"):
        model.encode(torch.zeros(1, 2, 4096))
    with pytest.raises(ValueError, match="expects"):
        model.decode(torch.zeros(1, 64, 3, 1))
