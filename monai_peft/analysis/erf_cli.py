"""``monai-peft erf``: argument parsing only (imports torch lazily so ``monai-peft --help`` stays fast).

The work is done by :func:`monai_peft.analysis.erf.run_erf_command`.
"""

from __future__ import annotations

import argparse

__all__ = ["add_erf_command"]


def _cmd_erf(args: argparse.Namespace) -> int:
    from monai_peft.analysis.erf import run_erf_command

    run_erf_command(args)
    return 0


def add_erf_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``erf`` to the ``monai-peft`` sub-commands.

    Example::

        monai-peft erf --backbone efficientnet_lite0 --adapter runs/dka/best --layer _blocks.6.15 \\
            --image-size 96 --num-images 100 --out erf_dka.png
    """
    p = subparsers.add_parser(
        "erf",
        help="effective receptive field of a backbone (+ adapter) on real images",
        description=(
            "Gradient of the centre output unit of a feature layer w.r.t. the input, |grad| summed over images; "
            "prints the fraction of the input holding 20/30/50/99 %% of the contribution and saves a log heat map."
        ),
    )
    p.add_argument(
        "--backbone", default="efficientnet_lite0", help="a registered backbone (monai_peft.networks.factory)"
    )
    p.add_argument("--source", default=None, help="weights of backbones that need them (path, URL, hf://)")
    p.add_argument("--backbone-kwargs", default=None, help="JSON loader arguments, e.g. '{\"num_classes\": 2}'")
    p.add_argument("--adapter", default=None, help="adapter folder saved with save_adapter (optional)")
    p.add_argument("--layer", default=None, help="module name of the feature layer (default: last preset block)")
    p.add_argument("--data", default=None, help="MedMNIST .npz or a folder of images (default: PneumoniaMNIST)")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--num-images", type=int, default=50)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--in-channels", type=int, default=1)
    p.add_argument("--num-classes", type=int, default=2)
    p.add_argument("--mean", type=float, default=0.5)
    p.add_argument("--std", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="erf.png", help="PNG heat map path")
    p.add_argument("--json", action="store_true", help="also print the figures as JSON")
    p.set_defaults(func=_cmd_erf)
    return p
