"""PeftSlidingWindowInferer: merged == unmerged, == plain MONAI without adapters, DKA unmerged, AMP, devices,
small volumes, non-cubic ROIs, 2D and 3D, caching that follows training, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer, SlidingWindowInferer, sliding_window_inference
from torch import nn

import monai_peft as mp
from monai_peft.errors import ConfigError, InputDataError
from monai_peft.inference import PeftSlidingWindowInferer, resolve_amp_dtype, roi_size_for_spacing
from monai_peft.methods.base import AdapterLayer
from tests.inference import nets as tn

# (network factory, ROI (non-cubic), input shape smaller than the ROI on one axis, larger on another)
CASES = {
    "swinunetr-3d": (lambda: tn.swinunetr(3), (32, 64, 32), (1, 2, 45, 70, 20)),
    "swinunetr-2d": (lambda: tn.swinunetr(2), (64, 32), (1, 2, 50, 75)),
    "unetr-3d": (lambda: tn.unetr(3, (32, 48, 16), in_channels=2), (32, 48, 16), (1, 2, 40, 30, 20)),
    "unetr-2d": (lambda: tn.unetr(2, (32, 48), in_channels=2), (32, 48), (1, 2, 60, 40)),
}


def _no_adapter_layers(module: nn.Module) -> bool:
    return not any(isinstance(m, AdapterLayer) for m in module.modules()) and not isinstance(module, mp.PeftModel)


@pytest.mark.parametrize("case", list(CASES))
def test_merged_lora_equals_unmerged(case: str) -> None:
    factory, roi, shape = CASES[case]
    base = factory().eval()
    peft = tn.with_lora(base)
    x = torch.randn(shape)
    kw = dict(roi_size=roi, sw_batch_size=2, overlap=0.25, amp=False)
    merged = PeftSlidingWindowInferer(**kw)
    unmerged = PeftSlidingWindowInferer(merge=False, **kw)
    out_m = merged(x, peft)
    out_u = unmerged(x, peft)
    plain = sliding_window_inference(x, roi, 2, base, 0.25, mode="gaussian")
    assert out_m.shape == plain.shape and out_m.shape[2:] == shape[2:] and out_m.dtype == torch.float32
    assert tn.max_diff(out_m, out_u) < 1e-5
    # the adapter matters (a merge that dropped it would fail the equality above) ...
    assert tn.max_diff(out_u, plain) > 1e-3
    # ... the windows ran through a merged plain network, and the caller's PeftModel is untouched
    prepared = merged.prepared_network(peft)
    assert type(prepared) is type(base) and _no_adapter_layers(prepared)
    assert isinstance(peft, mp.PeftModel) and not peft._merged and not peft._unloaded
    assert len(peft.adapter_layers()) > 0


@pytest.mark.parametrize("case", ["swinunetr-3d", "unetr-2d"])
def test_no_adapter_equals_plain_monai(case: str) -> None:
    factory, roi, shape = CASES[case]
    base = factory().eval()
    x = torch.randn(shape)
    for mode, overlap in (("gaussian", 0.5), ("constant", 0.25)):
        ours = PeftSlidingWindowInferer(roi, sw_batch_size=3, overlap=overlap, mode=mode, amp=False)(x, base)
        ref = sliding_window_inference(x, roi, 3, base, overlap, mode=mode)
        assert ours.shape == ref.shape
        assert tn.max_diff(ours, ref) <= 1e-6


def test_volume_smaller_than_roi_everywhere_is_padded_and_cropped_back() -> None:
    base = tn.swinunetr(3).eval()
    x = torch.randn(1, 2, 20, 30, 10)
    for mode in ("constant", "replicate"):
        out = PeftSlidingWindowInferer((32, 64, 32), amp=False, padding_mode=mode)(x, base)
        assert out.shape == (1, 3, 20, 30, 10)
        padded = torch.nn.functional.pad(x, (11, 11, 17, 17, 6, 6), mode=mode)
        with torch.no_grad():
            ref = base(padded)[:, :, 6:26, 17:47, 11:21]
        assert tn.max_diff(out, ref) < 1e-5
    # reflect padding cannot pad 10 voxels to 32: it falls back to replicate, with a warning
    with pytest.warns(UserWarning, match="too small to reflect-pad"):
        out = PeftSlidingWindowInferer((32, 64, 32), amp=False, padding_mode="reflect")(x, base)
    assert tn.max_diff(out, ref) < 1e-5


def test_dka_runs_unmerged() -> None:
    base = tn.swinunetr(3).eval()
    dka = mp.get_peft_model(copy.deepcopy(base), mp.DKAConfig(bottleneck=4)).eval()
    x = torch.randn(1, 2, 40, 64, 32)
    inferer = PeftSlidingWindowInferer((32, 64, 32), sw_batch_size=2, amp=False)
    out = inferer(x, dka)
    assert inferer.prepared_network(dka) is dka  # nothing to merge: the PeftModel itself runs
    ref = sliding_window_inference(x, (32, 64, 32), 2, dka, 0.25, mode="gaussian")
    assert tn.max_diff(out, ref) < 1e-6
    assert tn.max_diff(out, sliding_window_inference(x, (32, 64, 32), 2, base, 0.25, mode="gaussian")) > 1e-4


def test_cache_follows_training_and_state_changes() -> None:
    base = tn.unetr(2, (32, 48), in_channels=2).eval()
    peft = tn.with_lora(base)
    x = torch.randn(1, 2, 40, 60)
    inferer = PeftSlidingWindowInferer((32, 48), amp=False)
    first = inferer(x, peft)
    prepared = inferer.prepared_network(peft)
    assert inferer.prepared_network(peft) is prepared  # cached while nothing changes
    # one optimiser step on the adapter: the next call must see the new weights
    peft.train()
    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.5)
    loss = peft(torch.randn(2, 2, 32, 48)).square().mean()
    loss.backward()
    opt.step()
    after = inferer(x, peft)
    assert inferer.prepared_network(peft) is not prepared
    expected = PeftSlidingWindowInferer((32, 48), amp=False, merge=False)(x, peft)
    assert tn.max_diff(after, expected) < 1e-5 and tn.max_diff(after, first) > 1e-4
    # disabling the adapter gives the base network's output
    with peft.disable_adapter():
        off = inferer(x, peft)
    assert tn.max_diff(off, PeftSlidingWindowInferer((32, 48), amp=False)(x, base)) < 1e-5


def test_merge_inplace_consumes_the_peft_model() -> None:
    base = tn.unetr(2, (32, 48), in_channels=2).eval()
    peft = tn.with_lora(base)
    x = torch.randn(1, 2, 40, 60)
    ref = PeftSlidingWindowInferer((32, 48), amp=False, merge=False)(x, peft)
    inferer = PeftSlidingWindowInferer((32, 48), amp=False, merge_inplace=True)
    assert tn.max_diff(inferer(x, peft), ref) < 1e-5
    assert peft._unloaded  # documented: the caller's PeftModel was unloaded
    assert tn.max_diff(inferer(x, peft), ref) < 1e-5  # the cached merged network keeps working


def test_is_a_monai_sliding_window_inferer_and_keeps_meta() -> None:
    inferer = PeftSlidingWindowInferer((32, 48))
    assert isinstance(inferer, SlidingWindowInferer) and isinstance(inferer, Inferer)
    assert inferer.mode == "gaussian"
    base = tn.unetr(2, (32, 48), in_channels=2).eval()
    x = MetaTensor(torch.randn(1, 2, 40, 60), meta={"filename_or_obj": "case7.nii.gz"})
    out = inferer(x, base)
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "case7.nii.gz"


def test_output_is_float32_for_half_inputs_and_amp() -> None:
    base = tn.unetr(2, (32, 48), in_channels=2).eval()
    x = torch.randn(1, 2, 40, 60)
    ref = PeftSlidingWindowInferer((32, 48), amp=False)(x, base)
    out_half_in = PeftSlidingWindowInferer((32, 48), amp=False)(x.half(), base)
    assert out_half_in.dtype == torch.float32 and tn.max_diff(out_half_in, ref) < 5e-2
    bf16 = PeftSlidingWindowInferer((32, 48), amp="bf16")(x, base)
    assert bf16.dtype == torch.float32
    err = tn.max_diff(bf16, ref)
    assert 0 < err < 0.1 * float(ref.abs().max())  # bf16 really ran, and is close


def test_amp_policy() -> None:
    assert resolve_amp_dtype("auto", "cpu") is None
    assert resolve_amp_dtype(True, "cpu") is torch.bfloat16
    assert resolve_amp_dtype(False, "cuda") is None
    assert resolve_amp_dtype("fp16", "cpu") is torch.float16
    assert resolve_amp_dtype(torch.bfloat16, "cpu") is torch.bfloat16
    assert resolve_amp_dtype("fp32", "cuda") is None
    if torch.cuda.is_available():
        want = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        assert resolve_amp_dtype("auto", "cuda") is want
    with pytest.raises(ConfigError, match="amp must be"):
        resolve_amp_dtype("int8", "cpu")
    with pytest.raises(ConfigError, match="amp must be"):
        PeftSlidingWindowInferer((32, 32), amp="quarter")


def test_channels_last_matches_and_does_not_touch_the_callers_network() -> None:
    base = tn.swinunetr(3).eval()
    x = torch.randn(1, 2, 40, 64, 32)
    ref = PeftSlidingWindowInferer((32, 64, 32), amp=False)(x, base)
    inferer = PeftSlidingWindowInferer((32, 64, 32), amp=False, channels_last=True)
    out = inferer(x, base)
    assert tn.max_diff(out, ref) < 1e-5
    prepared = inferer.prepared_network(base)
    assert prepared is not base
    conv = next(m for m in prepared.modules() if isinstance(m, nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert all(p.is_contiguous() for p in base.parameters())


def test_compile_matches() -> None:
    net = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv3d(4, 2, 1)).eval()
    x = torch.randn(1, 1, 20, 24, 12)
    ref = PeftSlidingWindowInferer((16, 16, 8), amp=False)(x, net)
    out = PeftSlidingWindowInferer((16, 16, 8), amp=False, compile=True, compile_kwargs={"dynamic": False})(x, net)
    assert tn.max_diff(out, ref) < 1e-5


def test_output_device_and_sw_device_default_to_input_and_network() -> None:
    net = nn.Conv3d(1, 2, 1).eval()
    x = torch.randn(1, 1, 10, 12, 14)
    out = PeftSlidingWindowInferer((8, 8, 8), device="cpu", sw_device="cpu", amp=False)(x, net)
    assert out.device.type == "cpu" and out.shape == (1, 2, 10, 12, 14)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_windows_cpu_stitching() -> None:  # pragma: no cover - GPU machines only
    base = tn.swinunetr(3).eval()
    peft = tn.with_lora(base).cuda()
    x = torch.randn(1, 2, 70, 64, 40)
    out = PeftSlidingWindowInferer((32, 64, 32), sw_batch_size=2, device="cpu", amp=False)(x, peft)
    assert out.device.type == "cpu" and out.dtype == torch.float32
    ref = PeftSlidingWindowInferer((32, 64, 32), sw_batch_size=2, amp=False, merge=False)(x.cuda(), peft)
    assert tn.max_diff(out, ref.cpu()) < 1e-4
    amp = PeftSlidingWindowInferer((32, 64, 32), sw_batch_size=2, device="cpu")(x, peft)
    assert amp.dtype == torch.float32 and tn.max_diff(amp, out) < 0.1 * float(out.abs().max())


def test_network_inside_a_wrapper_is_merged() -> None:
    base = tn.unetr(2, (32, 48), in_channels=2).eval()
    wrapper = nn.Sequential(tn.with_lora(base), nn.Softmax(dim=1)).eval()
    x = torch.randn(1, 2, 40, 60)
    inferer = PeftSlidingWindowInferer((32, 48), amp=False)
    out = inferer(x, wrapper)
    assert _no_adapter_layers(inferer.prepared_network(wrapper))
    assert isinstance(wrapper[0], mp.PeftModel)  # the caller's wrapper still holds its PeftModel
    assert tn.max_diff(out, PeftSlidingWindowInferer((32, 48), amp=False, merge=False)(x, wrapper)) < 1e-6


def test_bad_input_messages() -> None:
    inferer = PeftSlidingWindowInferer((32, 64, 32))
    net = tn.swinunetr(3).eval()
    with pytest.raises(InputDataError, match=r"is 3D and needs inputs \(B, C, H, W, D\)"):
        inferer(torch.randn(1, 2, 64, 64), net)
    x = torch.randn(1, 2, 32, 64, 32)
    x[0, 0, 3, 4, 5] = float("nan")
    with pytest.raises(InputDataError, match="1 NaN/Inf voxel"):
        inferer(x, net)
    with pytest.raises(ConfigError, match="overlap"):
        PeftSlidingWindowInferer((32, 32), overlap=1.0)
    with pytest.raises(ConfigError, match="sw_batch_size"):
        PeftSlidingWindowInferer((32, 32), sw_batch_size=0)
    with pytest.raises(ConfigError, match="mode"):
        PeftSlidingWindowInferer((32, 32), mode="mean")


def test_roi_size_for_spacing() -> None:
    assert roi_size_for_spacing(96, (0.8, 0.8, 3.0), multiple=32) == (128, 128, 32)
    assert roi_size_for_spacing((96, 96, 60), (1.0, 1.0, 3.0), multiple=16) == (96, 96, 16)
    assert roi_size_for_spacing(10, (1.0, 5.0), multiple=16) == (16, 16)
    with pytest.raises(ConfigError):
        roi_size_for_spacing(96, (1.0, 0.0, 1.0))


def test_fresh_lora_is_identity_through_the_inferer() -> None:
    """Sanity of the fixtures: without randomised adapter weights LoRA changes nothing."""
    base = tn.unetr(2, (32, 48), in_channels=2).eval()
    peft = mp.get_peft_model(copy.deepcopy(base), mp.LoraConfig(r=2)).eval()
    x = torch.randn(1, 2, 40, 60)
    a = PeftSlidingWindowInferer((32, 48), amp=False)(x, peft)
    b = PeftSlidingWindowInferer((32, 48), amp=False)(x, base)
    assert tn.max_diff(a, b) < 1e-5
