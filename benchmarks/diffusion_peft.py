"""Trainable-parameter counts of the diffusion PEFT methods (Dutt et al., MIDL 2024, T2I arm) on
representative MONAI DiffusionModelUNet configurations, measured by building each PEFT model.

Usage::

    python benchmarks/diffusion_peft.py                 # markdown table on stdout
    python benchmarks/diffusion_peft.py --json out.json # also write the numbers
    python benchmarks/diffusion_peft.py --step          # also time one training step (CPU, small batch)

Configurations (weights are random: the counts depend on the architecture only):

- ``ddpm2d``: MONAI's 2D DDPM tutorial U-Net (channels 128/256/256, attention at levels 2-3,
  one res block, 256 channels per head);
- ``cxr_ldm``: the text-conditioned latent U-Net of MONAI's chest X-ray latent diffusion bundle
  (channels 256/512/768, two res blocks, cross-attention to a 1024-d text embedding): the
  closest MONAI analogue of the Stable Diffusion U-Net that Dutt et al. tuned on MIMIC-CXR;
- ``ddpm3d``: MONAI's 3D DDPM tutorial U-Net (channels 256/256/512, attention at level 3).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from monai.networks.nets import DiffusionModelUNet

import monai_peft as mp
import monai_peft.methods.diffusion  # registers svdiff, difffit, B+N+A and the preset)

CONFIGS = {
    "ddpm2d": dict(
        spatial_dims=2,
        in_channels=1,
        out_channels=1,
        channels=(128, 256, 256),
        attention_levels=(False, True, True),
        num_res_blocks=1,
        num_head_channels=256,
    ),
    "cxr_ldm": dict(
        spatial_dims=2,
        in_channels=3,
        out_channels=3,
        channels=(256, 512, 768),
        attention_levels=(False, True, True),
        num_res_blocks=2,
        num_head_channels=(0, 512, 768),
        with_conditioning=True,
        transformer_num_layers=1,
        cross_attention_dim=1024,
    ),
    "ddpm3d": dict(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        channels=(256, 256, 512),
        attention_levels=(False, False, True),
        num_res_blocks=2,
        num_head_channels=(0, 0, 512),
    ),
}
METHODS = {
    "full": ("full_finetune", {}),
    "attention": ("attention_tuning", {}),
    "bias": ("bitfit", {}),
    "norm": ("norm_tuning", {}),
    "bias+norm+attention": ("diffusion_bias_norm_attention", {}),
    "lora (r=8)": ("lora", {"r": 8}),
    "svdiff": ("svdiff", {}),
    "difffit": ("difffit", {}),
}


def literal_norm_rule(net: torch.nn.Module) -> int:
    """Parameters whose MONAI name contains "norm" (the SD rule applied literally)."""
    return sum(p.numel() for n, p in net.named_parameters() if "norm" in n)


def measure(cfg_name: str, step: bool, labels: list[str]) -> dict:
    row: dict = {"config": cfg_name}
    for label in ["full", *[m for m in labels if m != "full"]]:
        method, kwargs = METHODS[label]
        torch.manual_seed(0)
        net = DiffusionModelUNet(**CONFIGS[cfg_name])
        if label == "full":
            row["total"] = sum(p.numel() for p in net.parameters())
            row["norm (literal name rule)"] = literal_norm_rule(net)
        t0 = time.perf_counter()
        model = mp.get_peft_model(net, mp.get_config(method, **kwargs))
        setup = time.perf_counter() - t0
        row[label] = model.trainable_parameters()[0]
        row[f"{label} setup_s"] = round(setup, 2)
        if step:
            row[f"{label} step_s"] = round(_time_step(model, cfg_name), 3)
    return row


def _time_step(model: torch.nn.Module, cfg_name: str) -> float:
    cfg = CONFIGS[cfg_name]
    size = (32,) * cfg["spatial_dims"] if cfg["spatial_dims"] == 2 else (16,) * 3
    x = torch.randn(1, cfg["in_channels"], *size)
    kw = {"timesteps": torch.tensor([500])}
    if cfg.get("with_conditioning"):
        kw["context"] = torch.randn(1, 4, cfg["cross_attention_dim"])
    model.train()
    F.mse_loss(model(x, **kw), x).backward()  # warm-up
    t0 = time.perf_counter()
    F.mse_loss(model(x, **kw), x).backward()
    return time.perf_counter() - t0


def fmt(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the measurements to this file")
    parser.add_argument("--step", action="store_true", help="time one training step per method (CPU)")
    parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    rows = [measure(c, args.step, args.methods) for c in args.configs]
    labels = ["full", *[m for m in args.methods if m != "full"]]
    print("| method | " + " | ".join(r["config"] for r in rows) + " |")
    print("|---|" + "---|" * len(rows))
    for label in labels:
        cells = [f"{fmt(r[label])} ({100 * r[label] / r['total']:.2f} %)" for r in rows]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print(
        '| norm, literal "norm"-in-name rule | ' + " | ".join(fmt(r["norm (literal name rule)"]) for r in rows) + " |"
    )
    if "svdiff" in labels:
        print("| SV-Diff setup (SVD of every weight), s | " + " | ".join(str(r["svdiff setup_s"]) for r in rows) + " |")
    if args.step:
        for label in labels:
            print(f"| step {label}, s | " + " | ".join(str(r[f"{label} step_s"]) for r in rows) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
