"""Effective receptive field tool: known answers (2D / 3D), area ratios, layouts (tokens, channel-first,
channel-last), PeftModels, heat maps, the command line, and DKA vs a bottleneck adapter on a small ViT."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import monai_peft as mp
from monai_peft.analysis import erf
from monai_peft.errors import ConfigError, InputDataError
from monai_peft.methods.dka import DKAConfig, DualKernelAdapter
from tests import helpers as h
from tests.conftest import require_shared


def _ones_conv(d: int, k: int) -> nn.Module:
    conv = (nn.Conv2d if d == 2 else nn.Conv3d)(1, 1, k, padding=k // 2, bias=False)
    nn.init.ones_(conv.weight)
    return conv


# -- known answers -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("d", "n", "k"), [(2, 21, 5), (2, 16, 3), (3, 11, 3)])
def test_single_all_ones_conv_has_exactly_its_kernel_support(d, n, k):
    torch.manual_seed(0)
    res = erf.compute_erf(_ones_conv(d, k), torch.randn(3, 1, *(n,) * d))
    support = np.argwhere(res.contributions > 0)
    c = n // 2
    assert res.centre == (c,) * d and res.num_images == 3 and res.layout == "channel_first"
    assert (support.min(0) == c - k // 2).all() and (support.max(0) == c + k // 2).all()
    assert len(support) == k**d
    assert np.allclose(res.contributions[res.contributions > 0], 3.0)  # |d y / d x| = 1 per tap, 3 images
    for t, ratio in res.area_ratios.items():
        assert ratio == math.ceil(t * k**d - 1e-9) / n**d


@pytest.mark.parametrize("d", [2, 3])
def test_identity_network_has_area_ratio_one_pixel(d):
    n = 9
    res = erf.compute_erf(nn.Identity(), torch.randn(2, 1, *(n,) * d), layout="channel_first")
    assert all(r == 1 / n**d for r in res.area_ratios.values())
    one_by_one = (nn.Conv2d if d == 2 else nn.Conv3d)(3, 4, 1)
    res = erf.compute_erf(one_by_one, torch.randn(2, 3, *(n,) * d))
    assert all(r == 1 / n**d for r in res.area_ratios.values())


def test_area_ratio_is_the_smallest_set_of_largest_values():
    m = np.array([[0.0, 1.0, 0.0], [2.0, 5.0, 2.0], [0.0, 0.0, 0.0]])  # total 10
    assert erf.area_ratio(m, 0.5) == 1 / 9  # 5
    assert erf.area_ratio(m, 0.51) == 2 / 9  # 5 + 2
    assert erf.area_ratio(m, 0.9) == 3 / 9  # 5 + 2 + 2
    assert erf.area_ratio(m, 1.0) == 4 / 9
    assert erf.area_ratio(np.ones(10), 0.3) == 3 / 10  # 0.3 * 10 is 3.0000000000000004 in floats
    assert erf.area_ratios(torch.ones(4, 5)) == {0.2: 0.2, 0.3: 0.3, 0.5: 0.5, 0.99: 1.0}
    with pytest.raises(InputDataError, match="zero gradient"):
        erf.area_ratio(np.zeros((3, 3)), 0.5)
    with pytest.raises(InputDataError):
        erf.area_ratio(-np.ones(3), 0.5)
    with pytest.raises(ConfigError):
        erf.area_ratio(np.ones(3), 0.0)


def test_stacked_convs_grow_the_erf_and_batches_from_an_iterable():
    torch.manual_seed(0)
    x = torch.randn(4, 1, 33, 33)
    one = erf.compute_erf(_ones_conv(2, 3), x)
    three = erf.compute_erf(nn.Sequential(*[_ones_conv(2, 3) for _ in range(3)]), [x[:2], {"image": x[2:]}])
    assert three.num_images == 4
    assert (three.contributions > 0).sum() == 7 * 7
    assert all(three.area_ratios[t] > one.area_ratios[t] for t in erf.THRESHOLDS)
    limited = erf.compute_erf(_ones_conv(2, 3), x, max_images=3, batch_size=2)
    assert limited.num_images == 3


# -- layouts and PeftModels ------------------------------------------------------------------------------
def test_vit_tokens_are_reshaped_to_the_grid_and_prefix_is_dropped():
    torch.manual_seed(0)
    model = mp.get_peft_model(h.tiny_vit(2), DKAConfig(grid=[4, 4]))
    res = erf.compute_erf(model, torch.randn(2, 1, 32, 32), "blocks.1")
    assert res.layout == "tokens" and res.output_grid == (4, 4) and res.centre == (2, 2)
    assert res.input_shape == (32, 32)
    # the centre token's own patch holds the largest contributions
    peak = np.unravel_index(np.argmax(res.contributions), res.contributions.shape)
    assert all(16 <= p < 24 for p in peak)
    res3 = erf.compute_erf(h.tiny_vit(3), torch.randn(1, 1, 32, 32, 32), "blocks.0")
    assert res3.output_grid == (4, 4, 4) and res3.input_shape == (32, 32, 32)


def test_swin_blocks_are_channel_last_and_cnn_blocks_channel_first_on_peft_models():
    torch.manual_seed(0)
    swin = mp.get_peft_model(h.tiny_swinunetr(2), mp.AdapterConfig(bottleneck=4))
    res = erf.compute_erf(swin, torch.randn(1, 1, 64, 64), "swinViT.layers2.0.blocks.0")
    assert res.layout == "channel_last" and res.output_grid == (16, 16)
    net = mp.get_peft_model(h.tiny_resnet(3), mp.LoraConfig(r=2))
    res = erf.compute_erf(net, torch.randn(2, 1, 16, 16, 16), "layer2.0")
    assert res.layout == "channel_first" and res.output_grid == (4, 4, 4) and res.input_shape == (16, 16, 16)
    with pytest.raises(mp.TargetingError, match="no module named"):
        erf.compute_erf(net, torch.randn(1, 1, 16, 16, 16), "layer9")
    with pytest.raises(InputDataError, match="neither tokens"):
        erf.compute_erf(net, torch.randn(1, 1, 16, 16, 16), "fc")


def test_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    net = h.tiny_resnet(2).train()
    net.bn1.eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    erf.compute_erf(net, torch.randn(2, 1, 32, 32), "layer1.0")
    assert net.training and not net.bn1.training
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
    assert not any(m._forward_hooks for m in net.modules())


# -- DKA versus a bottleneck adapter of the same width -------------------------------------------------------
def _vit_with(cfg, seed: int = 0):
    torch.manual_seed(seed)
    net = h.tiny_vit(2, img=64, patch=8, layers=2, classes=2)  # 8 x 8 token grid
    return mp.get_peft_model(net, cfg, modules_to_save=["classification_head"])


def _erf_inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, 64, 64, generator=g)
    y = (x[:, 0, 24:40, 24:40].mean(dim=(1, 2)) > 0).long()  # label = sign of the central region
    return x, y, torch.randn(8, 1, 64, 64, generator=g)


def test_dka_erf_is_larger_than_bottleneck_adapter_after_a_few_training_steps():
    """Setting: the same frozen, seeded ViT backbone; each adapter (width 16) starts from its method's reference
    init (DKA: PyTorch defaults; Houlsby: W_up = 0) and gets the same 5 Adam steps on the same batch; the ERF of the
    last block is measured on the same 8 held-out inputs. This is how the adapters are compared in practice
    (trained, not at an arbitrary init); 5 steps keep the test fast and deterministic."""
    x, y, x_eval = _erf_inputs()
    ratios = {}
    for name, cfg in (("dka", DKAConfig(bottleneck=16, grid=[8, 8])), ("adapter", mp.AdapterConfig(bottleneck=16))):
        model = _vit_with(cfg).train()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        torch.manual_seed(2)
        for _ in range(5):
            loss = nn.functional.cross_entropy(h.first(model(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        ratios[name] = erf.compute_erf(model, x_eval, "blocks.1").area_ratios
    assert ratios["dka"][0.5] > 1.3 * ratios["adapter"][0.5], ratios


def test_dka_erf_is_larger_with_identical_projections_at_init():
    """Mechanism check: copy the DKA's W_down / W_up into a bias-free Houlsby adapter (no dropout on either), so the
    two differ only by the depthwise convolutions (and DKA's second GELU); the DKA's ERF is larger."""
    x_eval = _erf_inputs()[2]
    dka_model = _vit_with(DKAConfig(bottleneck=16, dropout=0.0, grid=[8, 8]))
    houlsby = _vit_with(mp.AdapterConfig(bottleneck=16, bias=False))
    pairs = zip(
        [m for m in dka_model.modules() if isinstance(m, DualKernelAdapter)],
        [m for m in houlsby.modules() if type(m).__name__ == "BottleneckAdapter"],
    )
    with torch.no_grad():
        for a, b in pairs:
            b.down.weight.copy_(a.down.weight)
            b.up.weight.copy_(a.up.weight)
    r_dka = erf.compute_erf(dka_model, x_eval, "blocks.1").area_ratios
    r_houlsby = erf.compute_erf(houlsby, x_eval, "blocks.1").area_ratios
    assert r_dka[0.5] > 1.1 * r_houlsby[0.5], (r_dka, r_houlsby)


# -- pictures and the command line ----------------------------------------------------------------------------
def test_heatmaps_2d_and_3d(tmp_path):
    torch.manual_seed(0)
    r2 = erf.compute_erf(_ones_conv(2, 5), torch.randn(2, 1, 24, 24))
    r3 = erf.compute_erf(_ones_conv(3, 3), torch.randn(1, 1, 10, 10, 10))
    p2 = erf.save_erf_heatmap(r2, tmp_path / "a" / "erf2.png", title="conv 5x5")
    p3 = erf.save_erf_figure({"conv A": r3, "conv B": r3.contributions}, tmp_path / "erf3.png")
    for p in (p2, p3):
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and 1_000 < len(data) < 300_000
    table = erf.ratio_table({"conv": r2})
    assert table.splitlines()[0].startswith("| model | t = 20%") and "| conv |" in table


def test_cli_erf_on_real_pneumoniamnist(tmp_path, capsys):
    npz = require_shared("medmnist/pneumoniamnist_28.npz")
    from monai_peft.cli import main

    torch.manual_seed(0)
    model = mp.get_peft_model(h.tiny_resnet(2, classes=2), DKAConfig(bottleneck=4))
    images = erf.load_images(npz, split="test", num_images=3, image_size=32)
    assert images.shape == (3, 1, 32, 32) and images.min() >= -1.0 and images.max() <= 1.0
    res = erf.compute_erf(model, images, "layer2.0")
    assert res.num_images == 3 and 0 < res.area_ratios[0.5] < 1
    out = tmp_path / "erf.png"
    rc = main(
        [
            "erf",
            "--backbone",
            "efficientnet_lite0",
            "--data",
            str(npz),
            "--num-images",
            "2",
            "--image-size",
            "64",
            "--layer",
            "_blocks.3.7",
            "--out",
            str(out),
            "--json",
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert "area ratio holding 50% of the contribution" in text and '"output_grid": [\n    4,\n    4\n  ]' in text


def test_load_images_from_a_folder(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.fromarray((np.random.default_rng(i).random((20, 24)) * 255).astype(np.uint8)).save(tmp_path / f"{i}.png")
    np.save(tmp_path / "3.npy", np.zeros((20, 24), dtype=np.uint8))
    x = erf.load_images(tmp_path, num_images=10, image_size=16, in_channels=3)
    assert x.shape == (4, 3, 16, 16)
    with pytest.raises(InputDataError, match="neither"):
        erf.load_images(tmp_path / "missing.npz")
