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
# Sampling (sample.py, sr.py): schedules, the loops, noise order, the SR stage
# ==================================================================================================

import hashlib
import re

import load_weights
import sample
import sr


def _noise_list(spec, tensors):
    """call.noise_order ("in.noise_step_video[3]", ...) -> (tensors in draw order, our draw names)."""
    draws, names = [], []
    for entry in spec["call"]["noise_order"]:
        m = re.fullmatch(r"(in\.noise_(\w+?))(?:\[(\d+)\])?", entry)
        assert m, f"unexpected noise_order entry {entry!r}"
        t = tensors[m.group(1)]
        draws.append(t[int(m.group(3))] if m.group(3) is not None else t)
        names.append(m.group(2))
    return draws, names


class _ReplayDiT:
    """Stand-in DiT: call k returns the recorded (cond, uncond, cond, ...) outputs and logs its inputs."""

    def __init__(self, tensors, cfg_number):
        n = tensors["out.step_vc_video"].shape[0]
        self.outs = []
        for i in range(n):
            self.outs.append((tensors["out.step_vc_video"][i], tensors["out.step_vc_audio"][i]))
            if cfg_number == 2:
                self.outs.append((tensors["out.step_vu_video"][i], tensors["out.step_vu_audio"][i]))
        self.calls = []

    def __call__(self, video, audio, text, text_len):
        k = len(self.calls)
        assert k < len(self.outs), f"DiT called more than the {len(self.outs)} recorded times"
        self.calls.append((video.clone(), audio.clone(), text, int(text_len[0])))
        return self.outs[k][0].clone(), self.outs[k][1].clone()


def _sample_cfg(call, sr_case: bool) -> sample.SampleConfig:
    """Our SampleConfig from a case's `call` (every setting read from the json)."""
    if sr_case:
        return sample.SampleConfig(
            shift=call["shift"], sr_num_inference_steps=call["sr_num_inference_steps"],
            sr_cfg_number=call["sr_cfg_number"], sr_video_txt_guidance_scale=call["sr_video_txt_guidance_scale"],
            use_cfg_trick=call["use_cfg_trick"], cfg_trick_start_frame=call["cfg_trick_start_frame"],
            cfg_trick_value=call["cfg_trick_value"], noise_value=call["noise_value"],
            sr_audio_noise_scale=call["sr_audio_noise_scale"])
    kw = dict(shift=call["shift"], num_inference_steps=call["num_inference_steps"], cfg_number=call["cfg_number"])
    for k in ("video_txt_guidance_scale", "audio_txt_guidance_scale"):
        if k in call:
            kw[k] = call[k]
    return sample.SampleConfig(**kw)


def _run_sampling_case(spec, tensors, dit):
    """Run the case's pass with `dit` and replayed noise; returns (outputs dict, trace, noise log)."""
    call = spec["call"]
    sr_case = spec["kind"] == "sample_sr"
    cfg = _sample_cfg(call, sr_case)
    draws, names = _noise_list(spec, tensors)
    noise = sample.Noise.replay(draws)
    n_cfg = cfg.sr_cfg_number if sr_case else cfg.cfg_number
    text_null = tensors.get("in.text_null") if n_cfg == 2 else None
    text_null_len = tensors.get("in.text_null_len") if n_cfg == 2 else None
    image = tensors.get("in.image_latent") if call["ti2v"] else None
    trace = {}
    if sr_case:
        video, audio = sr.sr_pass(
            dit, cfg, tensors["in.br_video"], tensors["in.br_audio"], tensors["in.text"], tensors["in.text_len"],
            text_null, text_null_len, sr_latent_hw=tuple(call["sr_latent_hw"]), noise=noise,
            image_latent=image, trace=trace, progress=False)
    else:
        audio_latent = tensors["in.audio_clean"] if call["is_a2v"] else None
        num_frames = call["audio_len"]
        # Independent check of the latent-length rule against the recorded T.
        assert sample.latent_length(num_frames) == call["latent_T"]
        video, audio = sample.base_pass(
            dit, cfg, tensors["in.text"], tensors["in.text_len"], text_null, text_null_len,
            num_frames=num_frames, latent_hw=tuple(call["latent_hw"]), noise=noise,
            image_latent=image, audio_latent=audio_latent, trace=trace, progress=False)
    assert noise._queue == [], f"{len(noise._queue)} given noise tensor(s) never drawn"
    assert [n for n, _ in noise.log] == names, f"draw order {[n for n, _ in noise.log]} != official {names}"
    ours = {"out.video": video, "out.audio": audio}
    for k, v in trace.items():
        ours[f"out.{k}" if k.startswith("sr_in") else f"out.step_{k}"] = torch.stack(v) if isinstance(v, list) else v
    return ours


@golden_kind("sample_base", "sample_distill", "sample_ti2v", "sample_a2v", "sample_sr")
def _golden_sampling(spec, tensors):
    call, label = spec["call"], spec["kind"]
    n_cfg = call["sr_cfg_number"] if label == "sample_sr" else call["cfg_number"]
    # 1) Replay: the recorded DiT outputs in place of a DiT isolate the sampler (tol_replay).
    stub = _ReplayDiT(tensors, n_cfg)
    ours = _run_sampling_case(spec, tensors, stub)
    assert len(stub.calls) == len(stub.outs), f"DiT called {len(stub.calls)} times, recorded {len(stub.outs)}"
    per_step = [c[3] for c in stub.calls[:n_cfg]]
    assert per_step == call["dit_text_lens_per_step"], f"text lengths per step {per_step}"
    for j, (v, a, text, L) in enumerate(stub.calls):
        ref = tensors["in.text"] if j % n_cfg == 0 else tensors["in.text_null"]
        assert torch.equal(text[:, :L], ref[:, :L]), f"call {j}: wrong text context"
        if j % n_cfg:  # the uncond pass sees exactly the cond pass's latents
            assert torch.equal(v, stub.calls[j - 1][0]) and torch.equal(a, stub.calls[j - 1][1])
    check_tols(ours, tensors, spec["tol_replay"], f"{label} replay")
    # 2) Own DiT (model.py): float32 against out32.*, the shipped bf16 path against out.*.
    if not hasattr(load_weights, "dit_from_state_dict"):
        pytest.skip("replay passed; the own-DiT check needs model.py / load_weights.dit_from_state_dict")
    from model import DiTConfig

    dcfg = DiTConfig(**spec["config"], coords_style=call["coords_style"],
                     frame_receptive_field=call["frame_receptive_field"])
    for prefix, dtype in (("out32.", torch.float32), ("out.", torch.bfloat16)):
        dit = load_weights.dit_from_state_dict(golden_weights(tensors), dcfg, source=f"{label} golden",
                                               block_dtype=dtype)
        with torch.no_grad():
            got = _run_sampling_case(spec, tensors, dit)
        tol = {k: v for k, v in spec["tol"].items() if k.startswith(prefix)}
        check_tols({prefix + k[4:]: v for k, v in got.items()}, tensors, tol, f"{label} own DiT {dtype}")


@golden_kind("unipc_schedule")
def _golden_unipc_schedule(spec, tensors):
    call, ours = spec["call"], {}
    # Schedules: "timesteps_32/sigmas_32": "N=32 shift 5 (base)".
    for names, text in call["schedules"].items():
        m = re.search(r"N=(\d+) shift ([\d.]+)", text)
        assert m, f"cannot read steps/shift from {text!r}"
        ts, sig = sample.flow_schedule(int(m.group(1)), float(m.group(2)))
        t_name, s_name = names.split("/")
        ours["out." + t_name], ours["out." + s_name] = ts, sig
        assert ts.dtype == torch.int64 and sig.dtype == torch.float32
    ours["out.zero_snr"] = sample.zero_snr_table()
    # Trajectories on the closed-form velocity v(x, t) = x @ M + float32(t) / 1000 * u.
    M, u = tensors["in.M"], tensors["in.u"]
    for name, tr in call["trajectories"].items():
        sched = sample.FlowUniPC(tr["steps"], tr["shift"])
        x, traj = tensors["in.x_init"].clone(), [tensors["in.x_init"]]
        for i, t in enumerate(sched.timesteps.tolist()):
            v = x @ M + (torch.tensor(t, dtype=torch.float32) / 1000) * u
            if tr["method"].startswith("step_ddim"):
                x = sample.step_ddim(sched.sigmas, i, v, x, tensors["in.ddim8_noise"][i])
            else:
                x = sched.step(v, x)
            traj.append(x)
        ours[f"out.{name}_traj"] = torch.stack(traj)
    check_tols(ours, tensors, spec["tol"], "unipc_schedule")
    # Timesteps must be exactly equal (tol 0 above is already exact; dtypes too).
    for k in spec["tol"]:
        if k.startswith("out.timesteps"):
            assert torch.equal(ours[k], tensors[k]), k


class _ConstDiT:
    """Stand-in DiT with constant outputs: cond = (1, 1), uncond = (0, 0), so the guided v = scale."""

    def __init__(self):
        self.n = 0

    def __call__(self, video, audio, text, text_len):
        self.n += 1
        c = 1.0 if int(text_len[0]) == 5 else 0.0  # text_len 5 marks the cond pass in these tests
        return torch.full_like(video, c), torch.full_like(audio, c)


def _tiny_text():
    return torch.zeros(1, 8, 4), torch.tensor([5]), torch.zeros(1, 8, 4), torch.tensor([7])


def test_latent_sizes_follow_spec():
    # Worked examples of spec §3: sizes floor to multiples of 32 px (even latents).
    assert sample.latent_size(480, 272) == (16, 30)
    assert sample.latent_size(448, 256) == (16, 28)
    assert sample.latent_size(896, 512) == (32, 56)
    assert sample.latent_size(1920, 1088) == (68, 120)
    assert sample.latent_size(500, 300) == (18, 30)  # 300 // 16 = 18, 500 // 16 = 31 -> 30
    assert sample.num_frames_for(4) == 101 and sample.latent_length(101) == 26
    assert sample.latent_length(100) == 25  # A2V, 4 s of audio
    with pytest.raises(ValueError, match="too small"):
        sample.latent_size(16, 256)
    with pytest.raises(ValueError, match="seconds"):
        sample.num_frames_for(0)


def test_noise_default_matches_official_seeding():
    # Official: torch.manual_seed(seed) then randn draws in order. Ours: a private generator (CPU here).
    torch.manual_seed(123)
    ref = [torch.randn(1, 9, 64), torch.randn(1, 48, 3, 4, 6)]
    state = torch.get_rng_state()
    n = sample.Noise(seed=123)
    got = [n.randn((1, 9, 64), "audio_init"), n.randn((1, 48, 3, 4, 6), "video_init")]
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert torch.equal(torch.get_rng_state(), state), "Noise must not touch the global RNG"


def test_noise_replay_rejects_wrong_shape_and_extra_draws():
    n = sample.Noise.replay([torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="shape"):
        n.randn((3, 2), "x")
    n = sample.Noise.replay([])
    with pytest.raises(ValueError, match="past the end"):
        n.randn((1,), "x")


def _draw_log(cfg, **kw):
    noise = sample.Noise(seed=0)
    text, tl, tn, tnl = _tiny_text()
    sample.base_pass(_ConstDiT(), cfg, text, tl, tn, tnl, num_frames=5, latent_hw=(2, 2), noise=noise,
                     progress=False, **kw)
    return noise.log


def test_noise_order_t2v_distill_a2v():
    A, V = (1, 5, 64), (1, 48, 2, 2, 2)
    base = sample.SampleConfig(num_inference_steps=3)
    assert _draw_log(base) == [("audio_init", A), ("video_init", V)]  # audio first; UniPC draws nothing
    distill = sample.preset("distill", num_inference_steps=2)
    steps = [("step_video", V), ("step_audio", A)] * 2  # video then audio, at every step incl. the last
    assert _draw_log(distill) == [("audio_init", A), ("video_init", V)] + steps
    # A2V: no audio init draw; the distilled step still renoises the given audio (pitfall 7).
    assert _draw_log(distill, audio_latent=torch.zeros(A)) == [("video_init", V)] + steps


def test_a2v_audio_fixed_under_unipc_but_stepped_by_ddim():
    text, tl, tn, tnl = _tiny_text()
    given = torch.randn(1, 5, 64)
    for cfg, fixed in ((sample.SampleConfig(num_inference_steps=3), True), (sample.preset("distill"), False)):
        _, audio = sample.base_pass(_ConstDiT(), cfg, text, tl, tn, tnl, num_frames=5, latent_hw=(2, 2),
                                    noise=sample.Noise(seed=1), audio_latent=given, progress=False)
        assert torch.equal(audio, given) == fixed


def test_base_video_guidance_switch_32_steps():
    # Spec §8.1: with 32 steps, indices 0-26 (t >= 535) use 5.0, indices 27-31 (t <= 480) use 2.0;
    # audio stays at 5.0. With cond = 1 and uncond = 0 the guided velocity equals the scale.
    text, tl, tn, tnl = _tiny_text()
    trace = {}
    sample.base_pass(_ConstDiT(), sample.SampleConfig(), text, tl, tn, tnl, num_frames=5, latent_hw=(2, 2),
                     noise=sample.Noise(seed=0), trace=trace, progress=False)
    g_video = [float(v.flatten()[0]) for v in trace["vg_video"]]
    g_audio = [float(v.flatten()[0]) for v in trace["vg_audio"]]
    assert g_video == [5.0] * 27 + [2.0] * 5 and g_audio == [5.0] * 32
    # The comparison is strict (pitfall 2); no schedule above lands on t = 500 itself.
    cfg = sample.SampleConfig()
    assert sample.base_video_guidance(500, cfg) == 2.0 and sample.base_video_guidance(501, cfg) == 5.0


def test_ti2v_frame0_pinned_and_bad_cfg_number():
    text, tl, tn, tnl = _tiny_text()
    img = torch.randn(1, 48, 1, 2, 2)
    trace = {}
    video, _ = sample.base_pass(_ConstDiT(), sample.SampleConfig(num_inference_steps=4), text, tl, tn, tnl,
                                num_frames=9, latent_hw=(2, 2), noise=sample.Noise(seed=0), image_latent=img,
                                trace=trace, progress=False)
    assert torch.equal(video[:, :, :1], img) and all(torch.equal(x[:, :, :1], img) for x in trace["x_video"])
    assert not torch.equal(video[:, :, 1:2], img)
    with pytest.raises(ValueError, match="cfg_number"):
        sample.base_pass(_ConstDiT(), sample.SampleConfig(cfg_number=3), text, tl, tn, tnl, num_frames=5,
                         latent_hw=(2, 2), noise=sample.Noise(seed=0), progress=False)


def test_unipc_last_step_is_x0_prediction():
    # Pitfall 3 / §7.4: the final UniPC output is exactly x_{N-1} - sigma_{N-1} * v_{N-1}.
    for n in (1, 2, 3, 5):
        s = sample.FlowUniPC(n, 5.0)
        x = torch.randn(2, 3)
        for i in range(n):
            v = torch.randn(2, 3)
            x_last, v_last = x, v
            x = s.step(v, x)
        assert torch.allclose(x, x_last - s.sigmas[n - 1] * v_last, rtol=0, atol=1e-6)


def test_zero_snr_values_and_negative_prompt():
    S = sample.zero_snr_table()
    # Spec §8.3 values (printed there to 6 digits, hence the tolerance).
    assert abs(S[220].item() - 0.838910) < 2e-6 and abs((1 - S[220] ** 2).sqrt().item() - 0.544270) < 2e-6
    assert abs(S[0].item() - 0.9995749) < 1e-6 and S[999].item() == 0.0
    p = sample.NEGATIVE_PROMPT
    assert len(p) == 1719
    assert hashlib.sha256(p.encode()).hexdigest() == "4515a21f8d125d12e5a42b23e65bb09f46ea9817567f1834ad556e8cd1852c4b"


def test_sr_settings_guidance_and_draws():
    loc = sr.sr_dit_settings("sr_1080p")["local_attn_layers"]
    assert len(loc) == 32 and sorted(set(range(40)) - set(loc)) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert sr.sr_dit_settings("sr_540p") == dict(coords_style="v1", frame_receptive_field=11, local_attn_layers=[])
    cfg = sample.SampleConfig()
    assert sr.sr_video_guidance(15, cfg).flatten().tolist() == [2.0] * 13 + [3.5] * 2
    assert sr.sr_video_guidance(4, sample.SampleConfig(use_cfg_trick=False)).flatten().tolist() == [3.5] * 4
    # Official SR examples: sr_cfg_number 1 -> cond only, UniPC video, base audio returned, 2 draws.
    text, tl, _, _ = _tiny_text()
    br_v, br_a = torch.randn(1, 48, 2, 2, 2), torch.randn(1, 5, 64)
    noise, dit = sample.Noise(seed=0), _ConstDiT()
    v, a = sr.sr_pass(dit, sample.preset("sr_540p"), br_v, br_a, text, tl, sr_latent_hw=(4, 6), noise=noise,
                      progress=False)
    assert v.shape == (1, 48, 2, 4, 6) and torch.equal(a, br_a) and dit.n == 5
    assert noise.log == [("sr_video", (1, 48, 2, 4, 6)), ("sr_audio", (1, 5, 64))]
