"""How the 3D DKA designs compare with 2D DKA: parameter counts and measured effective receptive fields.

Setting (CPU, minutes): a small frozen, seeded MONAI ViT (hidden 48, 2 blocks, patch 8) on a token grid of the same
side in 2D (64 x 64 px -> 8 x 8 tokens) and 3D (64^3 voxels -> 8 x 8 x 8 tokens), one adapter of width 16 after
each block. Designs: Houlsby bottleneck adapter (no convolution; zero-init = the frozen backbone at step 0), DKA
2D (full 51 x 51 clamped to 15 x 15, + 5 x 5), DKA 3D separable (15 x 1 x 1 -> 1 x 15 x 1 -> 1 x 1 x 15, + 5^3),
DKA 3D full (15^3 + 5^3), DKA 3D dilated (5^3 taps, dilation 4, + 5^3) and DKA 3D with the small kernel
only (large kernel 1). The ERF of the last block is
measured on 8 random inputs with :func:`monai_peft.analysis.erf.compute_erf` at the reference init and after
``--steps`` Adam steps (lr 1e-2) on a synthetic task whose label is the sign of the mean of the central region.
2D and 3D area ratios are fractions of pixels vs voxels; ``ratio^(1/d)`` (the side fraction of an equivalent
square/cube) puts them on one scale.

Usage::

    .venv/bin/python benchmarks/dka_3d_erf.py --figure docs/figures/dka_3d_erf.png
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import monai_peft as mp  # noqa: E402
from monai_peft.analysis.erf import compute_erf, save_erf_figure  # noqa: E402
from monai_peft.methods.dka import (  # noqa: E402
    DKAConfig,
    DualKernelAdapter,
    SeparableDepthwiseConv,
    dka_parameter_count,
)

DESIGNS = [
    ("Houlsby adapter, 2D", 2, lambda: mp.AdapterConfig(bottleneck=16)),
    ("DKA 2D full 51->15 + 5", 2, lambda: DKAConfig(bottleneck=16)),
    ("Houlsby adapter, 3D", 3, lambda: mp.AdapterConfig(bottleneck=16)),
    ("DKA 3D separable 51->15 + 5^3", 3, lambda: DKAConfig(bottleneck=16, large_kernel_mode="separable")),
    ("DKA 3D separable, per-factor default init", 3, lambda: DKAConfig(bottleneck=16, large_kernel_mode="separable")),
    ("DKA 3D full 51->15^3 + 5^3", 3, lambda: DKAConfig(bottleneck=16, large_kernel_mode="full")),
    ("DKA 3D dilated 5^3 (d=4) + 5^3", 3, lambda: DKAConfig(bottleneck=16, large_kernel_mode="dilated")),
    ("DKA 3D small only (5^3)", 3, lambda: DKAConfig(bottleneck=16, large_kernel=1)),
]


def vit(d: int) -> nn.Module:
    from monai.networks.nets import ViT

    return ViT(
        in_channels=1,
        img_size=(64,) * d,
        patch_size=8,
        spatial_dims=d,
        hidden_size=48,
        mlp_dim=96,
        num_layers=2,
        num_heads=4,
        classification=True,
        num_classes=2,
        post_activation=None,
        qkv_bias=True,
    )


def data(d: int):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 1, *(64,) * d, generator=g)
    centre = (slice(None), 0, *(slice(24, 40),) * d)
    y = (x[centre].flatten(1).mean(1) > 0).long()
    return x, y, torch.randn(8, 1, *(64,) * d, generator=g)


def measure(name: str, d: int, make_cfg, steps: int) -> dict:
    torch.manual_seed(0)
    model = mp.get_peft_model(vit(d), make_cfg(), modules_to_save=["classification_head"])
    if "per-factor default init" in name:  # ablation: each 1D factor with PyTorch's own bound 1/sqrt(k)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, SeparableDepthwiseConv):
                    for conv, k in zip(m.axes, m.kernel_size):
                        if k > 1:
                            conv.weight.uniform_(-(51**-0.5), 51**-0.5)  # fan-in of the configured 51-tap factor
    x, y, x_eval = data(d)
    params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "classification_head" not in n)
    kernels = [(a.large.kernel_size, a.small.kernel_size) for a in model.modules() if isinstance(a, DualKernelAdapter)]
    out = {"name": name, "d": d, "adapter_params": params // 2, "kernels": kernels[:1]}
    out["init"] = compute_erf(model, x_eval, "blocks.1")
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(2)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(x)[0], y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out["trained"] = compute_erf(model, x_eval, "blocks.1")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--figure", default=None)
    args = p.parse_args()
    t0 = time.time()
    print("Parameters of one DKA (no biases), C = 768 (ViT-B), m = 16:")
    print("| design | formula | parameters |")
    print("|---|---|---|")
    for label, large, small, mode, formula in [
        ("2D full 51 x 51 + 5 x 5 (paper)", (51, 51), (5, 5), "full", "m (2C + k^2 + k_s^2)"),
        ("2D full, clamped to a 14 x 14 grid (27 x 27)", (27, 27), (5, 5), "full", "m (2C + k^2 + k_s^2)"),
        ("3D full 51^3 + 5^3 (literal)", (51,) * 3, (5,) * 3, "full", "m (2C + k^3 + k_s^3)"),
        (
            "3D separable 51 + 5^3 (auto when the map size is unknown or large)",
            (51,) * 3,
            (5,) * 3,
            "separable",
            "m (2C + 3k + k_s^3)",
        ),
        (
            "3D full clamped to a 6^3 grid, 11^3 + 5^3 (auto picks it)",
            (11,) * 3,
            (5,) * 3,
            "full",
            "m (2C + k^3 + k_s^3)",
        ),
        ("3D separable clamped to a 6^3 grid (11 + 5^3)", (11,) * 3, (5,) * 3, "separable", "m (2C + 3k + k_s^3)"),
        ("3D full clamped to an 8^3 grid (15^3 + 5^3)", (15,) * 3, (5,) * 3, "full", "m (2C + k^3 + k_s^3)"),
        ("3D dilated 5^3 reaching 51 (d = 13) + 5^3", (51,) * 3, (5,) * 3, "dilated", "m (2C + 5^3 + k_s^3)"),
    ]:
        print(f"| {label} | {formula} | {dka_parameter_count(768, 16, large, small, mode):,d} |")
    rows = [measure(name, d, make, args.steps) for name, d, make in DESIGNS]
    print(f"\nERF of the last block (8 inputs), tiny frozen ViT, grid 8^d; init -> after {args.steps} steps:")
    print(
        "| design | kernels (clamped) | params / adapter | t = 50 % init | t = 50 % trained | t = 99 % trained | "
        "side fraction (t = 50 %, trained) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        i, t = r["init"].area_ratios, r["trained"].area_ratios
        k = r["kernels"][0] if r["kernels"] else "-"
        print(
            f"| {r['name']} | {k} | {r['adapter_params']:,d} | {i[0.5]:.4f} | {t[0.5]:.4f} | {t[0.99]:.4f} | "
            f"{t[0.5] ** (1 / r['d']):.3f} |"
        )
    if args.figure:
        save_erf_figure({r["name"]: r["trained"] for r in rows if r["d"] == 2}, args.figure, suptitle="2D, trained")
        fig3 = Path(args.figure).with_name(Path(args.figure).stem + "_3d.png")
        save_erf_figure(
            {r["name"]: r["trained"] for r in rows if r["d"] == 3},
            fig3,
            suptitle="3D, trained (central slices)",
            panel_size=1.8,
            dpi=45,
        )
        print(f"figures: {args.figure}, {fig3}")
    print(f"total time {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
